"""The inner loop: optax inner optimisers differentiated to second order, what ``adapt``
returns, and the task axis every meta-learner's ``meta_grad`` requires."""

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_meta_grad import finite_difference_grad, flat  # the suite's float64 FD helpers

import metajax as mj


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


def mlp_loss(params, batch):
    x, y = batch
    h = jnp.tanh(x @ params["w1"] + params["b1"])
    return jnp.mean((h @ params["w2"] + params["b2"] - y) ** 2)


def mlp_params(key, hidden=3, dtype=jnp.float64):
    k1, k2, k3 = jax.random.split(key, 3)
    return {
        "w1": jax.random.normal(k1, (2, hidden), dtype),
        "b1": 0.1 * jax.random.normal(k3, (hidden,), dtype),
        "w2": jax.random.normal(k2, (hidden, 1), dtype) / np.sqrt(hidden),
        "b2": jnp.zeros((1,), dtype),
    }


def tasks_with_a_dead_feature(key, tasks=2, n=5, dtype=jnp.float64):
    """Regression tasks whose second input feature is 0 on the support set and not on the
    query set: the support gradient of ``w1[1]`` is exactly 0 at every inner step (where
    ``optax.adam``'s derivative is NaN), and the query loss still depends on it."""
    ka, kx, kz = jax.random.split(key, 3)
    a = jax.random.uniform(ka, (tasks, 1, 1), dtype, 0.5, 2.0)
    x = jax.random.uniform(kx, (tasks, 2 * n, 1), dtype, -2.0, 2.0)
    z = jax.random.uniform(kz, (tasks, 2 * n, 1), dtype, -1.0, 1.0).at[:, :n].set(0.0)
    y = a * jnp.sin(x) + 0.3 * z
    x = jnp.concatenate([x, z], axis=-1)
    return mj.Task((x[:, :n], y[:, :n]), (x[:, n:], y[:, n:]))


def meta_objective(rule, steps, tasks):
    """The mean query loss after ``steps`` steps of ``rule`` from the meta-parameters."""

    def f(meta_params):
        def one(task):
            fast, _ = mj.inner.adapt(mlp_loss, meta_params, task.support, steps, rule)
            return mlp_loss(fast, task.query)

        return jnp.mean(jax.vmap(one)(tasks))

    return f


OPTIMISERS = {
    "adam_eps_root": lambda: optax.adam(0.05, eps_root=1e-8),
    "rmsprop": lambda: optax.rmsprop(0.01),
    "sgd_momentum": lambda: optax.sgd(0.1, momentum=0.9),
}


@pytest.mark.parametrize("steps", [2, 3])
@pytest.mark.parametrize("name", sorted(OPTIMISERS))
def test_optax_meta_gradient_matches_finite_differences(x64, name, steps):
    """Second-order meta-gradients through optax inner optimisers, with support-gradient
    entries exactly 0, against float64 central differences."""
    params = mlp_params(jax.random.PRNGKey(0))
    tasks = tasks_with_a_dead_feature(jax.random.PRNGKey(1))
    support_grad = jax.grad(mlp_loss)(params, jax.tree.map(lambda a: a[0], tasks.support))
    assert np.all(np.asarray(support_grad["w1"][1]) == 0.0)  # the case the probe is about
    f = meta_objective(mj.inner.from_optax(OPTIMISERS[name]()), steps, tasks)
    grads = jax.grad(f)(params)
    assert np.all(np.isfinite(flat(grads)))
    assert np.all(np.asarray(grads["w1"][1]) != 0.0)  # the query reaches the dead feature
    fd = finite_difference_grad(jax.jit(f), params)
    np.testing.assert_allclose(flat(grads), fd, rtol=1e-6, atol=1e-8)


def test_plain_adam_meta_gradient_is_nan_which_is_why_it_is_refused(x64):
    """Without the probe (``check=False``), ``optax.adam`` without ``eps_root`` gives NaN in
    every leaf of the meta-gradient (d sqrt(nu) / d nu = inf times d nu / d g = 0), while the
    inner loop's values are finite."""
    params = mlp_params(jax.random.PRNGKey(0))
    tasks = tasks_with_a_dead_feature(jax.random.PRNGKey(1))
    f = meta_objective(mj.inner.from_optax(optax.adam(0.05), check=False), 2, tasks)
    value, grads = jax.value_and_grad(f)(params)
    assert np.isfinite(value)
    assert all(np.isnan(np.asarray(leaf)).any() for leaf in jax.tree.leaves(grads))
    with pytest.raises(ValueError, match=r"pass eps_root=1e-8 to optax\.adam"):
        mj.inner.from_optax(optax.adam(0.05))


@pytest.mark.parametrize("make", [
    lambda: optax.adam(1e-2),
    lambda: optax.adamw(1e-2),
    lambda: optax.nadam(1e-2),
    lambda: optax.amsgrad(1e-2),
    lambda: optax.radam(1e-2),
    lambda: optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-2)),
    lambda: optax.inject_hyperparams(optax.adam)(learning_rate=1e-2),
])
def test_optimisers_without_eps_root_are_refused_naming_the_fix(make):
    with pytest.raises(ValueError, match=r"gradient entry is exactly 0.*pass eps_root=1e-8 "
                                         r"to optax\.adam.*check=False"):
        mj.inner.from_optax(make())


@pytest.mark.parametrize("make", [lambda: optax.lars(1e-2), lambda: optax.novograd(1e-2),
                                  lambda: optax.lamb(1e-2, eps_root=1e-8)])
def test_per_tensor_norms_are_refused_on_a_zero_leaf(make):
    with pytest.raises(ValueError, match="whole gradient leaf is exactly 0"):
        mj.inner.from_optax(make())


@pytest.mark.parametrize("make", [
    lambda: optax.adam(1e-2, eps_root=1e-8),
    lambda: optax.adamw(1e-2, eps_root=1e-8),
    lambda: optax.rmsprop(1e-2),
    lambda: optax.rmsprop(1e-2, centered=True, momentum=0.9),
    lambda: optax.sgd(0.1),
    lambda: optax.sgd(0.1, momentum=0.9, nesterov=True),
    lambda: optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-2, eps_root=1e-8)),
])
def test_differentiable_optimisers_are_accepted(make):
    rule = mj.inner.from_optax(make())
    assert isinstance(rule, mj.inner.UpdateRule)


def test_optimisers_the_probe_cannot_run():
    # lbfgs needs value= and grad= in update: the inner loop cannot give them.
    with pytest.raises(ValueError, match="could not run tx on its probe.*value="):
        mj.inner.from_optax(optax.lbfgs())
    # A pytree mask needs the parameters' structure: given as example_params, it is probed.
    params = {"w": jnp.ones((2, 3)), "b": jnp.ones(3)}
    masked = optax.masked(optax.adam(1e-2, eps_root=1e-8), {"w": True, "b": False})
    with pytest.raises(ValueError, match="example_params=params"):
        mj.inner.from_optax(masked)
    mj.inner.from_optax(masked, example_params=params)
    with pytest.raises(ValueError, match="pass eps_root=1e-8"):
        mj.inner.from_optax(optax.masked(optax.adam(1e-2), {"w": True, "b": False}),
                            example_params=jax.tree.map(
                                lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params))


def test_the_probe_runs_under_jit():
    @jax.jit
    def f(x):
        mj.inner.from_optax(optax.adam(1e-2, eps_root=1e-8), example_params={"x": x})
        return 2 * x

    np.testing.assert_array_equal(f(jnp.ones(3)), 2 * jnp.ones(3))
    @jax.jit
    def g(x):
        mj.inner.from_optax(optax.adam(1e-2), example_params=x)
        return x

    with pytest.raises(ValueError, match="pass eps_root=1e-8"):
        g(jnp.ones(3))


def test_adapt_returns_fast_params_and_the_support_loss_before_each_step(x64):
    params = mlp_params(jax.random.PRNGKey(2))
    task = jax.tree.map(lambda a: a[0], tasks_with_a_dead_feature(jax.random.PRNGKey(3)))
    lr, steps = 0.1, 3
    expected, expected_losses, after = params, [], []
    for _ in range(steps):
        loss, grads = jax.value_and_grad(mlp_loss)(expected, task.support)
        expected_losses.append(loss)
        expected = jax.tree.map(lambda p, g: p - lr * g, expected, grads)
        after.append(mlp_loss(expected, task.query))

    fast, losses = mj.inner.adapt(mlp_loss, params, task.support, steps, mj.inner.sgd(lr))
    assert losses.shape == (steps,) and losses.dtype == jnp.float64
    np.testing.assert_allclose(losses, expected_losses, rtol=1e-12)
    np.testing.assert_allclose(flat(fast), flat(expected), rtol=1e-12)
    # The loss at the fast parameters is not among the losses.
    assert float(mlp_loss(fast, task.support)) < float(losses[-1])

    with_aux = mj.inner.adapt(lambda p, b: (mlp_loss(p, b), {"unused": 1.0}), params,
                              task.support, steps, mj.inner.sgd(lr), has_aux=True)
    np.testing.assert_allclose(with_aux[1], expected_losses, rtol=1e-12)

    fast3, losses3, values = mj.inner.adapt(mlp_loss, params, task.support, steps,
                                            mj.inner.sgd(lr),
                                            after_step=lambda p: mlp_loss(p, task.query))
    assert values.shape == (steps,)
    np.testing.assert_allclose(values, after, rtol=1e-12)
    np.testing.assert_allclose(losses3, expected_losses, rtol=1e-12)
    np.testing.assert_allclose(flat(fast3), flat(expected), rtol=1e-12)

    same, none = mj.inner.adapt(mlp_loss, params, task.support, 0, mj.inner.sgd(lr))
    assert none.shape == (0,)
    np.testing.assert_array_equal(flat(same), flat(params))


def linear_loss(params, batch):
    x, y = batch
    return jnp.mean((x @ params["w"] + params["b"] - y) ** 2)


LEARNERS = {
    "maml": lambda: mj.maml(linear_loss, 0.1, 2),
    "metasgd": lambda: mj.metasgd(linear_loss, 0.1, 2),
    "reptile": lambda: mj.reptile(linear_loss, 0.1, 2),
    "mamlpp": lambda: mj.mamlpp(linear_loss, 0.1, 2),
    "imaml": lambda: mj.imaml(linear_loss, 0.1, 2),
}


def one_task(key, shots, queries, label_axis=True):
    """One regression task without a task axis: ``x [n, 2]``, ``y [n, 1]`` (``y [n]``
    without ``label_axis``, as integer labels would be)."""
    x = jax.random.normal(key, (shots + queries, 2))
    y = jnp.sin(x[:, :1]) if label_axis else jnp.sin(x[:, 0])
    return mj.Task((x[:shots], y[:shots]), (x[shots:], y[shots:]))


@pytest.mark.parametrize("name", sorted(LEARNERS))
def test_meta_grad_refuses_tasks_without_a_task_axis(name):
    learner = LEARNERS[name]()
    meta_params = learner.init({"w": jnp.zeros((2, 1)), "b": jnp.zeros((1,))})
    stack = r"stack tasks on a leading axis, e\.g\. jax\.tree\.map\(lambda a: a\[None\], task\)"
    # Support and query sizes differ (5 and 10): the leading sizes disagree.
    task = one_task(jax.random.PRNGKey(0), 5, 10)
    with pytest.raises(ValueError, match=r"leading sizes \[5, 10\].*" + stack):
        learner.meta_grad(meta_params, task)
    # Equal sizes, but y [6] has no room for a task axis and an example axis.
    task = one_task(jax.random.PRNGKey(1), 6, 6, label_axis=False)
    with pytest.raises(ValueError, match=r"\['support\[1\]', 'query\[1\]'\].*" + stack):
        learner.meta_grad(meta_params, task)
    # Tasks stacked unevenly: 3 supports, 2 queries.
    tasks = jax.tree.map(lambda *a: jnp.stack(a), *[one_task(jax.random.PRNGKey(i), 4, 4)
                                                    for i in range(3)])
    uneven = mj.Task(tasks.support, jax.tree.map(lambda a: a[:2], tasks.query))
    with pytest.raises(ValueError, match=r"leading sizes \[2, 3\]"):
        learner.meta_grad(meta_params, uneven)
    # The fix the message names: one task with a leading axis of 1.
    one = jax.tree.map(lambda a: a[None], one_task(jax.random.PRNGKey(0), 5, 10))
    grads, metrics = learner.meta_grad(meta_params, one)
    assert np.isfinite(metrics["meta_loss"])
    assert jax.tree.structure(grads) == jax.tree.structure(meta_params)


def test_maml_meta_grad_of_one_stacked_task_is_that_task_s_gradient():
    learner = LEARNERS["maml"]()
    params = {"w": jnp.array([[0.3], [-0.2]]), "b": jnp.array([0.1])}
    task = one_task(jax.random.PRNGKey(4), 5, 10)
    grads, _ = learner.meta_grad(params, jax.tree.map(lambda a: a[None], task))
    expected = jax.grad(lambda p: linear_loss(learner.adapt(p, task.support), task.query))(
        params)
    np.testing.assert_allclose(flat(grads), flat(expected), rtol=1e-6)
