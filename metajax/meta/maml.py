"""MAML, first-order MAML and ANIL.

Finn, Abbeel and Levine, 2017, "Model-Agnostic Meta-Learning for Fast Adaptation of Deep
Networks" (MAML, and its first-order approximation FOMAML); Raghu et al., 2020, "Rapid
Learning or Feature Reuse? Towards Understanding the Effectiveness of MAML" (ANIL).
"""

from __future__ import annotations

from collections.abc import Callable

import jax

from metajax import inner
from metajax._checks import check_int, check_number
from metajax.meta._common import inner_loop_learner
from metajax.task_map import TaskMap
from metajax.types import Learner, LossFn, PyTree


def maml(
    loss_fn: LossFn,
    inner_lr: float,
    inner_steps: int = 1,
    *,
    first_order: bool = False,
    has_aux: bool = False,
    mask: PyTree | Callable[[PyTree], PyTree] | None = None,
    remat: bool = False,
    task_map: TaskMap = "auto",
) -> Learner:
    """Model-Agnostic Meta-Learning (Finn et al., 2017).

    The inner loop takes ``inner_steps`` gradient steps of size ``inner_lr`` on the support
    loss; the meta-objective is the query loss at the adapted parameters, averaged over tasks.
    ``meta_grad`` differentiates through the whole inner ``lax.scan``, which gives the exact
    second-order meta-gradient. With ``first_order=True`` the inner gradients are treated as
    constants (FOMAML): the meta-gradient is the query gradient at the adapted parameters.

    Args:
      loss_fn: ``loss_fn(params, (x, y)) -> loss`` or ``(loss, aux)`` with ``has_aux``.
      inner_lr: the inner step size alpha (> 0).
      inner_steps: number of inner steps (Python int >= 1).
      first_order: FOMAML instead of second-order MAML.
      has_aux: ``loss_fn`` returns ``(loss, aux)``; the task-mean of the query ``aux`` is
        reported under ``metrics["aux"]``.
      mask: boolean pytree like the params, or a function ``params -> mask``; only ``True``
        leaves adapt in the inner loop (how :func:`anil` is built). ``None`` adapts all.
      remat: rematerialise each inner step in the backward pass (``jax.checkpoint``): memory
        for activations no longer grows with ``inner_steps``, at the cost of recomputation.
      task_map: how ``meta_grad`` executes the task axis: ``"auto"`` (the backend's measured
        default), ``"vmap"``, ``"scan"`` or a chunk size; see :mod:`metajax.task_map`. The
        meta-gradient is the same whatever the choice (up to float rounding).

    Returns:
      A :class:`~metajax.types.Learner`; its meta-parameters are the model parameters.
    """
    check_number("inner_lr", inner_lr)
    check_int("inner_steps", inner_steps)
    rule = inner.sgd(inner_lr)

    def run_inner(params, support, steps):
        return inner.adapt(
            loss_fn,
            params,
            support,
            steps,
            rule,
            has_aux=has_aux,
            mask=mask(params) if callable(mask) else mask,
            first_order=first_order,
            remat=remat,
        )

    def identity(params: PyTree) -> PyTree:
        return params

    return inner_loop_learner(identity, run_inner, loss_fn, inner_steps, has_aux, identity,
                              task_map)


def head_mask(params: PyTree, head: str | Callable[[str], bool]) -> PyTree:
    """Boolean pytree marking the leaves of ``params`` whose key path matches ``head``.

    ``head`` is a substring of the key path (``jax.tree_util.keystr``, e.g.
    ``"['params']['head']['kernel']"``) or a predicate on that string.
    """
    match = head if callable(head) else (lambda path: head in path)
    mask = jax.tree_util.tree_map_with_path(
        lambda path, _: bool(match(jax.tree_util.keystr(path))), params
    )
    if not any(jax.tree.leaves(mask)):
        paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
        raise ValueError(f"head={head!r} matches no parameter; the parameter paths are {paths}")
    return mask


def anil(
    loss_fn: LossFn,
    inner_lr: float,
    inner_steps: int = 1,
    *,
    head: str | Callable[[str], bool] = "head",
    first_order: bool = False,
    has_aux: bool = False,
    task_map: TaskMap = "auto",
) -> Learner:
    """Almost No Inner Loop (Raghu et al., 2020): only the head adapts in the inner loop.

    The body is meta-learned through the query loss (its gradient flows through the head's
    adaptation) but is never changed by the inner loop, which also makes the inner loop cheap:
    only head gradients are taken there.

    Args:
      head: which parameters form the head, as a key-path substring (default ``"head"``,
        the name of the final layer of metajax's models) or a predicate on the key path.
      Others as :func:`maml`.
    """
    return maml(
        loss_fn,
        inner_lr,
        inner_steps,
        first_order=first_order,
        has_aux=has_aux,
        mask=lambda params: head_mask(params, head),
        task_map=task_map,
    )
