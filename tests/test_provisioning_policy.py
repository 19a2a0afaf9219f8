"""Sync policies (groupcomm.services.provisioning.policy): parsing, routes, outbound decisions, effective state."""

from __future__ import annotations

import tomllib

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from groupcomm.errors import ConfigError
from groupcomm.services.provisioning.ops import (
    AdoptState,
    DeleteConfig,
    EndRollout,
    InstallBundle,
    Op,
    SetConfig,
    SetGroupPolicy,
    StartBundle,
    StopBundle,
    UninstallBundle,
)
from groupcomm.services.provisioning.policy import (
    LOCAL,
    PROPOSE,
    Filter,
    GroupPolicy,
    KindPolicy,
    Refusal,
    SyncPolicy,
)
from groupcomm.services.provisioning.reconcile import merge
from groupcomm.services.provisioning.state import (
    GroupReplica,
    GroupState,
    HistoryEntry,
    MemoryGroupStore,
    SqliteGroupStore,
)

D1, D2, D3 = "1" * 64, "2" * 64, "3" * 64


def policy(text: str) -> SyncPolicy:
    return SyncPolicy.from_toml(tomllib.loads(text)["provisioning"]["sync"])


_counter = iter(range(1, 1 << 30))


def op(body) -> Op:
    return Op(f"t:{next(_counter)}", "t", "tester", 0.0, body)


def install(group: str, name: str, version: str = "1.0", digest: str = D1) -> InstallBundle:
    return InstallBundle(group, name, version, digest, 10, f"{name}-{version}.tar.gz")


def state(group: str, *bodies) -> GroupState:
    s = GroupState(group)
    for b in bodies:
        s = s.apply(op(b))
    return s


# --------------------------------------------------------------------------- parsing

EXAMPLE = """
[provisioning.sync.default]
bundles = { mode = "cluster" }
configs = { mode = "cluster", inbound = { deny = ["local.*"] } }
[provisioning.sync.web]
configs = { mode = "cluster", outbound = { allow = ["shared.*"] } }
"""


def test_the_example_parses_and_a_group_table_replaces_the_default_kind_by_kind():
    p = policy(EXAMPLE)
    assert p.default.configs.inbound == Filter(deny=("local.*",))
    web = p.for_group("web")
    assert web.configs.outbound == Filter(allow=("shared.*",))
    assert web.configs.inbound == Filter()                      # replaced, not merged with the default's
    assert web.bundles == p.default.bundles                      # not named: the default's
    assert web.configs.where == "provisioning.sync.web.configs"
    assert p.for_group("db") is p.default


def test_no_table_and_an_empty_kind_table_mean_cluster_with_no_lists():
    for p in (SyncPolicy(), SyncPolicy.from_toml({}), policy("[provisioning.sync.default]\nconfigs = {}\n")):
        for kind in ("bundles", "configs"):
            k = p.for_group("any").kind(kind)
            assert (k.mode, k.inbound, k.outbound) == ("cluster", Filter(), Filter())


@pytest.mark.parametrize(("table", "where", "hint"), [
    ([], "provisioning.sync", "expected a table of groups"),
    ({"web": 3}, "provisioning.sync.web", "expected a table"),
    ({"web w": {}}, "provisioning.sync.web w", "not a valid group name"),
    ({"web": {"config": {}}}, "provisioning.sync.web.config", "did you mean 'configs'?"),
    ({"web": {"bundles": "node"}}, "provisioning.sync.web.bundles", "expected a table"),
    ({"web": {"bundles": {"mode": "nodes"}}}, "provisioning.sync.web.bundles.mode", "expected one of"),
    ({"web": {"bundles": {"mod": "node"}}}, "provisioning.sync.web.bundles.mod", "did you mean 'mode'?"),
    ({"default": {"configs": {"inbound": ["x"]}}}, "provisioning.sync.default.configs.inbound",
     "expected a table"),
    ({"web": {"configs": {"outbound": {"alow": []}}}}, "provisioning.sync.web.configs.outbound.alow",
     "did you mean 'allow'?"),
    ({"web": {"configs": {"inbound": {"deny": "x.*"}}}}, "provisioning.sync.web.configs.inbound.deny",
     "expected a list"),
    ({"web": {"configs": {"inbound": {"allow": [1]}}}}, "provisioning.sync.web.configs.inbound.allow",
     "expected a list"),
    ({"web": {"configs": {"inbound": {"allow": [""]}}}}, "provisioning.sync.web.configs.inbound.allow",
     "could match no name"),
    ({"web": {"configs": {"inbound": {"allow": ["web/*"]}}}}, "provisioning.sync.web.configs.inbound.allow",
     "could match no name"),
    ({"web": {"configs": {"mode": "node", "inbound": {"deny": ["x"]}}}},
     "provisioning.sync.web.configs.inbound", "only in mode \"cluster\""),
    ({"web": {"bundles": {"mode": "disabled", "outbound": {"allow": ["x"]}}}},
     "provisioning.sync.web.bundles.outbound", "only in mode \"cluster\""),
])
def test_every_mistake_is_a_config_error_naming_the_table_and_field(table, where, hint):
    with pytest.raises(ConfigError) as e:
        SyncPolicy.from_toml(table)
    assert str(e.value).startswith(where + ":")
    assert hint in str(e.value)


def test_the_caller_names_where_the_table_is():
    with pytest.raises(ConfigError, match=r"^node.toml \[provisioning.sync\].web.bundels: unknown key"):
        SyncPolicy.from_toml({"web": {"bundels": {}}}, where="node.toml [provisioning.sync]")


# --------------------------------------------------------------------------- filters and routes


def test_filters_deny_wins_over_allow_and_an_empty_allow_list_allows_all():
    assert Filter().admits("anything")
    f = Filter(allow=("web.*", "db-?"), deny=("web.debug*",))
    assert f.admits("web.http") and f.admits("db-1")
    assert not f.admits("web.debug") and not f.admits("web.debug.x")    # deny wins
    assert not f.admits("db-10") and not f.admits("app")                # not allowed
    assert not f.admits("WEB.http")                                      # case-sensitive
    assert Filter(deny=("[ab]*",)).admits("cx") and not Filter(deny=("[ab]*",)).admits("bx")
    assert not Filter(allow=("*",), deny=("*",)).admits("x")


@pytest.mark.parametrize(("kind_policy", "name", "route"), [
    (KindPolicy(), "x", "shared"),
    (KindPolicy(outbound=Filter(deny=("x",))), "x", "overridden"),
    (KindPolicy(inbound=Filter(deny=("x",)), outbound=Filter(deny=("x",))), "x", "local"),
    (KindPolicy(inbound=Filter(allow=("y",))), "x", "sent"),
    (KindPolicy("node"), "x", "local"),
    (KindPolicy("disabled"), "x", "disabled"),
])
def test_routes_follow_the_table(kind_policy, name, route):
    assert kind_policy.route(name) == route


# --------------------------------------------------------------------------- outbound

RESOURCE_BODIES = [install("web", "shop"), UninstallBundle("web", "shop"), StartBundle("web", "shop"),
                   StopBundle("web", "shop"), SetConfig("web", "shop.http", "port", "80"),
                   DeleteConfig("web", "shop.http", "port")]


@pytest.mark.parametrize("body", RESOURCE_BODIES, ids=lambda b: type(b).__name__)
def test_outbound_per_mode(body):
    assert policy("[provisioning.sync.default]\n").outbound("web", body) == PROPOSE
    kind = "bundles" if hasattr(body, "name") else "configs"
    other = "configs" if kind == "bundles" else "bundles"
    node = policy(f"[provisioning.sync.web]\n{kind} = {{ mode = \"node\" }}\n{other} = {{ mode = \"disabled\" }}")
    assert node.outbound("web", body) == LOCAL
    assert node.outbound("db", msgspec.structs.replace(body, group="db")) == PROPOSE
    disabled = policy(f"[provisioning.sync.web]\n{kind} = {{ mode = \"disabled\" }}\n")
    decision = disabled.outbound("web", body)
    assert isinstance(decision, Refusal)
    assert f"provisioning.sync.web.{kind}.mode = \"disabled\"" in decision.reason
    assert repr(getattr(body, "name", getattr(body, "pid", None))) in decision.reason


def test_outbound_lists_with_wildcards_keep_changes_local():
    p = policy(EXAMPLE)
    assert p.outbound("web", SetConfig("web", "shared.db", "url", "x")) == PROPOSE
    assert p.outbound("web", SetConfig("web", "web.http", "port", "80")) == LOCAL     # not allowed out
    assert p.outbound("db", SetConfig("db", "web.http", "port", "80")) == PROPOSE     # default: all out
    # inbound-excluded, outbound-admitted ("sent"): proposed, as written
    assert p.outbound("db", SetConfig("db", "local.x", "k", "v")) == PROPOSE
    both = policy('[provisioning.sync.default]\nconfigs = { inbound = { deny = ["local.*"] }, '
                  'outbound = { deny = ["local.*"] } }\n')
    assert both.outbound("db", DeleteConfig("db", "local.x", "k")) == LOCAL


def test_group_policy_adopt_state_and_plan_bodies_are_always_proposed():
    p = policy('[provisioning.sync.default]\nbundles = { mode = "disabled" }\nconfigs = { mode = "node" }\n')
    assert p.outbound("web", SetGroupPolicy("web", ())) == PROPOSE
    assert p.outbound("web", AdoptState("web", GroupState("web").snapshot())) == PROPOSE
    assert p.outbound("@plans", EndRollout("prod", 3, True)) == PROPOSE


def test_outbound_refuses_a_body_of_another_group():
    with pytest.raises(ValueError, match="names group 'db'"):
        SyncPolicy().outbound("web", StartBundle("db", "shop"))


# --------------------------------------------------------------------------- effective

R = state("web", install("web", "shop"), StartBundle("web", "shop"), install("web", "tool", digest=D2),
          SetConfig("web", "shop.http", "port", "80"), SetConfig("web", "shop.http", "host", "a"),
          SetConfig("web", "local.x", "k", "group"))
L = state("web", install("web", "shop", "0.9", D3), install("web", "mine", digest=D3),
          SetConfig("web", "shop.http", "port", "8080"), SetConfig("web", "local.x", "k", "node"),
          SetConfig("web", "local.y", "k", "node"))


def test_cluster_mode_acts_on_the_replicated_state_and_ignores_a_stale_overlay():
    e = SyncPolicy().effective("web", R, L)
    assert (e.bundles, e.configs) == (R.bundles, R.configs)
    assert (e.group, e.revision, e.recent) == (R.group, R.revision, R.recent)


def test_node_mode_acts_on_the_overlay_only():
    e = policy('[provisioning.sync.web]\nbundles = { mode = "node" }\nconfigs = { mode = "node" }\n'
               ).effective("web", R, L)
    assert (e.bundles, e.configs) == (L.bundles, L.configs)
    assert e.revision == R.revision


def test_disabled_mode_takes_nothing_of_that_kind():
    e = policy('[provisioning.sync.web]\nbundles = { mode = "disabled" }\n').effective("web", R, L)
    assert e.bundles == {} and e.configs == R.configs
    e = policy('[provisioning.sync.web]\nconfigs = { mode = "disabled" }\n').effective("web", R, L)
    assert e.configs == {} and e.bundles == R.bundles


def test_overridden_resources_take_the_overlay_key_by_key_and_bundle_by_bundle():
    p = policy('[provisioning.sync.web]\nbundles = { outbound = { deny = ["*"] } }\n'
               'configs = { outbound = { deny = ["*"] } }\n')
    e = p.effective("web", R, L)
    assert e.bundles == {"shop": L.bundles["shop"], "tool": R.bundles["tool"], "mine": L.bundles["mine"]}
    assert e.configs == {"shop.http": {"port": "8080", "host": "a"}, "local.x": {"k": "node"},
                         "local.y": {"k": "node"}}


def test_inbound_lists_with_wildcards_in_both_directions():
    # inbound allow: only web.*/shop* come from the group; deny both ways keeps local.* local
    p = policy('[provisioning.sync.web]\n'
               'bundles = { inbound = { allow = ["sho?"] } }\n'
               'configs = { inbound = { allow = ["shop.*", "local.*"], deny = ["local.*"] }, '
               'outbound = { deny = ["local.*"] } }\n')
    e = p.effective("web", R, L)
    assert set(e.bundles) == {"shop"}                                   # tool excluded, "mine" is "sent"
    assert e.bundles["shop"] == R.bundles["shop"]
    assert e.configs == {"shop.http": R.configs["shop.http"],           # deny wins over allow: local.* local
                         "local.x": {"k": "node"}, "local.y": {"k": "node"}}


def test_a_sent_resource_is_not_acted_on_here():
    p = policy('[provisioning.sync.web]\nconfigs = { inbound = { deny = ["local.*"] } }\n')
    assert "local.x" not in p.effective("web", R, L).configs
    assert "local.y" not in p.effective("web", R, L).configs


# --------------------------------------------------------------------------- main server with slaves

MAIN = '[provisioning.sync.web]\nconfigs = { mode = "cluster" }\n'
SLAVE = '[provisioning.sync.web]\nconfigs = { mode = "cluster", outbound = { deny = ["*"] } }\n'


class Node:
    """One node as the driver will run it: a policy, its local overlay, and the group's one replicated state."""

    def __init__(self, text: str, cluster: dict) -> None:
        self.policy = policy(text)
        self.overlay = GroupState("web")
        self.cluster = cluster

    def change(self, body) -> str:
        decision = self.policy.outbound("web", body)
        if decision == PROPOSE:
            self.cluster["web"] = self.cluster["web"].apply(op(body))
        elif decision == LOCAL:
            self.overlay = self.overlay.apply(op(body))
        return decision

    def config(self) -> dict:
        return self.policy.effective("web", self.cluster["web"], self.overlay).configs


def test_main_server_with_slaves():
    cluster = {"web": GroupState("web")}
    main, s1, s2 = Node(MAIN, cluster), Node(SLAVE, cluster), Node(SLAVE, cluster)
    assert main.change(SetConfig("web", "shop.http", "port", "80")) == PROPOSE
    assert main.change(SetConfig("web", "shop.db", "url", "db1")) == PROPOSE
    assert s1.config() == s2.config() == main.config() == {"shop.http": {"port": "80"}, "shop.db": {"url": "db1"}}

    # a slave's change stays on the slave
    assert s1.change(SetConfig("web", "shop.http", "port", "8080")) == LOCAL
    assert s1.config()["shop.http"] == {"port": "8080"}
    assert main.config()["shop.http"] == s2.config()["shop.http"] == {"port": "80"}
    assert cluster["web"].configs["shop.http"] == {"port": "80"}

    # the main changes the same key later: the slave keeps its own value; everything else follows
    main.change(SetConfig("web", "shop.http", "port", "81"))
    main.change(SetConfig("web", "shop.http", "host", "0.0.0.0"))
    main.change(SetConfig("web", "shop.db", "url", "db2"))
    assert s1.config() == {"shop.http": {"port": "8080", "host": "0.0.0.0"}, "shop.db": {"url": "db2"}}
    assert s2.config() == main.config() == {"shop.http": {"port": "81", "host": "0.0.0.0"},
                                            "shop.db": {"url": "db2"}}

    # the slave drops its local key: the main's current value shows through
    assert s1.change(DeleteConfig("web", "shop.http", "port")) == LOCAL
    assert s1.config() == main.config()
    # a slave cannot delete the main's key for everyone; it has no local key to delete
    with pytest.raises(Exception, match="no configuration key 'url'"):
        s1.change(DeleteConfig("web", "shop.db", "url"))
    assert cluster["web"].configs["shop.db"] == {"url": "db2"}


# --------------------------------------------------------------------------- Cellar's sync bugs

DENY_LOCAL = ('[provisioning.sync.default]\n'
              'bundles = { inbound = { deny = ["debug-*"] }, outbound = { deny = ["debug-*"] } }\n'
              'configs = { inbound = { deny = ["local.*"] }, outbound = { deny = ["local.*"] } }\n')


def test_a_denied_resource_is_not_acted_on_when_it_arrives_by_state_transfer():
    """Cellar applied its black lists to events but not to the full sync of a joining node."""
    holder_store = MemoryGroupStore()
    holder_store.save("web", state("web", install("web", "debug-shell"), install("web", "shop", digest=D2),
                                   SetConfig("web", "local.x", "k", "v"), SetConfig("web", "shop.http", "p", "1")),
                      [])
    holder = GroupReplica("web", holder_store)
    joiner = GroupReplica("web", MemoryGroupStore())
    joiner.install_state(holder.state_request())
    assert joiner.state == holder.state                                # the replicated state is never filtered
    p = policy(DENY_LOCAL)
    e = p.effective("web", joiner.state, GroupState("web"))
    assert set(e.bundles) == {"shop"} and set(e.configs) == {"shop.http"}
    plan = merge({"web": e})                                           # what the reconciler gets
    assert set(plan.bundles) == {"shop"} and set(plan.configs) == {"shop.http"}
    assert plan.keep == {D2}


def test_a_locally_kept_change_never_reaches_the_group_not_even_by_state_transfer():
    cluster = {"web": state("web", SetConfig("web", "shop.http", "p", "1"))}
    node = Node(DENY_LOCAL, cluster)
    assert node.change(SetConfig("web", "local.x", "k", "mine")) == LOCAL
    assert node.change(install("web", "debug-shell")) == LOCAL
    store = MemoryGroupStore()
    store.save("web", cluster["web"], [])
    joiner = GroupReplica("web", MemoryGroupStore())
    joiner.install_state(GroupReplica("web", store).state_request())
    assert "local.x" not in joiner.state.configs and "debug-shell" not in joiner.state.bundles
    assert node.policy.effective("web", joiner.state, node.overlay).configs["local.x"] == {"k": "mine"}


# --------------------------------------------------------------------------- properties

NAMES = ["a", "ab", "b.x", "b.y", "c-1"]
PATTERNS = st.sampled_from(["a*", "b.*", "*", "?", "c-[0-9]", "ab", "z*"])
filters = st.builds(lambda a, d: Filter(tuple(a), tuple(d)),
                    st.lists(PATTERNS, max_size=2), st.lists(PATTERNS, max_size=2))
kind_policies = st.one_of(st.builds(KindPolicy, st.just("cluster"), filters, filters),
                          st.sampled_from([KindPolicy("node"), KindPolicy("disabled")]))


@st.composite
def group_states(draw):
    bodies = []
    for name in draw(st.lists(st.sampled_from(NAMES), unique=True, max_size=4)):
        bodies.append(install("g", name, draw(st.sampled_from(["1", "2"])), D1))
    for pid in draw(st.lists(st.sampled_from(NAMES), unique=True, max_size=4)):
        for key in draw(st.lists(st.sampled_from(["k", "j"]), unique=True, min_size=1)):
            bodies.append(SetConfig("g", pid, key, draw(st.sampled_from(["u", "v"]))))
    return state("g", *bodies)


@given(kind_policies, kind_policies, group_states(), group_states())
def test_effective_never_holds_what_the_inbound_rules_exclude_unless_the_overlay_has_it(bp, cp, r, lo):
    p = SyncPolicy(GroupPolicy(bp, cp))
    e = p.effective("g", r, lo)
    assert e.revision == r.revision
    for kind, kp, got, rep, loc in (("bundles", bp, e.bundles, r.bundles, lo.bundles),
                                    ("configs", cp, e.configs, r.configs, lo.configs)):
        for name in got:
            assert (kp.mode == "cluster" and kp.inbound.admits(name)) or name in loc
        for name in set(rep) | set(loc):
            route = kp.route(name)
            expected = {"shared": rep.get(name), "local": loc.get(name), "sent": None, "disabled": None}.get(route)
            if route == "overridden":
                if kind == "bundles":
                    expected = loc.get(name, rep.get(name))
                else:
                    expected = {**rep.get(name, {}), **loc.get(name, {})} or None
            assert got.get(name) == expected, (name, route)
            # the overlay counts exactly where this node's changes go to the overlay
            body = StopBundle("g", name) if kind == "bundles" else DeleteConfig("g", name, "k")
            assert (p.outbound("g", body) == LOCAL) == (route in ("overridden", "local"))


def test_the_overlay_is_a_group_state_kept_in_its_own_store_across_a_restart(tmp_path):
    """No new schema: the driver keeps each group's overlay in a second SqliteGroupStore (its history is the
    node's log of local changes)."""
    p = policy(SLAVE)
    overlay = GroupState("web")
    change = op(SetConfig("web", "shop.http", "port", "8080"))
    assert p.outbound("web", change.body) == LOCAL
    overlay = overlay.apply(change)
    with SqliteGroupStore(tmp_path / "local.sqlite3") as store:
        store.save("web", overlay, [HistoryEntry(overlay.revision, change)])
    with SqliteGroupStore(tmp_path / "local.sqlite3") as store:
        restored, history = store.load("web")
    assert restored == overlay and [h.op for h in history] == [change]
    replicated = state("web", SetConfig("web", "shop.http", "port", "80"))
    assert p.effective("web", replicated, restored).configs == {"shop.http": {"port": "8080"}}
