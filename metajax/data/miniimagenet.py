"""mini-ImageNet (Vinyals et al., 2016) with the Ravi & Larochelle (2017) class split.

mini-ImageNet is 100 ImageNet classes with 600 colour images each, downsampled to 84x84.
Vinyals et al. (2016, "Matching Networks for One Shot Learning") introduced it; the split used
by MAML and most later work is the one of Ravi & Larochelle (2017, "Optimization as a Model for
Few-Shot Learning"): 64 train, 16 val and 20 test classes, disjoint.

metajax never downloads mini-ImageNet: its images are ImageNet (ILSVRC-2012) images, available
only under ImageNet's terms of access. Put one of the two common distributions under
``<data_dir>/miniimagenet/`` (``data_dir`` from :func:`metajax.data.sources.resolve_data_dir`,
i.e. the argument, else ``$METAJAX_DATA_DIR``, else ``~/.cache/metajax``):

(a) folder: ``images/<filename>`` plus ``train.csv``, ``val.csv``, ``test.csv``, each with
    header ``filename,label`` (``label`` is the WordNet id, e.g. ``n01532829``; ``filename`` is
    e.g. ``n0153282900000005.jpg``; a name without suffix gets ``.jpg``). Images are converted
    to RGB; an image that is not 84x84 is resized to 84x84 with PIL's LANCZOS filter, the filter
    of Ravi & Larochelle's preprocessing script, ignoring the aspect ratio as that script does.
    The released images are usually already 84x84 and are then used unchanged. Decoding 60,000
    JPEGs takes minutes, so the decoded arrays are cached as ``.npz`` (see below).
(b) pickle caches: ``mini-imagenet-cache-{train,val,test}.pkl``, each a dict
    ``{"image_data": uint8 [N, 84, 84, 3], "class_dict": {wnid: [indices into image_data]}}``.
    They are read with a restricted unpickler
    (:func:`~metajax.data.sources.restricted_pickle_load`) that can build numpy arrays and
    plain containers and nothing else, so a tampered file cannot run code.

Result layout: per split a ``uint8`` array ``[classes, 600, 84, 84, 3]`` (HWC, RGB), the layout
:mod:`metajax.data.episodes` samples from. Classes are sorted by WordNet id, so class ``i`` of a
split is the same whichever distribution it came from; within a class, images keep the order
of the CSV rows (folder) or of the ``class_dict`` index list (pickle).

Folder cache: one ``miniimagenet-<split>-<key>.npz`` per split (arrays ``images`` and
``wnids``), written through :func:`metajax.data.sources.atomic_save_npz` so a crash never
leaves half a file. ``<key>`` is a SHA-256 of the cache format version, the target size and
filter, the split's CSV bytes, and the name and byte size of every image it lists: editing the
CSV or replacing an image with one of a different size makes a new cache. An image rewritten
to the very same byte size is not detected; delete the cache directory to force a re-decode.
The cache directory defaults to ``<data_dir>/miniimagenet/cache``; pass ``cache_dir`` where the
data directory is read-only.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image

from metajax.data.sources import (
    DataFormatError,
    read_npz_cache,
    require_data_dir,
    restricted_pickle_load,
    write_npz_cache,
)

SPLITS: tuple[str, ...] = ("train", "val", "test")
#: Classes per split in the Ravi & Larochelle (2017) split.
NUM_CLASSES: dict[str, int] = {"train": 64, "val": 16, "test": 20}
IMAGES_PER_CLASS = 600
IMAGE_SIZE = 84
SUBDIR = "miniimagenet"
PICKLE_NAME = "mini-imagenet-cache-{split}.pkl"
# Bump when the cache content or layout changes, so old caches are not read as new ones.
_CACHE_VERSION = "1"
_RESAMPLE_NAME = "LANCZOS"
# A cache is a dict of a dict of lists: 3 levels. Deeper nesting is refused before any path
# string is built for it (a million-deep list is a few megabytes of pickle).
_MAX_DEPTH = 16

_NO_DOWNLOAD = (
    "metajax does not download mini-ImageNet: its images come from ImageNet (ILSVRC-2012) and "
    "may only be obtained under ImageNet's terms of access (https://image-net.org). Get them "
    "there, build the Ravi & Larochelle (2017) split, and place the files as described."
)


class MiniImageNetFormatError(DataFormatError):
    """A mini-ImageNet file (pickle cache, split CSV) holds something else than expected.

    A :class:`~metajax.data.sources.DataFormatError`, so a ``ValueError``; the message names
    the file and the problem.
    """


def _short(text: str, limit: int = 40) -> str:
    """``repr(text)``, cut to about ``limit`` characters (keys and names come from files)."""
    shown = repr(text)
    return shown if len(shown) <= limit else shown[: limit - 4] + "...'"


# --------------------------------------------------------------------------------------------
# Restricted unpickling
# --------------------------------------------------------------------------------------------


def _check_plain(obj: Any, where: str) -> None:
    # Iterative walk with a visited set: a pickle can nest deeply or refer to itself.
    stack: list[tuple[Any, str, int]] = [(obj, where, 0)]
    seen: set[int] = set()
    scalar_types = (str, int, float, np.integer, np.floating, np.bool_)
    while stack:
        node, path, depth = stack.pop()
        if isinstance(node, scalar_types):
            continue
        if id(node) in seen:
            continue
        seen.add(id(node))
        if depth > _MAX_DEPTH:
            raise MiniImageNetFormatError(
                f"{path}: nested more than {_MAX_DEPTH} levels deep; a mini-ImageNet cache is a "
                "dict of image_data and a dict of index lists."
            )
        if isinstance(node, np.ndarray):
            if type(node) is not np.ndarray or node.dtype.hasobject:
                raise MiniImageNetFormatError(
                    f"{path}: array of type {type(node).__name__} with dtype {node.dtype} is "
                    "not allowed; mini-ImageNet caches hold plain numeric arrays."
                )
        elif type(node) is dict:
            for key, value in node.items():
                if not isinstance(key, str):
                    raise MiniImageNetFormatError(
                        f"{path}: dict key of type {type(key).__name__} is not a str."
                    )
                stack.append((value, f"{path}[{_short(key)}]", depth + 1))
        elif type(node) in (list, tuple):
            stack.extend((v, f"{path}[{i}]", depth + 1) for i, v in enumerate(node))
        else:
            raise MiniImageNetFormatError(
                f"{path}: object of type {type(node).__name__} is not allowed; only dict, list, "
                "tuple, str, int, float and numpy arrays are."
            )


def validate_cache_structure(obj: Any, where: str = "pickle") -> tuple[np.ndarray, dict]:
    """Check an unpickled mini-ImageNet cache and return ``(image_data, class_dict)``.

    Expects ``{"image_data": uint8 [N, 84, 84, 3], "class_dict": {wnid: indices}}`` where each
    ``indices`` is a list/tuple/1-D array of ints in ``[0, N)`` and no index is used twice.
    Raises :class:`MiniImageNetFormatError` (a ``ValueError``) naming ``where`` and the first
    problem found.
    """
    _check_plain(obj, where)
    if type(obj) is not dict:
        raise MiniImageNetFormatError(f"{where}: expected a dict, got {type(obj).__name__}.")
    expected = {"image_data", "class_dict"}
    if set(obj) != expected:
        got = sorted(_short(k) for k in obj)[:10]
        raise MiniImageNetFormatError(
            f"{where}: expected keys {sorted(expected)}, got [{', '.join(got)}]; this does not "
            "look like a mini-imagenet-cache-*.pkl file."
        )
    data = obj["image_data"]
    want = (IMAGE_SIZE, IMAGE_SIZE, 3)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.shape[1:] != want:
        desc = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data)
        raise MiniImageNetFormatError(
            f"{where}: image_data must be uint8 [N, 84, 84, 3], got {desc}."
        )
    class_dict = obj["class_dict"]
    if type(class_dict) is not dict or not class_dict:
        raise MiniImageNetFormatError(
            f"{where}: class_dict must be a non-empty dict of wnid -> indices."
        )
    n = data.shape[0]
    checked: dict[str, np.ndarray] = {}
    for wnid, idx in class_dict.items():
        ints = type(idx) in (list, tuple) and all(
            isinstance(i, int | np.integer) and not isinstance(i, bool | np.bool_) for i in idx
        )
        try:
            arr = np.asarray(idx, dtype=np.int64) if ints else idx
        except OverflowError:  # a Python int beyond int64: certainly not an index
            arr = None
        if (
            not isinstance(arr, np.ndarray)
            or arr.ndim != 1
            or arr.size == 0
            or not np.issubdtype(arr.dtype, np.integer)
        ):
            desc = (
                f"{arr.dtype} {arr.shape}"
                if isinstance(arr, np.ndarray)
                else f"a {type(idx).__name__}" + (f" of {len(idx)}" if ints else "")
            )
            raise MiniImageNetFormatError(
                f"{where}: class_dict[{_short(wnid)}] must be a non-empty list of ints, got "
                f"{desc}."
            )
        if arr.min() < 0 or arr.max() >= n:
            raise MiniImageNetFormatError(
                f"{where}: class_dict[{_short(wnid)}] has indices in [{arr.min()}, "
                f"{arr.max()}], outside image_data's [0, {n})."
            )
        checked[wnid] = arr.astype(np.int64)
    every = np.concatenate(list(checked.values()))
    if np.unique(every).size != every.size:
        raise MiniImageNetFormatError(f"{where}: class_dict uses some image index more than once.")
    return data, checked


# --------------------------------------------------------------------------------------------
# Checks shared by both sources
# --------------------------------------------------------------------------------------------


def _stack_classes(
    per_class: dict[str, int], split: str, where: str, expect_counts: bool
) -> tuple[list[str], int]:
    """Sorted wnids and the common per-class count, after checking the counts."""
    wnids = sorted(per_class)
    if expect_counts and len(wnids) != NUM_CLASSES[split]:
        raise MiniImageNetFormatError(
            f"{where}: {split} has {len(wnids)} classes, the Ravi & Larochelle split has "
            f"{NUM_CLASSES[split]}. Use the standard split files, or pass expect_counts=False "
            "for a custom subset."
        )
    counts = {per_class[w] for w in wnids}
    if expect_counts and counts != {IMAGES_PER_CLASS}:
        bad = [w for w in wnids if per_class[w] != IMAGES_PER_CLASS][:5]
        raise MiniImageNetFormatError(
            f"{where}: every class must have {IMAGES_PER_CLASS} images; e.g. "
            + ", ".join(f"{w} has {per_class[w]}" for w in bad)
            + ". Pass expect_counts=False for a custom subset."
        )
    if len(counts) != 1:
        raise MiniImageNetFormatError(
            f"{where}: classes of {split} have different image counts {sorted(counts)}; the "
            "[classes, per_class, ...] array needs the same count for every class."
        )
    return wnids, counts.pop()


def _not_found(root: Path, missing: Sequence[str]) -> FileNotFoundError:
    files = "\n  ".join(missing)
    return FileNotFoundError(
        f"mini-ImageNet not found under {root}. Missing:\n  {files}\n"
        f"Put either (a) images/ plus train.csv, val.csv, test.csv (header 'filename,label'), "
        f"or (b) {PICKLE_NAME.format(split='{train,val,test}')} in {root} (set the directory "
        f"with data_dir= or $METAJAX_DATA_DIR). {_NO_DOWNLOAD}"
    )


# --------------------------------------------------------------------------------------------
# Pickle source
# --------------------------------------------------------------------------------------------


def _load_pickle_split(
    root: Path, split: str, expect_counts: bool
) -> tuple[np.ndarray, tuple[str, ...]]:
    path = root / PICKLE_NAME.format(split=split)
    if not path.is_file():
        raise _not_found(root, [str(path)])
    with open(path, "rb") as f:
        # ForbiddenPickleError (tampered) or PickleFormatError (truncated), naming the file.
        obj = restricted_pickle_load(f, path)
    data, class_dict = validate_cache_structure(obj, str(path))
    wnids, _ = _stack_classes(
        {w: len(i) for w, i in class_dict.items()}, split, str(path), expect_counts
    )
    order = np.concatenate([class_dict[w] for w in wnids])
    shape = (len(wnids), -1, IMAGE_SIZE, IMAGE_SIZE, 3)
    if order.size == data.shape[0] and np.array_equal(order, np.arange(order.size)):
        # The common caches store classes in contiguous blocks: reshape, don't copy 800 MB.
        images = data.reshape(shape)
    else:
        images = data[order].reshape(shape)
    return images, tuple(wnids)


# --------------------------------------------------------------------------------------------
# Folder source
# --------------------------------------------------------------------------------------------


def _read_split_csv(path: Path) -> tuple[bytes, list[tuple[str, str]]]:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise MiniImageNetFormatError(
            f"{path}: not UTF-8 text ({e}); is this a split CSV (header 'filename,label')?"
        ) from None
    try:
        return raw, _split_rows(path, csv.reader(io.StringIO(text)))
    except csv.Error as e:  # e.g. a field over csv's size limit
        raise MiniImageNetFormatError(f"{path}: not a readable CSV file ({e}).") from None


def _split_rows(path: Path, reader: Any) -> list[tuple[str, str]]:
    header = next(reader, None)
    if header is None or [h.strip() for h in header] != ["filename", "label"]:
        shown = _short(",".join(header)) if header is not None else "nothing"
        raise MiniImageNetFormatError(f"{path}: header must be 'filename,label', got {shown}.")
    rows: list[tuple[str, str]] = []
    seen: set[str] = set()
    for lineno, row in enumerate(reader, start=2):
        if not row:
            continue
        if len(row) != 2 or not row[0].strip() or not row[1].strip():
            raise MiniImageNetFormatError(
                f"{path}:{lineno}: expected 'filename,label', got {_short(','.join(row), 80)}."
            )
        name, label = row[0].strip(), row[1].strip()
        if Path(name).name != name or name in (".", "..") or "\0" in name:
            # A path in the CSV could point outside images/; the split files never do this.
            raise MiniImageNetFormatError(
                f"{path}:{lineno}: filename {_short(name, 80)} must be a plain file name."
            )
        if name in seen:
            raise MiniImageNetFormatError(f"{path}:{lineno}: {_short(name, 80)} is listed twice.")
        seen.add(name)
        rows.append((name, label))
    if not rows:
        raise MiniImageNetFormatError(f"{path}: no rows after the header.")
    return rows


def _image_path(images_dir: Path, name: str) -> Path:
    path = images_dir / name
    if not path.suffix and not path.exists():
        path = images_dir / f"{name}.jpg"
    return path


def _cache_key(split: str, csv_bytes: bytes, paths: Sequence[Path]) -> str:
    h = hashlib.sha256()
    h.update(f"metajax-miniimagenet-v{_CACHE_VERSION}\0{split}\0{IMAGE_SIZE}\0".encode())
    h.update(_RESAMPLE_NAME.encode() + b"\0")
    h.update(hashlib.sha256(csv_bytes).digest())
    for p in paths:
        h.update(f"{p.name}\0{p.stat().st_size}\0".encode())
    return h.hexdigest()[:16]


def _decode_image(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        # ImageNet has some greyscale and CMYK JPEGs; the network expects 3 RGB channels.
        im = im.convert("RGB")
        if im.size != (IMAGE_SIZE, IMAGE_SIZE):
            im = im.resize((IMAGE_SIZE, IMAGE_SIZE), resample=Image.Resampling.LANCZOS)
        return np.asarray(im, dtype=np.uint8)


def _read_cache(path: Path, n_classes: int) -> tuple[np.ndarray, tuple[str, ...]] | None:
    """A folder cache's ``(images, wnids)``, or ``None`` (with a warning) if it is unusable."""

    def usable(arrays: dict[str, np.ndarray]) -> bool:
        images, wnids = arrays["images"], arrays["wnids"]
        return (
            images.dtype == np.uint8
            and images.ndim == 5
            and images.shape[0] == n_classes
            and images.shape[2:] == (IMAGE_SIZE, IMAGE_SIZE, 3)
            and wnids.shape == (n_classes,)
            and wnids.dtype.kind == "U"
        )

    arrays = read_npz_cache([path.parent], path.name, ("images", "wnids"), usable)
    if arrays is None:
        return None
    return arrays["images"], tuple(str(w) for w in arrays["wnids"])


class _FolderPlan(NamedTuple):
    split: str
    wnids: tuple[str, ...]
    paths: list[list[Path]]  # [class][image], classes in wnid order, images in CSV order
    cache_path: Path


def _plan_folder_split(root: Path, split: str, expect_counts: bool, cache_dir: Path) -> _FolderPlan:
    """Read and check a split's CSV and that every image exists; decode nothing."""
    csv_path = root / f"{split}.csv"
    images_dir = root / "images"
    missing = [str(p) for p in (csv_path, images_dir) if not p.exists()]
    if missing:
        raise _not_found(root, missing)
    csv_bytes, rows = _read_split_csv(csv_path)
    by_class: dict[str, list[str]] = {}
    for name, label in rows:
        by_class.setdefault(label, []).append(name)
    wnids, _ = _stack_classes(
        {w: len(v) for w, v in by_class.items()}, split, str(csv_path), expect_counts
    )
    paths = [[_image_path(images_dir, n) for n in by_class[w]] for w in wnids]
    flat = [p for ps in paths for p in ps]
    absent = [str(p) for p in flat if not p.is_file()]
    if absent:
        more = [f"... and {len(absent) - 5} more"] if len(absent) > 5 else []
        raise _not_found(root, absent[:5] + more)
    cache_path = cache_dir / f"miniimagenet-{split}-{_cache_key(split, csv_bytes, flat)}.npz"
    return _FolderPlan(split, tuple(wnids), paths, cache_path)


def _load_folder_split(plan: _FolderPlan, cache: bool) -> tuple[np.ndarray, tuple[str, ...]]:
    per_class = len(plan.paths[0])
    if cache and plan.cache_path.is_file():
        hit = _read_cache(plan.cache_path, len(plan.wnids))
        if hit is not None and hit[1] == plan.wnids and hit[0].shape[1] == per_class:
            return hit

    images = np.empty((len(plan.wnids), per_class, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    for c, class_paths in enumerate(plan.paths):
        for i, p in enumerate(class_paths):
            try:
                images[c, i] = _decode_image(p)
            except Exception as err:  # PIL's errors, DecompressionBombError included
                raise MiniImageNetFormatError(
                    f"{p}: cannot decode image ({type(err).__name__}: {err}); re-copy the file."
                ) from err
    if cache:
        write_npz_cache([plan.cache_path.parent], plan.cache_path.name, "mini-ImageNet",
                        images=images, wnids=np.array(plan.wnids, dtype=str))
    return images, plan.wnids


# --------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------


def _pickles_present(root: Path, splits: Sequence[str]) -> bool:
    return all((root / PICKLE_NAME.format(split=s)).is_file() for s in splits)


def _folder_present(root: Path, splits: Sequence[str]) -> bool:
    return (root / "images").is_dir() and all((root / f"{s}.csv").is_file() for s in splits)


def load_miniimagenet(
    data_dir: str | os.PathLike | None = None,
    *,
    source: str = "auto",
    splits: Sequence[str] = SPLITS,
    cache: bool = True,
    cache_dir: str | os.PathLike | None = None,
    expect_counts: bool = True,
) -> tuple[dict[str, np.ndarray], dict[str, tuple[str, ...]]]:
    """Load mini-ImageNet (Vinyals et al., 2016) in the Ravi & Larochelle (2017) split.

    Args:
      data_dir: data root; files are read from ``<data_dir>/miniimagenet/``. ``None`` uses
        :func:`metajax.data.sources.resolve_data_dir` (``$METAJAX_DATA_DIR`` or a user cache).
      source: ``"folder"`` (images/ + split CSVs), ``"pickle"`` (mini-imagenet-cache-*.pkl)
        or ``"auto"``: the pickles when all requested ones exist (fastest), else the folder.
      splits: which of ``"train"``, ``"val"``, ``"test"`` to load.
      cache: folder source only: read and write decoded arrays as ``.npz`` (see module doc).
      cache_dir: where the ``.npz`` caches live; default ``<data_dir>/miniimagenet/cache``.
      expect_counts: check 64/16/20 classes and 600 images per class. Set ``False`` for
        small fixtures or subsets; every class of a split must still have the same count.

    Returns:
      ``(images, wnids)``: ``images[split]`` is ``uint8 [classes, per_class, 84, 84, 3]``
      (``[64|16|20, 600, 84, 84, 3]`` for the real data), RGB, classes sorted by WordNet id;
      ``wnids[split]`` is the tuple of those ids, so ``images[split][i]`` is class
      ``wnids[split][i]``.

    Raises:
      DataDirNotFoundError: the ``data_dir`` (or ``$METAJAX_DATA_DIR``) given does not exist.
      FileNotFoundError: files missing; the message names them and where they go. Nothing is
        downloaded, since the images are ImageNet's and come under its terms of access.
      ForbiddenPickleError: a pickle refers to anything but numpy arrays (e.g. a tampered
        file); nothing from it is executed.
      PickleFormatError: a truncated or malformed pickle. Both pickle errors are
        ``pickle.UnpicklingError`` and :class:`~metajax.data.sources.DataFormatError`.
      MiniImageNetFormatError: wrong structure, shapes, counts, a bad CSV, or an
        undecodable image.
      ValueError: bad arguments. Every error above except bad arguments names the file.
    """
    if source not in ("auto", "folder", "pickle"):
        raise ValueError(f"source must be 'auto', 'folder' or 'pickle', got {source!r}.")
    if isinstance(splits, str):
        raise TypeError(f"splits must be a sequence of split names, e.g. ({splits!r},).")
    bad = [s for s in splits if s not in SPLITS]
    if bad or not splits:
        raise ValueError(f"splits must be a non-empty subset of {SPLITS}, got {tuple(splits)}.")
    splits = tuple(dict.fromkeys(splits))
    root = require_data_dir(data_dir) / SUBDIR
    cache_root = Path(cache_dir).expanduser() if cache_dir is not None else root / "cache"

    if source == "auto":
        if _pickles_present(root, splits):
            source = "pickle"
        elif _folder_present(root, splits):
            source = "folder"
        else:
            missing = [str(root / PICKLE_NAME.format(split=s)) for s in splits]
            missing += [str(root / "images") + "/"] + [str(root / f"{s}.csv") for s in splits]
            raise _not_found(root, [m for m in missing if not Path(m).exists()])

    images: dict[str, np.ndarray] = {}
    wnids: dict[str, tuple[str, ...]] = {}
    if source == "pickle":
        for split in splits:
            images[split], wnids[split] = _load_pickle_split(root, split, expect_counts)
    else:
        # Check every split's CSV and files before decoding any: a missing file or a bad
        # count fails in seconds, not after minutes of JPEG decoding.
        plans = [_plan_folder_split(root, s, expect_counts, cache_root) for s in splits]
        for plan in plans:
            images[plan.split], wnids[plan.split] = _load_folder_split(plan, cache)
    # The split's purpose is held-out classes; an overlap means mixed-up split files.
    for i, a in enumerate(splits):
        for b in splits[i + 1 :]:
            shared = sorted(set(wnids[a]) & set(wnids[b]))
            if shared:
                names = ", ".join(_short(w) for w in shared[:5])
                raise MiniImageNetFormatError(
                    f"{root}: classes {names} appear in both {a} and "
                    f"{b}; the Ravi & Larochelle splits are disjoint. Check the split files."
                )
    return images, wnids
