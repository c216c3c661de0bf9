"""A check shared by tests that prove slow outside calls (plugins, etcd) never run under
the store's write lock."""

from __future__ import annotations

import os
import sqlite3


def write_lock_free(state_dir: str) -> bool:
    """Whether another connection could take the store's write lock right now."""
    db = sqlite3.connect(os.path.join(state_dir, "state.db"), timeout=0)
    try:
        db.execute("BEGIN IMMEDIATE")
        db.rollback()
        return True
    except sqlite3.OperationalError as exc:
        assert "locked" in str(exc), exc
        return False
    finally:
        db.close()
