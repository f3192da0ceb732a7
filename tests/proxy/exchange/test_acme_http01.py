"""ACME HTTP-01 challenges answered before routing (proxy/exchange/acme_http01.py): the
key authorization for a pending token of an ACME name, 404 for any other token of it,
and routing as usual for every other name or path. Real Runtimes from routes.yaml text."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from proxy.config.load import parse_config
from proxy.core.body import Body
from proxy.core.models import Request, Response
from proxy.exchange.acme_http01 import http01_hosts
from proxy.exchange.runtime import Runtime

CONFIG = """
listeners:
  - bind: 127.0.0.1:0
  - bind: 127.0.0.1:0
    tls:
      acme: {{directory: "https://acme.example/dir", domains: [a.example.com, b.example.com],
              storage: "{storage}"}}
  - bind: 127.0.0.1:0
    tls:
      acme: {{directory: "https://acme.example/dir", domains: [c.example.com],
              storage: "{storage}", challenge: tls-alpn-01}}
upstreams: {{}}
routes:
  - name: hello
    match: {{path_prefix: /}}
    respond: {{status: 200, body: "routed"}}
"""
PATH = "/.well-known/acme-challenge/"


@pytest.fixture
async def runtime(tmp_path: Path) -> AsyncIterator[Runtime]:
    built = Runtime(parse_config(CONFIG.format(storage=tmp_path)), "httptools")
    built.http01_tokens.replace({"tok3n": "tok3n.thumbprint"})
    yield built
    await built.aclose()


async def exchange(runtime: Runtime, host: str, target: str, method: str = "GET") -> Response:
    request = Request(method, target.encode(), [(b"host", host.encode())], Body.from_bytes(b""))
    answered: list[Response] = []
    run = runtime.dispatcher.start(request, answered.append)
    if run is not None:
        answered.append(await run())
    assert len(answered) == 1
    return answered[0]


async def body_of(response: Response) -> bytes:
    return await response.body.read_joined()


def test_only_the_names_proved_by_http01_are_answered(runtime: Runtime) -> None:
    assert http01_hosts(runtime.config) == {"a.example.com", "b.example.com"}


@pytest.mark.parametrize("host", ["a.example.com", "B.Example.com:80", "a.example.com."])
async def test_a_pending_token_is_answered_with_its_key_authorization(
    runtime: Runtime, host: str
) -> None:
    response = await exchange(runtime, host, PATH + "tok3n")
    assert response.status == 200
    assert response.headers["Content-Type"] == "text/plain"
    assert await body_of(response) == b"tok3n.thumbprint"


async def test_head_is_answered_too(runtime: Runtime) -> None:
    assert (await exchange(runtime, "a.example.com", PATH + "tok3n", "HEAD")).status == 200


@pytest.mark.parametrize(("method", "token"), [("GET", "other"), ("GET", ""), ("POST", "tok3n")])
async def test_any_other_token_of_an_acme_name_is_404(
    runtime: Runtime, method: str, token: str
) -> None:
    response = await exchange(runtime, "a.example.com", PATH + token, method)
    assert response.status == 404
    assert b'"error": "acme_challenge_unknown"' in await body_of(response)


@pytest.mark.parametrize(
    ("host", "target"),
    [
        ("other.example.com", PATH + "tok3n"),  # another name: maybe an upstream's own
        ("c.example.com", PATH + "tok3n"),  # proved by tls-alpn-01
        ("a.example.com", "/.well-known/other"),
        ("a.example.com", "/"),
    ],
)
async def test_everything_else_is_routed(runtime: Runtime, host: str, target: str) -> None:
    response = await exchange(runtime, host, target)
    assert (response.status, await body_of(response)) == (200, b"routed")


async def test_the_tokens_outlive_a_reload(runtime: Runtime, tmp_path: Path) -> None:
    reloaded = Runtime(runtime.config, "httptools", previous=runtime)
    try:
        assert reloaded.http01_tokens is runtime.http01_tokens
        response = await exchange(reloaded, "a.example.com", PATH + "tok3n")
        assert await body_of(response) == b"tok3n.thumbprint"
    finally:
        await reloaded.discard(runtime)


async def test_without_acme_names_nothing_is_answered(tmp_path: Path) -> None:
    text = CONFIG.format(storage=tmp_path).replace(
        "domains: [a.example.com, b.example.com],",
        "domains: [c.example.com], challenge: tls-alpn-01,",
    )
    runtime = Runtime(parse_config(text), "httptools")
    try:
        runtime.http01_tokens.replace({"tok3n": "tok3n.thumbprint"})
        response = await exchange(runtime, "a.example.com", PATH + "tok3n")
        assert (response.status, await body_of(response)) == (200, b"routed")
    finally:
        await runtime.aclose()
