"""The remote driver and remote IPAM end to end, against an independent plugin.

The plugin is tests/plugin_peer.py on a unix socket in a temporary plugin directory: it
makes a real bridge per network and a real veth pair per join in the session's
throwaway namespace, and hands out addresses from its own pools. The controller finds
it by name (driver="peer", ipam_driver="peer"), moves the plugin's interface into each
sandbox, and real ICMP between two sandboxes proves the data path. Every misbehaviour
of the plugin (hang, crash, garbage, an error reply, HTTP 500, an endpoint reply that
changes an address, an unusable join reply) must give a PluginError and leave the
controller's store, the kernel and the plugin's own pools as they were. Judged with
`ip -j` / `nsenter` and `ping`, next to cnm's own osl.ping.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from cnm.control import IPAMConfig, NetworkController, errors
from tests.plugin_peer import PeerPlugin

from .oracles import (
    kernel_view,
    links_here,
    netns_dir,
    ns_addrs,
    ns_links,
    ns_routes,
    wait_until,
)
from .pings import both_pings

pytestmark = [pytest.mark.privileged, pytest.mark.usefixtures("_unmount_leftovers")]

SUBNET = "10.123.0.0/24"
COLOUR = {"com.example.colour": "blue"}
TIMEOUT = 0.5  # the plugin client's per-call timeout in these tests


@pytest.fixture
def plugin_dir(tmp_path: Path) -> Path:
    d = tmp_path / "plugins"
    d.mkdir()
    return d


@pytest.fixture
def peer(plugin_dir: Path) -> Iterator[PeerPlugin]:
    p = PeerPlugin(kernel=True).serve_unix(str(plugin_dir / "peer.sock"))
    yield p
    p.stop()  # also deletes any bridge or veth it still holds


@pytest.fixture
def rctl(dirs: tuple[str, str], plugin_dir: Path, peer: PeerPlugin) -> Iterator[NetworkController]:
    with NetworkController(
        state_dir=dirs[0], run_dir=dirs[1], plugin_dirs=[str(plugin_dir)]
    ) as ctl:
        yield ctl
        peer.misbehaviours.clear()
        peer.release.set()
        with contextlib.suppress(Exception):
            for sb in ctl.sandboxes():
                with contextlib.suppress(Exception):
                    sb.delete()
            for net in ctl.networks():
                with contextlib.suppress(Exception):
                    ctl.delete_endpoints(net.endpoints(), force=True)
                with contextlib.suppress(Exception):
                    net.delete()


def snapshot(ctl: NetworkController, peer: PeerPlugin) -> dict[str, object]:
    """What a failed request must not change: store, kernel, and the plugin's state."""
    # Carrier settles asynchronously (link watch work): generous on a loaded machine.
    assert wait_until(
        lambda: not [n for n, v in links_here().items() if "NO-CARRIER" in v["flags"]],
        timeout=20.0,
    )
    return {
        "host": kernel_view(),
        "netns": netns_dir(ctl.run_dir),
        "sandboxes": {sb.key: kernel_view(sb.key) for sb in ctl.sandboxes()},
        "networks": sorted((n.name, n.id) for n in ctl.networks()),
        "endpoints": sorted(
            (n.name, e.name, e.id, str(e.ipv4_address), e.sandbox.id if e.sandbox else None)
            for n in ctl.networks()
            for e in n.endpoints()
        ),
        "store_sandboxes": sorted(sb.container_id for sb in ctl.sandboxes()),
        "peer_ipam": peer.ipam_state(),
        "peer_networks": sorted(peer.networks),
        "peer_endpoints": sorted(peer.endpoints),
        "peer_joined": sorted(peer.joined),
    }


def body(peer: PeerPlugin, method: str, index: int = -1) -> dict:
    return peer.calls(method)[index].body


def make_network(ctl: NetworkController):
    return ctl.create_network(
        "rnet", driver="peer", ipam_driver="peer", ipv4=[IPAMConfig(subnet=SUBNET)], options=COLOUR
    )


# --- the whole life of two containers on a remote network --------------------------------


def test_two_containers_talk_through_a_remote_network(rctl, peer) -> None:
    before = snapshot(rctl, peer)
    assert "peer" not in rctl.drivers()
    net = make_network(rctl)
    assert "peer" in rctl.drivers()
    assert peer.paths() == [
        "Plugin.Activate",
        "NetworkDriver.GetCapabilities",
        "IpamDriver.GetCapabilities",
        "IpamDriver.GetDefaultAddressSpaces",
        "IpamDriver.RequestPool",
        "IpamDriver.RequestAddress",
        "NetworkDriver.CreateNetwork",
    ]
    for empty in peer.requests[:4]:
        assert empty.raw == b"", empty.path
    assert body(peer, "IpamDriver.RequestPool") == {
        "AddressSpace": "peerlocal",
        "Pool": SUBNET,
        "SubPool": "",
        "Options": {},
        "V6": False,
    }
    assert body(peer, "IpamDriver.RequestAddress") == {
        "PoolID": f"peerlocal/{SUBNET}",
        "Address": "",
        "Options": {"RequestAddressType": "com.docker.network.gateway"},
    }
    assert body(peer, "NetworkDriver.CreateNetwork") == {
        "NetworkID": net.id,
        "Options": {
            "com.docker.network.generic": COLOUR,
            "com.docker.network.enable_ipv4": True,
            "com.docker.network.enable_ipv6": False,
            "com.docker.network.internal": False,
        },
        "IPv4Data": [{"AddressSpace": "peerlocal", "Pool": SUBNET, "Gateway": "10.123.0.1/24"}],
        "IPv6Data": [],
    }
    bridge = peer.networks[net.id]["bridge"]
    assert "10.123.0.1/24" in kernel_view()["addrs"][bridge]  # the plugin's own bridge

    peer.clear()
    a, b = net.create_endpoints(["a", "b"])
    assert [r.path for r in peer.requests] == [
        "/IpamDriver.RequestAddress",
        "/IpamDriver.RequestAddress",
        "/NetworkDriver.CreateEndpoint",
        "/NetworkDriver.CreateEndpoint",
    ]
    assert body(peer, "IpamDriver.RequestAddress", 0) == {
        "PoolID": f"peerlocal/{SUBNET}",
        "Address": "",
        "Options": {},
    }
    assert body(peer, "NetworkDriver.CreateEndpoint", 0) == {
        "NetworkID": net.id,
        "EndpointID": a.id,
        "Interface": {"Address": "10.123.0.2/24", "AddressIPv6": "", "MacAddress": ""},
        "Options": {},
    }
    # The plugin filled in the MAC address the request left empty.
    assert a.mac_address == peer.endpoints[a.id]["mac"]
    assert str(b.ipv4_address) == "10.123.0.3/24"

    peer.clear()
    keys = rctl.join_many([(a, "ca"), (b, "cb")])
    assert peer.paths() == [
        "NetworkDriver.Join",
        "NetworkDriver.Join",
        "NetworkDriver.ProgramExternalConnectivity",
        "NetworkDriver.ProgramExternalConnectivity",
    ]
    assert body(peer, "NetworkDriver.Join", 0) == {
        "NetworkID": net.id,
        "EndpointID": a.id,
        "SandboxKey": keys[0],
        "Options": {},
    }
    for ep, key in ((a, keys[0]), (b, keys[1])):
        links = ns_links(key)
        assert set(links) == {"lo", "eth0"}
        assert links["eth0"]["address"] == ep.mac_address
        assert "UP" in links["eth0"]["flags"]
        assert ns_addrs(key)["eth0"] == {str(ep.ipv4_address.ip)}
        routes = {(r["dst"], r.get("gateway")) for r in ns_routes(key)}
        assert ("default", "10.123.0.1") in routes
        assert ("198.51.123.0/24", "10.123.0.254") in routes
        # The plugin's host end is on the plugin's bridge; its peer left the host.
        host = peer.joined[ep.id]
        assert links_here()[host]["master"] == bridge
        assert f"pc{host[2:]}" not in links_here()
    assert both_pings(keys[0], b.ipv4_address.ip)
    assert both_pings(keys[1], a.ipv4_address.ip)
    assert both_pings(keys[0], "10.123.0.1")

    peer.clear()
    rctl.leave_many([(a, "ca"), (b, "cb")])
    assert peer.paths() == [
        "NetworkDriver.RevokeExternalConnectivity",
        "NetworkDriver.RevokeExternalConnectivity",
        "NetworkDriver.Leave",
        "NetworkDriver.Leave",
    ]
    assert body(peer, "NetworkDriver.Leave", 0) == {"NetworkID": net.id, "EndpointID": a.id}
    assert peer.joined == {} and netns_dir(rctl.run_dir) == []
    peer.clear()
    rctl.delete_endpoints([a, b])
    assert peer.paths() == [
        "NetworkDriver.DeleteEndpoint",
        "NetworkDriver.DeleteEndpoint",
        "IpamDriver.ReleaseAddress",
        "IpamDriver.ReleaseAddress",
    ]
    assert body(peer, "IpamDriver.ReleaseAddress", 0) == {
        "PoolID": f"peerlocal/{SUBNET}",
        "Address": "10.123.0.2",
    }
    peer.clear()
    net.delete()
    assert peer.paths() == [
        "NetworkDriver.DeleteNetwork",
        "IpamDriver.ReleaseAddress",
        "IpamDriver.ReleasePool",
    ]
    assert body(peer, "IpamDriver.ReleaseAddress") == {
        "PoolID": f"peerlocal/{SUBNET}",
        "Address": "10.123.0.1",
    }
    assert body(peer, "IpamDriver.ReleasePool") == {"PoolID": f"peerlocal/{SUBNET}"}
    assert snapshot(rctl, peer) == before


def test_a_sandbox_on_two_remote_networks_keeps_one_when_the_other_leaves(rctl, peer) -> None:
    net1 = make_network(rctl)
    net2 = rctl.create_network(
        "rnet2", driver="peer", ipam_driver="peer", ipv4=[IPAMConfig(subnet="10.124.0.0/24")]
    )
    a = net1.create_endpoint("a")
    b1, b2 = net1.create_endpoint("b1"), net2.create_endpoint("b2")
    c = net2.create_endpoint("c")
    a.join("ca")
    key_c = c.join("cc")
    key = b1.join("cb")
    assert b2.join("cb") == key
    addrs = ns_addrs(key)
    assert set(addrs) == {"lo", "eth0", "eth1"}
    assert (addrs["eth0"], addrs["eth1"]) == ({str(b1.ipv4_address.ip)}, {str(b2.ipv4_address.ip)})
    routes = {(r["dst"], r.get("gateway"), r.get("dev")) for r in ns_routes(key)}
    assert ("default", "10.123.0.1", "eth0") in routes  # the first endpoint's gateway only
    assert not [r for r in routes if r[0] == "default" and r[2] == "eth1"]
    assert ("198.51.124.0/24", "10.124.0.254", "eth1") in routes
    assert both_pings(key, a.ipv4_address.ip) and both_pings(key, c.ipv4_address.ip)
    b1.leave("cb")  # the sandbox stays with eth1
    assert set(ns_links(key)) == {"lo", "eth1"}
    assert b1.id not in peer.joined and b2.id in peer.joined
    assert both_pings(key, c.ipv4_address.ip)
    rctl.leave_many([(b2, "cb"), (a, "ca"), (c, "cc")])
    assert peer.joined == {} and key_c not in {sb.key for sb in rctl.sandboxes()}


def _write_lock_free(state_dir: str) -> bool:
    """Whether another connection could take the store's write lock right now."""
    db = sqlite3.connect(os.path.join(state_dir, "state.db"), timeout=0)
    try:
        db.execute("BEGIN IMMEDIATE")
        db.rollback()
        return True
    except sqlite3.OperationalError:
        return False
    finally:
        db.close()


def test_a_controller_started_later_finds_the_plugin_again(rctl, peer, dirs, plugin_dir) -> None:
    net = make_network(rctl)
    ep = net.create_endpoint("a")
    # The other controller meets the plugin first in the join: its handshake must not
    # run inside the store's write transaction (the join's port check).
    free: list[bool] = []
    real_activate = peer.do_Plugin_Activate

    def activate(body: dict) -> dict:
        free.append(_write_lock_free(dirs[0]))
        return real_activate(body)

    peer.do_Plugin_Activate = activate  # type: ignore[method-assign]
    with NetworkController(
        state_dir=dirs[0], run_dir=dirs[1], plugin_dirs=[str(plugin_dir)]
    ) as other:
        key = other.network("rnet").endpoint("a").join("ca")
        assert free == [True]
        assert ns_addrs(key)["eth0"] == {str(ep.ipv4_address.ip)}
        assert both_pings(key, "10.123.0.1")
        other.network("rnet").endpoint("a").leave("ca")
    assert peer.joined == {}


def test_unknown_plugin_names_are_not_found(rctl, peer) -> None:
    before = snapshot(rctl, peer)
    with pytest.raises(errors.DriverNotFound):
        rctl.create_network("x", driver="nobody", ipv4=[IPAMConfig(subnet=SUBNET)])
    with pytest.raises(errors.DriverNotFound):
        rctl.create_network("x", driver="null", ipam_driver="nobody")
    peer.implements = ["IpamDriver"]
    with pytest.raises(errors.DriverNotFound):  # found, but no network driver
        rctl.create_network("x", driver="peer")
    assert snapshot(rctl, peer) == before


def test_a_failure_after_the_plugins_join_is_undone_with_leave(rctl, peer) -> None:
    net = make_network(rctl)
    a, b = net.create_endpoints(["a", "b"])
    real = peer.do_NetworkDriver_Join

    def wrong_name(body: dict) -> dict:  # the veth is made, but another name is returned
        reply = real(body)
        if body["EndpointID"] == b.id:
            reply["InterfaceName"]["SrcName"] = "nosuchdev0"
        return reply

    peer.do_NetworkDriver_Join = wrong_name  # type: ignore[method-assign]
    before = snapshot(rctl, peer)
    peer.clear()
    with pytest.raises(errors.KernelError):  # moving "nosuchdev0" into the sandbox fails
        rctl.join_many([(a, "ca"), (b, "cb")])
    assert len(peer.calls("NetworkDriver.Join")) == 2
    assert len(peer.calls("NetworkDriver.Leave")) == 2  # both joins undone at the plugin
    assert snapshot(rctl, peer) == before


@contextlib.contextmanager
def _host_interface(kind: str) -> Iterator[str]:
    """An interface a buggy plugin could name: the loopback, or a dummy the host uses
    (an address on it, or a default route through it, in a table of its own); a veth
    pair here, as dummy devices may not be available."""
    if kind == "loopback":
        yield "lo"
        return
    name, peer_end = "pzhost0", "pzhost1"
    cmd = ["ip", "link", "add", name, "type", "veth", "peer", "name", peer_end]
    subprocess.run(cmd, check=True)
    try:
        for dev in (name, peer_end):
            subprocess.run(["ip", "link", "set", dev, "addrgenmode", "none", "up"], check=True)
        if kind == "address":
            subprocess.run(["ip", "addr", "add", "198.51.100.7/32", "dev", name], check=True)
        else:
            cmd = ["ip", "route", "add", "default", "dev", name, "table", "4242"]
            subprocess.run(cmd, check=True)
        yield name
    finally:
        subprocess.run(["ip", "link", "del", name], check=False)


@pytest.mark.parametrize("kind", ["loopback", "address", "default_route"])
def test_a_src_name_the_host_uses_is_refused_and_nothing_moves(rctl, peer, kind: str) -> None:
    """A plugin whose Join names a host interface (its SrcName) gets it refused before
    anything is moved: an UnsafeInterface, the join undone with Leave, the interface still
    on the host as it was."""
    net = make_network(rctl)
    a, b = net.create_endpoints(["a", "b"])
    with _host_interface(kind) as name:
        real = peer.do_NetworkDriver_Join

        def named(body: dict) -> dict:  # the plugin makes its veth, but names another
            reply = real(body)
            if body["EndpointID"] == b.id:
                reply["InterfaceName"]["SrcName"] = name
            return reply

        peer.do_NetworkDriver_Join = named  # type: ignore[method-assign]
        before = snapshot(rctl, peer)
        peer.clear()
        with pytest.raises(errors.UnsafeInterface) as info:
            rctl.join_many([(a, "ca"), (b, "cb")])
        assert info.value.interface == name
        want = {"loopback": "loopback", "address": "198.51.100.7", "default_route": "default"}
        assert want[kind] in info.value.reason
        assert len(peer.calls("NetworkDriver.Leave")) == 2  # both joins undone at the plugin
        assert snapshot(rctl, peer) == before  # the host kept `name`; no sandbox is left
        assert name in links_here()
        peer.do_NetworkDriver_Join = real  # type: ignore[method-assign]
        keys = rctl.join_many([(a, "ca"), (b, "cb")])  # a well-behaved join still works
        assert both_pings(keys[0], b.ipv4_address.ip)


# --- misbehaviours: a PluginError, and nothing changed -----------------------------------

KINDS = ("hang", "close", "garbage", "err", "500")
CASES = [
    *[("network", "IpamDriver.RequestPool", k, 0) for k in KINDS],
    *[("network", "IpamDriver.RequestAddress", k, 0) for k in KINDS],
    *[("network", "NetworkDriver.CreateNetwork", k, 0) for k in KINDS],
    *[("endpoint", "IpamDriver.RequestAddress", k, 1) for k in KINDS],
    *[("endpoint", "NetworkDriver.CreateEndpoint", k, 1) for k in (*KINDS, "change_address")],
    *[("join", "NetworkDriver.Join", k, 1) for k in (*KINDS, "bad_join")],
    *[("join", "NetworkDriver.ProgramExternalConnectivity", k, 1) for k in KINDS],
]


@pytest.mark.parametrize(
    ("stage", "method", "kind", "skip"), CASES, ids=[f"{m}-{k}" for _, m, k, _ in CASES]
)
def test_misbehaviour_is_a_plugin_error_and_changes_nothing(
    rctl, peer, stage: str, method: str, kind: str, skip: int
) -> None:
    net = a = b = None
    if stage != "network":
        net = make_network(rctl)
    if stage == "join":
        a, b = net.create_endpoints(["a", "b"])
    # Hangs must end in the client's timeout, not the engine's "never".
    rctl.registry.get("peer").client.timeout = TIMEOUT
    before = snapshot(rctl, peer)
    peer.misbehave(method, kind, skip=skip)  # `skip` calls succeed first: partial work
    peer.clear()
    with pytest.raises(errors.PluginError) as info:
        if stage == "network":
            make_network(rctl)
        elif stage == "endpoint":
            net.create_endpoints(["a", "b"])
        else:
            rctl.join_many([(a, "ca"), (b, "cb")])
    assert info.value.plugin == "peer" and info.value.method == method
    if kind == "hang":
        assert "timed out" in info.value.message
    peer.misbehave(method, None)
    assert snapshot(rctl, peer) == before
    if stage == "join":
        # Every join the plugin made was undone with Leave (after revoking connectivity).
        joins = len(peer.calls("NetworkDriver.Join"))
        made = joins - (0 if kind == "bad_join" else 1)
        if method == "NetworkDriver.ProgramExternalConnectivity":
            made = joins
        assert len(peer.calls("NetworkDriver.Leave")) == made
    # And the controller works again once the plugin does.
    if stage == "network":
        make_network(rctl)
    elif stage == "endpoint":
        assert [str(e.ipv4_address) for e in net.create_endpoints(["a", "b"])] == [
            "10.123.0.2/24",
            "10.123.0.3/24",
        ]
    else:
        keys = rctl.join_many([(a, "ca"), (b, "cb")])
        assert both_pings(keys[0], b.ipv4_address.ip)
