"""nginx as a reference implementation: started by a test from a `server` block it writes,
on a free loopback port, in a directory of its own, and stopped at the end.

nginx comes from the machine (Debian's nginx, installed by .ci/system-deps); a missing
binary fails the test that needs it, with what to install.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from tests.support.gateway_process import free_port
from tests.support.system_process import stop, system_executable

START_TIMEOUT_S = 10.0

_CONFIG = """\
daemon off;
master_process off;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 256; }}
http {{
  access_log off;
  client_body_temp_path {prefix}/body;
  proxy_temp_path {prefix}/proxy;
  fastcgi_temp_path {prefix}/fastcgi;
  uwsgi_temp_path {prefix}/uwsgi;
  scgi_temp_path {prefix}/scgi;
  server {{
    listen 127.0.0.1:{port};
{server}
  }}
}}
"""


def _accepts(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1.0):
        return True
    return False


def _start(binary: str, directory: Path, server: str) -> tuple[subprocess.Popen[bytes], int]:
    """nginx listening on a free port (tried again if the port is taken meanwhile)."""
    for _ in range(3):
        port = free_port()
        conf = directory / "nginx.conf"
        conf.write_text(_CONFIG.format(prefix=directory, port=port, server=server))
        process = subprocess.Popen(
            [binary, "-p", str(directory), "-e", str(directory / "error.log"), "-c", str(conf)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        while process.poll() is None and not _accepts(port):
            if time.monotonic() > deadline:
                process.kill()
                raise RuntimeError("nginx did not start listening in time")
            time.sleep(0.02)
        if process.poll() is None:
            return process, port
        error = process.stderr.read().decode(errors="replace") if process.stderr else ""
        if "Address already in use" not in error:
            raise RuntimeError(f"nginx did not start: {error}")
    raise RuntimeError("nginx found no free port")


@contextlib.contextmanager
def running_nginx(server: str, directory: Path) -> Iterator[int]:
    """Run nginx with `server` (the body of one `server` block: locations and the like)
    until the block exits; yields its port."""
    directory.mkdir(parents=True, exist_ok=True)
    process, port = _start(system_executable("nginx"), directory, server)
    try:
        yield port
    finally:
        stop(process)
        if process.stderr is not None:
            process.stderr.close()
