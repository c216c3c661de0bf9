"""Activated plugins by name: discovery, the handshake, and a cache of both.

Owns `Plugins`, which the controller keeps one of: `get(name, subsystem)` finds the
plugin in the plugin directories, activates it once (`Plugin.Activate`) and returns it
when it implements `subsystem` ("NetworkDriver", "IpamDriver"). A name found nowhere is
looked for again on the next request (the plugin may start later); an activated plugin
is kept.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

from .client import DEFAULT_TIMEOUT, RETRY_DELAYS, PluginClient
from .discovery import PluginSpec, find_spec


@dataclass(frozen=True)
class Plugin:
    """A plugin that answered the handshake."""

    spec: PluginSpec
    client: PluginClient
    implements: tuple[str, ...]

    @property
    def name(self) -> str:
        return self.spec.name


class Plugins:
    """The plugins of one controller, found in `dirs` (searched in order)."""

    def __init__(
        self,
        dirs: Sequence[str],
        *,
        timeout: float = DEFAULT_TIMEOUT,
        retry_delays: Sequence[float] = RETRY_DELAYS,
    ) -> None:
        self.dirs = tuple(dirs)
        self.timeout = timeout
        self.retry_delays = tuple(retry_delays)
        self._active: dict[str, Plugin] = {}
        self._lock = threading.Lock()

    def get(self, name: str, subsystem: str | None = None) -> Plugin | None:
        """The activated plugin `name` (None if not found or it lacks `subsystem`).

        A plugin that is found but unreachable or broken raises PluginError.
        """
        with self._lock:
            plugin = self._active.get(name)
        if plugin is None:
            spec = find_spec(name, self.dirs)
            if spec is None:
                return None
            client = PluginClient(spec, timeout=self.timeout, retry_delays=self.retry_delays)
            plugin = Plugin(spec, client, tuple(client.activate()))
            with self._lock:
                plugin = self._active.setdefault(name, plugin)
        if subsystem is not None and subsystem not in plugin.implements:
            return None
        return plugin

    def active(self) -> list[str]:
        with self._lock:
            return list(self._active)
