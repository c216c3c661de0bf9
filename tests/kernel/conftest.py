"""Fixtures shared by the privileged kernel tests."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from cnm import fastpath
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


@pytest.fixture(params=["python", "native"])
def backend(request: pytest.FixtureRequest) -> str:
    """Both codecs; native skips when it is not built, unless CNM_REQUIRE_NATIVE=1."""
    name: str = request.param
    if name == "native" and not fastpath.native_available():
        if os.environ.get("CNM_REQUIRE_NATIVE") == "1":
            pytest.fail("CNM_REQUIRE_NATIVE=1 but cnm.fastpath._codec is not built")
        pytest.skip("the native codec (cnm.fastpath._codec) is not built")
    return name
