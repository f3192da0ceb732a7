"""routes.yaml for HTTP/2 and TLS on the gateway's side (proxy/config/server.py):
`listeners[].tls` and `listeners[].http2`, and the top-level `http2` section (an
upstream's are in test_upstream_tls.py). Every error names the file, the line and the key
path. The PEM files are real (tests/support/tls.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from proxy.config.model import (
    DEFAULT_H2_INITIAL_WINDOW_BYTES,
    DEFAULT_H2_MAX_CONCURRENT_STREAMS,
    DEFAULT_H2_MAX_CONTROL_FRAMES_PER_SECOND,
    DEFAULT_H2_MAX_RESETS_PER_SECOND,
    DEFAULT_MAX_HEAD_BYTES,
    ClientAuth,
    Http2Config,
    ListenerConfig,
    ListenerTls,
    TlsCertificate,
)
from tests.support.config_helpers import BASE, errors_of, one_error, parse
from tests.support.tls import TlsFiles, make_tls_files

NO_ROUTES = "upstreams: {}\nroutes: []\n"


def listener_tls(tls: str, extra: str = "") -> str:
    """A file whose one listener (line 3) has `tls` (a flow mapping) and `extra` keys."""
    return f"listeners:\n  - bind: ':0'\n    tls: {tls}\n{extra}{NO_ROUTES}"


def pair(cert: Path | str, key: Path | str, more: str = "") -> str:
    return f"{{cert: '{cert}', key: '{key}'{more}}}"


@pytest.fixture
def other_files(tmp_path: Path) -> TlsFiles:
    """A second PKI: its key does not match `tls_files`' certificate."""
    return make_tls_files(tmp_path / "other")


# --- listeners[].tls and listeners[].http2 ---


def test_a_listener_without_tls_is_plaintext_and_speaks_http2() -> None:
    listener = parse(BASE + "routes: []\n").listeners[0]

    assert listener == ListenerConfig("0.0.0.0", 0, "listeners[0]", tls=None, http2=True)


def test_listener_tls_reads_the_pair_and_defaults_to_tls_1_2(tls_files: TlsFiles) -> None:
    listener = parse(listener_tls(pair(tls_files.cert, tls_files.key))).listeners[0]

    assert listener.tls == ListenerTls(
        (TlsCertificate(str(tls_files.cert), str(tls_files.key)),), "1.2"
    )
    assert listener.http2 is True


# Regression: an unquoted `min_version: 1.3` is a YAML float and was refused as "expected
# a string"; it is read as written.
@pytest.mark.parametrize(("written", "version"), [("'1.2'", "1.2"), ("1.3", "1.3"), ("1.2", "1.2")])
def test_min_version_is_read_quoted_or_not(tls_files: TlsFiles, written: str, version: str) -> None:
    text = listener_tls(pair(tls_files.cert, tls_files.key, f", min_version: {written}"))

    tls = parse(text).listeners[0].tls

    assert tls is not None
    assert tls.min_version == version


@pytest.mark.parametrize("written", ["1.1", "'1.0'", "TLSv1.3", "1.30"])
def test_an_unsupported_min_version_is_an_error(tls_files: TlsFiles, written: str) -> None:
    text = listener_tls(pair(tls_files.cert, tls_files.key, f", min_version: {written}"))
    shown = written.strip("'")

    assert one_error(text) == (
        f"routes.yaml:3: listeners[0].tls.min_version: unsupported TLS version {shown!r} "
        "(supported: 1.2, 1.3)"
    )


def test_unreadable_cert_and_key_files_are_each_an_error(tmp_path: Path) -> None:
    text = """\
        listeners:
          - bind: ':0'
            tls:
              cert: {missing}
              key: {directory}
        upstreams: {{}}
        routes: []
    """.format(missing=tmp_path / "missing.pem", directory=tmp_path)

    assert errors_of(text) == [
        f"routes.yaml:4: listeners[0].tls.cert: cannot read '{tmp_path / 'missing.pem'}': "
        "No such file or directory",
        f"routes.yaml:5: listeners[0].tls.key: cannot read '{tmp_path}': Is a directory",
    ]


def test_a_key_that_does_not_match_the_certificate_is_an_error(
    tls_files: TlsFiles, other_files: TlsFiles
) -> None:
    text = listener_tls(pair(tls_files.cert, other_files.key))

    assert one_error(text) == (
        f"routes.yaml:3: listeners[0].tls: the certificate '{tls_files.cert}' does not match "
        f"the key '{other_files.key}'"
    )


def test_swapped_cert_and_key_blame_the_cert(tls_files: TlsFiles) -> None:
    text = listener_tls(pair(tls_files.key, tls_files.cert))

    assert one_error(text) == (
        f"routes.yaml:3: listeners[0].tls.cert: '{tls_files.key}' holds no PEM certificate"
    )


def test_a_key_file_that_is_not_pem_is_an_error(tls_files: TlsFiles, tmp_path: Path) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not a key\n")

    assert one_error(listener_tls(pair(tls_files.cert, junk))) == (
        f"routes.yaml:3: listeners[0].tls.key: cannot load the key '{junk}': not a PEM private key"
    )


# Regression: an encrypted key made OpenSSL prompt for a passphrase on the terminal (so
# `gatehouse check` could hang), then blamed the certificate.
def test_an_encrypted_key_is_an_error_without_a_prompt(tls_files: TlsFiles, tmp_path: Path) -> None:
    encrypted = tmp_path / "encrypted.pem"
    key = ec.generate_private_key(ec.SECP256R1())
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )

    assert one_error(listener_tls(pair(tls_files.cert, encrypted))) == (
        f"routes.yaml:3: listeners[0].tls.key: the key '{encrypted}' is encrypted "
        "(a passphrase-less key is needed)"
    )


def test_tls_needs_both_cert_and_key(tls_files: TlsFiles) -> None:
    assert one_error(listener_tls(f"{{cert: '{tls_files.cert}'}}")) == (
        "routes.yaml:3: listeners[0].tls: missing required key 'key'"
    )


def test_unknown_tls_keys_are_errors(tls_files: TlsFiles) -> None:
    text = listener_tls(pair(tls_files.cert, tls_files.key, ", ciphers: HIGH, min_versoin: '1.3'"))

    assert errors_of(text) == [
        "routes.yaml:3: listeners[0].tls.ciphers: unknown key 'ciphers' "
        "(expected one of: certificates, cert, key, min_version, client_auth, acme)",
        "routes.yaml:3: listeners[0].tls.min_versoin: unknown key 'min_versoin' "
        "(did you mean 'min_version'?)",
    ]


def test_a_misspelt_cert_key_is_reported_once(tls_files: TlsFiles) -> None:
    text = listener_tls(f"{{crt: '{tls_files.cert}', key: '{tls_files.key}'}}")

    assert one_error(text) == (
        "routes.yaml:3: listeners[0].tls.crt: unknown key 'crt' (did you mean 'cert'?)"
    )


def test_tls_must_be_a_mapping() -> None:
    assert one_error(listener_tls("cert.pem")) == (
        "routes.yaml:3: listeners[0].tls: expected a mapping, got a string ('cert.pem')"
    )


# --- listeners[].tls.certificates ---


def certificates(*pairs: str, extra: str = "") -> str:
    """A file whose listener (line 3) lists `pairs` under tls.certificates (line 5 on,
    one pair a line)."""
    items = "".join(f"        - {item}\n" for item in pairs)
    return f"listeners:\n  - bind: ':0'\n    tls:\n      certificates:\n{items}{extra}{NO_ROUTES}"


def test_certificates_are_read_in_order(tls_files: TlsFiles, other_files: TlsFiles) -> None:
    text = certificates(
        pair(tls_files.cert, tls_files.key),
        pair(other_files.cert, other_files.key),
        extra="      min_version: '1.3'\n",
    )

    assert parse(text).listeners[0].tls == ListenerTls(
        (
            TlsCertificate(str(tls_files.cert), str(tls_files.key)),
            TlsCertificate(str(other_files.cert), str(other_files.key)),
        ),
        "1.3",
    )


def test_tls_certificates_lists_every_certificate_of_every_listener(
    tls_files: TlsFiles, other_files: TlsFiles
) -> None:
    text = certificates(
        pair(tls_files.cert, tls_files.key), pair(other_files.cert, other_files.key)
    ).replace(
        "upstreams:",
        f"  - bind: ':1'\n    name: second\n    tls: {pair(other_files.cert, other_files.key)}\n"
        "  - bind: ':2'\nupstreams:",
    )

    assert parse(text).tls_certificates() == [
        ("listeners[0]", str(tls_files.cert)),
        ("listeners[0]", str(other_files.cert)),
        ("second", str(other_files.cert)),
    ]


def test_each_bad_certificate_is_an_error_at_its_own_line(
    tls_files: TlsFiles, other_files: TlsFiles, tmp_path: Path
) -> None:
    missing = tmp_path / "missing.pem"
    text = certificates(
        pair(tls_files.cert, tls_files.key),
        pair(tls_files.cert, other_files.key),
        pair(missing, tls_files.key),
        pair(tls_files.key, tls_files.cert),
        f"{{cert: '{tls_files.cert}'}}",
        f"{{cert: '{tls_files.cert}', key: '{tls_files.key}', ca: x}}",
    )

    assert errors_of(text) == [
        f"routes.yaml:6: listeners[0].tls.certificates[1]: the certificate '{tls_files.cert}' "
        f"does not match the key '{other_files.key}'",
        f"routes.yaml:7: listeners[0].tls.certificates[2].cert: cannot read '{missing}': "
        "No such file or directory",
        f"routes.yaml:8: listeners[0].tls.certificates[3].cert: '{tls_files.key}' holds no "
        "PEM certificate",
        "routes.yaml:9: listeners[0].tls.certificates[4]: missing required key 'key'",
        "routes.yaml:10: listeners[0].tls.certificates[5].ca: unknown key 'ca' "
        "(expected one of: cert, key)",
    ]


def test_an_encrypted_key_in_the_list_is_an_error(tls_files: TlsFiles, tmp_path: Path) -> None:
    encrypted = tmp_path / "encrypted.pem"
    key = ec.generate_private_key(ec.SECP256R1())
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    text = certificates(pair(tls_files.cert, tls_files.key), pair(tls_files.cert, encrypted))

    assert one_error(text) == (
        f"routes.yaml:6: listeners[0].tls.certificates[1].key: the key '{encrypted}' is "
        "encrypted (a passphrase-less key is needed)"
    )


def test_a_certificate_in_a_form_whose_names_cannot_be_read_is_an_error(
    tls_files: TlsFiles, tmp_path: Path
) -> None:
    trusted = tmp_path / "trusted.pem"
    trusted.write_text(tls_files.cert.read_text().replace("CERTIFICATE", "TRUSTED CERTIFICATE"))

    assert one_error(listener_tls(pair(trusted, tls_files.key))) == (
        f"routes.yaml:3: listeners[0].tls.cert: '{trusted}': the leaf must be a "
        "'BEGIN CERTIFICATE' PEM block"
    )


def test_certificates_and_the_shorthand_together_are_an_error(tls_files: TlsFiles) -> None:
    text = certificates(
        pair(tls_files.cert, tls_files.key), extra=f"      cert: {tls_files.cert}\n"
    )

    assert one_error(text) == (
        "routes.yaml:6: listeners[0].tls.cert: give certificates, or cert and key, not both"
    )


def test_tls_without_any_certificate_is_an_error() -> None:
    assert one_error(listener_tls("{min_version: '1.3'}")) == (
        "routes.yaml:3: listeners[0].tls: missing required key 'certificates' "
        "(or 'cert' and 'key' for one, or 'acme')"
    )


@pytest.mark.parametrize(
    ("written", "message"),
    [
        ("[]", "must list at least one certificate"),
        ("x.pem", "expected a list, got a string ('x.pem')"),
    ],
)
def test_certificates_must_be_a_nonempty_list(written: str, message: str) -> None:
    text = listener_tls(f"{{certificates: {written}}}")

    assert one_error(text) == f"routes.yaml:3: listeners[0].tls.certificates: {message}"


def test_a_certificate_must_be_a_mapping(tls_files: TlsFiles) -> None:
    text = certificates(pair(tls_files.cert, tls_files.key), "x.pem")

    assert one_error(text) == (
        "routes.yaml:6: listeners[0].tls.certificates[1]: expected a mapping, "
        "got a string ('x.pem')"
    )


# --- listeners[].tls.client_auth ---


@pytest.mark.parametrize(("written", "mode"), [("", "require"), (", mode: optional", "optional")])
def test_client_auth_reads_the_ca_and_the_mode(
    tls_files: TlsFiles, written: str, mode: str
) -> None:
    text = listener_tls(
        pair(tls_files.cert, tls_files.key, f", client_auth: {{ca: '{tls_files.ca}'{written}}}")
    )

    tls = parse(text).listeners[0].tls

    assert tls is not None
    assert tls.client_auth == ClientAuth(str(tls_files.ca), mode)


def test_client_auth_errors(tls_files: TlsFiles, tmp_path: Path) -> None:
    missing = tmp_path / "ca.pem"

    def with_client_auth(client_auth: str) -> str:
        return listener_tls(pair(tls_files.cert, tls_files.key, f", client_auth: {client_auth}"))

    assert one_error(with_client_auth(f"{{ca: '{tls_files.key}'}}")) == (
        f"routes.yaml:3: listeners[0].tls.client_auth.ca: '{tls_files.key}' holds no PEM "
        "certificate"
    )
    assert one_error(with_client_auth(f"{{ca: '{missing}'}}")) == (
        f"routes.yaml:3: listeners[0].tls.client_auth.ca: cannot read '{missing}': "
        "No such file or directory"
    )
    assert one_error(with_client_auth("{mode: optional}")) == (
        "routes.yaml:3: listeners[0].tls.client_auth: missing required key 'ca'"
    )
    assert one_error(with_client_auth(f"{{ca: '{tls_files.ca}', mode: request}}")) == (
        "routes.yaml:3: listeners[0].tls.client_auth.mode: unsupported mode 'request' "
        "(supported: require, optional) (did you mean 'require'?)"
    )


@pytest.mark.parametrize(("written", "enabled"), [("false", False), ("true", True)])
def test_listener_http2_switches_http2_on_and_off(written: str, enabled: bool) -> None:
    text = f"listeners: [{{bind: ':0', http2: {written}}}]\n{NO_ROUTES}"

    assert parse(text).listeners[0].http2 is enabled


def test_listener_http2_must_be_a_boolean() -> None:
    text = f"listeners:\n  - bind: ':0'\n    http2: h2c\n{NO_ROUTES}"

    assert one_error(text) == (
        "routes.yaml:3: listeners[0].http2: expected true or false, got a string ('h2c')"
    )


def test_a_misspelt_listener_key_suggests_http2() -> None:
    text = f"listeners:\n  - bind: ':0'\n    htp2: false\n{NO_ROUTES}"

    assert one_error(text) == (
        "routes.yaml:3: listeners[0].htp2: unknown key 'htp2' (did you mean 'http2'?)"
    )


# --- the http2 section ---


def test_http2_settings_default_when_the_section_is_absent() -> None:
    assert parse(BASE + "routes: []\n").http2 == Http2Config(
        max_concurrent_streams=DEFAULT_H2_MAX_CONCURRENT_STREAMS,
        max_header_list_size=DEFAULT_MAX_HEAD_BYTES,
        initial_window_size=DEFAULT_H2_INITIAL_WINDOW_BYTES,
        max_resets_per_second=DEFAULT_H2_MAX_RESETS_PER_SECOND,
        max_control_frames_per_second=DEFAULT_H2_MAX_CONTROL_FRAMES_PER_SECOND,
    )


def test_every_http2_key_is_read() -> None:
    text = (
        BASE
        + """\
routes: []
http2:
  max_concurrent_streams: 250
  max_header_list_size: 16KiB
  initial_window_size: 64KiB
  max_resets_per_second: 50
  max_control_frames_per_second: 1000
"""
    )

    assert parse(text).http2 == Http2Config(
        max_concurrent_streams=250,
        max_header_list_size=16 * 1024,
        initial_window_size=64 * 1024,
        max_resets_per_second=50,
        max_control_frames_per_second=1000,
    )


def test_http2_limits_have_minimums() -> None:
    text = (
        BASE
        + """\
routes: []
http2:
  max_concurrent_streams: 0
  max_header_list_size: 0
  initial_window_size: 0B
  max_resets_per_second: 0
  max_control_frames_per_second: -1
"""
    )

    assert errors_of(text) == [
        "routes.yaml:6: http2.max_concurrent_streams: must be at least 1, got 0",
        "routes.yaml:7: http2.max_header_list_size: must be greater than 0",
        "routes.yaml:8: http2.initial_window_size: must be greater than 0",
        "routes.yaml:9: http2.max_resets_per_second: must be at least 1, got 0",
        "routes.yaml:10: http2.max_control_frames_per_second: must be at least 1, got -1",
    ]


def test_the_initial_window_may_be_2_31_minus_1_bytes() -> None:
    text = BASE + "routes: []\nhttp2: {initial_window_size: 2147483647}\n"

    assert parse(text).http2.initial_window_size == 2**31 - 1


@pytest.mark.parametrize("written", ["2147483648", "2GiB", "1TiB"])
def test_an_initial_window_above_2_31_minus_1_is_an_error(written: str) -> None:
    text = BASE + f"routes: []\nhttp2:\n  initial_window_size: {written}\n"

    assert one_error(text) == (
        "routes.yaml:6: http2.initial_window_size: at most 2147483647 bytes (2^31-1)"
    )


def test_settings_may_be_2_32_minus_1() -> None:
    limits = "{max_concurrent_streams: 4294967295, max_header_list_size: 4294967295}"
    text = BASE + f"routes: []\nhttp2: {limits}\n"

    settings = parse(text).http2

    assert settings.max_concurrent_streams == settings.max_header_list_size == 2**32 - 1


# Regression: h2 packs SETTINGS values into 32 bits, so a larger value passed the check and
# then failed (struct.error) at the first HTTP/2 connection.
def test_settings_above_32_bits_are_errors() -> None:
    text = (
        BASE
        + """\
routes: []
http2:
  max_concurrent_streams: 4294967296
  max_header_list_size: 4GiB
"""
    )

    assert errors_of(text) == [
        "routes.yaml:6: http2.max_concurrent_streams: at most 4294967295 (2^32-1)",
        "routes.yaml:7: http2.max_header_list_size: at most 4294967295 bytes (2^32-1)",
    ]


def test_unknown_http2_keys_are_errors() -> None:
    text = BASE + "routes: []\nhttp2:\n  max_streams: 10\n"

    assert one_error(text) == (
        "routes.yaml:6: http2.max_streams: unknown key 'max_streams' "
        "(did you mean 'max_concurrent_streams'?)"
    )


def test_the_http2_section_must_be_a_mapping() -> None:
    assert one_error(BASE + "routes: []\nhttp2: true\n") == (
        "routes.yaml:5: http2: expected a mapping, got a boolean (true)"
    )
