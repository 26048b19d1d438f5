"""GEM's update time on a long stream, at chosen numbers of past tasks.

    python benchmarks/gem_long_stream.py [--preset many-mnist-gem] [--tasks 100] \\
        [--past 5,20,50,99] [--seeds 1] [--repeats 2]

The learner of ``--preset`` (by default ``many-mnist-gem``: MLP 784-100-100-10, 5 memories
per task, margin 0.5, ridge 1e-3) on a ``--tasks`` stream, its episodic memory filled with
U[0, 1) rows and random labels for every task, so that at task ``t`` all ``t`` past tasks
constrain the step as late in a real stream. One jitted ``lax.scan`` of 20 updates (batch 10)
is timed at each task id of ``--past`` (best of ``--repeats``); with ``--seeds`` above 1 the
update is ``vmap``-ed over that many learner states, as ``benchmarks/continual.py`` runs its
seeds. One JSON line per task id: ``ms_per_update``, ``violated`` (the fraction of updates
that projected), ``compile_s`` (of the first call), backend and versions.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from speed import synthetic_stream  # noqa: E402

from metajax.presets.build_continual import (  # noqa: E402
    build_continual_learner,
    build_continual_model,
)
from metajax.presets.continual import get_continual_preset  # noqa: E402

UPDATES, BATCH = 20, 10


def filled_state(learner, init, seed: int, tasks: int):
    """A learner state whose memory holds full random rows for every task."""
    example = (jax.ShapeDtypeStruct((784,), jnp.float32), jax.ShapeDtypeStruct((), jnp.int32))
    state = learner.init(init(jax.random.PRNGKey(seed)), jax.random.PRNGKey(1), example, tasks)
    memory = state.memory
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.random(memory.x.shape, dtype=np.float32))
    y = jnp.asarray(rng.integers(0, 10, memory.y.shape).astype(np.int32))
    count = jnp.full(memory.count.shape, 10 * memory.x.shape[1], jnp.int32)
    return state._replace(memory=memory._replace(x=x, y=y, count=count))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="many-mnist-gem")
    parser.add_argument("--tasks", type=int, default=100)
    parser.add_argument("--past", default="5,20,50,99",
                        help="comma-separated task ids to time (the number of past tasks)")
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    past = [int(p) for p in args.past.split(",")]
    if any(not 0 <= p < args.tasks for p in past):
        parser.error(f"--past task ids must lie in [0, {args.tasks}), got {past}")

    config = dataclasses.replace(get_continual_preset(args.preset), tasks=args.tasks)
    if config.learner != "gem":
        parser.error(f"--preset {args.preset} is not a GEM preset (learner {config.learner!r})")
    stream = synthetic_stream(args.tasks, UPDATES * BATCH)
    init, apply_fn = build_continual_model(config, stream)
    learner = build_continual_learner(config, stream, apply_fn)
    if args.seeds > 1:
        states = [filled_state(learner, init, s, args.tasks) for s in range(args.seeds)]
        state = jax.tree.map(lambda *leaves: jnp.stack(leaves), *states)
        update = jax.vmap(learner.update, in_axes=(0, None, None))
    else:
        state = filled_state(learner, init, 0, args.tasks)
        update = learner.update
    xs = jnp.asarray(stream.train_x[0].reshape(UPDATES, BATCH, 784))
    ys = jnp.asarray(stream.train_y[0].reshape(UPDATES, BATCH))

    @jax.jit
    def task(state, xs, ys, t):
        return jax.lax.scan(lambda s, b: update(s, b, t), state, (xs, ys))

    start = time.perf_counter()
    jax.block_until_ready(task(state, xs, ys, jnp.int32(0)))
    compile_s = time.perf_counter() - start
    for t in past:
        best = float("inf")
        for _ in range(args.repeats):
            start = time.perf_counter()
            _, metrics = jax.block_until_ready(task(state, xs, ys, jnp.int32(t)))
            best = min(best, time.perf_counter() - start)
        print(json.dumps({
            "preset": args.preset, "tasks": args.tasks, "past_tasks": t, "seeds": args.seeds,
            "ms_per_update": round(best / UPDATES * 1e3, 3),
            "violated": round(float(jnp.mean(metrics["violated"])), 3),
            "compile_s": round(compile_s, 2), "backend": jax.default_backend(),
            "jax": jax.__version__,
        }), flush=True)


if __name__ == "__main__":
    main()
