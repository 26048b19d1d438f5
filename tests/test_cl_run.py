"""run(): the accuracy matrix, LCA, seeds under vmap, determinism, task-aware evaluation, and
replay beating fine-tuning on a synthetic stream whose tasks conflict."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from metajax.continual.er import er
from metajax.continual.learners import cross_entropy_loss, finetune
from metajax.continual.metrics import metrics
from metajax.continual.run import run
from metajax.types import Stream

CLASSES, FEATURES, HIDDEN = 3, 8, 32


def conflicting_stream(num_tasks=2, n_train=200, n_test=300, seed=0, class_mask=False):
    """Task ``t`` labels ``z ~ N(0, I)`` by ``(argmax(A z) + t) % CLASSES``: the same inputs get
    a different label in every task, so learning a task overwrites the previous ones. A
    one-hot task indicator appended to ``z`` makes all tasks learnable together (by replay).
    With ``class_mask``, task ``t`` owns classes ``[t * CLASSES, (t + 1) * CLASSES)``."""
    rng = np.random.default_rng(seed)
    A = rng.normal(size=(CLASSES, FEATURES))
    x, y = [], []
    for t in range(num_tasks):
        z = rng.normal(size=(n_train + n_test, FEATURES))
        indicator = np.zeros((n_train + n_test, num_tasks))
        indicator[:, t] = 1.0
        x.append(np.concatenate([z, indicator], axis=1))
        y.append((np.argmax(z @ A.T, axis=1) + t) % CLASSES)
    x, y = np.stack(x).astype(np.float32), np.stack(y).astype(np.int32)
    mask, num_classes = None, CLASSES
    if class_mask:
        mask = np.kron(np.eye(num_tasks, dtype=bool), np.ones((1, CLASSES), bool))
        y = y + CLASSES * np.arange(num_tasks)[:, None]
        num_classes = CLASSES * num_tasks
    return Stream(x[:, :n_train], y[:, :n_train], x[:, n_train:], y[:, n_train:], num_classes, mask)


def apply_fn(params, x):
    hidden = jax.nn.relu(x @ params["w1"] + params["b1"])
    return hidden @ params["w2"] + params["b2"]


def mlp_init(num_tasks, num_classes=CLASSES):
    def init(key):
        k1, k2 = jax.random.split(key)
        d = FEATURES + num_tasks
        return {
            "w1": jax.random.normal(k1, (d, HIDDEN)) / np.sqrt(d),
            "b1": jnp.zeros(HIDDEN),
            "w2": jax.random.normal(k2, (HIDDEN, num_classes)) / np.sqrt(HIDDEN),
            "b2": jnp.zeros(num_classes),
        }

    return init


LOSS = cross_entropy_loss(apply_fn)
KEY = jax.random.PRNGKey(0)
SMALL = conflicting_stream(num_tasks=3, n_train=40, n_test=50)


def test_accuracy_matrix_shape_range_metrics_and_determinism():
    cl = er(LOSS, optax.sgd(0.1), memory_size=20, replay_batch=5)
    kwargs = dict(params=mlp_init(3), apply_fn=apply_fn, batch_size=10, lca_batches=2)
    result = run(cl, SMALL, KEY, **kwargs)
    R = result["acc_matrix"]
    assert R.shape == (3, 3)
    assert np.all((R >= 0) & (R <= 1))
    assert result["lca_curve"].shape == (3, 3)  # Z_0 .. Z_2 per task
    assert result["random_init_acc"].shape == (3,)
    for name in ("avg_accuracy", "bwt", "forgetting", "fwt", "lca"):
        assert np.isfinite(result[name])
    assert result["avg_accuracy"] == pytest.approx(R[-1].mean())
    assert set(result["train_metrics"]) == {"loss", "incoming_loss", "replay_loss"}
    assert result["train_metrics"]["loss"].shape == (3,)
    # Z_0 of task 0: the accuracy before any training.
    assert result["lca_curve"][0, 0] == pytest.approx(result["random_init_acc"][0])
    again = run(cl, SMALL, KEY, **kwargs)
    np.testing.assert_array_equal(again["acc_matrix"], R)
    np.testing.assert_array_equal(again["lca_curve"], result["lca_curve"])


def test_seeds_run_batched_and_each_equals_its_own_run():
    cl = finetune(LOSS, optax.sgd(0.1))
    kwargs = dict(params=mlp_init(3), apply_fn=apply_fn, epochs=2)
    batched = run(cl, SMALL, KEY, seeds=[3, 5], **kwargs)
    assert batched["acc_matrix"].shape == (2, 3, 3)
    assert batched["seeds"] == [3, 5] and len(batched["per_seed"]) == 2
    per_seed_acc = [m["avg_accuracy"] for m in batched["per_seed"]]
    assert batched["avg_accuracy"] == pytest.approx(np.mean(per_seed_acc))
    of_mean = metrics(batched["acc_matrix"].mean(axis=0),
                      random_init_acc=batched["random_init_acc"].mean(axis=0))
    assert batched["of_mean_matrix"] == pytest.approx(of_mean)
    assert batched["std"]["avg_accuracy"] == pytest.approx(np.std(per_seed_acc))
    assert batched["train_metrics"]["loss"].shape == (2, 3)
    single = run(cl, SMALL, jax.random.fold_in(KEY, 5), **kwargs)
    np.testing.assert_allclose(single["acc_matrix"], batched["acc_matrix"][1], atol=1 / 50)
    assert not np.array_equal(batched["acc_matrix"][0], batched["acc_matrix"][1])


@pytest.mark.parametrize("seed_map", ["scan", 2])
def test_seed_map_scan_or_chunks_equals_vmap(seed_map):
    cl = er(LOSS, optax.sgd(0.1), memory_size=20, replay_batch=5)
    kwargs = dict(params=mlp_init(3), apply_fn=apply_fn, batch_size=10, seeds=[0, 1, 2])
    vmapped = run(cl, SMALL, KEY, **kwargs)
    mapped = run(cl, SMALL, KEY, seed_map=seed_map, **kwargs)
    np.testing.assert_allclose(mapped["acc_matrix"], vmapped["acc_matrix"], atol=1 / 50)
    np.testing.assert_allclose(mapped["train_metrics"]["loss"],
                               vmapped["train_metrics"]["loss"], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="task_map"):
        run(cl, SMALL, KEY, seed_map="pmap", **kwargs)


def test_task_aware_stream_masks_evaluation_to_each_task_classes():
    stream = conflicting_stream(num_tasks=2, n_train=40, n_test=50, class_mask=True)
    # A model that always prefers class 0 by far, and is indifferent among the others.
    params = jax.tree.map(jnp.zeros_like, mlp_init(2, num_classes=2 * CLASSES)(KEY))
    params["b2"] = params["b2"].at[0].set(10.0)
    masked = cross_entropy_loss(apply_fn, stream.class_mask)
    cl = finetune(masked, optax.sgd(0.1))
    result = run(cl, stream, KEY, params=params, apply_fn=apply_fn)
    assert result["acc_matrix"].shape == (2, 2)
    # Task 0 predicts class 0; task 1's mask hides class 0 and the tie among 3, 4, 5 goes to
    # 3. Without the mask task 1 would score 0 (class 0 is not among its labels).
    expected = [np.mean(stream.test_y[0] == 0), np.mean(stream.test_y[1] == CLASSES)]
    np.testing.assert_allclose(result["random_init_acc"], expected)
    assert expected[1] > 0


def test_bad_arguments_fail_early():
    cl = finetune(LOSS, optax.sgd(0.1))
    with pytest.raises(ValueError, match="lca_batches"):
        run(cl, SMALL, KEY, params=mlp_init(3), apply_fn=apply_fn, lca_batches=5)
    with pytest.raises(ValueError, match="batch_size"):
        run(cl, SMALL, KEY, params=mlp_init(3), apply_fn=apply_fn, batch_size=41)
    with pytest.raises(ValueError, match="seeds"):
        run(cl, SMALL, KEY, params=mlp_init(3), apply_fn=apply_fn, seeds=[])


def test_replay_retains_the_first_task_better_than_finetuning():
    stream = conflicting_stream()
    kwargs = dict(params=mlp_init(2), apply_fn=apply_fn, batch_size=10, epochs=3)
    plain = run(finetune(LOSS, optax.sgd(0.1)), stream, KEY, **kwargs)
    replay = run(er(LOSS, optax.sgd(0.1), memory_size=100, replay_batch=10), stream, KEY, **kwargs)
    # Both learn task 0 first; after task 1, fine-tuning has overwritten it.
    assert plain["acc_matrix"][0, 0] > 0.7 and replay["acc_matrix"][0, 0] > 0.7
    assert plain["acc_matrix"][1, 0] < 0.3
    assert replay["acc_matrix"][1, 0] > plain["acc_matrix"][1, 0] + 0.1
    assert replay["bwt"] > plain["bwt"]


def test_end_task_runs_after_each_task_with_its_id():
    """A learner's ``end_task`` hook sees the finished task's id: here it zeroes the weights
    after task 1 only, so row 1 of R is the accuracy of all-zero logits (class 0 everywhere)
    while row 0 is the plain learner's."""
    plain = finetune(LOSS, optax.sgd(0.1))

    def end_task(state, task):
        keep = jnp.where(task == 1, 0.0, 1.0)
        return state._replace(params=jax.tree.map(lambda p: p * keep, state.params))

    hooked = plain._replace(end_task=end_task)
    kwargs = dict(params=mlp_init(3), apply_fn=apply_fn, batch_size=10)
    reference = run(plain, SMALL, KEY, **kwargs)["acc_matrix"]
    R = run(hooked, SMALL, KEY, **kwargs)["acc_matrix"]
    class_zero = (SMALL.test_y == 0).mean(axis=1)
    np.testing.assert_array_equal(R[0], reference[0])
    np.testing.assert_allclose(R[1], class_zero, atol=1e-6)
    assert not np.allclose(reference[1], class_zero)
