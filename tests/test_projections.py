"""A-GEM and GEM projections against hand-computed values, the KKT conditions of GEM's QP,
and (when scipy is there) an independent non-negative least-squares solver."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metajax.continual import nnls, project_agem, project_gem
from metajax.continual.projections import past_task_dots

# Compiled once per shape; margin and ridge are traced, so they share a compile. The tests
# reuse a few batched shapes to keep compilation (most of their time) short.
gem = jax.jit(project_gem)
batched_gem = jax.jit(
    jax.vmap(lambda g, G, margin, ridge: project_gem(g, G, margin, ridge=ridge), (0, 0, None, None))
)
batched_nnls = jax.jit(jax.vmap(nnls))
BATCH = 16


def gem_batch(g, G, margin=0.0, ridge=0.0):
    """``project_gem`` on float32 copies of a batch of problems, back in float64."""
    g, G = jnp.asarray(g, jnp.float32), jnp.asarray(G, jnp.float32)
    return np.asarray(batched_gem(g, G, margin, ridge), np.float64)


def random_problems(seed: int, batch: int, t: int, p: int, correlation: float):
    """``batch`` float64 problems ``(g [batch, p], G [batch, t, p])``; past gradients share a
    common direction (weight ``correlation``, which makes G ill-conditioned) that g opposes."""
    rng = np.random.default_rng(seed)
    common = rng.normal(size=(batch, 1, p))
    G = rng.normal(size=(batch, t, p)) + correlation * common
    g = rng.normal(size=(batch, p)) - 0.5 * correlation * common[:, 0]
    return g, G


def dual_from_primal(g, G, projected):
    """The dual variables v with ``projected - g = G^T v`` (least squares; G has full row
    rank here), and the relative residual of that fit."""
    v, *_ = np.linalg.lstsq(G.T, projected - g, rcond=None)
    residual = np.linalg.norm(G.T @ v - (projected - g)) / np.linalg.norm(g)
    return v, residual


# --- A-GEM ----------------------------------------------------------------------------------


def test_agem_matches_the_formula_by_hand():
    g = jnp.array([1.0, -2.0])
    g_ref = jnp.array([1.0, 1.0])
    # g.g_ref = 1 - 2 = -1 < 0, |g_ref|^2 = 2: g~ = g - (-1 / 2) g_ref = [1.5, -1.5].
    projected = project_agem(g, g_ref)
    np.testing.assert_allclose(projected, [1.5, -1.5], rtol=1e-6)
    assert float(jnp.vdot(projected, g_ref)) == pytest.approx(0.0, abs=1e-6)


def test_agem_on_pytrees_equals_flat_vectors():
    rng = np.random.default_rng(0)
    g = {"w": rng.normal(size=(3, 4)), "b": rng.normal(size=4)}
    g_ref = {"w": -g["w"] + 0.1 * rng.normal(size=(3, 4)), "b": -g["b"]}
    g, g_ref = jax.tree.map(jnp.float32, (g, g_ref))
    flat = project_agem(
        jnp.concatenate([g["b"], g["w"].ravel()]),
        jnp.concatenate([g_ref["b"], g_ref["w"].ravel()]),
    )
    tree = project_agem(g, g_ref)
    np.testing.assert_allclose(
        jnp.concatenate([tree["b"], tree["w"].ravel()]), flat, rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("g_ref", [[2.0, 1.0], [0.0, 3.0]])
def test_agem_leaves_g_alone_when_it_agrees_with_the_reference(g_ref):
    # g.g_ref = 4 > 0 for the first, 0 (orthogonal) for the second: no projection.
    g = jnp.array([2.0, 0.0])
    np.testing.assert_array_equal(project_agem(g, jnp.array(g_ref)), g)


def test_agem_with_a_zero_reference_is_the_identity_with_finite_derivatives():
    g = jnp.array([1.0, -2.0, 3.0])
    np.testing.assert_array_equal(project_agem(g, jnp.zeros(3)), g)
    jacobian = jax.jacobian(lambda r: project_agem(g, r))(jnp.zeros(3))
    assert np.all(np.isfinite(jacobian))


def test_agem_rejects_mismatched_trees():
    with pytest.raises(ValueError, match="shape"):
        project_agem(jnp.zeros(3), jnp.zeros(4))
    with pytest.raises(ValueError, match="structure"):
        project_agem({"a": jnp.zeros(3)}, jnp.zeros(3))


# --- GEM: hand-made cases -------------------------------------------------------------------


def test_gem_by_hand_in_two_dimensions():
    # One constraint z2 >= 0 (the zero second row constrains nothing): [1, -1] -> [1, 0].
    half_plane = jnp.array([[0.0, 1.0], [0.0, 0.0]])
    np.testing.assert_allclose(gem(jnp.array([1.0, -1.0]), half_plane), [1, 0], atol=1e-6)
    # Constraints z1 >= 0 and z2 >= 0 (the positive quadrant): [-1, -1] goes to the origin,
    # [2, -1] to [2, 0] (only the second constraint is active, its dual variable is 1).
    quadrant = jnp.eye(2)
    np.testing.assert_allclose(gem(jnp.array([-1.0, -1.0]), quadrant), 0.0, atol=1e-6)
    np.testing.assert_allclose(gem(jnp.array([2.0, -1.0]), quadrant), [2, 0], atol=1e-6)


def test_gem_with_one_past_task_is_agem():
    g, G = random_problems(1, BATCH, 1, 50, 1.0)
    assert np.sum(np.einsum("bp,bp->b", g, G[:, 0]) < 0) >= 8
    expected = jax.vmap(project_agem)(
        jnp.asarray(g, jnp.float32), jnp.asarray(G[:, 0], jnp.float32)
    )
    np.testing.assert_allclose(gem_batch(g, G), expected, atol=1e-5)


def test_gem_is_a_no_op_when_no_constraint_is_violated():
    _, G = random_problems(2, BATCH, 3, 120, 0.0)
    g = G.sum(axis=1) + 0.01 * random_problems(3, BATCH, 3, 120, 0.0)[0]
    assert np.all(np.einsum("btp,bp->bt", G, g) >= 0)
    expected = np.asarray(jnp.asarray(g, jnp.float32), np.float64)
    np.testing.assert_array_equal(gem_batch(g, G), expected)
    # GEM's reference projects only on a violation, so the margin changes nothing here.
    np.testing.assert_array_equal(gem_batch(g, G, margin=0.5), expected)


def test_gem_ignores_zero_rows():
    g, G = random_problems(4, BATCH, 3, 120, 0.0)
    padded = np.concatenate([G, np.zeros((BATCH, 7, 120))], axis=1)
    for margin in [0.0, 0.3]:
        np.testing.assert_allclose(gem_batch(g, padded, margin), gem_batch(g, G, margin), atol=1e-5)


@pytest.mark.parametrize("used", [0, 1, 3, 5, 7])
def test_gem_on_the_used_rows_equals_the_full_solve(used):
    # t = 7 rows, those from `used` on zero: the solve on the first rows (rounded up to the
    # sizes 0-4, 6, 7) equals the one on all rows, for a traced and for a Python `used`.
    t, p = 7, 120
    g, G = random_problems(20 + used, BATCH, t, p, 1.0)
    G[:, used:] = 0.0
    g32, G32 = jnp.asarray(g, jnp.float32), jnp.asarray(G, jnp.float32)
    on_rows = jax.jit(jax.vmap(lambda g, G, used: project_gem(g, G, 0.3, used_rows=used),
                               (0, 0, None)))
    full = np.asarray(jax.vmap(lambda g, G: project_gem(g, G, 0.3))(g32, G32), np.float64)
    traced = np.asarray(on_rows(g32, G32, used), np.float64)
    static = np.asarray(jax.vmap(lambda g, G: project_gem(g, G, 0.3, used_rows=used))(g32, G32))
    if used:
        assert np.sum(np.any(np.einsum("btp,bp->bt", G, g) < 0, axis=1)) >= 8
    np.testing.assert_allclose(traced, full, atol=1e-5 * np.abs(g).max())
    np.testing.assert_allclose(static, full, atol=1e-5 * np.abs(g).max())
    if used == 0:
        np.testing.assert_array_equal(traced, np.asarray(g32, np.float64))


def test_gem_used_rows_ignores_the_rows_after_them():
    # Documented: rows from used_rows on are not constraints (the caller promises zeros).
    g, G = random_problems(30, BATCH, 4, 60, 0.0)
    g32, G32 = jnp.asarray(g, jnp.float32), jnp.asarray(G, jnp.float32)
    first_two = jax.vmap(lambda g, G: project_gem(g, G[:2]))(g32, G32)
    on_rows = jax.vmap(lambda g, G: project_gem(g, G, used_rows=2))(g32, G32)
    np.testing.assert_allclose(on_rows, first_two, atol=1e-6)
    assert not np.allclose(jax.vmap(project_gem)(g32, G32), first_two, atol=1e-3)


def test_gemrow_buckets():
    from metajax.continual.projections import row_buckets

    assert row_buckets(1) == [0, 1]
    assert row_buckets(5) == [0, 1, 2, 3, 4, 5]
    assert row_buckets(20) == [0, 1, 2, 3, 4, 6, 8, 12, 16, 20]
    for t in range(1, 130):
        sizes = row_buckets(t)
        assert sizes[0] == 0 and sizes[-1] == t and sizes == sorted(set(sizes))
        # Solving on r rows for `used` rows wastes at most half again: r <= 1.5 used.
        assert all(b <= max(4, 3 * a // 2) for a, b in zip(sizes[:-1], sizes[1:], strict=True))


def test_gem_on_pytrees_with_stacked_past_gradients():
    def loss(params, x):
        return jnp.sum(jnp.tanh(x @ params["w"] + params["b"]) ** 2)

    params = {"w": jnp.ones((3, 2)), "b": jnp.array([0.5, -0.5])}
    xs = jnp.asarray(np.random.default_rng(4).normal(size=(4, 5, 3)), jnp.float32)
    G = jax.vmap(jax.grad(loss), in_axes=(None, 0))(params, xs[:3])
    g = jax.tree.map(lambda x: -x, jax.grad(loss)(params, xs[3]))
    projected = gem(g, G)
    assert jax.tree.map(jnp.shape, projected) == jax.tree.map(jnp.shape, g)
    flat = jax.flatten_util.ravel_pytree
    g_flat, z_flat = (np.asarray(flat(tree)[0], np.float64) for tree in (g, projected))
    G_flat = np.asarray(jax.vmap(lambda tree: flat(tree)[0])(G), np.float64)
    assert np.any(G_flat @ g_flat < 0)
    np.testing.assert_allclose(past_task_dots(g, G), G_flat @ g_flat, rtol=1e-6)
    # The flat problem's KKT conditions, in the parameter layout of ravel_pytree.
    assert np.min(G_flat @ z_flat) >= -1e-5 * np.abs(G_flat).max() * np.abs(g_flat).max()
    v, residual = dual_from_primal(g_flat, G_flat, z_flat)
    assert residual < 1e-5 and v.min() >= -1e-5
    np.testing.assert_allclose(v * (G_flat @ z_flat), 0.0, atol=1e-5)


def test_gem_rejects_bad_arguments():
    with pytest.raises(ValueError, match=r"expected \[t=2, \*\[3\]\]"):
        project_gem(jnp.zeros(3), jnp.zeros((2, 4)))
    with pytest.raises(ValueError, match="memory_strength"):
        project_gem(jnp.zeros(3), jnp.zeros((2, 3)), margin=-0.1)
    with pytest.raises(ValueError, match="max_steps"):
        project_gem(jnp.zeros(3), jnp.zeros((2, 3)), max_steps=0)
    with pytest.raises(ValueError, match=r"used_rows must be in \[0, t=2\]"):
        project_gem(jnp.zeros(3), jnp.zeros((2, 3)), used_rows=3)


# --- GEM: random problems and the KKT conditions ------------------------------------------


CASES = [(1, 50, 0.0), (3, 120, 0.0), (10, 120, 3.0), (10, 500, 0.0)]


@pytest.mark.parametrize("t,p,correlation", CASES)
def test_gem_satisfies_the_kkt_conditions(t, p, correlation):
    g, G = random_problems(t * p, BATCH, t, p, correlation)
    projected = gem_batch(g, G)
    violated = 0
    for gi, Gi, zi in zip(g, G, projected, strict=True):
        scale = np.linalg.norm(Gi, axis=1) * np.linalg.norm(gi)
        violated += np.any(Gi @ gi < 0)
        constraint = Gi @ zi / scale  # primal feasibility, relative: G z >= 0
        assert constraint.min() >= -1e-5
        v, residual = dual_from_primal(gi, Gi, zi)
        assert residual < 1e-5  # stationarity: z - g = G^T v
        weight = v * np.linalg.norm(Gi, axis=1) / np.linalg.norm(gi)  # v_k |G_k| in units of |g|
        assert weight.min() >= -1e-5  # dual feasibility: v >= 0
        # Complementary slackness: a past task with slack in its constraint gets no weight.
        np.testing.assert_allclose(weight * constraint, 0.0, atol=1e-5)
    assert violated >= 8  # the cases exercise the projection, not only the no-op path


def test_gem_margin_is_a_lower_bound_on_the_dual():
    # margin m: v >= m, i.e. g~ is the margin-0 projection of g + m * sum_k G_k.
    margin = 0.25
    g, G = random_problems(7, BATCH, 3, 120, 0.0)
    with_margin = gem_batch(g, G, margin)
    shifted = gem_batch(g + margin * G.sum(axis=1), G)
    violated = np.any(np.einsum("btp,bp->bt", G, g) < 0, axis=1)
    assert violated.sum() >= 8
    for b in np.flatnonzero(violated):
        np.testing.assert_allclose(with_margin[b], shifted[b], rtol=1e-4, atol=1e-5)
        v, _ = dual_from_primal(g[b], G[b], with_margin[b])
        assert v.min() >= margin - 1e-4
        assert np.min(G[b] @ with_margin[b]) >= -1e-4


def test_gem_ridge_softens_the_constraints_as_documented():
    # With ridge r the dual matrix is G G^T + r I, so G g~ + r v >= 0, with equality where
    # v > 0 (the KKT conditions of the ridged dual).
    ridge = 0.5
    g, G = random_problems(8, BATCH, 3, 120, 1.0)
    projected = gem_batch(g, G, ridge=ridge)
    active = 0
    for gi, Gi, zi in zip(g, G, projected, strict=True):
        v, _ = dual_from_primal(gi, Gi, zi)
        slack = Gi @ zi + ridge * v
        active += v.max() > 0.1
        assert slack.min() >= -1e-4 and v.min() >= -1e-5
        np.testing.assert_allclose(v * slack, 0.0, atol=1e-4)
    assert active >= 8


@pytest.mark.parametrize("rank", [6, 3])
def test_nnls_kkt(rank):
    # A [8, 6] of full column rank, or of rank 3 (dependent columns: dependent gradients).
    rng = np.random.default_rng(rank)
    A = np.einsum(
        "bmr,brt->bmt", rng.normal(size=(BATCH, 8, rank)), rng.normal(size=(BATCH, rank, 6))
    )
    b = rng.normal(size=(BATCH, 8))
    v = np.asarray(batched_nnls(jnp.float32(A), jnp.float32(b)), np.float64)
    # KKT of min 1/2 |A v - b|^2, v >= 0, with w = A^T (b - A v) the negative gradient, each
    # relative to the size of its terms (float32 rounding grows with them).
    w = np.einsum("bmt,bm->bt", A, b - np.einsum("bmt,bt->bm", A, v))
    size = np.einsum("bmt,bmt->b", A, A) * np.abs(v).max(axis=1) + np.abs(b).sum(axis=1)
    assert np.all(v >= 0) and np.any(v > 0.1)  # feasibility, and not the trivial v = 0
    assert np.max(w / size[:, None]) <= 1e-6  # growing no coordinate lowers the objective
    relative_v = v / np.maximum(np.abs(v).max(axis=1, keepdims=True), 1e-12)
    np.testing.assert_allclose(relative_v * w / size[:, None], 0.0, atol=1e-6)


def test_gem_matches_scipy_non_negative_least_squares():
    # GEM's dual is the NNLS problem min_{v >= 0} |G^T v + g|^2; scipy solves it exactly
    # (Lawson-Hanson, float64), including on ill-conditioned, strongly correlated G.
    optimize = pytest.importorskip("scipy.optimize")
    for correlation in [0.0, 10.0, 30.0]:
        g, G = random_problems(9, BATCH, 10, 500, correlation)
        for gi, Gi, zi in zip(g, G, gem_batch(g, G), strict=True):
            v, _ = optimize.nnls(Gi.T, -gi)
            expected = gi + Gi.T @ v
            np.testing.assert_allclose(zi, expected, atol=1e-4 * np.abs(gi).max())
