"""The `oidc` middleware's view of its OpenID Provider: the discovery document, the key
set, and the token endpoint, all reached through the gateway's own HTTP client
(proxy/upstream/fetch.py).

- **Discovery** (OpenID Connect Discovery 1.0): `ISSUER/.well-known/openid-configuration`
  is fetched by a background task from `start()` on, again every `discovery_refresh`,
  and after a failure every few seconds until it succeeds. The document's `issuer` must
  be the configured one exactly (section 4.3), and it must name an authorization, a token
  and a JWKS endpoint, each an http(s) URL. A failed refresh keeps the document held.
  Requests that need it before the first one arrived wait for it, at most `timeout`.
- **Keys**: a `JwksCache` (middleware/jwks.py) on the document's `jwks_uri`, with its
  refresh, its rate-limited refresh for an unknown `kid` and its metrics, as `jwt` has.
- **The token endpoint**: form POSTs (the code exchange, the refresh) over a keep-alive
  `HttpClient`, authenticated with `client_secret_basic` (RFC 6749 section 2.3.1: the
  id and secret form-encoded, then Basic), `client_secret_post`, or not at all (`none`, a
  public client). The answer must be a JSON object: a 2xx one is the tokens, a 400 or
  401 one with `error` is a refusal (`invalid_grant`: the code or refresh token is no
  longer good), anything else is a bad answer.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import ssl
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote_plus, urlencode

from middleware.jwks import (
    ASYMMETRIC_ALGORITHMS,
    JwksCache,
    JwksError,
    JwksUrl,
    parse_jwks_url,
)
from middleware.jwks import fetch as jwks_fetch
from proxy import (
    ConfigValueError,
    FetchUrl,
    HttpClient,
    ProxyError,
    parse_url,
)

log = logging.getLogger(__name__)

DISCOVERY_PATH = "/.well-known/openid-configuration"
FAILED_RETRY_S = 2.0  # discovery after a failure: again this soon, or sooner when asked
TOKEN_MAX_BYTES = 64 * 1024  # a token answer is a few KiB
_TOKEN_HEADERS = (
    ("Accept", "application/json"),
    ("Content-Type", "application/x-www-form-urlencoded"),
    ("User-Agent", "gatehouse-oidc"),
)


class ProviderUnavailable(Exception):
    """The provider could not be reached, or did not answer in time."""


class ProviderBadAnswer(Exception):
    """The provider answered, but not what OpenID Connect says it must."""


class TokenRequestRefused(Exception):
    """The token endpoint refused the request with an OAuth error (`error`: its code)."""

    def __init__(self, error: str, description: str) -> None:
        super().__init__(f"{error}: {description}" if description else error)
        self.error = error


@dataclass(frozen=True, slots=True)
class ProviderMetadata:
    """What the middleware uses of a discovery document."""

    issuer: str
    authorization_endpoint: str
    token_endpoint: FetchUrl
    jwks_uri: JwksUrl
    end_session_endpoint: str | None
    id_token_algorithms: frozenset[str]  # the asymmetric ones it signs with, that we verify


def discovery_url(issuer: str) -> str:
    """Where the discovery document of `issuer` is (section 4: the issuer's path, then
    the well-known one)."""
    return issuer.rstrip("/") + DISCOVERY_PATH


def parse_discovery(data: bytes, issuer: str) -> ProviderMetadata:
    """The metadata of a discovery document of `issuer`.

    Raises:
        ProviderBadAnswer: not a JSON object, another issuer, an endpoint missing or not
            an http(s) URL.
    """
    try:
        document = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise ProviderBadAnswer(f"the discovery document is not JSON: {exc}") from None
    if not isinstance(document, dict):
        raise ProviderBadAnswer("the discovery document is not a JSON object")
    if document.get("issuer") != issuer:
        raise ProviderBadAnswer(
            f"the discovery document names issuer {document.get('issuer')!r}, not {issuer!r}"
        )

    def endpoint(key: str) -> str:
        value = document.get(key)
        if not isinstance(value, str) or not value.startswith(("http://", "https://")):
            raise ProviderBadAnswer(f"the discovery document's {key} is not an http(s) URL")
        return value

    authorization = endpoint("authorization_endpoint")
    token = endpoint("token_endpoint")
    jwks = endpoint("jwks_uri")
    end_session = endpoint("end_session_endpoint") if "end_session_endpoint" in document else None
    try:
        token_url = parse_url(token)
        jwks_url = parse_jwks_url(jwks)
    except ConfigValueError as exc:
        raise ProviderBadAnswer(f"the discovery document: {exc}") from None
    listed = document.get("id_token_signing_alg_values_supported")
    algorithms = frozenset(
        alg for alg in (listed if isinstance(listed, list) else ["RS256"]) if isinstance(alg, str)
    )
    return ProviderMetadata(
        issuer,
        authorization,
        token_url,
        jwks_url,
        end_session,
        algorithms & ASYMMETRIC_ALGORITHMS,
    )


class OidcProvider:
    """One issuer's discovery document, keys and token endpoint (see the module doc).

    Construct it at config load; `start()` and `close()` run on the gateway's loop.
    """

    def __init__(
        self,
        issuer: str,
        *,
        name: str,
        client_id: str,
        client_secret: str,
        auth_method: str,
        timeout_s: float,
        discovery_refresh_s: float,
        jwks_refresh_s: float,
        jwks_min_refresh_s: float,
        ssl_context: ssl.SSLContext | None,
    ) -> None:
        self.issuer = issuer
        self.name = name
        self.client_id = client_id
        self.auth_method = auth_method
        self.timeout_s = timeout_s
        self.discovery_refresh_s = discovery_refresh_s
        self.jwks_refresh_s = jwks_refresh_s
        self.jwks_min_refresh_s = jwks_min_refresh_s
        self.ssl_context = ssl_context
        self.discoveries = 0  # fetches of the discovery document (tests, repr)
        self.jwks: JwksCache | None = None
        self._discovery = parse_jwks_url(discovery_url(issuer))
        self._secret = client_secret
        self._metadata: ProviderMetadata | None = None
        self._discovered: asyncio.Event | None = None  # made in start(), on the loop
        self._refresher: asyncio.Task[None] | None = None
        self._token_client: HttpClient | None = None
        self._closed = False

    def __repr__(self) -> str:
        state = "discovered" if self._metadata is not None else "waiting"
        return f"<OidcProvider {self.issuer} {state} discoveries={self.discoveries}>"

    # -- lifecycle ----------------------------------------------------------------------
    async def start(self) -> None:
        """Start fetching the discovery document (the caller does not wait for it)."""
        if self._refresher is None and not self._closed:
            self._discovered = asyncio.Event()
            self._refresher = asyncio.get_running_loop().create_task(
                self._discover_forever(), name=f"oidc discovery {self.name}"
            )

    async def close(self) -> None:
        """Stop the refreshes; close the token endpoint's connections."""
        self._closed = True
        task, self._refresher = self._refresher, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.jwks is not None:
            await self.jwks.aclose()
        if self._token_client is not None:
            self._token_client.close()

    # -- discovery ----------------------------------------------------------------------
    async def metadata(self) -> ProviderMetadata:
        """The discovery document held, waiting for the first at most `timeout_s`.

        Raises:
            ProviderUnavailable: none has arrived (or the middleware was not started).
        """
        metadata = self.held_metadata()
        event = self._discovered
        if metadata is None and event is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.timeout_s):
                    await event.wait()
            metadata = self.held_metadata()
        if metadata is None:
            raise ProviderUnavailable(f"no discovery document from {self.issuer} yet")
        return metadata

    def held_metadata(self) -> ProviderMetadata | None:
        """The discovery document held (None before the first arrives)."""
        return self._metadata

    async def _discover_forever(self) -> None:
        while True:
            try:
                ok = await self._discover_once()
            except Exception:  # a bug: say so, and try again later
                log.exception("oidc %s: discovery from %s failed", self.name, self.issuer)
                ok = False
            await asyncio.sleep(
                self.discovery_refresh_s if ok else min(FAILED_RETRY_S, self.discovery_refresh_s)
            )

    async def _discover_once(self) -> bool:
        self.discoveries += 1
        url = self._discovery
        try:
            data = await jwks_fetch(url, self.timeout_s, self.ssl_context)
            metadata = parse_discovery(data, self.issuer)
        except (JwksError, ProviderBadAnswer) as exc:
            log.warning("oidc %s: discovery from %s failed: %s", self.name, url.url, exc)
            return False
        previous = self._metadata
        self._metadata = metadata
        if previous is None or previous.jwks_uri != metadata.jwks_uri:
            old, self.jwks = self.jwks, self._jwks_cache(metadata.jwks_uri)
            await self.jwks.start()
            if old is not None:
                await old.aclose()
        if previous is None or previous.token_endpoint != metadata.token_endpoint:
            old_client = self._token_client
            self._token_client = HttpClient(
                metadata.token_endpoint, timeout_s=self.timeout_s, tls=self.ssl_context
            )
            if old_client is not None:
                old_client.close()
        if self._discovered is not None:
            self._discovered.set()
        return True

    def _jwks_cache(self, url: JwksUrl) -> JwksCache:
        return JwksCache(
            url,
            name=self.name,
            refresh_s=self.jwks_refresh_s,
            min_refresh_s=self.jwks_min_refresh_s,
            timeout_s=self.timeout_s,
            wait_s=self.timeout_s,
            ssl_context=self.ssl_context,
        )

    # -- the token endpoint -------------------------------------------------------------
    async def token_request(self, form: dict[str, str]) -> dict[str, Any]:
        """POST `form` (with the client's authentication) to the token endpoint; the JSON
        object of its 2xx answer.

        Raises:
            ProviderUnavailable: not reached, or no whole answer within `timeout_s`.
            TokenRequestRefused: a 400 or 401 with an OAuth `error`.
            ProviderBadAnswer: any other answer.
        """
        await self.metadata()
        client = self._token_client
        assert client is not None  # made with the metadata
        fields = dict(form)
        headers = list(_TOKEN_HEADERS)
        if self.auth_method == "client_secret_basic":
            # RFC 6749 section 2.3.1: each form-encoded before they are joined.
            pair = f"{quote_plus(self.client_id, safe='')}:{quote_plus(self._secret, safe='')}"
            headers.append(("Authorization", "Basic " + base64.b64encode(pair.encode()).decode()))
        else:
            fields["client_id"] = self.client_id
            if self.auth_method == "client_secret_post":
                fields["client_secret"] = self._secret
        body = urlencode(fields).encode("ascii")
        try:
            answer = await client.fetch(
                "POST", headers=headers, body=body, max_body=TOKEN_MAX_BYTES
            )
        except ProxyError as exc:  # refused, unreachable, timeout, reset, not HTTP
            raise ProviderUnavailable(f"token endpoint: {exc.message}") from None
        if answer.body is None:
            raise ProviderBadAnswer(f"the token endpoint's answer is over {TOKEN_MAX_BYTES} bytes")
        try:
            document = json.loads(answer.body)
        except (ValueError, RecursionError):
            document = None
        if not isinstance(document, dict):
            raise ProviderBadAnswer(f"the token endpoint answered {answer.status}, not JSON")
        if 200 <= answer.status < 300:
            return document
        error = document.get("error")
        if answer.status in (400, 401) and isinstance(error, str):
            description = document.get("error_description")
            raise TokenRequestRefused(error, description if isinstance(description, str) else "")
        raise ProviderBadAnswer(f"the token endpoint answered {answer.status}")
