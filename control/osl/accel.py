"""The optional BPF data path of the host's container ports: osl's side of cnm.ebpf.

Owns the choice between the BPF path and the plain kernel path (ebpf="auto"|"on"|"off"),
the host's RedirectOwner (cnm_redirect, loaded once per pin root and pinned there, or
picked up from the pins another controller left), the mapping of cnm.ebpf's errors onto
cnm.control.errors, the endpoint entries and TC attachments the bridge driver asks for
at join and leave, the per-CPU counters, and the removal of entries whose endpoint is
gone (reconcile).

The choice is made on first use, not when the controller starts (importing libbpf and
probing costs about 0.1 s, which commands that never join should not pay); "on" is
resolved at once so that a host without the data path fails at construction. In
"auto", a probe or load failure is logged (logger `cnm.control.osl.accel`) and the
kernel path is used: `reason` keeps why. "off" never imports cnm.ebpf.

Pins live on bpffs under a root per state directory (`default_pin_root`): two
controllers with different state directories never share a map; two with the same one
(several processes on one store) share the program and its endpoints.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import ipaddress
import logging
import os
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cnm.fastpath import rtnl
from cnm.fastpath.transport import socket_for

from .. import errors
from .namespace import kernel_error

_log = logging.getLogger(__name__)

MODES = ("auto", "on", "off")
BPFFS_ROOT = "/sys/fs/bpf"
PROGRAM_OBJECT = "cnm_redirect"
COUNTERS_PIN = "cnm_redirect_counters"
ENDPOINTS_PIN = "cnm_endpoints"
COUNTER_NAMES = ("redirected", "miss", "policy", "not_ipv4", "unknown_source", "redirect_failed")


def default_pin_root(state_dir: str) -> str:
    """`/sys/fs/bpf/cnm-<12 hex digits of the state directory's real path>`."""
    digest = hashlib.blake2s(os.path.realpath(state_dir).encode(), digest_size=6).hexdigest()
    return os.path.join(BPFFS_ROOT, f"cnm-{digest}")


@dataclass(frozen=True)
class AccelEndpoint:
    """One local container as the redirect program sees it."""

    address: ipaddress.IPv4Address
    ifindex: int  # its host end, in the host namespace
    mac: str  # the container's MAC
    network_id: str
    icc: bool = True


def map_error(exc: BaseException, what: str) -> errors.CNMError:
    """A cnm.ebpf error as a cnm.control error (anything else is returned wrapped as a
    KernelError with EIO)."""
    from cnm.ebpf import errors as bpf

    if isinstance(exc, bpf.VerifierError):
        return errors.EbpfVerifierRejected(exc.program, f"{what}: {exc}", exc.log)
    if isinstance(
        exc,
        bpf.LibbpfUnavailable | bpf.ObjectsNotBuilt | bpf.ObjectError | bpf.FeatureMissing,
    ):
        return errors.EbpfUnavailable(f"{what}: {exc}")
    if isinstance(exc, bpf.LoadError | bpf.PinError):
        return errors.EbpfUnavailable(f"{what}: {exc}")
    if isinstance(exc, bpf.InvalidArgument):
        return errors.InvalidParameter(f"{what}: {exc}")
    if isinstance(exc, bpf.EbpfError):
        code = getattr(exc, "errno", None) or errno.EIO
        return errors.KernelError(code, str(exc), operation=what)
    return errors.KernelError(errno.EIO, str(exc), operation=what)


class Accelerator:
    """The host's BPF redirect for container ports, or nothing (see the module doc)."""

    def __init__(self, mode: str = "auto", pin_root: str | None = None) -> None:
        if mode not in MODES:
            raise errors.InvalidParameter(f"ebpf must be 'auto', 'on' or 'off', not {mode!r}")
        if pin_root is not None and (not isinstance(pin_root, str) or not pin_root):
            raise errors.InvalidParameter("the BPF pin root must be a directory path")
        self.mode = mode
        self.pin_root = pin_root or default_pin_root(".")
        self._lock = threading.RLock()
        self._sock: Any = None  # the host namespace's netlink socket, looked up once
        # Deferred attaches ("auto"): address (int) -> entry, and the thread doing them.
        self._pending: dict[int, Any] = {}
        self._attacher: threading.Thread | None = None
        self._wake = threading.Event()
        self._idle = threading.Event()
        self._idle.set()
        self._in_flight = False
        self._stopping = False
        self._owner: Any = None
        self._state: str | None = "off" if mode == "off" else None
        self.reason: str | None = "ebpf='off'" if mode == "off" else None

    # --- the choice ----------------------------------------------------------------------

    @property
    def state(self) -> str:
        """ "on" when the BPF path is in use, else "off" (decided on first use)."""
        if self._state is None:
            self.resolve()
        assert self._state is not None
        return self._state

    @property
    def active(self) -> bool:
        """The BPF path is in use (deciding now when not decided yet)."""
        return self.state == "on"

    @property
    def in_use(self) -> bool:
        """The BPF path is in use, without deciding (False when not decided yet)."""
        return self._state == "on"

    def resolve(self) -> str:
        """Probe and load (or pick up the pins) now; "on" raises EbpfUnavailable when
        the host cannot, "auto" logs the reason and falls back."""
        with self._lock:
            if self._state is not None:
                return self._state
            try:
                from cnm.ebpf import probe
                from cnm.ebpf.redirect import RedirectOwner

                result = probe.probe((PROGRAM_OBJECT,))
                if not result.ok:
                    raise errors.EbpfUnavailable(str(result.reason))
                owner = RedirectOwner(self.pin_root)
                try:
                    owner.load()
                except Exception as exc:
                    raise map_error(exc, f"load {PROGRAM_OBJECT}") from exc
            except errors.CNMError as exc:
                reason = exc.reason if isinstance(exc, errors.EbpfUnavailable) else str(exc)
                if self.mode == "on":
                    raise
                _log.warning("eBPF data path unavailable, using the kernel path: %s", reason)
                self.reason = reason
                self._state = "off"
                return "off"
            except ImportError as exc:  # cffi or the package's native parts are missing
                if self.mode == "on":
                    raise errors.EbpfUnavailable(f"cnm.ebpf cannot be imported: {exc}") from exc
                _log.warning("eBPF data path unavailable, using the kernel path: %s", exc)
                self.reason, self._state = f"cnm.ebpf cannot be imported: {exc}", "off"
                return "off"
            self._owner = owner
            self.reason = None
            self._state = "on"
            _log.info(
                "eBPF data path in use (%s %s)",
                "picked up" if owner.picked_up else "loaded",
                self.pin_root,
            )
            return "on"

    # --- endpoints -----------------------------------------------------------------------

    def add(self, endpoints: Sequence[AccelEndpoint]) -> list[errors.CNMError | None]:
        """Enter each endpoint in the map (one batch), then attach the program to its host
        end. Per item None or its error; an item that failed is left out of the map. In
        "auto" an attach failure is logged and the item stays on the kernel path."""
        out: list[errors.CNMError | None] = [None] * len(endpoints)
        if not endpoints or not self.active:
            return out
        from cnm.ebpf.redirect import RedirectEndpoint, network_tag

        entries: list[Any] = []
        index: list[int] = []
        for i, ep in enumerate(endpoints):
            try:
                entries.append(
                    RedirectEndpoint(
                        ep.address, ep.ifindex, ep.mac, network_tag(ep.network_id), ep.icc
                    )
                )
                index.append(i)
            except Exception as exc:
                out[i] = map_error(exc, f"BPF entry of {ep.address}")
        with self._lock:
            owner = self._owner
            try:
                # Under the pin root's lock: another process may have removed the pins
                # of an empty map (release_if_idle); entries go into the pinned map.
                with owner.lock:
                    owner.ensure_current()
                    owner.add_endpoints(entries)
            except Exception as exc:
                err = map_error(exc, "BPF endpoint map update")
                return self._outcome([err] * len(endpoints))
            if self.mode != "on":
                # "auto": the join does not wait for the attach (a clsact qdisc on an up
                # device costs an RCU wait in the kernel). The map entry is in now, so the
                # other containers' programs already reach this one; its own program
                # follows from the attach thread, and until then the bridge carries its
                # traffic.
                self._defer(entries)
                return out
            failed: list[Any] = []
            for (entry, i), err in zip(
                zip(entries, index, strict=True), self._attach(entries), strict=True
            ):
                if err is not None:
                    out[i] = err
                    failed.append(entry.address)
            if failed:
                with contextlib.suppress(Exception):
                    owner.remove_endpoints(failed)
        return self._outcome(out)

    def _attach(
        self, entries: Sequence[Any], fd: int | None = None
    ) -> list[errors.CNMError | None]:
        """The program on each entry's host end (TC ingress, direct action), as libbpf's
        tc attach would put it, but in one netlink batch for all: per entry None or its
        error. A clsact qdisc already there is fine. (Not tcx: its first program on a
        device costs an RCU grace period under the rtnl lock, see loader.tc_attach.)

        Most of its cost is the kernel's: adding the clsact qdisc to a device that is up
        deactivates and reactivates the device's queues (an RCU wait), ~0.1-0.3 ms."""
        from cnm.ebpf import loader
        from cnm.ebpf.redirect import PROGRAM

        if fd is None:
            fd = self._owner.program(PROGRAM).fd
        reqs = []
        for e in entries:
            reqs.append(rtnl.clsact(e.ifindex))
            reqs.append(
                rtnl.bpf_filter(
                    e.ifindex, fd, PROGRAM, handle=loader.TC_HANDLE, prio=loader.TC_PRIORITY
                )
            )
        if self._sock is None:  # socket_for stats the namespace: once is enough
            self._sock = socket_for(None)
        result = self._sock.execute(reqs)
        out: list[errors.CNMError | None] = [None] * len(entries)
        for k, exc in result.errors.items():
            if k % 2:  # the filter's outcome is the entry's (a missing qdisc fails it too)
                out[k // 2] = kernel_error(
                    exc, f"attach BPF redirect to ifindex {entries[k // 2].ifindex}"
                )
        return out

    # --- deferred attach ("auto") ---------------------------------------------------------

    def _defer(self, entries: Sequence[Any]) -> None:
        """Queue attaches for the attach thread (lock held)."""
        for e in entries:
            self._pending[int(e.address)] = e
        if self._attacher is None or not self._attacher.is_alive():
            self._attacher = threading.Thread(
                target=self._attach_loop, name="cnm-bpf-attach", daemon=True
            )
            self._attacher.start()
        self._wake.set()

    def _attach_loop(self) -> None:
        from cnm.ebpf.redirect import PROGRAM

        while True:
            self._wake.wait()
            with self._lock:
                self._wake.clear()
                if self._stopping:
                    self._pending.clear()
                    self._idle.set()
                    return
                entries = list(self._pending.values())
                self._pending.clear()
                if not entries or self._owner is None:
                    self._idle.set()
                    continue
                self._in_flight = True
                fd = self._owner.program(PROGRAM).fd
            # Outside the lock: joins keep adding map entries while the kernel works.
            try:
                outcomes = self._attach(entries, fd)
            except Exception as exc:  # keep the thread: the next batch may succeed
                outcomes = [map_error(exc, "attach BPF redirect")] * len(entries)
            with self._lock:
                self._in_flight = False
                failed = [e.address for e, err in zip(entries, outcomes, strict=True) if err]
                for err in outcomes:
                    if err is not None:
                        _log.warning("eBPF fast path skipped for an endpoint: %s", err)
                if failed and self._owner is not None:
                    # Never leave an entry pointing at a port that was not set up.
                    with contextlib.suppress(Exception):
                        self._owner.remove_endpoints(failed)
                if not self._pending:
                    self._idle.set()

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every deferred attach is done; False on timeout."""
        with self._lock:
            if not self._pending and not self._in_flight:
                return True
            self._idle.clear()
            self._wake.set()
        return self._idle.wait(timeout)

    def _outcome(self, out: list[errors.CNMError | None]) -> list[errors.CNMError | None]:
        if self.mode == "on":
            return out
        for err in out:
            if err is not None:
                _log.warning("eBPF fast path skipped for an endpoint: %s", err)
        return [None] * len(out)

    def remove(self, addresses: Iterable[ipaddress.IPv4Address]) -> int:
        """Forget endpoints (their devices go with their attachments); how many were there."""
        wanted = list(addresses)
        if not wanted or self._state != "on":
            return 0
        with self._lock:
            for a in wanted:  # an attach still queued for it is moot now
                self._pending.pop(int(a), None)
            try:
                return int(self._owner.remove_endpoints(wanted))
            except Exception as exc:
                raise map_error(exc, "BPF endpoint map delete") from exc

    def remove_ifindexes(self, ifindexes: Iterable[int]) -> int:
        """Forget the endpoints behind these host ends (a leave that does not know the
        addresses: one pass over the map)."""
        gone = set(ifindexes)
        if not gone or self._state != "on":
            return 0
        return self.remove(e.address for e in self.entries() if e.ifindex in gone)

    def entries(self) -> list[AccelEndpoint]:
        """The map as the program sees it (network_id holds the tag, in hex)."""
        if not self.active:
            return []
        with self._lock:
            owner = self._owner
            try:
                with owner.lock:
                    owner.ensure_current(load=False)
                    found = owner.endpoints()
            except Exception as exc:
                raise map_error(exc, "BPF endpoint map read") from exc
            return [
                AccelEndpoint(
                    ipaddress.IPv4Address(e.address), e.ifindex, e.mac, f"{e.network:08x}", e.icc
                )
                for e in found
            ]

    def prune(self, keep: Mapping[ipaddress.IPv4Address, int]) -> list[AccelEndpoint]:
        """Remove the entries whose address is not in `keep` or whose host end differs
        (`keep`: address -> host-end ifindex of every joined endpoint); returns them."""
        if not self.active:
            return []
        stale = [e for e in self.entries() if keep.get(e.address) != e.ifindex]
        if stale:
            self.remove(e.address for e in stale)
            from cnm.ebpf import loader

            for e in stale:  # a device that still exists keeps no program of a gone endpoint
                if e.ifindex not in keep.values():
                    with contextlib.suppress(Exception):
                        loader.tc_detach(e.ifindex)
        return stale

    def counters(self) -> dict[str, int] | None:
        """The program's per-CPU counters summed, plus `passed` (left to the kernel path)
        and `endpoints`; None when the BPF path is not in use."""
        if self._state != "on":
            return None
        with self._lock:
            owner = self._owner
            with owner.lock:
                owner.ensure_current(load=False)
                c = owner.counters()
                out = {name: int(getattr(c, name)) for name in COUNTER_NAMES}
                out["passed"] = int(c.passed)
                out["endpoints"] = _count(owner.map(ENDPOINTS_PIN))
            return out

    # --- lifetime ------------------------------------------------------------------------

    def release_if_idle(self) -> bool:
        """When the map is empty (the last network went), remove the pins: nothing of
        cnm's stays on bpffs. The next use loads again. The look and the removal happen
        under the pin root's lock, so no other process adds an entry in between (one that
        holds the map still notices the removal, see RedirectOwner.ensure_current)."""
        self.flush()
        with self._lock:
            if self._state != "on":
                return False
            owner = self._owner
            with owner.lock:
                if self.entries():
                    return False
                owner.unpin()
                with contextlib.suppress(OSError):
                    os.rmdir(self.pin_root)
            owner.close()
            self._owner, self._state = None, None
            return True

    def release_if_loaded(self) -> bool:
        """release_if_idle, but only when this accelerator loaded the pins itself (did
        not pick up another's): what a controller whose construction failed undoes."""
        with self._lock:
            if self._state != "on" or self._owner.picked_up:
                return False
            return self.release_if_idle()

    def close(self) -> None:
        """Drop this process's handles; pins and attachments stay for the next owner.
        Deferred attaches still queued are done first."""
        self.flush()
        with self._lock:
            self._stopping = True
            self._wake.set()
        if self._attacher is not None:
            self._attacher.join(10)
            self._attacher = None
        with self._lock:
            self._stopping = False
            if self._owner is not None:
                self._owner.close()
                self._owner = None
            if self.mode != "off":
                self._state = None


def _count(bpf_map: Any) -> int:
    keys = bpf_map.keys()
    return sum(1 for _ in keys)


def available() -> bool:
    """Whether this host can run the BPF data path (the probe only: nothing is loaded)."""
    try:
        from cnm.ebpf import probe
    except ImportError:
        return False
    return bool(probe.probe((PROGRAM_OBJECT,)).ok)


def pinned_counters(pin_root: str) -> dict[str, int] | None:
    """The counters a controller's pins hold (read-only: nothing is loaded), None when
    there are no pins under `pin_root`."""
    pin_dir = os.path.join(pin_root, PROGRAM_OBJECT)
    if not os.path.exists(os.path.join(pin_dir, COUNTERS_PIN)):
        return None
    from cnm.ebpf.loader import Map

    out: dict[str, int] = {}
    with Map.from_pin(os.path.join(pin_dir, COUNTERS_PIN)) as m:
        for i, name in enumerate(COUNTER_NAMES):
            slots = m.lookup_percpu(i.to_bytes(4, "little")) or []
            out[name] = sum(int.from_bytes(s, "little") for s in slots)
    out["passed"] = sum(out[k] for k in ("miss", "policy", "not_ipv4", "unknown_source"))
    endpoints = os.path.join(pin_dir, ENDPOINTS_PIN)
    if os.path.exists(endpoints):
        with Map.from_pin(endpoints) as m:
            out["endpoints"] = _count(m)
    return out
