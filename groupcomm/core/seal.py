"""Sealed datagrams: the cluster key's authenticated encryption (``groupcomm/_seal.c``).

Both socket drivers use the same C code: the C pump on its thread, the trio
driver through :class:`Seal`.  The format, the nonce construction and the
replay rules are described in ``groupcomm/_seal.h`` and docs/security.rst.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from groupcomm.config import Duration
from groupcomm.config.keys import KeyFile
from groupcomm.core.native import ffi, lib
from groupcomm.errors import ConfigError

__all__ = ["CryptoConfig", "Seal", "OVERHEAD", "DROP_REASONS", "SealError"]

OVERHEAD = lib.GC_SEAL_OVERHEAD
"""Bytes a seal adds to a datagram (28 of header, 16 of tag)."""

DROP_REASONS = {
    lib.GC_SEAL_DROP_SHORT: "short",
    lib.GC_SEAL_DROP_UNSEALED: "unsealed",
    lib.GC_SEAL_DROP_VERSION: "version",
    lib.GC_SEAL_DROP_KEY: "key",
    lib.GC_SEAL_DROP_AUTH: "auth",
    lib.GC_SEAL_DROP_REPLAY: "replay",
    lib.GC_SEAL_DROP_STALE: "stale",
    lib.GC_SEAL_DROP_SENDER: "sender",
    lib.GC_SEAL_DROP_NODELIST: "nodelist",
    lib.GC_SEAL_DROP_RATE: "rate",
    lib.GC_SEAL_DROP_SELF: "self",
    lib.GC_SEAL_DROP_MISDIRECTED: "misdirected",
}
"""gc_seal_open's drop codes -> the name of their counter (``seal_drop_<name>`` in stats)."""

_MAX_DATAGRAM = 65535
_SEAL_BUF = _MAX_DATAGRAM + OVERHEAD


class SealError(RuntimeError):
    """A local failure to seal (no key set, out of memory): never caused by a peer."""


@dataclass(frozen=True)
class CryptoConfig:
    """The ``CRYPTO`` layer: the cluster key that authenticates and encrypts every datagram.

    Without a ``key_file`` datagrams travel in clear and anyone who can send
    to the group can read, join and disturb it (a warning says so at start).
    """

    key_file: str = ""
    """Path of the key file (``groupcomm keygen PATH``); empty: no key."""
    mode: Literal["encrypt", "auth-only"] = "encrypt"
    """``encrypt``: AES-256-GCM; ``auth-only``: authenticated but in clear (for debugging with a sniffer)."""
    reload_interval: Duration = 1.0
    """How often the key file is checked for changes (a key rotation)."""
    nodelist: tuple[int | str, ...] = ()
    """Members allowed to take part, by node id or by member name; empty: any holder of the key."""
    max_peers: int = 1024
    """Senders whose replay state is kept (about 300 bytes each); the least recently heard makes room."""
    derive_budget: int = 256
    """Subkey derivations per second that may fail authentication (forged claims) before more are dropped."""

    def __post_init__(self) -> None:
        if self.mode not in ("encrypt", "auth-only"):
            raise ConfigError(f"CRYPTO: mode must be 'encrypt' or 'auth-only', not {self.mode!r}")
        if self.reload_interval <= 0:
            raise ConfigError("CRYPTO: reload_interval must be > 0")
        if not 1 <= self.max_peers <= 1 << 20:
            raise ConfigError(f"CRYPTO: max_peers must be in 1..{1 << 20}, got {self.max_peers}")
        if not 1 <= self.derive_budget <= 1 << 20:
            raise ConfigError(f"CRYPTO: derive_budget must be in 1..{1 << 20}, got {self.derive_budget}")
        nodes = tuple(self.nodelist)
        for node in nodes:
            if type(node) is str and node:
                continue
            if type(node) is not int or not 0 < node < 1 << 32:
                raise ConfigError(f"CRYPTO: nodelist entries are node ids (1..2^32-1) or member names, not {node!r}")
        object.__setattr__(self, "nodelist", nodes)


class Seal:
    """Seals outgoing and opens incoming datagrams for one member incarnation."""

    def __init__(self, cluster_id: int, node_id: int, incarnation: int, keys: KeyFile, *,
                 auth_only: bool = False, max_peers: int = 1024, derive_budget: int = 256,
                 nodelist: tuple[int, ...] = ()) -> None:
        out = ffi.new("gc_seal_t **")
        rc = lib.gc_seal_new(cluster_id, node_id, incarnation, int(auth_only), max_peers, derive_budget, out)
        if rc != 0:
            raise SealError(f"cannot create the seal context (error {rc})")
        self._s = ffi.gc(out[0], lib.gc_seal_free)
        self._out_buf = ffi.new("uint8_t[]", _MAX_DATAGRAM + OVERHEAD)
        self._seal_buf = ffi.new("uint8_t[]", _SEAL_BUF)
        self._sender = ffi.new("uint32_t *")
        self._flags = ffi.new("uint32_t *")
        self.sender = 0
        """Who sealed the datagram :meth:`open` returned last."""
        self.newest = False
        """Whether it was the newest yet from its sender (only such a datagram may move an address)."""
        self._held: dict[int, bytes] = {}
        self.use_keys(keys)
        if nodelist:
            lib.gc_seal_set_nodelist(self._s, list(nodelist), len(nodelist))

    @property
    def pointer(self):
        """The C context, for the C pump (it must not outlive this object)."""
        return self._s

    def use_keys(self, keys: KeyFile) -> None:
        """Hold exactly ``keys``; seal with ``keys.send`` from now on."""
        for key_id, key in keys.keys.items():
            if self._held.get(key_id, key) != key:
                raise ConfigError(f"key {key_id} changed its value: a key id must name one key for good "
                                  "(add a new key with `groupcomm key add`)")
            if lib.gc_seal_set_key(self._s, key_id, key, len(key)) != 0:
                raise ConfigError(f"cannot hold key {key_id}")
        lib.gc_seal_use_key(self._s, keys.send)
        for key_id in set(self._held) - set(keys.keys):
            lib.gc_seal_forget_key(self._s, key_id)
        self._held = dict(keys.keys)

    @property
    def key_ids(self) -> list[int]:
        return sorted(self._held)

    def seal(self, packet: bytes, to: int = 0) -> bytes:
        """The sealed datagram for ``packet``, for member ``to`` only (0: for every member)."""
        return self.seal_view(packet, to)[:]

    def seal_view(self, packet: bytes, to: int = 0):
        """Like :meth:`seal`, without a copy: a buffer valid until the next call of this object
        (hand it straight to ``sendto``)."""
        n = lib.gc_seal_close(self._s, to, packet, len(packet), self._seal_buf, _SEAL_BUF)
        if n < 0:
            raise SealError(f"cannot seal a {len(packet)}-byte datagram (error {n})")
        return ffi.buffer(self._seal_buf, n)

    def open(self, datagram: bytes) -> bytes | int:
        """The datagram inside, or the (negative) drop reason; drops are counted in :meth:`stats`."""
        n = lib.gc_seal_open(self._s, datagram, len(datagram), self._out_buf,
                             len(self._out_buf), self._sender, self._flags)
        if n < 0:
            return n
        self.sender = self._sender[0]
        self.newest = bool(self._flags[0] & lib.GC_SEAL_NEWEST)
        return ffi.buffer(self._out_buf, n)[:]

    def incarnations(self) -> dict[int, int]:
        """The newest incarnation heard per sender (to keep across restarts)."""
        cap = 1 << 16
        nodes, incs = ffi.new("uint32_t[]", cap), ffi.new("uint64_t[]", cap)
        n = lib.gc_seal_incarnations(self._s, nodes, incs, cap)
        return {nodes[i]: incs[i] for i in range(n)}

    def remember(self, incarnations: dict[int, int]) -> None:
        """Refuse datagrams of these senders' older incarnations (what a previous run heard)."""
        for node, inc in incarnations.items():
            lib.gc_seal_remember(self._s, node, inc)

    def stats(self) -> dict[str, int]:
        """Counters: ``sealed``, ``opened``, ``drop_<reason>``, ``derivations``, ``new_incarnations``..."""
        st = ffi.new("gc_seal_stats_t *")
        lib.gc_seal_get_stats(self._s, st)
        return {name: getattr(st, name) for name, _ in ffi.typeof("gc_seal_stats_t").fields}
