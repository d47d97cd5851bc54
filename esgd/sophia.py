"""Sophia-H: momentum preconditioned by an occasional Hutchinson estimate of diag(H), clipped per coordinate.

Follows Liu, Li, Hall, Liang & Ma, "Sophia: A Scalable Stochastic Second-order Optimizer for Language
Model Pre-training" (2023; ICLR 2024), Algorithm 3 with the Hutchinson estimator (Sophia-H): an EMA of
gradients on every step, an EMA of ``z * (H z)`` (Rademacher ``z``) refreshed every ``k`` steps,
AdamW-style decoupled weight decay and the update ``-lr * clip(m / max(gamma * h, eps), 1)``.

This is the form of the paper's final version, where ``gamma`` (called ``rho`` here, as in the authors'
code and the first version's text) scales the curvature and the clip threshold is 1.  The first
version's update is ``lr1 * clip(m / max(h, eps1), rho)``; since ``clip(x, rho) = rho * clip(x / rho, 1)``
for ``rho > 0``, that is ``(lr1 * rho) * clip(m / max(rho * h, rho * eps1), 1)``, the final form with
``lr = lr1 * rho`` and ``eps = eps1 * rho``: both multiplied by rho.  There is no bias correction, as in
the paper.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import Tensor

from ._base import as_dtype, by_dtypes, check_betas, check_range, is_narrow, pick, round_into_, state_dtype_for
from .adahessian import HutchinsonOptimizer

__all__ = ["Sophia", "sophia"]


class Sophia(HutchinsonOptimizer):
    r"""Sophia-H (Liu et al., 2023, Algorithm 3 with the Hutchinson estimator).

    .. math::
        \begin{aligned}
            &m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t \\
            &\textbf{if } t \bmod k = 1 \; (z \sim \text{Rademacher}):\;
                \hat h_t = z \odot H_t z, \quad h_t = \beta_2 h_{t-k} + (1-\beta_2) \hat h_t
                \qquad \textbf{else } h_t = h_{t-1} \\
            &\theta_t \leftarrow \theta_{t-1} - \eta \lambda \theta_{t-1} \\
            &\theta_t \leftarrow \theta_t - \eta \, \operatorname{clip}\Bigl(
                \frac{m_t}{\max(\rho\, h_t, \epsilon)}, 1\Bigr)
        \end{aligned}

    where :math:`\eta` is ``lr``, :math:`\lambda` is ``weight_decay``, :math:`k` is ``update_d_every``,
    :math:`\rho` is ``rho`` (the final paper's :math:`\gamma`) and ``clip(x, 1)`` limits each coordinate
    to :math:`[-1, 1]`.  Where the estimate is negative or tiny the denominator is :math:`\epsilon` and
    the step falls back to :math:`-\eta \operatorname{sign}(m_t)`; no coordinate ever moves more than
    :math:`\eta` (plus weight decay) in one step.

    The loop builds the gradient's graph on HVP steps (steps 1, 1 + k, 1 + 2k, ...)::

        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward(create_graph=opt.should_create_graph())
        opt.step()

    Args:
        params: parameters or parameter groups (``lr``, ``betas``, ``rho``, ``eps`` and
            ``weight_decay`` may differ per group).
        lr: learning rate, the largest step of any coordinate (default 1e-4).
        betas: decay of the gradient EMA (0.965) and of the Hessian-diagonal EMA (0.99).
        rho: scale of the curvature in the denominator, the paper's gamma (default 0.01, its Sophia-H
            value).
        eps: floor of the denominator (default 1e-12); must be > 0.
        weight_decay: decoupled weight decay, ``theta -= lr * weight_decay * theta`` (default 0; the
            paper uses it in language-model pre-training, tuned per setting).
        update_d_every: ``k``, a product every ``k`` steps (default 10).
        d_warmup: number of first steps that all compute a product (default 1: only step 1).
        generator: optional ``torch.Generator`` for the probes.
        foreach: use the multi-tensor kernel (default ``True``); ``False`` selects the reference loop.
        hvp_method: ``"autograd"`` (default) or ``"finite-difference"`` (needs ``opt.step(closure)``).
        state_dtype: dtype of ``m`` and ``h`` for parameters narrower than it (default ``torch.float32``:
            a bfloat16 or float16 parameter is updated in float32 and rounded once, at 8 bytes of
            state per parameter instead of 4, plus float32 copies of the gradient and the parameter
            during the update); ``None`` keeps the parameter's dtype.

    A parameter that first receives a gradient on a step without a product starts, as the algorithm
    does, from ``h = 0``: its steps are ``-lr * sign(m)`` until its first product.

    Mixed precision: with ``torch.amp.GradScaler`` the loop is
    ``scaler.scale(loss).backward(create_graph=opt.should_create_graph()); scaler.step(opt);
    scaler.update()`` (see :mod:`esgd._base`).  The gradient and the product of a loss scaled by
    :math:`S` are :math:`S` times too large, and so are :math:`m` and
    :math:`h = \text{EMA}(z \odot H z)`.  The ratio :math:`S m / \max(\rho S h, \epsilon)` equals
    :math:`m / \max(\rho h, \epsilon / S)`: where the curvature is large it is unchanged, but the
    floor :math:`\epsilon` would shrink by :math:`S`, so coordinates with small or negative curvature
    would see a ratio up to :math:`S` times larger and be clipped to sign steps far more often.
    ``step()`` divides the gradient and the product by :math:`S` before either is used (exactly, for
    GradScaler's powers of two).
    """

    def __init__(self, params: Iterable, lr: float = 1e-4, betas: tuple[float, float] = (0.965, 0.99),
                 rho: float = 0.01, eps: float = 1e-12, weight_decay: float = 0., update_d_every: int = 10,
                 d_warmup: int = 1, *, generator: torch.Generator | None = None,
                 foreach: bool | None = None, hvp_method: str = "autograd",
                 state_dtype: torch.dtype | None = torch.float32) -> None:
        _validate(lr, betas, rho, eps, weight_decay)
        defaults = dict(lr=lr, betas=tuple(betas), rho=rho, eps=eps, weight_decay=weight_decay,
                        foreach=foreach)
        super().__init__(params, defaults, update_d_every=update_d_every, d_warmup=d_warmup,
                         generator=generator, hvp_method=hvp_method, state_dtype=state_dtype)
        for group in self.param_groups:
            _validate(group["lr"], group["betas"], group["rho"], group["eps"], group["weight_decay"])

    def _update(self, hvp_step: bool, hvps: dict[Tensor, Tensor] | None, grads: dict[Tensor, Tensor]) -> None:
        for group in self.param_groups:
            params = [p for p in group["params"] if p in grads]
            if not params:
                continue
            for p in params:
                state = self.state[p]
                if len(state) == 0:
                    dtype = state_dtype_for(p.dtype, group["state_dtype"])
                    state["exp_avg"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
                    state["hessian"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
            beta1, beta2 = group["betas"]
            sophia(params, [grads[p] for p in params], [self.state[p]["exp_avg"] for p in params],
                   [self.state[p]["hessian"] for p in params],
                   self._diagonal_estimates(params, hvps) if hvp_step else None,
                   lr=group["lr"], beta1=beta1, beta2=beta2, rho=group["rho"], eps=group["eps"],
                   weight_decay=group["weight_decay"], foreach=group["foreach"])


def _validate(lr, betas, rho, eps, weight_decay) -> None:
    check_range("lr", lr, 0.0, math.inf)
    check_betas(betas)
    check_range("rho", rho, 0.0, math.inf)
    check_range("eps", eps, 0.0, math.inf)
    if eps == 0:  # a zero or negative curvature estimate would divide by zero
        raise ValueError(f"Invalid eps: {eps!r} (must be > 0)")
    check_range("weight_decay", weight_decay, 0.0, math.inf)


def sophia(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], hessians: list[Tensor],
           hessian_estimates: list[Tensor] | None, *, lr: float, beta1: float, beta2: float, rho: float,
           eps: float, weight_decay: float, foreach: bool | None = None) -> None:
    """Functional Sophia-H update of one parameter group; see :class:`Sophia` for the maths.

    ``hessian_estimates`` holds this step's ``z * (H z)``, or is ``None`` on a step without a product.
    The arithmetic runs in the dtype of each parameter's state: a narrower parameter is updated on a
    copy in that dtype and rounded back once.  State in bfloat16 or float16 always takes the
    single-tensor loop (see :func:`esgd._base.is_narrow`).
    """
    if foreach is None:
        foreach = True
    fn = _multi_tensor_sophia if foreach and not torch.jit.is_scripting() else _single_tensor_sophia
    fn(params, grads, exp_avgs, hessians, hessian_estimates, lr=lr, beta1=beta1, beta2=beta2, rho=rho,
       eps=eps, weight_decay=weight_decay)


def _single_tensor_sophia(params, grads, exp_avgs, hessians, hessian_estimates, *, lr, beta1, beta2, rho,
                          eps, weight_decay):
    for i, param in enumerate(params):
        m, h = exp_avgs[i], hessians[i]
        m.lerp_(as_dtype(grads[i], m.dtype), 1 - beta1)
        if hessian_estimates is not None:
            h.lerp_(as_dtype(hessian_estimates[i], m.dtype), 1 - beta2)
        ratio = m / (h * rho).clamp_min_(eps)
        p = as_dtype(param, m.dtype)
        if weight_decay != 0:
            p.mul_(1 - lr * weight_decay)
        p.add_(ratio.clamp_min_(-1).clamp_max_(1), alpha=-lr)
        if p is not param:
            param.copy_(p)


def _multi_tensor_sophia(params, grads, exp_avgs, hessians, hessian_estimates, *, lr, beta1, beta2, rho,
                         eps, weight_decay):
    for idx in by_dtypes(params, exp_avgs).values():
        ms = [exp_avgs[i] for i in idx]
        hs = [hessians[i] for i in idx]
        dtype = ms[0].dtype
        if is_narrow(dtype):
            _single_tensor_sophia(pick(params, idx), pick(grads, idx), ms, hs, pick(hessian_estimates, idx),
                                  lr=lr, beta1=beta1, beta2=beta2, rho=rho, eps=eps, weight_decay=weight_decay)
            continue
        torch._foreach_lerp_(ms, [as_dtype(grads[i], dtype) for i in idx], 1 - beta1)
        if hessian_estimates is not None:
            torch._foreach_lerp_(hs, [as_dtype(hessian_estimates[i], dtype) for i in idx], 1 - beta2)
        denoms = torch._foreach_mul(hs, rho)
        torch._foreach_clamp_min_(denoms, eps)
        ratios = torch._foreach_div(ms, denoms)
        torch._foreach_clamp_min_(ratios, -1)
        torch._foreach_clamp_max_(ratios, 1)
        ps = [as_dtype(params[i], dtype) for i in idx]
        if weight_decay != 0:
            torch._foreach_mul_(ps, 1 - lr * weight_decay)
        torch._foreach_add_(ps, ratios, alpha=-lr)
        round_into_([params[i] for i in idx], ps)
