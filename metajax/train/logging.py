"""Run logs: ``metrics.jsonl`` (one JSON object a line), optional TensorBoard event files
and a progress bar whose ETA leaves out compilation and follows the time budget."""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import NamedTuple, TextIO

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from metajax._files import atomic_write


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    """Append ``record`` as one line of JSON and flush it, so a crash loses no written line."""
    with open(path, "a") as f:
        f.write(dumps(record, sort_keys=True) + "\n")
        f.flush()


def dumps(value, **kwargs) -> str:
    """``json.dumps`` of :func:`to_jsonable` ``(value)``: always valid JSON (no bare NaN)."""
    return json.dumps(to_jsonable(value), allow_nan=False, **kwargs)


def _nonfinite_name(value: float) -> str:
    return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")


def _nonfinite_note(value) -> str | None:
    """What a value's nulls stand for: ``"nan"`` for a scalar, ``"nan at [0, 2]; inf at
    [1]"``-style positions for an array or list; None when all is finite."""
    if isinstance(value, dict):
        return None
    if isinstance(value, float | np.floating) or (
        isinstance(value, np.ndarray | jax.Array) and np.ndim(value) == 0
    ):
        scalar = float(value)
        return None if math.isfinite(scalar) else _nonfinite_name(scalar)
    if isinstance(value, list | tuple | np.ndarray | jax.Array):
        try:
            array = np.asarray(value, np.float64)
        except (TypeError, ValueError):
            return None  # ragged or not numbers: nested dicts carry their own notes
        bad = ~np.isfinite(array)
        if not bad.any():
            return None
        parts = []
        for name, mask in (("nan", np.isnan(array)), ("inf", np.isposinf(array)),
                           ("-inf", np.isneginf(array))):
            where = np.argwhere(mask).tolist()
            if where:
                shown = ", ".join(str(w if len(w) > 1 else w[0]) for w in where[:8])
                more = f" and {len(where) - 8} more" if len(where) > 8 else ""
                parts.append(f"{name} at {shown}{more}")
        return "; ".join(parts)
    return None


def to_jsonable(value, digits: int | None = None):
    """Scalars of numpy/JAX as Python numbers, ready for strict JSON.

    A NaN or infinite float becomes ``null``; in a dict, the key ``<key>_nonfinite`` then
    says what it was (``"nan"``, ``"inf"``, ``"-inf"``; for an array or list, which values
    at which positions), so a file never holds a bare ``NaN`` and never hides one. Arrays
    become (nested) lists, 0-d arrays and numpy scalars Python numbers. With ``digits``,
    every float is rounded to that many decimals (the continual run files).
    """
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            out[str(k)] = to_jsonable(v, digits)
            note = _nonfinite_note(v)
            if note is not None:
                out[f"{k}_nonfinite"] = note
        return out
    if isinstance(value, list | tuple):
        return [to_jsonable(v, digits) for v in value]
    if isinstance(value, np.ndarray | jax.Array) and np.ndim(value) > 0:
        array = np.asarray(value)
        if digits is not None or jnp.issubdtype(array.dtype, jnp.inexact):
            array = np.asarray(array, np.float64)
            if digits is not None:
                array = array.round(digits)
        return to_jsonable(array.tolist(), digits)
    if hasattr(value, "item") and np.ndim(value) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if digits is not None and isinstance(value, float):
        return round(value, digits)
    return value


class Eta(NamedTuple):
    """What :func:`estimate_eta` says: ``seconds`` left (None while unknown) and ``limit``,
    what ends the run first: ``"steps"`` (the work left at the measured rate), ``"budget"``
    (the time budget left) or ``""`` (not known yet)."""

    seconds: float | None
    limit: str


def estimate_eta(done: int, total: int, now: float, *, measured_from: tuple[float, int] | None,
                 budget_left_s: float | None = None) -> Eta:
    """The time left of a run: a pure function of the clock, for the progress bar.

    The rate is measured from ``measured_from = (time, done)``, the point after the first
    unit of work (a chunk of meta-steps, a task): that unit includes XLA's compilation and
    would make the first estimate far too long. Until a unit has finished after it, the
    step-based estimate is unknown. With ``budget_left_s`` (the time budget not yet spent,
    None without a budget) the estimate is the smaller of the two and ``limit`` says which.
    """
    by_steps = None
    if done >= total:
        by_steps = 0.0
    elif measured_from is not None:
        t0, n0 = measured_from
        if done > n0 and now > t0:
            by_steps = (total - done) * (now - t0) / (done - n0)
    if budget_left_s is not None:
        left = max(float(budget_left_s), 0.0)
        if by_steps is None or left < by_steps:
            return Eta(left, "budget")
    return Eta(by_steps, "steps" if by_steps is not None else "")


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class ProgressBar:
    """A progress bar on a terminal (stderr by default) counting units of work (meta-steps,
    tasks), with the rate and the ETA of :func:`estimate_eta` (compilation left out, the time
    budget followed) and the latest metrics.

    Nothing is written at all when ``enabled`` is False or the stream is not a terminal (a
    log file, a pipe, a batch job's output). ``initial`` units were done before (a resumed
    run); ``budget_s`` is the run's time budget (0: none), of which ``spent_s`` was spent by
    earlier attempts. ``clock`` (seconds, monotonic) is replaceable for tests.
    """

    def __init__(self, total: int, *, unit: str = "step", desc: str | None = None,
                 initial: int = 0, enabled: bool = True, budget_s: float = 0.0,
                 spent_s: float = 0.0, file: TextIO | None = None, clock=time.perf_counter):
        self.total, self.unit, self.done = int(total), unit, int(initial)
        self.file = sys.stderr if file is None else file
        self.enabled = bool(enabled) and _is_terminal(self.file)
        self._clock = clock
        self._start = clock()
        self._budget_s, self._spent_s = float(budget_s or 0.0), float(spent_s)
        self._measured_from: tuple[float, int] | None = None
        self._metrics: dict[str, str] = {}
        self._bar = None
        if self.enabled:
            head = f"{desc}: " if desc else ""
            self._bar = tqdm(
                total=self.total, initial=min(self.done, self.total), unit=unit,
                file=self.file, dynamic_ncols=True, mininterval=1.0,
                bar_format=head + "{percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} {unit} "
                                  "[{elapsed}{postfix}]",
            )

    def eta(self, now: float | None = None) -> Eta:
        """The ETA now (or at clock time ``now``)."""
        now = self._clock() if now is None else now
        budget_left = None
        if self._budget_s:
            budget_left = self._budget_s - self._spent_s - (now - self._start)
        return estimate_eta(self.done, self.total, now, measured_from=self._measured_from,
                            budget_left_s=budget_left)

    def status(self, now: float | None = None) -> str:
        """The text after the bar: the rate since the first unit (``12.5 step/s``, or
        ``40.0 s/task`` when slower than one a second), the ETA (followed by ``(time
        budget)`` when the budget ends the run first) and the metrics, e.g.
        ``12.5 step/s, ETA 01:40, meta_loss=0.1234``."""
        now = self._clock() if now is None else now
        parts = []
        if self._measured_from is not None:
            t0, n0 = self._measured_from
            if self.done > n0 and now > t0:
                rate = (self.done - n0) / (now - t0)
                parts.append(f"{rate:,.1f} {self.unit}/s" if rate >= 1
                             else f"{1 / rate:,.1f} s/{self.unit}")
        eta = self.eta(now)
        if eta.seconds is None:
            parts.append("ETA: measuring")
        else:
            text = f"ETA {tqdm.format_interval(eta.seconds)}"
            parts.append(text + (" (time budget)" if eta.limit == "budget" else ""))
        parts.extend(f"{k}={v}" for k, v in self._metrics.items())
        return ", ".join(parts)

    def update(self, n: int, **metrics) -> None:
        """``n`` more units done; ``metrics`` (already formatted or numbers) replace the shown
        ones. The first call ends the unit that compiled: the rate is measured from it."""
        now = self._clock()
        self.done += int(n)
        if self._measured_from is None:
            self._measured_from = (now, self.done)
        for key, value in metrics.items():
            self._metrics[key] = f"{value:.4g}" if isinstance(value, float) else str(value)
        if self._bar is not None:
            self._bar.set_postfix_str(self.status(now), refresh=False)
            self._bar.update(n)

    def close(self) -> None:
        """Close the bar (idempotent)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress_bar(total: int, enabled: bool = True, **kwargs) -> ProgressBar:
    """A :class:`ProgressBar` of ``total`` meta-steps on stderr (``kwargs``: its other
    arguments); silent when ``enabled`` is False or stderr is not a terminal."""
    return ProgressBar(total, enabled=enabled, **kwargs)


TENSORBOARD_DIR = "tensorboard"


def require_tensorboard() -> None:
    """Check that TensorBoard logging can work (``tensorboardX`` imports), before a run
    writes anything.

    Raises:
      ConfigError: it is not installed; the message names ``pip install
        "metajax[tensorboard]"``.
    """
    try:
        import tensorboardX  # noqa: F401
    except ImportError:
        from metajax.train.config import ConfigError

        raise ConfigError(
            "TensorBoard logging needs the tensorboardX package: "
            'pip install "metajax[tensorboard]" (or run without --tensorboard)'
        ) from None


class TensorBoardLog:
    """Scalars of a run as TensorBoard event files in ``RUN_DIR/tensorboard/`` (written with
    ``tensorboardX``, an optional dependency: ``pip install "metajax[tensorboard]"``).

    A new run (``purge_step`` None) starts from an empty folder; a resumed run appends a new
    event file whose first event tells TensorBoard to hide what earlier attempts logged at
    ``purge_step`` and later (steps the resumed run does again). Each :meth:`scalars` call is
    flushed, so a killed run keeps what it logged.

    Raises:
      ConfigError: ``tensorboardX`` is not installed (the message says what to install).
    """

    def __init__(self, run_dir: str | os.PathLike, *, purge_step: int | None = None):
        require_tensorboard()
        from tensorboardX import SummaryWriter

        self.directory = Path(run_dir) / TENSORBOARD_DIR
        if purge_step is None:
            shutil.rmtree(self.directory, ignore_errors=True)
        self.directory.mkdir(parents=True, exist_ok=True)
        # Event files are named by the second they were opened and the host; the suffix
        # keeps two attempts started within one second apart.
        self._writer = SummaryWriter(
            logdir=str(self.directory), purge_step=purge_step, flush_secs=30,
            filename_suffix=f".{os.getpid()}.{time.time_ns() % 10**9:09d}",
        )

    def scalars(self, step: int, values: dict, prefix: str = "") -> None:
        """Log every number of ``values`` as tag ``prefix + key`` at ``step`` (None and
        non-numbers are left out; NaN and infinity are logged as they are), then flush."""
        for key, value in values.items():
            if isinstance(value, bool) or value is None:
                continue
            if isinstance(value, int | float | np.integer | np.floating) or (
                isinstance(value, np.ndarray | jax.Array) and np.ndim(value) == 0
            ):
                self._writer.add_scalar(prefix + str(key), float(value), int(step))
        self._writer.flush()

    def close(self) -> None:
        """Flush and close the event file (idempotent)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None

def truncate_jsonl(path: str | os.PathLike, key: str, last: int) -> None:
    """Rewrite ``path`` (atomically; created when missing) with only its records whose
    integer ``key`` is at most ``last``: on resume, later lines came from work done again.
    A torn (unparsable) line is dropped."""
    path = Path(path)
    kept = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and isinstance(record.get(key), int) \
                    and record[key] <= last:
                kept.append(line)
    text = "".join(line + "\n" for line in kept)
    atomic_write(path, lambda f: f.write(text.encode()))


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """All records of a JSONL file."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
