# Only what pyproject.toml cannot say: setuptools has no pyproject key for cffi_modules.
from setuptools import setup

setup(cffi_modules=["groupcomm/core/build.py:ffibuilder"])
