"""Image transforms shared by the data sets and the continual-learning streams."""

from __future__ import annotations

import numpy as np
from PIL import Image

RESAMPLES = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR}


def rotate_images(images: np.ndarray, angle: float, *, resample: str = "nearest") -> np.ndarray:
    """``images`` rotated by ``angle`` degrees counter-clockwise about their centre.

    The result equals PIL's ``Image.rotate(angle, resample)`` on each image (same size, the
    uncovered corners filled with 0), the operation of GEM's ``rotate_dataset``, which uses
    PIL's default nearest-neighbour resampling. Instead of calling PIL once per image, PIL
    rotates each of the ``H*W`` unit images once; that gives the (sparse) linear map of the
    rotation, which is then applied to all images with numpy. With ``"nearest"`` the result
    is exactly PIL's; with ``"bilinear"`` it is PIL's bilinear filter computed in float32
    (PIL on 8-bit images truncates the result to an integer, this does not).

    Args:
      images: ``[n, H, W]`` pixels, any real dtype.
      angle: degrees, counter-clockwise.
      resample: ``"nearest"`` (GEM) or ``"bilinear"``.

    Returns:
      float32 ``[n, H, W]`` in the units of ``images``.
    """
    images = np.asarray(images)
    if images.ndim != 3:
        raise ValueError(f"images of shape {images.shape}: give [n, H, W]")
    n, h, w = images.shape
    index, weight = _rotation_taps(h, w, float(angle), resample)
    flat = images.reshape(n, h * w).astype(np.float32)
    out = np.zeros((n, h * w), np.float32)
    for k in range(index.shape[1]):
        out += flat[:, index[:, k]] * weight[:, k]
    return out.reshape(n, h, w)


def _rotation_taps(h: int, w: int, angle: float, resample: str) -> tuple[np.ndarray, np.ndarray]:
    """(source pixel ``[H*W, K]``, weight ``[H*W, K]``) of every output pixel of a rotation."""
    if resample not in RESAMPLES:
        raise ValueError(f"resample={resample!r}: use one of {tuple(RESAMPLES)}")
    unit = np.zeros((h, w), np.float32)
    columns = np.empty((h * w, h * w), np.float32)  # columns[i]: where pixel i goes
    for i in range(h * w):
        unit.flat[i] = 1.0
        rotated = Image.fromarray(unit).rotate(angle, resample=RESAMPLES[resample])
        columns[i] = np.asarray(rotated).ravel()
        unit.flat[i] = 0.0
    linear = columns.T  # linear[o, i]: weight of input pixel i in output pixel o
    taps = max(1, int((linear != 0).sum(axis=1).max()))
    index = np.argsort(linear == 0, axis=1, kind="stable")[:, :taps]
    return index, np.take_along_axis(linear, index, axis=1)
