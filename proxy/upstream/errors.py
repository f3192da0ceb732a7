"""The upstream side's own failures, beside the `ProxyError` family of proxy/core/errors.py.

This module is not compiled (proxy/buildinfo.py): mypyc would drop the `metrics_code` a
compiled subclass of an interpreted exception sets. proxy/upstream/h1.py and
proxy/upstream/h2/stream.py re-export them.
"""

from __future__ import annotations

from proxy.core.errors import UpstreamReset


class StaleConnection(UpstreamReset):
    """A reused connection failed before any response byte: the keep-alive race.

    The upstream closed an idle connection as we sent on it; the request is retried on
    a fresh connection when it can be replayed."""

    metrics_code = "stale"  # gatehouse_upstream_requests_total{code}


class StreamRefused(UpstreamReset):
    """The upstream did not process the stream (GOAWAY with a lower last_stream_id, or
    RST_STREAM REFUSED_STREAM; RFC 9113 section 8.7): safe to retry, even for POST.

    `replay` is the request body consumed from the client so far (None when it was too
    large to keep: the retry is then impossible)."""

    metrics_code = "refused"  # gatehouse_upstream_requests_total{code}

    def __init__(self, message: str, replay: bytes | None) -> None:
        super().__init__(message)
        self.replay = replay
