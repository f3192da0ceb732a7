"""The TLS-ALPN-01 challenge certificate (RFC 8737 section 3) that proxy/acme/challenges.py
makes: what a validator checks of it."""

from __future__ import annotations

import hashlib

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from proxy.acme.challenges import ACME_IDENTIFIER_OID, tls_alpn_certificate


def test_the_certificate_is_for_the_name_alone_with_the_digest_in_a_critical_extension() -> None:
    pem = tls_alpn_certificate("a.example.com", "token.thumbprint")
    certificate = x509.load_pem_x509_certificate(pem)
    names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["a.example.com"]
    assert len(list(names)) == 1
    identifier = certificate.extensions.get_extension_for_oid(ACME_IDENTIFIER_OID)
    assert identifier.critical
    digest = hashlib.sha256(b"token.thumbprint").digest()
    # The extension's value is the DER encoding of an OCTET STRING holding the digest.
    assert isinstance(identifier.value, x509.UnrecognizedExtension)
    assert identifier.value.value == b"\x04\x20" + digest


def test_the_pem_holds_the_key_of_the_certificate() -> None:
    pem = tls_alpn_certificate("a.example.com", "token.thumbprint")
    key = serialization.load_pem_private_key(pem, password=None)
    certificate = x509.load_pem_x509_certificate(pem)
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    assert key.public_key().public_bytes(serialization.Encoding.DER, spki) == (
        certificate.public_key().public_bytes(serialization.Encoding.DER, spki)
    )


def test_each_challenge_gets_a_key_of_its_own() -> None:
    first = x509.load_pem_x509_certificate(tls_alpn_certificate("a.example.com", "x.y"))
    second = x509.load_pem_x509_certificate(tls_alpn_certificate("a.example.com", "x.y"))
    assert first.public_key() != second.public_key()
