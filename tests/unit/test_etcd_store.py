"""The global store against a real etcd (started here, on loopback inside the session's
throwaway network namespace, hence `privileged`): records, compare-and-swap, allocation
of addresses and VNIs that never collide across "hosts", watches that resume and report
a lost connection, typed errors when etcd is away."""

from __future__ import annotations

import ipaddress
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from cnm.control import errors
from cnm.control.ipam.api import PoolRequest
from cnm.control.ipam.pools import GLOBAL_DEFAULT
from cnm.control.ipam.scoped import ScopedIpam
from cnm.control.store.etcd import Compare, EtcdStore, EtcdURL, Put, WatchLost
from cnm.control.store.sqlite import SQLiteStore

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
    s = EtcdStore(etcd.url, liveness=1.0)
    _, rev = s.range("")
    stop = threading.Event()
    got: list = []

    def follow() -> None:
        try:
            for batch in s.watch("h/", rev + 1, stop):
                got.extend(batch)
        except WatchLost as exc:
            got.append(exc)

    t = threading.Thread(target=follow)
    t.start()
    assert etcd.proc is not None
    try:
        s.put("h/1", 1)
        assert _wait(lambda: len(got) == 1)
        time.sleep(2.5)  # quiet but answering: the probes keep the watch
        assert len(got) == 1
        etcd.proc.send_signal(signal.SIGSTOP)
        t0 = time.monotonic()
        assert _wait(lambda: isinstance(got[-1], WatchLost), 10)
        assert time.monotonic() - t0 < 4
        assert "liveness" in str(got[-1])
    finally:
        etcd.proc.send_signal(signal.SIGCONT)
        stop.set()
        t.join(5)
        s.close()
    assert not t.is_alive()


def _wait(pred, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True
