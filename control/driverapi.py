"""The network driver contract (libnetwork's driverapi), kept small and typed.

Owns: Capability (data and connectivity scope), the core `Driver` Protocol (create and
delete network, create and delete endpoint, join, leave), the opt-in protocols a driver
may also implement (operational info, external connectivity, discovery, table events,
bulk and host joins, port limits, the gateway allocation check), the typed values
passed across the contract, and `DriverOptions`, the base of every driver's options
dataclass that validates the user's `options` mapping.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Protocol, Self, runtime_checkable

from . import errors
from .types import EndpointRecord, IPAddress, IPInterface, NetworkRecord, PoolData, Repair

Scope = Literal["local", "global", "swarm"]

# Generic options libnetwork passes to every driver; drivers may read them, never reject them.
GENERIC_OPTIONS: frozenset[str] = frozenset(
    {
        "com.docker.network.driver.mtu",
        "com.docker.network.enable_ipv6",
        "com.docker.network.internal",
    }
)


@dataclass(frozen=True)
class Capability:
    """Where a driver's state lives (data scope) and how far its networks reach."""

    data_scope: Scope = "local"
    connectivity_scope: Scope = "local"

    def __post_init__(self) -> None:
        for name in ("data_scope", "connectivity_scope"):
            if getattr(self, name) not in ("local", "global", "swarm"):
                raise errors.InvalidParameter(f"invalid {name} {getattr(self, name)!r}")


# --- values across the contract ------------------------------------------------------


@dataclass(frozen=True)
class NetworkInfo:
    """What a driver learns about a network at create_network."""

    id: str
    name: str
    options: DriverOptions
    ipv4: tuple[PoolData, ...]
    ipv6: tuple[PoolData, ...]
    enable_ipv6: bool = False
    internal: bool = False
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class InterfaceInfo:
    """An endpoint's interface: addresses and MAC as allocated by the controller.

    A driver's create_endpoint may return one to fill fields left unset (usually the MAC);
    changing a field that was already set is refused.
    """

    ipv4_address: IPInterface | None = None
    ipv6_address: IPInterface | None = None
    mac_address: str | None = None


@dataclass(frozen=True)
class EndpointInfo:
    id: str
    name: str
    network_id: str
    interface: InterfaceInfo
    options: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class StaticRoute:
    destination: str  # CIDR
    route_type: Literal[0, 1] = 0  # 0 = via next_hop, 1 = connected
    next_hop: IPAddress | None = None


@dataclass(frozen=True)
class SandboxInfo:
    """The sandbox a join targets: its id and key (the netns path).

    `ifname` is the name the sandbox layer will give the joining interface if the driver
    asks for the "eth" prefix (the lowest free index). A driver that creates the
    interface inside the sandbox may create it under that name directly and return it
    as `src_name`, which saves a rename; any other name is renamed as usual.

    `interface` is the joining endpoint's interface as the controller allocated it
    (addresses, MAC), for drivers that program the host with it at join (the bridge
    driver's BPF redirect and routed datapath); None when the caller does not know it.
    """

    id: str
    key: str
    container_id: str
    ifname: str | None = None
    interface: InterfaceInfo | None = None


@dataclass(frozen=True)
class JoinInfo:
    """What a driver hands back from join for the sandbox layer to apply.

    `src_name` is an interface the driver made on the host (or already in the sandbox),
    to be moved in (unless `in_sandbox`: made there directly, the fast path) and renamed
    `dst_prefix` + lowest free index. None: no interface.
    """

    src_name: str | None = None
    in_sandbox: bool = False  # the driver made src_name inside the sandbox already
    dst_prefix: str = "eth"
    gateway: IPAddress | None = None
    gateway_ipv6: IPAddress | None = None
    static_routes: tuple[StaticRoute, ...] = ()
    disable_gateway_service: bool = False


# --- driver options ------------------------------------------------------------------


def option(key: str, default: Any = None, *, doc: str = "") -> Any:
    """Declare a dataclass field bound to the option key `key`."""
    return field(default=default, metadata={"key": key, "doc": doc})


def _base_type(kind: Any) -> Any:
    """`int | None` / `Optional[int]` -> int; anything else unchanged."""
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    return args[0] if len(args) == 1 else kind


def _convert(key: str, raw: str, kind: Any) -> Any:
    kind = _base_type(kind)
    if kind is bool:
        low = raw.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise errors.InvalidParameter(f"option {key!r}: {raw!r} is not a boolean")
    if kind is int:
        try:
            return int(raw, 10)
        except ValueError:
            raise errors.InvalidParameter(f"option {key!r}: {raw!r} is not an integer") from None
    return raw


@dataclass(frozen=True)
class DriverOptions:
    """Base of a driver's typed options. Subclasses declare fields with `option(key, ...)`.

    `parse` accepts exactly the declared keys plus GENERIC_OPTIONS; an unknown key or a
    malformed value raises InvalidParameter naming the key. Field-specific checks go in
    a subclass's `check()`.
    """

    accepts_generic: ClassVar[frozenset[str]] = GENERIC_OPTIONS

    @classmethod
    def keys(cls) -> dict[str, dataclasses.Field[Any]]:
        return {f.metadata["key"]: f for f in dataclasses.fields(cls) if "key" in f.metadata}

    @classmethod
    def parse(cls, options: Mapping[str, str] | None, *, driver: str = "") -> Self:
        known = cls.keys()
        hints = typing.get_type_hints(cls)
        values: dict[str, Any] = {}
        for key, raw in (options or {}).items():
            if not isinstance(key, str) or not isinstance(raw, str):
                raise errors.InvalidParameter(f"option {key!r}: keys and values must be strings")
            f = known.get(key)
            if f is None:
                if key in cls.accepts_generic:
                    continue
                who = f" for driver {driver!r}" if driver else ""
                raise errors.InvalidParameter(f"unknown option {key!r}{who}")
            values[f.name] = _convert(key, raw, hints[f.name])
        parsed = cls(**values)
        parsed.check()
        return parsed

    def check(self) -> None:
        """Cross-field validation; raise InvalidParameter naming the key."""


# --- the contract --------------------------------------------------------------------


@runtime_checkable
class Driver(Protocol):
    """The core contract every network driver implements."""

    name: str
    capability: Capability
    options_type: type[DriverOptions]

    def create_network(self, network: NetworkInfo) -> None: ...

    def delete_network(self, network_id: str) -> None:
        """Remove the network's kernel objects; deleting an unknown network is not an error."""
        ...

    def create_endpoint(self, endpoint: EndpointInfo) -> InterfaceInfo | None: ...

    def delete_endpoint(self, network_id: str, endpoint_id: str) -> None:
        """Idempotent, like delete_network."""
        ...

    def join(self, network_id: str, endpoint_id: str, sandbox: SandboxInfo) -> JoinInfo: ...

    def leave(self, network_id: str, endpoint_id: str) -> None: ...


@runtime_checkable
class EndpointOperInfo(Protocol):
    def endpoint_oper_info(self, network_id: str, endpoint_id: str) -> dict[str, Any]: ...


@runtime_checkable
class ExternalConnectivity(Protocol):
    def program_external_connectivity(
        self, network_id: str, endpoint_id: str, options: Mapping[str, Any]
    ) -> None: ...

    def revoke_external_connectivity(self, network_id: str, endpoint_id: str) -> None: ...


@runtime_checkable
class DiscoveryAware(Protocol):
    def discover_new(self, discovery_type: int, data: Mapping[str, Any]) -> None: ...

    def discover_delete(self, discovery_type: int, data: Mapping[str, Any]) -> None: ...


@runtime_checkable
class TableEventAware(Protocol):
    def event_notify(
        self, event: str, network_id: str, table: str, key: str, value: bytes
    ) -> None: ...


@runtime_checkable
class Reconcilable(Protocol):
    """A driver that can compare its kernel objects with the store and repair them."""

    def reconcile(
        self, networks: list[NetworkRecord], endpoints: list[EndpointRecord]
    ) -> list[Repair]: ...


@runtime_checkable
class Restorable(Protocol):
    """A driver that keeps per-network state in memory and must be told, after a
    restart or in another process, about networks created earlier."""

    def restore_network(self, network: NetworkInfo) -> None: ...


@runtime_checkable
class BulkJoin(Protocol):
    """A driver that joins and leaves many endpoints in one kernel batch."""

    def join_many(self, items: Sequence[tuple[str, str, SandboxInfo]]) -> list[Any]:
        """Per item a JoinInfo or the CNMError it met."""
        ...

    def leave_many(self, items: Sequence[tuple[str, str]]) -> None: ...


@runtime_checkable
class KernelOnlyJoin(Protocol):
    """A driver whose join leaves nothing but objects on this host that its reconcile()
    finds and removes whenever the store does not record the endpoint joined (no plugin,
    no state elsewhere). The controller then records such a join in the transaction that
    planned it, committed after the kernel work, with no write-ahead intent: a crash
    before the commit leaves strays for reconcile, never a record without its devices."""

    kernel_only_joins: bool


@runtime_checkable
class HostJoin(Protocol):
    """A driver that can join for an engine owning the sandbox itself (Docker through
    the plugin protocol): the interface is left on the host, named `src_name`, for the
    engine to move into its sandbox; `leave` undoes it as usual."""

    def join_on_host(
        self, network_id: str, endpoint_id: str, interface: InterfaceInfo | None = None
    ) -> JoinInfo:
        """`interface`: the endpoint's addresses and MAC as the controller allocated them
        (as `SandboxInfo.interface` for a normal join), None when unknown."""
        ...


@runtime_checkable
class PortLimit(Protocol):
    """A driver whose networks take a limited number of joins (a Linux bridge's 1024
    ports), per network: the controller refuses a join past it before the kernel does."""

    def port_limit(self, network_id: str) -> int | None:
        """The most joins `network_id` takes; None: no limit. Called inside the store's
        write transaction: must answer from memory (no plugin call, no kernel request)."""
        ...


@runtime_checkable
class FixedPortLimit(Protocol):
    """A driver whose every network takes at most `max_ports` joins (see PortLimit,
    which takes precedence when a driver implements both)."""

    max_ports: int


@runtime_checkable
class GatewayAllocationCheck(Protocol):
    """A driver that may ask for a new network's gateway addresses to be left
    unallocated (the remote driver's GwAllocCheck, spec/remote-protocol.md)."""

    def skip_gateway_allocation(
        self, options: DriverOptions, *, enable_ipv6: bool, internal: bool
    ) -> tuple[bool, bool]:
        """(skip the IPv4 gateway, skip the IPv6 gateway), asked before any address of
        the network is requested, outside any store transaction."""
        ...


class JoinsInBulk:
    """Mixin for a BulkJoin driver: one join or leave is a batch of one."""

    def join(self, network_id: str, endpoint_id: str, sandbox: SandboxInfo) -> JoinInfo:
        result = self.join_many([(network_id, endpoint_id, sandbox)])[0]  # type: ignore[attr-defined]
        if isinstance(result, BaseException):
            raise result
        return result  # type: ignore[no-any-return]

    def leave(self, network_id: str, endpoint_id: str) -> None:
        self.leave_many([(network_id, endpoint_id)])  # type: ignore[attr-defined]


_implements: dict[tuple[type, type], bool] = {}


def implements(driver: object, protocol: type) -> bool:
    """isinstance(driver, protocol) for the opt-in protocols above, remembered per driver
    class (a runtime_checkable isinstance walks every member on each call: on the join
    path that is measurable)."""
    key = (type(driver), protocol)
    found = _implements.get(key)
    if found is None:
        found = _implements[key] = isinstance(driver, protocol)
    return found
