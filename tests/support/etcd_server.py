"""A real `etcd` (v3) for the config-from-etcd tests, on free 127.0.0.1 ports with a data
directory of its own.

With `tls` (tests/support/tls.py's files), it serves its clients over TLS only, with the
certificate for 127.0.0.1 that the files' CA signed; `env` is what a client then needs.

Tests stop it (SIGKILL: clients see refused connections at once) and start it again on
the same ports and data, so its keys and revisions survive as a real outage's would.
`running_etcd` stops it at the end whatever happened. The test side reads and writes keys
with the gateway's own client (proxy/source/etcd_client.py), through `put` and `get`.

`.ci/system-deps` installs etcd where it is missing (Debian: apt-get install etcd-server).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import ssl
import subprocess
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path

from proxy.source.etcd_client import CA_ENV, EtcdClient
from proxy.source.etcd_url import parse_etcd_url
from tests.support.gateway_process import free_port
from tests.support.system_process import spawn_logged, stop, system_executable, wait_until_ready
from tests.support.tls import TlsFiles

START_TIMEOUT_S = 30.0


class EtcdServer:
    """One single-member etcd; `endpoint` stays the same across restarts."""

    def __init__(self, directory: Path, tls: TlsFiles | None = None) -> None:
        self.executable = system_executable("etcd")
        self.directory = directory
        self.data = directory / "etcd-data"
        self.client_port = free_port()
        self.peer_port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.tls = tls
        self._context = ssl.create_default_context(cafile=str(tls.ca)) if tls else None

    @property
    def env(self) -> dict[str, str]:
        """The environment a client needs to reach it (the CA, when it speaks TLS)."""
        return {CA_ENV: str(self.tls.ca)} if self.tls is not None else {}

    @property
    def scheme(self) -> str:
        return "https" if self.tls is not None else "http"

    def client(self, key: str) -> EtcdClient:
        return EtcdClient(parse_etcd_url(self.url(key)), env=self.env)

    def __repr__(self) -> str:
        state = "RUNNING" if self.running else "STOPPED"
        return f"<EtcdServer {self.endpoint} {state} starts={self.starts}>"

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    def url(self, key: str) -> str:
        """The etcd:// URL of `key` (which starts with a slash)."""
        return f"etcd://{self.endpoint}{key}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        """Start it and wait until it answers as healthy.

        Raises:
            AssertionError: it exited or was not healthy within START_TIMEOUT_S (log
                attached).
        """
        assert not self.running, self
        client = f"{self.scheme}://127.0.0.1:{self.client_port}"
        peer = f"http://127.0.0.1:{self.peer_port}"
        log_path = self.directory / "etcd.log"
        tls = []
        if self.tls is not None:
            tls = ["--cert-file", str(self.tls.cert), "--key-file", str(self.tls.key)]
        self.process = spawn_logged(
            [
                self.executable,
                "--name",
                "gatehouse-test",
                "--data-dir",
                str(self.data),
                "--listen-client-urls",
                client,
                "--advertise-client-urls",
                client,
                "--listen-peer-urls",
                peer,
                "--initial-advertise-peer-urls",
                peer,
                "--initial-cluster",
                f"gatehouse-test={peer}",
                "--log-level",
                "warn",
                *tls,
            ],
            log_path,
            cwd=self.directory,
        )
        self.starts += 1
        wait_until_ready(
            self.process, self._healthy, what=repr(self), log=log_path, timeout_s=START_TIMEOUT_S
        )

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(
                f"{self.scheme}://{self.endpoint}/health", timeout=1.0, context=self._context
            ) as response:
                return bool(json.load(response).get("health") == "true")
        except (OSError, ValueError):
            return False

    def freeze(self) -> None:
        """Stop it without closing anything (SIGSTOP): its connections stay open and
        unanswered, as a hung member's would."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        """Let a frozen etcd run again (SIGCONT)."""
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL it and reap it: from now on connections to its port are refused."""
        process, self.process = self.process, None
        if process is not None:
            stop(process, graceful=False)

    def put(self, key: str, value: str) -> int:
        """Write `value` at `key` as any etcd client would; the revision written at."""
        return asyncio.run(self.client(key).put(value.encode()))

    def delete(self, key: str) -> int:
        """Delete `key`; the revision of the deletion."""
        return asyncio.run(self.client(key).delete())

    def get(self, key: str) -> tuple[str, int] | None:
        """`key`'s value and mod_revision, or None."""
        reading = asyncio.run(self.client(key).get())
        if reading.kv is None:
            return None
        return reading.kv.value.decode(), reading.kv.mod_revision

    def compact(self, revision: int) -> None:
        """Compact the history up to `revision` (what etcd's auto-compaction does)."""
        self.post("/v3/kv/compaction", {"revision": str(revision), "physical": True})

    def post(self, path: str, body: Mapping[str, object]) -> dict[str, object]:
        """One call of etcd's JSON gateway, which must succeed; its answer."""
        request = urllib.request.Request(
            f"{self.scheme}://{self.endpoint}{path}", data=json.dumps(body).encode(), method="POST"
        )
        with urllib.request.urlopen(request, timeout=10.0, context=self._context) as response:
            answer: dict[str, object] = json.load(response)
            return answer


@contextlib.contextmanager
def running_etcd(directory: Path, tls: TlsFiles | None = None) -> Iterator[EtcdServer]:
    """A started EtcdServer in `directory`, killed at exit."""
    server = EtcdServer(directory, tls)
    server.start()
    try:
        yield server
    finally:
        server.kill()
