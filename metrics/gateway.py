"""The metrics of the gateway as a whole, kept by the supervising parent: what it is
(build info), its reloads and its workers. The admin listener serves them with the sum
of the workers' own (metrics/aggregate.py)."""

from __future__ import annotations

import logging
import platform
from collections.abc import Iterable

from cryptography import x509
from prometheus_client import CollectorRegistry, Counter, Gauge

from proxy.buildinfo import build_kind, version

log = logging.getLogger(__name__)

GATEWAY_REGISTRY = CollectorRegistry(auto_describe=True)


BUILD_INFO = Gauge(
    "gatehouse_build_info",
    "Always 1; the labels say which Gatehouse and Python run, and the build: compiled "
    "(mypyc), pure (GATEHOUSE_PURE_PYTHON=1, or installed without a C compiler) or partial",
    ["version", "python", "build"],
    registry=GATEWAY_REGISTRY,
)
BUILD_INFO.labels(version(), platform.python_version(), build_kind()).set(1)

CONFIG_RELOADS = Counter(
    "gatehouse_config_reloads",
    "Config reloads by result: success (every worker switched) or failure (the old config "
    "kept serving: invalid file, a listener that cannot bind, a middleware that cannot start)",
    ["result"],
    registry=GATEWAY_REGISTRY,
)
for _result in ("success", "failure"):
    CONFIG_RELOADS.labels(_result)
CONFIG_LAST_RELOAD_SUCCESS = Gauge(
    "gatehouse_config_last_reload_success_timestamp_seconds",
    "When the running config was loaded (start-up or the last successful reload), Unix time",
    registry=GATEWAY_REGISTRY,
)
WORKER_RESTARTS = Counter(
    "gatehouse_worker_restarts",
    "Workers that ended unexpectedly and were started again",
    registry=GATEWAY_REGISTRY,
)
WORKERS = Gauge(
    "gatehouse_workers",
    "Worker processes running now",
    registry=GATEWAY_REGISTRY,
)
ADMIN_REFUSALS = Counter(
    "gatehouse_admin_refusals",
    "Requests the admin listener refused, by reason: host (a Host that is not an IP "
    "literal, localhost or in admin.hosts), unauthorized (admin.token missing or wrong), "
    "cross_site (a state-changing request that a browser page could have sent)",
    ["reason"],
    registry=GATEWAY_REGISTRY,
)
for _reason in ("host", "unauthorized", "cross_site"):
    ADMIN_REFUSALS.labels(_reason)

CERTIFICATE_EXPIRY = Gauge(
    "gatehouse_certificate_expiry_timestamp_seconds",
    "When each certificate of each TLS listener expires (its leaf's notAfter), Unix time: "
    "alert on `gatehouse_certificate_expiry_timestamp_seconds - time() < 14 * 86400`",
    ["listener", "names"],
    registry=GATEWAY_REGISTRY,
)


def record_certificates(certificates: Iterable[tuple[str, str]]) -> None:
    """Set CERTIFICATE_EXPIRY from the running config's (listener name, certificate file)
    pairs (`Config.tls_certificates()`, at start and after each successful reload, which
    re-reads the files): one series per certificate, labelled with its listener and the
    names it is for, and none left of certificates gone."""
    CERTIFICATE_EXPIRY.clear()
    for listener, path in certificates:
        leaf = leaf_certificate(path)
        if leaf is not None:
            CERTIFICATE_EXPIRY.labels(listener, certificate_names(leaf)).set(
                leaf.not_valid_after_utc.timestamp()
            )


def leaf_certificate(path: str) -> x509.Certificate | None:
    """The first certificate of the PEM chain at `path` (the leaf: the config requires it
    first), or None, with a warning, when it cannot be read any more."""
    try:
        with open(path, "rb") as file:
            return x509.load_pem_x509_certificates(file.read())[0]
    except (OSError, ValueError) as exc:
        log.warning("cannot read the certificate %s for its expiry: %s", path, exc)
        return None


def certificate_names(certificate: x509.Certificate) -> str:
    """The DNS names (and IP addresses) a certificate is for, comma-separated; its
    common name when it has no subjectAltName."""
    try:
        alternatives = certificate.extensions.get_extension_for_class(
            x509.SubjectAlternativeName
        ).value
    except x509.ExtensionNotFound:
        common = certificate.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
        return ",".join(str(attribute.value) for attribute in common)
    names = [str(name) for name in alternatives.get_values_for_type(x509.DNSName)]
    names += [str(address) for address in alternatives.get_values_for_type(x509.IPAddress)]
    return ",".join(names)


ACME_ORDERS = Counter(
    "gatehouse_acme_orders",
    "ACME certificate orders by result: success (a new or renewed certificate is served) "
    "or failure (refused, a validation failed, the server unreachable: the current "
    "certificate, if any, stays, and the name is tried again after a back-off)",
    ["result"],
    registry=GATEWAY_REGISTRY,
)
for _result in ("success", "failure"):
    ACME_ORDERS.labels(_result)
ACME_NEXT_ORDER = Gauge(
    "gatehouse_acme_next_order_timestamp_seconds",
    "When each ACME domain's certificate is next ordered, Unix time: its renewal time, or "
    "the end of the back-off after a failure (in the past: ordering now)",
    ["domain"],
    registry=GATEWAY_REGISTRY,
)

# The config's source (proxy/source/): which document runs, and whether etcd is followed.
CONFIG_INFO = Gauge(
    "gatehouse_config_info",
    "Always 1; the labels say where the running config comes from: its source (the file's "
    "path, or the etcd URL) and kind (file or etcd)",
    ["source", "kind"],
    registry=GATEWAY_REGISTRY,
)
CONFIG_REVISION = Gauge(
    "gatehouse_config_revision",
    "The etcd mod_revision of the running config (0 for a file): across a fleet, "
    "`count by (gatehouse_config_revision) (...)`-style queries show who lags (docs/etcd.md)",
    ["source"],
    registry=GATEWAY_REGISTRY,
)
CONFIG_SOURCE_UP = Gauge(
    "gatehouse_config_source_up",
    "1 while the config's source is followed (a file: always; etcd: the watch is "
    "connected), 0 while etcd cannot be reached and the last good config serves",
    ["source"],
    registry=GATEWAY_REGISTRY,
)
CONFIG_SOURCE_RECONNECTS = Counter(
    "gatehouse_config_source_reconnects",
    "Times the etcd watch was connected again after it was lost",
    ["source"],
    registry=GATEWAY_REGISTRY,
)


def record_config_source(source: str, kind: str, revision: int) -> None:
    """The running config's source and revision (at start and after each reload)."""
    CONFIG_INFO.clear()
    CONFIG_INFO.labels(source, kind).set(1)
    CONFIG_REVISION.clear()
    CONFIG_REVISION.labels(source).set(revision)
