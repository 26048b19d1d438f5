"""What each preset follows, in one line, and the figures its paper reports.

:func:`source_line` gives a preset's source as ``metajax presets`` lists it (the paper and,
where the settings come from released code, the script). :data:`PUBLISHED` maps a preset to
the figures the paper it follows reports for that setting, as :class:`Published` records:
which paper and table, what was measured, the value and its reported spread. Presets whose
paper reports no figure for their setting (our protocols, or settings the paper does not
tabulate) have no entry. A figure is measured under its paper's own protocol: a preset's
note says where the preset differs from it.
"""

from __future__ import annotations

from typing import NamedTuple

from metajax.presets import PRESETS
from metajax.presets.continual import CONTINUAL_PRESETS


class Published(NamedTuple):
    """One figure a paper reports for the setting a preset follows.

    Attributes:
      paper: authors, year and method, e.g. ``"Finn et al. 2017 (MAML)"``.
      table: where in the paper, e.g. ``"Table 1"``.
      metric: what was measured, e.g. ``"5-way 1-shot test accuracy (%)"``.
      value: the reported value.
      spread: the reported ``+/-`` (MAML's Table 1: 95% confidence intervals), or None.
      note: how the paper's protocol differs from the preset's, when it does.
    """

    paper: str
    table: str
    metric: str
    value: float
    spread: float | None = None
    note: str = ""

    def describe(self) -> str:
        """``paper, table: metric = value +/- spread (note)`` on one line."""
        value = f"{self.value:g}" + (f" +/- {self.spread:g}" if self.spread is not None else "")
        note = f" ({self.note})" if self.note else ""
        return f"{self.paper}, {self.table}: {self.metric} = {value}{note}"

    def to_dict(self) -> dict:
        """The record as a JSON-ready dict."""
        return self._asdict()


_MAML = "Finn et al. 2017 (MAML)"
_IMAML = "Rajeswaran et al. 2019 (iMAML)"
_METASGD = "Li et al. 2017 (Meta-SGD)"

# Finn et al. 2017, Table 1 (Omniglot and MiniImagenet; +/- are 95% confidence intervals).
_MAML_TABLE = {
    "maml": {
        ("omniglot", 5, 1): (98.7, 0.4), ("omniglot", 5, 5): (99.9, 0.1),
        ("omniglot", 20, 1): (95.8, 0.3), ("omniglot", 20, 5): (98.9, 0.2),
        ("miniimagenet", 5, 1): (48.70, 1.84), ("miniimagenet", 5, 5): (63.11, 0.92),
    },
    "fomaml": {  # the table's "MAML (first order approx.)" rows
        ("omniglot", 5, 1): (98.3, 0.5), ("omniglot", 5, 5): (99.2, 0.2),
        ("omniglot", 20, 1): (89.4, 0.5), ("omniglot", 20, 5): (97.9, 0.1),
        ("miniimagenet", 5, 1): (48.07, 1.75), ("miniimagenet", 5, 5): (63.15, 0.91),
    },
}
# Li et al. 2017, Table 1; Meta-SGD's own training protocol, not MAML's settings.
_METASGD_TABLE = {
    ("omniglot", 5, 1): (99.53, 0.26), ("omniglot", 5, 5): (99.93, 0.09),
    ("omniglot", 20, 1): (95.93, 0.38), ("omniglot", 20, 5): (98.97, 0.19),
    ("miniimagenet", 5, 1): (50.47, 1.87), ("miniimagenet", 5, 5): (64.03, 0.94),
}
# Nichol et al. 2018's Omniglot figures as Rajeswaran et al. 2019, Table 2, quotes them.
_REPTILE_TABLE = {
    ("omniglot", 5, 1): (97.68, 0.04), ("omniglot", 5, 5): (99.48, 0.06),
    ("omniglot", 20, 1): (89.43, 0.14), ("omniglot", 20, 5): (97.12, 0.32),
}


def _few_shot_published() -> dict[str, tuple[Published, ...]]:
    out: dict[str, tuple[Published, ...]] = {}
    for name, (config, _) in PRESETS.items():
        if config.dataset == "sinusoid":
            continue
        key = (config.dataset, config.ways, config.shots)
        metric = f"{config.ways}-way {config.shots}-shot test accuracy (%)"
        table = {"maml": _MAML_TABLE["maml"], "fomaml": _MAML_TABLE["fomaml"]}.get(
            config.algorithm, {})
        if key in table:
            value, spread = table[key]
            out[name] = (Published(_MAML, "Table 1", metric, value, spread),)
        elif config.algorithm == "metasgd" and key in _METASGD_TABLE:
            value, spread = _METASGD_TABLE[key]
            out[name] = (Published(_METASGD, "Table 1", metric, value, spread,
                                   "Meta-SGD's own training settings; this preset runs "
                                   "MAML's"),)
        elif config.algorithm == "reptile" and key in _REPTILE_TABLE:
            value, spread = _REPTILE_TABLE[key]
            out[name] = (Published("Nichol et al. 2018 (Reptile)",
                                   "quoted in Rajeswaran et al. 2019, Table 2", metric, value,
                                   spread, "Reptile's own protocol, which this preset does "
                                   "not reproduce"),)
    for name in ("omniglot-5w1s-imaml", "omniglot-5w1s-imaml-released"):
        out[name] = (Published(_IMAML, "Table 2", "5-way 1-shot test accuracy (%)", 99.16,
                               0.35, "iMAML, GD"),)
    out["omniglot-20w1s-imaml"] = (Published(_IMAML, "Table 2",
                                             "20-way 1-shot test accuracy (%)", 94.46, 0.42,
                                             "iMAML, GD"),)
    for name in ("omniglot-20w1s-mamlpp", "omniglot-20w1s-mamlpp-strided"):
        out[name] = (Published("Antoniou et al. 2019 (MAML++)", "Omniglot results",
                               "20-way 1-shot test accuracy (%)", 97.65, 0.05),)
    for name in ("omniglot-5w1s-mamlpp", "omniglot-5w1s-mamlpp-strided"):
        out[name] = (Published("Antoniou et al. 2019 (MAML++)", "Omniglot results",
                               "5-way 1-shot test accuracy (%)", 99.47,
                               note="as the paper's results are listed by paperswithcode; "
                                    "not checked against the paper's table here"),)
    return out




def _sinusoid(note: str) -> tuple[Published, ...]:
    return tuple(
        Published(_MAML, "Appendix C", f"sinusoid MSE, K=5 fine-tuning, {steps} step(s)",
                  value, note=note)
        for steps, value in ((1, 0.67), (5, 0.38), (10, 0.35))
    )


PUBLISHED: dict[str, tuple[Published, ...]] = {
    "sinusoid-maml": _sinusoid("the paper's K=5 model, sinusoid-maml-5shot's setting; as "
                               "benchmarks/RESULTS.md quotes it"),
    "sinusoid-maml-5shot": _sinusoid("as benchmarks/RESULTS.md quotes it"),
    **_few_shot_published(),
    "agem-pmnist-agem": (
        Published("Chaudhry et al. 2019 (A-GEM)", "MNIST results",
                  "average accuracy after the last task (%)", 89.1,
                  note="as benchmarks/RESULTS.md quotes it"),
        Published("Chaudhry et al. 2019 (A-GEM)", "MNIST results", "forgetting", 0.06,
                  note="as benchmarks/RESULTS.md quotes it"),
    ),
}
"""Published figures by preset name (meta-learning and continual); a preset without an entry
has no figure recorded here."""

_ALGORITHM_SOURCES = {
    "maml": "Finn et al. 2017 (MAML)",
    "fomaml": "Finn et al. 2017 (first-order MAML)",
    "anil": "Raghu et al. 2020, MAML's settings",
    "metasgd": "Li et al. 2017, MAML's settings",
    "reptile": "Nichol et al. 2018, MAML's inner lr",
    "imaml": "Rajeswaran et al. 2019 (iMAML)",
    "mamlpp": "Antoniou et al. 2019, released config",
}


def source_line(name: str) -> str:
    """One line (at most 45 characters) saying which paper or code preset ``name`` follows;
    the preset's note says how, and where it differs."""
    if name in PRESETS:
        config = PRESETS[name][0]
        if name == "sinusoid-imaml":
            return "Rajeswaran et al. 2019, our sinusoid setup"
        if name.endswith("-imaml-released"):
            return "Rajeswaran et al. 2019, released code"
        if name.endswith("-mamlpp-strided"):
            return "Antoniou et al. 2019 on MAML's Conv4"
        return _ALGORITHM_SOURCES.get(config.algorithm, config.algorithm)
    if name not in CONTINUAL_PRESETS:
        raise KeyError(name)
    config = CONTINUAL_PRESETS[name][0]
    if config.benchmark == "split_omniglot":
        return "our protocol, rot-mnist's learner settings"
    if config.benchmark.startswith("agem_"):
        if config.learner in ("agem", "finetune"):
            return "Chaudhry et al. 2019, released code"
        return "Chaudhry et al. 2019 protocol, our rates"
    if config.learner in ("lamaml", "sync", "cmaml"):
        return "Gupta et al. 2020, run_experiments.sh"
    if config.learner == "mer":
        return "Riemer et al. 2019, mer_examples.sh"
    return "Gupta et al. 2020 protocol, our rates"


def dataset_label(name: str) -> str:
    """The data a preset runs on, as a short label (``omniglot``, ``rot-MNIST``, ...)."""
    if name in PRESETS:
        return PRESETS[name][0].dataset
    return {
        "lamaml_rotated_mnist": "rot-MNIST",
        "lamaml_permuted_mnist": "perm-MNIST",
        "lamaml_many_permutations": "many-perm-MNIST",
        "agem_permuted_mnist": "perm-MNIST",
        "split_omniglot": "split-Omniglot",
    }.get(CONTINUAL_PRESETS[name][0].benchmark, CONTINUAL_PRESETS[name][0].benchmark)
