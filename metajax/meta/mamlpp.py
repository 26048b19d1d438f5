"""MAML++: the training techniques of Antoniou, Edwards and Storkey, 2019, "How to train your
MAML", as switches on second-order MAML.

Here: multi-step loss (MSL) with its annealed per-step weights, derivative-order annealing (DA)
as a traced switch of ``meta_grad`` (no recompilation), and learnable per-layer per-step
inner learning rates (LSLR). Cosine annealing of the meta learning rate (CA) is an optax
schedule, ``optax.cosine_decay_schedule``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from metajax import inner
from metajax.meta._common import (
    averaged_meta_grad,
    check_positive_number,
    check_steps,
    loss_and_aux,
)
from metajax.types import Learner, LossFn, PyTree, Task


class MAMLPlusPlusParams(NamedTuple):
    """Meta-parameters of :func:`mamlpp`.

    Attributes:
      params: the initialisation of the model parameters.
      inner_lrs: one ``[inner_steps]`` vector of learning rates per parameter tensor (LSLR),
        or ``None`` when the rates are fixed.
    """

    params: PyTree
    inner_lrs: PyTree | None


def msl_weights(inner_steps: int, epoch, anneal_epochs: int) -> jax.Array:
    """Per-step importance of the multi-step loss at ``epoch`` (Antoniou et al., 2019).

    The weights start uniform (``1 / N`` each); every epoch each non-final weight falls by
    ``1 / (N * anneal_epochs)`` down to a floor of ``0.03 / N`` while the final weight grows
    by the same total, up to ``1 - 0.03 (N - 1) / N``, so after ``anneal_epochs`` epochs almost
    all weight is on the last step. ``epoch`` may be traced. Returns ``[inner_steps]``.
    """
    check_steps("inner_steps", inner_steps)
    check_steps("anneal_epochs", anneal_epochs)
    n = inner_steps
    decay = jnp.asarray(epoch, jnp.float32) / (n * anneal_epochs)
    floor = 0.03 / n
    early = jnp.maximum(jnp.full((n - 1,), 1.0 / n) - decay, floor)
    last = jnp.minimum(1.0 / n + decay * (n - 1), 1.0 - (n - 1) * floor)
    return jnp.concatenate([early, last[None]])


def mamlpp(
    loss_fn: LossFn,
    inner_lr: float,
    inner_steps: int = 5,
    *,
    multi_step_loss: bool = True,
    learnable_lrs: bool = True,
    has_aux: bool = False,
) -> Learner:
    """MAML with the MAML++ switches (Antoniou et al., 2019); each can be turned off.

    Args:
      inner_lr: the inner step size, and the initial value of every learnable rate.
      inner_steps: inner steps (the number of LSLR rates per tensor).
      multi_step_loss: MSL: the meta-objective is ``sum_i w_i L_query(phi_i)`` over the
        parameters after every inner step; ``meta_grad(..., step_weights=w)`` passes the
        weights (default uniform), e.g. from :func:`msl_weights`. Off: the final query loss.
      learnable_lrs: LSLR: meta-learn one rate per parameter tensor and per step.
      has_aux: as :func:`metajax.maml` (the final step's query ``aux`` is reported).

    ``meta_grad(meta_params, tasks, *, step_weights=None, first_order=False)``: ``first_order``
    may be a traced 0/1 scalar, so derivative-order annealing (first order for the first
    epochs, then second order) switches inside one compiled step. ``adapt`` can run at most
    ``inner_steps`` steps when the rates are learned (there is no rate for later steps).
    """
    check_positive_number("inner_lr", inner_lr)
    check_steps("inner_steps", inner_steps)
    objective = loss_and_aux(loss_fn, has_aux)
    default_steps = inner_steps

    def init(params: PyTree) -> MAMLPlusPlusParams:
        lrs = None
        if learnable_lrs:
            lrs = jax.tree.map(lambda p: jnp.full((inner_steps,), inner_lr, jnp.result_type(p)),
                               params)
        return MAMLPlusPlusParams(params, lrs)

    def rule_for(meta_params: MAMLPlusPlusParams):
        if meta_params.inner_lrs is None:
            return inner.sgd(inner_lr)
        return inner.per_layer_per_step(meta_params.inner_lrs)

    def adapt(meta_params: MAMLPlusPlusParams, support, inner_steps: int | None = None):
        steps = default_steps if inner_steps is None else inner_steps
        check_steps("inner_steps", steps, minimum=0)
        if meta_params.inner_lrs is not None and steps > default_steps:
            raise ValueError(
                f"inner_steps={steps} exceeds the {default_steps} steps that have learned "
                "rates; adapt with at most that many"
            )
        return inner.adapt(loss_fn, meta_params.params, support, steps,
                           rule_for(meta_params), has_aux=has_aux)[0]

    def meta_grad(meta_params: MAMLPlusPlusParams, tasks: Task, *, step_weights=None,
                  first_order=False):
        weights = (jnp.full((default_steps,), 1.0 / default_steps) if step_weights is None
                   else jnp.asarray(step_weights))

        def task_objective(mp: MAMLPlusPlusParams, task: Task):
            fast, support_losses, (query_losses, aux) = inner.adapt(
                loss_fn, mp.params, task.support, default_steps, rule_for(mp),
                has_aux=has_aux, first_order=first_order,
                after_step=lambda p: objective(p, task.query),
            )
            del fast
            if multi_step_loss:
                loss = jnp.sum(weights.astype(query_losses.dtype) * query_losses)
            else:
                loss = query_losses[-1]
            metrics = {"support_loss": support_losses[0], "query_loss": query_losses[-1]}
            if has_aux:
                metrics["aux"] = jax.tree.map(lambda a: a[-1], aux)
            return loss, metrics

        return averaged_meta_grad(task_objective, meta_params, tasks)

    return Learner(init, adapt, meta_grad, lambda meta_params: meta_params.params)
