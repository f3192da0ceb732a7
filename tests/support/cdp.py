"""A headless Chromium driven over the DevTools protocol (CDP), for tests of pages the
gateway serves (the admin status page).

`headless_chromium()` starts Debian's `chromium` with a throw-away profile and
`--remote-debugging-port=0`, reads the port it chose from `DevToolsActivePort` in the
profile, and yields a `CdpSession` on its page target: `call` sends a command and returns
its result; the events that arrive meanwhile are kept, in order, for `next_event` and for
`problems()` (console errors, log errors and uncaught exceptions). It is synchronous
(websockets' sync client), so a test orders itself by the browser's events, each wait
bounded by a deadline, with no event loop of its own.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from websockets.sync.client import ClientConnection, connect

CHROMIUM = "/usr/bin/chromium"
START_TIMEOUT_S = 30.0
CALL_TIMEOUT_S = 30.0
POLL_INTERVAL_S = 0.05  # only for the port file, which no event announces

Event = dict[str, Any]


class CdpError(Exception):
    """The browser answered a command with an error, or did not answer in time."""


def chromium_available() -> bool:
    """Whether the browser is installed (.ci/system-deps installs it)."""
    return Path(CHROMIUM).exists() or shutil.which("chromium") is not None


@dataclass
class CdpSession:
    """One DevTools connection to a page target."""

    ws: ClientConnection
    events: list[Event] = field(default_factory=list)  # every event seen, in order
    _unread: list[Event] = field(default_factory=list)  # not yet taken by next_event
    _ids: Iterator[int] = field(default_factory=lambda: iter(range(1, 1 << 31)))

    def call(self, method: str, timeout_s: float = CALL_TIMEOUT_S, **params: Any) -> Any:
        """Send `method` and return its result.

        Raises:
            CdpError: the browser refused it, or did not answer within `timeout_s`.
        """
        call_id = next(self._ids)
        self.ws.send(json.dumps({"id": call_id, "method": method, "params": params}))
        deadline = time.monotonic() + timeout_s
        while True:
            message = self._receive(deadline, method)
            if message.get("id") == call_id:
                if "error" in message:
                    raise CdpError(f"{method}: {message['error']}")
                return message.get("result", {})

    def next_event(
        self, method: str, deadline: float, where: Callable[[Event], bool] = lambda _: True
    ) -> Event:
        """The next event `method` (its params) that `where` accepts, taken in order; the
        events before it are passed over (they stay in `events`).

        Raises:
            CdpError: none came before `deadline` (time.monotonic()).
        """
        while True:
            for index, event in enumerate(self._unread):
                if event["method"] == method and where(event["params"]):
                    del self._unread[: index + 1]
                    return dict(event["params"])
            self._unread.clear()
            self._receive(deadline, method)

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (JSON-able results only).

        Raises:
            CdpError: it threw.
        """
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise CdpError(f"{expression!r} threw: {result['exceptionDetails']}")
        return result["result"].get("value")

    def problems(self) -> list[str]:
        """Console errors and assertions, log entries at error level, and uncaught
        exceptions seen so far."""
        found = []
        for event in self.events:
            method, params = event["method"], event["params"]
            if method == "Runtime.consoleAPICalled" and params["type"] in ("error", "assert"):
                found.append(f"console.{params['type']}: {params.get('args')}")
            elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
                entry = params["entry"]
                found.append(f"log: {entry.get('text')} {entry.get('url', '')}")
            elif method == "Runtime.exceptionThrown":
                found.append(f"exception: {params['exceptionDetails']}")
        return found

    def _receive(self, deadline: float, waiting_for: str) -> dict[str, Any]:
        left = deadline - time.monotonic()
        if left <= 0:
            raise CdpError(f"timed out waiting for {waiting_for}")
        try:
            message = json.loads(self.ws.recv(timeout=left))
        except TimeoutError:
            raise CdpError(f"timed out waiting for {waiting_for}") from None
        if "method" in message:
            event = {"method": message["method"], "params": message.get("params", {})}
            self.events.append(event)
            self._unread.append(event)
        return dict(message)


@contextlib.contextmanager
def headless_chromium() -> Iterator[CdpSession]:
    """A headless Chromium on about:blank, and a session on its page; both closed after."""
    profile = Path(tempfile.mkdtemp(prefix="gatehouse-chromium-"))
    process = subprocess.Popen(
        [
            CHROMIUM if Path(CHROMIUM).exists() else "chromium",
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            f"--user-data-dir={profile}",
            "--remote-debugging-port=0",
            "about:blank",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        port = _devtools_port(profile, process)
        with connect(_page_url(port), max_size=None, open_timeout=START_TIMEOUT_S) as ws:
            yield CdpSession(ws)
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
        shutil.rmtree(profile, ignore_errors=True)


def _devtools_port(profile: Path, process: subprocess.Popen[bytes]) -> int:
    """The port from `DevToolsActivePort` (first line), once the browser wrote it."""
    deadline = time.monotonic() + START_TIMEOUT_S
    marker = profile / "DevToolsActivePort"
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise CdpError(f"chromium exited with {process.returncode}")
        with contextlib.suppress(OSError, ValueError, IndexError):
            return int(marker.read_text().splitlines()[0])
        time.sleep(POLL_INTERVAL_S)
    raise CdpError(f"chromium wrote no DevToolsActivePort within {START_TIMEOUT_S}s")


def _page_url(port: int) -> str:
    """The WebSocket URL of the browser's page target."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.TransportError):
            targets = httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=5).json()
            for target in targets:
                if target.get("type") == "page":
                    return str(target["webSocketDebuggerUrl"])
        time.sleep(POLL_INTERVAL_S)
    raise CdpError(f"chromium listed no page target within {START_TIMEOUT_S}s")
