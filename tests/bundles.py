"""Build real bundle artifacts in a test's directory, without network.

* :func:`build_wheel` -- a wheel made by hand with zipfile (``METADATA``,
  ``WHEEL``, ``RECORD`` with hashes, ``bundle.toml``) holding the module
  ``hello_bundle``: ``python -m hello_bundle PORT`` serves HTTP on 127.0.0.1
  and answers ``GET /`` with its version;
* :func:`build_tarball` -- the same program as a ``.tar.gz`` bundle;
* :func:`write_tar` -- a ``.tar.gz`` of arbitrary (also hostile) members;
* :func:`greeter_wheel` -- a hello bundle configured by groupcomm: answers ``VERSION GREETING GREETING``
  (from its configuration file and variable) on the port its configuration names.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import tarfile
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BUNDLE_NAME = "hello-bundle"
DIST = "hello_bundle"

HELLO_INIT = '''"""A tiny HTTP server that answers GET / with its version."""
VERSION = {version!r}
'''

HELLO_MAIN = '''import http.server
import sys

from hello_bundle import VERSION


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = VERSION.encode()
        self.send_response(200 if self.path == "/" else 404)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def main():
    port = int(sys.argv[1])
    with http.server.HTTPServer(("127.0.0.1", port), Handler) as server:
        server.serve_forever()


main()
'''


def manifest(version: str, *, name: str = BUNDLE_NAME, extra: str = "") -> str:
    """The hello bundle's ``bundle.toml``; ``extra`` is appended verbatim (top-level keys go first)."""
    return f'''name = "{name}"
version = "{version}"
description = "answers GET / with its version"
config = ["org.example.hello"]
{extra}
[start]
command = ["${{BUNDLE_PYTHON}}", "-m", "hello_bundle", "${{PORT:8080}}"]
env = {{ PYTHONUNBUFFERED = "1" }}
restart = "always"
stop_grace = "2s"

[health]
kind = "http"
url = "http://127.0.0.1:${{PORT:8080}}/"
interval = "1s"
'''


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def build_wheel(directory: Path, version: str, *, manifest_text: str | None = None, dist: str = DIST,
                metadata_version: str | None = None, filename: str | None = None,
                extra_files: dict[str, bytes] | None = None, with_manifest: bool = True) -> Path:
    """A ``hello_bundle`` wheel of ``version`` in ``directory``; the keywords make broken ones."""
    dist_info = f"{dist}-{version}.dist-info"
    files: dict[str, bytes] = {
        "hello_bundle/__init__.py": HELLO_INIT.format(version=version).encode(),
        "hello_bundle/__main__.py": HELLO_MAIN.encode(),
        f"{dist_info}/METADATA": (f"Metadata-Version: 2.1\nName: {dist}\n"
                                  f"Version: {metadata_version or version}\n"
                                  "Summary: answers GET / with its version\n").encode(),
        f"{dist_info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: tests/bundles.py\nRoot-Is-Purelib: true\n"
                              b"Tag: py3-none-any\n",
    }
    if with_manifest:
        files[f"{dist_info}/bundle.toml"] = (manifest_text or manifest(version)).encode()
    files.update(extra_files or {})
    record = "".join(f"{name},{_record_hash(data)},{len(data)}\n" for name, data in files.items())
    record += f"{dist_info}/RECORD,,\n"
    files[f"{dist_info}/RECORD"] = record.encode()
    path = directory / (filename or f"{dist}-{version}-py3-none-any.whl")
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return path


@dataclass
class Entry:
    """One member for :func:`write_tar`."""

    name: str
    data: bytes = b""
    type: bytes = tarfile.REGTYPE
    linkname: str = ""
    size: int | None = None
    """Override the header's size (``data`` is still what is written)."""
    mode: int = 0o644


def write_tar(path: Path, entries: Iterable[Entry]) -> Path:
    """A ``.tar.gz`` holding exactly ``entries`` (no checks: for hostile archives too)."""
    with tarfile.open(path, "w:gz") as tf:
        for e in entries:
            info = tarfile.TarInfo(e.name)
            info.type = e.type
            info.linkname = e.linkname
            info.mode = e.mode
            info.size = len(e.data) if e.size is None else e.size
            if e.size is None:
                tf.addfile(info, io.BytesIO(e.data) if info.isreg() else None)
            else:  # a header that lies: write it and the real data by hand
                block = info.tobuf(tf.format, tf.encoding, tf.errors) + e.data
                block += bytes(-len(block) % tarfile.BLOCKSIZE)
                tf.fileobj.write(block)
                tf.offset += len(block)
    return path


def hello_entries(version: str, *, manifest_text: str | None = None) -> list[Entry]:
    """The members of the hello bundle as a ``.tar.gz``."""
    return [
        Entry("bundle.toml", (manifest_text or manifest(version)).encode()),
        Entry("hello_bundle", type=tarfile.DIRTYPE, mode=0o755),
        Entry("hello_bundle/__init__.py", HELLO_INIT.format(version=version).encode()),
        Entry("hello_bundle/__main__.py", HELLO_MAIN.encode()),
        Entry("README", b"the hello bundle\n"),
        Entry("docs", type=tarfile.SYMTYPE, linkname="README"),
    ]


def build_tarball(directory: Path, version: str, *, manifest_text: str | None = None,
                  extra: Iterable[Entry] = ()) -> Path:
    """The hello bundle of ``version`` as ``hello-bundle-VERSION.tar.gz`` in ``directory``."""
    entries = [*hello_entries(version, manifest_text=manifest_text), *extra]
    return write_tar(directory / f"{BUNDLE_NAME}-{version}.tar.gz", entries)


# --------------------------------------------------------------------------- the greeter

GREETER_MAIN = '''import http.server
import os
import sys
import tomllib

from hello_bundle import VERSION

with open(os.environ["GROUPCOMM_CONFIG_FILE"], "rb") as f:
    CONFIG = tomllib.load(f).get("org.example.hello", {})
BODY = " ".join([VERSION, CONFIG.get("greeting", "-"),
                 os.environ.get("GROUPCOMM_CONFIG_ORG_EXAMPLE_HELLO_GREETING", "-")]).encode()


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()
        self.wfile.write(BODY)

    def log_message(self, *args):
        pass


with http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Handler) as server:
    server.serve_forever()
'''
"""Answers GET / with ``VERSION GREETING-FROM-THE-FILE GREETING-FROM-THE-ENVIRONMENT``."""

GREETER_MANIFEST = '''name = "hello-bundle"
version = "{version}"
config = {pids}

[start]
command = ["${{BUNDLE_PYTHON}}", "-m", "hello_bundle", "${{{port_var}:8080}}"]
restart = "always"
stop_grace = "2s"

[health]
kind = "http"
url = "http://127.0.0.1:${{{port_var}:8080}}/"
interval = "1s"
'''


def greeter_manifest(version: str, *, port_var: str = "GROUPCOMM_CONFIG_ORG_EXAMPLE_HELLO_PORT",
                     pids: tuple[str, ...] = ("org.example.hello",)) -> str:
    """The greeter's ``bundle.toml``: it reads ``pids`` and listens on the port ``${port_var}`` names."""
    return GREETER_MANIFEST.format(version=version, port_var=port_var, pids=json.dumps(list(pids)))


def greeter_wheel(directory: Path, version: str, **manifest: Any) -> Path:
    """A wheel of the greeter (:data:`GREETER_MAIN`) at ``version``; ``manifest``: see :func:`greeter_manifest`."""
    directory.mkdir(parents=True, exist_ok=True)
    return build_wheel(directory, version, manifest_text=greeter_manifest(version, **manifest),
                       extra_files={"hello_bundle/__main__.py": GREETER_MAIN.encode()})
