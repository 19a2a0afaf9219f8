"""Loads the compiled C core.

``GROUPCOMM_RING_LIBRARY`` may name another build of the same extension (for
example one compiled with sanitizers by the test suite); otherwise the module
built at install time is used.
"""

from __future__ import annotations

import importlib.util
import os

_override = os.environ.get("GROUPCOMM_RING_LIBRARY")
if _override:
    _spec = importlib.util.spec_from_file_location("groupcomm.core._ring_cffi", _override)
    if _spec is None or _spec.loader is None:
        raise ImportError(f"GROUPCOMM_RING_LIBRARY={_override!r} is not a loadable extension")
    _module = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_module)
    ffi, lib = _module.ffi, _module.lib
else:
    try:
        from groupcomm.core._ring_cffi import ffi, lib  # type: ignore[import-not-found]
    except ImportError as exc:  # pragma: no cover - only on a broken install
        raise ImportError(
            "groupcomm's C core is not built; install the package with "
            "`pip install -e .` (or `pip install .`) so cffi compiles groupcomm/_ring.c"
        ) from exc

__all__ = ["ffi", "lib"]
