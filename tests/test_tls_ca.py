"""The gateway CA (create / reuse / operator-supplied) and minted leaf certificates."""
from __future__ import annotations

import datetime as dt
import ipaddress
import os
import ssl
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway.observability.metrics import Metrics
from gateway.settings import load_settings
from gateway.tls import CAError, CertificateAuthority, LeafIssuer, bundle_pem, export_pem


def settings_for(tmp_path, **tls):
    return load_settings(env={}, overrides={"server": {"data_dir": str(tmp_path / "data")},
                                            "tls": tls})


def test_ca_created_on_first_start_and_reused(tmp_path):
    s = settings_for(tmp_path)
    ca = CertificateAuthority.load_or_create(s)
    assert ca.created
    key_file = tmp_path / "data" / "ca" / "ca-key.pem"
    assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600
    assert ca.cert_path == tmp_path / "data" / "ca" / "ca.pem"
    again = CertificateAuthority.load_or_create(s)
    assert not again.created
    assert again.cert == ca.cert
    assert isinstance(again.key, ec.EllipticCurvePrivateKey)


def test_generated_ca_extensions(tmp_path):
    ca = CertificateAuthority.load_or_create(settings_for(tmp_path, ca_common_name="Acme GW CA"))
    cert = ca.cert
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.key_cert_sign and ku.value.crl_sign
    cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "Acme GW CA"
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert cert.public_key().curve.name == "secp256r1"
    assert export_pem(ca).startswith("-----BEGIN CERTIFICATE-----")


def test_missing_key_is_an_error_not_a_silent_new_ca(tmp_path):
    s = settings_for(tmp_path)
    CertificateAuthority.load_or_create(s)
    (tmp_path / "data" / "ca" / "ca-key.pem").unlink()
    with pytest.raises(CAError, match="key .* is missing"):
        CertificateAuthority.load_or_create(s)


def _operator_ca(tmp_path, *, ca=True, key_type="rsa"):
    key = rsa.generate_private_key(65537, 2048) if key_type == "rsa" else \
        ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Corp Intercept CA")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "corp-ca.pem", tmp_path / "corp-ca-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.TraditionalOpenSSL,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_operator_rsa_ca_is_used_and_signs_leaves(tmp_path):
    cert_path, key_path = _operator_ca(tmp_path)
    s = settings_for(tmp_path, ca_cert=str(cert_path), ca_key=str(key_path))
    ca = CertificateAuthority.load_or_create(s)
    assert not ca.created and ca.cert_path == cert_path
    assert not (tmp_path / "data" / "ca").exists()
    leaf = LeafIssuer(ca, s, Metrics()).certificate_for("ghcr.io")
    leaf.verify_directly_issued_by(ca.cert)


def test_operator_ca_errors(tmp_path):
    cert_path, key_path = _operator_ca(tmp_path, ca=False)
    with pytest.raises(CAError, match="not a CA certificate"):
        CertificateAuthority.load(cert_path, key_path)
    (tmp_path / "x").mkdir()
    (tmp_path / "y").mkdir()
    other_cert, _ = _operator_ca(tmp_path / "x")
    _, other_key = _operator_ca(tmp_path / "y", key_type="ec")
    with pytest.raises(CAError, match="is not the key of the certificate"):
        CertificateAuthority.load(other_cert, other_key)
    with pytest.raises(CAError, match="cannot read CA certificate"):
        CertificateAuthority.load(tmp_path / "nope.pem", key_path)


def test_operator_ca_with_encrypted_key(tmp_path):
    cert_path, plain_key = _operator_ca(tmp_path, key_type="ec")
    key = serialization.load_pem_private_key(plain_key.read_bytes(), password=None)
    enc_path = tmp_path / "corp-ca-key.enc.pem"
    enc_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.BestAvailableEncryption(b"s3cret pass")))
    secret = tmp_path / "ca-pass"
    secret.write_text("s3cret pass\n")
    # from a file
    s = settings_for(tmp_path, ca_cert=str(cert_path), ca_key=str(enc_path),
                     ca_key_password_file=str(secret))
    assert "s3cret" not in repr(s.tls)
    ca = CertificateAuthority.load_or_create(s)
    LeafIssuer(ca, s, Metrics()).certificate_for("ghcr.io").verify_directly_issued_by(ca.cert)
    # from the environment
    s = load_settings(env={"CA_PASS": "s3cret pass"}, overrides={
        "server": {"data_dir": str(tmp_path / "data")},
        "tls": {"ca_cert": str(cert_path), "ca_key": str(enc_path),
                "ca_key_password_env": "CA_PASS"}})
    assert CertificateAuthority.load_or_create(s).cert.subject == ca.cert.subject
    # no password, a wrong one, one for a key that is not encrypted: clear errors
    with pytest.raises(CAError, match="ca_key_password_file"):
        CertificateAuthority.load(cert_path, enc_path)
    with pytest.raises(CAError, match="wrong password"):
        CertificateAuthority.load(cert_path, enc_path, password=b"nope")
    with pytest.raises(CAError, match="not encrypted"):
        CertificateAuthority.load(cert_path, plain_key, password=b"s3cret pass")
    # an empty variable is a configuration error, not a silent unencrypted attempt
    with pytest.raises(Exception, match="CA_PASS"):
        load_settings(env={}, overrides={"tls": {"ca_cert": str(cert_path), "ca_key": str(enc_path),
                                                 "ca_key_password_env": "CA_PASS"}})


def test_leaf_certificate_properties(tmp_path):
    s = settings_for(tmp_path, leaf_validity="2d")
    ca = CertificateAuthority.load_or_create(s)
    metrics = Metrics()
    issuer = LeafIssuer(ca, s, metrics)
    before = dt.datetime.now(dt.timezone.utc)
    leaf = issuer.certificate_for("Mirror.GCR.io")
    leaf.verify_directly_issued_by(ca.cert)
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["mirror.gcr.io"]
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == ca.subject_key_identifier.digest
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert leaf.not_valid_before_utc < before - dt.timedelta(minutes=30)      # backdated
    assert dt.timedelta(days=1.9) < leaf.not_valid_after_utc - before < dt.timedelta(days=2.1)
    ip_leaf = issuer.certificate_for("10.0.0.5")
    ip_san = ip_leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ip_san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.5")]
    # one shared key pair: minting is a signature, not a key generation
    assert leaf.public_key().public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo) == \
        ip_leaf.public_key().public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo)
    assert metrics.registry.get_sample_value("trivy_gateway_tls_leaf_certificates_minted_total") == 2


def test_leaf_lru_is_bounded_and_contexts_are_cached(tmp_path):
    s = settings_for(tmp_path, leaf_cache_size=3)
    metrics = Metrics()
    issuer = LeafIssuer(CertificateAuthority.load_or_create(s), s, metrics)
    ctx = issuer.context_for("a.example")
    assert issuer.context_for("A.example.") is ctx
    for host in ("b.example", "c.example", "d.example"):
        issuer.context_for(host)
    assert len(issuer) == 3
    minted = lambda: metrics.registry.get_sample_value(  # noqa: E731
        "trivy_gateway_tls_leaf_certificates_minted_total")
    assert minted() == 4
    assert issuer.context_for("a.example") is not ctx       # evicted, minted again
    assert minted() == 5
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2


def test_bundle_has_system_roots_and_gateway_ca_once(tmp_path):
    ca = CertificateAuthority.load_or_create(settings_for(tmp_path))
    roots = tmp_path / "roots.pem"
    other = CertificateAuthority.generate("Some Root")
    roots.write_bytes(other.cert_pem + b"\n" + other.cert_pem + ca.cert_pem)
    bundle = bundle_pem(ca, cafile=str(roots), capath="")
    assert bundle.count("-----BEGIN CERTIFICATE-----") == 2
    path = tmp_path / "bundle.pem"
    path.write_text(bundle)
    ctx = ssl.create_default_context(cafile=str(path))
    assert len(ctx.get_ca_certs()) == 2
    # against the real system store: at least the gateway CA, roots deduplicated
    system = bundle_pem(ca)
    assert system.count(export_pem(ca).splitlines()[1]) == 1
