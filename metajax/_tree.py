"""Small pytree arithmetic shared across the package."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from metajax.types import PyTree


def upcast(leaf: jax.Array) -> jax.Array:
    """The leaf in at least float32, the precision inner products accumulate in."""
    return leaf.astype(jnp.promote_types(leaf.dtype, jnp.float32))


def vdot(a: PyTree, b: PyTree) -> jax.Array:
    """``sum over leaves of <a_leaf, b_leaf>``, accumulated in at least float32 at the highest
    matmul precision (no TF32 on GPUs: callers test signs of these products)."""
    dots = [
        jnp.vdot(upcast(x), upcast(y), precision=jax.lax.Precision.HIGHEST)
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    ]
    return sum(dots[1:], dots[0])


def norm(tree: PyTree) -> jax.Array:
    """The Euclidean norm of all leaves together."""
    return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))


def where(condition, a: PyTree, b: PyTree) -> PyTree:
    """``jnp.where(condition, a_leaf, b_leaf)`` leaf by leaf."""
    return jax.tree.map(lambda u, v: jnp.where(condition, u, v), a, b)


def dtype_of(x) -> np.dtype:
    """``x``'s dtype without reading its values (an array may span other processes)."""
    return np.dtype(x.dtype) if hasattr(x, "dtype") else np.asarray(x).dtype
