"""Meta-learners: NamedTuples of pure functions ``init``, ``adapt``, ``meta_grad``."""

from metajax.meta.imaml import (
    backtracking_descent,
    conjugate_gradient,
    gmres_solver,
    imaml,
    implicit_gradient_report,
    implicit_proximal_solver,
)
from metajax.meta.maml import anil, head_mask, maml
from metajax.meta.mamlpp import MAMLPlusPlusParams, mamlpp, msl_weights, norm_mask
from metajax.meta.metasgd import MetaSGDParams, metasgd
from metajax.meta.reptile import reptile

__all__ = [
    "MAMLPlusPlusParams",
    "mamlpp",
    "msl_weights",
    "norm_mask",
    "MetaSGDParams",
    "anil",
    "backtracking_descent",
    "conjugate_gradient",
    "gmres_solver",
    "head_mask",
    "imaml",
    "implicit_gradient_report",
    "implicit_proximal_solver",
    "maml",
    "metasgd",
    "reptile",
]
