"""One ACME order for one name, with certbot's `acme` library: blocking, so the manager
(proxy/acme/manager.py) runs it in a thread of its own, never on the event loop.

The flow (RFC 8555 section 7):

1. `AcmeSession.open`: the directory, then the account. The account key is read from
   storage or made (EC P-256) and stored before first use; `newAccount` with that key
   returns the existing account (section 7.3.1), so a restart, or a server that forgot
   the account, needs nothing else. Registering agrees to the server's terms of service.
2. `obtain(name)`: a new key (EC P-256) and a CSR for `name` alone; `newOrder`; for each
   authorization not valid yet, the configured challenge is handed to the `Responder`
   (which returns once every worker answers it), answered with an empty object (section
   7.5.1), and the authorization polled until it is valid or not; then the order is
   finalized with the CSR, polled until valid, and the chain downloaded.

Polling waits `FIRST_POLL_S`, doubling to `MAX_POLL_S`, or what the server's Retry-After
asks when that is longer; the whole order has `ORDER_TIMEOUT_S`. A `badNonce` refusal
(section 6.5: the server may reject any nonce, and pebble rejects 5% on purpose) is
retried with a fresh nonce, up to `BAD_NONCE_TRIES` times per request, on top of the
library's own single retry.

Whatever goes wrong is an `OrderFailed` whose message says why: the server's problem
document (type, detail, and each subproblem), the failed challenge's error, or the
network error.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import requests
from acme import challenges as acme_challenges
from acme import client as acme_client
from acme import crypto_util, messages
from acme import errors as acme_errors
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from josepy.b64 import b64encode
from josepy.errors import Error as JoseError
from josepy.jwa import ES256
from josepy.jwk import JWKEC

from proxy.acme.challenges import Challenge, OrderFailed, Responder
from proxy.acme.storage import AcmeStorage
from proxy.config.model import AcmeConfig

log = logging.getLogger(__name__)

NETWORK_TIMEOUT_S = 30
ORDER_TIMEOUT_S = 120.0
FIRST_POLL_S = 0.1
MAX_POLL_S = 5.0
BAD_NONCE_TRIES = 5

T = TypeVar("T")
# What the server, the network or the library may raise: an OrderFailed with the reason.
# Anything else is a bug, and goes up with its traceback (the manager logs it).
EXPECTED_FAILURES = (
    messages.Error,
    acme_errors.Error,
    JoseError,
    requests.RequestException,
    OSError,
    ValueError,
)


class _ChallengeAnswer(acme_challenges.KeyAuthorizationChallengeResponse):
    """The answer to a challenge of any type: it is sent as an empty JSON object (RFC
    8555 section 7.5.1), the key authorization left out (the library has no class for
    tls-alpn-01 any more). The field matters: an object without one is falsy, and the
    library then sends an empty payload, a POST-as-GET, which answers nothing."""

    typ = "answer"


class AcmeSession:
    """One ACME server and account, opened once and used for a run of orders (one at a
    time: the library's client is not thread-safe)."""

    def __init__(
        self,
        settings: AcmeConfig,
        storage: AcmeStorage,
        user_agent: str,
        stopping: threading.Event,
    ) -> None:
        self.settings = settings
        self.storage = storage
        self._user_agent = user_agent
        self._stopping = stopping
        self._client: acme_client.ClientV2 | None = None
        self._key: JWKEC | None = None

    def __repr__(self) -> str:
        state = "OPEN" if self._client is not None else "CLOSED"
        return f"<AcmeSession {self.settings.directory} {state}>"

    # -- the account -------------------------------------------------------------------
    def open(self) -> None:
        """Read the directory and find or register the account.

        Raises:
            OrderFailed: the server cannot be reached or refuses the account.
        """
        try:
            self._open()
        except EXPECTED_FAILURES as exc:
            raise OrderFailed(
                f"cannot open the account at {self.settings.directory}: {_why(exc)}"
            ) from None

    def _open(self) -> None:
        key = self._account_key()
        network = acme_client.ClientNetwork(
            key, alg=ES256, user_agent=self._user_agent, timeout=NETWORK_TIMEOUT_S
        )
        if self.settings.ca is not None:
            # requests takes a CA bundle's path where acme's annotation says bool.
            network.verify_ssl = self.settings.ca  # type: ignore[assignment]
        directory = acme_client.ClientV2.get_directory(self.settings.directory, network)
        client = acme_client.ClientV2(directory, network)
        registration = messages.NewRegistration.from_data(
            email=self.settings.email, terms_of_service_agreed=True
        )
        try:
            account = self._retrying(client.new_account, registration)
        except acme_errors.ConflictError as existing:  # the key's account exists
            account = messages.RegistrationResource(
                uri=existing.location, body=messages.Registration()
            )
            network.account = account
        log.info("acme: account %s at %s", account.uri, self.settings.directory)
        self._client, self._key = client, key

    def _account_key(self) -> JWKEC:
        pem = self.storage.load_account_key()
        if pem is None:
            private = ec.generate_private_key(ec.SECP256R1())
            pem = private.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            self.storage.save_account_key(pem)
            log.info("acme: made a new account key, %s", self.storage.account_key)
        loaded = serialization.load_pem_private_key(pem, password=None)
        if not isinstance(loaded, ec.EllipticCurvePrivateKey):
            raise OrderFailed(f"{self.storage.account_key} is not an EC key")
        return JWKEC(key=loaded)

    # -- an order ----------------------------------------------------------------------
    def obtain(self, name: str, kind: str, responder: Responder) -> tuple[bytes, bytes]:
        """A certificate for `name`, proved with a challenge of type `kind`: its chain
        (PEM, leaf first) and its key (PEM).

        Raises:
            OrderFailed: the server refused, a validation failed, the order timed out,
                or the server could not be reached.
        """
        if self._client is None:
            self.open()
        try:
            return self._obtain(name, kind, responder, time.monotonic() + ORDER_TIMEOUT_S)
        except EXPECTED_FAILURES as exc:
            self._client = None  # opened afresh next time (the account may be gone)
            raise OrderFailed(_why(exc)) from None

    def _obtain(
        self, name: str, kind: str, responder: Responder, deadline: float
    ) -> tuple[bytes, bytes]:
        client = self._client
        assert client is not None
        private = ec.generate_private_key(ec.SECP256R1())
        key_pem = private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        csr_pem = crypto_util.make_csr(key_pem, [name])
        order = self._retrying(client.new_order, csr_pem)
        for authorization in order.authorizations:
            status = authorization.body.status
            if status == messages.STATUS_VALID:
                continue  # the server reused an earlier validation
            if status != messages.STATUS_PENDING:
                raise OrderFailed(f"the authorization for {name} is {status.name}")
            self._validate(name, kind, client, authorization, responder, deadline)
        order = self._retrying(client.begin_finalization, order)
        delay = FIRST_POLL_S
        while True:
            body = order.body
            if body.status == messages.STATUS_VALID and body.certificate is not None:
                chain = self._post_as_get(client, body.certificate)
                return chain.text.encode(), key_pem
            if body.status == messages.STATUS_INVALID:
                error = f": {_problem(body.error)}" if body.error is not None else ""
                raise OrderFailed(f"the order for {name} is invalid{error}")
            response = self._post_as_get(client, order.uri)
            order = order.update(body=messages.Order.from_json(response.json()))
            if order.body.status not in (messages.STATUS_VALID, messages.STATUS_INVALID):
                self._pause(response, delay, deadline, f"the order for {name}")
                delay = min(MAX_POLL_S, delay * 2)

    def _validate(
        self,
        name: str,
        kind: str,
        client: acme_client.ClientV2,
        authorization: messages.AuthorizationResource,
        responder: Responder,
        deadline: float,
    ) -> None:
        """Answer `authorization`'s challenge of type `kind`, and wait until the server
        has checked it."""
        offered = {}
        for body in authorization.body.challenges:
            fields = body.chall.to_partial_json()
            offered[str(fields.get("type"))] = (body, fields)
        if kind not in offered:
            offers = ", ".join(sorted(offered))
            raise OrderFailed(f"the server offers no {kind} challenge for {name} ({offers})")
        body, fields = offered[kind]
        token = str(fields["token"])
        assert self._key is not None
        thumbprint = self._key.public_key().thumbprint(hash_function=hashes.SHA256)
        challenge = Challenge(name, kind, token, f"{token}.{b64encode(thumbprint).decode()}")
        new_nonce = client.directory["newNonce"]
        responder.offer(challenge)
        try:
            # Posted here rather than with `answer_challenge`, which insists on a Link
            # "up" header that RFC 8555 does not require (pebble sends none).
            self._retrying(
                client.net.post,
                body.uri,
                _ChallengeAnswer(key_authorization=challenge.key_authorization),
                new_nonce_url=new_nonce,
            )
            delay = FIRST_POLL_S
            while True:
                authorization, response = self._retrying(client.poll, authorization)
                status = authorization.body.status
                if status == messages.STATUS_VALID:
                    return
                if status != messages.STATUS_PENDING:
                    raise OrderFailed(_validation_failure(name, kind, authorization))
                self._pause(response, delay, deadline, f"the {kind} validation of {name}")
                delay = min(MAX_POLL_S, delay * 2)
        finally:
            responder.withdraw(challenge)

    # -- requests ----------------------------------------------------------------------
    def _post_as_get(self, client: acme_client.ClientV2, url: str) -> requests.Response:
        """A POST-as-GET (RFC 8555 section 6.3) of `url`."""
        new_nonce = client.directory["newNonce"]
        response: requests.Response = self._retrying(
            client.net.post, url, None, new_nonce_url=new_nonce
        )
        return response

    def _retrying(self, call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """`call(...)`, again with a fresh nonce after a badNonce refusal."""
        for attempt in range(1, BAD_NONCE_TRIES + 1):
            if self._stopping.is_set():
                raise OrderFailed("the gateway is stopping")
            try:
                return call(*args, **kwargs)
            except messages.Error as exc:
                if exc.code != "badNonce" or attempt == BAD_NONCE_TRIES:
                    raise OrderFailed(_problem(exc)) from None
                log.debug("acme: badNonce, trying again: %s", exc)
        raise AssertionError("unreachable")

    def _pause(self, response: requests.Response, delay: float, deadline: float, what: str) -> None:
        """Wait before polling again: `delay`, or the server's Retry-After if longer.

        Raises:
            OrderFailed: the deadline would pass first, or the gateway is stopping.
        """
        wait = max(delay, _retry_after(response))
        if time.monotonic() + wait > deadline:
            raise OrderFailed(f"timed out waiting for {what} ({ORDER_TIMEOUT_S:g} s)")
        if self._stopping.wait(wait):
            raise OrderFailed("the gateway is stopping")


def _retry_after(response: requests.Response) -> float:
    """The Retry-After of `response` in seconds (a number of seconds only; 0 without)."""
    try:
        return max(0.0, float(response.headers.get("Retry-After", "0")))
    except ValueError:
        return 0.0


def _validation_failure(name: str, kind: str, authorization: messages.AuthorizationResource) -> str:
    errors = [
        _problem(body.error) for body in authorization.body.challenges if body.error is not None
    ]
    why = "; ".join(errors) if errors else "no reason given"
    return f"the {kind} validation of {name} failed ({authorization.body.status.name}): {why}"


def _problem(error: messages.Error) -> str:
    """A problem document (RFC 8555 section 6.7) on one line: its type, detail and
    subproblems."""
    text = error.code or str(error.typ)
    if error.detail:
        text += f": {error.detail}"
    for sub in error.subproblems or ():
        identifier = f" {sub.identifier.value}" if sub.identifier is not None else ""
        text += f"; {sub.code or sub.typ}{identifier}: {sub.detail or ''}"
    return text


def _why(exc: BaseException) -> str:
    if isinstance(exc, messages.Error):
        return _problem(exc)
    if isinstance(exc, requests.RequestException):
        return f"cannot reach the server: {exc}"
    return str(exc) or type(exc).__name__
