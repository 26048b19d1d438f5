"""The notebooks in ``notebooks/`` run top to bottom in their small setting, and are committed
without outputs.

Each notebook is executed by a fresh Jupyter kernel (nbclient) in a temporary working folder
with ``METAJAX_SMALL=1`` (the notebooks' tiny setting) and ``JAX_PLATFORMS=cpu``; any cell
error fails the test, and every cell that shows a figure must have produced one. The
Rotated-MNIST notebook needs MNIST and is skipped, with the reason, when ``METAJAX_DATA_DIR``
does not hold it; the Omniglot notebook runs on Omniglot when ``METAJAX_DATA_DIR`` holds it and
on its synthetic stand-in otherwise.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
EXPECTED = (
    "01_sinusoid_maml.ipynb",
    "02_omniglot_fewshot.ipynb",
    "03_imaml_vs_maml.ipynb",
    "04_continual_lamaml.ipynb",
)
SMALL_SWITCH = 'SMALL = os.environ.get("METAJAX_SMALL") == "1"'
CELL_TIMEOUT_S = 600
MNIST_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
               "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
OMNIGLOT_FILES = ("images_background.zip", "images_evaluation.zip")


def _read(name: str):
    return nbformat.read(NOTEBOOKS / name, as_version=4)


def _has(folder: str, files: tuple[str, ...]) -> bool:
    root = os.environ.get("METAJAX_DATA_DIR")
    return bool(root) and all((Path(root) / folder / f).is_file() for f in files)


def test_the_notebooks_are_the_expected_ones():
    assert tuple(sorted(p.name for p in NOTEBOOKS.glob("*.ipynb"))) == EXPECTED


@pytest.mark.parametrize("name", EXPECTED)
def test_committed_without_outputs(name):
    nb = _read(name)
    nbformat.validate(nb)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code, f"{name} has no code cell"
    for i, cell in enumerate(code):
        assert cell.outputs == [], f"{name}: code cell {i} was committed with outputs"
        assert cell.execution_count is None, f"{name}: code cell {i} has an execution count"
    assert SMALL_SWITCH in code[0].source, f"{name}: the first code cell must read METAJAX_SMALL"
    assert any(cell.cell_type == "markdown" for cell in nb.cells), f"{name} explains nothing"


@pytest.mark.parametrize("name", EXPECTED)
def test_runs_in_the_small_setting(name, tmp_path):
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    pytest.importorskip("matplotlib")
    env = dict(os.environ, METAJAX_SMALL="1", JAX_PLATFORMS="cpu")
    if name == "04_continual_lamaml.ipynb" and not _has("mnist", MNIST_FILES):
        pytest.skip("needs MNIST: set METAJAX_DATA_DIR to a folder with mnist/ holding "
                    + ", ".join(MNIST_FILES))
    if name == "02_omniglot_fewshot.ipynb" and not _has("omniglot", OMNIGLOT_FILES):
        env.pop("METAJAX_DATA_DIR", None)  # the notebook's synthetic stand-in, no download
    nb = _read(name)
    client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    start = time.perf_counter()
    client.execute(env=env)  # raises CellExecutionError, naming the cell, on any error
    print(f"{name}: {time.perf_counter() - start:.1f} s")
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code" and "plt.show()" in cell.source:
            assert any("image/png" in out.get("data", {}) for out in cell.outputs), (
                f"{name}: cell {i} shows a figure but produced no image")


def test_sinusoid_reproduction_writes_its_figure(tmp_path, monkeypatch, capsys):
    """``benchmarks/reproduce/sinusoid.py --plot`` writes the PNG it promises and still ends
    with one strict-JSON line that names it (a tiny run: the figure's content is not judged).

    The script runs ``metajax train`` and ``metajax evaluate`` as commands; here they run in
    this process (the same ``metajax.cli.main``), which saves three interpreter starts.
    """
    import contextlib
    import importlib.util
    import io
    import json
    import sys

    pytest.importorskip("matplotlib")
    from metajax import cli

    script = NOTEBOOKS.parent / "benchmarks" / "reproduce" / "sinusoid.py"
    spec = importlib.util.spec_from_file_location("reproduce_sinusoid", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def run_in_process(cmd):
        assert cmd[:3] == [sys.executable, "-m", "metajax.cli"], cmd
        with contextlib.redirect_stdout(io.StringIO()) as out:
            assert cli.main(cmd[3:]) == 0, cmd
        return json.loads(out.getvalue().strip().splitlines()[-1])

    plot = tmp_path / "figures" / "sinusoid.png"
    monkeypatch.setattr(module, "run", run_in_process)
    monkeypatch.setattr(sys, "argv", [str(script), "--out", str(tmp_path / "run"), "--steps",
                                      "20", "--baseline-steps", "20", "--plot", str(plot)])
    module.main()

    def refuse(constant):
        raise ValueError(f"not strict JSON: {constant}")

    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1],
                         parse_constant=refuse)
    assert summary["steps"] == 20 and set(summary["mse_5shot"]) == {"1", "5", "10"}
    figures = summary["figures"]
    assert figures["plot"] == str(plot)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert figures["baseline"]["steps"] == 20
    assert figures["baseline"]["fine_tune_lr"] in module.BASELINE_LRS
    for shots in ("5", "10"):
        for arm in ("MAML", "pretrained"):
            curve = figures["curves"][shots][arm]
            assert len(curve["median"]) == module.CURVE_STEPS + 1
            assert 0 <= curve["diverged_tasks"] <= module.CURVE_TASKS
