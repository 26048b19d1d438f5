"""mini-ImageNet loader: both distributions, counts, cache, and the restricted unpickler.

Fixtures are tiny (3/2/2 classes x 6 images of 84x84x3) in the exact on-disk layouts.
"""

from __future__ import annotations

import builtins
import csv
import io
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from metajax.data import miniimagenet as mi
from metajax.data import sources

PER_CLASS = 6
WNIDS = {
    "train": ("n01000003", "n01000001", "n01000002"),  # deliberately not sorted
    "val": ("n02000002", "n02000001"),
    "test": ("n03000001", "n03000002"),
}


def _smooth_images(rng: np.random.Generator, n: int) -> np.ndarray:
    # Smooth gradients, so JPEG round trips stay close to the originals.
    y, x = np.mgrid[0:84, 0:84].astype(np.float32) / 83.0
    coef = rng.uniform(0, 1, size=(n, 3, 3)).astype(np.float32)
    img = coef[:, None, None, :, 0] * x[None, :, :, None] * 120
    img = img + coef[:, None, None, :, 1] * y[None, :, :, None] * 120
    img = img + coef[:, None, None, :, 2] * 15
    return np.clip(img, 0, 255).astype(np.uint8)


def _arrays(seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    """split -> wnid -> uint8 [PER_CLASS, 84, 84, 3]."""
    rng = np.random.default_rng(seed)
    return {
        split: {w: _smooth_images(rng, PER_CLASS) for w in wnids} for split, wnids in WNIDS.items()
    }


def _expected(arrays: dict[str, np.ndarray]) -> tuple[np.ndarray, tuple[str, ...]]:
    wnids = tuple(sorted(arrays))
    return np.stack([arrays[w] for w in wnids]), wnids


def _write_pickles(root: Path, arrays, protocol: int = 4, contiguous: bool = False) -> None:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for split, by_class in arrays.items():
        flat = np.concatenate([by_class[w] for w in WNIDS[split]])
        # Non-contiguous case: shuffle the images and point class_dict at their new places.
        perm = np.arange(len(flat)) if contiguous else rng.permutation(len(flat))
        data = np.empty_like(flat)
        data[perm] = flat
        class_dict = {
            w: [int(perm[k * PER_CLASS + i]) for i in range(PER_CLASS)]
            for k, w in enumerate(WNIDS[split])
        }
        obj = {"image_data": data, "class_dict": class_dict}
        path = root / mi.PICKLE_NAME.format(split=split)
        path.write_bytes(pickle.dumps(obj, protocol=protocol))


def _write_folder(root: Path, arrays, fmt: str = "PNG", ext: str = ".png") -> None:
    (root / "images").mkdir(parents=True, exist_ok=True)
    for split, by_class in arrays.items():
        rows = []
        # Classes interleaved in the CSV, unsorted; within a class the row order is the
        # image order, and the names are numbered backwards so that order is not name order.
        for i in range(PER_CLASS):
            for w in WNIDS[split]:
                name = f"{w}{PER_CLASS - i:08d}{ext}"
                img = by_class[w][i]
                Image.fromarray(img).save(root / "images" / name, format=fmt, quality=98)
                rows.append((name, w))
        with open(root / f"{split}.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["filename", "label"])
            writer.writerows(rows)


def _load(tmp_path: Path, **kw):
    kw.setdefault("expect_counts", False)
    return mi.load_miniimagenet(tmp_path, **kw)


# ----------------------------------------------------------------------------- both sources


@pytest.mark.parametrize("contiguous", [False, True])
def test_pickle_loads_exact_arrays_sorted_by_wnid(tmp_path, contiguous):
    arrays = _arrays()
    _write_pickles(tmp_path / "miniimagenet", arrays, contiguous=contiguous)
    images, wnids = _load(tmp_path, source="pickle")
    assert set(images) == set(wnids) == {"train", "val", "test"}
    for split in arrays:
        want, want_wnids = _expected(arrays[split])
        assert wnids[split] == want_wnids == tuple(sorted(WNIDS[split]))
        assert images[split].dtype == np.uint8
        assert images[split].shape == (len(WNIDS[split]), PER_CLASS, 84, 84, 3)
        np.testing.assert_array_equal(images[split], want)


def test_folder_png_matches_pickle_exactly(tmp_path):
    arrays = _arrays()
    root = tmp_path / "miniimagenet"
    _write_folder(root, arrays)
    _write_pickles(root, arrays)
    from_folder, w_folder = _load(tmp_path, source="folder", cache=False)
    from_pickle, w_pickle = _load(tmp_path, source="pickle")
    assert w_folder == w_pickle
    for split in arrays:
        np.testing.assert_array_equal(from_folder[split], _expected(arrays[split])[0])
        np.testing.assert_array_equal(from_folder[split], from_pickle[split])


def test_folder_jpeg_is_near_the_originals(tmp_path):
    arrays = _arrays()
    _write_folder(tmp_path / "miniimagenet", arrays, fmt="JPEG", ext=".jpg")
    images, wnids = _load(tmp_path, source="folder", cache=False)
    for split in arrays:
        want, want_wnids = _expected(arrays[split])
        assert wnids[split] == want_wnids
        assert images[split].shape == want.shape and images[split].dtype == np.uint8
        err = np.abs(images[split].astype(int) - want.astype(int))
        assert err.mean() < 2.0 and err.max() < 40


def test_filename_without_suffix_gets_jpg(tmp_path):
    root = tmp_path / "miniimagenet"
    _write_folder(root, _arrays(), fmt="JPEG", ext=".jpg")
    for split in WNIDS:
        text = (root / f"{split}.csv").read_text().replace(".jpg", "")
        (root / f"{split}.csv").write_text(text)
    images, _ = _load(tmp_path, source="folder", cache=False, splits=("val",))
    assert images["val"].shape == (2, PER_CLASS, 84, 84, 3)


def test_non_84_images_are_resized_with_lanczos_and_grey_becomes_rgb(tmp_path):
    root = tmp_path / "miniimagenet"
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(3)
    big = rng.integers(0, 256, (90, 100, 3), dtype=np.uint8)
    grey = rng.integers(0, 256, (84, 84), dtype=np.uint8)
    Image.fromarray(big).save(root / "images" / "a.png")
    Image.fromarray(grey, mode="L").save(root / "images" / "b.png")
    (root / "test.csv").write_text("filename,label\na.png,n1\nb.png,n2\n")
    images, wnids = _load(tmp_path, source="folder", splits=("test",), cache=False)
    want = np.asarray(Image.fromarray(big).resize((84, 84), resample=Image.Resampling.LANCZOS))
    assert wnids["test"] == ("n1", "n2")
    np.testing.assert_array_equal(images["test"][0, 0], want)
    np.testing.assert_array_equal(images["test"][1, 0], np.repeat(grey[..., None], 3, axis=-1))


def test_auto_prefers_pickle_then_falls_back_to_folder(tmp_path, monkeypatch):
    arrays = _arrays()
    root = tmp_path / "miniimagenet"
    _write_folder(root, arrays)
    calls = []
    real = mi._decode_image
    monkeypatch.setattr(mi, "_decode_image", lambda p: calls.append(p) or real(p))
    _load(tmp_path, cache=False)
    assert len(calls) == 7 * PER_CLASS
    _write_pickles(root, arrays)
    calls.clear()
    images, _ = _load(tmp_path)
    assert calls == []
    np.testing.assert_array_equal(images["train"], _expected(arrays["train"])[0])


def test_data_dir_from_environment(tmp_path, monkeypatch):
    _write_pickles(tmp_path / "miniimagenet", _arrays())
    monkeypatch.setenv("METAJAX_DATA_DIR", str(tmp_path))
    images, _ = mi.load_miniimagenet(expect_counts=False, splits=["test"])
    assert list(images) == ["test"]


# ----------------------------------------------------------------------------- counts


@pytest.mark.parametrize("source", ["pickle", "folder"])
def test_real_counts_are_enforced_by_default(tmp_path, source):
    root = tmp_path / "miniimagenet"
    (_write_pickles if source == "pickle" else _write_folder)(root, _arrays())
    with pytest.raises(ValueError, match=r"train has 3 classes.*64.*expect_counts=False"):
        mi.load_miniimagenet(tmp_path, source=source, cache=False)


def test_600_images_per_class_is_enforced(tmp_path, monkeypatch):
    # Shrink the class-count expectation so the per-class check is the one that fires.
    monkeypatch.setitem(mi.NUM_CLASSES, "val", 2)
    _write_pickles(tmp_path / "miniimagenet", _arrays())
    with pytest.raises(ValueError, match=r"600 images.*has 6"):
        mi.load_miniimagenet(tmp_path, source="pickle", splits=("val",))


def test_real_counts_pass(tmp_path, monkeypatch):
    monkeypatch.setitem(mi.NUM_CLASSES, "val", 2)
    monkeypatch.setattr(mi, "IMAGES_PER_CLASS", PER_CLASS)
    _write_pickles(tmp_path / "miniimagenet", _arrays())
    images, _ = mi.load_miniimagenet(tmp_path, source="pickle", splits=("val",))
    assert images["val"].shape[:2] == (2, PER_CLASS)


def test_unequal_class_sizes_are_refused(tmp_path):
    root = tmp_path / "miniimagenet"
    _write_folder(root, _arrays())
    lines = (root / "val.csv").read_text().splitlines()
    (root / "val.csv").write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(ValueError, match="different image counts"):
        _load(tmp_path, source="folder", splits=("val",), cache=False)


def test_overlapping_splits_are_refused(tmp_path):
    root = tmp_path / "miniimagenet"
    _write_folder(root, _arrays())
    (root / "test.csv").write_text((root / "val.csv").read_text())
    with pytest.raises(ValueError, match="both val and test"):
        _load(tmp_path, source="folder", cache=False)


def test_bad_csv_header_and_path_names(tmp_path):
    root = tmp_path / "miniimagenet"
    _write_folder(root, _arrays())
    (root / "val.csv").write_text("file,wnid\na.png,n1\n")
    with pytest.raises(ValueError, match="header must be 'filename,label'"):
        _load(tmp_path, source="folder", splits=("val",))
    (root / "val.csv").write_text("filename,label\n../secret.png,n1\n")
    with pytest.raises(ValueError, match="plain file name"):
        _load(tmp_path, source="folder", splits=("val",))


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="source must be"):
        mi.load_miniimagenet(tmp_path, source="tfds")
    with pytest.raises(ValueError, match="splits must be"):
        mi.load_miniimagenet(tmp_path, splits=("training",))
    with pytest.raises(TypeError, match="sequence of split names"):
        mi.load_miniimagenet(tmp_path, splits="train")


# ----------------------------------------------------------------------------- missing files


def test_missing_everything_names_both_layouts_and_no_download(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        mi.load_miniimagenet(tmp_path)
    msg = str(info.value)
    assert str(tmp_path / "miniimagenet") in msg
    assert "mini-imagenet-cache-train.pkl" in msg and "train.csv" in msg and "images" in msg
    assert "does not download" in msg and "ImageNet" in msg and "terms" in msg


def test_missing_pickle_split_is_named(tmp_path):
    _write_pickles(tmp_path / "miniimagenet", _arrays())
    (tmp_path / "miniimagenet" / "mini-imagenet-cache-val.pkl").unlink()
    with pytest.raises(FileNotFoundError, match="mini-imagenet-cache-val.pkl"):
        _load(tmp_path, source="pickle")


def test_missing_image_is_named_before_decoding(tmp_path, monkeypatch):
    root = tmp_path / "miniimagenet"
    _write_folder(root, _arrays())
    victim = sorted((root / "images").iterdir())[-1]
    victim.unlink()

    def no_decode(path):
        raise AssertionError("decoded before checking that all files exist")

    monkeypatch.setattr(mi, "_decode_image", no_decode)
    with pytest.raises(FileNotFoundError, match=victim.name):
        _load(tmp_path, source="folder")


def test_missing_csv_is_named(tmp_path):
    root = tmp_path / "miniimagenet"
    _write_folder(root, _arrays())
    (root / "test.csv").unlink()
    with pytest.raises(FileNotFoundError, match="test.csv"):
        _load(tmp_path, source="folder")


# ----------------------------------------------------------------------------- folder cache


def _files(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


def test_cache_written_once_then_read(tmp_path, monkeypatch):
    arrays = _arrays()
    _write_folder(tmp_path / "miniimagenet", arrays)
    first, _ = _load(tmp_path, source="folder")
    cache_dir = tmp_path / "miniimagenet" / "cache"
    names = _files(cache_dir)
    assert len(names) == 3 and all(n.startswith("miniimagenet-") for n in names)
    assert all(n.endswith(".npz") for n in names)  # no temporary files left over

    def no_decode(path):
        raise AssertionError("cache was not used")

    monkeypatch.setattr(mi, "_decode_image", no_decode)
    second, wnids = _load(tmp_path, source="folder")
    for split in arrays:
        np.testing.assert_array_equal(second[split], first[split])
        assert wnids[split] == tuple(sorted(WNIDS[split]))


def test_cache_key_follows_the_csv(tmp_path, monkeypatch):
    root = tmp_path / "miniimagenet"
    _write_folder(root, _arrays())
    _load(tmp_path, source="folder", splits=("train",))
    before = _files(root / "cache")
    # Drop one class from the CSV: the cache key must change and the images be decoded again.
    lines = (root / "train.csv").read_text().splitlines()
    keep = [ln for ln in lines if not ln.endswith("n01000003")]
    (root / "train.csv").write_text("\n".join(keep) + "\n")
    decoded = []
    real = mi._decode_image
    monkeypatch.setattr(mi, "_decode_image", lambda p: decoded.append(p) or real(p))
    images, wnids = _load(tmp_path, source="folder", splits=("train",))
    assert wnids["train"] == ("n01000001", "n01000002")
    assert len(decoded) == 2 * PER_CLASS
    assert len(_files(root / "cache")) == len(before) + 1


def test_explicit_cache_dir_and_read_only_data_dir(tmp_path, monkeypatch):
    root = tmp_path / "miniimagenet"
    _write_folder(root, _arrays())
    elsewhere = tmp_path / "elsewhere"
    _load(tmp_path, source="folder", splits=("val",), cache_dir=elsewhere)
    assert len(_files(elsewhere)) == 1 and not (root / "cache").exists()

    def read_only(path, **arrays):
        raise PermissionError(13, "Read-only file system", str(path))

    monkeypatch.setattr(sources, "atomic_save_npz", read_only)  # the writer both caches share
    with pytest.warns(UserWarning, match="cache_dir="):
        images, _ = _load(tmp_path, source="folder", splits=("test",))
    assert images["test"].shape == (2, PER_CLASS, 84, 84, 3)


def test_decode_error_midway_leaves_no_cache(tmp_path, monkeypatch):
    root = tmp_path / "miniimagenet"
    _write_folder(root, _arrays())
    calls = []
    real = mi._decode_image

    def flaky(path):
        calls.append(path)
        if len(calls) == 5:
            raise OSError("disk went away")
        return real(path)

    monkeypatch.setattr(mi, "_decode_image", flaky)
    with pytest.raises(ValueError, match="cannot decode image"):
        _load(tmp_path, source="folder", splits=("train",))
    assert _files(root / "cache") == []


def test_write_error_midway_leaves_no_partial_file(tmp_path, monkeypatch):
    root = tmp_path / "miniimagenet"
    _write_folder(root, _arrays())

    def half_savez(f, **arrays):
        f.write(b"PK\x03\x04 half a zip")
        raise OSError("no space left on device")

    monkeypatch.setattr(np, "savez", half_savez)
    with pytest.warns(UserWarning, match="could not write"):
        _load(tmp_path, source="folder", splits=("val",))
    assert _files(root / "cache") == []


def test_corrupt_cache_is_ignored_and_rebuilt(tmp_path):
    root = tmp_path / "miniimagenet"
    arrays = _arrays()
    _write_folder(root, arrays)
    _load(tmp_path, source="folder", splits=("val",))
    (cache_file,) = (root / "cache").iterdir()
    cache_file.write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="unreadable cache"):
        images, _ = _load(tmp_path, source="folder", splits=("val",))
    np.testing.assert_array_equal(images["val"], _expected(arrays["val"])[0])


# ----------------------------------------------------------------------------- unpickler


def _restricted_loads(data: bytes):
    return sources.restricted_pickle_load(io.BytesIO(data))


SAMPLE_ARRAYS = [
    np.arange(2 * 84 * 84 * 3, dtype=np.uint8).reshape(2, 84, 84, 3),
    np.arange(12, dtype=np.int64).reshape(3, 4),
    np.linspace(0, 1, 7, dtype=np.float32),
    np.zeros((0, 84, 84, 3), np.uint8),
    np.arange(20, dtype=np.int16).reshape(4, 5)[:, ::2],  # non-contiguous
    np.asfortranarray(np.arange(6, dtype=np.float64).reshape(2, 3)),
    np.array([True, False]),
]


@pytest.mark.parametrize("protocol", range(0, pickle.HIGHEST_PROTOCOL + 1))
def test_restricted_unpickler_accepts_numpy_arrays(protocol):
    for arr in SAMPLE_ARRAYS:
        out = _restricted_loads(pickle.dumps(arr, protocol=protocol))
        assert type(out) is np.ndarray and out.dtype == arr.dtype
        np.testing.assert_array_equal(out, arr)
    obj = {
        "image_data": SAMPLE_ARRAYS[0],
        "class_dict": {"n1": [0], "n2": (np.int64(1),)},
        "scalars": [np.float32(1.5), np.int64(3), 2.5, "s"],
    }
    out = _restricted_loads(pickle.dumps(obj, protocol=protocol))
    assert out["class_dict"] == {"n1": [0], "n2": (1,)}
    assert out["scalars"] == [1.5, 3, 2.5, "s"]


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_full_cache_roundtrip_through_loader(tmp_path, protocol):
    arrays = _arrays()
    _write_pickles(tmp_path / "miniimagenet", arrays, protocol=protocol)
    images, _ = _load(tmp_path, source="pickle", splits=("test",))
    np.testing.assert_array_equal(images["test"], _expected(arrays["test"])[0])


class _Py2StylePickler(pickle._Pickler):  # type: ignore[name-defined]
    """Writes bytes and str as Python 2 byte strings (BINSTRING), like a Python 2 cache."""

    dispatch = pickle._Pickler.dispatch.copy()  # type: ignore[attr-defined]

    def _save_py2_str(self, obj):
        raw = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(raw) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(raw)]) + raw)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(raw)) + raw)
        self.memoize(obj)

    dispatch[bytes] = _save_py2_str
    dispatch[str] = _save_py2_str


def test_python2_numpy1_style_pickle_loads():
    data = np.arange(2 * 84 * 84 * 3, dtype=np.uint8).reshape(2, 84, 84, 3)
    obj = {"image_data": data, "class_dict": {"n1": [0], "n2": [1]}}
    buf = io.BytesIO()
    _Py2StylePickler(buf, protocol=2).dump(obj)
    # numpy 1.x and Python 2 name the module numpy.core; GLOBAL opcodes are newline-terminated
    # text, so the rename keeps the pickle valid.
    raw = buf.getvalue().replace(b"numpy._core", b"numpy.core")
    assert b"cnumpy.core.multiarray\n_reconstruct\n" in raw and b"_codecs" not in raw
    out = _restricted_loads(raw)
    np.testing.assert_array_equal(out["image_data"], data)
    image_data, class_dict = mi.validate_cache_structure(out)
    assert sorted(class_dict) == ["n1", "n2"] and image_data.shape == (2, 84, 84, 3)


@pytest.mark.parametrize("core", ["numpy.core", "numpy._core"])
def test_find_class_knows_numpy1_and_numpy2_names(core):
    unpickler = sources._RestrictedUnpickler(io.BytesIO(b""))
    for module, name in [
        (f"{core}.multiarray", "_reconstruct"),
        (f"{core}.multiarray", "scalar"),
        (f"{core}.numeric", "_frombuffer"),
    ]:
        assert callable(unpickler.find_class(module, name))
    # Protocol 5 as numpy 1.x writes it: _frombuffer(buffer, dtype, shape, order).
    frombuffer = unpickler.find_class(f"{core}.numeric", "_frombuffer")
    out = frombuffer(bytes(range(6)), np.dtype(np.uint8), (2, 3), "C")
    np.testing.assert_array_equal(out, np.arange(6, dtype=np.uint8).reshape(2, 3))


SENTINEL_FLAG: list[str] = []


class _SetsFlagOnLoad:
    def __setstate__(self, state):
        SENTINEL_FLAG.append("custom class ran")


class _OsSystem:
    def __init__(self, sentinel: Path):
        self.sentinel = sentinel

    def __reduce__(self):
        return (os.system, (f"touch {self.sentinel}",))


class _Eval:
    def __init__(self, sentinel: Path):
        self.sentinel = sentinel

    def __reduce__(self):
        return (builtins.eval, (f"__import__('pathlib').Path({str(self.sentinel)!r}).touch()",))


class _NumpyLoad:
    def __init__(self, sentinel: Path):
        self.sentinel = sentinel

    def __reduce__(self):  # an allowed module but a forbidden name
        return (np.save, (str(self.sentinel), np.zeros(1)))


def _malicious(sentinel: Path) -> dict[str, object]:
    obj = _SetsFlagOnLoad()
    obj.__dict__["x"] = 1
    return {
        "system": _OsSystem(sentinel),
        "eval": _Eval(sentinel),
        "custom class": obj,
        "numpy.save": _NumpyLoad(sentinel),
    }


@pytest.mark.parametrize("kind", ["system", "eval", "custom class", "numpy.save"])
def test_malicious_payloads_are_live_under_plain_pickle(tmp_path, kind):
    # Control: the payloads below do run under pickle.loads, so their refusal means something.
    sentinel = tmp_path / "pwned"
    SENTINEL_FLAG.clear()
    pickle.loads(pickle.dumps(_malicious(sentinel)[kind], protocol=4))
    assert sentinel.exists() or (tmp_path / "pwned.npy").exists() or SENTINEL_FLAG
    SENTINEL_FLAG.clear()


@pytest.mark.parametrize("protocol", range(0, pickle.HIGHEST_PROTOCOL + 1))
@pytest.mark.parametrize("kind", ["system", "eval", "custom class", "numpy.save"])
def test_malicious_pickle_is_refused_without_running(tmp_path, protocol, kind):
    sentinel = tmp_path / "pwned"
    payload = _malicious(sentinel)[kind]
    # Hide the payload inside an otherwise valid cache, after a real array.
    obj = {"image_data": np.zeros((1, 84, 84, 3), np.uint8), "class_dict": {"n1": [payload]}}
    raw = pickle.dumps(obj, protocol=protocol)
    forbidden = {
        "system": f"{os.system.__module__}.system",
        "eval": "builtins.eval" if protocol >= 3 else "__builtin__.eval",
        # Protocols 0 and 1 rebuild plain-class instances through copyreg, refused first.
        "custom class": "_SetsFlagOnLoad" if protocol >= 2 else "copy_reg._reconstructor",
        "numpy.save": "numpy.save",
    }[kind]
    SENTINEL_FLAG.clear()
    with pytest.raises(sources.ForbiddenPickleError, match="forbidden global") as info:
        _restricted_loads(raw)
    assert forbidden in str(info.value)
    assert not sentinel.exists() and not (tmp_path / "pwned.npy").exists()
    assert SENTINEL_FLAG == []

    # Through the loader, the error names the file too.
    root = tmp_path / "miniimagenet"
    root.mkdir()
    (root / "mini-imagenet-cache-test.pkl").write_bytes(raw)
    with pytest.raises(sources.ForbiddenPickleError, match="mini-imagenet-cache-test.pkl"):
        _load(tmp_path, source="pickle", splits=("test",))
    assert not sentinel.exists() and SENTINEL_FLAG == []


def test_unsafe_arguments_to_allowed_globals_are_refused():
    # _codecs.encode with another codec, and bytes(n) (an allocation of attacker-chosen size).
    bad_codec = b"c_codecs\nencode\n(Vabc\nVrot13\ntR."
    with pytest.raises(sources.ForbiddenPickleError, match="only 'latin1'"):
        _restricted_loads(bad_codec)
    big_bytes = b"c__builtin__\nbytes\n(I1000000000000\ntR."
    with pytest.raises(sources.ForbiddenPickleError, match="only bytes"):
        _restricted_loads(big_bytes)
    # _reconstruct of something other than ndarray (here: dtype, itself allowed).
    bad_subtype = b"cnumpy._core.multiarray\n_reconstruct\n(cnumpy\ndtype\n(I0\ntVb\ntR."
    with pytest.raises(sources.ForbiddenPickleError, match="only plain numpy.ndarray"):
        _restricted_loads(bad_subtype)


def test_persistent_ids_are_refused():
    with pytest.raises(sources.ForbiddenPickleError, match="persistent id"):
        _restricted_loads(b"Pabc\n.")


# ----------------------------------------------------------------------------- structure


def _good_cache() -> dict:
    return {"image_data": np.zeros((4, 84, 84, 3), np.uint8), "class_dict": {"a": [0, 1]}}


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda d: d.pop("class_dict"), "expected keys"),
        (lambda d: d.update(extra=1), "expected keys"),
        (lambda d: d.update(image_data=np.zeros((4, 84, 84, 3), np.float32)), "uint8"),
        (lambda d: d.update(image_data=np.zeros((4, 32, 32, 3), np.uint8)), "84, 84, 3"),
        (lambda d: d.update(image_data=[1, 2]), "uint8"),
        (lambda d: d.update(class_dict={"a": [0, 4]}), "outside"),
        (lambda d: d.update(class_dict={"a": [-1]}), "outside"),
        (lambda d: d.update(class_dict={"a": [0], "b": [0]}), "more than once"),
        (lambda d: d.update(class_dict={"a": [0.5]}), "list of ints"),
        (lambda d: d.update(class_dict={}), "non-empty"),
        (lambda d: d.update(class_dict={"a": {0, 1}}), "type set"),
        (lambda d: d.update(class_dict={"a": [b"x"]}), "type bytes"),
        (lambda d: d.update(class_dict={1: [0]}), "not a str"),
        (lambda d: d.update(class_dict={"a": np.array([0], dtype=object)}), "dtype object"),
    ],
)
def test_structure_errors(mutate, match):
    obj = _good_cache()
    mutate(obj)
    # Through a pickle round trip (protocol 4 builds sets and bytes without any global).
    loaded = _restricted_loads(pickle.dumps(obj, protocol=4))
    with pytest.raises(ValueError, match=match):
        mi.validate_cache_structure(loaded)


def test_structure_rejects_non_dict_and_self_reference():
    with pytest.raises(ValueError, match="expected a dict"):
        mi.validate_cache_structure([1, 2])
    loop: list = []
    loop.append(loop)
    obj = _good_cache()
    obj["class_dict"]["a"] = loop
    with pytest.raises(ValueError, match="list of ints"):
        mi.validate_cache_structure(_restricted_loads(pickle.dumps(obj, protocol=2)))


def test_truncated_pickle_gives_clear_error(tmp_path):
    root = tmp_path / "miniimagenet"
    _write_pickles(root, _arrays())
    path = root / "mini-imagenet-cache-val.pkl"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(pickle.UnpicklingError, match="not a readable pickle"):
        _load(tmp_path, source="pickle", splits=("val",))
