"""Tests for metajax.data.episodes: on-device N-way K-shot sampling (Vinyals et al., 2016)."""

from __future__ import annotations

import itertools
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from metajax.data.episodes import sample_episode, sample_episodes
from metajax.types import Task

STATIC = ("num_tasks", "ways", "shots", "queries")
sample_jit = jax.jit(sample_episodes, static_argnames=STATIC)
P_MIN = 1e-3  # the seeds are fixed, so a pass is deterministic; this guards against bias


def _id_images(classes: int, per_class: int, hw: tuple[int, int] = (1, 1)) -> jax.Array:
    """``[classes, per_class, H, W, 1]`` int32 images whose every pixel is ``c * per_class + p``,
    so a sampled image reveals which class and which image it is."""
    ids = np.arange(classes * per_class, dtype=np.int32).reshape(classes, per_class, 1, 1, 1)
    return jnp.asarray(np.broadcast_to(ids, (classes, per_class, *hw, 1)))


def _ids(x: jax.Array) -> np.ndarray:
    """Image ids of ``x [..., H, W, 1]`` (checking every pixel agrees)."""
    x = np.asarray(x)
    first = x[..., :1, :1, :]
    assert (x == first).all()
    return first[..., 0, 0, 0]


def _chi2_pvalue(counts: np.ndarray) -> float:
    """p-value of a chi-square test that ``counts`` come from a uniform distribution."""
    return float(stats.chisquare(np.asarray(counts).ravel()).pvalue)


@pytest.fixture(scope="module")
def many():
    """3000 episodes of 3-way 2-shot 3-query from 10 classes x 6 images, decoded to ids."""
    classes, per_class, ways, shots, queries = 10, 6, 3, 2, 3
    tasks = sample_jit(
        jax.random.PRNGKey(0), _id_images(classes, per_class), 3000, ways, shots, queries
    )
    return dict(
        classes=classes,
        per_class=per_class,
        ways=ways,
        shots=shots,
        queries=queries,
        s_ids=_ids(tasks.support[0]),
        s_y=np.asarray(tasks.support[1]),
        q_ids=_ids(tasks.query[0]),
        q_y=np.asarray(tasks.query[1]),
    )


def test_shapes_dtypes_and_type():
    images = jnp.zeros((7, 5, 4, 3, 2), jnp.uint8)
    task = sample_jit(jax.random.PRNGKey(1), images, num_tasks=4, ways=3, shots=2, queries=1)
    assert isinstance(task, Task)
    (sx, sy), (qx, qy) = task.support, task.query
    assert sx.shape == (4, 6, 4, 3, 2) and sx.dtype == jnp.uint8  # stored dtype kept
    assert qx.shape == (4, 3, 4, 3, 2) and qx.dtype == jnp.uint8
    assert sy.shape == (4, 6) and sy.dtype == jnp.int32
    assert qy.shape == (4, 3) and qy.dtype == jnp.int32
    one = jax.jit(sample_episode, static_argnames=STATIC[1:])(
        jax.random.key(2),
        images,
        ways=3,
        shots=2,
        queries=1,  # new-style typed keys work too
    )
    assert one.support[0].shape == (6, 4, 3, 2) and one.query[1].shape == (3,)


def test_labels_grouped_ascending(many):
    ways, shots, queries = many["ways"], many["shots"], many["queries"]
    np.testing.assert_array_equal(
        many["s_y"], np.repeat(np.arange(ways), shots)[None].repeat(len(many["s_y"]), 0)
    )
    np.testing.assert_array_equal(
        many["q_y"], np.repeat(np.arange(ways), queries)[None].repeat(len(many["q_y"]), 0)
    )


def test_within_task_invariants(many):
    per_class, ways, shots, queries = (
        many["per_class"],
        many["ways"],
        many["shots"],
        many["queries"],
    )
    s_cls = many["s_ids"].reshape(-1, ways, shots) // per_class
    q_cls = many["q_ids"].reshape(-1, ways, queries) // per_class
    # Every image of a label comes from one class, the same in support and query.
    assert (s_cls == s_cls[:, :, :1]).all()
    assert (q_cls == s_cls[:, :, :1]).all()
    # Different labels are different classes (classes without replacement).
    label_cls = np.sort(s_cls[:, :, 0], axis=1)
    assert (np.diff(label_cls, axis=1) > 0).all()
    # No image twice in a task, which also makes support and query disjoint.
    all_ids = np.sort(np.concatenate([many["s_ids"], many["q_ids"]], axis=1), axis=1)
    assert (np.diff(all_ids, axis=1) > 0).all()


def test_every_class_and_image_reachable_and_uniform(many):
    n_images = many["classes"] * many["per_class"]
    s_counts = np.bincount(many["s_ids"].ravel(), minlength=n_images)
    q_counts = np.bincount(many["q_ids"].ravel(), minlength=n_images)
    assert (s_counts > 0).all() and (q_counts > 0).all()
    class_counts = np.bincount(
        many["s_ids"][:, :: many["shots"]].ravel() // many["per_class"], minlength=many["classes"]
    )
    assert _chi2_pvalue(class_counts) > P_MIN
    # Which image of its class lands in the support is uniform too.
    assert _chi2_pvalue(s_counts) > P_MIN
    assert _chi2_pvalue(q_counts) > P_MIN


def test_label_assignment_is_uniform(many):
    per_class, ways, shots = many["per_class"], many["ways"], many["shots"]
    label0_cls = many["s_ids"][:, 0] // per_class
    counts = np.bincount(label0_cls, minlength=many["classes"])
    assert _chi2_pvalue(counts) > P_MIN
    # The test has power: a biased rule (labels by sorted class id) is rejected decisively.
    s_cls = many["s_ids"].reshape(-1, ways, shots)[:, :, 0] // per_class
    biased = np.bincount(np.sort(s_cls, axis=1)[:, 0], minlength=many["classes"])
    assert _chi2_pvalue(biased) < 1e-12


def test_label_permutation_uniform_when_all_classes_used():
    # With ways == classes every task uses the same classes, so only the label permutation
    # varies: all 3! assignments must be equally likely. A fixed assignment gives one of them.
    ways = 3
    tasks = sample_jit(jax.random.PRNGKey(3), _id_images(ways, 4), 3000, ways, 1, 1)
    cls = _ids(tasks.support[0]) // 4  # [tasks, ways]: class of label 0, 1, 2
    perms = {p: i for i, p in enumerate(itertools.permutations(range(ways)))}
    counts = np.bincount([perms[tuple(row)] for row in cls], minlength=len(perms))
    assert (counts > 0).all()
    assert _chi2_pvalue(counts) > P_MIN
    # Each label sees each class equally often.
    table = np.stack([np.bincount(cls[:, j], minlength=ways) for j in range(ways)])
    assert _chi2_pvalue(table) > P_MIN


def test_deterministic_for_a_key_and_keys_differ():
    images = _id_images(12, 8, hw=(2, 2))
    a = sample_jit(jax.random.PRNGKey(5), images, 8, 4, 2, 3)
    b = sample_jit(jax.random.PRNGKey(5), images, 8, 4, 2, 3)
    c = sample_jit(jax.random.PRNGKey(6), images, 8, 4, 2, 3)
    for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
    assert not np.array_equal(np.asarray(a.support[0]), np.asarray(c.support[0]))
    # Tasks within one batch differ from each other too.
    ids = _ids(a.support[0])
    assert len({tuple(r) for r in ids}) == len(ids)


def test_batched_equals_single_and_jit_equals_eager():
    images = _id_images(9, 7, hw=(2, 3))
    key = jax.random.PRNGKey(7)
    batch = sample_jit(key, images, 5, 3, 2, 2)
    single = jax.jit(partial(sample_episode, ways=3, shots=2, queries=2))
    for t, k in enumerate(jax.random.split(key, 5)):
        one = single(k, images)
        for u, v in zip(
            jax.tree_util.tree_leaves(batch), jax.tree_util.tree_leaves(one), strict=True
        ):
            np.testing.assert_array_equal(np.asarray(u[t]), np.asarray(v))
    eager = sample_episode(key, images, 3, 2, 2)
    for u, v in zip(
        jax.tree_util.tree_leaves(single(key, images)),
        jax.tree_util.tree_leaves(eager),
        strict=True,
    ):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


def test_full_use_of_a_split():
    # ways == classes and shots + queries == per_class are allowed (the boundaries).
    images = _id_images(4, 5)
    task = sample_jit(jax.random.PRNGKey(8), images, 2, 4, 2, 3)
    ids = np.sort(np.concatenate([_ids(task.support[0]), _ids(task.query[0])], axis=1), axis=1)
    np.testing.assert_array_equal(ids, np.tile(np.arange(20), (2, 1)))


def test_errors_name_the_bad_value():
    images = jnp.zeros((5, 20, 2, 2, 1))
    key = jax.random.PRNGKey(0)
    with pytest.raises(ValueError, match=r"ways=6 .*5 classes.*ways <= 5"):
        sample_episode(key, images, 6, 1, 1)
    with pytest.raises(ValueError, match=r"15 \+ 6 = 21.*20 images.*<= 20"):
        sample_episodes(key, images, 2, 5, 15, 6)
    with pytest.raises(ValueError, match=r"\[classes, per_class, H, W, C\].*\(5, 20, 2, 2\)"):
        sample_episode(key, images[..., 0], 2, 1, 1)
    with pytest.raises(ValueError, match="shots must be a Python int >= 1, got 0"):
        sample_episode(key, images, 2, 0, 1)
    with pytest.raises(ValueError, match="num_tasks must be a Python int >= 1, got 0"):
        sample_episodes(key, images, 0, 2, 1, 1)
    with pytest.raises(TypeError, match="queries must be a Python int.*2.5"):
        sample_episode(key, images, 2, 1, 2.5)
    with pytest.raises(TypeError, match="static"):
        jax.jit(sample_episode)(key, images, 2, 1, 1)  # sizes traced: must be static
