"""Mixed precision: a model's forward and backward passes in a low-precision dtype while its
parameters, the optimiser state and the losses stay float32.

:func:`in_compute_dtype` wraps an ``apply(params, x)``: the float leaves of ``params`` and
a float ``x`` are cast to ``compute_dtype`` on the way in and the output back to float32 on
the way out. The parameters a learner holds, adapts and differentiates stay float32 (the
casts are differentiable, so gradients arrive in float32), and the normalisation layers of
:mod:`metajax.nn.conv4` compute their statistics in float32 whatever the input dtype. On
accelerators with bfloat16 units (TPU, recent GPUs) this roughly halves activation memory
and raises throughput; on a CPU it is mostly slower (XLA:CPU emulates much of bfloat16).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

COMPUTE_DTYPES: dict[str, Any] = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def cast_floats(tree: Any, dtype: Any) -> Any:
    """The floating-point leaves of ``tree`` cast to ``dtype`` (others unchanged)."""
    def cast(x):
        x = jnp.asarray(x)
        return x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x

    return jax.tree.map(cast, tree)


def in_compute_dtype(apply: Callable[..., Any], compute_dtype: str | Any = "float32"
                     ) -> Callable[..., Any]:
    """``apply(params, x, ...)`` computed in ``compute_dtype`` with a float32 output.

    ``compute_dtype`` is a name of :data:`COMPUTE_DTYPES` or a dtype; for float32 ``apply``
    itself is returned.
    """
    dtype = COMPUTE_DTYPES.get(compute_dtype, compute_dtype) \
        if isinstance(compute_dtype, str) else compute_dtype
    if isinstance(compute_dtype, str) and compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(f"compute_dtype must be one of {tuple(COMPUTE_DTYPES)}, got "
                         f"{compute_dtype!r}")
    if jnp.dtype(dtype) == jnp.float32:
        return apply

    def low_precision(params, x, *args, **kwargs):
        out = apply(cast_floats(params, dtype), cast_floats(x, dtype), *args, **kwargs)
        return cast_floats(out, jnp.float32)

    return low_precision
