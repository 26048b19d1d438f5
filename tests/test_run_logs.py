"""What a run logs besides metrics.jsonl: TensorBoard event files (read back from their
TFRecord framing and compared with the run's own files, a resumed run included) and the
progress bar (its ETA leaves out the compiling first chunk and follows the time budget; it
writes nothing off a terminal)."""

from __future__ import annotations

import dataclasses
import io
import json
import math
import shutil
import struct
import sys
from pathlib import Path

import numpy as np
import optax
import pytest
from test_cl_run import LOSS, apply_fn, conflicting_stream, mlp_init

from metajax.continual.learners import finetune
from metajax.presets import get_preset
from metajax.presets.build import build_learner, build_optimizer, build_problem
from metajax.train.config import ConfigError
from metajax.train.continual import train_continual
from metajax.train.logging import (
    TENSORBOARD_DIR,
    Eta,
    ProgressBar,
    TensorBoardLog,
    estimate_eta,
    read_jsonl,
    require_tensorboard,
)
from metajax.train.loop import train


def tiny_config(**changes):
    """A sinusoid MAML run of 8 meta-steps in chunks of 2, validated every 4: seconds."""
    fields = dict(steps=8, log_every=2, eval_every=4, eval_tasks=4, meta_batch_size=2,
                  inner_steps=1, checkpoint_every=4)
    fields.update(changes)
    return dataclasses.replace(get_preset("sinusoid-maml"), **fields).validate()


def tiny_train(run_dir, config=None, **kwargs):
    config = config or tiny_config()
    problem = build_problem(config)
    kwargs.setdefault("progress", False)
    return train(config, problem, build_learner(config, problem), build_optimizer(config),
                 run_dir, **kwargs)


# ------------------------------------------------------------------ reading event files


def masked_crc32c(data: bytes) -> int:
    """TFRecord's checksum: CRC-32C, rotated right by 15 bits, plus 0xa282ead8."""
    from tensorboardX.crc32c import crc32c

    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _frames(path: Path):
    """The records of one TFRecord file (8-byte length, its CRC, the data, its CRC), both
    checksums checked."""
    data = path.read_bytes()
    at = 0
    while at < len(data):
        header = data[at:at + 8]
        (length,) = struct.unpack("<Q", header)
        (header_crc,) = struct.unpack("<I", data[at + 8:at + 12])
        assert header_crc == masked_crc32c(header), f"{path}: bad length CRC at {at}"
        payload = data[at + 12:at + 12 + length]
        (payload_crc,) = struct.unpack("<I", data[at + 12 + length:at + 16 + length])
        assert payload_crc == masked_crc32c(payload), f"{path}: bad data CRC at {at}"
        yield payload
        at += 16 + length
    assert at == len(data)


def event_files(run_dir: Path) -> list[Path]:
    return sorted((run_dir / TENSORBOARD_DIR).glob("events.out.tfevents.*"))


def raw_scalars(path: Path) -> list[tuple[str, int, float]]:
    from tensorboardX.proto import event_pb2

    out = []
    for payload in _frames(path):
        event = event_pb2.Event()
        event.ParseFromString(payload)
        out.extend((v.tag, event.step, v.simple_value) for v in event.summary.value)
    return out


def tensorboard_scalars(run_dir: Path) -> dict[tuple[str, int], float]:
    """``{(tag, step): value}`` as TensorBoard shows them: files in the order they were
    written, a later value of a (tag, step) replacing an earlier one, and a SessionLog START
    at step P (a resumed run's first event) hiding every earlier event at step P or later."""
    from tensorboardX.proto import event_pb2

    shown: dict[tuple[str, int], float] = {}
    for path in event_files(run_dir):
        for payload in _frames(path):
            event = event_pb2.Event()
            event.ParseFromString(payload)
            if event.HasField("session_log") and \
                    event.session_log.status == event_pb2.SessionLog.START:
                shown = {key: v for key, v in shown.items() if key[1] < event.step}
            for value in event.summary.value:
                shown[(value.tag, event.step)] = value.simple_value
    return shown


def expected_from_metrics(run_dir: Path) -> dict[tuple[str, int], float]:
    """What metrics.jsonl says TensorBoard should hold: ``train/<key>`` for the chunk lines,
    ``val/<metric>`` for the validation lines (``null``, a non-finite value, as NaN)."""
    expected = {}
    for record in read_jsonl(run_dir / "metrics.jsonl"):
        for key, value in record.items():
            if key in ("step", "wall_s") or key.endswith("_nonfinite"):
                continue
            tag = f"val/{key[4:]}" if key.startswith("val_") else f"train/{key}"
            expected[(tag, record["step"])] = math.nan if value is None else value
    return expected


def assert_same_scalars(got: dict, expected: dict, abs_tol: float = 0.0) -> None:
    assert sorted(got) == sorted(expected)
    for key, want in expected.items():
        # Event files hold float32: compare at float32's precision (and the run files'
        # rounding, abs_tol, where they round).
        assert got[key] == pytest.approx(want, rel=2**-23, abs=abs_tol, nan_ok=True), key


# ------------------------------------------------------------------ TensorBoard


def test_tensorboard_of_training_matches_metrics_and_a_resume_appends(tmp_path, capsys):
    pytest.importorskip("tensorboardX", reason="the metajax[tensorboard] extra")
    run_dir = tmp_path / "run"
    summary = tiny_train(run_dir, tensorboard=True, progress=True)
    assert summary["step"] == 8
    # progress=True, but stderr is not a terminal: no bar at all.
    err = capsys.readouterr().err
    assert "ETA" not in err and "%|" not in err
    records = read_jsonl(run_dir / "metrics.jsonl")
    assert all("wall_s" in r for r in records)  # validation lines too
    walls = [r["wall_s"] for r in records]
    assert walls == sorted(walls) and walls[0] > 0
    expected = expected_from_metrics(run_dir)
    assert ("val/mse", 4) in expected and ("train/meta_loss", 8) in expected
    assert_same_scalars(tensorboard_scalars(run_dir), expected)
    first_file, = event_files(run_dir)

    # A run killed after logging steps 6 and 8 but before their checkpoint resumes from
    # step 4: metrics.jsonl is cut back, the event file of the new attempt is appended and
    # hides what the first attempt logged after step 4.
    shutil.rmtree(run_dir / "checkpoints" / "8")
    resumed = tiny_train(run_dir, tensorboard=True, resume=True)
    assert resumed["resumed_from"] == 4 and resumed["step"] == 8
    files = event_files(run_dir)
    assert len(files) == 2 and files[0] == first_file
    assert {(t, s) for t, s, _ in raw_scalars(files[0])} >= {("train/meta_loss", 6)}
    assert {s for _, s, _ in raw_scalars(files[1])} == {6, 8}
    assert_same_scalars(tensorboard_scalars(run_dir), expected_from_metrics(run_dir))

    # The log of a new run (no purge step) starts the event files afresh.
    board = TensorBoardLog(run_dir)
    board.scalars(1, {"x": 1.5, "skipped": None, "name": "text"}, prefix="train/")
    board.close()
    assert len(event_files(run_dir)) == 1
    assert tensorboard_scalars(run_dir) == {("train/x", 1): 1.5}


CONTINUAL = dict(batch_size=5, epochs=1, lca_batches=0, progress=False, tensorboard=True)


def _expected_continual(run_dir: Path) -> dict[tuple[str, int], float]:
    expected = {}
    for record in read_jsonl(run_dir / "tasks.jsonl"):
        t = record["task"]
        mean = np.mean(np.array(record["acc"], np.float64).reshape(-1, 3), axis=0)
        for j, value in enumerate(mean):
            expected[(f"accuracy/task_{j}", t)] = value
        expected[("accuracy/mean_so_far", t)] = record["mean_acc_so_far"]
    summary = json.loads((run_dir / "metrics.json").read_text())["summary"]
    for key in ("avg_accuracy", "forgetting", "bwt", "fwt", "lca"):
        if summary.get(key) is not None:  # lca: None without lca_batches
            expected[(f"summary/{key}", 3)] = summary[key]
    assert ("summary/avg_accuracy", 3) in expected
    return expected


def test_tensorboard_of_a_continual_run_matches_its_files_and_a_resume_appends(tmp_path):
    pytest.importorskip("tensorboardX", reason="the metajax[tensorboard] extra")
    stream = conflicting_stream(num_tasks=3, n_train=20, n_test=20)
    run_dir = tmp_path / "run"
    train_continual(finetune(LOSS, optax.sgd(0.1)), stream, mlp_init(3), apply_fn, run_dir,
                    seeds=2, **CONTINUAL)
    # The run files round to 6 decimals: the tolerance of that rounding.
    assert_same_scalars(tensorboard_scalars(run_dir), _expected_continual(run_dir), 1e-6)

    shutil.rmtree(run_dir / "checkpoints" / "2")  # killed before the last task's checkpoint
    train_continual(finetune(LOSS, optax.sgd(0.1)), stream, mlp_init(3), apply_fn, run_dir,
                    seeds=2, resume=True, **CONTINUAL)
    files = event_files(run_dir)
    assert len(files) == 2
    assert {s for _, s, _ in raw_scalars(files[1])} == {2, 3}  # task 2 again, the summary
    assert_same_scalars(tensorboard_scalars(run_dir), _expected_continual(run_dir), 1e-6)


def test_missing_tensorboardx_is_a_clear_error_before_anything_is_written(tmp_path,
                                                                          monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # `import tensorboardX` fails
    with pytest.raises(ConfigError, match=r'pip install "metajax\[tensorboard\]"'):
        require_tensorboard()
    with pytest.raises(ConfigError, match="tensorboardX"):
        tiny_train(tmp_path / "run", tensorboard=True)
    assert not (tmp_path / "run").exists()
    stream = conflicting_stream(num_tasks=2, n_train=10, n_test=10)
    with pytest.raises(ConfigError, match="tensorboardX"):
        train_continual(finetune(LOSS, optax.sgd(0.1)), stream, mlp_init(2), apply_fn,
                        tmp_path / "cl", **CONTINUAL)
    assert not (tmp_path / "cl").exists()


# ------------------------------------------------------------------ the ETA


def test_eta_leaves_out_the_compiling_first_chunk():
    # 10 steps in the first chunk took 100 s (compilation); the next 10 took 1 s.
    eta = estimate_eta(20, 1000, 101.0, measured_from=(100.0, 10))
    assert eta.limit == "steps" and eta.seconds == pytest.approx(98.0)
    assert 980 * 101.0 / 20 > 40 * eta.seconds  # what counting the first chunk would say
    # Right after the first chunk the rate is not known yet.
    assert estimate_eta(10, 1000, 100.0, measured_from=(100.0, 10)) == Eta(None, "")
    assert estimate_eta(0, 1000, 5.0, measured_from=None) == Eta(None, "")
    assert estimate_eta(1000, 1000, 5.0, measured_from=None) == Eta(0.0, "steps")


def test_eta_follows_the_time_budget_when_it_ends_the_run_first():
    steps_left = estimate_eta(20, 1000, 101.0, measured_from=(100.0, 10), budget_left_s=500)
    assert steps_left == Eta(pytest.approx(98.0), "steps")
    budget = estimate_eta(20, 1000, 101.0, measured_from=(100.0, 10), budget_left_s=30.0)
    assert budget == Eta(30.0, "budget")
    # Before the rate is known the budget bounds the time; a spent budget is 0, not < 0.
    assert estimate_eta(10, 1000, 100.0, measured_from=(100.0, 10), budget_left_s=7.0) \
        == Eta(7.0, "budget")
    assert estimate_eta(20, 1000, 101.0, measured_from=(100.0, 10), budget_left_s=-3.0) \
        == Eta(0.0, "budget")


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_shows_the_eta_without_compilation_and_names_the_budget():
    clock = FakeClock()
    out = Terminal()
    with ProgressBar(100, file=out, clock=clock, budget_s=60.0, spent_s=10.0) as bar:
        clock.now = 40.0  # first chunk: compilation
        bar.update(10, meta_loss="1.2345")
        # No rate yet: the budget left (60 - 10 - 40 s) bounds the time.
        assert bar.status() == "ETA 00:10 (time budget), meta_loss=1.2345"
        clock.now = 41.0
        bar.update(10)
        # 80 steps left at 10 steps/s: 8 s; the budget has 60 - 10 - 41 = 9 s left.
        assert bar.eta() == Eta(pytest.approx(8.0), "steps")
        status = bar.status()
        assert "10.0 step/s" in status and "ETA 00:08" in status and "budget" not in status
        assert "meta_loss=1.2345" in status
        clock.now = 48.0  # no update since: 1.25 steps/s is 64 s; the budget has 2 s left
        assert bar.eta().limit == "budget" and "ETA 00:02 (time budget)" in bar.status()
    text = out.getvalue()
    assert "20/100" in text and "meta_loss=1.2345" in text

    clock.now = 0.0
    without_budget = ProgressBar(100, file=Terminal(), clock=clock, initial=30)
    clock.now = 200.0  # the first chunk of a resumed run: compilation again
    without_budget.update(10)
    assert without_budget.status() == "ETA: measuring"
    clock.now = 202.0
    without_budget.update(10)
    assert without_budget.eta() == Eta(pytest.approx(10.0), "steps")  # 50 left, 5 step/s
    clock.now = 220.0  # 10 steps in the 20 s since the first chunk; 50 left
    assert without_budget.status() == "2.0 s/step, ETA 01:40"
    without_budget.close()


def test_progress_bar_writes_nothing_off_a_terminal():
    out = io.StringIO()  # a log file, a pipe: not a terminal
    with ProgressBar(10, file=out) as bar:
        bar.update(5, meta_loss=0.5)
        bar.update(5)
    assert out.getvalue() == "" and not bar.enabled
    quiet = Terminal()
    with ProgressBar(10, file=quiet, enabled=False) as bar:
        bar.update(10)
    assert quiet.getvalue() == ""
