"""The error contract of the command line: an expected failure is one line on stderr naming
the key or the file, and exit status 2 (never a traceback); stdout JSON is strict."""

import json
import os
import stat

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from metajax._files import atomic_write
from metajax.cli import main
from metajax.presets import get_preset
from metajax.presets.config import Config
from metajax.train.config import ConfigError


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err)
    assert err, "no message"
    assert err[-1].startswith("metajax: error: ")
    return err[-1]


@pytest.mark.parametrize(("override", "named"), [
    ("outer_lr=1e39", "outer_lr"),       # not representable in float32
    ("inner_lr=inf", "inner_lr"),
    ("inner_lr=nan", "inner_lr"),
    ("time_budget_s=-inf", "time_budget_s"),
    ("shots=99999999999999999999", "shots"),   # beyond int32
    ("shots=2000000000", "machine can index"),  # fits int32, not as a batch
])
def test_bad_values_are_rejected_before_compiling(capsys, tmp_path, override, named):
    status = main(["train", "sinusoid-maml", "--out", str(tmp_path / "run"), "--set", override])
    assert status == 2
    assert named in one_error_line(capsys)
    assert not (tmp_path / "run").exists()


def test_seed_beyond_int32(capsys, tmp_path):
    status = main(["train", "sinusoid-maml", "--out", str(tmp_path / "run"),
                   "--seed", "99999999999999999999"])
    assert status == 2
    assert "seed" in one_error_line(capsys)


def test_out_under_a_file(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    status = main(["train", "sinusoid-maml", "--out", str(blocker / "run"), "--steps", "1"])
    assert status == 2
    assert str(blocker) in one_error_line(capsys)


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_out_read_only(capsys, tmp_path):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o500)
    try:
        status = main(["train", "sinusoid-maml", "--out", str(parent / "run"), "--steps", "1"])
    finally:
        parent.chmod(0o700)
    assert status == 2
    assert "ermission" in one_error_line(capsys)


def sinusoid_run_dir(tmp_path, params_bytes: bytes | None):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    config = get_preset("sinusoid-maml")
    (run_dir / "config.json").write_text(config.to_json())
    if params_bytes is not None:
        (run_dir / "meta_params.msgpack").write_bytes(params_bytes)
    return run_dir


@pytest.mark.parametrize("payload", [
    msgpack.packb({"params": {"a": "text"}}),            # leaves that are not arrays
    msgpack.packb([1, 2, 3]),                             # not the model's structure
    b"\x93\x01\x02",                                      # truncated
    b"",
])
def test_crafted_parameters_are_refused(capsys, tmp_path, payload):
    run_dir = sinusoid_run_dir(tmp_path, payload)
    status = main(["evaluate", str(run_dir), "--tasks", "2"])
    assert status == 2
    assert "meta_params.msgpack" in one_error_line(capsys)


def test_parameters_of_another_dtype_are_refused(capsys, tmp_path):
    import flax.serialization
    import jax

    from metajax.presets.build import build_learner, build_problem

    config = get_preset("sinusoid-maml")
    problem = build_problem(config)
    template = build_learner(config, problem).init(problem.init_params(jax.random.PRNGKey(0)))
    as_int8 = jax.tree.map(lambda x: np.zeros(x.shape, np.int8), template)
    run_dir = sinusoid_run_dir(tmp_path, flax.serialization.to_bytes(as_int8))
    assert main(["evaluate", str(run_dir), "--tasks", "2"]) == 2
    line = one_error_line(capsys)
    assert "int8" in line and "meta_params.msgpack" in line


def test_broken_config_json_is_named(capsys, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.json").write_text('{"preset": "x",')
    assert main(["evaluate", str(run_dir)]) == 2
    assert str(run_dir / "config.json") in one_error_line(capsys)


def test_stdout_json_is_strict(capsys, tmp_path):
    run_dir = tmp_path / "run"
    assert main(["train", "sinusoid-maml", "--steps", "2", "--out", str(run_dir),
                 "--no-progress", "--set", "log_every=1", "--set", "eval_tasks=2"]) == 0
    capsys.readouterr()
    # One test task: no confidence interval (NaN), written as null with the reason.
    assert main(["evaluate", str(run_dir), "--tasks", "1", "--steps", "1", "--write"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]

    def refuse(name):
        raise AssertionError(f"bare {name} in {line}")

    result = json.loads(line, parse_constant=refuse)
    assert result["ci95"] is None and result["ci95_nonfinite"] == "nan"
    written = (run_dir / "evaluations.jsonl").read_text().strip()
    assert json.loads(written, parse_constant=refuse)["tasks"] == 1


def test_files_are_written_with_the_umask_mode(tmp_path):
    path = atomic_write(tmp_path / "x.bin", lambda f: f.write(b"1"))
    mask = os.umask(0o022)
    os.umask(mask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask
    assert not list(tmp_path.glob("*.tmp"))


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=40))
def test_set_parser_raises_only_config_errors(text):
    config = get_preset("sinusoid-maml")
    try:
        config.with_overrides([text]).validate()
    except ConfigError as err:
        assert str(err) and "\n" not in str(err)


@settings(max_examples=100, deadline=None)
@given(key=st.sampled_from(["shots", "inner_lr", "steps", "seed", "remat", "algorithm"]),
       value=st.one_of(st.integers(), st.floats(), st.text(max_size=12), st.booleans()))
def test_set_values_of_every_kind(key, value):
    config = get_preset("sinusoid-maml")
    try:
        checked = config.with_overrides([f"{key}={value}"]).validate()
    except ConfigError as err:
        assert key in str(err)
    else:
        assert getattr(checked, key) is not None


@settings(max_examples=150, deadline=None)
@given(st.one_of(st.binary(max_size=200),
                 st.dictionaries(st.text(max_size=10),
                                 st.one_of(st.integers(), st.floats(), st.text(max_size=5),
                                           st.none(), st.lists(st.integers(), max_size=3)),
                                 max_size=5).map(lambda d: json.dumps(d).encode())))
def test_config_json_loading_raises_only_config_errors(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("cfg") / "config.json"
    path.write_bytes(data)
    try:
        Config.from_json_file(path)
    except ConfigError as err:
        assert str(path) in str(err)


def test_nonfinite_values_in_arrays_are_null_with_their_positions():
    from metajax.train.logging import dumps

    text = dumps({"acc": np.array([[0.5, np.nan], [np.inf, 1.0]]), "one": np.array([[2.0]]),
                  "loss": np.float32("nan"), "fine": [1.0, 2.0]})
    data = json.loads(text, parse_constant=lambda name: pytest.fail(f"bare {name}"))
    assert data["acc"] == [[0.5, None], [None, 1.0]]
    assert data["acc_nonfinite"] == "nan at [0, 1]; inf at [1, 0]"
    assert data["one"] == [[2.0]]  # a one-element array keeps its shape
    assert data["loss"] is None and data["loss_nonfinite"] == "nan"
    assert "fine_nonfinite" not in data
