"""A tiny echo service to try Gatehouse with: `python -m proxy.tools.echo --port 8001`.

It answers every request with JSON describing what it received (method, target, headers,
body size), so a newcomer can see what the gateway forwarded: rewritten paths,
X-Forwarded-* and Via. It is a demo, not part of the data path.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import logging

import h11

log = logging.getLogger(__name__)


async def _serve(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, name: str = "echo"
) -> None:
    conn = h11.Connection(h11.SERVER)
    try:
        while True:
            request: h11.Request | None = None
            size = 0
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await reader.read(65536))
                elif isinstance(event, h11.Request):
                    request = event
                elif isinstance(event, h11.Data):
                    size += len(event.data)
                elif isinstance(event, h11.EndOfMessage):
                    break
                else:
                    return  # ConnectionClosed or PAUSED: done with this client
            assert request is not None
            payload = {
                "service": name,
                "method": request.method.decode(),
                "target": request.target.decode("latin-1"),
                "headers": {k.decode(): v.decode("latin-1") for k, v in request.headers},
                "body_bytes": size,
            }
            body = json.dumps(payload, indent=2).encode() + b"\n"
            headers = [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
            writer.write(conn.send(h11.Response(status_code=200, headers=headers)))
            writer.write(conn.send(h11.Data(data=body)))
            writer.write(conn.send(h11.EndOfMessage()))
            await writer.drain()
            if conn.our_state is not h11.DONE:
                return
            conn.start_next_cycle()
    except (ConnectionError, h11.ProtocolError):
        return
    finally:
        writer.close()


async def serve(host: str, port: int, name: str = "echo") -> None:
    """Serve until cancelled; answers say they come from `name`."""
    server = await asyncio.start_server(functools.partial(_serve, name=name), host, port)
    log.info("%s service on http://%s:%d", name, host, port)
    async with server:
        await server.serve_forever()


def main() -> None:
    """`python -m proxy.tools.echo [--host H] [--port P] [--name N]`."""
    parser = argparse.ArgumentParser(description="Gatehouse demo echo service")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--name", default="echo", help='the "service" its answers name')
    args = parser.parse_args()
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(message)s")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.host, args.port, args.name))


if __name__ == "__main__":
    main()
