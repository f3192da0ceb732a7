"""`client_cert`: let in only clients whose TLS client certificate the rules allow.

The certificate is the one the connection verified against its listener's
`tls.client_auth.ca` during the handshake (`Request.client_cert`, read once per
connection: proxy/core/client_cert.py). This middleware decides on it:

- no certificate (a plaintext listener, one without `client_auth`, or a client that sent
  none under `mode: optional`): 403 `client_cert_required`;
- `allow` absent: any verified certificate passes;
- otherwise the request passes when one rule of `allow` matches, and a rule matches when
  each key it gives does (one of its values does). Keys: `subject` and `issuer` (the
  whole distinguished name, RFC 4514 as `openssl x509 -nameopt RFC2253` prints it:
  `CN=alice,O=Example`), `common_name`, and the subjectAltNames `dns` (`*.example.com`:
  one label), `uri` (a trailing `*` matches any rest: `spiffe://example.org/ns/prod/*`)
  and `email` (`*@example.com`: any address of the domain). DNS names and e-mail domains
  compare without regard to case; the rest exactly. Else 403 `client_cert_forbidden`.

403 rather than 401 for a missing certificate: a 401 must carry a WWW-Authenticate
challenge, and there is none for TLS; a certificate is asked for in the handshake, not
by an HTTP answer. The two reason codes tell the cases apart in logs and metrics, and
`gatehouse_auth_failures_total{middleware,reason}` counts them as `missing` and `invalid`.
A certificate let in names the request's consumer (`request.consumer`, which the access
log shows): its common name, else its subject, unless an earlier auth middleware named
one. It offers phases, so a chain of phased middleware stays one function with it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from functools import partial
from typing import ClassVar

from yaml.nodes import Node, ScalarNode

from metrics.definitions import count_auth_failure
from proxy import (
    ClientCertForbidden,
    ClientCertificate,
    ClientCertRequired,
    Handler,
    NodeReader,
    Option,
    Options,
    Reported,
    Request,
    Response,
)

log = logging.getLogger(__name__)

_NAMES = "a string or a list of strings (any one matches)"
RULE_OPTIONS: dict[str, Option] = {
    "subject": Option.strings(f"the subject DN, exactly (CN=alice,O=Example): {_NAMES}"),
    "issuer": Option.strings(f"the issuer DN, exactly: {_NAMES}"),
    "common_name": Option.strings(f"the subject's common name: {_NAMES}"),
    "dns": Option.strings(f"a DNS subjectAltName; *.example.com is one label: {_NAMES}"),
    "uri": Option.strings(f"a URI subjectAltName; a trailing * matches any rest: {_NAMES}"),
    "email": Option.strings(f"an e-mail subjectAltName; *@example.com any of the domain: {_NAMES}"),
}

# One test of a rule: does the certificate match (one of) the values it was built from?
Test = Callable[[ClientCertificate], bool]


def _dns_matches(pattern: str, name: str) -> bool:
    name = name.lower()
    if pattern.startswith("*."):
        label, dot, parent = name.partition(".")
        return bool(label) and bool(dot) and parent == pattern[2:]
    return name == pattern


def _uri_matches(pattern: str, uri: str) -> bool:
    if pattern.endswith("*"):
        return uri.startswith(pattern[:-1])
    return uri == pattern


def _email_matches(pattern: str, email: str) -> bool:
    local, _, domain = email.rpartition("@")
    wanted_local, _, wanted_domain = pattern.rpartition("@")
    if domain.lower() != wanted_domain:
        return False
    return wanted_local == "*" or local == wanted_local


def _test(key: str, values: Sequence[str]) -> Test:
    """The test of rule key `key` for `values`."""
    if key == "subject":
        subjects = frozenset(values)
        return lambda cert: cert.subject in subjects
    if key == "issuer":
        issuers = frozenset(values)
        return lambda cert: cert.issuer in issuers
    if key == "common_name":
        names = frozenset(values)
        return lambda cert: cert.common_name in names
    if key == "dns":
        patterns = [value.lower() for value in values]
        return lambda cert: any(_dns_matches(p, name) for p in patterns for name in cert.dns)
    if key == "uri":
        return lambda cert: any(_uri_matches(p, uri) for p in values for uri in cert.uris)
    lowered = [_lower_domain(value) for value in values]
    return lambda cert: any(_email_matches(p, email) for p in lowered for email in cert.emails)


def _lower_domain(email: str) -> str:
    local, at, domain = email.rpartition("@")
    return f"{local}{at}{domain.lower()}"


class Rule:
    """One entry of `allow`: every key it gives must match."""

    def __init__(self, tests: list[Test], written: dict[str, tuple[str, ...]]) -> None:
        self.tests = tests
        self.written = written

    def __repr__(self) -> str:
        return f"<Rule {self.written}>"

    def matches(self, cert: ClientCertificate) -> bool:
        return all(test(cert) for test in self.tests)


def _strings(reader: NodeReader, key: str, node: Node, path: str) -> tuple[str, ...]:
    """Rule key `key`'s values: a string, or a non-empty list of strings."""
    if isinstance(node, ScalarNode):
        return (_pattern(reader, key, node, path),)
    items = reader.nonempty_items(node, path, "must list at least one value")
    values: list[str] = []
    failed = False
    for item, item_path in items:
        try:
            values.append(_pattern(reader, key, item, item_path))
        except Reported:
            failed = True
    if failed:
        raise Reported
    return tuple(values)


def _pattern(reader: NodeReader, key: str, node: Node, path: str) -> str:
    value = reader.string(node, path)
    if not value:
        raise reader.error(node, path, "must not be empty")
    if key == "dns" and "*" in value and not (value.startswith("*.") and "*" not in value[1:]):
        raise reader.error(node, path, f"{value!r}: a wildcard is a whole first label (*.x.y)")
    if key == "email" and "@" not in value:
        raise reader.error(node, path, f"{value!r} is not an e-mail address or *@domain")
    return value


def read_rules(options: Options) -> list[Rule] | None:
    """`allow`: a list of rules, each a mapping of RULE_OPTIONS' keys (at least one);
    None when absent. Each problem is recorded at its own line."""
    items = options.items("allow")
    if items is None:
        return None
    reader = options.reader
    rules: list[Rule] = []
    if not items:
        options.error("allow", "must list at least one rule (leave it out to allow any)")
    for node, path in items:
        try:
            fields = reader.mapping(node, path, tuple(RULE_OPTIONS))
        except Reported:
            options.failed = True
            continue
        if not any(key in fields for key in RULE_OPTIONS):
            if not node.value:  # (else only unknown keys, each reported already)
                reader.error(node, path, f"a rule needs one of: {', '.join(RULE_OPTIONS)}")
            options.failed = True
            continue
        written: dict[str, tuple[str, ...]] = {}
        none: tuple[str, ...] = ()
        for key in RULE_OPTIONS:
            if key in fields:
                values = fields.get(key, partial(_strings, reader, key), none)
                if values:
                    written[key] = values
                else:
                    options.failed = True
        rules.append(Rule([_test(key, values) for key, values in written.items()], written))
    return rules


class ClientCert:
    """Refuses requests without a verified client certificate the rules allow."""

    # It decides who gets through: no cache may come before it in a chain
    # (proxy/plugin/base.py).
    ACCESS_CONTROL: ClassVar[bool] = True

    OPTIONS: ClassVar[dict[str, Option]] = {
        "allow": Option.list_of(
            Option.mapping(RULE_OPTIONS, "a rule: every key given must match"),
            "rules, any one of which lets a certificate in (absent: any verified one)",
        ),
    }
    EAGER = True  # awaits nothing but call_next (proxy/exchange/eager.py)

    def __init__(self, options: Options) -> None:
        self.name = options.name
        self.rules = read_rules(options)

    def __repr__(self) -> str:
        return f"<ClientCert {self.name} rules={self.rules!r}>"

    def permits(self, cert: ClientCertificate) -> bool:
        """Whether `cert` passes (some rule matches it, or there are no rules)."""
        rules = self.rules
        return rules is None or any(rule.matches(cert) for rule in rules)

    # -- per request ----------------------------------------------------------------------
    def request_phase(self, request: Request) -> None:
        """Admit the request or raise ClientCertRequired / ClientCertForbidden
        (proxy/plugin/base.py, "Phases")."""
        cert = request.client_cert
        if cert is None:
            count_auth_failure(self.name, "missing")
            raise ClientCertRequired("a client certificate is required")
        if not self.permits(cert):
            count_auth_failure(self.name, "invalid")
            log.debug("%s: refused client certificate %s", self.name, cert.subject)
            raise ClientCertForbidden("client certificate not allowed")
        if not request.consumer:  # (an earlier auth middleware's word stands)
            request.consumer = cert.common_name or cert.subject

    def response_phase(self, request: Request, response: Response, state: object) -> Response:
        """Nothing to do on the way back."""
        return response

    async def __call__(self, request: Request, call_next: Handler) -> Response:
        self.request_phase(request)
        return await call_next(request)
