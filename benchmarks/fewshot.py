"""Train few-shot presets under one wall-clock budget each, test them, print the table.

    python benchmarks/fewshot.py --arms maml imaml mamlpp-fit --budget-s 3600 \\
        --data-dir ~/data --out runs/bench-fewshot

Every arm is ``metajax train PRESET --set time_budget_s=BUDGET [--set ...]`` followed by
``metajax evaluate RUN --tasks 600`` (the best validation checkpoint, the arm's test inner
steps), so the arms of a table differ only in what their presets and overrides say. One JSON
line per arm (settings, meta-steps, wall time, validation curve with the wall time of each
point, test accuracy and 95% interval) is appended to ``--jsonl``; an arm already there with
the same preset, overrides and budget is not run again, so an interrupted table resumes.

Arms (``--arms``; ``metajax presets`` describes the presets):

- ``maml``, ``imaml``, ``mamlpp``: ``omniglot-5w1s-{maml,imaml,mamlpp}`` as they are;
- ``mamlpp-fit``: ``omniglot-5w1s-mamlpp`` (the authors' released config) with its
  epoch-counted schedules compressed into ``--mamlpp-steps`` meta-steps (the preset's 100
  epochs, each of ``--mamlpp-steps // 100`` steps), its techniques as released: MSL, LSLR,
  BNWB and CA on, second order throughout (no derivative-order annealing);
- ``mamlpp-fit-no-{msl,lslr,bnwb,ca}``: the same with one technique off (CA off: a constant
  meta-lr), and ``mamlpp-fit-da`` with the paper's derivative-order annealing turned on
  (first order for the first third of the epochs, as 50 of the paper's 150): the ablation
  table.

``--ways 20`` runs the 20-way 1-shot presets instead. ``--budget-s`` defaults to an hour
per arm (the budget of the tables in ``benchmarks/RESULTS.md``); ``--table-only`` prints the
table of the arms already in ``--jsonl`` and trains nothing.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import time
from pathlib import Path

from _results import append_line, read_lines
from _results import machine as current_machine

from metajax.presets import get_preset
from metajax.presets.config import Config

# Each arm turns one technique off; the released config trains second order throughout, so
# its derivative-order annealing arm turns DA *on* instead (the paper's first order for the
# first 50 of 150 epochs: a third of the epochs).
ABLATIONS = {
    "msl": ["msl=false"],
    "lslr": ["lslr=false"],
    "bnwb": ["bnwb=false"],
    "ca": ["outer_lr_schedule=constant"],
}


#: Every arm ``--arms`` accepts, in the order of the docstring.
ARMS: tuple[str, ...] = ("maml", "imaml", "mamlpp", "mamlpp-fit", "mamlpp-fit-da",
                         *(f"mamlpp-fit-no-{t}" for t in ABLATIONS))
ARMS_HELP = "\n".join([
    "arms:",
    "  maml, imaml, mamlpp   the omniglot-{5,20}w1s presets as they are",
    "  mamlpp-fit            MAML++ with its schedules compressed into --mamlpp-steps",
    f"  mamlpp-fit-no-{{{','.join(ABLATIONS)}}}",
    "                        mamlpp-fit with one technique off: the ablation table",
    "  mamlpp-fit-da         mamlpp-fit with derivative-order annealing on (first order for",
    "                        the first third of the epochs; the released config has none)",
])
DEFAULT_BUDGET_S = 3600.0


def arm_settings(arm: str, ways: int, mamlpp_steps: int) -> tuple[str, list[str]]:
    """The preset and ``--set`` overrides of ``arm``; ``ValueError`` for an unknown one."""
    base = f"omniglot-{ways}w1s"
    if arm in ("maml", "imaml", "mamlpp"):
        return f"{base}-{arm}", []
    if arm in ("mamlpp-fit", "mamlpp-fit-da") or arm.startswith("mamlpp-fit-no-"):
        off = arm.removeprefix("mamlpp-fit").removeprefix("-no-").removeprefix("-")
        if off and off != "da" and off not in ABLATIONS:
            raise ValueError(f"unknown technique {off!r} in {arm!r}; one of {sorted(ABLATIONS)}")
        preset = get_preset(f"{base}-mamlpp")
        # The preset's epochs (100 in the released config), each of mamlpp_steps / epochs steps,
        # so that every epoch-counted schedule keeps its fraction of the run.
        epochs = preset.steps // preset.iters_per_epoch
        fit = [f"steps={mamlpp_steps}", f"iters_per_epoch={max(1, mamlpp_steps // epochs)}"]
        if off == "da":
            return f"{base}-mamlpp", [*fit, f"first_order_epochs={epochs // 3}"]
        return f"{base}-mamlpp", fit + ABLATIONS.get(off, [])
    raise ValueError(
        f"unknown arm {arm!r}; arms: maml, imaml, mamlpp, mamlpp-fit, mamlpp-fit-da, "
        + ", ".join(f"mamlpp-fit-no-{t}" for t in ABLATIONS)
    )


def _last_json(cmd: list[str]) -> dict:
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _curve(run_dir: Path) -> list[dict]:
    """Validation points of a run with the training wall time at which each was taken."""
    wall, curve = {}, []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "wall_s" in record:
            wall[record["step"]] = record["wall_s"]
        if "val_accuracy" in record and "run_dir" not in record:
            curve.append({"step": record["step"], "val_accuracy": round(record["val_accuracy"], 5)})
    for point in curve:
        point["wall_s"] = wall.get(point["step"])
    return curve


def table(lines: list[dict]) -> str:
    """Markdown table of arms: steps, wall time, best validation and test accuracy in %."""
    rows = [
        "| arm | preset | overrides | meta-steps | train wall (s) | best val (%) "
        "| test acc (%) | test steps |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for d in lines:
        best = max((p["val_accuracy"] for p in d["curve"]), default=None)
        rows.append(
            f"| {d['arm']} | {d['preset']} | {' '.join(d['overrides']) or '-'} | {d['steps']:,} "
            f"| {d['train_wall_s']:.0f} | {'-' if best is None else f'{100 * best:.2f}'} "
            f"| {100 * d['test']['mean']:.2f} +/- {100 * d['test']['ci95']:.2f} "
            f"| {d['test'].get('inner_steps', '-')} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=ARMS_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--arms", nargs="+", required=True, metavar="ARM",
                        help="arms to run, one or more of: " + " ".join(ARMS))
    parser.add_argument("--ways", type=int, choices=(5, 20), default=5)
    parser.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                        help="training wall-clock budget of every arm, in seconds "
                             f"(default {DEFAULT_BUDGET_S:g}: one hour)")
    parser.add_argument("--mamlpp-steps", type=int, default=6000,
                        help="meta-steps the mamlpp-fit arms compress their schedules into")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="extra override for every arm (repeatable)")
    parser.add_argument("--tasks", type=int, default=600, help="test tasks per arm")
    parser.add_argument("--data-dir", default=None,
                        help="dataset folder (default: $METAJAX_DATA_DIR, else the user cache)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-fewshot"),
                        help="folder of the arms' run directories")
    parser.add_argument("--jsonl", type=Path, default=Path("benchmarks/results/fewshot.jsonl"),
                        help="results file: one JSON line per finished arm")
    parser.add_argument("--table-only", action="store_true", help="print the table, run nothing")
    args = parser.parse_args(argv)
    try:
        arms = {a: arm_settings(a, args.ways, args.mamlpp_steps) for a in args.arms}
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    done = read_lines(args.jsonl)

    def resolved(arm):
        # Lines carry the resolved config, so a preset whose defaults changed is run again.
        preset, overrides = arms[arm]
        config = get_preset(preset).with_overrides(
            [*overrides, *args.overrides, f"time_budget_s={args.budget_s:g}"])
        return json.loads(config.to_json())

    defaults = json.loads(Config().to_json())

    def finished(arm):
        # A field added since a line was written counts at its default value.
        preset, overrides = arms[arm]
        config = resolved(arm)
        return [d for d in done if d["preset"] == preset and d["budget_s"] == args.budget_s
                and d["overrides"] == overrides + args.overrides
                and {**defaults, **d.get("config", config)} == config]

    cli = [sys.executable, "-m", "metajax.cli"]
    data = ["--data-dir", args.data_dir] if args.data_dir else []
    for arm, (preset, overrides) in arms.items():
        if args.table_only or finished(arm):
            continue
        overrides = overrides + args.overrides
        run_dir = args.out / f"{arm}-{args.ways}w1s-{time.strftime('%Y%m%d-%H%M%S')}"
        sets = [x for o in [*overrides, f"time_budget_s={args.budget_s:g}"] for x in ("--set", o)]
        print(f"{arm}: {preset} {' '.join(overrides)} -> {run_dir}", file=sys.stderr, flush=True)
        start = time.perf_counter()
        summary = _last_json([*cli, "train", preset, "--out", str(run_dir), "--no-progress",
                              *data, *sets])
        train_wall = time.perf_counter() - start
        test = _last_json([*cli, "evaluate", str(run_dir), "--tasks", str(args.tasks)])
        line = {
            "arm": arm, "preset": preset, "overrides": overrides, "budget_s": args.budget_s,
            "config": resolved(arm),
            "steps": summary["step"], "train_wall_s": round(train_wall, 1),
            "curve": _curve(run_dir), "test": test, "run_dir": str(run_dir),
            "date": datetime.date.today().isoformat(), "machine": current_machine(),
            "command": " ".join(sys.argv),
        }
        append_line(args.jsonl, line)
        done.append(line)
        print(f"{arm}: {summary['step']} steps, test {100 * test['mean']:.2f} +/- "
              f"{100 * test['ci95']:.2f}%", file=sys.stderr, flush=True)
    print(table([line for arm in arms for line in finished(arm)[-1:]]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
