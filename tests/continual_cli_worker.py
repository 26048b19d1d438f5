"""Run by tests/test_parallel.py in a subprocess: ``metajax continual`` on the generated MNIST
files that ``tests/test_train_continual.py``'s ``fake_mnist`` fixture wrote under
``$METAJAX_DATA_DIR``, with ``metajax.data.mnist.FILES`` patched to their checksums (as the
fixture does in its own process). Arguments: those of ``metajax``."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from test_mnist import spec

from metajax.cli import main
from metajax.data import mnist

SHAPES = {"train_images": (6000, 28, 28), "train_labels": (6000,),
          "test_images": (40, 28, 28), "test_labels": (40,)}

if __name__ == "__main__":
    folder = Path(os.environ["METAJAX_DATA_DIR"]) / "mnist"
    for key, shape in SHAPES.items():
        data = (folder / mnist.FILES[key].filename).read_bytes()
        mnist.FILES[key] = spec(key, data, shape)
    sys.exit(main(sys.argv[1:]))
