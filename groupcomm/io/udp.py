"""UDP sockets for the ring: one unicast socket (tokens, and the source of our
multicasts, so peers learn our unicast address from any packet), one socket
joined to the multicast group.

Everything here is synchronous socket setup; the trio driver in
:mod:`groupcomm.io.channel` does the waiting.
"""

from __future__ import annotations

import ipaddress
import socket
import sys
from dataclasses import dataclass
from typing import Literal

from groupcomm.config import Duration, Size
from groupcomm.errors import ConfigError

PUMPS = ("auto", "c", "trio")
"""Who drives the sockets: ``"c"`` (the C socket pump, :mod:`groupcomm.io.pump`: a thread
that runs the ring's hot path and wakes Python only for deliveries, views, FD and probe
packets), ``"trio"`` (Python: the reference driver, one trio wake-up per datagram batch),
or ``"auto"`` (the default: ``"c"`` where the pump is built -- Linux -- else ``"trio"``)."""


def resolve_pump(pump: str) -> str:
    """The driver ``pump`` names: ``"auto"`` becomes ``"c"`` where the C pump exists."""
    if pump != "auto":
        return pump
    return "c" if sys.platform.startswith("linux") else "trio"

__all__ = ["PUMPS", "UdpConfig", "UdpSockets", "UdpuConfig", "open_sockets", "open_unicast", "parse_host", "resolve_pump"]


@dataclass(frozen=True)
class UdpConfig:
    """Addresses and socket settings of the UDP transport."""

    bind_addr: str = "127.0.0.1"
    """Local address for the unicast socket (and the interface multicast uses)."""
    port: int = 0
    """Unicast port; 0 picks a free one (peers learn it from our packets)."""
    mcast_addr: str = "239.192.0.77"
    """IP multicast group shared by the cluster (IPv4 or IPv6)."""
    mcast_port: int = 45588
    """UDP port of the multicast group; every member of the cluster uses the same one."""
    mcast_ttl: int = 1
    """Multicast hops: 0 keeps traffic on this host, 1 on the LAN."""
    recv_buffer: Size = 4 << 20
    """Socket receive buffer asked of the kernel (capped by ``net.core.rmem_max`` unless run as root)."""
    send_buffer: Size = 4 << 20
    """Socket send buffer asked of the kernel (capped by ``net.core.wmem_max`` unless run as root)."""
    pump: Literal["auto", "c", "trio"] = "auto"
    """Socket driver: ``"c"`` (the C socket pump thread), ``"trio"`` (Python), or ``"auto"``
    (``"c"`` where the pump is built -- Linux -- else ``"trio"``)."""
    mcast_loop: bool = True
    """Loop our multicasts back to this host, for other members on it.  With one member
    per host turn it off: the member then no longer receives (and drops) a copy of each
    datagram it sends."""

    def __post_init__(self) -> None:
        _check_pump("UDP", self.pump)
        if not isinstance(self.mcast_loop, bool):
            raise ConfigError(f"UDP: mcast_loop must be true or false, not {self.mcast_loop!r}")
        try:
            bind = ipaddress.ip_address(self.bind_addr)
            group = ipaddress.ip_address(self.mcast_addr)
        except ValueError as exc:
            raise ConfigError(f"UDP: {exc}") from None
        if not group.is_multicast:
            raise ConfigError(f"UDP: mcast_addr {self.mcast_addr} is not a multicast address")
        if bind.version != group.version:
            raise ConfigError(f"UDP: bind_addr {self.bind_addr} and mcast_addr {self.mcast_addr} mix IPv4 and IPv6")
        for name in ("port", "mcast_port"):
            if not 0 <= getattr(self, name) <= 65535:
                raise ConfigError(f"UDP: {name} must be in 0..65535, got {getattr(self, name)}")
        if not 0 <= self.mcast_ttl <= 255:
            raise ConfigError(f"UDP: mcast_ttl must be in 0..255, got {self.mcast_ttl}")

    @property
    def family(self) -> int:
        return socket.AF_INET6 if ":" in self.mcast_addr else socket.AF_INET


def _check_pump(layer: str, pump: str) -> None:
    if pump not in PUMPS:
        raise ConfigError(f"{layer}: pump must be one of {', '.join(map(repr, PUMPS))}, not {pump!r}")


@dataclass
class UdpSockets:
    unicast: socket.socket
    multicast: socket.socket
    group: tuple

    @property
    def address(self) -> tuple:
        return self.unicast.getsockname()

    def close(self) -> None:
        self.unicast.close()
        if self.multicast is not None:
            self.multicast.close()


_FORCE = {socket.SO_RCVBUF: getattr(socket, "SO_RCVBUFFORCE", None), socket.SO_SNDBUF: getattr(socket, "SO_SNDBUFFORCE", None)}


def _buffers(sock: socket.socket, cfg: UdpConfig) -> None:
    """Ask for the configured buffer sizes; the kernel caps them at net.core.[rw]mem_max
    unless we may override the cap (root, via SO_*BUFFORCE)."""
    for opt, size in ((socket.SO_RCVBUF, cfg.recv_buffer), (socket.SO_SNDBUF, cfg.send_buffer)):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, size)
            force = _FORCE[opt]
            if force is not None and sock.getsockopt(socket.SOL_SOCKET, opt) < size:
                sock.setsockopt(socket.SOL_SOCKET, force, size)
        except OSError:  # not permitted: keep what the kernel granted
            pass


def open_sockets(cfg: UdpConfig) -> UdpSockets:
    """Create and configure both sockets (non-blocking)."""
    fam = cfg.family
    uni = socket.socket(fam, socket.SOCK_DGRAM)
    mc = socket.socket(fam, socket.SOCK_DGRAM)
    try:
        uni.bind((cfg.bind_addr, cfg.port))
        _buffers(uni, cfg)
        mc.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if hasattr(socket, "SO_REUSEPORT"):
            mc.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        _buffers(mc, cfg)
        if fam == socket.AF_INET:
            mc.bind((cfg.mcast_addr, cfg.mcast_port))
            iface = socket.inet_aton(cfg.bind_addr)
            mc.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, socket.inet_aton(cfg.mcast_addr) + iface)
            uni.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, iface)
            uni.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, cfg.mcast_ttl)
            uni.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, int(cfg.mcast_loop))
            group = (cfg.mcast_addr, cfg.mcast_port)
        else:
            index = socket.if_nametoindex("lo") if cfg.bind_addr == "::1" else 0
            mc.bind(("", cfg.mcast_port))
            mreq = socket.inet_pton(socket.AF_INET6, cfg.mcast_addr) + index.to_bytes(4, "little")
            mc.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP, mreq)
            uni.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, index)
            uni.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, cfg.mcast_ttl)
            uni.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_LOOP, int(cfg.mcast_loop))
            group = (cfg.mcast_addr, cfg.mcast_port, 0, index)
        uni.setblocking(False)
        mc.setblocking(False)
        return UdpSockets(uni, mc, group)
    except OSError as exc:
        uni.close()
        mc.close()
        raise ConfigError(f"UDP: cannot open sockets on {cfg.bind_addr} / {cfg.mcast_addr}:{cfg.mcast_port}: {exc}") from exc


@dataclass(frozen=True)
class UdpuConfig:
    """Unicast-only UDP (no multicast): "send to all" goes to every known member.

    Members are known from ``hosts`` (a static list), from ``discovery_dir`` (a
    directory shared by the members, e.g. on NFS, where each registers its
    address), and from the source of every packet received.
    """

    bind_addr: str = "127.0.0.1"
    """Local address of our socket (IPv4 or IPv6)."""
    port: int = 45600
    """Our port; fixed, so that the others can list it."""
    hosts: tuple[str, ...] = ()
    """``host:port`` of the members (ours may be listed too)."""
    discovery_dir: str = ""
    """A shared directory where members register; empty: not used."""
    rescan: Duration = 1.0
    """How often the discovery directory is read again."""
    recv_buffer: Size = 4 << 20
    """Socket receive buffer asked of the kernel (capped by ``net.core.rmem_max`` unless run as root)."""
    send_buffer: Size = 4 << 20
    """Socket send buffer asked of the kernel (capped by ``net.core.wmem_max`` unless run as root)."""
    pump: Literal["auto", "c", "trio"] = "auto"
    """Socket driver: ``"c"`` (the C socket pump thread), ``"trio"`` (Python), or ``"auto"``
    (``"c"`` where the pump is built -- Linux -- else ``"trio"``)."""

    def __post_init__(self) -> None:
        _check_pump("UDPU", self.pump)
        try:
            ipaddress.ip_address(self.bind_addr)
        except ValueError as exc:
            raise ConfigError(f"UDPU: {exc}") from None
        if not 1 <= self.port <= 65535:
            raise ConfigError(f"UDPU: port must be in 1..65535, got {self.port}")
        hosts = tuple(h.strip() for h in self.hosts if h.strip())
        for h in hosts:
            parse_host(h)
        object.__setattr__(self, "hosts", hosts)
        if not self.hosts and not self.discovery_dir:
            raise ConfigError("UDPU: list the members in hosts, or give a discovery_dir (or both)")
        if self.rescan <= 0:
            raise ConfigError("UDPU: rescan must be > 0")

    @property
    def family(self) -> int:
        return socket.AF_INET6 if ":" in self.bind_addr else socket.AF_INET


def parse_host(text: str) -> tuple[str, int]:
    """``"10.0.0.5:45600"`` or ``"[::1]:45600"`` -> (address, port); names are resolved."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ConfigError(f"UDPU: host {text!r} must be address:port")
    host = host.strip("[]")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        try:
            host = socket.getaddrinfo(host, None, type=socket.SOCK_DGRAM)[0][4][0]
        except OSError as exc:
            raise ConfigError(f"UDPU: cannot resolve {text!r}: {exc}") from None
    return host, int(port)


def open_unicast(cfg: UdpuConfig) -> UdpSockets:
    """The single socket of the unicast-only transport (non-blocking)."""
    sock = socket.socket(cfg.family, socket.SOCK_DGRAM)
    try:
        sock.bind((cfg.bind_addr, cfg.port))
        _buffers(sock, cfg)  # type: ignore[arg-type]
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"UDPU: cannot bind {cfg.bind_addr}:{cfg.port}: {exc}") from exc
    return UdpSockets(sock, None, None)  # type: ignore[arg-type]
