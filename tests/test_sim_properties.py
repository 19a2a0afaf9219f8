"""EVS under drawn fault schedules: partitions, merges, crashes, restarts, leaves,
loss up to 20 %, duplication, reordering, concurrent agreed and safe sends.

After every schedule the network heals and goes quiet; then every live member
must share one configuration and have delivered everything (sim.check(settled=True)).
"""

from __future__ import annotations

from hypothesis import given

from groupcomm.core.ring import RingConfig
from tests.simrun import run_schedule
from tests.strategies import schedules

FAST = RingConfig(token_timeout=0.2, join=0.02, merge=0.05)


@given(schedules())
def test_evs_holds_under_drawn_fault_schedules(schedule):
    n, seed, plan = schedule
    run_schedule(n, seed, plan)


@given(schedules(max_steps=40))
def test_evs_holds_with_fast_timers(schedule):
    n, seed, plan = schedule
    run_schedule(n, seed, plan, FAST)


@given(schedules(max_steps=30))
def test_evs_holds_for_the_production_stack_with_large_messages(schedule):
    """The TOTEM, FD and FRAG layers of protocols/sim.toml; every third message
    is fragmented, so view changes cut large messages mid-flight."""
    n, seed, plan = schedule
    run_schedule(n, seed, plan, stack="sim")
