"""The provisioning agent (ProvisioningNode) on real channels, supervisors and bundle processes, in one trio run.

Three nodes on loopback channels, each with its own supervisor and state
directory: a real wheel (the greeter: answers ``VERSION GREETING GREETING``)
installed and started on the default group from one node is pulled, installed
in a venv and started by every node; a configuration change is served; an
upgrade replaces it everywhere; the overview and the audit log say so; an
uninstall removes it.  Each node listens on its own port, set as a node-local
configuration (the sync policy keeps PID ``node`` on its node).
"""

from __future__ import annotations

import contextlib
import socket
import uuid
from pathlib import Path

import httpx
import pytest
import trio

from groupcomm.io.channel import open_channel
from groupcomm.services.provisioning.node import (
    ProvisioningNode,
    ProvisioningSettings,
    Refused,
)
from groupcomm.services.provisioning.overview import Progress
from groupcomm.services.provisioning.policy import SyncPolicy
from groupcomm.services.supervisor.runner import Supervisor
from groupcomm.services.supervisor.spec import NodeSpec
from tests.bundles import BUNDLE_NAME, greeter_wheel

PID = "org.example.hello"
NODE_LOCAL = SyncPolicy.from_toml(
    {"default": {"configs": {"inbound": {"deny": ["node"]}, "outbound": {"deny": ["node"]}}}})


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def get(port: int) -> str | None:
    def fetch() -> str | None:
        try:
            return httpx.get(f"http://127.0.0.1:{port}/", timeout=2).text
        except httpx.TransportError:
            return None
    return await trio.to_thread.run_sync(fetch)


async def all_serve(ports: list[int], expected: str, limit: float = 60) -> None:
    bodies: list = []
    with trio.move_on_after(limit):
        while (bodies := [await get(p) for p in ports]) != [expected] * len(ports):
            await trio.sleep(0.2)
        return
    raise AssertionError(f"ports {ports} answer {bodies}, expected {expected!r}")


@contextlib.asynccontextmanager
async def cluster(tmp_path: Path, names: list[str]):
    """A ProvisioningNode per name, on loopback channels of one fresh cluster."""
    name_of_cluster, overrides = f"prov-{uuid.uuid4().hex[:8]}", {"UDP": {"mcast_port": free_udp_port()}}
    async with contextlib.AsyncExitStack() as stack:
        nodes = []
        for name in names:
            ch = await stack.enter_async_context(open_channel(
                "loopback", cluster=name_of_cluster, name=name, overrides=overrides, state_dir=tmp_path / "state"))
            sup = await stack.enter_async_context(Supervisor(
                NodeSpec(source="<node>", processes=(), base_dir=str(tmp_path / name)), name=name))
            settings = ProvisioningSettings(state_dir=tmp_path / name / "provisioning", policy=NODE_LOCAL,
                                            op_timeout=20.0, converge_timeout=120.0)
            nodes.append(await stack.enter_async_context(ProvisioningNode(ch, sup, settings, name=name)))
        with trio.fail_after(30):
            while not all(len(n.core.board.statuses()) == len(names) for n in nodes):
                await trio.sleep(0.05)
        yield nodes


async def test_a_bundle_installed_from_one_node_runs_configured_and_upgraded_on_every_node(tmp_path):
    v1, v2 = (greeter_wheel(tmp_path / f"w{v}", v, port_var="GROUPCOMM_CONFIG_NODE_PORT",
                            pids=(PID, "node")) for v in ("1.0", "2.0"))
    ports = [free_port() for _ in range(3)]
    async with cluster(tmp_path, ["n1", "n2", "n3"]) as nodes:
        with trio.fail_after(240):
            for node, port in zip(nodes, ports, strict=True):
                await node.set_config("node", {"port": str(port)})          # node-local: stays here
            assert [n.get_config("node") for n in nodes] == [{"port": str(p)} for p in ports]
            assert all(n.core.replica("default").state.configs == {} for n in nodes)

            seen: list[Progress] = []
            revision = await nodes[0].install_bundle(v1, group="default", start=True, progress=seen.append)
            assert revision == 2                                          # install, start
            await all_serve(ports, "1.0 - -")
            assert {p.node for p in seen if p.step == "started"} == {"n1", "n2", "n3"}

            await nodes[1].set_config(PID, {"greeting": "hi"})
            await all_serve(ports, "1.0 hi hi")

            await nodes[2].install_bundle(v2, group="default")
            await all_serve(ports, "2.0 hi hi")

            status = nodes[0].cluster_status(group="default")
            while not (len(status.rows) == 3 and all(r.in_sync and r.actual == "2.0" for r in status.rows)):
                await trio.sleep(0.2)
                status = nodes[0].cluster_status(group="default")
            assert {r.node for r in status.rows} == {"n1", "n2", "n3"}
            assert [(b.name, b.version, b.started) for b in nodes[1].bundles("default")] == [(BUNDLE_NAME, "2.0", True)]
            history = [(a.node, a.what.split(" (")[0]) for a in nodes[2].history(group="default")]
            assert history == [("n1", f"install {BUNDLE_NAME} 1.0"), ("n1", f"start {BUNDLE_NAME}"),
                               ("n2", f"config set {PID} greeting=hi"), ("n3", f"install {BUNDLE_NAME} 2.0")]

            await nodes[0].uninstall_bundle(BUNDLE_NAME)
            while [await get(p) for p in ports] != [None] * len(ports):
                await trio.sleep(0.2)
            while any(n.supervisor.table() or n.executor.environments.list() for n in nodes):
                await trio.sleep(0.2)


async def test_operations_on_a_group_this_node_is_not_in_are_refused_with_the_way_out(tmp_path):
    async with cluster(tmp_path, ["n1"]) as (node,):
        with trio.fail_after(30):
            with pytest.raises(Refused, match="not in group 'web'.*groupcomm group join web"):
                await node.start_bundle("x", group="web")
            with pytest.raises(Refused, match="no bundle 'x' in group 'default'"):
                await node.start_bundle("x")
            await node.join_group("web")
            while [(g.name, g.joined, g.members) for g in node.groups()] != [
                    ("default", True, ("n1",)), ("web", True, ("n1",))]:
                await trio.sleep(0.05)                    # its next status says it is in web


PLAN = """
[plan]
name = "shop"

[roles.web]
bundles = ["{wheel}"]
config."org.example.hello" = {{ greeting = "{greeting}" }}

[environments.preprod]
health_timeout = "{timeout}"
roles = {{ web = {{ group = "web-pre", nodes = 2 }} }}

[environments.prod]
requires = "preprod"
health_timeout = "{timeout}"
roles = {{ web = {{ group = "default", nodes = 3 }} }}
"""


def write_plan(path: Path, wheel: Path, greeting: str, timeout: str = "60s") -> Path:
    path.write_text(PLAN.format(wheel=wheel, greeting=greeting, timeout=timeout))
    return path


async def test_a_plan_rolls_out_to_preprod_then_prod_and_a_failing_version_is_rolled_back(tmp_path):
    port_of = {f"n{i}": free_port() for i in (1, 2, 3)}
    v1, v2 = (greeter_wheel(tmp_path / f"w{v}", v, port_var="GROUPCOMM_CONFIG_NODE_PORT", pids=(PID, "node"))
              for v in ("1.0", "2.0"))
    broken = greeter_wheel(tmp_path / "w3", "3.0", port_var="GROUPCOMM_CONFIG_NODE_BAD", pids=(PID, "node"))
    refusing = socket.socket()                       # bound, never listening: the broken version's health fails
    refusing.bind(("127.0.0.1", 0))
    async with cluster(tmp_path, ["n1", "n2", "n3"]) as nodes:
        with trio.fail_after(300), refusing:
            bad_port = str(refusing.getsockname()[1])
            for node in nodes:
                await node.set_config("node", {"port": str(port_of[node.name]), "bad": bad_port})
            for node in nodes[:2]:
                await node.join_group("web-pre")
            while ("web-pre", ("n1", "n2")) not in [(g.name, g.members) for g in nodes[2].groups()]:
                await trio.sleep(0.05)                    # n3 hears of the group from their statuses
            ports = list(port_of.values())

            first = write_plan(tmp_path / "v1.toml", v1, "one")
            with pytest.raises(Refused, match="preprod"):              # the promotion gate
                await nodes[2].apply_plan(first, env="prod")
            seen: list[Progress] = []
            pre = await nodes[2].apply_plan(first, env="preprod", progress=seen.append)
            assert (pre.outcome, [n.health for n in pre.nodes]) == ("succeeded", ["healthy", "healthy"])
            assert {p.node for p in seen} == {"n1", "n2"}
            await all_serve(ports[:2], "1.0 one one")
            assert await get(ports[2]) is None                         # n3 is not in preprod
            prod = await nodes[0].apply_plan(first, env="prod")
            assert prod.outcome == "succeeded" and len(prod.nodes) == 3
            await all_serve(ports, "1.0 one one")

            second = write_plan(tmp_path / "v2.toml", v2, "two")
            diff = await nodes[1].plan_diff(second, env="prod")
            assert diff.changed and "2.0" in str(diff)
            assert (await nodes[1].apply_plan(second, env="prod", force=True)).forced
            await all_serve(ports, "2.0 two two")

            bad = write_plan(tmp_path / "v3.toml", broken, "three", timeout="4s")
            result = await nodes[1].apply_plan(bad, env="prod", force=True)
            assert result.outcome == "rolled-back" and "batch 1/3 not healthy within 4s" in result.reason
            await all_serve(ports, "2.0 two two")                       # every target back at revision 2
            assert [r.outcome for r in nodes[2].plan_history("prod")] == ["rolled-back", "succeeded", "succeeded"]

            back = await nodes[0].rollback_plan("prod")                 # to the last succeeded before 2
            assert back.outcome == "succeeded" and back.rollback_of == prod.revision
            await all_serve(ports, "1.0 one one")
