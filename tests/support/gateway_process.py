"""The gateway as a real subprocess (`python -m proxy run FILE`), for CLI, process and
memory tests.

A multi-worker gateway cannot report an ephemeral port, so tests pick a free one
(`free_port`), write it into the config and poll a TCP connect until it listens. The
subprocess gets its own session; `run_gateway` kills the whole process group (the parent
and its forked workers) when the test ends, whatever happened.

`/proc` tells the rest: a worker's peak and current RSS (`VmHWM`, `VmRSS`), the children
of the supervising parent, and which process holds a TCP connection to a given port.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
CLI_TIMEOUT_S = 60.0
START_TIMEOUT_S = 10.0
POLL_INTERVAL_S = 0.02


def run_cli(*args: str, env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run `python -m proxy ARGS` to completion, from the repository root, with `env`
    added to the environment."""
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        cwd=REPO_ROOT,
        env=None if env is None else {**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
        check=False,
    )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (bind to 0, read, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def connect_refused(port: int) -> bool:
    """Whether a TCP connect to 127.0.0.1:`port` is refused right now."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return False
    except ConnectionRefusedError:
        return True


def wait_until(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Poll `predicate` until it is true.

    Raises:
        AssertionError: it was still false after `timeout_s`.
    """
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(POLL_INTERVAL_S)


def gateway_config(port: int, upstream_url: str, *, extra: str = "") -> str:
    """A routes.yaml listening on 127.0.0.1:`port` with one catch-all route to
    `upstream_url`; `extra` adds top-level sections (limits, shutdown, workers...)."""
    return f"""
listeners:
  - bind: 127.0.0.1:{port}
upstreams:
  app:
    endpoints: [{upstream_url}]
routes:
  - name: all
    match: {{path_prefix: /}}
    upstream: app
{extra}
"""


def _status_field(pid: int, name: str) -> int:
    """A `kB` field of /proc/PID/status, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(name)


def peak_rss_bytes(pid: int) -> int:
    """The process's peak resident set size so far (VmHWM)."""
    return _status_field(pid, "VmHWM")


def rss_bytes(pid: int) -> int:
    """The process's current resident set size (VmRSS)."""
    return _status_field(pid, "VmRSS")


def child_pids(parent: int) -> set[int]:
    """Live (not zombie) processes whose parent is `parent`."""
    children = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid ...: comm may hold spaces, so split after its ')'.
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        if int(ppid) == parent and state != "Z":
            children.add(int(entry.name))
    return children


def _socket_inodes(pid: int) -> set[int]:
    inodes = set()
    with contextlib.suppress(OSError):
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(int(target[8:-1]))
    return inodes


def _tcp_inodes(*, local_port: int = 0, remote_port: int = 0, state: str) -> set[int]:
    """Inodes of IPv4 TCP sockets in `state` (hex, as /proc/net/tcp: 01 ESTABLISHED,
    0A LISTEN) with the given local and/or remote port."""
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote = int(fields[1].split(":")[1], 16), int(fields[2].split(":")[1], 16)
        if fields[3] == state and local_port in (0, local) and remote_port in (0, remote):
            inodes.add(int(fields[9]))
    return inodes


def pids_connected_to(port: int, candidates: set[int]) -> set[int]:
    """Which of `candidates` hold an established TCP connection to remote port `port`."""
    inodes = _tcp_inodes(remote_port=port, state="01")
    return {pid for pid in candidates if _socket_inodes(pid) & inodes}


def listening(pid: int, port: int) -> bool:
    """Whether process `pid` holds a socket listening on `port`."""
    return bool(_socket_inodes(pid) & _tcp_inodes(local_port=port, state="0A"))


@dataclass
class Gateway:
    """A running `python -m proxy run` subprocess."""

    process: subprocess.Popen[bytes]
    port: int
    config_path: Path
    stderr_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stderr(self) -> str:
        """What the gateway logged so far."""
        return self.stderr_path.read_text(errors="replace")

    def signal(self, signum: int) -> None:
        """Send `signum` to the gateway's main process (the supervisor, with workers)."""
        self.process.send_signal(signum)

    def wait(self, timeout_s: float) -> int:
        """Wait for the gateway to exit; its exit code.

        Raises:
            subprocess.TimeoutExpired: still running after `timeout_s`.
        """
        return self.process.wait(timeout_s)

    def wait_listening(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Poll a TCP connect until the listener accepts.

        Raises:
            AssertionError: the gateway exited or did not listen in time (its log attached).
        """
        deadline = time.monotonic() + timeout_s
        while True:
            if self.process.poll() is not None:
                raise AssertionError(
                    f"gateway exited with {self.process.returncode}:\n{self.stderr()}"
                )
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1.0):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    raise AssertionError(
                        f"gateway not listening after {timeout_s}s:\n{self.stderr()}"
                    ) from None
                time.sleep(POLL_INTERVAL_S)


@contextlib.contextmanager
def run_gateway(
    config_text: str,
    directory: Path,
    *,
    port: int,
    args: tuple[str, ...] = (),
    env: Mapping[str, str] | None = None,
    wait: bool = True,
    config_path: Path | None = None,
    location: str | None = None,
) -> Iterator[Gateway]:
    """Start `python -m proxy run` on `config_text` (which must listen on `port`), or on
    `location` (an etcd:// URL) when given, and, unless `wait` is false, wait until it
    listens. The process group is killed on exit; then, if the test passed so far, the
    gateway must not have logged a traceback.

    The config is written to `directory`/gateway-PORT.yaml, or the gateway runs on
    `config_path` as the test laid it out (a ConfigMap volume's symlinks), which must
    hold `config_text` already."""
    if config_path is None:
        config_path = directory / f"gateway-{port}.yaml"
        config_path.write_text(config_text)
    else:
        assert config_path.read_text() == config_text, f"{config_path} holds another config"
    stderr_path = directory / f"gateway-{port}.stderr"
    with stderr_path.open("wb") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "proxy", "run", location or str(config_path), *args],
            cwd=REPO_ROOT,
            env={**os.environ, **(env or {})},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            start_new_session=True,
        )
    gateway = Gateway(process, port, config_path, stderr_path)
    try:
        if wait:
            gateway.wait_listening()
        yield gateway
    finally:
        kill_process_group(process)
    # A bug is logged with its traceback (docs/errors.md): none may have happened.
    assert "Traceback" not in gateway.stderr(), gateway.stderr()


def kill_process_group(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL the session `process` leads (it and any children it forked), then reap it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(5)
