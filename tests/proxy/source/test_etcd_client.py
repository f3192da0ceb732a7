"""The etcd client against a real etcd: reads, writes, the compare-and-swap, the watch,
a compacted watch, and an etcd out of reach."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.source.etcd_client import (
    CA_ENV,
    PASSWORD_ENV,
    TLS_ENV,
    USER_ENV,
    Compacted,
    EtcdClient,
    EtcdError,
    EtcdSettingsError,
    EtcdUnavailable,
    KeyValue,
)
from proxy.source.etcd_url import parse_etcd_url
from tests.support.etcd_server import EtcdServer, running_etcd
from tests.support.gateway_process import free_port
from tests.support.tls import make_tls_files

pytestmark = pytest.mark.socket

KEY = "/gatehouse/test"


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[EtcdServer]:
    with running_etcd(tmp_path) as server:
        yield server


def client_of(etcd: EtcdServer) -> EtcdClient:
    return EtcdClient(parse_etcd_url(etcd.url(KEY)), timeout=10.0)


async def test_get_reads_what_put_wrote_with_its_revision(etcd: EtcdServer) -> None:
    client = client_of(etcd)
    assert (await client.get()).kv is None
    written = await client.put(b"a: 1\n")
    reading = await client.get()
    assert reading.kv == KeyValue(b"a: 1\n", written)
    assert reading.revision == written


async def test_compare_and_put_writes_only_at_the_expected_revision(etcd: EtcdServer) -> None:
    client = client_of(etcd)
    assert await client.compare_and_put(b"first", 5) == (False, 0)  # the key is not there
    created, first = await client.compare_and_put(b"first", 0)
    assert created
    assert await client.compare_and_put(b"late", 0) == (False, first)
    replaced, second = await client.compare_and_put(b"second", first)
    assert replaced
    assert second > first
    assert await client.compare_and_put(b"stale", first) == (False, second)
    assert (await client.get()).kv == KeyValue(b"second", second)


async def test_watch_yields_the_last_change_of_each_answer_from_the_revision_asked(
    etcd: EtcdServer,
) -> None:
    client = client_of(etcd)
    first = await client.put(b"one")
    second = await client.put(b"two")
    changes = client.watch(first)  # both writes are history: one answer, its last event
    assert (await anext(changes)).kv == KeyValue(b"two", second)
    third = await client.put(b"three")
    assert (await anext(changes)).kv == KeyValue(b"three", third)
    deleted = await client.delete()
    change = await anext(changes)
    assert change.kv is None
    assert change.revision == deleted
    await changes.aclose()


async def test_watch_from_a_compacted_revision_raises_compacted(etcd: EtcdServer) -> None:
    client = client_of(etcd)
    first = await client.put(b"one")
    latest = await client.put(b"two")
    etcd.compact(latest)
    changes = client.watch(first)
    with pytest.raises(Compacted):
        await anext(changes)
    await changes.aclose()


async def test_an_etcd_out_of_reach_is_unavailable() -> None:
    client = EtcdClient(parse_etcd_url(f"etcd://127.0.0.1:{free_port()}/k"), timeout=5.0)
    with pytest.raises(EtcdUnavailable):
        await client.get()
    changes = client.watch(1)
    with pytest.raises(EtcdUnavailable):
        await anext(changes)


def enable_auth(etcd: EtcdServer, password: str) -> None:
    """A root user with `password`, and authentication on (as `etcdctl auth enable`)."""
    for path, body in (
        ("/v3/auth/role/add", {"name": "root"}),
        ("/v3/auth/user/add", {"name": "root", "password": password}),
        ("/v3/auth/user/grant", {"user": "root", "role": "root"}),
        ("/v3/auth/enable", {}),
    ):
        etcd.post(path, body)


async def test_with_credentials_from_the_environment_the_client_authenticates(
    etcd: EtcdServer,
) -> None:
    enable_auth(etcd, "s3cret")
    location = parse_etcd_url(etcd.url(KEY))
    anonymous = EtcdClient(location, env={})
    with pytest.raises(EtcdError):
        await anonymous.get()
    wrong = EtcdClient(location, env={USER_ENV: "root", PASSWORD_ENV: "nope"})
    with pytest.raises(EtcdError):
        await wrong.get()
    client = EtcdClient(location, env={USER_ENV: "root", PASSWORD_ENV: "s3cret"})
    written = await client.put(b"guarded")
    assert (await client.get()).kv == KeyValue(b"guarded", written)
    assert await client.compare_and_put(b"next", written) == (True, written + 1)
    changes = client.watch(written)
    assert (await anext(changes)).kv is not None
    await changes.aclose()


async def test_with_a_ca_from_the_environment_the_client_speaks_tls(tmp_path: Path) -> None:
    tls = make_tls_files(tmp_path / "tls")
    with running_etcd(tmp_path, tls) as etcd:
        location = parse_etcd_url(etcd.url(KEY))
        client = EtcdClient(location, env={CA_ENV: str(tls.ca)})
        written = await client.put(b"over tls")
        assert (await client.get()).kv == KeyValue(b"over tls", written)
        changes = client.watch(written)
        assert (await anext(changes)).kv == KeyValue(b"over tls", written)
        await changes.aclose()
        untrusting = EtcdClient(location, env={TLS_ENV: "1"})  # the system's CAs only
        with pytest.raises(EtcdUnavailable, match="CERTIFICATE_VERIFY_FAILED"):
            await untrusting.get()
        plain = EtcdClient(location, env={})
        with pytest.raises((EtcdError, EtcdUnavailable)):
            await plain.get()


def test_tls_files_that_cannot_be_read_are_a_settings_error(tmp_path: Path) -> None:
    with pytest.raises(EtcdSettingsError, match=CA_ENV):
        EtcdClient(parse_etcd_url("etcd://127.0.0.1/k"), env={CA_ENV: str(tmp_path / "no")})
