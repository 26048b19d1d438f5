"""Peak memory of one compiled meta-step against the number of inner steps.

For each method (MAML, MAML with rematerialised inner steps, iMAML) and each inner-step
count, a fresh process compiles ``jit(learner.meta_grad)`` on the Omniglot Conv4 setting
(5-way 1-shot, one query per class, 32 tasks, 28x28x1 images; synthetic pixels, since memory
depends only on shapes), reads the executable's memory analysis, runs the step once and
reports its peak resident set size. One JSON line per measurement; ``--plot`` writes a PNG
when matplotlib is installed.

    python benchmarks/memory.py --out runs/memory.jsonl --plot runs/memory.png
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

METHODS = ("maml", "maml-remat", "imaml")
STEPS = (1, 5, 10, 25, 50, 100)


def measure(method: str, steps: int, tasks: int, ways: int, shots: int,
            max_run_gib: float) -> dict:
    """Compile and run one meta-gradient in this process; return its memory figures.

    A step whose compiled temporary memory exceeds ``max_run_gib`` is compiled and analysed
    but not run (``"ran": false``, no peak RSS), so the sweep cannot exhaust the machine.
    """
    import resource
    import time

    import jax
    import jax.numpy as jnp
    import optax

    import metajax as mj
    from metajax.nn.conv4 import conv4_omniglot

    model = conv4_omniglot(ways)

    def loss_fn(params, batch):
        x, y = batch
        return optax.softmax_cross_entropy_with_integer_labels(model.apply(params, x), y).mean()

    key = jax.random.PRNGKey(0)
    n = ways * shots
    x = jax.random.uniform(key, (tasks, n, 28, 28, 1))
    y = jnp.tile(jnp.repeat(jnp.arange(ways), shots), (tasks, 1))
    task = mj.Task((x, y), (x, y))
    params = model.init(key, x[0])
    learner = {
        "maml": lambda: mj.maml(loss_fn, 0.4, steps),
        "maml-remat": lambda: mj.maml(loss_fn, 0.4, steps, remat=True),
        "imaml": lambda: mj.imaml(loss_fn, 0.1, steps, lam=2.0, cg_steps=5),
    }[method]()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    compiled = jax.jit(learner.meta_grad).lower(params, task).compile()
    compile_s = time.perf_counter() - start
    analysis = compiled.memory_analysis()
    ran = analysis.temp_size_in_bytes <= max_run_gib * 2**30
    run_s = peak = None
    if ran:
        start = time.perf_counter()
        jax.block_until_ready(compiled(params, task))
        run_s = round(time.perf_counter() - start, 3)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "method": method,
        "inner_steps": steps,
        "temp_mib": analysis.temp_size_in_bytes / 2**20,
        "argument_mib": analysis.argument_size_in_bytes / 2**20,
        "output_mib": analysis.output_size_in_bytes / 2**20,
        "ran": ran,
        "peak_rss_mib": peak,
        "rss_before_compile_mib": rss_before / 1024,
        "compile_s": round(compile_s, 2),
        "run_s": run_s,
        "tasks": tasks,
        "ways": ways,
        "shots": shots,
        "backend": jax.default_backend(),
    }


def plot(records: list[dict], path: str) -> None:
    """Temporary memory and peak RSS against inner steps, one line per method."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for method in METHODS:
        rows = sorted((r for r in records if r["method"] == method),
                      key=lambda r: r["inner_steps"])
        if not rows:
            continue
        steps = [r["inner_steps"] for r in rows]
        axes[0].plot(steps, [r["temp_mib"] for r in rows], marker="o", label=method)
        ran = [r for r in rows if r["ran"]]
        axes[1].plot([r["inner_steps"] for r in ran], [r["peak_rss_mib"] for r in ran],
                     marker="o", label=method)
    for ax, title in zip(axes, ["compiled temporary memory (MiB)", "process peak RSS (MiB)"],
                         strict=True):
        ax.set_xscale("log")
        ax.set_xlabel("inner steps")
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--steps", default=",".join(map(str, STEPS)))
    parser.add_argument("--tasks", type=int, default=32)
    parser.add_argument("--ways", type=int, default=5)
    parser.add_argument("--shots", type=int, default=1)
    parser.add_argument("--max-run-gib", type=float, default=6.0,
                        help="analyse but do not run steps needing more temporary memory")
    parser.add_argument("--out", help="append JSON lines here too")
    parser.add_argument("--plot", help="PNG path")
    parser.add_argument("--one", nargs=2, metavar=("METHOD", "STEPS"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.one:
        method, steps = args.one
        print(json.dumps(measure(method, int(steps), args.tasks, args.ways, args.shots,
                                 args.max_run_gib)))
        return
    records = []
    for method in args.methods.split(","):
        for steps in map(int, args.steps.split(",")):
            cmd = [sys.executable, __file__, "--one", method, str(steps), "--tasks",
                   str(args.tasks), "--ways", str(args.ways), "--shots", str(args.shots),
                   "--max-run-gib", str(args.max_run_gib)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            record = json.loads(out.strip().splitlines()[-1])
            records.append(record)
            print(json.dumps(record), flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(record) + "\n")
    if args.plot:
        plot(records, args.plot)


if __name__ == "__main__":
    main()
