"""A real Docker engine uses `cnm plugin serve` as its network driver and IPAM.

dockerd (Debian's docker.io, 20.10) runs inside the session's throwaway network + mount
namespace with every path private: --data-root, --exec-root, --pidfile, its own -H unix
socket, its own config file and key, no bridge, no iptables, vfs storage, and its
containers under a cgroup made for this run. Plugins are discovered in
/run/docker/plugins, which is proven private (the harness mounts a fresh /run) before
anything is put there. The image is made here from busybox-static (no registry).

The test creates a network with `-d cnm --ipam-driver cnm`, runs containers that ping
each other by IP, restarts the plugin in the middle (the network keeps working, a new
container joins, and everything can still be removed), then checks that cnm's store and
the kernel are clean. Every process started here is stopped by its PID.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests import harness

pytestmark = pytest.mark.privileged

DOCKER = "/usr/bin/docker"  # the engine's own client (20.10), not any newer one on PATH
DOCKERD = "/usr/sbin/dockerd"
BUSYBOX = "/bin/busybox"
PLUGIN_DIR = "/run/docker/plugins"
PLUGIN = "cnm"
IMAGE = "cnm-e2e/busybox:local"
SUBNET, GATEWAY = "10.91.0.0/24", "10.91.0.1"
CGROUP_ROOT = "/sys/fs/cgroup"
CGROUP_PREFIX = "cnm-e2e-"
HOST_KEY = "/etc/docker/key.json"  # where dockerd keeps its identity key by default


def _missing() -> str | None:
    for path in (DOCKERD, DOCKER, "/usr/bin/containerd", BUSYBOX):
        if not os.path.exists(path):
            return f"{path} is not installed (apt packages docker.io, busybox-static)"
    if shutil.which("runc") is None:
        return "runc is not installed"
    return None


def _run_is_private() -> None:
    """/run here must be the harness's own tmpfs, not the host's: plugin sockets go there."""
    assert harness.isolation() is not None, "not inside the harness's throwaway namespaces"
    here = os.stat("/run").st_dev
    # The harness unshared this very process, so its parent still sees the host's /run.
    parent = os.getppid()
    assert os.readlink("/proc/self/ns/mnt") != os.readlink(f"/proc/{parent}/ns/mnt")
    host = os.stat(f"/proc/{parent}/root/run").st_dev
    assert here != host, "/run is the host's: refusing to put plugin sockets there"
    with open("/proc/self/mountinfo") as f:
        mounts = [line.split() for line in f]
    assert any(m[4] == "/run" and "tmpfs" in m for m in mounts), "no private tmpfs on /run"


# --- processes --------------------------------------------------------------------------


def _stop(proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, as someone else's
        return True
    return True


def _file_state(path: str) -> tuple[int, ...] | None:
    """What would show a file was written: identity, size and times (None: absent)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


@dataclass
class Engine:
    sock: str
    env: dict[str, str]
    log: Path
    key: Path  # this run's identity key (daemon.json's deprecated-key-path)
    host_key_before: tuple[int, ...] | None  # the host's key.json before this run

    def docker(self, *args: str, check: bool = True, timeout: float = 120) -> str:
        proc = subprocess.run(
            [DOCKER, "-H", f"unix://{self.sock}", *args],
            capture_output=True,
            text=True,
            env=self.env,
            timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"docker {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}\n"
                f"--- dockerd log tail ---\n{self.log.read_text()[-3000:]}"
            )
        return proc.stdout.strip()


class Plugin:
    """`cnm plugin serve` as a subprocess with its own state and run dirs."""

    def __init__(self, state: Path, run: Path, log: Path) -> None:
        self.state, self.run, self.log = state, run, log
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def socket(self) -> str:
        return f"{PLUGIN_DIR}/{PLUGIN}.sock"

    def start(self) -> None:
        cmd = [sys.executable, "-m", "cnm.control.cli", "--state-dir", str(self.state)]
        cmd += ["--run-dir", str(self.run), "plugin", "serve", "--name", PLUGIN]
        cmd += ["--plugin-dir", PLUGIN_DIR]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode()
        assert line.startswith("serving "), f"plugin did not start: {self.log.read_text()}"
        assert os.stat(self.socket).st_mode & 0o777 == 0o660

    def stop(self) -> None:
        if self.proc is not None:
            _stop(self.proc)
            assert self.proc.returncode == 0, self.log.read_text()
            self.proc = None
        assert not os.path.exists(self.socket), "the plugin left its socket behind"


def _rmdir_tree(top: Path, attempts: int = 50) -> bool:
    """Remove a cgroup directory and its children, deepest first (a cgroup goes with
    rmdir once it has no process; its control files go with it). Retried a while, as
    processes of stopped containers take a moment to leave. True when it is gone."""
    for _ in range(attempts):
        leftovers = sorted(
            (p for p in top.glob("**/") if p.is_dir()),
            key=lambda p: len(p.parts),
            reverse=True,
        )
        with contextlib.suppress(OSError):
            for path in leftovers:
                path.rmdir()
        if not top.exists():
            return True
        time.sleep(0.1)
    return False


def _remove_stale_cgroups(root: str) -> list[str]:
    """Remove the `cnm-e2e-<pid>` cgroups of earlier runs whose process is dead (a run
    that was killed never reached its cleanup); returns the names removed. A live run's
    is left alone, and so is anything else."""
    removed = []
    for entry in sorted(Path(root).iterdir()):
        m = re.fullmatch(re.escape(CGROUP_PREFIX) + r"(\d+)", entry.name)
        if m is None or not entry.is_dir():
            continue
        pid = int(m.group(1))
        if pid == os.getpid() or _pid_alive(pid):
            continue
        if _rmdir_tree(entry, attempts=1):
            removed.append(entry.name)
    return removed


@contextlib.contextmanager
def _cgroup2() -> Iterator[str]:
    """cgroup2 at /sys/fs/cgroup (in this private mount namespace only; the harness's
    fresh sysfs has nothing there) and a parent cgroup of this run's own for the
    containers, removed at the end. The mount shows the host's real cgroup tree, so
    this run's cgroup is created there: the ones earlier runs left (killed before their
    cleanup) are removed first."""
    mounted = False
    if not os.path.exists(os.path.join(CGROUP_ROOT, "cgroup.controllers")):
        subprocess.run(["mount", "-t", "cgroup2", "none", CGROUP_ROOT], check=True)
        mounted = True
    _remove_stale_cgroups(CGROUP_ROOT)
    parent = f"{CGROUP_PREFIX}{os.getpid()}"
    os.makedirs(os.path.join(CGROUP_ROOT, parent), exist_ok=True)
    try:
        yield f"/{parent}"
    finally:
        _rmdir_tree(Path(CGROUP_ROOT, parent))
        if mounted:
            subprocess.run(["umount", CGROUP_ROOT], check=False)


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    reason = _missing()
    if reason is not None:
        pytest.skip(reason)
    _run_is_private()
    base = tmp_path_factory.mktemp("dockerd")
    for d in ("data", "exec", "config"):
        (base / d).mkdir()
    # The engine's identity key would go to /etc/docker/key.json: kept here instead. The
    # host's own engine may have written that file already: its state is noted, to show
    # this run left it as it was.
    key = base / "key.json"
    host_key_before = _file_state(HOST_KEY)
    (base / "daemon.json").write_text(json.dumps({"deprecated-key-path": str(key)}))
    sock = str(base / "docker.sock")
    log = base / "dockerd.log"
    with _cgroup2() as cgroup_parent:
        cmd = [
            DOCKERD,
            "--data-root", str(base / "data"),
            "--exec-root", str(base / "exec"),
            "--pidfile", str(base / "docker.pid"),
            "--config-file", str(base / "daemon.json"),
            "-H", f"unix://{sock}",
            "--iptables=false",
            "--ip6tables=false",
            "--ip-masq=false",
            "--userland-proxy=false",
            "--bridge=none",
            "--storage-driver=vfs",
            "--cgroup-parent", cgroup_parent,
        ]  # fmt: skip
        with open(log, "wb") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")}
        env["DOCKER_CONFIG"] = str(base / "config")
        eng = Engine(sock, env, log, key, host_key_before)
        containerd_pid = None
        try:
            deadline = time.monotonic() + 60
            while True:
                if proc.poll() is not None:
                    pytest.fail(f"dockerd exited at start ({proc.returncode}): {log.read_text()}")
                ok = subprocess.run(
                    [DOCKER, "-H", f"unix://{sock}", "version"], capture_output=True, env=env
                )
                if ok.returncode == 0:
                    break
                assert time.monotonic() < deadline, f"dockerd did not come up: {log.read_text()}"
                time.sleep(0.3)
            pidfile = base / "exec" / "containerd" / "containerd.pid"
            if pidfile.exists():
                containerd_pid = int(pidfile.read_text().strip() or 0) or None
            _import_busybox(eng, base)
            yield eng
        finally:
            _stop(proc, timeout=60)
            if containerd_pid and _pid_alive(containerd_pid):  # started by dockerd for us
                os.kill(containerd_pid, signal.SIGTERM)
                for _ in range(100):
                    if not _pid_alive(containerd_pid):
                        break
                    time.sleep(0.1)
            for point in _mounts_under(base):
                subprocess.run(["umount", "-l", point], check=False)


def _mounts_under(base: Path) -> list[str]:
    root = os.path.realpath(base)
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    return sorted((p for p in points if p.startswith(root + "/")), reverse=True)


def _import_busybox(eng: Engine, base: Path) -> None:
    """A tiny image: /bin/busybox and the applets the test uses, `docker import`ed."""
    tar = base / "busybox.tar"
    with tarfile.open(tar, "w") as t:
        t.add(BUSYBOX, arcname="bin/busybox")
        for applet in ("sh", "sleep", "ping", "ip", "cat"):
            info = tarfile.TarInfo(f"bin/{applet}")
            info.type = tarfile.SYMTYPE
            info.linkname = "busybox"
            t.addfile(info)
    eng.docker("import", str(tar), IMAGE)


# --- oracles ----------------------------------------------------------------------------


def _links() -> dict[str, dict]:
    out = subprocess.run(
        ["ip", "-j", "-d", "link", "show"], check=True, capture_output=True, text=True
    ).stdout
    return {link["ifname"]: link for link in json.loads(out)}


def _cnm_links() -> list[str]:
    return sorted(n for n in _links() if n.startswith(("br-", "vc", "cnm")))


def _wait_links_gone(timeout: float = 10.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while _cnm_links() and time.monotonic() < deadline:
        time.sleep(0.1)
    return _cnm_links()


def _store_rows(state: Path) -> dict[str, int]:
    db = sqlite3.connect(f"file:{state / 'state.db'}?mode=ro", uri=True)
    try:
        return {
            table: db.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
            for table in ("networks", "endpoints", "sandboxes", "ipam_pools", "ipam_addresses")
        }
    finally:
        db.close()


def _ip_of(eng: Engine, container: str) -> str:
    return eng.docker(
        "inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}", container
    )


def _ping(eng: Engine, container: str, ip: str) -> None:
    out = eng.docker("exec", container, "ping", "-c", "1", "-W", "3", ip)
    assert "1 packets received" in out, out


# --- the test ---------------------------------------------------------------------------


def test_docker_runs_containers_on_cnm(engine: Engine, tmp_path: Path) -> None:
    plugin = Plugin(tmp_path / "state", tmp_path / "run", tmp_path / "plugin.log")
    containers: list[str] = []
    network = None
    plugin.start()
    try:
        network = engine.docker(
            "network", "create", "-d", PLUGIN, "--ipam-driver", PLUGIN,
            "--subnet", SUBNET, "--gateway", GATEWAY, "--label", "e2e=yes",
            "-o", "com.docker.network.driver.mtu=1400", "cnmnet",
        )  # fmt: skip
        # The bridge has exactly the pool and gateway the IPAM side handed out.
        (bridge,) = [n for n in _cnm_links() if n.startswith("br-")]
        addrs = subprocess.run(
            ["ip", "-j", "-4", "addr", "show", "dev", bridge],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        assert [f"{a['local']}/{a['prefixlen']}" for a in json.loads(addrs)[0]["addr_info"]] == [
            f"{GATEWAY}/24"
        ]
        for name in ("c1", "c2"):
            engine.docker("run", "-d", "--network", "cnmnet", "--name", name, IMAGE, "sleep", "600")
            containers.append(name)
        ip1, ip2 = _ip_of(engine, "c1"), _ip_of(engine, "c2")
        assert {ip1, ip2} == {"10.91.0.2", "10.91.0.3"}
        # Inside the container: eth0 with the address and cnm's MAC (02:42 + the IP).
        link = engine.docker("exec", "c1", "ip", "addr", "show", "eth0")
        assert f"inet {ip1}/24" in link
        assert "mtu 1400" in link  # the driver option reached cnm's bridge driver
        assert "link/ether 02:42:0a:5b:00:0" in link
        hosts = [n for n in _cnm_links() if n.startswith("vc")]
        assert len(hosts) == 2
        assert all(_links()[h].get("master") == bridge for h in hosts)
        _ping(engine, "c1", ip2)
        _ping(engine, "c2", ip1)
        _ping(engine, "c1", GATEWAY)

        # The plugin restarts; what it made keeps working and is still its to manage.
        plugin.stop()
        _ping(engine, "c1", ip2)
        plugin.start()
        engine.docker("run", "-d", "--network", "cnmnet", "--name", "c3", IMAGE, "sleep", "600")
        containers.append("c3")
        ip3 = _ip_of(engine, "c3")
        assert ip3 == "10.91.0.4"
        _ping(engine, "c3", ip1)
        _ping(engine, "c2", ip3)

        # Disconnect (Leave + DeleteEndpoint), remove everything.
        engine.docker("network", "disconnect", "cnmnet", "c1")
        assert engine.docker("exec", "c1", "cat", "/proc/net/dev").count("eth0") == 0
        rows = _store_rows(tmp_path / "state")
        assert rows["endpoints"] == 2, rows
        engine.docker("rm", "-f", *containers)
        containers.clear()
        engine.docker("network", "rm", "cnmnet")
        network = None
        rows = _store_rows(tmp_path / "state")
        assert rows == dict.fromkeys(rows, 0), rows
        assert _wait_links_gone() == []
    finally:
        if containers:
            engine.docker("rm", "-f", *containers, check=False)
        if network is not None:
            engine.docker("network", "rm", "cnmnet", check=False)
        plugin.stop()
        print(plugin.log.read_text(), file=sys.stderr)


def test_engine_paths_were_private(engine: Engine) -> None:
    """Nothing of this run's engine reached the host's /run or /etc/docker."""
    _run_is_private()
    assert engine.key.is_file(), "this run's engine did not write its key where told"
    assert _file_state(HOST_KEY) == engine.host_key_before, f"{HOST_KEY} was written"
    assert not os.path.exists(f"/proc/{os.getppid()}/root{PLUGIN_DIR}/{PLUGIN}.sock")


def test_stale_cgroups_of_dead_runs_are_removed(tmp_path: Path) -> None:
    """Only `cnm-e2e-<pid>` directories whose process is gone are removed (children
    first); this run's, a live process's and any other name stay."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    assert not _pid_alive(dead.pid)
    stale = tmp_path / f"{CGROUP_PREFIX}{dead.pid}"
    (stale / "docker" / "abc").mkdir(parents=True)
    keep = [
        tmp_path / f"{CGROUP_PREFIX}{os.getpid()}",
        tmp_path / f"{CGROUP_PREFIX}1",  # init: alive
        tmp_path / f"{CGROUP_PREFIX}x",
        tmp_path / "system.slice",
    ]
    for d in keep:
        d.mkdir()
    assert _remove_stale_cgroups(str(tmp_path)) == [stale.name]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(d.name for d in keep)
