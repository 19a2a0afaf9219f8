"""A process's output file, rotated by size: ``NAME.log``, ``NAME.log.1`` (newest) .. ``NAME.log.KEEP``."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["RotatingLog"]


class RotatingLog:
    """Append bytes to ``path``; before the file would pass ``max_bytes``, shift it to ``path.1``.

    ``keep`` rotated files are kept (the oldest is dropped); with ``keep = 0``
    the file is simply started afresh.  A write larger than ``max_bytes`` is
    split, so no file ever holds more than ``max_bytes``.
    """

    def __init__(self, path: str | os.PathLike[str], max_bytes: int, keep: int) -> None:
        if max_bytes < 1:
            raise ValueError("max_bytes must be at least 1")
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.keep = keep
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "ab", buffering=0)  # noqa: SIM115 -- kept open for the process's life
        self._size = self._file.tell()

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if self._size >= self.max_bytes:
                self.rotate()
            room = self.max_bytes - self._size
            chunk = view[:room]
            self._file.write(chunk)
            self._size += len(chunk)
            view = view[room:]

    def rotate(self) -> None:
        """Shift ``NAME.log.i`` to ``.i+1`` (dropping the last) and start an empty ``NAME.log``."""
        self._file.close()
        if self.keep > 0:
            for i in range(self.keep - 1, 0, -1):
                older = self._numbered(i)
                if older.exists():
                    os.replace(older, self._numbered(i + 1))
            os.replace(self.path, self._numbered(1))
        self._file = open(self.path, "wb", buffering=0)  # noqa: SIM115
        self._size = 0

    def close(self) -> None:
        self._file.close()

    def _numbered(self, i: int) -> Path:
        return self.path.with_name(f"{self.path.name}.{i}")
