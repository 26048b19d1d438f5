"""Where dataset files live, downloads checked against checksums, and crash-safe caches.

A file either arrives whole and verified or not at all: downloads go to a temporary file
beside the destination and are renamed into place only after their size and sha256 match,
and caches are written the same way (:func:`atomic_save_npz`). Dataset pickles (mini-ImageNet
caches, CIFAR-100 batches) are read by :func:`restricted_pickle_load`, which builds numpy
arrays and plain containers and nothing else.

Every expected failure of a loader is one exception, a ``ValueError`` or a
``FileNotFoundError``, whose message names the file (and the archive member) and says what to
do: :class:`DataFormatError` (a file that is truncated, corrupt or holds something else),
:class:`ChecksumError`, :class:`DataNotFoundError` and :class:`DataDirNotFoundError`.
"""

from __future__ import annotations

import codecs
import hashlib
import http.client
import os
import pickle
import re
import stat
import sys
import tempfile
import urllib.error
import urllib.request
import warnings
import zipfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from metajax._files import atomic_write

DATA_DIR_ENV = "METAJAX_DATA_DIR"
CACHE_DIR_ENV = "METAJAX_CACHE_DIR"

_CHUNK = 1 << 20
_SHA256_RE = re.compile(r"[0-9a-f]{64}")


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The data directory: ``data_dir`` if given, else ``$METAJAX_DATA_DIR``, else a user cache.

    The cache default is ``$XDG_CACHE_HOME/metajax`` (``~/.cache/metajax`` when unset).
    Checks nothing; loaders use :func:`require_data_dir`.
    """
    if data_dir is not None:
        return Path(data_dir).expanduser()
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        return Path(env).expanduser()
    return user_cache_dir()


def require_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """:func:`resolve_data_dir`, after checking that a data directory the user named exists.

    A directory given as ``data_dir`` (the command line's ``--data-dir``) or as
    ``$METAJAX_DATA_DIR`` must exist: a mistyped path is reported, not created (downloads
    then create only the dataset's subfolder inside it). The default, the user cache, is
    created when a download needs it.

    Raises:
      DataDirNotFoundError: the named directory does not exist, or is not a directory.
    """
    path = resolve_data_dir(data_dir)
    if data_dir is not None:
        origin = "data_dir / --data-dir"
    elif os.environ.get(DATA_DIR_ENV):
        origin = f"${DATA_DIR_ENV}"
    else:
        return path
    if not path.is_dir():
        raise DataDirNotFoundError(path, origin)
    return path


def user_cache_dir() -> Path:
    """The per-user cache folder: ``$XDG_CACHE_HOME/metajax`` (``~/.cache/metajax`` when unset).

    Unlike :func:`resolve_data_dir` it ignores ``$METAJAX_DATA_DIR``, so it is the place to
    fall back to when the data directory is read-only.
    """
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(cache) / "metajax"


def atomic_save_npz(path: str | os.PathLike, **arrays: np.ndarray) -> Path:
    """Write ``arrays`` to ``path`` as ``.npz`` through a temporary file and an atomic rename.

    A reader sees either no file or the whole file, never a partial one. Members are stored
    uncompressed (``np.savez``), as :func:`read_npz` expects.
    """
    return atomic_write(path, lambda f: np.savez(f, **arrays))


def read_npz(path: str | os.PathLike, names: Sequence[str]) -> dict[str, np.ndarray]:
    """The arrays ``names`` of the ``.npz`` file at ``path`` (written by :func:`atomic_save_npz`).

    Stricter than ``np.load``: no pickles (object arrays are refused), only uncompressed
    members (as ``np.savez`` writes them), and every member's declared array size must match
    the bytes it holds in the file, so a crafted header cannot make it allocate more memory
    than the file's size. The arrays are read whole into memory.

    Raises:
      DataFormatError: not a zip archive, truncated or corrupt, a member missing, compressed,
        an object array, or a header that does not match its data; names the file and member.
      OSError: the file cannot be opened or read.
    """
    path = Path(path)
    out: dict[str, np.ndarray] = {}
    with open(path, "rb") as file:
        size = os.fstat(file.fileno()).st_size
        try:
            archive = zipfile.ZipFile(file)
        except Exception as e:  # BadZipFile, and whatever else a crafted directory triggers
            raise DataFormatError(
                f"{path}: not a readable .npz (zip) file, truncated or corrupt ({e}); delete it "
                "so that it is written again"
            ) from e
        with archive:
            for name in names:
                out[name] = _read_npy_member(archive, path, f"{name}.npy", size)
    return out


def _read_npy_member(archive: zipfile.ZipFile, path: Path, member: str, size: int) -> np.ndarray:
    def fail(problem: str) -> DataFormatError:
        return DataFormatError(
            f"{path}: member {member}: {problem}; delete the file so that it is written again"
        )

    try:
        info = archive.getinfo(member)
    except KeyError:
        raise fail("missing") from None
    if info.is_dir() or info.compress_type != zipfile.ZIP_STORED:
        raise fail("not an uncompressed array (as np.savez writes them)")
    if info.file_size != info.compress_size or info.header_offset + info.compress_size > size:
        raise fail(f"declares {info.file_size} bytes, more than the file holds")
    try:
        with archive.open(info) as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise fail(f"npy format version {version} is not supported")
            if dtype.hasobject:
                raise fail(f"dtype {dtype} holds Python objects (pickles), which are refused")
            count = 1
            for n in shape:
                count *= n
            nbytes = count * dtype.itemsize
            remaining = info.file_size - f.tell()
            if nbytes != remaining:
                raise fail(
                    f"header declares {dtype} {shape} ({nbytes} bytes) but {remaining} bytes "
                    "follow it"
                )
            flat = np.empty(count, dtype)
            view = memoryview(flat.view(np.uint8)) if nbytes else memoryview(b"")
            done = 0
            while done < nbytes:
                chunk = f.read(min(_CHUNK, nbytes - done))
                if not chunk:
                    raise fail(f"truncated after {done} of {nbytes} data bytes")
                view[done : done + len(chunk)] = chunk
                done += len(chunk)
    except DataFormatError:
        raise
    except Exception as e:  # BadZipFile (bad CRC), zlib.error, ValueError of a bad header, ...
        raise fail(f"unreadable, truncated or corrupt ({type(e).__name__}: {e})") from e
    if fortran:
        return flat.reshape(shape[::-1]).transpose()
    return flat.reshape(shape)


class DataNotFoundError(FileNotFoundError):
    """Dataset files are missing and could not be downloaded.

    The message names every missing file and the folder to put it in, so that a user without
    network access can fetch the files elsewhere and copy them over. Attributes: ``folder``,
    ``files`` (names), ``urls`` (where each can be downloaded, may be empty) and ``reason``.
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        files: Iterable[str],
        *,
        urls: Iterable[str] = (),
        reason: str | None = None,
    ) -> None:
        self.folder = Path(folder)
        self.files = tuple(files)
        self.urls = tuple(urls)
        self.reason = reason
        lines = [f"missing dataset files in {self.folder}:"]
        lines += [f"  {name}" for name in self.files]
        if reason:
            lines.append(f"they could not be downloaded: {reason}")
        if self.urls:
            lines.append("download them from:")
            lines += [f"  {url}" for url in self.urls]
        lines.append(
            f"and put them in {self.folder} (or set ${DATA_DIR_ENV} to another data directory "
            f"that has them in its {self.folder.name}/ folder)"
        )
        # One argument only: OSError treats two positional arguments as (errno, strerror).
        super().__init__("\n".join(lines))


class DataDirNotFoundError(DataNotFoundError):
    """The data directory the user named does not exist (or is a file); nothing was created.

    Attributes: ``folder`` (the path), ``origin`` (where it was given: the ``data_dir``
    argument or ``$METAJAX_DATA_DIR``); ``files`` and ``urls`` are empty.
    """

    def __init__(self, folder: str | os.PathLike, origin: str = "data_dir / --data-dir") -> None:
        self.folder = Path(folder)
        self.origin = origin
        self.files = ()
        self.urls = ()
        what = "is not a directory" if self.folder.exists() else "does not exist"
        self.reason = f"data directory {self.folder} {what}"
        FileNotFoundError.__init__(
            self,
            f"data directory {self.folder} {what} (given as {origin}); create it first (the "
            "download writes into it), or correct the path",
        )


class DataFormatError(ValueError):
    """A dataset file is truncated, corrupt, or holds something else than the loader expects.

    The base of every loader's format error (mini-ImageNet, CIFAR-100, Omniglot, MNIST and the
    pickle and ``.npz`` readers here). The message names the file, and the member for an
    archive, and says what to do (usually: replace the file with the original).
    """


class ChecksumError(ValueError):
    """A file's sha256 (or size) is not the expected one.

    Attributes: ``path``, ``expected`` and ``actual`` (hex sha256 digests).
    """

    def __init__(self, path: str | os.PathLike, expected: str, actual: str, detail: str = ""):
        self.path = Path(path)
        self.expected = expected
        self.actual = actual
        message = f"{self.path.name}: sha256 {actual}, expected {expected}"
        if detail:
            message += f" ({detail})"
        super().__init__(message)


class DownloadError(OSError):
    """A download failed (network error, HTTP error status or truncated transfer)."""


def sha256_file(path: str | os.PathLike) -> str:
    """The hex sha256 digest of the file at ``path``, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def check_sha256(sha256: str) -> str:
    """``sha256`` lower-cased, after checking it is 64 hex digits (raises ``ValueError``)."""
    normal = str(sha256).strip().lower()
    if not _SHA256_RE.fullmatch(normal):
        raise ValueError(f"sha256={sha256!r} is not a sha256 digest: give 64 hex digits")
    return normal


def is_writable_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` (or, if it does not exist yet, its nearest existing parent) may be written.

    Creates nothing. Permission bits are honoured even for root: a folder marked read-only
    (no write bit, e.g. a shared copy of a dataset) counts as read-only, although root's
    writes would succeed there.
    """
    path = Path(path).expanduser().absolute()
    while not path.exists():
        if path.parent == path:
            return False
        path = path.parent
    if not path.is_dir() or not os.access(path, os.W_OK):
        return False
    write_bits = stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH
    return bool(path.stat().st_mode & write_bits)


def read_npz_cache(
    folders: Sequence[str | os.PathLike],
    name: str,
    members: Sequence[str],
    usable: Callable[[dict[str, np.ndarray]], bool],
) -> dict[str, np.ndarray] | None:
    """The arrays of the first usable cache file ``name`` among ``folders``, else ``None``.

    Each ``<folder>/<name>`` that exists is read with :func:`read_npz`; one that cannot be read,
    or whose arrays ``usable`` rejects (a checksum, dtype or shape that does not match its
    source), is skipped with a warning naming it, so a bad cache costs a rebuild, never a run.
    """
    for folder in folders:
        path = Path(folder) / name
        if not path.is_file():
            continue
        try:
            arrays = read_npz(path, members)
        except (OSError, DataFormatError) as e:
            warnings.warn(f"ignoring unreadable cache {path}: {e}; rebuilding it", stacklevel=3)
            continue
        if usable(arrays):
            return arrays
        warnings.warn(
            f"ignoring cache {path}: its contents do not match its source; rebuilding it",
            stacklevel=3,
        )
    return None


def write_npz_cache(
    folders: Sequence[str | os.PathLike], name: str, what: str, **arrays: np.ndarray
) -> Path | None:
    """Write ``arrays`` as ``<folder>/name`` into the first of ``folders`` that takes it.

    Folders that are not writable (:func:`is_writable_dir`) or whose write fails are passed
    over; when none takes it, a warning says that ``what`` will be rebuilt next time and how to
    avoid that, and ``None`` is returned: a read-only data directory never stops a run.
    """
    errors = []
    for folder in folders:
        if not is_writable_dir(folder):
            errors.append(f"{folder}: not writable")
            continue
        try:
            return atomic_save_npz(Path(folder) / name, **arrays)
        except OSError as e:
            errors.append(f"{folder}: {e}")
    warnings.warn(
        f"could not write the {what} cache {name} ({'; '.join(errors)}); {what} will be "
        "prepared again next time (pass a writable cache_dir= or set $METAJAX_CACHE_DIR)",
        stacklevel=3,
    )
    return None


def cache_dir_candidates(
    name: str, data_dir: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None
) -> list[Path]:
    """Folders in which dataset ``name`` keeps its caches, in order of preference.

    ``cache_dir`` if given (used as is); else ``$METAJAX_CACHE_DIR/<name>`` if set; else
    ``<data_dir>/<name>/cache`` followed by ``<user cache>/<name>/cache``
    (:func:`user_cache_dir`), so that a read-only data directory still gets a cache. Readers
    look for a cache in every candidate; writers use the first writable one
    (:func:`is_writable_dir`).
    """
    if cache_dir is not None:
        return [Path(cache_dir).expanduser()]
    env = os.environ.get(CACHE_DIR_ENV)
    if env:
        return [Path(env).expanduser() / name]
    candidates = [resolve_data_dir(data_dir) / name / "cache", user_cache_dir() / name / "cache"]
    return list(dict.fromkeys(candidates))


def resolve_url(url: str | None, env_var: str, default: str) -> str:
    """A download base URL: ``url`` if given, else ``$env_var`` if set, else ``default``.

    The result ends with ``/`` so that a file name can be appended.
    """
    base = url or os.environ.get(env_var) or default
    return base if base.endswith("/") else base + "/"


def fetch(
    url: str,
    dest: str | os.PathLike,
    sha256: str,
    *,
    size: int | None = None,
    progress: bool = True,
    timeout: float = 60.0,
) -> Path:
    """Download ``url`` to ``dest``, verified against ``sha256`` (and ``size`` in bytes, if known).

    The bytes go to a temporary file in ``dest``'s folder, which is renamed to ``dest`` only
    once the transfer is complete and the checksum matches; on any failure the temporary file
    is removed and ``dest`` is left as it was. Progress goes to stderr when ``progress``.

    Raises:
      DownloadError: network or HTTP error, or fewer bytes than the server announced.
      ChecksumError: the downloaded bytes have another size or sha256 than expected; the
        message names the file, the expected and the actual checksum.
    """
    sha256 = check_sha256(sha256)
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            received, digest, announced = _download(url, out, progress, timeout, dest.name)
            out.flush()
            os.fsync(out.fileno())
        if announced is not None and received != announced:
            raise DownloadError(
                f"download of {url} was cut short: {received} of {announced} bytes arrived; "
                f"nothing was written to {dest}"
            )
        actual = digest.hexdigest()
        if size is not None and received != size:
            raise ChecksumError(
                dest, sha256, actual, f"{received} bytes, expected {size}; downloaded from {url}"
            )
        if actual != sha256:
            raise ChecksumError(dest, sha256, actual, f"downloaded from {url}")
        # mkstemp creates the file private (0600); a downloaded dataset is an ordinary file.
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return dest


def _download(url, out, progress: bool, timeout: float, label: str):
    """Stream ``url`` into the open file ``out``: (bytes received, sha256, announced size)."""
    digest = hashlib.sha256()
    received = 0
    request = urllib.request.Request(url, headers={"User-Agent": "metajax"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            length = response.headers.get("Content-Length")
            announced = int(length) if length and length.isdigit() else None
            while chunk := response.read(_CHUNK):
                out.write(chunk)
                digest.update(chunk)
                received += len(chunk)
                if progress:
                    _report(label, received, announced)
    except urllib.error.HTTPError as e:
        raise DownloadError(f"download of {url} failed: HTTP {e.code} {e.reason}") from e
    except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
        # HTTPException (e.g. IncompleteRead) is not an OSError; both mean "no complete file".
        reason = getattr(e, "reason", None) or e
        raise DownloadError(f"download of {url} failed: {reason}") from e
    finally:
        if progress and received:
            sys.stderr.write("\n")
    return received, digest, announced


def _report(label: str, received: int, total: int | None) -> None:
    if total:
        sys.stderr.write(f"\r{label}: {received / 2**20:.1f}/{total / 2**20:.1f} MiB")
    else:
        sys.stderr.write(f"\r{label}: {received / 2**20:.1f} MiB")
    sys.stderr.flush()


def ensure_files(
    folder: Path, files: Iterable, base_url: str, *, download: bool, progress: bool
) -> None:
    """Download every file of ``files`` missing from ``folder``, or say which to put there.

    ``files`` are records with ``filename``, ``sha256`` and ``size``; each is fetched from
    ``base_url + filename`` with :func:`fetch`. Raises :class:`DataNotFoundError` naming the
    missing files, their URLs and why they could not be fetched (``download=False``, a
    read-only folder, or the download's own error).
    """
    missing = [spec for spec in files if not (folder / spec.filename).is_file()]
    if not missing:
        return
    names = [spec.filename for spec in missing]
    urls = [base_url + name for name in names]
    if not download:
        raise DataNotFoundError(folder, names, urls=urls, reason="download=False")
    if not is_writable_dir(folder):
        raise DataNotFoundError(folder, names, urls=urls, reason=f"{folder} is read-only")
    for i, spec in enumerate(missing):
        try:
            fetch(urls[i], folder / spec.filename, spec.sha256, size=spec.size, progress=progress)
        except DownloadError as e:
            raise DataNotFoundError(folder, names[i:], urls=urls[i:], reason=str(e)) from e


# --- Restricted unpickling (dataset pickles: mini-ImageNet caches, CIFAR-100 batches) ------


class ForbiddenPickleError(DataFormatError, pickle.UnpicklingError):
    """A pickle asked for something a dataset pickle never needs; nothing was run.

    Both a :class:`DataFormatError` (so a ``ValueError``) and a ``pickle.UnpicklingError``.
    """


class PickleFormatError(DataFormatError, pickle.UnpicklingError):
    """A pickle is truncated or malformed (not a tampered one: that is ForbiddenPickleError).

    Both a :class:`DataFormatError` (so a ``ValueError``) and a ``pickle.UnpicklingError``.
    """


def _latin1_encode(obj: str, encoding: str = "latin1", errors: str = "strict") -> bytes:
    # Python 3 writes bytes under pickle protocols 0-2 as _codecs.encode(text, "latin1"); no
    # other codec is needed, and refusing the rest keeps codec lookups out of reach.
    if not isinstance(encoding, str) or not isinstance(errors, str):
        raise ForbiddenPickleError("_codecs.encode called with a non-str encoding or errors.")
    if encoding.lower().replace("_", "-") not in ("latin1", "latin-1") or errors != "strict":
        raise ForbiddenPickleError(
            f"_codecs.encode called with encoding={encoding[:40]!r}, errors={errors[:40]!r}; "
            "only 'latin1' appears in numpy array pickles."
        )
    if not isinstance(obj, str):
        raise ForbiddenPickleError(f"_codecs.encode expects str, got {type(obj).__name__}.")
    return codecs.encode(obj, "latin1")


def _empty_bytes(*args: object) -> bytes:
    # Protocols 0-2 write b"" (the data of an empty array) as bytes(); bytes(n) with an
    # attacker-chosen n would allocate n bytes, so arguments are refused.
    if args:
        raise ForbiddenPickleError(
            f"bytes() with {len(args)} argument(s) is not allowed; only bytes() is."
        )
    return b""


def _numpy_callables() -> tuple[Callable[..., Any], Callable[..., Any], Callable[..., Any]]:
    # Taken from numpy's own reductions, so the right functions are found on numpy 1.x
    # (numpy.core) and 2.x (numpy._core) alike without importing the deprecated module.
    reconstruct = np.zeros(1).__reduce__()[0]
    frombuffer = np.zeros(1).__reduce_ex__(5)[0]
    scalar = np.float64(0).__reduce__()[0]
    return reconstruct, frombuffer, scalar


class _NdarrayMarker:
    """What ``numpy.ndarray`` resolves to: accepted by ``_reconstruct``, refused when called."""

    __slots__ = ()  # no __dict__, so pickle's BUILD cannot set attributes on it

    def __call__(self, *args: object, **kwargs: object) -> None:
        raise ForbiddenPickleError(
            "numpy.ndarray called directly is refused (it would allocate memory of any size); "
            "numpy pickles only pass it to _reconstruct."
        )


def _allowed_globals() -> dict[tuple[str, str], Any]:
    reconstruct, frombuffer, scalar = _numpy_callables()
    # numpy.ndarray stands for itself only as _reconstruct's first argument: called, it would
    # allocate an array of any size the pickle names. A fresh marker is all it needs to be.
    ndarray_marker = _NdarrayMarker()

    # Fresh wrappers rather than numpy's functions themselves: pickle's BUILD opcode can set
    # attributes on any object it has, and it must not reach shared module-level objects.
    def _reconstruct(subtype: object, shape: object, dtype: object) -> np.ndarray:
        if subtype is not ndarray_marker:
            raise ForbiddenPickleError(
                f"_reconstruct of a {type(subtype).__name__} refused; only plain numpy.ndarray "
                "is allowed."
            )
        # numpy pickles an array as an empty one plus its state (shape, dtype, data); any
        # other shape here would allocate memory the file does not hold.
        if type(shape) is not tuple or len(shape) != 1 or type(shape[0]) is not int or shape[0]:
            raise ForbiddenPickleError(
                "_reconstruct with a shape other than (0,) refused; numpy always writes (0,)."
            )
        return reconstruct(np.ndarray, shape, dtype)

    def _frombuffer(*args: object) -> np.ndarray:
        return frombuffer(*args)

    def _scalar(*args: object) -> object:
        return scalar(*args)

    def _encode(*args: Any, **kwargs: Any) -> bytes:
        return _latin1_encode(*args, **kwargs)

    def _bytes(*args: object) -> bytes:
        return _empty_bytes(*args)

    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): ndarray_marker,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _encode,
        # Python 3 writes "__builtin__" for protocols < 3; Python 2 always does.
        ("__builtin__", "bytes"): _bytes,
        ("builtins", "bytes"): _bytes,
    }
    # numpy 1.x pickles name numpy.core, numpy 2.x numpy._core; Python 2 caches use numpy.core.
    for core in ("numpy.core", "numpy._core"):
        allowed[(f"{core}.multiarray", "_reconstruct")] = _reconstruct
        allowed[(f"{core}.multiarray", "scalar")] = _scalar
        allowed[(f"{core}.numeric", "_frombuffer")] = _frombuffer  # protocol 5
    return allowed


class _RestrictedUnpickler(pickle._Unpickler):  # type: ignore[name-defined]
    """Unpickler that resolves only the globals a numpy array pickle needs.

    The pure-Python unpickler, not the C one: its memo is a dict, where the C unpickler
    allocates (and zero-fills) a table up to the largest memo index a pickle names, so that
    a nine-byte pickle can take gigabytes of memory and minutes.
    """

    def __init__(self, file: BinaryIO) -> None:
        # latin1 turns Python 2 byte strings (array data, dict keys) into str that numpy
        # accepts back as bytes; Python 3 pickles contain no such strings, so it is harmless.
        super().__init__(file, encoding="latin1")
        self._allowed = _allowed_globals()

    def find_class(self, module: str, name: str) -> Any:
        # Every global a pickle refers to, also through EXT codes, is looked up here; the
        # refusal happens before anything is imported or called.
        try:
            return self._allowed[(module, name)]
        except (KeyError, TypeError):
            shown = f"{str(module)[:80]}.{str(name)[:80]}"
            raise ForbiddenPickleError(
                f"forbidden global '{shown}' in pickle: a dataset pickle (mini-ImageNet "
                "cache, CIFAR-100 batch) may only contain numpy arrays, dicts, lists, str, "
                "bytes, int and float. The file may be tampered with or not the dataset file "
                "it claims to be; nothing from it was run."
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise ForbiddenPickleError(
            f"persistent id (a {type(pid).__name__}) in pickle is not allowed."
        )


class _TrackedReader:
    """``file``'s ``read`` and ``readline``, remembering an error the file itself raised.

    Errors of the file (a truncated archive under a member, an I/O error) are passed on as
    they are; only errors of the pickle's contents become :class:`PickleFormatError`. A
    ``MemoryError`` or ``OverflowError`` of a read is the pickle's: it asked for an absurd
    number of bytes (a file object allocates the buffer for a read before filling it).
    """

    def __init__(self, file: BinaryIO) -> None:
        self._file = file
        self.error: BaseException | None = None

    def read(self, *args: Any) -> bytes:
        try:
            return self._file.read(*args)
        except (MemoryError, OverflowError):
            raise
        except BaseException as e:
            self.error = e
            raise

    def readline(self, *args: Any) -> bytes:
        try:
            return self._file.readline(*args)
        except (MemoryError, OverflowError):
            raise
        except BaseException as e:
            self.error = e
            raise


def restricted_pickle_load(file: BinaryIO, name: str | os.PathLike | None = None) -> Any:
    """Unpickle ``file`` allowing only numpy arrays, numpy scalars and plain containers.

    Accepts pickles written by Python 3 with protocols 0-5 under numpy 1.x or 2.x, and Python 2
    pickles (read with ``encoding="latin1"``). The result's structure is not checked here;
    see :func:`metajax.data.miniimagenet.validate_cache_structure`.

    Args:
      file: a binary file open for reading.
      name: how messages name the file, e.g. its path or ``"<archive>: member <name>"``;
        default ``file.name``, else ``"pickle"``.

    Raises:
      ForbiddenPickleError: a global other than the numpy ones (``os.system``, ``eval``, a
        custom class, ...), named, refused before it is imported or called; or unsafe
        arguments to an allowed one. Nothing from the file was run.
      PickleFormatError: a truncated or malformed pickle.
      Both are :class:`DataFormatError` (``ValueError``) and ``pickle.UnpicklingError``, and
      their messages begin with ``name``. An error raised by ``file`` itself (``OSError``,
      or a truncated archive under a member) is passed on unchanged.
    """
    where = str(name if name is not None else getattr(file, "name", None) or "pickle")
    reader = _TrackedReader(file)
    try:
        return _RestrictedUnpickler(reader).load()  # type: ignore[arg-type]
    except ForbiddenPickleError as e:
        raise ForbiddenPickleError(f"{where}: {e}") from None
    except Exception as e:
        if reader.error is not None and e is reader.error:
            raise
        # EOFError, UnpicklingError, and the ValueError, TypeError, KeyError, IndexError,
        # OverflowError or MemoryError of malformed opcodes or of numpy rebuilding an array.
        detail = str(e)[:200]
        cause = f"{type(e).__name__}: {detail}" if detail else type(e).__name__
        raise PickleFormatError(
            f"{where}: not a readable pickle, truncated or corrupt ({cause}); replace it with "
            "a good copy of the original file"
        ) from e
