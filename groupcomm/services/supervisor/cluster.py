"""Which cluster-placed processes run on this node, and when (sans-IO).

One :class:`ClusterPlacement` per supervisor decides, from what the group
delivers in total order, whether this node runs each *placed* process: a
domain controller (``role = "domain-controller"``) or ``replicas = N``.  It is
fed the ring views, the views and messages of one space per placed process
(``SPACE/PROCESS``: a supervisor that can host the process is a member, oldest
first) and the time, and returns actions (:class:`Run`, :class:`Halt`,
:class:`Renew`, :class:`Publish`, :class:`JoinSpace`, :class:`LeaveSpace`).

The domain controller (docs/supervisor.rst, "Exactly one domain controller"):

* **Who.** The first member of the process's space view (the longest-standing)
  whose node is eligible, in a *regular, primary* ring configuration
  (:func:`~.placement.dc_host`).  Every member computes the same host at the
  same point of the order; no message decides it.
* **Terms and epochs.** A node that becomes host starts a *term* whose epoch is
  ``ring_seq * 2**16`` of the ring the choosing view was delivered in, or one
  more than the last epoch the space announced (a host announces its term when
  its process first runs, and again when it releases it), whichever is larger:
  strictly increasing along the primary components (ring sequence numbers grow
  from one primary ring to the next), below ``2**63``, so the process can hand it
  to external systems as a fencing token (``GROUPCOMM_DC_EPOCH``).
* **Safety.** The term ends at once, and the process is halted, when the node
  installs a configuration that is not primary or a space view that chooses
  another host.  The process runs under a *lease* that the supervisor renews
  every ``lease / 3`` only while its ring is healthy -- a regular primary
  configuration in which it saw a token within ``token_timeout`` (sampled every
  ``liveness_check``) and not within ``token_timeout`` after a pause of its own
  (tokens read after a pause may be stale) -- and the lease guard kills the
  process when it lapses, whatever the supervisor is doing.  A new term starts
  its process only ``fencing_delay`` after the view that chose it, with::

      fencing_delay >= token_timeout + liveness_check + lease + kill_allowance

  The old host saw its last token of the old ring before the new ring formed
  (plus network delay), renewed at most ``token_timeout + liveness_check``
  after that, so its process is dead ``lease + kill_allowance`` later.
* **Handover.** A host that stops gracefully halts its process, waits until it
  is gone, multicasts ``released`` in the space, then leaves it; the member
  that the next view chooses starts at once, unless a configuration that
  merged other members came in between (they may have had a host of their own).
* **Lapses.** A term whose lease lapsed (the supervisor froze, or its ring lost
  the token) is over; if the node is still the host it waits ``fencing_delay``
  again before it runs the process (same epoch: the same decision).

Replicas run on the members :func:`~.placement.replica_hosts` picks in a
regular primary configuration, and stop in any other; no fencing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import msgspec

from groupcomm.errors import ConfigError
from groupcomm.events import View
from groupcomm.layers.spaces import SpaceView
from groupcomm.services.supervisor.placement import dc_host, replica_hosts
from groupcomm.services.supervisor.spec import (
    DOMAIN_CONTROLLER,
    ClusterSettings,
    ProcessSpec,
)

__all__ = [
    "ClusterPlacement",
    "Fencing",
    "Halt",
    "JoinSpace",
    "LeaveSpace",
    "PlacementAction",
    "Publish",
    "Renew",
    "Run",
    "epoch_of",
    "placement_space",
]

_US = 1_000_000
REPLICA = "replica"
"""The role (``GROUPCOMM_ROLE``) of a ``replicas = N`` instance."""


def _us(seconds: float) -> int:
    return round(seconds * _US)


@dataclass(frozen=True)
class Fencing:
    """The timers of domain-controller fencing, checked against the rule (seconds)."""

    token_timeout: float
    lease: float
    fencing_delay: float
    kill_allowance: float
    liveness_check: float

    @property
    def minimum_fencing_delay(self) -> float:
        """``token_timeout + liveness_check + lease + kill_allowance``."""
        return self.token_timeout + self.liveness_check + self.lease + self.kill_allowance

    @classmethod
    def derive(cls, settings: ClusterSettings, token_timeout: float, consensus: float | None = None) -> Fencing:
        """The timers for a stack with ``token_timeout`` (and ``consensus``, default ``1.2 *
        token_timeout``): unset ones derived, the rule checked (:class:`~groupcomm.errors.ConfigError`
        naming every value if it fails).  The default lease outlasts a membership change
        (``token_timeout + 4 * consensus``: a join or a loss takes a few consensus rounds), so the
        domain controller keeps running through one."""
        if not token_timeout > 0:
            raise ConfigError(f"cluster: token_timeout must be > 0, not {token_timeout!r}")
        consensus = 1.2 * token_timeout if consensus is None else consensus
        lease = settings.lease if settings.lease is not None else token_timeout + 4 * consensus
        check = settings.liveness_check if settings.liveness_check is not None else token_timeout / 4
        minimum = token_timeout + check + lease + settings.kill_allowance
        fencing = settings.fencing_delay if settings.fencing_delay is not None else minimum
        if check > token_timeout:
            raise ConfigError(f"cluster.liveness_check ({check:g}s) must not exceed the stack's "
                              f"token_timeout ({token_timeout:g}s)")
        if lease <= token_timeout:
            raise ConfigError(f"cluster.lease ({lease:g}s) must exceed the stack's token_timeout "
                              f"({token_timeout:g}s), or every token loss stops the domain controller")
        if fencing < minimum - 1e-9:
            raise ConfigError(
                f"cluster.fencing_delay ({fencing:g}s) is shorter than token_timeout ({token_timeout:g}s) "
                f"+ liveness_check ({check:g}s) + lease ({lease:g}s) + kill_allowance "
                f"({settings.kill_allowance:g}s) = {minimum:g}s: an old domain controller could still run")
        return cls(token_timeout, lease, fencing, settings.kill_allowance, check)


def placement_space(base: str, process: str) -> str:
    """The space whose members can host placed process ``process``."""
    return f"{base}/{process}"


def epoch_of(view_id: tuple[int, int, int], announced: int = -1) -> int:
    """The fencing token of a term chosen by the space view at ``view_id`` (rep, ring seq,
    position) when the last epoch announced in the space was ``announced``."""
    return max(view_id[1] << 16, announced + 1)


# --------------------------------------------------------------------------- actions


@dataclass(frozen=True)
class Run:
    """Run the local instance of ``name`` (with ``role`` and, for a domain controller, ``epoch``
    and a lease until ``lease_until`` on the core's clock)."""

    name: str
    role: str
    epoch: int | None = None
    lease_until: int | None = None


@dataclass(frozen=True)
class Halt:
    """Stop the local instance of ``name`` now; report :meth:`ClusterPlacement.stopped` once it is gone."""

    name: str
    reason: str


@dataclass(frozen=True)
class Renew:
    """Extend the lease of ``name``'s running instance to ``until`` (the core's clock, µs)."""

    name: str
    until: int


@dataclass(frozen=True)
class Publish:
    """Multicast ``payload`` in ``space`` (in order with this member's other ring messages)."""

    space: str
    payload: bytes


@dataclass(frozen=True)
class JoinSpace:
    space: str


@dataclass(frozen=True)
class LeaveSpace:
    space: str


PlacementAction = Run | Halt | Renew | Publish | JoinSpace | LeaveSpace


class _Released(msgspec.Struct, tag="released", forbid_unknown_fields=True):
    """The sender's domain-controller process of ``epoch`` is gone (graceful handover)."""

    epoch: int


class _Running(msgspec.Struct, tag="running", forbid_unknown_fields=True):
    """The sender runs the domain controller of ``epoch`` (so a later host picks a larger one)."""

    epoch: int


_decoder = msgspec.msgpack.Decoder(_Released | _Running)


# --------------------------------------------------------------------------- state


@dataclass
class _Term:
    epoch: int
    start_at: int               # the process may run from here (after fencing)
    running: bool = False       # Run given, lease live
    lease_until: int = 0
    renew_at: int = 0


@dataclass
class _Placed:
    spec: ProcessSpec
    space: str
    eligible: frozenset[int] | None
    members: tuple[int, ...] = ()
    host: int | None = None                 # the last host a regular primary space view chose
    released_by: int | None = None          # that host said its process is gone
    term: _Term | None = None               # domain controller: this node's term
    wanted: bool = False                    # replicas: an instance runs here
    live: bool = False                      # Run given, no Halt since
    awaiting_stop: bool = False             # Halt given, not yet reported stopped
    leaving: bool = False                   # handing over before leaving the space
    epoch_held: int | None = None           # the term whose process may still be alive (for the release)
    announced: int = -1                     # the largest epoch this space announced

    @property
    def is_dc(self) -> bool:
        return self.spec.role == DOMAIN_CONTROLLER


@dataclass
class _Health:
    primary: bool = False
    transitional: tuple[int, ...] | None = None
    tokens: int = -1
    last_token: int | None = None           # when the token count was last seen to advance
    last_tick: int | None = None
    distrust_until: int = 0                 # after a pause: tokens read before this may be stale


class ClusterPlacement:
    """This node's share of the cluster-placed processes; feed it deliveries and the time.

    ``me``: this member's node id; ``node_id(name)``: the node id of a node name
    (to read ``eligible``); ``space``: the base name of the placement spaces.
    Every method returns the actions to carry out, in order.
    """

    def __init__(self, me: int, fencing: Fencing, *, node_id: Callable[[str], int],
                 space: str = ClusterSettings.space) -> None:
        self.me = me
        self.fencing = fencing
        self._node_id = node_id
        self._base = space
        self._placed: dict[str, _Placed] = {}
        self._by_space: dict[str, _Placed] = {}
        self._health = _Health()
        self._fence = _us(fencing.fencing_delay)
        self._lease = _us(fencing.lease)
        self._token_timeout = _us(fencing.token_timeout)
        self._check = _us(fencing.liveness_check)
        self._pause = self._check + max(self._token_timeout // 2, 1)
        self._leaving = False
        self.dropped = 0
        """Malformed placement messages received (counted and ignored)."""

    # ------------------------------------------------------------------ processes

    def add(self, now: int, spec: ProcessSpec) -> list[PlacementAction]:
        """Place ``spec`` (a cluster-placed process): join its space."""
        if not spec.cluster_placed:
            raise ValueError(f"process {spec.name!r} is not cluster-placed")
        if spec.name in self._placed:
            raise ValueError(f"process {spec.name!r} is already placed")
        eligible = frozenset(self._node_id(n) for n in spec.eligible) if spec.eligible else None
        placed = _Placed(spec, placement_space(self._base, spec.name), eligible)
        self._placed[spec.name] = placed
        self._by_space[placed.space] = placed
        return [JoinSpace(placed.space)]

    def remove(self, now: int, name: str) -> list[PlacementAction]:
        """Stop placing ``name`` here: halt it, hand over, leave its space (then it is forgotten)."""
        placed = self._placed[name]
        out: list[PlacementAction] = []
        self._hand_over(now, placed, out)
        return out

    def leave(self, now: int) -> list[PlacementAction]:
        """This supervisor is stopping: hand every placed process over (see :attr:`done_leaving`)."""
        self._leaving = True
        out: list[PlacementAction] = []
        for placed in list(self._placed.values()):
            self._hand_over(now, placed, out)
        return out

    @property
    def done_leaving(self) -> bool:
        """After :meth:`leave`: every placed process is halted and handed over."""
        return self._leaving and not self._placed

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._placed)

    def spaces(self) -> tuple[str, ...]:
        return tuple(self._by_space)

    def can_host(self, name: str) -> bool:
        """Whether this node is eligible to run ``name`` at all."""
        placed = self._placed.get(name)
        return placed is not None and (placed.eligible is None or self.me in placed.eligible)

    def is_leaving(self, name: str) -> bool:
        """Whether ``name`` is being handed over (removed, or the supervisor stops)."""
        placed = self._placed.get(name)
        return placed is not None and placed.leaving

    def awaiting_stop(self) -> tuple[str, ...]:
        """The processes halted whose end :meth:`stopped` has not reported yet."""
        return tuple(name for name, placed in self._placed.items() if placed.awaiting_stop)

    def role(self, name: str) -> str:
        """The role ``name`` runs with here (``GROUPCOMM_ROLE``)."""
        placed = self._placed[name]
        return DOMAIN_CONTROLLER if placed.is_dc else (placed.spec.role or REPLICA)

    def epoch(self, name: str) -> int | None:
        """The epoch of this node's current term for ``name`` (None: not its host)."""
        placed = self._placed.get(name)
        return placed.term.epoch if placed is not None and placed.term is not None else None

    def lease_valid(self, name: str, now: int) -> bool:
        """Whether ``name`` may run here now (a replica that is wanted, or a term with a live lease)."""
        placed = self._placed.get(name)
        if placed is None or placed.leaving:
            return False
        if not placed.is_dc:
            return placed.wanted
        term = placed.term
        return term is not None and term.running and now < term.lease_until

    def lease_until(self, name: str) -> int | None:
        placed = self._placed.get(name)
        term = placed.term if placed is not None else None
        return term.lease_until if term is not None and term.running else None

    # ------------------------------------------------------------------ inputs in total order

    def ring_view(self, now: int, view: View) -> list[PlacementAction]:
        """A ring configuration (transitional or regular), in delivery order."""
        health = self._health
        if view.transitional:
            health.transitional = tuple(view.members)
            return []
        merged = health.transitional is None or tuple(health.transitional) != tuple(view.members)
        health.transitional = None
        health.primary = bool(view.primary)
        out: list[PlacementAction] = []
        for placed in self._placed.values():
            if merged:
                placed.released_by = None          # the other side may have had a host of its own
            if not view.primary:
                placed.host = None
                self._end(now, placed, "not in a primary component", out)
        return out

    def space_view(self, now: int, view: SpaceView) -> list[PlacementAction]:
        """A view of a space (only the placement spaces matter)."""
        placed = self._by_space.get(view.space)
        if placed is None:
            return []
        placed.members = tuple(view.members)
        out: list[PlacementAction] = []
        health = self._health
        regular = health.transitional is None
        if placed.is_dc:
            # In a transitional configuration a view can only take the process away
            # (the next regular configuration decides anything new).
            host = dc_host(placed.members, placed.eligible, primary=health.primary)
            if host != self.me:
                self._end(now, placed, "another member hosts it" if host is not None else
                          "no primary configuration", out)
                if regular and health.primary:
                    if host != placed.host:
                        placed.released_by = None
                    placed.host = host
            elif regular and placed.term is None and not placed.leaving:
                fresh = placed.host is not None and placed.host != self.me and placed.released_by == placed.host
                placed.host = host
                placed.released_by = None
                start_at = now if fresh else now + self._fence
                placed.term = _Term(epoch_of(view.view_id, placed.announced), start_at)
                placed.announced = max(placed.announced, placed.term.epoch)
            self._drive(now, placed, out)
        else:
            primary = health.primary and regular
            hosts = (replica_hosts(placed.spec.name, placed.members, placed.eligible,
                                   placed.spec.replicas or 1, primary=True) if primary else ())
            if regular:
                self._want(now, placed, primary and self.me in hosts and not placed.leaving, out)
        return out

    def space_message(self, now: int, space: str, sender: int, payload: bytes) -> list[PlacementAction]:
        """A message multicast in a space (only ``released`` in placement spaces matters)."""
        placed = self._by_space.get(space)
        if placed is None:
            return []
        try:
            message = _decoder.decode(payload)
        except (msgspec.DecodeError, msgspec.ValidationError):
            self.dropped += 1
            return []
        if not 0 <= message.epoch < 1 << 63:
            self.dropped += 1
            return []
        placed.announced = max(placed.announced, message.epoch)
        if type(message) is _Released and sender == placed.host and sender != self.me:
            placed.released_by = sender
        return []

    # ------------------------------------------------------------------ local inputs

    def stopped(self, now: int, name: str) -> list[PlacementAction]:
        """The local instance of ``name`` is gone and stays stopped (reported after a :class:`Halt`)."""
        placed = self._placed.get(name)
        if placed is None or not placed.awaiting_stop:
            return []
        placed.awaiting_stop = False
        out: list[PlacementAction] = []
        if placed.leaving:
            self._finish_hand_over(placed, out)
        return out

    def tick(self, now: int, tokens: int | None = None) -> list[PlacementAction]:
        """Do what is due: start after fencing, renew leases, notice lapses and pauses.

        The driver calls it at least every ``liveness_check`` with ``tokens``, its
        ring's count of regular tokens received, and whenever :meth:`next_deadline` is due.
        """
        health = self._health
        if health.last_tick is not None and now - health.last_tick > self._pause:
            # This process did not run for a while: tokens it reads now may have waited in
            # the socket buffer since before the others moved on.
            health.distrust_until = now + self._token_timeout
            health.last_token = None
        health.last_tick = now
        if tokens is not None and tokens != health.tokens:
            health.tokens = tokens
            if now >= health.distrust_until:
                health.last_token = now
        out: list[PlacementAction] = []
        for placed in list(self._placed.values()):
            if placed.is_dc:
                self._drive(now, placed, out)
        return out

    def next_deadline(self) -> int | None:
        """The next time :meth:`tick` must run (the driver also ticks every ``liveness_check``)."""
        health = self._health
        times = [health.last_tick + self._check] if health.last_tick is not None and self._placed else []
        for placed in self._placed.values():
            term = placed.term
            if term is not None:
                times.append(term.renew_at if term.running else term.start_at)
        return min(times, default=None)

    # ------------------------------------------------------------------ the rules

    def _healthy(self, now: int) -> bool:
        health = self._health
        return (health.primary and health.transitional is None and health.last_token is not None
                and now - health.last_token <= self._token_timeout)

    def _drive(self, now: int, placed: _Placed, out: list[PlacementAction]) -> None:
        term = placed.term
        if term is None or placed.leaving:
            return
        healthy = self._healthy(now)
        if term.running:
            if now >= term.lease_until:
                # The guard has killed it (or will at once): this run is over.  Still the
                # host: run again after fencing, as a new host would.
                self._halt(placed, "its lease lapsed", out)
                term.running = False
                term.start_at = now + self._fence
            elif healthy and now >= term.renew_at:
                term.lease_until = now + self._lease
                term.renew_at = now + self._lease // 3
                out.append(Renew(placed.spec.name, term.lease_until))
        elif now >= term.start_at and healthy:
            term.running = True
            term.lease_until = now + self._lease
            term.renew_at = now + self._lease // 3
            placed.live = True
            if placed.epoch_held != term.epoch:
                out.append(Publish(placed.space, msgspec.msgpack.encode(_Running(term.epoch))))
            placed.epoch_held = term.epoch
            out.append(Run(placed.spec.name, DOMAIN_CONTROLLER, term.epoch, term.lease_until))

    def _end(self, now: int, placed: _Placed, reason: str, out: list[PlacementAction]) -> None:
        """This node is no longer the host (or a replica): halt at once."""
        if placed.is_dc:
            if placed.term is not None:
                placed.term = None
                self._halt(placed, reason, out)
        else:
            self._want(now, placed, False, out)

    def _want(self, now: int, placed: _Placed, wanted: bool, out: list[PlacementAction]) -> None:
        if wanted == placed.wanted:
            return
        placed.wanted = wanted
        if wanted:
            placed.live = True
            out.append(Run(placed.spec.name, REPLICA))
        else:
            self._halt(placed, "placed elsewhere", out)

    def _halt(self, placed: _Placed, reason: str, out: list[PlacementAction]) -> None:
        if placed.live:
            placed.live = False
            placed.awaiting_stop = True
            out.append(Halt(placed.spec.name, reason))

    def _hand_over(self, now: int, placed: _Placed, out: list[PlacementAction]) -> None:
        if placed.leaving:
            return
        placed.leaving = True
        placed.wanted = False
        if placed.term is not None:
            placed.epoch_held = placed.term.epoch
            placed.term = None
        self._halt(placed, "handing over", out)
        if not placed.awaiting_stop:
            self._finish_hand_over(placed, out)

    def _finish_hand_over(self, placed: _Placed, out: list[PlacementAction]) -> None:
        if placed.is_dc and placed.epoch_held is not None and placed.host == self.me:
            out.append(Publish(placed.space, msgspec.msgpack.encode(_Released(placed.epoch_held))))
        out.append(LeaveSpace(placed.space))
        del self._placed[placed.spec.name]
        del self._by_space[placed.space]
