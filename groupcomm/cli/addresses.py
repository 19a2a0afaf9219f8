"""``HOST:PORT`` options of the command line (an HTTP server's, the metrics port's), checked in one place."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from groupcomm.cli.errors import UsageError

__all__ = ["HostPort", "parse_host_port"]


@dataclass(frozen=True)
class HostPort:
    """An IP address (``localhost`` becomes 127.0.0.1) and a port (0: any free one)."""

    host: str
    port: int

    def bind(self) -> str:
        """``host:port``, an IPv6 address in brackets."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_host_port(text: str, *, option: str, allow_remote: bool = False, remote_advice: str = "") -> HostPort:
    """``HOST:PORT`` given to ``option`` -> :class:`HostPort`; UsageError naming the option if it is
    malformed, or not a loopback address without ``allow_remote`` (``remote_advice`` says how to allow it)."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise UsageError(f"{option} {text!r}: expected HOST:PORT, e.g. 127.0.0.1:8001")
    port = int(port_text)
    if port > 65535:
        raise UsageError(f"{option} {text!r}: port must be in 0..65535")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if host == "localhost":
        host = "127.0.0.1"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise UsageError(f"{option} {text!r}: HOST must be an IP address or localhost") from None
    if not address.is_loopback and not allow_remote:
        raise UsageError(f"{option} {text!r} is not a loopback address" + (f": {remote_advice}" if remote_advice else ""))
    return HostPort(str(address), port)
