"""aiohttp client helpers reaching the emulated hosts by name.

``world_session(world)`` returns a ClientSession whose resolver maps each
emulated hostname to ``127.0.0.1:port_of(host)`` (SNI and Host stay the real
hostname) and which trusts only the world's CA - the same two seams the
gateway uses (address overrides + upstream CA bundle).
"""

from __future__ import annotations

import socket
import ssl
from typing import Any

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult


class OverrideResolver(AbstractResolver):
    def __init__(self, overrides: dict[str, str]) -> None:
        self.overrides = {h.lower(): a for h, a in overrides.items()}

    async def resolve(self, host: str, port: int = 0, family: int = socket.AF_INET) -> list[ResolveResult]:
        # a world host on a non-default port is keyed host:port (registry.test:5443)
        addr = self.overrides.get(f"{host.lower()}:{port}") or self.overrides.get(host.lower())
        if addr is None:
            raise OSError(f"emulated world: no override for {host!r}")
        ip, _, p = addr.rpartition(":")
        return [ResolveResult(hostname=host, host=ip, port=int(p), family=socket.AF_INET, proto=0,
                              flags=socket.AI_NUMERICHOST)]

    async def close(self) -> None:
        return None


def world_ssl_context(ca_pem: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca_pem))
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def world_session(world: Any, **kw: Any) -> aiohttp.ClientSession:
    """ClientSession for *world* (a World or WorldThread)."""
    connector = aiohttp.TCPConnector(
        resolver=OverrideResolver(world.address_overrides),
        ssl=world_ssl_context(str(world.ca_pem)),
        force_close=kw.pop("force_close", False),
    )
    kw.setdefault("timeout", aiohttp.ClientTimeout(total=60))
    kw.setdefault("auto_decompress", False)
    return aiohttp.ClientSession(connector=connector, **kw)
