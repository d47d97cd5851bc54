"""esgd: ESGD-M and plain ESGD, stochastic second-order optimizers for PyTorch.

``ESGD`` is ESGD-M as shared/ESGD-M.md specifies it (Dauphin et al. 2015 with the quasi-hyperbolic momentum
of Ma & Yarats 2019); ``PlainESGD`` is the paper's original method, kept for comparison.
"""

from ._base import DoubleBackwardUnsupportedError, HessianOptimizer, MissingGraphError
from .esgd_m import ESGD, ESGDMax, esgd_m
from .plain import PlainESGD, esgd_plain

__all__ = ["ESGD", "ESGDMax", "PlainESGD", "HessianOptimizer", "MissingGraphError",
           "DoubleBackwardUnsupportedError", "esgd_m", "esgd_plain"]
__version__ = "0.1.0"
