"""Reproduce the MAML paper's sinusoid results and figures (Finn et al. 2017, sec. 5.1, App. C).

Meta-trains a preset at its published setting, then evaluates on 600 test tasks with 5-point
(and 10-point) fine-tuning after 1, 5 and 10 inner steps, printing one JSON line per
evaluation and a final summary line. Published MAML figures (5 points): MSE 0.67 / 0.38 / 0.35.

With ``--plot PATH`` it also writes the paper's figures as one PNG: Figure 2 (one test task
with K = 5 and K = 10 points: the true curve, the prediction before adaptation and after 1
and 10 gradient steps, for MAML and for the "pretrained" baseline) and the left panel of
Figure 3 (test MSE against the number of gradient steps, 0 to 10, mean and 95% interval).
The baseline is the paper's: the same network trained by plain regression on tasks pooled
together (``--baseline-steps`` Adam steps, default as many as MAML's meta-steps), fine-tuned
at test time with SGD at a step size picked automatically on separate validation tasks.

    python benchmarks/reproduce/sinusoid.py --preset sinusoid-maml --out runs/bench-sinusoid-maml \
        --plot runs/bench-sinusoid-maml/figures.png
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import platform
import subprocess
import sys
import time
from pathlib import Path

PUBLISHED = {"sinusoid-maml": {"1": 0.67, "5": 0.38, "10": 0.35}}
FIT_STEPS = (1, 10)
"""The adaptation steps Figure 2 draws (besides the prior, 0 steps)."""
CURVE_STEPS = 10
"""Figure 3's learning curves run from 0 to this many gradient steps."""
BASELINE_LRS = (0.001, 0.003, 0.01, 0.03, 0.1)
"""Fine-tuning step sizes tried for the pretrained baseline (the best on validation tasks)."""
CURVE_TASKS = 600
DIVERGED_MSE = 100.0
"""A task whose MSE exceeds this has diverged (predicting 0 errs by A^2 / 2 <= 12.5)."""
VALIDATION_TASKS = 200
QUERY_POINTS = 100


def run(cmd: list[str]) -> dict:
    """Run a metajax command and return the JSON object on its last stdout line."""
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def learning_curves(loss_fn, params, tasks, lr: float, steps: int):
    """Query MSE of every task of ``tasks`` after 0 .. ``steps`` SGD steps of size ``lr``
    on its support set, from ``params``: an array ``[tasks, steps + 1]``.

    Compiled once per ``loss_fn``, ``steps`` and task shape; ``params`` and ``lr`` are traced,
    so other parameters and step sizes reuse the compilation.
    """
    return _compiled_curves(loss_fn, steps)(params, tasks, lr)


@functools.cache
def _compiled_curves(loss_fn, steps: int):
    import jax
    import jax.numpy as jnp

    import metajax as mj

    def one(params, task, lr):
        start = loss_fn(params, task.query)
        _, _, after = mj.inner.adapt(loss_fn, params, task.support, steps, mj.inner.sgd(lr),
                                     after_step=lambda p: loss_fn(p, task.query))
        return jnp.concatenate([start[None], after])

    return jax.jit(jax.vmap(one, in_axes=(None, 0, None)))


def train_pretrained(problem, key, steps: int, tasks_per_step: int, points: int, lr: float):
    """The paper's "pretrained" baseline: the network regressed on pooled tasks with Adam.

    Each step draws ``tasks_per_step`` new sinusoids with ``points`` inputs each and takes
    one Adam step on the mean squared error over all of them together, so the network
    learns the average function of the task distribution (it has no way to tell tasks apart).
    Returns the trained parameters.
    """
    import jax
    import optax

    init_key, data_key = jax.random.split(key)
    params = problem.init_params(init_key)
    opt = optax.adam(lr)

    def step(carry, step_key):
        params, opt_state = carry
        tasks = problem.sample_tasks(step_key, tasks_per_step, points, 1)
        x, y = (a.reshape(-1, a.shape[-1]) for a in tasks.support)
        loss, grads = jax.value_and_grad(problem.loss_fn)(params, (x, y))
        updates, opt_state = opt.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    keys = jax.random.split(data_key, steps)
    (params, _), _ = jax.jit(lambda c, k: jax.lax.scan(step, c, k))((params, opt.init(params)),
                                                                      keys)
    return params


def figures(out_dir: Path, plot_path: str, seed: int, baseline_steps: int | None) -> dict:
    """Draw Figure 2 and Figure 3 (left) of the MAML paper from the run in ``out_dir``.

    ``baseline_steps``: Adam steps of the pretrained baseline (``None``: the run's
    meta-steps; 0: no baseline). Returns what the figure shows in numbers (the curves' means
    and the baseline's chosen fine-tuning rate), for the summary line.
    """
    import jax
    import jax.numpy as jnp
    import matplotlib
    import numpy as np

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from metajax.data.sinusoid import INPUT_RANGE
    from metajax.nn.mlp import MLP
    from metajax.presets.build import build_learner, build_problem
    from metajax.presets.config import Config
    from metajax.train.checkpoint import load_params

    config = Config.from_json_file(out_dir / "config.json")
    if config.dataset != "sinusoid" or config.algorithm not in ("maml", "fomaml"):
        raise SystemExit(f"--plot draws MAML's sinusoid figures; {out_dir} holds a "
                         f"{config.algorithm} run on {config.dataset}")
    problem = build_problem(config)
    learner = build_learner(config, problem)
    model = MLP(hidden=(config.hidden,) * config.layers, outputs=1)  # the preset's network
    template = learner.init(problem.init_params(jax.random.PRNGKey(0)))
    maml_params = learner.fast_params_of(load_params(out_dir / "meta_params.msgpack", template))
    arms = {"MAML": (maml_params, config.inner_lr)}
    record: dict = {}
    if baseline_steps is None:
        baseline_steps = config.steps
    if baseline_steps:
        pretrained = train_pretrained(problem, jax.random.PRNGKey(seed + 1), baseline_steps,
                                      config.meta_batch_size, config.shots + config.queries,
                                      config.outer_lr)
        val_tasks = problem.sample_tasks(jax.random.PRNGKey(seed + 2), VALIDATION_TASKS,
                                         config.shots, QUERY_POINTS)
        scores = {str(lr): float(learning_curves(problem.loss_fn, pretrained, val_tasks, lr,
                                            CURVE_STEPS)[:, 1:].mean())
                  for lr in BASELINE_LRS}
        best = float(min(scores, key=lambda lr: (np.nan_to_num(scores[lr], nan=np.inf),
                                                 float(lr))))
        arms["pretrained"] = (pretrained, best)
        record["baseline"] = {"steps": baseline_steps, "fine_tune_lr": best,
                              "validation_mse_by_lr": scores}

    predict = jax.jit(functools.partial(_predictions, problem.loss_fn, model.apply))
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    grid = jnp.linspace(*INPUT_RANGE, 200)[:, None]
    record["curves"] = {}
    for column, shots in enumerate((5, 10)):
        # Figure 2: one test task, the same for both arms.
        task, truth = _figure_task(problem, jax.random.PRNGKey(seed + 3), shots, grid)
        for row, (name, (params, lr)) in enumerate(arms.items()):
            ax = axes[row, column]
            ax.plot(grid[:, 0], truth, color="red", label="ground truth")
            ax.scatter(task.support[0][:, 0], task.support[1][:, 0], color="purple",
                       marker="^", zorder=3, label=f"{shots} points used for the gradient")
            predictions = predict(params, task.support, grid, lr)
            ax.plot(grid[:, 0], predictions[0], ":", color="green", label="prior (0 steps)")
            for steps, style in zip(FIT_STEPS, ("--", "-"), strict=True):
                ax.plot(grid[:, 0], predictions[steps], style, color="tab:blue" if steps == 1
                        else "tab:cyan", label=f"after {steps} grad step{'s' * (steps > 1)}")
            ax.set_title(f"{name}, K={shots}" + (f" (fine-tune lr {lr:g})" if row else ""))
            ax.set_ylim(-6, 6)
            ax.legend(fontsize=7, loc="lower right")
        if len(arms) < 2:
            axes[1, column].axis("off")
        # Figure 3 (left): mean test MSE against the number of gradient steps.
        ax = axes[column, 2]
        tasks = problem.sample_tasks(jax.random.PRNGKey(seed + 4), CURVE_TASKS, shots,
                                     QUERY_POINTS)
        record["curves"][str(shots)] = {}
        for name, (params, lr) in arms.items():
            mse = np.asarray(learning_curves(problem.loss_fn, params, tasks, lr, CURVE_STEPS))
            # Fine-tuning can diverge on a few tasks (MAML's step size on steep, large-
            # amplitude sinusoids): their error would swamp the mean, so it is taken over the
            # others and the count is reported; the median takes every task.
            diverged = ~np.all(np.isfinite(mse) & (mse < DIVERGED_MSE), axis=1)
            kept = mse[~diverged]
            mean = kept.mean(0)
            ci = 1.96 * kept.std(0, ddof=1) / np.sqrt(max(len(kept), 1))
            steps = np.arange(CURVE_STEPS + 1)
            label = name + (f" ({diverged.sum()} of {len(mse)} tasks diverged, left out)"
                            if diverged.any() else "")
            ax.plot(steps, mean, marker="o", label=label)
            ax.fill_between(steps, mean - ci, mean + ci, alpha=0.25)
            record["curves"][str(shots)][name] = {
                "mean": [round(float(m), 4) for m in mean],
                "median": [round(float(m), 4) for m in
                           np.median(np.where(np.isfinite(mse), mse, np.inf), axis=0)],
                "diverged_tasks": int(diverged.sum()), "fine_tune_lr": lr,
            }
        published = PUBLISHED.get(config.preset)
        if published and shots == 5:
            ax.scatter([int(s) for s in published], list(published.values()), color="black",
                       marker="x", zorder=3, label="published MAML")
        ax.set_title(f"K={shots}: mean test MSE over {CURVE_TASKS} tasks (95% CI)")
        ax.set_xlabel("number of gradient steps")
        ax.set_ylabel("mean squared error")
        ax.legend()
    fig.suptitle(f"{config.preset}: {config.steps} meta-steps, meta-trained with "
                 f"K={config.shots}")
    fig.tight_layout()
    Path(plot_path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(plot_path, dpi=100)
    plt.close(fig)
    record["plot"] = str(plot_path)
    return record


def _figure_task(problem, key, shots: int, grid):
    """One test task to draw, and its true curve on ``grid``.

    Of 32 drawn tasks it takes the first whose amplitude lies in [2, 4], so that the curve is
    neither flat nor extreme (any task would do; this one shows the fits clearly). The true
    curve is recovered from the task's query points: ``A sin(x - phi)`` is linear in
    ``sin x`` and ``cos x``, so a least-squares fit on them is exact.
    """
    import jax
    import jax.numpy as jnp
    import numpy as np

    tasks = problem.sample_tasks(key, 32, shots, QUERY_POINTS)
    x, y = tasks.query
    basis = jnp.concatenate([jnp.sin(x), jnp.cos(x)], axis=-1)          # [T, n, 2]
    coef = jax.vmap(lambda b, t: jnp.linalg.lstsq(b, t)[0])(basis, y[..., 0])   # [T, 2]
    amplitude = np.asarray(jnp.linalg.norm(coef, axis=-1))
    fits = np.flatnonzero((amplitude >= 2.0) & (amplitude <= 4.0))
    index = int(fits[0]) if len(fits) else 0
    task = jax.tree.map(lambda a: a[index], tasks)
    return task, jnp.concatenate([jnp.sin(grid), jnp.cos(grid)], axis=1) @ coef[index]


def _strict(value):
    """``value`` with every NaN or infinity replaced by ``None`` (strict JSON)."""
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_strict(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _predictions(loss_fn, apply, params, support, grid, lr):
    """Predictions on ``grid`` after 0 .. ``max(FIT_STEPS)`` SGD steps of size ``lr`` on
    ``support``: an array ``[max(FIT_STEPS) + 1, len(grid)]``."""
    import jax.numpy as jnp

    import metajax as mj

    start = apply(params, grid)[:, 0]
    _, _, after = mj.inner.adapt(loss_fn, params, support, max(FIT_STEPS), mj.inner.sgd(lr),
                                 after_step=lambda p: apply(p, grid)[:, 0])
    return jnp.concatenate([start[None], after])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="sinusoid-maml")
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=None, help="default: the preset's")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="passed to `metajax train --set`")
    parser.add_argument("--plot", metavar="PATH",
                        help="write the paper's Figure 2 and Figure 3 (left) as a PNG here")
    parser.add_argument("--baseline-steps", type=int, default=None,
                        help="Adam steps of the pretrained baseline drawn with --plot "
                             "(default: as many as the meta-steps; 0: no baseline)")
    args = parser.parse_args()
    if args.baseline_steps is not None and args.baseline_steps < 0:
        parser.error(f"--baseline-steps must be >= 0, got {args.baseline_steps}")
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            parser.error("--plot needs matplotlib (pip install matplotlib)")

    train_cmd = [sys.executable, "-m", "metajax.cli", "train", args.preset, "--out", args.out,
                 "--seed", str(args.seed), "--no-progress"]
    if args.steps:
        train_cmd += ["--steps", str(args.steps)]
    for pair in args.overrides:
        train_cmd += ["--set", pair]
    start = time.perf_counter()
    summary = run(train_cmd)
    train_wall = time.perf_counter() - start
    print(json.dumps({"train": summary}), flush=True)
    results = {}
    for shots in (5, 10):
        result = run([sys.executable, "-m", "metajax.cli", "evaluate", args.out, "--tasks", "600",
                      "--shots", str(shots), "--steps", "1,5,10"])
        results[str(shots)] = result["by_steps"]
        print(json.dumps({"shots": shots, **result}), flush=True)
    final = {
        "preset": args.preset, "overrides": args.overrides, "steps": summary["step"],
        "train_wall_s": round(train_wall, 1),
        "steps_per_s": summary["steps_per_s"], "mse_5shot": results["5"],
        "mse_10shot": results["10"], "published_5shot": PUBLISHED.get(args.preset),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
    }
    if args.plot:
        final["figures"] = _strict(figures(Path(args.out), args.plot, args.seed,
                                           args.baseline_steps))
    print(json.dumps(final))


if __name__ == "__main__":
    main()
