"""The package version, in one place: pyproject.toml reads it (`[tool.setuptools.dynamic]`), igds_fast re-exports it.

A plain assignment with no imports, so the build reads it without importing igds_fast (or torch).
"""
__version__ = "0.1.0"
