"""The independent kernel oracles shared by the privileged tests.

Each helper here judges the kernel without cnm's own code: /proc/self/mountinfo says what
is mounted where (and which namespace inode), `nsenter --net=<path> ip -j ...` says what
is inside a namespace, and the run_dir/netns directory is listed as it is on disk.
"""

from __future__ import annotations

import json
import os
import subprocess


def nsfs_mounts(under: str | os.PathLike[str]) -> dict[str, str]:
    """nsfs mount points at or below `under` -> the namespace they hold ("net:[ino]")."""
    base = os.path.realpath(under)
    out: dict[str, str] = {}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = left.split()
            point = fields[4].replace("\\040", " ")
            if right.split()[0] == "nsfs" and (point == base or point.startswith(base + "/")):
                out[point] = fields[3]
    return out


def _ip_json(path: str | os.PathLike[str], *what: str) -> list[dict]:
    """What `ip -j <what>` reports inside the namespace at `path`."""
    out = subprocess.run(
        ["nsenter", f"--net={path}", "ip", "-j", *what],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return json.loads(out)


def ns_links(path: str | os.PathLike[str]) -> dict[str, dict]:
    """The links inside the namespace at `path`, as `ip -j link show` reports them."""
    return {link["ifname"]: link for link in _ip_json(path, "link", "show")}


def ns_addrs(path: str | os.PathLike[str]) -> dict[str, set[str]]:
    """The addresses of each link inside the namespace at `path` (`ip -j addr show`)."""
    return {
        link["ifname"]: {a["local"] for a in link.get("addr_info", [])}
        for link in _ip_json(path, "addr", "show")
    }


def assert_fresh_loopback_only(path: str | os.PathLike[str], *, addresses: bool = True) -> None:
    """The namespace at `path` has only loopback, up (and, with `addresses`, 127.0.0.1)."""
    links = ns_links(path)
    assert set(links) == {"lo"}, links
    assert "UP" in links["lo"]["flags"], links["lo"]
    if addresses:
        # The kernel gives loopback its addresses only once it is up.
        assert "127.0.0.1" in ns_addrs(path)["lo"]


def assert_null_sandbox(key: str, *, addresses: bool = True) -> str:
    """`key` holds a namespace of its own with only loopback, up; returns its identity.

    With `addresses` (the default) loopback must also have 127.0.0.1; without, only the
    links are checked.
    """
    mounted = nsfs_mounts(key)
    assert key in mounted, f"no namespace mounted at {key}"
    assert mounted[key] != os.readlink("/proc/self/ns/net")
    assert_fresh_loopback_only(key, addresses=addresses)
    return mounted[key]


def netns_dir(run_dir: str) -> list[str]:
    """The names in run_dir/netns, sorted; none when the directory does not exist."""
    try:
        return sorted(os.listdir(os.path.join(run_dir, "netns")))
    except FileNotFoundError:
        return []
