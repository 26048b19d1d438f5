"""iMAML: conjugate gradient and the implicit meta-gradient against closed forms."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import metajax as mj


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


def spd(key, d, condition=10.0):
    q, _ = jnp.linalg.qr(jax.random.normal(key, (d, d), jnp.float64))
    return q @ jnp.diag(jnp.linspace(1.0, condition, d)) @ q.T


def test_conjugate_gradient_matches_solve(x64):
    for seed, d in [(0, 3), (1, 8), (2, 20)]:
        a = spd(jax.random.PRNGKey(seed), d)
        b = jax.random.normal(jax.random.PRNGKey(seed + 10), (d,), jnp.float64)
        x = mj.conjugate_gradient(lambda v, a=a: a @ v, b, steps=d)
        np.testing.assert_allclose(x, jnp.linalg.solve(a, b), rtol=1e-8, atol=1e-10)
        x = mj.conjugate_gradient(lambda v, a=a: a @ v, b, steps=d, damping=0.5)
        np.testing.assert_allclose(x, jnp.linalg.solve(a + 0.5 * jnp.eye(d), b), rtol=1e-8)


def test_conjugate_gradient_on_pytrees(x64):
    a1, a2 = spd(jax.random.PRNGKey(3), 4), spd(jax.random.PRNGKey(4), 3)
    b = {"u": jnp.arange(4.0), "v": jnp.ones(3)}
    x = mj.conjugate_gradient(lambda t: {"u": a1 @ t["u"], "v": a2 @ t["v"]}, b, steps=7)
    np.testing.assert_allclose(x["u"], jnp.linalg.solve(a1, b["u"]), rtol=1e-8)
    np.testing.assert_allclose(x["v"], jnp.linalg.solve(a2, b["v"]), rtol=1e-8)


def quadratic_loss(params, batch):
    """Support loss ``1/2 phi^T A phi - b^T phi``; the query loss ``1/2 ||phi - c||^2`` uses
    ``A = I`` and ``b = c`` (up to a constant), so one function serves both."""
    a, b = batch
    phi = params["phi"]
    return 0.5 * phi @ a @ phi - b @ phi


def quadratic_task(key, d=6):
    ka, kb, kc = jax.random.split(key, 3)
    a = spd(ka, d, condition=20.0)
    b = jax.random.normal(kb, (d,), jnp.float64)
    c = jax.random.normal(kc, (d,), jnp.float64)
    return mj.Task(support=(a, b), query=(jnp.eye(d), c))


def closed_form(theta, task, lam):
    a, b = task.support
    _, c = task.query
    d = len(theta)
    phi = jnp.linalg.solve(a + lam * jnp.eye(d), b + lam * theta)
    return phi, lam * jnp.linalg.solve(a + lam * jnp.eye(d), phi - c)


def test_imaml_meta_gradient_matches_closed_form(x64):
    lam = 2.0
    task = quadratic_task(jax.random.PRNGKey(5))
    theta = jnp.linspace(-1.0, 1.0, 6)
    # The proximal objective has curvature between 1 + lam and 20 + lam: step 1/22 converges.
    learner = mj.imaml(quadratic_loss, inner_lr=1 / 22, inner_steps=600, lam=lam, cg_steps=6)
    tasks = jax.tree.map(lambda x: x[None], task)
    grads, _ = learner.meta_grad({"phi": theta}, tasks)
    phi_star, expected = closed_form(theta, task, lam)
    np.testing.assert_allclose(learner.adapt({"phi": theta}, task.support)["phi"], phi_star,
                               rtol=1e-9)
    np.testing.assert_allclose(grads["phi"], expected, rtol=1e-8, atol=1e-10)


def test_imaml_damped_backward_matches_closed_form(x64):
    """cg_damping and lam_damping solve ((1 + d) I + A / (lam + l)) u = grad L_query(phi*)
    at the undamped proximal solution phi*."""
    lam, d, extra = 2.0, 1.0, 10.0
    task = quadratic_task(jax.random.PRNGKey(7))
    theta = jnp.linspace(-1.0, 1.0, 6)
    learner = mj.imaml(quadratic_loss, inner_lr=1 / 22, inner_steps=600, lam=lam, cg_steps=6,
                       cg_damping=d, lam_damping=extra)
    grads, _ = learner.meta_grad({"phi": theta}, jax.tree.map(lambda x: x[None], task))
    phi_star, exact = closed_form(theta, task, lam)
    a, _ = task.support
    expected = jnp.linalg.solve((1 + d) * jnp.eye(6) + a / (lam + extra), phi_star - task.query[1])
    np.testing.assert_allclose(grads["phi"], expected, rtol=1e-8, atol=1e-10)
    assert float(jnp.linalg.norm(expected - exact)) > 0.1 * float(jnp.linalg.norm(exact))


@pytest.mark.parametrize("damping", [0.0, 1.0])
def test_imaml_linear_solve_replaces_conjugate_gradient(x64, damping):
    """A user solver (GMRES here) receives the damped system and gives the closed-form
    meta-gradient; a solver that returns its right-hand side shows it is the one used."""
    lam, extra = 2.0, 10.0 if damping else 0.0
    task = quadratic_task(jax.random.PRNGKey(11))
    theta = jnp.linspace(-1.0, 1.0, 6)
    tasks = jax.tree.map(lambda x: x[None], task)

    def gmres(matvec, b):
        return jax.scipy.sparse.linalg.gmres(matvec, b, tol=1e-13, atol=0.0, restart=6,
                                             maxiter=4)[0]

    learner = mj.imaml(quadratic_loss, inner_lr=1 / 22, inner_steps=600, lam=lam, cg_steps=1,
                       cg_damping=damping, lam_damping=extra, linear_solve=gmres)
    grads, _ = learner.meta_grad({"phi": theta}, tasks)
    phi_star, _ = closed_form(theta, task, lam)
    a, _ = task.support
    system = (1 + damping) * jnp.eye(6) + a / (lam + extra)
    expected = jnp.linalg.solve(system, phi_star - task.query[1])
    np.testing.assert_allclose(grads["phi"], expected, rtol=1e-8, atol=1e-10)
    identity = mj.imaml(quadratic_loss, inner_lr=1 / 22, inner_steps=600, lam=lam,
                        linear_solve=lambda matvec, b: b)
    grads, _ = identity.meta_grad({"phi": theta}, tasks)
    np.testing.assert_allclose(grads["phi"], phi_star - task.query[1], rtol=1e-8, atol=1e-10)


def test_imaml_reports_whether_the_inner_solve_converged(x64):
    """inner_residual: ~0 at the proximal solution, large when gradient descent diverges
    (step above 2 / (lam + top eigenvalue)), in between when stopped early."""
    task = quadratic_task(jax.random.PRNGKey(8))
    tasks = jax.tree.map(lambda x: x[None], task)
    theta = {"phi": jnp.linspace(-1.0, 1.0, 6)}

    def residual(inner_lr, inner_steps):
        learner = mj.imaml(quadratic_loss, inner_lr=inner_lr, inner_steps=inner_steps, lam=2.0)
        return float(learner.meta_grad(theta, tasks)[1]["inner_residual"])

    # The proximal curvature lies in [1 + 2, 20 + 2]: 1/22 converges, 0.12 > 2/22 diverges.
    converged, early, diverged = residual(1 / 22, 600), residual(1 / 22, 3), residual(0.12, 30)
    assert converged < 1e-9
    assert 1e-3 < early < 1.0
    assert diverged > 10.0


def test_backtracking_descent_never_increases_and_converges_where_gd_diverges(x64):
    """On the quadratic proximal problem with a step 0.5 > 2 / 22, plain gradient descent
    diverges; backtracking shrinks the step, never lets the loss rise, and reaches the
    closed-form proximal solution."""
    lam = 2.0
    task = quadratic_task(jax.random.PRNGKey(9))
    theta = {"phi": jnp.linspace(-1.0, 1.0, 6)}

    def proximal(params, batch):
        support, anchor = batch
        return quadratic_loss(params, support) + 0.5 * lam * jnp.sum(
            (params["phi"] - anchor["phi"]) ** 2)

    batch = (task.support, theta)
    phi, losses = mj.backtracking_descent(proximal, theta, batch, steps=400, max_lr=0.5)
    assert losses.shape == (400,)
    assert bool(jnp.all(jnp.diff(losses) <= 0.0))
    assert float(losses[0]) <= float(proximal(theta, batch))
    phi_star, _ = closed_form(theta["phi"], task, lam)
    # Accepting by comparing loss values resolves the minimiser to about sqrt(machine
    # epsilon) relative (1e-8 in float64): near it, a true decrease is below rounding.
    np.testing.assert_allclose(phi["phi"], phi_star, rtol=1e-6, atol=1e-9)
    gd = mj.inner.adapt(proximal, theta, batch, 30, mj.inner.sgd(0.5))[0]
    assert float(jnp.linalg.norm(gd["phi"] - phi_star)) > 1e3

    with pytest.raises(ValueError, match="sufficient_decrease"):
        mj.backtracking_descent(proximal, theta, batch, 3, 0.5, sufficient_decrease=1.0)
    with pytest.raises(ValueError, match="shrink"):
        mj.backtracking_descent(proximal, theta, batch, 3, 0.5, shrink=1.0)


def test_imaml_backtracking_meta_gradient_matches_closed_form(x64):
    """inner_solver="backtracking" with an inner_lr at which plain GD diverges still gives
    the exact implicit meta-gradient; the plain-GD learner's residual shows the failure."""
    lam = 2.0
    task = quadratic_task(jax.random.PRNGKey(10))
    tasks = jax.tree.map(lambda x: x[None], task)
    theta = {"phi": jnp.linspace(-1.0, 1.0, 6)}
    learner = mj.imaml(quadratic_loss, inner_lr=0.5, inner_steps=400, lam=lam, cg_steps=6,
                       inner_solver="backtracking")
    grads, metrics = learner.meta_grad(theta, tasks)
    _, expected = closed_form(theta["phi"], task, lam)
    np.testing.assert_allclose(grads["phi"], expected, rtol=1e-6, atol=1e-9)
    assert float(metrics["inner_residual"]) < 1e-6
    plain = mj.imaml(quadratic_loss, inner_lr=0.5, inner_steps=30, lam=lam)
    assert float(plain.meta_grad(theta, tasks)[1]["inner_residual"]) > 10.0
    batched = jax.jit(jax.vmap(lambda t: learner.adapt(theta, t.support)))(
        jax.tree.map(lambda *xs: jnp.stack(xs), task, quadratic_task(jax.random.PRNGKey(11))))
    assert batched["phi"].shape == (2, 6)
    with pytest.raises(ValueError, match="inner_solver must be one of"):
        mj.imaml(quadratic_loss, 0.1, inner_solver="lbfgs")
    with pytest.raises(ValueError, match="not both"):
        mj.imaml(quadratic_loss, 0.1, inner_solver="backtracking",
                 inner_optimizer=optax.sgd(0.1))


def test_imaml_error_shrinks_with_cg_steps(x64):
    lam = 0.5
    task = quadratic_task(jax.random.PRNGKey(6), d=10)
    theta = jnp.linspace(-1.0, 1.0, 10)
    tasks = jax.tree.map(lambda x: x[None], task)
    _, expected = closed_form(theta, task, lam)
    errors = []
    for cg_steps in [1, 2, 4, 10]:
        learner = mj.imaml(quadratic_loss, inner_lr=1 / 21, inner_steps=2000, lam=lam,
                           cg_steps=cg_steps)
        grads, _ = learner.meta_grad({"phi": theta}, tasks)
        errors.append(float(jnp.linalg.norm(grads["phi"] - expected)))
    assert errors[0] > errors[1] > errors[2] > errors[3]
    assert errors[3] < 1e-8 * float(jnp.linalg.norm(expected)) + 1e-10
    assert errors[0] > 1e-3


def test_imaml_batch_and_jit(x64):
    tasks = jax.tree.map(lambda *xs: jnp.stack(xs),
                         *[quadratic_task(jax.random.PRNGKey(i)) for i in range(3)])
    learner = mj.imaml(quadratic_loss, inner_lr=1 / 22, inner_steps=300, lam=2.0, cg_steps=6)
    theta = {"phi": jnp.linspace(-1.0, 1.0, 6)}
    grads, metrics = jax.jit(learner.meta_grad)(theta, tasks)
    expected = np.mean([closed_form(theta["phi"], jax.tree.map(lambda x, i=i: x[i], tasks),
                                     2.0)[1] for i in range(3)], axis=0)
    np.testing.assert_allclose(grads["phi"], expected, rtol=1e-7)
    assert np.isfinite(metrics["meta_loss"])


def test_imaml_memory_does_not_keep_the_trajectory():
    """The compiled meta-gradient's temporary memory is the same for 5 and 200 inner steps."""

    def loss(params, batch):
        x, y = batch
        return jnp.mean((jnp.tanh(x @ params["w1"]) @ params["w2"] - y) ** 2)

    params = {"w1": jnp.ones((1, 64)) * 0.1, "w2": jnp.ones((64, 1)) * 0.1}
    x = jnp.linspace(-1, 1, 4 * 32).reshape(4, 32, 1)
    tasks = mj.Task((x, jnp.sin(x)), (x, jnp.cos(x)))

    def temp_bytes(learner):
        compiled = jax.jit(learner.meta_grad).lower(params, tasks).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    imaml_few = temp_bytes(mj.imaml(loss, 0.1, inner_steps=5))
    imaml_many = temp_bytes(mj.imaml(loss, 0.1, inner_steps=200))
    maml_many = temp_bytes(mj.maml(loss, 0.1, inner_steps=200))
    assert imaml_many <= 1.1 * imaml_few
    assert maml_many > 5 * imaml_many


def test_imaml_bad_arguments():
    with pytest.raises(ValueError, match="lam must be > 0"):
        mj.imaml(quadratic_loss, 0.1, lam=0.0)
    with pytest.raises(ValueError, match="cg_steps must be"):
        mj.imaml(quadratic_loss, 0.1, cg_steps=0)
    with pytest.raises(ValueError, match="lam_damping must be >= 0"):
        mj.imaml(quadratic_loss, 0.1, lam_damping=-1.0)
    with pytest.raises(ValueError, match="cg_damping must be >= 0"):
        mj.imaml(quadratic_loss, 0.1, cg_damping=float("nan"))


def test_released_inner_loop_is_free_steps_then_one_step_back(x64):
    """inner="released": inner_steps of gradient descent on the support loss alone, then
    phi <- phi - lr * lam * (phi - theta); the meta-gradient is the implicit one of the
    proximal problem at that phi, (I + A / lam)^-1 (phi - c) for a quadratic support loss."""
    lam, lr, steps = 2.0, 0.03, 7
    task = quadratic_task(jax.random.PRNGKey(11))
    a, b = task.support
    _, c = task.query
    theta = jnp.linspace(-1.0, 1.0, 6)
    phi = theta
    for _ in range(steps):
        phi = phi - lr * (a @ phi - b)
    phi = phi - lr * lam * (phi - theta)
    learner = mj.imaml(quadratic_loss, inner_lr=lr, inner_steps=steps, lam=lam, cg_steps=6,
                       inner="released")
    np.testing.assert_allclose(learner.adapt({"phi": theta}, task.support)["phi"], phi,
                               rtol=1e-12)
    grads, metrics = learner.meta_grad({"phi": theta}, jax.tree.map(lambda x: x[None], task))
    expected = jnp.linalg.solve(jnp.eye(6) + a / lam, phi - c)
    np.testing.assert_allclose(grads["phi"], expected, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(metrics["phi_distance"], jnp.linalg.norm(phi - theta),
                               rtol=1e-12)
    # inner_residual measures the distance from the proximal problem's solution.
    residual = jnp.linalg.norm(a @ phi - b + lam * (phi - theta)) / jnp.linalg.norm(a @ theta - b)
    np.testing.assert_allclose(metrics["inner_residual"], residual, rtol=1e-6)


def test_eval_lam_sets_the_evaluation_problem_only(x64):
    lam, lr, steps = 2.0, 1 / 22, 600
    task = quadratic_task(jax.random.PRNGKey(12))
    a, b = task.support
    theta = jnp.linspace(-1.0, 1.0, 6)
    kwargs = dict(inner_lr=lr, inner_steps=steps, lam=lam, cg_steps=6)
    same = mj.imaml(quadratic_loss, **kwargs)
    free = mj.imaml(quadratic_loss, **kwargs, eval_lam=0.0)
    other = mj.imaml(quadratic_loss, **kwargs, eval_lam=5.0)
    tasks = jax.tree.map(lambda x: x[None], task)
    # Training is unchanged.
    for learner in (free, other):
        np.testing.assert_allclose(learner.meta_grad({"phi": theta}, tasks)[0]["phi"],
                                   same.meta_grad({"phi": theta}, tasks)[0]["phi"], rtol=1e-12)
    # eval_lam=0: plain gradient descent on the support loss (here to its minimiser A^-1 b).
    phi = theta
    for _ in range(16):
        phi = phi - 0.01 * (a @ phi - b)
    short = mj.imaml(quadratic_loss, inner_lr=0.01, inner_steps=3, lam=lam, eval_lam=0.0)
    adapted = short.adapt({"phi": theta}, task.support, inner_steps=16)["phi"]
    np.testing.assert_allclose(adapted, phi, rtol=1e-12)
    np.testing.assert_allclose(free.adapt({"phi": theta}, task.support)["phi"],
                               jnp.linalg.solve(a, b), rtol=1e-6)
    np.testing.assert_allclose(other.adapt({"phi": theta}, task.support)["phi"],
                               closed_form(theta, task, 5.0)[0], rtol=1e-9)
    # Differentiating the free evaluation unrolls it: d phi_16 / d theta = (I - lr A)^16.
    jac = jax.jacobian(lambda t: short.adapt({"phi": t}, task.support, 16)["phi"])(theta)
    np.testing.assert_allclose(jac, jnp.linalg.matrix_power(jnp.eye(6) - 0.01 * a, 16),
                               rtol=1e-10, atol=1e-12)


def test_inner_problem_and_eval_lam_are_checked():
    with pytest.raises(ValueError, match="inner must be one of"):
        mj.imaml(quadratic_loss, 0.1, inner="exact")
    with pytest.raises(ValueError, match="eval_lam must be >= 0"):
        mj.imaml(quadratic_loss, 0.1, eval_lam=-1.0)


def cosine(a, b):
    return float(a @ b / (jnp.linalg.norm(a) * jnp.linalg.norm(b)))


@pytest.mark.parametrize("solver", ["gmres", "cg"])
def test_implicit_gradient_report_matches_closed_forms(x64, solver):
    """On quadratic tasks: the damped learner's gradient against the plain query gradient
    and the exact implicit one, by closed form; the undamped learner is exact (cosine 1)."""
    lam, damping, extra = 2.0, 1.0, 10.0
    tasks = [quadratic_task(jax.random.PRNGKey(s)) for s in (21, 22)]
    stacked = jax.tree.map(lambda *x: jnp.stack(x), *tasks)
    theta = jnp.linspace(-1.0, 1.0, 6)
    damped = mj.imaml(quadratic_loss, inner_lr=1 / 22, inner_steps=600, lam=lam, cg_steps=6,
                      cg_damping=damping, lam_damping=extra)
    report = jax.jit(lambda p, t: mj.implicit_gradient_report(
        quadratic_loss, damped, p, t, lam, reference_hvps=12, reference_solver=solver))
    got = {k: float(v) for k, v in report({"phi": theta}, stacked).items()}
    firsts, accurates, distances = [], [], []
    for task in tasks:
        phi_star, exact = closed_form(theta, task, lam)
        a, _ = task.support
        g_query = phi_star - task.query[1]
        g = jnp.linalg.solve((1 + damping) * jnp.eye(6) + a / (lam + extra), g_query)
        firsts.append(cosine(g, g_query))
        accurates.append(cosine(g, exact))
        distances.append(float(jnp.linalg.norm(phi_star - theta)))
    assert got["cos_first_order"] == pytest.approx(np.mean(firsts), rel=1e-8)
    assert got["cos_accurate"] == pytest.approx(np.mean(accurates), rel=1e-6)
    assert got["phi_distance"] == pytest.approx(np.mean(distances), rel=1e-8)
    assert got["reference_residual"] < 1e-6 and got["inner_residual"] < 1e-9
    assert max(accurates) < 0.999  # the damped gradient is not the exact one here
    exact_learner = mj.imaml(quadratic_loss, inner_lr=1 / 22, inner_steps=600, lam=lam,
                             cg_steps=6)
    exact = mj.implicit_gradient_report(quadratic_loss, exact_learner, {"phi": theta}, stacked,
                                        lam, reference_hvps=12, reference_solver=solver)
    assert float(exact["cos_accurate"]) == pytest.approx(1.0, abs=1e-9)


def test_implicit_gradient_report_takes_phi_from_the_training_loop(x64):
    """With eval_lam=0, adapt runs free steps: the report must use the training inner loop
    given as train_adapt, and then equals the report of the learner without eval_lam."""
    lam = 2.0
    stacked = jax.tree.map(lambda x: x[None], quadratic_task(jax.random.PRNGKey(23)))
    theta = {"phi": jnp.linspace(-1.0, 1.0, 6)}
    plain = mj.imaml(quadratic_loss, inner_lr=1 / 22, inner_steps=600, lam=lam, cg_steps=6)
    free = mj.imaml(quadratic_loss, inner_lr=1 / 22, inner_steps=600, lam=lam, cg_steps=6,
                    eval_lam=0.0)
    expected = mj.implicit_gradient_report(quadratic_loss, plain, theta, stacked, lam,
                                           reference_hvps=12)
    given = mj.implicit_gradient_report(quadratic_loss, free, theta, stacked, lam,
                                        train_adapt=plain.adapt, reference_hvps=12)
    wrong = mj.implicit_gradient_report(quadratic_loss, free, theta, stacked, lam,
                                        reference_hvps=12)
    for key in expected:
        assert float(given[key]) == pytest.approx(float(expected[key]), rel=1e-9), key
    assert abs(float(wrong["cos_first_order"]) - float(expected["cos_first_order"])) > 1e-3
    with pytest.raises(ValueError, match="reference_solver"):
        mj.implicit_gradient_report(quadratic_loss, plain, theta, stacked, lam,
                                    reference_solver="lu")


def test_gmres_solver_is_minimal_residual_on_an_indefinite_system(x64):
    """On an indefinite symmetric system (eigenvalues on both sides of 0, as I + H / lam
    away from a convex support loss) GMRES with k products returns the minimum-residual point
    of the Krylov space span(b, Ab, ..., A^(k-1) b), computed here by least squares, and the
    exact solution once k reaches the dimension; CG's k-th iterate, in the same space, has a
    larger residual."""
    d, k = 8, 4
    q, _ = jnp.linalg.qr(jax.random.normal(jax.random.PRNGKey(3), (d, d), jnp.float64))
    system = q @ jnp.diag(jnp.array([-2.5, -1.7, -0.6, 0.4, 1.3, 2.2, 3.1, 4.0])) @ q.T
    b = jax.random.normal(jax.random.PRNGKey(4), (d,), jnp.float64)

    def matvec(v):
        return system @ v

    def residual(x):
        return float(jnp.linalg.norm(system @ x - b))

    krylov = jnp.stack([jnp.linalg.matrix_power(system, i) @ b for i in range(k)], axis=1)
    coefficients = jnp.linalg.lstsq(system @ krylov, b)[0]
    best = krylov @ coefficients
    x = mj.gmres_solver(steps=k, tol=1e-14)(matvec, b)
    np.testing.assert_allclose(x, best, rtol=1e-7, atol=1e-9)
    assert residual(mj.conjugate_gradient(matvec, b, steps=k)) > residual(best) * (1 + 1e-6)
    np.testing.assert_allclose(mj.gmres_solver(steps=d, tol=1e-14)(matvec, b),
                               jnp.linalg.solve(system, b), rtol=1e-8, atol=1e-10)
    # Restarted every 2 products: each cycle cannot raise the residual.
    assert (residual(mj.gmres_solver(steps=6, restart=2, tol=1e-14)(matvec, b))
            <= residual(mj.gmres_solver(steps=2, restart=2, tol=1e-14)(matvec, b)) + 1e-12)
    with pytest.raises(ValueError, match="steps"):
        mj.gmres_solver(0)


def test_backward_solver_field_builds_the_gmres_learner():
    """backward_solver=gmres in a configuration gives the learner of
    linear_solve=gmres_solver(cg_steps), and applies to imaml only."""
    from metajax.presets import get_preset
    from metajax.presets.build import build_learner, build_problem
    from metajax.train.config import ConfigError

    config = get_preset("sinusoid-imaml").with_overrides(
        ["backward_solver=gmres", "cg_steps=7", "meta_batch_size=3", "inner_steps=3"])
    config.validate()
    problem = build_problem(config)
    learner = build_learner(config, problem)
    meta_params = learner.init(problem.init_params(jax.random.PRNGKey(0)))
    tasks = problem.sample_tasks(jax.random.PRNGKey(1), 3, config.shots, config.queries,
                                 "train")
    by_hand = mj.imaml(problem.loss_fn, config.inner_lr, config.inner_steps, lam=config.lam,
                       inner_solver=config.inner_solver, linear_solve=mj.gmres_solver(7))
    cg = build_learner(config.with_overrides(["backward_solver=cg"]), problem)
    grads = learner.meta_grad(meta_params, tasks)[0]
    chex.assert_trees_all_close(grads, by_hand.meta_grad(meta_params, tasks)[0], rtol=1e-5,
                                atol=1e-7)
    differs = jax.tree.leaves(jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), grads,
                                           cg.meta_grad(meta_params, tasks)[0]))
    assert max(differs) > 0, "gmres and cg gave identical meta-gradients: the field is unused"
    with pytest.raises(ConfigError, match="backward_solver"):
        config.with_overrides(["backward_solver=lu"]).validate()
    with pytest.raises(ConfigError, match="applies to imaml only"):
        get_preset("sinusoid-maml").with_overrides(["backward_solver=gmres"]).validate()
