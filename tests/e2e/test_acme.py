"""ACME end to end (proxy/acme/): real gateway processes obtain, serve and renew
certificates from pebble, Let's Encrypt's test server, which validates every challenge
for real by connecting to the gateway (tests/support/pebble.py; names under
`gatehouse.test` resolve to 127.0.0.1 through pebble-challtestsrv).

pebble validates on two fixed ports, so every gateway here listens on the same pair,
one at a time: `HTTP_PORT` (plaintext, where HTTP-01 is answered) and `TLS_PORT` (the
TLS listener with `tls.acme`, where TLS-ALPN-01 is). Each gateway runs two workers, so
that a challenge must be known to both (the kernel spreads pebble's connections).

What is waited for is observed, never slept on: the supervisor's metrics, a worker's
log line, the certificate a handshake is served.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import re
import socket
import ssl
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from cryptography import x509

from proxy.acme.storage import AcmeStorage
from tests.support.admin_client import admin_get, admin_reload, scrape, value, wait_ready
from tests.support.gateway_process import (
    Gateway,
    child_pids,
    free_port,
    run_gateway,
    wait_until,
)
from tests.support.pebble import BLOCKED, Pebble, running_pebble
from tests.support.tls import TestCa

pytestmark = pytest.mark.socket

WAIT_S = 30.0  # an order takes well under a second; this only bounds a failure
ORDERS = "gatehouse_acme_orders_total"
NEXT_ORDER = "gatehouse_acme_next_order_timestamp_seconds"
EXPIRY = "gatehouse_certificate_expiry_timestamp_seconds"
DAY_S = 86400.0


@dataclass(frozen=True)
class AcmeSite:
    """pebble, and the ports the gateways listen on for it."""

    pebble: Pebble
    http_port: int
    tls_port: int


@pytest.fixture(scope="session")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AcmeSite]:
    http_port, tls_port = free_port(), free_port()
    directory = tmp_path_factory.mktemp("pebble")
    with running_pebble(directory, http_port, tls_port) as pebble:
        yield AcmeSite(pebble, http_port, tls_port)


@dataclass
class Run:
    """One gateway process of a test, and what a test reads of it."""

    gateway: Gateway
    admin: int
    site: AcmeSite

    def orders(self, result: str) -> float:
        return value(scrape(self.admin), ORDERS, result=result)

    def wait_orders(self, result: str, count: int) -> None:
        wait_until(lambda: self.orders(result) >= count, WAIT_S, f"{count} {result} order(s)")

    def next_order(self, name: str) -> float:
        return value(scrape(self.admin), NEXT_ORDER, domain=name)

    def served(self, name: str) -> x509.Certificate:
        """The leaf the TLS listener serves for `name` (SNI), unverified."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        with (
            socket.create_connection(("127.0.0.1", self.site.tls_port), timeout=10) as raw,
            context.wrap_socket(raw, server_hostname=name) as tls,
        ):
            der = tls.getpeercert(binary_form=True)
        assert der is not None
        return x509.load_der_x509_certificate(der)

    def verified_get(self, name: str) -> httpx.Response:
        """GET / over HTTPS for `name`, verifying the certificate against pebble's root
        and the name (the request goes to 127.0.0.1, the TLS name is `name`)."""
        context = ssl.create_default_context(cafile=str(self.site.pebble.roots_file()))
        with httpx.Client(verify=context, timeout=10) as client:
            return client.get(
                f"https://127.0.0.1:{self.site.tls_port}/",
                headers={"Host": name},
                extensions={"sni_hostname": name},
            )

    def log_lines(self, pattern: str) -> list[re.Match[str]]:
        return list(re.finditer(pattern, self.gateway.stderr()))


def config(
    site: AcmeSite,
    admin: int,
    storage: Path,
    domains: tuple[str, ...],
    *,
    challenge: str = "http-01",
    plaintext: bool = True,
) -> str:
    plain = f"  - bind: 127.0.0.1:{site.http_port}\n    name: plain\n" if plaintext else ""
    return f"""
listeners:
{plain}  - bind: 127.0.0.1:{site.tls_port}
    name: secure
    tls:
      acme:
        directory: {site.pebble.directory_url}
        ca: {site.pebble.ca}
        email: ops@gatehouse.test
        domains: [{", ".join(domains)}]
        challenge: {challenge}
        storage: {storage}
admin: {{bind: "127.0.0.1:{admin}"}}
workers: 2
reload: {{watch: false}}
shutdown: {{grace_period: 1s}}
upstreams: {{}}
routes:
  - name: hello
    match: {{path_prefix: /}}
    respond: {{status: 200, body: "hello\\n"}}
"""


@contextlib.contextmanager
def running(
    site: AcmeSite, directory: Path, admin: int, text: str, *, args: tuple[str, ...] = ()
) -> Iterator[Run]:
    """A gateway on `text` (its admin listener on `admin`), every worker ready."""
    with run_gateway(text, directory, port=site.tls_port, args=args) as gateway:
        wait_ready(admin)
        yield Run(gateway, admin, site)


def stored_due_certificate(
    storage: Path, site: AcmeSite, name: str, ca: TestCa
) -> x509.Certificate:
    """Put in `storage` a certificate for `name` from a CA that is not pebble's: 90 days
    long, 10 left, so due for renewal (30 days before expiry) as the gateway starts."""
    now = datetime.datetime.now(datetime.UTC)
    issued = ca.issue(
        name,
        (name,),
        validity=(now - datetime.timedelta(days=80), now + datetime.timedelta(days=10)),
    )
    cert, key = AcmeStorage(str(storage), site.pebble.directory_url).certificate_files(name)
    os.makedirs(os.path.dirname(cert))
    Path(cert).write_bytes(issued.cert.read_bytes())
    Path(key).write_bytes(issued.key.read_bytes())
    os.chmod(key, 0o600)
    return issued.leaf()


def mode(path: str | Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_http01_obtains_a_certificate_per_name_and_a_restart_reuses_them(
    site: AcmeSite, tmp_path: Path
) -> None:
    storage = tmp_path / "acme"
    names = ("a.gatehouse.test", "b.gatehouse.test")
    admin = free_port()
    text = config(site, admin, storage, names)
    with running(site, tmp_path, admin, text) as run:
        run.wait_orders("success", 2)
        assert run.orders("failure") == 0
        files = AcmeStorage(str(storage), site.pebble.directory_url)
        serials = {}
        for name in names:
            answer = run.verified_get(name)  # pebble's chain, for this name
            assert (answer.status_code, answer.text) == (200, "hello\n")
            stored = files.stored(name)
            assert stored is not None
            assert run.served(name).serial_number == stored.leaf.serial_number
            serials[name] = stored.leaf.serial_number
            assert mode(stored.key) == 0o600
            samples = scrape(admin)
            assert value(samples, EXPIRY, listener="secure", names=name) == stored.not_after
            # Renewed 30 days before expiry, not before.
            assert value(samples, NEXT_ORDER, domain=name) == stored.not_after - 30 * DAY_S
        assert serials["a.gatehouse.test"] != serials["b.gatehouse.test"]
        assert mode(files.account_key) == 0o600
        account_key = Path(files.account_key).read_bytes()
        listed = [
            entry
            for entry in admin_get(admin, "/certificates").json()["certificates"]
            if entry.get("source") == "acme"
        ]
        assert sorted(entry["names"][0] for entry in listed) == list(names)
        # Each worker loaded both (two workers, each logging its own pid).
        for name in names:
            loaded = run.log_lines(rf"\[(\d+)\] acme: secure serves the certificate of {name}")
            assert len({line[1] for line in loaded}) == 2

        # HTTP-01 paths are answered before routing for these names only.
        http = f"http://127.0.0.1:{site.http_port}/.well-known/acme-challenge/unknown-token"
        refused = httpx.get(http, headers={"Host": "a.gatehouse.test"})
        assert refused.status_code == 404
        assert refused.json()["error"] == "acme_challenge_unknown"
        assert httpx.get(http, headers={"Host": "other.example"}).text == "hello\n"

    # A restart on the same storage serves the same certificates and orders nothing:
    # each name's next order is its renewal time.
    with running(site, tmp_path, admin, text) as run:
        for name in names:
            assert run.served(name).serial_number == serials[name]
            assert run.next_order(name) > time.time() + 365 * DAY_S
        assert run.orders("success") == run.orders("failure") == 0
        assert "acme: ordering" not in run.gateway.stderr()
        assert "the stored certificate" in run.gateway.stderr()
    assert Path(files.account_key).read_bytes() == account_key


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_tls_alpn01_is_answered_on_the_tls_listener_and_a_reload_adds_a_name(
    site: AcmeSite, tmp_path: Path, loop: str
) -> None:
    storage = tmp_path / "acme"
    admin = free_port()
    first = config(
        site, admin, storage, ("c.gatehouse.test",), challenge="tls-alpn-01", plaintext=False
    )
    with running(site, tmp_path, admin, first, args=("--loop", loop)) as run:
        run.wait_orders("success", 1)
        assert run.verified_get("c.gatehouse.test").status_code == 200
        served = run.served("c.gatehouse.test").serial_number

        # A name added by a reload is ordered without a restart; the other is kept.
        second = config(
            site,
            admin,
            storage,
            ("c.gatehouse.test", "e.gatehouse.test"),
            challenge="tls-alpn-01",
            plaintext=False,
        )
        run.gateway.config_path.write_text(second)
        assert admin_reload(admin).status_code == 200
        run.wait_orders("success", 2)
        assert run.verified_get("e.gatehouse.test").status_code == 200
        assert run.served("c.gatehouse.test").serial_number == served
        assert run.orders("success") == 2
    # The challenge certificates are gone with their orders.
    challenges = Path(AcmeStorage(str(storage), site.pebble.directory_url).server, "challenges")
    assert list(challenges.iterdir()) == []


def test_a_due_certificate_is_renewed_and_served_without_a_restart(
    site: AcmeSite, tmp_path: Path
) -> None:
    storage = tmp_path / "acme"
    name = "d.gatehouse.test"
    old = stored_due_certificate(storage, site, name, TestCa(tmp_path / "ca"))
    admin = free_port()
    with running(site, tmp_path, admin, config(site, admin, storage, (name,))) as run:
        workers = child_pids(run.gateway.pid)
        run.wait_orders("success", 1)
        new = run.served(name)
        assert new.serial_number != old.serial_number
        assert run.verified_get(name).status_code == 200
        # The same workers served the old certificate, then the new one.
        assert child_pids(run.gateway.pid) == workers
        for serial in (old.serial_number, new.serial_number):
            loaded = run.log_lines(
                rf"\[(\d+)\] acme: secure serves the certificate of "
                rf"{name}: serial {serial:x}"
            )
            assert {int(line[1]) for line in loaded} == workers
        # Not renewed again: the next order is 30 days before the new one expires.
        expires = new.not_valid_after_utc.timestamp()
        assert run.next_order(name) == expires - 30 * DAY_S
        assert run.orders("success") == 1


def test_a_refused_order_keeps_the_current_certificate_and_backs_off(
    site: AcmeSite, tmp_path: Path
) -> None:
    storage = tmp_path / "acme"
    refused, unresolved = BLOCKED[0], "nowhere.gatehouse.test"
    old = stored_due_certificate(storage, site, refused, TestCa(tmp_path / "ca"))
    site.pebble.dns_servfail(unresolved)  # its validation fails: no address
    admin = free_port()
    try:
        text = config(site, admin, storage, (refused, unresolved))
        before = time.time()  # the orders begin as soon as the workers are ready
        with running(site, tmp_path, admin, text) as run:
            run.wait_orders("failure", 2)
            assert run.orders("success") == 0
            assert run.served(refused).serial_number == old.serial_number
            log = run.gateway.stderr()
            assert re.search(
                rf"the order for {refused} failed \(1 in a row\): rejectedIdentifier: .*; "
                rf"the current certificate \(serial {old.serial_number:x}, .*\) stays; "
                rf"next try in 60 s",
                log,
            )
            assert re.search(
                rf"the order for {unresolved} failed \(1 in a row\): the http-01 validation of "
                rf"{unresolved} failed .*; no certificate is served for it yet",
                log,
            )
            # Tried again a minute later (the first step of the back-off), not before.
            for name in (refused, unresolved):
                assert before + 60 <= run.next_order(name) <= time.time() + 60
    finally:
        site.pebble.dns_answer(unresolved)
