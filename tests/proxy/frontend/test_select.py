"""The PrefaceSniffer without sockets: on a plaintext listener it picks HTTP/2 (the
connection preface, RFC 9113 section 3.4) or HTTP/1.1 from the first bytes."""

from __future__ import annotations

import pytest

from proxy.config.model import ListenerConfig
from proxy.frontend.connection import ConnectionPhase
from proxy.frontend.h1 import Http1Protocol
from proxy.frontend.h2.conn import PREFACE
from proxy.frontend.h2.protocol import Http2Protocol
from proxy.frontend.select import PrefaceSniffer, plaintext_front_end
from tests.support.helpers import FakeServer, decode_responses
from tests.support.helpers import settle as settle_http1
from tests.support.http2_helpers import (
    H2Peer,
    H2RecordingConnection,
    settle,
)

SPLITS = [None, 1]


# ----------------------------------------------------------------------- PrefaceSniffer


def sniffer_connection(*, http2: bool = True) -> tuple[H2RecordingConnection, FakeServer]:
    server = FakeServer()
    listener = ListenerConfig(host="127.0.0.1", port=0, name="test", http2=http2)
    conn = H2RecordingConnection(server, listener)
    conn.front_end = plaintext_front_end(conn)  # type: ignore[assignment]
    return conn, server


def front(conn: H2RecordingConnection) -> object:
    return conn.front_end


@pytest.mark.parametrize("pieces", [[6, 10, 8], [1] * 24, [23, 1], [24]])
async def test_preface_split_over_several_feeds_selects_http2(pieces: list[int]) -> None:
    conn, server = sniffer_connection()
    sniffer = front(conn)
    assert isinstance(sniffer, PrefaceSniffer)
    peer = H2Peer(sniffer, conn)  # type: ignore[arg-type]
    data = peer.h2.data_to_send()
    assert data.startswith(PREFACE)
    position = 0
    for size in pieces:
        assert front(conn) is sniffer
        sniffer.feed(data[position : position + size])
        position += size
    protocol = front(conn)
    assert isinstance(protocol, Http2Protocol)
    peer.protocol = protocol
    protocol.feed(data[position:])  # the client's SETTINGS
    peer.request(1, path=b"/h2")
    peer.send()
    await settle(protocol)
    peer.receive()
    assert peer.responses[1].status == 200
    assert peer.goaway is None
    assert server.requests[0].http_version == "2"


async def test_preface_and_frames_in_one_feed_select_http2() -> None:
    conn, server = sniffer_connection()
    sniffer = front(conn)
    assert isinstance(sniffer, PrefaceSniffer)
    peer = H2Peer(sniffer, conn)  # type: ignore[arg-type]
    peer.request(1)
    peer.send()  # preface, SETTINGS and the request: handed over whole
    protocol = front(conn)
    assert isinstance(protocol, Http2Protocol)
    await settle(protocol)
    peer.receive()
    assert peer.responses[1].status == 200
    assert server.requests[0].http_version == "2"


@pytest.mark.parametrize("split", [None, 1])
async def test_http11_request_selects_http1(split: int | None) -> None:
    conn, server = sniffer_connection()
    data = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"
    step = split or len(data)
    for start in range(0, len(data), step):
        front_end = front(conn)
        front_end.feed(data[start : start + step])  # type: ignore[attr-defined]
    protocol = front(conn)
    assert isinstance(protocol, Http1Protocol)
    await settle_http1(protocol)
    [response] = decode_responses(bytes(conn.output), ["GET"])
    assert response.status == 200
    assert server.requests[0].http_version == "1.1"


async def test_p_then_ost_selects_http1() -> None:
    conn, server = sniffer_connection()
    sniffer = front(conn)
    assert isinstance(sniffer, PrefaceSniffer)
    sniffer.feed(b"P")
    assert front(conn) is sniffer  # "P" could still be the preface
    assert repr(sniffer) == "<PrefaceSniffer buffered=1>"
    sniffer.feed(b"OST /p HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nok")
    protocol = front(conn)
    assert isinstance(protocol, Http1Protocol)
    await settle_http1(protocol)
    [response] = decode_responses(bytes(conn.output), ["POST"])
    assert response.status == 200
    assert response.json()["body"] == "ok"
    assert server.requests[0].method == "POST"


async def test_listener_without_http2_gets_http1_directly() -> None:
    conn, _server = sniffer_connection(http2=False)
    assert isinstance(front(conn), Http1Protocol)


async def test_sniffer_closes_on_eof_timeout_and_drain() -> None:
    for act in ("eof", "timeout", "drain"):
        conn, _server = sniffer_connection()
        sniffer = front(conn)
        assert isinstance(sniffer, PrefaceSniffer)
        sniffer.feed(b"PRI * HTTP")
        if act == "eof":
            sniffer.on_eof()
        elif act == "timeout":
            sniffer.on_timeout(ConnectionPhase.HEAD)
        else:
            sniffer.on_drain_request()
        assert conn.closed_by == "close", act
        assert not conn.output
