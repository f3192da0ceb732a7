"""The ProxyError tree: every failure the gateway answers itself.

Each class carries the HTTP status it maps to and a stable reason code used in logs,
metrics (`gatehouse_local_replies_total{reason}`) and the JSON error body (docs/errors.md).
"""

from __future__ import annotations


class ProxyError(Exception):
    """Base class: raising one anywhere in an exchange yields a local reply."""

    status: int = 500
    reason: str = "internal_error"

    def __init__(self, message: str = "") -> None:
        super().__init__(message or self.reason.replace("_", " "))
        self.message = message or self.reason.replace("_", " ")


class BadRequest(ProxyError):
    """Malformed request: a protocol error or a smuggling attempt (RFC 9112 section 6.3)."""

    status, reason = 400, "bad_request"


class RequestTimeout(ProxyError):
    """The client was too slow sending its head or body."""

    status, reason = 408, "request_timeout"


class BodyTooLarge(ProxyError):
    """The request body exceeds the route's `max_body_size`."""

    status, reason = 413, "body_too_large"


class HeadTooLarge(ProxyError):
    """The request head exceeds `limits.max_head_bytes`."""

    status, reason = 431, "head_too_large"


class NoRoute(ProxyError):
    """No route matches the request."""

    status, reason = 404, "no_route"


class AcmeChallengeUnknown(ProxyError):
    """An ACME HTTP-01 challenge path for a name the gateway obtains certificates for,
    with a token it is not answering (proxy/exchange/acme_http01.py)."""

    status, reason = 404, "acme_challenge_unknown"


class UpgradeNotAllowed(ProxyError):
    """A WebSocket upgrade on a route whose `websocket` is off (not a silent downgrade)."""

    status, reason = 403, "websocket_not_allowed"


class UpstreamConnectError(ProxyError):
    """The upstream refused the connection or could not be reached."""

    status, reason = 502, "upstream_connect_failed"


class UpstreamReset(ProxyError):
    """The upstream closed or reset the connection before a full response."""

    status, reason = 502, "upstream_reset"


class UpstreamProtocolError(ProxyError):
    """The upstream sent a malformed response."""

    status, reason = 502, "upstream_bad_response"


class UpstreamConnectTimeout(ProxyError):
    """Connecting to the upstream took longer than `timeouts.connect`."""

    status, reason = 504, "upstream_connect_timeout"


class UpstreamTimeout(ProxyError):
    """The upstream was silent for longer than `timeouts.read`."""

    status, reason = 504, "upstream_timeout"


class PoolTimeout(ProxyError):
    """No pooled connection became free within `pool.wait_timeout`."""

    status, reason = 503, "pool_timeout"


class UpstreamOverloaded(ProxyError):
    """The upstream's circuit breaker is open: a `circuit_breaker` limit (requests in
    flight, requests waiting for a connection, or connections open) is reached, so the
    request is refused at once instead of queueing without bound."""

    status, reason = 503, "upstream_overloaded"

    def __init__(self, limit: str, message: str = "") -> None:
        super().__init__(message)
        self.limit = limit  # the circuit_breaker key that refused it (a metrics label)


class InternalError(ProxyError):
    """A bug: logged with its traceback, answered 500."""

    status, reason = 500, "internal_error"


class Unauthorized(ProxyError):
    """Credentials are missing (or, for schemes that re-ask, not accepted): 401 with the
    middleware's `challenge` as WWW-Authenticate (RFC 9110 section 11.6.1)."""

    status, reason = 401, "unauthorized"

    def __init__(self, challenge: str, message: str = "") -> None:
        super().__init__(message)
        self.challenge = challenge


class Forbidden(ProxyError):
    """Credentials were given and refused (RFC 9110 section 15.5.4)."""

    status, reason = 403, "forbidden"


class RateLimited(ProxyError):
    """A rate_limit middleware's budget for the request's key is spent: 429 with
    Retry-After (RFC 9110 section 10.2.3, RFC 6585 section 4) and RateLimit-* headers."""

    status, reason = 429, "rate_limited"


class RateLimitUnavailable(ProxyError):
    """The rate-limit backend could not decide and `on_redis_error` is `deny`."""

    status, reason = 503, "rate_limit_unavailable"


class IpForbidden(ProxyError):
    """An ip_filter middleware refused the client's address (or could not tell it)."""

    status, reason = 403, "ip_forbidden"


class ClientCertRequired(ProxyError):
    """A client_cert middleware found no verified client certificate: the client sent
    none (`client_auth: {mode: optional}`) or the listener asks for none."""

    status, reason = 403, "client_cert_required"


class ClientCertForbidden(ProxyError):
    """A client_cert middleware refused the client certificate: no `allow` rule matches."""

    status, reason = 403, "client_cert_forbidden"


class AuthUnavailable(ProxyError):
    """forward_auth could not reach its auth service (refused, unreachable, TLS failed)."""

    status, reason = 503, "auth_unavailable"


class AuthTimeout(ProxyError):
    """forward_auth's auth service did not answer within the middleware's `timeout`."""

    status, reason = 504, "auth_timeout"


class AuthBadResponse(ProxyError):
    """forward_auth's auth service reset the connection, sent a malformed response, or a
    refusal whose body is too large to relay."""

    status, reason = 502, "auth_bad_response"


class CorsPreflightRefused(ProxyError):
    """A CORS preflight whose origin, method or headers the route's cors middleware does
    not allow: answered here with no Access-Control-Allow-* headers, never forwarded."""

    status, reason = 403, "cors_preflight_refused"


# The canonical form's refusals (proxy/core/canonical.py). Kept in this module, which is
# never compiled: mypyc would drop the `reason` a compiled subclass sets.
class InvalidTarget(BadRequest):
    """The request target cannot be put in canonical form, or names a path the gateway
    will not forward (an escaped slash under `reject`, `..` above the root)."""

    reason = "invalid_target"


class InvalidHost(BadRequest):
    """Host or `:authority` is not an RFC 3986 authority (or carries userinfo)."""

    reason = "invalid_host"


class InvalidMethod(BadRequest):
    """A registered method in the wrong case (`post`, `dElEtE`)."""

    reason = "invalid_method"


class InvalidHeader(BadRequest):
    """A header field the gateway refuses: a name with "_" under
    `headers_with_underscores: reject`, or a second Authorization, Proxy-Authorization,
    Host or Content-Type."""

    reason = "invalid_header"
