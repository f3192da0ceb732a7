"""Client load beside a change a test makes (a reload, a config push): threads sending GETs
over keep-alive connections until stopped, with every answer but a 200, and every
transport error, kept as a failure. The test reads `sent` to know requests went by, and
asserts `failures` empty at the end."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable

import httpx

CLIENT_TIMEOUT_S = 10.0
JOIN_TIMEOUT_S = 30.0


class ClientLoad:
    """`threads` clients, one keep-alive connection per origin each; the client numbered
    `index` sends, in its round `n`, a GET to each URL of `urls(index, n)`."""

    def __init__(self, urls: Callable[[int, int], Iterable[str]], threads: int) -> None:
        self.urls = urls
        self.sent = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._run, args=(index,), daemon=True)
            for index in range(threads)
        ]

    def __enter__(self) -> ClientLoad:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(JOIN_TIMEOUT_S)

    def _run(self, index: int) -> None:
        limits = httpx.Limits(max_keepalive_connections=None)
        with httpx.Client(timeout=CLIENT_TIMEOUT_S, limits=limits) as client:
            round_number = 0
            while not self._stop.is_set():
                round_number += 1
                for url in self.urls(index, round_number):
                    try:
                        response = client.get(url)
                        ok = response.status_code == 200
                        problem = f"{url}: {response.status_code} {response.text[:200]}"
                    except httpx.HTTPError as exc:
                        ok, problem = False, f"{url}: {exc!r}"
                    with self._lock:
                        self.sent += 1
                        if not ok:
                            self.failures.append(problem)
