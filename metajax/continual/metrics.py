"""Continual-learning metrics from the accuracy matrix.

``R [T, T]`` holds ``R[i, j]``, the test accuracy on task ``j`` after training on tasks
``0 .. i`` (rows: training stages, columns: evaluated tasks); accuracies are fractions in
``[0, 1]``. Indices below are 0-based, so the last stage is ``T - 1``.

- ACC, average accuracy (Lopez-Paz and Ranzato, 2017, "Gradient Episodic Memory for
  Continual Learning"; Chaudhry et al., 2019, "Efficient Lifelong Learning with A-GEM"):
  ``ACC = 1/T sum_j R[T-1, j]``, key ``"avg_accuracy"`` here, in ``metajax continual``'s
  summary and in ``metrics.json``. La-MAML's retained accuracy RA (Gupta et al., 2020,
  "La-MAML: Look-ahead Meta Learning for Continual Learning") is the same number.
- BWT, backward transfer (GEM): ``BWT = 1/(T-1) sum_{j<T-1} (R[T-1, j] - R[j, j])``;
  negative when learning later tasks hurt earlier ones. La-MAML's backward transfer and
  interference BTI is the same quantity (its script averages it over ``T``, see below);
  one key, ``"bwt"``, holds it.
- FWT, forward transfer (GEM): ``FWT = 1/(T-1) sum_{j>0} (R[j-1, j] - b_j)`` with ``b_j``
  the accuracy on task ``j`` of the model at its random initialisation.
- Forgetting (A-GEM; Chaudhry et al., 2018, "Riemannian Walk for Incremental Learning"):
  ``f_j = max_{l<T-1} R[l, j] - R[T-1, j]``, the drop from the best accuracy task ``j``
  ever had to its final one, averaged over ``j < T-1``.
- Forgetting since learned: ``R[j, j] - R[T-1, j]``, the drop from the accuracy right after
  training on task ``j``, averaged over ``j < T-1``; it equals ``-BWT``. Papers that write
  just "forgetting" mean one or the other; the keys below keep them apart.
- LCA, learning curve area (A-GEM): ``LCA_beta = 1/(beta+1) sum_{b=0..beta} Z_b``
  with ``Z_b = 1/T sum_k a_{k,b,k}``, the accuracy on task ``k`` after ``b`` mini-batches
  of training on it, averaged over tasks; it measures how fast new tasks are learned.

Two conventions for BWT and FWT. ``bwt`` and ``fwt`` average over the ``T - 1`` tasks for
which the quantity exists, as in the papers' equations. GEM's reference script
(``metrics/metrics.py``, ``confusion_matrix``: ``bwt = result[T-1] - diag`` and
``fwt = zeros(T)`` filled from task 1, then ``.mean()``) averages over all ``T`` tasks,
counting a ``0`` for the last (BWT) or first (FWT) one, and La-MAML's script copies it, so
the BWT/BTI and FWT those papers publish are ``(T-1)/T`` times ``bwt`` and ``fwt``; they are
reported too, as ``bwt_over_T`` and ``fwt_over_T``, to compare like with like.

Over several runs (:func:`metrics_over_seeds`), each run's metrics are averaged, as A-GEM's
published tables are (their plotting notebook, ``average_fgt_stats_across_runs``). A-GEM's
``fc_permute_mnist.py`` also prints ``compute_fgt(runs.mean(0))`` in its cross-validation
mode, the forgetting of the run-averaged matrix; as the maximum of averages is at most the
average of maxima, that one is never larger. ACC, BWT and FWT are linear in ``R`` and the
same either way.
"""

from __future__ import annotations

import numpy as np


def _as_accuracies(name: str, values, shape_text: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} must be finite, got {array}")
    if array.size and (array.min() < 0.0 or array.max() > 1.0):
        hint = " (percentages? divide by 100)" if array.max() <= 100.0 else ""
        raise ValueError(
            f"{name} must hold accuracies in [0, 1], got values in "
            f"[{array.min():g}, {array.max():g}]{hint}; shape should be {shape_text}"
        )
    return array


def metrics(acc_matrix, *, random_init_acc=None, lca_curve=None) -> dict[str, float]:
    """ACC/RA, BWT/BTI, both forgettings, and optionally FWT and LCA, from ``R [T, T]``.

    The definitions, with their papers, are in this module's docstring.

    Args:
      acc_matrix: ``R [T, T]`` (numpy, jax or nested lists), ``R[i, j]`` the accuracy on task
        ``j`` after training on task ``i``, in ``[0, 1]``. FWT reads the entries just above
        the diagonal, so they must be evaluated when ``random_init_acc`` is given.
      random_init_acc: optional ``b [T]``, the accuracy on each task of the randomly
        initialised model before any training; adds ``"fwt"``.
      lca_curve: optional ``[T, beta + 1]``, entry ``[k, b]`` the accuracy on task ``k``
        after ``b`` mini-batches of training on task ``k`` (column 0: before any); adds
        ``"lca"``, ``LCA_beta`` with ``beta`` the number of columns minus one.

    Returns:
      A dict of Python floats: ``"avg_accuracy"`` (ACC; La-MAML's RA), and when ``T >= 2``
      ``"bwt"`` (La-MAML's BTI), ``"bwt_over_T"`` (GEM's and La-MAML's scripts'
      average over all ``T`` tasks, ``(T-1)/T * bwt``), ``"forgetting"`` (A-GEM's, from the
      best earlier accuracy) and ``"forgetting_since_learned"`` (from ``R[j, j]``,
      ``= -bwt``); plus ``"fwt"`` and ``"fwt_over_T"`` (``T >= 2``) and ``"lca"`` when their
      inputs are given. Quantities that average over the ``T - 1`` earlier tasks are left
      out for ``T = 1``, where they are undefined.
    """
    R = _as_accuracies("acc_matrix", acc_matrix, "[T, T]")
    if R.ndim != 2 or R.shape[0] != R.shape[1] or R.shape[0] == 0:
        raise ValueError(
            f"acc_matrix must be a non-empty square [T, T] matrix (row i: after training task "
            f"i; column j: accuracy on task j), got shape {R.shape}"
        )
    T = R.shape[0]
    final = R[T - 1]
    out = {"avg_accuracy": float(final.mean())}
    if T >= 2:
        earlier = np.arange(T - 1)
        drop_since_learned = R[earlier, earlier] - final[:-1]
        best_before_last = R[: T - 1, : T - 1].max(axis=0)
        out["bwt"] = float(-drop_since_learned.mean())
        out["bwt_over_T"] = float(-drop_since_learned.sum() / T)
        out["forgetting"] = float((best_before_last - final[:-1]).mean())
        out["forgetting_since_learned"] = float(drop_since_learned.mean())
    if random_init_acc is not None:
        b = _as_accuracies("random_init_acc", random_init_acc, f"[T={T}]")
        if b.shape != (T,):
            raise ValueError(
                f"random_init_acc must have shape [T={T}] (one accuracy per task), got {b.shape}"
            )
        if T >= 2:
            later = np.arange(1, T)
            transfer = R[later - 1, later] - b[later]
            out["fwt"] = float(transfer.mean())
            out["fwt_over_T"] = float(transfer.sum() / T)
    if lca_curve is not None:
        curve = _as_accuracies("lca_curve", lca_curve, f"[T={T}, beta + 1]")
        if curve.ndim != 2 or curve.shape[0] != T or curve.shape[1] == 0:
            raise ValueError(
                f"lca_curve must have shape [T={T}, beta + 1] (per task, the accuracy after "
                f"0 .. beta mini-batches), got {curve.shape}"
            )
        # Z_b averages column b over tasks; LCA averages Z_0 .. Z_beta.
        out["lca"] = float(curve.mean(axis=0).mean())
    return out


def metrics_over_seeds(acc_matrices, *, random_init_acc=None, lca_curve=None) -> dict:
    """The :func:`metrics` of several runs, both ways of averaging them.

    Args:
      acc_matrices: ``[S, T, T]``, one accuracy matrix per run (seed).
      random_init_acc: optional ``[S, T]``, each run's accuracies at initialisation.
      lca_curve: optional ``[S, T, beta + 1]``, each run's LCA curve.

    Returns:
      A dict with ``"mean"`` and ``"std"`` (each a dict of every metric's mean and standard
      deviation over the runs' own metrics: how the A-GEM, GEM and La-MAML papers report
      ``mean (+/- std)``), ``"per_seed"`` (one :func:`metrics` dict per run) and
      ``"of_mean_matrix"`` (the :func:`metrics` of the run-averaged matrix, curve and
      baseline: A-GEM's ``compute_fgt(runs.mean(0))``). Only ``"forgetting"``, a maximum
      over stages, can differ from ``"mean"`` (it is at most the mean); every other metric
      is linear in the matrix, curve and baseline.
    """
    Rs = _as_accuracies("acc_matrices", acc_matrices, "[S, T, T]")
    if Rs.ndim != 3 or Rs.shape[0] == 0:
        raise ValueError(
            f"acc_matrices must be [S, T, T], one accuracy matrix per run, got shape {Rs.shape}"
        )
    runs = Rs.shape[0]

    def per_run(values, name, shape_text):
        if values is None:
            return [None] * runs, None
        array = _as_accuracies(name, values, shape_text)
        if array.shape[0] != runs:
            raise ValueError(f"{name} must have one entry per run ({runs}), got {array.shape}")
        return list(array), array.mean(axis=0)

    T = Rs.shape[1]
    baselines, mean_baseline = per_run(random_init_acc, "random_init_acc", f"[S={runs}, T={T}]")
    curves, mean_curve = per_run(lca_curve, "lca_curve", f"[S={runs}, T={T}, beta + 1]")
    per_seed = [metrics(R, random_init_acc=b, lca_curve=c)
                for R, b, c in zip(Rs, baselines, curves, strict=True)]
    values = {name: np.array([m[name] for m in per_seed]) for name in per_seed[0]}
    return {
        "mean": {name: float(v.mean()) for name, v in values.items()},
        "std": {name: float(v.std()) for name, v in values.items()},
        "per_seed": per_seed,
        "of_mean_matrix": metrics(Rs.mean(axis=0), random_init_acc=mean_baseline,
                                  lca_curve=mean_curve),
    }
