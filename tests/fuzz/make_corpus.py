"""Regenerate the seed corpus (``tests/fuzz/corpus/<target>/``) from valid traffic.

    python -m tests.fuzz.make_corpus [--out DIR]

Everything is captured from seeded, deterministic runs, so the same code gives
the same files:

* a :class:`~groupcomm.testing.SimCluster` of three members on the production
  layers, with channel messages (small and fragmented), spaces (joins, data,
  a state transfer, a leave), multicast and point-to-point requests, direct
  messages and a partition that heals (merges, SYNC frames).  Its datagrams
  (``add_packet_observer``) seed ``ring``, ``fd`` and ``unicast``; the frames
  and fragments member 1 delivers seed ``wire-ring``, ``wire-unicast``,
  ``spaces`` and ``frag``;
* the formed clusters the stateful targets rebuild for every input
  (:func:`~tests.fuzz.targets.ring_cluster`, :func:`~tests.fuzz.targets.member_cluster`)
  with traffic: what members 2 and 3 send to member 1 seeds ``ring-operational``
  and ``member``, so the seeds are valid in the state each input starts from;
* probe requests and answers as a member builds them, for ``probe``.

Each target keeps at most :data:`LIMITS` files, picked round-robin over the
kinds of datagram (magic and type byte) so that rare kinds are kept; files are
named by the SHA-1 of their contents.  The old seeds of a target are replaced;
files named ``crash-*`` (inputs that once crashed a target, kept as regressions) stay.
"""

from __future__ import annotations

import argparse
import hashlib
from collections import defaultdict
from pathlib import Path

import msgspec

from groupcomm.core.ring import SendTo, SendToAll
from groupcomm.io.probe import probe_response
from groupcomm.layers import wire
from groupcomm.layers.quorum import QuorumConfig
from groupcomm.layers.rpc import Mode
from groupcomm.layers.unicast import UnicastMessage
from groupcomm.testing import SimCluster
from tests.fuzz.run import CORPUS, MAX_LEN
from tests.fuzz.targets import (
    CLUSTER,
    ME,
    SEP,
    SESSIONS_VIEW,
    SPACE,
    member_cluster,
    ring_cluster,
)

LIMITS = {
    "ring": 40, "ring-operational": 30, "wire-ring": 40, "wire-unicast": 30, "fd": 10,
    "unicast": 40, "frag": 12, "spaces": 40, "probe": 8, "member": 30, "sessions": 30,
}
"""Files kept per target (a few hundred in all)."""
MAX_FILE = MAX_LEN
"""Largest seed (bytes): a datagram, or a message's fragments (the fuzzer's -max_len)."""


class Capture:
    """Inputs per target, grouped by kind, in the order they were seen."""

    def __init__(self) -> None:
        self.seen: dict[str, dict[bytes, dict[str, bytes]]] = defaultdict(lambda: defaultdict(dict))

    def add(self, target: str, kind: bytes, data: bytes) -> None:
        if len(data) <= MAX_FILE:
            self.seen[target][kind].setdefault(hashlib.sha1(data).hexdigest(), data)

    def pick(self, target: str) -> list[bytes]:
        """At most ``LIMITS[target]`` inputs, round-robin over kinds (rare kinds first)."""
        groups = sorted(self.seen[target].items(), key=lambda kv: (len(kv[1]), kv[0]))
        queues = [list(group.values()) for _, group in groups]
        picked: list[bytes] = []
        while len(picked) < LIMITS[target] and any(queues):
            for queue in queues:
                if queue and len(picked) < LIMITS[target]:
                    picked.append(queue.pop(0))
        return picked


def datagram_kind(data: bytes) -> bytes:
    return data[:2] + data[3:4]


def capture_sim(capture: Capture, seed: int = 11) -> None:
    """The simulator's datagrams, and the frames and fragments member 1 delivers."""
    sim = SimCluster(3, seed=seed, stack="sim", quorum=QuorumConfig(expected_votes=3))

    def on_packet(node: int, packet: bytes) -> None:
        magic = packet[:2]
        kind = datagram_kind(packet)
        if magic == wire.RING_MAGIC:
            capture.add("ring", kind, packet)
        elif magic == wire.FD_MAGIC and node != ME:             # the fuzzed member's own are "self"
            capture.add("fd", kind, packet)
        elif magic == wire.UNICAST_MAGIC and wire.UNICAST_COMMON.unpack_from(packet)[5] == ME:
            capture.add("unicast", kind, packet)                    # addressed to the fuzzed member

    sim.add_packet_observer(on_packet)
    assert sim.run_until(sim.converged, timeout=10)
    _hook_member(capture, sim)
    services = sim.services
    for node in sim.nodes:
        services.state_provider(node, SPACE, lambda node=node: b"snapshot of %d " % node * 40)
        services.on_request(node, SPACE, lambda payload, requester: b"answer to " + payload)
        services.on_request(node, "", lambda payload, requester: b"channel answer")
    services.join(2, SPACE)
    sim.run(0.3)
    services.join(1, SPACE)
    services.join(3, SPACE)
    sim.run(0.5)
    for i in range(6):
        sim.send(1 + i % 3, b"channel message %d" % i, safe=bool(i % 2))
        services.send(1 + (i + 1) % 3, SPACE, b"space message %d" % i, safe=bool(i % 2))
    services.request(2, SPACE, b"question", mode=Mode.ALL)
    services.request(3, "", b"to the channel", mode=Mode.FIRST)
    services.request(2, SPACE, b"point to point", to=(1, 3))
    services.request(1, SPACE, b"from the fuzzed member", mode=Mode.ALL)       # replies come to 1
    services.request(1, "", b"p2p from the fuzzed member", to=(2, 3), mode=Mode.MAJORITY)
    services.send_to(1, 2, b"acks come back")
    for size in (0, 14, 900, 3000, 5000):                # UNICAST, whole and in fragments
        services.send_to(2, 1, b"x" * size)
        services.send_to(3, 1, b"q" * size)
    sim.send(2, bytes(range(256)) * 12)                  # FRAG: three fragments
    sim.send(3, b"y" * 2900, safe=True)
    sim.run(1.0)
    sim.partition([[1, 2], [3]])                         # a merge afterwards: SYNC, state epochs
    sim.run(3.0)
    services.send(1, SPACE, b"during the partition")
    sim.heal()
    assert sim.run_until(sim.converged, timeout=20)
    services.leave(3, SPACE)
    sim.run(1.0)


def _hook_member(capture: Capture, sim: SimCluster) -> None:
    """Record what member 1's spaces layer, Fragmenter and UNICAST layer hand up (its own attributes)."""
    member = sim.layers(ME)
    deliver, take, pieces = member.spaces.deliver, member.unicast.take, member.multicast.frag.deliver_pieces
    fragments: dict[tuple[int, int], list[bytes]] = {}

    def on_frame(sender: int, payload: bytes, safe: bool):
        kind = payload[:2]                               # msgpack array header and op
        capture.add("wire-ring", kind, payload)
        capture.add("spaces", kind, bytes([sender - 1]) + payload)
        return deliver(sender, payload, safe)

    def on_unicast() -> list:
        out = take()
        for item in out:
            if type(item) is UnicastMessage:
                frame = wire.decode_unicast(item.payload)
                capture.add("wire-unicast", type(frame).__name__.encode(), item.payload)
                if type(frame) is wire.StateChunkFrame:
                    capture.add("spaces", b"chunk", bytes([0x80 | (item.sender - 1)]) + item.payload)
        return out

    def on_fragment(sender: int, data: bytes, safe: bool):
        msg_id, _, count, _ = wire.FRAG_HEADER.unpack_from(data)
        parts = fragments.setdefault((sender, msg_id), [])
        parts.append(bytes([(sender - 1) | (0x80 if safe else 0)]) + data)
        if len(parts) == count:
            capture.add("frag", bytes([count]), SEP.join(parts))
            capture.add("frag", b"head", parts[0])
        return pieces(sender, data, safe)

    member.spaces.deliver = on_frame
    member.unicast.take = on_unicast
    member.multicast.frag.deliver_pieces = on_fragment


def _to_me(capture: Capture, target: str):
    def observe(src: int, out) -> None:
        if src != ME and (type(out) is SendToAll or (type(out) is SendTo and out.node == ME)):
            capture.add(target, datagram_kind(out.packet), out.packet)

    return observe


def capture_ring_cluster(capture: Capture) -> None:
    """What members 2 and 3 of the formed bare ring send member 1 as traffic flows."""
    loop = ring_cluster()
    loop.observers.append(_to_me(capture, "ring-operational"))
    for i in range(30):
        node = loop.nodes[1 + i % 3].obj
        node.submit(loop.now, b"message %d " % i * (1 + i * 3), safe=bool(i % 3 == 0), kind=i % 4)
        loop.run_for(3000, 50)
    loop.run_for(2_000_000, 3000)


def capture_member_cluster(capture: Capture) -> None:
    """What members 2 and 3 of the formed member cluster send member 1 as every layer works."""
    loop = member_cluster()
    loop.observers.append(_to_me(capture, "member"))
    two, three = loop.nodes[2].obj, loop.nodes[3].obj
    now = loop.now
    two.space_send(now, SPACE, b"to the space")
    three.send(now, b"to the channel", True)
    two.request(now, SPACE, b"question", to=None, mode=Mode.ALL, timeout_us=1_000_000)
    three.request(now, "", b"p2p", to=(1,), mode=Mode.ALL, timeout_us=1_000_000)
    two.send_to(now, 1, b"direct")
    three.send_to(now, 1, b"z" * 3000)
    two.send(now, b"w" * 4000)
    loop.run_for(300_000, 3000)
    two.leave_space(loop.now, SPACE)
    loop.run_for(300_000, 3000)
    two.join_space(loop.now, SPACE)
    loop.run_for(1_000_000, 3000)


def capture_probe(capture: Capture) -> None:
    """A request, and answers shaped like a member's (channel.Channel._answer_probe)."""
    request = wire.PROBE_HEADER.pack(wire.PROBE_MAGIC, wire.PROTOCOL_VERSION, wire.PROBE_REQUEST, CLUSTER)
    capture.add("probe", b"request", request)
    loop = ring_cluster()
    for node in loop.nodes.values():
        ring = node.obj
        report = {
            "name": f"node-{node.id}", "address": node.id, "state": ring.state.name,
            "view": list(ring.members), "ring": "RingId(rep=1, seq=4)", "rotations_per_s": 12.5,
            "debug": ring.debug(), "stats": ring.stats(),
        }
        capture.add("probe", b"answer", probe_response(CLUSTER, report))
    capture.add("probe", b"two", SEP.join([probe_response(CLUSTER, {"address": 7, "stats": {}}), request]))


def capture_sessions(capture: Capture) -> None:
    """The frames session stores send each other: migrations, a crash and fail-over, a graceful stop."""
    from groupcomm.services.sessions import core as session_core
    from groupcomm.services.sessions import wire as session_wire
    from groupcomm.services.sessions.settings import SessionSettings
    from groupcomm.services.sessions.sim import SimSessions

    seen: list[bytes] = []
    receive = session_core.SessionCore.receive

    def spy(self, sender: int, payload: bytes, now: float) -> None:
        seen.append(payload)
        receive(self, sender, payload, now)

    session_core.SessionCore.receive = spy
    try:
        sim = SimCluster(4, seed=5, stack="sim", quorum=QuorumConfig(expected_votes=4))
        store = SimSessions(sim, SessionSettings(backups=1))
        store.run_until(store.ready, 20)
        first = store.increment(1, None)
        store.run_until(lambda: first.finished, 10)
        for node in (2, 3, 4, 1):
            inc = store.increment(node, first.sid)
            store.run_until(lambda inc=inc: inc.finished, 10)
        store.crash(1)
        again = store.increment(2, first.sid)
        store.run_until(lambda: again.finished, 20)
        store.stop(2)
        store.run(3.0)
    finally:
        session_core.SessionCore.receive = receive
    previous = b""
    for raw in seen:                # as if sent in the fuzzed member's view (else they only wait for it)
        frame = msgspec.structs.replace(session_wire.decode_frame(raw), view=SESSIONS_VIEW)
        payload = session_wire.encode_frame(frame)
        kind = type(frame).__name__.encode()
        capture.add("sessions", kind, payload)
        if previous:
            capture.add("sessions", b"pair", previous + SEP + payload)
        previous = payload


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=CORPUS, help=f"corpus root (default: {CORPUS})")
    args = parser.parse_args(argv)
    capture = Capture()
    capture_sim(capture)
    capture_ring_cluster(capture)
    capture_member_cluster(capture)
    capture_probe(capture)
    capture_sessions(capture)
    for target in LIMITS:
        picked = capture.pick(target)
        assert picked, f"nothing captured for {target}"
        where = args.out / target
        where.mkdir(parents=True, exist_ok=True)
        for old in where.iterdir():
            if not old.name.startswith("crash-"):        # inputs that once crashed a target stay
                old.unlink()
        for data in picked:
            (where / hashlib.sha1(data).hexdigest()[:16]).write_bytes(data)
        print(f"{target:18} {len(picked):3} files, {sum(map(len, picked)):7} bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
