"""The harness keeps the host untouched: proven against the host's own namespace."""

from __future__ import annotations

import os
import subprocess

import pytest

from cnm.fastpath import netns

pytestmark = pytest.mark.privileged


def test_devices_and_sandboxes_stay_off_the_host(isolated_host, ctl) -> None:
    assert isolated_host is not None
    # A device made by a test exists in the session's namespace...
    subprocess.run(
        ["ip", "link", "add", "cnmtest0", "type", "veth", "peer", "name", "cnmtest1"], check=True
    )
    try:
        assert "cnmtest0" in netns.link_names()
        net = ctl.create_network("iso", driver="null")
        ep = net.create_endpoint("e1")
        key = ep.join("c-iso")
        assert netns.is_netns(key)
        # ...and never on the host, whose link list is exactly what it was.
        assert isolated_host.current_host_links() == isolated_host.host_links
        assert "cnmtest0" not in isolated_host.current_host_links()
        ep.delete(force=True)
        net.delete()
    finally:
        subprocess.run(["ip", "link", "del", "cnmtest0"], check=True)


def test_run_is_private(isolated_host) -> None:
    # /run is the session's own tmpfs: a file written there is not in the host's /run,
    # which PID 1 (in the host's mount namespace) still sees.
    path = "/run/cnm-isolation-probe"
    with open(path, "w") as f:
        f.write("x")
    try:
        assert os.path.exists(path)
        assert not os.path.exists(f"/proc/1/root{path}")
    finally:
        os.unlink(path)
