"""Client certificates (mutual TLS) at a real in-process gateway: `tls.client_auth` in
both modes, over HTTP/1.1 and h2, with httpx, curl --cert and raw ssl sockets; the
`client_cert` middleware's verdicts; the X-Forwarded-Client-Cert field as the upstream
received it (and that a client's own never arrives); and the certificate the gateway
presents to an upstream that requires one (HTTP/1.1, h2 and health checks).

Every certificate is made by the test (tests/support/tls.py): a server CA, a client CA
that issued alice's and bob's certificates and an expired one, and another CA whose
certificate no listener trusts."""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from proxy.config.load import parse_config
from proxy.process.server import Server
from tests.support.gateway import GatewayFactory
from tests.support.helpers import eventually
from tests.support.tls import IssuedFiles, TestCa
from tests.support.upstreams import UpstreamServer
from tests.support.upstreams.h2 import H2UpstreamServer

pytestmark = pytest.mark.socket

STRICT, RELAXED, PLAIN = 0, 1, 2  # the gateway's listeners, in order


@dataclass(frozen=True)
class Pki:
    server_ca: TestCa
    api: IssuedFiles  # the strict listener's default (api.example.com, 127.0.0.1)
    www: IssuedFiles  # its second certificate, for www.example.com
    client_ca: TestCa
    alice: IssuedFiles
    bob: IssuedFiles
    expired: IssuedFiles
    stranger: IssuedFiles  # from a CA no listener trusts


def _subject(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Example, Inc."),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    root = tmp_path_factory.mktemp("mtls")
    server_ca = TestCa(root / "server")
    client_ca = TestCa(root / "client", "gatehouse client CA")
    return Pki(
        server_ca,
        api=server_ca.issue("api", ("api.example.com",), ips=("127.0.0.1",)),
        www=server_ca.issue("www", ("www.example.com",)),
        client_ca=client_ca,
        alice=client_ca.issue(
            "alice",
            ("alice.clients.example",),
            subject=_subject("alice"),
            uris=("spiffe://example.org/ns/prod/alice",),
            emails=("alice@example.com",),
            client=True,
        ),
        bob=client_ca.issue("bob", subject=_subject("bob"), client=True),
        expired=client_ca.issue("expired", subject=_subject("alice"), expired=True, client=True),
        stranger=TestCa(root / "other").issue("stranger", subject=_subject("alice"), client=True),
    )


def gateway_config(pki: Pki, upstream: UpstreamServer) -> str:
    api, www, ca = pki.api, pki.www, pki.client_ca.ca
    return f"""
listeners:
  - bind: 127.0.0.1:0
    name: strict
    tls:
      certificates:
        - {{cert: '{api.cert}', key: '{api.key}'}}
        - {{cert: '{www.cert}', key: '{www.key}'}}
      client_auth: {{ca: '{ca}'}}
  - bind: 127.0.0.1:0
    name: relaxed
    tls:
      cert: '{api.cert}'
      key: '{api.key}'
      client_auth: {{ca: '{ca}', mode: optional}}
  - bind: 127.0.0.1:0
    name: plain
headers_with_underscores: allow
upstreams:
  app:
    endpoints: [{upstream.url}]
routes:
  - name: guarded
    match: {{path_prefix: /guarded}}
    upstream: app
    middleware:
      - type: client_cert
        allow:
          - {{common_name: alice}}
          - {{issuer: "CN=nobody", dns: "*.clients.example"}}
  - name: any
    match: {{path_prefix: /any}}
    upstream: app
    middleware: [{{type: client_cert}}]
  - name: open
    match: {{path_prefix: /}}
    upstream: app
"""


@pytest.fixture
async def gateway(gateway_factory: GatewayFactory, h1_upstream: UpstreamServer, pki: Pki) -> Server:
    return await gateway_factory(gateway_config(pki, h1_upstream))


def url(server: Server, listener: int, path: str) -> str:
    scheme = "http" if listener == PLAIN else "https"
    return f"{scheme}://127.0.0.1:{server.addresses[listener][1]}{path}"


def client_context(pki: Pki, identity: IssuedFiles | None) -> ssl.SSLContext:
    """Trusts the server CA and presents `identity` (None: no certificate)."""
    context = pki.server_ca.client_context()
    if identity is not None:
        context.load_cert_chain(identity.cert, identity.key)
    return context


async def get(
    pki: Pki,
    target: str,
    identity: IssuedFiles | None,
    *,
    http2: bool = False,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    async with httpx.AsyncClient(verify=client_context(pki, identity), http2=http2) as client:
        return await client.get(target, headers=headers)


def upstream_saw(response: httpx.Response) -> dict[str, list[str]]:
    """The echo upstream's view of the request: each header name (lower case) with its
    values."""
    assert response.status_code == 200, response.text
    seen: dict[str, list[str]] = {}
    for name, value in response.json()["headers"]:
        seen.setdefault(name.lower(), []).append(value)
    return seen


def fingerprint(files: IssuedFiles) -> str:
    return hashlib.sha256(files.leaf().public_bytes(serialization.Encoding.DER)).hexdigest()


# --- the handshake ---------------------------------------------------------------------


@pytest.mark.parametrize("http2", [False, True])
async def test_require_lets_in_a_valid_certificate_only(
    gateway: Server, pki: Pki, http2: bool
) -> None:
    response = await get(pki, url(gateway, STRICT, "/echo"), pki.alice, http2=http2)
    assert response.status_code == 200
    assert response.http_version == ("HTTP/2" if http2 else "HTTP/1.1")

    for identity in (None, pki.expired, pki.stranger):
        with pytest.raises(httpx.TransportError):
            await get(pki, url(gateway, STRICT, "/echo"), identity, http2=http2)


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
async def test_every_certificate_of_the_listener_asks_for_the_client_certificate(
    gateway: Server, pki: Pki, version: ssl.TLSVersion
) -> None:
    """The handshake moves to the context of the certificate for the name sent; the
    client certificate is checked there as on the default one."""
    port = gateway.addresses[STRICT][1]
    for name in ("www.example.com", "api.example.com", None):
        for identity, accepted in ((pki.alice, True), (None, False), (pki.stranger, False)):
            context = client_context(pki, identity)
            context.check_hostname = name is not None
            context.minimum_version = context.maximum_version = version
            assert (name, identity, await raw_exchange(port, name, context)) == (
                name,
                identity,
                accepted,
            )


async def raw_exchange(port: int, server_name: str | None, context: ssl.SSLContext) -> bool:
    """Whether a request over a raw TLS connection gets an answer (under TLS 1.3 the
    server refuses a client certificate after the client's side of the handshake is
    done: the refusal shows on the first read)."""
    try:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=context, server_hostname=server_name or ""
        )
    except (ssl.SSLError, ConnectionError):
        return False
    try:
        writer.write(b"GET /echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        return (await reader.read()).startswith(b"HTTP/1.1 200 ")
    except (ssl.SSLError, ConnectionError):
        return False
    finally:
        writer.close()


async def test_optional_lets_in_no_certificate_but_not_a_bad_one(gateway: Server, pki: Pki) -> None:
    assert (await get(pki, url(gateway, RELAXED, "/echo"), None)).status_code == 200
    assert (await get(pki, url(gateway, RELAXED, "/echo"), pki.bob)).status_code == 200
    for identity in (pki.expired, pki.stranger):
        with pytest.raises(httpx.TransportError):
            await get(pki, url(gateway, RELAXED, "/echo"), identity)


async def curl(*args: str) -> tuple[int, str]:
    assert shutil.which("curl"), "curl is a test dependency"
    process = await asyncio.create_subprocess_exec(
        *("curl", "--silent", "--max-time", "10", *args),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    out, _ = await process.communicate()
    return process.returncode or 0, out.decode()


@pytest.mark.parametrize("option", ["--http1.1", "--http2"])
async def test_curl_with_and_without_a_certificate(gateway: Server, pki: Pki, option: str) -> None:
    port = gateway.addresses[STRICT][1]
    base = (
        option,
        "--cacert",
        str(pki.server_ca.ca),
        "--resolve",
        f"www.example.com:{port}:127.0.0.1",
    )
    target = f"https://www.example.com:{port}/guarded/echo"
    alice = ("--cert", str(pki.alice.cert), "--key", str(pki.alice.key))
    bob = ("--cert", str(pki.bob.cert), "--key", str(pki.bob.key))

    code, out = await curl(*base, *alice, target)
    assert code == 0
    assert json.loads(out)["target"] == "/guarded/echo"
    code, out = await curl(*base, *bob, "--write-out", "\n%{http_code}", target)
    assert (code, out.rsplit("\n", 1)[1]) == (0, "403")
    assert json.loads(out.rsplit("\n", 1)[0])["error"] == "client_cert_forbidden"
    code, _ = await curl(*base, target)  # no certificate: no handshake
    assert code != 0


# --- the client_cert middleware -------------------------------------------------------------


async def test_the_middleware_allows_by_its_rules(gateway: Server, pki: Pki) -> None:
    allowed = await get(pki, url(gateway, RELAXED, "/guarded/echo"), pki.alice)
    assert allowed.status_code == 200

    refused = await get(pki, url(gateway, RELAXED, "/guarded/echo"), pki.bob)
    assert (refused.status_code, refused.json()["error"]) == (403, "client_cert_forbidden")
    # With no rules, any verified certificate passes.
    assert (await get(pki, url(gateway, RELAXED, "/any/echo"), pki.bob)).status_code == 200


@pytest.mark.parametrize("listener", [RELAXED, PLAIN])
async def test_no_certificate_is_a_403_of_its_own(gateway: Server, pki: Pki, listener: int) -> None:
    for path in ("/guarded/echo", "/any/echo"):
        response = await get(pki, url(gateway, listener, path), None)
        assert (response.status_code, response.json()["error"]) == (403, "client_cert_required")


# --- X-Forwarded-Client-Cert ------------------------------------------------------------------


def xfcc_of(pki: Pki) -> str:
    return (
        f"Hash={fingerprint(pki.alice)};"
        r'Subject="CN=alice,O=Example\\, Inc.";'
        "URI=spiffe://example.org/ns/prod/alice;"
        "DNS=alice.clients.example"
    )


@pytest.mark.parametrize("http2", [False, True])
async def test_the_upstream_gets_the_verified_certificate_in_xfcc(
    gateway: Server, pki: Pki, http2: bool
) -> None:
    forged = {"X-Forwarded-Client-Cert": 'Hash=00;Subject="CN=admin"'}
    for listener in (STRICT, RELAXED):
        response = await get(
            pki, url(gateway, listener, "/echo"), pki.alice, http2=http2, headers=forged
        )
        assert upstream_saw(response)["x-forwarded-client-cert"] == [xfcc_of(pki)]


@pytest.mark.parametrize("http2", [False, True])
@pytest.mark.parametrize(
    "name", ["X-Forwarded-Client-Cert", "x-forwarded-client-cert", "X_Forwarded_Client_Cert"]
)
async def test_a_client_sent_xfcc_never_arrives(
    gateway: Server, pki: Pki, http2: bool, name: str
) -> None:
    if http2 and name != name.lower():
        name = name.lower()  # HTTP/2 field names are lower case (RFC 9113 section 8.2.1)
    forged = {name: 'Hash=00;Subject="CN=admin"'}
    for listener, identity in ((RELAXED, None), (PLAIN, None)):
        if listener == PLAIN and http2:
            continue  # (httpx speaks h2 only over TLS)
        response = await get(
            pki, url(gateway, listener, "/echo"), identity, http2=http2, headers=forged
        )
        seen = upstream_saw(response)
        assert not [key for key in seen if key.replace("_", "-") == "x-forwarded-client-cert"]
    # Even beside a real one, only the gateway's arrives.
    response = await get(pki, url(gateway, STRICT, "/echo"), pki.alice, http2=http2, headers=forged)
    seen = upstream_saw(response)
    assert [key for key in seen if key.replace("_", "-") == "x-forwarded-client-cert"] == [
        "x-forwarded-client-cert"
    ]
    assert seen["x-forwarded-client-cert"] == [xfcc_of(pki)]


# --- the gateway's own client certificate, to upstreams -------------------------------------


def requiring_client_certificates(pki: Pki, alpn: list[str]) -> ssl.SSLContext:
    """An upstream's server context that refuses clients without a certificate of the
    client CA."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki.api.cert, pki.api.key)
    context.load_verify_locations(cafile=pki.client_ca.ca)
    context.verify_mode = ssl.CERT_REQUIRED
    context.set_alpn_protocols(alpn)
    return context


def upstream_config(pki: Pki, url: str, protocol: str, identity: IssuedFiles | None) -> str:
    tls = f"ca: '{pki.server_ca.ca}', sni: api.example.com"
    if identity is not None:
        tls += f", cert: '{identity.cert}', key: '{identity.key}'"
    return f"""
listeners:
  - bind: 127.0.0.1:0
upstreams:
  secure:
    endpoints: [{url}]
    protocol: {protocol}
    tls: {{{tls}}}
    health_check: {{path: /healthz, interval: 50ms, timeout: 2s, unhealthy_threshold: 1}}
routes:
  - name: all
    match: {{path_prefix: /}}
    upstream: secure
"""


@pytest.fixture
async def mtls_upstreams(pki: Pki) -> Any:
    h1 = await UpstreamServer(tls=requiring_client_certificates(pki, ["http/1.1"])).start()
    h2 = await H2UpstreamServer(tls=requiring_client_certificates(pki, ["h2"])).start()
    yield {"http1": h1, "h2": h2}
    await h1.stop()
    await h2.stop()


@pytest.mark.parametrize("protocol", ["http1", "h2"])
async def test_the_gateway_presents_its_client_certificate_to_the_upstream(
    gateway_factory: GatewayFactory, pki: Pki, mtls_upstreams: Any, protocol: str
) -> None:
    upstream = mtls_upstreams[protocol]
    with_cert = await gateway_factory(upstream_config(pki, upstream.url, protocol, pki.bob))
    without = await gateway_factory(upstream_config(pki, upstream.url, protocol, None))

    async with httpx.AsyncClient() as client:
        answered = await client.get(f"http://127.0.0.1:{with_cert.addresses[0][1]}/echo")
        refused = await client.get(f"http://127.0.0.1:{without.addresses[0][1]}/echo")
    assert answered.status_code == 200
    assert refused.status_code in (502, 503)
    # The health checks share the context: theirs reach the upstream too.
    await eventually(lambda: "/healthz" in paths(upstream), "a health check through mutual TLS")


def paths(upstream: UpstreamServer | H2UpstreamServer) -> list[str]:
    """The paths of the requests `upstream` received (past the TLS handshake)."""
    if isinstance(upstream, UpstreamServer):
        return [request.target for request in upstream.requests]
    return [request.path for request in upstream.requests]


async def test_a_reload_reads_a_renewed_upstream_client_certificate(
    pki: Pki, mtls_upstreams: Any, tmp_path: Path
) -> None:
    """The upstream's settings do not change, so its pools and context are kept; the
    certificate files written over are read again all the same."""
    identity = IssuedFiles(tmp_path / "gateway.pem", tmp_path / "gateway.key")
    identity.cert.write_bytes(pki.stranger.cert.read_bytes())  # a CA the upstream refuses
    identity.key.write_bytes(pki.stranger.key.read_bytes())
    upstream = mtls_upstreams["http1"]
    text = upstream_config(pki, upstream.url, "http1", identity)
    server = Server(parse_config(text))
    await server.start()
    try:
        target = f"http://127.0.0.1:{server.addresses[0][1]}/echo"
        async with httpx.AsyncClient() as client:
            assert (await client.get(target)).status_code in (502, 503)
            identity.cert.write_bytes(pki.bob.cert.read_bytes())
            identity.key.write_bytes(pki.bob.key.read_bytes())
            kept = server.runtime.upstreams["secure"]

            await server.prepare_reload(parse_config(text))
            await server.commit_reload()

            assert server.runtime.upstreams["secure"] is kept
            assert (await client.get(target)).status_code == 200
    finally:
        await server.shutdown(grace_period=1.0)
