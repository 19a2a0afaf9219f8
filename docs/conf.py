"""Sphinx configuration for groupcomm (``python -m sphinx -W -b html docs <out>``)."""

import os
import sys

DOCS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(DOCS))     # the repository: groupcomm itself
sys.path.insert(0, DOCS)                      # generated.py

import generated

project = "groupcomm"
author = "the groupcomm authors"
extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon"]
autodoc_member_order = "bysource"
html_theme = "alabaster"
# _generated/ and examples/ hold pieces that pages include; they are not pages.
exclude_patterns = ["_build", "_generated", "examples"]


def _write_generated(app):
    """Regenerate the reference pieces from the code before anything is read."""
    generated.write_all(os.path.join(app.srcdir, "_generated"))


def setup(app):
    app.connect("builder-inited", _write_generated)
