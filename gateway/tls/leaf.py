"""Leaf certificates for intercepted hosts, minted on demand and kept in a bounded LRU.

Every leaf shares one ECDSA P-256 key pair generated when the issuer starts (per process, never
written to disk), so minting is one signature (~60 µs) rather than a key generation. The
server-side context built around it costs more (~0.7 ms: a fresh ``SSL_CTX`` and a PEM parse),
so the proxy asks through :meth:`LeafIssuer.acontext_for`, which builds a missing entry in a
worker thread — a storm of distinct names under a ``*.suffix`` rule must not stall every other
connection on the event loop — and only once per name however many connections ask at the same
time (single flight); the LRU (``tls.leaf_cache_size``) bounds what is kept. Each leaf
carries the host as a SAN (DNS name or IP address: Go ignores the CN), the serverAuth EKU, the
CA's key identifier as AKI, and a validity of ``tls.leaf_validity`` backdated by an hour for
clients whose clocks run slow. The server-side :class:`ssl.SSLContext` built for a leaf is cached
with it: building a context costs more than a cache lookup and it can be shared by any number of
connections.

Python's ``SSLContext.load_cert_chain`` only reads files, so the PEM (leaf + CA chain + key) is
handed over through an anonymous in-memory file (``memfd_create``) on Linux; elsewhere through a
temporary file in a private directory, removed at once.
"""
from __future__ import annotations

import asyncio
import datetime as dt
import os
import ssl
import tempfile
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ..hostport import normalize_host, parse_ip
from .ca import CertificateAuthority

#: clocks of clients may lag; a leaf is valid from this long before it was minted
BACKDATE = dt.timedelta(hours=1)
#: leaf builds run here, not in the loop's default executor: a mint must never queue behind
#: slow work others put there (DNS lookups, file operations), and two threads are plenty for
#: ~1 ms jobs that mostly hold the GIL anyway
_MINT_POOL = ThreadPoolExecutor(max_workers=2, thread_name_prefix="leaf-mint")


@dataclass
class _Leaf:
    cert: x509.Certificate
    not_after: float              # epoch seconds
    context: ssl.SSLContext


class LeafIssuer:
    """``LeafIssuer(ca, settings, metrics)``; ``settings`` is Settings or TLSSettings."""

    def __init__(self, ca: CertificateAuthority, settings, metrics=None) -> None:
        self.ca = ca
        tls = getattr(settings, "tls", settings)
        self.validity = dt.timedelta(seconds=float(tls.leaf_validity))
        self.cache_size = int(tls.leaf_cache_size)
        self.metrics = metrics
        self._key = ec.generate_private_key(ec.SECP256R1())
        self._key_pem = self._key.private_bytes(serialization.Encoding.PEM,
                                                serialization.PrivateFormat.PKCS8,
                                                serialization.NoEncryption())
        self._ski = x509.SubjectKeyIdentifier.from_public_key(self._key.public_key())
        self._aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
            ca.subject_key_identifier)
        self._cache: "OrderedDict[str, _Leaf]" = OrderedDict()
        #: names being minted in a worker thread -> the future every asker waits on
        self._pending: dict[str, asyncio.Future] = {}
        # re-mint a cached leaf once less than this much of its validity is left
        self._renew_margin = min(self.validity.total_seconds() / 4, 86400.0)

    def __len__(self) -> int:
        return len(self._cache)

    # ------------------------------------------------------------------------------------
    def mint(self, host: str) -> x509.Certificate:
        """A new leaf certificate for ``host`` (no caching)."""
        host = normalize_host(host)
        ip = parse_ip(host)
        san = x509.IPAddress(ip) if ip is not None else x509.DNSName(host)
        now = dt.datetime.now(dt.timezone.utc)
        not_before = max(now - BACKDATE, self.ca.cert.not_valid_before_utc)
        not_after = min(now + self.validity, self.ca.cert.not_valid_after_utc)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]) if len(host) <= 64 \
            else x509.Name([])
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.ca.cert.subject)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.SubjectAlternativeName([san]), critical=not len(subject))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(self._ski, critical=False)
            .add_extension(self._aki, critical=False)
        )
        cert = builder.sign(self.ca.key, self.ca.signature_hash)
        if self.metrics is not None:
            self.metrics.leaf_certs_minted.inc()
        return cert

    def certificate_for(self, host: str) -> x509.Certificate:
        return self._entry(host).cert

    def context_for(self, host: str) -> ssl.SSLContext:
        """A server-side context presenting a leaf for ``host`` (TLS ≥ 1.2, ALPN http/1.1).

        Mints on the calling thread when the leaf is not cached; on the event loop use
        :meth:`acontext_for`."""
        return self._entry(host).context

    async def acontext_for(self, host: str) -> ssl.SSLContext:
        """:meth:`context_for` for the event loop: a cached leaf at once, a missing one built in
        a worker thread, one build per name for all the connections waiting for it."""
        key = normalize_host(host)
        leaf = self._cached(key)
        if leaf is not None:
            return leaf.context
        pending = self._pending.get(key)
        if pending is None:
            loop = asyncio.get_running_loop()
            pending = self._pending[key] = loop.run_in_executor(_MINT_POOL, self._new_leaf, key)
            try:
                leaf = await asyncio.shield(pending)
            finally:
                del self._pending[key]
            return self._store(key, leaf).context
        return (await asyncio.shield(pending)).context

    def _cached(self, key: str) -> Optional[_Leaf]:
        leaf = self._cache.get(key)
        if leaf is not None and leaf.not_after - time.time() > self._renew_margin:
            self._cache.move_to_end(key)
            return leaf
        return None

    def _new_leaf(self, key: str) -> _Leaf:
        """Mint and build a context (thread-safe: touches no shared mutable state)."""
        cert = self.mint(key)
        return _Leaf(cert, cert.not_valid_after_utc.timestamp(), self._build_context(cert))

    def _store(self, key: str, leaf: _Leaf) -> _Leaf:
        self._cache[key] = leaf
        self._cache.move_to_end(key)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return leaf

    def _entry(self, host: str) -> _Leaf:
        key = normalize_host(host)
        return self._cached(key) or self._store(key, self._new_leaf(key))

    def _build_context(self, cert: x509.Certificate) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
        ctx.set_alpn_protocols(["http/1.1"])
        pem = cert.public_bytes(serialization.Encoding.PEM) + self.ca.chain_pem + self._key_pem
        load_chain_from_memory(ctx, pem)
        return ctx


def load_chain_from_memory(ctx: ssl.SSLContext, pem: bytes) -> None:
    """``ctx.load_cert_chain`` from PEM bytes holding certificates and the private key."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("trivy-gateway-leaf", os.MFD_CLOEXEC)
        try:
            os.write(fd, pem)
            ctx.load_cert_chain(f"/proc/self/fd/{fd}")
            return
        except OSError:
            pass                      # e.g. /proc not mounted: fall back to a private file
        finally:
            os.close(fd)
    with tempfile.TemporaryDirectory(prefix="trivy-gateway-leaf-") as d:   # mode 0700
        path = os.path.join(d, "leaf.pem")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        ctx.load_cert_chain(path)
