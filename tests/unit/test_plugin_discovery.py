"""Plugin discovery, the handshake and the client's error semantics, against the peer.

The peer (tests/plugin_peer.py) is an independent plugin on a unix socket (or TCP) in a
temporary directory; nothing here needs root or touches the real plugin directories.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cnm.control import IPAMConfig, NetworkController, errors
from cnm.control.driverapi import (
    EndpointInfo,
    GatewayAllocationCheck,
    HostJoin,
    InterfaceInfo,
    NetworkInfo,
    PortLimit,
    SandboxInfo,
    implements,
)
from cnm.control.drivers.remote import RemoteDriver, RemoteOptions, remote_driver
from cnm.control.ipam.api import PoolRequest
from cnm.control.ipam.remote import MAC_ADDRESS_OPTION, RemoteIpam, remote_ipam
from cnm.control.plugins import ACCEPT, RETRY_DELAYS, PluginClient, Plugins, find_spec
from cnm.control.types import PoolData
from tests.plugin_peer import PeerPlugin
from tests.store_probe import write_lock_free

FAST = (0.01, 0.02, 0.04)  # backoff for tests: three retries, 70 ms in all


def v4(subnet: str) -> IPAMConfig:
    return IPAMConfig(subnet=subnet)


@pytest.fixture
def pdir(tmp_path: Path) -> Path:
    d = tmp_path / "plugins"
    d.mkdir()
    return d


@pytest.fixture
def peer(pdir: Path) -> Iterator[PeerPlugin]:
    p = PeerPlugin().serve_unix(str(pdir / "peer.sock"))
    yield p
    p.stop()


def plugins(*dirs: Path, timeout: float = 2.0) -> Plugins:
    return Plugins([str(d) for d in dirs], timeout=timeout, retry_delays=FAST)


def client(path: Path, timeout: float = 2.0, **kw) -> PluginClient:
    spec = find_spec(path.stem, [str(path.parent)])
    assert spec is not None
    return PluginClient(spec, timeout=timeout, retry_delays=kw.pop("retry_delays", FAST), **kw)


def listening_socket(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.listen(4)
    return s


# --- discovery ---------------------------------------------------------------------------


def test_socket_then_subdirectory_socket_then_spec_files(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    (a / "p").mkdir(parents=True)
    (b / "p").mkdir(parents=True)
    (a / "p.spec").write_text("tcp://127.0.0.1:9\n")
    (b / "p.json").write_text(json.dumps({"Name": "p", "Addr": "tcp://127.0.0.1:8"}))
    assert find_spec("p", [str(a), str(b)]).addr == "tcp://127.0.0.1:9"
    # A socket in any directory wins over every spec file.
    with listening_socket(b / "p" / "p.sock"):
        spec = find_spec("p", [str(a), str(b)])
        assert spec.addr == f"unix://{b}/p/p.sock" and spec.source == str(b / "p" / "p.sock")
        with listening_socket(b / "p.sock"):
            assert find_spec("p", [str(a), str(b)]).addr == f"unix://{b}/p.sock"
            with listening_socket(a / "p" / "p.sock"):
                assert find_spec("p", [str(a), str(b)]).addr == f"unix://{a}/p/p.sock"


def test_spec_and_json_formats(tmp_path: Path) -> None:
    (tmp_path / "u.spec").write_text("unix:///run/other/u.sock\n")
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "t.spec").write_text("  tcp://192.0.2.7:8080 ")
    (tmp_path / "j.json").write_text(
        json.dumps(
            {
                "Name": "whatever",
                "Addr": "tcp://192.0.2.8:443",
                "TLSConfig": {
                    "InsecureSkipVerify": True,
                    "CAFile": "/etc/ca.pem",
                    "CertFile": "/etc/cert.pem",
                    "KeyFile": "/etc/key.pem",
                },
            }
        )
    )
    u = find_spec("u", [str(tmp_path)])
    assert (u.addr, u.scheme, u.socket_path, u.tls) == (
        "unix:///run/other/u.sock",
        "unix",
        "/run/other/u.sock",
        None,
    )
    t = find_spec("t", [str(tmp_path)])
    assert t.addr == "tcp://192.0.2.7:8080" and t.host_port == ("192.0.2.7", 8080)
    j = find_spec("j", [str(tmp_path)])
    assert j.name == "j" and j.host_port == ("192.0.2.8", 443)
    assert j.tls is not None and j.tls.insecure_skip_verify and j.tls.key_file == "/etc/key.pem"


@pytest.mark.parametrize(
    ("file", "content", "needle"),
    [
        ("x.spec", "", "no plugin address"),
        ("x.spec", "ftp://host:21", "unknown protocol"),
        ("x.spec", "/just/a/path.sock", "unknown protocol"),
        ("x.spec", "tcp://hostonly", "host:port"),
        ("x.json", "{not json", "not JSON"),
        ("x.json", "[1, 2]", "JSON object"),
        ("x.json", '{"Name": "x"}', "no plugin address"),
        ("x.json", '{"Addr": "tcp://h:1", "TLSConfig": {"CAFile": 7}}', "malformed TLSConfig"),
    ],
)
def test_broken_spec_files_are_typed_errors(
    tmp_path: Path, file: str, content: str, needle: str
) -> None:
    (tmp_path / file).write_text(content)
    with pytest.raises(errors.PluginError, match=needle) as info:
        find_spec("x", [str(tmp_path)])
    assert info.value.plugin == "x" and info.value.method == "discovery"


def test_not_found_and_names_that_are_no_file_names(tmp_path: Path) -> None:
    (tmp_path / "plain.sock").write_text("a regular file, not a socket")
    assert find_spec("plain", [str(tmp_path)]) is None
    assert find_spec("missing", [str(tmp_path), str(tmp_path / "nope")]) is None
    for bad in ("../etc", "a/b", "", ".hidden", 7):
        assert find_spec(bad, [str(tmp_path)]) is None  # type: ignore[arg-type]


# --- the handshake and the wire ------------------------------------------------------------


def test_activate_sends_an_empty_post_with_the_engines_accept_header(
    pdir: Path, peer: PeerPlugin
) -> None:
    found = plugins(pdir).get("peer")
    assert found is not None and found.implements == ("NetworkDriver", "IpamDriver")
    [req] = peer.calls("Plugin.Activate")
    assert req.raw == b"" and req.headers["Content-Length"] == "0"
    assert req.headers["Accept"] == ACCEPT == "application/vnd.docker.plugins.v1.2+json"
    assert "Content-Type" not in req.headers


def test_activation_is_cached_and_subsystems_are_checked(pdir: Path, peer: PeerPlugin) -> None:
    reg = plugins(pdir)
    assert reg.get("peer", "NetworkDriver") is reg.get("peer", "IpamDriver")
    assert reg.get("peer", "VolumeDriver") is None
    assert len(peer.calls("Plugin.Activate")) == 1 and reg.active() == ["peer"]
    assert reg.get("absent") is None


def test_malformed_activation_reply(pdir: Path, peer: PeerPlugin) -> None:
    peer.implements = "NetworkDriver"  # type: ignore[assignment]
    with pytest.raises(errors.PluginError, match="Implements must be a list"):
        plugins(pdir).get("peer")


def test_tcp_plugin_through_a_spec_file(pdir: Path) -> None:
    peer = PeerPlugin()
    host, port = peer.serve_tcp()
    try:
        (pdir / "tcppeer.spec").write_text(f"tcp://{host}:{port}\n")
        found = plugins(pdir).get("tcppeer", "IpamDriver")
        assert found is not None
        ipam = RemoteIpam(found)
        assert ipam.default_address_spaces() == ("peerlocal", "peerglobal")
    finally:
        peer.stop()


# --- error semantics -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "needle"),
    [
        ("close", "connection closed without a reply"),
        ("garbage", "reply is not JSON"),
        ("err", "the peer refuses"),
        ("500", "HTTP 500: the peer broke"),
        ("404", "HTTP 404: 404 page not found"),
    ],
)
def test_each_misbehaviour_is_a_plugin_error(
    pdir: Path, peer: PeerPlugin, kind: str, needle: str
) -> None:
    c = client(pdir / "peer.sock")
    peer.misbehave("NetworkDriver.Leave", kind)
    with pytest.raises(errors.PluginError, match=needle) as info:
        c.call("NetworkDriver.Leave", {"NetworkID": "n", "EndpointID": "e"})
    assert (info.value.plugin, info.value.method) == ("peer", "NetworkDriver.Leave")
    # A call that reached the plugin is not retried.
    assert len(peer.calls("NetworkDriver.Leave")) == 1


def test_a_hanging_plugin_times_out(pdir: Path, peer: PeerPlugin) -> None:
    c = client(pdir / "peer.sock", timeout=0.3)
    peer.misbehave("NetworkDriver.Join", "hang")
    start = time.monotonic()
    with pytest.raises(errors.PluginError, match="timed out"):
        c.call("NetworkDriver.Join", {})
    assert 0.25 < time.monotonic() - start < 3
    assert len(peer.calls("NetworkDriver.Join")) == 1


def test_json_that_is_not_an_object(pdir: Path, peer: PeerPlugin) -> None:
    peer.do_NetworkDriver_Leave = lambda body: [1, 2]  # type: ignore[method-assign]
    with pytest.raises(errors.PluginError, match="not a JSON object: list"):
        client(pdir / "peer.sock").call("NetworkDriver.Leave", {})


def test_404_is_tolerated_only_where_asked(pdir: Path, peer: PeerPlugin) -> None:
    c = client(pdir / "peer.sock")
    peer.unimplemented = {"NetworkDriver.ProgramExternalConnectivity"}
    assert c.call("NetworkDriver.ProgramExternalConnectivity", {}, missing_ok=True) is None
    with pytest.raises(errors.PluginError, match="HTTP 404"):
        c.call("NetworkDriver.ProgramExternalConnectivity", {})


def test_connection_failures_are_retried_with_the_engines_backoff(pdir: Path) -> None:
    path = pdir / "dead.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))  # bound, never listening: every connect is refused
    slept: list[float] = []
    try:
        c = client(path, retry_delays=RETRY_DELAYS, sleep=slept.append)
        with pytest.raises(errors.PluginError, match="after 6 attempts") as info:
            c.call("Plugin.Activate")
        assert info.value.method == "Plugin.Activate"
    finally:
        s.close()
    assert slept == [1.0, 2.0, 4.0, 8.0, 16.0] and sum(slept) < 32


def test_a_plugin_that_comes_up_late_is_reached_by_a_retry(pdir: Path) -> None:
    path = pdir / "late.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    c = client(path, retry_delays=(0.05, 0.1, 0.2, 0.4))
    s.close()
    os.unlink(path)
    peer = PeerPlugin()
    starter = threading.Timer(0.1, peer.serve_unix, args=(str(path),))
    starter.start()
    try:
        assert c.activate() == ["NetworkDriver", "IpamDriver"]
    finally:
        starter.join()
        peer.stop()


# --- the remote driver over the wire ---------------------------------------------------------


def driver(pdir: Path) -> RemoteDriver:
    found = plugins(pdir).get("peer", "NetworkDriver")
    assert found is not None
    return RemoteDriver(found)


@pytest.mark.parametrize(
    ("scope", "conn", "want"),
    [("local", None, ("local", "local")), ("global", "local", ("global", "local"))],
)
def test_capabilities(pdir: Path, peer: PeerPlugin, scope, conn, want) -> None:
    peer.scope, peer.connectivity_scope = scope, conn
    drv = driver(pdir)
    assert (drv.capability.data_scope, drv.capability.connectivity_scope) == want
    assert peer.calls("NetworkDriver.GetCapabilities")[0].raw == b""


@pytest.mark.parametrize(
    ("scope", "conn"),
    [("galactic", None), ("local", "everywhere"), ("swarm", None), ("local", "swarm")],
)
def test_unknown_scope_fails_registration(pdir: Path, peer: PeerPlugin, scope, conn) -> None:
    peer.scope, peer.connectivity_scope = scope, conn
    with pytest.raises(errors.PluginError, match="invalid") as info:
        driver(pdir)
    assert info.value.method == "NetworkDriver.GetCapabilities"


def test_resolver_finds_only_network_drivers(pdir: Path, peer: PeerPlugin) -> None:
    peer.implements = ["IpamDriver"]
    assert remote_driver(plugins(pdir), "peer") is None
    assert remote_ipam(plugins(pdir), "peer") is not None


def test_options_pass_through_untouched() -> None:
    opts = RemoteOptions.parse({"com.example.x": "1", "com.docker.network.driver.mtu": "9000"})
    assert opts.values == {"com.example.x": "1", "com.docker.network.driver.mtu": "9000"}
    with pytest.raises(errors.InvalidParameter):
        RemoteOptions.parse({"k": 1})  # type: ignore[dict-item]


def test_create_network_and_endpoint_requests_are_exact(pdir: Path, peer: PeerPlugin) -> None:
    drv = driver(pdir)
    info = NetworkInfo(
        id="n" * 64,
        name="net",
        options=RemoteOptions.parse({"com.example.colour": "blue"}),
        # A pool id is the IPAM's own string: the address space is kept beside it, not
        # parsed out of it (the engine's trace has space "fklocal", pool id "fk/...").
        ipv4=(
            PoolData(
                "fk/10.9.0.0/24",
                "10.9.0.0/24",
                "10.9.0.1/24",
                None,
                {"r": "10.9.0.9/24"},
                address_space="fklocal",
            ),
        ),
        # A record written before the address space was kept: the key is left out.
        ipv6=(PoolData("LocalDefault/fd00:9::/64", "fd00:9::/64", None, None, {}),),
        enable_ipv6=True,
    )
    drv.create_network(info)
    [req] = peer.calls("NetworkDriver.CreateNetwork")
    assert req.body == {
        "NetworkID": "n" * 64,
        "Options": {
            "com.docker.network.generic": {"com.example.colour": "blue"},
            "com.docker.network.enable_ipv4": True,
            "com.docker.network.enable_ipv6": True,
            "com.docker.network.internal": False,
        },
        "IPv4Data": [
            {
                "AddressSpace": "fklocal",
                "Pool": "10.9.0.0/24",
                "Gateway": "10.9.0.1/24",
                "AuxAddresses": {"r": "10.9.0.9/24"},
            }
        ],
        "IPv6Data": [{"Pool": "fd00:9::/64"}],
    }
    iface = InterfaceInfo(ipaddress.ip_interface("10.9.0.2/24"), None, None)
    got = drv.create_endpoint(EndpointInfo("e" * 64, "ep", "n" * 64, iface, {"k": "v"}))
    [req] = peer.calls("NetworkDriver.CreateEndpoint")
    assert req.body == {
        "NetworkID": "n" * 64,
        "EndpointID": "e" * 64,
        "Interface": {"Address": "10.9.0.2/24", "AddressIPv6": "", "MacAddress": ""},
        "Options": {"k": "v"},
    }
    assert got is not None and got.mac_address == peer.endpoints["e" * 64]["mac"]
    assert got.ipv4_address is None  # only the field the request left empty
    join = drv.join("n" * 64, "e" * 64, SandboxInfo("s", "/run/x/netns/s", "c"))
    [req] = peer.calls("NetworkDriver.Join")
    assert req.body == {
        "NetworkID": "n" * 64,
        "EndpointID": "e" * 64,
        "SandboxKey": "/run/x/netns/s",
        "Options": {"k": "v"},
    }
    assert join.src_name and join.src_name.startswith("pc") and not join.in_sandbox
    assert join.dst_prefix == "eth" and str(join.gateway) == "10.9.0.1"
    [route] = join.static_routes
    assert (route.destination, route.route_type, str(route.next_hop)) == (
        "198.51.9.0/24",
        0,
        "10.9.0.254",
    )
    assert drv.endpoint_oper_info("n" * 64, "e" * 64) == {"peer.mac": got.mac_address}


def test_endpoint_reply_changing_a_set_field_is_refused_and_the_endpoint_deleted(
    pdir: Path, peer: PeerPlugin
) -> None:
    drv = driver(pdir)
    drv.create_network(NetworkInfo("n" * 64, "net", RemoteOptions.parse({}), (), ()))
    peer.misbehave("NetworkDriver.CreateEndpoint", "change_address")
    iface = InterfaceInfo(ipaddress.ip_interface("10.123.0.2/24"), None, None)
    with pytest.raises(errors.PluginError, match="already set") as info:
        drv.create_endpoint(EndpointInfo("e" * 64, "ep", "n" * 64, iface, {}))
    assert info.value.method == "NetworkDriver.CreateEndpoint"
    [req] = peer.calls("NetworkDriver.DeleteEndpoint")
    assert req.body == {"NetworkID": "n" * 64, "EndpointID": "e" * 64}
    assert peer.endpoints == {}
    drv.delete_endpoint("n" * 64, "e" * 64)  # the controller's rollback: nothing sent twice
    assert len(peer.calls("NetworkDriver.DeleteEndpoint")) == 1


@pytest.mark.parametrize("name", [".", "..", "a b", "eth0:1", "x" * 16, "é" * 8, "a\x00b"])
def test_a_src_name_that_is_no_interface_name_is_refused(
    pdir: Path, peer: PeerPlugin, name: str
) -> None:
    drv = driver(pdir)
    drv.create_network(NetworkInfo("n" * 64, "net", RemoteOptions.parse({}), (), ()))
    drv.create_endpoint(EndpointInfo("e" * 64, "ep", "n" * 64, InterfaceInfo(), {}))
    real = peer.do_NetworkDriver_Join

    def named(body: dict) -> dict:
        reply = real(body)
        reply["InterfaceName"]["SrcName"] = name
        return reply

    peer.do_NetworkDriver_Join = named  # type: ignore[method-assign]
    with pytest.raises(errors.PluginError, match="is not an interface name"):
        drv.join("n" * 64, "e" * 64, SandboxInfo("s", "/k", "c"))
    assert len(peer.calls("NetworkDriver.Leave")) == 1 and peer.joined == {}


def test_opt_in_features_are_protocols(pdir: Path, peer: PeerPlugin) -> None:
    """The remote driver asks GwAllocCheck through GatewayAllocationCheck; it has no port
    limit and cannot join on the host (the plugin owns its devices)."""
    drv = driver(pdir)
    assert implements(drv, GatewayAllocationCheck)
    assert not implements(drv, PortLimit) and not implements(drv, HostJoin)


def test_an_unusable_join_reply_is_undone_with_leave(pdir: Path, peer: PeerPlugin) -> None:
    drv = driver(pdir)
    drv.create_network(NetworkInfo("n" * 64, "net", RemoteOptions.parse({}), (), ()))
    drv.create_endpoint(EndpointInfo("e" * 64, "ep", "n" * 64, InterfaceInfo(), {}))
    peer.misbehave("NetworkDriver.Join", "bad_join")
    with pytest.raises(errors.PluginError, match="not-an-ip"):
        drv.join("n" * 64, "e" * 64, SandboxInfo("s", "/k", "c"))
    assert len(peer.calls("NetworkDriver.Leave")) == 1 and peer.joined == {}


def test_external_connectivity_tolerates_404_only(pdir: Path, peer: PeerPlugin) -> None:
    drv = driver(pdir)
    peer.unimplemented = {
        "NetworkDriver.ProgramExternalConnectivity",
        "NetworkDriver.RevokeExternalConnectivity",
        "NetworkDriver.Leave",
    }
    drv.program_external_connectivity("n", "e", {"o": "1"})
    drv.revoke_external_connectivity("n", "e")
    assert peer.calls("NetworkDriver.ProgramExternalConnectivity")[0].body == {
        "NetworkID": "n",
        "EndpointID": "e",
        "Options": {"o": "1"},
    }
    with pytest.raises(errors.PluginError, match="HTTP 404"):
        drv.leave("n", "e")


def test_discovery_is_forwarded_only_for_nodes_and_global_drivers(
    pdir: Path, peer: PeerPlugin
) -> None:
    peer.unimplemented = {"NetworkDriver.DiscoverNew"}  # any call would fail with 404
    driver(pdir).discover_new(1, {"Address": "192.0.2.1", "BindAddress": "", "Self": True})
    assert peer.calls("NetworkDriver.DiscoverNew") == []
    peer.scope = "global"
    peer.unimplemented = set()
    peer.do_NetworkDriver_DiscoverNew = lambda body: {}  # type: ignore[attr-defined]
    drv = driver(pdir)
    drv.discover_new(2, {})
    drv.discover_new(1, {"Address": "192.0.2.1", "BindAddress": "192.0.2.1", "Self": True})
    [req] = peer.calls("NetworkDriver.DiscoverNew")
    assert req.body == {
        "DiscoveryType": 1,
        "DiscoveryData": {"Address": "192.0.2.1", "BindAddress": "192.0.2.1", "Self": True},
    }


# --- remote IPAM over the wire -------------------------------------------------------------


def ipam(pdir: Path) -> RemoteIpam:
    found = plugins(pdir).get("peer", "IpamDriver")
    assert found is not None
    return RemoteIpam(found)


def test_ipam_requests_are_exact(pdir: Path, peer: PeerPlugin) -> None:
    ip = ipam(pdir)
    assert ip.default_address_spaces() == ("peerlocal", "peerglobal")
    assert ip.default_address_spaces() == ("peerlocal", "peerglobal")  # asked once
    assert len(peer.calls("IpamDriver.GetDefaultAddressSpaces")) == 1
    assert peer.calls("IpamDriver.GetDefaultAddressSpaces")[0].raw == b""
    assert peer.calls("IpamDriver.GetCapabilities")[0].raw == b""
    res = ip.request_pool(
        PoolRequest(
            "peerlocal",
            ipaddress.ip_network("10.7.0.0/24"),
            ipaddress.ip_network("10.7.0.128/25"),
            {"o": "1"},
        )
    )
    assert (res.pool_id, str(res.pool)) == ("peerlocal/10.7.0.0/24", "10.7.0.0/24")
    assert peer.calls("IpamDriver.RequestPool")[0].body == {
        "AddressSpace": "peerlocal",
        "Pool": "10.7.0.0/24",
        "SubPool": "10.7.0.128/25",
        "Options": {"o": "1"},
        "V6": False,
    }
    gw = ip.request_address(res.pool_id, None, {"RequestAddressType": "com.docker.network.gateway"})
    assert str(gw) == "10.7.0.1/24"
    assert peer.calls("IpamDriver.RequestAddress")[0].body == {
        "PoolID": "peerlocal/10.7.0.0/24",
        "Address": "",
        "Options": {"RequestAddressType": "com.docker.network.gateway"},
    }
    want = ipaddress.ip_address("10.7.0.77")
    assert str(ip.request_address(res.pool_id, want)) == "10.7.0.77/24"
    ip.release_address(res.pool_id, want)
    assert peer.calls("IpamDriver.ReleaseAddress")[0].body == {
        "PoolID": "peerlocal/10.7.0.0/24",
        "Address": "10.7.0.77",
    }
    ip.release_address(res.pool_id, gw.ip)
    ip.release_pool(res.pool_id)
    assert peer.calls("IpamDriver.ReleasePool")[0].body == {"PoolID": "peerlocal/10.7.0.0/24"}
    assert peer.ipam_state() == {}


def test_ipam_errors_come_in_the_error_field(pdir: Path, peer: PeerPlugin) -> None:
    ip = ipam(pdir)
    with pytest.raises(errors.PluginError, match="no pool nope") as info:
        ip.request_address("nope")
    assert info.value.method == "IpamDriver.RequestAddress"
    peer.misbehave("IpamDriver.ReleasePool", "err")
    with pytest.raises(errors.PluginError, match="the peer refuses"):
        ip.release_pool("x")


def test_ipam_without_capabilities(pdir: Path, peer: PeerPlugin) -> None:
    peer.misbehave("IpamDriver.GetCapabilities", "404")
    ip = ipam(pdir)
    assert ip.requires_mac_address is False
    peer.do_IpamDriver_GetCapabilities = lambda b: {"RequiresMACAddress": True}  # type: ignore
    peer.misbehave("IpamDriver.GetCapabilities", None)
    assert ipam(pdir).requires_mac_address is True


def test_ipam_bad_replies_are_refused_and_given_back(pdir: Path, peer: PeerPlugin) -> None:
    ip = ipam(pdir)
    res = ip.request_pool(PoolRequest("peerlocal", ipaddress.ip_network("10.8.0.0/24")))
    real = peer.do_IpamDriver_RequestAddress

    def bare(body: dict) -> dict:
        reply = real(body)
        return {**reply, "Address": reply["Address"].split("/")[0]}

    peer.do_IpamDriver_RequestAddress = bare  # type: ignore[method-assign]
    with pytest.raises(errors.PluginError, match="CIDR"):
        ip.request_address(res.pool_id)
    assert peer.ipam_state() == {res.pool_id: (1, [])}  # released again
    with pytest.raises(errors.PluginError, match="not IPv6"):
        ip.request_pool(PoolRequest("peerlocal", None, v6=True))
    assert peer.ipam_state() == {res.pool_id: (1, [])}


# --- the controller with a remote driver and IPAM (no kernel work) ------------------------

SUBNET = "10.77.0.0/24"


@pytest.fixture
def rctl(dirs: tuple[str, str], pdir: Path, peer: PeerPlugin) -> Iterator[NetworkController]:
    with NetworkController(state_dir=dirs[0], run_dir=dirs[1], plugin_dirs=[str(pdir)]) as ctl:
        yield ctl
        peer.misbehaviours.clear()
        peer.release.set()


def test_the_address_space_travels_with_the_pool(
    rctl: NetworkController, dirs: tuple[str, str], pdir: Path, peer: PeerPlugin
) -> None:
    """IPAMData.AddressSpace is the space the pool was requested in, whatever the IPAM's
    pool ids look like; it is kept in the store with the pool."""
    peer.pool_prefix = "pk"  # pool ids "pk/10.77.0.0/24" in space "peerlocal"
    net = rctl.create_network("n", driver="peer", ipam_driver="peer", ipv4=[v4(SUBNET)])
    [req] = peer.calls("NetworkDriver.CreateNetwork")
    assert req.body["IPv4Data"] == [
        {"AddressSpace": "peerlocal", "Pool": SUBNET, "Gateway": "10.77.0.1/24"}
    ]
    assert peer.calls("IpamDriver.RequestAddress")[0].body["PoolID"] == f"pk/{SUBNET}"
    with NetworkController(state_dir=dirs[0], run_dir=dirs[1], plugin_dirs=[str(pdir)]) as other:
        [pool] = other.store.network_by_id(net.id).ipv4
    assert (pool.pool_id, pool.address_space) == (f"pk/{SUBNET}", "peerlocal")
    net.delete()
    assert peer.ipam_state() == {}


def test_gw_alloc_check_is_asked_first_and_followed(
    rctl: NetworkController, peer: PeerPlugin
) -> None:
    """A GwAllocChecker plugin is asked before any address is requested; a skipped
    gateway is not requested (unless the user chose one), and no Gateway is sent."""
    peer.skip_gateway = (True, False)
    rctl.create_network(
        "n", driver="peer", ipam_driver="peer", ipv4=[v4(SUBNET)], options={"k": "v"}
    )
    assert peer.paths()[:6] == [
        "Plugin.Activate",
        "NetworkDriver.GetCapabilities",
        "IpamDriver.GetCapabilities",
        "NetworkDriver.GwAllocCheck",
        "IpamDriver.GetDefaultAddressSpaces",
        "IpamDriver.RequestPool",
    ]
    assert peer.calls("NetworkDriver.GwAllocCheck")[0].body == {
        "Options": {
            "com.docker.network.generic": {"k": "v"},
            "com.docker.network.enable_ipv4": True,
            "com.docker.network.enable_ipv6": False,
            "com.docker.network.internal": False,
        }
    }
    assert peer.calls("IpamDriver.RequestAddress") == []
    assert peer.calls("NetworkDriver.CreateNetwork")[0].body["IPv4Data"] == [
        {"AddressSpace": "peerlocal", "Pool": SUBNET}
    ]
    # A gateway the user chose is still requested.
    peer.clear()
    rctl.create_network(
        "m",
        driver="peer",
        ipam_driver="peer",
        ipv4=[IPAMConfig(subnet="10.78.0.0/24", gateway="10.78.0.9")],
    )
    assert peer.calls("IpamDriver.RequestAddress")[0].body["Address"] == "10.78.0.9"
    # A plugin that did not declare GwAllocChecker is never asked.
    peer.skip_gateway = None
    rctl.registry.get("peer").gw_alloc_checker = False
    peer.clear()
    rctl.create_network("o", driver="peer", ipam_driver="peer", ipv4=[v4("10.79.0.0/24")])
    assert peer.calls("NetworkDriver.GwAllocCheck") == []
    assert len(peer.calls("IpamDriver.RequestAddress")) == 1


def test_a_failing_gw_alloc_check_fails_the_create_and_takes_nothing(
    rctl: NetworkController, peer: PeerPlugin
) -> None:
    peer.skip_gateway = (False, False)
    peer.misbehave("NetworkDriver.GwAllocCheck", "err")
    with pytest.raises(errors.PluginError) as info:
        rctl.create_network("n", driver="peer", ipam_driver="peer", ipv4=[v4(SUBNET)])
    assert info.value.method == "NetworkDriver.GwAllocCheck"
    assert peer.calls("IpamDriver.RequestPool") == [] and peer.ipam_state() == {}
    assert rctl.networks() == []
    peer.misbehave("NetworkDriver.GwAllocCheck", None)
    peer.do_NetworkDriver_GwAllocCheck = lambda b: {"SkipIPv4": "yes"}  # type: ignore
    with pytest.raises(errors.PluginError, match="must be bools"):
        rctl.create_network("n", driver="peer", ipam_driver="peer", ipv4=[v4(SUBNET)])
    assert peer.ipam_state() == {} and rctl.networks() == []


def _hung(peer: PeerPlugin, method: str, calls: int) -> bool:
    return len(peer.calls(method)) >= calls


STALLS = [
    ("create_network", "IpamDriver.RequestPool"),
    ("create_network", "IpamDriver.RequestAddress"),
    ("create_endpoints", "IpamDriver.RequestAddress"),
    ("delete_endpoints", "IpamDriver.ReleaseAddress"),
    ("delete_network", "IpamDriver.ReleasePool"),
]


@pytest.mark.parametrize(("stage", "method"), STALLS, ids=[f"{s}-{m}" for s, m in STALLS])
def test_a_hung_ipam_plugin_does_not_hold_the_store(
    rctl: NetworkController, dirs: tuple[str, str], peer: PeerPlugin, stage: str, method: str
) -> None:
    """While a remote IPAM call hangs, another controller on the same store can still
    write: the plugin is called outside the store's write transaction."""
    net = ep = None
    if stage != "create_network":
        net = rctl.create_network("n", driver="null", ipam_driver="peer", ipv4=[v4(SUBNET)])
    if stage in ("delete_endpoints", "delete_network"):
        ep = net.create_endpoint("a")
    if stage == "delete_network":
        rctl.delete_endpoints([ep])
    before = len(peer.calls(method))
    peer.misbehave(method, "hang")
    outcome: list[BaseException | None] = []

    def stalled() -> None:
        try:
            if stage == "create_network":
                rctl.create_network("n", driver="null", ipam_driver="peer", ipv4=[v4(SUBNET)])
            elif stage == "create_endpoints":
                net.create_endpoints(["a", "b"])
            elif stage == "delete_endpoints":
                rctl.delete_endpoints([ep])
            else:
                net.delete()
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    worker = threading.Thread(target=stalled)
    worker.start()
    try:
        deadline = time.monotonic() + 10
        while not _hung(peer, method, before + 1):
            assert time.monotonic() < deadline, "the plugin was never called"
            time.sleep(0.01)
        with NetworkController(state_dir=dirs[0], run_dir=dirs[1]) as other:
            other.create_network("bystander", driver="null", ipam_driver="null").delete()
        assert worker.is_alive(), "the plugin call ended before the other writer was done"
    finally:
        peer.release.set()  # the hung call ends: the connection closes without a reply
        worker.join(30)
    assert isinstance(outcome[0], errors.PluginError), outcome
    assert outcome[0].method == method


def test_a_name_taken_while_the_ipam_plugin_answered_gives_everything_back(
    rctl: NetworkController, dirs: tuple[str, str], pdir: Path, peer: PeerPlugin
) -> None:
    """Pools and addresses taken from a plugin before the write transaction are given
    back when the transaction refuses the record."""
    real_pool, real_addr = peer.do_IpamDriver_RequestPool, peer.do_IpamDriver_RequestAddress
    other = NetworkController(state_dir=dirs[0], run_dir=dirs[1], plugin_dirs=[str(pdir)])

    def racing_pool(body: dict) -> dict:  # another process takes the name meanwhile
        other.create_network("n", driver="null", ipam_driver="null")
        return real_pool(body)

    peer.do_IpamDriver_RequestPool = racing_pool  # type: ignore[method-assign]
    try:
        with pytest.raises(errors.NameInUse):
            rctl.create_network("n", driver="null", ipam_driver="peer", ipv4=[v4(SUBNET)])
        assert peer.ipam_state() == {}
        peer.do_IpamDriver_RequestPool = real_pool  # type: ignore[method-assign]
        net = rctl.create_network("m", driver="null", ipam_driver="peer", ipv4=[v4(SUBNET)])

        def racing_addr(body: dict) -> dict:
            if not body["Options"]:  # an endpoint's address: the name goes meanwhile
                peer.do_IpamDriver_RequestAddress = real_addr  # type: ignore[method-assign]
                other.network("m").create_endpoint("b")  # takes 10.77.0.2
            return real_addr(body)

        peer.do_IpamDriver_RequestAddress = racing_addr  # type: ignore[method-assign]
        with pytest.raises(errors.NameInUse):
            net.create_endpoints(["a", "b"])
        # The gateway and b's address stay; a's and the second b's were given back.
        assert peer.ipam_state() == {f"peerlocal/{SUBNET}": (1, ["10.77.0.1", "10.77.0.2"])}
        assert [e.name for e in net.endpoints()] == ["b"]
    finally:
        other.close()


def test_a_remote_driver_is_first_resolved_outside_the_store_transaction(
    rctl: NetworkController, dirs: tuple[str, str], pdir: Path, peer: PeerPlugin
) -> None:
    """A controller that has not used the plugin yet (another process) meets it first
    in a join's port check: the handshake (Activate, GetCapabilities; retries, timeouts)
    must not run while it holds the store's write lock."""
    net = rctl.create_network("n", driver="peer", ipam_driver="peer", ipv4=[v4(SUBNET)])
    ep = net.create_endpoint("a")
    free: dict[str, bool] = {}
    real_activate = peer.do_Plugin_Activate
    real_caps = peer.do_NetworkDriver_GetCapabilities

    def activate(body: dict) -> dict:
        free["Plugin.Activate"] = write_lock_free(dirs[0])
        return real_activate(body)

    def caps(body: dict) -> dict:
        free["NetworkDriver.GetCapabilities"] = write_lock_free(dirs[0])
        return real_caps(body)

    peer.do_Plugin_Activate = activate  # type: ignore[method-assign]
    peer.do_NetworkDriver_GetCapabilities = caps  # type: ignore[method-assign]
    with NetworkController(state_dir=dirs[0], run_dir=dirs[1], plugin_dirs=[str(pdir)]) as other:
        assert "peer" not in other.drivers()
        with pytest.raises(errors.Unsupported):  # a plugin's driver cannot join on the host
            other.join_external(other.network("n").endpoint("a"))
        assert "peer" in other.drivers()
    assert free == {"Plugin.Activate": True, "NetworkDriver.GetCapabilities": True}
    assert rctl.store.endpoint_by_id(ep.id).join_state == ""  # the intent was undone


def test_an_ipam_requiring_the_mac_address_gets_it_with_each_endpoint_address(
    rctl: NetworkController, peer: PeerPlugin
) -> None:
    """RequiresMACAddress: RequestAddress of an endpoint carries its MAC (the user's, or
    one made before the allocation, as the engine does), which the endpoint keeps and the
    network driver receives; a gateway request carries none."""
    peer.requires_mac = True
    net = rctl.create_network("n", driver="peer", ipam_driver="peer", ipv4=[v4(SUBNET)])
    [gw] = peer.calls("IpamDriver.RequestAddress")
    assert gw.body["Options"] == {"RequestAddressType": "com.docker.network.gateway"}
    peer.clear()
    mine = net.create_endpoint("a", mac_address="02:aa:bb:cc:dd:01")
    made = net.create_endpoint("b")
    sent = [r.body for r in peer.calls("IpamDriver.RequestAddress")]
    assert [b["Options"] for b in sent] == [
        {MAC_ADDRESS_OPTION: "02:aa:bb:cc:dd:01"},
        {MAC_ADDRESS_OPTION: made.mac_address},
    ]
    assert mine.mac_address == "02:aa:bb:cc:dd:01"
    assert int(made.mac_address[:2], 16) & 0x03 == 0x02  # locally administered, unicast
    interfaces = [r.body["Interface"] for r in peer.calls("NetworkDriver.CreateEndpoint")]
    assert [i["MacAddress"] for i in interfaces] == [mine.mac_address, made.mac_address]
