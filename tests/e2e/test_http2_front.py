"""The HTTP/2 front end end to end: curl, httpx and a raw h2 client against an in-process
gateway, in front of a real HTTP/1.1 upstream (tests/support/upstreams/h1.py)."""

from __future__ import annotations

import asyncio
import json
import shutil
import ssl

import httpx
import pytest

from proxy.process.server import Server
from tests.support.gateway import GatewayFactory, base_url, simple_config
from tests.support.h2_client import H2Client
from tests.support.helpers import eventually
from tests.support.tls import TlsFiles
from tests.support.upstreams import UpstreamServer

pytestmark = pytest.mark.socket


def tls_config(upstream: UpstreamServer, tls: TlsFiles, *, extra: str = "") -> str:
    """One TLS listener in front of `upstream`."""
    return f"""
listeners:
  - bind: 127.0.0.1:0
    tls: {{cert: {tls.cert}, key: {tls.key}}}
upstreams:
  app:
    endpoints: [{upstream.url}]
routes:
  - name: all
    match: {{path_prefix: /}}
    upstream: app
{extra}
"""


async def curl(*args: str) -> tuple[int, str, str]:
    """Run curl; (exit code, stdout, stderr)."""
    assert shutil.which("curl"), "curl is a test dependency"
    process = await asyncio.create_subprocess_exec(
        "curl",
        "--silent",
        "--show-error",
        "--max-time",
        "10",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate()
    return process.returncode or 0, out.decode(), err.decode()


@pytest.fixture
async def h2_gateway(gateway_factory: GatewayFactory, h1_upstream: UpstreamServer) -> Server:
    """A plaintext gateway (HTTP/1.1 and h2c on one port) in front of `upstream`."""
    return await gateway_factory(simple_config(h1_upstream.url, "httptools"))


def address(server: Server) -> tuple[str, int]:
    """The gateway's first listener."""
    host, port = server.addresses[0]
    return host, port


# --- real clients -------------------------------------------------------------------------


async def test_curl_with_prior_knowledge_gets_an_http2_answer_from_an_http1_upstream(
    h2_gateway: Server, h1_upstream: UpstreamServer
) -> None:
    code, out, err = await curl(
        "--http2-prior-knowledge", "--include", f"{base_url(h2_gateway)}/api/items?x=1"
    )

    assert code == 0, err
    assert out.startswith("HTTP/2 200")
    payload = json.loads(out.split("\r\n\r\n", 1)[1])
    assert payload["method"] == "GET"
    assert payload["target"] == "/api/items?x=1"
    seen = h1_upstream.requests[-1]
    assert seen.header("via") == "2 gatehouse"
    assert seen.header("host") == f"127.0.0.1:{h2_gateway.addresses[0][1]}"


async def test_curl_posts_a_body_over_h2c(h2_gateway: Server, h1_upstream: UpstreamServer) -> None:
    code, out, err = await curl(
        "--http2-prior-knowledge", "--data-binary", "hello over h2", f"{base_url(h2_gateway)}/p"
    )

    assert code == 0, err
    payload = json.loads(out)
    assert payload["method"] == "POST"
    assert payload["body"] == "hello over h2"


async def test_http1_and_h2c_share_the_plaintext_port(h2_gateway: Server) -> None:
    async with httpx.AsyncClient() as http1:
        response1 = await http1.get(f"{base_url(h2_gateway)}/one")
    async with httpx.AsyncClient(http1=False, http2=True) as http2:
        response2 = await http2.get(f"{base_url(h2_gateway)}/two")

    assert (response1.http_version, response1.status_code) == ("HTTP/1.1", 200)
    assert (response2.http_version, response2.status_code) == ("HTTP/2", 200)


async def test_httpx_runs_many_concurrent_streams_on_one_connection(
    h2_gateway: Server, h1_upstream: UpstreamServer
) -> None:
    async with httpx.AsyncClient(http1=False, http2=True, timeout=10) as client:
        responses = await asyncio.gather(
            *(client.get(f"{base_url(h2_gateway)}/slow/{50 + i}") for i in range(40))
        )

    assert [r.status_code for r in responses] == [200] * 40
    assert {r.text for r in responses} == {"slow"}
    assert len(h2_gateway.connections) == 0 or len(h2_gateway.connections) == 1


async def test_h2_listener_can_turn_http2_off(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer
) -> None:
    config = simple_config(h1_upstream.url, "httptools").replace(
        "  - bind: 127.0.0.1:0", "  - bind: 127.0.0.1:0\n    http2: false"
    )
    server = await gateway_factory(config)

    code, out, _ = await curl("--http2-prior-knowledge", "--include", f"{base_url(server)}/x")

    assert code != 0 or not out.startswith("HTTP/2")


# --- TLS and ALPN ---------------------------------------------------------------------------


async def test_curl_negotiates_h2_by_alpn_over_tls(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer, tls_files: TlsFiles
) -> None:
    server = await gateway_factory(tls_config(h1_upstream, tls_files))
    port = server.addresses[0][1]

    code, out, err = await curl(
        "--http2", "--cacert", str(tls_files.ca), "--include", f"https://localhost:{port}/tls"
    )

    assert code == 0, err
    assert out.startswith("HTTP/2 200")
    assert h1_upstream.requests[-1].header("x-forwarded-proto") == "https"


async def test_http1_over_tls_when_the_client_offers_only_http1(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer, tls_files: TlsFiles
) -> None:
    server = await gateway_factory(tls_config(h1_upstream, tls_files))
    port = server.addresses[0][1]

    code, out, err = await curl(
        "--http1.1", "--cacert", str(tls_files.ca), "--include", f"https://localhost:{port}/t"
    )

    assert code == 0, err
    assert out.startswith("HTTP/1.1 200")
    assert h1_upstream.requests[-1].header("x-forwarded-proto") == "https"


async def test_httpx_http2_over_tls(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer, tls_files: TlsFiles
) -> None:
    server = await gateway_factory(tls_config(h1_upstream, tls_files))
    port = server.addresses[0][1]
    context = tls_files.client_context(["h2", "http/1.1"])

    async with httpx.AsyncClient(http2=True, verify=context) as client:
        response = await client.post(f"https://localhost:{port}/echo", content=b"x" * 100_000)

    assert response.http_version == "HTTP/2"
    assert response.json()["body_size"] == 100_000


async def test_tls_min_version_is_enforced(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer, tls_files: TlsFiles
) -> None:
    default = await gateway_factory(tls_config(h1_upstream, tls_files))
    strict = await gateway_factory(
        tls_config(h1_upstream, tls_files).replace("key: ", "min_version: '1.3', key: ")
    )
    tls12 = tls_files.client_context(["http/1.1"])
    tls12.maximum_version = ssl.TLSVersion.TLSv1_2

    _, writer = await asyncio.open_connection(*address(default), ssl=tls12)
    assert writer.get_extra_info("ssl_object").version() == "TLSv1.2"
    writer.close()
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await asyncio.open_connection(*address(strict), ssl=tls12, server_hostname="localhost")


async def test_reloaded_certificate_is_served_to_new_connections(
    gateway_factory: GatewayFactory,
    h1_upstream: UpstreamServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    from tests.support.tls import make_tls_files

    first = make_tls_files(tmp_path_factory.mktemp("first"))
    second = make_tls_files(tmp_path_factory.mktemp("second"))
    server = await gateway_factory(tls_config(h1_upstream, first))
    _host, port = address(server)
    url = f"https://localhost:{port}/"

    async with httpx.AsyncClient(verify=first.client_context(["http/1.1"])) as client:
        assert (await client.get(url)).status_code == 200
    # A renewed certificate is written over the same files; the reload picks it up.
    first.cert.write_bytes(second.cert.read_bytes())
    first.key.write_bytes(second.key.read_bytes())
    server.reload_certificates()

    async with httpx.AsyncClient(verify=second.client_context(["http/1.1"])) as client:
        assert (await client.get(url)).status_code == 200
    async with httpx.AsyncClient(verify=first.client_context(["http/1.1"])) as client:
        with pytest.raises(httpx.ConnectError):
            await client.get(url)


# --- protocol behaviour through a raw h2 client ----------------------------------------------


async def test_settings_advertise_the_configured_limits(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer
) -> None:
    extra = "http2: {max_concurrent_streams: 7, max_header_list_size: 4KiB}"
    server = await gateway_factory(simple_config(h1_upstream.url, "httptools", extra=extra))
    async with await H2Client.connect(*address(server)) as client:
        await client.wait_for("settings", lambda: 3 in client.remote_settings)

        assert client.remote_settings[3] == 7  # MAX_CONCURRENT_STREAMS
        assert client.remote_settings[6] == 4096  # MAX_HEADER_LIST_SIZE
        assert client.remote_settings[2] == 0  # ENABLE_PUSH


async def test_response_trailers_from_an_http1_upstream_reach_the_h2_client(
    h2_gateway: Server,
) -> None:
    async with await H2Client.connect(*address(h2_gateway)) as client:
        result = await client.request("/chunked/3/1000")

    assert result.status == 200
    assert len(result.body) == 3000
    assert result.trailers == [(b"x-trailer", b"done")]


async def test_request_trailers_and_te_trailers_reach_the_upstream(
    h2_gateway: Server, h1_upstream: UpstreamServer
) -> None:
    async with await H2Client.connect(*address(h2_gateway)) as client:
        result = await client.request(
            "/echo",
            method="POST",
            headers=[("te", "trailers")],
            body=b"payload",
            trailers=[("x-checksum", "abc")],
        )

    assert result.status == 200
    assert json.loads(result.body)["body"] == "payload"
    assert h1_upstream.requests[-1].header("te") == "trailers"


async def test_oversized_header_list_gets_431_and_the_connection_lives_on(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer
) -> None:
    extra = "http2: {max_header_list_size: 2KiB}"
    server = await gateway_factory(simple_config(h1_upstream.url, "httptools", extra=extra))
    async with await H2Client.connect(*address(server)) as client:
        big = await client.request("/big", headers=[("x-big", "v" * 3000)])
        small = await client.request("/small")

    assert big.status == 431
    assert json.loads(big.body)["error"] == "head_too_large"
    assert small.status == 200
    assert client.goaway is None


async def test_each_stream_is_served_concurrently(
    h2_gateway: Server, h1_upstream: UpstreamServer
) -> None:
    async with await H2Client.connect(*address(h2_gateway)) as client:
        requests = asyncio.gather(*(client.request(f"/held?{i}") for i in range(10)))
        # All ten reach the upstream while none has been answered: side by side, not one
        # after another (the upstream answers only when the test lets it).
        await eventually(lambda: len(h1_upstream.requests) == 10, "the ten exchanges at once")
        h1_upstream.release_held()
        results = await requests

    assert [r.status for r in results] == [200] * 10


async def test_a_client_reset_cancels_only_its_stream(
    h2_gateway: Server, h1_upstream: UpstreamServer
) -> None:
    async with await H2Client.connect(*address(h2_gateway)) as client:
        slow = client.send_request("/held")  # never answered
        await client.flush()
        await eventually(lambda: len(h1_upstream.requests) == 1, "the exchange to be under way")
        client.conn.reset_stream(slow)
        await client.flush()
        other = await client.request("/after")

    assert other.status == 200
    assert client.goaway is None


async def test_a_response_larger_than_the_clients_window_waits_for_window_updates(
    h2_gateway: Server,
) -> None:
    settings = {4: 1000}  # INITIAL_WINDOW_SIZE: the gateway may send 1000 bytes at a time
    async with await H2Client.connect(*address(h2_gateway), settings=settings) as client:
        result = await client.request("/bytes/200000", timeout_s=10)

    assert result.status == 200
    assert len(result.body) == 200_000


async def test_an_upload_is_acknowledged_only_as_it_is_forwarded(
    gateway_factory: GatewayFactory,
) -> None:
    # An upstream that takes the request and never reads its body: the client must run
    # out of window instead of pushing the whole upload into the gateway's memory.
    release = asyncio.Event()

    async def never_read(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await release.wait()
        writer.close()

    stalled = await asyncio.start_server(never_read, "127.0.0.1", 0)
    port = stalled.sockets[0].getsockname()[1]
    extra = "http2: {initial_window_size: 64KiB}"
    server = await gateway_factory(
        simple_config(f"http://127.0.0.1:{port}", "httptools", extra=extra)
    )
    total = 64 * 1024 * 1024
    try:
        async with await H2Client.connect(*address(server)) as client:
            stream_id = client.send_request("/upload", method="POST", end_stream=False)
            await client.flush()
            sender = asyncio.get_running_loop().create_task(
                client.send_body(stream_id, b"u" * total)
            )
            # The client runs out of window once the upstream's socket buffers are full
            # (seen twice, half a second apart), however long a busy machine takes to get
            # there; a gateway taking in the whole upload lets the sender finish instead.
            async with asyncio.timeout(20):
                while not sender.done():
                    if client.conn.local_flow_control_window(stream_id) == 0:
                        await asyncio.sleep(0.5)
                        if client.conn.local_flow_control_window(stream_id) == 0:
                            break
                    else:
                        await asyncio.sleep(0.05)
            window = client.conn.local_flow_control_window(stream_id)
            finished = sender.done()
            sender.cancel()
    finally:
        release.set()
        stalled.close()
        await asyncio.sleep(0.05)

    assert not finished
    assert window == 0


async def test_many_streams_waiting_on_a_client_that_reads_late_all_complete(
    h2_gateway: Server,
) -> None:
    # Regression: when the client stopped reading, every stream writing to it waited on
    # the connection's drain; only the last waiter was ever woken, the others hung.
    import h2.config
    import h2.connection
    import h2.events

    reader, writer = await asyncio.open_connection(*address(h2_gateway))
    conn = h2.connection.H2Connection(h2.config.H2Configuration(header_encoding=None))
    conn.initiate_connection()
    conn.increment_flow_control_window(2**30)
    conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 2**30})
    streams = []
    for _ in range(4):
        stream_id = conn.get_next_available_stream_id()
        conn.send_headers(
            stream_id,
            [
                (":method", "GET"),
                (":scheme", "http"),
                (":authority", "t"),
                (":path", "/bytes/3000000"),
            ],
            end_stream=True,
        )
        streams.append(stream_id)
    writer.write(conn.data_to_send())
    await asyncio.sleep(1.0)  # read nothing: the gateway's writes back up
    received = dict.fromkeys(streams, 0)
    ended: set[int] = set()
    async with asyncio.timeout(30):  # a bound on a hang, with room for a busy machine
        while len(ended) < len(streams):
            data = await reader.read(65536)
            assert data, "the gateway closed the connection"
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.DataReceived):
                    received[event.stream_id] += len(event.data or b"")
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, h2.events.StreamEnded):
                    ended.add(event.stream_id)
            writer.write(conn.data_to_send())
    writer.close()

    assert received == dict.fromkeys(streams, 3_000_000)


async def test_a_certificate_reload_with_a_mismatched_pair_keeps_the_old_certificate(
    gateway_factory: GatewayFactory,
    h1_upstream: UpstreamServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    from tests.support.tls import make_tls_files

    first = make_tls_files(tmp_path_factory.mktemp("kept"))
    other = make_tls_files(tmp_path_factory.mktemp("other"))
    server = await gateway_factory(tls_config(h1_upstream, first))
    url = f"https://localhost:{server.addresses[0][1]}/"
    first.cert.write_bytes(other.cert.read_bytes())  # half way through a renewal

    with pytest.raises(ssl.SSLError):
        server.reload_certificates()

    async with httpx.AsyncClient(verify=first.client_context(["http/1.1"])) as client:
        assert (await client.get(url)).status_code == 200
