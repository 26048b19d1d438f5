"""Compiled once: the Omniglot meta-step across steps, a continual task across tasks; and the
continual memories updated in place (no copy of a whole memory per step)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import metajax as mj
from metajax.continual.agem import agem
from metajax.continual.er import er
from metajax.continual.learners import cross_entropy_loss
from metajax.continual.run import run
from metajax.nn.conv4 import conv4_omniglot
from metajax.nn.mlp import MLP
from metajax.train.loop import make_train_chunk
from metajax.types import Stream


class CompileCounter:
    """Counts XLA backend compilations while active (of functions named ``only``, if set)."""

    def __init__(self):
        self.count = 0
        self.active = False
        self.only = None
        jax.monitoring.register_event_duration_secs_listener(self._listen)

    def _listen(self, name, duration, **kwargs):
        if self.active and name == "/jax/core/compile/backend_compile_duration":
            if self.only is None or kwargs.get("fun_name") == self.only:
                self.count += 1

    def __call__(self, only=None):
        self.only = only
        return self

    def __enter__(self):
        self.count, self.active = 0, True
        return self

    def __exit__(self, *exc):
        self.active = False


@pytest.fixture(scope="module")
def compiles():
    return CompileCounter()


def test_omniglot_meta_step_compiles_once(compiles):
    ways, shots, queries, tasks = 5, 1, 2, 4
    model = conv4_omniglot(ways, readout="mean")

    def loss_fn(params, batch):
        x, y = batch
        return optax.softmax_cross_entropy_with_integer_labels(model.apply(params, x), y).mean()

    def sample_task(key):
        x = jax.random.uniform(key, (ways * (shots + queries), 28, 28, 1))
        y = jnp.tile(jnp.arange(ways), shots + queries)
        return mj.Task((x[: ways * shots], y[: ways * shots]),
                       (x[ways * shots:], y[ways * shots:]))

    learner = mj.maml(loss_fn, 0.4, 1)
    optimizer = optax.adam(1e-3)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)))
    opt_state = optimizer.init(params)
    chunk = make_train_chunk(learner, optimizer, sample_task, tasks)
    key = jax.random.PRNGKey(1)
    with compiles() as first:
        params, opt_state, metrics = chunk(params, opt_state, key, jnp.int32(0), length=2)
        jax.block_until_ready(params)
    assert first.count >= 1
    with compiles() as later:
        for start in (2, 4, 6):
            params, opt_state, metrics = chunk(params, opt_state, key, jnp.int32(start),
                                               length=2)
        jax.block_until_ready(params)
    assert later.count == 0, f"{later.count} compilations after the first chunk"
    assert np.all(np.isfinite(np.asarray(metrics["meta_loss"])))


def _stream(tasks, rows=40, features=12, classes=4, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.random((tasks, rows, features), dtype=np.float32)
    y = rng.integers(0, classes, (tasks, rows)).astype(np.int32)
    return Stream(x, y, x[:, :10], y[:, :10], classes)


def _mlp(classes=4):
    module = MLP(hidden=(16,), outputs=classes)
    return module, (lambda key: module.init(key, jnp.zeros((1, 12))))


@pytest.mark.parametrize("name", ["er", "agem"])
def test_continual_task_compiles_once_whatever_the_number_of_tasks(compiles, name):
    module, init = _mlp()
    loss = cross_entropy_loss(module.apply)
    if name == "er":
        learner = er(loss, optax.sgd(0.1), memory_size=20, replay_batch=5)
    else:
        learner = agem(loss, optax.sgd(0.1), memory_per_task=10, ref_batch=8)
    counts = []
    for tasks in (2, 5):
        with compiles("jit(train_task)") as c:
            run(learner, _stream(tasks), jax.random.PRNGKey(0), params=init,
                apply_fn=module.apply, batch_size=5)
        counts.append(c.count)
    # one compiled task per stream, whatever its number of tasks: the task id is traced
    assert counts == [1, 1], counts


def _memory_copies(hlo: str, shape: str) -> int:
    return len(re.findall(rf"= f32\[{shape}\]\{{[0-9,]+\}} copy\(", hlo))


@pytest.mark.parametrize("name", ["agem", "er"])
def test_memory_is_updated_in_place_inside_the_scan(name):
    """A replay read followed by a memory write in one step made XLA copy the whole memory
    every step (A-GEM ran 3.7x slower for it); ``after=`` orders the write after the read."""
    module = MLP(hidden=(16,), outputs=4)
    loss = cross_entropy_loss(module.apply)
    if name == "agem":
        learner = agem(loss, optax.sgd(0.1), memory_per_task=250, ref_batch=64)
        shape = "6,250,12"
    else:
        learner = er(loss, optax.sgd(0.1), memory_size=1500, replay_batch=10)
        shape = "1500,12"
    example = (jax.ShapeDtypeStruct((12,), jnp.float32), jax.ShapeDtypeStruct((), jnp.int32))
    state = learner.init(module.init(jax.random.PRNGKey(0), jnp.zeros((1, 12))),
                         jax.random.PRNGKey(1), example, 6)
    xs, ys = jnp.zeros((20, 10, 12)), jnp.zeros((20, 10), jnp.int32)

    def train_task(state, xs, ys, task):
        return jax.lax.scan(lambda s, b: learner.update(s, b, task), state, (xs, ys))[0]

    hlo = jax.jit(train_task, donate_argnums=0).lower(state, xs, ys, jnp.int32(2)).compile()
    text = hlo.as_text()
    assert re.search(rf"f32\[{shape}\]", text), "memory shape not found in the HLO"
    assert _memory_copies(text, shape) == 0
