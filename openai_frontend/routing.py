"""The balancer's routing pieces (openai_frontend/balancer.py): a request's document key, the hash ring that
maps keys to servers (consistent hashing with bounded loads), and endpoint addresses (which are DNS names to
resolve, and the default resolver).

**The document key** (``document_key``) names what a server's caches hold for a request, so that requests that
share it can be sent where it is cached:

* A request with images (``GenerateRequest.images``; PDF pages and video frames are images by then): SHA-256 of
  the first image's bytes (``images[0]``) together with the prompt up to that image: every message before the one
  holding the first image placeholder (role and content), that message's role and its content parts up to and
  including the placeholder (with the placeholder's own settings, e.g. ``max_slice_nums``), the request's LoRA
  adapter and its ``max_slice_nums``. That is the part of the prompt which any two requests with the key have in
  common, so the vision cache (the image) and the prefix cache (the tokens up to and through the image) can serve
  the second: the same page asked another question, or a follow-up turn of the same conversation (whose first
  messages are unchanged), gets the same key; another page, another system prompt or other text before the image
  gets another.
* A request without images: SHA-256 of its leading messages, every message up to and including the first user
  message (the system message and the conversation's opening question), with the adapter; a conversation's later
  turns keep the key. Only when those messages hold at least ``MIN_TEXT_CHARS`` characters of text: a short prompt
  (``"hi"``) has little to reuse, and gets no key.

Every field goes into the hash as canonical JSON (sorted keys), each part tagged, so that no two different
prefixes collide by concatenation.
"""

from __future__ import annotations

import asyncio
import bisect
import hashlib
import inspect
import ipaddress
import json
import logging
import math
import socket
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from openai_frontend.backend import GenerateRequest

logger = logging.getLogger(__name__)

MIN_TEXT_CHARS = 256  # text-only requests: fewer characters in the leading messages -> no key
VIRTUAL_NODES = 160  # ring points per server (as ketama): each server's share within a few % of 1/n
_HASH_IMAGES_IN_THREAD = 1 << 20  # a first image larger than this is hashed off the event loop


def _canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=repr).encode()


def _is_image(part: Any) -> bool:
    return isinstance(part, dict) and part.get("type") == "image"


def _text_chars(message: dict[str, Any]) -> int:
    content = message.get("content")
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):
        return sum(len(p.get("text") or "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return 0


def _image_prefix(messages: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
    """The messages up to and including the first image placeholder (that message cut after it); None if none."""
    for i, message in enumerate(messages):
        content = message.get("content")
        if not isinstance(content, list):
            continue
        for j, part in enumerate(content):
            if _is_image(part):
                return [*messages[:i], {**message, "content": content[:j + 1]}]
    return None


def _leading(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every message up to and including the first user message (all of them when there is none)."""
    for i, message in enumerate(messages):
        if message.get("role") == "user":
            return messages[:i + 1]
    return list(messages)


def document_key(request: GenerateRequest, min_text_chars: int = MIN_TEXT_CHARS) -> bytes | None:
    """The request's document key (32 bytes) as the module docstring defines it, or None."""
    common = {"adapter": request.adapter, "max_slice_nums": request.sampling.get("max_slice_nums")}
    if request.images:
        prefix = _image_prefix(request.messages)
        if prefix is None:  # no placeholder (not built by convert.py): the leading messages stand in for it
            prefix = _leading(request.messages)
        digest = hashlib.sha256(request.images[0]).digest()
        return hashlib.sha256(b"image\0" + digest + b"\0" + _canonical({"prefix": prefix, **common})).digest()
    leading = _leading(request.messages)
    if sum(_text_chars(m) for m in leading) < min_text_chars:
        return None
    return hashlib.sha256(b"text\0" + _canonical({"leading": leading, **common})).digest()


async def document_key_async(request: GenerateRequest, min_text_chars: int = MIN_TEXT_CHARS) -> bytes | None:
    """``document_key``, in a thread when the first image is large (hashing 20 MB takes ~10 ms)."""
    if request.images and len(request.images[0]) > _HASH_IMAGES_IN_THREAD:
        return await asyncio.to_thread(document_key, request, min_text_chars)
    return document_key(request, min_text_chars)


# ---------------------------------------------------------------- the ring


def _point(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


class HashRing:
    """Consistent hashing: each server at ``VIRTUAL_NODES`` points of a 64-bit circle (hashes of its name, so
    every frontend that knows the same servers builds the same ring); a key belongs to the first server clockwise
    of its own point, and ``walk`` gives every server in the order a key meets them. A server that joins or
    leaves moves only the keys of its own arcs."""

    def __init__(self, names: Iterable[str] = (), virtual_nodes: int = VIRTUAL_NODES):
        self.virtual_nodes = virtual_nodes
        points = sorted((_point(f"{name}#{i}".encode()), name) for name in set(names) for i in range(virtual_nodes))
        self._points = [p for p, _ in points]
        self._names = [n for _, n in points]
        self.size = len(set(self._names))

    def walk(self, key: bytes) -> list[str]:
        """Every server, in the order met clockwise from the key's point (its home first)."""
        order: list[str] = []
        if not self._points:
            return order
        start = bisect.bisect_right(self._points, int.from_bytes(key[:8], "big"))
        seen: set[str] = set()
        n = len(self._points)
        for k in range(n):
            name = self._names[(start + k) % n]
            if name not in seen:
                seen.add(name)
                order.append(name)
                if len(order) == self.size:
                    break
        return order


def load_bound(load_factor: float, total_in_flight: int, servers: int) -> int:
    """Bounded loads (Mirrokni, Thorup, Zadimoghaddam 2018): a server takes a keyed request only while its requests
    in flight are fewer than ceil(c * (total in flight + 1) / servers)."""
    return max(1, math.ceil(load_factor * (total_in_flight + 1) / max(1, servers) - 1e-9))


# ---------------------------------------------------------------- endpoints and DNS


@dataclass(frozen=True)
class Address:
    """``[scheme://]host:port`` split up."""

    scheme: str
    host: str
    port: str

    @classmethod
    def parse(cls, url: str) -> Address:
        scheme, sep, rest = url.strip().partition("://")
        if not sep:
            scheme, rest = "", scheme
        rest = rest.rstrip("/")
        if rest.startswith("["):  # [v6]:port
            host, _, tail = rest[1:].partition("]")
            return cls(scheme, host, tail.removeprefix(":"))
        host, sep, port = rest.rpartition(":")
        if not sep or ":" in host:  # no port, or a bare IPv6 address
            return cls(scheme, rest, "")
        return cls(scheme, host, port)

    @property
    def is_ip(self) -> bool:
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            return False
        return True

    def with_host(self, host: str) -> str:
        """This URL with ``host`` (an address) in place of the name."""
        shown = f"[{host}]" if ":" in host else host
        return (f"{self.scheme}://" if self.scheme else "") + shown + (f":{self.port}" if self.port else "")


async def resolve_host(host: str) -> list[str]:
    """The default resolver: the name's addresses (getaddrinfo, A and AAAA), in the order given, without
    duplicates and of one family: IPv4 when there are any, else IPv6 (a dual-stack name lists every server once in
    each family, and each must count once)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM)
    v4 = [info[4][0] for info in infos if info[0] == socket.AF_INET]
    v6 = [info[4][0] for info in infos if info[0] == socket.AF_INET6]
    return list(dict.fromkeys(v4 or v6))


class NamedEndpoints:
    """(gRPC, HTTP) endpoints whose gRPC host is a DNS name, and the servers they stood for at the last lookup.
    ``resolver(host)``: the host's addresses, sync or async (default ``resolve_host``)."""

    RESOLVE_TIMEOUT = 5.0

    def __init__(self, endpoints: Sequence[tuple[str, str]], resolver: Callable | None = None):
        self.endpoints = [(Address.parse(grpc), Address.parse(http)) for grpc, http in endpoints]
        self.resolver = resolver or resolve_host
        self._last: list[dict[str, tuple[str, str]]] = [{} for _ in self.endpoints]

    def __bool__(self) -> bool:
        return bool(self.endpoints)

    def __str__(self) -> str:
        return ", ".join(f"{grpc.host}:{grpc.port}" for grpc, _ in self.endpoints)

    async def _resolve(self, host: str) -> list[str]:
        answer = self.resolver(host)
        if inspect.isawaitable(answer):
            answer = await asyncio.wait_for(answer, self.RESOLVE_TIMEOUT)
        return list(dict.fromkeys(answer))

    async def lookup(self) -> tuple[dict[str, tuple[str, str]], bool]:
        """Resolve every name: the servers (name, its gRPC URL -> (gRPC URL, HTTP URL)) in order, a name whose
        lookup failed counting with its previous answer; and whether every name answered."""
        answers = await asyncio.gather(*(self._resolve(grpc.host) for grpc, _ in self.endpoints),
                                       return_exceptions=True)  # fmt: skip
        every = True
        for i, ((grpc, http), answer) in enumerate(zip(self.endpoints, answers, strict=True)):
            if isinstance(answer, BaseException):
                if not isinstance(answer, Exception):
                    raise answer
                every = False
                logger.warning("could not resolve %s (%r); keeping its servers as they are", grpc.host, answer)
                continue
            self._last[i] = {grpc.with_host(a): (grpc.with_host(a), http.with_host(a)) for a in answer}
        servers: dict[str, tuple[str, str]] = {}
        for last in self._last:
            for name, urls in last.items():
                servers.setdefault(name, urls)
        return servers, every
