"""Train a continual learner on a stream, task by task, and measure it.

:func:`run` is the evaluation protocol of GEM (Lopez-Paz and Ranzato, 2017) and A-GEM
(Chaudhry et al., 2019): after training on each task, the test accuracy on every task fills
one row of the accuracy matrix ``R [T, T]``, which :func:`metajax.continual.metrics` turns
into ACC, BWT, forgetting, FWT and LCA. Everything between two tasks runs on device in one
compiled call.

A run can be checkpointed at every task boundary and resumed at the next unfinished task
(``on_task_state`` / ``resume_from``), with results bit for bit those of a run never
interrupted; a task that leaves the learner state non-finite raises :class:`NonFiniteTask`.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from metajax._checks import check_int
from metajax._tree import dtype_of
from metajax.continual.learners import ContinualLearner
from metajax.continual.metrics import metrics as summarize
from metajax.continual.metrics import metrics_over_seeds
from metajax.task_map import check_divisible, check_task_map, map_tasks
from metajax.types import PyTree, Stream

Carry = dict[str, Any]
"""Everything :func:`run` needs to continue after a task: a dict of arrays (a pytree with a
fixed structure and fixed shapes, whatever the task), see :func:`run`'s ``on_task_state``."""


class NonFiniteTask(ValueError):
    """Training on task ``task`` left NaN or infinity in the learner state (parameters,
    optimiser state, memory ...); ``seeds`` lists the seeds concerned (None without seeds)."""

    def __init__(self, message: str, task: int, seeds: list[int] | None = None):
        super().__init__(message)
        self.task = task
        self.seeds = seeds


def _nonfinite_leaves(tree: PyTree) -> list[str]:
    bad = []
    for path, leaf in jax.tree_util.tree_leaves_with_path(jax.device_get(tree)):
        value = np.asarray(leaf)
        if np.issubdtype(value.dtype, np.inexact) and not np.isfinite(value).all():
            bad.append("state" + jax.tree_util.keystr(path))
    return bad


def _all_finite(tree: PyTree) -> jax.Array:
    flags = [jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree)
             if jnp.issubdtype(jnp.asarray(leaf).dtype, jnp.inexact)]
    return jnp.all(jnp.stack(flags)) if flags else jnp.bool_(True)


class _DeviceStream(NamedTuple):
    train_x: jax.Array
    train_y: jax.Array
    test_x: jax.Array
    test_y: jax.Array
    class_mask: jax.Array | None


def _accuracy(apply_fn, params, x, y, mask_row) -> jax.Array:
    logits = apply_fn(params, x)
    if mask_row is not None:
        logits = jnp.where(mask_row, logits, -jnp.inf)
    return jnp.mean(jnp.argmax(logits, axis=-1) == y)


def run(
    learner: ContinualLearner | Callable[[dict[str, jax.Array]], ContinualLearner],
    stream: Stream,
    key: jax.Array,
    *,
    params: PyTree | Callable[[jax.Array], PyTree],
    apply_fn: Callable[[PyTree, Any], jax.Array],
    batch_size: int = 10,
    epochs: int = 1,
    lca_batches: int = 0,
    seeds: Sequence[int] | None = None,
    on_task: Callable[[int, np.ndarray], None] | None = None,
    seed_map: Any = "vmap",
    mesh: Any = None,
    settings: dict[str, Sequence[float]] | None = None,
    on_task_state: Callable[[int, Carry], None] | None = None,
    resume_from: tuple[int, Carry] | Callable[[Carry], tuple[int, Carry] | None] | None = None,
) -> dict[str, Any]:
    """Train ``learner`` on ``stream`` task after task; return ``R [T, T]`` and its metrics.

    Training: task ``t`` runs ``epochs`` passes over ``stream.train_x[t]`` in mini-batches of
    ``batch_size``, the first pass in the stream's order (the order a single pass sees), later
    passes reshuffled; ``n_train % batch_size`` rows per pass are left out (drop-last). The
    whole task is one ``lax.scan`` over ``learner.update`` inside one compiled function that
    takes the task id as a traced argument, so it compiles once for all tasks. A learner's
    ``end_task(state, task)``, when it has one, runs at the end of that function.

    Evaluation: the accuracy of ``argmax apply_fn(params, x)`` on each task's test set, with
    logits outside ``stream.class_mask[t]`` excluded when the stream has a mask (task-aware
    evaluation). ``R[i, j]`` is task ``j``'s accuracy after training on tasks ``0 .. i``; the
    accuracy of the initial parameters on every task gives FWT's baseline. With
    ``lca_batches = beta > 0``, task ``k``'s own accuracy is also measured before training on
    it and after each of its first ``beta`` mini-batches (A-GEM's ``Z_b``, ``b = 0 .. beta``),
    which gives LCA.

    Seeds: with ``seeds``, every seed ``s`` runs from ``jax.random.fold_in(key, s)`` and all
    seeds train at once under ``vmap`` (one compiled function; memory grows with the number of
    seeds). ``params`` may be a function ``params(key) -> params`` so that each seed draws its
    own initialisation; a fixed pytree is shared by every seed (only the learner's randomness
    then differs).

    Args:
      learner: a :class:`~metajax.continual.learners.ContinualLearner` (``er``, ``agem``, ...).
      stream: a :class:`~metajax.types.Stream`; its arrays are put on the device
        once.
      key: PRNG key of the run (initialisation, learner randomness, reshuffles).
      params: the initial model parameters, or ``params(key) -> params``.
      apply_fn: ``apply_fn(params, x [n, *features]) -> logits [n, num_classes]``, the model
        the loss of ``learner`` also wraps.
      batch_size: examples per update (10 in GEM, A-GEM, MER and La-MAML).
      epochs: passes over each task's training rows.
      lca_batches: ``beta`` of LCA; 0 skips it. At most the mini-batches of one pass.
      seeds: optional ints; several runs at once, batched with ``vmap``.
      seed_map: how the seeds are executed: ``"vmap"`` (all at once, the default), ``"scan"``
        (one after the other inside the same compiled call: memory of one seed) or a chunk
        size (vmapped chunks, scanned); :func:`metajax.task_map.map_tasks`. Results are the
        same up to float rounding.
      on_task: optional ``on_task(t, row)`` called on the host after task ``t`` is trained,
        with ``row`` the accuracies on every task (``[T]``, or ``[len(seeds), T]``): for
        progress and for saving partial results as they arrive.
      mesh: a one-axis ``jax.sharding.Mesh`` (:func:`metajax.train.parallel.device_mesh`)
        to spread the seeds over (with ``seeds`` only; their number must be a multiple of
        the mesh's device count): each device trains its share of the seeds (``shard_map``,
        then ``seed_map`` inside the share); the stream is copied to every device. The
        results are those of one device.
      settings: hyper-parameter values per run, ``{name: [value of run 0, run 1, ...]}``
        with one value per entry of ``seeds`` (a sweep: every setting with every seed, all
        trained in the same vmapped computation); ``learner`` is then a function
        ``learner(setting) -> ContinualLearner`` of one run's ``{name: traced scalar}``, so
        only values that do not change array shapes (learning rates, strengths) can vary.
      on_task_state: optional ``on_task_state(t, carry)`` called after ``on_task``, with
        everything needed to continue after task ``t``: a dict (a pytree of arrays whose
        structure and shapes do not depend on ``t``) holding the learner ``"state"``, the
        ``"train_key"``, ``"random_init_acc"`` and, with a leading ``[T]`` task axis filled
        up to ``t`` (zeros after), ``"acc_rows"``, ``"train_metrics"`` (a dict) and, with
        ``lca_batches``, ``"lca_curves"``. Save it (e.g. with orbax) to checkpoint the run;
        it is not modified afterwards.
        An exception raised here ends the run (the carry of ``t`` is complete).
      resume_from: ``(t_done, carry)``, a carry given to ``on_task_state`` after task
        ``t_done`` (possibly restored from disk, as numpy arrays): the run skips tasks ``0 ..
        t_done`` and continues with ``t_done + 1``; the result is bit for bit that of a run
        never interrupted (every task draws its keys from ``fold_in(train_key, t)``). Or a
        function ``resume_from(template) -> (t_done, carry) | None``, called with the carry
        of a fresh start (the structure, shapes and dtypes a restore needs; its values are
        those before task 0): returning None starts from scratch. The other arguments must
        be those of the interrupted run.

    Raises:
      NonFiniteTask: a task left NaN or infinity in the learner state; raised after that
        task, before ``on_task`` and ``on_task_state`` see it. The message names the task,
        the seeds and the state's non-finite leaves.
      ValueError: a bad argument, or a ``resume_from`` whose carry does not match this run.

    Returns:
      A dict with ``"acc_matrix"`` (numpy ``[T, T]``), ``"random_init_acc"`` (``[T]``),
      ``"lca_curve"`` (``[T, beta + 1]``, with ``lca_batches``), ``"train_metrics"`` (each
      learner metric averaged over each task's updates, ``[T]``) and every key of
      :func:`metajax.continual.metrics` (``avg_accuracy``, ``bwt``, ``forgetting``, ``fwt``,
      ``lca``, ...). With ``seeds``, arrays gain a leading ``[len(seeds)]`` axis, the metric
      keys hold the mean over seeds, ``"std"`` their standard deviations, ``"per_seed"`` one
      metrics dict per seed, ``"of_mean_matrix"`` the metrics of the seed-averaged matrix
      (A-GEM's way of reporting forgetting; :func:`metajax.continual.metrics_over_seeds`;
      not with ``settings``, whose runs differ) and ``"seeds"`` the seeds.
    """
    if not isinstance(stream, Stream):
        raise TypeError(f"stream must be a metajax.continual.Stream, got {type(stream).__name__}")
    check_int("batch_size", batch_size)
    check_int("epochs", epochs)
    check_int("lca_batches", lca_batches, minimum=0)
    num_tasks, n_train = stream.train_y.shape
    steps_per_epoch = n_train // batch_size
    if steps_per_epoch == 0:
        raise ValueError(
            f"batch_size={batch_size} exceeds the {n_train} training rows of a task; pass at "
            f"most {n_train}"
        )
    if lca_batches > steps_per_epoch:
        raise ValueError(
            f"lca_batches={lca_batches} exceeds the {steps_per_epoch} mini-batches of one pass "
            f"over a task ({n_train} rows // batch_size {batch_size}); pass at most that"
        )
    if seeds is not None:
        seeds = list(seeds)
        if not seeds or not all(
            isinstance(s, numbers.Integral) and not isinstance(s, bool) and s >= 0 for s in seeds
        ):
            raise ValueError(f"seeds must be a non-empty sequence of ints >= 0, got {seeds!r}")
        seeds = [int(s) for s in seeds]
    if settings is not None:
        if seeds is None:
            raise ValueError("settings= gives one value per run: pass seeds too")
        if isinstance(learner, ContinualLearner) or not callable(learner):
            raise ValueError("with settings=, learner must be a function "
                             "learner(setting) -> ContinualLearner")
        settings = {name: jnp.asarray(values, jnp.float32) for name, values in settings.items()}
        for name, values in settings.items():
            if values.shape != (len(seeds),):
                raise ValueError(f"settings[{name!r}] holds {values.shape} values; give one "
                                 f"per run ({len(seeds)}, as seeds)")
        learner_of = learner
    else:
        if not isinstance(learner, ContinualLearner):
            raise ValueError("learner must be a ContinualLearner (a function of the setting "
                             "only with settings=)")

        def learner_of(setting):
            return learner
    per_run = settings or {}
    if mesh is not None:
        if seeds is None:
            raise ValueError("mesh= spreads seeds over devices: pass seeds too")
        check_divisible("seeds", len(seeds), mesh.size)

    data = _DeviceStream(
        jnp.asarray(stream.train_x),
        jnp.asarray(stream.train_y),
        jnp.asarray(stream.test_x),
        jnp.asarray(stream.test_y),
        None if stream.class_mask is None else jnp.asarray(stream.class_mask, bool),
    )
    example = (
        jax.ShapeDtypeStruct(data.train_x.shape[2:], data.train_x.dtype),
        jax.ShapeDtypeStruct((), data.train_y.dtype),
    )
    used = steps_per_epoch * batch_size

    def evaluate(params, data, task):
        mask_row = None if data.class_mask is None else data.class_mask[task]
        return _accuracy(apply_fn, params, data.test_x[task], data.test_y[task], mask_row)

    def evaluate_all(params, data):
        tasks = jnp.arange(num_tasks, dtype=jnp.int32)
        return jax.lax.map(lambda task: evaluate(params, data, task), tasks)

    def start(run_key, setting=None):
        init_key, learner_key, train_key = jax.random.split(run_key, 3)
        initial = params(init_key) if callable(params) else params
        state = learner_of(setting).init(initial, learner_key, example, num_tasks)
        return state, train_key

    def train_task(state, data, task, key, setting=None):
        learner = learner_of(setting)
        xs, ys = data.train_x[task], data.train_y[task]
        shuffled = [
            jax.random.permutation(jax.random.fold_in(key, epoch), n_train)[:used]
            for epoch in range(1, epochs)
        ]
        order = jnp.concatenate([jnp.arange(used), *shuffled]).reshape(-1, batch_size)

        def step(state, rows):
            return learner.update(state, (xs[rows], ys[rows]), task)

        def step_and_measure(state, rows):
            state, metrics = step(state, rows)
            return state, (metrics, evaluate(state.params, data, task))

        if lca_batches:
            before = evaluate(state.params, data, task)
            state, (first, curve) = jax.lax.scan(step_and_measure, state, order[:lca_batches])
            state, rest = jax.lax.scan(step, state, order[lca_batches:])
            metrics = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), first, rest)
            curve = jnp.concatenate([before[None], curve])
        else:
            state, metrics = jax.lax.scan(step, state, order)
            curve = jnp.zeros((0,), jnp.float32)
        means = jax.tree.map(lambda m: jnp.mean(m, axis=0), metrics)
        if learner.end_task is not None:
            state = learner.end_task(state, task)
        return state, evaluate_all(state.params, data), curve, means, _all_finite(state)

    if seeds is None:
        state, train_key = start(key)
        init_eval, train = jax.jit(evaluate_all), jax.jit(train_task)
    else:
        keys = jnp.stack([jax.random.fold_in(key, s) for s in seeds])
        state, train_key = jax.vmap(start)(keys, per_run)
        check_task_map(seed_map)

        def init_eval(params, data):
            return map_tasks(lambda p: evaluate_all(p, data), params, seed_map)

        def train_runs(state, data, task, keys, per_run):
            return map_tasks(lambda sk: train_task(sk[0], data, task, sk[1], sk[2]),
                             (state, keys, per_run), seed_map)

        if mesh is not None:
            (axis,) = mesh.axis_names
            by_seed, whole = NamedSharding(mesh, P(axis)), NamedSharding(mesh, P())
            init_eval = jax.shard_map(init_eval, mesh=mesh, in_specs=(P(axis), P()),
                                      out_specs=P(axis), check_vma=False)
            train_runs = jax.shard_map(train_runs, mesh=mesh,
                                       in_specs=(P(axis), P(), P(), P(axis), P(axis)),
                                       out_specs=P(axis), check_vma=False)
            state, train_key, per_run = jax.device_put((state, train_key, per_run), by_seed)
            data = jax.device_put(data, whole)
            # What the host reads (accuracy rows, metrics, the finite flags) comes back whole
            # on every device, so that each process of a multi-process run can read it; the
            # learner state stays split by seed.
            init_eval = jax.jit(init_eval, out_shardings=whole)
            train_runs = jax.jit(train_runs, out_shardings=(by_seed, whole, whole, whole, whole))
        else:
            init_eval, train_runs = jax.jit(init_eval), jax.jit(train_runs)

        def train(state, data, task, keys):
            return train_runs(state, data, task, keys, per_run)

        task_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))

    def key_of(t):
        return jax.random.fold_in(train_key, t) if seeds is None else task_keys(train_key, t)

    random_init_acc = init_eval(state.params, data)
    # The carry's per-task buffers, [T, ...] on the host: one row per finished task.
    _, row_shape, curve_shape, means_shape, _ = jax.eval_shape(
        train, state, data, jnp.int32(0), key_of(0))
    carry: Carry = {
        "state": state,
        "train_key": train_key,
        "random_init_acc": random_init_acc,
        "acc_rows": np.zeros((num_tasks, *row_shape.shape), row_shape.dtype),
        "train_metrics": {name: np.zeros((num_tasks, *m.shape), m.dtype)
                          for name, m in means_shape.items()},
    }
    if lca_batches:
        carry["lca_curves"] = np.zeros((num_tasks, *curve_shape.shape), curve_shape.dtype)
    first = 0
    if resume_from is not None:
        resumed = resume_from(carry) if callable(resume_from) else resume_from
        if resumed is not None:
            t_done, saved = resumed
            carry = _check_carry(carry, t_done, saved, num_tasks)
            state, train_key = carry["state"], carry["train_key"]
            random_init_acc = carry["random_init_acc"]
            first = t_done + 1

    for t in range(first, num_tasks):
        state, row, curve, means, finite = train(state, data, jnp.int32(t), key_of(t))
        finite = np.asarray(finite)
        if not finite.all():
            bad = _nonfinite_leaves(state)
            which = None if seeds is None else [s for s, ok in zip(seeds, finite, strict=True)
                                               if not ok]
            shown = ", ".join(bad[:4]) + (f" and {len(bad) - 4} more" if len(bad) > 4 else "")
            raise NonFiniteTask(
                f"task {t} of {num_tasks}"
                + ("" if which is None else f" (seed{'s' if len(which) > 1 else ''} "
                   f"{', '.join(map(str, which))})")
                + f" made the learner state non-finite: NaN or infinity in {shown}",
                t, which,
            )
        carry["acc_rows"][t] = np.asarray(row)
        for name, value in means.items():
            carry["train_metrics"][name][t] = np.asarray(value)
        if lca_batches:
            carry["lca_curves"][t] = np.asarray(curve)
        carry["state"] = state
        if on_task is not None:
            on_task(t, np.asarray(row, np.float64))
        if on_task_state is not None:
            on_task_state(t, {**carry, **_copied_buffers(carry)})

    task_axis = 0 if seeds is None else 1
    R = np.asarray(np.moveaxis(carry["acc_rows"], 0, task_axis), np.float64)
    baseline = np.asarray(random_init_acc, np.float64)
    lca_curve = (np.asarray(np.moveaxis(carry["lca_curves"], 0, task_axis), np.float64)
                 if lca_batches else None)
    out: dict[str, Any] = {
        "acc_matrix": R,
        "random_init_acc": baseline,
        "train_metrics": {name: np.moveaxis(values, 0, -1)
                          for name, values in carry["train_metrics"].items()},
    }
    if lca_curve is not None:
        out["lca_curve"] = lca_curve
    if seeds is None:
        out.update(summarize(R, random_init_acc=baseline, lca_curve=lca_curve))
        return out
    over = metrics_over_seeds(R, random_init_acc=baseline, lca_curve=lca_curve)
    out.update(over["mean"])
    out["std"] = over["std"]
    out["per_seed"] = over["per_seed"]
    if settings is None:  # across a sweep's settings a mean matrix would mix learners
        out["of_mean_matrix"] = over["of_mean_matrix"]
    out["seeds"] = seeds
    return out


def _copied_buffers(carry: Carry) -> Carry:
    out = {name: carry[name].copy() for name in ("acc_rows", "lca_curves") if name in carry}
    out["train_metrics"] = {k: v.copy() for k, v in carry["train_metrics"].items()}
    return out


def _check_carry(template: Carry, t_done: int, saved: Carry, num_tasks: int) -> Carry:
    """``saved`` as the carry of this run (arrays on the device), after checking that it has
    the template's structure, shapes and dtypes and that ``t_done`` is one of its tasks."""
    if isinstance(t_done, bool) or not isinstance(t_done, numbers.Integral) \
            or not 0 <= t_done < num_tasks:
        raise ValueError(f"resume_from: the last finished task must be in [0, {num_tasks - 1}], "
                         f"got {t_done!r}")
    if jax.tree_util.tree_structure(template) != jax.tree_util.tree_structure(saved):
        raise ValueError("resume_from: the carry's structure is not this run's (another "
                         "learner, model, number of seeds or lca_batches?)")
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(template),
                            jax.tree.leaves(saved), strict=True):
        if np.shape(a) != np.shape(b) or dtype_of(a) != dtype_of(b):
            raise ValueError(f"resume_from: carry{jax.tree_util.keystr(path)} is "
                             f"{np.shape(b)} {dtype_of(b)}, this run has {np.shape(a)} "
                             f"{dtype_of(a)}")
    carry = dict(saved)
    carry["state"] = jax.tree.map(jnp.asarray, saved["state"])
    carry["train_key"] = jnp.asarray(saved["train_key"])
    carry["random_init_acc"] = jnp.asarray(saved["random_init_acc"])
    for name in ("acc_rows", "lca_curves"):
        if name in saved:
            carry[name] = np.array(saved[name])
    carry["train_metrics"] = {k: np.array(v) for k, v in saved["train_metrics"].items()}
    return carry
