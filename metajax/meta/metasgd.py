"""Meta-SGD: the initialisation and a learning rate per parameter, meta-learned together.

Li, Zhou, Chen and Li, 2017, "Meta-SGD: Learning to Learn Quickly for Few-Shot Learning".
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from metajax import inner
from metajax._checks import check_int, check_number
from metajax.meta._common import inner_loop_learner
from metajax.task_map import TaskMap
from metajax.types import Learner, LossFn, PyTree


class MetaSGDParams(NamedTuple):
    """Meta-parameters of Meta-SGD.

    Attributes:
      params: the initialisation of the model parameters.
      inner_lrs: one learning rate per parameter entry, same structure and shapes as ``params``.
    """

    params: PyTree
    inner_lrs: PyTree


def metasgd(
    loss_fn: LossFn,
    inner_lr: float,
    inner_steps: int = 1,
    *,
    first_order: bool = False,
    has_aux: bool = False,
    task_map: TaskMap = "auto",
) -> Learner:
    """Meta-SGD (Li et al., 2017): ``fast = params - inner_lrs * grad``, ``inner_lrs`` learned.

    ``init(params)`` sets every learning rate to ``inner_lr`` (the paper draws them from
    U[0.005, 0.1]; pass your own ``MetaSGDParams`` to start elsewhere). The meta-gradient
    reaches both the initialisation and the learning rates; learning rates may turn negative,
    as in the paper (a learned direction as well as a size).

    Args (``task_map`` included) as :func:`metajax.maml`; ``first_order`` stops the gradient
    through the inner gradients (the learning rates still receive ``-grad * dL_query/dfast``).
    """
    check_number("inner_lr", inner_lr)
    check_int("inner_steps", inner_steps)

    def run_inner(meta_params: MetaSGDParams, support, steps):
        return inner.adapt(
            loss_fn,
            meta_params.params,
            support,
            steps,
            inner.per_parameter(meta_params.inner_lrs),
            has_aux=has_aux,
            first_order=first_order,
        )

    def init(params: PyTree) -> MetaSGDParams:
        lrs = jax.tree.map(lambda p: jnp.full(jnp.shape(p), inner_lr, jnp.result_type(p)), params)
        return MetaSGDParams(params, lrs)

    return inner_loop_learner(
        init, run_inner, loss_fn, inner_steps, has_aux, lambda meta_params: meta_params.params,
        task_map,
    )
