"""`api_key`: the request must carry one of the configured keys, in a header or a query
parameter; the key names the consumer the upstream is told about.

The key is read from `header` (default `X-API-Key`), else from the query parameter
`query` (off unless set). Keys come from `keys` (strings, `${ENV}` references, or
`{key, consumer}` mappings) and `keys_file` (one `KEY [CONSUMER]` per line, `#`
comments), read at config load.

Only the SHA-256 digest of each key is kept, in a dict: a request's key is hashed and
looked up. The lookup's timing depends on the digest of what the client sent, never on
how much of a real key it got right: learning that a stored digest starts with some
bytes does not help to find a key with that digest (SHA-256 is preimage resistant), so
the dict is as safe as comparing with `hmac.compare_digest` against each key, and O(1)
for thousands of keys. The plaintext keys are dropped once hashed.

Missing key: 401 with `WWW-Authenticate: ApiKey realm="..."`; unknown key: 403. Both are
counted in `gatehouse_auth_failures_total{middleware,reason}` (`missing`, `invalid`).
A match sets `request.consumer` and `consumer_header` (default `X-Consumer`; whatever the
client sent there is removed first), and the key itself never reaches the upstream: the
header is removed and the query parameter is cut out of the request target.
"""

from __future__ import annotations

import hashlib
import re
from typing import ClassVar
from urllib.parse import unquote_to_bytes

from yaml.nodes import MappingNode

from metrics.definitions import count_auth_failure
from middleware.auth_common import (
    CONSUMER_RE,
    DEFAULT_CONSUMER_HEADER,
    DEFAULT_REALM,
    challenge,
    header_name,
    header_values,
    items,
    read_lines,
    realm,
    set_consumer,
)
from proxy import Forbidden, Handler, Option, Options, Reported, Request, Response, Unauthorized

DEFAULT_HEADER = "X-API-Key"
# An entry of `keys` written as a mapping.
KEY_ENTRY: dict[str, Option] = {
    "key": Option.text("the key", required=True),
    "consumer": Option.string("the consumer it names", ""),
}
_QUERY_NAME_RE = re.compile(r"[A-Za-z0-9._~-]+")  # RFC 3986 unreserved characters


def key_digest(key: bytes) -> bytes:
    """What is stored and looked up for a key: its SHA-256 digest."""
    return hashlib.sha256(key).digest()


def take_query_parameter(query: str, name: bytes) -> tuple[list[bytes], str | None]:
    """The values of parameter `name` in the raw query string `query` (decoded as an HTML
    form is: `+` is a space, then %XX), and the query without them (None when it had
    none). The other parameters keep their bytes and order."""
    values: list[bytes] = []
    kept: list[str] = []
    for part in query.split("&"):
        raw_name, _, raw_value = part.partition("=")
        if _form_decode(raw_name) == name:
            values.append(_form_decode(raw_value))
        else:
            kept.append(part)
    if not values:
        return values, None
    return values, "&".join(kept)


def _form_decode(text: str) -> bytes:
    # The query is the target's bytes decoded as latin-1: encode back before unquoting.
    raw = text.encode("latin-1")
    if b"%" not in raw and b"+" not in raw:
        return raw  # nothing to decode (most names and keys): no unquoting pass
    return unquote_to_bytes(raw.replace(b"+", b" "))


class ApiKey:
    """Refuse requests without a known API key; name their consumer upstream."""

    # It decides who gets through: no cache may come before it in a chain
    # (proxy/plugin/base.py).
    ACCESS_CONTROL: ClassVar[bool] = True

    OPTIONS: ClassVar[dict[str, Option]] = {
        "header": Option.string(
            "the request header that carries the key (empty: none)", DEFAULT_HEADER
        ),
        "query": Option.string("the query parameter that carries the key (default none)", ""),
        "keys": Option.raw(
            "the keys: strings, or {key, consumer} mappings",
            {
                "anyOf": [
                    {"type": ["string", "number"]},
                    {
                        "type": "array",
                        "items": {
                            "anyOf": [
                                {"type": ["string", "number"]},
                                Option.mapping(KEY_ENTRY, "a key and its consumer").json_schema(),
                            ]
                        },
                    },
                ]
            },
        ),
        "keys_file": Option.string("a file of keys, one 'key' or 'key consumer' a line"),
        "consumer_header": Option.string(
            "the header that names the consumer upstream (empty: none)", DEFAULT_CONSUMER_HEADER
        ),
        "realm": Option.string("the realm of the WWW-Authenticate challenge", DEFAULT_REALM),
    }
    # It awaits nothing but `call_next`, so its chain may run without a task (see the
    # EAGER protocol of proxy/exchange/eager.py).
    EAGER: ClassVar[bool] = True
    PHASES: ClassVar[bool] = True  # request_phase, response_phase (proxy/exchange/phased.py)

    def __init__(self, options: Options) -> None:
        self.name = options.name
        self.header = header_name(options, "header", DEFAULT_HEADER, empty_ok=True)
        self.query = options.string("query", "")
        if self.query and not _QUERY_NAME_RE.fullmatch(self.query):
            options.error("query", "a parameter name is letters, digits and '._~-'")
            self.query = ""
        self._query_name = self.query.encode("ascii")
        if not self.header and not self.query:
            options.error("header", "give a header or a query parameter to read the key from")
        self.consumer_header = header_name(
            options, "consumer_header", DEFAULT_CONSUMER_HEADER, empty_ok=True
        )
        self.realm = realm(options)
        self._challenge = challenge("ApiKey", self.realm)
        # digest -> consumer ("" when the key names none)
        self._keys: dict[bytes, str] = {}
        where: dict[bytes, str] = {}  # digest -> where it was defined (for duplicates)
        self._read_inline(options, where)
        self._read_file(options, where)
        if not self._keys and not options.failed:
            options.error(None, "no keys: give 'keys' or 'keys_file'")

    def __repr__(self) -> str:
        return f"<ApiKey {self.name!r} keys={len(self._keys)}>"

    def identity_headers(self) -> tuple[str, ...]:
        """The consumer header (middleware/base.py)."""
        return (self.consumer_header,) if self.consumer_header else ()

    @property
    def key_count(self) -> int:
        """How many keys are accepted."""
        return len(self._keys)

    # -- config load ----------------------------------------------------------------------
    def _add(self, key: str, consumer: str, at: str, where: dict[bytes, str]) -> str | None:
        """Store one key; the problem with it, if any (never quoting the key)."""
        if not key:
            return "a key must not be empty"
        if key != key.strip():
            return "a key must not start or end with whitespace (clients cannot send it)"
        if consumer and not CONSUMER_RE.fullmatch(consumer):
            return f"consumer {consumer!r} must be 1-128 visible ASCII characters, no spaces"
        digest = key_digest(key.encode("utf-8"))
        first = where.get(digest)
        if first is not None:
            return f"duplicate key (first at {first})"
        self._keys[digest] = consumer
        where[digest] = at
        return None

    def _read_inline(self, options: Options, where: dict[bytes, str]) -> None:
        for reader, node, path in items(options, "keys"):
            try:
                if isinstance(node, MappingNode):
                    fields = reader.mapping(node, path, tuple(KEY_ENTRY), ("key",))
                    key_node = fields.nodes.get("key")
                    if key_node is None:  # reported by `mapping`
                        options.failed = True
                        continue
                    key = reader.text(key_node, fields.key_path("key"))
                    consumer = fields.get("consumer", reader.string, "")
                else:
                    key, consumer = reader.text(node, path), ""
            except Reported:
                options.failed = True
                continue
            problem = self._add(key, consumer, f"line {node.start_mark.line + 1}", where)
            if problem is not None:
                options.failed = True
                reader.error(node, path, problem)

    def _read_file(self, options: Options, where: dict[bytes, str]) -> None:
        path = options.optional_string("keys_file")
        if path is None:
            return
        lines = read_lines(options, "keys_file", path)
        for number, line in lines or ():
            fields = line.split()
            comment = next((i for i, f in enumerate(fields) if f.startswith("#")), None)
            if comment is not None:
                del fields[comment:]  # `KEY CONSUMER  # note`
            if len(fields) > 2:
                options.error(
                    "keys_file",
                    f"{path}:{number}: expected 'KEY' or 'KEY CONSUMER', got {len(fields)} fields",
                )
                continue
            key, consumer = fields[0], fields[1] if len(fields) == 2 else ""
            problem = self._add(key, consumer, f"{path}:{number}", where)
            if problem is not None:
                options.error("keys_file", f"{path}:{number}: {problem}")

    # -- per request ----------------------------------------------------------------------
    def request_phase(self, request: Request) -> None:
        """Admit the request (or raise Unauthorized / Forbidden) and name its consumer
        (proxy/plugin/base.py, "Phases")."""
        presented: list[bytes] = []
        if self.header:
            values = header_values(request, self.header)
            if values:
                request.remove_header(self.header)  # the key never goes upstream
                presented = [value.encode("latin-1") for value in values if value]
        if self.query:
            query = request.query
            # The name is plain, so a query without it (or a %-escape) cannot hold it.
            if query and (self.query in query or "%" in query):
                from_query, rest = take_query_parameter(query, self._query_name)
                if rest is not None:
                    _set_query(request, rest)
                    if not presented:
                        presented = [value for value in from_query if value]
        if not presented:
            count_auth_failure(self.name, "missing")
            raise Unauthorized(self._challenge, "API key missing")
        # Two keys in one request are ambiguous: refused rather than guessing which counts.
        consumer = self._keys.get(key_digest(presented[0])) if len(presented) == 1 else None
        if consumer is None:
            count_auth_failure(self.name, "invalid")
            raise Forbidden("API key not valid")
        request.consumer = consumer
        set_consumer(request, self.consumer_header, consumer)

    def response_phase(self, request: Request, response: Response, state: object) -> Response:
        """Nothing to do on the way back."""
        return response

    async def __call__(self, request: Request, call_next: Handler) -> Response:
        self.request_phase(request)
        return await call_next(request)


def _set_query(request: Request, query: str) -> None:
    """Give `request` a new query string, keeping target, path and query consistent (the
    forwarder sends `target`, or `path` and `query` when the route rewrites)."""
    target = f"{request.path}?{query}" if query else request.path
    request.set_target(target.encode("latin-1"))
