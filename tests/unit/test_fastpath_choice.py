"""The fast-path switch: argument, CNM_FASTPATH, fallback and the native-missing error."""

from __future__ import annotations

import pytest

from cnm import fastpath
from cnm.control import NetworkController, errors


def test_env_sets_the_controller_default(dirs, monkeypatch) -> None:
    monkeypatch.setenv("CNM_FASTPATH", "python")
    with NetworkController(state_dir=dirs[0], run_dir=dirs[1]) as ctl:
        assert ctl.fastpath == "python"


def test_native_requested_but_missing_is_an_error(dirs, monkeypatch) -> None:
    monkeypatch.setattr(fastpath, "native_available", lambda: False)
    monkeypatch.setenv("CNM_FASTPATH", "native")
    with pytest.raises(errors.Unavailable, match="native"):
        NetworkController(state_dir=dirs[0], run_dir=dirs[1])
    with pytest.raises(errors.Unavailable, match="native"):
        NetworkController(state_dir=dirs[0], run_dir=dirs[1], fastpath="native")
    with pytest.raises(fastpath.BackendUnavailable):
        _ = fastpath.BACKEND


def test_auto_falls_back_to_python(dirs, monkeypatch) -> None:
    monkeypatch.setattr(fastpath, "native_available", lambda: False)
    monkeypatch.delenv("CNM_FASTPATH", raising=False)
    with NetworkController(state_dir=dirs[0], run_dir=dirs[1], fastpath="auto") as ctl:
        assert ctl.fastpath == "python"
    assert fastpath.BACKEND == "python"


def test_bad_env_value_is_rejected(dirs, monkeypatch) -> None:
    monkeypatch.setenv("CNM_FASTPATH", "turbo")
    with pytest.raises(errors.InvalidParameter, match="turbo"):
        NetworkController(state_dir=dirs[0], run_dir=dirs[1])


def test_auto_takes_native_when_built(dirs, monkeypatch) -> None:
    if not fastpath.native_available():
        pytest.skip("the native codec is not built")
    monkeypatch.delenv("CNM_FASTPATH", raising=False)
    with NetworkController(state_dir=dirs[0], run_dir=dirs[1]) as ctl:
        assert ctl.fastpath == "native"
    from cnm.fastpath import _codec

    assert fastpath.codec() is _codec
