"""Continual-learning metrics against accuracy matrices worked out by hand."""

import jax.numpy as jnp
import numpy as np
import pytest

from metajax.continual import metrics, metrics_over_seeds

# Row i: accuracies after training on task i; column j: accuracy on task j.
R = [
    [0.90, 0.10, 0.20],
    [0.95, 0.80, 0.30],
    [0.60, 0.50, 0.90],
]
# ACC  = (0.60 + 0.50 + 0.90) / 3                      = 2.00 / 3  = 0.666667
# BWT  = ((0.60 - 0.90) + (0.50 - 0.80)) / 2            = -0.60 / 2 = -0.30
# Forgetting since learned = ((0.90 - 0.60) + (0.80 - 0.50)) / 2      =  0.30  (= -BWT)
# A-GEM forgetting: task 0 peaked at 0.95 (after task 1), task 1 at 0.80:
#   ((0.95 - 0.60) + (0.80 - 0.50)) / 2 = (0.35 + 0.30) / 2             =  0.325
# FWT with b = [0.10, 0.20, 0.25]: ((R[0,1] - b1) + (R[1,2] - b2)) / 2
#   = ((0.10 - 0.20) + (0.30 - 0.25)) / 2 = (-0.10 + 0.05) / 2          = -0.025
# GEM's and La-MAML's scripts divide the same sums by T = 3 instead of T - 1 = 2:
#   BWT over T = -0.60 / 3 = -0.2;  FWT over T = -0.05 / 3 = -0.016667
RANDOM_INIT = [0.10, 0.20, 0.25]
# LCA curve [T=3, beta+1=3]: Z_0 = (0.1+0.2+0.0)/3 = 0.1, Z_1 = (0.5+0.6+0.4)/3 = 0.5,
# Z_2 = (0.7+0.8+0.9)/3 = 0.8;  LCA_2 = (0.1 + 0.5 + 0.8) / 3 = 1.4 / 3 = 0.466667
CURVE = [
    [0.1, 0.5, 0.7],
    [0.2, 0.6, 0.8],
    [0.0, 0.4, 0.9],
]


def test_metrics_by_hand():
    out = metrics(R, random_init_acc=RANDOM_INIT, lca_curve=CURVE)
    assert out == pytest.approx(
        {
            "avg_accuracy": 2.0 / 3,
            "bwt": -0.30,
            "bwt_over_T": -0.2,
            "forgetting": 0.325,
            "forgetting_since_learned": 0.30,
            "fwt": -0.025,
            "fwt_over_T": -0.05 / 3,
            "lca": 1.4 / 3,
        }
    )
    assert all(type(value) is float for value in out.values())


def test_agem_forgetting_takes_the_best_accuracy_before_the_last_task():
    # Task 1 was at 0.85 before it was even trained (after task 0) and at 0.70 after it:
    # A-GEM's max runs over all stages l < T-1, so f_1 = 0.85 - 0.40 = 0.45; f_0 = 0.8 - 0.8
    # = 0 (no drop). Forgetting = (0 + 0.45) / 2 = 0.225. Since learned: f_1 = 0.70 - 0.40
    # = 0.30, f_0 = 0: (0 + 0.30) / 2 = 0.15; BWT = -0.15. ACC = (0.8 + 0.4 + 0.6) / 3 = 0.6.
    out = metrics(
        [
            [0.80, 0.85, 0.10],
            [0.60, 0.70, 0.20],
            [0.80, 0.40, 0.60],
        ]
    )
    assert out == pytest.approx(
        {
            "avg_accuracy": 0.6,
            "bwt": -0.15,
            "bwt_over_T": -0.1,
            "forgetting": 0.225,
            "forgetting_since_learned": 0.15,
        }
    )


def test_positive_backward_transfer_and_jax_input():
    # Later tasks helped task 0: BWT = ((0.9 - 0.5) + (0.7 - 0.7)) / 2 = 0.2; nothing was
    # forgotten by A-GEM's measure (0.9 is its best: max(0.5, 0.6) - 0.9 = -0.3 for task 0,
    # 0.7 - 0.7 = 0 for task 1), so forgetting = -0.15, a gain.
    out = metrics(jnp.array([[0.5, 0.1, 0.1], [0.6, 0.7, 0.1], [0.9, 0.7, 0.8]]))
    assert out["bwt"] == pytest.approx(0.2)
    assert out["forgetting"] == pytest.approx(-0.15)
    assert out["forgetting_since_learned"] == pytest.approx(-0.2)
    assert out["avg_accuracy"] == pytest.approx(0.8)


def test_a_single_task_has_no_transfer_or_forgetting():
    out = metrics([[0.7]], random_init_acc=[0.1], lca_curve=[[0.1, 0.5]])
    assert out == pytest.approx({"avg_accuracy": 0.7, "lca": 0.3})


def test_metrics_reject_bad_inputs_with_the_fix():
    with pytest.raises(ValueError, match=r"square \[T, T\].*\(2, 3\)"):
        metrics(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="divide by 100"):
        metrics([[90.0, 10.0], [80.0, 85.0]])
    with pytest.raises(ValueError, match="finite"):
        metrics([[0.9, np.nan], [0.8, 0.85]])
    with pytest.raises(ValueError, match=r"random_init_acc must have shape \[T=3\]"):
        metrics(R, random_init_acc=[0.1, 0.2])
    with pytest.raises(ValueError, match=r"lca_curve must have shape \[T=3, beta \+ 1\]"):
        metrics(R, lca_curve=[[0.1, 0.2]])
    with pytest.raises(ValueError, match=r"lca_curve must hold accuracies in \[0, 1\]"):
        metrics(R, lca_curve=np.full((3, 2), 1.5))


def test_gem_scripts_average_over_all_tasks():
    # GEM's confusion_matrix: bwt = R[T-1] - diag (0 for the last task), fwt = zeros(T)
    # filled from task 1, both .mean() over T entries; T = 4 here.
    Rm = np.array([[0.8, 0.2, 0.1, 0.3],
                   [0.6, 0.9, 0.4, 0.1],
                   [0.5, 0.7, 0.9, 0.2],
                   [0.4, 0.6, 0.8, 0.7]])
    b = np.array([0.1, 0.1, 0.2, 0.1])
    out = metrics(Rm, random_init_acc=b)
    gem_bwt = np.mean(Rm[-1] - np.diag(Rm))  # (-0.4 - 0.3 - 0.1 + 0) / 4 = -0.2
    gem_fwt = np.mean([0.0] + [Rm[t - 1, t] - b[t] for t in range(1, 4)])  # 0.4 / 4 = 0.1
    assert gem_bwt == pytest.approx(-0.2) and gem_fwt == pytest.approx(0.1)
    assert out["bwt_over_T"] == pytest.approx(gem_bwt)
    assert out["fwt_over_T"] == pytest.approx(gem_fwt)
    assert out["bwt"] == pytest.approx(-0.8 / 3) and out["fwt"] == pytest.approx(0.4 / 3)
    assert out["bwt_over_T"] == pytest.approx(3 / 4 * out["bwt"])


def test_metrics_over_seeds_mean_of_runs_and_of_the_mean_matrix():
    # Task 0 peaks at 0.9 in both runs, but at different stages: each run forgets 0.4 of it;
    # the averaged column [0.75, 0.75, 0.5] peaks at 0.75 and forgets only 0.25 (A-GEM's
    # compute_fgt(runs.mean(0))). Task 1 forgets 0.1 in both.
    Ra = [[0.9, 0.1, 0.1], [0.6, 0.8, 0.1], [0.5, 0.7, 0.9]]
    Rb = [[0.6, 0.1, 0.1], [0.9, 0.8, 0.1], [0.5, 0.7, 0.9]]
    out = metrics_over_seeds([Ra, Rb], random_init_acc=[[0.1] * 3, [0.1] * 3],
                             lca_curve=[[[0.1, 0.3]] * 3, [[0.1, 0.5]] * 3])
    assert out["mean"]["forgetting"] == pytest.approx((0.4 + 0.1) / 2)
    assert out["std"]["forgetting"] == pytest.approx(0.0, abs=1e-12)
    assert out["of_mean_matrix"]["forgetting"] == pytest.approx((0.25 + 0.1) / 2)
    # BWT: run a ((0.5-0.9) + (0.7-0.8)) / 2 = -0.25, run b ((0.5-0.6) + (0.7-0.8)) / 2 =
    # -0.1; linear, so the mean matrix gives the mean, -0.175.
    assert out["mean"]["bwt"] == pytest.approx(-0.175)
    assert out["std"]["bwt"] == pytest.approx(0.075)
    assert out["of_mean_matrix"]["bwt"] == pytest.approx(-0.175)
    assert [m["bwt"] for m in out["per_seed"]] == pytest.approx([-0.25, -0.1])
    mean_acc = out["mean"]["avg_accuracy"]
    assert mean_acc == out["of_mean_matrix"]["avg_accuracy"] == pytest.approx(0.7)
    assert out["mean"]["lca"] == pytest.approx(0.25)
    assert out["of_mean_matrix"]["lca"] == pytest.approx(0.25)
    with pytest.raises(ValueError, match=r"\[S, T, T\]"):
        metrics_over_seeds(Ra)
    with pytest.raises(ValueError, match="one entry per run"):
        metrics_over_seeds([Ra, Rb], random_init_acc=[[0.1] * 3])
