"""The client of a request, decided once (`client_ip:` in routes.yaml).

Every consumer of "the client's address" (ip_filter, rate_limit `key: ip`, the access
log, `hash` balancing by ip, the `headers` middleware's `{client_ip}`, forward_auth)
reads `Request.client`, and this module is the one place that sets it:

- Without a `client_ip` section nobody is trusted: the client is the connection's peer,
  and what a request says about where it came from is never believed.
- The peer: the TCP peer of the connection, or, on a listener with
  `proxy_protocol: true`, the source address its PROXY protocol header gave, when the
  TCP peer that sent that header is in `trusted_proxies` (proxy/frontend/listener.py). A
  believed header stands for the connection as if the client had connected directly
  (HAProxy's `accept-proxy`, Envoy's proxy_protocol filter); a header from any other
  peer is read and ignored.
- `source: x-forwarded-for` (the default) or `source: forwarded`: only when the peer is
  in `trusted_proxies` is that header read, from the right, skipping the addresses
  inside `trusted_proxies`; the first address that is not trusted is the client (nginx
  `real_ip_recursive on`, MDN's "rightmost untrusted"). The leftmost entries are
  whatever the client chose to write, so a spoofed entry never wins unless every hop to
  its right is trusted. A trusted peer that sends no such header is itself the client.
- `source: proxy_protocol`: no header is read; the client is the peer as the PROXY
  header gave it.

The client is unknown (`UNKNOWN_CLIENT`, an empty address that ip_filter refuses) when a
trusted hop forwarded something that is not an address (`unknown`, an obfuscated
`Forwarded` node, garbage, a malformed `Forwarded` value), or when more than
MAX_FORWARDED_HOPS trusted hops were walked.

The cost: without `client_ip`, nothing at all (the front ends test for None). With it,
a request from an untrusted peer costs one dict lookup; one from a trusted peer adds a
scan of its raw header fields, and walks are remembered per peer and header value
(keep-alive clients and busy proxies repeat theirs).

`Request.peer_trusted` records the peer's standing for the forwarding headers
(proxy/core/headers.py): what a trusted peer forwarded is kept and this hop appended; what an
untrusted one sent is replaced.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from proxy.config.model import ClientIpConfig
from proxy.core.addresses import (
    AddressSet,
    format_address,
    parse_address,
    parse_forwarded_entry,
    remember,
)
from proxy.core.forwarded import MalformedForwarded, forwarded_for_nodes

if TYPE_CHECKING:
    from proxy.core.models import Request

# Entries walked at most: a legitimate chain has a handful of proxies, and a client can
# pad the header with addresses it knows are trusted to make us walk it all.
MAX_FORWARDED_HOPS = 32
# Forwarded chains longer than this are walked every time, not remembered: the table's
# keys must not hold megabytes a padded header brought.
MAX_REMEMBERED_VALUE_CHARS = 1024
# The client when it cannot be known (see the module docstring).
UNKNOWN_CLIENT = ("", 0)

_HEADERS = {"x-forwarded-for": "X-Forwarded-For", "forwarded": "Forwarded"}


class ClientResolver:
    """Sets `Request.client` (and `peer_trusted`) from a `client_ip` config: see the
    module docstring. Built once per loaded config; its tables are bounded by
    ADDRESS_CACHE_ENTRIES and start over when full, as their keys come from the network."""

    __slots__ = ("_chains", "_field", "_name", "_peers", "config", "source", "trusted")

    def __init__(self, config: ClientIpConfig) -> None:
        self.config = config
        self.source = config.source
        self.trusted = AddressSet(config.trusted_proxies)
        # The header read behind a trusted peer (None: proxy_protocol reads none).
        name = _HEADERS.get(config.source)
        self._name = name
        self._field = name.lower().encode() if name is not None else None
        self._peers: dict[str, bool] = {}  # peer text -> is it a trusted proxy
        # (peer text, header value) -> the client; None: the peer itself
        self._chains: dict[tuple[str, str], tuple[str, int] | None] = {}

    def __repr__(self) -> str:
        return f"<ClientResolver {self.source} trusted={self.trusted!r}>"

    def trusts(self, peer: str) -> bool:
        """Whether `peer` (an address as text) is in `trusted_proxies`."""
        known = self._peers.get(peer)
        if known is None:
            address = parse_address(peer)
            known = address is not None and address in self.trusted
            remember(self._peers, peer, known)
        return known

    def __call__(self, request: Request) -> None:
        """Decide `request.client` and `request.peer_trusted` (called by the front ends
        once per request, before anything reads them)."""
        peer = request.peer[0]
        trusted = self._peers.get(peer)
        if trusted is None:
            trusted = self.trusts(peer)
        if not trusted:
            return  # the client is the peer, as the request was made
        request.peer_trusted = True
        field = self._field
        if field is None:
            return
        value = _field_value(request, field, self._name or "")
        if value is None:
            return  # a trusted proxy's own request (a health check, say)
        if len(value) > MAX_REMEMBERED_VALUE_CHARS:
            client = self._walk(value)  # too long to keep as a key (a padded header)
        else:
            key = (peer, value)
            chains = self._chains
            if key in chains:
                client = chains[key]
            else:
                client = self._walk(value)
                remember(chains, key, client)
        if client is not None:
            request.client = client

    def _walk(self, value: str) -> tuple[str, int] | None:
        """The client named by a header `value` that a trusted peer sent (None: the peer)."""
        entries: list[str | None]
        if self._field == b"forwarded":
            try:
                nodes, more = forwarded_for_nodes(value, MAX_FORWARDED_HOPS)
            except MalformedForwarded:
                return UNKNOWN_CLIENT
            entries = [node or None for node in nodes]  # `for=""` names no one
        else:
            # Only the entries we may walk are split off (the header can be long).
            parts = value.rsplit(",", MAX_FORWARDED_HOPS)
            more = len(parts) > MAX_FORWARDED_HOPS
            entries = [part.strip() for part in (parts[1:] if more else parts)]
        return walk(entries, more, self.trusted)


def walk(entries: list[str | None], more: bool, trusted: AddressSet) -> tuple[str, int] | None:
    """The rightmost untrusted entry of a forwarded chain (`entries` oldest first; `more`:
    older entries were left out), as a client address; the leftmost when every entry is
    trusted; None for an empty chain (the peer is the client); UNKNOWN_CLIENT when an
    entry is not an address (written by someone untrusted: we cannot tell who it was),
    or every entry walked was trusted and there are more."""
    client = None
    for entry in reversed(entries):
        if entry is None:
            return UNKNOWN_CLIENT
        if not entry:
            continue  # empty list elements are allowed (RFC 9110 section 5.6.1)
        address = parse_forwarded_entry(entry)
        if address is None:
            return UNKNOWN_CLIENT
        if address not in trusted:
            return format_address(address), 0
        client = address
    if more:
        return UNKNOWN_CLIENT
    # Every hop is trusted: the request began inside, at the leftmost.
    return (format_address(client), 0) if client is not None else None


def _field_value(request: Request, field: bytes, name: str) -> str | None:
    """Every `field` line of the request joined with "," (a list header may be split
    across lines, RFC 9110 section 5.3), or None without one. Raw headers stay raw."""
    raw = request.raw_headers
    if raw is None:
        values = request.headers.getall(name, None)
        if not values:
            return None
        return values[0] if len(values) == 1 else ",".join(values)
    size = len(field)
    # The lines are joined once: joining as they come would cost time quadratic in the
    # number of lines a proxy (or a client behind it) repeats.
    lines = [value for key, value in raw if len(key) == size and key.lower() == field]
    if not lines:
        return None
    return (lines[0] if len(lines) == 1 else b",".join(lines)).decode("latin-1")
