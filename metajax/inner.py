"""The inner loop: gradient steps on a task's support set, as one ``lax.scan``.

The loop is differentiable end to end, so ``jax.grad`` through :func:`adapt` gives the exact
second-order MAML meta-gradient (Finn et al., 2017, "Model-Agnostic Meta-Learning for Fast
Adaptation of Deep Networks"). Update rules say how a gradient becomes a step.

:func:`adapt` returns ``(fast_params, losses)``: the adapted parameters and the support loss
before each step, ``losses [inner_steps]`` (with ``after_step``, a third element). Optax
optimisers become update rules through :func:`from_optax`, which refuses those whose
derivative is not finite where a gradient entry is exactly zero (``optax.adam`` without
``eps_root``), as their meta-gradients would be NaN.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
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


def _probe_tree(example_params: PyTree | None) -> tuple[PyTree, PyTree]:
    """``(params, grads)`` for :func:`from_optax`'s probe: a vector and a small matrix (or the
    structure, shapes and float dtypes of ``example_params``) with deterministic nonzero
    parameters and gradients of which every third entry is exactly zero."""
    if example_params is None:
        example_params = {"vector": jax.ShapeDtypeStruct((3,), jnp.float32),
                          "matrix": jax.ShapeDtypeStruct((2, 3), jnp.float32)}

    def leaf(x, offset):
        shape = tuple(x.shape) if hasattr(x, "shape") else jnp.shape(x)
        dtype = x.dtype if hasattr(x, "dtype") else jnp.result_type(x)
        dtype = dtype if jnp.issubdtype(dtype, jnp.floating) else jnp.float32
        i = jnp.arange(int(np.prod(shape)), dtype=dtype).reshape(shape) + offset
        params = 1.0 + 0.5 * jnp.sin(1.3 * i)
        grads = jnp.where(jnp.arange(i.size).reshape(i.shape) % 3 == 1, 0.0, jnp.cos(0.7 * i))
        return params, grads.astype(dtype)

    leaves, treedef = jax.tree.flatten(example_params)
    pairs = [leaf(x, 10 * n) for n, x in enumerate(leaves)]
    return (jax.tree.unflatten(treedef, [p for p, _ in pairs]),
            jax.tree.unflatten(treedef, [g for _, g in pairs]))


def _probe_is_finite(tx: optax.GradientTransformation, params: PyTree, grads: PyTree) -> bool:
    """Whether two updates of ``tx`` from ``tx.init(params)`` and their derivative with
    respect to the gradients and the initial parameters are all finite."""

    def objective(grads, params):
        state = tx.init(params)
        for scale in (1.0, -0.5):  # two steps: the second sees state built from the first
            updates, state = tx.update(jax.tree.map(lambda g, s=scale: s * g, grads), state,
                                       params)
            params = optax.apply_updates(params, updates)
        return sum(jnp.sum(jnp.sin(p)) for p in jax.tree.leaves(params))

    value, derivative = jax.value_and_grad(objective, argnums=(0, 1))(grads, params)
    return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves((value, derivative)))


def _check_differentiable(tx: optax.GradientTransformation, example_params) -> None:
    with jax.ensure_compile_time_eval():  # eager even where from_optax is called under jit
        params, grads = _probe_tree(example_params)
        leaves, treedef = jax.tree.flatten(grads)
        # A whole leaf at zero as well (a tensor the support loss does not depend on), where
        # there are other leaves: per-tensor norms divide 0 by 0 there.
        zero_leaf = jax.tree.unflatten(
            treedef, [jnp.zeros_like(leaves[0]), *leaves[1:]]) if len(leaves) > 1 else grads
        try:
            if _probe_is_finite(tx, params, zero_leaf):
                return
            entries_fail = not _probe_is_finite(tx, params, grads)
        except Exception as err:
            raise ValueError(
                f"from_optax could not run tx on its probe pytree ({type(err).__name__}: "
                f"{err}). The inner loop calls tx.update(grads, state, params) with no other "
                "argument, so transformations that need one (value=, as optax.lbfgs and "
                "optax.polyak_sgd do) cannot be inner rules; a transformation that needs the "
                "parameters' structure (optax.masked or optax.multi_transform with a pytree "
                "mask or labels) needs example_params=params (the adapted parameters, or a "
                "pytree of jax.ShapeDtypeStruct)") from err
    skip = ("If the inner loop is never differentiated through tx (first-order MAML, "
            "evaluation, iMAML's implicit gradient), check=False skips this probe.")
    if entries_fail:
        raise ValueError(
            "from_optax refuses tx: the derivative of its update with respect to the gradients "
            "is not finite (NaN or inf) where a gradient entry is exactly 0, so meta-gradients "
            "through the inner loop would be NaN. Optimisers that divide by the square root "
            "of a second-moment estimate need eps_root > 0 inside that root: pass "
            "eps_root=1e-8 to optax.adam (likewise adamw, nadam, nadamw, amsgrad, radam), "
            "e.g. optax.adam(1e-2, eps_root=1e-8); optax.lamb and optax.adafactor also take "
            f"per-tensor norms, and stay refused whatever their eps. {skip}")
    raise ValueError(
        "from_optax refuses tx: the derivative of its update is not finite (NaN or inf) where "
        "a whole gradient leaf is exactly 0 (a parameter tensor the support loss does not "
        "depend on), so meta-gradients through the inner loop would be NaN there: per-tensor "
        "norms (the trust ratios of optax.lars, optax.lamb, optax.novograd) divide 0 by 0. "
        f"Use an optimiser without per-tensor norms. {skip}")


def from_optax(
    tx: optax.GradientTransformation,
    *,
    example_params: PyTree | None = None,
    check: bool = True,
) -> UpdateRule:
    """Any optax transformation as a differentiable inner optimiser (e.g. ``optax.adam``).

    The second-order meta-gradient differentiates ``tx.update`` with respect to the gradients
    and parameters it is given: the derivative of the update with respect to the gradient
    multiplies the Hessian of the support loss. Several optax optimisers have no finite
    derivative where a gradient entry is exactly 0, which real inner loops meet (a ReLU unit
    dead on the whole support set, an input feature that is 0 on it, a parameter the loss
    ignores): ``optax.adam`` divides by ``sqrt(nu)`` with ``nu = 0`` there, so
    ``d sqrt(nu) / d nu = inf`` meets ``d nu / d g = 2 (1 - b2) g = 0`` and gives
    ``inf * 0 = NaN``, which the Hessian product then carries into every leaf of the
    meta-gradient. ``eps_root > 0`` (``optax.adam(lr, eps_root=1e-8)``) puts the root at
    ``sqrt(nu + eps_root)``, whose derivative is finite.

    So, at construction, ``from_optax`` probes ``tx`` eagerly on a tiny pytree (a 3-vector
    and a 2x3 matrix, or ``example_params``' structure when given) with gradients of which
    every third entry is exactly 0 and, where there are several leaves, one leaf exactly 0
    throughout: ``tx.init``, two updates, and ``jax.grad`` of a scalar function of the
    updated parameters with respect to the gradients and the initial parameters. If any of
    it is not finite, ``from_optax`` raises ``ValueError`` naming the fix; ``tx`` is never
    changed. Not probed: a gradient that is 0 in every leaf at once (where
    ``optax.clip_by_global_norm``'s derivative is NaN: the support loss would not depend on
    the adapted parameters at all), and derivatives of the meta-gradient itself.

    With optax 0.2.8 the probe refuses (by default arguments): ``adam``, ``adamw``,
    ``nadam``, ``nadamw``, ``amsgrad``, ``radam`` (all accepted with ``eps_root=1e-8``);
    ``adafactor`` (its ``eps=1e-30`` inside ``rsqrt`` overflows the derivative in float32,
    and with a larger ``eps`` its per-tensor RMS still fails on a zero leaf), ``lamb`` (with
    ``eps_root`` too), ``lars`` and ``novograd`` (per-tensor trust ratios or norms); it accepts
    ``sgd`` (with or without momentum, Nesterov), ``rmsprop`` (its ``eps`` is inside the
    root; centred and with momentum too), ``adagrad``, ``adabelief``, ``adadelta``,
    ``adamax``, ``adamaxw``, ``adan``, ``fromage``, ``lion``, ``noisy_sgd``,
    ``optimistic_gradient_descent``, ``rprop``, ``sign_sgd``, ``sm3`` and ``yogi``.

    Args:
      tx: the optax transformation; ``tx.update(grads, state, params)`` is called with the
        adapted parameters (no ``value=`` or other extra arguments).
      example_params: the adapted parameters (or a pytree of ``jax.ShapeDtypeStruct``) to
        probe on instead of the tiny pytree, for transformations that need the parameters'
        structure (``optax.masked`` or ``optax.multi_transform`` with a pytree mask or labels).
      check: ``False`` skips the probe: only for inner loops that are never differentiated
        through ``tx`` (first-order MAML, where the gradients are constants; evaluation;
        iMAML's implicit meta-gradient).
    """
    if check:
        _check_differentiable(tx, example_params)

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
      inner_steps: number of gradient steps, a Python int (with ``0``, ``fast_params`` is
        ``params`` and ``losses`` is empty, shape ``[0]``).
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
      A tuple ``(fast_params, losses)``, not the parameters alone:

      * ``fast_params``: the parameters after ``inner_steps`` steps, with the structure of
        ``params`` (with ``mask``, the frozen leaves are those of ``params``);
      * ``losses``: shape ``[inner_steps]``, the loss's dtype: ``losses[i]`` is the support
        loss ``loss_fn(params_i, batch)`` at the parameters *before* step ``i`` (so
        ``losses[0]`` is the loss at ``params``; the loss at ``fast_params`` is not in it),
        the loss alone when ``has_aux`` (its ``aux`` is dropped).

      With ``after_step``, ``(fast_params, losses, values)``: ``values`` is
      ``after_step(params_{i + 1})``, evaluated *after* step ``i``, every leaf stacked on a
      leading ``[inner_steps]`` axis (so ``values[-1]`` belongs to ``fast_params``).
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
