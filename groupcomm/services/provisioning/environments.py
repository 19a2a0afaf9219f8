"""One isolated environment per installed bundle version.

Layout under the environments' root::

    <root>/<name>/<version>-<sha256[:12]>/      BUNDLE_HOME: a venv
        bin/python                              BUNDLE_PYTHON
        app/                                    a .tar.gz bundle's files
        .groupcomm-bundle.json                  the marker: written last (name, version, sha256, kind)
    <root>/.tmp/                                environments being built or removed

How a bundle is installed:

* **wheel**: a venv (``python -m venv``), then pip installs the wheel into it,
  offline: ``pip install --isolated --no-index --no-deps --no-cache-dir WHEEL``.
  Dependencies are not fetched: a bundle vendors them (in its own package) or
  needs nothing beyond the standard library.  By default the venv is created
  without pip and the running interpreter's pip installs into it
  (``pip --python VENV/bin/python``, about 1 s); without pip here, the venv
  gets its own pip (``ensurepip``, several seconds more).
* **.tar.gz**: a venv without pip; the archive is extracted into ``app/`` by
  this module's own code (checked member by member as in
  :func:`~groupcomm.services.provisioning.bundle.iter_tar`: no absolute paths,
  no ``..``, no device files, no links pointing outside, bounded size and
  member count), and ``app/`` is put on the venv's ``sys.path`` (a ``.pth``
  file), so ``${BUNDLE_PYTHON} -m module`` finds its modules.

Installing is idempotent (a complete environment, recognized by its marker,
is reused) and atomic: everything is built in ``.tmp/`` and renamed into
place when complete, after the build directory's path was replaced by the
final one in the venv's scripts and ``pyvenv.cfg``.  The functions block (run
them in a worker thread from trio).  One process owns a root (opening it
clears ``.tmp/``); inside it, installs and removals may run in several threads.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from packaging.version import InvalidVersion, Version

from groupcomm.errors import GroupcommError
from groupcomm.services.provisioning.bundle import (
    Bundle,
    BundleError,
    Limits,
    TarMember,
    check_tar_links,
    iter_tar,
)

__all__ = ["Environments", "InstallError", "Installed"]

MARKER = ".groupcomm-bundle.json"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")
_HOME = re.compile(r"(?P<version>.+)-(?P<sha>[0-9a-f]{12})")
_OUTPUT_TAIL = 2000
_DEFAULT_LIMITS = Limits()


class InstallError(GroupcommError):
    """A bundle could not be installed (the message names the bundle and the step)."""


@dataclass(frozen=True)
class Installed:
    """A complete environment."""

    name: str
    version: str
    sha256: str
    kind: str
    """``"wheel"`` or ``"tar.gz"``."""
    home: Path
    """``BUNDLE_HOME``: the venv's root."""

    @property
    def python(self) -> Path:
        """``BUNDLE_PYTHON``: the venv's interpreter."""
        return self.home / "bin" / "python"


class Environments:
    """The environments under ``root``.

    ``python``: the interpreter venvs are made from.  ``pip``: ``"host"`` uses
    this interpreter's pip (``pip --python``), ``"venv"`` puts pip in each
    wheel's venv, ``"auto"`` (default) is ``"host"`` when pip is importable
    here.  ``timeout``: seconds each ``venv``/``pip`` run may take.
    """

    def __init__(self, root: str | Path, *, python: str | Path = sys.executable,
                 pip: Literal["auto", "host", "venv"] = "auto", limits: Limits = _DEFAULT_LIMITS,
                 timeout: float = 600.0) -> None:
        self.root = Path(root)
        self.python = str(python)
        if pip == "auto":
            pip = "host" if importlib.util.find_spec("pip") is not None else "venv"
        self.pip = pip
        self.limits = limits
        self.timeout = timeout
        self._tmp = self.root / ".tmp"
        self.root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self._tmp, ignore_errors=True)
        self._tmp.mkdir()
        self._locks: dict[Path, threading.Lock] = {}
        self._locks_lock = threading.Lock()

    # ------------------------------------------------------------------ looking

    def home(self, bundle: Bundle) -> Path:
        """Where ``bundle`` is (or would be) installed."""
        return self.root / bundle.name / f"{bundle.version}-{bundle.sha256[:12]}"

    def installed(self, bundle: Bundle) -> Installed | None:
        """The complete environment of exactly this bundle file, if there is one."""
        found = self._read_marker(self.home(bundle))
        return found if found is not None and found.sha256 == bundle.sha256 else None

    def list(self) -> list[Installed]:
        """Every complete environment, by name and version."""
        found = []
        for name_dir in sorted(self.root.iterdir()):
            if name_dir.name.startswith(".") or not name_dir.is_dir():
                continue
            for home in sorted(name_dir.iterdir()):
                env = self._read_marker(home)
                if env is not None:
                    found.append(env)
        return found

    def _read_marker(self, home: Path) -> Installed | None:
        try:
            data = json.loads((home / MARKER).read_text())
            return Installed(name=data["name"], version=data["version"], sha256=data["sha256"],
                             kind=data["kind"], home=home)
        except (OSError, ValueError, KeyError, TypeError):
            return None

    # ------------------------------------------------------------------ installing

    def install(self, bundle: Bundle) -> Installed:
        """Install ``bundle`` (reusing a complete environment); InstallError if a step fails."""
        home = self.home(bundle)
        with self._lock_for(home):
            done = self.installed(bundle)
            if done is not None:
                return done
            if home.exists():  # not complete: not ours to keep (e.g. a marker for other bytes)
                self._discard(home)
            build = Path(tempfile.mkdtemp(dir=self._tmp, prefix=f"{bundle.name}-{bundle.version}-"))
            try:
                self._build(bundle, build / "env", home)
                # The name's directory is made and filled under its lock: remove() of another
                # version deletes it when empty, under the same lock.
                with self._lock_for(home.parent):
                    home.parent.mkdir(parents=True, exist_ok=True)
                    os.rename(build / "env", home)
                    _fsync_dir(home.parent)
            finally:
                shutil.rmtree(build, ignore_errors=True)
            installed = self.installed(bundle)
            if installed is None:
                raise InstallError(f"{bundle.path}: the environment at {home} is not complete after the build")
            return installed

    def _build(self, bundle: Bundle, env: Path, home: Path) -> None:
        with_pip = bundle.kind == "wheel" and self.pip == "venv"
        self._run(bundle, "venv", [self.python, "-m", "venv", *([] if with_pip else ["--without-pip"]), str(env)])
        python = env / "bin" / "python"
        if bundle.kind == "wheel":
            wheel = env.parent / bundle.filename
            os.symlink(bundle.path.resolve(), wheel)
            pip = [str(python), "-m", "pip"] if with_pip else [self.python, "-m", "pip", "--python", str(python)]
            self._run(bundle, "pip install", [*pip, "install", "--isolated", "--no-index", "--no-deps",
                                              "--no-cache-dir", "--disable-pip-version-check", "--no-input",
                                              "--no-warn-script-location", str(wheel)])
        else:
            self._extract(bundle, env / "app")
            site = sorted(env.glob("lib/python*/site-packages"))
            if len(site) != 1:
                raise InstallError(f"{bundle.path}: the venv has no single site-packages ({site})")
            (site[0] / "groupcomm-bundle-app.pth").write_text(f"{home / 'app'}\n")
        _relocate(env, home)
        marker = {"name": bundle.name, "version": bundle.version, "sha256": bundle.sha256, "kind": bundle.kind,
                  "filename": bundle.filename}
        with open(env / MARKER, "w") as f:
            json.dump(marker, f)
            f.flush()
            os.fsync(f.fileno())

    def _run(self, bundle: Bundle, step: str, argv: list[str]) -> None:
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
        try:
            done = subprocess.run(argv, check=False, capture_output=True, timeout=self.timeout, env=env,
                                  stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise InstallError(f"{bundle.path}: {step} took more than {self.timeout:g} s") from None
        except OSError as e:
            raise InstallError(f"{bundle.path}: {step}: cannot run {argv[0]}: {e.strerror or e}") from None
        if done.returncode != 0:
            output = (done.stderr or done.stdout).decode(errors="replace")[-_OUTPUT_TAIL:]
            raise InstallError(f"{bundle.path}: {step} failed (exit status {done.returncode}): {output.strip()}")

    def _extract(self, bundle: Bundle, app: Path) -> None:
        """Extract a .tar.gz into ``app`` with the checks of iter_tar; links last."""
        app.mkdir()
        members: list[TarMember] = []
        try:
            for member, data in iter_tar(bundle.path, self.limits):
                members.append(member)
                target = app / member.name
                if member.kind == "dir":
                    target.mkdir(parents=True, exist_ok=True)
                elif member.kind == "file":
                    assert data is not None
                    target.parent.mkdir(parents=True, exist_ok=True)
                    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
                    with os.fdopen(fd, "wb") as out:
                        shutil.copyfileobj(data, out)
            check_tar_links(members, str(bundle.path))
            for member in members:
                target = app / member.name
                if member.kind == "hardlink":
                    shutil.copyfile(app / member.target, target, follow_symlinks=False)
                elif member.kind == "symlink":
                    target.parent.mkdir(parents=True, exist_ok=True)
                    os.symlink(member.target, target)
            for member in members:  # modes last: a read-only directory would stop the extraction
                if member.kind in ("file", "hardlink", "dir"):
                    os.chmod(app / member.name, member.mode, follow_symlinks=False)
        except BundleError as e:
            raise InstallError(str(e)) from None
        except OSError as e:
            raise InstallError(f"{bundle.path}: cannot extract: {e}") from None

    # ------------------------------------------------------------------ removing

    def remove(self, name: str, version: str) -> int:
        """Remove every environment of ``name`` ``version`` (any file); how many there were."""
        if not _NAME.fullmatch(name):
            raise ValueError(f"not a bundle name: {name!r}")
        try:
            version = str(Version(version))
        except InvalidVersion:
            raise ValueError(f"not a PEP 440 version: {version!r}") from None
        name_dir = self.root / name
        if not name_dir.is_dir():
            return 0
        removed = 0
        for home in sorted(name_dir.iterdir()):
            m = _HOME.fullmatch(home.name)
            if m is None or m["version"] != version:
                continue
            with self._lock_for(home):
                if home.exists():
                    self._discard(home)
                    removed += 1
        with self._lock_for(name_dir):
            try:
                name_dir.rmdir()
            except OSError:
                pass  # other versions remain (or one is being installed)
        return removed

    def _discard(self, home: Path) -> None:
        """Make ``home`` disappear at once (rename), then delete it."""
        trash = Path(tempfile.mkdtemp(dir=self._tmp, prefix="removed-"))
        os.rename(home, trash / "env")
        shutil.rmtree(trash, ignore_errors=True)

    def _lock_for(self, home: Path) -> threading.Lock:
        with self._locks_lock:
            return self._locks.setdefault(home, threading.Lock())


def _relocate(env: Path, home: Path) -> None:
    """Replace the build directory's path by the final one in the venv's scripts and pyvenv.cfg."""
    old, new = str(env).encode(), str(home).encode()
    candidates = [env / "pyvenv.cfg", *(env / "bin").iterdir()]
    for path in candidates:
        if path.is_symlink() or not path.is_file() or path.stat().st_size > 1024 * 1024:
            continue
        data = path.read_bytes()
        if old in data and b"\0" not in data:
            mode = path.stat().st_mode
            path.write_bytes(data.replace(old, new))
            os.chmod(path, mode)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
