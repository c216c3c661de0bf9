"""cnm.fastpath's netlink transport and request builders against the kernel.

Every request is sent through `transport.NetlinkSocket` (both codecs: "python" and
"native") and what the kernel then holds is judged without cnm's own decoder:
`nsenter --net=<path> ip -j ...`, `ip -d -j link show`, `bridge -j fdb show` and, in the
session's own namespace, pyroute2. Dumps decoded into `records.*` are compared with the
same oracles. Each test makes its own namespaces under tmp_path and deletes them after.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
import subprocess
import time
from collections.abc import Callable, Iterator

import pytest

from cnm import fastpath
from cnm.fastpath import messages as m
from cnm.fastpath import netns, records, rtnl, transport
from cnm.fastpath.rtnl import VethSpec, VxlanSpec
from cnm.fastpath.transport import BatchResult, NetlinkError, NetlinkSocket

from .oracles import (
    ip_rejection,
    ns_addr_info,
    ns_fdb,
    ns_link_details,
    ns_links,
    ns_neighbours,
    ns_routes,
    socket_netns,
)

pytestmark = [pytest.mark.privileged, pytest.mark.usefixtures("_unmount_leftovers")]

ip = ipaddress.ip_address
net = ipaddress.ip_network
iface = ipaddress.ip_interface

MISSING = 0x7FFF0000  # an interface index no namespace here has


# --- fixtures ------------------------------------------------------------------------------


class Spaces:
    """Namespaces, namespace fds and sockets made by one test; all released at the end."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.paths: list[str] = []
        self.fds: list[int] = []
        self.sockets: list[NetlinkSocket] = []
        os.makedirs(base, exist_ok=True)

    def new(self, name: str) -> str:
        path = os.path.join(self.base, name)
        netns.create(path)
        self.paths.append(path)
        return path

    def fd(self, path: str) -> int:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self.fds.append(fd)
        return fd

    def socket(self, path: str | None, backend: str) -> NetlinkSocket:
        sock = NetlinkSocket(path, backend=backend)
        self.sockets.append(sock)
        return sock

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()
        for fd in self.fds:
            os.close(fd)
        for path in reversed(self.paths):
            transport.forget(path)
            netns.delete(path)


@pytest.fixture
def spaces(tmp_path) -> Iterator[Spaces]:
    s = Spaces(str(tmp_path / "ns"))
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def host(spaces: Spaces) -> str:
    """A fresh namespace standing in for the host side of every test."""
    return spaces.new("host")


@pytest.fixture
def nl(spaces: Spaces, host: str, backend: str) -> NetlinkSocket:
    """The transport's socket inside `host`, with the codec under test."""
    return spaces.socket(host, backend)


# --- helpers ------------------------------------------------------------------------------


def mac(*tail: int) -> str:
    """A locally administered unicast MAC: 02:00:<tail padded to four bytes>."""
    raw = [0] * (4 - len(tail)) + list(tail)
    return "02:00:" + ":".join(f"{b:02x}" for b in raw)


def index_of(path: str, name: str) -> int:
    """A link's index as `ip` reports it inside `path`."""
    return ns_links(path)[name]["ifindex"]


def assert_ok(result: BatchResult) -> None:
    assert result.ok, {i: str(e) for i, e in result.errors.items()}


def make_bridge(nl: NetlinkSocket, path: str, name: str = "br0", **kw: object) -> int:
    assert_ok(nl.execute([rtnl.bridge(name, **kw)]))  # type: ignore[arg-type]
    return index_of(path, name)


def converge(produce: Callable[[], tuple[set, set]], attempts: int = 20) -> tuple[set, set]:
    """(cnm's view, the oracle's view), retried briefly until they agree.

    The kernel adds some entries on its own timers (IGMP/MLD neighbours, link-local
    addresses), so a dump and an oracle run a moment apart may differ for a while.
    """
    got, want = produce()
    for _ in range(attempts):
        if got == want:
            break
        time.sleep(0.05)
        got, want = produce()
    return got, want


class CountingSocket:
    """Wraps a NetlinkSocket's kernel socket to record every buffer handed to send()."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self.sent: list[bytes] = []

    def send(self, data: bytes) -> int:
        self.sent.append(bytes(data))
        return self._sock.send(data)

    def __getattr__(self, name: str) -> object:
        return getattr(self._sock, name)


def netlink_headers(buf: bytes) -> list[tuple[int, int, int, int]]:
    """(length, type, flags, seq) of each message in a sent buffer, parsed with struct."""
    out = []
    off = 0
    while off < len(buf):
        length, mtype, flags, seq, _ = struct.unpack_from("=IHHII", buf, off)
        assert length >= 16
        out.append((length, mtype, flags, seq))
        off += (length + 3) & ~3
    assert off == len(buf)
    return out


# --- veth pairs ---------------------------------------------------------------------------


def test_veth_peer_is_made_inside_the_other_namespace(spaces, host, nl, backend) -> None:
    cont = spaces.new("c1")
    br = make_bridge(nl, host)
    spec = VethSpec(
        name="veth0",
        peer_name="eth0",
        peer_netns_fd=spaces.fd(cont),
        peer_ifindex=5,
        ifindex=4001,
        master=br,
        mtu=1450,
        mac=mac(1, 1),
        peer_mac=mac(1, 2),
    )
    assert_ok(nl.execute([rtnl.veth(spec)]))

    here = ns_links(host)
    assert set(here) == {"lo", "br0", "veth0"}  # the peer was never here
    h = here["veth0"]
    assert h["master"] == "br0"
    assert "UP" in h["flags"]
    assert h["mtu"] == 1450
    assert h["address"] == mac(1, 1)

    there = ns_links(cont)
    assert set(there) == {"lo", "eth0"}
    p = there["eth0"]
    assert p["mtu"] == 1450
    assert p["address"] == mac(1, 2)
    assert "UP" not in p["flags"]
    # The peer carries the index the spec chose for it.
    assert p["ifindex"] == 5, "VethSpec.peer_ifindex was not applied"

    # The chosen index addresses the peer inside its namespace with no look-up.
    inside = spaces.socket(cont, backend)
    inside.request(rtnl.link_set(5, up=True))
    assert "UP" in ns_links(cont)["eth0"]["flags"]
    assert "LOWER_UP" in ns_links(host)["veth0"]["flags"]


def test_fifty_veths_into_fifty_namespaces_in_one_batch(spaces, host, nl) -> None:
    count = 50
    conts = [spaces.new(f"c{i}") for i in range(count)]
    br = make_bridge(nl, host)
    batch = [
        rtnl.veth(
            VethSpec(
                name=f"v{i}",
                peer_name="eth0",
                peer_netns_fd=spaces.fd(path),
                peer_ifindex=5,
                ifindex=4100 + i,
                master=br,
                mtu=1400,
                mac=mac(2, i, 1),
                peer_mac=mac(2, i, 2),
            )
        )
        for i, path in enumerate(conts)
    ]
    result = nl.execute(batch)
    assert_ok(result)
    assert result.succeeded() == list(range(count))

    here = ns_links(host)
    assert set(here) == {"lo", "br0"} | {f"v{i}" for i in range(count)}
    for i in range(count):
        link = here[f"v{i}"]
        assert link["master"] == "br0", link
        assert "UP" in link["flags"], link
        assert link["mtu"] == 1400
        assert link["address"] == mac(2, i, 1)
    peer_indexes = []
    for i, path in enumerate(conts):
        there = ns_links(path)
        assert set(there) == {"lo", "eth0"}, (i, there)
        assert there["eth0"]["mtu"] == 1400
        assert there["eth0"]["address"] == mac(2, i, 2)
        peer_indexes.append(there["eth0"]["ifindex"])
    # Every peer carries the index its spec chose.
    assert peer_indexes == [5] * count, "VethSpec.peer_ifindex was not applied"


# --- bridge and vxlan ---------------------------------------------------------------------


def test_bridge_attributes(host, nl) -> None:
    batch = [
        rtnl.bridge("br0", mtu=1400, mac=mac(3, 1), ageing_time=12000, group=3),
        rtnl.bridge("br1", up=False),
    ]
    assert_ok(nl.execute(batch))
    links = ns_link_details(host)
    b0 = links["br0"]
    assert b0["linkinfo"]["info_kind"] == "bridge"
    assert b0["linkinfo"]["info_data"]["ageing_time"] == 12000  # centiseconds
    assert b0["mtu"] == 1400
    assert b0["address"] == mac(3, 1)
    assert b0["group"] == "3"
    assert "UP" in b0["flags"]
    b1 = links["br1"]
    assert b1["linkinfo"]["info_kind"] == "bridge"
    assert "UP" not in b1["flags"]
    assert b1["group"] == "default"


def test_vxlan_attributes(host, nl) -> None:
    br = make_bridge(nl, host)
    batch = [
        rtnl.vxlan(
            VxlanSpec(
                "vx0",
                vni=42,
                local=ip("10.0.0.1"),
                port=4790,
                ttl=17,
                ageing=77,
                mtu=1400,
                master=br,
            )
        ),
        rtnl.vxlan(VxlanSpec("vx1", external=True, port=4791)),
        rtnl.vxlan(
            VxlanSpec("vx2", vni=4242, local=ip("fd00::1"), port=4792, learning=True, up=False)
        ),
    ]
    assert_ok(nl.execute(batch))
    links = ns_link_details(host)

    vx0 = links["vx0"]
    d0 = vx0["linkinfo"]["info_data"]
    assert vx0["linkinfo"]["info_kind"] == "vxlan"
    assert (d0["id"], d0["local"], d0["port"], d0["learning"]) == (42, "10.0.0.1", 4790, False)
    assert (d0["ttl"], d0["ageing"]) == (17, 77)
    assert not d0.get("external", False)
    assert vx0["master"] == "br0"
    assert vx0["mtu"] == 1400
    assert "UP" in vx0["flags"]

    d1 = links["vx1"]["linkinfo"]["info_data"]
    assert d1["external"] is True
    assert d1["id"] == 0
    assert d1["port"] == 4791
    assert d1["learning"] is False
    assert "master" not in links["vx1"]

    vx2 = links["vx2"]
    d2 = vx2["linkinfo"]["info_data"]
    assert (d2["id"], d2["local6"], d2["port"], d2["learning"]) == (4242, "fd00::1", 4792, True)
    assert "UP" not in vx2["flags"]


# --- link changes -------------------------------------------------------------------------


def test_link_set_changes(spaces, host, nl) -> None:
    cont = spaces.new("c1")
    other = spaces.new("other")
    br = make_bridge(nl, host)
    spec = VethSpec("veth0", "eth0", spaces.fd(cont), peer_ifindex=5, ifindex=4201)
    assert_ok(nl.execute([rtnl.veth(spec)]))
    v = index_of(host, "veth0")
    assert "UP" in ns_links(host)["veth0"]["flags"]

    batch = [
        rtnl.link_set(v, up=False),
        rtnl.link_set(v, name="renamed0"),
        rtnl.link_set(v, mtu=1300),
        rtnl.link_set(v, mac=mac(4, 1)),
        rtnl.link_set(v, master=br),
        rtnl.link_set(v, group=9),
    ]
    assert_ok(nl.execute(batch))
    links = ns_links(host)
    assert "veth0" not in links
    link = links["renamed0"]
    assert link["ifindex"] == v
    assert "UP" not in link["flags"]
    assert link["mtu"] == 1300
    assert link["address"] == mac(4, 1)
    assert link["master"] == "br0"
    assert link["group"] == "9"

    assert_ok(nl.execute([rtnl.link_set(v, up=True), rtnl.link_set(v, master=0)]))
    link = ns_links(host)["renamed0"]
    assert "UP" in link["flags"]
    assert "master" not in link
    assert link["group"] == "9"

    nl.request(rtnl.link_set(v, netns_fd=spaces.fd(other)))
    assert "renamed0" not in ns_links(host)
    moved = ns_links(other)["renamed0"]
    assert moved["address"] == mac(4, 1)
    assert moved["mtu"] == 1300
    # The pair survived the move: its peer is still in c1.
    assert set(ns_links(cont)) == {"lo", "eth0"}


# --- addresses, routes, neighbours, FDB ---------------------------------------------------


def test_addresses_ipv4_and_ipv6(host, nl) -> None:
    br = make_bridge(nl, host)
    batch = [
        rtnl.addr_add(br, iface("10.1.0.2/24")),
        rtnl.addr_add(br, iface("fd00::2/64")),
        rtnl.addr_add(br, iface("fd00::3/64"), nodad=False),
    ]
    assert_ok(nl.execute(batch))
    addrs = {a["local"]: a for a in ns_addr_info(host)["br0"]}
    v4 = addrs["10.1.0.2"]
    assert (v4["family"], v4["prefixlen"], v4["broadcast"]) == ("inet", 24, "10.1.0.255")
    v6 = addrs["fd00::2"]
    assert (v6["family"], v6["prefixlen"]) == ("inet6", 64)
    assert v6.get("nodad") is True
    assert not v6.get("tentative", False)
    # The oracle does see tentative addresses: the one added with DAD is.
    assert addrs["fd00::3"].get("tentative") is True

    assert_ok(
        nl.execute(
            [rtnl.addr_del(br, iface("10.1.0.2/24")), rtnl.addr_del(br, iface("fd00::2/64"))]
        )
    )
    left = {a["local"] for a in ns_addr_info(host)["br0"]}
    assert "10.1.0.2" not in left
    assert "fd00::2" not in left
    assert "fd00::3" in left


def test_routes(host, nl) -> None:
    br = make_bridge(nl, host)
    assert_ok(
        nl.execute(
            [rtnl.addr_add(br, iface("10.1.0.2/24")), rtnl.addr_add(br, iface("fd00::2/64"))]
        )
    )
    routes = [
        (net("0.0.0.0/0"), ip("10.1.0.1"), None),
        (net("10.2.0.0/16"), ip("10.1.0.1"), None),
        (net("10.3.0.0/16"), None, br),
        (net("::/0"), ip("fd00::1"), None),
        (net("fd01::/64"), None, br),
    ]
    assert_ok(nl.execute([rtnl.route_add(d, gateway=g, oif=o) for d, g, o in routes]))

    v4 = {r["dst"]: r for r in ns_routes(host, 4) if r.get("protocol") == "static"}
    v6 = {r["dst"]: r for r in ns_routes(host, 6) if r.get("protocol") == "static"}
    assert set(v4) == {"default", "10.2.0.0/16", "10.3.0.0/16"}
    assert set(v6) == {"default", "fd01::/64"}
    assert (v4["default"]["gateway"], v4["default"]["dev"]) == ("10.1.0.1", "br0")
    assert (v4["10.2.0.0/16"]["gateway"], v4["10.2.0.0/16"]["dev"]) == ("10.1.0.1", "br0")
    assert "gateway" not in v4["10.3.0.0/16"]
    assert (v4["10.3.0.0/16"]["dev"], v4["10.3.0.0/16"]["scope"]) == ("br0", "link")
    assert (v6["default"]["gateway"], v6["default"]["dev"]) == ("fd00::1", "br0")
    assert "gateway" not in v6["fd01::/64"]
    assert v6["fd01::/64"]["dev"] == "br0"

    assert_ok(nl.execute([rtnl.route_del(d, gateway=g, oif=o) for d, g, o in routes]))
    assert not [r for r in ns_routes(host, 4) if r.get("protocol") == "static"]
    assert not [r for r in ns_routes(host, 6) if r.get("protocol") == "static"]
    # The connected routes of the addresses are untouched.
    assert any(r["dst"] == "10.1.0.0/24" for r in ns_routes(host, 4))


def test_permanent_neighbours(host, nl) -> None:
    br = make_bridge(nl, host)
    assert_ok(
        nl.execute(
            [rtnl.addr_add(br, iface("10.1.0.2/24")), rtnl.addr_add(br, iface("fd00::2/64"))]
        )
    )
    batch = [
        rtnl.neigh_add(br, ip("10.1.0.9"), mac(5, 1)),
        rtnl.neigh_add(br, ip("fd00::9"), mac(5, 2)),
    ]
    assert_ok(nl.execute(batch))

    def entries() -> dict[str, dict]:
        return {n["dst"]: n for n in ns_neighbours(host, "br0")}

    got = entries()
    assert (got["10.1.0.9"]["lladdr"], got["10.1.0.9"]["state"]) == (mac(5, 1), ["PERMANENT"])
    assert (got["fd00::9"]["lladdr"], got["fd00::9"]["state"]) == (mac(5, 2), ["PERMANENT"])

    # replace=True (the default) updates in place; replace=False refuses an existing entry.
    result = nl.execute(
        [
            rtnl.neigh_add(br, ip("10.1.0.9"), mac(5, 3)),
            rtnl.neigh_add(br, ip("fd00::9"), mac(5, 4), replace=False),
        ]
    )
    assert set(result.errors) == {1}
    assert result.errors[1].errno == errno.EEXIST
    got = entries()
    assert got["10.1.0.9"]["lladdr"] == mac(5, 3)
    assert got["fd00::9"]["lladdr"] == mac(5, 2)

    assert_ok(nl.execute([rtnl.neigh_del(br, ip("10.1.0.9")), rtnl.neigh_del(br, ip("fd00::9"))]))
    got = entries()
    assert "10.1.0.9" not in got
    assert "fd00::9" not in got


def test_fdb_entries_on_vxlan(host, nl) -> None:
    batch = [
        rtnl.vxlan(VxlanSpec("vx0", vni=42, local=ip("10.0.0.1"))),
        rtnl.vxlan(VxlanSpec("vx1", external=True, port=4791)),
    ]
    assert_ok(nl.execute(batch))
    vx0, vx1 = index_of(host, "vx0"), index_of(host, "vx1")
    entries = [
        (vx0, mac(6, 1), ip("10.0.0.2"), 4242),
        (vx0, mac(6, 2), ip("10.0.0.3"), None),
        (vx1, mac(6, 3), ip("10.0.0.4"), 99),
    ]
    assert_ok(nl.execute([rtnl.fdb_add(i, a, d, vni=v) for i, a, d, v in entries]))

    fdb0 = {e["mac"]: e for e in ns_fdb(host, "vx0")}
    fdb1 = {e["mac"]: e for e in ns_fdb(host, "vx1")}
    e1, e2, e3 = fdb0[mac(6, 1)], fdb0[mac(6, 2)], fdb1[mac(6, 3)]
    assert (e1["dst"], e1["vni"], e1["state"]) == ("10.0.0.2", 4242, "permanent")
    assert "self" in e1["flags"]
    # Without NDA_VNI the entry takes the device's own VNI (which `bridge` leaves out).
    assert (e2["dst"], e2.get("vni", 42), e2["state"]) == ("10.0.0.3", 42, "permanent")
    assert (e3["dst"], e3["vni"], e3["state"]) == ("10.0.0.4", 99, "permanent")
    assert "self" in e3["flags"]

    assert_ok(nl.execute([rtnl.fdb_del(i, a, d, vni=v) for i, a, d, v in entries]))
    assert not {e["mac"] for e in ns_fdb(host, "vx0")} & {mac(6, 1), mac(6, 2)}
    assert mac(6, 3) not in {e["mac"] for e in ns_fdb(host, "vx1")}


# --- dumps --------------------------------------------------------------------------------

_NUD_NAMES = {
    0x01: "INCOMPLETE",
    0x02: "REACHABLE",
    0x04: "STALE",
    0x08: "DELAY",
    0x10: "PROBE",
    0x20: "FAILED",
    0x40: "NOARP",
    0x80: "PERMANENT",
}


def _nud(state: int) -> frozenset[str]:
    return frozenset(n for bit, n in _NUD_NAMES.items() if state & bit) or frozenset({"NONE"})


def _route_key(r: records.RouteRecord) -> tuple[str, str | None, int | None]:
    return (str(r.dst), str(r.gateway) if r.gateway else None, r.oif)


def _ip_route_key(r: dict, index: dict[str, int], version: int) -> tuple:
    dst = r["dst"]
    if dst == "default":
        dst = "0.0.0.0/0" if version == 4 else "::/0"
    return (str(net(dst)), r.get("gateway"), index.get(r.get("dev", "")))


def test_dumps_match_ip(spaces, host, nl) -> None:
    cont = spaces.new("c1")
    br = make_bridge(nl, host, mtu=1400, mac=mac(7, 1), group=4)
    batch = [
        rtnl.veth(
            VethSpec(
                "veth0",
                "eth0",
                spaces.fd(cont),
                peer_ifindex=5,
                ifindex=4301,
                master=br,
                mac=mac(7, 2),
            )
        ),
        rtnl.vxlan(VxlanSpec("vx0", vni=42, local=ip("10.0.0.1"), master=br)),
        rtnl.addr_add(br, iface("10.1.0.2/24")),
        rtnl.addr_add(br, iface("fd00::2/64")),
        rtnl.route_add(net("0.0.0.0/0"), gateway=ip("10.1.0.1")),
        rtnl.route_add(net("10.3.0.0/16"), oif=br),
        rtnl.route_add(net("fd01::/64"), gateway=ip("fd00::1")),
        rtnl.neigh_add(br, ip("10.1.0.9"), mac(7, 3)),
        rtnl.neigh_add(br, ip("fd00::9"), mac(7, 4)),
    ]
    assert_ok(nl.execute(batch))
    vx = index_of(host, "vx0")
    assert_ok(nl.execute([rtnl.fdb_add(vx, mac(7, 5), ip("10.0.0.2"), vni=7)]))

    # links
    oracle = ns_link_details(host)
    index = {name: link["ifindex"] for name, link in oracle.items()}
    dumped = [records.link_record(x) for x in nl.dump(rtnl.dump_links())]
    assert {r.name for r in dumped} == set(oracle) == {"lo", "br0", "veth0", "vx0"}
    for r in dumped:
        o = oracle[r.name]
        assert r.index == o["ifindex"]
        assert r.mac == o["address"]
        assert r.mtu == o["mtu"]
        assert r.master == (index[o["master"]] if "master" in o else None)
        assert r.up == ("UP" in o["flags"])
        assert r.kind == o.get("linkinfo", {}).get("info_kind")
        assert r.link_netnsid == o.get("link_netnsid")
        group = o["group"]
        assert r.group == (0 if group == "default" else int(group))
    veth = next(r for r in dumped if r.name == "veth0")
    assert veth.link_netnsid is not None  # the peer lives in another namespace
    vxr = next(r for r in dumped if r.name == "vx0")
    assert vxr.info_data[m.IFLA_VXLAN_ID] == oracle["vx0"]["linkinfo"]["info_data"]["id"]

    # addresses
    def addrs() -> tuple[set, set]:
        got = {
            (a.index, str(a.address.ip), a.address.network.prefixlen)
            for a in map(records.addr_record, nl.dump(rtnl.dump_addrs()))
        }
        want = {
            (index[name], a["local"], a["prefixlen"])
            for name, infos in ns_addr_info(host).items()
            for a in infos
        }
        return got, want

    got, want = converge(addrs)
    assert got == want
    assert {(br, "10.1.0.2", 24), (br, "fd00::2", 64)} <= got

    # routes, main table, per family
    for version, family in ((4, m.AF_INET), (6, m.AF_INET6)):

        def routes(version: int = version, family: int = family) -> tuple[set, set]:
            got = {
                _route_key(r)
                for r in map(records.route_record, nl.dump(rtnl.dump_routes(family)))
                if r.table == m.RT_TABLE_MAIN
            }
            want = {_ip_route_key(r, index, version) for r in ns_routes(host, version)}
            return got, want

        got, want = converge(routes)
        assert got == want, version
        if version == 4:
            assert {("0.0.0.0/0", "10.1.0.1", br), ("10.3.0.0/16", None, br)} <= got
        else:
            assert ("fd01::/64", "fd00::1", br) in got

    # neighbours (ARP and ND)
    def neighbours() -> tuple[set, set]:
        got = {
            (n.index, str(n.dst), n.lladdr, _nud(n.state))
            for n in map(records.neigh_record, nl.dump(rtnl.dump_neighbours()))
            if n.family in (m.AF_INET, m.AF_INET6)
        }
        want = {
            (index[n["dev"]], n["dst"], n.get("lladdr"), frozenset(n["state"]))
            for n in ns_neighbours(host)
        }
        return got, want

    got, want = converge(neighbours)
    assert got == want
    assert (br, "10.1.0.9", mac(7, 3), frozenset({"PERMANENT"})) in got
    assert (br, "fd00::9", mac(7, 4), frozenset({"PERMANENT"})) in got

    # the vxlan device's own FDB entries (NTF_SELF; bridge entries say "master")
    def fdb() -> tuple[set, set]:
        got = {
            (n.lladdr, str(n.dst) if n.dst else None, n.vni)
            for n in map(records.neigh_record, nl.dump(rtnl.dump_neighbours(m.AF_BRIDGE)))
            if n.index == vx and n.flags & m.NTF_SELF
        }
        want = {
            (e["mac"], e.get("dst"), e.get("vni"))
            for e in ns_fdb(host, "vx0")
            if "self" in e["flags"]
        }
        return got, want

    got, want = converge(fdb)
    assert got == want
    assert (mac(7, 5), "10.0.0.2", 7) in got


def test_dumps_in_the_session_namespace_match_pyroute2(spaces, backend) -> None:
    """The process's own namespace, judged by pyroute2 (no namespace switch needed)."""
    from pyroute2 import IPRoute

    nl = spaces.socket(None, backend)
    cont = spaces.new("c1")
    tag = f"{os.getpid() % 10000:04d}{backend[0]}"
    brname, vname = f"tpb{tag}", f"tpv{tag}"
    assert_ok(nl.execute([rtnl.bridge(brname, mtu=1400, mac=mac(8, 1))]))
    br = socket.if_nametoindex(brname)
    try:
        batch = [
            rtnl.veth(
                VethSpec(
                    vname,
                    "eth0",
                    spaces.fd(cont),
                    peer_ifindex=5,
                    ifindex=4350,
                    master=br,
                    mac=mac(8, 2),
                )
            ),
            rtnl.addr_add(br, iface("10.77.0.2/24")),
            rtnl.addr_add(br, iface("fd77::2/64")),
            rtnl.route_add(net("10.78.0.0/16"), gateway=ip("10.77.0.1")),
            rtnl.route_add(net("10.79.0.0/16"), oif=br),
            rtnl.neigh_add(br, ip("10.77.0.9"), mac(8, 3)),
            rtnl.neigh_add(br, ip("fd77::9"), mac(8, 4)),
        ]
        assert_ok(nl.execute(batch))

        def links() -> tuple[set, set]:
            got = {
                (r.index, r.name, r.mac, r.mtu, r.master, r.up)
                for r in map(records.link_record, nl.dump(rtnl.dump_links()))
            }
            with IPRoute() as ipr:
                want = {
                    (
                        p["index"],
                        p.get_attr("IFLA_IFNAME"),
                        p.get_attr("IFLA_ADDRESS"),
                        p.get_attr("IFLA_MTU"),
                        p.get_attr("IFLA_MASTER"),
                        bool(p["flags"] & m.IFF_UP),
                    )
                    for p in ipr.get_links()
                }
            return got, want

        got, want = converge(links)
        assert got == want
        mine = {(i, name, a, master, up) for i, name, a, _, master, up in got}
        assert (br, brname, mac(8, 1), None, True) in mine
        assert {(name, master) for _, name, _, master, _ in mine} >= {(vname, br)}

        def addrs() -> tuple[set, set]:
            got = {
                (a.index, str(a.address.ip), a.address.network.prefixlen)
                for a in map(records.addr_record, nl.dump(rtnl.dump_addrs()))
            }
            with IPRoute() as ipr:
                want = {
                    (
                        p["index"],
                        p.get_attr("IFA_LOCAL") or p.get_attr("IFA_ADDRESS"),
                        p["prefixlen"],
                    )
                    for p in ipr.get_addr()
                }
            return got, want

        got, want = converge(addrs)
        assert got == want
        assert {(br, "10.77.0.2", 24), (br, "fd77::2", 64)} <= got

        def routes() -> tuple[set, set]:
            got = {
                _route_key(r)
                for r in map(records.route_record, nl.dump(rtnl.dump_routes(m.AF_INET)))
                if r.table == m.RT_TABLE_MAIN
            }
            with IPRoute() as ipr:
                want = {
                    (
                        f"{p.get_attr('RTA_DST') or '0.0.0.0'}/{p['dst_len']}",
                        p.get_attr("RTA_GATEWAY"),
                        p.get_attr("RTA_OIF"),
                    )
                    for p in ipr.get_routes(family=socket.AF_INET, table=m.RT_TABLE_MAIN)
                }
            return got, want

        got, want = converge(routes)
        assert got == want
        assert {("10.78.0.0/16", "10.77.0.1", br), ("10.79.0.0/16", None, br)} <= got

        def neighbours() -> tuple[set, set]:
            got = {
                (n.index, str(n.dst), n.lladdr, n.state)
                for n in map(records.neigh_record, nl.dump(rtnl.dump_neighbours()))
                if n.dst
            }
            with IPRoute() as ipr:
                want = {
                    (p["ifindex"], p.get_attr("NDA_DST"), p.get_attr("NDA_LLADDR"), p["state"])
                    for p in ipr.get_neighbours()
                    if p["family"] in (socket.AF_INET, socket.AF_INET6)
                }
            return got, want

        got, want = converge(neighbours)
        assert got == want
        assert (br, "10.77.0.9", mac(8, 3), m.NUD_PERMANENT) in got
        assert (br, "fd77::9", mac(8, 4), m.NUD_PERMANENT) in got
    finally:
        nl.execute([rtnl.link_del(name=vname), rtnl.link_del(br)])
    names = {name for _, name in socket.if_nameindex()}
    assert brname not in names
    assert vname not in names


# --- group delete -------------------------------------------------------------------------


def test_group_delete_removes_exactly_the_group(spaces, host, nl) -> None:
    cont = spaces.new("c1")
    fd = spaces.fd(cont)
    batch = [rtnl.bridge(f"g7b{i}", group=7) for i in range(20)]
    batch += [
        rtnl.veth(VethSpec(f"g7v{i}", f"p{i}", fd, peer_ifindex=10 + i, ifindex=4400 + i, group=7))
        for i in range(5)
    ]
    batch += [rtnl.bridge(f"g8b{i}", group=8) for i in range(3)]
    batch += [rtnl.bridge(f"g0b{i}") for i in range(2)]
    batch += [rtnl.veth(VethSpec("keep0", "q0", fd, peer_ifindex=20, ifindex=4450))]
    assert_ok(nl.execute(batch))
    before = ns_links(host)
    assert sum(1 for link in before.values() if link["group"] == "7") == 25
    assert len(ns_links(cont)) == 1 + 5 + 1

    nl.request(rtnl.group_del(7))

    after = ns_links(host)
    assert set(after) == {"lo", "keep0"} | {f"g8b{i}" for i in range(3)} | {
        f"g0b{i}" for i in range(2)
    }
    for name, link in after.items():
        assert link["ifindex"] == before[name]["ifindex"]
    # The peers of the deleted veths went with them; the other pair's peer stayed.
    assert set(ns_links(cont)) == {"lo", "q0"}

    with pytest.raises(ValueError):
        rtnl.group_del(0)


# --- errors -------------------------------------------------------------------------------


def test_errors_are_mapped_to_their_requests_and_the_rest_is_applied(host, nl) -> None:
    # A route whose prefix has host bits set (rtnl.route_add always masks them).
    bad_route = rtnl.route_add(net("10.9.0.0/24"), oif=1)
    bad_route = bad_route._replace(
        attrs=[m.Attr(m.RTA_DST, m.BYTES, ip("10.9.0.1").packed), *bad_route.attrs[1:]]
    )
    batch = [
        rtnl.bridge("br0"),  # 0 ok
        rtnl.bridge("br0"),  # 1 EEXIST
        rtnl.link_set(MISSING, up=True),  # 2 ENODEV
        rtnl.vxlan(VxlanSpec("vxm", vni=5, local=ip("239.1.1.1"))),  # 3 EINVAL + extack
        rtnl.vxlan(VxlanSpec("vxe1", external=True)),  # 4 ok
        rtnl.vxlan(VxlanSpec("vxe2", external=True)),  # 5 EEXIST + extack
        bad_route,  # 6 EINVAL + extack
        rtnl.bridge("br1"),  # 7 ok
        rtnl.link_set(MISSING, mtu=1400),  # 8 ENODEV
        rtnl.addr_add(1, iface("10.8.0.1/8")),  # 9 ok (the last, ACKed request)
    ]
    result = nl.execute(batch)

    assert result.total == len(batch)
    assert not result.ok
    assert set(result.errors) == {1, 2, 3, 5, 6, 8}
    assert result.succeeded() == [0, 4, 7, 9]
    want = {
        1: errno.EEXIST,
        2: errno.ENODEV,
        3: errno.EINVAL,
        5: errno.EEXIST,
        6: errno.EINVAL,
        8: errno.ENODEV,
    }
    for i, code in want.items():
        err = result.errors[i]
        assert isinstance(err, NetlinkError)
        assert (err.errno, err.index) == (code, i), str(err)
        assert err.request is batch[i]
        assert f"(request {i})" in str(err)
        assert errno.errorcode[code] in str(err)
        assert err.message
    # The kernel's extended-ack texts, as `ip` shows them for the same refusals.
    assert result.errors[3].message == "Local address cannot be multicast"
    assert result.errors[5].message == ip_rejection(
        host, "link", "add", "vxe3", "type", "vxlan", "external", "dstport", "4789"
    )
    assert result.errors[6].message == ip_rejection(
        host, "route", "add", "10.9.0.1/24", "dev", "lo"
    )
    assert result.errors[6].message == "Invalid prefix for given prefix length"
    # No extended ack: the message is the errno's text.
    assert result.errors[1].message == os.strerror(errno.EEXIST)
    with pytest.raises(NetlinkError) as first:
        result.raise_first()
    assert first.value is result.errors[1]

    # Everything else of the batch was applied.
    links = ns_link_details(host)
    assert {"br0", "vxe1", "br1"} <= set(links)
    assert "vxm" not in links
    assert "vxe2" not in links
    assert "10.8.0.1" in {a["local"] for a in ns_addr_info(host)["lo"]}
    assert not [r for r in ns_routes(host, 4) if r["dst"].startswith("10.9.")]

    # A failure in the last (ACK-carrying) request, and one in the first.
    result = nl.execute([rtnl.bridge("br2"), rtnl.bridge("br0")])
    assert set(result.errors) == {1}
    assert result.errors[1].errno == errno.EEXIST
    result = nl.execute([rtnl.link_set(MISSING, up=True), rtnl.bridge("br3")])
    assert set(result.errors) == {0}
    assert result.errors[0].errno == errno.ENODEV
    assert {"br2", "br3"} <= set(ns_links(host))

    assert nl.execute([]).ok


def test_request_raises_netlink_error(host, nl) -> None:
    assert nl.request(rtnl.bridge("br0")) is None
    assert "br0" in ns_links(host)
    with pytest.raises(NetlinkError) as exists:
        nl.request(rtnl.bridge("br0"))
    assert (exists.value.errno, exists.value.index) == (errno.EEXIST, 0)
    with pytest.raises(NetlinkError) as missing:
        nl.request(rtnl.link_set(MISSING, up=True))
    assert (missing.value.errno, missing.value.index) == (errno.ENODEV, 0)
    with pytest.raises(NetlinkError) as bad:
        nl.request(rtnl.vxlan(VxlanSpec("vxm", vni=5, local=ip("239.1.1.1"))))
    assert bad.value.errno == errno.EINVAL
    assert bad.value.message == "Local address cannot be multicast"
    assert set(ns_links(host)) == {"lo", "br0"}


def _raw_link_dump_status(path: str, attrs: bytes) -> tuple[int, str]:
    """Oracle with no cnm code: send RTM_GETLINK|NLM_F_DUMP (extra raw attributes) in the
    namespace at `path` and return the NLMSG_DONE status and its extended-ack text."""

    def run() -> tuple[int, str]:
        with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0) as s:
            s.setsockopt(270, 11, 1)  # NETLINK_EXT_ACK
            body = struct.pack("=BxHiII", 0, 0, 0, 0, 0) + attrs
            s.send(struct.pack("=IHHII", 16 + len(body), 18, 0x301, 1, 0) + body)
            while True:
                data = s.recv(1 << 16)
                off = 0
                while off < len(data):
                    length, mtype, _, _, _ = struct.unpack_from("=IHHII", data, off)
                    if mtype == 3:  # NLMSG_DONE: errno, then the extended ack
                        (status,) = struct.unpack_from("=i", data, off + 16)
                        text = ""
                        a = off + 20
                        while a + 4 <= off + length:
                            alen, atype = struct.unpack_from("=HH", data, a)
                            if atype == 1:
                                text = data[a + 4 : a + alen].rstrip(b"\0").decode()
                            a += (alen + 3) & ~3
                        return status, text
                    if mtype == 2:
                        (status,) = struct.unpack_from("=i", data, off + 16)
                        return status, ""
                    off += (length + 3) & ~3

    return netns.run_in(path, run)


def test_dump_errors_raise(host, nl) -> None:
    # An error reply (NLMSG_ERROR) to a request sent through dump().
    get_missing = m.Message(m.RTM_GETLINK, m.NLM_F_REQUEST, 0, 0, (0, 0, MISSING, 0, 0), [])
    with pytest.raises(NetlinkError) as missing:
        nl.dump(get_missing)
    assert missing.value.errno == errno.ENODEV

    # A dump the kernel starts and then fails: the status comes in NLMSG_DONE.
    bad_nsid = struct.pack("=HHi", 8, m.IFLA_IF_NETNSID, 12345)
    status, text = _raw_link_dump_status(host, bad_nsid)
    assert status == -errno.EINVAL
    assert text
    msg = rtnl.dump_links()
    msg = msg._replace(attrs=[m.Attr(m.IFLA_IF_NETNSID, m.S32, 12345)])
    try:
        with pytest.raises(NetlinkError) as failed:
            nl.dump(msg)
        assert failed.value.errno == -status
        assert failed.value.message == text
    finally:
        # Whatever happened, the socket is still in step for the next dump.
        names = {records.link_record(x).name for x in nl.dump(rtnl.dump_links())}
        assert names == set(ns_links(host))


# --- chunking -----------------------------------------------------------------------------


def test_chunks_of_neighbours_fully_applied_and_errors_mapped(host, nl) -> None:
    total = 1500
    assert total > 2 * transport.MAX_CHUNK_MESSAGES
    br = make_bridge(nl, host)
    nl.request(rtnl.addr_add(br, iface("10.64.0.1/16")))

    def dst(i: int) -> ipaddress.IPv4Address:
        return ip(f"10.64.{1 + i // 250}.{1 + i % 250}")

    failing = {3, 600, 1100, 1499}
    batch = [
        rtnl.neigh_add(MISSING if i in failing else br, dst(i), mac(9, i >> 8, i & 0xFF))
        for i in range(total)
    ]
    counter = CountingSocket(nl._sock)
    nl._sock = counter  # type: ignore[assignment]
    try:
        result = nl.execute(batch)
    finally:
        nl._sock = counter._sock

    assert set(result.errors) == failing
    for i in failing:
        assert (result.errors[i].errno, result.errors[i].index) == (errno.ENODEV, i)
        assert result.errors[i].request is batch[i]
    assert len(result.succeeded()) == total - len(failing)

    # The chunks: at most MAX_CHUNK_MESSAGES each, in order, only the last asks for an ACK.
    sizes = []
    for buf in counter.sent:
        heads = netlink_headers(buf)
        sizes.append(len(heads))
        assert len(buf) <= transport.MAX_CHUNK_BYTES
        assert [bool(f & m.NLM_F_ACK) for _, _, f, _ in heads] == [False] * (len(heads) - 1) + [
            True
        ]
        seqs = [s for _, _, _, s in heads]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    assert sum(sizes) == total
    assert max(sizes) <= transport.MAX_CHUNK_MESSAGES
    assert len(sizes) == -(-total // transport.MAX_CHUNK_MESSAGES)

    got = {
        (n["dst"], n["lladdr"]) for n in ns_neighbours(host, "br0") if n["state"] == ["PERMANENT"]
    }
    want = {(str(dst(i)), mac(9, i >> 8, i & 0xFF)) for i in range(total) if i not in failing}
    assert got == want
    # A dump this large arrives in many parts; all of them are gathered.
    dumped = {
        (str(n.dst), n.lladdr)
        for n in map(records.neigh_record, nl.dump(rtnl.dump_neighbours(m.AF_INET)))
        if n.index == br and n.state == m.NUD_PERMANENT
    }
    assert dumped == want


def test_chunks_split_by_bytes_map_errors(host, nl) -> None:
    """Messages too big for MAX_CHUNK_MESSAGES per send are split by MAX_CHUNK_BYTES."""
    bridges = [f"br{i}" for i in range(8)]
    assert_ok(nl.execute([rtnl.bridge(name, up=False) for name in bridges]))
    index = {name: index_of(host, name) for name in bridges}
    total = 1100
    failing = {300, 777, 1099}

    def alias(i: int) -> str:
        return f"{i:04d}-" + "a" * 240

    batch = []
    for i in range(total):
        target = MISSING if i in failing else index[bridges[i % len(bridges)]]
        msg = rtnl.link_set(target)
        batch.append(msg._replace(attrs=[*msg.attrs, m.Attr(m.IFLA_IFALIAS, m.STR, alias(i))]))
    counter = CountingSocket(nl._sock)
    nl._sock = counter  # type: ignore[assignment]
    try:
        result = nl.execute(batch)
    finally:
        nl._sock = counter._sock

    assert set(result.errors) == failing
    for i in failing:
        assert (result.errors[i].errno, result.errors[i].index) == (errno.ENODEV, i)
    sizes = [len(netlink_headers(buf)) for buf in counter.sent]
    assert sum(sizes) == total
    assert all(len(buf) <= transport.MAX_CHUNK_BYTES for buf in counter.sent)
    assert len(sizes) > -(-total // transport.MAX_CHUNK_MESSAGES)  # split by bytes

    links = ns_links(host)
    for k, name in enumerate(bridges):
        last = max(i for i in range(k, total, len(bridges)) if i not in failing)
        assert links[name].get("ifalias") == alias(last), name


# --- sockets per namespace ----------------------------------------------------------------


def test_socket_for_caches_per_namespace_identity(spaces, backend) -> None:
    path = spaces.new("reused")
    first = transport.socket_for(path, backend=backend)
    try:
        assert transport.socket_for(path, backend=backend) is first
        assert socket_netns(first.fileno()) == f"net:[{os.stat(path).st_ino}]"
        assert socket_netns(first.fileno()) != os.readlink("/proc/self/ns/net")
        assert first.codec is fastpath.codec(backend)

        # The same path, a new namespace: a new socket, in the new namespace.
        netns.delete(path)
        netns.create(path)
        second = transport.socket_for(path, backend=backend)
        assert second is not first
        assert socket_netns(second.fileno()) == f"net:[{os.stat(path).st_ino}]"
        assert socket_netns(first.fileno()) != socket_netns(second.fileno())
        assert transport.socket_for(path, backend=backend) is second
        second.request(rtnl.bridge("br0"))
        assert "br0" in ns_links(path)

        # The caller's own namespace has its own socket.
        own = transport.socket_for(None, backend=backend)
        assert own is not second
        assert socket_netns(own.fileno()) == os.readlink("/proc/thread-self/ns/net")
    finally:
        transport.forget(path)
    assert first.fileno() == -1
    assert second.fileno() == -1
    third = transport.socket_for(path, backend=backend)
    try:
        assert third is not second
        assert third.fileno() >= 0
        assert socket_netns(third.fileno()) == f"net:[{os.stat(path).st_ino}]"
    finally:
        transport.forget(path)
    assert third.fileno() == -1


def test_sockets_in_other_namespaces_need_no_process(spaces, monkeypatch, backend) -> None:
    a = spaces.new("a")
    b = spaces.new("b")

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a process was started")

    with monkeypatch.context() as patch:
        patch.setattr(subprocess, "Popen", refuse)
        patch.setattr(os, "fork", refuse)
        patch.setattr(os, "posix_spawn", refuse)
        patch.setattr(os, "posix_spawnp", refuse)
        direct = spaces.socket(a, backend)
        cached = transport.socket_for(b, backend=backend)
        direct.request(rtnl.bridge("bra"))
        cached.request(rtnl.bridge("brb"))
        in_a = {records.link_record(x).name for x in direct.dump(rtnl.dump_links())}
        in_b = {records.link_record(x).name for x in cached.dump(rtnl.dump_links())}
    try:
        assert socket_netns(direct.fileno()) == f"net:[{os.stat(a).st_ino}]"
        assert socket_netns(cached.fileno()) == f"net:[{os.stat(b).st_ino}]"
        assert set(ns_links(a)) == in_a == {"lo", "bra"}
        assert set(ns_links(b)) == in_b == {"lo", "brb"}
        # The test process itself never moved.
        assert "bra" not in {name for _, name in socket.if_nameindex()}
    finally:
        transport.forget(b)
    assert cached.fileno() == -1


def test_a_peer_index_without_a_host_index_is_refused() -> None:
    # The kernel ignores a veth peer's index unless the host end's is given too.
    with pytest.raises(ValueError, match="host end"):
        rtnl.veth(VethSpec("v", "eth0", 3, peer_ifindex=5))
