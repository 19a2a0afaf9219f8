"""The wire module: every frame round-trips, every bad shape is refused, the drivers' offsets
agree with what the C core puts on the wire, and every layer drops (and logs once) packets
of another protocol version."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import msgpack
import pytest

import groupcomm
from groupcomm.core.ring import Ring, RingConfig, SendTo, SendToAll
from groupcomm.events import RingId, View
from groupcomm.layers import wire
from groupcomm.layers.fd import FailureDetector, FdConfig
from groupcomm.layers.member import Member
from groupcomm.layers.spaces import SpaceLayer
from groupcomm.layers.unicast import Unicast
from groupcomm.layers.wire import (
    DataFrame,
    DirectFrame,
    JoinFrame,
    LeaveFrame,
    MalformedFrame,
    P2PRequestFrame,
    ReplyFrame,
    RequestFrame,
    StateChunkFrame,
    StateDoneFrame,
    StateReqFrame,
    SyncFrame,
)

EXAMPLES = [
    JoinFrame("web"),
    LeaveFrame("web"),
    SyncFrame((3, 8), [("a", True), ("b", False), ("c", False)], (3, 4), True, 4, [("a", (3, 4)), ("b", (0, 0))], ["c"]),
    DataFrame("web", b"\x00payload"),
    StateReqFrame("web"),
    StateDoneFrame("web"),
    RequestFrame("", 7, b"q"),
    StateChunkFrame("web", (3, 8, -2), 0, True, None),
    ReplyFrame(7, True, b"v", None),
    P2PRequestFrame("", 2**64 - 1, b"q"),
    DirectFrame(b"hello"),
]


def decode(frame_bytes: bytes):
    """Whichever decoder the frame's channel uses."""
    op = msgpack.unpackb(frame_bytes)[0]
    return wire.decode_ring(frame_bytes) if op < wire.STATE_CHUNK else wire.decode_unicast(frame_bytes)


def test_every_frame_kind_has_an_example() -> None:
    assert {type(f) for f in EXAMPLES} == set(wire.RING_FRAMES) | set(wire.UNICAST_FRAMES)


@pytest.mark.parametrize("frame", EXAMPLES, ids=lambda f: type(f).__name__)
def test_every_frame_round_trips(frame) -> None:
    assert decode(wire.encode(frame)) == frame


def test_the_wire_format_is_the_msgpack_array_op_then_fields() -> None:
    """The same bytes the layers sent before the wire module existed."""
    packb = packed
    assert wire.encode(JoinFrame("web")) == packb(1, "web")
    assert wire.encode(DataFrame("web", b"x")) == packb(4, "web", b"x")
    assert wire.encode(RequestFrame("s", 3, b"x")) == packb(7, "s", 3, b"x")
    assert wire.encode(SyncFrame((1, 4), [("a", True), ("b", False)], (0, 0), False, -1, [("a", (1, 0))], ["b"])) == packb(
        3, [1, 4], [["a", True], ["b", False]], [0, 0], False, -1, [["a", [1, 0]]], ["b"], [])
    assert wire.encode(SyncFrame((1, 4), [("a", True)], (0, 0), False, -1, [], [], [("a", 2)])) == packb(
        3, [1, 4], [["a", True]], [0, 0], False, -1, [], [], [["a", 2]])
    assert wire.encode(StateChunkFrame("s", (1, 4, 2), 1, False, b"c")) == packb(16, "s", [1, 4, 2], 1, False, b"c")
    assert wire.encode(ReplyFrame(9, False, None, "E: no")) == packb(17, 9, False, None, "E: no")
    assert wire.encode(P2PRequestFrame("s", 9, b"x")) == packb(18, "s", 9, b"x")
    assert wire.encode(DirectFrame(b"x")) == packb(19, b"x")


def packed(*items) -> bytes:
    return msgpack.packb(list(items), use_bin_type=True)


def test_a_sync_of_an_earlier_release_has_no_epochs() -> None:
    """SYNC's last two fields (each space's epoch, the spaces waited for) came later: a frame
    without them claims neither."""
    old = packed(3, [1, 4], [["a", True]], [0, 0], False, -1)
    assert wire.decode_ring(old) == SyncFrame((1, 4), [("a", True)], (0, 0), False, -1, [], [], [])
    assert wire.decode_ring(packed(3, [1, 4], [["a", True]], [0, 0], False, -1, [["a", [1, 4]]])) == SyncFrame(
        (1, 4), [("a", True)], (0, 0), False, -1, [("a", (1, 4))], [])


def test_a_sync_claims_seniority_only_for_claimed_spaces_once() -> None:
    for bad in (packed(3, [1, 4], [["a", True]], [0, 0], False, -1, [], [], [["b", 0]]),
                packed(3, [1, 4], [["a", True]], [0, 0], False, -1, [], [], [["a", 0], ["a", 1]]),
                packed(3, [1, 4], [["a", True]], [0, 0], False, -1, [], [], [["a", -1]])):
        with pytest.raises(wire.MalformedFrame):
            wire.decode_ring(bad)


def test_payloads_are_bytes() -> None:
    for frame in (DataFrame("s", b"p"), RequestFrame("", 1, b"p"), P2PRequestFrame("", 1, b"p"), DirectFrame(b"p")):
        assert type(decode(wire.encode(frame)).payload) is bytes
    assert type(decode(wire.encode(ReplyFrame(1, True, b"v", None))).value) is bytes
    assert type(decode(wire.encode(StateChunkFrame("s", (1, 1, 1), 0, True, b"c"))).chunk) is bytes


NAME_255 = "é" * 127 + "x"          # 255 UTF-8 bytes in 128 characters
NAME_256 = "é" * 128                 # 256 UTF-8 bytes in 128 characters: under the character bound


BAD_RING = {
    "empty array": packed(),
    "not an array": msgpack.packb(5),
    "unknown op": packed(9, "s"),
    "unicast op on the ring": packed(19, b"x"),
    "op is a bool": packed(True, "s"),
    "op is a str": packed("1", "s"),
    "JOIN without a space": packed(1),
    "JOIN naming an integer space": packed(1, 5),
    "JOIN naming a list": packed(1, ["s"]),
    "JOIN of the empty space": packed(1, ""),
    "JOIN of a 256-byte name": packed(1, "x" * 256),
    "JOIN of 256 UTF-8 bytes in 128 characters": packed(1, NAME_256),
    "JOIN with an extra field": packed(1, "s", 1),
    "LEAVE naming bytes": packed(2, b"s"),
    "DATA with a str payload": packed(4, "s", "payload"),
    "DATA with an int payload": packed(4, "s", 5),
    "DATA with a nil payload": packed(4, "s", None),
    "DATA without a payload": packed(4, "s"),
    "DATA of the empty space": packed(4, "", b"x"),
    "REQUEST with a negative id": packed(7, "", -1, b"x"),
    "REQUEST with a float id": packed(7, "", 1.0, b"x"),
    "REQUEST with a str payload": packed(7, "", 1, "x"),
    "SYNC claiming a space twice": packed(3, [1, 4], [["a", True], ["a", False]], [0, 0], False, -1),
    "SYNC with a ring id of three": packed(3, [1, 4, 0], [], [0, 0], False, -1),
    "SYNC with an int for a bool": packed(3, [1, 4], [["a", 1]], [0, 0], False, -1),
    "SYNC with an epoch for a space it does not claim": packed(3, [1, 4], [["a", True]], [0, 0], False, -1,
                                                              [["b", [1, 4]]]),
    "SYNC with two epochs for a space": packed(3, [1, 4], [["a", True]], [0, 0], False, -1,
                                               [["a", [1, 4]], ["a", [1, 0]]]),
    "SYNC with an epoch of one int": packed(3, [1, 4], [["a", True]], [0, 0], False, -1, [["a", 4]]),
    "SYNC waiting for a space it does not claim": packed(3, [1, 4], [["a", False]], [0, 0], False, -1, [], ["b"]),
    "SYNC with an epoch for a space it waits for": packed(3, [1, 4], [["a", False]], [0, 0], False, -1,
                                                         [["a", [1, 4]]], ["a"]),
    "SYNC with a field after the spaces waited for": packed(3, [1, 4], [], [0, 0], False, -1, [], [], 0),
    "STATE_DONE naming nil": packed(6, None),
    "trailing bytes": packed(1, "s") + b"\x00",
    "truncated": packed(4, "s", b"xyz")[:-1],
    "bad msgpack": b"\xc1",
    "nothing": b"",
    "invalid UTF-8 in a name": b"\x92\x01\xa1\xff",
    "an ext type": b"\x92\x01" + msgpack.packb(msgpack.ExtType(1, b"s")),
}

BAD_UNICAST = {
    "DIRECT without a payload": packed(19),
    "DIRECT with a str payload": packed(19, "x"),
    "DIRECT with a list payload": packed(19, [b"x"]),
    "P2P request without a scope": packed(18),
    "P2P request with an integer scope": packed(18, 5, 1, b"x"),
    "P2P request with a nil scope": packed(18, None, 1, b"x"),
    "P2P request with a 256-byte scope": packed(18, "x" * 256, 1, b"x"),
    "P2P request with a str payload": packed(18, "", 1, "x"),
    "REPLY ok without a value": packed(17, 1, True, None, None),
    "REPLY ok with an error": packed(17, 1, True, b"v", "E"),
    "REPLY error without a message": packed(17, 1, False, None, None),
    "REPLY with a str value": packed(17, 1, True, "v", None),
    "REPLY with an int for ok": packed(17, 1, 1, b"v", None),
    "STATE_CHUNK with a point of two": packed(16, "s", [1, 2], 0, True, b""),
    "STATE_CHUNK with a negative index": packed(16, "s", [1, 2, 3], -1, True, b""),
    "STATE_CHUNK 'no state' after a first chunk": packed(16, "s", [1, 2, 3], 1, True, None),
    "STATE_CHUNK with a str chunk": packed(16, "s", [1, 2, 3], 0, True, "c"),
    "ring op over unicast": packed(4, "s", b"x"),
}


@pytest.mark.parametrize("data", BAD_RING.values(), ids=BAD_RING.keys())
def test_bad_ring_frames_are_refused(data: bytes) -> None:
    with pytest.raises(MalformedFrame):
        wire.decode_ring(data)


@pytest.mark.parametrize("data", BAD_UNICAST.values(), ids=BAD_UNICAST.keys())
def test_bad_unicast_frames_are_refused(data: bytes) -> None:
    with pytest.raises(MalformedFrame):
        wire.decode_unicast(data)


def test_space_names_are_bounded_in_utf8_bytes_and_the_channel_scope_is_for_requests_only() -> None:
    assert wire.decode_ring(packed(1, NAME_255)) == JoinFrame(NAME_255)
    assert wire.decode_ring(packed(1, "x" * 255)) == JoinFrame("x" * 255)
    assert wire.decode_ring(packed(7, "", 1, b"")) == RequestFrame("", 1, b"")
    assert wire.decode_unicast(packed(18, "", 1, b"")) == P2PRequestFrame("", 1, b"")
    wire.check_space_name(NAME_255)
    for bad in ("", NAME_256, 5, None, "\udc80"):
        with pytest.raises(ValueError, match="space name"):
            wire.check_space_name(bad)


def test_the_space_layer_counts_and_drops_what_it_cannot_decode() -> None:
    layer = SpaceLayer(1)
    layer.view(View((1, 2), RingId(1, 4), False))
    layer.take()                                          # its SYNC after the first view
    for data in BAD_RING.values():
        assert layer.deliver(2, data, False) is None
    assert layer.dropped == len(BAD_RING) and layer.take() == []
    assert layer.deliver(1, wire.encode(JoinFrame("s")), False) == JoinFrame("s")
    assert layer.dropped == len(BAD_RING)


# ---------------------------------------------------------------------------
# Datagrams: the drivers' offsets, and the C core agrees
# ---------------------------------------------------------------------------

SOURCE = Path(groupcomm.__file__).parent


def c_define(path: Path, name: str) -> int:
    match = re.search(rf"#define {name} (0x[0-9a-fA-F]+|\d+)u?\b", path.read_text())
    assert match, f"{name} not in {path.name}"
    return int(match.group(1), 0)


def test_the_c_sources_agree_with_the_wire_module() -> None:
    ring, pump = SOURCE / "_ring.c", SOURCE / "_pump.c"
    assert c_define(ring, "WIRE_MAGIC").to_bytes(2, "big") == wire.RING_MAGIC
    assert re.search(r"GC_WIRE_VERSION = (\d+)", (SOURCE / "_ring.h").read_text()).group(1) == str(wire.PROTOCOL_VERSION)
    assert c_define(SOURCE / "_seal.h", "GC_SEAL_VERSION") == wire.PROTOCOL_VERSION   # sealed datagrams too
    assert c_define(ring, "HDR_LEN") == c_define(pump, "HDR_LEN") == wire.HEADER_SIZE
    assert c_define(pump, "TYPE_TOKEN") == wire.RING_TOKEN
    assert re.search(r"MSG_TOKEN = (\d+)", ring.read_text()).group(1) == str(wire.RING_TOKEN)


def test_packets_of_a_real_ring_parse_with_the_wire_layout() -> None:
    config = RingConfig(cluster_id=77)
    rings = {n: Ring(n, config) for n in (1, 2)}
    now, seen = 0, []
    for r in rings.values():
        r.start(now)
    for _ in range(400):
        now += 1000
        for node, r in rings.items():
            r.tick(now)
            for out in r.take():
                if type(out) is SendToAll:
                    dests = [d for d in rings if d != node]
                elif type(out) is SendTo:
                    dests = [out.node]
                else:
                    continue
                seen.append((node, type(out), out.packet))
                for dest in dests:
                    rings[dest].receive(now, out.packet)
    assert rings[1].members == (1, 2)
    for node, _, packet in seen:
        magic, version, _, cluster, sender = wire.HEADER.unpack_from(packet)
        assert (magic, version, cluster) == (wire.RING_MAGIC, wire.PROTOCOL_VERSION, 77)
        assert sender == wire.datagram_sender(packet) == node
        assert wire.datagram_version(packet) == wire.PROTOCOL_VERSION
    tokens = [kind for _, kind, packet in seen if wire.is_token(packet)]
    assert tokens and set(tokens) == {SendTo}          # a token goes to the next member only
    assert any(kind is SendToAll for _, kind, packet in seen if not wire.is_token(packet))


def test_datagram_helpers_on_short_and_foreign_data() -> None:
    assert wire.datagram_sender(b"GC\x01\x01") is None
    assert wire.datagram_version(b"GC") is None
    assert not wire.is_token(b"GC\x01") and not wire.is_token(b"GF\x01\x01") and wire.is_token(b"GC\x01\x01")


# ---------------------------------------------------------------------------
# Another protocol version: counted, dropped, logged once per (layer, peer, version)
# ---------------------------------------------------------------------------


def other_version(packet: bytes, version: int = wire.PROTOCOL_VERSION + 1) -> bytes:
    return packet[:2] + bytes([version]) + packet[3:]


def version_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "groupcomm.wire"]


def test_fd_drops_and_logs_once_packets_of_another_version(caplog) -> None:
    caplog.set_level(logging.WARNING, "groupcomm.wire")
    fd = FailureDetector(1, 7, FdConfig())
    ping = FailureDetector(2, 7, FdConfig()).packet(wire.FD_PING)
    for _ in range(5):
        assert fd.receive(other_version(ping), 0) is None
    assert fd.receive(other_version(ping, 9) + b"longer", 0) is None
    assert fd.drops == {"version": 6}
    assert len(version_warnings(caplog)) == 2 and "from 2" in version_warnings(caplog)[0]
    assert fd.receive(ping, 0) == 2                       # this version is still answered


def test_unicast_drops_and_logs_once_packets_of_another_version(caplog) -> None:
    caplog.set_level(logging.WARNING, "groupcomm.wire")
    a, b = Unicast(1, 7), Unicast(2, 7)
    a.set_members((1, 2), 0)
    b.set_members((1, 2), 0)
    a.send(0, 2, b"hi")
    packet = a.take()[0].packet
    for _ in range(4):
        b.receive(0, other_version(packet))
    b.receive(0, other_version(packet)[:5])              # shorter than any header: still "version"
    assert b.drops == {"version": 5} and b.take() == []
    assert len(version_warnings(caplog)) == 2              # sender 1, and sender unknown (too short)
    b.receive(0, packet)
    assert [type(o).__name__ for o in b.take()][-1] == "UnicastMessage"


def test_the_member_logs_ring_packets_of_another_version_once_the_ring_counts_them(caplog) -> None:
    caplog.set_level(logging.WARNING, "groupcomm.wire")
    member = Member(1, RingConfig(cluster_id=7))
    member.start(0)
    stranger = Ring(2, RingConfig(cluster_id=7))
    stranger.start(0)
    packets = [o.packet for o in stranger.take() if type(o) in (SendTo, SendToAll)]
    assert packets
    for _ in range(3):
        for packet in packets:
            member.receive(1000, other_version(packet, 3))
    assert member.ring.stats()["drop_bad_version"] == 3 * len(packets)
    warnings = version_warnings(caplog)
    assert len(warnings) == 1 and "ring datagrams of protocol version 3 from 2" in warnings[0]
    member.wrong_version("probe", ("127.0.0.1", 5000), 3)
    member.wrong_version("probe", ("127.0.0.1", 5000), 3)
    assert member.dropped_frames["probe"] == 2 and len(version_warnings(caplog)) == 2


def test_the_log_is_bounded() -> None:
    log = wire.VersionLog(1, limit=3)
    with pytest.MonkeyPatch.context() as mp:
        calls = []
        mp.setattr(wire.logger, "warning", lambda *args: calls.append(args))
        for peer in range(10):
            log("fd", peer, 2)
            log("fd", peer, 2)
    assert len(calls) == 3
