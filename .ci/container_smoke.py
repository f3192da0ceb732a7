#!/usr/bin/env python3
"""Container smoke: build the Dockerfile with podman, run it, and check it as an operator would.

    .ci/container_smoke.py [--port 8080] [--path /] [--expect-status N] [--grace 10]
                           [--context .] [--dockerfile CONTEXT/Dockerfile]
                           [--standin auto|never] [-- EXTRA PODMAN RUN ARGUMENTS]

1. Tools: podman and runc (and debootstrap when a stand-in base is needed), installed with
   apt-get when missing. podman runs with runc, under a containers.conf of our own.
2. Base images: every image a `FROM` of the Dockerfile names (build stages aside) must be
   in podman's store. One that is not is pulled; if the pull fails (a machine without a
   registry) and `--standin auto`, a stand-in is made: Debian bookworm (debootstrap, with
   python3, venv and pip, the Python 3.11 of python:3.11-slim) imported once as
   localhost/smoke-debian-python:bookworm, plus a thin layer with what the slim images have
   and Debian lacks (`python`, pip allowed to install) and the host's CA bundle and remote
   pip index settings, tagged with the missing name. A name that exists is never re-tagged.
3. Build with `podman build --format docker` (the OCI format would drop HEALTHCHECK).
4. Run it detached, the container's --port published on a free 127.0.0.1 port, and GET
   --path until it answers (30 s at most): any 2xx-4xx passes, or exactly --expect-status.
5. HEALTHCHECK: with no systemd to run it on its interval, `podman healthcheck run` runs it
   (up to 3 tries, 1 s apart, as the Dockerfile's retries allow); it must say healthy.
6. Stop: `podman stop -t GRACE` sends the image's STOPSIGNAL, then SIGKILL after GRACE
   seconds. The container must exit with status 0 before that.

Needs root (apt-get, debootstrap, rootful podman). The last line is
`container_smoke=ok status=200 health=healthy stop_s=0.4 exit=0 build_s=12` (exit 0) or
`container_smoke=FAIL reason=WHY ...` (exit 1); 2 for bad arguments.
"""

import argparse
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

IMAGE = "localhost/gatehouse-smoke:latest"
STANDIN_ROOT = "localhost/smoke-debian-python:bookworm"  # debootstrap output, kept
STANDIN_SUITE = "bookworm"
STANDIN_PACKAGES = "python3,python3-venv,python3-pip,ca-certificates"
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
SHORT = 60.0  # seconds for a podman call that only looks something up
ANSWER_WAIT = 30.0
HEALTH_TRIES = 3
PIP_SETTINGS = ("index-url", "extra-index-url", "trusted-host")


class Failed(Exception):
    """The smoke failed: reason is one word for the last line, detail what to look at."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.detail = detail


def say(message: str) -> None:
    sys.stdout.write(f"smoke: {message}\n")
    sys.stdout.flush()


def verdict(line: str) -> None:
    """The last line of the output, the one CI reads."""
    sys.stdout.write(line.rstrip() + "\n")
    sys.stdout.flush()


def indent(text: str, prefix: str, lines: int = 20) -> str:
    kept = [line for line in text.splitlines() if line.strip()][-lines:]
    return "\n".join(prefix + line for line in kept)


@dataclass
class Smoke:
    """One smoke run: its options, its scratch directory, and what it must clean up."""

    args: argparse.Namespace
    tmp: Path
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))
    container: str | None = None
    build_containers_before: set[str] | None = None
    summary: dict[str, str] = field(default_factory=dict)

    # ------------------------------------------------------------------ commands
    def run(
        self, argv: Sequence[str], timeout: float = SHORT, log: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        """argv, bounded by timeout; its output captured (or appended to log).

        The child has a session of its own: on timeout or interrupt the whole group goes.
        """
        out = log.open("a") if log is not None else None
        try:
            with subprocess.Popen(
                argv,
                stdout=out or subprocess.PIPE,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                text=True,
                env=self.env,
                start_new_session=True,
            ) as proc:
                try:
                    stdout, _ = proc.communicate(timeout=timeout)
                except BaseException:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                    raise
        finally:
            if out is not None:
                out.close()
        return subprocess.CompletedProcess(argv, proc.returncode, stdout or "", "")

    def podman(self, *argv: str, timeout: float = SHORT) -> subprocess.CompletedProcess[str]:
        return self.run(["podman", *argv], timeout=timeout)

    def podman_out(self, *argv: str) -> str:
        """The output of a podman call that must succeed."""
        done = self.podman(*argv)
        if done.returncode != 0:
            raise Failed("podman_failed", f"podman {' '.join(argv)}: {done.stdout.strip()}")
        return done.stdout.strip()

    def image_exists(self, name: str) -> bool:
        return self.podman("image", "exists", name).returncode == 0

    # -------------------------------------------------------------------- step 1
    def tools(self) -> None:
        if os.geteuid() != 0:
            raise Failed("not_root", "run as root: apt-get, debootstrap and rootful podman")
        wanted = ["podman", "runc"]
        missing = [tool for tool in wanted if shutil.which(tool) is None]
        if missing:
            self.apt_install(missing)
        conf = self.tmp / "containers.conf"
        conf.write_text(
            "[containers]\n"
            'default_ulimits = ["nofile=1024:1024", "nproc=4096:4096"]\n'
            "[engine]\n"
            'runtime = "runc"\n'
        )
        self.env["CONTAINERS_CONF"] = str(conf)

    def apt_install(self, packages: list[str]) -> None:
        if shutil.which("apt-get") is None:
            raise Failed("tools_missing", f"install {' '.join(packages)}")
        say(f"installing {' '.join(packages)} (apt-get)")
        log = self.tmp / "apt.log"
        self.env["DEBIAN_FRONTEND"] = "noninteractive"
        for argv, timeout in (
            (["apt-get", "update", "-q"], 300.0),
            (["apt-get", "install", "-y", "-q", *packages], 900.0),
        ):
            if self.run(argv, timeout=timeout, log=log).returncode != 0:
                raise Failed("tools_install", indent(log.read_text(), "  apt| ", 15))

    # -------------------------------------------------------------------- step 2
    def dockerfile(self) -> Path:
        path = Path(self.args.dockerfile or Path(self.args.context, "Dockerfile"))
        if not path.is_file():
            raise Failed("no_dockerfile", f"{path} is not a file")
        return path

    def base_images(self, dockerfile: Path) -> list[str]:
        """The images the Dockerfile's FROM lines name, build stages left out."""
        stages: set[str] = set()
        images: list[str] = []
        for line in dockerfile.read_text().splitlines():
            words = line.split()
            if len(words) < 2 or words[0].upper() != "FROM":
                continue
            names = [word for word in words[1:] if not word.startswith("--")]
            if not names:
                continue
            if names[0].lower() not in stages and names[0] not in images:
                images.append(names[0])
            if len(names) >= 3 and names[1].upper() == "AS":
                stages.add(names[2].lower())
        return images

    def ensure_bases(self, dockerfile: Path) -> None:
        for image in self.base_images(dockerfile):
            if self.image_exists(image) or self.image_exists(qualified(image)):
                continue
            say(f"{image} is not in podman's store: pulling it")
            pulled = self.podman("pull", "-q", qualified(image), timeout=600)
            if pulled.returncode == 0:
                continue
            if self.args.standin == "never":
                raise Failed("base_missing", f"no {image}: {pulled.stdout.strip()[-300:]}")
            say(f"no registry answered for {image}: a Debian stand-in takes its name")
            self.tag_standin(qualified(image))

    def tag_standin(self, name: str) -> None:
        if not self.image_exists(STANDIN_ROOT):
            self.debootstrap()
        layer = self.tmp / "standin"
        layer.mkdir(exist_ok=True)
        lines = [f"FROM {STANDIN_ROOT}", "LABEL smoke.standin=true"]
        env = ["LANG=C.UTF-8"]
        if CA_BUNDLE.is_file():
            # The host's CA bundle: TLS to the package index may go through a proxy of its own.
            shutil.copyfile(CA_BUNDLE, layer / "ca.crt")
            lines.append(f"COPY ca.crt {CA_BUNDLE}")
            env += [f"{var}={CA_BUNDLE}" for var in ("PIP_CERT", "SSL_CERT_FILE")]
        env += [f'{var}="{value}"' for var, value in self.pip_settings().items()]
        lines += [
            # python:3.11-slim has `python` and lets pip install system-wide; Debian has not.
            "RUN ln -sf /usr/bin/python3 /usr/local/bin/python"
            " && rm -f /usr/lib/python3*/EXTERNALLY-MANAGED",
            "ENV " + " ".join(env),
        ]
        (layer / "Containerfile").write_text("\n".join(lines) + "\n")
        log = self.tmp / "standin.log"
        built = self.build(["podman", "build", "--pull=never", "-t", name, str(layer)], 600, log)
        if built != 0:
            raise Failed("standin_build", indent(log.read_text(), "  build| ", 15))

    def debootstrap(self) -> None:
        if shutil.which("debootstrap") is None:
            self.apt_install(["debootstrap"])
        mirror = debian_mirror()
        if mirror is None:
            raise Failed("no_mirror", "no Debian mirror in /etc/apt/sources.list{,.d}")
        say(f"making {STANDIN_ROOT} with debootstrap from {mirror} (minutes, once per machine)")
        rootfs, log = self.tmp / "rootfs", self.tmp / "debootstrap.log"
        argv = [
            "debootstrap",
            "--variant=minbase",
            f"--include={STANDIN_PACKAGES}",
            STANDIN_SUITE,
            str(rootfs),
            mirror,
        ]
        if self.run(argv, timeout=1800, log=log).returncode != 0:
            raise Failed("standin_debootstrap", indent(log.read_text(), "  debootstrap| ", 15))
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        try:
            imported = subprocess.run(
                ["podman", "import", "--change", 'CMD ["/bin/bash"]', "-", STANDIN_ROOT],
                stdin=tar.stdout,
                capture_output=True,
                text=True,
                env=self.env,
                timeout=600,
                check=False,
            )
        finally:
            if tar.stdout is not None:
                tar.stdout.close()
            tar.wait()
        if imported.returncode != 0:
            raise Failed("standin_import", imported.stderr.strip()[-500:])
        unmount_below(self.tmp)
        shutil.rmtree(rootfs, ignore_errors=True)

    def pip_settings(self) -> dict[str, str]:
        """The host's remote pip index settings as PIP_* variables (local paths left out)."""
        done = self.run([sys.executable, "-m", "pip", "config", "list"], timeout=30)
        found: dict[str, str] = {}
        for line in done.stdout.splitlines():
            match = re.fullmatch(r"[^=]*\.([a-z-]+)='(.*)'", line.strip())
            if match is None or match.group(1) not in PIP_SETTINGS:
                continue
            usable = [
                value
                for value in match.group(2).split()
                if re.match(r"https?://", value) or re.fullmatch(r"[A-Za-z0-9.-]+(:\d+)?", value)
            ]
            variable = "PIP_" + match.group(1).upper().replace("-", "_")
            if usable and variable not in found:  # the first source pip lists wins
                found[variable] = " ".join(usable)
        return found

    # -------------------------------------------------------------------- step 3
    def build(self, argv: list[str], timeout: float, log: Path) -> int:
        """A podman build; what a build cut short leaves behind is removed at cleanup."""
        before = self.podman_out("ps", "-a", "-q", "--external", "--no-trunc").split()
        self.build_containers_before = set(before)
        try:
            done = self.run(argv, timeout=timeout, log=log)
        except subprocess.TimeoutExpired:
            return 124
        self.build_containers_before = None
        return done.returncode

    def build_image(self, dockerfile: Path) -> str:
        say(f"building {dockerfile} (context {self.args.context}) as {IMAGE}")
        log, started = self.tmp / "build.log", time.monotonic()
        argv = ["podman", "build", "--format", "docker", "--pull=never"]
        argv += ["-f", str(dockerfile), "-t", IMAGE, self.args.context]
        status = self.build(argv, self.args.build_timeout, log)
        seconds = time.monotonic() - started
        self.summary["build_s"] = f"{seconds:.0f}"
        if status == 124:
            raise Failed("build_timeout", f"the build ran past {self.args.build_timeout:g} s")
        if status != 0:
            raise Failed("build_failed", indent(log.read_text(), "  build| ", 25))
        say(f"built in {seconds:.0f} s")
        return self.podman_out("image", "inspect", "-f", "{{.Id}}", IMAGE)

    # -------------------------------------------------------------------- step 4
    def start(self, image: str) -> str:
        name = f"gatehouse-smoke-{os.getpid()}"
        self.container = name  # before it exists: cleanup removes a half-made one too
        port = self.args.port
        argv = ["run", "-d", "--name", name, "-p", f"127.0.0.1::{port}", *self.args.extra, image]
        done = self.podman(*argv)
        if done.returncode != 0:
            raise Failed("run_failed", done.stdout.strip()[-500:])
        published = self.podman_out("port", name, f"{port}/tcp").splitlines()
        if not published:
            raise Failed("no_port", f"container port {port} is not published")
        return f"http://127.0.0.1:{published[0].rpartition(':')[2]}{self.args.path}"

    def running(self) -> bool:
        assert self.container is not None
        state = self.podman("inspect", "-f", "{{.State.Running}}", self.container)
        return state.stdout.strip() == "true"

    def logs(self, *argv: str) -> str:
        assert self.container is not None
        return self.podman("logs", *argv, self.container).stdout

    def answer(self, url: str) -> None:
        say(f"asking {url} (container port {self.args.port}) for up to {ANSWER_WAIT:g} s")
        started = time.monotonic()
        status, body = poll(url, self.running, ANSWER_WAIT)
        self.summary["status"] = str(status)
        if status == 0:
            reason = "no_answer" if self.running() else "container_exited"
            raise Failed(reason, indent(self.logs("--tail", "20"), "  log| "))
        say(f"HTTP {status} after {time.monotonic() - started:.1f} s: {body[:120]!r}")
        expected = self.args.expect_status
        if expected is not None and status != expected:
            raise Failed(f"status_{status}_expected_{expected}")
        if expected is None and not 200 <= status < 500:
            raise Failed(f"status_{status}")

    # -------------------------------------------------------------------- step 5
    def health(self, image: str) -> None:
        if not self.podman_out("image", "inspect", "-f", "{{if .HealthCheck}}y{{end}}", image):
            say("the image has no HEALTHCHECK")
            return
        assert self.container is not None
        output = ""
        for attempt in range(HEALTH_TRIES):
            if attempt:
                time.sleep(1)
            done = self.podman("healthcheck", "run", self.container)
            if done.returncode == 0:
                self.summary["health"] = "healthy"
                say("HEALTHCHECK: healthy")
                return
            output = done.stdout.strip()
        self.summary["health"] = "unhealthy"
        raise Failed("healthcheck_unhealthy", output[-500:])

    # -------------------------------------------------------------------- step 6
    def stop(self) -> None:
        assert self.container is not None
        grace = self.args.grace
        stop_signal = self.podman_out("inspect", "-f", "{{.Config.StopSignal}}", self.container)
        since = str(int(time.time()))
        started = time.monotonic()
        done = self.podman("stop", "-t", str(grace), self.container, timeout=grace + 30)
        seconds = time.monotonic() - started
        if done.returncode != 0:
            raise Failed("stop_failed", done.stdout.strip()[-500:])
        code = int(self.podman_out("inspect", "-f", "{{.State.ExitCode}}", self.container))
        self.summary.update(stop_s=f"{seconds:.1f}", exit=str(code))
        say(
            f"stopped ({stop_signal or 'SIGTERM'}, grace {grace} s) in {seconds:.1f} s, exit {code}"
        )
        tail = indent(self.logs("--since", since), "  log| ", 10)
        if tail:
            say("its last words:\n" + tail)
        if code == 137 or seconds >= grace:
            raise Failed(f"not_stopped_within_{grace}s_killed")
        if code != 0:
            raise Failed(f"exit_{code}_after_stop_signal")

    def details(self) -> str:
        return " ".join(f"{key}={value}" for key, value in self.summary.items())

    # ------------------------------------------------------------------- cleanup
    def cleanup(self) -> None:
        """Remove our container, anything a cut-short build left, and the scratch directory."""
        with contextlib.suppress(Exception):
            if self.container is not None:
                self.podman("rm", "-f", "-t", "0", self.container)
        with contextlib.suppress(Exception):
            if self.build_containers_before is not None:
                now = self.podman("ps", "-a", "-q", "--external", "--no-trunc").stdout.split()
                left = [cid for cid in now if cid not in self.build_containers_before]
                if left:
                    self.podman("rm", "-f", *left)
        with contextlib.suppress(Exception):
            unmount_below(self.tmp)
        shutil.rmtree(self.tmp, ignore_errors=True)

    def main(self) -> None:
        self.tools()
        dockerfile = self.dockerfile()
        self.ensure_bases(dockerfile)
        image = self.build_image(dockerfile)
        url = self.start(image)
        try:
            self.answer(url)
            self.health(image)
        finally:
            start_logs = indent(self.logs(), "  log| ", 15)
            if start_logs:
                say("the container's first words:\n" + start_logs)
        self.stop()


def qualified(image: str) -> str:
    """docker.io/library/python:3.11-slim for python:3.11-slim, as a Dockerfile means it."""
    first = image.split("/", 1)[0]
    if "/" in image and ("." in first or ":" in first or first == "localhost"):
        return image
    return f"docker.io/{image}" if "/" in image else f"docker.io/library/{image}"


def debian_mirror() -> str | None:
    """The Debian archive this machine's apt uses (not its security archive)."""
    directory = Path("/etc/apt/sources.list.d")
    sources = [Path("/etc/apt/sources.list"), *sorted(directory.glob("*.list"))]
    sources += sorted(directory.glob("*.sources"))
    urls: list[str] = []
    for source in sources:
        with contextlib.suppress(OSError):
            for line in source.read_text().splitlines():
                if line.startswith(("deb ", "URIs:")):
                    urls += [str(url) for url in re.findall(r"https?://\S+", line)]
    archives = [url for url in urls if url.rstrip("/").endswith("/debian")]
    return archives[0] if archives else None


def unmount_below(directory: Path) -> None:
    """Unmount what a cut-short debootstrap left mounted inside directory (deepest first)."""
    prefix = str(directory) + "/"
    with open("/proc/mounts") as mounts:
        points = [line.split()[1] for line in mounts if line.split()[1].startswith(prefix)]
    for point in sorted(points, reverse=True):
        subprocess.run(["umount", "-l", point], check=False, capture_output=True, timeout=30)


def poll(url: str, alive: Callable[[], bool], wait: float) -> tuple[int, bytes]:
    """(status, start of body) of the first answer to GET url; (0, b"") if none in time."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never a proxy
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        try:
            with opener.open(url, timeout=2) as response:
                return response.status, response.read(200)
        except urllib.error.HTTPError as answer:
            return answer.code, answer.read(200)
        except OSError:  # refused, reset, timed out (URLError is one too)
            pass
        if not alive():
            break
        time.sleep(0.5)
    return 0, b""


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="container_smoke.py",
        description="Build the Dockerfile with podman, run it, check an answer, its "
        "HEALTHCHECK and a graceful stop.",
    )
    parser.add_argument("--context", default=".", help="build context [.]")
    parser.add_argument("--dockerfile", help="[CONTEXT/Dockerfile]")
    parser.add_argument("--port", type=int, default=8080, help="container port to ask [8080]")
    parser.add_argument("--path", default="/", help="path to GET [/]")
    parser.add_argument("--expect-status", type=int, help="the status wanted [any 2xx-4xx]")
    parser.add_argument("--grace", type=int, default=10, help="podman stop -t [10]")
    parser.add_argument("--build-timeout", type=float, default=1200, help="seconds [1200]")
    parser.add_argument(
        "--standin",
        choices=("auto", "never"),
        default="auto",
        help="make a Debian stand-in for a base image no registry gives [auto]",
    )
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="-- podman run arguments")
    args = parser.parse_args(argv)
    if args.extra[:1] == ["--"]:
        args.extra = args.extra[1:]
    if not args.path.startswith("/"):
        parser.error("--path must start with /")
    return args


def _interrupted(signum: int, _frame: FrameType | None) -> None:
    raise Failed("interrupted", signal.Signals(signum).name)


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _interrupted)
    smoke = Smoke(args, Path(tempfile.mkdtemp(prefix="container-smoke-")))
    try:
        smoke.main()
    except Failed as failure:
        if failure.detail:
            say(failure.detail)
        verdict(f"container_smoke=FAIL reason={failure.reason} {smoke.details()}")
        return 1
    except subprocess.TimeoutExpired as exc:
        command = " ".join(map(str, exc.cmd)) if isinstance(exc.cmd, list) else str(exc.cmd)
        say(f"timed out: {command}")
        verdict(f"container_smoke=FAIL reason=timeout {smoke.details()}")
        return 1
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, signal.SIG_IGN)  # cleanup runs to its end
        smoke.cleanup()
    verdict(f"container_smoke=ok {smoke.details()}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
