"""A real gRPC service and client for tests, with no protoc: `grpc.aio` generic handlers
whose messages are raw bytes (no serializer), so every call is real gRPC over HTTP/2
(h2c, prior knowledge) without generated code.

Service `test.Echo`:

- Unary: answers the request.
- ServerStream: the request is `stream_request(count, delay_s)`; answers `count` messages
  (`message 0`, `message 1`, ...), sleeping `delay_s` before each.
- ClientStream: answers the requests joined together.
- Bidi: answers each request as it comes.
- FailAfter: sends as many messages as the request names (ASCII digits), then aborts with
  NOT_FOUND `no such thing`: the status travels in the trailers.
- FailAtOnce: aborts with PERMISSION_DENIED and a message that needs percent-encoding
  before sending anything: a trailers-only response.
- Metadata: sends initial metadata `x-initial: hello`, answers the request metadata it saw
  (as JSON), and ends with trailing metadata `x-trailer: bye` and a binary `x-trailer-bin`.

The grpc core server refuses a request without `te: trailers` (RFC 9113 8.2.2 lets only
that value through a proxy), so every successful call through the gateway also shows that
the gateway forwards it.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import grpc
import grpc.aio

from tests.support.tls import TlsFiles

SERVICE = "test.Echo"
NOT_FOUND_MESSAGE = "no such thing"
DENIED_MESSAGE = "go away: caf\u00e9 100% \u2713"  # grpc-message percent-encodes this
INITIAL_METADATA = (("x-initial", "hello"),)
TRAILER_BYTES = b"\x00\x01\xfe\xff"
TRAILING_METADATA = (("x-trailer", "bye"), ("x-trailer-bin", TRAILER_BYTES))
# No proxy from the environment (http_proxy) between a test and 127.0.0.1.
CHANNEL_OPTIONS = (("grpc.enable_http_proxy", 0),)

Metadata = Sequence[tuple[str, str | bytes]]


def stream_request(count: int, delay_s: float = 0.0) -> bytes:
    """The ServerStream request for `count` messages, each after `delay_s` seconds."""
    return f"{count} {delay_s}".encode()


def stream_message(index: int) -> bytes:
    """The `index`th message of a ServerStream answer."""
    return f"message {index}".encode()


# --- the service ----------------------------------------------------------------------------


async def _unary(request: bytes, context: Any) -> bytes:
    return request


async def _server_stream(request: bytes, context: Any) -> AsyncIterator[bytes]:
    count_text, _, delay_text = request.decode().partition(" ")
    delay_s = float(delay_text or 0)
    for index in range(int(count_text)):
        if delay_s:
            await asyncio.sleep(delay_s)
        yield stream_message(index)


async def _client_stream(requests: AsyncIterator[bytes], context: Any) -> bytes:
    return b"".join([message async for message in requests])


async def _bidi(requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
    async for message in requests:
        yield message


async def _fail_after(request: bytes, context: Any) -> AsyncIterator[bytes]:
    for index in range(int(request)):
        yield stream_message(index)
    await context.abort(grpc.StatusCode.NOT_FOUND, NOT_FOUND_MESSAGE)


async def _fail_at_once(request: bytes, context: Any) -> bytes:
    await context.abort(grpc.StatusCode.PERMISSION_DENIED, DENIED_MESSAGE)
    raise AssertionError("abort() returned")  # it raises


async def _metadata(request: bytes, context: Any) -> bytes:
    await context.send_initial_metadata(INITIAL_METADATA)
    seen: list[list[str]] = []
    for key, value in context.invocation_metadata():
        shown = base64.b64encode(value).decode() if isinstance(value, bytes) else value
        seen.append([key, shown])
    context.set_trailing_metadata(TRAILING_METADATA)
    return json.dumps(seen).encode()


def _echo_handler() -> Any:
    # No serializers: messages are the raw bytes of each gRPC length-prefixed frame.
    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Unary": grpc.unary_unary_rpc_method_handler(_unary),
            "ServerStream": grpc.unary_stream_rpc_method_handler(_server_stream),
            "ClientStream": grpc.stream_unary_rpc_method_handler(_client_stream),
            "Bidi": grpc.stream_stream_rpc_method_handler(_bidi),
            "FailAfter": grpc.unary_stream_rpc_method_handler(_fail_after),
            "FailAtOnce": grpc.unary_unary_rpc_method_handler(_fail_at_once),
            "Metadata": grpc.unary_unary_rpc_method_handler(_metadata),
        },
    )


@asynccontextmanager
async def echo_server(
    tls: TlsFiles | None = None, interceptors: Sequence[Any] = ()
) -> AsyncIterator[int]:
    """Serve `test.Echo` on 127.0.0.1 and yield its port: insecure (h2c with prior
    knowledge), or over TLS with `tls`' certificate; `interceptors` see every call. The
    server stops, cancelling open calls, on exit."""
    server = grpc.aio.server(interceptors=list(interceptors))
    server.add_generic_rpc_handlers((_echo_handler(),))
    if tls is None:
        port = int(server.add_insecure_port("127.0.0.1:0"))
    else:
        pair = (tls.key.read_bytes(), tls.cert.read_bytes())
        port = int(server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials([pair])))
    await server.start()
    try:
        yield port
    finally:
        await server.stop(grace=None)


# --- the client -----------------------------------------------------------------------------


@dataclass(frozen=True)
class MetadataAnswer:
    """What a Metadata call saw: the request metadata the server received, and the
    initial and trailing metadata the client received."""

    request: list[tuple[str, str]]  # binary values base64-encoded
    initial: list[tuple[str, str | bytes]]
    trailing: list[tuple[str, str | bytes]]


class EchoClient:
    """Calls `test.Echo` on one channel. Every call has a deadline of `timeout_s`."""

    def __init__(self, channel: Any, timeout_s: float = 10.0) -> None:
        self.channel = channel
        self.timeout_s = timeout_s

    def _method(self, kind: str, name: str) -> Any:
        # No (de)serializers: requests and answers are bytes as they are.
        return getattr(self.channel, kind)(f"/{SERVICE}/{name}")

    async def unary(self, message: bytes, metadata: Metadata = ()) -> bytes:
        """Unary: the server answers `message`."""
        call = self._method("unary_unary", "Unary")
        answer = await call(message, metadata=tuple(metadata), timeout=self.timeout_s)
        return bytes(answer)

    def server_stream_call(self, count: int, delay_s: float = 0.0) -> Any:
        """ServerStream, as the call object to iterate (`async for message in call`)."""
        call = self._method("unary_stream", "ServerStream")
        return call(stream_request(count, delay_s), timeout=self.timeout_s)

    async def server_stream(self, count: int, delay_s: float = 0.0) -> list[bytes]:
        """ServerStream: every message of `count`, `delay_s` apart."""
        return [bytes(message) async for message in self.server_stream_call(count, delay_s)]

    async def client_stream(self, messages: Iterable[bytes]) -> bytes:
        """ClientStream: the server's answer, `messages` joined together."""

        async def requests() -> AsyncIterator[bytes]:
            for message in messages:
                yield message

        call = self._method("stream_unary", "ClientStream")
        return bytes(await call(requests(), timeout=self.timeout_s))

    async def bidi(self, messages: Iterable[bytes]) -> list[bytes]:
        """Bidi, in lock step: each message is sent only after the previous answer came
        back, so both directions are open at once."""
        call = self._method("stream_stream", "Bidi")(timeout=self.timeout_s)
        answers: list[bytes] = []
        for message in messages:
            await call.write(message)
            answers.append(bytes(await call.read()))
        await call.done_writing()
        if await call.read() is not grpc.aio.EOF:
            raise AssertionError("Bidi answered more than it was sent")
        return answers

    async def fail_after(self, count: int) -> tuple[list[bytes], grpc.aio.AioRpcError]:
        """FailAfter: the messages received before the error, and the error."""
        call = self._method("unary_stream", "FailAfter")(
            str(count).encode(), timeout=self.timeout_s
        )
        received: list[bytes] = []
        try:
            async for message in call:
                received.append(bytes(message))
        except grpc.aio.AioRpcError as error:
            return received, error
        raise AssertionError(f"FailAfter ended without an error after {received!r}")

    async def fail_at_once(self) -> grpc.aio.AioRpcError:
        """FailAtOnce: the error (a trailers-only response)."""
        call = self._method("unary_unary", "FailAtOnce")
        try:
            await call(b"", timeout=self.timeout_s)
        except grpc.aio.AioRpcError as error:
            return error
        raise AssertionError("FailAtOnce succeeded")

    async def metadata(self, metadata: Metadata) -> MetadataAnswer:
        """Metadata: send `metadata`; see what each side received."""
        call = self._method("unary_unary", "Metadata")(
            b"", metadata=tuple(metadata), timeout=self.timeout_s
        )
        seen = json.loads(await call)
        return MetadataAnswer(
            request=[(str(key), str(value)) for key, value in seen],
            initial=[(key, value) for key, value in await call.initial_metadata()],
            trailing=[(key, value) for key, value in await call.trailing_metadata()],
        )


@asynccontextmanager
async def echo_client(
    target: str, timeout_s: float = 10.0, tls: TlsFiles | None = None
) -> AsyncIterator[EchoClient]:
    """An EchoClient on a channel to `target` (`127.0.0.1:PORT`), closed on exit:
    insecure (h2c), or TLS (h2 by ALPN) trusting `tls`' CA."""
    if tls is None:
        channel = grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)
    else:
        credentials = grpc.ssl_channel_credentials(root_certificates=tls.ca.read_bytes())
        channel = grpc.aio.secure_channel(target, credentials, options=CHANNEL_OPTIONS)
    async with channel:
        yield EchoClient(channel, timeout_s)


# --- checks, run both directly (tests/test_grpc_service.py) and through the gateway --------

LARGE_MESSAGE_BYTES = 1024 * 1024  # beyond every default HTTP/2 window: flow control works


async def check_unary(client: EchoClient) -> None:
    """A small and a 1 MiB unary call come back unchanged."""
    large = bytes(range(256)) * (LARGE_MESSAGE_BYTES // 256)
    assert await client.unary(b"hello") == b"hello"
    assert await client.unary(large) == large


async def check_server_stream(client: EchoClient) -> None:
    """A server stream delivers every message, in order."""
    assert await client.server_stream(100) == [stream_message(i) for i in range(100)]


async def check_client_stream(client: EchoClient) -> None:
    """A client stream's messages all reach the server."""
    messages = [b"a", b"bc", b"", b"d" * 100_000]
    assert await client.client_stream(messages) == b"".join(messages)


async def check_bidi(client: EchoClient) -> None:
    """Each bidi message is answered while the stream stays open both ways."""
    messages = [f"ping {i}".encode() for i in range(20)]
    assert await client.bidi(messages) == messages


async def check_error_in_trailers(client: EchoClient) -> None:
    """Messages, then a status that comes in the trailers (grpc-status, grpc-message)."""
    received, error = await client.fail_after(3)
    assert received == [stream_message(i) for i in range(3)]
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert error.details() == NOT_FOUND_MESSAGE


async def check_trailers_only(client: EchoClient) -> None:
    """A trailers-only response (status in the only HEADERS frame) keeps its status and
    its percent-encoded message."""
    error = await client.fail_at_once()
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error.details() == DENIED_MESSAGE


async def check_metadata(client: EchoClient) -> None:
    """Custom metadata (text and -bin) reaches the server; its initial and trailing
    metadata reach the client."""
    answer = await client.metadata([("x-custom", "v1"), ("x-custom-bin", b"\x00\xff")])
    assert ("x-custom", "v1") in answer.request
    assert ("x-custom-bin", base64.b64encode(b"\x00\xff").decode()) in answer.request
    assert set(INITIAL_METADATA) <= set(answer.initial)
    assert set(TRAILING_METADATA) <= set(answer.trailing)


async def check_concurrent_calls(client: EchoClient, calls: int = 64) -> None:
    """Many calls of every kind at once on one channel (one HTTP/2 connection)."""
    unary = [client.unary(f"call {i}".encode()) for i in range(calls)]
    streams = [client.server_stream(10) for _ in range(calls // 8)]
    bidis = [client.bidi([b"x", b"y"]) for _ in range(calls // 8)]
    answers, stream_answers, bidi_answers = await asyncio.gather(
        asyncio.gather(*unary), asyncio.gather(*streams), asyncio.gather(*bidis)
    )
    assert answers == [f"call {i}".encode() for i in range(calls)]
    assert stream_answers == [[stream_message(i) for i in range(10)]] * (calls // 8)
    assert bidi_answers == [[b"x", b"y"]] * (calls // 8)


async def check_long_server_stream(
    client: EchoClient, count: int = 30, delay_s: float = 0.1
) -> None:
    """A server stream lasting `count * delay_s` seconds delivers each message when it is
    sent (not all at the end) and is not cut by any total deadline."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    arrivals: list[float] = []
    received: list[bytes] = []
    async for message in client.server_stream_call(count, delay_s):
        arrivals.append(loop.time() - started)
        received.append(bytes(message))
    assert received == [stream_message(i) for i in range(count)]
    assert arrivals[-1] >= count * delay_s * 0.9
    # The first message arrived long before the last: the stream was not buffered.
    assert arrivals[0] < arrivals[-1] / 2
