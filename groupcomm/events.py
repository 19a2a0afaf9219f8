"""Events a member delivers to its application, in order.

Small immutable values (h11 style): dispatch on ``type(event)`` or ``match``.
They are typed named tuples rather than frozen dataclasses because one is
built per delivered message, and a named tuple is built about 2.4 times
faster; they compare equal to plain tuples of the same fields.
"""

from __future__ import annotations

from typing import NamedTuple, Union


class RingId(NamedTuple):
    """Identity of a ring: the representative's node id and a 64-bit ring sequence."""

    rep: int
    seq: int

    def __str__(self) -> str:
        return f"{self.rep}:{self.seq}"


class Configuration(NamedTuple):
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


class Delivery(NamedTuple):
    """One application message, delivered in the total order.

    ``safe`` is the guarantee the sender asked for: agreed (``False``) or safe.
    """

    sender: int
    payload: bytes
    safe: bool


class Crashed(NamedTuple):
    """Marks, in a simulated member's history, where a crash cut an incarnation short."""

    def __repr__(self) -> str:
        return "Crashed()"


Event = Union[Configuration, Delivery, Crashed]


class Message(NamedTuple):
    """An application message delivered by a :class:`~groupcomm.io.channel.Channel`, in total order."""

    sender: int
    payload: bytes
    safe: bool


class View(NamedTuple):
    """A membership view delivered by a :class:`~groupcomm.io.channel.Channel`.

    ``transitional=True`` views come just before the regular view of the same
    ``ring_id`` and list the members that came along from our previous view.
    ``primary``: the view holds a majority of the expected votes (see
    :mod:`groupcomm.layers.quorum`); services refuse writes when it is False.
    """

    members: tuple[int, ...]
    ring_id: RingId
    transitional: bool
    primary: bool = True


class Direct(NamedTuple):
    """A point-to-point message (:meth:`~groupcomm.io.channel.Channel.send_to`).

    FIFO and exactly once per sender, but not ordered with the ring's messages.
    """

    sender: int
    payload: bytes


ChannelEvent = Union[Message, View, Direct]
