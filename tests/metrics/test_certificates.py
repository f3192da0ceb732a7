"""The certificate expiry gauge's reading of certificate files (metrics/gateway.py)."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from metrics.gateway import (
    CERTIFICATE_EXPIRY,
    certificate_names,
    leaf_certificate,
    record_certificates,
)
from tests.support.tls import make_tls_files


def self_signed_without_names(path: Path, common_name: str) -> datetime.datetime:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, common_name)])
    expiry = datetime.datetime(2031, 1, 2, 3, 4, 5, tzinfo=datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC))
        .not_valid_after(expiry)
        .sign(key, hashes.SHA256())
    )
    path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return expiry


def test_a_certificate_without_alternative_names_is_named_by_its_common_name(
    tmp_path: Path,
) -> None:
    path = tmp_path / "old.pem"
    expiry = self_signed_without_names(path, "legacy.example.com")
    leaf = leaf_certificate(str(path))
    assert leaf is not None
    assert certificate_names(leaf) == "legacy.example.com"
    record_certificates([("old", str(path))])
    assert CERTIFICATE_EXPIRY.labels("old", "legacy.example.com")._value.get() == (
        expiry.timestamp()
    )


def test_the_leaf_is_the_first_certificate_of_the_chain(tmp_path: Path) -> None:
    files = make_tls_files(tmp_path, ("a.example.com", "b.example.com"))
    chain = tmp_path / "chain.pem"
    chain.write_bytes(files.cert.read_bytes() + files.ca.read_bytes())
    leaf = leaf_certificate(str(chain))
    assert leaf is not None
    assert certificate_names(leaf) == "a.example.com,b.example.com,127.0.0.1"


def test_a_file_that_cannot_be_read_any_more_is_left_out_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    record_certificates([("gone", str(tmp_path / "missing.pem"))])
    assert not [
        sample
        for family in CERTIFICATE_EXPIRY.collect()
        for sample in family.samples
        if sample.labels.get("listener") == "gone"
    ]
    assert "cannot read the certificate" in caplog.text
