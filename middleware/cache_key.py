"""What names a cached response (the `key` option of `cache`): the method, the host, the
path, the query (sorted or as sent, with parameters kept or dropped) and chosen request
fields, written as one line of text that purges can match by prefix:

    GET api.example.com/users/1?a=1&b=2 accept-language=en

The parts are separated by spaces (a canonical target has none), the header parts are
`name=value` with the name lower-cased.
"""

from __future__ import annotations

from collections.abc import Sequence

from proxy import Request

QUERY_FORMS = ("sorted", "as_sent", "none")


class KeySpec:
    """Which parts of a request make its key."""

    __slots__ = ("headers", "host", "method", "query", "query_drop", "query_keep")

    def __init__(
        self,
        *,
        method: bool = True,
        host: bool = True,
        query: str = "sorted",
        query_keep: Sequence[str] = (),
        query_drop: Sequence[str] = (),
        headers: Sequence[str] = (),
    ) -> None:
        self.method = method
        self.host = host
        self.query = query
        self.query_keep = frozenset(query_keep)
        self.query_drop = frozenset(query_drop)
        self.headers = tuple(name.lower() for name in headers)

    def __repr__(self) -> str:
        return (
            f"<KeySpec method={self.method} host={self.host} query={self.query} "
            f"keep={sorted(self.query_keep)} drop={sorted(self.query_drop)} "
            f"headers={self.headers}>"
        )

    def key(self, request: Request, method: str | None = None) -> str:
        """The key of `request` (as if its method were `method`, when given)."""
        head = (method or request.method) + " " if self.method else ""
        host = request.host.lower() if self.host else ""
        query = self.query_part(request.query)
        key = f"{head}{host}{request.path}{'?' + query if query else ''}"
        for name in self.headers:
            key += f" {name}={request.header(name) or ''}"
        return key

    def query_part(self, query: str) -> str:
        """The query as the key has it."""
        if not query or self.query == "none":
            return ""
        if self.query == "as_sent" and not self.query_keep and not self.query_drop:
            return query
        pairs = [pair for pair in query.split("&") if pair]
        if self.query_keep:
            pairs = [pair for pair in pairs if pair.partition("=")[0] in self.query_keep]
        if self.query_drop:
            pairs = [pair for pair in pairs if pair.partition("=")[0] not in self.query_drop]
        if self.query == "sorted":
            pairs.sort()
        return "&".join(pairs)
