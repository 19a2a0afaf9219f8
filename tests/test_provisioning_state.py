"""The replicated desired state of a provisioning group (groupcomm.services.provisioning.state/.ops).

Unit tests of the operation schema and of GroupState.apply; GroupReplica fed
hand-built view sequences (accepted only in a regular primary configuration,
the same decision at every member); SqliteGroupStore across a reopen; and one
seeded SimCluster run where a node misses an uninstall (partitioned away, then
crashed) and ends with the primary side's state anyway.
"""

from __future__ import annotations

import random
from pathlib import Path

import msgspec
import pytest

from groupcomm.events import RingId, View
from groupcomm.layers.quorum import QuorumConfig
from groupcomm.layers.spaces import SpaceMessage, SpaceView
from groupcomm.services.provisioning.ops import (
    DeleteConfig,
    InstallBundle,
    MalformedOp,
    Op,
    SetConfig,
    StartBundle,
    StopBundle,
    UninstallBundle,
    decode_op,
    encode_op,
    new_op_id,
)
from groupcomm.services.provisioning.state import (
    DUPLICATE,
    READ_ONLY,
    RECENT_OP_IDS,
    WRONG_GROUP,
    Accepted,
    BundleDesired,
    GroupReplica,
    GroupState,
    MemoryGroupStore,
    OpRefused,
    Rejected,
    SqliteGroupStore,
    StateChanged,
    StateCorrupt,
    group_space,
)
from groupcomm.testing import SimCluster

DIGEST = "ab" * 32
_counter = iter(range(1, 1 << 30))


def op(body, node: str = "n1", op_id: str | None = None) -> Op:
    return Op(op_id or new_op_id(node, next(_counter)), node, "alice", 1.0, body)


def install(name: str = "hello", version: str = "1.0", group: str = "web") -> Op:
    return op(InstallBundle(group, name, version, DIGEST, 1234, f"{name}-{version}.tar.gz"))


# --------------------------------------------------------------------------- ops


def test_ops_round_trip_and_malformed_payloads_raise_one_error() -> None:
    bodies = [InstallBundle("web", "hello", "1.0", DIGEST, 5, "hello-1.0-py3-none-any.whl"),
              UninstallBundle("web", "hello"), StartBundle("web", "hello"), StopBundle("web", "hello"),
              SetConfig("web", "org.example.hello", "port", "8080"), DeleteConfig("web", "org.example.hello", "port")]
    for body in bodies:
        o = op(body)
        assert decode_op(encode_op(o)) == o
    good = encode_op(install())
    bad = [b"", b"\xc1", good[:-3], msgspec.msgpack.encode(["x", "n1", "u", 1.0, ["reboot", "web"]]),
           msgspec.msgpack.encode(["x", "n1", "u", float("nan"), ["start", "web", "hello"]]),
           msgspec.msgpack.encode(["x", "n1", "u", 1.0, ["start", "web", "../etc"]]),
           msgspec.msgpack.encode(["x", "n1", "u", 1.0, ["start", "web", "hello\n"]]),
           msgspec.msgpack.encode(["x", "n1", "u", 1.0, ["install", "web", "h", "1", "AB" * 32, 1, "h.whl"]]),
           msgspec.msgpack.encode(["x", "n1", "u", 1.0, ["install", "web", "h", "1", DIGEST, -1, "h.whl"]]),
           msgspec.msgpack.encode(["x", "n1", "u", 1.0, ["install", "web", "h", "1", DIGEST, 1, "a/h.whl"]]),
           msgspec.msgpack.encode(["x", "n1", "u", 1.0, ["set-config", "web", "p", "k", "v" * 70_000]]),
           msgspec.msgpack.encode(["", "n1", "u", 1.0, ["start", "web", "hello"]]),
           msgspec.msgpack.encode(["x", "n1", "u", 1.0, ["start", "web", "hello", "extra"]])]
    for payload in bad:
        with pytest.raises(MalformedOp):
            decode_op(payload)
    with pytest.raises(MalformedOp):
        encode_op(op(UninstallBundle("web", "no/slashes")))


# --------------------------------------------------------------------------- GroupState


def test_apply_install_start_config_uninstall() -> None:
    s0 = GroupState("web")
    s1 = s0.apply(install("hello", "1.0"))
    assert s1.revision == 1 and s1.bundles["hello"] == BundleDesired("1.0", DIGEST, 1234, "hello-1.0.tar.gz", False)
    assert s0.revision == 0 and s0.bundles == {}                       # pure: the old value is unchanged
    s2 = s1.apply(op(StartBundle("web", "hello")))
    assert s2.bundles["hello"].started
    s3 = s2.apply(install("hello", "2.0"))                            # upgrade keeps "started"
    assert s3.bundles["hello"].version == "2.0" and s3.bundles["hello"].started
    s4 = s3.apply(op(SetConfig("web", "org.x", "port", "80"))).apply(op(SetConfig("web", "org.x", "host", "h")))
    assert s4.configs == {"org.x": {"port": "80", "host": "h"}} and s4.revision == 5
    s5 = s4.apply(op(DeleteConfig("web", "org.x", "port"))).apply(op(DeleteConfig("web", "org.x", "host")))
    assert s5.configs == {}
    s6 = s5.apply(op(StopBundle("web", "hello"))).apply(op(UninstallBundle("web", "hello")))
    assert s6.bundles == {} and s6.revision == 9


def test_apply_refusals_and_duplicates() -> None:
    s = GroupState("web").apply(install())
    for body, words in [(UninstallBundle("web", "nope"), "no bundle 'nope'"), (StartBundle("web", "nope"), "no bundle"),
                        (DeleteConfig("web", "p", "k"), "no configuration key 'k'"),
                        (UninstallBundle("db", "hello"), WRONG_GROUP)]:
        with pytest.raises(OpRefused, match=words):
            s.apply(op(body))
    again = op(StartBundle("web", "hello"))
    s2 = s.apply(again)
    assert s2.apply(again) is s2                                       # idempotent on the op_id
    assert s2.has_applied(again.op_id)


def test_recent_op_ids_are_bounded() -> None:
    s = GroupState("web")
    first = op(SetConfig("web", "p", "k", "0"))
    s = s.apply(first)
    for i in range(RECENT_OP_IDS):
        s = s.apply(op(SetConfig("web", "p", "k", str(i))))
    assert len(s.recent) == RECENT_OP_IDS and not s.has_applied(first.op_id)
    assert s.revision == RECENT_OP_IDS + 1


def test_snapshot_round_trip_and_corrupt_snapshots() -> None:
    s = GroupState("web").apply(install()).apply(op(SetConfig("web", "p", "k", "v")))
    assert GroupState.restore(s.snapshot()) == s
    for data in [b"", b"\x00", s.snapshot()[:-1], msgspec.msgpack.encode(["web", -1, {}, {}, []]),
                 msgspec.msgpack.encode(["w/b", 0, {}, {}, []])]:
        with pytest.raises(StateCorrupt):
            GroupState.restore(data)


# --------------------------------------------------------------------------- GroupReplica, hand-fed


def ring(members: tuple[int, ...], seq: int, *, primary: bool = True, transitional: bool = False) -> View:
    return View(members, RingId(min(members), seq), transitional, primary)


def sview(members: tuple[int, ...], seq: int) -> SpaceView:
    return SpaceView(members, members, (), group_space("web"), (min(members), seq, 0))


def feed(replicas: list[GroupReplica], event) -> list[list]:
    """Deliver ``event`` to every replica; returns each one's outputs."""
    outs = []
    for r in replicas:
        if type(event) is View:
            outs.append(r.ring_view(event))
        elif type(event) is SpaceView:
            outs.append(r.space_view(event))
        else:
            sender, payload = event
            outs.append(r.message(sender, payload))
    return outs


def test_replica_accepts_only_in_a_regular_primary_configuration_the_same_everywhere() -> None:
    replicas = [GroupReplica("web", MemoryGroupStore()) for _ in range(3)]
    feed(replicas, ring((1, 2, 3), 4))
    feed(replicas, sview((1, 2, 3), 4))
    first = install()
    outs = feed(replicas, (1, replicas[0].propose(first)))
    for out in outs:
        assert out[0] == Accepted(first, 1) and type(out[1]) is StateChanged
    # the same op again (a retry): rejected as a duplicate everywhere
    assert feed(replicas, (2, replicas[1].propose(first))) == [[Rejected(first.op_id, DUPLICATE)]] * 3
    # a refused op: the same reason everywhere, no revision
    bad = op(UninstallBundle("web", "other"))
    outs = feed(replicas, (3, encode_op(bad)))
    assert all(o == [Rejected(bad.op_id, "no bundle 'other' in group 'web'")] for o in outs)
    # transitional configuration: rejected as read-only, even if the ring was primary
    feed(replicas, ring((1, 2, 3), 8, transitional=True))
    assert not replicas[0].writable
    late = op(StartBundle("web", "hello"))
    assert feed(replicas, (1, encode_op(late))) == [[Rejected(late.op_id, READ_ONLY)]] * 3
    # a regular primary view again: accepted
    feed(replicas, ring((1, 2, 3), 8))
    assert feed(replicas, (1, encode_op(late)))[0][0] == Accepted(late, 2)
    # the minority side of a partition: regular but not primary
    minority = replicas[2:]
    feed(minority, ring((3,), 12, transitional=True))
    feed(minority, ring((3,), 12, primary=False))
    assert minority[0].read_only_reason == READ_ONLY
    stop = op(StopBundle("web", "hello"), node="n3")
    assert feed(minority, (3, minority[0].propose(stop))) == [[Rejected(stop.op_id, READ_ONLY)]]
    assert [r.revision for r in replicas] == [2, 2, 2]
    assert all(r.state == replicas[0].state for r in replicas)
    assert [e.revision for e in replicas[0].history] == [1, 2]


def test_replica_counts_malformed_ops_and_rejects_other_groups() -> None:
    r = GroupReplica("web", MemoryGroupStore())
    r.ring_view(ring((1,), 4))
    assert r.message(1, b"\x93junk") == [] and r.message(1, b"") == []
    assert r.dropped == 2
    other = install(group="db")
    with pytest.raises(OpRefused):
        r.propose(other)
    assert r.message(1, encode_op(other)) == [Rejected(other.op_id, WRONG_GROUP)]
    assert r.revision == 0


def test_replica_state_transfer_carries_state_and_history_and_none_starts_over() -> None:
    a, b = GroupReplica("web", MemoryGroupStore()), GroupReplica("web", MemoryGroupStore(), history_limit=2)
    a.ring_view(ring((1,), 4))
    for o in [install("x"), install("y"), op(UninstallBundle("web", "x"))]:
        a.message(1, a.propose(o))
    out = b.install_state(a.state_request())
    assert out == [StateChanged(a.state)] and b.state == a.state and b.revision == 3
    assert b.history == a.history[-2:]
    # the received op_ids travel with the state: a retry is a duplicate at b too
    b.ring_view(ring((1, 2), 8))
    assert b.message(1, encode_op(a.history[-1].op)) == [Rejected(a.history[-1].op.op_id, DUPLICATE)]
    assert b.install_state(None) == [StateChanged(GroupState("web"))] and b.history == []
    with pytest.raises(StateCorrupt):
        b.install_state(b"\x00")
    db = GroupReplica("db", MemoryGroupStore())
    with pytest.raises(StateCorrupt, match="carries group 'web'"):
        db.install_state(a.state_request())


# --------------------------------------------------------------------------- SQLite


def test_sqlite_store_round_trip_and_restart(tmp_path: Path) -> None:
    path = tmp_path / "provisioning.sqlite"
    with SqliteGroupStore(path, history_limit=3) as store:
        assert store.load("web") == (GroupState("web"), [])
        r = GroupReplica("web", store)
        r.ring_view(ring((1,), 4))
        for o in [install("x"), op(SetConfig("web", "p", "k", "v")), op(StartBundle("web", "x")),
                  op(StopBundle("web", "x"))]:
            assert type(r.message(1, r.propose(o))[0]) is Accepted
        expected_state, expected_history = r.state, r.history
    import sqlite3
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone() == ("wal",)
    with SqliteGroupStore(path, history_limit=3) as store:                       # a restart: reopen the file
        state, history = store.load("web")
        assert state == expected_state and state.revision == 4
        assert history == expected_history[-3:] and [e.revision for e in history] == [2, 3, 4]
        assert store.groups() == ["web"]
        again = GroupReplica("web", store)
        assert again.state == expected_state
        fresh = GroupReplica("web", MemoryGroupStore())
        again.install_state(fresh.state_request())                               # replace: history too
    with SqliteGroupStore(path) as store:
        assert store.load("web") == (GroupState("web"), [])


def test_sqlite_store_refuses_a_corrupt_row(tmp_path: Path) -> None:
    import sqlite3
    path = tmp_path / "p.sqlite"
    with SqliteGroupStore(path) as store:
        store.save("web", GroupState("web").apply(install()), [])
    db = sqlite3.connect(path)
    db.execute("UPDATE group_state SET state = x'00'")
    db.commit()
    db.close()
    with SqliteGroupStore(path) as store, pytest.raises(StateCorrupt):
        store.load("web")


# --------------------------------------------------------------------------- simulation


class SimProvisioningGroup:
    """A GroupReplica of group "web" on every node of ``sim``, fed by the real layers.

    Each node's store outlives its crashes (it is the node's disk)."""

    def __init__(self, sim: SimCluster) -> None:
        self.sim = sim
        self.space = group_space("web")
        self.stores = {n: MemoryGroupStore() for n in sim.nodes}
        self.replicas: dict[int, GroupReplica] = {}
        self.outputs: dict[int, list] = {n: [] for n in sim.nodes}
        for n in sim.nodes:
            sim.services.state_provider(n, self.space, lambda n=n: self.replicas[n].state_request())
            sim.services.state_receiver(n, self.space, lambda data, n=n: self._out(n, self.replicas[n].install_state(data)))
            self.replicas[n] = GroupReplica("web", self.stores[n])
        sim.services.add_observer(self._observe)

    def _out(self, node: int, outputs: list) -> None:
        self.outputs[node].extend(outputs)

    def _observe(self, node: int, event) -> None:
        replica = self.replicas.get(node)
        if replica is None:
            return
        t = type(event)
        if t is View:
            self._out(node, replica.ring_view(event))
        elif t is SpaceView:
            self._out(node, replica.space_view(event))
        elif t is SpaceMessage and event.space == self.space:
            self._out(node, replica.message(event.message.sender, event.message.payload))

    def join(self, node: int) -> None:
        self.sim.services.join(node, self.space)

    def propose(self, node: int, o: Op) -> None:
        self.sim.services.send(node, self.space, self.replicas[node].propose(o))

    def crash(self, node: int) -> None:
        self.sim.crash(node)
        del self.replicas[node]

    def restart(self, node: int) -> None:
        self.sim.restart(node)
        self.replicas[node] = GroupReplica("web", self.stores[node])       # loads what it had on disk
        self.join(node)

    def answer(self, node: int, op_id: str) -> Accepted | Rejected | None:
        for out in self.outputs[node]:
            if (type(out) is Accepted and out.op.op_id == op_id) or (type(out) is Rejected and out.op_id == op_id):
                return out
        return None

    def in_space(self, node: int) -> bool:
        return node in self.replicas and node in self.replicas[node].members

    def agree(self) -> bool:
        states = {self.replicas[n].state.snapshot() for n in self.sim.live}
        return len(states) == 1 and all(self.in_space(n) for n in self.sim.live)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_sim_uninstall_made_while_a_node_was_away_reaches_it(seed: int) -> None:
    rng = random.Random(seed)
    sim = SimCluster(3, seed=seed, stack="sim", quorum=QuorumConfig(expected_votes=3))
    group = SimProvisioningGroup(sim)
    assert sim.run_until(sim.converged, timeout=10)
    for n in sim.nodes:
        group.join(n)
    assert sim.run_until(lambda: all(group.in_space(n) and group.replicas[n].writable for n in sim.nodes), 10)

    ops = [install("hello"), install("other"), op(SetConfig("web", "org.x", "port", "80")),
           op(StartBundle("web", "hello"))]
    for o in ops:
        group.propose(rng.choice(sim.nodes), o)
        sim.run(rng.uniform(0.0, 0.05))
    assert sim.run_until(lambda: all(group.answer(n, o.op_id) for n in sim.nodes for o in ops), 10)
    for n in sim.nodes:
        assert [type(group.answer(n, o.op_id)) for o in ops] == [Accepted] * 4
    assert group.agree() and group.replicas[1].revision == 4

    # node 3 is cut off: a minority, read-only, and says so
    away = 3
    sim.partition([[1, 2], [away]])
    assert sim.run_until(lambda: not group.replicas[away].writable and group.replicas[1].writable
                         and set(group.replicas[1].members) == {1, 2}, 10)
    stop = op(StopBundle("web", "hello"), node="n3")
    group.propose(away, stop)
    assert sim.run_until(lambda: group.answer(away, stop.op_id) is not None, 5)
    assert group.answer(away, stop.op_id) == Rejected(stop.op_id, READ_ONLY)
    assert group.replicas[away].revision == 4
    # the majority goes on: the uninstall that node 3 misses
    uninstall = op(UninstallBundle("web", "other"), node=f"n{rng.choice([1, 2])}")
    group.propose(rng.choice([1, 2]), uninstall)
    assert sim.run_until(lambda: all(type(group.answer(n, uninstall.op_id)) is Accepted for n in (1, 2)), 5)
    assert group.answer(away, uninstall.op_id) is None

    if seed % 2:
        # it also crashes while away, and restarts from its own disk after the heal
        group.crash(away)
        sim.heal()
        assert sim.run_until(sim.converged, timeout=10)
        assert group.stores[away].load("web")[0].revision == 4           # its disk: still the old state
        group.restart(away)
    else:
        sim.heal()
    assert sim.run_until(lambda: sim.converged() and group.agree(), 15)
    final = group.replicas[1].state
    assert final.revision == 5 and "other" not in final.bundles and final.bundles["hello"].started
    for n in sim.nodes:
        assert group.replicas[n].state == final
        assert group.stores[n].load("web")[0] == final                   # persisted too
        assert group.replicas[n].history[-1] == group.replicas[1].history[-1]
    # and the rejoined node writes again
    more = op(SetConfig("web", "org.x", "port", "81"), node="n3")
    group.propose(away, more)
    assert sim.run_until(lambda: all(type(group.answer(n, more.op_id)) is Accepted for n in sim.nodes), 5)
    assert {group.replicas[n].revision for n in sim.nodes} == {6}
