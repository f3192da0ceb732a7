"""Request mirroring through real sockets (a route's `mirror`, docs/traffic.md): a gateway
in front of a primary upstream and a shadow one, each a real server recording what it
receives.

The primary's answers must not change, nor wait, whatever the shadow does: it holds its
answers until the test releases them (the primary's answers come back while the shadow
still holds every copy: ordered by events, not by timing), answers 500, or is a closed
port. Each mirrored route has a twin without mirror to the same primary, whose answers
are the reference. Both loops; the client over HTTP/1.1 and HTTP/2; a shadow over
HTTP/1.1 and h2c."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
import pytest
from websockets.asyncio.client import connect

from metrics.traffic import MIRROR_REQUESTS
from proxy.exchange.mirror import Mirror
from proxy.process.server import Server
from proxy.testing.upstream import (
    ReceivedRequest,
    Reply,
    ScriptedUpstream,
    make_reply,
    start_upstream,
)
from tests.support.gateway import GatewayFactory, base_url

pytestmark = pytest.mark.socket

RESULTS = ("sent", "failed", "dropped", "too_large")


class Shadow:
    """A shadow upstream: `mode` held (answers 200 once `release()` is called), failing
    (500) or ok (204). `arrived(n)` waits until n copies have arrived."""

    def __init__(self, upstream: ScriptedUpstream, mode: str) -> None:
        self.upstream = upstream
        self.mode = mode
        self.received: list[ReceivedRequest] = []
        self._released = asyncio.Event()
        self._arrival = asyncio.Condition()
        upstream.on().call(self._answer)

    @property
    def url(self) -> str:
        return self.upstream.url

    def release(self) -> None:
        self._released.set()

    async def arrived(self, count: int) -> list[ReceivedRequest]:
        async with asyncio.timeout(10), self._arrival:  # (a bound on a hang, not a pace)
            await self._arrival.wait_for(lambda: len(self.received) >= count)
        return self.received

    async def _answer(self, request: ReceivedRequest) -> Reply:
        async with self._arrival:
            self.received.append(request)
            self._arrival.notify_all()
        if self.mode == "held":
            await self._released.wait()
            return make_reply(200, body="shadow")
        if self.mode == "failing":
            return make_reply(500, body="shadow failed")
        return make_reply(204)


def mirror_config(primary: ScriptedUpstream, shadow_url: str, shadow_protocol: str) -> str:
    """Routes /m (mirrored), /s (mirrored, bodies streamed), /b (at most 2 copies in
    flight), /p (30 percent) and /plain (no mirror), each stripping its prefix, so the
    primary sees the same requests from all of them."""
    return f"""
listeners:
  - bind: 127.0.0.1:0
upstreams:
  app: {{endpoints: [{primary.url}]}}
  shadow: {{endpoints: [{shadow_url}], protocol: {shadow_protocol}}}
routes:
  - name: m
    match: {{path_prefix: /m/}}
    upstream: app
    rewrite: {{strip_prefix: /m}}
    mirror: {{upstream: shadow, max_body: 1KiB}}
  - name: s
    match: {{path_prefix: /s/}}
    upstream: app
    rewrite: {{strip_prefix: /s}}
    request_buffering: false
    mirror: {{upstream: shadow, max_body: 1KiB}}
  - name: b
    match: {{path_prefix: /b/}}
    upstream: app
    rewrite: {{strip_prefix: /b}}
    mirror: {{upstream: shadow, max_in_flight: 2}}
  - name: p
    match: {{path_prefix: /p/}}
    upstream: app
    rewrite: {{strip_prefix: /p}}
    mirror: {{upstream: shadow, percent: 30}}
  - name: plain
    match: {{path_prefix: /plain/}}
    upstream: app
    rewrite: {{strip_prefix: /plain}}
"""


@pytest.fixture
async def primary() -> AsyncIterator[ScriptedUpstream]:
    upstream = await start_upstream("primary")
    upstream.reply(201, body="primary", headers={"X-Primary": "1", "Cache-Control": "no-store"})
    yield upstream
    await upstream.stop()


@pytest.fixture(params=["http1", "h2c"])
def shadow_protocol(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(params=["1.1", "2"])
def client_http2(request: pytest.FixtureRequest) -> bool:
    return bool(request.param == "2")


ShadowFactory = Callable[[str], Awaitable[Shadow]]


@pytest.fixture
async def shadow_factory(shadow_protocol: str) -> AsyncIterator[ShadowFactory]:
    started: list[ScriptedUpstream] = []

    async def start(mode: str) -> Shadow:
        upstream = await start_upstream("shadow", protocol=shadow_protocol)
        started.append(upstream)
        return Shadow(upstream, mode)

    yield start
    for upstream in started:
        await upstream.stop()


def closed_port_url() -> str:
    """The URL of a port nothing listens on (connections are refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def counts(route: str) -> dict[str, float]:
    return {result: MIRROR_REQUESTS.labels(route, result).value for result in RESULTS}


def added(before: dict[str, float], route: str) -> dict[str, float]:
    after = counts(route)
    return {
        result: after[result] - before[result]
        for result in RESULTS
        if after[result] != before[result]
    }


def mirror_of(gateway: Server, route: str) -> Mirror:
    forwarder = gateway.runtime.routes[route].forwarder
    assert forwarder is not None
    assert forwarder.mirror is not None
    return forwarder.mirror


async def copies_done(gateway: Server, route: str) -> None:
    """Wait for the copies the route has out (they end within the mirror's timeout)."""
    mirror = mirror_of(gateway, route)
    await asyncio.gather(*list(mirror.tasks))
    assert mirror.in_flight == 0


Seen = tuple[int, bytes, list[tuple[str, str]]]


def seen(response: httpx.Response) -> Seen:
    """What the client got, but the Date (which the reference is not sent at)."""
    headers = [(name, value) for name, value in response.headers.multi_items() if name != "date"]
    return response.status_code, response.content, headers


async def both(
    http: httpx.AsyncClient, gateway: Server, route: str, body: bytes | None
) -> tuple[Seen, Seen]:
    """The answer through `route` and through /plain, for the same request."""
    answers: list[Seen] = []
    for prefix in (route, "plain"):
        url = f"{base_url(gateway)}/{prefix}/thing?q=1"
        if body is None:
            answers.append(seen(await http.get(url, headers={"X-Client": "c"})))
        else:
            answers.append(seen(await http.post(url, content=body, headers={"X-Client": "c"})))
    return answers[0], answers[1]


@pytest.mark.parametrize("mode", ["held", "failing", "dead"])
async def test_the_primary_answers_the_same_whatever_the_shadow_does(
    gateway_factory: GatewayFactory,
    primary: ScriptedUpstream,
    shadow_factory: ShadowFactory,
    shadow_protocol: str,
    client_http2: bool,
    mode: str,
) -> None:
    shadow = None if mode == "dead" else await shadow_factory(mode)
    url = shadow.url if shadow is not None else closed_port_url()
    gateway = await gateway_factory(mirror_config(primary, url, shadow_protocol))
    before = counts("m")
    async with httpx.AsyncClient(http1=not client_http2, http2=client_http2, timeout=10) as http:
        for body in (None, b"a body"):
            mirrored, reference = await both(http, gateway, "m", body)
            assert mirrored == reference
            assert mirrored[0] == 201
            assert mirrored[1] == b"primary"
    if shadow is not None:
        # Every copy reached the shadow; a held shadow answered none of them, yet every
        # primary answer above came back.
        copies = await shadow.arrived(2)
        assert [copy.method for copy in copies] == ["GET", "POST"]
        shadow.release()
    await copies_done(gateway, "m")
    expected = {"held": "sent", "failing": "sent", "dead": "failed"}[mode]
    assert added(before, "m") == {expected: 2.0}
    # The primary got each request once, without the mark.
    assert len(primary.requests) == 4
    assert all("x-gatehouse-mirror" not in request.headers for request in primary.requests)


async def chunks(data: bytes, size: int) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


@pytest.mark.parametrize("route", ["m", "s"])
async def test_the_copy_is_the_request_marked_as_a_mirror(
    gateway_factory: GatewayFactory,
    primary: ScriptedUpstream,
    shadow_factory: ShadowFactory,
    shadow_protocol: str,
    client_http2: bool,
    route: str,
) -> None:
    shadow: Shadow = await shadow_factory("ok")
    gateway = await gateway_factory(mirror_config(primary, shadow.url, shadow_protocol))
    body = bytes(range(256)) * 3  # 768 bytes, within max_body
    async with httpx.AsyncClient(http1=not client_http2, http2=client_http2, timeout=10) as http:
        # On /s the body streams (no Content-Length, request_buffering off): the copy is
        # taken as the primary's connection reads it.
        content = chunks(body, 100) if route == "s" else body
        response = await http.put(
            f"{base_url(gateway)}/{route}/items/7?x=y",
            content=content,
            headers={"X-Client": "c", "X-Gatehouse-Mirror": "forged"},
        )
        assert response.status_code == 201
        (copy,) = await shadow.arrived(1)
    sent = primary.last
    assert (copy.method, copy.target, copy.body) == ("PUT", "/items/7?x=y", body)
    assert (sent.method, sent.target, sent.body) == ("PUT", "/items/7?x=y", body)
    assert copy.headers.getall("x-gatehouse-mirror") == ["1"]
    assert sent.headers.getall("x-gatehouse-mirror") == ["forged"]  # (the client's own)
    assert copy.headers["x-client"] == "c"
    if shadow_protocol == "http1":  # (h2c carries it as :authority, not recorded)
        assert copy.headers["host"] == sent.headers["host"]
    await copies_done(gateway, route)


@pytest.mark.parametrize("route", ["m", "s"])
async def test_a_body_over_max_body_is_not_copied(
    gateway_factory: GatewayFactory,
    primary: ScriptedUpstream,
    shadow_factory: ShadowFactory,
    shadow_protocol: str,
    route: str,
) -> None:
    shadow: Shadow = await shadow_factory("ok")
    gateway = await gateway_factory(mirror_config(primary, shadow.url, shadow_protocol))
    before = counts(route)
    large = b"x" * 2048
    async with httpx.AsyncClient(timeout=10) as http:
        url = f"{base_url(gateway)}/{route}/up"
        # Said by its Content-Length, then (on /s) found while it streams.
        for content in (large, chunks(large, 512)):
            response = await http.post(url, content=content)
            assert response.status_code == 201
        assert primary.requests[-1].body == large
        # A small one after them is copied, and is the only copy.
        assert (await http.post(url, content=b"small")).status_code == 201
        (copy,) = await shadow.arrived(1)
    assert copy.body == b"small"
    await copies_done(gateway, route)
    assert added(before, route) == {"too_large": 2.0, "sent": 1.0}
    assert len(shadow.received) == 1


async def test_copies_beyond_max_in_flight_are_dropped(
    gateway_factory: GatewayFactory,
    primary: ScriptedUpstream,
    shadow_factory: ShadowFactory,
    shadow_protocol: str,
    client_http2: bool,
) -> None:
    shadow: Shadow = await shadow_factory("held")
    gateway = await gateway_factory(mirror_config(primary, shadow.url, shadow_protocol))
    before = counts("b")
    async with httpx.AsyncClient(http1=not client_http2, http2=client_http2, timeout=10) as http:
        for n in range(5):
            response = await http.get(f"{base_url(gateway)}/b/{n}")
            assert response.status_code == 201
        # The first two copies are held by the shadow, so the other three were dropped.
        await shadow.arrived(2)
        assert mirror_of(gateway, "b").in_flight == 2
        assert added(before, "b") == {"dropped": 3.0}
        shadow.release()
        await copies_done(gateway, "b")
        # Room again: the next copy goes out.
        assert (await http.get(f"{base_url(gateway)}/b/again")).status_code == 201
        await shadow.arrived(3)
    await copies_done(gateway, "b")
    assert sorted(copy.target for copy in shadow.received) == ["/0", "/1", "/again"]
    assert added(before, "b") == {"dropped": 3.0, "sent": 3.0}


async def test_percent_copies_that_share_evenly(
    gateway_factory: GatewayFactory,
    primary: ScriptedUpstream,
    shadow_factory: ShadowFactory,
    shadow_protocol: str,
) -> None:
    shadow: Shadow = await shadow_factory("ok")
    gateway = await gateway_factory(mirror_config(primary, shadow.url, shadow_protocol))
    async with httpx.AsyncClient(timeout=10) as http:
        for n in range(10):
            assert (await http.get(f"{base_url(gateway)}/p/{n}")).status_code == 201
    copies = await shadow.arrived(3)
    await copies_done(gateway, "p")
    assert sorted(copy.target for copy in copies) == ["/3", "/6", "/9"]
    assert len(shadow.received) == 3


async def test_a_websocket_upgrade_is_never_copied(
    gateway_factory: GatewayFactory,
    shadow_factory: ShadowFactory,
    shadow_protocol: str,
) -> None:
    tunnelled = await start_upstream("ws", websocket=True)
    try:
        shadow = await shadow_factory("ok")
        gateway = await gateway_factory(mirror_config(tunnelled, shadow.url, shadow_protocol))
        before = counts("m")
        host, port = gateway.addresses[0]
        async with connect(f"ws://{host}:{port}/m/chat") as socket_:
            await socket_.send("hello")
            assert await socket_.recv() == "hello"
        # An ordinary request after it is copied, and is the only copy.
        async with httpx.AsyncClient(timeout=10) as http:
            assert (await http.get(f"{base_url(gateway)}/m/after")).status_code == 200
        (copy,) = await shadow.arrived(1)
        await copies_done(gateway, "m")
        assert copy.target == "/after"
        assert len(shadow.received) == 1
        assert added(before, "m") == {"sent": 1.0}
    finally:
        await tunnelled.stop()
