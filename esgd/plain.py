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

from ._base import (HessianOptimizer, PairedSquares, as_dtype, by_dtypes, check_range, decay_where_curved_,
                    is_narrow, mark_zero_curvature_, pick, round_into_, state_dtype_for)

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
        state_dtype: dtype of ``D`` for parameters narrower than it (default ``torch.float32``: a
            bfloat16 or float16 parameter is updated in float32 and rounded once, at 4 bytes of state
            per parameter instead of 2, plus float32 copies of the gradient and the parameter during
            the update); ``None`` keeps the parameter's dtype.

    The loop is the same as ESGD-M's: ``loss.backward(create_graph=opt.should_create_graph())``.
    A parameter that first receives a gradient on a step without a product is left unchanged, weight
    decay included, until its first HVP step.

    Mixed precision: with ``torch.amp.GradScaler`` the loop is
    ``scaler.scale(loss).backward(create_graph=opt.should_create_graph()); scaler.step(opt);
    scaler.update()`` (see :mod:`esgd._base`).  The gradient and the product of a loss scaled by
    :math:`S` are :math:`S` times too large; as in ESGD-M the scale would cancel,
    :math:`S g / (\sqrt{S^2 D / i} + \epsilon) = g / (\sqrt{D / i} + \epsilon / S)`, except in
    :math:`\epsilon`.  ``step()`` divides both by :math:`S` (exactly, for GradScaler's powers of two).
    """

    squares_products = True     # D is a running sum of (H z)^2

    def __init__(self, params: Iterable, lr: float = 0.1, eps: float = 1e-4, weight_decay: float = 0.,
                 update_d_every: int = 20, d_warmup: int = 10, probe: str = "gaussian", *,
                 generator: torch.Generator | None = None, foreach: bool | None = None,
                 hvp_method: str = "autograd", state_dtype: torch.dtype | None = torch.float32) -> None:
        check_range("lr", lr, 0.0, math.inf)
        check_range("eps", eps, 0.0, math.inf)
        check_range("weight_decay", weight_decay, 0.0, math.inf)
        if probe not in ("gaussian", "rademacher"):
            raise ValueError(f"Invalid probe: {probe!r} (must be 'gaussian' or 'rademacher')")
        defaults = dict(lr=lr, eps=eps, weight_decay=weight_decay, foreach=foreach)
        super().__init__(params, defaults, update_d_every=update_d_every, d_warmup=d_warmup,
                         generator=generator, hvp_method=hvp_method, state_dtype=state_dtype)
        self.probe = probe
        for group in self.param_groups:
            check_range("lr", group["lr"], 0.0, math.inf)
            check_range("eps", group["eps"], 0.0, math.inf)
            check_range("weight_decay", group["weight_decay"], 0.0, math.inf)

    def _update(self, hvp_step: bool, hvps: dict[Tensor, Tensor] | PairedSquares | None,
                grads: dict[Tensor, Tensor]) -> None:
        for group in self.param_groups:
            params, group_grads, d_sums, hs, counts = [], [], [], [], []
            # After a paired estimate D may be negative: the denominator comes from max(D, floor), so the
            # products are folded here and the kernel gets that maximum (see accumulate_hvp_pair).
            folded = (isinstance(hvps, PairedSquares)
                      or any("d_floor" in self.state.get(p, ()) for p in group["params"]))
            for p in group["params"]:
                if p not in grads:
                    continue
                state = self.state[p]
                if len(state) == 0:
                    dtype = state_dtype_for(p.dtype, group["state_dtype"])
                    state["d_sum"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
                    state["hvp_count"] = 0
                if hvp_step:
                    state["hvp_count"] += 1
                    if not folded:
                        hs.append(hvps[p])
                params.append(p)
                group_grads.append(grads[p])
                d_sums.append(state["d_sum"])
                counts.append(state["hvp_count"])
            if not params:
                continue
            if folded:
                states = [self.state[p] for p in params]
                if hvp_step:
                    _fold_paired(states, hvps, params)
                # (a parameter whose first gradient came after the last product has no floor yet)
                d_sums = [torch.maximum(s["d_sum"], s["d_floor"]) if "d_floor" in s else s["d_sum"]
                          for s in states]
                hs = None
            esgd_plain(params, group_grads, d_sums, hs if hvp_step else None, counts=counts, lr=group["lr"],
                       eps=group["eps"], weight_decay=group["weight_decay"], foreach=group["foreach"])


def _fold_paired(states: list[dict], hvps: dict[Tensor, Tensor] | PairedSquares,
                 params: list[Tensor]) -> None:
    """Add one product step to ``D``, where estimates are paired: ``D`` sums the signed estimates and
    ``d_floor`` their noise terms; an exact product adds its square to ``D`` alone."""
    ds = [state["d_sum"] for state in states]
    floors = [state.setdefault("d_floor", torch.zeros_like(d, memory_format=torch.preserve_format))
              for state, d in zip(states, ds)]
    if isinstance(hvps, PairedSquares):
        torch._foreach_add_(ds, [as_dtype(hvps.squares[p], d.dtype) for p, d in zip(params, ds)])
        torch._foreach_add_(floors, [as_dtype(hvps.floors[p], d.dtype) for p, d in zip(params, ds)])
    else:
        hs = [as_dtype(hvps[p], d.dtype) for p, d in zip(params, ds)]
        torch._foreach_addcmul_(ds, hs, hs)


def esgd_plain(params: list[Tensor], grads: list[Tensor], d_sums: list[Tensor], hvps: list[Tensor] | None,
               *, counts: list[int], lr: float, eps: float, weight_decay: float,
               foreach: bool | None = None) -> None:
    """Functional plain-ESGD update of one parameter group; see :class:`PlainESGD`.

    A parameter whose ``count`` is still 0 (no product yet) is left unchanged, and so is, with ``eps=0``,
    a coordinate whose ``d_sum`` is exactly zero.  The arithmetic runs in the dtype of each ``d_sum``: a
    narrower parameter is updated on a copy in that dtype and rounded back once.  ``d_sum`` in bfloat16
    or float16 always takes the single-tensor loop (see :func:`esgd._base.is_narrow`).
    """
    if foreach is None:
        foreach = True
    fn = _multi_tensor_esgd_plain if foreach and not torch.jit.is_scripting() else _single_tensor_esgd_plain
    fn(params, grads, d_sums, hvps, counts=counts, lr=lr, eps=eps, weight_decay=weight_decay)


def _single_tensor_esgd_plain(params, grads, d_sums, hvps, *, counts, lr, eps, weight_decay):
    for i, (param, d) in enumerate(zip(params, d_sums)):
        if hvps is not None:
            h = as_dtype(hvps[i], d.dtype)
            d.addcmul_(h, h)
        if counts[i] == 0:
            continue
        p = as_dtype(param, d.dtype)
        denom = (d / counts[i]).sqrt_().add_(eps)
        if eps == 0:
            mark_zero_curvature_([denom])
        if weight_decay != 0:
            if eps == 0:
                decay_where_curved_([p], [1 - lr * weight_decay], [denom])
            else:
                p.mul_(1 - lr * weight_decay)
        p.addcdiv_(as_dtype(grads[i], d.dtype), denom, value=-lr)
        if p is not param:
            param.copy_(p)


def _multi_tensor_esgd_plain(params, grads, d_sums, hvps, *, counts, lr, eps, weight_decay):
    for idx in by_dtypes(params, d_sums).values():
        dtype = d_sums[idx[0]].dtype
        if is_narrow(dtype):
            _single_tensor_esgd_plain(pick(params, idx), pick(grads, idx), pick(d_sums, idx), pick(hvps, idx),
                                      counts=pick(counts, idx), lr=lr, eps=eps, weight_decay=weight_decay)
            continue
        if hvps is not None:
            hs = [as_dtype(hvps[i], dtype) for i in idx]
            torch._foreach_addcmul_([d_sums[i] for i in idx], hs, hs)
        live = [i for i in idx if counts[i] > 0]
        if not live:
            continue
        ps = [as_dtype(params[i], dtype) for i in live]
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
        torch._foreach_addcdiv_(ps, [as_dtype(grads[i], dtype) for i in live], denoms, value=-lr)
        round_into_([params[i] for i in live], ps)
