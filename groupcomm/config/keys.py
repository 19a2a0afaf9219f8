"""Cluster key files: what ``groupcomm keygen`` writes and the ``CRYPTO`` layer reads.

A key file is TOML::

    # groupcomm cluster key: the same file on every member; keep it secret (mode 0600)
    send = 1
    [keys]
    1 = "base64 of 32 random bytes"

``keys`` maps a key id (1-127) to a 256-bit key; ``send`` names the one new
datagrams are sealed with.  Every key listed is accepted when opening, so a
rotation adds a key on every member first, then makes it the send key, then
drops the old one (docs/security.rst, "Rotating the key").
"""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from groupcomm.errors import ConfigError

__all__ = ["KEY_BYTES", "KeyFile", "read_key_file", "write_key_file", "new_key_file", "fingerprint"]

KEY_BYTES = 32
"""Length of a cluster key (AES-256)."""
KEY_ID_MAX = 127
"""Key ids travel in 7 bits of every sealed datagram."""
KEYS_MAX = 4
"""Keys a member holds at once (a rotation needs two)."""


@dataclass(frozen=True)
class KeyFile:
    """The keys of a key file and the id of the send key."""

    keys: dict[int, bytes] = field(default_factory=dict)
    send: int = 0

    def __post_init__(self) -> None:
        if not self.keys:
            raise ConfigError("a key file must hold at least one key")
        if len(self.keys) > KEYS_MAX:
            raise ConfigError(f"a key file holds at most {KEYS_MAX} keys, not {len(self.keys)}")
        for key_id, key in self.keys.items():
            if not 1 <= key_id <= KEY_ID_MAX:
                raise ConfigError(f"key id {key_id} is not in 1..{KEY_ID_MAX}")
            if len(key) != KEY_BYTES:
                raise ConfigError(f"key {key_id} has {len(key)} bytes, not {KEY_BYTES}")
        if self.send not in self.keys:
            raise ConfigError(f"send key {self.send} is not among the keys ({', '.join(map(str, sorted(self.keys)))})")

    def with_new_key(self) -> KeyFile:
        """A new random key added with the next free id (not yet the send key)."""
        key_id = max(self.keys) % KEY_ID_MAX + 1
        while key_id in self.keys:
            key_id = key_id % KEY_ID_MAX + 1
        return KeyFile({**self.keys, key_id: secrets.token_bytes(KEY_BYTES)}, self.send)

    def using(self, key_id: int) -> KeyFile:
        """The same keys, ``key_id`` the send key."""
        if key_id not in self.keys:
            raise ConfigError(f"no key {key_id} in the file (keys: {', '.join(map(str, sorted(self.keys)))})")
        return KeyFile(self.keys, key_id)

    def without(self, key_id: int) -> KeyFile:
        """The keys but ``key_id``, which must not be the send key."""
        if key_id not in self.keys:
            raise ConfigError(f"no key {key_id} in the file (keys: {', '.join(map(str, sorted(self.keys)))})")
        if key_id == self.send:
            raise ConfigError(f"key {key_id} is the send key: make another one the send key first")
        return KeyFile({k: v for k, v in self.keys.items() if k != key_id}, self.send)


def fingerprint(key: bytes) -> str:
    """A short, non-secret name for a key (first 8 bytes of its SHA-256, hex)."""
    return hashlib.sha256(b"groupcomm key fingerprint" + key).hexdigest()[:16]


def new_key_file() -> KeyFile:
    """One fresh random key, id 1, the send key."""
    return KeyFile({1: secrets.token_bytes(KEY_BYTES)}, 1)


def read_key_file(path: str | os.PathLike) -> KeyFile:
    """Parse a key file; every problem is a :class:`ConfigError` naming the file."""
    where = Path(path)
    try:
        data = tomllib.loads(where.read_text())
    except OSError as exc:
        raise ConfigError(f"key file {where}: {exc.strerror or exc}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"key file {where}: not a key file ({exc})") from None
    keys_table = data.get("keys")
    send = data.get("send")
    if not isinstance(keys_table, dict) or type(send) is not int:
        raise ConfigError(f"key file {where}: needs 'send = <id>' and a [keys] table")
    keys: dict[int, bytes] = {}
    for name, text in keys_table.items():
        if not name.isdigit() or not isinstance(text, str):
            raise ConfigError(f"key file {where}: key {name!r} must be '<id> = \"<base64>\"'")
        try:
            keys[int(name)] = base64.b64decode(text, validate=True)
        except ValueError:
            raise ConfigError(f"key file {where}: key {name} is not base64") from None
    try:
        return KeyFile(keys, send)
    except ConfigError as exc:
        raise ConfigError(f"key file {where}: {exc}") from None


def write_key_file(path: str | os.PathLike, key_file: KeyFile) -> None:
    """Write atomically with mode 0600 (the file is replaced, never half written)."""
    where = Path(path)
    lines = [
        "# groupcomm cluster key: the same file on every member; keep it secret (mode 0600).",
        "# `groupcomm key --help` adds, switches and retires keys (docs/security.rst).",
        f"send = {key_file.send}",
        "[keys]",
        *(f'{key_id} = "{base64.b64encode(key).decode()}"' for key_id, key in sorted(key_file.keys.items())),
    ]
    tmp = where.with_name(f".{where.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w") as out:
            out.write("\n".join(lines) + "\n")
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, where)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
