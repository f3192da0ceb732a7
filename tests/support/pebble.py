"""Let's Encrypt's test ACME server, `pebble`, with `pebble-challtestsrv` as its DNS, for
the ACME tests: issuance is validated for real, by pebble connecting to the gateway.

- pebble-challtestsrv runs its DNS server alone (HTTP-01, TLS-ALPN-01 and DoH off) on a
  free port and answers every name with 127.0.0.1 and no IPv6 address; its management
  API (`dns_servfail`) makes a name fail to resolve, for a refused validation.
- pebble listens on free ports (its ACME API over HTTPS with a certificate from
  tests/support/tls.py, so `ca` is what a client must trust, and its management API,
  where each run's random issuing root is read: `roots()`). Its validator connects to
  `http_port` (HTTP-01) and `tls_port` (TLS-ALPN-01) of whatever address the name
  resolves to: the test's gateway listens there. Names in `BLOCKED` are refused at
  newOrder (pebble's `domainBlocklist`), for a refused order.
- `PEBBLE_VA_NOSLEEP=1` removes the random wait before each validation; nothing else is
  relaxed: validation is real (never PEBBLE_VA_ALWAYS_VALID), and pebble rejects 5% of
  good nonces as its default, which a client must retry.

`.ci/system-deps` installs both (Debian: apt-get install pebble).
"""

from __future__ import annotations

import contextlib
import json
import socket
import ssl
import subprocess
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

from cryptography import x509

from tests.support.gateway_process import free_port
from tests.support.system_process import spawn_logged, stop, system_executable, wait_until_ready
from tests.support.tls import TlsFiles, make_tls_files

START_TIMEOUT_S = 10.0
REQUEST_TIMEOUT_S = 5.0
BLOCKED = ("refused.gatehouse.test",)


def free_udp_and_tcp_port() -> int:
    """A port on 127.0.0.1 free for both UDP and TCP a moment ago (a DNS server's)."""
    while True:
        port = free_port()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port


class Pebble:
    """pebble and pebble-challtestsrv, validating on `http_port` and `tls_port`."""

    def __init__(self, directory: Path, http_port: int, tls_port: int) -> None:
        self.directory = directory
        self.http_port = http_port
        self.tls_port = tls_port
        self.tls: TlsFiles = make_tls_files(directory / "pebble-tls")
        self.acme_port = free_port()
        self.management_port = free_port()
        self.dns_port = free_udp_and_tcp_port()
        self.challtestsrv_port = free_port()
        self._processes: list[subprocess.Popen[bytes]] = []

    def __repr__(self) -> str:
        return f"<Pebble {self.directory_url} validating on :{self.http_port}, :{self.tls_port}>"

    @property
    def directory_url(self) -> str:
        return f"https://127.0.0.1:{self.acme_port}/dir"

    @property
    def ca(self) -> Path:
        """The CA bundle that verifies pebble's own HTTPS (the `ca` of the acme config)."""
        return self.tls.ca

    def start(self) -> None:
        """Start both and wait until pebble serves its directory.

        Raises:
            AssertionError: one exited or did not answer in time (its log attached).
        """
        self._spawn(
            "pebble-challtestsrv",
            [
                system_executable("pebble-challtestsrv"),
                "-dns01",
                f"127.0.0.1:{self.dns_port}",
                "-management",
                f"127.0.0.1:{self.challtestsrv_port}",
                "-http01",
                "",
                "-https01",
                "",
                "-tlsalpn01",
                "",
                "-defaultIPv4",
                "127.0.0.1",
                "-defaultIPv6",
                "",
            ],
            {},
        )
        self._wait("pebble-challtestsrv", self._challtestsrv_answers)
        config = {
            "pebble": {
                "listenAddress": f"127.0.0.1:{self.acme_port}",
                "managementListenAddress": f"127.0.0.1:{self.management_port}",
                "certificate": str(self.tls.cert),
                "privateKey": str(self.tls.key),
                "httpPort": self.http_port,
                "tlsPort": self.tls_port,
                "ocspResponderURL": "",
                "externalAccountBindingRequired": False,
                "domainBlocklist": list(BLOCKED),
            }
        }
        config_path = self.directory / "pebble-config.json"
        config_path.write_text(json.dumps(config))
        self._spawn(
            "pebble",
            [
                system_executable("pebble"),
                "-config",
                str(config_path),
                "-dnsserver",
                f"127.0.0.1:{self.dns_port}",
                "-strict=false",
            ],
            {"PEBBLE_VA_NOSLEEP": "1"},
        )
        self._wait("pebble", self._directory_answers)

    def _spawn(self, name: str, command: list[str], env: dict[str, str]) -> None:
        self._processes.append(
            spawn_logged(
                command,
                self.directory / f"{name}.log",
                cwd=self.directory,
                env={"PATH": "/usr/bin:/bin", **env},
                own_session=True,
            )
        )

    def _wait(self, name: str, answers: Callable[[], bool]) -> None:
        wait_until_ready(
            self._processes[-1],
            answers,
            what=name,
            log=self.directory / f"{name}.log",
            timeout_s=START_TIMEOUT_S,
        )

    def _challtestsrv_answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.challtestsrv_port), timeout=0.5):
                return True
        except OSError:
            return False

    def _directory_answers(self) -> bool:
        try:
            self._https_get(self.acme_port, "/dir")
        except OSError:
            return False
        return True

    def _https_get(self, port: int, path: str) -> bytes:
        context = ssl.create_default_context(cafile=str(self.tls.ca))
        url = f"https://127.0.0.1:{port}{path}"
        with urllib.request.urlopen(url, timeout=REQUEST_TIMEOUT_S, context=context) as reply:
            return bytes(reply.read())

    def roots(self) -> list[x509.Certificate]:
        """The root this run of pebble issues under (random per run)."""
        return x509.load_pem_x509_certificates(self._https_get(self.management_port, "/roots/0"))

    def roots_file(self) -> Path:
        """`roots()` as a PEM file, for clients that verify what the gateway serves."""
        path = self.directory / "pebble-roots.pem"
        if not path.exists():
            path.write_bytes(self._https_get(self.management_port, "/roots/0"))
        return path

    def _challtestsrv(self, operation: str, body: dict[str, object]) -> None:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.challtestsrv_port}/{operation}",
            data=json.dumps(body).encode(),
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as reply:
            assert reply.status == 200, (operation, reply.status)

    def dns_servfail(self, name: str) -> None:
        """Make lookups of `name` fail (SERVFAIL): its validations fail."""
        self._challtestsrv("set-servfail", {"host": name})

    def dns_answer(self, name: str) -> None:
        """Answer `name` with 127.0.0.1 again."""
        self._challtestsrv("clear-servfail", {"host": name})

    def stop(self) -> None:
        """Stop both (SIGTERM, then SIGKILL after STOP_TIMEOUT_S)."""
        for process in reversed(self._processes):
            stop(process)
        self._processes.clear()


@contextlib.contextmanager
def running_pebble(directory: Path, http_port: int, tls_port: int) -> Iterator[Pebble]:
    """A started `Pebble`, stopped at the end whatever happened."""
    directory.mkdir(parents=True, exist_ok=True)
    pebble = Pebble(directory, http_port, tls_port)
    try:
        pebble.start()
        yield pebble
    finally:
        pebble.stop()
