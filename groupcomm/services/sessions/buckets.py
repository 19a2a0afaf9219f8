"""Where sessions live: buckets, their owners, and the backups of a session.

A session id hashes to one of ``B`` buckets (:func:`bucket_of`); each bucket is
owned by one member of the space (:class:`BucketMap`, rendezvous hashing: the
member with the highest weight for the bucket).  The owner keeps the location
index of its buckets' sessions.  Rendezvous hashing moves the least possible on
a view change: a leaver's buckets spread over the others, a joiner takes only
the buckets it now outweighs everyone for, nothing else moves.

Balance is statistical: over a random member set a member owns
``Binomial(B, 1/N)`` buckets, ``B/N`` on average (the tests check that the
hash matches this law).  With the default ``B = 72`` the share of members
owning between ``B/N/2`` and ``2B/N`` buckets is 99.7 % at ``N = 4``, 95 % at
``N = 8`` and 82 % at ``N = 16``, where about 1 member in 100 owns none; the
most any member owns is at most ``2B/N + 15`` (the chance of more is under
1e-9 per member set for ``N <= 16``).  Only the location index is spread this
way (sessions stay where they were created), so the unevenness costs little;
a larger ``B`` evens it out.

The backups of a session are chosen by a :class:`BackupStrategy`:
:class:`NextK` (the members in rendezvous order of the session id, the holder
skipped) or :class:`TagAware` (the same order, preferring other hosts/racks).

Every hash here is SHA-256 or BLAKE2b of an explicit encoding, never ``hash()``:
all nodes, processes and Python versions must agree.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Protocol, runtime_checkable

__all__ = [
    "DEFAULT_BUCKETS",
    "BackupStrategy",
    "BucketMap",
    "NextK",
    "TagAware",
    "bucket_of",
    "moved",
    "session_order",
]

DEFAULT_BUCKETS = 72
"""Buckets of a space unless configured otherwise (WADI's partitions)."""


def bucket_of(session_id: str, buckets: int) -> int:
    """The bucket of ``session_id`` among ``buckets``: SHA-256 of its UTF-8, first 8 bytes, modulo."""
    if buckets < 1:
        raise ValueError(f"buckets must be at least 1, not {buckets}")
    digest = hashlib.sha256(session_id.encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") % buckets


def _weight(domain: bytes, key: str, member: int) -> int:
    """A stable 64-bit weight of (``key``, ``member``); ``domain`` separates bucket and session weights."""
    text = f"{key}\x00{member}".encode("utf-8", "surrogatepass")
    return int.from_bytes(hashlib.blake2b(text, digest_size=8, person=domain).digest(), "big")


_BUCKET = b"gc-sess-bucket"
_SESSION = b"gc-sess-backup"


def _by_weight(domain: bytes, key: str, members: Sequence[int]) -> tuple[int, ...]:
    # ties (practically never) go to the larger member id, so the order is total
    return tuple(sorted(set(members), key=lambda m: (_weight(domain, key, m), m), reverse=True))


class BucketMap:
    """The owner of every bucket among ``members`` (rendezvous hashing; deterministic, order-free)."""

    def __init__(self, members: Sequence[int], buckets: int = DEFAULT_BUCKETS) -> None:
        if buckets < 1:
            raise ValueError(f"buckets must be at least 1, not {buckets}")
        if not members:
            raise ValueError("a bucket map needs at least one member")
        self.members: tuple[int, ...] = tuple(sorted(set(members)))
        self.buckets = buckets
        self._owners = tuple(
            max(self.members, key=lambda m, b=b: (_weight(_BUCKET, str(b), m), m)) for b in range(buckets)
        )

    def owner(self, bucket: int) -> int:
        """The member that owns ``bucket`` (IndexError outside ``range(buckets)``)."""
        if not 0 <= bucket < self.buckets:
            raise IndexError(f"bucket {bucket} not in range({self.buckets})")
        return self._owners[bucket]

    def owner_of(self, session_id: str) -> int:
        """The member that owns the bucket of ``session_id``."""
        return self._owners[bucket_of(session_id, self.buckets)]

    def buckets_of(self, member: int) -> tuple[int, ...]:
        """The buckets ``member`` owns, ascending (empty if it is not a member)."""
        return tuple(b for b, owner in enumerate(self._owners) if owner == member)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, BucketMap):
            return NotImplemented
        return self.members == other.members and self.buckets == other.buckets

    def __hash__(self) -> int:
        return hash((self.members, self.buckets))

    def __repr__(self) -> str:
        return f"BucketMap(members={list(self.members)}, buckets={self.buckets})"


def moved(old: BucketMap, new: BucketMap) -> set[int]:
    """The buckets whose owner differs between ``old`` and ``new`` (same number of buckets)."""
    if old.buckets != new.buckets:
        raise ValueError(f"cannot compare maps of {old.buckets} and {new.buckets} buckets")
    return {b for b in range(old.buckets) if old.owner(b) != new.owner(b)}


def session_order(session_id: str, members: Sequence[int]) -> tuple[int, ...]:
    """``members`` (deduplicated) by descending rendezvous weight for ``session_id``: NextK's order."""
    return _by_weight(_SESSION, session_id, members)


@runtime_checkable
class BackupStrategy(Protocol):
    """Chooses the backups of a session.

    The answer never holds ``holder``, never a member twice, only ``members``, and
    ``min(k, candidates)`` of them; the same arguments always give the same answer.
    """

    def backups(
        self,
        session_id: str,
        holder: int,
        members: Sequence[int],
        k: int,
        tags: Mapping[int, Mapping[str, str]],
    ) -> tuple[int, ...]:
        """The backups of ``session_id`` held by ``holder``, best first."""
        ...


def _check_k(k: int) -> None:
    if k < 0:
        raise ValueError(f"k must be at least 0, not {k}")


class NextK:
    """The first ``k`` members in rendezvous order of the session id, the holder skipped.

    Each session gets its own order, so backups spread evenly; a view change only
    replaces the backups that left (or that a joiner now outweighs).
    """

    def backups(
        self,
        session_id: str,
        holder: int,
        members: Sequence[int],
        k: int,
        tags: Mapping[int, Mapping[str, str]] | None = None,
    ) -> tuple[int, ...]:
        """Up to ``k`` members other than ``holder`` (``tags`` are ignored)."""
        _check_k(k)
        return tuple(m for m in session_order(session_id, members) if m != holder)[:k]

    def __repr__(self) -> str:
        return "NextK()"


class TagAware:
    """Backups on other failure domains (by default another host, better another rack).

    Picks one backup at a time among the members in :class:`NextK`'s order: a
    candidate scores a point per key in ``keys`` whose tag value differs from the
    holder's and from every backup chosen so far; ties go to the candidate that
    differs from the holder on more keys, then to NextK's order.  A member
    without a tag never differs on it (unknown is not "elsewhere"), so without
    tags this is NextK.  With consistent tags (a host in one rack) no backup is
    on the holder's host while a member on another host is left.
    """

    def __init__(self, keys: Sequence[str] = ("host", "rack")) -> None:
        self.keys: tuple[str, ...] = tuple(keys)

    def backups(
        self,
        session_id: str,
        holder: int,
        members: Sequence[int],
        k: int,
        tags: Mapping[int, Mapping[str, str]],
    ) -> tuple[int, ...]:
        """Up to ``k`` members other than ``holder``, spread over the tag values."""
        _check_k(k)
        candidates = [m for m in session_order(session_id, members) if m != holder]
        holder_tags = tags.get(holder, {})
        used: dict[str, set[str]] = {key: set() for key in self.keys}
        for key in self.keys:
            if key in holder_tags:
                used[key].add(holder_tags[key])
        chosen: list[int] = []
        while candidates and len(chosen) < k:
            def score(member: int) -> tuple[int, int]:
                mine = tags.get(member, {})
                new = sum(1 for key in self.keys if key in mine and mine[key] not in used[key])
                other = sum(1 for key in self.keys
                            if key in mine and key in holder_tags and mine[key] != holder_tags[key])
                return new, other
            # max() keeps the first of equal scores: NextK's order breaks ties
            best = max(candidates, key=score)
            candidates.remove(best)
            chosen.append(best)
            for key, value in tags.get(best, {}).items():
                if key in used:
                    used[key].add(value)
        return tuple(chosen)

    def __repr__(self) -> str:
        return f"TagAware(keys={self.keys!r})"
