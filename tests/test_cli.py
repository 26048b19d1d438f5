"""The ``metajax`` command: bad input fails early with status 2; train then evaluate works."""

import json
import subprocess
import sys

import pytest

from metajax.cli import main
from metajax.train.logging import read_jsonl


def run_main(capsys, *argv):
    status = main(list(argv))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def test_presets_lists_the_sinusoid_presets(capsys):
    status, out, _ = run_main(capsys, "presets")
    assert status == 0
    names = last_json(out)["presets"]
    expected = ["sinusoid-maml", "sinusoid-fomaml", "sinusoid-reptile", "sinusoid-metasgd"]
    expected += [
        f"{data}-{setting}-{algorithm}"
        for data, settings in [("omniglot", ["5w1s", "5w5s", "20w1s", "20w5s"]),
                               ("miniimagenet", ["5w1s", "5w5s"])]
        for setting in settings
        for algorithm in ["maml", "fomaml", "reptile", "metasgd", "anil"]
    ]
    described = {line.split()[0]: line for line in out.splitlines()[:-1] if line[:1] != "#"}
    for name in expected:
        assert name in names
        assert len(described[name].split()) > 3  # a description follows the name
    continual = last_json(out)["continual"]
    for name in ["rot-mnist-lamaml", "perm-mnist-er", "many-mnist-gem", "agem-pmnist-agem"]:
        assert name in continual and len(described[name].split()) > 3


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "nonsense"], "unknown preset 'nonsense'; valid presets: miniimagenet-5w1s"),
        (["train", "sinusoid-maml", "--set", "inner_rate=0.1"], "unknown --set key 'inner_rate'"),
        (["train", "sinusoid-maml", "--set", "inner_lr=fast"], "expected float"),
        (["train", "sinusoid-maml", "--set", "meta_batch_size=2.5"], "expected int"),
        (["train", "sinusoid-maml", "--set", "shots"], "expects key=value"),
        (["train", "sinusoid-maml", "--set", "inner_lr=0"], "inner_lr must be > 0"),
        (["train", "sinusoid-maml", "--set", "outer_lr=-1e-3"], "outer_lr must be > 0"),
        (["train", "sinusoid-maml", "--set", "inner_steps=0"], "inner_steps must be > 0"),
        (["train", "sinusoid-maml", "--set", "algorithm=foo"], "algorithm must be one of"),
    ],
)
def test_bad_train_input_is_one_line_and_status_2(capsys, argv, message):
    status, out, err = run_main(capsys, *argv)
    assert status == 2
    assert message in err
    assert len(err.strip().splitlines()) == 1
    assert out == ""


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "sinusoid-maml", "--steps", "0"],
        ["train", "sinusoid-maml", "--steps", "-5"],
        ["train", "sinusoid-maml", "--steps", "many"],
        ["evaluate", "somewhere", "--tasks", "0"],
        ["evaluate", "somewhere", "--steps", "1,x"],
    ],
)
def test_bad_numbers_exit_2(capsys, argv):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err.strip().splitlines()[-1]


def test_out_dir_holding_another_run_is_refused(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.json").write_text(json.dumps({"preset": "other", "steps": 3}))
    status, _, err = run_main(capsys, "train", "sinusoid-maml", "--out", str(run_dir))
    assert status == 2
    assert "holds a different run" in err


def test_evaluate_needs_a_run_directory(tmp_path, capsys):
    status, _, err = run_main(capsys, "evaluate", str(tmp_path))
    assert status == 2
    assert "not a run directory" in err


def test_train_then_evaluate_end_to_end(tmp_path, capsys):
    run_dir = tmp_path / "run"
    status, out, _ = run_main(
        capsys, "train", "sinusoid-maml", "--steps", "60", "--out", str(run_dir), "--seed", "3",
        "--no-progress", "--set", "log_every=20", "--set", "eval_every=40",
        "--set", "eval_tasks=8",
    )
    assert status == 0
    summary = last_json(out)
    assert summary["step"] == 60 and summary["run_dir"] == str(run_dir)
    assert summary["meta_loss"] > 0 and "val_mse" in summary
    config = json.loads((run_dir / "config.json").read_text())
    assert config["seed"] == 3 and config["steps"] == 60 and config["log_every"] == 20
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [x["meta_loss"] for x in lines if "meta_loss" in x]
    assert [x["step"] for x in lines if "meta_loss" in x] == [20, 40, 60]
    assert losses[-1] < losses[0]  # meta-training makes progress
    assert [x["step"] for x in lines if "val_mse" in x] == [40, 60]
    assert (run_dir / "meta_params.msgpack").stat().st_size > 0

    status, out, _ = run_main(capsys, "evaluate", str(run_dir), "--tasks", "12", "--shots", "5",
                              "--steps", "0,2")
    assert status == 0
    result = last_json(out)
    assert result["metric"] == "mse" and result["tasks"] == 12 and result["shots"] == 5
    assert set(result["by_steps"]) == {"0", "2"}
    for figures in result["by_steps"].values():
        assert figures["mean"] > 0 and figures["ci95"] > 0
    assert result["by_steps"]["2"]["mean"] != result["by_steps"]["0"]["mean"]

    # The same configuration into the same directory is refused without --resume; into
    # another directory it gives the same figures (deterministic for a seed).
    same = ("train", "sinusoid-maml", "--steps", "60", "--seed", "3", "--no-progress",
            "--set", "log_every=20", "--set", "eval_every=40", "--set", "eval_tasks=8")
    status, _, err = run_main(capsys, *same, "--out", str(run_dir))
    assert status == 2 and "--resume" in err.strip().splitlines()[-1]
    status, out2, _ = run_main(capsys, *same, "--out", str(tmp_path / "again"))
    assert status == 0
    assert last_json(out2)["meta_loss"] == summary["meta_loss"]
    # --resume on a finished run trains nothing and reports the same result.
    status, out3, _ = run_main(capsys, *same, "--out", str(run_dir), "--resume")
    assert status == 0
    resumed = last_json(out3)
    assert resumed["resumed_from"] == 60 and resumed["meta_loss"] == summary["meta_loss"]
    assert len(read_jsonl(run_dir / "metrics.jsonl")) == len(lines)


def test_console_script_reports_errors_with_status_2():
    proc = subprocess.run(
        [sys.executable, "-m", "metajax.cli", "train", "no-such-preset"],
        capture_output=True, text=True,
    )
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("metajax: error: unknown preset 'no-such-preset'; valid presets: ")
    assert "omniglot-5w1s-maml" in line and "sinusoid-maml" in line
