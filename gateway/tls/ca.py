"""The gateway's certificate authority: loaded from the operator's files or created on first start.

Key type of a generated CA: **ECDSA P-256**. Key generation takes microseconds (RSA-2048 takes
tens of milliseconds to seconds), signatures are small and cheap, and every client that matters
accepts it (Go's crypto/tls i.e. Trivy, OpenSSL/curl, Java, Python). An operator CA may be RSA or
EC; leaves are signed with SHA-256 either way.

A generated CA lives in ``<data_dir>/ca/``: ``ca.pem`` (certificate, world-readable: clients
need it) and ``ca-key.pem`` (private key, mode 0600). It is reused on every restart, so the
trust an operator distributed once stays valid. Creation writes to temporary files and publishes
with an atomic rename, key first, so a crash never leaves a certificate without its key.
"""
from __future__ import annotations

import datetime as dt
import os
import re
import ssl
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.x509.oid import NameOID

from ..observability.logging import get_logger

log = get_logger("gateway.tls")

CA_DIR = "ca"
CA_CERT_FILE = "ca.pem"
CA_KEY_FILE = "ca-key.pem"
#: a generated CA is valid this long; leaves are short-lived and re-minted anyway
CA_VALIDITY = dt.timedelta(days=3650)

PrivateKey = Union[ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey]


class CAError(Exception):
    """The CA cannot be loaded or created; the message says which file and why.

    ``part`` is the file at fault, ``"cert"`` or ``"key"``, so a start-up check can blame
    ``tls.ca_cert`` or ``tls.ca_key`` and where that setting was made."""

    def __init__(self, message: str, part: str = "cert") -> None:
        super().__init__(message)
        self.part = part


@dataclass
class CertificateAuthority:
    cert: x509.Certificate
    key: PrivateKey
    #: certificates that follow the CA certificate in its file (an operator's intermediate chain)
    chain: tuple[x509.Certificate, ...] = ()
    cert_path: Optional[Path] = None
    key_path: Optional[Path] = None
    #: True when this process created the CA (first start)
    created: bool = False
    cert_pem: bytes = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.cert_pem = self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def chain_pem(self) -> bytes:
        """The CA certificate followed by its chain, as sent after each leaf."""
        return self.cert_pem + b"".join(c.public_bytes(serialization.Encoding.PEM)
                                        for c in self.chain)

    @property
    def signature_hash(self) -> Optional[hashes.HashAlgorithm]:
        if isinstance(self.key, (ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey)):
            return None
        return hashes.SHA256()

    @property
    def subject_key_identifier(self) -> x509.SubjectKeyIdentifier:
        try:
            return self.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        except x509.ExtensionNotFound:
            return x509.SubjectKeyIdentifier.from_public_key(self.key.public_key())

    @property
    def fingerprint_sha256(self) -> str:
        return self.cert.fingerprint(hashes.SHA256()).hex(":").upper()

    # ------------------------------------------------------------------------------------
    @classmethod
    def generate(cls, common_name: str = "trivy-gateway CA") -> "CertificateAuthority":
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "trivy-gateway"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name[:64]),
        ])
        now = dt.datetime.now(dt.timezone.utc)
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + CA_VALIDITY)
            # path length 0: this CA signs leaves only, never another CA
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False), critical=True)
            .add_extension(ski, critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
                           critical=False)
            .sign(key, hashes.SHA256())
        )
        return cls(cert=cert, key=key, created=True)

    @classmethod
    def load(cls, cert_path: Union[str, Path], key_path: Union[str, Path],
             password: Optional[bytes] = None) -> "CertificateAuthority":
        cert_path, key_path = Path(cert_path), Path(key_path)
        try:
            certs = x509.load_pem_x509_certificates(cert_path.read_bytes())
        except OSError as exc:
            raise CAError(f"cannot read CA certificate {cert_path}: {exc.strerror}") from None
        except ValueError as exc:
            raise CAError(f"{cert_path} is not a PEM certificate: {exc}") from None
        try:
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=password)
        except OSError as exc:
            raise CAError(f"cannot read CA key {key_path}: {exc.strerror}", part="key") from None
        except TypeError as exc:
            # cryptography: "Password was not given but private key is encrypted" (or the
            # other way round)
            hint = ("set tls.ca_key_password_file or tls.ca_key_password_env"
                    if password is None else "the key is not encrypted: drop the password")
            raise CAError(f"{key_path}: {exc}; {hint}", part="key") from None
        except ValueError as exc:
            what = ("wrong password for the encrypted key, or not a PEM private key"
                    if password is not None else "not a usable PEM private key")
            raise CAError(f"{key_path}: {what}: {exc}", part="key") from None
        if not isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey,
                                ed25519.Ed25519PrivateKey)):
            raise CAError(f"{key_path}: unsupported key type {type(key).__name__}", part="key")
        cert = certs[0]
        pub = serialization.PublicFormat.SubjectPublicKeyInfo
        if (cert.public_key().public_bytes(serialization.Encoding.DER, pub)
                != key.public_key().public_bytes(serialization.Encoding.DER, pub)):
            raise CAError(f"{key_path} is not the key of the certificate in {cert_path}",
                          part="key")
        try:
            bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        except x509.ExtensionNotFound:
            bc = None
        if bc is None or not bc.ca:
            raise CAError(f"{cert_path} is not a CA certificate (basicConstraints CA:TRUE missing)")
        try:
            ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
            if not ku.key_cert_sign:
                raise CAError(f"{cert_path}: keyUsage does not allow keyCertSign")
        except x509.ExtensionNotFound:
            pass
        now = dt.datetime.now(dt.timezone.utc)
        if cert.not_valid_after_utc <= now:
            raise CAError(f"{cert_path}: the CA certificate expired on "
                          f"{cert.not_valid_after_utc.isoformat()}")
        return cls(cert=cert, key=key, chain=tuple(certs[1:]), cert_path=cert_path,
                   key_path=key_path)

    @classmethod
    def load_or_create(cls, settings) -> "CertificateAuthority":
        """The operator's CA (``tls.ca_cert``/``tls.ca_key``) or ``<data_dir>/ca/``, created if absent.

        ``settings`` is the whole :class:`~gateway.settings.Settings`.
        """
        tls = settings.tls
        if tls.ca_cert and tls.ca_key:
            ca = cls.load(tls.ca_cert, tls.ca_key,
                          password=tls.ca_key_password.encode() if tls.ca_key_password else None)
            log.info("ca_loaded", source="operator", cert=str(ca.cert_path),
                     subject=ca.cert.subject.rfc4514_string(), sha256=ca.fingerprint_sha256)
            return ca
        directory = Path(settings.data_dir) / CA_DIR
        cert_path, key_path = directory / CA_CERT_FILE, directory / CA_KEY_FILE
        if cert_path.exists() and key_path.exists():
            _check_key_mode(key_path)
            ca = cls.load(cert_path, key_path)
            log.info("ca_loaded", source="data_dir", cert=str(cert_path), sha256=ca.fingerprint_sha256)
            return ca
        if cert_path.exists() and not key_path.exists():
            raise CAError(f"{cert_path} exists but its key {key_path} is missing; restore the key "
                          "or remove the certificate to create a new CA (clients must then trust it)")
        ca = cls.generate(tls.ca_common_name)
        ca.save(directory)
        log.info("ca_created", cert=str(ca.cert_path), sha256=ca.fingerprint_sha256,
                 hint="clients must trust this CA: trivy-gateway ca export > gateway-ca.pem")
        return ca

    def save(self, directory: Union[str, Path]) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        key_pem = self.key.private_bytes(serialization.Encoding.PEM,
                                         serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption())
        key_path, cert_path = directory / CA_KEY_FILE, directory / CA_CERT_FILE
        _atomic_write(key_path, key_pem, 0o600)
        _atomic_write(cert_path, self.cert_pem, 0o644)
        self.cert_path, self.key_path = cert_path, key_path


def _atomic_write(path: Path, data: bytes, mode: int) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, mode)          # before any byte of a key is written
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _check_key_mode(key_path: Path) -> None:
    try:
        mode = key_path.stat().st_mode & 0o777
    except OSError:
        return
    if mode & 0o077:
        log.warning("ca_key_permissions", key=str(key_path), mode=oct(mode),
                    hint="the CA key should be readable by the gateway user only (chmod 600)")


# -- ca export / ca bundle ---------------------------------------------------------------------

def export_pem(ca: CertificateAuthority) -> str:
    """What ``trivy-gateway ca export`` prints: the CA certificate (and its chain), PEM."""
    return ca.chain_pem.decode("ascii")


_PEM_BLOCK = re.compile(rb"-----BEGIN CERTIFICATE-----\s*([A-Za-z0-9+/=\s]+?)-----END CERTIFICATE-----")


def _read_pem_blocks(path: Path) -> list[bytes]:
    """Base64 payloads (whitespace removed) of the PEM certificates in a file; nothing parsed,
    so one odd system root cannot break the bundle."""
    try:
        data = path.read_bytes()
    except OSError:
        return []
    return [b"".join(m.group(1).split()) for m in _PEM_BLOCK.finditer(data)]


def _pem(payload: bytes) -> str:
    lines = [payload[i:i + 64].decode("ascii") for i in range(0, len(payload), 64)]
    return "-----BEGIN CERTIFICATE-----\n" + "\n".join(lines) + "\n-----END CERTIFICATE-----\n"


def system_root_certificates(cafile: Optional[str] = None,
                             capath: Optional[str] = None) -> list[str]:
    """PEM texts of the system trust store as OpenSSL finds it (``SSL_CERT_FILE``/``SSL_CERT_DIR``
    honoured), without duplicates."""
    if cafile is None and capath is None:
        paths = ssl.get_default_verify_paths()
        cafile, capath = paths.cafile, paths.capath
    blocks: list[bytes] = []
    if cafile and os.path.isfile(cafile):
        blocks.extend(_read_pem_blocks(Path(cafile)))
    if capath and os.path.isdir(capath):
        done = {os.path.realpath(cafile)} if cafile else set()
        for entry in sorted(os.listdir(capath)):
            p = Path(capath) / entry
            real = os.path.realpath(p)
            if real in done or not p.is_file():
                continue
            done.add(real)          # hash symlinks point at files already read
            blocks.extend(_read_pem_blocks(p))
    seen: set[bytes] = set()
    out = []
    for block in blocks:
        if block not in seen:
            seen.add(block)
            out.append(_pem(block))
    return out


def bundle_pem(ca: CertificateAuthority, cafile: Optional[str] = None,
               capath: Optional[str] = None) -> str:
    """What ``trivy-gateway ca bundle`` prints: system roots + the gateway CA, for SSL_CERT_FILE.

    Duplicates are removed, so pointing ``SSL_CERT_FILE`` at an earlier bundle and regenerating
    it does not grow it.
    """
    return bundle_from_pem(ca.chain_pem, cafile, capath)


def bundle_from_pem(chain_pem: bytes, cafile: Optional[str] = None,
                    capath: Optional[str] = None) -> str:
    """:func:`bundle_pem` for a CA known only by its certificate(s): read from the data dir
    without the key, or fetched from a running gateway's /ca.pem."""
    cert = x509.load_pem_x509_certificate(chain_pem)
    sha256 = cert.fingerprint(hashes.SHA256()).hex(":").upper()
    gateway = {b"".join(m.group(1).split()) for m in _PEM_BLOCK.finditer(chain_pem)}
    parts = [pem for pem in system_root_certificates(cafile, capath)
             if "".join(pem.split("\n")[1:-2]).encode() not in gateway]
    header = (f"# trivy-gateway trust bundle: {len(parts)} system root(s) + the gateway CA\n"
              f"# gateway CA: {cert.subject.rfc4514_string()} sha256={sha256}\n")
    return header + "".join(parts) + chain_pem.decode("ascii")
