"""Overlay networks in the kernel: one namespace per network with a bridge and a VXLAN.

Owns, per overlay network on this host, the network's own namespace (bind-mounted at
run_dir/overlay/<network id>) holding the bridge `br0` with the gateway addresses and the
VXLAN device `vxlan0` (learning off, ARP/ND answered from its neighbour table). The VXLAN
device is created from the host namespace straight into the network's namespace, so its
UDP socket stays on the underlay. Containers hang on the bridge through veth pairs whose
container end is made directly inside the sandbox. Remote peers are programmed on
`vxlan0` as a static FDB entry (MAC -> VTEP) and a permanent neighbour (IP -> MAC), in
batches, and read back by dumps for drift repair. Every call is a netlink batch on the
fast path; no process is spawned.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from cnm.fastpath import messages as m
from cnm.fastpath import netns, records, rtnl
from cnm.fastpath.transport import NetlinkError, NetlinkSocket, forget, socket_for

from .. import errors
from .links import VethIntoSandbox, veths_into_sandboxes
from .namespace import kernel_error

IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

BRIDGE = "br0"
VXLAN = "vxlan0"
VXLAN_OVERHEAD = 50  # outer Ethernet 14 + IPv4 20 + UDP 8 + VXLAN 8
DETACH_GROUP = 0x636E6D02  # "cnm" + 2: host ends leaving, deleted with one message


@dataclass(frozen=True)
class OverlaySpec:
    network_id: str
    vni: int
    port: int
    vtep: IPAddress
    mtu: int
    gateways: tuple[IPInterface, ...] = ()


@dataclass(frozen=True)
class OverlayDevices:
    key: str  # the namespace the containers' host ends live in
    bridge: int  # ifindex of br0 there (0: no bridge, the BPF tunnel's namespace)
    vxlan: int  # ifindex of the VXLAN device there
    vni: int = 0  # the network's VNI (the BPF tunnel's devices are shared by networks)
    port: int = 0  # its UDP port


@dataclass(frozen=True)
class PeerEntry:
    """A remote endpoint as the kernel holds it: IP -> MAC (neighbour), MAC -> VTEP (FDB)."""

    ip: IPAddress
    mac: str
    vtep: IPAddress


Fdb = tuple[str, IPAddress]  # (MAC, VTEP)
Neighbour = tuple[IPAddress, str]  # (IP, MAC)
Fix = tuple[str, str]  # (repair kind, what) reported by sync_peers
Address = tuple[ipaddress.IPv4Address, str]  # a joining container's (IPv4, MAC)


def underlay_mtu(vtep: IPAddress, backend: str | None = None) -> int:
    """The MTU of the host link that carries the VTEP address (1500 if none does)."""
    host = socket_for(None, backend=backend)
    try:
        idx = next(
            (
                a.index
                for a in map(records.addr_record, host.dump(rtnl.dump_addrs()))
                if a.address.ip == vtep
            ),
            None,
        )
        if idx is None:
            return 1500
        for link in map(records.link_record, host.dump(rtnl.dump_links())):
            if link.index == idx and link.mtu:
                return int(link.mtu)
    except NetlinkError as exc:
        raise kernel_error(exc, "find the underlay link") from None
    return 1500


@dataclass
class PeerChanges:
    """What to remove from and add to vxlan0's FDB and neighbour tables."""

    fdb_add: list[Fdb] = field(default_factory=list)
    fdb_del: list[Fdb] = field(default_factory=list)
    neigh_add: list[Neighbour] = field(default_factory=list)
    neigh_del: list[IPAddress] = field(default_factory=list)

    @classmethod
    def of(cls, add: Sequence[PeerEntry] = (), remove: Sequence[PeerEntry] = ()) -> PeerChanges:
        return cls(
            fdb_add=[(p.mac, p.vtep) for p in add],
            fdb_del=[(p.mac, p.vtep) for p in remove],
            neigh_add=[(p.ip, p.mac) for p in add],
            neigh_del=[p.ip for p in remove],
        )

    def __len__(self) -> int:
        return len(self.fdb_add) + len(self.fdb_del) + len(self.neigh_add) + len(self.neigh_del)


def vxlan_into(key: str, spec: rtnl.VxlanSpec, backend: str | None = None) -> None:
    """A VXLAN device made from the host namespace straight inside the namespace at `key`,
    so its UDP socket stays on the underlay (NetlinkError when the kernel refuses)."""
    from dataclasses import replace

    fd = os.open(key, os.O_RDONLY | os.O_CLOEXEC)
    try:
        socket_for(None, backend=backend).request(rtnl.vxlan(replace(spec, netns_fd=fd)))
    finally:
        os.close(fd)


def delete_host_ends(sock: NetlinkSocket, names: Sequence[str], what: str) -> None:
    """Containers' host ends (and so their pairs) deleted with one group delete: one RCU
    wait for all; a name already gone is not an error, another refusal raises KernelError."""
    if not names:
        return
    reqs = [rtnl.link_set_by_name(n, up=False, group=DETACH_GROUP) for n in names]
    reqs.append(rtnl.group_del(DETACH_GROUP))
    result = sock.execute(reqs)
    failed = {k: e for k, e in result.errors.items() if e.errno != errno.ENODEV}
    if failed:
        raise kernel_error(failed[min(failed)], what)


class OverlayLinks:
    """The kernel side of this host's overlay networks, under run_dir/overlay.

    Owns each network's namespace and its devices (br0 with the gateways, vxlan0), the
    containers' veth pairs into it, and vxlan0's FDB and neighbour entries for remote
    peers. Every method is netlink batches on the fast path. Errors: KernelError for a
    kernel refusal (naming the step), VNIInUse when this host already has a VXLAN device
    with the VNI; create() leaves nothing behind when it fails; attach() reports errors
    per item; program() does not fail on removing an entry that is already gone.
    """

    def __init__(self, run_dir: str, backend: str | None = None) -> None:
        self.dir = os.path.join(run_dir, "overlay")
        self.backend = backend

    def key(self, network_id: str) -> str:
        return os.path.join(self.dir, network_id)

    def _sock(self, key: str) -> NetlinkSocket:
        return socket_for(key, backend=self.backend)

    # --- the underlay ---------------------------------------------------------------

    datapath = "kernel"
    port_limit: int | None = 1024  # br0's ports

    def underlay_mtu(self, vtep: IPAddress) -> int:
        return underlay_mtu(vtep, self.backend)

    # --- the network's namespace ----------------------------------------------------

    def adopt(self, network_id: str) -> OverlayDevices | None:
        """The devices of a network namespace made earlier (by a controller before this
        one), or None when there is none or it is incomplete (then it is removed)."""
        key = self.key(network_id)
        if not netns.is_netns(key):
            return None
        try:
            sock = self._sock(key)
            br = records.link_record(sock.get(rtnl.link_get(BRIDGE))).index
            vx = records.link_record(sock.get(rtnl.link_get(VXLAN))).index
        except NetlinkError:
            self.remove(network_id)
            return None
        return OverlayDevices(key, br, vx)

    def create(self, spec: OverlaySpec) -> OverlayDevices:
        """The network's namespace, bridge with gateways, and VXLAN: all, or nothing."""
        key = self.key(spec.network_id)
        try:
            os.makedirs(self.dir, mode=0o755, exist_ok=True)
            netns.create(key)
        except OSError as exc:
            raise kernel_error(exc, f"create overlay namespace {key}") from None
        try:
            sock = self._sock(key)
            sock.request(rtnl.bridge(BRIDGE, mtu=spec.mtu, up=False))
            br = records.link_record(sock.get(rtnl.link_get(BRIDGE))).index
            reqs = [rtnl.addr_add(br, g) for g in spec.gateways]
            reqs.append(rtnl.link_set(br, up=True))
            sock.execute(reqs).raise_first()
            vxlan_into(
                key,
                rtnl.VxlanSpec(
                    name=VXLAN,
                    vni=spec.vni,
                    local=spec.vtep,
                    port=spec.port,
                    learning=False,
                    proxy=True,
                    mtu=spec.mtu,
                    up=False,
                ),
                self.backend,
            )
            vx = records.link_record(sock.get(rtnl.link_get(VXLAN))).index
            sock.request(rtnl.link_set(vx, master=br, up=True))
            return OverlayDevices(key, br, vx)
        except NetlinkError as exc:
            self.remove(spec.network_id)
            if exc.errno == errno.EEXIST:
                raise errors.VNIInUse(spec.vni, "(a VXLAN device on this host)") from None
            raise kernel_error(exc, f"set up overlay network {spec.network_id[:12]}") from None
        except BaseException:
            self.remove(spec.network_id)
            raise

    def remove(self, network_id: str) -> None:
        """Delete the network's namespace; every device in it goes with it. vxlan0 first,
        by itself: a namespace's devices die later, in the kernel's clean-up work, and
        until then its UDP socket (on the underlay) would refuse a new device its VNI."""
        key = self.key(network_id)
        if netns.is_netns(key):
            with contextlib.suppress(NetlinkError, OSError):
                self._sock(key).request(rtnl.link_del(name=VXLAN))
        forget(key)
        try:
            netns.delete(key)
        except OSError as exc:
            raise kernel_error(exc, f"delete overlay namespace {key}") from None

    def prune(self) -> list[Fix]:
        """Nothing outlives its network on the kernel path (see networks())."""
        return []

    def networks(self) -> list[str]:
        """Ids of the overlay namespaces present on this host."""
        if not os.path.isdir(self.dir):
            return []
        return sorted(n for n in os.listdir(self.dir) if netns.is_netns(os.path.join(self.dir, n)))

    # --- containers -----------------------------------------------------------------

    def attach(
        self,
        dev: OverlayDevices,
        items: Sequence[VethIntoSandbox],
        addresses: Sequence[Address | None] = (),
    ) -> list[errors.CNMError | None]:
        """veth pairs: host end on br0 (each item's master) in the network's namespace,
        the peer made inside its sandbox; one batch. Per item None or its error.
        (`addresses` is for the BPF tunnel; the bridge learns MACs itself.)"""
        return veths_into_sandboxes(self._sock(dev.key), items)

    def detach(self, dev: OverlayDevices, names: Sequence[str]) -> None:
        """Delete host ends (and so their pairs) with one group delete: one RCU wait."""
        delete_host_ends(self._sock(dev.key), names, "detach from overlay bridge")

    # --- remote peers ---------------------------------------------------------------

    def program(self, dev: OverlayDevices, changes: PeerChanges) -> int:
        """Removals then additions of FDB and neighbour entries on vxlan0, one batch.

        Returns how many requests the kernel applied; a removal of an entry that is
        already gone is not an error, a failed addition is raised.
        """
        vx = dev.vxlan
        batches = [
            rtnl.NeighBatch("fdb_del", vx, changes.fdb_del),
            rtnl.NeighBatch("neigh_del", vx, [(None, ip) for ip in changes.neigh_del]),
            rtnl.NeighBatch("fdb_add", vx, changes.fdb_add),
            rtnl.NeighBatch("neigh_add", vx, [(mac, ip) for ip, mac in changes.neigh_add]),
        ]
        n_remove = len(changes.fdb_del) + len(changes.neigh_del)
        if not len(changes):
            return 0
        result = self._sock(dev.key).execute_neighbours([b for b in batches if len(b)])
        failed = {k: e for k, e in result.errors.items() if k >= n_remove}
        if failed:
            k = min(failed)
            raise kernel_error(failed[k], "program overlay peers")
        return len(changes) - len(result.errors)

    def program_peers(
        self, dev: OverlayDevices, add: Sequence[PeerEntry], remove: Sequence[PeerEntry] = ()
    ) -> int:
        """Remote peers joined (FDB + neighbour added) or left (removed); see program()."""
        return self.program(dev, PeerChanges.of(add=add, remove=remove))

    def sync_peers(self, dev: OverlayDevices, desired: Sequence[PeerEntry]) -> list[Fix]:
        """Make vxlan0's FDB and neighbour tables exactly `desired`; what was fixed."""
        fdb, neigh = self.programmed(dev)
        want_fdb = {(p.mac, p.vtep) for p in desired}
        want_neigh = {(p.ip, p.mac) for p in desired}
        changes = PeerChanges(
            fdb_add=sorted(want_fdb - fdb, key=str),
            fdb_del=sorted(fdb - want_fdb, key=str),
            neigh_add=sorted(want_neigh - neigh, key=str),
            neigh_del=[ip for ip, _ in sorted(neigh - want_neigh, key=str)],
        )
        if not len(changes):
            return []
        self.program(dev, changes)
        fixes = [("overlay_fdb_restored", f"{mac} via {vtep}") for mac, vtep in changes.fdb_add]
        fixes += [("overlay_fdb_removed", f"{mac} via {vtep}") for mac, vtep in changes.fdb_del]
        fixes += [("overlay_neighbour_restored", f"{ip} {mac}") for ip, mac in changes.neigh_add]
        fixes += [("overlay_neighbour_removed", str(ip)) for ip in changes.neigh_del]
        return fixes

    def programmed(self, dev: OverlayDevices) -> tuple[set[Fdb], set[Neighbour]]:
        """What vxlan0 holds: FDB (MAC, VTEP) pairs and permanent neighbours (IP, MAC)."""
        sock = self._sock(dev.key)
        try:
            fdb = {
                (r.lladdr, r.dst)
                for r in map(records.neigh_record, sock.dump(rtnl.dump_neighbours(m.AF_BRIDGE)))
                if r.index == dev.vxlan and r.lladdr and r.dst is not None
            }
            neigh = {
                (r.dst, r.lladdr)
                for r in map(records.neigh_record, sock.dump(rtnl.dump_neighbours()))
                if r.family != m.AF_BRIDGE
                and r.index == dev.vxlan
                and r.state & m.NUD_PERMANENT
                and r.dst is not None
                and r.lladdr
            }
        except NetlinkError as exc:
            raise kernel_error(exc, "dump overlay peers") from None
        return fdb, neigh  # type: ignore[return-value]
