"""Frames made by h2data must read, to a real h2 client, exactly like frames h2 made,
and leave h2's flow-control accounting as h2 itself would."""

from __future__ import annotations

import h2.config
import h2.connection
import h2.events

from proxy.frontend.h2.data import complete_response, frame_data


def open_stream() -> tuple[h2.connection.H2Connection, h2.connection.H2Connection, int]:
    client = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=True, header_encoding=None)
    )
    server = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=False, header_encoding=None)
    )
    client.initiate_connection()
    server.initiate_connection()
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    stream_id = client.get_next_available_stream_id()
    client.send_headers(
        stream_id, [(":method", "GET"), (":scheme", "http"), (":authority", "t"), (":path", "/")]
    )
    client.end_stream(stream_id)
    server.receive_data(client.data_to_send())
    server.send_headers(stream_id, [(":status", "200")])
    return client, server, stream_id


def test_hand_made_frames_carry_the_data_and_charge_the_windows() -> None:
    client, server, stream_id = open_stream()
    payload = bytes(range(256)) * 200  # 51200 bytes: 3 full 16 KiB frames and a rest
    window_before = server.local_flow_control_window(stream_id)

    head = server.data_to_send()
    frames = frame_data(server, stream_id, memoryview(payload)[:49152], 16384)
    server.send_data(stream_id, payload[49152:], end_stream=True)
    events = client.receive_data(head + b"".join(frames) + server.data_to_send())
    # Each frame's payload is a view of the body, not a copy.
    assert [piece.obj for piece in frames[1::2]] == [payload] * 3  # type: ignore[union-attr]

    data = b"".join(e.data or b"" for e in events if isinstance(e, h2.events.DataReceived))
    sizes = [len(e.data or b"") for e in events if isinstance(e, h2.events.DataReceived)]
    assert data == payload
    assert sizes == [16384, 16384, 16384, 2048]
    assert any(isinstance(e, h2.events.StreamEnded) for e in events)
    assert server.local_flow_control_window(stream_id) == window_before - len(payload)


def test_frames_shorter_than_the_frame_size_are_one_frame() -> None:
    client, server, stream_id = open_stream()
    head = server.data_to_send()
    frames = frame_data(server, stream_id, memoryview(b"abc"), 16384)

    events = client.receive_data(head + b"".join(frames))

    assert [e.data for e in events if isinstance(e, h2.events.DataReceived)] == [b"abc"]
    assert server.outbound_flow_control_window == 65535 - 3


def response_events(
    client: h2.connection.H2Connection, data: bytes
) -> tuple[list[tuple[bytes, bytes]], bytes, bool]:
    """(headers, body, ended) of what `data` carries to the client."""
    headers: list[tuple[bytes, bytes]] = []
    body = b""
    ended = False
    for event in client.receive_data(data):
        if isinstance(event, h2.events.ResponseReceived):
            headers = list(event.headers or [])
        elif isinstance(event, h2.events.DataReceived):
            body += event.data or b""
        elif isinstance(event, h2.events.StreamEnded):
            ended = True
    return headers, body, ended


def open_request(client: h2.connection.H2Connection, server: h2.connection.H2Connection) -> int:
    stream_id = client.get_next_available_stream_id()
    client.send_headers(
        stream_id,
        [(":method", "GET"), (":scheme", "http"), (":authority", "t"), (":path", "/")],
        end_stream=True,
    )
    server.receive_data(client.data_to_send())
    return stream_id


def connected() -> tuple[h2.connection.H2Connection, h2.connection.H2Connection]:
    client, server, stream_id = open_stream()
    server.send_data(stream_id, b"", end_stream=True)
    client.receive_data(server.data_to_send())
    return client, server


def test_a_whole_response_is_one_headers_and_one_data_frame_and_closes_the_stream() -> None:
    client, server = connected()
    stream_id = open_request(client, server)
    fields = [(b":status", b"200"), (b"content-type", b"text/plain"), (b"content-length", b"5")]

    frames = complete_response(server, stream_id, fields, b"hello")
    assert frames is not None
    headers, body, ended = response_events(client, frames)

    assert headers == fields
    assert (body, ended) == (b"hello", True)
    assert server.streams[stream_id].closed


def test_an_empty_response_ends_the_stream_on_its_headers() -> None:
    client, server = connected()
    stream_id = open_request(client, server)

    frames = complete_response(server, stream_id, [(b":status", b"204")], b"")
    headers, body, ended = response_events(client, frames or b"")

    assert headers == [(b":status", b"204")]
    assert (body, ended) == (b"", True)


def test_a_header_block_larger_than_a_frame_continues_in_continuation_frames() -> None:
    client, server = connected()
    stream_id = open_request(client, server)
    fields = [(b":status", b"200"), (b"x-big", b"v" * 40000)]

    frames = complete_response(server, stream_id, fields, b"ok")
    headers, body, ended = response_events(client, frames or b"")

    assert headers == fields
    assert (body, ended) == (b"ok", True)


def test_a_body_beyond_one_frame_is_left_to_h2_and_nothing_changes() -> None:
    client, server = connected()
    stream_id = open_request(client, server)
    window = server.local_flow_control_window(stream_id)

    assert complete_response(server, stream_id, [(b":status", b"200")], b"x" * 20000) is None
    assert server.local_flow_control_window(stream_id) == window
    assert not server.streams[stream_id].closed


def test_hand_made_and_h2_made_responses_interleave_with_one_hpack_context() -> None:
    client, server = connected()
    for n in range(30):
        stream_id = open_request(client, server)
        fields = [(b":status", b"200"), (b"x-n", b"%d" % (n % 4)), (b"date", b"d%d" % (n // 7))]
        if n % 3:
            frames = complete_response(server, stream_id, fields, b"body%d" % n) or b""
        else:
            server.send_headers(stream_id, fields)
            server.send_data(stream_id, b"body%d" % n, end_stream=True)
            frames = server.data_to_send()
        headers, body, ended = response_events(client, frames)
        client.data_to_send()

        assert headers == fields
        assert (body, ended) == (b"body%d" % n, True)
