"""The fuzz targets of ``tests/fuzz`` in CI: the seed corpus as a regression suite, and a short fuzz pass.

* Every file of ``tests/fuzz/corpus/<target>`` is replayed through its target in
  process: an input that once crashed a target is committed there and stays a
  regression test.
* The seeds are valid traffic of today's wire format (a stale corpus fuzzes
  nothing but the first length check): regenerate with
  ``python -m tests.fuzz.make_corpus``.
* Each target runs under atheris for a bounded number of executions from its
  corpus, with a fixed seed (deterministic), in a subprocess with a timeout;
  a crash, a per-input timeout or running out of the memory limit fails.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from groupcomm.core.ring import Ring
from groupcomm.io import probe as probe_io
from groupcomm.io.udp import UdpConfig
from groupcomm.layers import wire
from groupcomm.layers.fd import FailureDetector
from groupcomm.layers.unicast import Unicast
from tests.fuzz import targets
from tests.fuzz.run import CORPUS, inputs

ROOT = Path(__file__).resolve().parent.parent

RUNS = {
    "ring": 2000, "wire-ring": 3000, "wire-unicast": 3000, "fd": 3000, "unicast": 2000,
    "frag": 2000, "spaces": 1500, "probe": 1500, "ring-operational": 80, "member": 50, "sessions": 1500,
}
"""Executions per target in CI (seeds included): about 60 s for all on two busy cores.
The stateful targets rebuild a cluster for every input, hence fewer runs."""


def seeds(target: str) -> list[bytes]:
    return [p.read_bytes() for p in inputs([str(CORPUS / target)])]


def test_every_target_has_seeds_and_a_ci_budget():
    assert set(RUNS) == set(targets.TARGETS)
    for target in targets.TARGETS:
        assert 1 <= len(seeds(target)) <= 60, target
    assert sum(len(seeds(t)) for t in targets.TARGETS) <= 400


@pytest.mark.parametrize("target", sorted(targets.TARGETS))
def test_corpus_replays_without_an_exception(target):
    one = targets.TARGETS[target]()
    for data in seeds(target):
        one(data)


def test_seeds_are_valid_traffic_of_this_wire_format():
    for data in seeds("wire-ring"):
        wire.decode_ring(data)
    for data in seeds("wire-unicast"):
        wire.decode_unicast(data)
    detector = FailureDetector(targets.ME, targets.CLUSTER, targets.SETTINGS.fd)
    detector.set_members(targets.PEERS, 0)
    for data in seeds("fd"):
        detector.receive(data, 0)
    assert not detector.drops, detector.drops
    taken = 0
    for data in seeds("unicast"):
        layer = Unicast(targets.ME, targets.CLUSTER, epoch=targets.EPOCH)
        layer.set_members(targets.PEERS, 0)
        layer.receive(0, data)
        taken += layer.received
    assert taken >= len(seeds("unicast")) // 3, taken
    used = 0
    for data in seeds("ring-operational"):
        used += targets.ring_cluster().nodes[targets.ME].obj.receive(0, data) == 0
    assert used >= len(seeds("ring-operational")) // 2, used
    codes = []
    for data in seeds("ring"):
        ring = Ring(4, targets.SETTINGS.ring)          # gathering, as in the target
        ring.start(0)
        codes.append(ring.receive(1, data))
    assert codes.count(0) >= len(codes) // 4, codes
    for data in seeds("spaces"):
        assert not data[0] & 0x80 or type(wire.decode_unicast(data[1:])) is wire.StateChunkFrame


@pytest.mark.parametrize("target", sorted(targets.TARGETS))
def test_bounded_fuzz_pass_finds_no_crash(target, tmp_path):
    runs = RUNS[target]
    found = tmp_path / "found"
    found.mkdir()
    command = [
        sys.executable, "-m", "tests.fuzz", target, str(found), str(CORPUS / target),
        f"-runs={runs}", "-seed=1", f"-artifact_prefix={tmp_path}/", "-timeout=20", "-rss_limit_mb=1536",
    ]
    out = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    artifacts = sorted(p.name for p in tmp_path.iterdir() if p.is_file())
    assert out.returncode == 0 and not artifacts, (artifacts, out.stdout[-3000:], out.stderr[-6000:])
    done = re.search(r"^Done (\d+) runs", out.stderr, re.MULTILINE)
    assert done and int(done.group(1)) >= runs, out.stderr[-3000:]


class _OneAnswer:
    """Sockets for :func:`probe` that receive ``answer`` once, then time out."""

    def __init__(self, answer: bytes) -> None:
        self.unicast, self.group, self._answer = self, ("239.255.0.1", 9), [answer]

    def sendto(self, data, addr):
        return len(data)

    def setblocking(self, flag):
        pass

    def settimeout(self, value):
        pass

    def recvfrom(self, size):
        if not self._answer:
            raise TimeoutError
        return self._answer.pop(), ("127.0.0.1", 9)

    def close(self):
        pass


def test_probe_ignores_answers_of_another_shape(monkeypatch):
    """Found by the ``probe`` target (F1): fields of other types made ``groupcomm probe`` raise
    when it printed them; now an answer that does not fit the report's schema is ignored."""
    odd = probe_io.probe_response(targets.CLUSTER, {"address": 7, "stats": [1], "view": 3, "name": b"\xff"})
    good = probe_io.probe_response(targets.CLUSTER, {"address": 8, "name": "m", "stats": {"x": 1}})
    monkeypatch.setattr(probe_io, "open_sockets", lambda config: _OneAnswer(odd))
    assert probe_io.probe(targets.CLUSTER, UdpConfig(), timeout=5.0) == []
    monkeypatch.setattr(probe_io, "open_sockets", lambda config: _OneAnswer(good))
    reports = probe_io.probe(targets.CLUSTER, UdpConfig(), timeout=5.0)
    assert [(r["address"], r["name"]) for r in reports] == [(8, "m")]
    probe_io.format_table(reports)
    json.dumps(reports)


def test_probe_keeps_integer_addresses_only(monkeypatch):
    """An answer whose ``address`` is msgpack ``true`` is no member's answer (found by the ``probe`` target)."""
    answer = probe_io.probe_response(targets.CLUSTER, {"address": True, "stats": {}})
    monkeypatch.setattr(probe_io, "open_sockets", lambda config: _OneAnswer(answer))
    assert probe_io.probe(targets.CLUSTER, UdpConfig(), timeout=5.0) == []
