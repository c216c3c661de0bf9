"""cnm.fastpath: the kernel-facing hot path (netlink codec, batched transport, netns).

`BACKEND` tells which codec is in use: "native" (the compiled module) or "python".
`CNM_FASTPATH=auto|native|python` chooses; auto takes native when it is built and falls
back to python with one logged warning; native requested but missing is an error.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
from types import ModuleType

_log = logging.getLogger(__name__)
CHOICES = ("auto", "native", "python")


class BackendUnavailable(RuntimeError):
    """The requested fast-path backend cannot be used on this install."""


def native_available() -> bool:
    return _codec_built()


@functools.cache
def _codec_built() -> bool:
    # Looked up once: a module search costs ~15 us, and every socket lookup asks.
    return importlib.util.find_spec(f"{__name__}._codec") is not None


_warned = False


def select_backend(requested: str | None = None) -> str:
    """Resolve a request ("auto", "native", "python"; None = $CNM_FASTPATH or auto)."""
    global _warned
    choice = (requested or os.environ.get("CNM_FASTPATH") or "auto").strip().lower()
    if choice not in CHOICES:
        raise ValueError(f"fast path must be one of {', '.join(CHOICES)}, not {choice!r}")
    if choice == "python":
        return "python"
    if native_available():
        return "native"
    if choice == "native":
        raise BackendUnavailable(
            "the native fast path was requested but cnm.fastpath._codec is not built "
            "(build it with `pip install .` and Cython present)"
        )
    if not _warned:
        _warned = True
        _log.warning("native fast path not built; using the pure-Python backend")
    return "python"


def codec(backend: str | None = None) -> ModuleType:
    """The codec module of a backend ("auto"/"native"/"python"; None = $CNM_FASTPATH)."""
    if select_backend(backend) == "native":
        from . import _codec

        return _codec
    from . import _pycodec

    return _pycodec


def __getattr__(name: str) -> str:
    # BACKEND is resolved on first access so that a bad CNM_FASTPATH fails where it is used.
    if name == "BACKEND":
        return select_backend()
    raise AttributeError(name)
