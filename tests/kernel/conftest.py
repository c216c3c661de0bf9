"""Fixtures shared by the privileged kernel tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from cnm.fastpath import netns

from .oracles import nsfs_mounts


@pytest.fixture
def _unmount_leftovers(tmp_path: Path) -> Iterator[None]:
    """After the test, unmount every namespace still mounted below its tmp_path.

    Not autouse: the modules that want it name it in `pytest.mark.usefixtures`.
    """
    yield
    for point in sorted(nsfs_mounts(tmp_path), reverse=True):
        netns.umount(point)
