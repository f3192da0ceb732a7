"""Reading a ClientHello ahead of the handshake (proxy/frontend/client_hello.py): real
ClientHellos from Python's own TLS client (with and without SNI and ALPN, TLS 1.2 and
1.3), damaged ones, and peeking over a real socket, whole, in pieces and cut short."""

from __future__ import annotations

import asyncio
import socket
import ssl

import pytest

from proxy.frontend.client_hello import (
    ClientHello,
    parse_client_hello,
    peek_client_hello,
    record_length,
)

pytestmark = pytest.mark.socket


def client_hello(
    server_name: str | None, alpn: list[str] | None = None, maximum: ssl.TLSVersion | None = None
) -> bytes:
    """The first flight of Python's TLS client (OpenSSL's ClientHello, one record)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if alpn:
        context.set_alpn_protocols(alpn)
    if maximum is not None:
        context.maximum_version = maximum
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


@pytest.mark.parametrize("maximum", [None, ssl.TLSVersion.TLSv1_2])
def test_the_name_and_the_alpn_offer_are_read(maximum: ssl.TLSVersion | None) -> None:
    record = client_hello("Acme.Example.COM", ["acme-tls/1"], maximum)
    assert record_length(record) == len(record)
    assert parse_client_hello(record) == ClientHello("acme.example.com", ("acme-tls/1",))


def test_a_browser_like_offer_is_read_in_order() -> None:
    record = client_hello("www.example.com", ["h2", "http/1.1"])
    assert parse_client_hello(record) == ClientHello("www.example.com", ("h2", "http/1.1"))


def test_without_sni_or_alpn_both_are_empty() -> None:
    assert parse_client_hello(client_hello(None)) == ClientHello(None, ())


def test_a_trailing_dot_is_dropped_from_the_name() -> None:
    record = client_hello("a.example.com.", ["acme-tls/1"])
    assert parse_client_hello(record) == ClientHello("a.example.com", ("acme-tls/1",))


def test_what_is_not_a_whole_client_hello_is_none() -> None:
    record = client_hello("a.example.com", ["acme-tls/1"])
    assert parse_client_hello(record[:-1]) is None  # the record is cut short
    assert parse_client_hello(b"GET / HTTP/1.1\r\n\r\n") is None  # not TLS
    assert record_length(b"GET / HTTP/1.1\r\n") is None
    # A handshake message longer than its record: continued in the next one.
    longer = bytearray(record)
    longer[6:9] = (len(record)).to_bytes(3, "big")
    assert parse_client_hello(bytes(longer)) is None
    # Extensions claiming more bytes than the message holds (the lengths of the record
    # and the message made to fit what is left).
    damaged = bytearray(record[:-10])
    damaged[3:5] = (len(damaged) - 5).to_bytes(2, "big")
    damaged[6:9] = (len(damaged) - 9).to_bytes(3, "big")
    assert parse_client_hello(bytes(damaged)) is None
    # A record header announcing more than a TLS record may hold.
    assert record_length(b"\x16\x03\x01\x40\x01") is None


async def peeked(*pieces: bytes, close: bool = False) -> tuple[ClientHello | None, bytes]:
    """Send `pieces` one after the other (the next once the reader waits for more), then
    what `peek_client_hello` saw and what is still queued on the socket."""
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    try:
        loop = asyncio.get_running_loop()
        theirs.sendall(pieces[0])
        task = loop.create_task(peek_client_hello(ours))
        for piece in pieces[1:]:
            await asyncio.sleep(0)  # the reader is waiting on its low watermark
            assert not task.done()
            theirs.sendall(piece)
        if close:
            await asyncio.sleep(0)
            theirs.close()
        async with asyncio.timeout(5):
            hello = await task
        assert ours.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT) == 1
        return hello, ours.recv(65536)
    finally:
        ours.close()
        if not close:
            theirs.close()


async def test_a_peeked_client_hello_is_left_for_the_handshake() -> None:
    record = client_hello("a.example.com", ["acme-tls/1"])
    hello, queued = await peeked(record)
    assert hello == ClientHello("a.example.com", ("acme-tls/1",))
    assert queued == record


async def test_a_client_hello_in_pieces_is_waited_for() -> None:
    record = client_hello("a.example.com", ["acme-tls/1"])
    hello, queued = await peeked(record[:3], record[3:40], record[40:])
    assert hello == ClientHello("a.example.com", ("acme-tls/1",))
    assert queued == record


async def test_a_peer_that_closes_half_way_is_none() -> None:
    record = client_hello("a.example.com", ["acme-tls/1"])
    hello, queued = await peeked(record[:40], close=True)
    assert hello is None
    assert queued == record[:40]


async def test_plaintext_is_none_at_once() -> None:
    hello, queued = await peeked(b"GET / HTTP/1.1\r\n\r\n")
    assert hello is None
    assert queued == b"GET / HTTP/1.1\r\n\r\n"
