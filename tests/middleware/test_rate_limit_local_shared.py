"""The local rate-limit table shared through a file in GATEHOUSE_SHARED_DIR: processes
that construct the same instance on their own, after the fork (as a config reload makes
workers do), share one limit exactly; different instances or options get different tables;
a process killed while holding the lock blocks no one; a live holder makes waiters give up
after the timeout; files that are not tables of this layout are refused at load."""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from middleware.rate_limit import RateLimit, local_table_key, parse_key, parse_rate
from middleware.rate_limit_core import RateLimitBackendError
from middleware.rate_limit_local import (
    HEADER_BYTES,
    SHARED_DIR_ENV,
    TABLE_MAGIC,
    LocalBackend,
    SharedTableError,
    _mutex_trylock,
    _mutex_unlock,
    table_bytes,
    table_file_name,
    table_slots,
)
from proxy.config.document import ConfigError
from proxy.config.load import parse_config

CHILD_TIMEOUT_S = 10.0
KEY = "middleware.limit:0123456789abcdef"
HOUR_S = 3600.0
LIMIT = 10  # 10/h, burst 9: ten at once, the next one six minutes later
EMISSION_S, TOLERANCE_S = HOUR_S / LIMIT, HOUR_S / LIMIT * (LIMIT - 1)


@pytest.fixture
def shared_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """GATEHOUSE_SHARED_DIR set (inherited by forked children), as the parent sets it."""
    directory = tmp_path / "shared"
    directory.mkdir(mode=0o700)
    monkeypatch.setenv(SHARED_DIR_ENV, str(directory))
    return directory


class Child:
    """A forked process running `work` (which returns a line to report), then staying
    `linger_s` (to be killed meanwhile), leaving without pytest's teardown."""

    def __init__(self, work: Callable[[], str], linger_s: float = 0.0) -> None:
        read_end, write_end = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:
            code = 1
            try:
                os.close(read_end)
                os.write(write_end, work().encode() + b"\n")
                time.sleep(linger_s)
                code = 0
            finally:
                os._exit(code)
        os.close(write_end)
        self._reader = os.fdopen(read_end, "rb")

    def report(self) -> str:
        """The line `work` returned (blocks until it is written)."""
        with self._reader:
            return self._reader.readline().decode().strip()

    def wait(self) -> int:
        """The child's exit status (as os.waitpid gives it)."""
        deadline = time.monotonic() + CHILD_TIMEOUT_S
        while (done := os.waitpid(self.pid, os.WNOHANG)) == (0, 0):
            assert time.monotonic() < deadline, "a child did not exit"
            time.sleep(0.01)
        return done[1]

    def kill(self) -> None:
        os.kill(self.pid, signal.SIGKILL)
        assert os.WIFSIGNALED(self.wait())


def blocked_in_a_futex(pid: int) -> bool:
    """Whether process `pid` sleeps in the kernel's futex wait (a mutex's lock call)."""
    with open(f"/proc/{pid}/wchan") as wchan:
        return "futex" in wchan.read()


def race(work: Callable[[], str], processes: int) -> Iterator[str]:
    """Fork `processes` children that run `work` at the same moment; their reports. Each
    waits for its byte of `go`, written once all are forked (a start time could pass
    before a busy machine has forked them all)."""
    go_read, go_write = os.pipe()

    def together() -> str:
        os.read(go_read, 1)
        return work()

    children = [Child(together) for _ in range(processes)]
    os.write(go_write, b"g" * processes)
    os.close(go_read)
    os.close(go_write)
    for child in children:
        yield child.report()
        assert child.wait() == 0


def construct_and_spend(attempts: int = 2 * LIMIT) -> str:
    """Construct the instance in this process (after the fork), then try `attempts`
    requests for one key: how many were allowed, and the hash of a key."""
    backend = LocalBackend(1024, shared_key=KEY)
    allowed = sum(
        backend.decide_now("client", EMISSION_S, TOLERANCE_S).allowed for _ in range(attempts)
    )
    return f"{allowed} {backend.key_hash('k')}"


def test_processes_constructing_the_instance_after_a_fork_share_one_limit(
    shared_dir: Path,
) -> None:
    """Two processes construct the instance at the same moment (one creates the file, the
    other opens it) and race 20 requests each: exactly 10 are admitted in total."""
    reports = [line.split() for line in race(construct_and_spend, 2)]
    assert sum(int(allowed) for allowed, _ in reports) == LIMIT, reports
    parent = LocalBackend(1024, shared_key=KEY)  # constructed later still: the same table
    assert {int(hashed) for _, hashed in reports} == {parent.key_hash("k")}  # one secret
    assert not parent.decide_now("client", EMISSION_S, TOLERANCE_S).allowed
    assert [path.name for path in shared_dir.iterdir()] == [table_file_name(KEY, 1024 * 2)]
    assert repr(parent).endswith(f" file={table_file_name(KEY, 2048)}>")


def test_without_the_shared_dir_each_process_constructs_a_private_table(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What the shared directory is for: without it the same race admits 10 per process."""
    monkeypatch.delenv(SHARED_DIR_ENV, raising=False)
    reports = [line.split() for line in race(construct_and_spend, 2)]
    assert [int(allowed) for allowed, _ in reports] == [LIMIT, LIMIT]
    assert len({hashed for _, hashed in reports}) == 2  # each drew its own secret
    assert LocalBackend(16, shared_key=KEY).path is None


def test_an_instance_constructed_before_the_fork_is_shared_with_one_constructed_after(
    shared_dir: Path,
) -> None:
    """A worker keeping an unchanged instance (inherited) and one constructing it anew."""
    inherited = LocalBackend(1024, shared_key=KEY)
    for _ in range(LIMIT // 2):
        assert inherited.decide_now("client", EMISSION_S, TOLERANCE_S).allowed
    child = Child(construct_and_spend)
    assert int(child.report().split()[0]) == LIMIT - LIMIT // 2
    assert child.wait() == 0
    assert not inherited.decide_now("client", EMISSION_S, TOLERANCE_S).allowed


def limit_of(middleware: str, route_middleware: str = "[limit]") -> list[RateLimit]:
    """The rate_limit instances a config with `middleware` (named instances) builds, in
    the order the two routes list them."""
    text = f"""\
listeners: [{{bind: 127.0.0.1:0}}]
upstreams: {{app: {{endpoints: ["http://127.0.0.1:9"]}}}}
routes:
  - {{match: {{path: /a}}, upstream: app, middleware: {route_middleware}}}
  - {{match: {{path: /b}}, upstream: app, middleware: {route_middleware}}}
middleware:
{middleware}
"""
    instances = []
    for route in parse_config(text).routes:
        for spec in route.middleware:
            assert isinstance(spec.instance, RateLimit)
            instances.append(spec.instance)
    return instances


def table_of(instance: RateLimit) -> str:
    backend = instance.backend
    assert isinstance(backend, LocalBackend)
    assert backend.path is not None
    return os.path.basename(backend.path)


def test_the_same_instance_loaded_twice_shares_its_table_and_its_budget(
    shared_dir: Path,
) -> None:
    """A config reloaded in another process builds the instance again: same table. A
    change of `headers` alone keeps it (it does not change what the records mean)."""
    first = limit_of("  limit: {type: rate_limit, rate: 1/h}")[0]
    again = limit_of("  limit: {type: rate_limit, rate: 1/h}")[0]
    headers_off = limit_of("  limit: {type: rate_limit, rate: 1/h, headers: false}")[0]
    assert table_of(first) == table_of(again) == table_of(headers_off)
    assert first.backend is not again.backend
    assert isinstance(first.backend, LocalBackend)
    assert isinstance(again.backend, LocalBackend)
    assert first.backend.decide_now("client", HOUR_S, 0.0).allowed
    assert not again.backend.decide_now("client", HOUR_S, 0.0).allowed


@pytest.mark.parametrize(
    "changed",
    [
        "  limit: {type: rate_limit, rate: 2/h}",
        "  limit: {type: rate_limit, rate: 1/h, burst: 1}",
        "  limit: {type: rate_limit, rate: 1/h, key: route}",
        '  limit: {type: rate_limit, rate: 1/h, key: "header:X-Key"}',
        "  limit: {type: rate_limit, rate: 1/h, max_keys: 100}",
        "  other: {type: rate_limit, rate: 1/h}\n  limit: {type: rate_limit, rate: 2/h}",
    ],
)
def test_different_options_give_different_tables(shared_dir: Path, changed: str) -> None:
    base = table_of(limit_of("  limit: {type: rate_limit, rate: 1/h}")[0])
    assert table_of(limit_of(changed)[0]) != base


def test_another_name_with_the_same_options_is_another_table(shared_dir: Path) -> None:
    one, two = limit_of(
        "  one: {type: rate_limit, rate: 1/h}\n  two: {type: rate_limit, rate: 1/h}",
        "[one, two]",
    )[:2]
    assert table_of(one) != table_of(two)


def test_inline_entries_on_two_routes_are_two_tables(shared_dir: Path) -> None:
    """Inline entries are all named after their type: the key uses where they stand."""
    a, b = limit_of("  {}", "[{type: rate_limit, rate: 1/h}]")
    assert a.name == b.name == "rate_limit"
    assert table_of(a) != table_of(b)


def test_the_table_key_digests_the_options_that_give_records_their_meaning() -> None:
    rate, key = parse_rate("10/min"), parse_key("ip")
    base = local_table_key("middleware.limit", rate, 9, key, 100)
    assert base.startswith("middleware.limit:")
    assert local_table_key("middleware.limit", rate, 9, key, 100) == base
    others = {
        local_table_key("middleware.other", rate, 9, key, 100),
        local_table_key("middleware.limit", parse_rate("10/s"), 9, key, 100),
        local_table_key("middleware.limit", rate, 8, key, 100),
        local_table_key("middleware.limit", rate, 9, parse_key("route"), 100),
        local_table_key("middleware.limit", rate, 9, parse_key("header:X-A"), 100),
        local_table_key("middleware.limit", rate, 9, parse_key("header:X-B"), 100),
        local_table_key("middleware.limit", rate, 9, key, 101),
    }
    assert len(others) == 7
    assert base not in others


@pytest.mark.parametrize("key", ["../../etc/passwd", "a/b", "." * 300, "é\udcff:x", ""])
def test_table_file_names_are_safe_whatever_the_key(key: str) -> None:
    name = table_file_name(key, 16)
    assert "/" not in name
    assert not name.startswith(".")
    assert len(name) <= 255
    assert name != table_file_name(key + "x", 16)
    assert name != table_file_name(key, 32)


_HELD: list[LocalBackend] = []  # a child's table must stay mapped while it holds the lock


def take_the_lock() -> str:
    """Construct the instance (after the fork) and take its lock, never to release it."""
    backend = LocalBackend(1024, shared_key=KEY)
    assert _mutex_trylock(backend._mutex) == 0
    # Kept mapped: the kernel finds a dead holder's robust mutexes through its mapping
    # (the backend never lets go of the mapping while it holds the lock).
    _HELD.append(backend)
    return "held"


def test_a_process_killed_holding_the_lock_blocks_no_one(
    shared_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A long lock timeout: recovering only once it ran out would show as a long wait.
    backend = LocalBackend(1024, shared_key=KEY, lock_timeout_s=10.0)
    holder = Child(take_the_lock, linger_s=CHILD_TIMEOUT_S)
    assert holder.report() == "held"
    holder.kill()
    with caplog.at_level(logging.ERROR, "middleware.rate_limit_local"):
        started = time.monotonic()
        assert backend.decide_now("client", HOUR_S, 0.0).allowed
        assert time.monotonic() - started < 5.0  # recovered at once, no timeout waited
    assert "died holding" in caplog.text
    caplog.clear()
    assert not backend.decide_now("client", HOUR_S, 0.0).allowed  # and working normally
    assert caplog.text == ""
    assert _mutex_trylock(backend._mutex) == 0  # not left taken
    _mutex_unlock(backend._mutex)


def test_a_process_waiting_when_the_holder_is_killed_gets_the_lock(shared_dir: Path) -> None:
    """The waiter is inside the lock call when the kernel releases the dead holder's lock."""
    holder = Child(take_the_lock, linger_s=CHILD_TIMEOUT_S)
    assert holder.report() == "held"

    def wait_then_decide() -> str:
        backend = LocalBackend(1024, shared_key=KEY, lock_timeout_s=CHILD_TIMEOUT_S)
        started = time.monotonic()
        allowed = backend.decide_now("client", HOUR_S, 0.0).allowed
        return f"{allowed} {time.monotonic() - started:.3f}"

    waiter = Child(wait_then_decide)
    # Killed once the waiter sleeps in the lock call (not after a guessed delay, which a
    # busy machine may outlast before the waiter even gets there).
    deadline = time.monotonic() + CHILD_TIMEOUT_S
    while not blocked_in_a_futex(waiter.pid):
        assert time.monotonic() < deadline, "the waiter never waited for the lock"
        time.sleep(0.01)
    holder.kill()
    allowed, waited_s = waiter.report().split()
    assert waiter.wait() == 0
    assert allowed == "True"
    assert float(waited_s) < CHILD_TIMEOUT_S / 2  # woken by the kill, not by a timeout
    parent = LocalBackend(1024, shared_key=KEY)
    assert not parent.decide_now("client", HOUR_S, 0.0).allowed  # its decision was stored


def test_a_live_holder_makes_waiters_give_up_after_the_timeout(shared_dir: Path) -> None:
    """A holder stopped (or stuck) inside the lock: the waiter answers RateLimitBackendError
    (`on_redis_error` decides) rather than hang its event loop."""
    backend = LocalBackend(1024, shared_key=KEY, lock_timeout_s=0.05)
    holder = Child(take_the_lock, linger_s=CHILD_TIMEOUT_S)
    assert holder.report() == "held"
    started = time.monotonic()
    with pytest.raises(RateLimitBackendError, match="stayed taken for over 50ms"):
        backend.decide_now("client", HOUR_S, 0.0)
    # After its 50 ms (a little less: the lock's clock is the wall clock), and long
    # before anything like a hang, however busy the machine.
    assert 0.04 < time.monotonic() - started < CHILD_TIMEOUT_S / 2
    holder.kill()
    assert backend.decide_now("client", HOUR_S, 0.0).allowed


def test_a_file_whose_creator_died_before_writing_the_header_is_initialized(
    shared_dir: Path,
) -> None:
    path = shared_dir / table_file_name(KEY, table_slots(16))
    path.write_bytes(bytes(table_bytes(table_slots(16))))  # sized, header never written
    backend = LocalBackend(16, shared_key=KEY)
    assert path.read_bytes()[: len(TABLE_MAGIC)] == TABLE_MAGIC
    assert backend.decide_now("client", HOUR_S, 0.0).allowed
    assert not LocalBackend(16, shared_key=KEY).decide_now("client", HOUR_S, 0.0).allowed


@pytest.mark.parametrize(
    ("content", "error"),
    [
        (b"x" * 100, "is not a rate-limit table of 32 slots"),
        (b"GHRLT000" + bytes(table_bytes(32) - 8), "is not a rate-limit table of this layout"),
        (TABLE_MAGIC + (64).to_bytes(8, "little") + bytes(table_bytes(32) - 16), "this layout"),
    ],
    ids=["short", "another magic", "another size in the header"],
)
def test_a_file_that_is_not_such_a_table_is_refused(
    shared_dir: Path, content: bytes, error: str
) -> None:
    (shared_dir / table_file_name(KEY, 32)).write_bytes(content)
    with pytest.raises(SharedTableError, match=error):
        LocalBackend(16, shared_key=KEY)


def test_a_shared_dir_that_cannot_be_used_fails_the_config_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(SHARED_DIR_ENV, str(tmp_path / "missing"))
    with pytest.raises(SharedTableError, match=r"cannot open the shared table .*missing"):
        LocalBackend(16, shared_key=KEY)
    with pytest.raises(ConfigError) as failed:
        limit_of("  limit: {type: rate_limit, rate: 1/h}")
    assert "middleware.limit: the local backend's table cannot be made: cannot open" in str(
        failed.value
    )


def test_the_header_and_records_are_laid_out_as_documented(shared_dir: Path) -> None:
    backend = LocalBackend(16, shared_key=KEY)
    assert backend.path is not None
    data = Path(backend.path).read_bytes()
    assert len(data) == table_bytes(32) == HEADER_BYTES + (32 + 7) * 16
    assert data[:8] == TABLE_MAGIC
    assert int.from_bytes(data[8:16], "little") == 32
    assert data[16:32] == backend._secret
    assert os.stat(backend.path).st_mode & 0o777 == 0o600
