"""What `compress` decides from header fields alone: the coding a client's Accept-Encoding
selects among those the gateway offers, and whether a response's media type is one to
compress.

Accept-Encoding is read as RFC 9110 section 12.5.3 writes it: a list of codings, each
with an optional weight (`;q=0.5`, three decimals at most, 0 to 1), names compared
without regard to case, `x-gzip` taken as `gzip` (section 8.4.1.3), `*` standing for
every coding the list does not name, and `q=0` meaning "not acceptable". Among the
offered codings with the highest weight the gateway's own order decides. A list that
prefers `identity` to every offered coding gets no coding. An element that cannot be read
(a weight that is not a qvalue, a name that is not a token) is left out as if absent: a
malformed field never fails the request, and reading it is one pass over its text.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

# RFC 9110 section 5.6.2: token.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# RFC 9110 section 12.4.2: qvalue = ( "0" [ "." 0*3DIGIT ] ) / ( "1" [ "." 0*3("0") ] )
_QVALUE = re.compile(r"0(?:\.[0-9]{0,3})?|1(?:\.0{0,3})?")
# RFC 9110 section 8.4.1.3: a recipient SHOULD treat x-gzip as gzip.
_ALIASES = {"x-gzip": "gzip"}

# Distinct Accept-Encoding values are few (one per browser family); the choice for each
# is remembered, up to this many values of at most CACHED_VALUE_CHARS characters.
CACHED_VALUES = 256
CACHED_VALUE_CHARS = 256


def weights(value: str) -> dict[str, float]:
    """The codings `value` names, lowercased, with their weights (the first mention of a
    coding counts). Elements that cannot be read are left out."""
    found: dict[str, float] = {}
    for element in value.split(","):
        coding, _, parameters = element.partition(";")
        coding = coding.strip().lower()
        if not coding or not _TOKEN.fullmatch(coding):
            continue
        weight = _weight(parameters) if parameters else 1.0
        if weight is None:
            continue
        found.setdefault(_ALIASES.get(coding, coding), weight)
    return found


def _weight(parameters: str) -> float | None:
    """The `q` of an element's parameters (1 without one); None when it is not a qvalue.
    Other parameters (RFC 9110 allows none) are passed over."""
    for parameter in parameters.split(";"):
        name, _, text = parameter.partition("=")
        if name.strip().lower() == "q":
            text = text.strip()
            return float(text) if _QVALUE.fullmatch(text) else None
    return 1.0


def choose(value: str, offered: Sequence[str]) -> str:
    """The coding of `offered` (in the gateway's order of preference) that the
    Accept-Encoding `value` prefers, or "" for none (send the response as it is)."""
    named = weights(value)
    if not named:
        return ""
    default = named.get("*", 0.0)
    best, best_weight = "", 0.0
    for coding in offered:
        weight = named.get(coding, default)
        if weight > best_weight:  # a tie keeps the earlier, preferred, coding
            best, best_weight = coding, weight
    identity = named.get("identity")
    if best and identity is not None and identity > best_weight:
        return ""
    return best


class Negotiator:
    """`choose` for one list of offered codings, remembering the answer for the few
    Accept-Encoding values clients actually send."""

    __slots__ = ("_choices", "offered")

    def __init__(self, offered: Sequence[str]) -> None:
        self.offered = tuple(offered)
        self._choices: dict[str, str] = {}

    def choose(self, values: Iterable[str]) -> str:
        """The coding for a request's Accept-Encoding field lines (none: "")."""
        value = ",".join(values)
        if not value:
            return ""
        chosen = self._choices.get(value)
        if chosen is None:
            chosen = choose(value, self.offered)
            if len(value) <= CACHED_VALUE_CHARS and len(self._choices) < CACHED_VALUES:
                self._choices[value] = chosen
        return chosen


class MediaTypes:
    """A set of media types to compress, from patterns: `type/subtype`, `type/*`, or
    `type/*+suffix` (`application/*+json`: every JSON-based type)."""

    __slots__ = ("_exact", "_suffixes", "_types", "patterns")

    def __init__(self, patterns: Iterable[str]) -> None:
        self.patterns = tuple(pattern.lower() for pattern in patterns)
        exact: set[str] = set()
        types: set[str] = set()
        suffixes: set[tuple[str, str]] = set()
        for pattern in self.patterns:
            kind, _, subtype = pattern.partition("/")
            if subtype == "*":
                types.add(kind)
            elif subtype.startswith("*+"):
                suffixes.add((kind, subtype[1:]))
            else:
                exact.add(pattern)
        self._exact = frozenset(exact)
        self._types = frozenset(types)
        self._suffixes = tuple(sorted(suffixes))

    def __contains__(self, content_type: object) -> bool:
        """Whether a Content-Type value (parameters ignored) is one of the set."""
        if not isinstance(content_type, str):
            return False
        media = content_type.partition(";")[0].strip().lower()
        if media in self._exact:
            return True
        kind, _, subtype = media.partition("/")
        if not subtype:
            return False
        if kind in self._types:
            return True
        return any(kind == k and subtype.endswith(s) for k, s in self._suffixes)


def media_pattern_problem(pattern: str) -> str | None:
    """Why `pattern` is not a media type pattern `MediaTypes` takes, or None."""
    kind, slash, subtype = pattern.partition("/")
    if not slash or not _TOKEN.fullmatch(kind) or "*" in kind:
        return f"{pattern!r} is not a media type: write type/subtype, type/* or type/*+suffix"
    if subtype == "*" or (subtype.startswith("*+") and _TOKEN.fullmatch(subtype[2:])):
        return None
    if "*" in subtype or not _TOKEN.fullmatch(subtype):
        return f"{pattern!r} is not a media type: write type/subtype, type/* or type/*+suffix"
    return None
