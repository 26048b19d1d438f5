"""Every expected failure of a data loader is one ValueError or FileNotFoundError naming the file.

Property tests (hypothesis) feed each entry point that reads a file random bytes, truncations
and byte flips of a small valid file, and check that the only outcomes are the documented
error (a :class:`~metajax.data.sources.DataFormatError`, so a ``ValueError``, whose message
names the file) or, for flips that happen to keep the file valid, a normal result. Crafted
files (pickles calling ``os.system``, memo and allocation bombs, npz headers declaring huge
arrays, zip and tar members with ``..`` names, directory members or huge declared sizes)
must be refused the same way, quickly, and without running anything. Finally a data
directory the user named must exist: it is reported, not created.
"""

from __future__ import annotations

import gzip
import io
import os
import pickle
import tarfile
import time
import tracemalloc
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from fixtures_omniglot import LAYOUT, build_zip, closed_port_url, png_bytes, serve, spec_for
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from metajax.data import cifar100, mnist, omniglot
from metajax.data import miniimagenet as mi
from metajax.data.sources import (
    DataDirNotFoundError,
    DataFormatError,
    DataNotFoundError,
    ForbiddenPickleError,
    PickleFormatError,
    atomic_save_npz,
    read_npz,
    restricted_pickle_load,
)

ERRORS = (ValueError, FileNotFoundError)
FEW = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
FEWER = settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


def truncations(valid: bytes) -> st.SearchStrategy[bytes]:
    """Strict prefixes of ``valid`` (the empty file included)."""
    return st.integers(0, len(valid) - 1).map(lambda n: valid[:n])


def flips(valid: bytes) -> st.SearchStrategy[bytes]:
    """``valid`` with one to eight bytes replaced."""

    def apply(changes: list[tuple[int, int]]) -> bytes:
        out = bytearray(valid)
        for position, value in changes:
            out[position] = value
        return bytes(out)

    change = st.tuples(st.integers(0, len(valid) - 1), st.integers(0, 255))
    return st.lists(change, min_size=1, max_size=8).map(apply)


def assert_names(error: BaseException, *parts: object) -> None:
    """The documented kind of error, and a message naming every one of ``parts``."""
    assert isinstance(error, ERRORS), repr(error)
    message = str(error)
    for part in parts:
        assert str(part) in message, (part, message)


def expect_format_error(call, *parts: object) -> DataFormatError:
    """``call()`` raises a DataFormatError (a ValueError) whose message names ``parts``."""
    with pytest.raises(DataFormatError) as info:
        call()
    assert_names(info.value, *parts)
    return info.value


def loads_or_names(call, *parts: object) -> object:
    """``call()`` either returns or raises a DataFormatError naming ``parts``; its result."""
    try:
        return call()
    except DataFormatError as e:
        assert_names(e, *parts)
        return None


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("loader_errors")


@pytest.fixture(scope="module")
def isolated(workdir):
    """No test here reads or writes the user's data or cache folders, or the network."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(workdir / "xdg"))
        mp.delenv("METAJAX_DATA_DIR", raising=False)
        mp.delenv("METAJAX_CACHE_DIR", raising=False)
        for env in (mnist.URL_ENV, cifar100.URL_ENV, omniglot.URL_ENV):
            mp.setenv(env, closed_port_url())
        yield mp


# --- restricted_pickle_load ------------------------------------------------------------------

GOOD_PICKLE = pickle.dumps(
    {"a": np.arange(12, dtype=np.int16).reshape(3, 4), "b": [1, 2.5, "s"], "c": np.float32(2)},
    protocol=2,
)


def unpickle_file(path: Path, data: bytes) -> object:
    path.write_bytes(data)
    with open(path, "rb") as f:
        return restricted_pickle_load(f)


@FEW
@given(data=st.binary(max_size=512))
def test_restricted_pickle_load_random_bytes(workdir, data):
    path = workdir / "random.pkl"
    loads_or_names(lambda: unpickle_file(path, data), path)


@FEW
@given(data=truncations(GOOD_PICKLE))
def test_restricted_pickle_load_truncated(workdir, data):
    path = workdir / "truncated.pkl"
    error = expect_format_error(lambda: unpickle_file(path, data), path)
    # Both a ValueError and what pickle callers already catch.
    assert isinstance(error, PickleFormatError | ForbiddenPickleError)
    assert isinstance(error, pickle.UnpicklingError)


@FEW
@given(data=flips(GOOD_PICKLE))
def test_restricted_pickle_load_flipped_bytes(workdir, data):
    path = workdir / "flipped.pkl"
    loads_or_names(lambda: unpickle_file(path, data), path)


def test_restricted_pickle_load_names_the_file_it_is_given():
    with pytest.raises(PickleFormatError, match="^archive.tar: member x: not a readable"):
        restricted_pickle_load(io.BytesIO(GOOD_PICKLE[:-1]), "archive.tar: member x")
    with pytest.raises(PickleFormatError, match="^pickle: "):  # no name, no file name
        restricted_pickle_load(io.BytesIO(b""))


class _System:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("protocol", [0, 2, 5])
def test_os_system_pickle_is_refused_and_not_run(tmp_path, protocol):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    error = expect_format_error(
        lambda: unpickle_file(path, pickle.dumps([1, _System(marker)], protocol=protocol)),
        path,
        "system",
    )
    assert isinstance(error, ForbiddenPickleError) and isinstance(error, pickle.UnpicklingError)
    assert not marker.exists()


@pytest.mark.parametrize(
    "raw, match",
    [
        # numpy.ndarray((10**12,)) called directly: an 8 TB allocation.
        (
            b"\x80\x02cnumpy\nndarray\n\x8a\x06\x00\x10\xa5\xd4\xe8\x00\x85R.",
            "ndarray called directly",
        ),
        (b"cnumpy\nndarray\n(I1000000000000\ntR.", "ndarray called directly"),
        # _reconstruct(ndarray, (10**12,), "b"): numpy itself always writes (0,).
        (
            b"cnumpy._core.multiarray\n_reconstruct\n(cnumpy\nndarray\n(I1000000000000\ntVb\ntR.",
            "shape other than",
        ),
        # NEWOBJ on the ndarray marker, and bytes(n) for a huge n.
        (b"\x80\x02cnumpy\nndarray\n)\x81.", "not a readable pickle"),
        (b"c__builtin__\nbytes\n(I1000000000000\ntR.", "only bytes"),
    ],
)
def test_allocation_requests_are_refused(tmp_path, raw, match):
    path = tmp_path / "alloc.pkl"
    tracemalloc.start()
    try:
        with pytest.raises(DataFormatError, match=match):
            unpickle_file(path, raw)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 50 << 20


def test_memo_index_bomb_takes_no_memory(tmp_path):
    # BINPUT with index 2**26: the C unpickler allocates and zero-fills a 1 GiB memo table.
    raw = b"\x80\x02N" + b"r" + (1 << 26).to_bytes(4, "little") + b"."
    tracemalloc.start()
    try:
        start = time.perf_counter()
        assert unpickle_file(tmp_path / "memo.pkl", raw) is None
        elapsed = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 50 << 20 and elapsed < 1.0


def test_huge_declared_bytes_are_a_format_error(tmp_path):
    path = tmp_path / "huge.pkl"
    raw = b"\x80\x04\x8e" + (1 << 40).to_bytes(8, "little") + b"abc"  # BINBYTES8 of 1 TiB
    expect_format_error(lambda: unpickle_file(path, raw), path, "not a readable pickle")


# --- mini-ImageNet pickle split ------------------------------------------------------------

MI_GOOD = pickle.dumps(
    {
        "image_data": np.arange(2 * 84 * 84 * 3, dtype=np.uint8).reshape(2, 84, 84, 3),
        "class_dict": {"n02000001": [0], "n02000002": [1]},
    },
    protocol=4,
)


def load_mi_pickle(root: Path, data: bytes):
    path = root / "miniimagenet" / mi.PICKLE_NAME.format(split="test")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return mi.load_miniimagenet(root, source="pickle", splits=("test",), expect_counts=False)


def test_miniimagenet_fixture_is_valid(workdir):
    images, wnids = load_mi_pickle(workdir / "mi-valid", MI_GOOD)
    assert images["test"].shape == (2, 1, 84, 84, 3) and wnids["test"] == ("n02000001", "n02000002")


@FEW
@given(data=st.binary(max_size=1024))
def test_miniimagenet_pickle_random_bytes(workdir, data):
    root = workdir / "mi-random"
    expect_format_error(lambda: load_mi_pickle(root, data), "mini-imagenet-cache-test.pkl")


@FEW
@given(data=truncations(MI_GOOD))
def test_miniimagenet_pickle_truncated(workdir, data):
    root = workdir / "mi-truncated"
    error = expect_format_error(lambda: load_mi_pickle(root, data), "mini-imagenet-cache-test.pkl")
    assert isinstance(error, pickle.UnpicklingError)  # existing callers still catch it


@FEW
@given(data=flips(MI_GOOD[:400] + MI_GOOD[-200:]))  # header and class_dict; pixels are free
def test_miniimagenet_pickle_flipped_bytes(workdir, data):
    root = workdir / "mi-flipped"
    loads_or_names(lambda: load_mi_pickle(root, data), "mini-imagenet-cache-test.pkl")


def _with_placeholder(value_opcodes: bytes) -> bytes:
    """A mini-ImageNet cache pickle whose class_dict value is the given pickle opcodes."""
    obj = {"image_data": np.zeros((1, 84, 84, 3), np.uint8), "class_dict": {"n1": "PLACEHOLDER"}}
    raw = pickle.dumps(obj, protocol=2)
    placeholder = b"X\x0b\x00\x00\x00PLACEHOLDER"
    assert raw.count(placeholder) == 1
    return raw.replace(placeholder, value_opcodes)


@pytest.mark.parametrize(
    "opcodes, match",
    [
        (b"]" * 100_000 + b"a" * 99_999, "nested more than"),  # a list 100,000 deep
        (b"](\x8a\x0d" + b"\xff" * 12 + b"\x7fe", "list of ints"),  # an int of 2**103
        (b"\x8f(K\x01\x90", "type set"),  # protocol 4's set, built without any global
        (b"N", "type NoneType"),
    ],
)
def test_miniimagenet_crafted_structures(tmp_path, opcodes, match):
    start = time.perf_counter()
    with pytest.raises(mi.MiniImageNetFormatError, match=match) as info:
        load_mi_pickle(tmp_path, _with_placeholder(opcodes))
    assert_names(info.value, "mini-imagenet-cache-test.pkl")
    assert time.perf_counter() - start < 10


def test_miniimagenet_os_system_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "pwned"
    obj = {"image_data": np.zeros((1, 84, 84, 3), np.uint8), "class_dict": {"n1": _System(marker)}}
    with pytest.raises(ForbiddenPickleError) as info:
        load_mi_pickle(tmp_path, pickle.dumps(obj, protocol=4))
    assert_names(info.value, "mini-imagenet-cache-test.pkl", f"{os.system.__module__}.system")
    assert not marker.exists()


def test_miniimagenet_bad_csv_names_the_file(tmp_path):
    root = tmp_path / "miniimagenet"
    (root / "images").mkdir(parents=True)
    for split in mi.SPLITS:
        (root / f"{split}.csv").write_bytes(b"filename,label\nx.jpg,n1\n")
    def load():
        return mi.load_miniimagenet(tmp_path, source="folder", splits=("val",))

    (root / "val.csv").write_bytes(b"\xff\xfe\x00not utf-8")
    assert "UTF-8" in str(expect_format_error(load, root / "val.csv"))
    (root / "val.csv").write_bytes(b'filename,label\n"' + b"x" * 200_000 + b'",n1\n')
    assert "field larger" in str(expect_format_error(load, root / "val.csv"))


# --- .npz caches: read_npz and the loaders that use it -------------------------------------


def _npz_bytes(**arrays) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


NPZ_GOOD = _npz_bytes(
    images=np.arange(2 * 20 * 4 * 4, dtype=np.uint8).reshape(2, 20, 4, 4),
    alphabet=np.array(["A", "B"]),
    fortran=np.asfortranarray(np.arange(6.0).reshape(2, 3)),
)
NPZ_NAMES = ("images", "alphabet", "fortran")


def read_npz_bytes(path: Path, data: bytes):
    path.write_bytes(data)
    return read_npz(path, NPZ_NAMES)


def test_read_npz_reads_what_np_savez_wrote(tmp_path):
    path = atomic_save_npz(tmp_path / "c.npz", x=np.arange(5), s=np.array("abc"))
    out = read_npz(path, ("x", "s"))
    np.testing.assert_array_equal(out["x"], np.arange(5))
    assert str(out["s"]) == "abc"
    out = read_npz_bytes(tmp_path / "g.npz", NPZ_GOOD)
    np.testing.assert_array_equal(out["fortran"], np.arange(6.0).reshape(2, 3))
    assert out["images"].flags.writeable and out["alphabet"].tolist() == ["A", "B"]


@FEW
@given(data=st.binary(max_size=1024))
def test_read_npz_random_bytes(workdir, data):
    path = workdir / "random.npz"
    expect_format_error(lambda: read_npz_bytes(path, data), path)


@FEW
@given(data=truncations(NPZ_GOOD))
def test_read_npz_truncated(workdir, data):
    path = workdir / "truncated.npz"
    expect_format_error(lambda: read_npz_bytes(path, data), path)


@FEW
@given(data=flips(NPZ_GOOD))
def test_read_npz_flipped_bytes(workdir, data):
    path = workdir / "flipped.npz"
    loads_or_names(lambda: read_npz_bytes(path, data), path)


def _npz_with_member(name: str, payload: bytes, compress: int = zipfile.ZIP_STORED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compress) as archive:
        archive.writestr(name, payload)
    return buffer.getvalue()


def _npy(shape: tuple[int, ...], data: bytes, descr: str = "|u1") -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buffer, {"descr": descr, "fortran_order": False, "shape": shape}
    )
    return buffer.getvalue() + data


@pytest.mark.parametrize(
    "data, match",
    [
        (_npz_bytes(images=np.array([1, "a", None], dtype=object)), "Python objects"),
        (_npz_with_member("images.npy", _npy((10**12,), b"\0" * 8)), "header declares"),
        (_npz_with_member("images.npy", _npy((2, 3), b"\0" * 7, "<f8")), "header declares"),
        (_npz_with_member("images.npy", _npy((4,), b"\0" * 4), zipfile.ZIP_DEFLATED), "compressed"),
        (_npz_with_member("images.npy/", b""), "images.npy: missing"),  # a directory
        (_npz_with_member("other.npy", _npy((4,), b"\0" * 4)), "images.npy: missing"),
        (_npz_with_member("images.npy", b"\x93NUMPY\x01\x00\xff\xff{'descr'"), "unreadable"),
        (_npz_with_member("images.npy", _npy((4,), b"\0" * 4, "O")), "Python objects"),
    ],
    ids=["object", "huge-shape", "short-data", "deflated", "directory", "missing", "header",
         "object-descr"],
)
def test_read_npz_crafted(tmp_path, data, match):
    path = tmp_path / "crafted.npz"
    path.write_bytes(data)
    tracemalloc.start()
    try:
        error = expect_format_error(lambda: read_npz(path, ("images",)), path, "images.npy")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert match in str(error) and peak < 50 << 20


def test_read_npz_huge_declared_member_size(tmp_path):
    data = bytearray(_npz_with_member("images.npy", _npy((4,), b"\0" * 4)))
    # Patch the central directory's sizes (compressed and uncompressed) to 2**31.
    directory = data.rindex(b"PK\x01\x02")
    data[directory + 20 : directory + 28] = (1 << 31).to_bytes(4, "little") * 2
    path = tmp_path / "big.npz"
    path.write_bytes(bytes(data))
    expect_format_error(lambda: read_npz(path, ("images",)), path, "images.npy")


# --- Omniglot: archives and caches ----------------------------------------------------------

OMNI_ZIP, OMNI_PNGS = build_zip("evaluation", LAYOUT["evaluation"], seed=3)
OMNI_SPEC = spec_for("evaluation", OMNI_ZIP, LAYOUT["evaluation"])


@pytest.fixture(scope="module")
def omni(workdir, isolated):
    """(data dir, cache dir, the images from the valid archive)."""
    isolated.setitem(omniglot.FILES, "evaluation", OMNI_SPEC)
    root = workdir / "omni"
    (root / "omniglot").mkdir(parents=True)
    (root / "omniglot" / OMNI_SPEC.filename).write_bytes(OMNI_ZIP)
    cache = workdir / "omni-cache"
    good = load_omni(root, cache).images
    return root, cache, good


def load_omni(root: Path, cache: Path, data: bytes | None = None, **kwargs):
    if data is not None:
        (root / "omniglot" / OMNI_SPEC.filename).write_bytes(data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", omniglot.ModifiedArchiveWarning)
        return omniglot.load_omniglot(
            root, subsets="evaluation", progress=False, download=False, cache_dir=cache, **kwargs
        )


@FEW
@given(data=st.binary(max_size=1024))
def test_omniglot_zip_random_bytes(omni, data):
    root, cache, _ = omni
    expect_format_error(lambda: load_omni(root, cache, data), OMNI_SPEC.filename)


@FEW
@given(data=truncations(OMNI_ZIP))
def test_omniglot_zip_truncated(omni, data):
    root, cache, _ = omni
    expect_format_error(lambda: load_omni(root, cache, data), OMNI_SPEC.filename)


@FEWER
@given(data=flips(OMNI_ZIP))
def test_omniglot_zip_flipped_bytes(omni, data, tmp_path_factory):
    root, _, good = omni
    cache = tmp_path_factory.mktemp("omni-flip-cache")  # a valid result is cached: keep apart
    out = loads_or_names(lambda: load_omni(root, cache, data), OMNI_SPEC.filename)
    assert out is None or out.images.shape == good.shape


def _omni_zip(members: dict[str, bytes], **infos) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(zipfile.ZipInfo(name, **infos.get(name, {})), data)
    return buffer.getvalue()


def _big_png(side: int) -> bytes:
    """A PNG whose header declares ``side`` x ``side`` pixels (its data is 105x105's)."""
    png = bytearray(png_bytes(Image.new("1", (105, 105), 1)))
    png[16:24] = side.to_bytes(4, "big") * 2  # IHDR width and height
    png[29:33] = zlib.crc32(bytes(png[12:29])).to_bytes(4, "big")  # and the chunk's CRC
    return bytes(png)


def _crafted_omniglot(kind: str) -> bytes:
    members = dict(OMNI_PNGS)
    first = next(iter(members))
    if kind == "traversal":
        members["images_evaluation/../Delta/0001_01.png"] = members.pop(first)
    elif kind == "backslash":
        members["images_evaluation/Delta\\..\\x/character01/0001_01.png"] = members.pop(first)
    elif kind == "directory":
        members[first + "/"] = b""  # a directory entry named like an image ...
        del members[first]  # ... in place of the image: 19 drawings left
    elif kind == "bomb":
        members[first] = b"\0" * (omniglot.MAX_MEMBER_BYTES + 1)  # deflates to ~1 KB
    elif kind == "big-png":
        members[first] = _big_png(5000)  # 25 M pixels: decoded, it would take 25 MB
    elif kind == "huge-png":
        members[first] = _big_png(100_000)  # beyond PIL's decompression bomb limit
    elif kind == "not-png":
        members[first] = b"GIF89a not a png"
    return _omni_zip(members)


@pytest.mark.parametrize(
    "kind, match",
    [
        ("traversal", "unexpected member"),
        ("backslash", "unexpected member"),
        ("directory", "has 19 images"),
        ("bomb", "declares"),
        ("big-png", "5000x5000"),
        ("huge-png", "cannot be read"),
        ("not-png", "cannot be read"),
    ],
)
def test_omniglot_crafted_archives(omni, tmp_path, kind, match):
    root, cache, _ = omni
    tracemalloc.start()
    try:
        error = expect_format_error(
            lambda: load_omni(root, tmp_path, _crafted_omniglot(kind)), OMNI_SPEC.filename
        )
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert match in str(error) and peak < 20 << 20
    assert list(tmp_path.iterdir()) == []  # nothing cached


def test_omniglot_encrypted_member_is_a_format_error(omni, tmp_path):
    root, _, _ = omni
    data = bytearray(_omni_zip(dict(OMNI_PNGS)))
    # Set the "encrypted" flag bit of the first member, in its local and central headers.
    data[6] |= 1
    central = data.index(b"PK\x01\x02")
    data[central + 8] |= 1
    error = expect_format_error(lambda: load_omni(root, tmp_path, bytes(data)), OMNI_SPEC.filename)
    assert "cannot be read" in str(error)


def _cache_path(cache: Path) -> Path:
    (path,) = [p for p in cache.iterdir() if p.suffix == ".npz"]
    return path


@FEWER
@given(data=st.one_of(st.binary(max_size=512), truncations(NPZ_GOOD)))
def test_omniglot_unreadable_cache_is_rebuilt_with_a_warning(omni, data):
    root, cache, good = omni
    (root / "omniglot" / OMNI_SPEC.filename).write_bytes(OMNI_ZIP)
    path = _cache_path(cache)
    path.write_bytes(data)
    with pytest.warns(UserWarning, match=f"ignoring .*cache {path}"):
        out = load_omni(root, cache)
    np.testing.assert_array_equal(out.images, good)


@pytest.mark.parametrize(
    "arrays",
    [
        {"images": np.zeros((4, 20, 28, 28), np.float32)},  # wrong dtype
        {"images": np.zeros((4, 20, 27, 28), np.uint8)},  # wrong shape
        {"images": np.zeros((), np.uint8)},  # 0-d
        {"alphabet": np.zeros(4, np.int64)},  # not names
        {"sha256": np.array("0" * 64)},  # another source's
        {"images": np.array([1, "a"], dtype=object)},  # a pickle
    ],
    ids=["dtype", "shape", "0-d", "names", "sha", "object"],
)
def test_omniglot_mismatching_cache_is_rebuilt_with_a_warning(omni, arrays):
    root, cache, good = omni
    (root / "omniglot" / OMNI_SPEC.filename).write_bytes(OMNI_ZIP)
    path = _cache_path(cache)
    fields = read_npz(path, ("images", "alphabet", "character", "sha256"))
    path.write_bytes(_npz_bytes(**{**fields, **arrays}))
    with pytest.warns(UserWarning, match=f"ignoring .*cache {path}"):
        out = load_omni(root, cache)
    np.testing.assert_array_equal(out.images, good)


def test_miniimagenet_crafted_cache_is_rebuilt_with_a_warning(tmp_path):
    root = tmp_path / "miniimagenet"
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, wnid in zip(mi.SPLITS, ("n1", "n2", "n3"), strict=True):
        name = f"{wnid}_0.png"
        Image.fromarray(rng.integers(0, 256, (84, 84, 3), dtype=np.uint8)).save(
            root / "images" / name
        )
        (root / f"{split}.csv").write_text(f"filename,label\n{name},{wnid}\n")
    load = lambda: mi.load_miniimagenet(tmp_path, source="folder", expect_counts=False)  # noqa: E731
    first, _ = load()
    for path in (root / "cache").iterdir():
        path.write_bytes(_npz_with_member("images.npy", _npy((10**12,), b"\0" * 8)))
    with pytest.warns(UserWarning, match="unreadable cache"):
        again, _ = load()
    for split in mi.SPLITS:
        np.testing.assert_array_equal(again[split], first[split])


# --- CIFAR-100: the tar.gz and the extracted folder -----------------------------------------


def _cifar_members() -> dict[str, bytes]:
    rng = np.random.default_rng(0)

    def split(n: int) -> dict:
        fine = rng.integers(0, 100, n)
        return {
            "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            "fine_labels": [int(v) for v in fine],
            "coarse_labels": [int(v) // 5 for v in fine],
        }

    meta = {
        "fine_label_names": [f"c{i}" for i in range(100)],
        "coarse_label_names": [f"s{i}" for i in range(20)],
    }
    return {
        "train": pickle.dumps(split(3), protocol=2),
        "test": pickle.dumps(split(2), protocol=2),
        "meta": pickle.dumps(meta, protocol=2),
    }


CIFAR_MEMBERS = _cifar_members()


def _cifar_tar(members: dict[str, bytes], kinds: dict[str, bytes] | None = None) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name if "/" in name else f"{cifar100.TOP}/{name}")
            info.size = len(data)
            if kinds and name in kinds:
                info.type = kinds[name]
                info.size = 0
            tar.addfile(info, io.BytesIO(data) if info.size else None)
    return buffer.getvalue()


CIFAR_TAR = _cifar_tar(CIFAR_MEMBERS)


def load_cifar(root: Path, data: bytes):
    path = root / "cifar100" / cifar100.ARCHIVE.filename
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return cifar100.load_cifar100(root, download=False, verify=False, progress=False)


def test_cifar_fixture_is_valid(workdir):
    data = load_cifar(workdir / "cifar-valid", CIFAR_TAR)
    assert data.train_x.shape == (3, 32, 32, 3) and len(data.fine_names) == 100


@FEW
@given(data=st.binary(max_size=1024))
def test_cifar_archive_random_bytes(workdir, data):
    root = workdir / "cifar-random"
    expect_format_error(lambda: load_cifar(root, data), cifar100.ARCHIVE.filename)


@FEW
@given(data=truncations(CIFAR_TAR))
def test_cifar_archive_truncated(workdir, data):
    root = workdir / "cifar-truncated"
    expect_format_error(lambda: load_cifar(root, data), cifar100.ARCHIVE.filename)


@FEW
@given(data=flips(CIFAR_TAR))
def test_cifar_archive_flipped_bytes(workdir, data):
    root = workdir / "cifar-flipped"
    loads_or_names(lambda: load_cifar(root, data), cifar100.ARCHIVE.filename)


@FEW
@given(member=st.sampled_from(sorted(CIFAR_MEMBERS)), data=st.binary(max_size=512))
def test_cifar_member_random_bytes(workdir, member, data):
    root = workdir / "cifar-member"
    error = expect_format_error(
        lambda: load_cifar(root, _cifar_tar({**CIFAR_MEMBERS, member: data})),
        cifar100.ARCHIVE.filename,
    )
    # A member's pickle error names the member too (other errors: the archive suffices).
    if "pickle" in str(error):
        assert f"member {cifar100.TOP}/{member}" in str(error)


@FEW
@given(member=st.sampled_from(sorted(CIFAR_MEMBERS)), data=st.binary(max_size=512))
def test_cifar_extracted_folder_random_bytes(workdir, member, data):
    root = workdir / "cifar-folder"
    folder = root / "cifar100" / cifar100.TOP
    folder.mkdir(parents=True, exist_ok=True)
    for name, raw in {**CIFAR_MEMBERS, member: data}.items():
        (folder / name).write_bytes(raw)
    expect_format_error(
        lambda: cifar100.load_cifar100(root, download=False, verify=False), folder / member
    )


def _cifar_meta(**fields) -> dict[str, bytes]:
    meta = pickle.loads(CIFAR_MEMBERS["meta"])
    return {**CIFAR_MEMBERS, "meta": pickle.dumps({**meta, **fields}, protocol=2)}


@pytest.mark.parametrize(
    "kind, match",
    [
        ("directory", "is not a file"),
        ("symlink", "is not a file"),
        ("traversal", "members ['cifar-100-python/train'] are missing"),
        ("declared-size", "declares 4294967296 bytes"),
        ("names-not-list", "expected a list of str"),
        ("key-not-str", "dict key of type tuple"),
        ("labels-deep", "not a list of ints"),
        ("labels-dict", "expected a list of ints"),
    ],
)
def test_cifar_crafted_archives(tmp_path, kind, match):
    marker = tmp_path / "escaped"
    if kind in ("directory", "symlink"):
        kinds = {"train": tarfile.DIRTYPE if kind == "directory" else tarfile.SYMTYPE}
        data = _cifar_tar(CIFAR_MEMBERS, kinds)
    elif kind == "traversal":
        members = dict(CIFAR_MEMBERS)
        members[f"{cifar100.TOP}/../../{marker.name}"] = members.pop("train")
        data = _cifar_tar(members)
    elif kind == "declared-size":
        raw = bytearray(gzip.decompress(CIFAR_TAR))
        assert raw[:24].rstrip(b"\0") == f"{cifar100.TOP}/train".encode()  # the first header
        raw[124:136] = b"%011o\0" % (4 << 30)  # train declares 4 GiB
        raw[148:156] = b" " * 8
        raw[148:156] = b"%06o\0 " % sum(raw[:512])  # the header's checksum
        data = gzip.compress(bytes(raw))
    elif kind == "names-not-list":
        data = _cifar_tar(_cifar_meta(fine_label_names=5))
    elif kind == "key-not-str":
        meta = pickle.loads(CIFAR_MEMBERS["meta"])
        data = _cifar_tar({**CIFAR_MEMBERS, "meta": pickle.dumps({**meta, (1, 2): 3})})
    else:
        train = pickle.loads(CIFAR_MEMBERS["train"])
        deep: list = [0]
        for _ in range(100):  # deeper than numpy's 64 dimensions
            deep = [deep]
        train["fine_labels"] = deep if kind == "labels-deep" else {"a": 1}
        members = {**CIFAR_MEMBERS, "train": pickle.dumps(train, protocol=2)}
        data = _cifar_tar(members)
    error = expect_format_error(lambda: load_cifar(tmp_path, data), cifar100.ARCHIVE.filename)
    assert match in str(error)
    assert not marker.exists() and not (tmp_path.parent / marker.name).exists()


def test_cifar_decompression_bomb_stops_at_the_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(cifar100, "MAX_TAR_BYTES", 1 << 20)
    # A member that is not read, but must be decompressed to get past it.
    bomb = _cifar_tar({"junk": b"\0" * (4 << 20), **CIFAR_MEMBERS})
    assert len(bomb) < 100_000
    error = expect_format_error(lambda: load_cifar(tmp_path, bomb), cifar100.ARCHIVE.filename)
    assert "decompresses to more than" in str(error)
    big = _cifar_tar({**CIFAR_MEMBERS, "train": b"\0" * (2 << 20)})  # a wanted member
    error = expect_format_error(lambda: load_cifar(tmp_path, big), cifar100.ARCHIVE.filename)
    assert f"member {cifar100.TOP}/train declares" in str(error)


def test_cifar_archive_cut_after_the_last_member(tmp_path):
    # Without its gzip trailer (CRC and length) every member is there, but the file is cut.
    error = expect_format_error(
        lambda: load_cifar(tmp_path, CIFAR_TAR[:-8]), cifar100.ARCHIVE.filename
    )
    assert "truncated or corrupt" in str(error)


def test_cifar_os_system_member_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "pwned"
    evil = pickle.dumps({"data": _System(marker)}, protocol=2)
    with pytest.raises(ForbiddenPickleError) as info:
        load_cifar(tmp_path, _cifar_tar({**CIFAR_MEMBERS, "train": evil}))
    assert_names(info.value, cifar100.ARCHIVE.filename, f"member {cifar100.TOP}/train", "system")
    assert not marker.exists()


# --- MNIST idx files ------------------------------------------------------------------------

IDX_ARRAY = np.arange(3 * 28 * 28, dtype=np.uint32).astype(np.uint8).reshape(3, 28, 28)
IDX_GOOD = gzip.compress(
    (0x0803).to_bytes(4, "big")
    + b"".join(d.to_bytes(4, "big") for d in IDX_ARRAY.shape)
    + IDX_ARRAY.tobytes(),
    mtime=0,
)


def parse_bytes(path: Path, data: bytes, shape=IDX_ARRAY.shape):
    path.write_bytes(data)
    return mnist.parse_idx(path, shape)


def test_idx_fixture_is_valid(tmp_path):
    np.testing.assert_array_equal(parse_bytes(tmp_path / "ok.gz", IDX_GOOD), IDX_ARRAY)
    np.testing.assert_array_equal(parse_bytes(tmp_path / "ok.gz", IDX_GOOD, None), IDX_ARRAY)


@FEW
@given(data=st.binary(max_size=1024), expect_shape=st.booleans())
def test_idx_random_bytes(workdir, data, expect_shape):
    path = workdir / "random-idx1-ubyte.gz"
    shape = IDX_ARRAY.shape if expect_shape else None
    expect_format_error(lambda: parse_bytes(path, data, shape), path)


@FEW
@given(data=truncations(IDX_GOOD), expect_shape=st.booleans())
def test_idx_truncated(workdir, data, expect_shape):
    path = workdir / "truncated-idx3-ubyte.gz"
    shape = IDX_ARRAY.shape if expect_shape else None
    expect_format_error(lambda: parse_bytes(path, data, shape), path)


@FEW
@given(data=flips(IDX_GOOD))
def test_idx_flipped_bytes(workdir, data):
    path = workdir / "flipped-idx3-ubyte.gz"
    loads_or_names(lambda: parse_bytes(path, data), path)


@FEW
@given(
    payload=st.binary(max_size=64),
    ndim=st.integers(0, 4),
    dims=st.lists(st.integers(0, 2**32 - 1), min_size=4, max_size=4),
)
def test_idx_any_header_inside_valid_gzip(workdir, payload, ndim, dims):
    path = workdir / "header-idx-ubyte.gz"
    header = bytes([0, 0, 8, ndim]) + b"".join(d.to_bytes(4, "big") for d in dims[:ndim])
    data = gzip.compress(header + payload)
    out = loads_or_names(lambda: parse_bytes(path, data, None), path)
    assert out is None or out.size == len(payload)


def test_idx_gzip_bomb_is_not_decompressed(tmp_path):
    path = tmp_path / "bomb-idx1-ubyte.gz"
    header = (0x0801).to_bytes(4, "big") + (10).to_bytes(4, "big")
    path.write_bytes(gzip.compress(header + b"\0" * (64 << 20), compresslevel=1))
    tracemalloc.start()
    try:
        error = expect_format_error(lambda: mnist.parse_idx(path, (10,)), path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "needs 10" in str(error) and peak < 50 << 20


def test_idx_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.gz"):
        mnist.parse_idx(tmp_path / "nothing.gz")


def test_load_mnist_with_a_random_file_names_it(tmp_path):
    folder = tmp_path / "mnist"
    folder.mkdir()
    for spec in mnist.FILES.values():
        (folder / spec.filename).write_bytes(b"random bytes, not gzip")
    with pytest.raises(mnist.MNISTFormatError) as info:
        mnist.load_mnist(tmp_path, download=False, verify=False, progress=False)
    assert_names(info.value, folder / mnist.FILES["train_images"].filename)


# --- the data directory ---------------------------------------------------------------------


def _loaders():
    return {
        "mnist": lambda d, **kw: mnist.load_mnist(d, progress=False, **kw),
        "cifar100": lambda d, **kw: cifar100.load_cifar100(d, progress=False, **kw),
        "omniglot": lambda d, **kw: omniglot.load_omniglot(d, progress=False, **kw),
        "miniimagenet": lambda d, **kw: mi.load_miniimagenet(d),
    }


@pytest.mark.parametrize("dataset", sorted(_loaders()))
def test_missing_data_dir_is_an_error_not_created(tmp_path, isolated, dataset):
    missing = tmp_path / "mistyped" / "data"
    with pytest.raises(DataDirNotFoundError) as info:
        _loaders()[dataset](missing)
    assert_names(info.value, missing, "does not exist", "create it first")
    assert isinstance(info.value, DataNotFoundError)  # callers catching that still do
    assert not (tmp_path / "mistyped").exists()


@pytest.mark.parametrize("dataset", sorted(_loaders()))
def test_missing_data_dir_from_environment(tmp_path, isolated, monkeypatch, dataset):
    missing = tmp_path / "nope"
    monkeypatch.setenv("METAJAX_DATA_DIR", str(missing))
    with pytest.raises(DataDirNotFoundError) as info:
        _loaders()[dataset](None)
    assert_names(info.value, missing, "$METAJAX_DATA_DIR")
    assert not missing.exists()


def test_data_dir_that_is_a_file(tmp_path, isolated):
    path = tmp_path / "a-file"
    path.write_text("x")
    with pytest.raises(DataDirNotFoundError, match="is not a directory") as info:
        mnist.load_mnist(path, progress=False)
    assert_names(info.value, path)


def _mnist_routes() -> dict[str, bytes]:
    routes = {}
    for key, spec in mnist.FILES.items():
        array = np.zeros((2, *spec.shape[1:]), np.uint8)
        header = (0x0800 | array.ndim).to_bytes(4, "big")
        header += b"".join(d.to_bytes(4, "big") for d in array.shape)
        routes[key] = gzip.compress(header + array.tobytes(), mtime=0)
    return routes


def test_default_data_dir_is_created_by_the_download(tmp_path, monkeypatch):
    """The user cache (no data_dir, no $METAJAX_DATA_DIR) is still created on demand."""
    import hashlib

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("METAJAX_DATA_DIR", raising=False)
    routes = {}
    for key, data in _mnist_routes().items():
        spec = mnist.FILES[key]
        shape = (2, *spec.shape[1:])
        monkeypatch.setitem(
            mnist.FILES, key, spec._replace(sha256=hashlib.sha256(data).hexdigest(),
                                            size=len(data), shape=shape)
        )
        routes["/" + spec.filename] = data
    with serve(routes) as url:
        data = mnist.load_mnist(url=url, progress=False)
    assert data.train_x.shape == (2, 28, 28)
    assert (tmp_path / "xdg" / "metajax" / "mnist" / mnist.FILES["train_images"].filename).is_file()
