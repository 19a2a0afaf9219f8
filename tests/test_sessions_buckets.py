"""Session buckets, their owners and the backup strategies (groupcomm/services/sessions/buckets.py)."""

from __future__ import annotations

import hashlib
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from groupcomm.services.sessions.buckets import (
    DEFAULT_BUCKETS,
    BackupStrategy,
    BucketMap,
    NextK,
    TagAware,
    bucket_of,
    moved,
    session_order,
)

ROOT = Path(__file__).resolve().parent.parent
B = DEFAULT_BUCKETS

member_ids = st.integers(-(2**40), 2**40)
member_sets = st.lists(member_ids, min_size=1, max_size=16, unique=True)
session_ids = st.text(max_size=30)


# -- bucket_of ---------------------------------------------------------------------------------

def test_bucket_of_is_sha256_of_the_utf8_modulo_the_buckets():
    for sid in ("", "a", "AAAAAAAAAAAAAAAAAAAAAA", "é"):
        expected = int.from_bytes(hashlib.sha256(sid.encode()).digest()[:8], "big") % 72
        assert bucket_of(sid, 72) == expected
    # pinned: a change of the hash would split a running cluster of old and new nodes
    assert [bucket_of(s, 72) for s in ("", "a", "AAAAAAAAAAAAAAAAAAAAAA", "é")] == [52, 34, 58, 51]


@given(session_ids, st.integers(1, 10_000))
def test_bucket_of_is_in_range(sid, buckets):
    assert 0 <= bucket_of(sid, buckets) < buckets


def test_bucket_counts_below_one_are_refused():
    with pytest.raises(ValueError):
        bucket_of("x", 0)
    with pytest.raises(ValueError):
        BucketMap([1], 0)
    with pytest.raises(ValueError):
        BucketMap([], 72)


def test_owners_and_orders_are_the_same_in_another_process_with_another_hash_seed():
    code = (
        "from groupcomm.services.sessions.buckets import BucketMap, session_order\n"
        "m = BucketMap([3, 1, 4, 15, 9, 2, 6], 72)\n"
        "print([m.owner(b) for b in range(72)], session_order('abc', [3, 1, 4, 15, 9, 2, 6]))\n"
    )
    outs = set()
    for seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                             timeout=60, cwd=ROOT, check=True)
        outs.add(out.stdout)
    m = BucketMap([3, 1, 4, 15, 9, 2, 6], 72)
    here = f"{[m.owner(b) for b in range(72)]} {session_order('abc', [3, 1, 4, 15, 9, 2, 6])}\n"
    assert outs == {here}


# -- BucketMap ---------------------------------------------------------------------------------

@given(member_sets, st.randoms(use_true_random=False))
def test_ownership_is_deterministic_whatever_the_order_of_the_members(members, rnd):
    shuffled = members * 2
    rnd.shuffle(shuffled)
    a, b = BucketMap(members, B), BucketMap(shuffled, B)
    assert a == b
    assert [a.owner(x) for x in range(B)] == [b.owner(x) for x in range(B)]
    assert moved(a, b) == set()


@given(member_sets)
def test_every_bucket_has_one_owner_and_nobody_owns_far_more_than_its_share(members):
    m = BucketMap(members, B)
    counts = [len(m.buckets_of(x)) for x in members]
    assert sum(counts) == B
    assert all(m.owner(b) in members for b in range(B))
    assert sorted(b for x in members for b in m.buckets_of(x)) == list(range(B))
    # the realistic bound (module docstring): P(more) < 1e-9 per member set for N <= 16
    assert max(counts) <= 2 * B / len(members) + 15


def _binomial_share_in_range(n: int) -> float:
    p = 1 / n
    lo, hi = math.ceil(B / n / 2), math.floor(2 * B / n)
    return sum(math.comb(B, i) * p**i * (1 - p) ** (B - i) for i in range(lo, hi + 1))


def test_ownership_is_spread_like_a_fair_random_assignment():
    """Over many member sets, the share of members owning B/N/2..2B/N buckets is the binomial one.

    The brief's hope "every member owns between B/N/2 and 2B/N" does not hold for
    rendezvous hashing at N >= 5 with B = 72 (measured: 82 % of members at N = 16);
    what must hold is that the hash spreads like the fair assignment it stands for.
    """
    rng = random.Random(13)
    for n in range(2, 17):
        inside = total = 0
        for _ in range(120):
            members = rng.sample(range(1, 10**9), n)
            m = BucketMap(members, B)
            for x in members:
                inside += B / n / 2 <= len(m.buckets_of(x)) <= 2 * B / n
                total += 1
        expected = _binomial_share_in_range(n)
        assert abs(inside / total - expected) < 0.04, (n, inside / total, expected)
        assert inside / total >= 0.78, n


@given(member_sets, member_ids)
def test_a_joiner_takes_buckets_and_nothing_else_moves(members, joiner):
    if joiner in members:
        return
    old, new = BucketMap(members, B), BucketMap([*members, joiner], B)
    change = moved(old, new)
    assert change == set(new.buckets_of(joiner))
    assert all(old.owner(b) == new.owner(b) for b in range(B) if b not in change)


@given(st.lists(member_ids, min_size=2, max_size=16, unique=True), st.data())
def test_a_leave_moves_only_the_leavers_buckets(members, data):
    leaver = data.draw(st.sampled_from(members))
    old = BucketMap(members, B)
    new = BucketMap([m for m in members if m != leaver], B)
    assert moved(old, new) == set(old.buckets_of(leaver))
    assert new.buckets_of(leaver) == ()


def test_owner_of_a_session_and_the_edges():
    m = BucketMap([5, 6, 7], 10)
    assert m.owner_of("abc") == m.owner(bucket_of("abc", 10))
    with pytest.raises(IndexError):
        m.owner(10)
    with pytest.raises(IndexError):
        m.owner(-1)
    with pytest.raises(ValueError):
        moved(m, BucketMap([5, 6, 7], 11))
    assert BucketMap([1], 4).buckets_of(1) == (0, 1, 2, 3)


# -- backups -----------------------------------------------------------------------------------

STRATEGIES = [NextK(), TagAware(), TagAware(keys=("rack",))]


def _tags(members, hosts):
    """Consistent tags: member i on host hosts[i]; two hosts per rack."""
    return {m: {"host": f"h{h}", "rack": f"r{h // 2}"} for m, h in zip(members, hosts)}


backup_cases = st.tuples(
    session_ids,
    st.lists(member_ids, min_size=1, max_size=12, unique=True),
    st.integers(0, 5),
).flatmap(lambda t: st.tuples(
    st.just(t[0]), st.just(t[1]),
    st.one_of(st.sampled_from(t[1]), member_ids),                 # holder: usually a member
    st.just(t[2]),
    st.lists(st.integers(0, 4), min_size=len(t[1]), max_size=len(t[1])),
))


@pytest.mark.parametrize("strategy", STRATEGIES, ids=repr)
@given(case=backup_cases, rnd=st.randoms(use_true_random=False))
def test_backups_are_distinct_members_without_the_holder_and_deterministic(strategy, case, rnd):
    sid, members, holder, k, hosts = case
    tags = _tags(members, hosts)
    chosen = strategy.backups(sid, holder, members, k, tags)
    assert holder not in chosen
    assert len(set(chosen)) == len(chosen)
    assert set(chosen) <= set(members)
    assert len(chosen) == min(k, len(set(members) - {holder}))
    shuffled = list(members)
    rnd.shuffle(shuffled)
    assert strategy.backups(sid, holder, shuffled, k, dict(reversed(list(tags.items())))) == chosen
    assert isinstance(strategy, BackupStrategy)


@given(backup_cases)
def test_next_k_is_the_session_order_without_the_holder(case):
    sid, members, holder, k, _ = case
    chosen = NextK().backups(sid, holder, members, k, {})
    assert chosen == tuple(m for m in session_order(sid, members) if m != holder)[:k]
    # a member that is neither holder nor backup can leave without changing the backups
    others = [m for m in members if m != holder and m not in chosen]
    if others:
        assert NextK().backups(sid, holder, [m for m in members if m != others[0]], k, {}) == chosen


@given(backup_cases)
def test_tag_aware_never_backs_up_on_the_holders_host_while_another_host_is_free(case):
    sid, members, holder, k, hosts = case
    tags = _tags(members, hosts)
    chosen = TagAware().backups(sid, holder, members, k, tags)
    host = tags.get(holder, {}).get("host")
    elsewhere = [m for m in members if m != holder and tags[m]["host"] != host]
    same_host = [m for m in chosen if tags[m]["host"] == host]
    assert len(same_host) == max(0, len(chosen) - len(elsewhere))
    # as many distinct other hosts, and racks, as possible
    other_hosts = {tags[m]["host"] for m in elsewhere}
    assert len({tags[m]["host"] for m in chosen} - {host}) == min(len(chosen), len(other_hosts))
    rack = tags.get(holder, {}).get("rack")
    other_racks = {tags[m]["rack"] for m in members if m != holder} - {rack}
    assert len({tags[m]["rack"] for m in chosen} - {rack}) == min(len(chosen), len(other_racks))


@given(backup_cases)
def test_tag_aware_without_tags_is_next_k(case):
    sid, members, holder, k, _ = case
    assert TagAware().backups(sid, holder, members, k, {}) == NextK().backups(sid, holder, members, k, {})


def test_tag_aware_prefers_another_rack_then_another_host():
    tags = {1: {"host": "a", "rack": "x"}, 2: {"host": "a", "rack": "x"},
            3: {"host": "b", "rack": "x"}, 4: {"host": "c", "rack": "y"}}
    for sid in ("s1", "s2", "s3", "s4"):
        assert TagAware().backups(sid, 1, [1, 2, 3, 4], 1, tags) == (4,)
        assert TagAware().backups(sid, 1, [1, 2, 3, 4], 2, tags) == (4, 3)
        assert TagAware().backups(sid, 1, [1, 2, 3, 4], 3, tags) == (4, 3, 2)


def test_a_negative_k_is_refused():
    for strategy in STRATEGIES:
        with pytest.raises(ValueError):
            strategy.backups("s", 1, [1, 2], -1, {})
