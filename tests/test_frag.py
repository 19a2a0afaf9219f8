"""Fragmentation: messages split to fit the ring, reassembled inside one configuration."""

from __future__ import annotations

import pytest

from groupcomm.errors import PayloadTooLarge
from groupcomm.events import Message
from groupcomm.layers.frag import Fragmenter


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
