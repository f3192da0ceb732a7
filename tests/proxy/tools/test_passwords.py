"""`gatehouse hash-password`: the hashes it prints are ones basic_auth verifies, the
password comes from a real terminal (asked twice, pty) or from standard input, and what it
refuses gets a message and exit status 2."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time

import pytest

from middleware.basic_auth import parse_password_hash
from proxy.tools.passwords import PasswordError, hash_password

COMMAND = [sys.executable, "-m", "proxy", "hash-password"]


def test_a_hash_verifies_its_password_only() -> None:
    hashed = hash_password(b"correct horse", cost=4)
    assert hashed.startswith("$2b$04$")
    verifier = parse_password_hash(hashed)
    assert verifier.verify(b"correct horse")
    assert not verifier.verify(b"correct horse!")
    assert hash_password(b"correct horse", cost=4) != hashed  # a fresh salt each time


def test_a_password_past_72_bytes_counts_as_bcrypt_counts_it() -> None:
    long = b"x" * 72
    verifier = parse_password_hash(hash_password(long + b"tail", cost=4))
    assert verifier.verify(long)  # basic_auth truncates the same way htpasswd -B does


@pytest.mark.parametrize(
    ("password", "cost", "message"),
    [
        (b"", 12, "the password is empty"),
        (b"pw", 3, "cost must be between 4 and 31, got 3"),
        (b"pw", 32, "cost must be between 4 and 31, got 32"),
    ],
)
def test_what_cannot_be_hashed_is_refused(password: bytes, cost: int, message: str) -> None:
    with pytest.raises(PasswordError, match=message):
        hash_password(password, cost)


def run(stdin: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*COMMAND, *args], input=stdin, capture_output=True, text=True, timeout=60, check=False
    )


def test_the_password_may_come_from_stdins_first_line() -> None:
    done = run("s3cret\nnot this line\n", "--user", "alice", "--cost", "4")
    assert done.returncode == 0, done.stderr
    user, hashed = done.stdout.rstrip("\n").split(":", 1)
    assert user == "alice"
    assert parse_password_hash(hashed).verify(b"s3cret")  # the newline is not part of it
    assert not parse_password_hash(hashed).verify(b"s3cret\n")


@pytest.mark.parametrize(
    ("stdin", "args", "message"),
    [
        ("\n", [], "gatehouse hash-password: the password is empty"),
        ("pw\n", ["--cost", "40"], "gatehouse hash-password: cost must be between 4 and 31"),
        ("pw\n", ["--user", "a:b"], "a user name must not be empty or hold ':'"),
    ],
)
def test_a_refusal_is_a_message_and_status_2(stdin: str, args: list[str], message: str) -> None:
    done = run(stdin, *args)
    assert done.returncode == 2
    assert message in done.stderr
    assert done.stdout == ""


def converse(answers: list[bytes]) -> tuple[int, str]:
    """Run the command on a new pseudo-terminal (its controlling terminal, where getpass
    asks), answering each prompt in turn: (exit status, everything it wrote there)."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: the pty is its terminal
        os.execv(sys.executable, [*COMMAND, "--cost", "4"])
    seen = b""
    deadline = time.monotonic() + 60
    answered = 0
    try:
        while True:
            ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
            assert ready, f"no answer from hash-password; it wrote {seen!r}"
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # EIO: the child closed the terminal (it exited)
                break
            if not chunk:
                break
            seen += chunk
            # Answer each prompt once it has been written: getpass turns echo off (and
            # flushes what was typed before) first, so an earlier answer would be lost.
            prompts = seen.count(b"Password: ") + seen.count(b"Again: ")
            if answered < min(prompts, len(answers)):
                os.write(fd, answers[answered] + b"\n")
                answered += 1
    finally:
        _, status = os.waitpid(pid, 0)
        os.close(fd)
    return os.waitstatus_to_exitcode(status), seen.decode()


def test_on_a_terminal_the_password_is_asked_twice_and_not_echoed() -> None:
    status, seen = converse([b"typed secret", b"typed secret"])
    assert status == 0, seen
    assert "typed secret" not in seen
    [hashed] = [line for line in seen.splitlines() if line.startswith("$2b$")]
    assert parse_password_hash(hashed.strip()).verify(b"typed secret")


def test_on_a_terminal_two_different_passwords_are_refused() -> None:
    status, seen = converse([b"one", b"two"])
    assert status == 2
    assert "the two passwords differ" in seen
    assert "$2b$" not in seen
