"""Look-ahead MAML (La-MAML) and its ablations Sync-La-MAML and C-MAML.

Gupta, Yadav and Paull, 2020, "La-MAML: Look-ahead Meta Learning for Continual Learning"
(arXiv 2007.13904).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from metajax import inner
from metajax._checks import check_int, check_number
from metajax._tree import where as tree_where
from metajax.continual.learners import (
    ContinualLearner,
    ExampleLossFn,
    batch_size_of,
    example_losses,
    float_metrics,
    task_vector,
    weighted_mean,
    with_replay,
)
from metajax.continual.memory import (
    ReservoirBuffer,
    buffer_sample,
    reservoir_add_batch,
    reservoir_init,
)
from metajax.types import Batch, PyTree

VARIANTS = ("lamaml", "sync", "cmaml")


class LaMAMLState(NamedTuple):
    """State of :func:`lamaml`.

    Attributes:
      params: the model parameters ``theta_0``.
      alpha: the inner-loop learning rates: a pytree like ``params`` (one rate per parameter
        entry, learned) for ``"lamaml"`` and ``"sync"``; a fixed ``[]`` float32 for
        ``"cmaml"``.
      memory: the :class:`ReservoirBuffer` of past stream examples (written every update).
      past_memory: with ``replay_past_tasks``, the copy of ``memory`` taken when the current
        task began, which replay reads from on tasks after the first; otherwise ``None``.
      task: ``[]`` int32, the task of the previous update (to detect a new task).
      key: PRNG key for replay draws, batch shuffles and reservoir decisions.
      step: ``[]`` int32, updates so far.
    """

    params: PyTree
    alpha: PyTree
    memory: ReservoirBuffer
    past_memory: ReservoirBuffer | None
    task: jax.Array
    key: jax.Array
    step: jax.Array


def _clip(grads: PyTree, max_norm: float | None) -> PyTree:
    if max_norm is None:
        return grads
    clipped, _ = optax.clip_by_global_norm(max_norm).update(grads, optax.EmptyState())
    return clipped


def lamaml(
    loss_fn: ExampleLossFn,
    *,
    alpha_init: float,
    memory_size: int,
    replay_batch: int,
    lr_eta: float | None = None,
    outer_lr: float | None = None,
    variant: str = "lamaml",
    inner_steps: int | None = None,
    glances: int = 1,
    first_order: bool = False,
    multi_step_loss: bool = False,
    replay_past_tasks: bool = False,
    grad_clip_norm: float | None = None,
    clip_inner_rates: bool = False,
) -> ContinualLearner:
    """La-MAML (Gupta et al., 2020): online MAML over replay with learned per-parameter
    learning rates, and the paper's two ablations.

    One update, for incoming batch ``b`` of task ``t`` (the paper's Algorithm 1):

    1. ``b_m = Sample(R) u b``: ``replay_batch`` examples drawn from the reservoir ``R``
       (uniformly, with replacement; placeholder rows of weight 0 while ``R`` is empty) joined
       with the incoming batch: the meta-batch;
    2. inner loop from ``theta_0``: ``theta_{n+1} = theta_n - alpha * grad l(theta_n, b[n])``
       for ``n = 0 .. k-1``, where ``b[n]`` is the ``n``-th of ``inner_steps`` equal slices
       of ``b``; by default ``inner_steps = |b|``, one example per step as in Algorithm 1
       (the authors' CIFAR code uses 5 slices of a batch of 10). As in Algorithm 1 the inner
       step uses ``alpha`` itself, not clipped (the authors' MNIST code clips it with a ReLU
       here too; their CIFAR code does not);
    3. the meta-loss ``L(theta_k, b_m)``, the mean over ``b_m``'s rows, and its gradients
       ``g_theta`` with respect to ``theta_0`` and ``g_alpha`` with respect to ``alpha``,
       through the whole inner loop (second order; ``first_order=True`` treats the inner
       gradients as constants, which the authors' MNIST scripts do: then ``g_theta`` is the
       meta-loss gradient at ``theta_k`` and ``g_alpha = -sum_n grad l_n * grad L``, the
       gradient-alignment term of the paper's analysis: a rate grows where the inner
       gradients agree with the meta-batch's and shrinks where they conflict);
    4. the outer update, by ``variant``:

       * ``"lamaml"`` (asynchronous): first ``alpha <- alpha - lr_eta * g_alpha``, then
         ``theta_0 <- theta_0 - max(alpha, 0) * g_theta`` with the *updated* rates, clipped
         at zero so that a negative rate freezes its parameter instead of ascending;
       * ``"sync"`` (Sync-La-MAML): the rates are learned the same way, but the weights take
         a plain step ``theta_0 <- theta_0 - outer_lr * g_theta`` with a fixed rate, both
         from the same meta-gradient (the authors' ``--sync_update``);
       * ``"cmaml"`` (C-MAML): one fixed scalar inner rate ``alpha_init``, never learned,
         and the fixed-rate outer step ``theta_0 <- theta_0 - outer_lr * g_theta``;

    5. the incoming batch is offered to the reservoir.

    ``glances`` repeats steps 1-4 on the same incoming batch (the single-pass setting's
    "glances"), each time with a fresh replay draw and the batch reshuffled (as the authors'
    code). The batch is offered to the reservoir once, during the first glance, after that
    glance's replay draw, as the authors' code (``model/lamaml.py`` draws the meta-batch,
    then pushes each row to memory after its inner step, on the first glance only:
    ``lamaml_base.push_to_mem`` returns when ``pass_itr > 0``); so the later glances may
    replay rows of the incoming batch. The rows are offered in the batch's order rather than
    the first glance's shuffle (the same distribution of what the reservoir keeps). One
    difference remains with several passes over a task (``epochs > 1``): the authors offer a
    row on the first pass only (``real_epoch == 0``), here on every pass, as the learner does
    not know the pass.

    Options that reproduce the authors' released scripts (``run_experiments.sh``), off by
    default because Algorithm 1 does not have them:

    * ``multi_step_loss``: average the meta-loss over the fast weights after every inner
      step, ``1/k sum_n L(theta_{n+1}, b_m)``, instead of ``L(theta_k, b_m)`` only;
    * ``replay_past_tasks`` (``--use_old_task_memory``): from the second task on, replay from
      the copy of the reservoir taken when the current task began, i.e. past tasks only;
    * ``grad_clip_norm``: clip ``g_theta`` and ``g_alpha`` each to this global norm (the
      scripts use 2.0 by default, 1.0 for La-MAML on CIFAR-100).
    * ``clip_inner_rates``: inner steps use ``max(alpha, 0)`` instead of ``alpha`` (the
      authors' MNIST code); a rate below zero then stops its parameter in the inner loop
      too, and gets no gradient from it.

    Args:
      loss_fn: per-example loss ``loss_fn(params, (x, y), task) -> [b]``; replayed rows
        carry their own task id.
      alpha_init: initial inner learning rate of every parameter (C-MAML: the fixed rate).
      memory_size: reservoir capacity, in examples (200 in the paper's MNIST runs).
      replay_batch: memories in each meta-batch (10 in the paper's runs).
      lr_eta: ``eta``, the SGD rate of the learning rates (``"lamaml"``, ``"sync"``).
      outer_lr: the fixed weight rate of ``"sync"`` and ``"cmaml"``.
      variant: ``"lamaml"``, ``"sync"`` or ``"cmaml"``.
      inner_steps: slices of the incoming batch, one inner step each; must divide the batch
        size; default one example per step.
      glances: updates per incoming batch (Python int >= 1; 5-10 in the paper's runs).
      first_order: stop gradients through the inner gradients (see step 3).
      multi_step_loss, replay_past_tasks, grad_clip_norm, clip_inner_rates: see above.

    Returns:
      A :class:`ContinualLearner` with :class:`LaMAMLState`; metrics ``"loss"`` (the
      meta-loss of the first glance, before any update), ``"inner_loss"`` (the first inner
      step's loss), ``"alpha_mean"`` and ``"alpha_negative"`` (the fraction of rates below 0),
      the last two after the update.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    check_number("alpha_init", alpha_init)
    check_int("memory_size", memory_size)
    check_int("replay_batch", replay_batch)
    check_int("glances", glances)
    if inner_steps is not None:
        check_int("inner_steps", inner_steps)
    if grad_clip_norm is not None:
        check_number("grad_clip_norm", grad_clip_norm)
    learn_alpha = variant != "cmaml"
    if learn_alpha:
        if lr_eta is None:
            raise ValueError(f"variant={variant!r} learns the learning rates: pass lr_eta")
        check_number("lr_eta", lr_eta)
    elif lr_eta is not None:
        raise ValueError("variant='cmaml' keeps alpha fixed; lr_eta must be None")
    if variant == "lamaml":
        if outer_lr is not None:
            raise ValueError(
                "variant='lamaml' steps the weights with the learned rates max(alpha, 0); "
                "outer_lr must be None (it is for 'sync' and 'cmaml')"
            )
    else:
        if outer_lr is None:
            raise ValueError(
                f"variant={variant!r} steps the weights at a fixed rate: pass outer_lr"
            )
        check_number("outer_lr", outer_lr)

    def init(params, key, example, num_tasks):
        check_int("num_tasks", num_tasks)
        if learn_alpha:
            alpha = jax.tree.map(lambda p: jnp.full(jnp.shape(p), alpha_init, p.dtype), params)
        else:
            alpha = jnp.asarray(alpha_init, jnp.float32)
        memory = reservoir_init(memory_size, *example)
        past = memory if replay_past_tasks else None
        zero = jnp.zeros((), jnp.int32)
        return LaMAMLState(params, alpha, memory, past, zero, key, zero)

    def update(state: LaMAMLState, batch: Batch, task_id):
        b = batch_size_of(batch)
        steps = b if inner_steps is None else inner_steps
        if b % steps:
            raise ValueError(
                f"inner_steps={steps} must divide the incoming batch size {b}; each inner "
                "step takes an equal slice of the batch"
            )
        task_id = jnp.asarray(task_id, jnp.int32)
        incoming_task = task_vector(task_id, b)
        slice_task = task_vector(task_id, b // steps)
        past = (tree_where(task_id != state.task, state.memory, state.past_memory)
                if replay_past_tasks else None)

        def draw_replay(memory, key):
            replay = buffer_sample(memory, key, replay_batch)
            if not replay_past_tasks:
                return replay
            # From the second task on, the copy taken when the task began: the same draw
            # from either buffer, and the rows of the one that applies (a select of a few
            # rows, not of the whole memory).
            old = buffer_sample(past, key, replay_batch)
            return tree_where(task_id > 0, old, replay)

        def meta_objective(params0, alpha, slices, meta_batch, meta_task, meta_weights):
            if learn_alpha:
                rates = jax.tree.map(lambda a: jnp.maximum(a, 0), alpha) if clip_inner_rates \
                    else alpha
                rule = inner.per_parameter(rates)
            else:
                rule = inner.sgd(alpha)

            def meta_loss(params):
                losses = example_losses(loss_fn, params, meta_batch, meta_task)
                return weighted_mean(losses, meta_weights)

            def slice_loss(params, data):
                return jnp.mean(example_losses(loss_fn, params, data, slice_task))

            def inner_step(params, data):
                loss, grads = jax.value_and_grad(slice_loss)(params, data)
                if first_order:
                    grads = jax.lax.stop_gradient(grads)
                params, _ = rule.update(grads, (), params, jnp.zeros((), jnp.int32))
                return params, (loss, meta_loss(params) if multi_step_loss else loss)

            fast, (inner_losses, step_meta) = jax.lax.scan(inner_step, params0, slices)
            meta = jnp.mean(step_meta) if multi_step_loss else meta_loss(fast)
            return meta, inner_losses[0]

        grad_fn = jax.value_and_grad(meta_objective, argnums=(0, 1), has_aux=True)

        key, add_key, *glance_keys = jax.random.split(state.key, glances + 2)

        def glance(carry, inputs):
            params, alpha, memory = carry
            index, key = inputs
            order_key, sample_key = jax.random.split(key)
            order = jax.random.permutation(order_key, b)
            slices = jax.tree.map(
                lambda leaf: leaf[order].reshape(steps, -1, *leaf.shape[1:]), batch
            )
            replay = draw_replay(memory, sample_key)
            meta_batch, meta_task, meta_weights = with_replay(batch, incoming_task, replay)
            (meta, inner_loss), (g_theta, g_alpha) = grad_fn(
                params, alpha, slices, meta_batch, meta_task, meta_weights
            )
            # The first glance offers the batch to the reservoir, after its replay draw:
            # later glances may draw it back, as in the authors' code.
            memory = reservoir_add_batch(memory, add_key, *batch, task_id, after=meta,
                                         offer=index == 0)
            g_theta = _clip(g_theta, grad_clip_norm)
            if variant == "cmaml":
                params = jax.tree.map(lambda p, g: p - outer_lr * g, params, g_theta)
                return (params, alpha, memory), (meta, inner_loss)
            g_alpha = _clip(g_alpha, grad_clip_norm)
            new_alpha = jax.tree.map(lambda a, g: a - lr_eta * g, alpha, g_alpha)
            if variant == "lamaml":
                rates = jax.tree.map(lambda a: jnp.maximum(a, 0), new_alpha)
                params = jax.tree.map(lambda p, g, r: p - r * g, params, g_theta, rates)
            else:
                params = jax.tree.map(lambda p, g: p - outer_lr * g, params, g_theta)
            return (params, new_alpha, memory), (meta, inner_loss)

        indices = jnp.arange(glances, dtype=jnp.int32)
        (params, alpha, memory), (metas, inner_losses) = jax.lax.scan(
            glance, (state.params, state.alpha, state.memory), (indices, jnp.stack(glance_keys))
        )
        leaves = [leaf.astype(jnp.float32) for leaf in jax.tree.leaves(alpha)]
        entries = sum(leaf.size for leaf in leaves)
        metrics = {
            "loss": metas[0],
            "inner_loss": inner_losses[0],
            "alpha_mean": sum(jnp.sum(leaf) for leaf in leaves) / entries,
            "alpha_negative": sum(jnp.sum(leaf < 0) for leaf in leaves) / entries,
        }
        new_state = LaMAMLState(params, alpha, memory, past, task_id, key, state.step + 1)
        return new_state, float_metrics(metrics)

    return ContinualLearner(init, update)
