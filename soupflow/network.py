"""What the operator allows on the network: cleartext listeners and egress destinations.

Upstream: cli (`run --allow-cleartext`, `--allowed-tcp`, `--allowed-http`; `validate` takes
the same), runtime (refuses a cleartext listener on a non-loopback address; checks every
workflow's destinations at load), activities (check each destination again at send time,
after `${}` expansion, and connect to the address that was checked).

Set by the operator only, never by a workflow file. Loopback is always allowed. Entries:
`host`, `host:port`, `[v6]:port`, an address, `CIDR` and `CIDR:port`; for HTTP also a URL
prefix (`https://pacs.example.org/dicom-web/`). A name is resolved once per connection and
the connection goes to an address that was checked, so a name that changes meanwhile (DNS
rebinding) cannot move it elsewhere.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from soupflow.pipeline.errors import PermanentError

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class EgressError(PermanentError):
    """A destination the operator did not allow (the text names host and port only): the
    message is dead, since retrying will not change the operator's list."""


def is_loopback(host: str) -> bool:
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class CleartextPorts:
    """`--allow-cleartext PORTS|*`: ports whose listener may be cleartext off loopback."""

    ports: frozenset[int] = frozenset()
    every: bool = False

    @classmethod
    def parse(cls, text: str) -> CleartextPorts:
        parts = [part.strip() for part in text.split(",") if part.strip()]
        if "*" in parts:
            return cls(every=True)
        try:
            return cls(frozenset(int(part) for part in parts))
        except ValueError:
            raise ValueError(f"--allow-cleartext takes port numbers or *, not {text!r}") from None

    def allows(self, port: int) -> bool:
        return self.every or port in self.ports

    def __str__(self) -> str:
        if self.every:
            return "*"
        return ",".join(map(str, sorted(self.ports))) or "none"


@dataclass(frozen=True)
class _Entry:
    text: str
    name: str | None = None  # a host name (lower case)
    network: IpNetwork | None = None
    port: int | None = None  # None: any port
    url_prefix: str | None = None

    def matches_name(self, host: str, port: int) -> bool:
        return self.name is not None and self.name == host.lower() and self._port(port)

    def matches_address(self, address: IpAddress, port: int) -> bool:
        return self.network is not None and address in self.network and self._port(port)

    def _port(self, port: int) -> bool:
        return self.port is None or self.port == port


def _entry(text: str, urls: bool) -> _Entry:
    raw = text.strip()
    if urls and raw.lower().startswith(("http://", "https://")):
        return _Entry(raw, url_prefix=_normal_url(raw))
    host, port = raw, None
    if raw.startswith("["):  # [v6] or [v6]:port
        close = raw.find("]")
        if close < 0:
            raise ValueError(f"{raw!r}: a [ without its ]")
        host, rest = raw[1:close], raw[close + 1 :]
        if rest:
            port = _port(rest.removeprefix(":"), raw)
    elif raw.count(":") == 1:  # host:port, address:port or CIDR:port
        host, _, tail = raw.partition(":")
        port = _port(tail, raw)
    try:
        return _Entry(raw, network=ipaddress.ip_network(host, strict=False), port=port)
    except ValueError:
        pass
    if not host or any(char in host for char in "/ *"):
        raise ValueError(f"{raw!r} is not a host, host:port, address, CIDR or CIDR:port")
    return _Entry(raw, name=host.lower().rstrip("."), port=port)


def _port(text: str, entry: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"{entry!r}: {text!r} is not a port")
    return int(text)


def _normal_url(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme.lower()}://{parts.netloc.lower()}{parts.path}"


@dataclass(frozen=True)
class Allowlist:
    """One of `--allowed-tcp` / `--allowed-http`; empty allows loopback only (fail closed)."""

    entries: tuple[_Entry, ...] = ()
    option: str = "--allowed-tcp"

    @classmethod
    def parse(cls, items: Iterable[str], option: str, urls: bool = False) -> Allowlist:
        entries = []
        for item in items:
            for part in item.split(","):
                if part.strip():
                    try:
                        entries.append(_entry(part, urls))
                    except ValueError as exc:
                        raise ValueError(f"{option}: {exc}") from None
        return cls(tuple(entries), option)

    def __str__(self) -> str:
        return ", ".join(entry.text for entry in self.entries) or "loopback only"

    def allows_url(self, url: str) -> bool:
        normal = _normal_url(url)
        return any(e.url_prefix and normal.startswith(e.url_prefix) for e in self.entries)

    def allowed_without_lookup(self, host: str, port: int) -> bool | None:
        """True or False when the text of `host` decides; None when its addresses must."""
        host = host.strip().strip("[]")
        if is_loopback(host):
            return True
        if any(entry.matches_name(host, port) for entry in self.entries):
            return True
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return None if any(entry.network for entry in self.entries) else False
        return any(entry.matches_address(address, port) for entry in self.entries)

    def address(self, host: str, port: int, approved: bool = False) -> str:
        """The address to connect to: `host` resolved once and checked (`approved`: by a URL
        prefix already); EgressError if no address of it is allowed or it does not resolve."""
        bare = host.strip().strip("[]")
        by_name = (
            approved or is_loopback(bare) or any(e.matches_name(bare, port) for e in self.entries)
        )
        try:
            found = socket.getaddrinfo(bare, port, type=socket.SOCK_STREAM)
        except OSError:
            raise EgressError(f"{host}:{port} does not resolve") from None
        for *_, sockaddr in found:
            address = ipaddress.ip_address(str(sockaddr[0]).split("%")[0])
            if by_name or address.is_loopback:
                return str(address)
            if any(entry.matches_address(address, port) for entry in self.entries):
                return str(address)
        raise EgressError(f"{host}:{port} is not allowed by {self.option} ({self})")


@dataclass(frozen=True)
class Egress:
    """Both allowlists, as the operator set them."""

    tcp: Allowlist = field(default_factory=Allowlist)
    http: Allowlist = field(default_factory=lambda: Allowlist(option="--allowed-http"))
