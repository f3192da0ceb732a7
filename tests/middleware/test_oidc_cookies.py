"""The `oidc` cookie codec (middleware/oidc_cookies.py): sealing (AES-GCM under keys
derived from the secrets; any change refused), rotation, chunks and their bound, the
session's payload and the Set-Cookie values."""

from __future__ import annotations

import base64
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from middleware.oidc_cookies import (
    CHUNK_BYTES,
    MAX_CHUNKS,
    CookieAttributes,
    CookieSealer,
    Session,
    SessionTooLarge,
    encode_session,
    join,
    names_of,
    open_session,
    parse_cookies,
    split,
)

OLD = b"an-old-secret-that-is-32-bytes-long!"
NEW = b"a-new-secret-that-is-32-bytes-long!!"
SESSION = Session(
    subject="alice",
    started=1000.0,
    ends=87400.0,
    expires=1300.5,
    claims={"sub": "alice", "groups": ["a", "b"]},
    id_token="header.payload.signature",
    refresh_token="refresh-token",
    access_token="",
)


def _blob(value: str) -> bytes:
    return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))


def _sealed(blob: bytes) -> str:
    return base64.urlsafe_b64encode(blob).rstrip(b"=").decode()


def test_a_sealed_value_opens_for_its_purpose_only_and_shows_nothing() -> None:
    sealer = CookieSealer([NEW])
    payload = {"sub": "alice", "secret": "refresh-token"}
    value = sealer.seal("session:sid", payload)
    assert sealer.open("session:sid", value) == payload
    assert sealer.open("session:other", value) is None  # another cookie's purpose
    assert sealer.open("login:sid:state", value) is None
    assert b"alice" not in _blob(value)
    assert b"refresh" not in _blob(value)
    assert value != sealer.seal("session:sid", payload)  # a fresh nonce each time


@given(st.data())
def test_any_change_to_a_sealed_value_is_refused(data: st.DataObject) -> None:
    sealer = CookieSealer([NEW])
    blob = bytearray(_blob(sealer.seal("p", {"sub": "alice"})))
    index = data.draw(st.integers(0, len(blob) - 1))
    blob[index] ^= data.draw(st.integers(1, 255))
    assert sealer.open("p", _sealed(bytes(blob))) is None


@pytest.mark.parametrize(
    "value",
    ["", "not base64!", "AAAA", "A" * 40, "ab.cd", "é", _sealed(b"\x02" + b"\0" * 40)],
)
def test_values_that_are_not_sealed_do_not_open(value: str) -> None:
    assert CookieSealer([NEW]).open("p", value) is None


def test_cut_or_lengthened_values_do_not_open() -> None:
    sealer = CookieSealer([NEW])
    value = sealer.seal("p", {"a": 1})
    for changed in (value[:-1], value[:-8], value + "A", value + value, value[1:]):
        assert sealer.open("p", changed) is None, changed


def test_rotation_seals_with_the_first_secret_and_opens_with_each() -> None:
    old_value = CookieSealer([OLD]).seal("p", {"v": "old"})
    rotated = CookieSealer([NEW, OLD])
    assert rotated.open("p", old_value) == {"v": "old"}
    new_value = rotated.seal("p", {"v": "new"})
    assert CookieSealer([NEW]).open("p", new_value) == {"v": "new"}
    assert CookieSealer([OLD]).open("p", new_value) is None
    assert CookieSealer([NEW]).open("p", old_value) is None  # the old secret dropped


def test_short_secrets_and_no_secret_are_refused() -> None:
    with pytest.raises(ValueError, match="at least 32"):
        CookieSealer([b"short"])
    with pytest.raises(ValueError, match="at least one"):
        CookieSealer([])


def test_a_sealed_json_value_that_is_not_an_object_does_not_open() -> None:
    sealer = CookieSealer([NEW])
    assert sealer.open("p", sealer.seal("p", {"a": 1})) == {"a": 1}
    # (seal takes mappings; a list sealed by hand under the same key is refused)
    cipher = sealer._ciphers[0]
    nonce = b"\0" * 12
    blob = b"\x01" + nonce + cipher.encrypt(nonce, json.dumps([1]).encode(), b"p")
    assert sealer.open("p", _sealed(blob)) is None


@pytest.mark.parametrize("length", [0, 1, CHUNK_BYTES, CHUNK_BYTES + 1, 3 * CHUNK_BYTES + 7])
def test_split_and_join_give_the_value_back(length: int) -> None:
    value = ("abcdefghij" * (length // 10 + 1))[:length]
    cookies = split("sid", value)
    assert all(len(part) <= CHUNK_BYTES for _, part in cookies)
    if length <= CHUNK_BYTES:
        assert [name for name, _ in cookies] == ["sid"]
    else:
        assert [name for name, _ in cookies] == [f"sid.{i}" for i in range(len(cookies))]
    assert join(dict(cookies), "sid") == value


def test_join_reads_consecutive_chunks_only_and_at_most_max_chunks() -> None:
    assert join({}, "sid") is None
    assert join({"sid.1": "b"}, "sid") is None  # no first chunk
    assert join({"sid.0": "a", "sid.2": "c"}, "sid") == "a"  # a gap ends it
    assert join({"sid": "whole", "sid.0": "a"}, "sid") == "whole"
    many = {f"sid.{i}": "x" for i in range(MAX_CHUNKS + 5)}
    assert join(many, "sid") == "x" * MAX_CHUNKS


def test_names_of_finds_the_cookie_and_its_chunks() -> None:
    names = ["sid", "sid.0", "sid.12", "sid.x", "sidx", "other", "sid_login_abc"]
    assert names_of(names, "sid") == ["sid", "sid.0", "sid.12"]


def test_parse_cookies_keeps_the_first_of_a_name_and_unquotes() -> None:
    lines = ['a=1; b="two"; a=3', "c=; =x; junk; d = 4 "]
    assert parse_cookies(lines) == {"a": "1", "b": "two", "c": "", "d": "4"}


def test_a_session_goes_through_its_cookies_and_back() -> None:
    sealer = CookieSealer([NEW])
    cookies, stored = encode_session(sealer, "sid", SESSION, 8192)
    assert stored == SESSION
    assert [name for name, _ in cookies] == ["sid"]
    value = join(dict(cookies), "sid")
    assert value is not None
    assert open_session(sealer, "sid", value) == SESSION
    assert open_session(sealer, "other", value) is None


def test_a_large_session_is_chunked_within_the_cap() -> None:
    sealer = CookieSealer([NEW])
    big = Session("alice", 1.0, 2.0, 1.5, access_token="a" * 5000, id_token="i" * 2000)
    cookies, stored = encode_session(sealer, "sid", big, 16384)
    assert stored == big
    assert [name for name, _ in cookies] == ["sid.0", "sid.1", "sid.2"]
    assert open_session(sealer, "sid", join(dict(cookies), "sid") or "") == big


def test_over_the_cap_the_id_token_goes_first_then_the_session_is_refused() -> None:
    sealer = CookieSealer([NEW])
    big = Session("alice", 1.0, 2.0, 1.5, access_token="a" * 3000, id_token="i" * 3000)
    cookies, stored = encode_session(sealer, "sid", big, 6000)
    assert stored.id_token == ""
    assert stored.access_token == big.access_token
    assert sum(len(value) for _, value in cookies) <= 6000
    with pytest.raises(SessionTooLarge, match="over cookie_max_size"):
        encode_session(sealer, "sid", big, 3000)


@pytest.mark.parametrize(
    "payload",
    [
        {},
        {"sub": 1, "st": 1, "end": 2, "exp": 2},
        {"sub": "a", "st": "1", "end": 2, "exp": 2},
        {"sub": "a", "st": 1, "end": 2, "exp": True},
        {"sub": "a", "st": 1, "end": 2, "exp": 2, "c": []},
        {"sub": "a", "st": 1, "end": 2, "exp": 2, "rt": 5},
    ],
)
def test_payloads_of_another_shape_are_no_session(payload: dict[str, object]) -> None:
    assert Session.from_payload(payload) is None


def test_set_cookie_values_carry_the_attributes() -> None:
    auto = CookieAttributes()
    assert auto.set_cookie("sid", "v", 60, https=False) == (
        "sid=v; Path=/; Max-Age=60; HttpOnly; SameSite=Lax"
    )
    assert "; Secure;" in auto.set_cookie("sid", "v", 60, https=True)
    never = CookieAttributes(secure=False, domain="example.com")
    assert never.set_cookie("sid", "v", -5, https=True, path="/cb") == (
        "sid=v; Path=/cb; Max-Age=0; Domain=example.com; HttpOnly; SameSite=Lax"
    )
    assert "Secure" in CookieAttributes(secure=True).set_cookie("sid", "v", 1, https=False)
    expired = auto.expire("sid", https=False)
    assert expired.startswith("sid=; Path=/; Max-Age=0;")
    assert expired.endswith("Expires=Thu, 01 Jan 1970 00:00:00 GMT")
