"""A member's counters in the Prometheus text format, over HTTP on a loopback port."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import time
import uuid

import httpx
import pytest
import trio

from groupcomm.io.channel import open_channel
from groupcomm.io.metrics import prometheus_text, serve_metrics

SAMPLE = re.compile(r'^(groupcomm_[a-z0-9_]+)\{([^}]*)\} (-?[0-9.e+]+)$')


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse(text: str) -> dict[str, tuple[str, float]]:
    """name -> (type, value) of an exposition text; every line must be a TYPE line or a sample."""
    types, values = {}, {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            types[name] = kind
        else:
            match = SAMPLE.match(line)
            assert match, f"not a Prometheus sample: {line!r}"
            values[match.group(1)] = float(match.group(3))
    assert set(types) == set(values)
    return {name: (types[name], values[name]) for name in values}


def test_counters_and_gauges_are_rendered_with_escaped_labels():
    text = prometheus_text({"retransmissions": 3, "pending_bytes": 10, "odd-name": 1, "bad": float("nan")},
                           {"member": 'n"1', "cluster": "a\\b"})
    assert 'groupcomm_retransmissions_total{cluster="a\\\\b",member="n\\"1"} 3' in text
    parsed = parse(text)
    assert parsed["groupcomm_retransmissions_total"] == ("counter", 3)
    assert parsed["groupcomm_pending_bytes"] == ("gauge", 10)
    assert parsed["groupcomm_odd_name_total"] == ("counter", 1)
    assert "groupcomm_bad_total" not in parsed                    # not a finite number: left out


async def test_a_member_serves_its_counters_and_view_on_a_loopback_port():
    name = f"met-{uuid.uuid4().hex[:8]}"
    async with open_channel("loopback", cluster=name, name="n1",
                            overrides={"UDP": {"mcast_port": free_udp_port()}}) as channel:
        with trio.fail_after(20):
            while channel.view is None:
                await trio.sleep(0.02)
            await channel.send(b"hello")
            async with trio.open_nursery() as nursery:
                port = await nursery.start(serve_metrics, channel, ("127.0.0.1", 0))
                async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
                    answer = await http.get("/metrics")
                    assert answer.status_code == 200
                    assert answer.headers["content-type"].startswith("text/plain; version=0.0.4")
                    metrics = parse(answer.text)
                    assert metrics["groupcomm_view_members"] == ("gauge", 1)
                    assert metrics["groupcomm_view_primary"] == ("gauge", 1)
                    assert metrics["groupcomm_messages_sent_total"][1] >= 1
                    assert 'member="n1"' in answer.text and f'cluster="{name}"' in answer.text
                    assert (await http.get("/")).status_code == 404
                    assert (await http.post("/metrics")).status_code == 405
                with trio.socket.socket() as raw:                 # a hostile client: an endless head
                    await raw.connect(("127.0.0.1", port))
                    await raw.send(b"GET /metrics HTTP/1.0\r\n" + b"X: " + b"a" * 10000)
                    reply = await raw.recv(100)
                    assert reply.startswith(b"HTTP/1.0 400")
                nursery.cancel_scope.cancel()


async def test_a_non_loopback_address_needs_allow_remote():
    with pytest.raises(ValueError, match="not a loopback address"):
        await serve_metrics(object(), ("0.0.0.0", 0))


def test_groupcomm_node_serves_its_metrics_where_told():
    cluster = f"met-{uuid.uuid4().hex[:8]}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "groupcomm", "node", "--stack", "loopback", "--cluster", cluster, "--name", "n1",
         "--mcast-port", str(free_udp_port()), "--metrics", "127.0.0.1:0", "--json", "--no-stdin"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        url = None
        deadline = time.monotonic() + 30
        while url is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            url = json.loads(line).get("metrics")
        assert url is not None and url.startswith("http://127.0.0.1:")
        text = httpx.get(url, timeout=5).text
        assert 'groupcomm_packets_sent_total{cluster="' + cluster + '",member="n1"}' in text
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stdout.close()


def test_a_metrics_address_that_is_not_loopback_is_one_line_and_exit_status_2():
    done = subprocess.run([sys.executable, "-m", "groupcomm", "node", "--stack", "loopback", "--cluster", "x",
                           "--name", "n1", "--metrics", "192.0.2.1:9464"],
                          check=False, capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "--metrics '192.0.2.1:9464' is not a loopback address" in done.stderr
