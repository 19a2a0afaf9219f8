"""The primary-component rule: which side of a partition may keep writing.

Corosync's votequorum in miniature.  Every member has a number of votes (1
unless ``votes`` says otherwise); a view is *primary* when the votes of its
members are a strict majority of the expected votes::

    primary  <=>  sum(votes[m] for m in view) * 2 > expected_votes

``expected_votes = 0`` (the default) means "the most votes this member has seen
in one view so far", which grows as the cluster grows and never shrinks, like
votequorum's highest-seen expected votes.  Set it explicitly in production:
a member that restarts alone has seen only itself and would call a view of
one primary.

``tie_breaker``: in an exact half/half split (possible with an even number of
expected votes) the half holding the lowest node id of the expected members
is primary when ``"lowest"`` (votequorum's auto_tie_breaker); with ``"none"``
neither half is.  The tie breaker needs to know the expected members, so it
applies only when ``expected_members`` is given.

At most one of any set of disjoint views can be primary, so services that
refuse writes outside a primary view never diverge across a partition.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

from groupcomm.errors import ConfigError

__all__ = ["QuorumConfig", "Quorum"]


@dataclass(frozen=True)
class QuorumConfig:
    """The QUORUM layer's settings."""

    expected_votes: int = 0
    """Total votes of the full cluster; 0 = the highest total seen in one view."""
    votes: dict[int, int] = field(default_factory=dict)
    """Votes per node id; members not listed have 1."""
    expected_members: tuple[int, ...] = ()
    """Node ids of the full cluster; needed only by the tie breaker."""
    tie_breaker: Literal["lowest", "none"] = "lowest"
    """``"lowest"`` or ``"none"``: who wins an exact half/half split."""

    def __post_init__(self) -> None:
        if self.expected_votes < 0:
            raise ConfigError(f"QUORUM: expected_votes must be >= 0, got {self.expected_votes}")
        if self.tie_breaker not in ("lowest", "none"):
            raise ConfigError(f"QUORUM: tie_breaker must be 'lowest' or 'none', got {self.tie_breaker!r}")
        for node, v in self.votes.items():
            if not isinstance(v, int) or v < 0:
                raise ConfigError(f"QUORUM: votes for node {node} must be an int >= 0, got {v!r}")


class Quorum:
    """Decides, view by view, whether a view is primary (sans-IO, per member)."""

    def __init__(self, config: QuorumConfig | None = None) -> None:
        self.config = config or QuorumConfig()
        self.highest_seen = 0

    def votes_of(self, members: Iterable[int]) -> int:
        votes = self.config.votes
        return sum(votes.get(m, 1) for m in members)

    @property
    def expected(self) -> int:
        return self.config.expected_votes or self.highest_seen

    def is_primary(self, members: Iterable[int]) -> bool:
        """Whether a view of ``members`` is primary; also records it for highest-seen."""
        members = tuple(members)
        have = self.votes_of(members)
        self.highest_seen = max(self.highest_seen, have)
        expected = self.expected
        if expected == 0:
            return False
        if have * 2 > expected:
            return True
        if have * 2 == expected and self.config.tie_breaker == "lowest" and self.config.expected_members:
            return min(self.config.expected_members) in members
        return False
