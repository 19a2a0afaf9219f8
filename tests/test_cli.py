"""The command line as a user meets it: real ``python -P -m groupcomm`` processes.

Every process is bounded in time and, when it runs in the background, killed
in ``finally`` by the PID we hold.  Members use the loopback stack (TTL 0) with
a unique cluster name and a free port.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

import groupcomm
from groupcomm.cli import build_parser
from groupcomm.cli.demo import NodeProcess, free_udp_port, view_is

PACKAGE_ROOT = str(Path(groupcomm.__file__).resolve().parent.parent)
ROOT = Path(__file__).resolve().parent.parent
COMMANDS = ("demo", "simulate", "node", "probe")


def groupcomm_cli(*args: str, timeout: float = 60):
    """Run ``python -P -m groupcomm ARGS`` from the repository root to completion (stdin empty)."""
    return subprocess.run(
        [sys.executable, "-P", "-m", "groupcomm", *args], check=False, stdin=subprocess.DEVNULL,
        capture_output=True, text=True, timeout=timeout, cwd=ROOT, env={**os.environ, "PYTHONPATH": PACKAGE_ROOT},
    )


def loopback_args() -> list[str]:
    return ["--cluster", f"cli-{uuid.uuid4().hex[:8]}", "--stack", "loopback", "--mcast-port", str(free_udp_port())]


def assert_one_line_error(result, status: int, *words: str) -> None:
    assert result.returncode == status, (result.returncode, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("groupcomm: error: "), result.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])
    for noise in ("Traceback", "ExceptionGroup", "TooSlowError", "Cancelled"):
        assert noise not in result.stderr


def edited_loopback_stack(tmp_path: Path, old: str, new: str) -> str:
    """A copy of the shipped loopback stack with ``old`` replaced by ``new``."""
    text = (ROOT / "protocols" / "loopback.toml").read_text()
    assert old in text
    path = tmp_path / "stack.toml"
    path.write_text(text.replace(old, new, 1))
    return str(path)


# -- help ---------------------------------------------------------------------


def test_help_is_plain_text_listing_every_command_with_examples():
    result = groupcomm_cli("--help", timeout=30)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for command in COMMANDS:
        line = next((ln for ln in out.splitlines() if ln.split()[:1] == [command]), None)
        assert line is not None and len(line.split()) > 2, (command, out)     # a one-line description
    examples = out[out.index("examples:"):]
    assert "groupcomm demo" in examples and "groupcomm node --cluster" in examples
    assert "``" not in out and "\x1b" not in out and ":mod:" not in out


def test_build_parser_describes_every_command():
    parser = build_parser()
    for command in COMMANDS:
        assert parser.parse_args([command, "--cluster", "x"] if command in ("node", "probe") else [command]).run
    args = parser.parse_args(["--debug", "node", "--cluster", "x", "--token-timeout", "300ms"])
    assert args.debug and args.token_timeout == pytest.approx(0.3)


# -- errors a user can cause: one line, exit status 2 ---------------------------


def test_unknown_key_in_a_stack_file(tmp_path):
    stack = edited_loopback_stack(tmp_path, 'name = "TOTEM"', 'name = "TOTEM"\ntoken_timout = "1s"')
    result = groupcomm_cli("node", "--cluster", "x", "--stack", stack, timeout=30)
    assert_one_line_error(result, 2, stack, "TOTEM", "token_timout")


def test_unknown_stack_name():
    result = groupcomm_cli("node", "--cluster", "x", "--stack", "no-such-stack", timeout=30)
    assert_one_line_error(result, 2, "no-such-stack", "loopback")


def test_address_not_on_this_host():
    result = groupcomm_cli("node", *loopback_args(), "--bind", "203.0.113.7", timeout=30)
    assert_one_line_error(result, 2, "203.0.113.7", "--bind")


def test_mtu_too_small(tmp_path):
    stack = edited_loopback_stack(tmp_path, 'mtu = "64000"', "mtu = 100")
    result = groupcomm_cli("node", "--cluster", "x", "--stack", stack, timeout=30)
    assert_one_line_error(result, 2, "mtu", stack)


def test_token_timeout_too_short():
    result = groupcomm_cli("node", *loopback_args(), "--token-timeout", "0.0001", timeout=30)
    assert_one_line_error(result, 2, "token timeout", "0.0001")


def test_multicast_options_on_a_unicast_stack():
    result = groupcomm_cli("node", "--cluster", "x", "--stack", "udpu", "--mcast-port", "5000", timeout=30)
    assert_one_line_error(result, 2, "--mcast-port", "udpu")


def test_argparse_errors_exit_2():
    result = groupcomm_cli("node", "--cluster", "x", "--token-timeout", "soon", timeout=30)
    assert result.returncode == 2 and "invalid duration" in result.stderr and "Traceback" not in result.stderr
    assert groupcomm_cli("no-such-command", timeout=30).returncode == 2


def test_a_join_that_times_out_exits_1_with_a_message():
    # A fresh loopback member gathers for startup_wait (1 s) before its first view.
    result = groupcomm_cli("node", *loopback_args(), "--join-timeout", "200ms", timeout=30)
    assert_one_line_error(result, 1, "no view formed within 0.2 s", "--join-timeout")


def test_debug_shows_the_traceback():
    result = groupcomm_cli("--debug", "node", *loopback_args(), "--bind", "203.0.113.7", timeout=30)
    assert result.returncode != 0
    assert "Traceback" in result.stderr and "ConfigError" in result.stderr


# -- Ctrl-C --------------------------------------------------------------------


def test_ctrl_c_leaves_the_group_gracefully_and_quietly():
    """With no failure detector and a 20 s token timeout, only the leave message shrinks the view fast."""
    cluster, port = f"sigint-{uuid.uuid4().hex[:8]}", free_udp_port()
    args = ["--stack", "loopback", "--mcast-port", str(port), "--fd", "off", "--token-timeout", "20s"]
    leaver, watcher = NodeProcess("leaver", cluster, args), NodeProcess("watcher", cluster, args)
    try:
        ids = {leaver.address(), watcher.address()}
        for member in (leaver, watcher):
            member.wait(view_is(ids), 40)
        mark = watcher.mark()
        leaver.proc.send_signal(signal.SIGINT)
        assert leaver.proc.wait(timeout=5) == 130
        assert leaver.proc.stderr.read() == ""
        watcher.wait(view_is({watcher.address()}), 10, since=mark)      # long before the 20 s token timeout
    finally:
        leaver.stop()
        watcher.stop()


# -- probe -----------------------------------------------------------------------


def test_probe_names_the_stack_and_suggests_another_when_nobody_answers():
    port = free_udp_port()
    result = groupcomm_cli("probe", "--cluster", f"nobody-{uuid.uuid4().hex[:8]}", "--stack", "loopback",
                           "--mcast-port", str(port), "--timeout", "200ms", timeout=30)
    assert result.returncode == 1 and result.stdout == ""
    assert f"on stack 'loopback' (239.192.0.78:{port})" in result.stderr
    assert "no member answered within 0.2 s" in result.stderr and "--stack udp" in result.stderr


def test_probe_says_it_needs_a_multicast_stack():
    result = groupcomm_cli("probe", "--cluster", "x", "--stack", "udpu", timeout=30)
    assert_one_line_error(result, 2, "multicast", "udpu")


# -- the other commands and the blocking facade ------------------------------------


def test_simulate_still_narrates_and_checks():
    result = groupcomm_cli("simulate", "--nodes", "3", timeout=120)
    assert result.returncode == 0, result.stderr
    assert "EVS check passed" in result.stdout


def test_blocking_connect_after_a_plain_import_groupcomm(tmp_path):
    """The README's line, in a fresh interpreter, on the default stack kept on this host."""
    program = textwrap.dedent(f"""
        import sys
        import groupcomm
        assert "trio" not in sys.modules
        with groupcomm.blocking.connect(cluster="blocking-{uuid.uuid4().hex[:8]}") as ch:
            ch.send(b"hi")
            for event in ch.events(timeout=10):
                if isinstance(event, groupcomm.Message) and event.payload == b"hi":
                    print("delivered")
                    break
    """)
    result = subprocess.run(
        [sys.executable, "-P", "-c", program], check=False, capture_output=True, text=True, timeout=60, cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": PACKAGE_ROOT, "GROUPCOMM_MCAST_PORT": str(free_udp_port()),
             "GROUPCOMM_MCAST_TTL": "0", "GROUPCOMM_BIND_ADDR": "127.0.0.1"},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["delivered"]


def test_blocking_connect_raises_the_config_error_itself_for_an_unbindable_address():
    from groupcomm.errors import ConfigError

    with pytest.raises(ConfigError, match="203.0.113.7"):
        groupcomm.blocking.connect("loopback", cluster=f"blocking-{uuid.uuid4().hex[:8]}",
                                   overrides={"UDP": {"bind_addr": "203.0.113.7", "mcast_port": free_udp_port()}})
