"""Run continual-learning presets side by side and print the table of RESULTS.md.

    python benchmarks/continual.py --presets rot-mnist-er rot-mnist-lamaml --seeds 5 \\
        --out runs/bench-continual --jsonl benchmarks/results/continual.jsonl

Every preset runs through :func:`metajax.presets.build_continual.run_experiment` (its run
directory under ``--out``) and appends one JSON line (preset, settings, metrics with their
standard deviations over seeds, wall time, machine) to ``--jsonl``. A preset already in the
file with the same resolved configuration is not run again, so an interrupted table resumes.
The markdown table of every line in the file that matches ``--presets`` is printed at the end.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from fnmatch import fnmatch
from pathlib import Path

from _results import append_line, read_lines
from _results import machine as current_machine

from metajax.presets.build_continual import run_experiment
from metajax.presets.continual import CONTINUAL_PRESETS, get_continual_preset


def _fmt(value, std=None, scale=100.0) -> str:
    if value is None:
        return "-"
    text = f"{scale * value:.2f}"
    return text if std is None else f"{text} +/- {scale * std:.2f}"


def table(lines: list[dict]) -> str:
    """Markdown table: retained accuracy (ACC/RA), BWT (BTI), forgetting and LCA in %."""
    out = [
        "| preset | seeds | RA / ACC (%) | BTI / BWT (%) | forgetting (%) | LCA_10 (%) "
        "| wall (s) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for line in lines:
        m, std = line["metrics"], line["metrics"].get("std", {})
        out.append(
            f"| {line['preset']} | {line['seeds']} "
            f"| {_fmt(m['avg_accuracy'], std.get('avg_accuracy'))}"
            f" | {_fmt(m['bwt'], std.get('bwt'))} | {_fmt(m['forgetting'], std.get('forgetting'))}"
            f" | {_fmt(m['lca'], std.get('lca'))} | {m['wall_s']:.0f} |"
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", required=True,
                        help="preset names or shell patterns (e.g. 'rot-mnist-*')")
    parser.add_argument("--seeds", type=int, default=1, help="seeds per preset (vmapped)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override for every preset (repeatable)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-continual"))
    parser.add_argument("--jsonl", type=Path, default=Path("benchmarks/results/continual.jsonl"))
    parser.add_argument("--table-only", action="store_true", help="print the table, run nothing")
    parser.add_argument("--rerun", action="store_true",
                        help="run the presets even when the file has them (lines written before "
                             "lines carried their configuration match any configuration); the "
                             "table shows the newest line of each")
    args = parser.parse_args(argv)

    names = [n for n in CONTINUAL_PRESETS if any(fnmatch(n, p) for p in args.presets)]
    names.sort(key=lambda n: [i for i, p in enumerate(args.presets) if fnmatch(n, p)][0])
    if not names:
        print(f"no preset matches {args.presets}", file=sys.stderr)
        return 2
    done = read_lines(args.jsonl)

    def resolved(name):
        return get_continual_preset(name).with_overrides([*args.overrides, f"seeds={args.seeds}"])

    def finished(name):
        # Lines carry the resolved config, so a preset whose defaults changed since a line was
        # written is run again; older lines without one match on preset, seeds and overrides.
        config = json.loads(resolved(name).to_json())
        return [d for d in done if d["preset"] == name and d["seeds"] == args.seeds
                and d["overrides"] == args.overrides and d.get("config", config) == config]

    if not args.table_only:
        machine = current_machine()
        for name in names:
            if finished(name) and not args.rerun:
                print(f"{name}: already in {args.jsonl}", file=sys.stderr)
                continue
            config = resolved(name)
            run_dir = args.out / f"{name}-s{args.seeds}-{time.strftime('%Y%m%d-%H%M%S')}"
            summary = run_experiment(config, run_dir, progress=False,
                                     log=lambda m: print(m, file=sys.stderr))
            line = {
                "preset": name, "seeds": args.seeds, "overrides": args.overrides,
                "config": json.loads(config.to_json()),
                "metrics": {k: v for k, v in summary.items() if k != "acc_matrix"},
                "date": datetime.date.today().isoformat(), "machine": machine,
                "command": " ".join(sys.argv),
            }
            append_line(args.jsonl, line)
            done.append(line)
            m = line["metrics"]
            print(f"{name}: ACC {m['avg_accuracy']:.4f} BWT {m['bwt']:.4f} "
                  f"({m['wall_s']:.0f} s)", file=sys.stderr)
    print(table([line for name in names for line in finished(name)[-1:]]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
