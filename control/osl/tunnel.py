"""Overlay networks on the BPF tunnel: the host's tunnel namespace (cnm.ebpf.tunnel).

The overlay data path when the controller's eBPF data path is in use. Owns, on this host:

- the tunnel namespace (bind-mounted at run_dir/tunnel/ns), shared by every overlay
  network here: one external (collect-metadata) VXLAN device per UDP port in use
  (`vxt<port>`), made from the host namespace so its UDP socket stays on the underlay,
  and the host end of every overlay container's veth, each a port of a headroom bridge
  that is never up (`hr<k>`: it forwards nothing, it only gives the containers room for
  the VXLAN headers, see _headroom_bridge);
- the TunnelOwner of each port (cnm_tunnel, pinned under <pin root>/tunnel-<port>):
  cnm_tunnel_ingress on the VXLAN device, cnm_tunnel_egress on each host end, attached
  in the join's own netlink batch;
- the map entries: each local container (address -> host end, MAC, VNI), written at
  join and removed at leave, and each remote peer (address -> VTEP, MAC, VNI), fed by
  the same peer records as the kernel path's FDB (program_peers, sync_peers);
- a marker per network (run_dir/tunnel/networks/<id>: its VNI, port and VTEP address);
- the port's RX accelerator, when a host device holds the VTEP address: the uplink veth
  pair (`vxu<port>` in the host namespace, `vxi<port>` in the tunnel namespace, both up,
  no addresses), cnm_tunnel_uplink on vxi and cnm_tunnel_decap on that host device
  (tcx beside other programs; clsact at the port's priority otherwise), which decapsulate
  the frames cnm_tunnel_ingress would deliver before the host's stack sees them and put
  them into their containers through the pair. Everything else (and everything, when no
  device holds the address: logged) takes the VXLAN device's path, so detaching the
  accelerator or deleting the pair changes only speed (the pair's end is held in a
  device map the kernel empties when it goes). It skips the host's netfilter for the
  frames it takes, which come only from known peers' VTEPs.

A frame from a container to a peer gets its tunnel key from the map and goes straight to
the VXLAN device; a decapsulated frame goes straight into its container
(bpf_redirect_peer); the program answers the containers' ARP from the maps. Frames
between VNIs are never carried; what the program does not know is dropped by the
namespace (no forwarding, no addresses). There is no kernel path underneath: detaching
a program stops its traffic (cnm_tunnel_decap excepted: only speed), and sync_peers
(reconcile, the agent's periodic repair) attaches it again and remakes a missing uplink.
The driver-facing interface is OverlayLinks' (osl.overlay); errors: KernelError naming
the step, Conflict when a kernel-path overlay namespace holds the UDP port,
EbpfUnavailable when the programs cannot be loaded.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import ipaddress
import json
import logging
import os
import socket
import threading
from collections.abc import Iterator, Sequence
from typing import Any

from cnm.fastpath import netns, records, rtnl
from cnm.fastpath.transport import NetlinkError, NetlinkSocket, adopt_current, forget, socket_for

from .. import errors
from .accel import Accelerator, map_error
from .links import VethIntoSandbox, veths_into_sandboxes
from .namespace import _disable_ipv6_by_default, kernel_error
from .overlay import (
    Address,
    Fdb,
    Fix,
    IPAddress,
    Neighbour,
    OverlayDevices,
    OverlayLinks,
    OverlaySpec,
    PeerEntry,
    delete_host_ends,
    underlay_mtu,
    vxlan_into,
)

_log = logging.getLogger(__name__)

NAMESPACE = "ns"
MARKERS = "networks"
HEADROOM = "hr"  # bridges hr0, hr1, ...: never up, never forward (see _headroom_bridge)
HEADROOM_BRIDGES = 64  # 64 x ~1020 host ends


UPLINK = "vxu"  # vxu<port>: the RX accelerator's uplink pair, host-namespace end
UPLINK_PEER = "vxi"  # vxi<port>: its tunnel-namespace end


def device_name(port: int) -> str:
    return f"vxt{port}"


def uplink_names(port: int) -> tuple[str, str]:
    """The names of the port's uplink pair: (host-namespace end, tunnel-namespace end)."""
    return f"{UPLINK}{port}", f"{UPLINK_PEER}{port}"


class TunnelLinks:
    """The BPF tunnel data path of this host's overlay networks (see the module doc)."""

    datapath = "bpf"
    port_limit: int | None = None  # no bridge: no 1024-port limit

    def __init__(self, run_dir: str, pin_root: str, backend: str | None = None) -> None:
        self.dir = os.path.join(run_dir, "tunnel")
        self.key = os.path.join(self.dir, NAMESPACE)
        self.marks = os.path.join(self.dir, MARKERS)
        self.pin_root = pin_root
        self.backend = backend
        self._owners: dict[int, Any] = {}  # port -> TunnelOwner
        self._local: dict[int, ipaddress.IPv4Address] = {}  # host-end ifindex -> address
        self._headroom = 0  # the headroom bridge new host ends go on (the last one used)
        self._lock = threading.RLock()

    # --- shared pieces --------------------------------------------------------------

    @contextlib.contextmanager
    def _flock(self) -> Iterator[None]:
        """This host's tunnel directory, locked against other cnm processes."""
        os.makedirs(self.dir, mode=0o755, exist_ok=True)
        fd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            with self._lock:
                yield
        finally:
            os.close(fd)

    def _sock(self) -> NetlinkSocket:
        return socket_for(self.key, backend=self.backend)

    def _prepare(self, path: str) -> None:
        _disable_ipv6_by_default()
        adopt_current(path, backend=self.backend)

    def _owner(self, port: int, vxlan: int, *, fresh: bool = False) -> Any:
        """The port's TunnelOwner, loaded (or picked up from its pins) for device `vxlan`."""
        owner = self._owners.get(port)
        if owner is not None and owner.vxlan_ifindex == vxlan:
            return owner
        if owner is not None:
            owner.close()
            del self._owners[port]
        try:
            from cnm.ebpf.tunnel import TunnelOwner

            owner = TunnelOwner(vxlan, os.path.join(self.pin_root, f"tunnel-{port}"), port=port)
            owner.load()
            if fresh:  # a new namespace: no host end of an earlier one is left
                with owner.lock:
                    for ep in owner.endpoints():
                        owner.remove_endpoint(ep.address)
        except ImportError as exc:
            raise errors.EbpfUnavailable(f"cnm.ebpf cannot be imported: {exc}") from exc
        except errors.CNMError:
            raise
        except Exception as exc:
            raise map_error(exc, "load cnm_tunnel") from exc
        self._owners[port] = owner
        return owner

    def _marker(self, network_id: str) -> dict[str, int] | None:
        try:
            with open(os.path.join(self.marks, network_id)) as f:
                data = json.load(f)
            return {"vni": int(data["vni"]), "port": int(data["port"])}
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _write_marker(
        self, network_id: str, vni: int, port: int, vtep: IPAddress | None = None
    ) -> None:
        os.makedirs(self.marks, mode=0o755, exist_ok=True)
        path = os.path.join(self.marks, network_id)
        tmp = f"{path}.tmp"
        data: dict[str, Any] = {"vni": vni, "port": port}
        if vtep is not None:
            data["vtep"] = str(vtep)
        with open(tmp, "w") as f:
            json.dump(data, f)
        os.replace(tmp, path)

    def _port_vtep(self, port: int, owner: Any) -> ipaddress.IPv4Address | None:
        """The local VTEP address of the port's networks (their markers; else the one the
        accelerator was set up with), None when unknown or not IPv4."""
        for network_id in self.networks():
            try:
                with open(os.path.join(self.marks, network_id)) as f:
                    data = json.load(f)
                if int(data["port"]) == port and "vtep" in data:
                    vtep = ipaddress.ip_address(data["vtep"])
                    return vtep if isinstance(vtep, ipaddress.IPv4Address) else None
            except (OSError, ValueError, KeyError, TypeError):
                continue
        config = owner.uplink()
        return config.vtep if config is not None else None

    def underlay_mtu(self, vtep: IPAddress) -> int:
        return underlay_mtu(vtep, self.backend)

    # --- networks -------------------------------------------------------------------

    def networks(self) -> list[str]:
        """Ids of the overlay networks with a data plane on this host."""
        if not os.path.isdir(self.marks):
            return []
        return sorted(n for n in os.listdir(self.marks) if not n.endswith(".tmp"))

    def adopt(self, network_id: str) -> OverlayDevices | None:
        """The network's devices when this host has its data plane (made by this or an
        earlier controller); None otherwise (a marker whose namespace is gone is dropped)."""
        mark = self._marker(network_id)
        if mark is None:
            return None
        with self._flock():
            if not netns.is_netns(self.key):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(self.marks, network_id))
                return None
            vx = _ifindex(self._sock(), device_name(mark["port"]))
            if not vx:
                return None
            self._owner(mark["port"], vx)
            return OverlayDevices(self.key, 0, vx, mark["vni"], mark["port"])

    def create(self, spec: OverlaySpec) -> OverlayDevices:
        """The tunnel namespace, the port's VXLAN device and programs (made when missing)
        and the network's marker: all, or nothing new."""
        with self._flock():
            for other in self.networks():
                mark = self._marker(other)
                if other != spec.network_id and mark is not None and mark["vni"] == spec.vni:
                    # The global store never gives one VNI to two live networks: this
                    # one's network was deleted while this host was away.
                    _log.info("overlay %s: forgetting stale network %s", spec.vni, other[:12])
                    self._forget(other)
            fresh = not netns.is_netns(self.key)
            made_device = False
            try:
                if fresh:
                    try:
                        netns.create(self.key, self._prepare)
                    except OSError as exc:
                        raise kernel_error(exc, f"create tunnel namespace {self.key}") from None
                vx, made_device = self._device(spec)
                owner = self._owner(spec.port, vx, fresh=fresh or made_device)
                if not owner.attached(vx, netns=self.key):
                    owner.attach_vxlan(netns=self.key, ifindex=vx)
                self._write_marker(spec.network_id, spec.vni, spec.port, spec.vtep)
                vtep = spec.vtep if isinstance(spec.vtep, ipaddress.IPv4Address) else None
                self._accelerate(owner, spec.port, vtep, quiet=False)
            except BaseException as exc:
                if fresh or not self.networks():
                    self._teardown()
                elif made_device:
                    with contextlib.suppress(NetlinkError):
                        self._sock().request(rtnl.link_del(name=device_name(spec.port)))
                if isinstance(exc, errors.CNMError | KeyboardInterrupt | SystemExit):
                    raise
                if isinstance(exc, NetlinkError):
                    raise kernel_error(exc, "set up the BPF tunnel") from None
                if isinstance(exc, Exception):
                    raise map_error(exc, "set up the BPF tunnel") from exc
                raise
            return OverlayDevices(self.key, 0, vx, spec.vni, spec.port)

    def _device(self, spec: OverlaySpec) -> tuple[int, bool]:
        """The port's external VXLAN device in the tunnel namespace: (ifindex, made now)."""
        sock = self._sock()
        name = device_name(spec.port)
        vx = _ifindex(sock, name)
        if vx:
            link = records.link_record(sock.get(rtnl.link_get(name)))
            if link.mtu is not None and link.mtu < spec.mtu:
                sock.request(rtnl.link_set(vx, mtu=spec.mtu))
            return vx, False
        try:
            vxlan_into(
                self.key,
                rtnl.VxlanSpec(
                    name=name,
                    local=spec.vtep,
                    port=spec.port,
                    external=True,
                    learning=False,
                    mtu=spec.mtu,
                    up=True,
                ),
                self.backend,
            )
        except NetlinkError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EEXIST):
                raise errors.Conflict(
                    f"UDP port {spec.port} is held by another VXLAN socket on this host "
                    "(an overlay network on the kernel path, made by a controller with "
                    "ebpf='off'?): the BPF tunnel cannot use it; leave and delete that "
                    "network's containers on this host first"
                ) from None
            raise kernel_error(exc, f"create VXLAN device {name}") from None
        return sock.ifindex(name), True

    def remove(self, network_id: str) -> None:
        """Forget the network here: its map entries and marker; the namespace, devices
        and pins go with the last network."""
        with self._flock():
            self._forget(network_id)
            if not self.networks():
                self._teardown()

    def _forget(self, network_id: str) -> None:
        """The network's map entries and marker (lock held)."""
        mark = self._marker(network_id)
        if mark is not None and netns.is_netns(self.key):
            owner = self._owners.get(mark["port"])
            if owner is None:
                with contextlib.suppress(NetlinkError, errors.CNMError):
                    vx = self._sock().ifindex(device_name(mark["port"]))
                    owner = self._owner(mark["port"], vx)
            if owner is not None:
                try:
                    with owner.lock:
                        for ep in owner.endpoints():
                            if ep.vni == mark["vni"]:
                                owner.remove_endpoint(ep.address)
                        for peer in owner.peers():
                            if peer.vni == mark["vni"]:
                                owner.remove_peer(peer.address)
                except Exception as exc:
                    raise map_error(exc, "BPF tunnel map clean-up") from exc
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(self.marks, network_id))

    def prune(self) -> list[Fix]:
        """Remove a tunnel namespace (and its pins) that no network holds any more, as a
        crash between forgetting the last network and the teardown leaves it."""
        if not netns.is_netns(self.key) or self.networks():
            return []
        with self._flock():
            if not netns.is_netns(self.key) or self.networks():
                return []
            self._teardown()
        return [("tunnel_namespace_removed", self.key)]

    def _teardown(self) -> None:
        """The namespace (every device in it), the accelerators, the pins and the
        directory (lock held)."""
        for entry in _listdir(self.pin_root):
            if entry.startswith("tunnel-") and entry.removeprefix("tunnel-").isdigit():
                self._decelerate(int(entry.removeprefix("tunnel-")))
        for owner in self._owners.values():
            with contextlib.suppress(Exception):
                owner.close()
                owner.unpin()
                os.rmdir(owner.pin_root)
        self._owners.clear()
        self._local.clear()
        # Pins of ports this process never loaded (another process made them).
        for entry in _listdir(self.pin_root):
            if entry.startswith("tunnel-"):
                with contextlib.suppress(Exception):
                    from cnm.ebpf import loader

                    loader.unpin_dir(os.path.join(self.pin_root, entry, "cnm_tunnel"))
                    os.rmdir(os.path.join(self.pin_root, entry))
        if netns.is_netns(self.key):
            # The VXLAN devices first, by themselves: a namespace's devices die later, in
            # the kernel's clean-up work, and until then their UDP sockets (on the
            # underlay) would refuse the next tunnel its port.
            with contextlib.suppress(NetlinkError, OSError):
                sock = self._sock()
                for link in map(records.link_record, sock.dump(rtnl.dump_links())):
                    if link.name and link.name.startswith("vxt"):
                        sock.request(rtnl.link_del(link.index))
        forget(self.key)
        if netns.is_netns(self.key):
            try:
                netns.delete(self.key)
            except OSError as exc:
                raise kernel_error(exc, f"delete tunnel namespace {self.key}") from None
        with contextlib.suppress(OSError):
            os.rmdir(self.marks)

    # --- the RX accelerator ---------------------------------------------------------

    def _accelerate(
        self, owner: Any, port: int, vtep: ipaddress.IPv4Address | None, *, quiet: bool = True
    ) -> list[Fix]:
        """The port's RX accelerator, made or repaired (see the module doc): the uplink
        pair, cnm_tunnel_uplink on its tunnel end, the accelerator's configuration and
        cnm_tunnel_decap on the host device holding `vtep`. Returns what it fixed. It is
        only speed: when no host device holds the address, or a step fails, it is left
        out (logged) and the VXLAN device's path carries everything. Lock held."""
        try:
            return self._accelerate_now(owner, port, vtep, quiet)
        except Exception as exc:  # the VXLAN device's path still carries everything
            _log.warning("overlay port %s: no RX accelerator: %s", port, exc)
            return []

    def _accelerate_now(
        self, owner: Any, port: int, vtep: ipaddress.IPv4Address | None, quiet: bool
    ) -> list[Fix]:
        fixes: list[Fix] = []
        host = socket_for(None, backend=self.backend)
        config = owner.uplink()
        device = _address_holder(host, vtep) if vtep is not None else None
        if device is None:
            if config is not None:  # the address left its device: off until it is back
                self._decelerate(port, owner)
            log = _log.debug if quiet else _log.info
            log("overlay port %s: no host device holds VTEP %s: no RX accelerator", port, vtep)
            return fixes
        assert vtep is not None
        index, name = device
        host_end, tunnel_end = uplink_names(port)
        sock = self._sock()
        up, peer = _ifindex(host, host_end), _ifindex(sock, tunnel_end)
        if not (up and peer):
            with contextlib.suppress(NetlinkError):  # half a pair: made again whole
                if up:
                    host.request(rtnl.link_del(up))
                if peer:
                    sock.request(rtnl.link_del(peer))
            mtu = records.link_record(host.get(rtnl.link_get(name))).mtu or 1500
            up, peer = self._uplink_pair(host, port, mtu)
            fixes.append(("tunnel_uplink_made", host_end))
        if not owner.uplink_attached(peer, netns=self.key):
            owner.attach_uplink(peer, netns=self.key)
            if not fixes:
                fixes.append(("tunnel_program_reattached", tunnel_end))
        if config is not None and config.device and config.device != index:
            with contextlib.suppress(Exception):  # the address moved to another device
                owner.detach_decap(config.device)
        if config is None or (config.vtep, config.uplink, config.device) != (vtep, up, index):
            owner.set_uplink(vtep, up, index)
        if not owner.decap_attached(index):
            owner.attach_decap(index)
            fixes.append(("tunnel_program_reattached", name))
        return fixes

    def _uplink_pair(self, host: NetlinkSocket, port: int, mtu: int) -> tuple[int, int]:
        """The port's uplink veth pair made (host end here, peer in the tunnel
        namespace), IPv6 off on the host end, both up: (host end, peer) indexes."""
        host_end, tunnel_end = uplink_names(port)
        fd = os.open(self.key, os.O_RDONLY | os.O_CLOEXEC)
        try:
            spec = rtnl.VethSpec(
                name=host_end, peer_name=tunnel_end, peer_netns_fd=fd, mtu=mtu, up=False, queues=1
            )
            host.request(rtnl.veth(spec))
        finally:
            os.close(fd)
        try:
            path = f"/proc/sys/net/ipv6/conf/{host_end}/disable_ipv6"
            with contextlib.suppress(FileNotFoundError), open(path, "w") as f:
                f.write("1")
            up = host.ifindex(host_end)
            host.request(rtnl.link_set(up, up=True))
            sock = self._sock()
            peer = sock.ifindex(tunnel_end)
            sock.request(rtnl.link_set(peer, up=True))
        except BaseException:
            with contextlib.suppress(NetlinkError):
                host.request(rtnl.link_del(name=host_end))
            raise
        return up, peer

    def _decelerate(self, port: int, owner: Any | None = None) -> None:
        """The port's accelerator taken away: cnm_tunnel_decap off its host device, the
        configuration cleared and the uplink pair deleted (lock held; best effort)."""
        from cnm.ebpf import loader
        from cnm.ebpf.tunnel import DECAP, pinned_uplink

        owner = owner or self._owners.get(port)
        program, config = None, None
        with contextlib.suppress(Exception):
            if owner is not None and owner.loaded:
                program, config = owner.programs.get(DECAP), owner.uplink()
            else:
                pins = os.path.join(self.pin_root, f"tunnel-{port}", "cnm_tunnel")
                program, config = pinned_uplink(pins)
        try:
            if program is not None and config is not None and config.device:
                with contextlib.suppress(Exception):
                    loader.tc_detach(config.device, shared_with=program, priority=port)
            if owner is not None and owner.loaded:
                with contextlib.suppress(Exception):
                    owner.clear_uplink()
        finally:
            if program is not None and (owner is None or not owner.loaded):
                program.close()
        with contextlib.suppress(NetlinkError, OSError):
            socket_for(None, backend=self.backend).request(
                rtnl.link_del(name=uplink_names(port)[0])
            )

    # --- containers -----------------------------------------------------------------

    def attach(
        self,
        dev: OverlayDevices,
        items: Sequence[VethIntoSandbox],
        addresses: Sequence[Address | None] = (),
    ) -> list[errors.CNMError | None]:
        """veth pairs with their host ends in the tunnel namespace (no master) and the
        peer made inside its sandbox, each container's map entry, and cnm_tunnel_egress
        on each host end: one veth batch, one map batch, one attach batch. Per item None
        or its error; an item that failed leaves neither device nor entry."""
        from cnm.ebpf.tunnel import EGRESS, TunnelEndpoint

        sock = self._sock()
        out = self._veths(sock, items)
        made = [i for i, o in enumerate(out) if o is None]
        with self._lock:
            owner = self._owners.get(dev.port) or self._owner(dev.port, dev.vxlan)
            entries: list[tuple[int, Any]] = []
            for i, it in enumerate(items):
                if out[i] is not None:
                    continue
                addr = addresses[i] if i < len(addresses) else None
                try:
                    if addr is None:
                        raise errors.InvalidParameter(
                            f"a join to an overlay network on the BPF tunnel needs an IPv4 "
                            f"address and a MAC ({it.host_name})"
                        )
                    index = sock.ifindex(it.host_name)
                    entries.append((i, TunnelEndpoint(addr[0], index, addr[1], dev.vni)))
                except NetlinkError as exc:
                    out[i] = kernel_error(exc, f"find {it.host_name}")
                except errors.CNMError as exc:
                    out[i] = exc
                except Exception as exc:
                    out[i] = map_error(exc, f"BPF tunnel entry of {it.host_name}")
            if entries:
                try:
                    with owner.lock:
                        owner.ensure_current()
                        owner.add_endpoints([e for _, e in entries])
                except Exception as exc:
                    err = map_error(exc, "BPF tunnel endpoint map update")
                    for i, _ in entries:
                        out[i] = err
                    entries = []
            if entries:
                self._attach_egress(owner.program(EGRESS).fd, entries, items, out, sock)
                for i, e in entries:
                    if out[i] is None:
                        self._local[e.ifindex] = e.address
                    else:
                        with contextlib.suppress(Exception):
                            owner.remove_endpoint(e.address)
            for i in made:  # a pair made whose later step failed is removed again
                if out[i] is not None:
                    with contextlib.suppress(NetlinkError):
                        sock.request(rtnl.link_del(name=items[i].host_name))
        return out

    def _headroom_bridge(self, sock: NetlinkSocket, k: int) -> int:
        """The ifindex of headroom bridge k, made when missing.

        A frame a container sends leaves through the VXLAN device, which puts 50 bytes of
        headers in front of it; the container's stack reserves that room only when its
        eth0 asks for it (needed_headroom), and a veth asks for what its peer's bridge
        tells it. So every host end is a port of a bridge that also holds a VXLAN device
        (`hrv<k>`, never up: no socket); the bridge is never up, so its ports forward
        nothing (cnm_tunnel runs before the bridge and takes every frame it knows; the
        rest is dropped, as without it). Without it, every frame is copied into a bigger
        buffer on its way out. A bridge takes ~1020 ports: the next one is made then."""
        name = f"{HEADROOM}{k}"
        if index := _ifindex(sock, name):
            return index
        try:
            sock.request(rtnl.bridge(name, up=False))
            br = sock.ifindex(name)
            source = rtnl.VxlanSpec(name=f"{HEADROOM}v{k}", vni=k + 1, master=br, up=False)
            sock.request(rtnl.vxlan(source))
        except NetlinkError as exc:
            if exc.errno != errno.EEXIST:  # EEXIST: another process made it meanwhile
                raise kernel_error(exc, f"create headroom bridge {name}") from None
        return sock.ifindex(name)

    def _veths(
        self, sock: NetlinkSocket, items: Sequence[VethIntoSandbox]
    ) -> list[errors.CNMError | None]:
        """The veth pairs, host ends on the current headroom bridge (the next one for the
        items a full bridge refused)."""
        out: list[errors.CNMError | None] = [None] * len(items)
        todo = list(range(len(items)))
        while todo:
            k = self._headroom
            try:
                br = self._headroom_bridge(sock, k)
            except errors.CNMError as exc:
                for i in todo:
                    out[i] = exc
                return out
            specs = [_on_bridge(items[i], br) for i in todo]
            full: list[int] = []
            for i, err in zip(todo, veths_into_sandboxes(sock, specs), strict=True):
                if isinstance(err, errors.KernelError) and err.errno == errno.EXFULL:
                    full.append(i)
                else:
                    out[i] = err
            if full and k + 1 >= HEADROOM_BRIDGES:
                for i in full:
                    out[i] = errors.KernelError(
                        errno.EXFULL,
                        f"the BPF tunnel is full ({HEADROOM_BRIDGES} headroom bridges)",
                        operation="join",
                    )
                break
            if full:
                self._headroom = k + 1
            todo = full
        return out

    def _attach_egress(
        self,
        fd: int,
        entries: list[tuple[int, Any]],
        items: Sequence[VethIntoSandbox],
        out: list[errors.CNMError | None],
        sock: NetlinkSocket,
    ) -> None:
        """cnm_tunnel_egress on each new host end: clsact + a direct-action filter, one
        netlink batch for all (not tcx: see loader.tc_attach). An item that fails gets its
        error in `out`."""
        from cnm.ebpf import loader
        from cnm.ebpf.tunnel import EGRESS

        reqs = []
        for _, e in entries:
            reqs.append(rtnl.clsact(e.ifindex))
            reqs.append(
                rtnl.bpf_filter(
                    e.ifindex, fd, EGRESS, handle=loader.TC_HANDLE, prio=loader.TC_PRIORITY
                )
            )
        result = sock.execute(reqs)
        for k, exc in result.errors.items():
            if k % 2:  # the filter's outcome is the entry's
                i, _ = entries[k // 2]
                out[i] = kernel_error(exc, f"attach cnm_tunnel to {items[i].host_name}")

    def detach(self, dev: OverlayDevices, names: Sequence[str]) -> None:
        """Map entries of the host ends removed first (nothing is redirected to a dying
        device), then the host ends (and so their pairs) with one group delete."""
        if not names:
            return
        sock = self._sock()
        indexes: list[int] = []
        for n in names:
            with contextlib.suppress(NetlinkError):
                indexes.append(sock.ifindex(n))
        with self._lock:
            owner = self._owners.get(dev.port)
            if owner is not None and indexes:
                try:
                    with owner.lock:
                        owner.ensure_current()
                        for addr in self._addresses(owner, indexes):
                            owner.remove_endpoint(addr)
                except Exception as exc:
                    raise map_error(exc, "BPF tunnel endpoint map delete") from exc
        delete_host_ends(sock, names, "detach from the BPF tunnel")

    def _addresses(self, owner: Any, indexes: Sequence[int]) -> list[ipaddress.IPv4Address]:
        """The map's addresses of these host ends: from this process's cache when the map
        agrees (another process may have made the namespace anew, reusing indexes), else
        from one pass over the map."""
        from cnm.ebpf.tunnel import LOCAL, TunnelEndpoint

        found: list[ipaddress.IPv4Address] = []
        missing: set[int] = set()
        for i in indexes:
            addr = self._local.pop(i, None)
            raw = owner.map(LOCAL).lookup(addr.packed) if addr is not None else None
            if (
                addr is not None
                and raw is not None
                and TunnelEndpoint.from_raw(addr.packed, raw).ifindex == i
            ):
                found.append(addr)
                continue
            missing.add(i)
        if missing:
            found += [ep.address for ep in owner.endpoints() if ep.ifindex in missing]
        return found

    # --- remote peers ---------------------------------------------------------------

    def program_peers(
        self, dev: OverlayDevices, add: Sequence[PeerEntry], remove: Sequence[PeerEntry] = ()
    ) -> int:
        """Peers left (their entries removed: frames to them are dropped) and joined
        (entries added, one map batch). Returns how many entries changed."""
        from cnm.ebpf.tunnel import TunnelPeer

        with self._lock:
            owner = self._owners.get(dev.port) or self._owner(dev.port, dev.vxlan)
            try:
                with owner.lock:
                    owner.ensure_current()
                    removed = sum(1 for p in remove if owner.remove_peer(p.ip))
                    peers = [TunnelPeer(p.ip, p.vtep, p.mac, dev.vni) for p in add]
                    owner.add_peers(peers)
            except Exception as exc:
                raise map_error(exc, "program BPF tunnel peers") from exc
        return removed + len(peers)

    def _peers(self, owner: Any, vni: int) -> dict[ipaddress.IPv4Address, PeerEntry]:
        return {
            p.address: PeerEntry(p.address, p.mac, p.vtep) for p in owner.peers() if p.vni == vni
        }

    def sync_peers(self, dev: OverlayDevices, desired: Sequence[PeerEntry]) -> list[Fix]:
        """Make the peer map's entries of this VNI exactly `desired`, put back a program
        that was taken off the VXLAN device or a host end, and drop entries of host ends
        that are gone. Returns what was fixed."""
        from cnm.ebpf.tunnel import TunnelPeer

        fixes: list[Fix] = []
        with self._lock:
            owner = self._owners.get(dev.port) or self._owner(dev.port, dev.vxlan)
            try:
                with owner.lock:
                    owner.ensure_current()
                    have = self._peers(owner, dev.vni)
                    want = {p.ip: p for p in desired}
                    for ip, p in have.items():
                        if ip not in want:
                            owner.remove_peer(ip)
                            fixes.append(("overlay_peer_removed", f"{ip} via {p.vtep}"))
                    add = [p for ip, p in want.items() if have.get(ip) != p]
                    owner.add_peers([TunnelPeer(p.ip, p.vtep, p.mac, dev.vni) for p in add])
                    fixes += [("overlay_peer_restored", f"{p.ip} via {p.vtep}") for p in add]
                    fixes += self._check_programs(owner, dev)
            except errors.CNMError:
                raise
            except Exception as exc:
                raise map_error(exc, "repair the BPF tunnel") from exc
        return fixes

    def _check_programs(self, owner: Any, dev: OverlayDevices) -> list[Fix]:
        fixes: list[Fix] = []
        if not owner.attached(dev.vxlan, netns=self.key):
            owner.attach_vxlan(netns=self.key, ifindex=dev.vxlan)
            fixes.append(("tunnel_program_reattached", device_name(dev.port)))
        fixes += self._accelerate(owner, dev.port, self._port_vtep(dev.port, owner))
        present = {
            link.index for link in map(records.link_record, self._sock().dump(rtnl.dump_links()))
        }
        for ep in owner.endpoints():
            if ep.vni != dev.vni:
                continue
            if ep.ifindex not in present:
                owner.remove_endpoint(ep.address)
                self._local.pop(ep.ifindex, None)
                fixes.append(("tunnel_endpoint_removed", str(ep.address)))
            elif not owner.attached(ep.ifindex, netns=self.key):
                owner.attach_endpoint(ep.ifindex, netns=self.key)
                fixes.append(("tunnel_program_reattached", str(ep.address)))
        return fixes

    def programmed(self, dev: OverlayDevices) -> tuple[set[Fdb], set[Neighbour]]:
        """The peer map's entries of this VNI, as the kernel path's tables would hold
        them: (MAC, VTEP) pairs and (IP, MAC) pairs."""
        with self._lock:
            owner = self._owners.get(dev.port) or self._owner(dev.port, dev.vxlan)
            try:
                with owner.lock:
                    owner.ensure_current(load=False)
                    peers = self._peers(owner, dev.vni).values()
            except Exception as exc:
                raise map_error(exc, "read BPF tunnel peers") from exc
        return {(p.mac, p.vtep) for p in peers}, {(p.ip, p.mac) for p in peers}

    def counters(self) -> dict[str, int]:
        """Every port's tunnel counters, summed."""
        out: dict[str, int] = {}
        with self._lock:
            for owner in self._owners.values():
                with contextlib.suppress(Exception):
                    for name, value in owner.counter_values().items():
                        out[name] = out.get(name, 0) + int(value)
        return out


def _ifindex(sock: NetlinkSocket, name: str) -> int:
    """The index of link `name` in the socket's namespace, 0 when there is none."""
    try:
        return sock.ifindex(name)
    except NetlinkError:
        return 0


def _address_holder(host: NetlinkSocket, address: IPAddress) -> tuple[int, str] | None:
    """(index, name) of the host device holding `address`, None when none does (one
    dump of the IPv4 addresses: no link dump on hosts with thousands of links)."""
    addrs = map(records.addr_record, host.dump(rtnl.dump_addrs(socket.AF_INET)))
    index = next((a.index for a in addrs if a.address.ip == address), None)
    if index is None:
        return None
    try:
        return index, socket.if_indextoname(index)  # (the caller's namespace: the host's)
    except OSError:  # gone meanwhile
        return None


def _listdir(path: str) -> list[str]:
    try:
        return sorted(os.listdir(path))
    except OSError:
        return []


def _on_bridge(item: VethIntoSandbox, bridge: int) -> VethIntoSandbox:
    """The host end on headroom bridge `bridge`, with no bridge-port settings."""
    from dataclasses import replace

    return replace(item, master=bridge, hairpin=False, isolated=False)


def overlay_links(
    run_dir: str, accel: Accelerator, backend: str | None = None
) -> OverlayLinks | TunnelLinks:
    """This host's overlay data path: the BPF tunnel when the controller's eBPF data path
    is in use and cnm_tunnel passes its probe, else the kernel's (a namespace per network
    with br0 and vxlan0). The choice sticks while the host has overlay networks: a host
    with kernel-path overlay namespaces keeps the kernel path (their VXLAN sockets hold
    the UDP port the tunnel would need) until they are gone. With ebpf="on" a tunnel that
    cannot run raises EbpfUnavailable; with "auto" the reason is logged and the kernel
    path is used."""
    kernel = OverlayLinks(run_dir, backend=backend)
    if accel.mode == "off":
        return kernel
    if kernel.networks():
        _log.info("overlay networks keep the kernel path: this host has overlay networks on it")
        return kernel
    reason = accel.reason
    if accel.active:
        try:
            from cnm.ebpf import probe

            result = probe.probe(("cnm_tunnel",))
        except ImportError as exc:
            reason = f"cnm.ebpf cannot be imported: {exc}"
        else:
            if result.ok:
                return TunnelLinks(run_dir, accel.pin_root, backend=backend)
            reason = str(result.reason)
    if accel.mode == "on":
        raise errors.EbpfUnavailable(f"overlay BPF tunnel: {reason}")
    _log.warning("overlay networks use the kernel path (no BPF tunnel): %s", reason)
    return kernel


def pinned_tunnel_counters(pin_root: str) -> dict[str, dict[str, int]] | None:
    """The BPF tunnel counters a controller's pins hold, per UDP port (read-only: nothing
    is loaded); None when there are none under `pin_root`."""
    if not os.path.isdir(pin_root):
        return None
    from cnm.ebpf.loader import Map
    from cnm.ebpf.tunnel import COUNTERS, TunnelOwner

    out: dict[str, dict[str, int]] = {}
    for entry in sorted(os.listdir(pin_root)):
        pin = os.path.join(pin_root, entry, TunnelOwner.object_name, COUNTERS)
        if not entry.startswith("tunnel-") or not os.path.exists(pin):
            continue
        counters: dict[str, int] = {}
        with Map.from_pin(pin) as m:
            for i, name in enumerate(TunnelOwner.counter_names):
                slots = m.lookup_percpu(i.to_bytes(4, "little")) or []
                counters[name] = sum(int.from_bytes(s, "little") for s in slots)
        out[entry.removeprefix("tunnel-")] = counters
    return out or None
