"""The overview (cluster status) and the audit log, built from the nodes' published statuses (pure)."""

from __future__ import annotations

from groupcomm.services.provisioning.ops import InstallBundle, Op
from groupcomm.services.provisioning.overview import (
    ConfigRow,
    audit_entries,
    cluster_status,
)
from groupcomm.services.provisioning.state import HistoryEntry
from groupcomm.services.provisioning.status import NodeStatus, StatusRow


def status(node: str, rows: tuple[StatusRow, ...], **kw) -> NodeStatus:
    base = {"node_id": int(node[1:]), "groups": ("default",), "revisions": {"default": 3}, "configs": {}}
    return NodeStatus(node=node, rows=rows, **{**base, **kw})


def test_a_node_in_two_environments_shows_under_each_though_one_environment_wins_the_bundle() -> None:
    # Found with real processes: after preprod then prod, `cluster status --env preprod` was empty.
    both = {"preprod": (1, "web"), "prod": (1, "web")}
    n2 = status("n2", (StatusRow("hello", "plan.prod", "2.0", "2.0", "started", True),), plan=both,
                plan_bundles={"preprod": ("hello",), "prod": ("hello",)})
    n3 = status("n3", (StatusRow("hello", "plan.prod", "2.0", "2.0", "started", True),
                       StatusRow("tool", "default", "1.0", "1.0", "installed", None)),
                plan={"prod": (1, "web")}, plan_bundles={"prod": ("hello",)})
    pre = cluster_status([n2, n3], env="preprod")
    assert [(r.node, r.role, r.bundle) for r in pre.rows] == [("n2", "preprod/web", "hello")]
    prod = cluster_status([n2, n3], env="prod")
    assert [(r.node, r.role, r.bundle) for r in prod.rows] == [("n2", "prod/web", "hello"), ("n3", "prod/web", "hello")]
    every = cluster_status([n2, n3])
    assert [(r.node, r.role, r.bundle) for r in every.rows] == [
        ("n2", "prod/web", "hello"), ("n3", "prod/web", "hello"), ("n3", "default", "tool")]
    assert every.out_of_sync == ()


def test_out_of_sync_names_bundles_revisions_and_differing_configuration() -> None:
    a = status("n1", (StatusRow("hello", "default", "2.0", "1.0", "started", True),), configs={"shop": "aaa"})
    b = status("n2", (), revisions={"default": 2}, configs={"shop": "bbb"})
    result = cluster_status([a, b], group="default")
    assert result.configs == (ConfigRow("n1", "shop", "aaa"), ConfigRow("n2", "shop", "bbb"))
    assert result.out_of_sync == ("n1: hello wants 2.0, has 1.0 (started)",
                                  "n2: group default at revision 2, others at 3",
                                  "configuration shop differs between nodes: n1=aaa, n2=bbb")


def test_audit_entries_are_in_time_order_with_an_iso_time() -> None:
    def entry(revision: int, at: float) -> HistoryEntry:
        body = InstallBundle("web", "hello", f"{revision}.0", "ab" * 32, 10, "hello.tar.gz")
        return HistoryEntry(revision, Op(f"n1:{revision}", "n1", "alice", at, body))

    entries = audit_entries({"web": [entry(1, 1_800_000_000.0), entry(2, 1_800_000_060.0)],
                             "@plans": []})
    assert [(e.group, e.revision, e.time, e.user) for e in entries] == [
        ("web", 1, "2027-01-15T08:00:00Z", "alice"), ("web", 2, "2027-01-15T08:01:00Z", "alice")]
    assert entries[0].what == "install hello 1.0 (abababababab)"
