"""osl.tunnel on its own (no etcd, no controller): the host's tunnel namespace, its VXLAN
device and pins, and reconcile's clean-up of a tunnel namespace no network holds, as a
crash between forgetting the last network and the teardown leaves it."""

from __future__ import annotations

import ipaddress
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from cnm.control.osl.overlay import OverlaySpec
from cnm.control.osl.tunnel import TunnelLinks
from cnm.fastpath import netns
from tests.bpf_gate import require_bpf
from tests.kernel.oracles import ns_link_details

pytestmark = pytest.mark.privileged

PORT = 4799  # not the default: the session's namespace may hold 4789 elsewhere


@pytest.fixture
def links(tmp_path: Path) -> Iterator[TunnelLinks]:
    require_bpf(("cnm_tunnel",))
    pin_root = f"/sys/fs/bpf/cnm-test-{uuid.uuid4().hex[:8]}"
    t = TunnelLinks(str(tmp_path / "run"), pin_root)
    yield t
    for nid in t.networks():
        t.remove(nid)
    t.prune()
    if os.path.isdir(pin_root):
        os.rmdir(pin_root)


def _spec(n: int) -> OverlaySpec:
    return OverlaySpec(
        network_id=f"{n}" * 64,
        vni=7000 + n,
        port=PORT,
        vtep=ipaddress.ip_address("198.18.0.1"),
        mtu=1450,
    )


def test_a_namespace_no_network_holds_is_pruned(links: TunnelLinks) -> None:
    first, second = _spec(1), _spec(2)
    dev = links.create(first)
    assert links.create(second).vxlan == dev.vxlan  # one device per port, shared
    assert links.networks() == sorted([first.network_id, second.network_id])
    info = ns_link_details(links.key)[f"vxt{PORT}"]["linkinfo"]["info_data"]
    assert info.get("external") is True and info["port"] == PORT
    pins = os.path.join(links.pin_root, f"tunnel-{PORT}", "cnm_tunnel")
    assert os.path.isdir(pins)
    assert links.prune() == []  # networks still hold it

    # A crash after the last markers went, before the teardown: a new process finds the
    # namespace and the pins, and no network.
    for nid in links.networks():
        os.unlink(os.path.join(links.marks, nid))
    fresh = TunnelLinks(os.path.dirname(links.dir), links.pin_root)
    assert fresh.prune() == [("tunnel_namespace_removed", links.key)]
    assert not netns.is_netns(links.key)
    assert not os.path.exists(pins)
    assert fresh.prune() == []


def test_the_last_network_takes_the_tunnel_away(links: TunnelLinks) -> None:
    spec = _spec(3)
    for _ in range(3):  # made again at once each time: the port is free
        links.create(spec)
        links.remove(spec.network_id)
        assert not netns.is_netns(links.key)
        assert not os.path.exists(os.path.join(links.pin_root, f"tunnel-{PORT}"))
        assert links.networks() == []


def test_a_network_made_again_at_once_gets_its_port_and_vni(tmp_path: Path) -> None:
    """Delete then make again at once (no wait for the kernel's namespace clean-up): the
    VXLAN devices go by themselves first, so their sockets do not refuse the next one."""
    from cnm.control.osl.overlay import OverlayLinks

    kernel = OverlayLinks(str(tmp_path / "run-kernel"))
    spec = _spec(5)
    for _ in range(3):
        kernel.create(spec)
        kernel.remove(spec.network_id)
    assert kernel.networks() == []
