"""Tutorial, step 2: the counter in a space, with state transfer for late joiners.

With ``GROUPCOMM_KEY_FILE`` set as in step 1, start two members, let them
count to 20, then start a third::

    python docs/examples/counter_space.py --name a --members 2 &
    python docs/examples/counter_space.py --name b --members 2 &
    # once both print "value 20":
    python docs/examples/counter_space.py --name c --members 3

``c`` receives the snapshot (20) taken at the point of the total order where
its join was delivered, then applies every later increment: all three stop
at 30.
"""

from __future__ import annotations

import argparse

import trio
from counter import Counter

import groupcomm


async def run(cluster: str, name: str, members: int, adds: int, until: int) -> None:
    counter = Counter()

    def install(state: bytes | None) -> None:
        counter.restore(state)
        print(f"{name}: state received: {counter.value}")

    async with groupcomm.open_channel("loopback", cluster=cluster, name=name) as ch:
        enough = trio.Event()

        async def watch_views() -> None:
            async for event in ch.events():
                if isinstance(event, groupcomm.View) and not event.transitional:
                    print(f"{name}: view {event.members} primary={event.primary}")
                    if len(event.members) >= members:
                        enough.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch_views)
            await enough.wait()
            space = await ch.join_space("counter")
            space.state_provider(counter.snapshot)   # asked when someone joins after us
            space.state_receiver(install)            # runs once, if we join a space with members
            for _ in range(adds):
                await space.send(b"1")
            async for event in space.events():
                if isinstance(event, groupcomm.SpaceView):
                    print(f"{name}: space members {event.members}")
                elif isinstance(event, groupcomm.Message):
                    counter.apply(event.payload)
                    print(f"{name}: value {counter.value}")
                    if counter.value >= until:
                        break
            nursery.cancel_scope.cancel()           # stop watching views; then leave


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", required=True)
    parser.add_argument("--cluster", default="tutorial-space")
    parser.add_argument("--members", type=int, default=3, help="wait for this many members before joining")
    parser.add_argument("--adds", type=int, default=10)
    parser.add_argument("--until", type=int, default=30, help="stop once the counter reaches this")
    args = parser.parse_args()
    trio.run(run, args.cluster, args.name, args.members, args.adds, args.until)


if __name__ == "__main__":
    main()
