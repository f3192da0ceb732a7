"""Files the gateway writes for itself (ACME's account and certificates, the config
source's cache): replaced in one rename, durable once written, in private directories."""

from __future__ import annotations

import contextlib
import os
import tempfile

DIRECTORY_MODE = 0o700


def make_directories(directory: str) -> None:
    """`directory` and those above it that are missing, each 0700 (os.makedirs gives
    the mode to the last one only)."""
    if os.path.isdir(directory):
        return
    make_directories(os.path.dirname(directory))
    with contextlib.suppress(FileExistsError):
        os.mkdir(directory, DIRECTORY_MODE)


def write_atomically(path: str, data: bytes, mode: int) -> None:
    """Replace `path` with `data` in one rename, its directories made (0700) as needed.

    Raises:
        OSError: it cannot be written (the old file, if any, stays).
    """
    directory = os.path.dirname(path)
    make_directories(directory)
    fd, temporary = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    # The rename itself reaches the disk with its directory.
    directory_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(directory_fd)
    finally:
        os.close(directory_fd)
