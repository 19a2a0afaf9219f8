"""Session ids, cookie values, the session record and the bounded SessionTable
(groupcomm/services/sessions/ids.py and record.py)."""

from __future__ import annotations

import base64
import math
import re
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from groupcomm.services.sessions.errors import SessionsFull, SessionTooLarge
from groupcomm.services.sessions.ids import (
    MAX_HINT_CHARS,
    cookie_value,
    is_session_id,
    new_session_id,
    parse_cookie_value,
    routing_hint,
)
from groupcomm.services.sessions.record import (
    Limits,
    MalformedSession,
    Session,
    SessionTable,
    TableFull,
    decode_session,
    encode_session,
    encode_values,
)

ROOT = Path(__file__).resolve().parent.parent
HINT_CHARS = "ABCXYZabcxyz0189_-"
ids = st.builds(lambda raw: base64.urlsafe_b64encode(raw).rstrip(b"=").decode(), st.binary(min_size=16, max_size=16))
hints = st.text(alphabet=HINT_CHARS, min_size=1, max_size=MAX_HINT_CHARS)


# -- ids and cookies ---------------------------------------------------------------------------

def test_new_ids_are_22_url_safe_characters_of_16_random_bytes_and_unique():
    made = [new_session_id() for _ in range(2000)]
    assert len(set(made)) == len(made)
    for sid in made:
        assert len(sid) == 22 and is_session_id(sid)
        raw = base64.urlsafe_b64decode(sid + "==")
        assert len(raw) == 16 and base64.urlsafe_b64encode(raw).rstrip(b"=").decode() == sid


@pytest.mark.parametrize("text", [
    "", "A" * 21, "A" * 23, "A" * 21 + "B",          # B: a 22nd character with bits beyond 128
    "A" * 22 + "\n", "A" * 20 + "==", "A" * 21 + "+", "A" * 21 + "/", "Ａ" * 22, None, b"A" * 22, 22,
])
def test_is_session_id_is_strict(text):
    assert not is_session_id(text)


@given(ids)
def test_every_canonical_16_byte_encoding_is_an_id(sid):
    assert is_session_id(sid)


@given(ids, hints)
def test_a_cookie_value_parses_back(sid, hint):
    assert parse_cookie_value(cookie_value(sid, hint)) == (sid, hint)
    assert parse_cookie_value(cookie_value(sid, "")) == (sid, None)
    assert parse_cookie_value(sid) == (sid, None)


def _check_parsed(value, parsed):
    if parsed is None:
        return
    sid, hint = parsed
    assert is_session_id(sid)
    assert hint is None or re.fullmatch(rf"[A-Za-z0-9_-]{{1,{MAX_HINT_CHARS}}}", hint)
    assert value == (sid if hint is None else f"{sid}.{hint}")


@given(st.text(max_size=120))
def test_parsing_any_text_never_raises(value):
    _check_parsed(value, parse_cookie_value(value))


@given(ids, st.sampled_from(["", ".", ".."]), st.text(max_size=80))
def test_parsing_an_id_with_any_tail_never_raises(sid, sep, tail):
    value = sid + sep + tail
    _check_parsed(value, parse_cookie_value(value))


@pytest.mark.parametrize("value", [
    None, 5, b"x", "", ".", "A" * 22 + ".", "A" * 22 + ".a.b", "A" * 22 + ".a b", "A" * 22 + ".é",
    "A" * 22 + "." + "a" * (MAX_HINT_CHARS + 1), "A" * 22 + ".a\n", "A" * 21 + "B.node", ".node",
])
def test_malformed_cookie_values_are_none(value):
    assert parse_cookie_value(value) is None


def test_cookie_value_refuses_a_bad_id_or_hint():
    sid = new_session_id()
    for bad in ("a.b", "a b", "é", "a" * (MAX_HINT_CHARS + 1)):
        with pytest.raises(ValueError):
            cookie_value(sid, bad)
    with pytest.raises(ValueError):
        cookie_value("nope", "node1")


@given(st.text(max_size=200))
def test_routing_hint_makes_any_node_name_a_valid_hint(name):
    sid = new_session_id()
    hint = routing_hint(name)
    assert parse_cookie_value(cookie_value(sid, hint)) == (sid, hint or None)
    assert routing_hint("node-1_a") == "node-1_a" and routing_hint("web.example") == "web-example"


# -- the record --------------------------------------------------------------------------------

SID = "A" * 22
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.text(max_size=10) | st.binary(max_size=10)
    | st.floats(allow_nan=False),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=12,
)
session_values = st.dictionaries(st.text(max_size=8), json_values, max_size=6)


@given(ids, session_values, st.integers(0, 2**63 - 1), st.integers(0, 2**63 - 1),
       st.floats(0, 1e10), st.floats(0, 1e10), st.floats(0.001, 1e8))
def test_a_session_survives_its_wire_form(sid, values, version, epoch, created, last, inactive):
    s = Session(sid, encode_values(values, 1 << 20), version, epoch, created, last, inactive)
    back = decode_session(encode_session(s))
    assert back == s
    assert back.values() == values


@given(st.binary(max_size=200))
def test_decoding_any_bytes_raises_only_malformed_session(raw):
    try:
        decode_session(raw)
    except MalformedSession:
        pass


@given(st.data())
def test_decoding_a_damaged_record_raises_only_malformed_session(data):
    raw = bytearray(encode_session(Session.new(SID, now=1.0, values={"n": 1})))
    for _ in range(data.draw(st.integers(1, 4))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    try:
        decode_session(bytes(raw))
    except MalformedSession:
        pass


def _raw(*fields):
    return msgspec.msgpack.encode(list(fields))


@pytest.mark.parametrize("raw", [
    _raw("nope", b"\x80", 0, 0, 1.0, 1.0, 10.0),                      # not an id
    _raw(SID, b"\x80", -1, 0, 1.0, 1.0, 10.0),                        # negative version
    _raw(SID, b"\x80", 0, 2**64 - 1, 1.0, 1.0, 10.0),                 # epoch out of range
    _raw(SID, b"\x80", 0, 0, math.nan, 1.0, 10.0),
    _raw(SID, b"\x80", 0, 0, 1.0, math.inf, 10.0),
    _raw(SID, b"\x80", 0, 0, 1.0, 1.0, 0.0),                          # never active
    _raw(SID, b"\x80", 0, 0, 1.0, 1.0, math.nan),
    _raw(SID, "text", 0, 0, 1.0, 1.0, 10.0),
    _raw(SID, b"\x80", 0, 0, 1.0, 1.0, 10.0, "extra"),
    _raw(SID, b"\x80", 0, 0, 1.0),
    msgspec.msgpack.encode({"id": SID}),
    b"",
])
def test_invalid_records_are_malformed(raw):
    with pytest.raises(MalformedSession):
        decode_session(raw)


def test_decode_session_refuses_what_is_not_bytes_with_malformed_session():
    with pytest.raises(MalformedSession):
        decode_session("text")  # type: ignore[arg-type]


def test_encoding_an_invalid_session_is_refused_before_it_is_sent():
    with pytest.raises(MalformedSession):
        encode_session(Session("nope", b"\x80", 0, 0, 1.0, 1.0, 10.0))
    with pytest.raises(MalformedSession):
        encode_session(Session(SID, b"\x80", 0, 0, 1.0, 1.0, math.inf))


def test_data_that_is_not_a_dict_of_str_is_malformed():
    for data in (b"\x01", msgspec.msgpack.encode({1: 2}), b"\xc1"):
        with pytest.raises(MalformedSession):
            Session(SID, data, 0, 0, 1.0, 1.0, 10.0).values()


def test_new_update_touch_and_expiry():
    s = Session.new(SID, now=100.0, values={"n": 1}, epoch=3, max_inactive=10.0)
    assert (s.version, s.epoch, s.created, s.last_access, s.values()) == (0, 3, 100.0, 100.0, {"n": 1})
    u = s.with_values({"n": 2}, now=105.0)
    assert (u.version, u.last_access, u.created, u.values()) == (1, 105.0, 100.0, {"n": 2})
    t = u.touched(107.0)
    assert (t.version, t.data, t.last_access) == (1, u.data, 107.0)
    assert t.with_epoch(4).epoch == 4
    assert not t.expired(116.9) and t.expired(117.0) and t.expires_at == 117.0


def test_values_over_the_limit_or_not_str_keyed_are_refused():
    with pytest.raises(SessionTooLarge):
        Session.new(SID, now=0.0, values={"x": "a" * 100}, limit=50)
    s = Session.new(SID, now=0.0, values={"x": 1}, limit=50)
    with pytest.raises(SessionTooLarge):
        s.with_values({"x": "a" * 100}, now=1.0, limit=50)
    with pytest.raises(TypeError):
        encode_values({1: "a"}, 100)  # type: ignore[dict-item]
    with pytest.raises(TypeError):
        encode_values({"a": object()}, 100)


@pytest.mark.parametrize("kwargs", [
    {"max_session_bytes": 0}, {"max_sessions": 0}, {"max_bytes": -1}, {"max_sessions": 1.5},
    {"max_bytes": True}, {"max_session_bytes": 17 * 1024 * 1024},
])
def test_limits_must_be_positive_integers(kwargs):
    with pytest.raises(ValueError):
        Limits(**kwargs)


def test_the_default_limits():
    assert Limits() == Limits(max_session_bytes=64 * 1024, max_sessions=100_000, max_bytes=256 * 1024 * 1024)


# -- the table ---------------------------------------------------------------------------------

def _session(n: int, size: int, now: float, inactive: float = 10.0, version: int = 0) -> Session:
    sid = base64.urlsafe_b64encode(n.to_bytes(16, "big")).rstrip(b"=").decode()
    return Session(sid, encode_values({"p": "x" * size}, 1 << 20), version, 0, now, now, inactive)


def _size(s: Session) -> int:
    return len(encode_session(s))


def test_a_payload_over_the_limit_changes_nothing():
    table = SessionTable(Limits(max_session_bytes=50))
    small = _session(1, 10, 0.0)
    table.put(small, 0.0)
    before = (table.ids(), table.used_bytes)
    with pytest.raises(SessionTooLarge):
        table.put(_session(1, 100, 0.0, version=1), 0.0)
    with pytest.raises(SessionTooLarge):
        table.put(_session(2, 100, 0.0), 0.0)
    assert (table.ids(), table.used_bytes) == before and table.get(small.id) == small


def test_a_full_table_refuses_new_sessions_and_never_evicts_a_live_one():
    table = SessionTable(Limits(max_sessions=2))
    a, b = _session(1, 1, 0.0), _session(2, 1, 0.0)
    table.put(a, 0.0)
    table.put(b, 0.0)
    with pytest.raises(SessionsFull) as caught:
        table.put(_session(3, 1, 0.0), 5.0)
    assert isinstance(caught.value, TableFull)
    assert caught.value.reaped == []
    assert sorted(table.ids()) == sorted([a.id, b.id])
    table.put(_session(1, 2, 5.0, version=1), 5.0)        # an update of a held one fits
    c = _session(3, 1, 10.0)
    assert table.put(c, 10.0) == [b.id]                   # b expired at 10.0: reaped first
    assert sorted(table.ids()) == sorted([a.id, c.id])


def test_growing_past_max_bytes_is_refused_and_the_old_record_stays():
    a = _session(1, 10, 0.0)
    table = SessionTable(Limits(max_bytes=_size(a) + 5))
    table.put(a, 0.0)
    with pytest.raises(SessionsFull):
        table.put(_session(1, 20, 0.0, version=1), 1.0)
    assert table.get(a.id) == a and table.used_bytes == _size(a)


def test_reap_after_many_updates_returns_exactly_the_expired():
    table = SessionTable()
    for i in range(1000):
        table.put(_session(i % 7, 1, float(i), inactive=100.0, version=i), float(i))
    assert len(table) == 7
    assert table.reap(1092.0) == []
    assert table.reap(1093.0) == [_session(993 % 7, 1, 0.0).id]
    assert sorted(table.reap(2000.0)) == sorted(_session(i, 1, 0.0).id for i in range(7) if i != 993 % 7)
    assert len(table) == 0 and table.used_bytes == 0


def _fits(model: dict[str, Session], s: Session, limits: Limits) -> bool:
    rest = [v for k, v in model.items() if k != s.id]
    return len(rest) + 1 <= limits.max_sessions and sum(map(_size, rest)) + _size(s) <= limits.max_bytes


ops = st.lists(st.one_of(
    st.tuples(st.just("put"), st.integers(0, 7), st.integers(0, 60), st.floats(0.5, 20.0)),
    st.tuples(st.just("remove"), st.integers(0, 7)),
    st.tuples(st.just("reap")),
    st.tuples(st.just("wait"), st.floats(0.0, 8.0)),
), max_size=80)


@given(ops)
def test_the_table_keeps_its_bounds_exactly(steps):
    """Against a model: every put is taken or refused as the policy says; counts and bytes are exact."""
    limits = Limits(max_session_bytes=40, max_sessions=4, max_bytes=280)
    table, model = SessionTable(limits), {}
    now, version = 0.0, 0
    for step in steps:
        if step[0] == "put":
            _, n, size, inactive = step
            version += 1
            s = _session(n, size, now, inactive, version)
            if len(s.data) > limits.max_session_bytes:
                with pytest.raises(SessionTooLarge):
                    table.put(s, now)
            else:
                expired = sorted(k for k, v in model.items() if v.expired(now))
                if _fits(model, s, limits):
                    assert table.put(s, now) == []
                    model[s.id] = s
                else:
                    for k in expired:
                        del model[k]
                    if _fits(model, s, limits):
                        assert sorted(table.put(s, now)) == expired
                        model[s.id] = s
                    else:
                        with pytest.raises(SessionsFull) as caught:
                            table.put(s, now)
                        assert sorted(caught.value.reaped) == expired
        elif step[0] == "remove":
            sid = _session(step[1], 0, 0.0).id
            assert table.remove(sid) == model.pop(sid, None)
        elif step[0] == "reap":
            expired = [k for k, v in sorted(model.items(), key=lambda kv: kv[1].expires_at) if v.expired(now)]
            reaped = table.reap(now)
            assert sorted(reaped) == sorted(expired)
            assert [model[k].expires_at for k in reaped] == sorted(model[k].expires_at for k in reaped)
            for k in expired:
                del model[k]
        else:
            now += step[1]
        assert {s.id: s for s in table.sessions()} == model
        assert len(table) == len(model) <= limits.max_sessions
        assert table.used_bytes == sum(map(_size, model.values())) <= limits.max_bytes
        assert all((k in table) and table.get(k) == v for k, v in model.items())


def test_the_package_imports_without_trio_or_io():
    code = ("import sys, groupcomm.services.sessions\n"
            "bad = [m for m in sys.modules if m == 'trio' or m.startswith(('trio.', 'groupcomm.io'))]\n"
            "assert not bad, bad\n")
    out = subprocess.run([sys.executable, "-P", "-c", code], check=False, capture_output=True, text=True,
                         timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stderr
