"""The figures behind the etcd client's choice (docs/etcd.md, "The client"): the
project's own JSON-gateway client (proxy/source/etcd_client.py) against a gRPC one,
`aetcd`, when it is importable.

    .venv/bin/python bench/etcd_client.py          # ~15 s
    pip install --target /tmp/aetcd-pkgs aetcd    # then, with aetcd beside it:
    PYTHONPATH=.:/tmp/aetcd-pkgs .venv/bin/python bench/etcd_client.py

For each client: the time and memory its import adds in a fresh interpreter that has
imported the supervisor already, as the gateway's parent has (least of 5 runs; RSS
growth from /proc), the size of what it installs beyond Gatehouse's own dependencies,
the median and max of 30 watch notifications on a watch already made (a write to the
key until the watch yields it), and of 30 push round trips (read the revision, then a
compare-and-swap write). Against a real etcd on 127.0.0.1 (tests/support/etcd_server.py).
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from proxy.source.etcd_client import EtcdClient
from proxy.source.etcd_url import parse_etcd_url
from tests.support.etcd_server import running_etcd

REPEATS = 30
KEY = "/gatehouse/bench-client"
_IMPORT_PROBE = """
import sys, time
def rss():
    for line in open('/proc/self/status'):
        if line.startswith('VmRSS:'):
            return int(line.split()[1])
import proxy.process.supervisor  # loaded already where the client runs: the parent
before, started = rss(), time.perf_counter()
import {module}
print(time.perf_counter() - started, rss() - before)
"""


def import_cost(module: str) -> tuple[float, int]:
    """(seconds, KiB of RSS): the least of 5 fresh interpreters."""
    runs = []
    for _ in range(5):
        out = subprocess.run(
            [sys.executable, "-c", _IMPORT_PROBE.format(module=module)],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).resolve().parent.parent,
        ).stdout.split()
        runs.append((float(out[0]), int(out[1])))
    return min(runs)


def installed_kib(distributions: list[str]) -> int:
    total = 0
    for name in distributions:
        for file in importlib.metadata.distribution(name).files or ():
            path = Path(str(file.locate()))
            if path.is_file():
                total += path.stat().st_size
    return total // 1024


def summary(samples: list[float]) -> str:
    return f"median {statistics.median(samples) * 1000:.2f} ms, max {max(samples) * 1000:.2f} ms"


async def timed(step: Callable[[], Awaitable[None]]) -> list[float]:
    samples = []
    for _ in range(REPEATS):
        started = time.perf_counter()
        await step()
        samples.append(time.perf_counter() - started)
    return samples


async def ours(url: str) -> tuple[list[float], list[float]]:
    client = EtcdClient(parse_etcd_url(url))
    writer = EtcdClient(parse_etcd_url(url))
    first = await writer.put(b"0")
    changes = client.watch(first)
    await anext(changes)  # the watch is made on the first step: not part of the figure
    watch_samples = []
    for n in range(REPEATS):
        started = time.perf_counter()
        await writer.put(str(n).encode())
        await anext(changes)
        watch_samples.append(time.perf_counter() - started)
    await changes.aclose()

    async def push() -> None:
        reading = await client.get()
        assert reading.kv is not None
        written, _ = await client.compare_and_put(b"pushed", reading.kv.mod_revision)
        assert written

    return watch_samples, await timed(push)


async def grpc(host: str, port: int) -> tuple[list[float], list[float]]:
    import aetcd

    key = KEY.encode()
    async with aetcd.Client(host, port) as client, aetcd.Client(host, port) as writer:
        await writer.put(key, b"0")
        watch = await client.watch(key)
        watch_samples = []
        iterator = watch.__aiter__()
        for n in range(REPEATS):
            started = time.perf_counter()
            await writer.put(key, str(n).encode())
            await anext(iterator)
            watch_samples.append(time.perf_counter() - started)
        await watch.cancel()

        async def push() -> None:
            current = await client.get(key)
            assert current is not None
            result = await client.transaction(
                compare=[client.transactions.mod(key) == current.mod_revision],
                success=[client.transactions.put(key, b"pushed")],
                failure=[],
            )
            assert result[0]

        return watch_samples, await timed(push)


def main() -> int:
    try:
        import aetcd  # noqa: F401

        with_grpc = True
    except ImportError:
        with_grpc = False
    seconds, kib = import_cost("proxy.source.etcd_client")
    print(
        f"json gateway (ours): import {seconds * 1000:.1f} ms, +{kib} KiB RSS, "
        "installs nothing (h11 is a dependency already)"
    )
    if with_grpc:
        seconds, kib = import_cost("aetcd")
        size = installed_kib(["aetcd", "grpcio", "protobuf"])
        print(
            f"aetcd (gRPC): import {seconds * 1000:.1f} ms, +{kib} KiB RSS, "
            f"installs {size} KiB (aetcd, grpcio, protobuf)"
        )
    with tempfile.TemporaryDirectory() as temp, running_etcd(Path(temp)) as etcd:
        url = etcd.url(KEY)
        watch_samples, push_samples = asyncio.run(ours(url))
        print(f"json gateway (ours): watch {summary(watch_samples)}; push {summary(push_samples)}")
        if with_grpc:
            watch_samples, push_samples = asyncio.run(grpc("127.0.0.1", etcd.client_port))
            print(f"aetcd (gRPC): watch {summary(watch_samples)}; push {summary(push_samples)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
