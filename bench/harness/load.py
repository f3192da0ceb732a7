"""The load generators: wrk for HTTP/1.1, h2load for cleartext HTTP/2, and what they report.

wrk's own summary rounds its figures, so a small Lua `done` hook prints the exact ones on
one line of its own. h2load has no hook: its text summary is parsed. Both run for a fixed
time on 127.0.0.1 and are killed if they overrun it by 30 s, and both send the run's
`--header` fields with every request. `first_response` shows what one answer to those
fields looks like (its status, coding and size), so a run can tell that the fields had the
effect meant: a compressed answer, say.
"""

import http.client
import re
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

_GRACE = 30.0
_WRK_MARK = "httpbench-wrk"
# Called by wrk after the run: one line with exact counts, latencies in microseconds.
WRK_HOOK = f"""\
function done(summary, latency, requests)
  local errors = summary.errors
  local fields = {{
    {{"requests", summary.requests}}, {{"duration_us", summary.duration}},
    {{"bytes", summary.bytes}}, {{"connect", errors.connect}}, {{"read", errors.read}},
    {{"write", errors.write}}, {{"timeout", errors.timeout}}, {{"status", errors.status}},
    {{"mean_us", latency.mean}}, {{"p50_us", latency:percentile(50)}},
    {{"p99_us", latency:percentile(99)}}, {{"max_us", latency.max}},
  }}
  io.write("{_WRK_MARK}")
  for _, field in ipairs(fields) do
    io.write(string.format(" %s=%.1f", field[1], field[2]))
  end
  io.write("\\n")
end
"""


class LoadError(Exception):
    """The load generator failed, overran its time, or printed nothing we understand."""


@dataclass(frozen=True, slots=True)
class Sample:
    """One load run against one target: throughput, latency and failures."""

    requests: int  # completed (wrk) or succeeded (h2load: 2xx)
    seconds: float
    mbps: float  # response bytes, 10^6 per second
    errors: int  # connection-level failures (connect, read, write, timeout, reset)
    non2xx: int  # answers that were not 2xx (wrk: status >= 400)
    p50_ms: float | None = None  # wrk only
    p99_ms: float | None = None  # wrk only
    mean_ms: float | None = None
    max_ms: float | None = None

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0


def _run(argv: list[str], seconds: float) -> str:
    """argv's stdout and stderr together; the process is killed on overrun or interrupt."""
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as proc:
        try:
            out, _ = proc.communicate(timeout=seconds + _GRACE)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise LoadError(f"{Path(argv[0]).name} ran {_GRACE:g} s past its time") from None
        except BaseException:
            proc.kill()  # interrupted: leave no load generator running
            raise
    return out.decode("utf-8", "replace")


def _tail(text: str) -> str:
    return " ".join(text.split())[-300:] or "no output"


Headers = Sequence[tuple[str, str]]


def _header_options(headers: Headers) -> list[str]:
    """`-H "Name: value"` for each field: wrk and h2load take it alike."""
    return [option for name, value in headers for option in ("-H", f"{name}: {value}")]


def wrk(
    binary: str,
    hook: Path,
    url: str,
    *,
    threads: int,
    connections: int,
    seconds: int,
    headers: Headers = (),
) -> Sample:
    """Run wrk against url for seconds.

    Raises:
        LoadError: wrk failed or did not print the hook's line.
    """
    argv = [binary, f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "-s", str(hook)]
    argv += [*_header_options(headers), url]
    out = _run(argv, seconds)
    line = next((ln for ln in out.splitlines() if ln.startswith(_WRK_MARK + " ")), None)
    if line is None:
        raise LoadError(f"wrk: {_tail(out)}")
    values = {
        key: float(value) for key, _, value in (item.partition("=") for item in line.split()[1:])
    }
    elapsed = values["duration_us"] / 1e6
    return Sample(
        requests=int(values["requests"]),
        seconds=elapsed,
        mbps=values["bytes"] / elapsed / 1e6 if elapsed else 0.0,
        errors=int(sum(values[key] for key in ("connect", "read", "write", "timeout"))),
        non2xx=int(values["status"]),
        p50_ms=values["p50_us"] / 1000,
        p99_ms=values["p99_us"] / 1000,
        mean_ms=values["mean_us"] / 1000,
        max_ms=values["max_us"] / 1000,
    )


_UNIT_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3}
_FINISHED = re.compile(r"^finished in ([\d.]+)(us|ms|s),", re.M)
_REQUESTS = re.compile(
    r"^requests: (?P<total>\d+) total, \d+ started, \d+ done, (?P<ok>\d+) succeeded, "
    r"(?P<failed>\d+) failed, (?P<errored>\d+) errored, (?P<timeout>\d+) timeout",
    re.M,
)
_STATUS = re.compile(r"^status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", re.M)
_TRAFFIC = re.compile(r"^traffic: \S+ \((\d+)\) total", re.M)
_DURATION = r"([\d.]+)(us|ms|s)"
_REQUEST_TIME = re.compile(rf"^time for request:\s+{_DURATION}\s+{_DURATION}\s+{_DURATION}", re.M)


def h2load(
    binary: str, url: str, *, clients: int, streams: int, seconds: int, headers: Headers = ()
) -> Sample:
    """Run h2load (HTTP/2 with prior knowledge on an http:// url) against url for seconds.

    Raises:
        LoadError: h2load failed or its summary could not be read.
    """
    argv = [binary, "-t1", f"-c{clients}", f"-m{streams}", "-D", str(seconds)]
    argv += [*_header_options(headers), url]
    out = _run(argv, seconds)
    finished, requests = _FINISHED.search(out), _REQUESTS.search(out)
    if finished is None or requests is None:
        raise LoadError(f"h2load: {_tail(out)}")
    elapsed = float(finished.group(1)) * _UNIT_MS[finished.group(2)] / 1000
    status = _STATUS.search(out)
    traffic = _TRAFFIC.search(out)
    timing = _REQUEST_TIME.search(out)
    return Sample(
        requests=int(requests["ok"]),
        seconds=elapsed,
        mbps=int(traffic.group(1)) / elapsed / 1e6 if traffic and elapsed else 0.0,
        # "failed" counts the "errored" ones too
        errors=int(requests["failed"]) + int(requests["timeout"]),
        non2xx=sum(int(count) for count in status.groups()[1:]) if status else 0,
        mean_ms=float(timing.group(5)) * _UNIT_MS[timing.group(6)] if timing else None,
        max_ms=float(timing.group(3)) * _UNIT_MS[timing.group(4)] if timing else None,
    )


def first_response(port: int, path: str, headers: Headers, timeout: float = 10.0) -> str:
    """What a GET of path on 127.0.0.1:port with headers answers, in a few words: status,
    Content-Encoding, Vary, framing (a length, or chunked), and the body's size as sent.

    Raises:
        LoadError: no answer.
    """
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        # skip_accept_encoding: the driver's fields alone decide what is accepted.
        connection.putrequest("GET", path, skip_accept_encoding=True)
        for name, value in headers:
            connection.putheader(name, value)
        connection.endheaders()
        response = connection.getresponse()
        size = len(response.read())  # http.client decodes no content coding
    except (OSError, http.client.HTTPException) as exc:
        raise LoadError(f"GET {path}: {exc!r}") from None
    finally:
        connection.close()
    coding = response.getheader("Content-Encoding") or "none"
    vary = response.getheader("Vary") or "none"
    length = response.getheader("Content-Length")
    framing = f"Content-Length {length}" if length is not None else "chunked"
    return f"{response.status}, Content-Encoding {coding}, Vary {vary}, {framing}: {size:,} bytes"
