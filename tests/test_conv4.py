"""Tests for metajax.nn.conv (im2col convolution, max-pool) and metajax.nn.conv4 (Conv4)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from metajax.nn.conv import conv2d, conv2d_im2col, conv2d_lax, max_pool_2x2, resolve_impl
from metajax.nn.conv4 import Conv4, conv4_miniimagenet, conv4_omniglot

RTOL = 1e-5
ATOL = 1e-5


def _normal(seed: int, shape: tuple[int, ...]) -> jax.Array:
    # numpy draws: every new shape given to jax.random.normal costs an XLA compile (~1 s).
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _close(a, b, rtol=RTOL, atol=ATOL):
    # Scale the absolute tolerance by the magnitude so large sums are judged relatively.
    b = np.asarray(b)
    np.testing.assert_allclose(
        np.asarray(a), b, rtol=rtol, atol=atol * max(1.0, float(np.abs(b).max()))
    )


CONV_CASES = [
    # (x shape, kernel shape, stride, padding)
    ((2, 28, 28, 1), (3, 3, 1, 8), 2, "SAME"),  # Omniglot block 1
    ((2, 14, 14, 8), (3, 3, 8, 8), 2, "SAME"),
    ((2, 7, 7, 4), (3, 3, 4, 4), 2, "SAME"),  # odd size, stride 2
    ((1, 84, 84, 3), (3, 3, 3, 8), 1, "SAME"),  # mini-ImageNet block 1
    ((3, 10, 9, 2), (3, 3, 2, 5), 1, "VALID"),
    ((2, 11, 8, 3), (3, 3, 3, 4), 2, "VALID"),
    ((2, 9, 10, 3), (2, 3, 3, 4), (2, 1), "SAME"),  # non-square kernel, anisotropic stride
    ((2, 6, 6, 3), (1, 1, 3, 4), 1, "VALID"),  # 1x1 kernel: no concatenation
    ((2, 8, 8, 2), (5, 5, 2, 3), 3, "SAME"),
]


def _conv_and_vjp(conv, stride, padding):
    # One compiled graph per case: eager op-by-op dispatch compiles every primitive separately.
    @jax.jit
    def f(x, w, g):
        y, vjp = jax.vjp(lambda a, b: conv(a, b, stride, padding), x, w)
        return y, vjp(g)

    return f


@pytest.mark.parametrize("xs,ws,stride,padding", CONV_CASES)
def test_im2col_matches_lax_values_and_grads(xs, ws, stride, padding):
    x = _normal(0, xs)
    w = _normal(1, ws)
    out_shape = jax.eval_shape(lambda a, b: conv2d_lax(a, b, stride, padding), x, w).shape
    g = _normal(2, out_shape)
    y_ref, grads_ref = _conv_and_vjp(conv2d_lax, stride, padding)(x, w, g)
    y, grads = _conv_and_vjp(conv2d_im2col, stride, padding)(x, w, g)
    assert y.shape == y_ref.shape
    _close(y, y_ref)
    for got, want in zip(grads, grads_ref, strict=True):
        _close(got, want)


def test_im2col_shapes_match_conv4_geometry():
    x = jax.ShapeDtypeStruct((1, 28, 28, 1), jnp.float32)
    sizes = []
    for cin in (1, 2, 2, 2):
        w = jax.ShapeDtypeStruct((3, 3, cin, 2), jnp.float32)
        x = jax.eval_shape(lambda a, b: conv2d_im2col(a, b, 2, "SAME"), x, w)
        sizes.append(x.shape[1])
    assert sizes == [14, 7, 4, 2]


def test_vmap_over_per_task_kernels_matches_loop_and_is_a_matmul():
    tasks = 4
    x = _normal(3, (tasks, 3, 14, 14, 5))
    w = _normal(4, (tasks, 3, 3, 5, 6))

    def per_task(conv):
        # Output and kernel gradient of a per-task scalar, for one task.
        def f(b, a):
            return jax.value_and_grad(lambda b: jnp.sum(jnp.sin(conv(a, b, 2, "SAME"))))(b)

        return f

    @jax.jit
    def vmapped(w, x):
        return jax.vmap(lambda b, a: conv2d_im2col(a, b, 2, "SAME"))(w, x), jax.vmap(
            per_task(conv2d_im2col)
        )(w, x)

    @jax.jit
    def looped(w, x):
        ys = [conv2d_lax(x[t], w[t], 2, "SAME") for t in range(tasks)]
        vg = [per_task(conv2d_lax)(w[t], x[t]) for t in range(tasks)]
        return jnp.stack(ys), (jnp.stack([v for v, _ in vg]), jnp.stack([g for _, g in vg]))

    (y, (v, gw)), (y_ref, (v_ref, gw_ref)) = vmapped(w, x), looped(w, x)
    _close(y, y_ref)
    _close(v, v_ref)
    _close(gw, gw_ref)
    # The point of im2col: no (grouped) convolution is left after vmap.
    jaxpr = str(jax.make_jaxpr(jax.vmap(per_task(conv2d_im2col)))(w, x))
    assert "conv_general_dilated" not in jaxpr
    assert "dot_general" in jaxpr


def test_resolve_impl_and_dispatch():
    assert resolve_impl("auto", backend="cpu") == "im2col"
    assert resolve_impl("auto", backend="gpu") == "lax"
    assert resolve_impl("auto", backend="tpu") == "lax"
    assert resolve_impl("lax", backend="cpu") == "lax"
    assert resolve_impl("im2col", backend="gpu") == "im2col"
    with pytest.raises(ValueError, match="'fft'"):
        resolve_impl("fft")
    x = jnp.ones((1, 5, 5, 2))
    w = jnp.ones((3, 3, 2, 3))
    jaxpr_auto = str(jax.make_jaxpr(lambda a, b: conv2d(a, b, impl="auto"))(x, w))
    auto_is_conv = "conv_general_dilated" in jaxpr_auto
    assert auto_is_conv == (resolve_impl("auto") == "lax")
    assert "conv_general_dilated" in str(
        jax.make_jaxpr(lambda a, b: conv2d(a, b, impl="lax"))(x, w)
    )


def test_conv_errors():
    with pytest.raises(ValueError, match="rank 4"):
        conv2d_im2col(jnp.ones((5, 5, 2)), jnp.ones((3, 3, 2, 3)))
    with pytest.raises(ValueError, match="channels"):
        conv2d_im2col(jnp.ones((1, 5, 5, 2)), jnp.ones((3, 3, 4, 3)))
    with pytest.raises(ValueError, match="padding"):
        conv2d_im2col(jnp.ones((1, 5, 5, 2)), jnp.ones((3, 3, 2, 3)), padding="same")
    with pytest.raises(ValueError, match="stride"):
        conv2d_im2col(jnp.ones((1, 5, 5, 2)), jnp.ones((3, 3, 2, 3)), stride=0)
    with pytest.raises(ValueError, match="larger than"):
        conv2d_im2col(jnp.ones((1, 2, 2, 2)), jnp.ones((3, 3, 2, 3)), padding="VALID")


@pytest.mark.parametrize("shape", [(2, 8, 8, 3), (2, 21, 21, 4), (1, 5, 6, 2)])
def test_max_pool_matches_flax_values_and_grads(shape):
    x = _normal(5, shape)  # continuous values: no ties
    g = _normal(6, (shape[0], shape[1] // 2, shape[2] // 2, shape[3]))

    def ref(a):
        return nn.max_pool(a, (2, 2), strides=(2, 2), padding="VALID")

    @jax.jit
    def both(x, g):
        y_ref, vjp_ref = jax.vjp(ref, x)
        y, vjp = jax.vjp(max_pool_2x2, x)
        return y, vjp(g)[0], y_ref, vjp_ref(g)[0]

    y, gx, y_ref, gx_ref = both(x, g)
    assert y.shape == y_ref.shape == g.shape
    np.testing.assert_array_equal(np.asarray(y), np.asarray(y_ref))
    np.testing.assert_array_equal(np.asarray(gx), np.asarray(gx_ref))


def test_max_pool_under_vmap_matches_loop():
    x = _normal(7, (3, 2, 10, 10, 4))
    got = jax.jit(jax.vmap(max_pool_2x2))(x)
    want = jnp.stack([nn.max_pool(x[t], (2, 2), strides=(2, 2)) for t in range(3)])
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    with pytest.raises(ValueError, match="H, W >= 2"):
        max_pool_2x2(jnp.ones((1, 1, 4, 2)))


# ---------------------------------------------------------------------------------------------
# Conv4: shapes and structure by eval_shape (free); numerics with small filter counts, jitted.


def _shapes(tree):
    return jax.tree_util.tree_map(lambda a: a.shape, tree)


@pytest.mark.parametrize("batch", [1, 5, 20])
def test_omniglot_output_shape(batch):
    model = conv4_omniglot(5)
    x = jax.ShapeDtypeStruct((batch, 28, 28, 1), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
    out = jax.eval_shape(model.apply, variables, x)
    assert out.shape == (batch, 5)
    assert out.dtype == jnp.float32
    assert variables["params"]["head"]["kernel"].shape == (256, 5)  # 2 * 2 * 64


def test_mean_readout_averages_positions_before_the_head():
    """readout="mean" (the MAML reference's Omniglot head) equals the flatten readout with a
    head that gives each of the 4 positions a quarter of the mean head's weights."""
    x = _normal(3, (6, 28, 28, 1))
    mean_model = conv4_omniglot(5, filters=8, readout="mean")
    params = mean_model.init(jax.random.PRNGKey(1), x)["params"]
    assert params["head"]["kernel"].shape == (8, 5)
    flat_params = dict(params)
    # Flattening is row-major over (h, w, c): feature (h * 2 + w) * 8 + c.
    flat_params["head"] = {"kernel": jnp.tile(params["head"]["kernel"] / 4, (4, 1)),
                           "bias": params["head"]["bias"]}
    flat = conv4_omniglot(5, filters=8).apply({"params": flat_params}, x)
    _close(mean_model.apply({"params": params}, x), flat)
    with pytest.raises(ValueError, match="readout"):
        jax.eval_shape(Conv4(5, readout="max").init, jax.random.PRNGKey(0), x)


@pytest.mark.parametrize("batch", [1, 3, 80])
def test_miniimagenet_output_shape_and_features(batch):
    model = conv4_miniimagenet(5)
    x = jax.ShapeDtypeStruct((batch, 84, 84, 3), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
    assert variables["params"]["head"]["kernel"].shape == (800, 5)  # 5 * 5 * 32
    assert variables["params"]["conv0"]["kernel"].shape == (3, 3, 3, 32)
    assert jax.eval_shape(model.apply, variables, x).shape == (batch, 5)


def test_miniimagenet_forward_runs():
    model = conv4_miniimagenet(5, filters=4)
    x = _normal(8, (3, 84, 84, 3))
    out = jax.jit(lambda x: model.apply(model.init(jax.random.PRNGKey(0), x), x))(x)
    assert out.shape == (3, 5)
    assert bool(jnp.all(jnp.isfinite(out)))


def test_params_structure():
    model = conv4_omniglot(5)
    variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((2, 28, 28, 1)))
    assert set(variables) == {"params"}  # no batch_stats: nothing mutable
    params = variables["params"]
    assert set(params) == {f"conv{i}" for i in range(4)} | {f"norm{i}" for i in range(4)} | {"head"}
    assert _shapes(params["head"]) == {"kernel": (256, 5), "bias": (5,)}
    assert params["conv0"]["kernel"].shape == (3, 3, 1, 64)
    assert _shapes(params["conv1"]) == {"kernel": (3, 3, 64, 64)}  # bias cancelled by norm
    assert _shapes(params["norm3"]) == {"scale": (64,), "bias": (64,)}
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
    assert sum("head" in p for p in paths) == 2

    bare = Conv4(num_classes=3, filters=8, norm="none")
    p2 = jax.eval_shape(bare.init, jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)))
    assert set(p2) == {"params"}
    assert set(p2["params"]) == {f"conv{i}" for i in range(4)} | {"head"}
    assert _shapes(p2["params"]["conv2"]) == {"kernel": (3, 3, 8, 8), "bias": (8,)}


def _numpy_params(model: nn.Module, x_shape: tuple[int, ...], seed: int):
    """Random params of ``model`` drawn with numpy (model.init would cost an XLA compile)."""
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros(x_shape))["params"]
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = jax.tree_util.keystr(path)
        z = rng.standard_normal(leaf.shape)
        if name.endswith("['kernel']"):
            z = z / np.sqrt(np.prod(leaf.shape[:-1]))  # fan-in scaling keeps activations O(1)
        elif name.endswith("['scale']"):
            z = 1.0 + 0.1 * z
        else:
            z = 0.1 * z
        return jnp.asarray(z, jnp.float32)

    return jax.tree_util.tree_map_with_path(draw, shapes)


@pytest.fixture(scope="module")
def small():
    """Omniglot Conv4 with 16 filters (numerics as the 64-filter one, faster to compile)."""
    model = conv4_omniglot(5, filters=16)
    params = _numpy_params(model, (2, 28, 28, 1), seed=0)
    return model, params, jax.jit(lambda p, x: model.apply({"params": p}, x))


def test_batch_norm_uses_current_batch_statistics(small):
    model, params, apply = small
    a = _normal(9, (4, 28, 28, 1))
    b = a.at[1:].set(_normal(10, (3, 28, 28, 1)) * 3.0 + 1.0)
    out_a = apply(params, a)
    out_b = apply(params, b)
    # Sample 0 is identical in both batches; its output moves because its batch-mates did.
    assert float(jnp.abs(out_a[0] - out_b[0]).max()) > 1e-3
    # Evaluation is the same pure function as training: no state, so calls repeat exactly.
    np.testing.assert_array_equal(np.asarray(apply(params, a)), np.asarray(out_a))
    # A batch of one normalises with its own statistics, not those of an earlier batch.
    single = apply(params, a[:1])
    assert float(jnp.abs(single[0] - out_a[0]).max()) > 1e-3

    # Control: without normalisation a sample's output ignores its batch-mates.
    bare = Conv4(num_classes=5, filters=8, norm="none")
    p2 = {"params": _numpy_params(bare, a.shape, seed=1)}
    bare_apply = jax.jit(bare.apply)
    _close(bare_apply(p2, a)[0], bare_apply(p2, b)[0])


def test_batch_norm_normalises_per_channel():
    from metajax.nn.conv4 import BatchStatNorm

    x = _normal(11, (6, 4, 4, 3)) * 5.0 + 2.0
    norm = BatchStatNorm()
    p = norm.init(jax.random.PRNGKey(0), x)
    apply = jax.jit(norm.apply)
    y = apply(p, x)
    var = np.asarray(x).var(axis=(0, 1, 2))
    np.testing.assert_allclose(np.asarray(y.mean(axis=(0, 1, 2))), 0.0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(y.var(axis=(0, 1, 2))), var / (var + 1e-3), rtol=1e-5)
    shifted = {"params": {"scale": jnp.full(3, 2.0), "bias": jnp.arange(3.0)}}
    _close(apply(shifted, x), 2.0 * y + jnp.arange(3.0))


def _ce_loss(model, params, x, y):
    logits = model.apply({"params": params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def test_gradient_finite_and_nonzero(small):
    model, params, _ = small
    x = _normal(12, (10, 28, 28, 1))
    y = jnp.arange(10) % 5
    loss, grads = jax.jit(jax.value_and_grad(lambda p: _ce_loss(model, p, x, y)))(params)
    assert np.isfinite(float(loss))
    leaves = jax.tree_util.tree_leaves_with_path(grads)
    assert len(leaves) == 4 + 8 + 2
    for path, g in leaves:
        assert bool(jnp.all(jnp.isfinite(g))), jax.tree_util.keystr(path)
        assert float(jnp.abs(g).max()) > 0.0, jax.tree_util.keystr(path)


def test_im2col_and_lax_models_agree_miniimagenet():
    # (The Omniglot variant is compared in test_vmap_over_tasks_matches_per_task_loop.)
    x = _normal(13, (5, 42, 42, 3))
    y = jnp.arange(5)
    models = [Conv4(5, filters=8, variant="miniimagenet", conv_impl=i) for i in ("im2col", "lax")]
    params = _numpy_params(models[0], x.shape, seed=2)
    outs = [
        jax.jit(jax.value_and_grad(lambda p, m=m: _ce_loss(m, p, x, y)))(params) for m in models
    ]
    _close(outs[0][0], outs[1][0], rtol=1e-5, atol=1e-5)
    for a, b in zip(
        jax.tree_util.tree_leaves(outs[0][1]), jax.tree_util.tree_leaves(outs[1][1]), strict=True
    ):
        _close(a, b, rtol=1e-4, atol=1e-5)


def test_vmap_over_tasks_matches_per_task_loop():
    # 4 tasks of 5-way 1-shot Omniglot, each with its own (fast) params, as in MAML.
    tasks, ways = 4, 5
    model = conv4_omniglot(ways, filters=16, conv_impl="im2col")
    per_task = [_numpy_params(model, (1, 28, 28, 1), seed=10 + t) for t in range(tasks)]
    stacked = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *per_task)
    x = _normal(14, (tasks, ways, 28, 28, 1))
    y = jnp.tile(jnp.arange(ways), (tasks, 1))

    loss_and_grad = jax.value_and_grad(lambda p, a, b: _ce_loss(model, p, a, b))
    losses, grads = jax.jit(jax.vmap(loss_and_grad))(stacked, x, y)
    assert losses.shape == (tasks,)
    ref_model = conv4_omniglot(ways, filters=16, conv_impl="lax")
    ref = jax.jit(jax.value_and_grad(lambda p, a, b: _ce_loss(ref_model, p, a, b)))
    for t in range(tasks):
        loss_t, grad_t = ref(per_task[t], x[t], y[t])
        _close(losses[t], loss_t, rtol=1e-5, atol=1e-5)
        for a, b in zip(
            jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(grad_t), strict=True
        ):
            _close(a[t], b, rtol=1e-4, atol=1e-5)
    # Tasks really have different params: their losses differ.
    assert float(jnp.ptp(losses)) > 1e-4


def test_conv4_errors():
    x = jnp.zeros((1, 28, 28, 1))
    key = jax.random.PRNGKey(0)
    with pytest.raises(ValueError, match="variant"):
        jax.eval_shape(Conv4(5, variant="cifar").init, key, x)
    with pytest.raises(ValueError, match="norm"):
        jax.eval_shape(Conv4(5, norm="batch_running").init, key, x)
    with pytest.raises(ValueError, match=r"x\[\.\.\., None\]"):
        jax.eval_shape(Conv4(5).init, key, jnp.zeros((1, 28, 28)))
    with pytest.raises(ValueError, match="floating"):
        jax.eval_shape(Conv4(5).init, key, jnp.zeros((1, 28, 28, 1), jnp.uint8))
    with pytest.raises(ValueError, match="conv impl"):
        jax.eval_shape(Conv4(5, conv_impl="fft").init, key, x)


def test_layer_norm_is_per_example_and_non_transductive():
    from metajax.nn.conv4 import ExampleNorm

    model = conv4_omniglot(5, filters=8, norm="layer")
    a = _normal(12, (4, 28, 28, 1))
    b = a.at[1:].set(_normal(13, (3, 28, 28, 1)) * 3.0 + 1.0)
    params = {"params": _numpy_params(model, a.shape, seed=2)}
    assert {f"norm{i}" for i in range(4)} <= set(params["params"])
    apply = jax.jit(model.apply)
    out_a, out_b = apply(params, a), apply(params, b)
    # Example 0's prediction ignores its batch-mates (batch norm moves it: test above).
    _close(out_a[0], out_b[0])
    _close(apply(params, a[:1])[0], out_a[0])

    x = _normal(14, (3, 4, 4, 2)) * 4.0 - 1.0
    norm = ExampleNorm()
    y = norm.apply(norm.init(jax.random.PRNGKey(0), x), x)
    flat_x = np.asarray(x).reshape(3, -1)
    np.testing.assert_allclose(np.asarray(y).reshape(3, -1).mean(axis=1), 0.0, atol=1e-5)
    var = flat_x.var(axis=1)
    np.testing.assert_allclose(np.asarray(y).reshape(3, -1).var(axis=1), var / (var + 1e-3),
                               rtol=1e-4)


def test_pooled_omniglot_conv4_is_the_mamlpp_reference_network():
    """Stride-1 convs and 2x2 max-pooling: 28 -> 14 -> 7 -> 3 -> 1, so 64 features."""
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 28, 28, 1))
    model = conv4_omniglot(5, pooled=True, norm_eps=1e-5)
    params = model.init(jax.random.PRNGKey(1), x)
    assert params["params"]["head"]["kernel"].shape == (64, 5)
    assert params["params"]["conv0"]["kernel"].shape == (3, 3, 1, 64)
    assert model.apply(params, x).shape == (3, 5)
    strided = conv4_omniglot(5)
    assert strided.init(jax.random.PRNGKey(1), x)["params"]["head"]["kernel"].shape == (256, 5)


def test_norm_eps_reaches_the_normalisation():
    x = 1e-3 * jax.random.normal(jax.random.PRNGKey(2), (4, 28, 28, 1))
    small, large = conv4_omniglot(5, norm_eps=1e-5), conv4_omniglot(5, norm_eps=1.0)
    params = small.init(jax.random.PRNGKey(3), x)
    assert not np.allclose(small.apply(params, x), large.apply(params, x), atol=1e-4)


def test_imaml_init_matches_the_released_network_distribution():
    """weight_init="imaml": Xavier-uniform weights with gain 1.73 (bound g * sqrt(6 / (fan_in +
    fan_out)), variance g^2 * 2 / (fan_in + fan_out)) and biases uniform in [0, 0.05]."""
    x = jnp.zeros((2, 28, 28, 1))
    params = conv4_omniglot(5, weight_init="imaml", norm="none").init(jax.random.PRNGKey(0), x)
    p = params["params"]
    for name, fan_in, fan_out in (("conv1", 9 * 64, 9 * 64), ("head", 256, 5)):
        kernel = np.asarray(p[name]["kernel"]).ravel()
        bound = 1.73 * np.sqrt(6.0 / (fan_in + fan_out))
        assert np.abs(kernel).max() <= bound
        assert np.abs(kernel).max() > 0.95 * bound          # uniform: reaches the bound
        np.testing.assert_allclose(kernel.var(), bound**2 / 3, rtol=0.1)
        bias = np.asarray(p[name]["bias"])
        assert bias.min() >= 0.0 and bias.max() <= 0.05 and bias.std() > 0.005
    default = conv4_omniglot(5, norm="none").init(jax.random.PRNGKey(0), x)["params"]
    assert not np.any(np.asarray(default["conv1"]["bias"]))
    bn = conv4_omniglot(5, weight_init="imaml").init(jax.random.PRNGKey(0), x)["params"]
    assert "bias" not in bn["conv0"] and float(bn["head"]["bias"].min()) >= 0.0
    with pytest.raises(ValueError, match="weight_init"):
        conv4_omniglot(5, weight_init="he").init(jax.random.PRNGKey(0), x)


def test_presets_pass_weight_init_and_norm_eps_to_the_model(monkeypatch):
    """The released-iMAML preset builds its Conv4 with the released initialisation."""
    import metajax.data.omniglot as omniglot
    import metajax.presets.build as build
    from metajax.presets import get_preset

    seen = {}

    class Built(Exception):
        pass

    def fake_conv4(ways, **kwargs):
        seen.update(kwargs, ways=ways)
        raise Built

    monkeypatch.setattr(omniglot, "load_omniglot", lambda *a, **k: None)
    monkeypatch.setattr(omniglot, "omniglot_splits", lambda *a, **k: None)
    monkeypatch.setattr(build, "conv4_omniglot", fake_conv4)
    for name, init, eps in (("omniglot-5w1s-imaml-released", "imaml", 1e-5),
                            ("omniglot-5w1s-maml", "glorot", 1e-3)):
        with pytest.raises(Built):
            build.omniglot_problem(get_preset(name))
        assert (seen["weight_init"], seen["norm_eps"], seen["ways"]) == (init, eps, 5)
