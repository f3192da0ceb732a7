"""Middleware chains run without a task (proxy/exchange/eager.py): `EagerRun` drives a
chain's coroutine by hand until it finishes or waits on something real, which a task then
carries; at the chain's end the fast path sends the request on an idle connection and the
upstream's answer resumes the chain. The first tests drive EagerRun with chains written
here; the others start a real Runtime's eager route (tests.support.plugins.stamp:EagerStamp)
through its dispatcher, against a real upstream on 127.0.0.1."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import pytest

from proxy.config.load import parse_config
from proxy.core.body import Body
from proxy.core.exchange import Exchange
from proxy.core.models import Request, Response
from proxy.exchange.eager import EagerRun, Reply
from proxy.exchange.runtime import Runtime
from tests.support.helpers import eventually
from tests.support.plugins import stamp
from tests.support.upstreams import UpstreamServer

Answers = list[Response]


def bodiless(target: bytes = b"/echo/x") -> Request:
    return Request("GET", target, [(b"host", b"app.example")], Body.from_bytes(b""))


def run_of(request: Request, chain: Coroutine[Any, Any, Response], reply: Reply) -> EagerRun:
    """An EagerRun as the dispatcher makes one, on the request's Exchange context."""
    return EagerRun(request, request.exchange, chain, reply)


def recorder() -> tuple[Answers, Reply]:
    answers: Answers = []
    return answers, answers.append


async def answered(answers: Answers) -> Response:
    await eventually(lambda: bool(answers), "the chain's answer")
    assert len(answers) == 1
    return answers[0]


def exchange_of(request: Request) -> Exchange:
    return request.exchange


def eager_of(request: Request) -> EagerRun | None:
    """The chain run the dispatcher left on the request's context, if any."""
    run = request.exchange.eager
    assert run is None or isinstance(run, EagerRun)
    return run


# -- EagerRun driving chains written here ---------------------------------------------


async def test_a_chain_that_never_waits_is_answered_before_start_returns() -> None:
    async def chain() -> Response:
        return Response(204)

    answers, callback = recorder()
    request = bodiless()
    run = run_of(request, chain(), callback)
    run.start()
    assert [response.status for response in answers] == [204]
    assert run.finished
    assert not run.eager


async def test_a_chain_that_waits_on_something_else_is_carried_on_by_a_task() -> None:
    outer = asyncio.current_task()
    carried_by: list[asyncio.Task[object] | None] = []

    async def chain() -> Response:
        await asyncio.sleep(0.01)  # a real wait: not `call_next` on the fast path
        carried_by.append(asyncio.current_task())
        return Response(200)

    answers, callback = recorder()
    request = bodiless()
    run = run_of(request, chain(), callback)
    run.start()
    assert exchange_of(request).eager is run
    assert answers == []
    assert not run.eager  # a task carries it now
    assert (await answered(answers)).status == 200
    assert carried_by[0] is not None
    assert carried_by[0] is not outer


@pytest.mark.parametrize("waits_first", [False, True])
async def test_a_chain_that_raises_is_answered_500_and_logged(
    waits_first: bool, caplog: pytest.LogCaptureFixture
) -> None:
    async def chain() -> Response:
        if waits_first:
            await asyncio.sleep(0)
        raise RuntimeError("a bug in a middleware")

    answers, callback = recorder()
    run_of(bodiless(), chain(), callback).start()
    response = await answered(answers)
    assert response.status == 500
    assert "a bug in a middleware" in caplog.text


@pytest.mark.parametrize("answers_the_cancel", [False, True])
async def test_cancelling_a_chain_a_task_carries_cancels_it_and_drops_its_answer(
    answers_the_cancel: bool,
) -> None:
    saw: list[str] = []

    async def chain() -> Response:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            saw.append("cancelled")
            if answers_the_cancel:  # as an access log recording 499 might
                return Response(499)
            raise
        return Response(200)

    answers, callback = recorder()
    request = bodiless()
    run = run_of(request, chain(), callback)
    run.start()
    await asyncio.sleep(0)
    exchange_of(request).cancel()  # as a front end does when its client goes away
    await eventually(lambda: saw == ["cancelled"], "the chain to see the cancel")
    await asyncio.sleep(0.01)
    assert answers == []
    assert run.finished


# -- an eager route of a real Runtime ---------------------------------------------------


def eager_config(url: str) -> str:
    return f"""
listeners: [{{bind: 127.0.0.1:0}}]
upstreams: {{app: {{endpoints: [{url}]}}}}
middleware:
  stamp: {{type: "tests.support.plugins.stamp:EagerStamp", value: eager}}
routes:
  - {{name: all, match: {{path_prefix: /}}, upstream: app, middleware: [stamp]}}
"""


@pytest.fixture
async def runtime_for() -> AsyncIterator[Callable[[UpstreamServer], Runtime]]:
    runtimes: list[Runtime] = []

    def build(server: UpstreamServer) -> Runtime:
        runtime = Runtime(parse_config(eager_config(server.url)), "httptools")
        runtimes.append(runtime)
        return runtime

    yield build
    for runtime in runtimes:
        await runtime.aclose()
    await asyncio.sleep(0.01)  # the closed transports' connection_lost


async def warm(runtime: Runtime) -> None:
    """One exchange in a task (a body: not eager), leaving an idle upstream connection."""
    request = Request("POST", b"/echo/warm", [(b"host", b"a")], Body.from_bytes(b"x"))
    run = runtime.dispatcher.start(request, lambda response: None)
    assert run is not None
    response = await run()
    while await response.body.read():
        pass


def stamps(response: Response) -> list[str]:
    return response.headers.getall("X-Stamp", [])


@pytest.mark.socket
async def test_on_the_fast_path_the_chain_waits_for_the_upstream_without_a_task(
    runtime_for: Callable[[UpstreamServer], Runtime], h1_upstream: UpstreamServer
) -> None:
    runtime = runtime_for(h1_upstream)
    await warm(runtime)
    answers, callback = recorder()
    request = bodiless(b"/echo/fast")
    assert runtime.dispatcher.start(request, callback) is None  # no task
    run = eager_of(request)
    assert run is not None
    assert run.eager  # suspended on the upstream's answer, no task
    response = await answered(answers)
    assert (response.status, stamps(response)) == (200, ["eager"])  # the chain saw it
    assert h1_upstream.requests[-1].header("X-Stamp") == "eager"
    assert h1_upstream.connections == 1


@pytest.mark.socket
async def test_without_an_idle_connection_the_chain_is_handed_to_a_task(
    runtime_for: Callable[[UpstreamServer], Runtime], h1_upstream: UpstreamServer
) -> None:
    runtime = runtime_for(h1_upstream)
    answers, callback = recorder()
    request = bodiless()
    assert runtime.dispatcher.start(request, callback) is None  # no task
    run = eager_of(request)
    assert run is not None
    assert not run.eager  # handed to a task
    response = await answered(answers)
    assert (response.status, stamps(response)) == (200, ["eager"])


@pytest.mark.socket
async def test_the_keep_alive_race_on_the_fast_path_is_retried_in_a_task(
    runtime_for: Callable[[UpstreamServer], Runtime],
) -> None:
    server = await UpstreamServer(drop_reused=True).start()
    try:
        runtime = runtime_for(server)
        await warm(runtime)
        answers, callback = recorder()
        request = bodiless(b"/echo/raced")
        assert runtime.dispatcher.start(request, callback) is None  # no task
        response = await answered(answers)
        assert (response.status, stamps(response)) == (200, ["eager"])  # the chain saw it
        assert (server.dropped, server.connections) == (1, 2)
    finally:
        await server.stop()


@pytest.mark.socket
async def test_a_client_gone_while_the_chain_waits_eagerly_cancels_it_and_drops_the_answer(
    runtime_for: Callable[[UpstreamServer], Runtime],
    h1_upstream: UpstreamServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    runtime = runtime_for(h1_upstream)
    await warm(runtime)
    stamp.EVENTS.clear()
    answers, callback = recorder()
    request = bodiless(b"/slow/100")
    assert runtime.dispatcher.start(request, callback) is None  # no task
    run = eager_of(request)
    assert run is not None
    assert run.eager
    exchange_of(request).cancel()  # as a front end does when its client goes away
    assert stamp.EVENTS == ["cancelled:stamp"]  # the middleware saw the cancel
    await eventually(
        lambda: [r.target for r in h1_upstream.requests][-1:] == ["/slow/100"],
        "the upstream to get the request",
    )
    await asyncio.sleep(0.3)  # past the upstream's answer
    assert answers == []
    assert run.finished
    assert [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] == []
