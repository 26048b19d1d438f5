"""Meta-gradients against finite differences and closed forms."""

import chex
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import metajax as mj


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


def mse(pred, y):
    return jnp.mean((pred - y) ** 2)


def mlp_loss(params, batch):
    x, y = batch
    h = jnp.tanh(x @ params["w1"] + params["b1"])
    return mse(h @ params["w2"] + params["b2"], y)


def mlp_params(key, hidden=6, dtype=jnp.float64):
    k1, k2, k3 = jax.random.split(key, 3)
    return {
        "w1": jax.random.normal(k1, (1, hidden), dtype),
        "b1": 0.1 * jax.random.normal(k3, (hidden,), dtype),
        "w2": jax.random.normal(k2, (hidden, 1), dtype) / np.sqrt(hidden),
        "b2": jnp.zeros((1,), dtype),
    }


def regression_tasks(key, tasks, n, d_in=1, dtype=jnp.float64):
    """Tasks ``y = a * sin(x + b)``: support and query of ``n`` points each."""
    ka, kb, kx = jax.random.split(key, 3)
    a = jax.random.uniform(ka, (tasks, 1, 1), dtype, 0.5, 2.0)
    b = jax.random.uniform(kb, (tasks, 1, 1), dtype, 0.0, 3.0)
    x = jax.random.uniform(kx, (tasks, 2 * n, d_in), dtype, -3.0, 3.0)
    y = a * jnp.sin(x[..., :1] + b)
    return mj.Task((x[:, :n], y[:, :n]), (x[:, n:], y[:, n:]))


def finite_difference_grad(f, params, eps=1e-6):
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    out = np.zeros(flat.shape[0])
    for i in range(flat.shape[0]):
        e = jnp.zeros_like(flat).at[i].set(eps)
        out[i] = (f(unravel(flat + e)) - f(unravel(flat - e))) / (2 * eps)
    return out


def flat(tree):
    return np.asarray(jax.flatten_util.ravel_pytree(tree)[0])


def meta_objective(learner, loss_fn, tasks):
    """The MAML objective evaluated directly: mean query loss after ``learner.adapt``."""

    def f(meta_params):
        def one(task):
            return loss_fn(learner.adapt(meta_params, task.support), task.query)

        return jnp.mean(jax.vmap(one)(tasks))

    return f


@pytest.mark.parametrize("inner_steps", [1, 3])
def test_maml_second_order_matches_finite_differences(x64, inner_steps):
    params = mlp_params(jax.random.PRNGKey(0))
    tasks = regression_tasks(jax.random.PRNGKey(1), tasks=3, n=5)
    learner = mj.maml(mlp_loss, inner_lr=0.1, inner_steps=inner_steps)
    grads, metrics = learner.meta_grad(params, tasks)
    fd = finite_difference_grad(jax.jit(meta_objective(learner, mlp_loss, tasks)), params)
    np.testing.assert_allclose(flat(grads), fd, rtol=1e-6, atol=1e-8)
    objective = meta_objective(learner, mlp_loss, tasks)(params)
    np.testing.assert_allclose(metrics["meta_loss"], objective)


def linear_loss(params, batch):
    x, y = batch
    return mse(x @ params["w"], y)


def linear_tasks(key, tasks=4, n=6, d=3):
    kx, kw, kn = jax.random.split(key, 3)
    x = jax.random.normal(kx, (tasks, 2 * n, d), jnp.float64)
    w_true = jax.random.normal(kw, (tasks, d), jnp.float64)
    y = jnp.einsum("tnd,td->tn", x, w_true) + 0.1 * jax.random.normal(kn, (tasks, 2 * n))
    return mj.Task((x[:, :n], y[:, :n]), (x[:, n:], y[:, n:]))


def linear_closed_form(w0, tasks, alpha, steps):
    """Mean over tasks of ``((I - alpha A_s)^steps)^T grad L_q(w_steps)`` and of ``grad L_q``."""
    second, first = [], []
    xs, ys = map(np.asarray, tasks.support)
    xq, yq = map(np.asarray, tasks.query)
    for t in range(xs.shape[0]):
        n = xs.shape[1]
        a_s = 2.0 / n * xs[t].T @ xs[t]
        b_s = 2.0 / n * xs[t].T @ ys[t]
        w = np.asarray(w0, np.float64)
        for _ in range(steps):
            w = w - alpha * (a_s @ w - b_s)
        grad_q = 2.0 / n * xq[t].T @ (xq[t] @ w - yq[t])
        jac = np.linalg.matrix_power(np.eye(len(w)) - alpha * a_s, steps)
        second.append(jac.T @ grad_q)
        first.append(grad_q)
    return np.mean(second, axis=0), np.mean(first, axis=0)


@pytest.mark.parametrize("steps", [1, 4])
def test_maml_closed_form_linear_regression(x64, steps):
    tasks = linear_tasks(jax.random.PRNGKey(2))
    params = {"w": jnp.array([0.3, -0.2, 0.5])}
    alpha = 0.05
    expected_second, expected_first = linear_closed_form(params["w"], tasks, alpha, steps)
    second, _ = mj.maml(linear_loss, alpha, steps).meta_grad(params, tasks)
    first, _ = mj.maml(linear_loss, alpha, steps, first_order=True).meta_grad(params, tasks)
    np.testing.assert_allclose(second["w"], expected_second, rtol=1e-10)
    np.testing.assert_allclose(first["w"], expected_first, rtol=1e-10)
    # The Hessian term is not small here, so the two must differ.
    assert np.linalg.norm(second["w"] - first["w"]) > 0.05 * np.linalg.norm(second["w"])


def test_fomaml_is_query_gradient_at_adapted_params(x64):
    params = mlp_params(jax.random.PRNGKey(3))
    tasks = regression_tasks(jax.random.PRNGKey(4), tasks=4, n=5)
    learner = mj.maml(mlp_loss, inner_lr=0.1, inner_steps=2, first_order=True)
    grads, _ = learner.meta_grad(params, tasks)

    def query_grad(task):
        return jax.grad(mlp_loss)(learner.adapt(params, task.support), task.query)

    expected = jax.tree.map(lambda g: jnp.mean(g, 0), jax.vmap(query_grad)(tasks))
    chex.assert_trees_all_close(grads, expected, rtol=1e-12)


def test_metasgd_learning_rate_gradient(x64):
    """One step: d L_q / d alpha = -grad L_s(theta) * grad L_q(fast), per entry."""
    tasks = linear_tasks(jax.random.PRNGKey(5), tasks=1)
    task = jax.tree.map(lambda x: x[0], tasks)
    learner = mj.metasgd(linear_loss, inner_lr=0.05)
    meta_params = learner.init({"w": jnp.array([0.3, -0.2, 0.5])})
    meta_params = meta_params._replace(inner_lrs={"w": jnp.array([0.01, 0.05, 0.1])})
    grads, _ = learner.meta_grad(meta_params, tasks)

    theta, alpha = np.asarray(meta_params.params["w"]), np.asarray(meta_params.inner_lrs["w"])
    xs, ys = map(np.asarray, task.support)
    xq, yq = map(np.asarray, task.query)
    n = xs.shape[0]
    a_s = 2.0 / n * xs.T @ xs
    g_s = a_s @ theta - 2.0 / n * xs.T @ ys
    fast = theta - alpha * g_s
    g_q = 2.0 / n * xq.T @ (xq @ fast - yq)
    np.testing.assert_allclose(grads.inner_lrs["w"], -g_s * g_q, rtol=1e-10)
    np.testing.assert_allclose(grads.params["w"], (np.eye(3) - alpha[:, None] * a_s).T @ g_q,
                               rtol=1e-10)
    np.testing.assert_allclose(learner.adapt(meta_params, task.support)["w"], fast, rtol=1e-12)


def anil_loss(params, batch):
    x, y = batch
    h = jnp.tanh(x @ params["body"]["w"])
    return mse(h @ params["head"]["w"], y)


def anil_params(key):
    k1, k2 = jax.random.split(key)
    return {
        "body": {"w": jax.random.normal(k1, (1, 5), jnp.float64)},
        "head": {"w": jax.random.normal(k2, (5, 1), jnp.float64)},
    }


def test_anil_adapts_only_the_head(x64):
    params = anil_params(jax.random.PRNGKey(6))
    tasks = regression_tasks(jax.random.PRNGKey(7), tasks=3, n=5)
    learner = mj.anil(anil_loss, inner_lr=0.2, inner_steps=2)
    task = jax.tree.map(lambda x: x[0], tasks)
    fast = learner.adapt(params, task.support)
    np.testing.assert_array_equal(fast["body"]["w"], params["body"]["w"])
    assert np.abs(np.asarray(fast["head"]["w"] - params["head"]["w"])).max() > 1e-3

    grads, _ = learner.meta_grad(params, tasks)
    fd = finite_difference_grad(jax.jit(meta_objective(learner, anil_loss, tasks)), params)
    np.testing.assert_allclose(flat(grads), fd, rtol=1e-6, atol=1e-8)
    assert np.abs(np.asarray(grads["body"]["w"])).max() > 1e-3


def test_anil_unknown_head_is_a_clear_error():
    learner = mj.anil(anil_loss, inner_lr=0.1, head="classifier")
    params = {"body": {"w": jnp.ones((1, 2))}, "head": {"w": jnp.ones((2, 1))}}
    batch = (jnp.ones((3, 1)), jnp.ones((3, 1)))
    with pytest.raises(ValueError, match="matches no parameter"):
        learner.adapt(params, batch)


def test_reptile_meta_grad_is_params_minus_mean_adapted(x64):
    params = mlp_params(jax.random.PRNGKey(8))
    tasks = regression_tasks(jax.random.PRNGKey(9), tasks=3, n=5)
    learner = mj.reptile(mlp_loss, inner_lr=0.05, inner_steps=3)
    grads, _ = learner.meta_grad(params, tasks)
    adapted = []
    for t in range(3):
        p = params
        support = jax.tree.map(lambda x, t=t: x[t], tasks.support)
        for _ in range(3):
            g = jax.grad(mlp_loss)(p, support)
            p = jax.tree.map(lambda a, b: a - 0.05 * b, p, g)
        adapted.append(p)
    mean_adapted = jax.tree.map(lambda *xs: sum(xs) / 3, *adapted)
    expected = jax.tree.map(lambda a, b: a - b, params, mean_adapted)
    chex.assert_trees_all_close(grads, expected, rtol=1e-10, atol=1e-12)


LEARNERS = {
    "maml": lambda: mj.maml(mlp_loss, 0.1, 2),
    "fomaml": lambda: mj.maml(mlp_loss, 0.1, 2, first_order=True),
    "metasgd": lambda: mj.metasgd(mlp_loss, 0.1, 2),
    "reptile": lambda: mj.reptile(mlp_loss, 0.1, 2),
}


class BatchTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_batch_mean_equals_single_task_mean(self):
        params = mlp_params(jax.random.PRNGKey(10), dtype=jnp.float32)
        tasks = regression_tasks(jax.random.PRNGKey(11), tasks=4, n=5, dtype=jnp.float32)
        for name, make in LEARNERS.items():
            learner = make()
            meta_params = learner.init(params)
            meta_grad = self.variant(learner.meta_grad)
            batch_grads, batch_metrics = meta_grad(meta_params, tasks)
            singles = [
                meta_grad(meta_params, jax.tree.map(lambda x, i=i: x[i : i + 1], tasks))
                for i in range(4)
            ]
            mean_grads = jax.tree.map(lambda *g: sum(g) / 4, *[s[0] for s in singles])
            mean_loss = sum(s[1]["meta_loss"] for s in singles) / 4
            chex.assert_trees_all_close(batch_grads, mean_grads, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(batch_metrics["meta_loss"], mean_loss, rtol=1e-5,
                                       err_msg=name)


def test_jit_equals_no_jit_and_has_aux():
    def loss_with_aux(params, batch):
        loss = mlp_loss(params, batch)
        return loss, {"rmse": jnp.sqrt(loss)}

    params = mlp_params(jax.random.PRNGKey(12), dtype=jnp.float32)
    tasks = regression_tasks(jax.random.PRNGKey(13), tasks=4, n=5, dtype=jnp.float32)
    learner = mj.maml(loss_with_aux, 0.1, 2, has_aux=True)
    plain = mj.maml(mlp_loss, 0.1, 2)
    grads, metrics = learner.meta_grad(params, tasks)
    jit_grads, jit_metrics = jax.jit(learner.meta_grad)(params, tasks)
    chex.assert_trees_all_close(grads, jit_grads, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(grads, plain.meta_grad(params, tasks)[0], rtol=1e-6)
    per_task = jax.vmap(lambda t: jnp.sqrt(mlp_loss(plain.adapt(params, t.support), t.query)))(
        tasks
    )
    np.testing.assert_allclose(metrics["aux"]["rmse"], jnp.mean(per_task), rtol=1e-5)
    np.testing.assert_allclose(jit_metrics["aux"]["rmse"], jnp.mean(per_task), rtol=1e-5)


def test_inner_optax_rule_matches_sgd():
    params = mlp_params(jax.random.PRNGKey(14), dtype=jnp.float32)
    tasks = regression_tasks(jax.random.PRNGKey(15), tasks=1, n=5, dtype=jnp.float32)
    support = jax.tree.map(lambda x: x[0], tasks.support)
    a, la = mj.inner.adapt(mlp_loss, params, support, 3, mj.inner.sgd(0.1))
    b, lb = mj.inner.adapt(mlp_loss, params, support, 3, mj.inner.from_optax(optax.sgd(0.1)))
    chex.assert_trees_all_close(a, b, rtol=1e-6)
    np.testing.assert_allclose(la, lb, rtol=1e-6)
    assert la.shape == (3,) and la[-1] < la[0]


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: mj.maml(mlp_loss, inner_lr=0.0), "inner_lr must be > 0"),
        (lambda: mj.maml(mlp_loss, inner_lr=-1.0), "inner_lr must be > 0"),
        (lambda: mj.maml(mlp_loss, 0.1, inner_steps=0), "inner_steps must be"),
        (lambda: mj.metasgd(mlp_loss, 0.1, inner_steps=2.5), "inner_steps must be"),
        (lambda: mj.reptile(mlp_loss, inner_lr=True), "real number"),
    ],
)
def test_bad_arguments_raise_early(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()


def test_remat_gives_the_same_gradient_with_less_memory():
    def wide_loss(params, batch):
        x, y = batch
        h = jnp.tanh(x @ params["w1"])
        h = jnp.tanh(h @ params["w2"])
        return jnp.mean((h @ params["w3"] - y) ** 2)

    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(16), 3)
    params = {
        "w1": jax.random.normal(k1, (1, 128)) * 0.5,
        "w2": jax.random.normal(k2, (128, 128)) / 12,
        "w3": jax.random.normal(k3, (128, 1)) / 12,
    }
    tasks = regression_tasks(jax.random.PRNGKey(17), tasks=2, n=256, dtype=jnp.float32)
    plain = mj.maml(wide_loss, 0.1, 20)
    remat = mj.maml(wide_loss, 0.1, 20, remat=True)
    chex.assert_trees_all_close(plain.meta_grad(params, tasks)[0],
                                remat.meta_grad(params, tasks)[0], rtol=1e-4, atol=1e-6)

    def temp_bytes(learner):
        compiled = jax.jit(learner.meta_grad).lower(params, tasks).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    assert temp_bytes(remat) < 0.5 * temp_bytes(plain)
