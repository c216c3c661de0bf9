"""Helpers shared by the benchmark suites: same-run references and ratios."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest


def best_of(
    fn: Callable[[], object], rounds: int = 3, setup: Callable[[], object] | None = None
) -> float:
    """The fastest of `rounds` timed runs of fn (setup untimed): a same-run reference."""
    best = float("inf")
    for _ in range(rounds):
        if setup is not None:
            setup()
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def record_ratio(benchmark: object, name: str, ours: float, reference: float) -> float:
    ratio = ours / reference if reference > 0 else float("inf")
    extra = benchmark.extra_info  # type: ignore[attr-defined]
    extra[f"{name}_s"] = round(ours, 6)
    extra[f"{name}_reference_s"] = round(reference, 6)
    extra[f"{name}_ratio"] = round(ratio, 3)
    print(
        f"\n{name}: {ours * 1000:.1f} ms, reference {reference * 1000:.1f} ms, ratio {ratio:.2f}x"
    )
    return ratio


def timed(fn: Callable[..., object], sink: list[float]) -> Callable[..., None]:
    """fn wrapped to append its own duration to `sink` (works with --benchmark-disable)."""

    def run(*args: object, **kwargs: object) -> None:
        t0 = time.perf_counter()
        fn(*args, **kwargs)
        sink.append(time.perf_counter() - t0)

    return run


def _busy_jiffies() -> tuple[int, int]:
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


def settle(limit: float = 15.0) -> None:
    """Wait until the machine is idle again: the kernel tears namespaces and devices
    down in the background after they are deleted, and that work must not land in the
    next variant's time."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        b0, t0 = _busy_jiffies()
        time.sleep(0.25)
        b1, t1 = _busy_jiffies()
        if t1 > t0 and (b1 - b0) / (t1 - t0) < 0.10:
            return


def build_c(name: str, out_dir: str) -> str:
    """benchmarks/<name>.c compiled with -O2 into out_dir; the test is skipped (with the
    reason) on a host without a C compiler."""
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        pytest.skip(f"no C compiler to build benchmarks/{name}.c (a same-run reference)")
    out = os.path.join(out_dir, name)
    subprocess.run([gcc, "-O2", "-o", out, str(Path(__file__).with_name(f"{name}.c"))], check=True)
    return out


def c_report(argv: list[str]) -> dict:
    """Run one of the C references (built by build_c) and return its JSON report, which
    must count no errors."""
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    result = json.loads(out)
    assert result["errors"] == 0, result
    return result
