"""Overlay networks with a 3-member etcd cluster (issue 6): failover between the
endpoints of `store="etcd://m1,m2,m3/prefix"`. Its own module, since its rig (its own
underlay and etcd cluster) cannot live beside test_overlay.py's module-wide rig.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.overlay_rig import Rig, etcd_available, wait_for
from tests.e2e.test_overlay import _fdb, _join
from tests.kernel.oracles import ns_ping

pytestmark = [
    pytest.mark.privileged,
    pytest.mark.skipif(not etcd_available(), reason="etcd-server is not installed"),
]


def test_failover_to_another_etcd_member(tmp_path: Path) -> None:
    """A 3-member etcd cluster, `store=etcd://m1,m2,m3/...`: the member the hosts talk to
    is stopped; they move to another member, and joins on one host are still programmed
    on the other (and the other keeps joining)."""
    import time

    t0 = time.monotonic()
    rig = Rig(tmp_path, hosts=2, etcd_members=3, env={"CNM_ETCD_LIVENESS": "1"}).start()
    try:
        h1, h2 = rig.host(1), rig.host(2)
        assert rig.store.count(",") == 2
        h1.call("create_network", name="fo")
        k1, e1 = _join(rig, 1, "fo", "fo-e1")
        k2, e2 = _join(rig, 2, "fo", "fo-e2")
        assert wait_for(lambda: ns_ping(k2, e1["ip"]), 10)
        talking = h2.call("etcd_endpoint")
        k = next(j for j in (1, 2, 3) if talking == f"{rig.etcd_addr(j)}:2379")
        rig.stop_etcd(k)
        _, late = _join(rig, 1, "fo", "fo-late")  # made while that member is down
        assert wait_for(lambda: (late["mac"], rig.vtep(1)) in _fdb(rig, 2, "fo"), 20)
        assert h2.call("etcd_endpoint") != talking and h2.call("status")["connected"]
        k2b, _ = _join(rig, 2, "fo", "fo-e2b")  # host 2 still allocates and publishes
        assert wait_for(lambda: ns_ping(k2b, late["ip"]), 10)
        assert ns_ping(k1, e2["ip"])
    finally:
        rig.close()
    print(f"\nfailover test: {time.monotonic() - t0:.1f} s")
