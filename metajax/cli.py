"""The ``metajax`` command: ``presets``, ``train``, ``evaluate`` and ``continual``.

Every command checks its input before anything is compiled; bad input is one line on
stderr and exit status 2. The last line a command prints on stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from metajax.presets import PRESETS, get_preset
from metajax.presets.config import Config
from metajax.train.config import ConfigError

USAGE_ERROR = 2


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _step_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers like 1,5,10, got {text!r}"
        ) from None
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected integers >= 0 like 1,5,10, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``metajax`` command."""
    parser = argparse.ArgumentParser(
        prog="metajax", description="Gradient-based meta-learning in JAX."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("presets", help="list the named configurations")

    train = sub.add_parser("train", help="meta-train a preset")
    train.add_argument("preset", help="a name from `metajax presets`")
    train.add_argument("--steps", type=_positive_int, help="meta-steps (default: the preset's)")
    train.add_argument("--out", type=Path, help="run directory (default: runs/PRESET-TIME)")
    train.add_argument("--seed", type=_non_negative_int, help="random seed (default 0)")
    train.add_argument("--data-dir", help="dataset folder (default: $METAJAX_DATA_DIR)")
    train.add_argument("--set", dest="overrides", action="append", default=[],
                       metavar="KEY=VALUE", help="override a configuration field (repeatable)")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")

    evaluate = sub.add_parser("evaluate", help="test a trained run on new tasks")
    evaluate.add_argument("run_dir", type=Path, help="a directory written by `metajax train`")
    evaluate.add_argument("--tasks", type=_positive_int, default=600, help="test tasks (600)")
    evaluate.add_argument("--shots", type=_positive_int, help="support size (default: the run's)")
    evaluate.add_argument("--queries", type=_positive_int,
                          help="query size (default: the run's eval_queries)")
    evaluate.add_argument("--steps", type=_step_list, default=None,
                          help="inner-step counts, comma-separated (default: 1,5,10 for "
                          "regression, the run's eval_inner_steps for classification)")
    evaluate.add_argument("--data-dir", help="dataset folder (default: the run's)")
    evaluate.add_argument("--seed", type=_non_negative_int, default=0,
                          help="seed of the test tasks (0)")

    continual = sub.add_parser(
        "continual", help="train a continual learner on a task stream and measure forgetting"
    )
    continual.add_argument("preset", help="a continual preset from `metajax presets`")
    continual.add_argument("--out", type=Path,
                           help="run directory (default: runs/PRESET-TIME)")
    continual.add_argument("--seeds", type=_positive_int,
                           help="independent runs at once, vmapped (default: the preset's)")
    continual.add_argument("--data-dir", help="dataset folder (default: $METAJAX_DATA_DIR)")
    continual.add_argument("--set", dest="overrides", action="append", default=[],
                           metavar="KEY=VALUE",
                           help="override a configuration field (repeatable)")
    continual.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _fail(message: str) -> int:
    print(f"metajax: error: {message}", file=sys.stderr)
    return USAGE_ERROR


def _cmd_presets() -> int:
    from metajax.presets.continual import CONTINUAL_PRESETS

    print("# meta-learning (metajax train PRESET)")
    for name in sorted(PRESETS):
        print(f"{name:24s} {PRESETS[name][1]}")
    print("# continual learning (metajax continual PRESET)")
    for name in sorted(CONTINUAL_PRESETS):
        print(f"{name:24s} {CONTINUAL_PRESETS[name][1]}")
    print(json.dumps({"presets": sorted(PRESETS), "continual": sorted(CONTINUAL_PRESETS)}))
    return 0


def _run_dir(out: Path | None, preset: str) -> Path:
    """``--out``, else ``runs/PRESET-TIME``; an existing non-directory is an error."""
    run_dir = out or Path("runs") / f"{preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"--out {run_dir} exists and is not a directory")
    return run_dir


def _train_config(args) -> tuple[Config, Path]:
    from metajax.train.loop import run_config_matches

    config = get_preset(args.preset).with_overrides(args.overrides)
    if args.steps is not None:
        config = config.with_overrides([f"steps={args.steps}"])
    if args.seed is not None:
        config = config.with_overrides([f"seed={args.seed}"])
    if args.data_dir is not None:
        config = config.with_overrides([f"data_dir={args.data_dir}"])
    config.validate()
    run_dir = _run_dir(args.out, config.preset)
    if not run_config_matches(run_dir, config):
        raise ConfigError(
            f"--out {run_dir} holds a different run (its config.json differs); "
            "choose another directory"
        )
    return config, run_dir


def _cmd_train(args) -> int:
    config, run_dir = _train_config(args)
    from metajax.presets.build import build_learner, build_optimizer, build_problem
    from metajax.train.loop import train

    problem = build_problem(config)
    learner = build_learner(config, problem)
    print(f"training {config.preset}: {config.algorithm} on {config.dataset}, "
          f"{config.steps} meta-steps -> {run_dir}", file=sys.stderr)
    summary = train(config, problem, learner, build_optimizer(config), run_dir,
                    progress=not args.no_progress)
    print(json.dumps(summary))
    return 0


def _cmd_evaluate(args) -> int:
    from metajax.train.loop import CONFIG_FILE, PARAMS_FILE

    run_dir = args.run_dir
    if not (run_dir / CONFIG_FILE).is_file():
        raise ConfigError(f"{run_dir} is not a run directory: no {CONFIG_FILE}")
    config = Config.from_json_file(run_dir / CONFIG_FILE)
    if args.data_dir is not None:
        config = config.with_overrides([f"data_dir={args.data_dir}"])
    if not (run_dir / PARAMS_FILE).is_file():
        raise ConfigError(f"{run_dir} has no {PARAMS_FILE}: the run has not saved parameters")

    import jax

    from metajax.presets.build import build_learner, build_problem
    from metajax.train.checkpoint import load_params
    from metajax.train.loop import BEST_PARAMS_FILE, evaluate_run

    problem = build_problem(config)
    learner = build_learner(config, problem)
    params_file = PARAMS_FILE
    if problem.has_validation and (run_dir / BEST_PARAMS_FILE).is_file():
        params_file = BEST_PARAMS_FILE
    template = learner.init(problem.init_params(jax.random.PRNGKey(0)))
    meta_params = load_params(run_dir / params_file, template)
    result = evaluate_run(
        meta_params, learner, problem,
        tasks=args.tasks,
        shots=args.shots or config.shots,
        queries=args.queries or config.eval_queries,
        steps=args.steps or list(problem.default_eval_steps),
        seed=args.seed,
    )
    result.update({"run_dir": str(run_dir), "params": params_file})
    print(json.dumps(result))
    return 0


def _cmd_continual(args) -> int:
    from metajax.presets.continual import get_continual_preset

    config = get_continual_preset(args.preset).with_overrides(args.overrides)
    if args.seeds is not None:
        config = config.with_overrides([f"seeds={args.seeds}"])
    if args.data_dir is not None:
        config = config.with_overrides([f"data_dir={args.data_dir}"])
    config.validate()
    run_dir = _run_dir(args.out, config.preset)
    if (run_dir / "metrics.json").exists():
        raise ConfigError(f"--out {run_dir} already holds a finished run; choose another")

    from metajax.presets.build_continual import run_experiment

    summary = run_experiment(
        config, run_dir, progress=not args.no_progress,
        log=lambda message: print(message, file=sys.stderr),
    )
    print(json.dumps(summary))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``metajax`` command; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "presets":
            return _cmd_presets()
        if args.command == "train":
            return _cmd_train(args)
        if args.command == "continual":
            return _cmd_continual(args)
        return _cmd_evaluate(args)
    except (ConfigError, ValueError, FileNotFoundError) as err:
        return _fail(str(err).replace("\n", " "))


if __name__ == "__main__":
    sys.exit(main())
