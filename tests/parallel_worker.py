"""Run by tests/test_parallel.py in a subprocess that sees 8 simulated CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=8``): meta-gradients, parameters after
20 meta-steps (on 2 and 8 devices) and a continual stream of 8 seeds, on 1, 2, 4 and 8
devices and without a mesh. Prints one JSON object: for each case and device count the
largest difference to the run without a mesh, relative to the largest magnitude of the
reference (so float32 rounding reads about 1e-7 whatever the scale)."""

from __future__ import annotations

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

import metajax as mj
from metajax.continual.er import er
from metajax.continual.learners import cross_entropy_loss
from metajax.continual.run import run
from metajax.train.loop import make_train_chunk
from metajax.train.parallel import device_mesh, replicate, task_parallel_meta_grad
from metajax.types import Stream, Task

COUNTS = (None, 1, 2, 4, 8)
# The 20-step training chunk, a second compile per device count, runs on these only: the
# meta-gradient is checked on every count, and a chunk only adds the optimiser around it.
TRAIN_COUNTS = (None, 2, 8)
BATCH = 8


def rel_diff(tree, reference) -> float:
    worst = 0.0
    for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(reference), strict=True):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        worst = max(worst, float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-30)))
    return worst


def mlp_regression():
    """Sinusoid-like regression with a 1-40-40-1 tanh MLP (MAML's setting)."""
    def init(key):
        k1, k2, k3 = jax.random.split(key, 3)
        return {"w1": jax.random.normal(k1, (1, 40)), "b1": jnp.zeros(40),
                "w2": jax.random.normal(k2, (40, 40)) / 6.3, "b2": jnp.zeros(40),
                "w3": jax.random.normal(k3, (40, 1)) / 6.3, "b3": jnp.zeros(1)}

    def loss(p, batch):
        x, y = batch
        h = jnp.tanh(x @ p["w1"] + p["b1"])
        h = jnp.tanh(h @ p["w2"] + p["b2"])
        return jnp.mean((h @ p["w3"] + p["b3"] - y) ** 2)

    def sample_task(key):
        ka, kp, kx = jax.random.split(key, 3)
        amp = jax.random.uniform(ka, (), minval=0.1, maxval=5.0)
        phase = jax.random.uniform(kp, (), maxval=jnp.pi)
        x = jax.random.uniform(kx, (20, 1), minval=-5.0, maxval=5.0)
        y = amp * jnp.sin(x - phase)
        return Task((x[:10], y[:10]), (x[10:], y[10:]))

    return init, loss, sample_task


def linear_regression():
    """Linear regression tasks: a convex support loss, so iMAML's backward system
    ``I + H / lam`` is positive definite and its conjugate-gradient solve is well posed."""
    dim = 6

    def init(key):
        return {"w": jax.random.normal(key, (dim, 1)) * 0.1, "b": jnp.zeros(1)}

    def loss(p, batch):
        x, y = batch
        return jnp.mean((x @ p["w"] + p["b"] - y) ** 2)

    def sample_task(key):
        kw, kx, kn = jax.random.split(key, 3)
        w = jax.random.normal(kw, (dim, 1))
        x = jax.random.normal(kx, (20, dim))
        y = x @ w + 0.1 * jax.random.normal(kn, (20, 1))
        return Task((x[:10], y[:10]), (x[10:], y[10:]))

    return init, loss, sample_task


def meta_cases():
    init, loss, sample = mlp_regression()
    yield "maml", mj.maml(loss, 0.01, 2), init, sample, COUNTS
    # MAML++'s schedules of the meta-step (multi-step-loss weights, first order for the first
    # 10 steps) on the extremes only, to keep the test short.
    yield "mamlpp", mj.mamlpp(loss, 0.01, 2, step_weights=lambda s: mj.msl_weights(
        2, s // 5, 2), first_order=lambda s: (s < 10).astype(jnp.float32)), init, sample, \
        (None, 8)
    init, loss, sample = linear_regression()
    yield "imaml", mj.imaml(loss, 0.05, 10, lam=2.0, cg_steps=5), init, sample, COUNTS


def check_meta() -> dict:
    out = {}
    optimizer = optax.adam(1e-3)
    key = jax.random.PRNGKey(0)
    for name, learner, init, sample, counts in meta_cases():
        results = {}
        for count in counts:
            mesh = None if count is None else device_mesh(count)
            params = learner.init(init(key))
            grad_fn = jax.jit(task_parallel_meta_grad(learner, sample, BATCH, mesh))
            grads, metrics = grad_fn(*replicate((params, key, jnp.int32(0)), mesh))
            final = logged = None
            if count in TRAIN_COUNTS:
                chunk = make_train_chunk(learner, optimizer, sample, BATCH, mesh=mesh)
                state = replicate((params, optimizer.init(params), key), mesh)
                final, _, logged = chunk(*state, jnp.int32(0), 20)
                logged = logged["meta_loss"]
            results[count] = jax.device_get((grads, final, logged))
        base = results[None]
        out[name] = {str(c): {"grads": rel_diff(r[0], base[0])}
                     | ({} if r[1] is None else {"params": rel_diff(r[1], base[1]),
                                                 "losses": rel_diff(r[2], base[2])})
                     for c, r in results.items() if c is not None}
    return out


def check_continual() -> dict:
    rng = np.random.default_rng(0)
    tasks, n_train, n_test, features, classes = 3, 40, 50, 8, 3
    x = rng.normal(size=(tasks, n_train + n_test, features)).astype(np.float32)
    y = ((x[..., 0] > 0).astype(np.int32) + np.arange(tasks)[:, None]) % classes
    stream = Stream(x[:, :n_train], y[:, :n_train], x[:, n_train:], y[:, n_train:], classes)

    def apply_fn(p, inputs):
        return jax.nn.relu(inputs @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]

    def init(key):
        k1, k2 = jax.random.split(key)
        return {"w1": jax.random.normal(k1, (features, 16)) / 3, "b1": jnp.zeros(16),
                "w2": jax.random.normal(k2, (16, classes)) / 4, "b2": jnp.zeros(classes)}

    learner = er(cross_entropy_loss(apply_fn), optax.sgd(0.1), memory_size=20, replay_batch=5)
    results = {}
    for count in COUNTS:
        mesh = None if count is None else device_mesh(count)
        result = run(learner, stream, jax.random.PRNGKey(1), params=init, apply_fn=apply_fn,
                     batch_size=10, seeds=list(range(8)), mesh=mesh)
        results[count] = (result["acc_matrix"], result["train_metrics"]["loss"])
    base = results[None]
    return {str(c): {"acc_matrix": float(np.max(np.abs(r[0] - base[0]))),
                     "loss": rel_diff(r[1], base[1]),
                     "seeds_differ": bool(np.any(r[0][0] != r[0][1]))}
            for c, r in results.items() if c is not None}


if __name__ == "__main__":
    assert jax.device_count() == 8, jax.devices()
    which = sys.argv[1]
    print(json.dumps(check_meta() if which == "meta" else check_continual()))
