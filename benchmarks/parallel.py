"""What the sharded training step costs, and what bfloat16 compute gives, as JSON lines.

    python benchmarks/parallel.py [--problem omniglot|sinusoid] [--rounds 6] [--steps 20]
        [--variants plain,mesh1] [--meta-batch 32] [--inner-steps 1]

Variants (alternated in one process, rounds in alternating order so that drift cancels;
medians reported):

- ``plain``: :func:`metajax.train.loop.make_train_chunk` without a mesh;
- ``mesh1``: the same chunk through the sharded path (``shard_map`` + ``pmean``) on a mesh
  of one device: the cost of the machinery itself;
- ``meshN``: a mesh of N devices (with ``XLA_FLAGS=--xla_force_host_platform_device_count=N``
  on a CPU the devices share the same cores: correctness, not speed);
- ``bf16``: no mesh, the model in bfloat16 (:func:`metajax.nn.precision.in_compute_dtype`).

Problems: ``omniglot`` is the Conv4 of the MAML reference in learn2learn's OmniglotCNN shape
(``conv4_omniglot(ways, readout="mean")``), 28x28x1 inputs drawn U[0, 1) on the device in
the step, 5-way 1-shot 15 queries, meta-batch 32, inner SGD 0.4, outer Adam 1e-3;
``sinusoid`` is MAML's 1-40-40-1 MLP, 10 shots, 10 queries, meta-batch 25 (the preset).
Each timed call runs ``--steps`` meta-steps in one compiled ``lax.scan`` (what ``metajax
train`` does with ``log_every``); the first call of each variant (the compile) is not timed.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import metajax as mj  # noqa: E402
from metajax.data.sinusoid import sample_tasks as sinusoid_tasks  # noqa: E402
from metajax.nn.conv4 import conv4_omniglot  # noqa: E402
from metajax.nn.mlp import MLP  # noqa: E402
from metajax.nn.precision import in_compute_dtype  # noqa: E402
from metajax.train.loop import make_train_chunk  # noqa: E402
from metajax.train.parallel import device_mesh, replicate  # noqa: E402


def omniglot(args, dtype):
    ways, shots, queries = args.ways, args.shots, args.query
    model = conv4_omniglot(ways, readout="mean")
    apply = in_compute_dtype(model.apply, dtype)

    def loss_fn(params, batch):
        x, y = batch
        return optax.softmax_cross_entropy_with_integer_labels(apply(params, x), y).mean()

    def sample_task(key):
        x = jax.random.uniform(key, (ways * (shots + queries), 28, 28, 1))
        y = jnp.tile(jnp.arange(ways), shots + queries)
        return mj.Task((x[: ways * shots], y[: ways * shots]),
                       (x[ways * shots:], y[ways * shots:]))

    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)))
    return mj.maml(loss_fn, 0.4, args.inner_steps), params, sample_task


def sinusoid(args, dtype):
    model = MLP(hidden=(40, 40), outputs=1)
    apply = in_compute_dtype(model.apply, dtype)

    def loss_fn(params, batch):
        x, y = batch
        return jnp.mean((apply(params, x) - y) ** 2)

    def sample_task(key):
        return jax.tree.map(lambda x: x[0], sinusoid_tasks(key, 1, 10, 10))

    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 1)))
    return mj.maml(loss_fn, 0.01, args.inner_steps), params, sample_task


def build(args, variant):
    dtype = "bfloat16" if variant == "bf16" else "float32"
    learner, params, sample_task = {"omniglot": omniglot, "sinusoid": sinusoid}[args.problem](
        args, dtype)
    mesh = device_mesh(int(variant[4:])) if variant.startswith("mesh") else None
    optimizer = optax.adam(1e-3)
    chunk = make_train_chunk(learner, optimizer, sample_task, args.meta_batch, mesh=mesh)
    state = replicate((params, optimizer.init(params), jax.random.PRNGKey(1)), mesh)
    start = time.perf_counter()
    params, opt_state, metrics = chunk(*state, jnp.int32(0), args.steps)
    jax.block_until_ready(metrics)
    return {"chunk": chunk, "state": [params, opt_state, state[2]], "step": args.steps,
            "compile_s": time.perf_counter() - start}


def timed(run, steps):
    params, opt_state, key = run["state"]
    start = time.perf_counter()
    params, opt_state, metrics = run["chunk"](params, opt_state, key, jnp.int32(run["step"]),
                                              steps)
    jax.block_until_ready(metrics)
    wall = time.perf_counter() - start
    run["state"], run["step"] = [params, opt_state, key], run["step"] + steps
    return wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problem", choices=("omniglot", "sinusoid"), default="omniglot")
    parser.add_argument("--variants", default="plain,mesh1")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--meta-batch", type=int, default=None)
    parser.add_argument("--inner-steps", type=int, default=1)
    parser.add_argument("--ways", type=int, default=5)
    parser.add_argument("--shots", type=int, default=1)
    parser.add_argument("--query", type=int, default=15)
    args = parser.parse_args()
    if args.meta_batch is None:
        args.meta_batch = 32 if args.problem == "omniglot" else 25
    variants = args.variants.split(",")
    runs = {v: build(args, v) for v in variants}
    walls = {v: [] for v in variants}
    for round_ in range(args.rounds):
        for v in (variants if round_ % 2 == 0 else variants[::-1]):
            walls[v].append(timed(runs[v], args.steps))
    base = statistics.median(walls[variants[0]])
    for v in variants:
        wall = statistics.median(walls[v])
        print(json.dumps({
            "problem": args.problem, "variant": v, "meta_batch": args.meta_batch,
            "inner_steps": args.inner_steps, "steps_per_call": args.steps,
            "steps_per_s": round(args.steps / wall, 2),
            "tasks_per_s": round(args.steps * args.meta_batch / wall, 1),
            "time_vs_" + variants[0]: round(wall / base, 3),
            "compile_s": round(runs[v]["compile_s"], 2), "rounds": args.rounds,
            "devices": jax.device_count(), "backend": jax.default_backend(),
            "device": str(jax.devices()[0].device_kind), "jax": jax.__version__,
            "machine": platform.processor() or platform.machine(),
        }))


if __name__ == "__main__":
    main()
