"""``groupcomm sessions-node`` / ``sessions-demo``: argument checks, and one real node process over HTTP.

The usage errors run :func:`groupcomm.cli.main` in process (one line on stderr,
exit status 2); the node test starts a real ``python -P -m groupcomm
sessions-node`` on the loopback stack serving on a loopback port, talks to it
with httpx, and stops it with SIGTERM (graceful: exit status 0); the demo runs
with ``--serve`` and is stopped with SIGTERM: every node it started is gone.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest

import groupcomm
from groupcomm.cli import main
from groupcomm.cli.demo import free_udp_port
from groupcomm.cli.errors import UsageError
from groupcomm.cli.sessions import HttpAddress, parse_http_address, parse_tags
from groupcomm.cli.sessions_demo import SessionNodeProcess

PACKAGE_ROOT = str(Path(groupcomm.__file__).resolve().parent.parent)
NODE = ["sessions-node", "--cluster", "c", "--stack", "loopback", "--name", "n1"]


@pytest.mark.parametrize(("argv", "words"), [
    ([*NODE, "--http", "10.1.2.3:8000"], ["not a loopback address", "--allow-remote"]),
    ([*NODE, "--http", "127.0.0.1"], ["HOST:PORT"]),
    ([*NODE, "--http", "127.0.0.1:70000"], ["0..65535"]),
    ([*NODE, "--http", "example.org:80"], ["IP address"]),
    (["sessions-node", "--cluster", "c", "--http", "127.0.0.1:0"], ["--name"]),
    ([*NODE, "--http", "127.0.0.1:0", "--backups", "-1"], ["--backups"]),
    ([*NODE, "--http", "127.0.0.1:0", "--tag", "host"], ["KEY=VALUE"]),
    ([*NODE, "--http", "127.0.0.1:0", "--tag", "host=a", "--tag", "host=b"], ["given twice"]),
    ([*NODE, "--http", "127.0.0.1:0", "--ttl", "0", "--stack", "udpu"], ["multicast"]),
    ([*NODE, "--http", "127.0.0.1:0", "--app-name", "a/b"], ["application name"]),
    (["sessions-demo", "--nodes", "2"], ["--nodes"]),
    (["sessions-demo", "--nodes", "3", "--backups", "3"], ["--backups"]),
    (["sessions-demo", "--base-port", "80"], ["--base-port"]),
    (["sessions-demo", "--increments", "0"], ["--increments"]),
])
def test_usage_errors_exit_2_with_one_line(argv, words, capsys):
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("groupcomm: error: "), captured.err
    for word in words:
        assert word in lines[0]
    assert captured.out == ""


def test_http_addresses():
    assert parse_http_address("127.0.0.1:8001") == HttpAddress("127.0.0.1", 8001)
    assert parse_http_address("localhost:0") == HttpAddress("127.0.0.1", 0)
    assert parse_http_address("[::1]:8001").bind() == "[::1]:8001"
    assert parse_http_address("192.0.2.1:80", allow_remote=True).bind() == "192.0.2.1:80"
    with pytest.raises(UsageError):
        parse_http_address("[::]:80")


def test_tags():
    assert parse_tags(["host=h1", "rack=r-2"]) == {"host": "h1", "rack": "r-2"}
    for bad in ("=x", "host=", "1host=a", "host=" + "x" * 65):
        with pytest.raises(UsageError):
            parse_tags([bad])


def test_a_node_process_serves_the_demo_app_and_stops_gracefully_on_sigterm(tmp_path):
    cluster = f"sessions-cli-{uuid.uuid4().hex[:8]}"
    argv = ["--cluster", cluster, "--stack", "loopback", "--mcast-port", str(free_udp_port()),
            "--http", "127.0.0.1:0", "--backups", "0"]
    node = SessionNodeProcess("n1", argv, {"GROUPCOMM_STATE_DIR": os.environ["GROUPCOMM_STATE_DIR"]},
                              str(tmp_path / "n1.log"))
    try:
        url = node.wait_serving(time.monotonic() + 30)
        assert url.startswith("http://127.0.0.1:")
        with httpx.Client(base_url=url, timeout=10) as http:
            assert (http.get("/healthz").status_code, http.get("/healthz").text) == (200, "ok\n")
            first = http.post("/incr", headers={"x-request-id": "r1"})
            assert first.json() == {"node": "n1", "counter": 1, "applied": True}
            assert first.cookies["GCSESSION"].endswith(".n1")              # the routing hint names the node
            assert http.post("/incr", headers={"x-request-id": "r1"}).json()["applied"] is False
            assert http.post("/incr", headers={"x-request-id": "r2"}).json()["counter"] == 2
            assert http.get("/").json()["counter"] == 2
        assert node.stop(timeout=20) == 0
        stats = node.final_stats()
        assert stats is not None and stats["evacuated"] == 0          # alone: nobody to hand its session to
        log = (tmp_path / "n1.log").read_text()
        assert "Traceback" not in log and "error" not in log.lower(), log
    finally:
        node.stop(timeout=5)


def test_the_demo_serves_until_sigterm_then_stops_every_node_it_started():
    demo = subprocess.Popen([sys.executable, "-P", "-m", "groupcomm", "sessions-demo", "--serve"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONPATH": PACKAGE_ROOT},
                            start_new_session=True)          # its own process group: the finally reaches its nodes
    try:
        assert demo.stdout is not None
        lines = []
        for line in demo.stdout:
            lines.append(line)
            if "serving until" in line:
                break
        urls = re.findall(r"http://127\.0\.0\.1:\d+", "".join(lines))
        assert len(urls) == 3, lines
        assert all(httpx.get(f"{url}/healthz", timeout=5).status_code == 200 for url in urls)
        demo.send_signal(signal.SIGTERM)
        assert demo.wait(timeout=60) == 0
        for url in urls:
            with pytest.raises(httpx.ConnectError):
                httpx.get(f"{url}/healthz", timeout=5)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(demo.pid, signal.SIGKILL)             # the group this test made: the demo and its nodes
        demo.wait(timeout=10)
