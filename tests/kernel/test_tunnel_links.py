"""osl.tunnel on its own (no etcd, no controller): the host's tunnel namespace, its VXLAN
device and pins, and reconcile's clean-up of a tunnel namespace no network holds, as a
crash between forgetting the last network and the teardown leaves it; the RX
accelerator's life (made with the tunnel when a device holds the VTEP address, repaired
by sync_peers, removed with the last network)."""

from __future__ import annotations

import ipaddress
import os
import socket
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from cnm.control.osl.overlay import OverlaySpec
from cnm.control.osl.tunnel import TunnelLinks, uplink_names
from cnm.fastpath import netns
from tests.bpf_gate import require_bpf, tc_program_name
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


# --- the RX accelerator -----------------------------------------------------------------

ACCEL_VTEP = "198.19.99.1"  # held by the test's own device (session namespace only)


@pytest.fixture
def vtep_device() -> Iterator[tuple[str, int]]:
    """A device holding ACCEL_VTEP (a bridge: no dummy module everywhere), standing in for
    the host's underlay device."""
    name = f"cnmdu{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "link", "add", name, "type", "bridge"], check=True)
    try:
        subprocess.run(["ip", "addr", "add", f"{ACCEL_VTEP}/32", "dev", name], check=True)
        subprocess.run(["ip", "link", "set", name, "up"], check=True)
        yield name, socket.if_nametoindex(name)
    finally:
        subprocess.run(["ip", "link", "del", name], check=False)


def _accel_spec(n: int) -> OverlaySpec:
    return OverlaySpec(
        network_id=f"{n}" * 64,
        vni=7100 + n,
        port=PORT,
        vtep=ipaddress.ip_address(ACCEL_VTEP),
        mtu=1450,
    )


def _host_link(name: str) -> int:
    try:
        return socket.if_nametoindex(name)
    except OSError:
        return 0


def test_the_accelerator_is_made_repaired_and_removed(
    links: TunnelLinks, vtep_device: tuple[str, int]
) -> None:
    from cnm.ebpf import loader

    name, device = vtep_device
    spec = _accel_spec(1)
    dev = links.create(spec)
    host_end, tunnel_end = uplink_names(PORT)
    up = _host_link(host_end)
    assert up, "no uplink pair in the host namespace"
    tunnel = ns_link_details(links.key)
    assert "UP" in tunnel[tunnel_end]["flags"]
    assert tc_program_name(tunnel[tunnel_end]["ifindex"], links.key) == "cnm_tunnel_upli"
    assert tc_program_name(device) == "cnm_tunnel_deca"
    owner = links._owners[PORT]
    config = owner.uplink()
    assert config is not None
    assert (str(config.vtep), config.uplink, config.device) == (ACCEL_VTEP, up, device)
    assert links.sync_peers(dev, []) == []  # nothing to repair

    # Behind the controller's back: the program off the device, the uplink program off
    # the tunnel end; then the pair deleted. sync_peers (reconcile) puts all back.
    assert loader.tc_detach(device)
    assert loader.tc_detach(tunnel[tunnel_end]["ifindex"], netns=links.key)
    fixes = links.sync_peers(dev, [])
    assert ("tunnel_program_reattached", name) in fixes
    assert ("tunnel_program_reattached", tunnel_end) in fixes
    assert owner.decap_attached(device)
    subprocess.run(["ip", "link", "del", host_end], check=True)
    assert tunnel_end not in ns_link_details(links.key)  # the pair went whole
    assert links.sync_peers(dev, []) == [("tunnel_uplink_made", host_end)]
    config = owner.uplink()
    assert config is not None and config.uplink == _host_link(host_end) != 0
    assert tc_program_name(ns_link_details(links.key)[tunnel_end]["ifindex"], links.key)
    assert links.sync_peers(dev, []) == []

    # A second network on the port shares the accelerator; the last one takes it away.
    second = _accel_spec(2)
    links.create(second)
    assert _host_link(host_end) == config.uplink
    links.remove(spec.network_id)
    assert owner.decap_attached(device)
    links.remove(second.network_id)
    assert not _host_link(host_end)
    for direction in ("ingress", "egress"):
        assert loader.tc_query(device, direction) is None


def test_a_new_process_takes_a_left_accelerator_away(
    links: TunnelLinks, vtep_device: tuple[str, int]
) -> None:
    """A crash after the last marker went: a new process (nothing loaded) prunes the
    namespace, and the accelerator with it, from the pins."""
    from cnm.ebpf import loader

    _, device = vtep_device
    spec = _accel_spec(3)
    links.create(spec)
    assert _host_link(uplink_names(PORT)[0])
    os.unlink(os.path.join(links.marks, spec.network_id))
    fresh = TunnelLinks(os.path.dirname(links.dir), links.pin_root)
    assert fresh.prune() == [("tunnel_namespace_removed", links.key)]
    assert not _host_link(uplink_names(PORT)[0])
    assert loader.tc_query(device) is None


def test_no_device_holds_the_vtep_no_accelerator(links: TunnelLinks) -> None:
    """198.18.0.1 is on no device here: the tunnel works without the accelerator."""
    dev = links.create(_spec(4))
    assert not _host_link(uplink_names(PORT)[0])
    assert uplink_names(PORT)[1] not in ns_link_details(links.key)
    assert links._owners[PORT].uplink() is None
    assert links.sync_peers(dev, []) == []
