"""A TLS listener with several certificates, chosen by the name the client sends (SNI;
proxy/frontend/certificates.py): raw ssl sockets with and without a server name, httpx
over HTTP/1.1 and h2, and curl with --resolve, against an in-process gateway serving
three certificates of one test CA: `api.example.com` (listed first: the default), the
wildcard `*.example.com`, and `www.example.com` (listed after the wildcard)."""

from __future__ import annotations

import asyncio
import re
import shutil
import ssl
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from cryptography import x509

from proxy.config.load import parse_config
from proxy.process.server import Server
from tests.support.gateway import GatewayFactory
from tests.support.tls import IssuedFiles, TestCa
from tests.support.upstreams import UpstreamServer

pytestmark = pytest.mark.socket


@dataclass(frozen=True)
class Pki:
    """The CA, the three certificates the gateway serves, and one it does not."""

    ca: TestCa
    api: IssuedFiles
    wild: IssuedFiles
    www: IssuedFiles
    spare: IssuedFiles


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    ca = TestCa(tmp_path_factory.mktemp("sni"))
    return Pki(
        ca,
        api=ca.issue("api", ("api.example.com",), ips=("127.0.0.1",)),
        wild=ca.issue("wild", ("*.example.com",)),
        www=ca.issue("www", ("www.example.com",)),
        spare=ca.issue("spare", ("www.example.com", "new.example.com")),
    )


def tls_config(upstream: UpstreamServer, *pairs: IssuedFiles, extra: str = "") -> str:
    certificates = "".join(
        f"        - {{cert: '{files.cert}', key: '{files.key}'}}\n" for files in pairs
    )
    return f"""
listeners:
  - bind: 127.0.0.1:0
    tls:
      certificates:
{certificates}{extra}
upstreams:
  app:
    endpoints: [{upstream.url}]
routes:
  - name: all
    match: {{path_prefix: /}}
    upstream: app
"""


@pytest.fixture
async def gateway(gateway_factory: GatewayFactory, h1_upstream: UpstreamServer, pki: Pki) -> Server:
    return await gateway_factory(tls_config(h1_upstream, pki.api, pki.wild, pki.www))


def port_of(server: Server) -> int:
    return server.addresses[0][1]


def checking_chain_only(ca: TestCa, alpn: list[str] | None = None) -> ssl.SSLContext:
    """Trusts the CA but not the name: what a test of the default certificate for a
    name it does not cover needs to see which certificate came."""
    context = ca.client_context(alpn)
    context.check_hostname = False
    return context


async def served(
    port: int, server_name: str | None, context: ssl.SSLContext
) -> tuple[x509.Certificate, str]:
    """The certificate a raw TLS connection was served, and its TLS version."""
    _reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=context, server_hostname=server_name or ""
    )
    try:
        ssl_object = writer.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True)
        return x509.load_der_x509_certificate(der), ssl_object.version()
    finally:
        writer.close()


# --- which certificate a name gets ----------------------------------------------------


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
async def test_each_name_gets_its_certificate(
    gateway: Server, pki: Pki, version: ssl.TLSVersion
) -> None:
    context = checking_chain_only(pki.ca)
    context.minimum_version = context.maximum_version = version
    expected = {
        "api.example.com": pki.api,
        "www.example.com": pki.www,  # exact, though the wildcard is listed before it
        "WWW.Example.COM": pki.www,  # names compare case-insensitively
        "www.example.com.": pki.www,  # a trailing dot is the same name
        "foo.example.com": pki.wild,
        "API2.example.com": pki.wild,
        "a.b.example.com": pki.api,  # a wildcard is one label: the default
        "example.com": pki.api,  # nor the bare domain
        "unknown.test": pki.api,
        None: pki.api,  # no SNI at all
    }
    for name, files in expected.items():
        leaf, negotiated = await served(port_of(gateway), name, context)
        assert (name, leaf) == (name, files.leaf())
        assert negotiated == version.name.replace("v1_", "v1.")


async def test_a_wildcard_listed_first_does_not_take_an_exact_name(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer, pki: Pki
) -> None:
    server = await gateway_factory(tls_config(h1_upstream, pki.wild, pki.www, pki.api))
    context = checking_chain_only(pki.ca)

    assert (await served(port_of(server), "www.example.com", context))[0] == pki.www.leaf()
    assert (await served(port_of(server), "api.example.com", context))[0] == pki.api.leaf()
    assert (await served(port_of(server), "any.example.com", context))[0] == pki.wild.leaf()
    # The default is the first listed, whatever it is.
    assert (await served(port_of(server), None, context))[0] == pki.wild.leaf()


async def test_two_certificates_for_one_name_the_first_listed_wins(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer, pki: Pki
) -> None:
    server = await gateway_factory(tls_config(h1_upstream, pki.api, pki.www, pki.spare))
    context = checking_chain_only(pki.ca)

    assert (await served(port_of(server), "www.example.com", context))[0] == pki.www.leaf()
    # The later one still has its other name.
    assert (await served(port_of(server), "new.example.com", context))[0] == pki.spare.leaf()


async def test_the_shorthand_serves_its_one_certificate_to_every_name(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer, pki: Pki
) -> None:
    text = tls_config(h1_upstream, pki.www).replace(
        f"      certificates:\n        - {{cert: '{pki.www.cert}', key: '{pki.www.key}'}}\n",
        f"      cert: {pki.www.cert}\n      key: {pki.www.key}\n",
    )
    assert "certificates" not in text
    server = await gateway_factory(text)
    context = checking_chain_only(pki.ca)

    for name in ("www.example.com", "api.example.com", None):
        assert (await served(port_of(server), name, context))[0] == pki.www.leaf()


async def test_min_version_and_alpn_hold_for_every_certificate(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer, pki: Pki
) -> None:
    text = tls_config(h1_upstream, pki.api, pki.wild, pki.www, extra="      min_version: '1.3'")
    server = await gateway_factory(text)
    old = checking_chain_only(pki.ca, ["h2", "http/1.1"])
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    modern = checking_chain_only(pki.ca, ["h2", "http/1.1"])

    for name in ("api.example.com", "foo.example.com", "www.example.com", None):
        with pytest.raises((ssl.SSLError, ConnectionError)):
            await served(port_of(server), name, old)
        _reader, writer = await asyncio.open_connection(
            "127.0.0.1", port_of(server), ssl=modern, server_hostname=name or ""
        )
        ssl_object = writer.get_extra_info("ssl_object")
        assert (name, ssl_object.selected_alpn_protocol()) == (name, "h2")
        writer.close()


# --- real HTTP clients -------------------------------------------------------------------


@pytest.mark.parametrize("http2", [False, True])
async def test_httpx_gets_the_certificate_of_the_name_it_sends(
    gateway: Server, pki: Pki, http2: bool
) -> None:
    url = f"https://127.0.0.1:{port_of(gateway)}/echo"
    for name, files in (
        ("www.example.com", pki.www),
        ("foo.example.com", pki.wild),
        ("api.example.com", pki.api),
    ):
        # A client per name: a new connection, so a new handshake.
        async with httpx.AsyncClient(verify=pki.ca.client_context(), http2=http2) as client:
            # Verified as the name sent, so the name check is the client's own.
            response = await client.get(url, extensions={"sni_hostname": name})
            assert response.status_code == 200
            assert response.http_version == ("HTTP/2" if http2 else "HTTP/1.1")
            ssl_object = response.extensions["network_stream"].get_extra_info("ssl_object")
            der = ssl_object.getpeercert(binary_form=True)
        assert (name, x509.load_der_x509_certificate(der)) == (name, files.leaf())


_SERIAL_RE = re.compile(r"^Serial Number:([0-9a-fA-F:]+)$", re.MULTILINE)


async def curl(port: int, name: str, ca: Path, *options: str) -> tuple[str, int]:
    """curl https://NAME:PORT/echo resolved to 127.0.0.1: (HTTP version, the served
    certificate's serial number)."""
    assert shutil.which("curl"), "curl is a test dependency"
    process = await asyncio.create_subprocess_exec(
        *("curl", "--silent", "--show-error", "--max-time", "10", "--fail", *options),
        *("--resolve", f"{name}:{port}:127.0.0.1", "--cacert", str(ca), "--output", "/dev/null"),
        *("--write-out", "%{http_version}\n%{certs}", f"https://{name}:{port}/echo"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate()
    assert process.returncode == 0, err.decode()
    version, _, certs = out.decode().partition("\n")
    serial = _SERIAL_RE.search(certs)
    assert serial is not None, certs
    return version, int(serial.group(1).replace(":", ""), 16)


@pytest.mark.parametrize(("option", "version"), [("--http1.1", "1.1"), ("--http2", "2")])
async def test_curl_verifies_each_name_against_its_certificate(
    gateway: Server, pki: Pki, option: str, version: str
) -> None:
    for name, files in (
        ("www.example.com", pki.www),
        ("foo.example.com", pki.wild),
        ("api.example.com", pki.api),
    ):
        got = await curl(port_of(gateway), name, pki.ca.ca, option)
        assert (name, got) == (name, (version, files.leaf().serial_number))


# --- reload ----------------------------------------------------------------------------


async def test_a_certificate_reload_swaps_one_certificate_and_keeps_the_others(
    gateway_factory: GatewayFactory,
    h1_upstream: UpstreamServer,
    pki: Pki,
    tmp_path: Path,
) -> None:
    www = IssuedFiles(tmp_path / "www.pem", tmp_path / "www.key")
    www.cert.write_bytes(pki.www.cert.read_bytes())
    www.key.write_bytes(pki.www.key.read_bytes())
    server = await gateway_factory(tls_config(h1_upstream, pki.api, pki.wild, www))
    context = checking_chain_only(pki.ca)
    assert (await served(port_of(server), "www.example.com", context))[0] == pki.www.leaf()

    # Renewed in place: the new certificate also names new.example.com.
    www.cert.write_bytes(pki.spare.cert.read_bytes())
    www.key.write_bytes(pki.spare.key.read_bytes())
    server.reload_certificates()

    for name, files in (
        ("www.example.com", pki.spare),
        ("new.example.com", pki.spare),  # a name the old one did not have
        ("foo.example.com", pki.wild),
        ("api.example.com", pki.api),
        (None, pki.api),
    ):
        assert (name, (await served(port_of(server), name, context))[0]) == (name, files.leaf())


async def test_a_reload_with_one_bad_pair_keeps_every_certificate(
    gateway_factory: GatewayFactory,
    h1_upstream: UpstreamServer,
    pki: Pki,
    tmp_path: Path,
) -> None:
    api = IssuedFiles(tmp_path / "api.pem", tmp_path / "api.key")
    www = IssuedFiles(tmp_path / "www.pem", tmp_path / "www.key")
    for source, copy in ((pki.api, api), (pki.www, www)):
        copy.cert.write_bytes(source.cert.read_bytes())
        copy.key.write_bytes(source.key.read_bytes())
    plain = f"""
  - bind: 127.0.0.1:0
    tls: {{cert: '{api.cert}', key: '{api.key}'}}
"""
    text = tls_config(h1_upstream, api, pki.wild, www).replace("upstreams:", plain + "upstreams:")
    server = await gateway_factory(text)
    # The first listener's api pair is renewed, and the www pair is caught half way.
    api.cert.write_bytes(pki.spare.cert.read_bytes())
    api.key.write_bytes(pki.spare.key.read_bytes())
    www.cert.write_bytes(pki.spare.cert.read_bytes())

    with pytest.raises(ssl.SSLError):
        server.reload_certificates()

    context = checking_chain_only(pki.ca)
    for port in (port_of(server), server.addresses[1][1]):
        assert (await served(port, "api.example.com", context))[0] == pki.api.leaf()
    assert (await served(port_of(server), "www.example.com", context))[0] == pki.www.leaf()


async def test_a_config_reload_adds_a_certificate(h1_upstream: UpstreamServer, pki: Pki) -> None:
    server = Server(parse_config(tls_config(h1_upstream, pki.api)))
    await server.start(reuse_port=True)
    try:
        context = checking_chain_only(pki.ca)
        assert (await served(port_of(server), "www.example.com", context))[0] == pki.api.leaf()
        port = port_of(server)
        text = tls_config(h1_upstream, pki.api, pki.www).replace(":0\n", f":{port}\n", 1)

        await server.prepare_reload(parse_config(text))
        await server.commit_reload()

        assert port_of(server) == port
        assert (await served(port, "www.example.com", context))[0] == pki.www.leaf()
        assert (await served(port, None, context))[0] == pki.api.leaf()
    finally:
        await server.shutdown(grace_period=1.0)
