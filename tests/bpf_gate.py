"""The one rule for BPF tests and benchmarks: skip (with the probe's reason) only where the
probe says the kernel predates a feature; on a kernel that should have it, a failed probe
fails. And what the tests ask of a hook: the name of cnm's program on it."""

from __future__ import annotations

import os

import pytest

from cnm.ebpf import loader, probe


def require_bpf(programs: tuple[str, ...] | None = None) -> probe.EbpfProbe:
    """Probe what `programs` need (default: every cnm program) and apply the rule."""
    result = probe.probe(programs) if programs is not None else probe.probe()
    if result.verdict == "skip":
        pytest.skip(f"the kernel predates a BPF feature: {result.reason}")
    if not result.ok:
        pytest.fail(f"the BPF data path should work on kernel {result.kernel}: {result.reason}")
    return result


def tc_program_name(ifindex: int, netns_path: str | None = None) -> str | None:
    """The name of cnm's program at the link's TC ingress (tcx hook or clsact filter), as
    the kernel keeps it (15 characters); None when there is none."""
    prog_id = loader.tc_query(ifindex, netns=netns_path)
    if prog_id is None:
        return None
    fd = loader.lib().bpf_prog_get_fd_by_id(prog_id)
    try:
        return loader._obj_info(fd, 80, "program")[64:80].split(b"\0", 1)[0].decode()
    finally:
        os.close(fd)
