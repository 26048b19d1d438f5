"""Writing files so that a crash leaves either the old file or the whole new one."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# Read once, at import (in the main thread, before any writer thread could create a file
# while the mask is briefly changed).
_UMASK = _current_umask()
FILE_MODE = 0o666 & ~_UMASK


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> Path:
    """Call ``write(f)`` on a temporary file beside ``path``, sync it, then rename it over.

    A reader sees either no file (or the previous one) or the whole new file, never a part;
    on any error the temporary file is removed and the error re-raised. The file gets the
    mode a plain ``open`` would give it (``0o666`` less the umask: ``0o644`` usually), not
    the ``0o600`` of a temporary file, so colleagues can read shared checkpoints and caches.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        os.fchmod(fd, FILE_MODE)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
