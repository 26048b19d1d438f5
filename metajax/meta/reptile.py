"""Reptile: move the initialisation toward the parameters each task adapts to.

Nichol, Achiam and Schulman, 2018, "On First-Order Meta-Learning Algorithms".
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from metajax import inner
from metajax._checks import check_int, check_number
from metajax.meta._common import (
    inner_loop_learner,
    loss_and_aux,
)
from metajax.task_map import TaskMap, check_task_map, mean_over_tasks
from metajax.types import Learner, LossFn, PyTree, Task


def reptile(
    loss_fn: LossFn,
    inner_lr: float,
    inner_steps: int = 5,
    *,
    has_aux: bool = False,
    task_map: TaskMap = "auto",
) -> Learner:
    """Reptile (Nichol et al., 2018), batched version.

    Each task runs ``inner_steps`` SGD steps on its support set from the meta-parameters
    ``theta`` to ``phi_i``. The meta-gradient is ``theta - mean_i(phi_i)``, so an optax
    ``sgd(epsilon)`` outer step gives the paper's update
    ``theta <- theta + epsilon * mean_i(phi_i - theta)``; any other optax optimiser (Adam, as in
    the paper's few-shot experiments) treats it as a gradient. The reported ``meta_loss`` is
    the query loss at ``phi_i`` (not an objective Reptile differentiates).

    Args as :func:`metajax.maml`; with ``task_map`` ``"scan"`` or chunks, the adapted
    parameters are summed as they come instead of stacked for every task.
    """
    check_number("inner_lr", inner_lr)
    check_int("inner_steps", inner_steps)
    check_task_map(task_map)
    objective = loss_and_aux(loss_fn, has_aux)
    rule = inner.sgd(inner_lr)

    def run_inner(params: PyTree, support, steps: int):
        return inner.adapt(loss_fn, params, support, steps, rule, has_aux=has_aux)

    def one_task(meta_params: PyTree, task: Task):
        fast_params, support_losses = run_inner(meta_params, task.support, inner_steps)
        query_loss, aux = objective(fast_params, task.query)
        metrics = {"support_loss": support_losses[0], "query_loss": query_loss}
        if has_aux:
            metrics["aux"] = aux
        return fast_params, metrics

    def meta_grad(meta_params: PyTree, tasks: Task, *, step=None):
        del step  # the learner contract: no schedule depends on the meta-step here
        mean_fast, metrics = mean_over_tasks(lambda task: one_task(meta_params, task), tasks,
                                             task_map)
        grads = jax.tree.map(jnp.subtract, meta_params, mean_fast)
        metrics = dict(metrics)
        metrics["meta_loss"] = metrics["query_loss"]
        return grads, metrics

    def identity(params: PyTree) -> PyTree:
        return params

    learner = inner_loop_learner(identity, run_inner, loss_fn, inner_steps, has_aux, identity)
    return learner._replace(meta_grad=meta_grad)
