"""Named configurations reproducing published setups.

Each preset documents its source and any difference from it; ``metajax presets`` lists them.
"""

from __future__ import annotations

import dataclasses

from metajax.presets.config import Config
from metajax.train.config import ConfigError

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


# Finn et al. 2017, Appendix A.1 and the reference implementation: Omniglot 5-way trains with
# 1 step of 0.4 (meta-batch 32) and tests with 3 steps; 20-way trains and tests with 5 steps
# of 0.1 (meta-batch 16); mini-ImageNet trains with 5 steps of 0.01 and tests with 10
# (meta-batch 4 for 1-shot, 2 for 5-shot, 15 queries per class); Adam 1e-3, 60,000 meta-steps.
_FEW_SHOT = {
    ("omniglot", 5): dict(meta_batch_size=32, inner_lr=0.4, inner_steps=1, eval_inner_steps=3),
    ("omniglot", 20): dict(meta_batch_size=16, inner_lr=0.1, inner_steps=5, eval_inner_steps=5),
    ("miniimagenet", 5): dict(inner_lr=0.01, inner_steps=5, eval_inner_steps=10, queries=15),
}
_ALGORITHM_NOTES = {
    "maml": "second-order MAML",
    "fomaml": "first-order MAML (same settings as MAML, as in the paper)",
    "anil": "ANIL (Raghu et al. 2020): only the head adapts; MAML's settings, as in that paper",
    "metasgd": "Meta-SGD (Li et al. 2017) on MAML's settings; rates start at the inner lr",
    "reptile": "Reptile (Nichol et al. 2018) with MAML's inner lr, 5 inner SGD steps and outer "
    "SGD 1.0 decayed linearly to 0; the Reptile paper's own protocol (inner Adam, 100k "
    "steps, larger inner batches) is not reproduced",
}


def _few_shot_presets() -> dict[str, tuple[Config, str]]:
    presets = {}
    for (dataset, ways), settings in _FEW_SHOT.items():
        for shots in (1, 5):
            base = Config(
                dataset=dataset, ways=ways, shots=shots, queries=shots,
                # The MAML reference tests Omniglot with as many queries per class as it
                # trains with (update_batch_size * 2 samples: K support, K query); with
                # batch statistics of the current batch the query count changes the network.
                eval_queries=shots if dataset == "omniglot" else 15,
                outer_lr=1e-3, outer_optimizer="adam", steps=60_000, log_every=20,
                eval_every=1_000, eval_tasks=100, split="maml",
            )
            base = dataclasses.replace(base, **settings)
            if dataset == "miniimagenet":
                base = dataclasses.replace(base, meta_batch_size=4 if shots == 1 else 2)
            for algorithm, note in _ALGORITHM_NOTES.items():
                config = dataclasses.replace(base, algorithm=algorithm)
                if algorithm == "reptile":
                    config = dataclasses.replace(
                        config, inner_steps=max(config.inner_steps, 5), outer_optimizer="sgd",
                        outer_lr=1.0, outer_lr_schedule="linear",
                    )
                where = (
                    "Omniglot (MAML protocol: 1,200 training characters with 90-degree "
                    "rotations as classes, 423 test characters; the Conv4 head reads all "
                    "2x2x64 features, where the MAML reference averages the 2x2 positions: "
                    "--set readout=mean for that)"
                    if dataset == "omniglot"
                    else "mini-ImageNet (Ravi-Larochelle split, 32-filter Conv4)"
                )
                name = f"{dataset}-{ways}w{shots}s-{algorithm}"
                presets[name] = (
                    config,
                    f"{note}; {where}, {ways}-way {shots}-shot, meta-batch "
                    f"{config.meta_batch_size}, {config.inner_steps} inner step(s) of "
                    f"{config.inner_lr}, {config.test_inner_steps} at test, "
                    f"{config.steps} meta-steps; {config.eval_queries} query image(s) per "
                    "class at test" + (" as the reference (--set eval_queries=15 for 15)"
                                       if dataset == "omniglot" else "") + ".",
                )
    return presets


PRESETS.update(_few_shot_presets())


def _second_wave_presets() -> dict[str, tuple[Config, str]]:
    omniglot = {(ways, shots): PRESETS[f"omniglot-{ways}w{shots}s-maml"][0]
                for ways in (5, 20) for shots in (1,)}
    released_code = (
        "the authors' released Omniglot code (aravindr93/imaml_dev: "
        "omniglot_implicit_maml.py and measure_accuracy.py)"
    )
    released_backward = (
        "backward system 2u + Hu/12 (cg_damping 1, lam_damping 10, 5 CG steps)"
    )
    return {
        "sinusoid-imaml": (
            dataclasses.replace(_MAML_SINUSOID, algorithm="imaml", inner_steps=10,
                                inner_lr=0.02, lam=1.0, cg_steps=5,
                                inner_solver="backtracking"),
            "iMAML (Rajeswaran et al. 2019) on the sinusoid setting of sinusoid-maml; our "
            "choices (the paper has no sinusoid protocol): lambda 1.0, 10 inner steps of "
            "backtracking descent from 0.02 on the proximal loss (plain steps of 0.02 "
            "diverge on some tasks within 20 meta-steps), 5 undamped CG steps.",
        ),
        "omniglot-5w1s-imaml": (
            dataclasses.replace(omniglot[5, 1], algorithm="imaml", inner_steps=16,
                                eval_inner_steps=16, inner_lr=0.1, lam=2.0, cg_steps=5,
                                cg_damping=1.0, lam_damping=10.0, inner_solver="backtracking"),
            "iMAML (Rajeswaran et al. 2019), the paper's inner problem: Omniglot 5-way 1-shot, "
            "MAML protocol, lambda 2, 16 inner steps of backtracking descent from 0.1 on the "
            "proximal loss (support loss + lambda/2 |phi - theta|^2), evaluated through the "
            f"same proximal solve; {released_backward} as in {released_code}, because CG "
            "does not converge on the paper's undamped u + Hu/lambda with this Conv4 (it is "
            "indefinite: benchmarks/RESULTS.md, iMAML protocols); MAML's meta-batch 32 and "
            "outer Adam 1e-3. Measured: benchmarks/RESULTS.md, Omniglot 5-way 1-shot, iMAML.",
        ),
        "omniglot-5w1s-imaml-released": (
            dataclasses.replace(omniglot[5, 1], algorithm="imaml", inner_steps=16,
                                eval_inner_steps=16, inner_lr=0.1, lam=2.0, cg_steps=5,
                                cg_damping=1.0, lam_damping=10.0, inner_problem="released",
                                eval_lam=0.0, adam_eps=1e-3, weight_init="imaml",
                                norm_eps=1e-5),
            f"iMAML as {released_code}: Omniglot 5-way 1-shot, 16 plain SGD steps of 0.1 on "
            "the support loss, then one step of 0.1 on the proximal term (lambda 2); "
            f"{released_backward}; outer Adam 1e-3 with eps 1e-3, meta-batch 32; evaluation "
            "with lambda 0 (16 free steps of 0.1); the released network's initialisation "
            "(Xavier gain 1.73, biases U(0, 0.05)) and batch-norm eps 1e-5. Differences: "
            "tasks drawn afresh each step (the released code trains on a fixed pool of "
            "5,000), MAML's data split, and no conv biases (batch norm cancels them).",
        ),
        "omniglot-20w1s-imaml": (
            dataclasses.replace(omniglot[20, 1], algorithm="imaml", inner_steps=25,
                                eval_inner_steps=25, inner_lr=0.1, lam=2.0, cg_steps=5,
                                cg_damping=1.0, lam_damping=10.0, inner_solver="backtracking"),
            "iMAML (Rajeswaran et al. 2019) Omniglot 20-way 1-shot, MAML protocol: lambda 2, "
            "25 inner steps of backtracking descent from 0.1 on the proximal loss, "
            f"{released_backward} as in {released_code}, MAML's meta-batch 16 and outer Adam "
            "1e-3. Not yet measured.",
        ),
        **{
            f"omniglot-{ways}w1s-mamlpp": (
                dataclasses.replace(
                    omniglot[ways, 1], algorithm="mamlpp", inner_steps=5, eval_inner_steps=5,
                    inner_lr=0.1, outer_lr_schedule="cosine", meta_batch_size=8,
                    steps=50_000, iters_per_epoch=500, msl_anneal_epochs=10,
                    first_order_epochs=0, msl=True, lslr=True, bnwb=True, pooling=True,
                    norm_eps=1e-5,
                ),
                f"MAML++ (Antoniou et al. 2019) Omniglot {ways}-way 1-shot as the authors' "
                f"released config (omniglot_maml++-omniglot_1_8_0.1_64_{ways}_0.json): "
                "stride-1 3x3 convs with 2x2 max-pooling, 64 filters, batch-norm eps 1e-5; "
                "meta-batch 8, 1 query per class; 5 inner steps with learnable per-layer "
                "per-step rates from 0.1; multi-step loss annealed over 10 epochs of 500 "
                "steps, then the final step's loss only; second order throughout (the "
                "released first_order_to_second_order_epoch is -1; the paper describes "
                "first order for 50 epochs: --set first_order_epochs=50); per-step "
                "batch-norm scale and bias, never adapted in the inner loop; Adam 1e-3 "
                "cosine-annealed to 1e-5 over 100 epochs (50,000 steps). Differences: no "
                "per-step running statistics (the reference normalises with batch "
                "statistics, so they do not change its outputs); MAML's character split "
                "(1,200 training characters) instead of the reference's fractional split; "
                "MAML's test queries (as many as training's, the reference's 1).",
            )
            for ways in (5, 20)
        },
        **{
            f"omniglot-{ways}w1s-mamlpp-strided": (
                dataclasses.replace(
                    omniglot[ways, 1], algorithm="mamlpp", inner_steps=5, eval_inner_steps=5,
                    inner_lr=0.1, outer_lr_schedule="cosine", steps=75_000,
                    iters_per_epoch=500, msl_anneal_epochs=10, first_order_epochs=50,
                    msl=True, lslr=True, bnwb=True,
                ),
                f"MAML++'s switches on MAML's Omniglot {ways}-way 1-shot setting (stride-2 "
                f"Conv4, meta-batch {omniglot[ways, 1].meta_batch_size}, batch-norm eps "
                "1e-3), with the paper's derivative-order annealing (first order for 50 "
                "epochs of 500 steps) and 150 epochs; otherwise as "
                f"omniglot-{ways}w1s-mamlpp.",
            )
            for ways in (5, 20)
        },
    }


PRESETS.update(_second_wave_presets())


def get_preset(name: str) -> Config:
    """The configuration of preset ``name``, or :class:`ConfigError` listing the valid ones."""
    if name not in PRESETS:
        from metajax.presets.continual import CONTINUAL_PRESETS

        if name in CONTINUAL_PRESETS:
            raise ConfigError(f"{name!r} is a continual preset: run `metajax continual {name}`")
        raise ConfigError(f"unknown preset {name!r}; valid presets: {', '.join(sorted(PRESETS))}"
                          + _suggest(name, PRESETS))
    return dataclasses.replace(PRESETS[name][0], preset=name)


def _suggest(name: str, names) -> str:
    """``"; did you mean 'x'?"`` naming the presets closest to ``name``, or ``""``."""
    import difflib

    close = difflib.get_close_matches(name, sorted(names), n=3, cutoff=0.6)
    return f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
