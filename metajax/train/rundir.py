"""Run directories: one run per directory, the kind of run it holds, no leftovers.

A run directory belongs to one run at a time: :class:`RunLock` takes an exclusive lock
(``.metajax.lock``, holding the pid, the host and the command) before anything else is
written, and a second command on the same directory is refused while the first runs. A
lock left by a run that died (SIGKILL, power loss) is detected, reported and taken over.

``run.json`` records what the directory holds: the kind of run (``train`` or
``continual``) and the fingerprint of its configuration (everything that changes the
result; not the stopping criteria), so a rerun can tell "the same run, resumable" from
"another run" without comparing every field.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import socket
import sys
import time
from pathlib import Path

from metajax._files import FILE_MODE, atomic_write
from metajax.train.config import ConfigError

LOCK_FILE = ".metajax.lock"
RUN_FILE = "run.json"


class RunDirError(ConfigError):
    """A run directory a command cannot use; the message says why and what to do."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """An exclusive lock on a run directory, held from ``__enter__`` to ``__exit__``.

    The lock is an ``flock`` on ``DIR/.metajax.lock``, so the operating system releases it
    when the holder dies however it dies; the file also holds ``{"pid", "host", "command",
    "started"}`` for the message a refused command prints. A lock file whose ``flock`` is
    free but whose content names another process is the trace of a run that died: it is
    reported through ``log`` and taken over.

    Args:
      run_dir: the directory (created, with its parents, when missing).
      command: what holds the lock (``"train"``, ``"continual"``, ``"evaluate"``), for the
        messages.
      log: called with a one-line report when a stale lock is taken over.

    Raises:
      RunDirError: another live process holds the directory.
    """

    def __init__(self, run_dir: str | os.PathLike, command: str, log=None):
        self.run_dir = Path(run_dir)
        self.command = command
        self.log = log or (lambda message: print(message, file=sys.stderr))
        self.created_dir = False
        self._fd: int | None = None
        self.stale: dict | None = None

    def __enter__(self) -> RunLock:
        if not self.run_dir.exists():
            self.created_dir = True
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / LOCK_FILE
        for _ in range(20):
            fd = os.open(path, os.O_RDWR | os.O_CREAT, FILE_MODE)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                os.close(fd)
                if err.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise
                holder = _read_holder(path)
                raise RunDirError(
                    f"{self.run_dir} is in use by another run ({_describe(holder)}); wait for "
                    "it to end or choose another --out"
                ) from None
            # The holder before us may have unlinked the file between our open and our lock:
            # then we hold a lock on a file nobody else sees; open the new one instead.
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        else:
            raise RunDirError(f"{path}: could not take the lock (the file keeps changing)")
        previous = _read_holder(path)
        if previous and previous.get("pid") != os.getpid():
            if previous.get("host") != socket.gethostname():
                os.close(fd)
                raise RunDirError(
                    f"{self.run_dir} may be in use by a run on another machine "
                    f"({_describe(previous)}; this file system cannot tell); if that run is "
                    f"over, delete {path}"
                )
            self.stale = previous
            self.log(f"metajax: {self.run_dir}: stale lock of a run that ended without "
                     f"releasing it ({_describe(previous)}); taking it over")
        record = {"pid": os.getpid(), "host": socket.gethostname(), "command": self.command,
                  "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def release(self, remove_dir: bool = False) -> None:
        """Remove the lock file and release the lock (idempotent); with ``remove_dir``, also
        remove the run directory, while still holding the lock, when this lock created it
        and nothing else is in it."""
        if self._fd is None:
            return
        try:
            (self.run_dir / LOCK_FILE).unlink(missing_ok=True)
            if remove_dir and self.created_dir:
                try:
                    self.run_dir.rmdir()
                except OSError:
                    pass  # not empty (someone wrote into it) or already gone: leave it
        finally:
            os.close(self._fd)
            self._fd = None


def _read_holder(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text() or "null")
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _describe(holder: dict | None) -> str:
    if not holder:
        return "holder unknown"
    return (f"`metajax {holder.get('command', '?')}`, pid {holder.get('pid', '?')} on "
            f"{holder.get('host', '?')}, started {holder.get('started', '?')}")


def read_run_record(run_dir: str | os.PathLike) -> dict | None:
    """``run.json`` of ``run_dir`` as a dict, or None when there is none.

    Raises:
      RunDirError: the file exists but is not a run record (names the file).
    """
    path = Path(run_dir) / RUN_FILE
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise RunDirError(f"{path}: not a readable run record ({err}); remove the directory "
                          "or choose another --out") from None
    if not isinstance(data, dict) or not isinstance(data.get("kind"), str):
        raise RunDirError(f"{path}: not a run record (no 'kind'); choose another --out")
    return data


def write_run_record(run_dir: str | os.PathLike, kind: str, fingerprint: str) -> None:
    """Write ``run.json``: the kind of run and the fingerprint of its configuration."""
    text = json.dumps({"kind": kind, "fingerprint": fingerprint}, indent=1) + "\n"
    atomic_write(Path(run_dir) / RUN_FILE, lambda f: f.write(text.encode()))


def check_kind(run_dir: str | os.PathLike, kind: str, record: dict | None) -> None:
    """Refuse a directory that holds a run of another kind (``train`` vs ``continual``).

    Directories written before ``run.json`` existed are recognised by their files.
    """
    run_dir = Path(run_dir)
    other = None
    if record is not None and record["kind"] != kind:
        other = record["kind"]
    elif record is None:
        if kind == "train" and (run_dir / "tasks.jsonl").exists():
            other = "continual"
        elif kind == "continual" and (
            (run_dir / "metrics.jsonl").exists() or (run_dir / "meta_params.msgpack").exists()
        ):
            other = "train"
    if other is not None:
        raise RunDirError(
            f"--out {run_dir} holds a `metajax {other}` run, not a `metajax {kind}` run; "
            "choose another directory"
        )


# Every file a run writes through atomic_write; a killed write leaves NAME.XXXXXXXX.tmp.
RUN_FILES = ("config.json", RUN_FILE, "metrics.jsonl", "tasks.jsonl", "meta_params.msgpack",
             "best_meta_params.msgpack", "acc_matrix.json", "acc_matrix.png", "metrics.json",
             "evaluations.jsonl", "curves.png", "task_curves.png")
_NAMES = "|".join(map(re.escape, RUN_FILES))
_LEFTOVER = re.compile(rf"^({_NAMES})\.[A-Za-z0-9_]+\.tmp$")


def remove_leftovers(run_dir: str | os.PathLike) -> list[Path]:
    """Delete the temporary files a killed atomic write of a run file left in ``run_dir``
    (``config.json.k2j4x9.tmp``; no other file is touched); return them.

    Call it only while holding the directory's :class:`RunLock`.
    """
    removed = []
    for path in Path(run_dir).iterdir():
        if _LEFTOVER.match(path.name) and path.is_file():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


PROGRESS_FILES = ("metrics.jsonl", "meta_params.msgpack", "tasks.jsonl", "metrics.json")


def has_progress(run_dir: str | os.PathLike) -> bool:
    """Whether ``run_dir`` holds anything a run produced (a checkpoint, a logged step,
    saved parameters, a finished task) rather than only the files a start writes."""
    run_dir = Path(run_dir)
    checkpoints = run_dir / "checkpoints"
    if checkpoints.is_dir() and any(p.name.isdigit() for p in checkpoints.iterdir()):
        return True
    for name in PROGRESS_FILES:
        path = run_dir / name
        if path.is_file() and path.stat().st_size > 0:
            return True
    return False


def remove_new_run_files(run_dir: str | os.PathLike, before: set[str]) -> None:
    """Remove the run files a start wrote before it failed, so that the corrected command
    starts cleanly: only the names in :data:`RUN_FILES` (and the folders ``checkpoints/``
    and ``tensorboard/``) that were not in ``before`` (the directory's names when the start
    began). Call it only when :func:`has_progress` is False, holding the lock."""
    run_dir = Path(run_dir)
    for name in RUN_FILES:
        path = run_dir / name
        if name not in before and path.is_file():
            path.unlink(missing_ok=True)
    import shutil

    for folder in ("checkpoints", "tensorboard"):
        path = run_dir / folder
        if folder not in before and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
    remove_leftovers(run_dir)
