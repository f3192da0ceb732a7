"""The HTTP/2 front end under attack (issue #3): each known HTTP/2 denial-of-service
shape is played against an in-process gateway over a real socket, frame by frame with
hyperframe / hpack (tests/support/h2_client.py `RawH2Client`, which has no state machine to stop
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
import json

import hpack
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

from tests.support.gateway import GatewayFactory
from tests.support.h2_client import H2Client, RawH2Client
from tests.support.http2_attack_helpers import (
    FIELD_OVERHEAD,
    MAX_WINDOW,
    TEST_TIMEOUT_S,
    address,
    assert_healthy,
    innocent_connection,
    limit_hits,
    start_gateway,
    upstream_saw,
)
from tests.support.upstreams import UpstreamServer

pytestmark = pytest.mark.socket


# --- 1. rapid reset (CVE-2023-44487) --------------------------------------------------------


async def test_rapid_reset_gets_goaway_enhance_your_calm_and_bounds_upstream_work(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer
) -> None:
    """Defence: `max_resets_per_second` (`Http2Protocol._on_reset`). 1000 streams are
    opened and cancelled, HEADERS of a batch first (so their exchanges start) and the
    batch's RST_STREAMs in the next write: past 50 resets the connection is told to calm
    down, so far fewer than 1000 requests ever reach the upstream."""
    hits = limit_hits("rapid_reset")
    async with asyncio.timeout(TEST_TIMEOUT_S):
        server = await start_gateway(
            gateway_factory, h1_upstream, http2="max_resets_per_second: 50"
        )
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
        reached = upstream_saw(h1_upstream, "/slow/1000?rapid-reset=")
        assert reached < 200, f"{reached} of 1000 reset streams reached the upstream"
        await assert_healthy(server)
    assert limit_hits("rapid_reset") > hits  # counted


# --- 2. CONTINUATION flood --------------------------------------------------------------------


async def test_continuation_flood_gets_goaway_protocol_error(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer
) -> None:
    """Defence: the header block backlog is bounded (h2 accepts 64 CONTINUATION frames per
    block, Http2Config's docstring): a HEADERS without END_HEADERS followed by 500
    CONTINUATIONs is a connection error, promptly, and the request never starts."""
    hits = limit_hits("connection_error")
    async with asyncio.timeout(TEST_TIMEOUT_S):
        server = await start_gateway(gateway_factory, h1_upstream)
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
        assert elapsed < 10.0  # a bound on a hang, with room for a busy machine
        assert upstream_saw(h1_upstream, "/echo/continuation") == 0
        await assert_healthy(server)
    assert limit_hits("connection_error") > hits  # counted


async def test_continuation_flood_of_full_frames_is_cut_off_not_buffered(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer
) -> None:
    """Defence: the same backlog bound, as a memory bound: 1000 full-size (16 KiB)
    CONTINUATION frames (16 MiB of header block) are never taken in: the gateway stops
    reading and closes after a bounded backlog (64 frames, 1 MiB), so the attacker's
    writes fail long before its 16 MiB are out (loopback buffers hold a few MiB)."""
    async with asyncio.timeout(TEST_TIMEOUT_S):
        server = await start_gateway(gateway_factory, h1_upstream)
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
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer
) -> None:
    """Defence: the hard cap on the decoded header list (max_header_list_size x
    HEADER_LIST_HARD_CAP_FACTOR, set on h2's HPACK decoder). One 4 KiB field is put in
    the dynamic table, then referenced by its index 1000 times in the same block: ~5 KiB
    on the wire that would decode to ~4 MiB. Without the cap the gateway would decode it
    all and answer 431 on the stream; with it, decoding stops at 32 KiB and the
    connection is closed (h2's DenialOfServiceError: ENHANCE_YOUR_CALM)."""
    hits = limit_hits("connection_error")
    async with asyncio.timeout(TEST_TIMEOUT_S):
        server = await start_gateway(
            gateway_factory, h1_upstream, http2="max_header_list_size: 8KiB"
        )
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
        assert upstream_saw(h1_upstream, "/echo/bomb") == 0
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
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer
) -> None:
    """Defence: max_header_list_size per stream (431, docs/errors.md), counted as RFC 9113
    section 6.5.2 does (name + value + 32 per field). ~30 small fields weighing exactly
    the limit pass; one byte more is a 431 on that stream only, and the connection goes
    on serving (the hard cap, 4x, is far away)."""
    hits = limit_hits("header_list")
    async with asyncio.timeout(TEST_TIMEOUT_S):
        server = await start_gateway(
            gateway_factory, h1_upstream, http2="max_header_list_size: 2KiB"
        )
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
        assert upstream_saw(h1_upstream, "/echo/b") == 0
    assert limit_hits("header_list") > hits  # counted


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
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer, kind: str
) -> None:
    """Defence: `max_control_frames_per_second` (`Http2Protocol._on_settings` and
    `_on_control_frame`): with a limit of 20, a flood of SETTINGS or PING frames (written
    10 at a time, up to 500) gets GOAWAY ENHANCE_YOUR_CALM within the third write of a
    second, so at most 40 of them are ever answered instead of 500 (the window is a fixed
    second from the connection's start: twice the limit can pass when the flood falls
    across its boundary, as it may when a busy machine is slow to start it)."""
    hits = limit_hits("control_flood")
    async with asyncio.timeout(TEST_TIMEOUT_S):
        server = await start_gateway(
            gateway_factory, h1_upstream, http2="max_control_frames_per_second: 20"
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
        assert acks(attacker) - 1 <= 2 * 20, f"{acks(attacker) - 1} flood frames were answered"
        await assert_healthy(server)
    assert limit_hits("control_flood") > hits  # counted


async def test_a_client_below_the_control_frame_limit_is_served(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer
) -> None:
    """The other side of the same limit: 10 PINGs and a SETTINGS (plus the connection's
    own SETTINGS) stay under 20 per second: every PING is answered, no GOAWAY."""
    async with asyncio.timeout(TEST_TIMEOUT_S):
        server = await start_gateway(
            gateway_factory, h1_upstream, http2="max_control_frames_per_second: 20"
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


# --- provoked resets (CVE-2025-8671) ---------------------------------------------------------


async def test_streams_the_client_makes_the_gateway_reset_count_as_rapid_resets(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer
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
        server = await start_gateway(
            gateway_factory, h1_upstream, http2="max_resets_per_second: 50"
        )
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
                goaway = await attacker.wait_goaway()
            except AssertionError:
                reached = upstream_saw(h1_upstream, "/slow/1000?made-you-reset=")
                raise AssertionError(
                    f"no GOAWAY after {len(attacker.resets)} streams reset by the gateway "
                    f"at the client's request; {reached} reached the upstream"
                ) from None
        await asyncio.sleep(0.2)

        assert goaway.error_code == ErrorCodes.ENHANCE_YOUR_CALM
        assert upstream_saw(h1_upstream, "/slow/1000?made-you-reset=") < 200
        await assert_healthy(server)
    assert limit_hits("rapid_reset") > hits  # counted
