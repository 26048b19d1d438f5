"""CIFAR-100: 60,000 colour images of 32x32 pixels in 100 classes (20 superclasses).

Data set: Krizhevsky, "Learning Multiple Layers of Features from Tiny Images", technical
report, University of Toronto, 2009. Its continual-learning split (20 tasks of 5 classes, as
in GEM, A-GEM and La-MAML) is :func:`metajax.data.streams.split_cifar100`.

Source: the "python version" archive ``cifar-100-python.tar.gz`` (:data:`ARCHIVE`,
downloaded from :data:`CIFAR100_URL`, or ``url=`` / ``$METAJAX_CIFAR100_URL``), looked for in
``<data_dir>/cifar100/``. Its sha256 is the value Keras' and torchvision's loaders check; the
md5 is the one published with the data set. An already extracted copy is accepted as well:
``<data_dir>/cifar100/cifar-100-python/{train,test,meta}`` (the folder torchvision leaves),
each file checked against its published md5 (:data:`MEMBERS`).

The three members are pickles written by Python 2: ``train`` and ``test`` are dicts with
``data`` (uint8 ``[N, 3072]``, each row the red, green and blue 32x32 planes in turn),
``fine_labels`` and ``coarse_labels`` (lists of int), ``filenames`` and ``batch_label``;
``meta`` holds ``fine_label_names`` and ``coarse_label_names``. They are never read with plain
``pickle.load``: :func:`metajax.data.sources.restricted_pickle_load` builds numpy arrays
and plain containers only, so a tampered archive cannot run code. Members are read straight
from the archive; nothing is extracted to disk. Decoding takes a few seconds and is not cached.

Every problem with the files is one exception naming the file (and member):
:class:`CIFAR100FormatError` (a :class:`~metajax.data.sources.DataFormatError`, so a
``ValueError``), :class:`~metajax.data.sources.ForbiddenPickleError`,
:class:`~metajax.data.sources.ChecksumError` or a ``FileNotFoundError``
(:class:`~metajax.data.sources.DataNotFoundError`). The archive is read through a limit of
:data:`MAX_TAR_BYTES` decompressed bytes, so a crafted archive cannot exhaust memory.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, NamedTuple

import numpy as np

from metajax.data.sources import (
    ChecksumError,
    DataFormatError,
    PickleFormatError,
    ensure_files,
    require_data_dir,
    resolve_url,
    restricted_pickle_load,
    sha256_file,
)

CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/"
URL_ENV = "METAJAX_CIFAR100_URL"
SUBDIR = "cifar100"
TOP = "cifar-100-python"
NUM_CLASSES = 100
NUM_COARSE = 20
IMAGE_SHAPE = (32, 32, 3)
#: Most decompressed bytes read from an archive: the original holds 186 MB (its three members
#: and tar headers); reading stops with :class:`CIFAR100FormatError` beyond this.
MAX_TAR_BYTES = 512 << 20
_CHUNK = 1 << 20


class CIFAR100File(NamedTuple):
    """The source archive: name, sha256, md5 and size in bytes."""

    filename: str
    sha256: str
    md5: str
    size: int


ARCHIVE = CIFAR100File(
    "cifar-100-python.tar.gz",
    "85cd44d02ba6437773c5bbd22e183051d648de2e7d6b014e1ef29b855ba677a7",
    "eb9058c3a382ffc7106e4002c42a8d85",
    169001437,
)

#: Member name inside ``cifar-100-python/`` -> its published md5 (the original is 155249918,
#: 31049707 and 1473 bytes respectively).
MEMBERS: dict[str, str] = {
    "train": "16019d7e3df5f24257cddd939b257f8d",
    "test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
    "meta": "7973b15100ade9c7d40fb424638fde48",
}


class CIFAR100(NamedTuple):
    """CIFAR-100 as arrays, in the files' order.

    Attributes:
      train_x: ``[50000, 32, 32, 3]`` uint8, HWC, RGB.
      train_y: ``[50000]`` uint8 fine labels 0-99.
      train_coarse: ``[50000]`` uint8 superclass labels 0-19.
      test_x: ``[10000, 32, 32, 3]`` uint8.
      test_y: ``[10000]`` uint8.
      test_coarse: ``[10000]`` uint8.
      fine_names: the 100 class names, indexed by fine label (``"apple"``, ...).
      coarse_names: the 20 superclass names, indexed by coarse label.
    """

    train_x: np.ndarray
    train_y: np.ndarray
    train_coarse: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    test_coarse: np.ndarray
    fine_names: tuple[str, ...]
    coarse_names: tuple[str, ...]


class CIFAR100FormatError(DataFormatError):
    """The archive or a member is truncated, corrupt or holds something else than CIFAR-100.

    A :class:`~metajax.data.sources.DataFormatError`, so a ``ValueError``; the message names
    the file (and member).
    """


class MD5MismatchError(ChecksumError):
    """A file's md5 is not the published one (``expected`` and ``actual`` are md5 digests)."""

    def __init__(self, path: str | os.PathLike, expected: str, actual: str, detail: str = ""):
        super().__init__(path, expected, actual, detail)
        message = f"{self.path.name}: md5 {actual}, expected {expected}"
        self.args = (message + (f" ({detail})" if detail else ""),)


def load_cifar100(
    data_dir: str | os.PathLike | None = None,
    *,
    download: bool = True,
    url: str | None = None,
    verify: bool = True,
    progress: bool = True,
) -> CIFAR100:
    """CIFAR-100 (Krizhevsky 2009) from ``cifar-100-python.tar.gz`` or its extracted folder.

    Args:
      data_dir: the data directory (:func:`metajax.data.sources.resolve_data_dir`: this,
        else ``$METAJAX_DATA_DIR``, else ``~/.cache/metajax``); the archive (or the extracted
        ``cifar-100-python/`` folder) is looked for in ``<data_dir>/cifar100/``.
      download: fetch the archive from ``url`` when neither is there.
      url: base URL of the archive; default ``$METAJAX_CIFAR100_URL``, else
        :data:`CIFAR100_URL`.
      verify: check the archive's sha256 (or each extracted file's md5) before reading it.
      progress: report the download on stderr.

    Returns:
      :class:`CIFAR100`; images uint8 ``[N, 32, 32, 3]`` (HWC), labels uint8 ``[N]``.

    Raises:
      DataDirNotFoundError: the ``data_dir`` (or ``$METAJAX_DATA_DIR``) given does not exist;
        nothing is created.
      DataNotFoundError: no archive, no extracted folder, and no download possible.
      ChecksumError: the archive's sha256 (:class:`MD5MismatchError`: an extracted file's
        md5) is not the original's.
      ForbiddenPickleError: a member pickle asks for anything but arrays and plain
        containers; nothing from it was run.
      CIFAR100FormatError: truncated or corrupt archive, missing member, or wrong contents.
    """
    folder = require_data_dir(data_dir) / SUBDIR
    base_url = resolve_url(url, URL_ENV, CIFAR100_URL)
    archive = folder / ARCHIVE.filename
    extracted = folder / TOP
    if not archive.is_file() and all((extracted / m).is_file() for m in MEMBERS):
        if verify:
            for name, md5 in MEMBERS.items():
                _check_md5(extracted / name, md5)
        return _assemble(_read_folder(extracted), {m: str(extracted / m) for m in MEMBERS})

    if not archive.is_file():
        ensure_files(folder, [ARCHIVE], base_url, download=download, progress=progress)
    elif verify:
        actual = sha256_file(archive)
        if actual != ARCHIVE.sha256:
            raise ChecksumError(
                archive,
                ARCHIVE.sha256,
                actual,
                f"not the original {ARCHIVE.filename} ({ARCHIVE.size} bytes, md5 {ARCHIVE.md5}): "
                f"delete it to download it again from {base_url}, or pass verify=False",
            )
    where = {m: f"{archive}: member {TOP}/{m}" for m in MEMBERS}
    return _assemble(_read_archive(archive), where)


def md5_file(path: str | os.PathLike) -> str:
    """The hex md5 digest of the file at ``path`` (an identity check, not a security one)."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _check_md5(path: Path, expected: str) -> None:
    actual = md5_file(path)
    if actual != expected:
        raise MD5MismatchError(
            path,
            expected,
            actual,
            f"not the original CIFAR-100 {path.name}; replace the folder {path.parent} with the "
            f"original archive {ARCHIVE.filename} from {CIFAR100_URL}, or pass verify=False",
        )


def _unpickle(file: IO[bytes], where: str) -> Any:
    # ForbiddenPickleError (a tampered file) passes as it is, naming ``where``.
    try:
        return restricted_pickle_load(file, where)
    except PickleFormatError as e:
        raise CIFAR100FormatError(f"not a readable CIFAR-100 pickle: {e}") from e


def _read_folder(extracted: Path) -> dict[str, Any]:
    objects = {}
    for name in MEMBERS:
        with open(extracted / name, "rb") as f:
            objects[name] = _unpickle(f, str(extracted / name))
    return objects


def _read_archive(archive: Path) -> dict[str, Any]:
    """Unpickle the members of :data:`MEMBERS` in one streaming pass over the archive."""
    wanted = {f"{TOP}/{name}": name for name in MEMBERS}
    objects: dict[str, Any] = {}
    original = (
        f"the original {ARCHIVE.filename} has {ARCHIVE.size} bytes and sha256 {ARCHIVE.sha256}"
    )
    try:
        for member, file in _members(archive):
            # Matched by exact name: other members (any name, "../" ones included) are
            # skipped unread, and nothing is ever written to disk.
            name = wanted.get(member.name)
            if name is None or name in objects:
                continue
            if file is None:
                raise CIFAR100FormatError(
                    f"{archive}: member {member.name} is not a file; {original}"
                )
            if member.size > MAX_TAR_BYTES:
                raise CIFAR100FormatError(
                    f"{archive}: member {member.name} declares {member.size} bytes, more than "
                    f"any CIFAR-100 member; {original}"
                )
            objects[name] = _unpickle(file, f"{archive}: member {member.name}")
    except DataFormatError:
        raise
    except Exception as e:  # TarError, gzip's OSError and EOFError, zlib.error, and the like
        raise CIFAR100FormatError(
            f"{archive}: not a readable tar.gz archive, truncated or corrupt "
            f"({type(e).__name__}: {e}); {original}"
        ) from e
    missing = [f"{TOP}/{name}" for name in MEMBERS if name not in objects]
    if missing:
        raise CIFAR100FormatError(f"{archive}: members {missing} are missing; {original}")
    return objects


class _Limited:
    """A read-only file over ``file`` that fails after ``limit`` bytes (a decompression bomb)."""

    def __init__(self, file: IO[bytes], limit: int, where: Path) -> None:
        self._file = file
        self._left = limit
        self._limit = limit
        self._where = where

    def read(self, size: int = -1) -> bytes:
        want = self._left + 1 if size is None or size < 0 else min(size, self._left + 1)
        data = self._file.read(want)
        self._left -= len(data)
        if self._left < 0:
            raise CIFAR100FormatError(
                f"{self._where}: decompresses to more than {self._limit} bytes, far more than "
                f"the original {ARCHIVE.filename}; it is not CIFAR-100"
            )
        return data


def _members(archive: Path) -> Iterator[tuple[tarfile.TarInfo, IO[bytes] | None]]:
    # Stream mode ("r|") reads the archive once, front to back, without seeking.
    with gzip.open(archive, "rb") as raw:
        limited = _Limited(raw, MAX_TAR_BYTES, archive)
        with tarfile.open(fileobj=limited, mode="r|") as tar:  # type: ignore[call-overload]
            for member in tar:
                yield member, tar.extractfile(member) if member.isfile() else None
        # Read to the end, so that gzip checks its CRC and length: a cut-off archive fails
        # even when the cut falls after the last member.
        while limited.read(_CHUNK):
            pass


def _text(value: Any) -> str:
    # Python 2 strings arrive as str (latin1); a re-pickled copy may hold bytes instead.
    return value.decode("latin1") if isinstance(value, bytes) else str(value)


def _fields(obj: Any, where: str, keys: tuple[str, ...]) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise CIFAR100FormatError(f"{where}: a {type(obj).__name__}, expected a dict")
    bad = [type(k).__name__ for k in obj if not isinstance(k, str | bytes)]
    if bad:
        raise CIFAR100FormatError(f"{where}: a dict key of type {bad[0]}, expected str keys")
    fields = {_text(k): v for k, v in obj.items()}
    missing = [k for k in keys if k not in fields]
    if missing:
        shown = sorted(repr(k[:40]) for k in fields)[:10]
        raise CIFAR100FormatError(
            f"{where}: keys {missing} missing; it has [{', '.join(shown)}]"
        )
    return fields


def _labels(values: Any, count: int, high: int, where: str) -> np.ndarray:
    if not isinstance(values, list | tuple | np.ndarray):
        raise CIFAR100FormatError(f"{where}: a {type(values).__name__}, expected a list of ints")
    try:
        labels = np.asarray(values)
    except (ValueError, TypeError, OverflowError) as e:  # ragged or mixed lists
        raise CIFAR100FormatError(f"{where}: not a list of ints ({e})") from None
    if labels.shape != (count,) or labels.dtype.kind not in "iu":
        raise CIFAR100FormatError(
            f"{where}: {labels.shape} labels of dtype {labels.dtype}, expected {count} ints"
        )
    if count and (labels.min() < 0 or labels.max() >= high):
        raise CIFAR100FormatError(f"{where}: labels outside 0-{high - 1}")
    return labels.astype(np.uint8)


def _names(values: Any, where: str) -> tuple[str, ...]:
    if not isinstance(values, list | tuple) or not all(
        isinstance(v, str | bytes) for v in values
    ):
        raise CIFAR100FormatError(f"{where}: a {type(values).__name__}, expected a list of str")
    return tuple(_text(v) for v in values)


def _split(obj: Any, where: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(uint8 HWC images, fine labels, coarse labels) of a ``train`` or ``test`` dict."""
    fields = _fields(obj, where, ("data", "fine_labels", "coarse_labels"))
    data = fields["data"]
    pixels = int(np.prod(IMAGE_SHAPE))
    if (
        not isinstance(data, np.ndarray)
        or data.dtype != np.uint8
        or data.ndim != 2
        or (data.shape[1] != pixels)
    ):
        raise CIFAR100FormatError(
            f"{where}: 'data' is {type(data).__name__} {getattr(data, 'shape', '')} "
            f"{getattr(data, 'dtype', '')}, expected a uint8 array [N, {pixels}]"
        )
    n = data.shape[0]
    fine = _labels(fields["fine_labels"], n, NUM_CLASSES, f"{where}: 'fine_labels'")
    coarse = _labels(fields["coarse_labels"], n, NUM_COARSE, f"{where}: 'coarse_labels'")
    # Rows are channel planes (CHW); models here take HWC.
    images = np.ascontiguousarray(data.reshape(n, 3, 32, 32).transpose(0, 2, 3, 1))
    return images, fine, coarse


def _assemble(objects: dict[str, Any], where: dict[str, str]) -> CIFAR100:
    """The data set from the unpickled members; ``where[name]`` names member ``name``."""
    try:
        return _assemble_checked(objects, where)
    except CIFAR100FormatError as e:
        raise CIFAR100FormatError(
            f"{e}; this is not CIFAR-100 as published: replace it with the original "
            f"{ARCHIVE.filename} from {CIFAR100_URL}"
        ) from None


def _assemble_checked(objects: dict[str, Any], where: dict[str, str]) -> CIFAR100:
    train_x, train_y, train_coarse = _split(objects["train"], where["train"])
    test_x, test_y, test_coarse = _split(objects["test"], where["test"])
    meta_where = where["meta"]
    meta = _fields(objects["meta"], meta_where, ("fine_label_names", "coarse_label_names"))
    fine_names = _names(meta["fine_label_names"], f"{meta_where}: 'fine_label_names'")
    coarse_names = _names(meta["coarse_label_names"], f"{meta_where}: 'coarse_label_names'")
    if (len(fine_names), len(coarse_names)) != (NUM_CLASSES, NUM_COARSE):
        raise CIFAR100FormatError(
            f"{meta_where}: names {len(fine_names)} classes and {len(coarse_names)} "
            f"superclasses, expected {NUM_CLASSES} and {NUM_COARSE}"
        )
    return CIFAR100(
        train_x=train_x,
        train_y=train_y,
        train_coarse=train_coarse,
        test_x=test_x,
        test_y=test_y,
        test_coarse=test_coarse,
        fine_names=fine_names,
        coarse_names=coarse_names,
    )
