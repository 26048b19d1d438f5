"""MAML++: the training techniques of Antoniou, Edwards and Storkey, 2019, "How to train your
MAML", as switches on second-order MAML.

Here: multi-step loss (MSL) with its annealed per-step weights, derivative-order annealing (DA)
as a traced switch of ``meta_grad`` (no recompilation), learnable per-layer per-step inner
learning rates (LSLR), and per-step batch-norm weights (BNWB: ``per_step=norm_mask``).
Cosine annealing of the meta learning rate (CA) is an optax schedule,
``optax.cosine_decay_schedule``.

Per-step batch-norm running statistics (BNRS) are not collected: the paper's reference code
normalises with the statistics of the current batch at every step, in training and in
evaluation (``F.batch_norm(..., training=True)`` in ``MetaBatchNormLayer``), so its per-step
running averages never change an output; :class:`metajax.nn.Conv4` normalises the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp

from metajax import inner
from metajax._checks import check_int, check_number
from metajax.meta._common import (
    averaged_meta_grad,
    loss_and_aux,
)
from metajax.task_map import TaskMap, check_task_map
from metajax.types import Learner, LossFn, PyTree, Task


def norm_mask(params: PyTree) -> PyTree:
    """``True`` for the leaves of normalisation layers: every leaf under a module whose name
    starts with ``norm`` (``norm0 .. norm3`` of :class:`metajax.nn.Conv4`). Pass as
    ``mamlpp(..., per_step=norm_mask)`` for per-step batch-norm weights (BNWB)."""

    def is_norm(path, leaf) -> bool:
        del leaf
        return any(str(getattr(k, "key", getattr(k, "name", ""))).startswith("norm")
                   for k in path)

    return jax.tree_util.tree_map_with_path(is_norm, params)


def select_step(params: PyTree, mask: PyTree | None, step) -> PyTree:
    """The model parameters of inner step ``step``: per-step leaves (``mask`` True, stacked on
    a leading ``[steps]`` axis) indexed at ``step``, the others as they are."""
    if mask is None:
        return params
    return jax.tree.map(lambda m, p: p[step] if m else p, mask, params)


class MAMLPlusPlusParams(NamedTuple):
    """Meta-parameters of :func:`mamlpp`.

    Attributes:
      params: the initialisation of the model parameters; with ``per_step`` the selected
        leaves carry a leading ``[inner_steps]`` axis (one copy per inner step).
      inner_lrs: one ``[inner_steps]`` vector of learning rates per parameter tensor (LSLR),
        or ``None`` when the rates are fixed.
    """

    params: PyTree
    inner_lrs: PyTree | None


def msl_weights(inner_steps: int, epoch, anneal_epochs: int) -> jax.Array:
    """Per-step importance of the multi-step loss at ``epoch`` (Antoniou et al., 2019).

    The weights start uniform (``1 / N`` each); every epoch each non-final weight falls by
    ``1 / (N * anneal_epochs)`` down to a floor of ``0.03 / N`` while the final weight grows
    by the same total, up to ``1 - 0.03 (N - 1) / N``. From epoch ``anneal_epochs`` on, only
    the final step's loss counts (weights ``[0, ..., 0, 1]``), as in the authors' released
    code, which uses the per-step losses only while ``epoch < multi_step_loss_num_epochs``.
    ``epoch`` may be traced. Returns ``[inner_steps]``.
    """
    check_int("inner_steps", inner_steps)
    check_int("anneal_epochs", anneal_epochs)
    n = inner_steps
    epoch = jnp.asarray(epoch, jnp.float32)
    decay = epoch / (n * anneal_epochs)
    floor = 0.03 / n
    early = jnp.maximum(jnp.full((n - 1,), 1.0 / n) - decay, floor)
    last = jnp.minimum(1.0 / n + decay * (n - 1), 1.0 - (n - 1) * floor)
    annealing = jnp.concatenate([early, last[None]])
    final_only = jnp.zeros((n,), jnp.float32).at[-1].set(1.0)
    return jnp.where(epoch < anneal_epochs, annealing, final_only)


def mamlpp(
    loss_fn: LossFn,
    inner_lr: float,
    inner_steps: int = 5,
    *,
    multi_step_loss: bool = True,
    learnable_lrs: bool = True,
    per_step: PyTree | Callable[[PyTree], PyTree] | None = None,
    frozen: PyTree | Callable[[PyTree], PyTree] | None = None,
    step_weights: jax.Array | Callable[[jax.Array], jax.Array] | None = None,
    first_order: bool | Callable[[jax.Array], jax.Array] = False,
    has_aux: bool = False,
    task_map: TaskMap = "auto",
) -> Learner:
    """MAML with the MAML++ switches (Antoniou et al., 2019); each can be turned off.

    Args:
      inner_lr: the inner step size, and the initial value of every learnable rate.
      inner_steps: inner steps (the number of LSLR rates per tensor).
      multi_step_loss: MSL: the meta-objective is ``sum_i w_i L_query(phi_i)`` over the
        parameters after every inner step, with the weights ``step_weights``. Off: the final
        query loss.
      learnable_lrs: LSLR: meta-learn one rate per parameter tensor and per step.
      per_step: BNWB: a boolean mask like the model parameters, or a function
        ``params -> mask`` such as :func:`norm_mask`, choosing leaves that get one copy per
        inner step. Inner step ``i`` (its support loss and, with MSL, the query loss after
        it) runs the model with copy ``i``; the final query loss and ``adapt``'s result use
        the copy of the last step taken. These leaves are meta-learned only, never adapted
        in the inner loop (the reference's default). ``None``: no per-step leaves.
      frozen: a boolean mask like the model parameters, or a function ``params -> mask``
        (e.g. :func:`norm_mask`): leaves that are meta-learned but never adapted in the inner
        loop. The reference never adapts batch-norm scale and bias in the inner loop
        (``enable_inner_loop_optimizable_bn_params: false``), with or without BNWB: pass
        ``frozen=norm_mask`` for that without ``per_step``. ``None``: every leaf that is not
        per-step adapts.
      step_weights: MSL's weights ``w [inner_steps]``, or a schedule ``step -> w`` of the
        (traced) meta-step, as optax takes a schedule for a learning rate: e.g.
        ``lambda step: msl_weights(5, step // 500, 10)`` anneals them over epochs of 500
        steps (:func:`msl_weights`). Default: uniform.
      first_order: DA, derivative-order annealing: ``True`` for first-order meta-gradients,
        or a schedule ``step -> 0/1 scalar`` (1: first order), e.g. ``lambda step: step <
        2000`` for first order during the first 2,000 meta-steps. A scheduled switch is
        traced, so it changes order inside one compiled step. Default: second order.
      has_aux: as :func:`metajax.maml` (the final step's query ``aux`` is reported).
      task_map: how ``meta_grad`` executes the task axis: ``"auto"`` (the backend's measured
        default), ``"vmap"``, ``"scan"`` or a chunk size; see :mod:`metajax.task_map`. The
        meta-gradient is the same whatever the choice (up to float rounding).

    ``meta_grad(meta_params, tasks, *, step=None, step_weights=None, first_order=None)``:
    ``step`` is the meta-step the schedules are evaluated at (needed when one of them is a
    schedule; the training loop passes it); ``step_weights`` and ``first_order`` given here
    override the constructor's for this call (``first_order`` may be a traced 0/1 scalar).
    ``adapt`` can run at most ``inner_steps`` steps when the rates are learned (there is no
    rate for later steps).
    """
    check_number("inner_lr", inner_lr)
    check_int("inner_steps", inner_steps)
    check_task_map(task_map)
    objective = loss_and_aux(loss_fn, has_aux)
    default_steps = inner_steps

    def resolve_mask(spec, name: str, params: PyTree) -> PyTree | None:
        """The boolean mask ``spec`` gives for ``params`` (model-shaped or with tiled per-step
        leaves: a mask function must depend on the leaves' paths only, as :func:`norm_mask`
        does)."""
        if spec is None:
            return None
        mask = spec(params) if callable(spec) else spec
        if jax.tree.structure(mask) != jax.tree.structure(params):
            raise ValueError(f"{name} must give a boolean mask with the parameters' structure")
        return jax.tree.map(bool, mask)

    def mask_of(params: PyTree) -> PyTree | None:
        return resolve_mask(per_step, "per_step", params)

    def init(params: PyTree) -> MAMLPlusPlusParams:
        lrs = None
        if learnable_lrs:
            lrs = jax.tree.map(lambda p: jnp.full((inner_steps,), inner_lr, jnp.result_type(p)),
                               params)
        mask = mask_of(params)
        if mask is not None:
            params = jax.tree.map(
                lambda m, p: jnp.broadcast_to(p, (inner_steps, *jnp.shape(p))) if m else p,
                mask, params,
            )
        return MAMLPlusPlusParams(params, lrs)

    def rule_for(meta_params: MAMLPlusPlusParams, adapt_mask):
        if meta_params.inner_lrs is None:
            return inner.sgd(inner_lr)
        lrs, _ = inner.partition(meta_params.inner_lrs, adapt_mask)
        return inner.per_layer_per_step(lrs)

    def run_inner(meta_params, batch, steps, **kwargs):
        mask = mask_of(meta_params.params)
        fixed = resolve_mask(frozen, "frozen", meta_params.params)
        if mask is None:
            adapt_mask = None if fixed is None else jax.tree.map(lambda f: not f, fixed)
            if adapt_mask is not None:
                kwargs["mask"] = adapt_mask
            return inner.adapt(loss_fn, meta_params.params, batch, steps,
                               rule_for(meta_params, adapt_mask), has_aux=has_aux,
                               **kwargs), None
        adapt_mask = jax.tree.map(lambda m: not m, mask)
        if fixed is not None:
            adapt_mask = jax.tree.map(lambda a, f: a and not f, adapt_mask, fixed)

        def step_loss(params, batch, i):
            return loss_fn(select_step(params, mask, i), batch)

        after = kwargs.pop("after_step", None)
        if after is not None:
            kwargs["after_step"] = lambda params, i: after(select_step(params, mask, i))
        out = inner.adapt(step_loss, meta_params.params, batch, steps,
                          rule_for(meta_params, adapt_mask), has_aux=has_aux, mask=adapt_mask,
                          step_aware=True, **kwargs)
        return out, mask

    def adapt(meta_params: MAMLPlusPlusParams, support, inner_steps: int | None = None):
        steps = default_steps if inner_steps is None else inner_steps
        check_int("inner_steps", steps, minimum=0)
        limited = meta_params.inner_lrs is not None or per_step is not None
        if limited and steps > default_steps:
            raise ValueError(
                f"inner_steps={steps} exceeds the {default_steps} steps that have learned "
                "per-step rates or weights; adapt with at most that many"
            )
        (fast, *_), mask = run_inner(meta_params, support, steps)
        return select_step(fast, mask, max(steps - 1, 0))

    def scheduled(name, value, step):
        if not callable(value):
            return value
        if step is None:
            raise ValueError(
                f"mamlpp's {name} is a schedule of the meta-step: call "
                f"meta_grad(meta_params, tasks, step=step) (the training loop does)"
            )
        return value(jnp.asarray(step))

    default_weights, default_order = step_weights, first_order

    def meta_grad(meta_params: MAMLPlusPlusParams, tasks: Task, *, step=None,
                  step_weights=None, first_order=None):
        if step_weights is None:
            step_weights = scheduled("step_weights", default_weights, step)
        if first_order is None:
            first_order = scheduled("first_order", default_order, step)
        weights = (jnp.full((default_steps,), 1.0 / default_steps) if step_weights is None
                   else jnp.asarray(step_weights))

        def task_objective(mp: MAMLPlusPlusParams, task: Task, order):
            (fast, support_losses, (query_losses, aux)), _ = run_inner(
                mp, task.support, default_steps, first_order=order,
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

        def grads_of(order: bool):
            return averaged_meta_grad(partial(task_objective, order=order), meta_params, tasks,
                                      task_map)

        if isinstance(first_order, bool):
            return grads_of(first_order)
        # A traced switch picks one of two compiled branches, so the first-order epochs of
        # derivative-order annealing cost what first-order MAML costs (an unbatched predicate
        # stays a real branch; under a vmap that batches it both would run).
        return jax.lax.cond(jnp.asarray(first_order) > 0.5, lambda: grads_of(True),
                            lambda: grads_of(False))

    def fast_params_of(meta_params: MAMLPlusPlusParams) -> PyTree:
        return select_step(meta_params.params, mask_of(meta_params.params), default_steps - 1)

    return Learner(init, adapt, meta_grad, fast_params_of)
