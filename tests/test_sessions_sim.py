"""The replicated session store proven in simulation (issue 13, Proof: "Simulation (Hypothesis)").

Every simulated node runs the real SessionCore on SimCluster's real layers
(groupcomm.services.sessions.sim); each request is the demo counter's (load or
create, save counter+1, release).  Fixed scenarios first (migration, concurrent
requests, fail-over, evacuation, partitions, expiry, bounds, re-replication),
then the property over random schedules of increments, crashes (at most K
nodes down at once, the cluster settled after each crash and restart),
partitions, merges, loss bursts and graceful stops:

(a) no acknowledged update is lost: every session with an acknowledged
    increment is found afterwards, and its counter is the highest acknowledged
    one or a later attempt's;
(b) never two holders of one session serving in one space view (checked
    after every step of the simulation);
(c) after stabilisation the bucket owner's index names each session's holder,
    and has no entry for a session nobody keeps.
"""

from __future__ import annotations

from collections.abc import Iterable

from hypothesis import example, given, settings
from hypothesis import strategies as st

from groupcomm.layers.quorum import QuorumConfig
from groupcomm.services.sessions.buckets import bucket_of
from groupcomm.services.sessions.errors import SessionError, SessionsFull
from groupcomm.services.sessions.record import Limits
from groupcomm.services.sessions.settings import SessionSettings
from groupcomm.services.sessions.sim import PENDING, Increment, SimSessions
from groupcomm.testing import SimCluster

# ------------------------------------------------------------------ helpers


def make(n: int, seed: int, **options) -> tuple[SimCluster, SimSessions]:
    sim = SimCluster(n, seed=seed, stack="sim", quorum=QuorumConfig(expected_votes=n))
    store = SimSessions(sim, SessionSettings(**options), id_seed=seed)
    assert store.run_until(store.ready, 20), "the store never became ready"
    return sim, store


def finish(store: SimSessions, incs: Iterable[Increment], timeout: float = 10.0) -> None:
    incs = list(incs)
    assert store.run_until(lambda: all(i.finished for i in incs), timeout), incs


def increment(store: SimSessions, node: int, sid: str | None) -> Increment:
    inc = store.increment(node, sid)
    finish(store, [inc])
    return inc


def settle(store: SimSessions, timeout: float = 20.0) -> None:
    """Run until the store settled and stays so for a while in the same views (a partition or a
    crash is noticed only after the failure detector's timeout; the last drops of copies are still
    on the way when the last save is acknowledged)."""
    end = store.sim.now + timeout
    while True:
        assert store.run_until(store.settled, max(0.0, end - store.sim.now)), unsettled(store)
        views = {n: store.core(n).view_id for n in store.running}
        store.run(1.0)
        if store.settled() and views == {n: store.core(n).view_id for n in store.running}:
            return
        assert store.sim.now < end, unsettled(store)


def unsettled(store: SimSessions) -> str:
    """Why the store is not settled, node by node."""
    lines = [f"the store did not settle by {store.sim.now:.2f}s:"]
    for n in store.running:
        core = store.core(n)
        lines.append(f"  n{n}: space view {core.view_id} members {core.members} serving={core.serving} "
                     f"buckets ready {len(core.ready)} pending={core.pending_work()} held {len(core.held)}")
    return "\n".join(lines)


def holders(store: SimSessions, sid: str) -> list[int]:
    return [n for n in store.running if sid in store.core(n).held]


def keepers(store: SimSessions, sid: str) -> list[int]:
    """The nodes with the session's record in their table (holder and copies)."""
    return [n for n in store.running if store.core(n).table.get(sid) is not None]


def counter(store: SimSessions, sid: str) -> int | None:
    """The session's counter at its holder (None: no holder)."""
    found = holders(store, sid)
    assert len(found) <= 1, f"{sid} held by {found}"
    if not found:
        return None
    return store.core(found[0]).table.get(sid).values().get("counter", 0)


def read(store: SimSessions, node: int, sid: str) -> int | None:
    """The session's counter as a request at ``node`` sees it (None: not found); fail-over is lazy:
    a session whose holder crashed is made from its best copy by the next request."""
    token = store.load(node, sid)
    assert store.run_until(lambda: store.results[token] is not PENDING, 20), f"load of {sid} never ended"
    result = store.results[token]
    assert not isinstance(result, SessionError), result
    if result is None:
        return None
    store.release(node, sid)
    return result.values().get("counter", 0)


def serving_holders(store: SimSessions) -> dict[tuple, list[int]]:
    """(space view, sid) -> the nodes serving the session in that view, for each session held."""
    out: dict[tuple, list[int]] = {}
    for n in store.running:
        core = store.core(n)
        if not core.serving or core.view_id is None:
            continue
        for sid in core.held:
            if bucket_of(sid, store.settings.buckets) in core.ready:
                out.setdefault((core.view_id, sid), []).append(n)
    return out


def check_one_holder(store: SimSessions) -> None:
    """(b): never two holders of one session serving in one space view."""
    for (view, sid), nodes in serving_holders(store).items():
        assert len(nodes) <= 1, f"at {store.sim.now:.3f}s {sid} is held by {nodes} in view {view}"


def check_index(store: SimSessions) -> None:
    """(c): after stabilisation the owners' index agrees with the holders."""
    settle(store)
    running = store.running
    kept: dict[str, list[int]] = {}
    held: dict[str, int] = {}
    for n in running:
        core = store.core(n)
        for record in core.table.sessions():
            kept.setdefault(record.id, []).append(n)
        for sid in core.held:
            assert sid not in held, f"{sid} held by {held[sid]} and {n}"
            held[sid] = n
    for sid, holder in held.items():
        owner = store.core(holder).bucket_map.owner_of(sid)
        entry = store.core(owner).index.get(sid)
        assert entry is not None, f"owner n{owner} has no index entry of {sid} (held by n{holder})"
        assert entry.holder == holder, f"owner n{owner} says {sid} is held by {entry.holder}, not n{holder}"
    for sid, holder in held.items():                  # no copy older than the holder's, none left over
        core = store.core(holder)
        record = core.table.get(sid)
        for n in kept[sid]:
            if n != holder:
                copy = store.core(n).table.get(sid)
                assert (copy.epoch, copy.version) == (record.epoch, record.version), \
                    f"n{n} keeps an older copy of {sid} than its holder n{holder}"
        assert set(kept[sid]) - {holder} == core.held[sid].acked, \
            f"{sid}: copies at {sorted(set(kept[sid]) - {holder})}, holder n{holder} knows {core.held[sid].acked}"
    for n in running:
        for sid, entry in store.core(n).index.items():
            assert sid in kept, f"n{n} indexes {sid}, which no node keeps"
            if entry.holder is None:
                assert entry.copies, f"n{n} indexes {sid} with no holder and no copies"


def checked(store: SimSessions) -> SimSessions:
    """Check (b) after every step of the simulation."""
    store.checks.append(lambda: check_one_holder(store))
    return store


# ------------------------------------------------------------------ scenarios


def test_a_session_migrates_to_each_node_in_turn_and_keeps_its_counter() -> None:
    _sim, store = make(4, seed=3, backups=1)
    checked(store)
    first = increment(store, 1, None)
    assert first.acked and first.counter == 1
    sid = first.sid
    assert holders(store, sid) == [1]
    expected = 1
    for node in (2, 3, 4, 1, 3):
        inc = increment(store, node, sid)
        expected += 1
        assert inc.acked and inc.counter == expected, inc
        assert holders(store, sid) == [node]
        assert counter(store, sid) == expected
    settle(store, 10)
    assert len(keepers(store, sid)) == 2                # the holder and K = 1 backup
    assert sum(store.core(n).stats["migrations_in"] for n in store.running) == 5
    check_index(store)


def test_concurrent_requests_for_one_session_are_serialised_without_lost_updates() -> None:
    _sim, store = make(3, seed=5, backups=1)
    checked(store)
    sid = increment(store, 1, None).sid
    incs = []
    for _ in range(4):
        incs += [store.increment(node, sid) for node in (1, 2, 3)]
        finish(store, incs, 30)
    acked = [i for i in incs if i.acked]
    assert len(acked) == len(incs), [(i.node, i.error) for i in incs]     # no fault: each one waits its turn
    assert sum(store.core(n).stats["migrations_in"] for n in store.running) >= 6
    settle(store, 10)
    assert counter(store, sid) == 1 + len(acked)
    assert sorted(i.counter for i in acked) == list(range(2, 2 + len(acked)))    # each saw the one before
    check_index(store)


def test_a_crashed_holders_session_is_recovered_from_its_backup() -> None:
    _sim, store = make(3, seed=7, backups=1)
    checked(store)
    sid = increment(store, 1, None).sid
    for _ in range(2):
        assert increment(store, 1, sid).acked
    settle(store, 10)
    store.crash(1)
    inc = store.increment(2, sid)
    finish(store, [inc], 20)
    assert inc.acked and inc.counter == 4, inc
    assert holders(store, sid) == [2]
    settle(store, 10)
    assert sum(store.core(n).stats["failovers"] for n in store.running) == 1
    check_index(store)


def test_after_a_holder_crashes_its_best_copy_takes_over_and_k_copies_exist_again() -> None:
    """Fail-over does not wait for a request: once the owner rebuilt its index, the best copy holds
    the session and replicates it, so a second crash (after the first was repaired) loses nothing."""
    _sim, store = make(5, seed=31, backups=1)
    sid = increment(store, 1, None).sid
    settle(store)
    assert holders(store, sid) == [1]
    (backup,) = set(keepers(store, sid)) - {1}
    store.crash(1)
    settle(store)
    assert holders(store, sid) == [backup]
    assert len(keepers(store, sid)) == 2
    store.crash(backup)
    settle(store)
    assert read(store, store.running[0], sid) == 1
    check_index(store)


def test_without_backups_a_crashed_holders_sessions_are_lost() -> None:
    """K = 0: documented -- a session lives only at its holder; the next request finds nothing."""
    _sim, store = make(3, seed=7, backups=0)
    sid = increment(store, 1, None).sid
    assert increment(store, 1, sid).acked
    assert keepers(store, sid) == [1]
    store.crash(1)
    inc = store.increment(2, sid)
    finish(store, [inc], 20)
    assert inc.lost and not inc.acked and inc.error == "not found", inc
    settle(store, 10)
    assert keepers(store, sid) == []
    check_index(store)


def test_a_graceful_stop_evacuates_the_holders_sessions_even_without_backups() -> None:
    _sim, store = make(4, seed=11, backups=0)
    checked(store)
    sids = [increment(store, 2, None).sid for _ in range(5)]
    for sid in sids:
        assert increment(store, 2, sid).acked
    settle(store, 10)
    store.stop(2)
    assert store.run_until(lambda: 2 in store.left, 15)
    settle(store, 10)
    assert sum(store.core(n).stats["evacuated"] for n in store.running) == 0   # n2's own counter is gone
    for sid in sids:
        assert holders(store, sid) != [] and 2 not in holders(store, sid)
        inc = increment(store, 3, sid)
        assert inc.acked and inc.counter == 3, inc
    check_index(store)


def test_the_minority_side_refuses_every_request_and_the_majority_serves() -> None:
    sim, store = make(5, seed=13, backups=1)
    checked(store)
    sids = [increment(store, node, None).sid for node in (1, 2, 3, 4, 5, 4, 5)]
    settle(store)
    # a session whose holder and backup are both on the minority side is not found on the
    # majority side (as if both had crashed); the others are served there
    on_majority = {sid for sid in sids if set(keepers(store, sid)) & {1, 2, 3}}
    assert 0 < len(on_majority) < len(sids)
    counters = dict.fromkeys(sids, 1)
    sim.partition([[1, 2, 3], [4, 5]])
    store.run(3.0)
    minority = [store.increment(node, sid) for node in (4, 5) for sid in sids]
    minority += [store.increment(4, None), store.increment(5, None)]
    majority = [store.increment(1 + i % 3, sid) for i, sid in enumerate(sids)]
    finish(store, minority + majority, 30)
    for inc in minority:
        assert not inc.acked and inc.error == "SessionUnavailable", inc
    for inc in majority:
        if inc.sid in on_majority:
            assert inc.acked and inc.counter == 2, inc
            counters[inc.sid] = 2
        else:
            assert inc.lost and inc.error == "not found", inc
    sim.heal()
    settle(store, 30)
    for sid in sids:                         # after the merge every session is back, held once
        assert len(holders(store, sid)) == 1
        assert counter(store, sid) == counters[sid]
    check_index(store)


def test_a_session_invalidated_while_a_copy_was_cut_off_does_not_come_back_at_the_merge() -> None:
    sim, store = make(5, seed=23, backups=2)
    checked(store)
    sids = [increment(store, node, None).sid for node in (1, 2, 3, 1, 2, 3)]
    settle(store)
    cut_off = {sid for sid in sids if set(keepers(store, sid)) & {4, 5} and holders(store, sid)[0] in (1, 2, 3)}
    assert cut_off                                  # sessions held on the majority with a copy on 4 or 5
    sim.partition([[1, 2, 3], [4, 5]])
    store.run(3.0)
    for sid in cut_off:                             # logout: the holder ends the session
        node = holders(store, sid)[0]
        load = store.load(node, sid)
        assert store.run_until(lambda load=load: store.results[load] is not PENDING, 10)
        token = store.invalidate(node, sid)
        assert store.run_until(lambda token=token: store.results[token] is not PENDING, 10)
        assert store.results[token] is None
    assert all(store.core(4).table.get(sid) or store.core(5).table.get(sid) for sid in cut_off)
    sim.heal()
    settle(store, 30)
    for sid in cut_off:                             # the copies that were away are dropped, not promoted
        assert keepers(store, sid) == [], sid
        assert read(store, 1, sid) is None
    for sid in set(sids) - cut_off:
        assert counter(store, sid) == 1
    check_index(store)


def test_an_unused_session_expires_everywhere() -> None:
    _sim, store = make(3, seed=17, backups=1, max_inactive=5.0, copy_grace=2.0)
    idle = increment(store, 1, None).sid
    busy = increment(store, 2, None).sid
    settle(store, 10)
    assert len(keepers(store, idle)) == 2
    for _ in range(8):                               # keep the other one in use
        store.run(1.0)
        assert increment(store, 3, busy).acked
    assert keepers(store, idle) == []                # holder and copy reaped (copy after its grace)
    assert all(idle not in store.core(n).index for n in store.running)
    inc = increment(store, 3, idle)
    assert inc.lost and inc.error == "not found"
    assert counter(store, busy) == 9
    check_index(store)


def test_a_full_node_refuses_new_sessions_and_evicts_none() -> None:
    _sim, store = make(3, seed=19, backups=0, limits=Limits(max_sessions=3))
    sids = [increment(store, 1, None).sid for _ in range(3)]
    full = increment(store, 1, None)
    assert not full.acked and isinstance(store.results[full.token], SessionsFull), full
    for sid in sids:
        inc = increment(store, 1, sid)
        assert inc.acked and inc.counter == 2
    assert increment(store, 2, None).acked             # other nodes still have room
    check_index(store)


def test_after_a_backup_crashes_the_holder_makes_a_new_copy() -> None:
    _sim, store = make(5, seed=23, backups=1)
    sid = increment(store, 1, None).sid
    settle(store, 10)
    (backup,) = set(keepers(store, sid)) - {1}
    store.crash(backup)
    settle(store, 20)
    now = keepers(store, sid)
    assert len(now) == 2 and 1 in now and backup not in now, now
    assert store.core(1).held[sid].acked == set(now) - {1}
    # the new copy is good: the holder crashes too and the session survives
    store.crash(1)
    inc = store.increment(next(n for n in store.running), sid)
    finish(store, [inc], 20)
    assert inc.acked and inc.counter == 2, inc
    check_index(store)


def test_a_seeded_simulation_repeats_exactly() -> None:
    """Session ids come from the harness's seed: the same schedule makes the same ids and placement."""
    def run() -> list[tuple[str, int, list[int]]]:
        sim, store = make(4, seed=29, backups=1)
        out = []
        for node in (1, 2, 3):
            sid = increment(store, node, None).sid
            settle(store)
            out.append((sid, sim.now_us, keepers(store, sid)))
        return out

    assert run() == run()


def test_a_member_that_never_saw_itself_leave_the_space_follows_the_others_into_the_new_view() -> None:
    # n3 is cut off and back before it installs a view without n1 and n2: its space view does not
    # change (its members did not, for it) while n1 and n2 install one where n3 joins.  The index
    # round after the SYNC round (SessionCore.synced) is the one they all start; before, the owners
    # waited for n3's holdings forever.
    run = _Schedule(3, 1, 65535)
    for step in [("partition", (1, 1, 2), 0.02), ("inc", 1, None), ("partition", (2, 0, 2), 0.0),
                 ("inc", 1, None), ("run", 0.05), ("partition", (1, 1, 1), 0.0)]:
        run.apply(step)
    settle(run.store, 30)


# ------------------------------------------------------------------ the property

def _step(n: int):
    node = st.integers(1, n)
    which = st.one_of(st.none(), st.integers(0, 50))            # a new session, or a known one
    inc = st.builds(lambda a, w: ("inc", a, w), node, which)
    return st.one_of(
        inc, inc, inc,
        st.builds(lambda reqs: ("burst", tuple(reqs)), st.lists(st.tuples(node, which), min_size=2, max_size=4)),
        st.builds(lambda t: ("run", t), st.sampled_from([0.05, 0.3, 1.0, 3.0])),
        st.builds(lambda a: ("crash", a), node),
        st.builds(lambda a: ("stop", a), node),
        st.builds(lambda a: ("restart", a), node),
        st.builds(lambda groups, t: ("partition", tuple(groups), t),
                  st.lists(st.integers(0, 2), min_size=n, max_size=n), st.sampled_from([0.0, 0.003, 0.02])),
        st.just(("heal",)),
        st.builds(lambda p, t: ("loss", p, t), st.sampled_from([0.05, 0.2]), st.sampled_from([0.3, 1.0])),
    )


@st.composite
def session_schedules(draw):
    n = draw(st.integers(3, 5))
    k = draw(st.sampled_from([1, 2]))
    seed = draw(st.integers(0, 2**16))
    plan = draw(st.lists(_step(n), min_size=1, max_size=14))
    return n, k, seed, plan


class _Schedule:
    """Carries out a schedule's steps within its rules: at most K nodes (and a minority) down, the
    cluster settled after each crash, stop and restart (so K copies exist again before the next
    one), no crash or stop while the network is split."""

    def __init__(self, n: int, k: int, seed: int) -> None:
        self.n, self.k = n, k
        self.sim, self.store = make(n, seed, backups=k)
        checked(self.store)
        self.split = False
        self.sids: list[str] = []

    def start(self, node: int, which: int | None) -> Increment:
        sid = None if which is None or not self.sids else self.sids[which % len(self.sids)]
        return self.store.increment(node, sid)

    def note_sids(self) -> None:
        for inc in self.store.increments:
            if inc.sid is not None and inc.sid not in self.sids:
                self.sids.append(inc.sid)

    def may_take_down(self) -> bool:
        down = self.n - len(self.store.running)
        return not self.split and down < min(self.k, (self.n - 1) // 2)

    def apply(self, step: tuple) -> None:
        kind, store, sim = step[0], self.store, self.sim
        running = store.running
        if kind == "inc":
            self.start(step[1], step[2])
        elif kind == "burst":
            for node, which in step[1]:
                self.start(node, which)
        elif kind == "run":
            store.run(step[1])
        elif kind in ("crash", "stop") and step[1] in running and self.may_take_down():
            # requests, moves and copies may be under way; the last fault was repaired (settled)
            if kind == "crash":
                store.crash(step[1])
            else:
                store.stop(step[1])
                assert store.run_until(lambda: step[1] in store.left, 30), "the stop never ended"
            settle(store, 30)
        elif kind == "restart" and step[1] not in running and (not self.split or step[1] in store.left):
            store.restart(step[1])
            if not self.split:
                settle(store, 30)
        elif kind == "partition":
            groups: dict[int, list[int]] = {}
            for node, g in zip(sim.nodes, step[1]):
                groups.setdefault(g, []).append(node)
            store.run(step[2])
            sim.partition(list(groups.values()))
            self.split = len(groups) > 1
        elif kind == "heal":
            sim.heal()
            self.split = False
        elif kind == "loss":
            sim.set_network(loss=step[1])
            store.run(step[2])
            sim.set_network(loss=0.0)
        if kind != "run":
            store.run(0.05)
        self.note_sids()

    def finish(self) -> None:
        store = self.store
        self.sim.heal()
        self.sim.set_network(loss=0.0)
        settle(store, 60)
        self.check_no_acknowledged_update_lost()
        check_index(store)                       # (after the reads' fail-overs and migrations)

    def check_no_acknowledged_update_lost(self) -> None:
        store = self.store
        for i, sid in enumerate(self.sids):
            attempts = [i for i in store.increments if i.sid == sid and i.counter is not None]
            acked = [i.counter for i in attempts if i.acked]
            if not acked:
                continue
            top = max(acked)
            final = read(store, store.running[i % len(store.running)], sid)
            assert final is not None, f"{sid}: acknowledged up to {top}, now lost"
            later = {i.counter for i in attempts if not i.acked and i.counter > top}
            assert final == top or final in later, \
                f"{sid}: acknowledged up to {top}, unacknowledged attempts {sorted(later)}, now {final}"


def run_schedule(schedule) -> None:
    n, k, seed, plan = schedule
    run = _Schedule(n, k, seed)
    for step in plan:
        run.apply(step)
    run.finish()


@settings(deadline=None, max_examples=max(5, settings().max_examples // 5))
@given(session_schedules())
# found by the property: the holder n2 crashed; its session was a copy at n1 only, with no holder, until
# a request would come (fail-over was lazy); n1 crashed later (after the cluster settled): lost
@example((3, 1, 77, [("inc", 1, None), ("burst", ((1, 24), (2, None), (2, 43), (2, 31))), ("crash", 2),
                     ("restart", 2), ("crash", 1)]))
# found by the property: n1 took VGAj over from n3 and saved counter 2 (acknowledged by its backup n5) while
# n3's older copy (counter 1) waited for its Drop; a partition cut {1, 5} off, the primary side {2, 3} failed
# the session over to n3's stale copy under a newer epoch, which won at the merge.  A save is acknowledged
# now only once members with older copies have the new version too
@example((5, 1, 52910, [("stop", 4), ("heal",), ("heal",), ("crash", 3), ("loss", 0.2, 0.3), ("inc", 3, 3),
                        ("burst", ((1, 20), (5, None))), ("partition", (0, 2, 2, 2, 0), 0.003), ("stop", 4),
                        ("loss", 0.05, 0.3), ("inc", 3, 3)]))
# found by the property: n4 kept a copy from n2 while both were cut off from the rest, then n2 was alone for
# a while and forgot it (a view change kept only the members of the view); after the merge the copy was
# left over, unknown to every holder.  A holder now keeps the members out of its view that have copies
@example((4, 2, 65535, [("inc", 2, None), ("partition", (0, 2, 1, 1), 0.0), ("partition", (0, 2, 1, 2), 0.003),
                        ("burst", ((1, None), (2, 40), (2, 40), (2, 40))), ("restart", 3), ("inc", 2, 2),
                        ("loss", 0.2, 1.0), ("partition", (0, 2, 1, 1), 0.0), ("loss", 0.2, 1.0)]))
# found by the property (a harness bug): a stopping node's Hello, deferred to the end of the step, was
# multicast after the node had left the space (LocalProtocolError)
@example((5, 1, 2303, [("burst", ((3, 0), (1, 26), (5, None), (4, 20))), ("burst", ((3, 0), (1, 26), (5, None), (4, 20))),
                       ("partition", (2, 1, 0, 0, 1), 0.0), ("stop", 4), ("run", 0.05), ("crash", 5),
                       ("partition", (2, 0, 1, 2, 1), 0.0), ("inc", 4, 9), ("heal",), ("stop", 1), ("crash", 2),
                       ("partition", (0, 2, 1, 1, 1), 0.0)]))
def test_no_acknowledged_update_is_lost_and_a_session_has_one_holder_under_any_fault_schedule(schedule) -> None:
    run_schedule(schedule)
