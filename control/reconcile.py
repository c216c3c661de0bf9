"""Reconcile: bring the store and the kernel back into step after a crash or a failure.

Owns the repair rules. Intents left in the store ("creating", "deleting", "joining",
"leaving") by a controller that is gone are finished or undone; intents of a controller
that is still open (in this or another process) are left alone, since that work is in
flight. Sandboxes whose namespace vanished are recreated; namespaces, IPAM pools and
addresses that nothing owns are freed; then each driver that implements `Reconcilable`
checks its own kernel objects. Every repair is listed in the report; a repair that fails
is reported and the rest go on.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any

from . import errors
from .controller import _interface_config
from .driverapi import Driver, ExternalConnectivity, Reconcilable, SandboxInfo
from .ipam.default import DefaultIpam
from .osl.files import remove_files
from .types import EndpointRecord, NetworkRecord, Repair, SandboxRecord

if TYPE_CHECKING:
    from .controller import NetworkController


@dataclass
class ReconcileReport:
    repairs: list[Repair] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    in_flight: list[str] = field(default_factory=list)  # left alone: a live controller's work

    def add(self, kind: str, obj: str, detail: str = "") -> None:
        self.repairs.append(Repair(kind, obj, detail))

    def kinds(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.repairs:
            out[r.kind] = out.get(r.kind, 0) + 1
        return out

    @property
    def clean(self) -> bool:
        return not self.repairs and not self.errors

    def to_dict(self) -> dict[str, Any]:
        return {
            "repairs": [asdict(r) for r in self.repairs],
            "errors": list(self.errors),
            "in_flight": list(self.in_flight),
        }


def _config(ep: EndpointRecord, info: Any) -> Any:
    """The sandbox side of a repeated join (default route only for the gateway endpoint)."""
    return _interface_config(ep, info, gateway=bool(ep.driver_data.get("gateway", True)))


def _attempt(report: ReconcileReport, what: str, fn: Callable[[], object]) -> bool:
    try:
        fn()
    except errors.DriverNotFound as exc:
        report.errors.append(f"{what}: {exc}")
        return False
    except errors.NotFound:
        return True  # already gone: that is what we wanted
    except Exception as exc:
        report.errors.append(f"{what}: {exc}")
        return False
    return True


class _Repairer:
    def __init__(self, ctl: NetworkController) -> None:
        self.ctl = ctl
        self.store = ctl.store
        self.report = ReconcileReport()

    def in_flight(self, rec: NetworkRecord | EndpointRecord | SandboxRecord, what: str) -> bool:
        """True when a live controller other than ours wrote this intent: leave it be."""
        if rec.owner == self.store.owner or not self.store.owner_alive(rec.owner):
            return False
        self.report.in_flight.append(what)
        return True

    def driver(self, name: str) -> Driver:
        return self.ctl.registry.get(name)

    def driver_for(self, net: NetworkRecord) -> Driver:
        return self.ctl._driver_for(net)

    def run(self) -> ReconcileReport:
        self.endpoints()
        self.sandboxes()
        self.networks()
        ipam = self.ctl.ipam_driver("default")
        if isinstance(ipam, DefaultIpam):
            self.ipam_orphans(ipam)
        # A KernelOnlyJoin join holds the store's write transaction from its plan to its
        # commit, its namespaces and devices made but not recorded yet: the scans for
        # objects nothing records (orphan namespaces, those drivers' own) run in a write
        # transaction of their own, so they wait for such a join in flight and keep new
        # ones out until they are done. Other drivers (which may wait on a plugin or on
        # etcd) check theirs outside it, as before.
        with self.store.tx():
            self.orphan_namespaces()
            self.drivers(kernel_only=True)
        self.drivers(kernel_only=False)
        self.store.forget_dead_owners()
        return self.report

    def endpoints(self) -> None:
        store, report = self.store, self.report
        nets: dict[str, NetworkRecord | None] = {}
        for ep in store.endpoints():
            net = nets.setdefault(ep.network_id, store.network_by_id(ep.network_id))
            if net is None:
                store.delete_endpoints([ep.id])
                report.add("endpoint_without_network_removed", ep.id)
                continue
            intent = ep.join_state in ("joining", "leaving") or ep.state != "ready"
            if intent and self.in_flight(ep, f"endpoint {ep.id}"):
                continue
            external = bool(ep.driver_data.get("external"))  # its engine owns the sandbox
            if ep.join_state in ("joining", "leaving") or (
                ep.join_state == "joined"
                and not external
                and store.sandbox_by_id(ep.sandbox_id or "") is None
            ):

                def leave(ep: EndpointRecord = ep, net: NetworkRecord = net) -> None:
                    drv = self.driver_for(net)
                    if isinstance(drv, ExternalConnectivity):
                        drv.revoke_external_connectivity(ep.network_id, ep.id)
                    drv.leave(ep.network_id, ep.id)

                if not _attempt(report, f"leave {ep.id}", leave):
                    continue
                kind = {"joining": "join_rolled_back", "leaving": "leave_completed"}.get(
                    ep.join_state, "dangling_join_cleared"
                )
                data = {k: v for k, v in ep.driver_data.items() if k != "external"}
                ep = replace(ep, sandbox_id=None, join_state="", driver_data=data)
                store.put_endpoint(ep)
                report.add(kind, ep.id, f"endpoint {ep.name} of network {net.name}")
            if ep.state in ("creating", "deleting") and not ep.join_state:

                def delete(ep: EndpointRecord = ep, net: NetworkRecord = net) -> None:
                    self.driver_for(net).delete_endpoint(ep.network_id, ep.id)

                if not _attempt(report, f"delete endpoint {ep.id}", delete):
                    continue
                if not _attempt(
                    report, f"release addresses of endpoint {ep.id}", self.endpoint_gone(net, ep)
                ):
                    continue
                kind = (
                    "endpoint_create_rolled_back"
                    if ep.state == "creating"
                    else "endpoint_delete_completed"
                )
                report.add(kind, ep.id, f"endpoint {ep.name} of network {net.name}")

    def sandboxes(self) -> None:
        store, report, namespaces = self.store, self.report, self.ctl.namespaces
        for sb in store.sandboxes():
            if sb.state != "ready" and self.in_flight(sb, f"sandbox {sb.id}"):
                continue
            eps = store.endpoints(sandbox_id=sb.id)
            if not eps and (sb.state != "ready" or not sb.explicit):
                if _attempt(
                    report, f"delete namespace {sb.key}", lambda sb=sb: namespaces.delete(sb.key)
                ):
                    store.delete_sandboxes([sb.id])
                    remove_files(self.ctl.run_dir, sb.id)
                    kind = {
                        "creating": "sandbox_create_rolled_back",
                        "deleting": "sandbox_delete_completed",
                    }.get(sb.state, "empty_sandbox_removed")
                    report.add(kind, sb.id, f"container {sb.container_id}")
                continue
            if sb.state != "ready":
                sb = replace(sb, state="ready")
                store.put_sandbox(sb)
            if namespaces.exists(sb.key):
                self.interfaces(sb, eps)
                continue
            with contextlib.suppress(FileNotFoundError):
                os.unlink(sb.key)  # a stale file where the namespace was mounted

            def rejoin(sb: SandboxRecord = sb, eps: list[EndpointRecord] = eps) -> None:
                namespaces.create(sb.id, key=sb.key)
                for ep in eps:
                    net = store.network_by_id(ep.network_id)
                    assert net is not None
                    self.rejoin(sb, ep, net)

            if _attempt(report, f"recreate namespace {sb.key}", rejoin):
                report.add(
                    "sandbox_namespace_recreated",
                    sb.key,
                    f"container {sb.container_id}, {len(eps)} endpoint(s) rejoined",
                )

    def rejoin(self, sb: SandboxRecord, ep: EndpointRecord, net: NetworkRecord) -> None:
        """Join an endpoint to its sandbox again (its device or namespace vanished)."""
        drv = self.driver_for(net)
        with contextlib.suppress(Exception):
            drv.leave(net.id, ep.id)
        info = drv.join(net.id, ep.id, SandboxInfo(sb.id, sb.key, sb.container_id))
        if info.src_name is None:
            return
        outcome = self.ctl._interfaces.add([(sb.key, _config(ep, info))])[0]
        if isinstance(outcome, errors.CNMError):
            raise outcome
        self.store.put_endpoint(replace(ep, driver_data={**ep.driver_data, "ifname": outcome}))

    def interfaces(self, sb: SandboxRecord, eps: list[EndpointRecord]) -> None:
        """Joined endpoints whose interface vanished from their sandbox (its device was
        deleted behind cnm's back, taking the sandbox end with it): joined again."""
        wanted = [e for e in eps if e.join_state == "joined" and e.driver_data.get("ifname")]
        if not wanted:
            return
        try:
            present = set(self.ctl.namespaces.links(sb.key))
        except errors.CNMError as exc:
            self.report.errors.append(f"list interfaces of {sb.key}: {exc}")
            return
        for ep in wanted:
            if ep.driver_data["ifname"] in present:
                continue
            net = self.store.network_by_id(ep.network_id)
            assert net is not None

            def rejoin(ep: EndpointRecord = ep, net: NetworkRecord = net) -> None:
                self.rejoin(sb, ep, net)

            if _attempt(self.report, f"rejoin endpoint {ep.id}", rejoin):
                self.report.add(
                    "endpoint_interface_recreated",
                    ep.id,
                    f"{ep.driver_data['ifname']} in container {sb.container_id}",
                )

    def networks(self) -> None:
        store, report = self.store, self.report
        for net in store.networks():
            if net.state == "ready" or self.in_flight(net, f"network {net.id}"):
                continue
            if store.count_endpoints(net.id):
                store.set_network_state(net.id, "ready")
                report.add("network_delete_cancelled", net.id, f"network {net.name} has endpoints")
                continue

            if not self.withdraw(net):
                continue

            def delete(net: NetworkRecord = net) -> None:
                self.driver_for(net).delete_network(net.id)

            if not _attempt(report, f"delete network {net.name}", delete):
                continue
            if not _attempt(report, f"release pools of network {net.name}", self.network_gone(net)):
                continue
            kind = (
                "network_create_rolled_back"
                if net.state == "creating"
                else "network_delete_completed"
            )
            report.add(kind, net.id, f"network {net.name}")

    def endpoint_gone(self, net: NetworkRecord, ep: EndpointRecord) -> Callable[[], None]:
        """The endpoint's addresses given back, then its record deleted, by the
        controller's rule: in one store transaction for the store's own pools; a
        plugin's or the global address space's (etcd) calls first, outside it."""

        def release() -> None:
            with contextlib.suppress(errors.NotFound):  # its pool went before a crash
                self.ctl._release_endpoint_addresses(net, [ep])

        return lambda: self.ctl._release_then_delete(
            net, release, lambda: self.store.delete_endpoints([ep.id])
        )

    def network_gone(self, net: NetworkRecord) -> Callable[[], None]:
        """The network's addresses and pools given back (in the protocol's order), then
        its record deleted, by the same rule as endpoint_gone."""
        return lambda: self.ctl._release_then_delete(
            net,
            lambda: self.ctl._release_network_pools(net, missing_ok=True),
            lambda: self.store.delete_network(net.id),
        )

    def withdraw(self, net: NetworkRecord) -> bool:
        """A global-scope network's records taken out of etcd before its delete is
        finished here (other hosts then drop their mirror of it), as the controller's
        delete does: refused while another host has endpoints on it. True when done (or
        nothing to do); otherwise the error is reported and the intent stays for the
        next reconcile. A creation rolled back is withdrawn without the check (as the
        controller's own rollback), and, if etcd is away, again by the agent."""
        scope = self.ctl.global_scope
        if scope is None or net.scope == "local":
            return True
        try:
            scope.withdraw_network(net, check=net.state == "deleting")
        except errors.CNMError as exc:
            self.report.errors.append(
                f"withdraw network {net.name} from the global store: {exc} "
                f"(it stays {net.state!r} for the next reconcile)"
            )
            return False
        return True

    def ipam_orphans(self, ipam: DefaultIpam) -> None:
        store, report = self.store, self.report
        nets = [n for n in store.networks() if n.ipam_driver == "default"]
        used_pools = {p.pool_id for n in nets for p in (*n.ipv4, *n.ipv6)}
        endpoint_ids = {e.id for e in store.endpoints()}
        for pool_id in ipam.pools():
            if pool_id not in used_pools:
                ipam.release_pool(pool_id)
                report.add("orphan_pool_released", pool_id)
                continue
            for addr, kind, owner in ipam.allocated(pool_id):
                if kind == "endpoint" and owner not in endpoint_ids:
                    ipam.release_address(pool_id, addr)
                    report.add("orphan_address_released", str(addr), f"pool {pool_id}")

    def orphan_namespaces(self) -> None:
        namespaces = self.ctl.namespaces
        owned = {sb.key for sb in self.store.sandboxes()}
        for key in namespaces.mounted():
            if key not in owned and _attempt(
                self.report, f"delete namespace {key}", lambda k=key: namespaces.delete(k)
            ):
                self.report.add("orphan_namespace_removed", key)
        owned_ids = {sb.id for sb in self.store.sandboxes()}
        root = os.path.join(self.ctl.run_dir, "sandboxes")
        for sid in sorted(os.listdir(root)) if os.path.isdir(root) else []:
            if sid not in owned_ids:
                remove_files(self.ctl.run_dir, sid)
                self.report.add("orphan_sandbox_files_removed", sid)

    def drivers(self, *, kernel_only: bool) -> None:
        """The reconcile of each driver that has one: the KernelOnlyJoin ones, or the
        others."""
        nets = self.store.networks()
        eps = self.store.endpoints()
        for name in self.ctl.drivers():
            drv = self.driver(name)
            if not isinstance(drv, Reconcilable):
                continue
            if bool(getattr(drv, "kernel_only_joins", False)) != kernel_only:
                continue
            mine = [n for n in nets if n.driver == name]
            for n in mine:
                self.ctl._driver_for(n)  # a driver with state in memory learns every network
            ids = {n.id for n in mine}
            try:
                self.report.repairs.extend(
                    drv.reconcile(mine, [e for e in eps if e.network_id in ids])
                )
            except Exception as exc:
                self.report.errors.append(f"driver {name} reconcile: {exc}")


def reconcile(ctl: NetworkController) -> ReconcileReport:
    return _Repairer(ctl).run()
