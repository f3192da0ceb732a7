"""`ip_filter`: allow or deny requests by client address (nginx's `allow`/`deny`).

Evaluation: an address inside a `deny` range is refused; then, when `allow` is given, an
address outside every `allow` range is refused; everything else passes. So `deny` wins
over `allow`, and the order of entries does not matter (unlike nginx, where the first
matching rule wins; here a narrower deny inside a wider allow is the usual way to punch a
hole, and it works whichever is written first).

The client address is the connection's peer, or behind `trusted_proxies` the rightmost
untrusted X-Forwarded-For entry (middleware/client_ip.py). When it cannot be known (a
trusted proxy forwarded something that is not an address) the request is refused.
A refusal is a 403 local reply with reason `ip_forbidden`.
"""

from __future__ import annotations

import logging

from middleware.base import Handler
from middleware.client_ip import (
    ADDRESS_CACHE_ENTRIES,
    Address,
    ClientIp,
    format_address,
    parse_address,
    read_networks,
)
from middleware.options import Options
from proxy.errors import IpForbidden
from proxy.models import Request, Response

log = logging.getLogger(__name__)

# Verdicts remembered per peer address text (keep-alive clients repeat theirs); the table
# is bounded, as the addresses come from the network, and simply starts over.
VERDICT_CACHE_ENTRIES = ADDRESS_CACHE_ENTRIES


class IpFilter:
    """Refuses requests whose client address is denied, or not allowed."""

    OPTIONS = ("allow", "deny", "trusted_proxies")
    EAGER = True  # awaits nothing but call_next (proxy/eager.py)

    def __init__(self, options: Options) -> None:
        self.name = options.name
        self.allow = read_networks(options, "allow")
        self.deny = read_networks(options, "deny")
        self.client_ip = ClientIp(read_networks(options, "trusted_proxies"))
        if "allow" not in options and "deny" not in options:
            options.error(None, "give 'allow', 'deny' or both")
        # Without trusted proxies the verdict depends on the peer address alone.
        self._by_peer: dict[str, bool] | None = {} if self.client_ip.trusted is None else None

    def __repr__(self) -> str:
        return f"<IpFilter {self.name} allow={self.allow!r} deny={self.deny!r}>"

    def permits(self, address: Address | None) -> bool:
        """The verdict for one client address (None: unknown, refused)."""
        if address is None:
            return False
        deny = self.deny
        if deny is not None and address in deny:
            return False
        allow = self.allow
        return allow is None or address in allow

    async def __call__(self, request: Request, call_next: Handler) -> Response:
        cache = self._by_peer
        if cache is not None:
            peer = request.client[0]
            allowed = cache.get(peer)
            if allowed is None:
                allowed = self._remember(cache, peer)
        else:
            allowed = self.permits(self.client_ip.address(request))
        if not allowed:
            if log.isEnabledFor(logging.DEBUG):
                address = self.client_ip.address(request)
                who = format_address(address) if address is not None else "unknown"
                log.debug("%s: refused client %s", self.name, who)
            raise IpForbidden("client address not allowed")
        return await call_next(request)

    def _remember(self, cache: dict[str, bool], peer: str) -> bool:
        allowed = self.permits(parse_address(peer))
        if len(cache) >= VERDICT_CACHE_ENTRIES:
            cache.clear()
        cache[peer] = allowed
        return allowed
