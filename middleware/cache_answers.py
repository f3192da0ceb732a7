"""What the cache reads of a request and what it answers from a stored response: the
fields it looks at, a stored response's facts worked out once, the answer (or a 304),
and the copy of a request that revalidates in the background. The hit path: compiled
(proxy/buildinfo.py)."""

from __future__ import annotations

from middleware import cache_rules as rules
from middleware.cache_store import Entry
from proxy import Body, Request, Response

# The client's conditions the cache answers itself; the others bypass it (cache_rules).
CLIENT_CONDITIONS = ("if-none-match", "if-modified-since")
# Field names that may make request_bypasses send a GET past the cache (checked only
# when one is there).
_BYPASS_HINTS = frozenset(("range", "if-match", "if-unmodified-since", "if-range"))
_UNSAFE_METHODS = frozenset(("POST", "PUT", "DELETE", "PATCH"))

# The request fields the cache reads (lower-cased): a request with none of them is
# "quiet", and a fresh entry that varies on nothing answers it as it is.
_NOTABLE = frozenset(
    name.encode() for name in (*_BYPASS_HINTS, *CLIENT_CONDITIONS, "cache-control", "pragma")
)


def quiet(raw: list[tuple[bytes, bytes]]) -> bool:
    """Whether none of the raw request fields is one the cache reads."""
    for name, _ in raw:  # noqa: SIM110 (a loop: compiled, it makes no generator)
        if name.lower() in _NOTABLE:
            return False
    return True


def bypass_reason(request: Request, fields: list[tuple[str, str]], names: frozenset[str]) -> str:
    """Why the cache stays out of `request` ("" when it does not)."""
    if request.method != "GET":
        return "method"
    return rules.request_bypasses(request.method, fields) if names & _BYPASS_HINTS else ""


def invalidates(request: Request, response: Response) -> bool:
    """RFC 9111 section 4.4: a successful unsafe request invalidates what is stored for
    its target."""
    return request.method in _UNSAFE_METHODS and response.status < 400


def facts_of(entry: Entry, heuristic: float, max_stale: float | None) -> Facts:
    """`entry`'s Facts, worked out on first use and kept on it."""
    facts = entry.facts
    if not isinstance(facts, Facts):
        facts = entry.facts = Facts(entry, heuristic, max_stale)
    return facts


def fields_of(message: Request | Response) -> list[tuple[str, str]]:
    """A message's fields as text pairs."""
    raw = message.raw_headers
    if raw is not None:
        return [(name.decode("latin-1"), value.decode("latin-1")) for name, value in raw]
    return list(message.headers.items())


class Facts:
    """What the cache works out of a stored response once (not on every hit)."""

    __slots__ = (
        "initial_age",
        "lifetime",
        "must_validate",
        "raw",
        "stale_if_error",
        "stale_ok",
        "swr",
    )

    def __init__(self, entry: Entry, heuristic: float, max_stale: float | None) -> None:
        fields = entry.fields
        self.lifetime = rules.freshness_lifetime(fields, heuristic_fraction=heuristic)
        self.initial_age = rules.initial_age(fields, entry.request_time, entry.response_time)
        self.must_validate = rules.needs_validation(fields)
        self.stale_ok = rules.may_serve_stale(fields)
        self.swr = rules.stale_window(fields, "stale-while-revalidate", max_stale)
        self.stale_if_error = rules.stale_window(fields, "stale-if-error", max_stale)
        # The stored fields as the response's raw headers, without the stored Age.
        self.raw = [
            (name.encode("latin-1"), value.encode("latin-1"))
            for name, value in fields
            if name.lower() != "age"
        ]


def stored_answer(
    request_fields: list[tuple[str, str]],
    entry: Entry,
    facts: Facts,
    age: float,
    status: str,
    request_names: frozenset[str] | None = None,
) -> Response:
    """The stored response (or a 304 when the client's own conditions hold).
    `request_names`: the request's lower-cased field names, when known."""
    if request_names is None:
        request_names = rules.lowered_names(request_fields)
    age_field = (b"Age", str(int(age)).encode())
    status_field = (b"Cache-Status", status.encode("latin-1"))
    if (
        entry.status == 200
        and not request_names.isdisjoint(CLIENT_CONDITIONS)
        and rules.not_modified(request_fields, entry.fields)
    ):
        raw = [
            (name.encode("latin-1"), value.encode("latin-1"))
            for name, value in rules.not_modified_fields(entry.fields)
        ]
        return Response(304, [*raw, age_field, status_field])
    return Response(
        entry.status, [*facts.raw, age_field, status_field], Body.from_bytes(entry.body)
    )


def background_request(request: Request, entry: Entry) -> Request:
    """A bodiless copy of `request` that revalidates `entry`: the client's conditions
    replaced by the entry's validators, the route and identity kept."""
    headers = [
        (name, value) for name, value in fields_of(request) if name.lower() not in CLIENT_CONDITIONS
    ]
    headers.extend(rules.validators(entry.fields))
    return request.copy_head(
        [(name.encode("latin-1"), value.encode("latin-1")) for name, value in headers]
    )
