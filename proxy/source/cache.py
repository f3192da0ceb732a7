"""The last good document from etcd, kept on disk so that a gateway can start while etcd
is down (proxy/source/etcd.py).

One JSON file: the URL it came from, the revision and the text. It is written whole
(a temporary file beside it, fsync, rename), so a crash mid-write leaves the old one; a
cache written for another URL is not used. Its place is `--config-cache PATH`, else
GATEHOUSE_CONFIG_CACHE, else DEFAULT_CACHE_PATH in the working directory: in a container,
a volume (docs/etcd.md).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass

from proxy.core.files import write_atomically

log = logging.getLogger(__name__)

CACHE_ENV = "GATEHOUSE_CONFIG_CACHE"
DEFAULT_CACHE_PATH = "gatehouse-config-cache.json"
_FORMAT = 1
CACHE_FILE_MODE = 0o600


@dataclass(frozen=True, slots=True)
class CachedDocument:
    """A document as cached: the etcd URL it came from, its mod_revision, its text."""

    url: str
    revision: int
    text: str


def cache_path(option: str | None, env: dict[str, str] | None = None) -> str:
    """Where the cache is: the option's path, else GATEHOUSE_CONFIG_CACHE's, else the
    default in the working directory."""
    environ = os.environ if env is None else env
    return option or environ.get(CACHE_ENV) or DEFAULT_CACHE_PATH


def write_cache(path: str, document: CachedDocument) -> None:
    """Replace the cache at `path` with `document`, atomically.

    Raises:
        OSError: it cannot be written (the caller logs it; the gateway serves on).
    """
    payload = {
        "format": _FORMAT,
        "url": document.url,
        "revision": document.revision,
        "text": document.text,
    }
    # Private (0600, directories 0700): the document may hold credentials written in it.
    write_atomically(os.path.abspath(path), json.dumps(payload).encode(), CACHE_FILE_MODE)


def read_cache(path: str, url: str) -> CachedDocument | None:
    """The document cached at `path` for `url`, or None (with a warning saying why) when
    there is none, it cannot be read, or it was written for another URL."""
    try:
        with open(path, encoding="utf-8") as file:
            payload = json.load(file)
    except FileNotFoundError:
        log.warning("no cached config at %s", path)
        return None
    except (OSError, ValueError) as exc:
        log.warning("cannot read the cached config %s: %s", path, exc)
        return None
    if (
        not isinstance(payload, dict)
        or payload.get("format") != _FORMAT
        or not isinstance(payload.get("text"), str)
        or not isinstance(payload.get("revision"), int)
    ):
        log.warning("the cached config %s is not one this version wrote: not used", path)
        return None
    if payload.get("url") != url:
        log.warning(
            "the cached config %s is of %s, not %s: not used", path, payload.get("url"), url
        )
        return None
    return CachedDocument(url, payload["revision"], payload["text"])
