"""MAML++ switches: multi-step loss, derivative-order annealing, per-layer per-step rates."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_meta_grad import (
    finite_difference_grad,
    flat,
    mlp_loss,
    mlp_params,
    regression_tasks,
)

import metajax as mj


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


def test_final_step_weights_equal_plain_maml(x64):
    params = mlp_params(jax.random.PRNGKey(0))
    tasks = regression_tasks(jax.random.PRNGKey(1), tasks=3, n=5)
    plus = mj.mamlpp(mlp_loss, 0.1, 3, learnable_lrs=False)
    grads, metrics = plus.meta_grad(plus.init(params), tasks, step_weights=jnp.array([0, 0, 1.0]))
    expected, expected_metrics = mj.maml(mlp_loss, 0.1, 3).meta_grad(params, tasks)
    chex.assert_trees_all_close(grads.params, expected, rtol=1e-10)
    np.testing.assert_allclose(metrics["meta_loss"], expected_metrics["meta_loss"], rtol=1e-12)


def msl_objective(learner, weights, tasks):
    def f(meta_params):
        def one(task):
            losses = []
            for steps in range(1, len(weights) + 1):
                fast = learner.adapt(meta_params, task.support, inner_steps=steps)
                losses.append(mlp_loss(fast, task.query))
            return sum(w * loss for w, loss in zip(weights, losses, strict=True))

        return jnp.mean(jax.vmap(one)(tasks))

    return f


def test_multi_step_loss_and_lslr_match_finite_differences(x64):
    params = mlp_params(jax.random.PRNGKey(2))
    tasks = regression_tasks(jax.random.PRNGKey(3), tasks=2, n=5)
    learner = mj.mamlpp(mlp_loss, 0.1, 3)
    meta_params = learner.init(params)
    meta_params = meta_params._replace(
        inner_lrs=jax.tree.map(lambda v: v * jnp.array([1.0, 0.5, 2.0]), meta_params.inner_lrs)
    )
    weights = [0.2, 0.3, 0.5]
    grads, _ = learner.meta_grad(meta_params, tasks, step_weights=jnp.array(weights))
    fd = finite_difference_grad(jax.jit(msl_objective(learner, weights, tasks)), meta_params)
    np.testing.assert_allclose(flat(grads), fd, rtol=1e-6, atol=1e-8)
    assert np.abs(flat(grads.inner_lrs)).max() > 1e-4


def test_derivative_order_switch_without_recompiling(x64):
    params = mlp_params(jax.random.PRNGKey(4))
    tasks = regression_tasks(jax.random.PRNGKey(5), tasks=3, n=5)
    plus = mj.mamlpp(mlp_loss, 0.1, 2, multi_step_loss=False, learnable_lrs=False)
    meta_params = plus.init(params)
    step = jax.jit(lambda mp, t, fo: plus.meta_grad(mp, t, first_order=fo)[0])
    first = step(meta_params, tasks, jnp.float32(1.0))
    second = step(meta_params, tasks, jnp.float32(0.0))
    assert step._cache_size() == 1
    chex.assert_trees_all_close(
        first.params, mj.maml(mlp_loss, 0.1, 2, first_order=True).meta_grad(params, tasks)[0],
        rtol=1e-10,
    )
    expected_second = mj.maml(mlp_loss, 0.1, 2).meta_grad(params, tasks)[0]
    chex.assert_trees_all_close(second.params, expected_second, rtol=1e-10)
    assert np.abs(flat(first.params) - flat(second.params)).max() > 1e-4


def test_msl_weights_schedule():
    start = np.asarray(mj.msl_weights(5, 0, 10))
    np.testing.assert_allclose(start, np.full(5, 0.2), rtol=1e-6)
    middle = np.asarray(mj.msl_weights(5, 5, 10))
    np.testing.assert_allclose(middle[:4], 0.2 - 5 / 50, rtol=1e-6)
    np.testing.assert_allclose(middle.sum(), 1.0, rtol=1e-6)
    late = np.asarray(mj.msl_weights(5, 100, 10))
    np.testing.assert_allclose(late[:4], 0.03 / 5, rtol=1e-6)
    np.testing.assert_allclose(late[4], 1 - 4 * 0.03 / 5, rtol=1e-6)
    assert np.all(np.diff([mj.msl_weights(5, e, 10)[4] for e in range(12)]) >= 0)


def test_lslr_adapt_refuses_more_steps_than_rates():
    learner = mj.mamlpp(mlp_loss, 0.1, 2)
    meta_params = learner.init(mlp_params(jax.random.PRNGKey(6), dtype=jnp.float32))
    batch = (jnp.ones((3, 1)), jnp.ones((3, 1)))
    with pytest.raises(ValueError, match="exceeds the 2 steps"):
        learner.adapt(meta_params, batch, inner_steps=3)
