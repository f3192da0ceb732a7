"""`listeners[i].tls.acme`: certificates from an ACME server (proxy/acme/), read into an
`AcmeConfig`, and the checks that span listeners.

Each value is checked as far as it can be without the network, so that `gatehouse check`
finds what would otherwise fail at the first order:

- `directory` is an https:// URL (RFC 8555 section 6.1: ACME runs over HTTPS);
- `domains` are DNS names, at least two labels, lower-cased, without a trailing dot;
  a wildcard needs the dns-01 challenge and an IP address a CA that issues for one,
  neither of which the gateway does, so both are refused, as is a name listed twice;
- `email` looks like an address (the CA refuses a malformed contact at registration);
- `storage` is a directory the gateway can write, or can be made in one;
- `ca` is a readable PEM bundle;
- `challenge: http-01` needs a plaintext listener, where the validator's request for
  port 80 arrives;
- one name in one storage for one server is one certificate: two listeners that list it
  must give it the same settings.
"""

from __future__ import annotations

import os
import re
from functools import partial
from urllib.parse import urlsplit

from yaml.nodes import MappingNode, Node, ScalarNode

from proxy.config.keys import ACME
from proxy.config.model import (
    ACME_CHALLENGES,
    DEFAULT_ACME_RENEW_BEFORE_S,
    AcmeConfig,
    ListenerConfig,
)
from proxy.config.reader import NodeReader, Reported
from proxy.config.spec import keys_of, required_of
from proxy.config.values import ca_bundle_problem

_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_IPV4ISH = re.compile(r"[0-9.]+")
_EMAIL = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+")
MAX_NAME_LENGTH = 253


def read_acme(reader: NodeReader, node: Node, path: str) -> AcmeConfig:
    """`tls.acme`.

    Raises:
        Reported: a value is invalid (recorded).
    """
    fields = reader.mapping(node, path, keys_of(ACME), required_of(ACME))
    directory = fields.get("directory", partial(_directory, reader), "")
    no_domains: tuple[str, ...] = ()
    domains = fields.get("domains", partial(_domains, reader), no_domains)
    storage = fields.get("storage", partial(_storage, reader), "")
    email = fields.get("email", partial(_email, reader), None)
    challenge = fields.get("challenge", partial(_challenge, reader), ACME_CHALLENGES[0])
    ca = fields.get("ca", partial(_ca, reader), None)
    renew_before = fields.get(
        "renew_before", partial(reader.duration, positive=True), DEFAULT_ACME_RENEW_BEFORE_S
    )
    if not (directory and domains and storage):
        raise Reported
    return AcmeConfig(directory, domains, storage, email, challenge, ca, renew_before)


def _directory(reader: NodeReader, node: Node, path: str) -> str:
    url = reader.string(node, path).strip()
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (raises for a port that is not a number in range)
    except ValueError as exc:
        raise reader.error(node, path, f"invalid directory URL {url!r}: {exc}") from None
    if parts.scheme != "https" or not parts.hostname:
        message = f"the directory must be an https:// URL (RFC 8555 section 6.1), not {url!r}"
        raise reader.error(node, path, message)
    return url


def _domains(reader: NodeReader, node: Node, path: str) -> tuple[str, ...]:
    items = [(node, path)]
    if not isinstance(node, ScalarNode):
        items = reader.nonempty_items(node, path, "must list at least one name")
    names: dict[str, str] = {}
    failed = False
    for item, item_path in items:
        try:
            name = _domain(reader, item, item_path)
            if name in names:
                raise reader.error(
                    item, item_path, f"{name!r} is listed twice (also {names[name]})"
                )
            names[name] = item_path
        except Reported:
            failed = True
    if failed:
        raise Reported
    return tuple(names)


def _domain(reader: NodeReader, node: Node, path: str) -> str:
    written = reader.string(node, path).strip()
    name = written.lower().removesuffix(".")
    if name.startswith("*."):
        raise reader.error(
            node, path, f"{written!r}: a wildcard needs the dns-01 challenge, which is not offered"
        )
    if _IPV4ISH.fullmatch(name) or ":" in name:
        raise reader.error(node, path, f"{written!r}: ACME certificates here are for DNS names")
    labels = name.split(".")
    if (
        len(name) > MAX_NAME_LENGTH
        or len(labels) < 2
        or not all(_LABEL.fullmatch(label) for label in labels)
    ):
        message = f"{written!r} is not a DNS name like 'api.example.com'"
        raise reader.error(node, path, message)
    return name


def _email(reader: NodeReader, node: Node, path: str) -> str:
    email = reader.string(node, path).strip().removeprefix("mailto:")
    if not _EMAIL.fullmatch(email):
        raise reader.error(node, path, f"{email!r} is not an email address")
    return email


def _challenge(reader: NodeReader, node: Node, path: str) -> str:
    return reader.choice(node, path, ACME_CHALLENGES, "challenge")


def _storage(reader: NodeReader, node: Node, path: str) -> str:
    """A directory that is, or can be made, writable by this process."""
    storage = reader.string(node, path).strip()
    if not storage:
        raise reader.error(node, path, "must name a directory")
    existing = storage
    while not os.path.exists(existing):
        parent = os.path.dirname(os.path.abspath(existing))
        if parent == os.path.abspath(existing):
            break
        existing = parent
    if not os.path.isdir(existing):
        raise reader.error(node, path, f"{existing!r} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise reader.error(node, path, f"{existing!r} is not writable by this process")
    return storage


def _ca(reader: NodeReader, node: Node, path: str) -> str:
    ca = reader.readable_file(node, path)
    problem = ca_bundle_problem(ca)
    if problem is not None:
        raise reader.error(node, path, problem)
    return ca


def check_listeners(reader: NodeReader, listeners: list[tuple[ListenerConfig, Node, str]]) -> None:
    """The checks of `tls.acme` that span listeners: (listener, its node, its key path)
    each. Errors are recorded."""
    plaintext = any(listener.tls is None for listener, _, _ in listeners)
    settings: dict[tuple[str, str, str], tuple[AcmeConfig, str]] = {}
    for listener, node, path in listeners:
        acme = listener.tls.acme if listener.tls is not None else None
        if acme is None:
            continue
        acme_node, acme_path = _child(_child(node, "tls"), "acme"), f"{path}.tls.acme"
        if acme.challenge == "http-01" and not plaintext:
            reader.error(
                _child(acme_node, "challenge") or acme_node,
                f"{acme_path}.challenge",
                "http-01 is answered on port 80: it needs a plaintext listener (or use"
                " tls-alpn-01)",
            )
        for name in acme.domains:
            key = (acme.storage, acme.directory, name)
            other = settings.setdefault(key, (acme, acme_path))
            if not other[0].same_settings(acme):
                reader.error(
                    acme_node,
                    acme_path,
                    f"{name!r} is also obtained by {other[1]} with other settings: one name"
                    " in one storage is one certificate",
                )


def _child(node: Node | None, key: str) -> Node | None:
    """The value of `key` in the mapping `node` (None: not there)."""
    if not isinstance(node, MappingNode):
        return None
    for key_node, value in node.value:
        if isinstance(key_node, ScalarNode) and key_node.value == key:
            found: Node = value
            return found
    return None
