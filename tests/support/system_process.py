"""The system programs the tests drive (etcd, redis-server, nginx, haproxy, pebble,
Prometheus): found on the machine, started with their output in a log file, waited for
until they answer, and stopped and reaped, whatever happened.

`.ci/system-deps` installs them (Debian's packages); a missing one fails the test that
needs it with what to run.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

POLL_INTERVAL_S = 0.02
STOP_TIMEOUT_S = 5.0
# Debian puts daemons in sbin, which a non-root PATH may not have.
SBIN = "/usr/sbin:/usr/local/sbin"


def system_executable(name: str) -> str:
    """The path of `name`, on PATH or in sbin.

    Raises:
        RuntimeError: not installed.
    """
    found = shutil.which(name) or shutil.which(name, path=SBIN)
    if found is None:
        raise RuntimeError(f"{name} is not installed: run .ci/system-deps")
    return found


def spawn_logged(
    command: Sequence[str],
    log: Path,
    *,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    pass_fds: Sequence[int] = (),
    own_session: bool = False,
) -> subprocess.Popen[bytes]:
    """Start `command` with stdin closed and stdout and stderr appended to `log`.
    `own_session` puts it in a session of its own, so that `stop` can kill what it forks."""
    with log.open("ab") as output:
        return subprocess.Popen(
            list(command),
            cwd=cwd,
            env=None if env is None else dict(env),
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            pass_fds=tuple(pass_fds),
            start_new_session=own_session,
        )


def wait_until_ready(
    process: subprocess.Popen[bytes],
    ready: Callable[[], bool],
    *,
    what: str,
    log: Path,
    timeout_s: float,
) -> None:
    """Poll `ready` until it is true. A start is a wait on another process, which no event
    of ours announces; the deadline only bounds a program that never comes up.

    Raises:
        AssertionError: `process` exited, or was not ready within `timeout_s`; it is
            killed, and the message has its exit status, the time waited and its log.
    """
    started = time.monotonic()
    while not ready():
        waited = time.monotonic() - started
        if process.poll() is not None or waited > timeout_s:
            status = process.poll()
            stop(process, graceful=False)
            text = log.read_text(errors="replace")[-4000:] if log.exists() else ""
            raise AssertionError(
                f"{what} did not start (exit status {status}, after {waited:.1f} s):\n{text}"
            )
        time.sleep(POLL_INTERVAL_S)


def stop(process: subprocess.Popen[bytes], *, graceful: bool = True) -> None:
    """Stop `process` and reap it: SIGTERM first when `graceful`, SIGKILL after
    STOP_TIMEOUT_S or at once. A frozen (SIGSTOPped) process is let run so it can die;
    one that leads its own session dies with everything it forked."""
    if process.poll() is not None:
        return
    own_session = _leads_a_session(process)
    with contextlib.suppress(ProcessLookupError):
        process.send_signal(signal.SIGCONT)
        if graceful:
            process.terminate()
            try:
                process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                pass
            else:
                return
        if own_session:
            os.killpg(process.pid, signal.SIGKILL)
        else:
            process.kill()
    process.wait(STOP_TIMEOUT_S)


def _leads_a_session(process: subprocess.Popen[bytes]) -> bool:
    try:
        return os.getsid(process.pid) == process.pid
    except ProcessLookupError:
        return False
