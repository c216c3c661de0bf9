"""The null driver: networks and endpoints with no data plane.

A container joined through it gets a real sandbox (its own network namespace with only
loopback, made by the controller) and nothing else: no interface, no route.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..driverapi import (
    Capability,
    DriverOptions,
    EndpointInfo,
    InterfaceInfo,
    JoinInfo,
    NetworkInfo,
    SandboxInfo,
)


@dataclass(frozen=True)
class NullOptions(DriverOptions):
    """The null driver takes no options of its own."""


class NullDriver:
    name = "null"
    capability = Capability(data_scope="local", connectivity_scope="local")
    options_type = NullOptions
    kernel_only_joins = True  # a join makes nothing at all (driverapi.KernelOnlyJoin)

    def create_network(self, network: NetworkInfo) -> None:
        return None

    def delete_network(self, network_id: str) -> None:
        return None

    def create_endpoint(self, endpoint: EndpointInfo) -> InterfaceInfo | None:
        return None

    def delete_endpoint(self, network_id: str, endpoint_id: str) -> None:
        return None

    def join(self, network_id: str, endpoint_id: str, sandbox: SandboxInfo) -> JoinInfo:
        return JoinInfo(src_name=None)

    def leave(self, network_id: str, endpoint_id: str) -> None:
        return None
