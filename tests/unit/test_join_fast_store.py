"""What a join reads from the store, and what it keeps between joins.

`SQLiteStore.join_reads` reads an endpoint, its network, the joined count and the
target sandbox in one statement and keeps network and sandbox records between joins.
These tests show that nothing kept goes stale: a write by another store on the same
state_dir (another controller, another process), a write of this store and a rolled back
transaction are all seen by the next join; and that a join's one-statement confirmation
waits for another writer instead of failing.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time

import pytest

from cnm.control.store import SQLiteStore
from cnm.control.types import EndpointRecord, SandboxRecord
from tests.unit.test_store import _ep_record, _net_record

NET = "a" * 64
SB = "c" * 64


def _ep(n: int, **changes: object) -> EndpointRecord:
    rec = _ep_record(NET, f"e{n}", f"{n:064x}")
    changes.setdefault("ipv4_address", f"10.9.0.{n + 2}/24")
    return dataclasses.replace(rec, **changes)  # type: ignore[arg-type]


def _sb(sid: str = SB, container: str = "c1", **changes: object) -> SandboxRecord:
    rec = SandboxRecord(
        id=sid,
        container_id=container,
        key=f"/run/cnm/netns/{sid}",
        explicit=True,
        hostname=None,
        dns=(),
        dns_search=(),
        extra_hosts=(),
        state="ready",
    )
    return dataclasses.replace(rec, **changes)  # type: ignore[arg-type]


@pytest.fixture
def stores(tmp_path: object) -> object:
    """Two stores on one state_dir, as two controllers have."""
    state = os.path.join(str(tmp_path), "state")
    a, b = SQLiteStore(state), SQLiteStore(state)
    a.put_network(_net_record("n", NET))
    a.put_endpoints([_ep(1), _ep(2)])
    a.put_sandbox(_sb())
    yield a, b
    a.close()
    b.close()


def _reads(store: SQLiteStore, n: int = 1, **target: str) -> object:
    with store.tx():
        return store.join_reads(f"{n:064x}", **target)


def test_one_read_gives_endpoint_network_count_and_sandbox(stores: tuple) -> None:
    a, _ = stores
    found = _reads(a, sandbox_id=SB)
    assert found.endpoint == _ep(1)
    assert found.network == _net_record("n", NET)
    assert found.joined == 0
    assert found.sandbox == _sb()
    assert found.present == ()
    by_container = _reads(a, container_id="c1")
    assert by_container.sandbox == _sb()
    assert _reads(a, sandbox_id="f" * 64).sandbox is None
    assert _reads(a, container_id="nobody").sandbox is None
    assert _reads(a, 9) is None


def test_present_endpoints_and_count_follow_joins(stores: tuple) -> None:
    a, _ = stores
    a.put_join_intents([(_ep(1).id, SB)])
    a.put_join_results([(_ep(1).id, {"ifname": "eth0", "gateway": True})])
    found = _reads(a, 2, sandbox_id=SB)
    assert found.joined == 1
    assert found.present == ((NET, "eth0", True),)
    assert found.endpoint == _ep(2)


def test_another_store_deleting_the_sandbox_is_seen(stores: tuple) -> None:
    a, b = stores
    assert _reads(a, sandbox_id=SB).sandbox == _sb()  # now kept by a
    b.delete_sandboxes([SB])
    assert _reads(a, sandbox_id=SB).sandbox is None
    assert _reads(a, container_id="c1").sandbox is None


def test_another_store_changing_the_network_and_sandbox_is_seen(stores: tuple) -> None:
    a, b = stores
    _reads(a, sandbox_id=SB)
    b.set_network_state(NET, "deleting")
    b.put_sandbox(_sb(state="deleting"))
    found = _reads(a, sandbox_id=SB)
    assert found.network is not None and found.network.state == "deleting"
    assert found.sandbox is not None and found.sandbox.state == "deleting"


def test_own_writes_are_seen(stores: tuple) -> None:
    a, _ = stores
    _reads(a, sandbox_id=SB)
    a.put_sandbox(_sb(hostname="web"))
    a.set_network_state(NET, "deleting")
    found = _reads(a, sandbox_id=SB)
    assert found.sandbox == _sb(hostname="web")
    assert found.network is not None and found.network.state == "deleting"
    a.delete_sandboxes([SB])
    assert _reads(a, sandbox_id=SB).sandbox is None


def test_a_rolled_back_write_is_not_kept(stores: tuple) -> None:
    a, _ = stores
    with pytest.raises(RuntimeError), a.tx():
        a.put_sandboxes([_sb(state="deleting")])
        assert a.join_reads(_ep(1).id, sandbox_id=SB).sandbox.state == "deleting"
        raise RuntimeError("roll back")
    assert _reads(a, sandbox_id=SB).sandbox == _sb()


def test_a_known_record_is_used_only_while_the_row_says_the_same(stores: tuple) -> None:
    a, b = stores
    known = _ep(1)
    assert _reads(a, known=known).endpoint is known
    b.put_endpoints([_ep(1, state="deleting")])
    found = _reads(a, known=known).endpoint
    assert found is not known and found == _ep(1, state="deleting")
    # Non-empty options or driver data are parsed, never taken on trust.
    b.put_endpoints([_ep(1, options={"k": "v"})])
    found = _reads(a, known=_ep(1, options={"k": "v"})).endpoint
    assert found == _ep(1, options={"k": "v"})


@pytest.mark.parametrize(
    "change",
    [
        {"ipv4_address": "10.9.0.99/24"},
        {"ipv6_address": "fd00::99/64"},
        {"mac_address": "02:42:0a:09:00:99"},
        {"sandbox_id": SB},
        {"join_state": "leaving"},
        {"name": "renamed"},
        {"driver_data": {"ifname": "eth3"}},
    ],
)
def test_a_known_record_differing_in_one_field_is_not_taken(
    stores: tuple, change: dict[str, object]
) -> None:
    """The row compared with the caller's record in SQL: any one field that differs
    (each column the comparison covers, and driver data) makes the stored row win."""
    a, b = stores
    known = _ep(1)
    stored = _ep(1, **change)
    b.put_endpoints([stored])
    found = _reads(a, sandbox_id=SB, known=known).endpoint
    assert found is not known
    assert found == stored
    # And the other way round: a known record with the change, the row without it.
    b.put_endpoints([known])
    assert _reads(a, sandbox_id=SB, known=stored).endpoint == known


def test_single_confirmation_waits_for_another_writer(stores: tuple) -> None:
    a, b = stores
    a.put_join_intents([(_ep(1).id, SB)])
    held = threading.Event()

    def hold() -> None:
        with b.tx():
            b.put_endpoints([_ep(2, name="e2x")])
            held.set()
            time.sleep(0.3)

    t = threading.Thread(target=hold)
    t.start()
    assert held.wait(5)
    a.put_join_results([(_ep(1).id, {"ifname": "eth0"})])  # one statement, no BEGIN
    t.join()
    rec = a.endpoint_by_id(_ep(1).id)
    assert rec is not None and rec.join_state == "joined" and rec.driver_data == {"ifname": "eth0"}
    other = a.endpoint_by_id(_ep(2).id)
    assert other is not None and other.name == "e2x"
