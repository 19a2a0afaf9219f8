"""The supervisor's node file and its sans-IO core, in virtual time (integer microseconds).

Examples first (the node file's checks, each state change and rule), then a
Hypothesis state machine that drives the core with random exits, probe
answers, hung processes, commands and spec changes, and checks the rules as
invariants: one live generation per process, back-off within [initial, max]
and doubling, restart policies, stopped stays stopped, SIGKILL after grace.
"""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from groupcomm.errors import ConfigError
from groupcomm.services.supervisor import LocalSupervisor, parse_node
from groupcomm.services.supervisor.local import (
    Add,
    Change,
    Exited,
    ProbeResult,
    Remove,
    Restart,
    RunProbe,
    SendSignal,
    Start,
    Started,
    StartFailed,
    StartProcess,
    Stop,
    TableChanged,
)
from groupcomm.services.supervisor.spec import Backoff, HealthCheck, ProcessSpec, load_node_file

S = 1_000_000          # one second in microseconds
MS = 1_000

EXAMPLE = """
node = "n1"

[[process]]
name = "web"
command = ["python", "-m", "http.server", "${WEB_PORT:8080}"]
env = { PYTHONUNBUFFERED = "1" }
cwd = "srv"
restart = "always"
backoff = { initial = "250ms", max = "8s", reset_after = "1m" }
stop_signal = "SIGINT"
stop_grace = "3s"
health = { kind = "http", url = "http://127.0.0.1:8080/", interval = "2s", timeout = "500ms", failures = 4 }
log = { directory = "/var/log/web", max_bytes = "1MiB", keep = 2 }

[[process]]
name = "dc"
command = ["dc-server"]
role = "domain-controller"
eligible = ["n1", "n2"]

[[process]]
name = "worker"
command = ["worker"]
replicas = 2
health = { kind = "python", entry_point = "mypkg.health:check" }
"""


# --------------------------------------------------------------------------- the node file


def test_a_node_file_parses_into_frozen_specs(tmp_path):
    path = tmp_path / "node.toml"
    path.write_text(EXAMPLE)
    node = load_node_file(path, environ={})
    assert node.node == "n1" and node.base_dir == str(tmp_path)
    web = node.process("web")
    assert web.command == ("python", "-m", "http.server", "8080")
    assert dict(web.env) == {"PYTHONUNBUFFERED": "1"} and web.cwd == "srv"
    assert web.restart == "always" and web.stop_signal == "SIGINT" and web.stop_grace == 3.0
    assert web.backoff == Backoff(initial=0.25, max=8.0, reset_after=60.0)
    assert web.health == HealthCheck(kind="http", url="http://127.0.0.1:8080/", interval=2.0, timeout=0.5,
                                     failures=4)
    assert (web.log.directory, web.log.max_bytes, web.log.keep) == ("/var/log/web", 1 << 20, 2)
    assert not web.cluster_placed
    dc = node.process("dc")
    assert dc.role == "domain-controller" and dc.eligible == ("n1", "n2") and dc.cluster_placed
    worker = node.process("worker")
    assert worker.replicas == 2 and worker.cluster_placed and worker.health.entry_point == "mypkg.health:check"
    with pytest.raises(dataclasses.FrozenInstanceError):
        web.name = "x"                                      # type: ignore[misc]


def test_environment_references_are_substituted():
    node = parse_node(EXAMPLE, environ={"WEB_PORT": "9000"})
    assert node.process("web").command[-1] == "9000"


def test_defaults():
    (p,) = parse_node('[[process]]\nname = "a"\ncommand = ["a"]\n').processes
    assert p.restart == "on-failure" and p.health is None and p.role == "" and p.replicas is None
    assert p.stop_signal == "SIGTERM" and p.stop_grace == 10.0
    assert p.backoff == Backoff() and p.log.max_bytes == 10 << 20


def _process(body: str) -> str:
    return f'[[process]]\nname = "web"\n{body}\n'


@pytest.mark.parametrize(
    ("body", "field", "words"),
    [
        ('command = "python app.py"', "command", "list of strings"),
        ("command = []", "command", "non-empty"),
        ('command = ["a"]\nrestart = "sometimes"', "restart", "one of"),
        ('command = ["a"]\nstop_grace = "10 parsecs"', "stop_grace", "unit"),
        ('command = ["a"]\nstop_grace = "0s"', "stop_grace", "more than 0"),
        ('command = ["a"]\nstop_signal = "SIGFOO"', "stop_signal", "unknown signal"),
        ('command = ["a"]\nstop_signal = "SIGKILL"', "stop_signal", "can handle"),
        ('command = ["a"]\nbackoff = { initial = "2s", max = "1s" }', "backoff.max", "at least initial"),
        ('command = ["a"]\nbackoff = { inital = "1s" }', "backoff.inital", "did you mean 'initial'"),
        ('command = ["a"]\nhealth = { url = "http://x/" }', "health.kind", "missing"),
        ('command = ["a"]\nhealth = { kind = "http" }', "health.url", "missing"),
        ('command = ["a"]\nhealth = { kind = "http", url = "ftp://x" }', "health.url", "http://"),
        ('command = ["a"]\nhealth = { kind = "tcp", port = 70000 }', "health.port", "65535"),
        ('command = ["a"]\nhealth = { kind = "tcp", port = 80, url = "http://x/" }', "health.url", "not used"),
        ('command = ["a"]\nhealth = { kind = "python", entry_point = "nocolon" }', "health.entry_point",
         "module:function"),
        ('command = ["a"]\nhealth = { kind = "command", command = ["true"], failures = 0 }', "health.failures",
         "at least 1"),
        ('command = ["a"]\nhealth = { kind = "command", command = ["true"], interval = "-1s" }',
         "health.interval", "negative"),
        ('command = ["a"]\nlog = { max_bytes = "10" }', "log.max_bytes", "1KiB"),
        ('command = ["a"]\nlog = { keep = -1 }', "log.keep", "at least 0"),
        ('command = ["a"]\nenv = { PORT = 80 }', "env.PORT", "string"),
        ('command = ["a"]\nenv = { "1X" = "a" }', "env.1X", "name"),
        ('command = ["a"]\nreplicas = 0', "replicas", "at least 1"),
        ('command = ["a"]\nrole = "domain-controller"\nreplicas = 2', "replicas", "exactly once"),
        ('command = ["a"]\neligible = ["n1"]', "eligible", "placed on eligible"),
        ('command = ["a"]\nreplicas = 3\neligible = ["n1", "n2"]', "replicas", "more replicas"),
        ('command = ["a"]\nrole = "domain-controller"\neligible = ["n1", "n1"]', "eligible", "twice"),
        ('command = ["a"]\ncmd = ["b"]', "cmd", "unknown key"),
        ("", "command", "missing"),
    ],
)
def test_every_mistake_names_the_file_the_process_and_the_field(body, field, words):
    with pytest.raises(ConfigError) as e:
        parse_node(_process(body), source="node.toml")
    message = str(e.value)
    assert message.startswith(f"node.toml: process 'web': {field}"), message
    assert words in message


def test_file_level_mistakes():
    with pytest.raises(ConfigError, match="node.toml: not valid TOML"):
        parse_node("[[process]\n", source="node.toml")
    with pytest.raises(ConfigError, match="node.toml: process #1: name"):
        parse_node('[[process]]\ncommand = ["a"]\n', source="node.toml")
    with pytest.raises(ConfigError, match="node.toml: process 'a': name: a second process"):
        parse_node('[[process]]\nname = "a"\ncommand = ["a"]\n[[process]]\nname = "a"\ncommand = ["b"]\n',
                   source="node.toml")
    with pytest.raises(ConfigError, match="node.toml: proces: unknown key"):
        parse_node('[[proces]]\nname = "a"\n', source="node.toml")
    with pytest.raises(ConfigError, match="cannot read"):
        load_node_file("/nonexistent/node.toml")


def test_every_spec_field_has_a_docstring():
    from groupcomm.config.reference import attribute_docstrings
    from groupcomm.services.supervisor.spec import LogSettings, NodeSpec

    for cls in (ProcessSpec, Backoff, HealthCheck, LogSettings, NodeSpec):
        docs = attribute_docstrings(cls)
        assert {f.name for f in dataclasses.fields(cls)} <= set(docs), cls


# --------------------------------------------------------------------------- the core, by example


def spec(name: str = "a", **kw) -> ProcessSpec:
    kw.setdefault("backoff", Backoff(initial=0.1, max=0.8, reset_after=2.0))
    kw.setdefault("stop_grace", 1.0)
    return ProcessSpec(name=name, command=("prog",), **kw)


def of(actions, kind):
    return [a for a in actions if isinstance(a, kind)]


def started(sup: LocalSupervisor, now: int, name: str = "a", pid: int = 100):
    gen = sup.row(name).generation
    return sup.handle(now, Started(name, gen, pid))


def test_a_process_starts_runs_and_is_restarted_with_growing_back_off():
    sup = LocalSupervisor([spec(restart="always")])
    (start,) = of(sup.initial_actions(), StartProcess)
    assert (start.name, start.generation) == ("a", 1)
    assert sup.row("a").state == "starting"
    started(sup, 10)
    assert sup.row("a").state == "running" and sup.row("a").pid == 100
    now, delays = 10, []
    for gen in range(1, 6):
        now += 50 * MS
        sup.handle(now, Exited("a", gen, 1))
        row = sup.row("a")
        assert row.state == "backoff" and row.pid is None and row.last_exit == 1
        delays.append(row.retry_at - now)
        assert sup.next_deadline() == row.retry_at
        assert sup.tick(row.retry_at - 1) == []
        now = row.retry_at
        (again,) = of(sup.tick(now), StartProcess)
        assert again.generation == gen + 1
        started(sup, now, pid=100 + gen)
    assert delays == [100 * MS, 200 * MS, 400 * MS, 800 * MS, 800 * MS]
    assert sup.row("a").restarts == 5


def test_back_off_starts_again_from_initial_after_a_stable_run():
    sup = LocalSupervisor([spec(restart="always")])
    sup.initial_actions()
    started(sup, 0)
    sup.handle(1, Exited("a", 1, 1))
    sup.tick(sup.row("a").retry_at)
    started(sup, sup.row("a").since)
    t = sup.row("a").since
    sup.handle(t + 1, Exited("a", 2, 1))
    assert sup.row("a").retry_at - (t + 1) == 200 * MS           # still growing
    sup.tick(sup.row("a").retry_at)
    t = sup.row("a").since
    started(sup, t)
    sup.handle(t + 2 * S, Exited("a", 3, 1))                      # ran healthy reset_after
    assert sup.row("a").retry_at - (t + 2 * S) == 100 * MS


@pytest.mark.parametrize(
    ("policy", "status", "state"),
    [
        ("always", 0, "backoff"), ("always", 1, "backoff"), ("always", -9, "backoff"),
        ("on-failure", 0, "stopped"), ("on-failure", 3, "backoff"), ("on-failure", -9, "backoff"),
        ("never", 0, "stopped"), ("never", 3, "failed"), ("never", -9, "failed"),
    ],
)
def test_restart_policies(policy, status, state):
    sup = LocalSupervisor([spec(restart=policy)])
    sup.initial_actions()
    started(sup, 0)
    sup.handle(5, Exited("a", 1, status))
    assert sup.row("a").state == state
    if state != "backoff":
        assert sup.next_deadline() is None and sup.tick(100 * S) == []


def test_a_failed_start_counts_as_a_failure():
    sup = LocalSupervisor([spec(restart="on-failure")])
    sup.initial_actions()
    sup.handle(0, StartFailed("a", 1, "FileNotFoundError: prog"))
    row = sup.row("a")
    assert row.state == "backoff" and "start failed" in row.detail


def test_stop_sends_the_stop_signal_then_sigkill_after_grace_and_stays_stopped():
    sup = LocalSupervisor([spec(restart="always", stop_signal="SIGINT", stop_grace=3.0)])
    sup.initial_actions()
    started(sup, 0, pid=42)
    (sig,) = of(sup.handle(S, Stop("a")), SendSignal)
    assert (sig.pid, sig.signal) == (42, "SIGINT")
    assert sup.row("a").state == "stopping"
    assert sup.next_deadline() == 4 * S
    assert sup.tick(4 * S - 1) == []
    (kill,) = of(sup.tick(4 * S), SendSignal)
    assert (kill.pid, kill.signal) == (42, "SIGKILL")
    sup.handle(4 * S + 5, Exited("a", 1, -9))
    assert sup.row("a").state == "stopped" and sup.next_deadline() is None
    assert of(sup.tick(1000 * S), StartProcess) == []
    (start,) = of(sup.handle(1000 * S, Start("a")), StartProcess)      # only a command starts it again
    assert start.generation == 2


def test_stop_during_back_off_cancels_the_restart():
    sup = LocalSupervisor([spec(restart="always")])
    sup.initial_actions()
    started(sup, 0)
    sup.handle(1, Exited("a", 1, 1))
    assert sup.row("a").state == "backoff"
    assert of(sup.handle(2, Stop("a")), SendSignal) == []
    assert sup.row("a").state == "stopped" and sup.tick(100 * S) == []


def test_stop_before_the_start_is_reported_signals_once_the_pid_is_known():
    sup = LocalSupervisor([spec()])
    sup.initial_actions()
    assert sup.handle(0, Stop("a")) == [TableChanged(sup.table())]
    (sig,) = of(started(sup, 5, pid=7), SendSignal)
    assert sig.pid == 7 and sig.signal == "SIGTERM"


def test_health_probes_mark_unhealthy_then_restart_after_the_threshold():
    health = HealthCheck(kind="tcp", port=1, interval=1.0, timeout=0.5, failures=3)
    sup = LocalSupervisor([spec(restart="on-failure", health=health)])
    sup.initial_actions()
    started(sup, 0, pid=9)
    assert sup.row("a").state == "starting"                     # not running before a probe says so
    assert sup.next_deadline() == S
    (probe,) = of(sup.tick(S), RunProbe)
    assert (probe.pid, probe.generation) == (9, 1)
    assert sup.next_deadline() is None                          # one probe at a time
    sup.handle(S + 10, ProbeResult("a", 1, "ok"))
    assert sup.row("a").state == "running"
    now = S + 10
    for failures in (1, 2):
        now = sup.next_deadline()
        of(sup.tick(now), RunProbe)
        sup.handle(now + 5, ProbeResult("a", 1, "timeout" if failures == 1 else "failed", "refused"))
        assert sup.row("a").state == "unhealthy" and sup.row("a").failures == failures
    now = sup.next_deadline()
    sup.tick(now)
    (sig,) = of(sup.handle(now + 5, ProbeResult("a", 1, "failed")), SendSignal)
    assert sig.signal == "SIGTERM" and sup.row("a").state == "stopping"
    sup.handle(now + 10, Exited("a", 1, -15))                   # exit by our SIGTERM: still a failure
    row = sup.row("a")
    assert row.state == "backoff" and "unhealthy" in row.detail


def test_a_probe_success_resets_the_failure_count():
    health = HealthCheck(kind="tcp", port=1, interval=1.0, failures=2)
    sup = LocalSupervisor([spec(health=health)])
    sup.initial_actions()
    started(sup, 0)
    for outcome in ("failed", "ok", "failed", "ok", "failed"):
        now = sup.next_deadline()
        sup.tick(now)
        sup.handle(now, ProbeResult("a", 1, outcome))
    assert sup.row("a").state == "unhealthy" and sup.row("a").failures == 1


def test_an_unhealthy_never_process_is_stopped_and_failed():
    health = HealthCheck(kind="tcp", port=1, interval=1.0, failures=1)
    sup = LocalSupervisor([spec(restart="never", health=health)])
    sup.initial_actions()
    started(sup, 0)
    sup.tick(S)
    sup.handle(S, ProbeResult("a", 1, "failed"))
    sup.handle(S + 1, Exited("a", 1, 0))
    assert sup.row("a").state == "failed" and sup.tick(100 * S) == []


def test_restart_waits_for_the_old_generation_then_starts_without_back_off():
    sup = LocalSupervisor([spec()])
    sup.initial_actions()
    started(sup, 0, pid=5)
    actions = sup.handle(S, Restart("a"))
    assert of(actions, StartProcess) == [] and of(actions, SendSignal)[0].pid == 5
    (start,) = of(sup.handle(S + 1, Exited("a", 1, -15)), StartProcess)
    assert start.generation == 2 and sup.row("a").state == "starting"


def test_change_restarts_a_live_process_with_the_new_spec():
    sup = LocalSupervisor([spec()])
    sup.initial_actions()
    started(sup, 0)
    new = dataclasses.replace(spec(), command=("prog", "--v2"))
    assert sup.handle(1, Change(spec())) == []                  # same spec: nothing to do
    sup.handle(1, Change(new))
    assert sup.spec("a").command == ("prog",)                   # in force after the old one ends
    (start,) = of(sup.handle(2, Exited("a", 1, 0)), StartProcess)
    assert start.spec.command == ("prog", "--v2") and sup.spec("a") == new


def test_change_of_a_stopped_process_keeps_it_stopped():
    sup = LocalSupervisor([spec()])
    sup.initial_actions()
    started(sup, 0)
    sup.handle(1, Stop("a"))
    sup.handle(2, Exited("a", 1, -15))
    assert of(sup.handle(3, Change(spec(restart="always"))), StartProcess) == []
    assert sup.row("a").state == "stopped" and sup.spec("a").restart == "always"


def test_add_and_remove_at_run_time():
    sup = LocalSupervisor()
    assert sup.initial_actions() == [] and sup.table() == ()
    (start,) = of(sup.handle(0, Add(spec("b"))), StartProcess)
    assert start.name == "b"
    with pytest.raises(ValueError, match="already supervised"):
        sup.handle(0, Add(spec("b")))
    started(sup, 1, "b", pid=3)
    (sig,) = of(sup.handle(2, Remove("b")), SendSignal)
    assert sig.pid == 3 and sup.row("b").state == "stopping"
    with pytest.raises(KeyError):
        sup.handle(3, Start("b"))                               # being removed
    actions = sup.handle(3, Exited("b", 1, -15))
    assert sup.table() == () and of(actions, StartProcess) == [] and actions[-1] == TableChanged(())
    with pytest.raises(KeyError):
        sup.handle(4, Stop("b"))


def test_cluster_placed_processes_wait_to_be_started():
    dc = spec("dc", role="domain-controller")
    sup = LocalSupervisor([dc, spec("r", replicas=2)])
    assert of(sup.initial_actions(), StartProcess) == []
    assert [r.state for r in sup.table()] == ["stopped", "stopped"]
    assert sup.row("dc").role == "domain-controller"
    (start,) = of(sup.handle(0, Start("dc")), StartProcess)
    assert start.name == "dc"
    assert of(sup.handle(0, Add(spec("x", role="domain-controller"), start=True)), StartProcess)


def test_stale_events_of_an_old_generation_are_ignored():
    sup = LocalSupervisor([spec(restart="always")])
    sup.initial_actions()
    started(sup, 0)
    sup.handle(1, Exited("a", 1, 1))
    sup.tick(sup.row("a").retry_at)
    before = sup.table()
    assert sup.handle(S, Exited("a", 1, 1)) == [] and sup.handle(S, ProbeResult("a", 1, "failed")) == []
    assert sup.table() == before


# --------------------------------------------------------------------------- the core, by Hypothesis

NAMES = ("always", "onfail", "never", "probed")
GRACE = 1 * S


def _specs() -> list[ProcessSpec]:
    return [
        spec("always", restart="always"),
        spec("onfail", restart="on-failure"),
        spec("never", restart="never"),
        spec("probed", restart="on-failure", health=HealthCheck(kind="tcp", port=1, interval=0.5, failures=2)),
    ]


class SupervisorMachine(RuleBasedStateMachine):
    """The core against a model of the processes it drives."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 0
        self.sup = LocalSupervisor(_specs())
        self.next_pid = 1000
        self.live: dict[str, dict] = {}           # name -> {gen, pid|None, kill_due, killed}
        self.held: set[str] = set()               # stopped by command / policy: must not start by itself
        self.removing: set[str] = set()
        self.probing: dict[str, tuple[int, int]] = {}
        self.last_delay: dict[str, int] = {}
        self.retry_at: dict[str, int] = {}
        self.generation = {n: 0 for n in NAMES}
        self.apply(self.sup.initial_actions())

    # -------------------------------------------------------------- checking what the core does

    def apply(self, actions) -> None:
        for a in actions:
            if isinstance(a, StartProcess):
                assert a.name not in self.live, f"two live generations of {a.name}"
                assert a.name not in self.held, f"{a.name} started though it was stopped"
                assert a.generation == self.generation[a.name] + 1
                if a.name in self.retry_at:
                    assert self.now >= self.retry_at.pop(a.name), "restarted before its back-off ended"
                self.generation[a.name] = a.generation
                self.live[a.name] = {"gen": a.generation, "pid": None, "kill_due": None, "killed": False}
            elif isinstance(a, SendSignal):
                proc = self.live.get(a.name)
                assert proc is not None and proc["gen"] == a.generation and proc["pid"] == a.pid
                if a.signal == "SIGKILL":
                    assert proc["kill_due"] is not None and self.now >= proc["kill_due"]
                    proc["killed"] = True
                else:
                    assert proc["kill_due"] is None, "stop signal sent twice"
                    proc["kill_due"] = self.now + GRACE
            elif isinstance(a, RunProbe):
                assert a.name == "probed" and self.live[a.name]["gen"] == a.generation
                assert a.name not in self.probing
                self.probing[a.name] = (a.generation, self.now)
        for proc in self.live.values():
            if proc["kill_due"] is not None and self.now >= proc["kill_due"] and proc["pid"] is not None:
                assert proc["killed"], "no SIGKILL after the grace period"
        for row in self.sup.table():
            if row.state == "backoff" and row.name not in self.retry_at:
                delay = row.retry_at - row.since
                assert 100 * MS <= delay <= 800 * MS
                previous = self.last_delay.get(row.name)
                assert delay == 100 * MS or (previous is not None and delay == min(2 * previous, 800 * MS))
                self.last_delay[row.name] = delay
                self.retry_at[row.name] = row.retry_at

    def feed(self, event) -> None:
        self.apply(self.sup.handle(self.now, event))

    # -------------------------------------------------------------- the world

    @rule(dt=st.sampled_from([1, 50 * MS, 100 * MS, 300 * MS, 700 * MS, 2 * S]))
    def time_passes(self, dt):
        self.now += dt
        self.apply(self.sup.tick(self.now))

    @precondition(lambda self: self.sup.next_deadline() is not None)
    @rule()
    def until_the_next_deadline(self):
        self.now = max(self.now, self.sup.next_deadline())
        self.apply(self.sup.tick(self.now))

    @precondition(lambda self: any(p["pid"] is None for p in self.live.values()))
    @rule(data=st.data(), fail=st.booleans())
    def spawn_reported(self, data, fail):
        name = data.draw(st.sampled_from(sorted(n for n, p in self.live.items() if p["pid"] is None)))
        proc = self.live[name]
        if fail:
            del self.live[name]
            self.removing.discard(name)
            self.feed(StartFailed(name, proc["gen"], "ENOENT"))
        else:
            self.next_pid += 1
            proc["pid"] = self.next_pid
            self.feed(Started(name, proc["gen"], self.next_pid))

    @precondition(lambda self: any(p["pid"] is not None for p in self.live.values()))
    @rule(data=st.data(), status=st.sampled_from([0, 1, 2, -9, -15]))
    def process_ends(self, data, status):
        """A process ends: by itself, or because of a signal it was sent (a hung one only by SIGKILL)."""
        name = data.draw(st.sampled_from(sorted(n for n, p in self.live.items() if p["pid"] is not None)))
        proc = self.live.pop(name)
        self.probing.pop(name, None)
        self.removing.discard(name)
        stopping = proc["kill_due"] is not None
        self.feed(Exited(name, proc["gen"], status))
        if name not in {r.name for r in self.sup.table()}:
            return
        if stopping:
            return
        spec = self.sup.spec(name)
        failure = status != 0
        if spec.restart == "never" or (spec.restart == "on-failure" and not failure):
            assert self.sup.row(name).state in ("stopped", "failed")
            self.held.add(name)
        else:
            assert self.sup.row(name).state == "backoff"

    @precondition(lambda self: "probed" in self.probing)
    @rule(outcome=st.sampled_from(["ok", "failed", "timeout"]), dt=st.sampled_from([0, 100 * MS]))
    def probe_answers(self, outcome, dt):
        gen, _ = self.probing.pop("probed")
        self.now += dt
        self.feed(ProbeResult("probed", gen, outcome))

    # -------------------------------------------------------------- commands

    @rule(name=st.sampled_from(NAMES))
    def stop(self, name):
        if name not in self.sup.names:
            return
        self.held.add(name)
        self.feed(Stop(name))
        self.retry_at.pop(name, None)

    @rule(name=st.sampled_from(NAMES), restart=st.booleans())
    def start(self, name, restart):
        if name not in self.sup.names:
            return
        if name in self.removing:
            with pytest.raises(KeyError):
                self.sup.handle(self.now, Restart(name) if restart else Start(name))
            return
        self.held.discard(name)
        self.retry_at.pop(name, None)
        if restart or name not in self.live:             # a start of a live process changes nothing
            self.last_delay.pop(name, None)
        self.feed(Restart(name) if restart else Start(name))

    @rule(name=st.sampled_from(NAMES), policy=st.sampled_from(["always", "on-failure", "never"]))
    def change(self, name, policy):
        if name not in self.sup.names:
            return
        if name in self.removing:
            with pytest.raises(KeyError):
                self.sup.handle(self.now, Change(dataclasses.replace(self.sup.spec(name), restart=policy)))
            return
        new = dataclasses.replace(self.sup.spec(name), restart=policy)
        if self.sup.row(name).state == "backoff":
            self.retry_at.pop(name, None)                # a change starts a backing-off process at once
            self.last_delay.pop(name, None)
        self.feed(Change(new))

    @rule(name=st.sampled_from(NAMES))
    def remove_then_add(self, name):
        if name not in self.sup.names:
            spec_ = {s.name: s for s in _specs()}[name]
            self.held.discard(name)
            self.retry_at.pop(name, None)
            self.last_delay.pop(name, None)
            self.generation[name] = 0
            self.feed(Add(spec_))
        else:
            if name in self.live:
                self.removing.add(name)
            self.feed(Remove(name))

    # -------------------------------------------------------------- invariants

    @invariant()
    def the_table_agrees_with_the_world(self):
        assert self.sup.live() == {n: p["gen"] for n, p in self.live.items()}
        for row in self.sup.table():
            alive = row.name in self.live
            assert (row.state in ("starting", "running", "unhealthy", "stopping")) == alive, row
            if row.name in self.held and not alive:
                assert row.state in ("stopped", "failed"), row


SupervisorMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
TestSupervisorCore = SupervisorMachine.TestCase


def test_a_node_file_keeps_its_provisioning_table_for_the_agent_with_variables_substituted() -> None:
    text = '[provisioning]\nstate_dir = "${BASE}/n1"\n[provisioning.sync.default]\nbundles = { mode = "node" }\n'
    node = parse_node(text, source="n1.toml", environ={"BASE": "/srv"})
    assert node.provisioning == {"state_dir": "/srv/n1", "sync": {"default": {"bundles": {"mode": "node"}}}}
    assert parse_node('node = "n1"\n').provisioning is None
    with pytest.raises(ConfigError, match="provisioning"):
        parse_node('provisioning = 3\n', source="n1.toml")
    with pytest.raises(ConfigError, match="provisionning"):
        parse_node('[provisionning]\n', source="n1.toml")
