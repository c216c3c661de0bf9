"""The typed error hierarchy of cnm (spec/api.md).

Every error derives from CNMError. The categories also derive from the builtin that a
Python caller would expect, so `except LookupError` catches every NotFound. Concrete
errors carry the object they are about, so callers can act on them without parsing text.
"""

from __future__ import annotations

import errno as _errno
import os


class CNMError(Exception):
    """Base of every error cnm raises on purpose."""


class NotFound(CNMError, LookupError):
    """The named object does not exist."""


class Conflict(CNMError, ValueError):
    """The request clashes with existing state (names, subnets, addresses)."""


class InvalidParameter(CNMError, ValueError):
    """The request itself is malformed; nothing was changed."""


class Unavailable(CNMError, RuntimeError):
    """A resource or peer the request needs is not available now."""


class Unsupported(CNMError, NotImplementedError):
    """The request asks for something this host or driver does not support."""


class Forbidden(CNMError, PermissionError):
    """The caller lacks the privilege the operation needs."""


# --- not found -------------------------------------------------------------------------


class NetworkNotFound(NotFound):
    def __init__(self, network: str) -> None:
        super().__init__(f"network {network!r} not found")
        self.network = network


class EndpointNotFound(NotFound):
    def __init__(self, endpoint: str, network: str | None = None) -> None:
        where = f" in network {network!r}" if network else ""
        super().__init__(f"endpoint {endpoint!r} not found{where}")
        self.endpoint = endpoint
        self.network = network


class SandboxNotFound(NotFound):
    def __init__(self, sandbox: str) -> None:
        super().__init__(f"sandbox {sandbox!r} not found")
        self.sandbox = sandbox


class DriverNotFound(NotFound):
    def __init__(self, driver: str) -> None:
        super().__init__(f"network driver {driver!r} not found")
        self.driver = driver


class AddressNotFound(NotFound):
    def __init__(self, address: str, pool: str) -> None:
        super().__init__(f"address {address} is not allocated in pool {pool}")
        self.address = address
        self.pool = pool


# --- conflicts -------------------------------------------------------------------------


class NameInUse(Conflict):
    def __init__(self, kind: str, name: str) -> None:
        super().__init__(f"{kind} name {name!r} is already in use")
        self.kind = kind
        self.name = name


class AmbiguousReference(Conflict):
    def __init__(self, kind: str, ref: str, matches: list[str]) -> None:
        super().__init__(f"{kind} reference {ref!r} is ambiguous: matches {len(matches)} objects")
        self.kind = kind
        self.ref = ref
        self.matches = matches


class ActiveEndpoints(Conflict):
    def __init__(self, network: str, endpoints: list[str]) -> None:
        shown = ", ".join(endpoints[:5]) + (", ..." if len(endpoints) > 5 else "")
        super().__init__(f"network {network!r} has active endpoints: {shown}")
        self.network = network
        self.endpoints = endpoints


class EndpointJoined(Conflict):
    def __init__(self, endpoint: str, sandbox: str) -> None:
        super().__init__(f"endpoint {endpoint!r} is joined to sandbox {sandbox!r}")
        self.endpoint = endpoint
        self.sandbox = sandbox


class EndpointNotJoined(Conflict):
    def __init__(self, endpoint: str, container: str) -> None:
        super().__init__(f"endpoint {endpoint!r} is not joined to {container!r}")
        self.endpoint = endpoint
        self.container = container


class AddressInUse(Conflict):
    def __init__(self, address: str) -> None:
        super().__init__(f"address {address} is already in use")
        self.address = address


class PoolOverlap(Conflict):
    def __init__(self, subnet: str, other: str) -> None:
        super().__init__(f"subnet {subnet} overlaps with {other}, already in use")
        self.subnet = subnet
        self.other = other


class PoolExhausted(Unavailable):
    def __init__(self, pool: str) -> None:
        super().__init__(f"no free address left in pool {pool}")
        self.pool = pool


class PortsExhausted(Unavailable):
    def __init__(self, network: str, limit: int) -> None:
        super().__init__(
            f"network {network!r} already has {limit} endpoints joined: a Linux bridge "
            f"takes at most {limit} ports"
        )
        self.network = network
        self.limit = limit


class NoFreePool(Unavailable):
    def __init__(self, family: str) -> None:
        super().__init__(f"no free {family} default address pool left")
        self.family = family


# --- kernel and peers ------------------------------------------------------------------


class KernelError(CNMError, OSError):
    """The kernel refused a request: errno plus the kernel's own message when it gave one."""

    def __init__(self, errno: int, message: str = "", *, operation: str = "") -> None:
        text = message or os.strerror(errno)
        prefix = f"{operation}: " if operation else ""
        name = _errno.errorcode.get(errno, str(errno))
        super().__init__(errno, f"{prefix}{text} ({name})")
        self.message = text
        self.operation = operation


class PluginError(Unavailable):
    def __init__(self, plugin: str, method: str, message: str) -> None:
        super().__init__(f"plugin {plugin!r} {method}: {message}")
        self.plugin = plugin
        self.method = method
        self.message = message


class DriverError(CNMError, RuntimeError):
    """A driver broke its contract (e.g. changed an endpoint field that was already set)."""

    def __init__(self, driver: str, message: str) -> None:
        super().__init__(f"driver {driver!r}: {message}")
        self.driver = driver


class StoreError(Unavailable):
    """The persistent store failed or holds data this version cannot read."""


class VNIInUse(Conflict):
    """A VXLAN network identifier is already taken by another network (on any host)."""

    def __init__(self, vni: int, network: str = "") -> None:
        owner = f" by network {network}" if network else ""
        super().__init__(f"VNI {vni} is already in use{owner}")
        self.vni = vni
        self.network = network


class GlobalStoreUnavailable(StoreError):
    """The global store (etcd) cannot be reached; global-scope changes wait for it."""


__all__ = [
    "ActiveEndpoints",
    "AddressInUse",
    "AddressNotFound",
    "AmbiguousReference",
    "CNMError",
    "Conflict",
    "DriverError",
    "DriverNotFound",
    "EndpointJoined",
    "EndpointNotFound",
    "EndpointNotJoined",
    "Forbidden",
    "GlobalStoreUnavailable",
    "InvalidParameter",
    "KernelError",
    "NameInUse",
    "NetworkNotFound",
    "NoFreePool",
    "NotFound",
    "PluginError",
    "PoolExhausted",
    "PoolOverlap",
    "PortsExhausted",
    "SandboxNotFound",
    "StoreError",
    "Unavailable",
    "Unsupported",
    "VNIInUse",
]


# --- the optional BPF data path (cnm.ebpf errors, mapped by osl.accel) ---------------------


class EbpfUnavailable(Unavailable):
    """The BPF data path was asked for (ebpf="on") but this host cannot run it; `reason`
    says why (the probe's failed checks, or the load that failed). A verifier rejection
    keeps the verifier's log in `verifier_log` (None otherwise)."""

    def __init__(self, reason: str, *, verifier_log: str | None = None) -> None:
        super().__init__(f"the eBPF data path is unavailable: {reason}")
        self.reason = reason
        self.verifier_log = verifier_log


class EbpfVerifierRejected(EbpfUnavailable):
    """The kernel's verifier refused one of cnm's BPF programs (`program`, `verifier_log`)."""

    def __init__(self, program: str, reason: str, verifier_log: str) -> None:
        super().__init__(reason, verifier_log=verifier_log)
        self.program = program


__all__ += ["EbpfUnavailable", "EbpfVerifierRejected"]


# --- interfaces a driver hands over --------------------------------------------------------


class UnsafeInterface(Conflict):
    """A driver named a host interface that must not be moved into a sandbox (`interface`,
    `reason`): the loopback, or one the host uses (an IP address, a default route)."""

    def __init__(self, interface: str, reason: str) -> None:
        super().__init__(f"refusing to move host interface {interface!r} into a sandbox: {reason}")
        self.interface = interface
        self.reason = reason


__all__ += ["UnsafeInterface"]
