"""Reliability of `metajax train`: checkpoints, exact resume after SIGKILL or SIGINT, one run
per directory, the non-finite guard."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metajax.cli import main
from metajax.presets import get_preset
from metajax.presets.build import build_learner, build_optimizer, build_problem
from metajax.train.checkpoint import Checkpoints, load_params
from metajax.train.logging import read_jsonl
from metajax.train.loop import NonFiniteLoss, train
from metajax.train.rundir import LOCK_FILE, RunLock

# 120 meta-steps in chunks of 10, validation every 40, a checkpoint every 20 steps.
RUN = ["train", "sinusoid-maml", "--steps", "120", "--no-progress", "--seed", "1",
       "--set", "log_every=10", "--set", "eval_every=40", "--set", "eval_tasks=8",
       "--set", "meta_batch_size=5", "--checkpoint-every", "20"]


def command(*args):
    return [sys.executable, "-m", "metajax.cli", *args]


def train_lines(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    return sum('"meta_loss"' in line for line in path.read_text().splitlines())


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run in a subprocess: its final parameters and metrics lines."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    subprocess.run(command(*RUN, "--out", str(run_dir)), check=True, capture_output=True)
    return (run_dir / "meta_params.msgpack").read_bytes(), read_jsonl(run_dir / "metrics.jsonl")


def start_and_wait(run_dir: Path, lines: int) -> subprocess.Popen:
    proc = subprocess.Popen(command(*RUN, "--out", str(run_dir)), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while train_lines(run_dir) < lines:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the run did not log in time"
        time.sleep(0.005)
    return proc


def steps_logged(records):
    return [(r["step"], "meta_loss" in r) for r in records]


@pytest.mark.parametrize("kill_after_lines", [1, 8])
def test_sigkill_then_resume_ends_bitwise_equal(tmp_path, capsys, reference,
                                                kill_after_lines):
    run_dir = tmp_path / "run"
    proc = start_and_wait(run_dir, kill_after_lines)
    proc.kill()
    proc.wait()
    assert train_lines(run_dir) < 12  # killed before the end
    # Without --resume the directory is refused, naming the flag.
    assert main([*RUN, "--out", str(run_dir)]) == 2
    assert "--resume" in capsys.readouterr().err.strip().splitlines()[-1]
    resumed = subprocess.run(command(*RUN, "--out", str(run_dir), "--resume"),
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    params, records = reference
    assert (run_dir / "meta_params.msgpack").read_bytes() == params
    # No step logged twice and none missing; the figures are the uninterrupted run's.
    got = read_jsonl(run_dir / "metrics.jsonl")
    assert steps_logged(got) == steps_logged(records)
    for mine, theirs in zip(got, records, strict=True):
        assert {k: v for k, v in mine.items() if k != "wall_s"} == \
            {k: v for k, v in theirs.items() if k != "wall_s"}
    assert not list(run_dir.glob("*.tmp")) and not (run_dir / LOCK_FILE).exists()


def test_sigint_saves_a_checkpoint_and_resume_continues(tmp_path, reference):
    run_dir = tmp_path / "run"
    proc = start_and_wait(run_dir, 3)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "--resume" in err.strip().splitlines()[-1]
    assert "Traceback" not in err
    step = max(r["step"] for r in read_jsonl(run_dir / "metrics.jsonl"))
    assert step < 120
    checkpoints = Checkpoints(run_dir)
    assert checkpoints.latest_step() == step  # saved where it stopped
    checkpoints.close()
    resumed = subprocess.run(command(*RUN, "--out", str(run_dir), "--resume"),
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout.strip().splitlines()[-1])["resumed_from"] == step
    assert (run_dir / "meta_params.msgpack").read_bytes() == reference[0]


def test_resume_may_extend_the_run(tmp_path, capsys):
    base = ["train", "sinusoid-maml", "--no-progress", "--out", str(tmp_path / "run"),
            "--set", "log_every=10", "--set", "eval_every=0", "--set", "meta_batch_size=5",
            "--set", "eval_tasks=4"]
    assert main([*base, "--steps", "20"]) == 0
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert first["wall_s"] == first["attempt_wall_s"]
    assert main([*base, "--steps", "40", "--resume"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["resumed_from"] == 20 and summary["step"] == 40
    # wall_s counts both attempts, as metrics.jsonl does; attempt_wall_s this one only.
    last_line = read_jsonl(tmp_path / "run" / "metrics.jsonl")[-1]
    assert summary["wall_s"] >= last_line["wall_s"]
    assert summary["wall_s"] > summary["attempt_wall_s"] > 0
    assert main(["train", "sinusoid-maml", "--no-progress", "--out", str(tmp_path / "long"),
                 "--set", "log_every=10", "--set", "eval_every=0", "--set", "meta_batch_size=5",
                 "--set", "eval_tasks=4", "--steps", "40"]) == 0
    assert (tmp_path / "run" / "meta_params.msgpack").read_bytes() == \
        (tmp_path / "long" / "meta_params.msgpack").read_bytes()
    steps = [r["step"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl")
             if "meta_loss" in r]
    assert steps == [10, 20, 30, 40]


def test_a_directory_in_use_is_refused(tmp_path, capsys):
    run_dir = tmp_path / "run"
    with RunLock(run_dir, "train", log=lambda m: None):
        status = main(["train", "sinusoid-maml", "--steps", "2", "--out", str(run_dir),
                       "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2
    assert "in use by another run" in err[-1] and f"pid {os.getpid()}" in err[-1]
    assert not (run_dir / "config.json").exists()  # nothing written by the refused command


def test_two_processes_one_directory(tmp_path):
    run_dir = tmp_path / "run"
    first = subprocess.Popen(
        command("train", "sinusoid-maml", "--steps", "100000", "--no-progress", "--out",
                str(run_dir), "--set", "log_every=10"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (run_dir / LOCK_FILE).exists():
            assert first.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
        second = subprocess.run(command("train", "sinusoid-maml", "--steps", "5", "--out",
                                        str(run_dir)), capture_output=True, text=True)
        assert second.returncode == 2
        (line,) = second.stderr.strip().splitlines()
        assert "in use by another run" in line and f"pid {first.pid}" in line
    finally:
        first.kill()
        first.wait()


def test_a_stale_lock_is_reported_and_taken_over(tmp_path, capsys):
    dead = subprocess.Popen(["true"])
    dead.wait()
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    import socket

    (run_dir / LOCK_FILE).write_text(json.dumps(
        {"pid": dead.pid, "host": socket.gethostname(), "command": "train",
         "started": "2026-01-01T00:00:00"}))
    status = main(["train", "sinusoid-maml", "--steps", "2", "--out", str(run_dir),
                   "--no-progress", "--set", "log_every=1", "--set", "eval_tasks=2"])
    err = capsys.readouterr().err
    assert status == 0
    assert "stale lock" in err and f"pid {dead.pid}" in err
    assert not (run_dir / LOCK_FILE).exists()


def test_a_failed_start_leaves_nothing_behind(tmp_path, capsys):
    empty = tmp_path / "data"
    empty.mkdir()
    run_dir = tmp_path / "run"
    status = main(["train", "omniglot-5w1s-maml", "--out", str(run_dir), "--data-dir",
                   str(empty), "--no-progress"])
    assert status == 2
    assert not run_dir.exists()
    # A directory that existed is kept, emptied of what the start wrote.
    run_dir.mkdir()
    (run_dir / "config.json.x1y2.tmp").write_text("torn")
    assert main(["train", "omniglot-5w1s-maml", "--out", str(run_dir), "--data-dir",
                 str(empty), "--no-progress"]) == 2
    assert list(run_dir.iterdir()) == []


def nan_at(learner, bad_step):
    """The learner, with the meta-loss and gradients of meta-step ``bad_step`` made NaN."""

    def meta_grad(meta_params, tasks, *, step=None):
        grads, metrics = learner.meta_grad(meta_params, tasks, step=step)
        poison = jnp.where(step == bad_step, jnp.nan, 0.0)
        grads = jax.tree.map(lambda g: g + poison, grads)
        return grads, {**metrics, "meta_loss": metrics["meta_loss"] + poison}

    return learner._replace(meta_grad=meta_grad)


def small_sinusoid(**changes):
    config = dataclasses.replace(get_preset("sinusoid-maml"), steps=30, log_every=5,
                                 eval_every=10, eval_tasks=4, meta_batch_size=5,
                                 checkpoint_every=5)
    return dataclasses.replace(config, **changes).validate()


def assert_no_nonfinite_saved(run_dir: Path, config, problem, learner):
    template = learner.init(problem.init_params(jax.random.PRNGKey(0)))
    state_template = {"meta_params": template,
                      "opt_state": build_optimizer(config).init(template),
                      "key": jax.random.PRNGKey(0), "best_params": template}
    for name in ("meta_params.msgpack", "best_meta_params.msgpack"):
        if (run_dir / name).exists():
            load_params(run_dir / name, template)  # raises on a non-finite value
    for path in run_dir.rglob("*"):
        if path.suffix in (".json", ".jsonl"):
            text = path.read_text()
            assert "NaN" not in text and "Infinity" not in text, path
    checkpoints = Checkpoints(run_dir)
    for step in checkpoints.steps():
        state, _ = checkpoints.restore(step, state_template)
        assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state))
    checkpoints.close()


def test_nonfinite_step_stops_the_run_and_saves_nothing_bad(tmp_path):
    config = small_sinusoid(on_nan="stop")
    problem = build_problem(config)
    learner = nan_at(build_learner(config, problem), 17)
    with pytest.raises(NonFiniteLoss, match="meta-step 17") as info:
        train(config, problem, learner, build_optimizer(config), tmp_path, progress=False,
              log=lambda m: None)
    assert info.value.step == 17 and info.value.last_checkpoint == 15
    assert_no_nonfinite_saved(tmp_path, config, problem, learner)
    assert (tmp_path / "curves.png").stat().st_size > 0  # drawn up to the stop


def test_nonfinite_step_is_skipped_and_counted(tmp_path):
    config = small_sinusoid(on_nan="skip")
    problem = build_problem(config)
    learner = nan_at(build_learner(config, problem), 17)
    summary = train(config, problem, learner, build_optimizer(config), tmp_path,
                    progress=False, log=lambda m: None)
    assert summary["step"] == 30 and summary["skipped_steps"] == 1
    lines = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if "meta_loss" in r]
    assert [r.get("skipped_steps", 0) for r in lines] == [0, 0, 0, 1, 1, 1]
    assert all(np.isfinite(r["meta_loss"]) for r in lines)
    assert_no_nonfinite_saved(tmp_path, config, problem, learner)
    # The skipped step changed the run: its parameters differ from the unpoisoned run's.
    clean = tmp_path / "clean"
    train(config, problem, build_learner(config, problem), build_optimizer(config), clean,
          progress=False, log=lambda m: None)
    assert (clean / "meta_params.msgpack").read_bytes() != \
        (tmp_path / "meta_params.msgpack").read_bytes()


def test_huge_outer_lr_exits_2_and_saves_no_nan(tmp_path, capsys):
    run_dir = tmp_path / "run"
    status = main(["train", "sinusoid-maml", "--steps", "3", "--out", str(run_dir),
                   "--no-progress", "--set", "outer_lr=1e38", "--set", "outer_optimizer=sgd",
                   "--set", "log_every=1"])
    (line,) = capsys.readouterr().err.strip().splitlines()[-1:]
    assert status == 2
    assert "non-finite" in line and "meta-step 0" in line
    assert not (run_dir / "meta_params.msgpack").exists()
    for path in run_dir.rglob("*") if run_dir.exists() else []:
        if path.suffix in (".json", ".jsonl"):
            assert "NaN" not in path.read_text()


def test_resume_with_no_steps_left_ends_on_its_checkpoint(tmp_path):
    config = small_sinusoid(steps=40, on_nan="stop", checkpoint_every=10)
    problem = build_problem(config)
    learner = build_learner(config, problem)
    with pytest.raises(NonFiniteLoss):  # stops at step 25: checkpoints 10, 20 (unfinished)
        train(config, problem, nan_at(learner, 25), build_optimizer(config), tmp_path,
              progress=False, log=lambda m: None)
    shorter = dataclasses.replace(config, steps=20)
    summary = train(shorter, problem, learner, build_optimizer(shorter), tmp_path,
                    progress=False, resume=True, log=lambda m: None)
    assert summary["step"] == 20 and summary["resumed_from"] == 20
    steps = [(r["step"], "meta_loss" in r) for r in read_jsonl(tmp_path / "metrics.jsonl")]
    assert len(steps) == len(set(steps))  # nothing logged twice
    again = train(shorter, problem, learner, build_optimizer(shorter), tmp_path,
                  progress=False, resume=True, log=lambda m: None)
    assert again["step"] == 20 and len(read_jsonl(tmp_path / "metrics.jsonl")) == len(steps)


def test_a_new_run_does_not_keep_an_old_runs_checkpoints(tmp_path):
    config = small_sinusoid(steps=10)
    problem = build_problem(config)
    learner = build_learner(config, problem)
    train(config, problem, learner, build_optimizer(config), tmp_path, progress=False,
          log=lambda m: None)
    other = dataclasses.replace(config, steps=5, seed=9)
    train(other, problem, learner, build_optimizer(other), tmp_path, progress=False,
          log=lambda m: None)
    checkpoints = Checkpoints(tmp_path)
    assert checkpoints.steps() == [5]
    checkpoints.close()


def test_a_failed_start_keeps_files_it_did_not_write(tmp_path, capsys):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "model_epoch3.pt").write_text("user's")
    (run_dir / "notes.tmp").write_text("user's")
    (run_dir / "config.json").write_text(json.dumps({"preset": "other", "steps": 3}))
    status = main(["train", "sinusoid-maml", "--out", str(run_dir), "--no-progress"])
    assert status == 2 and "holds a different run" in capsys.readouterr().err
    assert sorted(p.name for p in run_dir.rglob("*")) == \
        ["checkpoints", "config.json", "model_epoch3.pt", "notes.tmp"]
