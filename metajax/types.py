"""The data types every part of metajax speaks: tasks, batches, learners, streams."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np

PyTree = Any
Array = jax.Array
Batch = tuple[Any, Any]
"""An ``(inputs, targets)`` pair; leading axis is the example axis."""

LossFn = Callable[[PyTree, Batch], Any]
"""``loss_fn(params, batch) -> loss`` or ``-> (loss, aux)`` when a learner has ``has_aux=True``."""


class Task(NamedTuple):
    """One few-shot task, or a batch of them with a leading task axis ``T``.

    Attributes:
      support: ``(x, y)`` the inner loop adapts on, e.g. ``x [T, K, 1]`` for K-shot sinusoid.
      query: ``(x, y)`` the adapted parameters are judged on (the meta-objective).
    """

    support: Batch
    query: Batch


class Learner(NamedTuple):
    """A meta-learner: a NamedTuple of pure functions, in the shape of an optax transformation.

    Attributes:
      init: ``init(params) -> meta_params``: the model parameters plus any learnable inner
        state (learning rates for Meta-SGD).
      adapt: ``adapt(meta_params, support, inner_steps=None) -> fast_params``: one task's
        inner loop; ``inner_steps`` overrides the configured number (a Python int).
      meta_grad: ``meta_grad(meta_params, tasks, *, step=None) -> (grads, metrics)``: the
        meta-gradient averaged over the leading task axis of ``tasks``; ``grads`` has the
        structure of ``meta_params``; ``metrics`` is a dict of scalars (``meta_loss``, ...).
        ``step`` is the (possibly traced) meta-step, at which a learner evaluates the
        schedules it was built with (MAML++'s multi-step-loss weights and derivative-order
        switch); learners without schedules ignore it.
      fast_params_of: ``fast_params_of(meta_params) -> params``: the model parameters inside
        ``meta_params`` (the initialisation the inner loop starts from).
    """

    init: Callable[..., PyTree]
    adapt: Callable[..., PyTree]
    meta_grad: Callable[..., tuple[PyTree, dict]]
    fast_params_of: Callable[[PyTree], PyTree]


class Problem(NamedTuple):
    """A dataset with its model and measures.

    Attributes:
      init_params: ``init_params(key) -> params`` of the model.
      loss_fn: ``loss_fn(params, batch) -> loss``.
      sample_tasks: ``sample_tasks(key, num_tasks, shots, queries, split) -> Task`` (jit-able;
        ``split`` is ``"train"``, ``"val"`` or ``"test"``).
      metric_name: what :attr:`metric_fn` measures, e.g. ``"mse"``.
      metric_fn: ``metric_fn(params, batch) -> scalar`` reported at evaluation.
      has_validation: whether ``"val"`` is a held-out split (used to pick the best checkpoint).
      has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
      default_eval_steps: inner-step counts ``metajax evaluate`` reports by default.
    """

    init_params: Callable[[jax.Array], PyTree]
    loss_fn: LossFn
    sample_tasks: Callable[..., Task]
    metric_name: str
    metric_fn: Callable[[PyTree, Batch], jax.Array]
    has_validation: bool
    has_aux: bool = False
    default_eval_steps: tuple[int, ...] = (1, 5, 10)


class Stream(NamedTuple):
    """A sequence of tasks, every array with a leading task axis.

    Attributes:
      train_x: ``[tasks, n_train, *features]`` float32 (``features``: ``784`` for MNIST,
        ``32, 32, 3`` for CIFAR-100, ``size, size, 1`` for Omniglot).
      train_y: ``[tasks, n_train]`` int32 class labels in ``[0, num_classes)``.
      test_x: ``[tasks, n_test, *features]`` float32.
      test_y: ``[tasks, n_test]`` int32.
      num_classes: the size of the output layer.
      class_mask: ``[tasks, num_classes]`` bool, the classes each task may predict
        (task-aware evaluation: logits outside the mask are set to ``-inf``), or ``None``
        when every task shares all outputs (task-agnostic, single head).
    """

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    num_classes: int
    class_mask: np.ndarray | None = None

    @property
    def num_tasks(self) -> int:
        """The number of tasks (the leading axis)."""
        return self.train_x.shape[0]
