"""The provisioning service across a real partition between network namespaces (issue 12, "Proof").

Three ``groupcomm supervise`` processes with provisioning agents, each in a
network namespace this test makes (:mod:`tests.netns`: the udp stack,
multicast over the lab's bridge); the CLI reaches them through their control
sockets (Unix sockets by path: not confined to a network namespace).  One host
is cut off: the minority side's ``config set`` is refused with the read-only
reason (exit 1), the majority's is accepted; after healing, the minority node
has the majority's value.

Needs root and iproute2 (CI runs as root): a failure here, not a skip, as in
tests/test_supervisor_dc_processes.py.  The namespaces and every process this
test started are removed in ``finally``.
"""

from __future__ import annotations

import os
import shutil

from groupcomm.services.provisioning.state import READ_ONLY
from tests.netns import Lab
from tests.test_provisioning_processes import PID, Agent, Agents, wait_for

NODES = ("n1", "n2", "n3")


def test_the_minority_side_of_a_partition_is_read_only_and_takes_the_majority_value_after_healing(tmp_path):
    assert os.geteuid() == 0 and shutil.which("ip") is not None, "needs root and iproute2 (network namespaces)"
    with Lab(3) as lab:

        def channel_args(agent: Agent) -> list[str]:
            i = NODES.index(agent.node)
            return ["--cluster", agents.cluster, "--stack", "udp", "--bind", lab.addresses[i], "--ttl", "1",
                    "--mcast-port", str(agents.mcast_port), "--token-timeout", "0.5s"]

        with Agents(tmp_path, NODES, channel_args=channel_args, prefix_of=lab.exec_prefix) as agents:
            agents.start()
            agents.ok("n1", "config", "set", PID, "greeting=before")
            wait_for(lambda: all(agents.ok(n, "config", "get", PID, "greeting") == "before\n" for n in NODES),
                     "every node has the first value")

            lab.cut(2)

            def default_group(node: str) -> tuple[list[str], bool] | None:
                groups = agents.try_json(node, "group", "list") or []
                g = next((g for g in groups if g["name"] == "default"), None)
                return (sorted(g["members"]), g["writable"]) if g is not None else None

            wait_for(lambda: default_group("n3") == (["n3"], False), "n3 alone and read-only")
            wait_for(lambda: default_group("n1") == (["n1", "n2"], True) == default_group("n2"),
                     "n1 and n2 the writable majority")

            refused = agents.cli("n3", "config", "set", PID, "greeting=minority")
            assert refused.returncode == 1, refused
            assert f"groupcomm: error: {READ_ONLY}" in refused.stderr, refused.stderr
            agents.ok("n2", "config", "set", PID, "greeting=majority")
            assert agents.ok("n1", "config", "get", PID, "greeting") == "majority\n"
            assert agents.ok("n3", "config", "get", PID, "greeting") == "before\n"
            status = agents.json("n3", "cluster", "status")
            assert status["read_only"].get("n3") == ["default"], status["read_only"]

            lab.heal(2)
            wait_for(lambda: default_group("n3") == (list(NODES), True), "n3 back in the writable group")
            wait_for(lambda: agents.ok("n3", "config", "get", PID, "greeting") == "majority\n",
                     "n3 has the majority's value")
            history = [(e["node"], e["what"]) for e in agents.json("n3", "cluster", "history", "--group", "default")]
            assert history == [("n1", f"config set {PID} greeting=before"),
                               ("n2", f"config set {PID} greeting=majority")]

