"""Peak memory of one compiled meta-step against the number of inner steps.

For each method (MAML, MAML with rematerialised inner steps, iMAML) and each inner-step
count, a fresh process compiles ``jit(learner.meta_grad)`` on the Omniglot Conv4 setting
(5-way 1-shot, one query per class, 32 tasks, 28x28x1 images; synthetic pixels, since memory
depends only on shapes), reads the executable's memory analysis, runs the step once and
reports its peak resident set size. One JSON line per measurement (with the machine and the
date); a configuration whose process fails (out of memory, killed) is recorded as failed and
the sweep goes on. ``--plot`` writes a PNG stating the model, the shapes, the machine and the
date, where a step that was only analysed (too large to run) or that failed is drawn as a
marked missing point, never left out; ``--from`` plots a results file again without
measuring.

    python benchmarks/memory.py --out runs/memory.jsonl --plot runs/memory.png
    python benchmarks/memory.py --from benchmarks/results/memory.jsonl \
        --plot benchmarks/results/memory.png
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from _results import machine, read_lines

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
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d"),
    }


def failed_record(method: str, steps: int, tasks: int, ways: int, shots: int,
                  proc: subprocess.CompletedProcess) -> dict:
    """The line of a measurement whose process failed: its exit status and last error line
    (a negative status is the signal that killed it, e.g. -9 by the out-of-memory killer)."""
    lines = (proc.stderr or "").strip().splitlines()
    return {"method": method, "inner_steps": steps, "ran": False,
            "failed": f"exit status {proc.returncode}" + (f": {lines[-1][:200]}" if lines
                                                          else ""),
            "tasks": tasks, "ways": ways, "shots": shots, "machine": machine(),
            "date": time.strftime("%Y-%m-%d")}


def _describe(records: list[dict], key: str, missing: str) -> str:
    values = sorted({str(r[key]) for r in records if r.get(key)})
    return "; ".join(values) if values else missing


def plot(records: list[dict], path: str) -> None:
    """Compiled temporary memory and process peak RSS against inner steps, one line per
    method, as a 1300 x 560 PNG at ``path``. The title states the model, the shapes, the
    machine and the dates of the records; a step compiled but not run (over
    ``--max-run-gib``) is a hollow marker at the top of the RSS panel, a failed step a red
    cross at the top of both, each annotated."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
        return
    fig = Figure(figsize=(13, 5.6), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    panels = (("temp_mib", "compiled temporary memory (MiB)"),
              ("peak_rss_mib", "process peak RSS (MiB)"))
    missing = []
    for colour, method in enumerate(METHODS):
        rows = sorted((r for r in records if r["method"] == method),
                      key=lambda r: r["inner_steps"])
        if not rows:
            continue
        for ax, (key, _) in zip(axes, panels, strict=True):
            have = [r for r in rows if r.get(key) is not None]
            ax.plot([r["inner_steps"] for r in have], [r[key] for r in have], marker="o",
                    color=f"C{colour}", label=method)
            for r in rows:
                if r.get(key) is not None:
                    continue
                failed = "failed" in r
                why = "failed" if failed else "not run (over --max-run-gib)"
                ax.plot([r["inner_steps"]], [0.95], transform=ax.get_xaxis_transform(),
                        linestyle="none", marker="x" if failed else "o",
                        markerfacecolor="none" if not failed else None,
                        markeredgewidth=2, markersize=9,
                        color="#d62728" if failed else f"C{colour}")
                ax.annotate(f"{method}: {why}", (r["inner_steps"], 0.95),
                            xycoords=ax.get_xaxis_transform(), textcoords="offset points",
                            xytext=(-8, -16 - 11 * colour), ha="right", fontsize=8,
                            color=f"C{colour}")
                note = f"{method} at {r['inner_steps']} steps: {why}"
                if note not in missing:
                    missing.append(note)
    for ax, (key, title) in zip(axes, panels, strict=True):
        ax.set_xscale("log")
        ax.set_yscale("log")
        values = [r[key] for r in records if r.get(key)]
        if values:  # room at the top for the missing points' markers and notes
            ax.set_ylim(min(values) / 1.3, max(values) * 4)
        ax.set_xlabel("inner steps (log scale)")
        ax.set_ylabel(title.split(" (")[0] + " (MiB, log scale)")
        ax.set_title(title)
        ax.grid(alpha=0.3, which="both")
        ax.legend(loc="upper left")
    first = records[0] if records else {}
    ways, shots, tasks = first.get("ways", "?"), first.get("shots", "?"), first.get("tasks", "?")
    images = ways * shots if isinstance(ways, int) and isinstance(shots, int) else "?"
    lines = [
        "Peak memory of one compiled meta-gradient (jit(learner.meta_grad)) against inner "
        "steps",
        f"Conv4 (Omniglot), {ways}-way {shots}-shot, {tasks} tasks of {images} support "
        f"images 28x28x1 (the same {images} as queries), synthetic pixels; "
        f"backend {_describe(records, 'backend', '?')}",
        f"machine: {_describe(records, 'machine', 'not recorded in the results')}; "
        f"date: {_describe(records, 'date', 'not recorded in the results')}",
    ]
    if missing:
        lines.append("missing: " + "; ".join(missing))
    fig.suptitle("\n".join(lines), fontsize=10)
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
    parser.add_argument("--from", dest="from_file", metavar="JSONL",
                        help="plot the records of this file (no measurement)")
    parser.add_argument("--one", nargs=2, metavar=("METHOD", "STEPS"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.one:
        method, steps = args.one
        print(json.dumps(measure(method, int(steps), args.tasks, args.ways, args.shots,
                                 args.max_run_gib)))
        return
    if args.from_file:
        if not args.plot:
            parser.error("--from needs --plot")
        plot(read_lines(Path(args.from_file)), args.plot)
        return
    records = []
    for method in args.methods.split(","):
        for steps in map(int, args.steps.split(",")):
            cmd = [sys.executable, __file__, "--one", method, str(steps), "--tasks",
                   str(args.tasks), "--ways", str(args.ways), "--shots", str(args.shots),
                   "--max-run-gib", str(args.max_run_gib)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode == 0:
                record = json.loads(proc.stdout.strip().splitlines()[-1])
            else:
                record = failed_record(method, steps, args.tasks, args.ways, args.shots, proc)
            records.append(record)
            print(json.dumps(record), flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(record) + "\n")
    if args.plot:
        plot(records, args.plot)


if __name__ == "__main__":
    main()
