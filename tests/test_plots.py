"""The plots of a run directory (:mod:`metajax.plots`): written at the end of a
meta-training and a continual run and again by ``plot_run``, of their documented pixel
sizes, with missing values marked; a failing plot never fails a run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import optax
import pytest
from PIL import Image
from test_cl_run import LOSS, apply_fn, conflicting_stream, mlp_init
from test_run_logs import tiny_train

from metajax import plots
from metajax.continual.learners import finetune
from metajax.train.continual import train_continual
from metajax.train.rundir import RunDirError, write_run_record

CURVES = (1200, 800)
HEATMAP = (900, 750)
TASK_CURVES = (1000, 650)
RED = (214, 39, 40)  # the marker of a missing (non-finite) point
GREY = (217, 217, 217)  # a heatmap cell of a task not trained yet


def pixels(path: Path, size: tuple[int, int]) -> np.ndarray:
    """The RGB pixels of the PNG at ``path``, checked to be of ``size`` and not one colour."""
    image = Image.open(path)
    assert image.format == "PNG" and image.size == size, (path, image.size)
    rgb = np.asarray(image.convert("RGB")).astype(int)
    assert len(np.unique(rgb.reshape(-1, 3), axis=0)) > 20, f"{path}: nearly one colour"
    return rgb


def has_colour(rgb: np.ndarray, colour, tol: int = 6, count: int = 20) -> bool:
    return int((np.abs(rgb - np.array(colour)).max(axis=-1) <= tol).sum()) >= count


def test_a_training_run_plots_its_curves_and_plot_run_redraws_them(tmp_path):
    run_dir = tmp_path / "run"
    tiny_train(run_dir)
    path = run_dir / plots.CURVES_FILE
    first = pixels(path, CURVES)
    assert not has_colour(first, RED)  # nothing non-finite to mark
    path.unlink()
    assert plots.plot_run(run_dir) == [path]
    np.testing.assert_array_equal(pixels(path, CURVES), first)  # drawn from the files alone


def test_curves_of_a_written_run_mark_non_finite_values(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.json").write_text(json.dumps(
        {"preset": "p", "algorithm": "maml", "dataset": "sinusoid", "steps": 40}))
    lines = [{"step": 10, "meta_loss": 3.0, "wall_s": 5.0},
             {"step": 20, "meta_loss": None, "meta_loss_nonfinite": "nan", "wall_s": 6.0},
             {"step": 20, "val_mse": 2.0},  # an older run: no wall_s on validation lines
             {"step": 30, "meta_loss": 1.0, "wall_s": 7.0}]
    (run_dir / "metrics.jsonl").write_text(
        "".join(json.dumps(x) + "\n" for x in lines) + '{"step": 40, "meta_lo')  # torn line
    assert plots.plot_run(run_dir) == [run_dir / plots.CURVES_FILE]
    assert has_colour(pixels(run_dir / plots.CURVES_FILE, CURVES), RED)


def test_a_continual_run_plots_its_matrix_and_task_curves(tmp_path):
    stream = conflicting_stream(num_tasks=3, n_train=20, n_test=20)
    run_dir = tmp_path / "run"
    train_continual(finetune(LOSS, optax.sgd(0.1)), stream, mlp_init(3), apply_fn, run_dir,
                    batch_size=5, epochs=1, lca_batches=0, seeds=2, progress=False,
                    labels={"preset": "toy", "learner": "finetune"})
    heat = pixels(run_dir / plots.HEATMAP_FILE, HEATMAP)
    pixels(run_dir / plots.TASK_CURVES_FILE, TASK_CURVES)
    assert not has_colour(heat, GREY, tol=1, count=2000)  # every task trained
    for name in (plots.HEATMAP_FILE, plots.TASK_CURVES_FILE):
        (run_dir / name).unlink()
    assert plots.plot_run(run_dir) == [run_dir / plots.HEATMAP_FILE,
                                       run_dir / plots.TASK_CURVES_FILE]
    np.testing.assert_array_equal(pixels(run_dir / plots.HEATMAP_FILE, HEATMAP), heat)


def _write_continual(run_dir: Path, rows: list, config: dict) -> None:
    run_dir.mkdir()
    write_run_record(run_dir, "continual", "0123456789abcdef")
    (run_dir / "config.json").write_text(json.dumps(config))
    (run_dir / "tasks.jsonl").write_text("".join(
        json.dumps({"task": t, "acc": row, "mean_acc_so_far": 0.5, "wall_s": 1.0}) + "\n"
        for t, row in enumerate(rows)))


def test_an_unfinished_continual_run_plots_the_tasks_it_finished(tmp_path):
    run_dir = tmp_path / "run"
    rows = [[[0.9, 0.1, 0.2], [0.8, 0.2, 0.1]],  # two seeds, tasks 0 and 1 of 3 finished
            [[0.5, 0.9, 0.3], [0.6, 0.8, None]]]
    _write_continual(run_dir, rows, {"preset": "p", "learner": "er", "seeds": 2})
    heat_path, curves_path = plots.plot_run(run_dir)
    heat = pixels(heat_path, HEATMAP)
    assert has_colour(heat, GREY, tol=1, count=2000)  # the row of task 2: not trained yet
    pixels(curves_path, TASK_CURVES)


def test_a_sweep_plots_one_matrix_per_setting(tmp_path):
    run_dir = tmp_path / "run"
    rows = [[[0.9, 0.1], [0.8, 0.2], [0.5, 0.5], [0.4, 0.6]],  # 2 settings x 2 seeds
            [[0.7, 0.9], [0.6, 0.8], [0.5, 0.6], [0.4, 0.7]]]
    _write_continual(run_dir, rows, {"preset": "p", "learner": "er", "seeds": 2,
                                     "sweep": "lr=0.1,0.01"})
    (run_dir / "acc_matrix.json").write_text(json.dumps(
        {"acc_matrix": np.array(rows).transpose(1, 0, 2).tolist()}))
    (run_dir / "metrics.json").write_text(json.dumps({"summary": {
        "seeds": 2, "preset": "p", "learner": "er",
        "sweep": [{"setting": {"lr": 0.1}}, {"setting": {"lr": 0.01}}]}}))
    heat_path, curves_path = plots.plot_run(run_dir)
    # Two panels side by side: 3.6 in each, 1.4 in for the colour bar, 5 in high.
    pixels(heat_path, (860, 500))
    pixels(curves_path, TASK_CURVES)


def test_heatmap_colours_follow_the_values():
    R = np.array([[1.0, 0.0], [0.5, 1.0]])
    fig = plots.acc_matrix_figure(R, title="t")
    fig.canvas.draw()
    rgb = np.asarray(fig.canvas.buffer_rgba())[..., :3].astype(int)
    ax = fig.axes[0]

    def cell(i, j):  # a corner of cell (i, j), away from its printed value
        x, y = ax.transData.transform((j - 0.4, i - 0.4))
        return rgb[int(round(rgb.shape[0] - y)), int(round(x))]

    high, low, middle = cell(0, 0), cell(0, 1), cell(1, 0)
    assert high[1] > 200 and high[2] < 100  # yellow
    assert low[0] < 100 and low[1] < 20 and low[2] > 60  # dark purple
    assert 120 < middle[1] < 170 and middle[2] > 120 and middle[0] < 60  # teal
    np.testing.assert_array_equal(cell(1, 1), high)


def test_plot_run_names_what_is_not_a_run(tmp_path):
    with pytest.raises(RunDirError, match="no such run directory"):
        plots.plot_run(tmp_path / "missing")
    with pytest.raises(RunDirError, match="not a metajax run directory"):
        plots.plot_run(tmp_path)
    (tmp_path / "tasks.jsonl").write_text("")
    with pytest.raises(RunDirError, match="no finished task"):
        plots.plot_run(tmp_path)


def _broken_plot(run_dir):
    raise RuntimeError("no display")


def test_a_failing_plot_only_warns_and_the_runs_complete(tmp_path, monkeypatch):
    monkeypatch.setattr(plots, "plot_run", _broken_plot)
    with pytest.warns(RuntimeWarning, match="plots of .* were not written .*no display"):
        summary = tiny_train(tmp_path / "train", None)
    assert summary["step"] == 8
    assert (tmp_path / "train" / "meta_params.msgpack").is_file()
    assert not (tmp_path / "train" / plots.CURVES_FILE).exists()

    stream = conflicting_stream(num_tasks=2, n_train=10, n_test=10)
    with pytest.warns(RuntimeWarning, match="metajax plot"):
        result = train_continual(finetune(LOSS, optax.sgd(0.1)), stream, mlp_init(2),
                                 apply_fn, tmp_path / "cl", batch_size=5, epochs=1,
                                 lca_batches=0, progress=False)
    assert result["tasks"] == 2
    assert (tmp_path / "cl" / "metrics.json").is_file()
    assert (tmp_path / "cl" / "acc_matrix.json").is_file()
    assert not (tmp_path / "cl" / plots.HEATMAP_FILE).exists()


def test_the_memory_benchmark_plot_marks_missing_points(tmp_path, monkeypatch):
    import importlib.util

    benchmarks = Path(__file__).resolve().parents[1] / "benchmarks"
    monkeypatch.syspath_prepend(str(benchmarks))  # its `from _results import ...`
    spec = importlib.util.spec_from_file_location("memory_benchmark",
                                                  benchmarks / "memory.py")
    memory = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(memory)
    records = [json.loads(line) for line in
               (benchmarks / "results" / "memory.jsonl").read_text().splitlines()]
    assert any(not r["ran"] for r in records)  # a step only analysed: its RSS is missing
    memory.plot(records, str(tmp_path / "stored.png"))
    assert not has_colour(pixels(tmp_path / "stored.png", (1300, 560)), RED, tol=10)
    failed = {"method": "imaml", "inner_steps": 25, "ran": False, "failed": "exit status -9",
              "tasks": 32, "ways": 5, "shots": 1}
    kept = [r for r in records if (r["method"], r["inner_steps"]) != ("imaml", 25)]
    memory.plot([*kept, failed], str(tmp_path / "failed.png"))
    assert has_colour(pixels(tmp_path / "failed.png", (1300, 560)), RED, tol=10)
