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
    # The switch is a branch, not a blend: first-order steps do not pay for second order.
    hlo = step.lower(meta_params, tasks, jnp.float32(1.0)).as_text()
    assert "stablehlo.case" in hlo or "stablehlo.if" in hlo


def test_schedules_given_at_construction_follow_the_meta_step(x64):
    """``step_weights`` and ``first_order`` as schedules of the meta-step, evaluated at the
    ``step`` meta_grad receives, equal passing their values per call."""
    params = mlp_params(jax.random.PRNGKey(6))
    tasks = regression_tasks(jax.random.PRNGKey(7), tasks=3, n=5)

    def weights_at(step):
        return mj.msl_weights(3, step // 10, 4)

    def first_order_at(step):
        return (step < 10).astype(jnp.float32)

    scheduled = mj.mamlpp(mlp_loss, 0.1, 3, step_weights=weights_at, first_order=first_order_at)
    plain = mj.mamlpp(mlp_loss, 0.1, 3)
    meta_params = scheduled.init(params)
    step = jax.jit(lambda mp, t, s: scheduled.meta_grad(mp, t, step=s)[0])
    for s in (0, 25):
        expected, _ = plain.meta_grad(meta_params, tasks, step_weights=weights_at(s),
                                      first_order=bool(s < 10))
        chex.assert_trees_all_close(step(meta_params, tasks, jnp.int32(s)), expected,
                                    rtol=1e-10)
    assert step._cache_size() == 1
    with pytest.raises(ValueError, match="step=step"):
        scheduled.meta_grad(meta_params, tasks)
    # Every learner takes the step, and those without schedules ignore it.
    for learner in (mj.maml(mlp_loss, 0.1, 1), mj.reptile(mlp_loss, 0.1, 1),
                    mj.imaml(mlp_loss, 0.1, 2)):
        with_step, _ = learner.meta_grad(learner.init(params), tasks, step=jnp.int32(3))
        without, _ = learner.meta_grad(learner.init(params), tasks)
        chex.assert_trees_all_close(with_step, without)


def test_msl_weights_schedule():
    start = np.asarray(mj.msl_weights(5, 0, 10))
    np.testing.assert_allclose(start, np.full(5, 0.2), rtol=1e-6)
    middle = np.asarray(mj.msl_weights(5, 5, 10))
    np.testing.assert_allclose(middle[:4], 0.2 - 5 / 50, rtol=1e-6)
    np.testing.assert_allclose(middle.sum(), 1.0, rtol=1e-6)
    # The floor binds in the last 3% of the annealing (here epochs 98 and 99 of 100).
    floored = np.asarray(mj.msl_weights(5, 98, 100))
    np.testing.assert_allclose(floored[:4], 0.03 / 5, rtol=1e-6)
    np.testing.assert_allclose(floored[4], 1 - 4 * 0.03 / 5, rtol=1e-6)
    # After the annealing epochs only the final step's loss counts (the released code).
    for epoch in (10, 11, 100):
        np.testing.assert_array_equal(mj.msl_weights(5, epoch, 10), [0, 0, 0, 0, 1])
    np.testing.assert_allclose(mj.msl_weights(5, 9, 10)[:4], 0.2 - 9 / 50, rtol=1e-6)
    assert np.all(np.diff([mj.msl_weights(5, e, 10)[4] for e in range(12)]) >= 0)


def test_lslr_adapt_refuses_more_steps_than_rates():
    learner = mj.mamlpp(mlp_loss, 0.1, 2)
    meta_params = learner.init(mlp_params(jax.random.PRNGKey(6), dtype=jnp.float32))
    batch = (jnp.ones((3, 1)), jnp.ones((3, 1)))
    with pytest.raises(ValueError, match="exceeds the 2 steps"):
        learner.adapt(meta_params, batch, inner_steps=3)


# --- BNWB: per-step batch-norm weights ----------------------------------------------------


def bn_params(key, hidden=4, dtype=jnp.float64):
    k1, k2, k3 = jax.random.split(key, 3)
    return {
        "dense": {"kernel": jax.random.normal(k1, (1, hidden), dtype),
                  "bias": 0.1 * jax.random.normal(k3, (hidden,), dtype)},
        "norm0": {"scale": jnp.ones((hidden,), dtype), "bias": jnp.zeros((hidden,), dtype)},
        "head": {"kernel": jax.random.normal(k2, (hidden, 1), dtype) / np.sqrt(hidden)},
    }


def bn_loss(params, batch):
    """Dense -> batch-statistics norm with scale/bias -> tanh -> linear head, MSE."""
    x, y = batch
    h = x @ params["dense"]["kernel"] + params["dense"]["bias"]
    mean = h.mean(axis=0)
    var = ((h - mean) ** 2).mean(axis=0)
    h = (h - mean) / jnp.sqrt(var + 1e-3) * params["norm0"]["scale"] + params["norm0"]["bias"]
    return jnp.mean((jnp.tanh(h) @ params["head"]["kernel"] - y) ** 2)


def manual_bnwb_objective(weights, tasks, steps):
    """MSL objective written out step by step: step i uses norm copy i for its support
    gradient (norm leaves not adapted) and for the query loss after it."""

    def f(meta_params):
        p, lrs = meta_params.params, meta_params.inner_lrs

        def one(task):
            adapted = {"dense": p["dense"], "head": p["head"]}
            total = 0.0
            for i in range(steps):
                norm_i = jax.tree.map(lambda leaf, i=i: leaf[i], p["norm0"])
                g = jax.grad(lambda a, n=norm_i: bn_loss({**a, "norm0": n}, task.support))(adapted)
                adapted = jax.tree.map(lambda a, g, r, i=i: a - r[i] * g, adapted, g,
                                       {"dense": lrs["dense"], "head": lrs["head"]})
                total = total + weights[i] * bn_loss({**adapted, "norm0": norm_i}, task.query)
            return total

        return jnp.mean(jax.vmap(one)(tasks))

    return f


def test_bnwb_tiles_only_the_norm_leaves(x64):
    params = bn_params(jax.random.PRNGKey(0))
    learner = mj.mamlpp(bn_loss, 0.1, 3, per_step=mj.meta.norm_mask)
    meta_params = learner.init(params)
    assert meta_params.params["norm0"]["scale"].shape == (3, 4)
    assert meta_params.params["norm0"]["bias"].shape == (3, 4)
    assert meta_params.params["dense"]["kernel"].shape == (1, 4)
    mask = mj.meta.norm_mask(params)
    assert mask["norm0"] == {"scale": True, "bias": True}
    assert mask["dense"] == {"kernel": False, "bias": False} and mask["head"]["kernel"] is False


def test_bnwb_meta_gradient_matches_finite_differences(x64):
    params = bn_params(jax.random.PRNGKey(4))
    tasks = regression_tasks(jax.random.PRNGKey(5), tasks=2, n=6)
    learner = mj.mamlpp(bn_loss, 0.1, 3, per_step=mj.meta.norm_mask)
    meta_params = learner.init(params)
    key = jax.random.PRNGKey(6)
    # Distinct copies per step, so a step reading the wrong copy would show.
    meta_params = meta_params._replace(params={
        **meta_params.params,
        "norm0": jax.tree.map(lambda v: v + 0.3 * jax.random.normal(key, v.shape, v.dtype),
                              meta_params.params["norm0"]),
    })
    weights = [0.2, 0.3, 0.5]
    grads, _ = learner.meta_grad(meta_params, tasks, step_weights=jnp.array(weights))
    fd = finite_difference_grad(jax.jit(manual_bnwb_objective(weights, tasks, 3)), meta_params)
    np.testing.assert_allclose(flat(grads), fd, rtol=1e-6, atol=1e-8)
    # The rates of the norm leaves are never used: their gradient is exactly zero.
    assert not np.any(np.asarray(grads.inner_lrs["norm0"]["scale"]))


def test_bnwb_first_order_final_loss_reaches_only_the_last_copy(x64):
    params = bn_params(jax.random.PRNGKey(7))
    tasks = regression_tasks(jax.random.PRNGKey(8), tasks=2, n=6)
    learner = mj.mamlpp(bn_loss, 0.1, 3, multi_step_loss=False, per_step=mj.meta.norm_mask)
    grads, _ = learner.meta_grad(learner.init(params), tasks, first_order=True)
    scale = np.asarray(grads.params["norm0"]["scale"])
    # Copies 0 and 1 enter only through inner gradients, which first order treats as constants.
    np.testing.assert_array_equal(scale[:2], 0.0)
    assert np.all(np.abs(scale[2]) > 0)
    second, _ = learner.meta_grad(learner.init(params), tasks, first_order=False)
    assert np.all(np.abs(np.asarray(second.params["norm0"]["scale"])[:2]).sum(axis=1) > 0)


def test_bnwb_adapt_uses_the_copy_of_the_last_step(x64):
    params = bn_params(jax.random.PRNGKey(9))
    tasks = regression_tasks(jax.random.PRNGKey(10), tasks=1, n=6)
    support = jax.tree.map(lambda a: a[0], tasks.support)
    learner = mj.mamlpp(bn_loss, 0.1, 3, per_step=mj.meta.norm_mask)
    meta_params = learner.init(params)
    copies = jnp.arange(3.0)[:, None] + jnp.ones((3, 4))
    meta_params = meta_params._replace(params={
        **meta_params.params, "norm0": {"scale": copies, "bias": 0 * copies}})
    for steps in (1, 2, 3):
        fast = learner.adapt(meta_params, support, inner_steps=steps)
        np.testing.assert_array_equal(fast["norm0"]["scale"], copies[steps - 1])
        assert fast["dense"]["kernel"].shape == (1, 4)
    with pytest.raises(ValueError, match="exceeds the 3 steps"):
        learner.adapt(meta_params, support, inner_steps=4)


def test_norm_mask_on_conv4_selects_the_four_norm_layers():
    from metajax.nn.conv4 import Conv4

    model = Conv4(num_classes=5)
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((2, 28, 28, 1)))
    mask = mj.meta.norm_mask(params)
    chosen = [jax.tree_util.keystr(path) for path, m in
              jax.tree_util.tree_flatten_with_path(mask)[0] if m]
    assert len(chosen) == 8 and all("norm" in c for c in chosen)


def test_frozen_leaves_are_meta_learned_but_never_adapted(x64):
    """frozen=norm_mask: normalisation leaves keep their meta-values through the inner loop
    (the reference never adapts batch-norm scale and bias) yet get a meta-gradient."""

    def loss(params, batch):
        x, y = batch
        h = jnp.tanh(x @ params["dense"]["w"])
        h = h * params["norm0"]["scale"] + params["norm0"]["bias"]
        return jnp.mean((h.sum(-1) - y) ** 2)

    keys = jax.random.split(jax.random.PRNGKey(8), 3)
    params = {"dense": {"w": jax.random.normal(keys[0], (2, 3), jnp.float64)},
              "norm0": {"scale": jnp.ones(3, jnp.float64), "bias": jnp.zeros(3, jnp.float64)}}
    x = jax.random.normal(keys[1], (2, 6, 2), jnp.float64)
    y = jax.random.normal(keys[2], (2, 6), jnp.float64)
    tasks = mj.Task(support=(x[:, :3], y[:, :3]), query=(x[:, 3:], y[:, 3:]))
    for learnable_lrs in (False, True):
        learner = mj.mamlpp(loss, 0.1, 2, multi_step_loss=False, learnable_lrs=learnable_lrs,
                            frozen=mj.norm_mask)
        meta_params = learner.init(params)
        task = jax.tree.map(lambda a: a[0], tasks)
        fast = learner.adapt(meta_params, task.support)
        chex.assert_trees_all_equal(fast["norm0"], params["norm0"])
        assert not np.allclose(fast["dense"]["w"], params["dense"]["w"])
        grads, _ = learner.meta_grad(meta_params, tasks)

        # The same objective by hand: only w adapts, norm0 enters as a constant of the loop.
        def objective(p):
            total = 0.0
            for t in range(2):
                w = p["dense"]["w"]
                for _ in range(2):
                    w = w - 0.1 * jax.grad(lambda w_, t=t: loss({**p, "dense": {"w": w_}},
                                                          (x[t, :3], y[t, :3])))(w)
                total += loss({**p, "dense": {"w": w}}, (x[t, 3:], y[t, 3:]))
            return total / 2

        expected = jax.grad(objective)(params)
        chex.assert_trees_all_close(grads.params, expected, rtol=1e-10)
        assert np.any(np.abs(np.asarray(grads.params["norm0"]["scale"])) > 1e-6)
