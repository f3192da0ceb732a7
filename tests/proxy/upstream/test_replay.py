"""The copy of a streamed request body kept for a replay (proxy/upstream/replay.py)."""

from __future__ import annotations

from proxy.upstream.replay import REPLAY_BODY_LIMIT_BYTES, BodyCopy


def test_the_chunks_are_kept_in_order_up_to_the_limit() -> None:
    copy = BodyCopy()
    copy.add(b"a" * (REPLAY_BODY_LIMIT_BYTES - 1))
    copy.add(b"b")

    assert copy.joined() == b"a" * (REPLAY_BODY_LIMIT_BYTES - 1) + b"b"


def test_past_the_limit_the_copy_is_given_up_for_good() -> None:
    copy = BodyCopy()
    copy.add(b"a" * REPLAY_BODY_LIMIT_BYTES)
    copy.add(b"b")
    copy.add(b"")

    assert copy.joined() is None


def test_an_empty_copy_is_an_empty_body() -> None:
    assert BodyCopy().joined() == b""
