"""`gatehouse run FILE`, `gatehouse check FILE` (like `nginx -t`),
`gatehouse reload FILE` (like `nginx -s reload`) and `gatehouse schema` (routes.yaml's
JSON Schema, for editors). `run`, `check` and `reload` also take an etcd key,
`etcd://HOST:PORT/PREFIX/KEY`, which `push` writes and `pull` reads
(proxy/tools/etcd_commands.py).

Exit codes: 0 success; 1 invalid configuration (or a reload refused); 2 usage error
(including an admin listener that cannot be reached or will not take the request: no or a
wrong token, a Host it does not answer for; etcd out of reach); 3 could not start (a
listener failed to bind); 4 a push refused because the key changed since it was read.
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import traceback
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import replace

from metrics.admin_access import CSRF_HEADER
from metrics.gateway import CONFIG_RELOADS
from middleware.rate_limit_local import SHARED_DIR_ENV
from proxy.buildinfo import version_line
from proxy.config.document import ConfigError
from proxy.config.load import load_config, parse_config
from proxy.config.model import Config
from proxy.process.cpus import usable_cpus
from proxy.process.logs import LOG_FORMATS, configure_logging
from proxy.source.base import ConfigSource, ConfigText, is_etcd_location
from proxy.source.cache import CACHE_ENV, DEFAULT_CACHE_PATH, cache_path
from proxy.source.file import FileSource
from proxy.tools.passwords import DEFAULT_COST, MAX_COST, MIN_COST, hash_password_command
from proxy.tools.schema import build_schema

log = logging.getLogger("proxy")

EXIT_OK, EXIT_CONFIG, EXIT_USAGE, EXIT_START = 0, 1, 2, 3


class _PrintVersion(argparse.Action):
    """`--version`: the one line as it is (argparse's own version action re-wraps it at
    the terminal's width, splitting a library's name from its version)."""

    def __call__(self, parser: argparse.ArgumentParser, *args: object, **kwargs: object) -> None:
        sys.stdout.write(version_line() + "\n")
        parser.exit()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gatehouse", description="Gatehouse API gateway")
    parser.add_argument(
        "--version",
        action=_PrintVersion,
        nargs=0,
        help=(
            "the version, whether the compiled build runs (GATEHOUSE_PURE_PYTHON=1: not), "
            "Python's, and h2's, httptools' and uvloop's"
        ),
    )
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="serve a routes.yaml")
    run.add_argument("config", help="path to routes.yaml, or etcd://HOST:PORT/PREFIX/KEY")
    run.add_argument(
        "--config-cache",
        help=f"with etcd: the file that keeps the last good document, to start from while "
        f"etcd is down (default: ${CACHE_ENV}, else ./{DEFAULT_CACHE_PATH})",
    )
    run.add_argument(
        "--workers",
        type=int,
        help="worker processes (default: from the file, else one per usable CPU)",
    )
    run.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    run.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    run.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        help="process logs as text lines or one JSON object per line (default: routes.yaml's "
        "logging.format, else text)",
    )
    check = commands.add_parser("check", help="validate a routes.yaml and exit")
    check.add_argument("config", help="path to routes.yaml, or etcd://HOST:PORT/PREFIX/KEY")
    push = commands.add_parser(
        "push",
        help="validate a routes.yaml and write it to an etcd key, if nobody else did since "
        "it was read (compare-and-swap)",
    )
    push.add_argument("file", help="path to routes.yaml")
    push.add_argument("url", help="etcd://HOST:PORT/PREFIX/KEY")
    push.add_argument(
        "--expect-revision",
        type=int,
        help="write only if the key is at this mod_revision (from an earlier check or "
        "pull; 0: only if it does not exist); default: the revision read just before",
    )
    pull = commands.add_parser(
        "pull", help="print the routes.yaml an etcd key holds (its revision on stderr)"
    )
    pull.add_argument("url", help="etcd://HOST:PORT/PREFIX/KEY")
    reload = commands.add_parser(
        "reload", help="make a running gateway reload its routes.yaml (via its admin listener)"
    )
    reload.add_argument(
        "config", help="path to the routes.yaml the gateway runs, or its etcd:// key"
    )
    reload.add_argument("--admin", help="the admin listener, HOST:PORT (default: admin.bind)")
    explain = commands.add_parser(
        "explain", help="which route a request takes, and why (no traffic is sent)"
    )
    explain.add_argument("config", help="path to routes.yaml")
    explain.add_argument("method", help="GET, POST, ...")
    explain.add_argument("url", help="http://host/path?query, or /path (host from -H Host)")
    explain.add_argument(
        "-H", "--header", action="append", default=[], help="'Name: value' (repeatable)"
    )
    routes = commands.add_parser("routes", help="the route table, in the order routes are tried")
    routes.add_argument("config", help="path to routes.yaml")
    hashing = commands.add_parser(
        "hash-password",
        help="a bcrypt hash for basic_auth (the password from the terminal, or stdin's first line)",
    )
    commands.add_parser(
        "schema",
        help="print the JSON Schema of routes.yaml, for editors "
        "(gatehouse schema > gatehouse.schema.json)",
    )
    hashing.add_argument("--user", help="print an htpasswd line, USER:HASH")
    hashing.add_argument(
        "--cost",
        type=int,
        default=DEFAULT_COST,
        help=f"bcrypt's cost factor, {MIN_COST}-{MAX_COST} (default {DEFAULT_COST})",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `gatehouse` console script."""
    args = _parser().parse_args(argv)
    if args.command in ("check", "push", "pull"):
        from proxy.tools import etcd_commands

        if args.command == "push":
            return etcd_commands.push(args.file, args.url, args.expect_revision)
        if args.command == "pull":
            return etcd_commands.pull(args.url)
        if is_etcd_location(args.config):
            return etcd_commands.check_etcd(args.config)
        return _check(args.config)
    if args.command == "reload":
        return _reload(args.config, args.admin)
    if args.command in ("explain", "routes"):
        return _explain(args)
    if args.command == "hash-password":
        return hash_password_command(args.user, args.cost)
    if args.command == "schema":
        sys.stdout.write(json.dumps(build_schema(), indent=2, ensure_ascii=False) + "\n")
        return EXIT_OK
    # The format routes.yaml asks for (`logging.format`) is applied once it is read
    # (_run); until then, and whenever --log-format is given, the flag's (text by default).
    configure_logging(args.log_level, args.log_format or "text")
    # A SIGHUP (reload) before the supervisor's handler is in place must not kill the
    # gateway with the default action; there is nothing to reload yet anyway.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    # Shared state that every process of this gateway opens by name (the local rate-limit
    # tables), made before the config is loaded: its middleware are built at load.
    shared_dir = _shared_dir()
    os.environ[SHARED_DIR_ENV] = shared_dir
    try:
        return _run(args)
    finally:
        shutil.rmtree(shared_dir, ignore_errors=True)
        os.environ.pop(SHARED_DIR_ENV, None)


def _shared_dir() -> str:
    """A private directory named after this process; those of gateways that died
    without cleaning up (SIGKILL) are removed first."""
    parent = "/dev/shm" if os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()
    for stale in glob.glob(os.path.join(parent, "gatehouse-*-*")):
        pid = os.path.basename(stale).split("-")[1]
        if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            shutil.rmtree(stale, ignore_errors=True)
    return tempfile.mkdtemp(prefix=f"gatehouse-{os.getpid()}-", dir=parent)


def _open_source(args: argparse.Namespace) -> tuple[ConfigSource, ConfigText]:
    """The config source the command line names, and its document to start with.

    Raises:
        ConfigError: it cannot be read (etcd: nor its cache), or the URL is not one.
    """
    if not is_etcd_location(args.config):
        source = FileSource(args.config)
        return source, source.first()
    from proxy.source.etcd import EtcdSource
    from proxy.source.etcd_client import EtcdSettingsError
    from proxy.source.etcd_url import EtcdUrlError, parse_etcd_url

    try:
        location = parse_etcd_url(args.config)
        etcd = EtcdSource(location, cache_path(args.config_cache))
    except (EtcdUrlError, EtcdSettingsError) as exc:
        raise ConfigError([f"{args.config}:1: {exc}"]) from None
    return etcd, asyncio.run(etcd.first())


def _start_on_fallback(
    source: ConfigSource, refused: ConfigText
) -> tuple[ConfigText, Config] | None:
    """The source's fallback (etcd's cached last good document) and its config, when the
    first document was refused; None when there is none, or it is invalid too. The
    refusal is counted as a failed reload, and the refused revision is not offered again:
    the watch follows the next one written."""
    CONFIG_RELOADS.labels("failure").inc()
    fallback = source.fallback()
    if fallback is None or fallback.revision == refused.revision:
        return None
    try:
        config = parse_config(fallback.text, source=fallback.source)
    except ConfigError as exc:
        for line in exc.errors:
            log.error("%s", line)
        return None
    source.refused(refused)
    log.warning(
        "%s is refused: starting on %s, the last good config (cached), until a valid one "
        "is written",
        refused.source,
        fallback.source,
    )
    return fallback, config


def _run(args: argparse.Namespace) -> int:
    try:
        source, loaded = _open_source(args)
    except ConfigError as exc:
        for line in exc.errors:
            log.error("%s", line)
        return EXIT_CONFIG
    try:
        config = parse_config(loaded.text, source=loaded.source)
    except ConfigError as exc:
        for line in exc.errors:
            log.error("%s", line)
        started = _start_on_fallback(source, loaded)
        if started is None:
            return EXIT_CONFIG
        loaded, config = started
    source.taken(loaded)
    if args.log_format is None and config.log_format != "text":
        configure_logging(args.log_level, config.log_format)
    workers = args.workers if args.workers is not None else config.workers or usable_cpus()
    if workers < 1:
        log.error("--workers must be at least 1")
        return EXIT_USAGE
    from proxy.process.supervisor import Supervisor
    from proxy.process.worker import run_worker

    supervisor = Supervisor(
        replace(config, workers=workers),
        loaded,
        source,
        workers,
        lambda cfg, control: run_worker(cfg, control, loop=args.loop, reuse_port=True),
    )
    return asyncio.run(supervisor.run())


def _check(path: str) -> int:
    try:
        config = load_config(path)
    except ConfigError as exc:
        for line in exc.errors:
            print(line, file=sys.stderr)  # noqa: T201 - the command's output
        print(f"{path}: {len(exc.errors)} error(s)", file=sys.stderr)  # noqa: T201
        return EXIT_CONFIG
    except Exception as exc:  # a bug: still one `file:line` error, then the traceback
        print(f"{path}:1: cannot load the config (a bug): {exc!r}", file=sys.stderr)  # noqa: T201
        traceback.print_exc()
        return EXIT_CONFIG
    routes, upstreams = len(config.routes), len(config.upstreams)
    print(f"{path}: ok ({routes} routes, {upstreams} upstreams)")  # noqa: T201
    return EXIT_OK


def _explain(args: argparse.Namespace) -> int:
    """`gatehouse explain` and `gatehouse routes`: exit 0, or 1 for an invalid file, or 2
    for a header that is not `Name: value`."""
    from proxy.tools.explain import explain, render_explanation, render_routes

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        for line in exc.errors:
            print(line, file=sys.stderr)  # noqa: T201
        return EXIT_CONFIG
    if args.command == "routes":
        print(render_routes(config))  # noqa: T201 - the command's output
        return EXIT_OK
    headers = []
    for raw in args.header:
        name, colon, value = raw.partition(":")
        if not colon or not name.strip():
            print(f"-H {raw!r}: expected 'Name: value'", file=sys.stderr)  # noqa: T201
            return EXIT_USAGE
        headers.append((name.strip(), value.strip()))
    found = explain(config, args.method.upper(), args.url, headers)
    print(render_explanation(config, found))  # noqa: T201 - the command's output
    return EXIT_OK


def _config_to_reload(path: str, admin: str | None) -> Config | int | None:
    """The config `reload` finds the admin listener in; None when it cannot be read but
    --admin says where to ask (the gateway then says what is wrong); else the exit code,
    with why printed."""
    if is_etcd_location(path):
        from proxy.tools import etcd_commands

        loaded = etcd_commands.load(path)  # prints why not
        if isinstance(loaded, int):
            if admin is not None:
                return None
            print(f"{path}: not reloading", file=sys.stderr)  # noqa: T201
        return loaded
    try:
        return load_config(path)
    except ConfigError as exc:
        if admin is not None:
            return None
        for line in exc.errors:
            print(line, file=sys.stderr)  # noqa: T201
        print(f"{path}: not reloading an invalid file", file=sys.stderr)  # noqa: T201
        return EXIT_CONFIG


def _reload(path: str, admin: str | None) -> int:
    """POST /reload to the gateway's admin listener; print what it answered. The address
    is admin.bind's (or --admin), the bearer token admin.token's, both read from `path`
    (a file, or the etcd key the gateway runs)."""
    config = _config_to_reload(path, admin)
    if isinstance(config, int):
        return config
    settings = config.admin if config is not None else None
    if admin is None:
        if settings is None:
            print(  # noqa: T201
                f"{path}: no admin listener (admin.bind) to ask; send SIGHUP to the "
                "gateway's parent process instead",
                file=sys.stderr,
            )
            return EXIT_USAGE
        host = "127.0.0.1" if settings.host in ("0.0.0.0", "") else settings.host
        host = "::1" if host == "::" else host
        admin = f"[{host}]:{settings.port}" if ":" in host else f"{host}:{settings.port}"
    # A header no browser page can send: the admin listener takes no POST without one.
    headers = {CSRF_HEADER: "gatehouse reload"}
    if settings is not None and settings.token is not None:
        headers["Authorization"] = f"Bearer {settings.token}"
    request = urllib.request.Request(
        f"http://{admin}/reload", method="POST", data=b"", headers=headers
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            json.load(response)
    except urllib.error.HTTPError as exc:
        answer = json.load(exc)
        if exc.code in (401, 403, 421):  # the listener would not take it: not the file's fault
            print(  # noqa: T201
                f"the admin listener at {admin} refused the request ({exc.code}): "
                f"{answer.get('message', answer.get('error'))}",
                file=sys.stderr,
            )
            return EXIT_USAGE
        for line in answer.get("errors", []):
            print(line, file=sys.stderr)  # noqa: T201
        print(f"reload refused ({exc.code}); the running config stays", file=sys.stderr)  # noqa: T201
        return EXIT_CONFIG
    except OSError as exc:
        print(f"cannot reach the admin listener at {admin}: {exc}", file=sys.stderr)  # noqa: T201
        return EXIT_USAGE
    print(f"reloaded {path}")  # noqa: T201
    return EXIT_OK
