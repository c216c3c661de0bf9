"""`cnm demo`: the CNM lifecycle end to end on this host, then everything removed.

A bridge network, N containers (real sandboxes: network namespaces) joined to it, half
one at a time and half with one join_many; a real ping (ICMP from inside the sandboxes)
between every pair; a short timing table; then every endpoint, sandbox, device and the
network removed, with a check that nothing is left.
"""

from __future__ import annotations

import json
import os
import secrets
import statistics
import sys
import time
from typing import Any

from . import errors
from .controller import NetworkController
from .osl.ping import ping
from .types import new_id


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms"


def _links(ctl: NetworkController, key: str) -> str:
    """The sandbox's links, read from inside it."""
    from cnm.fastpath import netns

    return ",".join(ctl.namespaces.run_in(key, netns.link_names))


def demo(
    state_dir: str, run_dir: str, fastpath: str, containers: int, *, as_json: bool = False
) -> int:
    if containers < 1:
        raise errors.InvalidParameter("--containers must be at least 1")
    say = (lambda *a: None) if as_json else print
    tag = secrets.token_hex(3)
    with NetworkController(state_dir=state_dir, run_dir=run_dir, fastpath=fastpath) as ctl:
        say(
            f"cnm demo: {containers} containers on a bridge network "
            f"(fast path: {ctl.fastpath}, eBPF data path: {ctl.ebpf}, store: {ctl.store.path})"
        )
        net = ctl.create_network(f"cnm-demo-{tag}", driver="bridge")
        ids = [f"demo-{tag}-{i}-{new_id()[:8]}" for i in range(containers)]
        keys: list[str] = []  # filled by _run, checked by _cleanup
        try:
            result = _run(ctl, net, ids, keys, say)
        finally:
            leftovers = _cleanup(ctl, net, ids, keys)
        if leftovers:
            raise errors.CNMError(f"demo left objects behind: {leftovers}")
        say("removed: every endpoint, sandbox and namespace, and the network")
        if as_json:
            print(json.dumps(result, indent=2, sort_keys=True))
    return 0


def _run(
    ctl: NetworkController, net: Any, ids: list[str], keys: list[str], say: Any
) -> dict[str, Any]:
    containers = len(ids)
    say(f"network {net.name}  id {net.id[:12]}  subnet {', '.join(map(str, net.subnets))}")
    eps = net.create_endpoints([f"ep{i}" for i in range(containers)])
    singles = max(1, containers // 2)
    join_times = []
    for ep, cid in zip(eps[:singles], ids[:singles], strict=True):
        t0 = time.perf_counter()
        keys.append(ep.join(cid))
        join_times.append(time.perf_counter() - t0)
    rest = list(zip(eps[singles:], ids[singles:], strict=True))
    t0 = time.perf_counter()
    keys += ctl.join_many(rest)
    bulk = time.perf_counter() - t0

    rows = []
    for ep, cid, key in zip(eps, ids, keys, strict=True):
        rows.append((cid, ep.name, str(ep.ipv4_address), ep.mac_address, key, _links(ctl, key)))
    widths = [max(len(r[i]) for r in rows) for i in range(6)]
    header = ("CONTAINER", "ENDPOINT", "IPV4", "MAC", "SANDBOX KEY", "LINKS")
    widths = [max(w, len(h)) for w, h in zip(widths, header, strict=True)]
    for r in (header, *rows):
        say("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())

    # A real ping between every pair, from inside the sandboxes.
    rtts = []
    for i, key in enumerate(keys):
        for j, ep in enumerate(eps):
            if i != j:
                assert ep.ipv4_address is not None
                rtts.append(ping(key, ep.ipv4_address.ip, timeout=2.0))
    say("")
    say(
        f"ping: {len(rtts)} of {len(rtts)} pairs answered "
        f"(round trip median {_ms(statistics.median(rtts)) if rtts else '-'})"
    )

    t0 = time.perf_counter()
    ctl.leave_many(list(zip(eps, ids, strict=True)))
    leave = time.perf_counter() - t0
    timings = {
        "join_p50_ms": statistics.median(join_times) * 1000,
        "join_max_ms": max(join_times) * 1000,
        "bulk_join_containers": len(rest),
        "bulk_join_total_ms": bulk * 1000,
        "leave_total_ms": leave * 1000,
        "leave_containers": containers,
        "pings": len(rtts),
        "ping_median_ms": statistics.median(rtts) * 1000 if rtts else None,
    }
    table = [(f"join, one at a time (p50 of {singles})", _ms(statistics.median(join_times)))]
    if rest:
        table.append(
            (
                f"join_many of {len(rest)}, total / per container",
                f"{_ms(bulk)} / {_ms(bulk / len(rest))}",
            )
        )
    table.append((f"leave_many of {containers}, total", _ms(leave)))
    width = max(len(k) for k, _ in table)
    say("")
    for k, v in [("timing", "value"), *table]:
        say(f"{k.ljust(width)}  {v}")
    return {
        "network": net.id,
        "containers": containers,
        "timings": timings,
        "sandboxes": [
            dict(zip(("container", "endpoint", "ipv4", "mac", "key", "links"), r, strict=True))
            for r in rows
        ],
    }


def _cleanup(ctl: NetworkController, net: Any, ids: list[str], keys: list[str]) -> list[str]:
    """Remove everything the demo made, then list whatever is still there."""
    try:
        eps = net.endpoints()
        if eps:
            ctl.delete_endpoints(eps, force=True)
        net.delete()
    except Exception as exc:  # report, then let the leftover check say what remains
        print(f"cnm demo: cleanup: {exc}", file=sys.stderr)
    left = [f"network {n.name}" for n in ctl.networks() if n.id == net.id]
    wanted = set(ids)
    for sb in ctl.sandboxes():
        if sb.container_id in wanted:
            left.append(f"sandbox {sb.container_id}")
    left += [f"namespace {k}" for k in keys if os.path.exists(k)]
    return left
