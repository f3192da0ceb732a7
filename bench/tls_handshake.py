#!/usr/bin/env python3
"""tls_handshake: full TLS handshakes per second, one certificate against twenty (SNI).

What it answers: does choosing a certificate by SNI (proxy/frontend/certificates.py: an
`sni_callback` that moves each handshake to the chosen certificate's SSLContext) cost
handshakes? It starts two gateways, each on a free 127.0.0.1 port in a session of its
own (`$PYTHON -m proxy run CONFIG`, one worker, from the repository root):

  * `one`: a single certificate whose subjectAltName lists all twenty names;
  * `many`: twenty certificates, one per name (`n00.bench.test` ... `n19.bench.test`).

Both get an ECDSA P-256 key and certificates from one throw-away CA, made here with
`cryptography` in a scratch directory, and no routes, so every request is a 404 the
gateway answers itself. `--one HOST:PORT --many HOST:PORT --names A,B,...` measures
gateways you started instead.

Each target is probed first: every name must get the certificate made for it. Then,
for `--repeats` rounds, alternated (one many, many one, ...), a client process
(`tls_handshake.py client`, `--threads` blocking threads) opens new connections for
`--duration` seconds after `--warmup` seconds unrecorded: a full handshake each (no
session is resumed: the client keeps none), with a server name drawn at random among
the twenty, one `GET /` answered 404, and the close. Around the counted window it reads
the gateway's CPU time (its process family, bench/harness/processes.py).

Output: per target the median handshakes/s, the spread ((max - min) / median), the
gateway's CPU-ms per 1000 handshakes and the errors; then `many / one`, the median of
the same-round ratios, each round's ratio, and as the last line `ratio_many_vs_one=R`.
Exit 0, 1 if a target failed, 2 on a setup error, 130 on interrupt; every process started
is stopped on every way out. Standard library and `cryptography` (the project's venv:
`.venv/bin/python bench/tls_handshake.py`). Do not run it on a busy machine: the two
gateways and the client share the cores.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from harness.processes import TICKS_PER_SECOND, Server, ServerSet, free_ports  # noqa: E402

REPO = HERE.parent
NAMES = tuple(f"n{index:02d}.bench.test" for index in range(20))
TARGETS = ("one", "many")
REQUEST = b"GET / HTTP/1.1\r\nHost: bench.test\r\nConnection: close\r\n\r\n"
START_TIMEOUT_S = 20.0


def log(message: str) -> None:
    print(f"tls_handshake: {message}", file=sys.stderr, flush=True)


# --- certificates and configs ------------------------------------------------------------


def make_pki(directory: Path) -> dict[str, list[tuple[Path, Path]]]:
    """A CA, one certificate for all NAMES, and one certificate per name: the (cert,
    key) files of each target."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    valid = (now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=1))

    def subject(common_name: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(subject("tls_handshake bench CA"))
        .issuer_name(subject("tls_handshake bench CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(valid[0])
        .not_valid_after(valid[1])
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )

    def issue(stem: str, names: tuple[str, ...]) -> tuple[Path, Path]:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject(names[0]))
            .issuer_name(ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(valid[0])
            .not_valid_after(valid[1])
            .add_extension(
                x509.SubjectAlternativeName([x509.DNSName(name) for name in names]),
                critical=False,
            )
            .sign(ca_key, hashes.SHA256())
        )
        cert_path, key_path = directory / f"{stem}.pem", directory / f"{stem}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        return cert_path, key_path

    return {
        "one": [issue("all", NAMES)],
        "many": [issue(name.partition(".")[0], (name,)) for name in NAMES],
    }


def gateway_config(port: int, pairs: list[tuple[Path, Path]]) -> str:
    certificates = "".join(f"        - {{cert: '{cert}', key: '{key}'}}\n" for cert, key in pairs)
    return (
        "listeners:\n"
        f"  - bind: 127.0.0.1:{port}\n"
        "    tls:\n"
        "      certificates:\n"
        f"{certificates}"
        "workers: 1\n"
        "reload: {watch: false}\n"
        "upstreams: {}\n"
        "routes: []\n"
    )


# --- the client (a process of its own: `tls_handshake.py client ...`) -----------------------


def client_context() -> ssl.SSLContext:
    """No verification (the probe checked the certificates; the load measures the
    gateway, not the client's chain checks) and no session kept, so no resumption."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["http/1.1"])
    return context


def one_exchange(context: ssl.SSLContext, address: tuple[str, int], name: str) -> bool:
    """A new connection: handshake for `name`, GET /, read to the close. True when the
    gateway answered (its 404)."""
    with (
        socket.create_connection(address, timeout=10) as raw,
        context.wrap_socket(raw, server_hostname=name) as tls,
    ):
        tls.sendall(REQUEST)
        answer = b""
        while chunk := tls.recv(4096):
            answer += chunk
    return answer.startswith(b"HTTP/1.1 404 ")


def run_client(address: tuple[str, int], names: list[str], seconds: float, threads: int) -> dict:
    """Handshakes in a closed loop on `threads` threads for `seconds`."""
    context = client_context()
    deadline = time.monotonic() + seconds
    counts = {"handshakes": 0, "errors": 0}
    lock = threading.Lock()

    def loop() -> None:
        done = failed = 0
        chooser = random.Random()
        while time.monotonic() < deadline:
            try:
                if one_exchange(context, address, chooser.choice(names)):
                    done += 1
                else:
                    failed += 1
            except (OSError, ssl.SSLError):
                failed += 1
        with lock:
            counts["handshakes"] += done
            counts["errors"] += failed

    started = time.monotonic()
    workers = [threading.Thread(target=loop) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return {**counts, "elapsed": time.monotonic() - started}


# --- the driver ------------------------------------------------------------------------------


@dataclass
class Target:
    name: str
    address: tuple[str, int]
    server: Server | None = None  # None: a gateway the user started
    rates: list[float] = field(default_factory=list)
    cpu_ms_per_1k: list[float] = field(default_factory=list)
    errors: int = 0
    failed: str = ""


def parse_address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host or "127.0.0.1", int(port)


def start_gateways(servers: ServerSet, workdir: Path, python: str) -> dict[str, Target]:
    pki = make_pki(workdir)
    targets = {}
    for name, port in zip(TARGETS, free_ports(len(TARGETS)), strict=True):
        config = workdir / f"{name}.yaml"
        config.write_text(gateway_config(port, pki[name]))
        command = [python, "-m", "proxy", "run", str(config), "--log-level", "warning"]
        server = servers.start(name, command, workdir / f"{name}.log")
        targets[name] = Target(name, ("127.0.0.1", port), server)
    for target in targets.values():
        wait_for_tls(target)
    return targets


def wait_for_tls(target: Target) -> None:
    """Until a handshake succeeds.

    Raises:
        RuntimeError: the gateway exited, or did not serve within START_TIMEOUT_S.
    """
    deadline = time.monotonic() + START_TIMEOUT_S
    last = "nothing yet"
    while time.monotonic() < deadline:
        server = target.server
        if server is not None and not server.alive():
            raise RuntimeError(f"{target.name} exited; its output ends:\n{server.log_tail()}")
        try:
            one_exchange(client_context(), target.address, NAMES[0])
            return
        except (OSError, ssl.SSLError) as exc:
            last = str(exc)
        time.sleep(0.2)
    raise RuntimeError(f"{target.name} not serving TLS after {START_TIMEOUT_S:g} s ({last})")


def probe(target: Target, names: list[str]) -> str:
    """ "" when every name gets a certificate for it, else what went wrong."""
    from cryptography import x509

    context = client_context()
    for name in names:
        try:
            with (
                socket.create_connection(target.address, timeout=10) as raw,
                context.wrap_socket(raw, server_hostname=name) as tls,
            ):
                der = tls.getpeercert(binary_form=True)
        except (OSError, ssl.SSLError) as exc:
            return f"{name}: {exc}"
        leaf = x509.load_der_x509_certificate(der or b"")
        try:
            alternatives = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        except x509.ExtensionNotFound:
            return f"{name}: served a certificate without subjectAltName"
        served = alternatives.value.get_values_for_type(x509.DNSName)
        if name not in served:
            return f"{name}: served a certificate for {served}"
    return ""


def load(target: Target, names: list[str], seconds: float, threads: int) -> dict:
    """One client process against `target` for `seconds`."""
    host, port = target.address
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "client",
        "--address",
        f"{host}:{port}",
        "--names",
        ",".join(names),
        "--seconds",
        str(seconds),
        "--threads",
        str(threads),
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=True, timeout=seconds + 60)
    return json.loads(done.stdout)


def measured(target: Target, names: list[str], settings: argparse.Namespace) -> None:
    if settings.warmup > 0:
        load(target, names, settings.warmup, settings.threads)
    before = target.server.cpu_ticks() if target.server is not None else 0
    result = load(target, names, settings.duration, settings.threads)
    after = target.server.cpu_ticks() if target.server is not None else 0
    handshakes = result["handshakes"]
    target.rates.append(handshakes / result["elapsed"])
    target.errors += result["errors"]
    if target.server is not None and handshakes:
        seconds = (after - before) / TICKS_PER_SECOND
        target.cpu_ms_per_1k.append(seconds * 1000 / handshakes * 1000)


def report(targets: dict[str, Target]) -> float:
    print(f"{'target':<8} {'handshakes/s':>13} {'spread':>7} {'cpu-ms/1k':>10} {'errors':>7}")
    for target in targets.values():
        if target.failed:
            print(f"{target.name:<8} FAILED: {target.failed}")
            continue
        rate = statistics.median(target.rates)
        spread = (max(target.rates) - min(target.rates)) / rate if rate else float("nan")
        cpu = statistics.median(target.cpu_ms_per_1k) if target.cpu_ms_per_1k else float("nan")
        print(f"{target.name:<8} {rate:>13.1f} {spread:>7.1%} {cpu:>10.1f} {target.errors:>7}")
    one, many = targets["one"], targets["many"]
    if one.failed or many.failed:
        return float("nan")
    ratios = [m / o for m, o in zip(many.rates, one.rates, strict=True) if o]
    ratio = statistics.median(ratios) if ratios else float("nan")
    rounds = " ".join(f"{value:.3f}" for value in ratios)
    print(f"many / one: handshakes/s {ratio:.3f} (median of the same-round ratios: {rounds})")
    return ratio


def drive(settings: argparse.Namespace, servers: ServerSet, workdir: Path) -> int:
    if settings.one or settings.many:
        if not (settings.one and settings.many):
            log("--one and --many go together")
            return 2
        targets = {
            "one": Target("one", parse_address(settings.one)),
            "many": Target("many", parse_address(settings.many)),
        }
        names = settings.names.split(",") if settings.names else list(NAMES)
    else:
        python = os.environ.get("PYTHON", sys.executable)
        try:
            targets = start_gateways(servers, workdir, python)
        except RuntimeError as exc:
            log(str(exc))
            return 2
        names = list(NAMES)
    for target in targets.values():
        target.failed = probe(target, names)
        if target.failed:
            log(f"{target.name} failed its probe: {target.failed}")
    order = [target for target in targets.values() if not target.failed]
    for index in range(settings.repeats):
        for target in order if index % 2 == 0 else reversed(order):
            try:
                measured(target, names, settings)
            except (subprocess.SubprocessError, ValueError) as exc:
                target.failed = f"the load client failed: {exc}"
        order = [target for target in order if not target.failed]
    ratio = report(targets)
    print(f"ratio_many_vs_one={ratio:.3f}")
    return 1 if any(target.failed for target in targets.values()) else 0


def arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command")
    client = sub.add_parser("client", help="the load client (started by the driver)")
    client.add_argument("--address", required=True)
    client.add_argument("--names", required=True)
    client.add_argument("--seconds", type=float, required=True)
    client.add_argument("--threads", type=int, default=4)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds counted per run")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds unrecorded per run")
    parser.add_argument("--repeats", type=int, default=5, help="rounds, alternated")
    parser.add_argument("--threads", type=int, default=4, help="client threads")
    parser.add_argument("--one", help="HOST:PORT of a gateway with one certificate")
    parser.add_argument("--many", help="HOST:PORT of a gateway with the twenty")
    parser.add_argument("--names", help="server names to draw from (with --one/--many)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    return parser.parse_args(argv)


def _interrupt(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv: list[str]) -> int:
    settings = arguments(argv)
    if settings.command == "client":
        result = run_client(
            parse_address(settings.address),
            settings.names.split(","),
            settings.seconds,
            settings.threads,
        )
        print(json.dumps(result))
        return 0
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _interrupt)
    workdir = Path(tempfile.mkdtemp(prefix="tls-handshake-"))
    servers = ServerSet(REPO)
    try:
        return drive(settings, servers, workdir)
    except KeyboardInterrupt:
        log("interrupted; every server started was stopped")
        return 130
    finally:
        for problem in servers.stop_all():
            log(problem)
        if settings.keep:
            log(f"kept {workdir}")
        else:
            for path in sorted(workdir.iterdir()):
                path.unlink()
            workdir.rmdir()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
