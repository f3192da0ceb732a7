"""ACME HTTP-01 challenges (RFC 8555 section 8.3), answered before routing.

`GET /.well-known/acme-challenge/<token>` whose Host is a name of a `tls.acme` section
with `challenge: http-01` is answered here, on whichever listener it arrives (the
validator connects to port 80; a plaintext listener with `redirect_https` lets the path
through): 200 with the key authorization as `text/plain` for a token an order of the
supervisor is waiting on, else 404 `acme_challenge_unknown`. The path for any other
Host is routed as usual, so an upstream can answer its own challenges.

The tokens are the worker's (`Http01Tokens`, one per process, carried from each Runtime
to the next): the supervisor sends them with every change (proxy/process/acme_serving.py)
and waits until every worker has them before it lets the CA validate.
"""

from __future__ import annotations

from multidict import CIMultiDict

from proxy.config.model import ACME_CHALLENGE_PREFIX, Config
from proxy.core.body import Body
from proxy.core.errors import AcmeChallengeUnknown
from proxy.core.local_reply import local_reply
from proxy.core.models import Request, Response
from proxy.exchange.local_answers import split_host

_ANSWERED_METHODS = ("GET", "HEAD")


class Http01Tokens:
    """The tokens this process answers: token -> key authorization."""

    __slots__ = ("answers",)

    def __init__(self) -> None:
        self.answers: dict[str, str] = {}

    def __repr__(self) -> str:
        return f"<Http01Tokens {len(self.answers)}>"

    def replace(self, answers: dict[str, str]) -> None:
        """Answer exactly `answers` from now on."""
        self.answers = dict(answers)


def http01_hosts(config: Config) -> frozenset[str]:
    """The names whose challenge paths are answered here."""
    return frozenset(
        name
        for listener in config.listeners
        if listener.tls is not None and listener.tls.acme is not None
        if listener.tls.acme.challenge == "http-01"
        for name in listener.tls.acme.domains
    )


class Http01Responder:
    """Answers the challenge paths of `hosts` from `tokens`."""

    __slots__ = ("_hosts", "_tokens")

    def __init__(self, hosts: frozenset[str], tokens: Http01Tokens) -> None:
        self._hosts = hosts
        self._tokens = tokens

    def answer(self, request: Request) -> Response | None:
        """The answer to `request` when it is a challenge path for one of the names
        (None: not one; route it)."""
        path = request.path
        if not path.startswith(ACME_CHALLENGE_PREFIX):
            return None
        host, _ = split_host(request)
        if host.lower().removesuffix(".") not in self._hosts:
            return None
        token = path[len(ACME_CHALLENGE_PREFIX) :]
        key_authorization = self._tokens.answers.get(token)
        if key_authorization is None or request.method not in _ANSWERED_METHODS:
            return local_reply(AcmeChallengeUnknown(f"no ACME challenge {token!r}"), request)
        headers: CIMultiDict[str] = CIMultiDict([("Content-Type", "text/plain")])
        return Response(200, headers, Body.from_bytes(key_authorization.encode("ascii")))
