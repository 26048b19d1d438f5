"""Continual hyper-parameter sweeps: every setting of a grid with every seed in one vmapped
computation, each setting's results equal to its own run; every learner takes its swept
fields as traced values; bad sweeps are refused naming the key."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_train_continual import SMALL, fake_mnist, tiny_stream  # noqa: F401 - a fixture

from metajax.cli import main
from metajax.presets.build_continual import (
    LEARNERS,
    build_continual_learner,
    build_continual_model,
)
from metajax.presets.continual import SWEEPABLE, get_continual_preset
from metajax.train.config import ConfigError


@pytest.mark.parametrize("learner", sorted(LEARNERS))
def test_every_learner_takes_every_sweepable_field_traced(learner):
    config = get_continual_preset(f"rot-mnist-{learner}")
    stream = tiny_stream()
    init, apply_fn = build_continual_model(config, stream)
    example = (jax.ShapeDtypeStruct((784,), jnp.float32), jax.ShapeDtypeStruct((), jnp.int32))

    def one_update(values):
        setting = dict(zip(SWEEPABLE, values, strict=True))
        cl = build_continual_learner(dataclasses.replace(config, **setting), stream, apply_fn)
        state = cl.init(init(jax.random.PRNGKey(0)), jax.random.PRNGKey(1), example,
                        stream.num_tasks)
        batch = (jnp.asarray(stream.train_x[0, :10]), jnp.asarray(stream.train_y[0, :10]))
        return cl.update(state, batch, jnp.int32(0))[1]

    values = jnp.array([getattr(config, name) for name in SWEEPABLE], jnp.float32)
    metrics = jax.eval_shape(one_update, values)  # raises if a value is used as a Python one
    assert metrics


def _summary(capsys):
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_sweep_settings_equal_their_own_runs(fake_mnist, tmp_path, capsys):  # noqa: F811
    argv = ["continual", "perm-mnist-er", "--seeds", "2", *SMALL]
    assert main([*argv, "--out", str(tmp_path / "sweep"), "--sweep", "lr=0.01,0.3"]) == 0
    swept = _summary(capsys)
    assert [entry["setting"] for entry in swept["sweep"]] == [{"lr": 0.01}, {"lr": 0.3}]
    for i, lr in enumerate((0.01, 0.3)):
        assert main([*argv, "--out", str(tmp_path / f"lr{i}"), "--set", f"lr={lr}"]) == 0
        alone = _summary(capsys)
        entry = swept["sweep"][i]
        assert entry["avg_accuracy"] == pytest.approx(alone["avg_accuracy"], abs=1e-6)
        assert entry["std"]["avg_accuracy"] == pytest.approx(alone["std"]["avg_accuracy"],
                                                             abs=1e-6)
        assert entry["forgetting"] == pytest.approx(alone["forgetting"], abs=1e-6)
    assert swept["sweep"][0]["avg_accuracy"] != swept["sweep"][1]["avg_accuracy"]
    saved = np.array(json.loads((tmp_path / "sweep" / "acc_matrix.json").read_text())
                     ["acc_matrix"])
    assert saved.shape == (4, 3, 3)  # 2 settings x 2 seeds
    assert json.loads((tmp_path / "sweep" / "config.json").read_text())["sweep"] == \
        "lr=0.01,0.3"


def test_grid_of_two_keys_and_bad_sweeps():
    config = get_continual_preset("perm-mnist-gem")
    grid = dataclasses.replace(config, sweep="lr=0.01,0.1;memory_strength=0,0.5,1")
    grid.validate()
    assert grid.sweep_settings()[:2] == [{"lr": 0.01, "memory_strength": 0.0},
                                         {"lr": 0.01, "memory_strength": 0.5}]
    assert len(grid.sweep_settings()) == 6 and grid.runs == 6 * config.seeds
    for sweep, message in [("memory=100,200", "'memory' cannot be swept"),
                           ("lr=0,0.1", "lr must be > 0"),
                           ("lr", "expected name=v1,v2"),
                           ("lr=0.1;lr=0.2", "given twice"),
                           ("lr=fast", "lr"),
                           ("beta=0.1,0.3", "'beta' is not read by learner 'gem'.*read by mer")]:
        with pytest.raises(ConfigError, match=message):
            dataclasses.replace(config, sweep=sweep).validate()


def test_every_sweepable_field_is_read_by_some_learner_and_only_there_sweeps():
    from metajax.presets.continual import _READ_BY, SWEEPABLE

    for name in SWEEPABLE:
        assert _READ_BY[name], name
        for learner in ("finetune", "er", "agem", "gem", "mer", "cmaml", "sync", "lamaml"):
            config = dataclasses.replace(get_continual_preset("perm-mnist-er"),
                                         learner=learner, sweep=f"{name}=0.1,0.2")
            if learner in _READ_BY[name]:
                assert len(config.sweep_settings()) == 2
            else:
                with pytest.raises(ConfigError, match="not read by"):
                    config.sweep_settings()


def test_cli_refuses_a_bad_sweep(capsys):
    assert main(["continual", "perm-mnist-er", "--sweep", "replay_batch=5,10"]) == 2
    assert "cannot be swept" in capsys.readouterr().err
