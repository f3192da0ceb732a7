"""HTTP/2 limits end to end (issue #3): window overflows, wrong prefaces, idle
connections, graceful shutdown, a stalled request body and streams beyond
max_concurrent_streams, each against an in-process gateway over a real socket; the
attacks proper are in test_http2_attacks.py. As there, every test checks the gateway
stays healthy and says in its docstring which defence it proves.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools

import httpx
import pytest
from h2.errors import ErrorCodes
from hyperframe.frame import (
    WindowUpdateFrame,
)

from tests.support.gateway import GatewayFactory
from tests.support.h2_client import H2Client, RawH2Client
from tests.support.helpers import eventually
from tests.support.http2_attack_helpers import (
    MAX_WINDOW,
    TEST_TIMEOUT_S,
    address,
    assert_healthy,
    innocent_connection,
    limit_hits,
    start_gateway,
    upstream_saw,
)
from tests.support.tls import TlsFiles
from tests.support.upstreams import UpstreamServer

pytestmark = pytest.mark.socket


# --- 5. WINDOW_UPDATE overflow ----------------------------------------------------------------


async def test_stream_window_update_overflow_resets_only_that_stream(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer
) -> None:
    """Defence: RFC 9113 section 6.9.1 (h2's window guard, surfaced as a stream reset):
    a WINDOW_UPDATE that takes a stream's send window past 2^31-1 resets that stream with
    FLOW_CONTROL_ERROR; the connection and its other streams carry on."""
    async with asyncio.timeout(TEST_TIMEOUT_S):
        server = await start_gateway(gateway_factory, h1_upstream)
        async with await RawH2Client.connect(*address(server)) as attacker:
            await attacker.send_frames(
                attacker.headers_frame(1, "/slow/1000"),
                WindowUpdateFrame(1, window_increment=MAX_WINDOW),
                attacker.headers_frame(3, "/echo/next"),
            )
            await attacker.wait_for("the reset of stream 1", lambda: 1 in attacker.resets)
            await attacker.wait_for("stream 3's answer", lambda: 3 in attacker.ended)

        assert attacker.resets[1] == ErrorCodes.FLOW_CONTROL_ERROR
        assert attacker.status(3) == 200
        assert attacker.goaway is None
        await assert_healthy(server)


async def test_connection_window_update_overflow_gets_goaway_flow_control_error(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer
) -> None:
    """Defence: RFC 9113 section 6.9.1 at connection level: a WINDOW_UPDATE on stream 0
    that takes the connection's send window past 2^31-1 is a connection error
    FLOW_CONTROL_ERROR (GOAWAY, close); other connections are not affected."""
    hits = limit_hits("connection_error")
    async with asyncio.timeout(TEST_TIMEOUT_S):
        server = await start_gateway(gateway_factory, h1_upstream)
        async with (
            innocent_connection(server),
            await RawH2Client.connect(*address(server)) as attacker,
        ):
            await attacker.send_frames(WindowUpdateFrame(0, window_increment=MAX_WINDOW))
            goaway = await attacker.wait_goaway()
            await attacker.wait_closed()

        assert goaway.error_code == ErrorCodes.FLOW_CONTROL_ERROR
        await assert_healthy(server)
    assert limit_hits("connection_error") > hits  # counted


# --- 6. invalid prefaces ----------------------------------------------------------------------


async def read_until_closed(
    reader: asyncio.StreamReader, timeout_s: float = 5.0
) -> tuple[bytes, bool]:
    """Everything the gateway sends before it closes, and whether it closed within
    `timeout_s` (False: it was still open, i.e. hanging: half the 10 s header_timeout,
    room enough for a busy machine)."""
    received = bytearray()
    try:
        async with asyncio.timeout(timeout_s):
            while chunk := await reader.read(65536):
                received += chunk
    except TimeoutError:
        return bytes(received), False
    except ConnectionResetError:
        pass
    return bytes(received), True


@pytest.mark.parametrize(
    "pieces",
    [
        [b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n"],
        # A valid start the sniffer must buffer, then the wrong end in a second write.
        [b"PRI * HTTP/2.0\r\n", b"\r\nXX\r\n\r\n"],
    ],
    ids=["whole", "split"],
)
async def test_a_wrong_preface_on_the_plaintext_port_gets_400_or_a_close_not_a_hang(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer, pieces: list[bytes]
) -> None:
    """Defence: the preface sniffer (`protocol/select.py`) hands anything that is not
    exactly the 24-byte preface to HTTP/1.1, whose parser rejects a `PRI * HTTP/2.0`
    request: 400 or a close, at once (header_timeout is 10 s: no waiting for it)."""
    async with asyncio.timeout(TEST_TIMEOUT_S):
        server = await start_gateway(gateway_factory, h1_upstream)
        reader, writer = await asyncio.open_connection(*address(server))
        try:
            for piece in pieces:
                writer.write(piece)
                await writer.drain()
                await asyncio.sleep(0.05)
            received, closed = await read_until_closed(reader)
        finally:
            writer.close()

        assert closed, f"the gateway hung after a wrong preface (sent {received!r})"
        assert received == b"" or received.startswith(b"HTTP/1.1 400 "), received
        assert len(h1_upstream.requests) == 0
        await assert_healthy(server)


async def test_garbage_instead_of_the_preface_over_tls_h2_gets_goaway_protocol_error(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer, tls_files: TlsFiles
) -> None:
    """Defence: h2's preamble check (RFC 9113 section 3.4) on a TLS connection that chose
    h2 by ALPN: anything but the preface is a connection error PROTOCOL_ERROR."""
    async with asyncio.timeout(TEST_TIMEOUT_S):
        server = await start_gateway(gateway_factory, h1_upstream, listener_tls=tls_files)
        context = tls_files.client_context(["h2"])
        async with await RawH2Client.connect(
            *address(server), ssl_context=context, preface=False
        ) as attacker:
            selected = attacker.writer.get_extra_info("ssl_object").selected_alpn_protocol()
            await attacker.send_raw(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + b"\x00" * 64)
            goaway = await attacker.wait_goaway()
            await attacker.wait_closed()

        assert selected == "h2"
        assert goaway.error_code == ErrorCodes.PROTOCOL_ERROR
        port = address(server)[1]
        async with httpx.AsyncClient(http2=True, verify=context, timeout=5) as client:
            response = await client.get(f"https://localhost:{port}/echo/after-garbage")
        assert (response.http_version, response.status_code) == ("HTTP/2", 200)


# --- 8. idle connections -----------------------------------------------------------------------


async def test_an_idle_h2_connection_gets_goaway_and_pings_do_not_keep_it_open(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer
) -> None:
    """Defence: limits.keepalive_timeout on HTTP/2 (`Http2Protocol._update_phase`: frames
    without streams do not extend the idle deadline). After one exchange the client only
    PINGs, every 50 ms, for as long as the connection is open; the gateway still says
    GOAWAY NO_ERROR and closes, no sooner than 1 s later (were pings to extend the
    deadline, it would never close)."""
    hits = limit_hits("idle_timeout")
    async with asyncio.timeout(TEST_TIMEOUT_S):
        server = await start_gateway(gateway_factory, h1_upstream, limits="keepalive_timeout: 1s")
        loop = asyncio.get_running_loop()
        async with await H2Client.connect(*address(server)) as client:
            idle_since = loop.time()  # before the exchange that starts the idle timer
            first = await client.request("/echo/before-idle")

            async def keep_pinging() -> None:
                for n in itertools.count():
                    if client.goaway is not None or client.closed:
                        return  # h2 refuses to ping on a connection told to go away
                    client.conn.ping(b"%08d" % n)
                    await client.flush()
                    await asyncio.sleep(0.05)

            pinger = loop.create_task(keep_pinging())
            try:
                await client.wait_closed()
            finally:
                pinger.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await pinger
            idle_for = loop.time() - idle_since

        assert first.status == 200
        pongs = [e for e in client.events if type(e).__name__ == "PingAckReceived"]
        assert len(pongs) >= 3  # the pings were answered while the timer ran on
        assert client.goaway is not None
        assert client.goaway.error_code == ErrorCodes.NO_ERROR
        assert idle_for >= 1.0 - 0.001  # (uvloop's clock counts milliseconds)
        await assert_healthy(server)
    assert limit_hits("idle_timeout") > hits  # counted


# --- 11. graceful shutdown --------------------------------------------------------------------


async def test_graceful_shutdown_finishes_the_stream_in_flight_and_refuses_new_ones(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer
) -> None:
    """Defence of the in-flight work on drain (`Http2Protocol.on_drain_request`, RFC 9113
    section 6.8): a graceful GOAWAY (NO_ERROR) whose last_stream_id covers the exchange
    in flight, which still completes 200; a stream opened after the GOAWAY is refused
    (REFUSED_STREAM) and never reaches the upstream; then the connection closes."""
    async with asyncio.timeout(TEST_TIMEOUT_S):
        server = await start_gateway(gateway_factory, h1_upstream)
        async with await RawH2Client.connect(*address(server)) as client:
            await client.send_frames(client.headers_frame(1, "/held"))
            await eventually(
                lambda: upstream_saw(h1_upstream, "/held") == 1, "the exchange to be under way"
            )
            shutdown = asyncio.get_running_loop().create_task(server.shutdown(grace_period=30))
            try:
                goaway = await client.wait_goaway()
                await client.send_frames(client.headers_frame(3, "/echo/after-goaway"))
                # The refusal comes before the in-flight answer, which waits for the test.
                await client.wait_for("stream 3's refusal", lambda: 3 in client.resets)
                h1_upstream.release_held()
                await client.wait_for("the in-flight answer", lambda: 1 in client.ended)
                await client.wait_closed()
            finally:
                await shutdown

        assert goaway.error_code == ErrorCodes.NO_ERROR
        assert goaway.last_stream_id >= 1
        assert client.status(1) == 200
        assert bytes(client.data[1]) == b"held"
        assert client.resets.get(3) == ErrorCodes.REFUSED_STREAM
        assert client.status(3) is None
        assert upstream_saw(h1_upstream, "/echo/after-goaway") == 0


async def test_a_stalled_request_body_gets_408_while_the_connections_other_streams_work(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer
) -> None:
    """Defence: limits.body_timeout on an HTTP/2 stream (slowloris on a body; docs/architecture.md:
    client too slow sending the body -> 408). A POST announces 1000 bytes, sends 100 and
    stops: after its 300 ms (not the 60 s default) its stream must be answered 408 or
    reset, while the same connection's other streams are served.

    Regression: the connection stayed BUSY while any stream was open, so no timeout ever
    fired and the exchange waited on the body forever (the upstream request too)."""
    hits = limit_hits("body_timeout")
    async with asyncio.timeout(TEST_TIMEOUT_S):
        server = await start_gateway(gateway_factory, h1_upstream, limits="body_timeout: 300ms")
        async with await H2Client.connect(*address(server)) as client:
            stalled = client.send_request(
                "/echo/stalled",
                method="POST",
                headers=[("content-length", "1000")],
                end_stream=False,
            )
            await client.flush()
            await client.send_body(stalled, b"x" * 100, end=False)
            other = await client.request("/echo/other")
            result = client.streams[stalled]
            try:
                await client.wait_for(
                    "the stalled stream's 408 or reset",
                    lambda: result.ended or result.reset_code is not None,
                    timeout_s=10.0,
                )
            except TimeoutError:
                raise AssertionError(
                    "a stream whose body stopped coming was neither answered nor reset "
                    "within 10 s (body_timeout 300 ms, the default 60 s)"
                ) from None
            after = await client.request("/echo/after")

        assert other.status == 200
        assert result.status == 408 or result.reset_code is not None
        assert after.status == 200
        assert client.goaway is None
    assert limit_hits("body_timeout") > hits  # counted


async def test_a_stream_beyond_max_concurrent_streams_is_refused_and_the_others_complete(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer
) -> None:
    """Defence: RFC 9113 section 5.1.2: a HEADERS that exceeds the advertised
    SETTINGS_MAX_CONCURRENT_STREAMS MUST be a stream error (PROTOCOL_ERROR or
    REFUSED_STREAM); Http2Config's docstring promises RST_STREAM REFUSED_STREAM. The five
    streams within the limit must complete 200 on the same connection.

    Regression: h2 raised TooManyStreamsError (before decoding the header block) and the
    gateway made it a connection error, cancelling the five exchanges in flight."""
    hits = limit_hits("refused_stream")
    async with asyncio.timeout(TEST_TIMEOUT_S):
        server = await start_gateway(
            gateway_factory, h1_upstream, http2="max_concurrent_streams: 5"
        )
        async with await RawH2Client.connect(*address(server)) as client:
            await client.wait_for("the gateway's SETTINGS", lambda: bool(client.frames))
            ids = [1, 3, 5, 7, 9]
            # Held by the upstream until the test lets them go: all five are open when the
            # sixth comes, however slow the machine.
            await client.send_frames(*(client.headers_frame(i, f"/held?n={i}") for i in ids))
            await eventually(lambda: upstream_saw(h1_upstream, "/held") == 5, "the five in flight")
            await client.send_frames(client.headers_frame(11, "/held?n=11"))
            await client.wait_for("the sixth stream's reset", lambda: 11 in client.resets)
            h1_upstream.release_held()
            await client.wait_for("the five answers", lambda: all(i in client.ended for i in ids))

        assert client.resets[11] in (ErrorCodes.REFUSED_STREAM, ErrorCodes.PROTOCOL_ERROR)
        assert [client.status(i) for i in ids] == [200] * 5
        assert client.goaway is None
        assert upstream_saw(h1_upstream, "/held?n=11") == 0
        await assert_healthy(server)
    assert limit_hits("refused_stream") > hits  # counted
