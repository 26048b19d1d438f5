"""Few-shot classification end to end: synthetic splits always, real Omniglot when present."""

import dataclasses
import json
import os

import jax
import numpy as np
import pytest

from metajax.cli import main
from metajax.nn.conv4 import conv4_omniglot
from metajax.presets import get_preset
from metajax.presets.build import build_learner, build_optimizer, classification_problem
from metajax.train.loop import BEST_PARAMS_FILE, evaluate_run, train


def synthetic_splits(classes=12, per_class=8, seed=0):
    """uint8 images ``[classes, per_class, 28, 28, 1]``: a fixed random pattern per class plus
    noise, so a classifier can tell the classes apart only by learning from the support set."""
    rng = np.random.default_rng(seed)
    splits = {}
    for name in ("train", "val", "test"):
        patterns = rng.uniform(0, 255, (classes, 1, 28, 28, 1))
        noise = rng.normal(0, 40, (classes, per_class, 28, 28, 1))
        splits[name] = np.clip(patterns + noise, 0, 255).astype(np.uint8)
    return splits


def small_config(**changes):
    config = dataclasses.replace(
        get_preset("omniglot-5w1s-maml"), meta_batch_size=4, steps=40, log_every=10,
        eval_every=20, eval_tasks=10, eval_queries=3,
    )
    return dataclasses.replace(config, **changes).validate()


def test_synthetic_classification_trains_and_evaluates(tmp_path):
    config = small_config()
    problem = classification_problem(config, synthetic_splits(), conv4_omniglot(5, filters=8))
    learner = build_learner(config, problem)
    summary = train(config, problem, learner, build_optimizer(config), tmp_path, progress=False)
    assert summary["step"] == 40 and not summary["stopped_by_time_budget"]
    assert 0.0 <= summary["val_accuracy"] <= 1.0
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "val_accuracy" in x] == [20, 40]
    assert all("query_accuracy" in x for x in lines if "meta_loss" in x)
    assert (tmp_path / BEST_PARAMS_FILE).is_file()

    meta_params = learner.init(problem.init_params(jax.random.PRNGKey(config.seed)))
    result = evaluate_run(meta_params, learner, problem, tasks=30, shots=1, queries=3,
                          steps=[0, 3])
    assert result["metric"] == "accuracy" and result["inner_steps"] == 3
    assert result["mean"] == result["by_steps"]["3"]["mean"]
    # Adapting on one example per class of these well-separated classes beats chance by far.
    assert result["by_steps"]["3"]["mean"] > 0.6
    assert result["by_steps"]["0"]["mean"] < 0.45


def test_time_budget_stops_after_a_chunk(tmp_path):
    config = small_config(steps=1000, time_budget_s=1e-6, eval_every=0)
    # The network of the test above: its compiled chunk comes from the persistent cache.
    problem = classification_problem(config, synthetic_splits(), conv4_omniglot(5, filters=8))
    summary = train(config, problem, build_learner(config, problem), build_optimizer(config),
                    tmp_path, progress=False)
    assert summary["step"] == 10 and summary["stopped_by_time_budget"]


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"ways": 13}, "train split"),
        ({"shots": 5, "queries": 4}, "train split"),
        ({"eval_queries": 8}, "train split"),
    ],
)
def test_impossible_episodes_are_refused_before_compiling(changes, message):
    config = small_config(**changes)
    with pytest.raises(ValueError, match=message):
        classification_problem(config, synthetic_splits(), conv4_omniglot(config.ways))


DATA_DIR = os.environ.get("METAJAX_DATA_DIR")


@pytest.mark.skipif(not DATA_DIR, reason="METAJAX_DATA_DIR is not set (e.g. ../shared/data)")
def test_real_omniglot_short_run_beats_chance_widely(tmp_path, capsys):
    run_dir = tmp_path / "run"
    status = main([
        "train", "omniglot-5w1s-maml", "--steps", "150", "--out", str(run_dir), "--no-progress",
        "--data-dir", DATA_DIR, "--set", "meta_batch_size=8", "--set", "log_every=50",
        "--set", "eval_every=0", "--set", "eval_tasks=50",
    ])
    assert status == 0
    status = main(["evaluate", str(run_dir), "--tasks", "100"])
    assert status == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["metric"] == "accuracy" and result["tasks"] == 100
    assert result["params"] == BEST_PARAMS_FILE and result["inner_steps"] == 3
    # Chance is 0.2; 150 small meta-steps reach about 0.6 (measured 0.63 +/- 0.02).
    assert result["mean"] > 0.45


@pytest.mark.skipif(not DATA_DIR, reason="METAJAX_DATA_DIR is not set (e.g. ../shared/data)")
def test_real_omniglot_too_many_ways_is_a_clear_error(capsys):
    status = main(["train", "omniglot-5w1s-maml", "--data-dir", DATA_DIR, "--set", "ways=5000"])
    assert status == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("metajax: error: omniglot train split:")
    assert "5000" in err[-1]
