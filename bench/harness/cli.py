"""The command line, and the order of a run: tools, servers, phases, report, cleanup."""

import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from harness import nginx
from harness.figures import Round
from harness.load import WRK_HOOK, LoadError, Sample, first_response, h2load, wrk
from harness.processes import (
    TICKS_PER_SECOND,
    Server,
    ServerSet,
    free_ports,
    machine_ticks,
    wait_until_serving,
)
from harness.report import (
    PROTOCOL_TITLES,
    anchor_ratios,
    pair_lines,
    phase_key,
    summary_line,
    table,
    write_json,
)
from harness.settings import Settings, parse

DEPS = Path(__file__).resolve().parent.parent / "deps"
PLACEHOLDERS = (
    "port",
    "h2c_port",
    "upstream",
    "upstream_host",
    "upstream_port",
    "workdir",
    "config",
)
_PLACEHOLDER = re.compile(r"\{(" + "|".join(PLACEHOLDERS) + r")\}")
_SBIN = ("/usr/local/sbin", "/usr/sbin", "/sbin")
# Rough time per load run beyond its duration (start, connections, CPU reads).
_RUN_OVERHEAD = 0.3


class SetupError(Exception):
    """The run cannot start: a tool is missing, a server did not come up, bad arguments."""


def log(message: str) -> None:
    print(f"[httpbench] {message}", file=sys.stderr, flush=True)


@dataclass
class Target:
    """Something load is sent to: the origin itself, an anchor, or a proxy under test."""

    name: str
    port: int
    h2c_port: int | None  # None: not measured over h2c
    server: Server | None  # None for `direct`: the origin's CPU has its own column
    command: str | None = None

    def port_for(self, protocol: str) -> int | None:
        return self.port if protocol == "h1" else self.h2c_port


@dataclass
class Run:
    """The state of one run: settings, tools, the origin and every target."""

    settings: Settings
    workdir: Path
    servers: ServerSet
    tools: dict[str, str]
    nginx_version: nginx.Version
    origin: Server | None = None
    origin_port: int = 0
    targets: list[Target] = field(default_factory=list)


# ---------------------------------------------------------------------------- tools
def find_tool(name: str) -> str | None:
    return shutil.which(name, path=os.pathsep.join([os.environ.get("PATH", ""), *_SBIN]))


def tools_needed(settings: Settings) -> dict[str, str]:
    """name -> path of every program the run drives; installs the missing ones if allowed.

    Raises:
        SetupError: a program is missing and could not be installed.
    """
    names = ["nginx", "wrk"] + (["h2load"] if settings.h2c else [])
    missing = [name for name in names if find_tool(name) is None]
    if missing and not settings.no_install:
        log(f"missing {', '.join(missing)}: running bench/deps")
        subprocess.run([str(DEPS), *missing], check=False, timeout=1800)
        missing = [name for name in names if find_tool(name) is None]
    if missing:
        raise SetupError(f"missing {', '.join(missing)}: run bench/deps {' '.join(missing)}")
    return {name: path for name in names if (path := find_tool(name)) is not None}


def raise_open_files_limit() -> None:
    """Let the servers and load generators started from here open many sockets."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 65536 if hard == resource.RLIM_INFINITY else hard
    if soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        except (ValueError, OSError) as exc:
            log(f"could not raise the open files limit from {soft}: {exc}")


# -------------------------------------------------------------------------- servers
def substitute(text: str, values: dict[str, object]) -> str:
    """Replace the known {placeholders}; any other brace stays."""
    return _PLACEHOLDER.sub(lambda found: str(values[found.group(1)]), text)


def start_nginx(run: Run, name: str, config: str, port: int, path: str) -> Server:
    directory = run.workdir / name
    directory.mkdir()
    (directory / "nginx.conf").write_text(config)
    server = run.servers.start(
        name, nginx.command(run.tools["nginx"], directory), directory / "output.log"
    )
    wait_until_serving(server, port, path, run.settings.start_timeout)
    return server


def start_origin(run: Run) -> None:
    docroot = run.workdir / "docroot"
    nginx.write_docroot(docroot)
    port, h2c_port = free_ports(2)
    config = nginx.origin_config(
        run.workdir / "origin",
        docroot,
        port,
        h2c_port if run.settings.h2c else None,
        run.nginx_version,
        run.settings.origin_workers,
    )
    run.origin = start_nginx(run, "origin", config, port, "/")
    run.origin_port = port
    if "direct" in run.settings.anchors:
        run.targets.append(Target("direct", port, h2c_port if run.settings.h2c else None, None))


def start_anchors(run: Run) -> None:
    for name in run.settings.anchors:
        if name == "direct":
            continue
        port, h2c_port = free_ports(2)
        h2c = h2c_port if run.settings.h2c else None
        workers = "auto" if name == "nginx-auto" else run.settings.nginx_workers
        config = nginx.anchor_config(
            run.workdir / name,
            port,
            h2c,
            f"127.0.0.1:{run.origin_port}",
            run.nginx_version,
            workers,
            gzip_level=nginx.GZIP_LEVEL if name == "nginx-gzip" else None,
        )
        server = start_nginx(run, name, config, port, "/")
        run.targets.append(Target(name, port, h2c, server))


def start_proxy(run: Run, name: str, command: str) -> None:
    port, h2c_port = free_ports(2)
    values: dict[str, object] = {
        "port": port,
        "h2c_port": h2c_port,
        "upstream": f"127.0.0.1:{run.origin_port}",
        "upstream_host": "127.0.0.1",
        "upstream_port": run.origin_port,
        "workdir": run.workdir,
        "config": "",
    }
    template_text = ""
    template = run.settings.templates.get(name)
    if template is not None:
        try:
            template_text = template.read_text()
        except OSError as exc:
            raise SetupError(f"--config {name}={template}: {exc}") from None
        rendered = run.workdir / "configs" / f"{name}-{template.name.removesuffix('.tmpl')}"
        rendered.parent.mkdir(exist_ok=True)
        values["config"] = rendered
        rendered.write_text(substitute(template_text, values))
    line = substitute(command, values)
    log(f"starting {name}: {line}")
    server = run.servers.start(name, line, run.workdir / f"{name}.log")
    wait_until_serving(server, port, run.settings.paths[0], run.settings.start_timeout)
    h2c: int | None = None
    if run.settings.h2c:
        mentions = "{h2c_port}" in command or "{h2c_port}" in template_text
        if mentions and not run.settings.h2c_same_port:
            wait_until_serving(server, h2c_port, None, run.settings.start_timeout)
            h2c = h2c_port
        else:
            h2c = port
    run.targets.append(Target(name, port, h2c, server, line))


# ------------------------------------------------------------------------------ load
def load_once(run: Run, protocol: str, port: int, path: str, seconds: int) -> Sample:
    url = f"http://127.0.0.1:{port}{path}"
    if protocol == "h1":
        return wrk(
            run.tools["wrk"],
            run.workdir / "hook.lua",
            url,
            threads=run.settings.threads,
            connections=run.settings.connections,
            seconds=seconds,
            headers=run.settings.headers,
        )
    return h2load(
        run.tools["h2load"],
        url,
        clients=run.settings.h2_clients,
        streams=run.settings.h2_streams,
        seconds=seconds,
        headers=run.settings.headers,
    )


def no_success(sample: Sample) -> str:
    """Why a load run completed no request, as far as the load generator tells."""
    if sample.errors or sample.non2xx:
        return f"no successful request ({sample.errors} errors, {sample.non2xx} not 2xx)"
    return "no answer at all (does it speak this protocol?)"


def measured_round(run: Run, target: Target, protocol: str, path: str, index: int) -> Round:
    """One measured run of target, with the CPU its processes and the origin used meanwhile."""
    port = target.port_for(protocol)
    assert port is not None
    assert run.origin is not None
    if target.server is not None and not target.server.alive():
        return Round(index, error=f"exited (status {target.server.popen.returncode})")
    own = target.server.cpu_ticks() if target.server is not None else 0
    origin = run.origin.cpu_ticks()
    busy, total = machine_ticks()
    try:
        sample = load_once(run, protocol, port, path, run.settings.duration)
    except LoadError as exc:
        return Round(index, error=str(exc))
    busy_after, total_after = machine_ticks()
    if sample.requests == 0:
        return Round(index, error=no_success(sample))
    seconds_per_10k = 1e4 / sample.requests / TICKS_PER_SECOND
    elapsed = total_after - total
    return Round(
        index,
        sample=sample,
        cpu10k=(target.server.cpu_ticks() - own) * seconds_per_10k
        if target.server is not None
        else None,
        origin_cpu10k=(run.origin.cpu_ticks() - origin) * seconds_per_10k,
        idle_pct=100 * (elapsed - (busy_after - busy)) / elapsed if elapsed else None,
    )


def measure_phase(run: Run, protocol: str, path: str) -> dict[str, list[Round]]:
    """Warm every target up, then the rounds, alternating the order (A B C, C B A, ...)."""
    targets = [target for target in run.targets if target.port_for(protocol) is not None]
    rounds: dict[str, list[Round]] = {target.name: [] for target in targets}
    unusable: dict[str, str] = {}
    for target in targets:
        port = target.port_for(protocol)
        assert port is not None
        try:
            warm = load_once(run, protocol, port, path, run.settings.warmup)
        except LoadError as exc:
            unusable[target.name] = f"warm-up failed: {exc}"
            continue
        if warm.requests == 0:
            unusable[target.name] = f"warm-up: {no_success(warm)}"
        elif run.settings.headers and protocol == "h1":
            # What the fields made of the answer: shows, say, that a target compressed.
            try:
                answer = first_response(port, path, run.settings.headers)
            except LoadError as exc:
                answer = str(exc)
            log(f"{protocol} {path} {target.name} answers: {answer}")
    for name, reason in unusable.items():
        log(f"{protocol} {path} {name}: {reason}")
    for index in range(run.settings.repeats):
        order = targets if index % 2 == 0 else targets[::-1]
        for target in order:
            if target.name in unusable:
                rounds[target.name].append(Round(index, error=unusable[target.name]))
                continue
            one = measured_round(run, target, protocol, path, index)
            rounds[target.name].append(one)
            figure = f"{one.sample.rps:,.0f} req/s" if one.sample is not None else ""
            step = f"round {index + 1}/{run.settings.repeats}"
            log(f"{protocol} {path} {step} {target.name}: {one.error or figure}")
    return rounds


def plan_minutes(settings: Settings) -> float:
    """About how long the run will take."""
    phases = len(settings.paths) * (2 if settings.h2c else 1)
    per_target = settings.repeats * (settings.duration + _RUN_OVERHEAD) + settings.warmup
    return settings.targets * phases * per_target / 60


# ------------------------------------------------------------------------------- run
def execute(run: Run) -> int:
    settings = run.settings
    (run.workdir / "hook.lua").write_text(WRK_HOOK)
    start_origin(run)
    start_anchors(run)
    for name, command in settings.proxies:
        start_proxy(run, name, command)

    phases = [("h1", path) for path in settings.paths]
    if settings.h2c:
        phases += [("h2c", path) for path in settings.paths]
    results = {phase_key(*phase): measure_phase(run, *phase) for phase in phases}

    version = ".".join(map(str, run.nginx_version))
    h2load_note = (
        f", h2load -c{settings.h2_clients} -m{settings.h2_streams}" if settings.h2c else ""
    )
    fields = "".join(f"; -H '{name}: {value}'" for name, value in settings.headers)
    print(
        f"\nhttpbench: {settings.repeats} interleaved rounds of {settings.duration} s per target "
        f"(after {settings.warmup} s of warm-up), medians; wrk -t{settings.threads} "
        f"-c{settings.connections}{h2load_note}{fields}; CPU = utime+stime of each target's "
        f"processes; nginx {version}; {os.cpu_count()} CPUs"
    )
    proxies = [name for name, _ in settings.proxies]
    known = ("nginx", "nginx-auto", "nginx-gzip", "direct")
    anchors = [name for name in known if name in settings.anchors]
    for protocol, path in phases:
        phase = results[phase_key(protocol, path)]
        print(f"\n== {PROTOCOL_TITLES[protocol]}  {path}")
        for line in [
            *table(protocol, phase),
            *anchor_ratios(phase, proxies, anchors),
            *pair_lines(phase, settings.pairs),
        ]:
            print(line)

    if settings.json is not None:
        header = {
            "settings": settings.recorded(),
            "nginx_version": version,
            "cpus": os.cpu_count(),
            "targets": {
                target.name: {
                    "port": target.port,
                    "h2c_port": target.h2c_port,
                    "command": target.command,
                }
                for target in run.targets
            },
        }
        write_json(settings.json, header, results)
        log(f"wrote {settings.json}")
    for target in run.targets:
        if target.server is not None and not target.server.alive():
            tail = target.server.log_tail()
            log(f"{target.name} exited during the run; its output ends:\n{tail}")
    print(summary_line(results, phase_key(*phases[0]), proxies))
    return 0


def main(argv: Sequence[str]) -> int:
    """Run the benchmark described by argv; returns the exit status."""
    settings = parse(argv)
    minutes = plan_minutes(settings)
    log(
        f"plan: {settings.targets} targets, "
        f"{len(settings.paths)} paths{', HTTP/1.1 and h2c' if settings.h2c else ''}, "
        f"{settings.repeats} rounds of {settings.duration} s: about {minutes:.1f} min"
    )
    if minutes > settings.max_minutes:
        log(f"over --max-minutes {settings.max_minutes:g}: lower --repeats or --duration")
        return 2
    raise_open_files_limit()
    workdir = Path(tempfile.mkdtemp(prefix="httpbench-"))
    workdir.chmod(0o755)  # nginx workers started by root run as nobody
    servers = ServerSet(Path.cwd())
    started = time.monotonic()
    try:
        tools = tools_needed(settings)
        run = Run(settings, workdir, servers, tools, nginx.version(tools["nginx"]))
        return execute(run)
    except (SetupError, RuntimeError, OSError) as exc:
        log(f"error: {exc}")
        return 2
    finally:
        for problem in servers.stop_all():
            log(problem)
        if settings.keep:
            log(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
        log(f"done in {time.monotonic() - started:.0f} s")
