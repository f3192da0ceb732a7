"""The commands on a config kept in etcd: `gatehouse check etcd://...` (validate what is
there, and print its revision; `gatehouse reload` reads the admin listener from it the
same way), `gatehouse pull etcd://...` (the document, for a diff or a
rollback) and `gatehouse push FILE etcd://...`, which validates the file as `check` does
and writes it with a compare-and-swap on the key's mod_revision: a push that raced another
is refused, never lost. A rollback is a push of an older file.

Exit codes, as cli.py's: 0 done; 1 an invalid document (or no such key); 2 usage (a bad
URL, etcd out of reach or refusing); 4 a push refused because the key changed since it
was read (the revision it is at is printed).
"""

from __future__ import annotations

import asyncio
import sys

from proxy.config.document import ConfigError, read_config_file
from proxy.config.load import parse_config
from proxy.config.model import Config
from proxy.source.etcd_client import EtcdClient, EtcdError, EtcdSettingsError, EtcdUnavailable
from proxy.source.etcd_url import EtcdUrlError, parse_etcd_url

EXIT_OK, EXIT_CONFIG, EXIT_USAGE, EXIT_CONFLICT = 0, 1, 2, 4


def _say(line: str) -> None:
    print(line, file=sys.stderr)  # noqa: T201 - the command's output


def _client(url: str) -> EtcdClient | None:
    """The client for `url`, or None with why not printed."""
    try:
        return EtcdClient(parse_etcd_url(url))
    except (EtcdUrlError, EtcdSettingsError) as exc:
        _say(str(exc))
        return None


def _validate(text: str, source: str) -> Config | None:
    """The document as a Config, or None with every error printed."""
    try:
        return parse_config(text, source=source)
    except ConfigError as exc:
        for line in exc.errors:
            _say(line)
        _say(f"{source}: {len(exc.errors)} error(s)")
        return None


def _read(url: str) -> tuple[str, bytes] | int:
    """The key's value with the name its revision gives it (`etcd://...@REVISION`), or the
    exit code, with why printed."""
    client = _client(url)
    if client is None:
        return EXIT_USAGE
    location = client.location
    try:
        reading = asyncio.run(client.get())
    except (EtcdUnavailable, EtcdError) as exc:
        _say(f"{location.url}: cannot read: {exc}")
        return EXIT_USAGE
    if reading.kv is None:
        _say(f"{location.url}:1: the key does not exist")
        return EXIT_CONFIG
    return location.at(reading.kv.mod_revision), reading.kv.value


def load(url: str) -> Config | int:
    """The key's document as a Config, or the exit code with why printed."""
    read = _read(url)
    if isinstance(read, int):
        return read
    source, value = read
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError as exc:
        _say(f"{source}:1: cannot read: not UTF-8 ({exc.reason} at byte {exc.start})")
        return EXIT_CONFIG
    config = _validate(text, source)
    return EXIT_CONFIG if config is None else config


def check_etcd(url: str) -> int:
    """`gatehouse check etcd://...`: the key's document validated, with its revision."""
    config = load(url)
    if isinstance(config, int):
        return config
    routes, upstreams = len(config.routes), len(config.upstreams)
    print(f"{config.source}: ok ({routes} routes, {upstreams} upstreams)")  # noqa: T201
    return EXIT_OK


def pull(url: str) -> int:
    """`gatehouse pull etcd://...`: the document on stdout, its revision on stderr."""
    read = _read(url)
    if isinstance(read, int):
        return read
    source, value = read
    sys.stdout.buffer.write(value)
    sys.stdout.flush()
    _say(source)
    return EXIT_OK


def push(path: str, url: str, expect_revision: int | None) -> int:
    """`gatehouse push FILE etcd://...`: validate FILE, then write it if the key is still
    at the revision read (or at `expect_revision`; 0: the key must not exist yet)."""
    client = _client(url)
    if client is None:
        return EXIT_USAGE
    location = client.location
    try:
        text = read_config_file(path)
    except ConfigError as exc:
        for line in exc.errors:
            _say(line)
        return EXIT_CONFIG
    if _validate(text, path) is None:
        _say(f"{path}: not pushed")
        return EXIT_CONFIG
    try:
        written, revision, expected = asyncio.run(
            _compare_and_put(client, text.encode("utf-8"), expect_revision)
        )
    except (EtcdUnavailable, EtcdError) as exc:
        _say(f"{location.url}: not pushed: {exc}")
        return EXIT_USAGE
    if not written:
        now = f"at revision {revision}" if revision else "deleted"
        _say(
            f"{location.url}: push refused: the key is {now}, not at revision {expected} "
            "as read: someone else pushed meanwhile (pull it, merge, push again)"
        )
        return EXIT_CONFLICT
    print(f"{location.at(revision)}: pushed {path} (it replaced revision {expected})")  # noqa: T201
    return EXIT_OK


async def _compare_and_put(
    client: EtcdClient, value: bytes, expect_revision: int | None
) -> tuple[bool, int, int]:
    """(written, the revision written at or the key's now, the revision expected)."""
    if expect_revision is None:
        reading = await client.get()
        expect_revision = reading.kv.mod_revision if reading.kv is not None else 0
    written, revision = await client.compare_and_put(value, expect_revision)
    return written, revision, expect_revision
