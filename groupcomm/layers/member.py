"""One member's protocol layers composed, sans-IO: multicast, unicast, spaces, request-reply, quorum.

:class:`Member` stacks the layers that sit on the ring (docs/architecture.rst):

    RPC + SPACES + QUORUM    (groupcomm.layers.rpc, groupcomm.layers.spaces, groupcomm.layers.quorum)
    FRAG + TOTEM + FD        (groupcomm.layers.multicast.Multicast)
    UNICAST                  (groupcomm.layers.unicast), beside the ring

It is fed packets, local calls and time (integer microseconds) and hands out
everything to act on with :meth:`Member.take`; the trio
:class:`~groupcomm.io.channel.Channel` and the simulator both drive it.

Outputs, in order: ``SendToAll`` / ``SendTo`` packets; lists of channel
:class:`~groupcomm.events.Message`; :class:`~groupcomm.events.View` (with
``primary`` set by the quorum rule); from :mod:`groupcomm.layers.spaces`:
``SpaceView``, ``SpaceMessage``, ``SpaceRequest`` (answer with
:meth:`reply`), ``StateRequest`` (answer with :meth:`provide_state`),
``StateInstalled``, ``Merge``; and :class:`~groupcomm.layers.rpc.RequestDone`.
"""

from __future__ import annotations

from collections import deque
from typing import NamedTuple

from groupcomm.errors import LocalProtocolError, MemberUnreachable, PayloadTooLarge, QueueFull
from groupcomm.events import Direct, View
from groupcomm.layers.fd import FdConfig
from groupcomm.layers.frag import FragConfig
from groupcomm.layers.quorum import Quorum, QuorumConfig
from groupcomm.core.ring import BAD_VERSION, FROM_A_LIVE_PEER, LayerDelivery, RingConfig, SendTo, SendToAll
from groupcomm.layers.rpc import LEFT, ONE_WAY, Mode, Reply, RequestDone, RpcTracker
from groupcomm.layers.spaces import (
    RingSend,
    SpaceLayer,
    SpaceRequest,
    SpacesConfig,
    SpaceView,
    StateRequest,
    UnicastSend,
)
from groupcomm.layers.multicast import Multicast
from groupcomm.layers.unicast import Unicast, UnicastConfig, UnicastFailed, UnicastMessage, UnicastSent
from groupcomm.layers.wire import (
    FD_MAGIC,
    KIND_SERVICES,
    UNICAST_MAGIC,
    DirectFrame,
    MalformedFrame,
    P2PRequestFrame,
    ReplyFrame,
    RequestFrame,
    VersionLog,
    check_space_name,
    datagram_sender,
    datagram_version,
    decode_unicast,
    encode,
)

__all__ = ["Member", "SERVICES_KIND", "REPLY_OVERHEAD", "MAX_ERROR_TEXT"]

SERVICES_KIND = KIND_SERVICES
"""Ring kind of every message of the layers above FRAG (their frames: :mod:`groupcomm.layers.wire`)."""
_UNICAST_WINDOW = 64
"""Upper-layer unicast messages in flight per peer (requests and replies pipeline) ..."""
_UNICAST_WINDOW_BYTES = 1 << 20
"""... and their bytes (at least one message): state chunks are 256 KiB, so four of them."""
REPLY_OVERHEAD = 32
"""Bytes a reply frame adds to its value, at most (a reply value may be UNICAST
``max_message`` less this)."""
MAX_ERROR_TEXT = 4096
"""Characters of an error reply's text that travel (a longer one is cut)."""


class DirectDone(NamedTuple):
    """A :meth:`Member.send_to` completed: acknowledged by ``dest`` (``error`` None) or failed."""

    token: int
    dest: int
    error: str | None


class Member:
    """Multicast + unicast + spaces + request-reply + quorum for one member.

    ``send(now, payload, safe=False)`` (a channel message) is the Multicast layer's own
    :meth:`~groupcomm.layers.multicast.Multicast.send`, bound here without a wrapper: it is
    the hot path.
    """

    def __init__(
        self,
        node_id: int,
        ring: RingConfig,
        *,
        fd: FdConfig | None = None,
        frag: FragConfig | None = None,
        unicast: UnicastConfig | None = None,
        quorum: QuorumConfig | None = None,
        spaces: SpacesConfig | None = None,
        ring_seq_floor: int = 0,
        epoch: int = 0,
    ) -> None:
        self.node_id = node_id
        self.multicast = Multicast(node_id, ring, fd=fd, frag=frag, ring_seq_floor=ring_seq_floor)
        self.unicast = Unicast(node_id, ring.cluster_id, unicast, epoch=epoch or ring_seq_floor)
        self.spaces = SpaceLayer(node_id, Quorum(quorum), spaces)
        self.rpc = RpcTracker()
        self.view: View | None = None
        self._transitional: frozenset[int] | None = None     # who moved with us into the coming view
        self.send = self.multicast.send          # channel messages go straight to the ring (hot path)
        self.send_many = self.multicast.send_many
        self._control: deque[tuple[bytes, bool]] = deque()     # ring messages of our layers, waiting for room
        self._my_requests: dict[int, str] = {}                 # multicast req id -> scope
        # Upper-layer unicast, paced per peer.  The tag of each message: a request id
        # (int > 0: its slot fails if the message does), a send_to token (int < 0) or None.
        self._uq: dict[int, deque[tuple[bytes, int | None]]] = {}
        self._u_inflight: dict[int, dict[int, int | None]] = {}     # per peer: msg id -> tag
        self._u_inflight_bytes: dict[int, dict[int, int]] = {}     # per peer: msg id -> size
        self._uq_bytes: dict[int, int] = {}                         # per peer: bytes in its _uq deque
        self._direct_tokens = 0
        self._out: list = []
        self.unicast_frames_dropped = 0
        """Upper-layer frames that arrived over UNICAST malformed (see :mod:`groupcomm.layers.wire`)."""
        self.unicast_refused = 0
        """Messages of the layers (snapshot chunks, replies) UNICAST refused as too large."""
        self.versions = VersionLog(node_id)
        """Logs ring and probe datagrams of another protocol version once per peer."""
        self._probes_dropped = 0

    # -- inputs -----------------------------------------------------------------

    def start(self, now: int) -> None:
        self.multicast.start(now)

    def receive(self, now: int, data: bytes) -> bool:
        """A datagram from the network (ring, FD or UNICAST); bad ones are counted and dropped.

        Returns whether its layer took it as coming from a live peer (drivers learn
        a peer's address only from such datagrams).
        """
        if data[:2] == UNICAST_MAGIC:
            drops = sum(self.unicast.drops.values())
            self.unicast.receive(now, data)
            return sum(self.unicast.drops.values()) == drops
        fd = self.multicast.fd
        if data[:2] == FD_MAGIC:
            drops = sum(fd.drops.values()) if fd is not None else -1
            self.multicast.receive(now, data)
            return fd is not None and sum(fd.drops.values()) == drops
        rc = self.multicast.receive(now, data)
        if rc == BAD_VERSION:
            # Counted by the C core (drop_bad_version); logged here, once per peer and version.
            self.versions("ring", datagram_sender(data), datagram_version(data))
        return rc in FROM_A_LIVE_PEER

    def wrong_version(self, layer: str, peer: object, version: int | None) -> None:
        """A driver dropped a datagram of another protocol version (a probe): count it, log it once."""
        if layer == "probe":
            self._probes_dropped += 1
        self.versions(layer, peer, version)

    @property
    def dropped_frames(self) -> dict[str, int]:
        """Frames and datagrams dropped, per layer: malformed, of another version, foreign, stale.

        ``spaces``: ring frames of the spaces layer and snapshot chunks out of place;
        ``unicast_frames``: upper-layer frames over UNICAST; ``unicast``: UNICAST
        datagrams (any reason, see ``Unicast.drops``); ``fd``: failure-detector
        datagrams; ``frag``: fragments (malformed, or cut by a view change);
        ``probe``: probe requests of another version.  The ring's own drops are
        in its stats (``drop_*``).
        """
        fd = self.multicast.fd
        return {
            "spaces": self.spaces.dropped,
            "unicast_frames": self.unicast_frames_dropped,
            "unicast": sum(self.unicast.drops.values()),
            "fd": sum(fd.drops.values()) if fd is not None else 0,
            "frag": self.multicast.frag.dropped,
            "probe": self._probes_dropped,
        }

    def tick(self, now: int) -> None:
        self.multicast.tick(now)
        self.unicast.tick(now)
        self.rpc.tick(now)
        self._after_spaces(now)               # state-transfer timeouts; then what waits for room

    def leave(self, now: int) -> None:
        self.multicast.leave(now)

    def suspect(self, now: int, node: int) -> bool:
        return self.multicast.suspect(now, node)

    def join_space(self, now: int, space: str) -> None:
        self.spaces.join(space)
        self._after_spaces(now)

    def leave_space(self, now: int, space: str) -> None:
        self.spaces.leave(space)
        self._after_spaces(now)

    def space_send(self, now: int, space: str, payload: bytes, safe: bool = False) -> None:
        """A message to the members of ``space``, in total order; QueueFull when full.

        Raises TypeError unless ``payload`` is bytes-like (an int would make zero bytes).
        """
        if not isinstance(payload, (bytes, bytearray, memoryview)):
            raise TypeError(f"payload must be bytes, not {type(payload).__name__}")
        if space not in self.spaces.requested:
            raise LocalProtocolError(f"member {self.node_id} is not in space {space!r}; join it first")
        self.multicast.send(now, self.spaces.send(space, payload, safe), safe, SERVICES_KIND)

    def request(self, now: int, scope: str, payload: bytes, *, to: tuple[int, ...] | None,
                mode: Mode, timeout_us: int) -> int:
        """Start a request; its :class:`~groupcomm.layers.rpc.RequestDone` comes out of :meth:`take`.

        ``scope`` is a space name or ``""`` (every member of the channel);
        ``to=None`` multicasts through the ring, a tuple of members sends to
        each of them over unicast.
        """
        if scope:
            check_space_name(scope)
        req_id = self.rpc.new_id(mode)
        if to is None:
            self.multicast.send(now, self.spaces.request(scope, req_id, payload), False, SERVICES_KIND)
            if req_id != ONE_WAY:
                self._my_requests[req_id] = scope
            self.rpc.start(now, req_id, mode, timeout_us, scope, None)
        else:
            message = encode(P2PRequestFrame(scope, req_id, bytes(payload)))
            for member in to:
                if member != self.node_id:
                    self._check_unicast(member, len(message), "request")    # before anything is queued
            self.rpc.start(now, req_id, mode, timeout_us, scope, to)
            for member in to:
                if member == self.node_id:
                    self._out.append(SpaceRequest(scope, member, req_id, bytes(payload)))
                else:
                    self._unicast(member, message, req_id or None)      # a one-way request has no slot to fail
        self._send_queued_unicast(now)
        return req_id

    def send_to(self, now: int, dest: int, payload: bytes) -> int:
        """A point-to-point message over UNICAST; a :class:`DirectDone` with the returned token follows.

        Raises (and then queues nothing) :class:`PayloadTooLarge` over UNICAST's
        ``max_message``, :class:`QueueFull` past ``send_queue_bytes`` queued for
        ``dest``, :class:`MemberUnreachable` if ``dest`` is not in the view.
        """
        if not isinstance(payload, (bytes, bytearray, memoryview)):
            raise TypeError(f"payload must be bytes, not {type(payload).__name__}")
        if dest == self.node_id:
            raise LocalProtocolError("send_to: a member cannot send to itself; use the payload directly")
        if self.view is None or dest not in self.view.members:
            raise MemberUnreachable(f"member {dest} is not in the current view")
        frame = encode(DirectFrame(bytes(payload)))
        self._check_unicast(dest, len(frame), "send_to")
        self._direct_tokens += 1
        token = self._direct_tokens
        self._unicast(dest, frame, -token)
        self._send_queued_unicast(now)
        return token

    def cancel_request(self, req_id: int) -> None:
        self.rpc.cancel(req_id)
        self._my_requests.pop(req_id, None)

    def reply(self, now: int, request: SpaceRequest, reply: Reply) -> None:
        """Answer ``request`` (sent back to the requester over unicast).

        A value too large for one UNICAST message (``max_message`` less
        :data:`REPLY_OVERHEAD`) is replaced by an error reply saying so,
        whoever the requester is; an error text is cut to
        :data:`MAX_ERROR_TEXT` characters.
        """
        if request.req_id == ONE_WAY:
            return                                  # mode NONE: nobody waits for it
        reply = self._sendable(reply)
        if request.requester == self.node_id:
            self.rpc.reply(request.req_id, self.node_id, reply)
            self._collect_rpc(now)
            return
        value = None if reply.value is None else bytes(reply.value)
        self._unicast(request.requester, encode(ReplyFrame(request.req_id, bool(reply.ok), value, reply.error)), None)
        self._send_queued_unicast(now)

    def _sendable(self, reply: Reply) -> Reply:
        limit = self.unicast.config.max_message - REPLY_OVERHEAD
        if reply.value is not None and len(reply.value) > limit:
            return Reply(False, None, f"PayloadTooLarge: the reply of {len(reply.value)} bytes is over the limit of "
                                      f"{max(limit, 0)} bytes (UNICAST max_message less {REPLY_OVERHEAD})", "error")
        if reply.error is not None and len(reply.error) > MAX_ERROR_TEXT:
            return reply._replace(error=reply.error[:MAX_ERROR_TEXT] + "...")
        return reply

    def _check_unicast(self, dest: int, size: int, what: str) -> None:
        """Refuse an application's unicast message to ``dest`` that is too large, or finds its queue full."""
        limit = self.unicast.config.max_message
        if size > limit:
            raise PayloadTooLarge(
                f"{what}: a message of {size} bytes (payload and frame) is over the limit of {limit} bytes "
                "(UNICAST max_message); send it in parts or raise the limit"
            )
        queued = (self._uq_bytes[dest] if dest in self._uq else 0) + self.unicast.queued_bytes(dest)
        most = self.unicast.config.send_queue_bytes
        if queued and queued + size > most:
            raise QueueFull(f"{what}: {queued} bytes are queued for member {dest} and this message has {size}, "
                            f"over send_queue_bytes={most}; wait and retry")

    def provide_state(self, now: int, request: StateRequest, state: bytes | None) -> None:
        self.spaces.provide(request, state)
        self._after_spaces(now)

    # -- outputs ------------------------------------------------------------------

    @property
    def ring(self):
        return self.multicast.ring

    @ring.setter
    def ring(self, ring) -> None:            # the C pump wraps the ring in a locking proxy
        self.multicast.ring = ring

    @property
    def frag(self):
        return self.multicast.frag

    @property
    def fd(self):
        return self.multicast.fd

    @property
    def pending(self) -> int:
        return self.multicast.pending

    @property
    def can_send(self) -> bool:
        return self.multicast.can_send

    @property
    def has_output(self) -> bool:
        return bool(self._out) or self.multicast.has_output or self.unicast.has_output

    def next_deadline(self) -> int | None:
        times = [d for d in (self.multicast.next_deadline(), self.unicast.next_deadline(), self.rpc.next_deadline(),
                             self.spaces.next_deadline()) if d is not None]
        return min(times) if times else None

    def take(self, now: int) -> list:
        out = self._out                  # outputs of the layers above land here, in order
        for item in self.multicast.take(now):
            t = type(item)
            if t is list or t is SendToAll or t is SendTo:
                out.append(item)
            elif t is LayerDelivery:
                if item.kind == SERVICES_KIND:
                    self._deliver(item)
                    self._after_spaces(now)
            elif t is View:
                self._view(now, item)
        self._take_unicast(now)
        self._collect_rpc(now)
        self._out = []
        return out

    # -- plumbing -------------------------------------------------------------------

    def _view(self, now: int, view: View) -> None:
        self.spaces.view(view)
        primary = self.spaces.primary if not view.transitional else self.spaces.quorum.is_primary(view.members)
        view = view._replace(primary=primary)
        self._out.append(view)
        if view.transitional:
            self._transitional = frozenset(view.members)
        else:
            members = set(view.members)
            gone = set(self.view.members) - members if self.view else set()
            # A member of our last view and of this one that did not move with us
            # (not in the transitional configuration) went through a configuration of
            # its own, e.g. it restarted faster than it was detected: what we had in
            # flight with it belongs to its previous life.  Treat it as gone and back.
            if self.view is not None and self._transitional is not None:
                gone |= (set(self.view.members) & members) - self._transitional - {self.node_id}
            self._transitional = None
            self.view = view
            if gone & members:
                self.unicast.set_members(members - gone, now)
            self.unicast.set_members(view.members, now)
            for peer in list(set(self._uq) | set(self._u_inflight)):
                if peer in gone or peer not in members:
                    queued = [tag for _, tag in self._uq.pop(peer, ())]
                    self._u_inflight_bytes.pop(peer, None)
                    for tag in [*self._u_inflight.pop(peer, {}).values(), *queued]:
                        self._failed(peer, tag)
            if gone:
                self.rpc.left(None, gone)
        self._after_spaces(now)

    def _deliver(self, item: LayerDelivery) -> None:
        frame = self.spaces.deliver(item.sender, item.payload, item.safe)
        if type(frame) is RequestFrame and item.sender == self.node_id:
            self._own_request(frame)

    def _own_request(self, frame: RequestFrame) -> None:
        """Our multicast request reached this point: its repliers are who is in scope here."""
        scope = self._my_requests.pop(frame.req_id, None)
        if scope is None or scope != frame.scope:
            return
        members = self.spaces.spaces.get(scope, []) if scope else (self.view.members if self.view else ())
        self.rpc.fix_targets(frame.req_id, list(members))

    def _after_spaces(self, now: int) -> None:
        self.spaces.tick(now)
        for item in self.spaces.take():
            t = type(item)
            if t is RingSend:
                self._control.append((item.payload, item.safe))
            elif t is UnicastSend:
                self._unicast(item.dest, item.payload, None)
            else:
                if t is SpaceView and item.left:
                    self.rpc.left(item.space, item.left)
                self._out.append(item)
        self._flush_control(now)
        self._send_queued_unicast(now)

    def _flush_control(self, now: int) -> None:
        control = self._control
        while control:
            payload, safe = control[0]
            try:
                self.multicast.send(now, payload, safe, SERVICES_KIND)
            except QueueFull:
                return
            control.popleft()

    def _unicast(self, dest: int, payload: bytes, req_id: int | None) -> None:
        queue = self._uq.get(dest)
        if queue is None:
            queue = self._uq[dest] = deque()
            self._uq_bytes[dest] = 0
        queue.append((payload, req_id))
        self._uq_bytes[dest] += len(payload)

    def _send_queued_unicast(self, now: int) -> None:
        for dest, queue in list(self._uq.items()):
            inflight = self._u_inflight.setdefault(dest, {})
            sizes = self._u_inflight_bytes.setdefault(dest, {})
            room = _UNICAST_WINDOW_BYTES - sum(sizes.values())
            while queue and len(inflight) < _UNICAST_WINDOW:
                payload, req_id = queue[0]
                if inflight and len(payload) > room:
                    break
                try:
                    msg_id = self.unicast.send(now, dest, payload)
                except QueueFull:
                    break
                except LocalProtocolError as exc:          # too large for UNICAST: fails alone, raises nowhere
                    queue.popleft()
                    self._uq_bytes[dest] -= len(payload)
                    self._refused(dest, req_id, str(exc))
                    continue
                queue.popleft()
                self._uq_bytes[dest] -= len(payload)
                inflight[msg_id] = req_id
                sizes[msg_id] = len(payload)
                room -= len(payload)
            if not queue:
                del self._uq[dest]
                self._uq_bytes.pop(dest, None)
        self._take_unicast(now)

    def _refused(self, dest: int, tag: int | None, error: str) -> None:
        if tag is not None and tag > 0:
            self.rpc.reply(tag, dest, Reply(False, None, error, "error"))
        elif tag is not None:
            self._out.append(DirectDone(-tag, dest, error))
        else:
            self.unicast_refused += 1

    def _take_unicast(self, now: int) -> None:
        again = False
        for item in self.unicast.take():
            t = type(item)
            if t is SendTo:
                self._out.append(item)
            elif t is UnicastMessage:
                self._unicast_message(now, item)
            elif t is UnicastSent:
                self._u_inflight_bytes.get(item.dest, {}).pop(item.msg_id, None)
                tag = self._u_inflight.get(item.dest, {}).pop(item.msg_id, None)
                if tag is not None and tag < 0:
                    self._out.append(DirectDone(-tag, item.dest, None))
                again = True
            elif t is UnicastFailed:
                self._u_inflight_bytes.get(item.dest, {}).pop(item.msg_id, None)
                self._failed(item.dest, self._u_inflight.get(item.dest, {}).pop(item.msg_id, None), item.reason)
                again = True
        if again and self._uq:
            self._send_queued_unicast(now)

    def _failed(self, dest: int, tag: int | None, reason: str = "left") -> None:
        if tag is None:
            return
        if tag > 0:
            self.rpc.reply(tag, dest, LEFT)
        else:
            self._out.append(DirectDone(-tag, dest, reason))

    def _unicast_message(self, now: int, message: UnicastMessage) -> None:
        try:
            frame = decode_unicast(message.payload)
        except MalformedFrame:
            self.unicast_frames_dropped += 1
            return
        t = type(frame)
        if t is ReplyFrame:
            status = "ok" if frame.ok else "error"
            self.rpc.reply(frame.req_id, message.sender, Reply(frame.ok, frame.value, frame.error, status))
        elif t is P2PRequestFrame:
            self._out.append(SpaceRequest(frame.scope, message.sender, frame.req_id, frame.payload))
        elif t is DirectFrame:
            self._out.append(Direct(message.sender, frame.payload))
        else:                                                    # StateChunkFrame
            self.spaces.state_chunk(message.sender, frame)
            self._after_spaces(now)

    def _collect_rpc(self, now: int) -> None:
        done: list[RequestDone] = self.rpc.take(now)
        self._out.extend(done)
