"""Downloads checked against checksums, data and cache folders, atomic writes."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pytest
from fixtures_omniglot import closed_port_url, serve, status, truncated

from metajax.data import sources
from metajax.data.sources import (
    ChecksumError,
    DataDirNotFoundError,
    DataNotFoundError,
    DownloadError,
    atomic_save_npz,
    cache_dir_candidates,
    check_sha256,
    fetch,
    is_writable_dir,
    require_data_dir,
    resolve_data_dir,
    resolve_url,
    sha256_file,
)

PAYLOAD = bytes(range(256)) * 4099  # a little over 1 MiB, so it arrives in several chunks
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()


def only(folder):
    """Names in ``folder``, hidden temporary files included."""
    return sorted(p.name for p in folder.iterdir())


def test_sha256_file(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(PAYLOAD)
    assert sha256_file(path) == PAYLOAD_SHA


def test_check_sha256_normalises_and_rejects():
    assert check_sha256(PAYLOAD_SHA.upper()) == PAYLOAD_SHA
    with pytest.raises(ValueError, match="64 hex digits"):
        check_sha256("abc")


def test_fetch_success(tmp_path, capsys):
    with serve({"/f.bin": PAYLOAD}) as url:
        dest = fetch(url + "f.bin", tmp_path / "sub" / "f.bin", PAYLOAD_SHA, size=len(PAYLOAD))
    assert dest.read_bytes() == PAYLOAD
    assert only(dest.parent) == ["f.bin"]
    assert dest.stat().st_mode & 0o777 == 0o644
    assert "f.bin" in capsys.readouterr().err  # progress on stderr


def test_fetch_checksum_mismatch_leaves_nothing(tmp_path):
    wrong = "0" * 64
    with serve({"/f.bin": PAYLOAD}) as url:
        with pytest.raises(ChecksumError) as info:
            fetch(url + "f.bin", tmp_path / "f.bin", wrong, progress=False)
    message = str(info.value)
    assert "f.bin" in message and wrong in message and PAYLOAD_SHA in message
    assert (info.value.expected, info.value.actual) == (wrong, PAYLOAD_SHA)
    assert only(tmp_path) == []


def test_fetch_size_mismatch_leaves_nothing(tmp_path):
    with serve({"/f.bin": PAYLOAD}) as url:
        with pytest.raises(ChecksumError, match="expected 5"):
            fetch(url + "f.bin", tmp_path / "f.bin", PAYLOAD_SHA, size=5, progress=False)
    assert only(tmp_path) == []


def test_fetch_truncated_leaves_nothing(tmp_path):
    with serve({"/f.bin": truncated(PAYLOAD)}) as url:
        with pytest.raises(DownloadError, match="cut short"):
            fetch(url + "f.bin", tmp_path / "f.bin", PAYLOAD_SHA, progress=False)
    assert only(tmp_path) == []


@pytest.mark.parametrize("code", [404, 500])
def test_fetch_http_error_leaves_old_file(tmp_path, code):
    dest = tmp_path / "f.bin"
    dest.write_bytes(b"old")
    with serve({"/f.bin": status(code)}) as url:
        with pytest.raises(DownloadError, match=f"HTTP {code}"):
            fetch(url + "f.bin", dest, PAYLOAD_SHA, progress=False)
    assert only(tmp_path) == ["f.bin"] and dest.read_bytes() == b"old"


def test_fetch_connection_refused(tmp_path):
    with pytest.raises(DownloadError, match="failed"):
        fetch(closed_port_url() + "f.bin", tmp_path / "f.bin", PAYLOAD_SHA, progress=False)
    assert only(tmp_path) == []


def test_data_not_found_error_message(tmp_path):
    error = DataNotFoundError(tmp_path, ["a.zip", "b.zip"], urls=["http://x/a.zip"], reason="r")
    assert isinstance(error, FileNotFoundError)
    text = str(error)
    for part in ("a.zip", "b.zip", str(tmp_path), "http://x/a.zip", "r", "METAJAX_DATA_DIR"):
        assert part in text
    assert error.files == ("a.zip", "b.zip") and error.folder == tmp_path


def test_is_writable_dir_honours_mode_bits_and_creates_nothing(tmp_path):
    assert is_writable_dir(tmp_path / "not" / "yet")
    assert not (tmp_path / "not").exists()
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        # Read-only by its mode bits, also when the tests run as root.
        assert not is_writable_dir(locked)
        assert not is_writable_dir(locked / "child")
    finally:
        locked.chmod(0o755)
    (tmp_path / "file").write_text("x")
    assert not is_writable_dir(tmp_path / "file")


def test_resolve_data_dir_and_user_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("METAJAX_DATA_DIR", raising=False)
    assert resolve_data_dir() == tmp_path / "xdg" / "metajax"
    monkeypatch.setenv("METAJAX_DATA_DIR", str(tmp_path / "env"))
    assert resolve_data_dir() == tmp_path / "env"
    assert resolve_data_dir(tmp_path / "arg") == tmp_path / "arg"
    assert sources.user_cache_dir() == tmp_path / "xdg" / "metajax"


def test_require_data_dir_reports_a_named_directory_that_is_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("METAJAX_DATA_DIR", raising=False)
    # The default (the user cache) may be missing: downloads create it.
    assert require_data_dir() == tmp_path / "xdg" / "metajax"
    assert require_data_dir(tmp_path) == tmp_path
    with pytest.raises(DataDirNotFoundError) as info:
        require_data_dir(tmp_path / "typo")
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, DataNotFoundError)
    assert str(tmp_path / "typo") in str(info.value) and "create it first" in str(info.value)
    assert info.value.folder == tmp_path / "typo"
    monkeypatch.setenv("METAJAX_DATA_DIR", str(tmp_path / "env"))
    with pytest.raises(DataDirNotFoundError, match=r"\$METAJAX_DATA_DIR"):
        require_data_dir()
    (tmp_path / "env").write_text("a file")
    with pytest.raises(DataDirNotFoundError, match="is not a directory"):
        require_data_dir()
    assert not (tmp_path / "typo").exists() and not (tmp_path / "xdg").exists()


def test_cache_dir_candidates(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("METAJAX_CACHE_DIR", raising=False)
    monkeypatch.delenv("METAJAX_DATA_DIR", raising=False)
    assert cache_dir_candidates("ds", tmp_path / "data") == [
        tmp_path / "data" / "ds" / "cache",
        tmp_path / "xdg" / "metajax" / "ds" / "cache",
    ]
    # Data dir defaulting to the user cache: one candidate, not the same folder twice.
    assert cache_dir_candidates("ds") == [tmp_path / "xdg" / "metajax" / "ds" / "cache"]
    assert cache_dir_candidates("ds", tmp_path, tmp_path / "c") == [tmp_path / "c"]
    monkeypatch.setenv("METAJAX_CACHE_DIR", str(tmp_path / "env"))
    assert cache_dir_candidates("ds", tmp_path) == [tmp_path / "env" / "ds"]


def test_resolve_url(monkeypatch):
    monkeypatch.delenv("X_URL", raising=False)
    assert resolve_url(None, "X_URL", "http://default") == "http://default/"
    monkeypatch.setenv("X_URL", "http://env/")
    assert resolve_url(None, "X_URL", "http://default") == "http://env/"
    assert resolve_url("http://arg", "X_URL", "http://default") == "http://arg/"


def test_atomic_save_npz_roundtrip_and_failure(tmp_path):
    path = atomic_save_npz(tmp_path / "c" / "a.npz", x=np.arange(3))
    with np.load(path) as f:
        np.testing.assert_array_equal(f["x"], np.arange(3))

    class Exploding:
        def __array__(self, *args, **kwargs):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        atomic_save_npz(tmp_path / "c" / "b.npz", x=Exploding())
    assert only(tmp_path / "c") == ["a.npz"]
    assert os.access(path, os.R_OK)
