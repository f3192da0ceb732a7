"""DNS endpoints (`upstreams.X.resolve: {interval}`): host names re-resolved on an interval.

Every A and AAAA record of an endpoint's name becomes an endpoint of its own (same
scheme, port and weight; SNI and certificate checks keep using the name). When the set of
addresses changes, the upstream switches to the new set (`Upstream.use_endpoints`):
addresses that stay keep their pools and health, new ones get pools, and those that
disappeared drain (their idle connections close, busy ones once their exchange ends).
A failed lookup changes nothing: a DNS outage must not empty an upstream. Endpoints
written as IP addresses are kept as they are. Each worker resolves on its own; the first
lookup runs at start.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import logging
import socket
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING

from proxy.config.upstream_model import EndpointConfig

if TYPE_CHECKING:
    from proxy.upstream.balancer import Upstream

log = logging.getLogger(__name__)

Lookup = Callable[[str, int], Awaitable[list[str]]]


async def system_lookup(host: str, port: int) -> list[str]:
    """The addresses of `host` (TCP), sorted, each once.

    Raises:
        OSError: the name does not resolve (socket.gaierror).
    """
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({str(info[4][0]) for info in infos})


def is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


async def resolve_endpoints(
    endpoints: Sequence[EndpointConfig], lookup: Lookup = system_lookup
) -> list[EndpointConfig]:
    """`endpoints` with each name replaced by one endpoint per address it has.

    Raises:
        OSError: a name did not resolve (the caller keeps what it had).
    """
    resolved: list[EndpointConfig] = []
    for endpoint in endpoints:
        if is_address(endpoint.host):
            resolved.append(endpoint)
            continue
        for address in await lookup(endpoint.host, endpoint.port):
            shown = f"[{address}]" if ":" in address else address
            resolved.append(
                dataclasses.replace(
                    endpoint,
                    host=address,
                    name=endpoint.host,
                    url=f"{endpoint.scheme}://{shown}:{endpoint.port}",
                )
            )
    return resolved


class DnsRefresh:
    """The task that re-resolves one upstream's endpoint names every interval."""

    def __init__(self, upstream: Upstream, lookup: Lookup = system_lookup) -> None:
        assert upstream.config.resolve_interval is not None
        self.upstream = upstream
        self.interval = upstream.config.resolve_interval
        self.lookup = lookup
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name=f"resolve {self.upstream.name}"
            )

    def cancel(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def aclose(self) -> None:
        task = self._task
        if task is not None:
            task.cancel()
            await asyncio.wait([task])

    async def _run(self) -> None:
        while True:
            try:
                await self.refresh()
            except Exception:
                log.exception("bug while re-resolving upstream %s", self.upstream.name)
            await asyncio.sleep(self.interval)

    async def refresh(self) -> bool:
        """Resolve now; True when the endpoints changed."""
        upstream = self.upstream
        try:
            endpoints = await resolve_endpoints(upstream.config.endpoints, self.lookup)
        except OSError as exc:
            log.warning(
                "upstream %s: DNS lookup failed, endpoints unchanged: %s", upstream.name, exc
            )
            return False
        current = [state.pool.endpoint for state in upstream.endpoints]
        if not endpoints or _addresses(endpoints) == _addresses(current):
            return False
        log.info(
            "upstream %s: endpoints now %s",
            upstream.name,
            ", ".join(f"{e.host}:{e.port}" for e in endpoints) or "none",
        )
        upstream.use_endpoints(endpoints)
        return True


def _addresses(endpoints: Sequence[EndpointConfig]) -> list[tuple[str, str, int, int]]:
    return [(e.scheme, e.host, e.port, e.weight) for e in endpoints]
