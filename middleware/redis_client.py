"""The Redis client the middleware that keep state in Redis share (`rate_limit`'s redis
backend, `cache`'s): one way to read a URL for the logs and one way to make a client
whose every wait is bounded.
"""

from __future__ import annotations

from typing import Any

import redis.asyncio
import redis.exceptions
from redis.asyncio.connection import parse_url
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

# What a failed call can raise besides redis-py's own errors: OSError from the socket layer
# (TimeoutError, from asyncio.timeout, is one), and ValueError/TypeError/IndexError from a
# reply that is not what was asked for.
FAILURES = (redis.exceptions.RedisError, OSError, ValueError, TypeError, IndexError)


def describe_url(url: str) -> str:
    """`host:port/db` (or the socket path) of a Redis URL, without credentials, for logs.

    Raises:
        ValueError: redis-py cannot use the URL (scheme, port, query values).
    """
    kwargs: dict[str, Any] = dict(parse_url(url))
    if "path" in kwargs:
        return f"unix:{kwargs['path']}"
    return f"{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}/{kwargs.get('db', 0)}"


def make_client(url: str, timeout_s: float, max_connections: int) -> redis.asyncio.Redis:
    """A client on a pool of at most `max_connections`, every wait of which (pool,
    connect, each read and write) is bounded by `timeout_s`.

    One retry, on a broken connection only: after Redis restarts, every pooled connection
    is dead and would otherwise fail one call each. The retry goes out on a fresh
    connection. Timeouts are not retried: the callers bound the whole call anyway, and a
    slow Redis is not made faster by asking twice."""
    pool = redis.asyncio.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=timeout_s,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), 1, (redis.exceptions.ConnectionError,)),
        health_check_interval=0,
    )
    return redis.asyncio.Redis.from_pool(pool)
