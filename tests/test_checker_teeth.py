"""The EVS checker has teeth: each deliberate bug compiled into the core (the
``mutation`` test knob) must make some schedule fail the checker.

Mutations (see ``datagram_safe``, ``deliver_regular``, ``retransmit_requested``
and ``recovery_plan`` in groupcomm/_ring.c):

1. accept retransmitted (duplicate) tokens, so sequence numbers are handed out twice;
2. deliver past holes (before all lower sequence numbers arrived);
3. deliver safe messages as soon as they are agreed;
4. skip re-sending old-ring messages during recovery;
5. take in recovered messages of other members' old rings.

Mutation 6 (never retransmit a requested message) is deliberately absent: it
is not an EVS bug.  The member that cannot get a message stalls the aru,
excludes itself (failed to receive) and recovery hands it what it missed, so
histories stay correct; only availability suffers.
"""

from __future__ import annotations

import random
import re

import pytest

from groupcomm.errors import EVSViolation
from groupcomm.core.ring import RingConfig
from tests.simrun import run_schedule
from tests.strategies import Step


def random_plan(rng: random.Random, n: int) -> list[Step]:
    """A lossy, faulty schedule with plenty of traffic."""
    plan = [Step("network", (rng.choice([0.05, 0.1, 0.2]), 0.0, rng.random() < 0.5))]
    for _ in range(rng.randint(5, 15)):
        roll = rng.random()
        if roll < 0.5:
            plan.append(Step("send", (rng.randint(1, n), rng.randint(1, 12), rng.random() < 0.5)))
        elif roll < 0.7:
            # sub-millisecond steps cut the network while packets are in flight
            plan.append(Step("run", (rng.choice([0.00005, 0.0001, 0.0002, 0.0004, 0.001, 0.01, 0.1, 1.0]),)))
        elif roll < 0.8:
            plan.append(Step("crash", (rng.randint(1, n),)))
        elif roll < 0.9:
            groups = [rng.randint(0, 1) for _ in range(n)]
            plan.append(Step("partition", (tuple(groups),)))
        else:
            plan.append(Step("heal", ()))
    return plan


def merge_plan(rng: random.Random, n: int) -> list[Step]:
    """Two lossy partitions under load, healed while messages are in flight."""
    split = tuple(rng.randint(0, 1) for _ in range(n))
    plan = [Step("partition", (split,)), Step("network", (rng.choice([0.1, 0.2]), 0.0, False))]
    for _ in range(rng.randint(2, 5)):
        for node in range(1, n + 1):
            plan.append(Step("send", (node, rng.randint(3, 12), rng.random() < 0.3)))
        plan.append(Step("run", (rng.choice([0.0002, 0.001, 0.01, 0.5]),)))
    plan.append(Step("heal", ()))
    for node in range(1, n + 1):
        plan.append(Step("send", (node, rng.randint(3, 12), False)))
        plan.append(Step("run", (rng.choice([0.0001, 0.0003, 0.001]),)))
    return plan


def first_violation(mutation: int, attempts: int = 400) -> str | None:
    for seed in range(attempts):
        rng = random.Random(seed)
        n = rng.randint(2, 6)
        plan = random_plan(rng, n) if seed % 2 == 0 else merge_plan(rng, max(n, 4))
        n = max(n, 4) if seed % 2 else n
        config = RingConfig(token_timeout=0.2, join=0.02, merge=0.05, mutation=mutation)
        try:
            run_schedule(n, seed, plan, config)
        except EVSViolation as exc:
            caught_by = sorted(set(re.findall(r"^\[([a-z -]+)\]", str(exc), re.M)))
            return f"seed {seed}: caught by {', '.join(caught_by)}"
    return None


def test_unmutated_core_passes_the_same_schedules():
    for seed in range(60):
        rng = random.Random(seed)
        n = rng.randint(2, 6)
        plan = random_plan(rng, n) if seed % 2 == 0 else merge_plan(rng, max(n, 4))
        n = max(n, 4) if seed % 2 else n
        run_schedule(n, seed, plan, RingConfig(token_timeout=0.2, join=0.02, merge=0.05))


@pytest.mark.parametrize("mutation", [1, 2, 3, 4, 5])
def test_checker_catches_mutation(mutation):
    found = first_violation(mutation)
    assert found is not None, f"mutation {mutation} survived 400 schedules: the checker has a blind spot"
