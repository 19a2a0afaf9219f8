"""The seal (groupcomm/_seal.c): authenticated encryption of every datagram, replay protection.

The format is checked against an independent implementation built from
``cryptography`` (HKDF-SHA256, AES-256-GCM): what we seal it opens, what it
seals we open, so the construction is the documented one and not only
self-consistent.
"""

from __future__ import annotations

import os
import struct

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from hypothesis import given, strategies as st

from groupcomm.config.keys import KeyFile, new_key_file, read_key_file, write_key_file
from groupcomm.core.seal import DROP_REASONS, OVERHEAD, CryptoConfig, Seal
from groupcomm.errors import ConfigError

CLUSTER = 0x1234_5678
HEADER = struct.Struct(">2sBBIQQI")
VERSION = 2


def inner(sender: int, body: bytes = b"payload") -> bytes:
    """A ring-like datagram naming ``sender`` where every ring/FD/UNICAST header does."""
    return b"GC" + bytes([VERSION, 0]) + CLUSTER.to_bytes(4, "big") + sender.to_bytes(4, "big") + body


def reference_subkey(key: bytes, sender: int, incarnation: int, epoch: int) -> bytes:
    info = struct.pack(">IIQQ", CLUSTER, sender, incarnation, epoch)
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=b"groupcomm-seal-v2", info=info).derive(key)


def reference_seal(key: bytes, key_id: int, sender: int, incarnation: int, counter: int, plain: bytes,
                   *, auth_only: bool = False, to: int = 0) -> bytes:
    head = HEADER.pack(b"GS", VERSION, key_id | (0x80 if auth_only else 0), sender, incarnation, counter, to)
    aead = AESGCM(reference_subkey(key, sender, incarnation, counter >> 24))
    nonce = bytes(4) + counter.to_bytes(8, "big")
    if auth_only:
        return head + plain + aead.encrypt(nonce, b"", head + plain)
    return head + aead.encrypt(nonce, plain, head)


def reference_open(key: bytes, datagram: bytes) -> bytes:
    magic, version, key_byte, sender, incarnation, counter, to = HEADER.unpack_from(datagram)
    assert (magic, version) == (b"GS", VERSION)
    aead = AESGCM(reference_subkey(key, sender, incarnation, counter >> 24))
    nonce = bytes(4) + counter.to_bytes(8, "big")
    head = datagram[:HEADER.size]
    if key_byte & 0x80:
        plain = datagram[HEADER.size:-16]
        aead.decrypt(nonce, datagram[-16:], head + plain)
        return plain
    return aead.decrypt(nonce, datagram[HEADER.size:], head)


@pytest.fixture
def keys() -> KeyFile:
    return new_key_file()


def pair(keys: KeyFile, **kw) -> tuple[Seal, Seal]:
    return Seal(CLUSTER, 1, 1000, keys, **kw), Seal(CLUSTER, 2, 2000, keys, **kw)


def drops(seal: Seal) -> dict[str, int]:
    return {k: v for k, v in seal.stats().items() if k.startswith("drop_") and v}


def test_a_sealed_datagram_is_what_the_reference_implementation_opens(keys):
    a, _ = pair(keys)
    plain = inner(1, b"x" * 300)
    sealed = a.seal(plain)
    assert len(sealed) == len(plain) + OVERHEAD
    assert plain[12:] not in sealed                 # encrypted, not merely signed
    assert reference_open(keys.keys[1], sealed) == plain
    assert HEADER.unpack_from(sealed)[3:] == (1, 1000, 1, 0)
    assert HEADER.unpack_from(a.seal(plain, to=2))[3:] == (1, 1000, 2, 2)


def test_a_reference_datagram_opens_even_in_a_later_epoch(keys):
    _, b = pair(keys)
    for counter in (1, 7, (1 << 24) + 3, (5 << 24)):     # epochs 0, 0, 1, 5: each its own subkey
        plain = inner(1, counter.to_bytes(8, "big"))
        assert b.open(reference_seal(keys.keys[1], 1, 1, 1000, counter, plain)) == plain
    assert b.stats()["derivations"] == 3


def test_auth_only_leaves_the_payload_readable_but_authenticated(keys):
    a, b = pair(keys, auth_only=True)
    plain = inner(1, b"in clear")
    sealed = a.seal(plain)
    assert plain in sealed
    assert reference_open(keys.keys[1], sealed) == plain
    assert b.open(sealed) == plain
    forged = a.seal(plain).replace(b"in clear", b"in CLEAR")
    assert b.open(forged) < 0 and drops(b) == {"drop_auth": 1}


@given(position=st.integers(0, OVERHEAD + 25 - 1), flip=st.integers(1, 255))
def test_any_changed_byte_is_refused(position, flip):
    keys = KeyFile({1: bytes(range(32))}, 1)
    a, b = pair(keys)
    sealed = bytearray(a.seal(inner(1, b"0123456789abc")))
    sealed[position] ^= flip
    assert b.open(bytes(sealed)) < 0
    assert b.stats()["opened"] == 0 and b.stats()["peers"] == 0     # nothing learnt from it


def test_replays_are_refused_and_reordering_within_the_window_is_not(keys):
    a, b = pair(keys)
    plain = [inner(1, i.to_bytes(2, "big")) for i in range(1100)]
    sealed = [a.seal(p) for p in plain]
    assert b.open(sealed[5]) == plain[5]
    assert b.open(sealed[5]) == DROP_REASONS_CODE["replay"]
    assert b.open(sealed[3]) == plain[3]                         # late, but new: accepted once
    assert b.open(sealed[3]) == DROP_REASONS_CODE["replay"]
    assert b.open(sealed[1099]) == plain[1099]                   # jumps ahead
    assert b.open(sealed[4]) == DROP_REASONS_CODE["replay"]      # now below the 1024-counter window
    assert b.open(sealed[1000]) == plain[1000]
    assert drops(b) == {"drop_replay": 3}


DROP_REASONS_CODE = {name: code for code, name in DROP_REASONS.items()}


def test_an_older_incarnation_is_refused_once_a_newer_one_spoke(keys):
    old = Seal(CLUSTER, 1, 1000, keys)
    captured = old.seal(inner(1, b"leave"))
    new = Seal(CLUSTER, 1, 1001, keys)
    b = Seal(CLUSTER, 2, 5, keys)
    assert b.open(new.seal(inner(1))) == inner(1)
    assert b.open(captured) == DROP_REASONS_CODE["stale"]


def test_what_was_heard_survives_a_restart_of_the_receiver(keys):
    old, new = Seal(CLUSTER, 1, 1000, keys), Seal(CLUSTER, 1, 1001, keys)
    captured = old.seal(inner(1))
    b = Seal(CLUSTER, 2, 5, keys)
    b.open(new.seal(inner(1)))
    remembered = b.incarnations()
    assert remembered == {1: 1001}
    restarted = Seal(CLUSTER, 2, 6, keys)
    restarted.remember(remembered)
    assert restarted.open(captured) == DROP_REASONS_CODE["stale"]
    assert restarted.open(new.seal(inner(1))) == inner(1)


def test_another_key_another_cluster_or_no_seal_is_refused(keys):
    a, b = pair(keys)
    stranger = Seal(CLUSTER, 1, 1000, new_key_file())            # same key id 1, another key
    assert b.open(stranger.seal(inner(1))) == DROP_REASONS_CODE["auth"]
    other_cluster = Seal(CLUSTER + 1, 1, 1000, keys)
    assert b.open(other_cluster.seal(inner(1))) == DROP_REASONS_CODE["auth"]
    assert b.open(inner(1)) == DROP_REASONS_CODE["unsealed"]
    assert b.open(b"GS") == DROP_REASONS_CODE["short"]
    other_id = Seal(CLUSTER, 1, 1000, KeyFile({9: keys.keys[1]}, 9))
    assert b.open(other_id.seal(inner(1))) == DROP_REASONS_CODE["key"]
    assert b.stats()["peers"] == 0


def test_own_datagrams_and_a_sender_named_falsely_inside_are_dropped(keys):
    a, b = pair(keys)
    assert a.open(a.seal(inner(1))) == DROP_REASONS_CODE["self"]
    assert b.open(a.seal(inner(3))) == DROP_REASONS_CODE["sender"]


def test_a_datagram_sealed_for_one_member_opens_nowhere_else(keys):
    a, b = pair(keys)
    c = Seal(CLUSTER, 3, 3000, keys)
    token = a.seal(inner(1, b"token"), to=2)
    assert c.open(token) == DROP_REASONS_CODE["misdirected"]     # a replay to another member
    assert b.open(token) == inner(1, b"token")
    assert c.open(reference_seal(keys.keys[1], 1, 1, 1000, 9, inner(1), to=2)) == DROP_REASONS_CODE["misdirected"]


def test_only_the_newest_datagram_of_a_sender_may_move_its_address(keys):
    a, b = pair(keys)
    first, second, third = (a.seal(inner(1, bytes([i]))) for i in range(3))
    assert b.open(second) == inner(1, b"\x01") and b.newest
    assert b.open(first) == inner(1, b"\x00") and not b.newest       # late (reordered, or replayed elsewhere)
    assert b.open(third) == inner(1, b"\x02") and b.newest and b.sender == 1


def test_the_nodelist_admits_only_its_members(keys):
    a = Seal(CLUSTER, 1, 1000, keys)
    c = Seal(CLUSTER, 3, 1000, keys)
    b = Seal(CLUSTER, 2, 5, keys, nodelist=(1, 2))
    assert b.open(a.seal(inner(1))) == inner(1)
    assert b.open(c.seal(inner(3))) == DROP_REASONS_CODE["nodelist"]


def test_forged_claims_cannot_buy_unbounded_key_derivations(keys):
    _, b = Seal(CLUSTER, 1, 1000, keys), Seal(CLUSTER, 2, 5, keys, derive_budget=50)
    a = Seal(CLUSTER, 1, 1000, keys)
    assert b.open(a.seal(inner(1))) == inner(1)                  # a known sender, before the flood
    forged = [HEADER.pack(b"GS", VERSION, 1, 7, i, 1, 0) + os.urandom(40) for i in range(1, 2001)]
    results = [b.open(f) for f in forged]
    assert results.count(DROP_REASONS_CODE["auth"]) <= 60        # the budget (+ refill while we ran)
    assert results.count(DROP_REASONS_CODE["rate"]) >= 1900
    assert b.open(a.seal(inner(1, b"still"))) == inner(1, b"still")   # known subkey: no derivation needed


def test_the_peer_table_is_bounded(keys):
    b = Seal(CLUSTER, 999, 5, keys, max_peers=8)
    for node in range(1, 30):
        assert b.open(Seal(CLUSTER, node, 1, keys).seal(inner(node))) == inner(node)
    stats = b.stats()
    assert stats["peers"] == 8 and stats["peers_evicted"] == 21


def test_rotation_two_keys_accepted_one_used(keys):
    a, b = pair(keys)
    both = keys.with_new_key()
    b.use_keys(both)                                  # receivers first take the new key ...
    assert b.open(a.seal(inner(1, b"old"))) == inner(1, b"old")
    a.use_keys(both.using(2))                         # ... then senders switch to it
    sealed = a.seal(inner(1, b"new"))
    assert sealed[3] == 2 and b.open(sealed) == inner(1, b"new")
    b.use_keys(both.using(2).without(1))              # the old key retired
    c = Seal(CLUSTER, 3, 1, keys)
    assert b.open(c.seal(inner(3))) == DROP_REASONS_CODE["key"]


def test_a_key_id_never_names_two_keys(keys):
    a, _ = pair(keys)
    with pytest.raises(ConfigError, match="changed its value"):
        a.use_keys(KeyFile({1: bytes(32)}, 1))


def test_key_files_round_trip_with_mode_0600(tmp_path, keys):
    path = tmp_path / "cluster.key"
    write_key_file(path, keys)
    assert read_key_file(path) == keys
    assert path.stat().st_mode & 0o777 == 0o600
    rotated = keys.with_new_key().using(2).without(1)
    write_key_file(path, rotated)
    assert read_key_file(path).keys.keys() == {2}


@pytest.mark.parametrize("text, words", [
    ("", "needs 'send"),
    ("send = 1\n[keys]\n1 = \"not base64!\"\n", "not base64"),
    ("send = 2\n[keys]\n1 = \"" + "A" * 43 + "=\"\n", "send key 2"),
    ("send = 1\n[keys]\n1 = \"AAAA\"\n", "3 bytes"),
    ("send = 1\n[keys]\n200 = \"" + "A" * 43 + "=\"\n", "key id 200"),
    ("[[", "not a key file"),
])
def test_a_bad_key_file_is_one_clear_error(tmp_path, text, words):
    path = tmp_path / "bad.key"
    path.write_text(text)
    with pytest.raises(ConfigError, match=words) as info:
        read_key_file(path)
    assert str(path) in str(info.value)


def test_crypto_settings_are_checked():
    with pytest.raises(ConfigError, match="mode"):
        CryptoConfig(mode="rot13")
    with pytest.raises(ConfigError, match="nodelist"):
        CryptoConfig(nodelist=(0,))
    with pytest.raises(ConfigError, match="nodelist"):
        CryptoConfig(nodelist=("",))
    assert CryptoConfig(nodelist=[3, 4, "node-1"]).nodelist == (3, 4, "node-1")
