"""routes.yaml for HTTP/2 and TLS toward an upstream (proxy/config/upstream.py): its
`protocol`, https:// endpoints and `tls` (the gateway's own side is in
test_server_http2_tls.py). Every error names the file, the line and the key path. The PEM
files are real (tests/support/tls.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.config.upstream_model import UpstreamTls
from tests.support.config_helpers import BASE, errors_of, one_error, parse
from tests.support.tls import TlsFiles, make_tls_files


def upstream(lines: str) -> str:
    """A file whose upstream `u` has the keys in `lines` (the first at line 4)."""
    indented = "".join(f"    {line}\n" for line in lines.splitlines())
    return f"listeners: [{{bind: ':0'}}]\nupstreams:\n  u:\n{indented}routes: []\n"


def test_an_upstream_speaks_http1_with_default_tls_settings() -> None:
    parsed = parse(BASE + "routes: []\n").upstreams["users"]

    assert parsed.protocol == "http1"
    assert parsed.tls == UpstreamTls(ca=None, verify=True, sni=None)


def test_https_endpoints_default_to_port_443() -> None:
    text = upstream("endpoints: [https://Users.Internal, 'https://[::1]', https://b:8443/]")

    endpoints = parse(text).upstreams["u"].endpoints

    assert [(e.url, e.scheme, e.host, e.port) for e in endpoints] == [
        ("https://users.internal:443", "https", "users.internal", 443),
        ("https://[::1]:443", "https", "::1", 443),
        ("https://b:8443", "https", "b", 8443),
    ]


@pytest.mark.parametrize(
    ("protocol", "url"),
    [("http1", "http://a"), ("http1", "https://a"), ("h2c", "http://a"), ("h2", "https://a")],
)
def test_protocols_go_with_their_schemes(protocol: str, url: str) -> None:
    text = upstream(f"endpoints: [{url}]\nprotocol: {protocol}")

    assert parse(text).upstreams["u"].protocol == protocol


def test_an_unknown_protocol_is_an_error() -> None:
    assert one_error(upstream("endpoints: [http://a]\nprotocol: http2")) == (
        "routes.yaml:5: upstreams.u.protocol: unsupported protocol 'http2' "
        "(supported: http1, h2c, h2) (did you mean 'http1'?)"
    )


def test_h2c_with_an_https_endpoint_is_an_error() -> None:
    assert one_error(upstream("endpoints: [http://a, https://b]\nprotocol: h2c")) == (
        "routes.yaml:5: upstreams.u.protocol: h2c is cleartext: use h2 for https:// endpoints"
    )


def test_h2_with_an_http_endpoint_is_an_error() -> None:
    assert one_error(upstream("endpoints: [https://a, http://b]\nprotocol: h2")) == (
        "routes.yaml:5: upstreams.u.protocol: h2 needs TLS (https:// endpoints); "
        "use h2c for http://"
    )


def test_upstream_tls_reads_every_key(tls_files: TlsFiles) -> None:
    text = upstream(f"endpoints: [https://a]\ntls: {{ca: '{tls_files.ca}', sni: a.internal}}")

    assert parse(text).upstreams["u"].tls == UpstreamTls(str(tls_files.ca), True, "a.internal")


def test_upstream_tls_verify_can_be_turned_off() -> None:
    text = upstream("endpoints: [https://a]\nprotocol: h2\ntls: {verify: false}")

    assert parse(text).upstreams["u"].tls == UpstreamTls(ca=None, verify=False, sni=None)


def test_upstream_tls_needs_https_endpoints() -> None:
    assert one_error(upstream("endpoints: [http://a]\ntls: {verify: false}")) == (
        "routes.yaml:5: upstreams.u.tls: tls settings need https:// endpoints"
    )


# Regression: an upstream whose endpoints were all invalid also got "tls settings need
# https:// endpoints", which is noise: the endpoints' own errors say what is wrong.
def test_upstream_tls_with_invalid_endpoints_reports_only_the_endpoints() -> None:
    assert one_error(upstream("endpoints: [htps://a]\ntls: {verify: false}")) == (
        "routes.yaml:4: upstreams.u.endpoints[0]: unsupported scheme 'htps' in 'htps://a' "
        "(http:// or https://)"
    )


def test_an_unreadable_ca_is_an_error(tmp_path: Path) -> None:
    missing = tmp_path / "ca.pem"

    assert one_error(upstream(f"endpoints: [https://a]\ntls:\n  ca: '{missing}'")) == (
        f"routes.yaml:6: upstreams.u.tls.ca: cannot read '{missing}': No such file or directory"
    )


# Regression: a readable `ca` that holds no certificate passed the check and failed at the
# first connection to the upstream.
def test_a_ca_file_without_a_certificate_is_an_error(tls_files: TlsFiles) -> None:
    text = upstream(f"endpoints: [https://a]\ntls:\n  ca: '{tls_files.key}'")

    assert one_error(text) == (
        f"routes.yaml:6: upstreams.u.tls.ca: '{tls_files.key}' holds no PEM certificate"
    )


def test_upstream_tls_values_are_checked() -> None:
    text = upstream("endpoints: [https://a]\ntls:\n  verify: 'no'\n  sni: ' '\n  verfy: x")

    assert errors_of(text) == [
        "routes.yaml:6: upstreams.u.tls.verify: expected true or false, got a string ('no')",
        "routes.yaml:7: upstreams.u.tls.sni: must not be empty",
        "routes.yaml:8: upstreams.u.tls.verfy: unknown key 'verfy' (did you mean 'verify'?)",
    ]


# --- the gateway's client certificate (mutual TLS to the upstream) ---


def test_a_client_certificate_is_read_with_its_key(tls_files: TlsFiles) -> None:
    text = upstream(
        f"endpoints: [https://a]\ntls: {{cert: '{tls_files.cert}', key: '{tls_files.key}'}}"
    )

    assert parse(text).upstreams["u"].tls == UpstreamTls(
        cert=str(tls_files.cert), key=str(tls_files.key)
    )


@pytest.mark.parametrize(("given", "missing"), [("cert", "key"), ("key", "cert")])
def test_a_client_certificate_needs_both_files(
    tls_files: TlsFiles, given: str, missing: str
) -> None:
    text = upstream(f"endpoints: [https://a]\ntls:\n  {given}: '{tls_files.cert}'")

    assert one_error(text) == (
        f"routes.yaml:6: upstreams.u.tls: a client certificate needs both cert and key "
        f"('{missing}')"
    )


def test_a_client_certificate_that_does_not_load_is_an_error(
    tls_files: TlsFiles, tmp_path: Path
) -> None:
    other = make_tls_files(tmp_path)
    text = upstream(
        f"endpoints: [https://a]\ntls:\n  cert: '{tls_files.cert}'\n  key: '{other.key}'"
    )
    unreadable = upstream(
        f"endpoints: [https://a]\ntls:\n  cert: '{tmp_path / 'none.pem'}'\n  key: '{other.key}'"
    )

    assert one_error(text) == (
        f"routes.yaml:6: upstreams.u.tls: the certificate '{tls_files.cert}' does not match "
        f"the key '{other.key}'"
    )
    assert one_error(unreadable) == (
        f"routes.yaml:6: upstreams.u.tls.cert: cannot read '{tmp_path / 'none.pem'}': "
        "No such file or directory"
    )
