"""What this host offers the optional BPF data path: libbpf, BTF, bpffs, kernel release.

Facts only, read without loading anything into the kernel.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any

import cffi

LIBBPF = "libbpf.so.1"
BTF_PATH = "/sys/kernel/btf/vmlinux"
BPFFS = "/sys/fs/bpf"


@dataclass(frozen=True)
class EbpfProbe:
    kernel: str
    libbpf: str | None  # the library's version, None when it cannot be loaded
    btf: bool
    bpffs_mounted: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _libbpf_version() -> str | None:
    ffi = cffi.FFI()
    ffi.cdef("unsigned int libbpf_major_version(void); unsigned int libbpf_minor_version(void);")
    try:
        lib = ffi.dlopen(LIBBPF)
    except OSError:
        return None
    return f"{lib.libbpf_major_version()}.{lib.libbpf_minor_version()}"


def _mounted(path: str, fstype: str) -> bool:
    try:
        with open("/proc/self/mounts") as f:
            return any(
                parts[1] == path and parts[2] == fstype
                for parts in (line.split() for line in f)
                if len(parts) > 2
            )
    except OSError:
        return False


def probe() -> EbpfProbe:
    return EbpfProbe(
        kernel=os.uname().release,
        libbpf=_libbpf_version(),
        btf=os.path.exists(BTF_PATH),
        bpffs_mounted=_mounted(BPFFS, "bpf"),
    )
