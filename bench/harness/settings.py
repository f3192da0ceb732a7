"""The command line, read into typed settings."""

import argparse
import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

ANCHORS = ("direct", "nginx", "nginx-auto", "nginx-gzip")
_NAME = re.compile(r"[A-Za-z0-9._+-]+")
# RFC 9110 section 5.6.2: a field name is a token.
_FIELD_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")

USAGE_NOTES = """\
Placeholders in a COMMAND or a --config template: {port} (the HTTP/1.1 port to listen on,
127.0.0.1), {h2c_port} (a second port: a proxy that mentions it is measured over h2c there,
otherwise on {port}), {upstream} (host:port of the origin), {upstream_host},
{upstream_port}, {workdir} (the run's scratch directory), {config} (the rendered --config).
Other braces are left as they are. COMMAND runs under bash -c in the current directory.

Anchors: direct (the origin itself), nginx (nginx as a reverse proxy, --nginx-workers),
nginx-auto (the same with one worker per CPU), nginx-gzip (nginx as the reverse proxy,
compressing what it proxies with gzip at level 6: `gzip_proxied any`).

The last line printed is ratio_vs_nginx=R: the first proxy's req/s over nginx's, HTTP/1.1,
first path, median of same-round ratios (against nginx-gzip, then direct, without the
nginx anchor: ratio_vs_nginx-gzip=R, ratio_vs_direct=R).
Exit status: 0, 2 on a setup error (missing tool, a server that does not start), 130 on
interrupt. Method and reading of the figures: bench/README.md.
"""


@dataclass(frozen=True, slots=True)
class Settings:
    """What one run does; see `parse` for each option's meaning."""

    proxies: tuple[tuple[str, str], ...]  # (name, command), in the order given
    templates: dict[str, Path]  # proxy name -> config template
    anchors: tuple[str, ...]
    paths: tuple[str, ...]
    headers: tuple[tuple[str, str], ...]  # (name, value): sent with every request
    repeats: int
    duration: int
    warmup: int
    connections: int
    threads: int
    h2c: bool
    h2c_same_port: bool
    h2_clients: int
    h2_streams: int
    nginx_workers: str
    origin_workers: str
    pairs: tuple[tuple[str, str], ...]  # (target, base)
    start_timeout: float
    max_minutes: float
    json: Path | None
    keep: bool
    no_install: bool

    @property
    def targets(self) -> int:
        return len(self.anchors) + len(self.proxies)

    def recorded(self) -> dict[str, object]:
        """The settings the JSON file records with the figures."""
        return {
            "paths": list(self.paths),
            "headers": [f"{name}: {value}" for name, value in self.headers],
            "anchors": list(self.anchors),
            "proxies": [name for name, _ in self.proxies],
            "repeats": self.repeats,
            "duration": self.duration,
            "warmup": self.warmup,
            "connections": self.connections,
            "threads": self.threads,
            "h2c": self.h2c,
            "h2_clients": self.h2_clients,
            "h2_streams": self.h2_streams,
            "nginx_workers": self.nginx_workers,
            "origin_workers": self.origin_workers,
        }


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="httpbench",
        description="Reverse proxies against nginx in the same run: interleaved rounds, "
        "medians of same-round ratios, CPU per request from /proc.",
        epilog=USAGE_NOTES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add(
        "--proxy",
        action="append",
        default=[],
        metavar="NAME=COMMAND",
        help="a proxy under test (repeatable; the last line is about the first)",
    )
    add(
        "--config",
        action="append",
        default=[],
        metavar="NAME=TEMPLATE",
        help="render TEMPLATE for proxy NAME into {config}",
    )
    add("--paths", default="/", help="comma-separated: /, /16k, /1m, /16k.json, with any query [/]")
    add(
        "--header",
        "-H",
        action="append",
        default=[],
        metavar="NAME:VALUE",
        help="a request header field sent to every target, by wrk and h2load (repeatable)",
    )
    add("--anchors", default="direct,nginx", help="comma-separated anchors [direct,nginx]")
    add("--repeats", type=int, default=5, help="interleaved rounds [5]")
    add("--duration", type=int, default=10, help="seconds per measured run [10]")
    add("--warmup", type=int, default=2, help="seconds of load per target and phase first [2]")
    add("--connections", "-c", type=int, default=64, help="wrk connections [64]")
    add("--threads", "-t", type=int, default=1, help="wrk threads [1]")
    add("--h2c", action="store_true", help="measure cleartext HTTP/2 with h2load too")
    add(
        "--h2c-same-port",
        action="store_true",
        help="proxies speak h2c on {port} even if they mention {h2c_port}",
    )
    add("--h2-clients", type=int, default=10, help="h2load connections [10]")
    add("--h2-streams", type=int, default=10, help="h2load streams per connection [10]")
    add("--nginx-workers", default="1", help="worker_processes of the nginx anchor [1]")
    add("--origin-workers", "--upstream-workers", default="1", help="the origin's [1]")
    add(
        "--pair",
        action="append",
        default=[],
        metavar="TARGET/BASE",
        help="also print TARGET/BASE same-round ratios (repeatable)",
    )
    add("--start-timeout", type=float, default=20, help="seconds a server has to start [20]")
    add("--max-minutes", type=float, default=60, help="refuse a longer plan [60]")
    add("--json", type=Path, metavar="FILE", help="write every round and the medians to FILE")
    add("--keep", action="store_true", help="keep the scratch directory (configs, logs)")
    add("--no-install", action="store_true", help="never run bench/deps for missing tools")
    add("command", nargs=argparse.REMAINDER, help="-- COMMAND: one proxy under test, `proxy`")
    return parser


def parse(argv: Sequence[str]) -> Settings:
    """Settings from a command line; exits with status 2 and a message on a bad one."""
    parser = _parser()
    ns = parser.parse_args(argv)

    specs: list[str] = list(ns.proxy)
    words: list[str] = ns.command[1:] if ns.command[:1] == ["--"] else ns.command
    if words:
        specs.append("proxy=" + (words[0] if len(words) == 1 else shlex.join(words)))
    proxies = []
    for spec in specs:
        name, _, command = spec.partition("=")
        if not _NAME.fullmatch(name) or not command.strip():
            parser.error(f"--proxy wants NAME=COMMAND, NAME of letters, digits, ._+-: {spec!r}")
        proxies.append((name, command))
    templates = {}
    for spec in ns.config:
        name, _, template = spec.partition("=")
        if not name or not template:
            parser.error(f"--config wants NAME=TEMPLATE: {spec!r}")
        templates[name] = Path(template)
    anchors = tuple(name for name in ns.anchors.split(",") if name)
    for name in anchors:
        if name not in ANCHORS:
            parser.error(f"unknown anchor {name!r} (known: {', '.join(ANCHORS)})")
    names = [*anchors, *(name for name, _ in proxies)]
    if len(set(names)) != len(names):
        parser.error(f"the targets' names must differ: {', '.join(names)}")
    for name in templates:
        if name not in dict(proxies):
            parser.error(f"--config {name}=...: no --proxy {name}")
    paths = tuple(p if p.startswith("/") else "/" + p for p in ns.paths.split(",") if p)
    if not paths:
        parser.error("--paths names no path")
    headers = []
    for spec in ns.header:
        name, colon, value = spec.partition(":")
        if not colon or not _FIELD_NAME.fullmatch(name) or "\n" in value or "\r" in value:
            parser.error(f"--header wants NAME:VALUE, NAME a field name: {spec!r}")
        headers.append((name, value.strip()))
    pairs = []
    for spec in ns.pair:
        target, _, base = spec.partition("/")
        if target not in names or base not in names:
            parser.error(f"--pair wants TARGET/BASE, of {', '.join(names)}: {spec!r}")
        pairs.append((target, base))
    for option in ("repeats", "duration", "warmup", "connections", "threads"):
        if getattr(ns, option) < 1:
            parser.error(f"--{option} must be at least 1")
    if ns.h2_clients < 1 or ns.h2_streams < 1:
        parser.error("--h2-clients and --h2-streams must be at least 1")
    return Settings(
        proxies=tuple(proxies),
        templates=templates,
        anchors=anchors,
        paths=paths,
        headers=tuple(headers),
        repeats=ns.repeats,
        duration=ns.duration,
        warmup=ns.warmup,
        connections=ns.connections,
        threads=ns.threads,
        h2c=ns.h2c,
        h2c_same_port=ns.h2c_same_port,
        h2_clients=ns.h2_clients,
        h2_streams=ns.h2_streams,
        nginx_workers=ns.nginx_workers,
        origin_workers=ns.origin_workers,
        pairs=tuple(pairs),
        start_timeout=ns.start_timeout,
        max_minutes=ns.max_minutes,
        json=ns.json,
        keep=ns.keep,
        no_install=ns.no_install,
    )
