"""A chain of middleware that offer phases runs as one function (proxy/exchange/phased.py):
request phases in order, the fast path or the forwarder's task, response phases in
reverse; an early answer, a ProxyError passing outwards to an error phase, a client
going away and a bug each reach the middleware as the coroutine chain would have them.
Each test starts a real Runtime (tests.support.plugins.stamp:PhasedStamp) through its
dispatcher against a real upstream on 127.0.0.1."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest

from proxy.config.load import parse_config
from proxy.core.body import Body
from proxy.core.models import Request, Response
from proxy.exchange.phased import PhasedRun, _drop
from proxy.exchange.runtime import Runtime
from tests.support.helpers import eventually
from tests.support.plugins import stamp
from tests.support.upstreams import UpstreamServer

pytestmark = pytest.mark.socket

Answers = list[Response]


def config(url: str, *, outer_answers_errors: bool = False) -> str:
    answer = ", answer_errors: true" if outer_answers_errors else ""
    phased = "tests.support.plugins.stamp:PhasedStamp"
    return f"""
listeners: [{{bind: 127.0.0.1:0}}]
upstreams: {{app: {{endpoints: [{url}]}}}}
middleware:
  outer: {{type: "{phased}", value: outer{answer}}}
  inner: {{type: "{phased}", value: inner, refuse_header: X-Refuse}}
routes:
  - {{name: all, match: {{path_prefix: /}}, upstream: app, middleware: [outer, inner]}}
"""


@pytest.fixture
async def runtime_for() -> AsyncIterator[Callable[..., Runtime]]:
    runtimes: list[Runtime] = []

    def build(server: UpstreamServer, **options: bool) -> Runtime:
        runtime = Runtime(parse_config(config(server.url, **options)), "httptools")
        runtimes.append(runtime)
        return runtime

    yield build
    for runtime in runtimes:
        await runtime.aclose()
    await asyncio.sleep(0.01)  # the closed transports' connection_lost


def bodiless(
    target: bytes = b"/echo/x", headers: list[tuple[bytes, bytes]] | None = None
) -> Request:
    return Request("GET", target, [(b"host", b"a"), *(headers or [])], Body.from_bytes(b""))


async def warm(runtime: Runtime) -> None:
    """One exchange in a task (a body: not phased), leaving an idle upstream connection."""
    request = Request("POST", b"/echo/warm", [(b"host", b"a")], Body.from_bytes(b"x"))
    run = runtime.dispatcher.start(request, lambda response: None)
    assert run is not None
    response = await run()
    while await response.body.read():
        pass


async def answer_of(runtime: Runtime, request: Request) -> Response:
    answers: Answers = []
    stamp.EVENTS.clear()
    assert runtime.dispatcher.start(request, answers.append) is None  # no task
    await eventually(lambda: bool(answers), "the chain's answer")
    assert len(answers) == 1
    return answers[0]


def stamps(response: Response) -> list[str]:
    return response.headers.getall("X-Stamp", [])


async def test_the_route_runs_phased_on_the_fast_path_without_a_task(
    runtime_for: Callable[..., Runtime], h1_upstream: UpstreamServer
) -> None:
    runtime = runtime_for(h1_upstream)
    assert runtime.routes["all"].phased is not None
    await warm(runtime)
    answers: Answers = []
    request = bodiless(b"/echo/fast")
    tasks = len(asyncio.all_tasks())
    assert runtime.dispatcher.start(request, answers.append) is None
    assert isinstance(request.exchange.eager, PhasedRun)  # waiting for the upstream
    assert len(asyncio.all_tasks()) == tasks  # and no task made for it
    await eventually(lambda: bool(answers), "the chain's answer")
    response = answers[0]
    assert (response.status, stamps(response)) == (200, ["inner", "outer"])
    assert h1_upstream.requests[-1].header("X-Stamp") == "outer,inner"
    assert h1_upstream.connections == 1
    assert request.exchange.upstream_s > 0
    assert not isinstance(request.exchange.eager, PhasedRun)  # answered: no longer kept


async def test_without_an_idle_connection_the_forwarder_runs_in_a_task(
    runtime_for: Callable[..., Runtime], h1_upstream: UpstreamServer
) -> None:
    runtime = runtime_for(h1_upstream)
    response = await answer_of(runtime, bodiless())
    assert (response.status, stamps(response)) == (200, ["inner", "outer"])
    assert stamp.EVENTS == ["request:outer", "request:inner", "response:inner", "response:outer"]


async def test_a_request_phase_answering_stops_the_request_there(
    runtime_for: Callable[..., Runtime], h1_upstream: UpstreamServer
) -> None:
    runtime = runtime_for(h1_upstream)
    response = await answer_of(runtime, bodiless(headers=[(b"X-Answer-At", b"inner")]))
    assert (response.status, response.header("X-Answered-By")) == (203, "inner")
    assert stamps(response) == ["outer"]  # only the middleware before it saw the answer
    assert stamp.EVENTS == ["request:outer", "request:inner", "response:outer"]
    assert h1_upstream.requests == []


async def test_a_refusal_passes_outwards_as_a_local_reply(
    runtime_for: Callable[..., Runtime], h1_upstream: UpstreamServer
) -> None:
    runtime = runtime_for(h1_upstream)
    response = await answer_of(runtime, bodiless(headers=[(b"X-Refuse", b"1")]))
    assert (response.status, stamps(response)) == (418, [])  # no error phase took it
    assert stamp.EVENTS == ["request:outer", "request:inner"]
    assert h1_upstream.requests == []


async def test_an_error_phase_turns_an_error_from_further_in_into_its_response(
    runtime_for: Callable[..., Runtime], h1_upstream: UpstreamServer
) -> None:
    runtime = runtime_for(h1_upstream, outer_answers_errors=True)
    response = await answer_of(runtime, bodiless(headers=[(b"X-Refuse", b"1")]))
    assert (response.status, response.header("X-Error")) == (299, "stamp_refused")
    assert stamps(response) == ["outer"]
    assert stamp.EVENTS == ["request:outer", "request:inner", "error:outer:418", "response:outer"]


async def test_an_upstream_failure_reaches_the_error_phase(
    runtime_for: Callable[..., Runtime], h1_upstream: UpstreamServer
) -> None:
    await h1_upstream.stop()  # connections refused: a 502 from the forwarder
    runtime = runtime_for(h1_upstream, outer_answers_errors=True)
    response = await answer_of(runtime, bodiless())
    assert response.status == 299
    assert response.header("X-Error") == "upstream_connect_failed"
    assert stamp.EVENTS == ["request:outer", "request:inner", "error:outer:502", "response:outer"]


async def test_a_bug_in_a_request_phase_is_a_500_the_entered_ones_hear(
    runtime_for: Callable[..., Runtime],
    h1_upstream: UpstreamServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    runtime = runtime_for(h1_upstream)
    response = await answer_of(runtime, bodiless(headers=[(b"X-Bug-At", b"inner")]))
    assert response.status == 500
    assert stamp.EVENTS == ["request:outer", "request:inner", "abort:outer:500"]
    assert any("inner has a bug" in (r.exc_text or "") for r in caplog.records)
    assert h1_upstream.requests == []


async def test_a_client_gone_while_waiting_aborts_every_entered_one_and_drops_the_answer(
    runtime_for: Callable[..., Runtime], h1_upstream: UpstreamServer
) -> None:
    runtime = runtime_for(h1_upstream)
    await warm(runtime)
    stamp.EVENTS.clear()
    answers: Answers = []
    request = bodiless(b"/slow/100")
    assert runtime.dispatcher.start(request, answers.append) is None
    run = request.exchange.eager
    assert isinstance(run, PhasedRun)
    request.exchange.cancel()  # as a front end does when its client goes away
    assert stamp.EVENTS == ["request:outer", "request:inner", "abort:inner:499", "abort:outer:499"]
    assert run.finished
    await eventually(
        lambda: [r.target for r in h1_upstream.requests][-1:] == ["/slow/100"],
        "the upstream to get the request",
    )
    await asyncio.sleep(0.3)  # past the upstream's answer
    assert answers == []
    assert stamp.EVENTS[-1] == "abort:outer:499"  # nothing after the abort


async def test_a_client_gone_while_the_forwarder_task_runs_cancels_it(
    runtime_for: Callable[..., Runtime], h1_upstream: UpstreamServer
) -> None:
    runtime = runtime_for(h1_upstream)  # no idle connection: the forwarder takes a task
    stamp.EVENTS.clear()
    answers: Answers = []
    request = bodiless(b"/slow/100")
    assert runtime.dispatcher.start(request, answers.append) is None
    await eventually(lambda: bool(h1_upstream.requests), "the upstream to get the request")
    request.exchange.cancel()
    assert stamp.EVENTS[-2:] == ["abort:inner:499", "abort:outer:499"]
    await asyncio.sleep(0.3)
    assert answers == []


# -- a request phase that waits (Pending) ---------------------------------------------------


async def test_a_waiting_phase_resumes_the_chain_from_its_future(
    runtime_for: Callable[..., Runtime], h1_upstream: UpstreamServer
) -> None:
    runtime = runtime_for(h1_upstream)
    await warm(runtime)
    stamp.EVENTS.clear()
    answers: Answers = []
    request = bodiless(headers=[(b"X-Wait-At", b"inner")])
    tasks = len(asyncio.all_tasks())
    assert runtime.dispatcher.start(request, answers.append) is None
    assert stamp.EVENTS == ["request:outer", "request:inner"]  # waiting, without a task
    assert len(asyncio.all_tasks()) == tasks
    stamp.WAITS["inner"].set_result("go")
    await eventually(lambda: bool(answers), "the chain's answer")
    assert (answers[0].status, stamps(answers[0])) == (200, ["inner", "outer"])
    assert stamp.EVENTS == [
        "request:outer",
        "request:inner",
        "resumed:inner:go",
        "response:inner",
        "response:outer",
    ]
    assert h1_upstream.requests[-1].header("X-Stamp") == "outer,inner"


async def test_a_refusal_after_a_wait_passes_outwards(
    runtime_for: Callable[..., Runtime], h1_upstream: UpstreamServer
) -> None:
    runtime = runtime_for(h1_upstream, outer_answers_errors=True)
    stamp.EVENTS.clear()
    answers: Answers = []
    assert (
        runtime.dispatcher.start(bodiless(headers=[(b"X-Wait-At", b"inner")]), answers.append)
        is None
    )
    stamp.WAITS["inner"].set_result("refuse")
    await eventually(lambda: bool(answers), "the chain's answer")
    assert (answers[0].status, answers[0].header("X-Error")) == (299, "stamp_refused")
    assert stamp.EVENTS[-2:] == ["error:outer:418", "response:outer"]
    assert h1_upstream.requests == []


async def test_a_client_gone_during_a_wait_cancels_it_and_aborts_the_ones_before(
    runtime_for: Callable[..., Runtime], h1_upstream: UpstreamServer
) -> None:
    runtime = runtime_for(h1_upstream)
    stamp.EVENTS.clear()
    answers: Answers = []
    request = bodiless(headers=[(b"X-Wait-At", b"inner")])
    assert runtime.dispatcher.start(request, answers.append) is None
    waited = stamp.WAITS["inner"]
    request.exchange.cancel()
    assert waited.cancelled()
    # The waiting one hears nothing (as a coroutine cancelled in its await), the one
    # before it hears 499; nothing resumes.
    assert stamp.EVENTS == ["request:outer", "request:inner", "abort:outer:499"]
    await asyncio.sleep(0.01)
    assert answers == []
    assert h1_upstream.requests == []


# -- a request phase that hands its request to its coroutine (Deferred) ---------------------


async def test_a_deferred_request_runs_the_coroutine_with_the_rest_of_the_chain(
    runtime_for: Callable[..., Runtime], h1_upstream: UpstreamServer
) -> None:
    runtime = runtime_for(h1_upstream)
    request = bodiless(headers=[(b"X-Defer-At", b"outer")])
    response = await answer_of(runtime, request)
    # outer's coroutine ran inner's (as a coroutine: no phase events) and the forwarding;
    # its answer is outer's, so outer's response phase did not run.
    assert (response.status, response.header("X-Deferred-By")) == (200, "outer")
    assert stamps(response) == ["inner", "outer"]  # added by each __call__
    assert stamp.EVENTS == ["request:outer", "deferred:outer"]
    assert h1_upstream.requests[-1].header("X-Stamp") == "outer,inner"
    assert request.exchange.upstream_s > 0


async def test_a_deferred_inner_answer_goes_through_the_outer_response_phases(
    runtime_for: Callable[..., Runtime], h1_upstream: UpstreamServer
) -> None:
    runtime = runtime_for(h1_upstream)
    request = bodiless(headers=[(b"X-Defer-At", b"inner")])
    response = await answer_of(runtime, request)
    assert (response.status, response.header("X-Deferred-By")) == (200, "inner")
    assert stamps(response) == ["inner", "outer"]  # inner's __call__, outer's phase
    assert stamp.EVENTS == ["request:outer", "request:inner", "deferred:inner", "response:outer"]
    assert h1_upstream.requests[-1].header("X-Stamp") == "outer,inner"
    assert request.exchange.upstream_s > 0  # the rest of the chain timed the forwarding


async def test_a_refusal_from_a_deferred_coroutine_passes_outwards(
    runtime_for: Callable[..., Runtime], h1_upstream: UpstreamServer
) -> None:
    runtime = runtime_for(h1_upstream, outer_answers_errors=True)
    response = await answer_of(
        runtime, bodiless(headers=[(b"X-Defer-At", b"inner"), (b"X-Refuse", b"1")])
    )
    assert (response.status, response.header("X-Error")) == (299, "stamp_refused")
    assert stamp.EVENTS == [
        "request:outer",
        "request:inner",
        "deferred:inner",
        "error:outer:418",
        "response:outer",
    ]
    assert h1_upstream.requests == []


async def test_a_client_gone_during_a_deferred_coroutine_cancels_it(
    runtime_for: Callable[..., Runtime], h1_upstream: UpstreamServer
) -> None:
    runtime = runtime_for(h1_upstream)
    stamp.EVENTS.clear()
    answers: Answers = []
    request = bodiless(b"/slow/100", headers=[(b"X-Defer-At", b"inner")])
    assert runtime.dispatcher.start(request, answers.append) is None
    await eventually(lambda: bool(h1_upstream.requests), "the upstream to get the request")
    request.exchange.cancel()
    assert stamp.EVENTS[-1] == "abort:outer:499"
    await eventually(lambda: "cancelled:inner" in stamp.EVENTS, "the coroutine to be cancelled")
    await asyncio.sleep(0.3)  # past the upstream's answer
    assert answers == []


async def test_a_deferred_outcome_nobody_takes_is_let_go() -> None:
    """A Deferred that finished just as its client went away: its response's body is
    discarded (the upstream connection abandoned, not held), its error marked as seen."""
    loop = asyncio.get_running_loop()
    abandoned: list[bool] = []
    body = Body(10)
    body.on_abandon = lambda: abandoned.append(True)
    answered: asyncio.Future[Response] = loop.create_future()
    answered.set_result(Response(200, [], body))
    _drop(answered)
    assert abandoned == [True]
    failed: asyncio.Future[Response] = loop.create_future()
    failed.set_exception(RuntimeError("nobody will read this"))
    _drop(failed)
    assert failed._log_traceback is False  # asyncio will not report it as never retrieved
