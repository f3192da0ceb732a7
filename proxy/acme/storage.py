"""What ACME obtains, kept as files under `tls.acme.storage` (a volume, in a container),
so that a restart reuses the account and every certificate still good.

One directory per ACME server, named after its directory URL, so that a staging and a
production server never share an account or a certificate:

    <storage>/<server>/account.key                    the account's key (EC P-256, PEM)
    <storage>/<server>/certificates/<name>/cert.pem   the chain, leaf first
    <storage>/<server>/certificates/<name>/key.pem    its private key
    <storage>/<server>/challenges/<name>.pem          a TLS-ALPN-01 challenge's key and
                                                      certificate, while its order runs

`<server>` is the URL's host, `_port` when it has one, and its path, with every character
but letters, digits, `.`, `_` and `-` turned into `-`
(`acme-v02.api.letsencrypt.org-directory`). Keys are written with mode 0600 and the
directories with 0700.

**Written atomically.** Each file is written whole to a temporary file in its directory,
flushed to disk, and renamed over the old one, so a reader sees the old file or the new
one, never part of one. A certificate's key is written before its chain; a worker that
reads the two between the renames finds a pair that does not match, keeps what it
serves, and takes the new pair when the supervisor tells it that it is complete
(proxy/process/acme_serving.py).

Only the supervising parent writes here (proxy/acme/manager.py); workers only read.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificatePublicKeyTypes,
    PublicKeyTypes,
)

from proxy.core.files import write_atomically

log = logging.getLogger(__name__)

PRIVATE_FILE_MODE = 0o600
PUBLIC_FILE_MODE = 0o644
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def server_dirname(directory_url: str) -> str:
    """The directory `directory_url`'s account and certificates are kept in."""
    url = urlsplit(directory_url)
    text = (url.hostname or "server") + (f"_{url.port}" if url.port else "") + url.path
    return _UNSAFE.sub("-", text).strip("-")


@dataclass(frozen=True, slots=True)
class StoredCertificate:
    """A certificate found in storage: its files and its leaf."""

    name: str
    cert: str
    key: str
    leaf: x509.Certificate

    @property
    def not_before(self) -> float:
        return self.leaf.not_valid_before_utc.timestamp()

    @property
    def not_after(self) -> float:
        return self.leaf.not_valid_after_utc.timestamp()

    @property
    def serial(self) -> str:
        return format(self.leaf.serial_number, "x")

    def covers(self, name: str) -> bool:
        """Whether the leaf's subjectAltName holds `name` (exactly: ACME certificates
        here are never wildcards)."""
        try:
            alternatives = self.leaf.extensions.get_extension_for_class(
                x509.SubjectAlternativeName
            ).value
        except x509.ExtensionNotFound:
            return False
        return name in (dns.lower() for dns in alternatives.get_values_for_type(x509.DNSName))


class AcmeStorage:
    """The files of one ACME server under one `storage` directory."""

    def __init__(self, root: str, directory_url: str) -> None:
        self.root = root
        self.directory_url = directory_url
        self.server = os.path.join(root, server_dirname(directory_url))

    def __repr__(self) -> str:
        return f"<AcmeStorage {self.server}>"

    @property
    def account_key(self) -> str:
        return os.path.join(self.server, "account.key")

    def certificate_files(self, name: str) -> tuple[str, str]:
        """The (chain, key) files of `name`'s certificate, whether or not they exist."""
        directory = os.path.join(self.server, "certificates", name)
        return os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")

    def challenge_file(self, name: str) -> str:
        return os.path.join(self.server, "challenges", f"{name}.pem")

    # -- reading -----------------------------------------------------------------------
    def load_account_key(self) -> bytes | None:
        """The account key's PEM, or None when there is none yet.

        Raises:
            OSError: it exists but cannot be read.
        """
        try:
            with open(self.account_key, "rb") as file:
                return file.read()
        except FileNotFoundError:
            return None

    def stored(self, name: str) -> StoredCertificate | None:
        """`name`'s certificate, or None when there is none, or none usable: a chain or
        key that cannot be read or parsed, or a key that is not the leaf's (each logged)."""
        cert, key = self.certificate_files(name)
        try:
            with open(cert, "rb") as file:
                chain = file.read()
            with open(key, "rb") as file:
                private = serialization.load_pem_private_key(file.read(), password=None)
            leaf = x509.load_pem_x509_certificates(chain)[0]
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError) as exc:
            log.warning("acme: the stored certificate of %s cannot be used: %s", name, exc)
            return None
        if _public_der(private.public_key()) != _public_der(leaf.public_key()):
            log.warning("acme: the stored certificate of %s does not match its key", name)
            return None
        return StoredCertificate(name, cert, key, leaf)

    # -- writing (the supervisor alone) ------------------------------------------------
    def save_account_key(self, pem: bytes) -> None:
        """Keep the account key (0600).

        Raises:
            OSError: it cannot be written.
        """
        write_atomically(self.account_key, pem, PRIVATE_FILE_MODE)

    def save_certificate(self, name: str, chain_pem: bytes, key_pem: bytes) -> StoredCertificate:
        """Keep `name`'s new certificate: the key first, then the chain.

        Raises:
            OSError: a file cannot be written.
            ValueError: what was written does not read back as a certificate and its key.
        """
        cert, key = self.certificate_files(name)
        write_atomically(key, key_pem, PRIVATE_FILE_MODE)
        write_atomically(cert, chain_pem, PUBLIC_FILE_MODE)
        stored = self.stored(name)
        if stored is None:
            raise ValueError(f"the certificate of {name} did not read back from {cert}")
        return stored

    def save_challenge(self, name: str, pem: bytes) -> str:
        """Keep a TLS-ALPN-01 challenge's key and certificate (0600); its path.

        Raises:
            OSError: it cannot be written.
        """
        path = self.challenge_file(name)
        write_atomically(path, pem, PRIVATE_FILE_MODE)
        return path

    def remove_challenge(self, name: str) -> None:
        """Forget a challenge file (gone already is fine)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.challenge_file(name))


def _public_der(key: PublicKeyTypes | CertificatePublicKeyTypes) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
