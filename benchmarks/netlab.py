"""A LAN in network namespaces for the benchmarks: n hosts on one bridge, MTU 1500.

``NetLab(n)`` makes n host namespaces and one bridge namespace.  Each host has
an ``eth0`` (a veth pair whose other end is a bridge port), both ends with MTU
1500 -- what a user on an Ethernet LAN gets -- an address 10.78.0.i/24, ``lo``
up and a multicast route over ``eth0``.  The bridge does no IGMP snooping, so
multicast reaches every port.  ``prefix(i)`` is the command prefix that runs a
program in host i.  Everything the lab made is deleted by ``close()`` (also
on an exception or Ctrl-C inside ``with NetLab(...)``); nothing outside its
namespaces is touched.  Needs root and iproute2.

This is deliberately separate from ``tests/netns.py``: a benchmark runs from a
checkout without the test tree on ``sys.path``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from typing import Self

MTU = 1500
"""Both ends of every veth pair and the bridge: an Ethernet LAN's MTU."""


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


def available() -> str:
    """Why a NetLab cannot be built here ("" when it can)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "network namespaces need iproute2 (the ip command)"
    return ""


class NetLab:
    """n host namespaces on one bridge over veth pairs with MTU 1500."""

    def __init__(self, hosts: int, *, mtu: int = MTU) -> None:
        self.tag = uuid.uuid4().hex[:6]
        self.mtu = mtu
        self.bridge_ns = f"gcbb-{self.tag}"
        self.hosts = [f"gcb{i}-{self.tag}" for i in range(1, hosts + 1)]
        self.addresses = [f"10.78.0.{i}" for i in range(1, hosts + 1)]
        self._made: list[str] = []
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def _build(self) -> None:
        mtu = str(self.mtu)
        _ip("netns", "add", self.bridge_ns)
        self._made.append(self.bridge_ns)
        _ip("-n", self.bridge_ns, "link", "add", "br0", "mtu", mtu, "type", "bridge", "mcast_snooping", "0")
        _ip("-n", self.bridge_ns, "link", "set", "br0", "up")
        for i, (ns, addr) in enumerate(zip(self.hosts, self.addresses), start=1):
            _ip("netns", "add", ns)
            self._made.append(ns)
            port, host_end = f"bp{i}-{self.tag}", f"be{i}-{self.tag}"
            # Made in the root namespace and moved at once: the names carry the lab's tag,
            # and close() deletes the namespaces, which deletes both ends.
            _ip("link", "add", port, "mtu", mtu, "type", "veth", "peer", "name", host_end, "mtu", mtu)
            _ip("link", "set", port, "netns", self.bridge_ns)
            _ip("link", "set", host_end, "netns", ns)
            _ip("-n", ns, "link", "set", host_end, "name", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "mtu", mtu)
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up", "multicast", "on")
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "route", "add", "224.0.0.0/4", "dev", "eth0")
            _ip("-n", self.bridge_ns, "link", "set", port, "mtu", mtu)
            _ip("-n", self.bridge_ns, "link", "set", port, "master", "br0")
            _ip("-n", self.bridge_ns, "link", "set", port, "up")

    def prefix(self, i: int) -> list[str]:
        """The command prefix that runs a program in host ``i`` (0-based)."""
        return ["ip", "netns", "exec", self.hosts[i]]

    def close(self) -> None:
        """Delete every namespace the lab made (their veth ends go with them)."""
        for ns in reversed(self._made):
            subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True, timeout=30)
        self._made.clear()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Loopback:
    """The same interface as NetLab for members on this host's loopback (no namespaces)."""

    def __init__(self, hosts: int) -> None:
        self.hosts = ["" for _ in range(hosts)]
        self.addresses = ["127.0.0.1" for _ in range(hosts)]

    def prefix(self, i: int) -> list[str]:
        return []

    def close(self) -> None:
        pass

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        pass
