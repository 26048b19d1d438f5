"""Omniglot loading, verification, caching, downloads and splits, on tiny fixture archives."""

from __future__ import annotations

import io
import os
import sys
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
from fixtures_omniglot import (
    LAYOUT,
    build_zip,
    closed_port_url,
    make_fixture,
    serve,
    spec_for,
    status,
    truncated,
    write_fixture,
)
from PIL import Image

from metajax.data import omniglot
from metajax.data.omniglot import (
    ModifiedArchiveWarning,
    OmniglotFormatError,
    load_omniglot,
    omniglot_split_indices,
    omniglot_splits,
)
from metajax.data.sources import ChecksumError, DataNotFoundError

N_BACKGROUND = sum(LAYOUT["background"].values())  # 7
N_EVALUATION = sum(LAYOUT["evaluation"].values())  # 4
N_CHARACTERS = N_BACKGROUND + N_EVALUATION


@pytest.fixture(scope="module")
def fixture():
    return make_fixture()


@pytest.fixture
def data_dir(tmp_path, monkeypatch, fixture):
    """An isolated data dir whose omniglot/ holds the fixture archives, named as originals.

    Every folder the loader may write to lies under tmp_path, and the download URL points
    at a closed local port, so no test touches the network or the user's files.
    """
    for subset, (_, _, spec) in fixture.items():
        monkeypatch.setitem(omniglot.FILES, subset, spec)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("METAJAX_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("METAJAX_OMNIGLOT_URL", closed_port_url())
    monkeypatch.delenv("METAJAX_CACHE_DIR", raising=False)
    write_fixture(tmp_path / "data" / "omniglot", fixture)
    # An empty data directory for the download tests: a data directory must exist (a
    # mistyped one is an error, not created); downloads create the dataset's folder in it.
    (tmp_path / "fresh").mkdir()
    return tmp_path / "data"


def load(**kwargs):
    return load_omniglot(progress=False, **kwargs)


def expected_rows(fixture) -> list[tuple[str, str, str, list[bytes]]]:
    """(subset, alphabet, character, 20 PNGs in drawer order), in the documented row order."""
    rows = []
    for subset in ("background", "evaluation"):
        groups: dict[tuple[str, str], list[str]] = {}
        for name in fixture[subset][1]:
            _, alphabet, character, _ = name.split("/")
            groups.setdefault((alphabet, character), []).append(name)
        for key in sorted(groups):
            pngs = [fixture[subset][1][n] for n in sorted(groups[key])]
            rows.append((subset, *key, pngs))
    return rows


def reference_ink(png: bytes, size: int = 28) -> np.ndarray:
    """The MAML reference pipeline, literally: PIL resize with LANCZOS, /255, 1 - image."""
    small = Image.open(io.BytesIO(png)).resize((size, size), resample=Image.LANCZOS)
    return 1.0 - np.asarray(small.convert("L"), dtype=np.float32) / 255.0


def cache_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# --- loading -------------------------------------------------------------------------------


def test_counts_shapes_order_and_pixels(data_dir, fixture):
    arrays = load()
    assert arrays.images.shape == (N_CHARACTERS, 20, 28, 28)
    assert arrays.images.dtype == np.float32
    rows = expected_rows(fixture)
    assert list(arrays.subset) == [r[0] for r in rows]
    assert list(arrays.alphabet) == [r[1] for r in rows]
    assert list(arrays.character) == [r[2] for r in rows]
    assert arrays.alphabet[0] == "Alpha_(Test)"  # sorted, although written after Gamma
    assert arrays.sha256 == {s: fixture[s][2].sha256 for s in ("background", "evaluation")}
    # Every drawing equals the reference pipeline applied to its own PNG, in drawer order.
    for c, (_, _, _, pngs) in enumerate(rows):
        for d, png in enumerate(pngs):
            np.testing.assert_array_equal(arrays.images[c, d], reference_ink(png))
    # "maml" resampling keeps the images binary, ink 1 on paper 0.
    assert set(np.unique(arrays.images).tolist()) == {0.0, 1.0}
    assert 0.0 < arrays.images.mean() < 0.5


def test_lanczos_resampling_and_image_size(data_dir, fixture):
    arrays = load(subsets=("evaluation",), image_size=14, resample="lanczos")
    assert arrays.images.shape == (N_EVALUATION, 20, 14, 14)
    png = expected_rows(fixture)[N_BACKGROUND][3][0]
    grey = Image.open(io.BytesIO(png)).convert("L").resize((14, 14), resample=Image.LANCZOS)
    expected = 1.0 - np.asarray(grey, dtype=np.float32) / 255.0
    np.testing.assert_allclose(arrays.images[0, 0], expected, atol=1e-6)
    values = np.unique(arrays.images)
    assert values.min() >= 0.0 and values.max() <= 1.0 and len(values) > 2  # grey levels


def test_subset_selection(data_dir):
    arrays = load(subsets="evaluation")
    assert arrays.images.shape[0] == N_EVALUATION
    assert set(arrays.subset.tolist()) == {"evaluation"}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"subsets": ("background", "background")}, "distinct"),
        ({"subsets": ("nope",)}, "distinct"),
        ({"subsets": ("background", "background_small1")}, "duplicate"),
        ({"image_size": 0}, "positive"),
        ({"resample": "bicubic"}, "resample"),
        ({"source": "folder"}, "source"),
    ],
)
def test_bad_arguments_are_rejected_early(data_dir, kwargs, match):
    with pytest.raises(ValueError, match=match):
        load(**kwargs)


def test_tfds_source_without_tfds_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # makes the import fail
    with pytest.raises(ImportError, match=r"pip install 'metajax\[tfds\]'"):
        load(source="tfds")


# --- cache ----------------------------------------------------------------------------------


def test_cache_written_atomically_and_reused(data_dir, fixture, monkeypatch):
    first = load()
    cache = data_dir / "omniglot" / "cache"
    names = cache_files(cache)
    assert names == sorted(
        f"omniglot-{s}-{fixture[s][2].sha256[:16]}-28px-maml-v1.npz"
        for s in ("background", "evaluation")
    )  # and no temporary files left beside them

    def no_decoding(*args, **kwargs):
        raise AssertionError("the archive was decoded although a cache exists")

    # The archive is still hashed (to find its cache entry), but not opened or decoded.
    monkeypatch.setattr(omniglot, "_decode_zip", no_decoding)
    second = load()
    np.testing.assert_array_equal(second.images, first.images)
    np.testing.assert_array_equal(second.alphabet, first.alphabet)
    np.testing.assert_array_equal(second.character, first.character)
    assert second.sha256 == first.sha256
    with pytest.raises(AssertionError, match="archive was decoded"):
        load(image_size=20)  # another size is another cache entry
    assert cache_files(cache) == names


def test_cache_keyed_on_file_contents(data_dir, fixture, monkeypatch):
    load(subsets="evaluation")
    other, _ = build_zip("evaluation", LAYOUT["evaluation"], seed=99)
    (data_dir / "omniglot" / "images_evaluation.zip").write_bytes(other)
    monkeypatch.setitem(
        omniglot.FILES, "evaluation", spec_for("evaluation", other, LAYOUT["evaluation"])
    )
    arrays = load(subsets="evaluation")
    assert arrays.sha256["evaluation"] == omniglot.FILES["evaluation"].sha256
    assert len(cache_files(data_dir / "omniglot" / "cache")) == 2


def test_read_only_data_dir_caches_in_user_cache(data_dir, tmp_path):
    folder = data_dir / "omniglot"
    folder.chmod(0o555)
    try:
        load()
    finally:
        folder.chmod(0o755)
    assert not (folder / "cache").exists()
    assert len(cache_files(tmp_path / "xdg" / "metajax" / "omniglot" / "cache")) == 2


def test_explicit_cache_dir(data_dir, tmp_path):
    load(cache_dir=tmp_path / "mine")
    assert len(cache_files(tmp_path / "mine")) == 2
    assert not (data_dir / "omniglot" / "cache").exists()


# --- verification of user-supplied archives -------------------------------------------------


def test_repacked_archive_accepted_once_with_warning(data_dir, fixture, monkeypatch):
    actual = fixture["background"][2].sha256
    original = "ab" * 32
    monkeypatch.setitem(
        omniglot.FILES, "background", fixture["background"][2]._replace(sha256=original)
    )
    with pytest.warns(ModifiedArchiveWarning) as record:
        arrays = load()
    assert len(record) == 1
    message = str(record[0].message)
    assert "images_background.zip" in message and actual in message and original in message
    assert arrays.sha256["background"] == actual
    assert any(actual[:16] in n for n in cache_files(data_dir / "omniglot" / "cache"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load()  # from the cache: accepted silently


def corrupt_member(data: bytes) -> bytes:
    """``data`` with bytes in the middle of the first PNG's compressed stream flipped."""
    info = next(i for i in zipfile.ZipFile(io.BytesIO(data)).infolist() if not i.is_dir())
    start = info.header_offset + 30 + len(info.filename) + len(info.extra)
    middle = start + info.compress_size // 2
    return data[:middle] + bytes(b ^ 0xFF for b in data[middle : middle + 4]) + data[middle + 4 :]


@pytest.mark.parametrize(
    "damage, match",
    [
        (lambda data: data[: len(data) // 2], "not a readable zip"),
        (lambda data: b"not a zip at all", "not a readable zip"),
        (corrupt_member, "cannot be read"),
    ],
    ids=["truncated", "garbage", "corrupt-member"],
)
def test_corrupt_archive_names_file_and_checksum_and_caches_nothing(
    data_dir, fixture, damage, match
):
    path = data_dir / "omniglot" / "images_evaluation.zip"
    damaged = damage(fixture["evaluation"][0])
    path.write_bytes(damaged)
    with pytest.raises(OmniglotFormatError, match=match) as info:
        load()
    message = str(info.value)
    assert str(path) in message
    assert fixture["evaluation"][2].sha256 in message  # the expected checksum
    assert sha_of(damaged) in message  # and the file's own
    # The background archive was fine and is cached; nothing of the evaluation one.
    assert [n.split("-")[1] for n in cache_files(data_dir / "omniglot" / "cache")] == ["background"]


def sha_of(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def rebuilt(fixture, edit, subset: str = "evaluation") -> bytes:
    """The fixture's ``subset`` archive repacked, its members passed through ``edit``."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        for name, png in edit(dict(fixture[subset][1])).items():
            archive.writestr(name, png)
    return out.getvalue()


def small_image(png: bytes) -> bytes:
    buffer = io.BytesIO()
    Image.open(io.BytesIO(png)).resize((100, 100)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda pngs: dict(list(pngs.items())[1:]), "has 19 images, expected 20"),
        (
            lambda pngs: {n: p for n, p in pngs.items() if "/Delta/" not in n},
            "1 alphabets and 2 characters, expected 2 and 4",
        ),
        (lambda pngs: {**pngs, "images_evaluation/readme.txt": b"hi"}, "unexpected member"),
        (
            lambda pngs: {
                n: small_image(p) if i == 0 else p for i, (n, p) in enumerate(pngs.items())
            },
            "is 100x100 pixels",
        ),
    ],
    ids=["missing-drawing", "missing-alphabet", "stray-file", "wrong-size"],
)
def test_repacked_archive_with_wrong_contents_rejected(data_dir, fixture, edit, match):
    path = data_dir / "omniglot" / "images_evaluation.zip"
    path.write_bytes(rebuilt(fixture, edit))
    with pytest.raises(OmniglotFormatError, match=match):
        load(subsets="evaluation")
    assert cache_files(data_dir / "omniglot" / "cache") == []


def as_grey(png: bytes) -> bytes:
    buffer = io.BytesIO()
    Image.open(io.BytesIO(png)).convert("L").save(buffer, format="PNG")
    return buffer.getvalue()


def test_repacked_archive_with_8bit_pngs_gives_the_same_images(data_dir, fixture):
    original = load(subsets="evaluation")
    regrey = rebuilt(fixture, lambda pngs: {n: as_grey(p) for n, p in pngs.items()})
    (data_dir / "omniglot" / "images_evaluation.zip").write_bytes(regrey)
    with pytest.warns(ModifiedArchiveWarning):
        again = load(subsets="evaluation")
    np.testing.assert_array_equal(again.images, original.images)


def test_zip_from_a_mac_with_metadata_is_accepted(data_dir, fixture):
    def with_metadata(pngs):
        return {
            **pngs,
            "__MACOSX/images_evaluation/._x.png": b"junk",
            "images_evaluation/Delta/.DS_Store": b"junk",
        }

    path = data_dir / "omniglot" / "images_evaluation.zip"
    path.write_bytes(rebuilt(fixture, with_metadata))
    with pytest.warns(ModifiedArchiveWarning):
        assert load(subsets="evaluation").images.shape[0] == N_EVALUATION


# --- downloads ------------------------------------------------------------------------------


def routes_for(fixture) -> dict:
    return {"/" + spec.filename: data for data, _, spec in fixture.values()}


def test_download_success(data_dir, fixture, tmp_path):
    empty = tmp_path / "fresh"
    with serve(routes_for(fixture)) as url:
        arrays = load(data_dir=empty, url=url)
    assert arrays.images.shape[0] == N_CHARACTERS
    for data, _, spec in fixture.values():
        assert (empty / "omniglot" / spec.filename).read_bytes() == data


def test_download_url_from_environment(data_dir, fixture, tmp_path, monkeypatch):
    with serve(routes_for(fixture)) as url:
        monkeypatch.setenv("METAJAX_OMNIGLOT_URL", url)
        assert load(data_dir=tmp_path / "fresh").images.shape[0] == N_CHARACTERS


def test_download_checksum_mismatch_leaves_nothing(data_dir, fixture, tmp_path):
    routes = routes_for(fixture)
    routes["/images_background.zip"] = fixture["evaluation"][0]  # the wrong file
    folder = tmp_path / "fresh" / "omniglot"
    with serve(routes) as url:
        with pytest.raises(ChecksumError) as info:
            load(data_dir=tmp_path / "fresh", url=url)
    message = str(info.value)
    assert "images_background.zip" in message
    assert fixture["background"][2].sha256 in message and fixture["evaluation"][2].sha256 in message
    assert cache_files(folder) == []


@pytest.mark.parametrize("failure", ["truncated", "500", "404"])
def test_failed_download_leaves_nothing_and_names_files(data_dir, fixture, tmp_path, failure):
    routes = routes_for(fixture)
    data = routes["/images_evaluation.zip"]
    routes["/images_evaluation.zip"] = (
        truncated(data) if failure == "truncated" else status(int(failure))
    )
    folder = tmp_path / "fresh" / "omniglot"
    with serve(routes) as url:
        with pytest.raises(DataNotFoundError) as info:
            load(data_dir=tmp_path / "fresh", url=url)
    message = str(info.value)
    assert "images_evaluation.zip" in message and str(folder) in message
    assert url + "images_evaluation.zip" in message
    # The background archive arrived whole; of the evaluation one nothing remains.
    assert cache_files(folder) == ["images_background.zip"]


def test_no_network_and_no_files(data_dir, tmp_path):
    folder = tmp_path / "fresh" / "omniglot"
    with pytest.raises(DataNotFoundError) as info:
        load(data_dir=tmp_path / "fresh")  # the URL is a closed local port
    message = str(info.value)
    for part in ("images_background.zip", "images_evaluation.zip", str(folder)):
        assert part in message
    assert cache_files(folder) == []


def test_download_false_and_read_only_folder(data_dir, tmp_path):
    with pytest.raises(DataNotFoundError, match="download=False"):
        load(data_dir=tmp_path / "fresh", download=False)
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    try:
        with pytest.raises(DataNotFoundError, match="read-only"):
            load(data_dir=locked)
    finally:
        locked.chmod(0o755)
    assert cache_files(locked) == []


# --- splits ---------------------------------------------------------------------------------


def test_maml_split_sizes_disjoint_and_seeded(data_dir):
    arrays = load()
    indices = omniglot_split_indices(arrays, "maml", num_train=8, num_val=2)
    assert {k: len(v) for k, v in indices.items()} == {"train": 6, "val": 2, "test": 3}
    together = np.concatenate(list(indices.values()))
    assert sorted(together.tolist()) == list(range(N_CHARACTERS))
    again = omniglot_split_indices(arrays, "maml", num_train=8, num_val=2)
    assert all(np.array_equal(indices[k], again[k]) for k in indices)
    others = [
        omniglot_split_indices(arrays, "maml", seed=s, num_train=8, num_val=2) for s in range(2, 6)
    ]
    assert any(not np.array_equal(o["train"], indices["train"]) for o in others)


def test_maml_split_follows_the_reference_procedure(data_dir):
    import random

    arrays = load()
    paths = sorted(f"{a}/{c}" for a, c in zip(arrays.alphabet, arrays.character, strict=True))
    random.Random(1).shuffle(paths)
    indices = omniglot_split_indices(arrays, "maml", num_train=8, num_val=2)
    named = {
        k: [f"{arrays.alphabet[i]}/{arrays.character[i]}" for i in v] for k, v in indices.items()
    }
    assert named == {"train": paths[:6], "val": paths[6:8], "test": paths[8:]}


def test_maml_splits_are_rotated_classes(data_dir):
    arrays = load()
    indices = omniglot_split_indices(arrays, "maml", num_train=8, num_val=2)
    splits = omniglot_splits(arrays, "maml", num_train=8, num_val=2)
    for name, idx in indices.items():
        classes = splits[name]
        assert classes.shape == (4 * len(idx), 20, 28, 28, 1) and classes.dtype == np.float32
        for i, character in enumerate(idx):
            for k in range(4):
                np.testing.assert_array_equal(
                    classes[4 * i + k, ..., 0], np.rot90(arrays.images[character], k, axes=(1, 2))
                )
    # The four rotations really differ (drawings are not rotation-symmetric).
    assert not np.array_equal(splits["train"][0], splits["train"][1])


def test_maml_split_needs_enough_characters(data_dir):
    with pytest.raises(ValueError, match="num_train=1200 with 11 characters"):
        omniglot_splits(load())


def test_alphabets_protocol(data_dir):
    arrays = load()
    splits = omniglot_splits(arrays, "alphabets")
    assert set(splits) == {"train", "test"}
    assert splits["train"].shape == (N_BACKGROUND, 20, 28, 28, 1)  # no rotations by default
    np.testing.assert_array_equal(splits["test"][..., 0], arrays.images[N_BACKGROUND:])
    rotated = omniglot_splits(arrays, "alphabets", rotations=True)
    assert rotated["test"].shape[0] == 4 * N_EVALUATION


def test_alphabets_protocol_holds_out_whole_alphabets(data_dir):
    arrays = load()
    indices = omniglot_split_indices(arrays, "alphabets", val_alphabets=["Beta"])
    assert set(arrays.alphabet[indices["val"]].tolist()) == {"Beta"}
    assert len(indices["val"]) == 3 and len(indices["train"]) == 4
    assert "Beta" not in arrays.alphabet[indices["train"]]
    counted = omniglot_split_indices(arrays, "alphabets", val_alphabets=1)
    held_out = set(arrays.alphabet[counted["val"]].tolist())
    assert len(held_out) == 1 and held_out < set(LAYOUT["background"])
    assert not held_out & set(arrays.alphabet[counted["train"]].tolist())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"protocol": "vinyals"}, "protocol"),
        ({"protocol": "alphabets", "val_alphabets": ["Delta"]}, "unknown: \\['Delta'\\]"),
        ({"protocol": "alphabets", "val_alphabets": 3}, "between 0 and 2"),
        ({"protocol": "maml", "num_train": 8, "num_val": 8}, "num_val < num_train"),
    ],
)
def test_bad_split_arguments(data_dir, kwargs, match):
    with pytest.raises(ValueError, match=match):
        omniglot_split_indices(load(), **kwargs)


def test_alphabets_protocol_needs_both_sets(data_dir):
    with pytest.raises(ValueError, match="background and evaluation"):
        omniglot_splits(load(subsets="background"), "alphabets")


# --- the real data set ----------------------------------------------------------------------


@pytest.mark.data
def test_real_omniglot(tmp_path):
    root = os.environ.get("METAJAX_DATA_DIR")
    if not root:
        pytest.skip("METAJAX_DATA_DIR is not set (e.g. METAJAX_DATA_DIR=../shared/data)")
    folder = Path(root) / "omniglot"
    needed = [omniglot.FILES[s].filename for s in ("background", "evaluation")]
    if not all((folder / name).is_file() for name in needed):
        pytest.skip(f"{folder} lacks {needed}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ModifiedArchiveWarning)  # the shared copy is repacked
        arrays = load(data_dir=root, cache_dir=tmp_path, download=False)
    assert arrays.images.shape == (964 + 659, 20, 28, 28)
    assert (arrays.subset == "background").sum() == 964
    assert len(set(arrays.alphabet[arrays.subset == "background"].tolist())) == 30
    assert len(set(arrays.alphabet[arrays.subset == "evaluation"].tolist())) == 20
    assert set(np.unique(arrays.images).tolist()) == {0.0, 1.0}
    assert 0.02 < arrays.images.mean() < 0.2  # thin strokes on white paper
    sizes = {k: len(v) for k, v in omniglot_split_indices(arrays, "maml").items()}
    assert sizes == {"train": 1100, "val": 100, "test": 423}
    splits = omniglot_splits(arrays, "maml")
    assert {k: v.shape[0] for k, v in splits.items()} == {"train": 4400, "val": 400, "test": 1692}
    assert splits["test"].shape[1:] == (20, 28, 28, 1)
