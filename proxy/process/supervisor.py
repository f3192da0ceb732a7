"""The supervising parent: forks the workers and keeps them running, reloads the config,
serves the admin listener, and drains on SIGTERM.

Each worker binds its own SO_REUSEPORT socket per listener, so the kernel spreads new
connections evenly over them; the parent serves no traffic. It runs an asyncio loop for:
- SIGCHLD: a worker ended. It is restarted (after a back-off if it died young), logged
  and counted, unless we are stopping. One that could not bind its listeners
  (EXIT_CANNOT_START) stops the gateway with the same code: restarting cannot help.
- SIGTERM/SIGINT: /readyz turns 503, the workers drain (proxy/process/server.py), the parent
  exits 0 when they have; a worker still there after the grace period is killed.
- SIGHUP, POST /reload, `gatehouse reload`, a change of the config file or a new revision
  of its etcd key (the config source, proxy/source/): the parent reads and validates the
  document, then every worker prepares the new config and, once all
  have, commits it (proxy/process/worker_calls.py; a worker's side in
  proxy/process/server.py). An invalid file, or a worker that cannot prepare, leaves
  every worker on the old config; the errors are logged and counted.
  gatehouse_config_info and gatehouse_config_revision say which document runs.
- ACME (`tls.acme`): the parent orders and renews the certificates, in a thread, and
  tells the workers over their channels about challenges and new certificates, which
  every worker serves (proxy/process/acme_link.py, proxy/acme/manager.py).
- The admin listener (metrics/admin.py): the workers' metrics are collected over each
  worker's channel (proxy/process/control.py, worker_calls.py) and summed
  (metrics/aggregate.py). The
  same reply carries each worker's endpoint states, which with the merged gauges make
  /upstreams and the status page (proxy/process/admin_views.py, metrics/status_page.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from prometheus_client.metrics_core import Metric

from metrics.admin import AdminServer
from metrics.admin_access import AdminAccess
from metrics.aggregate import Snapshot, counters_only, merge, prune, snapshot
from metrics.gateway import (
    CONFIG_LAST_RELOAD_SUCCESS,
    CONFIG_RELOADS,
    GATEWAY_REGISTRY,
    WORKER_RESTARTS,
    WORKERS,
    record_certificates,
    record_config_source,
)
from metrics.status_page import RequestRates, render_page
from proxy.config.document import ConfigError
from proxy.config.load import parse_config
from proxy.config.model import AdminConfig, Config, ListenerConfig
from proxy.config.view import config_view
from proxy.process.acme_link import AcmeLink
from proxy.process.admin_views import (
    certificates_view,
    middleware_view,
    routes_view,
    status_view,
    upstreams_view,
    with_expiry,
)
from proxy.process.control import Message, WorkerChannel
from proxy.process.worker_calls import (
    WorkerRecord,
    collect_metrics,
    purge_caches,
    switch_workers,
)
from proxy.source.base import ConfigSource, ConfigText

log = logging.getLogger(__name__)

RESTART_BACKOFF_S = 1.0
# A worker exiting with this code could not start (a listener failed to bind):
# restarting it cannot help, so the whole gateway stops with the same code.
EXIT_CANNOT_START = 3
KILL_AFTER_GRACE_S = 5.0  # past the grace period, a worker that has not exited is killed
_SIGNALS = {signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP}

RunWorker = Callable[[Config, socket.socket], int]


def pin_ephemeral_ports(config: Config, running: Config | None = None) -> Config:
    """Replace `:0` listeners with concrete ports, so every worker binds the same: the
    port a running listener that is otherwise the same already has, or a free one."""
    listeners = []
    for listener in config.listeners:
        if listener.port == 0:
            same = [
                old
                for old in (running.listeners if running is not None else ())
                if replace(old, port=0) == listener
            ]
            listener = replace(listener, port=same[0].port if same else _free_port(listener))
        listeners.append(listener)
    return replace(config, listeners=tuple(listeners))


def _free_port(listener: ListenerConfig) -> int:
    family = socket.AF_INET6 if ":" in listener.host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.bind((listener.host, 0))
        return int(probe.getsockname()[1])


def admin_access(admin: AdminConfig) -> AdminAccess:
    """The admin listener's access settings: `admin.token`, and `admin.hosts` with the
    name `admin.bind` listens on (when it is a name, clients ask by it)."""
    hosts = list(admin.hosts)
    if admin.host and not _is_ip(admin.host):
        hosts.append(admin.host)
    return AdminAccess.of(admin.token, hosts)


def _warn_if_open(admin: AdminConfig) -> None:
    """An admin listener beyond loopback with no token: whoever reaches it can read
    /metrics and /config and make the gateway reload (say so once per start or reload)."""
    if admin.token is None and not _is_loopback(admin.host):
        log.warning(
            "the admin listener on %s:%d leaves loopback without admin.token: anyone who "
            "reaches it can read /config and /metrics and reload the gateway",
            admin.host,
            admin.port,
        )


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Supervisor:
    """Keeps `workers` worker processes running `run_worker(config, channel)`."""

    def __init__(
        self,
        config: Config,
        loaded: ConfigText,
        source: ConfigSource,
        workers: int,
        run_worker: RunWorker,
    ) -> None:
        self.config = pin_ephemeral_ports(config)
        self.loaded = loaded  # the document running: what workers parse, /config shows
        self.source = source
        self.workers = workers
        self._run_worker = run_worker
        self._children: dict[int, WorkerRecord] = {}
        self._generation = 0
        self._stopping = False
        self._exit_code = 0
        self._done: asyncio.Event | None = None
        self._reload_lock: asyncio.Lock | None = None
        self._admin: AdminServer | None = None
        self._retired: list[Snapshot] = []  # what workers that are gone had counted
        self._tasks: set[asyncio.Task[Any]] = set()
        self.restarts = 0
        self._certificates = certificates_view(self.config)
        self._rates = RequestRates(time.monotonic())
        # With `tls.acme`: orders certificates and tells the workers (proxy/acme/).
        self._acme = AcmeLink(self._serving_channels, self.workers, self._record_certificates)

    # -- the parent's loop -------------------------------------------------------------
    async def run(self) -> int:
        """Supervise until told to stop; returns the exit code."""
        loop = asyncio.get_running_loop()
        self._done = asyncio.Event()
        self._reload_lock = asyncio.Lock()
        loop.add_signal_handler(signal.SIGCHLD, self._reap)
        loop.add_signal_handler(signal.SIGTERM, self._stop, "SIGTERM")
        loop.add_signal_handler(signal.SIGINT, self._stop, "SIGINT")
        loop.add_signal_handler(signal.SIGHUP, self._spawn_task, self.reload, "SIGHUP")
        if self.config.admin is not None:
            admin = AdminServer(self, admin_access(self.config.admin))
            try:
                await admin.start(self.config.admin.host, self.config.admin.port)
            except OSError as exc:
                log.error("cannot start: admin listener: %s", exc)
                return EXIT_CANNOT_START
            self._admin = admin
            _warn_if_open(self.config.admin)
        CONFIG_LAST_RELOAD_SUCCESS.set(time.time())
        record_config_source(self.source.name, self.source.kind, self.loaded.revision)
        self._acme.configure(self.config)
        self._record_certificates()
        for _ in range(self.workers):
            self._spawn()
        log.info("supervising %d workers (pids %s)", self.workers, sorted(self._children))
        self._spawn_task(self.source.watch, self._source_changed, lambda: self.config.reload)
        await self._done.wait()
        await self._acme.aclose()
        for task in list(self._tasks):
            task.cancel()
        await self.source.aclose()
        if self._admin is not None:
            await self._admin.close()
        return self._exit_code

    def _spawn_task(self, make: Callable[..., Any], *args: Any) -> None:
        task = asyncio.get_running_loop().create_task(make(*args))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _spawn(self) -> None:
        ours, theirs = socket.socketpair()
        # Signals wait until the child has let go of the parent's handlers: a signal
        # handled in between would reach the parent's loop through the shared wakeup fd.
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
        try:
            pid = os.fork()
        except OSError:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
            ours.close()
            theirs.close()
            log.exception("cannot fork a worker")
            return
        if pid == 0:  # the worker
            code = 1
            try:
                self._become_worker(ours)
                signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
                code = self._run_worker(self.config, theirs)
            finally:
                os._exit(code)
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        theirs.close()
        worker = WorkerRecord(
            pid, WorkerChannel(ours, lambda event: self._on_event(pid, event)), self._generation
        )
        self._children[pid] = worker
        WORKERS.set(len(self._children))
        self._spawn_task(worker.channel.start)

    def _become_worker(self, ours: socket.socket) -> None:
        """In the child, before it runs: drop what belongs to the parent."""
        signal.set_wakeup_fd(-1)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
            signal.signal(signum, signal.SIG_DFL)
        # A reload is the parent's business; a SIGHUP sent to the whole group is ignored.
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        ours.close()
        fds = [worker.channel.fileno for worker in self._children.values()]
        if self._admin is not None:
            fds += self._admin.filenos()
        fds += self.source.filenos()
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)

    def _on_event(self, pid: int, event: Message) -> None:
        worker = self._children.get(pid)
        if worker is None or event.get("event") != "ready":
            return
        worker.ready = True
        serving = sum(worker.ready for worker in self._children.values())
        self._spawn_task(self._acme.worker_ready, pid, serving)
        if worker.generation != self._generation:
            # Forked before a reload it did not take part in: bring it up to date.
            self._spawn_task(self._catch_up, worker)

    # -- workers ending ------------------------------------------------------------------
    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            worker = self._children.pop(pid, None)
            if worker is None:
                continue
            WORKERS.set(len(self._children))
            self._spawn_task(worker.channel.aclose)
            if worker.last_metrics:
                self._retired.append(counters_only(worker.last_metrics))
            self._ended(worker, os.waitstatus_to_exitcode(status))
        if self._stopping and not self._children and self._done is not None:
            self._done.set()

    def _ended(self, worker: WorkerRecord, code: int) -> None:
        if self._stopping:
            log.info("worker %d exited (%d)", worker.pid, code)
            return
        if code == EXIT_CANNOT_START:
            log.error("worker %d could not start; stopping", worker.pid)
            self._exit_code = EXIT_CANNOT_START
            self._stop("a worker could not start")
            return
        self.restarts += 1
        WORKER_RESTARTS.inc()
        log.error("worker %d died (exit %d); restarting it", worker.pid, code)
        if time.monotonic() - worker.started < RESTART_BACKOFF_S:
            # Dying at start-up: wait before the next try, but keep taking signals.
            asyncio.get_running_loop().call_later(RESTART_BACKOFF_S, self._respawn)
        else:
            self._spawn()

    def _respawn(self) -> None:
        if not self._stopping:
            self._spawn()

    def _stop(self, why: str) -> None:
        if self._stopping:
            return
        self._stopping = True
        log.info("stopping (%s): draining %d workers", why, len(self._children))
        for pid in self._children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        loop = asyncio.get_running_loop()
        loop.call_later(self.config.grace_period + KILL_AFTER_GRACE_S, self._kill_stragglers)
        if not self._children and self._done is not None:
            self._done.set()

    def _kill_stragglers(self) -> None:
        for pid in self._children:
            log.error("worker %d still running after the grace period: killing it", pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    # -- reload --------------------------------------------------------------------------
    async def reload(self, reason: str) -> tuple[bool, list[str]]:
        """Read the config's document again and switch every worker to it, or none.

        Returns whether it was taken, and the errors (each `source:line: key: message`,
        line 1 when no line is to blame; the source a path or `etcd://...@REVISION`).
        Every refusal, whatever its cause, is counted in
        `gatehouse_config_reloads_total{result="failure"}`."""
        assert self._reload_lock is not None
        async with self._reload_lock:
            name = self.source.name
            log.info("reloading %s (%s)", name, reason)
            if self._stopping:
                ok, errors = False, [f"{name}:1: draining: a reload is not taken any more"]
            else:
                try:
                    ok, errors = await self._reload()
                except Exception as exc:  # a bug: refused and counted like any refusal
                    log.exception("bug while reloading %s", name)
                    ok, errors = False, [f"{name}:1: cannot load the config: {exc!r}"]
            CONFIG_RELOADS.labels("success" if ok else "failure").inc()
            if ok:
                CONFIG_LAST_RELOAD_SUCCESS.set(time.time())
                record_config_source(self.source.name, self.source.kind, self.loaded.revision)
                self._acme.configure(self.config)
                self._record_certificates()
                log.info("reload done: %d routes", len(self.config.routes))
            else:
                for line in errors:
                    log.error("reload refused, the running config stays: %s", line)
            return ok, errors

    async def _reload(self) -> tuple[bool, list[str]]:
        try:
            loaded = await self.source.read()
        except ConfigError as exc:
            return False, exc.errors  # tried again at the next change
        try:
            config = parse_config(loaded.text, source=loaded.source)
        except ConfigError as exc:
            self.source.refused(loaded)
            return False, exc.errors
        try:
            config = pin_ephemeral_ports(config, self.config)
        except OSError as exc:
            return False, [f"{loaded.source}:1: cannot pick a port for a ':0' listener: {exc}"]
        admin = await self._new_admin(config, loaded.source)
        if isinstance(admin, str):
            return False, [admin]
        # Workers still starting take part when they are ready (`_catch_up`).
        workers = [worker for worker in self._children.values() if worker.ready]
        try:
            errors = await switch_workers(
                config, loaded.text, loaded.source, workers, self._children
            )
        except BaseException:
            if admin is not None:  # a bug, or the parent stopping: not left listening
                await admin.close()
            raise
        if errors:
            if admin is not None:
                await admin.close()
            self.source.refused(loaded)
            return False, errors
        if admin is not None:
            old, self._admin = self._admin, admin
            if old is not None:
                await old.close()
        elif self._admin is not None and config.admin is not None:
            self._admin.access = admin_access(config.admin)  # a new token holds at once
        if self._admin is not None and config.admin is not None:
            _warn_if_open(config.admin)
        if config.workers is not None and config.workers != self.config.workers:
            log.warning("workers: %d -> %d takes a restart", self.workers, config.workers)
        if config.log_format != self.config.log_format:
            log.warning(
                "logging.format: %s -> %s takes a restart",
                self.config.log_format,
                config.log_format,
            )
        self.config, self.loaded = config, loaded
        self._generation += 1
        for worker in workers:
            worker.generation = self._generation
        self.source.taken(loaded)
        routes = {route.name for route in config.routes}
        self._retired = [prune(families, routes, config.upstreams) for families in self._retired]
        return True, []

    async def _new_admin(self, config: Config, source: str) -> AdminServer | str | None:
        """A new admin listener when the reload moves it (bound before anything else
        switches); a str is why it cannot bind."""
        new, running = config.admin, self.config.admin
        if new is None or (
            running is not None and (new.host, new.port) == (running.host, running.port)
        ):
            return None
        admin = AdminServer(self, admin_access(new))
        try:
            await admin.start(new.host, new.port)
        except OSError as exc:
            return f"{source}:{new.line}: admin.bind: cannot listen: {exc}"
        return admin

    def _record_certificates(self) -> None:
        """The expiry gauge and /certificates, from the config's certificates and the
        ones ACME obtained."""
        acme = self._acme.certificates()
        record_certificates([*self.config.tls_certificates(), *acme])
        self._certificates = certificates_view(self.config, acme)

    def _serving_channels(self) -> list[tuple[int, WorkerChannel]]:
        return [(pid, worker.channel) for pid, worker in self._children.items() if worker.ready]

    async def _catch_up(self, worker: WorkerRecord) -> None:
        assert self._reload_lock is not None
        async with self._reload_lock:
            if worker.generation == self._generation or worker.pid not in self._children:
                return
            errors = await switch_workers(
                self.config, self.loaded.text, self.loaded.source, [worker], self._children
            )
            if errors:
                log.error("worker %d cannot take the running config: %s", worker.pid, errors)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.pid, signal.SIGTERM)  # it is restarted on the new one
                return
            worker.generation = self._generation

    async def _source_changed(self, reason: str) -> None:
        """The source's watch saw a new document (a changed file, an etcd revision)."""
        if not self._stopping:
            await self.reload(reason)

    # -- the admin listener's view (metrics/admin.py AdminApp) -------------------------
    def ready(self) -> tuple[bool, str]:
        if self._stopping:
            return False, "draining"
        serving = sum(worker.ready for worker in self._children.values())
        if not serving:
            return False, "no worker is serving yet"
        return True, f"ready: {serving} of {self.workers} workers serving"

    async def metrics(self) -> list[Metric]:
        current = await collect_metrics(list(self._children.values()))
        return merge([snapshot(GATEWAY_REGISTRY), *current, *self._retired])

    async def purge_cache(
        self, middleware: str, key: str, prefix: str | None
    ) -> tuple[int, dict[str, Any]]:
        """POST /cache/purge: every worker's `cache` instances (or the one named) forget
        `key`, or every key under `prefix`, in memory and in Redis. 200 with the counts
        summed per instance; 404 when no cache instance is named so; 502 when a worker
        or a Redis failed (the others purged)."""
        return await purge_caches(list(self._children.values()), middleware, key, prefix)

    async def upstreams(self) -> list[dict[str, Any]]:
        """/upstreams: each endpoint's state over the workers (a fresh collection)."""
        merged = await self.metrics()
        return self._upstreams(merged)

    def _upstreams(self, merged: list[Metric]) -> list[dict[str, Any]]:
        states = [worker.last_endpoints for worker in self._children.values()]
        return upstreams_view(self.config, merged, states)

    def routes(self) -> list[dict[str, Any]]:
        """/routes: the route table in match order, with each route's chain."""
        return routes_view(self.config, self.config_view())

    def middleware(self) -> list[dict[str, Any]]:
        """/middleware: every middleware instance, its routes and redacted options."""
        return middleware_view(self.config, self.config_view())

    def certificates(self) -> list[dict[str, Any]]:
        """/certificates: each TLS listener's certificate as last loaded."""
        return with_expiry(self._certificates, time.time())

    async def status_page(self) -> bytes:
        """/: the status page, from a fresh collection (metrics/status_page.py)."""
        merged = await self.metrics()
        states = [worker.last_endpoints for worker in self._children.values()]
        status = status_view(
            self.config, self.config_view(), merged, states, self.certificates(), self._generation
        )
        return render_page(status, self._rates.observe(merged), time.time())

    def config_view(self) -> dict[str, Any]:
        view = config_view(self.loaded.text, self.loaded.source, self.config.concealed)
        view["revision"] = self.loaded.revision  # etcd's mod_revision; 0 for a file
        view["generation"] = self._generation
        view["workers"] = sorted(self._children)
        return view
