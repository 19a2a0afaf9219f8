# Only what pyproject.toml cannot say: setuptools has no pyproject key for cffi_modules.
from setuptools import setup

setup(cffi_modules=["groupcomm/_ring_build.py:ffibuilder"])
