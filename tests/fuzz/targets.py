"""The fuzz targets: each turns one input (bytes) into calls on one receiving path.

Every target checks the same property: whatever the bytes, the code under test
counts and drops what it cannot use and never raises into its caller (an
exception escaping a target is a finding), and the work per input is bounded
(no hang, no growth past the layer's limits).  A target builds its subject from
scratch for every input, so a crashing input reproduces from its file alone.

Inputs that carry several datagrams or frames separate them with :data:`SEP`
(at most :data:`MAX_PACKETS`); a seed of the corpus is usually one captured
datagram, without separator.  Layouts of the stateful targets' inputs:

``spaces``
    each chunk is one byte, then a frame: bits 0-1 of the byte pick the
    sender (members 1, 2, 3), bit 7 says the frame came over UNICAST (a
    snapshot chunk) rather than the ring.
``frag``
    each chunk is one byte (the sender, as above; bit 7: safe), then a
    fragment as the ring delivers it (FRAG header, then data).

``TARGETS`` maps each name to a factory that does the expensive setup once and
returns the per-input function (``python -m tests.fuzz --list``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from groupcomm.config import build_stack, load_stack
from groupcomm.core.ring import Ring, RingState
from groupcomm.events import RingId, View
from groupcomm.io import probe as probe_io
from groupcomm.io.udp import UdpConfig
from groupcomm.layers import wire
from groupcomm.layers.fd import FailureDetector
from groupcomm.layers.frag import Fragmenter
from groupcomm.layers.member import Member
from groupcomm.layers.quorum import Quorum, QuorumConfig
from groupcomm.layers.rpc import Reply
from groupcomm.layers.spaces import SpaceLayer, SpaceRequest, SpaceView, StateRequest
from groupcomm.layers.unicast import Unicast, UnicastMessage
from groupcomm.services.sessions import wire as session_wire
from groupcomm.services.sessions.core import SessionCore
from groupcomm.services.sessions.record import Session
from tests.fuzz.netloop import NetLoop, Node

__all__ = ["CLUSTER", "EPOCH", "MAX_PACKETS", "ME", "PEERS", "SEP", "SETTINGS", "SPACE", "TARGETS", "member_cluster",
           "ring_cluster", "split"]

SEP = b"\xf5SEP\xf5"
"""Separates datagrams (or frames) in one input."""
MAX_PACKETS = 16
"""Datagrams per input at most (the work per input stays bounded)."""

SETTINGS = build_stack(load_stack("sim"), transport_optional=True)
"""The layers' settings of the simulator's stack; the corpus is captured with them."""
CLUSTER = SETTINGS.ring.cluster_id
EPOCH = 1
"""The UNICAST epoch of a member's first incarnation in the simulator (and in the clusters below)."""
ME = 1
"""The member every input is fed to."""
PEERS = (1, 2, 3)
SPACE = "fuzz-space"
_MS = 1000


def split(data: bytes) -> list[bytes]:
    """The datagrams (or frames) of one input."""
    return data.split(SEP, MAX_PACKETS - 1)


# ---------------------------------------------------------------------------
# Clusters in the middle of the protocol (rebuilt for every input: deterministic)
# ---------------------------------------------------------------------------


def ring_cluster(n: int = 3) -> NetLoop:
    """``n`` bare rings (members 1..n) that have formed one ring."""
    nodes = []
    for i in range(1, n + 1):
        ring = Ring(i, SETTINGS.ring)
        ring.start(0)
        nodes.append(Node(i, ring, lambda now, ring=ring: ring.take()))
    loop = NetLoop(nodes)
    formed = loop.run_until(
        lambda: all(m.obj.state is RingState.OPERATIONAL and len(m.obj.members) == n for m in nodes), 5000
    )
    assert formed, "the rings did not form"
    return loop


def _answering_take(member: Member) -> Callable[[int], list]:
    """``member.take``, answering requests and state requests on the spot (an application)."""

    def take(now: int) -> list:
        out = member.take(now)
        for item in out:
            t = type(item)
            if t is StateRequest:
                member.provide_state(now, item, b"state of " + item.space.encode())
            elif t is SpaceRequest:
                member.reply(now, item, Reply(True, b"answer", None, "ok"))
        return out

    return take


def member_cluster(n: int = 3) -> NetLoop:
    """``n`` members (1..n) with every layer, one view, all in :data:`SPACE` with its state transferred."""
    members = [
        Member(i, SETTINGS.ring, fd=SETTINGS.fd, frag=SETTINGS.frag, quorum=QuorumConfig(expected_votes=n),
               epoch=EPOCH)
        for i in range(1, n + 1)
    ]
    nodes = []
    for member in members:
        member.start(0)
        nodes.append(Node(member.node_id, member, _answering_take(member)))
    loop = NetLoop(nodes)
    assert loop.run_until(lambda: all(m.view is not None and len(m.view.members) == n for m in members), 5000)
    for member in members:
        member.join_space(loop.now, SPACE)
    assert loop.run_until(lambda: all(len(m.spaces.spaces.get(SPACE, ())) == n for m in members), 5000)
    loop.run_for(100 * _MS, 2000)
    return loop


# ---------------------------------------------------------------------------
# The targets
# ---------------------------------------------------------------------------

_RING_CODES = frozenset({0, -20, -21, -22, -23, -24, -25, -26, -27})


def _drops(ring: Ring) -> int:
    return sum(v for k, v in ring.stats().items() if k.startswith("drop_"))


def _feed_ring(ring: Ring, now: int, packet: bytes) -> None:
    before = _drops(ring)
    rc = ring.receive(now, packet)
    assert rc in _RING_CODES, f"Ring.receive returned {rc}"
    assert rc == 0 or _drops(ring) > before, f"a packet dropped ({rc}) was not counted"


def ring_fresh() -> Callable[[bytes], None]:
    """The C parser behind :meth:`Ring.receive`, on a member gathering its first ring."""
    node = 4         # not one of the captured senders: their packets are not "our own"

    def one(data: bytes) -> None:
        ring = Ring(node, SETTINGS.ring)
        ring.start(0)
        now = 0
        for packet in split(data):
            now += 5 * _MS
            _feed_ring(ring, now, packet)
            ring.tick(now)
            ring.take()
        ring.tick(now + 10_000 * _MS)
        ring.take()

    return one


def ring_operational() -> Callable[[bytes], None]:
    """:meth:`Ring.receive` of member 1 of a formed three-member ring, which then runs on for a while."""

    def one(data: bytes) -> None:
        loop = ring_cluster()
        ring = loop.nodes[ME].obj
        for packet in split(data):
            _feed_ring(ring, loop.now, packet)
            loop.run_for(20 * _MS, 200)
        loop.run_for(1000 * _MS, 2000)

    return one


def _check_frame(decode: Callable[[bytes], Any], data: bytes) -> None:
    try:
        frame = decode(data)
    except wire.MalformedFrame:
        return
    again = decode(wire.encode(frame))          # what decodes must travel again unchanged
    assert again == frame, (frame, again)


def wire_ring() -> Callable[[bytes], None]:
    """:func:`groupcomm.layers.wire.decode_ring`: MalformedFrame or a frame that round-trips."""
    return lambda data: _check_frame(wire.decode_ring, data)


def wire_unicast() -> Callable[[bytes], None]:
    """:func:`groupcomm.layers.wire.decode_unicast`: MalformedFrame or a frame that round-trips."""
    return lambda data: _check_frame(wire.decode_unicast, data)


def fd() -> Callable[[bytes], None]:
    """:meth:`FailureDetector.receive` of member 1 watching 2 and 3."""

    def one(data: bytes) -> None:
        detector = FailureDetector(ME, CLUSTER, SETTINGS.fd)
        detector.set_members(PEERS, 0)
        for i, packet in enumerate(split(data)):
            before = sum(detector.drops.values())
            answer = detector.receive(packet, i * _MS)
            counted = sum(detector.drops.values()) - before
            assert counted in (0, 1)
            assert answer is None or (counted == 0 and type(answer) is int), answer
            if counted == 0:                # taken: it must be a well-formed FD datagram of this cluster
                magic, version, kind, cluster, sender = wire.HEADER.unpack(packet)
                assert (magic, version, cluster) == (wire.FD_MAGIC, wire.PROTOCOL_VERSION, CLUSTER)
                assert kind in (wire.FD_HEARTBEAT, wire.FD_PING, wire.FD_PONG) and sender not in (0, ME)
        detector.tick(10_000 * _MS)

    return one


def unicast() -> Callable[[bytes], None]:
    """:meth:`Unicast.receive` of member 1 (epoch 1) in a view of 1, 2, 3, then its timers."""
    config = SETTINGS.unicast          # None: the defaults, as in the simulator

    def one(data: bytes) -> None:
        layer = Unicast(ME, CLUSTER, config, epoch=EPOCH)
        layer.set_members(PEERS, 0)
        layer.send(0, 2, b"outgoing so that acks have a stream to hit")
        now = 0
        for packet in split(data):
            now += _MS
            before = (sum(layer.drops.values()), layer.received, layer.acks_received, layer.resets_received)
            layer.receive(now, packet)
            after = (sum(layer.drops.values()), layer.received, layer.acks_received, layer.resets_received)
            assert sum(after) - sum(before) == 1, ("every datagram is counted once", before, after)
            layer.tick(now)
            for item in layer.take():
                if type(item) is UnicastMessage:
                    assert type(item.payload) is bytes and len(item.payload) <= layer.config.max_message
        layer.tick(now + 60_000 * _MS)
        layer.take()

    return one


def frag() -> Callable[[bytes], None]:
    """:meth:`Fragmenter.deliver_pieces`: reassembly of delivered fragments, within its limits."""
    max_payload = Ring(ME, SETTINGS.ring).max_payload

    def one(data: bytes) -> None:
        fragmenter = Fragmenter(ME, max_payload, SETTINGS.frag.max_message,
                                partial_messages=SETTINGS.frag.partial_messages,
                                partial_bytes=SETTINGS.frag.partial_bytes)
        for chunk in split(data):
            if not chunk:
                continue
            before = fragmenter.dropped
            whole = fragmenter.deliver_pieces(PEERS[chunk[0] % 3], chunk[1:], bool(chunk[0] & 0x80))
            if whole is not None:
                pieces, kind = whole
                assert len(pieces.join()) == pieces.size <= fragmenter.max_message
                assert 0 <= kind <= 255
            assert fragmenter.dropped >= before
            assert fragmenter.partial <= fragmenter.partial_bytes
        fragmenter.view()
        assert fragmenter.partial == 0

    return one


def spaces() -> Callable[[bytes], None]:
    """:class:`SpaceLayer`: ring frames delivered in order and snapshot chunks, in a view of 1, 2, 3."""
    ring_id = RingId(1, 4)

    def one(data: bytes) -> None:
        layer = SpaceLayer(ME, Quorum(QuorumConfig(expected_votes=3)))
        layer.join(SPACE)
        layer.view(View(PEERS, ring_id, True))
        layer.view(View(PEERS, ring_id, False))
        now = 0
        for chunk in split(data):
            if not chunk:
                continue
            now += _MS
            sender, payload = PEERS[chunk[0] % 3], chunk[1:]
            if chunk[0] & 0x80:
                try:
                    frame = wire.decode_unicast(payload)
                except wire.MalformedFrame:
                    continue
                if type(frame) is wire.StateChunkFrame:
                    layer.state_chunk(sender, frame)
            else:
                before = layer.dropped
                frame = layer.deliver(sender, payload, False)
                assert frame is not None or layer.dropped == before + 1
            layer.tick(now)
            for item in layer.take():
                if type(item) is StateRequest:
                    layer.provide(item, b"state")
            layer.take()
        layer.view(View((ME,), RingId(ME, 8), True))
        layer.view(View((ME,), RingId(ME, 8), False))
        layer.tick(now + 60_000 * _MS)
        layer.take()

    return one


class _FakeSocket:
    """Answers one ``recvfrom`` with the input, then times out (what :func:`probe` reads)."""

    def __init__(self, answers: list[bytes]) -> None:
        self.answers = answers

    def sendto(self, data: bytes, addr: Any) -> int:
        assert probe_io.is_probe_request(data, CLUSTER)
        return len(data)

    def setblocking(self, flag: bool) -> None:
        pass

    def settimeout(self, value: float) -> None:
        pass

    def recvfrom(self, size: int) -> tuple[bytes, Any]:
        if not self.answers:
            raise TimeoutError
        return self.answers.pop(0)[:size], ("127.0.0.1", 9)


class _FakeSockets:
    def __init__(self, answers: list[bytes]) -> None:
        self.unicast = _FakeSocket(answers)
        self.group = ("239.255.0.1", 9)

    def close(self) -> None:
        pass


RENDER_PROBE_REPORTS = True
"""Also print the reports as ``groupcomm probe`` does (table and JSON): answers that do not fit
the report's schema are ignored (finding F1, ``tests/test_fuzz.py::test_probe_ignores_answers_of_another_shape``)."""


def probe() -> Callable[[bytes], None]:
    """The probe's both ends: :func:`is_probe_request` (a member) and the answers :func:`probe` reads."""
    udp = UdpConfig()
    request = wire.PROBE_HEADER.pack(wire.PROBE_MAGIC, wire.PROTOCOL_VERSION, wire.PROBE_REQUEST, CLUSTER)

    def one(data: bytes) -> None:
        packets = split(data)
        for packet in packets:
            answered = probe_io.is_probe_request(packet, CLUSTER)
            assert type(answered) is bool
            assert not answered or packet.startswith(request), "answered what is not a request"
        opened = probe_io.open_sockets
        probe_io.open_sockets = lambda config: _FakeSockets(list(packets))
        try:
            reports = probe_io.probe(CLUSTER, udp, timeout=60.0)
        finally:
            probe_io.open_sockets = opened
        # An answer whose address is ``true`` is no member's (finding F2, test_probe_keeps_integer_addresses_only).
        assert all(type(r) is dict and type(r["address"]) is int for r in reports)
        if RENDER_PROBE_REPORTS:
            probe_io.format_table(reports)
            json.dumps(reports)

    return one


def member() -> Callable[[bytes], None]:
    """:meth:`Member.receive` of member 1 of three with a view and a space, which then run on."""

    def one(data: bytes) -> None:
        loop = member_cluster()
        me = loop.nodes[ME].obj
        for packet in split(data):
            me.receive(loop.now, packet)
            loop.run_for(20 * _MS, 200)
        loop.run_for(300 * _MS, 1000)

    return one


def _session_core():
    """Member 1 of an application space of 1, 2, 3, holding a session and a copy of another."""
    core = SessionCore(ME, "n1", new_id=lambda: "A" * 21 + "A")
    core.ring_view(View((1, 2, 3), RingId(1, 8), False, True), 0.0)
    core.synced(0.0)
    core.space_view(SpaceView((1, 2, 3), (1, 2, 3), (), "groupcomm.sessions/fuzz", SESSIONS_VIEW), 0.0)
    core.table.put(Session.new("B" * 21 + "A", now=0.0, epoch=8 << 16), 0.0)
    core.take()
    return core


SESSIONS_VIEW = (1, 8, 2)
"""The view id the sessions target's member is in (frames of other views are buffered or dropped)."""


def sessions() -> Callable[[bytes], None]:
    """:class:`~groupcomm.services.sessions.core.SessionCore` of member 1: frames from members 2
    and 3 (alternately), then its timers; every frame that decodes must round-trip."""

    def one(data: bytes) -> None:
        core = _session_core()
        for i, frame in enumerate(split(data)):
            core.receive(2 + i % 2, frame, 1.0 + i)
            core.take()
            try:
                decoded = session_wire.decode_frame(frame)
            except session_wire.MalformedFrame:
                continue
            assert session_wire.decode_frame(session_wire.encode_frame(decoded)) == decoded
        core.tick(10_000.0)
        core.take()
    return one


TARGETS: dict[str, Callable[[], Callable[[bytes], None]]] = {
    "ring": ring_fresh,
    "ring-operational": ring_operational,
    "wire-ring": wire_ring,
    "wire-unicast": wire_unicast,
    "fd": fd,
    "unicast": unicast,
    "frag": frag,
    "spaces": spaces,
    "probe": probe,
    "member": member,
    "sessions": sessions,
}
"""Each target's name and the factory of its per-input function."""
