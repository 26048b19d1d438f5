"""Pieces every meta-learner shares: argument checks and the task-averaged meta-gradient."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

from metajax._checks import check_int
from metajax.task_map import TaskMap, check_task_map, mean_value_and_grad
from metajax.types import Learner, PyTree, Task


def loss_and_aux(loss_fn, has_aux: bool):
    """``loss_fn`` normalised to return ``(loss, aux)`` (``aux`` is ``None`` without aux)."""
    if has_aux:
        return loss_fn
    return lambda *args: (loss_fn(*args), None)


def averaged_meta_grad(
    task_objective: Callable[[PyTree, Task], tuple[jax.Array, dict]],
    meta_params: PyTree,
    tasks: Task,
    task_map: TaskMap = "auto",
) -> tuple[PyTree, dict]:
    """Gradient of the mean of ``task_objective`` over the leading task axis of ``tasks``.

    ``task_objective(meta_params, task) -> (query_loss, metrics)`` handles one task; the task
    axis is executed as ``task_map`` says (:mod:`metajax.task_map`: one ``vmap``, a ``scan``
    summing per-task gradients, or scanned vmapped chunks); the result is the same up to float
    rounding. ``metrics`` are averaged over tasks and get ``meta_loss``.

    ``tasks`` must carry its task axis: one task without it is refused (``ValueError``) by
    :func:`metajax.task_map.check_task_batch` where the shapes tell (see there), rather than
    read as a batch of one-example tasks.
    """
    (meta_loss, metrics), grads = mean_value_and_grad(task_objective, meta_params, tasks,
                                                      task_map)
    metrics = dict(metrics)
    metrics["meta_loss"] = meta_loss
    return grads, metrics


def inner_loop_learner(
    init: Callable[[PyTree], PyTree],
    run_inner: Callable[[PyTree, Any, int], tuple[PyTree, jax.Array]],
    loss_fn,
    inner_steps: int,
    has_aux: bool,
    fast_params_of: Callable[[PyTree], PyTree],
    task_map: TaskMap = "auto",
) -> Learner:
    """A :class:`Learner` whose meta-objective is the query loss after ``run_inner``.

    ``run_inner(meta_params, support, steps) -> (fast_params, support_losses)`` is the
    algorithm's inner loop; ``meta_grad`` differentiates the task-averaged query loss through
    it (MAML, FOMAML, ANIL, Meta-SGD differ only in ``run_inner`` and ``init``). It may
    return a third element, a dict of per-task scalars added to ``meta_grad``'s metrics
    (iMAML's ``inner_residual``). ``task_map`` says how ``meta_grad`` runs the task axis
    (:mod:`metajax.task_map`).
    """
    check_task_map(task_map)
    objective = loss_and_aux(loss_fn, has_aux)

    def adapt(meta_params: PyTree, support, inner_steps: int | None = None) -> PyTree:
        steps = default_steps if inner_steps is None else inner_steps
        check_int("inner_steps", steps, minimum=0)
        return run_inner(meta_params, support, steps)[0]

    def task_objective(meta_params: PyTree, task: Task):
        fast_params, support_losses, *extra = run_inner(meta_params, task.support,
                                                        default_steps)
        query_loss, aux = objective(fast_params, task.query)
        metrics = {"support_loss": support_losses[0], "query_loss": query_loss}
        for more in extra:
            metrics.update(more)
        if has_aux:
            metrics["aux"] = aux
        return query_loss, metrics

    def meta_grad(meta_params: PyTree, tasks: Task, *, step=None):
        del step  # the learner contract: no schedule depends on the meta-step here
        return averaged_meta_grad(task_objective, meta_params, tasks, task_map)

    default_steps = inner_steps
    return Learner(init, adapt, meta_grad, fast_params_of)
