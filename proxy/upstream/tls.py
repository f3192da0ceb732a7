"""Client TLS for upstreams: one `ssl.SSLContext` per upstream, built at config load.

The context verifies the upstream's certificate against `tls.ca` (the system store when
unset) and the name in `tls.sni` (the endpoint's host when unset), offers ALPN for the
upstream's protocol and refuses anything older than TLS 1.2. `verify: false` turns both
the chain and the name check off; SNI is still sent. With `tls.cert` and `tls.key` it
presents that certificate to an upstream that asks for one (mutual TLS); health checks
and HTTP/2 connections use the same context, so they present it too.
"""

from __future__ import annotations

import ipaddress
import ssl

from proxy.config.upstream_model import EndpointConfig, UpstreamConfig

# ALPN protocol ids (RFC 7301; "h2" is RFC 9113 section 3.2).
ALPN_H2 = "h2"
ALPN_HTTP1 = "http/1.1"


def client_context(config: UpstreamConfig) -> ssl.SSLContext | None:
    """The TLS context for `config`'s https:// endpoints; None when it has none.

    Raises:
        OSError, ssl.SSLError: `tls.ca` cannot be read or holds no certificate, or the
            client certificate does not load (the config loader checked both; the files
            changed since).
    """
    if not any(endpoint.scheme == "https" for endpoint in config.endpoints):
        return None
    tls = config.tls
    context = ssl.create_default_context(cafile=tls.ca)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if not tls.verify:
        # Order matters: verify_mode cannot be CERT_NONE while check_hostname is on.
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols([ALPN_H2 if config.protocol == "h2" else ALPN_HTTP1])
    if tls.cert is not None and tls.key is not None:
        context.load_cert_chain(tls.cert, tls.key, password=_no_passphrase)
    return context


def reload_client_certificate(context: ssl.SSLContext | None, config: UpstreamConfig) -> None:
    """Read `config`'s client certificate again into the live `context` (a renewal written
    over the files: a reload that leaves the upstream's settings alone keeps its pools
    and context). New connections present it; open ones keep theirs.

    Raises:
        OSError, ssl.SSLError: the pair does not load; the context keeps the one it had.
    """
    cert, key = config.tls.cert, config.tls.key
    if context is None or cert is None or key is None:
        return
    # A scratch context first: a pair caught half way through a renewal must not leave
    # the live one with a certificate and no key.
    ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(cert, key, password=_no_passphrase)
    context.load_cert_chain(cert, key, password=_no_passphrase)


def _no_passphrase() -> bytes:
    # Without a callback OpenSSL would prompt on the terminal for an encrypted key.
    raise ssl.SSLError("the key is encrypted; a passphrase-less key is needed")


def server_hostname(endpoint: EndpointConfig, config: UpstreamConfig) -> str | None:
    """The name sent as SNI and checked against the certificate: `tls.sni`, else the
    endpoint's host. None for plaintext endpoints.

    An IP literal is still passed: `ssl` then sends no SNI (RFC 6066 section 3 allows
    only host names) and checks the address against the certificate's IP SANs."""
    if endpoint.scheme != "https":
        return None
    name = config.tls.sni or endpoint.name or endpoint.host
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return name.rstrip(".")
    return name
