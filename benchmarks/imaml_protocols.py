"""iMAML's protocols side by side: how far the inner loop moves, and how good its meta-gradient is.

    python benchmarks/imaml_protocols.py --data-dir ../shared/data \
        [--presets omniglot-5w1s-imaml omniglot-5w1s-imaml-released] \
        [--set cg_steps=5 ...] [--params RUN_DIR/best_meta_params.msgpack] [--tasks 8]

For each preset (with ``--set`` overrides, repeatable per preset as ``NAME:key=value``), on
the same training tasks and the same meta-parameters (freshly initialised, seed 0, or loaded
from ``--params``), prints one JSON line with, task by task averaged:

- ``phi_distance``: ``||phi - theta||`` of the training inner loop;
- ``query_acc``: query accuracy of that ``phi`` (what the meta-gradient is computed at);
- ``cos_first_order``: cosine of the preset's meta-gradient with the plain query gradient at
  ``phi`` (1 means the implicit correction does nothing: a first-order method);
- ``cos_accurate``: cosine with the exact implicit gradient of the same inner problem at the
  same ``phi``: the undamped system ``(I + H / lam) u = g`` solved by GMRES with
  ``--reference-cg`` Hessian-vector products at most (``reference_residual`` reports how well
  that solve converged; CG need not converge, the system being indefinite away from a convex
  support loss);
- ``eval_acc``: query accuracy after the preset's evaluation adaptation (``eval_lam``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

import jax
import jax.numpy as jnp

import metajax as mj
from metajax.presets import get_preset
from metajax.presets.build import build_learner, build_problem
from metajax.train.checkpoint import load_params
from metajax.train.config import ConfigError

if __package__ in (None, ""):
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
from _results import machine  # noqa: E402


def report(config, meta_params, tasks, reference_cg: int, solver: str = "gmres") -> dict:
    problem = build_problem(config)
    learner = build_learner(config, problem)
    # The training phi: the learner's own inner loop (adapt may use eval_lam instead).
    train_adapt = build_learner(dataclasses.replace(config, eval_lam=-1.0), problem).adapt
    quality = jax.jit(lambda p, t: mj.implicit_gradient_report(
        problem.loss_fn, learner, p, t, config.lam, train_adapt=train_adapt,
        reference_hvps=reference_cg, reference_solver=solver, has_aux=problem.has_aux))

    def accuracies(task):
        phi = train_adapt(meta_params, task.support)
        adapted = learner.adapt(meta_params, task.support, config.test_inner_steps)
        return {"query_acc": problem.metric_fn(phi, task.query),
                "eval_acc": problem.metric_fn(adapted, task.query)}

    per_task = jax.lax.map(jax.jit(accuracies), tasks)
    out = {k: float(v) for k, v in quality(meta_params, tasks).items()}
    return {**out, **{k: float(jnp.mean(v)) for k, v in per_task.items()}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+",
                        default=["omniglot-5w1s-imaml", "omniglot-5w1s-imaml-released"])
    parser.add_argument("--set", action="append", default=[], metavar="[NAME:]KEY=VALUE",
                        help="override a field, for every preset or for preset NAME only")
    parser.add_argument("--data-dir", default="")
    parser.add_argument("--params", default=None,
                        help="a meta_params .msgpack file (default: initialisation, seed 0)")
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--reference-cg", type=int, default=200,
                        help="Hessian-vector products of the accurate solve")
    parser.add_argument("--reference-solver", choices=("gmres", "cg"), default="gmres")
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--label", default="", help="a name for this line (e.g. the arm)")
    args = parser.parse_args(argv)

    theta = None
    for name in args.presets:
        overrides = []
        for item in args.set:
            scope, _, assignment = item.rpartition(":")
            if not scope or scope == name:
                overrides.append(assignment)
        try:
            config = get_preset(name).with_overrides(overrides)
            if args.data_dir:
                config = dataclasses.replace(config, data_dir=args.data_dir)
            config = config.validate()
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        problem = build_problem(config)
        if theta is None:
            theta = problem.init_params(jax.random.PRNGKey(0))
            if args.params:
                theta = load_params(args.params, theta)
        tasks = problem.sample_tasks(jax.random.PRNGKey(args.seed), args.tasks, config.shots,
                                     config.queries, "train")
        line = {"preset": name, "overrides": overrides, "label": args.label,
                "params": args.params or "init", "tasks": args.tasks,
                "reference_cg": args.reference_cg,
                "reference_solver": args.reference_solver,
                **report(config, theta, tasks, args.reference_cg, args.reference_solver),
                "machine": machine()}
        print(json.dumps(line), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
