"""Request ids: 32 hex digits, unique, cut from a pool of random bytes that a forked
child never shares with its parent."""

from __future__ import annotations

import os
import re

from proxy.core.ids import POOL_BYTES, new_request_id

ID = re.compile(r"[0-9a-f]{32}")


def test_ids_are_32_hex_digits_and_unique_across_pool_refills() -> None:
    count = 3 * POOL_BYTES // 16  # three refills of the pool
    ids = [new_request_id() for _ in range(count)]
    assert all(ID.fullmatch(request_id) for request_id in ids)
    assert len(set(ids)) == count


def test_a_forked_child_does_not_repeat_its_parents_next_ids() -> None:
    new_request_id()  # the pool holds unused bytes now
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next ids, then out without running pytest's teardown
        try:
            os.close(read_end)
            os.write(write_end, " ".join(new_request_id() for _ in range(8)).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        child = pipe.read().decode().split()
    os.waitpid(pid, 0)
    parent = [new_request_id() for _ in range(8)]
    assert len(child) == 8
    assert not set(child) & set(parent)
