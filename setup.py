"""Shim so that `pip install -e .` works with older pip; metadata is in setup.cfg."""
from setuptools import setup

setup()
