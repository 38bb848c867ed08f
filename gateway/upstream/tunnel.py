"""Raw TCP connections for the proxy's blind-tunnel mode.

Same routing rules as requests: an operator address override wins (direct, unguarded); otherwise
the parent proxy when one is configured (``CONNECT host:port``); otherwise the name is resolved
and every candidate address passes the SSRF guard before it is connected to.
"""
from __future__ import annotations

import asyncio
import base64
import socket
from urllib.parse import urlsplit

from ..settings import UpstreamSettings
from .failure import describe
from .resolver import GuardRefused, OverrideResolver, is_ip
from .types import Reason, UpstreamError

_HEAD_LIMIT = 64 * 1024


async def open_tunnel(settings: UpstreamSettings, resolver: OverrideResolver, host: str,
                      port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host = host.lower().rstrip(".")
    timeout = float(settings.connect_timeout)
    override = resolver.override_for(host, port)
    try:
        async with asyncio.timeout(timeout):
            if override is not None:
                return await asyncio.open_connection(override[0], override[1])
            parent = settings.parent_proxy
            if parent.url and not parent.bypasses(host):
                if is_ip(host):
                    why = resolver.check_literal(host)
                    if why:
                        raise GuardRefused(host, why)
                return await _via_parent(parent.url, parent.username, parent.password, host, port)
            if is_ip(host):
                why = resolver.check_literal(host)
                if why:
                    raise GuardRefused(host, why)
                return await asyncio.open_connection(host.strip("[]"), port)
            infos = await resolver.resolve(host, port, socket.AF_UNSPEC)
            last: Exception | None = None
            for info in infos:
                try:
                    return await asyncio.open_connection(info["host"], info["port"])
                except OSError as exc:
                    last = exc
            raise last or OSError(f"{host} has no address")
    except GuardRefused as exc:
        raise UpstreamError(Reason.SSRF, host, exc.reason, status=403) from None
    except TimeoutError:
        raise UpstreamError(Reason.TIMEOUT, host, f"connecting to {host}:{port} took longer than "
                            f"{timeout:.0f}s", status=504) from None
    except UpstreamError:
        raise
    except OSError as exc:
        raise UpstreamError(Reason.CONNECT, host, f"cannot connect to {host}:{port}: "
                            f"{describe(exc)}", status=502) from None


async def _via_parent(url: str, username: str, password: str, host: str, port: int
                      ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    parts = urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port or 80)
    authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    lines = [f"CONNECT {authority} HTTP/1.1", f"Host: {authority}"]
    if username:
        cred = base64.b64encode(f"{username}:{password}".encode()).decode("ascii")
        lines.append(f"Proxy-Authorization: Basic {cred}")
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
    await writer.drain()
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
        writer.close()
        raise OSError(f"parent proxy closed or sent a bad answer to CONNECT: {exc}") from None
    status_line = head.split(b"\r\n", 1)[0].decode("latin-1", "replace")
    fields = status_line.split(" ", 2)
    if len(fields) < 2 or fields[1] != "200":
        writer.close()
        raise UpstreamError(Reason.CONNECT, host, f"parent proxy refused CONNECT {authority}: "
                            f"{status_line}", status=502)
    return reader, writer
