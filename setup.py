"""Build script for the one optional C extension (loadkit.source._scanner, the record scanner's fast path).

Everything else (metadata, dependencies, packages) is in pyproject.toml. ``optional=True``: without a C
compiler the install still succeeds and the scanner runs its numpy path (``scanner.ACCELERATED`` is
False). In a checkout: ``python setup.py build_ext --inplace``.
"""
from setuptools import Extension, setup

setup(ext_modules=[Extension("loadkit.source._scanner", ["loadkit/source/_scanner.c"], optional=True,
                             extra_compile_args=["-O2"])])
