"""The supervisor's link to its ACME manager (proxy/acme/manager.py): made when a config
first has a `tls.acme` section, told of each reload and of each worker that becomes
ready, and given the way to reach the workers.

Orders wait until as many workers as the gateway runs are serving, so that a challenge
can be answered by whichever worker the validator's connection reaches. The manager's
state goes to the serving workers as the `acme` request of their channel
(proxy/process/control.py, answered in proxy/process/worker.py); a worker that did not
answer, or reported what it could not load, is the manager's to log.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from proxy.acme.manager import AcmeManager
from proxy.config.model import Config
from proxy.process.control import ChannelClosed, WorkerChannel

# A worker answers an `acme` message within this (it loads a few files).
ACME_REPLY_TIMEOUT_S = 10.0


class AcmeLink:
    """What the supervisor keeps of ACME: the manager, once a config asks for one."""

    def __init__(
        self,
        serving: Callable[[], list[tuple[int, WorkerChannel]]],
        workers: int,
        on_certificates: Callable[[], None],
    ) -> None:
        self._serving = serving  # (pid, channel) of every serving worker
        self._workers = workers
        self._on_certificates = on_certificates
        self.manager: AcmeManager | None = None

    def __repr__(self) -> str:
        return f"<AcmeLink {self.manager!r}>"

    def configure(self, config: Config) -> None:
        """The running config (at start, and after each successful reload)."""
        if self.manager is not None:
            self.manager.configure(config)
        elif AcmeManager.wanted(config):
            self.manager = AcmeManager(config, self.tell, on_certificates=self._on_certificates)
            self.manager.start()
            if len(self._serving()) >= self._workers:
                self.manager.workers_serving()

    async def worker_ready(self, pid: int, serving: int) -> None:
        """Worker `pid` is serving, one of `serving`: it gets the state."""
        if self.manager is None:
            return
        if serving >= self._workers:
            self.manager.workers_serving()
        await self.manager.worker_ready(pid)

    def certificates(self) -> list[tuple[str, str]]:
        """(listener name, chain file) of every certificate ACME keeps."""
        return self.manager.certificates() if self.manager is not None else []

    async def tell(self, state: dict[str, Any], pid: int | None) -> list[str]:
        """Send `state` to the worker `pid` (None: every serving worker) and wait for
        their answers; the errors they report."""
        workers = [
            (worker, channel) for worker, channel in self._serving() if pid in (None, worker)
        ]
        replies = await asyncio.gather(
            *(channel.request("acme", ACME_REPLY_TIMEOUT_S, **state) for _, channel in workers),
            return_exceptions=True,
        )
        errors: list[str] = []
        for (worker, channel), reply in zip(workers, replies, strict=True):
            if isinstance(reply, ChannelClosed):
                if not channel.closed:  # not simply gone meanwhile (its successor is told)
                    errors.append(f"worker {worker}: {reply}")
            elif isinstance(reply, BaseException):
                raise reply
            else:
                errors += [f"worker {worker}: {error}" for error in reply.get("errors", [])]
        return errors

    async def aclose(self) -> None:
        """Stop ordering (the gateway stops)."""
        if self.manager is not None:
            await self.manager.aclose()
