"""Every metric Gatehouse exports, declared in one place (DESIGN.md, operations).

Metrics live on an explicit registry (not prometheus-client's global one), in base units,
with bounded labels. The admin listener that serves them, and their aggregation across
workers, come with the operations work; until then the counters are kept per process.
"""

from __future__ import annotations

import enum

from prometheus_client import CollectorRegistry, Counter

REGISTRY = CollectorRegistry(auto_describe=True)


class Http2Limit(enum.Enum):
    """An HTTP/2 defence that fired (`Http2Config` names the attack each one stops)."""

    RAPID_RESET = "rapid_reset"  # GOAWAY ENHANCE_YOUR_CALM: too many resets per second
    CONTROL_FLOOD = "control_flood"  # GOAWAY ENHANCE_YOUR_CALM: SETTINGS/PING/... flood
    REFUSED_STREAM = "refused_stream"  # a stream beyond max_concurrent_streams
    HEADER_LIST = "header_list"  # 431: a request's fields over max_header_list_size
    MALFORMED = "malformed"  # RST_STREAM PROTOCOL_ERROR: fields break RFC 9113 section 8
    CONNECTION_ERROR = "connection_error"  # GOAWAY: h2 refused the connection's input
    BODY_TIMEOUT = "body_timeout"  # 408: a request body stopped coming
    WINDOW_TIMEOUT = "window_timeout"  # RST_STREAM: the client kept its window shut
    IDLE_TIMEOUT = "idle_timeout"  # GOAWAY NO_ERROR: no stream for keepalive_timeout


HTTP2_LIMIT_HITS = Counter(
    "gatehouse_http2_limit_hits",
    "HTTP/2 defences that fired, by limit",
    ["limit"],
    registry=REGISTRY,
)
_HTTP2_LIMIT_CHILDREN = {limit: HTTP2_LIMIT_HITS.labels(limit.value) for limit in Http2Limit}


def count_http2_limit(limit: Http2Limit) -> None:
    """One more hit of `limit`."""
    _HTTP2_LIMIT_CHILDREN[limit].inc()
