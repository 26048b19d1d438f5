"""metajax against its PyTorch peers, side by side in one session: the ratio table.

    bash benchmarks/peers/setup.sh                 # once: the peers' own venv
    python benchmarks/compare.py [--rounds 2] [--rows maml-2nd,agem,...] [--cores 0] [--write]

Every row runs metajax (``benchmarks/speed.py``) and each peer (``benchmarks/peers/``) one
after the other, A B C A B C, for ``--rounds`` rounds, so that the machine's drift falls on
all of them alike; a row's figure is the median over rounds of each implementation's rate,
and its ratio is metajax's over the fastest peer's. Every JSON line is appended to
``benchmarks/results/speed.jsonl``; ``--write`` also puts the table, with the machine, the
versions and the date, into ``benchmarks/RESULTS.md`` (between the ``speed-table`` markers).
The peers stay out of the project's dependencies and out of CI.

``--cores LIST`` (a ``taskset`` CPU list, e.g. ``0``) pins every implementation alike to
those cores, the peers with as many torch threads; the lines record it as ``cores``, the
table is printed and, with ``--write``, goes under the ``speed-table-pinned`` markers
instead, and the default table keeps only unpinned runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "RESULTS.md"
LINES = HERE / "results" / "speed.jsonl"
BEGIN, END = "<!-- speed-table:begin -->", "<!-- speed-table:end -->"
PINNED = "<!-- speed-table-pinned:begin -->", "<!-- speed-table-pinned:end -->"

MAML = ["--ways", "5", "--shots", "1", "--query", "15", "--meta-batch", "32"]
MAML_PEERS = ("learn2learn", "func-loop", "func-vmap")

# row -> (description, unit, metajax speed.py args, peer script, peer args, peer impls)
ROWS = {
    "maml-2nd": ("MAML Omniglot 5-way 1-shot, 15 query, 32 tasks, 1 inner step, 2nd order",
                 "tasks/s", ["maml", *MAML, "--inner-steps", "1"], "maml.py",
                 [*MAML, "--inner-steps", "1"], MAML_PEERS),
    "maml-1st": ("same, first order", "tasks/s",
                 ["maml", *MAML, "--inner-steps", "1", "--first-order"], "maml.py",
                 [*MAML, "--inner-steps", "1", "--first-order"], MAML_PEERS),
    "maml-5step": ("same, 5 inner steps, 2nd order", "tasks/s",
                   ["maml", *MAML, "--inner-steps", "5", "--steps", "4"], "maml.py",
                   [*MAML, "--inner-steps", "5", "--steps", "6"], MAML_PEERS),
    "finetune": ("fine-tune, Permuted-MNIST shape 20 x 1,000, MLP 784-100-100-10, batch 10",
                 "samples/s", ["finetune"], "stream.py", ["finetune"], ("torch", "avalanche")),
    "er": ("ER, reservoir 200, 10 replayed", "samples/s", ["er"], "stream.py", ["er"],
           ("torch", "avalanche")),
    "agem": ("A-GEM, 250 memories/task, reference batch 256", "samples/s", ["agem"],
             "stream.py", ["agem"], ("torch", "avalanche")),
    "gem": ("GEM, 5 tasks, 250 memories/task, margin 0.5", "samples/s", ["gem"], "stream.py",
            ["gem"], ("torch", "avalanche")),
    "mer": ("MER, reservoir 200, s=5, 10 memories (5 tasks x 200)", "samples/s",
            ["mer", "--tasks", "5", "--rows", "200"], "stream.py",
            ["mer", "--tasks", "5", "--rows", "200"],
            ("torch", "avalanche")),
    "lamaml": ("La-MAML, reservoir 200, 5 glances (5 tasks x 500)", "samples/s",
               ["lamaml", "--tasks", "5", "--rows", "500"], "stream.py",
               ["lamaml", "--tasks", "5", "--rows", "500"],
               ("torch", "avalanche")),
}


def peer_python() -> Path:
    venv = Path(os.environ.get("PEERS_VENV", HERE / "peers" / ".venv"))
    python = venv / "bin" / "python"
    if not python.exists():
        sys.exit(f"compare.py: no peer venv at {venv}; run: bash benchmarks/peers/setup.sh")
    return python


def run_json(cmd: list[str]) -> dict:
    """Run ``cmd``; its last stdout line parsed as JSON (an ``error`` entry if it failed)."""
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [x for x in proc.stdout.splitlines() if x.strip().startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": " | ".join(tail), "cmd": " ".join(cmd)}
    out = json.loads(lines[-1])
    out["wall_s"] = time.perf_counter() - start
    out["cmd"] = " ".join(cmd)
    return out


def rate(line: dict) -> float | None:
    return line.get("tasks_per_s", line.get("samples_per_s"))


def machine() -> str:
    model = ""
    try:
        for text in Path("/proc/cpuinfo").read_text().splitlines():
            if text.startswith("model name"):
                model = text.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} cores, {model or platform.processor()}"


def cpu_count(cores: str) -> int:
    """The number of CPUs in a ``taskset`` list such as ``0``, ``0,1`` or ``0-3``."""
    n = 0
    for part in cores.split(","):
        low, _, high = part.partition("-")
        if not low.isdigit() or (high and not high.isdigit()):
            raise ValueError(f"--cores must be a CPU list such as 0, 0,1 or 0-3, got {cores!r}")
        n += int(high) - int(low) + 1 if high else 1
    return n


def table(results: dict[str, dict[str, list[dict]]], rounds: int, cores: str | None = None) -> str:
    rows = ["| row | unit | metajax | fastest peer | ratio | all peers (median) | metajax "
            "fraction of peak | metajax compile s |", "| --- " * 8 + "|"]
    versions = {}
    for name, by_impl in results.items():
        desc, unit = ROWS[name][0], ROWS[name][1]
        medians = {}
        for impl, lines in by_impl.items():
            rates = [rate(x) for x in lines if rate(x) is not None]
            if rates:
                medians[impl] = statistics.median(rates)
            for x in lines:
                versions.update({k: v for k, v in x.get("versions", {}).items()})
        ours = medians.get("metajax")
        peers = {k: v for k, v in medians.items() if k != "metajax"}
        best = max(peers, key=peers.get) if peers else None
        ratio = f"{ours / peers[best]:.2f}x" if ours and best else "n/a"
        ours_lines = [x for x in by_impl.get("metajax", []) if "error" not in x]
        frac = statistics.median([x["fraction_of_peak"] for x in ours_lines]) if ours_lines \
            else None
        comp = statistics.median([x["compile_s"] for x in ours_lines]) if ours_lines else None
        failed = [k for k, lines in by_impl.items() if any("error" in x for x in lines)]
        all_peers = ", ".join(f"{k} {v:,.0f}" for k, v in sorted(peers.items()))
        if failed:
            all_peers += f" (failed: {', '.join(failed)})"
        rows.append(
            f"| {desc} | {unit} | {ours:,.1f} | {best} {peers[best]:,.1f} | **{ratio}** | "
            f"{all_peers} | {frac:.3f} | {comp:.1f} |" if ours and best else
            f"| {desc} | {unit} | {ours} | n/a | n/a | {all_peers} | {frac} | {comp} |"
        )
    pinned = f" --cores {cores}" if cores else ""
    where = machine() + (f", pinned to CPU {cores}" if cores else "")
    head = (f"Measured by `python benchmarks/compare.py --rounds {rounds}{pinned} --write` on "
            f"{time.strftime('%Y-%m-%d')}, {where}; " + ", ".join(
                f"{k} {v}" for k, v in sorted(versions.items())) +
            ". Medians over the rounds, implementations alternating within each round.")
    return head + "\n\n" + "\n".join(rows)


def write_results(text: str, markers: tuple[str, str] = (BEGIN, END)) -> None:
    begin, end = markers
    block = f"{begin}\n{text}\n{end}"
    body = RESULTS.read_text()
    if begin in body and end in body:
        before, rest = body.split(begin, 1)
        after = rest.split(end, 1)[1]
        body = before + block + after
    else:
        body = body.rstrip() + "\n\n## Speed against the PyTorch peers\n\n" + block + "\n"
    RESULTS.write_text(body)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--rows", default=",".join(ROWS), help="comma-separated rows")
    parser.add_argument("--write", action="store_true", help="update benchmarks/RESULTS.md")
    parser.add_argument("--cores", default=None,
                        help="pin every implementation to these CPUs (taskset list, e.g. 0)")
    args = parser.parse_args(argv)
    pin: list[str] = []
    threads: list[str] = []
    if args.cores:
        try:
            threads = ["--threads", str(cpu_count(args.cores))]
        except ValueError as err:
            sys.exit(f"compare.py: {err}")
        pin = ["taskset", "-c", args.cores]
    names = [x for x in args.rows.split(",") if x]
    unknown = [x for x in names if x not in ROWS]
    if unknown or args.rounds < 1:
        sys.exit(f"compare.py: unknown rows {unknown}; rows are {list(ROWS)}"
                 if unknown else "compare.py: --rounds must be >= 1")
    peer = peer_python()
    results: dict[str, dict[str, list[dict]]] = {n: {} for n in names}
    for r in range(args.rounds):
        for name in names:
            _, _, ours, script, theirs, impls = ROWS[name]
            cmds = {"metajax": [*pin, sys.executable, str(HERE / "speed.py"), *ours]}
            for impl in impls:
                cmds[impl] = [*pin, str(peer), str(HERE / "peers" / script), *(
                    [theirs[0], "--impl", impl, *theirs[1:]] if script == "stream.py"
                    else ["--impl", impl, *theirs]), *threads]
            for impl, cmd in cmds.items():
                line = run_json(cmd)
                line.update(row=name, round=r, impl_name=impl, cores=args.cores)
                results[name].setdefault(impl, []).append(line)
                LINES.parent.mkdir(parents=True, exist_ok=True)
                with LINES.open("a") as f:
                    f.write(json.dumps(line) + "\n")
                print(f"[round {r}] {name:10s} {impl:12s} "
                      f"{rate(line) if 'error' not in line else line['error']}",
                      file=sys.stderr, flush=True)
    text = table(latest_results(names, results, args.cores), args.rounds, args.cores)
    print(text)
    if args.write:
        write_results(text, PINNED if args.cores else (BEGIN, END))


def latest_results(names: list[str], fresh: dict, cores: str | None = None) -> dict:
    """This run's rows, plus the latest run of every other row in ``speed.jsonl`` made with
    the same ``cores``, so that re-running some rows keeps the rest of the table (each row
    from one alternating run)."""
    lines = [json.loads(x) for x in LINES.read_text().splitlines() if x.strip()] \
        if LINES.exists() else []
    out = {}
    for name in ROWS:
        if name in names:
            out[name] = fresh[name]
            continue
        rows = [x for x in lines if x.get("row") == name and x.get("cores") == cores]
        starts = [i for i, x in enumerate(rows)
                  if x.get("round") == 0 and x.get("impl_name") == "metajax"]
        if starts:
            by_impl: dict[str, list[dict]] = {}
            for x in rows[starts[-1]:]:
                by_impl.setdefault(x["impl_name"], []).append(x)
            out[name] = by_impl
    return out


if __name__ == "__main__":
    main()
