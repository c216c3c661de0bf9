"""Native builds of cnm. Package metadata lives in pyproject.toml.

Builds the Cython netlink codec (cnm.fastpath._codec). When Cython or a C compiler is
missing the build goes on without it, and cnm runs on the pure-Python codec
(CNM_FASTPATH=auto falls back with a warning; CNM_FASTPATH=native then fails).

Builds the BPF objects (ebpf/src/*.bpf.c -> ebpf/*.bpf.o, package data of cnm.ebpf)
with clang, by the rules in ebpf/build.py. Without clang the build warns and goes on: the
package installs, and cnm.ebpf reports "objects not built".
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import warnings
from pathlib import Path

from setuptools import Command, Extension, setup
from setuptools.command.build import build

ext_modules = []
try:
    from Cython.Build import cythonize
except ImportError:  # pragma: no cover - the build requirement normally provides it
    cythonize = None

if cythonize is not None and os.environ.get("CNM_NO_NATIVE") != "1":
    ext_modules = cythonize(
        [Extension("cnm.fastpath._codec", ["fastpath/_codec.pyx"], extra_compile_args=["-O2"])],
        compiler_directives={"language_level": "3"},
        quiet=True,
    )


class build_bpf(Command):
    """Compile the BPF programs into ebpf/*.bpf.o (in the source tree, where the editable
    install finds them) and copy them into build_lib for a regular install."""

    description = "compile cnm's BPF programs with clang"
    user_options: list = []
    editable_mode = False

    def initialize_options(self) -> None:
        self.build_lib = None

    def finalize_options(self) -> None:
        self.set_undefined_options("build_py", ("build_lib", "build_lib"))

    def _build_module(self):
        path = Path(__file__).resolve().parent / "ebpf" / "build.py"
        spec = importlib.util.spec_from_file_location("_cnm_ebpf_build", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    def run(self) -> None:
        bpf = self._build_module()
        try:
            objects = bpf.build_all()
        except bpf.BuildError as exc:
            warnings.warn(f"BPF objects not built: {exc}", stacklevel=1)
            return
        if not self.editable_mode and self.build_lib:
            target = Path(self.build_lib) / "cnm" / "ebpf"
            target.mkdir(parents=True, exist_ok=True)
            for obj in objects:
                shutil.copy2(obj, target / obj.name)

    def get_outputs(self) -> list[str]:
        return []


build.sub_commands = [*build.sub_commands, ("build_bpf", None)]

setup(ext_modules=ext_modules, cmdclass={"build_bpf": build_bpf})
