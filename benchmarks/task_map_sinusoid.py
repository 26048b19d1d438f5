"""Sinusoid MAML meta-steps per second with ``task_map="vmap"`` and ``"scan"``, alternating.

    python benchmarks/task_map_sinusoid.py

The ``sinusoid-maml`` preset (MLP 1-40-40-1, 25 tasks of 10 points), 1,000 meta-steps in one
compiled chunk after a 200-step warm-up, vmap scan vmap scan: whether the CPU default (scan)
costs small tasks anything.
"""

import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import metajax as mj  # noqa: E402
from metajax.presets import get_preset  # noqa: E402
from metajax.presets.build import build_optimizer, build_problem  # noqa: E402
from metajax.train.loop import make_train_chunk, task_sampler  # noqa: E402


def main() -> None:
    config = get_preset("sinusoid-maml")
    problem = build_problem(config)
    optimizer = build_optimizer(config)

    sample = task_sampler(problem, config.shots, config.queries)

    rates: dict[str, list[float]] = {}
    for task_map in ("vmap", "scan", "vmap", "scan"):
        learner = mj.maml(problem.loss_fn, config.inner_lr, config.inner_steps,
                          task_map=task_map)
        chunk = make_train_chunk(learner, optimizer, sample, config.meta_batch_size)
        params = learner.init(problem.init_params(jax.random.PRNGKey(0)))
        state = optimizer.init(params)
        key = jax.random.PRNGKey(1)
        params, state, _ = chunk(params, state, key, jnp.int32(0), length=200)
        jax.block_until_ready(params)
        start = time.perf_counter()
        params, state, _ = chunk(params, state, key, jnp.int32(200), length=1000)
        jax.block_until_ready(params)
        rates.setdefault(task_map, []).append(1000 / (time.perf_counter() - start))
    print({k: [round(v) for v in vs] for k, vs in rates.items()})


if __name__ == "__main__":
    main()
