"""Name resolution for upstream connections: operator address overrides and the SSRF guard.

aiohttp connects to the ``host``/``port`` a resolver returns while it keeps the URL's host for
the Host header and for SNI / certificate verification. So an override ``ghcr.io: 10.0.0.5:8443``
is a resolver answer ``(10.0.0.5, 8443)`` for ``ghcr.io``: Host and SNI stay ``ghcr.io``, the
port comes from the override, not from the URL.

The guard (``address_guard(host, ip) -> reason | None``, from the policy layer) is applied to
every address a name resolves to, i.e. to the address actually connected to (no DNS-rebinding
gap between check and connect). Addresses chosen by the operator (overrides, the parent proxy)
are not guarded.
"""
from __future__ import annotations

import ipaddress
import socket
from typing import Callable, Mapping, Optional

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

AddressGuard = Callable[[str, str], Optional[str]]


class GuardRefused(OSError):
    """Every address of a host was refused by the SSRF guard."""

    def __init__(self, host: str, reason: str) -> None:
        super().__init__(f"connection to {host} refused by address guard: {reason}")
        self.host = host
        self.reason = reason


def split_override(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host.strip("[]"), int(port)


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


class OverrideResolver(AbstractResolver):
    def __init__(self, overrides: Mapping[str, str], guard: Optional[AddressGuard] = None,
                 trusted_hosts: tuple[str, ...] = (), inner: Optional[AbstractResolver] = None):
        self._overrides = {k.lower(): split_override(v) for k, v in overrides.items()}
        self._guard = guard
        self._trusted = {h.lower() for h in trusted_hosts if h}
        self._inner = inner

    def override_for(self, host: str, port: Optional[int] = None) -> Optional[tuple[str, int]]:
        host = host.lower().rstrip(".")
        if port is not None and f"{host}:{port}" in self._overrides:
            return self._overrides[f"{host}:{port}"]
        return self._overrides.get(host)

    def _resolver(self) -> AbstractResolver:
        if self._inner is None:
            self._inner = DefaultResolver()
        return self._inner

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        override = self.override_for(host, port)
        if override is not None:
            target, oport = override
            if is_ip(target):
                fam = socket.AF_INET6 if ":" in target else socket.AF_INET
                return [{"hostname": host, "host": target, "port": oport, "family": fam,
                         "proto": 0, "flags": socket.AI_NUMERICHOST}]
            infos = await self._resolver().resolve(target, oport, family)
            return [dict(i, hostname=host, port=oport) for i in infos]  # type: ignore[misc]
        infos = await self._resolver().resolve(host, port, family)
        return self.check(host, infos)

    def check(self, host: str, infos: list[ResolveResult]) -> list[ResolveResult]:
        if self._guard is None or host.lower().rstrip(".") in self._trusted:
            return infos
        allowed, reason = [], ""
        for info in infos:
            why = self._guard(host, info["host"])
            if why is None:
                allowed.append(info)
            else:
                reason = why
        if not allowed:
            raise GuardRefused(host, reason or "no address allowed")
        return allowed

    def check_literal(self, host: str) -> Optional[str]:
        """Guard verdict for a URL whose host is an IP literal (aiohttp skips the resolver)."""
        if self._guard is None or self.override_for(host) is not None:
            return None
        return self._guard(host, host.strip("[]"))

    async def close(self) -> None:
        if self._inner is not None:
            await self._inner.close()
