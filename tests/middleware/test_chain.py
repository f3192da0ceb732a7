"""Middleware chains (middleware/chain.py): links run in order around the endpoint."""

from __future__ import annotations

from middleware.chain import build_chain
from proxy.core.body import Body
from proxy.core.models import Request, Response


async def test_build_chain_runs_links_in_order_and_times_each() -> None:
    order: list[str] = []

    class Note:
        def __init__(self, name: str) -> None:
            self.name = name

        async def __call__(self, request: Request, call_next: object) -> Response:
            order.append(f"in:{self.name}")
            assert callable(call_next)
            response: Response = await call_next(request)
            order.append(f"out:{self.name}")
            return response

    async def endpoint(request: Request) -> Response:
        order.append("endpoint")
        return Response(204)

    from proxy.config.model import MiddlewareSpec

    specs = [
        MiddlewareSpec("first", "t", Note("first")),
        MiddlewareSpec("second", "t", Note("second")),
    ]
    handler = build_chain(specs, endpoint)
    response = await handler(Request("GET", b"/", [], Body.from_bytes(b"")))
    assert response.status == 204
    assert order == ["in:first", "in:second", "endpoint", "out:second", "out:first"]
    assert build_chain([], endpoint) is endpoint  # no middleware: the forwarder itself
