"""A real HTTP/1.1 JWKS server for the jwt tests (asyncio streams + h11, 127.0.0.1:0), and
signing keys to go with it.

`JwksServer` answers every GET with `jwks` (a dict the test may replace at any time) and
counts the requests in `fetches`. Modes: `status` (answer that status instead), `body`
(answer these bytes instead of the JSON), `hang` (read the request, never answer: an
identity provider that black-holes us). `stop()` closes the listener and every connection
(the provider is down: connections are refused); `start()` again on the same port brings
it back. Pass `ssl` to serve https.

`SigningKey` makes an RSA, EC or Ed25519 key pair (or holds an HMAC secret) and signs
tokens with it; `jwk(kid)` is its public half as a JWK.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl as ssl_module
import time
from dataclasses import dataclass, field
from typing import Any

import h11
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm


@dataclass
class JwksServer:
    """Start with `await server.start()`; `server.url` is then the JWKS URL."""

    jwks: dict[str, Any] = field(default_factory=lambda: {"keys": []})
    fetches: int = 0
    status: int = 200
    body: bytes | None = None
    hang: bool = False
    port: int = 0
    path: str = "/.well-known/jwks.json"
    _server: asyncio.Server | None = None
    _ssl: ssl_module.SSLContext | None = None
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)
    _fetched: asyncio.Event = field(default_factory=asyncio.Event)

    async def start(self, ssl: ssl_module.SSLContext | None = None) -> JwksServer:
        """Listen (again on the same port after a `stop`)."""
        self._ssl = ssl or self._ssl
        self._server = await asyncio.start_server(
            self._serve, "127.0.0.1", self.port, ssl=self._ssl
        )
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        scheme = "https" if self._ssl is not None else "http"
        host = "localhost" if self._ssl is not None else "127.0.0.1"
        return f"{scheme}://{host}:{self.port}{self.path}"

    async def stop(self) -> None:
        """Stop listening and close every open connection (hanging ones too)."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for writer in list(self._writers):
            writer.close()
        if server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 2)

    async def wait_for_fetches(self, count: int, timeout_s: float = 10.0) -> None:
        """Until `fetches` reaches `count` (TimeoutError after `timeout_s`)."""
        async with asyncio.timeout(timeout_s):
            while self.fetches < count:
                self._fetched.clear()
                await self._fetched.wait()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await reader.read(65536)
                    if not data:
                        return
                    conn.receive_data(data)
                elif isinstance(event, h11.EndOfMessage):
                    break
            self.fetches += 1
            self._fetched.set()
            if self.hang:
                await reader.read()  # until the client gives up or we stop
                return
            body = self.body if self.body is not None else json.dumps(self.jwks).encode()
            response = h11.Response(
                status_code=self.status,
                headers=[("Content-Type", "application/json"), ("Content-Length", str(len(body)))],
            )
            writer.write(conn.send(response) + conn.send(h11.Data(data=body)))
            writer.write(conn.send(h11.EndOfMessage()))
            await writer.drain()
        except (ConnectionError, h11.ProtocolError, ssl_module.SSLError):
            return
        finally:
            self._writers.discard(writer)
            writer.close()


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
