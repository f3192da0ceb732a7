"""WebSocket over HTTP/2 (RFC 8441) end to end: extended CONNECT streams from an h2 +
wsproto client (tests/support/ws_h2_client.py) through an in-process gateway, to a real
`websockets` upstream (tests/support/upstreams/websocket.py) reached by an HTTP/1.1 Upgrade."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable

import h2.errors
import pytest
from websockets.asyncio.server import ServerConnection, serve
from websockets.typing import Subprotocol

from metrics.definitions import REGISTRY
from proxy.process.server import Server
from tests.support.gateway import GatewayFactory, simple_config
from tests.support.tls import TlsFiles
from tests.support.upstreams import REFUSAL_BODY, WsUpstream
from tests.support.ws_h2_client import ENABLE_CONNECT_PROTOCOL, WsH2Client, WsStream

pytestmark = pytest.mark.socket

BIG_BYTES = 16 * 1024 * 1024
BIG_TIMEOUT_S = 20.0

WsGateway = Callable[..., Awaitable[Server]]


@pytest.fixture
async def ws_upstream() -> AsyncIterator[WsUpstream]:
    """A `websockets` upstream whose behaviour the path picks (echo, /refuse, /close/N,
    /flood, /die)."""
    upstream = await WsUpstream().start()
    yield upstream
    await upstream.stop()


@pytest.fixture
def ws_gateway(gateway_factory: GatewayFactory, ws_upstream: WsUpstream) -> WsGateway:
    """Start a plaintext gateway (h2c on its port) with one catch-all route to
    `ws_upstream`; `route` adds keys to the route, `extra` top-level sections."""

    async def start(route: str = "", extra: str = "") -> Server:
        config = simple_config(ws_upstream.url, "httptools", route=route, extra=extra)
        return await gateway_factory(config)

    return start


async def h2c(server: Server) -> WsH2Client:
    """An h2c (prior knowledge) connection to the gateway's first listener."""
    host, port = server.addresses[0]
    return await WsH2Client.connect(host, port)


async def until(what: str, predicate: Callable[[], bool], timeout_s: float = 10.0) -> None:
    """Poll `predicate` (state held by the gateway or the upstream, which signal no
    event) until it is true. `timeout_s` bounds a hang (with no idle timeout set, a tunnel
    left open would stay for ever), not how fast a busy machine gets there."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not predicate():
        if loop.time() >= deadline:
            raise AssertionError(f"not within {timeout_s}s: {what}")
        await asyncio.sleep(0.01)


def metric(name: str, **labels: str) -> float:
    """A sample of the process-wide registry (0 before its first use)."""
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def echo_round_trip(ws: WsStream, message: str | bytes) -> None:
    """Send `message` to the echo upstream and check it comes back unchanged."""
    await ws.send(message)
    assert await ws.receive() == message


# --- the handshake --------------------------------------------------------------------


async def test_gateway_advertises_extended_connect(ws_gateway: WsGateway) -> None:
    server = await ws_gateway()

    async with await h2c(server) as client:
        settings = await client.wait_settings()

    assert settings[ENABLE_CONNECT_PROTOCOL] == 1  # RFC 8441 section 3


async def test_extended_connect_becomes_an_upgrade_with_a_fresh_key(
    ws_gateway: WsGateway, ws_upstream: WsUpstream
) -> None:
    server = await ws_gateway()

    async with await h2c(server) as client:
        ws = await client.open_websocket("/chat?room=1", headers=[("x-trace", "t-1")])
        await echo_round_trip(ws, "hi")
        await ws.close_websocket(1000)

    assert ws.status == 200  # RFC 8441 section 5: 200 stands for 101
    assert ws.header(b"sec-websocket-accept") is None  # the gateway's own key's answer
    assert ws_upstream.paths == ["/chat?room=1"]
    seen = ws_upstream.handshakes[0]
    assert seen["Upgrade"].lower() == "websocket"
    assert "upgrade" in seen["Connection"].lower()
    assert seen["Sec-WebSocket-Version"] == "13"
    assert len(seen["Sec-WebSocket-Key"]) == 24  # 16 random bytes, base64
    assert seen["X-Trace"] == "t-1"


async def test_subprotocol_is_negotiated_through_the_tunnel(
    gateway_factory: GatewayFactory,
) -> None:
    async def echo(connection: ServerConnection) -> None:
        async for message in connection:
            await connection.send(message)

    async with serve(echo, "127.0.0.1", 0, subprotocols=[Subprotocol("chat")]) as upstream:
        port = upstream.sockets[0].getsockname()[1]
        server = await gateway_factory(simple_config(f"http://127.0.0.1:{port}", "httptools"))
        async with await h2c(server) as client:
            ws = await client.open_websocket("/", subprotocols=["superchat", "chat"])
            await echo_round_trip(ws, "in chat")
            await ws.close_websocket(1000)

    assert ws.status == 200
    assert ws.header(b"sec-websocket-protocol") == b"chat"


async def test_echo_over_tls_with_alpn_h2(
    gateway_factory: GatewayFactory, ws_upstream: WsUpstream, tls_files: TlsFiles
) -> None:
    server = await gateway_factory(
        f"""
listeners:
  - bind: 127.0.0.1:0
    tls: {{cert: {tls_files.cert}, key: {tls_files.key}}}
upstreams:
  app:
    endpoints: [{ws_upstream.url}]
routes:
  - name: all
    match: {{path_prefix: /}}
    upstream: app
"""
    )
    host, port = server.addresses[0]
    context = tls_files.client_context(["h2"])

    async with await WsH2Client.connect(host, port, ssl_context=context) as client:
        ws = await client.open_websocket("/secure")
        await echo_round_trip(ws, "over tls")
        await echo_round_trip(ws, b"\x00\xff" * 1000)
        close = await ws.close_websocket(1000, "done")
        await ws.wait_gone()

    assert close.code == 1000
    assert ws_upstream.handshakes[0]["X-Forwarded-Proto"] == "https"


# --- messages -------------------------------------------------------------------------


async def test_text_and_binary_messages_are_echoed(ws_gateway: WsGateway) -> None:
    server = await ws_gateway()

    async with await h2c(server) as client:
        ws = await client.open_websocket("/echo")
        await echo_round_trip(ws, "héllo wörld")
        await echo_round_trip(ws, b"\x00\x01\xfe\xff")
        await echo_round_trip(ws, "")
        await echo_round_trip(ws, b"x" * 70_000)  # a 64-bit length header
        await ws.close_websocket(1000)


async def test_fragmented_message_arrives_whole_with_a_ping_between_fragments(
    ws_gateway: WsGateway,
) -> None:
    server = await ws_gateway()

    async with await h2c(server) as client:
        ws = await client.open_websocket("/echo")
        await ws.send("frag", fin=False)  # TEXT without FIN
        await ws.ping(b"mid-message")  # control frames may interleave (RFC 6455 5.4)
        await ws.send("men", fin=False)  # continuation frames
        await ws.send("ted")
        await ws.send(b"\x01", fin=False)
        await ws.send(b"\x02")

        assert await ws.receive() == "fragmented"
        assert await ws.receive() == b"\x01\x02"
        await ws.close_websocket(1000)


async def test_16_mib_message_both_ways_within_the_windows(ws_gateway: WsGateway) -> None:
    server = await ws_gateway()
    payload = os.urandom(BIG_BYTES)

    async with await h2c(server) as client:
        ws = await client.open_websocket("/echo")
        sending = asyncio.create_task(ws.send(payload, timeout_s=BIG_TIMEOUT_S))
        echoed = await ws.receive(timeout_s=BIG_TIMEOUT_S)
        await sending
        await ws.close_websocket(1000)

    assert echoed == payload
    # Far more than any window: the gateway and the client kept reopening them.
    assert ws.received_bytes > BIG_BYTES


async def test_ping_is_answered_by_the_upstream_through_the_tunnel(
    ws_gateway: WsGateway,
) -> None:
    server = await ws_gateway()

    async with await h2c(server) as client:
        ws = await client.open_websocket("/echo")
        await ws.ping(b"are you there")
        await ws.ping(b"")
        await ws.close_websocket(1000)

    assert ws.pongs == [b"are you there", b""]


async def test_upstream_initiated_messages_reach_the_client(
    ws_gateway: WsGateway, ws_upstream: WsUpstream
) -> None:
    server = await ws_gateway()

    async with await h2c(server) as client:
        ws = await client.open_websocket("/flood")
        messages = [await ws.receive() for _ in range(40)]  # 2.5 MiB, unasked
        await ws.reset()
        await ws_upstream.wait_ended(1)

    assert all(message == b"\xab" * 65536 for message in messages)


# --- closing ----------------------------------------------------------------------------


async def test_client_close_code_reaches_the_upstream_and_the_stream_ends(
    ws_gateway: WsGateway, ws_upstream: WsUpstream
) -> None:
    server = await ws_gateway()

    async with await h2c(server) as client:
        ws = await client.open_websocket("/echo")
        await echo_round_trip(ws, "before")
        answer = await ws.close_websocket(4001, "bye")
        await ws.wait_gone()
        await ws_upstream.wait_ended(1)
        await until("the tunnel is gone", lambda: not server.tunnels)

    assert (answer.code, answer.reason) == (4001, "bye")
    assert ws_upstream.close_codes == [4001]
    assert ws.ended
    assert ws.reset_code is None


async def test_upstream_close_code_reaches_the_client_and_the_stream_ends(
    ws_gateway: WsGateway, ws_upstream: WsUpstream
) -> None:
    server = await ws_gateway()

    async with await h2c(server) as client:
        ws = await client.open_websocket("/close/4002")
        close = await ws.wait_close()  # answered with 4002 and END_STREAM by the client
        await ws.wait_gone()
        await ws_upstream.wait_ended(1)
        await until("the tunnel is gone", lambda: not server.tunnels)

    assert (close.code, close.reason) == (4002, "upstream says bye")
    assert ws_upstream.close_codes == [4002]  # our answer got there
    assert ws.ended
    assert ws.reset_code is None


async def test_client_ending_its_side_first_still_gets_the_close_answer(
    ws_gateway: WsGateway, ws_upstream: WsUpstream
) -> None:
    # RFC 8441 section 5: END_STREAM is a half-close; the upstream sees a FIN after our
    # close frame, and what it sends back still reaches the client.
    server = await ws_gateway()

    async with await h2c(server) as client:
        ws = await client.open_websocket("/echo")
        answer = await ws.close_websocket(4003, "half", end_first=True)
        await ws.wait_gone()
        await ws_upstream.wait_ended(1)
        await until("the tunnel is gone", lambda: not server.tunnels)

    assert (answer.code, answer.reason) == (4003, "half")
    assert ws_upstream.close_codes == [4003]
    assert ws.reset_code is None


async def test_shutdown_sends_going_away_to_both_sides(
    ws_gateway: WsGateway, ws_upstream: WsUpstream
) -> None:
    server = await ws_gateway()

    async with await h2c(server) as client:
        ws = await client.open_websocket("/echo")
        await echo_round_trip(ws, "before shutdown")
        await server.shutdown(grace_period=0.1)
        close = await ws.wait_close()
        await ws.wait_gone()

    assert (close.code, close.reason) == (1001, "going away")
    assert client.goaway is not None
    await ws_upstream.wait_ended(1)
    assert ws_upstream.close_codes == [1001]
    assert not server.tunnels


# --- refusals ---------------------------------------------------------------------------


async def test_upstream_refusal_is_relayed_with_its_body(
    ws_gateway: WsGateway, ws_upstream: WsUpstream
) -> None:
    server = await ws_gateway()

    async with await h2c(server) as client:
        ws = await client.open_websocket("/refuse")
        await ws.wait_gone()
        await echo_round_trip(await client.open_websocket("/after"), "still tunnels")

    assert ws.status == 403
    assert bytes(ws.body) == REFUSAL_BODY
    assert ws.header(b"content-type") == b"text/plain"
    assert ws.ended
    assert ws_upstream.paths == ["/refuse", "/after"]


async def test_route_with_websocket_off_answers_403(
    ws_gateway: WsGateway, ws_upstream: WsUpstream
) -> None:
    server = await ws_gateway(route="    websocket: false")

    async with await h2c(server) as client:
        ws = await client.open_websocket("/echo")
        await ws.wait_gone()

    assert ws.status == 403
    assert ws_upstream.handshakes == []
    assert not server.tunnels


@pytest.mark.parametrize(
    "fields",
    [
        pytest.param([(":method", "CONNECT"), (":authority", "127.0.0.1:9")], id="plain-connect"),
        pytest.param(
            [
                (":method", "CONNECT"),
                (":protocol", "connect-udp"),
                (":scheme", "http"),
                (":path", "/.well-known/masque/udp/127.0.0.1/53/"),
                (":authority", "gateway.test"),
            ],
            id="other-protocol",
        ),
    ],
)
async def test_connect_that_is_not_websocket_answers_400(
    ws_gateway: WsGateway, ws_upstream: WsUpstream, fields: list[tuple[str, str]]
) -> None:
    server = await ws_gateway()

    async with await h2c(server) as client:
        await client.wait_settings()
        stream = await client.open_stream(fields)
        await stream.wait_gone()
        await echo_round_trip(await client.open_websocket("/after"), "the connection lives")

    assert stream.status == 400
    assert ws_upstream.paths == ["/after"]


# --- failures -------------------------------------------------------------------------


async def test_upstream_dying_mid_stream_ends_the_client_stream_promptly(
    ws_gateway: WsGateway, ws_upstream: WsUpstream
) -> None:
    server = await ws_gateway()

    async with await h2c(server) as client:
        ws = await client.open_websocket("/die")
        await echo_round_trip(ws, "last words")  # then the upstream drops its socket
        await ws.wait_gone()  # (left open, it would stay: no idle timeout here)
        await ws.end()  # a client ends its side too (an abnormal closure, 1006)
        await until("the tunnel is gone", lambda: not server.tunnels)

        after = await client.open_websocket("/echo")  # same connection
        await echo_round_trip(after, "still here")
        await after.close_websocket(1000)
    async with await h2c(server) as fresh:  # and a new one
        await echo_round_trip(await fresh.open_websocket("/echo"), "fresh")

    assert ws.close is None  # no close frame came: the stream's end says it all


async def test_client_reset_closes_the_upstream_connection_promptly(
    ws_gateway: WsGateway, ws_upstream: WsUpstream
) -> None:
    server = await ws_gateway()

    async with await h2c(server) as client:
        ws = await client.open_websocket("/echo")
        await echo_round_trip(ws, "about to vanish")
        assert len(server.tunnels) == 1

        await ws.reset(h2.errors.ErrorCodes.CANCEL)
        await ws_upstream.wait_ended(1)
        await until("the tunnel is gone", lambda: not server.tunnels)

        after = await client.open_websocket("/echo")
        await echo_round_trip(after, "the connection lives")
        await after.close_websocket(1000)

    assert ws_upstream.close_codes[0] is None  # the socket closed, no close frame
    assert ws.reset_code is None  # nothing came back on the cancelled stream


async def test_closing_the_http2_connection_closes_every_upstream(
    ws_gateway: WsGateway, ws_upstream: WsUpstream
) -> None:
    # Regression: the tunnels ended but the streams' senders waited for ever on the
    # responses the tunnels fed, so the closed client's connection was never let go.
    server = await ws_gateway()

    async with await h2c(server) as client:
        for path in ("/a", "/b", "/c"):
            await echo_round_trip(await client.open_websocket(path), path)
        assert len(server.tunnels) == 3

    await ws_upstream.wait_ended(3)
    await until("the tunnels are gone", lambda: not server.tunnels)
    await until("the client's connection is gone", lambda: not server.connections)
    assert ws_upstream.close_codes == [None] * 3


# --- many tunnels -----------------------------------------------------------------------


async def test_fifty_concurrent_tunnels_on_one_connection(
    ws_gateway: WsGateway, ws_upstream: WsUpstream
) -> None:
    server = await ws_gateway()

    async def converse(client: WsH2Client, index: int) -> WsStream:
        ws = await client.open_websocket(f"/echo/{index}")
        for round_ in range(3):
            await echo_round_trip(ws, f"tunnel {index} round {round_}")
        await echo_round_trip(ws, os.urandom(100_000))
        return ws

    async with await h2c(server) as client:
        streams = await asyncio.gather(*(converse(client, index) for index in range(50)))
        assert len(server.tunnels) == 50
        assert ws_upstream.open_connections == 50
        closes = await asyncio.gather(
            *(ws.close_websocket(4000 + i) for i, ws in enumerate(streams))
        )
        await ws_upstream.wait_ended(50)

    assert [close.code for close in closes] == [4000 + i for i in range(50)]
    assert sorted(code or 0 for code in ws_upstream.close_codes) == [4000 + i for i in range(50)]
    await until("the tunnels are gone", lambda: not server.tunnels)


async def test_tunnels_on_several_connections(
    ws_gateway: WsGateway, ws_upstream: WsUpstream
) -> None:
    server = await ws_gateway()
    clients = [await h2c(server) for _ in range(5)]
    try:
        streams = [
            await client.open_websocket(f"/c{c}/s{s}")
            for c, client in enumerate(clients)
            for s in range(4)
        ]
        await asyncio.gather(*(echo_round_trip(ws, repr(ws)) for ws in streams))
        assert len(server.tunnels) == 20
        await asyncio.gather(*(ws.close_websocket(1000) for ws in streams))
        await asyncio.gather(*(ws.wait_gone() for ws in streams))
    finally:
        for client in clients:
            await client.close()

    await ws_upstream.wait_ended(20)
    assert ws_upstream.close_codes == [1000] * 20


# --- limits and metrics ---------------------------------------------------------------


async def test_idle_tunnel_outlives_the_body_timeout(ws_gateway: WsGateway) -> None:
    # The stream's DATA is a tunnel, not a request body: limits.body_timeout (408 and a
    # reset for a slow upload) must not end a quiet WebSocket.
    server = await ws_gateway(extra="limits: {body_timeout: 1s}")

    async with await h2c(server) as client:
        ws = await client.open_websocket("/echo")
        await echo_round_trip(ws, "before the pause")
        await asyncio.sleep(2.5)  # the real timer is what is tested

        assert not ws.gone
        await echo_round_trip(ws, "after the pause")
        await ws.close_websocket(1000)

    assert client.goaway is None


async def test_metrics_count_the_tunnel_its_bytes_and_its_end(
    ws_gateway: WsGateway, ws_upstream: WsUpstream
) -> None:
    server = await ws_gateway()
    open_before = metric("gatehouse_websocket_tunnels_open")
    resets_before = metric("gatehouse_websocket_closes_total", reason="client_reset")
    closes_before = sum(
        metric("gatehouse_websocket_closes_total", reason=reason)
        for reason in ("client_closed", "upstream_closed", "client_reset", "upstream_reset")
    )
    up_before = metric("gatehouse_websocket_bytes_total", direction="upstream")
    down_before = metric("gatehouse_websocket_bytes_total", direction="downstream")

    async with await h2c(server) as client:
        ws = await client.open_websocket("/echo")
        assert metric("gatehouse_websocket_tunnels_open") == open_before + 1
        await echo_round_trip(ws, b"m" * 1000)
        await ws.reset()
        await until("the tunnel is gone", lambda: not server.tunnels)

    closes_after = sum(
        metric("gatehouse_websocket_closes_total", reason=reason)
        for reason in ("client_closed", "upstream_closed", "client_reset", "upstream_reset")
    )
    assert metric("gatehouse_websocket_tunnels_open") == open_before
    assert metric("gatehouse_websocket_closes_total", reason="client_reset") == resets_before + 1
    assert closes_after == closes_before + 1
    # 1000 bytes of payload: a 2-byte header, a 16-bit length, and a mask key (upstream).
    assert metric("gatehouse_websocket_bytes_total", direction="upstream") == up_before + 1008
    assert metric("gatehouse_websocket_bytes_total", direction="downstream") == down_before + 1004
