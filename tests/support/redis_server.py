"""A real `redis-server` for the rate-limit tests, on a free 127.0.0.1 port in a temp dir.

It persists nothing (`--save '' --appendonly no`), so a restart comes back empty, as a
crashed cache does. Tests kill it (SIGKILL: connections are refused at once), freeze it
(SIGSTOP: connections hang, so only timeouts end a call), and restart it on the same port.
`running_redis` stops it at the end whatever happened.

`.ci/system-deps` installs redis-server where it is missing (Debian: apt-get install
redis-server).
"""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

from tests.support.gateway_process import free_port
from tests.support.system_process import spawn_logged, stop, system_executable, wait_until_ready

START_TIMEOUT_S = 10.0


def _answers_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One redis-server process; `url` stays the same across restarts."""

    def __init__(self, directory: Path, port: int | None = None) -> None:
        self.executable = system_executable("redis-server")
        self.directory = directory
        self.port = port if port is not None else free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def __repr__(self) -> str:
        state = "RUNNING" if self.running else "STOPPED"
        return f"<RedisServer 127.0.0.1:{self.port} {state} starts={self.starts}>"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        """Start it and wait until it answers PING.

        Raises:
            AssertionError: it exited or did not answer within START_TIMEOUT_S (log attached).
        """
        assert not self.running, self
        log_path = self.directory / f"redis-{self.port}.log"
        self.process = spawn_logged(
            [
                self.executable,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.directory),
                "--daemonize",
                "no",
            ],
            log_path,
            cwd=self.directory,
        )
        self.starts += 1
        wait_until_ready(
            self.process,
            lambda: _answers_ping(self.port),
            what=repr(self),
            log=log_path,
            timeout_s=START_TIMEOUT_S,
        )

    def kill(self) -> None:
        """SIGKILL it and reap it: from now on connections to the port are refused."""
        process, self.process = self.process, None
        if process is not None:
            stop(process, graceful=False)

    def restart(self) -> None:
        """Kill it (if running) and start it again on the same port, empty."""
        self.kill()
        self.start()

    def freeze(self) -> None:
        """SIGSTOP it: connections are accepted by the kernel, nothing answers."""
        assert self.process is not None, self
        self.process.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        """SIGCONT a frozen server."""
        assert self.process is not None, self
        self.process.send_signal(signal.SIGCONT)


@contextlib.contextmanager
def running_redis(directory: Path) -> Iterator[RedisServer]:
    """A started RedisServer in `directory`, killed at exit."""
    server = RedisServer(directory)
    server.start()
    try:
        yield server
    finally:
        server.kill()
