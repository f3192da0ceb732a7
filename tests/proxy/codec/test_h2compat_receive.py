"""h2compat's way in for a request's HEADERS frame without h2's receive path
(`takes_whole_frames`, `open_stream_directly`): each leaves the connection and the stream as
h2's own receive path would, and leaves to h2 whatever it does not take."""

from __future__ import annotations

import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import pytest
from h2.connection import ConnectionState
from h2.stream import StreamState
from hpack import Encoder
from hyperframe.frame import ContinuationFrame, GoAwayFrame, HeadersFrame

from proxy.codec import h2compat
from tests.proxy.codec.h2_pairs import (
    REQUEST,
    RESPONSE,
    initiated,
    pair,
    stream_state,
    streams_settings,
)

# -- a request's HEADERS frame read without h2's receive path -------------------------------


def server_pair() -> tuple[h2.connection.H2Connection, h2.connection.H2Connection]:
    """(client, server) with the front end's configuration, the server past the client's
    preface and SETTINGS."""
    return pair(h2compat.PerStreamContentLength(client_side=False, header_encoding=None))


def headers_block(client: h2.connection.H2Connection, stream_id: int, end_stream: bool) -> bytes:
    """The HEADERS frame (END_HEADERS) the client sends for a GET on `stream_id`."""
    client.send_headers(stream_id, REQUEST, end_stream=end_stream)
    return client.data_to_send()


def machine_state(conn: h2.connection.H2Connection, stream_id: int) -> dict[str, object]:
    stream = conn.streams[stream_id]
    return {
        **vars(stream.state_machine),
        "inbound": stream.inbound_flow_control_window,
        "outbound": stream.outbound_flow_control_window,
        "max_frame": stream.max_outbound_frame_size,
    }


@pytest.mark.parametrize("end_stream", [True, False])
def test_a_stream_opened_directly_is_left_as_h2s_receive_path_leaves_it(end_stream: bool) -> None:
    twins = [server_pair() for _ in range(2)]
    (client, by_h2), (_, by_us) = twins
    by_us_client = twins[1][0]
    for stream_id in (1, 3):
        frame = headers_block(client, stream_id, end_stream)
        assert frame == headers_block(by_us_client, stream_id, end_stream)
        assert h2compat.takes_whole_frames(by_us)
        [event, *ended] = by_h2.receive_data(frame)
        fields = h2compat.open_stream_directly(by_us, stream_id, frame[9:], end_stream)

        assert isinstance(event, h2.events.RequestReceived)
        assert fields == event.headers
        assert bool(ended) is end_stream
        assert machine_state(by_us, stream_id) == machine_state(by_h2, stream_id)
        assert by_us.highest_inbound_stream_id == by_h2.highest_inbound_stream_id == stream_id
        assert by_us.state_machine.state is by_h2.state_machine.state
        assert by_us.open_inbound_streams == by_h2.open_inbound_streams
        assert list(by_us.decoder.header_table.dynamic_entries) == list(
            by_h2.decoder.header_table.dynamic_entries
        )
    # h2 carries on with the stream: the rest of the request, and the response.
    for client, server in twins:
        if not end_stream:
            client.send_data(3, b"body", end_stream=True)
            [data, end] = server.receive_data(client.data_to_send())
            assert isinstance(data, h2.events.DataReceived)
            assert isinstance(end, h2.events.StreamEnded)
        server.send_headers(3, RESPONSE, end_stream=True)
        assert stream_state(server, 3) is StreamState.CLOSED


def test_the_first_request_moves_an_idle_connection_to_open_as_h2_does() -> None:
    client, server = server_pair()
    before = server.state_machine.state
    assert h2compat.takes_whole_frames(server)
    frame = headers_block(client, 1, True)
    assert h2compat.open_stream_directly(server, 1, frame[9:], True) is not None
    assert (before, server.state_machine.state) == (
        ConnectionState.IDLE,
        ConnectionState.SERVER_OPEN,
    )


def test_a_stream_id_that_is_not_new_is_left_to_h2() -> None:
    client, server = server_pair()
    server.receive_data(headers_block(client, 5, True))
    block = client.encoder.encode(REQUEST)
    before = (dict(server.streams), server.highest_inbound_stream_id)
    for stream_id in (3, 5, 6):  # below the highest, that one, even
        assert h2compat.open_stream_directly(server, stream_id, block, True) is None
    assert (dict(server.streams), server.highest_inbound_stream_id) == before


def test_at_h2s_limit_of_known_streams_h2_counts_them() -> None:
    client, server = server_pair()
    server.local_settings = streams_settings(2)
    for stream_id in (1, 3):
        server.receive_data(headers_block(client, stream_id, True))
    block = client.encoder.encode(REQUEST)
    assert h2compat.open_stream_directly(server, 5, block, True) is None
    assert set(server.streams) == {1, 3}


def test_a_block_that_does_not_decode_raises_as_h2_does() -> None:
    _, server = server_pair()
    with pytest.raises(h2.exceptions.ProtocolError) as raised:
        h2compat.open_stream_directly(server, 1, b"\xff\xff\xff\xff\xff\xff", True)
    assert raised.value.error_code == h2.errors.ErrorCodes.PROTOCOL_ERROR
    h2compat.set_header_list_cap(server, 100)
    with pytest.raises(h2.exceptions.DenialOfServiceError):
        h2compat.open_stream_directly(
            server, 1, Encoder().encode([*REQUEST, (b"x", b"y" * 200)]), True
        )
    assert not server.streams


def test_whole_frames_are_taken_only_with_nothing_of_the_input_held_by_h2() -> None:
    client, server = initiated()
    preface = client.data_to_send()
    server.receive_data(preface[:10])
    assert not h2compat.takes_whole_frames(server)  # the preface is not all here
    server.receive_data(preface[10:])
    assert h2compat.takes_whole_frames(server)
    client.send_headers(1, REQUEST, end_stream=True)
    frame = client.data_to_send()
    server.receive_data(frame[:5])
    assert not h2compat.takes_whole_frames(server)  # part of a frame
    server.receive_data(frame[5:])
    assert h2compat.takes_whole_frames(server)
    block = client.encoder.encode(REQUEST)
    server.receive_data(HeadersFrame(3, data=block, flags=["END_STREAM"]).serialize())
    assert not h2compat.takes_whole_frames(server)  # CONTINUATION expected
    server.receive_data(ContinuationFrame(3, flags=["END_HEADERS"]).serialize())
    assert h2compat.takes_whole_frames(server)
    server.receive_data(GoAwayFrame(0).serialize())
    assert not h2compat.takes_whole_frames(server)
