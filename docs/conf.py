"""Sphinx configuration for groupcomm."""

import os
import sys

sys.path.insert(0, os.path.abspath(".."))

project = "groupcomm"
author = "the groupcomm authors"
extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon"]
autodoc_member_order = "bysource"
html_theme = "alabaster"
exclude_patterns = ["_build"]


def _write_generated(app):
    """Render the ring's own membership transition table and config defaults."""
    from groupcomm.core.ring import RingConfig, transition_table

    out = os.path.join(app.srcdir, "_generated")
    os.makedirs(out, exist_ok=True)
    rows = transition_table()
    with open(os.path.join(out, "transitions.rst"), "w") as f:
        f.write(".. list-table::\n   :header-rows: 1\n\n   * - state\n     - input\n     - next\n")
        for state, inp, action in rows:
            f.write(f"   * - {state}\n     - {inp}\n     - {action}\n")
    with open(os.path.join(out, "transitions.dot"), "w") as f:
        f.write("digraph membership {\n  rankdir=LR;\n")
        for state, inp, action in rows:
            target = action.split(" ")[0]
            f.write(f'  "{state}" -> "{target}" [label="{inp}"];\n')
        f.write("}\n")
    with open(os.path.join(out, "config.rst"), "w") as f:
        f.write(".. list-table::\n   :header-rows: 1\n\n   * - setting\n     - default\n")
        for name, field in RingConfig.__dataclass_fields__.items():
            if field.repr:
                f.write(f"   * - ``{name}``\n     - ``{field.default!r}``\n")


def setup(app):
    app.connect("builder-inited", _write_generated)
