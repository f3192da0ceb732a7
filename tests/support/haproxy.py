"""A real HAProxy in front of the gateway, relaying TCP with a PROXY protocol header
(`send-proxy` for v1, `send-proxy-v2` for v2), as a load balancer does.

The test makes the listening socket (127.0.0.1, an ephemeral port) and HAProxy inherits
it (`bind fd@N`): there is no port to guess and nothing to wait for, since the kernel
queues connections on that socket until HAProxy accepts them. The config is checked
with `haproxy -c` first, so a bad one fails at once with HAProxy's own message. HAProxy
runs in the foreground (`-db`) with one thread; the test's fixture stops it at the end
(SIGTERM, then SIGKILL after STOP_TIMEOUT_S) whatever happened.

`.ci/system-deps` installs haproxy where it is missing (Debian: apt-get install haproxy).
"""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

from tests.support.system_process import spawn_logged, stop, system_executable

CHECK_TIMEOUT_S = 10.0

# How HAProxy announces the client to the server behind it.
SEND_PROXY = {
    1: "send-proxy",
    # crc32c adds a TLV (a checksum of the header), which the gateway must skip.
    2: "send-proxy-v2 proxy-v2-options crc32c",
}


class HAProxy:
    """One HAProxy process relaying its `address` to `target` with a PROXY header of
    `version`."""

    def __init__(self, directory: Path, target: tuple[str, int], version: int) -> None:
        self.directory = directory
        self.target = target
        self.version = version
        self._listening = socket.create_server(("127.0.0.1", 0), backlog=64)
        self.address: tuple[str, int] = self._listening.getsockname()[:2]
        self.process: subprocess.Popen[bytes] | None = None
        self.config_path = directory / f"haproxy-{self.address[1]}.cfg"
        self.log_path = directory / f"haproxy-{self.address[1]}.log"

    def __repr__(self) -> str:
        state = "RUNNING" if self.process is not None and self.process.poll() is None else "STOPPED"
        host, port = self.target
        return f"<HAProxy {self.address[1]} -> {host}:{port} v{self.version} {state}>"

    def config(self) -> str:
        host, port = self.target
        return f"""\
global
    maxconn 256
    nbthread 1

defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s

frontend clients
    bind fd@{self._listening.fileno()}
    default_backend gateway

backend gateway
    server gateway {host}:{port} {SEND_PROXY[self.version]}
"""

    def start(self) -> None:
        """Check the config, then start HAProxy on the inherited socket.

        Raises:
            AssertionError: HAProxy refused the config (its message attached).
        """
        executable = system_executable("haproxy")
        self.config_path.write_text(self.config())
        fds = (self._listening.fileno(),)
        checked = subprocess.run(
            [executable, "-c", "-q", "-f", str(self.config_path)],
            capture_output=True,
            text=True,
            pass_fds=fds,
            timeout=CHECK_TIMEOUT_S,
            check=False,
        )
        assert checked.returncode == 0, f"{self}: {checked.stdout}{checked.stderr}"
        self.process = spawn_logged(
            [executable, "-db", "-f", str(self.config_path)],
            self.log_path,
            cwd=self.directory,
            pass_fds=fds,
        )

    def stop(self) -> None:
        """Stop HAProxy and close the listening socket."""
        process, self.process = self.process, None
        if process is not None:
            stop(process)  # SIGTERM: HAProxy's immediate stop
        self._listening.close()
