"""A worker's side of ACME (proxy/process/acme_serving.py), in an in-process gateway with
real TLS clients: the certificates in storage are served at start and again when the
supervisor says they changed; a TLS-ALPN-01 challenge certificate goes to the validator's
handshake alone (ALPN `acme-tls/1`), while a browser asking for the same name at the same
moment gets the real certificate."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import pytest
from cryptography import x509

from proxy.acme.challenges import ACME_IDENTIFIER_OID, tls_alpn_certificate
from proxy.acme.storage import AcmeStorage
from proxy.process.server import Server
from tests.support.gateway import GatewayFactory
from tests.support.tls import TestCa

pytestmark = pytest.mark.socket

DIRECTORY = "https://acme.example/dir"
NAME = "a.example.com"


def config(storage: Path) -> str:
    return f"""
listeners:
  - bind: 127.0.0.1:0
    tls:
      acme: {{directory: "{DIRECTORY}", domains: [{NAME}, b.example.com],
              storage: "{storage}", challenge: tls-alpn-01}}
upstreams: {{}}
routes:
  - name: hello
    match: {{path_prefix: /}}
    respond: {{status: 200, body: "hello"}}
"""


async def handshake(
    server: Server, name: str, alpn: list[str]
) -> tuple[x509.Certificate, str | None, bytes]:
    """The leaf served for `name` when offering `alpn`, the protocol chosen, and what the
    gateway sends next to an HTTP/1.1 request ("" when it closed instead; none is sent
    on h2)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(alpn)
    host, port = server.addresses[0]
    reader, writer = await asyncio.open_connection(host, port, ssl=context, server_hostname=name)
    try:
        tls = writer.get_extra_info("ssl_object")
        der = tls.getpeercert(binary_form=True)
        chosen = tls.selected_alpn_protocol()
        if chosen == "h2":
            return x509.load_der_x509_certificate(der), chosen, b""
        writer.write(f"GET / HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n".encode())
        async with asyncio.timeout(5):
            try:
                answer = await reader.read()
            except ConnectionResetError:
                answer = b""
    finally:
        writer.close()
    return x509.load_der_x509_certificate(der), chosen, answer


def is_challenge(leaf: x509.Certificate) -> bool:
    try:
        leaf.extensions.get_extension_for_oid(ACME_IDENTIFIER_OID)
    except x509.ExtensionNotFound:
        return False
    return True


BROWSER = ["h2", "http/1.1"]
HTTP1 = ["http/1.1"]
VALIDATOR = ["acme-tls/1"]


async def test_challenges_go_to_the_validator_and_certificates_follow_storage(
    gateway_factory: GatewayFactory, tmp_path: Path
) -> None:
    storage = AcmeStorage(str(tmp_path / "acme"), DIRECTORY)
    ca = TestCa(tmp_path / "ca")
    first = ca.issue("first", (NAME,))
    storage.save_certificate(NAME, first.cert.read_bytes(), first.key.read_bytes())
    server = await gateway_factory(config(tmp_path / "acme"))

    # What storage held at start is served.
    leaf, chosen, answer = await handshake(server, NAME, HTTP1)
    assert leaf.serial_number == first.leaf().serial_number
    assert chosen == "http/1.1"
    assert answer.startswith(b"HTTP/1.1 200")

    # A challenge for the name: the validator alone gets its certificate, and the
    # connection ends with the handshake.
    path = storage.save_challenge(NAME, tls_alpn_certificate(NAME, "token.thumbprint"))
    state = {"http01": {}, "tls_alpn01": {NAME: path}}
    assert server.apply_acme(state) == []
    leaf, chosen, answer = await handshake(server, NAME, VALIDATOR)
    assert is_challenge(leaf)
    assert chosen == "acme-tls/1"
    assert answer == b""
    for alpn in (BROWSER, HTTP1):
        leaf, chosen, answer = await handshake(server, NAME, alpn)
        assert leaf.serial_number == first.leaf().serial_number
        assert chosen == alpn[0]
    assert answer.startswith(b"HTTP/1.1 200")
    # A validator for a name without a pending challenge is an ordinary client.
    leaf, _, _ = await handshake(server, "b.example.com", VALIDATOR)
    assert not is_challenge(leaf)

    # Withdrawn: nobody gets it any more.
    assert server.apply_acme({"http01": {}, "tls_alpn01": {}}) == []
    leaf, _, _ = await handshake(server, NAME, VALIDATOR)
    assert leaf.serial_number == first.leaf().serial_number

    # A renewed certificate in storage is served once the supervisor says so.
    second = ca.issue("second", (NAME,))
    storage.save_certificate(NAME, second.cert.read_bytes(), second.key.read_bytes())
    assert server.apply_acme({"http01": {}, "tls_alpn01": {}}) == []
    leaf, _, _ = await handshake(server, NAME, BROWSER)
    assert leaf.serial_number == second.leaf().serial_number

    # A pair caught half way through a write is reported, and what was served stays.
    cert, _ = storage.certificate_files(NAME)
    Path(cert).write_bytes(first.cert.read_bytes())  # noqa: ASYNC240 - a small file, in a test
    errors = server.apply_acme({"http01": {}, "tls_alpn01": {}})
    assert len(errors) == 1
    assert errors[0].startswith(f"listeners[0]: cannot load the certificate of {NAME}: ")
    leaf, _, _ = await handshake(server, NAME, BROWSER)
    assert leaf.serial_number == second.leaf().serial_number


async def test_a_challenge_file_that_cannot_be_loaded_is_reported(
    gateway_factory: GatewayFactory, tmp_path: Path
) -> None:
    server = await gateway_factory(config(tmp_path / "acme"))
    missing = str(tmp_path / "missing.pem")
    errors = server.apply_acme({"http01": {}, "tls_alpn01": {NAME: missing}})
    assert len(errors) == 1
    assert errors[0].startswith(f"cannot load the tls-alpn-01 certificate of {NAME}: ")
