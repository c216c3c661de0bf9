"""The remote driver: every driver call forwarded to a network plugin process.

Owns the NetworkDriver side of spec/remote-protocol.md as a client: the capability
handshake (Scope / ConnectivityScope checked at registration), the exact request of
each method, and the checks on each reply. A CreateEndpoint reply may only fill
interface fields the request left empty; anything else is refused and the endpoint is
deleted at the plugin before the error is raised. A Join reply that cannot be used is
refused and the join undone with Leave. The interface a Join names (`SrcName`) is made
by the plugin on the host; the controller moves it into the sandbox, renames it
`DstPrefix` + index and applies addresses, gateway and routes. Before the move, osl
refuses (UnsafeInterface, and the join is undone with Leave) an interface that cannot be
a fresh plugin interface: the loopback, one with an IP address or a host default route.
The plugin's own options pass through untouched under `com.docker.network.generic`.
A plugin that declares GwAllocChecker is asked GwAllocCheck before a network's
addresses are requested (`skip_gateway_allocation`), with the same Options as
CreateNetwork.

Known limit, shared with the engine: a Join that fails at the transport (no reply
within the timeout, connection closed, a non-200 status, an error reply) is not
followed by a Leave. Only a Join the plugin answered with a usable reply counts as
made; a Leave then undoes it if a later step fails. A plugin that made its interface
and then hung or crashed keeps it: libnetwork's remote driver also returns the Join
error without a Leave, so a plugin must clean up a half-made join itself (typically
on its own restart, or when DeleteEndpoint comes). Likewise a failed CreateNetwork
gets no DeleteNetwork. (A failed CreateEndpoint does get a DeleteEndpoint: the
controller's rollback deletes every endpoint of the batch, the failed one included.)
"""

from __future__ import annotations

import ipaddress
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Self

from .. import errors
from ..driverapi import (
    Capability,
    DriverOptions,
    EndpointInfo,
    InterfaceInfo,
    JoinInfo,
    NetworkInfo,
    SandboxInfo,
    StaticRoute,
)
from ..plugins import Plugin, Plugins
from ..types import IPAddress, PoolData, is_interface_name, parse_mac

SUBSYSTEM = "NetworkDriver"
SCOPES = ("local", "global")  # any other Scope fails registration
GENERIC = "com.docker.network.generic"
ENABLE_IPV4 = "com.docker.network.enable_ipv4"
ENABLE_IPV6 = "com.docker.network.enable_ipv6"
INTERNAL = "com.docker.network.internal"
_IFACE_FIELDS = (
    ("Address", "ipv4_address"),
    ("AddressIPv6", "ipv6_address"),
    ("MacAddress", "mac_address"),
)


@dataclass(frozen=True)
class RemoteOptions(DriverOptions):
    """A plugin's options are its own business: every key is accepted and forwarded."""

    values: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, options: Mapping[str, str] | None, *, driver: str = "") -> Self:
        values: dict[str, str] = {}
        for key, raw in (options or {}).items():
            if not isinstance(key, str) or not isinstance(raw, str):
                raise errors.InvalidParameter(f"option {key!r}: keys and values must be strings")
            values[key] = raw
        return cls(values=values)


def _ipam_data(pools: tuple[PoolData, ...]) -> list[dict[str, Any]]:
    """IPAMData of each pool; empty keys are left out, as the engine does.

    The address space is the one the pool was requested in: a pool id is the IPAM's
    own opaque string ("fk/10.97.0.0/24" in space "fklocal"), nothing to parse.
    """
    out = []
    for p in pools:
        data: dict[str, Any] = {"AddressSpace": p.address_space} if p.address_space else {}
        data["Pool"] = p.subnet
        if p.gateway:
            data["Gateway"] = p.gateway
        if p.aux_addresses:
            data["AuxAddresses"] = dict(p.aux_addresses)
        out.append(data)
    return out


def _ip(value: object, version: int) -> IPAddress | None:
    if value in (None, ""):
        return None
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not an IP address")
    addr = ipaddress.ip_address(value)
    if addr.version != version:
        raise ValueError(f"{value} is not an IPv{version} address")
    return addr


class RemoteDriver:
    """A network driver served by a plugin (spec/remote-protocol.md, NetworkDriver)."""

    options_type = RemoteOptions

    def __init__(self, plugin: Plugin) -> None:
        self.plugin = plugin
        self.client = plugin.client
        self.name = plugin.name
        self._lock = threading.Lock()
        self._endpoint_options: dict[str, dict[str, str]] = {}
        # Endpoints this driver already deleted at the plugin after refusing its
        # CreateEndpoint reply: the controller's rollback need not delete them again.
        self._deleted: set[str] = set()
        self.capability, self.gw_alloc_checker = self._capabilities()

    def _call(self, method: str, body: Mapping[str, Any] | None = None, **kw: Any) -> Any:
        return self.client.call(f"{SUBSYSTEM}.{method}", body, **kw)

    def _fail(self, method: str, message: str) -> errors.PluginError:
        return errors.PluginError(self.name, f"{SUBSYSTEM}.{method}", message)

    def _capabilities(self) -> tuple[Capability, bool]:
        reply = self._call("GetCapabilities")
        scope = reply.get("Scope")
        connectivity = reply.get("ConnectivityScope") or scope
        for key, value in (("Scope", scope), ("ConnectivityScope", connectivity)):
            if value not in SCOPES:
                raise self._fail(
                    "GetCapabilities", f"invalid {key} {value!r}: expected 'local' or 'global'"
                )
        checker = reply.get("GwAllocChecker", False)
        if not isinstance(checker, bool):
            raise self._fail("GetCapabilities", f"GwAllocChecker must be a bool: {checker!r}")
        return Capability(data_scope=scope, connectivity_scope=connectivity), checker

    # --- networks -------------------------------------------------------------------

    @staticmethod
    def _network_options(
        options: DriverOptions, enable_ipv6: bool, internal: bool
    ) -> dict[str, Any]:
        """A network's `Options` as GwAllocCheck and CreateNetwork carry them."""
        generic = dict(options.values) if isinstance(options, RemoteOptions) else {}
        return {
            GENERIC: generic,
            ENABLE_IPV4: True,
            ENABLE_IPV6: enable_ipv6,
            INTERNAL: internal,
        }

    def skip_gateway_allocation(
        self, options: DriverOptions, *, enable_ipv6: bool, internal: bool
    ) -> tuple[bool, bool]:
        """GwAllocCheck, asked before any address is requested for a new network: may
        the IPv4 / IPv6 gateway address be left unallocated? Only a plugin that said
        GwAllocChecker is asked; for the others the answer is no (the engine's rule).
        The controller still takes a gateway the user chose, or the IPAM's pool data gave."""
        if not self.gw_alloc_checker:
            return False, False
        reply = self._call(
            "GwAllocCheck", {"Options": self._network_options(options, enable_ipv6, internal)}
        )
        skip4, skip6 = reply.get("SkipIPv4", False), reply.get("SkipIPv6", False)
        if not isinstance(skip4, bool) or not isinstance(skip6, bool):
            raise self._fail("GwAllocCheck", f"SkipIPv4 and SkipIPv6 must be bools: {reply!r}")
        return skip4, skip6

    def create_network(self, network: NetworkInfo) -> None:
        self._call(
            "CreateNetwork",
            {
                "NetworkID": network.id,
                "Options": self._network_options(
                    network.options, network.enable_ipv6, network.internal
                ),
                "IPv4Data": _ipam_data(network.ipv4),
                "IPv6Data": _ipam_data(network.ipv6),
            },
        )

    def delete_network(self, network_id: str) -> None:
        self._call("DeleteNetwork", {"NetworkID": network_id})

    # --- endpoints ------------------------------------------------------------------

    def create_endpoint(self, endpoint: EndpointInfo) -> InterfaceInfo | None:
        sent = endpoint.interface
        iface = {
            "Address": str(sent.ipv4_address) if sent.ipv4_address else "",
            "AddressIPv6": str(sent.ipv6_address) if sent.ipv6_address else "",
            "MacAddress": sent.mac_address or "",
        }
        options = dict(endpoint.options)
        reply = self._call(
            "CreateEndpoint",
            {
                "NetworkID": endpoint.network_id,
                "EndpointID": endpoint.id,
                "Interface": iface,
                "Options": options,
            },
        )
        with self._lock:
            self._endpoint_options[endpoint.id] = options
        try:
            return self._interface_reply(iface, reply.get("Interface"))
        except errors.PluginError as exc:
            try:
                self.delete_endpoint(endpoint.network_id, endpoint.id)
            except errors.CNMError as cleanup:
                exc.add_note(f"rollback: DeleteEndpoint: {cleanup}")
            else:
                with self._lock:
                    self._deleted.add(endpoint.id)
            raise

    def _interface_reply(self, sent: dict[str, str], got: object) -> InterfaceInfo | None:
        if got is None:
            return None
        if not isinstance(got, dict):
            raise self._fail("CreateEndpoint", f"Interface must be an object: {got!r}")
        filled: dict[str, Any] = {}
        for key, attr in _IFACE_FIELDS:
            value = got.get(key) or ""
            if not isinstance(value, str):
                raise self._fail("CreateEndpoint", f"Interface.{key} must be a string: {value!r}")
            if not value:
                continue
            if sent[key]:
                raise self._fail(
                    "CreateEndpoint",
                    f"the reply sets Interface.{key} to {value!r}, but it was already "
                    f"set to {sent[key]!r}",
                )
            try:
                if key == "MacAddress":
                    filled[attr] = parse_mac(value)
                else:
                    parsed = ipaddress.ip_interface(value)
                    if parsed.version != (4 if key == "Address" else 6):
                        raise ValueError(f"wrong address family for {key}")
                    filled[attr] = parsed
            except (ValueError, errors.InvalidParameter) as exc:
                raise self._fail("CreateEndpoint", f"Interface.{key} {value!r}: {exc}") from None
        return InterfaceInfo(**filled) if filled else None

    def delete_endpoint(self, network_id: str, endpoint_id: str) -> None:
        with self._lock:
            if endpoint_id in self._deleted:
                self._deleted.discard(endpoint_id)
                return
        self._call("DeleteEndpoint", {"NetworkID": network_id, "EndpointID": endpoint_id})
        with self._lock:
            self._endpoint_options.pop(endpoint_id, None)

    def endpoint_oper_info(self, network_id: str, endpoint_id: str) -> dict[str, Any]:
        reply = self._call("EndpointOperInfo", {"NetworkID": network_id, "EndpointID": endpoint_id})
        value = reply.get("Value") or {}
        if not isinstance(value, dict):
            raise self._fail("EndpointOperInfo", f"Value must be an object: {value!r}")
        return value

    # --- join and leave -------------------------------------------------------------

    def join(self, network_id: str, endpoint_id: str, sandbox: SandboxInfo) -> JoinInfo:
        with self._lock:
            options = dict(self._endpoint_options.get(endpoint_id, {}))
        reply = self._call(
            "Join",
            {
                "NetworkID": network_id,
                "EndpointID": endpoint_id,
                "SandboxKey": sandbox.key,
                "Options": options,
            },
        )
        try:
            return self._join_info(reply)
        except errors.PluginError as exc:
            try:
                self.leave(network_id, endpoint_id)
            except errors.CNMError as cleanup:
                exc.add_note(f"rollback: Leave: {cleanup}")
            raise

    def _join_info(self, reply: dict[str, Any]) -> JoinInfo:
        names = reply.get("InterfaceName") or {}
        if not isinstance(names, dict):
            raise self._fail("Join", f"InterfaceName must be an object: {names!r}")
        src = names.get("SrcName") or None
        prefix = names.get("DstPrefix") or "eth"
        for key, value in (("SrcName", src), ("DstPrefix", prefix)):
            if value is not None and not is_interface_name(value):
                raise self._fail("Join", f"InterfaceName.{key} {value!r} is not an interface name")
        if len(prefix) > 12:
            raise self._fail(
                "Join", f"InterfaceName.DstPrefix {prefix!r} leaves no room for an index"
            )
        try:
            gateway = _ip(reply.get("Gateway"), 4)
            gateway6 = _ip(reply.get("GatewayIPv6"), 6)
            routes = tuple(self._route(r) for r in reply.get("StaticRoutes") or [])
        except ValueError as exc:
            raise self._fail("Join", str(exc)) from None
        disable = reply.get("DisableGatewayService", False)
        if not isinstance(disable, bool):
            raise self._fail("Join", f"DisableGatewayService must be a bool: {disable!r}")
        return JoinInfo(
            src_name=src,
            in_sandbox=False,
            dst_prefix=prefix,
            gateway=gateway,
            gateway_ipv6=gateway6,
            static_routes=routes,
            disable_gateway_service=disable,
        )

    @staticmethod
    def _route(raw: object) -> StaticRoute:
        if not isinstance(raw, dict):
            raise ValueError(f"a static route must be an object: {raw!r}")
        dest = raw.get("Destination")
        if not isinstance(dest, str):
            raise ValueError(f"static route Destination {dest!r} is not a CIDR")
        net = ipaddress.ip_network(dest, strict=False)
        kind = raw.get("RouteType", 0)
        if kind not in (0, 1) or isinstance(kind, bool):
            raise ValueError(f"static route RouteType {kind!r}: expected 0 or 1")
        hop = _ip(raw.get("NextHop"), net.version)
        if kind == 0 and hop is None:
            raise ValueError(f"static route to {dest} (RouteType 0) has no NextHop")
        return StaticRoute(
            destination=str(net), route_type=kind, next_hop=hop if kind == 0 else None
        )

    def leave(self, network_id: str, endpoint_id: str) -> None:
        self._call("Leave", {"NetworkID": network_id, "EndpointID": endpoint_id})

    # --- opt-in: external connectivity and discovery --------------------------------

    def program_external_connectivity(
        self, network_id: str, endpoint_id: str, options: Mapping[str, Any]
    ) -> None:
        self._call(
            "ProgramExternalConnectivity",
            {"NetworkID": network_id, "EndpointID": endpoint_id, "Options": dict(options)},
            missing_ok=True,
        )

    def revoke_external_connectivity(self, network_id: str, endpoint_id: str) -> None:
        self._call(
            "RevokeExternalConnectivity",
            {"NetworkID": network_id, "EndpointID": endpoint_id},
            missing_ok=True,
        )

    def discover_new(self, discovery_type: int, data: Mapping[str, Any]) -> None:
        self._discover("DiscoverNew", discovery_type, data)

    def discover_delete(self, discovery_type: int, data: Mapping[str, Any]) -> None:
        self._discover("DiscoverDelete", discovery_type, data)

    def _discover(self, method: str, discovery_type: int, data: Mapping[str, Any]) -> None:
        # Only node discovery, and only to drivers whose networks span hosts.
        if discovery_type != 1 or self.capability.connectivity_scope != "global":
            return
        self._call(method, {"DiscoveryType": discovery_type, "DiscoveryData": dict(data)})


def remote_driver(plugins: Plugins, name: str) -> RemoteDriver | None:
    """The registry's resolver: a plugin named `name` that implements NetworkDriver."""
    plugin = plugins.get(name, SUBSYSTEM)
    return RemoteDriver(plugin) if plugin is not None else None
