"""Gatehouse's testing kit: test a routes.yaml, and your own middleware, in pytest.

The pytest plugin (`proxy.testing.plugin`, registered as the `gatehouse` entry point)
gives the `gatehouse` and `upstream` fixture factories. The same parts work without
pytest: `running_gateway(...)` and `start_upstream(...)`. See the README, "Testing your
gateway config".

The names below are imported on first use (PEP 562), so that loading the plugin, which
pytest does in every run, imports no part of the gateway.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from proxy.testing.gateway import RunningGateway, running_gateway
    from proxy.testing.trace import Exchange
    from proxy.testing.upstream import (
        ReceivedRequest,
        Reply,
        Rule,
        ScriptedUpstream,
        start_upstream,
    )

_HOMES = {
    "Exchange": "proxy.testing.trace",
    "ReceivedRequest": "proxy.testing.upstream",
    "Reply": "proxy.testing.upstream",
    "Rule": "proxy.testing.upstream",
    "RunningGateway": "proxy.testing.gateway",
    "ScriptedUpstream": "proxy.testing.upstream",
    "running_gateway": "proxy.testing.gateway",
    "start_upstream": "proxy.testing.upstream",
}
__all__ = [
    "Exchange",
    "ReceivedRequest",
    "Reply",
    "Rule",
    "RunningGateway",
    "ScriptedUpstream",
    "running_gateway",
    "start_upstream",
]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'proxy.testing' has no attribute {name!r}")
    return getattr(importlib.import_module(home), name)
