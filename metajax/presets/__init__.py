"""Named configurations reproducing published setups.

Each preset documents its source and any difference from it; ``metajax presets`` lists them.
"""

from __future__ import annotations

import dataclasses

from metajax.train.config import Config, ConfigError

_MAML_SINUSOID = Config(
    dataset="sinusoid",
    algorithm="maml",
    shots=10,
    queries=10,
    meta_batch_size=25,
    inner_lr=0.01,
    inner_steps=1,
    outer_lr=1e-3,
    outer_optimizer="adam",
    steps=70_000,
)

PRESETS: dict[str, tuple[Config, str]] = {
    "sinusoid-maml": (
        _MAML_SINUSOID,
        "MAML sinusoid regression (Finn et al. 2017, sec. 5.1): K=10, MLP 1-40-40-1 ReLU, "
        "one inner step alpha=0.01, meta-batch 25, Adam 1e-3, 70,000 meta-steps.",
    ),
    "sinusoid-maml-5shot": (
        dataclasses.replace(_MAML_SINUSOID, shots=5, queries=5),
        "MAML sinusoid regression meta-trained with K=5 (the paper trains one model per K; "
        "its Appendix C figure is 5-point fine-tuning); otherwise as sinusoid-maml.",
    ),
    "sinusoid-fomaml": (
        dataclasses.replace(_MAML_SINUSOID, algorithm="fomaml"),
        "First-order MAML on the sinusoid setting of sinusoid-maml.",
    ),
    "sinusoid-reptile": (
        dataclasses.replace(
            _MAML_SINUSOID,
            algorithm="reptile",
            inner_lr=0.02,
            inner_steps=5,
            outer_lr=0.1,
            outer_optimizer="sgd",
            outer_lr_schedule="linear",
            steps=30_000,
        ),
        "Reptile on sinusoids after Nichol et al. 2018's sine demonstration: inner SGD 0.02, "
        "outer SGD 0.1 decayed linearly to 0, 30,000 meta-steps; differences: 5 full-batch "
        "inner steps on the K=10 support set and a meta-batch of 25 tasks.",
    ),
    "sinusoid-metasgd": (
        dataclasses.replace(_MAML_SINUSOID, algorithm="metasgd"),
        "Meta-SGD (Li et al. 2017) on the MAML sinusoid setting; difference: per-parameter "
        "rates start at alpha=0.01 instead of U[0.005, 0.1].",
    ),
}


def get_preset(name: str) -> Config:
    """The configuration of preset ``name``, or :class:`ConfigError` listing the valid ones."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; valid presets: {', '.join(sorted(PRESETS))}")
    return dataclasses.replace(PRESETS[name][0], preset=name)
