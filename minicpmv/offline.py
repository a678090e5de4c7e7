"""No network from the engine once its weights are in place: bitsandbytes is imported without its Hub kernels.

bitsandbytes 0.50, imported on a CPU with AVX512-BF16 (many GPU servers' CPUs too), fetches a CPU kernel from
the Hugging Face Hub while it is imported: ``bitsandbytes/backends/cpu/ops.py`` calls
``kernels.get_kernel("kernels-community/quantization-bitsandbytes", version=1)``, which asks huggingface.co
about the publisher and the kernel's versions, downloads a compiled kernel and loads it; when that fails it
logs a warning and uses the kernels bitsandbytes ships. bitsandbytes has no switch of its own for this.
``HF_HUB_OFFLINE`` stops the requests only when it is set before huggingface_hub is imported (huggingface_hub
reads it once; transformers imports it long before bitsandbytes), and it would still load a copy that another
program left in the Hub cache. We promise no network request after the weights are in place and no code
from the Hub, so the engine imports bitsandbytes only through :func:`import_bitsandbytes`: for the duration of
that import the ``kernels`` package is out of reach (``sys.modules["kernels"] = None``), bitsandbytes' ``from
kernels import get_kernel`` fails, and it uses its own kernels, as it does without ``kernels`` installed or
offline (the CPU figures in README were measured so). Afterwards ``kernels`` is importable as before; nothing in
the environment is changed.

The operator's explicit choice: ``LOCAL_KERNELS`` (the ``kernels`` package's own variable,
``repo_id=path:...``) naming ``kernels-community/quantization-bitsandbytes`` lets bitsandbytes load that local
build; the import then runs with huggingface_hub in offline mode (``huggingface_hub.constants.HF_HUB_OFFLINE``,
restored afterwards), so even then nothing is downloaded (a copy in the local Hub cache may be used when the
local build can't be loaded).

Where bitsandbytes was imported before (by other code in the process), it is returned as it is.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from types import ModuleType

logger = logging.getLogger(__name__)

BNB_HUB_KERNEL = "kernels-community/quantization-bitsandbytes"
# The logger and message of bitsandbytes' warning when the Hub kernel can't be had (misleading here: it asks to
# install ``kernels``).
_BNB_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"
_BNB_HUB_WARNING = "Failed to load CPU gemm_4bit_forward from kernels-community"


def hub_kernel_allowed(environ=None) -> bool:
    """Whether ``LOCAL_KERNELS`` names bitsandbytes' Hub kernel (the operator's own, local build)."""
    environ = os.environ if environ is None else environ
    entries = (environ.get("LOCAL_KERNELS") or "").split(":")
    return any(entry.partition("=")[0].strip() == BNB_HUB_KERNEL for entry in entries)


def import_bitsandbytes(environ=None) -> ModuleType:
    """``bitsandbytes``, imported (the first time) without a network request and without code from the Hub."""
    module = sys.modules.get("bitsandbytes")
    if module is not None:
        return module
    if hub_kernel_allowed(environ):
        with _hub_offline():
            import bitsandbytes
        logger.info("bitsandbytes imported with huggingface_hub offline (LOCAL_KERNELS names %s)", BNB_HUB_KERNEL)
        return bitsandbytes
    with _module_hidden("kernels"), _dropping(_BNB_CPU_LOGGER, _BNB_HUB_WARNING):
        import bitsandbytes
    logger.debug("bitsandbytes imported without its Hub kernels (%s): no network, its own kernels", BNB_HUB_KERNEL)
    return bitsandbytes


_ABSENT = object()


@contextlib.contextmanager
def _module_hidden(name: str) -> Iterator[None]:
    """``import name`` raises ImportError inside the block; the module (or its absence) is restored after."""
    saved = sys.modules.get(name, _ABSENT)
    sys.modules[name] = None  # type: ignore[assignment]
    try:
        yield
    finally:
        if saved is _ABSENT:
            sys.modules.pop(name, None)
        else:
            sys.modules[name] = saved  # type: ignore[assignment]


@contextlib.contextmanager
def _hub_offline() -> Iterator[None]:
    from huggingface_hub import constants

    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved


class _DropPrefix(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


@contextlib.contextmanager
def _dropping(logger_name: str, prefix: str) -> Iterator[None]:
    target = logging.getLogger(logger_name)
    dropper = _DropPrefix(prefix)
    target.addFilter(dropper)
    try:
        yield
    finally:
        target.removeFilter(dropper)
