"""The sections of routes.yaml about the gateway's own server, as opposed to what it routes
to: `listeners` (with their TLS and PROXY protocol), `admin`, `client_ip`, `limits`,
`http2`, `http1_parser`, `workers`, `shutdown`, `reload`, `metrics`, `path_normalization`
and `headers_with_underscores`. Each is a `read_X(reader, context, node, path)` that
`proxy/config/load.py` calls; the listeners and the admin listener record their addresses
in the `LoadContext`, so that two sockets on one address are an error.
"""

from __future__ import annotations

import difflib
import re
from contextlib import suppress
from functools import partial

from yaml.nodes import Node, ScalarNode

from proxy.config.acme import check_listeners as check_acme_listeners
from proxy.config.acme import read_acme
from proxy.config.answers import read_https_redirect
from proxy.config.context import LoadContext
from proxy.config.keys import (
    ADMIN,
    CLIENT_AUTH,
    CLIENT_IP,
    HTTP1_PARSERS,
    HTTP2,
    LIMITS,
    LISTENER,
    LISTENER_TLS,
    LOGGING,
    MAX_H2_SETTING,
    MAX_H2_WINDOW,
    METRICS,
    PATH_NORMALIZATION,
    RELOAD,
    SHUTDOWN,
    TLS_CERTIFICATE,
    TLS_VERSIONS,
    TRACING,
)
from proxy.config.model import (
    CLIENT_AUTH_MODES,
    CLIENT_IP_SOURCES,
    DEFAULT_BODY_TIMEOUT_S,
    DEFAULT_GRACE_PERIOD_S,
    DEFAULT_H2_INITIAL_WINDOW_BYTES,
    DEFAULT_H2_MAX_CONCURRENT_STREAMS,
    DEFAULT_H2_MAX_CONTROL_FRAMES_PER_SECOND,
    DEFAULT_H2_MAX_RESETS_PER_SECOND,
    DEFAULT_HEADER_TIMEOUT_S,
    DEFAULT_KEEPALIVE_TIMEOUT_S,
    DEFAULT_MAX_HEAD_BYTES,
    DEFAULT_RELOAD_WATCH_INTERVAL_S,
    ESCAPED_SLASH_ACTIONS,
    LOG_FORMATS,
    UNDERSCORE_ACTIONS,
    AdminConfig,
    ClientAuth,
    ClientIpConfig,
    Http2Config,
    LimitsConfig,
    ListenerConfig,
    ListenerTls,
    MetricsConfig,
    PathNormalization,
    ReloadConfig,
    TlsCertificate,
    TracingConfig,
)
from proxy.config.reader import Fields, NodeReader, Reported
from proxy.config.spec import KeyTable, keys_of, required_of
from proxy.config.values import parse_bind, parse_collector_url, tls_pair_problem
from proxy.core.addresses import Network, parse_network

# admin.token: a sanity floor, not an entropy check (`openssl rand -hex 32` gives 64).
MIN_ADMIN_TOKEN_CHARS = 16
_BEARER_TOKEN_RE = re.compile(r"[A-Za-z0-9._~+/-]+=*")  # RFC 6750 section 2.1, b64token
# admin.hosts: DNS names (RFC 1123 labels); IP literals and localhost are always allowed.
_HOST_NAME_RE = re.compile(
    r"(?=.{1,253}$)([a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?)(\.[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?)*"
)

_MAX_HEAD_BYTES = DEFAULT_MAX_HEAD_BYTES
_KEEPALIVE_S = DEFAULT_KEEPALIVE_TIMEOUT_S


def read_path_normalization(
    reader: NodeReader, context: LoadContext, node: Node, path: str
) -> PathNormalization:
    """`path_normalization`: how request paths are put in canonical form; recorded in
    `context` for the routes' path matchers.

    Raises:
        Reported: not a mapping (recorded).
    """
    fields = reader.mapping(node, path, keys_of(PATH_NORMALIZATION))
    context.path_normalization = PathNormalization(
        escaped_slashes=fields.get("escaped_slashes", partial(_escaped_slashes, reader), "reject"),
        merge_slashes=fields.get("merge_slashes", reader.boolean, True),
    )
    return context.path_normalization


def _escaped_slashes(reader: NodeReader, node: Node, path: str) -> str:
    return reader.choice(node, path, ESCAPED_SLASH_ACTIONS, "action")


def read_headers_with_underscores(
    reader: NodeReader, context: LoadContext, node: Node, path: str
) -> str:
    """`headers_with_underscores`: drop, reject or allow.

    Raises:
        Reported: not one of them (recorded).
    """
    return reader.choice(node, path, UNDERSCORE_ACTIONS, "action")


def read_http1_parser(reader: NodeReader, context: LoadContext, node: Node, path: str) -> str:
    """`http1_parser`: auto, httptools or h11.

    Raises:
        Reported: not one of them (recorded).
    """
    return reader.choice(node, path, HTTP1_PARSERS, "parser")


def read_workers(reader: NodeReader, context: LoadContext, node: Node, path: str) -> int | None:
    """`workers`: how many worker processes; null is None (one per core), as leaving it
    out is.

    Raises:
        Reported: not null or an integer of at least 1 (recorded).
    """
    return reader.optional(reader.positive_integer)(node, path)


def read_shutdown(reader: NodeReader, context: LoadContext, node: Node, path: str) -> float:
    """`shutdown`: the grace period, in seconds.

    Raises:
        Reported: not a mapping (recorded).
    """
    fields = reader.mapping(node, path, keys_of(SHUTDOWN))
    return fields.get("grace_period", reader.duration, DEFAULT_GRACE_PERIOD_S)


def read_reload(reader: NodeReader, context: LoadContext, node: Node, path: str) -> ReloadConfig:
    """`reload`: whether the file is watched for changes, and how often it is polled.

    Raises:
        Reported: not a mapping (recorded).
    """
    fields = reader.mapping(node, path, keys_of(RELOAD))
    return ReloadConfig(
        watch=fields.get("watch", reader.boolean, True),
        interval=fields.get("interval", reader.positive_duration, DEFAULT_RELOAD_WATCH_INTERVAL_S),
    )


def read_metrics(reader: NodeReader, context: LoadContext, node: Node, path: str) -> MetricsConfig:
    """`metrics`: whether requests are counted on the data path.

    Raises:
        Reported: not a mapping (recorded).
    """
    fields = reader.mapping(node, path, keys_of(METRICS))
    return MetricsConfig(enabled=fields.get("enabled", reader.boolean, True))


def read_logging(reader: NodeReader, context: LoadContext, node: Node, path: str) -> str:
    """`logging`: `format`, the process logs as text lines or JSON objects.

    Raises:
        Reported: not a mapping (recorded).
    """
    fields = reader.mapping(node, path, keys_of(LOGGING))
    return fields.get("format", partial(reader.choice, choices=LOG_FORMATS, what="format"), "text")


def read_tracing(reader: NodeReader, context: LoadContext, node: Node, path: str) -> TracingConfig:
    """`tracing`: where spans go, how many, and under which service name.

    Raises:
        Reported: not a mapping (recorded).
    """
    fields = reader.mapping(node, path, keys_of(TRACING))

    def collector(value: Node, where: str) -> str:
        return reader.convert(value, where, parse_collector_url, "a URL")

    def ratio(value: Node, where: str) -> float:
        found = reader.value(value, where)
        if isinstance(found, bool) or not isinstance(found, int | float):
            raise reader.type_error(value, where, "a number from 0 to 1")
        if not 0.0 <= float(found) <= 1.0:
            raise reader.error(value, where, f"must be from 0 to 1, not {found}")
        return float(found)

    def service(value: Node, where: str) -> str:
        name = reader.string(value, where)
        if not name.strip():
            raise reader.error(value, where, "must not be empty")
        return name

    def headers(value: Node, where: str) -> tuple[tuple[str, str], ...]:
        pairs: list[tuple[str, str]] = []
        for key_node, key, item in reader.entries(value, where):
            here = f"{where}.{key}"
            if not _TOKEN.fullmatch(key):
                raise reader.error(key_node, here, f"{key!r} is not a valid header name")
            text = reader.string(item, here)
            if any(bad in text for bad in "\r\n\x00"):
                raise reader.error(item, here, "a header value must not hold CR, LF or NUL")
            reader.conceal(item)  # an API key or token, hidden from /config
            pairs.append((key, text))
        return tuple(pairs)

    return TracingConfig(
        otlp_endpoint=fields.get("otlp_endpoint", collector, None),
        sample_ratio=fields.get("sample_ratio", ratio, 1.0),
        parent_based=fields.get("parent_based", reader.boolean, True),
        service_name=fields.get("service_name", service, "gatehouse"),
        headers=fields.get("headers", headers, ()),
    )


_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 section 5.6.2


# --- listeners ---


def read_listeners(
    reader: NodeReader, context: LoadContext, node: Node, path: str
) -> tuple[ListenerConfig, ...]:
    """`listeners`: at least one. Records in `context` each address bound (the admin
    listener must not take one) and the listeners that take PROXY headers (client_ip must
    say whose to believe).

    Raises:
        Reported: not a list, or an empty one (recorded).
    """
    listeners: list[ListenerConfig] = []
    read: list[tuple[ListenerConfig, Node, str]] = []
    names: dict[str, str] = {}
    for item, item_path in reader.nonempty_items(node, path, "at least one listener is required"):
        with suppress(Reported):
            fields = reader.mapping(item, item_path, keys_of(LISTENER), required_of(LISTENER))
            host, port = fields.get("bind", partial(_bind, reader, context), ("", 0))
            name = fields.get("name", reader.name, item_path)
            if name in names:
                fields.error("name", f"duplicate listener name {name!r} (also {names[name]})")
            names[name] = item_path
            tls = fields.get("tls", partial(_listener_tls, reader), None)
            http2 = fields.get("http2", reader.boolean, True)
            proxy_protocol = fields.get("proxy_protocol", reader.boolean, False)
            redirect_https = fields.get(
                "redirect_https", partial(read_https_redirect, reader), None
            )
            if redirect_https is not None and tls is not None:
                fields.error("redirect_https", "redirect_https is for a plaintext listener")
            if proxy_protocol:
                context.proxy_protocol_listeners.append(fields)
            line = item.start_mark.line + 1
            listeners.append(
                ListenerConfig(
                    host, port, name, tls, http2, proxy_protocol, redirect_https, line=line
                )
            )
            read.append((listeners[-1], item, item_path))
    check_acme_listeners(reader, read)
    return tuple(listeners)


# --- client_ip ---


def read_client_ip(
    reader: NodeReader, context: LoadContext, node: Node, path: str
) -> ClientIpConfig:
    """`client_ip`: which proxies' word about the client address is believed, and where
    it is read (a header, or the PROXY header of a listener with proxy_protocol).

    Raises:
        Reported: not a mapping, without trusted_proxies, or with an invalid one
            (recorded).
    """
    # trusted_proxies is required, with a message of its own (below).
    fields = reader.mapping(node, path, keys_of(CLIENT_IP))
    source = fields.get("source", partial(_client_ip_source, reader), "x-forwarded-for")
    if "trusted_proxies" not in fields:
        # As nginx's real_ip needs set_real_ip_from: a source believed from anyone
        # would let every client choose its own address.
        raise reader.error(
            node,
            path,
            "missing required key 'trusted_proxies' (the proxies whose word about the"
            " client is believed)",
        )
    no_networks: tuple[Network, ...] = ()
    trusted = fields.get("trusted_proxies", partial(_networks, reader), no_networks)
    if not trusted:
        raise Reported
    if source == "proxy_protocol" and not context.proxy_protocol_listeners:
        raise fields.error("source", "proxy_protocol needs a listener with 'proxy_protocol: true'")
    return ClientIpConfig(trusted, source)


def _client_ip_source(reader: NodeReader, node: Node, path: str) -> str:
    return reader.choice(node, path, CLIENT_IP_SOURCES, "source")


def _networks(reader: NodeReader, node: Node, path: str) -> tuple[Network, ...]:
    """A list of addresses and CIDR ranges (one string reads as a list of one), each
    checked with its own line; an empty list is an error (it would trust no one,
    which is what leaving the key out says)."""
    items = [(node, path)]
    if not isinstance(node, ScalarNode) or reader.value(node, path) is None:
        items = reader.nonempty_items(node, path, "must list at least one address or CIDR range")
    networks: list[Network] = []
    failed = False
    for item, item_path in items:
        try:
            networks.append(
                reader.convert(item, item_path, parse_network, "an IP address or CIDR range")
            )
        except Reported:
            failed = True
    if failed:
        raise Reported
    return tuple(networks)


def _listener_tls(reader: NodeReader, node: Node, path: str) -> ListenerTls:
    """`tls`: `certificates: [{cert, key}, ...]`, or `cert` and `key` for one, and/or
    `acme` (proxy/config/acme.py)."""
    fields = reader.mapping(node, path, keys_of(LISTENER_TLS))
    min_version = fields.get("min_version", partial(_tls_version, reader), "1.2")
    client_auth = fields.get("client_auth", partial(_client_auth, reader), None)
    acme = fields.get("acme", partial(read_acme, reader), None)
    if "certificates" in fields:
        if "cert" in fields or "key" in fields:
            shorthand = "cert" if "cert" in fields else "key"
            raise fields.error(shorthand, "give certificates, or cert and key, not both")
        no_certificates: tuple[TlsCertificate, ...] = ()
        certificates = fields.get("certificates", partial(_certificates, reader), no_certificates)
    elif "cert" in fields or "key" in fields:
        for needed in ("cert", "key"):
            if needed not in fields and not _misspelt(node, needed, LISTENER_TLS):
                raise reader.error(node, path, f"missing required key {needed!r}")
        certificates = (_certificate(reader, fields, node, path),)
    elif "acme" in fields:
        certificates = ()  # every certificate from ACME
    else:
        raise reader.error(
            node,
            path,
            "missing required key 'certificates' (or 'cert' and 'key' for one, or 'acme')",
        )
    if "acme" in fields and acme is None:
        raise Reported
    return ListenerTls(certificates, min_version, client_auth, acme)


def _certificates(reader: NodeReader, node: Node, path: str) -> tuple[TlsCertificate, ...]:
    """A non-empty list of {cert, key}, each pair checked with its own line."""
    certificates: list[TlsCertificate] = []
    failed = False
    for item, item_path in reader.nonempty_items(node, path, "must list at least one certificate"):
        try:
            fields = reader.mapping(
                item, item_path, keys_of(TLS_CERTIFICATE), required_of(TLS_CERTIFICATE)
            )
            certificates.append(_certificate(reader, fields, item, item_path))
        except Reported:
            failed = True
    if failed:
        raise Reported
    return tuple(certificates)


def _certificate(reader: NodeReader, fields: Fields, node: Node, path: str) -> TlsCertificate:
    """The `cert` and `key` of `fields` (a missing one was reported), both readable and
    loading together."""
    if "cert" not in fields or "key" not in fields:
        raise Reported
    cert = fields.get("cert", reader.readable_file, "")
    key = fields.get("key", reader.readable_file, "")
    if cert and key:
        # Like `nginx -t`: a pair that does not load is a config error, not a crash
        # at the first handshake.
        problem = tls_pair_problem(cert, key)
        if problem is not None:
            culprit, message = problem
            if culprit is None:
                raise reader.error(node, path, message)
            raise fields.error(culprit, message)
    return TlsCertificate(cert, key)


def _client_auth(reader: NodeReader, node: Node, path: str) -> ClientAuth:
    fields = reader.mapping(node, path, keys_of(CLIENT_AUTH), required_of(CLIENT_AUTH))
    mode = fields.get("mode", partial(_client_auth_mode, reader), "require")
    if "ca" not in fields:
        raise Reported
    ca = fields.get("ca", reader.ca_bundle, "")
    if not ca:
        raise Reported
    return ClientAuth(ca, mode)


def _client_auth_mode(reader: NodeReader, node: Node, path: str) -> str:
    return reader.choice(node, path, CLIENT_AUTH_MODES, "mode")


def _misspelt(node: Node, key: str, table: KeyTable) -> bool:
    """Whether `node` has an unknown key that `key` was suggested for (as
    `NodeReader.mapping` does, so that a misspelt key is reported once)."""
    written = [item.value for item, _ in node.value if isinstance(item, ScalarNode)]
    return any(
        difflib.get_close_matches(name, list(table), n=1) == [key]
        for name in written
        if name not in table
    )


def _tls_version(reader: NodeReader, node: Node, path: str) -> str:
    # `min_version: 1.3` is a YAML float; read it as written, as `"1.3"` is.
    version = reader.text(node, path)
    if version not in TLS_VERSIONS:
        supported = ", ".join(TLS_VERSIONS)
        message = f"unsupported TLS version {version!r} (supported: {supported})"
        raise reader.error(node, path, message)
    return version


def _bind(reader: NodeReader, context: LoadContext, node: Node, path: str) -> tuple[str, int]:
    host, port = reader.convert(node, path, parse_bind, "an address like '0.0.0.0:8080'")
    if port and (host, port) in context.binds:
        raise reader.error(node, path, f"address already used by {context.binds[host, port]}")
    context.binds[host, port] = path
    return host, port


def read_admin(reader: NodeReader, context: LoadContext, node: Node, path: str) -> AdminConfig:
    """`admin`: the admin listener's address, bearer token and allowed Host names.

    Raises:
        Reported: not a mapping (recorded).
    """
    fields = reader.mapping(node, path, keys_of(ADMIN), required_of(ADMIN))
    host, port = fields.get("bind", partial(_bind, reader, context), ("", 0))
    token = fields.get("token", partial(_admin_token, reader), None)
    no_hosts: tuple[str, ...] = ()
    hosts = fields.get("hosts", partial(_admin_hosts, reader), no_hosts)
    where = fields.nodes.get("bind", node)  # a listener that cannot bind names this line
    return AdminConfig(host, port, token, hosts, line=where.start_mark.line + 1)


def _admin_token(reader: NodeReader, node: Node, path: str) -> str:
    # Read with the substitution done: an unset ${VAR} is already an error, and one set
    # to "" must not turn authentication off without a word.
    token = reader.string(node, path)
    if not token:
        raise reader.error(node, path, "empty (is the variable it names set?)")
    if len(token) < MIN_ADMIN_TOKEN_CHARS:
        message = (
            f"at least {MIN_ADMIN_TOKEN_CHARS} characters, got {len(token)} "
            "(make one with: openssl rand -hex 32)"
        )
        raise reader.error(node, path, message)
    if not _BEARER_TOKEN_RE.fullmatch(token):
        message = (
            "a bearer token is letters, digits and -._~+/ with optional trailing '=' "
            "(RFC 6750 section 2.1)"
        )
        raise reader.error(node, path, message)
    return token


def _admin_hosts(reader: NodeReader, node: Node, path: str) -> tuple[str, ...]:
    names: list[str] = []
    for item, item_path in reader.items(node, path):
        with suppress(Reported):
            name = reader.string(item, item_path).lower().removesuffix(".")
            if not _HOST_NAME_RE.fullmatch(name):
                message = f"expected a host name like 'gatehouse-admin.internal', got {name!r}"
                raise reader.error(
                    item, item_path, message + " (any port is accepted)" * (":" in name)
                )
            names.append(name)
    return tuple(names)


# --- limits ---


def read_limits(reader: NodeReader, context: LoadContext, node: Node, path: str) -> LimitsConfig:
    """`limits`: the server-wide head and body sizes and timeouts.

    Raises:
        Reported: not a mapping (recorded).
    """
    fields = reader.mapping(node, path, keys_of(LIMITS))
    return LimitsConfig(
        max_head_bytes=fields.get("max_head_bytes", reader.positive_size, _MAX_HEAD_BYTES),
        max_body_size=fields.get("max_body_size", reader.optional(reader.size), None),
        header_timeout=fields.get(
            "header_timeout", reader.positive_duration, DEFAULT_HEADER_TIMEOUT_S
        ),
        body_timeout=fields.get("body_timeout", reader.positive_duration, DEFAULT_BODY_TIMEOUT_S),
        keepalive_timeout=fields.get("keepalive_timeout", reader.duration, _KEEPALIVE_S),
    )


def read_http2(reader: NodeReader, context: LoadContext, node: Node, path: str) -> Http2Config:
    """`http2`: the SETTINGS the gateway sends, and the flood limits.

    Raises:
        Reported: not a mapping (recorded).
    """
    fields = reader.mapping(node, path, keys_of(HTTP2))
    config = Http2Config(
        max_concurrent_streams=fields.get(
            "max_concurrent_streams",
            partial(_h2_count_setting, reader),
            DEFAULT_H2_MAX_CONCURRENT_STREAMS,
        ),
        max_header_list_size=fields.get(
            "max_header_list_size", partial(_h2_size_setting, reader), DEFAULT_MAX_HEAD_BYTES
        ),
        initial_window_size=fields.get(
            "initial_window_size", reader.positive_size, DEFAULT_H2_INITIAL_WINDOW_BYTES
        ),
        max_resets_per_second=fields.get(
            "max_resets_per_second", reader.positive_integer, DEFAULT_H2_MAX_RESETS_PER_SECOND
        ),
        max_control_frames_per_second=fields.get(
            "max_control_frames_per_second",
            reader.positive_integer,
            DEFAULT_H2_MAX_CONTROL_FRAMES_PER_SECOND,
        ),
    )
    if config.initial_window_size > MAX_H2_WINDOW:
        fields.error("initial_window_size", f"at most {MAX_H2_WINDOW} bytes (2^31-1)")
    return config


def _h2_count_setting(reader: NodeReader, node: Node, path: str) -> int:
    return _h2_setting(reader, node, path, reader.positive_integer(node, path), "")


def _h2_size_setting(reader: NodeReader, node: Node, path: str) -> int:
    return _h2_setting(reader, node, path, reader.positive_size(node, path), " bytes")


def _h2_setting(reader: NodeReader, node: Node, path: str, value: int, unit: str) -> int:
    # h2 packs SETTINGS values into 32 bits: a larger one would fail at the first
    # connection instead of here.
    if value > MAX_H2_SETTING:
        raise reader.error(node, path, f"at most {MAX_H2_SETTING}{unit} (2^32-1)")
    return value
