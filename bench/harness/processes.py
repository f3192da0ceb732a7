"""Servers the benchmark starts: their own session each, CPU time from /proc, a sure stop.

A proxy may fork workers, or its shell may double-fork, so a server's CPU is the sum over
its *family*: the process we started, everything descended from it by parent pid, and
everything in the session it leads (each server is started with a new session). The ticks
counted are utime + stime + cutime + cstime of /proc/PID/stat, so a child that exited and
was waited for still counts, through its parent.
"""

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK")
_PR_SET_PDEATHSIG = 1
_STOP_WAIT = 5.0


@dataclass(frozen=True, slots=True)
class Stat:
    """The fields of /proc/PID/stat the driver uses."""

    ppid: int
    session: int
    ticks: int  # utime + stime + cutime + cstime
    started: int  # start time after boot, in ticks: tells a reused pid from the old one


def read_stats() -> dict[int, Stat]:
    """Every process's Stat, by pid (processes that vanish while read are left out)."""
    stats: dict[int, Stat] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            raw = Path(entry.path, "stat").read_bytes()
        except OSError:
            continue
        # The command name (field 2) is in parentheses and may hold spaces or ")": the
        # fields after the last ")" start with field 3, the state.
        after = raw[raw.rindex(b")") + 2 :].split()
        try:
            stats[int(entry.name)] = Stat(
                ppid=int(after[1]),
                session=int(after[3]),
                ticks=sum(int(value) for value in after[11:15]),
                started=int(after[19]),
            )
        except (IndexError, ValueError):
            continue
    return stats


def family(root: int, stats: dict[int, Stat]) -> set[int]:
    """root, its descendants (by parent pid) and every member of the session root leads."""
    children: dict[int, list[int]] = {}
    for pid, stat in stats.items():
        children.setdefault(stat.ppid, []).append(pid)
    members: set[int] = set()
    pending = [root]
    while pending:
        pid = pending.pop()
        if pid in stats and pid not in members:
            members.add(pid)
            pending.extend(children.get(pid, ()))
    members.update(pid for pid, stat in stats.items() if stat.session == root)
    return members


def machine_ticks() -> tuple[int, int]:
    """(busy, total) CPU ticks of the whole machine since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        values = [int(value) for value in f.readline().split()[1:9]]
    total = sum(values)
    return total - values[3] - values[4], total  # idle and iowait are not busy


def free_ports(count: int) -> list[int]:
    """count distinct free TCP ports on 127.0.0.1 (each held until all are chosen)."""
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket())
            sock.bind(("127.0.0.1", 0))
            ports.append(sock.getsockname()[1])
        return ports


def _die_with_parent() -> None:
    """Runs in the child before exec: SIGTERM it if the driver dies, even by SIGKILL."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass(eq=False)
class Server:
    """A process started by the driver, with its log file and the members it was seen with."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    seen: dict[int, int] = field(default_factory=dict)  # pid -> Stat.started

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def cpu_ticks(self) -> int:
        """CPU ticks used so far by the family (and remembered members, for stop())."""
        stats = read_stats()
        members = family(self.pid, stats)
        for pid in members:
            self.seen[pid] = stats[pid].started
        return sum(stats[pid].ticks for pid in members)

    def log_tail(self, size: int = 1500) -> str:
        """The end of the server's output, for a message about why it failed."""
        try:
            with self.log_path.open("rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - size))
                return f.read().decode("utf-8", "replace").strip()
        except OSError:
            return ""

    def _still_there(self) -> dict[int, int]:
        """The members (as seen or found now) that are still the same processes."""
        stats = read_stats()
        members = dict(self.seen)
        if self.alive():
            members.update((pid, stats[pid].started) for pid in family(self.pid, stats))
        return {
            pid: started
            for pid, started in members.items()
            if pid in stats and stats[pid].started == started
        }

    def _signal(self, signum: int, members: dict[int, int]) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signum)
        for pid in members:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signum)

    def stop(self) -> None:
        """SIGTERM the session and every member, give them 5 s, then SIGKILL what is left."""
        members = self._still_there()
        self._signal(signal.SIGTERM, members)
        deadline = time.monotonic() + _STOP_WAIT
        while time.monotonic() < deadline:
            if not self.alive() and not self._still_there():
                break
            time.sleep(0.05)
        else:
            self._signal(signal.SIGKILL, self._still_there())
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=_STOP_WAIT)


class ServerSet:
    """Starts servers and stops every one of them, newest first, when the run ends."""

    def __init__(self, cwd: Path) -> None:
        self._cwd = cwd
        self._servers: list[Server] = []

    def __iter__(self) -> Iterator[Server]:
        return iter(self._servers)

    def start(self, name: str, argv: list[str] | str, log_path: Path) -> Server:
        """Start argv (a list, or a string for `bash -c`) in a session of its own."""
        with log_path.open("ab") as log:
            popen = subprocess.Popen(
                argv,
                shell=isinstance(argv, str),
                executable="/bin/bash" if isinstance(argv, str) else None,
                cwd=self._cwd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent,  # safe: the driver runs no threads
            )
        server = Server(name, popen, log_path)
        self._servers.append(server)
        return server

    def stop_all(self) -> list[str]:
        """Stop every server; returns the problems met (cleanup carries on past them)."""
        problems = []
        while self._servers:
            server = self._servers.pop()
            try:
                server.stop()
            except Exception as exc:  # the others must still be stopped
                problems.append(f"stopping {server.name}: {exc!r}")
        return problems


def wait_until_serving(server: Server, port: int, path: str | None, timeout: float) -> None:
    """Wait until port accepts connections and, if path is given, GET path answers 2xx.

    Raises:
        RuntimeError: the server exited, or was not serving within timeout seconds.
    """
    deadline = time.monotonic() + timeout
    last = "nothing yet"
    while time.monotonic() < deadline:
        if not server.alive():
            raise RuntimeError(
                f"{server.name} exited (status {server.popen.returncode}) before serving on "
                f"port {port}; its output ends:\n{server.log_tail()}"
            )
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
                if path is None:
                    return
                sock.settimeout(5)
                sock.sendall(
                    f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode()
                )
                head = sock.recv(32)
            if head.startswith(b"HTTP/1.") and head[9:10] == b"2":
                return
            last = f"it answered {head!r}"
        except OSError as exc:
            last = str(exc)
        time.sleep(0.2)
    raise RuntimeError(
        f"{server.name} was not serving on port {port} after {timeout:g} s ({last}); "
        f"its output ends:\n{server.log_tail()}"
    )
