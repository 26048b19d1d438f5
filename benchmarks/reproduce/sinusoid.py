"""Reproduce the MAML paper's sinusoid figures (Finn et al. 2017, Appendix C).

Meta-trains a preset at its published setting, then evaluates on 600 test tasks with 5-point
(and 10-point) fine-tuning after 1, 5 and 10 inner steps, printing one JSON line per
evaluation and a final summary line. Published MAML figures (5 points): MSE 0.67 / 0.38 / 0.35.

    python benchmarks/reproduce/sinusoid.py --preset sinusoid-maml --out runs/bench-sinusoid-maml
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time

PUBLISHED = {"sinusoid-maml": {"1": 0.67, "5": 0.38, "10": 0.35}}


def run(cmd: list[str]) -> dict:
    """Run a metajax command and return the JSON object on its last stdout line."""
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="sinusoid-maml")
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=None, help="default: the preset's")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="passed to `metajax train --set`")
    args = parser.parse_args()

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
    print(json.dumps({
        "preset": args.preset, "overrides": args.overrides, "steps": summary["step"],
        "train_wall_s": round(train_wall, 1),
        "steps_per_s": summary["steps_per_s"], "mse_5shot": results["5"],
        "mse_10shot": results["10"], "published_5shot": PUBLISHED.get(args.preset),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
    }))


if __name__ == "__main__":
    main()
