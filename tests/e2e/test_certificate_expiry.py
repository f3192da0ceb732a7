"""`gatehouse_certificate_expiry_timestamp_seconds`: a real gateway process with a TLS
listener of two certificates, scraped on its admin listener; each certificate's series is
its leaf's notAfter, labelled with the listener and the names the certificate is for, and
a reload that swaps a certificate swaps its series."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography import x509

from tests.support.admin_client import admin_config, admin_reload, scrape, wait_ready
from tests.support.gateway_process import free_port, run_gateway
from tests.support.tls import TlsFiles, make_tls_files
from tests.support.upstreams import UpstreamServer

pytestmark = pytest.mark.socket

GAUGE = "gatehouse_certificate_expiry_timestamp_seconds"


def not_after(files: TlsFiles) -> float:
    leaf = x509.load_pem_x509_certificates(files.cert.read_bytes())[0]
    return leaf.not_valid_after_utc.timestamp()


def tls_listener(port: int, *certificates: TlsFiles) -> str:
    pairs = "".join(f"      - {{cert: {files.cert}, key: {files.key}}}\n" for files in certificates)
    return f"""
  - bind: 127.0.0.1:{port}
    name: secure
    tls:
      certificates:
{pairs}"""


def test_the_gauge_is_each_tls_certificates_expiry_and_follows_a_reload(
    tmp_path: Path, h1_upstream: UpstreamServer
) -> None:
    first = make_tls_files(tmp_path / "first", ("api.example.com",))
    second = make_tls_files(tmp_path / "second", ("www.example.com",))
    third = make_tls_files(tmp_path / "third", ("new.example.com",))
    port, admin, tls_port = free_port(), free_port(), free_port()
    routes = "  - name: all\n    match: {path_prefix: /}\n    upstream: app\n"

    def config(*certificates: TlsFiles) -> str:
        text = admin_config(port, admin, h1_upstream.url, routes)
        return text.replace(
            "    name: public\n", "    name: public\n" + tls_listener(tls_port, *certificates)
        )

    def series(names: str) -> tuple[str, frozenset[tuple[str, str]]]:
        return (GAUGE, frozenset({("listener", "secure"), ("names", names)}))

    api, www = series("api.example.com,127.0.0.1"), series("www.example.com,127.0.0.1")
    with run_gateway(config(first, second), tmp_path, port=port) as gateway:
        wait_ready(admin)
        samples = scrape(admin)
        # One series per certificate, and only TLS listeners have any.
        assert sorted(key for key in samples if key[0] == GAUGE) == sorted([api, www])
        assert samples[api] == not_after(first)
        assert samples[www] == not_after(second)

        gateway.config_path.write_text(config(third, second))
        assert admin_reload(admin).status_code == 200
        samples = scrape(admin)
        after = sorted(key for key in samples if key[0] == GAUGE)
        new = series("new.example.com,127.0.0.1")
        assert after == sorted([new, www])  # the removed certificate's series is gone
        assert samples[new] == not_after(third)
