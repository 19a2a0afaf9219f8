"""Fragmentation: messages split to fit the ring, reassembled inside one configuration."""

from __future__ import annotations

import pytest

from groupcomm.errors import ConfigError, PayloadTooLarge
from groupcomm.events import Message
from groupcomm.layers.frag import FragConfig, Fragmenter
from groupcomm.layers.wire import FRAG_HEADER


def pair(limit: int = 64) -> tuple[Fragmenter, Fragmenter]:
    return Fragmenter(1, limit, 1 << 20), Fragmenter(2, limit, 1 << 20)


def deliver_all(f: Fragmenter, sender: int, packets: list[bytes], safe: bool = False) -> list[Message]:
    out = []
    for p in packets:
        whole = f.deliver(sender, p, safe)
        if whole is not None:
            payload, kind = whole
            assert kind == 0
            out.append(Message(sender, payload, safe))
    return out


def test_small_messages_travel_whole_and_large_ones_reassemble():
    a, b = pair()
    assert a.split(b"hi", False) is None                 # fits: sent as is, no header, no copy
    assert a.split(b"x" * 64, False) is None
    big = bytes(range(256)) * 3
    packets = a.split(big, True)
    assert len(packets) > 1 and all(len(p) <= 64 for p in packets)
    assert deliver_all(b, 1, packets, True) == [Message(1, big, True)]
    assert deliver_all(a, 1, packets, True) == [Message(1, big, True)]     # the sender's own copy
    assert a.take_resends() == []


def test_the_kind_of_a_fragmented_message_survives_reassembly():
    a, b = pair()
    packets = a.split(b"k" * 300, False, 9)
    got = [w for p in packets if (w := b.deliver(1, p, False)) is not None]
    assert got == [(b"k" * 300, 9)]


def test_over_the_cap_is_a_clear_error():
    f = Fragmenter(1, 64, 1000)
    with pytest.raises(PayloadTooLarge, match="1001 bytes is over the limit of 1000"):
        f.split(b"x" * 1001, False)


def test_a_view_change_mid_message_drops_it_everywhere_and_the_sender_resends_once():
    a, b = pair()
    big = b"y" * 500
    packets = a.split(big, False)
    half = len(packets) // 2
    for f in (a, b):
        assert deliver_all(f, 1, packets[:half]) == []
        f.view()                                   # regular view: partial messages are dropped
        assert deliver_all(f, 1, packets[half:]) == []   # the tail alone is never delivered
    resend = a.take_resends()
    assert resend == [(big, False, 0)]
    assert a.take_resends() == []
    again = a.split(*resend[0])
    assert deliver_all(b, 1, again) == [Message(1, big, False)]
    assert deliver_all(a, 1, again) == [Message(1, big, False)]
    assert a.take_resends() == []


def test_a_message_wholly_after_the_view_change_is_not_resent():
    a, b = pair()
    packets = a.split(b"z" * 300, False)
    for f in (a, b):
        f.view()                                   # the view came before any fragment was delivered
    assert deliver_all(b, 1, packets) == [Message(1, b"z" * 300, False)]
    assert deliver_all(a, 1, packets) == [Message(1, b"z" * 300, False)]
    assert a.take_resends() == []


def test_interleaved_senders_and_messages_reassemble_independently():
    a, b = pair()
    c = Fragmenter(3, 64, 1 << 20)
    pa, pc = a.split(b"A" * 200, False), c.split(b"C" * 200, True)
    order = [p for pair_ in zip(pa, pc) for p in pair_]
    got = []
    for i, p in enumerate(order):
        sender = 1 if i % 2 == 0 else 3
        whole = b.deliver(sender, p, i % 2 == 1)
        if whole:
            got.append((sender, whole[0]))
    assert sorted(got) == [(1, b"A" * 200), (3, b"C" * 200)]


@pytest.mark.parametrize("junk", [b"", b"abc", bytes(12), bytes([0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 2, 0])])
def test_malformed_fragments_are_dropped_and_counted(junk):
    _, b = pair()
    assert b.deliver(1, junk, False) is None
    assert b.dropped == 1


def test_fragments_out_of_order_never_make_a_wrong_message():
    # Per-sender FIFO delivers a message's fragments in order; if a fragment ever
    # came out of place the message must be dropped (and counted), never reassembled
    # with its parts in the wrong order.
    a, b = pair()
    big = bytes(range(256)) * 2
    packets = list(a.split(big, False))
    assert len(packets) >= 3
    swapped = [packets[1], packets[0], *packets[2:]]
    dropped = b.dropped
    assert deliver_all(b, 1, swapped) == []
    assert b.dropped > dropped
    assert deliver_all(b, 1, list(a.split(big, False))) == [Message(1, big, False)]   # the next one is fine


# -- limits and bookkeeping (each found by mutation testing: tests/mutation.py) ------------


def test_fragments_out_of_place_in_any_position_drop_the_message():
    # A later fragment before an earlier one (not just the head) also drops the message.
    a, b = pair()
    big = bytes(range(256)) * 2
    packets = list(a.split(big, False))
    assert len(packets) >= 4
    shuffled = [packets[0], packets[2], packets[1], *packets[3:]]
    assert deliver_all(b, 1, shuffled) == []
    assert b.partial == 0


def test_a_tail_that_names_another_count_or_kind_drops_the_message():
    a, b = pair()
    packets = list(a.split(b"q" * 300, False, 4))
    head, second = packets[0], bytearray(packets[1])
    msg_id, index, count, kind = FRAG_HEADER.unpack_from(second)
    for bad in (FRAG_HEADER.pack(msg_id, index, count + 1, kind), FRAG_HEADER.pack(msg_id, index, count, kind + 1)):
        dropped = b.dropped
        assert b.deliver(1, head, False) is None
        assert b.deliver(1, bad + bytes(second[FRAG_HEADER.size:]), False) is None
        assert b.dropped == dropped + 1 and b.partial == 0
        assert deliver_all(b, 1, packets[2:]) == []


def test_a_message_of_exactly_max_message_bytes_is_reassembled():
    limit = 1000
    a, b = Fragmenter(1, 64, limit), Fragmenter(2, 64, limit)
    payload = bytes(range(250)) * 4
    a.check(limit)                                       # no error at the limit
    assert deliver_all(b, 1, list(a.split(payload, False))) == [Message(1, payload, False)]
    assert b.refused == 0 and b.partial == 0


def test_a_message_one_byte_over_max_message_is_refused_at_its_first_fragment():
    sender = Fragmenter(1, 50 + FRAG_HEADER.size, 1 << 20)         # chunks of 50 bytes
    receiver = Fragmenter(2, 50 + FRAG_HEADER.size, 1000)
    packets = list(sender.split(b"o" * 1001, False))                 # 21 fragments: 20 x 50 + 1
    assert receiver.deliver(1, packets[0], False) is None
    assert receiver.refused == 1 and receiver.partial == 0           # before any more arrives
    assert deliver_all(receiver, 1, packets[1:]) == []


def test_a_message_that_outgrows_its_declared_size_is_refused_whatever_partial_bytes_allows():
    receiver = Fragmenter(2, 1 << 16, 1000, partial_bytes=1 << 20)
    first = FRAG_HEADER.pack(5, 0, 2, 0) + b"a" * 100                  # declares at most 200 bytes
    second = FRAG_HEADER.pack(5, 1, 2, 0) + b"b" * 2000
    assert receiver.deliver(1, first, False) is None
    assert receiver.deliver(1, second, False) is None
    assert receiver.refused == 1 and receiver.partial == 0
    assert receiver.dropped == 2                              # the fragment it held and the one refused


def test_a_message_of_one_fragment_is_delivered_up_to_max_message():
    receiver = Fragmenter(2, 1 << 16, 100)
    assert receiver.deliver(1, FRAG_HEADER.pack(9, 0, 1, 3) + b"x" * 100, False) == (b"x" * 100, 3)
    assert receiver.deliver(1, FRAG_HEADER.pack(10, 0, 1, 3) + b"x" * 101, False) is None
    assert receiver.refused == 1


def test_completed_messages_free_their_reassembly_slots_and_bytes():
    a, b = pair()
    b1 = Fragmenter(2, 64, 1 << 20, partial_messages=1)
    for k in range(5):
        payload = bytes([k]) * 400
        packets = list(a.split(payload, False))
        assert deliver_all(b, 1, packets) == [Message(1, payload, False)]
        assert deliver_all(b1, 1, packets) == [Message(1, payload, False)]
    for f in (b, b1):
        assert f.partial == 0 and f.refused == 0 and f.dropped == 0


def test_a_restarted_sender_reusing_a_message_id_replaces_its_old_partial_message():
    old, b = pair()
    first = list(old.split(b"A" * 300, False))
    assert deliver_all(b, 1, first[:2]) == []              # the sender restarts mid-message
    new = Fragmenter(1, 64, 1 << 20)
    again = list(new.split(b"B" * 300, False))              # the same msg id from its new life
    assert deliver_all(b, 1, again) == [Message(1, b"B" * 300, False)]
    assert b.partial == 0 and b.dropped == 1


def test_malformed_fragments_are_each_counted():
    _, b = pair()
    for junk in (b"", b"ab", b"abc"):
        assert b.deliver(1, junk, False) is None
    assert b.dropped == 3


def test_own_messages_are_in_flight_until_delivered_or_cut():
    a, _ = pair()
    packets = list(a.split(b"m" * 300, True))
    msg_id = a.last_id
    assert a.in_flight(msg_id)
    deliver_all(a, 1, packets, True)
    assert not a.in_flight(msg_id)
    more = list(a.split(b"n" * 300, False))
    deliver_all(a, 1, more[:1])
    a.view()                                                # cut: it is to be re-sent, not in flight
    assert not a.in_flight(a.last_id) and a.take_resends() == [(b"n" * 300, False, 0)]
    other = Fragmenter(2, 64, 1 << 20)
    other.split(b"o" * 300, False)
    deliver_all(other, 1, packets, True)                    # someone else's message with that id
    assert other.in_flight(other.last_id)


def test_fragments_carry_the_safe_flag_and_index_like_a_sequence():
    a, _ = pair()
    cut = a.split(b"s" * 300, True)
    assert cut.safe is True and a.split(b"s" * 300, False).safe is False
    assert cut[-1] == cut[len(cut) - 1] and cut[-len(cut)] == cut[0]
    assert cut[1:3] == [cut[1], cut[2]]
    for bad in (len(cut), -len(cut) - 1):
        with pytest.raises(IndexError, match="fragment index out of range"):
            cut[bad]


def test_the_fragmenter_defaults_and_limits():
    f = Fragmenter(1, FRAG_HEADER.size + 1, 1000)
    assert (f.partial_messages, f.partial_bytes) == (FragConfig().partial_messages, 1000)
    assert Fragmenter(1, 64, 1000, partial_bytes=5000).partial_bytes == 5000
    assert Fragmenter(1, 64, 1000, partial_bytes=10).partial_bytes == 1000     # never below max_message
    with pytest.raises(ValueError, match="ring payload limit too small for fragment headers"):
        Fragmenter(1, FRAG_HEADER.size, 1000)


def test_frag_config_accepts_its_smallest_values_and_names_what_is_wrong():
    FragConfig(fragments_ahead=1, max_message=1, partial_messages=1, partial_bytes=1)
    assert FragConfig(max_message=10, partial_bytes=10).reassembly_bytes == 10
    assert FragConfig(max_message=10).reassembly_bytes == 10
    for kwargs, text in [
        ({"fragments_ahead": 0}, "FRAG: fragments_ahead must be at least 1"),
        ({"max_message": 0}, "FRAG: max_message must be at least 1 byte"),
        ({"partial_messages": 0}, "FRAG: partial_messages must be at least 1"),
        ({"max_message": 10, "partial_bytes": 9}, (r"FRAG: partial_bytes must be at least max_message \(or a message "
                                                   r"of max_message bytes could never be reassembled\)")),
    ]:
        with pytest.raises(ConfigError, match=f"^{text}$"):
            FragConfig(**kwargs)


def test_the_size_error_says_which_limit():
    f = Fragmenter(1, 64, 1000)
    with pytest.raises(PayloadTooLarge, match=r"\(FRAG max_message\); send it in parts or raise the limit$"):
        f.check(1001)


def test_partial_messages_of_one_sender_are_accounted_apart():
    sender = Fragmenter(1, 64, 1 << 20)
    receiver = Fragmenter(2, 64, 1 << 20)
    first = list(sender.split(b"A" * 300, False))
    second = list(sender.split(b"B" * 300, False))
    receiver.deliver(1, first[0], False)
    receiver.deliver(1, second[0], False)                   # two partial messages from sender 1
    held = receiver.partial
    assert deliver_all(receiver, 1, first[1:]) == [Message(1, b"A" * 300, False)]
    assert receiver.partial == held - (len(first[0]) - FRAG_HEADER.size)    # only B's first fragment left


def test_our_own_message_refused_by_our_reassembly_is_not_in_flight_nor_resent():
    me = Fragmenter(1, 64, 1 << 20, partial_messages=1)
    first = list(me.split(b"A" * 300, False))
    first_id = me.last_id
    second = list(me.split(b"B" * 300, False))
    me.deliver(1, first[0], False)
    me.deliver(1, second[0], False)                          # past partial_messages: the first is refused
    assert me.refused == 1 and not me.in_flight(first_id) and me.in_flight(me.last_id)
    me.view()
    assert me.take_resends() == [(b"B" * 300, False, 0)]
