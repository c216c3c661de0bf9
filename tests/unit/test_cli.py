"""The `cnm` command line, run as a real subprocess: output, --json, exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

Run = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def cnm(dirs: tuple[str, str]) -> Run:
    """Run `python -m cnm.control.cli --state-dir D --run-dir D ARGS...`."""

    def run(*args: str, state_dir: str | None = None) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "cnm.control.cli"]
        cmd += ["--state-dir", state_dir or dirs[0], "--run-dir", dirs[1], *args]
        env = {k: v for k, v in os.environ.items() if not k.startswith("CNM_")}
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)

    return run


def ok(proc: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout: {proc.stdout}\n{proc.stderr}"
    assert "Traceback" not in proc.stderr
    return proc


def js(proc: subprocess.CompletedProcess[str]) -> Any:
    return json.loads(ok(proc).stdout)


def user_error(proc: subprocess.CompletedProcess[str], *words: str) -> str:
    """Exit 1 with exactly one `cnm: ...` line on stderr, and nothing on stdout."""
    assert proc.returncode == 1, f"exit {proc.returncode}\nstdout: {proc.stdout}\n{proc.stderr}"
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("cnm: "), proc.stderr
    for word in words:
        assert word in lines[0], proc.stderr
    assert proc.stdout == ""
    return lines[0]


def usage_error(proc: subprocess.CompletedProcess[str]) -> None:
    assert proc.returncode == 2, f"exit {proc.returncode}\nstdout: {proc.stdout}\n{proc.stderr}"
    assert "Traceback" not in proc.stderr
    assert "usage:" in proc.stderr


# --- networks ----------------------------------------------------------------------------


def test_network_create_with_every_option_and_inspect(cnm: Run) -> None:
    created = js(
        cnm(
            "--json",
            "network",
            "create",
            "-d",
            "null",
            "--subnet",
            "10.40.0.0/24",
            "--gateway",
            "10.40.0.254",
            "--ip-range",
            "10.40.0.128/25",
            "--aux-address",
            "router=10.40.0.5",
            "--aux-address",
            "dns=10.40.0.6",
            "-o",
            "com.docker.network.driver.mtu=1400",
            "--label",
            "team=blue",
            "--label",
            "env=a=b",
            "web",
        )
    )
    assert created["name"] == "web"
    assert created["driver"] == "null"
    assert created["scope"] == "local"
    assert created["state"] == "ready"
    assert len(created["id"]) == 64
    assert created["options"] == {"com.docker.network.driver.mtu": "1400"}
    assert created["labels"] == {"team": "blue", "env": "a=b"}  # split at the first "="
    assert created["internal"] is False and created["enable_ipv6"] is False
    (pool,) = created["ipv4"]
    assert pool["subnet"] == "10.40.0.0/24"
    assert pool["gateway"] == "10.40.0.254/24"
    assert pool["ip_range"] == "10.40.0.128/25"
    assert pool["aux_addresses"] == {"router": "10.40.0.5/24", "dns": "10.40.0.6/24"}
    assert created["ipv6"] == []

    inspected = js(cnm("network", "inspect", "web", "--json"))
    assert inspected == created
    # By id and by unique id prefix, too; and without --json inspect still prints JSON.
    assert js(cnm("network", "inspect", created["id"], "--json")) == created
    assert json.loads(ok(cnm("network", "inspect", created["id"][:12])).stdout) == created


def test_network_create_plain_output_is_the_id(cnm: Run) -> None:
    out = ok(cnm("network", "create", "--driver", "null", "--internal", "plain")).stdout.strip()
    assert len(out) == 64 and all(c in "0123456789abcdef" for c in out)
    data = js(cnm("--json", "network", "inspect", "plain"))
    assert data["id"] == out
    assert data["internal"] is True
    (pool,) = data["ipv4"]  # no --subnet: a default pool was taken
    assert pool["subnet"] and pool["gateway"]


def test_ipv6_network_and_endpoint(cnm: Run) -> None:
    no_flag = cnm("network", "create", "-d", "null", "--subnet", "fd00:49::/64", "v6")
    user_error(no_flag, "--ipv6")
    net = js(
        cnm(
            "--json",
            "network",
            "create",
            "-d",
            "null",
            "--ipv6",
            "--subnet",
            "fd00:49::/64",
            "--subnet",
            "10.49.0.0/24",
            "--gateway",
            "fd00:49::fe",
            "v6",
        )
    )
    assert net["enable_ipv6"] is True
    assert [(p["subnet"], p["gateway"]) for p in net["ipv6"]] == [
        ("fd00:49::/64", "fd00:49::fe/64")
    ]
    assert [p["subnet"] for p in net["ipv4"]] == ["10.49.0.0/24"]
    ep = js(cnm("--json", "endpoint", "create", "--ip6", "fd00:49::9", "v6", "e1"))
    assert ep["ipv6_address"] == "fd00:49::9/64"
    assert ep["ipv4_address"] == "10.49.0.2/24"


def test_network_ls_and_rm(cnm: Run) -> None:
    assert js(cnm("--json", "network", "ls")) == []
    a = js(cnm("--json", "network", "create", "-d", "null", "--subnet", "10.41.0.0/24", "a"))
    b = js(cnm("network", "create", "-d", "null", "--subnet", "10.41.1.0/24", "b", "--json"))
    listed = js(cnm("network", "ls", "--json"))
    assert [n["name"] for n in listed] == ["a", "b"]
    assert [n["id"] for n in listed] == [a["id"], b["id"]]
    assert listed[0] == a

    table = ok(cnm("network", "ls")).stdout.splitlines()
    assert table[0].split() == ["NETWORK", "ID", "NAME", "DRIVER", "SCOPE", "SUBNETS"]
    assert table[1].split() == [a["id"][:12], "a", "null", "local", "10.41.0.0/24"]
    assert table[2].split()[1] == "b"

    gone = js(cnm("network", "rm", "a", "--json"))
    assert gone == {"id": a["id"], "deleted": True}
    assert ok(cnm("network", "rm", b["id"][:16])).stdout.strip() == "b"
    assert js(cnm("--json", "network", "ls")) == []
    user_error(cnm("network", "inspect", "a"), "'a'", "not found")


# --- endpoints ---------------------------------------------------------------------------


def test_endpoint_create_ls_inspect_rm(cnm: Run) -> None:
    net = js(cnm("--json", "network", "create", "-d", "null", "--subnet", "10.42.0.0/24", "web"))
    e1 = js(cnm("--json", "endpoint", "create", "web", "e1"))
    assert e1["name"] == "e1"
    assert e1["network_id"] == net["id"]
    assert e1["ipv4_address"] == "10.42.0.2/24"
    assert e1["ipv6_address"] is None
    assert e1["mac_address"] == "02:42:0a:2a:00:02"
    assert e1["sandbox_id"] is None
    assert e1["state"] == "ready"
    assert len(e1["id"]) == 64

    e2 = js(
        cnm(
            "endpoint",
            "create",
            "--ip",
            "10.42.0.50",
            "--mac",
            "02:AA:BB:CC:DD:EE",
            "-o",
            "k=v",
            "web",
            "e2",
            "--json",
        )
    )
    assert e2["ipv4_address"] == "10.42.0.50/24"
    assert e2["mac_address"] == "02:aa:bb:cc:dd:ee"
    assert e2["options"] == {"k": "v"}

    plain = ok(cnm("endpoint", "create", "web", "e3")).stdout.strip()
    assert len(plain) == 64

    assert js(cnm("--json", "endpoint", "inspect", "web", "e1")) == e1
    assert js(cnm("endpoint", "inspect", net["id"], e2["id"][:12], "--json")) == e2

    listed = js(cnm("--json", "endpoint", "ls", "web"))
    assert [e["name"] for e in listed] == ["e1", "e2", "e3"]
    assert listed[0] == e1 and listed[1] == e2
    assert [e["name"] for e in js(cnm("endpoint", "ls", "--json"))] == ["e1", "e2", "e3"]
    table = ok(cnm("endpoint", "ls")).stdout.splitlines()
    assert table[0].split()[:4] == ["ENDPOINT", "ID", "NAME", "NETWORK"]
    assert table[1].split()[:4] == [e1["id"][:12], "e1", "web", "10.42.0.2/24"]

    assert js(cnm("endpoint", "rm", "web", "e2", "--json")) == {"id": e2["id"], "deleted": True}
    assert ok(cnm("endpoint", "rm", "web", "e3")).stdout.strip() == "e3"
    assert [e["name"] for e in js(cnm("--json", "endpoint", "ls", "web"))] == ["e1"]
    user_error(cnm("endpoint", "inspect", "web", "e2"), "'e2'", "not found")
    # The released static address can be taken again.
    again = js(cnm("--json", "endpoint", "create", "--ip", "10.42.0.50", "web", "e4"))
    assert again["ipv4_address"] == "10.42.0.50/24"


def test_network_rm_is_refused_while_endpoints_exist(cnm: Run) -> None:
    ok(cnm("network", "create", "-d", "null", "--subnet", "10.43.0.0/24", "web"))
    ok(cnm("endpoint", "create", "web", "e1"))
    ok(cnm("endpoint", "create", "web", "e2"))
    line = user_error(cnm("network", "rm", "web"), "'web'", "e1", "e2")
    assert "endpoint" in line
    assert [n["name"] for n in js(cnm("--json", "network", "ls"))] == ["web"]
    ok(cnm("endpoint", "rm", "web", "e1"))
    ok(cnm("endpoint", "rm", "web", "e2"))
    ok(cnm("network", "rm", "web"))
    assert js(cnm("--json", "network", "ls")) == []


def test_json_before_and_after_the_command(cnm: Run) -> None:
    ok(cnm("network", "create", "-d", "null", "--subnet", "10.44.0.0/24", "web"))
    ok(cnm("endpoint", "create", "web", "e1"))
    for args in (
        ("--json", "network", "ls"),
        ("network", "--json", "ls"),
        ("network", "ls", "--json"),
    ):
        assert [n["name"] for n in js(cnm(*args))] == ["web"], args
    for args in (
        ("--json", "endpoint", "ls"),
        ("endpoint", "--json", "ls", "web"),
        ("endpoint", "ls", "web", "--json"),
        ("endpoint", "inspect", "--json", "web", "e1"),
    ):
        data = js(cnm(*args))
        names = [e["name"] for e in data] if isinstance(data, list) else [data["name"]]
        assert names == ["e1"], args
    # Without --json the listing is a table, not JSON.
    with pytest.raises(json.JSONDecodeError):
        json.loads(ok(cnm("network", "ls")).stdout)


def test_console_script_next_to_the_interpreter(dirs: tuple[str, str]) -> None:
    script = Path(sys.executable).with_name("cnm")
    if not script.exists():
        pytest.skip(f"no console script at {script}")
    proc = subprocess.run(
        [str(script), "--state-dir", dirs[0], "--run-dir", dirs[1], "--json", "network", "ls"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert js(proc) == []


# --- reconcile and doctor ----------------------------------------------------------------


def _clean(report: dict[str, Any]) -> None:
    """{"repairs": [], "errors": []}; any key added later must be empty as well."""
    assert report["repairs"] == [] and report["errors"] == [], report
    assert not any(report.values()), report


def test_reconcile_on_a_clean_store(cnm: Run) -> None:
    _clean(js(cnm("--json", "reconcile")))
    _clean(js(cnm("reconcile", "--json")))
    ok(cnm("network", "create", "-d", "null", "--subnet", "10.45.0.0/24", "web"))
    ok(cnm("endpoint", "create", "web", "e1"))
    # A consistent store with a network and an endpoint has nothing to repair either.
    _clean(js(cnm("reconcile", "--json")))
    assert ok(cnm("reconcile")).stdout.strip() == "nothing to repair"


def test_doctor_json(cnm: Run) -> None:
    report = js(cnm("doctor", "--json"))
    for key in ("kernel", "netns", "fastpath_backend", "ebpf"):
        assert key in report, report
    assert report["kernel"] == os.uname().release
    assert report["fastpath_backend"] in ("native", "python")
    assert isinstance(report["ebpf"], dict)
    assert isinstance(report["netns"], str)
    assert js(cnm("--json", "doctor")).keys() == report.keys()
    text = ok(cnm("doctor")).stdout
    assert "kernel" in text and "fast path in use" in text


# --- errors and exit codes -----------------------------------------------------------


def test_user_errors_exit_1_with_one_line(cnm: Run, tmp_path: Path) -> None:
    user_error(cnm("network", "inspect", "nope"), "nope")
    user_error(cnm("network", "rm", "nope"), "nope")
    user_error(cnm("endpoint", "create", "nope", "e1"), "nope")
    user_error(cnm("endpoint", "ls", "nope"), "nope")
    user_error(cnm("network", "create", "-d", "nosuchdriver", "x"), "nosuchdriver")
    user_error(cnm("network", "create", "-d", "null", "--subnet", "10.46.0.0/33", "x"))
    user_error(cnm("network", "create", "-d", "null", "--subnet", "bogus", "x"), "bogus")
    user_error(
        cnm(
            "network",
            "create",
            "-d",
            "null",
            "--subnet",
            "10.46.0.0/24",
            "--gateway",
            "1.2.3.4",
            "x",
        ),
        "1.2.3.4",
    )
    user_error(cnm("network", "create", "-d", "null", "-o", "no.such.option=1", "x"), "no.such")
    user_error(cnm("network", "create", "-d", "null", "bad name!"), "bad name!")
    ok(cnm("network", "create", "-d", "null", "--subnet", "10.46.0.0/24", "web"))
    user_error(cnm("network", "create", "-d", "null", "web"), "'web'", "in use")
    user_error(
        cnm("network", "create", "-d", "null", "--subnet", "10.46.0.128/25", "x"), "overlaps"
    )
    ok(cnm("endpoint", "create", "--ip", "10.46.0.9", "web", "e1"))
    user_error(cnm("endpoint", "create", "web", "e1"), "'e1'")
    user_error(cnm("endpoint", "create", "--ip", "10.46.0.9", "web", "e2"), "10.46.0.9")
    user_error(cnm("endpoint", "create", "--ip", "10.99.0.9", "web", "e3"), "10.99.0.9")
    user_error(cnm("endpoint", "create", "--ip", "not-an-ip", "web", "e4"), "not-an-ip")
    user_error(cnm("endpoint", "create", "--mac", "zz:zz", "web", "e5"), "zz:zz")
    user_error(cnm("endpoint", "rm", "web", "nope"), "nope")
    # Nothing half-made by the failures above.
    assert [e["name"] for e in js(cnm("--json", "endpoint", "ls"))] == ["e1"]
    assert [n["name"] for n in js(cnm("--json", "network", "ls"))] == ["web"]
    # A state dir that cannot be one (a regular file) is a user error too.
    afile = tmp_path / "afile"
    afile.write_text("x")
    user_error(cnm("network", "ls", state_dir=str(afile / "sub")))
    # So is a store file that is not a database.
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "state.db").write_bytes(b"this is not an SQLite file" * 100)
    user_error(cnm("network", "ls", state_dir=str(corrupt)), "not a database")


@pytest.mark.parametrize(
    "args",
    [
        (),
        ("frobnicate",),
        ("network",),
        ("network", "frobnicate"),
        ("network", "create"),
        ("network", "inspect"),
        ("network", "rm"),
        ("endpoint", "create", "web"),
        ("endpoint", "inspect", "web"),
        ("endpoint", "rm", "web"),
        ("network", "create", "--aux-address", "noequals", "x"),
        ("network", "create", "-o", "=v", "x"),
        ("--fastpath", "turbo", "network", "ls"),
        ("network", "ls", "--no-such-flag"),
    ],
)
def test_usage_errors_exit_2(cnm: Run, args: tuple[str, ...]) -> None:
    usage_error(cnm(*args))


def test_help_exits_0(cnm: Run) -> None:
    out = ok(cnm("--help")).stdout
    for command in ("network", "endpoint", "sandbox", "reconcile", "doctor"):
        assert command in out
