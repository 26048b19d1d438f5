"""The package's layers import only downwards, and every registered continual learner has a
preset, a preset note and a contract test.

Imports are read from the source (``ast``), function-level imports included, so a lazy
import inside a function counts as much as one at the top of a module.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import test_cl_learners
import test_task_map

from metajax.presets import PRESETS, build, build_continual
from metajax.presets import continual as continual_presets

PACKAGE = Path(__file__).resolve().parents[1] / "metajax"
CONTINUAL_LEARNER_MODULES = ("agem", "er", "gem", "lamaml", "mer")


def imported_modules(path: Path) -> set[str]:
    """Every ``metajax...`` module named by an import statement in ``path``."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            # ``from metajax.continual import er`` names the submodule ``er`` too.
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in names if name == "metajax" or name.startswith("metajax.")}


def layer_files(*parts: str) -> list[Path]:
    root = PACKAGE.joinpath(*parts)
    return sorted(root.rglob("*.py")) if root.is_dir() else [root]


def violations(files: list[Path], forbidden: tuple[str, ...]) -> list[str]:
    found = []
    for path in files:
        for name in sorted(imported_modules(path)):
            if any(name == f or name.startswith(f + ".") for f in forbidden):
                where = path.relative_to(PACKAGE.parent) if path.is_relative_to(PACKAGE) else path
                found.append(f"{where} imports {name}")
    return found


RULES = {
    "continual": (layer_files("continual"),
                  ("metajax.train", "metajax.presets", "metajax.nn", "metajax.data",
                   "metajax.cli")),
    "meta": (layer_files("meta") + layer_files("inner.py"),
             ("metajax.train", "metajax.presets", "metajax.data", "metajax.nn", "metajax.cli")),
    "data": (layer_files("data"),
             ("metajax.continual", "metajax.meta", "metajax.train", "metajax.presets",
              "metajax.cli")),
    "nn": (layer_files("nn"),
           ("metajax.continual", "metajax.meta", "metajax.train", "metajax.presets",
            "metajax.data", "metajax.cli")),
    "shared": (layer_files("types.py") + layer_files("task_map.py") + layer_files("_tree.py")
               + layer_files("_checks.py") + layer_files("_files.py")
               + layer_files("evaluation.py"),
              ("metajax.continual", "metajax.meta", "metajax.train", "metajax.presets",
               "metajax.data", "metajax.nn", "metajax.cli")),
}


@pytest.mark.parametrize("layer", sorted(RULES))
def test_layer_imports_only_downwards(layer):
    files, forbidden = RULES[layer]
    assert files, f"no files found for layer {layer}"
    assert violations(files, forbidden) == []


def test_train_knows_no_continual_learner():
    forbidden = tuple(f"metajax.continual.{m}" for m in CONTINUAL_LEARNER_MODULES)
    assert violations(layer_files("train"), (*forbidden, "metajax.presets", "metajax.cli")) == []


def test_train_knows_no_meta_learner_model_or_data_set():
    assert violations(layer_files("train"),
                      ("metajax.meta", "metajax.nn", "metajax.data", "metajax.presets")) == []


def test_the_import_reader_sees_function_level_imports(tmp_path):
    source = tmp_path / "module.py"
    source.write_text("def f():\n    from metajax.data import streams\n    import metajax.nn\n")
    assert imported_modules(source) == {"metajax.data", "metajax.data.streams", "metajax.nn"}
    assert violations([source], ("metajax.nn",))


@pytest.mark.parametrize("name", sorted(build_continual.LEARNERS))
def test_every_registered_learner_has_a_preset_a_note_and_a_contract_test(name):
    presets = [c for c, _ in continual_presets.CONTINUAL_PRESETS.values() if c.learner == name]
    assert presets, f"no continual preset uses learner {name!r}"
    assert name in continual_presets._NOTES, f"learner {name!r} has no preset note"
    assert name in test_cl_learners.LEARNERS, f"learner {name!r} has no contract test"


def test_registries_are_the_configuration_choices():
    config = continual_presets.ContinualConfig()
    assert set(build_continual.LEARNERS) == set(continual_presets._NOTES)
    for field, registry in (("learner", build_continual.LEARNERS),
                            ("model", build_continual.MODELS)):
        for name in registry:
            continual_presets.ContinualConfig(**{field: name, "benchmark": (
                "split_omniglot" if name == "conv4" else config.benchmark)}).validate()


@pytest.mark.parametrize("name", sorted(build.LEARNERS))
def test_every_registered_meta_learner_has_a_preset_and_a_contract_test(name):
    assert any(config.algorithm == name for config, _ in PRESETS.values()), (
        f"no preset uses algorithm {name!r}")
    assert name in test_task_map.LEARNERS, f"algorithm {name!r} has no task-map contract test"
