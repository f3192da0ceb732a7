"""The client certificate a connection verified, as the exchange carries it.

On a listener with `tls.client_auth`, OpenSSL verifies the certificate a client sends
against the listener's CA bundle during the handshake (proxy/frontend/certificates.py).
The connection reads the verified leaf once (`client_certificate`, from its DER bytes)
and every request on it carries the same `ClientCertificate` (`request.client_cert`),
for middleware (`client_cert`) and for the `X-Forwarded-Client-Cert` field the head
builders write (proxy/core/headers.py).

`xfcc` is this gateway's element of Envoy's X-Forwarded-Client-Cert format, made once:
`Hash=<hex SHA-256 of the DER>;Subject="<subject>";URI=<uri>;DNS=<name>` with one `URI`
per URI SAN and one `DNS` per DNS SAN, in Envoy's order of keys. A value holding `,`,
`;`, `=`, a space or a quote is quoted, and the subject always is; within quotes `\\`
and `"` are escaped with a backslash. `By` (the gateway's own URI SAN, a service mesh's
notion) and `Cert` (the URL-encoded PEM, over a kilobyte on every request) are left
out; a plugin that needs the PEM reads `ClientCertificate.pem`. Characters outside
printable ASCII (a header value cannot carry them as such) are escaped: as `\\HH` per
UTF-8 byte in the subject, which RFC 4514 allows, and percent-encoded in a SAN.
"""

from __future__ import annotations

import hashlib
import logging
import ssl
from dataclasses import dataclass

log = logging.getLogger(__name__)

_QUOTED = frozenset(',;=" \\')


@dataclass(frozen=True, slots=True)
class ClientCertificate:
    """A verified client certificate (its leaf): the subject and issuer as RFC 4514
    strings (most specific first: `CN=alice,O=Example`), the subject's common name ("":
    none), its DNS, URI and email subjectAltNames, the lower-case hex SHA-256 of its
    DER bytes, its PEM, and its XFCC element (module docstring)."""

    subject: str
    issuer: str
    common_name: str
    dns: tuple[str, ...]
    uris: tuple[str, ...]
    emails: tuple[str, ...]
    fingerprint: str
    pem: str
    xfcc: str


def verified_client_certificate(ssl_object: ssl.SSLObject) -> ClientCertificate | None:
    """The certificate the client of a completed handshake sent and OpenSSL verified
    (None: it sent none, which `client_auth: {mode: optional}` allows)."""
    der = ssl_object.getpeercert(binary_form=True)
    if not der:
        return None
    try:
        return client_certificate(der)
    except ValueError as exc:  # OpenSSL verified it; cryptography cannot read it
        log.warning("cannot read a verified client certificate: %s", exc)
        return None


def client_certificate(der: bytes) -> ClientCertificate:
    """The `ClientCertificate` of a leaf given as DER bytes.

    Raises:
        ValueError: the bytes are not a certificate cryptography can read.
    """
    # Imported here: the core's model imports this module, and most gateways never
    # see a client certificate.
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.x509.oid import NameOID

    # How OpenSSL (and so Envoy's XFCC) names emailAddress in a DN; cryptography would
    # write its OID.
    overrides = {NameOID.EMAIL_ADDRESS: "emailAddress"}
    leaf = x509.load_der_x509_certificate(der)
    try:
        alternatives = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        dns: list[str] = []
        uris: list[str] = []
        emails: list[str] = []
    else:
        dns = [str(name) for name in alternatives.get_values_for_type(x509.DNSName)]
        uris = [
            str(uri) for uri in alternatives.get_values_for_type(x509.UniformResourceIdentifier)
        ]
        emails = [str(email) for email in alternatives.get_values_for_type(x509.RFC822Name)]
    common = leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    subject = leaf.subject.rfc4514_string(overrides)
    fingerprint = hashlib.sha256(der).hexdigest()
    element = [f"Hash={fingerprint}", f"Subject={_quoted(_ascii_dn(subject))}"]
    element += [f"URI={_value(_percent_encoded(uri))}" for uri in uris]
    element += [f"DNS={_value(_percent_encoded(name))}" for name in dns]
    return ClientCertificate(
        subject=subject,
        issuer=leaf.issuer.rfc4514_string(overrides),
        common_name=str(common[0].value) if common else "",
        dns=tuple(dns),
        uris=tuple(uris),
        emails=tuple(emails),
        fingerprint=fingerprint,
        pem=leaf.public_bytes(serialization.Encoding.PEM).decode("ascii"),
        xfcc=";".join(element),
    )


def _quoted(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _value(text: str) -> str:
    """`text` as an XFCC value: quoted when it holds a character XFCC gives a meaning."""
    return _quoted(text) if any(char in _QUOTED for char in text) else text


def _printable(char: str) -> bool:
    return " " <= char <= "~"


def _ascii_dn(text: str) -> str:
    """An RFC 4514 string with each character outside printable ASCII as `\\HH` per
    UTF-8 byte (RFC 4514 section 2.4), so that it fits a header value."""
    if all(_printable(char) for char in text):
        return text
    return "".join(
        char if _printable(char) else "".join(f"\\{byte:02X}" for byte in char.encode())
        for char in text
    )


def _percent_encoded(text: str) -> str:
    """`text` with each character outside printable ASCII percent-encoded (UTF-8)."""
    if all(_printable(char) for char in text):
        return text
    return "".join(
        char if _printable(char) else "".join(f"%{byte:02X}" for byte in char.encode())
        for char in text
    )
