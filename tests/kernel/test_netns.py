"""cnm.fastpath.netns against the kernel, checked with independent tools.

Every claim about a namespace is checked without cnm's own helpers: /proc/self/mountinfo
says what is mounted where (and which namespace inode), `nsenter --net=<path> ip -j ...`
says what is inside, and /proc/self/task/*/ns/net says where each thread of this
process is.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
import sys
import threading

import pytest

from cnm.fastpath import netns

from .oracles import assert_fresh_loopback_only, nsfs_mounts

pytestmark = [pytest.mark.privileged, pytest.mark.usefixtures("_unmount_leftovers")]


# --- independent oracles -----------------------------------------------------------------


def ns_identity(path: str | os.PathLike[str]) -> str:
    """What /proc/self/ns/net reads as for a process entered into `path`."""
    return subprocess.run(
        ["nsenter", f"--net={path}", "readlink", "/proc/self/ns/net"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()


def _here() -> str:
    """The calling thread's network namespace."""
    return os.readlink("/proc/thread-self/ns/net")


def thread_namespaces() -> dict[int, str]:
    """Every thread of this process -> its network namespace."""
    out = {}
    for tid in os.listdir("/proc/self/task"):
        with contextlib.suppress(FileNotFoundError):
            out[int(tid)] = os.readlink(f"/proc/self/task/{tid}/ns/net")
    return out


@pytest.fixture
def home() -> str:
    """This process's namespace, which every thread must be in before and after."""
    me = os.readlink("/proc/self/ns/net")
    assert set(thread_namespaces().values()) == {me}
    return me


# --- create --------------------------------------------------------------------------------


def test_create_makes_a_bind_mounted_namespace_with_only_loopback_up(tmp_path, home) -> None:
    path = tmp_path / "ns1"
    netns.create(str(path))

    mounts = nsfs_mounts(tmp_path)
    assert list(mounts) == [str(path)]
    assert mounts[str(path)] == f"net:[{os.stat(path).st_ino}]"
    # A new namespace, not ours, and what nsenter finds behind the path is what is mounted.
    assert mounts[str(path)] != home
    assert ns_identity(path) == mounts[str(path)]
    assert_fresh_loopback_only(path)
    assert set(thread_namespaces().values()) == {home}

    other = tmp_path / "ns2"
    netns.create(str(other))
    assert nsfs_mounts(other)[str(other)] not in (mounts[str(path)], home)
    assert_fresh_loopback_only(other)


def test_create_many_splits_a_big_batch_over_two_workers(tmp_path, home) -> None:
    """From PARALLEL_CREATE_MIN paths on, two worker threads make the namespaces at once
    (on a host with more than one CPU): each path gets its own namespace with loopback up,
    a path that fails gets its error at its own index and nothing behind it, and every
    thread comes home."""
    n = netns.PARALLEL_CREATE_MIN + 8
    paths = [str(tmp_path / f"p{i}") for i in range(n)]
    taken = paths[n - 3]  # in the second half
    with open(taken, "w") as f:
        f.write("keep me")
    threads: dict[str, str] = {}

    def prepare(path: str) -> None:
        threads[path] = threading.current_thread().name

    outcomes = netns.create_many(paths, prepare)
    assert [type(o) for o in outcomes] == [
        FileExistsError if p == taken else type(None) for p in paths
    ]
    mounts = nsfs_mounts(tmp_path)
    assert sorted(mounts) == sorted(p for p in paths if p != taken)
    assert len(set(mounts.values())) == n - 1 and home not in mounts.values()
    for p in (paths[0], paths[-1]):
        assert_fresh_loopback_only(p)
    with open(taken) as f:
        assert f.read() == "keep me"
    if len(os.sched_getaffinity(0)) > 1:
        first = {threads[p] for p in paths[: (n + 1) // 2]}
        second = {threads[p] for p in paths[(n + 1) // 2 :] if p != taken}
        assert len(first) == len(second) == 1 and first != second, threads
    assert set(thread_namespaces().values()) == {home}
    for p in paths:
        if p != taken:
            netns.delete(p)


def test_create_at_an_existing_file_fails_and_leaves_it_alone(tmp_path, home) -> None:
    path = tmp_path / "taken"
    path.write_text("keep me")
    before = os.stat(path)
    with pytest.raises(FileExistsError):
        netns.create(str(path))
    assert path.read_text() == "keep me"
    assert os.stat(path).st_ino == before.st_ino
    assert nsfs_mounts(tmp_path) == {}
    assert set(thread_namespaces().values()) == {home}


def test_create_at_an_existing_namespace_fails_and_keeps_that_namespace(tmp_path, home) -> None:
    path = tmp_path / "ns"
    netns.create(str(path))
    held = nsfs_mounts(tmp_path)
    with pytest.raises(FileExistsError):
        netns.create(str(path))
    assert nsfs_mounts(tmp_path) == held  # same namespace still mounted, nothing stacked
    assert_fresh_loopback_only(path)
    assert set(thread_namespaces().values()) == {home}


def test_create_in_a_missing_directory_fails_cleanly(tmp_path, home) -> None:
    with pytest.raises(FileNotFoundError):
        netns.create(str(tmp_path / "no" / "such" / "dir"))
    assert not (tmp_path / "no").exists()
    assert set(thread_namespaces().values()) == {home}


@pytest.mark.parametrize("step", ["mount", "_set_link_up"])
def test_create_leaves_nothing_when_a_step_fails(tmp_path, home, monkeypatch, step) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        raise OSError(errno.EIO, f"injected {step} failure")

    monkeypatch.setattr(netns, step, fail)
    path = tmp_path / "ns"
    with pytest.raises(OSError, match="injected"):
        netns.create(str(path))
    assert not path.exists()
    assert nsfs_mounts(tmp_path) == {}
    # The worker came home and still works.
    assert set(thread_namespaces().values()) == {home}
    monkeypatch.undo()
    netns.create(str(path))
    assert_fresh_loopback_only(path)
    assert set(thread_namespaces().values()) == {home}


# --- delete --------------------------------------------------------------------------------


def test_delete_unmounts_and_removes(tmp_path) -> None:
    path = tmp_path / "ns"
    netns.create(str(path))
    assert str(path) in nsfs_mounts(tmp_path)
    netns.delete(str(path))
    assert not os.path.lexists(path)
    assert nsfs_mounts(tmp_path) == {}
    # Deleting again, or something that never existed, is not an error.
    netns.delete(str(path))
    netns.delete(str(tmp_path / "never" / "there"))


def test_delete_removes_a_stale_plain_file(tmp_path) -> None:
    path = tmp_path / "stale"
    path.write_text("")
    netns.delete(str(path))
    assert not os.path.lexists(path)


def test_delete_removes_the_handle_while_an_open_holder_keeps_the_namespace(tmp_path) -> None:
    """delete() drops cnm's handle only: a process still holding the namespace open
    (a container, say) keeps it, and it is the same namespace."""
    path = tmp_path / "ns"
    netns.create(str(path))
    ident = nsfs_mounts(tmp_path)[str(path)]
    fd = os.open(path, os.O_RDONLY)
    try:
        netns.delete(str(path))
        assert not os.path.lexists(path)
        assert ns_identity(f"/proc/{os.getpid()}/fd/{fd}") == ident
    finally:
        os.close(fd)


# --- is_netns ------------------------------------------------------------------------------


def test_is_netns(tmp_path) -> None:
    path = tmp_path / "ns"
    netns.create(str(path))
    plain = tmp_path / "plain"
    plain.write_text("")
    assert netns.is_netns(str(path)) is True
    assert netns.is_netns("/proc/self/ns/net") is True
    assert netns.is_netns(str(plain)) is False
    assert netns.is_netns(str(tmp_path)) is False
    assert netns.is_netns(str(tmp_path / "missing")) is False
    # A namespace, but not a network namespace.
    assert netns.is_netns("/proc/self/ns/mnt") is False
    assert netns.is_netns("/proc/self/ns/uts") is False
    netns.delete(str(path))
    assert netns.is_netns(str(path)) is False


# --- run_in --------------------------------------------------------------------------------


def test_run_in_runs_inside_and_everyone_stays_home(tmp_path, home) -> None:
    path = tmp_path / "ns"
    netns.create(str(path))
    ident = nsfs_mounts(tmp_path)[str(path)]
    caller_before = _here()

    inside = netns.run_in(str(path), _here)
    assert inside == ident != home
    assert netns.run_in(str(path), netns.link_names) == ["lo"]
    assert netns.run_in(str(path), lambda: netns.link_is_up("lo")) is True

    assert _here() == caller_before == home
    assert set(thread_namespaces().values()) == {home}  # the worker came home too


def test_run_in_comes_home_after_the_work_raises(tmp_path, home) -> None:
    path = tmp_path / "ns"
    netns.create(str(path))

    def boom() -> None:
        raise ValueError("from inside")

    with pytest.raises(ValueError, match="from inside"):
        netns.run_in(str(path), boom)
    assert set(thread_namespaces().values()) == {home}
    # Entering something that is not a namespace fails without moving anyone.
    plain = tmp_path / "plain"
    plain.write_text("")
    with pytest.raises(OSError):
        netns.run_in(str(plain), os.getpid)
    with pytest.raises(FileNotFoundError):
        netns.run_in(str(tmp_path / "missing"), os.getpid)
    assert set(thread_namespaces().values()) == {home}
    assert netns.run_in(str(path), _here) == nsfs_mounts(tmp_path)[str(path)]


def test_run_in_from_many_threads_lands_in_the_right_namespace(tmp_path, home) -> None:
    paths = [str(tmp_path / f"ns{i}") for i in range(3)]
    for p in paths:
        netns.create(p)
    idents = nsfs_mounts(tmp_path)
    wrong: list[tuple[str, str]] = []

    def work(n: int) -> None:
        for i in range(15):
            p = paths[(n + i) % len(paths)]
            got = netns.run_in(p, _here)
            if got != idents[p]:
                wrong.append((p, got))
            if (now := _here()) != home:
                wrong.append(("caller moved", now))

    threads = [threading.Thread(target=work, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wrong == []
    assert set(thread_namespaces().values()) == {home}


# --- no processes --------------------------------------------------------------------------

_SPAWN_EVENTS = frozenset(
    {"os.fork", "os.forkpty", "os.posix_spawn", "os.exec", "os.spawn", "os.system"}
    | {"subprocess.Popen"}
)
_watch: list[list[str]] = []
_hook_installed = False


def _audit(event: str, args: tuple[object, ...]) -> None:
    if _watch and event in _SPAWN_EVENTS:
        _watch[-1].append(event)
        raise RuntimeError(f"process creation during a netns call: {event}")


def test_create_delete_and_run_in_spawn_no_process(tmp_path, monkeypatch) -> None:
    global _hook_installed
    if not _hook_installed:
        sys.addaudithook(_audit)
        _hook_installed = True

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a process was spawned")

    seen: list[str] = []
    path = str(tmp_path / "ns")
    monkeypatch.setattr(subprocess, "Popen", refuse)
    monkeypatch.setattr(os, "fork", refuse)
    monkeypatch.setattr(os, "posix_spawn", refuse)
    monkeypatch.setattr(os, "posix_spawnp", refuse)
    monkeypatch.setattr(os, "system", refuse)
    _watch.append(seen)
    try:
        netns.create(path)
        inside = netns.run_in(path, netns.link_names)
        up = netns.is_netns(path)
        netns.delete(path)
    finally:
        _watch.pop()
        monkeypatch.undo()
    assert seen == []
    assert inside == ["lo"] and up
    assert not os.path.lexists(path)
    assert nsfs_mounts(tmp_path) == {}
    # The hook itself works: it does see a spawn when one happens.
    _watch.append(seen)
    try:
        with pytest.raises(RuntimeError, match="process creation"):
            subprocess.run(["true"], check=False)
    finally:
        _watch.pop()
    assert seen == ["subprocess.Popen"]


@pytest.mark.parametrize("nested", ["run_in", "create"])
def test_a_nested_call_returns_to_the_outer_namespace(tmp_path, home, nested) -> None:
    """Work handed to run_in may itself call run_in or create (it then runs on the worker
    thread directly). When that inner call returns, the rest of the outer work must still
    run in the outer namespace, not in the worker's home (the host's, in production)."""
    outer, inner = str(tmp_path / "outer"), str(tmp_path / "inner")
    netns.create(outer)
    if nested == "run_in":
        netns.create(inner)
    ident = nsfs_mounts(tmp_path)[outer]

    def work() -> tuple[str, str]:
        before = _here()
        if nested == "run_in":
            assert netns.run_in(inner, _here) == nsfs_mounts(tmp_path)[inner]
        else:
            netns.create(inner)
        return before, _here()

    before, after = netns.run_in(outer, work)
    assert set(thread_namespaces().values()) == {home}
    assert before == ident
    assert after == ident, f"after the nested {nested} the work ran at home ({after})"
    assert_fresh_loopback_only(inner)


def test_delete_of_a_symlink_removes_the_link_and_never_unmounts_its_target(tmp_path) -> None:
    """delete() runs as root on whatever sits in the netns directory (reconcile removes
    everything there that no sandbox owns), so it must not follow a symlink and detach
    the mount at the other end: umount2 needs UMOUNT_NOFOLLOW."""
    target = tmp_path / "someone-elses"
    netns.create(str(target))
    held = nsfs_mounts(tmp_path)
    link = tmp_path / "link"
    link.symlink_to(target)
    netns.delete(str(link))
    assert not os.path.lexists(link)
    assert nsfs_mounts(tmp_path) == held, "delete followed the symlink and unmounted its target"
    assert_fresh_loopback_only(target)


def test_a_forked_child_can_still_use_namespaces(tmp_path) -> None:
    """After fork() the child has no worker thread (only the forking thread survives);
    the helpers must start a new one there instead of queueing work that never runs."""
    netns.create(str(tmp_path / "parent"))  # the parent's worker is running now
    path = str(tmp_path / "child")
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            signal.alarm(3)
            netns.create(path)
            code = 0 if netns.run_in(path, netns.link_names) == ["lo"] else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert not os.WIFSIGNALED(status), "the child hung: its namespace work never ran"
    assert os.WEXITSTATUS(status) == 0
    assert_fresh_loopback_only(path)
