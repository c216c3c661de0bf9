"""The driver registry: which network driver serves which name.

Built-in drivers register here at controller start; later kinds (bridge, overlay, remote
plugins found by name) extend it through `register` and `add_resolver`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from .. import errors
from ..driverapi import Driver
from ..osl.accel import Accelerator
from ..osl.firewall import Firewall
from ..osl.links import HostLinks
from ..types import validate_name

Resolver = Callable[[str], Driver | None]


class DriverRegistry:
    def __init__(self) -> None:
        self._drivers: dict[str, Driver] = {}
        self._resolvers: list[Resolver] = []
        self._lock = threading.Lock()

    def register(self, driver: Driver) -> None:
        if not isinstance(driver, Driver):
            raise errors.InvalidParameter(f"{driver!r} does not implement the Driver protocol")
        validate_name("driver", driver.name)
        with self._lock:
            if driver.name in self._drivers:
                raise errors.NameInUse("driver", driver.name)
            self._drivers[driver.name] = driver

    def add_resolver(self, resolver: Resolver) -> None:
        """A fallback that finds drivers on demand (e.g. remote plugins by name)."""
        with self._lock:
            self._resolvers.append(resolver)

    def get(self, name: str) -> Driver:
        with self._lock:
            driver = self._drivers.get(name)
            resolvers = list(self._resolvers)
        if driver is not None:
            return driver
        for resolve in resolvers:
            found = resolve(name)
            if found is not None:
                with self._lock:
                    return self._drivers.setdefault(name, found)
        raise errors.DriverNotFound(name)

    def registered(self, name: str) -> Driver | None:
        """The driver registered as `name`, or None: no resolver is asked (so never a
        plugin handshake), for callers inside a store transaction. A registered name
        never changes driver, so a plain dict read (atomic) needs no lock."""
        return self._drivers.get(name)

    def names(self) -> list[str]:
        with self._lock:
            return list(self._drivers)


def builtin_registry(
    links: HostLinks, firewall: Firewall, accel: Accelerator | None = None
) -> DriverRegistry:
    """The drivers built in: null and bridge (which works through osl's links/firewall
    and, when given, the BPF data path of osl.accel)."""
    from .bridge import BridgeDriver
    from .null import NullDriver

    registry = DriverRegistry()
    registry.register(NullDriver())
    registry.register(BridgeDriver(links, firewall, accel))
    # "overlay" is registered by the global scope (a controller with store="etcd://...").
    registry.add_resolver(_overlay_needs_global_store)
    return registry


def _overlay_needs_global_store(name: str) -> Driver | None:
    if name == "overlay":
        raise errors.Unsupported(
            "overlay networks need a global store: NetworkController(store='etcd://HOST:PORT/PREFIX')"
        )
    return None
