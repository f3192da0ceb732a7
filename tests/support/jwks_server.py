"""A real HTTP/1.1 JWKS server for the jwt tests (asyncio streams + h11, 127.0.0.1:0), and
signing keys to go with it.

`JwksServer`, the suite's HTTP/1.1 upstream (tests/support/upstreams/h1.py) answering
every request with `jwks` (a dict the test may replace at any time), counts the requests
in `fetches`. Modes: `status` (answer that status instead), `body`
(answer these bytes instead of the JSON), `hang` (read the request, never answer: an
identity provider that black-holes us). `stop()` closes the listener and every connection
(the provider is down: connections are refused); `start()` again on the same port brings
it back. Pass `ssl` to serve https.

`SigningKey` makes an RSA, EC or Ed25519 key pair (or holds an HMAC secret) and signs
tokens with it; `jwk(kid)` is its public half as a JWK.
"""

from __future__ import annotations

import asyncio
import json
import ssl as ssl_module
import time
from dataclasses import dataclass
from typing import Any

import h11
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from tests.support.upstreams import UpstreamServer


class JwksServer(UpstreamServer):
    """Start with `await server.start()`; `server.url` is then the JWKS URL."""

    def __init__(self, jwks: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.jwks: dict[str, Any] = jwks if jwks is not None else {"keys": []}
        self.fetches = 0
        self.status = 200
        self.body: bytes | None = None
        self.hang = False
        self.path = "/.well-known/jwks.json"
        self._fetched = asyncio.Event()

    async def start(self, port: int = 0, *, ssl: ssl_module.SSLContext | None = None) -> JwksServer:
        """Listen (again on the same port after a `stop`); with `ssl`, https from then on."""
        if ssl is not None:
            self.tls = ssl
        await super().start(port or self.port)
        return self

    @property
    def url(self) -> str:
        scheme = "https" if self.tls is not None else "http"
        host = "localhost" if self.tls is not None else "127.0.0.1"  # the certificate's name
        return f"{scheme}://{host}:{self.port}{self.path}"

    async def wait_for_fetches(self, count: int, timeout_s: float = 10.0) -> None:
        """Until `fetches` reaches `count` (TimeoutError after `timeout_s`)."""
        async with asyncio.timeout(timeout_s):
            while self.fetches < count:
                self._fetched.clear()
                await self._fetched.wait()

    async def _respond(
        self,
        conn: h11.Connection,
        writer: asyncio.StreamWriter,
        request: h11.Request,
        target: str,
        headers: list[tuple[str, str]],
        body: bytes,
        size: int,
    ) -> bool:
        self.fetches += 1
        self._fetched.set()
        if self.hang:
            await self._hold()  # until the server stops
            return False
        data = self.body if self.body is not None else json.dumps(self.jwks).encode()
        response = h11.Response(
            status_code=self.status,
            headers=[("Content-Type", "application/json"), ("Content-Length", str(len(data)))],
        )
        writer.write(conn.send(response) + conn.send(h11.Data(data=data)))
        writer.write(conn.send(h11.EndOfMessage()))
        await writer.drain()
        return False  # one fetch per connection (the middleware asks for `Connection: close`)


@dataclass
class SigningKey:
    """A key that signs test tokens: `SigningKey.rsa()`, `.ec()`, `.ed25519()`, `.hmac()`."""

    algorithm: str
    private: Any  # a cryptography private key, or the HMAC secret (bytes)
    kid: str | None = None

    @classmethod
    def rsa(cls, kid: str | None = None, algorithm: str = "RS256", bits: int = 2048) -> SigningKey:
        return cls(algorithm, rsa.generate_private_key(public_exponent=65537, key_size=bits), kid)

    @classmethod
    def ec(cls, kid: str | None = None, algorithm: str = "ES256") -> SigningKey:
        curve = {"ES256": ec.SECP256R1(), "ES384": ec.SECP384R1(), "ES512": ec.SECP521R1()}
        return cls(algorithm, ec.generate_private_key(curve[algorithm]), kid)

    @classmethod
    def ed25519(cls, kid: str | None = None) -> SigningKey:
        return cls("EdDSA", ed25519.Ed25519PrivateKey.generate(), kid)

    @classmethod
    def hmac(cls, secret: bytes, algorithm: str = "HS256") -> SigningKey:
        return cls(algorithm, secret)

    def public_pem(self) -> str:
        """The public key as PEM (SubjectPublicKeyInfo)."""
        return str(
            self.private.public_key()
            .public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            .decode()
        )

    def jwk(self, kid: str | None = None, *, alg: bool = True) -> dict[str, Any]:
        """The public key as a JWK dict (with `kid`, `use: sig` and, if `alg`, its alg)."""
        public = self.private.public_key()
        if isinstance(public, rsa.RSAPublicKey):
            data = RSAAlgorithm.to_jwk(public, as_dict=True)
        elif isinstance(public, ec.EllipticCurvePublicKey):
            data = ECAlgorithm.to_jwk(public, as_dict=True)
        else:
            data = OKPAlgorithm.to_jwk(public, as_dict=True)
        data["use"] = "sig"
        if alg:
            data["alg"] = self.algorithm
        kid = kid if kid is not None else self.kid
        if kid is not None:
            data["kid"] = kid
        return dict(data)

    def sign(
        self,
        claims: dict[str, Any] | None = None,
        *,
        kid: str | None = None,
        algorithm: str | None = None,
        expires_in: float | None = 300,
        headers: dict[str, Any] | None = None,
    ) -> str:
        """A token with `claims` (plus `exp` in `expires_in` seconds unless None), whose
        header names `kid` (default: the key's own)."""
        payload = dict(claims or {})
        if expires_in is not None and "exp" not in payload:
            payload["exp"] = int(time.time() + expires_in)
        header = dict(headers or {})
        kid = kid if kid is not None else self.kid
        if kid is not None:
            header["kid"] = kid
        return jwt.encode(
            payload, self.private, algorithm=algorithm or self.algorithm, headers=header
        )
