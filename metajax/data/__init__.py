"""Datasets and on-device task samplers.

:func:`fewshot` is the one-call entry point for few-shot image classification (Omniglot,
mini-ImageNet); the loaders and samplers it builds on are the submodules (``omniglot``,
``miniimagenet``, ``episodes``, ``sinusoid``, ...).
"""

from metajax.data.fewshot_benchmarks import FewShot, FewShotSplit, fewshot

__all__ = ["FewShot", "FewShotSplit", "fewshot"]
