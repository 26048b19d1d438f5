"""A multilayer perceptron, the sinusoid model of Finn et al. (2017): 1-40-40-1 with ReLU."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax


class MLP(nn.Module):
    """Dense layers with ReLU between them; the last layer is named ``head``.

    Attributes:
      hidden: widths of the hidden layers, e.g. ``(40, 40)``.
      outputs: width of the output layer.
    """

    hidden: Sequence[int] = (40, 40)
    outputs: int = 1

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """``x [..., features] -> [..., outputs]``."""
        for width in self.hidden:
            x = nn.relu(nn.Dense(width)(x))
        return nn.Dense(self.outputs, name="head")(x)
