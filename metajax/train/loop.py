"""The training loop: many meta-steps compiled into one call, evaluation, run directories.

The loop does not know which algorithm it runs: it receives a :class:`~metajax.types.Learner`,
an optax optimiser and a task sampler.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax

from metajax.task_map import map_tasks
from metajax.train.checkpoint import save_params
from metajax.train.logging import append_jsonl, progress_bar
from metajax.types import Learner, Problem, PyTree


class RunConfig(Protocol):
    """What the training loop reads of a configuration (:class:`metajax.presets.config.Config`
    has it all): the run's length and cadence, the task shapes, the seed, and its JSON."""

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
    sample_tasks: Callable[[jax.Array], PyTree],
) -> Callable:
    """A jitted ``chunk(meta_params, opt_state, key, start, length)`` running ``length`` steps.

    Meta-step ``s`` samples its tasks on device with ``fold_in(key, s)``, takes the
    meta-gradient and applies the optimiser; ``length`` steps run in one ``lax.scan``, so a
    whole chunk is one compiled call with no host round-trip. The result does not depend on
    how the run is cut into chunks. ``meta_grad`` receives the (traced) meta-step as
    ``step=``, for learners built with schedules (MAML++'s annealing). Returns
    ``(meta_params, opt_state, metrics)`` where each metric has a leading ``[length]`` axis.
    """

    def meta_step(carry, step):
        meta_params, opt_state, key = carry
        tasks = sample_tasks(jax.random.fold_in(key, step))
        grads, metrics = learner.meta_grad(meta_params, tasks, step=step)
        updates, opt_state = optimizer.update(grads, opt_state, meta_params)
        meta_params = optax.apply_updates(meta_params, updates)
        return (meta_params, opt_state, key), metrics

    @functools.partial(jax.jit, static_argnames="length", donate_argnums=(0, 1))
    def chunk(meta_params, opt_state, key, start, length):
        steps = start + jnp.arange(length, dtype=jnp.int32)
        (meta_params, opt_state, _), metrics = jax.lax.scan(
            meta_step, (meta_params, opt_state, key), steps
        )
        return meta_params, opt_state, metrics

    return chunk


def make_evaluator(learner: Learner, problem: Problem, batch_tasks: int = 20,
                   task_map=None) -> Callable:
    """A jitted ``evaluate(meta_params, key, num_tasks, shots, queries, inner_steps, split)``.

    Each of ``num_tasks`` tasks (drawn with ``fold_in(key, i)``) is adapted on its support set
    with ``inner_steps`` steps and measured by ``problem.metric_fn`` on its query set; tasks
    run in vmapped batches of ``batch_tasks`` to bound memory, or as ``task_map`` says
    (``"vmap"``, ``"scan"``, a chunk size: :func:`metajax.task_map.map_tasks`) when given.
    Returns the per-task values
    ``[num_tasks]``.
    """

    @functools.partial(
        jax.jit, static_argnames=("num_tasks", "shots", "queries", "inner_steps", "split")
    )
    def evaluate(meta_params, key, num_tasks, shots, queries, inner_steps, split):
        def one_task(task_key):
            task = jax.tree.map(
                lambda x: x[0], problem.sample_tasks(task_key, 1, shots, queries, split)
            )
            fast_params = learner.adapt(meta_params, task.support, inner_steps=inner_steps)
            return problem.metric_fn(fast_params, task.query)

        keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(num_tasks))
        return map_tasks(one_task, keys, batch_tasks if task_map is None else task_map)

    return evaluate


def mean_ci95(values: np.ndarray) -> dict:
    """Mean and the half-width of its normal 95% confidence interval, ``1.96 s / sqrt(n)``."""
    values = np.asarray(values, np.float64)
    ci = 1.96 * values.std(ddof=1) / np.sqrt(len(values)) if len(values) > 1 else float("nan")
    return {"mean": float(values.mean()), "ci95": float(ci)}


def flat_metrics(metrics: dict) -> dict:
    """Chunk metrics as floats averaged over the chunk; a dict ``aux`` becomes ``query_<key>``."""
    out = {}
    for key, value in metrics.items():
        if key == "aux" and isinstance(value, dict):
            out.update({f"query_{k}": float(np.mean(v)) for k, v in value.items()})
        elif key != "aux":
            out[key] = float(np.mean(value))
    return out


class NonFiniteLoss(RuntimeError):
    """Training produced a NaN or infinite meta-loss."""


def train(
    config: RunConfig,
    problem: Problem,
    learner: Learner,
    optimizer: optax.GradientTransformation,
    run_dir: str | Path,
    *,
    progress: bool = True,
) -> dict:
    """Train ``learner`` on ``problem`` for ``config.steps`` meta-steps, logging to ``run_dir``.

    ``run_dir`` receives ``config.json``, ``metrics.jsonl`` (one line per chunk of
    ``config.log_every`` steps, plus validation lines) and ``meta_params.msgpack`` (written at
    every validation and at the end); with a held-out validation split also
    ``best_meta_params.msgpack``, the parameters of the best validation score.

    Training stops early, after a whole chunk, once ``config.time_budget_s`` is spent.

    Returns:
      The final summary: ``step``, ``meta_loss``, ``run_dir``, ``wall_s``, ``steps_per_s``,
      ``stopped_by_time_budget`` and the last validation figure ``val_<metric>``.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / CONFIG_FILE).write_text(config.to_json())
    metrics_path = run_dir / METRICS_FILE
    metrics_path.unlink(missing_ok=True)

    k_init, k_train, k_val = jax.random.split(jax.random.PRNGKey(config.seed), 3)
    meta_params = learner.init(problem.init_params(k_init))
    opt_state = optimizer.init(meta_params)

    def sample(key):
        return problem.sample_tasks(key, config.meta_batch_size, config.shots, config.queries,
                                    "train")

    chunk = make_train_chunk(learner, optimizer, sample)
    evaluate = make_evaluator(learner, problem)
    metric = problem.metric_name
    higher_is_better = metric == "accuracy"
    best = None

    def validate(step):
        nonlocal best
        values = evaluate(meta_params, k_val, config.eval_tasks, config.shots,
                          config.eval_queries, config.test_inner_steps, "val")
        record = {"step": step, f"val_{metric}": mean_ci95(jax.device_get(values))["mean"]}
        append_jsonl(metrics_path, record)
        save_params(run_dir / PARAMS_FILE, meta_params)
        score = record[f"val_{metric}"]
        if problem.has_validation and (
            best is None or (score > best if higher_is_better else score < best)
        ):
            best = score
            save_params(run_dir / BEST_PARAMS_FILE, meta_params)
        return record

    step, last, val_record = 0, {}, {}
    start = time.perf_counter()
    with progress_bar(config.steps, enabled=progress) as bar:
        while step < config.steps:
            length = min(config.log_every, config.steps - step)
            if config.eval_every:
                length = min(length, config.eval_every - step % config.eval_every)
            meta_params, opt_state, metrics = chunk(
                meta_params, opt_state, k_train, jnp.int32(step), length
            )
            metrics = flat_metrics(jax.device_get(metrics))
            step += length
            elapsed = time.perf_counter() - start
            last = {"step": step, **metrics, "wall_s": round(elapsed, 3)}
            append_jsonl(metrics_path, last)
            if not np.isfinite(metrics["meta_loss"]):
                raise NonFiniteLoss(
                    f"meta_loss became {metrics['meta_loss']} by step {step}; lower outer_lr or "
                    f"inner_lr (now {config.outer_lr}, {config.inner_lr})"
                )
            bar.update(length)
            bar.set_postfix(meta_loss=f"{metrics['meta_loss']:.4f}")
            out_of_time = bool(config.time_budget_s) and elapsed > config.time_budget_s
            if config.eval_every and step % config.eval_every == 0 and step < config.steps:
                val_record = validate(step)
            if out_of_time:
                break
        val_record = validate(step)
    wall = time.perf_counter() - start
    return {
        **{k: v for k, v in last.items() if k != "wall_s"},
        **{k: v for k, v in val_record.items() if k != "step"},
        "run_dir": str(run_dir),
        "stopped_by_time_budget": step < config.steps,
        "wall_s": round(wall, 2),
        "steps_per_s": round(step / wall, 1),
    }


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
) -> dict:
    """Test-time figures of ``meta_params``: the metric after each inner-step count in ``steps``.

    The test tasks come from ``seed`` alone (not the training seed), so runs are compared on
    the same tasks. Returns ``{"metric", "mean", "ci95", "by_steps": {n: {"mean", "ci95"}},
    "tasks", ...}`` where the top-level ``mean`` and ``ci95`` are those after ``steps[-1]``.
    """
    evaluate = make_evaluator(learner, problem)
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


def run_config_matches(run_dir: Path, config: RunConfig) -> bool:
    """Whether ``run_dir`` is empty of runs or holds a run of this same configuration."""
    path = run_dir / CONFIG_FILE
    if not path.exists():
        return True
    try:
        existing = type(config).from_json_file(path)
    except Exception:
        return False
    return dataclasses.asdict(existing) == dataclasses.asdict(config)
