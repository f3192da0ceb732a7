"""The supervising parent: forks the workers, restarts crashed ones, relays signals.

Each worker binds its own SO_REUSEPORT socket per listener, so the kernel spreads new
connections evenly over them. The parent serves no traffic; it waits for signals:
SIGCHLD (a worker ended: restart it unless we are stopping), SIGTERM/SIGINT (tell the
workers to drain, wait for them, exit 0), SIGHUP (relayed to the workers).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import replace

from proxy.config_model import Config

log = logging.getLogger(__name__)

RESTART_BACKOFF_S = 1.0
# A worker exiting with this code could not start (a listener failed to bind):
# restarting it cannot help, so the whole gateway stops with the same code.
EXIT_CANNOT_START = 3  # a worker that crashes at start-up is not restarted in a hot loop
_SIGNALS = {signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP}


def pin_ephemeral_ports(config: Config) -> Config:
    """Replace `:0` listeners with concrete free ports, so every worker binds the same."""
    listeners = []
    for listener in config.listeners:
        if listener.port == 0:
            family = socket.AF_INET6 if ":" in listener.host else socket.AF_INET
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                probe.bind((listener.host, 0))
                listener = replace(listener, port=probe.getsockname()[1])
        listeners.append(listener)
    return replace(config, listeners=tuple(listeners))


class Supervisor:
    """Keeps `workers` worker processes running `run_worker(config)`."""

    def __init__(self, config: Config, workers: int, run_worker: Callable[[Config], int]) -> None:
        self.config = pin_ephemeral_ports(config)
        self.workers = workers
        self._run_worker = run_worker
        self._children: dict[int, float] = {}  # pid -> start time
        self._stopping = False
        self._exit_code = 0
        self._restarts_due: list[float] = []  # monotonic times of delayed restarts
        self.restarts = 0

    def _spawn(self) -> None:
        pid = os.fork()
        if pid == 0:  # the worker
            # A SIGHUP (reload) that arrives before the worker's loop has its handler
            # must not kill it with the default action.
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)
            code = 1
            try:
                code = self._run_worker(self.config)
            finally:
                os._exit(code)
        self._children[pid] = time.monotonic()

    def run(self) -> int:
        """Supervise until told to stop; returns the exit code."""
        signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
        for _ in range(self.workers):
            self._spawn()
        log.info("supervising %d workers (pids %s)", self.workers, sorted(self._children))
        while self._children or (self._restarts_due and not self._stopping):
            info = self._next_signal()
            if info is None:
                continue
            if info.si_signo in (signal.SIGTERM, signal.SIGINT):
                if not self._stopping:
                    log.info("stopping: draining %d workers", len(self._children))
                self._stopping = True
                self._signal_children(signal.SIGTERM)
            elif info.si_signo == signal.SIGHUP:
                self._signal_children(signal.SIGHUP)
            else:
                self._reap()
        return self._exit_code

    def _next_signal(self) -> signal.struct_siginfo | None:
        """The next signal; meanwhile, restart workers whose back-off has passed."""
        if not self._restarts_due:
            return signal.sigwaitinfo(_SIGNALS)
        wait = self._restarts_due[0] - time.monotonic()
        info = signal.sigtimedwait(_SIGNALS, max(wait, 0.0)) if wait > 0 else None
        now = time.monotonic()
        while self._restarts_due and self._restarts_due[0] <= now and not self._stopping:
            self._restarts_due.pop(0)
            self._spawn()
        return info

    def _signal_children(self, signum: int) -> None:
        for pid in self._children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            started = self._children.pop(pid, None)
            if started is None:
                continue
            code = os.waitstatus_to_exitcode(status)
            if self._stopping:
                log.info("worker %d exited (%d)", pid, code)
                continue
            if code == EXIT_CANNOT_START:
                log.error("worker %d could not start; stopping", pid)
                self._exit_code = EXIT_CANNOT_START
                self._stopping = True
                self._signal_children(signal.SIGTERM)
                continue
            self.restarts += 1
            log.error("worker %d died (exit %d); restarting it", pid, code)
            now = time.monotonic()
            if now - started < RESTART_BACKOFF_S:
                # Dying at start-up: wait before the next try, but keep taking signals.
                self._restarts_due.append(now + RESTART_BACKOFF_S)
            else:
                self._spawn()
