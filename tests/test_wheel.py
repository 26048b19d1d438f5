"""The built wheel works on its own: installed in a fresh virtual environment, from a folder
outside the repository, ``metajax train`` runs and writes its run directory.

Nothing is fetched from the network: the wheel is built with ``--no-isolation`` (the build
backend, setuptools, comes from this environment: the ``dev`` extra), and the fresh venv sees
this environment's installed packages through a ``.pth`` file instead of downloading its
dependencies. A ``.pth`` line only adds a folder to ``sys.path``; the ``.pth`` files inside
that folder (this environment's editable install of metajax among them) are not run, so the
fresh venv imports metajax from the wheel alone, which the test checks.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "metajax"
# Inputs of the build: what pyproject.toml reads (readme, license) and the package.
BUILD_INPUTS = ("pyproject.toml", "README.md", "LICENSE")
RUN_FILES = ("config.json", "run.json", "metrics.jsonl", "meta_params.msgpack")


def _package_files() -> list[str]:
    """Every file of the package the wheel must hold, relative to the repository root."""
    files = []
    for path in sorted(PACKAGE.rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
            files.append(path.relative_to(REPO).as_posix())
    return files


def _run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 600):
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, (
        f"{' '.join(map(str, cmd))} exited {result.returncode}\n"
        f"stdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-3000:]}"
    )
    return result


def _clean_env(venv: Path) -> dict[str, str]:
    """The environment of a shell that activated ``venv``: nothing of this one's."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")}
    env["VIRTUAL_ENV"] = str(venv)
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONNOUSERSITE"] = "1"
    return env


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built from a copy of the sources (the build writes nothing in the repo)."""
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    src.mkdir()
    for name in BUILD_INPUTS:
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(PACKAGE, src / "metajax",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    out = root / "dist"
    _run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(out),
          str(src)], cwd=root)
    wheels = list(out.glob("metajax-*.whl"))
    assert len(wheels) == 1, f"expected one wheel in {out}, found {wheels}"
    return wheels[0]


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> dict:
    """A fresh venv with the wheel installed; returns its paths."""
    root = tmp_path_factory.mktemp("venv")
    venv = root / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=root)
    python = venv / "bin" / "python"
    purelib = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()"
                         "['purelib'])"], cwd=root).stdout.strip())
    # This environment's packages (jax, flax, ..., and pip) without running its .pth files.
    ours = dict.fromkeys([*site.getsitepackages(), sysconfig.get_paths()["purelib"],
                          sysconfig.get_paths()["platlib"]])
    (purelib / "_metajax_test_parent.pth").write_text(
        "".join(f"{p}\n" for p in ours if Path(p).is_dir()))
    env = _clean_env(venv)
    # --ignore-installed: never touch the metajax this environment has (it is visible on
    # sys.path but outside the new venv).
    _run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed",
          "--disable-pip-version-check", "--no-warn-script-location", str(wheel)],
         cwd=root, env=env)
    return {"root": root, "venv": venv, "python": python, "purelib": purelib, "env": env}


def test_wheel_holds_the_package_data_and_py_typed(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "metajax/py.typed" in names
    missing = [f for f in _package_files() if f not in names]
    assert not missing, f"files of metajax/ missing from the wheel: {missing}"
    metadata = zipfile.ZipFile(wheel).read(
        next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "License-Expression: Apache-2.0" in metadata
    assert "Requires-Dist: matplotlib>=3.8" in metadata
    assert 'Requires-Dist: tensorboardX>=2.6; extra == "tensorboard"' in metadata
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)


def test_fresh_venv_imports_metajax_from_the_wheel(installed):
    out = _run([str(installed["python"]), "-c",
                "import metajax, json; print(json.dumps(metajax.__file__))"],
               cwd=installed["root"], env=installed["env"]).stdout
    location = Path(json.loads(out.strip().splitlines()[-1])).resolve()
    assert location.is_relative_to(installed["venv"].resolve()), (
        f"metajax imported from {location}, not from the fresh venv {installed['venv']}: "
        "the editable install leaks")
    assert (location.parent / "py.typed").is_file()


@pytest.fixture(scope="module")
def trained(installed) -> dict:
    """``metajax train sinusoid-maml --steps 100`` by the installed script, outside the repo."""
    work = installed["root"] / "work"
    work.mkdir()
    run_dir = work / "run"
    metajax = installed["venv"] / "bin" / "metajax"
    assert metajax.is_file(), "the wheel installed no `metajax` script"
    result = _run([str(metajax), "train", "sinusoid-maml", "--steps", "100", "--out",
                   str(run_dir), "--no-progress"], cwd=work, env=installed["env"])
    return {"run_dir": run_dir, "summary": json.loads(result.stdout.strip().splitlines()[-1])}


def test_installed_cli_trains_from_outside_the_repository(trained):
    run_dir, summary = trained["run_dir"], trained["summary"]
    assert summary["step"] == 100
    assert Path(summary["run_dir"]).resolve() == run_dir.resolve()
    for name in RUN_FILES:
        assert (run_dir / name).is_file(), f"{name} missing from the run directory"
    assert any((run_dir / "checkpoints").iterdir()), "no checkpoint written"


def test_installed_run_writes_its_plot(trained):
    # Every meta-training run writes curves.png (matplotlib is a core dependency).
    assert (trained["run_dir"] / "curves.png").is_file(), "curves.png missing from the run"
