"""How long a config pushed to etcd takes to run on every gateway of a fleet, under load.

    .venv/bin/python bench/etcd_push.py                  # 3 gateways, 20 pushes: ~1 min
    .venv/bin/python bench/etcd_push.py --pushes 5       # a smoke

It starts a real etcd and `--gateways` gateway processes (one worker each) on one key,
each listening where its environment says (the document reads `${GATEWAY_PORT}`), with
the test suite's helpers (tests/support/etcd_server.py, gateway_process.py). Client
threads send requests to every gateway all the while; any answer but a 200 is a failure.
Each push is what `gatehouse push` does (validate, read the revision, compare-and-swap),
timed from just before the write to when the slowest gateway's admin /config shows the
new revision (each polled every 5 ms). Prints each push's figure, then the median and max.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx

from proxy.config.load import parse_config
from proxy.source.etcd_client import EtcdClient
from proxy.source.etcd_url import parse_etcd_url
from tests.e2e.test_config_etcd import document
from tests.support.etcd_server import running_etcd
from tests.support.gateway_process import free_port, run_gateway

KEY = "/gatehouse/bench.yaml"
POLL_S = 0.005
BOUND_S = 30.0


def revision_of(client: httpx.Client, admin: int) -> int:
    try:
        return int(client.get(f"http://127.0.0.1:{admin}/config").json()["revision"])
    except httpx.TransportError:
        return -1


async def push(client: EtcdClient, text: str) -> tuple[float, int]:
    """What `gatehouse push` does; (when the write was sent, the revision written)."""
    parse_config(text, source="bench")
    reading = await client.get()
    started = time.monotonic()
    expected = reading.kv.mod_revision if reading.kv is not None else 0
    written, revision = await client.compare_and_put(text.encode(), expected)
    assert written, "nobody else writes this key"
    return started, revision


_COUNTING = threading.Lock()


def load(urls: list[str], stop: threading.Event, counts: dict[str, int]) -> None:
    with httpx.Client(timeout=10.0) as client:
        while not stop.is_set():
            for url in urls:
                try:
                    ok = client.get(url).status_code == 200
                except httpx.HTTPError:
                    ok = False
                with _COUNTING:
                    counts["sent"] += 1
                    counts["failed"] += not ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pushes", type=int, default=20)
    parser.add_argument("--gateways", type=int, default=3)
    parser.add_argument("--clients", type=int, default=3, help="load threads")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as temp, running_etcd(Path(temp)) as etcd:
        directory = Path(temp)
        etcd.put(KEY, document("v0"))
        client = EtcdClient(parse_etcd_url(etcd.url(KEY)))
        with contextlib.ExitStack() as stack:
            admins, urls = [], []
            for index in range(args.gateways):
                port, admin = free_port(), free_port()
                stack.enter_context(
                    run_gateway(
                        "",
                        directory,
                        port=port,
                        location=etcd.url(KEY),
                        args=("--workers", "1", "--config-cache", f"{temp}/cache-{index}"),
                        env={"GATEWAY_PORT": str(port), "ADMIN_PORT": str(admin)},
                    )
                )
                admins.append(admin)
                urls.append(f"http://127.0.0.1:{port}/")
            stop = threading.Event()
            counts = {"sent": 0, "failed": 0}
            threads = [
                threading.Thread(target=load, args=(urls, stop, counts))
                for _ in range(args.clients)
            ]
            for thread in threads:
                thread.start()
            latencies = []
            try:
                with httpx.Client(timeout=10.0) as poller:
                    for version in range(1, args.pushes + 1):
                        started, revision = asyncio.run(push(client, document(f"v{version}")))
                        waiting = set(admins)
                        while waiting:
                            waiting = {a for a in waiting if revision_of(poller, a) != revision}
                            if time.monotonic() - started > BOUND_S:
                                raise SystemExit(f"push {version} not everywhere in {BOUND_S}s")
                            if waiting:
                                time.sleep(POLL_S)
                        latencies.append(time.monotonic() - started)
                        print(
                            f"push {version:2d}: revision {revision} on all in "
                            f"{latencies[-1] * 1000:.0f} ms"
                        )
            finally:
                stop.set()
                for thread in threads:
                    thread.join(30)
    print(
        f"{args.pushes} pushes to {args.gateways} gateways under load: "
        f"median {statistics.median(latencies) * 1000:.0f} ms, "
        f"max {max(latencies) * 1000:.0f} ms; requests {counts['sent']}, "
        f"failed {counts['failed']}"
    )
    return 0 if counts["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
