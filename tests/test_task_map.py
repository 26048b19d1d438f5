"""Task-axis execution (vmap, scan, chunks) gives the same meta-gradients and metrics."""

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

import metajax as mj
from metajax.task_map import (
    check_task_map,
    map_tasks,
    mean_over_tasks,
    mean_value_and_grad,
    resolve_task_map,
    sum_over_tasks,
)


def loss_fn(params, batch):
    x, y = batch
    h = jnp.tanh(x @ params["w1"] + params["b1"])
    return jnp.mean((h @ params["w2"] + params["b2"] - y) ** 2)


def norm_loss(params, batch):
    """A loss with a leaf MAML++'s per-step mask can select (``norm`` in its path)."""
    x, y = batch
    h = jnp.tanh(x @ params["w1"] + params["b1"]) * params["norm"]["scale"]
    return jnp.mean((h @ params["w2"] + params["b2"] - y) ** 2)


def make_params(key, hidden=5):
    k1, k2, k3 = jax.random.split(key, 3)
    return {
        "w1": jax.random.normal(k1, (1, hidden)),
        "b1": 0.1 * jax.random.normal(k3, (hidden,)),
        "w2": jax.random.normal(k2, (hidden, 1)) / np.sqrt(hidden),
        "b2": jnp.zeros((1,)),
        "head": {"kernel": jnp.ones((1,))},
        "norm": {"scale": jnp.ones((hidden,))},
    }


def make_tasks(key, tasks=7, n=6):
    ka, kb, kx = jax.random.split(key, 3)
    a = jax.random.uniform(ka, (tasks, 1, 1), minval=0.5, maxval=2.0)
    b = jax.random.uniform(kb, (tasks, 1, 1), minval=0.0, maxval=3.0)
    x = jax.random.uniform(kx, (tasks, 2 * n, 1), minval=-3.0, maxval=3.0)
    y = a * jnp.sin(x + b)
    return mj.Task((x[:, :n], y[:, :n]), (x[:, n:], y[:, n:]))


def head_loss(params, batch):
    x, y = batch
    h = jnp.tanh(x @ params["w1"] + params["b1"])
    return jnp.mean((h @ params["w2"] * params["head"]["kernel"] + params["b2"] - y) ** 2)


LEARNERS = {
    "maml": lambda tm: mj.maml(loss_fn, 0.1, 2, task_map=tm),
    "fomaml": lambda tm: mj.maml(loss_fn, 0.1, 2, first_order=True, task_map=tm),
    "anil": lambda tm: mj.anil(head_loss, 0.1, 2, task_map=tm),
    "metasgd": lambda tm: mj.metasgd(loss_fn, 0.1, 2, task_map=tm),
    "reptile": lambda tm: mj.reptile(loss_fn, 0.1, 3, task_map=tm),
    "imaml": lambda tm: mj.imaml(loss_fn, 0.05, 8, lam=2.0, cg_steps=5, task_map=tm),
    "mamlpp": lambda tm: mj.mamlpp(norm_loss, 0.1, 2, per_step=mj.norm_mask, task_map=tm),
}


def flat(tree):
    return np.asarray(jax.flatten_util.ravel_pytree(tree)[0])


CASES = [(name, tm) for name in sorted(LEARNERS) for tm in ("scan", 3)] + [
    ("maml", tm) for tm in (1, 4, 7, 100)  # chunks: exact, with a remainder, one, oversized
]


@pytest.mark.parametrize(("name", "task_map"), CASES)
def test_meta_grad_same_for_every_task_map(name, task_map):
    tasks = make_tasks(jax.random.PRNGKey(1))
    reference = LEARNERS[name]("vmap")
    learner = LEARNERS[name](task_map)
    meta_params = reference.init(make_params(jax.random.PRNGKey(0)))
    want_g, want_m = jax.jit(reference.meta_grad)(meta_params, tasks)
    got_g, got_m = jax.jit(learner.meta_grad)(meta_params, tasks)
    assert jax.tree.structure(got_g) == jax.tree.structure(want_g)
    np.testing.assert_allclose(flat(got_g), flat(want_g), rtol=2e-5, atol=2e-6)
    assert set(got_m) == set(want_m)
    for key in want_m:
        np.testing.assert_allclose(np.asarray(got_m[key]), np.asarray(want_m[key]), rtol=2e-5,
                                   atol=1e-6)
    # not a constant: the gradient moves with the tasks
    other, _ = jax.jit(learner.meta_grad)(meta_params, make_tasks(jax.random.PRNGKey(2)))
    assert np.abs(flat(other) - flat(got_g)).max() > 1e-4


def test_mamlpp_traced_first_order_with_scan():
    tasks = make_tasks(jax.random.PRNGKey(3), tasks=4)
    scan = LEARNERS["mamlpp"]("scan")
    vmap = LEARNERS["mamlpp"]("vmap")
    meta_params = scan.init(make_params(jax.random.PRNGKey(0)))
    for order in (0.0, 1.0):
        got, _ = jax.jit(scan.meta_grad)(meta_params, tasks, first_order=jnp.float32(order))
        want, _ = vmap.meta_grad(meta_params, tasks, first_order=bool(order))
        np.testing.assert_allclose(flat(got), flat(want), rtol=2e-5, atol=2e-6)


def test_maml_scan_grad_matches_finite_differences():
    """The scan path is differentiated for real: check it against central differences."""
    with jax.enable_x64(True):
        tasks = jax.tree.map(lambda x: x.astype(jnp.float64), make_tasks(jax.random.PRNGKey(4),
                                                                          tasks=3))
        params = jax.tree.map(lambda x: x.astype(jnp.float64), make_params(jax.random.PRNGKey(5)))
        learner = mj.maml(loss_fn, 0.1, 2, task_map="scan")
        grads, metrics = learner.meta_grad(params, tasks)
        flat_p, unravel = jax.flatten_util.ravel_pytree(params)

        loss_of = jax.jit(lambda p: learner.meta_grad(unravel(p), tasks)[1]["meta_loss"])

        def meta_loss(p):
            return float(loss_of(p))

        eps = 1e-6
        fd = np.array([
            (meta_loss(flat_p.at[i].add(eps)) - meta_loss(flat_p.at[i].add(-eps))) / (2 * eps)
            for i in range(flat_p.shape[0])
        ])
        np.testing.assert_allclose(flat(grads), fd, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("task_map", ["vmap", "scan", 2, 3, 5])
def test_sum_mean_map_over_tasks(task_map):
    xs = {"a": jnp.arange(10.0).reshape(5, 2), "b": jnp.arange(5)}

    def fn(t):
        return {"sq": jnp.sum(t["a"] ** 2), "b": t["b"] * 2}

    total = sum_over_tasks(fn, xs, task_map)
    np.testing.assert_allclose(total["sq"], np.sum(np.arange(10.0) ** 2))
    assert int(total["b"]) == 20
    mean = mean_over_tasks(fn, xs, task_map)
    np.testing.assert_allclose(mean["b"], 4.0)
    mapped = map_tasks(fn, xs, task_map)
    np.testing.assert_allclose(mapped["sq"], np.sum(np.arange(10.0).reshape(5, 2) ** 2, axis=1))


def test_mean_value_and_grad_closed_form():
    # objective (w . x_i)^2 / 2: gradient mean_i (w . x_i) x_i
    xs = jax.random.normal(jax.random.PRNGKey(0), (5, 3))
    w = jnp.array([0.5, -1.0, 2.0])

    def objective(w, x):
        v = jnp.dot(w, x)
        return 0.5 * v**2, {"v": v}

    for task_map in ("vmap", "scan", 2):
        (loss, aux), g = mean_value_and_grad(objective, w, xs, task_map)
        v = xs @ w
        np.testing.assert_allclose(loss, np.mean(0.5 * v**2), rtol=1e-6)
        np.testing.assert_allclose(aux["v"], np.mean(v), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(g, (v[:, None] * xs).mean(0), rtol=1e-5, atol=1e-6)


def test_bad_task_maps_are_refused():
    for bad in (0, -1, "pmap", True, 1.5):
        with pytest.raises(ValueError, match="task_map"):
            check_task_map(bad)
    with pytest.raises(ValueError, match="task_map"):
        mj.maml(loss_fn, 0.1, task_map="loop")
    with pytest.raises(ValueError, match="task_map"):
        mj.reptile(loss_fn, 0.1, task_map=0)
    assert resolve_task_map("auto", "cpu") == "scan"
    assert resolve_task_map("auto", "gpu") == "vmap"
    assert resolve_task_map(4) == 4


def test_mismatched_task_axes_are_refused():
    xs = {"a": jnp.zeros((3, 2)), "b": jnp.zeros((4,))}
    with pytest.raises(ValueError, match="task axis"):
        sum_over_tasks(lambda t: t["a"].sum(), xs, "scan")
