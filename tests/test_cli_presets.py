"""`metajax presets [NAME]`, `--config FILE`, `--dry-run`, and what `tasks` means for a
continual stream. Nothing here trains or loads a data set."""

from __future__ import annotations

import dataclasses
import json
import tomllib

import pytest

from metajax.cli import main
from metajax.presets import PRESETS, get_preset
from metajax.presets.config import Config
from metajax.presets.continual import CONTINUAL_PRESETS, ContinualConfig, get_continual_preset
from metajax.presets.published import PUBLISHED

ALL_PRESETS = [*sorted(PRESETS), *sorted(CONTINUAL_PRESETS)]


def run(capsys, *argv):
    status = main(list(argv))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def preset_config(name: str):
    return get_preset(name) if name in PRESETS else get_continual_preset(name)


def config_block(out: str) -> str:
    """The TOML configuration block of `metajax presets NAME` (or of a dry run)."""
    lines = out.strip().splitlines()[:-1]
    start = next(i for i, line in enumerate(lines) if line.startswith("configuration"))
    return "\n".join(lines[start + 1:])


def test_table_is_short_and_lists_every_preset_in_its_section(capsys):
    status, out, _ = run(capsys, "presets")
    assert status == 0
    lines = out.strip().splitlines()
    table = lines[:-1]
    assert all(len(line) < 100 for line in table), max(table, key=len)
    rows = {line.split()[0]: line for line in table if not line.startswith("#")}
    assert sorted(rows) == sorted(ALL_PRESETS)
    listed = last_json(out)
    assert listed == {"presets": sorted(PRESETS), "continual": sorted(CONTINUAL_PRESETS)}
    # Two sections, meta-learning first; each row gives the method, the data and a source.
    continual_header = next(i for i, line in enumerate(table) if "continual learning" in line)
    names = [line.split()[0] for line in table if not line.startswith("#")]
    assert set(names[: len(PRESETS)]) == set(PRESETS)
    assert all(table.index(rows[n]) > continual_header for n in CONTINUAL_PRESETS)
    assert rows["omniglot-5w1s-maml"].split()[1:3] == ["maml", "omniglot"]
    assert "Finn et al. 2017" in rows["omniglot-5w1s-maml"]
    assert rows["agem-pmnist-agem"].split()[1] == "agem"
    assert "Chaudhry et al. 2019" in rows["agem-pmnist-agem"]


@pytest.mark.parametrize("name", ALL_PRESETS)
def test_presets_name_prints_a_configuration_that_rebuilds_the_preset(capsys, name):
    status, out, err = run(capsys, "presets", name)
    assert status == 0 and err == ""
    shown = last_json(out)
    expected = preset_config(name)
    schema = Config if name in PRESETS else ContinualConfig
    assert shown["preset"] == name
    assert shown["kind"] == ("train" if name in PRESETS else "continual")
    assert schema(**shown["config"]) == expected
    # The readable block is TOML holding every field: a file of it rebuilds the preset too.
    assert schema(**tomllib.loads(config_block(out))) == expected
    note = (PRESETS if name in PRESETS else CONTINUAL_PRESETS)[name][1]
    assert shown["note"] == note
    assert " ".join(note.split()[:6]) in " ".join(out.split())
    assert len(shown["published"]) == len(PUBLISHED.get(name, ()))


def test_presets_name_gives_the_papers_figures(capsys):
    _, out, _ = run(capsys, "presets", "omniglot-20w1s-maml")
    (figure,) = last_json(out)["published"]
    assert (figure["value"], figure["spread"], figure["table"]) == (95.8, 0.3, "Table 1")
    assert "95.8 +/- 0.3" in out
    expected = {"omniglot-5w1s-maml": 98.7, "omniglot-5w5s-maml": 99.9,
                "omniglot-20w5s-maml": 98.9, "miniimagenet-5w1s-maml": 48.70,
                "miniimagenet-5w5s-maml": 63.11, "omniglot-5w1s-imaml": 99.16}
    for name, value in expected.items():
        assert PUBLISHED[name][0].value == value, name
    _, out, _ = run(capsys, "presets", "split-omniglot-er")
    assert last_json(out)["published"] == [] and "no figure recorded" in out


def test_presets_name_explains_the_protocol_defaults_of_a_continual_preset(capsys):
    _, out, _ = run(capsys, "presets", "agem-pmnist-agem")
    shown = last_json(out)
    assert shown["config"]["tasks"] == 0 and shown["config"]["cv_tasks"] == -1
    assert shown["resolved"]["tasks"] == "0: the protocol's, 20; 17 run after the 3 held out"
    assert "17 run and reported" in " ".join(out.split())
    _, out, _ = run(capsys, "presets", "perm-mnist-er")
    assert last_json(out)["resolved"]["tasks"] == "0: the protocol's, 20"
    config = get_continual_preset("perm-mnist-er").with_overrides(["tasks=5"])
    assert config.field_notes()["tasks"] == "5; all run"
    assert "batch_size" in config.field_notes() and "lr" not in config.field_notes()
    assert get_continual_preset("perm-mnist-gem").field_notes()["beta"] == "not used by gem"


def test_unknown_preset_name_suggests_close_ones(capsys):
    status, out, err = run(capsys, "presets", "omniglot-5w1s-mam")
    assert status == 2 and out == ""
    (line,) = err.strip().splitlines()
    assert "unknown preset 'omniglot-5w1s-mam'" in line and "omniglot-5w1s-maml" in line
    status, _, err = run(capsys, "presets", "qqqq")
    assert status == 2 and "no preset has a similar name" in err
    # train and continual say which command a preset of the other kind belongs to.
    status, _, err = run(capsys, "train", "perm-mnist-er", "--dry-run")
    assert status == 2 and "run `metajax continual perm-mnist-er`" in err
    status, _, err = run(capsys, "train", "omniglot-5w1s-mam", "--dry-run")
    assert status == 2 and "did you mean 'omniglot-5w1s-maml'" in err


def test_dry_run_prints_the_config_and_creates_nothing(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out_dir = tmp_path / "run"
    status, out, _ = run(capsys, "train", "sinusoid-maml", "--dry-run", "--steps", "7",
                         "--seed", "3", "--set", "inner_lr=0.02", "--out", str(out_dir))
    assert status == 0
    assert list(tmp_path.iterdir()) == []  # no run directory, no runs/
    shown = last_json(out)
    assert shown["dry_run"] is True and shown["resume"] is False
    expected = dataclasses.replace(get_preset("sinusoid-maml"), steps=7, seed=3, inner_lr=0.02,
                                   devices=shown["config"]["devices"])
    assert shown["config"]["devices"] >= 1
    assert Config(**shown["config"]) == expected
    assert shown["fingerprint"] == expected.fingerprint()
    assert Config(**tomllib.loads(config_block(out))) == expected
    # A bad value is still refused, as without --dry-run.
    status, _, err = run(capsys, "train", "sinusoid-maml", "--dry-run", "--set", "inner_lr=0")
    assert status == 2 and "inner_lr must be > 0" in err


def test_dry_run_checks_the_data_directory(capsys, tmp_path):
    missing = tmp_path / "nowhere"
    status, _, err = run(capsys, "train", "omniglot-5w1s-maml", "--dry-run", "--data-dir",
                         str(missing))
    assert status == 2 and str(missing) in err and not missing.exists()
    # mini-ImageNet cannot be downloaded: an empty data directory is refused.
    status, _, err = run(capsys, "train", "miniimagenet-5w1s-maml", "--dry-run", "--data-dir",
                         str(tmp_path))
    assert status == 2 and "miniimagenet" in err
    # MNIST can be: the dry run says it would be downloaded, and downloads nothing.
    status, out, _ = run(capsys, "continual", "perm-mnist-er", "--dry-run", "--data-dir",
                         str(tmp_path))
    assert status == 0
    (data,) = last_json(out)["data"]
    assert data == {"dataset": "mnist", "folder": str(tmp_path / "mnist"), "present": False,
                    "downloads": True}
    assert list(tmp_path.iterdir()) == []


def test_dry_run_refuses_an_out_directory_holding_another_run(capsys, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.json").write_text(get_preset("sinusoid-fomaml").to_json())
    status, _, err = run(capsys, "train", "sinusoid-maml", "--dry-run", "--out", str(run_dir))
    assert status == 2 and "holds a different run (algorithm: 'fomaml' -> 'maml'" in err
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.json"]


def test_config_json_of_a_run_starts_the_same_run(capsys, tmp_path):
    preset = get_preset("omniglot-5w1s-maml")
    run_dir = tmp_path / "old-run"
    run_dir.mkdir()
    (run_dir / "config.json").write_text(dataclasses.replace(preset, devices=1).to_json())
    for given in (run_dir / "config.json", run_dir):  # the file, or its run directory
        status, out, _ = run(capsys, "train", "--config", str(given), "--dry-run")
        assert status == 0
        shown = last_json(out)
        assert Config(**shown["config"]) == dataclasses.replace(
            preset, devices=shown["config"]["devices"])
        assert shown["fingerprint"] == preset.fingerprint()
    # --set, --steps and --seed apply on top of the file.
    status, out, _ = run(capsys, "train", "--config", str(run_dir), "--dry-run", "--steps",
                         "9", "--seed", "4", "--set", "inner_steps=2")
    shown = Config(**last_json(out)["config"])
    assert (shown.steps, shown.seed, shown.inner_steps, shown.inner_lr) == (9, 4, 2, 0.4)


def test_partial_toml_file_starts_from_the_preset_it_names(capsys, tmp_path):
    path = tmp_path / "tweak.toml"
    path.write_text('preset = "omniglot-20w1s-maml"\ninner_lr = 1\nsteps = 500\n')
    status, out, _ = run(capsys, "train", "--config", str(path), "--dry-run")
    assert status == 0
    shown = Config(**last_json(out)["config"])
    expected = dataclasses.replace(get_preset("omniglot-20w1s-maml"), inner_lr=1.0, steps=500,
                                   devices=shown.devices)
    assert shown == expected
    assert isinstance(last_json(out)["config"]["inner_lr"], float)  # 1 is read as 1.0
    # Without a preset, the fields it leaves out take the schema's defaults.
    path.write_text("shots = 5\nqueries = 5\n")
    status, out, _ = run(capsys, "train", "--config", str(path), "--dry-run")
    shown = Config(**last_json(out)["config"])
    assert shown == dataclasses.replace(Config(), shots=5, queries=5, devices=shown.devices)


def test_continual_config_file(capsys, tmp_path):
    path = tmp_path / "stream.toml"
    path.write_text('preset = "rot-mnist-lamaml"\nglances = 3\n')
    status, out, _ = run(capsys, "continual", "--config", str(path), "--dry-run",
                         "--set", "tasks=4", "--seeds", "2")
    assert status == 0
    shown = ContinualConfig(**last_json(out)["config"])
    assert shown == dataclasses.replace(get_continual_preset("rot-mnist-lamaml"), glances=3,
                                        tasks=4, seeds=2, devices=shown.devices)


@pytest.mark.parametrize(
    "command, text, suffix, message",
    [
        ("train", '{"benchmark": "split_omniglot", "learner": "er"}', ".json",
         "is a `metajax continual` configuration"),
        ("train", 'preset = "perm-mnist-er"', ".toml", "is a `metajax continual` configuration"),
        ("continual", '{"algorithm": "maml", "inner_lr": 0.1}', ".json",
         "is a `metajax train` configuration"),
        ("train", "inner_rate = 0.1", ".toml",
         "unknown configuration key 'inner_rate' (did you mean 'inner_lr'"),
        ("continual", "{\"glance\": 2}", ".json", "unknown configuration key 'glance'"),
        ("train", "steps = 1.5", ".toml", "steps must be an integer"),
        ("train", "steps = [", ".toml", "not valid TOML"),
        ("train", "[1, 2]", ".json", "a configuration is an object of fields"),
        ("train", 'preset = "sinusoid-nope"\nsteps = 3', ".toml",
         "'sinusoid-nope' is not a train preset"),
    ],
)
def test_bad_config_files_are_one_line_errors(capsys, tmp_path, command, text, suffix,
                                              message):
    path = tmp_path / f"config{suffix}"
    path.write_text(text)
    status, out, err = run(capsys, command, "--config", str(path), "--dry-run")
    assert status == 2 and out == ""
    (line,) = err.strip().splitlines()
    assert message in line and str(path) in line


def test_preset_and_config_are_one_or_the_other(capsys, tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("steps = 3\n")
    status, _, err = run(capsys, "train", "sinusoid-maml", "--config", str(path), "--dry-run")
    assert status == 2 and "not both" in err
    status, _, err = run(capsys, "continual", "--dry-run")
    assert status == 2 and "give a preset" in err and "--config FILE" in err


def test_tasks_zero_is_the_protocols_count_and_says_so(capsys):
    status, out, err = run(capsys, "continual", "perm-mnist-er", "--set", "tasks=0",
                           "--dry-run")
    assert status == 0
    assert "tasks=0 is the protocol's count: 20 tasks" in err
    assert "20 tasks (the protocol's), all run" in out
    status, _, err = run(capsys, "continual", "perm-mnist-er", "--set", "tasks=-1",
                         "--dry-run")
    assert status == 2 and "tasks must be >= 0" in err
    # Without --set tasks nothing is said: the preset's own default is no surprise.
    _, _, err = run(capsys, "continual", "perm-mnist-er", "--dry-run")
    assert err == ""


def test_tasks_on_agem_counts_the_held_out_tasks_and_says_so(capsys):
    config = get_continual_preset("agem-pmnist-agem").with_overrides(["tasks=5"])
    assert config.task_counts() == {"tasks": 5, "cv_tasks": 3, "run": 2}
    assert config.with_overrides(["tasks=8"]).task_counts()["run"] == 5
    assert config.with_overrides(["cv_tasks=0"]).task_counts()["run"] == 5
    status, out, err = run(capsys, "continual", "agem-pmnist-agem", "--set", "tasks=5",
                           "--dry-run")
    assert status == 0
    assert "2 are run and reported; --set tasks=8 runs 5, --set cv_tasks=0 runs all 5" in err
    assert "5 tasks (tasks=5), the first 3 held out" in " ".join(out.split())
    # A count that leaves nothing to run is refused before any data is read.
    status, _, err = run(capsys, "continual", "agem-pmnist-agem", "--set", "tasks=3",
                         "--dry-run")
    assert status == 2
    (line,) = err.strip().splitlines()
    assert "cv_tasks=3 leaves none of the stream's 3 tasks" in line
    assert "tasks to at least 4" in line


def test_task_notices_come_with_the_runs_first_line(capsys, tmp_path, monkeypatch):
    """The notice is printed in a real run too (the run itself replaced by a stub)."""
    from metajax.presets import build_continual

    seen = {}

    def fake_run(config, run_dir, *, progress, resume, log, mesh, tensorboard=False):
        seen["config"] = config
        log("stub run")
        return {"tasks": config.task_counts()["run"]}

    monkeypatch.setattr(build_continual, "run_experiment", fake_run)
    status, out, err = run(capsys, "continual", "agem-pmnist-er", "--set", "tasks=5",
                           "--out", str(tmp_path / "r"), "--no-progress")
    assert status == 0 and last_json(out) == {"tasks": 2}
    lines = err.strip().splitlines()
    assert "2 are run and reported" in lines[0] and lines[1] == "stub run"
    assert seen["config"].tasks == 5
