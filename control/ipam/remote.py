"""The remote IPAM: pools and addresses from an IPAM plugin process.

Owns the IpamDriver side of spec/remote-protocol.md as a client: GetCapabilities
(a failure means "no capabilities"), GetDefaultAddressSpaces, RequestPool /
ReleasePool and RequestAddress / ReleaseAddress with their exact fields, and the checks
on each reply. Failures come back in the reply's "Error" field (not "Err"); any of
them, like a plugin that is unreachable, hangs or answers garbage, is a PluginError.

RequiresMACAddress: the controller checks `MacAddressAware` before it allocates an
endpoint's addresses and, when the plugin asked for it, sends the endpoint's MAC in
every RequestAddress's Options under `MAC_ADDRESS_OPTION`: the user's, or (the engine's
rule) a random one made before the allocation, which then becomes the endpoint's MAC and
reaches the network driver in CreateEndpoint. Pool and gateway requests carry none (a
network has no MAC).
"""

from __future__ import annotations

import ipaddress
import threading
from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

from .. import errors
from ..plugins import Plugin, Plugins
from ..types import IPAddress, IPInterface
from .api import PoolRequest, PoolResult

SUBSYSTEM = "IpamDriver"
MAC_ADDRESS_OPTION = "com.docker.network.endpoint.macaddress"


@runtime_checkable
class MacAddressAware(Protocol):
    """An IPAM that may want each endpoint's MAC address in RequestAddress's options
    (`MAC_ADDRESS_OPTION`) when `requires_mac_address` is true."""

    requires_mac_address: bool


class RemoteIpam:
    """An IPAM driver served by a plugin (spec/remote-protocol.md, IpamDriver)."""

    def __init__(self, plugin: Plugin) -> None:
        self.plugin = plugin
        self.client = plugin.client
        self.name = plugin.name
        self._spaces: tuple[str, str] | None = None
        self._lock = threading.Lock()
        self.requires_mac_address = False
        self.requires_request_replay = False
        try:
            caps = self._call("GetCapabilities")
        except errors.PluginError:
            caps = {}  # optional: a plugin without it has no capabilities
        self.requires_mac_address = caps.get("RequiresMACAddress") is True
        self.requires_request_replay = caps.get("RequiresRequestReplay") is True

    def _call(self, method: str, body: Mapping[str, Any] | None = None) -> dict[str, Any]:
        return self.client.call(f"{SUBSYSTEM}.{method}", body, error_key="Error") or {}

    def _fail(self, method: str, message: str) -> errors.PluginError:
        return errors.PluginError(self.name, f"{SUBSYSTEM}.{method}", message)

    def default_address_spaces(self) -> tuple[str, str]:
        with self._lock:
            if self._spaces is not None:
                return self._spaces
        reply = self._call("GetDefaultAddressSpaces")
        local = reply.get("LocalDefaultAddressSpace")
        global_ = reply.get("GlobalDefaultAddressSpace")
        if not isinstance(local, str) or not isinstance(global_, str) or not local:
            raise self._fail("GetDefaultAddressSpaces", f"malformed reply {reply!r}")
        with self._lock:
            self._spaces = (local, global_)
        return local, global_

    # --- pools -------------------------------------------------------------------------

    def request_pool(self, req: PoolRequest) -> PoolResult:
        reply = self._call(
            "RequestPool",
            {
                "AddressSpace": req.address_space,
                "Pool": str(req.pool) if req.pool is not None else "",
                "SubPool": str(req.sub_pool) if req.sub_pool is not None else "",
                "Options": dict(req.options),
                "V6": req.v6,
            },
        )
        pool_id, pool, data = reply.get("PoolID"), reply.get("Pool"), reply.get("Data") or {}
        try:
            if not isinstance(pool_id, str) or not pool_id:
                raise ValueError(f"PoolID {pool_id!r} is not a pool id")
            if not isinstance(pool, str):
                raise ValueError(f"Pool {pool!r} is not a CIDR")
            net = ipaddress.ip_network(pool, strict=False)
            if net.version != (6 if req.v6 else 4):
                raise ValueError(f"Pool {pool} is not IPv{6 if req.v6 else 4} (V6={req.v6})")
            if req.pool is not None and net != req.pool:
                raise ValueError(f"Pool {pool} is not the pool asked for ({req.pool})")
            if not isinstance(data, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in data.items()
            ):
                raise ValueError(f"Data must map strings to strings: {data!r}")
        except ValueError as exc:
            exc_ = self._fail("RequestPool", str(exc))
            try:
                if isinstance(pool_id, str) and pool_id:
                    self.release_pool(pool_id)
            except errors.CNMError as cleanup:
                exc_.add_note(f"rollback: ReleasePool: {cleanup}")
            raise exc_ from None
        return PoolResult(pool_id=pool_id, pool=net, data=dict(data))

    def release_pool(self, pool_id: str) -> None:
        self._call("ReleasePool", {"PoolID": pool_id})

    # --- addresses ---------------------------------------------------------------------

    def request_address(
        self,
        pool_id: str,
        address: IPAddress | None = None,
        options: Mapping[str, str] | None = None,
        *,
        owner: str = "",
    ) -> IPInterface:
        reply = self._call(
            "RequestAddress",
            {
                "PoolID": pool_id,
                "Address": str(address) if address is not None else "",
                "Options": dict(options or {}),
            },
        )
        raw = reply.get("Address")
        try:
            if not isinstance(raw, str) or not raw:
                raise ValueError("the reply has no Address")
            if "/" not in raw:
                raise ValueError(f"Address {raw!r} is not in CIDR form")
            got = ipaddress.ip_interface(raw)
            if address is not None and got.ip != address:
                raise ValueError(f"Address {raw} is not the address asked for ({address})")
        except ValueError as exc:
            failure = self._fail("RequestAddress", str(exc))
            if isinstance(raw, str) and raw:
                try:
                    self.release_address(pool_id, ipaddress.ip_interface(raw).ip)
                except (errors.CNMError, ValueError) as cleanup:
                    failure.add_note(f"rollback: ReleaseAddress: {cleanup}")
            raise failure from None
        return got

    def release_address(self, pool_id: str, address: IPAddress) -> None:
        self._call("ReleaseAddress", {"PoolID": pool_id, "Address": str(address)})


def remote_ipam(plugins: Plugins, name: str) -> RemoteIpam | None:
    """A plugin named `name` that implements IpamDriver, or None."""
    plugin = plugins.get(name, SUBSYSTEM)
    return RemoteIpam(plugin) if plugin is not None else None
