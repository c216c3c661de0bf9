"""The IPAM driver contract (libnetwork's ipamapi), as typed requests and a small Protocol.

The default IPAM implements it on the embedded store; a remote IPAM plugin implements it
over the plugin protocol (spec/remote-protocol.md, IpamDriver methods).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from ..types import IPAddress, IPInterface, IPNetwork

REQUEST_ADDRESS_TYPE = "RequestAddressType"
GATEWAY_ADDRESS_TYPE = "com.docker.network.gateway"
AUX_ADDRESS_TYPE = "com.cnm.auxiliary"
GATEWAY_DATA_KEY = "com.docker.network.gateway"


@dataclass(frozen=True)
class PoolRequest:
    address_space: str
    pool: IPNetwork | None = None  # None: any free default pool
    sub_pool: IPNetwork | None = None  # allocate only inside this range
    options: Mapping[str, str] = field(default_factory=dict)
    v6: bool = False


@dataclass(frozen=True)
class PoolResult:
    pool_id: str
    pool: IPNetwork
    data: dict[str, str] = field(default_factory=dict)


@runtime_checkable
class IpamDriver(Protocol):
    """What the controller needs from an IPAM driver."""

    def default_address_spaces(self) -> tuple[str, str]:
        """(local default address space, global default address space)."""
        ...

    def request_pool(self, req: PoolRequest) -> PoolResult: ...

    def release_pool(self, pool_id: str) -> None: ...

    def request_address(
        self,
        pool_id: str,
        address: IPAddress | None = None,
        options: Mapping[str, str] | None = None,
        *,
        owner: str = "",
    ) -> IPInterface:
        """Allocate `address` (or the next free one); returned with the pool's prefix."""
        ...

    def release_address(self, pool_id: str, address: IPAddress) -> None: ...
