"""The end of every chain (proxy/exchange/forward.py): the route's rewrite, the Host the
upstream gets, the keep-alive race, the retry loop, request buffering, the synchronous
fast path and the upstream half of a WebSocket handshake. A real `Forwarder` on a real
`Upstream`, against real upstreams on 127.0.0.1 (tests/support/upstreams)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from proxy.config.model import RewriteConfig
from proxy.config.upstream_model import EndpointConfig, RetryConfig, UpstreamConfig
from proxy.core.body import Body
from proxy.core.errors import BadRequest, ProxyError, UpstreamProtocolError
from proxy.core.exchange import Exchange
from proxy.core.models import RawHeaders, Request, Response
from proxy.exchange.forward import Forwarder, compile_rewrite
from proxy.upstream.balancer import EndpointState, Upstream
from tests.support.gateway import H1UpstreamFactory
from tests.support.helpers import eventually
from tests.support.upstreams import RawUpstream, UpstreamServer, WsUpstream

FAST_RETRIES = RetryConfig(backoff_base=0.001, backoff_max=0.001)
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 section 1.3

ForwarderFactory = Callable[..., Forwarder]


def endpoint(url: str) -> EndpointConfig:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return EndpointConfig(url, "http", host, int(port))


@pytest.fixture
async def forwarder_to() -> AsyncIterator[ForwarderFactory]:
    """`forwarder_to(url, ..., retries=, **Forwarder options)`: a Forwarder on an upstream
    `app` over those endpoints; the upstreams' connections are closed at teardown."""
    upstreams: list[Upstream] = []

    def make(
        *urls: str,
        retries: RetryConfig = FAST_RETRIES,
        rewrite: RewriteConfig | None = None,
        **options: Any,
    ) -> Forwarder:
        config = UpstreamConfig("app", tuple(endpoint(url) for url in urls), retries=retries)
        upstream = Upstream(config, "httptools", 64 * 1024)
        upstreams.append(upstream)
        return Forwarder(upstream, rewrite or RewriteConfig(), **options)

    yield make
    for upstream in upstreams:
        upstream.close()
    await asyncio.sleep(0.01)  # the closed transports' connection_lost


def request(
    method: str = "GET",
    target: bytes = b"/echo/x",
    *,
    body: bytes | Body = b"",
    headers: RawHeaders | None = None,
    **options: Any,
) -> Request:
    """A request as the dispatcher hands it on: with its `Exchange` context."""
    raw = headers if headers is not None else [(b"host", b"app.example")]
    data = body if isinstance(body, Body) else Body.from_bytes(body)
    return Request(method, target, raw, data, **options)


def exchange_of(request: Request) -> Exchange:
    return request.exchange


async def read_all(response: Response) -> bytes:
    data = bytearray()
    while chunk := await response.body.read():
        data += chunk
    return bytes(data)


async def echoed(response: Response) -> dict[str, Any]:
    """What UpstreamServer's /echo saw, with its headers as a lower-cased dict."""
    seen: dict[str, Any] = json.loads(await read_all(response))
    seen["headers"] = {name.lower(): value for name, value in seen["headers"]}
    return seen


def closed_port() -> int:
    """A port nothing listens on (connecting is refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


# -- the route's rewrite --------------------------------------------------------------


def test_a_route_without_a_rewrite_compiles_to_nothing() -> None:
    assert compile_rewrite(RewriteConfig()) is None
    assert compile_rewrite(RewriteConfig(host="other.example")) is None  # not a path step


def test_strip_prefix_strips_whole_segments_only() -> None:
    strip = compile_rewrite(RewriteConfig(strip_prefix="/api/"))
    assert strip is not None
    assert [strip(path) for path in ("/api/users", "/api", "/apis", "/v1/api/x")] == [
        "/users",
        "/",
        "/apis",
        "/v1/api/x",
    ]


def test_regex_replaces_the_first_match_then_prefixes_are_applied_in_order() -> None:
    rewrite = compile_rewrite(
        RewriteConfig(
            regex="/v[0-9]+/", replacement="/", strip_prefix="/public", add_prefix="/svc/"
        )
    )
    assert rewrite is not None
    assert rewrite("/public/v2/items/v3/x") == "/svc/items/v3/x"
    assert rewrite("/other") == "/svc/other"


async def test_the_target_keeps_its_query_through_the_rewrite(
    forwarder_to: ForwarderFactory,
) -> None:
    forwarder = forwarder_to("http://127.0.0.1:9", rewrite=RewriteConfig(strip_prefix="/api"))
    assert forwarder.target_of(request(target=b"/api/items?page=2")) == b"/items?page=2"


async def test_forward_raw_path_sends_the_clients_spelling_through_the_rewrite(
    forwarder_to: ForwarderFactory,
) -> None:
    raw = request(target=b"/api/a/b?q=1", raw_target=b"/api/a%2Fb?q=1")
    plain = forwarder_to("http://127.0.0.1:9")
    assert plain.target_of(raw) == b"/api/a/b?q=1"
    spelt = forwarder_to("http://127.0.0.1:9", forward_raw_path=True)
    assert spelt.target_of(raw) == b"/api/a%2Fb?q=1"
    stripped = forwarder_to(
        "http://127.0.0.1:9", forward_raw_path=True, rewrite=RewriteConfig(strip_prefix="/api")
    )
    assert stripped.target_of(raw) == b"/a%2Fb?q=1"


# -- the general path -----------------------------------------------------------------


@pytest.mark.socket
async def test_the_host_is_the_clients_or_the_rewrites_or_the_endpoints(
    forwarder_to: ForwarderFactory, h1_upstream: UpstreamServer
) -> None:
    kept = await echoed(await forwarder_to(h1_upstream.url)(request()))
    assert kept["headers"]["host"] == "app.example"
    rewritten = forwarder_to(h1_upstream.url, rewrite=RewriteConfig(host="inside.example"))
    assert (await echoed(await rewritten(request())))["headers"]["host"] == "inside.example"
    without = request(headers=[], http_version="1.0")
    answer = await echoed(await forwarder_to(h1_upstream.url)(without))
    assert answer["headers"]["host"] == f"127.0.0.1:{h1_upstream.port}"


@pytest.mark.socket
async def test_a_request_target_that_would_split_the_head_is_a_400(
    forwarder_to: ForwarderFactory, h1_upstream: UpstreamServer
) -> None:
    forwarder = forwarder_to(h1_upstream.url)
    with pytest.raises(BadRequest, match="unsafe request target"):
        await forwarder(request(target=b"/a b"))
    assert h1_upstream.requests == []


@pytest.mark.socket
async def test_the_keep_alive_race_is_retried_at_once_on_a_fresh_connection(
    forwarder_to: ForwarderFactory,
) -> None:
    server = await UpstreamServer(drop_reused=True).start()
    try:
        forwarder = forwarder_to(server.url)
        first = await forwarder(request("POST", body=b"one"))
        assert (await echoed(first))["body"] == "one"
        # The pooled connection is reused and the upstream closes it: a fresh one.
        again = request("POST", body=b"two")
        answer = await echoed(await forwarder(again))
        assert answer["body"] == "two"
        assert (server.dropped, server.connections) == (1, 2)
        assert again.exchange.retries == 0  # not a try of the retry policy
    finally:
        await server.stop()


@pytest.mark.socket
async def test_the_keep_alive_race_replays_a_small_streamed_body_framed_by_its_length(
    forwarder_to: ForwarderFactory,
) -> None:
    server = await UpstreamServer(drop_reused=True).start()
    try:
        forwarder = forwarder_to(server.url)
        await read_all(await forwarder(request()))
        body = Body(None)  # chunked, as the client sent it
        streaming = asyncio.create_task(forwarder(request("PUT", body=body)))
        pool = forwarder.upstream.pools[0]
        await eventually(lambda: pool.occupancy().idle == 0, "the pooled connection taken")
        body.feed(b"stream")
        body.feed_eof()
        async with asyncio.timeout(10):  # bounds a hang
            answer = await echoed(await streaming)
        assert answer["body"] == "stream"
        assert answer["headers"]["content-length"] == "6"  # the replay knows its length
        assert "transfer-encoding" not in answer["headers"]
        assert server.dropped == 1
    finally:
        await server.stop()


@pytest.mark.socket
async def test_a_connect_failure_is_retried_on_the_other_endpoint(
    forwarder_to: ForwarderFactory, h1_upstream: UpstreamServer
) -> None:
    dead = f"http://127.0.0.1:{closed_port()}"
    forwarder = forwarder_to(dead, h1_upstream.url)
    tried = request("POST", body=b"x")
    response = await forwarder(tried)
    assert response.status == 200
    await read_all(response)
    assert tried.exchange.retries == 1
    assert tried.exchange.endpoint == f"127.0.0.1:{h1_upstream.port}"


@pytest.mark.socket
async def test_a_status_the_policy_retries_goes_to_another_endpoint_for_idempotent_methods(
    forwarder_to: ForwarderFactory, h1_upstream_factory: H1UpstreamFactory
) -> None:
    first, second = await h1_upstream_factory(), await h1_upstream_factory()
    retries = RetryConfig(on=frozenset({"503"}), backoff_base=0.001, backoff_max=0.001)
    forwarder = forwarder_to(first.url, second.url, retries=retries)
    got = await forwarder(request(target=b"/status/503"))
    await read_all(got)
    assert got.status == 503  # every try answered 503: the last answer is the client's
    assert [len(first.requests), len(second.requests)] == [1, 1]
    posted = await forwarder(request("POST", target=b"/status/503", body=b"x"))
    await read_all(posted)
    assert len(first.requests) + len(second.requests) == 3  # POST: tried once


@pytest.mark.socket
async def test_request_buffering_reads_the_body_before_taking_a_connection(
    forwarder_to: ForwarderFactory, h1_upstream: UpstreamServer
) -> None:
    forwarder = forwarder_to(h1_upstream.url, request_buffering=1024)
    body = Body(None)
    forwarding = asyncio.create_task(forwarder(request("POST", body=body)))
    body.feed(b"slow ")
    for _ in range(5):
        await asyncio.sleep(0.01)
    assert h1_upstream.connections == 0  # the slow client holds only its own socket
    body.feed(b"client")
    body.feed_eof()
    answer = await echoed(await forwarding)
    assert answer["body"] == "slow client"
    assert answer["headers"]["content-length"] == "11"  # sent whole, not chunked


@pytest.mark.socket
async def test_a_grpc_body_is_streamed_never_buffered(
    forwarder_to: ForwarderFactory, h1_upstream: UpstreamServer
) -> None:
    forwarder = forwarder_to(h1_upstream.url, request_buffering=1024)
    body = Body(None)
    grpc = request(
        "POST", body=body, headers=[(b"host", b"a"), (b"content-type", b"application/grpc")]
    )
    forwarding = asyncio.create_task(forwarder(grpc))
    body.feed(b"mess")
    # Sent on while the body is open (a buffered one would wait here for the rest).
    await eventually(lambda: h1_upstream.connections == 1, "the upstream connection")
    body.feed(b"age")
    body.feed_eof()
    answer = await echoed(await forwarding)
    assert answer["body"] == "message"
    assert answer["headers"]["transfer-encoding"] == "chunked"


# -- the synchronous fast path --------------------------------------------------------


def on_answer() -> tuple[
    asyncio.Future[Response], Callable[[Response | None, ProxyError | None], None]
]:
    answered: asyncio.Future[Response] = asyncio.get_running_loop().create_future()

    def callback(response: Response | None, error: ProxyError | None) -> None:
        if response is not None:
            answered.set_result(response)
        else:
            answered.set_exception(error or AssertionError("neither response nor error"))

    return answered, callback


@pytest.mark.socket
async def test_the_fast_path_sends_on_an_idle_connection_and_answers_by_callback(
    forwarder_to: ForwarderFactory, h1_upstream: UpstreamServer
) -> None:
    forwarder = forwarder_to(h1_upstream.url, rewrite=RewriteConfig(host="inside.example"))
    await read_all(await forwarder(request()))  # leaves an idle connection
    answered, callback = on_answer()
    fast = request(target=b"/echo/fast")
    assert forwarder.try_start(fast, exchange_of(fast), callback)
    assert fast.exchange.endpoint == f"127.0.0.1:{h1_upstream.port}"
    answer = await echoed(await answered)
    assert (answer["target"], answer["headers"]["host"]) == ("/echo/fast", "inside.example")
    assert forwarder.upstream.endpoints[0].in_flight == 0
    assert h1_upstream.connections == 1


@pytest.mark.socket
async def test_the_keep_alive_race_on_the_fast_path_is_retried_by_the_forwarder_in_a_task(
    forwarder_to: ForwarderFactory,
) -> None:
    server = await UpstreamServer(drop_reused=True).start()
    try:
        forwarder = forwarder_to(server.url)
        await read_all(await forwarder(request()))
        answered, callback = on_answer()
        raced = request(target=b"/echo/raced")
        exchange = exchange_of(raced)
        assert forwarder.try_start(raced, exchange, callback)
        assert (await echoed(await answered))["target"] == "/echo/raced"
        assert exchange.retry is None  # its task is done
        assert (server.dropped, server.connections) == (1, 2)  # the same endpoint, afresh
    finally:
        await server.stop()


@pytest.mark.socket
async def test_without_an_idle_connection_the_fast_path_declines_and_keeps_its_choice(
    forwarder_to: ForwarderFactory, h1_upstream_factory: H1UpstreamFactory
) -> None:
    first, second = await h1_upstream_factory(), await h1_upstream_factory()
    forwarder = forwarder_to(first.url, second.url)
    declined = request()
    _, callback = on_answer()
    assert not forwarder.try_start(declined, exchange_of(declined), callback)
    balanced = exchange_of(declined).balanced
    assert isinstance(balanced, EndpointState)
    chosen = balanced.index
    # The general path sends it where the fast path chose, not to the next endpoint.
    await read_all(await forwarder(declined))
    assert [len(first.requests), len(second.requests)] == [int(chosen == 0), int(chosen == 1)]


@pytest.mark.socket
async def test_the_fast_path_declines_what_it_cannot_finish_alone(
    forwarder_to: ForwarderFactory, h1_upstream: UpstreamServer
) -> None:
    per_try = RetryConfig(per_try_timeout=5.0)
    forwarder = forwarder_to(h1_upstream.url, retries=per_try)
    await read_all(await forwarder(request()))
    _, callback = on_answer()
    timed = request()
    assert not forwarder.try_start(timed, exchange_of(timed), callback)  # a per-try timeout
    plain = forwarder_to(h1_upstream.url)
    await read_all(await plain(request()))
    pool = plain.upstream.pools[0]
    unsafe = request(target=b"/a b")
    assert not plain.try_start(unsafe, exchange_of(unsafe), callback)
    assert pool.occupancy().idle == 1  # the idle connection it took went back


# -- the upstream half of a WebSocket handshake ---------------------------------------


def websocket_request(target: bytes, *, http2: bool = False) -> Request:
    headers = [(b"host", b"chat.example"), (b"sec-websocket-version", b"13")]
    if not http2:
        headers += [
            (b"connection", b"Upgrade"),
            (b"upgrade", b"websocket"),
            (b"sec-websocket-key", base64.b64encode(b"sixteen byte key")),
        ]
    return request(
        target=target, headers=headers, upgrade="websocket", http_version="2" if http2 else "1.1"
    )


@pytest.fixture
async def ws_upstream() -> AsyncIterator[WsUpstream]:
    server = await WsUpstream().start()
    yield server
    await server.stop()


@pytest.mark.socket
@pytest.mark.parametrize("http2", [False, True])
async def test_a_websocket_handshake_comes_back_as_a_101_holding_its_connection(
    forwarder_to: ForwarderFactory, ws_upstream: WsUpstream, http2: bool
) -> None:
    response = await forwarder_to(ws_upstream.url)(websocket_request(b"/chat", http2=http2))
    try:
        assert response.status == 101
        assert response.upgrade is not None
        key = ws_upstream.handshakes[0]["Sec-WebSocket-Key"]
        if not http2:  # the client's own key, which the client checks the answer against
            assert key == base64.b64encode(b"sixteen byte key").decode()
        accept = base64.b64encode(hashlib.sha1(key.encode() + WS_GUID).digest()).decode()
        assert response.header("sec-websocket-accept") == accept
    finally:
        if response.upgrade is not None:
            response.upgrade.close()


@pytest.mark.socket
async def test_a_refused_websocket_handshake_is_an_ordinary_response(
    forwarder_to: ForwarderFactory, ws_upstream: WsUpstream
) -> None:
    response = await forwarder_to(ws_upstream.url)(websocket_request(b"/refuse"))
    assert response.status == 403
    assert response.upgrade is None
    assert await read_all(response) == b"no websockets for you\n"


@pytest.mark.socket
async def test_a_wrong_accept_for_an_http2_clients_key_is_a_502(
    forwarder_to: ForwarderFactory,
) -> None:
    liar = await RawUpstream(
        {},
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: bm90IHRoZSByaWdodCBvbmU=\r\n\r\n",
    ).start()
    try:
        with pytest.raises(UpstreamProtocolError, match="Sec-WebSocket-Accept is wrong"):
            await forwarder_to(liar.url)(websocket_request(b"/chat", http2=True))
    finally:
        await liar.stop()
