"""What this host offers cnm's BPF data path, each fact checked now.

Checks: libbpf loads, the process may load BPF programs (CAP_BPF or CAP_SYS_ADMIN, and
CAP_NET_ADMIN for TC), the kernel loads SCHED_CLS programs and has every helper a program
needs (libbpf's probes load tiny programs and drop them at once), bpffs can be mounted,
kernel BTF, the kernel release, and the built object files.

Each kernel feature knows the release that brought it, so the result tells apart "this
kernel is too old" (a test may skip) from "this kernel should have it and does not" (a
failure): on a kernel at or above every feature's release, a missing feature is a failure.
"""

from __future__ import annotations

import errno as E
import os
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from cnm.ebpf import errors, loader

BTF_PATH = "/sys/kernel/btf/vmlinux"
BPFFS = loader.BPFFS_DEFAULT_MOUNT
BPF_PROG_TYPE_SCHED_CLS = 3
CAP_NET_ADMIN = 12
CAP_SYS_ADMIN = 21
CAP_BPF = 39
MIN_KERNEL = (5, 10)  # bpf_redirect_peer, the newest feature cnm's programs use

# helper name -> (BPF_FUNC_* id, the kernel release that brought it)
HELPERS = {
    "bpf_skb_get_tunnel_key": (20, (4, 3)),
    "bpf_skb_set_tunnel_key": (21, (4, 3)),
    "bpf_redirect": (23, (4, 4)),
    "bpf_redirect_peer": (155, (5, 10)),
}
# program (object) name -> the helpers it calls
PROGRAMS = {
    "cnm_redirect": ("bpf_redirect_peer",),
    "cnm_tunnel": (
        "bpf_skb_get_tunnel_key",
        "bpf_skb_set_tunnel_key",
        "bpf_redirect",
        "bpf_redirect_peer",
    ),
}


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    since: tuple[int, int] | None = None  # the kernel release that brought the feature
    required: bool = True  # False: informational only


@dataclass(frozen=True)
class EbpfProbe:
    """The probe's result: `ok` when every required check passed, else `reason`."""

    kernel: str
    kernel_version: tuple[int, int]
    libbpf: str | None  # the library's version, None when it cannot be loaded
    btf: bool
    bpffs_mounted: bool
    checks: tuple[Check, ...] = field(default_factory=tuple)

    @property
    def failed(self) -> tuple[Check, ...]:
        return tuple(c for c in self.checks if c.required and not c.ok)

    @property
    def ok(self) -> bool:
        return not self.failed

    @property
    def reason(self) -> str | None:
        if self.ok:
            return None
        return "; ".join(f"{c.name}: {c.detail}" for c in self.failed)

    @property
    def kernel_too_old(self) -> bool:
        """True when every failed check is a feature newer than this kernel (a skip, not a
        failure)."""
        failed = self.failed
        return bool(failed) and all(
            c.since is not None and self.kernel_version < c.since for c in failed
        )

    @property
    def verdict(self) -> str:
        """ "ok", "skip" (the kernel predates a feature) or "fail"."""
        if self.ok:
            return "ok"
        return "skip" if self.kernel_too_old else "fail"

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(ok=self.ok, reason=self.reason, verdict=self.verdict)
        return out


ProbeResult = EbpfProbe


def kernel_version(release: str | None = None) -> tuple[int, int]:
    m = re.match(r"(\d+)\.(\d+)", release or os.uname().release)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def _caps() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return int(line.split()[1], 16)
    except OSError:
        pass
    return 0


def _bpffs_mounted() -> bool:
    try:
        return loader.fs_type(BPFFS) == "bpf"
    except OSError:
        return False


def _bpffs_known() -> bool:
    try:
        with open("/proc/filesystems") as f:
            return any(line.split()[-1:] == ["bpf"] for line in f)
    except OSError:
        return False


def _kernel_probe(name: str, rc: int, since: tuple[int, int]) -> Check:
    if rc == 1:
        return Check(name, True, "supported", since)
    if rc == 0:
        return Check(name, False, "not supported by this kernel", since)
    if -rc in (E.EPERM, E.EACCES):
        return Check(name, False, "cannot probe: no privilege to load BPF programs", since)
    return Check(name, False, f"cannot probe: {os.strerror(-rc)}", since)


def probe(programs: tuple[str, ...] = tuple(PROGRAMS), obj_dir: str | None = None) -> EbpfProbe:
    """Check everything the named programs need (default: all of cnm's)."""
    release = os.uname().release
    version = kernel_version(release)
    checks: list[Check] = []
    unknown = [p for p in programs if p not in PROGRAMS]
    if unknown:
        raise errors.InvalidArgument(f"unknown BPF programs {unknown}: known {list(PROGRAMS)}")

    checks.append(
        Check(
            "kernel",
            version >= MIN_KERNEL,
            f"{release} (cnm's programs need {MIN_KERNEL[0]}.{MIN_KERNEL[1]} or newer)",
            MIN_KERNEL,
        )
    )
    try:
        libbpf: str | None = loader.libbpf_version()
        checks.append(Check("libbpf", True, libbpf))
    except errors.LibbpfUnavailable as exc:
        libbpf = None
        checks.append(Check("libbpf", False, str(exc)))

    caps = _caps()
    can_load = bool(caps >> CAP_BPF & 1 or caps >> CAP_SYS_ADMIN & 1)
    can_attach = bool(caps >> CAP_NET_ADMIN & 1 or caps >> CAP_SYS_ADMIN & 1)
    missing = [
        n
        for n, ok in (("CAP_BPF or CAP_SYS_ADMIN", can_load), ("CAP_NET_ADMIN", can_attach))
        if not ok
    ]
    checks.append(
        Check(
            "privileges",
            not missing,
            f"missing {', '.join(missing)}" if missing else "may load and attach programs",
        )
    )

    if libbpf is not None:
        checks.append(
            _kernel_probe(
                "program type SCHED_CLS", loader.probe_prog_type(BPF_PROG_TYPE_SCHED_CLS), (4, 1)
            )
        )
        wanted = sorted({h for p in programs for h in PROGRAMS[p]}, key=lambda h: HELPERS[h][0])
        for helper in wanted:
            helper_id, since = HELPERS[helper]
            rc = loader.probe_helper(BPF_PROG_TYPE_SCHED_CLS, helper_id)
            checks.append(_kernel_probe(f"helper {helper}", rc, since))

    mounted = _bpffs_mounted()
    known = mounted or _bpffs_known()
    detail = "mounted" if mounted else ("not mounted (mounted on first use)" if known else "absent")
    checks.append(Check(f"bpffs at {BPFFS}", known, detail, (4, 4)))

    btf = os.path.exists(BTF_PATH)
    checks.append(
        Check(
            "kernel BTF",
            btf,
            BTF_PATH if btf else "absent (not needed: cnm's programs read only uapi contexts)",
            required=False,
        )
    )

    for name in programs:
        try:
            path = loader.object_path(name, obj_dir)
            checks.append(Check(f"object {name}", True, str(path)))
        except errors.ObjectsNotBuilt as exc:
            checks.append(Check(f"object {name}", False, str(exc)))

    return EbpfProbe(
        kernel=release,
        kernel_version=version,
        libbpf=libbpf,
        btf=btf,
        bpffs_mounted=mounted,
        checks=tuple(checks),
    )


def require(programs: tuple[str, ...] = tuple(PROGRAMS)) -> EbpfProbe:
    """probe(), raising FeatureMissing with the reason unless everything is there."""
    result = probe(programs)
    if not result.ok:
        raise errors.FeatureMissing(f"the BPF data path is not available: {result.reason}")
    return result
