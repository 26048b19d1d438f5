"""Gradient projections that keep the loss on past tasks from rising: A-GEM and GEM.

Gradients are any pytree (a flat ``[p]`` vector is the one-leaf case); inner products run
over all leaves at ``Precision.HIGHEST`` (no TF32 on GPUs: the constraints are sign tests).
"""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp

from metajax._tree import upcast, vdot
from metajax.types import PyTree

_HIGHEST = jax.lax.Precision.HIGHEST


def _flatten(leaves: list, rows: int | None = None) -> jax.Array:
    """The leaves raveled one after the other, in at least float32: ``[p]``, or ``[rows, p]``
    for leaves with a leading ``rows`` axis. Written slice by slice into one buffer, because
    ``jnp.concatenate`` of many leaves is several times slower on XLA:CPU."""
    lead = () if rows is None else (rows,)
    flat = [upcast(leaf).reshape(*lead, -1) for leaf in leaves]
    dtype = jnp.result_type(*flat)
    out = jnp.zeros((*lead, sum(f.shape[-1] for f in flat)), dtype)
    offset = 0
    for f in flat:
        out = jax.lax.dynamic_update_slice(out, f.astype(dtype), (0,) * len(lead) + (offset,))
        offset += f.shape[-1]
    return out


def project_agem(g: PyTree, g_ref: PyTree) -> PyTree:
    """A-GEM's projection of the current gradient against a reference gradient.

    Chaudhry et al., 2019, "Efficient Lifelong Learning with A-GEM"::

        g~ = g - (g . g_ref / g_ref . g_ref) g_ref   if g . g_ref < 0
        g~ = g                                        otherwise

    ``g_ref`` is the gradient of the loss on a batch drawn from the episodic memory of all
    past tasks. After the projection ``g~ . g_ref >= 0``: to first order, the step does not
    raise the average loss on the memory. A zero ``g_ref`` (an empty memory) leaves ``g``
    unchanged, and its derivative stays finite.

    Args:
      g: the gradient on the current batch, any pytree.
      g_ref: the reference gradient, same structure and shapes as ``g``.

    Returns:
      ``g~``, same structure, shapes and dtypes as ``g``.
    """
    if jax.tree.structure(g) != jax.tree.structure(g_ref):
        raise ValueError(
            f"g and g_ref must have the same structure, got {jax.tree.structure(g)} and "
            f"{jax.tree.structure(g_ref)}"
        )
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref), strict=True):
        if jnp.shape(a) != jnp.shape(b):
            raise ValueError(f"g and g_ref leaves differ in shape: {a.shape} vs {b.shape}")
    dot = vdot(g, g_ref)
    ref_sq = vdot(g_ref, g_ref)
    # The guarded denominator keeps the unused branch finite, so gradients through it are too.
    coef = jnp.where(dot < 0, dot / jnp.where(ref_sq > 0, ref_sq, 1.0), 0.0)
    return jax.tree.map(lambda a, b: (a - coef * b).astype(a.dtype), g, g_ref)


def _matvec(M: jax.Array, v: jax.Array) -> jax.Array:
    return jnp.matmul(M, v, precision=_HIGHEST)


def past_task_dots(g: PyTree, G: PyTree) -> jax.Array:
    """``G g``: the inner product of the current gradient with each past-task gradient, ``[t]``.

    ``G`` has the structure of ``g`` with a leading ``[t]`` axis on every leaf; a negative
    entry is a GEM constraint the raw step would violate. Computed over all leaves in at
    least float32 at the highest precision, exactly as :func:`project_gem` tests it.
    """
    G_leaves = jax.tree.leaves(G)
    t = G_leaves[0].shape[0]
    # Leaf by leaf, summed: raveling G into one [t, p] buffer first would copy all of it.
    dots = [_matvec(upcast(b).reshape(t, -1), upcast(a).reshape(-1))
            for a, b in zip(jax.tree.leaves(g), G_leaves, strict=True)]
    return sum(dots[1:], dots[0])


def nnls(A: jax.Array, b: jax.Array, max_steps: int | None = None) -> jax.Array:
    """Non-negative least squares ``min_v 1/2 |A v - b|^2  subject to  v >= 0``, under jit.

    The active-set method of Lawson and Hanson (1974, "Solving Least Squares Problems",
    Ch. 23, algorithm NNLS). A free set ``F`` starts empty; each step takes ``s``, the least
    squares solution using only the columns in ``F`` (``s_i = 0`` elsewhere):

    - if ``s_F > 0``, ``s`` becomes ``v``; then the column with the largest negative gradient
      ``w_j = A_j^T (b - A v)`` joins ``F``, or, when no ``w_j`` is positive beyond rounding,
      ``v`` is optimal and the remaining steps change nothing;
    - otherwise ``v`` moves towards ``s`` until a free coordinate reaches 0; it leaves ``F``.

    Every iterate is feasible and the objective never rises. The method ends after finitely
    many steps, in practice about as many as there are positive entries in the solution
    plus a few removals; the loop (a ``lax.while_loop``) stops there, or after ``max_steps``
    steps at most. Under ``vmap`` it runs until every problem of the batch is done. It is
    not reverse-differentiable (nothing in GEM differentiates through it). Working on
    ``A`` itself rather than on ``A^T A`` keeps the conditioning of ``A``, not its square,
    which matters in float32 when columns are similar (similar past-task gradients).
    Linearly dependent columns are fine: the face problems are solved by least squares.

    Args:
      A: ``[m, t]`` matrix, ``t`` small (tens).
      b: ``[m]`` target.
      max_steps: loop length (Python int >= 1); default ``3 * t + 3``.

    Returns:
      ``v [t]``, ``v >= 0``.
    """
    if A.ndim != 2 or b.shape != A.shape[:1]:
        raise ValueError(f"need A [m, t] and b [m], got A {A.shape} and b {b.shape}")
    m, t = A.shape
    if max_steps is None:
        max_steps = 3 * t + 3
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
        raise ValueError(f"max_steps must be a Python int >= 1, got {max_steps!r}")
    if t == 0:
        return jnp.zeros((0,), b.dtype)
    index = jnp.arange(t)
    # A gradient entry w_j = A_j^T r below this is rounding noise (the bound of Lawson-Hanson
    # implementations: a multiple of machine epsilon, the size of A and of the residual).
    noise = 10 * max(m, t) * jnp.finfo(b.dtype).eps * jnp.max(jnp.sum(jnp.abs(A), axis=0))

    def step(_, state):
        v, free, done = state
        s = jnp.linalg.lstsq(jnp.where(free[None, :], A, 0.0), b)[0]
        s = jnp.where(free, s, 0.0)
        interior = jnp.all(jnp.where(free, s > 0, True))
        residual = b - _matvec(A, s)
        w = _matvec(A.T, residual)
        joinable = ~free & (w > noise * jnp.max(jnp.abs(residual)))
        joins = joinable & (index == jnp.argmax(jnp.where(joinable, w, -jnp.inf)))
        optimal = interior & ~jnp.any(joinable)
        # Not interior: step from v towards s, stopping where the first free coordinate hits 0.
        blocking = free & (s <= 0)
        gap = v - s
        ratio = jnp.where(blocking, v / jnp.where(gap > 0, gap, 1.0), jnp.inf)
        moved = v + jnp.clip(jnp.min(ratio), 0.0, 1.0) * (s - v)
        still_free = free & (moved > 0) & (index != jnp.argmin(ratio))
        new_v = jnp.where(interior, s, jnp.where(still_free, moved, 0.0))
        new_free = jnp.where(interior, free | joins, still_free)
        return jnp.where(done, v, new_v), jnp.where(done, free, new_free), done | optimal

    def more(state):
        i, (_, _, done) = state
        return (i < max_steps) & ~done

    state = (jnp.zeros((t,), b.dtype), jnp.zeros((t,), bool), jnp.zeros((), bool))
    _, (v, _, _) = jax.lax.while_loop(more, lambda s: (s[0] + 1, step(s[0], s[1])), (0, state))
    return jnp.maximum(v, 0.0)


def project_gem(
    g: PyTree,
    G: PyTree,
    margin: float | jax.Array = 0.0,
    *,
    ridge: float | jax.Array = 0.0,
    max_steps: int | None = None,
    used_rows: int | jax.Array | None = None,
) -> PyTree:
    """GEM's projection of the current gradient onto the cone of past-task gradients.

    Lopez-Paz and Ranzato, 2017, "Gradient Episodic Memory for Continual Learning".
    The primal problem keeps the update close to ``g`` without raising any past loss::

        min_z 1/2 |g - z|^2   s.t.   G z >= 0        (one row of G per past task)

    and is solved through its dual, a ``t``-dimensional QP::

        min_v 1/2 v^T (G G^T) v + (G g)^T v   s.t.   v >= margin,     g~ = G^T v + g

    ``margin`` is GEM's ``memory_strength``. It enters exactly as in the authors' reference
    code (``project2cone2``: ``quadprog.solve_qp`` with the bound ``v >= margin``), not as a
    margin ``G z >= margin`` on the primal constraint. Substituting ``v = margin + u`` shows
    what it does: ``g~`` is the ``margin = 0`` projection of ``g + margin * sum_k G_k``, i.e.
    the update is first pushed towards every past-task gradient and then projected, so
    ``G g~ >= 0`` holds whatever the margin (``G g~ + ridge * v >= 0`` with a ridge).

    As in the reference code the projection happens only when a constraint is violated
    (``(G g)_k < 0`` for some ``k``); otherwise ``g`` is returned unchanged, margin or not.

    The dual objective is ``1/2 |G^T v + g|^2`` up to a constant, so it is solved as
    non-negative least squares (:func:`nnls`) on the small factor ``R [min(p, t), t]`` of a
    QR decomposition ``G^T = Q R``: ``|G^T v + g|^2 = |R v + Q^T g|^2 + const``. This never
    forms ``G G^T``, whose condition number is the square of that of ``G``; the QR costs
    ``O(p t^2)`` like ``G G^T`` would. ``Q`` itself is not formed either: the triangular
    factor of ``[G^T | g]`` holds ``R`` and ``Q^T g`` (the classic least-squares device), and
    nothing is solved unless a constraint is violated. In float32 the result agrees with a
    float64 NNLS solve to about 1e-6 relative on random problems, including strongly
    correlated past gradients.

    Rows of ``G`` that are all zero constrain nothing, so a fixed-shape ``G [num_tasks, ...]``
    with zeros for tasks not yet seen (and for the current one) works under ``jit``.

    Args:
      g: the gradient on the current batch: a flat ``[p]`` vector or any pytree.
      G: the past-task gradients, ``[t, p]`` for a flat ``g`` or the structure of ``g`` with
        a leading ``[t]`` axis on every leaf (e.g. from ``jax.vmap`` of ``jax.grad``).
      margin: GEM's ``memory_strength`` (>= 0), the lower bound on the dual variables.
      ridge: added to the diagonal of ``G G^T``. The reference code adds ``1e-3`` because
        ``quadprog`` needs a positive definite matrix; :func:`nnls` does not, so the default
        is ``0`` (the exact projection); pass ``1e-3`` to match the reference.
      max_steps: steps of the active-set solver :func:`nnls` (default ``3 * t + 3``, ``t``
        the rows solved on).
      used_rows: optional int (may be traced): only the first ``used_rows`` rows of ``G`` may
        be nonzero, as in GEM's fixed-shape ``G`` whose rows are the tasks seen so far. The
        solve then runs on the first ``r`` rows only, ``r`` the smallest of a few fixed sizes
        (1-4, then about 1.5 times the last: 6, 8, 12, 16, ...; ``t`` at most) that covers
        ``used_rows``, chosen at run time by ``lax.switch``; each size compiles once. The
        result is the same as without it (rows of zeros constrain nothing) but the QR and the
        dual are solved on ``r`` rows instead of ``t`` (for a 5-task stream after its second
        task: 2 rows instead of 5, several times faster). Nonzero rows from ``used_rows`` on
        would be ignored.

    Returns:
      ``g~``, same structure, shapes and dtypes as ``g``.
    """
    if isinstance(margin, numbers.Real) and not margin >= 0:
        raise ValueError(f"margin (GEM's memory_strength) must be >= 0, got {margin!r}")
    if isinstance(ridge, numbers.Real) and not ridge >= 0:
        raise ValueError(f"ridge must be >= 0, got {ridge!r}")
    if jax.tree.structure(g) != jax.tree.structure(G):
        raise ValueError(
            f"G must have the structure of g with a leading task axis on each leaf; got "
            f"{jax.tree.structure(G)} for g {jax.tree.structure(g)}"
        )
    g_leaves, G_leaves = jax.tree.leaves(g), jax.tree.leaves(G)
    t = G_leaves[0].shape[0] if G_leaves and jnp.ndim(G_leaves[0]) else 0
    for a, b in zip(g_leaves, G_leaves, strict=True):
        if jnp.shape(b) != (t, *jnp.shape(a)):
            raise ValueError(
                f"G leaf has shape {jnp.shape(b)}, expected [t={t}, *{list(jnp.shape(a))}] "
                "(one stacked past-task gradient per row)"
            )
    if isinstance(used_rows, numbers.Integral) and not isinstance(used_rows, bool):
        if not 0 <= used_rows <= t:
            raise ValueError(f"used_rows must be in [0, t={t}], got {used_rows}")
    if t == 0:
        return g
    if used_rows is None:
        return _project_gem(g, g_leaves, G_leaves, t, margin, ridge, max_steps)
    sizes = row_buckets(t)

    def on_rows(r):
        if r == 0:
            return lambda: g
        return lambda: _project_gem(g, g_leaves, [b[:r] for b in G_leaves], r, margin, ridge,
                                    max_steps)

    used = jnp.clip(jnp.asarray(used_rows, jnp.int32), 0, t)
    index = jnp.searchsorted(jnp.asarray(sizes, jnp.int32), used, side="left")
    return jax.lax.switch(index, [on_rows(r) for r in sizes])


def row_buckets(t: int) -> list[int]:
    """The row counts :func:`project_gem` may solve on for ``used_rows`` in ``[0, t]``: 0-4,
    then each about 1.5 times the last (6, 8, 12, 16, 24, 32, ...), and ``t``."""
    sizes = [0, 1, 2, 3, 4]
    while sizes[-1] < t:  # powers of two and 1.5 times powers of two
        last = sizes[-1]
        sizes.append(last * 3 // 2 if last & (last - 1) == 0 else last * 4 // 3)
    return sorted({min(r, t) for r in sizes})


def _project_gem(g, g_leaves, G_leaves, t, margin, ridge, max_steps):
    """:func:`project_gem` on checked arguments, ``t >= 1`` rows."""
    G = jax.tree.unflatten(jax.tree.structure(g), G_leaves)
    G_flat = _flatten(G_leaves, t)
    g_flat = _flatten(g_leaves)
    dtype = g_flat.dtype
    violated = jnp.any(past_task_dots(g, G) < 0)
    lower = jnp.broadcast_to(jnp.asarray(margin, dtype), (t,))

    def dual(_):
        # v = lower + u with u >= 0: |G^T v + g|^2 + ridge |v|^2 in terms of u, by QR of G^T.
        shifted = g_flat + _matvec(G_flat.T, lower)
        # The triangular factor of [G^T | shifted] holds R (of G^T alone: Householder works
        # column by column) and, in its last column, Q^T shifted, so Q is never formed.
        p = G_flat.shape[1]
        k = min(t, p)
        stacked = jnp.zeros((t + 1, p), dtype).at[:t].set(G_flat).at[t].set(shifted)
        R_aug = jnp.linalg.qr(stacked.T, mode="r")
        R, q_shifted = R_aug[:k, :t], R_aug[:k, t]
        root = jnp.sqrt(jnp.asarray(ridge, dtype))
        A = jnp.concatenate([R, root * jnp.eye(t, dtype=dtype)])
        target = jnp.concatenate([-q_shifted, -root * lower])
        return lower + nnls(A, target, max_steps=max_steps)

    # Nothing to solve unless a constraint is violated (under vmap both branches run).
    v = jax.lax.cond(violated, dual, lambda _: jnp.zeros((t,), dtype), None)
    return jax.tree.map(
        lambda a, b: (a + jnp.tensordot(v, upcast(b), axes=1, precision=_HIGHEST)).astype(a.dtype),
        g,
        G,
    )
