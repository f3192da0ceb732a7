"""The cache of the last good document: written whole, read back only for its own URL."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

from proxy.source.cache import (
    CACHE_ENV,
    DEFAULT_CACHE_PATH,
    CachedDocument,
    cache_path,
    read_cache,
    write_cache,
)

URL = "etcd://127.0.0.1:2379/gatehouse/routes.yaml"


def test_cache_written_is_read_back_for_the_same_url(tmp_path: Path) -> None:
    path = str(tmp_path / "volume" / "cache.json")
    write_cache(path, CachedDocument(URL, 42, "routes: []\n"))
    assert read_cache(path, URL) == CachedDocument(URL, 42, "routes: []\n")
    write_cache(path, CachedDocument(URL, 43, "routes: [] # newer\n"))
    assert read_cache(path, URL) == CachedDocument(URL, 43, "routes: [] # newer\n")
    assert os.listdir(tmp_path / "volume") == ["cache.json"]  # no temporary file left


def test_cache_is_private(tmp_path: Path) -> None:
    """The document may hold credentials: the file is 0600 in directories made 0700."""
    path = tmp_path / "new" / "volume" / "cache.json"
    write_cache(str(path), CachedDocument(URL, 1, "admin: {token: s3cret}\n"))
    assert path.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "new").stat().st_mode & 0o777 == 0o700
    assert path.parent.stat().st_mode & 0o777 == 0o700


def test_cache_of_another_url_is_not_used(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = str(tmp_path / "cache.json")
    write_cache(path, CachedDocument(URL, 1, "x: 1\n"))
    with caplog.at_level(logging.WARNING):
        assert read_cache(path, "etcd://127.0.0.1:2379/other") is None
    assert "not used" in caplog.text


@pytest.mark.parametrize(
    "content", ["", "not json", json.dumps([1]), json.dumps({"format": 99, "url": URL})]
)
def test_cache_that_is_missing_or_unreadable_is_none(
    tmp_path: Path, content: str, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "cache.json"
    assert read_cache(str(path), URL) is None
    path.write_text(content)
    with caplog.at_level(logging.WARNING):
        assert read_cache(str(path), URL) is None
    assert str(path) in caplog.text


def test_cache_path_is_the_option_then_the_environment_then_the_default() -> None:
    assert cache_path("/v/c.json", {CACHE_ENV: "/e/c.json"}) == "/v/c.json"
    assert cache_path(None, {CACHE_ENV: "/e/c.json"}) == "/e/c.json"
    assert cache_path(None, {}) == DEFAULT_CACHE_PATH
