"""NetlinkSocket.execute_neighbours against the kernel: NeighBatch requests chunked and
ACKed as `execute` does, every failure mapped back to its request, everything else
applied. Judged with `bridge -j fdb` / `ip -j neigh` inside the test's own namespace."""

from __future__ import annotations

import errno
import ipaddress

import pytest

from cnm.fastpath import rtnl, transport
from cnm.fastpath.rtnl import VxlanSpec

from .oracles import ns_fdb, ns_links, ns_neighbours

# Fixtures shared with the transport tests (both codecs, a fresh namespace, its socket).
from .test_transport import host, nl, spaces  # noqa: F401

pytestmark = [pytest.mark.privileged, pytest.mark.usefixtures("_unmount_leftovers")]


def _peer(i: int) -> tuple[str, ipaddress.IPv4Address, ipaddress.IPv4Address]:
    mac = f"02:42:0b:00:{i >> 8 & 255:02x}:{i & 255:02x}"
    return mac, ipaddress.ip_address(0x0A900002 + i), ipaddress.ip_address(0xC6130001 + i % 200)


def _permanent(path: str) -> list[dict]:
    return [e for e in ns_neighbours(path, "vx0") if "PERMANENT" in e.get("state", [])]


def test_batches_applied_and_errors_mapped(host, nl) -> None:  # noqa: F811
    nl.request(
        rtnl.vxlan(VxlanSpec("vx0", vni=77, local=ipaddress.ip_address("198.18.9.1"), up=True))
    )
    vx = ns_links(host)["vx0"]["ifindex"]
    total = 1200
    assert total > 2 * transport.MAX_CHUNK_MESSAGES
    peers = [_peer(i) for i in range(total)]
    add = [
        rtnl.NeighBatch("fdb_add", vx, [(mac, vtep) for mac, _, vtep in peers]),
        rtnl.NeighBatch("neigh_add", vx, [(mac, ip) for mac, ip, _ in peers]),
    ]
    result = nl.execute_neighbours(add)
    assert result.ok and result.total == 2 * total, {i: str(e) for i, e in result.errors.items()}
    fdb = {(e["mac"], e["dst"]) for e in ns_fdb(host, "vx0") if "dst" in e}
    assert fdb == {(mac, str(vtep)) for mac, _, vtep in peers}
    neigh = {(e["dst"], e["lladdr"]) for e in _permanent(host)}
    assert neigh == {(str(ip), mac) for mac, ip, _ in peers}

    # Deleting: a few entries were never there (ENOENT), at known places in both batches.
    missing = {5, 700, 1199}
    gone = [(mac, ip) for mac, ip, _ in peers]
    for i in missing:
        gone[i] = ("02:42:0c:00:00:01", ipaddress.ip_address(0x0AA00000 + i))
    dels = [
        rtnl.NeighBatch("neigh_del", vx, [(None, ip) for _, ip in gone]),
        rtnl.NeighBatch("fdb_del", vx, [(mac, vtep) for mac, _, vtep in peers[:100]]),
    ]
    result = nl.execute_neighbours(dels)
    assert set(result.errors) == missing
    for i in missing:
        err = result.errors[i]
        assert err.errno == errno.ENOENT and err.index == i
        assert err.request == rtnl.neigh_del(vx, gone[i][1])
    left = {(e["dst"], e["lladdr"]) for e in _permanent(host)}
    assert left == {(str(peers[i][1]), peers[i][0]) for i in missing}  # not asked to go
    fdb = {(e["mac"], e["dst"]) for e in ns_fdb(host, "vx0") if "dst" in e}
    assert fdb == {(mac, str(vtep)) for mac, _, vtep in peers[100:]}
