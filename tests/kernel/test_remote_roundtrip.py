"""The full round trip: cnm as the engine, cnm as the plugin.

Controller A (a NetworkController whose plugin directory is a temporary one) uses a
network with driver="cnm", ipam_driver="cnm": its RemoteDriver and RemoteIpam speak
spec/remote-protocol.md over a unix socket to `cnm plugin serve`, a child process with
its own store and run directory, whose bridge driver and default IPAM do the work. A
makes the sandboxes; the plugin leaves each container end of a veth pair on the host;
A moves it in, names it, addresses and routes it. Real ICMP between the sandboxes
proves the data path. The plugin is restarted (and crashed) midway; leave and delete
still work, and at the end both stores (A's and the plugin's) and the kernel are as
they were. Judged with `ip -j`, `nsenter ... ping` and sqlite3, next to cnm's osl.ping.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from cnm.control import IPAMConfig, NetworkController, errors
from tests.plugin_process import CnmPlugin, store_rows

from .oracles import (
    bridge_ports,
    kernel_view,
    links_here,
    netns_dir,
    ns_addrs,
    ns_links,
    ns_routes,
    nsfs_mounts,
    wait_until,
)
from .pings import both_pings

pytestmark = [pytest.mark.privileged, pytest.mark.usefixtures("_unmount_leftovers")]

SUBNET, GATEWAY = "10.131.0.0/24", "10.131.0.1"
EMPTY_STORE = dict.fromkeys(
    ("networks", "endpoints", "sandboxes", "ipam_pools", "ipam_addresses"), 0
)


@pytest.fixture
def plugin(tmp_path: Path) -> Iterator[CnmPlugin]:
    pdir = tmp_path / "plugins"
    pdir.mkdir()
    base = tmp_path / "plugin"
    base.mkdir()
    p = CnmPlugin(base, pdir).start()
    yield p
    p.stop()


@pytest.fixture
def actl(dirs: tuple[str, str], plugin: CnmPlugin) -> Iterator[NetworkController]:
    with NetworkController(
        state_dir=dirs[0], run_dir=dirs[1], plugin_dirs=[str(plugin.plugin_dir)]
    ) as ctl:
        yield ctl
        if plugin.proc is None:
            plugin.start()
        with contextlib.suppress(Exception):
            for sb in ctl.sandboxes():
                with contextlib.suppress(Exception):
                    sb.delete()
            for net in ctl.networks():
                with contextlib.suppress(Exception):
                    ctl.delete_endpoints(net.endpoints(), force=True)
                with contextlib.suppress(Exception):
                    net.delete()


def plugin_bridge() -> str:
    """The one bridge the plugin made (its bridge driver names it br-<id>)."""
    (name,) = [n for n, v in links_here().items() if n.startswith("br-") and v.get("linkinfo")]
    return name


def host_view() -> dict[str, object]:
    """The host's links and addresses, once deferred deletions are done."""
    assert wait_until(lambda: not [n for n in links_here() if n.startswith(("vc", "cnm"))], 5)
    return kernel_view()


def assert_joined(key: str, ep) -> None:
    links = ns_links(key)
    assert set(links) == {"lo", "eth0"}, links
    assert links["eth0"]["address"] == ep.mac_address
    assert "UP" in links["eth0"]["flags"]
    assert ns_addrs(key)["eth0"] == {str(ep.ipv4_address.ip)}
    assert {(r["dst"], r.get("gateway")) for r in ns_routes(key)} >= {("default", GATEWAY)}


def test_cnm_drives_cnms_own_plugin_end_to_end(
    actl: NetworkController, plugin: CnmPlugin, tmp_path: Path
) -> None:
    before = host_view()
    net = actl.create_network(
        "rt", driver="cnm", ipam_driver="cnm", ipv4=[IPAMConfig(subnet=SUBNET)]
    )
    # A's record: the plugin's pool id, in the plugin's address space.
    [pool] = net._rec.ipv4
    assert (pool.pool_id, pool.address_space) == (f"LocalDefault/{SUBNET}", "LocalDefault")
    assert pool.gateway == f"{GATEWAY}/24"
    # The plugin's store: a bridge network named by A's network id, the pool counted once.
    assert plugin.network_names() == [net.id]
    assert list(plugin.pool_refs()) == [pool.pool_id]
    bridge = plugin_bridge()
    assert [a for a in kernel_view()["addrs"][bridge] if ":" not in a] == [f"{GATEWAY}/24"]

    a, b = net.create_endpoints(["a", "b"])
    assert (str(a.ipv4_address), str(b.ipv4_address)) == ("10.131.0.2/24", "10.131.0.3/24")
    # The plugin filled in the MAC address A left empty: 02:42 + the address.
    assert a.mac_address == "02:42:0a:83:00:02"
    assert plugin.endpoint_names() == sorted([a.id, b.id])

    keys = actl.join_many([(a, "ca"), (b, "cb")])
    for ep, key in ((a, keys[0]), (b, keys[1])):
        assert_joined(key, ep)
    ports = bridge_ports()
    assert sorted(n for n, p in ports.items() if p.get("master") == bridge) == sorted(
        n for n in links_here() if n.startswith("vc")
    )
    assert len([n for n in links_here() if n.startswith("vc")]) == 2
    assert not [n for n in links_here() if n.startswith("cnm")]  # both moved into sandboxes
    assert both_pings(keys[0], b.ipv4_address.ip)
    assert both_pings(keys[1], a.ipv4_address.ip)
    assert both_pings(keys[0], GATEWAY)

    # The plugin crashes: the data path is the kernel's and keeps working.
    plugin.stop(signal.SIGKILL)
    assert plugin.socket.exists()  # a crash leaves its socket behind
    assert both_pings(keys[1], a.ipv4_address.ip)
    # A leave while the plugin is down waits (the client's backoff) until it is back.
    # The client's backoff sleep is where the wait shows: the first one reports that the
    # call could not connect, and holds the leave there until the plugin is back.
    client = actl.registry.get("cnm").client
    real_sleep = client._sleep
    retrying, resume = threading.Event(), threading.Event()
    delays: list[float] = []

    def backoff(delay: float) -> None:
        delays.append(delay)
        if not retrying.is_set():
            retrying.set()
            assert resume.wait(60)
        real_sleep(delay)

    client._sleep = backoff
    left: list[BaseException | None] = []

    def leave_a() -> None:
        try:
            actl.leave_many([(a, "ca")])
            left.append(None)
        except BaseException as exc:
            left.append(exc)

    worker = threading.Thread(target=leave_a)
    try:
        worker.start()
        assert retrying.wait(30), "the leave never tried the plugin"
        # The call failed to connect and is in its first backoff: still blocked.
        assert worker.is_alive() and left == [] and delays == [1.0]
        plugin.start()  # replaces the stale socket
    finally:
        resume.set()
        worker.join(60)
        client._sleep = real_sleep
    assert left == [None]
    assert keys[0] not in {sb.key for sb in actl.sandboxes()}
    assert netns_dir(actl.run_dir) == [Path(keys[1]).name]
    assert wait_until(lambda: len([n for n in links_here() if n.startswith("vc")]) == 1, 5)
    assert both_pings(keys[1], GATEWAY)

    # After a clean restart too, a new container joins and talks to the one that stayed.
    plugin.stop()
    plugin.start()
    c = net.create_endpoint("c")
    key_c = c.join("cc")
    assert_joined(key_c, c)
    assert both_pings(key_c, b.ipv4_address.ip)
    assert both_pings(keys[1], c.ipv4_address.ip)

    actl.leave_many([(b, "cb"), (c, "cc")])
    actl.delete_endpoints([a, b, c])
    assert plugin.endpoint_names() == []
    net.delete()

    # Both stores and the kernel are as they were.
    assert actl.networks() == [] and actl.sandboxes() == []
    assert store_rows(actl.state_dir) == EMPTY_STORE
    assert plugin.store_rows() == EMPTY_STORE
    assert plugin.pool_refs() == {}
    assert netns_dir(actl.run_dir) == []
    assert nsfs_mounts(tmp_path) == {}
    assert host_view() == before


def test_a_plugin_side_refusal_changes_nothing_anywhere(
    actl: NetworkController, plugin: CnmPlugin
) -> None:
    """A request cnm's plugin refuses is a PluginError at A, and the pool A's IPAM
    request took at the plugin is given back."""
    before = host_view()
    with pytest.raises(errors.PluginError) as info:
        actl.create_network(
            "bad",
            driver="cnm",
            ipam_driver="cnm",
            ipv4=[IPAMConfig(subnet=SUBNET)],
            options={"com.docker.network.driver.mtu": "lots"},
        )
    assert info.value.method == "NetworkDriver.CreateNetwork"
    assert "mtu" in info.value.message
    assert store_rows(actl.state_dir) == EMPTY_STORE
    assert plugin.store_rows() == EMPTY_STORE and plugin.pool_refs() == {}
    assert host_view() == before
    # The same network without the bad option works, and goes away cleanly.
    net = actl.create_network(
        "bad", driver="cnm", ipam_driver="cnm", ipv4=[IPAMConfig(subnet=SUBNET)]
    )
    key = net.create_endpoint("a").join("ca")
    assert both_pings(key, GATEWAY)
    actl.delete_endpoints(net.endpoints(), force=True)
    net.delete()
    assert plugin.pool_refs() == {} and host_view() == before
