"""The replicated desired state of a provisioning group (groupcomm.services.provisioning.state/.ops).

Unit tests of the operation schema and of GroupState.apply (every group body,
plan bodies refused, signature policy, configuration bounded in bytes);
GroupReplica fed hand-built view sequences (accepted only in a regular primary
configuration, the same decision at every member; a joiner's newer stored
state offered and adopted); the replica over another state type;
SqliteGroupStore across a reopen; and seeded SimCluster runs: a node misses an
uninstall (partitioned away, then crashed) and ends with the primary side's
state anyway, and a full-cluster restart with the oldest store first ends
with the newest state everywhere.
"""

from __future__ import annotations

import logging
import random
import re
from pathlib import Path

import msgspec
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from groupcomm.events import RingId, View
from groupcomm.layers.quorum import QuorumConfig
from groupcomm.layers.spaces import SpaceMessage, SpaceView, Synced
from groupcomm.services.provisioning.ops import (
    MAX_STATE_BYTES,
    PLANS,
    AdoptState,
    AdvanceRollout,
    BeginRollout,
    DeleteConfig,
    EndRollout,
    InstallBundle,
    MalformedOp,
    Op,
    ReportHealth,
    RoleTarget,
    SetConfig,
    SetGroupPolicy,
    StartBundle,
    StopBundle,
    UninstallBundle,
    decode_op,
    encode_op,
    new_op_id,
)
from groupcomm.services.provisioning.signing import signed_message, signed_message_for
from groupcomm.services.provisioning.state import (
    DUPLICATE,
    MAX_CONFIG_BYTES,
    MERGING,
    READ_ONLY,
    RECENT_OP_IDS,
    STARTING,
    WRONG_GROUP,
    Accepted,
    Adopt,
    BundleDesired,
    GroupReplica,
    GroupState,
    HistoryEntry,
    MemoryGroupStore,
    OpRefused,
    Rejected,
    SqliteGroupStore,
    StateChanged,
    StateCorrupt,
    group_space,
)
from groupcomm.testing import SimCluster
from tests.bundles import build_wheel

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


def settled_view(r: GroupReplica, view: View) -> list:
    """``view`` and, if it starts one, the end of the spaces' SYNC round (as the layer delivers them)."""
    out = r.ring_view(view)
    return out + r.synced() if not view.transitional else out


def feed(replicas: list[GroupReplica], event, *, sync: bool = True) -> list[list]:
    """Deliver ``event`` to every replica (a regular view with the SYNC round's end, unless ``sync``
    is False); returns each one's outputs."""
    outs = []
    for r in replicas:
        if type(event) is View:
            outs.append(settled_view(r, event) if sync else r.ring_view(event))
        elif type(event) is Synced:
            outs.append(r.synced())
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
    settled_view(r, ring((1,), 4))
    assert r.message(1, b"\x93junk") == [] and r.message(1, b"") == []
    assert r.dropped == 2
    other = install(group="db")
    with pytest.raises(OpRefused):
        r.propose(other)
    assert r.message(1, encode_op(other)) == [Rejected(other.op_id, WRONG_GROUP)]
    assert r.revision == 0


def test_replica_state_transfer_carries_state_and_history_and_none_starts_over() -> None:
    a, b = GroupReplica("web", MemoryGroupStore()), GroupReplica("web", MemoryGroupStore(), history_limit=2)
    settled_view(a, ring((1,), 4))
    for o in [install("x"), install("y"), op(UninstallBundle("web", "x"))]:
        a.message(1, a.propose(o))
    out = b.install_state(a.state_request())
    assert out == [StateChanged(a.state)] and b.state == a.state and b.revision == 3
    assert b.history == a.history[-2:]
    # the received op_ids travel with the state: a retry is a duplicate at b too
    settled_view(b, ring((1, 2), 8))
    assert b.message(1, encode_op(a.history[-1].op)) == [Rejected(a.history[-1].op.op_id, DUPLICATE)]
    # nobody had any state: the group starts over, and b offers its own (newer) state
    out = b.install_state(None)
    assert out[0] == StateChanged(GroupState("web")) and b.history == [] and b.revision == 0
    assert type(out[1]) is Adopt and out[1].revision == 3
    assert GroupReplica("web", MemoryGroupStore()).install_state(None) == [StateChanged(GroupState("web"))]
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
        settled_view(r, ring((1,), 4))
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


def test_members_that_start_a_space_together_compare_their_stored_states_and_take_the_newest() -> None:
    # After a full outage two nodes found the space together: nobody transfers a state.  Each claims
    # its stored one; until every founder's claim is delivered every operation is refused alike.
    stores = {1: MemoryGroupStore(), 2: MemoryGroupStore(), 3: MemoryGroupStore()}
    newer = GroupState("web").apply(install("hello", "1.0")).apply(install("hello", "2.0"))
    older = GroupState("web").apply(install("hello", "1.0"))
    stores[1].replace("web", older, [])
    stores[2].replace("web", newer, [HistoryEntry(2, install("hello", "2.0"))])
    a, b = (GroupReplica("web", stores[n], node=f"n{n}", node_id=n) for n in (1, 2))
    for r in (a, b):
        settled_view(r, ring((1, 2), 4))
    founding = SpaceView((1, 2), (1, 2), (), group_space("web"), (1, 4, 0))
    claims = {n: r.space_view(founding) for n, r in ((1, a), (2, b))}
    assert all(type(c[0]) is Adopt for c in claims.values())
    assert (a.state, a.read_only_reason) == (GroupState("web"), STARTING)
    early = install("other")
    for r in (a, b):                                  # delivered before the claims: refused alike
        assert r.message(1, encode_op(early)) == [Rejected(early.op_id, STARTING)]
    # A third node joins meanwhile: the transfer tells it whose claims are still awaited.
    c = GroupReplica("web", stores[3], node="n3", node_id=3)
    joined = SpaceView((1, 2, 3), (3,), (), group_space("web"), (1, 5, 0))
    for r in (a, b, c):
        settled_view(r, ring((1, 2, 3), 5))
    assert a.space_view(joined) == b.space_view(joined) == []     # a and b now await node 3's claim too
    claims[3] = c.space_view(joined)                              # node 3 claims as it joins
    assert c.install_state(a.state_request()) == [StateChanged(GroupState("web"))]
    assert type(claims[3][0]) is Adopt and c.read_only_reason == STARTING
    for sender in (2, 1, 3):                          # the newer claim first, then the older ones
        outs = {n: r.message(sender, claims[sender][0].payload) for n, r in ((1, a), (2, b), (3, c))}
    assert all(out == [StateChanged(newer)] for out in outs.values())
    assert a.state == b.state == c.state == newer and a.writable and c.writable
    assert [e.revision for e in b.history] == [2] and a.history == []      # the winner keeps its history
    assert stores[1].load("web")[0] == newer


def test_a_founder_that_leaves_before_its_claim_is_not_waited_for() -> None:
    stored = MemoryGroupStore()
    stored.replace("web", GroupState("web").apply(install()), [])
    a = GroupReplica("web", stored, node="n1", node_id=1)
    settled_view(a, ring((1, 2), 4))
    claim = a.space_view(SpaceView((1, 2), (1, 2), (), group_space("web"), (1, 4, 0)))
    assert a.message(1, claim[0].payload) == []                      # still waiting for node 2
    assert a.space_view(SpaceView((1,), (), (2,), group_space("web"), (1, 4, 1))) == [
        StateChanged(stored.load("web")[0])]
    assert a.writable and a.revision == 1


# --------------------------------------------------------------------------- simulation


class SimProvisioningGroup:
    """A GroupReplica of group "web" on every node of ``sim``, fed by the real layers.

    Each node's store outlives its crashes (it is the node's disk).  The
    :class:`Adopt` outputs are multicast in the space, as a driver does."""

    def __init__(self, sim: SimCluster) -> None:
        self.sim = sim
        self.space = group_space("web")
        self.stores = {n: MemoryGroupStore() for n in sim.nodes}
        self.replicas: dict[int, GroupReplica] = {}
        self.outputs: dict[int, list] = {n: [] for n in sim.nodes}
        for n in sim.nodes:
            sim.services.state_provider(n, self.space, lambda n=n: self.replicas[n].state_request())
            sim.services.state_receiver(n, self.space, lambda data, n=n: self._out(n, self.replicas[n].install_state(data)))
            self.replicas[n] = GroupReplica("web", self.stores[n], node=f"n{n}")
        sim.services.add_observer(self._observe)

    def _out(self, node: int, outputs: list) -> None:
        self.outputs[node].extend(outputs)
        for out in outputs:
            if type(out) is Adopt:                       # the driver's duty: offer the newer stored state
                self.sim.services.send(node, self.space, out.payload)

    def _observe(self, node: int, event) -> None:
        replica = self.replicas.get(node)
        if replica is None:
            return
        t = type(event)
        if t is View:
            self._out(node, replica.ring_view(event))
        elif t is Synced:
            self._out(node, replica.synced())
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
        self.replicas[node] = GroupReplica("web", self.stores[node], node=f"n{node}")   # loads its disk
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


# --------------------------------------------------------------------------- every body: group ones applied, plan ones refused


def plan_bodies() -> list:
    return [BeginRollout("prod", DIGEST, "", {}, (RoleTarget("n1", "web"),), 1, 30.0),
            ReportHealth("prod", 1, "n1", True), AdvanceRollout("prod", 1, 0), EndRollout("prod", 1, True)]


def test_group_state_handles_every_group_body_and_refuses_plan_bodies() -> None:
    s = GroupState("web").apply(install())
    for body in plan_bodies():
        with pytest.raises(OpRefused, match=f"not a group operation: {body.__struct_config__.tag}"):
            s.check(op(body))
        with pytest.raises(OpRefused, match="not a group operation"):
            s.apply(op(body))
    key = Ed25519PrivateKey.generate().public_key().public_bytes(serialization.Encoding.Raw,
                                                                  serialization.PublicFormat.Raw)
    s2 = s.apply(op(SetGroupPolicy("web", (key, key))))
    assert s2.revision == 2 and s2.trusted_keys == (key,) and s2.bundles == s.bundles
    s3 = s2.apply(op(SetGroupPolicy("web")))
    assert s3.trusted_keys == () and s3.revision == 3
    newer = s3.apply(op(StartBundle("web", "hello")))
    adopted = s.apply(op(AdoptState("web", newer.snapshot())))
    assert adopted == newer                                              # the offered state, its own revision
    with pytest.raises(OpRefused, match="adopt: the offered revision 1 is not newer than revision 4"):
        newer.apply(op(AdoptState("web", s.snapshot())))
    # the replica rejects a plan operation (the same everywhere) instead of failing
    r = GroupReplica("web", MemoryGroupStore())
    settled_view(r, ring((1,), 4))
    plan_op = op(plan_bodies()[0])
    assert plan_op.group == PLANS
    with pytest.raises(OpRefused):
        r.propose(plan_op)
    assert r.message(1, encode_op(plan_op)) == [Rejected(plan_op.op_id, WRONG_GROUP)]
    policy = op(SetGroupPolicy("web", (key,)))
    assert r.message(1, r.propose(policy)) == [Accepted(policy, 1), StateChanged(r.state)]
    assert r.state.trusted_keys == (key,)


def test_old_snapshots_without_trusted_keys_still_decode() -> None:
    old = msgspec.msgpack.encode(["web", 2, {}, {"p": {"k": "v"}}, ["n1:1", "n1:2"]])
    assert GroupState.restore(old) == GroupState("web", 2, {}, {"p": {"k": "v"}}, ("n1:1", "n1:2"), ())


# --------------------------------------------------------------------------- signatures


def raw(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def signed_install(key: Ed25519PrivateKey | None, name: str = "hello", version: str = "2.0",
                   digest: str = DIGEST) -> Op:
    signature = key.sign(signed_message_for(name, version, digest)) if key is not None else b""
    return op(InstallBundle("web", name, version, digest, 10, f"{name}-{version}.tar.gz", signature))


def test_signed_message_for_is_what_a_bundle_signature_covers(tmp_path: Path) -> None:
    from groupcomm.services.provisioning.bundle import read_bundle
    bundle = read_bundle(build_wheel(tmp_path, "1.0"))
    assert signed_message_for(bundle.manifest.name, bundle.manifest.version, bundle.sha256) == signed_message(bundle)


def test_a_group_policy_refuses_unsigned_and_untrusted_bundles_at_every_member() -> None:
    trusted, other = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    replicas = [GroupReplica("web", MemoryGroupStore()) for _ in range(3)]
    feed(replicas, ring((1, 2, 3), 4))
    before = install("old")                                              # installed before the policy: stays
    feed(replicas, (1, encode_op(before)))
    policy = op(SetGroupPolicy("web", (raw(other), raw(trusted))))
    assert all(o[0] == Accepted(policy, 2) for o in feed(replicas, (1, encode_op(policy))))
    refusals = [(signed_install(None), ("bundle hello 2.0 \\(sha256 abababababab\\) is not signed: group 'web' "
                                        "accepts only bundles signed by one of its 2 trusted keys")),
                (signed_install(Ed25519PrivateKey.generate()), "has a signature no trusted key verifies"),
                # a signature of another file, name or version does not carry over
                (op(msgspec.structs.replace(signed_install(trusted).body, version="2.1")),
                 "hello 2.1 .*no trusted key verifies"),
                (op(msgspec.structs.replace(signed_install(trusted).body, digest="cd" * 32)),
                 "sha256 cdcdcdcdcdcd"),
                (op(msgspec.structs.replace(signed_install(trusted).body, signature=b"\0" * 64)),
                 "no trusted key verifies")]
    for refused, reason in refusals:
        outs = feed(replicas, (2, encode_op(refused)))
        assert len({repr(o) for o in outs}) == 1                          # the same answer everywhere
        assert type(outs[0][0]) is Rejected and outs[0][0].op_id == refused.op_id
        assert re.search(reason, outs[0][0].reason), outs[0][0].reason
    assert all(r.revision == 2 and set(r.state.bundles) == {"old"} for r in replicas)
    good = signed_install(trusted)
    assert all(o[0] == Accepted(good, 3) for o in feed(replicas, (3, encode_op(good))))
    assert all(set(r.state.bundles) == {"old", "hello"} for r in replicas)
    # an empty policy lifts the requirement
    feed(replicas, (1, encode_op(op(SetGroupPolicy("web")))))
    unsigned = install("free")
    assert all(type(o[0]) is Accepted for o in feed(replicas, (1, encode_op(unsigned))))


# --------------------------------------------------------------------------- configuration bytes and snapshot size


def test_configuration_is_bounded_in_bytes() -> None:
    s = GroupState("web")
    value = "v" * 60_000
    for i in range(4):
        s = s.apply(op(SetConfig("web", "org.x", f"k{i}", value)))
    assert s.config_bytes == 4 * (5 + 2 + 60_000) <= MAX_CONFIG_BYTES
    with pytest.raises(OpRefused, match=f"would exceed {MAX_CONFIG_BYTES} bytes"):
        s.apply(op(SetConfig("web", "org.x", "k4", value)))
    with pytest.raises(OpRefused, match="would exceed"):                 # bytes, not characters
        s.apply(op(SetConfig("web", "org.x", "k0", "\u00e9" * 45_000)))
    s = s.apply(op(SetConfig("web", "org.x", "k0", "small")))          # replacing a value frees its bytes
    s = s.apply(op(SetConfig("web", "org.x", "k4", value)))
    assert s.config_bytes <= MAX_CONFIG_BYTES
    # a state over the bound (stored before it existed) still loads and may shrink, not grow
    over = GroupState("web", 1, {}, {"p": {f"k{i}": value for i in range(6)}})
    assert GroupState.restore(over.snapshot()) == over
    assert over.apply(op(SetConfig("web", "p", "k0", "x"))).config_bytes < over.config_bytes
    with pytest.raises(OpRefused, match="would exceed"):
        over.apply(op(SetConfig("web", "p", "k0", value + "more")))


def biggest_state(revision: int) -> GroupState:
    """A group at its bounds: too large to offer in an AdoptState."""
    recent = tuple(f"{i:0200d}" for i in range(RECENT_OP_IDS))
    configs = {"p": {f"k{i}": "v" * 60_000 for i in range(4)}}
    return GroupState("web", revision, {}, configs, recent)


def test_a_state_too_large_to_adopt_is_not_offered_and_the_reason_is_logged(caplog) -> None:
    big = biggest_state(7)
    assert len(big.snapshot()) > MAX_STATE_BYTES
    store = MemoryGroupStore()
    store.save("web", big, [])
    r = GroupReplica("web", store, node="n2")
    with caplog.at_level(logging.WARNING, logger="groupcomm.provisioning"):
        out = r.install_state(GroupReplica("web", MemoryGroupStore()).state_request())
    assert out == [StateChanged(GroupState("web"))]
    assert "not offering stored revision 7 over the received revision 0: its snapshot of " in caplog.text
    assert f"exceeds {MAX_STATE_BYTES}" in caplog.text


# --------------------------------------------------------------------------- adopting a newer stored state


def replica_at(revision: int, node: str, ops: list[Op] | None = None) -> GroupReplica:
    """A replica whose store has a state made by ``ops`` (default: ``revision`` config settings)."""
    r = GroupReplica("web", MemoryGroupStore(), node=node)
    settled_view(r, ring((1,), 2))
    for o in ops or [op(SetConfig("web", "p", "k", str(i))) for i in range(revision)]:
        assert type(r.message(1, r.propose(o))[0]) is Accepted
    r.ring_view(ring((1,), 3, transitional=True))
    return r


def test_a_joiner_with_a_newer_store_offers_it_and_every_member_adopts_it() -> None:
    shared = [install("a"), op(SetConfig("web", "p", "k", "1"))]
    old = replica_at(2, "n1", shared)                                    # the first to start: its store is older
    stale_state = old.state
    tail = [op(StartBundle("web", "a")), op(UninstallBundle("web", "a"))]
    new = replica_at(4, "n2", shared + tail)
    newest = new.state
    out = new.install_state(old.state_request())
    assert out[0] == StateChanged(old.state) and new.state == old.state  # identical to the others at this point
    adopt = out[1]
    assert type(adopt) is Adopt and adopt.revision == 4 and adopt.op_id.startswith("n2:adopt:4:")
    offered = decode_op(adopt.payload)
    assert offered.origin_node == "n2" and type(offered.body) is AdoptState
    assert GroupState.restore(offered.body.state) == newest
    # the same state offered again is the same operation
    assert replica_at(4, "n2", shared + tail).install_state(old.state_request())[1] == adopt
    members = [old, new]
    # a merging ring view: refused alike until the spaces' SYNC round ended
    feed(members, ring((1, 2), 8, primary=False), sync=False)
    assert feed(members, (2, adopt.payload)) == [[Rejected(adopt.op_id, MERGING)]] * 2
    feed(members, Synced(RingId(1, 8)))
    # not in a regular primary configuration: read-only, as any operation
    assert feed(members, (2, adopt.payload)) == [[Rejected(adopt.op_id, READ_ONLY)]] * 2
    feed(members, ring((1, 2), 12))
    outs = feed(members, (2, adopt.payload))
    for r, o in zip(members, outs):
        assert o[0].revision == 4 and o[0].op.op_id == adopt.op_id and o[0].op.body == AdoptState("web", b"")
        assert r.state == newest and r.revision == 4
        assert r.history[-1] == HistoryEntry(4, o[0].op)                # recorded without the snapshot
    # delivered again, or an older offer: refused alike (revisions only grow)
    outs = feed(members, (2, adopt.payload))
    assert outs[0] == outs[1] and "adopt: the offered revision 4 is not newer than revision 4" in outs[0][0].reason
    stale = op(AdoptState("web", stale_state.snapshot()), node="n1")
    assert feed(members, (1, encode_op(stale)))[0][0].reason.startswith("adopt: the offered revision 2")
    other = op(AdoptState("web", GroupState("db", 9).snapshot()))
    assert "is of 'db', not 'web'" in feed(members, (1, encode_op(other)))[0][0].reason
    junk = op(AdoptState("web", b"\x01"))
    assert "does not decode" in feed(members, (1, encode_op(junk)))[0][0].reason
    assert all(r.state == newest for r in members)


def test_no_offer_when_the_received_state_is_as_new() -> None:
    a, b = replica_at(3, "n1"), replica_at(3, "n2")
    assert b.install_state(a.state_request()) == [StateChanged(a.state)]
    c = replica_at(1, "n3")
    assert c.install_state(a.state_request()) == [StateChanged(a.state)]


def test_an_adoption_survives_in_the_sqlite_history(tmp_path: Path) -> None:
    old, new = replica_at(1, "n1"), replica_at(3, "n2")
    adopt = new.install_state(old.state_request())[1]
    with SqliteGroupStore(tmp_path / "p.sqlite") as store:
        r = GroupReplica("web", store)
        r.install_state(old.state_request())
        settled_view(r, ring((1, 2), 8))
        assert r.message(2, adopt.payload)[0].revision == 3
    with SqliteGroupStore(tmp_path / "p.sqlite") as store:
        state, history = store.load("web")
        assert state.revision == 3 and history[-1].revision == 3
        assert history[-1].op.body == AdoptState("web", b"")


# --------------------------------------------------------------------------- any replicated state


class Tally(msgspec.Struct, frozen=True, array_like=True):
    """A tiny replicated state: SetConfig ops add their value's length; nothing else is accepted."""

    group: str
    revision: int = 0
    recent: tuple[str, ...] = ()
    total: int = 0

    def has_applied(self, op_id: str) -> bool:
        return op_id in self.recent

    def check(self, o: Op) -> None:
        if type(o.body) is not SetConfig:
            raise OpRefused("tally: only set-config")

    def apply(self, o: Op) -> Tally:
        if self.has_applied(o.op_id):
            return self
        self.check(o)
        return Tally(self.group, self.revision + 1, (self.recent + (o.op_id,))[-8:], self.total + len(o.body.value))

    def snapshot(self) -> bytes:
        return msgspec.msgpack.encode(self)

    @staticmethod
    def restore(data: bytes) -> Tally:
        try:
            return msgspec.msgpack.decode(data, type=Tally)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise StateCorrupt(str(exc)) from None


def test_the_replica_replicates_any_state_type(tmp_path: Path) -> None:
    def tally(store, node: str = "-") -> GroupReplica:
        return GroupReplica("web", store, state_type=Tally, space="test.tally", node=node)

    with SqliteGroupStore(tmp_path / "p.sqlite") as disk:
        a = tally(disk, "n1")
        assert a.space == "test.tally" and a.state == Tally("web")
        settled_view(a, ring((1,), 4))
        adds = [op(SetConfig("web", "p", "k", "abc")), op(SetConfig("web", "p", "k", "de"))]
        for o in adds:
            assert a.message(1, a.propose(o))[0] == Accepted(o, a.revision)
        assert a.message(1, encode_op(adds[0])) == [Rejected(adds[0].op_id, DUPLICATE)]
        bad = op(StartBundle("web", "x"))
        assert a.message(1, encode_op(bad)) == [Rejected(bad.op_id, "tally: only set-config")]
        assert a.state == Tally("web", 2, tuple(o.op_id for o in adds), 5)
    with SqliteGroupStore(tmp_path / "p.sqlite") as disk:
        assert disk.load("web", Tally)[0] == Tally("web", 2, tuple(o.op_id for o in adds), 5)
        a = tally(disk, "n1")
        assert a.state.total == 5 and [e.op for e in a.history] == adds
        # transfer to a joiner, and the joiner's own newer state offered back
        b = tally(MemoryGroupStore(), "n2")
        assert b.install_state(a.state_request()) == [StateChanged(a.state)] and b.state == a.state
        fresh = tally(MemoryGroupStore())
        out = a.install_state(fresh.state_request())
        assert out[0] == StateChanged(Tally("web")) and type(out[1]) is Adopt
        settled_view(a, ring((1, 2), 8))
        assert a.message(1, out[1].payload)[0].revision == 2 and a.state.total == 5
    mem = MemoryGroupStore()
    mem.save("web", GroupState("web"), [])
    with pytest.raises(StateCorrupt, match="not a Tally"):
        mem.load("web", Tally)


# --------------------------------------------------------------------------- cold start in the simulator


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_sim_cold_start_with_the_oldest_store_first_ends_with_the_newest_state(seed: int) -> None:
    rng = random.Random(seed)
    sim = SimCluster(3, seed=seed, stack="sim", quorum=QuorumConfig(expected_votes=3))
    group = SimProvisioningGroup(sim)
    assert sim.run_until(sim.converged, timeout=10)
    for n in sim.nodes:
        group.join(n)
    assert sim.run_until(lambda: all(group.in_space(n) and group.replicas[n].writable for n in sim.nodes), 10)

    def accept(ops: list[Op], nodes: list[int]) -> None:
        for o in ops:
            group.propose(rng.choice(nodes), o)
            sim.run(rng.uniform(0.0, 0.05))
        assert sim.run_until(lambda: all(type(group.answer(n, o.op_id)) is Accepted for n in nodes for o in ops), 10)

    accept([install("hello"), op(SetConfig("web", "org.x", "port", "80"))], sim.nodes)
    oldest = rng.choice(sim.nodes)
    group.crash(oldest)                                  # its disk stops at revision 2
    rest = [n for n in sim.nodes if n != oldest]
    assert sim.run_until(lambda: all(group.replicas[n].writable and set(group.replicas[n].members) == set(rest)
                                     for n in rest), 10)
    accept([op(StartBundle("web", "hello")), install("other"), op(UninstallBundle("web", "hello"))], rest)
    newest = group.replicas[rest[0]].state
    assert newest.revision == 5
    for n in rest:
        group.crash(n)
    assert {group.stores[n].load("web")[0].revision for n in sim.nodes} == {2, 5}

    # the whole cluster restarts, the node with the oldest disk first: it starts the space alone
    group.restart(oldest)
    assert sim.run_until(lambda: group.in_space(oldest), 10)
    assert group.replicas[oldest].revision == 2
    for n in rest:
        group.restart(n)
        sim.run(rng.uniform(0.0, 0.3))
    assert sim.run_until(lambda: sim.converged() and group.agree()
                         and all(group.replicas[n].writable for n in sim.nodes), 20)
    for n in sim.nodes:
        assert group.replicas[n].state == newest
        assert group.stores[n].load("web")[0] == newest
    adoptions = [out for out in group.outputs[oldest] if type(out) is Accepted and type(out.op.body) is AdoptState]
    assert [a.revision for a in adoptions] == [5]
    # and the group goes on from there
    more = op(SetConfig("web", "org.x", "port", "81"))
    group.propose(oldest, more)
    assert sim.run_until(lambda: all(type(group.answer(n, more.op_id)) is Accepted for n in sim.nodes), 5)
    assert {group.replicas[n].revision for n in sim.nodes} == {6}
