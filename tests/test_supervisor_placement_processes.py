"""Placed processes with real processes: a live-switch domain controller and replicas (issue 11, items 3-5).

Three supervisors, each with a channel of its own on the loopback stack (one
trio process, real child processes):

* a ``live_switch`` domain controller runs as a standby on every node, learns
  its role through the control socket (:mod:`groupcomm.services.supervisor.client`)
  and is promoted in place -- same pid -- on exactly one node; when that
  supervisor stops, another standby is promoted in place without the fencing
  delay (hand-over);
* ``replicas = 2`` keeps two instances, and again two after a hosting
  supervisor stops.
"""

from __future__ import annotations

import sys
import uuid
from pathlib import Path

import trio

from groupcomm.cli.demo import free_udp_port
from groupcomm.io.channel import open_channel
from groupcomm.layers.quorum import QuorumConfig
from groupcomm.services.supervisor.runner import Supervisor
from groupcomm.services.supervisor.spec import DOMAIN_CONTROLLER, LogSettings, ProcessSpec

LIMIT = 30.0
NODES = ("n1", "n2", "n3")

# Records every role it is told, with its pid, through the control socket.
WATCHER = """
import os, sys, time
from groupcomm.services.supervisor import client
out = sys.argv[1]
me = client.identity()
for role in client.role_changes():
    with open(out, "a") as f:
        f.write(f"{me.node} {os.getpid()} {role.role} {role.epoch}\\n")
"""


def _records(path: Path) -> list[tuple[str, int, str, str]]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        node, pid, role, epoch = line.split()
        rows.append((node, int(pid), role, epoch))
    return rows


class Node:
    """A supervisor with a channel of its own, in a task; :meth:`stop` ends it (graceful)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.sup: Supervisor | None = None
        self.stopping = trio.Event()
        self.stopped = trio.Event()

    async def run(self, cluster: str, port: int, tmp_path: Path, specs: list[ProcessSpec],
                  task_status=trio.TASK_STATUS_IGNORED) -> None:
        quorum = QuorumConfig(expected_members=NODES, state_dir=str(tmp_path / "state"))
        specs = [ProcessSpec(**{**spec.__dict__, "log": LogSettings(directory=str(tmp_path / self.name))})
                 for spec in specs]
        try:
            async with (open_channel("loopback", cluster=cluster, name=self.name, quorum=quorum,
                                     overrides={"UDP": {"mcast_port": port}}) as channel,
                        Supervisor(specs, name=self.name, channel=channel) as sup):
                self.sup = sup
                task_status.started()
                await self.stopping.wait()
        finally:
            self.stopped.set()

    async def stop(self) -> None:
        self.stopping.set()
        await self.stopped.wait()


async def _cluster(nursery: trio.Nursery, tmp_path: Path, specs: list[ProcessSpec]) -> dict[str, Node]:
    cluster, port = f"sv-place-{uuid.uuid4().hex[:8]}", free_udp_port()
    nodes = {name: Node(name) for name in NODES}
    for node in nodes.values():
        await nursery.start(node.run, cluster, port, tmp_path, specs)
    return nodes


async def _until(predicate, what: str) -> None:
    with trio.move_on_after(LIMIT):
        while not predicate():
            await trio.sleep(0.05)
        return
    raise AssertionError(f"never: {what}")


async def test_a_live_switch_controller_is_promoted_in_place_and_handed_over_in_place(tmp_path):
    out = tmp_path / "roles"
    spec = ProcessSpec(name="dc", command=(sys.executable, "-c", WATCHER, str(out)), role=DOMAIN_CONTROLLER,
                       live_switch=True, restart="always", stop_grace=2.0)
    async with trio.open_nursery() as nursery:
        nodes = await _cluster(nursery, tmp_path, [spec])
        sups = {name: node.sup for name, node in nodes.items()}

        def promoted() -> list[tuple[str, int, str, str]]:
            return [r for r in _records(out) if r[2] == DOMAIN_CONTROLLER]

        await _until(lambda: len({r[0] for r in _records(out) if r[2] == "standby"}) == 3 and promoted(),
                     "three standbys and one promotion")
        await trio.sleep(1.0)
        (host_record,) = promoted()
        host, pid = host_record[0], host_record[1]
        standby_pid = next(r[1] for r in _records(out) if r[0] == host and r[2] == "standby")
        assert pid == standby_pid                                  # promoted in place, not restarted
        assert int(host_record[3]) > 0
        assert sups[host].row("dc").role == DOMAIN_CONTROLLER
        assert {sups[n].row("dc").role for n in NODES if n != host} == {"standby"}
        assert sups[host].row("dc").generation == 1

        # The host's supervisor stops: the next standby is promoted in place, long before
        # the fencing delay would have allowed it.
        fencing = sups[host].fencing.fencing_delay
        started = trio.current_time()
        await nodes[host].stop()
        await _until(lambda: len(promoted()) == 2, "a second promotion")
        took = trio.current_time() - started
        (_, (new_host, new_pid, _, new_epoch)) = promoted()
        assert new_host != host and int(new_epoch) > int(host_record[3])
        assert new_pid == next(r[1] for r in _records(out) if r[0] == new_host and r[2] == "standby")
        assert took < fencing, (took, fencing)
        assert sups[new_host].row("dc").role == DOMAIN_CONTROLLER
        for node in nodes.values():
            node.stopping.set()


async def test_replicas_run_n_instances_and_are_replaced_when_a_supervisor_stops(tmp_path):
    spec = ProcessSpec(name="worker", command=(sys.executable, "-c", "import time; time.sleep(120)"),
                       replicas=2, restart="always", stop_grace=2.0)
    async with trio.open_nursery() as nursery:
        nodes = await _cluster(nursery, tmp_path, [spec])
        sups = {name: node.sup for name, node in nodes.items()}

        def running() -> set[str]:
            return {n for n, s in sups.items() if s.row("worker").state == "running"}

        await _until(lambda: len(running()) == 2, "two replicas")
        await trio.sleep(1.0)
        assert len(running()) == 2
        first = running()
        gone = sorted(first)[0]
        del sups[gone]
        await nodes[gone].stop()
        await _until(lambda: len(running()) == 2, "two replicas again")
        assert gone not in running() and len(first & running()) == 1   # only the lost one moved
        for node in nodes.values():
            node.stopping.set()
