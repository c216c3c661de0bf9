"""fastpath.attach against the kernel: a join's two batches, with both codecs.

The host end's batch (veth pair, peer straight into the container's namespace, host end
up on its bridge with its group and queues, hairpin / isolated port) and the container
end's (MTU, addresses, up with its MAC, default and static routes) leave what `ip -d -j`
and `bridge -j` report from outside cnm; a refused request is named with its index and
its request, as `NetlinkSocket.execute` names it.
"""

from __future__ import annotations

import errno
import ipaddress
import os
from collections.abc import Iterator

import pytest

from cnm.fastpath import attach, netns, records, rtnl, transport
from cnm.fastpath import messages as m
from cnm.fastpath.transport import NetlinkSocket

from .oracles import bridge_ports, ns_addr_info, ns_link_details, ns_routes

pytestmark = [pytest.mark.privileged, pytest.mark.usefixtures("_unmount_leftovers")]

GROUP = 0x636E6D7E


@pytest.fixture
def rig(tmp_path, backend: str) -> Iterator[tuple[str, str, NetlinkSocket, NetlinkSocket, int]]:
    """A host namespace with a bridge (up) and a container namespace; sockets in each
    with the codec under test; the bridge's index."""
    base = tmp_path / "ns"
    base.mkdir()
    host, box = str(base / "host"), str(base / "box")
    netns.create(host)
    netns.create(box)
    hs, bs = NetlinkSocket(host, backend=backend), NetlinkSocket(box, backend=backend)
    try:
        hs.request(rtnl.bridge("br0"))
        bridge = records.link_record(hs.get(rtnl.link_get("br0"))).index
        yield host, box, hs, bs, bridge
    finally:
        hs.close()
        bs.close()
        for p in (box, host):
            transport.forget(p)
            netns.delete(p)


def _host_end(rig, end: attach.HostEnd) -> transport.BatchResult:
    _, box, hs, _, _ = rig
    fd = os.open(box, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return attach.add_host_end(hs, end, fd)
    finally:
        os.close(fd)


def test_host_end_is_made_as_asked(rig) -> None:
    host, box, _, _, bridge = rig
    end = attach.HostEnd(
        "vh0", "eth0", master=bridge, mtu=1400, group=GROUP, queues=1, hairpin=True
    )
    assert _host_end(rig, end).ok
    here = ns_link_details(host)["vh0"]
    assert here["master"] == "br0"
    assert "UP" in here["flags"]
    assert (here["mtu"], str(here["group"])) == (1400, str(GROUP))
    assert (here["num_tx_queues"], here["num_rx_queues"]) == (1, 1)
    port = bridge_ports(host)["vh0"]
    assert port["hairpin"] is True
    assert port.get("isolated", False) is False
    peer = ns_link_details(box)["eth0"]
    assert peer["mtu"] == 1400
    assert (peer["num_tx_queues"], peer["num_rx_queues"]) == (1, 1)
    assert "UP" not in peer["flags"]


def test_isolated_port_without_hairpin(rig) -> None:
    host, _, _, _, bridge = rig
    assert _host_end(rig, attach.HostEnd("vh1", "eth0", master=bridge, isolated=True)).ok
    port = bridge_ports(host)["vh1"]
    assert port["isolated"] is True
    assert port["hairpin"] is False


def test_a_refused_host_end_is_named_with_its_request(rig) -> None:
    _, _, hs, _, bridge = rig
    assert _host_end(rig, attach.HostEnd("vh2", "eth0", master=bridge, hairpin=True)).ok
    again = _host_end(rig, attach.HostEnd("vh2", "eth1", master=bridge, hairpin=True))
    assert set(again.errors) == {0}
    err = again.errors[0]
    assert (err.errno, err.index) == (errno.EEXIST, 0)
    assert err.request is not None and err.request.type == m.RTM_NEWLINK
    assert records.link_record(hs.get(rtnl.link_get("vh2"))).master == bridge


def test_container_end_is_configured_as_asked(rig) -> None:
    _, box, _, bs, bridge = rig
    assert _host_end(rig, attach.HostEnd("vh3", "eth0", master=bridge)).ok
    v4 = ipaddress.ip_interface("10.77.0.5/24")
    v6 = ipaddress.ip_interface("fd00:77::5/64")
    cfg = attach.LinkConfig(
        index=bs.ifindex("eth0"),
        mtu=1380,
        addresses=(v4, v6),
        mac="02:42:0a:4d:00:05",
        routes=(
            *attach.default_routes(ipaddress.ip_address("10.77.0.1"), None),
            (ipaddress.ip_network("10.78.0.0/16"), ipaddress.ip_address("10.77.0.9")),
        ),
    )
    assert attach.configure_link(bs, cfg).ok
    link = ns_link_details(box)["eth0"]
    assert (link["mtu"], link["address"]) == (1380, "02:42:0a:4d:00:05")
    assert "UP" in link["flags"]
    addrs = {(a["local"], a["prefixlen"]) for a in ns_addr_info(box)["eth0"]}
    assert {("10.77.0.5", 24), ("fd00:77::5", 64)} <= addrs
    v4_info = next(a for a in ns_addr_info(box)["eth0"] if a["local"] == "10.77.0.5")
    assert v4_info["broadcast"] == "10.77.0.255"
    routes = {(r["dst"], r.get("gateway")) for r in ns_routes(box)}
    assert ("default", "10.77.0.1") in routes
    assert ("10.78.0.0/16", "10.77.0.9") in routes


def test_a_refused_container_request_is_named_with_its_index(rig) -> None:
    _, box, _, bs, bridge = rig
    assert _host_end(rig, attach.HostEnd("vh4", "eth0", master=bridge)).ok
    index = bs.ifindex("eth0")
    addr = ipaddress.ip_interface("10.79.0.5/24")
    # The gateway is on no subnet of the link: the route (request 2) is refused, the
    # address and the link going up are applied.
    cfg = attach.LinkConfig(
        index=index,
        addresses=(addr,),
        routes=attach.default_routes(ipaddress.ip_address("10.80.0.1"), None),
    )
    result = attach.configure_link(bs, cfg)
    assert set(result.errors) == {2}
    err = result.errors[2]
    assert err.errno == errno.ENETUNREACH
    assert err.request is not None and err.request.type == m.RTM_NEWROUTE
    assert "UP" in ns_link_details(box)["eth0"]["flags"]
    assert any(a["local"] == "10.79.0.5" for a in ns_addr_info(box)["eth0"])
