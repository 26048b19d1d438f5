"""How the task axis of a meta-batch is executed: ``vmap``, ``scan`` or chunks of both.

A meta-batch of tasks is embarrassingly parallel, but how it is mapped onto hardware matters
more than almost anything else for speed. One ``jax.vmap`` over all tasks makes every
operation a batched one (large matmuls, good for a GPU with memory to spare); a ``lax.scan``
over single tasks keeps every buffer the size of one task (cache-resident on a CPU, memory
bounded by one task) and sums the per-task gradients as it goes; chunks of ``k`` tasks,
vmapped inside and scanned over, sit between the two. The choice never changes the result
beyond float rounding (the order of a sum), so it is a performance setting:

``task_map``:
  * ``"vmap"``: one ``vmap`` over the whole task axis;
  * ``"scan"``: a ``lax.scan`` over tasks one at a time;
  * an int ``k >= 1``: chunks of ``k`` tasks, ``vmap`` inside a chunk, ``lax.scan`` over the
    chunks; a last partial chunk (when ``k`` does not divide the number of tasks) runs as one
    more ``vmap``;
  * ``"auto"``: the measured default of the backend, :func:`resolve_task_map`.

Every meta-learner takes ``task_map=`` (``mj.maml(..., task_map="scan")``); the functions here
are public for user-written meta-objectives. Given a :class:`~metajax.types.Task`, they check
first that it is a batch with a task axis (:func:`check_task_batch`), so that one task passed
without that axis is an error rather than a batch of one-example tasks.

Across devices the task axis is sharded first (:func:`sharded_map` here,
:mod:`metajax.train.parallel` for the meta-gradient) and each device's share then runs as
``task_map`` says.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from metajax.types import Task

TaskMap = Any
"""``"auto"``, ``"vmap"``, ``"scan"`` or a positive int (tasks per vmapped chunk)."""

TASK_MAPS: tuple[str, ...] = ("auto", "vmap", "scan")

# Measured with benchmarks/speed.py (benchmarks/RESULTS.md, "Task-axis execution"): on XLA:CPU
# a scan over single tasks is the fastest for the Omniglot and sinusoid meta-steps; on
# accelerators a vmap over the whole batch fills the device.
_DEFAULTS = {"cpu": "scan"}


def check_task_map(task_map: TaskMap) -> None:
    """Raise ``ValueError`` unless ``task_map`` is a valid choice (see the module docs)."""
    if isinstance(task_map, bool):
        raise ValueError(f"task_map must be one of {TASK_MAPS} or an int >= 1, got {task_map!r}")
    if isinstance(task_map, int):
        if task_map < 1:
            raise ValueError(f"task_map chunks must hold >= 1 task, got {task_map!r}")
        return
    if task_map not in TASK_MAPS:
        raise ValueError(f"task_map must be one of {TASK_MAPS} or an int >= 1, got {task_map!r}")


def resolve_task_map(task_map: TaskMap = "auto", backend: str | None = None) -> str | int:
    """The concrete ``"vmap"``, ``"scan"`` or chunk size for ``task_map``.

    ``"auto"`` is ``"scan"`` on CPU and ``"vmap"`` elsewhere (GPU, TPU); ``backend``
    defaults to ``jax.default_backend()``.
    """
    check_task_map(task_map)
    if task_map != "auto":
        return task_map
    backend = jax.default_backend() if backend is None else backend
    return _DEFAULTS.get(backend, "vmap")


_STACK_HINT = ("stack tasks on a leading axis, e.g. jax.tree.map(lambda a: a[None], task) for "
               "one task, or jax.tree.map(lambda *a: jnp.stack(a), *tasks) for a list")


def _shapes(tree: Any) -> Any:
    return jax.tree.map(lambda x: tuple(jnp.shape(x)), tree)


def check_task_batch(tasks: Task) -> int:
    """The number of tasks ``T`` of a :class:`~metajax.types.Task` batch; ``ValueError`` when
    ``tasks`` does not look like one.

    A batch of ``T`` tasks has a leading task axis on every leaf of ``support`` and ``query``
    and, after it, each task's arrays with their example axis (a :data:`~metajax.types.Batch`'s
    leading axis), e.g. ``x [T, K, 1]``, ``y [T, K]``. One task passed without its task axis
    would otherwise be read as its examples, each a task of one point, and give a meaningless
    meta-gradient with no error. So this requires:

    * every leaf to have at least two axes (task and example): this catches one unbatched
      task with rank-1 leaves, e.g. integer labels ``y [K]`` of a classification task, even
      when support and query have the same size;
    * every leaf of ``support`` and ``query`` to share the same leading size ``T``: this
      catches one unbatched task whose support and query sizes differ (``K != Q``).

    Not decidable from shapes, so not detected: one unbatched task whose leaves all have
    rank >= 2 (e.g. ``x [K, 1]``, ``y [K, 1]``) and whose support and query have the same
    number of examples (``K == Q``); it is read as ``K`` tasks of one example each.
    """
    leaves = jax.tree_util.tree_leaves_with_path(tuple(tasks))
    flat = [(("support", "query")[path[0].idx] + jax.tree_util.keystr(path[1:]), jnp.shape(x))
            for path, x in leaves]
    described = (f"support shapes {_shapes(tasks.support)}, query shapes "
                 f"{_shapes(tasks.query)}")
    if not flat:
        raise ValueError("a batch of tasks needs arrays in support and query, got none")
    low = [name for name, shape in flat if len(shape) < 2]
    if low:
        raise ValueError(
            f"a batch of tasks needs a leading task axis on every array of support and query, "
            f"then each task's arrays with their example axis (rank >= 2), but {low} "
            f"{'has' if len(low) == 1 else 'have'} fewer axes; got {described}. Is this one "
            f"task without its task axis? {_STACK_HINT}")
    sizes = sorted({shape[0] for _, shape in flat})
    if len(sizes) != 1:
        raise ValueError(
            f"every array of a batch of tasks needs the same leading task axis, got leading "
            f"sizes {sizes}: {described}. Is this one task without its task axis? "
            f"{_STACK_HINT}")
    return sizes[0]


def _num_tasks(tasks: Any) -> int:
    """The leading (task) axis size shared by every leaf of ``tasks``; a
    :class:`~metajax.types.Task` is checked by :func:`check_task_batch`."""
    if isinstance(tasks, Task):
        return check_task_batch(tasks)
    shapes = [jnp.shape(x) for x in jax.tree.leaves(tasks)]
    sizes = {shape[0] if shape else None for shape in shapes}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(
            f"every leaf of the task batch needs the same leading task axis, got shapes "
            f"{_shapes(tasks)}"
        )
    return sizes.pop()


def _chunks(task_map: str | int, num_tasks: int) -> int:
    """Tasks per chunk: 1 for scan, all for vmap, else ``min(k, num_tasks)``."""
    if task_map == "vmap":
        return num_tasks
    if task_map == "scan":
        return 1
    return min(int(task_map), num_tasks)


def _split(tasks: Any, size: int, num_tasks: int):
    """``(n, body [n, size, ...], rest [r, ...] or None)`` with ``n * size + r = num_tasks``;
    for ``size == 1`` the body is ``tasks`` itself (no chunk axis)."""
    n = num_tasks // size
    if size == 1:
        return n, tasks, None
    body = jax.tree.map(lambda x: x[: n * size].reshape(n, size, *x.shape[1:]), tasks)
    rest = None
    if n * size < num_tasks:
        rest = jax.tree.map(lambda x: x[n * size:], tasks)
    return n, body, rest


def _tree_add(a, b):
    return jax.tree.map(jnp.add, a, b)


def _tree_scale(tree, s):
    def scale(x):
        x = jnp.asarray(x)
        if not jnp.issubdtype(x.dtype, jnp.inexact):
            x = x.astype(jnp.float32)
        return x * jnp.asarray(s, x.dtype)

    return jax.tree.map(scale, tree)


def _scan_sum(fn, chunks):
    """``sum_c fn(chunks[c])`` by a ``lax.scan`` whose carry is the running sum (one compiled
    body; the per-chunk values are never stacked)."""
    first = jax.tree.map(lambda x: x[0], chunks)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(fn, first))
    total, _ = jax.lax.scan(lambda acc, c: (_tree_add(acc, fn(c)), None), zeros, chunks)
    return total


def sum_over_tasks(fn: Callable[[Any], Any], tasks: Any, task_map: TaskMap = "auto") -> Any:
    """``sum_i fn(task_i)`` over the leading task axis of ``tasks``, mapped by ``task_map``.

    ``fn(task) -> pytree`` handles one task (no task axis). The per-task values are never
    stacked when ``task_map`` is ``"scan"`` or a chunk size: they are added up in the carry of
    a ``lax.scan``, so memory holds one task's (or one chunk's) work at a time.
    """
    task_map = resolve_task_map(task_map)
    num_tasks = _num_tasks(tasks)

    def chunk_sum(chunk):
        return jax.tree.map(lambda x: jnp.sum(x, axis=0), jax.vmap(fn)(chunk))

    size = _chunks(task_map, num_tasks)
    if size == num_tasks:
        return chunk_sum(tasks)
    _, body, rest = _split(tasks, size, num_tasks)
    one = fn if size == 1 else chunk_sum
    total = _scan_sum(one, body)
    if rest is not None:
        total = _tree_add(total, chunk_sum(rest))
    return total


def mean_over_tasks(fn: Callable[[Any], Any], tasks: Any, task_map: TaskMap = "auto") -> Any:
    """``mean_i fn(task_i)``: :func:`sum_over_tasks` divided by the number of tasks."""
    return _tree_scale(sum_over_tasks(fn, tasks, task_map), 1.0 / _num_tasks(tasks))


def mean_value_and_grad(
    objective: Callable[[Any, Any], tuple[jax.Array, Any]],
    params: Any,
    tasks: Any,
    task_map: TaskMap = "auto",
) -> tuple[tuple[jax.Array, Any], Any]:
    """Value and gradient of ``mean_i objective(params, task_i)[0]`` with respect to ``params``.

    ``objective(params, task) -> (loss, aux)`` for one task. Returns
    ``((mean_loss, mean_aux), grads)``: ``aux`` (a pytree of per-task values) is averaged over
    the tasks. With ``"vmap"`` the mean over a vmapped batch is differentiated once; with
    ``"scan"`` or chunks each task's (chunk's) gradient is taken inside the scan and summed in
    its carry, which bounds memory by one task (chunk) and, on a CPU, keeps the working set
    in cache.
    """
    task_map = resolve_task_map(task_map)
    num_tasks = _num_tasks(tasks)
    size = _chunks(task_map, num_tasks)

    def batched(p, chunk):
        losses, aux = jax.vmap(objective, in_axes=(None, 0))(p, chunk)
        return jnp.sum(losses), jax.tree.map(lambda x: jnp.sum(x, axis=0), aux)

    def grad_of(fn, chunk):
        (loss, aux), grads = jax.value_and_grad(fn, has_aux=True)(params, chunk)
        return loss, aux, grads

    if size == num_tasks:
        loss, aux, grads = grad_of(batched, tasks)
    else:
        single = objective if size == 1 else batched
        _, body, rest = _split(tasks, size, num_tasks)
        loss, aux, grads = _scan_sum(lambda chunk: grad_of(single, chunk), body)
        if rest is not None:
            loss, aux, grads = _tree_add((loss, aux, grads), grad_of(batched, rest))
    scale = 1.0 / num_tasks
    return (loss * scale, _tree_scale(aux, scale)), _tree_scale(grads, scale)


def map_tasks(fn: Callable[[Any], Any], tasks: Any, task_map: TaskMap = "auto") -> Any:
    """``fn`` applied to every task, outputs stacked on a leading task axis.

    ``"vmap"`` maps the whole axis at once, ``"scan"`` one task at a time (``lax.map``), a chunk
    size ``k`` in vmapped chunks of ``k`` scanned over (the last partial chunk vmapped). For
    evaluation: adapting many tasks without holding all of their fast weights at once.
    """
    task_map = resolve_task_map(task_map)
    num_tasks = _num_tasks(tasks)
    size = _chunks(task_map, num_tasks)
    if size == num_tasks:
        return jax.vmap(fn)(tasks)
    if size == 1:
        return jax.lax.map(fn, tasks)
    # Chunks reshaped with explicit sizes (lax.map's batch_size infers one with -1, which
    # fails on zero-size leaves), a scan over the vmapped chunks, a vmap over the rest.
    n, body, rest = _split(tasks, size, num_tasks)
    _, out = jax.lax.scan(lambda carry, chunk: (carry, jax.vmap(fn)(chunk)), None, body)
    out = jax.tree.map(lambda x: x.reshape(n * size, *x.shape[2:]), out)
    if rest is not None:
        out = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), out, jax.vmap(fn)(rest))
    return out


def check_divisible(what: str, size: int, devices: int) -> None:
    """Raise ``ValueError`` unless ``size`` splits evenly over ``devices``, naming the
    nearest sizes that do."""
    if size % devices == 0:
        return
    lower, higher = (size // devices) * devices, (size // devices + 1) * devices
    sizes = f"{lower} or {higher}" if lower else f"{higher}"
    raise ValueError(
        f"{what}={size} cannot be split evenly over {devices} devices: use {sizes} "
        f"(a multiple of {devices}), or fewer devices (--devices)")


def sharded_map(fn: Callable[[Any], Any], items: Any, mesh: Mesh | None,
                local_map: Callable[[Callable, Any], Any] | None = None) -> Any:
    """``fn`` over the leading axis of ``items``, that axis sharded over ``mesh`` (inputs
    and outputs replicated: every process can read the result). The axis is padded (with
    copies of its first item) up to a multiple of the device count and the padding dropped
    from the result. ``local_map(fn, shard)`` maps one device's shard (default ``vmap``)."""
    local_map = local_map or (lambda f, xs: jax.vmap(f)(xs))
    if mesh is None:
        return local_map(fn, items)
    (axis,) = mesh.axis_names
    count = jax.tree.leaves(items)[0].shape[0]
    padded = -(-count // mesh.size) * mesh.size
    if padded != count:
        items = jax.tree.map(
            lambda x: jnp.concatenate([x, jnp.repeat(x[:1], padded - count, axis=0)]), items)

    def local(shard):
        out = local_map(fn, shard)
        return jax.lax.all_gather(out, axis, tiled=True)

    out = jax.shard_map(local, mesh=mesh, in_specs=P(axis), out_specs=P(),
                        check_vma=False)(items)
    return jax.tree.map(lambda x: x[:count], out)
