"""The plugin's HTTP server on a unix socket (spec/remote-protocol.md, server side).

Owns the transport: `POST /<Subsystem>.<Method>` with a JSON body (empty for the
handshake calls), whatever Accept or Content-Type the engine sends; the replies and
their status codes; the socket file (created 0660, never looser, removed on exit, a
stale one replaced, a live one refused); and `serve()`, which runs until SIGTERM or
SIGINT.

Errors never escape a handler:
- a body that is not JSON, or not a JSON object: 400 `{"Err": ...}`;
- an unknown method: 404 `{"Err": ...}`;
- a NetworkDriver call that fails: 400 for an invalid request, else 500, `{"Err": ...}`;
- an IpamDriver call that fails: 200 with the message in `"Error"` (the IPAM
  convention), and in `"Err"` too, for clients that read only that.
The controller is synchronous, so calls run one at a time on one worker thread and the
event loop stays free to accept more.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import signal
import socket
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from .. import errors
from . import protocol as p
from .backend import PluginBackend, PluginController

_log = logging.getLogger(__name__)

DEFAULT_NAME = "cnm"
DEFAULT_PLUGIN_DIR = "/run/docker/plugins"
SOCKET_MODE = 0o660
MAX_BODY = 1 << 20


@dataclass(frozen=True)
class _Method:
    call: Callable[[PluginBackend, p.Body], dict[str, Any]]
    ipam: bool = False


def _methods() -> dict[str, _Method]:
    def net(fn: Callable[[PluginBackend, p.Body], dict[str, Any]]) -> _Method:
        return _Method(fn)

    def ipam(fn: Callable[[PluginBackend, p.Body], dict[str, Any]]) -> _Method:
        return _Method(fn, ipam=True)

    return {
        "Plugin.Activate": net(lambda b, _: b.activate()),
        "NetworkDriver.GetCapabilities": net(lambda b, _: b.network_capabilities()),
        "NetworkDriver.GwAllocCheck": net(lambda b, _: b.gw_alloc_check()),
        "NetworkDriver.CreateNetwork": net(
            lambda b, r: b.create_network(p.parse_create_network(r))
        ),
        "NetworkDriver.DeleteNetwork": net(lambda b, r: b.delete_network(p.parse_network_ref(r))),
        "NetworkDriver.CreateEndpoint": net(
            lambda b, r: b.create_endpoint(p.parse_create_endpoint(r))
        ),
        "NetworkDriver.DeleteEndpoint": net(
            lambda b, r: b.delete_endpoint(p.parse_endpoint_ref(r))
        ),
        "NetworkDriver.EndpointOperInfo": net(
            lambda b, r: b.endpoint_oper_info(p.parse_endpoint_ref(r))
        ),
        "NetworkDriver.Join": net(lambda b, r: b.join(p.parse_join(r))),
        "NetworkDriver.Leave": net(lambda b, r: b.leave(p.parse_endpoint_ref(r))),
        "NetworkDriver.ProgramExternalConnectivity": net(
            lambda b, r: b.external_connectivity(p.parse_external_connectivity(r))
        ),
        "NetworkDriver.RevokeExternalConnectivity": net(
            lambda b, r: b.external_connectivity(p.parse_endpoint_ref(r))
        ),
        "NetworkDriver.DiscoverNew": net(lambda b, r: b.discover(p.parse_discovery(r))),
        "NetworkDriver.DiscoverDelete": net(lambda b, r: b.discover(p.parse_discovery(r))),
        "NetworkDriver.AllocateNetwork": net(lambda b, _: b.global_scope_only()),
        "NetworkDriver.FreeNetwork": net(lambda b, _: b.global_scope_only()),
        "IpamDriver.GetCapabilities": ipam(lambda b, _: b.ipam_capabilities()),
        "IpamDriver.GetDefaultAddressSpaces": ipam(lambda b, _: b.default_address_spaces()),
        "IpamDriver.RequestPool": ipam(lambda b, r: b.request_pool(p.parse_request_pool(r))),
        "IpamDriver.ReleasePool": ipam(lambda b, r: b.release_pool(p.parse_pool_id(r))),
        "IpamDriver.RequestAddress": ipam(
            lambda b, r: b.request_address(p.parse_request_address(r))
        ),
        "IpamDriver.ReleaseAddress": ipam(
            lambda b, r: b.release_address(p.parse_release_address(r))
        ),
    }


METHODS = _methods()


def _reply(body: dict[str, Any], status: int = 200) -> web.Response:
    return web.Response(
        status=status, body=json.dumps(body).encode(), headers={"Content-Type": p.CONTENT_TYPE}
    )


def _failure(method: _Method | None, exc: BaseException) -> web.Response:
    if isinstance(exc, errors.CNMError):
        message = str(exc)
    else:
        _log.error("plugin call failed unexpectedly", exc_info=exc)
        message = f"internal error: {type(exc).__name__}: {exc}"
    if method is not None and method.ipam:
        return _reply({"Error": message, "Err": message})
    status = 400 if isinstance(exc, errors.InvalidParameter) else 500
    return _reply({"Err": message}, status)


class PluginServer:
    """The HTTP application over a PluginBackend, listening on `plugin_dir/name.sock`."""

    def __init__(self, backend: PluginBackend, socket_path: str) -> None:
        self.backend = backend
        self.socket_path = socket_path
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cnm-plugin")
        self._runner: web.AppRunner | None = None

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY)
        app.router.add_route("*", "/{method}", self._handle)
        return app

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["method"]
        method = METHODS.get(name)
        if method is None or request.method != "POST":
            return _reply({"Err": f"unknown method {request.method} /{name}"}, 404)
        try:
            raw = await request.read()
            body = p.body_object(json.loads(raw) if raw.strip() else None)
        except (ValueError, UnicodeDecodeError, errors.InvalidParameter) as exc:
            return _reply({"Err": f"malformed request body: {exc}"}, 400)
        except web.HTTPException as exc:  # e.g. a body over MAX_BODY
            return _reply({"Err": exc.reason}, exc.status)
        loop = asyncio.get_running_loop()
        try:
            result = await loop.run_in_executor(self._executor, method.call, self.backend, body)
        except Exception as exc:
            return _failure(method, exc)
        return _reply(result)

    async def start(self) -> None:
        _claim_socket(self.socket_path)
        self._runner = web.AppRunner(self.app(), access_log=None, handle_signals=False)
        await self._runner.setup()
        try:
            sock = _bind_socket(self.socket_path)
        except BaseException:
            await self.stop()
            raise
        site = web.SockSite(self._runner, sock)
        try:
            await site.start()
        except BaseException:
            sock.close()
            await self.stop()
            raise

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)
        self._executor.shutdown(wait=True)


def _claim_socket(path: str) -> None:
    """Make the socket's directory; refuse a socket someone still listens on, and
    remove a stale one (left by a plugin that was killed)."""
    os.makedirs(os.path.dirname(path) or ".", mode=0o755, exist_ok=True)
    if not os.path.lexists(path):
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError as exc:
        if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise errors.Conflict(f"cannot use plugin socket {path}: {exc}") from None
        os.unlink(path)
        return
    finally:
        probe.close()
    raise errors.Conflict(f"a plugin is already serving on {path}")


def _bind_socket(path: str) -> socket.socket:
    """A unix stream socket bound at `path` whose file never has a looser mode than
    SOCKET_MODE: the socket's own mode is set before bind (Linux creates the file with
    it, less the umask, so never looser), then the file gets exactly SOCKET_MODE. No
    process-wide umask change (other threads may be creating files meanwhile)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    bound = False
    try:
        os.fchmod(sock.fileno(), SOCKET_MODE)
        sock.bind(path)
        bound = True
        os.chmod(path, SOCKET_MODE)
    except BaseException:
        sock.close()
        if bound:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        raise
    return sock


def socket_path(plugin_dir: str, name: str) -> str:
    if not name or "/" in name or name in (".", ".."):
        raise errors.InvalidParameter(f"invalid plugin name {name!r}")
    return os.path.join(plugin_dir, f"{name}.sock")


def serve(
    state_dir: str,
    run_dir: str,
    *,
    name: str = DEFAULT_NAME,
    plugin_dir: str = DEFAULT_PLUGIN_DIR,
    fastpath: str | None = None,
    ready: Callable[[str], None] | None = None,
) -> None:
    """Serve until SIGTERM or SIGINT; the socket is removed on the way out."""
    path = socket_path(plugin_dir, name)
    with PluginController(state_dir=state_dir, run_dir=run_dir, fastpath=fastpath) as ctl:
        asyncio.run(_serve(PluginServer(PluginBackend(ctl), path), ready))


async def _serve(server: PluginServer, ready: Callable[[str], None] | None) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    try:
        if ready is not None:
            ready(server.socket_path)
        await stop.wait()
    finally:
        await server.stop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
