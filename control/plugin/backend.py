"""What each plugin method does, on an in-process NetworkController with its own store.

Owns the mapping between the engine's objects and cnm's, and all the plugin's state:
- a network the engine creates is a cnm network named by the engine's NetworkID, an
  endpoint a cnm endpoint named by its EndpointID (both are valid cnm names), so the
  mapping is durable in the store and survives a restart of the plugin;
- the engine allocates every address itself (through whichever IPAM plugin it chose),
  so those networks use `EngineIpam`, which takes the pools and addresses it is given
  and allocates nothing;
- the IpamDriver side is cnm's default IPAM on the same store, with the reference
  counting of spec/remote-protocol.md kept in the store's meta table;
- a join makes the veth pair with its container end left in the host namespace
  (`NetworkController.join_external`, the driver's `join_on_host`) for the engine to move
  into its own sandbox: recorded as a join with no sandbox of cnm's, so the port limit
  counts it and reconcile keeps its devices; the host end is named after the endpoint
  and a leave finds it by name, before or after a restart.

Every method validates its whole request before changing anything.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Mapping
from typing import Any

from .. import errors
from ..controller import NetworkController
from ..endpoint import Endpoint
from ..ipam.api import (
    GATEWAY_ADDRESS_TYPE,
    REQUEST_ADDRESS_TYPE,
    IpamDriver,
    PoolRequest,
    PoolResult,
)
from ..network import Network
from ..types import IPAddress, IPAMConfig, IPInterface, IPNetwork, generate_mac
from . import protocol as p

ENGINE_IPAM = "engine"  # the controller-side IPAM of networks whose addresses the engine owns
NETWORK_DRIVER = "bridge"
POOL_REFS_KEY = "plugin.ipam_pools"  # meta key: {pool_id: {"request": [...], "refs": n}}


class EngineIpam:
    """An IPAM driver that allocates nothing: the pools and addresses were assigned by
    the engine, and a network served to it takes exactly those. Stateless: a pool id
    carries its subnet (`engine/<subnet>`)."""

    name = ENGINE_IPAM

    def default_address_spaces(self) -> tuple[str, str]:
        return ENGINE_IPAM, ENGINE_IPAM

    def request_pool(self, req: PoolRequest) -> PoolResult:
        if req.pool is None:
            raise errors.InvalidParameter(
                f"the engine gave no IPv{6 if req.v6 else 4} pool for this network"
            )
        pool_id = f"{ENGINE_IPAM}/{req.pool}"
        if req.sub_pool is not None:
            pool_id += f"/{req.sub_pool}"
        return PoolResult(pool_id=pool_id, pool=req.pool)

    @staticmethod
    def _pool(pool_id: str) -> IPNetwork:
        parts = pool_id.split("/")
        if len(parts) < 3 or parts[0] != ENGINE_IPAM:
            raise errors.NotFound(f"IPAM pool {pool_id!r} not found")
        return ipaddress.ip_network(f"{parts[1]}/{parts[2]}")

    def release_pool(self, pool_id: str) -> None:
        self._pool(pool_id)

    def request_address(
        self,
        pool_id: str,
        address: IPAddress | None = None,
        options: Mapping[str, str] | None = None,
        *,
        owner: str = "",
    ) -> IPInterface:
        net = self._pool(pool_id)
        if address is None:
            kind = (options or {}).get(REQUEST_ADDRESS_TYPE)
            what = "gateway" if kind == GATEWAY_ADDRESS_TYPE else "address"
            raise errors.InvalidParameter(f"the engine gave no {what} in pool {net}")
        if address.version != net.version or address not in net:
            raise errors.InvalidParameter(f"address {address} is outside pool {net}")
        return ipaddress.ip_interface((address, net.prefixlen))  # type: ignore[return-value]

    def release_address(self, pool_id: str, address: IPAddress) -> None:
        self._pool(pool_id)


class PluginController(NetworkController):
    """The controller of a plugin process: cnm's controller with the EngineIpam."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._engine_ipam = EngineIpam()

    def ipam_driver(self, name: str) -> IpamDriver:
        if name == ENGINE_IPAM:
            return self._engine_ipam
        return super().ipam_driver(name)


def _ipam_configs(pools: tuple[p.IPAMData, ...]) -> list[IPAMConfig]:
    return [
        IPAMConfig(
            subnet=str(d.pool),
            gateway=str(d.gateway.ip) if d.gateway else None,
            aux_addresses={k: str(v.ip) for k, v in d.aux_addresses.items()},
        )
        for d in pools
        if not d.unassigned
    ]


class PluginBackend:
    """The plugin's methods as plain calls: a parsed request in, a reply body out.

    Synchronous and not re-entrant: the server runs them one at a time, off its loop.
    """

    def __init__(self, controller: PluginController) -> None:
        self.ctl = controller
        self.ipam = controller.ipam_driver("default")

    # --- handshake -------------------------------------------------------------------

    def activate(self) -> dict[str, Any]:
        return {"Implements": ["NetworkDriver", "IpamDriver"]}

    def network_capabilities(self) -> dict[str, Any]:
        cap = self.ctl.registry.get(NETWORK_DRIVER).capability
        return {
            "Scope": cap.data_scope,
            "ConnectivityScope": cap.connectivity_scope,
            "GwAllocChecker": False,
        }

    # --- look-ups --------------------------------------------------------------------

    def _network(self, network_id: str) -> Network | None:
        rec = self.ctl.store.network_by_name(network_id)
        return Network(self.ctl, rec) if rec is not None else None

    def _endpoint(self, ref: p.EndpointRef) -> tuple[Network, Endpoint]:
        net = self._network(ref.network_id)
        if net is None:
            raise errors.NetworkNotFound(ref.network_id)
        rec = self.ctl.store.endpoint_by_name(net.id, ref.endpoint_id)
        if rec is None:
            raise errors.EndpointNotFound(ref.endpoint_id, ref.network_id)
        return net, Endpoint(self.ctl, rec)

    # --- NetworkDriver ---------------------------------------------------------------

    def create_network(self, req: p.CreateNetwork) -> dict[str, Any]:
        ipv4, ipv6 = _ipam_configs(req.ipv4), _ipam_configs(req.ipv6)
        self.ctl.create_network(
            req.network_id,
            driver=NETWORK_DRIVER,
            ipv4=ipv4,
            ipv6=ipv6,
            enable_ipv6=req.enable_ipv6,
            internal=req.internal,
            options=req.generic,
            ipam_driver=ENGINE_IPAM if ipv4 or ipv6 else "null",
        )
        return {}

    def delete_network(self, req: p.NetworkRef) -> dict[str, Any]:
        net = self._network(req.network_id)
        if net is not None:  # deleting an unknown network is not an error (Driver contract)
            net.delete()
        return {}

    def create_endpoint(self, req: p.CreateEndpoint) -> dict[str, Any]:
        if req.publishes_ports:
            raise errors.Unsupported("publishing ports is not supported by cnm's bridge driver")
        net = self._network(req.network_id)
        if net is None:
            raise errors.NetworkNotFound(req.network_id)
        mac = req.mac_address
        if mac is None:
            ip = req.address.ip if req.address is not None else None
            mac = generate_mac(ip)  # type: ignore[arg-type]
        net.create_endpoint(
            req.endpoint_id,
            ipv4_address=str(req.address) if req.address else None,
            ipv6_address=str(req.address_ipv6) if req.address_ipv6 else None,
            mac_address=mac,
        )
        if req.mac_address is not None:
            return {}
        # Only the field the request left empty may be filled in.
        return {"Interface": {"Address": "", "AddressIPv6": "", "MacAddress": mac}}

    def delete_endpoint(self, req: p.EndpointRef) -> dict[str, Any]:
        try:
            _, ep = self._endpoint(req)
        except errors.NotFound:
            return {}
        ep.delete()
        return {}

    def endpoint_oper_info(self, req: p.EndpointRef) -> dict[str, Any]:
        _, ep = self._endpoint(req)
        value: dict[str, Any] = {p.MAC_ADDRESS: ep.mac_address}
        if ep.ipv4_address is not None:
            value["com.cnm.ipv4_address"] = str(ep.ipv4_address)
        if ep.ipv6_address is not None:
            value["com.cnm.ipv6_address"] = str(ep.ipv6_address)
        return {"Value": value}

    def join(self, req: p.Join) -> dict[str, Any]:
        _, ep = self._endpoint(p.EndpointRef(req.network_id, req.endpoint_id))
        info = self.ctl.join_external(ep)
        return {
            "InterfaceName": {"SrcName": info.src_name or "", "DstPrefix": info.dst_prefix},
            "Gateway": str(info.gateway) if info.gateway else "",
            "GatewayIPv6": str(info.gateway_ipv6) if info.gateway_ipv6 else "",
            "StaticRoutes": [
                {
                    "Destination": r.destination,
                    "RouteType": r.route_type,
                    "NextHop": str(r.next_hop) if r.next_hop else "",
                }
                for r in info.static_routes
            ],
            "DisableGatewayService": info.disable_gateway_service,
        }

    def leave(self, req: p.EndpointRef) -> dict[str, Any]:
        _, ep = self._endpoint(req)
        self.ctl.leave_external(ep)
        return {}

    def external_connectivity(self, req: p.EndpointRef) -> dict[str, Any]:
        """Program / Revoke: nothing to do without published ports (refused at create)."""
        self._endpoint(req)
        return {}

    def gw_alloc_check(self) -> dict[str, Any]:
        return {"SkipIPv4": False, "SkipIPv6": False}

    def discover(self, req: p.Discovery) -> dict[str, Any]:
        return {}  # a local-scope driver has no use for node discovery

    def global_scope_only(self) -> dict[str, Any]:
        """AllocateNetwork / FreeNetwork: sent only to global-scope drivers."""
        raise errors.Unsupported("cnm's bridge is a local-scope driver: nothing to allocate")

    # --- IpamDriver ------------------------------------------------------------------

    def ipam_capabilities(self) -> dict[str, Any]:
        return {"RequiresMACAddress": False, "RequiresRequestReplay": False}

    def default_address_spaces(self) -> dict[str, Any]:
        local, global_ = self.ipam.default_address_spaces()
        return {"LocalDefaultAddressSpace": local, "GlobalDefaultAddressSpace": global_}

    def _pool_refs(self) -> dict[str, dict[str, Any]]:
        raw = self.ctl.store.meta(POOL_REFS_KEY)
        return json.loads(raw) if raw else {}

    def _set_pool_refs(self, refs: dict[str, dict[str, Any]]) -> None:
        self.ctl.store.set_meta(POOL_REFS_KEY, json.dumps(refs, sort_keys=True))

    def request_pool(self, req: p.RequestPool) -> dict[str, Any]:
        # An explicit pool asked for again is the same pool, reference-counted
        # (libnetwork's rule); a request for any default pool always gets a new one.
        key = [
            req.address_space,
            str(req.pool) if req.pool else "",
            str(req.sub_pool) if req.sub_pool else "",
            req.v6,
        ]
        with self.ctl.store.tx():
            refs = self._pool_refs()
            if req.pool is not None:
                for pool_id, entry in refs.items():
                    if entry["request"] == key:
                        entry["refs"] += 1
                        self._set_pool_refs(refs)
                        return {"PoolID": pool_id, "Pool": entry["pool"], "Data": {}}
            res = self.ipam.request_pool(
                PoolRequest(
                    address_space=req.address_space,
                    pool=req.pool,
                    sub_pool=req.sub_pool,
                    options=req.options,
                    v6=req.v6,
                )
            )
            refs[res.pool_id] = {"request": key, "pool": str(res.pool), "refs": 1}
            self._set_pool_refs(refs)
        return {"PoolID": res.pool_id, "Pool": str(res.pool), "Data": dict(res.data)}

    def _known_pool(self, pool_id: str) -> dict[str, dict[str, Any]]:
        refs = self._pool_refs()
        if pool_id not in refs:
            raise errors.NotFound(f"IPAM pool {pool_id!r} not found")
        return refs

    def release_pool(self, pool_id: str) -> dict[str, Any]:
        with self.ctl.store.tx():
            refs = self._known_pool(pool_id)
            refs[pool_id]["refs"] -= 1
            if refs[pool_id]["refs"] <= 0:
                del refs[pool_id]
                self.ipam.release_pool(pool_id)
            self._set_pool_refs(refs)
        return {}

    def request_address(self, req: p.RequestAddress) -> dict[str, Any]:
        with self.ctl.store.tx():
            self._known_pool(req.pool_id)
            addr = self.ipam.request_address(req.pool_id, req.address, req.options, owner="engine")
        return {"Address": str(addr), "Data": {}}

    def release_address(self, req: p.ReleaseAddress) -> dict[str, Any]:
        with self.ctl.store.tx():
            self._known_pool(req.pool_id)
            self.ipam.release_address(req.pool_id, req.address)
        return {}
