"""Build script for the two optional C extensions: loadkit.source._scanner (the record scanner's fast path) and
loadkit.postgres._keyhash (merge's key hashes, keyhints' fast path).

Everything else (metadata, dependencies, packages) is in pyproject.toml. ``optional=True``: without a C
compiler the install still succeeds and each runs its numpy path (``scanner.ACCELERATED`` and
``keyhints.ACCELERATED`` are False). In a checkout: ``python setup.py build_ext --inplace``.
"""
from setuptools import Extension, setup

setup(ext_modules=[Extension("loadkit.source._scanner", ["loadkit/source/_scanner.c"], optional=True,
                             extra_compile_args=["-O2"]),
                   Extension("loadkit.postgres._keyhash", ["loadkit/postgres/_keyhash.c"], optional=True,
                             extra_compile_args=["-O2"])])
