"""routes.yaml -> the frozen, typed configuration of `proxy.config.model`.

The loader checks everything once, at load time (STYLE.md 1.4), and reports every problem
together, each as `file:line: key.path: message`. The model lives in `proxy.config.model`,
the document limits and `ConfigError` in `proxy.config.document`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from contextlib import suppress
from dataclasses import replace

from yaml.nodes import MappingNode, Node, ScalarNode

from proxy.config.document import (
    ConfigError,
    compose_document,
    read_config_file,
)
from proxy.config.model import (
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
    UNDERSCORE_ACTIONS,
    AdminConfig,
    ClientIpConfig,
    Config,
    Http2Config,
    LimitsConfig,
    ListenerConfig,
    ListenerTls,
    MetricsConfig,
    MiddlewareSpec,
    PathNormalization,
    ReloadConfig,
    RouteConfig,
    UpstreamConfig,
)
from proxy.config.reader import Fields, Reported, describe
from proxy.config.routes import RouteSections
from proxy.config.upstream import UpstreamSections
from proxy.config.values import (
    parse_bind,
    tls_pair_problem,
)
from proxy.core.addresses import Network, parse_network

__all__ = ["MIN_ADMIN_TOKEN_CHARS", "load_config", "parse_config"]

# --- Loader ---------------------------------------------------------------------------------

_TOP_KEYS = ("listeners", "admin", "upstreams", "middleware", "global_middleware", "routes",
             "limits", "http2", "http1_parser", "workers", "shutdown", "reload",
             "metrics", "path_normalization", "headers_with_underscores",
             "client_ip")  # fmt: skip
_HTTP1_PARSERS = ("auto", "httptools", "h11")
_TLS_VERSIONS = ("1.2", "1.3")
_MAX_H2_WINDOW = 2**31 - 1  # RFC 9113 section 6.9.1
_MAX_H2_SETTING = 2**32 - 1  # RFC 9113 section 6.5.1: SETTINGS values are 32-bit

# admin.token: a sanity floor, not an entropy check (`openssl rand -hex 32` gives 64).
MIN_ADMIN_TOKEN_CHARS = 16
_BEARER_TOKEN_RE = re.compile(r"[A-Za-z0-9._~+/-]+=*")  # RFC 6750 section 2.1, b64token
# admin.hosts: DNS names (RFC 1123 labels); IP literals and localhost are always allowed.
_HOST_NAME_RE = re.compile(
    r"(?=.{1,253}$)([a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?)(\.[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?)*"
)

_MAX_HEAD_BYTES = DEFAULT_MAX_HEAD_BYTES
_KEEPALIVE_S = DEFAULT_KEEPALIVE_TIMEOUT_S


def load_config(path: str, env: Mapping[str, str] | None = None) -> Config:
    """Read and validate the YAML file at `path` (see parse_config).

    Raises:
        ConfigError: the file cannot be read (or is over MAX_CONFIG_BYTES, or not UTF-8),
            or it is invalid. Any other exception is a bug.
    """
    return parse_config(read_config_file(path), source=path, env=env)


def parse_config(
    text: str, source: str = "<string>", env: Mapping[str, str] | None = None
) -> Config:
    """Validate a routes.yaml document and return it as a frozen Config.

    `${VAR}` and `${VAR:-default}` are substituted in every scalar value (not in keys) from
    `env` (default os.environ); `$${` is a literal `${`. A value that held a reference is
    then typed like a plain YAML scalar where a number or boolean is expected, so
    `workers: "${WORKERS:-2}"` is an int. YAML anchors, aliases and `<<` merges work.

    The document is at most MAX_CONFIG_BYTES long and MAX_NESTING_DEPTH levels deep with
    aliases expanded (proxy/config/document.py); `!public` marks a string value that
    /config may show in clear (proxy/config/view.py).

    Raises:
        ConfigError: with every problem found, each naming `source`, the line and the key
            path. Any other exception is a bug.
    """
    document = compose_document(text, source)
    loader = _ConfigLoader(source, os.environ if env is None else env)
    config = loader.config(document.root)
    if config is None or loader.errors:
        raise ConfigError(loader.errors)
    return replace(config, concealed=frozenset(loader.concealed))


class _ConfigLoader(RouteSections, UpstreamSections):
    """The routes.yaml schema. Every section is read even after an error, so that one run
    reports every problem; the Config is only used when no error was recorded."""

    def __init__(self, source: str, env: Mapping[str, str]) -> None:
        super().__init__(source, env)
        self._upstream_names: set[str] | None = None  # None: unreadable, so skip the checks
        self._upstream_protocols: dict[str, str] = {}
        self._binds: dict[tuple[str, int], str] = {}
        self._path_normalization_config = PathNormalization()
        self._proxy_protocol_listeners: list[Fields] = []  # checked against client_ip

    def config(self, root: Node | None) -> Config | None:
        """The Config of the document `root`; check `errors` before using it."""
        if root is None:
            self.error(None, "", "empty config (expected listeners, upstreams and routes)")
            return None
        if not isinstance(root, MappingNode):
            with suppress(Reported):  # describing `${X}` can itself be an error
                found = describe(root, self.value(root, ""))
                self.error(
                    root, "", f"the top level must be a mapping (listeners, ...), not {found}"
                )
            return None
        top = self.mapping(root, "", _TOP_KEYS, ("listeners", "upstreams", "routes"))
        no_routes: tuple[RouteConfig, ...] = ()
        listeners: tuple[ListenerConfig, ...] = top.get("listeners", self._listeners, ())
        upstreams: dict[str, UpstreamConfig] = top.get("upstreams", self._upstreams, {})
        # Named middleware first: the chains below refer to them.
        self._named_middleware = {} if "middleware" not in top else None
        middleware: dict[str, MiddlewareSpec] = top.get("middleware", self._middleware_section, {})
        # Before the routes: their path matchers must be in the form requests are put in.
        paths = top.get("path_normalization", self._path_normalization, PathNormalization())
        self._path_normalization_config = paths
        client_ip: ClientIpConfig | None = top.get("client_ip", self._client_ip, None)
        if client_ip is None and "client_ip" not in top:
            for fields in self._proxy_protocol_listeners:
                fields.error(
                    "proxy_protocol",
                    "needs client_ip.trusted_proxies: the load balancers whose PROXY headers"
                    " are believed",
                )
        return Config(
            listeners=listeners,
            upstreams=upstreams,
            middleware=middleware,
            global_middleware=top.get("global_middleware", self._chain, ()),
            routes=top.get("routes", self._routes, no_routes),
            admin=top.get("admin", self._admin, None),
            limits=top.get("limits", self._limits, LimitsConfig()),
            http2=top.get("http2", self._http2, Http2Config()),
            http1_parser=top.get("http1_parser", self._http1_parser, "auto"),
            workers=top.get("workers", self.optional(self.positive_integer), None),
            grace_period=top.get("shutdown", self._shutdown, DEFAULT_GRACE_PERIOD_S),
            reload=top.get("reload", self._reload, ReloadConfig()),
            metrics=top.get("metrics", self._metrics, MetricsConfig()),
            path_normalization=paths,
            headers_with_underscores=top.get(
                "headers_with_underscores", self._headers_with_underscores, "drop"
            ),
            client_ip=client_ip,
            source=self.source,
        )

    def _path_normalization(self, node: Node, path: str) -> PathNormalization:
        fields = self.mapping(node, path, ("escaped_slashes", "merge_slashes"))
        return PathNormalization(
            escaped_slashes=fields.get("escaped_slashes", self._escaped_slashes, "reject"),
            merge_slashes=fields.get("merge_slashes", self.boolean, True),
        )

    def _escaped_slashes(self, node: Node, path: str) -> str:
        return self.choice(node, path, ESCAPED_SLASH_ACTIONS, "action")

    def _headers_with_underscores(self, node: Node, path: str) -> str:
        return self.choice(node, path, UNDERSCORE_ACTIONS, "action")

    def _http1_parser(self, node: Node, path: str) -> str:
        return self.choice(node, path, _HTTP1_PARSERS, "parser")

    def _shutdown(self, node: Node, path: str) -> float:
        fields = self.mapping(node, path, ("grace_period",))
        return fields.get("grace_period", self.duration, DEFAULT_GRACE_PERIOD_S)

    def _reload(self, node: Node, path: str) -> ReloadConfig:
        fields = self.mapping(node, path, ("watch", "interval"))
        return ReloadConfig(
            watch=fields.get("watch", self.boolean, True),
            interval=fields.get(
                "interval", self.positive_duration, DEFAULT_RELOAD_WATCH_INTERVAL_S
            ),
        )

    def _metrics(self, node: Node, path: str) -> MetricsConfig:
        fields = self.mapping(node, path, ("enabled",))
        return MetricsConfig(enabled=fields.get("enabled", self.boolean, True))

    # --- listeners ---

    def _listeners(self, node: Node, path: str) -> tuple[ListenerConfig, ...]:
        listeners: list[ListenerConfig] = []
        names: dict[str, str] = {}
        for item, item_path in self.nonempty_items(node, path, "at least one listener is required"):
            with suppress(Reported):
                keys = ("bind", "name", "tls", "http2", "proxy_protocol")
                fields = self.mapping(item, item_path, keys, ("bind",))
                host, port = fields.get("bind", self._bind, ("", 0))
                name = fields.get("name", self.name, item_path)
                if name in names:
                    fields.error("name", f"duplicate listener name {name!r} (also {names[name]})")
                names[name] = item_path
                tls = fields.get("tls", self._listener_tls, None)
                http2 = fields.get("http2", self.boolean, True)
                proxy_protocol = fields.get("proxy_protocol", self.boolean, False)
                if proxy_protocol:
                    self._proxy_protocol_listeners.append(fields)
                line = item.start_mark.line + 1
                listeners.append(
                    ListenerConfig(host, port, name, tls, http2, proxy_protocol, line=line)
                )
        return tuple(listeners)

    # --- client_ip ---

    def _client_ip(self, node: Node, path: str) -> ClientIpConfig:
        fields = self.mapping(node, path, ("trusted_proxies", "source"))
        source = fields.get("source", self._client_ip_source, "x-forwarded-for")
        if "trusted_proxies" not in fields:
            # As nginx's real_ip needs set_real_ip_from: a source believed from anyone
            # would let every client choose its own address.
            raise self.error(
                node,
                path,
                "missing required key 'trusted_proxies' (the proxies whose word about the"
                " client is believed)",
            )
        no_networks: tuple[Network, ...] = ()
        trusted = fields.get("trusted_proxies", self._networks, no_networks)
        if not trusted:
            raise Reported
        if source == "proxy_protocol" and not self._proxy_protocol_listeners:
            raise fields.error(
                "source", "proxy_protocol needs a listener with 'proxy_protocol: true'"
            )
        return ClientIpConfig(trusted, source)

    def _client_ip_source(self, node: Node, path: str) -> str:
        return self.choice(node, path, CLIENT_IP_SOURCES, "source")

    def _networks(self, node: Node, path: str) -> tuple[Network, ...]:
        """A list of addresses and CIDR ranges (one string reads as a list of one), each
        checked with its own line; an empty list is an error (it would trust no one,
        which is what leaving the key out says)."""
        items: list[tuple[Node, str]]
        if isinstance(node, ScalarNode) and self.value(node, path) is not None:
            items = [(node, path)]
        else:
            items = [
                (item, f"{path}[{index}]") for index, item in enumerate(self.sequence(node, path))
            ]
        if not items:
            raise self.error(node, path, "must list at least one address or CIDR range")
        networks: list[Network] = []
        failed = False
        for item, item_path in items:
            try:
                networks.append(
                    self.convert(item, item_path, parse_network, "an IP address or CIDR range")
                )
            except Reported:
                failed = True
        if failed:
            raise Reported
        return tuple(networks)

    def _listener_tls(self, node: Node, path: str) -> ListenerTls:
        fields = self.mapping(node, path, ("cert", "key", "min_version"), ("cert", "key"))
        cert = fields.get("cert", self.readable_file, "")
        key = fields.get("key", self.readable_file, "")
        min_version = fields.get("min_version", self._tls_version, "1.2")
        if cert and key:
            # Like `nginx -t`: a pair that does not load is a config error, not a crash
            # at the first handshake.
            problem = tls_pair_problem(cert, key)
            if problem is not None:
                culprit, message = problem
                if culprit is None:
                    raise self.error(node, path, message)
                raise fields.error(culprit, message)
        return ListenerTls(cert, key, min_version)

    def _tls_version(self, node: Node, path: str) -> str:
        # `min_version: 1.3` is a YAML float; read it as written, as `"1.3"` is.
        version = self.text(node, path)
        if version not in _TLS_VERSIONS:
            supported = ", ".join(_TLS_VERSIONS)
            message = f"unsupported TLS version {version!r} (supported: {supported})"
            raise self.error(node, path, message)
        return version

    def _bind(self, node: Node, path: str) -> tuple[str, int]:
        host, port = self.convert(node, path, parse_bind, "an address like '0.0.0.0:8080'")
        if port and (host, port) in self._binds:
            raise self.error(node, path, f"address already used by {self._binds[host, port]}")
        self._binds[host, port] = path
        return host, port

    def _admin(self, node: Node, path: str) -> AdminConfig:
        fields = self.mapping(node, path, ("bind", "token", "hosts"), ("bind",))
        host, port = fields.get("bind", self._bind, ("", 0))
        token = fields.get("token", self._admin_token, None)
        no_hosts: tuple[str, ...] = ()
        hosts = fields.get("hosts", self._admin_hosts, no_hosts)
        where = fields.nodes.get("bind", node)  # a listener that cannot bind names this line
        return AdminConfig(host, port, token, hosts, line=where.start_mark.line + 1)

    def _admin_token(self, node: Node, path: str) -> str:
        # Read with the substitution done: an unset ${VAR} is already an error, and one set
        # to "" must not turn authentication off without a word.
        token = self.string(node, path)
        if not token:
            raise self.error(node, path, "empty (is the variable it names set?)")
        if len(token) < MIN_ADMIN_TOKEN_CHARS:
            message = (
                f"at least {MIN_ADMIN_TOKEN_CHARS} characters, got {len(token)} "
                "(make one with: openssl rand -hex 32)"
            )
            raise self.error(node, path, message)
        if not _BEARER_TOKEN_RE.fullmatch(token):
            message = (
                "a bearer token is letters, digits and -._~+/ with optional trailing '=' "
                "(RFC 6750 section 2.1)"
            )
            raise self.error(node, path, message)
        return token

    def _admin_hosts(self, node: Node, path: str) -> tuple[str, ...]:
        names: list[str] = []
        for index, item in enumerate(self.sequence(node, path)):
            item_path = f"{path}[{index}]"
            with suppress(Reported):
                name = self.string(item, item_path).lower().removesuffix(".")
                if not _HOST_NAME_RE.fullmatch(name):
                    message = f"expected a host name like 'gatehouse-admin.internal', got {name!r}"
                    raise self.error(
                        item, item_path, message + " (any port is accepted)" * (":" in name)
                    )
                names.append(name)
        return tuple(names)

    # --- limits ---

    def _limits(self, node: Node, path: str) -> LimitsConfig:
        keys = ("max_head_bytes", "max_body_size", "header_timeout", "body_timeout")
        fields = self.mapping(node, path, (*keys, "keepalive_timeout"))
        return LimitsConfig(
            max_head_bytes=fields.get("max_head_bytes", self.positive_size, _MAX_HEAD_BYTES),
            max_body_size=fields.get("max_body_size", self.optional(self.size), None),
            header_timeout=fields.get(
                "header_timeout", self.positive_duration, DEFAULT_HEADER_TIMEOUT_S
            ),
            body_timeout=fields.get("body_timeout", self.positive_duration, DEFAULT_BODY_TIMEOUT_S),
            keepalive_timeout=fields.get("keepalive_timeout", self.duration, _KEEPALIVE_S),
        )

    def _http2(self, node: Node, path: str) -> Http2Config:
        keys = ("max_concurrent_streams", "max_header_list_size", "initial_window_size",
                "max_resets_per_second", "max_control_frames_per_second")  # fmt: skip
        fields = self.mapping(node, path, keys)
        config = Http2Config(
            max_concurrent_streams=fields.get(
                "max_concurrent_streams", self._h2_count_setting, DEFAULT_H2_MAX_CONCURRENT_STREAMS
            ),
            max_header_list_size=fields.get(
                "max_header_list_size", self._h2_size_setting, DEFAULT_MAX_HEAD_BYTES
            ),
            initial_window_size=fields.get(
                "initial_window_size", self.positive_size, DEFAULT_H2_INITIAL_WINDOW_BYTES
            ),
            max_resets_per_second=fields.get(
                "max_resets_per_second", self.positive_integer, DEFAULT_H2_MAX_RESETS_PER_SECOND
            ),
            max_control_frames_per_second=fields.get(
                "max_control_frames_per_second",
                self.positive_integer,
                DEFAULT_H2_MAX_CONTROL_FRAMES_PER_SECOND,
            ),
        )
        if config.initial_window_size > _MAX_H2_WINDOW:
            fields.error("initial_window_size", f"at most {_MAX_H2_WINDOW} bytes (2^31-1)")
        return config

    def _h2_count_setting(self, node: Node, path: str) -> int:
        return self._h2_setting(node, path, self.positive_integer(node, path), "")

    def _h2_size_setting(self, node: Node, path: str) -> int:
        return self._h2_setting(node, path, self.positive_size(node, path), " bytes")

    def _h2_setting(self, node: Node, path: str, value: int, unit: str) -> int:
        # h2 packs SETTINGS values into 32 bits: a larger one would fail at the first
        # connection instead of here.
        if value > _MAX_H2_SETTING:
            raise self.error(node, path, f"at most {_MAX_H2_SETTING}{unit} (2^32-1)")
        return value
