"""Packaging: `cnm` is a namespace package mapped from the repo's top-level folders.

(a) The running code is the repo's own (the editable install maps cnm.control to
control/, and so on). (b) A plain, non-editable install builds and imports on its own.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import cnm
import cnm.control

REPO = Path(__file__).resolve().parents[2]
SUBPACKAGES = {"cnm.control": "control", "cnm.fastpath": "fastpath", "cnm.ebpf": "ebpf"}


def _pyproject() -> dict:
    with open(REPO / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


def _under(path: str | os.PathLike[str] | None, root: Path) -> bool:
    assert path is not None
    return Path(path).resolve().is_relative_to(root.resolve())


# --- (a) the editable install ----------------------------------------------------------


def test_running_code_is_the_repo() -> None:
    assert Path(cnm.control.__file__).resolve() == (REPO / "control" / "__init__.py").resolve()
    for name, folder in SUBPACKAGES.items():
        mod = importlib.import_module(name)
        assert Path(mod.__file__).resolve().parent == (REPO / folder).resolve(), name
    for name in ("cnm.control.store.sqlite", "cnm.control.ipam.default", "cnm.control.cli"):
        mod = importlib.import_module(name)
        assert _under(mod.__file__, REPO / "control"), (name, mod.__file__)


def test_cnm_is_a_namespace_package() -> None:
    assert not (REPO / "cnm").exists(), "a cnm/ folder would shadow the package-dir mapping"
    for folder in SUBPACKAGES.values():
        assert (REPO / folder / "__init__.py").is_file()
    assert getattr(cnm, "__file__", None) is None
    spec = cnm.__spec__
    assert spec is not None
    assert spec.origin in (None, "namespace")
    assert spec.submodule_search_locations is not None
    assert type(cnm.__path__).__name__ == "_NamespacePath"
    assert not isinstance(cnm.__path__, list)
    for entry in cnm.__path__:
        assert not os.path.exists(os.path.join(entry, "__init__.py")), entry


def test_every_package_folder_is_declared() -> None:
    """A sub-package missing from pyproject's list would vanish from a real install."""
    tool = _pyproject()["tool"]["setuptools"]
    assert tool["package-dir"] == SUBPACKAGES
    declared = set(tool["packages"])
    found = set()
    for name, folder in SUBPACKAGES.items():
        for init in (REPO / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(REPO / folder)
            found.add(".".join([name, *rel.parts]) if rel.parts else name)
    assert declared == found


def test_console_script_is_declared() -> None:
    assert _pyproject()["project"]["scripts"] == {"cnm": "cnm.control.cli:main"}
    from cnm.control.cli import main

    assert callable(main)


# --- (b) a non-editable install --------------------------------------------------------

_COPY_IGNORE = shutil.ignore_patterns(
    ".git",
    "build",
    "dist",
    "*.egg-info",
    "__pycache__",
    ".pytest_cache",
    ".ruff_cache",
    ".benchmarks",
    ".hypothesis",
    "tests",
    "benchmarks",
)

_PROBE = """
import json, sys
import cnm, cnm.control, cnm.fastpath, cnm.ebpf
import cnm.control.store, cnm.control.ipam, cnm.control.drivers, cnm.control.osl
from cnm.control import NetworkController, IPAMConfig, errors
with NetworkController(state_dir=sys.argv[1], run_dir=sys.argv[2]) as ctl:
    net = ctl.create_network("n", driver="null", ipv4=[IPAMConfig(subnet="10.60.0.0/24")])
    ep = net.create_endpoint("e")
    addr = str(ep.ipv4_address)
print(json.dumps({
    "control": cnm.control.__file__,
    "fastpath": cnm.fastpath.__file__,
    "ebpf": cnm.ebpf.__file__,
    "path": list(cnm.__path__),
    "cnm_file": getattr(cnm, "__file__", None),
    "addr": addr,
    "editable": sorted(m for m in sys.modules if "editable" in m),
}))
"""


# pytest-timeout is not a dependency: the subprocess timeouts bound this test instead.
INSTALL_TIMEOUT = 180  # seconds for pip; it usually takes 2-20 s


def test_non_editable_install(tmp_path: Path) -> None:
    """`pip install --target` of the repo (slow: about 2-20 s), imported from elsewhere."""
    src = tmp_path / "src"
    target = tmp_path / "site"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # Build from a copy: an in-tree build would leave build/ and egg-info in the repo.
    shutil.copytree(REPO, src, ignore=_COPY_IGNORE)
    pip = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation"]
    pip += ["--no-index", "--disable-pip-version-check", "--quiet", "--target", str(target)]
    proc = subprocess.run(
        [*pip, str(src)], capture_output=True, text=True, timeout=INSTALL_TIMEOUT, cwd=elsewhere
    )
    assert proc.returncode == 0, (
        "pip install --no-build-isolation failed (setuptools>=68 and wheel must be in the "
        f"environment; the test extra lists them):\n{proc.stdout}\n{proc.stderr}"
    )
    assert not (target / "cnm" / "__init__.py").exists()
    for folder in ("control", "fastpath", "ebpf"):
        assert (target / "cnm" / folder / "__init__.py").is_file(), folder

    # -S: no site-packages processing, so the editable finder (.pth) cannot interfere;
    # the dependencies are reached through PYTHONPATH after the install target.
    site_dirs = [p for p in sys.path if p.endswith("site-packages")]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "CNM_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(target), *site_dirs])
    proc = subprocess.run(
        [sys.executable, "-S", "-c", _PROBE, str(tmp_path / "state"), str(tmp_path / "run")],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=elsewhere,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("control", "fastpath", "ebpf"):
        assert _under(info[key], target), (key, info[key])
        assert not _under(info[key], REPO), (key, info[key])
    assert info["path"] == [str(target / "cnm")]
    assert info["cnm_file"] is None
    assert info["editable"] == []
    assert info["addr"] == "10.60.0.2/24"

    # The installed command line works too (its entry point and every sub-package).
    entry_points = next(target.glob("cnm-*.dist-info")) / "entry_points.txt"
    assert "cnm = cnm.control.cli:main" in entry_points.read_text()
    cli = [sys.executable, "-S", "-m", "cnm.control.cli", "--json", "network", "ls"]
    dirs = ["--state-dir", str(tmp_path / "state"), "--run-dir", str(tmp_path / "run")]
    proc = subprocess.run(
        [*cli[:4], *dirs, *cli[4:]],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=elsewhere,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    assert [n["name"] for n in json.loads(proc.stdout)] == ["n"]
