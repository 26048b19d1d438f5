"""`metajax continual`: presets, the run directory, the JSON summary, bad input, the A-GEM
protocol's held-out tasks, and (with real MNIST) replay beating fine-tuning."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import jax
import numpy as np
import pytest
from fixtures_omniglot import closed_port_url
from PIL import Image
from test_mnist import idx_bytes, spec

from metajax.cli import main
from metajax.data import mnist
from metajax.presets.build_continual import (
    build_continual_learner,
    build_continual_model,
    build_stream,
    run_experiment,
)
from metajax.presets.continual import CONTINUAL_PRESETS, ContinualConfig, get_continual_preset
from metajax.train.config import ConfigError
from metajax.types import Stream

SMALL = ["--set", "tasks=3", "--set", "train_per_task=20", "--set", "test_per_task=10",
         "--set", "lca_batches=2", "--no-progress"]


@pytest.fixture
def fake_mnist(tmp_path, monkeypatch):
    """A data dir whose mnist/ holds generated idx files (6,000 training images, enough for
    A-GEM's 5,000-image validation split), with mnist.FILES patched to their checksums."""
    rng = np.random.default_rng(0)
    arrays = {
        "train_images": rng.integers(0, 256, (6000, 28, 28), dtype=np.uint8),
        "train_labels": (np.arange(6000) % 10).astype(np.uint8),
        "test_images": rng.integers(0, 256, (40, 28, 28), dtype=np.uint8),
        "test_labels": (np.arange(40) % 10).astype(np.uint8),
    }
    folder = tmp_path / "data" / "mnist"
    folder.mkdir(parents=True)
    for key, array in arrays.items():
        data = idx_bytes(array)
        monkeypatch.setitem(mnist.FILES, key, spec(key, data, array.shape))
        (folder / mnist.FILES[key].filename).write_bytes(data)
    monkeypatch.setenv("METAJAX_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("METAJAX_MNIST_URL", closed_port_url())
    return tmp_path / "data"


def tiny_stream(num_tasks=4, classes=10, mask=False) -> Stream:
    x = np.zeros((num_tasks, 20, 784), np.float32)
    y = np.zeros((num_tasks, 20), np.int32)
    class_mask = np.ones((num_tasks, classes), bool) if mask else None
    return Stream(x, y, x[:, :10], y[:, :10], classes, class_mask)


def test_every_preset_is_valid_and_builds_its_learner():
    assert len(CONTINUAL_PRESETS) >= 3 * 8 + 2
    for name in CONTINUAL_PRESETS:
        config = get_continual_preset(name).validate()
        assert config.preset == name
        stream = tiny_stream(mask=config.benchmark == "split_omniglot")
        _, apply_fn = build_continual_model(config, stream)
        learner = build_continual_learner(config, stream, apply_fn)
        assert callable(learner.init) and callable(learner.update)


def test_lamaml_presets_follow_the_authors_scripts():
    rot = get_continual_preset("rot-mnist-lamaml")
    assert (rot.alpha_init, rot.lr_eta, rot.glances, rot.memory) == (0.15, 0.3, 5, 200)
    many = get_continual_preset("many-mnist-sync")
    assert (many.alpha_init, many.lr_eta, many.outer_lr, many.glances) == (0.03, 0.1, 0.03, 10)
    assert get_continual_preset("many-mnist-er").memory == 500
    agem = get_continual_preset("agem-pmnist-agem")
    assert (agem.lr, agem.hidden, agem.memory_per_task, agem.ref_batch) == (0.1, 256, 250, 256)
    # fc_permute_mnist.py: 25 per class of each task's 250, reference batch without replacement
    assert (agem.memory_layout, agem.ref_sampling) == ("per_class", "without_replacement")
    learner = build_continual_learner(agem, tiny_stream(), build_continual_model(
        agem, tiny_stream())[1])
    example = (np.zeros(784, np.float32), np.int32(0))
    state = learner.init(build_continual_model(agem, tiny_stream())[0](jax.random.PRNGKey(0)),
                         jax.random.PRNGKey(1), example, 4)
    assert state.memory.count.shape == (4, 10) and state.memory.y.shape == (4, 250)


def test_mer_presets_follow_the_authors_mer_examples():
    # mer_examples.sh, MER (Algorithm 1) at the same memory sizes: ROT 200, PERM 200, MANY 500.
    expected = {
        "rot": (200, 0.1, 0.01, 1.0, 10, 5),
        "perm": (200, 0.03, 0.03, 1.0, 10, 10),
        "many": (500, 0.03, 0.03, 1.0, 5, 10),
    }
    for short, values in expected.items():
        c = get_continual_preset(f"{short}-mnist-mer")
        assert (c.memory, c.lr, c.beta, c.gamma, c.replay_batch, c.batches_per_example) == \
            values, short
        note = CONTINUAL_PRESETS[f"{short}-mnist-mer"][1]
        assert f"s={values[5]}" in note and f"beta {values[2]:g}" in note
        assert "mer_examples.sh" in note
    omniglot = get_continual_preset("split-omniglot-mer")
    assert (omniglot.lr, omniglot.beta, omniglot.batches_per_example) == (0.1, 0.01, 5)


def test_gem_presets_take_the_reference_ridge():
    for name, (config, note) in CONTINUAL_PRESETS.items():
        if config.learner == "gem":
            assert config.ridge == 1e-3 and "ridge 0.001" in note, name


def test_per_class_agem_memory_must_split_over_the_classes():
    config = get_continual_preset("many-mnist-agem").with_overrides(["memory_layout=per_class"])
    stream = tiny_stream(num_tasks=100)  # 500 // 100 = 5 slots per task, 10 classes
    with pytest.raises(ConfigError, match="multiple of the stream's 10 classes"):
        build_continual_learner(config, stream, build_continual_model(config, stream)[1])
    with pytest.raises(ConfigError, match="memory_layout must be one of"):
        config.with_overrides(["memory_layout=ring"]).validate()
    with pytest.raises(ConfigError, match="ref_sampling must be one of"):
        config.with_overrides(["ref_sampling=some"]).validate()


def test_unknown_preset_and_bad_fields():
    with pytest.raises(ConfigError, match="valid presets"):
        get_continual_preset("nope")
    config = get_continual_preset("perm-mnist-er")
    with pytest.raises(ConfigError, match="learner must be one of"):
        config.with_overrides(["learner=ewc"]).validate()
    with pytest.raises(ConfigError, match="lr must be > 0"):
        config.with_overrides(["lr=0"]).validate()
    with pytest.raises(ConfigError, match="expected int"):
        config.with_overrides(["tasks=two"])
    with pytest.raises(ConfigError, match="conv4 needs image inputs"):
        config.with_overrides(["model=conv4"]).validate()


def test_cli_run_directory_and_summary(fake_mnist, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["continual", "perm-mnist-er", "--out", str(out), "--seeds", "2", *SMALL]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("avg_accuracy", "forgetting", "bwt", "lca", "fwt", "acc_matrix", "std"):
        assert key in summary, key
    R = np.array(summary["acc_matrix"])
    assert R.shape == (3, 3) and summary["tasks"] == 3 and summary["seeds"] == 2
    assert summary["avg_accuracy"] == pytest.approx(R[-1].mean(), abs=1e-5)
    assert summary["bwt"] == pytest.approx(np.mean(R[-1, :2] - np.diag(R)[:2]), abs=1e-5)

    saved = json.loads((out / "acc_matrix.json").read_text())
    per_seed = np.array(saved["acc_matrix"])
    assert per_seed.shape == (2, 3, 3)
    np.testing.assert_allclose(per_seed.mean(axis=0), R, atol=1e-5)
    rows = [json.loads(line) for line in (out / "tasks.jsonl").read_text().splitlines()]
    assert [r["task"] for r in rows] == [0, 1, 2]
    np.testing.assert_allclose(np.array([r["acc"] for r in rows]).transpose(1, 0, 2), per_seed,
                               atol=1e-5)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["summary"]["avg_accuracy"] == summary["avg_accuracy"]
    assert len(metrics["per_seed"]) == 2
    config = json.loads((out / "config.json").read_text())
    assert config["tasks"] == 3 and config["seeds"] == 2 and config["learner"] == "er"
    image = Image.open(out / "acc_matrix.png")
    assert image.format == "PNG" and min(image.size) > 60

    # A finished run is never overwritten: the same configuration is pointed to --resume,
    # another one is told what differs.
    assert main(["continual", "perm-mnist-er", "--out", str(out), "--seeds", "2", *SMALL]) == 2
    err = capsys.readouterr().err
    assert "already holds a run of this configuration" in err and "--resume" in err
    assert main(["continual", "perm-mnist-er", "--out", str(out), *SMALL]) == 2
    assert "holds a different run (seeds: 2 -> 1)" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["continual", "nope"], "unknown continual preset"),
        (["continual", "perm-mnist-er", "--set", "bogus=1"], "unknown --set key"),
        (["continual", "perm-mnist-er", "--set", "learner=ewc"], "learner must be one of"),
        (["continual", "perm-mnist-er", "--set", "cv_tasks=3", "--set", "tasks=3", "--set",
          "test_per_task=10"], "leaves none"),
        (["continual", "perm-mnist-er", "--set", "test_per_task=10000"],
         "only 40 are available"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(fake_mnist, tmp_path, capsys, argv, message):
    assert main([*argv, "--out", str(tmp_path / "r"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err


def test_cli_out_is_a_file(fake_mnist, tmp_path, capsys):
    target = tmp_path / "file"
    target.write_text("x")
    assert main(["continual", "perm-mnist-er", "--out", str(target), *SMALL]) == 2
    assert "not a directory" in capsys.readouterr().err


def test_agem_protocol_holds_out_its_first_three_tasks(fake_mnist):
    config = get_continual_preset("agem-pmnist-agem").with_overrides(
        ["tasks=5", "test_per_task=40"])
    stream = build_stream(config, progress=False)
    full = build_stream(dataclasses.replace(config, cv_tasks=0), progress=False)
    assert stream.num_tasks == 2 and full.num_tasks == 5
    assert stream.train_y.shape[1] == 1000  # 6,000 images less A-GEM's 5,000 validation ones
    np.testing.assert_array_equal(stream.train_x, full.train_x[3:])
    np.testing.assert_array_equal(stream.test_y, full.test_y[3:])


def _real_data_dir() -> Path:
    root = os.environ.get("METAJAX_DATA_DIR")
    if not root:
        pytest.skip("METAJAX_DATA_DIR is not set (e.g. METAJAX_DATA_DIR=../shared/data)")
    folder = Path(root) / "mnist"
    if not all((folder / f.filename).is_file() for f in mnist.FILES.values()):
        pytest.skip(f"{folder} lacks the four MNIST idx .gz files")
    return Path(root)


@pytest.mark.data
def test_real_mnist_replay_retains_more_than_finetuning(tmp_path):
    root = _real_data_dir()
    base = ContinualConfig(
        benchmark="lamaml_permuted_mnist", tasks=5, train_per_task=1000, test_per_task=1000,
        lca_batches=0, data_dir=str(root),
    )
    results = {
        learner: run_experiment(dataclasses.replace(base, learner=learner), tmp_path / learner,
                                progress=False)
        for learner in ("finetune", "er")
    }
    ft, replay = results["finetune"], results["er"]
    # Both learn each task when it is current ...
    assert min(np.diag(np.array(ft["acc_matrix"]))) > 0.6
    # ... but replay keeps the earlier ones.
    assert replay["avg_accuracy"] > ft["avg_accuracy"] + 0.03, (replay, ft)
    assert replay["bwt"] > ft["bwt"]
