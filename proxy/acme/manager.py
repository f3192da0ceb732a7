"""The supervisor's ACME manager: which names need a certificate, when each is ordered,
and telling the workers about challenges and new certificates.

One process orders: the supervising parent, which serves no traffic; every worker
serves. The manager keeps a `ManagedName` per (storage, directory, name) of the config's
`tls.acme` sections, with the certificate found in storage and when the name is next
ordered (proxy/acme/schedule.py): now when there is no usable certificate for it, its
renewal time otherwise, or the end of a back-off after a failure.

- **Orders run in a thread.** The `acme` library blocks (requests), so each order
  (proxy/acme/order.py) runs in a daemon thread with the supervisor's signals blocked;
  the loop awaits its outcome. Orders run one at a time, and only once every worker
  started with the gateway is serving (a challenge must be answerable before it is
  answered). A stop does not wait for an order: its thread stops at its next request.
  The supervisor may fork a worker (a restart) while an order's thread runs; the child
  keeps only the forking thread, and nothing the order holds (the `requests` session,
  the account key) is used by a worker.
- **Challenges reach every worker before the server is told to check them.** The order's
  thread hands each challenge to the loop (`_Responder.offer`), which adds it to the
  state and sends the whole state to every serving worker over its channel (op `acme`,
  `tell_workers`), and only when all have answered does the order go on. A worker
  that becomes ready later gets the state then (`worker_ready`).
- **Certificates reach the workers through storage.** A new certificate is written to
  storage (proxy/acme/storage.py) and then the state is sent again: each worker, on
  every `acme` message and at its start, loads the certificate files of its listeners'
  names that changed (proxy/process/acme_serving.py), so a restarted worker serves what
  the others serve.
- **A failed order changes nothing that is served.** It is logged with the server's
  reason, counted (`gatehouse_acme_orders_total{result="failure"}`), and the name is
  tried again after a back-off; the gauge `gatehouse_acme_next_order_timestamp_seconds`
  says when.
- **A reload** (`configure`) keeps the state of every name whose settings did not
  change (its back-off included), drops names no longer configured, and plans the new
  ones, which are ordered at once if storage has nothing usable for them.

The state sent to workers: `{"http01": {token: key authorization}, "tls_alpn01":
{name: challenge PEM file}}`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import signal
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeVar

from metrics.gateway import ACME_NEXT_ORDER, ACME_ORDERS
from proxy.acme.challenges import (
    HTTP_01,
    TLS_ALPN_01,
    Challenge,
    OrderFailed,
    tls_alpn_certificate,
)
from proxy.acme.schedule import renewal_time, retry_delay
from proxy.acme.storage import AcmeStorage, StoredCertificate
from proxy.buildinfo import version
from proxy.config.model import AcmeConfig, Config, ListenerConfig

if TYPE_CHECKING:
    from proxy.acme.order import AcmeSession

log = logging.getLogger(__name__)

# Every worker takes a challenge within this, or the order fails.
OFFER_TIMEOUT_S = 10.0
# The manager looks at its schedule at least this often (the wall clock may jump).
MAX_IDLE_S = 3600.0
# The signals the supervisor's loop handles: never delivered to an order's thread.
_SUPERVISOR_SIGNALS = {signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP}

# What the supervisor provides: send `state` to the worker `pid` (None: every serving
# worker) and wait for the answers; the errors they reported.
TellWorkers = Callable[[dict[str, Any], int | None], Awaitable[list[str]]]
T = TypeVar("T")


@dataclass(eq=False)
class ManagedName:
    """One name whose certificate the manager keeps: its settings, the listeners that
    serve it, the certificate in storage (None: none usable), and the schedule."""

    name: str
    settings: AcmeConfig
    storage: AcmeStorage
    listeners: tuple[str, ...]
    certificate: StoredCertificate | None = None
    failures: int = 0  # failed orders in a row
    next_order: float = 0.0  # Unix time

    def __repr__(self) -> str:
        serial = self.certificate.serial if self.certificate is not None else None
        return (
            f"<ManagedName {self.name} serial={serial} failures={self.failures} "
            f"next_order={_when(self.next_order)}>"
        )

    @property
    def usable(self) -> StoredCertificate | None:
        """The stored certificate when it is for this name."""
        certificate = self.certificate
        return certificate if certificate is not None and certificate.covers(self.name) else None


class AcmeManager:
    """Orders and renews the certificates of a config's `tls.acme` names."""

    def __init__(
        self,
        config: Config,
        tell_workers: TellWorkers,
        *,
        on_certificates: Callable[[], None] = lambda: None,
        now: Callable[[], float] = time.time,
    ) -> None:
        self._tell_workers = tell_workers
        self._on_certificates = on_certificates  # a certificate was obtained
        self._now = now
        self._names: dict[tuple[str, str, str], ManagedName] = {}
        self._http01: dict[str, str] = {}  # token -> key authorization
        self._tls_alpn01: dict[str, str] = {}  # name -> challenge PEM file
        self._sessions: dict[tuple[str, str, str | None, str | None], AcmeSession] = {}
        self._wake = asyncio.Event()
        self._serving = asyncio.Event()  # every worker the gateway started with is serving
        self._stopping = threading.Event()
        self._task: asyncio.Task[None] | None = None
        self.configure(config)

    def __repr__(self) -> str:
        state = "STOPPING" if self._stopping.is_set() else "RUNNING" if self._task else "IDLE"
        return f"<AcmeManager {state} names={len(self._names)} challenges={self._challenges()}>"

    @staticmethod
    def wanted(config: Config) -> bool:
        """Whether `config` has any `tls.acme` section."""
        return any(_acme_of(listener) is not None for listener in config.listeners)

    # -- the supervisor's calls --------------------------------------------------------
    def start(self) -> None:
        """Start the schedule (orders wait until `workers_serving`)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    def workers_serving(self) -> None:
        """Every worker the gateway started with is serving: orders may begin."""
        self._serving.set()

    async def worker_ready(self, pid: int) -> None:
        """A worker (new, or restarted) is serving: send it the state."""
        await self._tell(pid)

    async def aclose(self) -> None:
        """Stop ordering; an order's thread stops at its next request."""
        self._stopping.set()
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def configure(self, config: Config) -> None:
        """Take the names of `config` (at start and after each successful reload)."""
        wanted: dict[tuple[str, str, str], tuple[AcmeConfig, list[str]]] = {}
        for listener in config.listeners:
            acme = _acme_of(listener)
            if acme is None:
                continue
            for name in acme.domains:
                key = (acme.storage, acme.directory, name)
                wanted.setdefault(key, (acme, []))[1].append(listener.name)
        names: dict[tuple[str, str, str], ManagedName] = {}
        for key, (settings, listeners) in wanted.items():
            managed = self._names.get(key)
            if managed is None or not managed.settings.same_settings(settings):
                storage = AcmeStorage(settings.storage, settings.directory)
                managed = ManagedName(key[2], settings, storage, tuple(listeners))
                managed.certificate = storage.stored(managed.name)
                managed.next_order = self._planned(managed)
                self._describe(managed)
            managed.settings, managed.listeners = settings, tuple(listeners)
            names[key] = managed
        gone = {managed.name for managed in self._names.values()}
        gone -= {managed.name for managed in names.values()}
        for name in gone:
            with contextlib.suppress(KeyError):
                ACME_NEXT_ORDER.remove(name)
        self._names = names
        for managed in names.values():
            ACME_NEXT_ORDER.labels(managed.name).set(managed.next_order)
        self._wake.set()

    def certificates(self) -> list[tuple[str, str]]:
        """(listener name, chain file) of each certificate in storage for a configured
        name (what `gatehouse_certificate_expiry_timestamp_seconds` and /certificates
        show beside the config's own)."""
        return [
            (listener, managed.certificate.cert)
            for managed in self._names.values()
            if managed.certificate is not None
            for listener in managed.listeners
        ]

    def names(self) -> list[ManagedName]:
        """The managed names, in the config's order."""
        return list(self._names.values())

    def state(self) -> dict[str, Any]:
        """What every worker must know: the challenges being answered."""
        return {"http01": dict(self._http01), "tls_alpn01": dict(self._tls_alpn01)}

    # -- the schedule ------------------------------------------------------------------
    def _planned(self, managed: ManagedName) -> float:
        """When `managed` is next ordered, with no failure behind it."""
        certificate = managed.usable
        if certificate is None:
            return self._now()
        return renewal_time(
            certificate.not_before, certificate.not_after, managed.settings.renew_before
        )

    def _describe(self, managed: ManagedName) -> None:
        certificate = managed.certificate
        if certificate is None:
            found = "no certificate in storage"
        elif managed.usable is None:
            found = f"a stored certificate that is not for it (serial {certificate.serial})"
        else:
            expires = _when(certificate.not_after)
            found = f"the stored certificate, serial {certificate.serial}, expires {expires}"
        log.info(
            "acme: %s (%s, %s): %s; next order %s",
            *(managed.name, managed.settings.directory, managed.settings.challenge, found),
            "now" if managed.next_order <= self._now() else _when(managed.next_order),
        )

    async def _run(self) -> None:
        await self._serving.wait()
        while True:
            now = self._now()
            due = [managed for managed in self._names.values() if managed.next_order <= now]
            if due:
                await self._order(min(due, key=lambda managed: managed.next_order))
                continue
            self._wake.clear()
            upcoming = min((managed.next_order for managed in self._names.values()), default=None)
            idle = MAX_IDLE_S if upcoming is None else min(MAX_IDLE_S, upcoming - now)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(idle):
                    await self._wake.wait()

    async def _order(self, managed: ManagedName) -> None:
        name = managed.name
        renewing = managed.usable is not None
        log.info(
            "acme: ordering %s certificate for %s from %s (%s)",
            *("a renewed" if renewing else "a", name, managed.settings.directory),
            managed.settings.challenge,
        )
        loop = asyncio.get_running_loop()
        try:
            stored = await self._in_thread(self._obtain, managed, loop)
        except Exception as exc:  # OrderFailed, or a bug
            if not isinstance(exc, OrderFailed):  # a bug: it counts as a failure too
                log.exception("acme: bug while ordering a certificate for %s", name)
            managed.failures += 1
            delay = retry_delay(managed.failures)
            managed.next_order = self._now() + delay
            ACME_ORDERS.labels("failure").inc()
            current = managed.usable
            kept = (
                f"the current certificate (serial {current.serial}, expires "
                f"{_when(current.not_after)}) stays"
                if current is not None
                else "no certificate is served for it yet"
            )
            log.error(
                "acme: the order for %s failed (%d in a row): %s; %s; next try in %.0f s",
                *(name, managed.failures, exc, kept, delay),
            )
        else:
            managed.certificate = stored
            managed.failures = 0
            managed.next_order = self._planned(managed)
            ACME_ORDERS.labels("success").inc()
            log.info(
                "acme: obtained the certificate of %s: serial %s, expires %s; renewal %s",
                *(name, stored.serial, _when(stored.not_after), _when(managed.next_order)),
            )
            await self._tell(None)  # the workers load it
            self._on_certificates()
        if self._names.get(_key_of(managed)) is managed:
            ACME_NEXT_ORDER.labels(name).set(managed.next_order)

    def _obtain(self, managed: ManagedName, loop: asyncio.AbstractEventLoop) -> StoredCertificate:
        """In the order's thread: order `managed`'s certificate and store it.

        Raises:
            OrderFailed: no certificate (why in the message).
        """
        session = self._session(managed.settings)
        responder = _Responder(self, loop, managed.storage)
        chain, key = session.obtain(managed.name, managed.settings.challenge, responder)
        try:
            return managed.storage.save_certificate(managed.name, chain, key)
        except (OSError, ValueError) as exc:
            raise OrderFailed(f"cannot store the certificate: {exc}") from None

    def _session(self, settings: AcmeConfig) -> AcmeSession:
        from proxy.acme.order import AcmeSession  # the acme library, loaded on first use

        key = (settings.storage, settings.directory, settings.email, settings.ca)
        session = self._sessions.get(key)
        if session is None:
            storage = AcmeStorage(settings.storage, settings.directory)
            session = AcmeSession(settings, storage, f"gatehouse/{version()}", self._stopping)
            self._sessions[key] = session
        return session

    def _in_thread(self, function: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """`function(*args)` in a daemon thread of its own; its outcome as a future."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()

        def run() -> None:
            signal.pthread_sigmask(signal.SIG_BLOCK, _SUPERVISOR_SIGNALS)
            try:
                outcome: tuple[Any, BaseException | None] = (function(*args), None)
            except BaseException as exc:  # handed to the loop, which raises it there
                outcome = (None, exc)
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits
                loop.call_soon_threadsafe(_settle, future, outcome)

        threading.Thread(target=run, name="gatehouse-acme-order", daemon=True).start()
        return future

    # -- challenges (called from the order's thread through `_Responder`) -------------
    async def offer(self, challenge: Challenge, path: str | None) -> None:
        """Answer `challenge` from now on (`path`: its TLS-ALPN-01 certificate)."""
        if challenge.kind == HTTP_01:
            self._http01[challenge.token] = challenge.key_authorization
        elif challenge.kind == TLS_ALPN_01 and path is not None:
            self._tls_alpn01[challenge.name] = path
        else:
            raise ValueError(f"no way to answer {challenge}")
        await self._tell(None)

    async def withdraw(self, challenge: Challenge) -> None:
        """Stop answering `challenge`."""
        if challenge.kind == HTTP_01:
            self._http01.pop(challenge.token, None)
        else:
            self._tls_alpn01.pop(challenge.name, None)
        await self._tell(None)

    def _challenges(self) -> int:
        return len(self._http01) + len(self._tls_alpn01)

    async def _tell(self, pid: int | None) -> None:
        for error in await self._tell_workers(self.state(), pid):
            log.error("acme: a worker did not take the certificates or challenges: %s", error)


class _Responder:
    """The order thread's way to the workers (proxy/acme/order.py's `Responder`)."""

    def __init__(
        self, manager: AcmeManager, loop: asyncio.AbstractEventLoop, storage: AcmeStorage
    ) -> None:
        self._manager = manager
        self._loop = loop
        self._storage = storage

    def offer(self, challenge: Challenge) -> None:
        path = None
        if challenge.kind == TLS_ALPN_01:
            pem = tls_alpn_certificate(challenge.name, challenge.key_authorization)
            path = self._storage.save_challenge(challenge.name, pem)
        self._wait(self._manager.offer(challenge, path), f"answering {challenge.kind}")

    def withdraw(self, challenge: Challenge) -> None:
        try:
            self._wait(self._manager.withdraw(challenge), f"withdrawing {challenge.kind}")
        finally:
            if challenge.kind == TLS_ALPN_01:
                self._storage.remove_challenge(challenge.name)

    def _wait(self, coroutine: Coroutine[Any, Any, None], what: str) -> None:
        try:
            future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        except RuntimeError:  # the loop has closed: the gateway stopped
            coroutine.close()
            raise OrderFailed("the gateway is stopping") from None
        try:
            future.result(OFFER_TIMEOUT_S)
        except (concurrent.futures.TimeoutError, concurrent.futures.CancelledError):
            future.cancel()
            raise OrderFailed(
                f"the workers did not confirm {what} within {OFFER_TIMEOUT_S:g} s"
            ) from None


def _settle(future: asyncio.Future[Any], outcome: tuple[Any, BaseException | None]) -> None:
    if future.done():
        return
    result, error = outcome
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def _acme_of(listener: ListenerConfig) -> AcmeConfig | None:
    return listener.tls.acme if listener.tls is not None else None


def _key_of(managed: ManagedName) -> tuple[str, str, str]:
    return (managed.settings.storage, managed.settings.directory, managed.name)


def _when(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
