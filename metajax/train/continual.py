"""The run layer of continual learning: train built pieces on a stream and write the run.

:func:`train_continual` receives what :mod:`metajax.presets.build_continual` builds from a
configuration (the learner, the stream, the model's ``init`` and ``apply``, the protocol's
batch size and epochs), the way :func:`metajax.train.loop.train` receives a ``Problem``. It
runs :func:`metajax.continual.run` and writes the run directory:

- ``config.json``: the configuration (given as JSON text);
- ``checkpoints/<t>``: the whole state after task ``t`` (learner state, keys, the accuracy
  rows so far; :class:`~metajax.train.checkpoint.Checkpoints`), written at every task
  boundary, so that a killed or interrupted run resumes at the next unfinished task;
- ``tasks.jsonl``: one line per finished task (its accuracy row), written as the run goes,
  each after its checkpoint, so an interrupted run keeps what it measured;
- ``acc_matrix.json``: the accuracy matrix (per seed with several seeds) and the initial
  accuracies;
- ``metrics.json``: every metric of :func:`metajax.continual.metrics` (mean, std and per seed
  with several seeds), the wall time, the learner's training metrics per task;
- ``acc_matrix.png`` and ``task_curves.png``: the (seed-averaged) accuracy matrix as a
  heatmap and the accuracy on each task after each task (:func:`metajax.plots.plot_run`; a
  sweep: one per setting). A plot that fails only warns;
- with ``tensorboard``, ``tensorboard/``: TensorBoard event files of the same figures
  (:class:`~metajax.train.logging.TensorBoardLog`).

Every file is strict JSON: a non-finite number is written as ``null`` (with a
``<key>_nonfinite`` sibling naming it), never as a bare ``NaN``. Nothing here knows an
algorithm or a benchmark by name.
"""

from __future__ import annotations

import hashlib
import shutil
import signal
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

from metajax._files import atomic_write
from metajax.continual.learners import ContinualLearner
from metajax.continual.run import NonFiniteTask, run
from metajax.plots import write_plots
from metajax.train.checkpoint import CHECKPOINT_DIR, Checkpoints
from metajax.train.config import ConfigError
from metajax.train.logging import (
    TensorBoardLog,
    append_jsonl,
    dumps,
    progress_bar,
    require_tensorboard,
    to_jsonable,
    truncate_jsonl,
)
from metajax.train.loop import CONFIG_FILE, Interrupted, StopSignals, _agree, _barrier
from metajax.types import Stream

TASKS_FILE = "tasks.jsonl"
MATRIX_FILE = "acc_matrix.json"
HEATMAP_FILE = "acc_matrix.png"
TASK_CURVES_FILE = "task_curves.png"
SUMMARY_FILE = "metrics.json"
RESULT_FILES = (MATRIX_FILE, HEATMAP_FILE, TASK_CURVES_FILE, SUMMARY_FILE)
#: The summary figures logged to TensorBoard (tags ``summary/<name>``).
SUMMARY_SCALARS = ("avg_accuracy", "forgetting", "bwt", "fwt", "lca")
#: Decimals kept for every float in the run files (accuracies are exact to far fewer).
DIGITS = 6


def _write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def train_continual(
    learner: ContinualLearner,
    stream: Stream,
    init: Callable[[jax.Array], Any],
    apply_fn: Callable[[Any, jax.Array], jax.Array],
    run_dir: str | Path,
    *,
    batch_size: int,
    epochs: int,
    lca_batches: int,
    seeds: int = 1,
    seed: int = 0,
    config_json: str = "{}",
    fingerprint: str | None = None,
    labels: dict[str, str] | None = None,
    progress: bool = True,
    resume: bool = False,
    keep_checkpoints: int = 2,
    mesh: Any = None,
    settings: list[dict[str, float]] | None = None,
    log: Callable[[str], None] | None = None,
    tensorboard: bool = False,
) -> dict[str, Any]:
    """Train ``learner`` on ``stream`` task after task and write ``run_dir``.

    After every task the whole state is checkpointed (``checkpoints/<task>``), then the
    task's line is appended to ``tasks.jsonl``. With ``resume``, the run continues after the
    latest checkpoint's task (whose ``fingerprint`` must be this run's) and ends with the
    same accuracy matrix and parameters, bit for bit, as a run never interrupted;
    ``tasks.jsonl`` keeps the lines of the tasks that checkpoint holds. A run whose last
    task is checkpointed only writes its result files again. Without ``resume``, earlier
    checkpoints and results in ``run_dir`` are deleted and the run starts from task 0.

    SIGINT or SIGTERM: the current task finishes, is checkpointed, and
    :class:`~metajax.train.loop.Interrupted` is raised (``step``: the task); a second
    SIGINT quits at once. During the last task, the run just completes.

    Args:
      learner: a :class:`~metajax.continual.ContinualLearner`.
      stream: the :class:`~metajax.types.Stream` to learn.
      init: ``init(key) -> params`` of the model.
      apply_fn: ``apply(params, x) -> logits``.
      run_dir: the run directory (created if missing).
      batch_size: examples per update.
      epochs: passes over each task.
      lca_batches: LCA's beta (0 skips LCA).
      seeds: independent runs, trained at once under ``vmap``.
      settings: a hyper-parameter sweep, one dict of values per setting; every setting runs
        with every seed (``len(settings) * seeds`` runs, vmapped together) and ``learner`` is
        a function ``learner(setting) -> ContinualLearner`` of traced values
        (:func:`metajax.continual.run` ``settings=``). The summary gains ``sweep``: each
        setting with the mean and standard deviation over its seeds.
      mesh: spread the seeds over the devices of this ``jax.sharding.Mesh``
        (:func:`metajax.train.parallel.device_mesh`; ``seeds`` must be a multiple of its
        size); ignored with one seed. The results are those of one device.
      seed: seed of the run's keys.
      config_json: the configuration, written (atomically) as ``config.json``; with
        ``resume``, once the checkpoint is found to be of the same ``fingerprint``.
      fingerprint: what identifies the run's result in its checkpoints (default: a hash of
        ``config_json``); a checkpoint of another fingerprint is not resumed.
      labels: ``preset``, ``learner`` and ``benchmark`` names, copied into the summary and
        the heatmap title (missing ones are left out).
      progress: show a progress bar over tasks (on a terminal only; its ETA leaves out the
        first task, which compiles).
      resume: continue from the latest checkpoint in ``run_dir`` (from task 0 when there is
        none).
      keep_checkpoints: how many of the latest task checkpoints to keep.
      log: called with one-line reports (the run, a resume, a signal).
      tensorboard: also write TensorBoard event files in ``run_dir/tensorboard/`` (needs
        ``tensorboardX``): after each task ``t`` (step ``t``), the seed-mean accuracy on
        every task j (``accuracy/task_<j>``) and over the tasks so far
        (``accuracy/mean_so_far``); at step ``tasks``, the summary figures
        (``summary/avg_accuracy``, ``forgetting``, ``bwt``, ``fwt``, ``lca``). A sweep logs
        each setting under ``setting_<k>/``. A resumed run appends, hiding what an earlier
        attempt logged after its checkpoint.

    Returns:
      The summary printed by ``metajax continual``: ``avg_accuracy`` (ACC, La-MAML's RA),
      ``forgetting`` (A-GEM's), ``bwt`` (BTI), ``fwt``, ``lca`` (when ``lca_batches``), their
      standard deviations over seeds (``std``), the seed-mean ``acc_matrix``, ``tasks``,
      ``seeds``, the ``labels``, ``wall_s`` (all attempts), ``resumed_after`` (the task the
      run resumed after, or None) and ``run_dir``.

    Raises:
      NonFiniteTask: a task left NaN or infinity in the learner state; nothing of that task
        is saved, the checkpoints of the earlier tasks are kept.
      Interrupted: SIGINT or SIGTERM, after the checkpoint of the current task.
      ConfigError: with ``resume``, the checkpoint belongs to another configuration.
    """
    labels = dict(labels or {})
    # With several processes (jax.distributed), process 0 writes the files and speaks;
    # every process trains its share of the seeds and writes the checkpoints with the others.
    main = jax.process_index() == 0
    say = (log or (lambda message: None)) if main else (lambda message: None)
    if tensorboard:
        require_tensorboard()  # before anything of the run is written
    tensorboard, progress = tensorboard and main, progress and main
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if fingerprint is None:
        fingerprint = hashlib.sha256(config_json.encode()).hexdigest()[:16]
    num_tasks = stream.num_tasks
    tasks_path = run_dir / TASKS_FILE
    if not resume and main:
        shutil.rmtree(run_dir / CHECKPOINT_DIR, ignore_errors=True)
        for name in RESULT_FILES:
            (run_dir / name).unlink(missing_ok=True)
        truncate_jsonl(tasks_path, "task", -1)
        _write_text(run_dir / CONFIG_FILE, config_json)
    _barrier("metajax-continual-run-dir")  # the others start once process 0 has cleaned up
    say(f"{labels.get('preset', 'custom')}: {labels.get('learner', 'learner')} on "
        f"{labels.get('benchmark', 'stream')}, {num_tasks} tasks of "
        f"{stream.train_y.shape[1]} examples, {seeds} seed(s)"
        + (f" x {len(settings)} settings" if settings else "") + f" -> {run_dir}")

    checkpoints = Checkpoints(run_dir, keep=keep_checkpoints)
    resumed_after: int | None = None
    wall_before = 0.0

    def restore(template):
        nonlocal resumed_after, wall_before
        latest = checkpoints.latest_step()
        if latest is None:
            say(f"metajax: no checkpoint in {run_dir}: starting from task 0")
            if main:
                truncate_jsonl(tasks_path, "task", -1)
                _write_text(run_dir / CONFIG_FILE, config_json)
            open_board(None)
            return None
        where = checkpoints.directory / str(latest)
        carry, record = checkpoints.restore(latest, template)
        if record.get("fingerprint") != fingerprint:
            raise ConfigError(
                f"{where}: checkpoint of another configuration (fingerprint "
                f"{record.get('fingerprint')}, this run {fingerprint}); choose another --out"
            )
        if record.get("task") != latest or latest >= num_tasks:
            raise ValueError(f"{where}: checkpoint of task {record.get('task')!r}, not of "
                             f"one of this stream's {num_tasks} tasks")
        resumed_after, wall_before = latest, float(record.get("wall_s") or 0.0)
        if main:
            truncate_jsonl(tasks_path, "task", latest)
            _write_text(run_dir / CONFIG_FILE, config_json)  # only once the checkpoint is ours
        if latest == num_tasks - 1:
            say(f"metajax: {run_dir} holds all {num_tasks} tasks: writing its results again")
        else:
            say(f"metajax: resuming {run_dir} after task {latest} of {num_tasks}")
        open_board(latest)
        return latest, carry

    start = time.perf_counter()

    def elapsed() -> float:
        return wall_before + time.perf_counter() - start

    bar = None
    board = None
    runs_per_setting = seeds if settings else None

    def open_board(after: int | None) -> None:
        nonlocal board, bar
        if tensorboard and board is None:
            board = TensorBoardLog(run_dir, purge_step=None if after is None else after + 1)
        if progress and bar is None:
            done = 0 if after is None else after + 1
            bar = progress_bar(num_tasks, desc="tasks", unit="task", initial=done)

    def on_task_state(t: int, carry: dict) -> None:
        wall = round(elapsed(), 3)
        if jax.process_count() > 1:  # the seeds' states are split over the processes
            carry = _gathered(carry)
        checkpoints.save(t, carry, {"task": t, "tasks": num_tasks, "seeds": seeds,
                                    "fingerprint": fingerprint, "wall_s": wall})
        row = np.asarray(carry["acc_rows"][t], np.float64)
        mean_row = row if row.ndim == 1 else row.mean(axis=0)
        record = {"task": t, "acc": to_jsonable(row, DIGITS),
                  "mean_acc_so_far": round(float(mean_row[: t + 1].mean()), DIGITS),
                  "wall_s": wall}
        if main:
            append_jsonl(tasks_path, record)
        if board is not None:
            _log_task(board, t, row, runs_per_setting)
        if bar is not None:
            bar.update(1, acc=f"{record['mean_acc_so_far']:.4f}")
        # A signal to any process stops all of them after the same task.
        (signum,) = _agree(stop.signum or 0)
        if signum and t < num_tasks - 1:
            raise Interrupted(
                f"interrupted by {signal.Signals(signum).name} after task {t} of "
                f"{num_tasks}; the checkpoint is saved: rerun with --resume to continue",
                t, signum,
            )

    seed_list = list(range(seeds)) if seeds > 1 or settings else None
    per_run = None
    if settings:
        seed_list = [s for _ in settings for s in range(seeds)]
        per_run = {name: [setting[name] for setting in settings for _ in range(seeds)]
                   for name in settings[0]}
    if not resume:
        open_board(None)
    try:
        with StopSignals("task") as stop:
            try:
                result = run(
                    learner, stream, jax.random.PRNGKey(seed),
                    params=init, apply_fn=apply_fn, batch_size=batch_size,
                    epochs=epochs, lca_batches=lca_batches, seeds=seed_list,
                    on_task_state=on_task_state, resume_from=restore if resume else None,
                    mesh=mesh if seed_list is not None else None, settings=per_run,
                )
            except NonFiniteTask as err:
                good = checkpoints.latest_step()
                kept = ("no checkpoint was written" if good is None
                        else f"the checkpoints up to task {good} are kept")
                raise NonFiniteTask(f"{err}; nothing of task {err.task} was saved, {kept} "
                                    "(lower the learning rate?)", err.task, err.seeds) from None
            if bar is not None:
                bar.close()
                bar = None
            devices = 1 if mesh is None or seed_list is None else int(mesh.size)
            summary = _write_results(result, run_dir, stream, seed_list, seeds, labels,
                                     elapsed(), resumed_after, devices, settings, write=main)
            if board is not None:
                _log_summary(board, num_tasks, summary)
    except (Interrupted, NonFiniteTask):
        if main and (run_dir / TASKS_FILE).exists():  # the tasks done so far, drawn (never raises)
            with warnings.catch_warnings():  # the error is the message; a plot is a bonus
                warnings.simplefilter("ignore")
                write_plots(run_dir)
        raise
    finally:
        if bar is not None:
            bar.close()
        if board is not None:
            board.close()
        checkpoints.close()
    if main:
        write_plots(run_dir)
    return summary


def _log_task(board: TensorBoardLog, t: int, row: np.ndarray, per_setting: int | None) -> None:
    """TensorBoard scalars of task ``t``'s accuracy row (``[T]`` or ``[runs, T]``): the
    seed mean on each task and over tasks ``0..t``, per setting of a sweep."""
    row = np.asarray(row, np.float64)
    runs = row[None] if row.ndim == 1 else row
    groups = [runs] if per_setting is None else \
        [runs[k:k + per_setting] for k in range(0, len(runs), per_setting)]
    width = len(str(runs.shape[1] - 1))
    for k, group in enumerate(groups):
        mean = group.mean(axis=0)
        values = {f"accuracy/task_{j:0{width}d}": v for j, v in enumerate(mean)}
        values["accuracy/mean_so_far"] = float(mean[: t + 1].mean())
        board.scalars(t, values, prefix="" if per_setting is None else f"setting_{k}/")


def _log_summary(board: TensorBoardLog, num_tasks: int, summary: dict) -> None:
    """The run's summary figures at step ``num_tasks`` (one past the last task), and each
    sweep setting's under ``setting_<k>/``."""
    board.scalars(num_tasks, {k: summary.get(k) for k in SUMMARY_SCALARS}, prefix="summary/")
    for k, entry in enumerate(summary.get("sweep") or []):
        board.scalars(num_tasks, {name: entry.get(name) for name in SUMMARY_SCALARS},
                      prefix=f"setting_{k}/summary/")


def _gathered(tree: Any) -> Any:
    """``tree`` with each array that spans other processes' devices gathered whole on the
    host (every process takes part)."""
    from jax.experimental import multihost_utils

    def whole(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return x

    return jax.tree.map(whole, tree)


def _write_results(result, run_dir: Path, stream: Stream, seed_list, seeds: int,
                   labels: dict, wall: float, resumed_after: int | None,
                   devices: int = 1, settings: list[dict] | None = None,
                   write: bool = True) -> dict[str, Any]:
    """Write ``acc_matrix.json`` and ``metrics.json`` (unless not ``write``); return the
    summary."""
    R = result["acc_matrix"]
    mean_R = R if R.ndim == 2 else R.mean(axis=0)
    if write:
        _write_text(run_dir / MATRIX_FILE, dumps(to_jsonable({
            "acc_matrix": R,
            "random_init_acc": result["random_init_acc"],
            "rows": "after training task i", "columns": "accuracy on task j",
            "seeds": seed_list or [None],
        }, DIGITS)) + "\n")
    names = ("avg_accuracy", "bwt", "forgetting", "forgetting_since_learned", "fwt", "lca",
             "bwt_over_T", "fwt_over_T")
    summary: dict[str, Any] = {
        "avg_accuracy": result["avg_accuracy"],
        "forgetting": result.get("forgetting"),
        "bwt": result.get("bwt"),
        "fwt": result.get("fwt"),
        "lca": result.get("lca"),
        # GEM's and La-MAML's convention (averaged over all T tasks), for their tables.
        "bwt_over_T": result.get("bwt_over_T"),
        "fwt_over_T": result.get("fwt_over_T"),
    }
    if seed_list is not None:
        summary["std"] = {k: v for k, v in result["std"].items() if k in names}
    summary.update({"acc_matrix": mean_R, "tasks": stream.num_tasks, "seeds": seeds})
    if settings:
        summary["sweep"] = _sweep_summary(result["per_seed"], settings, seeds)
    summary.update({k: labels[k] for k in ("learner", "benchmark", "preset") if k in labels})
    summary.update({"wall_s": wall, "resumed_after": resumed_after, "run_dir": str(run_dir),
                    "devices": devices, "processes": jax.process_count()})
    full = {k: v for k, v in result.items() if k not in ("acc_matrix", "random_init_acc")}
    full["summary"] = {k: v for k, v in summary.items() if k != "acc_matrix"}
    if write:
        _write_text(run_dir / SUMMARY_FILE, dumps(to_jsonable(full, DIGITS), indent=1) + "\n")
    return to_jsonable(summary, DIGITS)


def _sweep_summary(per_run: list[dict], settings: list[dict], seeds: int) -> list[dict]:
    """Each setting of a sweep with the mean and standard deviation of its seeds' metrics
    (runs are ordered setting by setting, seeds inside)."""
    out = []
    for i, setting in enumerate(settings):
        runs = per_run[i * seeds:(i + 1) * seeds]
        entry: dict[str, Any] = {"setting": setting}
        for name, key in (("avg_accuracy", "avg_accuracy"), ("forgetting", "forgetting"),
                          ("bwt", "bwt"), ("fwt", "fwt"), ("lca", "lca")):
            if name in runs[0] and runs[0][name] is not None:
                values = np.array([r[name] for r in runs], np.float64)
                entry[key] = float(values.mean())
                entry.setdefault("std", {})[key] = float(values.std())
        out.append(entry)
    return out
