"""Certificates for TLS tests, made with `cryptography` at test time (nothing secret is
committed): a throw-away CA and a server certificate it signed (`make_tls_files`), or a
CA that issues as many server and client certificates as a test needs (`TestCa`)."""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class TlsFiles:
    """PEM files of one test PKI: `ca` signed `cert` (for `localhost` and 127.0.0.1)."""

    ca: Path
    cert: Path
    key: Path

    def server_context(self, alpn: list[str]) -> ssl.SSLContext:
        """A server-side context for test upstreams, offering `alpn`."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert, self.key)
        context.set_alpn_protocols(alpn)
        return context

    def client_context(self, alpn: list[str]) -> ssl.SSLContext:
        """A client-side context that trusts `ca`, offering `alpn`."""
        context = ssl.create_default_context(cafile=str(self.ca))
        context.set_alpn_protocols(alpn)
        return context


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


@dataclass(frozen=True)
class IssuedFiles:
    """A certificate `TestCa.issue` wrote: its PEM chain (the leaf alone) and key."""

    cert: Path
    key: Path

    def leaf(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.cert.read_bytes())


class TestCa:
    """A throw-away CA that issues server and client certificates into `directory`
    (`ca.pem` is its certificate)."""

    __test__ = False  # not a test class, whatever its name

    def __init__(self, directory: Path, name: str = "gatehouse test CA") -> None:
        now = datetime.datetime.now(datetime.UTC)
        self.directory = directory
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.certificate = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(_name(name))
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        directory.mkdir(parents=True, exist_ok=True)
        self.ca = directory / "ca.pem"
        self.ca.write_bytes(self.certificate.public_bytes(serialization.Encoding.PEM))

    def issue(
        self,
        file_name: str,
        dns: tuple[str, ...] = (),
        *,
        subject: x509.Name | None = None,
        ips: tuple[str, ...] = (),
        uris: tuple[str, ...] = (),
        emails: tuple[str, ...] = (),
        expired: bool = False,
        client: bool = False,
        validity: tuple[datetime.datetime, datetime.datetime] | None = None,
    ) -> IssuedFiles:
        """Write `<file_name>.pem` and `<file_name>.key`: a certificate for these names
        (subject: CN of the first DNS name unless given), valid now (or expired an hour
        ago, or over `validity`), for a server (or, `client`, a TLS client)."""
        now = datetime.datetime.now(datetime.UTC)
        if validity is None and expired:
            validity = (now - datetime.timedelta(days=2), now - datetime.timedelta(hours=1))
        elif validity is None:
            validity = (now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=1))
        names: list[x509.GeneralName] = [x509.DNSName(name) for name in dns]
        names += [x509.IPAddress(ipaddress.ip_address(address)) for address in ips]
        names += [x509.UniformResourceIdentifier(uri) for uri in uris]
        names += [x509.RFC822Name(email) for email in emails]
        key = ec.generate_private_key(ec.SECP256R1())
        usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject or _name(dns[0] if dns else file_name))
            .issuer_name(self.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(validity[0])
            .not_valid_after(validity[1])
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        files = IssuedFiles(
            self.directory / f"{file_name}.pem", self.directory / f"{file_name}.key"
        )
        files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        files.key.write_bytes(_pem_key(key))
        return files

    def client_context(self, alpn: list[str] | None = None) -> ssl.SSLContext:
        """A client context that trusts this CA (offering `alpn`)."""
        context = ssl.create_default_context(cafile=str(self.ca))
        if alpn:
            context.set_alpn_protocols(alpn)
        return context


def make_tls_files(directory: Path, hostnames: tuple[str, ...] = ("localhost",)) -> TlsFiles:
    """Write a CA and a server certificate for `hostnames` and 127.0.0.1 into `directory`."""
    ca = TestCa(directory)
    issued = ca.issue("cert", hostnames, ips=("127.0.0.1",))
    files = TlsFiles(ca.ca, directory / "cert.pem", directory / "key.pem")
    issued.key.rename(files.key)
    return files
