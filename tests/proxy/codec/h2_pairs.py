"""Connections of h2's the h2compat tests drive: a client and a server, with or without their
prefaces exchanged, and a request between them (tests/proxy/codec/test_h2compat*.py)."""

from __future__ import annotations

import h2.config
import h2.connection
import h2.settings
from h2.settings import SettingCodes
from h2.stream import StreamState

REQUEST = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"t"), (b":path", b"/")]
RESPONSE = [(b":status", b"200"), (b"content-type", b"text/plain")]


def initiated(
    server_config: h2.config.H2Configuration | None = None,
) -> tuple[h2.connection.H2Connection, h2.connection.H2Connection]:
    """(client, server), each with its preface queued and nothing exchanged yet."""
    client = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=True, header_encoding=None)
    )
    server = h2.connection.H2Connection(
        server_config or h2.config.H2Configuration(client_side=False, header_encoding=None)
    )
    client.initiate_connection()
    server.initiate_connection()
    return client, server


def pair(
    server_config: h2.config.H2Configuration | None = None,
) -> tuple[h2.connection.H2Connection, h2.connection.H2Connection]:
    """(client, server), prefaces exchanged."""
    client, server = initiated(server_config)
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    server.receive_data(client.data_to_send())
    return client, server


def request(
    client: h2.connection.H2Connection,
    server: h2.connection.H2Connection,
    *,
    end_stream: bool = True,
) -> int:
    """A GET the server has received: its stream id."""
    stream_id = client.get_next_available_stream_id()
    client.send_headers(stream_id, REQUEST, end_stream=end_stream)
    server.receive_data(client.data_to_send())
    return stream_id


def stream_state(conn: h2.connection.H2Connection, stream_id: int) -> StreamState:
    return conn.streams[stream_id].state_machine.state


def streams_settings(count: int) -> h2.settings.Settings:
    return h2.settings.Settings(
        client=False, initial_values={SettingCodes.MAX_CONCURRENT_STREAMS: count}
    )
