"""Overlay networks across hosts (issue 6): VXLAN between host namespaces, etcd as the
global store, one controller process per host (tests/e2e/overlay_rig.py).

Independent oracles: `ping` from inside the sandboxes, `bridge fdb` / `ip neigh` / `ip -d
link` inside each network's namespace, etcd itself.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.overlay_rig import RemoteError, Rig, etcd_available, wait_for
from tests.kernel.oracles import ns_fdb, ns_link_details, ns_links, ns_neighbours, ns_ping

pytestmark = [
    pytest.mark.privileged,
    pytest.mark.skipif(not etcd_available(), reason="etcd-server is not installed"),
]


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    r = Rig(
        Path(tmp_path_factory.mktemp("overlay")),
        hosts=3,
        env={"CNM_OVERLAY_REPAIR_INTERVAL": "1", "CNM_ETCD_LIVENESS": "1"},
    )
    try:
        yield r.start()
    finally:
        r.close()


def _net(rig: Rig, **kw: object) -> str:
    return rig.new_network("ov", **kw)


def _join(rig: Rig, i: int, net: str, ep: str) -> tuple[str, dict]:
    return rig.join(i, net, ep)


def _fdb(rig: Rig, i: int, net: str) -> set[tuple[str, str]]:
    key = rig.host(i).call("overlay_key", name=net)
    return {(e["mac"], e["dst"]) for e in ns_fdb(key, "vxlan0") if "dst" in e}


def _neigh(rig: Rig, i: int, net: str) -> set[tuple[str, str]]:
    key = rig.host(i).call("overlay_key", name=net)
    return {
        (e["dst"], e.get("lladdr", ""))
        for e in ns_neighbours(key, "vxlan0")
        if "PERMANENT" in e.get("state", [])
    }


def test_three_hosts_ping_each_other_across_vxlan(rig: Rig) -> None:
    net = _net(rig)
    for i in (2, 3):  # made on host 1, visible everywhere
        seen = rig.host(i).call("network", name=net)
        assert seen["driver"] == "overlay" and seen["scope"] == "global"
    joined = {i: _join(rig, i, net, f"{net}-e{i}") for i in (1, 2, 3)}
    ips = {info["ip"] for _, info in joined.values()}
    assert len(ips) == 3  # one allocator for every host
    for i, (key, _) in joined.items():
        for j, (_, other) in joined.items():
            if i != j:
                assert wait_for(lambda k=key, o=other: ns_ping(k, o["ip"]), 10), (i, j)
    # The data plane as libnetwork lays it out, read back with iproute2.
    ovl = rig.host(2).call("overlay_key", name=net)
    links = ns_link_details(ovl)
    vx = links["vxlan0"]["linkinfo"]["info_data"]
    assert vx["id"] == rig.host(2).call("vni", name=net) >= 4096
    assert vx["port"] == 4789 and vx["learning"] is False
    assert links["vxlan0"]["mtu"] == 1450 and links["br0"]["mtu"] == 1450
    key2, _ = joined[2]
    assert ns_link_details(key2)["eth0"]["mtu"] == 1450
    # Host 2 holds the two remote peers: FDB to their VTEPs, permanent neighbours.
    remote = [joined[1][1], joined[3][1]]
    assert {(p["mac"], rig.vtep(i)) for p, i in zip(remote, (1, 3), strict=True)} <= _fdb(
        rig, 2, net
    )
    assert {(p["ip"], p["mac"]) for p in remote} <= _neigh(rig, 2, net)


def test_leave_removes_entries_on_every_host(rig: Rig) -> None:
    net = _net(rig)
    joined = {i: _join(rig, i, net, f"{net}-e{i}") for i in (1, 2, 3)}
    mac1, ip1 = joined[1][1]["mac"], joined[1][1]["ip"]
    for i in (2, 3):
        assert wait_for(lambda i=i: (mac1, rig.vtep(1)) in _fdb(rig, i, net), 10)
    rig.host(1).call("leave_many", items=[[net, f"{net}-e1", f"c-{net}-e1"]])
    for i in (2, 3):
        assert wait_for(lambda i=i: (mac1, rig.vtep(1)) not in _fdb(rig, i, net), 10)
        assert (ip1, mac1) not in _neigh(rig, i, net)
    # The others still reach each other.
    assert ns_ping(joined[2][0], joined[3][1]["ip"])


def test_conflicting_vni_subnet_and_name_get_typed_errors(rig: Rig) -> None:
    net = _net(
        rig,
        subnet="10.231.0.0/24",
        options={"com.docker.network.driver.overlay.vxlanid_list": "777001"},
    )
    assert rig.host(2).call("vni", name=net) == 777001
    h2 = rig.host(2)
    before = h2.call("networks")
    with pytest.raises(RemoteError) as exc:
        h2.call(
            "create_network",
            name="other-vni",
            options={"com.docker.network.driver.overlay.vxlanid_list": "777001"},
        )
    assert exc.value.kind == "VNIInUse"
    with pytest.raises(RemoteError) as exc:
        h2.call("create_network", name="other-subnet", subnet="10.231.0.128/25")
    assert exc.value.kind == "PoolOverlap"
    with pytest.raises(RemoteError) as exc:
        rig.host(3).call("create_network", name=net, subnet="10.232.0.0/24")
    assert exc.value.kind == "NameInUse"
    with pytest.raises(RemoteError) as exc:
        h2.call(
            "create_network",
            name="bad-vni",
            options={"com.docker.network.driver.overlay.vxlanid_list": "16777216"},
        )
    assert exc.value.kind == "InvalidParameter"
    with pytest.raises(RemoteError) as exc:  # overlay networks are IPv4 only
        h2.call(
            "create_network",
            name="v6",
            subnet="10.233.0.0/24",
            subnet6="fd42:233::/64",
            enable_ipv6=True,
        )
    assert exc.value.kind == "Unsupported" and "IPv6" in str(exc.value)
    with pytest.raises(RemoteError) as exc:  # no default global IPv6 pool either
        h2.call("create_network", name="v6", subnet="10.233.0.0/24", enable_ipv6=True)
    assert exc.value.kind == "InvalidParameter"
    assert h2.call("networks") == before  # nothing was left behind
    # The failed attempts released what they claimed: the subnet and VNI are free again
    # once the network is gone.
    rig.host(1).call("delete_network", name=net)
    assert wait_for(lambda: net not in h2.call("networks"), 10)
    h2.call(
        "create_network",
        name=f"{net}-again",
        subnet="10.231.0.0/24",
        options={"com.docker.network.driver.overlay.vxlanid_list": "777001"},
    )
    h2.call("delete_network", name=f"{net}-again")
    h2.call("create_network", name="v6", subnet="10.233.0.0/24")  # the refused one's subnet
    h2.call("delete_network", name="v6")


def test_delete_is_refused_while_another_host_has_endpoints(rig: Rig) -> None:
    net = _net(rig)
    rig.host(2).call("create_endpoints", net=net, names=[f"{net}-e2"])
    with pytest.raises(RemoteError) as exc:
        rig.host(1).call("delete_network", name=net)
    assert exc.value.kind == "ActiveEndpoints"
    rig.host(2).call("delete_endpoint", net=net, ep=f"{net}-e2")
    rig.host(1).call("delete_network", name=net)
    for i in (2, 3):
        assert wait_for(lambda i=i: net not in rig.host(i).call("networks"), 10)


def test_etcd_outage_keeps_traffic_and_joins_converge(rig: Rig) -> None:
    net = _net(rig)
    k1, _ = _join(rig, 1, net, f"{net}-e1")
    k2, e2 = _join(rig, 2, net, f"{net}-e2")
    [late] = rig.host(1).call("create_endpoints", net=net, names=[f"{net}-late"])
    assert wait_for(lambda: ns_ping(k1, e2["ip"]), 10)
    rig.stop_etcd()
    try:
        assert wait_for(lambda: not rig.host(2).call("status")["connected"], 10)
        assert ns_ping(k1, e2["ip"])  # existing traffic does not need etcd
        [late_key] = rig.host(1).call("join_many", items=[[net, f"{net}-late", "c-late"]])
        assert (late["mac"], rig.vtep(1)) not in _fdb(rig, 2, net)
    finally:
        rig.start_etcd()
    assert wait_for(lambda: (late["mac"], rig.vtep(1)) in _fdb(rig, 2, net), 20)
    assert wait_for(lambda: ns_ping(late_key, e2["ip"]), 10)
    assert ns_ping(k2, late["ip"])


def test_restarted_host_rejoins_and_converges(rig: Rig) -> None:
    net = _net(rig)
    k3, e3 = _join(rig, 3, net, f"{net}-e3")
    _join(rig, 1, net, f"{net}-e1")
    h3 = rig.host(3)
    h3.stop()
    try:
        k1b, e1b = _join(rig, 1, net, f"{net}-e1b")  # while host 3 is away
        rig.host(1).call("leave_many", items=[[net, f"{net}-e1", f"c-{net}-e1"]])
    finally:
        h3.start()
    assert wait_for(lambda: (e1b["mac"], rig.vtep(1)) in _fdb(rig, 3, net), 10)
    assert wait_for(lambda: all(m != e3["mac"] for m, _ in _fdb(rig, 3, net)), 1)
    assert len(_fdb(rig, 3, net)) == 1  # the peer that left is gone here too
    assert wait_for(lambda: ns_ping(k3, e1b["ip"]), 10)
    assert ns_ping(k1b, e3["ip"])


def test_fdb_and_neighbour_drift_is_repaired(rig: Rig) -> None:
    import subprocess

    net = _net(rig)
    _, e1 = _join(rig, 1, net, f"{net}-e1")
    k2, _ = _join(rig, 2, net, f"{net}-e2")
    assert wait_for(lambda: (e1["mac"], rig.vtep(1)) in _fdb(rig, 2, net), 10)
    ovl = rig.host(2).call("overlay_key", name=net)

    def damage() -> None:
        for argv in (
            ["bridge", "fdb", "del", e1["mac"], "dev", "vxlan0", "dst", rig.vtep(1), "self"],
            ["ip", "neigh", "del", e1["ip"], "dev", "vxlan0"],
            [
                "bridge",
                "fdb",
                "append",
                "02:00:00:00:00:99",
                "dev",
                "vxlan0",
                "dst",
                "198.18.0.77",
                "self",
                "permanent",
            ],
        ):
            subprocess.run(["nsenter", f"--net={ovl}", *argv], check=True, capture_output=True)

    # An explicit reconcile repairs it and counts the repairs. (The agent's own pass, every
    # second here, may get there first: then the damage is done again.)
    for _ in range(5):
        damage()
        report = rig.host(2).call("reconcile")
        kinds = [r["kind"] for r in report["repairs"]]
        if kinds:
            break
    assert "overlay_fdb_restored" in kinds and "overlay_neighbour_restored" in kinds
    assert "overlay_fdb_removed" in kinds
    assert (e1["mac"], rig.vtep(1)) in _fdb(rig, 2, net)
    assert ("02:00:00:00:00:99", "198.18.0.77") not in _fdb(rig, 2, net)
    assert (e1["ip"], e1["mac"]) in _neigh(rig, 2, net)
    # The agent's periodic pass (every second here) repairs it without being asked.
    before = rig.host(2).call("status")["repairs"]
    damage()
    assert wait_for(lambda: (e1["mac"], rig.vtep(1)) in _fdb(rig, 2, net), 10)
    assert wait_for(lambda: rig.host(2).call("status")["repairs"] >= before + 3, 10)
    assert ns_ping(k2, e1["ip"])


def test_cnm_agent_keeps_a_host_in_step(rig: Rig) -> None:
    import json
    import signal
    import subprocess
    import sys

    net = _net(rig)
    _join(rig, 3, net, f"{net}-e3")
    h3 = rig.host(3)
    h3.stop()  # host 3's controller process gives way to the long-lived agent
    cnm = str(Path(sys.executable).with_name("cnm"))
    agent = subprocess.Popen(
        [
            "nsenter",
            f"--net={h3.netns}",
            cnm,
            "--state-dir",
            h3.state,
            "--run-dir",
            h3.run,
            "agent",
            "--store",
            rig.store,
            "--status-every",
            "0.2",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert agent.stdout is not None
        first = json.loads(agent.stdout.readline())
        assert first["agent"] == "running" and first["connected"] is True
        _, e1 = _join(rig, 1, net, f"{net}-e1")
        ovl = f"{h3.run}/overlay/{rig.host(1).call('network', name=net)['id']}"

        def programmed() -> bool:
            return any(
                e["mac"] == e1["mac"] and e.get("dst") == rig.vtep(1) for e in ns_fdb(ovl, "vxlan0")
            )

        assert wait_for(programmed, 10)
        agent.send_signal(signal.SIGTERM)
        out = agent.communicate(timeout=15)[0].strip().splitlines()
        assert agent.returncode == 0 and json.loads(out[-1])["agent"] == "stopped"
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
        h3.start()


def test_failed_join_into_a_sandbox_that_stays_leaves_nothing_behind(rig: Rig) -> None:
    """A join into a sandbox that exists already, batched with one whose veth cannot be
    made (its host-end name is taken in the network's namespace): the whole join is
    rolled back, and the first's interface, made inside the kept sandbox under the
    driver's name, goes too."""
    import subprocess

    from cnm.control.drivers.overlay import host_name

    h2 = rig.host(2)
    kept = _net(rig)
    key, _ = _join(rig, 2, kept, f"{kept}-keep")
    net = _net(rig)
    _join(rig, 2, net, f"{net}-first")  # the network's namespace exists on host 2
    _, b = h2.call("create_endpoints", net=net, names=[f"{net}-a", f"{net}-b"])
    ovl = h2.call("overlay_key", name=net)
    before_sandbox, before_ovl = set(ns_links(key)), set(ns_links(ovl))
    squat = ["nsenter", f"--net={ovl}", "ip", "link", "add", host_name(b["id"]), "type", "bridge"]
    subprocess.run(squat, check=True, capture_output=True)
    items = [[net, f"{net}-a", f"c-{kept}-keep"], [net, f"{net}-b", f"c-{net}-b"]]
    with pytest.raises(RemoteError):
        h2.call("join_many", items=items)
    assert set(ns_links(key)) == before_sandbox  # no cnm<id>, no new eth
    assert set(ns_links(ovl)) == before_ovl | {host_name(b["id"])}  # only the squatter
    # Nothing half-done in the records either: both join once the name is free.
    subprocess.run([*squat[:4], "del", host_name(b["id"])], check=True, capture_output=True)
    key_a, _ = h2.call("join_many", items=items)
    assert key_a == key
    assert len([n for n in ns_links(key) if n.startswith("eth")]) == 2


def test_watch_notices_a_silent_partition(rig: Rig) -> None:
    """etcd's link goes down (no FIN, no RST): a quiet watch ends with WatchLost within
    the liveness period plus the keepalive probes, instead of waiting for ever."""
    import queue
    import threading
    import time

    from cnm.control.store.etcd import EtcdStore, WatchLost

    store = EtcdStore(rig.store, liveness=1.0)
    stop = threading.Event()
    q: queue.Queue = queue.Queue()
    _, rev = store.range("")

    def follow() -> None:
        try:
            for events in store.watch("liveness/", rev + 1, stop):
                q.put(events)
        except WatchLost as exc:
            q.put(exc)
        q.put(None)

    watcher = threading.Thread(target=follow, daemon=True)
    watcher.start()
    try:
        store.put("liveness/a", 1)
        assert [e.key for e in q.get(timeout=5)] == ["liveness/a"]  # the watch works
        time.sleep(2.5)  # quiet, yet alive: probes answered, nothing ends it
        assert q.empty()
        rig.partition_etcd()
        t0 = time.monotonic()
        item = q.get(timeout=20)
        waited = time.monotonic() - t0
        assert isinstance(item, WatchLost), item
        assert waited < 1 + 3 + 2, waited
        print(f"\nwatch lost {waited:.1f} s after the partition: {item}")
    finally:
        rig.partition_etcd(cut=False)
        stop.set()
        watcher.join(timeout=10)
        store.close()


def test_partition_is_noticed_and_updates_made_meanwhile_converge(rig: Rig) -> None:
    """Host 3 relies on its watch alone (no periodic repair for an hour): etcd is cut
    off silently, host 3 notices (connected turns False), a join on host 1 during the
    partition reaches host 3's kernel once the link is back."""
    h3 = rig.host(3)
    h3.stop()
    h3.env = {**h3.env, "CNM_OVERLAY_REPAIR_INTERVAL": "3600"}
    h3.start()
    try:
        net = _net(rig)
        k3, e3 = _join(rig, 3, net, f"{net}-e3")
        [late] = rig.host(1).call("create_endpoints", net=net, names=[f"{net}-late"])
        assert wait_for(lambda: h3.call("status")["connected"], 10)
        rig.partition_etcd()
        try:
            assert wait_for(lambda: not h3.call("status")["connected"], 15)
            [late_key] = rig.host(1).call("join_many", items=[[net, f"{net}-late", "c-late"]])
            assert (late["mac"], rig.vtep(1)) not in _fdb(rig, 3, net)
        finally:
            rig.partition_etcd(cut=False)
        assert wait_for(lambda: (late["mac"], rig.vtep(1)) in _fdb(rig, 3, net), 30)
        assert wait_for(lambda: ns_ping(k3, late["ip"]), 10)
        assert ns_ping(late_key, e3["ip"])
    finally:
        h3.stop()
        h3.env = rig.env
        h3.start()


def test_reconcile_completes_a_global_delete_left_by_a_crash(rig: Rig) -> None:
    """Host 1's controller dies in the middle of deleting a global network (the intent,
    "deleting", is in its store; the network's records are still in etcd). Reconcile
    after the restart completes the delete: the records are withdrawn, so the other
    hosts drop the network, and its subnet, VNI and name can be claimed again."""
    import sqlite3

    vni = {"com.docker.network.driver.overlay.vxlanid_list": "777002"}
    net = _net(rig, subnet="10.229.0.0/24", options=vni)
    h1 = rig.host(1)
    net_id = h1.call("network", name=net)["id"]
    for i in (2, 3):
        assert wait_for(lambda i=i: net in rig.host(i).call("networks"), 10)
    assert h1.proc is not None
    h1.proc.kill()  # the crash
    h1.proc.wait()
    h1.proc = None
    # What the delete had done by then: its intent written (the state write of
    # NetworkController._delete_network), nothing else.
    db = sqlite3.connect(f"{h1.state}/state.db")
    try:
        with db:
            db.execute("UPDATE networks SET state='deleting' WHERE id=?", (net_id,))
    finally:
        db.close()
    h1.start()
    assert net in rig.host(2).call("networks")  # etcd still has it
    report = h1.call("reconcile")
    assert report["errors"] == []
    kinds = [r["kind"] for r in report["repairs"] if r["object"] == net_id]
    assert kinds == ["network_delete_completed"]
    assert net not in h1.call("networks")
    for i in (2, 3):
        assert wait_for(lambda i=i: net not in rig.host(i).call("networks"), 10), i
    h2 = rig.host(2)
    h2.call("create_network", name=net, subnet="10.229.0.0/24", options=vni)
    assert h2.call("vni", name=net) == 777002
    h2.call("delete_network", name=net)
