"""A tiny lossless in-process network for a few sans-IO nodes (rings or members).

The fuzz targets that need a node in the middle of the protocol (a formed ring,
a view, spaces joined) build one here from scratch for every input, so each
input is replayed from the same state and a crash reproduces from its file
alone.  Delivery is immediate and in order; time jumps to the next deadline
when nothing is in flight.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from groupcomm.core.ring import SendTo, SendToAll


class Node:
    """One node on the loop: how to feed it and how to take its outputs."""

    def __init__(self, node_id: int, obj: Any, take: Callable[[int], list]) -> None:
        self.id = node_id
        self.obj = obj
        self.take = take
        self.delivered: list = []
        """Every output that is not a packet (deliveries, views, events), in order."""


class NetLoop:
    """Passes every packet a node sends to its destinations until ``done()`` or a step limit."""

    def __init__(self, nodes: Iterable[Node]) -> None:
        self.nodes = {n.id: n for n in nodes}
        self.now = 0
        self.observers: list[Callable[[int, Any], None]] = []
        """Called as ``observe(src, packet_output)`` for every SendTo / SendToAll (to capture traffic)."""

    def flush(self, node: Node) -> bool:
        """Deliver ``node``'s outputs; whether any packet moved."""
        moved = False
        for out in node.take(self.now):
            t = type(out)
            if self.observers and (t is SendToAll or t is SendTo):
                for observe in self.observers:
                    observe(node.id, out)
            if t is SendToAll:
                for dest in self.nodes.values():
                    if dest is not node:
                        dest.obj.receive(self.now, out.packet)
                        moved = True
            elif t is SendTo:
                dest = self.nodes.get(out.node)
                if dest is not None and dest is not node:
                    dest.obj.receive(self.now, out.packet)
                    moved = True
            else:
                node.delivered.append(out)
        return moved

    def step(self) -> None:
        """Flush every node; if nothing moved, advance to the next deadline and tick."""
        moved = False
        for node in self.nodes.values():
            moved |= self.flush(node)
        if not moved:
            deadlines = [d for d in (n.obj.next_deadline() for n in self.nodes.values()) if d is not None]
            self.now = max(self.now + 1, min(deadlines)) if deadlines else self.now + 1000
            for node in self.nodes.values():
                node.obj.tick(self.now)

    def run_until(self, done: Callable[[], bool], max_steps: int) -> bool:
        for _ in range(max_steps):
            if done():
                return True
            self.step()
        return done()

    def run_for(self, microseconds: int, max_steps: int) -> None:
        """Run at most ``microseconds`` of virtual time and ``max_steps`` steps (a bound on work per input)."""
        end = self.now + microseconds
        for _ in range(max_steps):
            if self.now >= end:
                return
            self.step()
