"""The upstream servers the tests run the gateway against: real servers on 127.0.0.1.

- `UpstreamServer` (h1.py): HTTP/1.1 (h11), plain or over TLS, answers chosen by the
  request path; the `h1_upstream` fixture (tests/conftest.py) is one, and the forward_auth
  service and the JWKS server (tests/support/auth_service.py, jwks_server.py) are built
  on it.
- `FastUpstream` (fast.py): an HTTP/1.1 source and sink for multi-GiB transfers, and an
  upstream that stops reading (/stall).
- `H2UpstreamServer` (h2.py): HTTP/2, h2c or over TLS, the same paths as `UpstreamServer`
  and HTTP/2's own (resets, GOAWAY, trailers).
- `WsUpstream` (websocket.py): a WebSocket server (the `websockets` library).
- `WsgiUpstream` (wsgi.py): wsgiref, a Python server that folds header names as CGI does.
- `RawUpstream` (raw.py): answers with bytes written by hand (framing no library sends).
- `ContentUpstream` (content.py): answers described by the query string (status, media
  type, size, framing, fields), and server-sent events, for the `compress` tests.

`serve_in_thread` runs any of the asyncio ones on a loop of its own, for synchronous
tests. The testing kit's `ScriptedUpstream` (proxy/testing/upstream.py, the `upstream`
fixture) is the product's own, for users' tests; these are the test suite's.
"""

from tests.support.upstreams.content import ContentUpstream
from tests.support.upstreams.fast import (
    FastExchange,
    FastUpstream,
    pattern_block,
    pattern_chunks,
    pattern_sha256,
)
from tests.support.upstreams.h1 import Recorded, UpstreamServer, serve_in_thread
from tests.support.upstreams.h2 import H2Recorded, H2UpstreamServer
from tests.support.upstreams.raw import RawUpstream
from tests.support.upstreams.websocket import FLOOD_MESSAGE, REFUSAL_BODY, WsUpstream
from tests.support.upstreams.wsgi import WsgiUpstream

__all__ = [
    "FLOOD_MESSAGE",
    "REFUSAL_BODY",
    "ContentUpstream",
    "FastExchange",
    "FastUpstream",
    "H2Recorded",
    "H2UpstreamServer",
    "RawUpstream",
    "Recorded",
    "UpstreamServer",
    "WsUpstream",
    "WsgiUpstream",
    "pattern_block",
    "pattern_chunks",
    "pattern_sha256",
    "serve_in_thread",
]
