"""Retries through real sockets: another endpoint after a connect failure (any method),
502/503/504 for idempotent requests only, the body limit, the per-try timeout, the
back-off, the budget that caps amplification, and an endpoint killed under load."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from dataclasses import dataclass, field

import httpx
import pytest

from metrics.traffic import UPSTREAM_REQUESTS, UPSTREAM_RETRIES, UPSTREAM_RETRY_BUDGET_EXHAUSTED
from proxy.testing import start_upstream
from tests.support.gateway import GatewayFactory, H1UpstreamFactory, base_url
from tests.support.h2_client import H2Client
from tests.support.helpers import RawClient, eventually
from tests.support.upstreams import H2UpstreamServer

pytestmark = pytest.mark.socket


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


class Gate:
    """Holds the requests that reach the upstreams sharing it until the test opens it, so
    the test knows what is in flight at each step instead of guessing from timing."""

    def __init__(self) -> None:
        self._waiting: list[asyncio.Future[bool]] = []

    @property
    def held(self) -> int:
        return len(self._waiting)

    async def wait(self) -> bool:
        """Until the gate opens (True) or closes (False: leave unanswered)."""
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._waiting.append(future)
        return await future

    def open(self) -> int:
        """Let every held request be answered; how many there were."""
        return self._end(True)

    def close(self) -> None:
        """Let the held requests' handlers end unanswered (at the end of a test)."""
        self._end(False)

    def _end(self, opened: bool) -> int:
        waiting, self._waiting = self._waiting, []
        for future in waiting:
            if not future.done():
                future.set_result(opened)
        return len(waiting)


@dataclass
class StatusServer:
    """An HTTP/1.1 upstream answering every request with `status` (keep-alive), once
    `gate` lets it through (never, for a gate the test does not open), recording when
    each request arrived."""

    status: int = 503
    gate: Gate | None = None
    hits: list[float] = field(default_factory=list)
    port: int = 0
    _server: asyncio.Server | None = None
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)

    async def start(self) -> StatusServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def stop(self) -> None:
        if self.gate is not None:
            self.gate.close()
        if self._server is not None:
            self._server.close()
            for writer in list(self._writers):
                writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                if length:
                    await reader.readexactly(length)
                self.hits.append(time.monotonic())
                if self.gate is not None and not await self.gate.wait():
                    return
                body = f"status {self.status}".encode()
                writer.write(
                    f"HTTP/1.1 {self.status} X\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                    + body
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()


@pytest.fixture
async def status_servers() -> contextlib.AsyncExitStack:  # type: ignore[misc]
    async with contextlib.AsyncExitStack() as stack:
        yield stack


async def status_server(stack: contextlib.AsyncExitStack, **options: object) -> StatusServer:
    server = await StatusServer(**options).start()  # type: ignore[arg-type]
    stack.push_async_callback(server.stop)
    return server


def config(endpoints: list[str], retries: str, *, outlier: bool = False) -> str:
    """One upstream `app` over `endpoints`; passive ejection off unless asked, so each
    test sees its retries alone."""
    return f"""
listeners:
  - bind: 127.0.0.1:0
upstreams:
  app:
    endpoints: [{", ".join(endpoints)}]
    retries: {retries}
    {"" if outlier else "outlier: false"}
routes:
  - name: all
    match: {{path_prefix: /}}
    upstream: app
"""


def retries_counted(reason: str) -> float:
    return UPSTREAM_RETRIES.labels("app", reason).value


class AttemptsCounted:
    """`gatehouse_upstream_requests_total` of upstream app's endpoint at `endpoint_url`, by
    code, since this was made. The counter is process-wide and keyed by host:port, and an
    earlier test's upstream may have had the same ephemeral port: so each test counts from
    its own start, never from zero."""

    def __init__(self, endpoint_url: str) -> None:
        self.endpoint = endpoint_url.removeprefix("http://")
        self.start = {code: self.total(code) for code in ("timeout", "client_abort")}

    def total(self, code: str) -> float:
        return UPSTREAM_REQUESTS.labels("app", self.endpoint, code).value

    def __call__(self, code: str) -> float:
        return self.total(code) - self.start[code]


async def test_connect_failure_is_retried_on_the_other_endpoint_for_any_method(
    gateway_factory: GatewayFactory, h1_upstream_factory: H1UpstreamFactory
) -> None:
    live = await h1_upstream_factory()
    dead = f"http://127.0.0.1:{closed_port()}"
    server = await gateway_factory(config([dead, live.url], "{attempts: 2}"))
    before = retries_counted("connect-failure")
    async with httpx.AsyncClient(base_url=base_url(server), timeout=5) as client:
        for _ in range(4):
            assert (await client.get("/echo/get")).status_code == 200
            # Nothing reached the dead endpoint: a POST is as safe to send again.
            response = await client.post("/echo/post", content=b"payload")
            assert response.status_code == 200
            assert response.json()["body"] == "payload"
    assert len(live.requests) == 8
    assert retries_counted("connect-failure") - before >= 2


async def test_refused_streams_go_to_the_other_http2_endpoint_even_for_post(
    gateway_factory: GatewayFactory,
) -> None:
    # The first endpoint refuses its first two streams: the h2 pool's own retry on a fresh
    # connection is refused too, and the forwarder's retry goes to the other endpoint.
    refusing = await H2UpstreamServer(refuse_streams=2).start()
    live = await H2UpstreamServer().start()
    try:
        yaml = config([refusing.url, live.url], "{attempts: 2}").replace(
            "    outlier: false", "    outlier: false\n    protocol: h2c"
        )
        server = await gateway_factory(yaml)
        before = retries_counted("refused-stream")
        async with httpx.AsyncClient(base_url=base_url(server), timeout=5) as client:
            response = await client.post("/echo/x", content=b"never processed")
        assert response.status_code == 200
        assert response.json()["body"] == "never processed"
        assert refusing.refused == 2
        assert len(live.requests) == 1
        assert retries_counted("refused-stream") - before == 1
    finally:
        await refusing.stop()
        await live.stop()


async def test_503_is_retried_for_get_but_not_for_post(
    gateway_factory: GatewayFactory, status_servers: contextlib.AsyncExitStack
) -> None:
    first = await status_server(status_servers, status=503)
    second = await status_server(status_servers, status=503)
    server = await gateway_factory(
        config([first.url, second.url], "{attempts: 2, on: [503], backoff: {base: 1ms}}")
    )
    async with httpx.AsyncClient(base_url=base_url(server), timeout=5) as client:
        response = await client.get("/x")
        assert response.status_code == 503  # the last try's answer, passed on
        assert response.text == "status 503"
        assert (len(first.hits), len(second.hits)) == (1, 1)  # one each: another endpoint
        assert (await client.post("/x", content=b"once")).status_code == 503
    assert len(first.hits) + len(second.hits) == 3  # the POST was sent once


async def test_503_then_success_on_the_other_endpoint(
    gateway_factory: GatewayFactory,
    status_servers: contextlib.AsyncExitStack,
    h1_upstream_factory: H1UpstreamFactory,
) -> None:
    failing = await status_server(status_servers, status=503)
    live = await h1_upstream_factory()
    server = await gateway_factory(
        config([failing.url, live.url], "{attempts: 2, on: [502, 503], backoff: {base: 1ms}}")
    )
    async with await RawClient.connect(server.addresses[0]) as client:
        for _ in range(4):
            await client.send(b"PUT /echo/put HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n\r\nabc")
            response = await client.response()
            assert response.status == 200
            assert b'"body": "abc"' in response.body or b'"body":"abc"' in response.body
    assert len(failing.hits) >= 1
    assert len(live.requests) == 4


async def test_a_body_over_body_limit_is_not_retried(
    gateway_factory: GatewayFactory, status_servers: contextlib.AsyncExitStack
) -> None:
    first = await status_server(status_servers, status=503)
    second = await status_server(status_servers, status=503)
    retries = "{attempts: 2, on: [503], body_limit: 1KiB, backoff: {base: 1ms}}"
    server = await gateway_factory(config([first.url, second.url], retries))
    async with httpx.AsyncClient(base_url=base_url(server), timeout=5) as client:
        assert (await client.put("/x", content=b"s" * 1024)).status_code == 503
        assert len(first.hits) + len(second.hits) == 2  # within the limit: retried
        assert (await client.put("/x", content=b"l" * 1025)).status_code == 503
        assert len(first.hits) + len(second.hits) == 3  # over it: sent once


async def test_per_try_timeout_then_success_on_the_other_endpoint(
    gateway_factory: GatewayFactory,
    status_servers: contextlib.AsyncExitStack,
    h1_upstream_factory: H1UpstreamFactory,
) -> None:
    # The slow endpoint never answers: an answer at all means its try was cut.
    slow = await status_server(status_servers, status=200, gate=Gate())
    live = await h1_upstream_factory()
    retries = "{attempts: 2, on: [timeout], per_try_timeout: 100ms, backoff: {base: 1ms}}"
    server = await gateway_factory(config([slow.url, live.url], retries))
    before = retries_counted("timeout")
    async with httpx.AsyncClient(base_url=base_url(server), timeout=20) as client:
        for _ in range(4):
            response = await client.get("/echo/x")
            assert response.status_code == 200
            assert response.json()["target"] == "/echo/x"  # the live endpoint's echo
    assert len(live.requests) == 4
    assert len(slow.hits) >= 1
    assert retries_counted("timeout") - before == len(slow.hits)


async def test_per_try_timeout_on_the_last_try_is_a_504(
    gateway_factory: GatewayFactory, status_servers: contextlib.AsyncExitStack
) -> None:
    # Neither endpoint ever answers: only the per-try timer can end the tries.
    silent = Gate()
    first = await status_server(status_servers, status=200, gate=silent)
    second = await status_server(status_servers, status=200, gate=silent)
    retries = "{attempts: 2, on: [timeout], per_try_timeout: 100ms, backoff: {base: 1ms}}"
    counts = [AttemptsCounted(slow.url) for slow in (first, second)]
    server = await gateway_factory(config([first.url, second.url], retries))
    started = time.monotonic()
    async with httpx.AsyncClient(base_url=base_url(server), timeout=20) as client:
        response = await client.get("/x")
    assert response.status_code == 504
    assert response.json()["error"] == "upstream_timeout"
    # After both 100 ms tries (less uvloop's millisecond clock rounding, once per try);
    # no upper bound: how much later a busy machine answers is not the point.
    assert time.monotonic() - started >= 0.2 - 0.002 * 2
    assert (len(first.hits), len(second.hits)) == (1, 1)
    # Each cut try is counted as a timeout of its endpoint, not as the client leaving.
    for counted in counts:
        assert counted("timeout") == 1
        assert counted("client_abort") == 0


async def test_per_try_timeout_cuts_an_h2c_try_and_counts_it_as_a_timeout(
    gateway_factory: GatewayFactory, status_servers: contextlib.AsyncExitStack
) -> None:
    slow = await start_upstream("slow", protocol="h2c")
    status_servers.push_async_callback(slow.stop)
    counted = AttemptsCounted(slow.url)
    slow.reply(200, delay=120.0)  # never within the test: only the timer ends its tries
    fast = await start_upstream("fast", protocol="h2c")
    status_servers.push_async_callback(fast.stop)
    retries = "{attempts: 2, on: [timeout], per_try_timeout: 100ms, backoff: {base: 1ms}}"
    text = config([slow.url, fast.url], retries).replace(
        "    retries:", "    protocol: h2c\n    retries:"
    )
    server = await gateway_factory(text)
    async with httpx.AsyncClient(base_url=base_url(server), timeout=20) as client:
        answers = [(await client.get(f"/{n}")).status_code for n in range(4)]
    assert answers == [200] * 4
    assert len(fast.requests) == 4
    assert slow.requests  # the slow endpoint got its tries, each cut
    assert counted("timeout") == len(slow.requests)
    assert counted("client_abort") == 0


async def test_a_client_leaving_during_a_timed_try_is_a_client_abort(
    gateway_factory: GatewayFactory, status_servers: contextlib.AsyncExitStack
) -> None:
    # The try is timed, but its timer never fires within the test: the client's reset is
    # the only thing that ends it, however slowly a busy machine gets there.
    slow = await status_server(status_servers, status=200, gate=Gate())
    counted = AttemptsCounted(slow.url)
    retries = "{attempts: 2, on: [timeout], per_try_timeout: 120s}"
    server = await gateway_factory(config([slow.url], retries))
    async with await H2Client.connect(*server.addresses[0]) as client:
        stream_id = client.send_request("/x")
        await client.flush()
        await eventually(lambda: len(slow.hits) == 1, "the try to reach the upstream")
        client.conn.reset_stream(stream_id)  # the client gives up (RST_STREAM CANCEL)
        await client.flush()
        await eventually(lambda: counted("client_abort") == 1, "the abort to be counted")
    assert counted("timeout") == 0


async def test_backoff_waits_a_jittered_time_before_each_retry(
    gateway_factory: GatewayFactory, status_servers: contextlib.AsyncExitStack
) -> None:
    first = await status_server(status_servers, status=503)
    second = await status_server(status_servers, status=503)
    retries = "{attempts: 3, on: [503], backoff: {base: 100ms, max: 100ms}}"
    server = await gateway_factory(config([first.url, second.url], retries))
    async with httpx.AsyncClient(base_url=base_url(server), timeout=5) as client:
        for _ in range(5):
            assert (await client.get("/x")).status_code == 503
    hits = sorted(first.hits + second.hits)
    assert len(hits) == 15
    gaps = [hits[i + 1] - hits[i] for i in range(0, 15, 3) for i in (i, i + 1)]
    # Each wait is uniform in [0, 100 ms]: ten of them sum to 0.5 s on average, and
    # less than 0.15 s with odds of about 1e-5 (a busy machine only adds to a gap). The
    # ceiling is pinned by test_retry.py with an injected jitter; here a wait is of its
    # order, not seconds (the bound leaves a busy machine's round trips room).
    assert sum(gaps) > 0.15
    assert max(gaps) < 2.0
    assert len({round(gap, 3) for gap in gaps}) > 1  # jittered, not a fixed delay


async def test_the_budget_caps_amplification_when_every_endpoint_fails(
    gateway_factory: GatewayFactory, status_servers: contextlib.AsyncExitStack
) -> None:
    # The upstreams hold every try until the test opens the gate, one wave at a time:
    # each wave is opened once every request is either answered or held (none in a
    # back-off or on the wire), so what is in flight when each try fails is known, and
    # so is the budget, whatever the machine's load.
    gate = Gate()
    first = await status_server(status_servers, status=503, gate=gate)
    second = await status_server(status_servers, status=503, gate=gate)
    retries = "{attempts: 5, on: [503], backoff: {base: 10ms, max: 50ms}}"
    server = await gateway_factory(config([first.url, second.url], retries))
    exhausted = UPSTREAM_RETRY_BUDGET_EXHAUSTED.labels("app")
    refused_before = exhausted.value
    clients = 50
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    responses: list[httpx.Response] = []
    waves: list[int] = []
    async with httpx.AsyncClient(base_url=base_url(server), timeout=20, limits=limits) as client:

        async def get(n: int) -> None:
            responses.append(await client.get(f"/x/{n}"))

        async with asyncio.TaskGroup() as group:
            for n in range(clients):
                group.create_task(get(n))
            while True:
                await eventually(
                    lambda: gate.held + len(responses) == clients,
                    "every request answered or held by an upstream",
                    within_s=20,
                )
                if not gate.held:
                    break
                waves.append(gate.open())
    assert all(response.status_code == 503 for response in responses)
    # Retries in flight stay under max(budget_min 3, budget_percent 20% of the requests in
    # flight). The 50 first tries fail together: 10 retries (20% of 50), 40 refused and
    # answered. Those 10 fail with 10 requests in flight (20% is 2): the minimum of 3 goes
    # on, 7 are refused; the 3 then go through their 5 attempts. Without the budget every
    # request would be tried 5 times: [50, 50, 50, 50, 50].
    assert waves == [50, 10, 3, 3, 3]
    assert len(first.hits) + len(second.hits) == sum(waves)
    assert exhausted.value - refused_before == 40 + 7


async def test_killing_one_of_three_endpoints_under_load_loses_no_idempotent_request(
    gateway_factory: GatewayFactory, h1_upstream_factory: H1UpstreamFactory
) -> None:
    servers = [await h1_upstream_factory() for _ in range(3)]
    # The default budget: the requests caught on the dying endpoint are retried (those
    # refused a connection are not held to the budget, proxy/exchange/retry.py).
    retries = "{attempts: 3, on: [connect-failure, reset, 502, 503]}"
    server = await gateway_factory(
        config([s.url for s in servers], retries, outlier=True)  # as deployed
    )
    outcomes: list[int] = []
    stop = asyncio.Event()

    async def client_loop(n: int) -> None:
        async with httpx.AsyncClient(base_url=base_url(server), timeout=5) as client:
            while not stop.is_set():
                try:
                    status = (await client.get(f"/echo/{n}")).status_code
                except httpx.HTTPError:
                    status = 0
                outcomes.append(status)

    async with asyncio.TaskGroup() as group:
        for n in range(4):
            group.create_task(client_loop(n))
        # Killed once it has had its share, and watched for 100 answers after: counted in
        # requests, not in seconds a busy machine may spend on fewer.
        await eventually(
            lambda: len(servers[0].requests) >= 20, "the endpoint to serve", within_s=20
        )
        await servers[0].stop()
        killed_at = len(outcomes)
        await eventually(
            lambda: len(outcomes) >= killed_at + 100, "100 answers after the kill", within_s=20
        )
        stop.set()
    assert [status for status in outcomes if status != 200] == []
    assert len(servers[1].requests) + len(servers[2].requests) > len(outcomes) // 2
