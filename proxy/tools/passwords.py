"""`gatehouse hash-password`: a bcrypt hash for basic_auth's `users` or an htpasswd file,
as `htpasswd -B` writes one, without needing Apache's tools on the machine.

The password comes from the terminal (asked twice, not echoed), or from the first line
of standard input when that is not a terminal (`printf %s "$PW" | gatehouse
hash-password`), so that it never appears in a command line or the shell's history.
"""

from __future__ import annotations

import getpass
import sys
from typing import TextIO

import bcrypt

DEFAULT_COST = 12  # bcrypt's own default: ~100-250 ms per check on today's servers
MIN_COST, MAX_COST = 4, 31  # what bcrypt accepts
BCRYPT_MAX_BYTES = 72  # bcrypt reads no further; basic_auth truncates the same way


class PasswordError(ValueError):
    """No usable password was given; the message says why."""


def hash_password(password: bytes, cost: int = DEFAULT_COST) -> str:
    """The `$2b$` bcrypt hash of `password` (its first 72 bytes) at `cost`."""
    if not MIN_COST <= cost <= MAX_COST:
        raise PasswordError(f"cost must be between {MIN_COST} and {MAX_COST}, got {cost}")
    if not password:
        raise PasswordError("the password is empty")
    salt = bcrypt.gensalt(rounds=cost)
    return bcrypt.hashpw(password[:BCRYPT_MAX_BYTES], salt).decode("ascii")


def read_password(stdin: TextIO) -> bytes:
    """The password: asked twice on a terminal, else the first line of `stdin` (its line
    ending removed)."""
    if stdin.isatty():
        first = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != first:
            raise PasswordError("the two passwords differ")
        return first.encode()
    return stdin.readline().removesuffix("\n").removesuffix("\r").encode()


def hash_password_command(user: str | None, cost: int) -> int:
    """Print the hash (or an htpasswd `user:hash` line); 2 with a message if refused."""
    if user is not None and (not user or ":" in user):
        sys.stderr.write("gatehouse hash-password: a user name must not be empty or hold ':'\n")
        return 2
    try:
        password = read_password(sys.stdin)
        if len(password) > BCRYPT_MAX_BYTES:
            sys.stderr.write(
                f"gatehouse hash-password: note: bcrypt uses the first {BCRYPT_MAX_BYTES} "
                "bytes of the password; the rest does not count\n"
            )
        hashed = hash_password(password, cost)
    except PasswordError as refused:
        sys.stderr.write(f"gatehouse hash-password: {refused}\n")
        return 2
    if user is not None:
        sys.stdout.write(f"{user}:{hashed}\n")
    else:
        sys.stdout.write(f"{hashed}\n")
    return 0
