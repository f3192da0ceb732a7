"""The challenges the gateway answers, and what the order flow (proxy/acme/order.py) and
the manager (proxy/acme/manager.py) share without the `acme` library: `Challenge`, the
`Responder` that has the workers answer one, and `OrderFailed`.

- **http-01** (RFC 8555 section 8.3): `GET /.well-known/acme-challenge/<token>` on port 80
  is answered with the key authorization (proxy/exchange/acme_http01.py).
- **tls-alpn-01** (RFC 8737): a TLS handshake for the name, offering only the ALPN
  protocol `acme-tls/1`, gets a self-signed certificate for the name alone that carries
  the SHA-256 of the key authorization in a critical acmeIdentifier extension
  (`tls_alpn_certificate`; served by proxy/frontend/client_hello.py's choice).
"""

from __future__ import annotations

import datetime
import hashlib
from dataclasses import dataclass
from typing import Protocol

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

HTTP_01 = "http-01"
TLS_ALPN_01 = "tls-alpn-01"
# id-pe-acmeIdentifier (RFC 8737 section 6.1)
ACME_IDENTIFIER_OID = x509.ObjectIdentifier("1.3.6.1.5.5.7.1.31")
# The challenge certificate only has to outlive its validation.
CHALLENGE_CERTIFICATE_VALIDITY = datetime.timedelta(days=7)


@dataclass(frozen=True, slots=True)
class Challenge:
    """One challenge being answered: the name, its type (`HTTP_01` or `TLS_ALPN_01`),
    the server's token and the key authorization (token "." account key thumbprint)."""

    name: str
    kind: str
    token: str
    key_authorization: str


def tls_alpn_certificate(name: str, key_authorization: str) -> bytes:
    """The key and the self-signed certificate (one PEM text) that answer a tls-alpn-01
    challenge for `name`: a subjectAltName of `name` alone and the critical
    acmeIdentifier extension holding SHA-256(key authorization) as an OCTET STRING."""
    key = ec.generate_private_key(ec.SECP256R1())
    digest = hashlib.sha256(key_authorization.encode("ascii")).digest()
    octet_string = bytes([0x04, len(digest)]) + digest  # DER: OCTET STRING, 32 bytes
    subject = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + CHALLENGE_CERTIFICATE_VALIDITY)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.UnrecognizedExtension(ACME_IDENTIFIER_OID, octet_string), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return key_pem + certificate.public_bytes(serialization.Encoding.PEM)


class OrderFailed(Exception):
    """An order produced no certificate; the message says why."""


class Responder(Protocol):
    """Who answers challenges: the workers, through the supervisor."""

    def offer(self, challenge: Challenge) -> None:
        """Have `challenge` answered; return once every worker answers it.

        Raises:
            OrderFailed: it cannot be (the workers did not confirm, the gateway stops).
        """

    def withdraw(self, challenge: Challenge) -> None:
        """Stop answering `challenge`."""
