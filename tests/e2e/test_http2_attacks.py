"""The HTTP/2 front end under attack (issue #3): each known HTTP/2 denial-of-service
shape is played against an in-process gateway over a real socket, frame by frame with
hyperframe / hpack (tests/h2_client.py `RawH2Client`, which has no state machine to stop
the test from breaking the rules).

For each attack three things are checked: the attacking connection is stopped the way
RFC 9113 and `Http2Config` say (GOAWAY with the right error code, or a stream reset);
the gateway stays healthy (fresh h2 and HTTP/1.1 clients are served 200 afterwards); and,
where it means something, an innocent connection opened before the attack keeps being
served through it. Each test's docstring names the defence it proves: remove that
defence and the test fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator

import hpack
import httpx
import pytest
from h2.errors import ErrorCodes
from hyperframe.frame import (
    ContinuationFrame,
    Frame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

from metrics.definitions import REGISTRY
from proxy.server import Server
from tests.conftest import GatewayFactory, assert_still_serves, base_url, simple_config
from tests.h2_client import H2Client, RawH2Client
from tests.tls import TlsFiles
from tests.upstream import UpstreamServer

pytestmark = pytest.mark.socket

TEST_TIMEOUT_S = 15.0
MAX_WINDOW = 2**31 - 1  # RFC 9113 section 6.9.1
# RFC 9113 section 6.5.2: a field's size is its name, its value and 32 bytes.
FIELD_OVERHEAD = 32


async def start_gateway(
    gateway_factory: GatewayFactory,
    upstream: UpstreamServer,
    *,
    http2: str = "",
    limits: str = "",
    listener_tls: TlsFiles | None = None,
) -> Server:
    """A gateway in front of `upstream` with the given `http2:` / `limits:` settings."""
    extra = ""
    if http2:
        extra += f"http2: {{{http2}}}\n"
    if limits:
        extra += f"limits: {{{limits}}}\n"
    config = simple_config(upstream.url, "httptools", extra=extra)
    if listener_tls is not None:
        config = config.replace(
            "  - bind: 127.0.0.1:0",
            "  - bind: 127.0.0.1:0\n"
            f"    tls: {{cert: {listener_tls.cert}, key: {listener_tls.key}}}",
        )
    return await gateway_factory(config)


def address(server: Server) -> tuple[str, int]:
    """The gateway's first listener."""
    host, port = server.addresses[0]
    return host, port


async def assert_healthy(server: Server) -> None:
    """Fresh connections, HTTP/1.1 and h2c, are served 200 (the attack left no damage)."""
    await assert_still_serves(server)
    async with httpx.AsyncClient(http1=False, http2=True, timeout=5) as client:
        response = await client.get(base_url(server) + "/echo/h2-still-serving")
    assert (response.http_version, response.status_code) == ("HTTP/2", 200)
    assert response.json()["target"] == "/echo/h2-still-serving"


@contextlib.asynccontextmanager
async def innocent_connection(server: Server, path: str = "/slow/300") -> AsyncIterator[None]:
    """An h2 connection with an exchange in flight across the attack: the exchange must
    complete and the connection must serve another one afterwards, untouched."""
    async with await H2Client.connect(*address(server)) as client:
        stream_id = client.send_request(path)
        await client.flush()
        yield
        result = client.streams[stream_id]
        await client.wait_for(
            "the innocent exchange", lambda: result.ended or result.reset_code is not None
        )
        assert (result.status, result.reset_code) == (200, None)
        after = await client.request("/echo/innocent-after")
        assert after.status == 200
        assert client.goaway is None


def limit_hits(limit: str) -> float:
    """How often the HTTP/2 defence `limit` fired in this process so far (the counter)."""
    value = REGISTRY.get_sample_value("gatehouse_http2_limit_hits_total", {"limit": limit})
    return value or 0.0


def upstream_saw(upstream: UpstreamServer, prefix: str) -> int:
    """How many requests whose target starts with `prefix` reached the upstream."""
    return sum(1 for request in upstream.requests if request.target.startswith(prefix))


# --- 1. rapid reset (CVE-2023-44487) --------------------------------------------------------


async def test_rapid_reset_gets_goaway_enhance_your_calm_and_bounds_upstream_work(
    gateway_factory: GatewayFactory, upstream: UpstreamServer
) -> None:
    """Defence: `max_resets_per_second` (`Http2Protocol._on_reset`). 1000 streams are
    opened and cancelled, HEADERS of a batch first (so their exchanges start) and the
    batch's RST_STREAMs in the next write: past 50 resets the connection is told to calm
    down, so far fewer than 1000 requests ever reach the upstream."""
    hits = limit_hits("rapid_reset")
    async with asyncio.timeout(TEST_TIMEOUT_S):
        server = await start_gateway(gateway_factory, upstream, http2="max_resets_per_second: 50")
        async with (
            innocent_connection(server),
            await RawH2Client.connect(*address(server)) as attacker,
        ):
            batch = 50
            for first in range(0, 1000, batch):
                ids = [1 + 2 * n for n in range(first, first + batch)]
                await attacker.send_frames(
                    *(attacker.headers_frame(i, f"/slow/1000?rapid-reset={i}") for i in ids)
                )
                await asyncio.sleep(0.03)  # the exchanges reach the upstream before their reset
                await attacker.send_frames(
                    *(RstStreamFrame(i, error_code=ErrorCodes.CANCEL) for i in ids)
                )
                if attacker.closed:
                    break
            goaway = await attacker.wait_goaway()
            await attacker.wait_closed()
        await asyncio.sleep(0.2)  # requests the gateway had already forwarded land

        assert goaway.error_code == ErrorCodes.ENHANCE_YOUR_CALM
        reached = upstream_saw(upstream, "/slow/1000?rapid-reset=")
        assert reached < 200, f"{reached} of 1000 reset streams reached the upstream"
        await assert_healthy(server)
    assert limit_hits("rapid_reset") > hits  # counted


# --- 2. CONTINUATION flood --------------------------------------------------------------------


async def test_continuation_flood_gets_goaway_protocol_error(
    gateway_factory: GatewayFactory, upstream: UpstreamServer
) -> None:
    """Defence: the header block backlog is bounded (h2 accepts 64 CONTINUATION frames per
    block, Http2Config's docstring): a HEADERS without END_HEADERS followed by 500
    CONTINUATIONs is a connection error, promptly, and the request never starts."""
    hits = limit_hits("connection_error")
    async with asyncio.timeout(TEST_TIMEOUT_S):
        server = await start_gateway(gateway_factory, upstream)
        fragment = hpack.Encoder().encode([("x-flood", "f" * 100)])
        async with (
            innocent_connection(server),
            await RawH2Client.connect(*address(server)) as attacker,
        ):
            head = attacker.headers_frame(1, "/echo/continuation", end_headers=False)
            flood = [ContinuationFrame(1, data=fragment) for _ in range(500)]
            loop = asyncio.get_running_loop()
            started = loop.time()
            await attacker.send_frames(head, *flood)
            goaway = await attacker.wait_goaway()
            await attacker.wait_closed()
            elapsed = loop.time() - started

        assert goaway.error_code == ErrorCodes.PROTOCOL_ERROR
        assert goaway.last_stream_id == 0
        assert elapsed < 2.0
        assert upstream_saw(upstream, "/echo/continuation") == 0
        await assert_healthy(server)
    assert limit_hits("connection_error") > hits  # counted


async def test_continuation_flood_of_full_frames_is_cut_off_not_buffered(
    gateway_factory: GatewayFactory, upstream: UpstreamServer
) -> None:
    """Defence: the same backlog bound, as a memory bound: 1000 full-size (16 KiB)
    CONTINUATION frames (16 MiB of header block) are never taken in: the gateway stops
    reading and closes after a bounded backlog (64 frames, 1 MiB), so the attacker's
    writes fail long before its 16 MiB are out (loopback buffers hold a few MiB)."""
    async with asyncio.timeout(TEST_TIMEOUT_S):
        server = await start_gateway(gateway_factory, upstream)
        payload = b"\x00" * 16384  # the default SETTINGS_MAX_FRAME_SIZE
        async with await RawH2Client.connect(*address(server)) as attacker:
            await attacker.send_frames(attacker.headers_frame(1, "/echo/big", end_headers=False))
            written = 0
            for _ in range(100):
                await attacker.send_frames(*(ContinuationFrame(1, data=payload) for _ in range(10)))
                if attacker.closed:
                    break
                written += 10
            await attacker.wait_closed()

        assert written < 1000, "the gateway took in 16 MiB of CONTINUATION frames"
        if attacker.goaway is not None:  # the reset may overtake it: either is an answer
            assert attacker.goaway.error_code == ErrorCodes.PROTOCOL_ERROR
        await assert_healthy(server)


# --- 3. HPACK bomb --------------------------------------------------------------------------


async def test_hpack_bomb_gets_goaway_and_is_never_decoded_in_full(
    gateway_factory: GatewayFactory, upstream: UpstreamServer
) -> None:
    """Defence: the hard cap on the decoded header list (max_header_list_size x
    HEADER_LIST_HARD_CAP_FACTOR, set on h2's HPACK decoder). One 4 KiB field is put in
    the dynamic table, then referenced by its index 1000 times in the same block: ~5 KiB
    on the wire that would decode to ~4 MiB. Without the cap the gateway would decode it
    all and answer 431 on the stream; with it, decoding stops at 32 KiB and the
    connection is closed (h2's DenialOfServiceError: ENHANCE_YOUR_CALM)."""
    hits = limit_hits("connection_error")
    async with asyncio.timeout(TEST_TIMEOUT_S):
        server = await start_gateway(gateway_factory, upstream, http2="max_header_list_size: 8KiB")
        async with (
            innocent_connection(server),
            await RawH2Client.connect(*address(server)) as attacker,
        ):
            bomb = [("x-bomb", "b" * 4000)] * 1000
            frame = attacker.headers_frame(1, "/echo/bomb", headers=bomb)
            wire = len(frame.data)
            await attacker.send_frames(frame)
            goaway = await attacker.wait_goaway()
            await attacker.wait_closed()

        assert wire < 6000  # the block really is a bomb: 1000 one-byte indexed fields
        assert goaway.error_code == ErrorCodes.ENHANCE_YOUR_CALM
        assert upstream_saw(upstream, "/echo/bomb") == 0
        await assert_healthy(server)
    assert limit_hits("connection_error") > hits  # counted


# --- 4. oversize header lists -----------------------------------------------------------------


def header_list_size(fields: list[tuple[str, str]]) -> int:
    """RFC 9113 section 6.5.2 size of a field list."""
    return sum(len(name) + len(value) + FIELD_OVERHEAD for name, value in fields)


def many_small_headers(path: str, total: int) -> list[tuple[str, str]]:
    """Regular fields of 16-byte values such that the request (with H2Client's pseudo
    fields) weighs exactly `total` bytes by RFC 9113's count."""
    pseudo = [(":method", "GET"), (":scheme", "http"), (":authority", "gateway.test")]
    pseudo.append((":path", path))
    fields: list[tuple[str, str]] = []
    size = header_list_size(pseudo)
    n = 0
    while total - size > 200:
        field = (f"x-small-{n:04d}", "v" * 16)
        fields.append(field)
        size += header_list_size([field])
        n += 1
    rest = total - size - len("x-last") - FIELD_OVERHEAD
    fields.append(("x-last", "w" * rest))
    assert header_list_size(pseudo + fields) == total
    return fields


async def test_many_small_headers_just_over_the_limit_get_431_and_the_connection_lives_on(
    gateway_factory: GatewayFactory, upstream: UpstreamServer
) -> None:
    """Defence: max_header_list_size per stream (431, DESIGN.md), counted as RFC 9113
    section 6.5.2 does (name + value + 32 per field). ~30 small fields weighing exactly
    the limit pass; one byte more is a 431 on that stream only, and the connection goes
    on serving (the hard cap, 4x, is far away)."""
    hits = limit_hits("header_list")
    async with asyncio.timeout(TEST_TIMEOUT_S):
        server = await start_gateway(gateway_factory, upstream, http2="max_header_list_size: 2KiB")
        async with await H2Client.connect(*address(server)) as client:
            at_limit = await client.request("/echo/a", headers=many_small_headers("/echo/a", 2048))
            over = await client.request("/echo/b", headers=many_small_headers("/echo/b", 2049))
            after = await client.request("/echo/c")

        assert at_limit.status == 200
        assert len(json.loads(at_limit.body)["headers"]) > 25
        assert over.status == 431
        assert json.loads(over.body)["error"] == "head_too_large"
        assert after.status == 200
        assert client.goaway is None
        assert upstream_saw(upstream, "/echo/b") == 0
    assert limit_hits("header_list") > hits  # counted


# --- 5. WINDOW_UPDATE overflow ----------------------------------------------------------------


async def test_stream_window_update_overflow_resets_only_that_stream(
    gateway_factory: GatewayFactory, upstream: UpstreamServer
) -> None:
    """Defence: RFC 9113 section 6.9.1 (h2's window guard, surfaced as a stream reset):
    a WINDOW_UPDATE that takes a stream's send window past 2^31-1 resets that stream with
    FLOW_CONTROL_ERROR; the connection and its other streams carry on."""
    async with asyncio.timeout(TEST_TIMEOUT_S):
        server = await start_gateway(gateway_factory, upstream)
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
    gateway_factory: GatewayFactory, upstream: UpstreamServer
) -> None:
    """Defence: RFC 9113 section 6.9.1 at connection level: a WINDOW_UPDATE on stream 0
    that takes the connection's send window past 2^31-1 is a connection error
    FLOW_CONTROL_ERROR (GOAWAY, close); other connections are not affected."""
    hits = limit_hits("connection_error")
    async with asyncio.timeout(TEST_TIMEOUT_S):
        server = await start_gateway(gateway_factory, upstream)
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
    reader: asyncio.StreamReader, timeout_s: float = 2.0
) -> tuple[bytes, bool]:
    """Everything the gateway sends before it closes, and whether it closed within
    `timeout_s` (False: it was still open, i.e. hanging)."""
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
    gateway_factory: GatewayFactory, upstream: UpstreamServer, pieces: list[bytes]
) -> None:
    """Defence: the preface sniffer (`protocol/select.py`) hands anything that is not
    exactly the 24-byte preface to HTTP/1.1, whose parser rejects a `PRI * HTTP/2.0`
    request: 400 or a close, at once (header_timeout is 10 s: no waiting for it)."""
    async with asyncio.timeout(TEST_TIMEOUT_S):
        server = await start_gateway(gateway_factory, upstream)
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
        assert len(upstream.requests) == 0
        await assert_healthy(server)


async def test_garbage_instead_of_the_preface_over_tls_h2_gets_goaway_protocol_error(
    gateway_factory: GatewayFactory, upstream: UpstreamServer, tls_files: TlsFiles
) -> None:
    """Defence: h2's preamble check (RFC 9113 section 3.4) on a TLS connection that chose
    h2 by ALPN: anything but the preface is a connection error PROTOCOL_ERROR."""
    async with asyncio.timeout(TEST_TIMEOUT_S):
        server = await start_gateway(gateway_factory, upstream, listener_tls=tls_files)
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


# --- 7. SETTINGS and PING floods --------------------------------------------------------------


def acks(client: RawH2Client) -> int:
    """How many SETTINGS and PING ACKs the gateway sent."""
    return sum(
        1
        for frame in client.frames
        if isinstance(frame, (SettingsFrame, PingFrame)) and "ACK" in frame.flags
    )


@pytest.mark.parametrize("kind", ["settings", "ping"])
async def test_control_frame_flood_gets_goaway_enhance_your_calm(
    gateway_factory: GatewayFactory, upstream: UpstreamServer, kind: str
) -> None:
    """Defence: `max_control_frames_per_second` (`Http2Protocol._on_settings` and
    `_on_control_frame`): with a limit of 20, a flood of SETTINGS or PING frames (written
    10 at a time, up to 500) gets GOAWAY ENHANCE_YOUR_CALM within the third write, so at
    most 30 of them are ever answered instead of 500."""
    hits = limit_hits("control_flood")
    async with asyncio.timeout(TEST_TIMEOUT_S):
        server = await start_gateway(
            gateway_factory, upstream, http2="max_control_frames_per_second: 20"
        )
        async with (
            innocent_connection(server),
            await RawH2Client.connect(*address(server)) as attacker,
        ):
            await attacker.wait_for("the gateway's SETTINGS ACK", lambda: acks(attacker) == 1)
            for n in range(0, 500, 10):
                flood: list[Frame]
                if kind == "settings":
                    flood = [SettingsFrame(0) for _ in range(10)]
                else:
                    flood = [PingFrame(0, opaque_data=b"%08d" % (n + i)) for i in range(10)]
                await attacker.send_frames(*flood)
                await asyncio.sleep(0.01)  # one read per write, as a steady flood does
                if attacker.closed or attacker.goaway is not None:
                    break
            goaway = await attacker.wait_goaway()
            await attacker.wait_closed()

        assert goaway.error_code == ErrorCodes.ENHANCE_YOUR_CALM
        # The first ACK is for the connection's own SETTINGS.
        assert acks(attacker) - 1 <= 30, f"{acks(attacker) - 1} flood frames were answered"
        await assert_healthy(server)
    assert limit_hits("control_flood") > hits  # counted


async def test_a_client_below_the_control_frame_limit_is_served(
    gateway_factory: GatewayFactory, upstream: UpstreamServer
) -> None:
    """The other side of the same limit: 10 PINGs and a SETTINGS (plus the connection's
    own SETTINGS) stay under 20 per second: every PING is answered, no GOAWAY."""
    async with asyncio.timeout(TEST_TIMEOUT_S):
        server = await start_gateway(
            gateway_factory, upstream, http2="max_control_frames_per_second: 20"
        )
        async with await RawH2Client.connect(*address(server)) as client:
            await client.send_frames(
                *(PingFrame(0, opaque_data=b"%08d" % n) for n in range(10)), SettingsFrame(0)
            )
            await client.wait_for("10 PING ACKs", lambda: client.ping_acks == 10)
            await client.send_frames(client.headers_frame(1, "/echo/calm"))
            await client.wait_for("the answer", lambda: 1 in client.ended)

        assert client.status(1) == 200
        assert client.goaway is None


# --- 8. too many concurrent streams -----------------------------------------------------------


async def test_an_idle_h2_connection_gets_goaway_and_pings_do_not_keep_it_open(
    gateway_factory: GatewayFactory, upstream: UpstreamServer
) -> None:
    """Defence: limits.keepalive_timeout on HTTP/2 (`Http2Protocol._update_phase`: frames
    without streams do not extend the idle deadline). After one exchange the client only
    PINGs, every 50 ms; the gateway still says GOAWAY NO_ERROR and closes around 300 ms
    later, well under 2 s."""
    hits = limit_hits("idle_timeout")
    async with asyncio.timeout(TEST_TIMEOUT_S):
        server = await start_gateway(gateway_factory, upstream, limits="keepalive_timeout: 300ms")
        loop = asyncio.get_running_loop()
        async with await H2Client.connect(*address(server)) as client:
            first = await client.request("/echo/before-idle")
            idle_since = loop.time()

            async def keep_pinging() -> None:
                for n in range(100):
                    if client.goaway is not None or client.closed:
                        return  # h2 refuses to ping on a connection told to go away
                    client.conn.ping(b"%08d" % n)
                    await client.flush()
                    await asyncio.sleep(0.05)

            pinger = loop.create_task(keep_pinging())
            try:
                await client.wait_closed(timeout_s=5.0)
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
        assert 0.25 < idle_for < 2.0
        await assert_healthy(server)
    assert limit_hits("idle_timeout") > hits  # counted


# --- 11. graceful shutdown --------------------------------------------------------------------


async def test_graceful_shutdown_finishes_the_stream_in_flight_and_refuses_new_ones(
    gateway_factory: GatewayFactory, upstream: UpstreamServer
) -> None:
    """Defence of the in-flight work on drain (`Http2Protocol.on_drain_request`, RFC 9113
    section 6.8): a graceful GOAWAY (NO_ERROR) whose last_stream_id covers the exchange
    in flight, which still completes 200; a stream opened after the GOAWAY is refused
    (REFUSED_STREAM) and never reaches the upstream; then the connection closes."""
    async with asyncio.timeout(TEST_TIMEOUT_S):
        server = await start_gateway(gateway_factory, upstream)
        async with await RawH2Client.connect(*address(server)) as client:
            await client.send_frames(client.headers_frame(1, "/slow/500"))
            await asyncio.sleep(0.1)  # the exchange is under way
            shutdown = asyncio.get_running_loop().create_task(server.shutdown(grace_period=5))
            try:
                goaway = await client.wait_goaway()
                await client.send_frames(client.headers_frame(3, "/echo/after-goaway"))
                await client.wait_for("the in-flight answer", lambda: 1 in client.ended)
                await client.wait_closed()
            finally:
                await shutdown

        assert goaway.error_code == ErrorCodes.NO_ERROR
        assert goaway.last_stream_id >= 1
        assert client.status(1) == 200
        assert bytes(client.data[1]) == b"slow"
        assert client.resets.get(3) == ErrorCodes.REFUSED_STREAM
        assert client.status(3) is None
        assert upstream_saw(upstream, "/echo/after-goaway") == 0


async def test_a_stalled_request_body_gets_408_while_the_connections_other_streams_work(
    gateway_factory: GatewayFactory, upstream: UpstreamServer
) -> None:
    """Defence: limits.body_timeout on an HTTP/2 stream (slowloris on a body; DESIGN.md:
    client too slow sending the body -> 408). A POST announces 1000 bytes, sends 100 and
    stops: within ~300 ms (well under 2 s) its stream must be answered 408 or reset, while
    the same connection's other streams are served.

    Regression: the connection stayed BUSY while any stream was open, so no timeout ever
    fired and the exchange waited on the body forever (the upstream request too)."""
    hits = limit_hits("body_timeout")
    async with asyncio.timeout(TEST_TIMEOUT_S):
        server = await start_gateway(gateway_factory, upstream, limits="body_timeout: 300ms")
        async with await H2Client.connect(*address(server)) as client:
            stalled = client.send_request(
                "/echo/stalled",
                method="POST",
                headers=[("content-length", "1000")],
                end_stream=False,
            )
            await client.flush()
            await client.send_body(stalled, b"x" * 100, end=False)
            loop = asyncio.get_running_loop()
            started = loop.time()
            other = await client.request("/echo/other")
            result = client.streams[stalled]
            try:
                await client.wait_for(
                    "the stalled stream's 408 or reset",
                    lambda: result.ended or result.reset_code is not None,
                    timeout_s=3.0,
                )
            except TimeoutError:
                raise AssertionError(
                    "a stream whose body stopped coming was neither answered nor reset "
                    "within 3 s (body_timeout 300 ms)"
                ) from None
            elapsed = loop.time() - started
            after = await client.request("/echo/after")

        assert other.status == 200
        assert result.status == 408 or result.reset_code is not None
        assert elapsed < 2.0
        assert after.status == 200
        assert client.goaway is None
    assert limit_hits("body_timeout") > hits  # counted


async def test_a_stream_beyond_max_concurrent_streams_is_refused_and_the_others_complete(
    gateway_factory: GatewayFactory, upstream: UpstreamServer
) -> None:
    """Defence: RFC 9113 section 5.1.2: a HEADERS that exceeds the advertised
    SETTINGS_MAX_CONCURRENT_STREAMS MUST be a stream error (PROTOCOL_ERROR or
    REFUSED_STREAM); Http2Config's docstring promises RST_STREAM REFUSED_STREAM. The five
    streams within the limit must complete 200 on the same connection.

    Regression: h2 raised TooManyStreamsError (before decoding the header block) and the
    gateway made it a connection error, cancelling the five exchanges in flight."""
    hits = limit_hits("refused_stream")
    async with asyncio.timeout(TEST_TIMEOUT_S):
        server = await start_gateway(gateway_factory, upstream, http2="max_concurrent_streams: 5")
        async with await RawH2Client.connect(*address(server)) as client:
            await client.wait_for("the gateway's SETTINGS", lambda: bool(client.frames))
            ids = [1, 3, 5, 7, 9]
            await client.send_frames(*(client.headers_frame(i, f"/slow/500?n={i}") for i in ids))
            await asyncio.sleep(0.2)
            await client.send_frames(client.headers_frame(11, "/slow/500?n=11"))
            await client.wait_for("the sixth stream's reset", lambda: 11 in client.resets)
            await client.wait_for("the five answers", lambda: all(i in client.ended for i in ids))

        assert client.resets[11] in (ErrorCodes.REFUSED_STREAM, ErrorCodes.PROTOCOL_ERROR)
        assert [client.status(i) for i in ids] == [200] * 5
        assert client.goaway is None
        assert upstream_saw(upstream, "/slow/500?n=11") == 0
        await assert_healthy(server)
    assert limit_hits("refused_stream") > hits  # counted


async def test_streams_the_client_makes_the_gateway_reset_count_as_rapid_resets(
    gateway_factory: GatewayFactory, upstream: UpstreamServer
) -> None:
    """Defence: `max_resets_per_second` must also count the resets the client provokes
    (the "MadeYouReset" variant of rapid reset, CVE-2025-8671): here each stream is
    opened, then given a WINDOW_UPDATE that overflows its window (RFC 9113 section
    6.9.1), which makes the gateway reset it with FLOW_CONTROL_ERROR. 1000 such streams
    with a limit of 50 per second must end in GOAWAY ENHANCE_YOUR_CALM, with far fewer
    than 1000 requests reaching the upstream.

    Regression: only resets the client sent were counted, so it could churn through
    streams without limit."""
    hits = limit_hits("rapid_reset")
    async with asyncio.timeout(TEST_TIMEOUT_S):
        server = await start_gateway(gateway_factory, upstream, http2="max_resets_per_second: 50")
        async with await RawH2Client.connect(*address(server)) as attacker:
            batch = 50
            for first in range(0, 1000, batch):
                ids = [1 + 2 * n for n in range(first, first + batch)]
                await attacker.send_frames(
                    *(attacker.headers_frame(i, f"/slow/1000?made-you-reset={i}") for i in ids)
                )
                await asyncio.sleep(0.03)  # the exchanges reach the upstream before their reset
                await attacker.send_frames(
                    *(WindowUpdateFrame(i, window_increment=MAX_WINDOW) for i in ids)
                )
                if attacker.closed or attacker.goaway is not None:
                    break
            try:
                goaway = await attacker.wait_goaway(timeout_s=2.0)
            except AssertionError:
                reached = upstream_saw(upstream, "/slow/1000?made-you-reset=")
                raise AssertionError(
                    f"no GOAWAY after {len(attacker.resets)} streams reset by the gateway "
                    f"at the client's request; {reached} reached the upstream"
                ) from None
        await asyncio.sleep(0.2)

        assert goaway.error_code == ErrorCodes.ENHANCE_YOUR_CALM
        assert upstream_saw(upstream, "/slow/1000?made-you-reset=") < 200
        await assert_healthy(server)
    assert limit_hits("rapid_reset") > hits  # counted
