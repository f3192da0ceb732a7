"""An etcd v3 key as the config source: read at start (or, with etcd down, the cached
copy), then watched; every new revision goes through the same reload as a changed file.

- **Start.** etcd reachable: the key's document. Not: the cache of the last good one
  (proxy/source/cache.py), logged as such; the watch catches up once etcd is back.
- **Watch.** Each (re)connection first reads the key, offering it if it is not the
  running revision (so a gateway that was cut off, or whose watch fell behind a
  compaction, catches up from what is there now), then watches from the revision after
  that read, so that no write falls in between.
- **Liveness.** While it watches, the source reads the key every `check_interval_s`
  (GATEHOUSE_ETCD_CHECK_INTERVAL, 15 s): a member that stops answering without closing
  the connection (frozen, or cut off without a reset) fails that read within the call
  timeout, and the watch is dropped and made again, on another member if there is one.
- **Outage.** The running config keeps serving. The watch reconnects after
  `backoff_delay` (capped exponential, jittered so a fleet does not reconnect in step),
  logs once when etcd is lost and once when it is back, and says so in
  gatehouse_config_source_up and gatehouse_config_source_reconnects_total.
- **Taken, refused.** A revision every worker took is written to the cache; a refused
  one is not offered again (the supervisor has counted and logged it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
from collections.abc import Callable, Mapping

from metrics.gateway import CONFIG_SOURCE_RECONNECTS, CONFIG_SOURCE_UP
from proxy.config.document import ConfigError
from proxy.config.model import ReloadConfig
from proxy.source.base import ConfigText, OnChange
from proxy.source.cache import CachedDocument, read_cache, write_cache
from proxy.source.etcd_client import (
    Change,
    EtcdClient,
    EtcdError,
    EtcdSettingsError,
    EtcdUnavailable,
    Reading,
)
from proxy.source.etcd_url import EtcdLocation

log = logging.getLogger(__name__)

BACKOFF_BASE_S = 0.2  # the first wait after a lost connection, before jitter
BACKOFF_CAP_S = 5.0  # the longest: a fleet catches up within this of etcd's return
CHECK_INTERVAL_ENV = "GATEHOUSE_ETCD_CHECK_INTERVAL"
DEFAULT_CHECK_INTERVAL_S = 15.0  # a read while watching: is the member still answering?


def check_interval(env: Mapping[str, str]) -> float:
    """GATEHOUSE_ETCD_CHECK_INTERVAL in seconds (positive), else the default.

    Raises:
        EtcdSettingsError: it is set to something else.
    """
    value = env.get(CHECK_INTERVAL_ENV)
    if not value:
        return DEFAULT_CHECK_INTERVAL_S
    try:
        seconds = float(value)
    except ValueError:
        seconds = 0.0
    if not seconds > 0 or seconds == float("inf"):
        raise EtcdSettingsError(f"{CHECK_INTERVAL_ENV} must be a number of seconds above 0")
    return seconds


def backoff_delay(
    attempt: int,
    jitter: Callable[[], float] = random.random,
    base: float = BACKOFF_BASE_S,
    cap: float = BACKOFF_CAP_S,
) -> float:
    """The wait before try `attempt` + 1 (0 for the first retry): `base` doubled per
    attempt up to `cap`, of which half is waited for sure and half as `jitter()` (in
    [0, 1)) says: gateways that lost etcd together spread their retries."""
    ceiling = min(cap, base * 2.0 ** min(attempt, 32))
    return ceiling / 2 + ceiling / 2 * jitter()


class EtcdSource:
    """The document at `location`'s key, cached at `cache`."""

    kind = "etcd"

    def __init__(
        self,
        location: EtcdLocation,
        cache: str,
        client: EtcdClient | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        """Raises EtcdSettingsError: GATEHOUSE_ETCD_CHECK_INTERVAL is not a duration."""
        self.check_interval_s = check_interval(os.environ if env is None else env)
        self.location = location
        self.cache = cache
        self._client = client if client is not None else EtcdClient(location)
        self._latest: ConfigText | None = None  # the newest document seen
        self._running = 0  # the revision every worker runs
        self._refused = -1  # the last revision refused
        self._up = True
        self._missing = False  # the key's absence was offered (and refused) already

    @property
    def name(self) -> str:
        return self.location.url

    def _text(self, text: str, revision: int) -> ConfigText:
        return ConfigText(text, self.location.at(revision), revision, revision)

    def _document(self, reading: Reading | Change) -> ConfigText:
        """The document of a read or a watched change.

        Raises:
            ConfigError: the key does not exist (or was deleted), or is not UTF-8.
        """
        if reading.kv is None:
            raise ConfigError([f"{self.location.url}:1: the key does not exist"])
        revision = reading.kv.mod_revision
        try:
            text = reading.kv.value.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = reading.kv.value.count(b"\n", 0, exc.start) + 1
            message = f"cannot read: not UTF-8 ({exc.reason} at byte {exc.start})"
            raise ConfigError([f"{self.location.at(revision)}:{line}: {message}"]) from None
        document = self._text(text, revision)
        if self._latest is None or revision >= self._latest.revision:
            self._latest = document
        return document

    async def first(self) -> ConfigText:
        """The document to start with: etcd's, else the cached one.

        Raises:
            ConfigError: etcd refused the read, the key does not exist, or etcd cannot be
                reached and there is no usable cache.
        """
        try:
            reading = await self._client.get()
        except EtcdUnavailable as exc:
            cached = read_cache(self.cache, self.location.url)
            if cached is None:
                raise ConfigError(
                    [
                        f"{self.location.url}:1: etcd cannot be reached ({exc}) and there is "
                        f"no cached config at {self.cache} to start from"
                    ]
                ) from None
            log.warning(
                "etcd cannot be reached (%s): serving the cached revision %d from %s "
                "until it is back",
                exc,
                cached.revision,
                self.cache,
            )
            self._set_up(False)
            self._latest = self._text(cached.text, cached.revision)
            return self._latest
        except EtcdError as exc:
            raise ConfigError([f"{self.location.url}:1: etcd refused the read: {exc}"]) from None
        self._set_up(True)
        return self._document(reading)

    async def read(self) -> ConfigText:
        """The key's document now; with etcd out of reach, the newest one seen."""
        try:
            reading = await self._client.get()
        except (EtcdUnavailable, EtcdError) as exc:
            if self._latest is None:
                raise ConfigError([f"{self.location.url}:1: cannot read: {exc}"]) from None
            log.warning(
                "etcd cannot be read (%s): taking revision %d, the newest seen",
                exc,
                self._latest.revision,
            )
            return self._latest
        return self._document(reading)

    def taken(self, loaded: ConfigText) -> None:
        self._running = loaded.revision
        try:
            write_cache(self.cache, CachedDocument(self.location.url, loaded.revision, loaded.text))
        except OSError as exc:
            log.error("cannot write the config cache %s: %s", self.cache, exc)

    def refused(self, loaded: ConfigText) -> None:
        self._refused = loaded.revision

    def fallback(self) -> ConfigText | None:
        cached = read_cache(self.cache, self.location.url)
        if cached is None:
            return None
        return self._text(cached.text, cached.revision)

    async def watch(self, changed: OnChange, settings: Callable[[], ReloadConfig]) -> None:
        """Follow the key until cancelled (`settings` is a file's concern)."""
        attempt = 0
        while True:
            try:
                reading = await self._client.get()
                attempt = 0
                self._set_up(True)
                await self._offer(reading, changed)
                await self._follow(reading.revision + 1, changed)
            except (EtcdUnavailable, EtcdError) as exc:  # Compacted too: read the key again
                self._lost(exc)
            except Exception as exc:  # a bug, or an answer not as documented: keep trying
                log.exception("the etcd watch failed")
                self._lost(exc)
            await asyncio.sleep(backoff_delay(attempt))
            attempt += 1

    async def _follow(self, start_revision: int, changed: OnChange) -> None:
        """Watch from `start_revision`, reading the key every `check_interval_s` meanwhile
        (only to see that the member answers: the watch offers the changes). Returns
        never: raises when the watch ends or the member stops answering.

        Raises:
            EtcdUnavailable, EtcdError: as the client's watch and reads do.
        """
        watching = asyncio.ensure_future(self._watch(start_revision, changed))
        try:
            while True:
                done, _ = await asyncio.wait({watching}, timeout=self.check_interval_s)
                if done:
                    watching.result()  # what ended it
                    raise EtcdUnavailable("the watch ended")
                await self._client.get()
        finally:
            watching.cancel()
            with contextlib.suppress(asyncio.CancelledError, EtcdUnavailable, EtcdError):
                await watching

    async def _watch(self, start_revision: int, changed: OnChange) -> None:
        async for change in self._client.watch(start_revision):
            await self._offer(change, changed)

    async def _offer(self, change: Reading | Change, changed: OnChange) -> None:
        """Reload for a revision that is neither running nor refused (a deletion too:
        the reload refuses it, counted and logged)."""
        if change.kv is None:
            if not self._missing:  # once, not at every reconnection
                self._missing = True
                await changed(f"{self.location.key} was deleted")
            return
        self._missing = False
        revision = change.kv.mod_revision
        if revision in (self._running, self._refused):
            return
        if self._latest is not None and revision < self._latest.revision:
            return  # an older write than one already seen
        await changed(f"etcd revision {revision}")

    def _lost(self, exc: Exception) -> None:
        if self._up:
            running = self._running or (self._latest.revision if self._latest else 0)
            log.warning(
                "etcd %s cannot be reached (%s): revision %d keeps serving; reconnecting "
                "with back-off (up to %.0f s)",
                self.location.url,
                exc,
                running,
                BACKOFF_CAP_S,
            )
        else:
            log.debug("etcd %s still cannot be reached: %s", self.location.url, exc)
        self._set_up(False)

    def _set_up(self, up: bool) -> None:
        if up and not self._up:
            log.info("etcd %s is reachable again: following it", self.location.url)
            CONFIG_SOURCE_RECONNECTS.labels(self.location.url).inc()
        self._up = up
        CONFIG_SOURCE_UP.labels(self.location.url).set(1 if up else 0)

    def filenos(self) -> list[int]:
        return self._client.filenos()

    async def aclose(self) -> None:
        return None
