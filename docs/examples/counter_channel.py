"""Tutorial, step 1: a counter replicated over the whole channel.

Make a cluster key once, then start three members on this machine (three
terminals, or ``&``), each with ``GROUPCOMM_KEY_FILE`` set::

    groupcomm keygen /tmp/counter.key
    export GROUPCOMM_KEY_FILE=/tmp/counter.key
    python docs/examples/counter_channel.py --name a
    python docs/examples/counter_channel.py --name b
    python docs/examples/counter_channel.py --name c

Each waits for a view of three members, adds 1 ten times, and stops when the
counter reaches 30.  All three print the same value, reached through the same
sequence of increments.
"""

from __future__ import annotations

import argparse

import trio
from counter import Counter

import groupcomm


async def run(cluster: str, name: str, members: int, adds: int, until: int) -> None:
    counter = Counter()
    async with groupcomm.open_channel("loopback", cluster=cluster, name=name) as ch:
        print(f"{name}: I am member {ch.address}")
        async for event in ch.events():
            if isinstance(event, groupcomm.View):
                kind = "transitional" if event.transitional else "regular"
                print(f"{name}: {kind} view {event.members}")
                if not event.transitional and len(event.members) >= members and adds:
                    for _ in range(adds):
                        await ch.send(b"1")          # totally ordered, to every member
                    adds = 0
            elif isinstance(event, groupcomm.Message):
                counter.apply(event.payload)
                if counter.value >= until:
                    break
    print(f"{name}: value {counter.value}")        # leaving the block left the group


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", required=True)
    parser.add_argument("--cluster", default="tutorial")
    parser.add_argument("--members", type=int, default=3, help="wait for this many members before adding")
    parser.add_argument("--adds", type=int, default=10)
    parser.add_argument("--until", type=int, default=30, help="stop once the counter reaches this")
    args = parser.parse_args()
    trio.run(run, args.cluster, args.name, args.members, args.adds, args.until)


if __name__ == "__main__":
    main()
