"""Reconcile: bring the store and the kernel back into step after a crash or a failure.

Owns the repair rules. Intents left in the store ("creating", "deleting", "joining",
"leaving") are finished or undone; sandboxes whose namespace vanished are recreated;
namespaces, IPAM pools and addresses that nothing owns are freed; then each driver that
implements `Reconcilable` checks its own kernel objects. Every repair is listed in the
report; a repair that fails is reported and the rest go on.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any

from . import errors
from .driverapi import ExternalConnectivity, Reconcilable, SandboxInfo
from .ipam.default import DefaultIpam
from .types import EndpointRecord, NetworkRecord, Repair

if TYPE_CHECKING:
    from .controller import NetworkController


@dataclass
class ReconcileReport:
    repairs: list[Repair] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

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
        return {"repairs": [asdict(r) for r in self.repairs], "errors": list(self.errors)}


def _attempt(report: ReconcileReport, what: str, fn: Callable[[], object]) -> bool:
    try:
        fn()
    except errors.NotFound:
        return True  # already gone: that is what we wanted
    except Exception as exc:
        report.errors.append(f"{what}: {exc}")
        return False
    return True


def reconcile(ctl: NetworkController) -> ReconcileReport:
    report = ReconcileReport()
    store = ctl.store
    _endpoints(ctl, report)
    _sandboxes(ctl, report)
    _networks(ctl, report)
    ipam = ctl.ipam_driver("default")
    if isinstance(ipam, DefaultIpam):
        _ipam_orphans(ctl, ipam, report)
    owned = {sb.key for sb in store.sandboxes()}
    for key in ctl.namespaces.mounted():
        if key not in owned and _attempt(
            report, f"delete namespace {key}", lambda k=key: ctl.namespaces.delete(k)
        ):
            report.add("orphan_namespace_removed", key)
    nets = store.networks()
    eps = store.endpoints()
    for name in ctl.drivers():
        drv = ctl.registry.get(name)
        if isinstance(drv, Reconcilable):
            mine = [n for n in nets if n.driver == name]
            ids = {n.id for n in mine}
            try:
                report.repairs.extend(drv.reconcile(mine, [e for e in eps if e.network_id in ids]))
            except Exception as exc:
                report.errors.append(f"driver {name} reconcile: {exc}")
    return report


def _endpoints(ctl: NetworkController, report: ReconcileReport) -> None:
    store = ctl.store
    nets: dict[str, NetworkRecord | None] = {}
    for ep in store.endpoints():
        net = nets.setdefault(ep.network_id, store.network_by_id(ep.network_id))
        if net is None:
            store.delete_endpoints([ep.id])
            report.add("endpoint_without_network_removed", ep.id)
            continue
        drv = ctl.registry.get(net.driver)
        if ep.join_state in ("joining", "leaving") or (
            ep.join_state == "joined" and store.sandbox_by_id(ep.sandbox_id or "") is None
        ):

            def leave(ep: EndpointRecord = ep, drv: Any = drv) -> None:
                if isinstance(drv, ExternalConnectivity):
                    drv.revoke_external_connectivity(ep.network_id, ep.id)
                drv.leave(ep.network_id, ep.id)

            if _attempt(report, f"leave {ep.id}", leave):
                kind = {"joining": "join_rolled_back", "leaving": "leave_completed"}.get(
                    ep.join_state, "dangling_join_cleared"
                )
                ep = replace(ep, sandbox_id=None, join_state="")
                store.put_endpoint(ep)
                report.add(kind, ep.id, f"endpoint {ep.name} of network {net.name}")
        if (
            ep.state in ("creating", "deleting")
            and not ep.join_state
            and _attempt(
                report,
                f"delete endpoint {ep.id}",
                lambda ep=ep, drv=drv: drv.delete_endpoint(ep.network_id, ep.id),
            )
        ):
            with store.tx():
                ctl._release_endpoint_addresses(net, [ep])
                store.delete_endpoints([ep.id])
            kind = (
                "endpoint_create_rolled_back"
                if ep.state == "creating"
                else "endpoint_delete_completed"
            )
            report.add(kind, ep.id, f"endpoint {ep.name} of network {net.name}")


def _sandboxes(ctl: NetworkController, report: ReconcileReport) -> None:
    store = ctl.store
    for sb in store.sandboxes():
        eps = store.endpoints(sandbox_id=sb.id)
        if not eps and (sb.state != "ready" or not sb.explicit):
            if _attempt(
                report, f"delete namespace {sb.key}", lambda sb=sb: ctl.namespaces.delete(sb.key)
            ):
                store.delete_sandboxes([sb.id])
                kind = {
                    "creating": "sandbox_create_rolled_back",
                    "deleting": "sandbox_delete_completed",
                }.get(sb.state, "empty_sandbox_removed")
                report.add(kind, sb.id, f"container {sb.container_id}")
            continue
        if sb.state != "ready":
            store.put_sandbox(replace(sb, state="ready"))
        if ctl.namespaces.exists(sb.key):
            continue
        with contextlib.suppress(FileNotFoundError):
            os.unlink(sb.key)  # a stale file where the namespace was mounted

        def rejoin(sb: Any = sb, eps: list[EndpointRecord] = eps) -> None:
            ctl.namespaces.create(sb.id)
            for ep in eps:
                net = store.network_by_id(ep.network_id)
                assert net is not None
                drv = ctl.registry.get(net.driver)
                with contextlib.suppress(Exception):
                    drv.leave(net.id, ep.id)
                drv.join(net.id, ep.id, SandboxInfo(sb.id, sb.key, sb.container_id))

        if _attempt(report, f"recreate namespace {sb.key}", rejoin):
            report.add(
                "sandbox_namespace_recreated",
                sb.key,
                f"container {sb.container_id}, {len(eps)} endpoint(s) rejoined",
            )


def _networks(ctl: NetworkController, report: ReconcileReport) -> None:
    store = ctl.store
    for net in store.networks():
        if net.state == "ready":
            continue
        if store.count_endpoints(net.id):
            store.set_network_state(net.id, "ready")
            report.add("network_delete_cancelled", net.id, f"network {net.name} has endpoints")
            continue
        drv = ctl.registry.get(net.driver)
        if _attempt(
            report, f"delete network {net.name}", lambda n=net, drv=drv: drv.delete_network(n.id)
        ):
            with store.tx():
                for pool in (*net.ipv4, *net.ipv6):
                    if net.ipam_driver != "null":
                        with contextlib.suppress(errors.NotFound):
                            ctl.ipam_driver(net.ipam_driver).release_pool(pool.pool_id)
                store.delete_network(net.id)
            kind = (
                "network_create_rolled_back"
                if net.state == "creating"
                else "network_delete_completed"
            )
            report.add(kind, net.id, f"network {net.name}")


def _ipam_orphans(ctl: NetworkController, ipam: DefaultIpam, report: ReconcileReport) -> None:
    store = ctl.store
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
