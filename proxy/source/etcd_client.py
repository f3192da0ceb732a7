"""A small etcd v3 client over etcd's JSON gateway (`/v3/kv/range`, `/v3/kv/txn`,
`/v3/watch`), on asyncio streams with h11, both of which the gateway has anyway: no gRPC
stack in the supervisor, nothing imported until a config names etcd. docs/etcd.md gives
the measurements behind choosing this over a gRPC client.

The JSON gateway speaks protobuf's JSON mapping: keys and values base64, int64 as strings,
fields at their default left out. A watch is one POST whose response streams one JSON
object per line for as long as the connection lasts.

Each call opens a connection of its own to the first member that accepts one (the
supervisor makes a handful of calls per change, and a watch holds one connection), so
there is no pool to keep healthy. With GATEHOUSE_ETCD_USER and GATEHOUSE_ETCD_PASSWORD set,
the client authenticates (`/v3/auth/authenticate`) and sends the token with each call.
With GATEHOUSE_ETCD_CA (a CA bundle to verify the members with), GATEHOUSE_ETCD_CERT and
GATEHOUSE_ETCD_KEY (a client certificate) or GATEHOUSE_ETCD_TLS=1 (the system's CAs), it
speaks TLS to the members, checking their certificates against the host names of the URL.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import ssl
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass
from typing import Any

import h11

from proxy.source.etcd_url import EtcdLocation

CALL_TIMEOUT_S = 5.0  # connect and answer, for one unary call
CLOSE_TIMEOUT_S = 1.0  # a TLS goodbye that is not answered is not waited for longer
MAX_ANSWER_BYTES = 4 * 1024 * 1024  # a document is at most 1 MiB, base64 and JSON around it
USER_ENV, PASSWORD_ENV = "GATEHOUSE_ETCD_USER", "GATEHOUSE_ETCD_PASSWORD"
TLS_ENV, CA_ENV = "GATEHOUSE_ETCD_TLS", "GATEHOUSE_ETCD_CA"
CERT_ENV, KEY_ENV = "GATEHOUSE_ETCD_CERT", "GATEHOUSE_ETCD_KEY"
_READ_SIZE = 65536
_UNAUTHENTICATED = 16  # gRPC's code for a missing or expired token


class EtcdSettingsError(ValueError):
    """The environment's settings for etcd cannot be used (the message says which)."""


class EtcdUnavailable(Exception):
    """No member could be reached, or the connection broke or timed out."""


class EtcdError(Exception):
    """etcd answered, with an error (the message is etcd's)."""

    def __init__(self, message: str, code: int = 0) -> None:
        super().__init__(message)
        self.code = code


class Compacted(EtcdError):
    """A watch asked for revisions etcd has compacted away: read the key again."""


@dataclass(frozen=True, slots=True)
class KeyValue:
    """The key's value and the revision that last wrote it."""

    value: bytes
    mod_revision: int


@dataclass(frozen=True, slots=True)
class Reading:
    """A range read: the key (None when it does not exist) and the store's revision then."""

    kv: KeyValue | None
    revision: int


@dataclass(frozen=True, slots=True)
class Change:
    """The last change to the key in one watch answer: its new value (None: deleted) at
    `revision`."""

    kv: KeyValue | None
    revision: int


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _int(fields: Mapping[str, Any], name: str) -> int:
    return int(fields.get(name, 0))


def _key_value(fields: Mapping[str, Any]) -> KeyValue:
    return KeyValue(base64.b64decode(fields.get("value", "")), _int(fields, "mod_revision"))


def tls_context(env: Mapping[str, str]) -> ssl.SSLContext | None:
    """The TLS settings the environment asks for, or None for plain TCP.

    Raises:
        EtcdSettingsError: a CA, certificate or key file cannot be read or used.
    """
    ca, cert = env.get(CA_ENV) or None, env.get(CERT_ENV) or None
    if ca is None and cert is None and env.get(TLS_ENV, "") not in ("1", "true", "yes"):
        return None
    try:
        context = ssl.create_default_context(cafile=ca)
        if cert is not None:
            context.load_cert_chain(cert, env.get(KEY_ENV) or None)
    except OSError as exc:  # ssl.SSLError too
        raise EtcdSettingsError(f"the TLS files for etcd ({CA_ENV}, {CERT_ENV}): {exc}") from exc
    return context


def _raise_for(answer: Mapping[str, Any], status: int) -> None:
    error = answer.get("error")
    if status == 200 and error is None:
        return
    if isinstance(error, Mapping):  # a watch stream's error object
        answer = error
    message = answer.get("message") or answer.get("error") or f"HTTP {status}"
    raise EtcdError(str(message), int(answer.get("code", 0)))


class EtcdClient:
    """Calls on the one key of `location`."""

    def __init__(
        self,
        location: EtcdLocation,
        *,
        timeout: float = CALL_TIMEOUT_S,
        env: Mapping[str, str] | None = None,
    ) -> None:
        """Raises EtcdSettingsError: the TLS settings cannot be used."""
        self.location = location
        self.timeout = timeout
        environ = os.environ if env is None else env
        self._user = environ.get(USER_ENV) or None
        self._password = environ.get(PASSWORD_ENV, "")
        self._tls = tls_context(environ)
        self._token: str | None = None
        self._next = 0  # the member tried first: the last one that answered
        self._connections: dict[asyncio.StreamWriter, int] = {}  # connections open, their fds

    def filenos(self) -> list[int]:
        """The descriptors of the connections open now: a forked worker closes them, or
        its copy would keep a watch open on etcd's side after the parent let it go."""
        return list(self._connections.values())

    async def _close(self, writer: asyncio.StreamWriter) -> None:
        """Close a connection and wait until it is (TLS says goodbye first)."""
        self._connections.pop(writer, None)
        writer.close()
        with contextlib.suppress(OSError, TimeoutError, ssl.SSLError):
            await asyncio.wait_for(writer.wait_closed(), CLOSE_TIMEOUT_S)

    # -- calls on the key ----------------------------------------------------------------
    async def get(self) -> Reading:
        answer = await self._call("/v3/kv/range", {"key": self._key})
        kvs = answer.get("kvs") or []
        kv = _key_value(kvs[0]) if kvs else None
        return Reading(kv, _int(answer.get("header", {}), "revision"))

    async def put(self, value: bytes) -> int:
        """Write `value` whatever is there; the revision it was written at."""
        answer = await self._call("/v3/kv/put", {"key": self._key, "value": _b64(value)})
        return _int(answer.get("header", {}), "revision")

    async def delete(self) -> int:
        """Delete the key; the revision of the deletion."""
        answer = await self._call("/v3/kv/deleterange", {"key": self._key})
        return _int(answer.get("header", {}), "revision")

    async def compare_and_put(self, value: bytes, mod_revision: int) -> tuple[bool, int]:
        """Write `value` if the key was last written at `mod_revision` (0: if it does not
        exist), in one transaction. (True, the revision written at), or (False, the
        revision the key is at now: 0 when it does not exist)."""
        compare = {
            "target": "MOD",
            "result": "EQUAL",
            "key": self._key,
            "mod_revision": str(mod_revision),
        }
        answer = await self._call(
            "/v3/kv/txn",
            {
                "compare": [compare],
                "success": [{"request_put": {"key": self._key, "value": _b64(value)}}],
                "failure": [{"request_range": {"key": self._key}}],
            },
        )
        if answer.get("succeeded"):
            return True, _int(answer.get("header", {}), "revision")
        kvs = answer["responses"][0]["response_range"].get("kvs") or []
        return False, _key_value(kvs[0]).mod_revision if kvs else 0

    async def watch(self, start_revision: int) -> AsyncGenerator[Change, None]:
        """The key's changes from `start_revision` on, one per answer etcd streams (the
        last event of each), until the connection ends.

        Raises:
            EtcdUnavailable: the connection could not be made, or ended.
            Compacted: `start_revision` is compacted away.
            EtcdError: etcd refused or cancelled the watch.
        """
        request = {"create_request": {"key": self._key, "start_revision": str(start_revision)}}
        body = json.dumps(request).encode()
        reader, writer, connection = await self._open("/v3/watch", body)
        try:
            status = await asyncio.wait_for(self._status(reader, connection), self.timeout)
            if status != 200:
                answer = await asyncio.wait_for(self._body(reader, connection), self.timeout)
                _raise_for(answer, status)
            pending = b""
            while True:
                event = connection.next_event()
                if event is h11.NEED_DATA:
                    data = await reader.read(_READ_SIZE)
                    if not data:
                        raise EtcdUnavailable("etcd closed the watch")
                    connection.receive_data(data)
                elif isinstance(event, h11.Data):
                    pending += bytes(event.data)
                    *lines, pending = pending.split(b"\n")
                    for line in lines:
                        change = self._change(line)
                        if change is not None:
                            yield change
                    if len(pending) > MAX_ANSWER_BYTES:
                        raise EtcdUnavailable("a watch answer over the size limit")
                else:  # the stream ended (EndOfMessage, ConnectionClosed)
                    raise EtcdUnavailable("etcd ended the watch")
        except (TimeoutError, OSError, h11.ProtocolError) as exc:
            raise EtcdUnavailable(f"the watch broke: {exc!r}") from exc
        finally:
            await self._close(writer)

    def _change(self, line: bytes) -> Change | None:
        if not line.strip():
            return None
        message = json.loads(line)
        _raise_for(message, 200)
        result = message.get("result", {})
        if _int(result, "compact_revision"):
            raise Compacted(f"revisions up to {result['compact_revision']} are compacted")
        if result.get("canceled"):
            raise EtcdError(f"etcd cancelled the watch: {result.get('cancel_reason', '')}")
        events = result.get("events") or []
        if not events:
            return None  # the watch's creation, or a progress note
        last = events[-1]
        kv = last.get("kv", {})
        revision = _int(kv, "mod_revision") or _int(result.get("header", {}), "revision")
        if last.get("type") == "DELETE":
            return Change(None, revision)
        return Change(_key_value(kv), revision)

    # -- HTTP ----------------------------------------------------------------------------
    @property
    def _key(self) -> str:
        return _b64(self.location.key.encode())

    async def _call(self, path: str, payload: Mapping[str, Any]) -> dict[str, Any]:
        try:
            return await self._call_once(path, payload)
        except EtcdError as exc:
            if exc.code != _UNAUTHENTICATED or self._user is None:
                raise
            self._token = None  # expired: once more with a new one
            return await self._call_once(path, payload)

    async def _call_once(self, path: str, payload: Mapping[str, Any]) -> dict[str, Any]:
        body = json.dumps(payload).encode()
        try:
            reader, writer, connection = await self._open(path, body)
        except OSError as exc:
            raise EtcdUnavailable(str(exc)) from exc
        try:
            status = await asyncio.wait_for(self._status(reader, connection), self.timeout)
            answer = await asyncio.wait_for(self._body(reader, connection), self.timeout)
        except (TimeoutError, OSError, h11.ProtocolError, ValueError) as exc:
            raise EtcdUnavailable(f"{path}: {exc!r}") from exc
        finally:
            await self._close(writer)
        _raise_for(answer, status)
        return answer

    async def _open(
        self, path: str, body: bytes
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, h11.Connection]:
        """A connection to a member, with the request sent on it."""
        headers = [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
        if self._user is not None and path != "/v3/auth/authenticate":
            if self._token is None:
                self._token = await self._authenticate()
            headers.append(("Authorization", self._token))
        reader, writer, host = await self._connect()
        connection = h11.Connection(h11.CLIENT)
        request = h11.Request(method="POST", target=path, headers=[("Host", host), *headers])
        writer.write(
            connection.send(request)
            + connection.send(h11.Data(data=body))
            + connection.send(h11.EndOfMessage())
        )
        return reader, writer, connection

    async def _authenticate(self) -> str:
        payload = {"name": self._user, "password": self._password}
        answer = await self._call_once("/v3/auth/authenticate", payload)
        return str(answer["token"])

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, str]:
        endpoints = self.location.endpoints
        failures = []
        for step in range(len(endpoints)):
            index = (self._next + step) % len(endpoints)
            host, port = endpoints[index]
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(
                        host,
                        port,
                        ssl=self._tls,
                        server_hostname=host if self._tls is not None else None,
                    ),
                    self.timeout,
                )
            except (TimeoutError, OSError) as exc:  # ssl.SSLError is an OSError
                failures.append(f"{host}:{port}: {exc!r}")
                continue
            self._next = index
            self._connections[writer] = writer.get_extra_info("socket").fileno()
            return reader, writer, f"{host}:{port}"
        raise EtcdUnavailable("; ".join(failures))

    @staticmethod
    async def _status(reader: asyncio.StreamReader, connection: h11.Connection) -> int:
        while True:
            event = connection.next_event()
            if event is h11.NEED_DATA:
                data = await reader.read(_READ_SIZE)
                connection.receive_data(data)  # b"": closed, and h11 says so next
            elif isinstance(event, h11.Response):
                return int(event.status_code)
            elif isinstance(event, h11.ConnectionClosed):
                raise EtcdUnavailable("etcd closed the connection before answering")

    @staticmethod
    async def _body(reader: asyncio.StreamReader, connection: h11.Connection) -> dict[str, Any]:
        body = bytearray()
        while True:
            event = connection.next_event()
            if event is h11.NEED_DATA:
                connection.receive_data(await reader.read(_READ_SIZE))
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > MAX_ANSWER_BYTES:
                    raise EtcdUnavailable("an answer over the size limit")
            elif isinstance(event, h11.EndOfMessage):
                answer = json.loads(body) if body else {}
                return answer if isinstance(answer, dict) else {}
            else:
                raise EtcdUnavailable("etcd closed the connection mid-answer")
