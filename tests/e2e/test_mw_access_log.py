"""`access_log` through real sockets: the lines an in-process gateway writes to this
process's stdout (captured with capfd), for proxied, streamed, refused, failed, sampled
and abandoned requests, over HTTP/1.1 and HTTP/2."""

from __future__ import annotations

import asyncio
import json
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

Line = dict[str, object]


def config(upstream_url: str, log_options: str = "", chain: str = "[log, ids]") -> str:
    extra = f"""
middleware:
  log: {{type: access_log{log_options}}}
  ids: {{type: request_id}}
  small: {{type: body_limit, max: 100}}
global_middleware: {chain}
"""
    return simple_config(upstream_url, "auto", extra=extra)


async def logged(
    server: Server, capfd: pytest.CaptureFixture[str], *, err: bool = False, grace_s: float = 1.0
) -> list[Line]:
    """The JSON lines the gateway wrote, read after stopping it (with `grace_s` for what
    is still in flight): its close() has flushed them by then (reading the capture while
    the writer thread writes could lose some)."""
    await server.shutdown(grace_period=grace_s)
    out, error = capfd.readouterr()
    text = error if err else out
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


async def test_a_proxied_request_is_one_line_with_every_field(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer, capfd: pytest.CaptureFixture[str]
) -> None:
    server = await gateway_factory(config(h1_upstream.url))
    async with httpx.AsyncClient(timeout=5) as client:
        response = await client.post(
            base_url(server) + "/echo/users?token=secret",
            content=b"0123456789",
            headers={"User-Agent": "e2e-test/1.0"},
        )
    assert response.status_code == 200

    (line,) = await logged(server, capfd)
    assert line["request_id"] == response.headers["X-Request-ID"]
    assert line["client_ip"] == "127.0.0.1"
    assert line["method"] == "POST"
    assert line["host"] == base_url(server).removeprefix("http://")
    assert line["path"] == "/echo/users"  # no query string
    assert line["protocol"] == "HTTP/1.1"
    assert line["route"] == "all"
    assert line["endpoint"] == f"127.0.0.1:{h1_upstream.port}"
    assert line["status"] == 200
    assert line["bytes_in"] == 10
    assert line["bytes_out"] == len(response.content)
    assert line["user_agent"] == "e2e-test/1.0"
    assert line["consumer"] == ""
    upstream_s, duration_s = line["upstream_s"], line["duration_s"]
    assert isinstance(upstream_s, float)
    assert isinstance(duration_s, float)
    assert 0 < upstream_s <= duration_s < 5


async def test_a_streamed_response_is_logged_when_its_body_ends(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer, capfd: pytest.CaptureFixture[str]
) -> None:
    server = await gateway_factory(config(h1_upstream.url))
    async with httpx.AsyncClient(timeout=5) as client:
        chunked = await client.get(base_url(server) + "/chunked/5/1000")
        slow = await client.get(base_url(server) + "/slowbody/300")
    assert len(chunked.content) == 5000

    first, second = await logged(server, capfd)
    assert first["bytes_out"] == 5000
    assert second["bytes_out"] == len(slow.content) == 4
    duration_s = second["duration_s"]
    assert isinstance(duration_s, float)
    # The line was made when the late body had gone out (uvloop's clock counts ms).
    assert duration_s >= 0.3 - 0.001


async def test_error_replies_are_logged_with_their_status_and_size(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer, capfd: pytest.CaptureFixture[str]
) -> None:
    server = await gateway_factory(config(h1_upstream.url, chain="[log, ids, small]"))
    async with httpx.AsyncClient(timeout=5) as client:
        refused = await client.post(base_url(server) + "/echo/", content=b"x" * 101)
        head = await client.head(base_url(server) + "/bytes/50")
    await h1_upstream.stop()
    async with httpx.AsyncClient(timeout=5) as client:
        failed = await client.get(base_url(server) + "/echo/")
    assert (refused.status_code, head.status_code, failed.status_code) == (413, 200, 502)

    lines = await logged(server, capfd)
    assert [(line["method"], line["status"]) for line in lines] == [
        ("POST", 413),
        ("HEAD", 200),
        ("GET", 502),
    ]
    assert lines[0]["bytes_out"] == len(refused.content)
    assert lines[0]["request_id"] == refused.json()["request_id"]
    assert lines[0]["endpoint"] == ""  # refused before forwarding
    assert lines[1]["bytes_out"] == 0  # HEAD: no body bytes go out
    assert lines[2]["bytes_out"] == len(failed.content)


async def test_http2_requests_are_logged_too(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer, capfd: pytest.CaptureFixture[str]
) -> None:
    server = await gateway_factory(config(h1_upstream.url))
    async with httpx.AsyncClient(http1=False, http2=True, timeout=5) as client:
        response = await client.get(base_url(server) + "/bytes/1234")
    assert response.http_version == "HTTP/2"

    (line,) = await logged(server, capfd)
    assert (line["protocol"], line["status"], line["bytes_out"]) == ("HTTP/2", 200, 1234)


async def test_sampling_keeps_server_errors(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer, capfd: pytest.CaptureFixture[str]
) -> None:
    server = await gateway_factory(config(h1_upstream.url, ", sample: 0, fields: [status, path]"))
    async with httpx.AsyncClient(timeout=5) as client:
        for path in ("/echo/a", "/status/404", "/status/503", "/echo/b", "/status/500"):
            await client.get(base_url(server) + path)

    lines = await logged(server, capfd)
    await asyncio.sleep(0.1)
    lines += await logged(server, capfd)
    assert lines == [{"status": 503, "path": "/status/503"}, {"status": 500, "path": "/status/500"}]


async def test_a_client_that_leaves_before_the_answer_is_logged_as_499(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer, capfd: pytest.CaptureFixture[str]
) -> None:
    options = ", fields: [status, path, bytes_out, duration_s]"
    server = await gateway_factory(config(h1_upstream.url, options))
    async with await H2Client.connect(*server.addresses[0]) as client:
        stream_id = client.send_request("/held")  # never answered
        await client.flush()
        await eventually(lambda: len(h1_upstream.requests) == 1, "the request to wait on it")
        client.conn.reset_stream(stream_id)  # the client gives up (RST_STREAM CANCEL)
        await client.flush()
        await asyncio.sleep(0.1)

    # Logged when the client left, not when shutdown cut the exchange at the end of its
    # grace period (5 s: far from the first, however busy the machine).
    (line,) = await logged(server, capfd, grace_s=5.0)
    duration_s = line.pop("duration_s")
    assert line == {"status": 499, "path": "/held", "bytes_out": 0}
    assert isinstance(duration_s, float)
    assert duration_s < 5.0


async def test_output_stderr(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer, capfd: pytest.CaptureFixture[str]
) -> None:
    server = await gateway_factory(config(h1_upstream.url, ", output: stderr, fields: [status]"))
    async with httpx.AsyncClient(timeout=5) as client:
        await client.get(base_url(server) + "/echo/")

    assert await logged(server, capfd, err=True) == [{"status": 200}]


async def test_shutdown_flushes_what_is_queued(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer, capfd: pytest.CaptureFixture[str]
) -> None:
    server = await gateway_factory(config(h1_upstream.url, ", fields: [path]"))
    async with httpx.AsyncClient(timeout=5) as client:
        await asyncio.gather(*(client.get(f"{base_url(server)}/echo/{n}") for n in range(50)))
    await server.shutdown(grace_period=1.0)

    out, _ = capfd.readouterr()  # no waiting: close() wrote everything before returning
    paths = sorted(json.loads(line)["path"] for line in out.splitlines() if line.startswith("{"))
    assert paths == sorted(f"/echo/{n}" for n in range(50))


async def test_error_tells_a_gateway_reply_from_the_upstreams_own_status(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer, capfd: pytest.CaptureFixture[str]
) -> None:
    options = ", fields: [status, path, error, endpoint]"
    server = await gateway_factory(config(h1_upstream.url, options))
    async with httpx.AsyncClient(timeout=5) as client:
        theirs = await client.get(base_url(server) + "/status/502")
        await h1_upstream.stop()
        ours = await client.get(base_url(server) + "/status/502")
    assert theirs.status_code == ours.status_code == 502

    first, second = await logged(server, capfd)
    assert first == {
        "status": 502,
        "path": "/status/502",
        "error": "",  # the upstream's own 502
        "endpoint": f"127.0.0.1:{h1_upstream.port}",
    }
    assert second["status"] == 502
    assert second["error"] == ours.json()["error"]  # the gateway's: what its reply says
    assert second["error"] != ""


async def test_tls_names_the_client_connections_version(
    gateway_factory: GatewayFactory,
    h1_upstream: UpstreamServer,
    capfd: pytest.CaptureFixture[str],
    tls_files: TlsFiles,
) -> None:
    listeners = f"""
listeners:
  - bind: 127.0.0.1:0
  - bind: 127.0.0.1:0
    tls: {{cert: {tls_files.cert}, key: {tls_files.key}}}
"""
    text = config(h1_upstream.url, ", fields: [protocol, tls]").replace(
        "\nlisteners:\n  - bind: 127.0.0.1:0\n", listeners, 1
    )
    server = await gateway_factory(text)
    (plain_host, plain_port), (tls_host, tls_port) = server.addresses[:2]
    context = ssl.create_default_context(cafile=str(tls_files.ca))
    async with httpx.AsyncClient(verify=context, timeout=5) as client:
        await client.get(f"http://{plain_host}:{plain_port}/echo/")
        await client.get(f"https://{tls_host}:{tls_port}/echo/")
    async with httpx.AsyncClient(verify=context, http1=False, http2=True, timeout=5) as client:
        await client.get(f"https://{tls_host}:{tls_port}/echo/")

    assert await logged(server, capfd) == [
        {"protocol": "HTTP/1.1", "tls": ""},
        {"protocol": "HTTP/1.1", "tls": "TLSv1.3"},
        {"protocol": "HTTP/2", "tls": "TLSv1.3"},
    ]
