"""Totally ordered multicast of messages of any size, sans-IO: the Totem ring,
fragmentation and failure detection (TOTEM + FRAG + FD), driven by packets,
sends and time.  :class:`~groupcomm.layers.member.Member` composes it with the
layers above; on its own it is what the EVS schedules exercise.

The trio :class:`~groupcomm.io.channel.Channel` drives it (inside a Member) over UDP and
:class:`~groupcomm.testing.SimCluster` drives the same class over its
simulated network, so tests exercise the production layers.

Outputs (:meth:`Multicast.take`), in order: :class:`~groupcomm.core.ring.SendToAll`,
:class:`~groupcomm.core.ring.SendTo` (to a member id), lists of
:class:`~groupcomm.events.Message` (runs of application messages),
:class:`~groupcomm.core.ring.LayerDelivery` (messages of the layers above) and
:class:`~groupcomm.events.View`.
"""

from __future__ import annotations

from collections import deque
from operator import countOf, itemgetter

from groupcomm.errors import NotOperational, QueueFull
from groupcomm.events import Configuration, Message, View
from groupcomm.layers.fd import MAGIC as FD_MAGIC
from groupcomm.layers.fd import HEARTBEAT, PING, PONG, FailureDetector, FdConfig
from groupcomm.layers.frag import FRAGMENT, FragConfig, Fragmenter, Fragments
from groupcomm.layers.histogram import Histogram
from groupcomm.core.ring import FROM_A_LIVE_PEER, LayerDelivery, Ring, RingConfig, RingState, SendTo, SendToAll
from groupcomm.layers.wire import datagram_sender, is_token

__all__ = ["LATENCY_SAMPLE_EVERY", "Multicast"]

LATENCY_SAMPLE_EVERY = 64
"""One of this many of a member's messages has its self-delivery latency measured."""
_MAX_SAMPLES = 64
"""Sampled messages awaiting their own delivery, at most (more are not sampled)."""
_sender = itemgetter(0)


class Multicast:
    """TOTEM + FRAG (+ FD) for one member; time is integer microseconds."""

    def __init__(
        self,
        node_id: int,
        ring: RingConfig,
        *,
        fd: FdConfig | None = None,
        frag: FragConfig | None = None,
        ring_seq_floor: int = 0,
    ) -> None:
        self.node_id = node_id
        self.ring = Ring(node_id, ring, ring_seq_floor=ring_seq_floor)
        frag = frag or FragConfig()
        self.frag = Fragmenter(node_id, self.ring.max_payload, frag.max_message,
                               partial_messages=frag.partial_messages, partial_bytes=frag.partial_bytes)
        self._ring_max = min(self.ring.max_payload, self.frag.max_message)
        self._fragments_ahead = frag.fragments_ahead
        self.fd = FailureDetector(node_id, ring.cluster_id, fd) if fd is not None else None
        self._fd_deadline = 0
        self._queue_max = ring.send_queue_max
        self._queue_bytes = ring.send_queue_bytes
        self._cut: Fragments | None = None                     # the fragmented message in flight
        self._next_fragment = 0                                # its first fragment not yet in the ring
        self._inflight: int | None = None                      # msg id of our fragmented message
        self._inflight_bytes = 0
        self._waiting: deque[tuple[bytes, bool, int]] = deque()    # messages queued behind it
        self._waiting_bytes = 0
        # Sizes of our messages in the ring's own send queue, oldest first.  The ring
        # counts them; it sends them in order, so the newest ``ring.pending`` of these
        # are still there (fragments count 0: the message in flight counts whole).
        self._ring_sizes: deque[int] = deque()
        self._ring_bytes = 0
        self._out: list = []
        # Self-delivery latency: our ring messages are numbered as submitted and
        # delivered back to us in that order (a member delivers its own messages,
        # unless it crashes); a sampled one is matched by its number.
        self.self_delivery_latency = Histogram()
        """Seconds from a sampled message's submission to the ring to its delivery here
        (one message of :data:`LATENCY_SAMPLE_EVERY`; a message waiting behind a fragmented one, or a
        fragment, counts from when it enters the ring)."""
        self._submitted = 0                                    # our ring messages so far
        self._own_delivered = 0                                # ... delivered back to us
        self._next_sample = LATENCY_SAMPLE_EVERY               # number of the next one sampled
        self._samples: deque[tuple[int, int]] = deque()        # (number, submit time), oldest first
        self.view: View | None = None
        self.join_later_from: int | None = None
        """Application messages reassembled from this many bytes or more come as a run of one
        :class:`~groupcomm.events.Message` whose payload is :class:`~groupcomm.layers.frag.Pieces`,
        for the driver to join off its loop; None (the default): every payload is ``bytes``."""

    # -- inputs -----------------------------------------------------------------

    def start(self, now: int) -> None:
        self.ring.start(now)

    def receive(self, now: int, data: bytes) -> int:
        """A packet from the network (ring or failure-detector packet).

        Returns the ring's verdict (0: used; a negative drop reason, see
        :meth:`Ring.receive <groupcomm.core.ring.Ring.receive>`); 0 for FD packets.
        """
        if data[:2] == FD_MAGIC:
            fd = self.fd
            if fd is not None:
                reply_to = fd.receive(data, now)
                if reply_to is not None:
                    self._out.append(SendTo(reply_to, fd.packet(PONG)))
            return 0
        rc = self.ring.receive(now, data)
        if self.fd is not None and rc in FROM_A_LIVE_PEER:      # garbage is no sign of life
            self.fd.heard(datagram_sender(data), now)
            if rc == 0 and is_token(data) and self.ring.state is RingState.OPERATIONAL:
                self.fd.token(now)
        return rc

    def send(self, now: int, payload: bytes, safe: bool = False, kind: int = 0) -> bool:
        """Queue ``payload`` for total-order delivery; fragments it if it is large.

        ``kind`` 0 is an application message (delivered as
        :class:`~groupcomm.events.Message`); layers above use kinds from 2 up
        (delivered as :class:`~groupcomm.core.ring.LayerDelivery`).

        Raises :class:`~groupcomm.errors.QueueFull` when the member's queue is
        full (``send_queue_max`` messages or ``send_queue_bytes`` bytes; a
        message is always taken when nothing is queued) and PayloadTooLarge
        over FRAG's limit; nothing is queued then.  Messages behind a
        fragmented one wait until it is delivered, so a message a view change
        cut is re-sent before them (per-sender FIFO).  Returns :attr:`has_output`.
        """
        if kind == FRAGMENT:
            raise ValueError(f"kind {FRAGMENT} is FRAG's own")
        size = len(payload)
        if self._inflight is None and not self._waiting and size <= self._ring_max:
            # The common case, without a call into FRAG.
            if self._ring_bytes + size > self._queue_bytes:
                self._check_room(size)
            has_output = self.ring.submit(now, payload, safe=safe, kind=kind)     # may raise QueueFull
            self._queued_in_ring(size, now)
            return has_output or bool(self._out)
        self.frag.check(size)
        self._check_room(size)
        payload = bytes(payload)                              # a snapshot: it waits, or is cut lazily
        if self._inflight is None and not self._waiting:
            fragments = self.frag.split(payload, safe, kind)
            if fragments is None:
                self.ring.submit(now, payload, safe=safe, kind=kind)
                self._queued_in_ring(size, now)
                return self.has_output
            self._start(fragments)
        else:
            if len(self._waiting) >= self._queue_max:
                raise QueueFull(f"member {self.node_id}: send queue is full; wait for deliveries and retry")
            self._waiting.append((payload, safe, kind))
            self._waiting_bytes += size
        self._feed(now)
        return self.has_output

    def send_many(self, now: int, payloads: list[bytes], safe: bool = False, kind: int = 0) -> int:
        """:meth:`send` for each of ``payloads`` in order while there is room; returns how many
        were queued (fewer than all: the queue is full -- what :meth:`send` raises QueueFull for).

        Messages that fit a datagram, with no fragmented message in the way,
        go to the ring in one call; anything else goes through :meth:`send`.
        A payload :meth:`send` refuses for another reason raises, after the
        ones before it were queued.
        """
        taken = 0
        if self._inflight is None and not self._waiting and kind != FRAGMENT:
            sizes = list(map(len, payloads))
            room, fit = self._queue_bytes - self._ring_bytes, 0
            for size in sizes:                    # the byte limit, as send checks it (the first always fits)
                if size > self._ring_max or (size > room and (fit or self._ring_bytes)):
                    break
                room -= size
                fit += 1
            if fit:
                batch = payloads if fit == len(payloads) else payloads[:fit]
                taken = self.ring.submit_many(now, batch, safe=safe, kind=kind)
                for size in sizes[:taken]:
                    self._queued_in_ring(size, now)
                if taken < fit:
                    return taken                  # the ring's queue is full
        for payload in payloads[taken:] if taken else payloads:
            try:
                self.send(now, payload, safe, kind)
            except QueueFull:
                break
            taken += 1
        return taken

    def _check_room(self, size: int) -> None:
        queued = self.queued_bytes
        if queued and queued + size > self._queue_bytes:
            raise QueueFull(
                f"member {self.node_id}: send queue holds {queued} bytes and this message has {size}, over "
                f"send_queue_bytes={self._queue_bytes}; wait for deliveries and retry"
            )

    def _queued_in_ring(self, size: int, now: int) -> None:
        self._ring_sizes.append(size)
        self._ring_bytes += size
        if len(self._ring_sizes) > self._queue_max:
            self._trim()
        self._submitted += 1
        if self._submitted >= self._next_sample:
            self._next_sample += LATENCY_SAMPLE_EVERY
            if len(self._samples) < _MAX_SAMPLES:
                self._samples.append((self._submitted, now))

    def _delivered_own(self, now: int, count: int) -> None:
        """``count`` more of our ring messages were delivered here at ``now``: time the sampled ones."""
        self._own_delivered += count
        samples, delivered = self._samples, self._own_delivered
        while samples and samples[0][0] <= delivered:
            self.self_delivery_latency.observe((now - samples.popleft()[1]) / 1e6)

    def _trim(self) -> None:
        """Forget the sizes of messages the ring has sent."""
        sizes, pending = self._ring_sizes, self.ring.pending
        while len(sizes) > pending:
            self._ring_bytes -= sizes.popleft()

    def _start(self, fragments: Fragments) -> None:
        self._inflight = fragments.msg_id
        self._inflight_bytes = fragments.size
        self._cut = fragments
        self._next_fragment = 0

    def _feed(self, now: int) -> None:
        """Move fragments, then waiting messages, into the ring while it has room."""
        ring = self.ring
        while True:
            cut = self._cut
            if cut is not None:
                count = len(cut)
                room = self._fragments_ahead - ring.pending     # pace: a slice per token visit or so
                while self._next_fragment < count:
                    if room <= 0:
                        return
                    room -= 1
                    try:
                        ring.submit(now, cut[self._next_fragment], safe=cut.safe, kind=FRAGMENT)
                    except (QueueFull, NotOperational):     # full, or left: the rest waits (or dies with it)
                        return
                    self._queued_in_ring(0, now)
                    self._next_fragment += 1
            if self._inflight is not None and self.frag.in_flight(self._inflight):
                return                                     # wait until it is delivered (or cut)
            self._inflight, self._inflight_bytes, self._cut = None, 0, None
            if not self._waiting:
                return
            payload, safe, kind = self._waiting[0]
            split = self.frag.split(payload, safe, kind)
            if split is None:
                try:
                    ring.submit(now, payload, safe=safe, kind=kind)
                except (QueueFull, NotOperational):
                    return
                self._queued_in_ring(len(payload), now)
            else:
                self._start(split)
            self._waiting.popleft()
            self._waiting_bytes -= len(payload)

    def suspect(self, now: int, node: int) -> bool:
        return self.ring.suspect(now, node)

    def leave(self, now: int) -> None:
        self.ring.leave(now)

    def tick(self, now: int) -> None:
        self.ring.tick(now)
        fd = self.fd
        if fd is not None and now >= self._fd_deadline:
            beat, ping, dead = fd.tick(now)
            if beat:
                self._out.append(SendToAll(fd.packet(HEARTBEAT)))
            for node in ping:
                self._out.append(SendTo(node, fd.packet(PING)))
            for node in dead:
                self.ring.suspect(now, node)
            self._fd_deadline = fd.next_deadline()
        self._feed(now)

    # -- outputs ------------------------------------------------------------------

    @property
    def can_send(self) -> bool:
        """False while the member's queues are full (wait before sending more)."""
        return (len(self._waiting) < self._queue_max and self.ring.pending < self._queue_max
                and self.queued_bytes < self._queue_bytes)

    @property
    def pending(self) -> int:
        """Messages queued here or in the ring, not yet ordered."""
        remaining = len(self._cut) - self._next_fragment if self._cut is not None else 0
        return self.ring.pending + len(self._waiting) + remaining

    @property
    def queued_bytes(self) -> int:
        """Bytes of our messages not yet ordered: in the ring's send queue, waiting here, and
        the fragmented message in flight (whole, until it is delivered)."""
        self._trim()
        return self._ring_bytes + self._waiting_bytes + self._inflight_bytes

    @property
    def has_output(self) -> bool:
        return bool(self._out) or self.ring.has_output

    def next_deadline(self) -> int | None:
        d = self.ring.next_deadline()
        if self.fd is not None:
            d = self._fd_deadline if d is None else min(d, self._fd_deadline)
        return d

    def take(self, now: int) -> list:
        """Everything to act on, in order.

        Runs of consecutive application messages come as one ``list`` of
        :class:`~groupcomm.events.Message` (the hot path touches no message).
        """
        out, self._out = self._out, []
        items = self.ring.take(Message, runs=True)
        frag, fd = self.frag, self.fd
        # Our own deliveries are counted only while some of our messages are on
        # their way (a sender at full speed pays one C-speed scan per run).
        own = 0 if self._own_delivered < self._submitted else -1
        me = self.node_id
        for item in items:
            t = type(item)
            if t is list:
                out.append(item)
                if own >= 0:
                    own += countOf(map(_sender, item), me)
            elif t is LayerDelivery:
                if own >= 0 and item.sender == me:
                    own += 1
                if item.kind == FRAGMENT:
                    whole = frag.deliver_pieces(item.sender, item.payload, item.safe)
                    if whole is not None:
                        pieces, kind = whole
                        if kind == 0:
                            later = self.join_later_from is not None and pieces.size >= self.join_later_from
                            out.append([Message(item.sender, pieces if later else pieces.join(), item.safe)])
                        else:
                            out.append(LayerDelivery(item.sender, pieces.join(), item.safe, kind))
                else:
                    out.append(item)
            elif t is Configuration:
                view = View(item.members, item.ring_id, item.transitional)
                out.append(view)
                if not item.transitional:
                    self.view = view
                    frag.view()
                    resent = frag.take_resends()
                    if resent:                             # our cut message goes first again
                        self._inflight, self._inflight_bytes, self._cut = None, 0, None
                        self._waiting.extendleft(reversed(resent))
                        self._waiting_bytes += sum(len(payload) for payload, _, _ in resent)
                    if fd is not None:
                        fd.set_members(item.members, now)
                        self._fd_deadline = fd.next_deadline()
            else:
                out.append(item)
        if own > 0:
            self._delivered_own(now, own)
        if self._cut is not None or self._waiting:
            self._feed(now)
            if self.ring.has_output:
                out.extend(self.take(now))
        return out
