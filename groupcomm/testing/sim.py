"""A deterministic simulated network of ring members, in virtual time.

Every member runs the real C core.  Packets travel through a seeded model of
the network (latency, loss, duplication, reordering, partitions); timers fire
when virtual time reaches them.  Same seed and same calls give the same
histories, byte for byte.
"""

from __future__ import annotations

import heapq
import random
import struct
from collections.abc import Callable, Iterable
from typing import Any
from dataclasses import dataclass

from groupcomm.errors import ConfigError, LocalProtocolError, NotOperational, PayloadTooLarge
from groupcomm.events import Configuration, Crashed, Delivery, Event, View
from groupcomm.layers.quorum import MemoryStore, QuorumConfig
from groupcomm.core.ring import Ring, RingConfig, RingState, SendTo, SendToAll
from groupcomm.layers.member import Member
from groupcomm.layers.router import Router
from groupcomm.testing.sim_services import ServiceApps
from groupcomm.testing.evs import SendRecord, check_evs

__all__ = ["SimCluster", "NetworkModel"]

_US = 1_000_000
# Every simulated send carries a hidden 8-byte serial number ahead of the user's
# payload, so the EVS checker identifies messages exactly even when users send
# the same bytes twice.  Histories shown to users have it stripped.
_TAG = struct.Struct(">Q")


@dataclass(frozen=True)
class NetworkModel:
    """How the simulated network treats each packet (per receiver)."""

    loss: float = 0.0
    """Probability a packet is lost."""
    duplicate: float = 0.0
    """Probability a packet arrives twice."""
    reorder: bool = False
    """Let packets on one link overtake each other."""
    latency: tuple[float, float] = (50e-6, 150e-6)
    """One-way delay, uniform between these (seconds)."""

    @property
    def clean(self) -> bool:
        return self.loss == 0 and self.duplicate == 0


class _LayersAsRing:
    """Presents a :class:`~groupcomm.layers.member.Member` (the production layers) with the Ring interface."""

    def __init__(self, member: Member, routes: dict[type, Callable[[Any], None]]) -> None:
        self.member = member
        self.multicast = member.multicast
        self._now = 0
        self._out: list = []
        on_view = routes[View]

        def view(item: View) -> None:
            self._out.append(Configuration(item.ring_id, item.members, item.transitional))
            on_view(item)

        self._router = Router(routes, {
            list: lambda run: self._out.extend(Delivery(m.sender, m.payload, m.safe) for m in run),
            View: view, SendTo: self._packet, SendToAll: self._packet,
        })

    def __getattr__(self, name: str):
        return getattr(self.multicast.ring, name)          # state, ring_seq, stats, debug, members...

    @property
    def max_payload(self) -> int:
        return self.multicast.frag.max_message

    @property
    def pending(self) -> int:
        return self.multicast.pending

    def receive(self, now: int, packet: bytes) -> None:
        self._now = now
        self.member.receive(now, packet)

    def submit(self, now: int, payload: bytes, *, safe: bool = False) -> None:
        self._now = now
        self.member.send(now, payload, safe)

    def tick(self, now: int) -> None:
        self._now = now
        self.member.tick(now)

    def leave(self, now: int) -> None:
        self._now = now
        self.member.leave(now)

    def next_deadline(self) -> int | None:
        return self.member.next_deadline()

    def suspect(self, now: int, node: int) -> bool:
        return self.member.suspect(now, node)

    def _packet(self, packet: SendTo | SendToAll) -> None:
        self._out.append(packet)

    def take(self) -> list:
        self._out = out = []
        items = self.member.take(self._now)
        while items:
            self._router.route(items)
            # The application's answers (a reply, a snapshot) produce outputs of their own now.
            items = self.member.take(self._now) if self.member.has_output else []
        return out


class _Member:
    __slots__ = ("node", "ring", "incarnation", "ring_seq", "state")

    def __init__(self, node: int) -> None:
        self.node = node
        self.ring: Ring | None = None
        self.incarnation = -1
        self.ring_seq = 0        # "stable storage": highest ring seq ever used
        self.state = MemoryStore()    # the member's state directory (what the quorum rule remembers)


class SimCluster:
    """A cluster of ring members on a simulated network, in virtual time.

    ``nodes`` is a count (members ``1..n``) or an iterable of node ids.  Every
    member starts at virtual time 0.
    """

    def __init__(
        self,
        nodes: int | Iterable[int] = 3,
        seed: int = 0,
        config: RingConfig | None = None,
        *,
        network: NetworkModel | None = None,
        stack: str | None = None,
        quorum: QuorumConfig | None = None,
    ) -> None:
        ids = list(range(1, nodes + 1)) if isinstance(nodes, int) else sorted(set(nodes))
        if not ids:
            raise ConfigError("SimCluster needs at least one node")
        if any((not isinstance(n, int)) or n < 1 or n >= 2**32 - 1 for n in ids):
            raise ConfigError(f"node ids must be integers in 1..4294967294, got {ids!r}")
        self._fd = self._frag = None
        if stack is not None:
            # The production layers from a stack file (TOTEM, FRAG, FD); the
            # transport is this simulated network.
            from groupcomm.config import build_stack, load_stack

            settings = build_stack(load_stack(stack), transport_optional=True)
            self._fd, self._frag = settings.fd, settings.frag
            config = config or settings.ring
        self._production_layers = stack is not None
        self._quorum = quorum
        self.services = ServiceApps(self)
        """Spaces, request-reply and state transfer on the simulated members (``stack`` only)."""
        self.config = config or RingConfig()
        self.network = network or NetworkModel()
        self._rng = random.Random(seed)
        self._now = 0
        self._queue: list[tuple[int, int, int, bytes]] = []    # (time, order, dest, packet)
        self._order = 0
        self._link_clock: dict[tuple[int, int], int] = {}
        self._groups: dict[int, int] | None = None             # node -> partition group
        self._cuts: dict[tuple[int, int], bool] = {}            # (src, dest) -> multicast only
        self._members = {n: _Member(n) for n in ids}
        self._histories: dict[int, list[Event]] = {n: [] for n in ids}
        self._tagged: dict[int, list[Event]] = {n: [] for n in ids}   # what the checker sees
        self._sends: list[SendRecord] = []
        self._user_sends: list[SendRecord] = []
        self._quiet_since = 0                                   # last fault change or send
        self._observers: list[Callable[[int, Event], None]] = []
        self._packet_observers: list[Callable[[int, bytes], None]] = []
        self._paused: dict[int, int] = {}                      # node -> virtual time it resumes
        self._held: dict[int, list[bytes]] = {}                 # packets waiting for a paused node
        for n in ids:
            self._boot(n)
        self._max_payload: int = self._members[ids[0]].ring.max_payload - _TAG.size  # type: ignore[union-attr]

    # -- membership of the simulation ----------------------------------------

    @property
    def nodes(self) -> tuple[int, ...]:
        return tuple(self._members)

    @property
    def live(self) -> tuple[int, ...]:
        """Nodes currently running (not crashed)."""
        return tuple(n for n, m in self._members.items() if m.ring is not None)

    @property
    def now(self) -> float:
        """Virtual time in seconds."""
        return self._now / _US

    @property
    def now_us(self) -> int:
        """Virtual time in integer microseconds (the layers' clock)."""
        return self._now

    def layers(self, node: int) -> Member:
        """The production layers (:class:`~groupcomm.layers.member.Member`) of running ``node``.

        Only with ``stack=``; raises :class:`NotOperational` if ``node`` is crashed.
        Call them through :meth:`act`, which delivers what they hand out.
        """
        m = self._member(node)
        if m.ring is None:
            raise NotOperational(f"node {node} is crashed")
        if not isinstance(m.ring, _LayersAsRing):
            raise LocalProtocolError("SimCluster.layers needs a cluster built with stack=... (e.g. stack='sim')")
        return m.ring.member

    def act(self, node: int, action: Callable[[Member, int], object]) -> None:
        """Run ``action(member, now_us)`` on ``node``'s layers (see :meth:`layers`) and deliver their outputs.

        Counts as activity: :meth:`converged` waits for the network to settle after it.
        """
        action(self.layers(node), self._now)
        self._quiet_since = self._now
        self._flush(self._member(node))

    def _member(self, node: int) -> _Member:
        try:
            return self._members[node]
        except KeyError:
            raise LocalProtocolError(f"no node {node} in this cluster (nodes: {list(self._members)})") from None

    def _boot(self, node: int) -> None:
        m = self._members[node]
        m.incarnation += 1
        floor = m.ring_seq + 1 if m.incarnation > 0 else 0
        if self._production_layers:
            member = Member(node, self.config, fd=self._fd, frag=self._frag, quorum=self._quorum,
                            ring_seq_floor=floor, epoch=m.incarnation + 1)
            member.spaces.quorum.use(m.state, clock=lambda: self._now)
            member.start(self._now)
            m.ring = _LayersAsRing(member, self.services.routes(node))  # type: ignore[assignment]
        else:
            m.ring = Ring(node, self.config, ring_seq_floor=floor)
            m.ring.start(self._now)
        self._flush(m)

    def crash(self, node: int) -> None:
        """Stop ``node`` at once, losing all its state (its history records ``Crashed()``)."""
        m = self._member(node)
        if m.ring is None:
            raise LocalProtocolError(f"node {node} is already crashed")
        m.ring_seq = max(m.ring_seq, m.ring.ring_seq)
        m.ring = None
        self._crashed(node)

    def _crashed(self, node: int) -> None:
        self._paused.pop(node, None)
        self._held.pop(node, None)
        self.services.crashed(node)
        self._tagged[node].append(Crashed())
        self._record(node, Crashed())
        self._quiet_since = self._now

    def restart(self, node: int, *, keep_state_dir: bool = True) -> None:
        """Start a crashed ``node`` again: same id, new incarnation, empty state.

        Its state directory (what its quorum rule remembers) survives, as on a
        real host; ``keep_state_dir=False`` starts it with a new, empty one.
        """
        m = self._member(node)
        if m.ring is not None:
            raise LocalProtocolError(f"node {node} is running; crash it before restarting")
        if not keep_state_dir:
            m.state = MemoryStore()
        self._quiet_since = self._now
        self._boot(node)

    def leave(self, node: int) -> None:
        """``node`` leaves gracefully; its incarnation ends (recorded like a crash)."""
        m = self._member(node)
        if m.ring is None:
            raise LocalProtocolError(f"node {node} is not running")
        if node in self._paused:
            raise NotOperational(f"node {node} is paused")
        m.ring.leave(self._now)
        self._flush(m)
        m.ring_seq = max(m.ring_seq, m.ring.ring_seq)
        m.ring = None
        self._crashed(node)

    def suspect(self, node: int, suspected: int) -> bool:
        """``node``'s failure detector reports ``suspected`` dead (see :meth:`Ring.suspect`)."""
        m = self._running(node)
        acted = m.ring.suspect(self._now, suspected)  # type: ignore[union-attr]
        self._quiet_since = self._now
        self._flush(m)
        return acted

    def pause(self, node: int, seconds: float) -> None:
        """Stop ``node`` for ``seconds`` of virtual time, as SIGSTOP, a long GC or a VM stall would.

        Its timers do not fire and the packets that reach it wait, as in a socket
        buffer.  On resume its overdue timers fire first, then it reads the
        waiting packets in arrival order, all at the resume time.
        """
        m = self._running(node)
        if not (isinstance(seconds, (int, float)) and 0 < seconds < float("inf")):
            raise ConfigError(f"pause: seconds must be a positive number, got {seconds!r}")
        self._paused[m.node] = self._now + int(round(seconds * _US))
        self._quiet_since = self._now

    def paused(self, node: int) -> bool:
        """Whether ``node`` is paused now (see :meth:`pause`)."""
        return node in self._paused

    def inject(self, node: int, packet: bytes) -> None:
        """Hand ``packet`` to ``node`` now as if the network delivered it (a late or
        replayed copy, a forged or corrupted packet), and deliver its outputs."""
        m = self._running(node)
        m.ring.receive(self._now, bytes(packet))  # type: ignore[union-attr]
        self._quiet_since = self._now
        self._flush(m)

    def _running(self, node: int) -> _Member:
        """``node``'s member, if it can act now (not crashed, not paused)."""
        m = self._member(node)
        if m.ring is None:
            raise NotOperational(f"node {node} is crashed")
        if node in self._paused:
            raise NotOperational(f"node {node} is paused")
        return m

    def _resume(self, m: _Member) -> None:
        ring = m.ring
        del self._paused[m.node]
        assert ring is not None
        deadline = ring.next_deadline()
        if deadline is not None and deadline <= self._now:
            ring.tick(self._now)
            self._flush(m)
        for packet in self._held.pop(m.node, []):
            ring.receive(self._now, packet)
            self._flush(m)

    # -- the network ------------------------------------------------------------

    def set_network(
        self,
        loss: float = 0.0,
        duplicate: float = 0.0,
        reorder: bool = False,
        latency: tuple[float, float] | None = None,
    ) -> None:
        """Change how packets are treated from now on."""
        for name, p in (("loss", loss), ("duplicate", duplicate)):
            if not 0.0 <= p <= 1.0:
                raise ConfigError(f"set_network: {name} must be a probability in [0, 1], got {p!r}")
        lat = latency or self.network.latency
        if not (0 < lat[0] <= lat[1]):
            raise ConfigError(f"set_network: latency must be (low, high) with 0 < low <= high, got {lat!r}")
        self.network = NetworkModel(loss, duplicate, reorder, lat)
        self._quiet_since = self._now

    def partition(self, groups: Iterable[Iterable[int]]) -> None:
        """Split the network: members talk only within their group.

        Nodes not named in any group are isolated on their own.
        """
        assignment: dict[int, int] = {}
        for g, group in enumerate(groups):
            for n in group:
                self._member(n)
                if n in assignment:
                    raise ConfigError(f"partition: node {n} is in two groups")
                assignment[n] = g
        next_group = len(assignment) + 1000
        for n in self._members:
            if n not in assignment:
                assignment[n] = next_group
                next_group += 1
        self._groups = assignment
        self._quiet_since = self._now

    def cut(self, src: int, dest: int, *, multicast_only: bool = False) -> None:
        """Lose every packet from ``src`` to ``dest``, one way only (``dest`` still reaches ``src``).

        ``multicast_only``: lose only what ``src`` sends to everyone; its
        packets to ``dest`` alone (the token, a unicast) still arrive, a member
        that is partly deaf.  :meth:`heal` repairs cuts too.
        """
        self._member(src), self._member(dest)
        if src == dest:
            raise ConfigError("cut: a link joins two different nodes")
        self._cuts[(src, dest)] = multicast_only
        self._quiet_since = self._now

    def heal(self) -> None:
        """Remove every partition and every cut link."""
        self._groups = None
        self._cuts.clear()
        self._quiet_since = self._now

    def _connected(self, a: int, b: int, multicast: bool = False) -> bool:
        """Whether a packet from ``a`` reaches ``b`` now (checked when sent, and again on arrival)."""
        if self._groups is not None and self._groups[a] != self._groups[b]:
            return False
        cut = self._cuts.get((a, b))
        return cut is None or (cut and not multicast)

    def _transmit(self, src: int, dest: int, packet: bytes, multicast: bool) -> None:
        net = self.network
        rng = self._rng
        if not self._connected(src, dest, multicast) or (net.loss and rng.random() < net.loss):
            return
        copies = 2 if net.duplicate and rng.random() < net.duplicate else 1
        lo, hi = (int(net.latency[0] * _US), int(net.latency[1] * _US))
        for _ in range(copies):
            at = self._now + rng.randint(lo, hi) if hi > lo else self._now + lo
            if net.reorder:
                at += rng.randint(0, 4 * hi)
            else:
                link = (src, dest)
                at = max(at, self._link_clock.get(link, 0))
                self._link_clock[link] = at
            self._order += 1
            heapq.heappush(self._queue, (at, self._order, dest, packet, src))  # type: ignore[arg-type]

    # -- driving members ----------------------------------------------------------

    def _flush(self, m: _Member) -> None:
        ring = m.ring
        assert ring is not None
        node = m.node
        for out in ring.take():
            t = type(out)
            if self._packet_observers and (t is SendToAll or t is SendTo):
                for see in self._packet_observers:
                    see(node, out.packet)
            if t is SendToAll:
                for dest in self._members:
                    if dest != node:
                        self._transmit(node, dest, out.packet, True)
            elif t is SendTo:
                if out.node in self._members and out.node != node:
                    self._transmit(node, out.node, out.packet, False)
            elif t is Delivery:
                self._tagged[node].append(out)
                self._record(node, Delivery(out.sender, out.payload[_TAG.size :], out.safe))
            else:
                self._tagged[node].append(out)
                self._record(node, out)

    def _record(self, node: int, event: Event) -> None:
        self._histories[node].append(event)
        for observe in self._observers:
            observe(node, event)

    def send(self, node: int, payload: bytes, safe: bool = False) -> None:
        """Submit ``payload`` at ``node`` for totally ordered delivery.

        Raises :class:`~groupcomm.errors.LocalProtocolError` (e.g. ``NotOperational``
        for a crashed node, ``QueueFull``, ``PayloadTooLarge``) if the member
        cannot accept it now.
        """
        m = self._member(node)
        if m.ring is None:
            raise NotOperational(f"node {node} is crashed; restart it before sending")
        if node in self._paused:
            raise NotOperational(f"node {node} is paused")
        if len(payload) > self.max_payload:
            raise PayloadTooLarge(
                f"payload of {len(payload)} bytes is over the simulated ring's limit of "
                f"{self.max_payload} bytes per message (mtu {self.config.mtu})"
            )
        tagged = _TAG.pack(len(self._sends)) + bytes(payload)
        m.ring.submit(self._now, tagged, safe=safe)
        self._sends.append(SendRecord(node, m.incarnation, tagged, bool(safe)))
        self._user_sends.append(SendRecord(node, m.incarnation, bytes(payload), bool(safe)))
        self._quiet_since = self._now
        self._flush(m)

    @property
    def max_payload(self) -> int:
        """Largest payload :meth:`send` accepts."""
        return self._max_payload

    def _next_timer(self) -> int | None:
        best = None
        for m in self._members.values():
            if m.ring is not None:
                d = self._paused[m.node] if m.node in self._paused else m.ring.next_deadline()
                if d is not None and (best is None or d < best):
                    best = d
        return best

    def run(self, seconds: float) -> None:
        """Advance virtual time by ``seconds``, delivering packets and firing timers."""
        if seconds < 0:
            raise ConfigError(f"run: seconds must be >= 0, got {seconds!r}")
        self._run_until(self._now + int(round(seconds * _US)))

    def run_until(self, predicate: Callable[[], bool], timeout: float, step: float = 0.01) -> bool:
        """Run until ``predicate()`` holds (checked every ``step`` s); False on timeout."""
        end = self._now + int(round(timeout * _US))
        while self._now < end:
            if predicate():
                return True
            self._run_until(min(end, self._now + int(round(step * _US))))
        return predicate()

    def _run_until(self, end: int) -> None:
        queue = self._queue
        members = self._members
        while True:
            timer = self._next_timer()
            packet_at = queue[0][0] if queue else None
            if packet_at is not None and packet_at <= end and (timer is None or packet_at <= timer):
                at, _, dest, packet, _src = heapq.heappop(queue)  # type: ignore[misc]
                self._now = at
                m = members[dest]
                if m.ring is None or not self._connected(_src, dest):
                    continue
                if dest in self._paused:
                    self._held.setdefault(dest, []).append(packet)
                    continue
                m.ring.receive(at, packet)
                self._flush(m)
            elif timer is not None and timer <= end:
                self._now = max(self._now, timer)
                for m in members.values():
                    if m.ring is not None:
                        if m.node in self._paused:
                            if self._paused[m.node] <= self._now:
                                self._resume(m)
                            continue
                        d = m.ring.next_deadline()
                        if d is not None and d <= self._now:
                            m.ring.tick(self._now)
                            self._flush(m)
            else:
                break
        self._now = max(self._now, end)

    # -- observation ----------------------------------------------------------

    def history(self, node: int) -> list[Event]:
        """Everything ``node`` delivered, in order, across incarnations."""
        return list(self._histories[self._member(node).node])

    def histories(self) -> dict[int, list[Event]]:
        return {n: list(h) for n, h in self._histories.items()}

    @property
    def sends(self) -> list[SendRecord]:
        """Every send a member accepted, in order."""
        return list(self._user_sends)

    def ring(self, node: int) -> Ring | None:
        """The live ring of ``node`` (None if crashed), for stats and state."""
        return self._member(node).ring

    def view(self, node: int) -> Configuration | None:
        """The last regular configuration ``node`` installed in its current incarnation."""
        for ev in reversed(self._histories[self._member(node).node]):
            if type(ev) is Crashed:
                return None
            if type(ev) is Configuration and not ev.transitional:
                return ev
        return None

    def converged(self) -> bool:
        """All live members are operational in one ring made of exactly the live members."""
        live = self.live
        views = {self.view(n) for n in live}
        if len(views) != 1:
            return False
        (view,) = views
        return (
            view is not None
            and view.members == tuple(sorted(live))
            and all(self._members[n].ring.state == RingState.OPERATIONAL for n in live)  # type: ignore[union-attr]
        )

    def add_observer(self, observe: Callable[[int, Event], None]) -> None:
        """Call ``observe(node, event)`` for every event as it is delivered."""
        self._observers.append(observe)

    def add_packet_observer(self, observe: Callable[[int, bytes], None]) -> None:
        """Call ``observe(node, packet)`` for every packet a member sends (to capture traffic)."""
        self._packet_observers.append(observe)

    @property
    def settle_time(self) -> float:
        """Quiet virtual time after which a clean network must have converged."""
        c = self.config
        consensus = c.consensus if c.consensus is not None else 1.2 * c.token_timeout
        return 4 * (c.token_timeout + consensus) + 1.0

    def settled(self) -> bool:
        """The network is clean and nothing changed for :attr:`settle_time`."""
        return (
            self._groups is None
            and not self._cuts
            and self.network.clean
            and (self._now - self._quiet_since) >= self.settle_time * _US
        )

    def check(self, settled: bool | None = None) -> None:
        """Raise :class:`~groupcomm.errors.EVSViolation` with a report if EVS is broken.

        Safety properties are always checked.  Eventual ones (self delivery, one
        common view with everything delivered) are checked when ``settled`` is
        true; by default, when :meth:`settled` says the run has been quiet long
        enough on a clean network.
        """
        if settled is None:
            settled = self.settled()
        check_evs(self._tagged, self._sends, live=self.live, settled=settled)
