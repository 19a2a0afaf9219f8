"""An outsider on loopback, for the hostile tests: it sniffs every UDP datagram,
forges, replays, and floods from many source addresses.

With root it reads loopback with an AF_PACKET socket (tokens and unicasts
too, not only the multicast group) and floods with raw IP datagrams whose
source addresses it picks (127.x.y.z); without, it sniffs the group and
floods from many source ports.
"""

from __future__ import annotations

import os
import random
import socket
import struct
import time
from dataclasses import dataclass, field

ETH_P_ALL = 0x0003
ETH_HEADER = 14


def can_raw() -> bool:
    return hasattr(socket, "AF_PACKET") and os.geteuid() == 0


@dataclass
class Captured:
    data: bytes
    dest: tuple[str, int]
    src_port: int


@dataclass
class Outsider:
    """Sees what crosses loopback to the cluster's ports, and sends what it likes."""

    group: tuple[str, int]
    ports: set[int] = field(default_factory=set)      # the members' unicast ports, learnt by sniffing
    captured: list[Captured] = field(default_factory=list)
    """What the members sent (never the outsider's own datagrams), once :meth:`learn_members` ran."""

    def __post_init__(self) -> None:
        self.raw = can_raw()
        if self.raw:
            self._sniffer = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
            self._sniffer.bind(("lo", 0))
        else:
            self._sniffer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self._sniffer.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._sniffer.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            self._sniffer.bind(self.group)
            self._sniffer.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP,
                                     socket.inet_aton(self.group[0]) + socket.inet_aton("127.0.0.1"))
        self._sniffer.setblocking(False)
        self._out = loopback_socket()
        self._raw_out = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW) if self.raw else None

    def close(self) -> None:
        self._sniffer.close()
        self._out.close()
        if self._raw_out is not None:
            self._raw_out.close()

    # -- sniffing --------------------------------------------------------------

    def learn_members(self, seconds: float) -> None:
        """Before attacking: watch the cluster and note its members' ports (where its datagrams come from)."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            for got in self._read():
                if got.data[:2] == b"GS" and (got.dest == self.group or got.dest[1] in self.ports or self.raw):
                    self.ports.add(got.src_port)
            time.sleep(0.01)
        self.sniff()

    def sniff(self, limit: int = 100_000) -> int:
        """Read what is waiting; keep what the members sent. Returns how many."""
        n = 0
        for got in self._read(limit):
            if got.src_port in self.ports:
                self.captured.append(got)
                n += 1
        return n

    def _read(self, limit: int = 100_000):
        for _ in range(limit):
            try:
                frame, addr = self._sniffer.recvfrom(70000)
            except BlockingIOError:
                return
            got = self._parse(frame, addr) if self.raw else Captured(frame, self.group, addr[1])
            if got is not None:
                yield got

    def _parse(self, frame: bytes, addr) -> Captured | None:
        if addr[2] == socket.PACKET_OUTGOING or len(frame) < ETH_HEADER + 28:
            return None                                   # each datagram once, as it arrives
        if frame[12:14] != b"\x08\x00":
            return None
        ip = frame[ETH_HEADER:]
        ihl = (ip[0] & 0x0F) * 4
        if ip[9] != socket.IPPROTO_UDP or ip[12:16] != socket.inet_aton("127.0.0.1"):
            return None
        src_port, dst_port = struct.unpack_from(">HH", ip, ihl)
        return Captured(ip[ihl + 8:], (socket.inet_ntoa(ip[16:20]), dst_port), src_port)

    # -- sending ---------------------------------------------------------------

    def targets(self) -> list[tuple[str, int]]:
        return [self.group, *(("127.0.0.1", p) for p in sorted(self.ports))]

    def send(self, data: bytes, dest: tuple[str, int]) -> None:
        try:
            self._out.sendto(data, dest)
        except OSError:
            pass

    def replay_all(self) -> int:
        """Send every captured datagram again, to where it went and to every member."""
        sent = 0
        for c in list(self.captured):
            for dest in {c.dest, *self.targets()}:
                self.send(c.data, dest)
                sent += 1
        return sent

    def flood(self, sources: int, rng: random.Random, make) -> int:
        """``sources`` datagrams ``make(rng)``, each from another source address (raw, to the
        members' own ports) or port (to the group too)."""
        targets = self.targets()
        for i in range(sources):
            data = make(rng)
            dest = targets[i % len(targets)]
            if self._raw_out is not None and dest != self.group:
                src = f"127.{1 + (i >> 16) % 250}.{(i >> 8) & 255}.{i & 255 or 1}"
                self._raw_out.sendto(_ip_udp(src, 40000 + i % 20000, dest, data), (dest[0], 0))
            else:
                with loopback_socket() as s:
                    try:
                        s.sendto(data, dest)
                    except OSError:
                        pass
        return sources


def loopback_socket() -> socket.socket:
    """A UDP socket whose multicasts stay on this host (loopback interface, TTL 0)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton("127.0.0.1"))
    s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 0)
    return s


def _ip_udp(src: str, sport: int, dest: tuple[str, int], payload: bytes) -> bytes:
    """An IPv4 + UDP datagram from a source of our choosing (UDP checksum 0: none)."""
    udp = struct.pack(">HHHH", sport, dest[1], 8 + len(payload), 0) + payload
    header = struct.pack(">BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, socket.IPPROTO_UDP, 0,
                         socket.inet_aton(src), socket.inet_aton(dest[0]))
    return header + udp
