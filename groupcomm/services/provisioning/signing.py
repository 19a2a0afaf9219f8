"""Ed25519 signatures on bundles (with ``cryptography``).

Formats, all small and line-based:

* **Signing key file**: PEM, PKCS#8, unencrypted (``-----BEGIN PRIVATE KEY-----``),
  created with mode 0600; :func:`load_signing_key` refuses a file that group
  or others may read or write.
* **Public key**: one line ``ed25519 <base64 of the 32 raw bytes> [comment]``.
  A file of trusted keys holds such lines; blank lines and ``#`` comments are
  ignored.  The **key id** is the first 16 hex digits of the SHA-256 of the
  32 raw bytes.
* **What is signed** (domain-separated, unambiguous)::

      b"groupcomm-bundle-signature-v1\\0"
      + the bundle file's SHA-256 (32 raw bytes)
      + len(name) as 2 bytes big-endian + name (UTF-8)
      + len(version) as 2 bytes big-endian + version (UTF-8, PEP 440 normalized)

  so a signature covers exactly one file under one name and version.
* **Detached signature file** ``FILE.sig``: one line
  ``groupcomm-bundle-signature v1 ed25519 <key id> <base64 of the 64-byte signature>``.
  The key id is a hint for people; verification tries every trusted key.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from groupcomm.errors import GroupcommError
from groupcomm.services.provisioning.bundle import Bundle

__all__ = [
    "PublicKey",
    "SignatureError",
    "SigningKey",
    "generate_signing_key",
    "load_public_keys",
    "load_signing_key",
    "parse_public_key",
    "read_signature",
    "sign",
    "signed_message",
    "signed_message_for",
    "verify",
    "verify_file",
    "verify_raw",
    "write_signature",
]

_DOMAIN = b"groupcomm-bundle-signature-v1\x00"
_SIG_PREFIX = "groupcomm-bundle-signature v1 ed25519"
_MAX_SIG_FILE = 4096


class SignatureError(GroupcommError):
    """A key or signature cannot be used, or no trusted key verifies a bundle."""


@dataclass(frozen=True)
class PublicKey:
    """An Ed25519 public key (the 32 raw bytes)."""

    raw: bytes
    comment: str = ""

    def __post_init__(self) -> None:
        if len(self.raw) != 32:
            raise SignatureError(f"an Ed25519 public key has 32 bytes (got {len(self.raw)})")

    @property
    def key_id(self) -> str:
        """The first 16 hex digits of the SHA-256 of the raw key."""
        return hashlib.sha256(self.raw).hexdigest()[:16]

    def to_line(self) -> str:
        """``ed25519 <base64> [comment]``."""
        line = f"ed25519 {base64.b64encode(self.raw).decode()}"
        return f"{line} {self.comment}" if self.comment else line


@dataclass(frozen=True)
class SigningKey:
    """An Ed25519 private key, loaded from its file."""

    private: Ed25519PrivateKey
    path: Path | None = None

    @property
    def public(self) -> PublicKey:
        raw = self.private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return PublicKey(raw)


def generate_signing_key(path: str | Path) -> SigningKey:
    """Create a new key in a new file (mode 0600); FileExistsError if the file exists."""
    path = Path(path)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
        f.flush()
        os.fsync(f.fileno())
    return SigningKey(key, path)


def load_signing_key(path: str | Path) -> SigningKey:
    """Load a key file written by :func:`generate_signing_key` (or any unencrypted PKCS#8 Ed25519 PEM)."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
        data = path.read_bytes()
    except OSError as e:
        raise SignatureError(f"{path}: cannot read the signing key: {e.strerror or e}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise SignatureError(f"{path}: the signing key is accessible to group or others "
                             f"(mode {stat.S_IMODE(mode):04o}); chmod 600 it")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise SignatureError(f"{path}: not an unencrypted PEM private key: {e}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SignatureError(f"{path}: not an Ed25519 key ({type(key).__name__})")
    return SigningKey(key, path)


def parse_public_key(line: str, *, where: str = "<public key>") -> PublicKey:
    """One ``ed25519 <base64> [comment]`` line."""
    parts = line.strip().split(maxsplit=2)
    if len(parts) < 2 or parts[0] != "ed25519":
        raise SignatureError(f"{where}: expected 'ed25519 <base64 key> [comment]' (got {line.strip()[:80]!r})")
    try:
        raw = base64.b64decode(parts[1], validate=True)
    except binascii.Error:
        raise SignatureError(f"{where}: the key is not base64") from None
    if len(raw) != 32:
        raise SignatureError(f"{where}: an Ed25519 public key has 32 bytes (got {len(raw)})")
    return PublicKey(raw, parts[2] if len(parts) > 2 else "")


def load_public_keys(path: str | Path) -> list[PublicKey]:
    """The keys of a trusted-keys file (one per line; blank lines and ``#`` comments ignored)."""
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise SignatureError(f"{path}: cannot read the public keys: {e}") from None
    keys = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip() and not line.lstrip().startswith("#"):
            keys.append(parse_public_key(line, where=f"{path}:{n}"))
    return keys


def signed_message(bundle: Bundle) -> bytes:
    """The bytes a bundle's signature covers (see the module docstring)."""
    return signed_message_for(bundle.manifest.name, bundle.manifest.version, bundle.sha256)


def signed_message_for(name: str, version: str, digest: str) -> bytes:
    """The bytes the signature of bundle ``name`` ``version`` whose file has SHA-256 ``digest``
    (lowercase hex) covers: what :func:`signed_message` gives for that bundle, without the file."""
    raw_name = name.encode()
    raw_version = version.encode()
    return (_DOMAIN + bytes.fromhex(digest)
            + len(raw_name).to_bytes(2, "big") + raw_name + len(raw_version).to_bytes(2, "big") + raw_version)


def verify_raw(message: bytes, signature: bytes, trusted_raw_keys: Iterable[bytes]) -> str | None:
    """The key id of the first of ``trusted_raw_keys`` (raw 32-byte Ed25519 keys) whose signature
    over ``message`` ``signature`` is; None if none is (also for a malformed key or signature).

    Pure and deterministic: every replica of a group gives the same answer."""
    for raw in trusted_raw_keys:
        try:
            Ed25519PublicKey.from_public_bytes(raw).verify(signature, message)
        except (InvalidSignature, ValueError):
            continue
        return hashlib.sha256(raw).hexdigest()[:16]
    return None


def sign(bundle: Bundle, key: SigningKey) -> bytes:
    """The 64-byte Ed25519 signature of ``bundle``."""
    return key.private.sign(signed_message(bundle))


def write_signature(bundle: Bundle, key: SigningKey, path: str | Path | None = None) -> Path:
    """Sign ``bundle`` and write the detached signature file (default: the bundle's path + ``.sig``)."""
    path = Path(path) if path is not None else bundle.path.with_name(bundle.path.name + ".sig")
    signature = sign(bundle, key)
    path.write_text(f"{_SIG_PREFIX} {key.public.key_id} {base64.b64encode(signature).decode()}\n")
    return path


def read_signature(path: str | Path) -> bytes:
    """The 64-byte signature of a detached signature file."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = f.read(_MAX_SIG_FILE + 1)
    except OSError as e:
        raise SignatureError(f"{path}: cannot read the signature: {e.strerror or e}") from None
    if len(data) > _MAX_SIG_FILE:
        raise SignatureError(f"{path}: not a signature file (larger than {_MAX_SIG_FILE} bytes)")
    parts = data.decode("ascii", "replace").split()
    if len(parts) != 5 or " ".join(parts[:3]) != _SIG_PREFIX:
        raise SignatureError(f"{path}: expected '{_SIG_PREFIX} <key id> <base64 signature>'")
    try:
        signature = base64.b64decode(parts[4], validate=True)
    except binascii.Error:
        raise SignatureError(f"{path}: the signature is not base64") from None
    if len(signature) != 64:
        raise SignatureError(f"{path}: an Ed25519 signature has 64 bytes (got {len(signature)})")
    return signature


def verify(bundle: Bundle, signature: bytes, trusted: Iterable[PublicKey]) -> str:
    """The id of the trusted key whose signature ``signature`` is; SignatureError if none."""
    trusted = list(trusted)
    key_id = verify_raw(signed_message(bundle), signature, [key.raw for key in trusted])
    if key_id is not None:
        return key_id
    ids = ", ".join(k.key_id for k in trusted) or "none"
    raise SignatureError(f"{bundle.path}: bundle {bundle.manifest.name} {bundle.manifest.version} "
                         f"(sha256 {bundle.sha256[:12]}): no trusted key verifies its signature "
                         f"(trusted keys: {ids})")


def verify_file(bundle: Bundle, trusted: Iterable[PublicKey], signature_path: str | Path | None = None) -> str:
    """:func:`verify` with the detached signature file (default: the bundle's path + ``.sig``)."""
    path = signature_path if signature_path is not None else bundle.path.with_name(bundle.path.name + ".sig")
    return verify(bundle, read_signature(path), trusted)
