"""Config from etcd, end to end: a real etcd, three real gateway processes on one key,
`gatehouse push` and writes made straight to etcd, clients sending requests all the while.

Every gateway runs the same document; each listens where its own environment says
(`${GATEWAY_PORT}`, `${ADMIN_PORT}`), as a fleet's members would on their own hosts. What
a gateway runs is read from its admin listener (/config's `revision`, /metrics), polled:
the bounds only stop a hang. How long a push took to reach all three is printed (run with
-s to see it); bench/etcd_push measures it over 20 pushes.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.support.admin_client import admin_get, metric
from tests.support.client_load import ClientLoad
from tests.support.etcd_server import EtcdServer, running_etcd
from tests.support.gateway_process import (
    REPO_ROOT,
    Gateway,
    free_port,
    run_cli,
    run_gateway,
    wait_until,
)
from tests.support.tls import make_tls_files

pytestmark = pytest.mark.socket

KEY = "/gatehouse/routes.yaml"
CLIENT_TIMEOUT_S = 10.0
FOLLOW_TIMEOUT_S = 30.0  # bounds a hang only: a push is seen in well under a second
LOAD_THREADS = 3


def document(answer: str, status: int = 200) -> str:
    """The fleet's routes.yaml: one route answering `answer` itself, the listener and the
    admin listener where each gateway's environment says."""
    return f"""\
listeners:
  - bind: "127.0.0.1:${{GATEWAY_PORT:-8080}}"
admin:
  bind: "127.0.0.1:${{ADMIN_PORT:-9901}}"
workers: 1
shutdown: {{grace_period: 2s}}
upstreams: {{}}
routes:
  - name: app
    match: {{path_prefix: /}}
    respond: {{status: {status}, body: "{answer}"}}
"""


@dataclass
class Member:
    """One gateway of the fleet."""

    gateway: Gateway
    admin: int
    cache: Path

    def revision(self) -> int:
        """The etcd revision it runs (/config), or -1 while its admin does not answer."""
        try:
            return int(admin_get(self.admin, "/config").json()["revision"])
        except httpx.TransportError:
            return -1

    def answer(self) -> str:
        response = httpx.get(f"{self.gateway.url}/", timeout=CLIENT_TIMEOUT_S)
        assert response.status_code == 200, response.text
        return response.text

    def wait_metric(self, name: str, value: float, **labels: str) -> None:
        wait_until(
            lambda: metric(self.admin, name, **labels) == value,
            FOLLOW_TIMEOUT_S,
            f"{name}{labels} to be {value} on :{self.gateway.port}",
        )

    def wait_revision(self, revision: int) -> None:
        wait_until(
            lambda: self.revision() == revision,
            FOLLOW_TIMEOUT_S,
            f"gateway :{self.gateway.port} to run revision {revision} (log:\n"
            f"{self.gateway.stderr()})",
        )


@contextlib.contextmanager
def fleet(etcd: EtcdServer, directory: Path, count: int) -> Iterator[list[Member]]:
    """`count` gateways on etcd's KEY, each with a cache of its own; all listening."""
    with contextlib.ExitStack() as stack:
        members = []
        for index in range(count):
            members.append(start_member(stack, etcd, directory, index, wait=False))
        for member in members:
            member.gateway.wait_listening(FOLLOW_TIMEOUT_S)
        yield members


def start_member(
    stack: contextlib.ExitStack,
    etcd: EtcdServer,
    directory: Path,
    index: int,
    *,
    wait: bool,
    env: dict[str, str] | None = None,
) -> Member:
    port, admin = free_port(), free_port()
    cache = directory / f"cache-{index}.json"
    gateway = stack.enter_context(
        run_gateway(
            "",
            directory,
            port=port,
            location=etcd.url(KEY),
            args=("--workers", "1", "--config-cache", str(cache)),
            env={"GATEWAY_PORT": str(port), "ADMIN_PORT": str(admin), **etcd.env, **(env or {})},
            wait=wait,
        )
    )
    return Member(gateway, admin, cache)


def fleet_load(members: list[Member]) -> ClientLoad:
    """Clients sending requests to every member in turn."""
    urls = [f"{member.gateway.url}/" for member in members]
    return ClientLoad(lambda index, n: urls, LOAD_THREADS)


def push(path: Path, url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli("push", str(path), url, *args)


def test_a_push_reaches_every_gateway_with_no_failed_request(tmp_path: Path) -> None:
    with running_etcd(tmp_path) as etcd:
        first = etcd.put(KEY, document("v0"))
        with fleet(etcd, tmp_path, 3) as members:
            for member in members:
                member.wait_revision(first)
            latencies = []
            revision = first
            with fleet_load(members) as load:
                for version in (1, 2, 3):
                    pushed = tmp_path / f"v{version}.yaml"
                    pushed.write_text(document(f"v{version}"))
                    result = push(pushed, etcd.url(KEY))
                    done = time.monotonic()
                    assert result.returncode == 0, result.stderr
                    current = etcd.get(KEY)
                    assert current is not None
                    assert current[0] == pushed.read_text()
                    revision = current[1]
                    for member in members:
                        member.wait_revision(revision)
                    latencies.append(time.monotonic() - done)
                    assert {member.answer() for member in members} == {f"v{version}"}
                sent_during = load.sent
            assert load.failures == []
            assert sent_during > 0
            print(f"push to all 3 gateways, seen after the push exited: {latencies}")  # noqa: T201
            for member in members:
                assert member.cache.exists()
                assert metric(member.admin, "gatehouse_config_revision") == revision
                assert metric(member.admin, "gatehouse_config_info", kind="etcd") == 1


def test_an_invalid_document_written_to_etcd_is_refused_by_every_gateway(
    tmp_path: Path,
) -> None:
    with running_etcd(tmp_path) as etcd:
        good = etcd.put(KEY, document("good"))
        with fleet(etcd, tmp_path, 3) as members:
            for member in members:
                member.wait_revision(good)
            failures = [
                metric(m.admin, "gatehouse_config_reloads_total", result="failure") for m in members
            ]
            invalid = document("bad", status=999)
            line = invalid.splitlines().index('    respond: {status: 999, body: "bad"}') + 1
            bad = etcd.put(KEY, invalid)  # straight to etcd: no push to validate it
            for member, before in zip(members, failures, strict=True):
                member.wait_metric("gatehouse_config_reloads_total", before + 1, result="failure")
                assert f"{etcd.url(KEY)}@{bad}:{line}: routes[0].respond.status" in (
                    member.gateway.stderr()
                )
                assert member.revision() == good
                assert member.answer() == "good"
            etcd.delete(KEY)  # a deleted key is refused the same way
            for member, before in zip(members, failures, strict=True):
                member.wait_metric("gatehouse_config_reloads_total", before + 2, result="failure")
                assert f"{etcd.url(KEY)}:1: the key does not exist" in member.gateway.stderr()
                assert member.answer() == "good"


def test_gateways_serve_while_etcd_is_down_and_follow_pushes_once_it_is_back(
    tmp_path: Path,
) -> None:
    with running_etcd(tmp_path) as etcd:
        first = etcd.put(KEY, document("before"))
        with fleet(etcd, tmp_path, 3) as members:
            for member in members:
                member.wait_revision(first)
            etcd.kill()
            for member in members:
                member.wait_metric("gatehouse_config_source_up", 0)  # it noticed
                assert member.answer() == "before"
            etcd.start()
            after = tmp_path / "after.yaml"
            after.write_text(document("after"))
            result = push(after, etcd.url(KEY))
            assert result.returncode == 0, result.stderr
            current = etcd.get(KEY)
            assert current is not None
            for member in members:
                member.wait_revision(current[1])
                assert member.answer() == "after"
                log = member.gateway.stderr()
                assert log.count("cannot be reached") == 1, log  # once per outage
                assert metric(member.admin, "gatehouse_config_source_up") == 1
                reconnects = metric(member.admin, "gatehouse_config_source_reconnects_total")
                assert reconnects == 1


def test_a_frozen_etcd_is_noticed_while_watching_and_followed_again_once_it_answers(
    tmp_path: Path,
) -> None:
    """A member that stops answering without closing the watch (SIGSTOP) is noticed by
    the read the source makes every GATEHOUSE_ETCD_CHECK_INTERVAL while it watches."""
    with running_etcd(tmp_path) as etcd:
        first = etcd.put(KEY, document("before"))
        with contextlib.ExitStack() as stack:
            member = start_member(
                stack,
                etcd,
                tmp_path,
                0,
                wait=True,
                env={"GATEHOUSE_ETCD_CHECK_INTERVAL": "0.2"},
            )
            member.wait_revision(first)
            etcd.freeze()
            try:
                member.wait_metric("gatehouse_config_source_up", 0)  # it noticed
                assert member.answer() == "before"
            finally:
                etcd.thaw()
            member.wait_metric("gatehouse_config_source_up", 1)
            after = etcd.put(KEY, document("after"))
            member.wait_revision(after)
            assert member.answer() == "after"


def test_a_gateway_started_while_etcd_is_down_serves_its_cache_then_catches_up(
    tmp_path: Path,
) -> None:
    with running_etcd(tmp_path) as etcd:
        cached = etcd.put(KEY, document("cached"))
        with contextlib.ExitStack() as stack:
            member = start_member(stack, etcd, tmp_path, 0, wait=True)
            member.wait_revision(cached)
        assert member.cache.exists()
        newer = etcd.put(KEY, document("newer"))  # written while no gateway runs
        etcd.kill()
        with contextlib.ExitStack() as stack:
            member = start_member(stack, etcd, tmp_path, 0, wait=True)
            assert member.answer() == "cached"
            assert member.revision() == cached
            assert f"serving the cached revision {cached}" in member.gateway.stderr()
            etcd.start()
            member.wait_revision(newer)
            assert member.answer() == "newer"


def test_a_gateway_started_on_an_invalid_revision_serves_its_cache_then_follows(
    tmp_path: Path,
) -> None:
    """An invalid document written while the gateway was down does not keep it from
    starting: it is refused (counted, logged with its line) and the gateway serves its
    cached last good config, then follows the next valid revision."""
    with running_etcd(tmp_path) as etcd:
        good = etcd.put(KEY, document("good"))
        with contextlib.ExitStack() as stack:
            member = start_member(stack, etcd, tmp_path, 0, wait=True)
            member.wait_revision(good)
        invalid = document("bad", status=999)
        line = invalid.splitlines().index('    respond: {status: 999, body: "bad"}') + 1
        bad = etcd.put(KEY, invalid)  # written while no gateway runs
        with contextlib.ExitStack() as stack:
            member = start_member(stack, etcd, tmp_path, 0, wait=True)
            assert member.answer() == "good"
            assert member.revision() == good
            stderr = member.gateway.stderr()
            assert f"{etcd.url(KEY)}@{bad}:{line}: routes[0].respond.status" in stderr
            assert f"starting on {etcd.url(KEY)}@{good}, the last good config" in stderr
            assert metric(member.admin, "gatehouse_config_reloads_total", result="failure") == 1
            fixed = etcd.put(KEY, document("fixed"))
            member.wait_revision(fixed)
            assert member.answer() == "fixed"


def test_a_gateway_without_a_cache_refuses_to_start_on_an_invalid_revision(
    tmp_path: Path,
) -> None:
    with running_etcd(tmp_path) as etcd:
        etcd.put(KEY, document("bad", status=999))
        with contextlib.ExitStack() as stack:
            member = start_member(stack, etcd, tmp_path, 0, wait=False)
            assert member.gateway.wait(FOLLOW_TIMEOUT_S) == 1
            assert "routes[0].respond.status" in member.gateway.stderr()


def test_two_concurrent_pushes_one_wins_and_the_other_is_refused(tmp_path: Path) -> None:
    with running_etcd(tmp_path) as etcd:
        read = etcd.put(KEY, document("base"))
        files = []
        for name in ("alice", "bob"):
            path = tmp_path / f"{name}.yaml"
            path.write_text(document(name))
            files.append(path)
        # Both read revision `read` before either writes: each pins it.
        processes = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "proxy",
                    "push",
                    str(path),
                    etcd.url(KEY),
                    "--expect-revision",
                    str(read),
                ],
                cwd=REPO_ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for path in files
        ]
        outcomes = [process.communicate(timeout=60) for process in processes]
        codes = sorted(process.returncode for process in processes)
        assert codes == [0, 4], outcomes
        winner = files[[process.returncode for process in processes].index(0)]
        loser_err = outcomes[[process.returncode for process in processes].index(4)][1]
        assert "push refused" in loser_err
        current = etcd.get(KEY)
        assert current is not None
        assert current[0] == winner.read_text()
        assert f"not at revision {read}" in loser_err


def test_push_refuses_an_invalid_file_and_check_and_pull_show_the_key(tmp_path: Path) -> None:
    with running_etcd(tmp_path) as etcd:
        url = etcd.url(KEY)
        missing = run_cli("check", url)
        assert missing.returncode == 1
        assert f"{url}:1: the key does not exist" in missing.stderr
        invalid = tmp_path / "invalid.yaml"
        invalid.write_text(document("x", status=999))
        refused = push(invalid, url)
        assert refused.returncode == 1
        assert f"{invalid}:11: routes[0].respond.status" in refused.stderr
        assert etcd.get(KEY) is None
        valid = tmp_path / "valid.yaml"
        valid.write_text(document("ok"))
        created = push(valid, url, "--expect-revision", "0")
        assert created.returncode == 0, created.stderr
        current = etcd.get(KEY)
        assert current is not None
        checked = run_cli("check", url)
        assert checked.returncode == 0, checked.stderr
        assert checked.stdout.startswith(f"{url}@{current[1]}: ok (1 routes")
        pulled = run_cli("pull", url)
        assert pulled.returncode == 0
        assert pulled.stdout == valid.read_text()
        assert f"{url}@{current[1]}" in pulled.stderr
        stale = push(valid, url, "--expect-revision", "0")
        assert stale.returncode == 4
        assert f"the key is at revision {current[1]}, not at revision 0" in stale.stderr


def test_reload_finds_the_admin_listener_in_the_key_and_refuses_an_invalid_document(
    tmp_path: Path,
) -> None:
    # `gatehouse reload etcd://...` reads admin.bind from the key, as it does from a file
    # (resolving ${ADMIN_PORT} in its own environment); the gateway reads the key again.
    with running_etcd(tmp_path) as etcd, contextlib.ExitStack() as stack:
        url = etcd.url(KEY)
        first = etcd.put(KEY, document("one"))
        member = start_member(stack, etcd, tmp_path, 0, wait=True)
        member.wait_revision(first)
        env = {"ADMIN_PORT": str(member.admin)}
        reloads = metric(member.admin, "gatehouse_config_reloads_total", result="success")
        done = run_cli("reload", url, env=env)
        assert done.returncode == 0, done.stderr
        assert done.stdout == f"reloaded {url}\n"
        assert metric(member.admin, "gatehouse_config_reloads_total", result="success") == (
            reloads + 1
        )
        invalid = etcd.put(KEY, document("x", status=999))
        refused = run_cli("reload", url, env=env)
        assert refused.returncode == 1
        assert f"{url}@{invalid}:11: routes[0].respond.status" in refused.stderr
        assert f"{url}: not reloading" in refused.stderr
        assert member.answer() == "one"  # the watch refused it as well


def test_a_gateway_follows_an_etcd_it_reaches_over_tls(tmp_path: Path) -> None:
    tls = make_tls_files(tmp_path / "tls")
    with running_etcd(tmp_path, tls) as etcd, contextlib.ExitStack() as stack:
        first = etcd.put(KEY, document("private"))
        member = start_member(stack, etcd, tmp_path, 0, wait=True)  # GATEHOUSE_ETCD_CA set
        member.wait_revision(first)
        assert member.answer() == "private"
        second = etcd.put(KEY, document("still private"))
        member.wait_revision(second)
        assert member.answer() == "still private"
