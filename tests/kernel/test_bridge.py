"""The bridge driver end to end: real packets between real sandboxes, judged from outside.

Every claim is checked with tools that share no code with cnm: `ip -j` / `ip -d -j link`
and `bridge -j -d link` (devices, masters, port flags), `nsenter --net=<key> ...` (what a
container sees: links, addresses, routes, /proc/sys), `nft -j list table inet cnm` (the
firewall), and `ping -c1 -W1` run inside the sandboxes (real ICMP through the bridge),
next to cnm's own osl.ping. Traffic that must leave the host goes to an "outside"
namespace made here and joined to the session's namespace by a veth (198.18.0.0/24):
it has no route back to any container subnet, so an answer proves masquerading.
Everything lives in the session's throwaway namespace and is removed after each test.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import subprocess
from collections.abc import Iterator

import pytest

from cnm.control import IPAMConfig, NetworkController, errors
from cnm.control.osl.links import GRAVEYARD_GROUP
from cnm.fastpath import netns

from .oracles import (
    addresses_here,
    bridge_ports,
    kernel_view,
    link_kind,
    links_here,
    netns_dir,
    nft_chain_names,
    nft_table,
    ns_addrs,
    ns_link_details,
    ns_links,
    ns_ping,
    ns_read,
    ns_routes,
    nsfs_mounts,
    wait_until,
)
from .pings import both_pings

pytestmark = [pytest.mark.privileged, pytest.mark.usefixtures("_unmount_leftovers")]

NAME = "com.docker.network.bridge.name"
ICC = "com.docker.network.bridge.enable_icc"
MASQ = "com.docker.network.bridge.enable_ip_masquerade"
MTU = "com.docker.network.driver.mtu"
HOST_END = re.compile(r"vc[0-9a-f]{13}")
OUTSIDE_HOST, OUTSIDE_PEER = "198.18.0.1", "198.18.0.2"


def v4(n: int) -> list[IPAMConfig]:
    return [IPAMConfig(subnet=f"10.89.{n}.0/24")]


def v6(n: int) -> list[IPAMConfig]:
    return [IPAMConfig(subnet=f"fd89:{n}::/64")]


def ip(*argv: str, path: str | None = None) -> None:
    prefix = [] if path is None else ["nsenter", f"--net={path}"]
    subprocess.run([*prefix, "ip", *argv], check=True, capture_output=True, text=True)


def bridge_of(net) -> str:
    return f"br-{net.id[:12]}"


def gw4(net) -> ipaddress.IPv4Interface:
    return next(g for g in net.gateways if g.version == 4)


def gw6(net) -> ipaddress.IPv6Interface:
    return next(g for g in net.gateways if g.version == 6)


def host_end(key: str, ifname: str = "eth0") -> str:
    """The host end of a container interface, found through the kernel's peer index."""
    peer = ns_links(key)[ifname]["link_index"]
    (name,) = [n for n, link in links_here().items() if link["ifindex"] == peer]
    return name


def ports_of(bridge: str) -> set[str]:
    """The ports the kernel has on `bridge` (`bridge -j link`)."""
    return {p for p, info in bridge_ports().items() if info.get("master") == bridge}


def live_ports_of(bridge: str) -> set[str]:
    """The ports of `bridge` that can forward: a down port is "disabled" and carries
    nothing (a leave leaves the host end there, down, until the reaper deletes it)."""
    return {
        p
        for p, info in bridge_ports().items()
        if info.get("master") == bridge and info.get("state") != "disabled"
    }


def leftovers() -> list[str]:
    """Host-side devices that look like cnm's: bridges br-<12>, host ends vc<13>."""
    return sorted(
        n
        for n, link in links_here().items()
        if re.fullmatch(r"br-[0-9a-f]{12}", n) or (HOST_END.fullmatch(n) and link_kind(link))
    )


def settled() -> bool:
    """No retired host end (down, in the graveyard group) waits for the reaper any more."""
    return not [
        n
        for n, link in links_here().items()
        if HOST_END.fullmatch(n) and str(link.get("group")) == str(GRAVEYARD_GROUP)
    ]


def remove_everything(ctl: NetworkController, extra_links: tuple[str, ...] = ()) -> None:
    """Tear down through cnm, then sweep whatever it left so the next test starts clean."""
    with contextlib.suppress(Exception):
        for sb in ctl.sandboxes():
            with contextlib.suppress(Exception):
                sb.delete()
        for net in ctl.networks():
            with contextlib.suppress(Exception):
                eps = net.endpoints()
                if eps:
                    ctl.delete_endpoints(eps, force=True)
            with contextlib.suppress(Exception):
                net.delete()
    for name in [*leftovers(), *extra_links]:
        subprocess.run(["ip", "link", "del", name], capture_output=True)
    subprocess.run(["nft", "delete", "table", "inet", "cnm"], capture_output=True)


@pytest.fixture
def bctl(ctl) -> Iterator[NetworkController]:
    yield ctl
    remove_everything(ctl, ("cnmbr-test",))


@pytest.fixture
def run_dir(dirs: tuple[str, str]) -> str:
    return dirs[1]


@pytest.fixture
def ip_forward() -> Iterator[None]:
    """IPv4 forwarding on in the session's (throwaway) namespace for the test."""
    path = "/proc/sys/net/ipv4/ip_forward"
    with open(path) as f:
        before = f.read().strip()
    with open(path, "w") as f:
        f.write("1")
    yield
    with open(path, "w") as f:
        f.write(before)


@pytest.fixture
def outside(tmp_path, ip_forward) -> Iterator[str]:
    """A namespace "outside the host": 198.18.0.2 on a veth to the session's 198.18.0.1,
    no other route (nothing leads back to the container subnets)."""
    path = str(tmp_path / "outside")
    netns.create(path)
    try:
        ip("link", "add", "cnmout0", "type", "veth", "peer", "name", "cnmout1")
        ip("link", "set", "cnmout1", "netns", path)
        ip("addr", "add", f"{OUTSIDE_HOST}/24", "dev", "cnmout0")
        ip("link", "set", "cnmout0", "up")
        ip("addr", "add", f"{OUTSIDE_PEER}/24", "dev", "cnmout1", path=path)
        ip("link", "set", "cnmout1", "up", path=path)
        yield path
    finally:
        subprocess.run(["ip", "link", "del", "cnmout0"], capture_output=True)
        netns.delete(path)


# --- real packets on one network ------------------------------------------------------------


def test_containers_on_one_bridge_network_ping_each_other(bctl) -> None:
    net = bctl.create_network("web", ipv4=v4(1))
    a, b = net.create_endpoints(["a", "b"])
    ka, kb = a.join("c-a"), b.join("c-b")
    br, gw = bridge_of(net), gw4(net)

    # The bridge: named after the network id, a bridge, up, with the gateway address.
    link = links_here()[br]
    assert link_kind(link) == "bridge"
    assert "UP" in link["flags"]
    assert str(gw) == "10.89.1.1/24"
    assert str(gw) in addresses_here(br)[br]

    for ep, key in ((a, ka), (b, kb)):
        inside = ns_link_details(key)
        assert set(inside) == {"lo", "eth0"}, inside
        eth0 = inside["eth0"]
        assert link_kind(eth0) == "veth"
        assert eth0["address"] == ep.mac_address
        assert "UP" in eth0["flags"]
        assert ns_addrs(key)["eth0"] == {str(ep.ipv4_address.ip)}
        default = [r for r in ns_routes(key) if r["dst"] == "default"]
        assert [(r.get("gateway"), r.get("dev")) for r in default] == [(str(gw.ip), "eth0")]
        # No IPv6 address: IPv6 is off on the interface.
        assert ns_read(key, "/proc/sys/net/ipv6/conf/eth0/disable_ipv6") == "1"
        # Its host end: a veth on the bridge, up, hairpin on.
        host = host_end(key)
        assert HOST_END.fullmatch(host), host
        assert links_here()[host].get("master") == br
        port = bridge_ports()[host]
        assert port["hairpin"] is True, port
        assert port.get("isolated", False) is False, port
    assert ports_of(br) == {host_end(ka), host_end(kb)}

    assert both_pings(ka, b.ipv4_address.ip)
    assert both_pings(kb, a.ipv4_address.ip)
    assert both_pings(ka, gw.ip)


def test_ipv6_dual_stack_pings_both_ways(bctl) -> None:
    net = bctl.create_network("dual", ipv4=v4(2), ipv6=v6(2), enable_ipv6=True)
    a, b = net.create_endpoints(["a", "b"])
    ka, kb = a.join("c-a"), b.join("c-b")
    br, g4, g6 = bridge_of(net), gw4(net), gw6(net)
    assert addresses_here(br)[br] >= {str(g4), str(g6)}
    for ep, key in ((a, ka), (b, kb)):
        assert ep.ipv6_address is not None and ep.ipv6_address.ip in ipaddress.ip_network(
            "fd89:2::/64"
        )
        assert {str(ep.ipv4_address.ip), str(ep.ipv6_address.ip)} <= ns_addrs(key)["eth0"]
        default6 = [r for r in ns_routes(key, 6) if r["dst"] == "default"]
        assert [(r.get("gateway"), r.get("dev")) for r in default6] == [(str(g6.ip), "eth0")]
        assert ns_read(key, "/proc/sys/net/ipv6/conf/eth0/disable_ipv6") == "0"
    assert both_pings(ka, b.ipv6_address.ip)
    assert both_pings(kb, a.ipv6_address.ip)
    assert both_pings(ka, g6.ip)
    assert both_pings(kb, a.ipv4_address.ip)
    assert both_pings(ka, b.ipv4_address.ip)


def test_bridge_name_and_mtu_options(bctl) -> None:
    net = bctl.create_network("named", ipv4=v4(3), options={NAME: "cnmbr-test", MTU: "1400"})
    a, b = net.create_endpoints(["a", "b"])
    ka, kb = a.join("c-a"), b.join("c-b")
    links = links_here()
    assert bridge_of(net) not in links
    assert link_kind(links["cnmbr-test"]) == "bridge"
    assert links["cnmbr-test"]["mtu"] == 1400
    assert str(gw4(net)) in addresses_here("cnmbr-test")["cnmbr-test"]
    for key in (ka, kb):
        host = host_end(key)
        assert links[host]["mtu"] == 1400
        assert links[host]["master"] == "cnmbr-test"
        assert ns_links(key)["eth0"]["mtu"] == 1400
    assert ports_of("cnmbr-test") == {host_end(ka), host_end(kb)}
    assert both_pings(ka, b.ipv4_address.ip)
    bctl.delete_endpoints([a, b], force=True)
    net.delete()
    assert "cnmbr-test" not in links_here()


def test_a_container_on_two_networks_has_eth0_and_eth1(bctl) -> None:
    n1 = bctl.create_network("n1", ipv4=v4(4))
    n2 = bctl.create_network("n2", ipv4=v4(5))
    e1, p1 = n1.create_endpoints(["e1", "p1"])
    e2, p2 = n2.create_endpoints(["e2", "p2"])
    key = e1.join("c1")
    assert e2.join("c1") == key
    inside = ns_links(key)
    assert set(inside) == {"lo", "eth0", "eth1"}, inside
    assert inside["eth0"]["address"] == e1.mac_address
    assert inside["eth1"]["address"] == e2.mac_address
    addrs = ns_addrs(key)
    assert addrs["eth0"] == {str(e1.ipv4_address.ip)}
    assert addrs["eth1"] == {str(e2.ipv4_address.ip)}
    assert links_here()[host_end(key, "eth0")]["master"] == bridge_of(n1)
    assert links_here()[host_end(key, "eth1")]["master"] == bridge_of(n2)
    kp1, kp2 = p1.join("peer1"), p2.join("peer2")
    assert both_pings(key, p1.ipv4_address.ip)
    assert both_pings(key, p2.ipv4_address.ip)
    assert both_pings(kp1, e1.ipv4_address.ip)
    assert both_pings(kp2, e2.ipv4_address.ip)
    # The same in one bulk call: eth0 and eth1 in one new sandbox.
    f1, f2 = n1.create_endpoint("f1"), n2.create_endpoint("f2")
    k1, k2 = bctl.join_many([(f1, "c2"), (f2, "c2")])
    assert k1 == k2 != key
    inside = ns_links(k1)
    assert set(inside) == {"lo", "eth0", "eth1"}, inside
    assert {inside["eth0"]["address"], inside["eth1"]["address"]} == {
        f1.mac_address,
        f2.mac_address,
    }
    assert both_pings(k1, p1.ipv4_address.ip)
    assert both_pings(k1, p2.ipv4_address.ip)


def test_the_second_interface_of_a_container_is_eth1(bctl) -> None:
    """eth0/eth1 naming alone: the second network is internal (no gateway to install)."""
    n1 = bctl.create_network("m1", ipv4=v4(27))
    n2 = bctl.create_network("m2", ipv4=v4(28), internal=True)
    e1, e2, p2 = n1.create_endpoint("e1"), n2.create_endpoint("e2"), n2.create_endpoint("p2")
    key = e1.join("c1")
    assert e2.join("c1") == key
    inside = ns_links(key)
    assert set(inside) == {"lo", "eth0", "eth1"}, inside
    assert inside["eth0"]["address"] == e1.mac_address
    assert inside["eth1"]["address"] == e2.mac_address
    assert ns_addrs(key)["eth1"] == {str(e2.ipv4_address.ip)}
    assert links_here()[host_end(key, "eth1")]["master"] == bridge_of(n2)
    kp = p2.join("peer")
    assert both_pings(key, p2.ipv4_address.ip)
    assert both_pings(kp, e2.ipv4_address.ip)
    # Leaving eth0 frees its name; the next join into the container takes it again.
    e1.leave("c1")
    assert set(ns_links(key)) >= {"lo", "eth1"} and "eth0" not in ns_links(key)
    e1.join("c1")
    assert ns_links(key)["eth0"]["address"] == e1.mac_address


# --- ICC, internal networks, masquerade, isolation ---------------------------------------


def test_icc_false_keeps_containers_apart_but_not_from_the_gateway(bctl) -> None:
    closed = bctl.create_network("closed", ipv4=v4(6), options={ICC: "false"})
    a, b = closed.create_endpoints(["a", "b"])
    ka, kb = a.join("c-a"), b.join("c-b")
    for key in (ka, kb):
        port = bridge_ports()[host_end(key)]
        assert port["isolated"] is True, port
        assert port["hairpin"] is True, port
    assert both_pings(ka, gw4(closed).ip)
    assert both_pings(kb, gw4(closed).ip)
    assert not ns_ping(ka, b.ipv4_address.ip)
    assert not ns_ping(kb, a.ipv4_address.ip)
    # The default (ICC on), side by side: they talk.
    opened = bctl.create_network("open", ipv4=v4(7))
    c, d = opened.create_endpoints(["c", "d"])
    kc, kd = c.join("c-c"), d.join("c-d")
    assert both_pings(kc, d.ipv4_address.ip)
    assert both_pings(kd, c.ipv4_address.ip)


def test_a_normal_network_reaches_outside_through_nat_an_internal_one_does_not(
    bctl, outside
) -> None:
    normal = bctl.create_network("normal", ipv4=v4(8))
    internal = bctl.create_network("internal", ipv4=v4(9), internal=True)
    n = normal.create_endpoint("n")
    i1, i2 = internal.create_endpoints(["i1", "i2"])
    kn, ki1, ki2 = n.join("c-n"), i1.join("c-i1"), i2.join("c-i2")

    # Normal: out and back, although the outside has no route to 10.89.8.0/24.
    assert both_pings(kn, OUTSIDE_PEER)

    # Internal: no default route at all, yet the gateway and the neighbours answer.
    for key in (ki1, ki2):
        assert [r for r in ns_routes(key) if r["dst"] == "default"] == []
        assert [r for r in ns_routes(key, 6) if r["dst"] == "default"] == []
    assert both_pings(ki1, gw4(internal).ip)
    assert both_pings(ki1, i2.ipv4_address.ip)
    assert both_pings(ki2, i1.ipv4_address.ip)
    assert not ns_ping(ki1, OUTSIDE_PEER)
    # Even with routes both ways the firewall keeps the traffic on the bridge.
    ip("route", "add", "198.18.0.0/24", "via", str(gw4(internal).ip), path=ki1)
    ip("route", "add", "10.89.9.0/24", "via", OUTSIDE_HOST, path=outside)
    assert not ns_ping(ki1, OUTSIDE_PEER)
    assert not ns_ping(outside, i1.ipv4_address.ip)


def test_without_masquerade_a_network_cannot_reach_outside(bctl, outside) -> None:
    net = bctl.create_network("nomasq", ipv4=v4(10), options={MASQ: "false"})
    ep = net.create_endpoint("e")
    key = ep.join("c-e")
    assert [r["gateway"] for r in ns_routes(key) if r["dst"] == "default"] == [str(gw4(net).ip)]
    assert f"nat-{net.id[:12]}" not in nft_chain_names()
    assert not ns_ping(key, OUTSIDE_PEER)
    # It is the missing NAT, not a block: with a route back the reply comes.
    ip("route", "add", "10.89.10.0/24", "via", OUTSIDE_HOST, path=outside)
    assert both_pings(key, OUTSIDE_PEER)


def test_two_bridge_networks_are_isolated_even_with_forwarding(bctl, ip_forward) -> None:
    n1 = bctl.create_network("iso1", ipv4=v4(11))
    n2 = bctl.create_network("iso2", ipv4=v4(12))
    a = n1.create_endpoint("a")
    b = n2.create_endpoint("b")
    ka, kb = a.join("c-a"), b.join("c-b")
    assert both_pings(ka, gw4(n1).ip)
    assert both_pings(kb, gw4(n2).ip)
    assert not ns_ping(ka, b.ipv4_address.ip)
    assert not ns_ping(kb, a.ipv4_address.ip)


# --- nftables -------------------------------------------------------------------------------


def test_nft_chains_follow_the_networks(bctl) -> None:
    normal = bctl.create_network("f-normal", ipv4=v4(13))
    internal = bctl.create_network("f-internal", ipv4=v4(14), internal=True)
    nomasq = bctl.create_network("f-nomasq", ipv4=v4(15), options={MASQ: "false"})
    s1, s2, s3 = normal.id[:12], internal.id[:12], nomasq.id[:12]
    chains = nft_chain_names()
    assert {f"fwd-{s1}", f"nat-{s1}", f"fwd-{s2}", f"in-{s2}", f"fwd-{s3}"} <= chains, chains
    assert {f"nat-{s2}", f"in-{s1}", f"nat-{s3}", f"in-{s3}"}.isdisjoint(chains), chains
    table = nft_table()
    assert table is not None
    (bridges,) = [x["set"] for x in table if "set" in x and x["set"]["name"] == "bridges"]
    assert {bridge_of(normal), bridge_of(internal), bridge_of(nomasq)} <= set(bridges["elem"])

    normal.delete()
    chains = nft_chain_names()
    assert not any(s1 in c for c in chains), chains
    assert {f"fwd-{s2}", f"in-{s2}", f"fwd-{s3}"} <= chains
    assert bridge_of(normal) not in links_here()
    internal.delete()
    nomasq.delete()
    # All gone: the table too, or at least every network's chain.
    assert nft_table() is None or nft_chain_names() <= {"forward", "postrouting"}


# --- lifecycle ------------------------------------------------------------------------------


def test_leave_detaches_at_once_and_the_reaper_deletes_the_host_end(bctl, run_dir) -> None:
    net = bctl.create_network("life", ipv4=v4(16))
    a = net.create_endpoint("a")
    key = a.join("c-a")
    host = host_end(key)
    assert ports_of(bridge_of(net)) == {host}
    a.leave("c-a")
    # Right away: down (a down bridge port forwards nothing) and waiting in the graveyard
    # group, or already deleted. Taking it off the bridge one by one would cost a
    # synchronize_net per port; the group delete does that for all of them at once.
    now = links_here()
    if host in now:
        assert "UP" not in now[host]["flags"], now[host]
        assert str(now[host].get("group")) == str(GRAVEYARD_GROUP), now[host]
    # The implicit sandbox went with its last endpoint.
    assert not os.path.lexists(key)
    assert nsfs_mounts(run_dir) == {}
    assert netns_dir(run_dir) == []
    assert wait_until(lambda: host not in links_here(), timeout=2.0)
    assert ports_of(bridge_of(net)) == set()


def test_an_explicit_sandbox_outlives_its_last_leave_and_gives_eth0_again(bctl, run_dir) -> None:
    net = bctl.create_network("expl", ipv4=v4(17))
    a, b, peer = net.create_endpoints(["a", "b", "peer"])
    kp = peer.join("c-peer")
    sb = bctl.create_sandbox("c-x")
    assert a.join(sb) == sb.key
    first_host = host_end(sb.key)
    a.leave(sb)
    assert sb.key in nsfs_mounts(run_dir)
    assert os.path.basename(sb.key) in netns_dir(run_dir)
    assert "eth0" not in ns_links(sb.key)
    assert first_host not in live_ports_of(bridge_of(net))
    assert wait_until(lambda: first_host not in ports_of(bridge_of(net)), timeout=2.0)
    # A new endpoint gets the retired name at once.
    assert b.join(sb) == sb.key
    inside = ns_links(sb.key)
    assert inside["eth0"]["address"] == b.mac_address
    assert ns_addrs(sb.key)["eth0"] == {str(b.ipv4_address.ip)}
    assert both_pings(sb.key, peer.ipv4_address.ip)
    assert both_pings(kp, b.ipv4_address.ip)
    # The first endpoint may come back straight away too, even before the reaper ran.
    b.leave(sb)
    a.join(sb)
    assert ns_links(sb.key)["eth0"]["address"] == a.mac_address
    assert both_pings(kp, a.ipv4_address.ip)
    assert wait_until(lambda: ports_of(bridge_of(net)) == {host_end(kp), host_end(sb.key)})


def test_a_second_controller_undoes_what_the_first_made(bctl, dirs, run_dir) -> None:
    net = bctl.create_network("shared", ipv4=v4(18))
    a, b = net.create_endpoints(["a", "b"])
    ka, kb = a.join("c-a"), b.join("c-b")
    hosts = {host_end(ka), host_end(kb)}
    br, short = bridge_of(net), net.id[:12]
    assert both_pings(ka, b.ipv4_address.ip)
    with NetworkController(state_dir=dirs[0], run_dir=dirs[1]) as other:
        onet = other.network("shared")
        oa, ob = onet.endpoint("a"), onet.endpoint("b")
        oa.leave("c-a")
        other.leave_many([(ob, "c-b")])
        assert not (hosts & live_ports_of(br))
        assert wait_until(lambda: not (hosts & ports_of(br)), timeout=2.0)
        other.delete_endpoints([oa, ob])
        onet.delete()
        assert br not in links_here()
        assert not any(short in c for c in nft_chain_names())
        assert wait_until(lambda: not (hosts & set(links_here())), timeout=2.0)
    assert netns_dir(run_dir) == []
    assert nsfs_mounts(run_dir) == {}
    assert bctl.networks() == []


# --- reconcile ------------------------------------------------------------------------------


def test_reconcile_repairs_a_host_end_deleted_behind_its_back(bctl) -> None:
    net = bctl.create_network("rec1", ipv4=v4(19))
    a, b = net.create_endpoints(["a", "b"])
    ka, kb = a.join("c-a"), b.join("c-b")
    ip("link", "del", host_end(ka))
    assert "eth0" not in ns_links(ka)  # the pair went together
    report = bctl.reconcile()
    assert report.repairs and not report.errors, report.to_dict()
    assert ns_links(ka)["eth0"]["address"] == a.mac_address
    assert ns_addrs(ka)["eth0"] == {str(a.ipv4_address.ip)}
    assert links_here()[host_end(ka)]["master"] == bridge_of(net)
    assert both_pings(ka, b.ipv4_address.ip)
    assert both_pings(kb, a.ipv4_address.ip)
    assert wait_until(settled)
    assert bctl.reconcile().clean


def test_reconcile_recreates_a_sandbox_namespace_deleted_behind_its_back(bctl) -> None:
    net = bctl.create_network("rec2", ipv4=v4(20))
    a, b = net.create_endpoints(["a", "b"])
    ka, kb = a.join("c-a"), b.join("c-b")
    netns.delete(ka)
    assert not os.path.lexists(ka)
    report = bctl.reconcile()
    assert "sandbox_namespace_recreated" in report.kinds(), report.to_dict()
    assert not report.errors, report.to_dict()
    assert ns_links(ka)["eth0"]["address"] == a.mac_address
    assert ns_addrs(ka)["eth0"] == {str(a.ipv4_address.ip)}
    assert both_pings(ka, b.ipv4_address.ip)
    assert both_pings(kb, a.ipv4_address.ip)
    assert wait_until(lambda: ports_of(bridge_of(net)) == {host_end(ka), host_end(kb)})
    assert wait_until(settled)
    assert bctl.reconcile().clean


def test_reconcile_removes_a_stray_host_end_and_a_stray_bridge(bctl) -> None:
    net = bctl.create_network("rec3", ipv4=v4(21))
    a, b = net.create_endpoints(["a", "b"])
    ka, kb = a.join("c-a"), b.join("c-b")
    stray_veth, stray_bridge = "vc0123456789abc", "br-0123456789ab"
    ip("link", "add", stray_veth, "type", "veth", "peer", "name", "cnmstraypeer")
    ip("link", "add", stray_bridge, "type", "bridge")
    report = bctl.reconcile()
    found = {(r.kind, r.object) for r in report.repairs}
    assert ("stray_host_veth_removed", stray_veth) in found, report.to_dict()
    assert ("stray_bridge_removed", stray_bridge) in found, report.to_dict()
    links = links_here()
    assert stray_veth not in links and "cnmstraypeer" not in links
    assert stray_bridge not in links
    # What belongs to a network is left alone.
    assert ports_of(bridge_of(net)) == {host_end(ka), host_end(kb)}
    assert both_pings(ka, b.ipv4_address.ip)
    assert bctl.reconcile().clean


# --- bulk -----------------------------------------------------------------------------------


def test_join_many_and_leave_many_of_twenty(bctl, run_dir) -> None:
    net = bctl.create_network("bulk", ipv4=v4(22))
    eps = net.create_endpoints([f"m{i}" for i in range(20)])
    keys = bctl.join_many([(ep, f"mc{i}") for i, ep in enumerate(eps)])
    assert len(set(keys)) == 20
    assert sorted(netns_dir(run_dir)) == sorted(os.path.basename(k) for k in keys)
    br = bridge_of(net)
    hosts = {host_end(k) for k in keys}
    assert ports_of(br) == hosts
    ports = bridge_ports()
    assert all(ports[h]["hairpin"] is True for h in hosts)
    for ep, key in zip(eps, keys, strict=True):
        assert ns_links(key)["eth0"]["address"] == ep.mac_address
    first = eps[0].ipv4_address.ip
    for key in keys[1:]:
        assert both_pings(key, first), key

    bctl.leave_many([(ep, f"mc{i}") for i, ep in enumerate(eps)])
    assert not (live_ports_of(br) & hosts)
    bctl.delete_endpoints(eps)
    assert wait_until(lambda: not (hosts & set(links_here())), timeout=2.0)
    assert ports_of(br) == set()
    assert netns_dir(run_dir) == []
    assert nsfs_mounts(run_dir) == {}
    net.delete()
    assert br not in links_here()


# --- bad input leaves the kernel unchanged -------------------------------------------------


def snapshot(ctl: NetworkController, run_dir: str) -> dict[str, object]:
    assert wait_until(settled, timeout=2.0)
    return {
        "host": kernel_view(),
        "netns": netns_dir(run_dir),
        "sandboxes": {sb.key: kernel_view(sb.key) for sb in ctl.sandboxes()},
        "nft": nft_table(),
        "store": sorted(
            (n.name, e.name, e.sandbox.id if e.sandbox else None)
            for n in ctl.networks()
            for e in n.endpoints()
        ),
    }


def test_joining_a_joined_endpoint_or_leaving_an_unjoined_one_changes_nothing(
    bctl, run_dir
) -> None:
    net = bctl.create_network("bad1", ipv4=v4(23))
    a, b = net.create_endpoints(["a", "b"])
    a.join("c-a")
    before = snapshot(bctl, run_dir)
    with pytest.raises(errors.EndpointJoined):
        a.join("c-a")
    with pytest.raises(errors.EndpointJoined):
        a.join("c-other")
    with pytest.raises(errors.EndpointJoined):
        bctl.join_many([(b, "c-b"), (a, "c-other")])
    with pytest.raises(errors.EndpointNotJoined):
        b.leave("c-a")
    with pytest.raises(errors.EndpointNotJoined):
        bctl.leave_many([(a, "c-a"), (b, "c-a")])
    with pytest.raises(errors.NotFound):
        b.leave("c-nobody")
    assert snapshot(bctl, run_dir) == before


def test_unknown_names_and_bad_options_change_nothing(bctl, run_dir) -> None:
    net = bctl.create_network("bad2", ipv4=v4(24))
    net.create_endpoint("a").join("c-a")
    before = snapshot(bctl, run_dir)
    with pytest.raises(errors.NotFound):
        bctl.network("no-such-network")
    with pytest.raises(errors.NotFound):
        bctl.network("f" * 64)
    with pytest.raises(errors.NotFound):
        net.endpoint("no-such-endpoint")
    for name in ("a" * 16, "br/x", "br x", "br:x", ""):
        with pytest.raises(errors.InvalidParameter):
            bctl.create_network("badname", ipv4=v4(25), options={NAME: name})
    for mtu in ("abc", "0", "67", "65536", "-1", "1500.5"):
        with pytest.raises(errors.InvalidParameter):
            bctl.create_network("badmtu", ipv4=v4(25), options={MTU: mtu})
    # A bridge name that is already taken in the kernel.
    with pytest.raises(errors.Conflict):
        bctl.create_network("taken", ipv4=v4(25), options={NAME: bridge_of(net)})
    assert snapshot(bctl, run_dir) == before
    assert [n.name for n in bctl.networks()] == ["bad2"]


def test_the_port_limit_refuses_joins_and_changes_nothing(bctl, run_dir, monkeypatch) -> None:
    monkeypatch.setattr(bctl.registry.get("bridge"), "max_ports", 3)
    net = bctl.create_network("ports", ipv4=v4(26))
    eps = net.create_endpoints(["p0", "p1", "p2", "p3", "p4"])
    keys = [ep.join(f"pc{i}") for i, ep in enumerate(eps[:3])]
    assert len(ports_of(bridge_of(net))) == 3
    before = snapshot(bctl, run_dir)
    with pytest.raises(errors.PortsExhausted):
        eps[3].join("pc3")
    with pytest.raises(errors.PortsExhausted):
        bctl.join_many([(eps[3], "pc3")])
    assert snapshot(bctl, run_dir) == before
    # A bulk join that would cross the limit: none of it happens.
    eps[2].leave("pc2")
    before = snapshot(bctl, run_dir)
    with pytest.raises(errors.PortsExhausted):
        bctl.join_many([(eps[3], "pc3"), (eps[4], "pc4")])
    assert snapshot(bctl, run_dir) == before
    assert eps[3].sandbox is None and eps[4].sandbox is None
    # Up to the limit is fine.
    bctl.join_many([(eps[3], "pc3")])
    assert len(ports_of(bridge_of(net))) == 3
    assert both_pings(keys[0], eps[3].ipv4_address.ip)
