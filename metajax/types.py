"""The data types every part of metajax speaks: tasks, batches, learners."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax

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
      meta_grad: ``meta_grad(meta_params, tasks) -> (grads, metrics)``: the meta-gradient
        averaged over the leading task axis of ``tasks``; ``grads`` has the structure of
        ``meta_params``; ``metrics`` is a dict of scalars (``meta_loss``, ...).
      fast_params_of: ``fast_params_of(meta_params) -> params``: the model parameters inside
        ``meta_params`` (the initialisation the inner loop starts from).
    """

    init: Callable[..., PyTree]
    adapt: Callable[..., PyTree]
    meta_grad: Callable[..., tuple[PyTree, dict]]
    fast_params_of: Callable[[PyTree], PyTree]
