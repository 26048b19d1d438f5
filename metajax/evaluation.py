"""Evaluation on new tasks, shared by the training loop and the data-set entry points:
:func:`task_sampler`, :func:`make_evaluator` and :func:`mean_ci95`.

It sits below ``train/`` and ``data/`` (it needs only the shared types and
:mod:`metajax.task_map`), so a data set's one-call entry point can build the same
evaluator the training loop uses.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from metajax.task_map import map_tasks, sharded_map
from metajax.types import Learner, Problem, Task


def task_sampler(problem: Problem, shots: int, queries: int,
                 split: str = "train") -> Callable[[jax.Array], Task]:
    """``sample_task(key) -> Task``: one task of ``problem`` (no task axis) drawn from ``key``,
    what :func:`make_train_chunk` takes."""

    def sample_task(key):
        tasks = problem.sample_tasks(key, 1, shots, queries, split)
        return jax.tree.map(lambda x: x[0], tasks)

    return sample_task


def make_evaluator(learner: Learner, problem: Problem, batch_tasks: int = 20,
                   task_map=None, mesh: Mesh | None = None) -> Callable:
    """A jitted ``evaluate(meta_params, key, num_tasks, shots, queries, inner_steps, split)``.

    Each of ``num_tasks`` tasks (drawn with ``fold_in(key, i)``) is adapted on its support set
    with ``inner_steps`` steps and measured by ``problem.metric_fn`` on its query set; tasks
    run in vmapped batches of ``batch_tasks`` to bound memory, or as ``task_map`` says
    (``"vmap"``, ``"scan"``, a chunk size: :func:`metajax.task_map.map_tasks`) when given.
    With a ``mesh`` the tasks are spread over its devices
    (:func:`metajax.task_map.sharded_map`); the values do not change. Returns
    the per-task values ``[num_tasks]``.
    """

    @functools.partial(
        jax.jit, static_argnames=("num_tasks", "shots", "queries", "inner_steps", "split")
    )
    def evaluate(meta_params, key, num_tasks, shots, queries, inner_steps, split):
        def one_task(task_key):
            task = task_sampler(problem, shots, queries, split)(task_key)
            fast_params = learner.adapt(meta_params, task.support, inner_steps=inner_steps)
            return problem.metric_fn(fast_params, task.query)

        keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(num_tasks))
        how = batch_tasks if task_map is None else task_map
        return sharded_map(one_task, keys, mesh,
                                 local_map=lambda fn, shard: map_tasks(fn, shard, how))

    return evaluate


def mean_ci95(values: np.ndarray) -> dict:
    """Mean and the half-width of its normal 95% confidence interval, ``1.96 s / sqrt(n)``."""
    values = np.asarray(values, np.float64)
    ci = 1.96 * values.std(ddof=1) / np.sqrt(len(values)) if len(values) > 1 else float("nan")
    return {"mean": float(values.mean()), "ci95": float(ci)}
