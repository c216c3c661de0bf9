"""`cnm bench`: join/leave latency and bulk throughput, side by side with other tools.

Owns the comparison the README reports. Everything runs inside a throwaway network and
mount namespace made for the run (nothing on the host is touched) on pre-made network
namespaces, so every method measures the same thing: attach a container (veth pair, host
end on a bridge and up, container end named eth0 with an address and a default route) and
detach it again.

- cnm, with the native and the python fast path: sequential join and leave (p50/p99),
  then join_many / leave_many of all containers (containers per second).
- the CNI reference bridge plugin (Debian containernetworking-plugins) with host-local
  IPAM, invoked as the CNI specification says (environment + config on stdin), once per
  container and operation.
- pyroute2, one message at a time.
- `ip` (iproute2), one process per operation.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

from cnm import fastpath
from cnm.fastpath import netns

from . import errors
from .controller import NetworkController
from .osl import accel
from .types import IPAMConfig

CNI_DIRS = ("/usr/lib/cni", "/opt/cni/bin")
METHODS = ("cni", "pyroute2", "ip")
SUBNET = "10.201.0.0/16"
GATEWAY = "10.201.0.1"


@dataclass
class Result:
    method: str
    containers: int
    join_p50_ms: float | None = None
    join_p99_ms: float | None = None
    leave_p50_ms: float | None = None
    leave_p99_ms: float | None = None
    bulk_join_per_s: float | None = None
    bulk_leave_per_s: float | None = None
    note: str = ""


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] * 1000


class Progress:
    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and sys.stderr.isatty()

    def __call__(self, label: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        width = 30
        filled = width * done // max(total, 1)
        sys.stderr.write(f"\r{label:<22} [{'#' * filled}{'.' * (width - filled)}] {done}/{total}")
        if done == total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def _throwaway_host() -> None:
    """Move this (single-threaded) process into a new netns + private mount namespace."""
    if os.geteuid() != 0:
        raise errors.Forbidden("cnm bench needs root (it makes namespaces and devices)")
    netns.enter_throwaway_host()


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _run(*argv: str, stdin: str | None = None, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(
        list(argv), input=stdin, capture_output=True, text=True, env=env, check=False
    )
    if proc.returncode != 0:
        raise errors.CNMError(f"{argv[0]} failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout


def bench_cnm(
    root: str,
    backend: str,
    n: int,
    progress: Progress,
    state_root: str | None = None,
    ebpf: str = "off",
) -> Result:
    """cnm's joins and leaves; `ebpf="on"`: with the BPF data path attached at each join
    (the other methods attach no program, so the comparable rows use "off")."""
    tag = backend if ebpf == "off" else f"{backend}-bpf"
    with NetworkController(
        state_dir=f"{state_root or root}/state-{tag}",
        run_dir=f"{root}/run-{tag}",
        fastpath=backend,
        ebpf=ebpf,
    ) as ctl:
        net = ctl.create_network("bench", driver="bridge", ipv4=[IPAMConfig(subnet=SUBNET)])
        eps = net.create_endpoints([f"e{i}" for i in range(n)])
        sbs = [ctl.create_sandbox(f"{tag}-c{i}") for i in range(n)]
        joins, leaves = [], []
        for i, (ep, sb) in enumerate(zip(eps, sbs, strict=True)):
            joins.append(_timed(lambda ep=ep, sb=sb: ep.join(sb)))
            progress(f"cnm {tag} join", i + 1, n)
        for i, (ep, sb) in enumerate(zip(eps, sbs, strict=True)):
            leaves.append(_timed(lambda ep=ep, sb=sb: ep.leave(sb)))
            progress(f"cnm {tag} leave", i + 1, n)
        pairs = list(zip(eps, sbs, strict=True))
        bulk_join = _timed(lambda: ctl.join_many(pairs))
        bulk_leave = _timed(lambda: ctl.leave_many(pairs))
        for sb in sbs:
            sb.delete()
        ctl.delete_endpoints(eps)
        net.delete()
    return Result(
        f"cnm ({backend}{', BPF data path' if ebpf == 'on' else ''})",
        n,
        _pct(joins, 0.5),
        _pct(joins, 0.99),
        _pct(leaves, 0.5),
        _pct(leaves, 0.99),
        n / bulk_join,
        n / bulk_leave,
        "leave defers the device deletion",
    )


def _namespaces(root: str, tag: str, n: int) -> list[str]:
    os.makedirs("/run/netns", exist_ok=True)
    paths = [f"/run/netns/{tag}{i}" for i in range(n)]  # named, so `ip -n` finds them
    failed = [e for e in netns.create_many(paths) if e is not None]
    if failed:
        raise errors.KernelError(failed[0].errno or 0, str(failed[0]), operation="bench")
    return paths


def _bridge(name: str) -> None:
    _run("ip", "link", "add", name, "type", "bridge")
    _run("ip", "addr", "add", f"{GATEWAY}/16", "dev", name)
    _run("ip", "link", "set", name, "up")


def _cleanup(paths: list[str], bridge: str) -> None:
    subprocess.run(["ip", "link", "del", bridge], capture_output=True, check=False)
    for p in paths:
        netns.delete(p)


def bench_cni(root: str, n: int, progress: Progress) -> Result:
    plugin_dir = next((d for d in CNI_DIRS if os.path.exists(f"{d}/bridge")), None)
    if plugin_dir is None:
        return Result("CNI bridge plugin", n, note="not installed (containernetworking-plugins)")
    paths = _namespaces(root, "cni", n)
    conf = json.dumps(
        {
            "cniVersion": "1.0.0",
            "name": "benchnet",
            "type": "bridge",
            "bridge": "cnibr0",
            "isGateway": True,
            "ipMasq": False,
            "ipam": {"type": "host-local", "subnet": SUBNET, "dataDir": f"{root}/cni-ipam"},
        }
    )

    def call(cmd: str, i: int) -> None:
        env = {
            "CNI_COMMAND": cmd,
            "CNI_CONTAINERID": f"bench{i}",
            "CNI_NETNS": paths[i],
            "CNI_IFNAME": "eth0",
            "CNI_PATH": plugin_dir,
            "PATH": os.environ.get("PATH", ""),
        }
        _run(f"{plugin_dir}/bridge", stdin=conf, env=env)

    joins, leaves = [], []
    try:
        for i in range(n):
            joins.append(_timed(lambda i=i: call("ADD", i)))
            progress("CNI bridge ADD", i + 1, n)
        for i in range(n):
            leaves.append(_timed(lambda i=i: call("DEL", i)))
            progress("CNI bridge DEL", i + 1, n)
    finally:
        _cleanup(paths, "cnibr0")
    return Result(
        "CNI bridge plugin",
        n,
        _pct(joins, 0.5),
        _pct(joins, 0.99),
        _pct(leaves, 0.5),
        _pct(leaves, 0.99),
        note="process per call",
    )


def bench_pyroute2(root: str, n: int, progress: Progress) -> Result:
    try:
        from pyroute2 import IPRoute, NetNS
    except ImportError:
        return Result("pyroute2", n, note="not installed")
    paths = _namespaces(root, "pr", n)
    _bridge("prbr0")
    ipr = IPRoute()
    br = ipr.link_lookup(ifname="prbr0")[0]
    joins, leaves = [], []

    def attach(i: int) -> None:
        fd = os.open(paths[i], os.O_RDONLY)
        try:
            ipr.link("add", ifname=f"vp{i}", kind="veth", peer={"ifname": "eth0", "net_ns_fd": fd})
        finally:
            os.close(fd)
        idx = ipr.link_lookup(ifname=f"vp{i}")[0]
        ipr.link("set", index=idx, master=br)
        ipr.link("set", index=idx, state="up")
        with NetNS(paths[i]) as ns:
            eth0 = ns.link_lookup(ifname="eth0")[0]
            ns.addr(
                "add", index=eth0, address=f"10.201.{(i + 2) >> 8}.{(i + 2) & 255}", prefixlen=16
            )
            ns.link("set", index=eth0, state="up")
            ns.route("add", dst="default", gateway=GATEWAY)

    try:
        for i in range(n):
            joins.append(_timed(lambda i=i: attach(i)))
            progress("pyroute2 attach", i + 1, n)
        for i in range(n):
            leaves.append(_timed(lambda i=i: ipr.link("del", ifname=f"vp{i}")))
            progress("pyroute2 detach", i + 1, n)
    finally:
        ipr.close()
        _cleanup(paths, "prbr0")
    return Result(
        "pyroute2 (one message at a time)",
        n,
        _pct(joins, 0.5),
        _pct(joins, 0.99),
        _pct(leaves, 0.5),
        _pct(leaves, 0.99),
    )


def bench_ip(root: str, n: int, progress: Progress) -> Result:
    if shutil.which("ip") is None:
        return Result("ip per operation", n, note="iproute2 not installed")
    paths = _namespaces(root, "ipn", n)
    _bridge("ipbr0")
    joins, leaves = [], []

    def attach(i: int) -> None:
        name = os.path.basename(paths[i])
        _run("ip", "link", "add", f"vi{i}", "type", "veth", "peer", "name", "eth0", "netns", name)
        _run("ip", "link", "set", f"vi{i}", "master", "ipbr0", "up")
        _run(
            "ip",
            "-n",
            name,
            "addr",
            "add",
            f"10.201.{(i + 2) >> 8}.{(i + 2) & 255}/16",
            "dev",
            "eth0",
        )
        _run("ip", "-n", name, "link", "set", "eth0", "up")
        _run("ip", "-n", name, "route", "add", "default", "via", GATEWAY)

    try:
        for i in range(n):
            joins.append(_timed(lambda i=i: attach(i)))
            progress("ip attach", i + 1, n)
        for i in range(n):
            leaves.append(_timed(lambda i=i: _run("ip", "link", "del", f"vi{i}")))
            progress("ip detach", i + 1, n)
    finally:
        _cleanup(paths, "ipbr0")
    return Result(
        "ip per operation",
        n,
        _pct(joins, 0.5),
        _pct(joins, 0.99),
        _pct(leaves, 0.5),
        _pct(leaves, 0.99),
        note="5 processes per attach",
    )


def _fmt(v: float | None, unit: str = "") -> str:
    return "-" if v is None else f"{v:.2f}{unit}" if v < 100 else f"{v:.0f}{unit}"


def table(results: list[Result]) -> str:
    header = (
        "method",
        "join p50",
        "join p99",
        "leave p50",
        "leave p99",
        "bulk join/s",
        "bulk leave/s",
        "note",
    )
    rows = [header] + [
        (
            r.method,
            _fmt(r.join_p50_ms, " ms"),
            _fmt(r.join_p99_ms, " ms"),
            _fmt(r.leave_p50_ms, " ms"),
            _fmt(r.leave_p99_ms, " ms"),
            _fmt(r.bulk_join_per_s),
            _fmt(r.bulk_leave_per_s),
            r.note,
        )
        for r in results
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
    )


def bench(
    containers: int, compare: list[str] | None, json_file: str | None, *, as_json: bool = False
) -> int:
    if containers < 1:
        raise errors.InvalidParameter("--containers must be at least 1")
    chosen = list(METHODS) if compare is None else compare
    unknown = [c for c in chosen if c not in METHODS]
    if unknown:
        raise errors.InvalidParameter(
            f"unknown --compare method(s) {unknown}; choose from {', '.join(METHODS)}"
        )
    _throwaway_host()
    progress = Progress(not as_json)
    results: list[Result] = []
    # Namespaces and runtime files on the throwaway host's private /run (tmpfs, as on a
    # real host); cnm's store on disk, as /var/lib/cnm is.
    with (
        tempfile.TemporaryDirectory(prefix="cnm-bench-", dir="/run") as root,
        tempfile.TemporaryDirectory(prefix="cnm-bench-state-") as state_root,
    ):
        backends = (["native"] if fastpath.native_available() else []) + ["python"]
        for backend in backends:
            results.append(bench_cnm(root, backend, containers, progress, state_root))
        if accel.available():
            results.append(
                bench_cnm(root, backends[0], containers, progress, state_root, ebpf="on")
            )
        runners = {"cni": bench_cni, "pyroute2": bench_pyroute2, "ip": bench_ip}
        for method in chosen:
            results.append(runners[method](root, containers, progress))
    doc = {
        "containers": containers,
        "kernel": os.uname().release,
        "results": [asdict(r) for r in results],
    }
    if json_file:
        with open(json_file, "w") as f:
            json.dump(doc, f, indent=2)
    print(json.dumps(doc, indent=2) if as_json else table(results))
    return 0
