"""The bundle: a Python wheel or a ``.tar.gz`` carrying a ``bundle.toml`` manifest.

Where the manifest is:

* a wheel (``.whl``): ``<dist>-<version>.dist-info/bundle.toml`` (the wheel's
  only ``.dist-info`` directory);
* a ``.tar.gz``: ``bundle.toml`` at the archive's top level (``./bundle.toml`` too).

The manifest (TOML)::

    name = "hello-bundle"            # letters, digits, '_', '.', '-' (as supervisor process names), <= 100
    version = "1.2"                  # PEP 440; kept in normalized form ("1.02" -> "1.2")
    description = "Says its version over HTTP"        # optional
    config = ["org.example.hello"]   # optional: the configuration PIDs the bundle reads

    [start]                          # how to run it (the supervisor's [[process]] fields)
    command = ["${BUNDLE_PYTHON}", "-m", "hello_bundle", "${PORT:8080}"]
    env = { PYTHONUNBUFFERED = "1" } # optional
    restart = "always"               # optional: "always" | "on-failure" | "never"
    stop_signal = "SIGTERM"          # optional
    stop_grace = "5s"                # optional

    [health]                         # optional: the supervisor's health table, same keys
    kind = "http"
    url = "http://127.0.0.1:${PORT:8080}/"
    interval = "1s"

Strings of ``start`` and ``health`` may use ``${NAME}`` / ``${NAME:default}``
(``$${`` is a literal ``${``).  Always defined: ``BUNDLE_HOME`` (the installed
environment's root, a venv), ``BUNDLE_PYTHON`` (its interpreter),
``BUNDLE_NAME`` and ``BUNDLE_VERSION``; any other variable must have a
default, because the manifest is checked when it is read, before any node
knows its values.  :meth:`Bundle.process_spec` takes the values of the others
(``environ``, e.g. configuration); the node's own environment is *not*
consulted, so a bundle starts the same way on every node.  The process also
gets ``BUNDLE_HOME``, ``BUNDLE_PYTHON``, ``BUNDLE_NAME`` and
``BUNDLE_VERSION`` in its environment; it runs in ``BUNDLE_HOME`` (a wheel) or
``BUNDLE_HOME/app`` (a ``.tar.gz``, whose files are extracted there and put on
the venv's ``sys.path``).

The ``start`` and ``health`` tables are checked by the supervisor's own parser
(:func:`groupcomm.services.supervisor.spec.parse_process`), so they accept
exactly what a node file accepts for these keys.

Reading is safe on hostile files: nothing is extracted; the manifest and the
wheel's ``WHEEL``/``METADATA`` are read with a size bound; a ``.tar.gz`` is read
as a stream whose decompressed size is bounded, and every member is checked
(no absolute path, no ``..``, no duplicate, no device/FIFO, links only to
inside the archive, bounded member count and total size; see :class:`Limits`).
A wheel's name and version (file name, ``.dist-info`` directory and
``METADATA``) must agree with the manifest's.  Every problem is a
:class:`BundleError` (a :class:`~groupcomm.errors.ConfigError`) naming the file
and the field or member.
"""

from __future__ import annotations

import email.parser
import gzip
import hashlib
import io
import re
import tarfile
import tomllib
import types
import zipfile
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, Any, Literal

from packaging.utils import (
    InvalidWheelFilename,
    canonicalize_name,
    parse_wheel_filename,
)
from packaging.version import InvalidVersion, Version

from groupcomm.config.units import check_keys
from groupcomm.errors import ConfigError
from groupcomm.services.supervisor.spec import ProcessSpec, parse_process

__all__ = [
    "MANIFEST",
    "Bundle",
    "BundleError",
    "Limits",
    "Manifest",
    "TarMember",
    "check_tar_links",
    "iter_tar",
    "parse_manifest",
    "read_bundle",
]

MANIFEST = "bundle.toml"
"""The manifest's file name."""

BundleKind = Literal["wheel", "tar.gz"]

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")
_TOP_KEYS = {"name", "version", "description", "start", "health", "config"}
_START_KEYS = {"command", "env", "restart", "stop_signal", "stop_grace"}
_METADATA_BYTES = 1024 * 1024
_ZIP_MAGIC = b"PK\x03\x04"
_GZIP_MAGIC = b"\x1f\x8b"
_PLACEHOLDER_HOME = "/bundle-home"


class BundleError(ConfigError):
    """A bundle file that cannot be used; the message names the file and the field or member."""


@dataclass(frozen=True)
class Limits:
    """Bounds that make reading and extracting a hostile archive safe."""

    manifest_bytes: int = 64 * 1024
    """The largest ``bundle.toml``."""
    members: int = 10_000
    """The most members (files, directories, links) an archive may have."""
    total_bytes: int = 1024 * 1024 * 1024
    """The most bytes all members may hold together, uncompressed."""


@dataclass(frozen=True)
class Manifest:
    """A checked ``bundle.toml``."""

    name: str
    """The bundle's name."""
    version: str
    """Its version, PEP 440 normalized."""
    description: str
    """Free text (may be empty)."""
    config: tuple[str, ...]
    """The configuration PIDs it reads."""
    text: str
    """The manifest as written (the start and health tables are built from it)."""


@dataclass(frozen=True)
class TarMember:
    """One checked member of a ``.tar.gz``: its normalized path and what it is."""

    name: str
    """Normalized relative path (no ``.``, ``..``, leading ``/`` or ``./``)."""
    kind: Literal["file", "dir", "symlink", "hardlink"]
    size: int
    """Bytes of a file, else 0."""
    mode: int
    """Permission bits, with setuid/setgid/sticky and group/other write removed."""
    target: str = ""
    """A symlink's target as written; a hardlink's normalized target member."""


@dataclass(frozen=True)
class Bundle:
    """A bundle file that was read and checked."""

    path: Path
    """Where it was read from (a store blob has no suffix)."""
    kind: BundleKind
    manifest: Manifest
    sha256: str
    """The file's SHA-256, lowercase hex."""
    size: int
    """The file's size in bytes."""
    filename: str
    """A canonical file name: the wheel's own (``dist-version-tag.whl``, as pip needs it) or
    ``name-version.tar.gz``."""

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> str:
        return self.manifest.version

    def process_spec(self, home: str | Path, python: str | Path, name: str | None = None, *,
                     environ: Mapping[str, str] | None = None) -> ProcessSpec:
        """The supervisor's ProcessSpec for a copy installed at ``home`` with interpreter ``python``.

        ``name`` is the process name (default: the bundle's name); ``environ``
        gives the values of ``${NAME}`` references other than the ``BUNDLE_*`` ones.
        """
        cwd = Path(home) / "app" if self.kind == "tar.gz" else Path(home)
        return _process_spec(self.manifest, str(home), str(python), name or self.manifest.name, str(cwd),
                             environ or {}, where=f"{self.path}: {MANIFEST}")


# --------------------------------------------------------------------------- the manifest


def parse_manifest(text: str, *, source: str = MANIFEST) -> Manifest:
    """Check a manifest's text (``source`` names it in errors)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise BundleError(f"{source}: not valid TOML: {e}") from None
    _known(data, _TOP_KEYS, source)
    name = data.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise BundleError(f"{source}: name: expected 1 to 100 letters, digits, '_', '.', '-' "
                          f"starting with a letter or digit (got {name!r})")
    raw_version = data.get("version")
    if not isinstance(raw_version, str):
        raise BundleError(f"{source}: version: expected a PEP 440 version string such as \"1.0\" "
                          f"(got {raw_version!r})")
    try:
        version = str(Version(raw_version))
    except InvalidVersion:
        raise BundleError(f"{source}: version: not a PEP 440 version (got {raw_version!r})") from None
    description = data.get("description", "")
    if not isinstance(description, str):
        raise BundleError(f"{source}: description: expected a string (got {description!r})")
    config = data.get("config", [])
    if not isinstance(config, list) or not all(isinstance(p, str) and _NAME.fullmatch(p) for p in config):
        raise BundleError(f"{source}: config: expected a list of configuration PIDs (letters, digits, "
                          f"'_', '.', '-') (got {config!r})")
    if len(set(config)) != len(config):
        raise BundleError(f"{source}: config: a PID is listed twice (got {config!r})")
    if "start" not in data:
        raise BundleError(f"{source}: start: missing (a table with at least command = [...])")
    if not isinstance(data["start"], dict):
        raise BundleError(f"{source}: start: expected a table (got {data['start']!r})")
    _known(data["start"], _START_KEYS, f"{source}: start")
    if "health" in data and not isinstance(data["health"], dict):
        raise BundleError(f"{source}: health: expected a table (got {data['health']!r})")
    manifest = Manifest(name=name, version=version, description=description, config=tuple(config), text=text)
    # Check start and health now with placeholder paths: every reference must resolve.
    _process_spec(manifest, _PLACEHOLDER_HOME, f"{_PLACEHOLDER_HOME}/bin/python", name, _PLACEHOLDER_HOME,
                  {}, where=source)
    return manifest


def _process_spec(manifest: Manifest, home: str, python: str, name: str, cwd: str,
                  environ: Mapping[str, str], *, where: str) -> ProcessSpec:
    data = tomllib.loads(manifest.text)
    bundle_vars = {"BUNDLE_HOME": home, "BUNDLE_PYTHON": python,
                   "BUNDLE_NAME": manifest.name, "BUNDLE_VERSION": manifest.version}
    entry: dict[str, Any] = {"name": name, **data["start"], "cwd": cwd.replace("${", "$${")}
    if "health" in data:
        entry["health"] = data["health"]
    try:
        spec = parse_process(entry, where=f"{where}: start", environ={**environ, **bundle_vars})
    except BundleError:
        raise
    except ConfigError as e:
        raise BundleError(str(e)) from None
    return replace(spec, env=types.MappingProxyType({**spec.env, **bundle_vars}))


def _known(table: Mapping[str, Any], known: set[str], where: str) -> None:
    check_keys(table, known, where, error=BundleError)


# --------------------------------------------------------------------------- reading a file


def read_bundle(path: str | Path, *, limits: Limits = Limits()) -> Bundle:
    """Read and check a bundle file (a wheel or a ``.tar.gz``; a suffix-less file by its content)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
            digest = hashlib.sha256(magic)
            size = len(magic)
            while chunk := f.read(1024 * 1024):
                digest.update(chunk)
                size += len(chunk)
    except OSError as e:
        raise BundleError(f"{path}: cannot read the bundle: {e.strerror or e}") from None
    if magic.startswith(_ZIP_MAGIC):
        kind: BundleKind = "wheel"
    elif magic.startswith(_GZIP_MAGIC):
        kind = "tar.gz"
    else:
        raise BundleError(f"{path}: neither a wheel (zip) nor a .tar.gz (gzip)")
    named = "wheel" if path.name.endswith(".whl") else "tar.gz" if path.name.endswith((".tar.gz", ".tgz")) else None
    if named is not None and named != kind:
        raise BundleError(f"{path}: the name says {named} but the content is a {kind}")
    if kind == "wheel":
        manifest, filename = _read_wheel(path, limits)
    else:
        manifest = _read_tar(path, limits)
        filename = f"{manifest.name}-{manifest.version}.tar.gz"
    return Bundle(path=path, kind=kind, manifest=manifest, sha256=digest.hexdigest(), size=size, filename=filename)


def _member_name(raw: str, where: str) -> str:
    """A member's normalized relative path; BundleError if it is absolute or climbs out."""
    if not raw or "\x00" in raw or "\\" in raw:
        raise BundleError(f"{where}: member {raw!r}: unsafe name")
    if raw.startswith("/"):
        raise BundleError(f"{where}: member {raw!r}: absolute path")
    parts = [p for p in raw.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise BundleError(f"{where}: member {raw!r}: path with '..' (would leave the directory)")
    return "/".join(parts)


def _bounded_read(f: IO[bytes], limit: int, where: str) -> bytes:
    data = f.read(limit + 1)
    if len(data) > limit:
        raise BundleError(f"{where}: larger than {limit} bytes")
    return data


def _decode_manifest(data: bytes, where: str) -> Manifest:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise BundleError(f"{where}: not UTF-8") from None
    return parse_manifest(text, source=where)


def _read_wheel(path: Path, limits: Limits) -> tuple[Manifest, str]:
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
            if len(infos) > limits.members:
                raise BundleError(f"{path}: more than {limits.members} members")
            names: dict[str, zipfile.ZipInfo] = {}
            total = 0
            for info in infos:
                name = _member_name(info.filename, str(path))
                if name in names and not info.is_dir():
                    raise BundleError(f"{path}: member {info.filename!r}: appears twice")
                names[name] = info
                total += info.file_size
                if total > limits.total_bytes:
                    raise BundleError(f"{path}: members hold more than {limits.total_bytes} bytes uncompressed")
            dist_infos = sorted({n.split("/", 1)[0] for n in names if n.split("/", 1)[0].endswith(".dist-info")})
            if len(dist_infos) != 1:
                raise BundleError(f"{path}: expected exactly one *.dist-info directory (found {dist_infos})")
            dist_info = dist_infos[0]

            def member(name: str, limit: int) -> bytes:
                info = names.get(f"{dist_info}/{name}")
                if info is None:
                    raise BundleError(f"{path}: no {dist_info}/{name}" +
                                      (" (a bundle's manifest)" if name == MANIFEST else ""))
                where = f"{path}: {dist_info}/{name}"
                if info.file_size > limit:
                    raise BundleError(f"{where}: larger than {limit} bytes")
                with zf.open(info) as f:
                    return _bounded_read(f, limit, where)

            manifest = _decode_manifest(member(MANIFEST, limits.manifest_bytes), f"{path}: {dist_info}/{MANIFEST}")
            wheel_text = member("WHEEL", _METADATA_BYTES).decode("utf-8", "replace")
            metadata = email.parser.HeaderParser().parsestr(member("METADATA", _METADATA_BYTES)
                                                            .decode("utf-8", "replace"))
    except zipfile.BadZipFile as e:
        raise BundleError(f"{path}: not a valid wheel (zip): {e}") from None
    dist, _, dist_version = dist_info.removesuffix(".dist-info").rpartition("-")
    claims = [(f"{dist_info} directory", dist, dist_version),
              ("METADATA", metadata.get("Name", ""), metadata.get("Version", ""))]
    tags = [line.split(":", 1)[1].strip() for line in wheel_text.splitlines() if line.startswith("Tag:")]
    if not tags:
        raise BundleError(f"{path}: {dist_info}/WHEEL: no Tag line")
    filename = f"{dist}-{dist_version}-{tags[0]}.whl"
    if path.name.endswith(".whl"):
        try:
            fname, fversion, _, _ = parse_wheel_filename(path.name)
        except InvalidWheelFilename as e:
            raise BundleError(f"{path}: not a valid wheel file name: {e}") from None
        claims.append(("file name", fname, str(fversion)))
        filename = path.name
    for what, claimed_name, claimed_version in claims:
        if canonicalize_name(claimed_name) != canonicalize_name(manifest.name):
            raise BundleError(f"{path}: name: the wheel's {what} says {claimed_name!r}, "
                              f"{MANIFEST} says {manifest.name!r}")
        try:
            same = Version(claimed_version) == Version(manifest.version)
        except InvalidVersion:
            same = False
        if not same:
            raise BundleError(f"{path}: version: the wheel's {what} says {claimed_version!r}, "
                              f"{MANIFEST} says {manifest.version!r}")
    return manifest, filename


class _BoundedStream(io.RawIOBase):
    """A readable stream that raises BundleError once more than ``limit`` bytes were read."""

    def __init__(self, inner: IO[bytes], limit: int, where: str) -> None:
        self._inner = inner
        self._left = limit
        self._limit = limit
        self._where = where

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        view = memoryview(b)
        n = self._inner.readinto(view[: min(len(view), self._left + 1)])  # type: ignore[attr-defined]
        if n > self._left:
            raise BundleError(f"{self._where}: expands to more than {self._limit} bytes")
        self._left -= n
        return n


def iter_tar(path: str | Path, limits: Limits = Limits()) -> Iterator[tuple[TarMember, IO[bytes] | None]]:
    """The checked members of a ``.tar.gz``, in order, each with a reader of its data (files only).

    The reader is valid until the next member is asked for.  Each member is
    checked as it comes (name, type, count, total size, duplicates, a hardlink's
    target); symlink targets need the whole listing: call :func:`check_tar_links`
    on the members before creating any link.
    """
    where = str(path)
    # Headers and padding: at most 3 blocks per member (header, long-name or pax header,
    # padding) plus the end-of-archive blocks; a bigger stream is refused while read.
    stream_limit = limits.total_bytes + 3 * 512 * (limits.members + 1) + 20 * 512
    seen: dict[str, str] = {}
    total = 0
    try:
        with open(path, "rb") as raw, gzip.GzipFile(fileobj=raw) as gz, \
                io.BufferedReader(_BoundedStream(gz, stream_limit, where)) as bounded, \
                tarfile.open(fileobj=bounded, mode="r|") as tf:
            count = 0
            for info in tf:
                count += 1
                if count > limits.members:
                    raise BundleError(f"{where}: more than {limits.members} members")
                name = _member_name(info.name, where)
                if not name:
                    if info.isdir():
                        continue  # "." or "./": the archive's root
                    raise BundleError(f"{where}: member {info.name!r}: not a directory but names the root")
                if name in seen:
                    raise BundleError(f"{where}: member {info.name!r}: appears twice")
                mode = info.mode & 0o755
                if info.isreg():
                    total += info.size
                    if total > limits.total_bytes:
                        raise BundleError(f"{where}: members hold more than {limits.total_bytes} bytes")
                    member = TarMember(name, "file", info.size, mode)
                elif info.isdir():
                    member = TarMember(name, "dir", 0, mode | 0o700)
                elif info.issym():
                    if not info.linkname or info.linkname.startswith("/") or "\x00" in info.linkname:
                        raise BundleError(f"{where}: member {info.name!r}: symlink to {info.linkname!r} "
                                          "(only relative links inside the archive)")
                    member = TarMember(name, "symlink", 0, 0o777, info.linkname)
                elif info.islnk():
                    target = _member_name(info.linkname, where)
                    if seen.get(target) != "file":
                        raise BundleError(f"{where}: member {info.name!r}: hard link to {info.linkname!r}, "
                                          "which is not an earlier file of the archive")
                    member = TarMember(name, "hardlink", 0, mode, target)
                else:
                    raise BundleError(f"{where}: member {info.name!r}: a device, FIFO or other special file "
                                      "(only files, directories and links)")
                seen[name] = member.kind
                yield member, (tf.extractfile(info) if member.kind == "file" else None)
    except (tarfile.TarError, EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise BundleError(f"{where}: not a valid .tar.gz: {e}") from None


def check_tar_links(members: list[TarMember], where: str) -> None:
    """Refuse links that could lead out of the extraction directory.

    No member's path may pass *through* a symlink, and a symlink's target,
    walked step by step from the link's directory, must stay inside and must
    not pass through another symlink either (its last step may name one).
    Together these make the lexical walk equal to what the file system does.
    """
    symlinks = {m.name for m in members if m.kind == "symlink"}
    for m in members:
        parts = m.name.split("/")
        for i in range(1, len(parts)):
            if "/".join(parts[:i]) in symlinks:
                raise BundleError(f"{where}: member {m.name!r}: its path goes through the symlink "
                                  f"{'/'.join(parts[:i])!r}")
        if m.kind != "symlink":
            continue
        here = parts[:-1]
        steps = [p for p in m.target.split("/") if p not in ("", ".")]
        for i, step in enumerate(steps):
            if step == "..":
                if not here:
                    raise BundleError(f"{where}: member {m.name!r}: symlink to {m.target!r} points outside "
                                      "the archive")
                here = here[:-1]
                continue
            here = [*here, step]
            if i < len(steps) - 1 and "/".join(here) in symlinks:
                raise BundleError(f"{where}: member {m.name!r}: symlink to {m.target!r} goes through the "
                                  f"symlink {'/'.join(here)!r}")


def _read_tar(path: Path, limits: Limits) -> Manifest:
    members: list[TarMember] = []
    manifest_data: bytes | None = None
    for member, data in iter_tar(path, limits):
        members.append(member)
        if member.name == MANIFEST:
            if member.kind != "file" or data is None:
                raise BundleError(f"{path}: {MANIFEST}: not a regular file")
            manifest_data = _bounded_read(data, limits.manifest_bytes, f"{path}: {MANIFEST}")
    check_tar_links(members, str(path))
    if manifest_data is None:
        raise BundleError(f"{path}: no {MANIFEST} at the archive's top level (a bundle's manifest)")
    return _decode_manifest(manifest_data, f"{path}: {MANIFEST}")
