"""Values of routes.yaml: durations, sizes, `${VAR}` references, bind addresses and endpoint
URLs, and NodeReader, which reads them out of composed YAML nodes.

Each `parse_*` function takes the text as written and either returns the typed value or raises
ConfigValueError with a one-line message; NodeReader prefixes that message with the file, line
and key path. Any other exception from these functions is a bug. The schema itself (which
keys exist, what they mean) lives in `proxy/config.py`.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import re
import ssl
from collections.abc import Callable, Mapping, Sequence
from decimal import Decimal
from fractions import Fraction
from typing import TypeVar
from urllib.parse import urlsplit

from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode
from yaml.resolver import Resolver

MAX_PORT = 65535

_DURATION_UNITS_S = {
    "ms": Fraction(1, 1000),
    "s": Fraction(1),
    "m": Fraction(60),
    "h": Fraction(3600),
}
_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?|\.\d+)(ms|s|m|h)?")
_DURATION_FORMS = "e.g. '250ms', '5s', '1.5s', '2m', '1h' or a number of seconds"

_SIZE_UNITS_BYTES = {
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}
_SIZE_RE = re.compile(r"(\d+(?:\.\d+)?|\.\d+)([A-Za-z]*)")
_SIZE_FORMS = "e.g. '512B', '16KiB', '1MiB', '1GiB', '10KB', '10MB' or a number of bytes"
# Largest first, so format_size() picks the shortest exact spelling.
_SIZE_FORMAT_UNITS = (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024))

# `$${` is an escaped literal `${`; `${...}` is a reference; a `${` without `}` is an error.
_ENV_RE = re.compile(r"\$\$\{|\$\{([^}]*)\}|\$\{")
_ENV_BODY_RE = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)(?::-(.*))?", re.DOTALL)

_HOSTNAME_RE = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_])?")
_HOST_PATTERN_RE = re.compile(r"(\*\.)?[a-z0-9_]([a-z0-9_.-]*[a-z0-9_])?")
_BIND_FORMS = "expected 'host:port', '[ipv6]:port' or ':port'"


class ConfigValueError(ValueError):
    """A scalar value in the config is malformed; the message is one line."""


def parse_duration(value: str | float) -> float:
    """Parse `250ms`, `5s`, `1.5s`, `2m`, `1h` or a bare number of seconds into seconds.

    Raises:
        ConfigValueError: malformed, negative or not finite.
    """
    if isinstance(value, int | float):
        if math.isnan(value) or math.isinf(value):
            raise ConfigValueError(f"invalid duration {value!r}: must be a finite number")
        if value < 0:
            raise ConfigValueError(f"invalid duration {value!r}: must not be negative")
        return float(value)
    text = value.strip()
    if text.startswith("-"):
        raise ConfigValueError(f"invalid duration {value!r}: must not be negative")
    match = _DURATION_RE.fullmatch(text)
    if match is None:
        raise ConfigValueError(f"invalid duration {value!r} ({_DURATION_FORMS})")
    number, unit = match.groups()
    try:
        return float(Fraction(number) * _DURATION_UNITS_S[unit or "s"])
    except OverflowError:
        raise ConfigValueError(f"invalid duration {value!r}: too large") from None


def format_duration(seconds: float) -> str:
    """The shortest of `1h`, `2m`, `5s`, `250ms` or `0.0125s` that parse_duration() reads
    back as exactly `seconds` (which must be finite and not negative)."""
    if seconds == int(seconds):
        whole = int(seconds)
        for unit, size in (("h", 3600), ("m", 60)):
            if whole and whole % size == 0:
                return f"{whole // size}{unit}"
        return f"{whole}s"
    millis = round(seconds * 1000)
    if millis / 1000 == seconds:
        return f"{millis}ms"
    return f"{Decimal(repr(seconds)):f}s"  # repr() may use an exponent, which we do not parse


def parse_size(value: str | int) -> int:
    """Parse `512B`, `16KiB`, `1MiB`, `1GiB`, `10KB`/`10MB` (powers of 1000) or a bare
    number of bytes into bytes. Units are case-insensitive; a fraction (`1.5KiB`) must come
    to a whole number of bytes.

    Raises:
        ConfigValueError: malformed, negative or not a whole number of bytes.
    """
    if isinstance(value, int):
        if value < 0:
            raise ConfigValueError(f"invalid size {value!r}: must not be negative")
        return value
    text = value.strip()
    if text.startswith("-"):
        raise ConfigValueError(f"invalid size {value!r}: must not be negative")
    match = _SIZE_RE.fullmatch(text)
    if match is None:
        raise ConfigValueError(f"invalid size {value!r} ({_SIZE_FORMS})")
    number, unit = match.groups()
    multiplier = _SIZE_UNITS_BYTES.get(unit.lower() or "b")
    if multiplier is None:
        raise ConfigValueError(f"invalid size {value!r}: unknown unit {unit!r} ({_SIZE_FORMS})")
    size = Fraction(number) * multiplier
    if size.denominator != 1:
        raise ConfigValueError(f"invalid size {value!r}: not a whole number of bytes")
    return int(size)


def format_size(size: int) -> str:
    """The shortest `1GiB` / `16KiB` / `1000B` spelling that parse_size() reads back as `size`."""
    for unit, multiplier in _SIZE_FORMAT_UNITS:
        if size and size % multiplier == 0:
            return f"{size // multiplier}{unit}"
    return f"{size}B"


def substitute_env(text: str, env: Mapping[str, str]) -> tuple[str, list[str]]:
    """Replace `${VAR}` and `${VAR:-default}` (default when VAR is unset or empty, as in
    the shell) in `text`; `$${` is a literal `${`. Values are inserted as-is, never
    substituted again.

    Returns the new text and one message per problem (unset variable, malformed reference).
    """
    errors: list[str] = []

    def replace(match: re.Match[str]) -> str:
        whole = match.group(0)
        if whole == "$${":
            return "${"
        body = match.group(1)
        if body is None:
            errors.append("unterminated '${' (write '$${' for a literal '${')")
            return whole
        ref = _ENV_BODY_RE.fullmatch(body)
        if ref is None:
            errors.append(f"invalid environment variable reference {whole!r}")
            return whole
        name, default = ref.groups()
        if default is not None and "${" in default:
            errors.append(f"nested '${{' in the default of {whole!r} is not supported")
            return whole
        found = env.get(name)
        if default is not None and not found:
            return default
        if found is None:
            errors.append(f"environment variable {name!r} is not set")
            return whole
        return found

    return _ENV_RE.sub(replace, text), errors


def _parse_port(text: str, *, allow_zero: bool) -> int:
    if not text.isascii() or not text.isdigit():
        raise ConfigValueError(f"invalid port {text!r}")
    port = int(text)
    low = 0 if allow_zero else 1
    if not low <= port <= MAX_PORT:
        raise ConfigValueError(f"port {port} is out of range {low}..{MAX_PORT}")
    return port


def parse_bind(text: str) -> tuple[str, int]:
    """Parse a listen address: `host:port`, `[::1]:port` or `:port` (all IPv4 interfaces).
    Port 0 asks the OS for an ephemeral port. IPv6 hosts are returned without brackets.

    Raises:
        ConfigValueError: malformed address or port out of 0..65535.
    """
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or not rest.startswith(":"):
            raise ConfigValueError(f"invalid bind address {text!r} ({_BIND_FORMS})")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ConfigValueError(f"invalid IPv6 address {host!r} in {text!r}") from None
        return host, _parse_port(rest[1:], allow_zero=True)
    host, colon, port_text = text.rpartition(":")
    if not colon:
        raise ConfigValueError(f"invalid bind address {text!r} ({_BIND_FORMS})")
    if ":" in host:
        raise ConfigValueError(
            f"invalid bind address {text!r}: write IPv6 addresses in brackets, as '[::1]:8080'"
        )
    if host and _HOSTNAME_RE.fullmatch(host) is None:
        raise ConfigValueError(f"invalid host {host!r} in bind address {text!r}")
    return host or "0.0.0.0", _parse_port(port_text, allow_zero=True)


def _valid_host(host: str) -> bool:
    if ":" not in host:
        return _HOSTNAME_RE.fullmatch(host) is not None
    try:
        ipaddress.IPv6Address(host)
    except ValueError:
        return False
    return True


def parse_host_pattern(text: str) -> str | None:
    """Parse a route's `match.host`: an exact host (`api.example.com`, `[::1]`), a wildcard
    (`*.example.com`), or `*` for any host (None). Lower-cased, one trailing dot dropped, as
    the router normalises the request's Host (proxy/routing.py).

    Raises:
        ConfigValueError: empty, has a port, or a `*` anywhere but a leading `*.` label.
    """
    host = text.lower()
    if host == "*":
        return None
    host = host.removesuffix(".")
    if host.startswith("["):  # an IPv6 literal
        if host.endswith("]") and ":" in host and _valid_host(host[1:-1]):
            return host
        raise ConfigValueError(f"invalid host {text!r} (expected an IPv6 address like '[::1]')")
    if not _HOST_PATTERN_RE.fullmatch(host):
        if ":" in host:
            raise ConfigValueError(f"invalid host {text!r}: a route host has no port")
        forms = "'api.example.com', '*.example.com' or '*'"
        raise ConfigValueError(f"invalid host {text!r} (expected {forms})")
    return host


_DEFAULT_PORTS = {"http": 80, "https": 443}


class _PassphraseAsked(Exception):
    """Raised from the password callback: the key is encrypted."""


def _refuse_passphrase() -> bytes:
    # Without a callback OpenSSL prompts on the terminal, so `gatehouse check` would hang.
    raise _PassphraseAsked


def _holds_pem_certificate(path: str) -> bool:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_verify_locations(cafile=path)
    except (ssl.SSLError, OSError):
        return False
    return True


def tls_pair_problem(cert: str, key: str) -> tuple[str | None, str] | None:
    """Why the PEM certificate chain `cert` and private key `key` cannot serve TLS, as
    (the key that is at fault, `cert` or `key`, or None for the pair; a message), or None
    when they load together. An encrypted key is a problem: it would need a passphrase."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert, key, password=_refuse_passphrase)
    except _PassphraseAsked:
        return "key", f"the key {key!r} is encrypted (a passphrase-less key is needed)"
    except ssl.SSLError as exc:
        if not _holds_pem_certificate(cert):
            return "cert", f"{cert!r} holds no PEM certificate"
        if exc.reason == "KEY_VALUES_MISMATCH":
            return None, f"the certificate {cert!r} does not match the key {key!r}"
        return "key", f"cannot load the key {key!r}: {exc.reason or 'not a PEM private key'}"
    except OSError as exc:  # the files were readable a moment ago
        return None, f"cannot load {cert!r} and {key!r}: {exc.strerror or exc}"
    return None


def ca_bundle_problem(ca: str) -> str | None:
    """Why the file `ca` is not a bundle of PEM CA certificates, or None when it loads."""
    if not _holds_pem_certificate(ca):
        return f"{ca!r} holds no PEM certificate"
    return None


def parse_endpoint_url(text: str) -> tuple[str, str, int, str]:
    """Parse an upstream endpoint `http://host[:port]` or `https://host[:port]` (port 80 or
    443 by default; a trailing `/` is allowed, any other path is not). Returns (scheme,
    host, port, normalised URL), host lower-cased and, for IPv6, without brackets.

    Raises:
        ConfigValueError: not an http:// or https:// URL, or it has a path, query,
            fragment or userinfo.
    """
    if "://" not in text:
        raise ConfigValueError(f"invalid endpoint {text!r}: expected a URL like 'http://host:port'")
    try:
        parts = urlsplit(text)
    except ValueError as exc:  # e.g. an unbalanced "[" in the host
        raise ConfigValueError(f"invalid endpoint {text!r}: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise ConfigValueError(
            f"unsupported scheme {parts.scheme!r} in {text!r} (http:// or https://)"
        )
    if parts.username is not None or parts.password is not None:
        raise ConfigValueError(f"invalid endpoint {text!r}: credentials in the URL are not allowed")
    if parts.path not in ("", "/"):
        raise ConfigValueError(
            f"invalid endpoint {text!r}: a path is not allowed (use the route's rewrite.add_prefix)"
        )
    if parts.query or parts.fragment:
        raise ConfigValueError(f"invalid endpoint {text!r}: a query or fragment is not allowed")
    host = parts.hostname or ""
    if not host:
        raise ConfigValueError(f"invalid endpoint {text!r}: missing host")
    if not _valid_host(host):
        raise ConfigValueError(f"invalid host {host!r} in endpoint {text!r}")
    # parts.port raises for garbage; read the text after the host ourselves for a clear error.
    netloc = parts.netloc
    port_text = netloc.rpartition("]")[2] if netloc.startswith("[") else netloc
    _, colon, port_text = port_text.rpartition(":")
    port = _parse_port(port_text, allow_zero=False) if colon else _DEFAULT_PORTS[scheme]
    url_host = f"[{host}]" if ":" in host else host
    return scheme, host, port, f"{scheme}://{url_host}:{port}"


# --- Reading values out of YAML nodes -------------------------------------------------------

_TAG = "tag:yaml.org,2002:"
_STR_TAG, _MERGE_TAG = _TAG + "str", _TAG + "merge"
_TEXT_TAGS = (_STR_TAG, _TAG + "timestamp")  # a date is just text to us
_CONSTRUCTOR = SafeConstructor()
# The stubs leave Resolver.resolve untyped.
_resolve_tag: Callable[[type[ScalarNode], str, tuple[bool, bool]], str] = Resolver().resolve
_CONSTRUCTORS: dict[str, Callable[[ScalarNode], object]] = {
    _TAG + "int": _CONSTRUCTOR.construct_yaml_int,
    _TAG + "float": _CONSTRUCTOR.construct_yaml_float,
    _TAG + "bool": _CONSTRUCTOR.construct_yaml_bool,
    _TAG + "null": lambda node: None,
}
_PLAIN_KEY_RE = re.compile(r"[A-Za-z0-9_-]+")

_T = TypeVar("_T")
Parse = Callable[[Node, str], _T]


class Reported(Exception):
    """Unwinds the parse of a value whose error NodeReader has already recorded."""


def join_path(path: str, key: str) -> str:
    """`routes[0]` + `upstream` -> `routes[0].upstream`; odd keys are quoted: `x['a.b']`."""
    if not _PLAIN_KEY_RE.fullmatch(key):
        return f"{path}[{key!r}]"
    return f"{path}.{key}" if path else key


def did_you_mean(word: str, options: Sequence[str]) -> str:
    """` (did you mean 'x'?)` when one of `options` is close to `word`, else ``."""
    close = difflib.get_close_matches(word, options, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def describe(node: Node, value: object) -> str:
    """What was found, for "expected X, got Y" messages: `a list`, `an integer (5)`..."""
    if isinstance(node, MappingNode):
        return "a mapping"
    if isinstance(node, SequenceNode):
        return "a list"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, int):
        return f"an integer ({value})"
    if isinstance(value, float):
        return f"a number ({value})"
    return f"a string ({value!r})"


class NodeReader:
    """Reads typed values out of `yaml.compose()` nodes, recording every error as
    `{source}:{line}: {path}: {message}` (line from the node's start mark, 1-based).

    Readers take (node, key path) and return the value, or record an error and raise
    Reported; `get` turns that into the field's default so that reading goes on and all
    errors are collected. Scalar values (not keys) get `${VAR}` substitution from `env`.
    """

    def __init__(self, source: str, env: Mapping[str, str]) -> None:
        self.source = source
        self.env = env
        self._errors: list[tuple[int, int, str]] = []

    @property
    def errors(self) -> list[str]:
        """Every error so far, sorted by line (then in the order found)."""
        return [text for _, _, text in sorted(self._errors)]

    def error(self, node: Node | None, path: str, message: str) -> Reported:
        """Record an error at `node` (None: line 1); returns Reported for the caller to raise
        if it must."""
        line = node.start_mark.line + 1 if node is not None else 1
        where = f"{path}: " if path else ""
        self._errors.append((line, len(self._errors), f"{self.source}:{line}: {where}{message}"))
        return Reported()

    # --- shapes ---

    def value(self, node: Node, path: str) -> object:
        """A scalar's Python value after `${VAR}` substitution; a collection is returned as
        the node itself. A scalar that held a reference is typed after substitution, quoted
        or not (a flow mapping needs the quotes): `workers: "${N:-2}"` is an int. Readers of
        strings (`string`, `text`) take the text as it is."""
        if not isinstance(node, ScalarNode):
            return node
        tag, text = node.tag, node.value
        if tag == _STR_TAG:
            text = self._substitute(node, path)
            if text != node.value:
                tag = _resolve_tag(ScalarNode, text, (True, False))
        if tag in _TEXT_TAGS:
            return text
        construct = _CONSTRUCTORS.get(tag)
        if construct is None:
            shown = "!!" + tag.removeprefix(_TAG) if tag.startswith(_TAG) else tag
            raise self.error(node, path, f"unsupported YAML tag {shown!r}")
        return construct(ScalarNode(tag, text))

    def _substitute(self, node: ScalarNode, path: str) -> str:
        text, problems = substitute_env(node.value, self.env)
        for problem in problems:
            self.error(node, path, problem)
        if problems:
            raise Reported
        return text

    def type_error(self, node: Node, path: str, expected: str, hint: str = "") -> Reported:
        """Record `expected {expected}, got {what node holds}{hint}`."""
        found = describe(node, self.value(node, path))
        return self.error(node, path, f"expected {expected}, got {found}{hint}")

    def entries(
        self, node: Node, path: str, _merging: frozenset[int] = frozenset()
    ) -> list[tuple[Node, str, Node]]:
        """(key node, key, value node) of a mapping, with `<<` merges expanded (explicit keys
        win, then earlier merges). Duplicate and non-scalar keys are errors."""
        if not isinstance(node, MappingNode):
            raise self.type_error(node, path, "a mapping")
        explicit: dict[str, tuple[Node, str, Node]] = {}
        merged: list[tuple[Node, str, Node]] = []
        for key_node, value_node in node.value:
            key = key_node.value
            if key_node.tag == _MERGE_TAG:
                sources = value_node.value if isinstance(value_node, SequenceNode) else [value_node]
                for source in sources:
                    if not isinstance(source, MappingNode):
                        self.type_error(source, path, "a mapping to merge with '<<'")
                    elif id(source) not in _merging:  # an alias can make a cycle
                        merged += self.entries(source, path, _merging | {id(node)})
            elif not isinstance(key_node, ScalarNode):
                self.error(key_node, path, f"expected a string key, got {describe(key_node, 0)}")
            elif key in explicit:
                first = explicit[key][0].start_mark.line + 1
                message = f"duplicate key {key!r} (first at line {first})"
                self.error(key_node, join_path(path, key), message)
            else:
                explicit[key] = (key_node, key, value_node)
        entries = list(explicit.values())
        for entry in merged:
            if entry[1] not in explicit:
                explicit[entry[1]] = entry
                entries.append(entry)
        return entries

    def mapping(
        self, node: Node, path: str, allowed: Sequence[str], required: Sequence[str] = ()
    ) -> Fields:
        """A mapping with a fixed set of keys: unknown keys (with a did-you-mean) and missing
        required ones are errors."""
        fields: dict[str, Node] = {}
        suggested: set[str] = set()
        for key_node, key, value_node in self.entries(node, path):
            if key in allowed:
                fields[key] = value_node
                continue
            close = difflib.get_close_matches(key, allowed, n=1)
            suggested.update(close)
            hint = (
                f"did you mean {close[0]!r}?" if close else f"expected one of: {', '.join(allowed)}"
            )
            self.error(key_node, join_path(path, key), f"unknown key {key!r} ({hint})")
        for key in required:
            if key not in fields and key not in suggested:  # a misspelt key is reported once
                self.error(node, path, f"missing required key {key!r}")
        return Fields(self, path, fields)

    def sequence(self, node: Node, path: str) -> list[Node]:
        """The items of a list."""
        if not isinstance(node, SequenceNode):
            raise self.type_error(node, path, "a list")
        return list(node.value)

    def optional(self, parse: Parse[_T]) -> Parse[_T | None]:
        """`parse`, except that null reads as None."""

        def parse_optional(node: Node, path: str) -> _T | None:
            if self.value(node, path) is None:
                return None
            return parse(node, path)

        return parse_optional

    # --- scalars ---

    def string(self, node: Node, path: str, expected: str = "a string") -> str:
        """A string value (a number or boolean must be quoted to be read as text)."""
        if isinstance(node, ScalarNode) and node.tag == _STR_TAG:
            return self._substitute(node, path)
        quote = isinstance(node, ScalarNode) and self.value(node, path) is not None
        raise self.type_error(node, path, expected, "; quote it to use it as text" * quote)

    def text(self, node: Node, path: str) -> str:
        """Any non-null scalar as text, numbers and booleans as written (`debug: 1` -> "1")."""
        if isinstance(node, ScalarNode) and node.tag == _STR_TAG:
            return self._substitute(node, path)
        if isinstance(node, ScalarNode) and self.value(node, path) is not None:
            return str(node.value)
        raise self.type_error(node, path, "a string")

    def integer(self, node: Node, path: str, minimum: int = 0) -> int:
        """An integer >= `minimum`."""
        value = self.value(node, path)
        if not isinstance(value, int) or isinstance(value, bool):
            raise self.type_error(node, path, "an integer")
        if value < minimum:
            raise self.error(node, path, f"must be at least {minimum}, got {value}")
        return value

    def boolean(self, node: Node, path: str) -> bool:
        """true or false."""
        value = self.value(node, path)
        if not isinstance(value, bool):
            raise self.type_error(node, path, "true or false")
        return value

    def duration(self, node: Node, path: str, positive: bool = False) -> float:
        """Seconds, from `250ms`, `5s`, `1.5s`, `2m`, `1h` or a number (see parse_duration)."""
        value = self.value(node, path)
        if not isinstance(value, str | int | float) or isinstance(value, bool):
            raise self.type_error(node, path, "a duration like '5s' or '250ms'")
        try:
            seconds = parse_duration(value)
        except ConfigValueError as exc:
            raise self.error(node, path, str(exc)) from None
        if positive and seconds == 0:
            raise self.error(node, path, "must be greater than 0")
        return seconds

    def size(self, node: Node, path: str, positive: bool = False) -> int:
        """Bytes, from `16KiB`, `1MiB`, `10MB`, `512B` or an integer (see parse_size)."""
        value = self.value(node, path)
        if not isinstance(value, str | int) or isinstance(value, bool):
            raise self.type_error(node, path, "a size like '16KiB' or '10MB'")
        try:
            size = parse_size(value)
        except ConfigValueError as exc:
            raise self.error(node, path, str(exc)) from None
        if positive and size == 0:
            raise self.error(node, path, "must be greater than 0")
        return size

    def choice(self, node: Node, path: str, choices: Sequence[str], what: str) -> str:
        """One of `choices`; otherwise `unsupported {what} 'x' (supported: ...)`."""
        value = self.string(node, path)
        if value not in choices:
            hint = did_you_mean(value, choices)
            message = f"unsupported {what} {value!r} (supported: {', '.join(choices)}){hint}"
            raise self.error(node, path, message)
        return value

    def regex(self, node: Node, path: str) -> str:
        """A pattern that Python's `re` compiles."""
        pattern = self.string(node, path)
        try:
            re.compile(pattern)
        except re.error as exc:
            raise self.error(node, path, f"invalid regex {pattern!r}: {exc}") from None
        return pattern

    def convert(self, node: Node, path: str, parse: Callable[[str], _T], expected: str) -> _T:
        """A string passed through `parse` (one of the parse_* functions above)."""
        text = self.string(node, path, expected)
        try:
            return parse(text)
        except ConfigValueError as exc:
            raise self.error(node, path, str(exc)) from None


class Fields:
    """The allowed keys that a mapping gave (from NodeReader.mapping), read one at a time."""

    def __init__(self, reader: NodeReader, path: str, nodes: dict[str, Node]) -> None:
        self.reader = reader
        self.path = path
        self.nodes = nodes  # key -> value node, in file order

    def __contains__(self, key: object) -> bool:
        return key in self.nodes

    def key_path(self, key: str) -> str:
        """The key path of `key`'s value: `routes[0].match`."""
        return join_path(self.path, key)

    def get(self, key: str, parse: Parse[_T], default: _T) -> _T:
        """`parse` the value of `key`, or `default` when the key is absent or its value is
        invalid (the error is recorded, so reading goes on)."""
        node = self.nodes.get(key)
        if node is None:
            return default
        try:
            return parse(node, self.key_path(key))
        except Reported:
            return default

    def error(self, key: str, message: str) -> Reported:
        """Record an error at the value of `key`."""
        return self.reader.error(self.nodes[key], self.key_path(key), message)
