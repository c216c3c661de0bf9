"""Overlay networks on the BPF tunnel (issue 7): hosts whose controller runs the eBPF data
path carry overlay traffic through cnm_tunnel (one external VXLAN device per host, maps
fed by the peer records in etcd), next to a host on the kernel path (vxlan0 + br0 per
network), all on one VXLAN wire format.

Three hosts (tests/e2e/overlay_rig.py): 1 and 2 with ebpf="on", 3 with ebpf="off".
Independent oracles: `ping` from inside the sandboxes (no static neighbour anywhere: the
program answers ARP), `ip -d link` and `tc filter` inside the tunnel namespace, the
pinned maps read with the loader, the programs' counters (decap_fast: the RX accelerator
at the receiving host's underlay device carried the frame).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from cnm.control.osl.accel import default_pin_root
from tests.bpf_gate import require_bpf, tc_program_name
from tests.e2e.overlay_rig import RemoteError, Rig, etcd_available, wait_for
from tests.kernel.oracles import link_kind, ns_link_details, ns_neighbours, ns_ping

pytestmark = [
    pytest.mark.privileged,
    pytest.mark.skipif(not etcd_available(), reason="etcd-server is not installed"),
]

BPF_HOSTS = (1, 2)
KERNEL_HOST = 3


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    require_bpf(("cnm_tunnel", "cnm_redirect"))
    r = Rig(
        Path(tmp_path_factory.mktemp("overlay-bpf")),
        hosts=3,
        env={"CNM_OVERLAY_REPAIR_INTERVAL": "3600", "CNM_ETCD_LIVENESS": "1"},
        host_env={1: {"CNM_RIG_EBPF": "on"}, 2: {"CNM_RIG_EBPF": "on"}},
    )
    try:
        yield r.start()
    finally:
        r.close()


def _net(rig: Rig, **kw: object) -> str:
    return rig.new_network("bo", **kw)


def _join(rig: Rig, i: int, net: str, ep: str) -> tuple[str, dict]:
    return rig.join(i, net, ep)


def _pins(rig: Rig, i: int) -> str:
    return os.path.join(default_pin_root(rig.host(i).state), "tunnel-4789", "cnm_tunnel")


def _program(key: str, link: dict) -> str | None:
    """The name of cnm's program at the link's TC ingress (tcx hook or clsact filter)."""
    return tc_program_name(link["ifindex"], key)


def test_hosts_choose_their_data_path(rig: Rig) -> None:
    assert [rig.host(i).call("datapath") for i in (1, 2, 3)] == ["bpf", "bpf", "kernel"]


def test_bpf_hosts_and_a_kernel_host_ping_each_other(rig: Rig) -> None:
    net = _net(rig)
    joined = {i: _join(rig, i, net, f"{net}-e{i}") for i in (1, 2, 3)}
    before = {i: rig.host(i).call("tunnel_counters") for i in BPF_HOSTS}
    for i, (key, _) in joined.items():
        for j, (_, other) in joined.items():
            if i != j:
                assert wait_for(lambda k=key, o=other: ns_ping(k, o["ip"]), 10), (i, j)
    # The program answered the containers' ARP with the peers' real MACs.
    key1 = joined[1][0]
    seen = {n["dst"]: n.get("lladdr") for n in ns_neighbours(key1, "eth0")}
    assert seen[joined[2][1]["ip"]] == joined[2][1]["mac"]
    assert seen[joined[3][1]["ip"]] == joined[3][1]["mac"]
    # Host 1's data plane: one external VXLAN device and the host end, no bridge and no
    # per-network namespace; cnm_tunnel on both.
    tkey = rig.host(1).call("tunnel_key")
    links = ns_link_details(tkey)
    vx = links["vxt4789"]["linkinfo"]["info_data"]
    assert vx.get("external") is True and vx["port"] == 4789
    kinds = {n: link_kind(link) for n, link in links.items()}
    ends = [n for n, kind in kinds.items() if kind == "veth" and n != "vxi4789"]
    assert len(ends) == 1  # (vxi4789: the RX accelerator's uplink end)
    # The only bridge is the headroom bridge, never up: the host end is its port, so the
    # container reserves room for the VXLAN headers, but it forwards nothing.
    assert [n for n, kind in kinds.items() if kind == "bridge"] == ["hr0"]
    assert "UP" not in links["hr0"]["flags"] and links[ends[0]]["master"] == "hr0"
    # (the kernel keeps 15 characters of a program's name)
    assert _program(tkey, links["vxt4789"]) == "cnm_tunnel_ingr"
    assert _program(tkey, links[ends[0]]) == "cnm_tunnel_egre"
    assert ns_link_details(key1)["eth0"]["mtu"] == 1450
    # The counters prove the program carried it, both ways, and answered ARP.
    for i in BPF_HOSTS:
        after = rig.host(i).call("tunnel_counters")
        assert after["encapsulated"] > before[i]["encapsulated"], i
        # Received: by the RX accelerator (every sender here, the kernel-path host's
        # included, sends a zero outer UDP checksum) or else the vxlan device's path.
        received = after["decapsulated"] + after["decap_fast"]
        assert received > before[i]["decapsulated"] + before[i]["decap_fast"], i
    # The peer map holds the remote peers as the kernel path's tables would.
    prog = rig.host(1).call("programmed", name=net)
    assert [joined[3][1]["mac"], rig.vtep(KERNEL_HOST)] in prog["fdb"]
    assert [joined[2][1]["ip"], joined[2][1]["mac"]] in prog["neigh"]


def test_a_network_on_another_udp_port(rig: Rig) -> None:
    """A network on UDP port 4790: the BPF hosts get a second external device (and
    program instance) for it, the kernel host a vxlan0 on that port; all reach each other."""
    net = _net(rig, options={"com.cnm.overlay.vxlan_port": "4790"})
    joined = {i: _join(rig, i, net, f"{net}-e{i}") for i in (1, 2, 3)}
    for i, (key, _) in joined.items():
        for j, (_, other) in joined.items():
            if i != j:
                assert wait_for(lambda k=key, o=other: ns_ping(k, o["ip"]), 10), (i, j)
    links = ns_link_details(rig.host(1).call("tunnel_key"))
    assert links["vxt4790"]["linkinfo"]["info_data"]["port"] == 4790
    assert links["vxt4790"]["linkinfo"]["info_data"].get("external") is True
    # Each port has its own RX accelerator, side by side on the underlay device.
    from cnm.control.osl.tunnel import pinned_tunnel_counters

    assert "vxu4790" in ns_link_details(rig.host(1).netns)
    for i in BPF_HOSTS:
        counters = pinned_tunnel_counters(default_pin_root(rig.host(i).state)) or {}
        assert counters["4790"]["decap_fast"] > 0, (i, counters)


def test_same_host_same_network_goes_direct(rig: Rig) -> None:
    net = _net(rig)
    ka, a = _join(rig, 1, net, f"{net}-a")
    kb, b = _join(rig, 1, net, f"{net}-b")
    before = rig.host(1).call("tunnel_counters")["local"]
    assert ns_ping(ka, b["ip"]) and ns_ping(kb, a["ip"])
    assert rig.host(1).call("tunnel_counters")["local"] > before


def test_networks_stay_apart(rig: Rig) -> None:
    n1, n2 = _net(rig), _net(rig)
    k1, _ = _join(rig, 1, n1, f"{n1}-e1")
    _, other_host = _join(rig, 2, n2, f"{n2}-e2")
    _, same_host = _join(rig, 1, n2, f"{n2}-e3")
    _, peer = _join(rig, 2, n1, f"{n1}-e4")
    assert wait_for(lambda: ns_ping(k1, peer["ip"]), 10)  # the network itself works
    assert not ns_ping(k1, other_host["ip"])
    assert not ns_ping(k1, same_host["ip"])


def test_leave_removes_the_peer_everywhere(rig: Rig) -> None:
    net = _net(rig)
    joined = {i: _join(rig, i, net, f"{net}-e{i}") for i in (1, 2, 3)}
    ip1, mac1 = joined[1][1]["ip"], joined[1][1]["mac"]
    assert wait_for(lambda: [ip1, mac1] in rig.host(2).call("programmed", name=net)["neigh"], 10)
    rig.host(1).call("leave_many", items=[[net, f"{net}-e1", f"c-{net}-e1"]])
    assert wait_for(
        lambda: [ip1, mac1] not in rig.host(2).call("programmed", name=net)["neigh"], 10
    )
    # Host 1 keeps no entry and no device of it.
    assert [ip1, mac1] not in rig.host(1).call("programmed", name=net)["neigh"]
    links = ns_link_details(rig.host(1).call("tunnel_key"))
    assert f"ov{joined[1][1]['id'][:13]}" not in links
    assert ns_ping(joined[2][0], joined[3][1]["ip"])
    assert ns_ping(joined[3][0], joined[2][1]["ip"])


def test_reconcile_repairs_programs_and_peer_entries(rig: Rig) -> None:
    from cnm.ebpf.loader import Map

    net = _net(rig)
    k1, e1 = _join(rig, 1, net, f"{net}-e1")
    k2, e2 = _join(rig, 2, net, f"{net}-e2")
    assert wait_for(lambda: ns_ping(k2, e1["ip"]), 10)
    tkey = rig.host(2).call("tunnel_key")
    end = next(n for n in ns_link_details(tkey) if n.startswith("ov"))
    # Damage behind the controller's back: the program off the host end and off the VXLAN
    # device, the peer's entry gone: host 2's container is cut off.
    from cnm.ebpf import loader

    links = ns_link_details(tkey)
    for dev in (end, "vxt4789"):
        assert loader.tc_detach(links[dev]["ifindex"], netns=tkey)
        assert _program(tkey, links[dev]) is None
    with Map.from_pin(os.path.join(_pins(rig, 2), "cnm_tun_peers")) as peers:
        assert peers.delete(bytes(map(int, e1["ip"].split("."))))
    assert not ns_ping(k2, e1["ip"])
    kinds = [r["kind"] for r in rig.host(2).call("reconcile")["repairs"]]
    assert "overlay_peer_restored" in kinds
    assert kinds.count("tunnel_program_reattached") == 2
    assert wait_for(lambda: ns_ping(k2, e1["ip"]), 10)
    assert ns_ping(k1, e2["ip"])


def _tunnel_entries(rig: Rig, i: int) -> set[str]:
    from cnm.ebpf.loader import Map

    with Map.from_pin(os.path.join(_pins(rig, i), "cnm_tun_local")) as local:
        return {".".join(map(str, k)) for k, _ in local.items()}


def test_failed_join_leaves_no_device_and_no_entry(rig: Rig) -> None:
    """A batch of two joins on the tunnel whose second host end cannot be made (its name
    is taken in the tunnel namespace): the whole join is rolled back, with no host end,
    no container interface and no map entry left of either; both join once the name is
    free."""
    from cnm.control.drivers.overlay import host_name
    from tests.kernel.oracles import ns_links

    h2 = rig.host(2)
    net = _net(rig)
    _join(rig, 2, net, f"{net}-first")  # the tunnel exists on host 2
    a, b = h2.call("create_endpoints", net=net, names=[f"{net}-a", f"{net}-b"])
    tkey = h2.call("tunnel_key")
    before_links, before_entries = set(ns_links(tkey)), _tunnel_entries(rig, 2)
    squat = ["nsenter", f"--net={tkey}", "ip", "link", "add", host_name(b["id"]), "type", "bridge"]
    subprocess.run(squat, check=True, capture_output=True)
    items = [[net, f"{net}-a", f"c-{net}-a"], [net, f"{net}-b", f"c-{net}-b"]]
    with pytest.raises(RemoteError):
        h2.call("join_many", items=items)
    assert set(ns_links(tkey)) == before_links | {host_name(b["id"])}  # only the squatter
    assert _tunnel_entries(rig, 2) == before_entries
    assert a["ip"] not in _tunnel_entries(rig, 2)
    subprocess.run([*squat[:4], "del", host_name(b["id"])], check=True, capture_output=True)
    key_a, key_b = h2.call("join_many", items=items)
    assert {a["ip"], b["ip"]} <= _tunnel_entries(rig, 2)
    assert ns_ping(key_a, b["ip"]) and ns_ping(key_b, a["ip"])


def test_reconcile_drops_the_entry_of_a_vanished_host_end(rig: Rig) -> None:
    from cnm.control.drivers.overlay import host_name

    net = _net(rig)
    _, e = _join(rig, 1, net, f"{net}-e")
    assert e["ip"] in _tunnel_entries(rig, 1)
    tkey = rig.host(1).call("tunnel_key")
    subprocess.run(
        ["nsenter", f"--net={tkey}", "ip", "link", "del", host_name(e["id"])],
        check=True,
        capture_output=True,
    )
    repairs = rig.host(1).call("reconcile")["repairs"]
    assert any(
        r["kind"] == "tunnel_endpoint_removed" and e["ip"] in r["object"] for r in repairs
    ), repairs
    assert e["ip"] not in _tunnel_entries(rig, 1)


def test_a_restarted_host_picks_up_its_tunnel(rig: Rig) -> None:
    """Host 2's controller stops (its programs and pins stay: traffic keeps flowing) and
    starts again: it picks the tunnel up, learns peers that joined meanwhile, and a new
    join works."""
    net = _net(rig)
    k1, e1 = _join(rig, 1, net, f"{net}-e1")
    k2, e2 = _join(rig, 2, net, f"{net}-e2")
    assert wait_for(lambda: ns_ping(k1, e2["ip"]), 10)
    h2 = rig.host(2)
    h2.stop()
    assert ns_ping(k1, e2["ip"]) and ns_ping(k2, e1["ip"])  # no controller needed
    _, e3 = _join(rig, 1, net, f"{net}-e3")  # while host 2 is away
    h2.start()
    assert h2.call("datapath") == "bpf"
    assert wait_for(lambda: ns_ping(k2, e3["ip"]), 10)
    k4, _ = _join(rig, 2, net, f"{net}-e4")
    assert wait_for(lambda: ns_ping(k4, e1["ip"]), 10)
    assert ns_ping(k4, e2["ip"])


def test_past_the_bridge_port_limit(rig: Rig) -> None:
    """No bridge on the tunnel, so no 1024-port limit: 1100 containers of one network on
    one host, with pings between sampled pairs and to another host."""
    n = 1100
    h1 = rig.host(1)
    net = _net(rig, subnet="10.240.0.0/16")
    eps = h1.call("create_endpoints", net=net, names=[f"{net}-{i}" for i in range(n)])
    keys = h1.call("join_many", items=[[net, e["name"], f"c-{e['name']}"] for e in eps])
    k2, far = _join(rig, 2, net, f"{net}-far")
    for a, b in ((0, n - 1), (n // 2, 1), (n - 1, n // 3)):
        assert ns_ping(keys[a], eps[b]["ip"]), (a, b)
    assert wait_for(lambda: ns_ping(keys[n - 1], far["ip"]), 10)
    assert ns_ping(k2, eps[0]["ip"])
    # Past ~1020 host ends the next headroom bridge takes them.
    links = ns_link_details(h1.call("tunnel_key"))
    assert {"hr0", "hr1"} <= {n for n, link in links.items() if link_kind(link) == "bridge"}
    h1.call("leave_many", items=[[net, e["name"], f"c-{e['name']}"] for e in eps])
    h1.call("delete_endpoints", net=net, eps=[e["name"] for e in eps])


def _underlay(rig: Rig, i: int) -> dict:
    """Host i's underlay device (the one holding its VTEP address)."""
    return ns_link_details(rig.host(i).netns)["eth0"]


def test_the_rx_accelerator_carries_and_steps_aside(rig: Rig) -> None:
    """Frames from a BPF host to another are decapsulated at the receiver's underlay device
    (cnm_tunnel_decap) and go through the uplink pair; without the program, or without the
    pair, they take the VXLAN device's path, and reconcile puts both back."""
    from cnm.ebpf import loader

    net = _net(rig)
    joined = {i: _join(rig, i, net, f"{net}-e{i}") for i in (1, 2, 3)}
    (k1, _), (_, e2), (k3, e3) = joined[1], joined[2], joined[3]
    h2 = rig.host(2)
    assert wait_for(lambda: ns_ping(k1, e2["ip"]), 10)
    # Host 2's accelerator: the decap program on its underlay device, the uplink pair
    # (host end in the host namespace, the other end in the tunnel namespace).
    tkey = h2.call("tunnel_key")
    assert _program(h2.netns, _underlay(rig, 2)) == "cnm_tunnel_deca"
    host_links, tunnel_links = ns_link_details(h2.netns), ns_link_details(tkey)
    assert "vxu4789" in host_links and "UP" in host_links["vxu4789"]["flags"]
    assert _program(tkey, tunnel_links["vxi4789"]) == "cnm_tunnel_upli"

    def carried() -> tuple[int, int]:
        c = h2.call("tunnel_counters")
        return c["decap_fast"], c["decapsulated"]

    fast, slow = carried()
    assert ns_ping(k1, e2["ip"])
    assert carried()[0] >= fast + 1  # the accelerator carried host 1's frames
    # The kernel-path host still reaches both BPF hosts (and they it).
    assert ns_ping(k3, e2["ip"]) and ns_ping(k3, joined[1][1]["ip"])
    assert ns_ping(joined[2][0], e3["ip"])

    # Detached: the VXLAN device's path carries them.
    underlay = _underlay(rig, 2)["ifindex"]
    assert loader.tc_detach(underlay, netns=h2.netns)
    assert _program(h2.netns, _underlay(rig, 2)) is None
    fast, slow = carried()
    assert ns_ping(k1, e2["ip"])
    now = carried()
    assert now[0] == fast and now[1] > slow, now
    repairs = [(r["kind"], r["object"]) for r in h2.call("reconcile")["repairs"]]
    assert ("tunnel_program_reattached", "eth0") in repairs, repairs
    assert _program(h2.netns, _underlay(rig, 2)) == "cnm_tunnel_deca"

    # The uplink pair deleted: the same, until reconcile makes it again.
    subprocess.run(
        ["nsenter", f"--net={h2.netns}", "ip", "link", "del", "vxu4789"],
        check=True,
        capture_output=True,
    )
    assert "vxi4789" not in ns_link_details(tkey)
    fast, slow = carried()
    assert ns_ping(k1, e2["ip"])
    now = carried()
    assert now[0] == fast and now[1] > slow, now
    repairs = [(r["kind"], r["object"]) for r in h2.call("reconcile")["repairs"]]
    assert ("tunnel_uplink_made", "vxu4789") in repairs, repairs
    fast, _ = carried()
    assert ns_ping(k1, e2["ip"])
    assert carried()[0] > fast
    assert h2.call("reconcile")["repairs"] == []


def test_doctor_shows_the_tunnel_counters(rig: Rig) -> None:
    import json
    import sys

    h1 = rig.host(1)
    cnm = str(Path(sys.executable).with_name("cnm"))
    argv = [cnm, "--json", "--state-dir", h1.state, "--run-dir", h1.run, "doctor"]
    out = subprocess.run(
        ["nsenter", f"--net={h1.netns}", *argv], check=True, capture_output=True, text=True
    ).stdout
    tunnel = json.loads(out)["ebpf_datapath"]["tunnel"]
    assert tunnel["4789"]["encapsulated"] > 0 and tunnel["4789"]["decap_fast"] > 0
    assert "decapsulated" in tunnel["4789"]


def test_last_network_takes_the_tunnel_away(rig: Rig) -> None:
    # Every network of this module is deleted: the tunnel namespace and its pins go.
    for name in rig.host(1).call("networks"):
        for i in (1, 2, 3):
            for net, ep, cont in rig.host(i).call("joined", name=name):
                if cont is not None:
                    rig.host(i).call("leave_many", items=[[net, ep, cont]])
                rig.host(i).call("delete_endpoint", net=net, ep=ep)
        rig.host(1).call("delete_network", name=name)
    from cnm.ebpf import loader

    for i in BPF_HOSTS:
        tkey = rig.host(i).call("tunnel_key")
        assert wait_for(lambda k=tkey: not os.path.exists(k), 10), i
        assert not os.path.exists(_pins(rig, i)), i
        # The accelerators went too: no uplink pair, no program on the underlay device.
        host = rig.host(i).netns
        assert not [n for n in ns_link_details(host) if n.startswith("vxu")], i
        for direction in ("ingress", "egress"):
            assert loader.tc_query(_underlay(rig, i)["ifindex"], direction, host) is None
