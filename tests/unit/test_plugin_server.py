"""`cnm plugin serve` driven over its unix socket with raw HTTP, as an engine drives it.

Every request a real Docker 20.10 engine sent (tests/data/, a copy of shared/traces/) is
replayed in order, and the interface the Join hands out is then moved into namespaces made
here, the way the engine does it, to show real packets cross the bridge. Also: the
reference counting of pools, a restart of the plugin between Join and Leave, concurrent
calls, the error replies, and a hypothesis fuzz of random and malformed bodies (never a
crash; a failed request leaves the store and the kernel as they were). Judged with `ip -j`
and the store's own tables."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cnm.control import errors
from cnm.control.plugin import PluginBackend, PluginController, PluginServer
from cnm.control.plugin.protocol import (
    parse_create_endpoint,
    parse_create_network,
    parse_discovery,
    parse_join,
    parse_release_address,
    parse_request_address,
    parse_request_pool,
)
from cnm.control.plugin.server import METHODS
from cnm.fastpath import netns

privileged = pytest.mark.privileged  # every test that runs the plugin (it makes devices)

# A copy of shared/traces/dockerd-20.10-remote-plugin.jsonl: the clone must carry it.
TRACE = Path(__file__).resolve().parents[1] / "data/dockerd-20.10-remote-plugin.jsonl"
ACCEPT = "application/vnd.docker.plugins.v1.2+json"


# --- an engine's side of the wire -----------------------------------------------------


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=30)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(30)
        self.sock.connect(self._path)


class Engine:
    """Posts to the plugin socket the way the engine does (Accept header, no Content-Type)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def raw(self, method: str, data: bytes, verb: str = "POST") -> tuple[int, dict[str, Any]]:
        conn = _UnixConnection(self.path)
        try:
            conn.request(verb, f"/{method}", body=data, headers={"Accept": ACCEPT})
            resp = conn.getresponse()
            status, payload = resp.status, resp.read()
            assert resp.getheader("Content-Type") == "application/vnd.docker.plugins.v1.1+json"
        finally:
            conn.close()
        return status, json.loads(payload)

    def call(self, method: str, body: Any = None) -> tuple[int, dict[str, Any]]:
        return self.raw(method, b"" if body is None else json.dumps(body).encode())

    def ok(self, method: str, body: Any = None) -> dict[str, Any]:
        status, reply = self.call(method, body)
        assert status == 200, (method, status, reply)
        assert not reply.get("Err") and not reply.get("Error"), (method, reply)
        return reply


class Plugin:
    """A PluginServer on its own event loop thread, as `cnm plugin serve` runs it."""

    def __init__(self, state: str, run: str, sock: str) -> None:
        self.ctl = PluginController(state_dir=state, run_dir=run)
        self.server = PluginServer(PluginBackend(self.ctl), sock)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(10)

    def remove_everything(self) -> None:
        """What the engine would do at the end: leave, delete every endpoint and network."""
        for net in self.ctl.networks():
            for ep in net.endpoints():
                ep.delete(force=True)  # leaves first when the engine left it joined
            net.delete()

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()
        self.ctl.close()


@pytest.fixture
def paths(tmp_path: Path) -> dict[str, str]:
    return {
        "state": str(tmp_path / "state"),
        "run": str(tmp_path / "run"),
        "sock": str(tmp_path / "plugins" / "cnm.sock"),
    }


@pytest.fixture
def plugin(paths: dict[str, str]) -> Iterator[Plugin]:
    plug = Plugin(paths["state"], paths["run"], paths["sock"])
    try:
        yield plug
    finally:
        try:
            plug.remove_everything()
        finally:
            plug.stop()


@pytest.fixture
def engine(plugin: Plugin, paths: dict[str, str]) -> Engine:
    return Engine(paths["sock"])


# --- oracles --------------------------------------------------------------------------


def ip_json(*args: str, netns_path: str | None = None) -> list[dict[str, Any]]:
    cmd = ["ip", "-j", *args]
    if netns_path:
        cmd = ["nsenter", f"--net={netns_path}", *cmd]
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)


def links() -> dict[str, dict[str, Any]]:
    return {link["ifname"]: link for link in ip_json("-d", "link", "show")}


def addrs(name: str) -> set[str]:
    (link,) = ip_json("-4", "addr", "show", "dev", name)
    return {f"{a['local']}/{a['prefixlen']}" for a in link.get("addr_info", [])}


def store_dump(ctl: PluginController) -> dict[str, list[tuple[Any, ...]]]:
    tables = [r[0] for r in ctl.store.fetchall("SELECT name FROM sqlite_master WHERE type='table'")]
    return {t: sorted(ctl.store.fetchall(f"SELECT * FROM {t}"), key=repr) for t in tables}


def kernel_links() -> set[tuple[str, str]]:
    return {(n, str(link.get("linkinfo", {}).get("info_kind"))) for n, link in links().items()}


def wait_gone(names: set[str], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while names & set(links()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not names & set(links()), names & set(links())


def trace() -> list[dict[str, Any]]:
    return [json.loads(line) for line in TRACE.read_text().splitlines() if line.strip()]


# --- the engine's trace, replayed -----------------------------------------------------


@privileged
def test_trace_replayed_with_real_packets(engine: Engine, plugin: Plugin, tmp_path: Path) -> None:
    """Every request of the trace in order. The trace's IPAM answers came from a fake
    plugin ("fklocal", "fk/..."), so its address space and pool id are replaced by the
    ones this plugin handed out, as the engine would. After each Join the engine's part
    is played: the SrcName interface is moved into a namespace and configured with the
    endpoint's address and the Join's gateway; then the two "containers" ping."""
    requests = trace()
    assert len(requests) == 30
    space = pool_id = None
    replies: dict[str, list[dict[str, Any]]] = {}
    sandboxes: dict[str, str] = {}
    endpoint_address: dict[str, str] = {}
    src_of: dict[str, str] = {}
    bridge = None
    for req in requests:
        method = req["path"].lstrip("/")
        body = json.loads(json.dumps(req["body"]))
        if body == {}:
            body = None  # the handshake calls are sent with an empty body
        if isinstance(body, dict):
            if body.get("AddressSpace") == "fklocal":
                body["AddressSpace"] = space
            if "PoolID" in body:
                body["PoolID"] = pool_id
        if method == "NetworkDriver.Leave":
            # The engine takes the interface out of its sandbox before Leave.
            _play_engine_leave(sandboxes.pop(body["EndpointID"]), src_of[body["EndpointID"]])
        reply = engine.ok(method, body)
        replies.setdefault(method, []).append(reply)

        if method == "Plugin.Activate":
            assert reply == {"Implements": ["NetworkDriver", "IpamDriver"]}
        elif method == "NetworkDriver.GetCapabilities":
            assert reply["Scope"] == "local"
            assert reply["ConnectivityScope"] == "local"
        elif method == "IpamDriver.GetCapabilities":
            assert reply == {"RequiresMACAddress": False, "RequiresRequestReplay": False}
        elif method == "IpamDriver.GetDefaultAddressSpaces":
            space = reply["LocalDefaultAddressSpace"]
            assert reply["GlobalDefaultAddressSpace"]
        elif method == "IpamDriver.RequestPool":
            assert reply["Pool"] == "10.97.0.0/24"
            pool_id = reply["PoolID"]
        elif method == "IpamDriver.RequestAddress":
            want = {0: "10.97.0.1/24", 1: "10.97.0.2/24", 2: "10.97.0.3/24"}
            assert reply["Address"] == want[len(replies[method]) - 1]
        elif method == "NetworkDriver.CreateNetwork":
            assert reply == {}
            (bridge,) = [n for n, link in links().items() if n.startswith("br-")]
            assert addrs(bridge) == {"10.97.0.1/24"}
        elif method == "NetworkDriver.CreateEndpoint":
            ip = body["Interface"]["Address"]
            endpoint_address[body["EndpointID"]] = ip
            mac = "02:42:" + ":".join(f"{int(o):02x}" for o in ip.split("/")[0].split("."))
            assert reply == {"Interface": {"Address": "", "AddressIPv6": "", "MacAddress": mac}}
        elif method == "NetworkDriver.Join":
            assert reply["InterfaceName"]["DstPrefix"] == "eth"
            assert reply["Gateway"] == "10.97.0.1"
            src = reply["InterfaceName"]["SrcName"]
            src_of[body["EndpointID"]] = src
            link = links()[src]
            assert link["linkinfo"]["info_kind"] == "veth"  # on the host, for the engine
            peer = link["link"]  # the pair's other end: the host end, on the bridge
            assert links()[peer].get("master") == bridge
            sandboxes[body["EndpointID"]] = _play_engine_join(
                tmp_path, src, endpoint_address[body["EndpointID"]], reply["Gateway"]
            )
            if len(sandboxes) == 2:
                a, b = sandboxes.values()
                _ping(a, "10.97.0.3")
                _ping(b, "10.97.0.2")
                _ping(a, "10.97.0.1")  # the gateway on the bridge
        elif method == "NetworkDriver.EndpointOperInfo":
            assert reply["Value"]["com.docker.network.endpoint.macaddress"].startswith("02:42:")
    assert not sandboxes
    assert bridge is not None
    wait_gone({bridge})
    assert not [n for n in links() if n.startswith(("br-", "vc", "cnm"))]
    dump = store_dump(plugin.ctl)
    assert not dump["networks"] and not dump["endpoints"]
    assert not dump["ipam_pools"] and not dump["ipam_addresses"]


def _play_engine_join(tmp_path: Path, src: str, address: str, gateway: str) -> str:
    """What the engine does with a Join's reply: move SrcName into the container's
    namespace, rename it DstPrefix + index, address it and route through the gateway."""
    path = str(tmp_path / f"sandbox-{src}")
    (err,) = netns.create_many([path])
    assert err is None, err
    subprocess.run(["ip", "link", "set", "dev", src, "netns", path], check=True)

    def ns(*cmd: str) -> None:
        subprocess.run(["nsenter", f"--net={path}", *cmd], check=True)

    ns("ip", "link", "set", "dev", src, "name", "eth0")
    ns("ip", "addr", "add", address, "dev", "eth0")
    ns("ip", "link", "set", "dev", "eth0", "up")
    ns("ip", "route", "add", "default", "via", gateway)
    return path


def _play_engine_leave(path: str, src: str) -> None:
    """The interface back to the host under its SrcName, then the sandbox goes."""
    host = f"/proc/{os.getpid()}/ns/net"
    subprocess.run(
        ["nsenter", f"--net={path}", "ip", "link", "set", "dev", "eth0", "down", "name", src],
        check=True,
    )
    subprocess.run(
        ["nsenter", f"--net={path}", "ip", "link", "set", "dev", src, "netns", host], check=True
    )
    assert src in links()
    netns.delete(path)


def _ping(path: str, ip: str) -> None:
    subprocess.run(
        ["nsenter", f"--net={path}", "ping", "-c", "1", "-W", "2", ip],
        check=True,
        capture_output=True,
    )


# --- IPAM -----------------------------------------------------------------------------


@privileged
def test_pool_reference_counting(engine: Engine, plugin: Plugin) -> None:
    space = engine.ok("IpamDriver.GetDefaultAddressSpaces")["LocalDefaultAddressSpace"]
    req = {"AddressSpace": space, "Pool": "10.98.0.0/24", "SubPool": "", "Options": {}, "V6": False}
    first = engine.ok("IpamDriver.RequestPool", req)
    again = engine.ok("IpamDriver.RequestPool", req)
    assert first == again and first["Pool"] == "10.98.0.0/24"
    # A request for any default pool always gets a new one.
    anyp = {**req, "Pool": ""}
    d1, d2 = engine.ok("IpamDriver.RequestPool", anyp), engine.ok("IpamDriver.RequestPool", anyp)
    assert d1["PoolID"] != d2["PoolID"]
    pid = first["PoolID"]
    gw = engine.ok(
        "IpamDriver.RequestAddress",
        {
            "PoolID": pid,
            "Address": "",
            "Options": {"RequestAddressType": "com.docker.network.gateway"},
        },
    )
    assert gw["Address"] == "10.98.0.1/24"
    engine.ok("IpamDriver.ReleasePool", {"PoolID": pid})
    # One reference is left: the pool and its addresses are still there.
    again = engine.ok("IpamDriver.RequestAddress", {"PoolID": pid, "Address": "", "Options": None})
    assert again["Address"] == "10.98.0.2/24"
    engine.ok("IpamDriver.ReleasePool", {"PoolID": pid})
    status, reply = engine.call("IpamDriver.ReleasePool", {"PoolID": pid})
    assert status == 200 and "not found" in reply["Error"]
    status, reply = engine.call("IpamDriver.RequestAddress", {"PoolID": pid, "Address": ""})
    assert status == 200 and reply["Error"]
    pools = [r[0] for r in plugin.ctl.store.fetchall("SELECT pool_id FROM ipam_pools")]
    assert sorted(pools) == sorted([d1["PoolID"], d2["PoolID"]])


@privileged
def test_ipam_errors_and_static_addresses(engine: Engine) -> None:
    space = engine.ok("IpamDriver.GetDefaultAddressSpaces")["LocalDefaultAddressSpace"]
    pid = engine.ok("IpamDriver.RequestPool", {"AddressSpace": space, "Pool": "10.99.0.0/24"})[
        "PoolID"
    ]
    assert engine.ok("IpamDriver.RequestAddress", {"PoolID": pid, "Address": "10.99.0.9"}) == {
        "Address": "10.99.0.9/24",
        "Data": {},
    }
    status, reply = engine.call(
        "IpamDriver.RequestAddress", {"PoolID": pid, "Address": "10.99.0.9"}
    )
    assert status == 200 and "in use" in reply["Error"]
    status, reply = engine.call("IpamDriver.RequestAddress", {"PoolID": pid, "Address": "10.1.1.1"})
    assert status == 200 and "outside" in reply["Error"]
    status, reply = engine.call("IpamDriver.RequestPool", {"AddressSpace": "nope", "Pool": ""})
    assert status == 200 and "address space" in reply["Error"]
    engine.ok("IpamDriver.ReleaseAddress", {"PoolID": pid, "Address": "10.99.0.9"})
    status, reply = engine.call(
        "IpamDriver.ReleaseAddress", {"PoolID": pid, "Address": "10.99.0.9"}
    )
    assert status == 200 and reply["Error"]


@privileged
def test_concurrent_requests_get_distinct_addresses(engine: Engine) -> None:
    space = engine.ok("IpamDriver.GetDefaultAddressSpaces")["LocalDefaultAddressSpace"]
    pid = engine.ok("IpamDriver.RequestPool", {"AddressSpace": space, "Pool": "10.96.0.0/24"})[
        "PoolID"
    ]
    with ThreadPoolExecutor(16) as pool:
        replies = list(
            pool.map(
                lambda _: engine.ok("IpamDriver.RequestAddress", {"PoolID": pid, "Address": ""}),
                range(64),
            )
        )
    got = [r["Address"] for r in replies]
    assert len(set(got)) == 64
    assert set(got) == {f"10.96.0.{i}/24" for i in range(1, 65)}


# --- restart --------------------------------------------------------------------------

NET = "a" * 64
EP = "b" * 64


def _create(engine: Engine, subnet: str = "10.95.0.0/24", gw: str = "10.95.0.1/24") -> None:
    engine.ok(
        "NetworkDriver.CreateNetwork",
        {
            "NetworkID": NET,
            "Options": {"com.docker.network.enable_ipv6": False, "com.docker.network.generic": {}},
            "IPv4Data": [{"AddressSpace": "x", "Pool": subnet, "Gateway": gw}],
            "IPv6Data": [],
        },
    )
    engine.ok(
        "NetworkDriver.CreateEndpoint",
        {
            "NetworkID": NET,
            "EndpointID": EP,
            "Interface": {"Address": "10.95.0.2/24", "AddressIPv6": "", "MacAddress": ""},
            "Options": {},
        },
    )


@privileged
def test_restart_between_join_and_leave(paths: dict[str, str]) -> None:
    plug = Plugin(paths["state"], paths["run"], paths["sock"])
    try:
        engine = Engine(paths["sock"])
        _create(engine)
        join = engine.ok(
            "NetworkDriver.Join",
            {"NetworkID": NET, "EndpointID": EP, "SandboxKey": "/x", "Options": {}},
        )
    finally:
        plug.stop()
    assert not os.path.exists(paths["sock"])
    src = join["InterfaceName"]["SrcName"]
    assert src in links()
    plug = Plugin(paths["state"], paths["run"], paths["sock"])
    try:
        engine = Engine(paths["sock"])
        engine.ok("NetworkDriver.EndpointOperInfo", {"NetworkID": NET, "EndpointID": EP})
        engine.ok("NetworkDriver.Leave", {"NetworkID": NET, "EndpointID": EP})
        wait_gone({src})
        # Joined again after the restart (the network must be learnt from the store).
        again = engine.ok(
            "NetworkDriver.Join",
            {"NetworkID": NET, "EndpointID": EP, "SandboxKey": "/x", "Options": {}},
        )
        assert again["InterfaceName"]["SrcName"] in links()
        engine.ok("NetworkDriver.Leave", {"NetworkID": NET, "EndpointID": EP})
        engine.ok("NetworkDriver.DeleteEndpoint", {"NetworkID": NET, "EndpointID": EP})
        engine.ok("NetworkDriver.DeleteNetwork", {"NetworkID": NET})
        wait_gone({src})
        assert not [n for n in links() if n.startswith(("br-", "vc", "cnm"))]
        assert not plug.ctl.store.networks()
    finally:
        plug.stop()


@privileged
def test_a_routed_join_after_a_restart_knows_the_endpoints_address(paths: dict[str, str]) -> None:
    """The routed datapath's host route needs the endpoint's address at Join: the bridge
    driver gets it from the controller (join_on_host's interface), not from a cache of
    CreateEndpoint that a restart of the plugin emptied."""
    plug = Plugin(paths["state"], paths["run"], paths["sock"])
    try:
        engine = Engine(paths["sock"])
        engine.ok(
            "NetworkDriver.CreateNetwork",
            {
                "NetworkID": NET,
                "Options": {
                    "com.docker.network.enable_ipv6": False,
                    "com.docker.network.generic": {"com.cnm.bridge.datapath": "routed"},
                },
                "IPv4Data": [
                    {"AddressSpace": "x", "Pool": "10.96.0.0/24", "Gateway": "10.96.0.1/24"}
                ],
                "IPv6Data": [],
            },
        )
        engine.ok(
            "NetworkDriver.CreateEndpoint",
            {
                "NetworkID": NET,
                "EndpointID": EP,
                "Interface": {"Address": "10.96.0.7/24", "AddressIPv6": "", "MacAddress": ""},
                "Options": {},
            },
        )
    finally:
        plug.stop()
    plug = Plugin(paths["state"], paths["run"], paths["sock"])
    try:
        engine = Engine(paths["sock"])
        join = engine.ok(
            "NetworkDriver.Join",
            {"NetworkID": NET, "EndpointID": EP, "SandboxKey": "/x", "Options": {}},
        )
        src = join["InterfaceName"]["SrcName"]
        (host,) = [n for n in links() if n.startswith("vc")]  # named after cnm's own id
        assert src in links()
        routes = {(r["dst"], r.get("dev")) for r in ip_json("-4", "route", "show")}
        assert ("10.96.0.7", host) in routes
        halves = {r["Destination"] for r in join["StaticRoutes"]}
        assert halves == {"10.96.0.0/25", "10.96.0.128/25"}
        engine.ok("NetworkDriver.Leave", {"NetworkID": NET, "EndpointID": EP})
        engine.ok("NetworkDriver.DeleteEndpoint", {"NetworkID": NET, "EndpointID": EP})
        engine.ok("NetworkDriver.DeleteNetwork", {"NetworkID": NET})
        wait_gone({src, host})
        assert not plug.ctl.store.networks()
    finally:
        plug.stop()


@privileged
def test_the_socket_is_never_looser_than_0660(
    paths: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a permissive umask (0), the socket file has no more than 0660 from the moment
    bind creates it (seen at the chmod that follows), not only once started."""
    seen: list[int] = []
    real_chmod = os.chmod

    def chmod(path: Any, mode: int, *args: Any, **kw: Any) -> None:
        if str(path) == paths["sock"]:
            seen.append(os.stat(path).st_mode & 0o777)
        real_chmod(path, mode, *args, **kw)

    monkeypatch.setattr(os, "chmod", chmod)
    old = os.umask(0)
    try:
        plug = Plugin(paths["state"], paths["run"], paths["sock"])
    finally:
        os.umask(old)
    try:
        assert seen == [0o660]
        assert os.stat(paths["sock"]).st_mode & 0o777 == 0o660
        Engine(paths["sock"]).ok("Plugin.Activate")
    finally:
        plug.stop()
    assert not os.path.exists(paths["sock"])


@privileged
def test_live_socket_is_not_taken_over(plugin: Plugin, paths: dict[str, str]) -> None:
    other = PluginServer(PluginBackend(plugin.ctl), paths["sock"])
    with pytest.raises(errors.Conflict):
        asyncio.run(other.start())
    assert os.stat(paths["sock"]).st_mode & 0o777 == 0o660
    Engine(paths["sock"]).ok("Plugin.Activate")


# --- errors ---------------------------------------------------------------------------


@privileged
def test_error_replies(engine: Engine, plugin: Plugin) -> None:
    status, reply = engine.raw("NetworkDriver.CreateNetwork", b"{not json")
    assert status == 400 and "malformed" in reply["Err"]
    status, reply = engine.raw("IpamDriver.RequestPool", b"[1, 2]")
    assert status == 400 and reply["Err"]
    status, reply = engine.call("NetworkDriver.NoSuchMethod", {})
    assert status == 404 and reply["Err"]
    status, reply = engine.raw("Plugin.Activate", b"", verb="GET")
    assert status == 404
    status, reply = engine.call("NetworkDriver.CreateNetwork", {"NetworkID": 7})
    assert status == 400 and "NetworkID" in reply["Err"]
    status, reply = engine.call(
        "NetworkDriver.CreateEndpoint",
        {"NetworkID": NET, "EndpointID": EP, "Interface": {"Address": ""}},
    )
    assert status == 500 and "not found" in reply["Err"]
    _create(engine)
    # A port mapping is refused at CreateEndpoint, before anything is made.
    status, reply = engine.call(
        "NetworkDriver.CreateEndpoint",
        {
            "NetworkID": NET,
            "EndpointID": "c" * 64,
            "Interface": {"Address": "10.95.0.3/24"},
            "Options": {"com.docker.network.portmap": [{"Proto": 6, "Port": 80, "HostPort": 8080}]},
        },
    )
    assert status == 500 and "ports" in reply["Err"]
    # A network with endpoints is not deleted; an unknown driver option is refused.
    status, reply = engine.call("NetworkDriver.DeleteNetwork", {"NetworkID": NET})
    assert status == 500 and reply["Err"]
    status, reply = engine.call(
        "NetworkDriver.CreateNetwork",
        {
            "NetworkID": "d" * 64,
            "Options": {"com.docker.network.generic": {"no.such.option": "1"}},
            "IPv4Data": [{"Pool": "10.94.0.0/24", "Gateway": "10.94.0.1/24"}],
        },
    )
    assert status == 400 and "no.such.option" in reply["Err"]
    # Deleting what is not there is not an error (the engine retries deletes).
    engine.ok("NetworkDriver.DeleteEndpoint", {"NetworkID": NET, "EndpointID": "e" * 64})
    engine.ok("NetworkDriver.DeleteNetwork", {"NetworkID": "f" * 64})
    engine.ok("NetworkDriver.DeleteEndpoint", {"NetworkID": NET, "EndpointID": EP})
    engine.ok("NetworkDriver.DeleteNetwork", {"NetworkID": NET})
    assert not plug_links()


def plug_links() -> list[str]:
    return [n for n in links() if n.startswith(("br-", "vc", "cnm"))]


# --- fuzz -----------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
FIELDS = [
    "NetworkID",
    "EndpointID",
    "PoolID",
    "Address",
    "Pool",
    "SubPool",
    "AddressSpace",
    "Options",
    "Interface",
    "IPv4Data",
    "IPv6Data",
    "SandboxKey",
    "V6",
    "DiscoveryType",
]
plausible = st.sampled_from(
    ["", "x", "a" * 64, NET, EP, "10.95.0.0/24", "10.95.0.7", "LocalDefault", "::1", "1.2.3.4/33"]
)
bodies = st.one_of(
    st.dictionaries(st.sampled_from(FIELDS), plausible | json_values, max_size=6),
    json_values,
)
raw_bodies = st.one_of(
    bodies.map(lambda b: json.dumps(b).encode()),
    st.binary(max_size=64),
    st.sampled_from([b"{", b"{}}", b'{"NetworkID": }', b"\xff\xfe", b"null", b"[]"]),
)


@privileged
@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(method=st.sampled_from([*sorted(METHODS), "Nope.Nothing"]), data=raw_bodies)
def test_fuzz_never_crashes_and_failures_change_nothing(
    engine: Engine, plugin: Plugin, method: str, data: bytes
) -> None:
    if not getattr(plugin, "seeded", False):
        _create(engine)  # something to damage: a network with an endpoint
        plugin.seeded = True  # type: ignore[attr-defined]
    before, kernel_before = store_dump(plugin.ctl), kernel_links()
    status, reply = engine.raw(method, data)
    assert status in (200, 400, 404, 500), (status, reply)
    failed = status != 200 or bool(reply.get("Err") or reply.get("Error"))
    if failed:
        assert reply.get("Err"), reply
        assert store_dump(plugin.ctl) == before, (method, data, reply)
        assert kernel_links() == kernel_before, (method, data, reply)
    # The server is still there whatever happened.
    assert engine.ok("Plugin.Activate")["Implements"] == ["NetworkDriver", "IpamDriver"]


@privileged
def test_concurrent_joins_and_leaves(engine: Engine) -> None:
    _create(engine)
    ids = [f"{i:x}" * 64 for i in range(3, 11)]
    ids = [i[:64] for i in ids]

    def join(i: int) -> str:
        engine.ok(
            "NetworkDriver.CreateEndpoint",
            {
                "NetworkID": NET,
                "EndpointID": ids[i],
                "Interface": {"Address": f"10.95.0.{10 + i}/24"},
            },
        )
        reply = engine.ok(
            "NetworkDriver.Join",
            {"NetworkID": NET, "EndpointID": ids[i], "SandboxKey": "/x", "Options": None},
        )
        return reply["InterfaceName"]["SrcName"]

    with ThreadPoolExecutor(8) as pool:
        srcs = list(pool.map(join, range(len(ids))))
    assert len(set(srcs)) == len(ids)
    assert set(srcs) <= set(links())

    def leave(i: int) -> None:
        ref = {"NetworkID": NET, "EndpointID": ids[i]}
        engine.ok("NetworkDriver.Leave", ref)
        engine.ok("NetworkDriver.DeleteEndpoint", ref)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(leave, range(len(ids))))
    wait_gone(set(srcs))


# --- request parsing (no privilege) ---------------------------------------------------


@pytest.mark.parametrize(
    ("parse", "body", "field"),
    [
        (parse_create_network, {}, "NetworkID"),
        (parse_create_network, {"NetworkID": "n", "IPv4Data": [{"Pool": "10.0.0.1/24"}]}, "Pool"),
        (parse_create_network, {"NetworkID": "n", "IPv4Data": [{"Pool": "fd00::/64"}]}, "IPv4"),
        (
            parse_create_network,
            {"NetworkID": "n", "IPv4Data": [{"Pool": "10.0.0.0/24", "Gateway": "10.0.0.1"}]},
            "CIDR",
        ),
        (
            parse_create_network,
            {"NetworkID": "n", "IPv4Data": [{"Pool": "10.0.0.0/24", "Gateway": "10.1.0.1/24"}]},
            "outside",
        ),
        (
            parse_create_network,
            {"NetworkID": "n", "Options": {"com.docker.network.enable_ipv6": "yes"}},
            "boolean",
        ),
        (parse_create_network, {"NetworkID": "../etc"}, "NetworkID"),
        (parse_create_endpoint, {"NetworkID": "n", "EndpointID": "e"}, "Interface"),
        (
            parse_create_endpoint,
            {"NetworkID": "n", "EndpointID": "e", "Interface": {"MacAddress": "ff:ff:ff:ff:ff:ff"}},
            "multicast",
        ),
        (parse_join, {"NetworkID": "n", "EndpointID": "e", "SandboxKey": ""}, "SandboxKey"),
        (parse_request_pool, {"Pool": "10.0.0.0/8"}, "AddressSpace"),
        (parse_request_pool, {"AddressSpace": "s", "V6": 1}, "V6"),
        (parse_request_address, {"PoolID": "p", "Options": {"k": 1}}, "Options"),
        (parse_release_address, {"PoolID": "p", "Address": ""}, "Address"),
        (parse_discovery, {"DiscoveryType": True}, "DiscoveryType"),
    ],
)
def test_invalid_requests_name_the_field(parse: Any, body: dict[str, Any], field: str) -> None:
    with pytest.raises(errors.InvalidParameter, match=field):
        parse(body)


def test_trace_requests_parse() -> None:
    """Every body of the trace parses (the exact shapes a real engine sends)."""
    parsers = {
        "NetworkDriver.CreateNetwork": parse_create_network,
        "NetworkDriver.CreateEndpoint": parse_create_endpoint,
        "NetworkDriver.Join": parse_join,
        "IpamDriver.RequestPool": parse_request_pool,
        "IpamDriver.RequestAddress": parse_request_address,
        "IpamDriver.ReleaseAddress": parse_release_address,
    }
    seen = set()
    for req in trace():
        parse = parsers.get(req["path"].lstrip("/"))
        if parse is not None:
            parse(req["body"])
            seen.add(parse)
    assert seen == set(parsers.values())
    cn = parse_create_network(trace()[6]["body"])
    assert str(cn.ipv4[0].pool) == "10.97.0.0/24" and str(cn.ipv4[0].gateway) == "10.97.0.1/24"
    assert not cn.enable_ipv6 and cn.generic == {}
