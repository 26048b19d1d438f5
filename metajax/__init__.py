"""metajax: gradient-based meta-learning in JAX, as pure functions.

Public API, flat::

    import metajax as mj
    learner = mj.maml(loss_fn, inner_lr=0.01, inner_steps=1)
    grads, metrics = learner.meta_grad(meta_params, mj.Task(support, query))
"""

from metajax import continual, data, inner, task_map
from metajax.meta import (
    MAMLPlusPlusParams,
    MetaSGDParams,
    anil,
    backtracking_descent,
    conjugate_gradient,
    gmres_solver,
    head_mask,
    imaml,
    implicit_gradient_report,
    implicit_proximal_solver,
    maml,
    mamlpp,
    metasgd,
    msl_weights,
    norm_mask,
    reptile,
)
from metajax.types import Batch, Learner, LossFn, Problem, PyTree, Stream, Task

__version__ = "0.1.0"

__all__ = [
    "MAMLPlusPlusParams",
    "mamlpp",
    "msl_weights",
    "norm_mask",
    "Batch",
    "Learner",
    "LossFn",
    "MetaSGDParams",
    "Problem",
    "PyTree",
    "Stream",
    "Task",
    "anil",
    "backtracking_descent",
    "conjugate_gradient",
    "gmres_solver",
    "continual",
    "data",
    "head_mask",
    "imaml",
    "implicit_gradient_report",
    "implicit_proximal_solver",
    "inner",
    "maml",
    "metasgd",
    "reptile",
    "task_map",
]
