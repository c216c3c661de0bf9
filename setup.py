"""Native builds of cnm. Package metadata lives in pyproject.toml.

Builds the Cython netlink codec (cnm.fastpath._codec). When Cython or a C compiler is
missing the build goes on without it, and cnm runs on the pure-Python codec
(CNM_FASTPATH=auto falls back with a warning; CNM_FASTPATH=native then fails).
"""

from __future__ import annotations

import os

from setuptools import Extension, setup

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

setup(ext_modules=ext_modules)
