"""Native builds of cnm.

Package metadata lives in pyproject.toml. This file exists for the native parts only:
the Cython netlink codec and the BPF objects are added here by their own issues.
"""

from setuptools import setup

setup()
