"""The 4-block ConvNet of MAML (Finn et al., 2017) for Omniglot and mini-ImageNet.

Each block is a 3x3 convolution, batch norm, ReLU and a downsampling step:

* ``variant="omniglot"``: the convolution has stride 2 (SAME) and there is no pooling, as in the
  MAML reference code for 28x28 Omniglot: 28 -> 14 -> 7 -> 4 -> 2. ``readout="flatten"``
  (default) feeds all ``2 * 2 * 64 = 256`` values to the head, as iMAML's released code
  does; ``readout="mean"`` averages the 2x2 positions into 64 features first, as the MAML
  reference code does for Omniglot.
* ``variant="miniimagenet"``: stride-1 SAME convolution then 2x2 max-pooling (VALID):
  84 -> 42 -> 21 -> 10 -> 5, so 32 filters give ``5 * 5 * 32 = 800`` features.

The features are flattened (or averaged over positions) and fed to a linear layer named
``head``, so ANIL-style learners
can select the head by a params path containing ``'head'``.

Batch norm follows the MAML reference: every call normalises with the mean and variance of the
*current* batch, in training and in evaluation alike, and keeps no running averages. Evaluation
is therefore transductive: a query image's output depends on the other query images it is
batched with. Because there is no state, ``model.apply({'params': p}, x)`` is a pure function
of a plain params pytree (no ``batch_stats`` collection, no ``mutable=``), which is what the
meta-learners need to ``vmap`` and differentiate through per-task fast weights. ``norm="none"``
removes normalisation (the conv then gets a bias) for non-transductive use.
"""

from __future__ import annotations

from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from metajax.nn.conv import ConvImpl, conv2d, max_pool_2x2, resolve_impl

Variant = Literal["omniglot", "miniimagenet"]
Norm = Literal["batch", "layer", "none"]
Readout = Literal["flatten", "mean"]
Init = Literal["glorot", "imaml"]

VARIANTS: tuple[str, ...] = ("omniglot", "miniimagenet")
NORMS: tuple[str, ...] = ("batch", "layer", "none")
READOUTS: tuple[str, ...] = ("flatten", "mean")
INITS: tuple[str, ...] = ("glorot", "imaml")

# iMAML's released Omniglot network: Xavier-uniform weights with gain 1.73 and biases drawn
# uniformly from [0, 0.05] (conv and linear layers alike). Xavier-uniform with gain g is
# flax's variance scaling with scale g**2 over the fan average.
_IMAML_GAIN = 1.73
_IMAML_BIAS_HIGH = 0.05


def _kernel_init(init: str):
    if init == "imaml":
        return nn.initializers.variance_scaling(_IMAML_GAIN**2, "fan_avg", "uniform")
    return nn.initializers.glorot_uniform()


def _bias_init(init: str):
    if init == "imaml":
        def uniform_bias(key, shape, dtype=jnp.float32):
            return jax.random.uniform(key, shape, dtype, 0.0, _IMAML_BIAS_HIGH)
        return uniform_bias
    return nn.initializers.zeros_init()


class Conv2D(nn.Module):
    """3x3-style convolution layer over :func:`metajax.nn.conv.conv2d`.

    Input ``[N, H, W, C_in]``, output ``[N, H_out, W_out, features]``. Params: ``kernel``
    ``[kh, kw, C_in, features]`` (Glorot-uniform, as the MAML reference) and, if ``use_bias``,
    ``bias [features]`` (zeros). ``weight_init="imaml"``: Xavier-uniform with gain 1.73 and biases
    uniform in ``[0, 0.05]``, as iMAML's released network.
    """

    features: int
    kernel_size: tuple[int, int] = (3, 3)
    stride: int = 1
    padding: str = "SAME"
    use_bias: bool = True
    impl: ConvImpl = "auto"
    weight_init: Init = "glorot"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kh, kw = self.kernel_size
        kernel = self.param(
            "kernel",
            _kernel_init(self.weight_init),
            (kh, kw, x.shape[-1], self.features),
            jnp.float32,
        )
        y = conv2d(x, kernel.astype(x.dtype), self.stride, self.padding, impl=self.impl)
        if self.use_bias:
            bias = self.param("bias", _bias_init(self.weight_init), (self.features,), jnp.float32)
            y = y + bias.astype(y.dtype)
        return y


class BatchStatNorm(nn.Module):
    """Batch norm with the statistics of the current batch only (no running averages).

    Input and output ``[N, H, W, C]``; mean and (biased) variance are per channel over
    ``N, H, W``. Params: ``scale [C]`` (ones) and ``bias [C]`` (zeros). Under ``vmap`` over
    tasks the statistics are per task, as MAML's per-task forward passes (Finn et al., 2017).
    """

    eps: float = 1e-3  # the TensorFlow batch-norm default used by the MAML reference

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones_init(), (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros_init(), (c,), jnp.float32)
        axes = tuple(range(x.ndim - 1))
        # Statistics in float32 so that low-precision activations do not lose the variance.
        xf = x.astype(jnp.float32)
        mean = jnp.mean(xf, axis=axes)
        var = jnp.mean(jnp.square(xf - mean), axis=axes)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps) * scale + bias
        return y.astype(x.dtype)


class ExampleNorm(nn.Module):
    """Per-example normalisation: each example's activations over ``H, W, C`` to zero mean
    and unit variance, then a per-channel ``scale`` and ``bias`` (layer norm over a feature
    map). It never looks at other examples, so predictions do not depend on which examples
    share a batch: the non-transductive alternative to :class:`BatchStatNorm` (Bronskill et
    al. 2020, "TaskNorm", compare such normalisations for meta-learning).
    """

    eps: float = 1e-3

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones_init(), (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros_init(), (c,), jnp.float32)
        axes = tuple(range(1, x.ndim))
        xf = x.astype(jnp.float32)
        mean = jnp.mean(xf, axis=axes, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=axes, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps) * scale + bias
        return y.astype(x.dtype)


class Conv4(nn.Module):
    """4-block ConvNet of MAML (Finn et al., 2017): ``[N, H, W, C] -> logits [N, num_classes]``.

    Attributes:
      num_classes: width of the ``head`` (the number of ways).
      filters: channels of every block (MAML: 64 for Omniglot, 32 for mini-ImageNet).
      variant: ``"omniglot"`` (stride-2 convs, no pooling) or ``"miniimagenet"``
        (stride-1 convs + 2x2 max-pool).
      norm: ``"batch"`` (current-batch statistics, transductive, as the reference),
        ``"layer"`` (per-example statistics, :class:`ExampleNorm`: non-transductive) or
        ``"none"``.
      conv_impl: ``"auto"`` | ``"im2col"`` | ``"lax"``, see :func:`metajax.nn.conv.conv2d`.
      readout: ``"flatten"`` (every position's channels, the default) or ``"mean"`` (the
        channels averaged over positions: ``filters`` features whatever the image size).
      norm_eps: the normalisation's epsilon (1e-3, TensorFlow's default, as the MAML
        reference; PyTorch's 1e-5 in the MAML++ and iMAML references).

    Params: ``conv0..conv3`` (``kernel``, plus ``bias`` when ``norm="none"``),
    ``norm0..norm3`` (``scale``, ``bias``; only for ``norm="batch"``), ``head``
    (``kernel [features, num_classes]``, ``bias``). With batch norm the conv bias is omitted
    because the normalisation's mean subtraction cancels it.
    """

    num_classes: int
    filters: int = 64
    variant: Variant = "omniglot"
    norm: Norm = "batch"
    conv_impl: ConvImpl = "auto"
    readout: Readout = "flatten"
    norm_eps: float = 1e-3
    weight_init: Init = "glorot"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.variant not in VARIANTS:
            raise ValueError(f"Conv4 variant must be one of {VARIANTS}, got {self.variant!r}.")
        if self.norm not in NORMS:
            raise ValueError(
                f"Conv4 norm must be one of {NORMS}, got {self.norm!r} (running-average batch "
                "norm is not offered: 'layer' is the non-transductive alternative)."
            )
        if self.readout not in READOUTS:
            raise ValueError(f"Conv4 readout must be one of {READOUTS}, got {self.readout!r}.")
        if self.weight_init not in INITS:
            raise ValueError(f"Conv4 weight_init must be one of {INITS}, got {self.weight_init!r}.")
        if self.num_classes < 1 or self.filters < 1:
            raise ValueError(
                f"Conv4 needs num_classes >= 1 and filters >= 1, got num_classes="
                f"{self.num_classes}, filters={self.filters}."
            )
        if x.ndim != 4:
            raise ValueError(
                f"Conv4 expects images [N, H, W, C], got shape {x.shape}; for grayscale "
                "[N, H, W] add a channel axis with x[..., None]."
            )
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(
                f"Conv4 expects floating-point images, got dtype {x.dtype}; convert first, "
                "e.g. x.astype(jnp.float32) / 255."
            )
        impl = resolve_impl(self.conv_impl)
        omniglot = self.variant == "omniglot"
        for i in range(4):
            x = Conv2D(
                self.filters,
                stride=2 if omniglot else 1,
                use_bias=self.norm == "none",
                impl=impl,
                weight_init=self.weight_init,
                name=f"conv{i}",
            )(x)
            if self.norm == "batch":
                x = BatchStatNorm(eps=self.norm_eps, name=f"norm{i}")(x)
            elif self.norm == "layer":
                x = ExampleNorm(eps=self.norm_eps, name=f"norm{i}")(x)
            x = nn.relu(x)
            if not omniglot:
                x = max_pool_2x2(x)
        if self.readout == "mean":
            x = jnp.mean(x, axis=(1, 2))
        x = x.reshape(x.shape[0], -1)
        if self.weight_init == "imaml":
            return nn.Dense(self.num_classes, kernel_init=_kernel_init(self.weight_init),
                            bias_init=_bias_init(self.weight_init), name="head")(x)
        return nn.Dense(self.num_classes, name="head")(x)


def conv4_omniglot(ways: int, filters: int = 64, pooled: bool = False, **kwargs) -> Conv4:
    """Conv4 for 28x28x1 Omniglot as in MAML (Finn et al., 2017): 64 filters, stride-2 convs.

    Input ``[N, 28, 28, 1]``, logits ``[N, ways]``; 256 features before the head, or 64
    with ``readout="mean"`` (the MAML reference's). ``pooled=True`` gives MAML++'s reference
    network instead: stride-1 convs each followed by 2x2 max-pooling (28 -> 14 -> 7 -> 3 -> 1,
    64 features). ``kwargs`` (``norm``, ``conv_impl``, ``readout``, ``norm_eps``, ``weight_init``)
    go to :class:`Conv4`.
    """
    variant = "miniimagenet" if pooled else "omniglot"
    return Conv4(num_classes=ways, filters=filters, variant=variant, **kwargs)


def conv4_miniimagenet(ways: int, filters: int = 32, **kwargs) -> Conv4:
    """Conv4 for 84x84x3 mini-ImageNet as in MAML (Finn et al., 2017): 32 filters, max-pool.

    The MAML paper uses 32 filters here to limit overfitting. Input ``[N, 84, 84, 3]``, logits
    ``[N, ways]``, 800 features before the head. ``kwargs`` (``norm``, ``conv_impl``) go to
    :class:`Conv4`.
    """
    return Conv4(num_classes=ways, filters=filters, variant="miniimagenet", **kwargs)
