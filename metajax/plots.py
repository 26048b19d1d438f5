"""Plots of a run directory, drawn with matplotlib's Agg canvas (no display, no pyplot state).

:func:`plot_run` tells the kind of run from ``run.json`` (or, for a directory written by the
Python API, from its files) and (re)writes its plots from the run's files alone, so it
redraws those of a finished, a running or an interrupted run alike:

- a meta-training run (:func:`metajax.train.loop.train`, ``metajax train``):
  ``curves.png``, 1200 x 800 pixels: the meta-training loss and the validation metric,
  each against meta-steps and against wall time (``metrics.jsonl``);
- a continual run (:func:`metajax.train.continual.train_continual`, ``metajax continual``):
  ``acc_matrix.png``, 900 x 750 pixels: the accuracy matrix (after training task i, on task
  j) as a heatmap, averaged over the seeds; ``task_curves.png``, 1000 x 650 pixels: the
  accuracy on each task j after each task i, with the mean over the tasks learned so far.
  A run that is not finished shows the tasks it has finished (``tasks.jsonl``).
- a continual sweep (``--sweep``): ``acc_matrix.png`` holds one heatmap per setting (each
  averaged over its seeds; its size grows with the settings) and ``task_curves.png`` the
  mean accuracy over the tasks learned so far, one line per setting.

The runs write these plots themselves when they end, through :func:`write_plots`, which
only warns when a plot fails: a plot never fails a run.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from metajax._files import atomic_write

CURVES_FILE = "curves.png"
HEATMAP_FILE = "acc_matrix.png"
TASK_CURVES_FILE = "task_curves.png"
#: Dots per inch of every plot: the sizes above are in pixels at this resolution.
DPI = 100
CURVES_INCHES = (12.0, 8.0)
HEATMAP_INCHES = (9.0, 7.5)
TASK_CURVES_INCHES = (10.0, 6.5)
#: At most this many settings of a sweep are drawn (the title says when there are more).
MAX_SETTINGS = 20
_MISSING_COLOUR = "#d62728"
_UNTRAINED_COLOUR = "#d9d9d9"


def plot_run(run_dir: str | os.PathLike) -> list[Path]:
    """(Re)write the plots of ``run_dir`` (see the module's description) and return their
    paths.

    Raises:
      RunDirError: ``run_dir`` is not a run directory, or holds nothing to plot yet (the
        message says which).
    """
    run_dir = Path(run_dir)
    kind = run_kind(run_dir)
    if kind == "train":
        return [plot_training(run_dir)]
    return plot_continual(run_dir)


def write_plots(run_dir: str | os.PathLike) -> list[Path]:
    """:func:`plot_run`, for the end of a run: any error becomes one ``RuntimeWarning``
    (naming the directory and how to draw the plots again) and ``[]``; it never raises."""
    try:
        return plot_run(run_dir)
    except Exception as err:  # a plot must never fail or lose a run
        warnings.warn(
            f"metajax: the plots of {run_dir} were not written ({type(err).__name__}: {err}); "
            f"the run itself is complete and `metajax plot {run_dir}` draws them again",
            RuntimeWarning, stacklevel=2,
        )
        return []


def run_kind(run_dir: str | os.PathLike) -> str:
    """``"train"`` or ``"continual"``: what ``run.json`` records, or for a directory without
    it, what its files say (``tasks.jsonl`` / ``acc_matrix.json``: continual;
    ``metrics.jsonl``: train).

    Raises:
      RunDirError: not a directory, an unreadable ``run.json``, or no run's files.
    """
    from metajax.train.rundir import RunDirError, read_run_record

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunDirError(f"{run_dir}: no such run directory")
    record = read_run_record(run_dir)
    if record is not None:
        if record["kind"] not in ("train", "continual"):
            raise RunDirError(f"{run_dir}/run.json: a run of kind {record['kind']!r}; only "
                              "train and continual runs have plots")
        return record["kind"]
    if (run_dir / "tasks.jsonl").is_file() or (run_dir / "acc_matrix.json").is_file():
        return "continual"
    if (run_dir / "metrics.jsonl").is_file():
        return "train"
    raise RunDirError(f"{run_dir}: not a metajax run directory (no run.json, metrics.jsonl "
                      "or tasks.jsonl)")


# --------------------------------------------------------------------------- files


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _read_records(path: Path) -> list[dict]:
    """The records of a JSONL file; a torn line (a run writing or killed) is skipped."""
    records = []
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return records
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def _number(value) -> float:
    """A JSON number as a float; ``null`` (a non-finite value in the run files) as NaN."""
    return float("nan") if value is None else float(value)


def _array(value) -> np.ndarray:
    """Nested JSON lists as a float array, ``null`` as NaN."""
    if isinstance(value, list):
        return np.array([_array(v) for v in value], np.float64)
    return np.float64(_number(value))


def _save(fig, path: Path) -> Path:
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=DPI))
    return path


def _figure(inches: tuple[float, float]):
    """A figure on its own Agg canvas (no pyplot, no global state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=inches, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _title(config: dict, *keys: str) -> str:
    """``preset: algorithm on dataset`` from what ``config`` holds of ``keys``."""
    preset = config.get("preset") or "custom run"
    what = config.get(keys[0])
    where = config.get(keys[1]) if len(keys) > 1 else None
    text = f"{preset}: {what}" if what else str(preset)
    return text + (f" on {where}" if where else "")


# --------------------------------------------------------------------------- meta-training


def _wall_unit(seconds: float) -> tuple[float, str]:
    if seconds <= 180:
        return 1.0, "s"
    if seconds <= 3 * 3600:
        return 60.0, "min"
    return 3600.0, "h"


def _series(ax, xs, ys, *, label: str, colour: str, marker: str | None = None) -> None:
    """Plot the finite points of ``ys`` against ``xs``; mark the non-finite ones (a NaN
    loss, a metric with no applied step) with red crosses at the bottom of the axes."""
    xs, ys = np.asarray(xs, np.float64), np.asarray(ys, np.float64)
    good = np.isfinite(ys) & np.isfinite(xs)
    ax.plot(xs[good], ys[good], color=colour, marker=marker, markersize=3, linewidth=1.4,
            label=label)
    bad = ~np.isfinite(ys) & np.isfinite(xs)
    if bad.any():
        ax.plot(xs[bad], np.full(bad.sum(), 0.02), linestyle="none", marker="x",
                color=_MISSING_COLOUR, markersize=7, transform=ax.get_xaxis_transform(),
                label=f"non-finite ({int(bad.sum())})")


def plot_training(run_dir: str | os.PathLike) -> Path:
    """Write ``curves.png`` of a meta-training run from its ``metrics.jsonl`` and
    ``config.json``: meta-training loss (top) and validation metric (bottom) against
    meta-steps (left) and wall time (right); non-finite values are marked, not dropped.
    Returns the path.

    Raises:
      RunDirError: no meta-training step is logged yet.
    """
    from metajax.train.rundir import RunDirError

    run_dir = Path(run_dir)
    records = _read_records(run_dir / "metrics.jsonl")
    config = _read_json(run_dir / "config.json")
    config = config if isinstance(config, dict) else {}
    train = [r for r in records if "meta_loss" in r and isinstance(r.get("step"), int)]
    if not train:
        raise RunDirError(f"{run_dir}: no meta-training step logged in metrics.jsonl yet")
    metrics = sorted({k for r in records for k in r
                      if k.startswith("val_") and not k.endswith("_nonfinite")})
    wall_at = {r["step"]: r.get("wall_s") for r in train}
    steps = [r["step"] for r in train]
    losses = [_number(r.get("meta_loss")) for r in train]
    walls = [_number(r.get("wall_s")) for r in train]
    longest = max([_number(r.get("wall_s")) for r in records
                   if isinstance(r.get("wall_s"), int | float)], default=0.0)
    scale, unit = _wall_unit(longest)

    fig = _figure(CURVES_INCHES)
    axes = fig.subplots(2, 2, sharex="col")  # each column's two panels share their x-axis
    total = config.get("steps")
    done = max(steps)
    title = _title(config, "algorithm", "dataset")
    title += f": {done:,} of {total:,} meta-steps" if isinstance(total, int) else \
        f": {done:,} meta-steps"
    fig.suptitle(title, fontsize=14)
    for col, xs, xlabel in ((0, steps, "meta-step"),
                            (1, np.asarray(walls) / scale, f"wall time ({unit})")):
        ax = axes[0, col]
        _series(ax, xs, losses, label="meta-training loss (chunk mean)", colour="#1f77b4")
        finite = [v for v in losses if math.isfinite(v)]
        if finite and min(finite) > 0 and max(finite) / min(finite) > 30:
            ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("meta-training loss")
        ax.set_title(f"meta-training loss against {xlabel.split(' (')[0]}")
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=9)
        if col == 1 and not np.isfinite(np.asarray(walls, np.float64)).any():
            ax.text(0.5, 0.5, "metrics.jsonl records no wall time", transform=ax.transAxes,
                    ha="center", va="center", color="grey")
    for col in (0, 1):
        ax = axes[1, col]
        for i, key in enumerate(metrics):
            rows = [r for r in records if key in r and isinstance(r.get("step"), int)]
            vsteps = [r["step"] for r in rows]
            values = [_number(r[key]) for r in rows]
            if col == 0:
                xs = vsteps
            else:  # earlier runs logged validation lines without wall_s: take their chunk's
                xs = [_number(r.get("wall_s", wall_at.get(r["step"]))) / scale for r in rows]
            _series(ax, xs, values, label=f"validation {key[4:]}", colour=f"C{i + 1}",
                    marker="o")
        ax.set_xlim(left=0)
        ax.tick_params(labelbottom=True)
        axes[0, col].tick_params(labelbottom=True)
        ax.set_xlabel("meta-step" if col == 0 else f"wall time ({unit})")
        name = ", ".join(k[4:] for k in metrics) or "metric"
        ax.set_ylabel(f"validation {name}")
        ax.set_title(f"validation {name} against " + ("meta-step" if col == 0 else "wall time"))
        ax.grid(alpha=0.3)
        if metrics:
            ax.legend(loc="best", fontsize=9)
        else:
            ax.text(0.5, 0.5, "no validation logged yet", transform=ax.transAxes,
                    ha="center", va="center", color="grey")
    return _save(fig, run_dir / CURVES_FILE)


# --------------------------------------------------------------------------- continual


def _continual(run_dir: Path) -> dict:
    """What the continual plots need: ``runs`` ``[R, T, T]`` (NaN rows: not trained yet),
    ``groups`` (the run indices of each setting; one group without a sweep), the
    ``settings`` (None without a sweep), ``seeds`` and the labels."""
    from metajax.train.rundir import RunDirError

    config = _read_json(run_dir / "config.json")
    config = config if isinstance(config, dict) else {}
    metrics = _read_json(run_dir / "metrics.json")
    summary = metrics.get("summary", {}) if isinstance(metrics, dict) else {}
    labels = {k: summary.get(k, config.get(k)) for k in ("preset", "learner", "benchmark")}
    saved = _read_json(run_dir / "acc_matrix.json")
    if isinstance(saved, dict) and "acc_matrix" in saved:
        matrix = _array(saved["acc_matrix"])
        runs = matrix[None] if matrix.ndim == 2 else matrix
    else:
        rows = {}
        for record in _read_records(run_dir / "tasks.jsonl"):
            if isinstance(record.get("task"), int) and "acc" in record:
                rows[record["task"]] = _array(record["acc"])
        if not rows:
            raise RunDirError(f"{run_dir}: no finished task in tasks.jsonl yet: nothing to plot")
        first = next(iter(rows.values()))
        first = first[None] if first.ndim == 1 else first
        count, num_tasks = first.shape
        runs = np.full((count, num_tasks, num_tasks), np.nan)
        for t, row in rows.items():
            if t < num_tasks:
                runs[:, t] = row[None] if row.ndim == 1 else row
    if runs.ndim != 3 or runs.shape[1] != runs.shape[2] or runs.shape[1] == 0:
        raise RunDirError(f"{run_dir}: the accuracy matrix has shape {runs.shape[1:]}, not "
                          "[tasks, tasks]")
    settings = None
    if isinstance(summary.get("sweep"), list) and summary["sweep"]:
        settings = [entry.get("setting", {}) for entry in summary["sweep"]]
    elif str(config.get("sweep") or "").strip():
        settings = _config_settings(run_dir)
    count = runs.shape[0]
    seeds = summary.get("seeds", config.get("seeds"))
    if settings is None and count > 1 and isinstance(seeds, int) and seeds > 0 \
            and count % seeds == 0 and count // seeds > 1:
        settings = [{"setting": i} for i in range(count // seeds)]
    if settings and count % len(settings) == 0:
        per = count // len(settings)
        groups = [list(range(i * per, (i + 1) * per)) for i in range(len(settings))]
        seeds = per
    else:
        settings, groups, seeds = None, [list(range(count))], count
    return {"runs": runs, "groups": groups, "settings": settings, "seeds": seeds,
            "labels": labels}


def _config_settings(run_dir: Path) -> list[dict] | None:
    try:
        from metajax.presets.continual import ContinualConfig

        return ContinualConfig.from_json_file(run_dir / "config.json").sweep_settings()
    except Exception:  # only the labels of the settings are lost
        return None


def _setting_text(setting: dict) -> str:
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                     for k, v in setting.items()) or "default"


def _seeds_text(seeds: int) -> str:
    return "1 seed" if seeds == 1 else f"mean over {seeds} seeds"


def _progress_text(R: np.ndarray) -> str:
    trained = int(np.isfinite(R).any(axis=1).sum())
    T = R.shape[0]
    if trained == T and np.isfinite(R[-1]).all():
        return f"ACC {R[-1].mean():.3f}"
    return f"{trained} of {T} tasks trained"


def plot_continual(run_dir: str | os.PathLike) -> list[Path]:
    """Write ``acc_matrix.png`` and ``task_curves.png`` of a continual run (a sweep: one
    heatmap and one curve per setting) from ``acc_matrix.json``, or while it runs
    ``tasks.jsonl``, with the labels of ``metrics.json`` / ``config.json``. Returns the
    paths.

    Raises:
      RunDirError: no task is finished yet.
    """
    run_dir = Path(run_dir)
    data = _continual(run_dir)
    labels, runs, seeds = data["labels"], data["runs"], data["seeds"]
    name = _title(labels, "learner", "benchmark")
    if data["settings"] is None:
        R = runs.mean(axis=0)
        heat = plot_acc_matrix(
            R, run_dir / HEATMAP_FILE,
            title=f"{name}\naccuracy matrix, {_seeds_text(seeds)}; {_progress_text(R)}")
        curves = plot_task_curves(
            runs, run_dir / TASK_CURVES_FILE,
            title=f"{name}\naccuracy on each task, {_seeds_text(seeds)}; {_progress_text(R)}")
        return [heat, curves]
    matrices = [runs[g].mean(axis=0) for g in data["groups"]]
    names = [_setting_text(s) for s in data["settings"]]
    heat = plot_sweep_matrices(matrices, names, run_dir / HEATMAP_FILE,
                               title=f"{name}: sweep of {len(names)} settings, "
                                     f"{_seeds_text(seeds)} each")
    curves = plot_sweep_curves([runs[g] for g in data["groups"]], names,
                               run_dir / TASK_CURVES_FILE,
                               title=f"{name}: sweep of {len(names)} settings, "
                                     f"{_seeds_text(seeds)} each")
    return [heat, curves]


def _cell_format(T: int, room: float = 1.0) -> tuple[str | None, float]:
    """How values are printed in the cells of a ``T x T`` heatmap: a format (None: too
    small to print) and a font size; ``room`` scales for smaller panels."""
    if T <= 10 * room:
        return "{:.2f}", 10 if room >= 1 else 8
    if T <= 20 * room:
        return "{:.0f}", 7  # percent
    return None, 0.0


def _heatmap(ax, R: np.ndarray, *, room: float = 1.0, labels: bool = True):
    """Draw one accuracy matrix on ``ax`` (NaN cells grey: not trained yet); returns the
    image for the colour bar."""
    import matplotlib as mpl

    T = R.shape[0]
    cmap = mpl.colormaps["viridis"].with_extremes(bad=_UNTRAINED_COLOUR)
    image = ax.imshow(np.ma.masked_invalid(R), cmap=cmap, vmin=0.0, vmax=1.0,
                      interpolation="nearest", aspect="equal")
    every = max(1, math.ceil(T / (20 * room)))
    ticks = list(range(0, T, every))
    ax.set_xticks(ticks)
    ax.set_yticks(ticks)
    ax.tick_params(labelsize=9 if room >= 1 else 7)
    ax.set_xlabel("accuracy on task j")
    if labels:
        ax.set_ylabel("after training task i")
    form, size = _cell_format(T, room)
    if form is not None:
        for i in range(T):
            for j in range(T):
                v = R[i, j]
                if not np.isfinite(v):
                    continue
                shown = v if form == "{:.2f}" else 100 * v
                ax.text(j, i, form.format(shown), ha="center", va="center", fontsize=size,
                        color="black" if v > 0.6 else "white")
    return image, form


def plot_acc_matrix(matrix, path: str | os.PathLike, *, title: str = "") -> Path:
    """Write the accuracy matrix ``matrix[i, j]`` (accuracy on task j after training task
    i; NaN: not measured, drawn grey) as a 900 x 750 heatmap PNG at ``path``: task ticks on
    both axes, a colour bar from 0 to 1, the values in the cells when they fit (up to 10
    tasks as fractions, up to 20 as percentages). Returns the path."""
    return _save(acc_matrix_figure(matrix, title=title), Path(path))


def acc_matrix_figure(matrix, *, title: str = ""):
    """The matplotlib ``Figure`` (on an Agg canvas) that :func:`plot_acc_matrix` saves; its
    first axes hold the heatmap, cell ``(i, j)`` centred at data coordinates ``(j, i)``."""
    R = np.asarray(matrix, np.float64)
    if R.ndim != 2 or R.shape[0] != R.shape[1] or R.shape[0] == 0:
        raise ValueError(f"an accuracy matrix must be [tasks, tasks], not {R.shape}")
    fig = _figure(HEATMAP_INCHES)
    ax = fig.subplots()
    image, form = _heatmap(ax, R)
    bar = fig.colorbar(image, ax=ax, shrink=0.85)
    bar.set_label("accuracy" + (" (cells in %)" if form == "{:.0f}" else ""))
    if not np.isfinite(R).all():
        title += "\n(grey: not trained yet)" if np.isnan(R).all(axis=1).any() \
            else "\n(grey: non-finite)"
    ax.set_title(title, fontsize=12)
    return fig


def _mean_so_far(R: np.ndarray) -> np.ndarray:
    """Mean accuracy over tasks 0..i after training task i, for each i (``[..., T]``)."""
    T = R.shape[-1]
    mask = np.tril(np.ones((T, T), bool))
    return np.where(mask, R, 0.0).sum(-1) / mask.sum(-1)


def plot_task_curves(runs, path: str | os.PathLike, *, title: str = "") -> Path:
    """Write the accuracy on each task j after training each task i as a 1000 x 650 PNG at
    ``path``: one line per task j (dotted before task j is trained: forward transfer), and
    in black the mean over the tasks trained so far (with its spread over the seeds, one
    standard deviation, when ``runs`` holds several). ``runs`` is ``[T, T]`` or
    ``[seeds, T, T]``; NaN rows (tasks not trained yet) are left out of the lines. Returns
    the path."""
    import matplotlib as mpl

    runs = np.asarray(runs, np.float64)
    runs = runs[None] if runs.ndim == 2 else runs
    if runs.ndim != 3 or runs.shape[1] != runs.shape[2] or runs.shape[1] == 0:
        raise ValueError(f"accuracy matrices must be [seeds, tasks, tasks], not {runs.shape}")
    R = runs.mean(axis=0)
    T = R.shape[0]
    fig = _figure(TASK_CURVES_INCHES)
    ax = fig.subplots()
    # viridis up to its light green: the yellow end is unreadable on white
    colours = mpl.colormaps["viridis"](np.linspace(0.0, 0.9, T))
    x = np.arange(T)
    for j in range(T):
        colour = colours[j]
        before, after = x <= j, x >= j
        ax.plot(x[before], R[before, j], color=colour, linestyle=":", linewidth=1)
        ax.plot(x[after], R[after, j], color=colour, linewidth=1.5, marker="o",
                markersize=3, label=f"task {j}" if T <= 10 else None)
    means = _mean_so_far(runs)
    mean = means.mean(axis=0)
    ax.plot(x, mean, color="black", linewidth=2.5, label="mean over tasks 0..i")
    if runs.shape[0] > 1:
        spread = means.std(axis=0)
        ax.fill_between(x, mean - spread, mean + spread, color="black", alpha=0.15,
                        label=f"±1 std over {runs.shape[0]} seeds", linewidth=0)
    ax.set_xlabel("after training task i")
    ax.set_ylabel("accuracy")
    ax.set_xlim(-0.3, T - 0.7)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xticks(list(range(0, T, max(1, math.ceil(T / 20)))))
    ax.grid(alpha=0.3)
    if T > 10:
        norm = mpl.colors.BoundaryNorm(np.arange(T + 1) - 0.5, T)
        mappable = mpl.cm.ScalarMappable(norm=norm, cmap=mpl.colors.ListedColormap(colours))
        bar = fig.colorbar(mappable, ax=ax, shrink=0.85,
                           ticks=list(range(0, T, max(1, math.ceil(T / 20)))))
        bar.set_label("task j (dotted: before it is trained)")
        ax.legend(loc="lower left", fontsize=9)
    else:
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=9,
                  title="dotted: before\nthe task is trained", title_fontsize=8)
    ax.set_title(title, fontsize=12)
    return _save(fig, Path(path))


def _shown(count: int) -> tuple[int, str]:
    shown = min(count, MAX_SETTINGS)
    note = "" if shown == count else f" (the first {shown} of {count} settings shown)"
    return shown, note


def plot_sweep_matrices(matrices, names: list[str], path: str | os.PathLike, *,
                        title: str = "") -> Path:
    """Write one accuracy-matrix heatmap per setting of a sweep (``matrices[k]`` ``[T, T]``,
    titled ``names[k]`` and its ACC) on a grid with one colour bar; at most
    :data:`MAX_SETTINGS` are drawn and the title says when some are not. Returns the
    path."""
    shown, note = _shown(len(matrices))
    cols = min(shown, 4)
    rows = math.ceil(shown / cols)
    fig = _figure((3.6 * cols + 1.4, 3.6 * rows + 1.4))
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    image = None
    for k, ax in enumerate(axes):
        if k >= shown:
            ax.set_axis_off()
            continue
        R = np.asarray(matrices[k], np.float64)
        image, _ = _heatmap(ax, R, room=0.5, labels=k % cols == 0)
        ax.set_title(f"{names[k]}\n{_progress_text(R)}", fontsize=9)
        if k + cols >= shown:  # the lowest panel of its column
            ax.set_xlabel("accuracy on task j", fontsize=9)
        else:
            ax.set_xlabel("")
    if image is not None:
        fig.colorbar(image, ax=list(axes[:shown]), shrink=0.8).set_label("accuracy")
    grey = any(not np.isfinite(np.asarray(m, np.float64)).all() for m in matrices[:shown])
    fig.suptitle(title + note + ("\n(grey: not trained yet)" if grey else ""), fontsize=12)
    return _save(fig, Path(path))


def plot_sweep_curves(runs: list, names: list[str], path: str | os.PathLike, *,
                      title: str = "") -> Path:
    """Write, for each setting of a sweep (``runs[k]``: ``[seeds, T, T]``), the mean
    accuracy over the tasks trained so far after each task (one line per setting, its
    final ACC in the legend) as a 1000 x 650 PNG. Returns the path."""
    shown, note = _shown(len(runs))
    fig = _figure(TASK_CURVES_INCHES)
    ax = fig.subplots()
    T = 1
    for k in range(shown):
        group = np.asarray(runs[k], np.float64)
        group = group[None] if group.ndim == 2 else group
        T = group.shape[-1]
        mean = _mean_so_far(group).mean(axis=0)
        ax.plot(np.arange(T), mean, marker="o", markersize=3, linewidth=1.5,
                color=f"C{k % 10}", linestyle="-" if k < 10 else "--",
                label=f"{names[k]} ({_progress_text(group.mean(axis=0))})")
    ax.set_xlabel("after training task i")
    ax.set_ylabel("mean accuracy over tasks 0..i")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xticks(list(range(0, T, max(1, math.ceil(T / 20)))))
    ax.grid(alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8)
    ax.set_title(title + note, fontsize=12)
    return _save(fig, Path(path))
