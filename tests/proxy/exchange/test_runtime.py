"""What a Runtime compiles a config's routes to."""

from __future__ import annotations

from proxy.config.load import parse_config
from proxy.exchange.runtime import Runtime

CONFIG = """
listeners: [{bind: 127.0.0.1:0}]
upstreams:
  app: {endpoints: [http://127.0.0.1:9]}
middleware:
  ids: {type: request_id}
routes:
  - name: plain
    match: {path_prefix: /plain}
    upstream: app
  - name: chained
    match: {path_prefix: /}
    middleware: [ids]
    upstream: app
"""


async def test_a_route_without_middleware_is_its_forwarder_so_the_fast_path_takes_it() -> None:
    """`Runtime.try_fast` starts a route's exchange synchronously only when its handler
    is the forwarder itself; a wrapper around it sent every plain request through the
    eager runner (a coroutine and an EagerRun each) instead."""
    runtime = Runtime(parse_config(CONFIG), "httptools")
    plain, chained = runtime.routes["plain"], runtime.routes["chained"]
    assert plain.handler is plain.forwarder
    assert chained.handler is not chained.forwarder
    assert chained.eager  # request_id only awaits call_next
