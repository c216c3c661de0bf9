"""An independent network + IPAM plugin for the tests: the other end of the remote driver.

It shares no code with cnm (not even its plugin server): a small threaded HTTP/1.1
server on a unix socket (or TCP) that speaks spec/remote-protocol.md as a plugin.

- NetworkDriver with real behaviour when `kernel=True` (root, inside the test session's
  throwaway namespace only): CreateNetwork makes a Linux bridge holding the gateway
  address, Join makes a veth pair on the host, puts one end on the bridge and returns
  the other as SrcName, Leave and DeleteNetwork delete them. All through `ip`.
- IpamDriver: pools (reference-counted, ids `<address space>/<pool>`, or
  `<pool_prefix>/<pool>` when a prefix is given, as real IPAM plugins name them as they
  like), addresses handed out from the first free host address, the gateway first.
- GwAllocChecker when `skip_gateway` is set: GwAllocCheck answers it (SkipIPv4, SkipIPv6).
- RequiresMACAddress when `requires_mac` is set (IpamDriver.GetCapabilities).
- Switchable misbehaviours per method (`misbehave`): hang, close (crash), garbage,
  err (the error field set), 500, 404, and `change_address` (a CreateEndpoint reply
  that changes the address it was given, after the endpoint was made), `bad_join` (a
  Join reply with an unusable gateway, after the veth pair was made).
- Every request is recorded (path, headers, raw body, parsed body) so tests can assert
  exact field names.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import os
import socket
import socketserver
import subprocess
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any

MISBEHAVIOURS = ("hang", "close", "garbage", "err", "500", "404", "change_address", "bad_join")
LOCAL_SPACE, GLOBAL_SPACE = "peerlocal", "peerglobal"
DEFAULT_POOL = "10.123.0.0/24"


@dataclass
class Request:
    path: str
    headers: dict[str, str]
    raw: bytes
    body: Any  # parsed JSON, None for an empty body


@dataclass
class _Pool:
    net: ipaddress.IPv4Network | ipaddress.IPv6Network
    refs: int = 1
    taken: set[Any] = field(default_factory=set)


def _ip(*argv: str, check: bool = True) -> None:
    subprocess.run(["ip", *argv], check=check, capture_output=True, text=True)


def short(ident: str) -> str:
    return hashlib.sha1(ident.encode()).hexdigest()[:10]


class PeerPlugin:
    """The plugin's state and behaviour; `serve_unix` / `serve_tcp` put it on a socket."""

    def __init__(
        self,
        *,
        kernel: bool = False,
        implements: tuple[str, ...] = ("NetworkDriver", "IpamDriver"),
        scope: str = "local",
        connectivity_scope: str | None = None,
        fill_mac: bool = True,
        pool_prefix: str | None = None,
        skip_gateway: tuple[bool, bool] | None = None,
        requires_mac: bool = False,
    ) -> None:
        self.kernel = kernel
        self.requires_mac = requires_mac
        self.pool_prefix = pool_prefix
        self.skip_gateway = skip_gateway
        self.implements = list(implements)
        self.scope = scope
        self.connectivity_scope = connectivity_scope
        self.fill_mac = fill_mac
        self.requests: list[Request] = []
        self.misbehaviours: dict[str, tuple[str, int]] = {}
        self.unimplemented: set[str] = set()
        self.release = threading.Event()  # set to let hung calls go
        self.lock = threading.Lock()
        self.networks: dict[str, dict[str, Any]] = {}
        self.endpoints: dict[str, dict[str, Any]] = {}
        self.joined: dict[str, str] = {}  # endpoint id -> host veth end
        self.pools: dict[str, _Pool] = {}
        self.server: socketserver.BaseServer | None = None
        self._thread: threading.Thread | None = None

    # --- control from the tests --------------------------------------------------------

    def misbehave(self, method: str, kind: str | None, *, skip: int = 0) -> None:
        """From now on, `method` misbehaves as `kind` (None: behaves again), after
        answering `skip` more calls properly."""
        assert kind is None or kind in MISBEHAVIOURS, kind
        with self.lock:
            if kind is None:
                self.misbehaviours.pop(method, None)
            else:
                self.misbehaviours[method] = (kind, skip)

    def calls(self, method: str | None = None) -> list[Request]:
        with self.lock:
            return [r for r in self.requests if method is None or r.path == f"/{method}"]

    def paths(self) -> list[str]:
        with self.lock:
            return [r.path.lstrip("/") for r in self.requests]

    def clear(self) -> None:
        with self.lock:
            self.requests.clear()

    def ipam_state(self) -> dict[str, tuple[int, list[str]]]:
        """Pool id -> (references, sorted addresses in use): what a rollback must restore."""
        with self.lock:
            return {pid: (p.refs, sorted(str(a) for a in p.taken)) for pid, p in self.pools.items()}

    # --- serving -----------------------------------------------------------------------

    def serve_unix(self, path: str) -> PeerPlugin:
        peer = self

        class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
            daemon_threads = True
            block_on_close = False

        self.server = Server(path, _handler(peer))
        return self._start()

    def serve_tcp(self) -> tuple[str, int]:
        peer = self

        class Server(socketserver.ThreadingMixIn, socketserver.TCPServer):
            daemon_threads = True
            block_on_close = False
            allow_reuse_address = True

        self.server = Server(("127.0.0.1", 0), _handler(peer))
        self._start()
        host, port = self.server.server_address[:2]  # type: ignore[misc]
        return str(host), int(port)

    def _start(self) -> PeerPlugin:
        assert self.server is not None
        self._thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self.release.set()
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            addr = self.server.server_address
            if isinstance(addr, str) and os.path.exists(addr):
                os.unlink(addr)
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.kernel:
            for host in list(self.joined.values()):
                _ip("link", "del", host, check=False)
            for nid, net in list(self.networks.items()):
                _ip("link", "del", net["bridge"], check=False)
                _ip("link", "del", f"pu{short(nid)}", check=False)

    # --- dispatch ----------------------------------------------------------------------

    def handle(self, method: str, body: Any) -> dict[str, Any]:
        fn = getattr(self, "do_" + method.replace(".", "_"), None)
        if fn is None:
            raise LookupError(method)
        return fn(body or {})

    def do_Plugin_Activate(self, body: dict) -> dict:
        return {"Implements": self.implements}

    # --- NetworkDriver -------------------------------------------------------------

    def do_NetworkDriver_GetCapabilities(self, body: dict) -> dict:
        reply: dict[str, Any] = {"Scope": self.scope}
        if self.connectivity_scope is not None:
            reply["ConnectivityScope"] = self.connectivity_scope
        if self.skip_gateway is not None:
            reply["GwAllocChecker"] = True
        return reply

    def do_NetworkDriver_GwAllocCheck(self, body: dict) -> dict:
        skip4, skip6 = self.skip_gateway or (False, False)
        return {"SkipIPv4": skip4, "SkipIPv6": skip6}

    def do_NetworkDriver_CreateNetwork(self, body: dict) -> dict:
        nid = body["NetworkID"]
        bridge = f"pb{short(nid)}"
        gateways = [d["Gateway"] for d in body["IPv4Data"] + body["IPv6Data"] if "Gateway" in d]
        if self.kernel:
            # A fixed MAC and an uplink port that is always up: the bridge's address and
            # carrier do not follow the joins and leaves. No link-local addresses: they
            # would appear some time later and make the host's state drift.
            mac = "02:ef:" + ":".join(short(nid)[i : i + 2] for i in range(0, 8, 2))
            _ip(
                "link",
                "add",
                "name",
                bridge,
                "address",
                mac,
                "type",
                "bridge",
                "forward_delay",
                "0",
            )
            uplink, far = f"pu{short(nid)}", f"pv{short(nid)}"
            _ip("link", "add", "name", uplink, "type", "veth", "peer", "name", far)
            for dev in (bridge, uplink, far):
                _ip("link", "set", dev, "addrgenmode", "none")
            _ip("link", "set", uplink, "master", bridge, "up")
            _ip("link", "set", far, "up")
            for gw in gateways:
                _ip("addr", "add", gw, "dev", bridge)
            _ip("link", "set", bridge, "up")
        with self.lock:
            self.networks[nid] = {"bridge": bridge, "gateways": gateways, "request": body}
        return {}

    def do_NetworkDriver_DeleteNetwork(self, body: dict) -> dict:
        with self.lock:
            net = self.networks.pop(body["NetworkID"], None)
        if net is None:
            return {"Err": f"no network {body['NetworkID']}"}
        if self.kernel:
            _ip("link", "del", net["bridge"], check=False)
            _ip("link", "del", f"pu{short(body['NetworkID'])}", check=False)
        return {}

    def do_NetworkDriver_CreateEndpoint(self, body: dict) -> dict:
        eid, iface = body["EndpointID"], body["Interface"]
        if body["NetworkID"] not in self.networks:
            return {"Err": f"no network {body['NetworkID']}"}
        reply: dict[str, Any] = {}
        mac = iface["MacAddress"]
        if self.fill_mac and not mac:
            mac = "02:ee:" + ":".join(short(eid)[i : i + 2] for i in range(0, 8, 2))
            reply = {"Interface": {"MacAddress": mac}}
        with self.lock:
            self.endpoints[eid] = {"network": body["NetworkID"], "mac": mac, "iface": iface}
        return reply

    def do_NetworkDriver_DeleteEndpoint(self, body: dict) -> dict:
        with self.lock:
            ep = self.endpoints.pop(body["EndpointID"], None)
        if ep is None:
            return {"Err": f"no endpoint {body['EndpointID']}"}
        return {}

    def do_NetworkDriver_EndpointOperInfo(self, body: dict) -> dict:
        with self.lock:
            ep = self.endpoints.get(body["EndpointID"])
        return {"Value": {"peer.mac": ep["mac"]} if ep else {}}

    def do_NetworkDriver_Join(self, body: dict) -> dict:
        eid = body["EndpointID"]
        with self.lock:
            ep = self.endpoints.get(eid)
            net = self.networks.get(body["NetworkID"])
        if ep is None or net is None:
            return {"Err": f"no endpoint {eid}"}
        host, peer = f"ph{short(eid)}", f"pc{short(eid)}"
        if self.kernel:
            _ip("link", "add", "name", host, "type", "veth", "peer", "name", peer)
            _ip("link", "set", host, "master", net["bridge"], "up")
        with self.lock:
            self.joined[eid] = host
        reply: dict[str, Any] = {
            "InterfaceName": {"SrcName": peer, "DstPrefix": "eth"},
            "DisableGatewayService": False,
        }
        v4 = [ipaddress.ip_interface(g) for g in net["gateways"] if ":" not in g]
        if v4:
            reply["Gateway"] = str(v4[0].ip)
            # A route through a router on the network: its last host address.
            hop = v4[0].network.broadcast_address - 1
            reply["StaticRoutes"] = [
                {
                    "Destination": f"198.51.{v4[0].ip.packed[1]}.0/24",
                    "RouteType": 0,
                    "NextHop": str(hop),
                }
            ]
        return reply

    def do_NetworkDriver_Leave(self, body: dict) -> dict:
        with self.lock:
            host = self.joined.pop(body["EndpointID"], None)
        if host is None:
            return {"Err": f"endpoint {body['EndpointID']} is not joined"}
        if self.kernel:
            _ip("link", "del", host, check=False)  # the peer end may be gone with its sandbox
        return {}

    def do_NetworkDriver_ProgramExternalConnectivity(self, body: dict) -> dict:
        return {}

    def do_NetworkDriver_RevokeExternalConnectivity(self, body: dict) -> dict:
        return {}

    # --- IpamDriver ----------------------------------------------------------------

    def do_IpamDriver_GetCapabilities(self, body: dict) -> dict:
        return {"RequiresMACAddress": self.requires_mac}

    def do_IpamDriver_GetDefaultAddressSpaces(self, body: dict) -> dict:
        return {"LocalDefaultAddressSpace": LOCAL_SPACE, "GlobalDefaultAddressSpace": GLOBAL_SPACE}

    def do_IpamDriver_RequestPool(self, body: dict) -> dict:
        net = ipaddress.ip_network(body["Pool"] or DEFAULT_POOL)
        pid = f"{self.pool_prefix or body['AddressSpace']}/{net}"
        with self.lock:
            if pid in self.pools:
                self.pools[pid].refs += 1
            else:
                self.pools[pid] = _Pool(net)
        return {"PoolID": pid, "Pool": str(net), "Data": {}}

    def do_IpamDriver_ReleasePool(self, body: dict) -> dict:
        with self.lock:
            pool = self.pools.get(body["PoolID"])
            if pool is None:
                return {"Error": f"no pool {body['PoolID']}"}
            pool.refs -= 1
            if pool.refs == 0:
                del self.pools[body["PoolID"]]
        return {}

    def do_IpamDriver_RequestAddress(self, body: dict) -> dict:
        with self.lock:
            pool = self.pools.get(body["PoolID"])
            if pool is None:
                return {"Error": f"no pool {body['PoolID']}"}
            if body["Address"]:
                addr = ipaddress.ip_address(body["Address"])
                if addr in pool.taken:
                    return {"Error": f"{addr} is in use"}
            else:
                addr = next((a for a in pool.net.hosts() if a not in pool.taken), None)
                if addr is None:
                    return {"Error": "pool exhausted"}
            pool.taken.add(addr)
            return {"Address": f"{addr}/{pool.net.prefixlen}", "Data": {}}

    def do_IpamDriver_ReleaseAddress(self, body: dict) -> dict:
        with self.lock:
            pool = self.pools.get(body["PoolID"])
            addr = ipaddress.ip_address(body["Address"])
            if pool is None or addr not in pool.taken:
                return {"Error": f"{addr} is not allocated"}
            pool.taken.discard(addr)
        return {}


def _handler(peer: PeerPlugin) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            return None

        def address_string(self) -> str:
            return "peer"

        def _reply(self, status: int, payload: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "application/vnd.docker.plugins.v1.1+json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            body = json.loads(raw) if raw else None
            method = self.path.lstrip("/")
            with peer.lock:
                peer.requests.append(Request(self.path, dict(self.headers), raw, body))
                kind, skip = peer.misbehaviours.get(method, (None, 0))
                if kind is not None and skip > 0:
                    peer.misbehaviours[method] = (kind, skip - 1)
                    kind = None
            err_key = "Error" if method.startswith("IpamDriver.") else "Err"
            if kind == "hang":
                peer.release.wait(30)
                self.close_connection = True
                return
            if kind == "close":
                self.close_connection = True
                with contextlib.suppress(OSError):
                    self.connection.shutdown(socket.SHUT_RDWR)
                return
            if kind == "garbage":
                return self._reply(200, b"<html>this is not JSON")
            if kind == "err":
                return self._reply(200, json.dumps({err_key: "the peer refuses"}).encode())
            if kind == "500":
                return self._reply(500, json.dumps({"Err": "the peer broke"}).encode())
            if kind == "404" or method in peer.unimplemented:
                return self._reply(404, b"404 page not found\n")
            try:
                reply = peer.handle(method, body)
            except LookupError:
                return self._reply(404, b"404 page not found\n")
            except Exception as exc:  # the peer's own bug: report it like a plugin would
                return self._reply(500, json.dumps({"Err": f"peer: {exc}"}).encode())
            if kind == "change_address" and body:
                reply = {"Interface": {"Address": "10.123.0.250/24", "MacAddress": ""}}
            if kind == "bad_join":
                reply = {**reply, "Gateway": "not-an-ip"}
            return self._reply(200, json.dumps(reply).encode())

    return Handler
