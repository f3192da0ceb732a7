"""What proxy/codec/h2compat.py assumes of h2's and hpack's internals, checked against the
installed versions: the attributes it reads and writes exist with the types it expects,
the methods it replaces have the signatures its replacements take, h2 calls them the
way it replaces them, and each function leaves h2 as h2's own calls would.

A failure here after an upgrade of h2 or hpack names the assumption that broke; the
function of h2compat.py it belongs to says why it is made (its docstring).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import hpack.hpack
import hpack.huffman_table
import pytest
from h2.connection import ConnectionInputs, ConnectionState
from h2.frame_buffer import FrameBuffer
from h2.settings import SettingCodes
from h2.stream import H2Stream, StreamInputs, StreamState
from hpack import Decoder, Encoder, HeaderTuple
from hyperframe.frame import Frame, GoAwayFrame, SettingsFrame

from proxy.codec import h2compat
from tests.proxy.codec.h2_pairs import (
    REQUEST,
    RESPONSE,
    pair,
    request,
    stream_state,
    streams_settings,
)


def parameters(function: Callable[..., Any]) -> list[tuple[str, object]]:
    """(name, default) of each parameter of the function a wrapper stands for."""
    signature = inspect.signature(inspect.unwrap(function))
    return [(p.name, p.default) for p in signature.parameters.values()]


# -- the names and types h2compat reaches -------------------------------------------------


def test_the_connection_holds_the_objects_h2compat_reaches() -> None:
    _, server = pair()

    assert isinstance(server.state_machine.state, ConnectionState)
    assert isinstance(server.streams, dict)
    assert isinstance(server.incoming_buffer, FrameBuffer)
    assert isinstance(server.incoming_buffer._data, bytearray)
    assert isinstance(server.local_settings, h2.settings.Settings)
    assert isinstance(server.decoder, Decoder)
    assert isinstance(server.encoder, Encoder)
    assert isinstance(server.decoder.max_header_list_size, int)
    assert isinstance(server.outbound_flow_control_window, int)


def test_a_stream_holds_its_state_machine_window_and_config() -> None:
    client, server = pair()
    stream_id = request(client, server)
    stream = server.streams[stream_id]

    assert isinstance(stream, H2Stream)
    assert stream.state_machine.state is StreamState.HALF_CLOSED_REMOTE
    assert isinstance(stream.outbound_flow_control_window, int)
    assert stream.config is server.config


def test_the_states_and_inputs_h2compat_names_exist() -> None:
    assert {ConnectionState.CLIENT_OPEN, ConnectionState.SERVER_OPEN, ConnectionState.CLOSED}
    assert {ConnectionInputs.SEND_HEADERS, ConnectionInputs.SEND_DATA}
    assert {StreamInputs.SEND_HEADERS, StreamInputs.SEND_DATA, StreamInputs.SEND_END_STREAM}
    assert StreamState.HALF_CLOSED_LOCAL


def test_the_replaced_methods_have_the_signatures_their_replacements_take() -> None:
    assert parameters(H2Stream._initialize_content_length) == [
        ("self", inspect.Parameter.empty),
        ("headers", inspect.Parameter.empty),
    ]
    assert parameters(H2Stream._track_content_length) == [
        ("self", inspect.Parameter.empty),
        ("length", inspect.Parameter.empty),
        ("end_stream", inspect.Parameter.empty),
    ]
    assert parameters(Decoder.decode) == [
        ("self", inspect.Parameter.empty),
        ("data", inspect.Parameter.empty),
        ("raw", False),
    ]
    assert parameters(Encoder.encode) == [
        ("self", inspect.Parameter.empty),
        ("headers", inspect.Parameter.empty),
        ("huffman", True),
    ]
    assert parameters(Decoder._decode_literal) == [
        ("self", inspect.Parameter.empty),
        ("data", inspect.Parameter.empty),
        ("should_index", inspect.Parameter.empty),
    ]


def test_the_hpack_pieces_the_literal_decoder_uses_behave_as_it_expects() -> None:
    block = Encoder().encode([(b"x-name", b"value")], huffman=False)
    # 0x40: a literal with incremental indexing and a literal name (RFC 7541 6.2.1).
    assert block[0] == 0x40
    assert hpack.hpack.decode_integer(memoryview(bytes([0x1F, 0x9A, 0x0A])), 5) == (1337, 3)
    huffman = Encoder().encode([(b"x-name", b"value")], huffman=True)
    length, consumed = hpack.hpack.decode_integer(memoryview(huffman)[1:], 7)
    assert hpack.huffman_table.decode_huffman(huffman[1 + consumed : 1 + consumed + length]) == (
        b"x-name"
    )
    decoder = Decoder()
    decoder.decode(block, raw=True)
    assert decoder.header_table.get_by_index(62) == (b"x-name", b"value")  # first dynamic
    decoder.header_table.add(b"x-other", b"v")
    assert decoder.header_table.get_by_index(62) == (b"x-other", b"v")


# -- reopen_after_goaway ------------------------------------------------------------------


@pytest.mark.parametrize("side", ["server", "client"])
def test_after_a_graceful_goaway_the_open_streams_finish_once_reopened(side: str) -> None:
    client, server = pair()
    stream_id = request(client, server)
    us = server if side == "server" else client
    goaway = GoAwayFrame(0)  # by hand: the peer's h2 would close itself too
    goaway.last_stream_id = stream_id
    events = us.receive_data(goaway.serialize())
    assert any(isinstance(event, h2.events.ConnectionTerminated) for event in events)
    # The premise (python-hyper/h2 #1181): h2 closed the connection on the GOAWAY. Should
    # this fail, h2 lets streams finish by itself and reopen_after_goaway may go.
    assert us.state_machine.state is ConnectionState.CLOSED

    h2compat.reopen_after_goaway(us)

    opened = ConnectionState.SERVER_OPEN if side == "server" else ConnectionState.CLIENT_OPEN
    assert us.state_machine.state is opened
    server.send_headers(stream_id, RESPONSE, end_stream=True)
    events = client.receive_data(server.data_to_send())
    assert any(isinstance(event, h2.events.ResponseReceived) for event in events)
    assert any(isinstance(event, h2.events.StreamEnded) for event in events)


# -- buffered_frame_bytes -----------------------------------------------------------------


def test_the_bytes_of_a_partly_received_frame_are_counted() -> None:
    client, server = pair()
    client.send_headers(client.get_next_available_stream_id(), REQUEST, end_stream=True)
    frames = client.data_to_send()

    server.receive_data(frames[:12])
    assert h2compat.buffered_frame_bytes(server) == 12
    server.receive_data(frames[12:])
    assert h2compat.buffered_frame_bytes(server) == 0


def test_an_oversized_frame_header_alone_is_buffered_not_refused() -> None:
    """The reason for buffered_frame_bytes: h2 only checks a whole frame's length."""
    _, server = pair()
    too_long = server.max_inbound_frame_size + 1
    header = too_long.to_bytes(3, "big") + bytes([0, 0]) + (1).to_bytes(4, "big")

    server.receive_data(header + b"x" * 100)

    assert h2compat.buffered_frame_bytes(server) == 109 > 9


# -- initiate_with_settings ---------------------------------------------------------------


def settings_frame(server_preface: bytes) -> SettingsFrame:
    frame, length = Frame.parse_frame_header(memoryview(server_preface[:9]))
    frame.parse_body(memoryview(server_preface[9 : 9 + length]))
    assert isinstance(frame, SettingsFrame)
    return frame


def test_looser_local_settings_are_enforced_and_not_advertised() -> None:
    server = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=False, header_encoding=None)
    )

    h2compat.initiate_with_settings(server, streams_settings(1), streams_settings(2))

    preface = server.data_to_send()
    assert settings_frame(preface).settings[SettingCodes.MAX_CONCURRENT_STREAMS] == 1
    client = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=True, header_encoding=None)
    )
    client.initiate_connection()
    for _ in range(2):  # the client has not read the server's SETTINGS: it sends both
        client.send_headers(client.get_next_available_stream_id(), REQUEST, end_stream=True)
    events = server.receive_data(client.data_to_send())
    assert sum(isinstance(event, h2.events.RequestReceived) for event in events) == 2
    # The client's ACK of the advertised SETTINGS changes nothing h2 enforces.
    client.receive_data(preface)
    server.receive_data(client.data_to_send())
    assert server.local_settings.max_concurrent_streams == 2


def test_without_the_looser_settings_the_extra_stream_is_a_connection_error() -> None:
    """The reason for initiate_with_settings (RFC 9113 section 5.1.2 asks for a stream
    error)."""
    server = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=False, header_encoding=None)
    )
    h2compat.initiate_with_settings(server, streams_settings(1), streams_settings(1))
    client = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=True, header_encoding=None)
    )
    client.initiate_connection()
    for _ in range(2):
        client.send_headers(client.get_next_available_stream_id(), REQUEST, end_stream=True)

    with pytest.raises(h2.exceptions.TooManyStreamsError):
        server.receive_data(client.data_to_send())


# -- set_header_list_cap ------------------------------------------------------------------


@pytest.mark.parametrize(("cap", "refused"), [(100, True), (10_000, False)])
def test_the_header_list_cap_is_where_h2_gives_up_on_the_connection(
    cap: int, refused: bool
) -> None:
    client, server = pair()
    h2compat.set_header_list_cap(server, cap)
    client.send_headers(1, [*REQUEST, (b"x-big", b"v" * 500)], end_stream=True)

    if refused:
        with pytest.raises(h2.exceptions.DenialOfServiceError):
            server.receive_data(client.data_to_send())
    else:
        events = server.receive_data(client.data_to_send())
        assert any(isinstance(event, h2.events.RequestReceived) for event in events)


# -- half_closed_local --------------------------------------------------------------------


def test_a_stream_is_half_closed_local_after_our_end_stream_only() -> None:
    client, server = pair()
    open_both_ways = request(client, server, end_stream=False)
    assert not h2compat.half_closed_local(server, open_both_ways)

    server.send_headers(open_both_ways, RESPONSE, end_stream=True)
    assert h2compat.half_closed_local(server, open_both_ways)

    closed = request(client, server)
    server.send_headers(closed, RESPONSE, end_stream=True)
    assert not h2compat.half_closed_local(server, closed)
    assert not h2compat.half_closed_local(server, 99)  # never opened


# -- the bookkeeping of frames made without h2 ---------------------------------------------


def twin_streams() -> list[tuple[h2.connection.H2Connection, h2.connection.H2Connection, int]]:
    """Two identical (client, server, stream id) set-ups: one for h2's own calls, one for
    h2compat's."""
    twins = []
    for _ in range(2):
        client, server = pair()
        twins.append((client, server, request(client, server)))
    return twins


def test_charged_windows_are_what_h2_send_data_leaves() -> None:
    (_, by_h2, stream_id), (_, by_us, same_id) = twin_streams()
    for server in (by_h2, by_us):
        server.send_headers(stream_id, RESPONSE)

    by_h2.send_data(stream_id, b"x" * 1000)
    h2compat.charge_send_windows(by_us, same_id, 1000)

    assert by_us.local_flow_control_window(same_id) == by_h2.local_flow_control_window(stream_id)
    assert by_us.outbound_flow_control_window == by_h2.outbound_flow_control_window
    assert stream_state(by_us, same_id) is stream_state(by_h2, stream_id)


@pytest.mark.parametrize("size", [0, 5])
def test_an_accounted_whole_response_leaves_h2_as_its_own_calls_do(size: int) -> None:
    (_, by_h2, stream_id), (client, by_us, same_id) = twin_streams()
    window = by_us.outbound_flow_control_window

    if size:
        by_h2.send_headers(stream_id, RESPONSE)
        by_h2.send_data(stream_id, b"x" * size, end_stream=True)
    else:
        by_h2.send_headers(stream_id, RESPONSE, end_stream=True)
    assert h2compat.account_whole_response(by_us, same_id, size)

    assert by_us.state_machine.state is by_h2.state_machine.state
    assert vars(by_us.streams[same_id].state_machine) == vars(
        by_h2.streams[stream_id].state_machine
    )
    assert stream_state(by_us, same_id) is stream_state(by_h2, stream_id) is StreamState.CLOSED
    assert by_us.outbound_flow_control_window == by_h2.outbound_flow_control_window
    assert by_us.outbound_flow_control_window == window - size
    # Later streams work on, h2's own way.
    later = request(client, by_us)
    by_us.send_headers(later, RESPONSE, end_stream=True)


def test_a_whole_response_that_does_not_fit_changes_nothing() -> None:
    client, server = pair()
    stream_id = request(client, server)
    window = server.local_flow_control_window(stream_id)

    assert not h2compat.account_whole_response(server, stream_id, window + 1)
    assert not h2compat.account_whole_response(server, 99, 0)  # a stream h2 does not know

    assert stream_state(server, stream_id) is StreamState.HALF_CLOSED_REMOTE
    assert server.local_flow_control_window(stream_id) == window


def test_a_whole_response_on_a_closed_stream_raises_as_h2_does() -> None:
    client, server = pair()
    stream_id = request(client, server)
    server.send_headers(stream_id, RESPONSE, end_stream=True)

    with pytest.raises(h2.exceptions.ProtocolError):
        h2compat.account_whole_response(server, stream_id, 0)


def test_encoded_fields_share_the_compression_context_of_h2s_blocks() -> None:
    client, server = pair()
    stream_id = request(client, server)
    server.send_headers(stream_id, RESPONSE, end_stream=True)
    client.receive_data(server.data_to_send())

    block = h2compat.encode_fields(server, RESPONSE)

    # h2 indexed the fields: the same list is now one byte a field, readable by the client.
    assert len(block) == len(RESPONSE)
    assert list(client.decoder.decode(block, raw=True)) == RESPONSE


# -- content-length left to the front end --------------------------------------------------


def body_too_short(server: h2.connection.H2Connection) -> list[h2.events.Event]:
    """What `server` makes of a request whose DATA is shorter than its content-length."""
    client = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=True, header_encoding=None)
    )
    client.initiate_connection()
    server.initiate_connection()
    client.send_headers(1, [*REQUEST, (b"content-length", b"5")])
    client.send_data(1, b"abc", end_stream=True)
    return server.receive_data(client.data_to_send())


def test_h2_leaves_content_length_to_streams_of_a_per_stream_configuration() -> None:
    config = h2compat.PerStreamContentLength(client_side=False, header_encoding=None)

    events = body_too_short(h2.connection.H2Connection(config))

    assert any(isinstance(event, h2.events.StreamEnded) for event in events)


def test_other_configurations_keep_h2s_content_length_check() -> None:
    """The patch is confined to PerStreamContentLength, and h2 still checks where it
    is patched (else the first test would pass for another reason)."""
    plain = h2.config.H2Configuration(client_side=False, header_encoding=None)

    with pytest.raises(h2.exceptions.InvalidBodyLengthError):
        body_too_short(h2.connection.H2Connection(plain))


# -- HPACK: the memo and the linear literals -----------------------------------------------


class Spy:
    """Records the calls to a method it replaces on one instance, then calls it."""

    def __init__(self, method: Callable[..., Any]) -> None:
        self.method = method
        self.calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls.append((args, kwargs))
        return self.method(*args, **kwargs)


def test_h2_decodes_and_encodes_through_its_coder_instances() -> None:
    """memoise_hpack replaces `decode` and `encode` on the instances: h2 must look them up
    there, and call them as the replacements take them."""
    client, server = pair()
    decode = Spy(server.decoder.decode)
    encode = Spy(server.encoder.encode)
    server.decoder.decode = decode  # type: ignore[method-assign]
    server.encoder.encode = encode  # type: ignore[method-assign]

    stream_id = request(client, server)
    server.send_headers(stream_id, RESPONSE, end_stream=True)

    assert len(decode.calls) == 1
    args, kwargs = decode.calls[0]
    assert len(args) == 1
    assert kwargs == {"raw": True}
    assert len(encode.calls) == 1
    args, kwargs = encode.calls[0]
    assert len(args) == 1
    assert not kwargs


def test_a_table_size_change_waits_in_the_encoder_until_the_next_block() -> None:
    client, server = pair()
    client.update_settings({SettingCodes.HEADER_TABLE_SIZE: 0})
    server.receive_data(client.data_to_send())

    assert server.encoder.table_size_changes == [0]
    server.encoder.encode(RESPONSE)
    assert server.encoder.table_size_changes == []


def test_a_memoised_connection_serves_repeated_requests() -> None:
    client, server = pair()
    h2compat.memoise_hpack(server)
    for _ in range(4):
        stream_id = request(client, server)
        server.send_headers(stream_id, RESPONSE, end_stream=True)
        events = client.receive_data(server.data_to_send())
        received = [e for e in events if isinstance(e, h2.events.ResponseReceived)]
        assert [list(e.headers or []) for e in received] == [RESPONSE]


def test_hpack_decodes_literals_through_the_instance_with_should_index_by_name() -> None:
    decoder = Decoder()
    spy = Spy(decoder._decode_literal)
    decoder._decode_literal = spy  # type: ignore[method-assign]
    block = Encoder().encode([(b"x-a", b"1"), HeaderTuple(b"x-b", b"2")])

    assert decoder.decode(block, raw=True) == [(b"x-a", b"1"), (b"x-b", b"2")]
    assert [kwargs for _, kwargs in spy.calls] == [{"should_index": True}] * 2
    assert all(isinstance(args[0], memoryview) for args, _ in spy.calls)


def test_linear_literals_go_to_the_decoder_h2_uses() -> None:
    client, server = pair()
    h2compat.linear_literals(server)

    assert "_decode_literal" in vars(server.decoder)
    stream_id = request(client, server)
    assert stream_id in server.streams


def test_a_whole_response_before_the_request_ended_leaves_h2_as_its_own_calls_do() -> None:
    # The stream is open (the client still sends): h2's state machines take the inputs.
    twins = []
    for _ in range(2):
        client, server = pair()
        twins.append((server, request(client, server, end_stream=False)))
    (by_h2, stream_id), (by_us, same_id) = twins
    by_h2.send_headers(stream_id, RESPONSE)
    by_h2.send_data(stream_id, b"x" * 5, end_stream=True)
    assert h2compat.account_whole_response(by_us, same_id, 5)
    assert stream_state(by_us, same_id) is StreamState.HALF_CLOSED_LOCAL
    assert vars(by_us.streams[same_id].state_machine) == vars(
        by_h2.streams[stream_id].state_machine
    )
    assert by_us.outbound_flow_control_window == by_h2.outbound_flow_control_window
