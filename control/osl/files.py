"""A sandbox's name-resolution files: hosts, resolv.conf and hostname.

Owns run_dir/sandboxes/<sandbox id>/, written from the sandbox's options (hostname,
extra hosts, DNS servers, search domains) and its endpoints' addresses, as libnetwork's
sandbox options provide; rewritten on every join and leave when their content changes,
each file atomically (in a directory made just now, simply written: nobody reads it yet).
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import shutil
from collections.abc import Sequence

IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface
HOST_RESOLV_CONF = "/etc/resolv.conf"


def sandbox_dir(run_dir: str, sandbox_id: str) -> str:
    return os.path.join(run_dir, "sandboxes", sandbox_id)


def _write(path: str, text: str, *, unless_same: bool = False, fresh: bool = False) -> None:
    if fresh:  # in a directory made just now: nobody can be reading it yet
        _create(path, text.encode())
        return
    if unless_same:
        # Reading is far cheaper than an atomic rewrite (a new inode and a rename).
        with contextlib.suppress(OSError), open(path) as f:
            if f.read() == text:
                return
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _create(path: str, data: bytes) -> None:
    """Write `data` to `path` with plain os calls, as open(path, "w") would (created with
    mode 0666 less the umask, or truncated)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


_nameservers: dict[str, tuple[tuple[int, int, int], list[str]]] = {}


def _host_nameservers(path: str = HOST_RESOLV_CONF) -> list[str]:
    """The host's nameservers a container can use (loopback ones cannot be reached); read
    again only when the file changed (inode, size, mtime)."""
    try:
        st = os.stat(path)
    except OSError:
        return []
    stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
    cached = _nameservers.get(path)
    if cached is not None and cached[0] == stamp:
        return list(cached[1])
    out: list[str] = []
    with contextlib.suppress(OSError), open(path) as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 2 and parts[0] == "nameserver":
                with contextlib.suppress(ValueError):
                    if not ipaddress.ip_address(parts[1]).is_loopback:
                        out.append(parts[1])
    _nameservers[path] = (stamp, out)
    return list(out)


def write_files(
    run_dir: str,
    sandbox_id: str,
    *,
    hostname: str | None,
    addresses: Sequence[IPInterface],
    extra_hosts: Sequence[str],
    dns: Sequence[str],
    dns_search: Sequence[str],
) -> str:
    """Write the sandbox's files (hosts every time); returns their directory.

    For a sandbox made just now its directory is new: each file is simply created and
    written (no temporary file, no rename, nothing to compare)."""
    d = sandbox_dir(run_dir, sandbox_id)
    try:
        os.mkdir(d, 0o755)
        fresh = True
    except FileExistsError:
        fresh = False
    except FileNotFoundError:
        os.makedirs(d, mode=0o755, exist_ok=True)
        fresh = True
    hosts = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback"]
    if hostname:
        hosts += [f"{a.ip}\t{hostname}" for a in addresses]
    for entry in extra_hosts:
        name, _, ip = entry.partition(":")
        hosts.append(f"{ip}\t{name}")
    _write(os.path.join(d, "hosts"), "\n".join(hosts) + "\n", unless_same=True, fresh=fresh)
    # resolv.conf and hostname follow the sandbox's options, which never change: written
    # once; hosts follows the addresses, rewritten every time.
    resolv_path = os.path.join(d, "resolv.conf")
    if fresh or not os.path.exists(resolv_path):
        servers = list(dns) or _host_nameservers()
        resolv = [f"nameserver {s}" for s in servers]
        if dns_search:
            resolv.append("search " + " ".join(dns_search))
        _write(resolv_path, "\n".join(resolv) + ("\n" if resolv else ""), fresh=fresh)
        _write(os.path.join(d, "hostname"), (hostname or sandbox_id[:12]) + "\n", fresh=fresh)
    return d


def remove_files(run_dir: str, sandbox_id: str) -> None:
    shutil.rmtree(sandbox_dir(run_dir, sandbox_id), ignore_errors=True)
