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

from groupcomm.errors import QueueFull
from groupcomm.events import Configuration, Message, View
from groupcomm.layers.fd import MAGIC as FD_MAGIC
from groupcomm.layers.fd import HEARTBEAT, PING, PONG, FailureDetector, FdConfig
from groupcomm.layers.frag import FRAGMENT, FragConfig, Fragmenter
from groupcomm.core.ring import FROM_A_LIVE_PEER, LayerDelivery, Ring, RingConfig, SendTo, SendToAll
from groupcomm.layers.wire import datagram_sender

__all__ = ["Multicast"]


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
        self.frag = Fragmenter(node_id, self.ring.max_payload, (frag or FragConfig()).max_message)
        self._ring_max = min(self.ring.max_payload, self.frag.max_message)
        self.fd = FailureDetector(node_id, ring.cluster_id, fd) if fd is not None else None
        self._fd_deadline = 0
        self._fragments: deque[tuple[bytes, bool]] = deque()    # of the message in flight, not yet in the ring
        self._inflight: int | None = None                      # msg id of our fragmented message
        self._waiting: deque[tuple[bytes, bool, int]] = deque()    # messages queued behind it
        self._out: list = []
        self.view: View | None = None

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
        return rc

    def send(self, now: int, payload: bytes, safe: bool = False, kind: int = 0) -> bool:
        """Queue ``payload`` for total-order delivery; fragments it if it is large.

        ``kind`` 0 is an application message (delivered as
        :class:`~groupcomm.events.Message`); layers above use kinds from 2 up
        (delivered as :class:`~groupcomm.core.ring.LayerDelivery`).

        Raises :class:`~groupcomm.errors.QueueFull` when the member's queue is
        full (nothing is queued then) and PayloadTooLarge over FRAG's limit.
        Messages behind a fragmented one wait until it is delivered, so a
        message a view change cut is re-sent before them (per-sender FIFO).
        Returns :attr:`has_output`.
        """
        if kind == FRAGMENT:
            raise ValueError(f"kind {FRAGMENT} is FRAG's own")
        if self._inflight is None and not self._waiting:
            if len(payload) <= self._ring_max:                 # the common case, without a call into FRAG
                return self.ring.submit(now, payload, safe=safe, kind=kind) or bool(self._out)
            fragments = self.frag.split(payload, safe, kind)
            if fragments is None:
                return self.ring.submit(now, payload, safe=safe, kind=kind) or bool(self._out)  # may raise QueueFull
            self._start(fragments, safe)
        else:
            if len(payload) > self.frag.max_message:
                self.frag.split(payload, safe)                 # raises PayloadTooLarge
            if len(self._waiting) >= self.ring.config.send_queue_max:
                raise QueueFull(f"member {self.node_id}: send queue is full; wait for deliveries and retry")
            self._waiting.append((bytes(payload), safe, kind))
        self._feed(now)
        return self.has_output

    def _start(self, fragments: list[bytes], safe: bool) -> None:
        self._inflight = self.frag.last_id
        self._fragments = deque((f, safe) for f in fragments)

    def _feed(self, now: int) -> None:
        """Move fragments, then waiting messages, into the ring while it has room."""
        ring = self.ring
        while True:
            fragments = self._fragments
            while fragments:
                packet, safe = fragments[0]
                try:
                    ring.submit(now, packet, safe=safe, kind=FRAGMENT)
                except QueueFull:
                    return
                fragments.popleft()
            if self._inflight is not None and self.frag.in_flight(self._inflight):
                return                                     # wait until it is delivered (or cut)
            self._inflight = None
            if not self._waiting:
                return
            payload, safe, kind = self._waiting[0]
            split = self.frag.split(payload, safe, kind)
            if split is None:
                try:
                    ring.submit(now, payload, safe=safe, kind=kind)
                except QueueFull:
                    return
                self._waiting.popleft()
            else:
                self._waiting.popleft()
                self._start(split, safe)

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
        return len(self._waiting) < self.ring.config.send_queue_max and self.ring.pending < self.ring.config.send_queue_max

    @property
    def pending(self) -> int:
        """Messages queued here or in the ring, not yet ordered."""
        return self.ring.pending + len(self._waiting) + len(self._fragments)

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
        for item in items:
            t = type(item)
            if t is list:
                out.append(item)
            elif t is LayerDelivery:
                if item.kind == FRAGMENT:
                    whole = frag.deliver(item.sender, item.payload, item.safe)
                    if whole is not None:
                        payload, kind = whole
                        out.append([Message(item.sender, payload, item.safe)] if kind == 0
                                   else LayerDelivery(item.sender, payload, item.safe, kind))
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
                        self._fragments.clear()
                        self._inflight = None
                        self._waiting.extendleft(reversed(resent))
                    if fd is not None:
                        fd.set_members(item.members, now)
                        self._fd_deadline = fd.next_deadline()
            else:
                out.append(item)
        if self._fragments or self._waiting:
            self._feed(now)
            if self.ring.has_output:
                out.extend(self.take(now))
        return out
