"""The primary-component rule: which side of a partition may keep writing.

Every member has a number of votes and judges, on its own, each view it
installs; a view is *primary* when the votes counted in it are a strict
majority of the expected votes::

    primary  <=>  2 * votes(counted members) > expected votes

Votes: ``votes[node]``, else 1, except that when ``expected_members`` is
given, nodes not listed have none (visitors never tip a decision).  The
expected votes and who is counted depend on the policy (docs/guarantees.rst,
"Primary components", has the full rules and why each is safe):

``expected_votes = 0`` and no ``expected_members`` (the default): *highest seen*
    The expected votes are the most this member has seen in one view, kept in
    its state directory, so a member that restarts alone is not primary.  They
    never come down: members that visited once count forever.  Before a member
    has seen the whole cluster it cannot tell a partition from a smaller
    cluster, so a first start into a partition can make two sides primary;
    the fixed policies below have no such gap.
``expected_votes = N`` or ``expected_members = [...]``: *fixed*
    The expected votes are ``N`` (or the votes of the listed members).  Every
    member uses the same number, so two disjoint views can never both hold a
    majority, whatever the order of events.
``wait_for_all = true`` (with a fixed total)
    A member that has never been in a view holding every expected vote (the
    memory is in its state directory) calls no view primary until it is.
``last_man_standing = true`` (with a fixed total)
    Once a primary view has been installed for ``last_man_standing_window``,
    the expected votes come down to the votes of that view, so the cluster can
    lose members one at a time down to one (two without the tie breaker) and
    stay primary.  To stay safe while members disagree on the expected votes,
    a member counts only the members that have moved with it through every
    configuration since its last primary view (the transitional
    configurations say who), and raises its expected votes to any larger view
    at once.  A view holding every expected vote is always primary.  So a
    member that restarts, or that rejoins from a side that was not primary,
    counts as primary again only in a view with every expected vote; until
    then it is in the primary view but does not call it primary.

``tie_breaker = "lowest"``: a view holding exactly half the expected votes is
primary when it holds the lowest of ``expected_members`` (votequorum's
auto_tie_breaker; it needs ``expected_members``).

The layer is sans-IO: what it must remember across restarts
(:class:`QuorumMemory`) goes through a :class:`QuorumStore` (the node's state
directory under a Channel, :class:`MemoryStore` in the simulator) and time
through a clock function, both given by the driver with :meth:`Quorum.use`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal, Protocol

from groupcomm.config import Duration
from groupcomm.errors import ConfigError

__all__ = ["MemoryStore", "Quorum", "QuorumConfig", "QuorumMemory", "QuorumStore"]

logger = logging.getLogger("groupcomm.quorum")

_US = 1_000_000


@dataclass(frozen=True)
class QuorumConfig:
    """The QUORUM layer: which views are primary, and where the member keeps its durable state."""

    expected_votes: int = 0
    """Total votes of the full cluster; 0 = the votes of ``expected_members`` if given, else
    the highest total this member has seen in one view (remembered in its state directory)."""
    votes: dict[int, int] = field(default_factory=dict)
    """Votes per node id; nodes not listed have 1 (none if ``expected_members`` is given and
    does not list them)."""
    expected_members: tuple[int | str, ...] = ()
    """Node ids of the full cluster (or member names: a Channel turns each into its node id,
    :func:`~groupcomm.io.channel.node_id_for`); sets the expected votes when
    ``expected_votes`` is 0, and names the tie breaker (the lowest)."""
    tie_breaker: Literal["lowest", "none"] = "lowest"
    """``"lowest"`` or ``"none"``: who wins an exact half/half split."""
    wait_for_all: bool = False
    """A member that has never been in a view holding every expected vote calls no view
    primary until it is (needs a fixed total)."""
    last_man_standing: bool = False
    """Lower the expected votes to those of a primary view once it has been installed for
    ``last_man_standing_window`` (needs a fixed total; see docs/guarantees.rst)."""
    last_man_standing_window: Duration = 10.0
    """How long a primary view must have been installed before the expected votes come down to it."""
    state_dir: str = ""
    """Root of the members' durable state (the highest ring seq a member may use, what this
    layer remembers); each member uses ``<state_dir>/<cluster>/<name>``.  Empty:
    ``$XDG_STATE_HOME/groupcomm``, or ``~/.local/state/groupcomm``."""

    def __post_init__(self) -> None:
        if self.expected_votes < 0:
            raise ConfigError(f"QUORUM: expected_votes must be >= 0, got {self.expected_votes}")
        if self.tie_breaker not in ("lowest", "none"):
            raise ConfigError(f"QUORUM: tie_breaker must be 'lowest' or 'none', got {self.tie_breaker!r}")
        for node, v in self.votes.items():
            if not isinstance(v, int) or v < 0:
                raise ConfigError(f"QUORUM: votes for node {node} must be an int >= 0, got {v!r}")
        members = sum(self.vote(m) for m in set(self.expected_members))
        if self.expected_votes and self.expected_members and self.expected_votes < members:
            raise ConfigError(f"QUORUM: expected_votes ({self.expected_votes}) is less than the votes of "
                              f"expected_members ({members}): two sides of a partition could both be primary")
        for flag in ("wait_for_all", "last_man_standing"):
            if getattr(self, flag) and not self.total:
                raise ConfigError(f"QUORUM: {flag} needs the cluster's total: set expected_votes or expected_members")
        if not self.last_man_standing_window >= 0:
            raise ConfigError("QUORUM: last_man_standing_window must be >= 0")

    def with_ids(self, node_id: Callable[[str], int]) -> QuorumConfig:
        """This config with member names in ``expected_members`` turned into node ids."""
        if all(type(m) is int for m in self.expected_members):
            return self
        ids = tuple(node_id(m) if isinstance(m, str) else m for m in self.expected_members)
        return dataclasses.replace(self, expected_members=ids)

    @property
    def fixed_members(self) -> bool:
        """Whether the cluster's members are listed (visitors then have no votes)."""
        return bool(self.expected_members)

    def vote(self, node: int) -> int:
        """The votes of ``node``."""
        default = 1 if not self.expected_members or node in self.expected_members else 0
        return self.votes.get(node, default)

    @property
    def total(self) -> int:
        """The configured expected votes (0: highest seen)."""
        if self.expected_votes:
            return self.expected_votes
        return sum(self.vote(m) for m in set(self.expected_members))


@dataclass(frozen=True)
class QuorumMemory:
    """What a member's quorum rule keeps across restarts (in its state directory)."""

    expected: int = 0
    """The expected votes this member arrived at: the highest seen, or lowered by last man standing."""
    seen_all: bool = False
    """It has been in a view holding every expected vote (``wait_for_all`` is satisfied)."""
    configured: int = 0
    """The configured total this memory belongs to; under another configuration only ``expected``
    is kept, and only by the highest-seen policy (as a floor)."""


class QuorumStore(Protocol):
    """Where a :class:`Quorum` keeps its :class:`QuorumMemory` (durably, under a Channel)."""

    def load_quorum(self) -> QuorumMemory | None: ...

    def save_quorum(self, memory: QuorumMemory) -> None: ...


class MemoryStore:
    """A :class:`QuorumStore` in memory: the simulator's state directory, which survives a restart."""

    def __init__(self) -> None:
        self.quorum: QuorumMemory | None = None

    def load_quorum(self) -> QuorumMemory | None:
        return self.quorum

    def save_quorum(self, memory: QuorumMemory) -> None:
        self.quorum = memory


class Quorum:
    """Decides, view by view, whether a view is primary (sans-IO, per member).

    The driver calls :meth:`use` before the first view; the spaces layer calls
    :meth:`view` for each regular view, and :meth:`is_primary` judges a
    transitional configuration.
    """

    def __init__(self, config: QuorumConfig | None = None) -> None:
        self.config = config or QuorumConfig()
        names = [m for m in self.config.expected_members if not isinstance(m, int)]
        if names:
            raise ConfigError(f"QUORUM: expected_members {names!r} are names; a Channel turns names into node "
                              "ids (QuorumConfig.with_ids), elsewhere give node ids")
        self._store: QuorumStore = MemoryStore()
        self._clock: Callable[[], int] | None = None
        self.primary = False
        """The verdict on the current regular view."""
        self._members: frozenset[int] = frozenset()
        self._since: int | None = None              # when the current view was installed (clock units)
        # Last man standing: the members that moved with this member through every
        # configuration since its last primary view (None: nobody yet but itself).
        self._continuity: frozenset[int] | None = None
        self._oversize_logged = False
        self._load()

    def use(self, store: QuorumStore, clock: Callable[[], int] | None = None) -> None:
        """Keep the memory in ``store`` (loaded now) and read the time (integer microseconds) from ``clock``."""
        self._store = store
        self._clock = clock
        self._load()

    # -- the rule -------------------------------------------------------------------

    def votes_of(self, members: Iterable[int]) -> int:
        vote = self.config.vote
        return sum(vote(m) for m in set(members))

    @property
    def expected(self) -> int:
        """The expected votes this member judges the next view by."""
        return self.config.total if self._fixed else self._expected

    def view(self, members: Iterable[int], came_with_me: Iterable[int]) -> bool:
        """A regular view is installed here: judge it, remember what must be, return ``View.primary``.

        ``came_with_me``: the members of the view that come from this member's
        previous view (its transitional configuration; itself alone after a start).
        """
        cfg = self.config
        members = frozenset(members)
        came = frozenset(came_with_me) & members
        now = self._clock() if self._clock is not None else None
        if (cfg.last_man_standing and self.primary and self._since is not None and now is not None
                and now - self._since >= cfg.last_man_standing_window * _US):
            self._expected = min(self._expected, self.votes_of(self._members))
        have = self.votes_of(members)
        everyone = self._everyone(members)
        if not self._fixed:
            self._expected = max(self._expected, have)      # at once: members may disagree on it otherwise
        if cfg.last_man_standing:
            counted = came if self._continuity is None else self._continuity & came
            primary = everyone or self._quorate(counted, self._expected)
            self._continuity = members if primary else counted
        else:
            primary = self._quorate(members, self.expected)
        if cfg.wait_for_all and not self._seen_all:
            primary = primary and everyone
        self._seen_all = self._seen_all or everyone
        self.primary, self._members, self._since = primary, members, now
        self._remember()
        if self._fixed and have > cfg.total and not self._oversize_logged:
            self._oversize_logged = True
            logger.warning("a view holds %d votes but the cluster's total is set to %d: two sides of a "
                           "partition could both be primary; raise expected_votes or list expected_members",
                           have, cfg.total)
        return primary

    def is_primary(self, members: Iterable[int]) -> bool:
        """Whether a transitional configuration of ``members`` (who came with this member from
        its current view) is primary.  Changes nothing."""
        if not self.primary:
            return False
        members = frozenset(members)
        if self.config.last_man_standing:
            counted = members if self._continuity is None else self._continuity & members
            return self._quorate(counted, self._expected)
        return self._quorate(members, self.expected)

    # -- plumbing -------------------------------------------------------------------

    @property
    def _fixed(self) -> bool:
        """The expected votes are the configured total and never move."""
        return bool(self.config.total) and not self.config.last_man_standing

    def _quorate(self, counted: frozenset[int], expected: int) -> bool:
        if expected <= 0:
            return False
        have = self.votes_of(counted)
        if have * 2 > expected:
            return True
        cfg = self.config
        return (have * 2 == expected and cfg.tie_breaker == "lowest" and bool(cfg.expected_members)
                and min(cfg.expected_members) in counted)

    def _everyone(self, members: frozenset[int]) -> bool:
        """Every expected vote is in ``members`` (nobody outside can count for anything)."""
        cfg = self.config
        if cfg.expected_members:
            return set(cfg.expected_members) <= members and self.votes_of(members) >= cfg.total
        return bool(cfg.total) and self.votes_of(members) >= cfg.total

    def _load(self) -> None:
        cfg = self.config
        memory = self._store.load_quorum()
        same = memory is not None and memory.configured == cfg.total
        self._seen_all = bool(same and memory.seen_all)
        if not cfg.total:
            self._expected = memory.expected if memory is not None else 0      # highest seen: a floor
        elif cfg.last_man_standing and same:
            self._expected = memory.expected
        else:
            self._expected = cfg.total
        self._saved = memory

    def _remember(self) -> None:
        memory = QuorumMemory(self._expected, self._seen_all, self.config.total)
        if memory != self._saved:
            self._store.save_quorum(memory)
            self._saved = memory
