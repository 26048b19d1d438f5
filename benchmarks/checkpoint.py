"""What reliability costs: checkpoints, the non-finite guard, and resuming.

    python benchmarks/checkpoint.py [--presets sinusoid-maml,omniglot-5w1s-maml]
        [--steps 400] [--rounds 2] [--data-dir DIR] [--write]

For each preset, in one process and alternating:
- ``*_steps_per_s``: meta-steps per second of the training chunk, ``log_every`` steps per
  call: ``unguarded`` (the chunk before the non-finite checks existed), ``stop`` (the
  default, ``on_nan=stop``: the loss checked per step, the state once per chunk) and
  ``skip`` (``on_nan=skip``: the state checked and selected every step); ``*_overhead`` is
  the fraction of the unguarded rate lost (medians over rounds, the order of the variants
  reversed every other round);
- ``checkpoint_s``: the wall time of one checkpoint (``meta_params.msgpack`` plus the orbax
  checkpoint of the whole state), median of 10, and ``overhead_at_default``: that time over
  the default ``checkpoint_seconds`` interval, the fraction of wall time checkpointing takes;
- ``restore_s``: reading the latest checkpoint back (``Checkpoints.restore``);
- ``resume_s``: the wall time of ``metajax train PRESET --resume`` on a finished run (process
  start, imports, building the problem, restore, no training: the latency a resumed job pays
  before its first chunk, less the first chunk's compile).

With ``--write`` the lines go to ``benchmarks/results/checkpoint.jsonl``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _results import append_line, machine  # noqa: E402

from metajax.presets import get_preset  # noqa: E402
from metajax.presets.build import build_learner, build_optimizer, build_problem  # noqa: E402
from metajax.train.checkpoint import Checkpoints, save_params  # noqa: E402
from metajax.train.loop import all_finite, make_train_chunk, task_sampler  # noqa: E402
from metajax.train.parallel import task_parallel_meta_grad  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "checkpoint.jsonl"


def unguarded_chunk(learner, optimizer, sample_task, meta_batch_size):
    """The training chunk without the non-finite guard (what it was before)."""
    meta_grad = task_parallel_meta_grad(learner, sample_task, meta_batch_size)

    def meta_step(carry, step):
        meta_params, opt_state, key = carry
        grads, metrics = meta_grad(meta_params, jax.random.fold_in(key, step), step)
        updates, opt_state = optimizer.update(grads, opt_state, meta_params)
        return (optax.apply_updates(meta_params, updates), opt_state, key), metrics

    @functools.partial(jax.jit, static_argnames="length", donate_argnums=(0, 1))
    def chunk(meta_params, opt_state, key, start, length):
        steps = start + jnp.arange(length, dtype=jnp.int32)
        (meta_params, opt_state, _), metrics = jax.lax.scan(
            meta_step, (meta_params, opt_state, key), steps)
        return meta_params, opt_state, metrics

    return chunk


def steps_per_s(chunk, params, opt_state, key, length, steps, check=False):
    params, opt_state, m = chunk(params, opt_state, key, jnp.int32(0), length)  # compile
    jax.block_until_ready(m)
    start = time.perf_counter()
    done = 0
    while done < steps:
        params, opt_state, m = chunk(params, opt_state, key, jnp.int32(done), length)
        if check:  # what train() adds per chunk with on_nan=stop
            bool(all_finite((params, opt_state)))
        done += length
    jax.block_until_ready(m)
    return done / (time.perf_counter() - start), params, opt_state


def measure(preset: str, steps: int, rounds: int, data_dir: str | None) -> dict:
    config = get_preset(preset)
    if data_dir:
        config = dataclasses.replace(config, data_dir=data_dir)
    problem = build_problem(config)
    learner = build_learner(config, problem)
    optimizer = build_optimizer(config)
    key = jax.random.PRNGKey(0)
    params = learner.init(problem.init_params(key))

    sample = task_sampler(problem, config.shots, config.queries)
    batch = config.meta_batch_size
    chunks = {"stop": make_train_chunk(learner, optimizer, sample, batch),
              "skip": make_train_chunk(learner, optimizer, sample, batch, skip_nonfinite=True),
              "unguarded": unguarded_chunk(learner, optimizer, sample, batch)}
    length = min(config.log_every, steps)
    rates = {name: [] for name in chunks}
    for round_ in range(rounds):
        order = list(chunks) if round_ % 2 == 0 else list(chunks)[::-1]  # drift cancels out
        for name in order:
            chunk = chunks[name]
            p = jax.tree.map(jnp.copy, params)
            rate, p, o = steps_per_s(chunk, p, optimizer.init(p), key, length, steps,
                                     check=name == "stop")
            rates[name].append(rate)
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp)
        checkpoints = Checkpoints(run_dir, keep=config.keep_checkpoints)
        state = {"meta_params": p, "opt_state": o, "key": key}
        times = []
        for i in range(10):
            start = time.perf_counter()
            save_params(run_dir / "meta_params.msgpack", p)
            checkpoints.save(i + 1, state, {"step": i + 1})
            times.append(time.perf_counter() - start)
        restores = []
        for _ in range(5):
            start = time.perf_counter()
            checkpoints.restore(checkpoints.latest_step(), state)
            restores.append(time.perf_counter() - start)
        checkpoints.close()
    checkpoint_s = statistics.median(times)
    stop, skip, unguarded = (statistics.median(rates[k]) for k in ("stop", "skip", "unguarded"))
    return {
        "bench": "checkpoint", "preset": preset, "steps_per_call": length,
        "unguarded_steps_per_s": round(unguarded, 2),
        "stop_steps_per_s": round(stop, 2), "stop_overhead": round(1 - stop / unguarded, 4),
        "skip_steps_per_s": round(skip, 2), "skip_overhead": round(1 - skip / unguarded, 4),
        "checkpoint_s": round(checkpoint_s, 4),
        "checkpoint_seconds_default": config.checkpoint_seconds,
        "overhead_at_default": round(checkpoint_s / config.checkpoint_seconds, 5),
        "restore_s": round(statistics.median(restores), 4),
        "params": sum(x.size for x in jax.tree.leaves(params)),
    }


def resume_latency(preset: str, data_dir: str | None) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        args = [sys.executable, "-m", "metajax.cli", "train", preset, "--out", f"{tmp}/run",
                "--steps", "2", "--no-progress", "--set", "log_every=1", "--set",
                "eval_tasks=2"]
        if data_dir:
            args += ["--data-dir", data_dir]
        subprocess.run(args, check=True, capture_output=True)
        start = time.perf_counter()
        subprocess.run(args + ["--resume"], check=True, capture_output=True)
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="sinusoid-maml,omniglot-5w1s-maml")
    parser.add_argument("--steps", type=int, default=400, help="timed meta-steps per round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    for preset in args.presets.split(","):
        line = measure(preset, args.steps, args.rounds, args.data_dir)
        line["resume_s"] = round(resume_latency(preset, args.data_dir), 2)
        line.update({"machine": machine(), "date": time.strftime("%Y-%m-%d"),
                     "jax": jax.__version__})
        print(json.dumps(line), flush=True)
        if args.write:
            append_line(RESULTS, line)


if __name__ == "__main__":
    main()
