"""Implicit MAML: meta-gradients of a proximal inner problem by implicit differentiation.

Rajeswaran, Finn, Kakade and Levine, 2019, "Meta-Learning with Implicit Gradients".
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from metajax import inner as inner_module
from metajax._checks import check_int, check_number
from metajax._tree import norm, vdot
from metajax.meta._common import (
    inner_loop_learner,
    loss_and_aux,
)
from metajax.task_map import TaskMap
from metajax.types import Learner, LossFn, PyTree, Task

LinearSolve = Callable[[Callable[[PyTree], PyTree], PyTree], PyTree]
"""``linear_solve(matvec, b) -> x``: solve ``A x = b`` for ``A`` given as ``matvec``."""


def conjugate_gradient(
    matvec: Callable[[PyTree], PyTree], b: PyTree, steps: int, damping: float = 0.0
) -> PyTree:
    """Solve ``(A + damping I) x = b`` for symmetric positive definite ``A`` by at most
    ``steps`` conjugate-gradient iterations from ``x = 0`` (Hestenes and Stiefel, 1952).

    ``A`` is given only as ``matvec(x) = A x`` on pytrees shaped like ``b``; this wraps
    ``jax.scipy.sparse.linalg.cg`` with no tolerance, so exactly ``steps`` iterations run
    unless the residual vanishes first.
    """
    check_int("cg_steps", steps)
    if damping:
        plain = matvec

        def matvec(x):
            return jax.tree.map(lambda ax, xi: ax + damping * xi, plain(x), x)

    x, _ = jax.scipy.sparse.linalg.cg(matvec, b, tol=0.0, atol=0.0, maxiter=steps)
    return x


def gmres_solver(steps: int, restart: int = 50, tol: float = 1e-6) -> LinearSolve:
    """A ``linear_solve(matvec, b) -> x`` of restarted GMRES (Saad and Schultz, 1986) on at
    most ``steps`` products with ``A`` (restart after ``min(restart, steps)``), from
    ``x = 0``, stopping early at relative residual ``tol``.

    For the iMAML backward system away from a convex support loss: ``I + H / lam`` is then
    indefinite, conjugate gradient need not converge on it and GMRES does (it only needs
    ``A`` invertible). Pass it as ``mj.imaml(..., linear_solve=mj.gmres_solver(50))``.
    """
    check_int("steps", steps)
    check_int("restart", restart)
    check_number("tol", tol)
    inner = min(restart, steps)
    outer = max(steps // inner, 1)

    def linear_solve(matvec, b):
        x, _ = jax.scipy.sparse.linalg.gmres(matvec, b, tol=tol, atol=0.0, restart=inner,
                                             maxiter=outer, solve_method="incremental")
        return x

    return linear_solve


def _zero_cotangent(x):
    x = jnp.asarray(x)
    if jnp.issubdtype(x.dtype, jnp.inexact):
        return jnp.zeros_like(x)
    return np.zeros(x.shape, dtype=jax.dtypes.float0)


def implicit_proximal_solver(
    loss_fn: LossFn,
    solve: Callable[[PyTree, PyTree], PyTree],
    lam: float,
    cg_steps: int,
    cg_damping: float = 0.0,
    has_aux: bool = False,
    lam_damping: float = 0.0,
    linear_solve: LinearSolve | None = None,
) -> Callable[[PyTree, PyTree], PyTree]:
    """Attach the implicit meta-gradient to a proximal inner solver.

    ``solve(theta, support)`` approximately minimises
    ``loss_fn(phi, support) + lam / 2 ||phi - theta||^2`` over ``phi``; it stays a plain
    function and is never differentiated. At the solution ``phi*`` the Jacobian is
    ``d phi* / d theta = (I + H / lam)^-1`` with ``H`` the Hessian of the support loss at
    ``phi*``, so the backward pass maps a cotangent ``v`` to the solution of
    ``(I + H / lam) u = v``, found by ``cg_steps`` conjugate-gradient iterations on
    Hessian-vector products (forward-over-reverse), never a materialised Hessian. Only
    ``phi*`` and ``support`` are kept for the backward pass.

    Away from a convex support loss ``I + H / lam`` can be indefinite and a few CG steps
    then give a poor, large solution. Two stabilisers change the system to
    ``(1 + cg_damping) u + H u / (lam + lam_damping) = v``; both default to 0 (the exact
    implicit gradient).

    ``linear_solve(matvec, v) -> u``, when given, replaces the conjugate-gradient solve (as
    the ``solve`` argument of jaxopt's ``custom_root``): it receives the system's
    ``matvec`` (damping included) and the cotangent, both on pytrees, e.g.
    ``lambda mv, b: jax.scipy.sparse.linalg.gmres(mv, b, maxiter=20)[0]`` or a truncated
    Neumann series; ``cg_steps`` is then unused.
    """
    objective = loss_and_aux(loss_fn, has_aux)
    hessian_lam = lam + lam_damping

    def support_loss(phi, support):
        return objective(phi, support)[0]

    @jax.custom_vjp
    def solution(theta, support):
        return solve(theta, support)

    def forward(theta, support):
        phi = solve(theta, support)
        return phi, (phi, support)

    def backward(residuals, v):
        phi, support = residuals
        grad_at = jax.grad(support_loss)

        def matvec(x):
            hvp = jax.jvp(lambda p: grad_at(p, support), (phi,), (x,))[1]
            return jax.tree.map(lambda xi, hi: xi + hi / hessian_lam, x, hvp)

        if linear_solve is None:
            u = conjugate_gradient(matvec, v, cg_steps, cg_damping)
        else:
            damped = matvec
            if cg_damping:
                def damped(x):
                    return jax.tree.map(lambda ax, xi: ax + cg_damping * xi, matvec(x), x)
            u = linear_solve(damped, v)
        return u, jax.tree.map(_zero_cotangent, support)

    solution.defvjp(forward, backward)
    return solution


INNER_SOLVERS: tuple[str, ...] = ("gd", "backtracking")
#: The inner problems :func:`imaml` can solve: the paper's proximal problem, or the loop of
#: the authors' released code (free steps on the support loss, then one step back to theta).
INNER_PROBLEMS: tuple[str, ...] = ("proximal", "released")

#: The backward-system solvers a configuration may name: ``cg`` (:func:`conjugate_gradient`,
#: the default) and ``gmres`` (:func:`gmres_solver`, passed to :func:`imaml` as ``linear_solve``).
BACKWARD_SOLVERS: tuple[str, ...] = ("cg", "gmres")


def backtracking_descent(
    loss_fn: Callable[[PyTree, PyTree], jax.Array],
    params: PyTree,
    batch: PyTree,
    steps: int,
    max_lr: float,
    *,
    sufficient_decrease: float = 0.5,
    shrink: float = 0.5,
    grow: float = 2.0,
) -> tuple[PyTree, jax.Array]:
    """Gradient descent whose step adapts so that the loss never goes up.

    Each of ``steps`` trials proposes ``params - lr * grad`` and accepts it only when the
    loss falls by at least ``sufficient_decrease * lr * |grad|^2`` (Armijo's condition) and
    is finite; a rejected trial leaves the parameters and multiplies ``lr`` by ``shrink``, an
    accepted one multiplies it by ``grow`` up to ``max_lr``. Each trial costs one
    ``value_and_grad`` (the proposal's gradient is the next step's), plus one at the start:
    one gradient more than ``steps`` steps of plain gradient descent. Unlike plain gradient
    descent it cannot oscillate or diverge when ``max_lr`` is too large for the curvature
    it meets, which is what an implicit meta-gradient needs (it is exact only at a
    solution). Works under ``jax.vmap`` (the accept decision is a select, not a branch).
    Deciding by loss values, it resolves a minimiser to about the square root of machine
    epsilon (relative), where a true decrease falls below rounding.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar``.
      steps: trial steps, a Python int >= 1.
      max_lr: the first and largest step size.
      sufficient_decrease: Armijo's constant in ``(0, 1)``; 0.5 accepts a step on a
        quadratic only when ``lr <= 1 / curvature`` along the gradient.

    Returns:
      ``(params, losses)``: the last accepted parameters and the loss after each trial
      (the accepted loss, so non-increasing), shape ``[steps]``.
    """
    check_int("steps", steps)
    check_number("max_lr", max_lr)
    if not 0.0 < sufficient_decrease < 1.0:
        raise ValueError(f"sufficient_decrease must be in (0, 1), got {sufficient_decrease!r}")
    if not 0.0 < shrink < 1.0 or not grow >= 1.0:
        raise ValueError(f"need 0 < shrink < 1 and grow >= 1, got {shrink!r} and {grow!r}")
    value_and_grad = jax.value_and_grad(loss_fn)
    loss, grad = value_and_grad(params, batch)

    def trial(carry, _):
        params, loss, grad, lr = carry
        squared = sum(jnp.vdot(g, g) for g in jax.tree.leaves(grad))
        proposal = jax.tree.map(lambda p, g: p - (lr * g).astype(p.dtype), params, grad)
        new_loss, new_grad = value_and_grad(proposal, batch)
        accept = jnp.isfinite(new_loss) & (
            new_loss <= loss - sufficient_decrease * lr * squared)

        def pick(new, old):
            return jax.tree.map(lambda a, b: jnp.where(accept, a, b), new, old)

        params, grad = pick(proposal, params), pick(new_grad, grad)
        loss = jnp.where(accept, new_loss, loss)
        lr = jnp.where(accept, jnp.minimum(lr * grow, max_lr), lr * shrink)
        return (params, loss, grad, lr), loss

    start = (params, loss, grad, jnp.asarray(max_lr, jnp.result_type(loss)))
    (params, *_), losses = jax.lax.scan(trial, start, None, length=steps)
    return params, losses


def imaml(
    loss_fn: LossFn,
    inner_lr: float,
    inner_steps: int = 16,
    *,
    lam: float = 2.0,
    cg_steps: int = 5,
    cg_damping: float = 0.0,
    lam_damping: float = 0.0,
    inner_optimizer: optax.GradientTransformation | None = None,
    inner_solver: str = "gd",
    inner: str = "proximal",
    eval_lam: float | None = None,
    linear_solve: LinearSolve | None = None,
    has_aux: bool = False,
    task_map: TaskMap = "auto",
) -> Learner:
    """iMAML (Rajeswaran et al., 2019).

    The inner loop solves the proximal problem
    ``min_phi L_support(phi) + lam / 2 ||phi - theta||^2`` from ``phi = theta`` with
    ``inner_steps`` steps of gradient descent of size ``inner_lr`` (or of ``inner_optimizer``,
    any optax transformation, when given; or, with ``inner_solver="backtracking"``, of
    :func:`backtracking_descent` with ``inner_lr`` as its largest step). The meta-gradient
    of the query loss is ``(I + H / lam)^-1 grad L_query(phi*)``, computed by conjugate
    gradient (see :func:`implicit_proximal_solver`), so memory does not grow with ``inner_steps``.

    That meta-gradient is exact only at the proximal solution: ``meta_grad``'s metrics
    report ``inner_residual``, the norm of the proximal objective's gradient at the returned
    ``phi`` over the support-loss gradient's norm at ``theta`` (task mean). Well below 1 means
    the inner solve converged; near or above 1 means ``inner_lr`` is too large for the
    support loss's curvature (gradient descent needs ``inner_lr < 2 / (lam + top
    eigenvalue of H)``) or ``inner_steps`` too few, and the meta-gradient is then biased.

    Args:
      lam: proximal regularisation strength lambda (> 0; the paper's Omniglot value is 2).
      cg_steps: conjugate-gradient iterations in the backward pass (paper: 5).
      cg_damping: added to the diagonal of ``I + H / lam`` (helps when H is indefinite).
      lam_damping: added to ``lam`` in the backward system only, so it becomes
        ``(1 + cg_damping) I + H / (lam + lam_damping)``; the authors' released code
        stabilises its Omniglot runs this way (``cg_damping=1``, ``lam_damping=10``).
      inner_solver: ``"gd"`` (fixed steps of ``inner_lr``) or ``"backtracking"`` (steps
        that shrink when the proximal loss would not fall, grow back up to ``inner_lr``;
        one gradient per step, plus one at the start). Use it when ``inner_residual``
        stays high: plain gradient descent oscillates where ``inner_lr`` exceeds
        ``2 / (lam + curvature)`` along its path.
      inner: which inner problem training solves. ``"proximal"`` (the paper's Algorithm 2):
        every step descends ``L_support(phi) + lam / 2 ||phi - theta||^2``. ``"released"``
        (the authors' released Omniglot code): ``inner_steps`` steps on ``L_support`` alone,
        then one step of ``inner_lr`` on the proximal term only,
        ``phi <- phi - inner_lr * lam * (phi - theta)``; its meta-gradient is still the
        implicit one of the proximal problem at the returned ``phi``. The released loop ends
        much further from ``theta`` than the proximal solve (it is close to free
        fine-tuning) and far from the proximal solution, so ``inner_residual`` is large by
        construction there.
      eval_lam: the proximal strength that ``adapt`` (evaluation) uses; ``None`` means
        ``lam``. The released code evaluates with ``0``: plain steps on the support loss
        (``adapt`` is then differentiated by unrolling, not implicitly).
      linear_solve: the solver of the backward system, ``linear_solve(matvec, v) -> u``
        (default: ``cg_steps`` of conjugate gradient); see :func:`implicit_proximal_solver`.

    ``meta_grad``'s metrics also report ``phi_distance``, ``||phi - theta||`` (task mean):
    how far the inner loop moved.

      Others (``task_map`` included) as :func:`metajax.maml`. Its meta-parameters are the
      model parameters.
    """
    check_number("inner_lr", inner_lr)
    check_number("lam", lam)
    check_int("inner_steps", inner_steps)
    check_int("cg_steps", cg_steps)
    for name, value in (("cg_damping", cg_damping), ("lam_damping", lam_damping)):
        if not value >= 0:
            raise ValueError(f"{name} must be >= 0, got {value!r}")
    if inner_solver not in INNER_SOLVERS:
        raise ValueError(f"inner_solver must be one of {INNER_SOLVERS}, got {inner_solver!r}")
    if inner not in INNER_PROBLEMS:
        raise ValueError(f"inner must be one of {INNER_PROBLEMS}, got {inner!r}")
    if inner_solver != "gd" and inner_optimizer is not None:
        raise ValueError("give either inner_optimizer or inner_solver='backtracking', not both")
    if eval_lam is not None:
        check_number("eval_lam", eval_lam, positive=False)
    objective = loss_and_aux(loss_fn, has_aux)
    # The inner loop is never differentiated through the optimiser (the implicit gradient
    # replaces it), so its second-order check is not needed.
    rule = (inner_module.from_optax(inner_optimizer, check=False) if inner_optimizer
            else inner_module.sgd(inner_lr))
    problem = inner

    def support_loss(phi, batch):
        return objective(phi, batch[0])[0]

    def proximal(strength):
        def proximal_loss(phi, batch):
            support, theta = batch
            distance = sum(jnp.sum((p - t) ** 2) for p, t in
                           zip(jax.tree.leaves(phi), jax.tree.leaves(theta), strict=True))
            return objective(phi, support)[0] + 0.5 * strength * distance

        return proximal_loss

    proximal_loss = proximal(lam)

    def descend(loss, theta, support, steps):
        if inner_solver == "backtracking":
            return backtracking_descent(loss, theta, (support, theta), steps, inner_lr)[0]
        return inner_module.adapt(loss, theta, (support, theta), steps, rule)[0]

    def make_solver(steps):
        def solve(theta, support):
            theta = jax.lax.stop_gradient(theta)
            if problem == "proximal":
                return descend(proximal_loss, theta, support, steps)
            phi = descend(support_loss, theta, support, steps)
            return jax.tree.map(lambda p, t: p - (inner_lr * lam * (p - t)).astype(p.dtype),
                                phi, theta)

        return implicit_proximal_solver(loss_fn, solve, lam, cg_steps, cg_damping, has_aux,
                                        lam_damping, linear_solve)

    default_solver = make_solver(inner_steps)

    def run_inner(theta, support, steps):
        solver = default_solver if steps == inner_steps else make_solver(steps)
        phi = solver(theta, support)
        theta0, phi0 = jax.lax.stop_gradient((theta, phi))
        start, start_grad = jax.value_and_grad(lambda t: objective(t, support)[0])(theta0)
        # The implicit gradient is exact only at the proximal solution, where this is 0.
        residual = norm(jax.grad(proximal_loss)(phi0, (support, theta0))) / (
            norm(start_grad) + 1e-12)
        distance = norm(jax.tree.map(jnp.subtract, phi0, theta0))
        return phi, start[None], {"inner_residual": residual, "phi_distance": distance}

    def identity(params):
        return params

    learner = inner_loop_learner(identity, run_inner, loss_fn, inner_steps, has_aux, identity,
                                 task_map)
    if eval_lam is None or eval_lam == lam:
        return learner

    configured_steps = inner_steps

    def adapt(meta_params, support, inner_steps: int | None = None):
        steps = configured_steps if inner_steps is None else inner_steps
        check_int("inner_steps", steps, minimum=0)
        if eval_lam == 0:  # free steps on the support loss, as the released evaluation
            return descend(support_loss, meta_params, support, steps) if steps else meta_params
        solve = implicit_proximal_solver(
            loss_fn, lambda t, s: descend(proximal(eval_lam), jax.lax.stop_gradient(t), s,
                                          steps),
            eval_lam, cg_steps, cg_damping, has_aux, lam_damping, linear_solve)
        return solve(meta_params, support) if steps else meta_params

    return learner._replace(adapt=adapt)


def _cosine(a: PyTree, b: PyTree) -> jax.Array:
    return vdot(a, b) / (norm(a) * norm(b) + 1e-30)


def implicit_gradient_report(
    loss_fn: LossFn,
    learner: Learner,
    meta_params: PyTree,
    tasks: Task,
    lam: float,
    *,
    train_adapt: Callable[[PyTree, PyTree], PyTree] | None = None,
    reference_hvps: int = 200,
    reference_solver: str = "gmres",
    has_aux: bool = False,
) -> dict[str, jax.Array]:
    """How good an iMAML learner's meta-gradient is, task by task, averaged over ``tasks``.

    For each task (a leading task axis; one at a time, so memory is that of one task) this
    takes the learner's meta-gradient ``g`` and the training ``phi`` (``train_adapt``,
    default ``learner.adapt``: pass the training inner loop when the learner evaluates with
    another ``eval_lam``), and reports:

    - ``phi_distance`` and ``inner_residual``: as ``meta_grad``'s metrics;
    - ``cos_first_order``: cosine of ``g`` with the plain query gradient at ``phi`` (near 1:
      the implicit correction does nothing, a first-order method in effect);
    - ``cos_accurate``: cosine of ``g`` with the exact implicit gradient at the same ``phi``,
      the solution of the undamped ``(I + H / lam) u = grad L_query(phi)``, ``H`` the
      support loss's Hessian at ``phi``, by restarted GMRES (restart 50) on at most
      ``reference_hvps`` Hessian-vector products. GMRES, not CG: away from a convex support
      loss the system is indefinite and CG need not converge (``reference_solver="cg"``
      takes ``reference_hvps`` CG steps instead, to see that);
    - ``reference_residual``: that solve's relative residual (how far to trust
      ``cos_accurate``).

    Jit-able; about ``reference_hvps`` Hessian-vector products per task beside one
    meta-gradient.
    """
    check_number("lam", lam)
    check_int("reference_hvps", reference_hvps)
    if reference_solver not in ("gmres", "cg"):
        raise ValueError(f"reference_solver must be 'gmres' or 'cg', got {reference_solver!r}")
    objective = loss_and_aux(loss_fn, has_aux)
    adapt = learner.adapt if train_adapt is None else train_adapt
    reference = gmres_solver(reference_hvps)

    def one(task):
        grads, metrics = learner.meta_grad(meta_params, jax.tree.map(lambda x: x[None], task))
        grads = learner.fast_params_of(grads)
        phi = jax.lax.stop_gradient(adapt(meta_params, task.support))
        g_query = jax.grad(lambda p: objective(p, task.query)[0])(phi)
        grad_at = jax.grad(lambda p: objective(p, task.support)[0])

        def system(v):
            hvp = jax.jvp(grad_at, (phi,), (v,))[1]
            return jax.tree.map(lambda x, h: x + h / lam, v, hvp)

        if reference_solver == "cg":
            exact = conjugate_gradient(system, g_query, reference_hvps)
        else:
            exact = reference(system, g_query)
        residual = norm(jax.tree.map(jnp.subtract, system(exact), g_query)) / (
            norm(g_query) + 1e-30)
        return {
            "phi_distance": metrics["phi_distance"],
            "inner_residual": metrics["inner_residual"],
            "cos_first_order": _cosine(grads, g_query),
            "cos_accurate": _cosine(grads, exact),
            "reference_residual": residual,
        }

    per_task = jax.lax.map(one, tasks)
    return {k: jnp.mean(v) for k, v in per_task.items()}
