"""Events a member delivers to its application, in order.

Small frozen values (h11 style): dispatch on ``type(event)``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RingId:
    """Identity of a ring: the representative's node id and a 64-bit ring sequence."""

    rep: int
    seq: int

    def __str__(self) -> str:
        return f"{self.rep}:{self.seq}"


@dataclass(frozen=True, slots=True)
class Configuration:
    """A membership view.

    ``transitional=False``: a regular configuration, ``members`` is the new ring.
    ``transitional=True``: the members of the new ring that come from this
    member's previous ring; it is delivered just before the regular one, with
    the same ``ring_id``, and messages delivered between the two met only the
    weaker guarantees of the transitional configuration (EVS).
    The first configuration of an incarnation is always regular.
    """

    ring_id: RingId
    members: tuple[int, ...]
    transitional: bool


@dataclass(frozen=True, slots=True)
class Delivery:
    """One application message, delivered in the total order.

    ``safe`` is the guarantee the sender asked for: agreed (``False``) or safe.
    """

    sender: int
    payload: bytes
    safe: bool


@dataclass(frozen=True, slots=True)
class Crashed:
    """Marks, in a simulated member's history, where a crash cut an incarnation short."""


Event = Configuration | Delivery | Crashed
