"""A member's durable state (groupcomm.io.state_dir): ring seqs reserved before use, quorum memory.

Every test keeps its state under pytest's tmp_path (never the real home).
The Channel tests run on loopback only (multicast TTL 0).
"""

from __future__ import annotations

import logging
import socket
import time
import uuid

import pytest
import trio

from groupcomm.core.ring import RingConfig
from groupcomm.io.channel import open_channel
from groupcomm.io.state_dir import (
    DB_NAME,
    RING_SEQ_BLOCK,
    MemberState,
    RingSeqLease,
    StateDir,
    StateDirInUse,
    clock_floor,
    default_root,
    member_dir,
    open_member_state,
)
from groupcomm.io.udp import UdpConfig
from groupcomm.layers.quorum import MemoryStore, QuorumConfig, QuorumMemory

FAST = RingConfig(token_timeout=0.3, join=0.02, merge=0.05)
DAY = 86400.0


# ---------------------------------------------------------------------------
# Where the state lives
# ---------------------------------------------------------------------------


def test_the_default_root_follows_xdg_then_home(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    assert default_root() == tmp_path / "xdg" / "groupcomm"
    monkeypatch.delenv("XDG_STATE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_root() == tmp_path / "home" / ".local" / "state" / "groupcomm"


def test_each_member_has_a_directory_of_its_own_under_the_root(tmp_path) -> None:
    assert member_dir(tmp_path, "orders", "node-1") == tmp_path / "orders" / "node-1"
    for cluster, name in (("a/b", ".."), ("..", "."), ("", "x y"), ("c", "/etc")):
        path = member_dir(tmp_path, cluster, name)
        assert path.parent.parent == tmp_path and ".." not in path.parts and path.name not in ("", ".")
    assert member_dir(tmp_path, "c", "a/b") != member_dir(tmp_path, "c", "a_b")


# ---------------------------------------------------------------------------
# The database
# ---------------------------------------------------------------------------


def test_reserved_ring_seqs_and_quorum_memory_survive_a_reopen(tmp_path) -> None:
    state = StateDir.open(tmp_path / "m")
    assert state.ring_seq_reserved is None and state.load_quorum() is None
    state.reserve_ring_seqs(12345)
    state.save_quorum(QuorumMemory(expected=5, seen_all=True, configured=5))
    state.close()
    state = StateDir.open(tmp_path / "m")
    assert state.ring_seq_reserved == 12345
    assert state.load_quorum() == QuorumMemory(expected=5, seen_all=True, configured=5)
    assert (tmp_path / "m" / DB_NAME).exists()
    state.close()


def test_a_state_directory_held_by_a_live_member_is_refused(tmp_path) -> None:
    held = StateDir.open(tmp_path / "m")
    with pytest.raises(StateDirInUse, match="in use by another member"):
        StateDir.open(tmp_path / "m")
    member = open_member_state(tmp_path, "c", "m2")
    with pytest.raises(StateDirInUse):
        open_member_state(tmp_path, "c", "m2")
    member.close()
    held.close()
    StateDir.open(tmp_path / "m").close()


def test_each_incarnation_starts_above_the_last_even_when_the_clock_steps_back(tmp_path) -> None:
    now = [1_700_000_000.0]
    first = open_member_state(tmp_path, "c", "a", clock=lambda: now[0])
    assert first.floor == clock_floor(lambda: now[0])            # a new directory starts at the clock
    first.close()
    now[0] -= 10 * DAY
    second = open_member_state(tmp_path, "c", "a", clock=lambda: now[0])
    assert second.floor > first.floor + RING_SEQ_BLOCK // 2
    assert second.state is not None and second.state.ring_seq_reserved >= second.floor + RING_SEQ_BLOCK
    second.close()
    other = open_member_state(tmp_path, "c", "b", clock=lambda: now[0])   # another member: its own directory
    assert other.floor == clock_floor(lambda: now[0])
    other.close()


def test_seal_incarnations_grow_across_starts_and_what_was_heard_is_kept(tmp_path) -> None:
    now = [1_700_000_000.0]
    first = open_member_state(tmp_path, "c", "a", clock=lambda: now[0])
    assert first.incarnation == 1_700_000_000_000_000           # microseconds of the start
    first.save_peer_incarnations({7: 123, 9: 456})
    first.close()
    now[0] -= 10 * DAY                                         # the clock steps back
    second = open_member_state(tmp_path, "c", "a", clock=lambda: now[0])
    assert second.incarnation == first.incarnation + 1         # still above: no nonce is reused
    assert second.peer_incarnations() == {7: 123, 9: 456}
    second.save_peer_incarnations({7: 124})
    second.close()
    third = open_member_state(tmp_path, "c", "a", clock=lambda: now[0] + 20 * DAY)
    assert third.incarnation == int((now[0] + 20 * DAY) * 1e6)
    assert third.peer_incarnations() == {7: 124}
    third.close()
    anonymous = open_member_state(tmp_path, "c", None, clock=lambda: now[0])
    assert anonymous.incarnation == int(now[0] * 1e6) and anonymous.peer_incarnations() == {}


def test_without_a_writable_directory_the_clock_floor_is_used_with_a_warning(tmp_path, caplog) -> None:
    (tmp_path / "file").write_text("not a directory")
    with caplog.at_level(logging.WARNING, logger="groupcomm.state"):
        state = open_member_state(tmp_path / "file", "c", "a", clock=lambda: 1000.0)
    assert state.floor == 4_000_000 and state.state is None and isinstance(state.quorum, MemoryStore)
    assert any("cannot be used" in r.getMessage() and "wall clock" in r.getMessage() for r in caplog.records)
    ring = object()
    assert state.lease(ring) is ring


def test_a_member_without_a_lasting_identity_keeps_nothing(tmp_path, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="groupcomm.state"):
        state = open_member_state(tmp_path, "c", None, clock=lambda: 1000.0)
    assert state.state is None and not caplog.records and not any(tmp_path.iterdir())


class FakeRing:
    """A ring whose highest ring seq the test moves; take() records what was reserved on disk then."""

    def __init__(self, state: StateDir, seq: int) -> None:
        self.state, self.ring_seq, self.seen = state, seq, []

    def receive(self, now, packet): ...
    def submit(self, now, payload, **kw): ...
    def tick(self, now): ...
    def next_deadline(self): ...

    def take(self, *args, **kwargs) -> list:
        self.seen.append((self.ring_seq, self.state.ring_seq_reserved))
        return ["outputs"]


def test_a_ring_seq_is_on_disk_before_the_outputs_that_use_it_are_handed_out(tmp_path) -> None:
    state = StateDir.open(tmp_path / "m")
    state.reserve_ring_seqs(1000 + 64)
    ring = FakeRing(state, 1000)
    lease = RingSeqLease(ring, state, reserved=1064, block=64)
    assert lease.take() == ["outputs"] and state.ring_seq_reserved == 1064     # half the block is left
    ring.ring_seq = 1036                                        # past half the block: the next block
    lease.take()
    ring.ring_seq = 10**12                                      # a join from a member far ahead
    lease.take(runs=True)
    assert [seq <= reserved for seq, reserved in ring.seen] == [True, True, True]
    assert ring.seen[-1] == (10**12, 10**12 + 64) and lease.reserved == 10**12 + 64
    assert lease.ring_seq == 10**12 and lease.receive == ring.receive
    assert MemberState.unlease(lease) is ring and MemberState.unlease(ring) is ring
    state.close()


# ---------------------------------------------------------------------------
# A real Channel on loopback
# ---------------------------------------------------------------------------


def loopback() -> UdpConfig:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return UdpConfig(bind_addr="127.0.0.1", mcast_port=port, mcast_ttl=0)


async def first_view(udp: UdpConfig, cluster: str, name: str, state_dir, size: int = 1, **kw):
    async with open_channel(cluster=cluster, name=name, udp=udp, ring=FAST, state_dir=state_dir, **kw) as ch:
        while not (ch.view and len(ch.view.members) == size):
            await trio.sleep(0.005)
        return ch.view


async def test_a_restarted_channel_uses_higher_ring_seqs_though_the_clock_stepped_back(tmp_path, monkeypatch):
    udp, cluster = loopback(), f"test-{uuid.uuid4().hex[:8]}"
    with trio.fail_after(20):
        before = await first_view(udp, cluster, "a", tmp_path)
        real = time.time
        monkeypatch.setattr(time, "time", lambda: real() - 10 * DAY)
        after = await first_view(udp, cluster, "a", tmp_path)
    assert after.ring_id.seq > before.ring_id.seq
    assert (member_dir(tmp_path, cluster, "a") / DB_NAME).exists()


async def test_a_channel_tells_its_state_directory_for_services_to_keep_theirs_in(tmp_path, caplog):
    udp, cluster = loopback(), f"test-{uuid.uuid4().hex[:8]}"
    (tmp_path / "file").write_text("not a directory")
    with trio.fail_after(20):
        async with open_channel(cluster=cluster, name="a", udp=udp, ring=FAST, state_dir=tmp_path) as ch:
            assert ch.state_dir == member_dir(tmp_path, cluster, "a")
        with caplog.at_level(logging.WARNING, logger="groupcomm.state"):
            async with open_channel(cluster=cluster, name="b", udp=udp, ring=FAST,
                                    state_dir=tmp_path / "file") as ch:
                assert ch.state_dir is None             # no directory: services must be told one


async def test_a_channel_whose_state_directory_cannot_be_written_warns_and_runs(tmp_path, caplog):
    (tmp_path / "file").write_text("not a directory")
    udp, cluster = loopback(), f"test-{uuid.uuid4().hex[:8]}"
    with caplog.at_level(logging.WARNING, logger="groupcomm.state"), trio.fail_after(20):
        view = await first_view(udp, cluster, "a", tmp_path / "file")
    assert view.members and any("cannot be used" in r.getMessage() for r in caplog.records)


async def test_a_channel_that_restarts_alone_is_not_primary(tmp_path):
    udp, cluster = loopback(), f"test-{uuid.uuid4().hex[:8]}"
    with trio.fail_after(30):
        async with open_channel(cluster=cluster, name="a", udp=udp, ring=FAST, state_dir=tmp_path):
            both = await first_view(udp, cluster, "b", tmp_path, size=2)
            assert both.primary and len(both.members) == 2
        alone = await first_view(udp, cluster, "a", tmp_path)
    assert alone.members and not alone.primary            # highest seen: 2 votes, remembered
    state = StateDir.open(member_dir(tmp_path, cluster, "a"))
    assert state.load_quorum() == QuorumMemory(expected=2, seen_all=False, configured=0)
    state.close()


async def test_the_stack_file_names_the_state_root(tmp_path):
    udp, cluster = loopback(), f"test-{uuid.uuid4().hex[:8]}"
    with trio.fail_after(20):
        await first_view(udp, cluster, "a", None, quorum=QuorumConfig(state_dir=str(tmp_path / "root")))
    assert (member_dir(tmp_path / "root", cluster, "a") / DB_NAME).exists()
