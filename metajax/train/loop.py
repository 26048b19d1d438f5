"""The training loop: many meta-steps compiled into one call, evaluation, run directories.

The loop does not know which algorithm it runs: it receives a :class:`~metajax.types.Learner`,
an optax optimiser and a task sampler.
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from metajax._files import atomic_write
from metajax.evaluation import make_evaluator, mean_ci95, task_sampler
from metajax.train.checkpoint import CHECKPOINT_DIR, Checkpoints, save_params
from metajax.train.config import ConfigError
from metajax.train.logging import (
    TensorBoardLog,
    append_jsonl,
    progress_bar,
    read_jsonl,
    require_tensorboard,
    truncate_jsonl,
)
from metajax.train.parallel import (
    is_main_process,
    mesh_record,
    replicate,
    task_parallel_meta_grad,
)
from metajax.types import Learner, Problem, PyTree, Task


class RunConfig(Protocol):
    """What the training loop reads of a configuration (:class:`metajax.presets.config.Config`
    has it all): the run's length and cadence, the task shapes, the seed, the guard and
    checkpoint settings, its JSON and its fingerprint."""

    steps: int
    log_every: int
    eval_every: int
    eval_tasks: int
    eval_queries: int
    time_budget_s: float
    seed: int
    meta_batch_size: int
    shots: int
    queries: int
    inner_lr: float
    outer_lr: float
    on_nan: str
    checkpoint_every: int
    checkpoint_seconds: float
    keep_checkpoints: int

    def fingerprint(self) -> str: ...

    @property
    def test_inner_steps(self) -> int: ...

    def to_json(self) -> str: ...


PARAMS_FILE = "meta_params.msgpack"
BEST_PARAMS_FILE = "best_meta_params.msgpack"
METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.json"


def make_train_chunk(
    learner: Learner,
    optimizer: optax.GradientTransformation,
    sample_task: Callable[[jax.Array], Task],
    meta_batch_size: int,
    *,
    mesh: Mesh | None = None,
    skip_nonfinite: bool = False,
) -> Callable:
    """A jitted ``chunk(meta_params, opt_state, key, start, length)`` running ``length`` steps.

    Meta-step ``s`` draws its ``meta_batch_size`` tasks on device, task ``i`` with
    ``sample_task(fold_in(fold_in(key, s), i))`` (one task, no task axis), takes the
    meta-gradient and applies the optimiser; ``length`` steps run in one ``lax.scan``, so a
    whole chunk is one compiled call with no host round-trip. The result does not depend on
    how the run is cut into chunks, nor on the devices: with a ``mesh``
    (:func:`metajax.train.parallel.device_mesh`) each device samples and differentiates its
    share of the tasks and the meta-gradients are averaged across devices
    (:func:`metajax.train.parallel.task_parallel_meta_grad`); pass the parameters, optimiser
    state and key replicated on the mesh (:func:`metajax.train.parallel.replicate`).
    ``meta_grad`` receives the (traced) meta-step as ``step=``, for learners built with
    schedules (MAML++'s annealing).

    The ``applied`` metric of a step is False when its meta-loss is not finite. With
    ``skip_nonfinite``, it is also False when the new parameters or optimiser state hold NaN
    or infinity, and such a step is not applied (the carry keeps the previous state); this
    guard costs a check and a select over the state every step (10-20% of a small model's
    step on XLA:CPU), so it is only compiled in when asked for. Without it, a non-finite
    state shows in the next step's loss or in a check of the chunk's final state
    (:func:`all_finite`).

    Returns ``(meta_params, opt_state, metrics)`` where each metric has a leading
    ``[length]`` axis.
    """

    meta_grad = task_parallel_meta_grad(learner, sample_task, meta_batch_size, mesh)

    def meta_step(carry, step):
        meta_params, opt_state, key = carry
        grads, metrics = meta_grad(meta_params, jax.random.fold_in(key, step), step)
        updates, new_opt_state = optimizer.update(grads, opt_state, meta_params)
        new_params = optax.apply_updates(meta_params, updates)
        applied = jnp.isfinite(metrics["meta_loss"])
        if skip_nonfinite:
            applied = applied & _all_finite((new_params, new_opt_state))
            new_params = jax.tree.map(lambda new, old: jnp.where(applied, new, old),
                                      new_params, meta_params)
            new_opt_state = jax.tree.map(lambda new, old: jnp.where(applied, new, old),
                                         new_opt_state, opt_state)
        return (new_params, new_opt_state, key), {**metrics, "applied": applied}

    @functools.partial(jax.jit, static_argnames="length", donate_argnums=(0, 1))
    def chunk(meta_params, opt_state, key, start, length):
        steps = start + jnp.arange(length, dtype=jnp.int32)
        (meta_params, opt_state, _), metrics = jax.lax.scan(
            meta_step, (meta_params, opt_state, key), steps
        )
        return meta_params, opt_state, metrics

    return chunk


@jax.jit
def all_finite(tree: PyTree) -> jax.Array:
    """Whether every float leaf of ``tree`` is free of NaN and infinity (one compiled call)."""
    return _all_finite(tree)


def _all_finite(tree: PyTree) -> jax.Array:
    flags = [jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree)
             if jnp.issubdtype(jnp.asarray(leaf).dtype, jnp.inexact)]
    return jnp.all(jnp.stack(flags)) if flags else jnp.bool_(True)


def flat_metrics(metrics: dict, applied: np.ndarray | None = None) -> dict:
    """Chunk metrics as floats averaged over the chunk's applied steps (all steps without
    ``applied``); a dict ``aux`` becomes ``query_<key>``. A metric with no applied step is
    None."""
    def mean(value):
        value = np.asarray(value)
        if applied is not None:
            value = value[np.asarray(applied, bool)]
        return float(np.mean(value)) if value.size else None

    out = {}
    for key, value in metrics.items():
        if key == "aux" and isinstance(value, dict):
            out.update({f"query_{k}": mean(v) for k, v in value.items()})
        elif key != "aux":
            out[key] = mean(value)
    return out


class NonFiniteLoss(RuntimeError):
    """Training produced a NaN or infinite meta-loss, parameters or optimiser state (and
    ``on_nan="stop"``); ``step`` is the first such meta-step, ``last_checkpoint`` the step
    of the last good checkpoint (None when there is none)."""

    def __init__(self, message: str, step: int, last_checkpoint: int | None):
        super().__init__(message)
        self.step = step
        self.last_checkpoint = last_checkpoint


class Interrupted(RuntimeError):
    """SIGINT or SIGTERM ended the run; the state was checkpointed at ``step`` first."""

    def __init__(self, message: str, step: int, signum: int):
        super().__init__(message)
        self.step = step
        self.signum = signum


class StopSignals:
    """SIGINT / SIGTERM set ``signum``, which a loop reads at the end of each ``unit`` of
    work (a chunk of meta-steps, a task) to checkpoint and stop; a second SIGINT raises
    ``KeyboardInterrupt`` as soon as Python runs again (a compiled call in flight finishes
    first). Only in the main thread (elsewhere: no-op)."""

    def __init__(self, unit: str = "chunk"):
        self.unit = unit
        self.signum: int | None = None
        self._previous: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        # os.write, not print: a handler may run while a print to stderr is under way.
        os.write(2, f"metajax: {signal.Signals(signum).name} received: saving a checkpoint "
                    f"at the end of this {self.unit} (Ctrl-C again quits without saving)\n"
                    .encode())

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            if handler is not None:  # None: installed from C, cannot be restored from Python
                signal.signal(signum, handler)


def _last_records(path: Path, metric: str) -> tuple[dict, dict]:
    last, val = {}, {}
    if path.exists():
        for record in read_jsonl(path):
            if f"val_{metric}" in record:
                val = record
            else:
                last = record
    return last, val


def train(
    config: RunConfig,
    problem: Problem,
    learner: Learner,
    optimizer: optax.GradientTransformation,
    run_dir: str | Path,
    *,
    mesh: Mesh | None = None,
    progress: bool = True,
    resume: bool = False,
    log: Callable[[str], None] | None = None,
    tensorboard: bool = False,
    diagnostics: Callable[[PyTree], dict] | None = None,
) -> dict:
    """Train ``learner`` on ``problem`` for ``config.steps`` meta-steps, logging to ``run_dir``.

    ``run_dir`` receives ``config.json``, ``metrics.jsonl`` (one line per chunk of
    ``config.log_every`` steps, plus validation lines; each with ``wall_s``, the seconds of
    training so far, earlier attempts of a resumed run included), ``meta_params.msgpack``
    (the portable export, written at every checkpoint) and ``checkpoints/`` (the whole
    training state, :class:`~metajax.train.checkpoint.Checkpoints`); with a held-out
    validation split also ``best_meta_params.msgpack``, the parameters of the best
    validation score. At the end, ``curves.png`` plots the meta-training loss and the
    validation metric against steps and wall time (:func:`metajax.plots.plot_run`; a plot
    that fails only warns). With ``tensorboard``, ``tensorboard/`` receives the same figures
    as TensorBoard event files (tags ``train/<metric>`` and ``val/<metric>``;
    :class:`~metajax.train.logging.TensorBoardLog`, which needs ``tensorboardX``). The
    progress bar (``progress``) shows on a terminal only.

    Checkpoints are written every ``config.checkpoint_every`` steps and every
    ``config.checkpoint_seconds`` seconds (at the end of the chunk where either falls due),
    at each validation, at the end and when SIGINT or SIGTERM arrives (then
    :class:`Interrupted` is raised after the save). With ``resume``, training continues from
    the latest checkpoint (its configuration fingerprint must match) and ends with the same
    parameters, bit for bit, as a run never interrupted: chunks are cut at the same steps
    and every step draws its tasks from ``fold_in(key, step)``. ``metrics.jsonl`` is cut
    back to the checkpoint's step, so no step is logged twice or missed.

    Non-finite training is never saved: with ``config.on_nan == "stop"`` a chunk in which
    the meta-loss, or at its end the parameters or optimiser state, became non-finite raises
    :class:`NonFiniteLoss` naming the step, and the checkpoints before it are what remains;
    with ``"skip"`` such steps are not applied (:func:`make_train_chunk`'s guard) and are
    counted in the logs (``skipped_steps``); a chunk where every step would be skipped
    raises too.

    Training stops early, after a whole chunk, once ``config.time_budget_s`` is spent (the
    time of earlier attempts of a resumed run counts).

    ``diagnostics(meta_params) -> dict of scalars``, when given, runs at every validation
    (jitted once; it should draw its own tasks, with a key of its own, so that validation is
    the same with or without it) and its figures join the validation line of
    ``metrics.jsonl`` as ``diag_<name>`` (TensorBoard: ``diag/<name>``); e.g.
    :func:`metajax.implicit_gradient_report` for iMAML. Its time counts as training time, as
    validation's does.

    With a ``mesh`` (:func:`metajax.train.parallel.device_mesh`) every meta-batch is spread
    over its devices and the result is that of one device (up to float rounding). With
    several processes (:func:`metajax.train.parallel.initialize_distributed`) every process
    calls ``train`` with the same arguments; only process 0 writes the logs, the parameter
    files and ``config.json``, all of them write the checkpoints together (orbax), and the
    decisions to stop (time budget, signals) and to checkpoint are taken by all at once.

    Returns:
      The final summary: ``step``, ``meta_loss``, ``run_dir``, ``wall_s`` (seconds of
      training over every attempt, as ``metrics.jsonl`` and the time budget count them),
      ``attempt_wall_s`` (this call's), ``steps_per_s`` (this call's steps over its time),
      ``stopped_by_time_budget``, ``skipped_steps``, ``resumed_from`` (the step training
      started from), the last validation figure ``val_<metric>``, and ``devices`` and
      ``processes``, the counts used.
    """
    main = is_main_process()
    if tensorboard:
        require_tensorboard()  # on every process, before anything of the run is written
    say = log or (lambda message: print(message, file=sys.stderr))
    if not main:
        say = lambda message: None  # noqa: E731 - process 0 speaks for the run
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = run_dir / METRICS_FILE
    on_nan, every, every_s = config.on_nan, config.checkpoint_every, config.checkpoint_seconds
    fingerprint = config.fingerprint()

    k_init, k_train, k_val = jax.random.split(jax.random.PRNGKey(config.seed), 3)
    meta_params = learner.init(problem.init_params(k_init))
    opt_state = optimizer.init(meta_params)
    meta_params, opt_state, k_train, k_val = replicate((meta_params, opt_state, k_train, k_val),
                                                       mesh)
    metric = problem.metric_name
    higher_is_better = metric == "accuracy"
    if not resume and main:  # a new run: nothing of an earlier one may be resumed or preferred
        shutil.rmtree(run_dir / CHECKPOINT_DIR, ignore_errors=True)
        (run_dir / BEST_PARAMS_FILE).unlink(missing_ok=True)
        (run_dir / "curves.png").unlink(missing_ok=True)  # an earlier run's plot
        if not tensorboard:
            shutil.rmtree(run_dir / "tensorboard", ignore_errors=True)
    _barrier("metajax-run-dir")
    checkpoints = Checkpoints(
        run_dir, keep=config.keep_checkpoints,
        best_mode=("max" if higher_is_better else "min") if problem.has_validation else None,
    )
    step, wall_before, best, skipped, finished = 0, 0.0, None, 0, False
    # The best parameters so far travel in the checkpoint, so that after a resume
    # best_meta_params.msgpack is the best of the steps the resumed run really went through.
    best_params = jax.device_get(meta_params)
    latest = checkpoints.latest_step() if resume else None
    if latest is not None:
        template = {"meta_params": meta_params, "opt_state": opt_state, "key": k_train,
                    "best_params": best_params}
        state, record = checkpoints.restore(latest, template)
        if record.get("fingerprint") not in config.fingerprints():
            raise ConfigError(
                f"{checkpoints.directory / str(latest)}: checkpoint of another configuration "
                f"(fingerprint {record.get('fingerprint')}, this run {fingerprint}); choose "
                "another --out"
            )
        meta_params, opt_state = state["meta_params"], state["opt_state"]
        step, wall_before = int(record["step"]), float(record["wall_s"])
        best, skipped = record.get("best"), int(record.get("skipped", 0))
        finished = bool(record.get("finished"))
        best_params = state["best_params"]
        if problem.has_validation and best is not None and main:
            save_params(run_dir / BEST_PARAMS_FILE, best_params)
        say(f"metajax: resuming {run_dir} from the checkpoint of step {step}")
    if main:
        if resume:
            truncate_jsonl(metrics_path, "step", step)
        else:
            metrics_path.unlink(missing_ok=True)
        atomic_write(run_dir / CONFIG_FILE, lambda f: f.write(config.to_json().encode()))
    resumed_from = step

    sample_task = task_sampler(problem, config.shots, config.queries, "train")
    chunk = make_train_chunk(learner, optimizer, sample_task, config.meta_batch_size,
                             mesh=mesh, skip_nonfinite=on_nan == "skip")
    evaluate = make_evaluator(learner, problem, mesh=mesh)
    diagnose = None if diagnostics is None else jax.jit(diagnostics)

    def validate(step):
        nonlocal best, best_params
        values = evaluate(meta_params, k_val, config.eval_tasks, config.shots,
                          config.eval_queries, config.test_inner_steps, "val")
        extra = {} if diagnose is None else {
            name: float(value) for name, value in jax.device_get(diagnose(meta_params)).items()}
        record = {"step": step, f"val_{metric}": mean_ci95(jax.device_get(values))["mean"],
                  **{f"diag_{name}": value for name, value in extra.items()},
                  "wall_s": round(elapsed(), 3)}
        if main:
            append_jsonl(metrics_path, record)
        if board is not None:
            board.scalars(step, {metric: record[f"val_{metric}"]}, prefix="val/")
            if extra:
                board.scalars(step, extra, prefix="diag/")
        score = record[f"val_{metric}"]
        if problem.has_validation and np.isfinite(score) and (
            best is None or (score > best if higher_is_better else score < best)
        ):
            best, best_params = score, jax.device_get(meta_params)
            if main:
                save_params(run_dir / BEST_PARAMS_FILE, best_params)
        return record

    def save(step, score=None, finished=False):
        nonlocal last_save, last_save_step
        if main:
            save_params(run_dir / PARAMS_FILE, meta_params)
        # A resumed run that trains nothing more (its steps or budget already reached) ends
        # on the checkpoint it started from: the state is that one, already saved.
        if step not in checkpoints.steps():
            checkpoints.save(
                step, {"meta_params": meta_params, "opt_state": opt_state, "key": k_train,
                       "best_params": best_params},
                {"step": step, "fingerprint": fingerprint, "wall_s": elapsed(), "best": best,
                 "skipped": skipped, "finished": finished},
                metric=score if problem.has_validation else None,
            )
        last_save, last_save_step = time.perf_counter(), step

    def finish():
        nonlocal val_record, finished
        score = None
        if validated_at != step:
            val_record = validate(step)
            score = val_record[f"val_{metric}"]
        save(step, score, finished=True)
        finished = True

    def elapsed():
        return wall_before + time.perf_counter() - start

    def out_of_time():
        return bool(config.time_budget_s) and elapsed() > config.time_budget_s

    last, val_record = _last_records(metrics_path, metric) if resume else ({}, {})
    # A resumed run appends to the event files, hiding what an earlier attempt logged after
    # the checkpoint (metrics.jsonl was cut back the same way).
    board = (TensorBoardLog(run_dir, purge_step=step + 1 if latest is not None else None)
             if tensorboard and main else None)
    start = last_save = time.perf_counter()
    last_save_step = step
    validated_at = val_record.get("step")
    try:
        with progress_bar(config.steps, enabled=progress and main, initial=step,
                          budget_s=config.time_budget_s, spent_s=wall_before) as bar, \
                StopSignals("chunk") as stop:
            # A resumed run whose budget was spent before trains nothing more; otherwise the
            # budget is checked after each chunk (so at least one chunk runs).
            spent = bool(config.time_budget_s) and wall_before > config.time_budget_s
            while step < config.steps and not spent:
                length = min(config.log_every, config.steps - step)
                if config.eval_every:
                    length = min(length, config.eval_every - step % config.eval_every)
                meta_params, opt_state, metrics = chunk(
                    meta_params, opt_state, k_train, jnp.int32(step), length
                )
                metrics = jax.device_get(metrics)
                applied = np.array(metrics.pop("applied"), bool)  # a writable copy
                if applied.all() and not bool(all_finite((meta_params, opt_state))):
                    applied[-1] = False  # finite losses, but the last update broke the state
                if not applied.all():
                    first_bad = step + int(np.argmin(applied))
                    good = checkpoints.latest_step()
                    kept = ("no checkpoint was written yet" if good is None else
                            f"the last good checkpoint (step {good}) is kept: continue with "
                            "--resume --on-nan skip, or")
                    if on_nan == "stop" or not applied.any():
                        what = ("" if on_nan == "stop" else
                                f" (and so would all {length} steps of its chunk)")
                        raise NonFiniteLoss(
                            f"the meta-loss, parameters or optimiser state became non-finite "
                            f"by meta-step {first_bad}{what}; {kept} start again in a new --out "
                            f"with a lower outer_lr or inner_lr (now {config.outer_lr}, "
                            f"{config.inner_lr}) or a grad_clip_norm",
                            first_bad, good,
                        )
                    skipped += int((~applied).sum())
                metrics = flat_metrics(metrics, applied)
                step += length
                finished = False
                last = {"step": step, **metrics, "wall_s": round(elapsed(), 3)}
                if skipped:
                    last["skipped_steps"] = skipped
                if main:
                    append_jsonl(metrics_path, last)
                if board is not None:
                    board.scalars(step, {k: v for k, v in last.items()
                                         if k not in ("step", "wall_s")}, prefix="train/")
                shown = metrics["meta_loss"]
                bar.update(length, **({} if shown is None else {"meta_loss": f"{shown:.4f}"}))
                score = None
                if config.eval_every and step % config.eval_every == 0 and step < config.steps:
                    val_record = validate(step)
                    validated_at, score = step, val_record[f"val_{metric}"]
                now = time.perf_counter()
                # Every process must take the same decisions (a signal may reach one only,
                # clocks differ): each flag holds when it holds on any process.
                signum, late, due = _agree(stop.signum or 0, out_of_time(),
                                           bool(every_s) and now - last_save >= every_s)
                final = step >= config.steps or late
                if not final and (score is not None or signum
                                  or (every and step - last_save_step >= every) or due):
                    save(step, score)
                if signum and not final:
                    raise Interrupted(
                        f"interrupted by {signal.Signals(signum).name} at meta-step {step};"
                        f" the checkpoint is saved: rerun with --resume to continue",
                        step, signum,
                    )
                if final:
                    break
            if not finished:
                finish()
    except (Interrupted, NonFiniteLoss):
        # The curves up to the stop are what one looks at next: draw them (never raises).
        if main and metrics_path.exists():
            with warnings.catch_warnings():  # the error is the message; a plot is a bonus
                warnings.simplefilter("ignore")
                _write_plots(run_dir)
        raise
    finally:
        checkpoints.close()
        if board is not None:
            board.close()
    wall = time.perf_counter() - start
    if main:
        _write_plots(run_dir)
    return {
        **{k: v for k, v in last.items() if k != "wall_s"},
        **{k: v for k, v in val_record.items() if k not in ("step", "wall_s")},
        "run_dir": str(run_dir),
        "stopped_by_time_budget": step < config.steps,
        "skipped_steps": skipped,
        "resumed_from": resumed_from,
        "wall_s": round(wall_before + wall, 2),  # all attempts, as metrics.jsonl counts
        "attempt_wall_s": round(wall, 2),
        "steps_per_s": round((step - resumed_from) / wall, 1) if wall > 0 else None,
        "devices": mesh_record(mesh)["devices"],
        "processes": jax.process_count(),
    }


def _write_plots(run_dir: Path) -> None:
    """The run's plots (:func:`metajax.plots.write_plots`, which never raises)."""
    from metajax.plots import write_plots

    write_plots(run_dir)


def _barrier(name: str) -> None:
    """Wait for every process (nothing with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _agree(signum: int, *flags: bool) -> tuple:
    """``(signum, *flags)`` as every process sees them: the largest signal number any process
    received and each flag OR-ed over the processes (the values themselves with one
    process)."""
    if jax.process_count() == 1:
        return (signum, *flags)
    from jax.experimental import multihost_utils

    local = np.array([signum, *map(int, flags)], np.int32)
    every = np.asarray(multihost_utils.process_allgather(local))
    return (int(every[:, 0].max()), *(bool(x) for x in every[:, 1:].any(axis=0)))


def evaluate_run(
    meta_params: PyTree,
    learner: Learner,
    problem: Problem,
    *,
    tasks: int,
    shots: int,
    queries: int,
    steps: Sequence[int],
    seed: int = 0,
    mesh: Mesh | None = None,
) -> dict:
    """Test-time figures of ``meta_params``: the metric after each inner-step count in ``steps``.

    The test tasks come from ``seed`` alone (not the training seed), so runs are compared on
    the same tasks. Returns ``{"metric", "mean", "ci95", "by_steps": {n: {"mean", "ci95"}},
    "tasks", ...}`` where the top-level ``mean`` and ``ci95`` are those after ``steps[-1]``.
    With a ``mesh`` the tasks are spread over its devices (the figures do not change).
    """
    evaluate = make_evaluator(learner, problem, mesh=mesh)
    key = jax.random.fold_in(jax.random.PRNGKey(seed), 0x7E57)
    by_steps = {
        str(n): mean_ci95(jax.device_get(evaluate(meta_params, key, tasks, shots, queries, n,
                                                  "test")))
        for n in steps
    }
    final = by_steps[str(steps[-1])]
    return {"metric": problem.metric_name, "mean": final["mean"], "ci95": final["ci95"],
            "inner_steps": steps[-1], "by_steps": by_steps, "tasks": tasks, "shots": shots,
            "queries": queries, "seed": seed}
