"""Averaged Gradient Episodic Memory (A-GEM).

Chaudhry, Ranzato, Rohrbach and Elhoseiny, 2019, "Efficient Lifelong Learning with A-GEM".
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from metajax._checks import check_int
from metajax._tree import vdot
from metajax.continual.learners import (
    ContinualLearner,
    ExampleLossFn,
    batch_size_of,
    check_optimizer,
    example_losses,
    float_metrics,
    task_vector,
    weighted_mean,
)
from metajax.continual.memory import (
    EpisodicMemory,
    episodic_add,
    episodic_init,
    episodic_sample,
)
from metajax.continual.projections import project_agem
from metajax.types import Batch, PyTree

MEMORIES = ("per_class", "per_task")
REF_SAMPLINGS = ("without_replacement", "with_replacement")


class AGEMState(NamedTuple):
    """State of :func:`agem`.

    Attributes:
      params: the model parameters.
      opt_state: the optimiser state.
      memory: the :class:`EpisodicMemory` (per-class or per-task rings).
      key: PRNG key for the reference-batch draws.
      step: ``[]`` int32, updates so far.
    """

    params: PyTree
    opt_state: PyTree
    memory: EpisodicMemory
    key: jax.Array
    step: jax.Array


def agem(
    loss_fn: ExampleLossFn,
    optimizer: optax.GradientTransformation,
    memory_per_task: int,
    ref_batch: int = 256,
    *,
    num_classes: int | None = None,
    memory: str | None = None,
    ref_sampling: str = "without_replacement",
) -> ContinualLearner:
    """A-GEM (Chaudhry et al., 2019): project the step so the memory's average loss does not
    rise to first order.

    Each update, for incoming batch ``(x, y)`` of task ``t``:

    1. ``g``: gradient of the incoming batch's mean loss;
    2. ``g_ref``: gradient of the mean loss on a reference batch from the episodic memory of
       tasks ``0 .. t-1`` (A-GEM's ``M``, which never holds the current task): by default,
       as the authors' ``fc_permute_mnist.py``, ``ref_batch`` distinct stored examples drawn
       uniformly without replacement, or the whole memory of the past tasks while it holds
       at most ``ref_batch`` (:func:`episodic_sample` with ``replace=False``);
    3. ``g~ = project_agem(g, g_ref)``: ``g - (g.g_ref / g_ref.g_ref) g_ref`` when
       ``g.g_ref < 0``, else ``g``;
    4. one optimiser step on ``g~`` (plain SGD in the paper);
    5. the batch is written into task ``t``'s memory.

    On task 0 the memory of past tasks is empty: the reference rows are placeholders of
    weight 0, ``g_ref = 0`` and ``project_agem`` returns ``g`` unchanged (no projection).

    The memory, as the authors' code keeps it: task ``t`` owns ``memory_per_task`` slots,
    every incoming batch of task ``t`` is ring-written into them after the step, and only
    later tasks read them, so what task ``t`` leaves is its last examples (the paper's
    algorithm fills ``M`` with examples of ``D_t`` once task ``t`` is over; the code writes
    as it goes, and since task ``t``'s slots are not read while ``t`` is learned, only which
    examples are kept differs). Two layouts (:class:`EpisodicMemory`):

    * ``memory="per_class"`` (the reference: ``fc_permute_mnist.py`` keeps 25 examples of
      each of the 10 classes per task, a ring per class): the slots are ``num_classes``
      rings of ``memory_per_task // num_classes``, and each example goes to its label's
      ring, so every class keeps its last examples and the memory stays class-balanced.
      Needs ``num_classes`` and integer labels as targets. The reference counts a class's
      slots in the reference batch even when a task had fewer examples of it than slots
      (zero rows); here empty slots are never drawn.
    * ``memory="per_task"``: one ring of ``memory_per_task`` per task, its last examples
      whatever their class (La-MAML's A-GEM baseline, ``model/agem.py``; GEM's memory).
      The streams of :mod:`metajax.data.streams` present each task's rows in random order,
      so the last ones are themselves a uniformly random subset (of the last epoch).

    Args:
      loss_fn: per-example loss ``loss_fn(params, (x, y), task) -> [b]``; reference rows
        carry their own task id (for task-aware masks).
      optimizer: any optax transformation; it receives ``g~``.
      memory_per_task: episodic memory slots per task (Python int >= 1; a multiple of
        ``num_classes`` for the per-class layout: 250 = 25 x 10 in the paper's MNIST runs).
      ref_batch: examples in the reference batch (256 in the paper's MNIST and CIFAR runs).
      num_classes: classes of the labels, for the per-class memory.
      memory: ``"per_class"`` or ``"per_task"``; default ``"per_class"`` when
        ``num_classes`` is given, else ``"per_task"`` (nothing to balance by).
      ref_sampling: ``"without_replacement"`` (the reference code) or
        ``"with_replacement"`` (``ref_batch`` independent uniform draws).

    Returns:
      A :class:`ContinualLearner` with :class:`AGEMState`; metrics ``"loss"`` (incoming batch,
      before the step), ``"ref_loss"`` (0 on task 0) and ``"projected"`` (1.0 when
      ``g.g_ref < 0``).
    """
    check_optimizer(optimizer)
    check_int("memory_per_task", memory_per_task)
    check_int("ref_batch", ref_batch)
    if memory is None:
        memory = "per_task" if num_classes is None else "per_class"
    if memory not in MEMORIES:
        raise ValueError(f"memory must be one of {MEMORIES}, got {memory!r}")
    if ref_sampling not in REF_SAMPLINGS:
        raise ValueError(f"ref_sampling must be one of {REF_SAMPLINGS}, got {ref_sampling!r}")
    if memory == "per_class":
        if num_classes is None:
            raise ValueError("memory='per_class' keeps a ring per class: pass num_classes")
        check_int("num_classes", num_classes)
        if memory_per_task % num_classes:
            raise ValueError(
                f"memory='per_class' splits memory_per_task={memory_per_task} into "
                f"num_classes={num_classes} equal rings: pass a multiple of {num_classes} "
                "(or memory='per_task')"
            )
    classes = num_classes if memory == "per_class" else None
    replace = ref_sampling == "with_replacement"

    def init(params, key, example, num_tasks):
        check_int("num_tasks", num_tasks)
        episodic = episodic_init(num_tasks, memory_per_task, *example, num_classes=classes)
        return AGEMState(params, optimizer.init(params), episodic, key, jnp.zeros((), jnp.int32))

    def update(state: AGEMState, batch: Batch, task_id):
        task = task_vector(task_id, batch_size_of(batch))
        key, sample_key = jax.random.split(state.key)
        ref = episodic_sample(state.memory, sample_key, ref_batch, up_to_task=task_id,
                              replace=replace)

        def incoming(params):
            return jnp.mean(example_losses(loss_fn, params, batch, task))

        def reference(params):
            losses = example_losses(loss_fn, params, (ref.x, ref.y), ref.task)
            return weighted_mean(losses, ref.valid)

        loss, g = jax.value_and_grad(incoming)(state.params)
        ref_loss, g_ref = jax.value_and_grad(reference)(state.params)
        projected = project_agem(g, g_ref)
        updates, opt_state = optimizer.update(projected, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        episodic = episodic_add(state.memory, *batch, task_id, after=g_ref)
        metrics = {"loss": loss, "ref_loss": ref_loss, "projected": vdot(g, g_ref) < 0}
        return AGEMState(params, opt_state, episodic, key, state.step + 1), float_metrics(metrics)

    return ContinualLearner(init, update)
