"""Endpoint choice: smooth weighted round robin (no sockets: pools are only built)."""

from __future__ import annotations

from collections import Counter

from proxy.config.upstream_model import EndpointConfig, UpstreamConfig
from proxy.upstream.balancer import Upstream


def _upstream(*weights: int) -> Upstream:
    endpoints = tuple(
        EndpointConfig(f"http://10.0.0.{i}:80", "http", f"10.0.0.{i}", 80, weight)
        for i, weight in enumerate(weights, start=1)
    )
    return Upstream(UpstreamConfig("app", endpoints), "httptools", 32 * 1024)


def _picks(upstream: Upstream, count: int) -> list[str]:
    return [upstream.choose().pool.endpoint.host for _ in range(count)]


async def test_equal_weights_rotate_in_order() -> None:
    upstream = _upstream(1, 1, 1)
    assert _picks(upstream, 6) == ["10.0.0.1", "10.0.0.2", "10.0.0.3"] * 2


async def test_weights_are_interleaved_smoothly_not_in_bursts() -> None:
    upstream = _upstream(5, 1, 1)
    # nginx's smooth WRR: the heavy endpoint never takes more than 3 picks in a row here.
    assert _picks(upstream, 7) == [
        "10.0.0.1",
        "10.0.0.1",
        "10.0.0.2",
        "10.0.0.1",
        "10.0.0.3",
        "10.0.0.1",
        "10.0.0.1",
    ]


async def test_distribution_matches_weights_exactly_over_whole_cycles() -> None:
    upstream = _upstream(3, 1, 2)
    counts = Counter(_picks(upstream, 600))
    assert counts == {"10.0.0.1": 300, "10.0.0.2": 100, "10.0.0.3": 200}


async def test_repr_names_upstream_and_endpoint_count() -> None:
    upstream = _upstream(1, 2)
    assert repr(upstream) == "<Upstream app endpoints=2>"
    upstream.expire(0.0)
    upstream.close()
