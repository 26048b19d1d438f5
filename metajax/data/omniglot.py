"""Omniglot: 1623 handwritten characters from 50 alphabets, 20 drawings of each.

Data set: Lake, Salakhutdinov and Tenenbaum, "Human-level concept learning through
probabilistic program induction", Science 2015. Splits: Vinyals et al., "Matching Networks
for One Shot Learning", NeurIPS 2016 (1200 training / 423 test characters, rotations by
multiples of 90 degrees as extra classes, after Santoro et al., ICML 2016) and Finn, Abbeel
and Levine, "Model-Agnostic Meta-Learning for Fast Adaptation of Deep Networks", ICML 2017
(the same, with the last 100 training characters held out for validation).

Source files (the authors' ``python/`` folder, :data:`OMNIGLOT_URL`), looked for in
``<data_dir>/omniglot/``::

    images_background.zip         30 alphabets, 964 characters  (the "background" set)
    images_evaluation.zip         20 alphabets, 659 characters  (the "evaluation" set)
    images_background_small1.zip   5 alphabets, 136 characters  (subsets of background)
    images_background_small2.zip   5 alphabets, 156 characters

Inside each: ``images_<subset>/<alphabet>/characterNN/<id>_<drawer>.png``, 105x105 1-bit
PNGs, drawers ``01``-``20``. A file with the authors' sha256 (:data:`FILES`) is trusted; a
file with another sha256 (a repacked archive) is accepted when its contents verify (alphabet
and character counts, 20 images per character, every image 105x105), with a warning naming
the file and its checksum.

Preprocessing (once; the result is cached): each PNG is decoded and resized to
``image_size`` square and inverted so that ink is 1 and paper 0, as in the MAML reference
code, which divides by 255 and takes ``1 - image``. Two resampling modes:

* ``"maml"`` (default) reproduces the reference pixels. Its resize script calls
  ``Image.resize((28, 28), resample=Image.LANCZOS)`` on the 1-bit PNGs, but Pillow resamples
  1-bit (mode ``"1"``) images with nearest neighbour whatever filter is asked for, so the
  reference images are nearest-neighbour samples and stay binary: values are exactly 0 or 1.
* ``"lanczos"`` converts to 8-bit grey first, so that Lanczos filtering really happens: grey
  levels in [0, 1] (quantised to 1/255, as a resized PNG would be).

The cache is ``omniglot-<subset>-<sha256[:16]>-<size>px-<resample>-v1.npz`` (uint8, ink 255),
keyed by the source file's own checksum, written atomically to the first writable folder of
:func:`metajax.data.sources.cache_dir_candidates` (``<data_dir>/omniglot/cache``, else the
user cache ``~/.cache/metajax/omniglot/cache``; ``cache_dir=`` or ``$METAJAX_CACHE_DIR``
override both). A later call reads the cache and does not open the zip (it only hashes it).
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import sys
import warnings
import zipfile
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

from metajax.data.sources import (
    DataFormatError,
    cache_dir_candidates,
    ensure_files,
    read_npz_cache,
    require_data_dir,
    resolve_url,
    sha256_file,
    write_npz_cache,
)

OMNIGLOT_URL = "https://raw.githubusercontent.com/brendenlake/omniglot/master/python/"
URL_ENV = "METAJAX_OMNIGLOT_URL"
DRAWINGS = 20
SOURCE_SIZE = 105
RESAMPLES = ("maml", "lanczos")
SPLIT_PROTOCOLS = ("maml", "alphabets")
_CACHE_VERSION = 1
#: Largest archive read (the authors' largest is 9.5 MB); a bigger file is refused unread.
MAX_ARCHIVE_BYTES = 1 << 30
#: Largest decompressed size of one PNG member (the authors' are under 600 bytes); a member
#: declaring more is refused before it is decompressed.
MAX_MEMBER_BYTES = 1 << 20


class OmniglotFile(NamedTuple):
    """One source archive: its name, the authors' sha256 and size, and what it holds."""

    filename: str
    sha256: str
    size: int
    alphabets: int
    characters: int


# Keyed by subset name; the archive's top folder is ``images_<subset>/``.
FILES: dict[str, OmniglotFile] = {
    "background": OmniglotFile(
        "images_background.zip",
        "ad41ab679c8b5d90b271ef46be6987cc81211774a695c29dcc5367b2b26ee640",
        9464212,
        30,
        964,
    ),
    "evaluation": OmniglotFile(
        "images_evaluation.zip",
        "1f61a8f3366785b057fc117d9228e78a16e3d976c8953b2a10fcc74cf0609cee",
        6462886,
        20,
        659,
    ),
    "background_small1": OmniglotFile(
        "images_background_small1.zip",
        "f38eb80f801274ac2b4dff5b24289016bfaba4a7d5bb50deebf27104ad6cb8a4",
        1319022,
        5,
        136,
    ),
    "background_small2": OmniglotFile(
        "images_background_small2.zip",
        "3ccaa407515a8778e5d0861875af38b17e418f301ad5bb3b5a6b65d901a41c7f",
        1580917,
        5,
        156,
    ),
}


class OmniglotArrays(NamedTuple):
    """Omniglot characters as arrays, one row per character.

    Attributes:
      images: ``[characters, 20, size, size]`` float32 in [0, 1], ink 1 and paper 0; the 20
        drawings in drawer order ``01``-``20``.
      alphabet: ``[characters]`` alphabet names, e.g. ``"Latin"``.
      character: ``[characters]`` folder names within the alphabet, e.g. ``"character01"``.
      subset: ``[characters]`` the source each came from, e.g. ``"background"``.
      sha256: subset name -> sha256 of the archive actually read (empty for ``source="tfds"``).

    Rows run subset by subset in the order asked for (by default background, then
    evaluation), each sorted by ``<alphabet>/<character>`` path.
    """

    images: np.ndarray
    alphabet: np.ndarray
    character: np.ndarray
    subset: np.ndarray
    sha256: dict[str, str]


class OmniglotFormatError(DataFormatError):
    """An Omniglot archive is corrupt, truncated or holds something else than expected.

    A :class:`~metajax.data.sources.DataFormatError`, so a ``ValueError``; the message names
    the file (and member), its checksum and the original's.
    """


class ModifiedArchiveWarning(UserWarning):
    """An archive's checksum differs from the authors', but its contents verified."""


def load_omniglot(
    data_dir: str | os.PathLike | None = None,
    *,
    subsets: Sequence[str] = ("background", "evaluation"),
    image_size: int = 28,
    resample: str = "maml",
    download: bool = True,
    url: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    source: str = "zip",
    progress: bool = True,
) -> OmniglotArrays:
    """Omniglot (Lake et al. 2015) as ``[characters, 20, image_size, image_size]`` arrays.

    Args:
      data_dir: the data directory (:func:`metajax.data.sources.resolve_data_dir`: this,
        else ``$METAJAX_DATA_DIR``, else ``~/.cache/metajax``); the archives are looked for
        in ``<data_dir>/omniglot/``. It may be read-only.
      subsets: which archives, from :data:`FILES`; ``"background_small1"`` and
        ``"background_small2"`` are subsets of ``"background"``, so not combined with it.
      image_size: side of the square output images (28 in Finn et al. 2017).
      resample: ``"maml"`` (binary images, exactly as the MAML reference) or ``"lanczos"``
        (grey levels); see the module docstring.
      download: fetch missing archives from ``url`` into ``<data_dir>/omniglot/``.
      url: base URL of the archives; default ``$METAJAX_OMNIGLOT_URL``, else
        :data:`OMNIGLOT_URL`.
      cache_dir: where the preprocessed ``.npz`` cache lives (see the module docstring).
      source: ``"zip"`` (the archives) or ``"tfds"`` (TensorFlow Datasets' ``omniglot``;
        needs ``pip install 'metajax[tfds]'``; not cached, and the drawings of a character
        come in TFDS's order rather than drawer order).
      progress: report downloads and preprocessing on stderr.

    Returns:
      :class:`OmniglotArrays`; ``images`` is float32 ``[characters, 20, size, size]``.

    Raises:
      DataDirNotFoundError: the ``data_dir`` (or ``$METAJAX_DATA_DIR``) given does not exist;
        nothing is created.
      DataNotFoundError: archives missing and not downloadable; names files and folder.
      ChecksumError: a download's checksum differs from the authors'.
      OmniglotFormatError: an archive is corrupt or has the wrong contents; nothing is cached.
        An unreadable or mismatching cache is not an error: it is ignored with a warning
        naming it, and rebuilt.
    """
    subsets = _check_subsets(subsets)
    if not isinstance(image_size, int | np.integer) or image_size < 1:
        raise ValueError(f"image_size={image_size!r}: give a positive int, e.g. 28")
    if resample not in RESAMPLES:
        raise ValueError(f"resample={resample!r}: use one of {RESAMPLES}")
    if source == "tfds":
        return _load_tfds(subsets, int(image_size), resample, download)
    if source != "zip":
        raise ValueError(f"source={source!r}: use 'zip' (the archives) or 'tfds'")

    folder = require_data_dir(data_dir) / "omniglot"
    base_url = resolve_url(url, URL_ENV, OMNIGLOT_URL)
    ensure_files(folder, [FILES[s] for s in subsets], base_url, download=download,
                 progress=progress)
    caches = cache_dir_candidates("omniglot", data_dir, cache_dir)
    parts, sha256 = [], {}
    # A plain loop, not a comprehension, keeps warnings' stacklevel pointing at our caller.
    for s in subsets:
        *arrays, sha256[s] = _load_subset(
            folder / FILES[s].filename, s, int(image_size), resample, caches, progress
        )
        parts.append(arrays)
    return _assemble(subsets, parts, sha256)


def _assemble(subsets: tuple[str, ...], parts: list[tuple], sha256: dict[str, str]):
    """Concatenate per-subset (uint8 ink images, alphabets, characters) into OmniglotArrays."""
    return OmniglotArrays(
        # Division, not multiplication by 1/255, so that 255 maps to exactly 1.0.
        images=np.concatenate([p[0] for p in parts]).astype(np.float32) / np.float32(255),
        alphabet=np.concatenate([p[1] for p in parts]),
        character=np.concatenate([p[2] for p in parts]),
        subset=np.concatenate([np.full(len(p[1]), s) for p, s in zip(parts, subsets, strict=True)]),
        sha256=sha256,
    )


def omniglot_split_indices(
    arrays: OmniglotArrays,
    protocol: str = "maml",
    *,
    seed: int = 1,
    num_train: int = 1200,
    num_val: int = 100,
    val_alphabets: int | Sequence[str] = 0,
) -> dict[str, np.ndarray]:
    """Which characters (row indices into ``arrays``) go to which split.

    ``protocol="maml"`` (Finn et al. 2017, after Vinyals et al. 2016): all characters are
    pooled in ``<alphabet>/<character>`` path order (the order of the reference's merged
    ``omniglot_resized/`` folder when listed sorted), shuffled by ``random.Random(seed)``
    (the reference calls ``random.seed(1)``; ``random.shuffle``); the first ``num_train``
    are for meta-training, of which the last ``num_val`` (shuffled positions 1100-1199 by
    default) are held out for validation; the rest (423 of 1623) are the test set. The
    reference listed folders with ``os.listdir``, whose order depends on the file system,
    so its exact split cannot be recovered; this one is fixed and documented instead.

    ``protocol="alphabets"`` (Lake et al. 2015): background characters (every subset but
    ``"evaluation"``) for training, evaluation characters for test. ``val_alphabets`` holds
    whole background alphabets out for validation: a count (chosen by
    ``random.Random(seed)`` from the sorted names) or a list of names; 0 gives no ``"val"``.

    Returns:
      ``{"train", "val", "test"}`` -> int64 ``[n]`` row indices (``"val"`` only when held out).
    """
    if protocol == "maml":
        total = len(arrays.alphabet)
        if not 0 <= num_val < num_train < total:
            raise ValueError(
                f"protocol='maml' needs 0 <= num_val < num_train < characters; got "
                f"num_val={num_val}, num_train={num_train} with {total} characters loaded "
                "(the reference uses 1200 and 100 with all 1623: load background and "
                "evaluation, or pass smaller numbers)"
            )
        paths = [f"{a}/{c}" for a, c in zip(arrays.alphabet, arrays.character, strict=True)]
        order = sorted(range(total), key=paths.__getitem__)
        random.Random(seed).shuffle(order)
        parts = {
            "train": order[: num_train - num_val],
            "val": order[num_train - num_val : num_train],
            "test": order[num_train:],
        }
    elif protocol == "alphabets":
        is_test = arrays.subset == "evaluation"
        if not is_test.any() or is_test.all():
            raise ValueError(
                "protocol='alphabets' needs background and evaluation characters; loaded "
                f"subsets {sorted(set(arrays.subset.tolist()))}"
            )
        background = sorted(set(arrays.alphabet[~is_test].tolist()))
        held_out = _pick_alphabets(val_alphabets, background, seed)
        is_val = ~is_test & np.isin(arrays.alphabet, held_out)
        parts = {"train": np.flatnonzero(~is_test & ~is_val), "test": np.flatnonzero(is_test)}
        if held_out:
            parts["val"] = np.flatnonzero(is_val)
    else:
        raise ValueError(f"protocol={protocol!r}: use one of {SPLIT_PROTOCOLS}")
    return {name: np.asarray(idx, dtype=np.int64) for name, idx in parts.items()}


def omniglot_splits(
    arrays: OmniglotArrays,
    protocol: str = "maml",
    *,
    seed: int = 1,
    rotations: bool | None = None,
    num_train: int = 1200,
    num_val: int = 100,
    val_alphabets: int | Sequence[str] = 0,
) -> dict[str, np.ndarray]:
    """Class arrays per split: name -> float32 ``[classes, 20, size, size, 1]``, ink 1.

    Characters are assigned as in :func:`omniglot_split_indices`. With ``rotations`` (default:
    on for ``"maml"``, off for ``"alphabets"``) every character gives four classes, its
    drawings rotated by 0, 90, 180 and 270 degrees counter-clockwise: class ``4 * i + k`` is
    ``np.rot90`` (k times) of character ``i`` of the split. This is the augmentation of
    Santoro et al. 2016 and Vinyals et al. 2016, applied to every split, so the MAML protocol
    gives 4400 / 400 / 1692 classes. The MAML reference code (Finn et al. 2017) instead draws
    a random rotation per character for each task, in training and testing alike; over many
    tasks the classes are the same, except that two rotations of one character never share a
    task there.
    """
    if rotations is None:
        rotations = protocol == "maml"
    indices = omniglot_split_indices(
        arrays,
        protocol,
        seed=seed,
        num_train=num_train,
        num_val=num_val,
        val_alphabets=val_alphabets,
    )
    return {name: _as_classes(arrays.images[idx], rotations) for name, idx in indices.items()}


def _as_classes(images: np.ndarray, rotations: bool) -> np.ndarray:
    """``[n, 20, s, s]`` -> ``[n (x4 with rotations), 20, s, s, 1]`` float32."""
    if rotations:
        turned = [np.rot90(images, k, axes=(2, 3)) for k in range(4)]
        images = np.stack(turned, axis=1).reshape(-1, *images.shape[1:])
    return np.ascontiguousarray(images[..., None], dtype=np.float32)


def _pick_alphabets(val_alphabets: int | Sequence[str], background: list[str], seed: int):
    if isinstance(val_alphabets, int | np.integer):
        if not 0 <= val_alphabets < len(background):
            raise ValueError(
                f"val_alphabets={val_alphabets}: hold out between 0 and {len(background) - 1} "
                f"of the {len(background)} background alphabets"
            )
        return random.Random(seed).sample(background, int(val_alphabets))
    held_out = list(val_alphabets)
    unknown = sorted(set(held_out) - set(background))
    if unknown or len(held_out) >= len(background):
        raise ValueError(
            f"val_alphabets={held_out!r}: give background alphabets, leaving some for "
            f"training; unknown: {unknown}; background alphabets: {background}"
        )
    return held_out


def _check_subsets(subsets: Sequence[str]) -> tuple[str, ...]:
    if isinstance(subsets, str):
        subsets = (subsets,)
    subsets = tuple(subsets)
    unknown = [s for s in subsets if s not in FILES]
    if not subsets or unknown or len(set(subsets)) != len(subsets):
        raise ValueError(f"subsets={subsets!r}: give distinct names from {tuple(FILES)}")
    if "background" in subsets and any(s.startswith("background_small") for s in subsets):
        raise ValueError(
            f"subsets={subsets!r}: the small background sets are subsets of 'background'; "
            "combining them would duplicate characters"
        )
    return subsets


def _load_subset(
    path: Path, subset: str, size: int, resample: str, caches: list[Path], progress: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """(uint8 ink images, alphabets, characters, sha256) of one archive, via the cache."""
    sha = sha256_file(path)
    cached = _read_cache(caches, _cache_name(subset, sha, size, resample), sha, size)
    if cached is not None:
        return (*cached, sha)

    spec = FILES[subset]
    nbytes = path.stat().st_size
    if nbytes > MAX_ARCHIVE_BYTES:
        raise OmniglotFormatError(
            f"{path}: {nbytes} bytes, far more than the original {spec.filename} "
            f"({spec.size} bytes, sha256 {spec.sha256}); replace it with the original from "
            f"{OMNIGLOT_URL}{spec.filename}"
        )
    data = path.read_bytes()
    # Key the cache on the bytes actually decoded, in case the file changed since hashing.
    sha = hashlib.sha256(data).hexdigest()
    if progress:
        print(f"preprocessing {path} (once; cached afterwards)", file=sys.stderr)
    images, alphabet, character = _decode_zip(data, path, subset, sha, size, resample)
    if sha != spec.sha256:
        warnings.warn(
            f"{path} has sha256 {sha}, not the authors' {spec.sha256} for {spec.filename}; "
            f"accepted because its contents verify ({spec.alphabets} alphabets, "
            f"{spec.characters} characters, {DRAWINGS} images of {SOURCE_SIZE}x{SOURCE_SIZE} "
            "each); the cache is keyed on its own checksum",
            ModifiedArchiveWarning,
            stacklevel=3,
        )
    _write_cache(caches, _cache_name(subset, sha, size, resample), images, alphabet, character, sha)
    return images, alphabet, character, sha


def _cache_name(subset: str, sha: str, size: int, resample: str) -> str:
    return f"omniglot-{subset}-{sha[:16]}-{size}px-{resample}-v{_CACHE_VERSION}.npz"


def _read_cache(caches: list[Path], name: str, sha: str, size: int):
    """The first usable cache ``name`` among ``caches``: (images, alphabets, characters).

    One whose arrays do not match its archive (checksum, dtype, shapes) is skipped with a
    warning (:func:`metajax.data.sources.read_npz_cache`); ``None`` when none is usable.
    """

    def usable(f: dict[str, np.ndarray]) -> bool:
        images, alphabet, character, digest = (
            f["images"], f["alphabet"], f["character"], f["sha256"]
        )
        n = images.shape[0] if images.ndim else -1
        return (
            digest.shape == ()
            and digest.dtype.kind == "U"
            and str(digest) == sha
            and images.dtype == np.uint8
            and images.shape == (n, DRAWINGS, size, size)
            and alphabet.shape == character.shape == (n,)
            and alphabet.dtype.kind == character.dtype.kind == "U"
        )

    f = read_npz_cache(caches, name, ("images", "alphabet", "character", "sha256"), usable)
    return None if f is None else (f["images"], f["alphabet"], f["character"])


def _write_cache(caches, name, images, alphabet, character, sha) -> None:
    write_npz_cache(caches, name, "Omniglot", images=images, alphabet=alphabet,
                    character=character, sha256=np.array(sha))


def _decode_zip(data: bytes, path: Path, subset: str, sha: str, size: int, resample: str):
    """Verify and decode one archive: (uint8 ``[c, 20, size, size]`` ink, alphabets, chars)."""
    spec = FILES[subset]

    def fail(problem: str) -> OmniglotFormatError:
        return OmniglotFormatError(
            f"{path}: {problem}. The file has sha256 {sha}; the original {spec.filename} has "
            f"sha256 {spec.sha256} ({spec.size} bytes): replace it with the original from "
            f"{OMNIGLOT_URL}{spec.filename}"
        )

    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        infos = archive.infolist()
    except Exception as e:  # BadZipFile, and whatever else a crafted directory triggers
        raise fail(f"not a readable zip archive, truncated or corrupt ({e})") from e
    top = f"images_{subset}"
    groups: dict[tuple[str, str], list[zipfile.ZipInfo]] = defaultdict(list)
    for info in infos:
        parts = info.filename.split("/")
        # Some zip tools add macOS metadata or hidden files; they are not images.
        if info.is_dir() or parts[0] == "__MACOSX" or parts[-1].startswith("."):
            continue
        if (
            len(parts) != 4
            or parts[0] != top
            or not parts[3].endswith(".png")
            # Nothing is extracted to disk, but "..", "" or "\" as an alphabet or character
            # name can only come from a crafted archive.
            or any(p in ("", ".", "..") or "\\" in p or "\0" in p for p in parts)
        ):
            raise fail(
                f"unexpected member {info.filename[:200]!r}; expected "
                f"{top}/<alphabet>/<character>/<id>_<drawer>.png"
            )
        if info.file_size > MAX_MEMBER_BYTES:
            raise fail(
                f"member {info.filename} declares {info.file_size} bytes, more than any "
                f"Omniglot PNG ({MAX_MEMBER_BYTES} at most)"
            )
        groups[parts[1], parts[2]].append(info)

    def read(info: zipfile.ZipInfo) -> Image.Image:
        try:
            image = Image.open(io.BytesIO(archive.read(info)), formats=("PNG",))
            # The size check comes before decoding: a PNG may declare any size.
            if image.size == (SOURCE_SIZE, SOURCE_SIZE):
                image.load()
                image = image.convert("L")
        except Exception as e:  # BadZipFile (CRC), zlib, PIL's errors, encrypted members, ...
            raise fail(f"member {info.filename} cannot be read ({type(e).__name__}: {e})") from e
        if image.size != (SOURCE_SIZE, SOURCE_SIZE):
            raise fail(
                f"member {info.filename} is {image.size[0]}x{image.size[1]} pixels, "
                f"expected {SOURCE_SIZE}x{SOURCE_SIZE}"
            )
        return image

    ordered = {key: sorted(members, key=lambda m: m.filename) for key, members in groups.items()}
    return _to_arrays(ordered, read, spec, size, resample, fail)


def _to_arrays(
    groups: dict[tuple[str, str], list],
    read: Callable[[object], Image.Image],
    spec: OmniglotFile,
    size: int,
    resample: str,
    fail: Callable[[str], Exception],
):
    """Check counts, then decode ``groups`` ((alphabet, character) -> 20 items) in path order."""
    keys = sorted(groups)
    alphabets = len({alphabet for alphabet, _ in keys})
    if (alphabets, len(keys)) != (spec.alphabets, spec.characters):
        raise fail(
            f"it holds {alphabets} alphabets and {len(keys)} characters, expected "
            f"{spec.alphabets} and {spec.characters}"
        )
    for key in keys:
        if len(groups[key]) != DRAWINGS:
            raise fail(f"{key[0]}/{key[1]} has {len(groups[key])} images, expected {DRAWINGS}")
    images = np.empty((len(keys), DRAWINGS, size, size), dtype=np.uint8)
    for c, key in enumerate(keys):
        for d, item in enumerate(groups[key]):
            images[c, d] = _ink(read(item), size, resample)
    alphabet = np.array([a for a, _ in keys])
    character = np.array([c for _, c in keys])
    return images, alphabet, character


def _ink(image: Image.Image, size: int, resample: str) -> np.ndarray:
    """One drawing, resized to ``[size, size]`` uint8 with ink 255 and paper 0."""
    if resample == "maml":
        # What the reference's resize(..., LANCZOS) does to its mode "1" PNGs in Pillow; the
        # grey conversion first lets re-encoded (8-bit, RGB) copies give the same pixels.
        small = image.convert("L").resize((size, size), resample=Image.Resampling.NEAREST)
    else:
        small = image.convert("L").resize((size, size), resample=Image.Resampling.LANCZOS)
    return 255 - np.asarray(small, dtype=np.uint8)


def _load_tfds(subsets: tuple[str, ...], size: int, resample: str, download: bool):
    """The same arrays from TensorFlow Datasets' ``omniglot`` (not cached)."""
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise ImportError(
            "source='tfds' needs TensorFlow Datasets, which is not installed: "
            "pip install 'metajax[tfds]' (or use the default source='zip')"
        ) from e
    tfds_split = {
        "background": "train",
        "evaluation": "test",
        "background_small1": "small1",
        "background_small2": "small2",
    }
    parts = []
    for subset in subsets:
        dataset, info = tfds.load(
            "omniglot", split=tfds_split[subset], with_info=True, download=download
        )
        names = info.features["alphabet"].names
        groups: dict[tuple[str, str], list] = defaultdict(list)
        for example in tfds.as_numpy(dataset):
            # TFDS's alphabet_char_id is the 0-based number of the characterNN folder.
            key = (
                names[int(example["alphabet"])],
                f"character{int(example['alphabet_char_id']) + 1:02d}",
            )
            groups[key].append(example["image"][..., 0])

        def fail(problem: str, subset=subset) -> OmniglotFormatError:
            return OmniglotFormatError(f"TFDS omniglot split {tfds_split[subset]!r}: {problem}")

        parts.append(_to_arrays(groups, Image.fromarray, FILES[subset], size, resample, fail))
    return _assemble(subsets, parts, {})
