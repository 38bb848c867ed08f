"""Test PKI for the emulated upstream world.

One throw-away CA per :class:`TestPKI` and one server certificate whose SANs
cover every emulated hostname (plus ``localhost`` and ``127.0.0.1``).  The CA
PEM is what clients trust (``SSL_CERT_FILE`` for Trivy, the gateway's upstream
CA bundle setting for the gateway).
"""

from __future__ import annotations

import datetime as _dt
import ipaddress
import os
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

EMULATED_HOSTS: tuple[str, ...] = (
    "mirror.gcr.io",
    "ghcr.io",
    "pkg-containers.githubusercontent.com",
    "api.github.com",
    "raw.githubusercontent.com",
    "github.com",
    "codeload.github.com",
    "repo.maven.apache.org",
    "check.trivy.dev",
    # a private registry on a non-default port: the world names it host:port (its identity)
    "registry.test:5443",
)


def hostname_of(host: str) -> str:
    """``registry.test:5443`` → ``registry.test`` (the name in the certificate and SNI)."""
    return host.rsplit(":", 1)[0] if host.rsplit(":", 1)[-1].isdigit() else host


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "trivy-gateway emulated world"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


@dataclass(frozen=True)
class TestPKI:
    """Paths of the generated material (all PEM)."""

    __test__ = False  # not a pytest test class

    directory: Path
    ca_pem: Path
    ca_key_pem: Path
    server_cert_pem: Path
    server_key_pem: Path
    hostnames: tuple[str, ...]

    def server_ssl_context(self) -> ssl.SSLContext:
        """TLS server context offering only http/1.1 in ALPN."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(str(self.server_cert_pem), str(self.server_key_pem))
        ctx.set_alpn_protocols(["http/1.1"])
        return ctx

    def client_ssl_context(self) -> ssl.SSLContext:
        """Client context trusting only the test CA."""
        ctx = ssl.create_default_context(cafile=str(self.ca_pem))
        ctx.set_alpn_protocols(["http/1.1"])
        return ctx


def create_pki(directory: str | os.PathLike[str], hostnames: tuple[str, ...] = EMULATED_HOSTS) -> TestPKI:
    """Create a CA and a multi-SAN server certificate under *directory*."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    now = _dt.datetime.now(_dt.timezone.utc)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("trivy-gateway emulated world test CA")
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _dt.timedelta(hours=1))
        .not_valid_after(now + _dt.timedelta(days=7))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    srv_key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = [x509.DNSName(h) for h in dict.fromkeys(map(hostname_of, hostnames))]
    sans += [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    srv_cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hostname_of(hostnames[0]) if hostnames else "localhost"))
        .issuer_name(ca_name)
        .public_key(srv_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _dt.timedelta(hours=1))
        .not_valid_after(now + _dt.timedelta(days=6))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )

    def _key_pem(k: ec.EllipticCurvePrivateKey) -> bytes:
        return k.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    paths = {
        "ca.pem": ca_cert.public_bytes(serialization.Encoding.PEM),
        "ca.key": _key_pem(ca_key),
        "server.pem": srv_cert.public_bytes(serialization.Encoding.PEM),
        "server.key": _key_pem(srv_key),
    }
    for name, data in paths.items():
        p = d / name
        p.write_bytes(data)
        if name.endswith(".key"):
            p.chmod(0o600)
    return TestPKI(
        directory=d,
        ca_pem=d / "ca.pem",
        ca_key_pem=d / "ca.key",
        server_cert_pem=d / "server.pem",
        server_key_pem=d / "server.key",
        hostnames=tuple(hostnames),
    )
