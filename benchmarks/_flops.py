"""Matmul FLOPs of a jitted function, counted on its jaxpr with loop trip counts.

XLA's cost analysis (``compiled.cost_analysis()["flops"]``) counts the body of a while loop
once, whatever its trip count, so a meta-step whose task axis is a ``lax.scan`` over 32 tasks
reports a 32nd of its work. This counter walks the jaxpr instead: ``dot_general`` and
``conv_general_dilated`` count ``2 * multiply-adds``, a ``scan`` body counts ``length``
times, a ``cond`` its most expensive branch, and every other primitive carrying a sub-jaxpr
(``pjit``, ``custom_vjp``, ``remat``, ...) its body once. A ``while_loop`` (trip count
unknown) counts its body once, as XLA does. Elementwise work is not counted: the figure is the
matmul work that ``fraction_of_peak`` compares with the matmul peak.
"""

from __future__ import annotations

import math

import jax
from jax.extend import core as jex_core


def _sub_jaxprs(value):
    if isinstance(value, jex_core.ClosedJaxpr):
        yield value.jaxpr
    elif isinstance(value, jex_core.Jaxpr):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _sub_jaxprs(item)


def _eqn_flops(eqn) -> float:
    name = eqn.primitive.name
    if name == "dot_general":
        (lhs_contract, _), _ = eqn.params["dimension_numbers"]
        lhs = eqn.invars[0].aval.shape
        out = eqn.outvars[0].aval.shape
        return 2.0 * math.prod(out) * math.prod(lhs[d] for d in lhs_contract)
    if name == "conv_general_dilated":
        rhs = eqn.invars[1].aval.shape
        out = eqn.outvars[0].aval.shape
        dn = eqn.params["dimension_numbers"]
        out_features = rhs[dn.rhs_spec[0]]
        per_output = math.prod(rhs) // out_features  # kh * kw * in_channels / groups
        return 2.0 * math.prod(out) * per_output
    if name == "scan":
        return eqn.params["length"] * jaxpr_flops(eqn.params["jaxpr"].jaxpr)
    if name == "cond":
        return max(jaxpr_flops(b.jaxpr) for b in eqn.params["branches"])
    return sum(jaxpr_flops(sub) for value in eqn.params.values() for sub in _sub_jaxprs(value))


def jaxpr_flops(jaxpr) -> float:
    """Matmul FLOPs of one evaluation of ``jaxpr`` (a ``Jaxpr``)."""
    return sum(_eqn_flops(eqn) for eqn in jaxpr.eqns)


def matmul_flops(fn, *args) -> float:
    """Matmul FLOPs of ``fn(*args)``, loops counted with their trip counts."""
    return jaxpr_flops(jax.make_jaxpr(fn)(*args).jaxpr)


def xla_flops(compiled) -> float | None:
    """XLA's own FLOP count of a compiled function (loop bodies counted once), if reported."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else {}
    if not analysis or "flops" not in analysis:
        return None
    return float(analysis["flops"])
