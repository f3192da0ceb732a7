"""The config file as a source: read on each reload, and polled for a change.

A change is told by the file's signature (inode, device, size, mtime: `os.stat` follows
symlinks, so a Kubernetes ConfigMap's swapped link counts) and reloaded once it has held
still for one interval, so a half-written file is not loaded. A refused signature is not
tried again until the file changes once more.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from typing import cast

from proxy.config.document import read_config_file
from proxy.config.model import ReloadConfig
from proxy.source.base import ConfigText, OnChange

Signature = tuple[int, int, int, int]


def file_signature(path: str) -> Signature | None:
    """What tells a changed file: follows symlinks, so a ConfigMap's swapped link counts."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return (stat.st_ino, stat.st_dev, stat.st_size, stat.st_mtime_ns)


class FileSource:
    """routes.yaml at `path`."""

    kind = "file"

    def __init__(self, path: str) -> None:
        self.path = path
        self._loaded: Signature | None = None
        self._refused: Signature | None = None

    @property
    def name(self) -> str:
        return self.path

    def first(self) -> ConfigText:
        """The document at start-up (read_config_file's errors)."""
        signature = file_signature(self.path)
        text = read_config_file(self.path)
        self._loaded = signature
        return ConfigText(text, self.path, 0, signature)

    async def read(self) -> ConfigText:
        signature = file_signature(self.path)
        text = read_config_file(self.path)  # small and local: no thread needed
        return ConfigText(text, self.path, 0, signature)

    def taken(self, loaded: ConfigText) -> None:
        self._loaded = cast(Signature | None, loaded.mark)

    def refused(self, loaded: ConfigText) -> None:
        self._refused = cast(Signature | None, loaded.mark)

    def fallback(self) -> ConfigText | None:
        return None

    async def watch(self, changed: OnChange, settings: Callable[[], ReloadConfig]) -> None:
        """Reload when the file changed and then held still for one interval."""
        while True:
            interval = settings().interval
            await asyncio.sleep(interval)
            if not settings().watch:
                continue
            seen = file_signature(self.path)
            if seen is None or seen in (self._loaded, self._refused):
                continue
            await asyncio.sleep(interval)  # a half-written file keeps changing
            if file_signature(self.path) == seen:
                await changed("the file changed")

    def filenos(self) -> list[int]:
        return []

    async def aclose(self) -> None:
        return None
