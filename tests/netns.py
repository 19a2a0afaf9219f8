"""Private Linux network namespaces for partition tests.

``Lab(n)`` makes n host namespaces, each with one veth into a bridge that
lives in its own namespace; addresses 10.77.x.y exist only inside them.
``cut(i)`` / ``heal(i)`` take host i's link down and up.  Everything the lab
made is deleted on close; nothing outside its namespaces is touched.
"""

from __future__ import annotations

import subprocess
import uuid


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


class Lab:
    def __init__(self, hosts: int) -> None:
        tag = uuid.uuid4().hex[:6]
        self.bridge_ns = f"gcbr-{tag}"
        self.hosts = [f"gch{i}-{tag}" for i in range(1, hosts + 1)]
        self.addresses = [f"10.77.0.{i}" for i in range(1, hosts + 1)]
        self._made: list[str] = []
        try:
            self._build(tag)
        except BaseException:
            self.close()
            raise

    def _build(self, tag: str) -> None:
        _ip("netns", "add", self.bridge_ns)
        self._made.append(self.bridge_ns)
        # No IGMP snooping: after a cut the bridge would forget who joined the group
        # and filter multicast to the healed host until its next IGMP report.
        _ip("-n", self.bridge_ns, "link", "add", "br0", "type", "bridge", "mcast_snooping", "0")
        _ip("-n", self.bridge_ns, "link", "set", "br0", "up")
        for i, (ns, addr) in enumerate(zip(self.hosts, self.addresses), start=1):
            _ip("netns", "add", ns)
            self._made.append(ns)
            port = f"p{i}-{tag}"
            _ip("link", "add", port, "type", "veth", "peer", "name", f"e{i}-{tag}")
            _ip("link", "set", port, "netns", self.bridge_ns)
            _ip("link", "set", f"e{i}-{tag}", "netns", ns)
            _ip("-n", ns, "link", "set", f"e{i}-{tag}", "name", "eth0")
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up", "multicast", "on")
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "route", "add", "224.0.0.0/4", "dev", "eth0")
            _ip("-n", self.bridge_ns, "link", "set", port, "master", "br0")
            _ip("-n", self.bridge_ns, "link", "set", port, "up")
        self._ports = [f"p{i}-{tag}" for i in range(1, len(self.hosts) + 1)]

    def exec_prefix(self, i: int) -> list[str]:
        return ["ip", "netns", "exec", self.hosts[i]]

    def cut(self, i: int) -> None:
        _ip("-n", self.bridge_ns, "link", "set", self._ports[i], "down")

    def heal(self, i: int) -> None:
        _ip("-n", self.bridge_ns, "link", "set", self._ports[i], "up")

    def close(self) -> None:
        for ns in reversed(self._made):           # deleting a namespace removes its veth ends
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
        self._made.clear()

    def __enter__(self) -> "Lab":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
