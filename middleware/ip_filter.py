"""`ip_filter`: allow or deny requests by client address (nginx's `allow`/`deny`).

Evaluation: an address inside a `deny` range is refused; then, when `allow` is given, an
address outside every `allow` range is refused; everything else passes. So `deny` wins
over `allow`, and the order of entries does not matter (unlike nginx, where the first
matching rule wins; here a narrower deny inside a wider allow is the usual way to punch a
hole, and it works whichever is written first).

The client address is `Request.client`, decided once per request for every consumer by
the top-level `client_ip` section (proxy/core/client_ip.py): the connection's peer, or behind
`client_ip.trusted_proxies` the address they forwarded. When it cannot be known (a
trusted proxy forwarded something that is not an address) the request is refused. A
refusal is a 403 local reply with reason `ip_forbidden`.

The filter once had a `trusted_proxies` option of its own. It is a config error now that
names its new place: two trust lists (one here, one for rate limits and logs) would let
the filter and everything else disagree about who the client is.
"""

from __future__ import annotations

import logging
from typing import ClassVar

from proxy import (
    ADDRESS_CACHE_ENTRIES,
    Address,
    AddressSet,
    Handler,
    IpForbidden,
    Network,
    Option,
    Options,
    Reported,
    Request,
    Response,
    parse_address,
    parse_network,
)

log = logging.getLogger(__name__)

# Verdicts remembered per client address text (keep-alive clients repeat theirs); the
# table is bounded, as the addresses come from the network, and simply starts over.
VERDICT_CACHE_ENTRIES = ADDRESS_CACHE_ENTRIES


def read_networks(options: Options, key: str) -> AddressSet | None:
    """Option `key`: a list of addresses and CIDR ranges (one string reads as a list of
    one), each checked at load with its own line in the error; None when absent (or
    broken: the errors are recorded). An empty list is an error: it would match nothing,
    which is never what a filter means."""
    items = options.items(key)
    if items is None:
        return None
    networks: list[Network] = []
    failed = False
    for node, path in items:
        try:
            networks.append(
                options.reader.convert(node, path, parse_network, "an IP address or CIDR range")
            )
        except Reported:
            failed = True
    if failed:
        options.failed = True
        return None
    if not networks:
        options.error(key, "must list at least one address or CIDR range")
        return None
    return AddressSet(networks)


class IpFilter:
    """Refuses requests whose client address is denied, or not allowed."""

    # It decides who gets through: no cache may come before it in a chain
    # (proxy/plugin/base.py).
    ACCESS_CONTROL: ClassVar[bool] = True

    OPTIONS: ClassVar[dict[str, Option]] = {
        "allow": Option.strings("addresses and CIDR ranges allowed (others: 403)"),
        "deny": Option.strings("addresses and CIDR ranges refused (403), checked first"),
        # Refused, see above: accepted as a key only to say where it went.
        "trusted_proxies": Option.raw(
            "moved to the top-level client_ip.trusted_proxies (an error here)", {"not": {}}
        ),
    }
    EAGER = True  # awaits nothing but call_next (proxy/exchange/eager.py)

    def __init__(self, options: Options) -> None:
        self.name = options.name
        self.allow = read_networks(options, "allow")
        self.deny = read_networks(options, "deny")
        if "allow" not in options and "deny" not in options:
            options.error(None, "give 'allow', 'deny' or both")
        if "trusted_proxies" in options:
            options.error(
                "trusted_proxies",
                "moved to the top-level 'client_ip: {trusted_proxies: [...]}', which decides"
                " the client for every middleware, the access log and X-Forwarded-For",
            )
        self._verdicts: dict[str, bool] = {}

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
        client = request.client[0]
        allowed = self._verdicts.get(client)
        if allowed is None:
            allowed = self._remember(client)
        if not allowed:
            log.debug("%s: refused client %s", self.name, client or "unknown")
            raise IpForbidden("client address not allowed")
        return await call_next(request)

    def _remember(self, client: str) -> bool:
        allowed = self.permits(parse_address(client))
        cache = self._verdicts
        if len(cache) >= VERDICT_CACHE_ENTRIES:
            cache.clear()
        cache[client] = allowed
        return allowed
