"""The provisioning executor (issue 12): reconcile actions carried out on a real Store, real
Environments (venv + pip), a real Supervisor and real processes; configuration delivery; blobs
pulled between two Stores over loopback Channels."""

from __future__ import annotations

import hashlib
import socket
import stat
import threading
import tomllib
import uuid
from pathlib import Path

import httpx
import pytest
import trio

from groupcomm.cli.demo import free_udp_port
from groupcomm.io.channel import open_channel
from groupcomm.services.provisioning.configfiles import (
    CONFIG_FILE_VAR,
    config_environment,
    config_file,
    env_name,
    given_config,
    render_config,
    write_config,
)
from groupcomm.services.provisioning.environments import Environments
from groupcomm.services.provisioning.executor import Executor, ExecutorSettings
from groupcomm.services.provisioning.fetching import (
    ChannelPuller,
    PullFailed,
    serve_blobs,
)
from groupcomm.services.provisioning.reconcile import (
    ConfigChanged,
    Fetch,
    GcStore,
    Install,
    Start,
    Uninstall,
    actual_rows,
    process_name,
    reconcile,
)
from groupcomm.services.provisioning.state import BundleDesired, GroupState
from groupcomm.services.provisioning.store import Store
from groupcomm.services.supervisor.runner import Supervisor
from groupcomm.services.supervisor.spec import NodeSpec, ProcessSpec
from tests.bundles import BUNDLE_NAME, build_wheel, greeter_manifest, greeter_wheel

PID = "org.example.hello"
PROCESS = process_name(BUNDLE_NAME)

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def desired_of(bundles: dict[str, tuple[str, Path, bool]], configs=None, group: str = "g") -> dict[str, GroupState]:
    """``{group: GroupState}`` wanting ``name -> (version, file, started)``."""
    wanted = {}
    for name, (version, path, started) in bundles.items():
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        wanted[name] = BundleDesired(version, digest, path.stat().st_size, path.name, started)
    return {group: GroupState(group=group, revision=1, bundles=wanted, configs=configs or {})}


def supervisor(tmp_path: Path) -> Supervisor:
    return Supervisor(NodeSpec(source="<node>", processes=(), base_dir=str(tmp_path)), name="n1")


async def get(port: int) -> str | None:
    def fetch() -> str | None:
        try:
            return httpx.get(f"http://127.0.0.1:{port}/", timeout=2).text
        except httpx.TransportError:
            return None
    return await trio.to_thread.run_sync(fetch)


async def served(port: int, expected: str, sup: Supervisor, limit: float = 30) -> None:
    body = None
    with trio.move_on_after(limit):
        while (body := await get(port)) != expected:
            await trio.sleep(0.1)
        return
    raise AssertionError(f"port {port} answers {body!r}, expected {expected!r}; table: {sup.table()}")


# --------------------------------------------------------------------------- the whole cycle, real


async def test_install_start_upgrade_reconfigure_uninstall_with_real_processes(tmp_path):
    v1, v2 = greeter_wheel(tmp_path / "w1", "1.0"), greeter_wheel(tmp_path / "w2", "2.0")
    port = free_port()
    store = Store(tmp_path / "store")
    envs = Environments(tmp_path / "envs")
    d1 = store.put_file(v1)
    done: list = []
    config = {PID: {"greeting": "hi", "port": str(port)}}
    async with supervisor(tmp_path) as sup:
        executor = Executor(store, envs, sup, on_action=lambda a, reason: done.append((a, reason)))
        await executor.refresh()

        # v1, started, configured
        desired = desired_of({BUNDLE_NAME: ("1.0", v1, True)}, config)
        with trio.fail_after(60):
            assert await executor.converge(desired) == []
        assert [type(a) for a, _ in done] == [Install, Start] and all(r is None for _, r in done)
        await served(port, "1.0 hi hi", sup)
        [row] = actual_rows(desired, executor.actual())
        assert (row.actual_version, row.state) == ("1.0", "started")
        fact = executor.actual().processes[BUNDLE_NAME]
        assert (fact.version, fact.digest, fact.config) == ("1.0", d1, config)
        [env1] = envs.list()
        path = config_file(env1.home)
        assert tomllib.loads(path.read_text()) == config
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        spec_env = {k: v for k, v in _process_env(sup.row(PROCESS).pid).items() if k.startswith("GROUPCOMM_CONFIG")}
        assert spec_env == {CONFIG_FILE_VAR: str(path), env_name(PID, "greeting"): "hi", env_name(PID, "port"): str(port)}

        # upgrade to v2: installed while v1 runs, then the process is changed, then v1 goes
        d2 = store.put_file(v2)
        await executor.refresh()
        done.clear()
        desired = desired_of({BUNDLE_NAME: ("2.0", v2, True)}, config)
        with trio.fail_after(60):
            assert await executor.converge(desired) == []
        assert [a for a, _ in done if type(a) is not GcStore] == [      # the store's gc runs in any round
            Install(BUNDLE_NAME, "2.0", d2), Start(BUNDLE_NAME, "2.0", d2, upgrade=True), Uninstall(BUNDLE_NAME, "1.0")]
        assert GcStore(frozenset({d2})) in [a for a, _ in done]
        await served(port, "2.0 hi hi", sup)
        assert [(e.version, e.sha256) for e in envs.list()] == [("2.0", d2)]
        assert store.digests() == {d2}

        # configuration change: file rewritten, process restarted with the new values
        before = sup.row(PROCESS).pid
        done.clear()
        config = {PID: {"greeting": "hello there", "port": str(port)}, "other.pid": {"x": "1"}}
        desired = desired_of({BUNDLE_NAME: ("2.0", v2, True)}, config)
        with trio.fail_after(60):
            assert await executor.converge(desired) == []
        assert [a for a, _ in done] == [ConfigChanged(BUNDLE_NAME, PID)]
        await served(port, "2.0 hello there hello there", sup)
        assert sup.row(PROCESS).pid != before
        [env2] = envs.list()
        assert tomllib.loads(config_file(env2.home).read_text()) == {PID: config[PID]}   # only the PIDs it reads

        # uninstall: the process is gone, then the environment and the file
        pid = sup.row(PROCESS).pid
        done.clear()
        with trio.fail_after(60):
            assert await executor.converge({"g": GroupState(group="g", revision=2)}) == []
        assert sorted(type(a).__name__ for a, _ in done) == ["GcStore", "Stop", "Uninstall"]
        assert [r.name for r in sup.table()] == []
        assert not _alive(pid)
        assert envs.list() == [] and store.digests() == set()
        assert await get(port) is None
        assert executor.actual().processes == {} and executor.actual().envs == frozenset()


def _process_env(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if item)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


# --------------------------------------------------------------------------- failures


async def test_a_blob_that_fails_to_install_is_failed_with_its_reason_until_retried(tmp_path):
    junk = tmp_path / "junk.whl"
    junk.write_bytes(b"not a bundle at all" * 10)
    liar = greeter_wheel(tmp_path / "w", "1.0")              # desired as version 3.0: not what the file is
    store = Store(tmp_path / "store")
    dj, dl = store.put_file(junk), store.put_file(liar)
    desired = desired_of({"junk": ("1.0", junk, True), BUNDLE_NAME: ("3.0", liar, True)})
    ran: list = []
    async with supervisor(tmp_path) as sup:
        executor = Executor(store, Environments(tmp_path / "envs"), sup, on_action=lambda a, r: ran.append(a))
        await executor.refresh()
        with trio.fail_after(30):
            assert await executor.converge(desired) == []
        failed = executor.actual().failed
        assert failed[dj].startswith("install failed: ") and "neither a wheel" in failed[dj]
        assert "the file is bundle 'hello-bundle' version 1.0, the desired state says 'hello-bundle' version 3.0" in failed[dl]
        rows = {r.name: r for r in actual_rows(desired, executor.actual())}
        assert rows["junk"].state == rows[BUNDLE_NAME].state == "failed"
        assert rows["junk"].reason.startswith("install failed")
        assert reconcile(desired, executor.actual()) == []                   # not retried by itself
        assert sorted(executor.retry_failed()) == sorted([dj, dl])
        assert executor.actual().failed == {}
        with trio.fail_after(30):
            await executor.converge(desired)
        assert [type(a) for a in ran] == [Install] * 4                       # tried again, failed again
        assert set(executor.actual().failed) == {dj, dl}
        assert sup.table() == ()


async def test_a_fetch_with_nobody_to_ask_fails_and_a_foreign_bundle_process_is_stopped(tmp_path):
    wheel = greeter_wheel(tmp_path / "w", "1.0")
    foreign = ProcessSpec(name=process_name("stray"), command=("sleep", "60"), stop_grace=1.0)
    async with supervisor(tmp_path) as sup:
        sup.add(foreign)
        executor = Executor(Store(tmp_path / "store"), Environments(tmp_path / "envs"), sup)
        await executor.refresh()
        assert executor.actual().processes["stray"].version == ""           # not started by this executor
        desired = desired_of({BUNDLE_NAME: ("1.0", wheel, False)})
        with trio.fail_after(30):
            assert await executor.converge(desired) == []
        actual = executor.actual()
        assert actual.processes == {} and sup.table() == ()
        [reason] = actual.failed.values()
        assert reason == "fetch failed: this node has no way to fetch files"


async def test_installs_are_bounded_by_the_settings(tmp_path):
    active, most = [0], [0]
    lock = threading.Lock()

    class Counting(Environments):
        def install(self, bundle):
            with lock:
                active[0] += 1
                most[0] = max(most[0], active[0])
            try:
                return super().install(bundle)
            finally:
                with lock:
                    active[0] -= 1

    store = Store(tmp_path / "store")
    wheels = {}
    for i in range(3):
        name = f"b{i}"
        text = greeter_manifest("1.0").replace('"hello-bundle"', f'"{name}"')
        (tmp_path / name).mkdir()
        wheels[name] = ("1.0", build_wheel(tmp_path / name, "1.0", dist=name, manifest_text=text), False)
        store.put_file(wheels[name][1])
    desired = desired_of(wheels)
    async with supervisor(tmp_path) as sup:
        executor = Executor(store, Counting(tmp_path / "envs"), sup, settings=ExecutorSettings(max_installs=1))
        await executor.refresh()
        with trio.fail_after(60):
            assert await executor.converge(desired) == []
    assert {e.name for e in executor.environments.list()} == set(wheels)
    assert most[0] == 1


async def test_an_installed_bundle_whose_file_left_the_store_is_removed_to_be_fetched_again(tmp_path):
    wheel = greeter_wheel(tmp_path / "w", "1.0")
    store, envs = Store(tmp_path / "store"), Environments(tmp_path / "envs")
    digest = store.put_file(wheel)
    async with supervisor(tmp_path) as sup:
        first = Executor(store, envs, sup)
        await first.refresh()
        with trio.fail_after(30):
            assert await first.converge(desired_of({BUNDLE_NAME: ("1.0", wheel, False)})) == []
        assert len(envs.list()) == 1
        store.remove(digest)                            # and an executor that never read the file
        second = Executor(store, envs, sup)
        await second.refresh()
        desired = desired_of({BUNDLE_NAME: ("1.0", wheel, True)}, {PID: {"port": str(free_port())}})
        reason = await second.run(Start(BUNDLE_NAME, "1.0", digest), configs={})
        assert "is gone from the store: its environment was removed" in reason
        assert envs.list() == [] and sup.table() == ()
        assert reconcile(desired, second.actual()) == [Fetch(digest, wheel.stat().st_size, wheel.name, "g")]


async def test_a_pinned_blob_survives_the_store_gc_until_unpinned(tmp_path):
    junk = tmp_path / "file.whl"
    junk.write_bytes(b"a file whose install op is on its way")
    store = Store(tmp_path / "store")
    digest = store.put_file(junk)
    async with supervisor(tmp_path) as sup:
        executor = Executor(store, Environments(tmp_path / "envs"), sup)
        await executor.refresh()
        executor.pin(digest)
        nothing = {"g": GroupState(group="g")}
        with trio.fail_after(10):
            assert await executor.converge(nothing) == [GcStore(frozenset())]     # no progress: left
        assert store.has(digest)
        executor.unpin(digest)
        with trio.fail_after(10):
            assert await executor.converge(nothing) == []
        assert not store.has(digest)


# --------------------------------------------------------------------------- configuration delivery


def test_configuration_variables_names_collisions_nul_and_budget():
    assert env_name("org.example.hello", "greeting") == "GROUPCOMM_CONFIG_ORG_EXAMPLE_HELLO_GREETING"
    assert env_name("a-b", "c.d_e") == "GROUPCOMM_CONFIG_A_B_C_D_E"
    given = given_config(["a.b", "a", "none"], {"a.b": {"c": "first"}, "a": {"b.c": "second", "nul": "x\0y"},
                                                "unread": {"k": "v"}})
    assert given == {"a.b": {"c": "first"}, "a": {"b.c": "second", "nul": "x\0y"}, "none": {}}
    assert config_environment(given) == {"GROUPCOMM_CONFIG_A_B_C": "second"}       # "a" sorts first
    big = {"p": {"k1": "x" * 100, "k2": "y" * 100}}
    assert list(config_environment(big, budget=150)) == ["GROUPCOMM_CONFIG_P_K1"]


@pytest.mark.parametrize("value", ['plain', 'quote " and \\ backslash', "new\nline\ttab\r\x01\x7f", "ünïcødé ✓",
                                   "", "'''", '"""', "[table]\nkey = 1"])
def test_the_configuration_file_is_toml_that_reads_back_exactly(tmp_path, value):
    given = {"org.example.hello": {"greeting": value, "_k-2.x": "2"}, "empty.pid": {}}
    assert tomllib.loads(render_config(given, bundle="b")) == given
    path = write_config(tmp_path / "config" / "c.toml", given)
    assert tomllib.loads(path.read_text()) == given
    write_config(path, {"p": {"k": "new"}})
    assert tomllib.loads(path.read_text()) == {"p": {"k": "new"}}
    assert [p.name for p in path.parent.iterdir()] == ["c.toml"]                    # no temporary left
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


# --------------------------------------------------------------------------- pulling over channels


async def test_a_bundle_is_fetched_from_another_member_over_loopback_channels_and_installed(tmp_path):
    wheel = greeter_wheel(tmp_path / "w", "1.0")
    source, dest = Store(tmp_path / "src"), Store(tmp_path / "dest")
    digest = source.put_file(wheel)
    size = wheel.stat().st_size
    progress: list = []
    cluster, overrides = f"exec-{uuid.uuid4().hex[:8]}", {"UDP": {"mcast_port": free_udp_port()}}
    async with (
        open_channel("loopback", cluster=cluster, name="has", overrides=overrides) as c1,
        open_channel("loopback", cluster=cluster, name="wants", overrides=overrides) as c2,
        supervisor(tmp_path) as sup,
    ):
        handler = serve_blobs(source, max_chunk=64 * 1024)
        c1.on_request(handler)
        c2.on_request(serve_blobs(dest))
        with trio.fail_after(20):
            while c2.view is None or c1.address not in c2.view.members:
                await trio.sleep(0.05)
        puller = ChannelPuller(c2, dest, chunk=16 * 1024, window=3, timeout=5.0,
                               on_progress=lambda d, done, total: progress.append((d, done, total)))
        executor = Executor(dest, Environments(tmp_path / "envs"), sup, puller,
                            holders=lambda group: [c1.address] if group == "g" else [])
        await executor.refresh()
        desired = desired_of({BUNDLE_NAME: ("1.0", wheel, False)})
        assert reconcile(desired, executor.actual()) == [Fetch(digest, size, wheel.name, "g")]
        with trio.fail_after(60):
            assert await executor.converge(desired) == []
        assert dest.path(digest).read_bytes() == wheel.read_bytes()
        assert handler.server.served == size
        assert progress[-1] == (digest, size, size) and len(progress) > size // (16 * 1024)
        assert [(e.name, e.sha256) for e in executor.environments.list()] == [(BUNDLE_NAME, digest)]
        assert executor.actual().fetching == frozenset()

        # a member that does not hold it, and one that answers nothing: the pull fails naming both
        missing = "ab" * 32
        with trio.fail_after(30):
            with pytest.raises(PullFailed) as failed:
                await ChannelPuller(c2, dest, timeout=1.0).pull(missing, 10, [c1.address, c1.address + 12345])
        assert f"member {c1.address}: does not hold it" in str(failed.value)
        assert f"member {c1.address + 12345}: the member left before answering" in str(failed.value)
        assert not dest.has(missing) and list((dest.root / "tmp").iterdir()) == []
