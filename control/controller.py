"""The NetworkController: the CNM lifecycle and its rules.

Owns every state change of networks, endpoints and sandboxes. Each multi-step change
follows intent -> kernel -> confirm: the intent (a record in state "creating",
"deleting", "joining" or "leaving") is written in one store transaction before any
kernel or driver work, and confirmed in another after it. A failure rolls back what was
done; a crash leaves the intent behind for `reconcile()` to finish or undo.

Rules (libnetwork's Component Lifecycle): a network is deleted only without endpoints;
an endpoint is deleted only when not joined (unless force); a sandbox is created on the
first join of a container and deleted when its last endpoint leaves, unless it was
created explicitly.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import ipaddress
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any, NamedTuple

from cnm import fastpath
from cnm.fastpath.bulk import Route

from . import errors
from .driverapi import (
    BulkJoin,
    Driver,
    EndpointInfo,
    ExternalConnectivity,
    FixedPortLimit,
    GatewayAllocationCheck,
    HostJoin,
    InterfaceInfo,
    JoinInfo,
    KernelOnlyJoin,
    NetworkInfo,
    PortLimit,
    Restorable,
    SandboxInfo,
    implements,
)
from .drivers import DriverRegistry, builtin_registry
from .endpoint import Endpoint
from .ipam.api import (
    AUX_ADDRESS_TYPE,
    GATEWAY_ADDRESS_TYPE,
    GATEWAY_DATA_KEY,
    REQUEST_ADDRESS_TYPE,
    IpamDriver,
    PoolRequest,
)
from .ipam.default import DefaultIpam
from .ipam.remote import MAC_ADDRESS_OPTION, MacAddressAware
from .network import Network
from .osl import NamespaceStore
from .osl.accel import Accelerator, default_pin_root
from .osl.files import remove_files, write_files
from .osl.firewall import Firewall
from .osl.interfaces import InterfaceConfig, SandboxInterfaces, free_name
from .osl.links import HostLinks
from .sandbox import Sandbox
from .store import SQLiteStore
from .types import (
    EndpointRecord,
    IPAddress,
    IPAMConfig,
    IPInterface,
    NetworkRecord,
    PoolData,
    SandboxRecord,
    ValidIPAMConfig,
    as_list,
    as_pairs,
    generate_mac,
    is_id_prefix,
    new_id,
    parse_address,
    parse_mac,
    parse_string_map,
    validate_name,
)

if TYPE_CHECKING:
    from .globalscope import GlobalScope

_log = logging.getLogger(__name__)
REAP_DELAY = 0.05  # seconds a burst of leaves has to join one group delete

DEFAULT_PLUGIN_DIRS = ("/run/docker/plugins", "/etc/docker/plugins", "/usr/lib/docker/plugins")
_HOSTNAME_RE = re.compile(
    r"(?=.{1,253}\Z)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)"
    r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\Z"
)
_ETCD_RE = re.compile(r"etcd://[^/\s]+(/\S*)?\Z")
EndpointSpec = tuple[str, str | None, str | None, str | None, Mapping[str, str] | None]


class _JoinPlan(NamedTuple):  # a tuple: made on every join, cheaper than a dataclass
    endpoint: EndpointRecord
    network: NetworkRecord
    sandbox: SandboxRecord
    ifname: str | None = None  # the name an "eth" interface will get in the sandbox


class NetworkController:
    """Manages networks, endpoints and sandboxes on this host (spec/api.md)."""

    def __init__(
        self,
        state_dir: str = "/var/lib/cnm",
        run_dir: str = "/run/cnm",
        fastpath: str | None = None,
        store: str | None = None,
        plugin_dirs: Sequence[str] | None = None,
        ebpf: str = "auto",
        bpf_pin_root: str | None = None,
    ) -> None:
        try:
            self.fastpath = _select_fastpath(fastpath)
        except ValueError as exc:
            raise errors.InvalidParameter(str(exc)) from None
        if store is not None and (not isinstance(store, str) or not _ETCD_RE.match(store)):
            raise errors.InvalidParameter(
                f"store must be None or 'etcd://host:port[,host:port]/prefix', not {store!r}"
            )
        if ebpf not in ("auto", "on", "off"):
            raise errors.InvalidParameter(f"ebpf must be 'auto', 'on' or 'off', not {ebpf!r}")
        if bpf_pin_root is not None and (
            not isinstance(bpf_pin_root, str) or not bpf_pin_root.startswith("/")
        ):
            raise errors.InvalidParameter("bpf_pin_root must be an absolute path (on bpffs)")
        for what, path in (("state_dir", state_dir), ("run_dir", run_dir)):
            if not isinstance(path, str | os.PathLike) or not os.fspath(path):
                raise errors.InvalidParameter(f"{what} must be a directory path, not {path!r}")
        if plugin_dirs is None:
            plugin_dirs = DEFAULT_PLUGIN_DIRS
        if (
            isinstance(plugin_dirs, str | bytes)
            or not isinstance(plugin_dirs, Iterable)
            or not all(isinstance(d, str) for d in plugin_dirs)
        ):
            raise errors.InvalidParameter("plugin_dirs must be a list of directory paths")
        self.plugin_dirs = tuple(plugin_dirs)
        self.state_dir = state_dir
        self.run_dir = run_dir
        # Every argument is valid: from here on things are made, and a failure undoes
        # what was made (store, BPF pins this call loaded, reaper): bad input changes
        # nothing. The optional BPF data path (osl.accel): "on" is decided now, so a host
        # that cannot run it fails here (EbpfUnavailable); "auto" decides on first use
        # and falls back to the kernel path, logging why; `ctl.ebpf` says what is in use.
        self._accel = Accelerator(ebpf, bpf_pin_root or default_pin_root(state_dir))
        self._store = SQLiteStore(state_dir)
        self._closed = False
        self._reaper: threading.Thread | None = None
        self._global: Any = None
        try:
            if ebpf == "on":
                self._accel.resolve()
            self._ipam: dict[str, IpamDriver] = {"default": DefaultIpam(self._store)}
            self._links = HostLinks(backend=self.fastpath)
            self._interfaces = SandboxInterfaces(backend=self.fastpath)
            self._registry: DriverRegistry = builtin_registry(self._links, Firewall(), self._accel)
            from .drivers.remote import remote_driver
            from .plugins import Plugins

            # Remote plugins are found by name when no built-in driver has it.
            self._plugins = Plugins(self.plugin_dirs)
            self._registry.add_resolver(lambda name: remote_driver(self._plugins, name))
            self._namespaces = NamespaceStore(run_dir, backend=self.fastpath)
            self._lock = threading.RLock()
            self._announced: set[tuple[str, str]] = set()
            self._reaper = threading.Thread(target=self._reap_loop, name="cnm-reaper", daemon=True)
            self._reaper.start()
            # Global scope (issue 6): overlay networks, their IPAM and peers live in etcd.
            if store is not None:
                from .globalscope import GlobalScope

                self._global = GlobalScope(self, store)
                self._global.attach()
        except BaseException:
            self._undo_init()
            raise

    def _undo_init(self) -> None:
        """A construction that failed part-way: stop and close what it made."""
        self._closed = True
        if self._global is not None:
            with contextlib.suppress(Exception):
                self._global.close()
        if self._reaper is not None:
            self._links.wake()
            self._reaper.join()
        self._store.close()
        with contextlib.suppress(Exception):
            self._accel.release_if_loaded()
        self._accel.close()

    # --- life of the controller ----------------------------------------------------------

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self._global is not None:  # global scope: stop the agent first
                self._global.close()
            self._links.wake()
            self._reaper.join()
            self._reap()
            self._store.close()
            self._accel.close()

    @property
    def ebpf(self) -> str:
        """The data path in use: "on" (the BPF redirect) or "off" (the kernel's alone).
        With ebpf="auto" reading it decides (probe + load) when nothing did yet."""
        return self._accel.state

    @property
    def ebpf_reason(self) -> str | None:
        """Why the BPF path is not in use (None when it is, or is not decided yet)."""
        return self._accel.reason

    @property
    def ebpf_counters(self) -> dict[str, int] | None:
        """The redirect program's counters summed over the CPUs (None when not in use)."""
        return self._accel.counters()

    def _reap(self) -> None:
        if self._links.pending:
            try:
                self._links.reap()
            except errors.CNMError as exc:
                _log.warning("deferred device deletion failed: %s", exc)

    def _reap_loop(self) -> None:
        """Deferred device deletion: host ends retired by leaves are deleted in groups,
        off the callers' path (one RCU wait for many devices)."""
        while not self._closed:
            if self._links.wait(timeout=1.0) and not self._closed:
                time.sleep(REAP_DELAY)  # let a burst of leaves join the same group delete
                self._reap()

    def __enter__(self) -> NetworkController:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def store(self) -> SQLiteStore:
        return self._store

    @property
    def namespaces(self) -> NamespaceStore:
        return self._namespaces

    @property
    def registry(self) -> DriverRegistry:
        return self._registry

    def drivers(self) -> list[str]:
        return self._registry.names()

    def ipam_driver(self, name: str) -> IpamDriver:
        if name == "null":
            raise errors.InvalidParameter("the null IPAM driver allocates nothing")
        found = self._ipam.get(name)
        if found is None:  # an IPAM plugin by that name, kept once found
            from .ipam.remote import remote_ipam

            found = remote_ipam(self._plugins, name)
            if found is None:
                raise errors.DriverNotFound(name)
            found = self._ipam.setdefault(name, found)
        return found

    def _driver(self, name: str) -> Driver:
        drv = self._registry.registered(name)  # every join asks: no lock when registered
        return drv if drv is not None else self._registry.get(name)

    def _network_info(self, rec: NetworkRecord, drv: Driver) -> NetworkInfo:
        return NetworkInfo(
            id=rec.id,
            name=rec.name,
            options=drv.options_type.parse(rec.options, driver=rec.driver),
            ipv4=rec.ipv4,
            ipv6=rec.ipv6,
            enable_ipv6=rec.enable_ipv6,
            internal=rec.internal,
            labels=rec.labels,
        )

    def _driver_for(self, rec: NetworkRecord) -> Driver:
        """The network's driver, told about the network first if it keeps state in memory
        (a network created before this controller started, or by another process)."""
        return self._announce(self._driver(rec.driver), rec)

    def _announce(self, drv: Driver, rec: NetworkRecord) -> Driver:
        """`drv`, told about its network `rec` first if it was not yet (_driver_for)."""
        if implements(drv, Restorable) and (drv.name, rec.id) not in self._announced:
            drv.restore_network(self._network_info(rec, drv))
            self._announced.add((drv.name, rec.id))
        return drv

    # --- hooks for the global scope (control/globalscope.py) -----------------------------

    @property
    def global_scope(self) -> GlobalScope | None:
        """The global scope (etcd) of a controller made with `store=`, else None."""
        return self._global

    @property
    def state_lock(self) -> threading.RLock:
        """The lock every change of this controller's networks, endpoints and sandboxes
        is made under. The global scope mirrors networks of other hosts under it, so a
        mirror change never interleaves with a create or delete here."""
        return self._lock

    def use_ipam(self, name: str, ipam: IpamDriver) -> None:
        """Make `ipam` the IPAM driver called `name` (the global scope's default IPAM,
        which keeps the global address space in etcd)."""
        self._ipam[name] = ipam

    def announce_network(self, rec: NetworkRecord) -> None:
        """Tell the network's driver about it, if the driver keeps networks in memory
        and was not told yet (a network mirrored from another host)."""
        self._driver_for(rec)

    def network_forgotten(self, rec: NetworkRecord) -> None:
        """A network's record was removed behind the controller (deleted on another
        host): its driver is told afresh should it come back."""
        self._announced.discard((rec.driver, rec.id))

    # --- look-ups ------------------------------------------------------------------------

    @staticmethod
    def _resolve(
        kind: str, ref: object, by_id: Any, by_name: Any, by_prefix: Any, not_found: Exception
    ) -> Any:
        """Docker's order: exact id, exact name, then a unique id prefix."""
        if not isinstance(ref, str) or not ref:
            raise errors.InvalidParameter(f"{kind} reference must be a non-empty string")
        if len(ref) == 64 and (rec := by_id(ref)) is not None:
            return rec
        if (rec := by_name(ref)) is not None:
            return rec
        if is_id_prefix(ref):
            matches = by_prefix(ref)
            if len(matches) == 1:
                return matches[0]
            if len(matches) > 1:
                raise errors.AmbiguousReference(kind, ref, [m.id for m in matches])
        raise not_found

    def network(self, ref: str) -> Network:
        """A network by name, id, or unique id prefix."""
        s = self._store
        try:
            rec = self._resolve(
                "network",
                ref,
                s.network_by_id,
                s.network_by_name,
                s.networks_by_id_prefix,
                errors.NetworkNotFound(str(ref)),
            )
        except errors.NetworkNotFound:
            if self._global is None:
                raise
            rec = self._global.fetch_network(ref)  # global scope: made on another host
        return Network(self, rec)

    def networks(self) -> list[Network]:
        return [Network(self, r) for r in self._store.networks()]

    def _network_by_id(self, network_id: str) -> Network:
        rec = self._store.network_by_id(network_id)
        if rec is None:
            raise errors.NetworkNotFound(network_id)
        return Network(self, rec)

    def _endpoint(self, net: Network, ref: str) -> Endpoint:
        s = self._store
        rec = self._resolve(
            "endpoint",
            ref,
            s.endpoint_by_id,
            lambda name: s.endpoint_by_name(net.id, name),
            lambda prefix: s.endpoints_by_id_prefix(net.id, prefix),
            errors.EndpointNotFound(str(ref), net.name),
        )
        if rec.network_id != net.id:
            raise errors.EndpointNotFound(str(ref), net.name)
        return Endpoint(self, rec)

    def _endpoints(self, net: Network) -> list[Endpoint]:
        return [Endpoint(self, r) for r in self._store.endpoints(net.id)]

    def _endpoint_record(self, endpoint_id: str) -> EndpointRecord:
        rec = self._store.endpoint_by_id(endpoint_id)
        if rec is None:
            raise errors.EndpointNotFound(endpoint_id)
        return rec

    def sandbox(self, ref: str) -> Sandbox:
        """A sandbox by container id, sandbox id, or unique sandbox id prefix."""
        s = self._store
        rec = self._resolve(
            "sandbox",
            ref,
            s.sandbox_by_id,
            s.sandbox_by_container,
            s.sandboxes_by_id_prefix,
            errors.SandboxNotFound(str(ref)),
        )
        return Sandbox(self, rec)

    def sandboxes(self) -> list[Sandbox]:
        return [Sandbox(self, r) for r in self._store.sandboxes()]

    def _sandbox_by_id(self, sandbox_id: str) -> Sandbox:
        rec = self._store.sandbox_by_id(sandbox_id)
        if rec is None:
            raise errors.SandboxNotFound(sandbox_id)
        return Sandbox(self, rec)

    def _sandbox_endpoints(self, sb: Sandbox) -> list[Endpoint]:
        return [Endpoint(self, r) for r in self._store.endpoints(sandbox_id=sb.id)]

    # --- networks ------------------------------------------------------------------------

    def create_network(
        self,
        name: str,
        driver: str = "bridge",
        ipv4: Sequence[IPAMConfig] | None = None,
        ipv6: Sequence[IPAMConfig] | None = None,
        enable_ipv6: bool = False,
        internal: bool = False,
        options: Mapping[str, str] | None = None,
        labels: Mapping[str, str] | None = None,
        ipam_driver: str = "default",
        ipam_options: Mapping[str, str] | None = None,
    ) -> Network:
        """Create a network; nothing is changed if any input is invalid or a step fails."""
        validate_name("network", name)
        if not isinstance(driver, str):
            raise errors.InvalidParameter(f"driver must be a string, not {driver!r}")
        drv = self._driver(driver)
        opts = parse_string_map(options, "options")
        typed_opts = drv.options_type.parse(opts, driver=driver)
        labels_ = parse_string_map(labels, "labels")
        ipam_opts = parse_string_map(ipam_options, "ipam_options")
        for flag, value in (("enable_ipv6", enable_ipv6), ("internal", internal)):
            if not isinstance(value, bool):
                raise errors.InvalidParameter(f"{flag} must be a bool, not {value!r}")
        v4 = _ipam_configs(ipv4, 4)
        v6 = _ipam_configs(ipv6, 6)
        if v6 and not enable_ipv6:
            raise errors.InvalidParameter("IPv6 pools were given but enable_ipv6 is False")
        _check_pool_overlap(v4 + v6)
        ipam: IpamDriver | None = None
        if ipam_driver == "null":
            if v4 or v6:
                raise errors.InvalidParameter("the null IPAM driver takes no address pools")
        else:
            ipam = self.ipam_driver(ipam_driver)
        scope = drv.capability.data_scope
        skip_gw = (False, False)
        # GwAllocCheck (spec/remote-protocol.md; opt-in, remote drivers): may the
        # gateway addresses be left unallocated? Asked before any address is.
        if ipam is not None and implements(drv, GatewayAllocationCheck):
            skip_gw = drv.skip_gateway_allocation(  # type: ignore[attr-defined]
                typed_opts, enable_ipv6=enable_ipv6, internal=internal
            )

        with self._lock:
            net_id = new_id()
            pools4: tuple[PoolData, ...] = ()
            pools6: tuple[PoolData, ...] = ()
            # A plugin's IPAM is asked before the store's write transaction, not inside
            # it: a plugin that hangs must not hold the write lock (and every other
            # controller process with it) for its timeout. What it gave is given back
            # if the record cannot be written.
            outside = ipam is not None and not _in_store(ipam, _address_space(ipam, scope))
            if outside:
                assert ipam is not None
                if self._store.network_by_name(name) is not None:
                    raise errors.NameInUse("network", name)
                pools4, pools6 = self._network_pools(
                    ipam, net_id, scope, v4, v6, enable_ipv6, ipam_opts, skip_gw
                )
            try:
                with self._store.tx():
                    if self._store.network_by_name(name) is not None:
                        raise errors.NameInUse("network", name)
                    if ipam is not None and not outside:
                        pools4, pools6 = self._network_pools(
                            ipam, net_id, scope, v4, v6, enable_ipv6, ipam_opts, skip_gw
                        )
                    rec = NetworkRecord(
                        id=net_id,
                        name=name,
                        driver=driver,
                        scope=scope,
                        ipam_driver=ipam_driver,
                        enable_ipv6=enable_ipv6,
                        internal=internal,
                        options=opts,
                        labels=labels_,
                        ipam_options=ipam_opts,
                        ipv4=pools4,
                        ipv6=pools6,
                        state="creating",
                        created=time.time(),
                    )
                    self._store.put_network(rec)
            except BaseException as exc:
                if ipam is not None and outside:
                    _undo_ipam(ipam, _pool_holdings((*pools4, *pools6)), exc)
                raise
            info = NetworkInfo(
                id=net_id,
                name=name,
                options=typed_opts,
                ipv4=pools4,
                ipv6=pools6,
                enable_ipv6=enable_ipv6,
                internal=internal,
                labels=labels_,
            )
            published = False
            try:
                if self._global is not None and scope != "local":  # global scope
                    self._global.publish_network(rec)
                    published = True
                drv.create_network(info)
                self._announced.add((drv.name, net_id))
            except BaseException as exc:
                if published:
                    try:  # retried by the global scope's agent if etcd is away now
                        self._global.withdraw_network(rec, check=False)
                    except Exception as cleanup:
                        exc.add_note(f"rollback: withdraw from the global store: {cleanup}")
                self._release_then_delete(
                    rec,
                    lambda: self._release_network_pools(rec),
                    lambda: self._store.delete_network(net_id),
                )
                raise
            rec = replace(rec, state="ready")
            self._store.set_network_state(net_id, "ready")
            return Network(self, rec)

    def _network_pools(
        self,
        ipam: IpamDriver,
        owner: str,
        scope: str,
        v4: Sequence[ValidIPAMConfig],
        v6: Sequence[ValidIPAMConfig],
        enable_ipv6: bool,
        options: Mapping[str, str],
        skip_gw: tuple[bool, bool],
    ) -> tuple[tuple[PoolData, ...], tuple[PoolData, ...]]:
        """A new network's IPv4 and (with enable_ipv6) IPv6 pools, in the address space
        of its scope; all or nothing."""
        space = _address_space(ipam, scope)
        pools4 = self._request_pools(
            ipam, owner, space, v4 or [None], options, False, skip_gateway=skip_gw[0]
        )
        pools6: tuple[PoolData, ...] = ()
        if enable_ipv6:
            try:
                pools6 = self._request_pools(
                    ipam, owner, space, v6 or [None], options, True, skip_gateway=skip_gw[1]
                )
            except BaseException as exc:  # a remote IPAM keeps what it gave
                _undo_ipam(ipam, _pool_holdings(pools4), exc)
                raise
        return pools4, pools6

    def _request_pools(
        self,
        ipam: IpamDriver,
        owner: str,
        space: str,
        configs: Sequence[ValidIPAMConfig | None],
        options: Mapping[str, str],
        v6: bool,
        *,
        skip_gateway: bool = False,
    ) -> tuple[PoolData, ...]:
        """Each pool with its gateway and aux addresses. With `skip_gateway` (the
        driver's GwAllocCheck) no gateway address is requested unless the user chose
        one; a gateway in the IPAM's pool data is taken either way (the engine's rule)."""
        out = []
        # What was taken so far, given back if a later step fails: a store rollback
        # undoes the default IPAM's part, not a remote IPAM's.
        undo: list[tuple[str, IPAddress | None]] = []
        try:
            for cfg in configs:
                res = ipam.request_pool(
                    PoolRequest(
                        address_space=space,
                        pool=cfg.subnet if cfg else None,
                        sub_pool=cfg.ip_range if cfg else None,
                        options=options,
                        v6=v6,
                    )
                )
                undo.append((res.pool_id, None))
                gateway = res.data.get(GATEWAY_DATA_KEY)
                if not gateway and (not skip_gateway or (cfg and cfg.gateway)):
                    gw = ipam.request_address(
                        res.pool_id,
                        cfg.gateway if cfg else None,
                        {REQUEST_ADDRESS_TYPE: GATEWAY_ADDRESS_TYPE},
                        owner=owner,
                    )
                    undo.append((res.pool_id, gw.ip))
                    gateway = str(gw)
                aux = {}
                for name, addr in cfg.aux_addresses.items() if cfg else ():
                    got = ipam.request_address(
                        res.pool_id, addr, {REQUEST_ADDRESS_TYPE: AUX_ADDRESS_TYPE}, owner=owner
                    )
                    undo.append((res.pool_id, got.ip))
                    aux[name] = str(got)
                out.append(
                    PoolData(
                        pool_id=res.pool_id,
                        subnet=str(res.pool),
                        gateway=gateway,
                        ip_range=str(cfg.ip_range) if cfg and cfg.ip_range else None,
                        aux_addresses=aux,
                        address_space=space,
                    )
                )
        except BaseException as exc:
            _undo_ipam(ipam, undo, exc)
            raise
        return tuple(out)

    def _ipam_in_store(self, rec: NetworkRecord) -> bool:
        """Whether the network's pools and addresses are kept in the store (_in_store)."""
        if rec.ipam_driver == "null":
            return True
        ipam = self.ipam_driver(rec.ipam_driver)
        return all(_in_store(ipam, p.pool_id) for p in (*rec.ipv4, *rec.ipv6))

    def _release_then_delete(
        self, net: NetworkRecord, release: Callable[[], None], delete: Callable[[], None]
    ) -> None:
        """Give pools or addresses of `net` back to the IPAM, then delete the records that
        held them. The store's own IPAM does both in one transaction; a plugin's calls
        (or the global address space's, in etcd) are made first, outside any
        transaction (a plugin that hangs must not hold the store's write lock), and the
        records go only when they succeeded."""
        if self._ipam_in_store(net):
            with self._store.tx():
                release()
                delete()
            return
        release()
        with self._store.tx():
            delete()

    def _release_network_pools(self, rec: NetworkRecord, *, missing_ok: bool = False) -> None:
        """Give back the network's gateway and aux addresses, then its pools; with
        missing_ok (reconcile) a pool that is gone already counts as given back."""
        if rec.ipam_driver == "null":
            return
        ipam = self.ipam_driver(rec.ipam_driver)
        for pool in (*rec.ipv4, *rec.ipv6):
            # The protocol's order: gateway, aux addresses, then the pool.
            for pool_id, addr in _pool_holdings([pool])[1:]:
                try:
                    ipam.release_address(pool_id, addr)  # type: ignore[arg-type]
                except errors.CNMError as exc:  # the pool's release below frees it anyway
                    _log.warning("network %s: release %s: %s", rec.name, addr, exc)
            try:
                ipam.release_pool(pool.pool_id)
            except errors.NotFound:
                if not missing_ok:
                    raise

    def _delete_network(self, net: Network) -> None:
        with self._lock:
            with self._store.tx():
                rec = self._store.network_by_id(net.id)
                if rec is None:
                    raise errors.NetworkNotFound(net.name)
                names = self._store.endpoint_names(rec.id)
                if names:
                    raise errors.ActiveEndpoints(rec.name, names)
                if rec.state == "creating":
                    raise errors.Conflict(f"network {rec.name!r} is still being created")
                self._store.set_network_state(rec.id, "deleting")
            withdrawn = False
            try:
                if self._global is not None and rec.scope != "local":  # global scope
                    self._global.withdraw_network(rec)
                    withdrawn = True
                self._driver_for(rec).delete_network(rec.id)
                self._announced.discard((rec.driver, rec.id))
            except BaseException as exc:
                # The network stays: so do its global records (other hosts keep it).
                # If they cannot be put back, the intent stays "deleting" for
                # reconcile to finish the delete.
                republished = True
                if withdrawn:
                    try:
                        self._global.publish_network(rec)
                    except Exception as cleanup:
                        republished = False
                        exc.add_note(
                            f"rollback: republish in the global store: {cleanup}; the "
                            "network stays 'deleting' until reconcile completes the delete"
                        )
                if republished:
                    self._store.set_network_state(rec.id, "ready")
                raise
            self._release_then_delete(
                rec,
                lambda: self._release_network_pools(rec),
                lambda: self._store.delete_network(rec.id),
            )

    # --- endpoints -----------------------------------------------------------------------

    def _create_endpoints(self, net: Network, specs: Sequence[EndpointSpec]) -> list[Endpoint]:
        parsed = []
        seen: set[str] = set()
        for name, v4, v6, mac, options in specs:
            validate_name("endpoint", name)
            if name in seen:
                raise errors.NameInUse("endpoint", name)
            seen.add(name)
            parsed.append(
                (
                    name,
                    parse_address(v4, "ipv4_address", 4) if v4 else None,
                    parse_address(v6, "ipv6_address", 6) if v6 else None,
                    parse_mac(mac) if mac else None,
                    parse_string_map(options, "endpoint options"),
                )
            )
        if not parsed:
            return []
        with self._lock:
            rec = self._store.network_by_id(net.id)
            if rec is None:
                raise errors.NetworkNotFound(net.name)
            # A plugin's IPAM is asked before the write transaction (see create_network);
            # the store's own IPAM inside it, so that a rollback undoes it.
            outside = not self._ipam_in_store(rec)
            records: list[EndpointRecord] = []
            ifaces: list[InterfaceInfo] = []
            held: list[IPInterface] = []
            if outside:
                rec = self._endpoints_network(net, parsed)
                records, ifaces, held = self._allocate_endpoints(rec, parsed)
            try:
                with self._store.tx():
                    rec = self._endpoints_network(net, parsed)
                    if not outside:
                        records, ifaces, held = self._allocate_endpoints(rec, parsed)
                    self._store.put_endpoints(records)
            except BaseException as exc:
                if outside and held:
                    _undo_ipam(self.ipam_driver(rec.ipam_driver), _address_holdings(rec, held), exc)
                raise
            drv = self._driver_for(rec)
            done: list[EndpointRecord] = []
            try:
                for ep, iface in zip(records, ifaces, strict=True):
                    reply = drv.create_endpoint(
                        EndpointInfo(
                            id=ep.id,
                            name=ep.name,
                            network_id=rec.id,
                            interface=iface,
                            options=ep.options,
                        )
                    )
                    done.append(_apply_interface_reply(drv.name, ep, iface, reply))
            except BaseException as exc:
                failed = records[len(done)]
                for ep in [*done, failed]:
                    try:
                        drv.delete_endpoint(rec.id, ep.id)
                    except Exception as cleanup:  # keep going: every endpoint gets its chance
                        exc.add_note(f"rollback: delete_endpoint {ep.name}: {cleanup}")
                self._release_then_delete(
                    rec,
                    lambda: self._release_endpoint_addresses(rec, records),
                    lambda: self._store.delete_endpoints([e.id for e in records]),
                )
                raise
            self._store.put_endpoints(done)
            return [Endpoint(self, r) for r in done]

    def _endpoints_network(self, net: Network, parsed: Sequence[tuple[Any, ...]]) -> NetworkRecord:
        """The network new endpoints go on, checked: it exists and is ready, has IPv6
        if an IPv6 address is asked for, and none of the names is taken."""
        rec = self._store.network_by_id(net.id)
        if rec is None:
            raise errors.NetworkNotFound(net.name)
        if rec.state != "ready":
            raise errors.Conflict(f"network {rec.name!r} is {rec.state}")
        if any(v6 for _, _, v6, _, _ in parsed) and not rec.enable_ipv6:
            raise errors.InvalidParameter(f"network {rec.name!r} has no IPv6 pool")
        for name, *_ in parsed:
            if self._store.endpoint_by_name(rec.id, name) is not None:
                raise errors.NameInUse("endpoint", name)
        return rec

    def _allocate_endpoints(
        self, rec: NetworkRecord, parsed: Sequence[tuple[Any, ...]]
    ) -> tuple[list[EndpointRecord], list[InterfaceInfo], list[IPInterface]]:
        """New endpoint records (state "creating") with their addresses; all or nothing:
        on failure what was taken is given back (a remote IPAM keeps it otherwise)."""
        records = []
        ifaces = []
        held: list[IPInterface] = []
        wants_mac = False
        if rec.ipam_driver != "null":
            ipam = self.ipam_driver(rec.ipam_driver)
            wants_mac = implements(ipam, MacAddressAware) and bool(
                ipam.requires_mac_address  # type: ignore[attr-defined]
            )
        try:
            for name, v4, v6, mac, options in parsed:
                ep_id = new_id()
                addr_options: dict[str, str] | None = None
                if wants_mac:
                    # The engine's rule: an IPAM that requires the MAC address gets it
                    # with each RequestAddress; one is made now if the user gave none.
                    mac = mac or generate_mac()
                    addr_options = {MAC_ADDRESS_OPTION: mac}
                a4 = self._allocate(rec, rec.ipv4, v4, ep_id, addr_options)
                held += [a4] if a4 else []
                a6 = (
                    self._allocate(rec, rec.ipv6, v6, ep_id, addr_options)
                    if rec.enable_ipv6
                    else None
                )
                held += [a6] if a6 else []
                v4_text = str(a4) if a4 else None
                if v4_text is not None and type(a4) is ipaddress.IPv4Interface:
                    _remember_ipv4(v4_text, a4)  # a join parses it otherwise
                records.append(
                    EndpointRecord(
                        id=ep_id,
                        name=name,
                        network_id=rec.id,
                        ipv4_address=v4_text,
                        ipv6_address=str(a6) if a6 else None,
                        mac_address=mac or "",
                        options=options,
                        sandbox_id=None,
                        state="creating",
                        join_state="",
                        driver_data={},
                    )
                )
                ifaces.append(InterfaceInfo(a4, a6, mac))  # type: ignore[arg-type]
        except BaseException as exc:
            if held:
                _undo_ipam(self.ipam_driver(rec.ipam_driver), _address_holdings(rec, held), exc)
            raise
        return records, ifaces, held

    def _allocate(
        self,
        net: NetworkRecord,
        pools: Sequence[PoolData],
        want: IPAddress | None,
        owner: str,
        options: Mapping[str, str] | None = None,
    ) -> IPInterface | None:
        if not pools:
            if want is not None:
                raise errors.InvalidParameter(f"network {net.name!r} has no address pool")
            return None
        ipam = self.ipam_driver(net.ipam_driver)
        if want is not None:
            for pool in pools:
                if want in ipaddress.ip_network(pool.subnet):
                    return ipam.request_address(pool.pool_id, want, options, owner=owner)
            raise errors.InvalidParameter(
                f"address {want} is outside the pools of network {net.name!r}"
            )
        last: errors.PoolExhausted | None = None
        for pool in pools:
            try:
                return ipam.request_address(pool.pool_id, None, options, owner=owner)
            except errors.PoolExhausted as exc:
                last = exc
        assert last is not None
        raise last

    def _release_endpoint_addresses(
        self, net: NetworkRecord, eps: Iterable[EndpointRecord]
    ) -> None:
        if net.ipam_driver == "null":
            return
        ipam = self.ipam_driver(net.ipam_driver)
        for ep in eps:
            for addr, pools in ((ep.ipv4_address, net.ipv4), (ep.ipv6_address, net.ipv6)):
                if not addr:
                    continue
                ip = ipaddress.ip_interface(addr).ip
                for pool in pools:
                    if ip in ipaddress.ip_network(pool.subnet):
                        with contextlib.suppress(errors.AddressNotFound):
                            ipam.release_address(pool.pool_id, ip)
                        break

    def delete_endpoints(self, endpoints: Iterable[Endpoint], force: bool = False) -> None:
        """Delete many endpoints; refused while any is joined, unless force."""
        self._delete_endpoints(as_list(endpoints, "endpoints"), force=force)

    def _delete_endpoints(self, endpoints: Sequence[Endpoint], *, force: bool) -> None:
        with self._lock:
            recs = _unique_records(self, endpoints)
            busy = [r for r in recs if r.join_state not in ("", "joined") or r.state != "ready"]
            if busy:
                raise errors.Conflict(
                    f"endpoint {busy[0].name!r} is in the middle of an operation "
                    f"({busy[0].state}/{busy[0].join_state}); run reconcile"
                )
            joined = [r for r in recs if r.join_state == "joined"]
            if joined and not force:
                raise errors.EndpointJoined(joined[0].name, joined[0].sandbox_id or "its engine")
            for r in [r for r in joined if r.driver_data.get("external")]:
                self.leave_external(Endpoint(self, r))
            joined = [r for r in joined if not r.driver_data.get("external")]
            if joined:
                self.leave_many(
                    [(Endpoint(self, r), self._sandbox_by_id(r.sandbox_id or "")) for r in joined]
                )
                recs = [self._endpoint_record(r.id) for r in recs]
            self._store.put_endpoints([replace(r, state="deleting") for r in recs])
            failures: list[Exception] = []
            deleted: dict[str, list[EndpointRecord]] = {}
            nets: dict[str, NetworkRecord] = {}
            for r in recs:
                net = nets.get(r.network_id) or self._store.network_by_id(r.network_id)
                assert net is not None
                nets[net.id] = net
                try:
                    self._driver_for(net).delete_endpoint(net.id, r.id)
                except Exception as exc:
                    failures.append(exc)
                    continue
                deleted.setdefault(net.id, []).append(r)
            for net_id, eps in deleted.items():
                self._release_then_delete(
                    nets[net_id],
                    functools.partial(self._release_endpoint_addresses, nets[net_id], eps),
                    functools.partial(self._store.delete_endpoints, [e.id for e in eps]),
                )
            _raise_all(failures, "delete endpoints")

    # --- sandboxes, join and leave -------------------------------------------------------

    def create_sandbox(
        self,
        container_id: str,
        hostname: str | None = None,
        dns: Sequence[str] = (),
        dns_search: Sequence[str] = (),
        extra_hosts: Sequence[str] = (),
    ) -> Sandbox:
        """Create a sandbox explicitly; it lives until deleted, whatever joins and leaves."""
        validate_name("container", container_id)
        rec = SandboxRecord(
            id=new_id(),
            container_id=container_id,
            key="",
            explicit=True,
            hostname=_check_hostname(hostname),
            dns=tuple(str(parse_address(d, "dns server")) for d in _str_list(dns, "dns")),
            dns_search=tuple(_check_domain(d) for d in _str_list(dns_search, "dns_search")),
            extra_hosts=tuple(_check_extra_host(h) for h in _str_list(extra_hosts, "extra_hosts")),
            state="creating",
        )
        rec = replace(rec, key=self._namespaces.key(rec.id))
        with self._lock:
            with self._store.tx():
                if self._store.sandbox_by_container(container_id) is not None:
                    raise errors.NameInUse("sandbox for container", container_id)
                self._store.put_sandbox(rec)
            try:
                self._namespaces.create(rec.id)
            except BaseException:
                self._store.delete_sandboxes([rec.id])
                raise
            rec = replace(rec, state="ready")
            self._store.put_sandbox(rec)
            self._write_files([rec.id])
            return Sandbox(self, rec)

    def join_many(self, pairs: Iterable[tuple[Endpoint, str | Sandbox]]) -> list[str]:
        """Join endpoints to containers, creating missing sandboxes; returns sandbox keys.

        All or nothing: a failure rolls back every sandbox and driver join it made.
        """
        pairs = as_pairs(pairs, "join_many")
        targets = [_container_of(t) for _, t in pairs]
        _check_endpoints([ep for ep, _ in pairs])
        return self._join(pairs, targets)

    def _join_one(self, endpoint: Endpoint, target: str | Sandbox) -> str:
        """Endpoint.join: a join_many of one pair, whose shape and endpoint are known."""
        return self._join([(endpoint, target)], [_container_of(target)])[0]

    def _join(self, pairs: list[tuple[Endpoint, str | Sandbox]], targets: list[str]) -> list[str]:
        """join_many of checked pairs; `targets`: each pair's container id."""
        with self._lock:
            with self._store.tx():
                plans, new_sandboxes, has_gateway = self._plan_joins(pairs, targets)
                inline = self._kernel_only(plans)
                if inline:
                    # Every driver's join leaves only what its reconcile() removes unless
                    # the store records the endpoint joined: the kernel work runs inside
                    # this transaction and the join is recorded in it (one commit, no
                    # intent; a failure or a crash rolls the store back to before it).
                    results = self._join_kernel(plans, new_sandboxes, has_gateway, inline=True)
                    if new_sandboxes:
                        self._store.put_sandboxes(
                            [replace(sb, state="ready") for sb in new_sandboxes.values()]
                        )
                    self._store.put_joins(
                        [
                            (eid, p.sandbox.id, data)
                            for p, (eid, data) in zip(plans, results, strict=True)
                        ]
                    )
                else:
                    if new_sandboxes:
                        self._store.put_sandboxes(list(new_sandboxes.values()))
                    self._store.put_join_intents([(p.endpoint.id, p.sandbox.id) for p in plans])
            if not inline:
                results = self._join_kernel(plans, new_sandboxes, has_gateway, inline=False)
                if new_sandboxes:
                    with self._store.tx():
                        self._store.put_join_results(results)
                        self._store.put_sandboxes(
                            [replace(sb, state="ready") for sb in new_sandboxes.values()]
                        )
                else:  # one write: a transaction of its own
                    self._store.put_join_results(results)
            # Without a hostname a sandbox's files do not depend on its endpoints: they
            # were written when it was made (those made here: now, from their records).
            if new_sandboxes:
                self._write_new_files([sb for sb in new_sandboxes.values() if not sb.hostname])
            rewrite = {p.sandbox.id for p in plans if p.sandbox.hostname}
            if rewrite:
                self._write_files(rewrite)
            if self._global is not None:  # global scope: publish overlay peer records
                self._global.joined([p.endpoint for p in plans])
            return [p.sandbox.key for p in plans]

    def _kernel_only(self, plans: list[_JoinPlan]) -> bool:
        """Whether every plan's driver is registered and a KernelOnlyJoin one (asked from
        memory: this runs inside the store's write transaction)."""
        for name in {p.network.driver for p in plans}:
            drv: Any = self._registry.registered(name)
            if drv is None or not (implements(drv, KernelOnlyJoin) and drv.kernel_only_joins):
                return False
        return True

    def _plan_joins(
        self, pairs: list[tuple[Endpoint, str | Sandbox]], targets: list[str]
    ) -> tuple[list[_JoinPlan], dict[str, SandboxRecord], set[str]]:
        """Inside the store's write transaction: each join's endpoint, network, sandbox
        (new ones made up, not yet stored) and interface name, every check made; also the
        sandboxes that have their gateway endpoint already."""
        plans: list[_JoinPlan] = []
        new_sandboxes: dict[str, SandboxRecord] = {}
        seen: set[str] = set()
        joined_count: dict[str, int] = {}  # per network, read with its endpoint
        # Per sandbox: the networks it is on, the interface names in use, and
        # whether it has its gateway endpoint already (read once per sandbox,
        # with the sandbox).
        on_nets: dict[str, set[str]] = {}
        used_names: dict[str, set[str]] = {}
        has_gateway: set[str] = set()
        # Sandboxes read, by handle id or by container id (None: none yet).
        read: dict[tuple[bool, str], SandboxRecord | None] = {}
        for (ep, target), cid in zip(pairs, targets, strict=True):
            # A Sandbox handle must still name a live sandbox; read once, it is
            # also the sandbox of its container (container ids are unique). A
            # sandbox is read with the first endpoint joining it, with the
            # endpoints it has.
            handle = target.id if isinstance(target, Sandbox) else None
            k = (True, handle) if handle is not None else (False, cid)
            first = k not in read
            found = self._store.join_reads(
                ep.id,
                sandbox_id=handle if first else None,
                container_id=cid if first and handle is None else None,
                known=ep.record,
            )
            if found is None:
                raise errors.EndpointNotFound(ep.id)
            rec, net = found.endpoint, found.network
            if rec.id in seen:
                raise errors.InvalidParameter(f"endpoint {rec.name!r} appears twice")
            seen.add(rec.id)
            if first:
                read[k] = found.sandbox
                if found.sandbox is not None and found.sandbox.id not in on_nets:
                    sid, present = found.sandbox.id, found.present
                    on_nets[sid] = {nid for nid, _, _ in present} if present else set()
                    used_names[sid] = {name for _, name, _ in present} if present else set()
                    if present and any(gw for _, _, gw in present):
                        has_gateway.add(sid)
            if handle is not None and read[k] is None:
                raise errors.SandboxNotFound(cid)
            if rec.state != "ready":
                raise errors.Conflict(f"endpoint {rec.name!r} is {rec.state}")
            if rec.join_state:
                raise errors.EndpointJoined(rec.name, rec.sandbox_id or "")
            assert net is not None
            joined_count.setdefault(net.id, found.joined)
            sb = read[k] or new_sandboxes.get(cid)
            if sb is None:
                sid = new_id()
                sb = SandboxRecord(
                    id=sid,
                    container_id=cid,
                    key=self._namespaces.key(sid),
                    explicit=False,
                    hostname=None,
                    dns=(),
                    dns_search=(),
                    extra_hosts=(),
                    state="creating",
                )
                new_sandboxes[cid] = sb
                on_nets[sid] = set()
                used_names[sid] = set()
            elif sb.state != "ready" and cid not in new_sandboxes:
                raise errors.Conflict(f"sandbox of {cid!r} is {sb.state}")
            if net.id in on_nets[sb.id]:
                raise errors.Conflict(
                    f"container {cid!r} already has an endpoint on network {net.name!r}"
                )
            on_nets[sb.id].add(net.id)
            used = used_names[sb.id]
            ifname = free_name(used, "eth") if used else "eth0"  # a sandbox's first: eth0
            used.add(ifname)
            plans.append(_JoinPlan(rec, net, sb, ifname))
        self._check_ports([p.network for p in plans], joined_count)
        return plans, new_sandboxes, has_gateway

    def _join_kernel(
        self,
        plans: list[_JoinPlan],
        new_sandboxes: dict[str, SandboxRecord],
        has_gateway: set[str],
        *,
        inline: bool,
    ) -> list[tuple[str, dict[str, object]]]:
        """The planned joins' namespaces, driver joins and sandbox interfaces; per plan
        (endpoint id, its driver data with the join's). A failure rolls every part back
        and is raised; `inline`: the caller's store transaction holds the plans (its
        rollback undoes them), else their intents are in the store."""
        created: list[SandboxRecord] = []
        joined: list[_JoinPlan] = []
        join_data: dict[str, dict[str, object]] = {}
        try:
            if new_sandboxes:
                self._namespaces.create_many([sb.id for sb in new_sandboxes.values()])
                created.extend(new_sandboxes.values())
            infos = self._driver_joins(plans, joined)
            # libnetwork's rule: one gateway endpoint per sandbox, the first joined
            # that offers one; the others get no default route (it would clash).
            wanted: list[_JoinPlan] = []
            configs = []
            for p, info in zip(plans, infos, strict=True):
                if info.src_name is None:
                    continue
                wanted.append(p)
                offers = info.gateway is not None or info.gateway_ipv6 is not None
                gateway = offers and p.sandbox.id not in has_gateway
                if gateway:
                    has_gateway.add(p.sandbox.id)
                join_data[p.endpoint.id] = {
                    "gateway": gateway,
                    "gw4": _address_text(info.gateway) if info.gateway else None,
                    "gw6": _address_text(info.gateway_ipv6) if info.gateway_ipv6 else None,
                }
                if not gateway:
                    info = replace(info, gateway=None, gateway_ipv6=None)
                # Made under its final name: configured without a rename.
                final = p.ifname if info.src_name == p.ifname else None
                configs.append((p.sandbox.key, _interface_config(p.endpoint, info, name=final)))
            outcomes = self._interfaces.add(configs)
            for p, outcome in zip(wanted, outcomes, strict=True):
                if isinstance(outcome, errors.CNMError):
                    raise outcome
                join_data[p.endpoint.id]["ifname"] = outcome
            for p in plans:
                drv = self._driver(p.network.driver)
                if implements(drv, ExternalConnectivity):
                    drv.program_external_connectivity(
                        p.network.id, p.endpoint.id, p.endpoint.options
                    )
        except BaseException as exc:
            self._rollback_join(
                exc, plans, joined, created, list(new_sandboxes.values()), inline=inline
            )
            raise
        return [
            (p.endpoint.id, _with_join(p.endpoint.driver_data, join_data.get(p.endpoint.id)))
            for p in plans
        ]

    def _check_ports(
        self, networks: Sequence[NetworkRecord], joined: Mapping[str, int] | None = None
    ) -> None:
        """Refuse, before the kernel does, a join past a driver's port limit (a Linux
        bridge takes 1024 ports; a PortLimit driver says per network, e.g. none for a
        routed bridge network); one entry in `networks` per join.

        Runs inside the store's write transaction, so it never resolves a driver (the
        first use of a remote driver is a plugin handshake, with retries and timeouts):
        only drivers already registered are asked, and a driver that is not registered
        yet cannot have a limit (a driver with one is built in or registered at start).
        `joined`: the networks' joined counts when already read in this transaction."""
        adding: dict[str, int] = {}
        first: dict[str, NetworkRecord] = {}
        for n in networks:
            adding[n.id] = adding.get(n.id, 0) + 1
            first.setdefault(n.id, n)
        for net_id, count in adding.items():
            net = first[net_id]
            drv = self._registry.registered(net.driver)
            if drv is None:
                continue
            self._announce(drv, net)
            limit: int | None = None
            if implements(drv, PortLimit):
                limit = drv.port_limit(net.id)  # type: ignore[attr-defined]
            elif implements(drv, FixedPortLimit):
                limit = drv.max_ports  # type: ignore[attr-defined]
            if limit is None:
                continue
            now = joined.get(net_id) if joined is not None else None
            if now is None:
                now = self._store.count_joined(net_id)
            if now + count > limit:
                raise errors.PortsExhausted(net.name, limit)

    def _driver_joins(self, plans: list[_JoinPlan], joined: list[_JoinPlan]) -> list[JoinInfo]:
        """Each plan's driver join (in one batch per driver that can); every success is
        appended to `joined` for rollback, the first failure raised."""
        infos: list[JoinInfo | None] = [None] * len(plans)
        first_error: BaseException | None = None
        by_driver: dict[str, list[int]] = {}
        for i, p in enumerate(plans):
            by_driver.setdefault(p.network.driver, []).append(i)
        for name, idxs in by_driver.items():
            drv = self._driver(name)
            items: list[tuple[str, str, SandboxInfo]] = []
            for i in idxs:
                ep, net, sb, ifname = plans[i]
                self._announce(drv, net)
                info = _interface_info(ep)
                items.append(
                    (net.id, ep.id, SandboxInfo(sb.id, sb.key, sb.container_id, ifname, info))
                )
            if implements(drv, BulkJoin):
                outcomes: list[Any] = drv.join_many(items)
            else:
                outcomes = []
                for item in items:
                    try:
                        outcomes.append(drv.join(*item))
                    except Exception as exc:  # roll back the ones before, then raise it
                        outcomes.append(exc)
                        break
            for i, outcome in zip(idxs, outcomes, strict=False):
                if isinstance(outcome, BaseException):
                    first_error = first_error or outcome
                else:
                    infos[i] = outcome
                    joined.append(plans[i])
        if first_error is not None:
            raise first_error
        assert None not in infos
        return infos  # type: ignore[return-value]

    # --- joins into sandboxes an engine owns (the plugin server) --------------------------

    def join_external(self, endpoint: Endpoint) -> JoinInfo:
        """Join an endpoint for an engine that owns the sandbox itself (Docker through
        the plugin protocol, spec/remote-protocol.md Join): the driver leaves the
        interface on the host, as `JoinInfo.src_name`, for the engine to move in.

        Recorded like any join (intent, kernel, confirmation) but with no sandbox of
        cnm's: the endpoint is "joined" with `driver_data["external"]`, so the port limit
        counts it and reconcile keeps its devices.
        """
        _check_endpoints([endpoint])
        with self._lock:
            with self._store.tx():
                rec = self._endpoint_record(endpoint.id)
                if rec.state != "ready":
                    raise errors.Conflict(f"endpoint {rec.name!r} is {rec.state}")
                if rec.join_state:
                    raise errors.EndpointJoined(rec.name, rec.sandbox_id or "its engine")
                net = self._store.network_by_id(rec.network_id)
                assert net is not None
                self._check_ports([net])
                intent = replace(
                    rec, join_state="joining", driver_data={**rec.driver_data, "external": True}
                )
                self._store.put_endpoints([intent])
            drv = self._driver_for(net)
            try:
                if not implements(drv, HostJoin):
                    raise errors.Unsupported(
                        f"driver {net.driver!r} cannot join a sandbox its engine owns"
                    )
                info: JoinInfo = drv.join_on_host(  # type: ignore[attr-defined]
                    net.id, rec.id, _interface_info(rec)
                )
            except BaseException:
                with self._store.tx():
                    self._store.put_endpoints([rec])  # as before the intent
                raise
            with self._store.tx():
                self._store.put_endpoints([replace(intent, join_state="joined")])
            return info

    def leave_external(self, endpoint: Endpoint) -> None:
        """Undo `join_external`. A driver failure leaves the endpoint "leaving" for
        reconcile() to finish, and is raised."""
        _check_endpoints([endpoint])
        with self._lock:
            with self._store.tx():
                rec = self._endpoint_record(endpoint.id)
                if rec.join_state != "joined" or not rec.driver_data.get("external"):
                    raise errors.EndpointNotJoined(rec.name, "its engine")
                net = self._store.network_by_id(rec.network_id)
                assert net is not None
                self._store.put_endpoints([replace(rec, join_state="leaving")])
            self._driver_for(net).leave(net.id, rec.id)
            data = {k: v for k, v in rec.driver_data.items() if k != "external"}
            with self._store.tx():
                self._store.put_endpoints([replace(rec, join_state="", driver_data=data)])

    def _check_sandbox_handle(self, target: object) -> None:
        """A Sandbox handle must still name a live sandbox, not just a container id."""
        if isinstance(target, Sandbox) and self._store.sandbox_by_id(target.id) is None:
            raise errors.SandboxNotFound(target.container_id)

    def _rollback_join(
        self,
        exc: BaseException,
        plans: list[_JoinPlan],
        joined: list[_JoinPlan],
        created: list[SandboxRecord],
        new_sandboxes: list[SandboxRecord],
        *,
        inline: bool = False,
    ) -> None:
        """Undo what a failed join made, then the plans' intents (`inline`: there are
        none, the caller's transaction rolls the store back)."""
        problems = 0
        fresh = {sb.id for sb in new_sandboxes}
        survivors = [p for p in joined if p.sandbox.id not in fresh]
        if survivors:
            # Whatever name the interface reached inside a sandbox that stays.
            items = [
                (p.sandbox.key, n)
                for p in survivors
                for n in _join_names(p.endpoint.id, p.network.driver, p.ifname)
            ]
            for outcome in self._interfaces.retire(items):
                if outcome is not None and outcome.errno not in (errno.ENODEV,):
                    problems += 1
                    exc.add_note(f"rollback: {outcome}")
        for p in reversed(joined):
            drv = self._driver(p.network.driver)
            try:
                if implements(drv, ExternalConnectivity):
                    drv.revoke_external_connectivity(p.network.id, p.endpoint.id)
                drv.leave(p.network.id, p.endpoint.id)
            except Exception as cleanup:
                problems += 1
                exc.add_note(f"rollback: leave {p.endpoint.name}: {cleanup}")
        for sb in created:
            try:
                self._namespaces.delete(sb.key)
            except Exception as cleanup:
                problems += 1
                exc.add_note(f"rollback: delete namespace {sb.key}: {cleanup}")
        if problems:
            exc.add_note(
                "reconcile() removes what is left"
                if inline
                else "the join intents stay in the store: reconcile() finishes the rollback"
            )
            return
        if inline:
            return
        with self._store.tx():
            self._store.put_endpoints([p.endpoint for p in plans])  # as before the intent
            self._store.delete_sandboxes([sb.id for sb in new_sandboxes])

    def leave_many(self, pairs: Iterable[tuple[Endpoint, str | Sandbox]]) -> None:
        """Leave endpoints from their sandboxes; implicit sandboxes left empty are deleted.

        Teardown keeps going past a failing endpoint and raises every failure at the end;
        a failed endpoint stays "leaving" for reconcile() to finish.
        """
        pairs = as_pairs(pairs, "leave_many")
        targets = [_container_of(t) for _, t in pairs]
        _check_endpoints([ep for ep, _ in pairs])
        with self._lock:
            leaving: list[tuple[EndpointRecord, NetworkRecord, SandboxRecord]] = []
            with self._store.tx():
                seen: set[str] = set()
                for (ep, target), cid in zip(pairs, targets, strict=True):
                    rec = self._endpoint_record(ep.id)
                    if rec.id in seen:
                        raise errors.InvalidParameter(f"endpoint {rec.name!r} appears twice")
                    seen.add(rec.id)
                    self._check_sandbox_handle(target)
                    sb = self._store.sandbox_by_container(cid)
                    if sb is None:
                        raise errors.SandboxNotFound(cid)
                    if rec.sandbox_id != sb.id or rec.join_state != "joined":
                        raise errors.EndpointNotJoined(rec.name, cid)
                    net = self._store.network_by_id(rec.network_id)
                    assert net is not None
                    leaving.append((rec, net, sb))
                self._store.put_endpoints([replace(r, join_state="leaving") for r, _, _ in leaving])
            failures: list[Exception] = []
            left = self._leave_kernel(leaving, failures)
            empty: dict[str, SandboxRecord] = {}
            with self._store.tx():
                self._store.put_endpoints(
                    [
                        replace(
                            r,
                            sandbox_id=None,
                            join_state="",
                            driver_data=_with_join(r.driver_data, None),
                        )
                        for r, _ in left
                    ]
                )
                for _, sb in left:
                    if not sb.explicit and not self._store.endpoints(sandbox_id=sb.id):
                        empty[sb.id] = replace(sb, state="deleting")
                self._store.put_sandboxes(list(empty.values()))
            self._delete_sandbox_namespaces(list(empty.values()), failures)
            self._write_files({sb.id for _, sb in left if sb.hostname} - set(empty))
            if self._global is not None:  # global scope: withdraw overlay peer records
                self._global.left([r for r, _ in left])
            _raise_all(failures, "leave")

    def _leave_kernel(
        self,
        leaving: list[tuple[EndpointRecord, NetworkRecord, SandboxRecord]],
        failures: list[Exception],
    ) -> list[tuple[EndpointRecord, SandboxRecord]]:
        """Undo joins in the kernel; returns the ones that left, failures appended."""
        ids = {r.id for r, _, _ in leaving}
        doomed = {
            sb.id
            for _, _, sb in leaving
            if not sb.explicit and all(e.id in ids for e in self._store.endpoints(sandbox_id=sb.id))
        }
        # In a sandbox that stays, the interface is renamed away and its addresses
        # dropped now, so its name and addresses can be handed out again at once; the
        # device itself goes with the driver's deferred deletion.
        retire = [
            (sb.key, r.driver_data["ifname"])
            for r, _, sb in leaving
            if sb.id not in doomed and r.driver_data.get("ifname")
        ]
        if retire:
            failures.extend(e for e in self._interfaces.retire(retire) if e is not None)
        self._hand_over_gateway(leaving, doomed, ids, failures)
        left: list[tuple[EndpointRecord, SandboxRecord]] = []
        by_driver: dict[str, list[tuple[EndpointRecord, NetworkRecord, SandboxRecord]]] = {}
        for item in leaving:
            by_driver.setdefault(item[1].driver, []).append(item)
        for group in by_driver.values():
            drv = self._driver_for(group[0][1])
            for _, net, _ in group:
                self._driver_for(net)
            if implements(drv, ExternalConnectivity):
                for rec, net, _ in group:
                    try:
                        drv.revoke_external_connectivity(net.id, rec.id)
                    except Exception as exc:
                        failures.append(exc)
            if implements(drv, BulkJoin):
                try:
                    drv.leave_many([(net.id, rec.id) for rec, net, _ in group])
                except Exception as exc:
                    failures.append(exc)
                    continue
                left.extend((rec, sb) for rec, _, sb in group)
                continue
            for rec, net, sb in group:
                try:
                    drv.leave(net.id, rec.id)
                except Exception as exc:
                    failures.append(exc)
                    continue
                left.append((rec, sb))
        return left

    def _hand_over_gateway(
        self,
        leaving: list[tuple[EndpointRecord, NetworkRecord, SandboxRecord]],
        doomed: set[str],
        ids: set[str],
        failures: list[Exception],
    ) -> None:
        """When a sandbox's gateway endpoint leaves and the sandbox stays, the default
        route moves to another joined endpoint that offers a gateway."""
        for rec, _, sb in leaving:
            if sb.id in doomed or not rec.driver_data.get("gateway"):
                continue
            heirs = [
                e
                for e in self._store.endpoints(sandbox_id=sb.id)
                if e.id not in ids
                and e.join_state == "joined"
                and e.driver_data.get("ifname")
                and (e.driver_data.get("gw4") or e.driver_data.get("gw6"))
            ]
            if not heirs:
                continue
            heir = heirs[0]
            gw4, gw6 = heir.driver_data.get("gw4"), heir.driver_data.get("gw6")
            try:
                self._interfaces.set_default_route(
                    sb.key,
                    str(heir.driver_data["ifname"]),
                    ipaddress.ip_address(gw4) if gw4 else None,
                    ipaddress.ip_address(gw6) if gw6 else None,
                )
            except errors.CNMError as exc:
                failures.append(exc)
                continue
            self._store.put_endpoint(
                replace(heir, driver_data={**heir.driver_data, "gateway": True})
            )

    def _delete_sandbox_namespaces(
        self, sandboxes: list[SandboxRecord], failures: list[Exception]
    ) -> None:
        gone = []
        for sb in sandboxes:
            try:
                self._namespaces.delete(sb.key)
            except Exception as exc:
                failures.append(exc)
                continue
            gone.append(sb.id)
            remove_files(self.run_dir, sb.id)
        self._store.delete_sandboxes(gone)

    def _write_new_files(self, sandboxes: Iterable[SandboxRecord]) -> None:
        """Write the files of sandboxes made just now, without a hostname, from their
        records in hand (no store reads): their hosts lists no endpoint address."""
        for sb in sandboxes:
            self._write_sandbox_files(sb, ())

    def _write_files(self, sandbox_ids: Iterable[str]) -> None:
        """Rewrite the hosts / resolv.conf / hostname files of these sandboxes."""
        for sid in sandbox_ids:
            sb = self._store.sandbox_by_id(sid)
            if sb is None:
                continue
            addresses: list[Any] = []
            for ep in self._store.endpoints(sandbox_id=sid):
                if ep.join_state == "joined":
                    addresses += [
                        ipaddress.ip_interface(a) for a in (ep.ipv4_address, ep.ipv6_address) if a
                    ]
            self._write_sandbox_files(sb, addresses)

    def _write_sandbox_files(self, sb: SandboxRecord, addresses: Sequence[IPInterface]) -> None:
        """One sandbox's files from its record and its joined endpoints' addresses; a
        failure is logged (the files are a convenience for the container, not state)."""
        try:
            write_files(
                self.run_dir,
                sb.id,
                hostname=sb.hostname,
                addresses=addresses,
                extra_hosts=sb.extra_hosts,
                dns=sb.dns,
                dns_search=sb.dns_search,
            )
        except OSError as exc:
            _log.warning("sandbox %s: cannot write its files: %s", sb.id[:12], exc)

    def _delete_sandbox(self, sandbox: Sandbox) -> None:
        with self._lock:
            rec = self._store.sandbox_by_id(sandbox.id)
            if rec is None:
                raise errors.SandboxNotFound(sandbox.container_id)
            joined = [
                r for r in self._store.endpoints(sandbox_id=rec.id) if r.join_state == "joined"
            ]
            if joined:
                self.leave_many([(Endpoint(self, r), rec.container_id) for r in joined])
            rec = self._store.sandbox_by_id(rec.id)
            if rec is None:  # the last leave deleted an implicit sandbox
                return
            if self._store.endpoints(sandbox_id=rec.id):
                raise errors.Conflict(
                    f"sandbox of {rec.container_id!r} has endpoints mid-operation; run reconcile"
                )
            self._store.put_sandbox(replace(rec, state="deleting"))
            failures: list[Exception] = []
            self._delete_sandbox_namespaces([rec], failures)
            _raise_all(failures, "delete sandbox")

    # --- repair --------------------------------------------------------------------------

    def reconcile(self) -> Any:
        """Compare the store with the kernel, finish or undo interrupted work, and report."""
        from .reconcile import reconcile

        with self._lock:
            return reconcile(self)


# --- helpers -------------------------------------------------------------------------------


def _select_fastpath(requested: str | None) -> str:
    """The backend for a request; None means $CNM_FASTPATH, else "auto"."""
    if requested is None:
        requested = os.environ.get("CNM_FASTPATH") or "auto"
    if requested not in fastpath.CHOICES:
        raise ValueError(
            f"fastpath must be one of {', '.join(fastpath.CHOICES)}, not {requested!r}"
        )
    try:
        return fastpath.select_backend(requested)
    except fastpath.BackendUnavailable as exc:
        raise errors.Unavailable(str(exc)) from None


def _ipam_configs(configs: Sequence[IPAMConfig] | None, version: int) -> list[ValidIPAMConfig]:
    if configs is None:
        return []
    if isinstance(configs, IPAMConfig) or not isinstance(configs, Sequence):
        raise errors.InvalidParameter(f"ipv{version} must be a list of IPAMConfig")
    out = []
    for cfg in configs:
        if not isinstance(cfg, IPAMConfig):
            raise errors.InvalidParameter(f"ipv{version} entries must be IPAMConfig, not {cfg!r}")
        out.append(cfg.validated(version))
    if len(out) > 1 and any(c.subnet is None for c in out):
        raise errors.InvalidParameter(f"ipv{version}: several pools need explicit subnets")
    return out


def _check_pool_overlap(configs: Sequence[ValidIPAMConfig]) -> None:
    subnets = [c.subnet for c in configs if c.subnet is not None]
    for i, a in enumerate(subnets):
        for b in subnets[i + 1 :]:
            if a.version == b.version and a.overlaps(b):  # type: ignore[arg-type]
                raise errors.InvalidParameter(f"subnets {a} and {b} overlap")


def _apply_interface_reply(
    driver: str, ep: EndpointRecord, sent: InterfaceInfo, reply: InterfaceInfo | None
) -> EndpointRecord:
    """Take what the driver filled in; refuse a change to a field that was already set."""
    mac = ep.mac_address
    if reply is not None:
        for field_name in ("ipv4_address", "ipv6_address", "mac_address"):
            mine, theirs = getattr(sent, field_name), getattr(reply, field_name)
            if mine is not None and theirs is not None and str(mine) != str(theirs):
                raise errors.DriverError(
                    driver, f"create_endpoint changed {field_name} from {mine} to {theirs}"
                )
        if reply.ipv4_address is not None and sent.ipv4_address is None:
            raise errors.DriverError(driver, "create_endpoint set an address the IPAM did not give")
        if reply.mac_address:
            mac = parse_mac(reply.mac_address)
    if not mac:
        ip = sent.ipv4_address.ip if sent.ipv4_address is not None else None
        mac = generate_mac(ip)  # type: ignore[arg-type]
    return replace(ep, mac_address=mac, state="ready")


def _pool_holdings(pools: Iterable[PoolData]) -> list[tuple[str, IPAddress | None]]:
    """What a network's pools hold at an IPAM, in the order taken: each pool (None),
    then its gateway and aux addresses."""
    out: list[tuple[str, IPAddress | None]] = []
    for pool in pools:
        out.append((pool.pool_id, None))
        held = [pool.gateway] if pool.gateway else []
        held += list(pool.aux_addresses.values())
        out += [(pool.pool_id, ipaddress.ip_interface(a).ip) for a in held]
    return out


def _address_holdings(
    net: NetworkRecord, addresses: Iterable[IPInterface]
) -> list[tuple[str, IPAddress | None]]:
    """Each address with the pool of `net` it was taken from."""
    out: list[tuple[str, IPAddress | None]] = []
    for a in addresses:
        for pool in (*net.ipv4, *net.ipv6):
            if a.ip in ipaddress.ip_network(pool.subnet):
                out.append((pool.pool_id, a.ip))
                break
    return out


def _in_store(ipam: IpamDriver, ref: str) -> bool:
    """Whether what the IPAM allocates under `ref` (a pool id or an address space) is
    kept in the controller's store, so that a store rollback undoes it: then its calls
    are made inside the store's write transaction (the default IPAM's local pools, its
    `transactional(ref)`). Everything else (an IPAM plugin, the global address space in
    etcd) is asked outside any transaction, and what it gave is given back on failure."""
    transactional = getattr(ipam, "transactional", None)
    return transactional is not None and bool(transactional(ref))


def _address_space(ipam: IpamDriver, scope: str) -> str:
    """The IPAM's default address space for a driver's data scope."""
    local, global_ = ipam.default_address_spaces()
    return global_ if scope in ("global", "swarm") else local


def _undo_ipam(
    ipam: IpamDriver, undo: Sequence[tuple[str, IPAddress | None]], exc: BaseException
) -> None:
    """Give back, newest first, addresses (pool, ip) and pools (pool, None) taken before
    `exc`; what cannot be given back is noted on `exc`."""
    for pool_id, addr in reversed(undo):
        try:
            if addr is None:
                ipam.release_pool(pool_id)
            else:
                ipam.release_address(pool_id, addr)
        except Exception as cleanup:
            exc.add_note(f"rollback: release {addr or 'pool'} of {pool_id}: {cleanup}")


def _unique_records(ctl: NetworkController, endpoints: Sequence[Endpoint]) -> list[EndpointRecord]:
    _check_endpoints(endpoints)
    recs: dict[str, EndpointRecord] = {}
    for ep in endpoints:
        recs[ep.id] = ctl._endpoint_record(ep.id)
    return list(recs.values())


_JOIN_KEYS = ("ifname", "gateway", "gw4", "gw6")


def _with_join(data: Mapping[str, object], join: Mapping[str, object] | None) -> dict[str, object]:
    """An endpoint's driver_data with what its join set up (None: after a leave)."""
    out = {k: v for k, v in data.items() if k not in _JOIN_KEYS} if data else {}
    if join:
        out.update(join)
    return out


# Gateway addresses as text, by the address object: a driver hands back the same gateway
# object with every join of a network (the bridge keeps it per network) and str() of an
# ipaddress object costs more than the rest of a join's driver data. Each entry holds its
# object, so its id is not reused while the entry lives.
_ADDRESS_TEXT: dict[int, tuple[IPAddress, str]] = {}
_ADDRESS_TEXT_MAX = 256


def _address_text(addr: IPAddress) -> str:
    known = _ADDRESS_TEXT.get(id(addr))
    if known is not None and known[0] is addr:
        return known[1]
    if len(_ADDRESS_TEXT) >= _ADDRESS_TEXT_MAX:
        _ADDRESS_TEXT.clear()
    text = str(addr)
    _ADDRESS_TEXT[id(addr)] = (addr, text)
    return text


def _parse_ipv4_interface(text: str) -> ipaddress.IPv4Interface:
    """An IPv4 interface as the store keeps it ("a.b.c.d/len", str() of one): built from
    its integer and prefix length, which skips the ipaddress module's octet-by-octet
    parse (a join's costliest parse); anything else goes through that parse."""
    addr, _, plen = text.partition("/")
    octets = addr.split(".")
    if len(octets) == 4 and addr.replace(".", "").isdigit() and plen.isdigit():
        a, b, c, d = map(int, octets)
        if max(a, b, c, d) <= 255 and int(plen) <= 32:
            return ipaddress.IPv4Interface(((a << 24) | (b << 16) | (c << 8) | d, int(plen)))
    return ipaddress.IPv4Interface(text)


# An endpoint's stored IPv4 address, parsed once (each join needs it twice) or kept from
# its allocation (create_endpoints); the objects are immutable, so sharing them is safe.
_IPV4_KNOWN: dict[str, ipaddress.IPv4Interface] = {}
_IPV4_KNOWN_MAX = 4096


def _ipv4_interface(text: str) -> ipaddress.IPv4Interface:
    iface = _IPV4_KNOWN.get(text)
    if iface is None:
        iface = _parse_ipv4_interface(text)
        _remember_ipv4(text, iface)
    return iface


def _remember_ipv4(text: str, iface: ipaddress.IPv4Interface) -> None:
    if len(_IPV4_KNOWN) >= _IPV4_KNOWN_MAX:
        _IPV4_KNOWN.clear()
    _IPV4_KNOWN[text] = iface


_ipv6_interface = functools.lru_cache(maxsize=4096)(ipaddress.IPv6Interface)


def _interface_info(ep: EndpointRecord) -> InterfaceInfo:
    """The endpoint's interface as allocated (SandboxInfo.interface at join)."""
    return InterfaceInfo(
        _ipv4_interface(ep.ipv4_address) if ep.ipv4_address else None,
        _ipv6_interface(ep.ipv6_address) if ep.ipv6_address else None,
        ep.mac_address or None,
    )


def _join_names(endpoint_id: str, driver: str, ifname: str | None) -> list[str]:
    """Names a half-made interface may have in its sandbox (rollback of a failed join):
    the name the driver made it under, or the one it was renamed to."""
    names = [ifname] if ifname else []
    if driver == "bridge":
        from .drivers.bridge import peer_name

        names.append(peer_name(endpoint_id))
    elif driver == "overlay":
        from .drivers.overlay import peer_name as overlay_peer_name

        names.append(overlay_peer_name(endpoint_id))
    return names


def _interface_config(
    ep: EndpointRecord, info: JoinInfo, *, gateway: bool = True, name: str | None = None
) -> InterfaceConfig:
    """The sandbox side of a join; `gateway=False`: no default route (the sandbox has
    its gateway endpoint already); `name`: the driver made it under its final name."""
    addresses: list[Any] = []
    if ep.ipv4_address:
        addresses.append(_ipv4_interface(ep.ipv4_address))
    if ep.ipv6_address:
        addresses.append(_ipv6_interface(ep.ipv6_address))
    routes = (
        tuple(
            Route(
                ipaddress.ip_network(r.destination, strict=False),
                r.next_hop if r.route_type == 0 else None,
            )
            for r in info.static_routes
        )
        if info.static_routes
        else ()
    )
    return InterfaceConfig(
        src_name=info.src_name or "",
        in_sandbox=info.in_sandbox,
        dst_prefix=info.dst_prefix,
        mac=ep.mac_address or None,
        addresses=tuple(addresses),
        gateway=info.gateway,
        gateway6=info.gateway_ipv6,
        routes=routes,
        name=name,
    )


def _check_endpoints(endpoints: Sequence[object]) -> None:
    for ep in endpoints:
        if not isinstance(ep, Endpoint):
            raise errors.InvalidParameter(f"expected an Endpoint, not {ep!r}")


def _container_of(target: object) -> str:
    if isinstance(target, Sandbox):
        return target.container_id
    return validate_name("container", target)


def _raise_all(failures: list[Exception], what: str) -> None:
    if len(failures) == 1:
        raise failures[0]
    if failures:
        raise ExceptionGroup(f"{what}: {len(failures)} operations failed", failures)


def _str_list(values: object, what: str) -> list[str]:
    if isinstance(values, str) or not isinstance(values, Sequence):
        raise errors.InvalidParameter(f"{what} must be a list of strings")
    if not all(isinstance(v, str) for v in values):
        raise errors.InvalidParameter(f"{what} must be a list of strings")
    return list(values)


def _check_hostname(hostname: object) -> str | None:
    if hostname is None:
        return None
    if not isinstance(hostname, str) or not _HOSTNAME_RE.match(hostname):
        raise errors.InvalidParameter(f"invalid hostname {hostname!r}")
    return hostname


def _check_domain(domain: str) -> str:
    if not _HOSTNAME_RE.match(domain):
        raise errors.InvalidParameter(f"invalid DNS search domain {domain!r}")
    return domain


def _check_extra_host(entry: str) -> str:
    host, sep, addr = entry.partition(":")
    if not sep or not _HOSTNAME_RE.match(host):
        raise errors.InvalidParameter(f"invalid extra host {entry!r}: expected NAME:IP")
    parse_address(addr, f"extra host {host!r} address")
    return entry
