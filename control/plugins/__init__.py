"""Docker's plugin mechanism, client side (spec/remote-protocol.md, "Discovery and transport").

Owns finding a plugin by name in the configured plugin directories (`discovery`), the
HTTP/1.1 client that calls it over a unix socket or TCP (`client`), and the activation
handshake with its cache (`Plugins`). The remote network driver and the remote IPAM
build on it; nothing here knows their methods.
"""

from __future__ import annotations

from .client import ACCEPT, DEFAULT_TIMEOUT, RETRY_DELAYS, PluginClient
from .discovery import PluginSpec, TLSConfig, find_spec
from .registry import Plugin, Plugins

__all__ = [
    "ACCEPT",
    "DEFAULT_TIMEOUT",
    "RETRY_DELAYS",
    "Plugin",
    "PluginClient",
    "PluginSpec",
    "Plugins",
    "TLSConfig",
    "find_spec",
]
