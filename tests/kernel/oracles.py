"""The independent kernel oracles shared by the privileged tests.

Each helper here judges the kernel without cnm's own code: /proc/self/mountinfo says what
is mounted where (and which namespace inode), `nsenter --net=<path> ip -j ...` says what
is inside a namespace, and the run_dir/netns directory is listed as it is on disk.
"""

from __future__ import annotations

import fcntl
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


# --- more `ip`/`bridge` views, for the netlink transport tests ---------------------------


def _ns_json(path: str | os.PathLike[str], *argv: str) -> list[dict]:
    """The JSON a tool (`ip -j ...`, `bridge -j ...`) prints inside the namespace at `path`."""
    out = subprocess.run(
        ["nsenter", f"--net={path}", *argv], check=True, capture_output=True, text=True
    ).stdout.strip()
    return json.loads(out) if out else []


def ns_link_details(path: str | os.PathLike[str]) -> dict[str, dict]:
    """The links inside the namespace at `path` with their kind data (`ip -d -j link show`)."""
    return {link["ifname"]: link for link in _ns_json(path, "ip", "-d", "-j", "link", "show")}


def ns_addr_info(path: str | os.PathLike[str]) -> dict[str, list[dict]]:
    """Every address entry (flags included) of each link (`ip -j addr show`)."""
    return {
        link["ifname"]: link.get("addr_info", [])
        for link in _ns_json(path, "ip", "-j", "addr", "show")
    }


def ns_routes(path: str | os.PathLike[str], version: int = 4) -> list[dict]:
    """The main table's routes of one family (`ip -4|-6 -j route show`)."""
    return _ns_json(path, "ip", f"-{version}", "-j", "route", "show")


def ns_neighbours(path: str | os.PathLike[str], dev: str | None = None) -> list[dict]:
    """Every ARP/ND entry, whatever its state (`ip -j neigh show nud all [dev DEV]`)."""
    where = ["dev", dev] if dev is not None else []
    return _ns_json(path, "ip", "-j", "neigh", "show", "nud", "all", *where)


def ns_fdb(path: str | os.PathLike[str], dev: str) -> list[dict]:
    """The forwarding database entries of one device (`bridge -j fdb show dev DEV`)."""
    return _ns_json(path, "bridge", "-j", "fdb", "show", "dev", dev)


def ip_rejection(path: str | os.PathLike[str], *what: str) -> str:
    """The kernel's extended-ack text as `ip <what>` prints it when the kernel refuses.

    `ip` prints "Error: <text>." for an extended ack; the text is returned without the
    prefix and the final full stop. Fails if `ip` succeeds.
    """
    proc = subprocess.run(["nsenter", f"--net={path}", "ip", *what], capture_output=True, text=True)
    assert proc.returncode != 0, f"`ip {' '.join(what)}` unexpectedly succeeded"
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("Error: "), proc.stderr
    return line.removeprefix("Error: ").removesuffix(".")


SIOCGSKNS = 0x894C


def socket_netns(fd: int) -> str:
    """The network namespace ("net:[ino]") a socket lives in, asked of the kernel (SIOCGSKNS)."""
    ns_fd = fcntl.ioctl(fd, SIOCGSKNS)
    try:
        return f"net:[{os.fstat(ns_fd).st_ino}]"
    finally:
        os.close(ns_fd)


# --- the session's own namespace, bridges, nftables and real packets ---------------------


def tool_json(*argv: str, path: str | os.PathLike[str] | None = None) -> list[dict]:
    """The JSON a tool prints, run in the current namespace (or inside the one at `path`)."""
    prefix = [] if path is None else ["nsenter", f"--net={path}"]
    out = subprocess.run(
        [*prefix, *argv], check=True, capture_output=True, text=True
    ).stdout.strip()
    return json.loads(out) if out else []


def links_here() -> dict[str, dict]:
    """The links of the current namespace with their kind data (`ip -d -j link show`)."""
    return {link["ifname"]: link for link in tool_json("ip", "-d", "-j", "link", "show")}


def link_kind(link: dict) -> str | None:
    """The kind (`veth`, `bridge`, ...) of a link as `ip -d -j link` reports it."""
    return (link.get("linkinfo") or {}).get("info_kind")


def bridge_ports(path: str | os.PathLike[str] | None = None) -> dict[str, dict]:
    """Every bridge port with its settings (`bridge -j -d link show`), by port name."""
    return {p["ifname"]: p for p in tool_json("bridge", "-j", "-d", "link", "show", path=path)}


def addresses_here(dev: str | None = None) -> dict[str, set[str]]:
    """`ip -j addr show [dev DEV]` of the current namespace: link -> {"addr/len", ...}."""
    where = ["dev", dev] if dev is not None else []
    return {
        link["ifname"]: {f"{a['local']}/{a['prefixlen']}" for a in link.get("addr_info", [])}
        for link in tool_json("ip", "-j", "addr", "show", *where)
    }


def kernel_view(path: str | os.PathLike[str] | None = None) -> dict[str, object]:
    """A comparable picture of a namespace's links and addresses (`ip -j link|addr`):
    what a failed request must not change. Fields that move on their own (operstate,
    address lifetimes and DAD flags) are left out."""
    links = {
        link["ifname"]: (
            link["ifindex"],
            link.get("master"),
            tuple(sorted(link.get("flags", []))),
            link.get("mtu"),
            link.get("address"),
            link.get("group"),
        )
        for link in tool_json("ip", "-j", "link", "show", path=path)
    }
    addrs = {
        link["ifname"]: sorted(f"{a['local']}/{a['prefixlen']}" for a in link.get("addr_info", []))
        for link in tool_json("ip", "-j", "addr", "show", path=path)
    }
    return {"links": links, "addrs": addrs}


def nft_table(family: str = "inet", name: str = "cnm") -> list[dict] | None:
    """The objects of one nftables table (`nft -j list table`), None when it does not exist."""
    proc = subprocess.run(
        ["nft", "-j", "list", "table", family, name], capture_output=True, text=True
    )
    if proc.returncode != 0:
        return None
    return [item for item in json.loads(proc.stdout)["nftables"] if "metainfo" not in item]


def nft_chain_names(family: str = "inet", name: str = "cnm") -> set[str]:
    """The chains of one nftables table (empty when the table does not exist)."""
    return {item["chain"]["name"] for item in nft_table(family, name) or [] if "chain" in item}


def ns_ping(path: str | os.PathLike[str], address: object, *, timeout: int = 1) -> bool:
    """True when one `ping -c1 -W<timeout>` from inside the namespace at `path` is answered."""
    proc = subprocess.run(
        ["nsenter", f"--net={path}", "ping", "-n", "-q", "-c1", f"-W{timeout}", str(address)],
        capture_output=True,
        text=True,
    )
    return proc.returncode == 0


def ns_read(path: str | os.PathLike[str], file: str) -> str:
    """A file as a process inside the namespace at `path` reads it (e.g. /proc/sys/net)."""
    return subprocess.run(
        ["nsenter", f"--net={path}", "cat", file], check=True, capture_output=True, text=True
    ).stdout.strip()


def wait_until(predicate, timeout: float = 2.0, interval: float = 0.02) -> bool:
    """Poll `predicate` until it is true or `timeout` seconds passed; its last verdict."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return bool(predicate())
        time.sleep(interval)
