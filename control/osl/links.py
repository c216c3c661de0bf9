"""Host-side links: bridges, the host ends of veth pairs, and deferred deletion.

Owns the devices the drivers keep in the host namespace. Deleting a device makes the
caller wait out the kernel's RCU grace period (about 20 ms each), so a leave never
deletes: it takes the host end down (a down bridge port forwards nothing) and into the
graveyard group, and `reap()` deletes the whole group with one message (one grace period
for all; that also takes the ports off their bridges at once, where a port removal one
by one waits for a synchronize_net each). Host-end names are derived from the endpoint,
and a join that meets its own dying predecessor reaps the graveyard and tries again.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass

from cnm.fastpath import attach, records, rtnl
from cnm.fastpath.messages import Message
from cnm.fastpath.transport import NetlinkError, NetlinkSocket, socket_for

from .. import errors
from .namespace import kernel_error

IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface

GRAVEYARD_GROUP = 0x636E6D01  # "cnm" + 1: host ends waiting for their batched deletion
ROUTED_INET_CONF = {rtnl.IPV4_DEVCONF_FORWARDING: 1, rtnl.IPV4_DEVCONF_PROXY_ARP: 1}


@dataclass(frozen=True)
class VethIntoSandbox:
    host_name: str
    sandbox_key: str
    peer_name: str  # a temporary name inside the sandbox; osl renames it on configure
    master: int
    mtu: int | None = None
    hairpin: bool = False
    isolated: bool = False
    group: int | None = None  # the host end's interface group (routed networks' firewall key)
    routed: bool = False  # host end not on a bridge: forwarding and proxy ARP on (see veths)
    # TX/RX queues of both ends (None: the kernel's default; 1: what the default leaves
    # in use, made so at once: no RCU wait at creation, see rtnl.VethSpec)
    queues: int | None = None


class HostLinks:
    def __init__(self, backend: str | None = None) -> None:
        self.backend = backend
        self._pending = threading.Event()
        self._sock: NetlinkSocket | None = None

    @property
    def sock(self) -> NetlinkSocket:
        # The host namespace's socket, looked up once (socket_for stats the namespace).
        if self._sock is None:
            self._sock = socket_for(None, backend=self.backend)
        return self._sock

    def index(self, name: str) -> int | None:
        try:
            return self.sock.ifindex(name)
        except NetlinkError as exc:
            if exc.errno == errno.ENODEV:
                return None
            raise kernel_error(exc, f"look up {name}") from None

    def links(self) -> list[records.LinkRecord]:
        try:
            return [records.link_record(m) for m in self.sock.dump(rtnl.dump_links())]
        except NetlinkError as exc:
            raise kernel_error(exc, "dump links") from None

    def create_bridge(self, name: str, *, mtu: int | None, addresses: Sequence[IPInterface]) -> int:
        """A bridge with its gateway addresses, up; on any failure nothing is left."""
        try:
            self.sock.request(rtnl.bridge(name, mtu=mtu, up=False))
        except NetlinkError as exc:
            if exc.errno == errno.EEXIST:
                raise errors.NameInUse("bridge", name) from None
            raise kernel_error(exc, f"create bridge {name}") from None
        try:
            index = self.index(name)
            assert index is not None
            reqs = [rtnl.addr_add(index, a) for a in addresses]
            reqs.append(rtnl.link_set(index, up=True))
            self.sock.execute(reqs).raise_first()
            return index
        except BaseException as exc:
            self.delete(name)
            if isinstance(exc, NetlinkError):
                raise kernel_error(exc, f"configure bridge {name}") from None
            raise

    def delete(self, name: str) -> bool:
        """Delete a link by name now; False when it did not exist."""
        try:
            self.sock.request(rtnl.link_del(name=name))
            return True
        except NetlinkError as exc:
            if exc.errno == errno.ENODEV:
                return False
            raise kernel_error(exc, f"delete {name}") from None

    def veths(self, items: Sequence[VethIntoSandbox]) -> list[errors.CNMError | None]:
        """Create veth pairs, each peer straight inside its sandbox, host end on its
        bridge and up, port settings applied: one batch. Per item None or its error."""
        return veths_into_sandboxes(self.sock, items)

    def indexes(self, names: Sequence[str]) -> list[int | None]:
        """Each link's index (None when it does not exist)."""
        return [self.index(n) for n in names]

    def host_routes(
        self, routes: Sequence[tuple[ipaddress.IPv4Address, int]]
    ) -> list[errors.CNMError | None]:
        """`<address>/32 dev <index>` routes (a routed container behind its host end), in
        one batch. Per item None or its error. They go with their device."""
        reqs = [
            rtnl.route_add(ipaddress.ip_network(f"{addr}/32"), oif=index) for addr, index in routes
        ]
        result = self.sock.execute(reqs)
        out: list[errors.CNMError | None] = [None] * len(routes)
        for k, exc in result.errors.items():
            out[k] = kernel_error(exc, f"route {routes[k][0]}/32")
        return out

    def retire(self, names: Sequence[str]) -> None:
        """Take host ends down now and leave their deletion to reap() (see the module doc)."""
        if not names:
            return
        reqs = [rtnl.link_set_by_name(n, up=False, group=GRAVEYARD_GROUP) for n in names]
        result = self.sock.execute(reqs)
        failed = {k: e for k, e in result.errors.items() if e.errno != errno.ENODEV}
        self._pending.set()
        if failed:
            k = min(failed)
            raise kernel_error(failed[k], f"retire {names[k]}")

    @property
    def pending(self) -> bool:
        return self._pending.is_set()

    def wait(self, timeout: float) -> bool:
        """Block until something was retired (or wake() was called), up to timeout."""
        return self._pending.wait(timeout)

    def wake(self) -> None:
        self._pending.set()

    def reap(self) -> None:
        """Delete every retired host end with one message (one RCU wait for them all)."""
        self._pending.clear()
        try:
            self.sock.request(rtnl.group_del(GRAVEYARD_GROUP))
        except NetlinkError as exc:
            if exc.errno != errno.ENODEV:
                raise kernel_error(exc, "delete retired devices") from None


def veths_into_sandboxes(
    sock: NetlinkSocket, items: Sequence[VethIntoSandbox]
) -> list[errors.CNMError | None]:
    """veth pairs made through `sock` (the namespace their host ends live in: the host's
    for a bridge, an overlay network's own), each peer made straight inside its
    sandbox, host end on its master and up, port settings applied: one batch. Per item
    None or its error. A pair that was made but whose settings failed is removed again;
    a pair that could not be made leaves whatever holds its name alone."""
    fds: list[int] = []
    try:
        for it in items:
            fds.append(os.open(it.sandbox_key, os.O_RDONLY | os.O_CLOEXEC))
    except OSError as exc:
        for fd in fds:
            os.close(fd)
        raise kernel_error(exc, "open sandbox") from None
    ends = [
        attach.HostEnd(
            name=it.host_name,
            peer_name=it.peer_name,
            master=it.master or None,
            mtu=it.mtu,
            group=it.group,
            queues=it.queues,
            hairpin=it.hairpin,
            isolated=it.isolated,
        )
        for it in items
    ]
    owner: list[int] = []  # the item of each request
    first: list[int] = []  # each item's veth request
    if len(items) == 1 and not items[0].routed:
        # One join (the sequential case): its batch laid out in one call.
        try:
            result = attach.add_host_end(sock, ends[0], fds[0])
        finally:
            os.close(fds[0])
        owner = [0] * result.total
        first = [0]
    else:
        reqs: list[Message] = []
        for i, (it, end, fd) in enumerate(zip(items, ends, fds, strict=True)):
            first.append(len(reqs))
            batch = attach.host_end_requests(end, fd)
            if it.routed:
                # A routed host end forwards what its container sends and answers ARP
                # for the addresses routed elsewhere (proxy ARP): set in the same batch.
                batch.insert(1, rtnl.link_inet_conf(it.host_name, ROUTED_INET_CONF))
            reqs += batch
            owner += [i] * len(batch)
        try:
            result = sock.execute(reqs)
        finally:
            for fd in fds:
                os.close(fd)
    out: list[errors.CNMError | None] = [None] * len(items)
    if not result.errors:
        return out
    for k, exc in sorted(result.errors.items()):
        i = owner[k]
        if out[i] is None:
            out[i] = kernel_error(exc, f"create {items[i].host_name}")
    # An item whose port settings failed still has its pair: remove it.
    for i, err in enumerate(out):
        if err is not None and first[i] not in result.errors:
            try:
                sock.request(rtnl.link_del(name=items[i].host_name))
            except NetlinkError as exc:
                if exc.errno != errno.ENODEV:
                    err.add_note(f"rollback: delete {items[i].host_name}: {exc}")
    return out
