"""cnm's drivers served to a container engine over the remote plugin protocol.

Owns `cnm plugin serve`: a unix-socket HTTP server (server.py) that speaks
spec/remote-protocol.md's NetworkDriver and IpamDriver methods, the typed parsing of
their requests (protocol.py), and the adapter that carries them out on an in-process
NetworkController with its own store (backend.py).
"""

from __future__ import annotations

from .backend import ENGINE_IPAM, EngineIpam, PluginBackend, PluginController
from .server import DEFAULT_NAME, DEFAULT_PLUGIN_DIR, PluginServer, serve

__all__ = [
    "DEFAULT_NAME",
    "DEFAULT_PLUGIN_DIR",
    "ENGINE_IPAM",
    "EngineIpam",
    "PluginBackend",
    "PluginController",
    "PluginServer",
    "serve",
]
