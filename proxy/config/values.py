"""Values of routes.yaml: durations, sizes, `${VAR}` references, bind addresses, endpoint
URLs and TLS files.

Each `parse_*` function takes the text as written and either returns the typed value or raises
ConfigValueError with a one-line message; NodeReader (`proxy/config/reader.py`) prefixes that
message with the file, line and key path. Any other exception from these functions is a bug.
Which keys exist and what they mean is in the key tables of `proxy/config/keys.py` (an
upstream's in `upstream_keys.py`), which the section readers that `proxy/config/load.py`
calls take their keys from.
"""

from __future__ import annotations

import ipaddress
import math
import re
import ssl
from collections.abc import Iterable, Mapping
from decimal import Decimal
from fractions import Fraction
from urllib.parse import urlsplit

MAX_PORT = 65535

# Go's time.ParseDuration units (as Traefik, Caddy and Envoy users write them), and days.
_DURATION_UNITS_S = {
    "ns": Fraction(1, 10**9),
    "us": Fraction(1, 10**6),
    "\u00b5s": Fraction(1, 10**6),  # micro sign
    "\u03bcs": Fraction(1, 10**6),  # Greek mu
    "ms": Fraction(1, 1000),
    "s": Fraction(1),
    "m": Fraction(60),
    "h": Fraction(3600),
    "d": Fraction(86400),
}
_NUMBER = r"(?:\d+(?:\.\d+)?|\.\d+)"
# One term of a duration: a number and its unit (the unit left out only when alone).
_DURATION_TERM_RE = re.compile(rf"({_NUMBER})(ns|us|\u00b5s|\u03bcs|ms|s|m|h|d)?")
_DURATION_FORMS = "e.g. '250ms', '5s', '1.5s', '2m', '1m30s', '1h', '1d' or a number of seconds"
# The same forms as a JSON Schema `pattern` (ECMA 262, which Python's `re` also reads), for
# `gatehouse schema`: the terms in the one order parse_duration() accepts them, each at most
# once, or a bare number. tests/proxy/tools/test_schema.py holds the two to each other.
_DURATION_TERM = r"(?:\d+(?:\.\d+)?|\.\d+)"
DURATION_PATTERN = (
    rf"^\s*(?=[0-9.])(?:{_DURATION_TERM}|(?:{_DURATION_TERM}d)?(?:{_DURATION_TERM}h)?"
    rf"(?:{_DURATION_TERM}m(?!s))?(?:{_DURATION_TERM}s)?(?:{_DURATION_TERM}ms)?"
    rf"(?:{_DURATION_TERM}(?:us|\u00b5s|\u03bcs))?(?:{_DURATION_TERM}ns)?)\s*$"
)

# Case does not matter, except that a one-letter m, g or t is refused as ambiguous (below).
_SIZE_UNITS_BYTES = {
    "b": 1,
    "k": 1000,  # Kubernetes' k, M, G, T: powers of 1000, as kB, MB, GB, TB
    "m": 1000**2,
    "g": 1000**3,
    "t": 1000**4,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "ki": 1024,  # Kubernetes' Ki, Mi, Gi, Ti: powers of 1024, as KiB, MiB, GiB, TiB
    "mi": 1024**2,
    "gi": 1024**3,
    "ti": 1024**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}
# nginx reads `10m` as 10 MiB and Kubernetes `M` as 10^6 bytes: a lower-case one-letter m,
# g or t could mean either, so it is refused and the message names both spellings.
_AMBIGUOUS_SIZE_UNITS = frozenset({"m", "g", "t"})
_SIZE_RE = re.compile(rf"({_NUMBER})([A-Za-z]*)")
# parse_size()'s forms as a JSON Schema `pattern`: a number and one of the units, in any
# case but the ambiguous lower-case m, g and t alone. (That a fraction comes to whole bytes
# is left to the loader.)
SIZE_PATTERN = rf"^\s*{_DURATION_TERM}(?:[bBkKMGT]|[kKmMgGtT][bB]|[kKmMgGtT][iI][bB]?)?\s*$"
_SIZE_FORMS = (
    "e.g. '512B', '16KiB' or '16Ki', '1MiB' or '1Mi', '1GiB', '10KB' or '10k', '10MB' or "
    "'10M', or a number of bytes"
)
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
    """Parse a duration into seconds: `250ms`, `5s`, `1.5s`, `2m`, `1h`, `1d`, Go-style
    compounds from the largest unit to the smallest (`1m30s`, `1h30m`, `2h45m10.5s`), or
    a bare number of seconds. Units: `ns`, `us` (or `µs`), `ms`, `s`, `m`, `h`, `d`.

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
    total = Fraction(0)
    previous: Fraction | None = None  # the last term's unit: each must be smaller
    position = 0
    while True:
        match = _DURATION_TERM_RE.match(text, position)
        if match is None:
            raise ConfigValueError(f"invalid duration {value!r} ({_DURATION_FORMS})")
        number, unit = match.group(1), match.group(2)
        position = match.end()
        if unit is None:
            if previous is not None or position < len(text):
                raise ConfigValueError(
                    f"invalid duration {value!r}: {number!r} has no unit ({_DURATION_FORMS})"
                )
            unit = "s"
        size = _DURATION_UNITS_S[unit]
        if previous is not None and size >= previous:
            raise ConfigValueError(
                f"invalid duration {value!r}: units must go from the largest to the smallest"
            )
        previous = size
        total += Fraction(number) * size
        if position == len(text):
            break
    try:
        return float(total)
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
    """Parse a size into bytes: `512B`; powers of 1024 as `16KiB`, `1MiB`, `1GiB`, `1TiB`
    or Kubernetes' `16Ki`, `1Mi`, `1Gi`, `1Ti`; powers of 1000 as `10KB`, `10MB`, `1GB`,
    `1TB` or `10k`, `10M`, `1G`, `1T`; or a bare number of bytes. Units are
    case-insensitive, except that a lower-case `m`, `g` or `t` alone is ambiguous (nginx
    reads `10m` as MiB) and refused. A fraction (`1.5KiB`) must come to a whole number
    of bytes.

    Raises:
        ConfigValueError: malformed, negative or not a whole number of bytes.
    """
    if isinstance(value, int):
        if value < 0:
            raise ConfigValueError(f"invalid size {value!r}: must not be negative")
        return value
    number, unit = _number_and_unit(value, _SIZE_RE, "size", _SIZE_FORMS)
    if unit in _AMBIGUOUS_SIZE_UNITS:
        big = unit.upper()
        raise ConfigValueError(
            f"invalid size {value!r}: ambiguous unit {unit!r}: write {number}{big} for "
            f"powers of 1000 or {number}{big}i for powers of 1024 (nginx's {unit!r})"
        )
    multiplier = _SIZE_UNITS_BYTES.get(unit.lower() or "b")
    if multiplier is None:
        raise ConfigValueError(f"invalid size {value!r}: unknown unit {unit!r} ({_SIZE_FORMS})")
    size = Fraction(number) * multiplier
    if size.denominator != 1:
        raise ConfigValueError(f"invalid size {value!r}: not a whole number of bytes")
    return int(size)


def _number_and_unit(text: str, pattern: re.Pattern[str], what: str, forms: str) -> tuple[str, str]:
    """The number and the unit ("" when left out) of a duration or size written as text.

    Raises:
        ConfigValueError: negative, or not in the form of `pattern` (`forms` says which).
    """
    stripped = text.strip()
    if stripped.startswith("-"):
        raise ConfigValueError(f"invalid {what} {text!r}: must not be negative")
    match = pattern.fullmatch(stripped)
    if match is None:
        raise ConfigValueError(f"invalid {what} {text!r} ({forms})")
    return match.group(1), match.group(2) or ""


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
    the router normalises the request's Host (proxy/exchange/routing.py).

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
    from cryptography import x509  # (only a config with TLS pays for the import)

    try:
        # The names it is chosen for (SNI) are read from its leaf: a PEM form OpenSSL
        # takes and cryptography does not (BEGIN TRUSTED CERTIFICATE) is refused here
        # rather than when a worker starts.
        with open(cert, "rb") as file:
            x509.load_pem_x509_certificates(file.read())
    except ValueError:
        return "cert", f"{cert!r}: the leaf must be a 'BEGIN CERTIFICATE' PEM block"
    except OSError as exc:
        return "cert", f"cannot read {cert!r}: {exc.strerror or exc}"
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


def parse_collector_url(text: str) -> str:
    """An OpenTelemetry collector's base URL, `http(s)://host[:port][/path]`, as
    OTEL_EXPORTER_OTLP_ENDPOINT takes it (traces go to its `/v1/traces`). Returns it
    without a trailing `/`.

    Raises:
        ConfigValueError: not an http:// or https:// URL with a host, or it has
            userinfo, a query or a fragment.
    """
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 (raises for a port that is not a number in range)
    except ValueError as exc:
        raise ConfigValueError(f"invalid collector URL {text!r}: {exc}") from None
    if parts.scheme.lower() not in ("http", "https") or "://" not in text:
        raise ConfigValueError(
            f"invalid collector URL {text!r}: expected http://host:port or https://host:port"
        )
    if not parts.hostname or not _valid_host(parts.hostname):
        raise ConfigValueError(f"invalid collector URL {text!r}: missing or invalid host")
    if parts.username is not None or parts.password is not None:
        raise ConfigValueError(
            f"invalid collector URL {text!r}: credentials in the URL are not allowed"
            " (use tracing.headers)"
        )
    if parts.query or parts.fragment:
        raise ConfigValueError(
            f"invalid collector URL {text!r}: a query or fragment is not allowed"
        )
    return text.rstrip("/")


# What a route's `redirect.to` may name besides its path_regex's named groups.
REDIRECT_PLACEHOLDERS = ("scheme", "host", "port", "path", "query", "uri")
_PLACEHOLDER = re.compile(r"\{([^{}]*)\}|\{\{|\}\}|[{}]")
# A Location is a URI reference: visible ASCII, no spaces (RFC 3986 appendix C).
_URI_TEXT = re.compile(r"[!-~]*")


def parse_redirect_template(text: str, params: Iterable[str] = ()) -> tuple[tuple[str, bool], ...]:
    """A redirect's `to`: literal text and `{name}` placeholders, in order, as
    (text, False) and (name, True). `{{` and `}}` are literal braces. `params` are the
    extra names allowed (the route's path_regex groups).

    Raises:
        ConfigValueError: empty, a brace that opens or closes nothing, an unknown name,
            or literal text that cannot be in a URL (spaces, control or non-ASCII
            characters: percent-encode them).
    """
    if not text:
        raise ConfigValueError("an empty redirect target")
    known = (*REDIRECT_PLACEHOLDERS, *params)
    parts: list[tuple[str, bool]] = []
    literal: list[str] = []
    position = 0
    for found in _PLACEHOLDER.finditer(text):
        literal.append(text[position : found.start()])
        position = found.end()
        token = found.group(0)
        if token in ("{{", "}}"):
            literal.append(token[0])
            continue
        name = found.group(1)
        if name is None:
            raise ConfigValueError(
                f"unmatched {token!r} at offset {found.start()} (write {token * 2} for a brace)"
            )
        if name not in known:
            names = ", ".join("{" + option + "}" for option in known)
            raise ConfigValueError(f"unknown placeholder {{{name}}} (known: {names})")
        if text_before := "".join(literal):
            parts.append((text_before, False))
        literal = []
        parts.append((name, True))
    literal.append(text[position:])
    if "".join(literal):
        parts.append(("".join(literal), False))
    for part, is_name in parts:
        if not is_name and not _URI_TEXT.fullmatch(part):
            raise ConfigValueError(
                f"{part!r} cannot be part of a URL: percent-encode spaces, control and"
                " non-ASCII characters"
            )
    return tuple(parts)
