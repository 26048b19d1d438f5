"""``metajax plot`` and ``--tensorboard`` from the command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from metajax.cli import main
from metajax.train.rundir import remove_new_run_files

TINY = ("--set", "meta_batch_size=2", "--set", "log_every=5", "--set", "eval_every=10",
        "--set", "eval_tasks=4", "--no-progress")


def _run(capsys, *argv):
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def test_train_writes_plots_and_tensorboard_and_plot_remakes_them(capsys, tmp_path):
    pytest.importorskip("tensorboardX")
    run_dir = tmp_path / "run"
    status, out, err = _run(capsys, "train", "sinusoid-maml", "--steps", "20", "--out",
                            str(run_dir), "--tensorboard", *TINY)
    assert status == 0, err
    curves = run_dir / "curves.png"
    assert curves.is_file()
    events = list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert events and all(e.stat().st_size > 0 for e in events)

    curves.unlink()
    status, out, err = _run(capsys, "plot", str(run_dir))
    assert status == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert str(curves) in summary["plots"]
    with Image.open(curves) as image:
        assert image.size[0] > 200 and image.size[1] > 200


def test_train_without_the_flag_writes_no_event_files(capsys, tmp_path):
    run_dir = tmp_path / "run"
    status, _, err = _run(capsys, "train", "sinusoid-maml", "--steps", "10", "--out",
                          str(run_dir), *TINY)
    assert status == 0, err
    assert not (run_dir / "tensorboard").exists()
    assert (run_dir / "curves.png").is_file()


def test_plot_refuses_a_folder_that_is_not_a_run(capsys, tmp_path):
    status, _, err = _run(capsys, "plot", str(tmp_path))
    assert status == 2
    assert err.strip() and len(err.strip().splitlines()) == 1
    status, _, err = _run(capsys, "plot", str(tmp_path / "missing"))
    assert status == 2 and "missing" in err


def test_continual_passes_tensorboard_to_the_run(capsys, tmp_path, monkeypatch):
    from metajax.presets import build_continual

    seen = {}

    def fake_run(config, run_dir, *, progress, resume, log, mesh, tensorboard=False):
        seen["tensorboard"] = tensorboard
        return {"tasks": 1}

    monkeypatch.setattr(build_continual, "run_experiment", fake_run)
    for flags, expected in (((), False), (("--tensorboard",), True)):
        status, _, err = _run(capsys, "continual", "perm-mnist-er", "--out",
                              str(tmp_path / f"r{expected}"), "--no-progress", *flags)
        assert status == 0, err
        assert seen["tensorboard"] is expected


def test_run_experiment_hands_tensorboard_to_train_continual(monkeypatch, tmp_path):
    from metajax.presets import build_continual
    from metajax.presets.continual import get_continual_preset
    from metajax.train import continual

    seen = {}
    monkeypatch.setattr(build_continual, "build_stream", lambda config, progress: None)
    monkeypatch.setattr(build_continual, "build_continual_model",
                        lambda config, stream: (None, None))
    monkeypatch.setattr(build_continual, "build_continual_learner", lambda *a: None)
    monkeypatch.setattr(continual, "train_continual",
                        lambda *a, **k: seen.update(k) or {"ok": True})
    config = get_continual_preset("perm-mnist-er")
    assert build_continual.run_experiment(config, tmp_path, tensorboard=True) == {"ok": True}
    assert seen["tensorboard"] is True


def test_a_failed_start_removes_the_tensorboard_folder_it_made(tmp_path):
    (tmp_path / "tensorboard").mkdir()
    (tmp_path / "tensorboard" / "events.out.tfevents.1").write_bytes(b"x")
    (tmp_path / "curves.png").write_bytes(b"x")
    (tmp_path / "mine.txt").write_text("kept")
    remove_new_run_files(tmp_path, before={"mine.txt"})
    assert sorted(p.name for p in Path(tmp_path).iterdir()) == ["mine.txt"]
    (tmp_path / "tensorboard").mkdir()
    remove_new_run_files(tmp_path, before={"mine.txt", "tensorboard"})
    assert (tmp_path / "tensorboard").is_dir()


def test_dry_run_checks_that_tensorboard_can_be_written(capsys, monkeypatch, tmp_path):
    import sys

    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # import now raises ImportError
    status, _, err = _run(capsys, "train", "sinusoid-maml", "--dry-run", "--tensorboard",
                          "--out", str(tmp_path / "r"))
    assert status == 2 and 'pip install "metajax[tensorboard]"' in err
    status, _, err = _run(capsys, "train", "sinusoid-maml", "--dry-run", "--out",
                          str(tmp_path / "r"))
    assert status == 0, err


def test_runs_written_before_a_field_existed_keep_their_fingerprint():
    """A checkpoint written before ``backward_solver`` or ``weight_init`` (or before the
    iMAML/MAML++ protocol fields) existed carries the hash without them; it stays resumable
    while they hold their defaults, and only then."""
    import dataclasses
    import hashlib

    from metajax.presets import get_preset

    def old_hash(config, dropped):
        fields = {k: v for k, v in dataclasses.asdict(config).items()
                  if k not in config.run_control() and k not in dropped}
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]

    config = get_preset("omniglot-5w1s-maml")
    newest = {"backward_solver"}
    middle = newest | {"weight_init"}
    earlier = middle | {"inner_problem", "eval_lam", "adam_eps", "pooling", "norm_eps"}
    assert config.fingerprints() == {config.fingerprint(), old_hash(config, newest),
                                     old_hash(config, middle), old_hash(config, earlier)}
    assert len(config.fingerprints()) == 4
    released = get_preset("omniglot-5w1s-imaml-released")  # weight_init="imaml": since then
    assert released.fingerprints() == {released.fingerprint(), old_hash(released, newest)}
    pooled = dataclasses.replace(config, pooling=True)      # no run before pooling had it
    assert pooled.fingerprints() == {pooled.fingerprint(), old_hash(pooled, newest),
                                     old_hash(pooled, middle)}
    gmres = dataclasses.replace(get_preset("omniglot-5w1s-imaml"), backward_solver="gmres")
    assert gmres.fingerprints() == {gmres.fingerprint()}
