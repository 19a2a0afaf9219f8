"""Moving a blob between members' stores, sans-IO: the wire schema, the server and the puller.

A member that needs a blob (a bundle file named by its SHA-256) pulls it over
reliable unicast requests (``Channel.request(payload, to=member)``) from
members that have it:

1. it asks every candidate :class:`Have` and each answers :class:`HaveReply`
   with the blob's size, or ``None`` if it does not hold it;
2. it asks holders :class:`ChunkRequest` for consecutive ranges of at most
   :data:`CHUNK` bytes and gets :class:`Chunk` (the bytes) or
   :class:`ChunkError` (why not);
3. it writes the chunks in order to a store writer, whose ``commit()``
   verifies the size and SHA-256.

Everything a peer sends is decoded by :func:`decode` only: msgpack arrays whose
first item is the message kind, every field bounded.  Anything else raises
:class:`MalformedTransfer`.

Rules of :class:`Puller`:

* Holders: a candidate is a holder once it answered :class:`HaveReply` with the
  expected size.  Pulling starts with the first holder; later ones join.
* Spreading: each chunk goes to the holder with the fewest requests in flight,
  ties to the lowest member id (deterministic for a given order of answers;
  with several holders this is round-robin, for throughput).
* Window: a chunk is requested only if it lies within ``window`` chunks of the
  first chunk not yet written, so at most ``window`` chunks (in flight or
  waiting for an earlier one) are held in memory.
* Failures: a member whose request fails (an error reply, :class:`ChunkError`,
  a chunk with the wrong offset or length, no answer by the deadline, it left
  the view) is dropped, and its chunk is asked of another holder.  When no
  holder is left and no :class:`Have` is pending, the pull fails with a reason
  naming every candidate and what went wrong with it.
* Verification: if ``commit()`` finds the wrong SHA-256 or size the blob is
  discarded.  If one member served every chunk it is blamed and dropped (when
  several did, nobody can be blamed).  The pull then starts again, at most
  ``retries`` times (default 2), each time all chunks from one member: the
  lowest id holder not blamed.  So a single bad server is found and skipped:
  one retry elsewhere after it served alone; after a shared attempt, a second
  retry if the first one went to the bad member.

Time is integer microseconds passed in by the driver, as in every sans-IO
core here.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Annotated, NamedTuple, Protocol

import msgspec
from msgspec import Meta, Struct

from groupcomm.services.provisioning.store import (
    DigestMismatch,
    Store,
    StoreError,
    check_digest,
)

__all__ = [
    "CHUNK",
    "MAX_CHUNK",
    "MAX_MESSAGE",
    "Ask",
    "BlobReader",
    "BlobWriterLike",
    "Chunk",
    "ChunkError",
    "ChunkRequest",
    "Have",
    "HaveReply",
    "MalformedTransfer",
    "Puller",
    "Server",
    "StoreReader",
    "decode",
    "encode",
]

CHUNK = 256 * 1024
"""Bytes asked for in one :class:`ChunkRequest` by default (and the most a :class:`Server`
serves by default)."""
MAX_CHUNK = 4 * 1024 * 1024
"""The most bytes one chunk may carry on the wire, whatever a server is configured to serve."""
MAX_MESSAGE = MAX_CHUNK + 1024
"""Bytes of one encoded message; longer ones are malformed without being parsed."""
MAX_REASON = 1024
"""Characters of a :class:`ChunkError` reason."""

Digest = Annotated[str, Meta(pattern="^[0-9a-f]{64}$")]
Offset = Annotated[int, Meta(ge=0, le=(1 << 63) - 1)]
Length = Annotated[int, Meta(ge=1, le=MAX_CHUNK)]
Data = Annotated[bytes, Meta(max_length=MAX_CHUNK)]
Reason = Annotated[str, Meta(max_length=MAX_REASON)]


class _Message(Struct, array_like=True, frozen=True, forbid_unknown_fields=True):
    """Base of every transfer message: a msgpack array whose first item is the kind (the tag)."""


class Have(_Message, tag="have?"):
    """Request: do you hold the blob ``digest``?"""

    digest: Digest


class HaveReply(_Message, tag="have"):
    """Answer to :class:`Have`: the blob's size, or ``None`` if it is not held."""

    digest: Digest
    size: Offset | None


class ChunkRequest(_Message, tag="get"):
    """Request: ``length`` bytes of blob ``digest`` from ``offset``."""

    digest: Digest
    offset: Offset
    length: Length


class Chunk(_Message, tag="chunk"):
    """Answer to :class:`ChunkRequest`: the bytes."""

    digest: Digest
    offset: Offset
    data: Data


class ChunkError(_Message, tag="nochunk"):
    """Answer to :class:`ChunkRequest`: why the bytes are not served."""

    digest: Digest
    reason: Reason


Message = Have | HaveReply | ChunkRequest | Chunk | ChunkError

_decoder = msgspec.msgpack.Decoder(Message)
_encoder = msgspec.msgpack.Encoder()


class MalformedTransfer(ValueError):
    """Bytes that are not one valid transfer message."""


def encode(message: Message) -> bytes:
    """The bytes of ``message``."""
    return _encoder.encode(message)


def decode(data: bytes) -> Message:
    """The one message in ``data``; raises :class:`MalformedTransfer` for anything else."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise MalformedTransfer(f"not bytes: {type(data).__name__}")
    if len(data) > MAX_MESSAGE:
        raise MalformedTransfer(f"{len(data)} bytes, more than {MAX_MESSAGE}")
    try:
        return _decoder.decode(data)
    except msgspec.MsgspecError as exc:
        raise MalformedTransfer(str(exc)) from None


# ---------------------------------------------------------------------- serving


class BlobReader(Protocol):
    """What a :class:`Server` reads blobs from (a :class:`StoreReader` over a Store)."""

    def size(self, digest: str) -> int:
        """The blob's size; KeyError if it is not held."""

    def read(self, digest: str, offset: int, length: int) -> bytes:
        """``length`` bytes of the blob from ``offset`` (the range lies within the blob)."""


class StoreReader:
    """A :class:`BlobReader` over a :class:`~.store.Store` (blocking file reads)."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def size(self, digest: str) -> int:
        """The blob's size; KeyError if the store does not hold it."""
        return self.store.size(digest)

    def read(self, digest: str, offset: int, length: int) -> bytes:
        """``length`` bytes of the stored blob from ``offset``."""
        with open(self.store.path(digest), "rb") as f:
            f.seek(offset)
            return f.read(length)


class Server:
    """Answers :class:`Have` and :class:`ChunkRequest` from ``reader``.

    A request for more than ``max_chunk`` bytes, or for a range reaching beyond
    the blob, is answered :class:`ChunkError` without reading anything.
    """

    def __init__(self, reader: BlobReader, *, max_chunk: int = CHUNK) -> None:
        if not 1 <= max_chunk <= MAX_CHUNK:
            raise ValueError(f"max_chunk must be 1..{MAX_CHUNK} bytes (got {max_chunk})")
        self.reader = reader
        self.max_chunk = max_chunk
        self.served = 0
        """Bytes served in :class:`Chunk` answers."""

    def answer(self, data: bytes) -> bytes:
        """The encoded answer to the encoded request ``data``; MalformedTransfer if it is none."""
        request = decode(data)
        if type(request) is Have:
            return encode(HaveReply(request.digest, self._size(request.digest)))
        if type(request) is ChunkRequest:
            return encode(self._chunk(request))
        raise MalformedTransfer(f"{type(request).__name__} is not a request")

    def _size(self, digest: str) -> int | None:
        try:
            return self.reader.size(digest)
        except KeyError:
            return None

    def _chunk(self, request: ChunkRequest) -> Chunk | ChunkError:
        digest, offset, length = request.digest, request.offset, request.length
        if length > self.max_chunk:
            return ChunkError(digest, f"{length} bytes asked, at most {self.max_chunk} served")
        size = self._size(digest)
        if size is None:
            return ChunkError(digest, "not stored here")
        if offset + length > size:
            return ChunkError(digest, f"bytes {offset}..{offset + length} lie beyond the blob's {size} bytes")
        data = self.reader.read(digest, offset, length)
        if len(data) != length:
            return ChunkError(digest, f"read {len(data)} bytes of {length}")
        self.served += length
        return Chunk(digest, offset, data)


# ---------------------------------------------------------------------- pulling


class BlobWriterLike(Protocol):
    """Where a :class:`Puller` writes (a :class:`~.store.BlobWriter`)."""

    def write(self, chunk: bytes) -> None: ...

    def commit(self) -> str: ...

    def abort(self) -> None: ...


class Ask(NamedTuple):
    """Send ``payload`` as a unicast request to ``member``; feed its answer back with ``token``."""

    token: int
    member: int
    payload: bytes


@dataclass
class _Out:
    member: int
    chunk: int | None          # None: a Have
    deadline: int


class Puller:
    """Pulls blob ``digest`` (``size`` bytes) from ``candidates`` into writers from ``open_writer``.

    Drive it: send every :class:`Ask` from :meth:`take` with ``Channel.request(payload,
    to=member)`` and feed each outcome to :meth:`answered`; call :meth:`tick` at
    :meth:`next_deadline` and :meth:`left` when members leave the view.  It is
    finished when ``state`` is ``"done"`` or ``"failed"`` (``reason`` says why).
    ``open_writer()`` gives a fresh writer (``store.open_writer(digest, size)``);
    it is called again for each retry after a mismatch.
    """

    def __init__(self, digest: str, size: int, candidates: Iterable[int],
                 open_writer: Callable[[], BlobWriterLike], *, now: int, chunk: int = CHUNK,
                 window: int = 4, timeout_us: int = 10_000_000, retries: int = 2) -> None:
        if not 1 <= chunk <= MAX_CHUNK:
            raise ValueError(f"chunk must be 1..{MAX_CHUNK} bytes (got {chunk})")
        check_digest(digest)
        if window < 1:
            raise ValueError(f"window must be at least 1 (got {window})")
        if size < 0:
            raise ValueError(f"size must be at least 0 (got {size})")
        self.digest = digest
        self.size = size
        self.chunk = chunk
        self.window = window
        self.timeout_us = timeout_us
        self.retries = retries
        self.candidates = tuple(sorted(set(candidates)))
        self.state = "asking"
        """``"asking"`` (no holder known yet), ``"pulling"``, ``"done"`` or ``"failed"``."""
        self.reason = ""
        """Why the pull failed (every candidate and what went wrong with it)."""
        self.problems: dict[int, str] = {}
        """What went wrong with each member dropped."""
        self.attempts = 0
        """Writers opened (one more for each retry after a mismatch)."""
        self._open_writer = open_writer
        self._writer: BlobWriterLike | None = None
        self._chunks = (size + chunk - 1) // chunk
        self._holders: set[int] = set()
        self._single = False                            # retrying: all chunks from one member
        self._only: int | None = None                  # the retry's single server
        self._out: dict[int, _Out] = {}
        self._asks: list[Ask] = []
        self._next_token = 0
        self._written = 0                               # chunks written
        self._next = 0                                  # first chunk never requested this attempt
        self._retry: list[int] = []                     # heap of chunks to ask again
        self._buffered: dict[int, bytes] = {}
        self._served: set[int] = set()                  # members whose chunks were written this attempt
        self._load: dict[int, int] = {}
        if not self.candidates:
            self._fail()
            return
        for member in self.candidates:
            self._send(now, member, None, Have(digest))

    # -- the driver's side

    @property
    def finished(self) -> bool:
        """Whether the pull is done or failed."""
        return self.state in ("done", "failed")

    @property
    def progress(self) -> tuple[int, int]:
        """``(bytes written, total bytes)`` of the current attempt."""
        return min(self._written * self.chunk, self.size), self.size

    def take(self) -> list[Ask]:
        """The requests to send now."""
        asks, self._asks = self._asks, []
        return asks

    def next_deadline(self) -> int | None:
        """When :meth:`tick` must be called next (None: nothing in flight)."""
        return min((out.deadline for out in self._out.values()), default=None)

    def tick(self, now: int) -> None:
        """Requests past their deadline fail as timeouts."""
        for token in [t for t, out in self._out.items() if out.deadline <= now]:
            self.answered(now, token, None, "no answer before the timeout")

    def left(self, now: int, members: Iterable[int]) -> None:
        """``members`` left the view: their requests fail and they are dropped."""
        gone = set(members)
        for token in [t for t, out in self._out.items() if out.member in gone]:
            self.answered(now, token, None, "left the view")
        for member in gone & self._holders:
            self._drop(member, "left the view")
        self._pump(now)

    def answered(self, now: int, token: int, reply: bytes | None, error: str | None = None) -> None:
        """The outcome of request ``token``: the reply's bytes, or None and ``error`` (an error
        reply, a timeout, the member left).  Unknown or stale tokens are ignored."""
        out = self._out.pop(token, None)
        if out is None or self.finished:
            return
        member = out.member
        if out.chunk is not None:
            self._load[member] -= 1
        problem = error or "no answer"
        message = None
        if reply is not None:
            try:
                message = decode(reply)
            except MalformedTransfer as exc:
                problem = f"malformed answer: {exc}"
        if out.chunk is None:
            self._have_answered(member, message, problem)
        else:
            self._chunk_answered(member, out.chunk, message, problem)
        self._pump(now)

    # -- internals

    def _send(self, now: int, member: int, chunk: int | None, message: Message) -> None:
        token = self._next_token
        self._next_token += 1
        self._out[token] = _Out(member, chunk, now + self.timeout_us)
        if chunk is not None:
            self._load[member] = self._load.get(member, 0) + 1
        self._asks.append(Ask(token, member, encode(message)))

    def _have_answered(self, member: int, message: Message | None, problem: str) -> None:
        if message is None:
            self._drop(member, problem)
        elif type(message) is not HaveReply or message.digest != self.digest:
            self._drop(member, f"answered {type(message).__name__} to Have")
        elif message.size is None:
            self._drop(member, "does not hold it")
        elif message.size != self.size:
            self._drop(member, f"holds {message.size} bytes, expected {self.size}")
        elif member not in self.problems:
            self._holders.add(member)

    def _chunk_answered(self, member: int, index: int, message: Message | None, problem: str) -> None:
        offset = index * self.chunk
        length = min(self.chunk, self.size - offset)
        if type(message) is Chunk and message.digest == self.digest:
            if message.offset == offset and len(message.data) == length:
                self._buffered[index] = message.data
                self._served.add(member)
                return
            problem = f"sent bytes {message.offset}+{len(message.data)}, asked {offset}+{length}"
        elif type(message) is ChunkError and message.digest == self.digest:
            problem = f"refused: {message.reason}"
        elif message is not None:
            problem = f"answered {type(message).__name__} to ChunkRequest"
        self._drop(member, problem)
        heapq.heappush(self._retry, index)

    def _drop(self, member: int, problem: str) -> None:
        self._holders.discard(member)
        self.problems.setdefault(member, problem)

    def _pump(self, now: int) -> None:
        """Write what is contiguous, ask for more, finish or fail."""
        if self.finished:
            return
        if self._holders and self.state == "asking":
            self.state = "pulling"
            if self._single:
                self._only = min(self._holders)
            self._open()
            if self.finished:
                return
        if self.state != "pulling":
            if not self._out:
                self._fail()
            return
        while self._written in self._buffered:
            data = self._buffered.pop(self._written)
            try:
                self._writer.write(data)
            except (OSError, StoreError) as exc:   # a full disk: nothing another member can fix
                self._fail(f"writing failed: {exc}")
                return
            self._written += 1
        if self._written == self._chunks:
            self._commit(now)
            return
        while self._chunks_in_flight() < self.window:
            if self._retry:
                index = self._retry[0]
            elif self._next < min(self._chunks, self._written + self.window):
                index = self._next
            else:
                break
            member = self._pick()
            if member is None:
                break
            if self._retry:
                heapq.heappop(self._retry)
            else:
                self._next += 1
            offset = index * self.chunk
            self._send(now, member, index, ChunkRequest(self.digest, offset, min(self.chunk, self.size - offset)))
        if not self._out and (self._retry or self._next < self._chunks) and self._pick() is None:
            self._fail()

    def _chunks_in_flight(self) -> int:
        return sum(1 for out in self._out.values() if out.chunk is not None)

    def _pick(self) -> int | None:
        holders = self._holders if self._only is None else self._holders & {self._only}
        return min(holders, key=lambda m: (self._load.get(m, 0), m), default=None)

    def _open(self) -> None:
        self.attempts += 1
        try:
            self._writer = self._open_writer()
        except (OSError, StoreError) as exc:   # QuotaExceeded and the like
            self._fail(f"cannot store it: {exc}")

    def _commit(self, now: int) -> None:
        try:
            self._writer.commit()
        except (OSError, StoreError) as exc:
            if not isinstance(exc, DigestMismatch):
                self._fail(f"storing failed: {exc}")
                return
            self._writer.abort()
            if len(self._served) == 1:
                self._drop(next(iter(self._served)), f"served bytes that failed verification: {exc}")
            if self.attempts > self.retries:
                self._fail(f"verification failed {self.attempts} time(s): {exc}")
                return
            # Start again from one member, chosen once a holder is known (a Have may be pending).
            self.state = "asking"
            self._writer = None
            self._single = True
            self._written = self._next = 0
            self._buffered.clear()
            self._served.clear()
            self._retry.clear()
            self._pump(now)
            return
        self.state = "done"

    def _fail(self, reason: str | None = None) -> None:
        if self._writer is not None:
            self._writer.abort()
        self.state = "failed"
        self._out.clear()
        self._buffered.clear()
        named = "; ".join(f"member {m}: " + self.problems.get(m, "holds it" if m in self._holders else "no answer")
                          for m in self.candidates)
        if reason is None:
            reason = "no candidate could serve it" if self.candidates else "no candidates"
        self.reason = f"blob {self.digest[:12]}: {reason}" + (f" ({named})" if named else "")
