"""The provisioning service with real processes (issue 12, "Proof: real processes").

Three ``groupcomm supervise NODE.toml --cluster C`` processes on the loopback
stack, each running a provisioning agent (a ``[provisioning]`` table in its
node file, its own state directory); the tests drive them with the real CLI
(``groupcomm group|bundle|config|plan|cluster ... --node NAME``) through the
agents' control sockets, build real wheels (the greeter of
:mod:`tests.bundles`: answers ``VERSION GREETING GREETING`` over HTTP) and
look at what the bundles serve with httpx.  Each node's greeter listens on a
port of its own: PID ``node`` is kept node-local by the sync policy in the
node file, and the greeter's manifest reads ``${GROUPCOMM_CONFIG_NODE_PORT}``.

:class:`Agents` starts the supervisors, all sharing a private
``XDG_RUNTIME_DIR`` (the control sockets) and ``XDG_STATE_HOME``;
:meth:`Agents.cli` runs one command against one agent.  Every process is
started here and, on :meth:`Agents.close` (always, in ``finally``), stopped by
the pid held -- the supervisors, then any of their descendants (bundle
processes and their guards) still alive, by process group, each checked to be
the very process recorded (pid and start time), never by name.  Every wait is
bounded.  tests/test_provisioning_netns.py uses the same helpers for a
partition between network namespaces.
"""

from __future__ import annotations

import getpass
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Self, TypeVar

import httpx

from groupcomm.cli.demo import free_udp_port
from tests.bundles import BUNDLE_NAME, GREETER_MAIN, build_wheel, greeter_manifest

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
LIMIT = 60.0          # seconds any one wait may take before the test fails
CLI_LIMIT = 240.0     # seconds one CLI command may take (install and apply wait for venvs and health)
PID = "org.example.hello"

T = TypeVar("T")

NODE_FILE = """\
node = "{node}"

[cluster]
members = {members}

[provisioning]
state_dir = "provisioning"

[provisioning.sync.default]
configs = {{ inbound = {{ deny = ["node"] }}, outbound = {{ deny = ["node"] }} }}
"""


def free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(port: int) -> str | None:
    """The body ``GET http://127.0.0.1:PORT/`` answers, None when nothing answers."""
    try:
        return httpx.get(f"http://127.0.0.1:{port}/", timeout=2).text
    except httpx.TransportError:
        return None


def wait_for(probe: Callable[[], T], what: str, limit: float = LIMIT, every: float = 0.3) -> T:
    """Call ``probe`` until it returns something true; that value (AssertionError naming ``what``
    and the last value after ``limit`` seconds)."""
    deadline = time.monotonic() + limit
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"never: {what} (last: {value!r})")
        time.sleep(every)


def serve(ports: Sequence[int], expected: Sequence[str | None], limit: float = LIMIT) -> None:
    """Wait until ``GET /`` on each port answers the expected body (None: nothing answers)."""
    wait_for(lambda: [get(p) for p in ports] == list(expected) or None,
             f"ports {list(ports)} answer {list(expected)}: {[get(p) for p in ports]}", limit)


# --------------------------------------------------------------------------- processes


def _start_time(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    if fields[0] == "Z":
        return None
    return int(fields[19])


def _parents() -> dict[int, int]:
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    out[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
                pass
    return out


def descendants(pid: int) -> dict[int, int]:
    """The processes below ``pid`` now: pid -> start time."""
    parents = _parents()
    found: dict[int, int] = {}
    frontier = [pid]
    while frontier:
        parent = frontier.pop()
        for child, ppid in parents.items():
            if ppid == parent and child not in found:
                start = _start_time(child)
                if start is not None:
                    found[child] = start
                    frontier.append(child)
    return found


class Agent:
    """One ``groupcomm supervise`` process with a provisioning agent; :meth:`start` may be called
    again after it ended (the same node file and state directory)."""

    def __init__(self, agents: Agents, node: str, prefix: Sequence[str] = ()) -> None:
        self.agents = agents
        self.node = node
        self.prefix = list(prefix)
        self.folder = agents.root / node
        self.folder.mkdir(parents=True)
        self.node_file = self.folder / "node.toml"
        self.node_file.write_text(NODE_FILE.format(node=node, members=json.dumps(list(agents.names))))
        self.state_dir = self.folder / "provisioning"
        self.proc: subprocess.Popen | None = None
        self.runs = 0

    @property
    def socket(self) -> Path:
        return self.agents.runtime / "groupcomm" / f"provisioning-{self.node}.sock"

    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None, f"{self.node} still runs"
        self.runs += 1
        out = (self.folder / f"stdout.{self.runs}").open("w")
        err = (self.folder / f"stderr.{self.runs}").open("w")
        self.proc = subprocess.Popen(
            [*self.prefix, PY, "-P", "-m", "groupcomm", "supervise", str(self.node_file),
             *self.agents.channel_args(self)],
            cwd=ROOT, env=self.agents.env, stdout=out, stderr=err, start_new_session=True)
        out.close()
        err.close()
        self.agents.started.append(self)

    def output(self) -> str:
        return "".join((self.folder / f"{kind}.{self.runs}").read_text() for kind in ("stdout", "stderr"))

    def remember_children(self) -> None:
        """Note the processes below this supervisor (its bundles) for the final clean-up."""
        if self.proc is not None and self.proc.poll() is None:
            self.agents.children.update(descendants(self.proc.pid))

    def kill9(self) -> None:
        assert self.proc is not None
        self.remember_children()
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self, timeout: float = 30) -> int | None:
        """SIGTERM (it stops its bundles and leaves), SIGKILL if it does not end in ``timeout``; its exit status."""
        if self.proc is None:
            return None
        self.remember_children()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)      # its own session: pgid == pid
                self.proc.wait(timeout=30)
        return self.proc.returncode

    def envs(self) -> list[str]:
        """The bundle environments this node has: ``name/version-digest``."""
        root = self.state_dir / "envs"
        if not root.exists():
            return []
        return sorted(f"{d.name}/{v.name}" for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")
                      for v in d.iterdir() if v.is_dir())


class Agents:
    """Provisioning agents of one fresh cluster on this host (see the module docstring).

    ``channel_args(agent)``: the channel options of an agent's ``supervise`` (default: the
    loopback stack with LAN failure-detector timers and a 1 s token timeout -- the loopback
    stack's 80 ms failure detector takes a busy two-core machine for lost members)."""

    def __init__(self, tmp_path: Path, names: Sequence[str], *,
                 channel_args: Callable[[Agent], list[str]] | None = None,
                 prefix_of: Callable[[int], Sequence[str]] = lambda i: ()) -> None:
        self.root = tmp_path / "agents"
        self.names = tuple(names)
        self.cluster = f"prov-{uuid.uuid4().hex[:8]}"
        self.mcast_port = free_udp_port()
        self.runtime = tmp_path / "run"
        self.runtime.mkdir(mode=0o700)
        (tmp_path / "state-home").mkdir()
        self.env = {**{k: v for k, v in os.environ.items() if not k.startswith("GROUPCOMM_")},
                    "XDG_RUNTIME_DIR": str(self.runtime), "XDG_STATE_HOME": str(tmp_path / "state-home")}
        self._channel_args = channel_args or self._loopback
        self.started: list[Agent] = []
        self.children: dict[int, int] = {}
        self.by_name = {n: Agent(self, n, prefix_of(i)) for i, n in enumerate(self.names)}
        self.ports = {n: free_tcp_port() for n in self.names}

    def _loopback(self, agent: Agent) -> list[str]:
        return ["--cluster", self.cluster, "--stack", "loopback", "--mcast-port", str(self.mcast_port),
                "--fd", "lan", "--token-timeout", "1s"]

    def channel_args(self, agent: Agent) -> list[str]:
        return self._channel_args(agent)

    def __getitem__(self, name: str) -> Agent:
        return self.by_name[name]

    # ------------------------------------------------------------------ commands

    def cli(self, node: str, *args: str, timeout: float = CLI_LIMIT) -> subprocess.CompletedProcess:
        """``groupcomm ARGS --node NODE`` (stdout is not a terminal: plain lines)."""
        return subprocess.run([PY, "-P", "-m", "groupcomm", *args, "--node", node], cwd=ROOT, env=self.env,
                              capture_output=True, text=True, timeout=timeout, check=False)

    def ok(self, node: str, *args: str, timeout: float = CLI_LIMIT) -> str:
        """Its stdout; AssertionError with its output unless it exits 0."""
        out = self.cli(node, *args, timeout=timeout)
        assert out.returncode == 0, (args, node, out.returncode, out.stdout, out.stderr)
        return out.stdout

    def json(self, node: str, *args: str) -> Any:
        return json.loads(self.ok(node, *args, "--json"))

    def try_json(self, node: str, *args: str) -> Any:
        """The ``--json`` answer, None when the command fails (an agent not up yet)."""
        out = self.cli(node, *args, "--json", timeout=LIMIT)
        return json.loads(out.stdout) if out.returncode == 0 else None

    def popen(self, node: str, *args: str) -> subprocess.Popen:
        """``groupcomm ARGS --node NODE`` in the background, stdout a pipe of text lines."""
        return subprocess.Popen([PY, "-P", "-m", "groupcomm", *args, "--node", node], cwd=ROOT, env=self.env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    # ------------------------------------------------------------------ life

    def start(self, names: Sequence[str] | None = None) -> None:
        """Start these agents (default: all) and wait until each sees all of them and is writable."""
        names = list(names or self.names)
        for name in names:
            self[name].start()
        self.wait_up(names)

    def wait_up(self, names: Sequence[str], members: Sequence[str] | None = None, limit: float = LIMIT) -> None:
        """Wait until each of ``names`` answers, has the published statuses of ``members`` (default:
        every running agent) in its default group, and that group is writable."""
        expected = sorted(members or [a.node for a in self.by_name.values()
                                      if a.proc is not None and a.proc.poll() is None])

        def up(name: str) -> bool:
            agent = self[name]
            assert agent.proc is not None and agent.proc.poll() is None, agent.output()
            groups = self.try_json(name, "group", "list")      # members: the nodes whose status it has
            default = next((g for g in groups or () if g["name"] == "default"), None)
            return bool(default and default["writable"] and sorted(default["members"]) == expected)

        for name in names:
            wait_for(lambda n=name: up(n), f"agent {name} up with {expected}", limit)

    def set_ports(self, names: Sequence[str] | None = None) -> None:
        """Each node's greeter port, a node-local configuration (PID ``node``, default group)."""
        for name in names or self.names:
            self.ok(name, "config", "set", "node", f"port={self.ports[name]}")

    def close(self) -> None:
        for agent in self.started:
            agent.stop()
        for pid, start in self.children.items():
            if _start_time(pid) == start:                  # still the very process recorded
                try:
                    os.killpg(os.getpgid(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------- bundles and plans

NODES = ("n1", "n2", "n3")
PORT_VAR = "GROUPCOMM_CONFIG_NODE_PORT"


def greeter(tmp_path: Path, version: str, *, health_url: str | None = None, delay: float = 0) -> Path:
    """The greeter wheel at ``version`` (port from the node-local PID ``node``); ``health_url``: a
    health check elsewhere (one that fails); ``delay``: seconds it sleeps before it listens."""
    directory = tmp_path / "wheels" / f"{version}{'-bad' if health_url else ''}{'-slow' if delay else ''}"
    directory.mkdir(parents=True)
    manifest = greeter_manifest(version, port_var=PORT_VAR, pids=(PID, "node"))
    if health_url is not None:
        default = f'url = "http://127.0.0.1:${{{PORT_VAR}:8080}}/"'
        assert default in manifest
        manifest = manifest.replace(default, f'url = "{health_url}"')
    main = GREETER_MAIN
    if delay:                   # unhealthy while it sleeps: the supervisor must not restart it meanwhile
        main = f"import time\ntime.sleep({delay})\n" + main
        manifest = manifest.replace('interval = "1s"\n', 'interval = "1s"\nfailures = 60\n')
        assert "failures = 60" in manifest
    return build_wheel(directory, version, manifest_text=manifest,
                       extra_files={"hello_bundle/__main__.py": main.encode()})


def write_plan(path: Path, wheel: Path, *, greeting: str, preprod_timeout: str = "60s",
               prod_group: str = "web", prod_nodes: int = 3) -> Path:
    path.write_text(f"""\
[plan]
name = "shop"

[roles.web]
bundles = [{json.dumps(str(wheel))}]
config."{PID}" = {{ greeting = "{greeting}" }}

[environments.preprod]
health_timeout = "{preprod_timeout}"
roles = {{ web = {{ group = "web-pre", nodes = 2 }} }}

[environments.prod]
requires = "preprod"
health_timeout = "60s"
roles = {{ web = {{ group = "{prod_group}", nodes = {prod_nodes} }} }}
""")
    return path


def group_members(agents: Agents, node: str, group: str) -> list[str] | None:
    groups = agents.try_json(node, "group", "list") or []
    return next((sorted(g["members"]) for g in groups if g["name"] == group), None)


def join(agents: Agents, group: str, nodes: Sequence[str]) -> None:
    """``group create`` on each node; then wait until every running agent sees them all in it."""
    for node in nodes:
        assert agents.ok(node, "group", "create", group) == f"created group {group}\n"
    for node in agents.names:
        if agents[node].proc is not None and agents[node].proc.poll() is None:
            wait_for(lambda n=node: group_members(agents, n, group) == sorted(nodes),
                     f"{node} sees {sorted(nodes)} in group {group}")


def bundle_processes(agent: Agent) -> list[int]:
    """The greeter processes below ``agent``'s supervisor now."""
    assert agent.proc is not None
    out = []
    for pid in descendants(agent.proc.pid):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"hello_bundle" in f.read():
                    out.append(pid)
        except (FileNotFoundError, ProcessLookupError):
            pass
    return out


# --------------------------------------------------------------------------- the tests


def test_a_bundle_installed_on_a_group_runs_on_its_members_configured_and_shown(tmp_path):
    wheel = greeter(tmp_path, "1.0")
    with Agents(tmp_path, NODES) as agents:
        agents.start()
        agents.set_ports()
        ports = [agents.ports[n] for n in NODES]
        join(agents, "web", ["n1", "n2"])

        out = agents.ok("n1", "bundle", "install", str(wheel), "--group", "web", "--start")
        lines = out.splitlines()
        assert lines[-1] == f"installed {wheel} in group web (started) (revision 2)", out
        for node in ("n1", "n2"):          # plain progress lines, one per step of each node
            assert f"{node} started {BUNDLE_NAME} 1.0: process running health ok" in lines, out
        assert not any(line.startswith("n3 ") for line in lines), out
        serve(ports, ["1.0 - -", "1.0 - -", None])                  # n3 is not in web

        assert agents.ok("n2", "config", "set", PID, "greeting=hi", "--group", "web") == \
            f"set greeting of {PID} in group web (revision 3)\n"
        serve(ports, ["1.0 hi hi", "1.0 hi hi", None])               # the file and the variable
        assert agents.ok("n1", "config", "get", PID, "greeting", "--group", "web") == "hi\n"
        assert agents.json("n1", "config", "list", "--group", "web") == {PID: {"greeting": "hi"}}

        refused = agents.cli("n3", "bundle", "list", "--group", "web", "--json")
        assert refused.returncode == 1 and "not in group 'web'" in refused.stderr, refused

        def listed() -> list[dict] | None:
            bundles = agents.json("n1", "bundle", "list", "--group", "web")
            (b,) = bundles
            nodes = [(n["node"], n["actual_version"], n["state"], n["healthy"]) for n in b["nodes"]]
            ok = nodes == [("n1", "1.0", "started", True), ("n2", "1.0", "started", True)]
            return bundles if ok else None

        (bundle,) = wait_for(listed, "bundle list shows both web nodes started and healthy")
        assert (bundle["name"], bundle["version"], bundle["started"], bundle["signed"]) == \
            (BUNDLE_NAME, "1.0", True, False)

        def status() -> dict | None:
            s = agents.json("n3", "cluster", "status")                # n3 sees the whole cluster
            rows = [(r["node"], r["bundle"], r["desired"], r["actual"], r["state"], r["health"], r["in_sync"])
                    for r in s["rows"]]
            want = [(n, BUNDLE_NAME, "1.0", "1.0", "started", "healthy", True) for n in ("n1", "n2")]
            return s if rows == want else None

        s = wait_for(status, "cluster status: web runs 1.0 on n1 and n2, nothing on n3")
        (v1, v2) = [(c["node"], c["pid"], c["version"]) for c in s["configs"]]     # PID node is node-local
        assert (v1[:2], v2[:2]) == (("n1", PID), ("n2", PID)) and v1[2] == v2[2], s["configs"]
        assert s["out_of_sync"] == [] and s["read_only"] == {}

        me = getpass.getuser()
        history = [(e["group"], e["revision"], e["node"], e["user"], e["what"].split(" (")[0])
                   for e in agents.json("n2", "cluster", "history", "--group", "web")]
        assert history == [("web", 1, "n1", me, f"install {BUNDLE_NAME} 1.0"),
                           ("web", 2, "n1", me, f"start {BUNDLE_NAME}"),
                           ("web", 3, "n2", me, f"config set {PID} greeting=hi")]
        assert [e["what"] for e in agents.json("n3", "cluster", "history")] == []   # nothing in its groups

        # a node that leaves the group stops and removes the group's bundle; the others keep it
        assert agents.ok("n2", "group", "leave", "web") == "left group web\n"
        serve(ports, ["1.0 hi hi", None, None])
        wait_for(lambda: agents["n2"].envs() == [] and not bundle_processes(agents["n2"]),
                 "n2 removed the bundle of the group it left")
        assert len(agents["n1"].envs()) == 1
        wait_for(lambda: group_members(agents, "n1", "web") == ["n1"], "n1 alone in web")


def test_plans_go_to_preprod_then_prod_and_a_failing_version_is_rolled_back(tmp_path):
    good = write_plan(tmp_path / "plan.toml", greeter(tmp_path, "2.0"), greeting="plan")
    with socket.socket() as never_listens, Agents(tmp_path, NODES) as agents:
        never_listens.bind(("127.0.0.1", 0))                 # bound, not listening: its health check fails
        bad = write_plan(tmp_path / "plan-bad.toml", greeting="plan", preprod_timeout="8s", wheel=greeter(
            tmp_path, "3.0", health_url=f"http://127.0.0.1:{never_listens.getsockname()[1]}/"))
        agents.start()
        agents.set_ports()
        ports = [agents.ports[n] for n in NODES]
        join(agents, "web-pre", ["n2", "n3"])
        join(agents, "web", list(NODES))

        gated = agents.cli("n1", "plan", "apply", str(good), "--env", "prod")
        assert gated.returncode == 1, gated
        assert "promotion gate: 'prod' requires that plan" in gated.stderr and "succeeded on 'preprod'" \
            in gated.stderr, gated.stderr
        assert agents.json("n1", "plan", "status") == []

        out = agents.ok("n1", "plan", "apply", str(good), "--env", "preprod")
        assert "[batch 1] n2 switched web health healthy" in out.splitlines(), out     # plain progress lines
        assert "[batch 2] n3 switched web health healthy" in out.splitlines(), out
        assert "outcome:        succeeded" in out, out
        serve(ports, [None, "2.0 plan plan", "2.0 plan plan"])

        result = json.loads(agents.ok("n2", "plan", "apply", str(good), "--env", "prod", "--json")
                            .splitlines()[-1])["result"]
        assert (result["env"], result["outcome"], result["origin_node"]) == ("prod", "succeeded", "n2")
        assert [(n["node"], n["switched"], n["health"]) for n in result["nodes"]] == \
            [(n, True, "healthy") for n in NODES]
        serve(ports, ["2.0 plan plan"] * 3)

        status = {r["env"]: r for r in agents.json("n3", "plan", "status")}
        assert {e: (r["revision"], r["outcome"]) for e, r in status.items()} == \
            {"preprod": (1, "succeeded"), "prod": (1, "succeeded")}
        assert status["preprod"]["plan_digest"] == status["prod"]["plan_digest"]

        # a version whose health check never passes: it runs on the first batch (n2), is not healthy
        # in time, and the environment is rolled back: the previous version serves again
        apply = agents.popen("n3", "plan", "apply", str(bad), "--env", "preprod")
        try:
            wait_for(lambda: get(agents.ports["n2"]) == "3.0 plan plan", "n2 serving the bad version", CLI_LIMIT)
            out, err = apply.communicate(timeout=CLI_LIMIT)
        finally:
            if apply.poll() is None:
                apply.kill()
                apply.wait(timeout=30)
        assert apply.returncode == 1, (out, err)
        assert "outcome:        rolled-back" in out, out
        assert "the rollout of environment 'preprod' did not succeed" in err, err
        serve(ports, ["2.0 plan plan"] * 3)
        history = agents.json("n1", "plan", "history", "--env", "preprod")
        assert [(r["revision"], r["outcome"], r["origin_node"]) for r in history] == \
            [(2, "rolled-back", "n3"), (1, "succeeded", "n1")]
        reason = history[0]["reason"]          # a health check failing, or (after many restarts) a failed process
        assert reason in ("batch 1/2 not healthy within 8s: n2 (no healthy report)",) or \
            reason.startswith("n2 (web) unhealthy: "), history[0]
        assert [(n["node"], n["switched"]) for n in history[0]["nodes"]] == [("n2", True), ("n3", False)]
        assert agents.json("n2", "plan", "history", "--env", "prod")[0]["outcome"] == "succeeded"
        no_rollback = agents.cli("n1", "plan", "rollback", "--env", "prod")
        assert no_rollback.returncode == 1 and "no succeeded revision before the current one" in \
            no_rollback.stderr, no_rollback

        def back_on_2() -> bool:
            rows = agents.json("n1", "cluster", "status", "--group", "web-pre")["rows"]
            return sorted((r["node"], r["actual"], r["health"], r["in_sync"]) for r in rows) == \
                [("n2", "2.0", "healthy", True), ("n3", "2.0", "healthy", True)]

        wait_for(back_on_2, "preprod's targets back on 2.0 in the overview")


def test_kill_9_of_the_node_driving_a_rollout_mid_rollout_another_member_ends_it(tmp_path):
    plan = write_plan(tmp_path / "plan.toml", greeter(tmp_path, "2.0", delay=4), greeting="slow",
                      prod_group="web", prod_nodes=2)
    with Agents(tmp_path, NODES) as agents:
        agents["n1"].start()                     # the oldest member of the cluster space: the driver
        wait_for(lambda: agents.try_json("n1", "group", "list"), "n1's agent answers")
        agents.start(["n2", "n3"])
        agents.set_ports()
        ports = [agents.ports[n] for n in ("n2", "n3")]
        join(agents, "web", ["n2", "n3"])        # n1 drives but is not a target

        apply = agents.popen("n2", "plan", "apply", str(plan), "--env", "prod", "--batch", "1", "--force", "--json")
        watchdog = threading.Timer(LIMIT, apply.kill)      # bounds the blocking reads below
        watchdog.start()
        try:
            assert apply.stdout is not None
            for line in apply.stdout:
                event = json.loads(line).get("progress")
                if event is not None and event["node"] == "n2" and event["step"] == "switched":
                    break
            else:
                raise AssertionError(f"plan apply ended (or was killed after {LIMIT} s) before n2 was switched: "
                                     f"{apply.stderr.read() if apply.stderr else ''}")
            watchdog.cancel()
            agents["n1"].kill9()                 # mid-rollout: n3 is not switched yet
            rest, err = apply.communicate(timeout=CLI_LIMIT)
            assert apply.returncode in (0, 1), (apply.returncode, rest, err)
        finally:
            watchdog.cancel()
            if apply.poll() is None:
                apply.kill()
                apply.wait(timeout=30)
        result = json.loads(rest.splitlines()[-1])["result"]
        assert result["outcome"] in ("succeeded", "rolled-back"), result

        survivors = ["n2", "n3"]
        agents.wait_up(survivors, members=survivors)
        (status,) = agents.json("n3", "plan", "status", "--env", "prod")
        assert status["outcome"] == result["outcome"] and status["revision"] == result["revision"]
        assert status["forced"] is True
        if status["outcome"] == "succeeded":
            assert [(n["node"], n["switched"], n["health"]) for n in status["nodes"]] == \
                [("n2", True, "healthy"), ("n3", True, "healthy")]
            serve(ports, ["2.0 slow slow"] * 2)
        else:                                    # the previous revision: nothing
            serve(ports, [None, None])
        plans = [(e["node"], e["what"]) for e in agents.json("n3", "cluster", "history") if e["group"] == "plans"]
        assert plans[0] == ("n2", plans[0][1]) and plans[0][1].startswith("apply plan on prod"), plans
        assert ("n1", "prod revision 1: switch batch 1") in plans, plans     # the driver before the kill
        ends = ("prod revision 1: succeeded", "prod revision 1: rolled back")
        ended = [(node, what) for node, what in plans if what.startswith(ends)]
        assert len(ended) == 1 and ended[0][0] in survivors, plans            # another member ended it
        if status["outcome"] == "succeeded":                                  # ... after switching the rest
            assert [n for n, what in plans if what == "prod revision 1: switch batch 2"] in (["n2"], ["n3"]), plans


def test_a_restarted_node_keeps_its_state_and_applies_an_uninstall_made_while_it_was_down(tmp_path):
    wheel = greeter(tmp_path, "1.0")
    with Agents(tmp_path, NODES) as agents:
        agents.start()
        agents.set_ports()
        ports = [agents.ports[n] for n in NODES]
        join(agents, "web", list(NODES))
        agents.ok("n1", "config", "set", PID, "greeting=hey", "--group", "web")
        agents.ok("n1", "bundle", "install", str(wheel), "--group", "web", "--start")
        serve(ports, ["1.0 hey hey"] * 3)
        n2 = agents["n2"]
        envs = n2.envs()
        assert len(envs) == 1 and envs[0].startswith(f"{BUNDLE_NAME}/1.0-"), envs

        # SIGTERM: it stops its bundle and leaves; started again, it has its groups, its
        # node-local configuration (only in its SQLite file) and its desired state, and runs it
        assert n2.stop() == 0, n2.output()
        serve(ports, ["1.0 hey hey", None, "1.0 hey hey"])
        n2.start()
        agents.wait_up(["n2"])
        assert [g["name"] for g in agents.json("n2", "group", "list") if g["joined"]] == ["default", "web"]
        assert agents.json("n2", "config", "list") == {"node": {"port": str(agents.ports["n2"])}}
        assert agents.json("n2", "config", "list", "--group", "web") == {PID: {"greeting": "hey"}}
        serve(ports, ["1.0 hey hey"] * 3)
        assert n2.envs() == envs                                   # the same environment, not made again

        # SIGKILL: its bundle goes with it; an uninstall while it is down is applied when it returns
        n2.kill9()
        serve(ports, ["1.0 hey hey", None, "1.0 hey hey"])
        agents.wait_up(["n1", "n3"], members=["n1", "n3"])
        assert agents.ok("n3", "bundle", "uninstall", BUNDLE_NAME, "--group", "web") == \
            f"uninstalled {BUNDLE_NAME} in group web (revision 4)\n"
        serve(ports, [None, None, None])
        wait_for(lambda: agents["n1"].envs() == agents["n3"].envs() == [], "n1 and n3 removed the environment")
        assert n2.envs() == envs                                   # n2 was down: it still has it

        n2.start()
        agents.wait_up(["n2"])
        wait_for(lambda: n2.envs() == [] and not bundle_processes(n2), "n2 removed its process and environment")
        assert agents.json("n2", "bundle", "list", "--group", "web") == []
        assert [e["what"] for e in agents.json("n2", "cluster", "history", "--group", "web")][-1] == \
            f"uninstall {BUNDLE_NAME}"
        time.sleep(2.0)                                            # and it stays gone
        assert get(agents.ports["n2"]) is None and n2.envs() == [] and not bundle_processes(n2)
