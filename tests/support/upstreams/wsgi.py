"""A WSGI upstream that behaves like the Python servers behind many gateways: wsgiref's
server (the standard library's, on its own thread) folds header names into CGI
variables (`X_Consumer` and `X-Consumer` both become `HTTP_X_CONSUMER`, repeated fields
joined with ","), and the app upper-cases the method and decodes the path as Werkzeug
does. It answers every request with what it understood, as JSON."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable
from types import TracebackType
from typing import Any, Self
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

STOP_TIMEOUT_S = 10.0


def _app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
    seen = {
        "method": environ["REQUEST_METHOD"].upper(),  # as Werkzeug's Request.method does
        "path": environ["PATH_INFO"],
        "query": environ["QUERY_STRING"],
        "headers": {k: v for k, v in environ.items() if k.startswith("HTTP_")},
    }
    body = json.dumps(seen).encode()
    start_response(
        "200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
    )
    return [body]


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


class WsgiUpstream:
    """`with WsgiUpstream() as wsgi:` serves on 127.0.0.1 (`wsgi.url`) until the block ends."""

    def __init__(self) -> None:
        self._server: WSGIServer = make_server("127.0.0.1", 0, _app, handler_class=_QuietHandler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(STOP_TIMEOUT_S)
