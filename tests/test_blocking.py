"""The blocking facade, for code that does not use trio."""

from __future__ import annotations

import pytest

from groupcomm import blocking
from groupcomm.errors import ChannelClosed, ConfigError
from groupcomm.events import Message
from tests.test_channel import FAST, loopback, unique_cluster


def test_two_blocking_members_exchange_ordered_messages():
    udp, cluster = loopback(), unique_cluster()
    with blocking.connect(cluster=cluster, name="x", udp=udp, ring=FAST) as x, \
            blocking.connect(cluster=cluster, name="y", udp=udp, ring=FAST) as y:
        for ev in x.events(timeout=5):
            if x.view and len(x.view.members) == 2:
                break
        for i in range(20):
            x.send(b"x%d" % i)
            y.send(b"y%d" % i, safe=True)
        orders = []
        for ch in (x, y):
            got: list[bytes] = []
            for e in ch.events(timeout=5):
                if isinstance(e, Message):
                    got.append(e.payload)
                    if len(got) == 40:
                        break
            orders.append(got)
        assert orders[0] == orders[1] and len(orders[0]) == 40
    with pytest.raises(ChannelClosed):
        x.send(b"late")


def test_configuration_errors_surface_in_the_caller():
    with pytest.raises(ConfigError):
        blocking.connect("no-such-stack", cluster=unique_cluster(), udp=loopback())
