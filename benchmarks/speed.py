"""Speed of one meta-step and of a continual task stream, as one JSON line per run.

    python benchmarks/speed.py maml --ways 5 --shots 1 --query 15 --meta-batch 32 \\
        --inner-steps 1 [--first-order] [--algo maml|fomaml|reptile|imaml|metasgd|anil|mamlpp] \\
        [--task-map auto|vmap|scan|K] [--conv-impl auto|im2col|lax]
    python benchmarks/speed.py {finetune,er,agem,gem,mer,lamaml} [--tasks 20] [--rows 1000]

Few-shot rows: the Omniglot Conv4 of the MAML reference in learn2learn's OmniglotCNN shape
(4 x [3x3 conv 64, stride 2, batch-statistics norm, ReLU], spatial mean, linear head:
``conv4_omniglot(ways, readout="mean")``) on 28x28x1 inputs drawn U[0, 1) and random labels,
inner SGD 0.4, outer Adam 1e-3. A pool of task batches is made on the device before timing
(data generation is not timed, as in the peers). One jitted call is one meta-step.

Stream rows: a Permuted-MNIST-shaped stream (``tasks`` x ``rows``, x ~ U[0,1)^784 with one
permutation of the columns per task, random labels in [0, 10)), MLP 784-100-100-10, one pass,
batch 10, the learner settings of the ``perm-mnist-*`` presets, except A-GEM with 250 memories
per task (reference batch 256) and GEM with 5 tasks, 250 memories per task and margin 0.5.
Each task is one jitted ``lax.scan`` over the learner's updates; ``samples_per_s`` leaves out
the first task (it holds the compile). Evaluation is not timed.

Printed keys: ``tasks_per_s`` or ``samples_per_s``, ``ms_per_step`` (a meta-step, or one
update of a batch of 10), ``compile_s``, ``peak_rss_mb``, ``xla_gflop`` (XLA's cost analysis
of the compiled step: it counts a loop body once), ``gflop`` (matmul FLOPs counted on the
jaxpr with loop trip counts, ``benchmarks/_flops.py``), ``fraction_of_peak`` (``gflop`` per
second over the float32 matmul throughput measured in this process), ``backend``, versions.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _flops import matmul_flops, xla_flops  # noqa: E402

import metajax as mj  # noqa: E402
from metajax.nn.conv4 import conv4_omniglot  # noqa: E402

ALGOS = ("maml", "fomaml", "reptile", "imaml", "metasgd", "anil", "mamlpp")
STREAMS = ("finetune", "er", "agem", "gem", "mer", "lamaml")


def matmul_peak_gflops(n: int = 2048, repeats: int = 5) -> float:
    """Best float32 ``n x n @ n x n`` throughput of this process, in GFLOP/s."""
    a = jax.random.uniform(jax.random.PRNGKey(0), (n, n), jnp.float32)
    b = jax.random.uniform(jax.random.PRNGKey(1), (n, n), jnp.float32)
    mm = jax.jit(jnp.matmul)
    mm(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        mm(a, b).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def parse_task_map(value: str):
    return int(value) if value.isdigit() else value


def _versions() -> dict:
    import flax

    return {"jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__,
            "python": platform.python_version()}


def build_learner(algo: str, loss_fn, inner_steps: int, first_order: bool, task_map):
    common = dict(task_map=task_map)
    if algo in ("maml", "fomaml"):
        return mj.maml(loss_fn, 0.4, inner_steps, first_order=first_order or algo == "fomaml",
                       **common)
    if algo == "anil":
        return mj.anil(loss_fn, 0.4, inner_steps, first_order=first_order, **common)
    if algo == "metasgd":
        return mj.metasgd(loss_fn, 0.4, inner_steps, first_order=first_order, **common)
    if algo == "reptile":
        return mj.reptile(loss_fn, 0.4, inner_steps, **common)
    if algo == "imaml":
        return mj.imaml(loss_fn, 0.1, inner_steps, lam=2.0, cg_steps=5, **common)
    if algo == "mamlpp":
        return mj.mamlpp(loss_fn, 0.4, inner_steps, per_step=mj.norm_mask, **common)
    raise ValueError(f"unknown algo {algo!r}; one of {ALGOS}")


def run_maml(args) -> dict:
    ways, shots, query, tasks_n = args.ways, args.shots, args.query, args.meta_batch
    model = conv4_omniglot(ways, readout="mean", conv_impl=args.conv_impl)

    def loss_fn(params, batch):
        x, y = batch
        logits = model.apply(params, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    task_map = parse_task_map(args.task_map)
    learner = build_learner(args.algo, loss_fn, args.inner_steps, args.first_order, task_map)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)))
    meta_params = learner.init(params)
    optimizer = optax.adam(1e-3)
    opt_state = optimizer.init(meta_params)

    def make_tasks(key):
        k1, k2, k3, k4 = jax.random.split(key, 4)
        s, q = ways * shots, ways * query
        return mj.Task(
            (jax.random.uniform(k1, (tasks_n, s, 28, 28, 1)),
             jax.random.randint(k2, (tasks_n, s), 0, ways)),
            (jax.random.uniform(k3, (tasks_n, q, 28, 28, 1)),
             jax.random.randint(k4, (tasks_n, q), 0, ways)),
        )

    pool = [make_tasks(jax.random.PRNGKey(i)) for i in range(4)]
    jax.block_until_ready(pool)

    def step(meta_params, opt_state, tasks):
        grads, metrics = learner.meta_grad(meta_params, tasks)
        updates, opt_state = optimizer.update(grads, opt_state, meta_params)
        return optax.apply_updates(meta_params, updates), opt_state, metrics["meta_loss"]

    start = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(meta_params, opt_state,
                                                          pool[0]).compile()
    compile_s = time.perf_counter() - start
    gflop = matmul_flops(step, meta_params, opt_state, pool[0]) / 1e9
    xla_gflop = xla_flops(compiled)
    for i in range(args.warmup):
        meta_params, opt_state, loss = compiled(meta_params, opt_state, pool[i % len(pool)])
    jax.block_until_ready(loss)
    rates = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        for i in range(args.steps):
            meta_params, opt_state, loss = compiled(meta_params, opt_state, pool[i % len(pool)])
        jax.block_until_ready((meta_params, loss))
        rates.append(args.steps / (time.perf_counter() - start))
    if not np.isfinite(float(loss)):
        raise SystemExit(f"speed.py: non-finite meta-loss {float(loss)}")
    steps_per_s = statistics.median(rates)
    peak = matmul_peak_gflops()
    return {
        "bench": "maml", "impl": "metajax", "algo": args.algo,
        "config": {"ways": ways, "shots": shots, "query": query, "meta_batch": tasks_n,
                   "inner_steps": args.inner_steps,
                   "first_order": args.first_order or args.algo == "fomaml",
                   "task_map": mj.task_map.resolve_task_map(task_map),
                   "conv_impl": _conv_impl(args.conv_impl)},
        "tasks_per_s": steps_per_s * tasks_n,
        "tasks_per_s_repeats": [r * tasks_n for r in rates],
        "ms_per_step": 1e3 / steps_per_s,
        "compile_s": compile_s,
        "peak_rss_mb": peak_rss_mb(),
        "xla_gflop": None if xla_gflop is None else xla_gflop / 1e9,
        "gflop": gflop,
        "matmul_peak_gflops": peak,
        "fraction_of_peak": gflop * steps_per_s / peak,
    }


def _conv_impl(impl: str) -> str:
    from metajax.nn.conv import resolve_impl

    return resolve_impl(impl)


def stream_config(name: str, tasks: int | None):
    import dataclasses

    from metajax.presets.continual import get_continual_preset

    config = get_continual_preset(f"perm-mnist-{name}")
    if name == "agem":
        config = dataclasses.replace(config, memory_per_task=250, ref_batch=256)
    if name == "gem":
        config = dataclasses.replace(config, memory_per_task=250, memory_strength=0.5)
    return config, tasks if tasks else (5 if name == "gem" else 20)


def synthetic_stream(tasks: int, rows: int, seed: int = 0):
    from metajax.types import Stream

    rng = np.random.default_rng(seed)
    base = rng.random((rows, 784), dtype=np.float32)
    train_x = np.stack([base[:, rng.permutation(784)] for _ in range(tasks)])
    train_y = rng.integers(0, 10, (tasks, rows)).astype(np.int32)
    return Stream(train_x, train_y, train_x[:, :100], train_y[:, :100], 10)


def run_stream(args) -> dict:
    from metajax.presets.build_continual import build_continual_learner as build_cl
    from metajax.presets.build_continual import build_continual_model

    config, tasks = stream_config(args.bench, args.tasks)
    stream = synthetic_stream(tasks, args.rows, args.seed)
    init, apply_fn = build_continual_model(config, stream)
    learner = build_cl(config, stream, apply_fn)
    batch = 10
    steps = args.rows // batch
    example = (jax.ShapeDtypeStruct((784,), jnp.float32), jax.ShapeDtypeStruct((), jnp.int32))
    state = learner.init(init(jax.random.PRNGKey(args.seed)), jax.random.PRNGKey(1), example,
                         tasks)
    # Own buffers for every leaf: a state may hold one array twice (La-MAML's rates start as
    # one array), and a donated argument may not hold the same buffer twice.
    state = jax.tree.map(lambda leaf: jnp.array(leaf, copy=True), state)
    xs_all = jnp.asarray(stream.train_x[:, : steps * batch].reshape(tasks, steps, batch, 784))
    ys_all = jnp.asarray(stream.train_y[:, : steps * batch].reshape(tasks, steps, batch))

    # The whole stream stays on the device and task t's rows are read inside the compiled
    # task, as metajax.continual.run does (and as the peers index a tensor): slicing
    # xs_all[t] outside would time a 3 MB copy per task that no real run makes.
    def train_task(state, xs_all, ys_all, task):
        def step(state, b):
            return learner.update(state, b, task)

        state, metrics = jax.lax.scan(step, state, (xs_all[task], ys_all[task]))
        return state, metrics["loss"][-1]

    start = time.perf_counter()
    compiled = jax.jit(train_task, donate_argnums=0).lower(
        state, xs_all, ys_all, jnp.int32(0)).compile()
    compile_s = time.perf_counter() - start
    gflop_task = matmul_flops(train_task, state, xs_all, ys_all, jnp.int32(0)) / 1e9
    xla_gflop = xla_flops(compiled)
    times = []
    for t in range(tasks):
        start = time.perf_counter()
        state, loss = compiled(state, xs_all, ys_all, jnp.int32(t))
        jax.block_until_ready((state, loss))
        times.append(time.perf_counter() - start)
    if not np.isfinite(float(loss)):
        raise SystemExit(f"speed.py: non-finite loss {float(loss)}")
    timed = sum(times[1:])
    samples_per_s = steps * batch * (tasks - 1) / timed
    peak = matmul_peak_gflops()
    return {
        "bench": args.bench, "impl": "metajax",
        "config": {"tasks": tasks, "rows": args.rows, "batch": batch, "hidden": config.hidden,
                   "layers": config.layers, "lr": config.lr, "memory": config.memory,
                   "memory_per_task": config.memory_per_task, "replay_batch": config.replay_batch,
                   "ref_batch": config.ref_batch, "memory_strength": config.memory_strength,
                   "glances": config.glances, "batches_per_example": config.batches_per_example,
                   "learner": config.learner},
        "samples_per_s": samples_per_s,
        "ms_per_step": 1e3 * timed / (steps * (tasks - 1)),
        "task_s": times,
        "compile_s": compile_s,
        "peak_rss_mb": peak_rss_mb(),
        "xla_gflop": None if xla_gflop is None else xla_gflop / 1e9,
        "gflop": gflop_task,
        "matmul_peak_gflops": peak,
        "fraction_of_peak": gflop_task * (tasks - 1) / timed / peak,
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bench", choices=("maml", *STREAMS))
    parser.add_argument("--ways", type=int, default=5)
    parser.add_argument("--shots", type=int, default=1)
    parser.add_argument("--query", type=int, default=15)
    parser.add_argument("--meta-batch", type=int, default=32)
    parser.add_argument("--inner-steps", type=int, default=1)
    parser.add_argument("--first-order", action="store_true")
    parser.add_argument("--algo", choices=ALGOS, default="maml")
    parser.add_argument("--task-map", default="auto",
                        help="auto | vmap | scan | K (chunks of K tasks)")
    parser.add_argument("--conv-impl", default="auto", choices=("auto", "im2col", "lax"))
    parser.add_argument("--steps", type=int, default=10, help="timed meta-steps per repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--tasks", type=int, default=0, help="stream tasks (0: 20, GEM 5)")
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = run_maml(args) if args.bench == "maml" else run_stream(args)
    out.update(backend=jax.default_backend(), devices=jax.device_count(), versions=_versions(),
               cpus=len(os.sched_getaffinity(0)), date=time.strftime("%Y-%m-%d"))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
