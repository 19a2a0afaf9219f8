"""A real partition between network namespaces this test creates: cut a host
off, see two views, heal, see one view; EVS holds on the recorded histories.

Needs root and iproute2 (CI runs as root).  Bounded in time; the namespaces
and the processes it started are removed in ``finally``.
"""

from __future__ import annotations

import os
import shutil
import uuid

import pytest

from groupcomm.events import Configuration, Delivery, RingId
from groupcomm.testing import SendRecord, check_evs
from groupcomm.cli.demo import NodeProcess, view_is
from tests.netns import Lab

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None, reason="needs root and iproute2 to make network namespaces"
)


def ns_member(lab: Lab, i: int, cluster: str) -> NodeProcess:
    """A `groupcomm node` process inside one of the lab's namespaces."""
    args = ["--bind", lab.addresses[i], "--ttl", "1", "--stack", "udp", "--token-timeout", "0.3"]
    return NodeProcess(f"h{i}", cluster, args, prefix=lab.exec_prefix(i))


def history(member: NodeProcess) -> list:
    member.drain()
    out = []
    for e in member.log:
        if "view" in e:
            rep, seq = e["ring"].split(":")
            out.append(Configuration(RingId(int(rep), int(seq)), tuple(e["view"]), e["transitional"]))
        elif "msg" in e:
            out.append(Delivery(e["from"], e["msg"].encode(), e["safe"]))
    return out


def test_partition_and_heal_between_namespaces():
    cluster = f"netns-{uuid.uuid4().hex[:6]}"
    with Lab(3) as lab:
        members = [ns_member(lab, i, cluster) for i in range(3)]
        sends: list[SendRecord] = []
        try:
            ids = [m.address() for m in members]
            everyone = set(ids)
            for m in members:
                m.wait(view_is(everyone), 20)

            def send(i: int, text: str) -> None:
                members[i].send(text)
                sends.append(SendRecord(ids[i], 0, text.encode(), False))

            for k in range(5):
                for i in range(3):
                    send(i, f"before-{i}-{k}")
            lab.cut(2)
            for m in members[:2]:
                m.wait(view_is(set(ids[:2])), 20)
            members[2].wait(view_is({ids[2]}), 20)
            marks = [m.mark() for m in members]
            for k in range(5):
                send(0, f"majority-{k}")
                send(2, f"minority-{k}")
            members[0].wait(lambda e: e.get("msg") == "majority-4", 20)
            members[2].wait(lambda e: e.get("msg") == "minority-4", 20)
            lab.heal(2)
            for m, mark in zip(members, marks):
                m.wait(view_is(everyone), 30, since=mark)     # the merged view, not the first one
            send(1, "after-heal")
            for m in members:
                m.wait(lambda e: e.get("msg") == "after-heal", 20)
            histories = {ids[i]: history(m) for i, m in enumerate(members)}
            check_evs(histories, sends, live=ids, settled=False)
        finally:
            for m in members:
                m.stop()
