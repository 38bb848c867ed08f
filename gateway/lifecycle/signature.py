"""Detached signature check of a bundle (``bundle import --signature F --public-key PEM``).

Accepted signatures, over the sha256 of the bundle file's bytes:

- ``openssl dgst -sha256 -sign key.pem -out bundle.sig bundle.tar`` (raw DER ECDSA, or
  PKCS#1 v1.5 for an RSA key);
- ``cosign sign-blob --key cosign.key bundle.tar > bundle.sig`` (the same ECDSA signature,
  base64-encoded).

The digest is computed while the import streams the file, so the file is read once; the
signature is checked before anything from the bundle is published.
"""
from __future__ import annotations

import base64
import binascii
import re
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

_BASE64 = re.compile(rb"^[A-Za-z0-9+/=\r\n]+$")


class SignatureError(Exception):
    """The signature is missing, unreadable or does not match; the message says which."""


def load_public_key(path: Path):
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise SignatureError(f"cannot read public key {path}: {exc.strerror}") from None
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise SignatureError(f"{path} is not a PEM public key: {exc}") from None
    if not isinstance(key, (ec.EllipticCurvePublicKey, rsa.RSAPublicKey)):
        raise SignatureError(f"{path}: only ECDSA and RSA public keys are supported "
                             f"(got {type(key).__name__})")
    return key


def read_signature(path: Path) -> bytes:
    try:
        sig = Path(path).read_bytes()
    except OSError as exc:
        raise SignatureError(f"cannot read signature {path}: {exc.strerror}") from None
    stripped = sig.strip()
    if stripped and _BASE64.match(stripped):  # cosign writes base64; openssl raw bytes
        try:
            return base64.b64decode(stripped, validate=False)
        except binascii.Error:
            pass
    if not sig:
        raise SignatureError(f"signature file {path} is empty")
    return sig


def verify_digest(sha256_digest: bytes, signature: bytes, key) -> None:
    """Raise :class:`SignatureError` unless ``signature`` signs ``sha256_digest`` with ``key``."""
    prehashed = Prehashed(hashes.SHA256())
    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(signature, sha256_digest, ec.ECDSA(prehashed))
        else:
            key.verify(signature, sha256_digest, padding.PKCS1v15(), prehashed)
    except InvalidSignature:
        raise SignatureError("the bundle's signature does not match (wrong key, or the bundle "
                             "was changed after it was signed)") from None
