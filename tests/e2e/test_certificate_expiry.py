"""`gatehouse_certificate_expiry_timestamp_seconds`: a real gateway process with a TLS
listener, scraped on its admin listener; the gauge is the leaf certificate's notAfter,
labelled with the listener and the names the certificate is for, and a reload that
swaps the certificate files moves it."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography import x509

from tests.support.admin_client import admin_config, admin_reload, scrape, value, wait_ready
from tests.support.gateway_process import free_port, run_gateway
from tests.support.tls import TlsFiles, make_tls_files
from tests.support.upstreams import UpstreamServer

pytestmark = pytest.mark.socket

GAUGE = "gatehouse_certificate_expiry_timestamp_seconds"


def not_after(files: TlsFiles) -> float:
    leaf = x509.load_pem_x509_certificates(files.cert.read_bytes())[0]
    return leaf.not_valid_after_utc.timestamp()


def tls_listener(files: TlsFiles, port: int) -> str:
    return f"""
  - bind: 127.0.0.1:{port}
    name: secure
    tls: {{cert: {files.cert}, key: {files.key}}}
"""


def test_the_gauge_is_each_tls_listeners_expiry_and_follows_a_reload(
    tmp_path: Path, h1_upstream: UpstreamServer
) -> None:
    first = make_tls_files(tmp_path / "first", ("api.example.com",))
    second = make_tls_files(tmp_path / "second", ("www.example.com",))
    port, admin, tls_port = free_port(), free_port(), free_port()
    routes = "  - name: all\n    match: {path_prefix: /}\n    upstream: app\n"

    def config(files: TlsFiles) -> str:
        text = admin_config(port, admin, h1_upstream.url, routes)
        return text.replace(
            "    name: public\n", "    name: public\n" + tls_listener(files, tls_port)
        )

    with run_gateway(config(first), tmp_path, port=port) as gateway:
        wait_ready(admin)
        samples = scrape(admin)
        names = "api.example.com,127.0.0.1"
        assert value(samples, GAUGE, listener="secure", names=names) == not_after(first)
        # Only TLS listeners have one.
        assert [key for key in samples if key[0] == GAUGE] == [
            (GAUGE, frozenset({("listener", "secure"), ("names", names)}))
        ]

        gateway.config_path.write_text(config(second))
        assert admin_reload(admin).status_code == 200
        samples = scrape(admin)
        after = [key for key in samples if key[0] == GAUGE]
        www = (GAUGE, frozenset({("listener", "secure"), ("names", "www.example.com,127.0.0.1")}))
        assert after == [www]  # the old certificate's series is gone
        assert samples[www] == not_after(second)
