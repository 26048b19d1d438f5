"""CIFAR-100 loading from a tiny archive in the exact layout of ``cifar-100-python.tar.gz``.

The fixture's pickles are written as Python 2 wrote the originals: protocol 2, byte strings
as Python 2 ``str`` opcodes, numpy globals under ``numpy.core``; a loader that needs Python 3
pickles, or plain ``pickle.load``, would show it.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
from fixtures_omniglot import closed_port_url, serve, truncated

from metajax.data import cifar100
from metajax.data.cifar100 import (
    CIFAR100FormatError,
    MD5MismatchError,
    load_cifar100,
)
from metajax.data.sources import ChecksumError, DataNotFoundError, ForbiddenPickleError

N_TRAIN, N_TEST = 100, 20


class _Py2Pickler(pickle._Pickler):  # the pure-Python pickler lets one opcode be swapped
    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2_str(self, obj: bytes) -> None:
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + len(obj).to_bytes(4, "little") + obj)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str


def py2_pickle(obj) -> bytes:
    buffer = io.BytesIO()
    _Py2Pickler(buffer, protocol=2).dump(obj)
    # Python 2 numpy lives in numpy.core; protocol 2 names globals as text lines.
    return buffer.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")


def make_split(n: int, rng: np.random.Generator, name: bytes) -> dict:
    fine = rng.integers(0, 100, n)
    return {
        b"filenames": [b"img_%05d.png" % i for i in range(n)],
        b"batch_label": name,
        b"fine_labels": [int(v) for v in fine],
        b"coarse_labels": [int(v) // 5 for v in fine],
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
    }


def make_members(seed: int = 0) -> dict[str, bytes]:
    rng = np.random.default_rng(seed)
    meta = {
        b"fine_label_names": [b"class_%02d" % i for i in range(100)],
        b"coarse_label_names": [b"super_%02d" % i for i in range(20)],
    }
    return {
        "train": py2_pickle(make_split(N_TRAIN, rng, b"training batch 1 of 1")),
        "test": py2_pickle(make_split(N_TEST, rng, b"testing batch 1 of 1")),
        "meta": py2_pickle(meta),
    }


def build_tar(members: dict[str, bytes], extra: dict[str, bytes] | None = None) -> bytes:
    """A tar.gz with ``cifar-100-python/`` and the members, in the original's order."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        folder = tarfile.TarInfo("cifar-100-python")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
        files = {"file.txt~": b"", **members, **(extra or {})}
        for name, data in files.items():
            info = tarfile.TarInfo(f"cifar-100-python/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def archive_spec(data: bytes) -> cifar100.CIFAR100File:
    return cifar100.CIFAR100File(
        cifar100.ARCHIVE.filename,
        hashlib.sha256(data).hexdigest(),
        hashlib.md5(data).hexdigest(),
        len(data),
    )


@pytest.fixture(scope="module")
def members():
    return make_members()


@pytest.fixture
def archive(members, monkeypatch) -> bytes:
    data = build_tar(members)
    monkeypatch.setattr(cifar100, "ARCHIVE", archive_spec(data))
    return data


@pytest.fixture
def data_dir(tmp_path, monkeypatch, archive):
    monkeypatch.setenv("METAJAX_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("METAJAX_CIFAR100_URL", closed_port_url())
    folder = tmp_path / "data" / "cifar100"
    folder.mkdir(parents=True)
    (folder / cifar100.ARCHIVE.filename).write_bytes(archive)
    # An empty data directory for the download tests: a data directory must exist (a
    # mistyped one is an error, not created); downloads create the dataset's folder in it.
    (tmp_path / "fresh").mkdir()
    return tmp_path / "data"


def load(**kwargs):
    return load_cifar100(progress=False, **kwargs)


def expected(members, split: str):
    obj = pickle.loads(members[split], encoding="bytes")  # trusted: the test's own bytes
    x = obj[b"data"].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return x, np.array(obj[b"fine_labels"]), np.array(obj[b"coarse_labels"])


def write_archive(data_dir: Path, data: bytes, monkeypatch) -> Path:
    monkeypatch.setattr(cifar100, "ARCHIVE", archive_spec(data))
    path = data_dir / "cifar100" / cifar100.ARCHIVE.filename
    path.write_bytes(data)
    return path


# --- loading --------------------------------------------------------------------------------


def test_fixture_pickles_are_python2_style(members):
    assert b"cnumpy.core.multiarray\n_reconstruct" in members["train"]
    assert pickle.SHORT_BINSTRING + bytes([4]) + b"data" in members["train"]


def test_loads_arrays_in_hwc_order(data_dir, members):
    data = load()
    for split, n in (("train", N_TRAIN), ("test", N_TEST)):
        x, fine, coarse = expected(members, split)
        got_x, got_y, got_coarse = (getattr(data, f"{split}_{k}") for k in ("x", "y", "coarse"))
        assert got_x.shape == (n, 32, 32, 3) and got_x.dtype == np.uint8
        assert got_x.flags.c_contiguous
        np.testing.assert_array_equal(got_x, x)
        np.testing.assert_array_equal(got_y, fine)
        np.testing.assert_array_equal(got_coarse, coarse)
        assert got_y.dtype == np.uint8
    # Red plane first in the rows: pixel (0, 1) of image 0 is row bytes 1, 1025 and 2049.
    row = pickle.loads(members["train"], encoding="bytes")[b"data"][0]
    np.testing.assert_array_equal(data.train_x[0, 0, 1], row[[1, 1025, 2049]])
    assert data.fine_names[7] == "class_07" and len(data.coarse_names) == 20


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_python3_pickles_with_str_or_bytes_keys(data_dir, members, monkeypatch, protocol):
    """A copy re-pickled by Python 3 (str keys or bytes keys) reads the same."""
    train = pickle.loads(members["train"], encoding="bytes")  # trusted: the test's own bytes
    keyed = {k.decode(): v for k, v in train.items()} if protocol == 4 else train
    repickled = build_tar({**members, "train": pickle.dumps(keyed, protocol=protocol)})
    write_archive(data_dir, repickled, monkeypatch)
    x, fine, _ = expected(members, "train")
    data = load()
    np.testing.assert_array_equal(data.train_x, x)
    np.testing.assert_array_equal(data.train_y, fine)


def test_extracted_folder_with_md5(data_dir, members, monkeypatch):
    (data_dir / "cifar100" / cifar100.ARCHIVE.filename).unlink()
    folder = data_dir / "cifar100" / "cifar-100-python"
    folder.mkdir()
    for name, data in members.items():
        (folder / name).write_bytes(data)
    md5 = {name: hashlib.md5(data).hexdigest() for name, data in members.items()}
    monkeypatch.setattr(cifar100, "MEMBERS", md5)
    np.testing.assert_array_equal(load().test_y, expected(members, "test")[1])
    (folder / "meta").write_bytes(py2_pickle({b"fine_label_names": [], b"other": 1}))
    with pytest.raises(MD5MismatchError, match="meta: md5 [0-9a-f]{32}, expected " + md5["meta"]):
        load()
    with pytest.raises(CIFAR100FormatError, match="coarse_label_names"):
        load(verify=False)


# --- verification ---------------------------------------------------------------------------


def test_archive_with_other_checksum(data_dir, archive, members):
    path = data_dir / "cifar100" / cifar100.ARCHIVE.filename
    path.write_bytes(build_tar(make_members(seed=1)))
    with pytest.raises(ChecksumError) as info:
        load()
    message = str(info.value)
    assert path.name in message and cifar100.ARCHIVE.sha256 in message
    assert "verify=False" in message
    assert load(verify=False).train_x.shape == (N_TRAIN, 32, 32, 3)


def test_malicious_pickle_is_refused(data_dir, members, monkeypatch, tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = pickle.dumps({b"data": Payload()}, protocol=2)
    path = write_archive(data_dir, build_tar({**members, "train": evil}), monkeypatch)
    with pytest.raises(ForbiddenPickleError, match="system") as info:
        load()
    assert f"{path}: member cifar-100-python/train" in str(info.value)
    assert not marker.exists()


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda m, a: a[: len(a) // 2], "truncated or corrupt"),
        (lambda m, a: b"not a tar at all", "not a readable tar.gz"),
        (lambda m, a: build_tar({"train": m["train"], "test": m["test"]}), "meta'] are missing"),
        (lambda m, a: build_tar({**m, "test": m["test"][:-40]}), "not a readable CIFAR-100"),
        (lambda m, a: build_tar({**m, "test": py2_pickle([1, 2])}), "a list, expected a dict"),
    ],
)
def test_corrupt_archives_name_the_problem(data_dir, members, archive, monkeypatch, change, match):
    path = write_archive(data_dir, change(members, archive), monkeypatch)
    with pytest.raises(CIFAR100FormatError, match=match) as info:
        load()
    assert str(path) in str(info.value)


def bad_split(key: bytes, value) -> bytes:
    split = make_split(4, np.random.default_rng(0), b"x")
    split[key] = value
    return py2_pickle(split)


@pytest.mark.parametrize(
    "train, match",
    [
        (bad_split(b"fine_labels", [0, 1, 2]), r"\(3,\) labels"),
        (bad_split(b"fine_labels", [0, 1, 2, 100]), "outside 0-99"),
        (bad_split(b"coarse_labels", [0, 1, 2, 20]), "outside 0-19"),
        (bad_split(b"data", np.zeros((4, 3072), np.float32)), "expected a uint8 array"),
        (bad_split(b"data", np.zeros((4, 1024), np.uint8)), r"\[N, 3072\]"),
    ],
)
def test_wrong_contents(data_dir, members, monkeypatch, train, match):
    write_archive(data_dir, build_tar({**members, "train": train}), monkeypatch)
    with pytest.raises(CIFAR100FormatError, match=match):
        load()


# --- downloads ------------------------------------------------------------------------------


def test_download(data_dir, archive, members, tmp_path):
    with serve({"/kriz/cifar-100-python.tar.gz": archive}) as url:
        data = load(data_dir=tmp_path / "fresh", url=url + "kriz/")
    np.testing.assert_array_equal(data.train_y, expected(members, "train")[1])
    assert (tmp_path / "fresh" / "cifar100" / "cifar-100-python.tar.gz").read_bytes() == archive


def test_failed_download(data_dir, archive, tmp_path):
    folder = tmp_path / "fresh" / "cifar100"
    with serve({"/cifar-100-python.tar.gz": truncated(archive)}) as url:
        with pytest.raises(DataNotFoundError) as info:
            load(data_dir=tmp_path / "fresh", url=url)
    assert "cifar-100-python.tar.gz" in str(info.value) and str(folder) in str(info.value)
    assert list(folder.iterdir()) == []
    with pytest.raises(DataNotFoundError, match="download=False"):
        load(data_dir=tmp_path / "fresh", download=False)


# --- the real data set ----------------------------------------------------------------------


@pytest.mark.data
def test_real_cifar100():
    root = os.environ.get("METAJAX_DATA_DIR")
    folder = Path(root or ".") / "cifar100"
    if not root or not (
        (folder / "cifar-100-python.tar.gz").is_file() or (folder / "cifar-100-python").is_dir()
    ):
        pytest.skip(
            "no copy of CIFAR-100 here: shared/data/README.md lists it as not available; put "
            "cifar-100-python.tar.gz in $METAJAX_DATA_DIR/cifar100/ to run this test"
        )
    data = load(data_dir=root, download=False)
    assert data.train_x.shape == (50000, 32, 32, 3) and data.test_x.shape == (10000, 32, 32, 3)
    assert np.bincount(data.train_y, minlength=100).tolist() == [500] * 100
    assert np.bincount(data.test_y, minlength=100).tolist() == [100] * 100
    assert np.bincount(data.train_coarse, minlength=20).tolist() == [2500] * 20
    assert data.fine_names[0] == "apple" and data.coarse_names[0] == "aquatic_mammals"
