"""`etcd://HOST:PORT[,HOST:PORT...]/PREFIX/KEY`: where an etcd v3 key is, as the command
line names it. The key is the URL's path as written, its leading slash included
(`etcd://127.0.0.1:2379/gatehouse/routes.yaml` is the key `/gatehouse/routes.yaml`), so
that `etcdctl get /gatehouse/routes.yaml` finds the same. Several endpoints, comma-separated,
are members of one cluster, tried in turn.

Credentials never go in the URL (it is logged and labels metrics): they come from
GATEHOUSE_ETCD_USER and GATEHOUSE_ETCD_PASSWORD (proxy/source/etcd_client.py).
"""

from __future__ import annotations

from dataclasses import dataclass

SCHEME = "etcd://"
DEFAULT_PORT = 2379


class EtcdUrlError(ValueError):
    """The location is not an etcd URL this client can use (the message says why)."""


@dataclass(frozen=True, slots=True)
class EtcdLocation:
    """The parsed URL: one or more (host, port) members, and the key."""

    endpoints: tuple[tuple[str, int], ...]
    key: str

    @property
    def url(self) -> str:
        """The URL in its normal form: what logs, errors and metric labels carry."""
        members = ",".join(_member(host, port) for host, port in self.endpoints)
        return f"{SCHEME}{members}{self.key}"

    def at(self, revision: int) -> str:
        """The name a document read at `revision` carries in its errors."""
        return f"{self.url}@{revision}"


def _member(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_etcd_url(location: str) -> EtcdLocation:
    """`location` as an EtcdLocation.

    Raises:
        EtcdUrlError: not `etcd://`, no key, credentials in it, a query or fragment, or a
            member that is not HOST[:PORT] with a port from 1 to 65535.
    """
    if not location.startswith(SCHEME):
        raise EtcdUrlError(f"{location}: expected etcd://HOST:PORT/KEY")
    rest = location[len(SCHEME) :]
    if "?" in rest or "#" in rest:
        raise EtcdUrlError(f"{location}: an etcd URL takes no query or fragment")
    members, slash, path = rest.partition("/")
    if "@" in members:
        raise EtcdUrlError(
            f"{location}: credentials do not go in the URL (it is logged): set "
            "GATEHOUSE_ETCD_USER and GATEHOUSE_ETCD_PASSWORD"
        )
    if not slash or not path.strip("/"):
        raise EtcdUrlError(f"{location}: no key: expected etcd://HOST:PORT/PREFIX/KEY")
    if not members:
        raise EtcdUrlError(f"{location}: no host: expected etcd://HOST:PORT/KEY")
    endpoints = tuple(_parse_member(location, member) for member in members.split(","))
    return EtcdLocation(endpoints, "/" + path)


def _parse_member(location: str, member: str) -> tuple[str, int]:
    if member.startswith("["):
        host, bracket, tail = member[1:].partition("]")
        if not bracket or (tail and not tail.startswith(":")):
            raise EtcdUrlError(f"{location}: {member!r}: expected [IPV6]:PORT")
        port_text = tail[1:]
    else:
        host, _, port_text = member.partition(":")
    if not host:
        raise EtcdUrlError(f"{location}: {member!r}: no host")
    if not port_text:
        return host, DEFAULT_PORT
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise EtcdUrlError(f"{location}: {member!r}: the port must be 1 to 65535")
    return host, int(port_text)
