"""The rules of a shared HTTP cache (RFC 9111, RFC 5861, RFC 9211) as pure functions, for
the `cache` middleware (middleware/cache.py).

Nothing here does I/O or reads a clock: times are passed in (seconds since the epoch,
as `Date` counts them), so the unit tests drive every rule with numbers. Header fields
are given as (name, value) text pairs, names in any case.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from email.utils import format_datetime, parsedate_to_datetime

Fields = Sequence[tuple[str, str]]

# Status codes a cache may store without explicit freshness (RFC 9110 section 15.1,
# "heuristically cacheable"), less 206: the cache does not combine partial content.
HEURISTIC_STATUSES = frozenset((200, 203, 204, 300, 301, 308, 404, 405, 410, 414, 501))
# What the cache stores at all: the statuses above (with freshness given explicitly,
# any of them; others, such as 302 or 307 with max-age, too).
STORABLE_STATUSES = frozenset((*HEURISTIC_STATUSES, 302, 303, 307))

# Fields of a 304 that never replace the stored ones (RFC 9111 section 3.2): the stored
# body's framing and coding stay what they are.
NOT_UPDATED_BY_304 = frozenset(
    ("content-length", "content-encoding", "content-range", "transfer-encoding")
)


def field_values(fields: Fields, name: str) -> list[str]:
    """Every value of field `name`, list members split at commas outside quotes."""
    wanted = name.lower()
    values: list[str] = []
    for field, value in fields:
        if field.lower() == wanted:
            values.extend(split_list(value))
    return values


def first_value(fields: Fields, name: str) -> str | None:
    """The first value of field `name` as sent (no splitting), or None."""
    wanted = name.lower()
    for field, value in fields:
        if field.lower() == wanted:
            return value.strip()
    return None


def split_list(value: str) -> list[str]:
    """The members of a comma-separated field value; commas inside quotes do not split."""
    members: list[str] = []
    current: list[str] = []
    quoted = False
    for char in value:
        if char == '"':
            quoted = not quoted
        if char == "," and not quoted:
            member = "".join(current).strip()
            if member:
                members.append(member)
            current = []
        else:
            current.append(char)
    member = "".join(current).strip()
    if member:
        members.append(member)
    return members


class CacheControl:
    """The Cache-Control directives of one message: names lower-cased, values unquoted
    (None for a directive without a value). A directive given twice keeps its first
    value (RFC 9111 section 4.2.1: a cache may then consider the response stale, and
    taking the first is what most caches do)."""

    __slots__ = ("directives",)

    def __init__(self, fields: Fields) -> None:
        self.directives: dict[str, str | None] = {}
        for member in field_values(fields, "cache-control"):
            name, equals, value = member.partition("=")
            name = name.strip().lower()
            if name and name not in self.directives:
                text = value.strip()
                if len(text) >= 2 and text[0] == '"' and text[-1] == '"':
                    text = text[1:-1]
                self.directives[name] = text if equals else None

    def __contains__(self, name: str) -> bool:
        return name in self.directives

    def seconds(self, name: str) -> int | None:
        """A delta-seconds directive's value; None when absent or not a number (an
        invalid max-age is then no max-age, and other rules decide)."""
        value = self.directives.get(name)
        if value is None or not value.isdigit():
            return None
        return int(value)


def parse_http_date(value: str | None) -> float | None:
    """An HTTP-date as seconds since the epoch; None when absent or invalid (an invalid
    Expires means "already expired", which the caller decides)."""
    if not value:
        return None
    try:
        parsed = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


def format_http_date(seconds: float) -> str:
    """An IMF-fixdate (the only form a sender may generate)."""
    return format_datetime(datetime.fromtimestamp(int(seconds), UTC), usegmt=True)


def request_bypasses(method: str, fields: Fields) -> str:
    """Why a request cannot use the cache at all ("" when it can): only GET is cached,
    and Range and the conditionals the cache does not evaluate go to the origin."""
    if method != "GET":
        return "method"
    for name, _ in fields:
        lowered = name.lower()
        if lowered in _BYPASSING_FIELDS:
            return lowered
    return ""


def lowered_names(fields: Fields) -> frozenset[str]:
    """The lower-cased names of `fields`, to ask whether a field is there at all."""
    return frozenset([name.lower() for name, _ in fields])


_BYPASSING_FIELDS = frozenset(("range", "if-match", "if-unmodified-since", "if-range"))


def storable(
    status: int,
    request_fields: Fields,
    response_fields: Fields,
    *,
    heuristic: bool,
) -> str:
    """Why a shared cache must not store this response to a GET ("" when it may),
    RFC 9111 section 3, with the Authorization rule of section 3.5.

    Responses that set cookies are not stored either: one client's cookie would be
    served to others (what nginx and Varnish do by default)."""
    if status not in STORABLE_STATUSES:
        return "status"
    request_cc = CacheControl(request_fields)
    response_cc = CacheControl(response_fields)
    if "no-store" in request_cc or "no-store" in response_cc:
        return "no-store"
    if "private" in response_cc:
        return "private"
    if "*" in field_values(response_fields, "vary"):
        return "vary-star"
    if first_value(response_fields, "set-cookie") is not None:
        return "set-cookie"
    if first_value(request_fields, "authorization") is not None and not (
        "must-revalidate" in response_cc or "public" in response_cc or "s-maxage" in response_cc
    ):
        return "authorization"
    explicit = (
        "public" in response_cc
        or response_cc.seconds("s-maxage") is not None
        or response_cc.seconds("max-age") is not None
        or first_value(response_fields, "expires") is not None
    )
    if explicit:
        return ""
    if status in HEURISTIC_STATUSES:
        # Storable without freshness: stale at once, but revalidated with its validators
        # (and, with `heuristic`, fresh for a while).
        has_validator = first_value(response_fields, "etag") is not None or (
            first_value(response_fields, "last-modified") is not None
        )
        if has_validator or heuristic:
            return ""
    return "no-freshness"


def freshness_lifetime(fields: Fields, *, heuristic_fraction: float = 0.0) -> float:
    """How long the response is fresh from its generation (RFC 9111 section 4.2.1), for
    a shared cache: s-maxage, then max-age, then Expires less Date, then (when
    `heuristic_fraction` is above 0) that fraction of the time since Last-Modified."""
    cc = CacheControl(fields)
    for directive in ("s-maxage", "max-age"):
        seconds = cc.seconds(directive)
        if seconds is not None:
            return float(seconds)
        if directive in cc:  # present but invalid: treated as stale
            return 0.0
    expires_text = first_value(fields, "expires")
    if expires_text is not None:
        expires = parse_http_date(expires_text)
        date = parse_http_date(first_value(fields, "date"))
        if expires is None or date is None:
            return 0.0  # an invalid Expires (often "0") is in the past
        return max(0.0, expires - date)
    if heuristic_fraction > 0:
        last_modified = parse_http_date(first_value(fields, "last-modified"))
        date = parse_http_date(first_value(fields, "date"))
        if last_modified is not None and date is not None and date > last_modified:
            return (date - last_modified) * heuristic_fraction
    return 0.0


def initial_age(fields: Fields, request_time: float, response_time: float) -> float:
    """The response's age when it arrived (RFC 9111 section 4.2.3): the larger of its
    apparent age (arrival less Date) and its Age field plus the round trip."""
    date = parse_http_date(first_value(fields, "date"))
    apparent_age = max(0.0, response_time - date) if date is not None else 0.0
    age_text = first_value(fields, "age")
    age_value = int(age_text) if age_text is not None and age_text.isdigit() else 0
    corrected_age_value = age_value + max(0.0, response_time - request_time)
    return max(apparent_age, corrected_age_value)


def current_age(initial: float, response_time: float, now: float) -> float:
    """Its age now: the initial age plus the time it has been stored."""
    return initial + max(0.0, now - response_time)


def needs_validation(fields: Fields) -> bool:
    """The response must be validated before each reuse (`no-cache` without field
    names; with field names, only those fields would need it, and the cache takes the
    strict reading)."""
    return "no-cache" in CacheControl(fields)


def may_serve_stale(fields: Fields) -> bool:
    """Whether the response may ever be served stale by a shared cache: not with
    must-revalidate, proxy-revalidate or s-maxage (RFC 9111 sections 5.2.2.2, 5.2.2.8
    and 5.2.2.10), which also override RFC 5861's extensions."""
    cc = CacheControl(fields)
    return not (
        "must-revalidate" in cc or "proxy-revalidate" in cc or "s-maxage" in cc or "no-cache" in cc
    )


def stale_window(fields: Fields, directive: str, configured_max: float | None = None) -> float:
    """The seconds past its freshness a response may be served stale under RFC 5861's
    `stale-while-revalidate` or `stale-if-error` (0 when absent or not allowed);
    `configured_max` caps what the origin asks for."""
    if not may_serve_stale(fields):
        return 0.0
    seconds = CacheControl(fields).seconds(directive)
    if seconds is None:
        return 0.0
    window = float(seconds)
    return window if configured_max is None else min(window, configured_max)


def request_demands(fields: Fields, names: frozenset[str] | set[str]) -> RequestDemands:
    """The demands of a request whose lower-cased field names are `names`: the shared
    `NO_DEMANDS` when it sends neither Cache-Control nor Pragma (most requests), which
    saves parsing on every hit."""
    if "cache-control" not in names and "pragma" not in names:
        return NO_DEMANDS
    return RequestDemands(fields)


class RequestDemands:
    """What a request's own Cache-Control asks of a stored response (RFC 9111 section
    5.2.1): revalidation (`no-cache`, `max-age=0`), a maximum age, a minimum freshness
    left, an allowance of staleness, and `only-if-cached`."""

    __slots__ = ("max_age", "max_stale", "min_fresh", "no_cache", "only_if_cached")

    def __init__(self, fields: Fields) -> None:
        cc = CacheControl(fields)
        pragma_no_cache = "cache-control" not in {name.lower() for name, _ in fields} and any(
            value.lower() == "no-cache" for value in field_values(fields, "pragma")
        )
        self.no_cache = "no-cache" in cc or pragma_no_cache
        self.max_age = cc.seconds("max-age")
        self.min_fresh = cc.seconds("min-fresh") or 0
        self.only_if_cached = "only-if-cached" in cc
        if "max-stale" in cc:
            given = cc.seconds("max-stale")
            self.max_stale: float = float("inf") if given is None else float(given)
        else:
            self.max_stale = 0.0

    def satisfied(self, lifetime: float, age: float, stale_allowed: bool) -> bool:
        """Whether a response of this lifetime and age may be served without asking
        the origin."""
        if self.no_cache:
            return False
        if self.max_age is not None and age > self.max_age:
            return False
        left = lifetime - age
        if left - self.min_fresh > 0:
            return True
        return stale_allowed and self.max_stale > 0 and -left <= self.max_stale


NO_DEMANDS = RequestDemands([])  # (read only: nothing sets its attributes after this)


def entity_tags(value: str) -> list[str]:
    """The entity-tags of an If-None-Match or ETag value ("*" stays "*")."""
    return split_list(value)


def weak_match(left: str, right: str) -> bool:
    """Weak comparison of two entity-tags (RFC 9110 section 8.8.3.2): equal once `W/`
    is dropped."""
    return left.removeprefix("W/") == right.removeprefix("W/")


def not_modified(request_fields: Fields, stored_fields: Fields) -> bool:
    """Whether a client's conditional GET is answered 304 from the stored response
    (RFC 9111 section 4.3.2, RFC 9110 section 13.2.2): If-None-Match by weak comparison
    when present, else If-Modified-Since against Last-Modified (or Date)."""
    if_none_match = first_value(request_fields, "if-none-match")
    if if_none_match is not None:
        etag = first_value(stored_fields, "etag")
        tags = entity_tags(if_none_match)
        if "*" in tags:
            return True
        return etag is not None and any(weak_match(tag, etag) for tag in tags)
    since = parse_http_date(first_value(request_fields, "if-modified-since"))
    if since is None:
        return False
    modified = parse_http_date(first_value(stored_fields, "last-modified"))
    if modified is None:
        modified = parse_http_date(first_value(stored_fields, "date"))
    return modified is not None and modified <= since


# Fields a 304 answer carries over from the stored response (RFC 9110 section 15.4.5).
NOT_MODIFIED_FIELDS = frozenset(
    ("cache-control", "content-location", "date", "etag", "expires", "vary", "last-modified")
)


def not_modified_fields(stored_fields: Fields) -> list[tuple[str, str]]:
    """The fields of a 304 made from a stored response."""
    return [(name, value) for name, value in stored_fields if name.lower() in NOT_MODIFIED_FIELDS]


def validators(stored_fields: Fields) -> list[tuple[str, str]]:
    """The conditional fields that revalidate a stored response with its origin."""
    conditions: list[tuple[str, str]] = []
    etag = first_value(stored_fields, "etag")
    if etag is not None:
        conditions.append(("If-None-Match", etag))
    last_modified = first_value(stored_fields, "last-modified")
    if last_modified is not None:
        conditions.append(("If-Modified-Since", last_modified))
    return conditions


def updated_fields(stored_fields: Fields, fresh_fields: Fields) -> list[tuple[str, str]]:
    """The stored fields freshened by a 304's (RFC 9111 section 3.2): each field the
    304 has replaces every stored field of that name, except the framing and coding."""
    replaced = {name.lower() for name, _ in fresh_fields} - NOT_UPDATED_BY_304
    kept = [(name, value) for name, value in stored_fields if name.lower() not in replaced]
    added = [(name, value) for name, value in fresh_fields if name.lower() in replaced]
    return kept + added


def validator_matches(stored_fields: Fields, fresh_fields: Fields) -> bool:
    """Whether a 304 is about the stored response: its ETag, if it sends one, is the
    stored one (RFC 9111 section 4.3.4)."""
    fresh = first_value(fresh_fields, "etag")
    if fresh is None:
        return True
    stored = first_value(stored_fields, "etag")
    return stored is not None and weak_match(fresh, stored)


def vary_names(fields: Fields) -> tuple[str, ...]:
    """The request fields a response varies on, lower-cased and sorted."""
    return tuple(sorted({name.lower() for name in field_values(fields, "vary")}))


def vary_values(names: Iterable[str], request_fields: Fields) -> tuple[str, ...]:
    """The request's values of the `names` a response varies on, normalised (members
    joined with ", ", so that spacing and splitting into fields do not matter; an
    absent field is "" and matches only its absence... and an empty field)."""
    return tuple(", ".join(field_values(request_fields, name)) for name in names)


def whole_seconds(ttl: float) -> int:
    """A Cache-Status ttl in whole seconds: rounded towards zero when fresh, away from
    it when stale (a response 0.2 s stale has ttl=-1)."""
    return int(ttl) if ttl >= 0 else -int(-ttl + 0.999999)


def hit_status(name: str, ttl: float) -> str:
    """`cache_status(name, hit=True, ttl=ttl)`, the answer of every fresh hit, built
    directly."""
    return f"{name}; hit; ttl={whole_seconds(ttl)}"


def cache_status(
    name: str,
    *,
    hit: bool = False,
    fwd: str = "",
    fwd_status: int = 0,
    ttl: float | None = None,
    stored: bool = False,
    collapsed: bool = False,
    detail: str = "",
) -> str:
    """One member of a Cache-Status field (RFC 9211)."""
    parts = [name]
    if hit:
        parts.append("hit")
    if fwd:
        parts.append(f"fwd={fwd}")
    if fwd_status:
        parts.append(f"fwd-status={fwd_status}")
    if ttl is not None:
        parts.append(f"ttl={whole_seconds(ttl)}")
    if stored:
        parts.append("stored")
    if collapsed:
        parts.append("collapsed")
    if detail:
        parts.append(f"detail={detail}")
    return "; ".join(parts)
