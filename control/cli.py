"""The `cnm` command line (spec/api.md, "Command line").

Owns argument parsing, output formatting (tables, or JSON with --json) and exit codes:
0 success, 1 user error (one line on stderr, no traceback), 2 usage.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from . import errors
from .controller import NetworkController
from .types import IPAMConfig


class _UsageError(Exception):
    pass


def _kv(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def _parser() -> argparse.ArgumentParser:
    # --json is accepted before or after the command; SUPPRESS keeps the global value.
    leaf = argparse.ArgumentParser(add_help=False)
    leaf.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output"
    )
    p = argparse.ArgumentParser(prog="cnm", description="Container Network Model for Linux hosts")
    p.add_argument("--state-dir", default=os.environ.get("CNM_STATE_DIR", "/var/lib/cnm"))
    p.add_argument("--run-dir", default=os.environ.get("CNM_RUN_DIR", "/run/cnm"))
    p.add_argument(
        "--fastpath",
        choices=("auto", "native", "python"),
        default=os.environ.get("CNM_FASTPATH", "auto"),
    )
    p.add_argument(
        "--ebpf",
        choices=("auto", "on", "off"),
        default=os.environ.get("CNM_EBPF", "auto"),
        help="the optional eBPF data path (same-host redirect, overlay tunnel)",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    net = sub.add_parser("network", parents=[leaf], help="manage networks").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    c = net.add_parser("create", parents=[leaf], help="create a network")
    c.add_argument("--driver", "-d", default="bridge")
    c.add_argument("--subnet", action="append", default=[], help="CIDR (IPv4 or IPv6; repeatable)")
    c.add_argument(
        "--gateway", action="append", default=[], help="gateway of the subnet holding it"
    )
    c.add_argument("--ip-range", action="append", default=[], help="allocate from this sub-range")
    c.add_argument("--aux-address", action="append", default=[], type=_kv, metavar="NAME=IP")
    c.add_argument("--ipv6", action="store_true", help="enable IPv6")
    c.add_argument("--internal", action="store_true")
    c.add_argument("--ipam-driver", default="default")
    c.add_argument("--ipam-opt", action="append", default=[], type=_kv, metavar="KEY=VALUE")
    c.add_argument("-o", "--opt", action="append", default=[], type=_kv, metavar="KEY=VALUE")
    c.add_argument("--label", action="append", default=[], type=_kv, metavar="KEY=VALUE")
    c.add_argument("name")
    net.add_parser("ls", parents=[leaf], help="list networks")
    net.add_parser("inspect", parents=[leaf], help="show a network").add_argument("name")
    net.add_parser("rm", parents=[leaf], help="delete a network").add_argument("name")

    ep = sub.add_parser("endpoint", parents=[leaf], help="manage endpoints").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    c = ep.add_parser("create", parents=[leaf], help="create an endpoint")
    c.add_argument("--ip", help="static IPv4 address")
    c.add_argument("--ip6", help="static IPv6 address")
    c.add_argument("--mac", help="MAC address")
    c.add_argument("-o", "--opt", action="append", default=[], type=_kv, metavar="KEY=VALUE")
    c.add_argument("network")
    c.add_argument("name")
    ls = ep.add_parser("ls", parents=[leaf], help="list endpoints")
    ls.add_argument("network", nargs="?")
    i = ep.add_parser("inspect", parents=[leaf], help="show an endpoint")
    i.add_argument("network")
    i.add_argument("name")
    r = ep.add_parser("rm", parents=[leaf], help="delete an endpoint")
    r.add_argument("--force", "-f", action="store_true", help="leave first if joined")
    r.add_argument("network")
    r.add_argument("name")
    for action in ("join", "leave"):
        j = ep.add_parser(action, parents=[leaf], help=f"{action} a container's sandbox")
        j.add_argument("network")
        j.add_argument("name")
        j.add_argument("container")

    sb = sub.add_parser("sandbox", parents=[leaf], help="manage sandboxes").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    c = sb.add_parser("create", parents=[leaf], help="create a sandbox explicitly")
    c.add_argument("--hostname")
    c.add_argument("--dns", action="append", default=[])
    c.add_argument("--dns-search", action="append", default=[])
    c.add_argument("--add-host", action="append", default=[], metavar="NAME:IP")
    c.add_argument("container")
    sb.add_parser("ls", parents=[leaf], help="list sandboxes")
    sb.add_parser("inspect", parents=[leaf], help="show a sandbox").add_argument("container")
    sb.add_parser("rm", parents=[leaf], help="delete a sandbox").add_argument("container")

    sub.add_parser(
        "reconcile", parents=[leaf], help="repair the store and the kernel after a crash"
    )
    sub.add_parser("doctor", parents=[leaf], help="what this host supports")
    d = sub.add_parser(
        "demo", parents=[leaf], help="the CNM lifecycle end to end with real sandboxes"
    )
    d.add_argument("--containers", type=int, default=4)
    b = sub.add_parser("bench", help="join/leave latency and bulk throughput vs other tools")
    b.add_argument("--containers", type=int, default=100)
    b.add_argument(
        "--compare",
        default="cni,pyroute2,ip",
        help="comma-separated: cni, pyroute2, ip (empty: cnm only)",
    )
    b.add_argument("--json", dest="json_file", metavar="FILE", help="also write JSON here")
    pl = sub.add_parser("plugin", help="serve cnm's drivers to a container engine")
    pls = pl.add_subparsers(dest="action", required=True, metavar="ACTION").add_parser(
        "serve", help="the bridge driver and the default IPAM as a remote plugin, until SIGTERM"
    )
    pls.add_argument("--name", default="cnm", help="plugin name: the socket is NAME.sock")
    pls.add_argument("--plugin-dir", default="/run/docker/plugins")
    ag = sub.add_parser("agent", help="keep this host in step (overlay peers, repairs)")
    ag.add_argument("--store", default=os.environ.get("CNM_STORE"), help="etcd://HOST:PORT/PREFIX")
    ag.add_argument("--repair-interval", type=float, default=None, metavar="SECONDS")
    ag.add_argument("--status-every", type=float, default=0, metavar="SECONDS")
    return p


def _ipam_configs(args: argparse.Namespace) -> tuple[list[IPAMConfig], list[IPAMConfig]]:
    subnets = []
    for text in args.subnet:
        try:
            subnets.append(ipaddress.ip_network(text))
        except ValueError as exc:
            raise errors.InvalidParameter(f"invalid subnet {text!r}: {exc}") from None

    def owner(value: str, what: str) -> int:
        try:
            obj: Any = ipaddress.ip_network(value) if "/" in value else ipaddress.ip_address(value)
        except ValueError as exc:
            raise errors.InvalidParameter(f"invalid {what} {value!r}: {exc}") from None
        for idx, net in enumerate(subnets):
            inside = (
                (obj.version == net.version and obj.subnet_of(net))
                if "/" in value
                else (obj in net)
            )
            if inside:
                return idx
        raise errors.InvalidParameter(f"{what} {value} is not inside any --subnet")

    gateways: dict[int, str] = {}
    ranges: dict[int, str] = {}
    aux: dict[int, dict[str, str]] = {}
    for gw in args.gateway:
        gateways[owner(gw, "gateway")] = gw
    for rng in args.ip_range:
        ranges[owner(rng, "ip-range")] = rng
    for name, addr in args.aux_address:
        aux.setdefault(owner(addr, "aux address"), {})[name] = addr
    v4, v6 = [], []
    for idx, net in enumerate(subnets):
        cfg = IPAMConfig(str(net), gateways.get(idx), ranges.get(idx), aux.get(idx, {}))
        (v4 if net.version == 4 else v6).append(cfg)
    if v6 and not args.ipv6:
        raise errors.InvalidParameter("an IPv6 --subnet needs --ipv6")
    return v4, v6


def _table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    cells = [list(header)] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells
    )


class _Out:
    def __init__(self, as_json: bool) -> None:
        self.json = as_json

    def obj(self, data: Any, text: Callable[[], str]) -> None:
        print(json.dumps(data, indent=2, sort_keys=True) if self.json else text())

    def inspect(self, data: Any) -> None:
        """An object shown whole: JSON either way (as `docker inspect` does)."""
        print(json.dumps(data, indent=2, sort_keys=True))


def _network_cmd(ctl: NetworkController, args: argparse.Namespace, out: _Out) -> None:
    if args.action == "create":
        v4, v6 = _ipam_configs(args)
        net = ctl.create_network(
            args.name,
            driver=args.driver,
            ipv4=v4,
            ipv6=v6,
            enable_ipv6=args.ipv6,
            internal=args.internal,
            options=dict(args.opt),
            labels=dict(args.label),
            ipam_driver=args.ipam_driver,
            ipam_options=dict(args.ipam_opt),
        )
        out.obj(net.to_dict(), lambda: net.id)
    elif args.action == "ls":
        nets = ctl.networks()
        out.obj(
            [n.to_dict() for n in nets],
            lambda: _table(
                [
                    (n.id[:12], n.name, n.driver, n.scope, ",".join(map(str, n.subnets)))
                    for n in nets
                ],
                ("NETWORK ID", "NAME", "DRIVER", "SCOPE", "SUBNETS"),
            ),
        )
    elif args.action == "inspect":
        data = ctl.network(args.name).to_dict()
        out.inspect(data)
    elif args.action == "rm":
        net = ctl.network(args.name)
        net.delete()
        out.obj({"id": net.id, "deleted": True}, lambda: net.name)


def _endpoint_cmd(ctl: NetworkController, args: argparse.Namespace, out: _Out) -> None:
    if args.action == "ls":
        nets = [ctl.network(args.network)] if args.network else ctl.networks()
        eps = [(n, e) for n in nets for e in n.endpoints()]
        out.obj(
            [e.to_dict() for _, e in eps],
            lambda: _table(
                [
                    (
                        e.id[:12],
                        e.name,
                        n.name,
                        e.ipv4_address,
                        e.ipv6_address,
                        e.mac_address,
                        (e.record.sandbox_id or "")[:12],
                    )
                    for n, e in eps
                ],
                ("ENDPOINT ID", "NAME", "NETWORK", "IPV4", "IPV6", "MAC", "SANDBOX"),
            ),
        )
        return
    net = ctl.network(args.network)
    if args.action == "create":
        ep = net.create_endpoint(
            args.name,
            ipv4_address=args.ip,
            ipv6_address=args.ip6,
            mac_address=args.mac,
            options=dict(args.opt),
        )
        out.obj(ep.to_dict(), lambda: ep.id)
        return
    ep = net.endpoint(args.name)
    if args.action == "inspect":
        data = ep.to_dict()
        out.inspect(data)
    elif args.action == "rm":
        ep.delete(force=args.force)
        out.obj({"id": ep.id, "deleted": True}, lambda: ep.name)
    elif args.action == "join":
        key = ep.join(args.container)
        out.obj({"endpoint": ep.id, "container": args.container, "key": key}, lambda: key)
    elif args.action == "leave":
        ep.leave(args.container)
        out.obj({"endpoint": ep.id, "container": args.container, "left": True}, lambda: ep.name)


def _sandbox_cmd(ctl: NetworkController, args: argparse.Namespace, out: _Out) -> None:
    if args.action == "create":
        sb = ctl.create_sandbox(
            args.container,
            hostname=args.hostname,
            dns=args.dns,
            dns_search=args.dns_search,
            extra_hosts=args.add_host,
        )
        out.obj(sb.to_dict(), lambda: sb.key)
    elif args.action == "ls":
        sbs = ctl.sandboxes()
        out.obj(
            [s.to_dict() for s in sbs],
            lambda: _table(
                [(s.id[:12], s.container_id, s.key, len(s.endpoints())) for s in sbs],
                ("SANDBOX ID", "CONTAINER", "KEY", "ENDPOINTS"),
            ),
        )
    elif args.action == "inspect":
        data = ctl.sandbox(args.container).to_dict()
        out.inspect(data)
    elif args.action == "rm":
        sb = ctl.sandbox(args.container)
        sb.delete()
        out.obj({"id": sb.id, "deleted": True}, lambda: sb.container_id)


def _reconcile_cmd(ctl: NetworkController, out: _Out) -> int:
    report = ctl.reconcile()

    def text() -> str:
        lines = [f"{r.kind}  {r.object}  {r.detail}".rstrip() for r in report.repairs]
        lines += [f"error: {e}" for e in report.errors]
        return "\n".join(lines) or "nothing to repair"

    out.obj(report.to_dict(), text)
    return 1 if report.errors else 0


def run(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    out = _Out(args.json)
    if args.command == "doctor":
        from .doctor import doctor

        report = doctor(args.state_dir, args.run_dir, args.fastpath)
        out.obj(report.to_dict(), report.text)
        return 0
    if args.command == "bench":
        from .bench import bench

        compare = [c.strip() for c in args.compare.split(",") if c.strip()]
        return bench(args.containers, compare, args.json_file, as_json=args.json)
    if args.command == "plugin":
        from .plugin import serve

        def ready(path: str) -> None:
            print(f"serving {path}", flush=True)

        serve(
            args.state_dir,
            args.run_dir,
            name=args.name,
            plugin_dir=args.plugin_dir,
            fastpath=args.fastpath,
            ready=ready,
        )
        return 0
    if args.command == "agent":
        from .globalscope import run_agent

        return run_agent(
            args.state_dir,
            args.run_dir,
            fastpath=args.fastpath,
            store=args.store,
            ebpf=args.ebpf,
            repair_interval=args.repair_interval,
            status_every=args.status_every,
        )
    if args.command == "demo":
        from .demo import demo

        return demo(args.state_dir, args.run_dir, args.fastpath, args.containers, as_json=args.json)
    with NetworkController(
        state_dir=args.state_dir, run_dir=args.run_dir, fastpath=args.fastpath, ebpf=args.ebpf
    ) as ctl:
        if args.command == "network":
            _network_cmd(ctl, args, out)
        elif args.command == "endpoint":
            _endpoint_cmd(ctl, args, out)
        elif args.command == "sandbox":
            _sandbox_cmd(ctl, args, out)
        elif args.command == "reconcile":
            return _reconcile_cmd(ctl, out)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="cnm: %(message)s")
    # Which fast path is in use is `cnm doctor`'s to say, not every command's.
    logging.getLogger("cnm.fastpath").setLevel(logging.ERROR)
    try:
        return run(argv)
    except errors.CNMError as exc:
        print(f"cnm: {exc}", file=sys.stderr)
        return 1
    except ExceptionGroup as group:
        for exc in group.exceptions:
            print(f"cnm: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
