"""Health probes under trio: a command's exit status, an HTTP GET, a TCP connect, a Python callable."""

from __future__ import annotations

import importlib
import signal
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import trio

from groupcomm.services.supervisor.spawn import spawn
from groupcomm.services.supervisor.spec import HealthCheck

__all__ = ["ProbeTarget", "load_entry_point", "run_probe"]

Outcome = Literal["ok", "failed", "timeout"]


@dataclass(frozen=True)
class ProbeTarget:
    """What a Python probe (``kind = "python"``) is called with."""

    node: str
    process: str
    pid: int
    generation: int


def load_entry_point(entry_point: str) -> Callable[[ProbeTarget], Any]:
    """The callable named by ``"module:function"`` (``function`` may be dotted: ``Class.method``)."""
    module_name, _, attr = entry_point.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"{entry_point} is not callable")
    return obj


async def run_probe(health: HealthCheck, target: ProbeTarget, *, env: Mapping[str, str],
                    cwd: str) -> tuple[Outcome, str]:
    """Run one probe within ``health.timeout``: ``("ok" | "failed" | "timeout", detail)``."""
    with trio.move_on_after(health.timeout) as scope:
        try:
            if health.kind == "command":
                return await _command(health, env, cwd)
            if health.kind == "http":
                return await _http(health)
            if health.kind == "tcp":
                return await _tcp(health)
            return await _python(health, target)
        except OSError as e:
            return "failed", f"{type(e).__name__}: {e}"
    assert scope.cancelled_caught
    return "timeout", f"no answer within {health.timeout:g} s"


async def _command(health: HealthCheck, env: Mapping[str, str], cwd: str) -> tuple[Outcome, str]:
    child = spawn(health.command, env=env, cwd=cwd, capture=False)
    try:
        status = await child.wait()
    finally:
        if child.returncode is None:       # timed out: kill the probe, reap it
            child.signal_group(signal.SIGKILL)
            with trio.CancelScope(shield=True):
                await child.wait()
    return ("ok", "") if status == 0 else ("failed", f"probe command exited with status {status}")


async def _http(health: HealthCheck) -> tuple[Outcome, str]:
    import httpx  # loaded only by supervisors with an HTTP probe

    try:
        async with httpx.AsyncClient(timeout=health.timeout) as client:
            answer = await client.get(health.url)
    except httpx.HTTPError as e:
        return "failed", f"GET {health.url}: {type(e).__name__}: {e}"
    if 200 <= answer.status_code < 300:
        return "ok", ""
    return "failed", f"GET {health.url}: HTTP {answer.status_code}"


async def _tcp(health: HealthCheck) -> tuple[Outcome, str]:
    stream = await trio.open_tcp_stream(health.host, health.port)
    await stream.aclose()
    return "ok", ""


async def _python(health: HealthCheck, target: ProbeTarget) -> tuple[Outcome, str]:
    try:
        function = load_entry_point(health.entry_point)
    except Exception as e:  # noqa: BLE001 -- a broken probe is a failed probe, said in words
        return "failed", f"cannot load {health.entry_point}: {type(e).__name__}: {e}"

    def call() -> tuple[Outcome, str]:
        try:
            result = function(target)
        except Exception as e:  # noqa: BLE001 -- whatever the probe raises means unhealthy
            return "failed", f"{health.entry_point} raised {type(e).__name__}: {e}"
        return ("failed", f"{health.entry_point} returned False") if result is False else ("ok", "")

    return await trio.to_thread.run_sync(call, abandon_on_cancel=True)
