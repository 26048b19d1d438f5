"""The ``metajax`` command: ``presets [NAME]``, ``train``, ``evaluate`` and ``continual``.

``train`` and ``continual`` start from a preset or from ``--config FILE`` (a run's
``config.json``, or a JSON or TOML file of fields: :mod:`metajax.presets.files`), then apply
``--set KEY=VALUE`` and the flags on top; ``--dry-run`` checks and prints the result without
compiling, loading data or writing anything.

Every command checks its input before anything is compiled. Every expected failure (bad
configuration, bad or missing data, a run directory in use or holding another run,
permission and disk errors, refused files, non-finite training) is one line on stderr
naming the file or key, and exit status 2; an unexpected exception keeps its traceback. A
run stopped by SIGINT / SIGTERM saves a checkpoint first and exits 130 / 143. The last line
a command prints on stdout is one JSON object (strict JSON: non-finite numbers are null).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import sys
import textwrap
import time
from pathlib import Path

from metajax.presets import PRESETS, get_preset
from metajax.presets.config import Config
from metajax.train.config import ConfigError
from metajax.train.logging import dumps
from metajax.train.loop import Interrupted, NonFiniteLoss

USAGE_ERROR = 2
EVALUATIONS_FILE = "evaluations.jsonl"


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

    presets = sub.add_parser("presets", help="list the named configurations, or show one")
    presets.add_argument("name", nargs="?",
                         help="a preset: print its configuration, its note (source and "
                         "differences) and the paper's figures")

    train = sub.add_parser("train", help="meta-train a preset")
    train.add_argument("preset", nargs="?",
                       help="a name from `metajax presets` (or give --config FILE)")
    _start_arguments(train, "train")
    train.add_argument("--steps", type=_positive_int, help="meta-steps (default: the preset's)")
    train.add_argument("--out", type=Path, help="run directory (default: runs/PRESET-TIME)")
    train.add_argument("--seed", type=_non_negative_int, help="random seed (default 0)")
    train.add_argument("--data-dir", help="dataset folder (default: $METAJAX_DATA_DIR)")
    train.add_argument("--set", dest="overrides", action="append", default=[],
                       metavar="KEY=VALUE", help="override a configuration field (repeatable)")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.add_argument("--tensorboard", action="store_true",
                       help="also write TensorBoard event files to RUN_DIR/tensorboard "
                            '(needs pip install "metajax[tensorboard]")')
    train.add_argument("--resume", action="store_true",
                       help="continue the run in --out from its latest checkpoint (a new run "
                       "when --out holds none); --steps (unless the outer learning rate "
                       "decays over them) and time_budget_s may grow")
    train.add_argument("--checkpoint-every", type=_non_negative_int, metavar="N",
                       help="meta-steps between checkpoints (default: the config's, 0: by "
                       "time only)")
    train.add_argument("--on-nan", choices=("stop", "skip"),
                       help="a non-finite meta-step ends the run (stop, the default) or is "
                       "skipped and counted (skip); it is never applied")
    _device_arguments(train, "each meta-batch")
    _distributed_arguments(train)

    plot = sub.add_parser("plot", help="remake a run directory's plots (curves, heatmaps)")
    plot.add_argument("run_dir", type=Path,
                      help="a directory written by `metajax train` or `metajax continual`")

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
    evaluate.add_argument("--write", action="store_true",
                          help=f"also append the result to RUN_DIR/{EVALUATIONS_FILE}")
    evaluate.add_argument("--devices", type=_positive_int, metavar="N",
                          help="devices the test tasks are spread over (default: all)")

    continual = sub.add_parser(
        "continual", help="train a continual learner on a task stream and measure forgetting"
    )
    continual.add_argument("preset", nargs="?",
                           help="a continual preset from `metajax presets` (or give --config "
                           "FILE)")
    _start_arguments(continual, "continual")
    continual.add_argument("--out", type=Path,
                           help="run directory (default: runs/PRESET-TIME)")
    continual.add_argument("--seeds", type=_positive_int,
                           help="independent runs at once, vmapped (default: the preset's)")
    continual.add_argument("--data-dir", help="dataset folder (default: $METAJAX_DATA_DIR)")
    continual.add_argument("--set", dest="overrides", action="append", default=[],
                           metavar="KEY=VALUE",
                           help="override a configuration field (repeatable)")
    continual.add_argument("--no-progress", action="store_true", help="no progress bar")
    continual.add_argument("--tensorboard", action="store_true",
                           help="also write TensorBoard event files to RUN_DIR/tensorboard "
                                '(needs pip install "metajax[tensorboard]")')
    continual.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2,...",
                           help="train every value of a hyper-parameter (repeatable: every "
                           "combination) with every seed at once, vmapped; the summary gives "
                           "each setting's mean and spread")
    _device_arguments(continual, "the seeds")
    _distributed_arguments(continual)
    continual.add_argument("--resume", action="store_true",
                           help="continue the run in --out at its next unfinished task (a "
                           "new run when --out holds none; a finished run writes its results "
                           "again)")
    return parser


def _start_arguments(parser: argparse.ArgumentParser, kind: str) -> None:
    """``--config FILE`` and ``--dry-run``, shared by ``train`` and ``continual``."""
    parser.add_argument("--config", type=Path, metavar="FILE",
                        help=f"start from a file instead of a preset: a `metajax {kind}` run's "
                        "config.json (or its directory), or a JSON or TOML file of fields "
                        "(those it leaves out come from the preset it names, else the "
                        "defaults); --set and the other flags apply on top")
    parser.add_argument("--dry-run", action="store_true",
                        help="check the configuration, the data directory, the devices and "
                        "--out, print the resolved configuration and exit; compiles, loads "
                        "and writes nothing")


def _distributed_arguments(parser) -> None:
    dist = parser.add_argument_group(
        "several processes (hosts)",
        "join a multi-process run through jax.distributed: give all three, or --distributed "
        "to read the cluster from the environment (SLURM, Cloud TPU, Open MPI, Kubernetes)")
    dist.add_argument("--coordinator", metavar="HOST:PORT",
                      help="address of process 0, which serves as the coordinator")
    dist.add_argument("--num-processes", type=_positive_int, metavar="N",
                      help="number of processes in the run")
    dist.add_argument("--process-id", type=_non_negative_int, metavar="I",
                      help="this process's index, 0 .. N-1")
    dist.add_argument("--distributed", action="store_true",
                      help="join a multi-process run described by the environment")
    dist.add_argument("--coordinator-timeout", type=float, default=300.0, metavar="S",
                      help="seconds to wait for the coordinator and the other processes "
                      "(300)")


def _device_arguments(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--devices", type=_positive_int, metavar="N",
                        help=f"devices {what} is spread over; it must divide evenly (default: "
                        "the most visible devices that do)")


def _fail(message: str) -> int:
    print(f"metajax: error: {message}", file=sys.stderr)
    return USAGE_ERROR


def _cmd_presets(name: str | None = None) -> int:
    """``metajax presets``: one line per preset; with ``name``, that preset in full."""
    if name is not None:
        return _show_preset(name)
    from metajax.presets.continual import CONTINUAL_PRESETS
    from metajax.presets.published import dataset_label, source_line

    sections = [
        ("meta-learning: metajax train PRESET", "algorithm", "dataset", sorted(PRESETS),
         lambda n: PRESETS[n][0].algorithm),
        ("continual learning: metajax continual PRESET", "learner", "stream",
         sorted(CONTINUAL_PRESETS), lambda n: CONTINUAL_PRESETS[n][0].learner),
    ]
    print("# `metajax presets NAME` prints a preset's configuration, source and paper figures")
    for title, what, data, names, method in sections:
        rows = [(n, method(n), dataset_label(n), source_line(n)) for n in names]
        widths = [max(len(r[i]) for r in [*rows, ("", what, data, "")]) + 1 for i in range(3)]
        print(f"# {title}")
        print(_row(("# preset", what, data, "source"), widths))
        for row in rows:
            print(_row(row, widths))
    print(dumps({"presets": sorted(PRESETS), "continual": sorted(CONTINUAL_PRESETS)}))
    return 0


def _row(cells: tuple[str, ...], widths: list[int]) -> str:
    """The cells padded to ``widths``, the last one as it is."""
    return "".join(c.ljust(w) for c, w in zip(cells, widths, strict=False)) + cells[-1]


def _find_preset(name: str):
    """``(kind, config, note)`` of preset ``name``; :class:`ConfigError` with the closest
    names when there is none."""
    from metajax.presets.continual import CONTINUAL_PRESETS, get_continual_preset

    if name in PRESETS:
        return "train", get_preset(name), PRESETS[name][1]
    if name in CONTINUAL_PRESETS:
        return "continual", get_continual_preset(name), CONTINUAL_PRESETS[name][1]
    close = difflib.get_close_matches(name, [*PRESETS, *CONTINUAL_PRESETS], n=5, cutoff=0.5)
    hint = f"close matches: {', '.join(close)}" if close else "no preset has a similar name"
    raise ConfigError(f"unknown preset {name!r}; {hint} (`metajax presets` lists them all)")


def _config_lines(config, notes: dict[str, str] | None = None) -> list[str]:
    """``key = value  # note`` for every field: TOML, so the block saved to a file is a
    ``--config`` file."""
    notes = config.field_notes() if notes is None else notes
    values = dataclasses.asdict(config)
    width = max(map(len, values))
    lines = []
    for key, value in values.items():
        line = f"{key.ljust(width)} = {json.dumps(value)}"
        if key in notes:
            line = f"{line.ljust(width + 16)} # {notes[key]}"
        lines.append(line)
    return lines


def _wrapped(text: str) -> str:
    """``text`` wrapped at 96 characters, continuation lines indented."""
    return textwrap.fill(text, width=96, subsequent_indent="  ")


def _show_preset(name: str) -> int:
    from metajax.presets.published import PUBLISHED, source_line

    kind, config, note = _find_preset(name)
    published = PUBLISHED.get(name, ())
    if kind == "train":
        title = f"{name}: {config.algorithm} on {config.dataset}"
    else:
        title = f"{name}: {config.learner} on {config.benchmark}"
    print(title)
    print(f"run: metajax {kind} {name}    source: {source_line(name)}")
    if kind == "continual":
        print(_wrapped(f"stream: {config.stream_description()}"))
    print("\nnote (source and differences):")
    print(textwrap.fill(note, width=96, initial_indent="  ", subsequent_indent="  "))
    print("\npublished:")
    for figure in published:
        print(textwrap.fill(figure.describe(), width=96, initial_indent="  ",
                            subsequent_indent="    "))
    if not published:
        print("  no figure recorded for this setting (see the note)")
    print(f"\nconfiguration (TOML: `metajax {kind} --config FILE` starts from it saved to "
          "FILE):")
    for line in _config_lines(config):
        print(f"  {line}")
    print(dumps({"preset": name, "kind": kind, "command": f"metajax {kind} {name}",
                 "source": source_line(name), "config": dataclasses.asdict(config),
                 "resolved": config.field_notes(), "note": note,
                 "published": [figure.to_dict() for figure in published]}))
    return 0


def _run_dir(out: Path | None, preset: str) -> Path:
    """``--out``, else ``runs/PRESET-TIME``; an existing non-directory is an error."""
    run_dir = out or Path("runs") / f"{preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"--out {run_dir} exists and is not a directory")
    return run_dir


def _log(message: str) -> None:
    print(message, file=sys.stderr)


def _start_config(args, kind: str):
    """The configuration ``args`` start from: the preset, or the ``--config`` file."""
    if args.preset is not None and args.config is not None:
        raise ConfigError(f"give a preset or --config FILE, not both (--set KEY=VALUE "
                          f"changes fields of either): got {args.preset!r} and --config "
                          f"{args.config}")
    if args.config is not None:
        from metajax.presets.files import config_from_file

        return config_from_file(args.config, kind)
    if args.preset is None:
        example = "sinusoid-maml" if kind == "train" else "perm-mnist-er"
        raise ConfigError(f"give a preset (`metajax presets` lists them) or --config FILE, "
                          f"e.g. `metajax {kind} {example}`")
    if kind == "continual":
        from metajax.presets.continual import get_continual_preset

        return get_continual_preset(args.preset)
    return get_preset(args.preset)


def _train_config(args) -> Config:
    config = _start_config(args, "train").with_overrides(args.overrides)
    for flag, key in (("steps", "steps"), ("seed", "seed"), ("data_dir", "data_dir"),
                      ("checkpoint_every", "checkpoint_every"), ("on_nan", "on_nan"),
                      ("devices", "devices")):
        if getattr(args, flag, None) is not None:
            config = config.with_overrides([f"{key}={getattr(args, flag)}"])
    return config.validate()


def _locked(run_dir: Path, command: str, body, clean_failed_start: bool = True):
    """Run ``body()`` holding ``run_dir``'s lock. With ``clean_failed_start``, a start that
    fails before the run made progress removes the run files it wrote (only those: files
    that were there before are kept), and the directory when it made it."""
    from metajax.train.rundir import RunLock, has_progress, remove_new_run_files

    lock = RunLock(run_dir, command, log=_log)
    with lock:
        before = {path.name for path in run_dir.iterdir()}
        try:
            return body()
        except BaseException:
            if clean_failed_start and not has_progress(run_dir):
                remove_new_run_files(run_dir, before)
                lock.release(remove_dir=True)
            raise


def _join(args) -> None:
    """Join the multi-process run the arguments describe (nothing for a single process)."""
    trio = (args.coordinator, args.num_processes, args.process_id)
    if not args.distributed and all(v is None for v in trio):
        return
    if args.distributed and any(v is not None for v in trio):
        raise ConfigError("give either --distributed or --coordinator, --num-processes and "
                          "--process-id")
    if args.out is None:
        raise ConfigError("a multi-process run needs --out (a directory every process "
                          "names the same)")
    from metajax.train.parallel import initialize_distributed

    if not args.distributed and args.process_id == 0:
        _log(f"metajax: coordinating {args.num_processes} processes on {args.coordinator} "
             f"(waiting up to {args.coordinator_timeout:g} s for all to join)")
    joined = initialize_distributed(*trio, timeout_s=args.coordinator_timeout)
    _log(f"metajax: process {joined['process_id']} of {joined['processes']}, "
         f"{joined['local_devices']} of {joined['devices']} devices here")


def _mesh(what: str, size: int, requested: int):
    """The device mesh for ``size`` items (None for one device) and the count used."""
    from metajax.train.parallel import choose_devices, device_mesh

    try:
        count = choose_devices(what, size, requested)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    return (device_mesh(count) if count > 1 else None), count


def _cmd_train(args) -> int:
    if args.dry_run:
        return _dry_run_train(args)
    _join(args)
    config = _train_config(args)
    mesh, count = _mesh("meta_batch_size", config.meta_batch_size, config.devices)
    config = config.with_overrides([f"devices={count}"])
    run_dir = _run_dir(args.out, config.preset)
    body = lambda: _train_locked(args, config, run_dir, mesh)  # noqa: E731
    import jax

    if jax.process_index() != 0:  # process 0 holds the lock and speaks for the run
        return body()
    return _locked(run_dir, "train", body)


def _shared_claim(claim) -> bool:
    """``claim()`` on process 0, its answer (or its refusal) passed to every process."""
    import jax

    if jax.process_count() == 1:
        return claim()
    import numpy as np
    from jax.experimental import multihost_utils

    from metajax.train.rundir import RunDirError

    if jax.process_index() == 0:
        try:
            resume = claim()
        except BaseException:
            multihost_utils.broadcast_one_to_all(np.array([1, 0], np.int32))
            raise
        multihost_utils.broadcast_one_to_all(np.array([0, int(resume)], np.int32))
        return resume
    refused, resume = multihost_utils.broadcast_one_to_all(np.zeros(2, np.int32))
    if refused:
        raise RunDirError("process 0 refused the run directory (its log says why)")
    return bool(resume)


def _claim(run_dir: Path, kind: str, config, wants_resume: bool) -> bool:
    """Check what ``run_dir`` holds before a ``kind`` run of ``config`` writes into it (the
    lock held) and record the run in ``run.json``; returns whether to resume.

    A directory holding the other kind of run, or a run of another configuration, is
    refused naming what differs; one holding this configuration's run needs ``--resume``.
    ``run.json`` without progress is a start of ours that died before its first step (its
    files are replaced); a ``config.json`` without ``run.json`` is a run of an earlier
    version, compared like any other.
    """
    from metajax.train.rundir import remove_leftovers, write_run_record

    remove_leftovers(run_dir)
    resume = _inspect_out(run_dir, kind, config, wants_resume)
    if not resume and wants_resume:
        _log(f"metajax: nothing to resume in {run_dir}: starting a new run")
    write_run_record(run_dir, kind, config.fingerprint())
    return resume


def _inspect_out(run_dir: Path, kind: str, config, wants_resume: bool) -> bool:
    """What :func:`_claim` decides about ``run_dir``, read-only: whether the run resumes;
    :class:`RunDirError` for a directory it would refuse."""
    from metajax.train.loop import CONFIG_FILE
    from metajax.train.rundir import RunDirError, check_kind, has_progress, read_run_record

    record = read_run_record(run_dir)
    check_kind(run_dir, kind, record)
    resume = has_progress(run_dir)
    foreign = record is None and (run_dir / CONFIG_FILE).is_file()
    if resume and not (run_dir / CONFIG_FILE).is_file():
        raise RunDirError(f"--out {run_dir} holds run files but no {CONFIG_FILE}; choose "
                          "another directory")
    if resume or foreign:
        try:
            existing = type(config).from_json_file(run_dir / CONFIG_FILE)
        except ConfigError as err:
            raise RunDirError(f"--out {run_dir} holds a different run ({err}); choose "
                              "another directory") from None
        if existing.fingerprint() != config.fingerprint():
            changed = "; ".join(existing.differences(config)[:5])
            raise RunDirError(f"--out {run_dir} holds a different run ({changed}); choose "
                              "another directory")
    if resume and not wants_resume:
        raise RunDirError(f"--out {run_dir} already holds a run of this configuration; pass "
                          "--resume to continue it (or print its results again), or choose "
                          "another directory")
    return resume


def _train_locked(args, config: Config, run_dir: Path, mesh=None) -> int:
    resume = _shared_claim(lambda: _claim(run_dir, "train", config, args.resume))

    from metajax.presets.build import (
        build_diagnostics,
        build_learner,
        build_optimizer,
        build_problem,
    )
    from metajax.train.loop import train

    problem = build_problem(config)
    learner = build_learner(config, problem)
    import jax

    main = jax.process_index() == 0
    if main:
        where = "" if mesh is None else f" on {config.devices} devices"
        _log(f"training {config.preset}: {config.algorithm} on {config.dataset}, "
             f"{config.steps} meta-steps{where} -> {run_dir}")
    summary = train(config, problem, learner, build_optimizer(config), run_dir, mesh=mesh,
                    progress=not args.no_progress, resume=resume, log=_log,
                    tensorboard=args.tensorboard,
                    diagnostics=build_diagnostics(config, problem, learner))
    if main:
        print(dumps(summary))
    return 0


def _cmd_plot(args) -> int:
    """Remake a run directory's plots; print their paths, then one JSON line."""
    from metajax.plots import plot_run

    paths = plot_run(args.run_dir)
    for path in paths:
        print(path)
    print(dumps({"run_dir": str(args.run_dir), "plots": [str(p) for p in paths]}))
    return 0


def _cmd_evaluate(args) -> int:
    from metajax.train.loop import CONFIG_FILE

    if not (args.run_dir / CONFIG_FILE).is_file():
        raise ConfigError(f"{args.run_dir} is not a run directory: no {CONFIG_FILE}")
    if args.write:
        return _locked(args.run_dir, "evaluate", lambda: _evaluate(args),
                       clean_failed_start=False)
    return _evaluate(args)


def _evaluate(args) -> int:
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
    from metajax.train.logging import append_jsonl
    from metajax.train.loop import BEST_PARAMS_FILE, evaluate_run

    problem = build_problem(config)
    learner = build_learner(config, problem)
    params_file = PARAMS_FILE
    if problem.has_validation and (run_dir / BEST_PARAMS_FILE).is_file():
        params_file = BEST_PARAMS_FILE
    template = learner.init(problem.init_params(jax.random.PRNGKey(0)))
    meta_params = load_params(run_dir / params_file, template)
    shots = args.shots or config.shots
    queries = args.queries or config.eval_queries
    per_task = max(config.ways, 1) * (shots + queries)
    if per_task > 2**31 - 1:
        raise ConfigError(f"--shots {shots} / --queries {queries}: {per_task} examples per task "
                          "is more than this machine can index")
    from metajax.train.parallel import device_mesh, mesh_record

    count = min(args.devices or jax.device_count(), jax.device_count())
    if args.devices and args.devices > jax.device_count():
        raise ConfigError(f"--devices {args.devices}: this machine has {jax.device_count()}")
    mesh = device_mesh(count) if count > 1 else None
    result = evaluate_run(
        meta_params, learner, problem,
        tasks=args.tasks, shots=shots, queries=queries,
        steps=args.steps or list(problem.default_eval_steps),
        seed=args.seed, mesh=mesh,
    )
    result.update({"devices": mesh_record(mesh)["devices"], "processes": 1})
    result.update({"run_dir": str(run_dir), "params": params_file})
    if args.write:
        append_jsonl(run_dir / EVALUATIONS_FILE, result)
    print(dumps(result))
    return 0


def _continual_config(args):
    config = _start_config(args, "continual").with_overrides(args.overrides)
    if args.seeds is not None:
        config = config.with_overrides([f"seeds={args.seeds}"])
    if args.data_dir is not None:
        config = config.with_overrides([f"data_dir={args.data_dir}"])
    if args.devices is not None:
        config = config.with_overrides([f"devices={args.devices}"])
    if args.sweep:
        config = dataclasses.replace(config, sweep=";".join(args.sweep))
    return config.validate()


def _task_notices(args, config) -> list[str]:
    """What a ``--set tasks=...`` the user gave means for the stream, when it is not the
    plain count: 0 is the protocol's count, and a protocol that holds out leading tasks
    (``cv_tasks``, A-GEM's 3) runs fewer than ``tasks``."""
    given = [pair.partition("=")[0].strip() for pair in args.overrides]
    if "tasks" not in given:
        return []
    counts = config.task_counts()
    if not config.tasks:
        notes = [f"metajax: tasks=0 is the protocol's count: {counts['tasks']} tasks"]
    else:
        notes = []
    if counts["cv_tasks"]:
        notes.append(
            f"metajax: tasks={counts['tasks']} counts the {counts['cv_tasks']} leading tasks "
            f"{config.benchmark} holds out for hyper-parameter search (cv_tasks): "
            f"{counts['run']} are run and reported; --set tasks="
            f"{counts['tasks'] + counts['cv_tasks']} runs {counts['tasks']}, --set cv_tasks=0 "
            f"runs all {counts['tasks']}")
    return notes


def _cmd_continual(args) -> int:
    config = _continual_config(args)
    if args.dry_run:
        joining = _distributed_notices(args)
        return _dry_run(args, "continual", config, _task_notices(args, config) + joining,
                        count_devices=not joining)
    _join(args)
    what = "seeds x sweep settings" if config.sweep else "seeds"
    mesh, count = _mesh(what, config.runs, config.devices)
    config = config.with_overrides([f"devices={count}"])
    run_dir = _run_dir(args.out, config.preset)
    notices = _task_notices(args, config)
    body = lambda: _continual_locked(args, config, run_dir, mesh, notices)  # noqa: E731
    import jax

    if jax.process_index() != 0:  # process 0 holds the lock and speaks for the run
        return body()
    return _locked(run_dir, "continual", body)


def _continual_locked(args, config, run_dir: Path, mesh=None, notices=()) -> int:
    import jax

    main = jax.process_index() == 0
    resume = _shared_claim(lambda: _claim(run_dir, "continual", config, args.resume))

    from metajax.presets.build_continual import run_experiment

    pending = list(notices)

    def log(message: str) -> None:
        # The notices go out with the run's first line, once the stream and the learner are
        # built: a failure before that stays one line on stderr.
        while pending:
            _log(pending.pop(0))
        _log(message)

    summary = run_experiment(config, run_dir, progress=not args.no_progress, resume=resume,
                             log=log if main else (lambda message: None), mesh=mesh,
                             tensorboard=args.tensorboard)
    if main:
        print(dumps(summary))
    return 0


def _data_folders(kind: str, config) -> list[tuple[str, bool]]:
    """``(dataset folder, downloadable)`` of each data set ``config`` reads."""
    if kind == "train":
        return {"sinusoid": [], "omniglot": [("omniglot", True)],
                "miniimagenet": [("miniimagenet", False)]}[config.dataset]
    if config.benchmark == "split_omniglot":
        return [("omniglot", True)]
    from metajax.presets.protocols import PROTOCOLS

    if PROTOCOLS[config.benchmark].benchmark == "split_cifar100":
        return [("cifar100", True)]
    return [("mnist", True)]


def _check_data(kind: str, config) -> list[dict]:
    """Where ``config``'s data would be read from, without reading it: the data directory
    named (``--data-dir``, ``data_dir`` or ``$METAJAX_DATA_DIR``) must exist, and a data set
    metajax cannot download must be there."""
    from metajax.data.sources import require_data_dir

    folders = _data_folders(kind, config)
    if not folders:
        return []
    root = require_data_dir(config.data_dir or None)
    found = []
    for name, downloadable in folders:
        folder = root / name
        present = folder.is_dir()
        if not present and not downloadable:
            raise ConfigError(f"{folder} does not exist: {name} is not downloaded by metajax; "
                              f"put its files there or give --data-dir")
        found.append({"dataset": name, "folder": str(folder), "present": present,
                      "downloads": not present})
    return found


def _dry_run_train(args) -> int:
    config = _train_config(args)
    notices = _distributed_notices(args)
    return _dry_run(args, "train", config, notices, count_devices=not notices)


def _distributed_notices(args) -> list[str]:
    """For a dry run: the distributed arguments checked (ConfigError when they do not fit)
    and, for a multi-process run, the line saying devices are not counted."""
    trio = (args.coordinator, args.num_processes, args.process_id)
    notices = []
    if args.distributed or any(v is not None for v in trio):
        if args.distributed and any(v is not None for v in trio):
            raise ConfigError("give either --distributed or --coordinator, --num-processes "
                              "and --process-id")
        if not args.distributed and any(v is None for v in trio):
            raise ConfigError("a multi-process run needs all of --coordinator, "
                              "--num-processes and --process-id (or --distributed)")
        if args.out is None:
            raise ConfigError("a multi-process run needs --out (a directory every process "
                              "names the same)")
        notices.append("metajax: a multi-process run: the devices are counted once the "
                       "processes have joined, not in a dry run")
    return notices


def _dry_run(args, kind: str, config, notices: list[str], count_devices: bool = True) -> int:
    """Check what a run of ``config`` would start from and print it; writes nothing."""
    if getattr(args, "tensorboard", False):
        from metajax.train.logging import require_tensorboard

        require_tensorboard()
    if count_devices:
        from metajax.train.parallel import choose_devices

        if kind == "train":
            what, size = "meta_batch_size", config.meta_batch_size
        else:
            what = "seeds x sweep settings" if config.sweep else "seeds"
            size = config.runs
        try:
            count = choose_devices(what, size, config.devices)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        config = config.with_overrides([f"devices={count}"])
    data = _check_data(kind, config)
    resume = False
    if args.out is not None:
        run_dir = _run_dir(args.out, config.preset)
        if run_dir.is_dir():
            resume = _inspect_out(run_dir, kind, config, args.resume)
        where = str(run_dir)
    else:
        where = f"runs/{config.preset}-YYYYmmdd-HHMMSS"
    for notice in notices:
        _log(notice)
    start = f"--config {args.config}" if args.config is not None else f"preset {config.preset}"
    print(f"dry run: `metajax {kind}` from {start}; nothing compiled, loaded or written")
    if kind == "continual":
        print(_wrapped(f"stream: {config.stream_description()}"))
    for found in data:
        state = "present" if found["present"] else "absent: the run would download it"
        print(f"data: {found['folder']} ({state})")
    print(f"run directory: {where} ({'resumes' if resume else 'a new run'})")
    print("configuration:")
    for line in _config_lines(config):
        print(f"  {line}")
    print(dumps({"dry_run": True, "kind": kind, "config": dataclasses.asdict(config),
                 "fingerprint": config.fingerprint(), "run_dir": where, "resume": resume,
                 "data": data, "notices": [n.removeprefix("metajax: ") for n in notices]}))
    return 0


def _raised_by_metajax(err: BaseException) -> bool:
    tb = err.__traceback__
    last = None
    while tb is not None:
        last = tb
        tb = tb.tb_next
    if last is None:
        return False
    package = Path(__file__).resolve().parent
    return Path(last.tb_frame.f_code.co_filename).resolve().is_relative_to(package)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``metajax`` command; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "presets":
            return _cmd_presets(args.name)
        if args.command == "train":
            return _cmd_train(args)
        if args.command == "continual":
            return _cmd_continual(args)
        if args.command == "plot":
            return _cmd_plot(args)
        return _cmd_evaluate(args)
    except NonFiniteLoss as err:
        return _fail(str(err))
    except Interrupted as err:
        _log(f"metajax: {err}")
        return 128 + err.signum
    except KeyboardInterrupt:
        _log("metajax: interrupted")
        return 130
    except ConfigError as err:
        return _fail(str(err).replace("\n", " "))
    except (ValueError, OSError) as err:
        # Expected: raised by metajax's own checks (data, checkpoints, sizes) or by the
        # operating system (permissions, disk, paths). A ValueError from inside a library
        # (jax, orbax, numpy) is a bug to report: its traceback is kept.
        if isinstance(err, OSError) or _raised_by_metajax(err):
            return _fail(str(err).replace("\n", " "))
        raise


if __name__ == "__main__":
    sys.exit(main())
