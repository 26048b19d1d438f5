"""Continual runs survive kills and signals: task checkpoints, ``--resume`` at the next
unfinished task with results bit for bit those of an uninterrupted run, refused reruns, and
non-finite training stopped at the task that caused it with no NaN in any file."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from fixtures_omniglot import closed_port_url
from test_cl_run import LOSS, apply_fn, conflicting_stream, mlp_init
from test_mnist import idx_bytes, spec

from metajax.cli import main
from metajax.continual.er import er
from metajax.continual.learners import finetune
from metajax.continual.run import NonFiniteTask, run
from metajax.data import mnist
from metajax.train.config import ConfigError
from metajax.train.continual import train_continual
from metajax.train.rundir import write_run_record

PRESET = "perm-mnist-finetune"
TASKS = 4
# Two passes per task (the second reshuffled from the task's key) and LCA. (Several seeds
# resume the same way, see the first test; their vmapped flax initialisation compiles slowly.)
SMALL = ["--set", f"tasks={TASKS}", "--set", "train_per_task=20", "--set", "test_per_task=10",
         "--set", "lca_batches=2", "--set", "epochs=2", "--set", "hidden=16", "--set",
         "layers=1", "--no-progress"]

# A subprocess running `metajax` on the fake MNIST files: the parent's patched checksums are
# passed in, and with SLEEP set every task boundary waits that long after its checkpoint and
# its tasks.jsonl line, so that a signal can be sent between two tasks.
DRIVER = """
import os, sys, time
from metajax.data import mnist
import metajax.train.continual as tc
for key, fields in {files!r}.items():
    mnist.FILES[key] = mnist.MNISTFile(*fields)
pause = float(os.environ.get("SLEEP", "0"))
original = tc.run
def slow_run(*args, on_task_state, **kwargs):
    def hook(t, carry):
        on_task_state(t, carry)
        time.sleep(pause)
    return original(*args, on_task_state=hook, **kwargs)
tc.run = slow_run
from metajax.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def fake_data(tmp_path_factory):
    """A data dir of generated MNIST idx files, with mnist.FILES patched to their checksums
    (in this process; a driver script patches them in subprocesses)."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    arrays = {
        "train_images": rng.integers(0, 256, (2000, 28, 28), dtype=np.uint8),
        "train_labels": (np.arange(2000) % 10).astype(np.uint8),
        "test_images": rng.integers(0, 256, (40, 28, 28), dtype=np.uint8),
        "test_labels": (np.arange(40) % 10).astype(np.uint8),
    }
    (root / "mnist").mkdir()
    with pytest.MonkeyPatch.context() as patch:
        for key, array in arrays.items():
            data = idx_bytes(array)
            patch.setitem(mnist.FILES, key, spec(key, data, array.shape))
            (root / "mnist" / mnist.FILES[key].filename).write_bytes(data)
        patch.setenv("METAJAX_DATA_DIR", str(root))
        patch.setenv("METAJAX_MNIST_URL", closed_port_url())
        driver = root / "driver.py"
        driver.write_text(DRIVER.format(files={k: tuple(v) for k, v in mnist.FILES.items()}))
        yield {"root": root, "driver": driver}


@pytest.fixture(scope="module")
def baseline(fake_data, tmp_path_factory):
    """An uninterrupted run of the small configuration: its directory and summary."""
    out = tmp_path_factory.mktemp("baseline") / "run"
    assert main(["continual", PRESET, "--out", str(out), *SMALL]) == 0
    return out


def _last_state(run_dir: Path) -> dict:
    """The arrays of the newest checkpoint of ``run_dir``, read as saved (no template)."""
    steps = sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
    return ocp.PyTreeCheckpointer().restore(run_dir / "checkpoints" / str(steps[-1]) / "state")


def _assert_same_run(a: Path, b: Path) -> None:
    """Same accuracy matrices, same task lines, same final state, every bit."""
    assert json.loads((a / "acc_matrix.json").read_text()) == \
        json.loads((b / "acc_matrix.json").read_text())
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (a, b))
    for key in ("avg_accuracy", "bwt", "forgetting", "fwt", "lca", "lca_curve", "train_metrics"):
        assert ma[key] == mb[key], key
    lines = [[{k: v for k, v in json.loads(x).items() if k != "wall_s"}
              for x in (d / "tasks.jsonl").read_text().splitlines()] for d in (a, b)]
    assert [r["task"] for r in lines[1]] == list(range(TASKS))
    assert lines[0] == lines[1]
    sa, sb = _last_state(a), _last_state(b)
    assert jax.tree.structure(sa) == jax.tree.structure(sb)
    for x, y in zip(jax.tree.leaves(sa), jax.tree.leaves(sb), strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()


def _start(fake_data, out: Path, sleep: float) -> subprocess.Popen:
    env = {**os.environ, "SLEEP": str(sleep)}
    return subprocess.Popen(
        [sys.executable, str(fake_data["driver"]), "continual", PRESET, "--out", str(out),
         *SMALL], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        cwd=Path(__file__).parent,
    )


def _wait_for_lines(proc: subprocess.Popen, path: Path, lines: int, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and len(path.read_text().splitlines()) >= lines:
            return
        if proc.poll() is not None:
            pytest.fail(f"the run ended (status {proc.returncode}) before {lines} task lines: "
                        f"{proc.stderr.read()}")
        time.sleep(0.05)
    proc.kill()
    pytest.fail(f"no {lines} task lines in {path} after {timeout} s")


def test_run_resumed_from_a_carry_equals_the_uninterrupted_run_bit_for_bit():
    stream = conflicting_stream(num_tasks=3, n_train=40, n_test=50)
    learner = er(LOSS, optax.sgd(0.1), memory_size=20, replay_batch=5)
    kwargs = dict(params=mlp_init(3), apply_fn=apply_fn, batch_size=5, epochs=2, lca_batches=2)
    carries = {}

    def keep(t, carry):
        carries[t] = jax.device_get(carry)  # as a restore from disk gives it: numpy arrays

    full = run(learner, stream, jax.random.PRNGKey(3), on_task_state=keep, **kwargs)
    assert sorted(carries) == [0, 1, 2]
    assert not carries[0]["acc_rows"][1:].any() and carries[0]["acc_rows"][0].any()
    final = {}
    resumed = run(learner, stream, jax.random.PRNGKey(3), resume_from=(0, carries[0]),
                  on_task_state=lambda t, c: final.update({t: jax.device_get(c)}), **kwargs)
    assert sorted(final) == [1, 2]  # tasks 0 was not trained again
    for key in ("acc_matrix", "random_init_acc", "lca_curve"):
        assert np.array_equal(full[key], resumed[key]), key
    for name in full["train_metrics"]:
        assert np.array_equal(full["train_metrics"][name], resumed["train_metrics"][name])
    for a, b in zip(jax.tree.leaves(carries[2]), jax.tree.leaves(final[2]), strict=True):
        assert np.array_equal(a, b)  # params, memory, keys, step counter
    assert full["avg_accuracy"] == resumed["avg_accuracy"] and full["bwt"] == resumed["bwt"]

    with pytest.raises(ValueError, match="last finished task"):
        run(learner, stream, jax.random.PRNGKey(3), resume_from=(3, carries[2]), **kwargs)
    with pytest.raises(ValueError, match="carry's structure"):  # a carry of another learner
        run(finetune(LOSS, optax.sgd(0.1)), stream, jax.random.PRNGKey(3),
            resume_from=(0, carries[0]), **kwargs)


def test_killed_run_resumes_at_the_next_task_bit_for_bit(fake_data, baseline, tmp_path,
                                                         capsys):
    base = baseline
    out = tmp_path / "run"
    proc = _start(fake_data, out, sleep=0.5)
    _wait_for_lines(proc, out / "tasks.jsonl", 2)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert (out / ".metajax.lock").exists()  # the dead run's lock is left behind
    lines = (out / "tasks.jsonl").read_text().splitlines()
    assert 2 <= len(lines) < TASKS and not (out / "metrics.json").exists()

    # Without --resume the partial run is refused; another configuration is named.
    assert main(["continual", PRESET, "--out", str(out), *SMALL]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "stale lock" in err[0]  # the killed run's lock, taken over
    assert "already holds a run of this configuration" in err[1] and "--resume" in err[1]
    assert main(["continual", PRESET, "--out", str(out), *SMALL, "--set", "lr=0.05"]) == 2
    err = capsys.readouterr().err
    assert "holds a different run" in err and "lr: 0.03 -> 0.05" in err

    assert main(["continual", PRESET, "--out", str(out), *SMALL, "--resume"]) == 0
    captured = capsys.readouterr()
    assert "resuming" in captured.err
    summary = json.loads(captured.out.strip().splitlines()[-1])
    assert summary["resumed_after"] >= 1
    _assert_same_run(base, out)
    assert json.loads((out / "run.json").read_text())["kind"] == "continual"


def test_sigint_saves_the_task_exits_130_and_resume_completes(fake_data, baseline, tmp_path,
                                                              capsys):
    base = baseline
    out = tmp_path / "run"
    proc = _start(fake_data, out, sleep=0.5)
    _wait_for_lines(proc, out / "tasks.jsonl", 1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "SIGINT" in err and "--resume" in err
    assert not (out / ".metajax.lock").exists()  # released on the way out
    done = [json.loads(x)["task"] for x in (out / "tasks.jsonl").read_text().splitlines()]
    assert done == list(range(len(done))) and 1 <= len(done) < TASKS
    steps = sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())
    assert steps[-1] == done[-1]  # the line of a task is written after its checkpoint
    assert (out / "acc_matrix.png").stat().st_size > 0  # the tasks done so far, drawn

    assert main(["continual", PRESET, "--out", str(out), *SMALL, "--resume"]) == 0
    capsys.readouterr()
    _assert_same_run(base, out)
    assert json.loads((out / "metrics.json").read_text())["summary"]["avg_accuracy"] == \
        json.loads((base / "metrics.json").read_text())["summary"]["avg_accuracy"]


def test_finished_run_is_refused_without_resume_and_reprinted_with_it(baseline, tmp_path,
                                                                     capsys):
    base = baseline
    out = tmp_path / "run"
    shutil.copytree(base, out)
    capsys.readouterr()
    assert main(["continual", PRESET, "--out", str(out), *SMALL]) == 2
    err = capsys.readouterr().err
    assert "already holds a run of this configuration" in err and "--resume" in err
    assert main(["continual", PRESET, "--out", str(out), *SMALL, "--resume"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    first = json.loads((base / "metrics.json").read_text())["summary"]
    assert summary["avg_accuracy"] == first["avg_accuracy"] and summary["bwt"] == first["bwt"]
    assert summary["resumed_after"] == TASKS - 1
    assert len((out / "tasks.jsonl").read_text().splitlines()) == TASKS


def _no_nan_anywhere(run_dir: Path) -> None:
    def refuse(name):
        raise AssertionError(f"bare {name} in a file")

    for path in run_dir.rglob("*"):
        if path.is_file() and path.suffix in (".json", ".jsonl"):
            text = path.read_text()
            assert "NaN" not in text and "Infinity" not in text and '"nan"' not in text, path
            for line in (text.splitlines() if path.suffix == ".jsonl" else [text]):
                json.loads(line, parse_constant=refuse)


def test_nonfinite_learning_rate_exits_2_naming_the_task(fake_data, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["continual", PRESET, "--out", str(out), *SMALL, "--set", "lr=1e30"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert [line for line in err if "error" in line] == err[-1:]  # one line, the last
    assert err[-1].startswith("metajax: error: task 0 of 4") and "non-finite" in err[-1]
    assert "params" in err[-1] and "lower the learning rate" in err[-1]
    assert not out.exists() or not any(out.iterdir())  # nothing of a run that never was


def test_nonfinite_task_mid_stream_keeps_the_earlier_tasks_and_writes_no_nan(tmp_path):
    stream = conflicting_stream(num_tasks=3, n_train=20, n_test=20)
    poisoned = stream._replace(train_x=stream.train_x.copy())
    poisoned.train_x[1] = np.sign(poisoned.train_x[1]) * np.float32(3e38)  # overflows layer 1
    out = tmp_path / "run"
    with pytest.raises(NonFiniteTask, match="task 1 of 3") as info:
        train_continual(finetune(LOSS, optax.sgd(0.1)), poisoned, mlp_init(3), apply_fn, out,
                        batch_size=5, epochs=1, lca_batches=0, progress=False)
    assert info.value.task == 1 and "up to task 0 are kept" in str(info.value)
    assert [json.loads(x)["task"] for x in (out / "tasks.jsonl").read_text().splitlines()] \
        == [0]
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.isdigit()) == ["0"]
    assert not (out / "metrics.json").exists()
    _no_nan_anywhere(out)

    # The checkpoint is not resumed by another configuration, whose config.json is not kept.
    with pytest.raises(ConfigError, match="checkpoint of another configuration"):
        train_continual(finetune(LOSS, optax.sgd(0.1)), poisoned, mlp_init(3), apply_fn, out,
                        batch_size=5, epochs=1, lca_batches=0, progress=False, resume=True,
                        config_json='{"lr": 0.01}\n', fingerprint="another")
    assert (out / "config.json").read_text() == "{}"


def test_train_and_continual_run_directories_refuse_each_other(baseline, tmp_path, capsys):
    base = baseline
    continual_dir = tmp_path / "continual"
    shutil.copytree(base, continual_dir)
    capsys.readouterr()
    assert main(["train", "sinusoid-maml", "--out", str(continual_dir), "--steps", "2",
                 "--no-progress"]) == 2
    assert "holds a `metajax continual` run" in capsys.readouterr().err

    train_dir = tmp_path / "train"
    train_dir.mkdir()
    write_run_record(train_dir, "train", "0123456789abcdef")
    (train_dir / "metrics.jsonl").write_text('{"step": 10, "meta_loss": 1.0}\n')
    assert main(["continual", PRESET, "--out", str(train_dir), *SMALL]) == 2
    assert "holds a `metajax train` run" in capsys.readouterr().err
    legacy = tmp_path / "legacy"  # a train run written before run.json existed
    legacy.mkdir()
    (legacy / "meta_params.msgpack").write_bytes(b"\x80")
    assert main(["continual", PRESET, "--out", str(legacy), *SMALL, "--resume"]) == 2
    assert "holds a `metajax train` run" in capsys.readouterr().err
    assert sorted(p.name for p in legacy.iterdir()) == ["meta_params.msgpack"]
