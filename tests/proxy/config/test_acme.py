"""`listeners[].tls.acme` (proxy/config/acme.py): what a valid section becomes, and every
refusal with its file, line and key path, as `gatehouse check` reports them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from proxy.config.model import DEFAULT_ACME_RENEW_BEFORE_S, AcmeConfig, ListenerTls
from tests.support.config_helpers import errors_of, one_error, parse
from tests.support.tls import TlsFiles

DIRECTORY = "https://acme-v02.api.letsencrypt.org/directory"
NO_ROUTES = "upstreams: {}\nroutes: []\n"


def acme_config(acme: str, *, plaintext: bool = True, second: str = "") -> str:
    """A TLS listener with `acme` (a flow mapping, line 4), a plaintext listener (lines 6
    and 7) unless `plaintext` is false, then `second`: more listener items."""
    plain = "  - bind: ':8080'\n    name: plain\n" if plaintext else ""
    return (
        "listeners:\n"
        "  - bind: ':8443'\n"
        "    tls:\n"
        f"      acme: {acme}\n"
        "    name: secure\n"
        f"{plain}{second}{NO_ROUTES}"
    )


def acme(storage: Path, more: str = "", domains: str = "[api.example.com]") -> str:
    return f"{{directory: '{DIRECTORY}', domains: {domains}, storage: '{storage}'{more}}}"


def test_the_least_section_takes_the_defaults(tmp_path: Path) -> None:
    config = parse(acme_config(acme(tmp_path / "acme")))
    tls = config.listeners[0].tls
    assert tls == ListenerTls(
        (),
        acme=AcmeConfig(DIRECTORY, ("api.example.com",), str(tmp_path / "acme")),
    )
    assert tls.acme is not None
    assert tls.acme.challenge == "http-01"
    assert tls.acme.renew_before == DEFAULT_ACME_RENEW_BEFORE_S == 30 * 86400


def test_every_key(tmp_path: Path, tls_files: TlsFiles) -> None:
    more = (
        f", email: 'mailto:ops@example.com', challenge: tls-alpn-01, ca: '{tls_files.ca}',"
        " renew_before: 14d"
    )
    text = acme(tmp_path, more, domains="[API.Example.com., www.example.com]")
    config = parse(acme_config(text, plaintext=False))
    assert config.listeners[0].tls == ListenerTls(
        (),
        acme=AcmeConfig(
            DIRECTORY,
            ("api.example.com", "www.example.com"),
            str(tmp_path),
            email="ops@example.com",
            challenge="tls-alpn-01",
            ca=str(tls_files.ca),
            renew_before=14 * 86400.0,
        ),
    )


def test_acme_beside_certificates_of_the_config(tmp_path: Path, tls_files: TlsFiles) -> None:
    text = (
        "listeners:\n  - bind: ':8443'\n    tls:\n"
        f"      certificates: [{{cert: '{tls_files.cert}', key: '{tls_files.key}'}}]\n"
        f"      acme: {acme(tmp_path)}\n  - bind: ':8080'\n{NO_ROUTES}"
    )
    tls = parse(text).listeners[0].tls
    assert tls is not None
    assert len(tls.certificates) == 1
    assert tls.acme is not None


@pytest.mark.parametrize(
    ("more", "domains", "where", "message"),
    [
        ("", "[]", "domains", "must list at least one name"),
        (
            "",
            "['*.example.com']",
            "domains[0]",
            "'*.example.com': a wildcard needs the dns-01 challenge, which is not offered",
        ),
        ("", "[192.0.2.1]", "domains[0]", "'192.0.2.1': ACME certificates here are for DNS names"),
        (
            "",
            "['[2001:db8::1]']",
            "domains[0]",
            "'[2001:db8::1]': ACME certificates here are for DNS names",
        ),
        ("", "[localhost]", "domains[0]", "'localhost' is not a DNS name like 'api.example.com'"),
        (
            "",
            "[a_b.example.com]",
            "domains[0]",
            "'a_b.example.com' is not a DNS name like 'api.example.com'",
        ),
        (
            "",
            "[a.example.com, A.example.com]",
            "domains[1]",
            "'a.example.com' is listed twice (also listeners[0].tls.acme.domains[0])",
        ),
        (", email: ops", "[a.example.com]", "email", "'ops' is not an email address"),
        (
            ", challenge: dns-01",
            "[a.example.com]",
            "challenge",
            "unsupported challenge 'dns-01' (supported: http-01, tls-alpn-01)",
        ),
        (", renew_before: 0s", "[a.example.com]", "renew_before", None),
    ],
)
def test_invalid_values_are_errors_with_their_line(
    tmp_path: Path, more: str, domains: str, where: str, message: str | None
) -> None:
    error = one_error(acme_config(acme(tmp_path, more, domains)))
    assert error.startswith(f"routes.yaml:4: listeners[0].tls.acme.{where}: ")
    if message is not None:
        assert error.endswith(message)


@pytest.mark.parametrize(
    ("directory", "message"),
    [
        (
            "http://acme.example/directory",
            "the directory must be an https:// URL (RFC 8555 section 6.1), not"
            " 'http://acme.example/directory'",
        ),
        ("acme.example/directory", "the directory must be an https:// URL"),
        ("https://acme.example:99999/dir", "invalid directory URL"),
    ],
)
def test_the_directory_is_an_https_url(tmp_path: Path, directory: str, message: str) -> None:
    text = acme_config(
        f"{{directory: '{directory}', domains: [a.example.com], storage: '{tmp_path}'}}"
    )
    error = one_error(text)
    assert error.startswith("routes.yaml:4: listeners[0].tls.acme.directory: " + message)


def test_the_required_keys(tmp_path: Path) -> None:
    assert errors_of(acme_config("{challenge: http-01}")) == [
        f"routes.yaml:4: listeners[0].tls.acme: missing required key '{key}'"
        for key in ("directory", "domains", "storage")
    ]


def test_storage_must_be_writable_or_made_in_a_writable_directory(tmp_path: Path) -> None:
    parse(acme_config(acme(tmp_path / "not" / "there" / "yet")))  # made at the first write
    afile = tmp_path / "file"
    afile.write_text("")
    assert one_error(acme_config(acme(afile))).endswith(f"{str(afile)!r} is not a directory")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    if os.access(locked, os.W_OK):  # root writes anywhere: nothing to check then
        return
    assert one_error(acme_config(acme(locked / "acme"))).endswith(
        f"{str(locked)!r} is not writable by this process"
    )


def test_the_ca_must_be_a_readable_bundle(tmp_path: Path) -> None:
    missing = tmp_path / "missing.pem"
    error = one_error(acme_config(acme(tmp_path, f", ca: '{missing}'")))
    assert error.startswith("routes.yaml:4: listeners[0].tls.acme.ca: cannot read")


def test_http01_needs_a_plaintext_listener(tmp_path: Path) -> None:
    text = acme_config(acme(tmp_path, ", challenge: http-01"), plaintext=False)
    assert one_error(text) == (
        "routes.yaml:4: listeners[0].tls.acme.challenge: http-01 is answered on port 80: it"
        " needs a plaintext listener (or use tls-alpn-01)"
    )
    parse(acme_config(acme(tmp_path, ", challenge: tls-alpn-01"), plaintext=False))


def test_one_name_in_one_storage_is_one_certificate(tmp_path: Path) -> None:
    same = f"  - bind: ':9443'\n    tls:\n      acme: {acme(tmp_path)}\n"
    parse(acme_config(acme(tmp_path), second=same))  # the same settings: shared
    more_names = acme(tmp_path, domains="[api.example.com, www.example.com]")
    parse(
        acme_config(
            acme(tmp_path), second=f"  - bind: ':9443'\n    tls:\n      acme: {more_names}\n"
        )
    )
    other = f"  - bind: ':9443'\n    tls:\n      acme: {acme(tmp_path, ', email: a@example.com')}\n"
    assert one_error(acme_config(acme(tmp_path), second=other)) == (
        "routes.yaml:10: listeners[2].tls.acme: 'api.example.com' is also obtained by"
        " listeners[0].tls.acme with other settings: one name in one storage is one certificate"
    )
    other_storage = acme(tmp_path / "b", ", email: a@example.com")
    elsewhere = f"  - bind: ':9443'\n    tls:\n      acme: {other_storage}\n"
    parse(acme_config(acme(tmp_path), second=elsewhere))  # another storage: another one
