"""Who a request is: the tenant that owns the files and batches it stores, from its API key.

A configured key is ``key`` or ``key:tenant``. Keys naming the same tenant share its files and batches (a team
with a key per person or per service); a key without a tenant is its own tenant, named by a hash of the key (the
key itself is never stored). With no keys configured every request is the one tenant ``default``, which also
owns the rows stored before tenants existed. Admin keys (``ADMIN_API_KEYS``) see every tenant's files and
batches; what they store belongs to their own tenant."""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass

DEFAULT_TENANT = "default"  # also the tenant of rows migrated from before tenants (store.MIGRATIONS[2])
_TENANT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass(frozen=True)
class Principal:
    tenant: str
    admin: bool = False

    @property
    def scope(self) -> str | None:
        """The tenant whose rows this principal may see; None: every tenant's (an admin key)."""
        return None if self.admin else self.tenant


ANONYMOUS = Principal(DEFAULT_TENANT)


def parse_key(entry: str) -> tuple[str, str]:
    """``key`` or ``key:tenant`` -> (key, tenant). Raises ValueError naming what is wrong (never the key)."""
    key, sep, tenant = entry.strip().partition(":")
    if not key:
        raise ValueError("an API key entry is empty (expected 'key' or 'key:tenant')")
    if not sep:
        return key, key_tenant(key)
    if not _TENANT.fullmatch(tenant):
        raise ValueError(f"tenant {tenant[:80]!r} must be 1-64 letters, digits, '.', '_' or '-' (starting with a "
                         "letter or digit); an API key entry is 'key' or 'key:tenant', keys cannot contain ':'")
    return key, tenant


def key_tenant(key: str) -> str:
    """A key's own tenant: stable across restarts and servers, and not the key."""
    return "key-" + hashlib.sha256(b"minicpmv-tenant\0" + key.encode()).hexdigest()[:24]


class KeyTable:
    """The configured keys. ``lookup`` compares the presented key with every entry in constant time."""

    def __init__(self, api_keys: list[str], admin_api_keys: list[str]):
        self._entries: list[tuple[bytes, Principal]] = []
        for entries, admin in ((api_keys, False), (admin_api_keys, True)):
            for entry in entries:
                key, tenant = parse_key(entry)
                self._entries.append((key.encode(), Principal(tenant, admin)))

    @property
    def enabled(self) -> bool:
        return bool(self._entries)

    def lookup(self, key: str) -> Principal | None:
        presented = key.strip().encode()
        found = None
        for candidate, principal in self._entries:  # no early exit: the time does not say which entry matched
            if hmac.compare_digest(presented, candidate) and (found is None or principal.admin):
                found = principal
        return found
