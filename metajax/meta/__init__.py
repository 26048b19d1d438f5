"""Meta-learners: NamedTuples of pure functions ``init``, ``adapt``, ``meta_grad``."""

from metajax.meta.maml import anil, head_mask, maml
from metajax.meta.metasgd import MetaSGDParams, metasgd
from metajax.meta.reptile import reptile

__all__ = ["MetaSGDParams", "anil", "head_mask", "maml", "metasgd", "reptile"]
