"""WebSocket (RFC 6455) pieces of bench/ws: frame codec, echo upstream, load client, probe.

Stdlib + uvloop only, and nothing from proxy/: the benchmark must not share code (or bugs)
with the gateway it measures. The upstream and the client are asyncio Protocols on uvloop,
because streams cost several microseconds per message and the client and the upstream share
the machine's two cores with the proxy under test.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import json
import os
import socket
import statistics
import sys
import time

import uvloop

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
FIN = 0x80
MAX_PAYLOAD = 64 << 20  # the benchmark never sends more; a bigger length is a framing bug
MAX_HEAD = 16384
MARK = "WSBENCH"  # prefix of the client's machine-readable stdout lines


class ProtocolError(Exception):
    """The peer broke RFC 6455; `code` is the close status to answer with."""

    def __init__(self, reason: str, code: int = 1002) -> None:
        super().__init__(reason)
        self.code = code


# ----------------------------------------------------------------------- frame codec
def accept_value(key: bytes) -> bytes:
    """Sec-WebSocket-Accept for a Sec-WebSocket-Key (RFC 6455 section 4.2.2)."""
    return base64.b64encode(hashlib.sha1(key + GUID).digest())


def xor_mask(data: bytes, mask: bytes) -> bytes:
    """(Un)mask with one big-integer XOR: C speed, no per-byte Python loop."""
    n = len(data)
    if not n:
        return b""
    key = (mask * (n // 4 + 1))[:n]
    return (int.from_bytes(data, "little") ^ int.from_bytes(key, "little")).to_bytes(n, "little")


def frame_header(b0: int, length: int, masked: bool) -> bytes:
    """First byte, then the 7-bit, 16-bit or 64-bit length (the shortest form, as required)."""
    m = 0x80 if masked else 0
    if length < 126:
        return bytes((b0, m | length))
    if length < 1 << 16:
        return bytes((b0, m | 126)) + length.to_bytes(2, "big")
    return bytes((b0, m | 127)) + length.to_bytes(8, "big")


def encode_frame(b0: int, payload: bytes, mask: bytes | None = None) -> bytes:
    """A whole frame; clients pass a 4-byte mask, servers none."""
    if mask is None:
        return frame_header(b0, len(payload), False) + payload
    return frame_header(b0, len(payload), True) + mask + xor_mask(payload, mask)


class FrameReader:
    """Splits a byte stream into frames: many per read, or one over many reads.

    feed() calls on_frame(b0, payload) for every complete frame (payload unmasked) and
    keeps the incomplete tail. When nothing is buffered the read is parsed in place, so
    the common case (one read = one or more whole frames) copies only the payloads.
    """

    def __init__(self, masked: bool, on_frame) -> None:
        self.masked = masked  # True on the server side: client frames must be masked
        self.on_frame = on_frame
        self.buf = bytearray()

    def feed(self, data: bytes) -> None:
        buf = self.buf
        if buf:
            buf += data
            data = buf
        pos, n, masked, on_frame = 0, len(data), self.masked, self.on_frame
        while n - pos >= 2:
            b0, b1 = data[pos], data[pos + 1]
            if b0 & 0x70:
                raise ProtocolError("RSV bits set, but no extension was negotiated")
            if bool(b1 & 0x80) != masked:
                raise ProtocolError("client frames must be masked and server frames not")
            op, length, p = b0 & 0x0F, b1 & 0x7F, pos + 2
            if length == 126:
                if n - p < 2:
                    break
                length, p = int.from_bytes(data[p : p + 2], "big"), p + 2
            elif length == 127:
                if n - p < 8:
                    break
                length, p = int.from_bytes(data[p : p + 8], "big"), p + 8
            if op > OP_BINARY and op not in (OP_CLOSE, OP_PING, OP_PONG):
                raise ProtocolError(f"reserved opcode {op:#x}")
            if op >= OP_CLOSE and (length > 125 or not b0 & FIN):
                raise ProtocolError("control frames must be short and unfragmented")
            if length > MAX_PAYLOAD:
                raise ProtocolError(f"frame of {length} bytes", 1009)
            end = p + (4 if masked else 0) + length
            if end > n:
                break
            if masked:
                payload = xor_mask(bytes(data[p + 4 : end]), bytes(data[p : p + 4]))
            else:
                payload = bytes(data[p:end])
            pos = end
            on_frame(b0, payload)
        if data is buf:
            del buf[:pos]
        elif pos < n:
            buf += data[pos:]


def parse_head(head: bytes) -> tuple[list[bytes], dict[bytes, bytes]]:
    """Start line split in three, and lower-cased header names (repeats joined by ', ')."""
    lines = head.split(b"\r\n")
    fields: dict[bytes, bytes] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not name or name != name.strip():
            raise ValueError(f"malformed header line {line[:60]!r}")
        key, value = name.lower(), value.strip()
        fields[key] = fields[key] + b", " + value if key in fields else value
    return lines[0].split(b" ", 2), fields


def tokens(value: bytes | None) -> set[bytes]:
    """The comma-separated tokens of a header value, lower-cased."""
    return {t.strip().lower() for t in (value or b"").split(b",")}


def client_handshake(port: int) -> tuple[bytes, bytes]:
    """(request bytes, expected Sec-WebSocket-Accept) with a fresh random key."""
    key = base64.b64encode(os.urandom(16))
    request = (
        b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ) % (port, key)
    return request, accept_value(key)


def check_101(head: bytes, accept: bytes) -> None:
    """Raise ValueError unless head is a 101 switching to websocket with the right accept."""
    start, fields = parse_head(head)
    if len(start) < 2 or start[1] != b"101":
        raise ValueError(f"answered {b' '.join(start)[:80]!r} instead of 101")
    if b"websocket" not in tokens(fields.get(b"upgrade")):
        raise ValueError("101 without Upgrade: websocket")
    if b"upgrade" not in tokens(fields.get(b"connection")):
        raise ValueError("101 without Connection: upgrade")
    if fields.get(b"sec-websocket-accept") != accept:
        raise ValueError(f"wrong Sec-WebSocket-Accept {fields.get(b'sec-websocket-accept')!r}")


def nodelay(transport: asyncio.BaseTransport) -> None:
    """Small request/response messages must not wait for Nagle."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


# ---------------------------------------------------------------------- echo upstream
class EchoServer(asyncio.Protocol):
    """One upstream connection: the GET Upgrade handshake, then echo.

    Data frames go back unmasked with the same first byte (opcode and FIN, so a fragmented
    message comes back fragmented the same way); ping gets pong, close gets close. Every
    answer produced by one read leaves in one write. Text payloads are echoed without UTF-8
    validation: the client checks them byte for byte anyway.
    """

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.head = b""
        self.reader: FrameReader | None = None
        self.out: list[bytes] = []
        self.closing = False
        nodelay(transport)

    def data_received(self, data: bytes) -> None:
        if self.reader is None:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                if len(self.head) > MAX_HEAD:
                    self.refuse(b"431 Request Header Fields Too Large", b"")
                return
            data = self.head[end + 4 :]
            if not self.handshake(self.head[:end]):
                return
        if self.closing:
            return
        try:
            self.reader.feed(data)
        except ProtocolError as e:
            self.out.append(encode_frame(FIN | OP_CLOSE, e.code.to_bytes(2, "big")))
            self.closing = True
        out = self.out
        if out:
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))
            out.clear()
        if self.closing:
            self.transport.close()  # after the buffered close frame is flushed

    def handshake(self, head: bytes) -> bool:
        """Answer 101 (and switch to frames) or an HTTP error; True if switched."""
        try:
            start, fields = parse_head(head)
        except ValueError:
            return self.refuse(b"400 Bad Request", b"")
        key = fields.get(b"sec-websocket-key", b"")
        if len(start) != 3 or start[0] != b"GET" or start[2] != b"HTTP/1.1":
            return self.refuse(b"400 Bad Request", b"")
        if b"websocket" not in tokens(fields.get(b"upgrade")) or b"upgrade" not in tokens(
            fields.get(b"connection")
        ):
            return self.refuse(b"426 Upgrade Required", b"Upgrade: websocket\r\n")
        if fields.get(b"sec-websocket-version") != b"13":
            return self.refuse(b"426 Upgrade Required", b"Sec-WebSocket-Version: 13\r\n")
        try:
            if len(base64.b64decode(key, validate=True)) != 16:
                raise ValueError
        except ValueError:
            return self.refuse(b"400 Bad Request", b"")
        self.transport.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept_value(key) + b"\r\n\r\n"
        )
        self.reader = FrameReader(True, self.on_frame)
        return True

    def refuse(self, status: bytes, extra: bytes) -> bool:
        self.transport.write(
            b"HTTP/1.1 "
            + status
            + b"\r\n"
            + extra
            + b"Content-Length: 0\r\nConnection: close\r\n\r\n"
        )
        self.transport.close()
        self.closing = True
        return False

    def on_frame(self, b0: int, payload: bytes) -> None:
        op = b0 & 0x0F
        if self.closing:
            return
        if op <= OP_BINARY:
            self.out.append(frame_header(b0, len(payload), False) + payload)
        elif op == OP_PING:
            self.out.append(encode_frame(FIN | OP_PONG, payload))
        elif op == OP_CLOSE:
            if len(payload) == 1:
                raise ProtocolError("close payload of one byte")
            self.out.append(encode_frame(FIN | OP_CLOSE, payload[:2]))
            self.closing = True


def upstream_main(argv: list[str]) -> int:
    """`bench/ws upstream --port N`: the echo server, until SIGTERM."""
    ap = argparse.ArgumentParser(prog="ws upstream")
    ap.add_argument("--port", type=int, required=True)
    args = ap.parse_args(argv)

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(EchoServer, "127.0.0.1", args.port, backlog=1024)
        await server.serve_forever()

    uvloop.run(serve())
    return 0


# ------------------------------------------------------------------------ load client
class Load:
    """What the client connections share: counters, latencies and the first failure."""

    def __init__(self) -> None:
        self.count = 0
        self.running = True
        self.measuring = False
        self.lat: list[float] = []
        self.error: str | None = None
        self.failed = asyncio.Event()

    def fail(self, reason: str) -> None:
        if self.error is None:
            self.error = reason
        self.running = False
        self.failed.set()


class Client(asyncio.Protocol):
    """One closed-loop connection: send one masked frame, wait for its echo, repeat.

    The masked frame is built once (a fixed random mask per connection is still a valid
    masked frame). Every echo is parsed by FrameReader and compared with the payload sent,
    so a proxy that corrupts, truncates or re-types messages fails the run.
    """

    def __init__(self, load: Load, port: int, payload: bytes, opcode: int) -> None:
        self.load, self.port, self.payload = load, port, payload
        self.b0 = FIN | opcode
        self.mask = os.urandom(4)
        self.frame = encode_frame(self.b0, payload, self.mask)
        self.ready = asyncio.get_running_loop().create_future()
        self.idle = asyncio.get_running_loop().create_future()
        self.closed = asyncio.get_running_loop().create_future()
        self.head = b""
        self.reader: FrameReader | None = None
        self.parts: list[bytes] = []
        self.n = 0
        self.sent = 0.0

    def connection_made(self, transport) -> None:
        self.transport = transport
        nodelay(transport)
        request, self.accept = client_handshake(self.port)
        transport.write(request)

    def connection_lost(self, exc) -> None:
        if not self.closed.done():
            self.closed.set_result(False)
        if self.load.running or not self.idle.done():
            self.failure(f"connection lost ({exc or 'EOF'})")

    def failure(self, reason: str) -> None:
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(reason))
        if not self.idle.done():
            self.idle.set_result(None)  # nothing more will come; do not make the drain wait
        self.load.fail(reason)

    def data_received(self, data: bytes) -> None:
        if self.reader is None:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                if len(self.head) > MAX_HEAD:
                    self.failure("handshake answer too long")
                return
            try:
                check_101(self.head[:end], self.accept)
            except ValueError as e:
                return self.failure(f"handshake: {e}")
            self.reader = FrameReader(False, self.on_frame)
            self.ready.set_result(None)
            data = self.head[end + 4 :]
        try:
            self.reader.feed(data)
        except ProtocolError as e:
            self.failure(f"bad frame from the proxy: {e}")

    def send(self) -> None:
        self.sent = time.perf_counter()
        self.transport.write(self.frame)

    def on_frame(self, b0: int, payload: bytes) -> None:
        if b0 != self.b0 or self.parts:
            b0, payload = self.odd_frame(b0, payload)
            if b0 is None:
                return
        if payload != self.payload:
            at = next(
                (i for i, (a, b) in enumerate(zip(payload, self.payload, strict=False)) if a != b),
                None,
            )
            return self.failure(
                f"wrong echo: {len(payload)} bytes for {len(self.payload)}"
                + ("" if at is None else f", first difference at byte {at}")
            )
        now = time.perf_counter()
        load = self.load
        load.count += 1
        self.n += 1
        if load.measuring:
            load.lat.append(now - self.sent)
        if load.running:
            self.sent = now
            self.transport.write(self.frame)
        elif not self.idle.done():
            self.idle.set_result(None)

    def odd_frame(self, b0: int, payload: bytes) -> tuple[int | None, bytes]:
        """Control frames, fragments (a proxy may re-fragment) and wrong opcodes."""
        op = b0 & 0x0F
        if op == OP_PING:
            self.transport.write(encode_frame(FIN | OP_PONG, payload, self.mask))
        elif op == OP_CLOSE:
            if not self.closed.done():
                self.closed.set_result(True)
            if self.load.running:
                self.failure(f"the proxy sent close {payload[:2].hex()}")
        elif op == OP_PONG:
            pass
        elif (op == OP_CONT) != bool(self.parts) or (op and op != self.b0 & 0x0F):
            self.failure(f"echo frame with first byte {b0:#04x}, expected {self.b0:#04x}")
        else:
            self.parts.append(payload)
            if b0 & FIN:
                payload, self.parts = b"".join(self.parts), []
                return self.b0, payload
        return None, b""


async def run_load(args: argparse.Namespace) -> dict:
    """Connect, warm up, measure, drain, close; the result dict (or one with 'error')."""
    loop = asyncio.get_running_loop()
    load = Load()
    opcode = OP_TEXT if args.opcode == "text" else OP_BINARY
    conns: list[Client] = []

    async def connect() -> None:
        if opcode == OP_TEXT:
            payload = base64.b64encode(os.urandom(args.size))[: args.size]
        else:
            payload = os.urandom(args.size)
        _, conn = await loop.create_connection(
            lambda: Client(load, args.port, payload, opcode), "127.0.0.1", args.port
        )
        conns.append(conn)
        await conn.ready

    async def pause(seconds: float) -> None:
        """Sleep, but wake at the first failure of any connection."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(load.failed.wait(), seconds)
        if load.error:
            raise ConnectionError(load.error)

    try:
        coros = [connect() for _ in range(args.connections)]
        await asyncio.wait_for(asyncio.gather(*coros), args.timeout)
        for conn in conns:
            conn.send()
        await pause(args.warmup)
        emit("start")
        load.measuring, count0, t0 = True, load.count, time.perf_counter()
        await pause(args.duration)
        count1, t1 = load.count, time.perf_counter()
        load.measuring = False
        emit("stop")
        load.running = False
        await asyncio.wait_for(asyncio.gather(*(c.idle for c in conns)), args.timeout)
        if load.error:
            raise ConnectionError(load.error)
        silent = sum(1 for c in conns if c.n == 0)
        if silent:
            raise ConnectionError(f"{silent} of {len(conns)} connections got no echo at all")
        for conn in conns:
            conn.transport.write(encode_frame(FIN | OP_CLOSE, b"\x03\xe8", conn.mask))
        done, _ = await asyncio.wait([c.closed for c in conns], timeout=2)
    except (OSError, ConnectionError, TimeoutError) as e:
        return {"error": load.error or f"{type(e).__name__}: {e}"}
    finally:
        for conn in conns:
            conn.transport.close()
    lat = sorted(load.lat)
    q = statistics.quantiles(lat, n=100, method="inclusive") if len(lat) > 1 else [0.0] * 99
    return {
        "round_trips": count1 - count0,
        "secs": t1 - t0,
        "rps": (count1 - count0) / (t1 - t0),
        "p50_us": q[49] * 1e6,
        "p99_us": q[98] * 1e6,
        "min_per_conn": min(c.n for c in conns),
        "max_per_conn": max(c.n for c in conns),
        "clean_closes": sum(1 for f in done if f.result()),
        "connections": len(conns),
    }


def emit(what: str) -> None:
    """One line for bench/ws, which samples /proc CPU counters when it reads it."""
    sys.stdout.write(f"{MARK} {what}\n")
    sys.stdout.flush()


def client_main(argv: list[str]) -> int:
    """`bench/ws client --port N ...`: one load run; prints start/stop/result lines."""
    ap = argparse.ArgumentParser(prog="ws client")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--opcode", choices=("binary", "text"), default="binary")
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--timeout", type=float, default=10.0, help="connect/handshake/drain bound")
    result = uvloop.run(run_load(ap.parse_args(argv)))
    emit("result " + json.dumps(result))
    return 1 if "error" in result else 0


# ---------------------------------------------------------------------------- probe
def probe(port: int, sizes: list[int], timeout: float) -> None:
    """Check one connection end to end before benchmarking; ValueError says what broke.

    The small data frames leave in one write (the far end must split coalesced frames), the
    ping in two (it must join partial ones); sizes above 125 and 65535 exercise the 16- and
    64-bit lengths, text frames alternate with binary ones. Large frames go one at a time,
    so a proxy with small buffers cannot deadlock against this blocking socket.
    """
    got: list[tuple[int, bytes]] = []
    reader = FrameReader(False, lambda b0, payload: got.append((b0, payload)))
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        request, accept = client_handshake(port)
        s.sendall(request)
        head = b""
        while b"\r\n\r\n" not in head:
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                raise ValueError(f"no answer to the Upgrade request in {timeout:g} s") from None
            if not chunk or len(head) > MAX_HEAD:
                raise ValueError(f"no handshake answer (got {head[:80]!r})")
            head += chunk
        head, _, rest = head.partition(b"\r\n\r\n")
        check_101(head, accept)
        reader.feed(rest)  # frames that came with the 101 (there should be none)

        def expect(frames: list[tuple[int, bytes]], what: str) -> None:
            try:
                while len(got) < len(frames):
                    chunk = s.recv(65536)
                    if not chunk:
                        raise ValueError(f"connection closed while waiting for {what}")
                    reader.feed(chunk)
            except (TimeoutError, ProtocolError) as e:
                raise ValueError(f"{what}: {e or 'timed out'}") from e
            for (b0, payload), (want_b0, want) in zip(got, frames, strict=True):
                if b0 != want_b0 or payload != want:
                    raise ValueError(
                        f"{what}: frame {b0:#04x}/{len(payload)} B, expected "
                        f"{want_b0:#04x}/{len(want)} B (or other bytes)"
                    )
            got.clear()

        frames = []
        for i, size in enumerate(sizes):
            op = OP_TEXT if i % 2 else OP_BINARY
            payload = (
                base64.b64encode(os.urandom(size))[:size] if op == OP_TEXT else os.urandom(size)
            )
            frames.append((FIN | op, payload))
        small = [f for f in frames if len(f[1]) < 4096]  # together in one write
        for group in [small] + [[f] for f in frames if f not in small]:
            s.sendall(b"".join(encode_frame(b0, p, os.urandom(4)) for b0, p in group))
            expect(group, "echo")
        ping = encode_frame(FIN | OP_PING, b"probe", os.urandom(4))
        s.sendall(ping[:3])
        time.sleep(0.02)
        s.sendall(ping[3:])
        expect([(FIN | OP_PONG, b"probe")], "pong")
        s.sendall(encode_frame(FIN | OP_CLOSE, b"\x03\xe8", os.urandom(4)))
        expect([(FIN | OP_CLOSE, b"\x03\xe8")], "close reply")
