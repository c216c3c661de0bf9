"""cnm.ebpf.loader.fs_type reads the mount table as the kernel resolves paths: a later
mount at P hides earlier mounts at or below P (a fresh sysfs on /sys hides the bpffs that
was on the old /sys/fs/bpf: `cnm bench` run from a process that had bpffs mounted)."""

from __future__ import annotations

import pytest

from cnm.ebpf import loader


@pytest.mark.parametrize(
    ("mounts", "path", "expected"),
    [
        ([("/", "ext4"), ("/sys", "sysfs"), ("/sys/fs/bpf", "bpf")], "/sys/fs/bpf/x", "bpf"),
        (
            [("/", "ext4"), ("/sys", "sysfs"), ("/sys/fs/bpf", "bpf"), ("/sys", "sysfs")],
            "/sys/fs/bpf/x",
            "sysfs",
        ),
        (
            [("/", "ext4"), ("/sys", "sysfs"), ("/sys", "sysfs"), ("/sys/fs/bpf", "bpf")],
            "/sys/fs/bpf",
            "bpf",
        ),
        ([("/", "ext4"), ("/run", "tmpfs"), ("/run/a", "nsfs")], "/sys/fs/bpf", "ext4"),
        ([("/", "ext4"), ("/sysfoo", "tmpfs")], "/sys/x", "ext4"),
    ],
)
def test_fs_type_sees_only_visible_mounts(monkeypatch, mounts, path, expected) -> None:
    monkeypatch.setattr(loader, "_mounts", lambda: mounts)
    monkeypatch.setattr(loader.os.path, "realpath", lambda p: p)
    assert loader.fs_type(path) == expected
