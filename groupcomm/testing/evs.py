"""Check Extended Virtual Synchrony (Moser et al., 1994) over recorded histories.

A pure-Python oracle: give it what every node delivered and what the library
accepted, and it reports every EVS property the run breaks, in a form meant for
a human debugging a failing randomized test.

Histories
    ``histories[n]`` is everything node ``n`` delivered, in order, across its
    incarnations.  A :class:`~groupcomm.events.Crashed` event ends one
    incarnation; the events after it belong to the next one (0, 1, 2 ...).  An
    incarnation that does not end in ``Crashed`` is still running.

Sends
    ``sends`` lists every send the library *accepted*, in the order accepted;
    per sender this is the FIFO order.  A message is named in reports by its
    index in this list (``#17``).

Message identity
    A ``Delivery`` carries only the sender and the payload, so messages are
    matched by occurrence: the k-th ``Delivery(sender=p, payload=x)`` in ONE
    incarnation's history is the k-th accepted ``SendRecord(sender=p,
    payload=x)``, counting over all of p's incarnations in the order of
    ``sends``.  Repeated payloads are therefore identified correctly only when
    every incarnation that delivers a copy also delivered all the earlier
    copies; an incarnation that joins (or restarts) after the first copy went
    out would be blamed for the wrong message.  Randomized tests should make
    payloads unique (embed sender, incarnation and a counter).

Configurations
    A regular configuration is identified by its ``ring_id``; a transitional
    one by ``(ring_id, members)``: it carries the ring id of the regular
    configuration that follows it, and members of the new ring that come from
    different old rings get different transitional configurations.  The
    deliveries between a configuration event and the next one are "in" that
    configuration.  An *epoch* is a regular configuration C, the transitional
    configuration T that follows it (if any) and the next regular one C'.

Properties (each report starts with its name in brackets)::

        [no creation]       every delivery matches an accepted send, with the same ``safe`` flag.
        [no duplication]    a node delivers a message at most once, across all its incarnations.
        [per-sender FIFO]   messages of one sender incarnation are delivered in send order.
        [total order]       the union of all incarnations' delivery orders is acyclic.
        [configuration consistency]
                            one member list per regular ring id; a node is a member of what it
                            installs; regular ring seqs strictly increase within an incarnation;
                            the first configuration is regular and comes before any delivery; a
                            transitional T is next followed by the regular config of T's ring id
                            (unless the incarnation ends) and T's members are a subset of both
                            regular configs around it; no node installs a regular ring id twice.
        [virtual synchrony] incarnations of different nodes that go from C to the same next
                            regular C' delivered the same set in C and, if both went through a
                            transitional config, went through the same one and delivered the
                            same set in it.
        [same configuration] incarnations that deliver m in regular configs do so in the same
                            ring (deliveries in transitional configs are not compared).
        [safe delivery]     a safe m delivered in regular C (or transitional T) is delivered by
                            every member q of C (or T) in C or the T after it (or in T or the C
                            before it), counting q's incarnation that installed C (or T); q is
                            judged once it installed the next regular config (even if it crashed
                            later), or, when ``settled``, if it is still up.
        [self delivery]     (settled only) every send of an incarnation still up was delivered
                            back to it.
        [liveness]          (settled only) every live node's last configuration is one regular
                            configuration whose members are exactly the live nodes, and all of
                            them delivered the same messages in it.
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from groupcomm.errors import EVSViolation
from groupcomm.events import Configuration, Crashed, Delivery, Event, RingId

__all__ = ["SendRecord", "check_evs", "evs_violations"]

# Property names: every report starts with "[<name>]".
_NO_CREATION = "no creation"
_NO_DUPLICATION = "no duplication"
_FIFO = "per-sender FIFO"
_TOTAL_ORDER = "total order"
_CONFIGURATION = "configuration consistency"
_VIRTUAL_SYNCHRONY = "virtual synchrony"
_SAME_CONFIGURATION = "same configuration"
_SAFE = "safe delivery"
_SELF = "self delivery"
_LIVENESS = "liveness"

_REPORT_LIMIT = 20  # violations joined into the EVSViolation message
_LIST_LIMIT = 8  # messages listed in one report
_PAYLOAD_LIMIT = 40  # payload bytes shown
_EXCERPT_RADIUS = 2  # history events shown either side of a point of interest
_CYCLE_TRIES = 10  # cycle nodes tried when shortening a total-order cycle


@dataclass(frozen=True, slots=True)
class SendRecord:
    """A send the library accepted from ``sender``'s ``incarnation``-th life."""

    sender: int
    incarnation: int
    payload: bytes
    safe: bool


# --------------------------------------------------------------------------- API


def check_evs(
    histories: Mapping[int, Sequence[Event]],
    sends: Sequence[SendRecord],
    *,
    live: Collection[int] | None = None,
    settled: bool = False,
) -> None:
    """Raise EVSViolation with a readable multi-line report if any property fails.

    ``live`` are the nodes currently up (default: nodes whose last incarnation
    did not end in ``Crashed``).  ``settled=True`` means the network was healed
    long enough ago that the eventual properties (safe delivery by members
    still in the configuration, self delivery, liveness) must hold now.
    """
    violations = evs_violations(histories, sends, live=live, settled=settled)
    if violations:
        raise EVSViolation(_summary(violations))


def evs_violations(
    histories: Mapping[int, Sequence[Event]],
    sends: Sequence[SendRecord],
    *,
    live: Collection[int] | None = None,
    settled: bool = False,
) -> list[str]:
    """Return every violation found, one report string each (see check_evs)."""
    run, violations = _build_run(histories, sends, live, settled)
    checks = _CHECKS + (_SETTLED_CHECKS if settled else ())
    for check in checks:
        violations += check(run)
    return violations


def _summary(violations: list[str]) -> str:
    shown = violations[:_REPORT_LIMIT]
    head = f"EVS violated: {len(violations)} violation(s) found"
    if len(shown) < len(violations):
        head += f"; the first {len(shown)} follow"
    return "\n\n".join([head, *shown])


# ------------------------------------------------------------------- the model


@dataclass(slots=True)
class _Segment:
    """A configuration event and the messages delivered until the next one."""

    config: Configuration | None  # None: deliveries before any configuration
    pos: int  # index in the node's history of the configuration event
    delivered: set[int] = field(default_factory=set)


@dataclass(slots=True)
class _Inc:
    """One incarnation of a node: ``history[start:end]`` (without its Crashed marker)."""

    node: int
    index: int
    history: Sequence[Event]
    start: int
    end: int
    crashed: bool
    segments: list[_Segment] = field(default_factory=list)
    order: list[int] = field(default_factory=list)  # matched messages, in delivery order
    where: dict[int, int] = field(default_factory=dict)  # message -> history index

    @property
    def label(self) -> str:
        return f"node {self.node}/inc {self.index}"


@dataclass(slots=True)
class _Epoch:
    """Regular configuration C, the transitional T after it, and the next regular C'."""

    inc: _Inc
    regular: _Segment
    transitional: _Segment | None
    next_regular: _Segment | None  # None: the incarnation has not (yet) moved on


@dataclass(slots=True)
class _Run:
    sends: tuple[SendRecord, ...]
    incs: dict[int, list[_Inc]]  # node -> its incarnations, nodes sorted
    live: frozenset[int]
    settled: bool
    epochs: list[_Epoch] = field(default_factory=list)
    by_regular: dict[tuple[int, RingId], _Epoch] = field(default_factory=dict)
    by_transitional: dict[tuple[int, RingId, tuple[int, ...]], _Epoch] = field(default_factory=dict)

    def all_incs(self) -> Iterator[_Inc]:
        for incs in self.incs.values():
            yield from incs

    def survived(self, inc: _Inc) -> bool:
        """True if the incarnation is the node's current one and the node is up."""
        return not inc.crashed and inc is self.incs[inc.node][-1] and inc.node in self.live


def _build_run(
    histories: Mapping[int, Sequence[Event]],
    sends: Sequence[SendRecord],
    live: Collection[int] | None,
    settled: bool,
) -> tuple[_Run, list[str]]:
    """Parse the input; return the run and the creation/duplication problems met on the way."""
    sends = tuple(sends)
    incs = _split_incarnations(histories)
    _add_sending_incarnations(incs, sends)
    live_set = _resolve_live(incs, live)
    run = _Run(sends, dict(sorted(incs.items())), live_set, settled)
    problems = _match_deliveries(run)
    _index_epochs(run)
    return run, problems


def _split_incarnations(histories: Mapping[int, Sequence[Event]]) -> dict[int, list[_Inc]]:
    incs: dict[int, list[_Inc]] = {}
    for node, history in histories.items():
        lives: list[_Inc] = []
        start = 0
        for pos, event in enumerate(history):
            if type(event) is Crashed:
                lives.append(_Inc(node, len(lives), history, start, pos, crashed=True))
                start = pos + 1
            elif type(event) not in (Configuration, Delivery):
                raise TypeError(f"histories[{node}][{pos}] is {event!r}, not a groupcomm event")
        if start < len(history) or not lives:
            lives.append(_Inc(node, len(lives), history, start, len(history), crashed=False))
        incs[node] = lives
    return incs


def _add_sending_incarnations(incs: dict[int, list[_Inc]], sends: Sequence[SendRecord]) -> None:
    """Create the (empty) incarnations that accepted sends but delivered nothing yet."""
    for send in sends:
        lives = incs.setdefault(send.sender, [])
        if send.incarnation < len(lives):
            continue
        if lives and not lives[-1].crashed:
            raise ValueError(
                f"a send names incarnation {send.incarnation} of node {send.sender}, but its "
                f"incarnation {lives[-1].index} never crashed ({send!r})"
            )
        while len(lives) <= send.incarnation:
            running = len(lives) == send.incarnation  # earlier gaps must have crashed
            lives.append(_Inc(send.sender, len(lives), (), 0, 0, crashed=not running))


def _resolve_live(incs: dict[int, list[_Inc]], live: Collection[int] | None) -> frozenset[int]:
    """Default the live set; give live nodes with no running incarnation an empty one."""
    if live is None:
        return frozenset(node for node, lives in incs.items() if not lives[-1].crashed)
    for node in live:
        lives = incs.setdefault(node, [])
        if not lives or lives[-1].crashed:
            lives.append(_Inc(node, len(lives), (), 0, 0, crashed=False))
    return frozenset(live)


def _match_deliveries(run: _Run) -> list[str]:
    """Match deliveries to sends by occurrence and cut incarnations into segments."""
    by_key: dict[tuple[int, bytes], list[int]] = {}
    for index, send in enumerate(run.sends):
        by_key.setdefault((send.sender, bytes(send.payload)), []).append(index)
    problems: list[str] = []
    for inc in run.all_incs():
        problems += _match_incarnation(run, inc, by_key)
    return problems


def _match_incarnation(run: _Run, inc: _Inc, by_key: dict[tuple[int, bytes], list[int]]) -> list[str]:
    problems: list[str] = []
    seen: dict[tuple[int, bytes], int] = {}
    segment: _Segment | None = None
    history = inc.history
    for pos in range(inc.start, inc.end):
        event = history[pos]
        if type(event) is Configuration:
            segment = _Segment(event, pos)
            inc.segments.append(segment)
            continue
        key = (event.sender, bytes(event.payload))
        k = seen.get(key, 0)
        seen[key] = k + 1
        candidates = by_key.get(key, ())
        if k >= len(candidates):
            problems.append(_unmatched_report(inc, pos, k, len(candidates)))
            continue
        message = candidates[k]
        if run.sends[message].safe != event.safe:
            problems.append(_safe_flag_report(run, inc, pos, message))
        if segment is None:
            segment = _Segment(None, pos)
            inc.segments.append(segment)
        segment.delivered.add(message)
        inc.order.append(message)
        inc.where[message] = pos
    return problems


def _index_epochs(run: _Run) -> None:
    for inc in run.all_incs():
        for epoch in _epochs_of(inc):
            run.epochs.append(epoch)
            run.by_regular.setdefault((inc.node, epoch.regular.config.ring_id), epoch)
            if epoch.transitional is not None:
                trans = epoch.transitional.config
                run.by_transitional.setdefault((inc.node, trans.ring_id, tuple(trans.members)), epoch)


def _epochs_of(inc: _Inc) -> list[_Epoch]:
    segments = _config_segments(inc)
    epochs = []
    for i, segment in enumerate(segments):
        if segment.config.transitional:
            continue
        after = segments[i + 1 : i + 3]
        trans = after.pop(0) if after and after[0].config.transitional else None
        following = after[0] if after else None
        if following is not None and following.config.transitional:
            following = None  # malformed (two transitionals in a row): reported elsewhere
        epochs.append(_Epoch(inc, segment, trans, following))
    return epochs


def _config_segments(inc: _Inc) -> list[_Segment]:
    return [s for s in inc.segments if s.config is not None]


# --------------------------------------------------------------- formatting


def _payload(payload: bytes) -> str:
    shown = repr(bytes(payload[:_PAYLOAD_LIMIT]))
    if len(payload) > _PAYLOAD_LIMIT:
        shown += f"...({len(payload)} bytes)"
    return shown


def _guarantee(safe: bool) -> str:
    return "safe" if safe else "agreed"


def _msg(run: _Run, message: int) -> str:
    send = run.sends[message]
    return (
        f"#{message} (from node {send.sender}/inc {send.incarnation}, "
        f"{_payload(send.payload)}, {_guarantee(send.safe)})"
    )


def _cfg(config: Configuration) -> str:
    kind = "transitional" if config.transitional else "regular"
    return f"{kind} {config.ring_id} {tuple(config.members)}"


def _event(event: Event) -> str:
    if type(event) is Configuration:
        kind = "TRANS" if event.transitional else "REG  "
        return f"{kind} {event.ring_id} members={tuple(event.members)}"
    if type(event) is Delivery:
        return f"deliver from node {event.sender} {_payload(event.payload)} {_guarantee(event.safe)}"
    return "CRASHED"


def _at(inc: _Inc, pos: int) -> str:
    return f"histories[{inc.node}][{pos}]"


def _config_at(inc: _Inc, pos: int) -> _Segment | None:
    """The configuration segment a history position falls in."""
    segments = _config_segments(inc)
    i = bisect.bisect_right([s.pos for s in segments], pos) - 1
    return segments[i] if i >= 0 else None


def _excerpt(inc: _Inc, pos: int | None) -> str:
    """A few history events around ``pos`` (or the incarnation's end), marked with >>."""
    if not inc.history or (inc.start == inc.end and not inc.crashed):
        return f"  {inc.label}: no events"
    if pos is None:
        pos = inc.end - 1 if inc.end > inc.start else inc.end
    stop = inc.end + 1 if inc.crashed else inc.end  # show the Crashed marker
    lo, hi = max(inc.start, pos - _EXCERPT_RADIUS), min(stop, pos + _EXCERPT_RADIUS + 1)
    lines = [f"  {inc.label}, histories[{inc.node}][{lo}:{hi}]:"]
    segment = _config_at(inc, pos)
    if segment is not None and segment.pos < lo:
        lines.append(f"       (in {_cfg(segment.config)} installed at [{segment.pos}])")
    for i in range(lo, hi):
        mark = ">>" if i == pos else "  "
        lines.append(f"    {mark} {i:>6}  {_event(inc.history[i])}")
    return "\n".join(lines)


def _msg_lines(run: _Run, messages: Iterable[int], inc: _Inc | None = None) -> list[str]:
    """One line per message (at most _LIST_LIMIT), in delivery order when ``inc`` is given."""
    messages = list(messages)
    if inc is not None:
        messages.sort(key=lambda m: inc.where.get(m, -1))
    else:
        messages.sort()
    lines = []
    for m in messages[:_LIST_LIMIT]:
        where = f" at {_at(inc, inc.where[m])}" if inc is not None and m in inc.where else ""
        lines.append(f"    {_msg(run, m)}{where}")
    if len(messages) > _LIST_LIMIT:
        lines.append(f"    ... and {len(messages) - _LIST_LIMIT} more")
    return lines


def _report(prop: str, headline: str, details: Iterable[str] = (), excerpts: Iterable[str] = ()) -> str:
    return "\n".join([f"[{prop}] {headline}", *details, *excerpts])


# ---------------------------------------------- 1, 2: no creation, no duplication


def _unmatched_report(inc: _Inc, pos: int, k: int, accepted: int) -> str:
    event = inc.history[pos]
    what = f"from node {event.sender} with payload {_payload(event.payload)}"
    if accepted == 0:
        return _report(
            _NO_CREATION,
            f"{inc.label} delivered a message {what} at {_at(inc, pos)}, but no accepted send carries it",
            excerpts=[_excerpt(inc, pos)],
        )
    return _report(
        _NO_DUPLICATION,
        f"{inc.label} delivered a message {what} {k + 1} times (this is {_at(inc, pos)}), "
        f"but only {accepted} accepted send(s) carry it: a duplicate (or a created message)",
        excerpts=[_excerpt(inc, pos)],
    )


def _safe_flag_report(run: _Run, inc: _Inc, pos: int, message: int) -> str:
    delivered = _guarantee(inc.history[pos].safe)
    return _report(
        _NO_CREATION,
        f"{inc.label} delivered {_msg(run, message)} as {delivered} at {_at(inc, pos)}, "
        f"but it was sent {_guarantee(run.sends[message].safe)}",
        excerpts=[_excerpt(inc, pos)],
    )


def _check_duplication(run: _Run) -> list[str]:
    """A node delivers a message at most once, across all its incarnations."""
    problems = []
    for lives in run.incs.values():
        first: dict[int, _Inc] = {}
        for inc in lives:
            for m in inc.order:
                earlier = first.setdefault(m, inc)
                if earlier is not inc:
                    problems.append(_report(
                        _NO_DUPLICATION,
                        f"node {inc.node} delivered {_msg(run, m)} twice: in incarnation "
                        f"{earlier.index} at {_at(earlier, earlier.where[m])} and again in "
                        f"incarnation {inc.index} at {_at(inc, inc.where[m])}",
                        excerpts=[_excerpt(earlier, earlier.where[m]), _excerpt(inc, inc.where[m])],
                    ))
    return problems


# ------------------------------------------------------------ 3: per-sender FIFO


def _check_fifo(run: _Run) -> list[str]:
    """Messages of one sender incarnation are delivered in the order they were sent."""
    problems = []
    for inc in run.all_incs():
        latest: dict[tuple[int, int], int] = {}
        for m in inc.order:
            send = run.sends[m]
            key = (send.sender, send.incarnation)
            before = latest.get(key, -1)
            if m > before:
                latest[key] = m
                continue
            problems.append(_report(
                _FIFO,
                f"{inc.label} delivered {_msg(run, m)} at {_at(inc, inc.where[m])} after "
                f"{_msg(run, before)} at {_at(inc, inc.where[before])}, but node "
                f"{send.sender}/inc {send.incarnation} sent #{m} first",
                excerpts=[_excerpt(inc, inc.where[m])],
            ))
    return problems


# ---------------------------------------------------------------- 4: total order


def _check_total_order(run: _Run) -> list[str]:
    """The union of the incarnations' delivery orders must be acyclic (Kahn's algorithm)."""
    succ, indegree = _order_graph(run)
    ready = deque(m for m, d in indegree.items() if d == 0)
    while ready:
        for nxt in succ.get(ready.popleft(), ()):
            indegree[nxt] -= 1
            if indegree[nxt] == 0:
                ready.append(nxt)
    stuck = {m for m, d in indegree.items() if d > 0}
    if not stuck:
        return []
    return [_cycle_report(run, succ, _short_cycle(succ, stuck), len(stuck))]


def _order_graph(run: _Run) -> tuple[dict[int, dict[int, _Inc]], dict[int, int]]:
    """Edges between consecutive deliveries, each labelled with the first incarnation seen."""
    succ: dict[int, dict[int, _Inc]] = {}
    indegree: dict[int, int] = {}
    for inc in run.all_incs():
        prev = None
        for m in inc.order:
            indegree.setdefault(m, 0)
            if prev is not None:
                out = succ.setdefault(prev, {})
                if m not in out:
                    out[m] = inc
                    indegree[m] += 1
            prev = m
    return succ, indegree


def _short_cycle(succ: dict[int, dict[int, _Inc]], stuck: set[int]) -> list[int]:
    """Some cycle among the stuck messages, shortened by BFS through a few of its nodes."""
    cycle = _any_cycle(succ, stuck)
    for start in cycle[:_CYCLE_TRIES]:
        shorter = _shortest_cycle_through(succ, stuck, start)
        if len(shorter) < len(cycle):
            cycle = shorter
    return cycle


def _any_cycle(succ: dict[int, dict[int, _Inc]], stuck: set[int]) -> list[int]:
    # After Kahn, every stuck message has a stuck predecessor: walk backwards until a repeat.
    pred: dict[int, int] = {}
    for a in stuck:
        for b in succ.get(a, ()):
            if b in stuck:
                pred.setdefault(b, a)
    walked: dict[int, int] = {}
    path: list[int] = []
    m = min(stuck)
    while m not in walked:
        walked[m] = len(path)
        path.append(m)
        m = pred[m]
    cycle = path[walked[m]:]
    cycle.reverse()
    return cycle


def _shortest_cycle_through(succ: dict[int, dict[int, _Inc]], stuck: set[int], start: int) -> list[int]:
    parent: dict[int, int] = {start: start}
    queue = deque([start])
    while queue:
        a = queue.popleft()
        for b in succ.get(a, ()):
            if b == start:
                path = [a]
                while path[-1] != start:
                    path.append(parent[path[-1]])
                path.reverse()
                return path
            if b in stuck and b not in parent:
                parent[b] = a
                queue.append(b)
    return []  # unreachable for a node on a cycle


def _cycle_report(run: _Run, succ: dict[int, dict[int, _Inc]], cycle: list[int], stuck: int) -> str:
    edges = [(a, cycle[(i + 1) % len(cycle)]) for i, a in enumerate(cycle)]
    labels = [succ[a][b] for a, b in edges]
    # Rotate so that a run of edges ordered by the same incarnation is not split.
    shift = next((i for i in range(len(labels)) if labels[i] is not labels[i - 1]), 0)
    edges, labels = edges[shift:] + edges[:shift], labels[shift:] + labels[:shift]
    details = ["  the cycle:"]
    i = 0
    while i < len(edges):
        j = i
        while j + 1 < len(edges) and labels[j + 1] is labels[i]:
            j += 1
        inc, first, last = labels[i], edges[i][0], edges[j][1]
        details.append(
            f"    {inc.label} delivered #{first} ({_at(inc, inc.where[first])}) "
            f"before #{last} ({_at(inc, inc.where[last])})"
        )
        i = j + 1
    details.append("  messages on the cycle:")
    details += _msg_lines(run, cycle)
    return _report(
        _TOTAL_ORDER,
        f"no global order agrees with every incarnation: {stuck} message(s) lie on or after "
        f"ordering cycles; a shortest found cycle has {len(cycle)} message(s)",
        details,
    )


# ---------------------------------------------------- 5: configuration consistency


def _check_configurations(run: _Run) -> list[str]:
    """Configuration events are well formed within each incarnation and agree across nodes."""
    problems = []
    rings: dict[RingId, tuple[_Inc, _Segment]] = {}
    for lives in run.incs.values():
        installed: dict[RingId, tuple[_Inc, _Segment]] = {}
        for inc in lives:
            problems += _pre_configuration_problems(run, inc)
            segments = _config_segments(inc)
            previous: _Segment | None = None
            for i, segment in enumerate(segments):
                problems += _membership_problems(inc, segment)
                if segment.config.transitional:
                    following = segments[i + 1] if i + 1 < len(segments) else None
                    problems += _transitional_problems(inc, segment, previous, following)
                else:
                    problems += _regular_problems(inc, segment, previous, installed, rings)
                    previous = segment
    return problems


def _pre_configuration_problems(run: _Run, inc: _Inc) -> list[str]:
    if not inc.segments or inc.segments[0].config is not None:
        return []
    early = inc.segments[0].delivered
    first = min(inc.where[m] for m in early)
    return [_report(
        _CONFIGURATION,
        f"{inc.label} delivered {len(early)} message(s) before installing any configuration",
        _msg_lines(run, early, inc),
        [_excerpt(inc, first)],
    )]


def _membership_problems(inc: _Inc, segment: _Segment) -> list[str]:
    if inc.node in segment.config.members:
        return []
    return [_report(
        _CONFIGURATION,
        f"{inc.label} installed {_cfg(segment.config)} at {_at(inc, segment.pos)}, "
        f"which does not list node {inc.node} as a member",
        excerpts=[_excerpt(inc, segment.pos)],
    )]


def _transitional_problems(
    inc: _Inc, trans: _Segment, previous: _Segment | None, following: _Segment | None
) -> list[str]:
    config = trans.config
    problems = []
    where = f"{inc.label} installed {_cfg(config)} at {_at(inc, trans.pos)}"
    if previous is None:
        problems.append(f"{where} with no regular configuration before it in this incarnation")
    elif not set(config.members) <= set(previous.config.members):
        problems.append(f"{where}, whose members are not a subset of the preceding {_cfg(previous.config)}")
    if following is not None:
        if following.config.transitional or following.config.ring_id != config.ring_id:
            problems.append(
                f"{where}, but the next configuration is {_cfg(following.config)} at "
                f"{_at(inc, following.pos)}, not the regular configuration {config.ring_id}"
            )
        elif not set(config.members) <= set(following.config.members):
            problems.append(
                f"{where}, whose members are not a subset of the following {_cfg(following.config)}"
            )
    return [_report(_CONFIGURATION, p, excerpts=[_excerpt(inc, trans.pos)]) for p in problems]


def _regular_problems(
    inc: _Inc,
    segment: _Segment,
    previous: _Segment | None,
    installed: dict[RingId, tuple[_Inc, _Segment]],
    rings: dict[RingId, tuple[_Inc, _Segment]],
) -> list[str]:
    config = segment.config
    where = f"{inc.label} installed {_cfg(config)} at {_at(inc, segment.pos)}"
    problems = []
    earlier = installed.setdefault(config.ring_id, (inc, segment))
    if earlier[1] is not segment:
        other, seg = earlier
        problems.append(_report(
            _CONFIGURATION,
            f"{where}, but {other.label} already installed ring {config.ring_id} at {_at(other, seg.pos)}",
            excerpts=[_excerpt(other, seg.pos), _excerpt(inc, segment.pos)],
        ))
    elif previous is not None and config.ring_id.seq <= previous.config.ring_id.seq:
        problems.append(_report(
            _CONFIGURATION,
            f"{where} after {_cfg(previous.config)} at {_at(inc, previous.pos)}: "
            f"ring seq {config.ring_id.seq} does not increase",
            excerpts=[_excerpt(inc, segment.pos)],
        ))
    first = rings.setdefault(config.ring_id, (inc, segment))
    if tuple(first[1].config.members) != tuple(config.members):
        other, seg = first
        problems.append(_report(
            _CONFIGURATION,
            f"{where}, but {other.label} installed ring {config.ring_id} with members "
            f"{tuple(seg.config.members)} at {_at(other, seg.pos)}",
            excerpts=[_excerpt(other, seg.pos), _excerpt(inc, segment.pos)],
        ))
    return problems


# -------------------------------------------------------- 6: virtual synchrony


def _check_virtual_synchrony(run: _Run) -> list[str]:
    """Incarnations moving together from C to C' delivered the same sets in C and in T."""
    groups: dict[tuple[RingId, RingId], list[_Epoch]] = {}
    for epoch in run.epochs:
        if epoch.next_regular is not None:
            key = (epoch.regular.config.ring_id, epoch.next_regular.config.ring_id)
            groups.setdefault(key, []).append(epoch)
    problems = []
    for epochs in groups.values():
        reference = epochs[0]
        for other in epochs[1:]:
            if other.inc.node != reference.inc.node:
                problems += _compare_epochs(run, reference, other)
    return problems


def _compare_epochs(run: _Run, a: _Epoch, b: _Epoch) -> list[str]:
    c, c2 = a.regular.config, a.next_regular.config
    moved = f"{a.inc.label} and {b.inc.label} both moved from regular {c.ring_id} to regular {c2.ring_id}"
    problems = []
    if a.regular.delivered != b.regular.delivered:
        problems.append(_set_difference_report(run, f"{moved} but delivered different messages in {_cfg(c)}",
                                               a, b, a.regular, b.regular))
    if a.transitional is None or b.transitional is None:
        return problems
    ta, tb = a.transitional.config, b.transitional.config
    if tuple(ta.members) != tuple(tb.members):
        problems.append(_report(
            _VIRTUAL_SYNCHRONY,
            f"{moved} but through different transitional configurations: "
            f"{tuple(ta.members)} vs {tuple(tb.members)}",
            excerpts=[_excerpt(a.inc, a.transitional.pos), _excerpt(b.inc, b.transitional.pos)],
        ))
    elif a.transitional.delivered != b.transitional.delivered:
        problems.append(_set_difference_report(run, f"{moved} but delivered different messages in {_cfg(ta)}",
                                               a, b, a.transitional, b.transitional))
    return problems


def _set_difference_report(run: _Run, headline: str, a: _Epoch, b: _Epoch, sa: _Segment, sb: _Segment) -> str:
    details, excerpts = [], []
    for epoch, mine, other in ((a, sa, sb), (b, sb, sa)):
        inc, only = epoch.inc, mine.delivered - other.delivered
        details.append(f"  only {inc.label} delivered {len(only)} message(s):")
        details += _msg_lines(run, only, inc)
        # Show the first extra message, or else where this incarnation left the configuration.
        pos = min(inc.where[m] for m in only) if only else _segment_end(epoch, mine)
        excerpts.append(_excerpt(inc, pos))
    return _report(_VIRTUAL_SYNCHRONY, headline, details, excerpts)


def _segment_end(epoch: _Epoch, segment: _Segment) -> int:
    """History index of the configuration event that closes ``segment`` in ``epoch``."""
    if segment is epoch.regular and epoch.transitional is not None:
        return epoch.transitional.pos
    return epoch.next_regular.pos


# ------------------------------------------ 7: delivered in one configuration


def _check_same_configuration(run: _Run) -> list[str]:
    """Incarnations that deliver m in regular configurations all do so in the same one."""
    first: dict[int, tuple[_Inc, _Segment]] = {}
    problems = []
    for epoch in run.epochs:
        inc, segment = epoch.inc, epoch.regular
        for m in sorted(segment.delivered, key=inc.where.__getitem__):
            other, seg = first.setdefault(m, (inc, segment))
            if seg.config.ring_id == segment.config.ring_id:
                continue
            problems.append(_report(
                _SAME_CONFIGURATION,
                f"{_msg(run, m)} was delivered in {_cfg(seg.config)} by {other.label} "
                f"at {_at(other, other.where[m])} but in {_cfg(segment.config)} by {inc.label} "
                f"at {_at(inc, inc.where[m])}",
                excerpts=[_excerpt(other, other.where[m]), _excerpt(inc, inc.where[m])],
            ))
    return problems


# ------------------------------------------------------------ 8: safe delivery


def _check_safe_delivery(run: _Run) -> list[str]:
    """Safe messages delivered in C (or T) reach every member of C (or T) that moves on."""
    in_regular: dict[tuple[RingId, tuple[int, ...]], dict[int, _Inc]] = {}
    in_transitional: dict[tuple[RingId, tuple[int, ...]], dict[int, _Inc]] = {}
    for epoch in run.epochs:
        _collect_safe(run, epoch.inc, epoch.regular, in_regular)
        if epoch.transitional is not None:
            _collect_safe(run, epoch.inc, epoch.transitional, in_transitional)
    problems = []
    for (ring, members), witnesses in in_regular.items():
        config = _cfg(Configuration(ring, members, False))
        for q in members:
            problems += _missing_safe(run, run.by_regular.get((q, ring)), config, witnesses)
    for (ring, members), witnesses in in_transitional.items():
        config = _cfg(Configuration(ring, members, True))
        for q in members:
            problems += _missing_safe(run, run.by_transitional.get((q, ring, members)), config, witnesses)
    return problems


def _collect_safe(
    run: _Run, inc: _Inc, segment: _Segment, into: dict[tuple[RingId, tuple[int, ...]], dict[int, _Inc]]
) -> None:
    safe = [m for m in segment.delivered if run.sends[m].safe]
    if safe:
        witnesses = into.setdefault((segment.config.ring_id, tuple(segment.config.members)), {})
        for m in safe:
            witnesses.setdefault(m, inc)


def _obliged(run: _Run, epoch: _Epoch) -> bool:
    """Has this incarnation had its whole chance to deliver the epoch's messages?"""
    return epoch.next_regular is not None or (run.settled and run.survived(epoch.inc))


def _missing_safe(run: _Run, epoch: _Epoch | None, config: str, witnesses: dict[int, _Inc]) -> list[str]:
    if epoch is None or not _obliged(run, epoch):
        return []  # never installed it (crashed before), crashed in it, or may still deliver
    got = epoch.regular.delivered
    if epoch.transitional is not None:
        got = got | epoch.transitional.delivered
    missing = [m for m in witnesses if m not in got]
    if not missing:
        return []
    inc = epoch.inc
    moved = (f"moved on to {_cfg(epoch.next_regular.config)} at {_at(inc, epoch.next_regular.pos)}"
             if epoch.next_regular is not None else "is still up after the run settled")
    details = [f"  member {inc.label} {moved} without delivering {len(missing)} of them "
               f"(neither in regular {epoch.regular.config.ring_id} nor in the transitional after it):"]
    for m in sorted(missing)[:_LIST_LIMIT]:
        w = witnesses[m]
        details.append(f"    {_msg(run, m)}, delivered by {w.label} at {_at(w, w.where[m])}")
    if len(missing) > _LIST_LIMIT:
        details.append(f"    ... and {len(missing) - _LIST_LIMIT} more")
    first = min(missing)
    w = witnesses[first]
    pos = epoch.next_regular.pos if epoch.next_regular is not None else None
    return [_report(
        _SAFE,
        f"safe messages delivered in {config} did not reach member {inc.label}",
        details,
        [_excerpt(w, w.where[first]), _excerpt(inc, pos)],
    )]


# ------------------------------------------------- 9, 10: settled-run properties


def _check_self_delivery(run: _Run) -> list[str]:
    """Every send of an incarnation that is still up was delivered back to it."""
    missing: dict[tuple[int, int], list[int]] = {}
    for m, send in enumerate(run.sends):
        inc = run.incs[send.sender][send.incarnation]
        if run.survived(inc) and m not in inc.where:
            missing.setdefault((send.sender, send.incarnation), []).append(m)
    problems = []
    for (node, index), messages in missing.items():
        inc = run.incs[node][index]
        problems.append(_report(
            _SELF,
            f"{inc.label} is up and the run settled, but it never delivered "
            f"{len(messages)} of its own message(s)",
            _msg_lines(run, messages),
            [_excerpt(inc, None)],
        ))
    return problems


def _check_liveness(run: _Run) -> list[str]:
    """All live nodes end in one regular configuration of exactly the live nodes, with equal deliveries."""
    finals: dict[int, _Segment] = {}
    problems = []
    for node in sorted(run.live):
        inc = run.incs[node][-1]
        segments = _config_segments(inc)
        last = segments[-1] if segments else None
        if last is None or last.config.transitional:
            state = "installed no configuration" if last is None else f"ends in {_cfg(last.config)}"
            problems.append(_report(_LIVENESS, f"{inc.label} is live but {state} after the run settled",
                                    excerpts=[_excerpt(inc, None)]))
        else:
            finals[node] = last
    rings = {segment.config.ring_id for segment in finals.values()}
    if len(rings) > 1:
        details = [f"  {run.incs[n][-1].label}: {_cfg(s.config)}" for n, s in finals.items()]
        problems.append(_report(_LIVENESS, "live nodes ended in different configurations", details))
    elif finals:
        problems += _final_configuration_problems(run, finals)
    return problems


def _final_configuration_problems(run: _Run, finals: dict[int, _Segment]) -> list[str]:
    config = next(iter(finals.values())).config
    problems = []
    if set(config.members) != run.live:
        problems.append(_report(
            _LIVENESS,
            f"live nodes {tuple(sorted(run.live))} ended in {_cfg(config)}, "
            "whose members are not exactly them",
        ))
    if len(finals) < len(run.live):
        return problems
    everything = set().union(*(s.delivered for s in finals.values()))
    for node, segment in finals.items():
        missing = everything - segment.delivered
        if missing:
            inc = run.incs[node][-1]
            problems.append(_report(
                _LIVENESS,
                f"{inc.label} did not deliver {len(missing)} message(s) that other live nodes "
                f"delivered in the final {_cfg(config)}",
                _msg_lines(run, missing),
                [_excerpt(inc, None)],
            ))
    return problems


_CHECKS = (
    _check_duplication,
    _check_fifo,
    _check_total_order,
    _check_configurations,
    _check_virtual_synchrony,
    _check_same_configuration,
    _check_safe_delivery,
)
_SETTLED_CHECKS = (_check_self_delivery, _check_liveness)
