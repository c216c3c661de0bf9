"""The overlay driver: multi-host networks over VXLAN (libnetwork's overlay design).

Owns the overlay options (VNI, UDP port, MTU), the VNI of each network (claimed in the
global store by a compare-and-swap transaction: 4096 .. 2^24-1 unless the user names
one, never the same on two networks), the per-host data plane of each network (made on
its first local join through osl.overlay: a namespace with bridge + gateway and a VXLAN
device, MTU = underlay MTU - 50), each join's veth pair, and the remote peers this host
must know: the desired set is fed by the global scope (peer records in etcd), programmed
in batches, and compared with the kernel's FDB and neighbour tables to repair drift.
Overlay networks are IPv4 only (peer records carry one IPv4 address): enable_ipv6 is
refused with Unsupported. All kernel work goes through osl; nothing here speaks netlink.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
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
    option,
)
from ..osl.links import VethIntoSandbox
from ..osl.overlay import OverlayDevices, OverlayLinks, OverlaySpec, PeerEntry
from ..osl.tunnel import TunnelLinks
from ..store.etcd import Compare, Delete, EtcdStore, Get, Put
from ..types import EndpointRecord, NetworkRecord, Repair

_log = logging.getLogger(__name__)

VNI_MIN = 4096
VNI_MAX = (1 << 24) - 1
DEFAULT_PORT = 4789
MAX_PORTS = 1024  # the bridge in the network's namespace
OPT_VNI = "com.docker.network.driver.overlay.vxlanid_list"
OPT_PORT = "com.cnm.overlay.vxlan_port"
HOST_PREFIX = "ov"
PEER_PREFIX = "cnm"
_RETRIES = 32


@dataclass(frozen=True)
class OverlayOptions(DriverOptions):
    vxlanid_list: str | None = option(OPT_VNI, doc="the network's VNI (first of the list)")
    vxlan_port: int = option(OPT_PORT, DEFAULT_PORT, doc="VXLAN UDP port")
    mtu: int | None = option("com.docker.network.driver.mtu")

    @property
    def vni(self) -> int | None:
        if self.vxlanid_list is None:
            return None
        return int(self.vxlanid_list.split(",")[0].strip())

    def check(self) -> None:
        if self.vxlanid_list is not None:
            first = self.vxlanid_list.split(",")[0].strip()
            if not first.isdigit() or not 1 <= int(first) <= VNI_MAX:
                raise errors.InvalidParameter(
                    f"option {OPT_VNI!r}: {self.vxlanid_list!r} is not a VNI in 1..{VNI_MAX}"
                )
        if not 1 <= self.vxlan_port <= 65535:
            raise errors.InvalidParameter(f"option {OPT_PORT!r}: {self.vxlan_port} is no port")
        if self.mtu is not None and not 68 <= self.mtu <= 65535:
            raise errors.InvalidParameter(
                f"option 'com.docker.network.driver.mtu': {self.mtu} is outside 68..65535"
            )


def _address(sandbox: SandboxInfo) -> tuple[ipaddress.IPv4Address, str] | None:
    """The joining container's IPv4 address and MAC (what the BPF tunnel's map holds)."""
    iface = sandbox.interface
    if iface is None or iface.ipv4_address is None or not iface.mac_address:
        return None
    return ipaddress.IPv4Interface(iface.ipv4_address).ip, iface.mac_address


def host_name(endpoint_id: str) -> str:
    return f"{HOST_PREFIX}{endpoint_id[:13]}"


def peer_name(endpoint_id: str) -> str:
    return f"{PEER_PREFIX}{endpoint_id[:12]}"


def vni_key(vni: int) -> str:
    return f"vnis/{vni}"


def overlay_key(network_id: str) -> str:
    return f"overlay/{network_id}"


@dataclass
class _Net:
    info: NetworkInfo
    options: OverlayOptions
    vni: int | None = None
    dev: OverlayDevices | None = None
    peers: dict[str, PeerEntry] = field(default_factory=dict)  # remote endpoints


class OverlayDriver(JoinsInBulk):
    name = "overlay"
    capability = Capability(data_scope="global", connectivity_scope="global")
    options_type = OverlayOptions
    max_ports = MAX_PORTS

    def __init__(
        self,
        etcd: EtcdStore,
        links: OverlayLinks | TunnelLinks,
        vtep: ipaddress.IPv4Address | ipaddress.IPv6Address,
        *,
        refresh: Callable[[], None] | None = None,
    ) -> None:
        self.etcd = etcd
        self.links = links
        self.vtep = vtep
        self.refresh = refresh  # reloads every network's peers from the global store
        self._nets: dict[str, _Net] = {}
        self._pending_peers: dict[str, dict[str, PeerEntry]] = {}
        self._underlay_mtu: int | None = None
        self._lock = threading.RLock()

    # --- networks -------------------------------------------------------------------

    def restore_network(self, network: NetworkInfo) -> None:
        opts = network.options
        assert isinstance(opts, OverlayOptions)
        with self._lock:
            old = self._nets.get(network.id)
            net = _Net(network, opts)
            if old is not None:
                net.vni, net.dev, net.peers = old.vni, old.dev, old.peers
            else:
                net.peers = self._pending_peers.pop(network.id, {})
            self._nets[network.id] = net

    def create_network(self, network: NetworkInfo) -> None:
        """Claim the network's VNI in the global store; the kernel side is made on the
        first join on each host. IPv4 only: peer records and the VXLAN neighbour tables
        carry no IPv6 addresses, so enable_ipv6 is refused (Unsupported) before anything
        is claimed."""
        if network.enable_ipv6 or network.ipv6:
            raise errors.Unsupported(
                f"overlay network {network.name!r}: IPv6 is not supported on overlay "
                "networks (IPv4 only); create it without enable_ipv6"
            )
        self.restore_network(network)
        opts = network.options
        assert isinstance(opts, OverlayOptions)
        try:
            vni = self._claim_vni(network.id, opts.vni, opts.vxlan_port)
        except BaseException:
            with self._lock:
                self._nets.pop(network.id, None)
            raise
        with self._lock:
            self._nets[network.id].vni = vni

    def _claim_vni(self, network_id: str, wanted: int | None, port: int) -> int:
        record = {"vni": 0, "port": port}
        if wanted is not None:
            ok, got = self.etcd.txn(
                [Compare.absent(vni_key(wanted))],
                [
                    Put(vni_key(wanted), network_id),
                    Put(overlay_key(network_id), {**record, "vni": wanted}),
                ],
                [Get(vni_key(wanted))],
            )
            if not ok:
                owner = got[0][0].value if got and got[0] else ""
                raise errors.VNIInUse(wanted, str(owner))
            return wanted
        for _ in range(_RETRIES):
            kvs, _ = self.etcd.range("vnis/")
            used = {int(kv.key.rsplit("/", 1)[1]) for kv in kvs}
            vni = next((v for v in range(VNI_MIN, VNI_MAX + 1) if v not in used), None)
            if vni is None:
                raise errors.PoolExhausted(f"VNIs {VNI_MIN}..{VNI_MAX}")
            ok, _ = self.etcd.txn(
                [Compare.absent(vni_key(vni))],
                [
                    Put(vni_key(vni), network_id),
                    Put(overlay_key(network_id), {**record, "vni": vni}),
                ],
            )
            if ok:
                return vni
        raise errors.GlobalStoreUnavailable("etcd: too much contention on VNI allocation")

    def vni(self, network_id: str) -> int:
        """The network's VNI (read from the global store once per controller)."""
        net = self._nets.get(network_id)
        if net is not None and net.vni is not None:
            return net.vni
        kv = self.etcd.get(overlay_key(network_id))
        if kv is None:
            raise errors.Conflict(f"overlay network {network_id[:12]} has no VNI (yet)")
        vni = int(kv.value["vni"])
        if net is not None:
            net.vni = vni
        return vni

    def delete_network(self, network_id: str) -> None:
        """Remove this host's data plane of the network and release its VNI."""
        self.forget_network(network_id)
        kv = self.etcd.get(overlay_key(network_id))
        if kv is not None:
            vni = int(kv.value["vni"])
            self.etcd.txn(
                [Compare(vni_key(vni), "VERSION", 0, "GREATER")],
                [Delete(vni_key(vni)), Delete(overlay_key(network_id))],
                [Delete(overlay_key(network_id))],
            )

    def forget_network(self, network_id: str) -> None:
        """Remove this host's data plane of a network (deleted elsewhere)."""
        with self._lock:
            self._nets.pop(network_id, None)
            self._pending_peers.pop(network_id, None)
            self.links.remove(network_id)

    def _net(self, network_id: str) -> _Net:
        net = self._nets.get(network_id)
        if net is None:
            raise errors.NetworkNotFound(network_id)
        return net

    def _mtu(self, net: _Net) -> int:
        if net.options.mtu is not None:
            return net.options.mtu
        if self._underlay_mtu is None:
            self._underlay_mtu = self.links.underlay_mtu(self.vtep)
        return self._underlay_mtu - 50

    def _ensure(self, net: _Net) -> OverlayDevices:
        """The network's namespace, bridge and VXLAN on this host (adopted or made), with
        every known remote peer programmed."""
        if net.dev is not None:
            return net.dev
        dev = self.links.adopt(net.info.id)
        if dev is None:
            gateways = tuple(
                ipaddress.ip_interface(p.gateway)
                for p in (*net.info.ipv4, *net.info.ipv6)
                if p.gateway
            )
            dev = self.links.create(
                OverlaySpec(
                    network_id=net.info.id,
                    vni=self.vni(net.info.id),
                    port=net.options.vxlan_port,
                    vtep=self.vtep,
                    mtu=self._mtu(net),
                    gateways=gateways,
                )
            )
        net.dev = dev
        self._sync(net)
        return dev

    # --- endpoints ------------------------------------------------------------------

    def create_endpoint(self, endpoint: EndpointInfo) -> InterfaceInfo | None:
        self._net(endpoint.network_id)
        return None

    def delete_endpoint(self, network_id: str, endpoint_id: str) -> None:
        return None

    def join_many(
        self, items: Sequence[tuple[str, str, SandboxInfo]]
    ) -> list[JoinInfo | errors.CNMError]:
        """Each network's data plane made on first use, then one veth batch per network."""
        out: list[JoinInfo | errors.CNMError] = [
            errors.Conflict("not joined")  # replaced below
        ] * len(items)
        by_net: dict[str, list[int]] = {}
        for i, (nid, _, _) in enumerate(items):
            by_net.setdefault(nid, []).append(i)
        with self._lock:
            for nid, idxs in by_net.items():
                try:
                    net = self._net(nid)
                    dev = self._ensure(net)
                except errors.CNMError as exc:
                    for i in idxs:
                        out[i] = exc
                    continue
                specs = [
                    VethIntoSandbox(
                        host_name=host_name(items[i][1]),
                        sandbox_key=items[i][2].key,
                        peer_name=peer_name(items[i][1]),
                        master=dev.bridge,
                        mtu=self._mtu(net),
                        queues=1,  # made with the one queue it uses: no RCU wait
                    )
                    for i in idxs
                ]
                addresses = [_address(items[i][2]) for i in idxs]
                for i, spec, outcome in zip(
                    idxs, specs, self.links.attach(dev, specs, addresses), strict=True
                ):
                    out[i] = outcome or JoinInfo(
                        src_name=spec.peer_name, in_sandbox=True, dst_prefix="eth"
                    )
        return out

    def port_limit(self, network_id: str) -> int | None:
        """1024 on the kernel path (br0's ports); none on the BPF tunnel (no bridge)."""
        return self.links.port_limit

    def leave_many(self, items: Sequence[tuple[str, str]]) -> None:
        by_net: dict[str, list[str]] = {}
        for nid, eid in items:
            by_net.setdefault(nid, []).append(host_name(eid))
        with self._lock:
            for nid, names in by_net.items():
                net = self._nets.get(nid)
                dev = net.dev if net is not None else self.links.adopt(nid)
                if dev is not None:
                    self.links.detach(dev, names)

    # --- remote peers ---------------------------------------------------------------

    def load_peers(self, network_id: str, peers: Mapping[str, PeerEntry]) -> None:
        """Replace the desired remote peers of a network (the kernel follows on sync)."""
        with self._lock:
            net = self._nets.get(network_id)
            if net is None:
                self._pending_peers[network_id] = dict(peers)
            else:
                net.peers = dict(peers)

    def update_peers(
        self, network_id: str, add: Mapping[str, PeerEntry], remove: Iterable[str] = ()
    ) -> int:
        """Peers joined or left elsewhere: desired set updated, and programmed at once
        where this host has the network's data plane. Returns kernel requests applied."""
        with self._lock:
            net = self._nets.get(network_id)
            peers = net.peers if net is not None else self._pending_peers.setdefault(network_id, {})
            gone = [peers.pop(eid) for eid in remove if eid in peers]
            changed = {eid: p for eid, p in add.items() if peers.get(eid) != p}
            replaced = [peers[eid] for eid in changed if eid in peers]
            peers.update(changed)
            if net is None or net.dev is None or not (gone or changed):
                return 0
            return self.links.program_peers(net.dev, list(changed.values()), remove=gone + replaced)

    def _sync(self, net: _Net) -> list[Repair]:
        """Make the kernel's view of the remote peers (vxlan0's FDB and neighbour tables,
        or the BPF tunnel's peer map) exactly the desired ones."""
        assert net.dev is not None
        fixes = self.links.sync_peers(net.dev, list(net.peers.values()))
        return [Repair(kind, what, net.info.id) for kind, what in fixes]

    def sync(self) -> list[Repair]:
        """Drift repair of every network with a data plane here."""
        repairs: list[Repair] = []
        with self._lock:
            for net in list(self._nets.values()):
                if net.dev is None:
                    net.dev = self.links.adopt(net.info.id)
                if net.dev is not None:
                    repairs += self._sync(net)
        return repairs

    def programmed(self, network_id: str) -> tuple[set, set]:
        """(FDB, neighbour) entries the kernel holds for a network here."""
        with self._lock:
            net = self._net(network_id)
            if net.dev is None:
                return set(), set()
            return self.links.programmed(net.dev)

    # --- repair ---------------------------------------------------------------------

    def reconcile(
        self, networks: list[NetworkRecord], endpoints: list[EndpointRecord]
    ) -> list[Repair]:
        """Peers reloaded from the global store, FDB/neighbour drift fixed, namespaces of
        networks that are gone removed."""
        repairs: list[Repair] = []
        if self.refresh is not None:
            try:
                self.refresh()
            except errors.GlobalStoreUnavailable as exc:
                _log.warning("overlay reconcile without the global store: %s", exc)
        repairs += self.sync()
        known = {n.id for n in networks}
        for nid in self.links.networks():
            if nid not in known:
                self.forget_network(nid)
                repairs.append(Repair("stray_overlay_removed", nid))
        with self._lock:
            repairs += [Repair(kind, what) for kind, what in self.links.prune()]
        return repairs
