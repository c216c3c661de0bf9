"""The typed errors of cnm.ebpf.

cnm.ebpf never imports cnm.control; the control layer maps these onto its own error
categories. Every error derives from EbpfError; those that come from a failed system call
carry its errno (`errno`, None otherwise).
"""

from __future__ import annotations

import os


class EbpfError(Exception):
    """Base of every cnm.ebpf error."""

    def __init__(self, message: str, *, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno


def _with_errno(message: str, errno: int | None) -> str:
    if not errno:
        return message
    return f"{message}: {os.strerror(errno)} (errno {errno})"


class LibbpfUnavailable(EbpfError):
    """libbpf.so.1 cannot be loaded (or lacks a function cnm needs)."""


class ObjectsNotBuilt(EbpfError):
    """The BPF object file is missing: the package was installed without clang."""

    def __init__(self, path: str) -> None:
        super().__init__(f"objects not built: {path} is missing (install clang and reinstall cnm)")
        self.path = path


class ObjectError(EbpfError):
    """libbpf could not open or parse an object file."""

    def __init__(self, path: str, errno: int | None, detail: str = "") -> None:
        text = _with_errno(f"cannot open BPF object {path}", errno)
        super().__init__(f"{text}{': ' + detail if detail else ''}", errno=errno)
        self.path = path
        self.detail = detail


class LoadError(EbpfError):
    """Loading an object into the kernel failed (map creation, BTF, program load...)."""

    def __init__(self, path: str, errno: int | None, detail: str = "") -> None:
        text = _with_errno(f"cannot load BPF object {path}", errno)
        super().__init__(f"{text}{': ' + detail if detail else ''}", errno=errno)
        self.path = path
        self.detail = detail


class VerifierError(LoadError):
    """The kernel's verifier rejected a program; `log` holds the verifier's log."""

    def __init__(self, path: str, program: str, errno: int | None, log: str) -> None:
        last = next((line for line in reversed(log.splitlines()) if line.strip()), "")
        super().__init__(path, errno, f"verifier rejected program {program!r}: {last}")
        self.program = program
        self.log = log


class NotFound(EbpfError, LookupError):
    """A program, map or global variable the caller named is not in the object."""


class InvalidArgument(EbpfError, ValueError):
    """Bad input, rejected before anything changed (wrong sizes, addresses, indexes)."""


class NotLoaded(EbpfError):
    """The operation needs the object loaded (or loaded maps/programs) first."""


class MapError(EbpfError):
    """A map operation failed in the kernel."""

    def __init__(self, map_name: str, op: str, errno: int | None) -> None:
        super().__init__(_with_errno(f"map {map_name}: {op} failed", errno), errno=errno)
        self.map_name = map_name
        self.op = op


class PinError(EbpfError):
    """Pinning, reopening or unpinning under the bpffs directory failed."""

    def __init__(self, path: str, op: str, errno: int | None, detail: str = "") -> None:
        text = _with_errno(f"{op} {path}", errno)
        super().__init__(f"{text}{': ' + detail if detail else ''}", errno=errno)
        self.path = path
        self.op = op


class AttachError(EbpfError):
    """Creating a clsact hook, attaching or detaching a TC program failed."""

    def __init__(self, op: str, ifindex: int, errno: int | None, netns: str | None = None) -> None:
        where = f"ifindex {ifindex}" + (f" in {netns}" if netns else "")
        super().__init__(_with_errno(f"{op} on {where} failed", errno), errno=errno)
        self.op = op
        self.ifindex = ifindex
        self.netns = netns


class FeatureMissing(EbpfError):
    """The kernel lacks something a program needs (see cnm.ebpf.probe)."""
