"""Several processes on one state_dir at once: SQLite's write lock serialises them.

Each worker is a fresh interpreter (multiprocessing's "spawn" context) with its own
NetworkController on the shared state_dir; a barrier lines them up so they really race.
"""

from __future__ import annotations

import ipaddress
import multiprocessing
import queue
from collections.abc import Callable
from typing import Any

import pytest

from cnm.control import IPAMConfig, NetworkController, errors
from cnm.control.ipam.pools import ula_pool

NPROC = 4
PER_PROC = 50
TIMEOUT = 60.0

_ctx = multiprocessing.get_context("spawn")


# --- workers (module level, so that "spawn" children can import them) -------------------


def _endpoint_worker(state_dir: str, run_dir: str, idx: int, barrier: Any) -> list[Any]:
    """PER_PROC endpoints: singles and batches interleaved."""
    with NetworkController(state_dir=state_dir, run_dir=run_dir) as ctl:
        net = ctl.network("shared")
        barrier.wait(TIMEOUT)
        made = []
        n = 0
        round_ = 0
        while n < PER_PROC:
            if round_ % 2 == 0:
                made.append(net.create_endpoint(f"p{idx}-e{n}"))
                n += 1
            else:
                size = min(7, PER_PROC - n)
                made += net.create_endpoints([f"p{idx}-e{n + k}" for k in range(size)])
                n += size
            round_ += 1
        return [(e.id, e.name, str(e.ipv4_address), e.mac_address) for e in made]


def _network_worker(state_dir: str, run_dir: str, idx: int, barrier: Any, name: str) -> Any:
    with NetworkController(state_dir=state_dir, run_dir=run_dir) as ctl:
        barrier.wait(TIMEOUT)
        net = ctl.create_network(name, driver="null")
        return (net.id, [str(s) for s in net.subnets])


def _named_network_worker(
    state_dir: str, run_dir: str, idx: int, barrier: Any, names: list[str]
) -> Any:
    return _network_worker(state_dir, run_dir, idx, barrier, names[idx])


def _static_worker(state_dir: str, run_dir: str, idx: int, barrier: Any, address: str) -> Any:
    with NetworkController(state_dir=state_dir, run_dir=run_dir) as ctl:
        net = ctl.network("shared")
        barrier.wait(TIMEOUT)
        ep = net.create_endpoint(f"static-{idx}", ipv4_address=address)
        return (ep.id, str(ep.ipv4_address))


def _first_open(state_dir: str, idx: int) -> str:
    """Open a brand-new state_dir and take a default IPv6 pool; returns its subnet."""
    with NetworkController(state_dir=state_dir, run_dir=state_dir + "-run") as ctl:
        net = ctl.create_network(f"first-{idx}", driver="null", enable_ipv6=True)
        return net.record.ipv6[0].subnet


def _round_worker(idx: int, barrier: Any, tasks: Any, results: Any) -> None:
    """A long-lived worker: one fresh state_dir per round, opened at the barrier."""
    while (state_dir := tasks.get()) is not None:
        barrier.wait(TIMEOUT)
        try:
            results.put((state_dir, idx, "ok", _first_open(state_dir, idx)))
        except errors.CNMError as exc:
            results.put((state_dir, idx, "error", (type(exc).__name__, str(exc))))
        except BaseException as exc:
            results.put((state_dir, idx, "crash", f"{type(exc).__name__}: {exc}"))


def _run(results: Any, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
    idx = args[2]
    try:
        results.put((idx, "ok", fn(*args)))
    except errors.CNMError as exc:
        results.put((idx, "error", (type(exc).__name__, str(exc))))
    except BaseException as exc:
        results.put((idx, "crash", f"{type(exc).__name__}: {exc}"))


def _race(fn: Callable[..., Any], dirs: tuple[str, str], *extra: Any) -> dict[int, tuple]:
    """Run fn in NPROC spawned processes at once; {index: (status, value)}."""
    barrier = _ctx.Barrier(NPROC)
    results = _ctx.Queue()
    procs = [
        _ctx.Process(target=_run, args=(results, fn, (dirs[0], dirs[1], i, barrier, *extra)))
        for i in range(NPROC)
    ]
    for p in procs:
        p.start()
    out: dict[int, tuple] = {}
    try:
        for _ in procs:
            idx, status, value = results.get(timeout=TIMEOUT)
            out[idx] = (status, value)
    except queue.Empty:
        pytest.fail(f"workers did not finish in {TIMEOUT}s; got {sorted(out)}")
    finally:
        for p in procs:
            p.join(TIMEOUT)
            if p.is_alive():
                p.kill()
                p.join()
    crashes = {i: v for i, (s, v) in out.items() if s == "crash"}
    assert not crashes, crashes
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    return out


def _clean(report: dict[str, object]) -> bool:
    """A reconcile report with nothing in it: no repairs, no errors (extra keys empty too)."""
    return report.get("repairs") == [] and report.get("errors") == [] and not any(report.values())


@pytest.fixture
def shared(dirs: tuple[str, str]) -> tuple[str, str]:
    with NetworkController(state_dir=dirs[0], run_dir=dirs[1]) as ctl:
        ctl.create_network("shared", driver="null", ipv4=[IPAMConfig(subnet="10.30.0.0/23")])
    return dirs


def test_concurrent_endpoint_creation_hands_out_distinct_addresses(
    shared: tuple[str, str],
) -> None:
    out = _race(_endpoint_worker, shared)
    errs = {i: v for i, (s, v) in out.items() if s != "ok"}
    assert not errs, errs
    made = [ep for _, eps in out.values() for ep in eps]
    assert len(made) == NPROC * PER_PROC
    ids = [m[0] for m in made]
    names = [m[1] for m in made]
    addrs = [m[2] for m in made]
    macs = [m[3] for m in made]
    assert len(set(ids)) == len(ids)
    assert len(set(names)) == len(names)
    assert len(set(addrs)) == len(addrs), "an address was handed out twice"
    assert len(set(macs)) == len(macs)
    subnet = ipaddress.ip_network("10.30.0.0/23")
    for a in addrs:
        iface = ipaddress.ip_interface(a)
        assert iface.network == subnet and iface.ip != ipaddress.ip_address("10.30.0.1")

    with NetworkController(state_dir=shared[0], run_dir=shared[1]) as ctl:
        net = ctl.network("shared")
        stored = net.endpoints()
        assert len(stored) == NPROC * PER_PROC
        assert {(e.id, e.name, str(e.ipv4_address), e.mac_address) for e in stored} == set(made)
        assert all(e.record.state == "ready" for e in stored)
        ipam = ctl.ipam_driver("default")
        allocated = ipam.allocated(net.record.ipv4[0].pool_id)  # type: ignore[attr-defined]
        kinds = [k for _, k, _ in allocated]
        assert kinds.count("gateway") == 1
        assert kinds.count("endpoint") == NPROC * PER_PROC
        by_owner = {owner: str(ip) for ip, k, owner in allocated if k == "endpoint"}
        assert by_owner == {e.id: str(e.ipv4_address.ip) for e in stored}  # type: ignore[union-attr]
        # Serial allocation: the 200 addresses are exactly the first 200 after the gateway.
        first = [str(subnet.network_address + 2 + i) for i in range(NPROC * PER_PROC)]
        assert sorted(by_owner.values(), key=ipaddress.ip_address) == first
        report = ctl.reconcile().to_dict()
        assert _clean(report), report


def test_racing_for_one_network_name_has_exactly_one_winner(dirs: tuple[str, str]) -> None:
    NetworkController(state_dir=dirs[0], run_dir=dirs[1]).close()
    out = _race(_network_worker, dirs, "contested")
    winners = [v for s, v in out.values() if s == "ok"]
    losers = [v for s, v in out.values() if s == "error"]
    assert len(winners) == 1, out
    assert len(losers) == NPROC - 1
    assert all(name == "NameInUse" for name, _ in losers), losers
    with NetworkController(state_dir=dirs[0], run_dir=dirs[1]) as ctl:
        nets = ctl.networks()
        assert [(n.id, [str(s) for s in n.subnets]) for n in nets] == winners
        assert nets[0].record.state == "ready"
        # The losers took no pool with them into the store.
        assert ctl.ipam_driver("default").pools() == [  # type: ignore[attr-defined]
            nets[0].record.ipv4[0].pool_id
        ]


def test_racing_for_default_pools_gives_disjoint_subnets(dirs: tuple[str, str]) -> None:
    NetworkController(state_dir=dirs[0], run_dir=dirs[1]).close()
    # Each worker gets its own name (by index), so every create must succeed.
    out = _race(_named_network_worker, dirs, [f"net{i}" for i in range(NPROC)])
    assert all(s == "ok" for s, _ in out.values()), out
    subnets = [ipaddress.ip_network(v[1][0]) for _, v in out.values()]
    for i, a in enumerate(subnets):
        for b in subnets[i + 1 :]:
            assert not a.overlaps(b), (a, b)  # type: ignore[arg-type]


def test_racing_for_one_static_address_has_exactly_one_winner(shared: tuple[str, str]) -> None:
    out = _race(_static_worker, shared, "10.30.0.100")
    winners = [v for s, v in out.values() if s == "ok"]
    losers = [v for s, v in out.values() if s == "error"]
    assert len(winners) == 1, out
    assert winners[0][1] == "10.30.0.100/23"
    assert len(losers) == NPROC - 1
    assert all(name == "AddressInUse" for name, _ in losers), losers
    with NetworkController(state_dir=shared[0], run_dir=shared[1]) as ctl:
        eps = ctl.network("shared").endpoints()
        assert [(e.id, str(e.ipv4_address)) for e in eps] == winners
        net = ctl.network("shared")
        ipam = ctl.ipam_driver("default")
        allocated = ipam.allocated(net.record.ipv4[0].pool_id)  # type: ignore[attr-defined]
        assert sorted(k for _, k, _ in allocated) == ["endpoint", "gateway"]


ROUNDS = 40


@pytest.fixture(scope="module")
def first_opens(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[tuple]]:
    """ROUNDS times: NPROC processes open one brand-new state_dir at the same instant.

    Nobody pre-creates the store, so they race to create the file, switch it to WAL,
    migrate it and seed the IPAM. {state_dir: [(index, status, value), ...]}
    """
    base = tmp_path_factory.mktemp("first-open")
    barrier = _ctx.Barrier(NPROC)
    results = _ctx.Queue()
    tasks = [_ctx.Queue() for _ in range(NPROC)]
    procs = [
        _ctx.Process(target=_round_worker, args=(i, barrier, tasks[i], results))
        for i in range(NPROC)
    ]
    for p in procs:
        p.start()
    out: dict[str, list[tuple]] = {}
    try:
        for r in range(ROUNDS):
            state_dir = str(base / f"round{r}")
            for q in tasks:
                q.put(state_dir)
            for _ in range(NPROC):
                got_dir, idx, status, value = results.get(timeout=TIMEOUT)
                out.setdefault(got_dir, []).append((idx, status, value))
    except queue.Empty:
        pytest.fail(f"workers did not finish a round in {TIMEOUT}s")
    finally:
        for q in tasks:
            q.put(None)
        for p in procs:
            p.join(TIMEOUT)
            if p.is_alive():
                p.kill()
                p.join()
    crashes = [v for rows in out.values() for _, s, v in rows if s == "crash"]
    assert not crashes, crashes
    return out


def test_concurrent_first_open_never_fails(first_opens: dict[str, list[tuple]]) -> None:
    """Opening a store that another process is creating must wait, not fail."""
    failed = [v for rows in first_opens.values() for _, s, v in rows if s != "ok"]
    total = ROUNDS * NPROC
    assert not failed, f"{len(failed)} of {total} concurrent opens failed, e.g. {failed[0]}"
    for state_dir in first_opens:
        with NetworkController(state_dir=state_dir, run_dir=state_dir + "-run") as ctl:
            assert ctl.store.schema_version > 0
            assert ctl.store.fetchone("PRAGMA journal_mode") == ("wal",)
            names = sorted(n.name for n in ctl.networks())
            ok = sorted(f"first-{i}" for i, s, _ in first_opens[state_dir] if s == "ok")
            assert names == ok


def test_concurrent_first_open_agrees_on_the_ula_prefix(
    first_opens: dict[str, list[tuple]],
) -> None:
    """Every process takes its IPv6 default pools from the one persisted ULA /48."""
    stray = []
    for state_dir, rows in first_opens.items():
        with NetworkController(state_dir=state_dir, run_dir=state_dir + "-run") as ctl:
            seed = ctl.store.meta("ula_seed")
        if seed is None:  # every opener failed (the other test reports that)
            continue
        ula = ipaddress.ip_network(ula_pool(seed).base)
        subnets = [ipaddress.ip_network(v) for _, s, v in rows if s == "ok"]
        assert len(set(subnets)) == len(subnets)
        stray += [
            f"{state_dir}: {sn} not in {ula}"
            for sn in subnets
            if not sn.subnet_of(ula)  # type: ignore[arg-type]
        ]
    assert not stray, f"{len(stray)} IPv6 pools outside the persisted ULA prefix: {stray[:3]}"
