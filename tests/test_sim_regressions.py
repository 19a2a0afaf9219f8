"""Schedules that once broke the core, kept forever (found by soak runs)."""

from __future__ import annotations

from tests.simrun import run_schedule
from tests.strategies import Step as S


def test_fresh_members_with_different_fail_sets_do_not_join_storm():
    # Fresh members (never in a ring together) disagreed about which members had
    # failed; each join restarted the others' gather, so consensus never accrued
    # and joins flew at network speed forever.
    plan = [
        S("send", (1, 1, True)), S("send", (5, 2, False)), S("crash", (4,)), S("send", (2, 7, False)),
        S("send", (4, 9, True)), S("crash", (4,)), S("crash", (4,)), S("crash", (6,)),
        S("send", (2, 2, True)), S("network", (0.0, 0.01, True)), S("run", (0.3,)),
        S("send", (2, 5, True)), S("send", (1, 12, False)), S("leave", (5,)),
        S("network", (0.0, 0.01, True)),
    ]
    run_schedule(7, 2854, plan)
