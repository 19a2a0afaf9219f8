"""The cluster view of processes (issue 11, items 2 and 6): tables through the group, ps, start/stop/restart.

Real ``groupcomm supervise`` processes on the loopback stack (TTL 0, a free
multicast port, the tests' cluster key), each supervising ``python -c``
sleepers; ``groupcomm ps`` and ``groupcomm restart`` run as subprocesses.
Every process is started here, bounded in time and stopped by the PID we
hold.  The hostile-message tests run in-process with channels.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import msgspec
import pytest
import trio

from groupcomm.cli.demo import free_udp_port
from groupcomm.io.channel import open_channel
from groupcomm.layers.rpc import ALL
from groupcomm.services.supervisor.local import ProcessRow
from groupcomm.services.supervisor.runner import Supervisor
from groupcomm.services.supervisor.spec import LogSettings, ProcessSpec
from groupcomm.services.supervisor.table import (
    MAX_MESSAGE,
    MAX_ROWS,
    ClusterTable,
    CommandReply,
    CommandRequest,
    MalformedMessage,
    Row,
    TableMessage,
    TableReply,
    TableRequest,
    decode,
    encode,
    row_of,
)

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
SLEEPER = [PY, "-c", "import time; time.sleep(60)"]
LIMIT = 30            # seconds any one wait may take before the test fails


# --------------------------------------------------------------------------- the wire schema (sans-IO)


def _row(name: str = "web", pid: int | None = 42) -> Row:
    return Row(name=name, state="running", pid=pid, restarts=0, since=1, role="", detail="", generation=1)


def test_every_message_kind_round_trips_through_the_one_decoder():
    for message in (TableMessage(node="n1", member=7, rows=(_row(),)), TableRequest(),
                    TableReply(node="n1", member=7, rows=()),
                    CommandRequest(node="n2", verb="restart", process="web"),
                    CommandReply(node="n2", mine=True, ok=False, error="no", unknown=True, row=_row(pid=None))):
        assert decode(encode(message)) == message


@pytest.mark.parametrize("data", [
    b"", b"\xc1", b"\x93\xa5table\xa2n1", msgspec.msgpack.encode(["table", "n1", -1, []]),
    msgspec.msgpack.encode(["table", "n1", 7, [["web", "running", 0, 0, 1, "", "", 1]]]),      # pid 0
    msgspec.msgpack.encode(["cmd", "n1", "kill", "web"]),                                       # no such verb
    msgspec.msgpack.encode(["table", "x" * 256, 7, []]),                                        # name too long
    msgspec.msgpack.encode(["table", "n1", 7, [], "extra"]),
    msgspec.msgpack.encode(["nope"]), msgspec.msgpack.encode({"node": "n1"}),
    msgspec.msgpack.encode(["table", "n1", 7, [["web", "running", None, 0, 1, "", "", 1]] * (MAX_ROWS + 1)]),
    b"\x91" + b"\xa0" * (MAX_MESSAGE + 1),
])
def test_malformed_messages_raise_only_malformed_message(data):
    with pytest.raises(MalformedMessage):
        decode(data)


def test_row_of_cuts_texts_to_their_bounds():
    row = ProcessRow(name="web", state="failed", pid=None, generation=3, restarts=2, since=5, last_exit=1,
                     role="r", detail="x" * 5000)
    wire = row_of(row)
    assert len(wire.detail) == 2048 and decode(encode(TableReply(node="n", member=1, rows=(wire,)))).rows == (wire,)


def test_the_cluster_table_keeps_view_members_tables_and_counts_what_it_drops():
    table = ClusterTable()
    table.view([1, 2])
    assert table.message(1, encode(TableMessage(node="n1", member=1, rows=(_row(),))))
    assert table.message(2, encode(TableMessage(node="n2", member=2, rows=())))
    assert not table.message(2, encode(TableMessage(node="n1", member=1, rows=())))    # claims another sender
    assert not table.message(3, encode(TableMessage(node="n3", member=3, rows=())))    # not in the view
    assert not table.message(1, encode(TableRequest()))                                # not a table
    assert not table.message(1, b"\xff")
    assert table.malformed == 4
    assert table.tables() == {"n1": (_row(),), "n2": ()}
    table.view([2])
    assert table.tables() == {"n2": ()} and table.members() == {2: "n2"}


# --------------------------------------------------------------------------- hostile peers (in-process)


def _spec(tmp_path: Path, name: str = "web") -> ProcessSpec:
    return ProcessSpec(name=name, command=tuple(SLEEPER), stop_grace=2.0, log=LogSettings(directory=str(tmp_path)))


async def test_malformed_and_forged_space_messages_are_counted_and_dropped(tmp_path):
    cluster, port = f"sv-hostile-{uuid.uuid4().hex[:8]}", free_udp_port()
    overrides = {"UDP": {"mcast_port": port}}
    async with (
        open_channel("loopback", cluster=cluster, name="n1", overrides=overrides) as c1,
        open_channel("loopback", cluster=cluster, name="intruder", overrides=overrides) as c2,
        Supervisor([_spec(tmp_path)], name="n1", channel=c1) as sup,
    ):
        assert sup.space is not None and sup.channel is c1
        remote = sup.remote
        assert remote is not None
        space = await c2.join_space(sup.node_spec.cluster.space)
        with trio.fail_after(LIMIT):
            while c2.address not in sup.space.members:
                await remote.wait_changed()
        hostile = [
            b"\xff\xfe garbage",
            msgspec.msgpack.encode(["table", "n9", c2.address, [["web", "running", -5, 0, 0, "", "", 0]]]),
            encode(TableMessage(node="forged", member=c1.address, rows=())),       # another member's id
            encode(TableRequest()),                                                 # not a space message
            msgspec.msgpack.encode(["table", "big", c2.address,
                                    [["w", "running", None, 0, 0, "", "", 0]] * (MAX_ROWS + 1)]),
        ]
        for data in hostile:
            await space.send(data)
        await space.send(encode(TableMessage(node="intruder", member=c2.address, rows=(_row("x", None),))))
        with trio.fail_after(LIMIT):
            while "intruder" not in sup.cluster_table():
                await remote.wait_changed()
        assert remote.cluster.malformed == len(hostile)
        assert set(sup.cluster_table()) == {"n1", "intruder"}
        assert [r.name for r in sup.cluster_table()["n1"]] == ["web"]

        replies = await c2.request(b"\x00not msgpack", to=c1.address, mode=ALL, timeout=2.0)
        assert not replies[c1.address].ok and "not a supervisor request" in replies[c1.address].error
        assert remote.malformed_requests == 1 and remote.malformed == len(hostile) + 1

        await space.leave()                       # its table goes with it
        with trio.fail_after(LIMIT):
            while "intruder" in sup.cluster_table():
                await remote.wait_changed()
        replies = await c2.request(encode(TableRequest()), to=c1.address, mode=ALL, timeout=2.0)
        answer = decode(replies[c1.address].value)
        assert type(answer) is TableReply and answer.node == "n1" and [r.name for r in answer.rows] == ["web"]


async def test_a_command_through_the_group_reaches_only_the_named_node(tmp_path):
    cluster, port = f"sv-cmd-{uuid.uuid4().hex[:8]}", free_udp_port()
    overrides = {"UDP": {"mcast_port": port}}
    async with (
        open_channel("loopback", cluster=cluster, name="n1", overrides=overrides) as c1,
        open_channel("loopback", cluster=cluster, name="n2", overrides=overrides) as c2,
        open_channel("loopback", cluster=cluster, overrides=overrides) as client,
        Supervisor([_spec(tmp_path / "1")], name="n1", channel=c1) as s1,
        Supervisor([_spec(tmp_path / "2")], name="n2", channel=c2) as s2,
    ):
        with trio.fail_after(LIMIT):
            await s1.wait_until(lambda r: r["web"].state == "running")
            await s2.wait_until(lambda r: r["web"].state == "running")
            while set(s1.cluster_table()) != {"n1", "n2"} or s1.cluster_table()["n2"][0].pid is None:
                await s1.remote.wait_changed()
        before = {"n1": s1.row("web").pid, "n2": s2.row("web").pid}
        replies = await client.request(encode(CommandRequest(node="n2", verb="restart", process="web")),
                                       mode=ALL, timeout=2.0)
        answers = {decode(r.value).node: decode(r.value) for m, r in replies.items() if m != client.address}
        assert answers["n2"].mine and answers["n2"].ok and not answers["n1"].mine
        with trio.fail_after(LIMIT):
            rows = await s2.wait_until(lambda r: r["web"].state == "running" and r["web"].generation == 2)
        assert rows["web"].pid != before["n2"] and rows["web"].restarts == 1
        assert s1.row("web").pid == before["n1"] and s1.row("web").restarts == 0
        with trio.fail_after(LIMIT):                # the restart reached n1's cluster table too
            while s1.cluster_table()["n2"][0].generation != 2 or s1.cluster_table()["n2"][0].pid is None:
                await s1.remote.wait_changed()
        replies = await client.request(encode(CommandRequest(node="n2", verb="stop", process="nope")),
                                       mode=ALL, timeout=2.0)
        (unknown,) = [decode(r.value) for m, r in replies.items() if m != client.address and decode(r.value).mine]
        assert not unknown.ok and unknown.unknown and "'nope'" in unknown.error


# --------------------------------------------------------------------------- real processes and the CLI


class SupervisorProcess:
    """One ``groupcomm supervise NODE.toml --cluster ...`` process; its stdout goes to a file."""

    def __init__(self, tmp_path: Path, node: str, cluster: str, port: int, processes: list[str]) -> None:
        folder = tmp_path / node
        folder.mkdir()
        entries = "".join(f'[[process]]\nname = "{p}"\ncommand = {json.dumps(SLEEPER)}\nstop_grace = "2s"\n\n'
                          for p in processes)
        (folder / "node.toml").write_text(f'node = "{node}"\n\n{entries}')
        self.out = folder / "stdout"
        self.err = folder / "stderr"
        self.proc = subprocess.Popen(
            [PY, "-P", "-m", "groupcomm", "supervise", str(folder / "node.toml"), *channel_args(cluster, port)],
            cwd=ROOT, stdout=self.out.open("w"), stderr=self.err.open("w"), start_new_session=True,
        )

    def output(self) -> str:
        return self.out.read_text()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


def channel_args(cluster: str, port: int) -> list[str]:
    return ["--cluster", cluster, "--stack", "loopback", "--mcast-port", str(port)]


def groupcomm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-P", "-m", "groupcomm", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, check=False)


def ps(cluster: str, port: int) -> list[dict]:
    out = groupcomm("ps", "--json", *channel_args(cluster, port))
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def wait_ps(cluster: str, port: int, predicate) -> list[dict]:
    """Run ``ps --json`` until ``predicate(rows)`` (a ps that found no supervisor yet counts as not yet)."""
    deadline = time.monotonic() + LIMIT
    while True:
        out = groupcomm("ps", "--json", *channel_args(cluster, port))
        rows = json.loads(out.stdout) if out.returncode == 0 else None
        if rows is not None and predicate(rows):
            return rows
        assert time.monotonic() < deadline, f"ps never showed what was expected: {rows} {out.stderr}"
        time.sleep(0.2)


def wait_output(supervisor: SupervisorProcess, words: str) -> None:
    deadline = time.monotonic() + LIMIT
    while words not in supervisor.output():
        assert supervisor.proc.poll() is None, supervisor.err.read_text()
        assert time.monotonic() < deadline, supervisor.output()
        time.sleep(0.05)


def gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_ps_shows_every_node_and_restart_acts_on_one_node_only(tmp_path):
    cluster, port = f"sv-ps-{uuid.uuid4().hex[:8]}", free_udp_port()
    nodes = {"n1": ["web", "worker"], "n2": ["web"], "n3": ["web"]}
    supervisors = [SupervisorProcess(tmp_path, n, cluster, port, procs) for n, procs in nodes.items()]
    pids: set[int] = set()
    try:
        expected = {(n, p) for n, procs in nodes.items() for p in procs}

        def all_running(rows: list[dict]) -> bool:
            return ({(r["node"], r["process"]) for r in rows} == expected
                    and all(r["state"] == "running" and r["pid"] for r in rows))

        for s in supervisors:
            wait_output(s, "supervising")
        rows = wait_ps(cluster, port, all_running)
        assert len(rows) == len(expected)              # one row per process, nothing twice
        assert all(r["restarts"] == 0 and r["generation"] == 1 and r["since"] > 1e9 for r in rows)
        before = {(r["node"], r["process"]): r["pid"] for r in rows}
        pids |= set(before.values())

        table = groupcomm("ps", *channel_args(cluster, port))
        assert table.returncode == 0, table.stderr
        header, *lines = table.stdout.splitlines()
        assert header.split() == ["NODE", "PROCESS", "PID", "STATE", "RESTARTS", "SINCE", "ROLE"]
        assert sorted((line.split()[0], line.split()[1]) for line in lines) == sorted(expected)

        out = groupcomm("restart", "n2", "web", *channel_args(cluster, port))
        assert out.returncode == 0, out.stderr
        assert out.stdout.startswith("n2: restart web: ")

        def restarted(rows: list[dict]) -> bool:
            web = [r for r in rows if (r["node"], r["process"]) == ("n2", "web")]
            return all_running(rows) and web[0]["generation"] == 2

        rows = wait_ps(cluster, port, restarted)
        after = {(r["node"], r["process"]): r for r in rows}
        pids |= {r["pid"] for r in rows}
        assert after["n2", "web"]["pid"] != before["n2", "web"] and after["n2", "web"]["restarts"] == 1
        for key in expected - {("n2", "web")}:
            assert after[key]["pid"] == before[key] and after[key]["restarts"] == 0, key
        assert gone(before["n2", "web"])

        for args, words in ((("restart", "n9", "web"), "no supervisor of node 'n9'"),
                            (("stop", "n2", "nope"), "no process 'nope' on node 'n2'")):
            out = groupcomm(*args, *channel_args(cluster, port))
            assert out.returncode == 2, (args, out.stdout, out.stderr)
            assert out.stderr.count("\n") == 1 and words in out.stderr and out.stderr.startswith("groupcomm: error:")
        assert ps(cluster, port) == rows                  # the failures changed nothing
    finally:
        for s in supervisors:
            s.stop()
    for s in supervisors:
        assert s.proc.returncode == 0, s.err.read_text()
    assert all(gone(pid) for pid in pids)             # the supervisors stopped their children


def test_supervise_without_cluster_rejects_channel_options(tmp_path):
    (tmp_path / "node.toml").write_text(f'[[process]]\nname = "web"\ncommand = {json.dumps(SLEEPER)}\n')
    out = groupcomm("supervise", str(tmp_path / "node.toml"), "--mcast-port", "45999")
    assert out.returncode == 2 and out.stderr == "groupcomm: error: --mcast-port need(s) --cluster\n"


def test_ps_with_nobody_to_answer_fails_with_one_line():
    cluster, port = f"sv-none-{uuid.uuid4().hex[:8]}", free_udp_port()
    out = groupcomm("ps", *channel_args(cluster, port), "--join-timeout", "2s", "--timeout", "0.5s")
    assert out.returncode == 1 and out.stderr.count("\n") == 1
    assert f"no supervisor in cluster {cluster!r} answered" in out.stderr


def test_the_state_directory_is_not_used_by_a_nameless_ps(tmp_path):
    """``ps`` without ``--name`` keeps no state directory (nothing left per invocation)."""
    cluster, port = f"sv-state-{uuid.uuid4().hex[:8]}", free_udp_port()
    env = {**os.environ, "GROUPCOMM_STATE_DIR": str(tmp_path / "state")}
    out = subprocess.run([PY, "-P", "-m", "groupcomm", "ps", *channel_args(cluster, port), "--join-timeout", "1s",
                          "--timeout", "0.3s"], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
                         env=env)
    assert out.returncode == 1, out.stderr
    assert not (tmp_path / "state" / cluster).exists()


async def test_a_supervisor_joining_later_learns_the_unchanged_tables_of_the_others(tmp_path):
    """Tables are published again after every view of the space, not only when they change."""
    cluster, port = f"sv-late-{uuid.uuid4().hex[:8]}", free_udp_port()
    overrides = {"UDP": {"mcast_port": port}}
    async with (
        open_channel("loopback", cluster=cluster, name="n1", overrides=overrides) as c1,
        Supervisor([_spec(tmp_path / "1")], name="n1", channel=c1) as s1,
    ):
        with trio.fail_after(LIMIT):
            await s1.wait_until(lambda r: r["web"].state == "running")
        await trio.sleep(0.5)                           # n1's last publication is long past
        async with (
            open_channel("loopback", cluster=cluster, name="n2", overrides=overrides) as c2,
            Supervisor([], name="n2", channel=c2) as s2,
        ):
            with trio.fail_after(LIMIT):
                while "n1" not in s2.cluster_table():
                    await s2.remote.wait_changed()
            (web,) = s2.cluster_table()["n1"]
            assert web.pid == s1.row("web").pid and web.state == "running"
        with trio.fail_after(LIMIT):                    # n2 left the space: its table is dropped
            while "n2" in s1.cluster_table():
                await s1.remote.wait_changed()


async def test_nothing_is_published_after_leaving_and_a_failing_channel_ends_only_the_group_side():
    """A table change after ``stop()`` (the supervisor stopping its processes) sends nothing on the
    left space; a space that went away under the publisher ends the group side, not the nursery."""
    from groupcomm.services.supervisor.remote import RemoteTable

    cluster, port = f"sv-stop-{uuid.uuid4().hex[:8]}", free_udp_port()
    async with open_channel("loopback", cluster=cluster, name="n1", overrides={"UDP": {"mcast_port": port}}) as ch:
        for how in ("stop", "gone"):
            async with trio.open_nursery() as nursery:
                remote = RemoteTable(ch, f"space-{how}", node="n1", rows=lambda: (), command=lambda v, p: None,
                                     publish_interval=0.0)
                await remote.start(nursery)
                if how == "stop":
                    await remote.stop(2.0)
                else:
                    await remote.space.leave()            # not through stop(): the publisher still runs
                remote.table_changed()
                await trio.sleep(0.2)
                assert remote.space.left
                assert (remote.failure is None) == (how == "stop"), remote.failure
                nursery.cancel_scope.cancel()
