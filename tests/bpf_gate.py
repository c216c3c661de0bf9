"""The one rule for BPF tests and benchmarks: skip (with the probe's reason) only where the
probe says the kernel predates a feature; on a kernel that should have it, a failed probe
fails."""

from __future__ import annotations

import pytest

from cnm.ebpf import probe


def require_bpf(programs: tuple[str, ...] | None = None) -> probe.EbpfProbe:
    """Probe what `programs` need (default: every cnm program) and apply the rule."""
    result = probe.probe(programs) if programs is not None else probe.probe()
    if result.verdict == "skip":
        pytest.skip(f"the kernel predates a BPF feature: {result.reason}")
    if not result.ok:
        pytest.fail(f"the BPF data path should work on kernel {result.kernel}: {result.reason}")
    return result
