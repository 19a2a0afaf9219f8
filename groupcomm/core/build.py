"""cffi builder for the C Totem core and its socket pump (out-of-line API mode).

setuptools runs this at install through ``cffi_modules`` in setup.py; run it
directly (``python groupcomm/core/build.py``) to build in place.

Build switches (environment variables):

``GROUPCOMM_SANITIZE=1``
    compile with ``-fsanitize=address,undefined`` (run under
    ``LD_PRELOAD=$(gcc -print-file-name=libasan.so)``).
``GROUPCOMM_DEBUG=1``
    ``-O0 -g``.
``GROUPCOMM_MUTATION=N``
    not a build switch: mutations are a runtime config field
    (``RingConfig.mutation``) used only by the checker's own tests.
``GROUPCOMM_CFLAGS_EXTRA``
    appended verbatim.
"""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent.parent   # groupcomm/: the C sources live there (a fixed path)
HEADERS = ("_ring.h", "_seal.h", "_pump.h")   # the ring's API, the seal's, the socket pump's (uses both)
SOURCES = ("_ring.c", "_pump.c", "_seal.c")
LIBRARIES = ["crypto"]   # OpenSSL's libcrypto (AES-GCM, HKDF) for the seal; headers: libssl-dev


def read_cdef(header: Path = HERE / "_ring.h") -> str:
    """The declarations between CDEF-BEGIN and CDEF-END: one source of truth."""
    text = header.read_text()
    match = re.search(r"/\* CDEF-BEGIN \*/(.*)/\* CDEF-END \*/", text, re.S)
    if not match:
        raise RuntimeError(f"{header}: no CDEF-BEGIN/CDEF-END block")
    return match.group(1)


def compile_args() -> list[str]:
    args = ["-std=gnu11", "-Wall", "-Wextra", "-Wshadow", "-pthread"]
    if os.environ.get("GROUPCOMM_DEBUG") == "1":
        args += ["-O0", "-g"]
    else:
        args += ["-O2"]
    if os.environ.get("GROUPCOMM_SANITIZE") == "1":
        args += ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-fno-sanitize-recover=undefined"]
    args += shlex.split(os.environ.get("GROUPCOMM_CFLAGS_EXTRA", ""))
    return args


def make_builder(module_name: str = "groupcomm.core._ring_cffi", *, absolute_paths: bool = False) -> FFI:
    """A builder for the core; setuptools wants relative paths, ``ffi.compile(tmpdir=...)`` absolute ones."""
    where = (lambda p: str(p)) if absolute_paths else os.path.relpath
    builder = FFI()
    builder.cdef("".join(read_cdef(HERE / h) for h in HEADERS))
    link = ["-pthread"]
    if os.environ.get("GROUPCOMM_SANITIZE") == "1":
        link.append("-fsanitize=address,undefined")
    builder.set_source(
        module_name,
        "".join(f'#include "{h}"\n' for h in HEADERS),
        sources=[where(HERE / c) for c in SOURCES],
        include_dirs=[where(HERE)],
        extra_compile_args=compile_args(),
        libraries=LIBRARIES,
        extra_link_args=link,
    )
    return builder


ffibuilder = make_builder()

if __name__ == "__main__":
    make_builder(absolute_paths=True).compile(tmpdir=str(HERE.parent), verbose=True)
