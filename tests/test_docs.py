"""The documentation builds, its references are complete, and its examples run.

* Sphinx builds the docs with warnings as errors (what a docs CI job would do).
* Every setting of every registered layer has a docstring and appears in the
  generated configuration reference.
* The tutorial's examples (docs/examples/) run: the simulator tests, and the
  loopback scripts as real processes, bounded in time.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from groupcomm.config import LAYERS, layer_settings
from groupcomm.config.reference import attribute_docstrings, reference_rst

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
EXAMPLES = DOCS / "examples"


def test_sphinx_builds_the_docs_without_a_warning(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html", str(DOCS), str(tmp_path / "html")],
        capture_output=True, text=True, timeout=300, cwd=ROOT, check=False,
    )
    assert out.returncode == 0, out.stderr[-5000:]
    assert (tmp_path / "html" / "configuration.html").exists()


# --------------------------------------------------------------------------- configuration reference


def _init_fields(name: str) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(layer_settings(name)) if f.init]


@pytest.mark.parametrize("layer", list(LAYERS))
def test_every_setting_of_every_layer_has_a_meaning(layer):
    docs = attribute_docstrings(layer_settings(layer))
    missing = [f.name for f in _init_fields(layer) if not docs.get(f.name, "").strip()]
    assert not missing, f"{layer}: settings without a docstring: {missing}"


@pytest.mark.parametrize("layer", list(LAYERS))
def test_a_derived_default_says_how_it_is_derived(layer):
    docs = attribute_docstrings(layer_settings(layer))
    vague = [f.name for f in _init_fields(layer) if f.default is None and "(default ``" not in docs.get(f.name, "")]
    assert not vague, f"{layer}: default None but no '(default ``...``)' in the docstring: {vague}"


def test_the_reference_lists_every_setting_of_every_layer_under_its_layer():
    text = reference_rst()
    titles = list(LAYERS)
    for i, layer in enumerate(titles):
        start = text.index(f"\n{layer}\n" if i else f"{layer}\n")
        end = text.find(f"\n{titles[i + 1]}\n", start) if i + 1 < len(titles) else len(text)
        section = text[start:end]
        for field in _init_fields(layer):
            assert re.search(rf"^   \* - ``{field.name}``$", section, re.MULTILINE), f"{layer}.{field.name} not in the reference"


def test_the_reference_gives_units_and_stack_file_defaults():
    text = reference_rst()
    row = re.search(r"   \* - ``token_timeout``\n     - (.*)\n     - (.*)\n     - (.*)\n", text)
    assert row and row.groups() == ("duration", '``"1s"``', "seconds"), row and row.groups()
    assert 'derived: ``token_timeout / 4.2``' in text
    assert '``"64MiB"``' in text and "one of ``\"auto\"``, ``\"c\"``, ``\"trio\"``" in text


# --------------------------------------------------------------------------- tutorial: simulator


@pytest.fixture
def examples(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    yield lambda name: importlib.import_module(name)
    for name in ("counter", "test_counter_sim"):
        sys.modules.pop(name, None)


def test_the_tutorial_simulator_examples_pass(examples):
    sim_example = examples("test_counter_sim")
    tests = [getattr(sim_example, name) for name in dir(sim_example) if name.startswith("test_")]
    assert len(tests) == 3
    for test in tests:
        test()                  # the Hypothesis one runs its examples under the active profile


# --------------------------------------------------------------------------- tutorial: real processes


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Script:
    """One example process on the loopback stack, output to a file, killed by its PID at the end."""

    def __init__(self, tmp: Path, script: str, name: str, cluster: str, port: int, *args: str) -> None:
        self.name = name
        self.log = tmp / f"{name}.log"
        env = {**os.environ, "GROUPCOMM_MCAST_PORT": str(port), "PYTHONUNBUFFERED": "1"}
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, str(EXAMPLES / script), "--name", name, "--cluster", cluster, *args],
                stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
            )

    def output(self) -> str:
        return self.log.read_text()

    def wait_for(self, text: str, deadline: float) -> None:
        while text not in self.output():
            assert self.proc.poll() is None or text in self.output(), f"{self.name} exited:\n{self.output()}"
            assert time.monotonic() < deadline, f"{self.name}: no {text!r} in time:\n{self.output()}"
            time.sleep(0.05)

    def finish(self, deadline: float) -> str:
        try:
            self.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pytest.fail(f"{self.name} did not finish in time:\n{self.output()}")
        assert self.proc.returncode == 0, f"{self.name} failed:\n{self.output()}"
        return self.output()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)


def test_the_tutorial_channel_counter_runs_as_three_processes(tmp_path):
    cluster, port = f"tutorial-{uuid.uuid4().hex[:8]}", _free_port()
    members = [Script(tmp_path, "counter_channel.py", name, cluster, port) for name in "abc"]
    try:
        deadline = time.monotonic() + 60
        for m in members:
            assert last_value(m.finish(deadline), m.name) == f"{m.name}: value 30"
    finally:
        for m in members:
            m.kill()


def last_value(output: str, name: str) -> str:
    """The last counter value a member printed (a view line may follow it: the others leave
    as they finish, and the member prints that view before it leaves too)."""
    return [line for line in output.splitlines() if line.startswith(f"{name}: value")][-1]


def test_the_tutorial_space_counter_hands_the_state_to_a_late_joiner(tmp_path):
    cluster, port = f"tutorial-{uuid.uuid4().hex[:8]}", _free_port()
    members = [Script(tmp_path, "counter_space.py", name, cluster, port, "--members", "2") for name in "ab"]
    try:
        deadline = time.monotonic() + 60
        for m in members:
            m.wait_for(f"{m.name}: value 20", deadline)
        late = Script(tmp_path, "counter_space.py", "c", cluster, port, "--members", "3")
        members.append(late)
        for m in members:
            lines = m.finish(deadline).splitlines()
            assert last_value("\n".join(lines), m.name) == f"{m.name}: value 30", lines
        assert "c: state received: 20" in late.output()
        values = [line for line in late.output().splitlines() if line.startswith("c: value")]
        assert values == [f"c: value {v}" for v in range(21, 31)]     # every increment after the join, once
    finally:
        for m in members:
            m.kill()
