"""The multi-host rig for overlay tests and benchmarks (run as root, inside the session's
throwaway namespaces).

Hosts are network namespaces joined by an underlay bridge `ul0` (198.18.0.0/24, the
benchmarking range; addresses exist only inside these namespaces); etcd runs in its own
namespace on the underlay (or, with `etcd_members=3`, a cluster of three, each in its own
namespace), started, stopped and cut off (link down: a silent partition) by the rig.
Each host runs one controller
process (this module run as `python -m tests.e2e.overlay_rig NETNS STATE RUN STORE`) with
its own state_dir and run_dir, driven over JSON lines on stdin/stdout.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
SUBNET = "198.18.0"
ETCD_ADDR = f"{SUBNET}.100"
ETCD_PORT = 2379
UNDERLAY = "ul0"


def etcd_available() -> bool:
    return shutil.which("etcd") is not None


class RemoteError(Exception):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind


class HostProc:
    """One host's controller process."""

    def __init__(self, name: str, netns: str, state: str, run: str, store: str, env: dict) -> None:
        self.name, self.netns, self.state, self.run, self.store = name, netns, state, run, store
        self.env = env
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.e2e.overlay_rig",
                self.netns,
                self.state,
                self.run,
                self.store,
            ],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, **self.env},
        )
        self.call("ping")

    def call(self, op: str, **args: Any) -> Any:
        assert self.proc is not None and self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(json.dumps({"op": op, "args": args}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"host {self.name}: controller process died")
        reply = json.loads(line)
        if "error" in reply:
            raise RemoteError(reply["error"], reply["message"])
        return reply["result"]

    def stop(self) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(RuntimeError, OSError, ValueError):
            self.call("quit")
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None


class Rig:
    """Hosts + underlay + etcd. Use `start()`, then `host(i)`; `close()` stops all."""

    def __init__(
        self,
        base: Path,
        hosts: int = 3,
        *,
        env: dict | None = None,
        etcd_members: int = 1,
        host_env: dict[int, dict] | None = None,
    ) -> None:
        from cnm.fastpath import netns

        self.base = base
        self.netns = netns
        self.members = etcd_members
        self.etcd_procs: dict[int, subprocess.Popen[bytes]] = {}
        self.etcd_ns: dict[int, str] = {}
        hosts_list = ",".join(
            f"{self.etcd_addr(k)}:{ETCD_PORT}" for k in range(1, etcd_members + 1)
        )
        self.store = f"etcd://{hosts_list}/cnm-{os.getpid()}-{int(time.time())}"
        self.hosts: list[HostProc] = []
        self.env = env or {}
        self.host_env = host_env or {}  # host number -> its own additions to env
        self.count = hosts
        self._networks = 0  # networks made through new_network
        self._made: list[str] = []
        self._underlay = False

    def _sh(self, *argv: str) -> None:
        subprocess.run(argv, check=True, capture_output=True)

    def _node(self, name: str, octet: int) -> str:
        from cnm.fastpath import rtnl
        from cnm.fastpath.transport import NetlinkSocket

        path = str(self.base / "ns" / name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self.netns.create(path)
        self._made.append(path)
        fd = os.open(path, os.O_RDONLY)
        try:
            with NetlinkSocket() as sock:
                master = sock.get(rtnl.link_get(UNDERLAY)).header[2]
                sock.request(
                    rtnl.veth(
                        rtnl.VethSpec(
                            name=f"ul-{name}", peer_name="eth0", peer_netns_fd=fd, master=master
                        )
                    )
                )
        finally:
            os.close(fd)
        self._sh(
            "nsenter", f"--net={path}", "ip", "addr", "add", f"{SUBNET}.{octet}/24", "dev", "eth0"
        )
        self._sh("nsenter", f"--net={path}", "ip", "link", "set", "eth0", "up")
        return path

    def start(self) -> Rig:
        """Underlay, etcd, hosts; on failure whatever was made is removed again."""
        try:
            return self._start()
        except BaseException:
            self.close()
            raise

    def _start(self) -> Rig:
        self._sh("ip", "link", "add", UNDERLAY, "type", "bridge")
        self._underlay = True
        self._sh("ip", "addr", "add", f"{SUBNET}.254/24", "dev", UNDERLAY)
        self._sh("ip", "link", "set", UNDERLAY, "up")
        for k in range(1, self.members + 1):
            self.etcd_ns[k] = self._node(self._etcd_name(k), 99 + k)
        for k in range(1, self.members + 1):
            self._spawn_etcd(k)
        for k in range(1, self.members + 1):
            self._wait_etcd(k)
        for i in range(1, self.count + 1):
            path = self._node(f"h{i}", i)
            h = HostProc(
                f"h{i}",
                path,
                str(self.base / f"h{i}" / "state"),
                str(self.base / f"h{i}" / "run"),
                self.store,
                {**self.env, **self.host_env.get(i, {})},
            )
            h.start()
            self.hosts.append(h)
        return self

    def host(self, i: int) -> HostProc:
        return self.hosts[i - 1]

    def new_network(self, prefix: str = "ov", **kw: Any) -> str:
        """A new overlay network made on host 1 (visible on every host); its name."""
        self._networks += 1
        name = f"{prefix}{self._networks}"
        self.host(1).call("create_network", name=name, **kw)
        return name

    def join(self, i: int, net: str, ep: str) -> tuple[str, dict]:
        """Endpoint `ep` created and joined (container c-<ep>) on host i: (sandbox key,
        endpoint)."""
        h = self.host(i)
        [info] = h.call("create_endpoints", net=net, names=[ep])
        [key] = h.call("join_many", items=[[net, ep, f"c-{ep}"]])
        return key, info

    def vtep(self, i: int) -> str:
        return f"{SUBNET}.{i}"

    @staticmethod
    def etcd_addr(k: int = 1) -> str:
        return f"{SUBNET}.{99 + k}"

    @staticmethod
    def _etcd_name(k: int) -> str:
        return "etcd" if k == 1 else f"etcd{k}"

    def _spawn_etcd(self, k: int) -> None:
        name = self._etcd_name(k)
        addr = self.etcd_addr(k)
        cluster = ",".join(
            f"{self._etcd_name(j)}=http://{self.etcd_addr(j)}:2380"
            for j in range(1, self.members + 1)
        )
        url = f"http://{addr}:{ETCD_PORT}"
        self.etcd_procs[k] = subprocess.Popen(
            [
                "nsenter",
                f"--net={self.etcd_ns[k]}",
                "etcd",
                "--name",
                name,
                "--data-dir",
                str(self.base / f"{name}-data"),
                "--listen-client-urls",
                url,
                "--advertise-client-urls",
                url,
                "--listen-peer-urls",
                f"http://{addr}:2380",
                "--initial-advertise-peer-urls",
                f"http://{addr}:2380",
                "--initial-cluster",
                cluster,
                "--initial-cluster-token",
                f"rig-{id(self)}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=open(self.base / f"{name}.log", "ab"),  # noqa: SIM115
        )

    def _wait_etcd(self, k: int) -> None:
        from cnm.control.store.etcd import EtcdStore

        probe = EtcdStore(f"etcd://{self.etcd_addr(k)}:{ETCD_PORT}/probe", timeout=0.5)
        try:
            deadline = time.monotonic() + 20
            while True:
                try:
                    probe.status()
                    probe.get("probe")  # a member of a cluster answers reads with a leader
                    return
                except Exception:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)
        finally:
            probe.close()

    def start_etcd(self, k: int | None = None) -> None:
        """Start etcd (every member, or member k) again and wait until it answers."""
        members = [k] if k is not None else list(range(1, self.members + 1))
        for j in members:
            if j not in self.etcd_procs:
                self._spawn_etcd(j)
        for j in members:
            self._wait_etcd(j)

    def stop_etcd(self, k: int | None = None) -> None:
        """Stop etcd (every member, or member k)."""
        for j in [k] if k is not None else list(self.etcd_procs):
            proc = self.etcd_procs.pop(j, None)
            if proc is None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def partition_etcd(self, k: int = 1, *, cut: bool = True) -> None:
        """A silent partition of etcd member k (its underlay link down: packets to and
        from it are dropped, no connection is closed); `cut=False` heals it."""
        state = "down" if cut else "up"
        self._sh("ip", "link", "set", f"ul-{self._etcd_name(k)}", state)

    def close(self) -> None:
        for h in self.hosts:
            h.stop()
        self.stop_etcd()
        # The underlay ends first, each delete synchronous (a namespace's devices die
        # late, after the namespace): the next rig may reuse every name at once.
        for path in self._made:
            subprocess.run(
                ["ip", "link", "del", f"ul-{os.path.basename(path)}"], capture_output=True
            )
        if self._underlay:
            subprocess.run(["ip", "link", "del", UNDERLAY], capture_output=True)
            self._underlay = False
        for path in self._made:
            self.netns.delete(path)
        self._made.clear()


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


# --- the controller process of one host -------------------------------------------------


def _serve(netns_path: str, state: str, run: str, store: str) -> None:
    from cnm.fastpath import netns

    fd = os.open(netns_path, os.O_RDONLY)
    netns.setns(fd)  # before any thread exists: every thread of this process lives there
    os.close(fd)

    from cnm.control import NetworkController
    from cnm.control.types import IPAMConfig

    # The kernel's overlay path unless a test asks for the BPF tunnel (CNM_RIG_EBPF=on).
    ebpf = os.environ.get("CNM_RIG_EBPF", "off")
    ctl = NetworkController(state_dir=state, run_dir=run, store=store, ebpf=ebpf)
    out = sys.stdout

    def endpoint(net: str, ep: str) -> Any:
        return ctl.network(net).endpoint(ep)

    def ops(op: str, a: dict[str, Any]) -> Any:
        if op == "ping":
            return "pong"
        if op == "create_network":
            ipv4 = [IPAMConfig(subnet=a["subnet"])] if a.get("subnet") else None
            ipv6 = [IPAMConfig(subnet=a["subnet6"])] if a.get("subnet6") else None
            n = ctl.create_network(
                a["name"],
                driver=a.get("driver", "overlay"),
                ipv4=ipv4,
                options=a.get("options"),
                enable_ipv6=a.get("enable_ipv6", False),
                ipv6=ipv6,
            )
            return {"id": n.id, "name": n.name}
        if op == "network":
            n = ctl.network(a["name"])
            return {
                "id": n.id,
                "name": n.name,
                "driver": n.driver,
                "scope": n.record.scope,
                "subnets": [p.subnet for p in n.record.ipv4],
            }
        if op == "networks":
            return sorted(n.name for n in ctl.networks())
        if op == "create_endpoints":
            eps = ctl.network(a["net"]).create_endpoints(a["names"])
            return [
                {"name": e.name, "id": e.id, "ip": str(e.ipv4_address.ip), "mac": e.mac_address}
                for e in eps
            ]
        if op == "join_many":
            return ctl.join_many([(endpoint(n, e), c) for n, e, c in a["items"]])
        if op == "leave_many":
            ctl.leave_many([(endpoint(n, e), c) for n, e, c in a["items"]])
            return None
        if op == "delete_endpoint":
            endpoint(a["net"], a["ep"]).delete()
            return None
        if op == "delete_endpoints":
            n = ctl.network(a["net"])
            ctl.delete_endpoints([n.endpoint(e) for e in a["eps"]])
            return None
        if op == "delete_network":
            ctl.network(a["name"]).delete()
            return None
        if op == "reconcile":
            return ctl.reconcile().to_dict()
        if op == "status":
            return ctl.global_scope.status()
        if op == "etcd_endpoint":  # the member this host's store talks to now
            etcd = ctl.global_scope.etcd
            host, port = etcd.url.endpoints[etcd._current]
            return f"{host}:{port}"
        if op == "overlay_key":
            return ctl.global_scope.links.key(ctl.network(a["name"]).id)
        if op == "joined":  # this host's endpoints on a network: (net, ep, container or None)
            n = ctl.network(a["name"])
            out = []
            for e in n.endpoints():
                sb = e.sandbox
                out.append([n.name, e.name, sb.container_id if sb is not None else None])
            return out
        if op == "datapath":
            return ctl.global_scope.links.datapath
        if op == "tunnel_counters":
            return ctl.global_scope.links.counters()
        if op == "tunnel_key":  # the namespace holding the host ends (the BPF tunnel)
            return ctl.global_scope.links.key
        if op == "programmed":
            fdb, neigh = ctl.global_scope.driver.programmed(ctl.network(a["name"]).id)
            return {
                "fdb": sorted([m, str(v)] for m, v in fdb),
                "neigh": sorted([str(i), m] for i, m in neigh),
            }
        if op == "vni":
            return ctl.global_scope.driver.vni(ctl.network(a["name"]).id)
        raise ValueError(f"unknown op {op!r}")

    for line in sys.stdin:
        req = json.loads(line)
        if req["op"] == "quit":
            ctl.close()
            out.write(json.dumps({"result": None}) + "\n")
            out.flush()
            return
        try:
            reply = {"result": ops(req["op"], req.get("args") or {})}
        except Exception as exc:
            reply = {"error": type(exc).__name__, "message": str(exc)}
        out.write(json.dumps(reply) + "\n")
        out.flush()
    ctl.close()


if __name__ == "__main__":
    _serve(*sys.argv[1:5])


__all__ = ["HostProc", "RemoteError", "Rig", "etcd_available", "ipaddress", "wait_for"]
