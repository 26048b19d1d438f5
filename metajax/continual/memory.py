"""Replay memories as fixed-shape pytrees: a reservoir buffer and a per-task episodic memory.

Every memory is a ``NamedTuple`` of arrays whose shapes never change, plus integer counters,
so adding and sampling are pure functions that run under ``jit`` and inside ``lax.scan``,
with the randomness drawn on device. Stored inputs and targets may be arrays or pytrees of
arrays; each leaf gains a leading memory axis.

- :class:`ReservoirBuffer`: one buffer over the whole stream, filled by Vitter's Algorithm R
  (Vitter, 1985, "Random Sampling with a Reservoir"), so that after ``n`` offered examples
  each of them is stored with probability ``min(1, capacity / n)``; the memory of experience
  replay in Chaudhry et al., 2019, "On Tiny Episodic Memories in Continual Learning" and of
  MER / La-MAML.
- :class:`EpisodicMemory`: ``per_task`` slots for each task, written as rings, so each task
  keeps its most recent examples: one ring per task, the memory of GEM (Lopez-Paz and
  Ranzato, 2017, "Gradient Episodic Memory for Continual Learning"), or one ring per class
  within each task, the memory of A-GEM's reference code (Chaudhry et al., 2019, "Efficient
  Lifelong Learning with A-GEM"), which keeps as many examples of every class.

Sampling has a fixed output shape and draws with replacement, or (episodic memories)
without; a ``valid [batch]`` mask says which drawn rows are real examples (all ``False``
while nothing eligible is stored), so a caller weights the replay loss by the mask instead
of branching in Python.
"""

from __future__ import annotations

import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp

from metajax._checks import check_int
from metajax.types import PyTree


class ReservoirBuffer(NamedTuple):
    """A reservoir-sampled replay buffer.

    Attributes:
      x: stored inputs, each leaf ``[capacity, *example_shape]``.
      y: stored targets, each leaf ``[capacity, *target_shape]`` (``[capacity]`` for labels).
      task: ``[capacity]`` int32, the task id each stored example came from.
      seen: ``[]`` int32, how many stream examples have been offered so far (int32, so at
        most ``2**31 - 1`` examples).
      size: ``[]`` int32, how many slots are filled, ``min(seen, capacity)``; slots
        ``0 .. size - 1`` are the filled ones.
    """

    x: PyTree
    y: PyTree
    task: jax.Array
    seen: jax.Array
    size: jax.Array


class EpisodicMemory(NamedTuple):
    """A per-task ring-buffer memory (GEM, A-GEM), in one of two layouts.

    The shape of ``count`` tells them apart:

    - one ring per task, ``count [num_tasks]``: task ``k`` holds ``min(count[k], per_task)``
      examples in slots ``0 .. that - 1`` (GEM's reference code; La-MAML's A-GEM);
    - one ring per class, ``count [num_tasks, num_classes]``: the ``per_task`` slots of a task
      are ``num_classes`` rings of ``per_class = per_task // num_classes`` slots, class ``c``
      in slots ``c * per_class .. (c + 1) * per_class - 1``, so a task keeps the last
      ``per_class`` examples of every class (A-GEM's reference code, ``fc_permute_mnist.py``:
      25 per class). Class ``c`` of task ``k`` holds ``min(count[k, c], per_class)``
      examples in the first slots of its ring.

    Attributes:
      x: stored inputs, each leaf ``[num_tasks, per_task, *example_shape]``.
      y: stored targets, each leaf ``[num_tasks, per_task, *target_shape]``.
      count: ``[num_tasks]`` or ``[num_tasks, num_classes]`` int32, how many examples were
        ever written for each task (each class of each task).
    """

    x: PyTree
    y: PyTree
    count: jax.Array


class ReplaySample(NamedTuple):
    """A batch drawn from a memory (``batch`` rows: the requested size, or a whole smaller
    memory drawn without replacement).

    Attributes:
      x: inputs, each leaf ``[batch, *example_shape]``.
      y: targets, each leaf ``[batch, *target_shape]``.
      task: ``[batch]`` int32, the task id of each drawn example.
      valid: ``[batch]`` bool; ``False`` rows are placeholders (zeros, task 0) drawn while no
        eligible example is stored and must be masked out of any loss.
    """

    x: PyTree
    y: PyTree
    task: jax.Array
    valid: jax.Array


def _stacked_zeros(leading: tuple[int, ...], example: PyTree) -> PyTree:
    """Zeros of shape ``[*leading, *leaf.shape]`` for every leaf of one ``example``."""

    def zeros(leaf):
        if not (hasattr(leaf, "shape") and hasattr(leaf, "dtype")):
            leaf = jnp.asarray(leaf)
        return jnp.zeros((*leading, *leaf.shape), leaf.dtype)

    return jax.tree.map(zeros, example)


def _check_like(name: str, stored: PyTree, value: PyTree, axes: int, batched: bool) -> None:
    """Check that ``value`` looks like one example (or a batch of them) of the ``stored`` ones.

    Stored leaves carry ``axes`` memory axes in front of the example shape; ``value`` leaves
    must have the example shape, behind one batch axis when ``batched``. Shapes are static,
    so this runs at trace time and raises before anything is compiled.
    """
    if jax.tree.structure(stored) != jax.tree.structure(value):
        raise ValueError(
            f"{name} has structure {jax.tree.structure(value)} but the memory stores "
            f"{jax.tree.structure(stored)}; pass examples shaped like the init example"
        )
    for s, v in zip(jax.tree.leaves(stored), jax.tree.leaves(value), strict=True):
        example_shape = tuple(s.shape[axes:])
        shape = tuple(jnp.shape(v))
        if len(shape) != batched + len(example_shape) or shape[batched:] != example_shape:
            expected = f"[batch, *{list(example_shape)}]" if batched else str(list(example_shape))
            raise ValueError(
                f"{name} leaf has shape {list(shape)}, expected {expected} "
                "(the example shape given at init)"
            )


def _write(stored: PyTree, index, value: PyTree) -> PyTree:
    """``stored.at[index].set(value)`` on every leaf; out-of-range indices write nothing."""
    return jax.tree.map(
        lambda s, v: s.at[index].set(jnp.asarray(v).astype(s.dtype), mode="drop"), stored, value
    )


def _after(index: jax.Array, after: PyTree | None) -> jax.Array:
    """``index`` unchanged, but computed from ``after`` (values read from the memory earlier
    in the same step), so that XLA orders the read before the write.

    Without a data dependency from read to write, XLA may schedule the in-place write first
    and then has to copy the whole memory, every step, to keep the read's operand intact
    (an optimization barrier does not prevent it). ``x > inf`` is false for every float,
    NaN included, and XLA cannot fold it, so the dependency costs one scalar comparison.
    """
    floats = [leaf for leaf in jax.tree.leaves(after)
              if jnp.issubdtype(jnp.result_type(leaf), jnp.inexact) and jnp.size(leaf)]
    if not floats:
        return index
    zero = (jnp.ravel(floats[0])[0].real > jnp.inf).astype(index.dtype)
    return index + zero


def _gather(stored: PyTree, index) -> PyTree:
    return jax.tree.map(lambda s: s[index], stored)


def reservoir_init(capacity: int, example_x: PyTree, example_y: PyTree) -> ReservoirBuffer:
    """An empty reservoir of ``capacity`` slots for examples shaped like the given ones.

    Args:
      capacity: number of slots (Python int >= 1).
      example_x: one input (no leading batch axis), an array, ``jax.ShapeDtypeStruct`` or a
        pytree of them; only shapes and dtypes are used.
      example_y: one target, likewise (e.g. ``jnp.int32(0)`` for a class label).

    Returns:
      A :class:`ReservoirBuffer` of zeros with ``seen = size = 0``.
    """
    check_int("capacity", capacity)
    return ReservoirBuffer(
        x=_stacked_zeros((capacity,), example_x),
        y=_stacked_zeros((capacity,), example_y),
        task=jnp.zeros((capacity,), jnp.int32),
        seen=jnp.zeros((), jnp.int32),
        size=jnp.zeros((), jnp.int32),
    )


def reservoir_add(
    buffer: ReservoirBuffer, key: jax.Array, x: PyTree, y: PyTree, task_id, *,
    after: PyTree | None = None,
) -> ReservoirBuffer:
    """Offer one stream example to the reservoir (Vitter's Algorithm R).

    With ``n = seen`` examples offered before this one: while ``n < capacity`` the example is
    appended in slot ``n``; afterwards ``j ~ Uniform{0, ..., n}`` is drawn and the example
    replaces slot ``j`` if ``j < capacity``, and is dropped otherwise. By induction every one
    of the ``n + 1`` examples offered so far is then stored with probability
    ``capacity / (n + 1)``.

    Args:
      buffer: the current :class:`ReservoirBuffer`.
      key: a PRNG key, used only once the buffer is full.
      x: one input, shaped like ``example_x`` at init.
      y: one target, shaped like ``example_y`` at init.
      task_id: int scalar (may be traced), stored with the example.
      after: optional values read from this memory earlier in the same step (a replay
        sample, gradients on it): the write is made to follow them, so that inside a jitted
        ``lax.scan`` XLA updates the memory in place instead of copying all of it per step.

    Returns:
      The new buffer; ``seen`` grows by one.
    """
    _check_like("x", buffer.x, x, 1, batched=False)
    _check_like("y", buffer.y, y, 1, batched=False)
    capacity = buffer.task.shape[0]
    j = jax.random.randint(key, (), 0, buffer.seen + 1, dtype=jnp.int32)
    # A slot >= capacity means "not kept"; the drop-mode write then leaves the buffer as is.
    slot = _after(jnp.where(buffer.seen < capacity, buffer.seen, j), after)
    seen = buffer.seen + 1
    return ReservoirBuffer(
        x=_write(buffer.x, slot, x),
        y=_write(buffer.y, slot, y),
        task=buffer.task.at[slot].set(jnp.asarray(task_id, jnp.int32), mode="drop"),
        seen=seen,
        size=jnp.minimum(seen, capacity).astype(jnp.int32),
    )


def reservoir_add_batch(
    buffer: ReservoirBuffer, key: jax.Array, xs: PyTree, ys: PyTree, task_id, *,
    after: PyTree | None = None, offer: jax.Array | bool | None = None,
) -> ReservoirBuffer:
    """Offer a batch of stream examples: the same result, draw for draw, as offering them
    one after the other with :func:`reservoir_add` and ``jax.random.split(key, batch)``,
    computed as one scatter (an example overwritten by a later one of the batch is dropped).
    With ``offer``, only the rows it marks are offered (row ``i`` still uses the ``i``-th
    key); the others are neither stored nor counted.

    Args:
      buffer: the current :class:`ReservoirBuffer`.
      key: a PRNG key, split once per example.
      xs: inputs, each leaf ``[batch, *example_shape]``.
      ys: targets, each leaf ``[batch, *target_shape]``.
      task_id: an int scalar for the whole batch or an int ``[batch]`` array.
      after: optional values read from this memory earlier in the same step (a replay
        sample, gradients on it): the write is made to follow them, so that inside a jitted
        ``lax.scan`` XLA updates the memory in place instead of copying all of it per step.
      offer: optional bool, a scalar or ``[batch]`` (may be traced): which rows are offered.
        A traced ``False`` makes the call a no-op of fixed shape, for a write that happens
        in some iterations of a loop only.

    Returns:
      The new buffer; ``seen`` grows by the number of offered rows (``batch`` by default).
    """
    _check_like("xs", buffer.x, xs, 1, batched=True)
    _check_like("ys", buffer.y, ys, 1, batched=True)
    batch = jax.tree.leaves(xs)[0].shape[0]
    for leaf in jax.tree.leaves((xs, ys)):
        if leaf.shape[0] != batch:
            raise ValueError(
                f"xs and ys leaves must share the batch axis, got {leaf.shape[0]} and {batch}"
            )
    task_ids = jnp.asarray(task_id, jnp.int32)
    if task_ids.ndim not in (0, 1) or (task_ids.ndim == 1 and task_ids.shape[0] != batch):
        raise ValueError(
            f"task_id must be a scalar or a [batch={batch}] array, got shape {task_ids.shape}"
        )
    task_ids = jnp.broadcast_to(task_ids, (batch,))
    capacity = buffer.task.shape[0]
    if offer is None:
        offer = jnp.ones((batch,), bool)
    offer = jnp.broadcast_to(jnp.asarray(offer, bool), (batch,))
    # All slots at once, with the draws the sequential adds would make: example i is offered
    # after n_i = seen + (offered rows before i) others and draws j_i ~ U{0..n_i} from its
    # own split key.
    before = jnp.cumsum(offer.astype(jnp.int32)) - offer.astype(jnp.int32)
    offered = buffer.seen + before
    draws = jax.vmap(lambda k, n: jax.random.randint(k, (), 0, n + 1, dtype=jnp.int32))(
        jax.random.split(key, batch), offered
    )
    slots = jnp.where(offer, jnp.where(offered < capacity, offered, draws), capacity)
    # In a row of adds a later example landing on the same slot overwrites an earlier one;
    # drop the earlier writes so the scatter has no duplicate slots and no order to depend on.
    order = jnp.arange(batch)
    overwritten = jnp.any((slots[:, None] == slots[None, :]) & (order[None, :] > order[:, None]),
                          axis=1)
    slots = _after(jnp.where(overwritten, capacity, slots), after)
    seen = buffer.seen + jnp.sum(offer.astype(jnp.int32))
    return ReservoirBuffer(
        x=_write(buffer.x, slots, xs),
        y=_write(buffer.y, slots, ys),
        task=buffer.task.at[slots].set(task_ids, mode="drop"),
        seen=seen,
        size=jnp.minimum(seen, capacity).astype(jnp.int32),
    )


def buffer_sample(buffer: ReservoirBuffer, key: jax.Array, batch_size: int) -> ReplaySample:
    """Draw ``batch_size`` examples uniformly from the filled slots, with replacement.

    The output shape is fixed whatever ``size`` is. While the buffer is empty nothing can be
    drawn: every row is then slot 0 (zeros) and ``valid`` is all ``False``.

    Args:
      buffer: a :class:`ReservoirBuffer`.
      key: a PRNG key.
      batch_size: number of draws (Python int >= 1).

    Returns:
      A :class:`ReplaySample` with ``x``, ``y`` leaves ``[batch_size, ...]``, ``task`` and
      ``valid`` ``[batch_size]``.
    """
    check_int("batch_size", batch_size)
    index = jax.random.randint(key, (batch_size,), 0, jnp.maximum(buffer.size, 1))
    return ReplaySample(
        x=_gather(buffer.x, index),
        y=_gather(buffer.y, index),
        task=buffer.task[index],
        valid=jnp.broadcast_to(buffer.size > 0, (batch_size,)),
    )


def _per_class(memory: EpisodicMemory) -> int | None:
    """Slots per class ring of a per-class memory; ``None`` for a per-task one."""
    if memory.count.ndim == 1:
        return None
    per_task = jax.tree.leaves(memory.x)[0].shape[1]
    return per_task // memory.count.shape[1]


def episodic_init(
    num_tasks: int, per_task: int, example_x: PyTree, example_y: PyTree, *,
    num_classes: int | None = None,
) -> EpisodicMemory:
    """An empty episodic memory of ``per_task`` slots for each of ``num_tasks`` tasks.

    Args:
      num_tasks: number of tasks in the stream (Python int >= 1).
      per_task: slots per task (Python int >= 1), GEM's ``n_memories``.
      example_x: one input, as in :func:`reservoir_init`.
      example_y: one target, likewise.
      num_classes: with it, the per-class layout (see :class:`EpisodicMemory`): each task's
        slots are ``num_classes`` rings of ``per_task // num_classes``, and :func:`episodic_add`
        files each example by its label. ``per_task`` must then be a multiple of it and the
        targets integer class labels (``example_y`` a scalar). Without it, one ring per task.

    Returns:
      An :class:`EpisodicMemory` of zeros with every ``count`` 0.
    """
    check_int("num_tasks", num_tasks)
    check_int("per_task", per_task)
    count_shape: tuple[int, ...] = (num_tasks,)
    if num_classes is not None:
        check_int("num_classes", num_classes)
        if per_task % num_classes:
            raise ValueError(
                f"per_task={per_task} must be a multiple of num_classes={num_classes}: the "
                f"per-class layout gives every class a ring of per_task // num_classes slots "
                f"(e.g. per_task={num_classes * max(per_task // num_classes, 1)})"
            )
        label = jax.tree.leaves(example_y)
        if (len(label) != 1 or jnp.ndim(label[0]) != 0
                or not jnp.issubdtype(jnp.result_type(label[0]), jnp.integer)):
            raise ValueError(
                "num_classes (the per-class layout) needs integer class labels as targets: "
                f"example_y must be one integer scalar, got {example_y!r}"
            )
        count_shape = (num_tasks, num_classes)
    return EpisodicMemory(
        x=_stacked_zeros((num_tasks, per_task), example_x),
        y=_stacked_zeros((num_tasks, per_task), example_y),
        count=jnp.zeros(count_shape, jnp.int32),
    )


def _class_slots(memory: EpisodicMemory, labels: jax.Array, task: jax.Array, per_class: int):
    """Per-class layout: the slot of each row of a batch in task ``task``'s ring of its
    label, ``per_task`` (written nowhere) for rows not kept, and the per-class counts added.

    Rows of one label take consecutive ring positions in batch order, so, as with one row
    at a time, a label offered more than ``per_class`` times keeps its last ``per_class``;
    the earlier rows are not written (their slots would collide). A label outside
    ``[0, num_classes)`` is not stored.
    """
    num_tasks, num_classes = memory.count.shape
    labels = labels.astype(jnp.int32)
    onehot = (labels[:, None] == jnp.arange(num_classes, dtype=jnp.int32)).astype(jnp.int32)
    # Rows of the same label earlier in the batch, and later in it.
    before = jnp.sum((jnp.cumsum(onehot, axis=0) - onehot) * onehot, axis=1)
    added = jnp.sum(onehot, axis=0)  # [num_classes]
    later = added[jnp.clip(labels, 0, num_classes - 1)] - before - 1
    known = (labels >= 0) & (labels < num_classes)
    cls = jnp.clip(labels, 0, num_classes - 1)
    start = memory.count[jnp.clip(task, 0, num_tasks - 1), cls]
    slots = cls * per_class + (start + before) % per_class
    keep = known & (later < per_class)
    return jnp.where(keep, slots, num_classes * per_class), added


def episodic_add(
    memory: EpisodicMemory, x: PyTree, y: PyTree, task_id, *, after: PyTree | None = None
) -> EpisodicMemory:
    """Ring-write a batch into the slots of task ``task_id``.

    One ring per task: example ``i`` of the batch goes to slot ``(count[task_id] + i) %
    per_task``, so each task keeps its ``per_task`` most recent examples and the oldest are
    overwritten first. GEM's reference code also writes its memory as a ring, but cuts a
    batch at the end of the buffer and drops the remainder; here the write wraps around
    instead. A batch longer than ``per_task`` leaves its last ``per_task`` examples.

    One ring per class (a memory made with ``num_classes``): each example goes to the next
    slot of its label's ring in task ``task_id``, in batch order, so every class keeps its
    ``per_class`` most recent examples, as A-GEM's reference code writes its memory (one
    example after the other, after the update). A label outside ``[0, num_classes)`` is
    not stored.

    Args:
      memory: the current :class:`EpisodicMemory`.
      x: inputs, each leaf ``[batch, *example_shape]``.
      y: targets, each leaf ``[batch, *target_shape]`` (per-class layout: integer labels
        ``[batch]``).
      task_id: int scalar in ``[0, num_tasks)``. A Python int out of range raises; a traced
        one out of range writes nothing.
      after: optional values read from this memory earlier in the same step (a replay
        sample, gradients on it): the write is made to follow them, so that inside a jitted
        ``lax.scan`` XLA updates the memory in place instead of copying all of it per step.

    Returns:
      The new memory; ``count[task_id]`` grows by ``batch`` (per class: each class's count
      by its rows in the batch).
    """
    _check_like("x", memory.x, x, 2, batched=True)
    _check_like("y", memory.y, y, 2, batched=True)
    num_tasks = memory.count.shape[0]
    per_task = jax.tree.leaves(memory.x)[0].shape[1]
    batch = jax.tree.leaves(x)[0].shape[0]
    for leaf in jax.tree.leaves((x, y)):
        if leaf.shape[0] != batch:
            raise ValueError(
                f"x and y leaves must share the batch axis, got {leaf.shape[0]} and {batch}"
            )
    if isinstance(task_id, numbers.Integral) and not 0 <= task_id < num_tasks:
        raise ValueError(f"task_id must be in [0, {num_tasks}), got {task_id}")
    task_id = jnp.asarray(task_id, jnp.int32)
    in_range = (task_id >= 0) & (task_id < num_tasks)
    row = jnp.where(in_range, task_id, num_tasks)
    per_class = _per_class(memory)
    if per_class is not None:
        slots, added = _class_slots(memory, jnp.asarray(jax.tree.leaves(y)[0]), task_id,
                                    per_class)
        slots = _after(slots, after)
        return EpisodicMemory(
            x=_write(memory.x, (row, slots), x),
            y=_write(memory.y, (row, slots), y),
            count=memory.count.at[row].add(added, mode="drop"),
        )
    skipped = max(batch - per_task, 0)
    if skipped:
        # Only the last per_task examples survive; writing the rest would collide with them.
        x = jax.tree.map(lambda leaf: leaf[skipped:], x)
        y = jax.tree.map(lambda leaf: leaf[skipped:], y)
    start = memory.count[jnp.clip(task_id, 0, num_tasks - 1)] + skipped
    slots = _after((start + jnp.arange(batch - skipped, dtype=jnp.int32)) % per_task, after)
    return EpisodicMemory(
        x=_write(memory.x, (row, slots), x),
        y=_write(memory.y, (row, slots), y),
        count=memory.count.at[row].add(batch, mode="drop"),
    )


def _segments(memory: EpisodicMemory) -> tuple[jax.Array, int]:
    """The rings of a memory: how many examples each holds, ``[num_tasks, rings]`` (one ring
    per task or one per class of each task), and the slots of one ring."""
    per_task = jax.tree.leaves(memory.x)[0].shape[1]
    per_class = _per_class(memory)
    if per_class is None:
        return jnp.minimum(memory.count, per_task)[:, None], per_task
    return jnp.minimum(memory.count, per_class), per_class


def episodic_valid(memory: EpisodicMemory) -> jax.Array:
    """``[num_tasks, per_task]`` bool: which slots hold a stored example."""
    filled, ring = _segments(memory)
    per_task = jax.tree.leaves(memory.x)[0].shape[1]
    slot = jnp.arange(per_task)
    return (slot % ring)[None, :] < filled[:, slot // ring]


def episodic_sample(
    memory: EpisodicMemory, key: jax.Array, batch_size: int, up_to_task, *,
    replace: bool = True,
) -> ReplaySample:
    """Draw examples uniformly from the stored examples of tasks ``< up_to_task``.

    Every stored example of tasks ``0 .. up_to_task - 1`` is equally likely (so a task weighs
    in proportion to how many examples it holds). While none of those tasks holds anything,
    every row is a placeholder and ``valid`` is all ``False``.

    - ``replace=True``: ``batch_size`` independent draws.
    - ``replace=False``: ``batch_size`` distinct stored examples, every subset of that size
      equally likely, or every stored one when at most ``batch_size`` are: A-GEM's reference
      batch (``fc_permute_mnist.py`` takes the whole memory of the past tasks while it holds
      at most 256 examples, else ``np.random.choice(..., replace=False)``). Each slot gets a
      uniform random score and the ``batch_size`` highest-scoring stored slots are taken
      (``lax.top_k``), so the shape stays fixed; rows past the stored examples are
      placeholders. The output has ``min(batch_size, num_tasks * per_task)`` rows: a
      memory with fewer slots than that can be drawn whole.

    Args:
      memory: an :class:`EpisodicMemory` (either layout).
      key: a PRNG key.
      batch_size: number of draws (Python int >= 1).
      up_to_task: int scalar (may be traced), the first task *not* sampled from; the current
        task's id gives replay of the past tasks only.
      replace: draw with replacement (default) or without.

    Returns:
      A :class:`ReplaySample` with ``x``, ``y`` leaves ``[rows, ...]``, ``task`` and
      ``valid`` ``[rows]``; placeholder rows are zeros of task 0.
    """
    check_int("batch_size", batch_size)
    num_tasks = memory.count.shape[0]
    if isinstance(up_to_task, numbers.Integral) and not 0 <= up_to_task <= num_tasks:
        raise ValueError(f"up_to_task must be in [0, {num_tasks}], got {up_to_task}")
    eligible = jnp.arange(num_tasks) < up_to_task
    if not replace:
        return _sample_distinct(memory, key, batch_size, eligible)
    filled, ring = _segments(memory)
    rings = filled.shape[1]
    filled = jnp.where(eligible[:, None], filled, 0).reshape(-1)
    ends = jnp.cumsum(filled)
    total = ends[-1]
    flat = jax.random.randint(key, (batch_size,), 0, jnp.maximum(total, 1))
    # Draw k lies in ring i when ends[i - 1] <= k < ends[i]; empty rings own no draw.
    segment = jnp.minimum(jnp.searchsorted(ends, flat, side="right"), filled.shape[0] - 1)
    task, ring_id = segment // rings, segment % rings
    slot = ring_id * ring + flat - (ends[segment] - filled[segment])
    return ReplaySample(
        x=_gather(memory.x, (task, slot)),
        y=_gather(memory.y, (task, slot)),
        task=task.astype(jnp.int32),
        valid=jnp.broadcast_to(total > 0, (batch_size,)),
    )


def _sample_distinct(
    memory: EpisodicMemory, key: jax.Array, batch_size: int, eligible: jax.Array
) -> ReplaySample:
    """:func:`episodic_sample` without replacement (see there)."""
    per_task = jax.tree.leaves(memory.x)[0].shape[1]
    stored = (episodic_valid(memory) & eligible[:, None]).reshape(-1)
    rows = min(batch_size, stored.shape[0])
    # i.i.d. scores make the top ``rows`` a uniformly random subset of the stored slots;
    # slots that hold nothing score -1 and come last.
    scores = jnp.where(stored, jax.random.uniform(key, stored.shape), -1.0)
    top, index = jax.lax.top_k(scores, rows)
    valid = top >= 0
    task = jnp.where(valid, index // per_task, 0).astype(jnp.int32)
    slot = jnp.where(valid, index % per_task, 0)

    def real(leaf):
        return jnp.where(valid.reshape(-1, *([1] * (leaf.ndim - 1))), leaf, 0).astype(leaf.dtype)

    return ReplaySample(
        x=jax.tree.map(real, _gather(memory.x, (task, slot))),
        y=jax.tree.map(real, _gather(memory.y, (task, slot))),
        task=task,
        valid=valid,
    )
