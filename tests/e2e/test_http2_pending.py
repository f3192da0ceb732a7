"""HTTP/2 front-end defences that are missing or wrong today (issue #3): these tests state
the behaviour RFC 9113, DESIGN.md and `Http2Config` ask for, and FAIL until
proxy/protocol/http2.py provides it. Each docstring says what happens now.

Once one passes, move it to tests/e2e/test_http2_attacks.py.
"""

from __future__ import annotations

import asyncio

import pytest
from h2.errors import ErrorCodes
from hyperframe.frame import WindowUpdateFrame

from tests.conftest import GatewayFactory
from tests.e2e.test_http2_attacks import (
    MAX_WINDOW,
    TEST_TIMEOUT_S,
    address,
    assert_healthy,
    start_gateway,
    upstream_saw,
)
from tests.h2_client import H2Client, RawH2Client
from tests.upstream import UpstreamServer

pytestmark = pytest.mark.socket


async def test_a_stalled_request_body_gets_408_while_the_connections_other_streams_work(
    gateway_factory: GatewayFactory, upstream: UpstreamServer
) -> None:
    """Defence: limits.body_timeout on an HTTP/2 stream (slowloris on a body; DESIGN.md:
    client too slow sending the body -> 408). A POST announces 1000 bytes, sends 100 and
    stops: within ~300 ms (well under 2 s) its stream must be answered 408 or reset, while
    the same connection's other streams are served.

    Now: never. `Http2Protocol._update_phase` keeps the connection BUSY while any stream
    is open and never enters ConnectionPhase.BODY, so `ClientConnection.expire` never
    calls `on_timeout(BODY)`; the exchange waits on the body forever (the upstream
    request too), holding a stream slot and an upstream connection."""
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


async def test_a_stream_beyond_max_concurrent_streams_is_refused_and_the_others_complete(
    gateway_factory: GatewayFactory, upstream: UpstreamServer
) -> None:
    """Defence: RFC 9113 section 5.1.2: a HEADERS that exceeds the advertised
    SETTINGS_MAX_CONCURRENT_STREAMS MUST be a stream error (PROTOCOL_ERROR or
    REFUSED_STREAM); Http2Config's docstring promises RST_STREAM REFUSED_STREAM. The five
    streams within the limit must complete 200 on the same connection.

    Now: h2 raises TooManyStreamsError (before decoding the header block) and the gateway
    makes it a connection error: GOAWAY PROTOCOL_ERROR with last_stream_id 9, and the
    five exchanges in flight are cancelled, though the upstream already got them: the
    client never sees their answers."""
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


async def test_streams_the_client_makes_the_gateway_reset_count_as_rapid_resets(
    gateway_factory: GatewayFactory, upstream: UpstreamServer
) -> None:
    """Defence: `max_resets_per_second` must also count the resets the client provokes
    (the "MadeYouReset" variant of rapid reset, CVE-2025-8671): here each stream is
    opened, then given a WINDOW_UPDATE that overflows its window (RFC 9113 section
    6.9.1), which makes the gateway reset it with FLOW_CONTROL_ERROR. 1000 such streams
    with a limit of 50 per second must end in GOAWAY ENHANCE_YOUR_CALM, with far fewer
    than 1000 requests reaching the upstream.

    Now: `Http2Protocol._on_reset` counts only `event.remote_reset` resets, so the client
    churns through streams without limit (never more than max_concurrent_streams open at
    once, but any number per second): no GOAWAY, and the exchanges that started before
    their reset reach the upstream."""
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
