"""nginx configurations: the origin every target proxies to, and nginx as the anchor proxy.

Both run one worker by default and write nothing per request (no access log, temp files
under the run's directory). The origin serves `/` (12 bytes, "hello world\\n"), and `/16k`
and `/1m` as static files of 16 KiB and 1 MiB, and `/16k.json`, 16 KiB of JSON records
(harness/bodies.py) as application/json, which compresses about 5x. The anchor proxies
everything to the origin over a keep-alive pool of 256 connections, with buffers large
enough that a 1 MiB response never reaches a temp file: the settings a tuned production
nginx would have, so that the anchor is not handicapped on `/1m`. The `nginx-gzip` anchor
is the same, compressing what it proxies with gzip as Gatehouse's `compress` does by
default: level 6, JSON and text, from 1 KiB, with `Vary: Accept-Encoding`.

Cleartext HTTP/2 (prior knowledge) is a second listener when asked for: `listen ...;
http2 on;` from nginx 1.25.1, `listen ... http2;` before.
"""

import re
import subprocess
from pathlib import Path

from harness.bodies import json_body

Version = tuple[int, int, int]

_HTTP2_ON_SINCE: Version = (1, 25, 1)
_BODIES = {"16k": b"x" * 16 * 1024, "1m": b"x" * 1024 * 1024, "16k.json": json_body(16 * 1024)}
# The nginx-gzip anchor's gzip_comp_level: the default gzip_level of Gatehouse's compress
# (middleware/compress_codecs.py, DEFAULT_LEVELS).
GZIP_LEVEL = 6


def version(binary: str) -> Version:
    """The version `nginx -v` reports ((0, 0, 0) if it says none)."""
    done = subprocess.run([binary, "-v"], capture_output=True, text=True, timeout=10)
    found = re.search(r"nginx/(\d+)\.(\d+)\.(\d+)", done.stderr + done.stdout)
    if found is None:
        return (0, 0, 0)
    major, minor, patch = (int(part) for part in found.groups())
    return (major, minor, patch)


def write_docroot(directory: Path) -> None:
    """The origin's static files, readable by an unprivileged nginx worker."""
    directory.mkdir(parents=True)
    directory.chmod(0o755)
    for name, body in _BODIES.items():
        path = directory / name
        path.write_bytes(body)
        path.chmod(0o644)


def _listener(port: int, h2c: bool, nginx: Version) -> str:
    if not h2c:
        return f"    listen 127.0.0.1:{port} backlog=4096;\n"
    if nginx >= _HTTP2_ON_SINCE:
        return f"    listen 127.0.0.1:{port} backlog=4096;\n    http2 on;\n"
    return f"    listen 127.0.0.1:{port} http2 backlog=4096;\n"


def _wrap(workdir: Path, workers: str, http_body: str) -> str:
    """The main and http contexts around http_body: logs, pid and temp files in workdir."""
    temp = "".join(
        f"  {kind}_temp_path {workdir}/temp-{kind};\n"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return (
        "daemon off;\n"
        f"worker_processes {workers};\n"
        f"pid {workdir}/nginx.pid;\n"
        f"error_log {workdir}/error.log warn;\n"
        "events {\n  worker_connections 16384;\n}\n"
        "http {\n"
        "  access_log off;\n"
        "  sendfile on;\n"
        "  default_type application/octet-stream;\n"
        "  keepalive_timeout 120s;\n"
        "  keepalive_requests 1000000;\n"
        f"{temp}"
        f"{http_body}"
        "}\n"
    )


def _servers(location: str, port: int, h2c_port: int | None, nginx: Version) -> str:
    text = "  server {\n" + _listener(port, False, nginx) + location + "  }\n"
    if h2c_port is not None:
        text += "  server {\n" + _listener(h2c_port, True, nginx) + location + "  }\n"
    return text


def origin_config(
    workdir: Path, docroot: Path, port: int, h2c_port: int | None, nginx: Version, workers: str
) -> str:
    """The origin: `/` from the config, everything else from docroot (`/16k.json` as
    application/json); `/cached`, the same 12 bytes with `Cache-Control: max-age=3600`;
    and a stand-in for an OpenTelemetry collector at /v1/traces (the tracing configs
    export there), which reads and discards each export."""
    location = (
        f"    root {docroot};\n"
        '    location = / {\n      default_type text/plain;\n      return 200 "hello world\\n";\n'
        "    }\n"
        "    location = /v1/traces {\n      return 200;\n    }\n"
        # What a shared cache may keep for an hour (bench/cache: hit against proxied).
        "    location = /cached {\n      default_type text/plain;\n"
        '      add_header Cache-Control "max-age=3600";\n      return 200 "hello world\\n";\n'
        "    }\n"
        # A compressible API answer (bench/compress); nginx's built-in types know no .json.
        "    location = /16k.json {\n      default_type application/json;\n    }\n"
        "    location / {\n    }\n"
    )
    return _wrap(workdir, workers, _servers(location, port, h2c_port, nginx))


def _gzip(level: int) -> str:
    """Compressing proxied answers as `compress` does by default: the level given, its
    media types that the origin serves, from 1 KiB, Vary added."""
    return (
        "      gzip on;\n"
        "      gzip_proxied any;\n"
        f"      gzip_comp_level {level};\n"
        "      gzip_types text/plain application/json;\n"
        "      gzip_min_length 1024;\n"
        "      gzip_vary on;\n"
    )


def anchor_config(
    workdir: Path,
    port: int,
    h2c_port: int | None,
    origin: str,
    nginx: Version,
    workers: str,
    gzip_level: int | None = None,
) -> str:
    """nginx as the reference reverse proxy in front of origin (host:port); with
    gzip_level, compressing what it proxies (the nginx-gzip anchor)."""
    pool = (
        "  upstream origin {\n"
        f"    server {origin};\n"
        "    keepalive 256;\n"
        "    keepalive_requests 1000000;\n"
        "  }\n"
    )
    location = (
        "    location / {\n"
        "      proxy_pass http://origin;\n"
        "      proxy_http_version 1.1;\n"
        '      proxy_set_header Connection "";\n'
        "      proxy_buffers 8 64k;\n"
        "      proxy_busy_buffers_size 128k;\n"
        "      proxy_max_temp_file_size 0;\n"
        f"{_gzip(gzip_level) if gzip_level is not None else ''}"
        "    }\n"
    )
    return _wrap(workdir, workers, pool + _servers(location, port, h2c_port, nginx))


def command(binary: str, workdir: Path) -> list[str]:
    """The command line running the configuration written to workdir/nginx.conf."""
    return [
        binary,
        "-p",
        str(workdir),
        "-e",
        str(workdir / "error.log"),
        "-c",
        str(workdir / "nginx.conf"),
    ]
