"""The public channel: a member of a cluster over UDP, driven by trio.

::

    async with groupcomm.open_channel("udp", cluster="orders", name="node-1") as ch:
        await ch.send(b"...")                  # agreed by default; safe=True on request
        async for event in ch.events():       # Message | View, in the total order
            ...

The ring (:mod:`groupcomm.core.ring`) is sans-IO; this module only moves bytes and
time.  The channel owns a nursery with three tasks: one per socket (draining
every readable datagram per wake-up, regular messages before tokens, then one
flush) and one timer task sleeping until the ring's next deadline.  With
``pump = "c"`` in the transport layer, a C thread (:mod:`groupcomm.io.pump`)
serves the sockets and the ring's timers instead, and one task waits for its
eventfd: deliveries, views and the other layers' packets.

Slow consumers: deliveries queue without blocking the ring, up to
``max_pending_events`` events and ``max_pending_bytes`` bytes of payload
(:class:`ChannelConfig`, the ``CHANNEL`` layer of a stack file).  Past either
the member leaves the group (the others carry on without waiting for it) and
``events()`` raises :class:`~groupcomm.errors.DeliveryOverflow`.  Senders get
backpressure: ``send`` waits while the send queue is full (``send_queue_max``
messages or ``send_queue_bytes`` bytes in ``TOTEM``).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import math
import os
import time
import zlib
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from operator import itemgetter
from pathlib import Path
from typing import Any

import trio

from groupcomm.config import Size, build_stack, load_stack
from groupcomm.config.keys import KeyFile, read_key_file
from groupcomm.core.ring import RingConfig, SendTo, SendToAll
from groupcomm.core.seal import OVERHEAD as SEAL_OVERHEAD
from groupcomm.core.seal import CryptoConfig, Seal
from groupcomm.errors import (
    ChannelClosed,
    ConfigError,
    DeliveryOverflow,
    NotOperational,
    QueueFull,
)
from groupcomm.events import Direct, Message, View
from groupcomm.io.probe import is_probe_request, probe_response
from groupcomm.io.pump import DGRAM_PROBE, DGRAM_SELF, DGRAM_TOKEN, Pump, TargetSet, attach, classify, detach, now_us
from groupcomm.io.space import Handler, Services, Space
from groupcomm.io.state_dir import MemberState, open_member_state
from groupcomm.io.udp import (
    UdpConfig,
    UdpSockets,
    UdpuConfig,
    open_sockets,
    open_unicast,
    parse_host,
    resolve_pump,
)
from groupcomm.layers.fd import FdConfig
from groupcomm.layers.frag import FragConfig, Pieces
from groupcomm.layers.member import Member
from groupcomm.layers.quorum import QuorumConfig
from groupcomm.layers.router import Router
from groupcomm.layers.rpc import ALL, Mode, Reply
from groupcomm.layers.spaces import (
    Merge,
    SpaceMessage,
    SpacesConfig,
    SpaceView,
    StateInstalled,
    StateRequest,
    Synced,
)
from groupcomm.layers.unicast import UnicastConfig
from groupcomm.layers.wire import (
    PROBE_MAGIC,
    PROTOCOL_VERSION,
    SENDER,
    datagram_version,
)

__all__ = ["Channel", "ChannelConfig", "node_id_for", "open_channel"]

_OBSERVED = (View, Merge, Synced, SpaceView, SpaceMessage, StateRequest, StateInstalled)
"""What :meth:`Channel.add_observer` sees."""

_log = logging.getLogger("groupcomm.channel")


def _for_observers(item: object) -> None:
    """An output only observers (:meth:`Channel.add_observer`) see."""


_US = 1_000_000
_MAX_DATAGRAM = 65536
_JOIN_OFF_LOOP = 1 << 20
"""Reassembled messages this large are joined in a worker thread when the application takes
them (receive_batch), not in the receive task: one copy of 64 MiB holds a loop for tens of ms."""
_YIELD_EVERY = 64
_DRAIN_BYTES = 2 << 20
"""Bytes of datagrams one wake-up of a receive task reads before it acts on them and lets the
other tasks run: a flood of fragments must not keep the timers (token, failure detector
heartbeats and pongs) waiting, or the other members take this one for dead."""
_PAYLOAD = itemgetter(1)                 # of a Message (sender, payload, safe)
_MIN_PEER_TABLE = 256
"""Addresses of senders kept per channel before those outside the view are forgotten
(at least this, or four times the ring's ``max_members``)."""
PEER_EXPIRY = 30.0
"""Seconds after which the address of a sender outside the view is forgotten (at the next view)."""
_NEVER_HEARD = 2**64 - 1       # gc_pump_forget: forget every peer outside the view


@dataclass(frozen=True)
class ChannelConfig:
    """The application side of a channel: how far its consumers may fall behind.

    A member whose undelivered events pass either limit, in
    :meth:`Channel.events` or in one space's :meth:`Space.events
    <groupcomm.io.space.Space.events>`, leaves the group so the ring never
    waits for it (see "A slow consumer" in the guarantees).
    """

    max_pending_events: int = 100_000
    """Events queued for the application, per stream (the channel's, each space's)."""
    max_pending_bytes: Size = 128 << 20
    """Payload bytes queued for the application, per stream (the channel's, each space's),
    not counting the largest fragmented message held.  The default is twice FRAG's default
    ``max_message``, so two messages of that size from two senders at once fit; keep it at
    least ``(large senders at once - 1) x max_message`` if you raise ``max_message``."""

    def __post_init__(self) -> None:
        if self.max_pending_events < 1:
            raise ConfigError("CHANNEL: max_pending_events must be >= 1")
        if self.max_pending_bytes < 1:
            raise ConfigError("CHANNEL: max_pending_bytes must be at least 1 byte")


def _join_pieces(batch: list) -> None:
    """Replace each large message's :class:`Pieces` by its bytes (in a worker thread)."""
    for i, event in enumerate(batch):
        if type(event) is Message and type(event.payload) is Pieces:
            batch[i] = event._replace(payload=event.payload.join())


def node_id_for(cluster: str, name: str) -> int:
    """A stable 32-bit node id for ``name`` in ``cluster`` (never 0 or 2**32 - 1)."""
    digest = hashlib.blake2b(f"{cluster}\0{name}".encode(), digest_size=4).digest()
    return 1 + int.from_bytes(digest, "big") % 0xFFFFFFFD


def cluster_id_for(cluster: str) -> int:
    return zlib.crc32(cluster.encode())


class Channel:
    """One member of a cluster.  Create it with :func:`open_channel`."""

    def __init__(
        self,
        *,
        cluster: str,
        name: str | None,
        node_id: int | None,
        ring: RingConfig,
        udp: UdpConfig | UdpuConfig,
        max_pending_events: int,
        max_pending_bytes: int = ChannelConfig.max_pending_bytes,
        fd: FdConfig | None = None,
        frag: FragConfig | None = None,
        unicast: UnicastConfig | None = None,
        quorum: QuorumConfig | None = None,
        spaces: SpacesConfig | None = None,
        state_dir: str | os.PathLike | None = None,
        crypto: CryptoConfig | None = None,
    ) -> None:
        if not cluster:
            raise ConfigError("open_channel: cluster name must not be empty")
        if max_pending_events < 1:
            raise ConfigError("open_channel: max_pending_events must be >= 1")
        if max_pending_bytes < 1:
            raise ConfigError("open_channel: max_pending_bytes must be at least 1 byte")
        self.cluster = cluster
        self._name = name
        self._node_id = node_id
        self._ring_config = RingConfig(**{**ring.__dict__, "cluster_id": cluster_id_for(cluster)})
        self._udp_config = udp
        self._fd_config = fd
        self._frag_config = frag or FragConfig()
        self._unicast_config = unicast
        self._quorum_config = quorum.with_ids(lambda n: node_id_for(cluster, n)) if quorum is not None else None
        self._spaces_config = spaces
        self._crypto_config = crypto or CryptoConfig()
        self._seal: Seal | None = None
        self._key_stamp: tuple | None = None       # (mtime_ns, size) of the key file last read
        self._seal_peers_saved = 0                 # the seal's new_incarnations when last saved
        # Root of the members' state directories (groupcomm.io.state_dir); "" or None: the default.
        self._state_root = state_dir if state_dir is not None else (quorum.state_dir if quorum else "")
        self._state: MemberState | None = None
        self._services = Services(self)
        self._observers: list[Callable[[object], None]] = []
        routes = {SendToAll: self._send_to_all, SendTo: self._send_to, list: self._deliver_run,
                  View: self._deliver_view, Merge: self._deliver_event, Direct: self._deliver_event,
                  Synced: _for_observers}
        routes.update(self._services.routes())
        for kind in _OBSERVED:
            routes[kind] = self._observed(routes[kind])
        self._router = Router(routes)
        self._batch: list = []               # events of the flush under way, handed to events() in one go
        self._batch_bytes = 0
        self._batch_large = 0                # ... its largest message not joined yet (Pieces), in bytes
        self._large_pending: deque[int] = deque()    # that size for each queued batch that has one
        self._flushing = self._flush_again = False
        self._nursery: trio.Nursery | None = None
        self._max_pending = max_pending_events
        self._max_pending_bytes = max_pending_bytes
        self._member: Member | None = None
        self._sockets: UdpSockets | None = None
        self._peers: dict[int, tuple] = {}
        self._peer_heard: dict[int, float] = {}    # when each peer's address was last confirmed
        self._targets: set[tuple] = set()          # unicast-only transport: everyone we know
        self._fixed_targets: frozenset[tuple] = frozenset()    # ... of which the configured hosts
        # Events travel in one list per flush (with its payload bytes): one checkpoint per
        # batch, not per message.  Unbounded here; the counts below bound it.
        self._events_send, self._events_recv = trio.open_memory_channel[tuple[list, int, int]](math.inf)
        self._pending_events = 0
        self._pending_bytes = 0
        self._peer_table_max = max(_MIN_PEER_TABLE, 4 * ring.max_members)
        self._view: View | None = None
        self._joined = trio.Event()
        self._space = trio.Event()
        self._timer_scope: trio.CancelScope | None = None
        self._armed_deadline = math.inf
        self._closed = False
        self._overflow = False
        self._overflow_reason = ""
        self._sends_since_yield = 0
        self._probe_mark = (0.0, 0)
        self._clock: trio.abc.Clock | None = None
        self._pump: Pump | None = None             # the C socket pump, when the transport asks for it
        self._pump_offset = 0.0                    # trio time - pump time (both CLOCK_MONOTONIC)
        self.dropped_sends = 0

    # -- public --------------------------------------------------------------

    @property
    def address(self) -> int:
        """This member's node id (what other members see as ``sender``)."""
        return self._require_member().node_id

    @property
    def name(self) -> str:
        return self._name or str(self.address)

    @property
    def view(self) -> View | None:
        """The current regular view (None until the first one is installed)."""
        return self._view

    @property
    def state_dir(self) -> Path | None:
        """This member's durable state directory (``<root>/<cluster>/<name>``, see
        :mod:`groupcomm.io.state_dir`), once running; None without one."""
        state = self._state
        return state.state.path if state is not None and state.state is not None else None

    @property
    def max_payload(self) -> int:
        """Largest payload :meth:`send` accepts (the FRAG layer's ``max_message``)."""
        self._require_member()
        return self._frag_config.max_message

    def stats(self) -> dict[str, int]:
        """The ring's counters plus the transport's and the layers'."""
        member = self._require_member()
        s = member.ring.stats()
        s["transport_send_drops"] = self.dropped_sends
        s["fragments_dropped"] = member.frag.dropped
        s["reassembly_refused"] = member.frag.refused
        s.update((f"frames_dropped_{layer}", n) for layer, n in member.dropped_frames.items())
        s["pending_events"] = self._pending_events
        s["pending_bytes"] = self._pending_bytes
        s["send_queue_bytes"] = member.multicast.queued_bytes
        s["state_transfers_retried"] = member.spaces.transfers_retried
        s["callback_failures"] = self._services.callback_failures
        s["peer_addresses"] = self._pump.known_peers if self._pump is not None else len(self._peers)
        s["send_targets"] = len(self._targets)
        if self._seal is not None:
            s.update((f"seal_{name}", n) for name, n in self._seal.stats().items())
        if self._pump is not None:
            pump = self._pump.stats()
            s.update(pump)
            s["transport_send_drops"] += pump["pump_send_errors"]
        return s

    async def send(self, payload: bytes, *, safe: bool = False) -> None:
        """Multicast ``payload`` to the group in total order; waits while the send queue is full.

        ``safe=False`` (the default) is agreed delivery; ``safe=True`` delivers
        only once every member of the view has the message.
        """
        while True:
            try:
                self.send_nowait(payload, safe=safe)
                break
            except QueueFull:
                self._space = trio.Event() if self._space.is_set() else self._space
                await self._space.wait()
        # A full yield per message would cap throughput at the scheduler's speed;
        # the bounded queues already push back (QueueFull above), so yield every
        # few sends and only check cancellation in between.
        self._sends_since_yield += 1
        if self._sends_since_yield >= _YIELD_EVERY:
            self._sends_since_yield = 0
            await trio.lowlevel.checkpoint()
        else:
            await trio.lowlevel.checkpoint_if_cancelled()

    def send_nowait(self, payload: bytes, *, safe: bool = False) -> None:
        """Like :meth:`send`, but raises :class:`~groupcomm.errors.QueueFull` instead of waiting.

        The cheapest way to send many messages: call it in a loop and
        ``await ch.send(...)`` (which waits for room) when it raises.
        """
        if type(payload) is not bytes and not isinstance(payload, (bytearray, memoryview)):
            raise TypeError(f"payload must be bytes, not {type(payload).__name__}")
        member = self._member
        if member is None or self._closed:
            self._require_member()
        if member.send(self._now(), payload, safe):
            self._flush()

    def send_nowait_many(self, payloads: Sequence[bytes], *, safe: bool = False) -> int:
        """Queue as many of ``payloads`` as there is room for, in order; returns how many.

        One call into the ring for the lot, so it costs less per message than
        :meth:`send_nowait` in a loop.  Fewer than all means the send queue is
        full (where :meth:`send_nowait` raises :class:`~groupcomm.errors.QueueFull`);
        :meth:`send_many` waits for room instead.  A payload that is not bytes
        raises :class:`TypeError` before anything is queued; one over the
        message limit raises :class:`~groupcomm.errors.PayloadTooLarge` once
        the ones before it are queued.
        """
        payloads = list(payloads)
        if not all(type(p) is bytes for p in payloads):
            for p in payloads:
                if not isinstance(p, (bytes, bytearray, memoryview)):
                    raise TypeError(f"payload must be bytes, not {type(p).__name__}")
            payloads = [bytes(p) for p in payloads]
        member = self._member
        if member is None or self._closed:
            self._require_member()
        if not payloads:
            return 0
        taken = member.send_many(self._now(), payloads, safe)
        if member.has_output:
            self._flush()
        return taken

    async def send_many(self, payloads: Sequence[bytes], *, safe: bool = False) -> None:
        """:meth:`send` for each of ``payloads``, in order, waiting for room when the queue is full."""
        payloads = list(payloads)
        while payloads:
            taken = self.send_nowait_many(payloads, safe=safe)
            payloads = payloads[taken:]
            if payloads:
                self._space = trio.Event() if self._space.is_set() else self._space
                await self._space.wait()
            else:
                await trio.lowlevel.checkpoint()

    async def events(self) -> AsyncIterator[Message | View | Merge | Direct]:
        """Everything the group hands this member, in delivery order, until the channel closes.

        It yields four types (dispatch on ``type(event)`` or ``match``):

        * :class:`~groupcomm.events.Message` ``(sender, payload, safe)``: a
          multicast (:meth:`send`), in the total order every member sees;
          ``safe`` is the guarantee its sender asked for.
        * :class:`~groupcomm.events.View` ``(members, ring_id, transitional,
          primary)``: the membership changed.  A transitional view lists the
          members that came along from this member's previous view; it comes
          just before the regular view with the same ``ring_id``, and the
          messages between the two were delivered with the transitional
          configuration's weaker guarantee.  ``primary``: the view holds a
          majority of the expected votes (:mod:`groupcomm.layers.quorum`).
        * :class:`~groupcomm.layers.spaces.Merge` ``(ring_id, components,
          primary, was_primary)``: after the regular view of a ring that joined
          members whose state differed (a healed partition), the sides and the
          one that was primary; members of the other sides re-fetch their
          spaces' state from it.
        * :class:`~groupcomm.events.Direct` ``(sender, payload)``: a
          point-to-point message (:meth:`send_to`), FIFO per sender, not
          ordered with the multicasts.

        Space messages and space views go to each space's own
        :meth:`Space.events <groupcomm.io.space.Space.events>`.  A member more
        than ``max_pending_events`` events or ``max_pending_bytes`` bytes of
        payload behind leaves the group; this then hands out the events
        already queued and raises :class:`~groupcomm.errors.DeliveryOverflow`.
        """
        while batch := await self.receive_batch():
            for event in batch:
                yield event

    async def receive_batch(self) -> list[Message | View | Merge | Direct]:
        """The next events for this member, as :meth:`events` yields them, in one list (all
        one flush delivered); waits for one.  ``[]`` once the channel closed; raises
        :class:`~groupcomm.errors.DeliveryOverflow` then if the member left as a slow consumer.

        The events count as delivered (no longer pending) once returned.
        """
        try:
            batch, size, large = await self._events_recv.receive()
        except trio.EndOfChannel:
            if self._overflow:
                raise DeliveryOverflow(
                    f"member {self.name}: {self._overflow_reason}; "
                    "the member left the group so the others are not held up"
                ) from None
            return []
        self._pending_events -= len(batch)             # the application has it: no longer queued
        self._pending_bytes -= size
        if large:
            self._large_pending.popleft()
            with trio.CancelScope(shield=True):          # the batch is ours now: never lose it
                await trio.to_thread.run_sync(_join_pieces, batch)
        return batch

    async def aclose(self) -> None:
        """Leave the group gracefully and stop."""
        self._leave()

    # -- spaces and request-reply (groupcomm.io.space) ---------------------------------

    async def join_space(self, name: str) -> Space:
        """Join the ServiceSpace ``name``; returns once this member's join is delivered."""
        return await self._services.join(name)

    async def send_to(self, member: int, payload: bytes) -> None:
        """Send ``payload`` to one member over reliable unicast (it arrives as :class:`Direct`).

        Returns once ``member`` acknowledged it; raises :class:`MemberUnreachable`
        at once if ``member`` is not in the view, or as soon as it leaves the
        view before acknowledging.
        """
        if not isinstance(payload, (bytes, bytearray, memoryview)):
            raise TypeError(f"payload must be bytes, not {type(payload).__name__}")
        await self._services.send_to(member, bytes(payload))

    def on_request(self, handler: Handler) -> None:
        """``async def handler(request) -> bytes`` answers channel-wide requests (:meth:`request`)."""
        self._services.handlers[""] = handler

    async def request(self, payload: bytes, *, to: int | list[int] | tuple[int, ...] | None = None,
                      mode: Mode = ALL, timeout: float = 2.0) -> dict[int, Reply]:
        """Ask every member of the channel (``to=None``, through the ring) or ``to``; see :mod:`groupcomm.layers.rpc`."""
        return await self._services.request("", payload, to=to, mode=mode, timeout=timeout)

    # -- the surface the layers' trio faces use (groupcomm.io.space) ------------------

    def add_observer(self, observe: Callable[[object], None]) -> None:
        """Call ``observe(item)`` with every ring :class:`~groupcomm.events.View` (transitional
        too), :class:`~groupcomm.layers.spaces.Merge`, :class:`~groupcomm.layers.spaces.SpaceView`,
        :class:`~groupcomm.layers.spaces.SpaceMessage`, :class:`~groupcomm.layers.spaces.StateRequest`,
        :class:`~groupcomm.layers.spaces.StateInstalled` and :class:`~groupcomm.layers.spaces.Synced`
        (of every space, joined through
        :meth:`call_member` or not), in delivery order, as the channel routes them.

        For services that must see ring and space views in one order (the supervisor's
        placement).  ``observe`` runs inside the channel's flush: it must be quick, must not
        block or raise, and must not call the channel; hand the items to a task instead.
        """
        self._observers.append(observe)

    def claim_space(self, name: str, *, on_request: Handler | None = None) -> None:
        """An observer (:meth:`add_observer`) serves space ``name``, joined through :meth:`call_member`.

        Its :class:`~groupcomm.layers.spaces.StateRequest` items are then left to
        the observer, which answers each with :meth:`provide_state` (else a joiner
        is told at once that this member has no state), and requests in the space
        (:meth:`space_request`) are answered by ``on_request``."""
        self._services.claimed.add(name)
        if on_request is not None:
            self._services.handlers[name] = on_request

    def release_space(self, name: str) -> None:
        """Undo :meth:`claim_space`."""
        self._services.claimed.discard(name)
        self._services.handlers.pop(name, None)

    def provide_state(self, request: StateRequest, state: bytes | None) -> None:
        """Answer a claimed space's state request with a snapshot (None: no state)."""
        self._services.provide(request, state)

    async def space_request(self, space: str, payload: bytes, *, to: int | list[int] | tuple[int, ...] | None = None,
                            mode: Mode = ALL, timeout: float = 2.0) -> dict[int, Reply]:
        """:meth:`Space.request <groupcomm.io.space.Space.request>` for a space joined through
        :meth:`call_member` (a claimed one)."""
        return await self._services.request(space, payload, to=to, mode=mode, timeout=timeout)

    def _observed(self, handle: Callable[[Any], None]) -> Callable[[Any], None]:
        observers = self._observers

        def route(item: Any) -> None:
            handle(item)
            for observe in observers:
                observe(item)
        return route

    def call_member(self, action: Callable[[int, Member], object], *, quiet: bool = False) -> None:
        """Run ``action(now, member)`` on this channel's sans-IO :class:`~groupcomm.layers.member.Member`,
        then act on its outputs (called while the channel acts on outputs, after those).
        ``quiet``: on a closed channel do nothing instead of raising
        :class:`~groupcomm.errors.ChannelClosed`."""
        try:
            member = self._require_member()
            action(self._now(), member)
        except (ChannelClosed, NotOperational):
            if quiet:
                return
            raise
        if member.has_output:
            self._outputs_ready()

    async def call_member_when_room(self, action: Callable[[int, Member], object]) -> None:
        """Like :meth:`call_member`, waiting while the send queue is full (as :meth:`send` does)."""
        while True:
            try:
                self.call_member(action)
                break
            except QueueFull:
                self._space = trio.Event() if self._space.is_set() else self._space
                await self._space.wait()
        await trio.lowlevel.checkpoint()

    def start_soon(self, fn: Callable[..., Awaitable[object]], *args: object) -> None:
        """Run ``fn(*args)`` as a task of this channel (it is cancelled when the channel closes)."""
        if self._nursery is not None and not self._closed:
            self._nursery.start_soon(fn, *args)

    @property
    def quorum_config(self) -> QuorumConfig:
        """The QUORUM layer's settings in force (member names turned into node ids)."""
        return self._quorum_config or QuorumConfig()

    @property
    def ring_config(self) -> RingConfig:
        """The TOTEM layer's settings in force (timers such as ``token_timeout``)."""
        return self._ring_config

    @property
    def join_timeout(self) -> float:
        """How long joining (the group, or a space) may take before it is given up (see
        :attr:`RingConfig.join_timeout <groupcomm.core.ring.RingConfig.join_timeout>`)."""
        return self._ring_config.join_timeout

    @property
    def max_pending_events(self) -> int:
        """Undelivered events (per stream) past which this member leaves the group (slow consumer)."""
        return self._max_pending

    @property
    def max_pending_bytes(self) -> int:
        """Undelivered payload bytes (per stream) past which this member leaves the group (slow consumer)."""
        return self._max_pending_bytes

    @property
    def overflowed(self) -> bool:
        """True once this member left the group because a consumer fell too far behind."""
        return self._overflow

    @property
    def overflow_reason(self) -> str:
        """Which limit a consumer passed (empty unless :attr:`overflowed`)."""
        return self._overflow_reason

    def leave_on_overflow(self, reason: str = "a consumer fell too far behind") -> None:
        """A consumer passed :attr:`max_pending_events` or :attr:`max_pending_bytes`: leave so the others go on."""
        if not self._overflow:
            self._overflow = True
            self._overflow_reason = reason
            self._leave()

    @asynccontextmanager
    async def joined_group(self, timeout: float) -> AsyncIterator[None]:
        """``async with ch.joined_group(timeout):`` for a channel started with ``nursery.start(ch.run)``:
        wait for the first view (trio.TooSlowError after ``timeout``); on the way out,
        let what was sent be ordered, then leave gracefully, whatever ended the block."""
        try:
            with trio.fail_after(timeout):
                await self._joined.wait()
            yield
            await self._finish_sends()
        finally:
            self._leave()

    async def _finish_sends(self) -> None:
        """Before a graceful leave: let the ring order what we already sent (bounded by the token timeout)."""
        with trio.move_on_after(2 * self._ring_config.token_timeout):
            while not self._closed and self._member is not None and self._member.pending:
                await trio.sleep(0.001)

    # -- driver ----------------------------------------------------------------

    def _require_member(self) -> Member:
        if self._closed or self._member is None:
            raise ChannelClosed(f"channel for cluster {self.cluster!r} is closed")
        return self._member

    def _now(self) -> int:
        if self._pump is not None:
            return now_us()                       # the ring's clock is the pump thread's
        return int(self._clock.current_time() * _US)

    async def run(self, *, leave_on_exit: bool = False, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Open sockets, start the member and serve until cancelled (``nursery.start`` protocol).

        ``leave_on_exit``: when cancelled, leave the group gracefully (what
        :func:`open_channel` asks for); otherwise the member just goes silent,
        as if its process died, and the others exclude it by timeout.
        """
        self._clock = trio.lowlevel.current_clock()
        cfg = self._udp_config
        unicast_only = isinstance(cfg, UdpuConfig)
        sockets = open_unicast(cfg) if unicast_only else open_sockets(cfg)
        self._sockets = sockets
        if unicast_only:
            self._targets = {parse_host(h) for h in cfg.hosts} - {sockets.address[:2]}
            self._fixed_targets = frozenset(self._targets)
        node_id = self._node_id or node_id_for(self.cluster, self._name or repr(sockets.address))
        try:
            # A new incarnation must never reuse a ring id: its ring seqs start above every
            # one reserved in its state directory, and are reserved there before use.
            self._state = state = open_member_state(self._state_root, self.cluster,
                                                    self._state_name(node_id, cfg), clock=time.time)
            floor = state.floor
            ring_config, unicast_config = self._ring_config, self._unicast_config
            self._seal = self._open_seal(node_id, state)
            if self._seal is not None:             # the seal's bytes come out of every datagram's mtu
                ring_config = dataclasses.replace(ring_config, mtu=ring_config.mtu - SEAL_OVERHEAD)
                unicast_config = unicast_config or UnicastConfig()
                unicast_config = dataclasses.replace(unicast_config, mtu=unicast_config.mtu - SEAL_OVERHEAD)
            self._member = Member(node_id, ring_config, fd=self._fd_config, frag=self._frag_config,
                                 unicast=unicast_config, quorum=self._quorum_config,
                                 spaces=self._spaces_config, ring_seq_floor=floor, epoch=floor)
            self._member.spaces.quorum.use(state.quorum, clock=self._now)
            self._member.multicast.join_later_from = _JOIN_OFF_LOOP
            if resolve_pump(cfg.pump) == "c":
                self._start_pump(sockets)
            self._member.ring = state.lease(self._member.ring)
            self._member.start(self._now())
            self._probe_mark = (trio.current_time(), 0)
            self._flush()
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                if self._pump is not None:
                    nursery.start_soon(self._receive_loop, self._pump.notify_fd)
                else:
                    nursery.start_soon(self._receive_loop, sockets.unicast)
                    if sockets.multicast is not None:
                        nursery.start_soon(self._receive_loop, sockets.multicast)
                if unicast_only and cfg.discovery_dir:
                    nursery.start_soon(self._discovery_loop, cfg, node_id)
                if self._seal is not None:
                    nursery.start_soon(self._key_loop)
                nursery.start_soon(self._timer_loop)
                task_status.started(self)
        finally:
            if leave_on_exit:
                self._leave()                     # even when cancelled from outside the block
            self._closed = True
            self._events_send.close()
            self._services.close()
            if self._state is not None and self._member is not None:
                self._member.ring = self._state.unlease(self._member.ring)
            if self._pump is not None:
                trio.lowlevel.notify_closing(self._pump.notify_fd)
                detach(self._pump)                # joins the thread while the sockets are still open
            sockets.close()
            if self._state is not None:
                self._save_seal_peers()
                self._state.close()

    def _open_seal(self, node_id: int, state: MemberState) -> Seal | None:
        """The cluster key's seal for this incarnation (None: no key, with a warning)."""
        crypto = self._crypto_config
        if not crypto.key_file:
            _log.warning("cluster %r runs without a key: anyone who can send to its addresses can read, join "
                         "and disturb it (set key_file in the CRYPTO layer; see docs/security.rst)", self.cluster)
            return None
        keys = self._read_keys()
        seal = Seal(self._ring_config.cluster_id, node_id, state.incarnation, keys,
                    auth_only=crypto.mode == "auth-only", max_peers=crypto.max_peers,
                    derive_budget=crypto.derive_budget,
                    nodelist=tuple(n if type(n) is int else node_id_for(self.cluster, n) for n in crypto.nodelist))
        seal.remember(state.peer_incarnations())
        return seal

    def _read_keys(self) -> KeyFile:
        path = self._crypto_config.key_file
        try:
            st = os.stat(path)
        except OSError as exc:
            raise ConfigError(f"CRYPTO: key file {path}: {exc.strerror}") from None
        if st.st_mode & 0o077:
            _log.warning("key file %s can be read by other users (mode %o): chmod 600 it", path, st.st_mode & 0o777)
        keys = read_key_file(path)
        self._key_stamp = (st.st_mtime_ns, st.st_size)
        return keys

    async def _key_loop(self) -> None:
        """Take up a changed key file (a rotation) and keep what the seal learnt about senders."""
        seal, path = self._seal, self._crypto_config.key_file
        assert seal is not None
        while True:
            await trio.sleep(self._crypto_config.reload_interval)
            self._save_seal_peers()
            try:
                st = os.stat(path)
                if (st.st_mtime_ns, st.st_size) == self._key_stamp:
                    continue
                seal.use_keys(self._read_keys())
                _log.info("key file %s read again: keys %s, sending with %s", path, seal.key_ids,
                          read_key_file(path).send)
            except ConfigError as exc:            # a half-edited or broken file: keep the keys we have
                _log.error("%s; keeping keys %s", exc, seal.key_ids)

    def _save_seal_peers(self) -> None:
        seal, state = self._seal, self._state
        if seal is None or state is None:
            return
        learnt = seal.stats()["new_incarnations"]
        if learnt != self._seal_peers_saved:
            state.save_peer_incarnations(seal.incarnations())
            self._seal_peers_saved = learnt

    def _state_name(self, node_id: int, cfg: UdpConfig | UdpuConfig) -> str | None:
        """The key of this member's state directory; None for an identity that dies with the
        process (no name, no node id, an address the OS picked: nothing to keep)."""
        if self._name:
            return self._name
        return f"node-{node_id}" if self._node_id or cfg.port else None

    def _start_pump(self, sockets: UdpSockets) -> None:
        """Hand the sockets and the ring's hot path to the C pump's thread."""
        assert self._member is not None
        pump = attach(self._member.multicast, sockets, max_backlog=self._max_pending, seal=self._seal)
        self._pump = pump
        self._pump_offset = trio.current_time() - now_us() / _US
        if sockets.group is None:
            self._targets = TargetSet(pump, self._targets)
        pump.start()

    async def _receive_loop(self, sock) -> None:
        """Serve one socket, or with the C pump its wake-up eventfd."""
        drain = self._drain if self._pump is None else self._drain_pump
        while True:
            await trio.lowlevel.wait_readable(sock)
            if self._member is None or self._closed:
                if self._pump is not None:
                    self._pump.stop()             # a closed channel goes silent, as without the pump
                return
            drain(sock)

    async def _discovery_loop(self, cfg: UdpuConfig, node_id: int) -> None:
        """Register our address in the shared directory and learn the others'."""
        assert self._sockets is not None
        folder = Path(cfg.discovery_dir) / self.cluster
        folder.mkdir(parents=True, exist_ok=True)
        host, port = self._sockets.address[:2]
        mine = folder / f"{node_id}.addr"
        tmp = folder / f".{node_id}.tmp"
        tmp.write_text(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
        tmp.replace(mine)                          # atomic: readers never see half a file
        try:
            while True:
                for entry in folder.glob("*.addr"):
                    try:
                        addr = parse_host(entry.read_text().strip())
                    except (OSError, ConfigError):
                        continue                   # being written, or garbage: ignore
                    if addr != self._sockets.address[:2]:
                        self._targets.add(addr)
                await trio.sleep(cfg.rescan)
        finally:
            mine.unlink(missing_ok=True)

    def _broadcast(self, packet: bytes) -> None:
        sockets = self._sockets
        assert sockets is not None
        if self._pump is not None:
            self._pump.send_all(packet)
        elif sockets.group is not None:
            self._sendto(sockets.unicast, packet, sockets.group)
        else:
            if self._seal is not None:
                packet = self._seal.seal_view(packet)  # one seal for every copy
            for addr in self._targets:
                self._send_sealed(sockets.unicast, packet, addr)

    def _drain(self, sock) -> None:
        """Feed the readable datagrams (up to ``_DRAIN_BYTES``; the rest at the next wake-up, after
        the other tasks had their turn) to the member, messages before tokens, then flush once."""
        member = self._member
        assert member is not None
        node_id, sockets, seal = member.node_id, self._sockets, self._seal
        assert sockets is not None
        tokens = []
        budget = _DRAIN_BYTES
        while budget > 0:
            try:
                data, addr = sock.recvfrom(_MAX_DATAGRAM)
            except OSError:                       # EAGAIN: drained (or the socket closed)
                break
            budget -= len(data)
            newest = True                         # without a key the layers' checks decide alone
            if seal is not None:
                data = seal.open(data)
                if type(data) is int:
                    continue                      # forged, replayed, unsealed...: counted by the seal
                newest = seal.newest
            kind = classify(data, len(data), node_id)     # the pump's rules: one function for both drivers
            if kind == DGRAM_PROBE:
                self._answer_probe(data, addr)
                continue
            if kind == DGRAM_SELF:
                continue                          # our own multicast looped back
            if kind == DGRAM_TOKEN:
                tokens.append((data, addr, newest))   # act on the token after the messages it follows
                continue
            if member.receive(self._now(), data) and newest:
                self._learn(data, addr)
        for data, addr, newest in tokens:
            if member.receive(self._now(), data) and newest:
                self._learn(data, addr)
        self._flush()

    def _learn(self, data: bytes, addr) -> None:
        """Where a peer is: learnt only from a datagram its layer accepted (and, with a key,
        that authenticated and is the newest yet from its sender), so neither a forged source
        address nor a replay from elsewhere can redirect a member or add targets."""
        node = int.from_bytes(data[SENDER], "big")
        self._peer_heard[node] = self._clock.current_time()
        if self._peers.get(node) != addr:
            self._peers[node] = addr
            if self._sockets is not None and self._sockets.group is None:
                self._targets.add(addr[:2])       # (host, port): IPv6 adds flow info and scope

    def _drain_pump(self, notify_fd: int) -> None:
        """The pump woke us: answer probes, feed the other layers' packets, then flush its deliveries."""
        pump, member = self._pump, self._member
        assert pump is not None and member is not None
        pump.clear_notify()                       # before taking: a later signal wakes us again
        packets = pump.take_packets()
        if packets:
            now = self._now()
            for data, addr, newest in packets:
                if data[:2] == PROBE_MAGIC:               # else DGRAM_MEMBER (see classify)
                    self._answer_probe(data, addr)
                elif member.receive(now, data) and newest:     # the other layers'; ring packets stay in C
                    pump.learn(int.from_bytes(data[SENDER], "big"), addr)
        self._flush()

    async def _timer_loop(self) -> None:
        while True:
            with trio.CancelScope() as scope:
                self._timer_scope = scope
                scope.deadline = self._armed_deadline = self._deadline()
                await trio.sleep_forever()
            member = self._member
            if member is None or self._closed:
                return
            if self._pump is not None and member.fd is not None:
                self._pump.sync_heard(member.fd)   # ring packets the pump saw are signs of life
            member.tick(self._now())
            self._flush()

    def _answer_probe(self, data: bytes, addr) -> None:
        """`groupcomm probe` asks every member for its view and counters."""
        member = self._member
        if member is None or self._sockets is None:
            return
        version = datagram_version(data)
        if version is not None and version != PROTOCOL_VERSION and self._seal is None:
            member.wrong_version("probe", addr[:2], version)      # counted, logged once per address
            return
        if not is_probe_request(data, self._ring_config.cluster_id):
            return
        now = trio.current_time()
        stats = self.stats()
        t0, tokens0 = self._probe_mark
        self._probe_mark = (now, stats["tokens_received"])
        report = {
            "name": self.name,
            "address": self.address,
            "state": member.ring.state.name,
            "view": list(self._view.members) if self._view else [],
            "ring": str(self._view.ring_id) if self._view else "",
            "rotations_per_s": round((stats["tokens_received"] - tokens0) / max(now - t0, 1e-6), 1),
            "debug": member.ring.debug(),
            "stats": stats,
        }
        if self._seal is not None:                # sealed request: the answer is sealed for the key's holders
            response = probe_response(self._ring_config.cluster_id, report)
        else:                                     # never more bytes than the request: no amplification
            response = probe_response(self._ring_config.cluster_id, report, limit=len(data))
        self._sendto(self._sockets.unicast, response, addr)

    def _deadline(self) -> float:
        """The member's next deadline in trio time (with the pump: only the failure detector's)."""
        d = self._member.next_deadline() if self._member is not None else None
        if d is None:
            return math.inf
        return d / _US + self._pump_offset

    def _outputs_ready(self) -> None:
        """The Member has new outputs: act on them now, or, when an output's handler called
        the Member (:meth:`call_member`, a leave on overflow), once the flush under way is
        through the current ones."""
        if self._flushing:
            self._flush_again = True
        else:
            self._flush()

    def _flush(self) -> None:
        """Act on everything the Member has to hand out, in order, then re-arm the timer.

        Never re-entered: output handlers that call the Member go through
        :meth:`_outputs_ready`, and the loop below takes what they produced
        after the current outputs (never in the middle of them), so nothing
        overtakes.  User callbacks never run here (:mod:`groupcomm.io.space`).
        """
        member = self._member
        if member is None or self._sockets is None:
            return
        assert not self._flushing, "Channel._flush re-entered"
        self._flushing = True
        self._batch = batch = []
        self._batch_bytes = 0
        self._batch_large = 0
        try:
            while True:
                self._flush_again = False
                self._router.route(member.take(self._now()))
                if not self._flush_again:
                    break
        finally:
            self._flushing = False
        if batch and not self._closed:
            self._pending_events += len(batch)
            self._pending_bytes += self._batch_bytes
            self._events_send.send_nowait((batch, self._batch_bytes, self._batch_large))
            if self._batch_large:
                self._large_pending.append(self._batch_large)
        deadline = self._deadline()
        if self._timer_scope is not None and deadline != self._armed_deadline:
            self._armed_deadline = deadline
            self._timer_scope.deadline = deadline
        if not self._space.is_set() and member.can_send:
            self._space.set()
        if self._pending_events > self._max_pending:
            self.leave_on_overflow(f"more than {self._max_pending} undelivered events (max_pending_events)")
        elif self._pending_bytes - max(self._large_pending, default=0) > self._max_pending_bytes:
            # One message of up to max_message always fits: a consumer that keeps up is never
            # "slow" because a legal large message and a few small ones arrived together.
            self.leave_on_overflow(
                f"more than {self._max_pending_bytes} bytes of undelivered messages (max_pending_bytes)")

    # -- the Member's outputs this driver acts on (see groupcomm.layers.router) ----------

    def _send_to_all(self, out: SendToAll) -> None:
        self._broadcast(out.packet)

    def _send_to(self, out: SendTo) -> None:
        if self._pump is not None:
            self._pump.send_to(out.node, out.packet)
        elif (addr := self._peers.get(out.node)) is not None:
            self._sendto(self._sockets.unicast, out.packet, addr, to=out.node)

    def _deliver_run(self, run: list) -> None:
        if len(run) == 1 and type(run[0].payload) is Pieces:     # a large message, joined later
            self._batch_large = max(self._batch_large, run[0].payload.size)
        self._batch.extend(run)
        self._batch_bytes += sum(map(len, map(_PAYLOAD, run)))

    def _deliver_view(self, view: View) -> None:
        if not view.transitional:
            self._view = view
            self._joined.set()
            if self._pump is not None:
                self._forget_pumped_strangers(view)
            else:
                self._forget_strangers(view, everyone=len(self._peers) > self._peer_table_max)
        self._batch.append(view)

    def _deliver_event(self, event: Merge | Direct) -> None:
        self._batch.append(event)
        if type(event) is Direct:
            self._batch_bytes += len(event.payload)

    def _forget_strangers(self, view: View, *, everyone: bool) -> None:
        """Bound the tables of addresses learned from datagrams: at each view, forget the senders
        outside it not heard for PEER_EXPIRY seconds, or all of them when the table is over its
        size (a sender outside the view is learned again from its next datagram)."""
        members, now = set(view.members), trio.current_time()
        heard = self._peer_heard
        keep = [node for node in self._peers
                if node in members or (not everyone and now - heard.get(node, now) < PEER_EXPIRY)]
        if len(keep) == len(self._peers):
            return
        self._peers = {node: self._peers[node] for node in keep}
        self._peer_heard = {node: heard[node] for node in keep if node in heard}
        if self._pump is None and self._sockets is not None and self._sockets.group is None:
            self._targets = self._fixed_targets | {addr[:2] for addr in self._peers.values()}

    def _forget_pumped_strangers(self, view: View) -> None:
        """:meth:`_forget_strangers` for the pump's own address book (same rule, same expiry)."""
        pump = self._pump
        if pump.known_peers > self._peer_table_max:
            pump.forget(view.members, _NEVER_HEARD)
        else:
            pump.forget(view.members, max(0, now_us() - int(PEER_EXPIRY * _US)))

    def _sendto(self, sock, packet: bytes, addr, *, to: int = 0) -> None:
        """Send one datagram; with a key sealed for member ``to`` (0: for every member)."""
        if self._seal is not None:
            packet = self._seal.seal_view(packet, to)
        self._send_sealed(sock, packet, addr)

    def _send_sealed(self, sock, packet: bytes, addr) -> None:
        try:
            sock.sendto(packet, addr)
        except OSError:                           # EAGAIN or unreachable: UDP, the ring retransmits
            self.dropped_sends += 1

    def _leave(self) -> None:
        if self._closed or self._member is None:
            return
        try:
            self._member.leave(self._now())
        except NotOperational:
            pass
        self._outputs_ready()
        self._closed = True
        self._events_send.close()
        self._services.close()                  # spaces' events() end too, requests return
        if self._timer_scope is not None:
            self._timer_scope.cancel()


_FROM_STACK = object()


@asynccontextmanager
async def open_channel(
    stack: str = "udp",
    *,
    cluster: str,
    name: str | None = None,
    node_id: int | None = None,
    overrides: dict | None = None,
    ring: RingConfig | None = None,
    udp: UdpConfig | UdpuConfig | None = None,
    fd=_FROM_STACK,
    join_timeout: float | None = None,
    max_pending_events: int | None = None,
    max_pending_bytes: int | None = None,
    quorum: QuorumConfig | None = None,
    state_dir: str | os.PathLike | None = None,
    key_file: str | os.PathLike | None = None,
) -> AsyncIterator[Channel]:
    """Join ``cluster`` and yield a :class:`Channel` once the first view is installed.

    ``stack`` names a shipped stack file (``"udp"``, ``"loopback"``) or a path
    to one; ``overrides`` (``{"TOTEM": {"token_timeout": "300ms"}}``) change its
    settings, and ``ring`` / ``udp`` / ``fd`` objects replace a layer's config
    outright (``fd=None`` turns failure detection off).
    ``max_pending_events`` / ``max_pending_bytes`` replace the stack's
    ``CHANNEL`` settings (:class:`ChannelConfig`: 100 000 events, 64 MiB).
    ``state_dir`` replaces the ``QUORUM`` layer's: the root of the members' durable
    state, each in ``<state_dir>/<cluster>/<name>`` (:mod:`groupcomm.io.state_dir`).
    ``key_file`` replaces the ``CRYPTO`` layer's: the cluster key every datagram is
    sealed with (``groupcomm keygen PATH``; docs/security.rst).

    Leaving the block waits (up to twice the token timeout) until the messages
    already sent are ordered, then leaves the group gracefully.  Errors from the channel's
    tasks propagate as trio propagates them (an ExceptionGroup when several fail).
    """
    settings = build_stack(load_stack(stack, overrides=overrides))
    ring = ring or settings.ring
    udp = udp or settings.transport
    fd = settings.fd if fd is _FROM_STACK else fd
    limits = settings.channel or ChannelConfig()
    crypto = settings.crypto or CryptoConfig()
    if key_file is not None:
        crypto = dataclasses.replace(crypto, key_file=os.fspath(key_file))
    ch = Channel(
        cluster=cluster,
        name=name,
        node_id=node_id,
        ring=ring,
        udp=udp,
        max_pending_events=limits.max_pending_events if max_pending_events is None else max_pending_events,
        max_pending_bytes=limits.max_pending_bytes if max_pending_bytes is None else max_pending_bytes,
        fd=fd,
        frag=settings.frag,
        unicast=settings.unicast,
        quorum=quorum or settings.quorum,
        spaces=settings.spaces,
        state_dir=state_dir if state_dir is not None else
        (quorum.state_dir if quorum else "") or (settings.quorum.state_dir if settings.quorum else ""),
        crypto=crypto,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(functools.partial(ch.run, leave_on_exit=True))
        async with ch.joined_group(join_timeout if join_timeout is not None else ring.join_timeout):
            yield ch
        nursery.cancel_scope.cancel()
