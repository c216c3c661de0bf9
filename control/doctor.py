"""`cnm doctor`: what this host supports, each line a fact that was checked just now.

Privileges, network namespace creation (a real probe namespace made and removed), the
fast-path backend, the store, what the optional eBPF data path would find, and whether
it is in use for this state directory: its pins (read, never loaded) and the redirect
program's per-CPU counters summed (redirected, passed = left to the kernel path, ...),
and the overlay tunnel's counters per UDP port when this host runs it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Any

from cnm import fastpath
from cnm.ebpf.probe import EbpfProbe, probe
from cnm.fastpath import netns

from .osl.accel import default_pin_root, pinned_counters
from .osl.tunnel import pinned_tunnel_counters

CAP_NET_ADMIN = 12
CAP_SYS_ADMIN = 21


@dataclass
class DoctorReport:
    kernel: str
    euid: int
    cap_net_admin: bool
    cap_sys_admin: bool
    netns: str  # "ok" or the reason it failed
    fastpath_native_built: bool
    fastpath_backend: str
    store: str
    nft: str | None  # the nft binary the bridge driver's firewall uses
    ebpf: EbpfProbe
    notes: list[str] = field(default_factory=list)
    # the data path of this state directory: pin_root, in_use, counters (None: not in use)
    ebpf_datapath: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def text(self) -> str:
        yes = {True: "yes", False: "no"}
        e = self.ebpf
        rows = [
            ("kernel", self.kernel),
            ("running as", f"uid {self.euid}"),
            ("CAP_NET_ADMIN", yes[self.cap_net_admin]),
            ("CAP_SYS_ADMIN", yes[self.cap_sys_admin]),
            ("network namespaces", self.netns),
            ("native fast path", "built" if self.fastpath_native_built else "not built"),
            ("fast path in use", self.fastpath_backend),
            ("store", self.store),
            ("nftables (nft)", self.nft or "not found: bridge networks need it"),
            *((f"eBPF {c.name}", ("ok: " if c.ok else "FAILED: ") + c.detail) for c in e.checks),
            ("eBPF data path", "available" if e.ok else f"unavailable ({e.verdict})"),
            ("eBPF data path in use", _in_use_text(self.ebpf_datapath, e)),
            *(
                (f"eBPF overlay tunnel, port {port}", ", ".join(f"{k} {v}" for k, v in c.items()))
                for port, c in (self.ebpf_datapath.get("tunnel") or {}).items()
            ),
        ]
        width = max(len(k) for k, _ in rows)
        lines = [f"{k.ljust(width)}  {v}" for k, v in rows]
        return "\n".join(lines + [f"note: {n}" for n in self.notes])


def _in_use_text(datapath: dict[str, Any], probe_result: EbpfProbe) -> str:
    counters = datapath.get("counters")
    if counters is None:
        why = "" if probe_result.ok else f": {probe_result.reason}"
        return f"no (no pins at {datapath.get('pin_root')}){why}"
    shown = ", ".join(f"{k} {v}" for k, v in counters.items())
    return f"yes ({datapath.get('pin_root')}): {shown}"


def _datapath(pin_root: str, notes: list[str]) -> dict[str, Any]:
    try:
        counters = pinned_counters(pin_root)
    except Exception as exc:  # pins of another build, no privilege, ...
        notes.append(f"eBPF pins at {pin_root} unreadable: {exc}")
        counters = None
    try:
        tunnel = pinned_tunnel_counters(pin_root)
    except Exception as exc:
        notes.append(f"eBPF tunnel pins at {pin_root} unreadable: {exc}")
        tunnel = None
    return {
        "pin_root": pin_root,
        "in_use": counters is not None or tunnel is not None,
        "counters": counters,
        "tunnel": tunnel,
    }


def _caps() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    return 0


def _probe_netns() -> str:
    try:
        with tempfile.TemporaryDirectory(prefix="cnm-doctor-") as d:
            path = os.path.join(d, "probe")
            netns.create(path)
            try:
                links = netns.run_in(path, netns.link_names)
            finally:
                netns.delete(path)
        return "ok" if links == ["lo"] else f"unexpected links {links}"
    except OSError as exc:
        return f"cannot create: {exc.strerror or exc}"


def doctor(
    state_dir: str, run_dir: str, requested_fastpath: str, bpf_pin_root: str | None = None
) -> DoctorReport:
    caps = _caps()
    notes = []
    try:
        backend = fastpath.select_backend(requested_fastpath)
    except fastpath.BackendUnavailable as exc:
        backend = "unavailable"
        notes.append(str(exc))
    db = os.path.join(state_dir, "state.db")
    store = f"{db} (exists)" if os.path.exists(db) else f"{db} (not created yet)"
    return DoctorReport(
        kernel=os.uname().release,
        euid=os.geteuid(),
        cap_net_admin=bool(caps >> CAP_NET_ADMIN & 1),
        cap_sys_admin=bool(caps >> CAP_SYS_ADMIN & 1),
        netns=_probe_netns(),
        fastpath_native_built=fastpath.native_available(),
        fastpath_backend=backend,
        store=store,
        nft=shutil.which("nft") or shutil.which("nft", path="/usr/sbin:/sbin"),
        ebpf=probe(),
        notes=notes,
        ebpf_datapath=_datapath(bpf_pin_root or default_pin_root(state_dir), notes),
    )
