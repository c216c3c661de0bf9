"""The Network handle: a group of endpoints that can talk to each other directly.

A thin, typed view over the stored record; every change goes through the controller,
which owns the lifecycle rules.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from .handle import Handle
from .types import NetworkRecord, as_list

if TYPE_CHECKING:
    from .endpoint import Endpoint


class Network(Handle[NetworkRecord]):
    def __repr__(self) -> str:
        return f"<Network {self.name} {self.id[:12]} driver={self.driver}>"

    @property
    def name(self) -> str:
        return self._rec.name

    @property
    def driver(self) -> str:
        return self._rec.driver

    @property
    def scope(self) -> str:
        return self._rec.scope

    @property
    def internal(self) -> bool:
        return self._rec.internal

    @property
    def enable_ipv6(self) -> bool:
        return self._rec.enable_ipv6

    @property
    def options(self) -> dict[str, str]:
        return dict(self._rec.options)

    @property
    def labels(self) -> dict[str, str]:
        return dict(self._rec.labels)

    @property
    def subnets(self) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        return [ipaddress.ip_network(p.subnet) for p in (*self._rec.ipv4, *self._rec.ipv6)]

    @property
    def gateways(self) -> list[ipaddress.IPv4Interface | ipaddress.IPv6Interface]:
        return [
            ipaddress.ip_interface(p.gateway)
            for p in (*self._rec.ipv4, *self._rec.ipv6)
            if p.gateway
        ]

    def create_endpoint(
        self,
        name: str,
        ipv4_address: str | None = None,
        ipv6_address: str | None = None,
        mac_address: str | None = None,
        options: Mapping[str, str] | None = None,
    ) -> Endpoint:
        return self._ctl._create_endpoints(
            self, [(name, ipv4_address, ipv6_address, mac_address, options)]
        )[0]

    def create_endpoints(self, names: Iterable[str]) -> list[Endpoint]:
        """Create many endpoints in one store transaction; all of them, or none."""
        specs = [(n, None, None, None, None) for n in as_list(names, "endpoint names")]
        return self._ctl._create_endpoints(self, specs)

    def endpoint(self, ref: str) -> Endpoint:
        return self._ctl._endpoint(self, ref)

    def endpoints(self) -> list[Endpoint]:
        return self._ctl._endpoints(self)

    def delete(self) -> None:
        """Delete the network; refused (ActiveEndpoints) while it has endpoints."""
        self._ctl._delete_network(self)

    def to_dict(self) -> dict[str, Any]:
        r = self._rec

        def pools(ps: Iterable[Any]) -> list[dict[str, Any]]:
            return [
                {
                    "pool_id": p.pool_id,
                    "subnet": p.subnet,
                    "gateway": p.gateway,
                    "ip_range": p.ip_range,
                    "aux_addresses": p.aux_addresses,
                }
                for p in ps
            ]

        return {
            "id": r.id,
            "name": r.name,
            "driver": r.driver,
            "scope": r.scope,
            "ipam_driver": r.ipam_driver,
            "enable_ipv6": r.enable_ipv6,
            "internal": r.internal,
            "options": r.options,
            "labels": r.labels,
            "ipam_options": r.ipam_options,
            "ipv4": pools(r.ipv4),
            "ipv6": pools(r.ipv6),
            "state": r.state,
            "created": r.created,
        }
