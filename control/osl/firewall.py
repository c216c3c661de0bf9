"""The firewall of bridge networks: nftables, one atomic transaction per network change.

Owns the `inet cnm` table. Its base chains dispatch by interface through verdict maps,
so adding or removing a network touches only that network's own chains and map
elements:
- forward: `iifname vmap @fwd` sends traffic leaving a network's bridge to the network's
  chain: it is dropped when it heads for another cnm bridge (networks are isolated from
  each other even with forwarding on), or for anywhere at all on an internal network;
  `oifname vmap @fwd_in` drops traffic into an internal network from outside it.
- postrouting (nat): `iifname vmap @nat` masquerades (or SNATs to host_binding_ipv4) the
  network's IPv4 subnets when they leave the bridge.

Routed networks (the bridge driver's `com.cnm.bridge.datapath=routed`) have no bridge
port to key on: each container's host end is its own interface. Their host ends carry
the network's interface group instead (set in the same netlink message that makes the
veth, and dropped when a leave moves the device to the graveyard group), so the same
dispatch works on `iifgroup` / `oifgroup`: the `gfwd`, `gfwd_in` and `gnat` maps and the
`groups` set mirror `fwd`, `fwd_in`, `nat` and `bridges`. A join or leave never touches
nft; a routed network with ICC off drops forwarding from its group to its group (the
host routes between its containers), and every network drops traffic into another
network's bridge or group.

The rules are fed to `nft -j -f -` as one JSON document per network create or delete:
nft's JSON input is nftables' own stable machine interface, needs no binding to keep in
step with the kernel, and applies the whole document as one transaction. It runs at
network create and delete only, never per join. ICC (traffic between containers of one
network) is not a firewall matter here: the bridge driver isolates ports in the bridge.
"""

from __future__ import annotations

import ipaddress
import json
import shutil
import subprocess
from dataclasses import dataclass
from typing import Any

from .. import errors

TABLE = "cnm"
FAMILY = "inet"


@dataclass(frozen=True)
class NetworkRules:
    network_id: str
    bridge: str
    subnets: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
    internal: bool
    masquerade: bool
    snat_to: str | None = None
    group: int | None = None  # a routed network: its host ends' interface group
    icc: bool = True  # routed networks only (a bridge isolates its ports itself)


def _obj(kind: str, **fields: Any) -> dict[str, Any]:
    return {kind: {"family": FAMILY, "table": TABLE, **fields}}


def _meta(key: str) -> dict[str, Any]:
    return {"meta": {"key": key}}


def _match(left: Any, right: Any, op: str = "==") -> dict[str, Any]:
    return {"match": {"op": op, "left": left, "right": right}}


def _chains(net_id: str) -> dict[str, str]:
    short = net_id[:12]
    return {"fwd": f"fwd-{short}", "fwd_in": f"in-{short}", "nat": f"nat-{short}"}


def _base() -> list[dict[str, Any]]:
    """The table, its sets, maps and base chains: idempotent (the base chains are
    flushed and refilled in the same transaction)."""
    return [
        {"add": {"table": {"family": FAMILY, "name": TABLE}}},
        {"add": _obj("set", name="bridges", type="ifname")},
        {"add": _obj("map", name="fwd", type="ifname", map="verdict")},
        {"add": _obj("map", name="fwd_in", type="ifname", map="verdict")},
        {"add": _obj("map", name="nat", type="ifname", map="verdict")},
        {"add": _obj("set", name="groups", type="devgroup")},
        {"add": _obj("map", name="gfwd", type="devgroup", map="verdict")},
        {"add": _obj("map", name="gfwd_in", type="devgroup", map="verdict")},
        {"add": _obj("map", name="gnat", type="devgroup", map="verdict")},
        {
            "add": _obj(
                "chain", name="forward", type="filter", hook="forward", prio=0, policy="accept"
            )
        },
        {
            "add": _obj(
                "chain",
                name="postrouting",
                type="nat",
                hook="postrouting",
                prio=100,
                policy="accept",
            )
        },
        {"flush": _obj("chain", name="forward")},
        {"flush": _obj("chain", name="postrouting")},
        {
            "add": _obj(
                "rule", chain="forward", expr=[{"vmap": {"key": _meta("iifname"), "data": "@fwd"}}]
            )
        },
        {
            "add": _obj(
                "rule",
                chain="forward",
                expr=[{"vmap": {"key": _meta("oifname"), "data": "@fwd_in"}}],
            )
        },
        {
            "add": _obj(
                "rule",
                chain="postrouting",
                expr=[{"vmap": {"key": _meta("iifname"), "data": "@nat"}}],
            )
        },
        *(
            {"add": _obj("rule", chain=chain, expr=[{"vmap": {"key": _meta(key), "data": data}}])}
            for chain, key, data in (
                ("forward", "iifgroup", "@gfwd"),
                ("forward", "oifgroup", "@gfwd_in"),
                ("postrouting", "iifgroup", "@gnat"),
            )
        ),
    ]


def _routed(rules: NetworkRules) -> list[dict[str, Any]]:
    """A routed network's chains, keyed on its interface group (see the module doc)."""
    assert rules.group is not None
    chains = _chains(rules.network_id)
    g = rules.group
    own = _match(_meta("oifgroup"), g)
    not_own = _match(_meta("oifgroup"), g, "!=")
    fwd: list[list[dict[str, Any]]] = []
    if rules.internal:
        fwd.append([not_own, {"drop": None}])
    else:
        fwd.append([_match(_meta("oifname"), "@bridges"), {"drop": None}])
        fwd.append([not_own, _match(_meta("oifgroup"), "@groups"), {"drop": None}])
    if not rules.icc:
        fwd.append([own, {"drop": None}])
    cmds: list[dict[str, Any]] = [
        {"add": _obj("chain", name=chains["fwd"])},
        {"flush": _obj("chain", name=chains["fwd"])},
        {"add": _obj("element", name="groups", elem=[g])},
        *({"add": _obj("rule", chain=chains["fwd"], expr=expr)} for expr in fwd),
        {"add": _obj("element", name="gfwd", elem=[[g, {"jump": {"target": chains["fwd"]}}]])},
    ]
    if rules.internal:
        cmds += [
            {"add": _obj("chain", name=chains["fwd_in"])},
            {"flush": _obj("chain", name=chains["fwd_in"])},
            {
                "add": _obj(
                    "rule",
                    chain=chains["fwd_in"],
                    expr=[_match(_meta("iifgroup"), g, "!="), {"drop": None}],
                )
            },
            {
                "add": _obj(
                    "element", name="gfwd_in", elem=[[g, {"jump": {"target": chains["fwd_in"]}}]]
                )
            },
        ]
    v4 = [s for s in rules.subnets if s.version == 4]
    if rules.masquerade and v4:
        action: dict[str, Any] = (
            {"snat": {"family": "ip", "addr": rules.snat_to}}
            if rules.snat_to
            else {"masquerade": None}
        )
        cmds += [
            {"add": _obj("chain", name=chains["nat"])},
            {"flush": _obj("chain", name=chains["nat"])},
        ]
        for subnet in v4:
            prefix = {"prefix": {"addr": str(subnet.network_address), "len": subnet.prefixlen}}
            cmds.append(
                {
                    "add": _obj(
                        "rule",
                        chain=chains["nat"],
                        expr=[
                            not_own,
                            _match({"payload": {"protocol": "ip", "field": "saddr"}}, prefix),
                            action,
                        ],
                    )
                }
            )
        cmds.append(
            {"add": _obj("element", name="gnat", elem=[[g, {"jump": {"target": chains["nat"]}}]])}
        )
    return cmds


def _network(rules: NetworkRules) -> list[dict[str, Any]]:
    chains = _chains(rules.network_id)
    br = rules.bridge
    cmds: list[dict[str, Any]] = [
        {"add": _obj("chain", name=chains["fwd"])},
        {"flush": _obj("chain", name=chains["fwd"])},
        {"add": _obj("element", name="bridges", elem=[br])},
    ]
    if rules.internal:
        cmds += [
            {
                "add": _obj(
                    "rule",
                    chain=chains["fwd"],
                    expr=[_match(_meta("oifname"), br, "!="), {"drop": None}],
                )
            },
            {"add": _obj("chain", name=chains["fwd_in"])},
            {"flush": _obj("chain", name=chains["fwd_in"])},
            {
                "add": _obj(
                    "rule",
                    chain=chains["fwd_in"],
                    expr=[_match(_meta("iifname"), br, "!="), {"drop": None}],
                )
            },
            {
                "add": _obj(
                    "element", name="fwd_in", elem=[[br, {"jump": {"target": chains["fwd_in"]}}]]
                )
            },
        ]
    else:
        cmds.append(
            {
                "add": _obj(
                    "rule",
                    chain=chains["fwd"],
                    expr=[
                        _match(_meta("oifname"), br, "!="),
                        _match(_meta("oifname"), "@bridges"),
                        {"drop": None},
                    ],
                )
            }
        )
        cmds.append(
            {
                "add": _obj(
                    "rule",
                    chain=chains["fwd"],
                    expr=[_match(_meta("oifgroup"), "@groups"), {"drop": None}],
                )
            }
        )
    cmds.append(
        {"add": _obj("element", name="fwd", elem=[[br, {"jump": {"target": chains["fwd"]}}]])}
    )
    v4 = [s for s in rules.subnets if s.version == 4]
    if rules.masquerade and v4:
        cmds += [
            {"add": _obj("chain", name=chains["nat"])},
            {"flush": _obj("chain", name=chains["nat"])},
        ]
        action: dict[str, Any] = (
            {"snat": {"family": "ip", "addr": rules.snat_to}}
            if rules.snat_to
            else {"masquerade": None}
        )
        for subnet in v4:
            cmds.append(
                {
                    "add": _obj(
                        "rule",
                        chain=chains["nat"],
                        expr=[
                            _match(_meta("oifname"), br, "!="),
                            _match(
                                {"payload": {"protocol": "ip", "field": "saddr"}},
                                {
                                    "prefix": {
                                        "addr": str(subnet.network_address),
                                        "len": subnet.prefixlen,
                                    }
                                },
                            ),
                            action,
                        ],
                    )
                }
            )
        cmds.append(
            {"add": _obj("element", name="nat", elem=[[br, {"jump": {"target": chains["nat"]}}]])}
        )
    return cmds


class Firewall:
    """Programs the `inet cnm` table with `nft -j -f -` (one process per transaction)."""

    def __init__(self, nft: str | None = None) -> None:
        self._nft = nft

    @property
    def nft(self) -> str:
        path = self._nft or shutil.which("nft") or shutil.which("nft", path="/usr/sbin:/sbin")
        if path is None:
            raise errors.Unavailable(
                "nft (Debian package nftables) is needed for bridge networks' firewall rules"
            )
        return path

    def _apply(self, cmds: list[dict[str, Any]], what: str) -> None:
        doc = json.dumps({"nftables": [{"metainfo": {"json_schema_version": 1}}, *cmds]})
        proc = subprocess.run(
            [self.nft, "-j", "-f", "-"], input=doc, capture_output=True, text=True, check=False
        )
        if proc.returncode != 0:
            raise errors.KernelError(
                0, f"nft: {proc.stderr.strip() or proc.stdout.strip()}", operation=what
            )

    def ruleset(self) -> dict[str, Any]:
        """The cnm table as nft lists it (empty when absent)."""
        proc = subprocess.run(
            [self.nft, "-j", "list", "table", FAMILY, TABLE],
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            return {"nftables": []}
        return json.loads(proc.stdout)

    def add_network(self, rules: NetworkRules) -> None:
        body = _routed(rules) if rules.group is not None else _network(rules)
        self._apply(_base() + body, f"add firewall rules of {rules.bridge}")

    def remove_network(self, network_id: str) -> None:
        """Remove a network's chains and map elements (what exists of them) atomically."""
        existing = self.ruleset()["nftables"]
        chains = _chains(network_id)
        names = {c["chain"]["name"] for c in existing if "chain" in c}
        jumps = {v: k for k, v in chains.items()}
        cmds: list[dict[str, Any]] = []
        bridge = None
        group = None
        for item in existing:
            m = item.get("map")
            for elem in (m or {}).get("elem", []) if m else []:
                key, verdict = elem
                target = (verdict.get("jump") or {}).get("target")
                if target in jumps:
                    if m["name"].startswith("g"):
                        group = key
                    else:
                        bridge = key
                    cmds.append({"delete": _obj("element", name=m["name"], elem=[key])})
        if bridge is not None:
            cmds.append({"delete": _obj("element", name="bridges", elem=[bridge])})
        if group is not None:
            cmds.append({"delete": _obj("element", name="groups", elem=[group])})
        for chain in chains.values():
            if chain in names:
                cmds += [
                    {"flush": _obj("chain", name=chain)},
                    {"delete": _obj("chain", name=chain)},
                ]
        members: list[Any] = []
        for item in existing:
            if item.get("set", {}).get("name") in ("bridges", "groups"):
                members += item["set"].get("elem", [])
        mine = [k for k in (bridge, group) if k is not None]
        if existing and (not members or sorted(members, key=str) == sorted(mine, key=str)):
            # The last network: the whole table goes, leaving nothing of cnm behind.
            cmds = [{"delete": {"table": {"family": FAMILY, "name": TABLE}}}]
        if cmds:
            self._apply(cmds, f"remove firewall rules of network {network_id[:12]}")
