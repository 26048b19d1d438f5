"""Does iMAML's inner solve converge at a checkpoint? Curvature and proximal-loss trajectory.

    python benchmarks/imaml_inner.py RUN_DIR --data-dir ../shared/data [--tasks 12]

For training tasks drawn from the run's dataset, prints the largest-magnitude Hessian
eigenvalue of the support loss at theta (power iteration on Hessian-vector products),
the proximal loss after inner steps 1, 4, 8 and the last, and the relative proximal
gradient at the end (``inner_residual``). Gradient descent of size ``inner_lr`` on the
proximal loss converges only when ``inner_lr < 2 / (lam + top eigenvalue)``; above that the
returned ``phi`` is not the proximal solution and the implicit meta-gradient is biased.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

from metajax import inner
from metajax.meta.imaml import INNER_SOLVERS, backtracking_descent
from metajax.presets.build import build_problem
from metajax.presets.config import Config
from metajax.train.checkpoint import load_params


def tree_norm(tree) -> jax.Array:
    return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--tasks", type=int, default=12)
    parser.add_argument("--params", default="best_meta_params.msgpack",
                        help="checkpoint file in RUN_DIR, or 'init' for freshly initialised "
                        "parameters (seed 0)")
    parser.add_argument("--power-steps", type=int, default=30)
    parser.add_argument("--solver", choices=INNER_SOLVERS, default=None,
                        help="inner solver (default: the run's inner_solver)")
    parser.add_argument("--seed", type=int, default=3)
    args = parser.parse_args(argv)

    config = Config.from_json_file(args.run_dir / "config.json")
    if config.algorithm != "imaml":
        print(f"error: {args.run_dir} is a {config.algorithm} run, not imaml", file=sys.stderr)
        return 2
    if args.data_dir:
        config = dataclasses.replace(config, data_dir=args.data_dir)
    problem = build_problem(config)
    theta = problem.init_params(jax.random.PRNGKey(0))
    if args.params != "init":
        theta = load_params(args.run_dir / args.params, theta)
    tasks = problem.sample_tasks(jax.random.PRNGKey(args.seed), args.tasks, config.shots,
                                 config.queries, "train")
    lam, lr, steps = config.lam, config.inner_lr, config.inner_steps
    solver = args.solver or config.inner_solver

    def loss(params, batch):
        out = problem.loss_fn(params, batch)
        return out[0] if problem.has_aux else out

    def proximal(phi, batch):
        support, anchor = batch
        distance = sum(jnp.sum((p - a) ** 2) for p, a in
                       zip(jax.tree.leaves(phi), jax.tree.leaves(anchor), strict=True))
        return loss(phi, support) + 0.5 * lam * distance

    @jax.jit
    def diagnose(theta, support):
        grad = jax.grad(loss)

        def power(x, _):
            hx = jax.jvp(lambda p: grad(p, support), (theta,), (x,))[1]
            size = tree_norm(hx)
            return jax.tree.map(lambda h: h / size, hx), size

        start = jax.tree.map(jnp.ones_like, theta)
        _, sizes = jax.lax.scan(power, start, None, length=args.power_steps)

        if solver == "backtracking":
            phi, trajectory = backtracking_descent(proximal, theta, (support, theta), steps, lr)
        else:
            def step(phi, _):
                phi = inner.adapt(proximal, phi, (support, theta), 1, inner.sgd(lr))[0]
                return phi, proximal(phi, (support, theta))

            phi, trajectory = jax.lax.scan(step, theta, None, length=steps)
        residual = tree_norm(jax.grad(proximal)(phi, (support, theta))) / tree_norm(
            grad(theta, support))
        return sizes[-1], trajectory, residual

    print(f"{args.run_dir}: {solver} inner solver, lr {lr}, {steps} steps, lambda {lam}; "
          f"GD at this lr is stable only where the curvature along its path stays below "
          f"2 / inner_lr - lambda = {2 / lr - lam:.1f}")
    marks = sorted({0, min(3, steps - 1), min(7, steps - 1), steps - 1})
    for i in range(args.tasks):
        task = jax.tree.map(lambda x, i=i: x[i], tasks)
        top, trajectory, residual = diagnose(theta, task.support)
        losses = " ".join(f"{float(trajectory[k]):.3f}" for k in marks)
        print(f"task {i:2d}: top |eigenvalue| {float(top):6.1f}; proximal loss after steps "
              f"{','.join(str(k + 1) for k in marks)}: {losses}; inner_residual "
              f"{float(residual):.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
