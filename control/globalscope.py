"""Global scope: what a controller with `store="etcd://..."` shares with other hosts.

Owns this host's identity in the global store (a host id kept in the local store and the
VTEP address: $CNM_ADVERTISE_ADDR, else the address this host reaches etcd from), the
global-scope network records (published on create, mirrored into every host's local store
so `ctl.network(name)` finds a network made elsewhere, withdrawn on delete), the peer
records of this host's joined overlay endpoints (endpoint IP, MAC, VTEP), and the agent:
a background thread that watches the store and drives the overlay data plane. A lost
connection is retried with backoff; each (re)connect is a full resynchronisation (networks,
this host's peer records, every remote peer, then drift repair), so nothing changed during
an outage is missed. Drift repair also runs periodically. Local-scope state stays in SQLite.

Keys under the prefix: networks/<id>, names/<name>, peers/<network id>/<endpoint id>,
vnis/<vni> and overlay/<network id> (the overlay driver), ipam/... (ipam.scoped).
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import queue
import random
import socket
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from . import errors
from .drivers.overlay import OverlayDriver
from .ipam.scoped import ScopedIpam
from .osl.overlay import PeerEntry
from .osl.tunnel import overlay_links
from .store.etcd import Compare, Delete, EtcdStore, Event, Put, WatchLost
from .types import EndpointRecord, NetworkRecord, PoolData, Repair, is_id_prefix, new_id

if TYPE_CHECKING:
    from .controller import NetworkController

_log = logging.getLogger(__name__)
REPAIR_INTERVAL = float(os.environ.get("CNM_OVERLAY_REPAIR_INTERVAL", "30"))
BACKOFF_MIN = 0.1
BACKOFF_MAX = 5.0
_LOST = object()
_DELETE = object()  # an outbox entry: remove the key


class _Stopped(BaseException):
    """The agent was told to stop: it unwinds without touching the stores again."""


def _network_json(rec: NetworkRecord) -> dict[str, Any]:
    out = asdict(rec)
    out.pop("owner", None)
    out["state"] = "ready"
    return out


def _network_record(data: Mapping[str, Any]) -> NetworkRecord:
    d = dict(data)
    d["ipv4"] = tuple(PoolData(**p) for p in d.get("ipv4") or ())
    d["ipv6"] = tuple(PoolData(**p) for p in d.get("ipv6") or ())
    d["state"] = "ready"
    d.pop("owner", None)
    return NetworkRecord(**d)


def _peer(value: Mapping[str, Any]) -> PeerEntry:
    return PeerEntry(
        ip=ipaddress.ip_address(value["ip"]),
        mac=str(value["mac"]),
        vtep=ipaddress.ip_address(value["vtep"]),
    )


def advertise_address(etcd: EtcdStore) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """$CNM_ADVERTISE_ADDR, else the source address of this host's route to etcd."""
    forced = os.environ.get("CNM_ADVERTISE_ADDR")
    if forced:
        try:
            return ipaddress.ip_address(forced)
        except ValueError:
            raise errors.InvalidParameter(f"CNM_ADVERTISE_ADDR={forced!r} is no address") from None
    host, port = etcd.url.endpoints[0]
    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
        with socket.socket(info[0], socket.SOCK_DGRAM) as s:
            s.connect(info[4])  # UDP: no packet is sent, the kernel only picks a route
            return ipaddress.ip_address(s.getsockname()[0])
    except OSError as exc:
        raise errors.GlobalStoreUnavailable(f"no route to etcd at {host}:{port}: {exc}") from None


class GlobalScope:
    """A controller's share of the global store (see the module docstring).

    Owns the connection to etcd (EtcdStore), the scoped IPAM and the overlay driver it
    hands the controller, the local mirror of global networks, this host's peer
    records, and the agent thread. It reaches the controller only through its hooks for
    the global scope (`state_lock`, `use_ipam`, `announce_network`, `network_forgotten`)
    and its store; every change of the local mirror is made under `state_lock`, so it
    never interleaves with a create or delete on this host.

    Errors: publish_network raises NameInUse when any host has a network of that name;
    withdraw_network raises ActiveEndpoints while another host has endpoints on it;
    fetch_network raises NetworkNotFound / AmbiguousReference; every etcd call may raise
    GlobalStoreUnavailable (or StoreError). Peer records never raise: while etcd is away
    they wait for the agent. After close() the agent touches neither store again.
    """

    def __init__(self, ctl: NetworkController, url: str, *, repair_interval: float | None = None):
        self.ctl = ctl
        self.etcd = EtcdStore(url)
        store = ctl.store
        with store.tx():
            host = store.meta("global_host_id")
            if host is None:
                host = new_id()
                store.set_meta("global_host_id", host)
        self.host = host
        self.vtep = advertise_address(self.etcd)
        self.ipam = ScopedIpam(store, self.etcd, host=host)
        # The BPF tunnel when the controller's eBPF data path is in use (osl.tunnel).
        self.links = overlay_links(ctl.run_dir, ctl._accel, backend=ctl.fastpath)
        self.driver = OverlayDriver(self.etcd, self.links, self.vtep, refresh=self.refresh_peers)
        self.repair_interval = REPAIR_INTERVAL if repair_interval is None else repair_interval
        self.connected = False
        self.resyncs = 0
        self.repairs: list[Repair] = []  # drift fixed by the agent (resync, periodic)
        self.last_error: str | None = None
        self._dirty = threading.Event()
        self._stop = threading.Event()
        # Networks this host withdrew (deleted, or a create rolled back): a watch event
        # of their earlier publication, arriving late, must not mirror them back.
        self._withdrawn: set[str] = set()
        # Rolled-back creations whose records etcd did not take back yet (it was away):
        # withdrawn by the next resynchronisation.
        self._to_withdraw: dict[str, NetworkRecord] = {}
        self._thread: threading.Thread | None = None
        # This host's peer records waiting to be written (key -> record, or _DELETE):
        # joins and leaves do not wait for etcd; the publisher thread writes them in
        # batches, the latest state of each key only.
        self._outbox: dict[str, Any] = {}
        self._outbox_cv = threading.Condition()
        self._publishing = False
        self._publisher: threading.Thread | None = None

    def attach(self) -> None:
        """Hand the controller the global IPAM and the overlay driver, synchronise once
        (if etcd answers) and start the agent."""
        self.ctl.use_ipam("default", self.ipam)
        self.ctl.registry.register(self.driver)
        try:
            self._watch_from = self.resync()
            self.connected = True
        except errors.StoreError as exc:
            self.last_error = str(exc)
            _log.warning("global store unavailable at start: %s", exc)
        self._thread = threading.Thread(target=self._run, name="cnm-agent", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop the agent for good, so the controller may close both stores after.

        The stop flag first; then the etcd sessions (the watch ends at once, every later
        call fails at once, a call in flight within the client timeout); then a pass
        through the controller's lock, so an agent step that holds it finishes and every
        later step sees the flag; then the thread is joined."""
        self.flush(self.etcd.timeout)
        self._stop.set()
        with self._outbox_cv:
            self._outbox_cv.notify_all()
        self.etcd.close()
        with self.ctl.state_lock:
            pass
        if self._thread is not None:
            self._thread.join(timeout=self.etcd.timeout * 2 * len(self.etcd.url.endpoints) + 5)
            if self._thread.is_alive():
                _log.warning("the global scope's agent did not stop; it is stopped from here on")

    @contextlib.contextmanager
    def _agent_step(self) -> Iterator[None]:
        """The controller's lock for one agent step on the local store; _Stopped once
        close() was called (the store may be closed by then)."""
        with self.ctl.state_lock:
            if self._stop.is_set():
                raise _Stopped
            yield

    def _check_stop(self) -> None:
        if self._stop.is_set():
            raise _Stopped

    def status(self) -> dict[str, Any]:
        return {
            "host": self.host,
            "vtep": str(self.vtep),
            "datapath": self.links.datapath,  # the overlay's: "kernel" or "bpf"
            "connected": self.connected,
            "resyncs": self.resyncs,
            "repairs": len(self.repairs),
            "last_error": self.last_error,
        }

    # --- networks (controller hooks) ------------------------------------------------

    def publish_network(self, rec: NetworkRecord) -> None:
        """A new global-scope network (or one whose delete was rolled back): its name
        and record, or NameInUse if any host has a network of that name."""
        ok, _ = self.etcd.txn(
            [Compare.absent(f"names/{rec.name}")],
            [Put(f"names/{rec.name}", rec.id), Put(f"networks/{rec.id}", _network_json(rec))],
        )
        if not ok:
            raise errors.NameInUse("network", rec.name)
        self._withdrawn.discard(rec.id)
        self._to_withdraw.pop(rec.id, None)

    def withdraw_network(self, rec: NetworkRecord, *, check: bool = True) -> None:
        """Delete a global network's records; refused while any host has endpoints on
        it (their addresses are allocated in the global pools). The name claim goes only
        if it is this network's (a stale mirror must not free another network's name).

        With check=False (a creation rolled back) a withdrawal etcd could not take is
        remembered and done by the next resynchronisation; the error is raised still."""
        if check:
            busy = []
            for pool in (*rec.ipv4, *rec.ipv6):
                if ScopedIpam.is_global(pool.pool_id):
                    busy += [
                        owner
                        for _, kind, owner, host in self.ipam.global_allocated(pool.pool_id)
                        if kind == "endpoint" and host != self.host
                    ]
            if busy:
                raise errors.ActiveEndpoints(rec.name, [f"{o[:12]} (another host)" for o in busy])
        try:
            self.etcd.txn(
                [Compare.equals(f"names/{rec.name}", rec.id)],
                [
                    Delete(f"names/{rec.name}"),
                    Delete(f"networks/{rec.id}"),
                    Delete(f"peers/{rec.id}/", prefix=True),
                ],
                [Delete(f"networks/{rec.id}"), Delete(f"peers/{rec.id}/", prefix=True)],
            )
        except errors.StoreError:
            if not check:  # its local record goes: it must not come back as a mirror
                self._to_withdraw[rec.id] = rec
                self._withdrawn.add(rec.id)
                self._dirty.set()
            raise
        self._withdrawn.add(rec.id)
        self._to_withdraw.pop(rec.id, None)

    def fetch_network(self, ref: str) -> NetworkRecord:
        """A global network not (yet) mirrored here, by name, id or unique id prefix."""
        not_found = errors.NetworkNotFound(str(ref))
        if not isinstance(ref, str) or not ref:
            raise not_found
        try:
            kv = self.etcd.get(f"names/{ref}")
            found = []
            if kv is not None:
                net = self.etcd.get(f"networks/{kv.value}")
                found = [net] if net is not None else []
            elif is_id_prefix(ref):
                found = self.etcd.range(f"networks/{ref}")[0]
        except errors.StoreError:
            raise not_found from None
        if not found:
            raise not_found
        if len(found) > 1:
            raise errors.AmbiguousReference("network", ref, [k.key.split("/")[1] for k in found])
        rec = _network_record(found[0].value)
        with self.ctl.state_lock:
            self._mirror_add(rec)
            return self.ctl.store.network_by_id(rec.id) or rec

    def _mirror_add(self, rec: NetworkRecord) -> None:
        """Mirror a network published in etcd. Called under the controller's lock: the
        checks and the write see every create, delete and withdrawal of this host whole
        (a watch event or a resync read older than a withdrawal made meanwhile arrives
        here only after it, and is dropped)."""
        if rec.id in self._withdrawn:
            return
        store = self.ctl.store
        if store.network_by_id(rec.id) is not None:
            return
        if store.network_by_name(rec.name) is not None:
            _log.warning("global network %s hidden by a local one of that name", rec.name)
            return
        store.put_network(rec)

    def _mirror_remove(self, network_id: str) -> None:
        """Remove the mirror of a network withdrawn from etcd. Called under the
        controller's lock; the event or read that asked may be older than a publication
        made meanwhile (a network created here after a resync's read, a delete rolled
        back and republished), so etcd is asked once more before anything goes."""
        store = self.ctl.store
        rec = store.network_by_id(network_id)
        if rec is None or rec.scope == "local" or rec.state != "ready":
            return
        if store.count_endpoints(network_id):
            _log.warning("network %s was deleted elsewhere but has endpoints here", rec.name)
            return
        try:
            if self.etcd.get(f"networks/{network_id}") is not None:
                return
        except errors.StoreError as exc:  # the next resynchronisation decides
            _log.warning("network %s: cannot confirm its removal: %s", rec.name, exc)
            self._dirty.set()
            return
        try:
            self.driver.forget_network(network_id)
        except errors.CNMError as exc:
            _log.warning("overlay %s: %s", network_id[:12], exc)
        store.delete_network(network_id)
        self.ctl.network_forgotten(rec)

    # --- peers (controller hooks) ---------------------------------------------------

    def _own_peers(self, eps: Iterable[EndpointRecord]) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        drivers: dict[str, str | None] = {}
        for ep in eps:
            if ep.network_id not in drivers:
                net = self.ctl.store.network_by_id(ep.network_id)
                drivers[ep.network_id] = net.driver if net is not None else None
            if drivers[ep.network_id] != self.driver.name or not ep.ipv4_address:
                continue
            ip = ipaddress.ip_interface(ep.ipv4_address).ip
            out[f"peers/{ep.network_id}/{ep.id}"] = {
                "ip": str(ip),
                "mac": ep.mac_address,
                "vtep": str(self.vtep),
                "host": self.host,
            }
        return out

    def joined(self, eps: Sequence[EndpointRecord]) -> None:
        """Publish the peer records of endpoints that joined here: queued for the
        publisher thread, so the join does not wait for etcd (a round trip with a disk
        write there); records queued together go in one transaction. While etcd is away
        they wait: the agent publishes them on reconnect."""
        records = self._own_peers(eps)
        if records:
            self._write(records, ())

    def left(self, eps: Sequence[EndpointRecord]) -> None:
        """Withdraw the peer records of endpoints that left here. Unlike a join, a leave
        waits until etcd has it (or it was handed to the agent): a network delete that
        follows on any host must not find the endpoint still there."""
        keys = list(self._own_peers(eps))
        if keys:
            self._write({}, keys)
            self.flush(self.etcd.timeout)

    def _write(self, puts: Mapping[str, Any], deletes: Sequence[str]) -> None:
        """Queue this host's peer records for the publisher thread (the caller does not
        wait for etcd)."""
        with self._outbox_cv:
            for k in deletes:
                self._outbox[k] = _DELETE
            self._outbox.update(puts)
            if self._publisher is None or not self._publisher.is_alive():
                self._publisher = threading.Thread(
                    target=self._publish_loop, name="cnm-publish", daemon=True
                )
                self._publisher.start()
            self._outbox_cv.notify_all()

    def _publish_loop(self) -> None:
        while True:
            with self._outbox_cv:
                while not self._outbox and not self._stop.is_set():
                    self._outbox_cv.wait()
                if not self._outbox:
                    return
                batch, self._outbox = self._outbox, {}
                self._publishing = True
            try:
                self._publish(batch)
            finally:
                with self._outbox_cv:
                    self._publishing = False
                    self._outbox_cv.notify_all()

    def _publish(self, batch: Mapping[str, Any]) -> None:
        if not self.connected or self._stop.is_set():
            self._dirty.set()  # the agent's resynchronisation publishes the store's truth
            return
        puts = {k: v for k, v in batch.items() if v is not _DELETE}
        deletes = [k for k, v in batch.items() if v is _DELETE]
        try:
            self.etcd.put_many(puts, deletes)
        except errors.StoreError as exc:
            _log.warning("peer records wait for the global store: %s", exc)
            self.last_error = str(exc)
            self._dirty.set()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued peer record was written (or handed to the agent's
        resynchronisation); False on timeout."""
        with self._outbox_cv:
            return self._outbox_cv.wait_for(
                lambda: not self._outbox and not self._publishing, timeout
            )

    # --- resynchronisation ----------------------------------------------------------

    def resync(self) -> int:
        """Full resynchronisation from one consistent read; returns its revision. The
        agent's stop is checked between the steps (raising _Stopped)."""
        for rec in list(self._to_withdraw.values()):
            self._check_stop()
            self.withdraw_network(rec, check=False)
        self._check_stop()
        kvs, rev = self.etcd.range("")
        nets: dict[str, NetworkRecord] = {}
        peers: dict[str, dict[str, PeerEntry]] = {}
        mine: dict[str, Any] = {}
        for kv in kvs:
            parts = kv.key.split("/")
            if parts[0] == "networks" and len(parts) == 2 and kv.value:
                nets[parts[1]] = _network_record(kv.value)
            elif parts[0] == "peers" and len(parts) == 3 and kv.value:
                if kv.value.get("host") == self.host:
                    mine[kv.key] = kv.value
                else:
                    peers.setdefault(parts[1], {})[parts[2]] = _peer(kv.value)
        with self._agent_step():
            for rec in nets.values():
                self._mirror_add(rec)
            for rec in self.ctl.store.networks():
                if rec.scope != "local" and rec.driver == self.driver.name and rec.id not in nets:
                    self._mirror_remove(rec.id)
            # This host's peer records: exactly its joined overlay endpoints.
            self._dirty.clear()
            joined = [e for e in self.ctl.store.endpoints() if e.join_state == "joined"]
            want = self._own_peers(joined)
        puts = {k: v for k, v in want.items() if mine.get(k) != v}
        stale = [k for k in mine if k not in want]
        self._check_stop()
        if puts or stale:
            self.etcd.put_many(puts, stale)
        for nid in {*nets, *peers}:
            self.driver.load_peers(nid, peers.get(nid, {}))
        with self._agent_step():
            for rec in self.ctl.store.networks():
                if rec.driver == self.driver.name and rec.state == "ready":
                    self.ctl.announce_network(rec)
        self._check_stop()
        fixed = self.driver.sync()
        self.repairs += fixed
        self.resyncs += 1
        return rev

    def refresh_peers(self) -> None:
        """Reload every network's remote peers from the store (for drift repair)."""
        kvs, _ = self.etcd.range("peers/")
        peers: dict[str, dict[str, PeerEntry]] = {}
        for kv in kvs:
            parts = kv.key.split("/")
            if len(parts) == 3 and kv.value and kv.value.get("host") != self.host:
                peers.setdefault(parts[1], {})[parts[2]] = _peer(kv.value)
        with self.ctl.state_lock:
            nets = [r.id for r in self.ctl.store.networks() if r.driver == self.driver.name]
        for nid in nets:
            self.driver.load_peers(nid, peers.get(nid, {}))

    def apply(self, events: Sequence[Event]) -> None:
        """Watch events: networks mirrored, peers programmed (one batch per network)."""
        adds: dict[str, dict[str, PeerEntry]] = {}
        removes: dict[str, list[str]] = {}
        for ev in events:
            parts = ev.key.split("/")
            if parts[0] == "networks" and len(parts) == 2:
                with self._agent_step():
                    if ev.type == "PUT" and ev.value:
                        self._mirror_add(_network_record(ev.value))
                    elif ev.type == "DELETE":
                        self._mirror_remove(parts[1])
            elif parts[0] == "peers" and len(parts) == 3:
                nid, eid = parts[1], parts[2]
                if ev.type == "PUT" and ev.value:
                    if ev.value.get("host") == self.host:
                        continue
                    adds.setdefault(nid, {})[eid] = _peer(ev.value)
                    if eid in removes.get(nid, []):
                        removes[nid].remove(eid)
                elif ev.type == "DELETE":
                    removes.setdefault(nid, []).append(eid)
                    adds.get(nid, {}).pop(eid, None)
        for nid in {*adds, *removes}:
            with self._agent_step():
                rec = self.ctl.store.network_by_id(nid)
                if rec is not None and rec.state == "ready":
                    self.ctl.announce_network(rec)
            try:
                self.driver.update_peers(nid, adds.get(nid, {}), removes.get(nid, []))
            except errors.CNMError as exc:
                _log.warning("overlay %s: programming peers failed: %s", nid[:12], exc)
                self._dirty.set()  # the next repair pass puts it right

    # --- the agent ------------------------------------------------------------------

    def _watch_into(self, start: int, q: queue.Queue[Any], stop: threading.Event) -> None:
        try:
            for events in self.etcd.watch("", start, stop):
                q.put(events)
        except WatchLost as exc:
            self.last_error = f"watch lost: {exc}"
        except Exception as exc:  # the agent must hear of every end
            self.last_error = f"watch failed: {exc}"
        q.put(_LOST)

    def _run(self) -> None:
        with contextlib.suppress(_Stopped):
            self._loop()

    def _loop(self) -> None:
        backoff = BACKOFF_MIN
        while not self._stop.is_set():
            if not self.connected:
                try:
                    self._watch_from = self.resync()
                    self.connected = True
                    backoff = BACKOFF_MIN
                except errors.StoreError as exc:
                    self.last_error = str(exc)
                    self._stop.wait(backoff * (0.5 + random.random()))
                    backoff = min(backoff * 2, BACKOFF_MAX)
                    continue
                except Exception:
                    _log.exception("global resync failed")
                    self._stop.wait(backoff)
                    backoff = min(backoff * 2, BACKOFF_MAX)
                    continue
            self._follow(self._watch_from + 1)
            self.connected = False

    def _follow(self, start: int) -> None:
        """Apply watch events until the stream is lost or the agent stops; repair
        drift periodically and republish whatever waited."""
        q: queue.Queue[Any] = queue.Queue()
        stop = threading.Event()
        watcher = threading.Thread(
            target=self._watch_into, args=(start, q, stop), name="cnm-watch", daemon=True
        )
        watcher.start()
        next_repair = time.monotonic() + self.repair_interval
        try:
            while not self._stop.is_set():
                timeout = max(0.0, min(0.5, next_repair - time.monotonic()))
                try:
                    item = q.get(timeout=timeout)
                except queue.Empty:
                    item = None
                if item is _LOST:
                    return
                if item is not None:
                    try:
                        self.apply(item)
                    except Exception:
                        _log.exception("applying global events failed")
                        self._dirty.set()
                if self._dirty.is_set() or time.monotonic() >= next_repair:
                    next_repair = time.monotonic() + self.repair_interval
                    try:
                        if self._dirty.is_set():
                            self.resync()
                        else:
                            self.refresh_peers()
                            self.repairs += self.driver.sync()
                    except errors.StoreError as exc:
                        self.last_error = str(exc)
                        return
                    except Exception:
                        _log.exception("overlay drift repair failed")
        finally:
            stop.set()


def run_agent(
    state_dir: str,
    run_dir: str,
    *,
    fastpath: str | None = None,
    store: str | None = None,
    ebpf: str = "auto",
    repair_interval: float | None = None,
    status_every: float = 0,
) -> int:
    """`cnm agent`: a controller kept open until SIGTERM/SIGINT, so its background work
    (overlay peers from the global store, drift repair, deferred deletion) runs. Prints
    one JSON status line at start, every `status_every` seconds (0: never), and at exit."""
    import json
    import signal

    from .controller import NetworkController

    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    with NetworkController(
        state_dir=state_dir, run_dir=run_dir, fastpath=fastpath, store=store, ebpf=ebpf
    ) as ctl:
        scope = ctl.global_scope
        if scope is not None and repair_interval is not None:
            scope.repair_interval = repair_interval

        def report(state: str) -> None:
            line = {"agent": state, **(scope.status() if scope is not None else {})}
            print(json.dumps(line), flush=True)

        report("running")
        while not done.wait(status_every or None):
            report("running")
        report("stopped")
    return 0
