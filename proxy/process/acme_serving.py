"""A worker's side of ACME: it serves what the supervisor obtained and answers the
challenges of the supervisor's orders; it never orders (proxy/acme/manager.py does).

- **Certificates come from storage.** Each TLS listener with `tls.acme` gets, in its
  certificate set (proxy/frontend/certificates.py), a group `acme`: the certificates
  found in storage (proxy/acme/storage.py) for its names, after the config's own, so a
  `certificates` entry for the same name wins. They are loaded when the listener is
  bound (a worker started or restarted serves at once what is stored), and again, for
  the files that changed (inode, size, modification time), at every `acme` message from
  the supervisor, which sends one after writing a certificate. A pair that does not load
  (half way through a write) is reported to the supervisor and the name keeps what it
  had; the supervisor's next message follows the complete write.
- **HTTP-01**: the tokens go to the Runtime's `Http01Tokens`, which the dispatcher
  answers from before routing (proxy/exchange/acme_http01.py).
- **TLS-ALPN-01**: a context per name with a pending challenge, serving its challenge
  certificate with ALPN `acme-tls/1` alone and TLS 1.2 or later (RFC 8737 section 4;
  none of the listener's own settings, a client certificate check above all, applies
  to the validator). Listeners whose `tls.acme` uses tls-alpn-01 peek at every
  ClientHello before the handshake (proxy/frontend/client_hello.py): one that offers
  `acme-tls/1` for a name with a pending challenge gets that context
  (`choose_context`), every other connection the listener's own.

The supervisor's message: `{"op": "acme", "http01": {token: key authorization},
"tls_alpn01": {name: PEM file of the challenge's key and certificate}}`, the whole state
each time; the reply lists what could not be loaded.
"""

from __future__ import annotations

import logging
import os
import ssl
from typing import Any

from proxy.acme.storage import AcmeStorage
from proxy.config.model import ListenerConfig
from proxy.exchange.acme_http01 import Http01Tokens
from proxy.frontend.certificates import Certificate, CertificateSet
from proxy.frontend.client_hello import ACME_TLS_ALPN_PROTOCOL, ClientHello

log = logging.getLogger(__name__)

ACME_SOURCE = "acme"  # the certificate sets' group of ACME certificates

# What tells a changed file: a new one (an atomic rename) has another inode.
FileSignature = tuple[int, int, int]
PairSignature = tuple[FileSignature | None, FileSignature | None]


def _signature(path: str) -> FileSignature | None:
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return (stat.st_ino, stat.st_size, stat.st_mtime_ns)


class AcmeServing:
    """One worker's ACME certificates and challenge contexts."""

    def __init__(self) -> None:
        self._sets: dict[ListenerConfig, CertificateSet] = {}
        # (listener, name) -> the files' signatures and what was loaded from them.
        self._loaded: dict[tuple[ListenerConfig, str], tuple[PairSignature, Certificate]] = {}
        # name -> the challenge file's signature and the context loaded from it.
        self._challenges: dict[str, tuple[FileSignature | None, ssl.SSLContext]] = {}
        self._challenge_contexts: dict[str, ssl.SSLContext] = {}

    def __repr__(self) -> str:
        return (
            f"<AcmeServing listeners={len(self._sets)} certificates={len(self._loaded)} "
            f"tls_alpn01={sorted(self._challenge_contexts)}>"
        )

    @staticmethod
    def peeks(listener: ListenerConfig) -> bool:
        """Whether `listener` must look at ClientHellos (it answers TLS-ALPN-01)."""
        tls = listener.tls
        return tls is not None and tls.acme is not None and tls.acme.challenge == "tls-alpn-01"

    def attach(self, listener: ListenerConfig, certificates: CertificateSet) -> None:
        """`listener` (with `tls.acme`) is bound with `certificates`: serve what storage
        holds for its names."""
        self._sets[listener] = certificates
        for error in self._refresh(listener, certificates):
            log.warning("acme: %s", error)

    def detach(self, listener: ListenerConfig) -> None:
        """`listener` is gone (or was never taken: a reload given up)."""
        self._sets.pop(listener, None)
        for key in [key for key in self._loaded if key[0] == listener]:
            del self._loaded[key]

    def choose_context(self, hello: ClientHello) -> ssl.SSLContext | None:
        """The TLS-ALPN-01 context for a validator's ClientHello (None: anyone else)."""
        if hello.server_name is None or ACME_TLS_ALPN_PROTOCOL not in hello.alpn:
            return None
        return self._challenge_contexts.get(hello.server_name)

    def apply(self, state: dict[str, Any], tokens: Http01Tokens) -> list[str]:
        """Take the supervisor's state (the module docstring); what could not be loaded."""
        tokens.replace({str(token): str(answer) for token, answer in state["http01"].items()})
        errors = self._set_challenges({str(k): str(v) for k, v in state["tls_alpn01"].items()})
        for listener, certificates in self._sets.items():
            errors += self._refresh(listener, certificates)
        return errors

    def _set_challenges(self, files: dict[str, str]) -> list[str]:
        errors = []
        challenges = {}
        for name, path in files.items():
            signature = _signature(path)
            known = self._challenges.get(name)
            if known is not None and known[0] == signature:
                challenges[name] = known
                continue
            try:
                challenges[name] = (signature, _challenge_context(path))
            except (OSError, ssl.SSLError) as exc:
                errors.append(f"cannot load the tls-alpn-01 certificate of {name}: {exc}")
        self._challenges = challenges
        self._challenge_contexts = {name: context for name, (_, context) in challenges.items()}
        return errors

    def _refresh(self, listener: ListenerConfig, certificates: CertificateSet) -> list[str]:
        """Load the stored certificates of `listener`'s names whose files changed."""
        assert listener.tls is not None
        assert listener.tls.acme is not None
        acme = listener.tls.acme
        storage = AcmeStorage(acme.storage, acme.directory)
        errors: list[str] = []
        served: list[Certificate] = []
        changed = False
        for name in acme.domains:
            cert, key = storage.certificate_files(name)
            signature = (_signature(cert), _signature(key))
            previous = self._loaded.get((listener, name))
            if previous is not None and previous[0] == signature:
                served.append(previous[1])
                continue
            if signature[0] is None or signature[1] is None:
                if previous is not None:  # removed from storage: no longer served
                    del self._loaded[(listener, name)]
                    changed = True
                continue  # none obtained yet
            try:
                certificate = certificates.load(cert, key)
            except (OSError, ssl.SSLError) as exc:
                errors.append(f"{listener.name}: cannot load the certificate of {name}: {exc}")
                if previous is not None:
                    served.append(previous[1])
                continue
            self._loaded[(listener, name)] = (signature, certificate)
            served.append(certificate)
            changed = True
            leaf = certificate.leaf
            log.info(
                "acme: %s serves the certificate of %s: serial %x, expires %s",
                *(listener.name, name, leaf.serial_number, leaf.not_valid_after_utc.isoformat()),
            )
        if changed:
            certificates.set_source(ACME_SOURCE, served)
        return errors


def _challenge_context(path: str) -> ssl.SSLContext:
    """A context that serves the challenge certificate in `path` (key and certificate)
    to a validator, and speaks nothing but `acme-tls/1`.

    Raises:
        OSError, ssl.SSLError: the file cannot be loaded.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(path)
    context.set_alpn_protocols([ACME_TLS_ALPN_PROTOCOL])
    return context
