"""Supervisor timings with real processes on loopback: DC fail-over, graceful hand-over, child restart.

    python benchmarks/supervisor.py [--runs 5] [--only loopback|udp|child] [--json]

* **DC fail-over**: three ``groupcomm supervise`` processes (``[cluster] members``,
  one ``role = "domain-controller"`` process); ``kill -9`` of the supervisor
  hosting the DC -> the new DC program's own start record (``time.monotonic()``
  in the program, against the kill's).  Also when the old program was seen gone.
* **Graceful hand-over**: SIGTERM of the hosting supervisor -> the new DC
  program running (from the signal, and from the old program's own stop record).
* **Child restart**: ``kill -9`` of a supervised child (no cluster, ``restart =
  "always"``, back-off initial 100 ms) -> its new instance running.

On the loopback stack (token 0.3 s) and on the default ``udp`` stack (token 1 s)
with multicast TTL 0; every member seals with a fresh cluster key and keeps its
state in a temporary directory.  Each fail-over run starts a fresh cluster.
The derived timers (``Fencing.derive``, as each supervisor computes them) are
printed next to the figures:  fencing_delay = token_timeout + liveness_check +
lease + kill_allowance.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from workers import free_port

from groupcomm.config.loader import load_stack
from groupcomm.config.registry import build_stack
from groupcomm.services.supervisor.cluster import Fencing
from groupcomm.services.supervisor.spec import ClusterSettings

STACKS = {
    "loopback": ["--stack", "loopback"],
    "udp": ["--stack", "udp", "--ttl", "0"],
}
NODES = ("n1", "n2", "n3")
BACKOFF = {"initial": "100ms", "max": "1s", "reset_after": "1s"}
WAIT = 60.0        # seconds any one wait may take

PROGRAM = """\
import os, signal, sys, time
def note(kind):
    fd = os.open(sys.argv[1], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(fd, ("%s %s %d %.6f\\n" % (kind, os.environ["GROUPCOMM_NODE"], os.getpid(), time.monotonic())).encode())
    os.close(fd)
def stop(*_):
    note("stop")
    os._exit(0)
signal.signal(signal.SIGTERM, stop)
note("start")
while True:
    time.sleep(60)
"""


def timers(stack: str) -> Fencing:
    """The fencing timers a supervisor derives on ``stack`` (default [cluster] settings)."""
    ring = build_stack(load_stack(stack)).ring
    return Fencing.derive(ClusterSettings(), ring.token_timeout, ring.consensus_timeout)


def records(events: Path, kind: str) -> list[tuple[str, int, float]]:
    """(node, pid, time) of every ``kind`` record."""
    if not events.exists():
        return []
    out = []
    for line in events.read_text().splitlines():
        k, node, pid, at = line.split()
        if k == kind:
            out.append((node, int(pid), float(at)))
    return out


def wait_for(predicate: Callable[[], object], what: str) -> object:
    deadline = time.monotonic() + WAIT
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.005)
    return value


def gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


class Supervisors:
    """``groupcomm supervise`` processes writing into one folder; each stopped by its pid on exit."""

    def __init__(self, folder: Path, env: dict[str, str]) -> None:
        self.folder = folder
        self.env = env
        self.events = folder / "events"
        folder.mkdir(parents=True)
        (folder / "program.py").write_text(PROGRAM)
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, node: str, process: str, args: list[str]) -> None:
        command = [sys.executable, str(self.folder / "program.py"), str(self.events)]
        (self.folder / node).mkdir()
        (self.folder / node / "node.toml").write_text(f'node = "{node}"\n\n{process}'
                                                      f'command = {json.dumps(command)}\nstop_grace = "2s"\n')
        self.procs[node] = subprocess.Popen(
            [sys.executable, "-P", "-m", "groupcomm", "supervise", str(self.folder / node / "node.toml"), *args],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=(self.folder / node / "stderr").open("w"),
            env=self.env, start_new_session=True,
        )

    def close(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs.values():
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


@contextlib.contextmanager
def dc_cluster(folder: Path, env: dict[str, str], extra: list[str]) -> Iterator[Supervisors]:
    """Three supervisors with a domain controller, the first DC program running."""
    cluster, port = f"bench-dc-{uuid.uuid4().hex[:8]}", free_port()
    process = (f'[cluster]\nmembers = {json.dumps(list(NODES))}\n\n'
               '[[process]]\nname = "dc"\nrole = "domain-controller"\n')
    sups = Supervisors(folder, env)
    try:
        for node in NODES:
            sups.start(node, process, ["--cluster", cluster, "--mcast-port", str(port), *extra])
        wait_for(lambda: records(sups.events, "start"), "the first domain controller")
        time.sleep(1.0)
        yield sups
    finally:
        sups.close()


def dc_failover(folder: Path, env: dict[str, str], extra: list[str]) -> dict[str, float]:
    with dc_cluster(folder, env, extra) as sups:
        ((node, pid, _),) = records(sups.events, "start")
        t0 = time.monotonic()
        sups.procs[node].send_signal(signal.SIGKILL)
        old_gone = wait_for(lambda: gone(pid) and time.monotonic(), "the old program gone")
        new = wait_for(lambda: records(sups.events, "start")[1:], "the new domain controller")
        return {"failover_s": new[0][2] - t0, "old_gone_s": old_gone - t0}


def dc_handover(folder: Path, env: dict[str, str], extra: list[str]) -> dict[str, float]:
    with dc_cluster(folder, env, extra) as sups:
        ((node, _, _),) = records(sups.events, "start")
        t0 = time.monotonic()
        sups.procs[node].send_signal(signal.SIGTERM)
        new = wait_for(lambda: records(sups.events, "start")[1:], "the new domain controller")
        ((_, _, stopped),) = records(sups.events, "stop")
        return {"handover_s": new[0][2] - t0, "old_stop_to_new_start_s": new[0][2] - stopped}


def child_restarts(folder: Path, env: dict[str, str], runs: int, progress: Callable[[], None]) -> list[float]:
    backoff = ", ".join(f'{k} = "{v}"' for k, v in BACKOFF.items())
    sups = Supervisors(folder, env)
    took = []
    try:
        sups.start("n1", f'[[process]]\nname = "child"\nrestart = "always"\nbackoff = {{ {backoff} }}\n', [])
        for k in range(runs):
            (_, pid, _) = wait_for(lambda k=k: records(sups.events, "start")[k:], "the child")[0]
            time.sleep(float(BACKOFF["reset_after"].rstrip("s")) + 0.5)     # back at the initial back-off
            t0 = time.monotonic()
            os.kill(pid, signal.SIGKILL)
            (_, _, at) = wait_for(lambda k=k: records(sups.events, "start")[k + 1:], "the restarted child")[0]
            took.append(at - t0)
            progress()
    finally:
        sups.close()
    return took


def summary(values: list[float]) -> dict[str, float]:
    return {"median_s": round(statistics.median(values), 3), "max_s": round(max(values), 3)}


@contextlib.contextmanager
def progress_bar(total: int) -> Iterator[Callable[[str], None]]:
    """``step(label)`` after each run: a rich progress bar if rich is installed, else a line on stderr."""
    try:
        from rich.progress import Progress
    except ImportError:
        done = 0

        def step(label: str) -> None:
            nonlocal done
            done += 1
            print(f"[{done}/{total}] {label}", file=sys.stderr, flush=True)

        yield step
        return
    with Progress(transient=True) as bar:
        task = bar.add_task("supervisor runs", total=total)
        yield lambda label: bar.update(task, advance=1, description=label)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--only", default="", help="run only the parts whose name contains this "
                                                   "(loopback, udp, child)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    from groupcomm.config.keys import new_key_file, write_key_file

    tmp = tempfile.TemporaryDirectory(prefix="groupcomm-bench-supervisor-")
    root = Path(tmp.name)
    (root / "state").mkdir()
    write_key_file(root / "cluster.key", new_key_file())
    env = {**os.environ, "GROUPCOMM_KEY_FILE": str(root / "cluster.key"),
           "GROUPCOMM_STATE_DIR": str(root / "state"), "XDG_STATE_HOME": str(root / "state")}
    stacks = {name: extra for name, extra in STACKS.items() if args.only in name}
    child = args.only in ("", "child")
    total = 2 * args.runs * len(stacks) + (args.runs if child else 0)
    results: dict[str, dict] = {}
    lines: list[str] = []
    runs = itertools.count()
    with progress_bar(total) as step:
        for name, extra in stacks.items():
            f = timers(name)
            failovers, handovers = [], []
            for _ in range(args.runs):
                failovers.append(dc_failover(root / f"run{next(runs)}", env, extra))
                step(f"{name}: kill -9 fail-over")
            for _ in range(args.runs):
                handovers.append(dc_handover(root / f"run{next(runs)}", env, extra))
                step(f"{name}: graceful hand-over")
            r = results[f"{name} stack"] = {
                "token_timeout_s": f.token_timeout, "liveness_check_s": f.liveness_check,
                "lease_s": round(f.lease, 3), "kill_allowance_s": f.kill_allowance,
                "fencing_delay_s": round(f.fencing_delay, 3),
                "dc_failover": summary([x["failover_s"] for x in failovers]),
                "old_dc_gone": summary([x["old_gone_s"] for x in failovers]),
                "graceful_handover": summary([x["handover_s"] for x in handovers]),
                "old_stop_to_new_start": summary([x["old_stop_to_new_start_s"] for x in handovers]),
                "runs": args.runs,
            }
            lines += [
                (f"{name} stack: token_timeout {f.token_timeout:g} s, liveness_check {f.liveness_check:g} s, "
                f"lease {f.lease:.3g} s, kill_allowance {f.kill_allowance:g} s -> fencing_delay "
                f"{f.fencing_delay:.4g} s (token_timeout + liveness_check + lease + kill_allowance)"),
                (f"  DC fail-over, kill -9 of its supervisor -> new DC program running: "
                f"median {r['dc_failover']['median_s']} s, max {r['dc_failover']['max_s']} s over {args.runs} runs "
                f"(old DC program gone after median {r['old_dc_gone']['median_s']} s)"),
                (f"  graceful hand-over, SIGTERM of its supervisor -> new DC program running: "
                f"median {r['graceful_handover']['median_s']} s, max {r['graceful_handover']['max_s']} s "
                f"(old program's stop -> new start: median {r['old_stop_to_new_start']['median_s']} s, "
                f"max {r['old_stop_to_new_start']['max_s']} s)"),
            ]
        if child:
            took = child_restarts(root / "child", env, args.runs, lambda: step("child restart"))
            r = results["child restart"] = {**summary(took), "backoff": BACKOFF, "runs": args.runs}
            lines.append(f"child restart, kill -9 of a supervised child -> new instance running: median "
                         f"{r['median_s']} s, max {r['max_s']} s over {args.runs} runs "
                         f"(back-off initial {BACKOFF['initial']}, restart = \"always\")")
    print("\n".join(lines))
    if args.json:
        print(json.dumps(results))


if __name__ == "__main__":
    main()
