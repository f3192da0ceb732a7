"""Real upstream servers for tests, with scripted answers; they record every request.

    users = await start_upstream("users")              # HTTP/1.1 on 127.0.0.1:<free port>
    users.on("GET", "/users/1").reply(json={"id": 1})
    users.on(path="/flaky").reply(503, times=2).reply(200)
    orders = await start_upstream("orders", protocol="h2c")

A request is answered by the first rule that matches it, in the order the rules were
added, rules with neither method nor path (`on()`, or `reply` on the upstream itself)
last. A rule's replies are used in turn: one with `times=N` answers N requests, then the
next takes over; the last one without `times` answers for good. With no rule matching,
the upstream answers 200 with JSON of what it received (method, path, query, headers,
body), which is often all a routing test needs.

`websocket=True` accepts WebSocket upgrades (HTTP/1.1) and echoes every message back.
Every request lands in `requests` as a `ReceivedRequest`; the test gateway's exchange id
(proxy/testing/trace.py) is taken off the headers and kept in `exchange`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import inspect
import json as json_module
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h11
import wsproto.connection
import wsproto.events
from multidict import CIMultiDict

from proxy.testing.trace import EXCHANGE_HEADER

log = logging.getLogger(__name__)

PROTOCOLS = ("http1", "h2c")
READ_BYTES = 64 * 1024
MAX_RECORDED_BODY = 16 * 1024 * 1024  # bytes of one request body kept in `requests`
_WEBSOCKET_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 section 1.3


@dataclass
class ReceivedRequest:
    """One request as an upstream received it."""

    method: str
    target: str  # path and query, exactly as sent
    headers: CIMultiDict[str]  # without the test gateway's exchange id
    body: bytes
    http_version: str  # "1.1" or "2"
    exchange: str = ""  # the test gateway's exchange id; "" for other clients
    received_at: float = 0.0  # time.monotonic() when the request had fully arrived

    @property
    def path(self) -> str:
        return self.target.partition("?")[0]

    @property
    def query(self) -> str:
        return self.target.partition("?")[2]

    def json(self) -> Any:
        """The body parsed as JSON."""
        return json_module.loads(self.body)


@dataclass
class Reply:
    """What an upstream answers. `delay` waits before the head; `drop` closes the
    connection (HTTP/1.1) or resets the stream (h2c) instead of answering."""

    status: int = 200
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    delay: float = 0.0
    drop: bool = False


Responder = Callable[[ReceivedRequest], "Reply | Awaitable[Reply]"]


def make_reply(
    status: int = 200,
    *,
    body: bytes | str = b"",
    json: Any = None,
    headers: Mapping[str, str] | Iterable[tuple[str, str]] = (),
    delay: float = 0.0,
    drop: bool = False,
) -> Reply:
    """A Reply; `json` sets the body and Content-Type, `str` bodies are UTF-8."""
    pairs = list(headers.items() if isinstance(headers, Mapping) else headers)
    if json is not None:
        body = json_module.dumps(json)
        if not any(name.lower() == "content-type" for name, _ in pairs):
            pairs.append(("content-type", "application/json"))
    data = body.encode() if isinstance(body, str) else body
    return Reply(status, pairs, data, delay, drop)


class Rule:
    """Requests a rule matches (method and exact path or path prefix) and its replies."""

    def __init__(self, method: str | None, path: str | None, prefix: str | None) -> None:
        if path is not None and prefix is not None:
            raise ValueError("give path= or prefix=, not both")
        self.method = method.upper() if method else None
        self.path = path
        self.prefix = prefix
        self._replies: list[tuple[Reply | Responder, int | None]] = []

    def __repr__(self) -> str:
        where = self.path or (f"{self.prefix}*" if self.prefix else "*")
        return f"<Rule {self.method or '*'} {where}: {len(self._replies)} replies left>"

    @property
    def catch_all(self) -> bool:
        return self.method is None and self.path is None and self.prefix is None

    def reply(self, status: int = 200, *, times: int | None = None, **options: Any) -> Rule:
        """Answer with `make_reply(status, **options)` (`body`, `json`, `headers`, `delay`,
        `drop`) for `times` requests, or from now on; returns the rule, so replies chain:
        `.reply(503, times=1).reply(200)`."""
        return self._add(make_reply(status, **options), times)

    def call(self, responder: Responder, *, times: int | None = None) -> Rule:
        """Answer with what `responder(request)` returns (a Reply, or an awaitable of one)."""
        return self._add(responder, times)

    def _add(self, reply: Reply | Responder, times: int | None) -> Rule:
        if times is not None and times < 1:
            raise ValueError(f"times must be at least 1, not {times}")
        self._replies.append((reply, times))
        return self

    def matches(self, request: ReceivedRequest) -> bool:
        if self.method is not None and request.method != self.method:
            return False
        if self.path is not None and request.path != self.path:
            return False
        if self.prefix is not None and not request.path.startswith(self.prefix):
            return False
        return bool(self._replies)

    def take(self) -> Reply | Responder:
        """The reply for the next request (counting down a `times`)."""
        reply, times = self._replies[0]
        if times is not None:
            if times == 1:
                self._replies.pop(0)
            else:
                self._replies[0] = (reply, times - 1)
        return reply


class ScriptedUpstream:
    """A real HTTP/1.1 or h2c server on 127.0.0.1 (see the module docstring)."""

    def __init__(self, name: str, *, protocol: str = "http1", websocket: bool = False) -> None:
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}, not {protocol!r}")
        if websocket and protocol != "http1":
            raise ValueError("WebSocket upstreams speak HTTP/1.1 (protocol='http1')")
        self.name = name
        self.protocol = protocol
        self.websocket = websocket
        self.host = "127.0.0.1"
        self.port = 0
        self.requests: list[ReceivedRequest] = []
        self.connections = 0  # accepted so far
        self._rules: list[Rule] = []
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._stopping = False

    def __repr__(self) -> str:
        return (
            f"<ScriptedUpstream {self.name!r} {self.protocol} {self.host}:{self.port} "
            f"requests={len(self.requests)}>"
        )

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def last(self) -> ReceivedRequest:
        """The latest request received."""
        if not self.requests:
            raise AssertionError(f"upstream {self.name!r} has received no request")
        return self.requests[-1]

    def on(
        self, method: str | None = None, path: str | None = None, *, prefix: str | None = None
    ) -> Rule:
        """A new rule for requests with this method (any if None) and this exact path or
        path prefix (any if neither); give it replies with `.reply(...)` or `.call(...)`."""
        rule = Rule(method, path, prefix)
        self._rules.append(rule)
        return rule

    def reply(self, status: int = 200, **options: Any) -> Rule:
        """The answer to requests no other rule matches (`on().reply(...)`)."""
        return self.on().reply(status, **options)

    def reset(self) -> None:
        """Forget the requests received and the rules."""
        self.requests.clear()
        self._rules.clear()

    async def start(self) -> ScriptedUpstream:
        """Listen on a free port of 127.0.0.1."""
        serve = self._serve_h2c if self.protocol == "h2c" else self._serve_http1
        self._server = await asyncio.start_server(
            lambda reader, writer: self._accept(serve, reader, writer), self.host, 0
        )
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        """Stop listening, close every connection and wait for their handlers to end."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        self._stopping = True
        for writer in list(self._writers):
            writer.close()
        for task in list(self._tasks):
            task.cancel()  # a handler in a reply's delay would not see the close
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for writer in list(self._writers):
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _accept(
        self,
        serve: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        self.connections += 1
        try:
            await serve(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            # Cancelled by stop(): end as a handler that returned. (asyncio's start_server
            # logs a handler task that ends cancelled as an error.)
            if not self._stopping:
                raise
        finally:
            self._tasks.discard(task)
            self._writers.discard(writer)
            writer.close()

    def _record(
        self, method: str, target: str, headers: CIMultiDict[str], body: bytes, version: str
    ) -> ReceivedRequest:
        exchange = headers.popall(EXCHANGE_HEADER, [""])[-1]
        request = ReceivedRequest(
            method, target, headers, body, version, exchange, time.monotonic()
        )
        self.requests.append(request)
        return request

    async def _answer(self, request: ReceivedRequest) -> Reply:
        for rule in sorted(self._rules, key=lambda rule: rule.catch_all):
            if rule.matches(request):
                reply = rule.take()
                if isinstance(reply, Reply):
                    return reply
                try:
                    answer = reply(request)
                    if inspect.isawaitable(answer):
                        answer = await answer
                except Exception as exc:
                    # A bug in the test's responder: a 500 saying so, and the traceback
                    # in the log pytest shows under the failed test.
                    log.exception("upstream %r: the responder for %s failed", self.name, rule)
                    return make_reply(500, body=f"responder failed: {exc!r}")
                return answer
        return make_reply(json=_echo(request))

    # -- HTTP/1.1 ------------------------------------------------------------------------
    async def _serve_http1(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        conn = h11.Connection(h11.SERVER)
        while True:
            head: h11.Request | None = None
            body = bytearray()
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await reader.read(READ_BYTES))
                elif isinstance(event, h11.Request):
                    head = event
                elif isinstance(event, h11.Data):
                    if len(body) < MAX_RECORDED_BODY:
                        body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    break
                else:  # ConnectionClosed, or PAUSED on a client that pipelines
                    return
            assert head is not None
            headers = CIMultiDict(
                (name.decode("latin-1"), value.decode("latin-1"))
                for name, value in head.headers.raw_items()
            )
            target = head.target.decode("latin-1")
            upgrade = headers.get("upgrade", "").lower() == "websocket"
            request = self._record(head.method.decode(), target, headers, bytes(body), "1.1")
            if upgrade and self.websocket:
                await _websocket_echo(conn, reader, writer, headers)
                return
            reply = await self._answer(request)
            if reply.delay:
                await asyncio.sleep(reply.delay)
            if reply.drop:
                return
            fields = [*reply.headers, ("content-length", str(len(reply.body)))]
            writer.write(conn.send(h11.Response(status_code=reply.status, headers=fields)))
            if reply.body and head.method != b"HEAD":
                writer.write(conn.send(h11.Data(data=reply.body)))
            writer.write(conn.send(h11.EndOfMessage()))
            await writer.drain()
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return
            conn.start_next_cycle()

    # -- h2c (prior knowledge) -----------------------------------------------------------
    async def _serve_h2c(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        config = h2.config.H2Configuration(client_side=False, header_encoding=None)
        conn = h2.connection.H2Connection(config)
        conn.initiate_connection()
        writer.write(conn.data_to_send())
        streams: dict[int, tuple[list[tuple[bytes, bytes]], bytearray]] = {}
        window_opened = asyncio.Event()
        answering: set[asyncio.Task[None]] = set()
        try:
            while data := await reader.read(READ_BYTES):
                for event in conn.receive_data(data):
                    if isinstance(event, h2.events.RequestReceived):
                        streams[event.stream_id] = (list(event.headers or []), bytearray())
                    elif isinstance(event, h2.events.DataReceived):
                        conn.acknowledge_received_data(
                            event.flow_controlled_length or 0, event.stream_id or 0
                        )
                        if event.stream_id in streams:
                            streams[event.stream_id][1].extend(event.data or b"")
                    elif isinstance(event, h2.events.StreamEnded) and event.stream_id in streams:
                        fields, body = streams.pop(event.stream_id)
                        task = asyncio.create_task(
                            self._answer_h2(
                                conn, writer, event.stream_id, fields, bytes(body), window_opened
                            )
                        )
                        answering.add(task)
                        task.add_done_callback(answering.discard)
                    elif isinstance(event, h2.events.StreamReset):
                        streams.pop(event.stream_id or 0, None)
                    elif isinstance(event, h2.events.WindowUpdated):
                        window_opened.set()
                    elif isinstance(event, h2.events.ConnectionTerminated):
                        return
                writer.write(conn.data_to_send())
                await writer.drain()
        finally:
            for task in answering:
                task.cancel()
            await asyncio.gather(*answering, return_exceptions=True)

    async def _answer_h2(
        self,
        conn: h2.connection.H2Connection,
        writer: asyncio.StreamWriter,
        stream_id: int,
        fields: list[tuple[bytes, bytes]],
        body: bytes,
        window_opened: asyncio.Event,
    ) -> None:
        pseudo = {
            name.decode("latin-1"): value.decode("latin-1")
            for name, value in fields
            if name.startswith(b":")
        }
        headers = CIMultiDict(
            (name.decode("latin-1"), value.decode("latin-1"))
            for name, value in fields
            if not name.startswith(b":")
        )
        request = self._record(
            pseudo.get(":method", ""), pseudo.get(":path", ""), headers, body, "2"
        )
        reply = await self._answer(request)
        if reply.delay:
            await asyncio.sleep(reply.delay)
        if reply.drop:
            conn.reset_stream(stream_id, h2.errors.ErrorCodes.INTERNAL_ERROR)
            writer.write(conn.data_to_send())
            return
        head = [(":status", str(reply.status)), *((k.lower(), v) for k, v in reply.headers)]
        head.append(("content-length", str(len(reply.body))))
        data = reply.body if request.method != "HEAD" else b""
        conn.send_headers(stream_id, head, end_stream=not data)
        writer.write(conn.data_to_send())
        while data:
            room = min(conn.local_flow_control_window(stream_id), conn.max_outbound_frame_size)
            if room <= 0:
                window_opened.clear()
                await window_opened.wait()
                continue
            piece, data = data[:room], data[room:]
            conn.send_data(stream_id, piece, end_stream=not data)
            writer.write(conn.data_to_send())
            await writer.drain()


async def start_upstream(
    name: str = "app", *, protocol: str = "http1", websocket: bool = False
) -> ScriptedUpstream:
    """A started ScriptedUpstream; `await upstream.stop()` when done."""
    return await ScriptedUpstream(name, protocol=protocol, websocket=websocket).start()


def _echo(request: ReceivedRequest) -> dict[str, Any]:
    return {
        "method": request.method,
        "path": request.path,
        "query": request.query,
        "headers": [[name, value] for name, value in request.headers.items()],
        "body": request.body.decode("utf-8", "replace"),
    }


async def _websocket_echo(
    conn: h11.Connection,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    headers: CIMultiDict[str],
) -> None:
    """Accept the upgrade (RFC 6455 section 4.2.2), then echo text and binary messages."""
    key = headers.get("sec-websocket-key", "").encode()
    accept = base64.b64encode(hashlib.sha1(key + _WEBSOCKET_GUID).digest()).decode()
    switch = [("upgrade", "websocket"), ("connection", "Upgrade"), ("sec-websocket-accept", accept)]
    writer.write(conn.send(h11.InformationalResponse(status_code=101, headers=switch)))
    trailing, _ = conn.trailing_data
    ws = wsproto.connection.Connection(wsproto.connection.ConnectionType.SERVER)
    if trailing:
        ws.receive_data(trailing)
    while True:
        for event in ws.events():
            if isinstance(event, wsproto.events.TextMessage | wsproto.events.BytesMessage):
                writer.write(ws.send(event))
            elif isinstance(event, wsproto.events.Ping):
                writer.write(ws.send(event.response()))
            elif isinstance(event, wsproto.events.CloseConnection):
                writer.write(ws.send(event.response()))
                await writer.drain()
                return
        await writer.drain()
        data = await reader.read(READ_BYTES)
        if not data:
            return
        ws.receive_data(data)
