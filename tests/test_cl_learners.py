"""Continual learners: fixed-shape state under jit, and each algorithm's defining property on
small constructed problems (A-GEM's projection, GEM's constraints, ER's buffer, MER's
Reptile steps, La-MAML's learning-rate updates)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from metajax.continual.agem import agem
from metajax.continual.er import er
from metajax.continual.gem import gem
from metajax.continual.lamaml import lamaml
from metajax.continual.learners import cross_entropy_loss, finetune, per_example_loss
from metajax.continual.mer import mer

D, H, C = 6, 8, 3


def apply_fn(params, x):
    hidden = jax.nn.relu(x @ params["w1"] + params["b1"])
    return hidden @ params["w2"] + params["b2"]


def mlp(key, d=D, h=H, c=C):
    k1, k2 = jax.random.split(key)
    return {
        "w1": jax.random.normal(k1, (d, h)) / np.sqrt(d),
        "b1": jnp.zeros(h),
        "w2": jax.random.normal(k2, (h, c)) / np.sqrt(h),
        "b2": jnp.zeros(c),
    }


LOSS = cross_entropy_loss(apply_fn)
KEY = jax.random.PRNGKey(0)
X = jax.random.normal(jax.random.PRNGKey(1), (4, D))
Y = jnp.array([0, 1, 2, 0], jnp.int32)
EXAMPLE = (X[0], Y[0])


def linear_loss(params, batch, task):
    """``-x . w`` per example: constant gradients ``-x``, no curvature."""
    del task
    x, _ = batch
    return -(x @ params["w"])


def avals(tree):
    return jax.tree.map(lambda a: (a.shape, a.dtype, a.weak_type), jax.eval_shape(lambda: tree))


def jitted(cl):
    """The learner with a compiled update (faster than op-by-op dispatch, even for one call)."""
    return cl._replace(update=jax.jit(cl.update))


def tree_dot(a, b):
    return sum(jnp.vdot(u, v) for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def leaves_close(a, b, **kwargs):
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(u, v, **kwargs)


LEARNERS = {
    "finetune": lambda: finetune(LOSS, optax.sgd(0.1)),
    "er": lambda: er(LOSS, optax.adam(1e-2), memory_size=8, replay_batch=4),
    "agem": lambda: agem(LOSS, optax.sgd(0.1), memory_per_task=4, ref_batch=8),
    "agem_per_class": lambda: agem(LOSS, optax.sgd(0.1), memory_per_task=6, ref_batch=4,
                                   num_classes=C),
    "agem_with_replacement": lambda: agem(LOSS, optax.sgd(0.1), memory_per_task=4, ref_batch=8,
                                          ref_sampling="with_replacement"),
    "gem": lambda: gem(LOSS, optax.sgd(0.1), memory_per_task=4),
    "gem_ridge": lambda: gem(LOSS, optax.sgd(0.1), memory_per_task=4, ridge=1e-3),
    "mer": lambda: mer(LOSS, 0.05, 0.5, 1.0, 2, memory_size=8, replay_batch=3),
    "lamaml": lambda: lamaml(LOSS, alpha_init=0.1, lr_eta=0.1, memory_size=8, replay_batch=4),
    "sync": lambda: lamaml(
        LOSS,
        alpha_init=0.1,
        lr_eta=0.1,
        outer_lr=0.1,
        variant="sync",
        memory_size=8,
        replay_batch=4,
        inner_steps=2,
        glances=2,
        first_order=True,
        multi_step_loss=True,
        replay_past_tasks=True,
        grad_clip_norm=1.0,
    ),
    "cmaml": lambda: lamaml(
        LOSS, alpha_init=0.1, outer_lr=0.1, variant="cmaml", memory_size=8, replay_batch=4
    ),
}


@pytest.mark.parametrize("name", sorted(LEARNERS))
def test_update_runs_in_a_jitted_scan_with_traced_task_ids_and_a_fixed_state(name):
    cl = LEARNERS[name]()
    state = cl.init(mlp(KEY), KEY, EXAMPLE, 3)
    assert state._fields[0] == "params"
    tasks = jnp.array([0, 0, 1, 2], jnp.int32)
    batches = (jnp.stack([X, X[::-1], X + 1, -X]), jnp.stack([Y, Y[::-1], Y, (Y + 1) % C]))

    @jax.jit
    def stream(state):
        def step(state, inputs):
            task, x, y = inputs
            return cl.update(state, (x, y), task)  # task_id traced: one compile for all tasks

        return jax.lax.scan(step, state, (tasks, *batches))

    new_state, metrics = stream(state)
    # scan tolerates weak-type drift in its carry; a jitted loop over tasks would recompile.
    assert avals(new_state) == avals(state)
    for value in metrics.values():
        assert value.shape == (4,) and value.dtype == jnp.float32
        assert np.all(np.isfinite(value))
    assert jax.tree.structure(new_state) == jax.tree.structure(state)


def test_cross_entropy_loss_restricts_each_row_to_its_task_classes():
    mask = jnp.array([[True, True, False], [False, True, True]])
    params = mlp(KEY)
    task = jnp.array([0, 1, 1, 0])
    y = jnp.array([0, 1, 2, 1])
    losses = cross_entropy_loss(apply_fn, mask)(params, (X, y), task)
    logits, np_mask = np.asarray(apply_fn(params, X), np.float64), np.asarray(mask)
    for i in range(4):
        kept = np.flatnonzero(np_mask[task[i]])  # the classes of row i's task
        z = logits[i, kept]
        expected = np.log(np.exp(z).sum()) - logits[i, y[i]]
        np.testing.assert_allclose(losses[i], expected, rtol=1e-5)
    grads = jax.grad(lambda p: cross_entropy_loss(apply_fn, mask)(p, (X, y), task)[0])(params)
    assert float(jnp.abs(grads["b2"][2])) == 0.0  # row 0 (task 0) never touches class 2


def test_per_example_loss_wraps_a_mean_batch_loss():
    def mean_loss(params, batch):
        return jnp.mean(LOSS(params, batch, jnp.zeros(len(batch[1]), jnp.int32)))

    wrapped = per_example_loss(mean_loss)(mlp(KEY), (X, Y), jnp.arange(4))
    np.testing.assert_allclose(wrapped, LOSS(mlp(KEY), (X, Y), jnp.zeros(4, jnp.int32)), rtol=1e-6)


def test_loss_returning_a_mean_is_rejected_with_a_hint():
    cl = finetune(lambda p, b, t: jnp.mean(LOSS(p, b, t)), optax.sgd(0.1))
    state = cl.init(mlp(KEY), KEY, EXAMPLE, 2)
    with pytest.raises(ValueError, match="one loss per example"):
        cl.update(state, (X, Y), 0)


def test_bad_arguments_fail_early():
    with pytest.raises(ValueError, match="memory_size"):
        er(LOSS, optax.sgd(0.1), memory_size=0, replay_batch=1)
    with pytest.raises(TypeError, match="optax"):
        agem(LOSS, 0.1, memory_per_task=4)
    with pytest.raises(ValueError, match="pass num_classes"):
        agem(LOSS, optax.sgd(0.1), memory_per_task=4, memory="per_class")
    with pytest.raises(ValueError, match="multiple of 3"):
        agem(LOSS, optax.sgd(0.1), memory_per_task=4, num_classes=3)
    with pytest.raises(ValueError, match="memory must be one of"):
        agem(LOSS, optax.sgd(0.1), memory_per_task=4, memory="reservoir")
    with pytest.raises(ValueError, match="ref_sampling must be one of"):
        agem(LOSS, optax.sgd(0.1), memory_per_task=4, ref_sampling="uniform")
    with pytest.raises(ValueError, match="ridge"):
        gem(LOSS, optax.sgd(0.1), memory_per_task=4, ridge=-1.0)
    with pytest.raises(ValueError, match="lr_eta"):
        lamaml(LOSS, alpha_init=0.1, memory_size=4, replay_batch=2)
    with pytest.raises(ValueError, match="outer_lr"):
        lamaml(LOSS, alpha_init=0.1, lr_eta=0.1, memory_size=4, replay_batch=2, variant="sync")
    with pytest.raises(ValueError, match="variant"):
        lamaml(LOSS, alpha_init=0.1, lr_eta=0.1, memory_size=4, replay_batch=2, variant="x")
    cl = lamaml(LOSS, alpha_init=0.1, lr_eta=0.1, memory_size=4, replay_batch=2, inner_steps=3)
    with pytest.raises(ValueError, match="divide"):
        cl.update(cl.init(mlp(KEY), KEY, EXAMPLE, 2), (X, Y), 0)


# --- ER -------------------------------------------------------------------------------------


def test_er_buffer_fills_and_first_update_is_finetuning():
    cl = er(LOSS, optax.sgd(0.1), memory_size=6, replay_batch=2)
    params = mlp(KEY)
    state = cl.init(params, KEY, EXAMPLE, 2)
    update = jax.jit(cl.update)
    state, metrics = update(state, (X, Y), jnp.int32(0))
    assert (int(state.memory.size), int(state.memory.seen)) == (4, 4)
    assert float(metrics["replay_loss"]) == 0.0  # nothing to replay yet: weight 0
    plain, _ = finetune(LOSS, optax.sgd(0.1)).update(
        finetune(LOSS, optax.sgd(0.1)).init(params, KEY, EXAMPLE, 2), (X, Y), 0
    )
    leaves_close(state.params, plain.params, rtol=1e-6)
    state, metrics = update(state, (X + 1.0, Y), jnp.int32(1))
    assert (int(state.memory.size), int(state.memory.seen)) == (6, 8)
    assert float(metrics["replay_loss"]) > 0.0
    # Slots 4, 5 took the 5th and 6th examples; the 7th and 8th replaced a slot or were dropped.
    np.testing.assert_array_equal(state.memory.task[4:], [1, 1])
    assert int(jnp.sum(state.memory.task == 0)) >= 2
    state, _ = update(state, (X, Y), jnp.int32(1))
    assert (int(state.memory.size), int(state.memory.seen)) == (6, 12)


# --- A-GEM ----------------------------------------------------------------------------------


def test_agem_update_is_the_manual_projection_when_gradients_conflict():
    lr = 0.5
    cl = jitted(agem(LOSS, optax.sgd(lr), memory_per_task=1, ref_batch=8))
    state = cl.init(mlp(KEY), KEY, EXAMPLE, 2)
    x = X[:1]
    # Task 0 writes (x, 0) to its single memory slot; task 1 relabels the same input.
    state, metrics = cl.update(state, (x, jnp.array([0])), 0)
    assert float(metrics["projected"]) == 0.0
    params = state.params
    state, metrics = cl.update(state, (x, jnp.array([1])), 1)

    def grad(label):
        return jax.grad(lambda p: LOSS(p, (x, jnp.array([label])), jnp.zeros(1, jnp.int32))[0])(
            params
        )

    g, g_ref = grad(1), grad(0)
    dot = tree_dot(g, g_ref)
    ref_sq = tree_dot(g_ref, g_ref)
    assert float(dot) < 0  # the projection is active
    assert float(metrics["projected"]) == 1.0
    expected = jax.tree.map(lambda p, a, b: p - lr * (a - dot / ref_sq * b), params, g, g_ref)
    leaves_close(state.params, expected, rtol=1e-5, atol=1e-7)


def test_agem_on_the_first_task_is_plain_sgd():
    params = mlp(KEY)
    cl = jitted(agem(LOSS, optax.sgd(0.1), memory_per_task=4))
    state, metrics = cl.update(cl.init(params, KEY, EXAMPLE, 2), (X, Y), 0)
    plain = jitted(finetune(LOSS, optax.sgd(0.1)))
    expected, _ = plain.update(plain.init(params, KEY, EXAMPLE, 2), (X, Y), 0)
    leaves_close(state.params, expected.params, rtol=1e-6)
    assert float(metrics["ref_loss"]) == 0.0


def test_agem_reference_batch_is_the_whole_memory_while_it_is_smaller():
    """Without replacement and a memory of past tasks no larger than ``ref_batch``, the
    reference gradient is that of the mean loss over every stored example, exactly (with
    replacement it would be a random resample of them)."""
    lr = 0.5
    cl = jitted(agem(LOSS, optax.sgd(lr), memory_per_task=4, ref_batch=8))
    state = cl.init(mlp(KEY), KEY, EXAMPLE, 2)
    state, _ = cl.update(state, (X, Y), 0)  # task 0's four slots hold (X, Y)
    params = state.params
    relabelled = (X, (Y + 1) % C)  # conflicts with the memory
    state, metrics = cl.update(state, relabelled, 1)

    def mean_grad(batch):
        return jax.grad(lambda p: jnp.mean(LOSS(p, batch, jnp.zeros(4, jnp.int32))))(params)

    g, g_ref = mean_grad(relabelled), mean_grad((X, Y))
    dot, ref_sq = tree_dot(g, g_ref), tree_dot(g_ref, g_ref)
    assert float(dot) < 0 and float(metrics["projected"]) == 1.0
    expected = jax.tree.map(lambda p, a, b: p - lr * (a - dot / ref_sq * b), params, g, g_ref)
    leaves_close(state.params, expected, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(metrics["ref_loss"],
                               jnp.mean(LOSS(params, (X, Y), jnp.zeros(4, jnp.int32))),
                               rtol=1e-6)


def test_agem_per_class_memory_is_balanced():
    """A task whose stream is mostly class 0 still leaves ``per_class`` examples of every
    class it showed (a per-task ring would keep its last rows, nearly all class 0)."""
    cl = jitted(agem(LOSS, optax.sgd(0.1), memory_per_task=6, ref_batch=4, num_classes=C))
    state = cl.init(mlp(KEY), KEY, EXAMPLE, 2)
    xs = jax.random.normal(jax.random.PRNGKey(3), (5, 4, D))
    labels = jnp.array([[1, 2, 1, 2], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
    for x, y in zip(xs, labels, strict=True):
        state, _ = cl.update(state, (x, y), 0)
    memory = state.memory
    np.testing.assert_array_equal(memory.count, [[16, 2, 2], [0, 0, 0]])
    # Class c's ring is slots 2c, 2c + 1: the last two class-0 rows, both of 1 and of 2.
    np.testing.assert_array_equal(memory.y[0], [0, 0, 1, 1, 2, 2])
    np.testing.assert_array_equal(memory.x[0][2:4], xs[0][jnp.array([0, 2])])
    np.testing.assert_array_equal(memory.x[0][4:], xs[0][jnp.array([1, 3])])
    assert {tuple(r) for r in np.asarray(memory.x[0][:2])} == \
        {tuple(r) for r in np.asarray(xs[4][2:])}
    per_task = jitted(agem(LOSS, optax.sgd(0.1), memory_per_task=6, ref_batch=4))
    ring = per_task.init(mlp(KEY), KEY, EXAMPLE, 2)
    for x, y in zip(xs, labels, strict=True):
        ring, _ = per_task.update(ring, (x, y), 0)
    np.testing.assert_array_equal(ring.memory.y[0], 0)  # the last six rows: class 0 only


@pytest.mark.parametrize("name", ["agem_per_class", "lamaml"])
def test_memory_writes_stay_in_place_inside_a_scan(name):
    """The per-class write and the first-glance write follow their reads (``after=``), so
    XLA updates the memory in place instead of copying it every step."""
    import re

    if name == "agem_per_class":
        cl = agem(LOSS, optax.sgd(0.1), memory_per_task=300, ref_batch=64, num_classes=C)
        shape = f"4,300,{D}"
    else:
        cl = lamaml(LOSS, alpha_init=0.1, lr_eta=0.1, memory_size=1500, replay_batch=4,
                    glances=3)
        shape = f"1500,{D}"
    state = cl.init(mlp(KEY), KEY, EXAMPLE, 4)
    xs, ys = jnp.zeros((5, 4, D)), jnp.zeros((5, 4), jnp.int32)

    def train_task(state, xs, ys, task):
        return jax.lax.scan(lambda s, b: cl.update(s, b, task), state, (xs, ys))[0]

    text = jax.jit(train_task, donate_argnums=0).lower(state, xs, ys, jnp.int32(2)) \
        .compile().as_text()
    assert re.search(rf"f32\[{shape}\]", text), "memory shape not found in the HLO"
    assert not re.findall(rf"= f32\[{shape}\]\{{[0-9,]+\}} copy\(", text)


# --- GEM ------------------------------------------------------------------------------------


def test_gem_step_raises_no_past_task_loss_to_first_order():
    lr = 0.1
    cl = gem(LOSS, optax.sgd(lr), memory_per_task=4, memory_strength=0.5)
    state = cl.init(mlp(KEY), KEY, EXAMPLE, 3)
    update = jax.jit(cl.update)
    x1 = jax.random.normal(jax.random.PRNGKey(2), (4, D))
    state, _ = update(state, (X, Y), jnp.int32(0))
    state, _ = update(state, (x1, (Y + 1) % C), jnp.int32(1))
    params, memory = state.params, state.memory
    # Task 2 relabels task 0's inputs: its gradient conflicts with the memory of task 0.
    state, metrics = update(state, (X, (Y + 2) % C), jnp.int32(2))
    assert float(metrics["violated"]) == 1.0

    def past_grad(k):
        def loss(p):
            return jnp.mean(LOSS(p, (memory.x[k], memory.y[k]), jnp.full(4, k, jnp.int32)))

        return jax.grad(loss)(params)

    def incoming_grad(p):
        return jnp.mean(LOSS(p, (X, (Y + 2) % C), jnp.full(4, 2, jnp.int32)))

    step = jax.tree.map(lambda new, old: (old - new) / lr, state.params, params)  # = g~
    g = jax.grad(incoming_grad)(params)
    for k in (0, 1):
        G_k = past_grad(k)
        along = tree_dot(G_k, step)
        assert float(along) >= -1e-5  # G g~ >= 0: no past loss rises to first order
    plain = tree_dot(past_grad(0), g)
    assert float(plain) < 0  # without the projection, task 0's loss would rise


def test_gem_step_is_the_projection_on_exactly_the_past_tasks():
    """At every task of a 7-task stream (row sizes 0-4, 6, 7: task 5 solves on 6 rows, its own
    included), the step is ``project_gem`` of the incoming gradient against the gradients of
    the tasks before it only: neither the current task's freshly written memory nor a later
    task's contributes, and one compiled update serves every task id."""
    from metajax.continual.projections import project_gem

    lr, margin, T, n = 0.1, 0.5, 7, 4
    cl = gem(LOSS, optax.sgd(lr), memory_per_task=n, memory_strength=margin)
    state = cl.init(mlp(KEY), KEY, EXAMPLE, T)
    update = jax.jit(cl.update)
    xs = jax.random.normal(jax.random.PRNGKey(5), (T, n, D))
    ys = jax.random.randint(jax.random.PRNGKey(6), (T, n), 0, C)
    # Later tasks' slots already hold data: they must still constrain nothing.
    state = state._replace(memory=state.memory._replace(x=xs[::-1], y=ys[::-1]))

    def mean_grad(params, batch, k):
        return jax.grad(lambda p: jnp.mean(LOSS(p, batch, jnp.full(n, k, jnp.int32))))(params)

    violated = []
    for t in range(T):
        params = state.params
        batch = (xs[t], (ys[t] + 1) % C)
        state, metrics = update(state, batch, jnp.int32(t))
        g = mean_grad(params, batch, t)
        past = [mean_grad(params, (state.memory.x[k], state.memory.y[k]), k) for k in range(t)]
        step = jax.tree.map(lambda new, old: (old - new) / lr, state.params, params)
        if past:
            G = jax.tree.map(lambda *rows: jnp.stack(rows), *past)
            expected = project_gem(g, G, margin)
            dots = np.array([float(tree_dot(row, g)) for row in past])
            assert float(metrics["violated"]) == float(np.any(dots < 0))
            violated.append(bool(np.any(dots < 0)))
        else:
            expected = g
            assert float(metrics["violated"]) == 0.0
        leaves_close(step, expected, rtol=2e-4, atol=2e-6)
    assert any(violated)  # some projection was exercised


def test_gem_ridge_is_the_reference_dual():
    """``ridge`` reaches the dual: the step is ``project_gem(..., ridge=ridge)`` of the
    incoming gradient (the reference code's ``eps``), and differs from the exact one."""
    from metajax.continual.projections import project_gem

    lr, margin, ridge = 0.1, 0.0, 0.3  # no margin and a large ridge, to see it
    x1 = jax.random.normal(jax.random.PRNGKey(2), (4, D))
    steps = {}
    for r in (0.0, ridge):
        cl = jitted(gem(LOSS, optax.sgd(lr), memory_per_task=4, memory_strength=margin,
                        ridge=r))
        state = cl.init(mlp(KEY), KEY, EXAMPLE, 3)
        state, _ = cl.update(state, (X, Y), 0)
        state, _ = cl.update(state, (x1, (Y + 1) % C), 1)
        params, memory = state.params, state.memory
        state, metrics = cl.update(state, (X, (Y + 2) % C), 2)
        assert float(metrics["violated"]) == 1.0
        steps[r] = jax.tree.map(lambda new, old: (old - new) / lr, state.params, params)

    def mean_grad(batch, k):
        return jax.grad(lambda p: jnp.mean(LOSS(p, batch, jnp.full(4, k, jnp.int32))))(params)

    g = mean_grad((X, (Y + 2) % C), 2)
    past = [mean_grad((memory.x[k], memory.y[k]), k) for k in (0, 1)]
    zero = jax.tree.map(jnp.zeros_like, g)
    G = jax.tree.map(lambda *rows: jnp.stack(rows), *past, zero)  # task 2's row: no constraint
    leaves_close(steps[ridge], project_gem(g, G, margin, ridge=ridge), rtol=1e-4, atol=1e-6)
    leaves_close(steps[0.0], project_gem(g, G, margin), rtol=1e-4, atol=1e-6)
    assert not np.allclose(steps[ridge]["w2"], steps[0.0]["w2"], atol=1e-4)


# --- MER ------------------------------------------------------------------------------------


def test_mer_first_example_is_one_sgd_step_then_memory_holds_each_example():
    lr = 0.05
    params = mlp(KEY)
    cl = jitted(
        mer(LOSS, lr, beta=1.0, gamma=1.0, batches_per_example=1, memory_size=8, replay_batch=3)
    )
    state = cl.init(params, KEY, EXAMPLE, 2)
    # beta = gamma = 1 and an empty memory: exactly one SGD step on the only example.
    state, _ = cl.update(state, (X[:1], Y[:1]), 0)
    grads = jax.grad(lambda p: LOSS(p, (X[:1], Y[:1]), jnp.zeros(1, jnp.int32))[0])(params)
    leaves_close(state.params, jax.tree.map(lambda p, g: p - lr * g, params, grads), rtol=1e-6)
    state, _ = cl.update(state, (X, Y), 1)
    assert (int(state.memory.seen), int(state.memory.size)) == (5, 5)


def test_mer_reptile_rates_scale_the_update():
    params = mlp(KEY)
    # Same key and data: the inner trajectory is identical, so the step scales with gamma.
    full = mer(
        LOSS, 0.05, beta=1.0, gamma=1.0, batches_per_example=1, memory_size=8, replay_batch=3
    )
    half = mer(
        LOSS, 0.05, beta=1.0, gamma=0.5, batches_per_example=1, memory_size=8, replay_batch=3
    )
    s_full, _ = full.update(full.init(params, KEY, EXAMPLE, 2), (X[:1], Y[:1]), 0)
    s_half, _ = half.update(half.init(params, KEY, EXAMPLE, 2), (X[:1], Y[:1]), 0)
    expected = jax.tree.map(lambda p, f: p + 0.5 * (f - p), params, s_full.params)
    leaves_close(s_half.params, expected, rtol=1e-6, atol=1e-7)


# --- La-MAML --------------------------------------------------------------------------------


def two_task_lamaml(variant="lamaml", **kwargs):
    """State after task 0 stored ``x0 = [1, -3]``; the next incoming example is ``[1, 1]``.

    With the linear loss ``-x . w`` every gradient is ``-x``: the inner (incoming) gradient is
    ``-[1, 1]`` and the meta-batch (replay ``x0`` and the incoming example) has gradient
    ``-[1, -1]``. They agree on coordinate 0 and conflict on coordinate 1.
    """
    cl = jitted(lamaml(linear_loss, memory_size=4, replay_batch=1, variant=variant, **kwargs))
    params = {"w": jnp.zeros(2)}
    x0, x1 = jnp.array([[1.0, -3.0]]), jnp.array([[1.0, 1.0]])
    y = jnp.zeros(1, jnp.int32)
    state = cl.init(params, KEY, (x0[0], y[0]), 2)
    state, _ = cl.update(state, (x0, y), 0)
    return cl, state, (x1, y)


@pytest.mark.parametrize("first_order", [False, True])
def test_lamaml_rates_grow_where_gradients_align_and_shrink_where_they_conflict(first_order):
    eta = 0.5
    cl, state, batch = two_task_lamaml(alpha_init=0.1, lr_eta=eta, first_order=first_order)
    alpha = state.alpha["w"]
    new, _ = cl.update(state, batch, 1)
    change = new.alpha["w"] - alpha
    assert float(change[0]) > 0 > float(change[1])
    # g_alpha = -g_inner * g_meta = -(-[1, 1]) * (-[1, -1]) = [-1, 1]; alpha -= eta * g_alpha.
    np.testing.assert_allclose(change, eta * np.array([1.0, -1.0]), rtol=1e-5)


def test_lamaml_steps_weights_with_updated_rates_clipped_at_zero():
    eta = 0.5
    cl, state, batch = two_task_lamaml(alpha_init=0.1, lr_eta=eta)
    state = state._replace(alpha={"w": jnp.array([0.1, 0.3])}, params={"w": jnp.zeros(2)})
    new, _ = cl.update(state, batch, 1)
    # Updated rates [0.1 + 0.5, 0.3 - 0.5] = [0.6, -0.2]; meta-gradient -[1, -1]. The
    # negative rate freezes coordinate 1 (unclipped, it would move against its gradient).
    np.testing.assert_allclose(new.alpha["w"], [0.6, -0.2], rtol=1e-5)
    np.testing.assert_allclose(new.params["w"], [0.6, 0.0], atol=1e-6)


@pytest.mark.parametrize("clip", [False, True])
def test_clip_inner_rates_stops_negative_rates_in_the_inner_loop(clip):
    eta = 0.5
    cl, state, batch = two_task_lamaml(alpha_init=0.1, lr_eta=eta, clip_inner_rates=clip)
    state = state._replace(alpha={"w": jnp.array([0.1, -0.3])}, params={"w": jnp.zeros(2)})
    new, _ = cl.update(state, batch, 1)
    # g_alpha = -g_inner * g_meta = [-1, 1] where the rate takes part in the inner step. With
    # the clip, the negative rate of coordinate 1 gives max(alpha, 0) = 0: no inner step and
    # no gradient, so it stays at -0.3; without it, it moves by -eta like a positive one.
    expected = [0.1 + eta, -0.3] if clip else [0.1 + eta, -0.3 - eta]
    np.testing.assert_allclose(new.alpha["w"], expected, rtol=1e-5)


def test_sync_and_cmaml_step_weights_at_the_fixed_outer_rate():
    cl, state, batch = two_task_lamaml("sync", alpha_init=0.1, lr_eta=0.5, outer_lr=0.2)
    state = state._replace(params={"w": jnp.zeros(2)})
    new, _ = cl.update(state, batch, 1)
    np.testing.assert_allclose(new.params["w"], 0.2 * np.array([1.0, -1.0]), atol=1e-6)
    assert not np.allclose(new.alpha["w"], state.alpha["w"])  # rates still learned

    cl, state, batch = two_task_lamaml("cmaml", alpha_init=0.1, outer_lr=0.2)
    state = state._replace(params={"w": jnp.zeros(2)})
    new, _ = cl.update(state, batch, 1)
    np.testing.assert_allclose(new.params["w"], 0.2 * np.array([1.0, -1.0]), atol=1e-6)
    assert float(new.alpha) == pytest.approx(0.1)


def test_lamaml_meta_gradient_goes_through_the_inner_loop():
    """Second order on a quadratic: the inner step gives theta_1 = theta_0 - alpha (theta_0 - a)
    and the meta-loss 1/2 |theta_1 - a|^2 has d/dtheta_0 = (1 - alpha) (theta_1 - a); the
    first-order meta-gradient is (theta_1 - a)."""

    def quadratic(params, batch, task):
        del task
        x, _ = batch
        return 0.5 * jnp.sum((params["w"] - x) ** 2, axis=-1)

    a, alpha, outer = jnp.array([[2.0, 0.0]]), 0.25, 0.1
    y = jnp.zeros(1, jnp.int32)
    for first_order, factor in ((False, 1 - alpha), (True, 1.0)):
        cl = lamaml(
            quadratic,
            alpha_init=alpha,
            outer_lr=outer,
            variant="cmaml",
            memory_size=2,
            replay_batch=1,
            first_order=first_order,
        )
        state = cl.init({"w": jnp.zeros(2)}, KEY, (a[0], y[0]), 1)
        new, _ = cl.update(state, (a, y), 0)  # empty memory: the meta-batch is (a) itself
        theta_1 = alpha * a[0]
        expected = -outer * factor * (theta_1 - a[0])
        np.testing.assert_allclose(new.params["w"], expected, rtol=1e-5)


def test_replay_past_tasks_reads_the_copy_taken_when_the_task_began():
    cl = jitted(
        lamaml(
            linear_loss,
            alpha_init=0.1,
            lr_eta=0.1,
            memory_size=4,
            replay_batch=2,
            replay_past_tasks=True,
        )
    )
    y = jnp.zeros(2, jnp.int32)
    state = cl.init({"w": jnp.zeros(2)}, KEY, (jnp.zeros(2), y[0]), 3)
    state, _ = cl.update(state, (jnp.ones((2, 2)), y), 0)
    state, _ = cl.update(state, (2 * jnp.ones((2, 2)), y), 1)
    assert int(state.past_memory.size) == 2  # task 0's examples only
    assert int(state.memory.size) == 4
    np.testing.assert_array_equal(state.past_memory.task[:2], [0, 0])


def test_lamaml_writes_the_batch_during_the_first_glance():
    """As the authors' code: the first glance draws its replay, then the batch goes to
    memory, so the second glance may replay it. With the linear loss every meta-gradient is
    minus the mean input of the meta-batch: memory {x0}, incoming x1, 63 replays. The first
    glance replays x0 only; the second draws from {x0, x1}, so x1's coordinate gets more
    than the 1/64 of a batch it had in the first."""
    outer, replays = 0.1, 63
    cl = jitted(lamaml(linear_loss, alpha_init=0.1, outer_lr=outer, variant="cmaml",
                       memory_size=4, replay_batch=replays, glances=2, first_order=True))
    x0, x1, y = jnp.array([[1.0, 0.0]]), jnp.array([[0.0, 1.0]]), jnp.zeros(1, jnp.int32)
    state = cl.init({"w": jnp.zeros(2)}, KEY, (x0[0], y[0]), 2)
    state, _ = cl.update(state, (x0, y), 0)  # glance 1 replays x0 itself
    state = state._replace(params={"w": jnp.zeros(2)})
    new, _ = cl.update(state, (x1, y), 1)
    assert (int(new.memory.seen), int(new.memory.size)) == (2, 2)  # offered once
    first = outer * (x1[0] + replays * x0[0]) / (replays + 1)
    second = new.params["w"] - first
    np.testing.assert_allclose(float(jnp.sum(second)), outer, rtol=1e-5)
    assert float(second[1]) > outer * 1.5 / (replays + 1)  # x1 replayed in the second glance


def test_cross_entropy_gradient_is_softmax_minus_one_hot():
    # A linear model: d loss_i / d w = x_i^T (softmax(x_i w) - one_hot(y_i)), in closed form.
    rng = np.random.default_rng(3)
    x = rng.normal(size=(5, 4)).astype(np.float32)
    w = rng.normal(size=(4, 3)).astype(np.float32)
    y = np.array([0, 2, 1, 1, 0], np.int32)
    loss = cross_entropy_loss(lambda p, inputs: inputs @ p)
    grad = jax.grad(lambda p: jnp.sum(loss(p, (x, y), jnp.zeros(5, jnp.int32))))(w)
    z = x.astype(np.float64) @ w
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    expected = x.T.astype(np.float64) @ (p - np.eye(3)[y])
    np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-6)
