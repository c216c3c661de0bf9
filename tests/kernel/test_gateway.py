"""One gateway endpoint per sandbox: the first joined that offers one; it moves on leave."""

from __future__ import annotations

import json
import subprocess

import pytest

pytestmark = pytest.mark.privileged


def _default_routes(key: str) -> list[dict]:
    out = subprocess.run(
        ["nsenter", f"--net={key}", "ip", "-j", "route", "show", "default"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return json.loads(out)


def test_the_default_route_moves_when_the_gateway_endpoint_leaves(ctl) -> None:
    n1 = ctl.create_network("n1", driver="bridge")
    n2 = ctl.create_network("n2", driver="bridge")
    a, b = n1.create_endpoint("a"), n2.create_endpoint("b")
    key = a.join("c1")
    assert b.join("c1") == key
    routes = _default_routes(key)
    assert [(r["dev"], r["gateway"]) for r in routes] == [("eth0", str(n1.gateways[0].ip))]
    a.leave("c1")
    routes = _default_routes(key)
    assert [(r["dev"], r["gateway"]) for r in routes] == [("eth1", str(n2.gateways[0].ip))]
    assert b.refresh().record.driver_data["gateway"] is True
    b.leave("c1")
    a.delete()
    b.delete()
    n1.delete()
    n2.delete()
