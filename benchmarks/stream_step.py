"""One stream learner's update against the bare SGD step it contains, in microseconds.

    python benchmarks/stream_step.py [er finetune ...] [--repeats 20] [--rounds 2]
    taskset -c 0 python benchmarks/stream_step.py er      # the same, on one core

For each learner named (the ``benchmarks/speed.py`` stream rows: MLP 784-100-100-10, batch
10, the same synthetic Permuted-MNIST rows), one jitted ``lax.scan`` of 100 updates is timed
(best of ``--repeats``, memory already full) next to a bare step on the same model: softmax
cross-entropy, ``jax.grad``, ``p - lr g``, on 10 rows (fine-tuning's work) and on 20 rows (ER's
10 incoming plus 10 replayed). What the learner adds over the bare step of its rows is
its own cost (replay draws, reservoir writes, metrics); the bare step itself is the model's
floor; ``bare_20_rows_gflops`` is that step's matmul FLOPs (forward, weight gradients, and
the input gradients of the last two layers) over its time. One JSON line per learner and
round, with ``cpus`` (the cores this process may run on).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from speed import STREAMS, stream_config, synthetic_stream  # noqa: E402

from metajax.presets.build_continual import (  # noqa: E402
    build_continual_learner,
    build_continual_model,
)

STEPS, BATCH, FEATURES = 100, 10, 784


def best_us(fn, carry, *args, repeats: int) -> float:
    """Best wall time of ``fn(carry, *args)`` over ``repeats`` calls, per update (us)."""
    carry = jax.block_until_ready(fn(carry, *args))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        carry = jax.block_until_ready(fn(carry, *args))
        best = min(best, time.perf_counter() - start)
    return best / STEPS * 1e6


def bare_step(apply_fn, lr: float):
    """A scan of plain SGD steps on ``apply_fn``'s mean softmax cross-entropy."""

    def run(params, xs, ys):
        def step(params, batch):
            x, y = batch
            grads = jax.grad(lambda p: jnp.mean(
                optax.softmax_cross_entropy_with_integer_labels(apply_fn(p, x), y)))(params)
            return jax.tree.map(lambda p, g: p - lr * g, params, grads), None

        return jax.lax.scan(step, params, (xs, ys))[0]

    return jax.jit(run)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("learners", nargs="*", default=["finetune", "er"])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    unknown = [name for name in args.learners if name not in STREAMS]
    if unknown:
        parser.error(f"unknown learners {unknown}; choose from {list(STREAMS)}")

    stream = synthetic_stream(2, 2 * STEPS * BATCH)
    rows = jnp.asarray(stream.train_x[0])
    labels = jnp.asarray(stream.train_y[0])
    example = (jax.ShapeDtypeStruct((FEATURES,), jnp.float32),
               jax.ShapeDtypeStruct((), jnp.int32))
    xs, ys = rows[: STEPS * BATCH].reshape(STEPS, BATCH, FEATURES), labels[: STEPS * BATCH]
    ys = ys.reshape(STEPS, BATCH)
    for round_ in range(args.rounds):
        for name in args.learners:
            config, _ = stream_config(name, 2)
            init, apply_fn = build_continual_model(config, stream)
            learner = build_continual_learner(config, stream, apply_fn)
            params = init(jax.random.PRNGKey(0))
            state = learner.init(params, jax.random.PRNGKey(1), example, 2)
            task = jax.jit(lambda s, xs, ys, learner=learner: jax.lax.scan(
                lambda s, b: learner.update(s, b, jnp.int32(0)), s, (xs, ys))[0])
            bare = bare_step(apply_fn, config.lr)
            out = {"learner": name, "round": round_,
                   "learner_us": round(best_us(task, state, xs, ys, repeats=args.repeats), 1)}
            for n in (BATCH, 2 * BATCH):
                bx = rows[: STEPS * n].reshape(STEPS, n, FEATURES)
                by = labels[: STEPS * n].reshape(STEPS, n)
                out[f"bare_{n}_rows_us"] = round(best_us(bare, params, bx, by,
                                                         repeats=args.repeats), 1)
            hidden = config.hidden
            # forward + weight gradients of the three layers + input gradients of the last
            # two (the first layer's input gradient is never needed), 2 flops per MAC
            macs = FEATURES * hidden + hidden * hidden + hidden * 10
            flops = 2 * 2 * BATCH * (2 * macs + hidden * hidden + hidden * 10)
            out["bare_20_rows_gflops"] = round(flops / out["bare_20_rows_us"] / 1e3, 1)
            out.update(cpus=len(os.sched_getaffinity(0)), backend=jax.default_backend(),
                       jax=jax.__version__)
            print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
