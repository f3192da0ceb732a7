"""ACME storage (proxy/acme/storage.py): where the account and certificates live, that
every write is whole and private keys are 0600, and what `stored` does with files that
cannot be used."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from proxy.acme.storage import AcmeStorage, server_dirname
from proxy.core.files import write_atomically
from tests.support.tls import TestCa

DIRECTORY = "https://acme-v02.api.letsencrypt.org/directory"


def mode(path: str | Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize(
    ("url", "dirname"),
    [
        (DIRECTORY, "acme-v02.api.letsencrypt.org-directory"),
        (
            "https://acme-staging-v02.api.letsencrypt.org/directory",
            "acme-staging-v02.api.letsencrypt.org-directory",
        ),
        ("https://127.0.0.1:14000/dir", "127.0.0.1_14000-dir"),
        ("https://ca.example/acme/../x?y=1", "ca.example-acme-..-x"),
    ],
)
def test_each_server_has_a_directory_named_after_its_url(url: str, dirname: str) -> None:
    assert server_dirname(url) == dirname
    assert "/" not in server_dirname(url)


def test_a_saved_certificate_reads_back_with_its_key_private(tmp_path: Path) -> None:
    ca = TestCa(tmp_path / "ca")
    issued = ca.issue("a", ("a.example.com",))
    storage = AcmeStorage(str(tmp_path / "acme"), DIRECTORY)

    stored = storage.save_certificate(
        "a.example.com", issued.cert.read_bytes(), issued.key.read_bytes()
    )

    assert stored.leaf.serial_number == issued.leaf().serial_number
    assert stored.covers("a.example.com")
    assert not stored.covers("b.example.com")
    assert (stored.cert, stored.key) == storage.certificate_files("a.example.com")
    assert stored.cert.startswith(str(tmp_path / "acme" / "acme-v02.api.letsencrypt.org-directory"))
    assert mode(stored.key) == 0o600
    assert mode(stored.cert) == 0o644
    assert mode(tmp_path / "acme") == 0o700
    assert storage.stored("a.example.com") == stored


def test_nothing_stored_is_none(tmp_path: Path) -> None:
    storage = AcmeStorage(str(tmp_path / "acme"), DIRECTORY)
    assert storage.stored("a.example.com") is None
    assert storage.load_account_key() is None


def test_a_certificate_whose_key_is_another_is_not_usable(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ca = TestCa(tmp_path / "ca")
    first, second = ca.issue("a", ("a.example.com",)), ca.issue("b", ("a.example.com",))
    storage = AcmeStorage(str(tmp_path / "acme"), DIRECTORY)
    storage.save_certificate("a.example.com", first.cert.read_bytes(), first.key.read_bytes())
    _, key = storage.certificate_files("a.example.com")
    Path(key).write_bytes(second.key.read_bytes())  # as if caught half way through a write

    assert storage.stored("a.example.com") is None
    assert "does not match its key" in caplog.text


def test_a_chain_that_does_not_parse_is_not_usable(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ca = TestCa(tmp_path / "ca")
    issued = ca.issue("a", ("a.example.com",))
    storage = AcmeStorage(str(tmp_path / "acme"), DIRECTORY)
    storage.save_certificate("a.example.com", issued.cert.read_bytes(), issued.key.read_bytes())
    Path(storage.certificate_files("a.example.com")[0]).write_bytes(b"not a certificate")

    assert storage.stored("a.example.com") is None
    assert "cannot be used" in caplog.text


def test_the_account_key_is_kept_private(tmp_path: Path) -> None:
    storage = AcmeStorage(str(tmp_path / "acme"), DIRECTORY)
    storage.save_account_key(b"-----BEGIN PRIVATE KEY-----\n")
    assert storage.load_account_key() == b"-----BEGIN PRIVATE KEY-----\n"
    assert mode(storage.account_key) == 0o600


def test_a_challenge_file_is_private_and_removed_after(tmp_path: Path) -> None:
    storage = AcmeStorage(str(tmp_path / "acme"), DIRECTORY)
    path = storage.save_challenge("a.example.com", b"pem")
    assert mode(path) == 0o600
    storage.remove_challenge("a.example.com")
    assert not os.path.exists(path)
    storage.remove_challenge("a.example.com")  # gone already: fine


def test_a_write_replaces_the_file_in_one_rename_and_leaves_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "dir" / "file"
    write_atomically(str(path), b"old", 0o600)
    inode = os.stat(path).st_ino
    write_atomically(str(path), b"new", 0o600)
    assert path.read_bytes() == b"new"
    assert os.stat(path).st_ino != inode  # a new file, renamed over the old
    assert os.listdir(tmp_path / "dir") == ["file"]


def test_a_failed_write_keeps_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "file"
    write_atomically(str(path), b"old", 0o600)
    with pytest.raises(TypeError):
        write_atomically(str(path), "not bytes", 0o600)  # type: ignore[arg-type]
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["file"]
