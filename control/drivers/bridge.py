"""The bridge driver: one Linux bridge per network, containers on veth pairs.

Owns the bridge's options, the bridge device with the gateway addresses, each join's
veth pair (the container end created directly inside the sandbox, the host end on the
bridge with hairpin on, isolated from the other ports when ICC is off), the network's
firewall rules (through osl.firewall), and the deferred deletion of host ends on leave.
All kernel work goes through osl; nothing here speaks netlink.

BPF redirect (osl.accel, when the controller's data path is "on"): at join each
container is entered in the redirect program's map (IPv4 address, host end, MAC, network,
ICC) and the program attached to its host end, so traffic between containers of one
network skips the bridge; what the policy forbids (ICC off, other networks) is left to
the kernel path and blocked there as before. A leave removes the entries (the device,
and with it the attachment, goes with the graveyard). The container's address and MAC
come from `SandboxInfo.interface` (join_on_host's `interface`; else what create_endpoint saw).

Routed datapath (`com.cnm.bridge.datapath=routed`, IPv4 only): past a bridge's 1024 ports.
The container ends are not bridge ports: each host end gets forwarding and proxy ARP on
and a host route `<container ip>/32 dev <host end>`; the network's bridge device stays,
portless, as the holder of the gateway address (answered by ARP on every host end since
it is local). The sandbox gets the subnet's two halves as routes via the gateway, so
containers reach each other through the host (never by ARP for each other) and, with
the data path on, through the BPF redirect. The host ends carry the network's
interface group: the firewall's isolation, ICC and masquerade rules match that group
(one nft transaction per network, none per join). No port limit applies.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import ipaddress
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from .. import errors
from ..driverapi import (
    Capability,
    DriverOptions,
    EndpointInfo,
    InterfaceInfo,
    JoinInfo,
    JoinsInBulk,
    NetworkInfo,
    SandboxInfo,
    StaticRoute,
    option,
)
from ..osl.accel import AccelEndpoint, Accelerator
from ..osl.firewall import Firewall, NetworkRules
from ..osl.links import GRAVEYARD_GROUP, HostLinks, VethIntoSandbox
from ..types import Repair, is_interface_name

_log = logging.getLogger(__name__)

MAX_PORTS = 1024  # a Linux bridge refuses its 1025th port (BR_MAX_PORTS)
HOST_PREFIX = "vc"
PEER_PREFIX = "cnm"
HOST_NETNS = "/proc/self/ns/net"  # join_on_host: the container end stays here
DATAPATHS = ("bridge", "routed")
# Each veth end is made with the one TX and RX queue it uses (the kernel's default
# allocates one per possible CPU, then cuts that down to one after registration, waiting
# out an RCU grace period per end under the rtnl lock).
VETH_QUEUES = 1
JOIN_INFOS_MAX = 64  # JoinInfos kept per network (by interface name: eth0, eth1, ...)


@dataclass(frozen=True)
class BridgeOptions(DriverOptions):
    bridge_name: str | None = option("com.docker.network.bridge.name")
    enable_icc: bool = option("com.docker.network.bridge.enable_icc", True)
    enable_ip_masquerade: bool = option("com.docker.network.bridge.enable_ip_masquerade", True)
    host_binding_ipv4: str | None = option("com.docker.network.bridge.host_binding_ipv4")
    mtu: int | None = option("com.docker.network.driver.mtu")
    datapath: str = option(
        "com.cnm.bridge.datapath",
        "bridge",
        doc="bridge: containers are ports of the network's bridge (at most 1024); "
        "routed: host routes and proxy ARP per container, no port limit (IPv4 only)",
    )

    def check(self) -> None:
        if self.datapath not in DATAPATHS:
            raise errors.InvalidParameter(
                f"option 'com.cnm.bridge.datapath': {self.datapath!r} is not one of {DATAPATHS}"
            )
        if self.bridge_name is not None and not is_interface_name(self.bridge_name):
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


def routed_group(network_id: str) -> int:
    """The interface group of a routed network's host ends (top bit set: never 0 nor
    the graveyard group)."""
    digest = hashlib.blake2s(f"cnm-group:{network_id}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "big") | 0x80000000


def _halves(subnet: ipaddress.IPv4Network) -> tuple[ipaddress.IPv4Network, ...]:
    """The subnet as two routes one bit longer (more specific than the connected route)."""
    return tuple(subnet.subnets(prefixlen_diff=1))


def _join_info(net: _Net, src_name: str) -> JoinInfo:
    """What a join to `net` whose container end is `src_name` hands back."""
    routes: tuple[StaticRoute, ...] = ()
    if net.routed and net.gateway4 is not None:
        routes = tuple(
            StaticRoute(str(half), 0, net.gateway4)
            for p in net.info.ipv4
            for half in _halves(ipaddress.IPv4Network(p.subnet))
        )
    return JoinInfo(
        src_name=src_name,
        in_sandbox=True,
        dst_prefix="eth",
        gateway=None if net.info.internal else net.gateway4,
        gateway_ipv6=None if net.info.internal else net.gateway6,
        static_routes=routes,
    )


@dataclass
class _Net:
    info: NetworkInfo
    options: BridgeOptions
    bridge: str
    index: int | None = None
    # A join's JoinInfo by the name its interface is made under: the same for every join
    # of the network under that name (and immutable), so made once.
    join_infos: dict[str, JoinInfo] = field(default_factory=dict)

    # Worked out once per network (the info and options never change): every join asks
    # for them, some several times.
    @functools.cached_property
    def routed(self) -> bool:
        return self.options.datapath == "routed"

    @functools.cached_property
    def group(self) -> int | None:
        return routed_group(self.info.id) if self.routed else None

    @functools.cached_property
    def gateway4(self) -> ipaddress.IPv4Address | None:
        for p in self.info.ipv4:
            if p.gateway:
                return ipaddress.IPv4Interface(p.gateway).ip
        return None

    @functools.cached_property
    def gateway6(self) -> ipaddress.IPv6Address | None:
        for p in self.info.ipv6:
            if p.gateway:
                return ipaddress.IPv6Interface(p.gateway).ip
        return None


class BridgeDriver(JoinsInBulk):
    name = "bridge"
    capability = Capability(data_scope="local", connectivity_scope="local")
    options_type = BridgeOptions
    max_ports = MAX_PORTS
    # A join's veth pair, BPF entry and host route are found and removed by reconcile()
    # when the store has no joined endpoint for them (driverapi.KernelOnlyJoin).
    kernel_only_joins = True

    def __init__(
        self, links: HostLinks, firewall: Firewall, accel: Accelerator | None = None
    ) -> None:
        self.links = links
        self.firewall = firewall
        self.accel = accel or Accelerator("off")
        self._nets: dict[str, _Net] = {}
        # endpoint id -> its interface (from create_endpoint or join), and the address
        # entered in the BPF map at join (removed at leave)
        self._ifaces: dict[str, InterfaceInfo] = {}
        self._bpf: dict[str, ipaddress.IPv4Address] = {}

    def port_limit(self, network_id: str) -> int | None:
        """The join limit of one network: a bridge's 1024 ports, none when routed."""
        net = self._nets.get(network_id)
        return None if net is not None and net.routed else self.max_ports

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
            group=net.group,
            icc=net.options.enable_icc,
        )

    def _check_routed(self, net: _Net) -> None:
        if net.info.ipv6 or net.info.enable_ipv6:
            raise errors.InvalidParameter(
                "option 'com.cnm.bridge.datapath': routed networks are IPv4 only"
            )
        for p in net.info.ipv4:
            if ipaddress.ip_network(p.subnet).prefixlen > 30:
                raise errors.InvalidParameter(
                    f"option 'com.cnm.bridge.datapath': subnet {p.subnet} is too small to route"
                )
        for other in self._nets.values():
            if other is not net and other.routed and other.group == net.group:
                raise errors.Conflict(
                    f"routed networks {other.info.name!r} and {net.info.name!r} hash to the "
                    "same interface group"
                )

    def create_network(self, network: NetworkInfo) -> None:
        self.restore_network(network)
        net = self._nets[network.id]
        if net.routed:
            try:
                self._check_routed(net)
            except BaseException:
                self._nets.pop(network.id, None)
                raise
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
        if not self._nets and self.accel.in_use:
            self.accel.release_if_idle()

    # --- endpoints ------------------------------------------------------------------

    def create_endpoint(self, endpoint: EndpointInfo) -> InterfaceInfo | None:
        net = self._net(endpoint.network_id)
        if net.routed and endpoint.interface.ipv4_address is None:
            raise errors.InvalidParameter(
                f"endpoint {endpoint.name!r}: a routed network's endpoint needs an IPv4 address"
            )
        self._ifaces[endpoint.id] = endpoint.interface
        return None

    def delete_endpoint(self, network_id: str, endpoint_id: str) -> None:
        self._ifaces.pop(endpoint_id, None)
        return None

    def join_many(
        self, items: Sequence[tuple[str, str, SandboxInfo]]
    ) -> list[JoinInfo | errors.CNMError]:
        """Every join's veth pair in one host batch; then, for routed networks and the BPF
        redirect, one look-up per host end, one batch of host routes and one map update
        (no per-join process or namespace hop)."""
        nets = [self._net(nid) for nid, _, _ in items]
        specs = [
            VethIntoSandbox(
                host_name=host_name(eid),
                sandbox_key=sb.key,
                peer_name=sb.ifname or peer_name(eid),
                master=0 if net.routed else net.index or 0,
                mtu=net.options.mtu,
                hairpin=not net.routed,
                isolated=not net.routed and not net.options.enable_icc,
                group=net.group,
                routed=net.routed,
                queues=VETH_QUEUES,
            )
            for net, (_, eid, sb) in zip(nets, items, strict=True)
        ]
        outcomes: list[errors.CNMError | None] = self.links.veths(specs)
        if any(outcomes) and any(
            isinstance(o, errors.KernelError) and o.errno == errno.EEXIST for o in outcomes
        ):
            # A host end of an earlier join of the same endpoint may still be waiting in
            # the graveyard: delete the graveyard now and try those again.
            self.links.reap()
            retry = [i for i, o in enumerate(outcomes) if o is not None]
            for i, o in zip(retry, self.links.veths([specs[i] for i in retry]), strict=True):
                outcomes[i] = o
        if self.accel.active or any(net.routed for net in nets):
            self._program_host(items, nets, specs, outcomes)
        out: list[JoinInfo | errors.CNMError] = []
        for net, spec, outcome in zip(nets, specs, outcomes, strict=True):
            if outcome is not None:
                out.append(outcome)
                continue
            info = net.join_infos.get(spec.peer_name)
            if info is None:
                if len(net.join_infos) >= JOIN_INFOS_MAX:  # names by endpoint: join_on_host
                    net.join_infos.clear()
                info = net.join_infos[spec.peer_name] = _join_info(net, spec.peer_name)
            out.append(info)
        return out

    def _interface(self, endpoint_id: str, sandbox: SandboxInfo) -> InterfaceInfo | None:
        iface = sandbox.interface or self._ifaces.get(endpoint_id)
        if sandbox.interface is not None:
            self._ifaces[endpoint_id] = sandbox.interface
        return iface

    def _program_host(
        self,
        items: Sequence[tuple[str, str, SandboxInfo]],
        nets: list[_Net],
        specs: list[VethIntoSandbox],
        outcomes: list[errors.CNMError | None],
    ) -> None:
        """Host routes of routed joins and BPF entries + attachments of every join whose
        veth was made; a join that fails here loses its veth and gets its error."""
        accel = self.accel.active
        todo: list[tuple[int, InterfaceInfo | None]] = []
        for i, ((_, eid, sb), net) in enumerate(zip(items, nets, strict=True)):
            if outcomes[i] is None and (net.routed or accel):
                todo.append((i, self._interface(eid, sb)))
        if not todo:
            return
        indexes = self.links.indexes([specs[i].host_name for i, _ in todo])
        routes: list[tuple[int, ipaddress.IPv4Address, int]] = []
        bpf: list[tuple[int, AccelEndpoint]] = []
        for (i, iface), index in zip(todo, indexes, strict=True):
            net = nets[i]
            addr = iface.ipv4_address if iface is not None else None
            if index is None:
                outcomes[i] = errors.KernelError(
                    errno.ENODEV, f"{specs[i].host_name} vanished", operation="join"
                )
                continue
            if net.routed:
                if addr is None:
                    outcomes[i] = errors.InvalidParameter(
                        f"join to routed network {net.info.name!r} without an IPv4 address"
                    )
                    continue
                routes.append((i, ipaddress.IPv4Interface(addr).ip, index))
            if accel and addr is not None and iface is not None and iface.mac_address:
                ep = AccelEndpoint(
                    ipaddress.IPv4Interface(addr).ip,
                    index,
                    iface.mac_address,
                    net.info.id,
                    net.options.enable_icc,
                )
                bpf.append((i, ep))
        if routes:
            for (i, _, _), err in zip(
                routes, self.links.host_routes([(a, x) for _, a, x in routes]), strict=True
            ):
                if err is not None:
                    outcomes[i] = err
        bpf = [(i, ep) for i, ep in bpf if outcomes[i] is None]
        for (i, ep), err in zip(bpf, self.accel.add([ep for _, ep in bpf]), strict=True):
            if err is not None:
                outcomes[i] = err
            else:
                self._bpf[items[i][1]] = ep.address
        failed = [i for i, _ in todo if outcomes[i] is not None]
        for i in failed:
            added = self._bpf.pop(items[i][1], None)
            if added is not None:
                self.accel.remove([added])
            self.links.delete(specs[i].host_name)

    def join_on_host(
        self, network_id: str, endpoint_id: str, interface: InterfaceInfo | None = None
    ) -> JoinInfo:
        """A join for an engine that moves the interface into its own sandbox itself (the
        plugin server; spec/remote-protocol.md, Join): the pair's container end is made in
        the host namespace, named `peer_name(endpoint_id)`, for the engine to move in.
        `interface` (addresses, MAC) feeds the routed datapath and the BPF redirect, as
        `SandboxInfo.interface` does for a normal join."""
        sandbox = SandboxInfo(endpoint_id, HOST_NETNS, "", interface=interface)
        info = self.join(network_id, endpoint_id, sandbox)
        return JoinInfo(
            src_name=info.src_name,
            in_sandbox=False,
            dst_prefix=info.dst_prefix,
            gateway=info.gateway,
            gateway_ipv6=info.gateway_ipv6,
            static_routes=info.static_routes,
            disable_gateway_service=info.disable_gateway_service,
        )

    def leave_many(self, items: Sequence[tuple[str, str]]) -> None:
        names = [host_name(eid) for _, eid in items]
        try:
            if self.accel.in_use:
                # The map entry is what matters (the attachment goes with the device): by
                # the address the join entered, else (a join by another process) by host end.
                known: list[ipaddress.IPv4Address] = []
                unknown: list[str] = []
                for (_, eid), name in zip(items, names, strict=True):
                    addr = self._bpf.pop(eid, None)
                    if addr is not None:
                        known.append(addr)
                    else:
                        unknown.append(name)
                self.accel.remove(known)
                if unknown:
                    self.accel.remove_ifindexes(i for i in self.links.indexes(unknown) if i)
        finally:
            # The host ends go even when the map could not be updated (the error is raised
            # after): a leave never leaks them.
            self.links.retire(names)

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
        repairs += self._reconcile_bpf(endpoints, links)
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

    def _reconcile_bpf(self, endpoints: list, links: list) -> list[Repair]:
        """BPF map entries whose endpoint is no longer joined here (or whose host end is
        another device now) are removed, with their attachment when the device lives."""
        if not self.accel.active:
            return []
        index = {link.name: link.index for link in links if link.group != GRAVEYARD_GROUP}
        keep: dict[ipaddress.IPv4Address, int] = {}
        for e in endpoints:
            if e.join_state == "joined" and e.ipv4_address and host_name(e.id) in index:
                keep[ipaddress.IPv4Interface(e.ipv4_address).ip] = index[host_name(e.id)]
        removed = self.accel.prune(keep)
        for ep in removed:
            self._bpf = {k: v for k, v in self._bpf.items() if v != ep.address}
        return [
            Repair("bpf_endpoint_removed", str(ep.address), f"host ifindex {ep.ifindex}")
            for ep in removed
        ]
