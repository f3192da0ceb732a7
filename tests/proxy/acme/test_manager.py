"""The supervisor's ACME manager (proxy/acme/manager.py) without a server: which names it
keeps, when each is planned (with an injected clock), what a reload keeps of their
state, and the state it sends the workers as challenges come and go. Orders themselves
run against pebble in tests/e2e/test_acme.py."""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

import pytest

from metrics.gateway import ACME_NEXT_ORDER
from proxy.acme.challenges import Challenge
from proxy.acme.manager import AcmeManager
from proxy.acme.storage import AcmeStorage
from proxy.config.load import parse_config
from proxy.config.model import Config
from tests.support.tls import TestCa

DIRECTORY = "https://acme.example/dir"
NOW = 1_000_000_000.0
DAY_S = 86400.0


def config(storage: Path, domains: str, more: str = "") -> Config:
    return parse_config(f"""
listeners:
  - bind: 127.0.0.1:0
  - bind: 127.0.0.1:0
    name: secure
    tls:
      acme: {{directory: "{DIRECTORY}", domains: [{domains}], storage: "{storage}"{more}}}
upstreams: {{}}
routes: []
""")


class Workers:
    """What the supervisor would send the workers (every message, to whom)."""

    def __init__(self) -> None:
        self.sent: list[tuple[dict[str, Any], int | None]] = []

    async def tell(self, state: dict[str, Any], pid: int | None) -> list[str]:
        self.sent.append((state, pid))
        return []


def gauge(name: str) -> float | None:
    for family in ACME_NEXT_ORDER.collect():
        for sample in family.samples:
            if sample.labels == {"domain": name}:
                return sample.value
    return None


@pytest.fixture
def stored(tmp_path: Path) -> AcmeStorage:
    """Storage holding a certificate for a.example.com that is 60 days from expiry."""
    storage = AcmeStorage(str(tmp_path / "acme"), DIRECTORY)
    now = datetime.datetime.fromtimestamp(NOW, datetime.UTC)
    issued = TestCa(tmp_path / "ca").issue(
        "a",
        ("a.example.com",),
        validity=(now - datetime.timedelta(days=30), now + datetime.timedelta(days=60)),
    )
    storage.save_certificate("a.example.com", issued.cert.read_bytes(), issued.key.read_bytes())
    return storage


def test_names_with_a_usable_certificate_wait_for_its_renewal_the_others_are_due(
    tmp_path: Path, stored: AcmeStorage
) -> None:
    manager = AcmeManager(
        config(tmp_path / "acme", "a.example.com, b.example.com"), Workers().tell, now=lambda: NOW
    )
    a, b = manager.names()
    assert (a.name, a.next_order) == ("a.example.com", NOW + 30 * DAY_S)
    assert (b.name, b.next_order) == ("b.example.com", NOW)
    assert gauge("a.example.com") == NOW + 30 * DAY_S
    assert gauge("b.example.com") == NOW
    assert manager.certificates() == [("secure", stored.certificate_files("a.example.com")[0])]


def test_a_certificate_for_other_names_is_not_usable(tmp_path: Path, stored: AcmeStorage) -> None:
    # a.example.com's files put where c.example.com's belong.
    cert, key = stored.certificate_files("a.example.com")
    target = Path(stored.certificate_files("c.example.com")[0]).parent
    target.mkdir()
    (target / "cert.pem").write_bytes(Path(cert).read_bytes())
    (target / "key.pem").write_bytes(Path(key).read_bytes())
    manager = AcmeManager(
        config(tmp_path / "acme", "c.example.com"), Workers().tell, now=lambda: NOW
    )
    (c,) = manager.names()
    assert c.certificate is not None
    assert c.usable is None
    assert c.next_order == NOW


def test_a_reload_keeps_unchanged_names_as_they_are_and_forgets_removed_ones(
    tmp_path: Path, stored: AcmeStorage
) -> None:
    storage = tmp_path / "acme"
    manager = AcmeManager(
        config(storage, "a.example.com, b.example.com"), Workers().tell, now=lambda: NOW
    )
    _, b = manager.names()
    b.failures, b.next_order = 3, NOW + 240  # backing off

    manager.configure(config(storage, "b.example.com, c.example.com"))
    kept, added = manager.names()
    assert kept is b
    assert (kept.failures, kept.next_order) == (3, NOW + 240)
    assert (added.name, added.next_order) == ("c.example.com", NOW)
    assert gauge("a.example.com") is None

    # New settings for a name: planned afresh (its back-off forgotten).
    manager.configure(config(storage, "b.example.com, c.example.com", ", email: ops@example.com"))
    fresh = manager.names()[0]
    assert fresh is not b
    assert (fresh.failures, fresh.next_order) == (0, NOW)


def test_the_config_without_acme_wants_no_manager(tmp_path: Path) -> None:
    assert AcmeManager.wanted(config(tmp_path, "a.example.com"))
    plain = parse_config("listeners: [{bind: '127.0.0.1:0'}]\nupstreams: {}\nroutes: []\n")
    assert not AcmeManager.wanted(plain)


async def test_challenges_are_sent_to_every_worker_as_they_come_and_go(tmp_path: Path) -> None:
    workers = Workers()
    manager = AcmeManager(config(tmp_path / "acme", "a.example.com"), workers.tell, now=lambda: NOW)
    http = Challenge("a.example.com", "http-01", "tok3n", "tok3n.thumb")
    alpn = Challenge("a.example.com", "tls-alpn-01", "t", "t.thumb")

    await manager.offer(http, None)
    await manager.offer(alpn, "/storage/challenges/a.example.com.pem")
    await manager.withdraw(http)
    await manager.worker_ready(42)
    await manager.withdraw(alpn)

    assert workers.sent == [
        ({"http01": {"tok3n": "tok3n.thumb"}, "tls_alpn01": {}}, None),
        (
            {
                "http01": {"tok3n": "tok3n.thumb"},
                "tls_alpn01": {"a.example.com": "/storage/challenges/a.example.com.pem"},
            },
            None,
        ),
        (
            {
                "http01": {},
                "tls_alpn01": {"a.example.com": "/storage/challenges/a.example.com.pem"},
            },
            None,
        ),
        (
            {
                "http01": {},
                "tls_alpn01": {"a.example.com": "/storage/challenges/a.example.com.pem"},
            },
            42,
        ),
        ({"http01": {}, "tls_alpn01": {}}, None),
    ]
    await manager.aclose()
