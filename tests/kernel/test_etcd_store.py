"""The global store against a real etcd (started here, on loopback inside the session's
throwaway network namespace, hence `privileged`, hence tests/kernel): records,
compare-and-swap, allocation of addresses and VNIs that never collide across "hosts",
watches that resume and report a lost connection, typed errors when etcd is away; and a
controller's global scope on it (control/globalscope.py): failed creates and deletes
that leave etcd and the local mirror as they were, global allocations outside the
SQLite transaction, name claims withdrawn only by their network, an agent that stops."""

from __future__ import annotations

import ipaddress
import json
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from cnm.control import IPAMConfig, NetworkController, errors
from cnm.control.ipam.api import GATEWAY_ADDRESS_TYPE, REQUEST_ADDRESS_TYPE, PoolRequest
from cnm.control.ipam.pools import GLOBAL_DEFAULT
from cnm.control.ipam.scoped import ScopedIpam
from cnm.control.store.etcd import Compare, Delete, EtcdStore, EtcdURL, Event, Put, WatchLost
from cnm.control.store.sqlite import SQLiteStore
from cnm.control.types import new_id
from tests.store_probe import write_lock_free

pytestmark = [
    pytest.mark.privileged,
    pytest.mark.skipif(shutil.which("etcd") is None, reason="etcd-server is not installed"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Etcd:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.port = _free_port()
        self.peer = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"etcd://127.0.0.1:{self.port}/t{time.monotonic_ns()}"

    def start(self) -> None:
        client, peer = f"http://127.0.0.1:{self.port}", f"http://127.0.0.1:{self.peer}"
        self.proc = subprocess.Popen(
            [
                "etcd",
                "--name",
                "u",
                "--data-dir",
                str(self.base / "data"),
                "--listen-client-urls",
                client,
                "--advertise-client-urls",
                client,
                "--listen-peer-urls",
                peer,
                "--initial-advertise-peer-urls",
                peer,
                "--initial-cluster",
                f"u={peer}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        probe = EtcdStore(self.url, timeout=0.5)
        deadline = time.monotonic() + 20
        while True:
            try:
                probe.status()
                break
            except errors.GlobalStoreUnavailable:
                assert time.monotonic() < deadline, "etcd did not start"
                time.sleep(0.1)
        probe.close()

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc = None


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Etcd]:
    e = Etcd(Path(tmp_path_factory.mktemp("etcd")))
    e.start()
    yield e
    e.stop()


def test_url_parsing() -> None:
    u = EtcdURL.parse("etcd://a:1,b/x/y/")
    assert u.endpoints == (("a", 1), ("b", 2379)) and u.prefix == "x/y"
    assert EtcdURL.parse("etcd://h:2379").prefix == "cnm"
    for bad in ("http://h:1/x", "etcd://h:0/x", "etcd://h:99999/x", "etcd:///x"):
        with pytest.raises(errors.InvalidParameter):
            EtcdURL.parse(bad)


def test_records_and_compare_and_swap(etcd: Etcd) -> None:
    s = EtcdStore(etcd.url)
    assert s.create("a/1", {"v": 1}) is True
    assert s.create("a/1", {"v": 2}) is False  # create-if-absent
    kv = s.get("a/1")
    assert kv is not None and kv.value == {"v": 1}
    ok, _ = s.txn([Compare.unchanged("a/1", kv.mod_revision)], [Put("a/1", {"v": 3})])
    assert ok
    ok, _ = s.txn([Compare.unchanged("a/1", kv.mod_revision)], [Put("a/1", {"v": 4})])
    assert not ok  # somebody changed it since: the swap is refused
    s.put_many({"a/2": [2], "b/1": "x"})
    kvs, rev = s.range("a/")
    assert [(k.key, k.value) for k in kvs] == [("a/1", {"v": 3}), ("a/2", [2])]
    assert rev >= kvs[-1].mod_revision
    s.delete("a/", prefix=True)
    assert s.range("a/")[0] == [] and s.get("b/1") is not None
    s.close()


def test_addresses_and_pools_never_collide_across_hosts(etcd: Etcd, tmp_path: Path) -> None:
    url = etcd.url
    hosts = [
        ScopedIpam(SQLiteStore(str(tmp_path / f"h{i}")), EtcdStore(url), host=f"h{i}", routes=list)
        for i in range(3)
    ]
    pool = hosts[0].request_pool(
        PoolRequest(GLOBAL_DEFAULT, pool=ipaddress.ip_network("10.240.0.0/24"))
    )
    with pytest.raises(errors.PoolOverlap):
        hosts[1].request_pool(
            PoolRequest(GLOBAL_DEFAULT, pool=ipaddress.ip_network("10.240.0.128/25"))
        )
    # Three hosts allocate at once from the same pool: every address distinct.
    with ThreadPoolExecutor(3) as ex:
        futures = [
            ex.submit(
                lambda h=h: [h.request_address(pool.pool_id, owner=h.host) for _ in range(30)]
            )
            for h in hosts
        ]
        got = [a for f in futures for a in f.result()]
    assert len(got) == 90 and len(set(got)) == 90
    with pytest.raises(errors.AddressInUse):
        hosts[2].request_address(pool.pool_id, got[0].ip)
    hosts[1].release_address(pool.pool_id, got[0].ip)
    assert hosts[2].request_address(pool.pool_id, got[0].ip) == got[0]
    # Default pools: two hosts asking at once get different subnets.
    with ThreadPoolExecutor(2) as ex:
        pools = list(ex.map(lambda h: h.request_pool(PoolRequest(GLOBAL_DEFAULT)), hosts[:2]))
    assert pools[0].pool != pools[1].pool
    for p in (pool, *pools):
        hosts[0].release_pool(p.pool_id)
    assert hosts[0].global_pools() == {}


def test_vni_claims_never_collide(etcd: Etcd) -> None:
    from cnm.control.drivers.overlay import VNI_MIN, OverlayDriver

    drivers = [
        OverlayDriver(
            EtcdStore(etcd.url.rsplit("/", 1)[0] + "/vni"),
            None,  # type: ignore[arg-type]
            ipaddress.ip_address("127.0.0.1"),
        )
        for _ in range(2)
    ]
    with ThreadPoolExecutor(2) as ex:
        futures = [
            ex.submit(lambda d=d, i=i: [d._claim_vni(f"n{i}-{k}", None, 4789) for k in range(10)])
            for i, d in enumerate(drivers)
        ]
        vnis = [v for f in futures for v in f.result()]
    assert len(set(vnis)) == 20 and min(vnis) >= VNI_MIN
    with pytest.raises(errors.VNIInUse):
        drivers[1]._claim_vni("other", vnis[0], 4789)


def test_watch_resumes_from_a_revision_and_reports_loss(etcd: Etcd) -> None:
    s = EtcdStore(etcd.url)
    _, rev = s.range("")
    s.put("k/1", 1)  # made before the watch starts: still delivered (resume by revision)
    stop = threading.Event()
    got: list = []

    def follow() -> None:
        try:
            for batch in s.watch("k/", rev + 1, stop):
                got.extend(batch)
        except WatchLost as exc:
            got.append(exc)

    t = threading.Thread(target=follow)
    t.start()
    s.put("k/2", 2)
    s.delete("k/1")
    assert _wait(lambda: len(got) >= 3)
    assert [(e.type, e.key, e.value) for e in got[:3]] == [
        ("PUT", "k/1", 1),
        ("PUT", "k/2", 2),
        ("DELETE", "k/1", None),
    ]
    etcd.stop()
    try:
        assert _wait(lambda: isinstance(got[-1], WatchLost), 10)
        with pytest.raises(errors.GlobalStoreUnavailable):
            s.get("k/2")
    finally:
        etcd.start()
    assert s.get("k/2").value == 2  # type: ignore[union-attr]
    stop.set()
    t.join(5)
    s.close()


def test_watch_on_a_hung_etcd_is_lost_within_the_liveness_period(etcd: Etcd) -> None:
    """etcd stopped (SIGSTOP): the kernel still holds and acknowledges the connection,
    so only the liveness probe can tell. The watch ends with WatchLost saying so."""
    import signal

    with pytest.raises(errors.InvalidParameter):
        EtcdStore(etcd.url, liveness=0)
    url = etcd.url  # a fresh prefix each time it is read
    s = EtcdStore(url, liveness=1.0)
    _, rev = s.range("")
    stop = threading.Event()
    got: list = []

    def follow() -> None:
        try:
            for batch in s.watch("h/", rev + 1, stop):
                got.extend(batch)
        except WatchLost as exc:
            got.append(exc)

    # The control: the same watch without liveness to speak of (a probe an hour):
    # it must still be waiting when the probed one has given up.
    control = EtcdStore(url, liveness=3600.0)
    control_got: list = []

    def follow_control() -> None:
        try:
            for batch in control.watch("h/", rev + 1, stop):
                control_got.extend(batch)
        except WatchLost as exc:
            control_got.append(exc)

    t = threading.Thread(target=follow)
    tc = threading.Thread(target=follow_control)
    t.start()
    tc.start()
    assert etcd.proc is not None
    try:
        s.put("h/1", 1)
        assert _wait(lambda: len(got) == 1 and len(control_got) == 1), (got, control_got)
        time.sleep(2.5)  # quiet but answering: the probes keep the watch
        assert len(got) == 1
        etcd.proc.send_signal(signal.SIGSTOP)
        t0 = time.monotonic()
        assert _wait(lambda: isinstance(got[-1], WatchLost), 20)
        waited = time.monotonic() - t0
        # At most one period until the next probe, one for its timeout; the rest is a
        # generous margin for a loaded machine.
        assert waited < 2 * s.liveness + 6, waited
        assert "liveness" in str(got[-1])
        time.sleep(1.0)
        assert len(control_got) == 1  # without the probe nothing noticed
    finally:
        etcd.proc.send_signal(signal.SIGCONT)
        stop.set()
        t.join(5)
        tc.join(5)
        s.close()
        control.close()
    assert not t.is_alive() and not tc.is_alive()


def _wait(pred, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_close_ends_a_watch_at_once_and_later_calls_fail_fast(etcd: Etcd) -> None:
    s = EtcdStore(etcd.url, liveness=3600.0)
    _, rev = s.range("")
    got: list = []

    def follow() -> None:
        try:
            for batch in s.watch("c/", rev + 1, threading.Event()):
                got.extend(batch)
        except WatchLost as exc:
            got.append(exc)

    t = threading.Thread(target=follow)
    t.start()
    s.put("c/1", 1)
    assert _wait(lambda: len(got) == 1)
    s.close()
    assert _wait(lambda: len(got) == 2, 3) and isinstance(got[-1], WatchLost)
    assert "closed" in str(got[-1])
    t.join(5)
    with pytest.raises(errors.GlobalStoreUnavailable):
        s.get("c/1")


def test_value_compare_holds_only_for_the_exact_record(etcd: Etcd) -> None:
    s = EtcdStore(etcd.url)
    s.put("names/web", "id-a")
    ok, _ = s.txn([Compare.equals("names/web", "id-b")], [Delete("names/web")])
    assert not ok and s.get("names/web").value == "id-a"  # type: ignore[union-attr]
    ok, _ = s.txn([Compare.equals("names/web", "id-a")], [Delete("names/web")])
    assert ok and s.get("names/web") is None
    ok, _ = s.txn([Compare.equals("names/web", "id-a")], [Put("x", 1)])
    assert not ok  # an absent key equals nothing
    s.close()


def test_global_pools_share_the_default_ipams_range_rules(etcd: Etcd, tmp_path: Path) -> None:
    ipam = ScopedIpam(SQLiteStore(str(tmp_path / "h")), EtcdStore(etcd.url), host="h", routes=list)
    net = ipaddress.ip_network("10.241.0.0/24")
    sub = ipaddress.ip_network("10.241.0.128/30")
    res = ipam.request_pool(PoolRequest(GLOBAL_DEFAULT, pool=net, sub_pool=sub))
    assert res.pool_id == f"{GLOBAL_DEFAULT}/{net}/{sub}"
    got = [ipam.request_address(res.pool_id).ip for _ in range(4)]
    assert [str(a) for a in got] == [f"10.241.0.{i}" for i in (128, 129, 130, 131)]
    with pytest.raises(errors.PoolExhausted):
        ipam.request_address(res.pool_id)
    gw = ipam.request_address(res.pool_id, None, {REQUEST_ADDRESS_TYPE: GATEWAY_ADDRESS_TYPE})
    assert str(gw.ip) == "10.241.0.1"  # a gateway comes from the whole pool
    for bad in ("10.241.0.0", "10.241.0.255", "10.242.0.1"):
        with pytest.raises(errors.InvalidParameter):
            ipam.request_address(res.pool_id, ipaddress.ip_address(bad))
    with pytest.raises(errors.InvalidParameter):  # the same checks as the local pools
        ipam.request_pool(PoolRequest(GLOBAL_DEFAULT, pool=net, sub_pool=sub, v6=True))
    ipam.release_pool(res.pool_id)


# --- a controller's global scope ---------------------------------------------------------


@pytest.fixture
def gctl(etcd: Etcd, tmp_path: Path) -> Iterator[NetworkController]:
    with NetworkController(
        state_dir=str(tmp_path / "state"), run_dir=str(tmp_path / "run"), store=etcd.url
    ) as ctl:
        yield ctl


def _overlay(ctl: NetworkController, name: str, subnet: str):
    return ctl.create_network(name, driver="overlay", ipv4=[IPAMConfig(subnet=subnet)])


def test_failed_create_leaves_nothing_even_if_its_publication_is_mirrored_meanwhile(
    gctl: NetworkController, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The race behind a NameInUse on a fresh clone: the agent hears of the network's
    publication while the create is still going and waits for the controller's lock;
    the create fails and withdraws it; the agent must not mirror it back then."""
    scope = gctl.global_scope
    agents: list[threading.Thread] = []

    def refuse(info: object) -> None:
        net_id = info.id  # type: ignore[attr-defined]
        kv = scope.etcd.get(f"networks/{net_id}")
        assert kv is not None  # published before the driver was asked
        event = Event("PUT", kv.key, kv.value, kv.mod_revision)
        agents.append(threading.Thread(target=scope.apply, args=([event],)))
        agents[-1].start()
        time.sleep(0.3)  # the "agent" is now waiting for the controller's lock
        raise errors.Unsupported("refused by the test")

    monkeypatch.setattr(scope.driver, "create_network", refuse)
    for _ in range(3):
        with pytest.raises(errors.Unsupported):
            _overlay(gctl, "v6", "10.233.0.0/24")
        agents[-1].join(10)
        assert gctl.store.network_by_name("v6") is None
        assert scope.etcd.get("names/v6") is None
    monkeypatch.undo()
    net = _overlay(gctl, "v6", "10.233.0.0/24")  # neither NameInUse nor PoolOverlap
    net.delete()


def test_a_stale_read_does_not_remove_a_published_network(gctl: NetworkController) -> None:
    """A resync's read, or a DELETE event, older than a publication made since (a
    network created here meanwhile, a delete rolled back): the mirror stays."""
    scope = gctl.global_scope
    net = _overlay(gctl, "kept", "10.243.0.0/24")
    with gctl.state_lock:
        scope._mirror_remove(net.id)
    assert gctl.store.network_by_id(net.id) is not None
    net.delete()


def test_global_allocations_are_made_outside_the_store_transaction(
    gctl: NetworkController, monkeypatch: pytest.MonkeyPatch
) -> None:
    scope = gctl.global_scope
    ipam = scope.ipam
    calls: list[tuple[str, str, int]] = []
    main = threading.current_thread()
    names = ("request_pool", "request_address", "release_pool", "release_address")
    ipam_calls = {n: getattr(ipam, n) for n in names}
    for name in names:

        def spy(*args: object, _real=ipam_calls[name], _name=name, **kw: object):
            if threading.current_thread() is main:
                ref = args[0].address_space if _name == "request_pool" else args[0]
                calls.append((_name, str(ref), gctl.store._depth))
            return _real(*args, **kw)

        monkeypatch.setattr(ipam, name, spy)
    net = _overlay(gctl, "g1", "10.234.0.0/24")
    eps = net.create_endpoints(["a", "b"])
    gctl.delete_endpoints(eps)
    net.delete()
    assert {c[0] for c in calls} == {
        "request_pool",
        "request_address",
        "release_pool",
        "release_address",
    }
    assert [c for c in calls if c[2]] == []  # never inside BEGIN IMMEDIATE
    # The local pools of the same IPAM stay inside the transaction.
    calls.clear()
    local = gctl.create_network("l1", driver="null", ipv4=[IPAMConfig(subnet="10.235.0.0/24")])
    ep = local.create_endpoint("a")
    ep.delete()
    local.delete()
    assert calls and all(depth > 0 for *_, depth in calls), calls


def test_global_allocations_are_given_back_when_the_store_write_fails(
    gctl: NetworkController, monkeypatch: pytest.MonkeyPatch
) -> None:
    scope = gctl.global_scope

    def broken(*args: object) -> None:
        raise errors.StoreError("disk full (test)")

    net = _overlay(gctl, "g2", "10.236.0.0/24")
    [pool] = net.record.ipv4
    before = scope.ipam.global_allocated(pool.pool_id)
    monkeypatch.setattr(gctl.store, "put_endpoints", broken)
    with pytest.raises(errors.StoreError):
        net.create_endpoints(["a", "b"])
    monkeypatch.undo()
    assert scope.ipam.global_allocated(pool.pool_id) == before  # the gateway alone
    monkeypatch.setattr(gctl.store, "put_network", broken)
    with pytest.raises(errors.StoreError):
        _overlay(gctl, "g3", "10.237.0.0/24")
    monkeypatch.undo()
    assert [p["subnet"] for p in scope.ipam.global_pools().values()] == ["10.236.0.0/24"]
    net.delete()
    assert scope.ipam.global_pools() == {}


def test_withdrawal_takes_a_name_only_from_its_own_network(
    gctl: NetworkController, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dataclasses import replace

    scope = gctl.global_scope
    net = _overlay(gctl, "n3", "10.238.0.0/24")
    stale = replace(net.record, id=new_id())  # a stale mirror of an older "n3"
    scope.withdraw_network(stale, check=False)
    assert scope.etcd.get("names/n3").value == net.id  # type: ignore[union-attr]
    assert scope.etcd.get(f"networks/{net.id}") is not None
    assert stale.id in scope._withdrawn

    def away(*args: object, **kw: object) -> None:
        raise errors.GlobalStoreUnavailable("etcd away (test)")

    monkeypatch.setattr(scope.etcd, "txn", away)
    with pytest.raises(errors.GlobalStoreUnavailable):
        scope.withdraw_network(net.record)
    assert net.id not in scope._withdrawn  # only a withdrawal that happened counts
    monkeypatch.undo()
    net.delete()
    assert scope.etcd.get("names/n3") is None and net.id in scope._withdrawn


def test_a_failed_driver_delete_republishes_the_network(
    gctl: NetworkController, monkeypatch: pytest.MonkeyPatch
) -> None:
    scope = gctl.global_scope
    net = _overlay(gctl, "n4", "10.239.0.0/24")
    published = json.dumps(scope.etcd.get(f"networks/{net.id}").value)  # type: ignore[union-attr]

    def refuse(network_id: str) -> None:
        raise errors.DriverError("overlay", "delete refused (test)")

    monkeypatch.setattr(scope.driver, "delete_network", refuse)
    with pytest.raises(errors.DriverError):
        net.delete()
    assert gctl.store.network_by_id(net.id).state == "ready"  # type: ignore[union-attr]
    assert scope.etcd.get("names/n4").value == net.id  # type: ignore[union-attr]
    assert json.dumps(scope.etcd.get(f"networks/{net.id}").value) == published  # type: ignore[union-attr]
    assert net.id not in scope._withdrawn

    # If it cannot be put back (the name was taken meanwhile), the delete stays an
    # intent ("deleting") that reconcile completes.
    def taken(rec: object) -> None:
        raise errors.NameInUse("network", "n4")

    monkeypatch.setattr(scope, "publish_network", taken)
    with pytest.raises(errors.DriverError) as exc:
        net.delete()
    assert "reconcile" in "\n".join(getattr(exc.value, "__notes__", []))
    assert gctl.store.network_by_id(net.id).state == "deleting"  # type: ignore[union-attr]
    assert scope.etcd.get("names/n4") is None
    monkeypatch.undo()
    report = gctl.reconcile()
    assert "network_delete_completed" in [r.kind for r in report.repairs]
    assert gctl.store.network_by_id(net.id) is None
    assert scope.ipam.global_pools() == {}


def test_close_stops_the_agent_before_the_stores_close(
    etcd: Etcd, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The agent is in the middle of a slow etcd call when the controller closes: close
    waits for it, and it touches neither store afterwards."""
    ctl = NetworkController(
        state_dir=str(tmp_path / "state"), run_dir=str(tmp_path / "run"), store=etcd.url
    )
    scope = ctl.global_scope
    entered = threading.Event()
    real_range = scope.etcd.range

    def slow(prefix: str):
        if threading.current_thread() is scope._thread and not entered.is_set():
            entered.set()
            time.sleep(1.5)
        return real_range(prefix)

    monkeypatch.setattr(scope.etcd, "range", slow)
    touched: list[str] = []
    names = ("networks", "endpoints", "network_by_id", "put_network", "delete_network")
    store_calls = {n: getattr(ctl.store, n) for n in names}
    for name in names:

        def spy(*args: object, _real=store_calls[name], _name=name, **kw: object):
            if threading.current_thread() is scope._thread and scope._stop.is_set():
                touched.append(_name)
            return _real(*args, **kw)

        monkeypatch.setattr(ctl.store, name, spy)
    scope._dirty.set()  # the agent resynchronises within half a second
    assert entered.wait(10)
    t0 = time.monotonic()
    ctl.close()
    took = time.monotonic() - t0
    assert not scope._thread.is_alive()
    assert touched == []
    assert took < 1.5 + 5, took
    assert scope.etcd.closed


# --- reconcile and the global scope ----------------------------------------------------


def _left_deleting(ctl: NetworkController, net_id: str, ep_id: str | None = None) -> None:
    """The intents a crash mid-delete leaves in the store (the network's, an endpoint's)."""
    from dataclasses import replace

    if ep_id is not None:
        ep = ctl.store.endpoint_by_id(ep_id)
        assert ep is not None
        ctl.store.put_endpoint(replace(ep, state="deleting"))
    ctl.store.set_network_state(net_id, "deleting")


def test_reconcile_gives_global_pools_back_outside_the_store_transaction(
    gctl: NetworkController, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each etcd call of reconcile's repairs (withdrawal, addresses, pools) hangs until
    the test has checked that another connection can take the store's write lock."""
    import queue

    scope = gctl.global_scope
    assert scope is not None
    net = _overlay(gctl, "r1", "10.244.0.0/24")
    [ep] = net.create_endpoints(["a"])
    [pool] = net.record.ipv4
    _left_deleting(gctl, net.id, ep.id)
    hung: queue.Queue[tuple[str, threading.Event]] = queue.Queue()
    main = threading.current_thread()
    targets = {
        "release_address": scope.ipam,
        "release_pool": scope.ipam,
        "withdraw_network": scope,
    }
    reals = {name: getattr(obj, name) for name, obj in targets.items()}
    for name, obj in targets.items():

        def hang(*args: object, _real=reals[name], _name=name, **kw: object):
            if threading.current_thread() is not main:
                go = threading.Event()
                hung.put((_name, go))
                assert go.wait(10)
            return _real(*args, **kw)

        monkeypatch.setattr(obj, name, hang)
    seen: list[tuple[str, bool]] = []
    with ThreadPoolExecutor(1) as pool_:
        fut = pool_.submit(gctl.reconcile)
        while not fut.done() or not hung.empty():
            try:
                name, go = hung.get(timeout=0.1)
            except Exception:
                continue
            seen.append((name, write_lock_free(gctl.state_dir)))
            go.set()
        report = fut.result()
    monkeypatch.undo()
    assert report.errors == []
    kinds = [r.kind for r in report.repairs]
    assert "endpoint_delete_completed" in kinds and "network_delete_completed" in kinds
    # The endpoint's address, then the network's withdrawal, its gateway and its pool.
    assert [n for n, _ in seen] == [
        "release_address",
        "withdraw_network",
        "release_address",
        "release_pool",
    ]
    assert all(free for _, free in seen), seen  # none held BEGIN IMMEDIATE
    assert gctl.store.network_by_id(net.id) is None
    assert gctl.store.endpoint_by_id(ep.id) is None
    assert pool.pool_id not in scope.ipam.global_pools()
    assert scope.etcd.get("names/r1") is None and scope.etcd.get(f"networks/{net.id}") is None


def test_reconcile_keeps_a_global_delete_while_etcd_is_away(
    gctl: NetworkController, monkeypatch: pytest.MonkeyPatch
) -> None:
    """etcd cannot take the withdrawal: the error is reported and the network stays
    'deleting' with its records and pools; the next reconcile completes it."""
    scope = gctl.global_scope
    assert scope is not None
    net = _overlay(gctl, "r2", "10.245.0.0/24")
    [pool] = net.record.ipv4
    _left_deleting(gctl, net.id)

    def away(*args: object, **kw: object) -> None:
        raise errors.GlobalStoreUnavailable("etcd away (test)")

    monkeypatch.setattr(scope.etcd, "txn", away)
    report = gctl.reconcile()
    monkeypatch.undo()
    assert "network_delete_completed" not in [r.kind for r in report.repairs]
    assert any("withdraw network r2" in e and "deleting" in e for e in report.errors)
    assert gctl.store.network_by_id(net.id).state == "deleting"  # type: ignore[union-attr]
    assert scope.etcd.get("names/r2").value == net.id  # type: ignore[union-attr]
    assert pool.pool_id in scope.ipam.global_pools()
    report = gctl.reconcile()
    assert report.errors == []
    assert "network_delete_completed" in [r.kind for r in report.repairs]
    assert gctl.store.network_by_id(net.id) is None
    assert scope.etcd.get("names/r2") is None and scope.etcd.get(f"networks/{net.id}") is None
    assert pool.pool_id not in scope.ipam.global_pools()
    _overlay(gctl, "r2", "10.245.0.0/24").delete()  # name and subnet are free again


def test_reconcile_keeps_a_global_delete_while_another_host_has_endpoints(
    gctl: NetworkController, tmp_path: Path
) -> None:
    """The crashed delete cannot be finished while another host's endpoint holds an
    address of the network's pools: reported, left 'deleting' for a later reconcile."""
    net = _overlay(gctl, "r3", "10.246.0.0/24")
    _left_deleting(gctl, net.id)
    scope = gctl.global_scope
    assert scope is not None
    [pool] = net.record.ipv4
    other = ScopedIpam(SQLiteStore(str(tmp_path / "other")), scope.etcd, host="h2", routes=list)
    addr = other.request_address(pool.pool_id, owner="an-endpoint-elsewhere").ip
    report = gctl.reconcile()
    assert "network_delete_completed" not in [r.kind for r in report.repairs]
    assert any("ActiveEndpoints" in e or "endpoints" in e for e in report.errors), report.errors
    assert gctl.store.network_by_id(net.id).state == "deleting"  # type: ignore[union-attr]
    assert scope.etcd.get("names/r3").value == net.id  # type: ignore[union-attr]
    other.release_address(pool.pool_id, addr)
    report = gctl.reconcile()
    assert report.errors == [] and "network_delete_completed" in [r.kind for r in report.repairs]
    assert scope.etcd.get("names/r3") is None and pool.pool_id not in scope.ipam.global_pools()
