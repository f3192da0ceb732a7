"""The client socket (proxy/frontend/connection.py): who the client is, phases and their
deadlines as the sweeper acts on them, the reasons reading is paused for, drain-aware
writes, lingering close and the hand-over to a tunnel.

Each test accepts a real loopback connection into a `ClientConnection` of a real (not
started) `Server`, with the real HTTP/1.1 front end; the other end is a raw socket
(`RawClient`). The sweeper is not running: the tests call `expire` with the times they
want."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from proxy.config.load import parse_config
from proxy.frontend.connection import ClientConnection, ConnectionPhase, ReadPause
from proxy.frontend.h1 import Http1Protocol
from proxy.process.server import Server
from tests.support.helpers import RawClient, eventually

pytestmark = pytest.mark.socket

CONFIG = """
listeners: [{bind: 127.0.0.1:0}]
limits: {header_timeout: 10s, body_timeout: 20s, keepalive_timeout: 30s}
upstreams: {app: {endpoints: [http://127.0.0.1:9]}}
routes: [{name: api, match: {path_prefix: /api}, upstream: app}]
"""

Accept = Callable[..., Awaitable[tuple[ClientConnection, RawClient]]]


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    served = Server(parse_config(CONFIG))
    yield served
    await served.runtime.aclose()


@pytest.fixture
async def accept(server: Server) -> AsyncIterator[Accept]:
    """`await accept(peer=None, small_buffers=False)`: a connected (ClientConnection,
    RawClient) pair; both are closed at teardown."""
    loop = asyncio.get_running_loop()
    made: list[tuple[ClientConnection, RawClient]] = []

    async def connect(
        peer: tuple[str, int] | None = None, small_buffers: bool = False
    ) -> tuple[ClientConnection, RawClient]:
        with socket.create_server(("127.0.0.1", 0)) as listening:
            sock = socket.socket()
            sock.setblocking(False)
            if small_buffers:  # a client that does not read fills the buffers soon
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            await loop.sock_connect(sock, listening.getsockname())
            accepted, _ = listening.accept()
        if small_buffers:
            accepted.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        listener = server.config.listeners[0]
        _, conn = await loop.connect_accepted_socket(
            lambda: ClientConnection(server, listener, Http1Protocol, peer), accepted
        )
        pair = (conn, RawClient(sock))
        made.append(pair)
        return pair

    yield connect
    for conn, client in made:
        client.close()
        conn.abort()
    await asyncio.sleep(0.01)  # the aborted transports' connection_lost


def phase(conn: ClientConnection) -> ConnectionPhase:
    """The phase now (a function, so that mypy does not hold it to an earlier check)."""
    return conn.phase


def reading(conn: ClientConnection) -> bool:
    assert conn.transport is not None
    return bool(conn.transport.is_reading())


async def test_the_client_is_the_peer_unless_a_proxy_header_named_one(
    accept: Accept, server: Server
) -> None:
    conn, client = await accept()
    assert conn.client == client.sock.getsockname()
    assert conn.scheme == "http"
    assert conn in server.connections
    told, _ = await accept(peer=("203.0.113.7", 4711))
    assert told.client == ("203.0.113.7", 4711)


async def test_a_request_is_answered_and_the_connection_waits_idle_for_the_next(
    accept: Accept,
) -> None:
    conn, client = await accept()
    assert conn.phase is ConnectionPhase.HEAD
    await client.send(b"GET /nowhere HTTP/1.1\r\nHost: t\r\n\r\n")
    response = await client.response()
    assert response.status == 404  # no route: the front end and the runtime answered
    await eventually(lambda: conn.phase is ConnectionPhase.IDLE, "the keep-alive wait")
    assert conn.deadline == pytest.approx(asyncio.get_running_loop().time() + 30.0, abs=1.0)


async def test_a_client_closing_is_forgotten_by_the_server(accept: Accept, server: Server) -> None:
    conn, client = await accept()
    client.close()
    await eventually(lambda: conn.closed, "the connection to close")
    assert conn not in server.connections
    with pytest.raises(ConnectionResetError):
        await conn.drain()


async def test_the_front_end_times_out_a_head_once_its_deadline_passes(
    accept: Accept,
) -> None:
    conn, client = await accept()
    await client.send(b"GET /api HTTP/1.1\r\nHo")
    await eventually(lambda: conn.deadline > 0, "the head deadline")
    conn.expire(conn.deadline - 0.5)
    assert not await client.closed(wait_s=0.1)  # not yet: nothing sent, still open
    conn.expire(conn.deadline)
    response = await client.response()
    assert response.status == 408


async def test_each_piece_of_a_body_starts_the_body_deadline_again(accept: Accept) -> None:
    conn, client = await accept()
    # /api buffers request bodies (the default): the exchange waits for the whole body.
    await client.send(b"POST /api/x HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\nab")
    await eventually(lambda: conn.phase is ConnectionPhase.BODY, "the body wait")
    before = conn.deadline
    assert before == pytest.approx(conn.loop.time() + 20.0, abs=1.0)
    await asyncio.sleep(0.02)
    await client.send(b"cd")
    await eventually(lambda: conn.deadline > before, "the body deadline to start again")


async def test_the_sweeper_leaves_busy_and_body_paused_connections_alone(
    accept: Accept,
) -> None:
    conn, client = await accept()
    conn.set_phase(ConnectionPhase.BUSY)  # an exchange runs: upstream timeouts apply
    conn.expire(conn.loop.time() + 3600)
    conn.set_phase(ConnectionPhase.BODY)
    conn.pause_reading(ReadPause.BODY)  # we stopped reading: the client is not slow
    conn.expire(conn.deadline + 1)
    assert not await client.closed(wait_s=0.1)
    assert phase(conn) is ConnectionPhase.BODY
    before = conn.deadline
    await asyncio.sleep(0.01)
    conn.resume_reading(ReadPause.BODY)
    assert conn.deadline > before  # the wait was ours: the body deadline starts again


async def test_reading_resumes_when_no_reason_to_pause_is_left(accept: Accept) -> None:
    conn, _ = await accept()
    conn.pause_reading(ReadPause.BODY)
    conn.pause_reading(ReadPause.PIPELINE)
    assert not reading(conn)
    conn.resume_reading(ReadPause.BODY)
    assert not reading(conn)
    conn.resume_reading(ReadPause.BODY)  # a reason not held changes nothing
    assert not reading(conn)
    conn.resume_reading(ReadPause.PIPELINE)
    assert reading(conn)


async def test_a_client_that_does_not_read_stops_the_reading_and_makes_writers_wait(
    accept: Accept,
) -> None:
    conn, client = await accept(small_buffers=True)
    conn.set_phase(ConnectionPhase.BUSY)
    data = b"r" * (4 * 1024 * 1024)
    conn.write(data)
    assert conn.write_paused
    assert not reading(conn)  # no more requests parsed for a client that does not read
    first = asyncio.create_task(conn.drain())
    second = asyncio.create_task(conn.drain())  # writers share one wait
    await asyncio.sleep(0.01)
    assert not first.done()
    assert conn.phase is ConnectionPhase.WRITE
    assert await client.read_exactly(len(data)) == data
    await asyncio.wait_for(asyncio.gather(first, second), 10)
    assert phase(conn) is ConnectionPhase.BUSY
    assert reading(conn)


async def test_a_write_deadline_that_passes_aborts_the_connection(accept: Accept) -> None:
    conn, _ = await accept(small_buffers=True)
    conn.write(b"w" * (4 * 1024 * 1024))
    waiting = asyncio.create_task(conn.drain())
    await eventually(lambda: conn.phase is ConnectionPhase.WRITE, "the write wait")
    conn.expire(conn.deadline)
    with pytest.raises(ConnectionResetError):
        await asyncio.wait_for(waiting, 10)
    assert conn.closed


async def test_a_lingering_close_sends_the_answer_and_drops_what_still_comes(
    accept: Accept, caplog: pytest.LogCaptureFixture
) -> None:
    conn, client = await accept()
    conn.write(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 0\r\n\r\n")
    conn.close_lingering()
    assert conn.phase is ConnectionPhase.LINGER
    assert conn.deadline == pytest.approx(conn.loop.time() + 5.0, abs=1.0)
    response = await client.response()
    assert response.status == 413
    # The rest of an upload, even a request: read and dropped, never answered.
    await client.send(b"x" * 1000 + b"\r\n\r\nGET /nowhere HTTP/1.1\r\nHost: t\r\n\r\n")
    conn.set_phase(ConnectionPhase.HEAD)  # a lingering connection stays lingering
    assert phase(conn) is ConnectionPhase.LINGER
    client.shutdown_write()  # the client is done: the connection closes
    assert await client.read_until_closed() == b""  # nothing after the 413
    await eventually(lambda: conn.closed, "the lingering connection to close")
    assert [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] == []


async def test_a_lingering_connection_past_its_deadline_is_aborted(accept: Accept) -> None:
    conn, _ = await accept()
    conn.close_lingering()
    conn.expire(conn.deadline)
    await eventually(lambda: conn.closed, "the abort")


async def test_a_connection_handed_to_a_tunnel_is_no_longer_the_servers(
    accept: Accept, server: Server
) -> None:
    conn, client = await accept()
    conn.hand_over()
    assert conn.closed
    assert conn.front_end is None
    assert conn not in server.connections
    conn.expire(conn.loop.time() + 3600)  # the sweeper no longer acts on it
    assert not await client.closed(wait_s=0.1)
