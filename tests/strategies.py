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


def _send(n: int):
    return st.builds(lambda a, k, safe: Step("send", (a, k, safe)), _nodes(n), st.integers(1, 12), st.booleans())


def _action(n: int):
    node = _nodes(n)
    return st.one_of(
        st.builds(lambda t: Step("run", (t,)), st.sampled_from([0.0005, 0.002, 0.01, 0.05, 0.3, 1.0, 2.5])),
        st.builds(lambda a: Step("crash", (a,)), node),
        st.builds(lambda a: Step("restart", (a,)), node),
        st.builds(lambda a: Step("leave", (a,)), node),
        st.builds(
            lambda assign: Step("partition", (tuple(assign),)),
            st.lists(st.integers(0, 2), min_size=n, max_size=n),
        ),
        st.builds(lambda a, b, multicast_only: Step("cut", (a, b, multicast_only)), node, node, st.booleans()),
        st.just(Step("heal", ())),
        st.builds(
            lambda loss, dup, reorder: Step("network", (loss, dup, reorder)),
            st.sampled_from([0.0, 0.01, 0.05, 0.1, 0.2]),
            st.sampled_from([0.0, 0.01, 0.05]),
            st.booleans(),
        ),
    )


def steps(n: int):
    """One action over members 1..n, usually followed by traffic (so faults meet messages)."""
    return st.builds(
        lambda action, send: (action,) if send is None else (action, send),
        _action(n),
        st.one_of(st.none(), _send(n), _send(n), _send(n)),
    )


@st.composite
def schedules(draw, min_nodes: int = 2, max_nodes: int = 8, max_steps: int = 25):
    """``(n, seed, plan)``; most plans start once the first ring has formed, so
    their sends are accepted (a member refuses sends before it has a ring)."""
    n = draw(st.integers(min_nodes, max_nodes))
    seed = draw(st.integers(0, 2**16))
    warm = draw(st.sampled_from([True, True, True, False]))
    first = draw(st.lists(_send(n), max_size=2))
    plan = [step for pair in draw(st.lists(steps(n), min_size=2, max_size=max(2, max_steps // 2))) for step in pair]
    return n, seed, ([Step("warm", ())] if warm else []) + first + plan
