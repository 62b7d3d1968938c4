"""A shim for the tools and habits that look for setup.py (`python setup.py develop`, older pip and IDEs).

Every piece of metadata lives in pyproject.toml (PEP 621) and the version in igds_fast/_version.py:
setuptools reads both from there, so this file holds nothing to keep in step.
"""
from setuptools import setup

setup()
