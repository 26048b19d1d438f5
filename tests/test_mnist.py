"""MNIST idx parsing, checksums and downloads, on tiny generated idx files."""

from __future__ import annotations

import gzip
import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
from fixtures_omniglot import closed_port_url, serve, status

from metajax.data import mnist
from metajax.data.mnist import MNISTFile, MNISTFormatError, load_mnist, parse_idx
from metajax.data.sources import ChecksumError, DataNotFoundError

N_TRAIN, N_TEST = 30, 12


def idx_bytes(array: np.ndarray, *, magic: int | None = None) -> bytes:
    """``array`` (uint8) as a gzip-compressed idx file; ``magic`` overrides the header."""
    if magic is None:
        magic = 0x0800 | array.ndim
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return gzip.compress(header + array.astype(np.uint8).tobytes(), mtime=0)


def make_arrays(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "train_images": rng.integers(0, 256, (N_TRAIN, 28, 28), dtype=np.uint8),
        "train_labels": (np.arange(N_TRAIN) % 10).astype(np.uint8),
        "test_images": rng.integers(0, 256, (N_TEST, 28, 28), dtype=np.uint8),
        "test_labels": rng.integers(0, 10, N_TEST, dtype=np.uint8),
    }


def spec(key: str, data: bytes, shape: tuple[int, ...]) -> MNISTFile:
    return MNISTFile(mnist.FILES[key].filename, hashlib.sha256(data).hexdigest(), len(data), shape)


@pytest.fixture
def arrays():
    return make_arrays()


@pytest.fixture
def files(arrays, monkeypatch):
    """filename -> idx.gz bytes; :data:`mnist.FILES` patched to name them as the originals."""
    out = {}
    for key, array in arrays.items():
        data = idx_bytes(array)
        monkeypatch.setitem(mnist.FILES, key, spec(key, data, array.shape))
        out[mnist.FILES[key].filename] = data
    return out


@pytest.fixture
def data_dir(tmp_path, monkeypatch, files):
    """An isolated data dir whose mnist/ holds the fixture files; downloads go nowhere."""
    monkeypatch.setenv("METAJAX_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("METAJAX_MNIST_URL", closed_port_url())
    folder = tmp_path / "data" / "mnist"
    folder.mkdir(parents=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    # An empty data directory for the download tests: a data directory must exist (a
    # mistyped one is an error, not created); downloads create the dataset's folder in it.
    (tmp_path / "fresh").mkdir()
    return tmp_path / "data"


def load(**kwargs):
    return load_mnist(progress=False, **kwargs)


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# --- parsing --------------------------------------------------------------------------------


def test_loads_arrays_exactly(data_dir, arrays):
    data = load()
    assert isinstance(data, mnist.MNIST)
    pairs = zip(data, ("train_images", "train_labels", "test_images", "test_labels"), strict=True)
    for got, key in pairs:
        assert got.dtype == np.uint8
        np.testing.assert_array_equal(got, arrays[key])
    assert data.train_x.shape == (N_TRAIN, 28, 28) and data.test_y.shape == (N_TEST,)


def test_parse_idx_without_expected_shape(tmp_path, arrays):
    path = tmp_path / "x.gz"
    path.write_bytes(idx_bytes(arrays["test_images"]))
    np.testing.assert_array_equal(parse_idx(path), arrays["test_images"])


def set_file(data_dir: Path, key: str, data: bytes, monkeypatch, shape=None) -> Path:
    """Replace one fixture file by ``data``, its checksum accepted, so parsing sees it."""
    shape = shape or mnist.FILES[key].shape
    monkeypatch.setitem(mnist.FILES, key, spec(key, data, shape))
    path = data_dir / "mnist" / mnist.FILES[key].filename
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    "key, make, match",
    [
        ("train_images", lambda a: idx_bytes(a, magic=0x0801), "magic number 0x00000801"),
        ("train_labels", lambda a: idx_bytes(a, magic=0x0D01), "magic number 0x00000d01"),
        ("test_images", lambda a: idx_bytes(a)[:-20], "not a complete gzip file"),
        ("test_images", lambda a: gzip.compress(gzip.decompress(idx_bytes(a))[:-5]), "truncated"),
        ("test_labels", lambda a: gzip.compress(b"\0\0\x08"), "too short"),
        ("train_labels", lambda a: gzip.compress(gzip.decompress(idx_bytes(a)) + b"x"), "needs"),
        ("test_images", lambda a: b"plain bytes, not gzip", "not a complete gzip file"),
    ],
)
def test_format_errors_name_the_file(data_dir, arrays, monkeypatch, key, make, match):
    path = set_file(data_dir, key, make(arrays[key]), monkeypatch)
    with pytest.raises(MNISTFormatError, match=match) as info:
        load()
    assert str(path) in str(info.value)


def test_shape_mismatch(data_dir, arrays, monkeypatch):
    monkeypatch.setitem(mnist.FILES, "test_labels", mnist.FILES["test_labels"]._replace(shape=(9,)))
    with pytest.raises(MNISTFormatError, match=r"declares shape \(12,\), expected \(9,\)"):
        load()


def test_labels_out_of_range(data_dir, arrays, monkeypatch):
    labels = arrays["train_labels"].copy()
    labels[3] = 10
    path = set_file(data_dir, "train_labels", idx_bytes(labels), monkeypatch)
    with pytest.raises(MNISTFormatError, match="label 10") as info:
        load()
    assert str(path) in str(info.value)


# --- checksums ------------------------------------------------------------------------------


def test_local_file_with_other_checksum(data_dir, arrays):
    path = data_dir / "mnist" / mnist.FILES["test_labels"].filename
    other = idx_bytes(np.zeros(N_TEST, np.uint8))
    path.write_bytes(other)
    with pytest.raises(ChecksumError) as info:
        load()
    message = str(info.value)
    assert path.name in message and hashlib.sha256(other).hexdigest() in message
    assert mnist.FILES["test_labels"].sha256 in message and "verify=False" in message
    data = load(verify=False)  # read anyway when asked
    np.testing.assert_array_equal(data.test_y, 0)


# --- downloads ------------------------------------------------------------------------------


def test_download_into_empty_data_dir(data_dir, files, arrays, tmp_path):
    routes = {f"/mnist/{name}": data for name, data in files.items()}
    with serve(routes) as url:
        data = load(data_dir=tmp_path / "fresh", url=url + "mnist")  # no trailing slash
    np.testing.assert_array_equal(data.train_x, arrays["train_images"])
    assert listing(tmp_path / "fresh" / "mnist") == sorted(files)  # no temporary files left


def test_download_url_from_environment(data_dir, files, tmp_path, monkeypatch):
    with serve({f"/{name}": data for name, data in files.items()}) as url:
        monkeypatch.setenv("METAJAX_MNIST_URL", url)
        load(data_dir=tmp_path / "fresh")
    assert listing(tmp_path / "fresh" / "mnist") == sorted(files)


def test_only_missing_files_are_downloaded(data_dir, files):
    (data_dir / "mnist" / mnist.FILES["test_labels"].filename).unlink()
    requested = []

    def send(handler):
        requested.append(handler.path)
        body = files[mnist.FILES["test_labels"].filename]
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    with serve({"/t10k-labels-idx1-ubyte.gz": send}) as url:
        load(url=url)
    assert requested == ["/t10k-labels-idx1-ubyte.gz"]


def test_failed_download_names_files_and_leaves_nothing(data_dir, files, tmp_path):
    routes = {f"/{name}": data for name, data in files.items()}
    routes["/t10k-images-idx3-ubyte.gz"] = status(404)
    folder = tmp_path / "fresh" / "mnist"
    with serve(routes) as url:
        with pytest.raises(DataNotFoundError) as info:
            load(data_dir=tmp_path / "fresh", url=url)
    message = str(info.value)
    assert "t10k-images-idx3-ubyte.gz" in message and str(folder) in message
    assert url + "t10k-images-idx3-ubyte.gz" in message and "404" in message
    assert "t10k-images-idx3-ubyte.gz" not in listing(folder)
    assert not [n for n in listing(folder) if n.endswith(".part")]


def test_downloaded_bytes_with_wrong_checksum(data_dir, files, tmp_path):
    routes = {f"/{name}": data for name, data in files.items()}
    routes["/train-labels-idx1-ubyte.gz"] = b"x" * len(routes["/train-labels-idx1-ubyte.gz"])
    with serve(routes) as url:
        with pytest.raises(ChecksumError, match="train-labels-idx1-ubyte.gz"):
            load(data_dir=tmp_path / "fresh", url=url)
    assert "train-labels-idx1-ubyte.gz" not in listing(tmp_path / "fresh" / "mnist")


def test_missing_files_without_download(data_dir, tmp_path):
    folder = tmp_path / "fresh" / "mnist"
    with pytest.raises(DataNotFoundError, match="download=False") as info:
        load(data_dir=tmp_path / "fresh", download=False)
    for name in (spec.filename for spec in mnist.FILES.values()):
        assert name in str(info.value)
    assert str(folder) in str(info.value) and mnist.MNIST_URL not in str(info.value)
    with pytest.raises(DataNotFoundError, match="could not be downloaded"):
        load(data_dir=tmp_path / "fresh")  # the URL is a closed local port
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    try:
        with pytest.raises(DataNotFoundError, match="read-only"):
            load(data_dir=locked)
    finally:
        locked.chmod(0o755)


# --- the real data set ----------------------------------------------------------------------

TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@pytest.mark.data
def test_real_mnist():
    root = os.environ.get("METAJAX_DATA_DIR")
    if not root:
        pytest.skip("METAJAX_DATA_DIR is not set (e.g. METAJAX_DATA_DIR=../shared/data)")
    folder = Path(root) / "mnist"
    if not all((folder / s.filename).is_file() for s in mnist.FILES.values()):
        pytest.skip(f"{folder} lacks the four MNIST idx .gz files")
    data = load(data_dir=root, download=False)
    assert data.train_x.shape == (60000, 28, 28) and data.test_x.shape == (10000, 28, 28)
    assert data.train_x.dtype == np.uint8 and data.train_y.dtype == np.uint8
    assert np.bincount(data.train_y, minlength=10).tolist() == TRAIN_COUNTS
    assert np.bincount(data.test_y, minlength=10).tolist() == TEST_COUNTS
    assert data.train_x.min() == 0 and data.train_x.max() == 255
    assert 30 < data.train_x.mean() < 36  # the well-known mean intensity, 33.3
