"""esgd: ESGD-M and plain ESGD, stochastic second-order optimizers for PyTorch.

``ESGD`` is ESGD-M as docs/esgd-m.md specifies it (Dauphin et al. 2015 with the quasi-hyperbolic momentum
of Ma & Yarats 2019); ``PlainESGD`` is the paper's original method, kept for comparison.  ``AdaHessian``
(Yao et al. 2021) and ``Sophia`` (Sophia-H, Liu et al. 2023) are the second-order peers it is compared with.
All of them take ``torch.amp.GradScaler``'s scale out of the gradient and the Hessian-vector product
themselves, and keep float32 state for bfloat16 and float16 parameters (see :mod:`esgd._base`).
``hvp_attention(opt)`` lets their products pass through ``scaled_dot_product_attention``
(:mod:`esgd.attention`); ``ForwardOverReverse`` computes the exact product by forward-over-reverse
differentiation, which ``torch.compile`` can compile (:mod:`esgd.forward`).
"""

from ._base import DoubleBackwardUnsupportedError, HessianOptimizer, MissingGraphError
from .adahessian import AdaHessian, adahessian
from .attention import hvp_attention
from .esgd_m import ESGD, ESGDMax, esgd_m
from .forward import ForwardOverReverse
from .plain import PlainESGD, esgd_plain
from .sophia import Sophia, sophia

__all__ = ["ESGD", "ESGDMax", "PlainESGD", "HessianOptimizer", "MissingGraphError",
           "DoubleBackwardUnsupportedError", "esgd_m", "esgd_plain", "AdaHessian", "adahessian", "Sophia",
           "sophia", "hvp_attention", "ForwardOverReverse"]
__version__ = "0.1.0"
