"""osl.namespace's sandbox namespaces against the kernel: what each one holds when made
(loopback up by the sandbox's own netlink socket, IPv6 off by default, that socket kept)
and that a failure part-way leaves nothing, neither a mount nor a cached socket.

Judged with the independent oracles (`nsenter ... ip -j`, /proc/self/mountinfo,
`nsenter ... cat` for the sysctl) and the namespace identity of the kept socket.
"""

from __future__ import annotations

import errno
import os
import subprocess

import pytest

from cnm.control import errors
from cnm.control.osl import namespace as osl_namespace
from cnm.control.osl.namespace import NamespaceStore
from cnm.fastpath import netns, transport

from .oracles import assert_fresh_loopback_only, ns_links, nsfs_mounts

pytestmark = [pytest.mark.privileged, pytest.mark.usefixtures("_unmount_leftovers")]


def ns_sysctl(path: str, name: str) -> str:
    return subprocess.run(
        ["nsenter", f"--net={path}", "cat", f"/proc/sys/net/{name}"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()


def cached_keys(path: str) -> list[tuple]:
    return [k for k in transport._sockets if k[0] == path]


def test_create_many_makes_ready_sandboxes(tmp_path) -> None:
    store = NamespaceStore(str(tmp_path))
    keys = store.create_many(["a", "b", "c"])
    try:
        assert sorted(nsfs_mounts(tmp_path)) == sorted(keys)
        for key in keys:
            assert_fresh_loopback_only(key)  # up, with 127.0.0.1
            assert ns_sysctl(key, "ipv6/conf/default/disable_ipv6") == "1"
            # The socket kept for the sandbox lives in that sandbox's namespace.
            [k] = cached_keys(key)
            st = os.stat(key)
            assert k[1:3] == (st.st_dev, st.st_ino)
            assert transport.socket_for(key, backend=k[3]).ifindex("lo") == 1
    finally:
        for key in keys:
            store.delete(key)
    assert nsfs_mounts(tmp_path) == {}
    assert not any(cached_keys(k) for k in keys)


def test_a_failure_part_way_leaves_no_namespace_and_no_socket(tmp_path, monkeypatch) -> None:
    calls = []
    real = netns.loopback_up

    def third_fails(fd: int) -> None:
        calls.append(fd)
        if len(calls) == 3:
            raise OSError(errno.EIO, "injected loopback failure")
        real(fd)

    monkeypatch.setattr(netns, "loopback_up", third_fails)
    store = NamespaceStore(str(tmp_path))
    ids = ["a", "b", "c", "d"]
    with pytest.raises(errors.KernelError, match="injected"):
        store.create_many(ids)
    assert nsfs_mounts(tmp_path) == {}
    assert os.listdir(store.dir) == []
    assert not any(cached_keys(store.key(s)) for s in ids)
    # A single create failing in its sysctl step leaves nothing either.
    monkeypatch.undo()

    def sysctl_fails() -> None:
        raise PermissionError(errno.EACCES, "injected sysctl failure")

    monkeypatch.setattr(osl_namespace, "_disable_ipv6_by_default", sysctl_fails)
    with pytest.raises(errors.Forbidden):
        store.create("e")
    assert nsfs_mounts(tmp_path) == {}
    assert not os.path.lexists(store.key("e"))
    assert not cached_keys(store.key("e"))


def test_loopback_left_to_prepare(tmp_path) -> None:
    """netns.create(loopback=False) leaves loopback to the prepare; loopback_up on any
    socket of the new namespace gives the same loopback as the default path."""
    down = str(tmp_path / "down")
    netns.create(down, loopback=False)
    assert "UP" not in ns_links(down)["lo"]["flags"]

    def prepare(path: str) -> None:
        with transport._open_socket() as s:
            netns.loopback_up(s.fileno())

    by_prepare, default = str(tmp_path / "prepared"), str(tmp_path / "default")
    netns.create(by_prepare, prepare, loopback=False)
    netns.create(default)
    for path in (by_prepare, default):
        assert_fresh_loopback_only(path)
    assert ns_links(by_prepare)["lo"]["flags"] == ns_links(default)["lo"]["flags"]
    for path in (down, by_prepare, default):
        netns.delete(path)


def test_cached_sockets_stay_within_the_limit_read_when_reached(tmp_path, monkeypatch) -> None:
    """The fd limit is not read on every socket, yet the cache never grows past it, and
    a limit raised since the last read is seen before anything is evicted."""
    limit = [16]
    monkeypatch.setattr(transport, "_cache_limit", lambda: limit[0])
    monkeypatch.setattr(transport, "_limit", 0)
    store = NamespaceStore(str(tmp_path))
    first = store.create_many([f"a{i}" for i in range(20)])
    try:
        # The callers' own sockets (path None) count but are never evicted.
        kept = 16 - sum(1 for k in transport._sockets if k[0] is None)
        assert len(transport._sockets) <= 16
        assert all(cached_keys(k) for k in first[-kept:])  # the most recent are kept
        assert not any(cached_keys(k) for k in first[:-kept])
        limit[0] = 64
        second = store.create_many([f"b{i}" for i in range(20)])
        assert all(cached_keys(k) for k in first[-kept:] + second)  # nothing evicted
    finally:
        for key in store.mounted():
            store.delete(key)
    assert nsfs_mounts(tmp_path) == {}
