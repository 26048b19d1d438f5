"""The inner loop: gradient steps on a task's support set, as one ``lax.scan``.

The loop is differentiable end to end, so ``jax.grad`` through :func:`adapt` gives the exact
second-order MAML meta-gradient (Finn et al., 2017, "Model-Agnostic Meta-Learning for Fast
Adaptation of Deep Networks"). Update rules say how a gradient becomes a step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from metajax.types import Batch, LossFn, PyTree


class UpdateRule(NamedTuple):
    """How the inner loop turns gradients into new parameters.

    Attributes:
      init: ``init(params) -> rule_state``.
      update: ``update(grads, rule_state, params, step) -> (new_params, rule_state)``;
        ``step`` is the inner step index (a traced int32 scalar).
    """

    init: Callable[[PyTree], PyTree]
    update: Callable[[PyTree, PyTree, PyTree, jax.Array], tuple[PyTree, PyTree]]


def sgd(lr: float | jax.Array) -> UpdateRule:
    """Plain gradient descent ``params - lr * grads`` with a scalar learning rate (MAML)."""

    def update(grads, state, params, step):
        del step
        return jax.tree.map(lambda p, g: p - lr * g, params, grads), state

    return UpdateRule(lambda params: (), update)


def per_parameter(lrs: PyTree) -> UpdateRule:
    """Gradient descent with one learning rate per parameter entry, ``params - lrs * grads``.

    ``lrs`` has the structure and shapes of the adapted parameters; it is usually meta-learned
    (Li et al., 2017, "Meta-SGD: Learning to Learn Quickly for Few-Shot Learning").
    """

    def update(grads, state, params, step):
        del step
        return jax.tree.map(lambda p, g, a: p - a * g, params, grads, lrs), state

    return UpdateRule(lambda params: (), update)


def per_layer_per_step(lrs: PyTree) -> UpdateRule:
    """Gradient descent with one learnable rate per parameter tensor and per inner step.

    ``lrs`` has one leaf ``[inner_steps]`` per parameter leaf; step ``i`` uses ``lrs[...][i]``
    for the whole tensor (LSLR of Antoniou et al., 2019, "How to train your MAML").
    """

    def update(grads, state, params, step):
        return jax.tree.map(lambda p, g, a: p - a[step] * g, params, grads, lrs), state

    return UpdateRule(lambda params: (), update)


def from_optax(tx: optax.GradientTransformation) -> UpdateRule:
    """Any optax transformation as a differentiable inner optimiser (e.g. ``optax.adam``)."""

    def update(grads, state, params, step):
        del step
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return UpdateRule(tx.init, update)


def partition(params: PyTree, mask: PyTree | None) -> tuple[PyTree, PyTree]:
    """Split ``params`` into ``(adapted, frozen)`` by a boolean ``mask`` of the same structure.

    Leaves that go to the other side become ``None`` (an empty subtree), so ``adapted`` holds
    only what the inner loop differentiates; with ``mask=None`` everything is adapted.
    """
    if mask is None:
        return params, None
    adapted = jax.tree.map(lambda m, p: p if m else None, mask, params)
    frozen = jax.tree.map(lambda m, p: None if m else p, mask, params)
    return adapted, frozen


def combine(adapted: PyTree, frozen: PyTree, mask: PyTree | None) -> PyTree:
    """Inverse of :func:`partition`."""
    if mask is None:
        return adapted
    return jax.tree.map(
        lambda m, a, f: a if m else f, mask, adapted, frozen, is_leaf=lambda x: x is None
    )


def _loss_and_aux(loss_fn: LossFn, has_aux: bool):
    if has_aux:
        return loss_fn
    return lambda *args: (loss_fn(*args), None)


def adapt(
    loss_fn: LossFn,
    params: PyTree,
    batch: Batch,
    inner_steps: int,
    rule: UpdateRule,
    *,
    has_aux: bool = False,
    mask: PyTree | None = None,
    first_order: bool | jax.Array = False,
    after_step: Callable[..., Any] | None = None,
    remat: bool = False,
    step_aware: bool = False,
) -> tuple:
    """Run ``inner_steps`` steps of ``rule`` on ``loss_fn(., batch)`` starting at ``params``.

    Args:
      loss_fn: ``loss_fn(params, batch) -> loss`` (or ``(loss, aux)`` with ``has_aux``).
      params: the initial parameters (any pytree); the meta-parameters in MAML.
      batch: the support set ``(x, y)`` of one task.
      inner_steps: number of gradient steps, a Python int (``0`` returns ``params``).
      rule: an :class:`UpdateRule` (:func:`sgd`, :func:`per_parameter`, :func:`from_optax`).
      mask: optional boolean pytree like ``params``; only ``True`` leaves adapt (ANIL).
      first_order: stop the gradient through the inner gradients (FOMAML): the derivative
        of the result with respect to ``params`` then treats each step's gradient as a
        constant. May be a traced 0/1 scalar, so that a jitted step switches between first
        and second order without recompiling (MAML++'s derivative-order annealing).
      after_step: optional ``after_step(params) -> value`` evaluated on the full parameters
        after every step (e.g. the query loss of MAML++'s multi-step loss).
      remat: rematerialise each step in the backward pass (``jax.checkpoint`` on the scan
        body): only the parameters between steps are stored, not each step's activations,
        trading one more forward pass per step for memory.
      step_aware: the model depends on the inner step: ``loss_fn(params, batch, step)`` and
        ``after_step(params, step)`` receive the step index (a traced int32 scalar), e.g.
        for per-step batch-norm weights (MAML++'s BNWB).

    Returns:
      ``(fast_params, losses)`` where ``losses [inner_steps]`` is the support loss before each
      step; with ``after_step``, ``(fast_params, losses, values)`` with ``values`` stacked on
      a leading ``[inner_steps]`` axis.
    """
    if not isinstance(inner_steps, int) or inner_steps < 0:
        raise ValueError(f"inner_steps must be a non-negative Python int, got {inner_steps!r}")
    loss_and_aux = _loss_and_aux(loss_fn, has_aux)
    adapted, frozen = partition(params, mask)

    def support_loss(adapted_params, i):
        full = combine(adapted_params, frozen, mask)
        loss, _ = loss_and_aux(full, batch, i) if step_aware else loss_and_aux(full, batch)
        return loss

    grad_fn = jax.value_and_grad(support_loss)

    def step(carry, i):
        adapted_params, rule_state = carry
        loss, grads = grad_fn(adapted_params, i)
        if isinstance(first_order, bool):
            if first_order:
                grads = jax.lax.stop_gradient(grads)
        else:
            # Same value either way; the derivative through the gradient is scaled by 0 or 1.
            weight = jnp.asarray(first_order, jnp.float32)
            grads = jax.tree.map(
                lambda g: g + weight.astype(g.dtype) * (jax.lax.stop_gradient(g) - g), grads
            )
        adapted_params, rule_state = rule.update(grads, rule_state, adapted_params, i)
        out = loss
        if after_step is not None:
            full = combine(adapted_params, frozen, mask)
            out = (loss, after_step(full, i) if step_aware else after_step(full))
        return (adapted_params, rule_state), out

    carry = (adapted, rule.init(adapted))
    if remat:
        step = jax.checkpoint(step)
    (adapted, _), outs = jax.lax.scan(step, carry, jnp.arange(inner_steps, dtype=jnp.int32))
    if after_step is not None:
        return combine(adapted, frozen, mask), outs[0], outs[1]
    return combine(adapted, frozen, mask), outs


def task_axis_mean(tree: Any) -> Any:
    """Mean over the leading (task) axis of every leaf."""
    return jax.tree.map(lambda x: jnp.mean(x, axis=0), tree)
