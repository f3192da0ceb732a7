"""The certificates of one TLS listener, and the choice among them by SNI.

A TLS listener serves one or more certificates (`tls.certificates`, or the `cert`/`key`
shorthand for one). Each certificate is loaded into an `ssl.SSLContext` of its own; the
listener's socket gets a further context, `CertificateSet.context`, which holds no
certificate, only the listener's settings and an `sni_callback`. At every handshake,
once the ClientHello is read, the callback picks a certificate for the name the client
sent (SNI) and moves the connection onto that certificate's context
(`ssl_object.context = ...`; OpenSSL's `SSL_set_SSL_CTX`), before the ServerHello.

How a certificate is chosen for a server name:

1. the names a certificate answers for are its subjectAltName's DNS names (its subject
   common name when it has no subjectAltName) and IP addresses, compared in lower case;
2. a certificate with the exact name wins;
3. else one with a wildcard `*.example.com` for the name's parent: a wildcard stands
   for exactly one whole label, so it matches `api.example.com` but neither
   `example.com` nor `a.b.example.com` (as Go, Caddy and Traefik do);
4. else, and for a client that sends no SNI, the default: the listener's first
   certificate.

When two certificates have the same name, the first one listed wins it (as nginx's first
`server_name` and Traefik do); the later one is still served for its other names. IP
addresses are indexed too, although RFC 6066 forbids them as SNI: a client that sends no
SNI to an address gets the default, so put a certificate for the address first.

Every context carries the same settings (`TlsSettings`): the oldest TLS version, ALPN,
compression and renegotiation off and, with `client_auth`, the client certificate check.
OpenSSL keeps a connection's verify mode from the context it began on (the listener's)
but verifies the chain against the trust store of the context it moved to, so each
context has both.

The interface, for whoever brings certificates:

- `CertificateSet(settings, pairs)` loads the config's (cert, key) pairs; `context` is
  what the listener serves with. A worker's sets are `Server.certificate_sets`
  (proxy/process/server.py), one per TLS listener of the running config.
- `replace(pairs)` swaps the config's certificates: every pair is loaded before any is
  swapped in, so a bad pair raises and the set keeps serving what it had. `reload()`
  re-reads the same files (a renewal written over them); `prepare_reload()` and
  `install()` are its two halves, so that a server reloads all listeners or none.
- Certificates from another source (ACME, say): `load(cert, key)` makes a `Certificate`
  with the listener's settings, and `set_source(name, certificates)` puts a named group
  of them in the index after the config's (a config certificate wins a name they
  share; an exact name of any group still beats a wildcard); `set_source(name, [])`
  removes the group. Re-reading the config's files keeps the other groups; a config
  reload that changes a listener's `tls` section makes a new listener with a new set,
  to which they must be added again.
- `override`: a function of the server name (lower case, without a trailing dot) giving
  a context to serve instead of the index's choice, or None; consulted first at every
  handshake that sends a name. A TLS-ALPN-01 challenge certificate, say, made with
  `new_context(cert, key, alpn=["acme-tls/1"])`. Python's `sni_callback` does not see
  the ALPN protocols the client offered, so an override cannot tell the validator's
  handshake from a browser's for the same name: it should answer only while a
  challenge for that name is pending.

Everything here runs on the event loop: the index is one immutable object, replaced in
one assignment, so a handshake sees the old set or the new one, never half of each.
"""

from __future__ import annotations

import ipaddress
import logging
import ssl
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from cryptography import x509

from proxy.config.model import ClientAuth, ListenerTls

log = logging.getLogger(__name__)

# ALPN protocol ids (RFC 7301; "h2" is RFC 9113 section 3.2).
ALPN_H2 = "h2"
ALPN_HTTP1 = "http/1.1"
CONFIG_SOURCE = "config"

# What a handshake may be given instead of the index's choice (see `override`).
Override = Callable[[str], ssl.SSLContext | None]


def _no_passphrase() -> bytes:
    # Without a callback OpenSSL would prompt on the terminal for an encrypted key.
    raise ssl.SSLError("the key is encrypted; a passphrase-less key is needed")


@dataclass(frozen=True, slots=True)
class TlsSettings:
    """What every context of a listener shares: the oldest version ("1.2" or "1.3"),
    the ALPN protocols offered, and the client certificate check (None: none asked)."""

    min_version: str = "1.2"
    alpn: tuple[str, ...] = (ALPN_H2, ALPN_HTTP1)
    client_auth: ClientAuth | None = None

    @classmethod
    def of(cls, tls: ListenerTls, http2: bool) -> TlsSettings:
        """The settings of a listener's `tls` section (`http2`: whether h2 is offered)."""
        alpn = (ALPN_H2, ALPN_HTTP1) if http2 else (ALPN_HTTP1,)
        return cls(tls.min_version, alpn, tls.client_auth)

    def context(self, alpn: Sequence[str] | None = None) -> ssl.SSLContext:
        """A server context with these settings and no certificate (`alpn` instead of
        the listener's protocols, for a context that must offer others).

        Raises:
            OSError, ssl.SSLError: the client CA bundle cannot be loaded.
        """
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = (
            ssl.TLSVersion.TLSv1_3 if self.min_version == "1.3" else ssl.TLSVersion.TLSv1_2
        )
        # Compression (CRIME) and renegotiation have no place on a modern listener.
        context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
        context.set_alpn_protocols(list(self.alpn if alpn is None else alpn))
        client_auth = self.client_auth
        if client_auth is not None:
            context.load_verify_locations(cafile=client_auth.ca)
            # `optional` still fails the handshake on a certificate that does not verify
            # (OpenSSL does with CERT_OPTIONAL, as nginx's `ssl_verify_client optional`).
            required = client_auth.mode == "require"
            context.verify_mode = ssl.CERT_REQUIRED if required else ssl.CERT_OPTIONAL
        return context


@dataclass(frozen=True, slots=True)
class Certificate:
    """One loaded certificate: its files, the names it answers for (lower case; DNS
    names, wildcards and IP addresses), its leaf, and the context that serves it."""

    cert: str
    key: str
    names: tuple[str, ...]
    leaf: x509.Certificate
    context: ssl.SSLContext


def load_certificate(settings: TlsSettings, cert: str, key: str) -> Certificate:
    """Load the PEM chain `cert` and key `key` into a context with `settings`.

    Raises:
        OSError, ssl.SSLError: a file is missing, does not parse, the pair does not
            match, the key is encrypted, or `cert` changed while it was being read (half
            way through a renewal: the next reload takes it).
    """
    with open(cert, "rb") as file:
        data = file.read()
    context = settings.context()
    context.load_cert_chain(cert, key, password=_no_passphrase)
    with open(cert, "rb") as file:
        if file.read() != data:
            raise ssl.SSLError(f"{cert} changed while it was being read")
    try:
        leaf = x509.load_pem_x509_certificates(data)[0]
    except ValueError as exc:  # OpenSSL read it: a PEM quirk cryptography refuses
        raise ssl.SSLError(f"cannot read the names of {cert}: {exc}") from None
    return Certificate(cert, key, served_names(leaf), leaf, context)


def served_names(leaf: x509.Certificate) -> tuple[str, ...]:
    """The names `leaf` answers for, in lower case: its subjectAltName's DNS names and
    IP addresses, or its subject common name when it has no subjectAltName."""
    try:
        alternatives = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        common = leaf.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
        return tuple(str(attribute.value).lower() for attribute in common)
    names = [str(name).lower() for name in alternatives.get_values_for_type(x509.DNSName)]
    names += [str(address) for address in alternatives.get_values_for_type(x509.IPAddress)]
    return tuple(names)


@dataclass(frozen=True, slots=True)
class CertificateIndex:
    """Which context serves which name: `exact` names and `wildcards` (keyed by the
    parent domain a `*.` stands before), and the `default` for everything else (None:
    no certificate at all, so handshakes fail)."""

    exact: dict[str, ssl.SSLContext]
    wildcards: dict[str, ssl.SSLContext]
    default: ssl.SSLContext | None

    @classmethod
    def of(cls, certificates: Iterable[Certificate]) -> CertificateIndex:
        """The index of `certificates` in order of precedence: the first is the default,
        and a name two certificates share belongs to the first."""
        exact: dict[str, ssl.SSLContext] = {}
        wildcards: dict[str, ssl.SSLContext] = {}
        default = None
        for certificate in certificates:
            default = default or certificate.context
            for name in certificate.names:
                if name.startswith("*."):
                    parent = name[2:]
                    if parent and "*" not in parent:
                        wildcards.setdefault(parent, certificate.context)
                elif "*" not in name:  # a partial wildcard (`f*.example.com`): not served
                    exact.setdefault(_canonical_address(name), certificate.context)
        return cls(exact, wildcards, default)

    def choose(self, server_name: str | None) -> ssl.SSLContext | None:
        """The context for a client that sent `server_name` (None: no SNI)."""
        if server_name:
            name = server_name.lower().removesuffix(".")
            found = self.exact.get(name)
            if found is not None:
                return found
            _label, dot, parent = name.partition(".")
            if dot:
                found = self.wildcards.get(parent)
                if found is not None:
                    return found
        return self.default


def _canonical_address(name: str) -> str:
    """An IP address in the form `str(ip_address)` gives (what `served_names` holds);
    any other name as it is."""
    try:
        return str(ipaddress.ip_address(name))
    except ValueError:
        return name


class CertificateSet:
    """A listener's certificates and the SNI choice among them (module docstring)."""

    def __init__(self, settings: TlsSettings, pairs: Sequence[tuple[str, str]]) -> None:
        """Load every (cert, key) pair of the config.

        Raises:
            OSError, ssl.SSLError: a pair cannot be loaded, or the client CA bundle.
        """
        self.settings = settings
        self.context = settings.context()
        self.context.sni_callback = self._on_server_name
        self.override: Override | None = None
        self._sources: dict[str, tuple[Certificate, ...]] = {CONFIG_SOURCE: self._load_all(pairs)}
        self._index = CertificateIndex.of(self.certificates())

    def __repr__(self) -> str:
        names = [certificate.names for certificate in self.certificates()]
        return f"<CertificateSet {names}>"

    def certificates(self) -> list[Certificate]:
        """Every certificate, in order of precedence (the config's first)."""
        return [certificate for group in self._sources.values() for certificate in group]

    def choose(self, server_name: str | None) -> ssl.SSLContext | None:
        """The context a handshake for `server_name` (None: no SNI) is served with."""
        if self.override is not None and server_name:
            chosen = self.override(server_name.lower().removesuffix("."))
            if chosen is not None:
                return chosen
        return self._index.choose(server_name)

    def load(self, cert: str, key: str) -> Certificate:
        """A certificate loaded with this listener's settings (for `set_source`).

        Raises:
            OSError, ssl.SSLError: as `load_certificate`.
        """
        return load_certificate(self.settings, cert, key)

    def new_context(self, cert: str, key: str, alpn: Sequence[str]) -> ssl.SSLContext:
        """A context with this listener's settings but `alpn`, serving `cert` (for an
        `override`).

        Raises:
            OSError, ssl.SSLError: the pair cannot be loaded.
        """
        context = self.settings.context(alpn)
        context.load_cert_chain(cert, key, password=_no_passphrase)
        return context

    def replace(self, pairs: Sequence[tuple[str, str]]) -> None:
        """Serve `pairs` as the config's certificates from the next handshake on.

        Raises:
            OSError, ssl.SSLError: a pair cannot be loaded; nothing changed.
        """
        self.set_source(CONFIG_SOURCE, self._load_all(pairs))

    def reload(self) -> None:
        """Re-read the config's certificate files (renewed in place).

        Raises:
            OSError, ssl.SSLError: a pair cannot be loaded; nothing changed.
        """
        self.replace(self.pairs())

    def prepare_reload(self) -> tuple[Certificate, ...]:
        """The config's certificates read again, not yet served (`install` them), so
        that several listeners can be reloaded all or none.

        Raises:
            OSError, ssl.SSLError: a pair cannot be loaded.
        """
        return self._load_all(self.pairs())

    def install(self, certificates: Sequence[Certificate]) -> None:
        """Serve `certificates` (from `prepare_reload`) as the config's."""
        self.set_source(CONFIG_SOURCE, certificates)

    def pairs(self) -> list[tuple[str, str]]:
        """The config's (cert, key) files."""
        return [(item.cert, item.key) for item in self._sources.get(CONFIG_SOURCE, ())]

    def set_source(self, name: str, certificates: Sequence[Certificate]) -> None:
        """Serve `certificates` as the group `name` (after the groups set before it;
        the config's group is first), replacing what the group held; empty: remove it."""
        sources = dict(self._sources)
        if certificates or name == CONFIG_SOURCE:
            sources[name] = tuple(certificates)
        else:
            sources.pop(name, None)
        index = CertificateIndex.of(
            certificate for group in sources.values() for certificate in group
        )
        self._sources, self._index = sources, index

    def _load_all(self, pairs: Sequence[tuple[str, str]]) -> tuple[Certificate, ...]:
        return tuple(load_certificate(self.settings, cert, key) for cert, key in pairs)

    def _on_server_name(
        self, ssl_object: ssl.SSLObject, server_name: str | None, _context: ssl.SSLContext
    ) -> None:
        # Called by OpenSSL inside the handshake; an exception here would fail it with
        # a traceback on stderr, so nothing may escape.
        try:
            chosen = self.choose(server_name)
        except Exception:
            log.exception("bug while choosing a certificate for %r", server_name)
            chosen = self._index.default
        if chosen is not None:
            ssl_object.context = chosen
