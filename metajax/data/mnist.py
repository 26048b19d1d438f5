"""MNIST: 70,000 handwritten digits, 28x28 grey-scale, from the original idx ``.gz`` files.

Data set: LeCun, Bottou, Bengio and Haffner, "Gradient-based learning applied to document
recognition", Proc. IEEE 1998 (Y. LeCun, C. Cortes and C. J. C. Burges, "The MNIST database
of handwritten digits"). The continual-learning streams built on it (permuted, rotated, many
permutations) live in :mod:`metajax.data.streams`.

Files, looked for in ``<data_dir>/mnist/`` (:data:`FILES` holds their sha256 and sizes, the
values of TensorFlow Datasets' checksum list; their md5 are the ones published with the data
set)::

    train-images-idx3-ubyte.gz   60000 x 28 x 28 pixels
    train-labels-idx1-ubyte.gz   60000 labels
    t10k-images-idx3-ubyte.gz    10000 x 28 x 28 pixels
    t10k-labels-idx1-ubyte.gz    10000 labels

Missing files are downloaded from :data:`MNIST_URL`, a public mirror that serves the
original files byte for byte (the one torchvision uses; Yann LeCun's page no longer serves
them reliably); ``url=`` or ``$METAJAX_MNIST_URL`` name another base URL, e.g.
``https://storage.googleapis.com/cvdf-datasets/mnist/``. Every file, downloaded or already
there, is checked against its sha256 before it is parsed.

The idx format: a big-endian header ``0x00 0x00 <type> <ndim>`` (type ``0x08``: unsigned
bytes), then ``ndim`` big-endian uint32 sizes, then the values in C order. Parsing takes well
under a second, so nothing is cached.
"""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np

from metajax.data.sources import (
    ChecksumError,
    DataFormatError,
    ensure_files,
    require_data_dir,
    resolve_url,
    sha256_file,
)

MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"
URL_ENV = "METAJAX_MNIST_URL"
SUBDIR = "mnist"
_UBYTE = 0x08
#: Most values :func:`parse_idx` reads when no shape is expected (MNIST's largest file holds
#: 47 million); a header declaring more is refused before anything is allocated.
MAX_IDX_VALUES = 1 << 30
_CHUNK = 1 << 20


class MNISTFile(NamedTuple):
    """One idx file: its name, sha256 and size in bytes, and the array shape it holds."""

    filename: str
    sha256: str
    size: int
    shape: tuple[int, ...]


FILES: dict[str, MNISTFile] = {
    "train_images": MNISTFile(
        "train-images-idx3-ubyte.gz",
        "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
        9912422,
        (60000, 28, 28),
    ),
    "train_labels": MNISTFile(
        "train-labels-idx1-ubyte.gz",
        "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
        28881,
        (60000,),
    ),
    "test_images": MNISTFile(
        "t10k-images-idx3-ubyte.gz",
        "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
        1648877,
        (10000, 28, 28),
    ),
    "test_labels": MNISTFile(
        "t10k-labels-idx1-ubyte.gz",
        "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
        4542,
        (10000,),
    ),
}


class MNIST(NamedTuple):
    """MNIST as arrays, in the files' order.

    Attributes:
      train_x: ``[60000, 28, 28]`` uint8 pixels, 0 (paper) to 255 (ink).
      train_y: ``[60000]`` uint8 labels 0-9.
      test_x: ``[10000, 28, 28]`` uint8.
      test_y: ``[10000]`` uint8.
    """

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray


class MNISTFormatError(DataFormatError):
    """An idx file is not gzip, is truncated, or has another magic number or shape.

    A :class:`~metajax.data.sources.DataFormatError`, so a ``ValueError``; the message names
    the file.
    """


def load_mnist(
    data_dir: str | os.PathLike | None = None,
    *,
    download: bool = True,
    url: str | None = None,
    verify: bool = True,
    progress: bool = True,
) -> MNIST:
    """MNIST (LeCun et al. 1998) from the four original idx ``.gz`` files.

    Args:
      data_dir: the data directory (:func:`metajax.data.sources.resolve_data_dir`: this,
        else ``$METAJAX_DATA_DIR``, else ``~/.cache/metajax``); the files are looked for in
        ``<data_dir>/mnist/``, which may be read-only when they are all there.
      download: fetch missing files from ``url`` into ``<data_dir>/mnist/``.
      url: base URL of the files; default ``$METAJAX_MNIST_URL``, else :data:`MNIST_URL`.
      verify: check every file's sha256 against :data:`FILES` before parsing it.
      progress: report downloads on stderr.

    Returns:
      :class:`MNIST`: ``train_x`` uint8 ``[60000, 28, 28]``, ``train_y`` uint8 ``[60000]``,
      ``test_x`` uint8 ``[10000, 28, 28]``, ``test_y`` uint8 ``[10000]``.

    Raises:
      DataDirNotFoundError: the ``data_dir`` (or ``$METAJAX_DATA_DIR``) given does not exist;
        nothing is created.
      DataNotFoundError: files missing and not downloadable; names the files and the folder.
      ChecksumError: a file (local or downloaded) has another sha256 than the original.
      MNISTFormatError: a file is not a gzip idx file of the expected shape; names the file.
    """
    folder = require_data_dir(data_dir) / SUBDIR
    base_url = resolve_url(url, URL_ENV, MNIST_URL)
    ensure_files(folder, FILES.values(), base_url, download=download, progress=progress)
    arrays = {}
    for key, spec in FILES.items():
        path = folder / spec.filename
        if verify:
            actual = sha256_file(path)
            if actual != spec.sha256:
                raise ChecksumError(
                    path,
                    spec.sha256,
                    actual,
                    f"not the original {spec.filename} of {spec.size} bytes: delete {path} "
                    f"to download it again from {base_url}, or pass verify=False to read it "
                    "anyway",
                )
        arrays[key] = parse_idx(path, spec.shape)
    for split in ("train", "test"):
        labels = arrays[f"{split}_labels"]
        if labels.size and labels.max() > 9:
            path = folder / FILES[f"{split}_labels"].filename
            raise MNISTFormatError(f"{path}: label {int(labels.max())} found; MNIST has 0-9")
    return MNIST(
        train_x=arrays["train_images"],
        train_y=arrays["train_labels"],
        test_x=arrays["test_images"],
        test_y=arrays["test_labels"],
    )


def parse_idx(path: str | os.PathLike, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """The uint8 array stored in a gzip-compressed idx file (LeCun et al.'s MNIST format).

    The file is decompressed only as far as its header says (and one byte more, to find
    trailing bytes), so a gzip "bomb" cannot fill memory.

    Args:
      path: an ``*-idx{1,3}-ubyte.gz`` file.
      shape: the expected shape (e.g. ``(60000, 28, 28)``); ``None`` accepts any of at most
        :data:`MAX_IDX_VALUES` values.

    Returns:
      uint8 array of the shape the header declares.

    Raises:
      MNISTFormatError: not gzip, truncated, a magic number other than unsigned bytes with
        ``len(shape)`` dimensions, another shape, or trailing bytes; the message names the file.
      OSError: the file cannot be opened (``FileNotFoundError`` if it does not exist).
    """
    path = Path(path)
    with gzip.open(path, "rb") as f:
        try:
            return _parse_idx(f, path, shape)
        except (OSError, EOFError, zlib.error) as e:
            # gzip.BadGzipFile is an OSError; a cut-off stream raises EOFError.
            raise MNISTFormatError(f"{path}: not a complete gzip file ({e})") from e


def _parse_idx(f: gzip.GzipFile, path: Path, shape: tuple[int, ...] | None) -> np.ndarray:
    head = f.read(4)
    if len(head) < 4:
        raise MNISTFormatError(f"{path}: {len(head)} bytes, too short for an idx header")
    zero, dtype, ndim = int.from_bytes(head[:2], "big"), head[2], head[3]
    expected_ndim = len(shape) if shape is not None else ndim
    if zero != 0 or dtype != _UBYTE or ndim != expected_ndim or ndim == 0:
        raise MNISTFormatError(
            f"{path}: magic number 0x{int.from_bytes(head, 'big'):08x}, expected "
            f"0x{(_UBYTE << 8) | expected_ndim:08x} (unsigned bytes, {expected_ndim} "
            "dimensions); is this an MNIST idx file?"
        )
    sizes = f.read(4 * ndim)
    if len(sizes) < 4 * ndim:
        raise MNISTFormatError(f"{path}: truncated header ({4 + len(sizes)} bytes)")
    dims = tuple(int.from_bytes(sizes[4 * i : 4 + 4 * i], "big") for i in range(ndim))
    if shape is not None and dims != tuple(shape):
        raise MNISTFormatError(f"{path}: header declares shape {dims}, expected {tuple(shape)}")
    count = 1
    for d in dims:
        count *= d
    if shape is None and count > MAX_IDX_VALUES:
        raise MNISTFormatError(
            f"{path}: header declares shape {dims}, {count} values, more than the "
            f"{MAX_IDX_VALUES} read without an expected shape; is this an MNIST idx file?"
        )
    data = bytearray()
    while len(data) < count:
        chunk = f.read(min(_CHUNK, count - len(data)))
        if not chunk:
            break
        data += chunk
    got = len(data)
    if got == count and f.read(1):
        got = count + 1 + len(f.read(_CHUNK))  # at least this many; enough to say so
        more = "or more "
    else:
        more = ""
    if got != count:
        raise MNISTFormatError(
            f"{path}: {got} {more}data bytes after the header, but shape {dims} "
            f"needs {count}; the file is truncated or corrupt"
        )
    return np.frombuffer(data, dtype=np.uint8).reshape(dims)
