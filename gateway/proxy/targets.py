"""Parsing of request targets: CONNECT authority-form, absolute-form URLs and Host headers."""
from __future__ import annotations

import re
from typing import Optional

from ..policy.rules import normalize_host, parse_ip

_LABEL = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
_HOSTNAME = re.compile(rf"^{_LABEL}(?:\.{_LABEL})*\.?$")
#: a host name (not an IP literal: it has a character other than digits and dots) that
#: normalize_host would only strip of its trailing dot
_PLAIN_NAME = re.compile(rf"(?=[0-9.]*[a-z_-]){_LABEL}(?:\.{_LABEL})*\.?")
_ABSOLUTE = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://([^/?#]*)([^#]*)(?:#.*)?$")
DEFAULT_PORTS = {"http": 80, "https": 443}


class TargetError(ValueError):
    """A request target or Host header the gateway cannot use; the message says why."""


def valid_host(host: str) -> bool:
    if not host or len(host) > 253:
        return False
    if _HOSTNAME.match(host):                    # most hosts: no ipaddress parse (it raises)
        return True
    return parse_ip(host) is not None


def parse_authority(text: str, default_port: Optional[int] = None) -> tuple[str, int]:
    """``host:port`` / ``[v6]:port`` (port optional when ``default_port`` is given)."""
    if not text:
        raise TargetError("empty host")
    if "@" in text:
        raise TargetError("user information is not allowed in the target")
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise TargetError(f"unterminated IPv6 address in {text!r}")
        host, rest = text[1:end], text[end + 1:]
        if parse_ip(host) is None or ":" not in host:
            raise TargetError(f"{host!r} is not an IPv6 address")
        if rest and not rest.startswith(":"):
            raise TargetError(f"unexpected {rest!r} after the IPv6 address")
        port_text = rest[1:] if rest else ""
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            host, port_text = text, ""
        if ":" in host:
            raise TargetError(f"IPv6 addresses must be in brackets: {text!r}")
    if port_text == "":
        if default_port is None:
            raise TargetError(f"missing port in {text!r} (expected host:port)")
        port = default_port
    else:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise TargetError(f"bad port {port_text!r}")
        port = int(port_text)
    host = host.lower()
    if len(host) <= 253 and _PLAIN_NAME.fullmatch(host):
        return host.rstrip("."), port            # what valid_host + normalize_host would give
    if not valid_host(host):
        raise TargetError(f"{host!r} is not a valid host name")
    return normalize_host(host), port


def parse_absolute(target: str) -> tuple[str, str, int, str]:
    """``http://host[:port]/path?q`` → (scheme, host, port, origin-form target)."""
    m = _ABSOLUTE.match(target)
    if not m:
        raise TargetError(f"not an absolute URL: {target[:100]!r}")
    scheme = m.group(1).lower()
    if scheme not in DEFAULT_PORTS:
        raise TargetError(f"unsupported scheme {scheme!r}")
    host, port = parse_authority(m.group(2), DEFAULT_PORTS[scheme])
    rest = m.group(3)
    if not rest.startswith("/"):
        rest = "/" + rest
    return scheme, host, port, rest


def is_absolute(target: str) -> bool:
    return "://" in target[:16] and bool(_ABSOLUTE.match(target))


def authority(host: str, port: int, scheme: str) -> str:
    h = f"[{host}]" if ":" in host else host
    return h if DEFAULT_PORTS.get(scheme) == port else f"{h}:{port}"
