"""Plain ESGD: the equilibrated SGD of Dauphin, de Vries & Bengio (NeurIPS 2015), for comparison.

No momentum, no warmup, no bias correction: the preconditioner is the plain running average of
squared Hessian-vector products, ``sqrt(D / i)`` over the ``i`` products so far, with Gaussian probes as in
the paper (Rademacher on request).  The estimate is refreshed every ``update_d_every`` steps (the paper
used 20) after ``d_warmup`` steps that each compute one.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import Tensor

from ._base import HessianOptimizer, check_range, decay_where_curved_, mark_zero_curvature_

__all__ = ["PlainESGD", "esgd_plain"]


class PlainESGD(HessianOptimizer):
    r"""Equilibrated SGD (Dauphin et al., 2015, Algorithm 1).

    .. math::
        \begin{aligned}
            &\textbf{on an HVP step } (z \sim \mathcal{N}(0, I)):\;
                D \leftarrow D + (H_t z)^2, \quad i \leftarrow i + 1 \\
            &\theta_t = \theta_{t-1} (1 - \text{lr}\,\lambda) - \text{lr} \cdot g_t / (\sqrt{D / i} + \epsilon)
        \end{aligned}

    Args:
        params: parameters or parameter groups (``lr``, ``eps`` and ``weight_decay`` may differ per group).
        lr: learning rate (default 0.1).
        eps: damping added to the denominator (the paper's lambda).  With ``eps=0`` a coordinate whose
            estimate ``D`` is exactly zero does not move (no step, no weight decay) instead of dividing
            by zero; only then does each step pay for that check.
        weight_decay: decoupled weight decay, scaled by ``lr``.
        update_d_every: steps between products after the warmup (default 20, as in the paper).
        d_warmup: number of first steps that all compute a product (default 10).
        probe: ``"gaussian"`` (the paper) or ``"rademacher"`` (lower variance).
        generator: optional ``torch.Generator`` for the probes.
        foreach: use the multi-tensor kernel (default ``True``).
        hvp_method: ``"autograd"`` (exact) or ``"finite-difference"`` (needs ``opt.step(closure)``).

    The loop is the same as ESGD-M's: ``loss.backward(create_graph=opt.should_create_graph())``.
    A parameter that first receives a gradient on a step without a product is left unchanged, weight
    decay included, until its first HVP step.
    """

    def __init__(self, params: Iterable, lr: float = 0.1, eps: float = 1e-4, weight_decay: float = 0.,
                 update_d_every: int = 20, d_warmup: int = 10, probe: str = "gaussian", *,
                 generator: torch.Generator | None = None, foreach: bool | None = None,
                 hvp_method: str = "autograd") -> None:
        check_range("lr", lr, 0.0, math.inf)
        check_range("eps", eps, 0.0, math.inf)
        check_range("weight_decay", weight_decay, 0.0, math.inf)
        if probe not in ("gaussian", "rademacher"):
            raise ValueError(f"Invalid probe: {probe!r} (must be 'gaussian' or 'rademacher')")
        defaults = dict(lr=lr, eps=eps, weight_decay=weight_decay, foreach=foreach)
        super().__init__(params, defaults, update_d_every=update_d_every, d_warmup=d_warmup,
                         generator=generator, hvp_method=hvp_method)
        self.probe = probe
        for group in self.param_groups:
            check_range("lr", group["lr"], 0.0, math.inf)
            check_range("eps", group["eps"], 0.0, math.inf)
            check_range("weight_decay", group["weight_decay"], 0.0, math.inf)

    def _update(self, hvp_step: bool, hvps: dict[Tensor, Tensor] | None) -> None:
        for group in self.param_groups:
            params, grads, d_sums, hs, counts = [], [], [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if len(state) == 0:
                    state["d_sum"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["hvp_count"] = 0
                if hvp_step:
                    state["hvp_count"] += 1
                    hs.append(hvps[p])
                params.append(p)
                grads.append(p.grad)
                d_sums.append(state["d_sum"])
                counts.append(state["hvp_count"])
            if params:
                esgd_plain(params, grads, d_sums, hs if hvp_step else None, counts=counts, lr=group["lr"],
                           eps=group["eps"], weight_decay=group["weight_decay"], foreach=group["foreach"])


def esgd_plain(params: list[Tensor], grads: list[Tensor], d_sums: list[Tensor], hvps: list[Tensor] | None,
               *, counts: list[int], lr: float, eps: float, weight_decay: float,
               foreach: bool | None = None) -> None:
    """Functional plain-ESGD update of one parameter group; see :class:`PlainESGD`.

    A parameter whose ``count`` is still 0 (no product yet) is left unchanged, and so is, with ``eps=0``,
    a coordinate whose ``d_sum`` is exactly zero.
    """
    live = [i for i, c in enumerate(counts) if c > 0]
    if hvps is not None:
        if foreach is None or foreach:
            torch._foreach_addcmul_(d_sums, hvps, hvps)
        else:
            for d, h in zip(d_sums, hvps):
                d.addcmul_(h, h)
    if not live:
        return
    ps = [params[i] for i in live]
    gs = [grads[i] for i in live]
    if foreach is None or foreach:
        denoms = torch._foreach_div([d_sums[i] for i in live], [float(counts[i]) for i in live])
        torch._foreach_sqrt_(denoms)
        torch._foreach_add_(denoms, eps)
        if eps == 0:
            mark_zero_curvature_(denoms)
        if weight_decay != 0:
            if eps == 0:
                decay_where_curved_(ps, [1 - lr * weight_decay] * len(ps), denoms)
            else:
                torch._foreach_mul_(ps, 1 - lr * weight_decay)
        torch._foreach_addcdiv_(ps, gs, denoms, value=-lr)
    else:
        for i, p, g in zip(live, ps, gs):
            denom = (d_sums[i] / counts[i]).sqrt_().add_(eps)
            if eps == 0:
                mark_zero_curvature_([denom])
            if weight_decay != 0:
                if eps == 0:
                    decay_where_curved_([p], [1 - lr * weight_decay], [denom])
                else:
                    p.mul_(1 - lr * weight_decay)
            p.addcdiv_(g, denom, value=-lr)
