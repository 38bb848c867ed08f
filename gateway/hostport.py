"""Upstream identity: ``host[:port]``, the port written only when it is not the scheme's default.

A registry is an origin, not a host name: ``registry.corp:5000`` and ``registry.corp`` are two
registries (other content, other tokens, other circuits). Everything that names an upstream —
``cache.oci.registries``, failover groups, cache keys, token caches, circuits and limiters,
credentials, metric host labels — uses the same spelling so they agree with each other and with
the configuration: lower-case host, IPv6 literals in brackets, ``:port`` only for a non-default
port (``registry.test:443`` is ``registry.test``). The spelling is the one Docker and Trivy use in
image references (``registry.test:5443/aquasec/trivy-db:2``).
"""
from __future__ import annotations

import ipaddress
from typing import Optional, Union

from yarl import URL

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]

DEFAULT_PORTS = {"http": 80, "https": 443}


def join_authority(host: str, port: Optional[int], scheme: str = "https") -> str:
    """``host`` or ``host:port`` (IPv6 in brackets); the scheme's default port is left out."""
    h = host.lower().rstrip(".")
    if ":" in h and not h.startswith("["):
        h = f"[{h}]"
    if port is None or DEFAULT_PORTS.get(scheme) == port:
        return h
    return f"{h}:{port}"


def url_authority(url: URL | str) -> str:
    """The upstream identity of a URL (``https://Registry.Test:5443/v2/`` → ``registry.test:5443``)."""
    u = url if isinstance(url, URL) else URL(url, encoded=True)
    return join_authority(u.host or "", u.port, u.scheme)


def split_authority(text: str) -> tuple[str, Optional[int]]:
    """``host[:port]`` → (host without brackets, port or None). Raises ValueError when malformed."""
    text = text.strip()
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"unterminated IPv6 address in {text!r}")
        host, rest = text[1:end], text[end + 1:]
        if rest and not rest.startswith(":"):
            raise ValueError(f"unexpected {rest!r} after the IPv6 address in {text!r}")
        port_text = rest[1:] if rest else None
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            host, port_text = text, None
        elif ":" in host:
            raise ValueError(f"IPv6 addresses must be in brackets: {text!r}")
    if not host or any(c in host for c in "/@ ?#"):
        raise ValueError(f"{text!r} is not host or host:port")
    if port_text is None:
        return host, None
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"bad port {port_text!r} in {text!r}")
    return host, int(port_text)


def canonical_authority(text: str, scheme: str = "https") -> str:
    """The one spelling of ``host[:port]`` (see the module docstring). Raises ValueError."""
    host, port = split_authority(text)
    return join_authority(host, port, scheme)


def registry_problem(text: str) -> Optional[str]:
    """Why ``text`` is not a registry as the gateway spells it, or None (for config errors)."""
    if "://" in text:
        return f"{text!r}: write the registry as host or host:port, without a scheme"
    try:
        canonical = canonical_authority(text)
    except ValueError as exc:
        return str(exc)
    if canonical != text:
        return f"{text!r}: write it as {canonical!r} (lower case, no default :443)"
    return None


def repository_problem(entry: str) -> Optional[str]:
    """Why ``entry`` is not ``registry/repository`` (``registry.corp:5000/team/db``), or None."""
    registry, _, repository = entry.partition("/")
    if not repository.strip("/") or "://" in entry:
        return f"{entry!r}: expected registry/repository, e.g. registry.corp:5000/team/trivy-db"
    return registry_problem(registry)


def normalize_host(host: str) -> str:
    """Lower-case, without a trailing dot or IPv6 brackets; IP literals in canonical form."""
    host = host.strip().lower()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    host = host.rstrip(".") if host != "." else host
    ip = parse_ip(host)
    return str(ip) if ip is not None else host


def parse_ip(value: object) -> Optional[IPAddress]:
    if isinstance(value, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        return value
    if not isinstance(value, str):
        return None
    text = value.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    text = text.split("%", 1)[0]  # a zone index does not change the category
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None
