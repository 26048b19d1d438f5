"""2-D convolution and max-pooling that stay cheap under ``jax.vmap`` over per-task weights.

Meta-learners such as MAML (Finn et al., 2017, "Model-Agnostic Meta-Learning for Fast
Adaptation of Deep Networks") ``vmap`` the inner loop over a task axis, and every task adapts
its own copy of the weights. ``vmap`` of ``lax.conv_general_dilated`` over a batched *kernel*
becomes a grouped convolution (``feature_group_count = tasks``), which XLA:CPU executes very
slowly: one 32-task meta-step of a 4-layer ConvNet did not finish in 23 minutes.

``conv2d`` therefore offers an im2col formulation: the ``kh * kw`` shifted, strided slices of
the padded input are concatenated on the channel axis and multiplied with the reshaped kernel
in one 2-D matmul. Under ``vmap`` the task axis turns into a batch dimension of that
matmul, which every backend runs efficiently. On GPU/TPU the native convolution (cuDNN, or the
TPU convolution units) is faster, so ``impl="auto"`` picks per backend.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
from jax import lax

ConvImpl = Literal["auto", "im2col", "lax"]
Padding = Literal["SAME", "VALID"]

IMPLS: tuple[str, ...] = ("auto", "im2col", "lax")
PADDINGS: tuple[str, ...] = ("SAME", "VALID")


def resolve_impl(impl: str = "auto", backend: str | None = None) -> str:
    """The concrete convolution implementation, ``"im2col"`` or ``"lax"``, for ``impl``.

    ``"auto"`` means ``"im2col"`` on CPU (where a vmapped ``lax`` convolution over per-task
    kernels is a slow grouped convolution) and ``"lax"`` on GPU/TPU (where the native
    convolution is faster). ``backend`` defaults to ``jax.default_backend()``.
    """
    if impl not in IMPLS:
        raise ValueError(f"conv impl must be one of {IMPLS}, got {impl!r}.")
    if impl != "auto":
        return impl
    backend = jax.default_backend() if backend is None else backend
    return "im2col" if backend == "cpu" else "lax"


def _normalize_stride(stride: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(stride, int):
        stride = (stride, stride)
    stride = tuple(int(s) for s in stride)
    if len(stride) != 2 or min(stride) < 1:
        raise ValueError(
            f"stride must be a positive int or a pair of positive ints, got {stride!r}."
        )
    return stride


def _check_shapes(x: jax.Array, w: jax.Array, padding: str) -> None:
    if x.ndim != 4:
        raise ValueError(
            f"conv2d expects an NHWC input of rank 4, got shape {x.shape}; add a batch axis "
            "with x[None] (under vmap the task axis is already stripped)."
        )
    if w.ndim != 4:
        raise ValueError(f"conv2d expects an HWIO kernel of rank 4, got shape {w.shape}.")
    if x.shape[-1] != w.shape[2]:
        raise ValueError(
            f"input has {x.shape[-1]} channels but the kernel expects {w.shape[2]} "
            f"(kernel shape {w.shape} is HWIO: height, width, in, out)."
        )
    if padding not in PADDINGS:
        raise ValueError(f"padding must be one of {PADDINGS}, got {padding!r}.")


def conv2d_im2col(
    x: jax.Array,
    w: jax.Array,
    stride: int | tuple[int, int] = 1,
    padding: Padding = "SAME",
    precision: lax.PrecisionLike = None,
) -> jax.Array:
    """2-D convolution as im2col by shifted strided slices followed by one matmul.

    Args:
      x: input ``[N, H, W, C_in]`` (NHWC).
      w: kernel ``[kh, kw, C_in, C_out]`` (HWIO).
      stride: int or ``(sh, sw)``.
      padding: ``"SAME"`` or ``"VALID"``, with the same pad split as ``lax.conv_general_dilated``
        (the extra row/column of an odd total pad goes at the end).
      precision: passed to ``lax.dot_general``.

    Returns:
      ``[N, H_out, W_out, C_out]``; ``H_out = ceil(H / sh)`` for SAME,
      ``floor((H - kh) / sh) + 1`` for VALID.
    """
    _check_shapes(x, w, padding)
    sh, sw = _normalize_stride(stride)
    kh, kw, cin, cout = w.shape
    n, h, wd, _ = x.shape
    (ph0, ph1), (pw0, pw1) = lax.padtype_to_pads((h, wd), (kh, kw), (sh, sw), padding)
    xp = jnp.pad(x, ((0, 0), (ph0, ph1), (pw0, pw1), (0, 0)))
    hp, wp = h + ph0 + ph1, wd + pw0 + pw1
    out_h = (hp - kh) // sh + 1
    out_w = (wp - kw) // sw + 1
    if out_h < 1 or out_w < 1:
        raise ValueError(
            f"kernel {kh}x{kw} is larger than the padded input {hp}x{wp}; use padding='SAME' "
            "or a larger input."
        )
    # Patch channel order (i, j, c) matches the row-major flattening of an HWIO kernel.
    patches = [
        lax.slice(
            xp,
            (0, i, j, 0),
            (n, i + (out_h - 1) * sh + 1, j + (out_w - 1) * sw + 1, cin),
            (1, sh, sw, 1),
        )
        for i in range(kh)
        for j in range(kw)
    ]
    cols = patches[0] if len(patches) == 1 else jnp.concatenate(patches, axis=-1)
    wmat = w.reshape(kh * kw * cin, cout)
    # A plain 2-D matmul over [N * H_out * W_out, kh * kw * C_in]: contracting the 4-D patches
    # directly made XLA:CPU transpose the output gradient through a slow copy fusion for the
    # weight gradient (the 2-D form ran a second-order MAML meta-step 1.4-1.5x faster).
    out = jnp.matmul(cols.reshape(-1, kh * kw * cin), wmat, precision=precision,
                     preferred_element_type=_accumulator(x.dtype))
    return out.astype(x.dtype).reshape(n, out_h, out_w, cout)


def _accumulator(dtype) -> jnp.dtype | None:
    """float32 accumulation for half-precision inputs (bfloat16, float16), as mixed-precision
    hardware does, asked for explicitly rather than left to the backend (on XLA:CPU it
    changed no figure of tests/test_precision.py: that backend already accumulates so)."""
    return jnp.float32 if jnp.dtype(dtype).itemsize < 4 and jnp.issubdtype(
        dtype, jnp.floating) else None


def conv2d_lax(
    x: jax.Array,
    w: jax.Array,
    stride: int | tuple[int, int] = 1,
    padding: Padding = "SAME",
    precision: lax.PrecisionLike = None,
) -> jax.Array:
    """2-D convolution by ``lax.conv_general_dilated``; shapes as in :func:`conv2d_im2col`."""
    _check_shapes(x, w, padding)
    return lax.conv_general_dilated(
        x,
        w,
        window_strides=_normalize_stride(stride),
        padding=padding,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=precision,
        preferred_element_type=_accumulator(x.dtype),
    ).astype(x.dtype)


def conv2d(
    x: jax.Array,
    w: jax.Array,
    stride: int | tuple[int, int] = 1,
    padding: Padding = "SAME",
    impl: ConvImpl = "auto",
    precision: lax.PrecisionLike = None,
) -> jax.Array:
    """2-D convolution, NHWC input ``[N, H, W, C_in]``, HWIO kernel ``[kh, kw, C_in, C_out]``.

    Returns ``[N, H_out, W_out, C_out]``. ``impl`` selects im2col (``"im2col"``, cheap under
    ``vmap`` over per-task kernels as in MAML, Finn et al. 2017), ``lax.conv_general_dilated``
    (``"lax"``), or per backend (``"auto"``: im2col on CPU, lax on GPU/TPU); see
    :func:`resolve_impl`. Both agree to float32 rounding, in values and gradients.
    """
    if resolve_impl(impl) == "im2col":
        return conv2d_im2col(x, w, stride, padding, precision)
    return conv2d_lax(x, w, stride, padding, precision)


def max_pool_2x2(x: jax.Array) -> jax.Array:
    """2x2 max-pooling with stride 2 and VALID padding, by reshape and max.

    ``x`` is ``[..., H, W, C]``; returns ``[..., H // 2, W // 2, C]`` (an odd last row/column
    is dropped, as ``flax.linen.max_pool(x, (2, 2), (2, 2), "VALID")`` does). A reshape and a
    reduction vectorise trivially over any leading (task) axes, and the backward pass is an
    elementwise mask instead of ``select_and_scatter``.

    With exactly tied maxima the gradient is split equally among the tied entries, whereas
    ``reduce_window`` gives it all to one; after a ReLU ties are zeros whose ReLU gradient is
    zero anyway, so training is unaffected.
    """
    if x.ndim < 3:
        raise ValueError(f"max_pool_2x2 expects [..., H, W, C], got shape {x.shape}.")
    h, w, c = x.shape[-3:]
    if h < 2 or w < 2:
        raise ValueError(f"max_pool_2x2 needs H, W >= 2, got {h}x{w} (shape {x.shape}).")
    h2, w2 = h // 2, w // 2
    x = x[..., : 2 * h2, : 2 * w2, :]
    x = x.reshape(*x.shape[:-3], h2, 2, w2, 2, c)
    return jnp.max(x, axis=(-4, -2))
