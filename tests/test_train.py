"""The training loop and the sinusoid task sampler."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metajax.data import sinusoid
from metajax.presets import get_preset
from metajax.presets.build import build_learner, build_optimizer, build_problem
from metajax.train.checkpoint import load_params, save_params
from metajax.train.loop import make_evaluator, make_train_chunk, mean_ci95, task_sampler


def test_sinusoid_tasks_ranges_and_shapes():
    tasks = sinusoid.sample_tasks(jax.random.PRNGKey(0), 2000, 5, 7)
    xs, ys = tasks.support
    xq, yq = tasks.query
    assert xs.shape == ys.shape == (2000, 5, 1) and xq.shape == (2000, 7, 1)
    x = np.concatenate([xs, xq], axis=1)
    y = np.concatenate([ys, yq], axis=1)
    assert x.min() >= -5.0 and x.max() <= 5.0 and x.min() < -4.9 and x.max() > 4.9
    # With 12 points spread over [-5, 5] the largest |y| of a task is close to its amplitude.
    peak = np.abs(y).max(axis=(1, 2))
    assert peak.max() <= 5.0 and peak.max() > 4.8 and np.median(peak) > 1.5
    same = sinusoid.sample_tasks(jax.random.PRNGKey(0), 2000, 5, 7)
    np.testing.assert_array_equal(same.support[0], xs)


def test_sinusoid_tasks_follow_the_sine_law():
    tasks = sinusoid.sample_tasks(jax.random.PRNGKey(1), 50, 40, 0)
    x, y = map(np.asarray, tasks.support)
    # Fit A sin(x - phi) = a sin x + b cos x by least squares: the residual must vanish and
    # the amplitude and phase fall in U[0.1, 5] x U[0, pi].
    for t in range(50):
        design = np.stack([np.sin(x[t, :, 0]), np.cos(x[t, :, 0])], 1)
        coef, *_ = np.linalg.lstsq(design, y[t, :, 0], rcond=None)
        np.testing.assert_allclose(design @ coef, y[t, :, 0], atol=1e-4)
        amplitude = np.hypot(*coef)
        phase = np.arctan2(-coef[1], coef[0])
        assert 0.1 - 1e-4 <= amplitude <= 5.0 + 1e-4
        assert -1e-4 <= phase <= np.pi + 1e-4


def test_chunking_does_not_change_the_result():
    config = dataclasses.replace(get_preset("sinusoid-maml"), meta_batch_size=4)
    problem = build_problem(config)
    learner = build_learner(config, problem)
    optimizer = build_optimizer(config)

    chunk = make_train_chunk(learner, optimizer, task_sampler(problem, 10, 10), 4)
    key = jax.random.PRNGKey(0)

    def fresh():
        params = learner.init(problem.init_params(key))
        return params, optimizer.init(params)

    params, state = fresh()
    one, _, m1 = chunk(params, state, key, jnp.int32(0), 6)
    params, state = fresh()
    params, state, _ = chunk(params, state, key, jnp.int32(0), 2)
    two, _, m2 = chunk(params, state, key, jnp.int32(2), 4)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), one, two)
    np.testing.assert_allclose(m1["meta_loss"][2:], m2["meta_loss"], rtol=1e-5)


def test_evaluator_task_map_does_not_change_the_values():
    config = get_preset("sinusoid-maml")
    problem = build_problem(config)
    learner = build_learner(config, problem)
    params = learner.init(problem.init_params(jax.random.PRNGKey(0)))
    key = jax.random.PRNGKey(1)
    values = {
        tm: np.asarray(make_evaluator(learner, problem, task_map=tm)(
            params, key, 7, 5, 10, 2, "test"))
        for tm in ("vmap", "scan", 3, None)
    }
    assert values["vmap"].shape == (7,) and np.ptp(values["vmap"]) > 0
    for tm, got in values.items():
        np.testing.assert_allclose(got, values["vmap"], rtol=1e-5, atol=1e-6, err_msg=str(tm))


def test_checkpoint_round_trip_and_mismatch(tmp_path):
    config = get_preset("sinusoid-metasgd")
    problem = build_problem(config)
    learner = build_learner(config, problem)
    meta_params = learner.init(problem.init_params(jax.random.PRNGKey(0)))
    path = save_params(tmp_path / "p.msgpack", meta_params)
    other = learner.init(problem.init_params(jax.random.PRNGKey(1)))
    restored = load_params(path, other)
    jax.tree.map(np.testing.assert_array_equal, restored, meta_params)
    wider = dataclasses.replace(config, hidden=8)
    template = build_learner(wider, build_problem(wider)).init(
        build_problem(wider).init_params(jax.random.PRNGKey(0))
    )
    with pytest.raises(ValueError, match="p.msgpack"):
        load_params(path, template)


def test_mean_ci95():
    figures = mean_ci95(np.array([1.0, 2.0, 3.0, 4.0]))
    assert figures["mean"] == 2.5
    np.testing.assert_allclose(figures["ci95"], 1.96 * np.std([1, 2, 3, 4], ddof=1) / 2)


def test_mamlpp_schedule_follows_epochs():
    from metajax.presets.build import mamlpp_schedules

    config = dataclasses.replace(get_preset("omniglot-20w1s-mamlpp"), iters_per_epoch=10,
                                 first_order_epochs=2, msl_anneal_epochs=4)
    schedules = mamlpp_schedules(config)
    first_order = jax.jit(schedules["first_order"])
    weights = jax.jit(schedules["step_weights"])
    assert float(first_order(jnp.int32(0))) == 1.0
    assert float(first_order(jnp.int32(19))) == 1.0
    assert float(first_order(jnp.int32(20))) == 0.0
    start, later = weights(jnp.int32(0)), weights(jnp.int32(30))
    np.testing.assert_allclose(start, np.full(5, 0.2), rtol=1e-6)
    assert later[-1] > start[-1] and later[0] < start[0]


@pytest.mark.parametrize(
    "preset, overrides",
    [
        ("sinusoid-imaml", {"inner_steps": 3}),
        ("sinusoid-imaml", {"inner_steps": 3, "inner_solver": "backtracking"}),
        ("sinusoid-maml", {"algorithm": "mamlpp", "inner_steps": 2, "iters_per_epoch": 5,
                           "first_order_epochs": 1, "outer_lr_schedule": "cosine"}),
        ("sinusoid-maml", {"remat": True, "inner_steps": 2}),
    ],
)
def test_other_algorithms_train_through_the_loop(tmp_path, preset, overrides):
    from metajax.train.loop import train

    config = dataclasses.replace(get_preset(preset), steps=20, log_every=10, eval_every=0,
                                 eval_tasks=4, meta_batch_size=4, **overrides).validate()
    problem = build_problem(config)
    summary = train(config, problem, build_learner(config, problem), build_optimizer(config),
                    tmp_path, progress=False)
    assert summary["step"] == 20 and np.isfinite(summary["meta_loss"])
    assert np.isfinite(summary["val_mse"])


def test_inner_solver_is_checked():
    from metajax.train.config import ConfigError

    base = get_preset("sinusoid-imaml")
    with pytest.raises(ConfigError, match="inner_solver"):
        dataclasses.replace(base, inner_solver="newton").validate()
    with pytest.raises(ConfigError, match="applies to imaml only"):
        dataclasses.replace(base, algorithm="maml", inner_solver="backtracking").validate()
    assert base.with_overrides(["inner_solver=backtracking"]).inner_solver == "backtracking"


def test_imaml_gradient_check_is_logged_at_validation_and_changes_nothing(tmp_path, capsys):
    """grad_report_tasks adds diag_* figures to each validation line of metrics.jsonl; the
    validation figures and the trained parameters are those of a run without it."""
    from metajax.cli import main
    from metajax.train.config import ConfigError

    def run(name, *extra):
        out = tmp_path / name
        argv = ["train", "sinusoid-imaml", "--steps", "4", "--no-progress", "--out", str(out),
                "--set", "inner_steps=3", "--set", "meta_batch_size=4", "--set", "log_every=2",
                "--set", "eval_every=2", "--set", "eval_tasks=4", *extra]
        assert main(argv) == 0
        capsys.readouterr()
        lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return out, [r for r in lines if "val_mse" in r], [r for r in lines if "val_mse" not in r]

    plain_dir, plain, _ = run("plain")
    checked_dir, checked, train_lines = run("checked", "--set", "grad_report_tasks=2",
                                            "--set", "grad_report_hvps=20")
    assert [r["step"] for r in checked] == [r["step"] for r in plain] == [2, 4]
    keys = {"diag_phi_distance", "diag_inner_residual", "diag_cos_first_order",
            "diag_cos_accurate", "diag_reference_residual"}
    for with_check, without in zip(checked, plain, strict=True):
        assert keys <= set(with_check) and not keys & set(without)
        assert with_check["val_mse"] == without["val_mse"]
        assert -1.0 <= with_check["diag_cos_accurate"] <= 1.0
        assert with_check["diag_phi_distance"] > 0
    assert not any(k.startswith("diag_") for r in train_lines for k in r)
    assert ((plain_dir / "meta_params.msgpack").read_bytes()
            == (checked_dir / "meta_params.msgpack").read_bytes())
    with pytest.raises(ConfigError, match="grad_report_tasks applies to imaml only"):
        get_preset("sinusoid-maml").with_overrides(["grad_report_tasks=2"]).validate()
