"""Hypothesis strategies for fault schedules over a SimCluster."""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import strategies as st


@dataclass(frozen=True)
class Step:
    kind: str
    args: tuple

    def __repr__(self) -> str:
        return f"{self.kind}{self.args!r}"


def _nodes(n: int):
    return st.integers(1, n)


def steps(n: int):
    """One step of a schedule over members 1..n."""
    node = _nodes(n)
    send = st.builds(lambda a, k, safe: Step("send", (a, k, safe)), node, st.integers(1, 12), st.booleans())
    return st.one_of(
        send,
        send,                                   # listed twice: traffic is the most common step
        st.builds(lambda t: Step("run", (t,)), st.sampled_from([0.0005, 0.002, 0.01, 0.05, 0.3, 1.0, 2.5])),
        st.builds(lambda a: Step("crash", (a,)), node),
        st.builds(lambda a: Step("restart", (a,)), node),
        st.builds(lambda a: Step("leave", (a,)), node),
        st.builds(
            lambda assign: Step("partition", (tuple(assign),)),
            st.lists(st.integers(0, 2), min_size=n, max_size=n),
        ),
        st.just(Step("heal", ())),
        st.builds(
            lambda loss, dup, reorder: Step("network", (loss, dup, reorder)),
            st.sampled_from([0.0, 0.01, 0.05, 0.1, 0.2]),
            st.sampled_from([0.0, 0.01, 0.05]),
            st.booleans(),
        ),
    )


@st.composite
def schedules(draw, min_nodes: int = 2, max_nodes: int = 8, max_steps: int = 25):
    n = draw(st.integers(min_nodes, max_nodes))
    seed = draw(st.integers(0, 2**16))
    plan = draw(st.lists(steps(n), min_size=1, max_size=max_steps))
    return n, seed, plan
