"""A verified client certificate as the exchange carries it (proxy/core/client_cert.py):
its names, its fingerprint, and its X-Forwarded-Client-Cert element with Envoy's quoting
and the escapes that keep it a valid header value. The certificates are real, made by
tests/support/tls.py; a handshake that verifies one is in tests/e2e/test_tls_client_auth.py."""

from __future__ import annotations

import hashlib

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from proxy.core.client_cert import ClientCertificate, client_certificate
from tests.support.tls import IssuedFiles, TestCa


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> TestCa:
    return TestCa(tmp_path_factory.mktemp("client-cert"), "Client CA")


def loaded(files: IssuedFiles) -> tuple[ClientCertificate, bytes]:
    der = files.leaf().public_bytes(serialization.Encoding.DER)
    return client_certificate(der), der


def name(*attributes: tuple[x509.ObjectIdentifier, str]) -> x509.Name:
    return x509.Name([x509.NameAttribute(oid, value) for oid, value in attributes])


def test_the_fields_of_a_certificate_with_every_kind_of_name(ca: TestCa) -> None:
    files = ca.issue(
        "full",
        ("svc.example.com", "alt.example.com"),
        subject=name((NameOID.ORGANIZATION_NAME, "Example"), (NameOID.COMMON_NAME, "svc")),
        uris=("spiffe://example.org/ns/prod/svc", "https://svc.example.com/id"),
        emails=("ops@example.com",),
        client=True,
    )

    cert, der = loaded(files)

    fingerprint = hashlib.sha256(der).hexdigest()
    assert cert == ClientCertificate(
        subject="CN=svc,O=Example",
        issuer="CN=Client CA",
        common_name="svc",
        dns=("svc.example.com", "alt.example.com"),
        uris=("spiffe://example.org/ns/prod/svc", "https://svc.example.com/id"),
        emails=("ops@example.com",),
        fingerprint=fingerprint,
        pem=files.cert.read_text(),
        xfcc=f'Hash={fingerprint};Subject="CN=svc,O=Example";'
        "URI=spiffe://example.org/ns/prod/svc;URI=https://svc.example.com/id;"
        "DNS=svc.example.com;DNS=alt.example.com",
    )


def test_without_alternative_names_or_common_name(ca: TestCa) -> None:
    files = ca.issue(
        "bare", subject=name((NameOID.ORGANIZATIONAL_UNIT_NAME, "Robots")), client=True
    )

    cert, der = loaded(files)

    assert (cert.common_name, cert.dns, cert.uris, cert.emails) == ("", (), (), ())
    assert cert.xfcc == f'Hash={hashlib.sha256(der).hexdigest()};Subject="OU=Robots"'


def test_email_address_in_the_subject_is_named_as_openssl_names_it(ca: TestCa) -> None:
    files = ca.issue(
        "mail",
        subject=name((NameOID.COMMON_NAME, "m"), (NameOID.EMAIL_ADDRESS, "m@example.com")),
        client=True,
    )

    assert loaded(files)[0].subject == "emailAddress=m@example.com,CN=m"


def test_xfcc_quotes_and_escapes_what_would_break_it(ca: TestCa) -> None:
    """Values holding `;`, `,`, `=` or a space are quoted; within quotes `\\` and `"` are
    escaped; what a header value cannot hold is escaped (RFC 4514's \\HH in the subject,
    percent-encoding in a SAN), so nothing can split the field or inject another."""
    subject = name((NameOID.COMMON_NAME, 'Jörg "J" \r\n;x'))
    files = ca.issue(
        "odd",
        ("a\x01b.example", "semi;colon.example"),
        subject=subject,
        uris=("spiffe://x/a b", "urn:x=y"),
        client=True,
    )

    cert, der = loaded(files)

    assert cert.subject == 'CN=Jörg \\"J\\" \r\n\\;x'  # RFC 4514, as cryptography writes it
    assert cert.xfcc == (
        f"Hash={hashlib.sha256(der).hexdigest()};"
        r'Subject="CN=J\\C3\\B6rg \\\"J\\\" \\0D\\0A\\;x";'
        'URI="spiffe://x/a b";URI="urn:x=y";'
        'DNS=a%01b.example;DNS="semi;colon.example"'
    )
    assert all(" " <= char <= "~" for char in cert.xfcc)


def test_bytes_that_are_not_a_certificate_are_a_value_error() -> None:
    with pytest.raises(ValueError, match="asn1"):
        client_certificate(b"\x30\x03\x02\x01\x01")
