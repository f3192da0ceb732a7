"""The pytest plugin (entry point `pytest11: gatehouse`): the `gatehouse` and `upstream`
fixture factories.

    async def test_users_route(gatehouse, upstream):
        users = await upstream("users")
        users.on("GET", "/users/1").reply(json={"id": 1})
        gateway = await gatehouse("routes.yaml")     # `http://users:...` endpoints go to it
        async with gateway.client() as client:
            response = await client.get("/api/users/1")
        assert gateway.upstream_request(response).path == "/users/1"

Both are async fixtures of pytest-asyncio, declared with its own decorator so that they
work in `asyncio_mode = auto` and `strict` alike (in strict mode the test itself needs
`@pytest.mark.asyncio`). Everything a factory started is stopped at the test's teardown,
gateways before upstreams, and nothing is left behind: no task, socket or thread. When a
test fails, its report gets a section per gateway listing what it did with each request.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

import pytest

# The gateway is imported when a fixture is first used, not when pytest loads plugins:
# a test run that uses no fixture of ours does not import the gateway, and coverage
# (started after plugins load) sees the gateway's modules imported.
if TYPE_CHECKING:
    from proxy.testing.gateway import RunningGateway
    from proxy.testing.upstream import ScriptedUpstream

UpstreamFactory = Callable[..., Awaitable["ScriptedUpstream"]]
GatewayFactory = Callable[..., Awaitable["RunningGateway"]]
_GATEWAYS = pytest.StashKey[list["RunningGateway"]]()  # a test's gateways, for its report
_NEEDS_ASYNCIO = (
    "the gatehouse fixtures need pytest-asyncio: pip install 'gatehouse-proxy[testing]'"
)
Fixture = TypeVar("Fixture", bound=Callable[..., Any])


def _async_fixture(function: Fixture) -> Fixture:
    """pytest-asyncio's fixture decorator. Without pytest-asyncio (gatehouse installed
    with no `testing` extra, in a project that has its own pytest) the plugin must not
    break the run: the fixture is there, and a test using it fails saying what to
    install."""
    try:
        import pytest_asyncio
    except ImportError:
        pass
    else:
        return cast(Fixture, pytest_asyncio.fixture(function))

    def unavailable(*args: object, **kwargs: object) -> None:
        pytest.fail(_NEEDS_ASYNCIO, pytrace=False)

    setattr(unavailable, "__signature__", inspect.signature(function))  # noqa: B010
    return cast(Fixture, pytest.fixture(name=function.__name__)(unavailable))


class _Upstreams:
    """The kit upstreams of one test, by name."""

    def __init__(self) -> None:
        self.started: dict[str, ScriptedUpstream] = {}

    async def __call__(
        self, name: str = "app", *, protocol: str = "http1", websocket: bool = False
    ) -> ScriptedUpstream:
        from proxy.testing.upstream import ScriptedUpstream

        if name in self.started:
            raise ValueError(f"this test already has an upstream named {name!r}")
        upstream = ScriptedUpstream(name, protocol=protocol, websocket=websocket)
        await upstream.start()
        self.started[name] = upstream
        return upstream


@_async_fixture
async def gatehouse_upstreams() -> AsyncIterator[_Upstreams]:
    """The upstreams `upstream(...)` started in this test; stopped at its teardown."""
    upstreams = _Upstreams()
    yield upstreams
    for upstream in upstreams.started.values():
        await upstream.stop()


@pytest.fixture
def upstream(gatehouse_upstreams: _Upstreams) -> UpstreamFactory:
    """`await upstream("users", protocol="h2c", websocket=False)`: a real upstream on
    127.0.0.1 with scripted answers, recording every request (proxy/testing/upstream.py).
    Gateways of the same test send an endpoint whose host is its name to it."""
    return gatehouse_upstreams


@_async_fixture
async def gatehouse(
    request: pytest.FixtureRequest, gatehouse_upstreams: _Upstreams
) -> AsyncIterator[GatewayFactory]:
    """`await gatehouse(path_or_yaml, upstreams={...}, env={...})`: a gateway running in
    the test's loop on ephemeral ports (proxy/testing/gateway.py); drained and stopped at
    the test's teardown."""
    from proxy.testing.gateway import RunningGateway

    gateways: list[RunningGateway] = []
    request.node.stash[_GATEWAYS] = gateways

    async def start(
        source: str | Path,
        *,
        upstreams: Mapping[str, ScriptedUpstream] | None = None,
        env: Mapping[str, str] | None = None,
    ) -> RunningGateway:
        gateway = RunningGateway(
            source, fixtures=gatehouse_upstreams.started, upstreams=upstreams or {}, env=env
        )
        await gateway.start()
        gateways.append(gateway)
        return gateway

    yield start
    for gateway in reversed(gateways):
        await gateway.aclose()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item,
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Under a failed test, what each of its gateways did (`RunningGateway.describe`)."""
    report = yield
    if report.failed:
        gateways: list[RunningGateway] = item.stash.get(_GATEWAYS, [])
        for number, gateway in enumerate(gateways, 1):
            report.sections.append((f"gatehouse {number}: exchanges", gateway.describe()))
    return report
