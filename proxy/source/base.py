"""The config source interface the supervisor (proxy/process/supervisor.py) runs on, and
`open_source`, which picks the kind from the location the command line gave.

A source hands out `ConfigText`s: a document and the name its errors carry (a file's path;
`etcd://HOST:PORT/KEY@REVISION`). The supervisor parses each, switches the workers or
refuses it, and says which (`taken`, `refused`), so that the source does not offer a
refused one again and keeps what was taken (the etcd source caches it on disk).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from proxy.config.model import ReloadConfig

# Told by a source's watch that a new document may be there; the argument says why.
OnChange = Callable[[str], Awaitable[object]]


@dataclass(frozen=True, slots=True)
class ConfigText:
    """One document as read: its text, the name its errors carry (`source` of
    parse_config) and the etcd mod_revision it was written at (0 for a file). `mark` is
    what the source tells versions apart by (a file's stat signature, a revision)."""

    text: str
    source: str
    revision: int = 0
    mark: object = None


class ConfigSource(Protocol):
    """A file or an etcd key, as the supervisor uses it."""

    @property
    def name(self) -> str:
        """What logs and the metrics' `source` label call it: the path, or the etcd URL
        (without credentials or a revision)."""

    @property
    def kind(self) -> str:
        """`file` or `etcd`: the `kind` label of gatehouse_config_info."""

    async def read(self) -> ConfigText:
        """The document now (a reload's text).

        Raises:
            ConfigError: it cannot be read; the running config stays.
        """

    def taken(self, loaded: ConfigText) -> None:
        """`loaded` runs on every worker now."""

    def refused(self, loaded: ConfigText) -> None:
        """`loaded` was refused: not offered again until it changes."""

    def fallback(self) -> ConfigText | None:
        """What to start on when the first document is refused: etcd's cached last good
        document (a bad revision written while the gateway was down must not keep it
        from starting), none for a file (its operator is at hand)."""

    async def watch(self, changed: OnChange, settings: Callable[[], ReloadConfig]) -> None:
        """Call `changed(reason)` whenever the document may have changed, until cancelled.
        `settings()` is the running config's `reload` section (a file's poll follows it;
        etcd tells of each new revision as it is written)."""

    def filenos(self) -> list[int]:
        """Descriptors a forked worker must close (the parent's connections)."""

    async def aclose(self) -> None:
        """Let go of connections and tasks."""


def is_etcd_location(location: str) -> bool:
    """Whether the command line's config names an etcd key rather than a file."""
    return location.startswith("etcd://")
