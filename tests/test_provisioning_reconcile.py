"""The provisioning reconciler (groupcomm.services.provisioning.reconcile), sans-IO.

Table-driven cases (one step of each kind of change, conflicts, failures,
the actual table) and a Hypothesis property: from random desired states and
random node contents, a fake driver that checks every action's precondition
as it carries it out converges in a bounded number of rounds, after which
the reconciler returns nothing.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace

from hypothesis import given
from hypothesis import strategies as st

from groupcomm.services.provisioning.reconcile import (
    Action,
    Actual,
    BundleRow,
    ConfigChanged,
    EnvFact,
    Fetch,
    GcStore,
    Install,
    ProcessFact,
    Start,
    Stop,
    Uninstall,
    actual_rows,
    merge,
    process_name,
    reconcile,
)
from groupcomm.services.provisioning.state import BundleDesired, GroupState


def dig(name: str, version: str, variant: int = 0) -> str:
    return hashlib.sha256(f"{name}-{version}-{variant}".encode()).hexdigest()


def want(name: str, version: str, started: bool = True, variant: int = 0) -> BundleDesired:
    return BundleDesired(version, dig(name, version, variant), 1000, f"{name}-{version}.tar.gz", started)


def groups(*states: GroupState) -> dict[str, GroupState]:
    return {s.group: s for s in states}


def env(name: str, version: str, variant: int = 0) -> EnvFact:
    return EnvFact(name, version, dig(name, version, variant))


def proc(name: str, version: str, variant: int = 0, **kw: object) -> ProcessFact:
    return ProcessFact(version, dig(name, version, variant), **kw)  # type: ignore[arg-type]


A1, A2 = dig("a", "1.0"), dig("a", "2.0")
ONE = groups(GroupState("g1", 1, {"a": want("a", "1.0")}))


# --------------------------------------------------------------------------- one step at a time


CASES = [
    ("fresh: fetch", ONE, Actual(),
     [Fetch(A1, 1000, "a-1.0.tar.gz", "g1")]),
    ("fetch in flight: wait", ONE, Actual(fetching=frozenset({A1})), []),
    ("fetch failed: no retry", ONE, Actual(failed={A1: "no member has it"}), []),
    ("stored: install", ONE, Actual(store=frozenset({A1})), [Install("a", "1.0", A1)]),
    ("installed: start", ONE, Actual(store=frozenset({A1}), envs=frozenset({env("a", "1.0")})),
     [Start("a", "1.0", A1, upgrade=False)]),
    ("running: nothing", ONE,
     Actual(store=frozenset({A1}), envs=frozenset({env("a", "1.0")}), processes={"a": proc("a", "1.0")}), []),
    ("installed without the blob: nothing to fetch", ONE,
     Actual(envs=frozenset({env("a", "1.0")}), processes={"a": proc("a", "1.0")}), []),
    ("desired stopped: stop", groups(GroupState("g1", 1, {"a": want("a", "1.0", started=False)})),
     Actual(store=frozenset({A1}), envs=frozenset({env("a", "1.0")}), processes={"a": proc("a", "1.0")}),
     [Stop("a")]),
    ("uninstalled: stop and gc first, environment kept while the process exists", groups(GroupState("g1", 2)),
     Actual(store=frozenset({A1}), envs=frozenset({env("a", "1.0")}), processes={"a": proc("a", "1.0")}),
     [Stop("a"), GcStore(frozenset())]),
    ("uninstalled, process gone: remove the environment", groups(GroupState("g1", 2)),
     Actual(envs=frozenset({env("a", "1.0")})), [Uninstall("a", "1.0")]),
    ("upgrade: old keeps running while the new one installs",
     groups(GroupState("g1", 3, {"a": want("a", "2.0")})),
     Actual(store=frozenset({A1, A2}), envs=frozenset({env("a", "1.0")}), processes={"a": proc("a", "1.0")}),
     [Install("a", "2.0", A2), GcStore(frozenset({A2}))]),
    ("upgrade: change the process", groups(GroupState("g1", 3, {"a": want("a", "2.0")})),
     Actual(store=frozenset({A2}), envs=frozenset({env("a", "1.0"), env("a", "2.0")}),
            processes={"a": proc("a", "1.0")}),
     [Start("a", "2.0", A2, upgrade=True)]),
    ("upgrade done: old environment removed", groups(GroupState("g1", 3, {"a": want("a", "2.0")})),
     Actual(store=frozenset({A2}), envs=frozenset({env("a", "1.0"), env("a", "2.0")}),
            processes={"a": proc("a", "2.0")}),
     [Uninstall("a", "1.0")]),
    ("same version, other file, not here yet: keep running",
     groups(GroupState("g1", 4, {"a": want("a", "1.0", variant=1)})),
     Actual(store=frozenset({A1}), envs=frozenset({env("a", "1.0")}), processes={"a": proc("a", "1.0")}),
     [Fetch(dig("a", "1.0", 1), 1000, "a-1.0.tar.gz", "g1"), GcStore(frozenset({dig("a", "1.0", 1)}))]),
    ("same version, other file, here: stop to make room",
     groups(GroupState("g1", 4, {"a": want("a", "1.0", variant=1)})),
     Actual(store=frozenset({dig("a", "1.0", 1)}), envs=frozenset({env("a", "1.0")}),
            processes={"a": proc("a", "1.0")}),
     [Stop("a")]),
    ("same version, other file, stopped: uninstall before install",
     groups(GroupState("g1", 4, {"a": want("a", "1.0", variant=1)})),
     Actual(store=frozenset({dig("a", "1.0", 1)}), envs=frozenset({env("a", "1.0")})),
     [Uninstall("a", "1.0")]),
    ("config changed: notify", groups(GroupState("g1", 5, {"a": want("a", "1.0")}, {"p": {"k": "new"}})),
     Actual(store=frozenset({A1}), envs=frozenset({env("a", "1.0")}),
            processes={"a": proc("a", "1.0", config={"p": {"k": "old"}, "q": {}})}),
     [ConfigChanged("a", "p")]),
    ("config unchanged, PID never set: nothing", groups(GroupState("g1", 5, {"a": want("a", "1.0")}, {"p": {"k": "v"}})),
     Actual(store=frozenset({A1}), envs=frozenset({env("a", "1.0")}),
            processes={"a": proc("a", "1.0", config={"p": {"k": "v"}, "q": {}})}),
     []),
    ("conflict: the first group wins", groups(GroupState("g2", 1, {"a": want("a", "2.0")}),
                                              GroupState("g1", 1, {"a": want("a", "1.0")})),
     Actual(store=frozenset({A1})),
     [Fetch(A2, 1000, "a-2.0.tar.gz", "g2")]),
]


def test_cases() -> None:
    for what, desired, actual, expected in CASES:
        assert reconcile(desired, actual) == expected, what


def test_order_of_kinds() -> None:
    desired = groups(GroupState("g1", 1, {"a": want("a", "2.0"), "b": want("b", "1.0"), "c": want("c", "1.0")},
                                {"p": {"k": "v"}}))
    actual = Actual(store=frozenset({dig("b", "1.0"), dig("x", "1.0")}),
                    envs=frozenset({env("a", "2.0"), env("old", "1.0"), env("d", "1.0")}),
                    processes={"d": proc("d", "1.0"), "c": proc("c", "0.9")})
    assert reconcile(desired, actual) == [
        Stop("d"), Uninstall("old", "1.0"), Fetch(dig("c", "1.0"), 1000, "c-1.0.tar.gz", "g1"),
        Install("b", "1.0", dig("b", "1.0")), Start("a", "2.0", dig("a", "2.0")),
        GcStore(frozenset({dig(n, v) for n, v in [("a", "2.0"), ("b", "1.0"), ("c", "1.0")]})),
    ]


def test_merge_conflicts_and_keep() -> None:
    desired = groups(GroupState("g1", 1, {"a": want("a", "1.0")}, {"p": {"k": "1", "j": "same"}}),
                     GroupState("g2", 1, {"a": want("a", "2.0"), "b": want("b", "1.0")},
                                {"p": {"k": "2", "j": "same", "new": "x"}}),
                     GroupState("g3", 1, {"a": want("a", "1.0", started=False)}))
    plan = merge(desired)
    assert plan.bundles["a"].desired == want("a", "1.0") and plan.bundles["a"].group == "g1"
    assert plan.bundles["b"].group == "g2"
    assert plan.configs == {"p": {"k": "1", "j": "same", "new": "x"}}
    assert [(c.what, c.winner, c.loser) for c in plan.conflicts] == [("a", "g1", "g2"), ("p/k", "g1", "g2"),
                                                                      ("a", "g1", "g3")]
    assert "group 'g2' wants 2.0" in str(plan.conflicts[0])
    assert plan.keep == {A1, A2, dig("b", "1.0")}             # a loser's digest is kept in the store too
    # Membership order decides, not the group name:
    assert merge(dict(reversed(desired.items()))).bundles["a"].desired == want("a", "1.0", started=False)


def test_actual_rows() -> None:
    desired = groups(GroupState("g1", 1, {"a": want("a", "2.0"), "b": want("b", "1.0"), "c": want("c", "1.0"),
                                          "d": want("d", "1.0"), "e": want("e", "1.0", started=False)}),
                     GroupState("g2", 1, {"e": want("e", "2.0")}))
    actual = Actual(store=frozenset({dig("c", "1.0")}),
                    envs=frozenset({env("a", "1.0"), env("a", "2.0"), env("e", "1.0"), env("gone", "3.0")}),
                    processes={"a": proc("a", "1.0", state="running", pid=42),
                               "gone": proc("gone", "3.0", state="failed", detail="exit 1")},
                    fetching=frozenset({dig("b", "1.0")}), failed={dig("d", "1.0"): "digest mismatch"})
    rows = {r.name: r for r in actual_rows(desired, actual)}
    assert list(rows) == ["a", "b", "c", "d", "e", "gone"]
    assert rows["a"] == BundleRow("a", "2.0", "1.0", "started", "process running")
    assert rows["b"] == BundleRow("b", "1.0", None, "fetching", "")
    assert rows["c"] == BundleRow("c", "1.0", None, "missing", "in the store, not installed yet")
    assert rows["d"] == BundleRow("d", "1.0", None, "failed", "digest mismatch")
    assert rows["e"].state == "installed" and rows["e"].actual_version == "1.0"
    assert "conflict on e" in rows["e"].reason and "'g1'" in rows["e"].reason
    assert rows["gone"] == BundleRow("gone", None, "3.0", "failed",
                                     "process failed: exit 1; no group wants it: being removed")


def test_process_fact_from_row_and_name() -> None:
    class Row:
        state, pid, detail = "backoff", None, "exit 3"

    assert ProcessFact.from_row(Row(), "1.0", A1) == ProcessFact("1.0", A1, "backoff", None, "exit 3", {})
    assert process_name("hello") == "bundle.hello"


# --------------------------------------------------------------------------- converging


class FakeDriver:
    """Does actions on an in-memory node, checking each one's precondition as it goes."""

    def __init__(self, actual: Actual, pids: dict[str, tuple[str, ...]]) -> None:
        self.store = set(actual.store)
        self.envs = set(actual.envs)
        self.processes = dict(actual.processes)
        self.pids = pids                              # the configuration PIDs each bundle reads

    def actual(self) -> Actual:
        return Actual(frozenset(self.store), frozenset(self.envs), dict(self.processes))

    def do(self, actions: list[Action], desired: dict[str, GroupState]) -> None:
        plan = merge(desired)
        referenced = {b.digest for s in desired.values() for b in s.bundles.values()}
        for a in actions:
            if isinstance(a, Fetch):
                assert a.digest not in self.store
                self.store.add(a.digest)
            elif isinstance(a, Install):
                assert a.digest in self.store
                assert not any(e.name == a.name and e.version == a.version for e in self.envs)
                self.envs.add(EnvFact(a.name, a.version, a.digest))
            elif isinstance(a, Start):
                assert EnvFact(a.name, a.version, a.digest) in self.envs, "started without its environment"
                assert (a.name in self.processes) == a.upgrade
                self.processes[a.name] = ProcessFact(
                    a.version, a.digest, config={p: dict(plan.configs.get(p, {})) for p in self.pids[a.name]})
            elif isinstance(a, Stop):
                del self.processes[a.name]
            elif isinstance(a, Uninstall):
                p = self.processes.get(a.name)
                assert p is None or p.version != a.version, "uninstalled under a running process"
                self.envs = {e for e in self.envs if (e.name, e.version) != (a.name, a.version)}
            elif isinstance(a, GcStore):
                assert referenced <= a.keep, "gc would drop a desired digest"
                self.store &= a.keep
            else:
                assert isinstance(a, ConfigChanged)
                p = self.processes[a.name]
                self.processes[a.name] = replace(p, config={**p.config, a.pid: dict(plan.configs.get(a.pid, {}))})
            # Whatever was done, every running process has its environment (a stopped or removed one is gone).
            for name, p in self.processes.items():
                assert any(e.name == name and e.version == p.version for e in self.envs)


NAMES = ["a", "b", "c"]
VERSIONS = ["1.0", "2.0"]
PIDS = ["p", "q"]
files = st.tuples(st.sampled_from(NAMES), st.sampled_from(VERSIONS), st.integers(0, 1))
bundle_wants = st.dictionaries(st.sampled_from(NAMES), st.tuples(st.sampled_from(VERSIONS), st.integers(0, 1),
                                                                  st.booleans()), max_size=3)
config_sets = st.dictionaries(st.sampled_from(PIDS), st.dictionaries(st.sampled_from(["k", "j"]),
                                                                      st.sampled_from(["x", "y"]), max_size=2),
                              max_size=2)


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[dict[str, GroupState], Actual, dict[str, tuple[str, ...]]]:
    order = draw(st.permutations(["g1", "g2", "g3"]))[: draw(st.integers(0, 3))]
    desired = {}
    for g in order:
        bundles = {n: want(n, v, started, variant) for n, (v, variant, started) in draw(bundle_wants).items()}
        desired[g] = GroupState(g, draw(st.integers(0, 5)), bundles, draw(config_sets))
    all_files = [(n, v, i) for n in NAMES for v in VERSIONS for i in (0, 1)]
    store = draw(st.sets(st.sampled_from(all_files)))
    envs = draw(st.sets(st.sampled_from(all_files), max_size=4))
    procs = {}
    for n, (v, i, state) in draw(st.dictionaries(st.sampled_from(NAMES), st.tuples(
            st.sampled_from(VERSIONS), st.integers(0, 1), st.sampled_from(["running", "backoff", "failed"])))).items():
        procs[n] = ProcessFact(v, dig(n, v, i), state, config=draw(config_sets))
        envs.add((n, v, i))                          # a supervised bundle process runs from an environment
    pids = {n: tuple(draw(st.sets(st.sampled_from(PIDS)))) for n in NAMES}
    actual = Actual(frozenset(dig(*f) for f in store), frozenset(env(*f) for f in envs), procs)
    return desired, actual, pids


@given(scenarios())
def test_converges_then_idle(scenario: tuple[dict[str, GroupState], Actual, dict[str, tuple[str, ...]]]) -> None:
    desired, actual, pids = scenario
    driver = FakeDriver(actual, pids)
    for _ in range(8):
        actions = reconcile(desired, driver.actual())
        if not actions:
            break
        assert len(set(actions)) == len(actions)
        driver.do(actions, desired)
    else:
        raise AssertionError(f"no convergence in 8 rounds; still {actions}")
    assert reconcile(desired, driver.actual()) == []
    # And converged means: exactly what the merged desired state asks for.
    plan = merge(desired)
    assert {(e.name, e.version, e.digest) for e in driver.envs} == {
        (n, w.desired.version, w.desired.digest) for n, w in plan.bundles.items()}
    assert {n: (p.version, p.digest) for n, p in driver.processes.items()} == {
        n: (w.desired.version, w.desired.digest) for n, w in plan.bundles.items() if w.desired.started}
    for p in driver.processes.values():
        assert all(dict(v) == plan.configs.get(pid, {}) for pid, v in p.config.items())
    assert driver.store <= plan.keep
    rows = actual_rows(desired, driver.actual())
    assert {r.name for r in rows} == set(plan.bundles)
    assert all(r.actual_version == r.desired_version for r in rows)
    assert all(r.state == ("started" if plan.bundles[r.name].desired.started else "installed") for r in rows)
