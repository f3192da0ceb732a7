"""A TLS listener's certificate set (proxy/frontend/certificates.py): which context each
server name gets, what a certificate's names are, replacing the set all or nothing, and
the sources and override other code adds. Handshakes through a real gateway are in
tests/e2e/test_tls_sni.py."""

from __future__ import annotations

import datetime
import ssl
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from proxy.frontend.certificates import (
    CertificateSet,
    TlsSettings,
    load_certificate,
    served_names,
)
from tests.support.tls import IssuedFiles, TestCa

SETTINGS = TlsSettings()


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> TestCa:
    return TestCa(tmp_path_factory.mktemp("certificates"))


def pair(files: IssuedFiles) -> tuple[str, str]:
    return str(files.cert), str(files.key)


def served_by(certificates: CertificateSet, name: str | None) -> tuple[str, ...] | None:
    """The names of the certificate whose context `name` gets."""
    chosen = certificates.choose(name)
    for certificate in certificates.certificates():
        if certificate.context is chosen:
            return certificate.names
    return None if chosen is None else ("(not in the set)",)


def test_names_are_the_dns_and_ip_alternative_names_in_lower_case(ca: TestCa) -> None:
    files = ca.issue("mixed", ("API.Example.COM", "*.Example.com"), ips=("127.0.0.1", "::1"))

    certificate = load_certificate(SETTINGS, *pair(files))

    assert certificate.names == ("api.example.com", "*.example.com", "127.0.0.1", "::1")
    assert certificate.leaf == files.leaf()


def test_without_alternative_names_the_common_name_is_the_name(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "Legacy.Example.com")])
    now = datetime.datetime.now(datetime.UTC)
    leaf = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )

    assert served_names(leaf) == ("legacy.example.com",)


def test_the_choice_by_name(ca: TestCa) -> None:
    first = ca.issue("first", ("first.example.com",), ips=("127.0.0.1", "::1"))
    wild = ca.issue("wild", ("*.example.com", "f*.other.com", "*.*.deep.com"))
    exact = ca.issue("exact", ("www.example.com",))
    certificates = CertificateSet(SETTINGS, [pair(first), pair(wild), pair(exact)])
    first_names, wild_names, exact_names = (c.names for c in certificates.certificates())

    assert {
        name: served_by(certificates, name)
        for name in (
            "first.example.com",
            "www.example.com",
            "WWW.EXAMPLE.COM.",
            "x.example.com",
            "x.y.example.com",
            "example.com",
            ".example.com",
            "foo.other.com",  # partial wildcards are not served
            "a.b.deep.com",
            "127.0.0.1",  # an address as SNI (RFC 6066 forbids it; some clients do)
            "0:0::1",  # written another way
            "",
            None,
        )
    } == {
        "first.example.com": first_names,
        "www.example.com": exact_names,
        "WWW.EXAMPLE.COM.": exact_names,
        "x.example.com": wild_names,
        "x.y.example.com": first_names,
        "example.com": first_names,
        ".example.com": wild_names,
        "foo.other.com": first_names,
        "a.b.deep.com": first_names,
        "127.0.0.1": first_names,
        "0:0::1": first_names,
        "": first_names,
        None: first_names,
    }


def test_every_context_has_the_listeners_settings(ca: TestCa) -> None:
    settings = TlsSettings(min_version="1.3", alpn=("http/1.1",))
    files = ca.issue("settings", ("settings.example.com",))
    certificates = CertificateSet(settings, [pair(files)])
    contexts = [certificates.context, certificates.certificates()[0].context]

    for context in contexts:
        assert context.minimum_version is ssl.TLSVersion.TLSv1_3
        assert context.options & ssl.OP_NO_COMPRESSION
        assert context.options & ssl.OP_NO_RENEGOTIATION
    assert certificates.context.sni_callback is not None


def test_replace_is_all_or_nothing(ca: TestCa, tmp_path: Path) -> None:
    one = ca.issue("one", ("one.example.com",))
    two = ca.issue("two", ("two.example.com",))
    other = TestCa(tmp_path / "other").issue("mismatch", ("bad.example.com",))
    certificates = CertificateSet(SETTINGS, [pair(one)])

    with pytest.raises(ssl.SSLError):
        certificates.replace([pair(two), (str(two.cert), str(other.key))])
    assert served_by(certificates, "two.example.com") == ("one.example.com",)
    assert certificates.pairs() == [pair(one)]

    certificates.replace([pair(two), pair(one)])
    assert served_by(certificates, "one.example.com") == ("one.example.com",)
    assert served_by(certificates, None) == ("two.example.com",)


def test_a_missing_file_on_reload_keeps_the_set(ca: TestCa, tmp_path: Path) -> None:
    files = ca.issue("gone", ("gone.example.com",))
    certificates = CertificateSet(SETTINGS, [pair(files)])
    files.cert.unlink()

    with pytest.raises(FileNotFoundError):
        certificates.reload()
    assert served_by(certificates, None) == ("gone.example.com",)


def test_another_source_comes_after_the_config_and_survives_a_reload(ca: TestCa) -> None:
    config = ca.issue("config", ("shared.example.com", "*.wild.example.com"))
    extra = ca.issue("extra", ("shared.example.com", "extra.example.com", "a.wild.example.com"))
    certificates = CertificateSet(SETTINGS, [pair(config)])

    certificates.set_source("acme", [certificates.load(*pair(extra))])
    certificates.reload()

    assert served_by(certificates, "shared.example.com") == config_names(certificates)
    assert served_by(certificates, "extra.example.com") == extra_names(certificates)
    # An exact name of a later source still beats a wildcard of the config.
    assert served_by(certificates, "a.wild.example.com") == extra_names(certificates)
    assert served_by(certificates, None) == config_names(certificates)
    certificates.set_source("acme", [])
    assert len(certificates.certificates()) == 1
    assert served_by(certificates, "extra.example.com") == config_names(certificates)


def config_names(certificates: CertificateSet) -> tuple[str, ...]:
    return certificates.certificates()[0].names


def extra_names(certificates: CertificateSet) -> tuple[str, ...]:
    return certificates.certificates()[1].names


def test_a_set_of_other_sources_only_defaults_to_their_first(ca: TestCa) -> None:
    extra = ca.issue("only", ("only.example.com",))
    certificates = CertificateSet(SETTINGS, [])
    assert certificates.choose(None) is None  # no certificate: the handshake fails

    certificates.set_source("acme", [certificates.load(*pair(extra))])

    assert served_by(certificates, "else.example.com") == ("only.example.com",)


def test_the_override_comes_first_and_none_falls_back(ca: TestCa) -> None:
    files = ca.issue("base", ("base.example.com",))
    challenge = ca.issue("challenge", ("base.example.com",))
    certificates = CertificateSet(SETTINGS, [pair(files)])
    special = certificates.new_context(*pair(challenge), alpn=["acme-tls/1"])
    asked: list[str] = []

    def override(name: str) -> ssl.SSLContext | None:
        asked.append(name)
        return special if name == "base.example.com" else None

    certificates.override = override

    assert certificates.choose("BASE.example.com.") is special
    assert served_by(certificates, "other.example.com") == ("base.example.com",)
    assert served_by(certificates, None) == ("base.example.com",)  # no name: not asked
    assert asked == ["base.example.com", "other.example.com"]


def test_a_key_file_written_between_reads_is_refused(ca: TestCa, tmp_path: Path) -> None:
    """A certificate that changes while it is loaded (a renewal half written) is refused
    rather than served under the names of the other version."""
    files = ca.issue("moving", ("moving.example.com",))
    renewed = ca.issue("renewed", ("renewed.example.com",))
    original = files.cert.read_bytes()

    class Moving(TlsSettings):
        def context(self, alpn: object = None) -> ssl.SSLContext:
            files.cert.write_bytes(renewed.cert.read_bytes())  # written mid-load
            files.key.write_bytes(renewed.key.read_bytes())
            return super().context()

    with pytest.raises(ssl.SSLError, match="changed while it was being read"):
        load_certificate(Moving(), *pair(files))
    assert original != files.cert.read_bytes()


def test_a_pem_form_the_names_cannot_be_read_from_is_an_ssl_error(ca: TestCa) -> None:
    files = ca.issue("trusted", ("trusted.example.com",))
    # OpenSSL takes this form; cryptography, which reads the names, does not.
    files.cert.write_text(files.cert.read_text().replace("CERTIFICATE", "TRUSTED CERTIFICATE"))

    with pytest.raises(ssl.SSLError, match="cannot read the names"):
        load_certificate(SETTINGS, *pair(files))
