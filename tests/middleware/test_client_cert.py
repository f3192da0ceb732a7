"""client_cert without sockets: its verdict on `Request.client_cert` (the certificate the
connection verified, proxy/core/client_cert.py), rule by rule, and its config errors
with their lines. Handshakes that give a request its certificate are in
tests/e2e/test_tls_client_auth.py."""

from __future__ import annotations

import dataclasses
import textwrap

import pytest

from middleware.client_cert import ClientCert
from proxy.config.document import ConfigError
from proxy.config.load import parse_config
from proxy.core.body import Body
from proxy.core.client_cert import ClientCertificate
from proxy.core.errors import ClientCertForbidden, ClientCertRequired, ProxyError
from proxy.core.models import Request, Response

HEAD = """\
listeners: [{bind: 127.0.0.1:0}]
upstreams: {app: {endpoints: ["http://127.0.0.1:9"]}}
routes: [{match: {path_prefix: /}, upstream: app}]
middleware:
"""

ALICE = ClientCertificate(
    subject="CN=alice,O=Example",
    issuer="CN=Partner CA,O=Partner",
    common_name="alice",
    dns=("alice.clients.example", "Api.Example.COM"),
    uris=("spiffe://example.org/ns/prod/alice",),
    emails=("Alice@Example.com",),
    fingerprint="00" * 32,
    pem="",
    xfcc="",
)


def build(options: str) -> ClientCert:
    """A client_cert instance named `c` from its options (YAML flow mapping body)."""
    config = parse_config(HEAD + f"  c: {{type: client_cert{options}}}\n")
    instance = config.middleware["c"].instance
    assert isinstance(instance, ClientCert)
    return instance


def errors_of(middleware_lines: str) -> list[str]:
    """The errors of a config whose `middleware:` section is `middleware_lines` (line 5 on)."""
    with pytest.raises(ConfigError) as failed:
        parse_config(HEAD + textwrap.indent(textwrap.dedent(middleware_lines), "  "))
    return str(failed.value).splitlines()


async def verdict(middleware: ClientCert, cert: ClientCertificate | None) -> str:
    """ "pass", or the reason code of the refusal."""

    async def endpoint(request: Request) -> Response:
        return Response(204)

    request = Request("GET", b"/", [(b"host", b"t")], Body.from_bytes(b""), client_cert=cert)
    refusal: ProxyError | None = None
    response: Response | None = None
    try:
        response = await middleware(request, endpoint)
    except (ClientCertRequired, ClientCertForbidden) as exc:
        refusal = exc
    if refusal is not None:
        assert refusal.status == 403
        return refusal.reason
    assert response is not None
    assert response.status == 204
    return "pass"


async def test_without_rules_any_verified_certificate_passes() -> None:
    middleware = build("")

    assert await verdict(middleware, ALICE) == "pass"
    assert await verdict(middleware, None) == "client_cert_required"


@pytest.mark.parametrize(
    ("rule", "expected"),
    [
        ("{subject: 'CN=alice,O=Example'}", "pass"),
        ("{subject: 'CN=alice'}", "client_cert_forbidden"),  # the whole DN, exactly
        ("{issuer: ['CN=Other', 'CN=Partner CA,O=Partner']}", "pass"),
        ("{common_name: alice}", "pass"),
        ("{common_name: Alice}", "client_cert_forbidden"),
        ("{dns: alice.clients.example}", "pass"),
        ("{dns: API.example.com}", "pass"),  # DNS names ignore case
        ("{dns: '*.clients.example'}", "pass"),
        ("{dns: '*.example'}", "client_cert_forbidden"),  # one label only
        ("{dns: '*.alice.clients.example'}", "client_cert_forbidden"),  # not the name itself
        ("{uri: 'spiffe://example.org/ns/prod/alice'}", "pass"),
        ("{uri: 'spiffe://example.org/ns/prod/*'}", "pass"),
        ("{uri: 'spiffe://example.org/ns/dev/*'}", "client_cert_forbidden"),
        ("{uri: 'SPIFFE://example.org/ns/prod/alice'}", "client_cert_forbidden"),
        ("{email: alice@example.com}", "client_cert_forbidden"),  # the local part's case
        ("{email: Alice@EXAMPLE.com}", "pass"),  # the domain's case does not count
        ("{email: '*@example.com'}", "pass"),
        ("{email: '*@example.org'}", "client_cert_forbidden"),
        # Every key of a rule must match...
        ("{common_name: alice, issuer: 'CN=Other'}", "client_cert_forbidden"),
        ("{common_name: alice, dns: '*.clients.example'}", "pass"),
    ],
)
async def test_each_kind_of_rule(rule: str, expected: str) -> None:
    assert await verdict(build(f", allow: [{rule}]"), ALICE) == expected


async def test_any_rule_lets_a_certificate_in() -> None:
    middleware = build(", allow: [{common_name: bob}, {uri: 'spiffe://example.org/*'}]")

    assert await verdict(middleware, ALICE) == "pass"
    assert await verdict(middleware, None) == "client_cert_required"


def test_config_errors_name_their_lines() -> None:
    assert errors_of(
        """\
        c:
          type: client_cert
          allow:
            - {dns: 'a.*.example'}
            - {email: nobody}
            - {common_name: []}
            - {}
            - {cn: alice}
            - {subject: ''}
        d: {type: client_cert, allow: []}
        """
    ) == [
        "<string>:8: middleware.c.allow[0].dns: 'a.*.example': a wildcard is a whole "
        "first label (*.x.y)",
        "<string>:9: middleware.c.allow[1].email: 'nobody' is not an e-mail address or *@domain",
        "<string>:10: middleware.c.allow[2].common_name: must list at least one value",
        "<string>:11: middleware.c.allow[3]: a rule needs one of: subject, issuer, "
        "common_name, dns, uri, email",
        "<string>:12: middleware.c.allow[4].cn: unknown key 'cn' (expected one of: "
        "subject, issuer, common_name, dns, uri, email)",
        "<string>:13: middleware.c.allow[5].subject: must not be empty",
        "<string>:14: middleware.d.allow: must list at least one rule (leave it out to allow any)",
    ]


async def test_a_certificate_let_in_names_the_consumer_unless_one_is_named() -> None:
    async def endpoint(request: Request) -> Response:
        return Response(204)

    nameless = dataclasses.replace(ALICE, common_name="")
    requests = [
        Request("GET", b"/", [(b"host", b"t")], Body.from_bytes(b""), client_cert=cert)
        for cert in (ALICE, nameless, ALICE)
    ]
    requests[2].consumer = "billing"  # named by an api_key before this middleware
    for request in requests:
        await build("")(request, endpoint)
    assert [request.consumer for request in requests] == [
        "alice",
        "CN=alice,O=Example",
        "billing",
    ]
