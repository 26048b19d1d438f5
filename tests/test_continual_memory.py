"""Replay memories: reservoir sampling is uniform over the stream, shapes stay fixed, episodic
memories write rings and sample only stored examples of earlier tasks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metajax.continual import (
    ReservoirBuffer,
    buffer_sample,
    episodic_add,
    episodic_init,
    episodic_sample,
    episodic_valid,
    reservoir_add,
    reservoir_add_batch,
    reservoir_init,
)

# --- reservoir: statistics ---------------------------------------------------------------


def stored_stream_indices(add_one, capacity: int, stream: int, seeds: int) -> np.ndarray:
    """Offer examples 0 .. stream-1 (x = y = index) one by one to ``seeds`` fresh buffers.

    Returns the stored indices ``[seeds, capacity]``.
    """

    def run(key):
        buffer = reservoir_init(capacity, jnp.int32(0), jnp.int32(0))

        def offer(buf, inputs):
            k, index = inputs
            return add_one(buf, k, index, index, 0), None

        keys = jax.random.split(key, stream)
        buffer, _ = jax.lax.scan(offer, buffer, (keys, jnp.arange(stream, dtype=jnp.int32)))
        return buffer.x

    return np.asarray(jax.jit(jax.vmap(run))(jax.random.split(jax.random.key(0), seeds)))


def looks_uniform(stored: np.ndarray, stream: int, probability: float) -> bool:
    """Whether every stream index is stored with ``probability`` (per seed), within noise.

    Each index's inclusion count over seeds is Binomial(seeds, probability); the check
    bounds every index's z-score, the chi-square per degree of freedom, and the z-score of
    blocks of consecutive indices (which catches slow trends, e.g. favouring recent data).
    """
    seeds = stored.shape[0]
    counts = np.bincount(stored.ravel(), minlength=stream).astype(np.float64)
    expected = seeds * probability
    z = (counts - expected) / np.sqrt(expected * (1 - probability))
    chi2_per_dof = np.mean(z**2)
    blocks = counts.reshape(10, -1).sum(axis=1)
    block_z = (blocks - expected * counts.size / 10) / np.sqrt(
        counts.size / 10 * expected * (1 - probability)
    )
    return bool(
        np.max(np.abs(z)) < 5.0
        and abs(chi2_per_dof - 1.0) < 5.0 * np.sqrt(2.0 / stream)
        and np.max(np.abs(block_z)) < 5.0
    )


def keep_first_add(buffer, key, x, y, task_id):
    """A biased buffer: keeps the first ``capacity`` examples, ignores the rest."""
    del key
    capacity = buffer.task.shape[0]
    slot = jnp.where(buffer.seen < capacity, buffer.seen, capacity)
    seen = buffer.seen + 1
    return ReservoirBuffer(
        buffer.x.at[slot].set(x, mode="drop"),
        buffer.y.at[slot].set(y, mode="drop"),
        buffer.task.at[slot].set(task_id, mode="drop"),
        seen,
        jnp.minimum(seen, capacity),
    )


def replace_last_add(buffer, key, x, y, task_id):
    """A biased buffer: once full, every new example overwrites the last slot."""
    del key
    capacity = buffer.task.shape[0]
    slot = jnp.minimum(buffer.seen, capacity - 1)
    seen = buffer.seen + 1
    return ReservoirBuffer(
        buffer.x.at[slot].set(x),
        buffer.y.at[slot].set(y),
        buffer.task.at[slot].set(task_id),
        seen,
        jnp.minimum(seen, capacity),
    )


def off_by_one_add(buffer, key, x, y, task_id):
    """A subtly biased Algorithm R: draws j from [0, seen) instead of [0, seen]."""
    capacity = buffer.task.shape[0]
    j = jax.random.randint(key, (), 0, jnp.maximum(buffer.seen, 1))
    slot = jnp.where(buffer.seen < capacity, buffer.seen, j)
    seen = buffer.seen + 1
    return ReservoirBuffer(
        buffer.x.at[slot].set(x, mode="drop"),
        buffer.y.at[slot].set(y, mode="drop"),
        buffer.task.at[slot].set(task_id, mode="drop"),
        seen,
        jnp.minimum(seen, capacity),
    )


def test_reservoir_keeps_each_stream_example_with_probability_capacity_over_stream():
    capacity, stream, seeds = 100, 1000, 2000
    stored = stored_stream_indices(reservoir_add, capacity, stream, seeds)
    # No slot is stored twice: the reservoir holds a sample without replacement.
    assert all(len(np.unique(row)) == capacity for row in stored[:50])
    assert looks_uniform(stored, stream, capacity / stream)


@pytest.mark.parametrize("biased_add", [keep_first_add, replace_last_add])
def test_the_uniformity_check_rejects_biased_buffers(biased_add):
    capacity, stream, seeds = 100, 1000, 2000
    stored = stored_stream_indices(biased_add, capacity, stream, seeds)
    assert not looks_uniform(stored, stream, capacity / stream)


def test_reservoir_inclusion_is_exact_on_a_short_stream():
    # After n offers each example is kept with probability capacity / n, including the last
    # one: this pins the draw to {0, ..., seen}. Drawing from {0, ..., seen - 1} instead keeps
    # the first three examples with probability 2/6 * ... = 1/3 rather than 3/7 here, a bias
    # of about 0.1% at the large test's sizes, which that test cannot resolve.
    capacity, stream, seeds = 3, 7, 10000
    stored = stored_stream_indices(reservoir_add, capacity, stream, seeds)
    frequency = np.bincount(stored.ravel(), minlength=stream) / seeds
    sigma = np.sqrt(capacity / stream * (1 - capacity / stream) / seeds)
    np.testing.assert_allclose(frequency, capacity / stream, atol=5 * sigma)
    off_by_one = stored_stream_indices(off_by_one_add, capacity, stream, seeds)
    biased = np.bincount(off_by_one.ravel(), minlength=stream) / seeds
    assert np.max(np.abs(biased - capacity / stream)) > 10 * sigma


# --- reservoir: mechanics ----------------------------------------------------------------


def test_reservoir_appends_in_order_until_full_and_counts():
    buffer = reservoir_init(5, jnp.zeros((2,)), jnp.int32(0))
    xs = jnp.arange(1.0, 7.0).reshape(3, 2)
    buffer = reservoir_add_batch(buffer, jax.random.key(1), xs, jnp.array([7, 8, 9]), 4)
    assert int(buffer.seen) == 3 and int(buffer.size) == 3
    np.testing.assert_array_equal(buffer.x[:3], xs)
    np.testing.assert_array_equal(buffer.y, [7, 8, 9, 0, 0])
    np.testing.assert_array_equal(buffer.task, [4, 4, 4, 0, 0])
    more = jnp.full((6, 2), -1.0)
    buffer = reservoir_add_batch(buffer, jax.random.key(2), more, jnp.arange(6), jnp.arange(6))
    assert int(buffer.seen) == 9 and int(buffer.size) == 5
    assert buffer.x.dtype == jnp.float32 and buffer.task.dtype == jnp.int32


@pytest.mark.parametrize("seed", range(4))
def test_reservoir_add_batch_is_sequential_add_with_split_keys(seed):
    # Capacity 4 and 11 + 9 offers: several draws of one batch land on the same slot, and the
    # batched scatter must keep the last of them, as the sequential adds do.
    buffer = reservoir_init(4, jnp.zeros((3,)), jnp.int32(0))
    batched = sequential = buffer
    add = jax.jit(reservoir_add)
    collided = False
    for part, size in enumerate((11, 9)):
        key = jax.random.fold_in(jax.random.key(seed), part)
        xs = jax.random.normal(jax.random.fold_in(key, 99), (size, 3))
        ys = jnp.arange(size) + 100 * part
        tasks = jnp.arange(size) % 3
        batched = reservoir_add_batch(batched, key, xs, ys, tasks)
        slots = []
        for k, x, y, t in zip(jax.random.split(key, size), xs, ys, tasks, strict=True):
            n = int(sequential.seen)
            j = int(jax.random.randint(k, (), 0, n + 1, dtype=jnp.int32))
            slots.append(n if n < 4 else j)
            sequential = add(sequential, k, x, y, t)
        kept = [s for s in slots if s < 4]
        collided |= len(kept) != len(set(kept))
        for a, b in zip(batched, sequential, strict=True):
            np.testing.assert_array_equal(a, b)
    assert collided


def test_reservoir_shapes_are_fixed_under_jit():
    buffer = reservoir_init(8, jnp.zeros((4, 4, 1)), jnp.int32(0))
    add = jax.jit(reservoir_add_batch)
    xs = jnp.ones((3, 4, 4, 1))
    after = add(buffer, jax.random.key(0), xs, jnp.zeros(3, jnp.int32), 1)
    after = add(after, jax.random.key(1), xs, jnp.zeros(3, jnp.int32), 2)
    assert jax.tree.map(lambda a: (a.shape, a.dtype), after) == jax.tree.map(
        lambda a: (a.shape, a.dtype), buffer
    )
    assert add._cache_size() == 1
    sample = jax.jit(buffer_sample, static_argnums=2)(after, jax.random.key(3), 5)
    assert sample.x.shape == (5, 4, 4, 1) and sample.y.shape == (5,)
    assert sample.task.shape == (5,) and sample.valid.shape == (5,)


def test_reservoir_stores_pytree_examples():
    example = {"image": jnp.zeros((2, 2)), "mask": jnp.zeros((), bool)}
    buffer = reservoir_init(3, example, jnp.int32(0))
    xs = {"image": jnp.ones((2, 2, 2)), "mask": jnp.array([True, False])}
    buffer = reservoir_add_batch(buffer, jax.random.key(0), xs, jnp.array([1, 2]), 0)
    np.testing.assert_array_equal(buffer.x["mask"], [True, False, False])
    sample = buffer_sample(buffer, jax.random.key(1), 4)
    assert sample.x["image"].shape == (4, 2, 2)


def test_sampling_an_empty_buffer_is_all_invalid():
    buffer = reservoir_init(4, jnp.zeros((2,)), jnp.int32(0))
    sample = buffer_sample(buffer, jax.random.key(0), 6)
    assert sample.x.shape == (6, 2) and not np.any(sample.valid)


def test_sampling_draws_only_filled_slots_uniformly():
    buffer = reservoir_init(10, jnp.int32(0), jnp.int32(0))
    buffer = reservoir_add_batch(buffer, jax.random.key(0), jnp.arange(1, 5), jnp.arange(4), 3)
    sample = buffer_sample(buffer, jax.random.key(1), 8000)
    assert np.all(sample.valid)
    # Unfilled slots hold 0; stored inputs are 1..4 with labels one less and task 3.
    np.testing.assert_array_equal(sample.y, sample.x - 1)
    np.testing.assert_array_equal(sample.task, 3)
    frequency = np.bincount(np.asarray(sample.x), minlength=5)[1:] / 8000
    np.testing.assert_allclose(frequency, 0.25, atol=5 * np.sqrt(0.25 * 0.75 / 8000))
    assert np.bincount(np.asarray(sample.x), minlength=5)[0] == 0


def test_reservoir_rejects_misshaped_examples_early():
    buffer = reservoir_init(4, jnp.zeros((2,)), jnp.int32(0))
    with pytest.raises(ValueError, match=r"expected \[2\]"):
        reservoir_add(buffer, jax.random.key(0), jnp.zeros((3,)), 0, 0)
    with pytest.raises(ValueError, match=r"expected \[batch, \*\[2\]\]"):
        reservoir_add_batch(buffer, jax.random.key(0), jnp.zeros((2,)), jnp.zeros(2), 0)
    with pytest.raises(ValueError, match="capacity"):
        reservoir_init(0, jnp.zeros(()), 0)


# --- episodic memory -----------------------------------------------------------------------


def test_episodic_add_writes_a_ring_per_task():
    memory = episodic_init(3, 4, jnp.int32(0), jnp.int32(0))
    memory = episodic_add(memory, jnp.array([10, 11, 12]), jnp.array([0, 1, 2]), 1)
    memory = episodic_add(memory, jnp.array([13, 14, 15]), jnp.array([3, 4, 5]), 1)
    # Six writes into four slots: 14 and 15 overwrote the oldest, 10 and 11.
    np.testing.assert_array_equal(memory.x[1], [14, 15, 12, 13])
    np.testing.assert_array_equal(memory.y[1], [4, 5, 2, 3])
    np.testing.assert_array_equal(memory.count, [0, 6, 0])
    np.testing.assert_array_equal(memory.x[0], 0)
    np.testing.assert_array_equal(memory.x[2], 0)


def test_episodic_batch_write_equals_one_at_a_time():
    memory = episodic_init(2, 4, jnp.zeros((2,)), jnp.int32(0))
    xs = jnp.arange(22.0).reshape(11, 2)
    ys = jnp.arange(11)
    batched = episodic_add(episodic_add(memory, xs[:2], ys[:2], 0), xs[2:], ys[2:], 0)
    single = memory
    add = jax.jit(episodic_add)
    for x, y in zip(xs, ys, strict=True):
        single = add(single, x[None], y[None], 0)
    for a, b in zip(batched, single, strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(batched.y[0], [8, 9, 10, 7])


def test_episodic_task_id_out_of_range():
    memory = episodic_init(2, 3, jnp.int32(0), jnp.int32(0))
    with pytest.raises(ValueError, match=r"task_id must be in \[0, 2\)"):
        episodic_add(memory, jnp.ones(2, jnp.int32), jnp.ones(2, jnp.int32), 2)
    traced = jax.jit(episodic_add)(memory, jnp.ones(2, jnp.int32), jnp.ones(2, jnp.int32), 5)
    for a, b in zip(traced, memory, strict=True):
        np.testing.assert_array_equal(a, b)


def test_episodic_valid_marks_filled_slots():
    memory = episodic_init(3, 4, jnp.int32(0), jnp.int32(0))
    memory = episodic_add(memory, jnp.ones(6, jnp.int32), jnp.ones(6, jnp.int32), 0)
    memory = episodic_add(memory, jnp.ones(2, jnp.int32), jnp.ones(2, jnp.int32), 2)
    np.testing.assert_array_equal(
        episodic_valid(memory), [[1, 1, 1, 1], [0, 0, 0, 0], [1, 1, 0, 0]]
    )


def filled_memory():
    """Task 0 holds 3 of its 4 slots, task 1 holds 2, task 2 all 4, task 3 none.

    Inputs encode where they came from: ``x = 100 * task + i + 1`` for the task's i-th example
    (0 marks empty slots); task 2 was offered 6, so its ring kept only x = 203 .. 206.
    """
    memory = episodic_init(4, 4, jnp.int32(0), jnp.int32(0))
    for task, n in [(0, 3), (1, 2), (2, 6)]:
        xs = 100 * task + jnp.arange(n, dtype=jnp.int32) + 1
        memory = episodic_add(memory, xs, jnp.full((n,), task, jnp.int32), task)
    return memory


def test_episodic_sample_only_stored_examples_of_earlier_tasks():
    memory = filled_memory()
    sample = jax.jit(episodic_sample, static_argnums=2)(memory, jax.random.key(0), 6000, 2)
    x = np.asarray(sample.x)
    assert np.all(sample.valid)
    assert set(np.unique(x)) == {1, 2, 3, 101, 102}
    np.testing.assert_array_equal(sample.task, x // 100)
    np.testing.assert_array_equal(sample.y, sample.task)
    # Uniform over the five stored examples, so task 0 is drawn 3/2 as often as task 1.
    counts = np.array([np.sum(x == v) for v in [1, 2, 3, 101, 102]]) / 6000
    np.testing.assert_allclose(counts, 1 / 5, atol=5 * np.sqrt(1 / 5 * 4 / 5 / 6000))


def test_episodic_sample_with_traced_bound_and_empty_tasks():
    memory = filled_memory()
    sample = jax.jit(episodic_sample, static_argnums=2)
    for up_to, allowed in [(1, {1, 2, 3}), (3, None), (4, None)]:
        x = np.asarray(sample(memory, jax.random.key(up_to), 4000, jnp.int32(up_to)).x)
        stored = {1, 2, 3, 101, 102, 203, 204, 205, 206}
        assert set(np.unique(x)) == (allowed or stored)
    nothing = sample(memory, jax.random.key(0), 5, jnp.int32(0))
    assert nothing.x.shape == (5,) and not np.any(nothing.valid)
    empty = episodic_init(2, 3, jnp.zeros((2,)), jnp.int32(0))
    assert not np.any(sample(empty, jax.random.key(0), 5, jnp.int32(2)).valid)
    with pytest.raises(ValueError, match="up_to_task"):
        episodic_sample(memory, jax.random.key(0), 5, 7)


def test_reservoir_add_batch_offers_only_the_marked_rows():
    """Row i keeps the i-th split key: offering rows 1 and 3 is adding them one after the
    other with those keys; a traced ``False`` changes nothing."""
    buffer = reservoir_init(2, jnp.int32(0), jnp.int32(0))
    buffer = reservoir_add_batch(buffer, jax.random.key(1), jnp.array([7, 8]), jnp.zeros(2,
                                 jnp.int32), 0)
    xs, key = jnp.arange(4, dtype=jnp.int32) + 10, jax.random.key(5)
    offer = jnp.array([False, True, False, True])
    marked = jax.jit(reservoir_add_batch)(buffer, key, xs, xs, 1, offer=offer)
    single = buffer
    for i in (1, 3):
        single = reservoir_add(single, jax.random.split(key, 4)[i], xs[i], xs[i], 1)
    for a, b in zip(marked, single, strict=True):
        np.testing.assert_array_equal(a, b)
    assert int(marked.seen) == 4
    nothing = jax.jit(reservoir_add_batch)(buffer, key, xs, xs, 1, offer=jnp.bool_(False))
    for a, b in zip(nothing, buffer, strict=True):
        np.testing.assert_array_equal(a, b)


# --- episodic memory, one ring per class (A-GEM's reference layout) -----------------------


def test_per_class_memory_keeps_the_last_examples_of_every_class():
    memory = episodic_init(2, 6, jnp.int32(0), jnp.int32(0), num_classes=3)  # 2 per class
    assert memory.count.shape == (2, 3)
    # Class 0 is offered 10, 12, 13 (its ring keeps 13, 12), class 1 11 and 15, class 2
    # 14; label 5 is no class and is not stored.
    memory = episodic_add(memory, jnp.array([10, 11, 12, 13, 14, 15, 16]),
                          jnp.array([0, 1, 0, 0, 2, 1, 5]), 1)
    np.testing.assert_array_equal(memory.x[1], [13, 12, 11, 15, 14, 0])
    np.testing.assert_array_equal(memory.y[1], [0, 0, 1, 1, 2, 0])
    np.testing.assert_array_equal(memory.count, [[0, 0, 0], [3, 2, 1]])
    np.testing.assert_array_equal(episodic_valid(memory),
                                  [[0, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0]])
    # Class 1's ring continues where it stopped: 20 and 21 replace 11 and 15.
    memory = episodic_add(memory, jnp.array([20, 21]), jnp.array([1, 1]), 1)
    np.testing.assert_array_equal(memory.x[1], [13, 12, 20, 21, 14, 0])
    np.testing.assert_array_equal(memory.x[0], 0)


def test_per_class_batch_write_equals_one_at_a_time():
    memory = episodic_init(2, 8, jnp.zeros((2,)), jnp.int32(0), num_classes=4)
    labels = jnp.array([0, 1, 0, 0, 3, 0, 1, 2, 0, 3, 3])
    xs = jnp.arange(22.0).reshape(11, 2)
    batched = jax.jit(episodic_add)(memory, xs, labels, 1)
    single = memory
    for x, y in zip(xs, labels, strict=True):
        single = episodic_add(single, x[None], y[None], 1)
    for a, b in zip(batched, single, strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(batched.count[1], [5, 2, 1, 3])


def test_per_class_memory_needs_a_multiple_and_integer_labels():
    with pytest.raises(ValueError, match="multiple of num_classes=4"):
        episodic_init(2, 6, jnp.int32(0), jnp.int32(0), num_classes=4)
    with pytest.raises(ValueError, match="integer class labels"):
        episodic_init(2, 8, jnp.int32(0), jnp.zeros(3), num_classes=4)


def class_memory():
    """Three tasks, 2 classes x 2 slots each: task 0 holds 3 examples, task 1 all 4, task 2
    one; ``x = 100 * task + i + 1`` for the task's i-th example."""
    memory = episodic_init(3, 4, jnp.int32(0), jnp.int32(0), num_classes=2)
    for task, labels in [(0, [0, 0, 1]), (1, [1, 0, 1, 0]), (2, [1])]:
        xs = 100 * task + jnp.arange(len(labels), dtype=jnp.int32) + 1
        memory = episodic_add(memory, xs, jnp.array(labels), task)
    return memory


def test_per_class_sampling_with_replacement_is_uniform_over_stored_examples():
    sample = jax.jit(episodic_sample, static_argnums=2)(class_memory(), jax.random.key(0),
                                                         7000, 2)
    x = np.asarray(sample.x)
    stored = [1, 2, 3, 101, 102, 103, 104]
    assert set(np.unique(x)) == set(stored) and np.all(sample.valid)
    np.testing.assert_array_equal(sample.task, x // 100)
    counts = np.array([np.sum(x == v) for v in stored]) / 7000
    np.testing.assert_allclose(counts, 1 / 7, atol=5 * np.sqrt(1 / 7 * 6 / 7 / 7000))


@pytest.mark.parametrize("layout", ["per_task", "per_class"])
def test_sampling_without_replacement_draws_distinct_stored_examples(layout):
    memory = filled_memory() if layout == "per_task" else class_memory()
    stored = {1, 2, 3, 101, 102} if layout == "per_task" else {1, 2, 3, 101, 102, 103, 104}
    draw = jax.jit(episodic_sample, static_argnums=2, static_argnames="replace")
    inclusions = np.zeros(300)
    for seed in range(400):
        sample = draw(memory, jax.random.key(seed), 4, jnp.int32(2), replace=False)
        x = np.asarray(sample.x)
        assert x.shape == (4,) and np.all(sample.valid)
        assert len(set(x)) == 4 and set(x) <= stored  # no duplicates, past tasks only
        np.testing.assert_array_equal(sample.task, x // 100)
        inclusions[x] += 1
    # Every stored example is in a draw with probability 4 / |stored|.
    p = 4 / len(stored)
    np.testing.assert_allclose(inclusions[sorted(stored)] / 400, p,
                               atol=5 * np.sqrt(p * (1 - p) / 400))


def test_sampling_without_replacement_takes_the_whole_memory_when_smaller():
    memory = class_memory()
    draw = jax.jit(episodic_sample, static_argnums=2, static_argnames="replace")
    sample = draw(memory, jax.random.key(3), 10, jnp.int32(1), replace=False)
    # Task 0 holds 3 examples, fewer than the 10 asked: all three, then placeholders; the
    # memory has 12 slots, so 10 rows come back.
    assert sample.x.shape == (10,)
    assert sorted(np.asarray(sample.x)[np.asarray(sample.valid)]) == [1, 2, 3]
    assert int(np.sum(sample.valid)) == 3
    placeholders = ~np.asarray(sample.valid)
    assert np.all(np.asarray(sample.x)[placeholders] == 0)
    assert np.all(np.asarray(sample.task)[placeholders] == 0)
    # More rows than slots: the whole memory's 12 slots, 8 of them stored for up_to_task=3.
    whole = draw(memory, jax.random.key(4), 50, jnp.int32(3), replace=False)
    assert whole.x.shape == (12,) and int(np.sum(whole.valid)) == 8
    assert not np.any(draw(memory, jax.random.key(5), 4, jnp.int32(0), replace=False).valid)
