"""The bridge driver: one Linux bridge per network, containers on veth pairs.

Owns the bridge's options, the bridge device with the gateway addresses, each join's
veth pair (the container end created directly inside the sandbox, the host end on the
bridge with hairpin on, isolated from the other ports when ICC is off), the network's
firewall rules (through osl.firewall), and the deferred deletion of host ends on leave.
All kernel work goes through osl; nothing here speaks netlink.
"""

from __future__ import annotations

import errno
import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass

from .. import errors
from ..driverapi import (
    Capability,
    DriverOptions,
    EndpointInfo,
    InterfaceInfo,
    JoinInfo,
    NetworkInfo,
    SandboxInfo,
    option,
)
from ..osl.firewall import Firewall, NetworkRules
from ..osl.links import HostLinks, VethIntoSandbox
from ..types import Repair

MAX_PORTS = 1024  # a Linux bridge refuses its 1025th port (BR_MAX_PORTS)
_IFNAME_RE = re.compile(r"[^\s/:]{1,15}\Z")
HOST_PREFIX = "vc"
PEER_PREFIX = "cnm"
HOST_NETNS = "/proc/self/ns/net"  # join_on_host: the container end stays here


@dataclass(frozen=True)
class BridgeOptions(DriverOptions):
    bridge_name: str | None = option("com.docker.network.bridge.name")
    enable_icc: bool = option("com.docker.network.bridge.enable_icc", True)
    enable_ip_masquerade: bool = option("com.docker.network.bridge.enable_ip_masquerade", True)
    host_binding_ipv4: str | None = option("com.docker.network.bridge.host_binding_ipv4")
    mtu: int | None = option("com.docker.network.driver.mtu")

    def check(self) -> None:
        if self.bridge_name is not None and not _IFNAME_RE.match(self.bridge_name):
            raise errors.InvalidParameter(
                f"option 'com.docker.network.bridge.name': {self.bridge_name!r} is not a "
                "usable interface name (1-15 characters, no spaces, '/' or ':')"
            )
        if self.mtu is not None and not 68 <= self.mtu <= 65535:
            raise errors.InvalidParameter(
                f"option 'com.docker.network.driver.mtu': {self.mtu} is outside 68..65535"
            )
        if self.host_binding_ipv4 is not None:
            try:
                ipaddress.IPv4Address(self.host_binding_ipv4)
            except ValueError:
                raise errors.InvalidParameter(
                    "option 'com.docker.network.bridge.host_binding_ipv4': "
                    f"{self.host_binding_ipv4!r} is not an IPv4 address"
                ) from None


def bridge_name(network_id: str, options: BridgeOptions) -> str:
    return options.bridge_name or f"br-{network_id[:12]}"


def host_name(endpoint_id: str) -> str:
    return f"{HOST_PREFIX}{endpoint_id[:13]}"


def peer_name(endpoint_id: str) -> str:
    return f"{PEER_PREFIX}{endpoint_id[:12]}"


@dataclass
class _Net:
    info: NetworkInfo
    options: BridgeOptions
    bridge: str
    index: int | None = None

    @property
    def gateway4(self) -> ipaddress.IPv4Address | None:
        for p in self.info.ipv4:
            if p.gateway:
                return ipaddress.IPv4Interface(p.gateway).ip
        return None

    @property
    def gateway6(self) -> ipaddress.IPv6Address | None:
        for p in self.info.ipv6:
            if p.gateway:
                return ipaddress.IPv6Interface(p.gateway).ip
        return None


class BridgeDriver:
    name = "bridge"
    capability = Capability(data_scope="local", connectivity_scope="local")
    options_type = BridgeOptions
    max_ports = MAX_PORTS

    def __init__(self, links: HostLinks, firewall: Firewall) -> None:
        self.links = links
        self.firewall = firewall
        self._nets: dict[str, _Net] = {}

    # --- networks -------------------------------------------------------------------

    def restore_network(self, network: NetworkInfo) -> None:
        """Learn a network created earlier (by this or another process)."""
        opts = network.options
        assert isinstance(opts, BridgeOptions)
        self._nets[network.id] = _Net(network, opts, bridge_name(network.id, opts))

    def _net(self, network_id: str) -> _Net:
        net = self._nets.get(network_id)
        if net is None:
            raise errors.NetworkNotFound(network_id)
        if net.index is None:
            net.index = self.links.index(net.bridge)
            if net.index is None:
                raise errors.KernelError(
                    errno.ENODEV, f"bridge {net.bridge} is missing; run reconcile", operation="join"
                )
        return net

    def _rules(self, net: _Net) -> NetworkRules:
        return NetworkRules(
            network_id=net.info.id,
            bridge=net.bridge,
            subnets=tuple(ipaddress.ip_network(p.subnet) for p in (*net.info.ipv4, *net.info.ipv6)),
            internal=net.info.internal,
            masquerade=net.options.enable_ip_masquerade and not net.info.internal,
            snat_to=net.options.host_binding_ipv4,
        )

    def create_network(self, network: NetworkInfo) -> None:
        self.restore_network(network)
        net = self._nets[network.id]
        gateways = [
            ipaddress.ip_interface(p.gateway) for p in (*network.ipv4, *network.ipv6) if p.gateway
        ]
        try:
            net.index = self.links.create_bridge(
                net.bridge, mtu=net.options.mtu, addresses=gateways
            )
            try:
                self.firewall.add_network(self._rules(net))
            except BaseException:
                self.links.delete(net.bridge)
                raise
        except BaseException:
            self._nets.pop(network.id, None)
            raise

    def delete_network(self, network_id: str) -> None:
        net = self._nets.pop(network_id, None)
        self.firewall.remove_network(network_id)
        if net is not None:
            self.links.delete(net.bridge)

    # --- endpoints ------------------------------------------------------------------

    def create_endpoint(self, endpoint: EndpointInfo) -> InterfaceInfo | None:
        self._net(endpoint.network_id)
        return None

    def delete_endpoint(self, network_id: str, endpoint_id: str) -> None:
        return None

    def join(self, network_id: str, endpoint_id: str, sandbox: SandboxInfo) -> JoinInfo:
        result = self.join_many([(network_id, endpoint_id, sandbox)])[0]
        if isinstance(result, errors.CNMError):
            raise result
        return result

    def join_many(
        self, items: Sequence[tuple[str, str, SandboxInfo]]
    ) -> list[JoinInfo | errors.CNMError]:
        """Every join's veth pair in one host batch."""
        nets = [self._net(nid) for nid, _, _ in items]
        specs = [
            VethIntoSandbox(
                host_name=host_name(eid),
                sandbox_key=sb.key,
                peer_name=sb.ifname or peer_name(eid),
                master=net.index or 0,
                mtu=net.options.mtu,
                hairpin=True,
                isolated=not net.options.enable_icc,
            )
            for net, (_, eid, sb) in zip(nets, items, strict=True)
        ]
        outcomes = self.links.veths(specs)
        if any(isinstance(o, errors.KernelError) and o.errno == errno.EEXIST for o in outcomes):
            # A host end of an earlier join of the same endpoint may still be waiting in
            # the graveyard: delete the graveyard now and try those again.
            self.links.reap()
            retry = [i for i, o in enumerate(outcomes) if o is not None]
            for i, o in zip(retry, self.links.veths([specs[i] for i in retry]), strict=True):
                outcomes[i] = o
        out: list[JoinInfo | errors.CNMError] = []
        for net, spec, outcome in zip(nets, specs, outcomes, strict=True):
            if outcome is not None:
                out.append(outcome)
                continue
            out.append(
                JoinInfo(
                    src_name=spec.peer_name,
                    in_sandbox=True,
                    dst_prefix="eth",
                    gateway=None if net.info.internal else net.gateway4,
                    gateway_ipv6=None if net.info.internal else net.gateway6,
                )
            )
        return out

    def join_on_host(self, network_id: str, endpoint_id: str) -> JoinInfo:
        """A join for an engine that moves the interface into its own sandbox itself (the
        plugin server; spec/remote-protocol.md, Join): the pair's container end is made in
        the host namespace, named `peer_name(endpoint_id)`, for the engine to move in."""
        info = self.join(network_id, endpoint_id, SandboxInfo(endpoint_id, HOST_NETNS, ""))
        return JoinInfo(
            src_name=info.src_name,
            in_sandbox=False,
            dst_prefix=info.dst_prefix,
            gateway=info.gateway,
            gateway_ipv6=info.gateway_ipv6,
            static_routes=info.static_routes,
            disable_gateway_service=info.disable_gateway_service,
        )

    def leave(self, network_id: str, endpoint_id: str) -> None:
        self.leave_many([(network_id, endpoint_id)])

    def leave_many(self, items: Sequence[tuple[str, str]]) -> None:
        self.links.retire([host_name(eid) for _, eid in items])

    # --- repair ---------------------------------------------------------------------

    def reconcile(self, networks: list, endpoints: list) -> list[Repair]:
        """Host ends with no joined endpoint, bridges of networks that are gone, and the
        graveyard: each removed and reported."""
        repairs: list[Repair] = []
        joined = {host_name(e.id) for e in endpoints if e.join_state == "joined"}
        bridges = {self._nets[n.id].bridge for n in networks if n.id in self._nets}
        links = self.links.links()
        for link in links:
            stray_veth = (
                link.name.startswith(HOST_PREFIX)
                and link.kind == "veth"
                and link.name not in joined
                and len(link.name) == 15
            )
            stray_bridge = (
                link.kind == "bridge"
                and re.fullmatch(r"br-[0-9a-f]{12}", link.name) is not None
                and link.name not in bridges
            )
            if (stray_veth or stray_bridge) and self.links.delete(link.name):
                kind = "stray_host_veth_removed" if stray_veth else "stray_bridge_removed"
                repairs.append(Repair(kind, link.name))
        if self.links.pending:
            self.links.reap()
        for n in networks:
            if n.id in self._nets and self.links.index(self._nets[n.id].bridge) is None:
                net = self._nets[n.id]
                gateways = [
                    ipaddress.ip_interface(p.gateway)
                    for p in (*net.info.ipv4, *net.info.ipv6)
                    if p.gateway
                ]
                net.index = self.links.create_bridge(
                    net.bridge, mtu=net.options.mtu, addresses=gateways
                )
                self.firewall.add_network(self._rules(net))
                repairs.append(Repair("bridge_recreated", net.bridge, f"network {n.name}"))
        return repairs
