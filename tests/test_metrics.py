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
from groupcomm.layers.histogram import Histogram
from groupcomm.layers.multicast import LATENCY_SAMPLE_EVERY

SAMPLE = re.compile(r'^(groupcomm_[a-z0-9_]+)\{([^}]*)\} (-?[0-9.e+-]+)$')
HISTOGRAM_SAMPLE = re.compile(r'_(bucket|sum|count)$')


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse(text: str) -> dict[str, tuple[str, float]]:
    """name -> (type, value) of an exposition text's counters and gauges; every line must be a TYPE
    line or a sample (histograms: checked by :func:`histogram`)."""
    types, values = {}, {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            types[name] = kind
        else:
            match = SAMPLE.match(line)
            assert match, f"not a Prometheus sample: {line!r}"
            base = HISTOGRAM_SAMPLE.sub("", match.group(1))
            if types.get(base) == "histogram":
                continue
            values[match.group(1)] = float(match.group(3))
    assert {n for n, kind in types.items() if kind != "histogram"} == set(values)
    return {name: (types[name], values[name]) for name in values}


def histogram(text: str, name: str) -> tuple[list[tuple[str, float]], float, float]:
    """(le, cumulative count) per bucket, sum and count of histogram ``name``; checks its shape."""
    assert f"# TYPE {name} histogram" in text
    buckets, total, count = [], None, None
    for line in text.splitlines():
        match = SAMPLE.match(line)
        if not match:
            continue
        metric, labels, value = match.group(1), match.group(2), float(match.group(3))
        if metric == name + "_bucket":
            buckets.append((re.search(r'le="([^"]+)"', labels).group(1), value))
        elif metric == name + "_sum":
            total = value
        elif metric == name + "_count":
            count = value
    assert buckets and buckets[-1][0] == "+Inf" and buckets[-1][1] == count
    assert [v for _, v in buckets] == sorted(v for _, v in buckets)              # cumulative
    assert [float(le) for le, _ in buckets[:-1]] == sorted(float(le) for le, _ in buckets[:-1])
    return buckets, total, count


def test_counters_and_gauges_are_rendered_with_escaped_labels():
    text = prometheus_text({"retransmissions": 3, "pending_bytes": 10, "odd-name": 1, "bad": float("nan")},
                           {"member": 'n"1', "cluster": "a\\b"})
    assert 'groupcomm_retransmissions_total{cluster="a\\\\b",member="n\\"1"} 3' in text
    parsed = parse(text)
    assert parsed["groupcomm_retransmissions_total"] == ("counter", 3)
    assert parsed["groupcomm_pending_bytes"] == ("gauge", 10)
    assert parsed["groupcomm_odd_name_total"] == ("counter", 1)
    assert "groupcomm_bad_total" not in parsed                    # not a finite number: left out


def test_histograms_are_rendered_cumulative_with_inf_sum_and_count():
    h = Histogram((0.0001, 0.001))
    for value in (0.00005, 0.0001, 0.0005, 2.0):
        h.observe(value)
    text = prometheus_text({"deliveries": 1}, {"member": "n1"}, {"self_delivery_latency_seconds": h})
    assert 'groupcomm_self_delivery_latency_seconds_bucket{member="n1",le="0.0001"} 2' in text
    buckets, total, count = histogram(text, "groupcomm_self_delivery_latency_seconds")
    assert buckets == [("0.0001", 2), ("0.001", 3), ("+Inf", 4)]
    assert count == 4 and total == pytest.approx(2.00065)
    assert parse(text) == {"groupcomm_deliveries_total": ("counter", 1)}


async def test_a_member_serves_its_counters_and_view_on_a_loopback_port():
    name = f"met-{uuid.uuid4().hex[:8]}"
    async with open_channel("loopback", cluster=name, name="n1",
                            overrides={"UDP": {"mcast_port": free_udp_port()}}) as channel:
        with trio.fail_after(20):
            while channel.view is None:
                await trio.sleep(0.02)
            await channel.send(b"hello")
            for i in range(LATENCY_SAMPLE_EVERY):                # one of them is timed
                await channel.send(b"m%d" % i)
            channel.on_request(_answer_yes)
            assert (await channel.request(b"q"))[channel.address].ok
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
                    while histogram(answer.text, "groupcomm_self_delivery_latency_seconds")[2] < 1:
                        await trio.sleep(0.02)                    # until the timed message is delivered
                        answer = await http.get("/metrics")
                    _, total, count = histogram(answer.text, "groupcomm_request_latency_seconds")
                    assert count == 1 and 0 < total < 20
                    assert (await http.get("/")).status_code == 404
                    assert (await http.post("/metrics")).status_code == 405
                with trio.socket.socket() as raw:                 # a hostile client: an endless head
                    await raw.connect(("127.0.0.1", port))
                    await raw.send(b"GET /metrics HTTP/1.0\r\n" + b"X: " + b"a" * 10000)
                    reply = await raw.recv(100)
                    assert reply.startswith(b"HTTP/1.0 400")
                nursery.cancel_scope.cancel()


async def _answer_yes(request: object) -> bytes:
    return b"yes"


async def test_a_non_loopback_address_needs_allow_remote():
    with pytest.raises(ValueError, match="not a loopback address"):
        await serve_metrics(object(), ("0.0.0.0", 0))


def _metrics_of_process(argv: list[str], url_of_line) -> str:
    """Start ``python -m groupcomm *argv``, read its stdout until ``url_of_line(line)`` gives the
    metrics URL, GET it, stop the process with SIGTERM; the exposition text."""
    proc = subprocess.Popen([sys.executable, "-m", "groupcomm", *argv], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        url = None
        deadline = time.monotonic() + 30
        while url is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            url = url_of_line(line)
        assert url is not None and url.startswith("http://127.0.0.1:")
        return httpx.get(url, timeout=5).text
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stdout.close()


def _json_field(field: str, **having: str):
    def url_of_line(line: str) -> str | None:
        try:
            record = json.loads(line)
        except ValueError:
            return None
        return record.get(field) if all(record.get(k) == v for k, v in having.items()) else None
    return url_of_line


def _channel_args(cluster: str) -> list[str]:
    return ["--stack", "loopback", "--cluster", cluster, "--mcast-port", str(free_udp_port())]


def test_groupcomm_node_serves_its_metrics_where_told():
    cluster = f"met-{uuid.uuid4().hex[:8]}"
    text = _metrics_of_process(["node", *_channel_args(cluster), "--name", "n1", "--metrics", "127.0.0.1:0",
                                "--json", "--no-stdin"], _json_field("metrics"))
    assert 'groupcomm_packets_sent_total{cluster="' + cluster + '",member="n1"}' in text
    assert 'groupcomm_self_delivery_latency_seconds_bucket{cluster="' + cluster + '",member="n1",le="+Inf"}' in text


def test_groupcomm_supervise_serves_its_metrics_where_told(tmp_path):
    cluster = f"met-{uuid.uuid4().hex[:8]}"
    node_file = tmp_path / "node.toml"
    node_file.write_text('node = "s1"\n\n[[process]]\nname = "sleeper"\n'
                         f'command = {json.dumps([sys.executable, "-c", "import time; time.sleep(60)"])}\n')
    text = _metrics_of_process(
        ["supervise", str(node_file), *_channel_args(cluster), "--metrics", "127.0.0.1:0"],
        lambda line: line.split(" ", 2)[2].strip() if line.startswith("metrics at ") else None)
    assert 'groupcomm_request_latency_seconds_count{cluster="' + cluster + '",member="s1"}' in text
    histogram(text, "groupcomm_self_delivery_latency_seconds")


def test_groupcomm_sessions_node_serves_its_metrics_where_told():
    cluster = f"met-{uuid.uuid4().hex[:8]}"
    text = _metrics_of_process(
        ["sessions-node", *_channel_args(cluster), "--name", "w1", "--http", "127.0.0.1:0", "--backups", "0",
         "--metrics", "127.0.0.1:0"], _json_field("url", event="metrics"))
    assert 'groupcomm_view_members{cluster="' + cluster + '",member="w1"} 1' in text
    histogram(text, "groupcomm_request_latency_seconds")


@pytest.mark.parametrize("command", [["node", "--name", "n1"], ["supervise", "node.toml", "--name", "n1"],
                                     ["sessions-node", "--name", "n1", "--http", "127.0.0.1:0"]])
def test_a_metrics_address_that_is_not_loopback_is_one_line_and_exit_status_2(command, tmp_path):
    (tmp_path / "node.toml").write_text('node = "n1"\n')
    done = subprocess.run([sys.executable, "-m", "groupcomm", *command, "--stack", "loopback", "--cluster", "x",
                           "--metrics", "192.0.2.1:9464"],
                          check=False, capture_output=True, text=True, timeout=30, cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "--metrics '192.0.2.1:9464' is not a loopback address" in done.stderr


def test_supervise_metrics_need_a_cluster(tmp_path, capsys):
    from groupcomm.cli import main

    (tmp_path / "node.toml").write_text('node = "n1"\n')
    assert main(["supervise", str(tmp_path / "node.toml"), "--metrics", "127.0.0.1:0"]) == 2
    assert "--metrics need(s) --cluster" in capsys.readouterr().err
