"""Where dataset files live, downloads checked against checksums, and crash-safe caches.

A file either arrives whole and verified or not at all: downloads go to a temporary file
beside the destination and are renamed into place only after their size and sha256 match,
and caches are written the same way (:func:`atomic_save_npz`). Dataset pickles (mini-ImageNet
caches, CIFAR-100 batches) are read by :func:`restricted_pickle_load`, which builds numpy
arrays and plain containers and nothing else.
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
from collections.abc import Callable, Iterable
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
    """
    if data_dir is not None:
        return Path(data_dir).expanduser()
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        return Path(env).expanduser()
    return user_cache_dir()


def user_cache_dir() -> Path:
    """The per-user cache folder: ``$XDG_CACHE_HOME/metajax`` (``~/.cache/metajax`` when unset).

    Unlike :func:`resolve_data_dir` it ignores ``$METAJAX_DATA_DIR``, so it is the place to
    fall back to when the data directory is read-only.
    """
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(cache) / "metajax"


def atomic_save_npz(path: str | os.PathLike, **arrays: np.ndarray) -> Path:
    """Write ``arrays`` to ``path`` as ``.npz`` through a temporary file and an atomic rename.

    A reader sees either no file or the whole file, never a partial one.
    """
    return atomic_write(path, lambda f: np.savez(f, **arrays))


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


class ForbiddenPickleError(pickle.UnpicklingError):
    """A pickle asked for something a dataset pickle never needs; nothing was run."""


def _latin1_encode(obj: str, encoding: str = "latin1", errors: str = "strict") -> bytes:
    # Python 3 writes bytes under pickle protocols 0-2 as _codecs.encode(text, "latin1"); no
    # other codec is needed, and refusing the rest keeps codec lookups out of reach.
    if encoding.lower().replace("_", "-") not in ("latin1", "latin-1") or errors != "strict":
        raise ForbiddenPickleError(
            f"_codecs.encode called with encoding={encoding!r}, errors={errors!r}; "
            "only 'latin1' appears in numpy array pickles."
        )
    if not isinstance(obj, str):
        raise ForbiddenPickleError(f"_codecs.encode expects str, got {type(obj).__name__}.")
    return codecs.encode(obj, "latin1")


def _empty_bytes(*args: object) -> bytes:
    # Protocols 0-2 write b"" (the data of an empty array) as bytes(); bytes(n) with an
    # attacker-chosen n would allocate n bytes, so arguments are refused.
    if args:
        raise ForbiddenPickleError(f"bytes{args!r} is not allowed; only bytes() is.")
    return b""


def _numpy_callables() -> tuple[Callable[..., Any], Callable[..., Any], Callable[..., Any]]:
    # Taken from numpy's own reductions, so the right functions are found on numpy 1.x
    # (numpy.core) and 2.x (numpy._core) alike without importing the deprecated module.
    reconstruct = np.zeros(1).__reduce__()[0]
    frombuffer = np.zeros(1).__reduce_ex__(5)[0]
    scalar = np.float64(0).__reduce__()[0]
    return reconstruct, frombuffer, scalar


def _allowed_globals() -> dict[tuple[str, str], Any]:
    reconstruct, frombuffer, scalar = _numpy_callables()

    # Fresh wrappers rather than numpy's functions themselves: pickle's BUILD opcode can set
    # attributes on any object it has, and it must not reach shared module-level objects.
    def _reconstruct(subtype: object, shape: object, dtype: object) -> np.ndarray:
        if subtype is not np.ndarray:
            raise ForbiddenPickleError(
                f"_reconstruct of {subtype!r} refused; only plain numpy.ndarray is allowed."
            )
        return reconstruct(subtype, shape, dtype)

    def _frombuffer(*args: object) -> np.ndarray:
        return frombuffer(*args)

    def _scalar(*args: object) -> object:
        return scalar(*args)

    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode,
        # Python 3 writes "__builtin__" for protocols < 3; Python 2 always does.
        ("__builtin__", "bytes"): _empty_bytes,
        ("builtins", "bytes"): _empty_bytes,
    }
    # numpy 1.x pickles name numpy.core, numpy 2.x numpy._core; Python 2 caches use numpy.core.
    for core in ("numpy.core", "numpy._core"):
        allowed[(f"{core}.multiarray", "_reconstruct")] = _reconstruct
        allowed[(f"{core}.multiarray", "scalar")] = _scalar
        allowed[(f"{core}.numeric", "_frombuffer")] = _frombuffer  # protocol 5
    return allowed


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals a numpy array pickle needs."""

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
        except KeyError:
            raise ForbiddenPickleError(
                f"forbidden global '{module}.{name}' in pickle: a dataset pickle (mini-ImageNet "
                "cache, CIFAR-100 batch) may only contain numpy arrays, dicts, lists, str, "
                "bytes, int and float. The file may be tampered with or not the dataset file "
                "it claims to be; nothing from it was run."
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise ForbiddenPickleError(f"persistent id {pid!r} in pickle is not allowed.")


def restricted_pickle_load(file: BinaryIO) -> Any:
    """Unpickle ``file`` allowing only numpy arrays, numpy scalars and plain containers.

    Accepts pickles written by Python 3 with protocols 0-5 under numpy 1.x or 2.x, and Python 2
    pickles (read with ``encoding="latin1"``). Any other global (``os.system``, ``eval``, a
    custom class, ...) raises :class:`ForbiddenPickleError` (a ``pickle.UnpicklingError``)
    naming it, before it is imported or called. The result's structure is not checked here;
    see :func:`validate_cache_structure`.
    """
    return _RestrictedUnpickler(file).load()
