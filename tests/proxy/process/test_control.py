"""proxy.process.control: length-prefixed JSON messages between the parent and a worker over a
real socketpair; the parent's WorkerChannel matches replies to requests by id, times out,
fails what is pending when the worker goes away and hands events on; the worker's
serve_requests answers one request at a time and survives a handler's bug."""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from proxy.process import control
from proxy.process.control import (
    ChannelClosed,
    Message,
    WorkerChannel,
    open_channel,
    read_message,
    serve_requests,
    write_message,
)

pytestmark = pytest.mark.socket

WAIT_S = 10.0  # an upper bound for things that happen at once; never reached when correct


@dataclass
class End:
    """One end of the channel, as streams."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    async def aclose(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()


@pytest.fixture
async def ends() -> AsyncIterator[tuple[End, End]]:
    """Streams over both ends of a fresh socketpair: (parent, worker)."""
    parent_sock, worker_sock = socket.socketpair()
    parent, worker = End(*await open_channel(parent_sock)), End(*await open_channel(worker_sock))
    yield parent, worker
    await parent.aclose()
    await worker.aclose()


@dataclass
class Linked:
    """The parent's WorkerChannel, the events it handed on, and the worker's streams."""

    channel: WorkerChannel
    events: list[Message]
    worker: End


@pytest.fixture
async def linked() -> AsyncIterator[Linked]:
    parent_sock, worker_sock = socket.socketpair()
    events: list[Message] = []
    channel = WorkerChannel(parent_sock, events.append)
    await channel.start()
    worker = End(*await open_channel(worker_sock))
    yield Linked(channel, events, worker)
    await channel.aclose()
    await worker.aclose()


def frame(body: bytes) -> bytes:
    return struct.pack("!I", len(body)) + body


# --- messages on the wire -------------------------------------------------------------


MESSAGES: list[Message] = [
    {},
    {"id": 7, "op": "metrics"},
    {"event": "ready", "pid": 4242},
    {"ok": False, "errors": ["routes.yaml:3: routes[0].upstream: unknown 'x'", "é ✓ \u2028"]},
    {"families": [{"name": "m", "samples": [["m_total", {"route": ""}, 1.5]]}], "n": None},
    {"text": "x" * 1_000_000},  # larger than one socket buffer
]


async def test_messages_round_trip(ends: tuple[End, End]) -> None:
    parent, worker = ends
    for message in MESSAGES:
        write_message(parent.writer, message)
    await parent.writer.drain()
    async with asyncio.timeout(WAIT_S):
        received = [await read_message(worker.reader) for _ in MESSAGES]
    assert received == MESSAGES


async def test_a_message_arriving_byte_by_byte_is_put_back_together(
    ends: tuple[End, End],
) -> None:
    parent, worker = ends
    data = frame(b'{"id":1,"op":"prepare","text":"a: 1"}') + frame(b'{"event":"ready"}')
    reading = asyncio.ensure_future(read_message(worker.reader))
    for index in range(len(data)):
        parent.writer.write(data[index : index + 1])
        await parent.writer.drain()
        await asyncio.sleep(0)
    async with asyncio.timeout(WAIT_S):
        assert await reading == {"id": 1, "op": "prepare", "text": "a: 1"}
        assert await read_message(worker.reader) == {"event": "ready"}


async def test_write_message_frames_compact_json(ends: tuple[End, End]) -> None:
    parent, worker = ends
    write_message(parent.writer, {"id": 3, "op": "commit"})
    write_message(parent.writer, {"event": "ready"})
    parent.writer.write_eof()
    async with asyncio.timeout(WAIT_S):
        raw = await worker.reader.read()
    assert raw == frame(b'{"id":3,"op":"commit"}') + frame(b'{"event":"ready"}')


async def test_a_length_over_the_limit_closes_without_waiting_for_the_body(
    ends: tuple[End, End],
) -> None:
    parent, worker = ends
    parent.writer.write(struct.pack("!I", control.MAX_MESSAGE_BYTES + 1) + b"{}")
    async with asyncio.timeout(WAIT_S):
        with pytest.raises(ChannelClosed, match="over the limit"):
            await read_message(worker.reader)


async def test_a_length_at_the_limit_is_accepted(
    ends: tuple[End, End], monkeypatch: pytest.MonkeyPatch
) -> None:
    parent, worker = ends
    body = b'{"text":"' + b"y" * 20 + b'"}'
    monkeypatch.setattr(control, "MAX_MESSAGE_BYTES", len(body))
    parent.writer.write(frame(body) + frame(body + b" "))
    async with asyncio.timeout(WAIT_S):
        assert await read_message(worker.reader) == {"text": "y" * 20}
        with pytest.raises(ChannelClosed, match="over the limit"):
            await read_message(worker.reader)


@pytest.mark.parametrize(
    "body",
    [b"[1, 2]", b'"ready"', b"42", b"null", b"true"],
    ids=["list", "string", "number", "null", "bool"],
)
async def test_json_that_is_not_an_object_closes(ends: tuple[End, End], body: bytes) -> None:
    parent, worker = ends
    parent.writer.write(frame(body))
    async with asyncio.timeout(WAIT_S):
        with pytest.raises(ChannelClosed, match="expected a JSON object"):
            await read_message(worker.reader)


@pytest.mark.parametrize(
    "body",
    [b"{", b"{'id': 1}", b"", b'{"id": 1}{"id": 2}', b'{"a": "\xff\xfe"}'],
    ids=["truncated", "single-quotes", "empty", "two-objects", "not-utf8"],
)
async def test_a_body_that_is_not_json_closes(ends: tuple[End, End], body: bytes) -> None:
    parent, worker = ends
    parent.writer.write(frame(body))
    async with asyncio.timeout(WAIT_S):
        with pytest.raises(ChannelClosed, match="not a message"):
            await read_message(worker.reader)


@pytest.mark.parametrize(
    "sent", [b"", b"\x00\x00", frame(b'{"id": 1, "op": "metrics"}')[:-3]], ids=str
)
async def test_eof_anywhere_closes(ends: tuple[End, End], sent: bytes) -> None:
    parent, worker = ends
    parent.writer.write(sent)
    parent.writer.write_eof()
    async with asyncio.timeout(WAIT_S):
        with pytest.raises(ChannelClosed, match="closed the channel"):
            await read_message(worker.reader)


# --- WorkerChannel: the parent's end --------------------------------------------------


async def test_request_gets_the_reply_with_its_id(linked: Linked) -> None:
    async def worker_side() -> Message:
        request = await read_message(linked.worker.reader)
        write_message(linked.worker.writer, {"id": request["id"], "ok": True, "got": request})
        return request

    answering = asyncio.ensure_future(worker_side())
    reply = await linked.channel.request("prepare", WAIT_S, text="a: 1", ports=[8080])
    request = await answering
    assert request == {"id": request["id"], "op": "prepare", "text": "a: 1", "ports": [8080]}
    assert reply == {"id": request["id"], "ok": True, "got": request}


async def test_replies_out_of_order_reach_their_own_requests(linked: Linked) -> None:
    async def worker_side() -> None:
        requests = [await read_message(linked.worker.reader) for _ in range(4)]
        assert len({request["id"] for request in requests}) == 4
        for index, request in enumerate(reversed(requests)):
            write_message(linked.worker.writer, {"id": request["id"], "n": request["n"]})
            if index == 1:  # an event in between replies
                write_message(linked.worker.writer, {"event": "ready"})
        await linked.worker.writer.drain()

    answering = asyncio.ensure_future(worker_side())
    replies = await asyncio.gather(
        *(linked.channel.request(f"op{n}", WAIT_S, n=n) for n in range(4))
    )
    await answering
    assert [reply["n"] for reply in replies] == [0, 1, 2, 3]
    assert linked.events == [{"event": "ready"}]


async def test_a_request_without_an_answer_times_out_and_the_late_answer_is_dropped(
    linked: Linked,
) -> None:
    with pytest.raises(ChannelClosed, match=r"no answer to 'metrics' within 0\.05s"):
        await linked.channel.request("metrics", 0.05)
    assert not linked.channel.closed

    async with asyncio.timeout(WAIT_S):
        late = await read_message(linked.worker.reader)
    write_message(linked.worker.writer, {"id": late["id"], "late": True})

    async def answer_next() -> None:
        request = await read_message(linked.worker.reader)
        write_message(linked.worker.writer, {"id": request["id"], "late": False})

    answering = asyncio.ensure_future(answer_next())
    reply = await linked.channel.request("metrics", WAIT_S)
    await answering
    assert reply["late"] is False
    assert reply["id"] != late["id"]
    assert linked.events == []


async def test_the_worker_closing_fails_every_pending_request_at_once(linked: Linked) -> None:
    pending = [
        asyncio.ensure_future(linked.channel.request(op, 60.0)) for op in ("metrics", "commit")
    ]
    async with asyncio.timeout(WAIT_S):
        for _ in pending:
            await read_message(linked.worker.reader)
        await linked.worker.aclose()
        results = await asyncio.gather(*pending, return_exceptions=True)
    assert [type(result) for result in results] == [ChannelClosed, ChannelClosed]
    assert linked.channel.closed
    with pytest.raises(ChannelClosed, match="closed"):
        await linked.channel.request("metrics", 60.0)


async def test_a_malformed_message_from_the_worker_closes_the_channel(linked: Linked) -> None:
    pending = asyncio.ensure_future(linked.channel.request("metrics", 60.0))
    linked.worker.writer.write(frame(b"[]"))
    async with asyncio.timeout(WAIT_S):
        with pytest.raises(ChannelClosed):
            await pending
        # the parent closed its end: the worker reads EOF and drains
        await read_message(linked.worker.reader)
        with pytest.raises(ChannelClosed):
            await read_message(linked.worker.reader)


async def test_aclose_fails_pending_requests_and_the_worker_reads_eof(linked: Linked) -> None:
    pending = asyncio.ensure_future(linked.channel.request("metrics", 60.0))
    async with asyncio.timeout(WAIT_S):
        await read_message(linked.worker.reader)
        await linked.channel.aclose()
        with pytest.raises(ChannelClosed):
            await pending
        with pytest.raises(ChannelClosed, match="closed the channel"):
            await read_message(linked.worker.reader)
    assert linked.channel.closed


async def test_events_reach_on_event_and_other_messages_are_ignored(linked: Linked) -> None:
    for message in (
        {"event": "ready"},
        {"id": 99, "ok": True},  # a reply nobody waits for
        {"note": "neither a reply nor an event"},
        {"event": "draining", "pid": 5},
    ):
        write_message(linked.worker.writer, message)
    await linked.worker.writer.drain()

    async def answer() -> None:  # a reply after them proves they were all read
        request = await read_message(linked.worker.reader)
        write_message(linked.worker.writer, {"id": request["id"], "ok": True})

    answering = asyncio.ensure_future(answer())
    assert await linked.channel.request("metrics", WAIT_S) == {"id": 1, "ok": True}
    await answering
    assert linked.events == [{"event": "ready"}, {"event": "draining", "pid": 5}]


async def test_request_before_start_is_refused() -> None:
    parent_sock, worker_sock = socket.socketpair()
    with parent_sock, worker_sock:
        channel = WorkerChannel(parent_sock, lambda event: None)
        assert channel.fileno == parent_sock.fileno()
        with pytest.raises(ChannelClosed):
            await channel.request("metrics", 1.0)


# --- serve_requests: the worker's end -------------------------------------------------


async def test_serve_requests_answers_a_handlers_bug_and_keeps_serving(
    ends: tuple[End, End], caplog: pytest.LogCaptureFixture
) -> None:
    parent, worker = ends

    async def handle(request: Message) -> Message:
        if request["op"] == "boom":
            raise RuntimeError("no such table")
        return {"ok": True, "op": request["op"]}

    serving = asyncio.ensure_future(serve_requests(worker.reader, worker.writer, handle))
    for request_id, op in ((1, "metrics"), (2, "boom"), (3, "commit")):
        write_message(parent.writer, {"id": request_id, "op": op})
    with caplog.at_level(logging.ERROR, logger="proxy.process.control"):
        async with asyncio.timeout(WAIT_S):
            replies = [await read_message(parent.reader) for _ in range(3)]
    assert replies == [
        {"id": 1, "ok": True, "op": "metrics"},
        {"id": 2, "ok": False, "errors": ["internal error: RuntimeError('no such table')"]},
        {"id": 3, "ok": True, "op": "commit"},
    ]
    assert "'boom'" in caplog.text
    assert not serving.done()

    parent.writer.write_eof()  # the parent goes away: serve_requests returns quietly
    async with asyncio.timeout(WAIT_S):
        await serving


async def test_serve_requests_answers_a_reply_that_is_not_json_as_an_error(
    ends: tuple[End, End], caplog: pytest.LogCaptureFixture
) -> None:
    parent, worker = ends

    async def handle(request: Message) -> Message:
        if request["op"] == "odd":
            return {"ok": True, "families": {"a set", "is not JSON"}}
        return {"ok": True}

    serving = asyncio.ensure_future(serve_requests(worker.reader, worker.writer, handle))
    write_message(parent.writer, {"id": 1, "op": "odd"})
    write_message(parent.writer, {"id": 2, "op": "metrics"})
    with caplog.at_level(logging.ERROR, logger="proxy.process.control"):
        async with asyncio.timeout(WAIT_S):
            replies = [await read_message(parent.reader) for _ in range(2)]
    assert replies[0]["id"] == 1
    assert replies[0]["ok"] is False
    assert "not JSON serializable" in replies[0]["errors"][0]
    assert replies[1] == {"id": 2, "ok": True}
    assert "'odd'" in caplog.text
    parent.writer.write_eof()
    async with asyncio.timeout(WAIT_S):
        await serving


async def test_serve_requests_answers_one_request_at_a_time(ends: tuple[End, End]) -> None:
    parent, worker = ends
    log: list[str] = []
    release = asyncio.Event()

    async def handle(request: Message) -> Message:
        log.append(f"start {request['op']}")
        if request["op"] == "prepare":
            await release.wait()
        log.append(f"end {request['op']}")
        return {"ok": True}

    serving = asyncio.ensure_future(serve_requests(worker.reader, worker.writer, handle))
    write_message(parent.writer, {"id": 1, "op": "prepare"})
    write_message(parent.writer, {"id": 2, "op": "metrics"})
    await parent.writer.drain()
    for _ in range(20):
        await asyncio.sleep(0)
    assert log == ["start prepare"]
    release.set()
    async with asyncio.timeout(WAIT_S):
        replies = [await read_message(parent.reader) for _ in range(2)]
    assert [reply["id"] for reply in replies] == [1, 2]
    assert log == ["start prepare", "end prepare", "start metrics", "end metrics"]
    parent.writer.write_eof()
    async with asyncio.timeout(WAIT_S):
        await serving


async def test_worker_channel_and_serve_requests_talk_to_each_other() -> None:
    parent_sock, worker_sock = socket.socketpair()
    events: list[Message] = []
    channel = WorkerChannel(parent_sock, events.append)
    await channel.start()
    worker = End(*await open_channel(worker_sock))

    async def handle(request: Message) -> Message:
        await asyncio.sleep(0.01 * request["n"])
        return {"ok": True, "square": request["n"] ** 2}

    write_message(worker.writer, {"event": "ready"})
    serving = asyncio.ensure_future(serve_requests(worker.reader, worker.writer, handle))
    replies = await asyncio.gather(*(channel.request("square", WAIT_S, n=n) for n in range(5)))
    assert [reply["square"] for reply in replies] == [0, 1, 4, 9, 16]
    assert events == [{"event": "ready"}]

    await channel.aclose()  # the parent goes away: the worker's loop ends
    async with asyncio.timeout(WAIT_S):
        await serving
    await worker.aclose()
