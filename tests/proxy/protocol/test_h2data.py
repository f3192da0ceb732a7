"""Frames made by h2data must read, to a real h2 client, exactly like frames h2 made,
and leave h2's flow-control accounting as h2 itself would."""

from __future__ import annotations

import h2.config
import h2.connection
import h2.events

from proxy.protocol.h2data import frame_data


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
    events = client.receive_data(head + frames + server.data_to_send())

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

    events = client.receive_data(head + frames)

    assert [e.data for e in events if isinstance(e, h2.events.DataReceived)] == [b"abc"]
    assert server.outbound_flow_control_window == 65535 - 3
