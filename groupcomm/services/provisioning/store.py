"""A node-local content-addressed store of bundle files.

Layout under the store's root::

    <root>/sha256/<hex>     one blob per distinct content, named by its SHA-256 (lowercase hex)
    <root>/tmp/             blobs being written (cleared when a Store is opened)

A blob appears only complete and verified: it is written to a temporary file
in ``tmp/``, its SHA-256 and size are checked, it is fsynced, renamed into
``sha256/`` and the directory is fsynced.  A mismatch raises
:class:`DigestMismatch` and leaves nothing behind.  Blobs are read-only
(mode 0444).

The quota (``Store(root, quota=N)``) bounds the bytes of all blobs plus the
bytes reserved by writers still open; a write that would exceed it raises
:class:`QuotaExceeded` before anything is written.  A blob already stored is
never written again, so storing it again costs no quota.

One process owns a root (opening a Store clears ``tmp/``); inside that process
the methods may be called from several threads: writers of the same digest
each write their own temporary file and the first to commit wins.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
import threading
from pathlib import Path
from typing import BinaryIO, Self

from groupcomm.errors import GroupcommError

__all__ = ["BlobWriter", "DigestMismatch", "QuotaExceeded", "Store", "StoreError", "check_digest"]

_HEX = re.compile(r"[0-9a-f]{64}")
_CHUNK = 1024 * 1024


class StoreError(GroupcommError):
    """A store operation failed."""


class DigestMismatch(StoreError):
    """The bytes written do not have the announced SHA-256 or size."""


class QuotaExceeded(StoreError):
    """Storing the blob would take the store beyond its quota."""


def check_digest(digest: str) -> str:
    """``digest`` if it is 64 lowercase hex digits (a SHA-256), else ValueError."""
    if not isinstance(digest, str) or not _HEX.fullmatch(digest):
        raise ValueError(f"not a SHA-256 digest (64 lowercase hex digits): {digest!r}")
    return digest


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Store:
    """The blobs under ``root``; ``quota`` is the most bytes they may take (None: no bound)."""

    def __init__(self, root: str | Path, *, quota: int | None = None) -> None:
        if quota is not None and quota < 0:
            raise ValueError(f"quota must be at least 0 bytes (got {quota})")
        self.root = Path(root)
        self.quota = quota
        self._blobs = self.root / "sha256"
        self._tmp = self.root / "tmp"
        self._blobs.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self._tmp, ignore_errors=True)
        self._tmp.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._used = sum(p.stat().st_size for p in self._blobs.iterdir() if _HEX.fullmatch(p.name))
        self._reserved = 0

    # ------------------------------------------------------------------ reading

    def has(self, digest: str) -> bool:
        """Whether the blob is stored."""
        return self.path(digest).is_file()

    def path(self, digest: str) -> Path:
        """Where the blob is (or would be); ValueError for a malformed digest."""
        return self._blobs / check_digest(digest)

    def size(self, digest: str) -> int:
        """The blob's size; KeyError if it is not stored."""
        try:
            return self.path(digest).stat().st_size
        except FileNotFoundError:
            raise KeyError(digest) from None

    def digests(self) -> set[str]:
        """Every stored blob."""
        return {p.name for p in self._blobs.iterdir() if _HEX.fullmatch(p.name)}

    @property
    def used(self) -> int:
        """Bytes taken by the stored blobs."""
        with self._lock:
            return self._used

    # ------------------------------------------------------------------ writing

    def put_file(self, path: str | Path, expected: str | None = None) -> str:
        """Store a copy of the file at ``path``; its digest.  ``expected``: refuse other content."""
        if expected is not None:
            check_digest(expected)
        path = Path(path)
        size = path.stat().st_size
        if expected is not None and self.has(expected):
            actual = _sha256_file(path)
            if actual != expected:
                raise DigestMismatch(f"{path}: SHA-256 is {actual}, expected {expected}")
            return expected
        with open(path, "rb") as src:
            if expected is None:
                # The digest names the blob: learn it first (a second read, but no quota for duplicates).
                expected = _sha256_file(path)
                if self.has(expected):
                    return expected
            with self.open_writer(expected, size) as w:
                while chunk := src.read(_CHUNK):
                    w.write(chunk)
                return w.commit()

    def open_writer(self, expected_digest: str, size: int) -> BlobWriter:
        """A writer for a blob arriving in chunks; ``commit()`` verifies and stores it.

        The quota is checked (and ``size`` bytes reserved) here, before anything
        is written.  Use it as a context manager: leaving without commit discards it.
        """
        check_digest(expected_digest)
        if size < 0:
            raise ValueError(f"size must be at least 0 (got {size})")
        reserve = 0 if self.has(expected_digest) else size
        with self._lock:
            if self.quota is not None and self._used + self._reserved + reserve > self.quota:
                raise QuotaExceeded(
                    f"storing {expected_digest[:12]} ({size} bytes) would exceed the store's quota of "
                    f"{self.quota} bytes ({self._used} used, {self._reserved} reserved by writers)")
            self._reserved += reserve
        try:
            fd, tmp = tempfile.mkstemp(dir=self._tmp, prefix=expected_digest[:12] + ".")
        except BaseException:
            self._release(reserve)
            raise
        return BlobWriter(self, expected_digest, size, os.fdopen(fd, "wb"), Path(tmp), reserve)

    def _release(self, reserved: int) -> None:
        with self._lock:
            self._reserved -= reserved

    def _commit(self, writer: BlobWriter) -> None:
        final = self.path(writer.digest)
        with self._lock:
            self._reserved -= writer.reserved
            try:
                if not final.exists():
                    os.chmod(writer.tmp, 0o444)
                    os.replace(writer.tmp, final)
                    self._used += writer.size
            finally:
                writer.tmp.unlink(missing_ok=True)  # a duplicate, or a failed rename
        _fsync_dir(self._blobs)

    # ------------------------------------------------------------------ removing

    def remove(self, digest: str) -> bool:
        """Remove the blob; whether it was there."""
        final = self.path(digest)
        with self._lock:
            try:
                size = final.stat().st_size
                final.unlink()
            except FileNotFoundError:
                return False
            self._used -= size
        return True

    def gc(self, keep: set[str]) -> set[str]:
        """Remove every blob not in ``keep``; the digests removed."""
        removed = set()
        for digest in self.digests() - set(keep):
            if self.remove(digest):
                removed.add(digest)
        return removed


class BlobWriter:
    """Receives one blob's bytes (from :meth:`Store.open_writer`)."""

    def __init__(self, store: Store, digest: str, size: int, file: BinaryIO, tmp: Path, reserved: int) -> None:
        self.digest = digest
        """The SHA-256 the bytes must have."""
        self.size = size
        """The number of bytes announced."""
        self.tmp = tmp
        self.reserved = reserved
        self.written = 0
        """Bytes written so far."""
        self._store = store
        self._file: BinaryIO | None = file
        self._hash = hashlib.sha256()

    def write(self, chunk: bytes) -> None:
        """Append bytes; more than the announced size is a DigestMismatch (and discards the blob)."""
        if self._file is None:
            raise StoreError(f"blob {self.digest[:12]}: the writer is closed")
        if self.written + len(chunk) > self.size:
            self.abort()
            raise DigestMismatch(f"blob {self.digest[:12]}: more than the announced {self.size} bytes")
        self._file.write(chunk)
        self._hash.update(chunk)
        self.written += len(chunk)

    def commit(self) -> str:
        """Verify size and SHA-256, then store the blob; its digest.  DigestMismatch discards it."""
        if self._file is None:
            raise StoreError(f"blob {self.digest[:12]}: the writer is closed")
        actual = self._hash.hexdigest()
        if self.written != self.size or actual != self.digest:
            problem = (f"{self.written} bytes, announced {self.size}" if self.written != self.size
                       else f"SHA-256 is {actual}")
            self.abort()
            raise DigestMismatch(f"blob {self.digest[:12]}: {problem}; expected {self.digest} "
                                 f"({self.size} bytes); nothing stored")
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
        except BaseException:
            self.abort()
            raise
        self._file.close()
        self._file = None
        self._store._commit(self)
        return self.digest

    def abort(self) -> None:
        """Discard what was written (nothing if already committed or aborted)."""
        if self._file is not None:
            self._file.close()
            self._file = None
            self.tmp.unlink(missing_ok=True)
            self._store._release(self.reserved)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.abort()


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()
