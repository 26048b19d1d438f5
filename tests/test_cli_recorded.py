"""The command line's results on fixed seeds, recorded: a refactor that keeps every behaviour
keeps these numbers.

They were recorded on the project's CPU machine (2026-12-02) and checked equal, key by key,
before and after the one-way-layers refactor. Floats are compared with a tolerance because
XLA:CPU's reductions may round differently on another CPU; accuracies are counts over 100
test images per task, so one flipped prediction moves an entry by 0.01.
"""

from __future__ import annotations

import json
import os

import pytest

from metajax.cli import main

DATA_DIR = os.environ.get("METAJAX_DATA_DIR")
needs_mnist = pytest.mark.skipif(
    not DATA_DIR or not os.path.isdir(os.path.join(DATA_DIR, "mnist")),
    reason="set METAJAX_DATA_DIR to a folder with mnist/ to run the recorded continual runs",
)


def last_json_line(capsys, *argv) -> dict:
    assert main(list(argv)) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_train_sinusoid_maml_is_as_recorded(capsys, tmp_path):
    out = last_json_line(capsys, "train", "sinusoid-maml", "--steps", "40", "--seed", "3",
                         "--no-progress", "--out", str(tmp_path / "run"))
    assert out["step"] == 40 and out["skipped_steps"] == 0 and out["resumed_from"] == 0
    assert (out["devices"], out["processes"]) == (1, 1)
    recorded = {"meta_loss": 5.110121250152588, "query_loss": 5.110121250152588,
                "support_loss": 3.9057998657226562, "val_mse": 4.042392225526274}
    for key, value in recorded.items():
        assert out[key] == pytest.approx(value, rel=1e-3), key


CONTINUAL = ("--set", "tasks=3", "--set", "train_per_task=50", "--set", "test_per_task=100",
             "--set", "lca_batches=2", "--no-progress")
RECORDED = {
    "perm-mnist-er": {
        "acc_matrix": [[0.12, 0.08, 0.13], [0.13, 0.1, 0.11], [0.13, 0.14, 0.15]],
        "avg_accuracy": 0.14, "forgetting": -0.02, "bwt": 0.025, "fwt": -0.01, "lca": 0.092222,
    },
    "perm-mnist-gem": {
        "acc_matrix": [[0.1, 0.09, 0.12], [0.12, 0.12, 0.12], [0.21, 0.13, 0.18]],
        "avg_accuracy": 0.173333, "forgetting": -0.05, "bwt": 0.06, "fwt": 0.0, "lca": 0.098889,
    },
}


@needs_mnist
@pytest.mark.parametrize("preset", sorted(RECORDED))
def test_continual_is_as_recorded(capsys, tmp_path, preset):
    out = last_json_line(capsys, "continual", preset, "--data-dir", DATA_DIR,
                         "--out", str(tmp_path / "run"), *CONTINUAL)
    assert (out["tasks"], out["seeds"], out["preset"]) == (3, 1, preset)
    recorded = RECORDED[preset]
    flat = [a for row in out["acc_matrix"] for a in row]
    assert flat == pytest.approx([a for row in recorded["acc_matrix"] for a in row], abs=0.02)
    for key in ("avg_accuracy", "forgetting", "bwt", "fwt", "lca"):
        assert out[key] == pytest.approx(recorded[key], abs=0.02), key
    # GEM's and La-MAML's convention divides by T, metajax's by T - 1.
    assert out["bwt_over_T"] == pytest.approx(out["bwt"] * 2 / 3, abs=1e-5)
    assert out["fwt_over_T"] == pytest.approx(out["fwt"] * 2 / 3, abs=1e-5)


def test_sinusoid_imaml_preset_stays_finite(capsys, tmp_path):
    """Plain inner steps of 0.02 made seed 1 non-finite by meta-step 12; the preset's
    backtracking inner solver keeps every step finite and the inner solve close."""
    out = last_json_line(capsys, "train", "sinusoid-imaml", "--steps", "40", "--seed", "1",
                         "--no-progress", "--out", str(tmp_path / "run"))
    assert out["step"] == 40 and out["skipped_steps"] == 0
    assert 0 < out["meta_loss"] < 10 and out["inner_residual"] < 0.5
