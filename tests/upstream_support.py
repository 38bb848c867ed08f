"""Fault-injection helpers for the upstream client tests: a throw-away PKI and small TLS servers.

Every server listens on 127.0.0.1 (random port), serves the certificate of a test CA for the
names it is given, records every request it receives (method, path, headers, SNI, time,
connection) and tracks how many requests it is handling at once. The client reaches it through
``upstream.address_overrides`` (``"reg.test" -> "127.0.0.1:<port>"``), exactly as an operator would.
"""
from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ipaddress
import socket
import ssl
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator, Awaitable, Callable, Iterator, Optional, Union

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from gateway.observability.metrics import Metrics
from gateway.settings import (CircuitSettings, HostLimitSettings, RetrySettings,
                              UpstreamSettings)
from gateway.upstream import UpstreamClient


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


@dataclass
class PKI:
    """A CA plus the PEM files a server and a client need."""

    directory: Path
    name: str = "upstream test CA"
    ca_key: ec.EllipticCurvePrivateKey = field(init=False)
    ca_cert: x509.Certificate = field(init=False)

    def __post_init__(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.ca_key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.timezone.utc)
        self.ca_cert = (
            x509.CertificateBuilder().subject_name(_name(self.name)).issuer_name(_name(self.name))
            .public_key(self.ca_key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                         crl_sign=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .sign(self.ca_key, hashes.SHA256()))
        self.ca_file = self.directory / "ca.pem"
        self.ca_file.write_bytes(self.ca_cert.public_bytes(serialization.Encoding.PEM))

    def server_context(self, names: list[str], sni_seen: Optional[list] = None) -> ssl.SSLContext:
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.timezone.utc)
        sans: list[x509.GeneralName] = []
        for n in names:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(n)))
            except ValueError:
                sans.append(x509.DNSName(n))
        cert = (
            x509.CertificateBuilder().subject_name(_name(names[0])).issuer_name(_name(self.name))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(self.ca_key, hashes.SHA256()))
        stem = self.directory / f"leaf-{x509.random_serial_number()}"
        cert_file, key_file = stem.with_suffix(".crt"), stem.with_suffix(".key")
        cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                               serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(cert_file, key_file)
        if sni_seen is not None:
            def on_sni(sslobj, server_name, context):  # noqa: ARG001
                sni_seen.append(server_name)
            ctx.sni_callback = on_sni
        return ctx


@dataclass
class Seen:
    method: str
    path_qs: str
    headers: dict
    host: str
    peer: str
    t: float


Handler = Callable[[web.Request, "FakeServer"], Awaitable[web.StreamResponse]]


class FakeServer:
    """A TLS HTTP server on 127.0.0.1 whose answers a test scripts with ``handler``."""

    def __init__(self, pki: Optional[PKI], names: list[str], handler: Handler) -> None:
        self.names = names
        self.handler = handler
        self.sni: list[str] = []
        self.ctx = pki.server_context(names, self.sni) if pki else None
        self.log: list[Seen] = []
        self.current = 0
        self.max_concurrent = 0
        self.peers: set[str] = set()
        self.port = 0
        self.state: dict = {}
        self._runner: Optional[web.AppRunner] = None

    @property
    def count(self) -> int:
        return len(self.log)

    def paths(self) -> list[str]:
        return [s.path_qs for s in self.log]

    async def _entry(self, request: web.Request) -> web.StreamResponse:
        peer = request.transport.get_extra_info("peername") if request.transport else None
        self.peers.add(str(peer))
        self.log.append(Seen(request.method, request.path_qs, dict(request.headers),
                             request.headers.get("Host", ""), str(peer), time.monotonic()))
        self.current += 1
        self.max_concurrent = max(self.max_concurrent, self.current)
        try:
            return await self.handler(request, self)
        finally:
            self.current -= 1

    async def start(self) -> "FakeServer":
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._entry)
        self._runner = web.AppRunner(app, shutdown_timeout=0.2, handle_signals=False,
                                     access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=self.ctx)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # noqa: SLF001
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"


def settings(overrides: dict[str, str], ca_file: Optional[Path], *,
             retry: Optional[dict] = None, circuit: Optional[dict] = None,
             limits: Optional[dict[str, dict]] = None, **kw) -> UpstreamSettings:
    """UpstreamSettings for tests: quick retries, small timeouts, generous default limits."""
    r = dict(attempts=4, base_delay=0.02, max_delay=0.2, retry_after_min=0.05,
             retry_after_max=5, deadline=10, resume_attempts=3)
    r.update(retry or {})
    c = dict(failure_threshold=5, open_for=30, long_retry_after=60, max_open_for=3600)
    c.update(circuit or {})
    lim = {"default": dict(rate=1000, burst=1000, max_concurrency=32, queue_size=1000,
                           queue_timeout=10)}
    for host, values in (limits or {}).items():
        base = dict(lim["default"])
        base.update(values)
        lim[host] = base
    kw.setdefault("connect_timeout", 2)
    kw.setdefault("read_timeout", 5)
    return UpstreamSettings(
        ca_bundle=str(ca_file) if ca_file else None, address_overrides=overrides,
        retry=RetrySettings(**r), circuit=CircuitSettings(**c),
        limits={h: HostLimitSettings(**v) for h, v in lim.items()}, **kw)


def new_client(s: UpstreamSettings, hosts: list[str], **kw) -> tuple[UpstreamClient, Metrics]:
    metrics = Metrics(known_hosts=hosts)
    return UpstreamClient(s, metrics, **kw), metrics


def sample(metrics: Metrics, name: str, **labels) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return value or 0.0


def dead_port() -> int:
    """A loopback port nothing listens on (bound, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def stop_all(*servers: FakeServer) -> None:
    await asyncio.gather(*(s.stop() for s in servers), return_exceptions=True)


@dataclass
class Rig:
    """A started client and its servers; unpacks as ``client, metrics, srv`` (the first server)."""

    client: UpstreamClient
    metrics: Metrics
    servers: dict[str, FakeServer]

    @property
    def srv(self) -> FakeServer:
        return next(iter(self.servers.values()))

    def __iter__(self) -> Iterator:
        return iter((self.client, self.metrics, self.srv if self.servers else None))


@contextlib.asynccontextmanager
async def upstream(pki: Optional[PKI], servers: dict[str, Union[Handler, FakeServer]], *,
                   overrides: Optional[dict[str, str]] = None,
                   known: Optional[list[str]] = None, client_kw: Optional[dict] = None,
                   **settings_kw) -> AsyncIterator[Rig]:
    """The scaffold of an upstream test: one TLS server per host (a handler, or a FakeServer
    built by the test for other names or another CA, possibly serving several hosts), reached
    through address overrides; a started client with :func:`settings` (``settings_kw``);
    everything stopped after."""
    started: dict[str, FakeServer] = {}
    try:
        for host, spec in servers.items():
            srv = spec if isinstance(spec, FakeServer) else FakeServer(pki, [host], spec)
            started[host] = srv if srv.port else await srv.start()
        addresses = {host: srv.addr for host, srv in started.items()}
        addresses.update(overrides or {})
        client, metrics = new_client(settings(addresses, pki.ca_file if pki else None,
                                              **settings_kw),
                                     known if known is not None else list(addresses),
                                     **(client_kw or {}))
        await client.start()
        try:
            yield Rig(client, metrics, started)
        finally:
            await client.close()
    finally:
        await stop_all(*{id(s): s for s in started.values()}.values())


# -- fixtures (imported by the test modules; there is no shared conftest for these) -----------
import pytest  # noqa: E402


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return PKI(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def other_pki(tmp_path_factory):
    return PKI(tmp_path_factory.mktemp("pki-untrusted"), name="untrusted CA")


def GET(url: str, **kw) -> "UpstreamRequest":
    from multidict import CIMultiDict

    from gateway.upstream import UpstreamRequest
    headers = CIMultiDict(kw.pop("headers", {}))
    return UpstreamRequest("GET", url, headers=headers, **kw)
