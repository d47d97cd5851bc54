"""ESGD-M: equilibrated SGD with quasi-hyperbolic momentum.

Follows docs/esgd-m.md: the preconditioner of ESGD (Dauphin, de Vries & Bengio, "Equilibrated adaptive
learning rates for non-convex optimization", NeurIPS 2015), an EMA of squared Hessian-vector products with
Rademacher probes, combined with the quasi-hyperbolic momentum of Ma & Yarats (ICLR 2019), bias
corrections as in Adam, an exponential learning-rate warmup and decoupled weight decay.

The update is behind one functional entry point, :func:`esgd_m`, with a single-tensor kernel kept as the
readable reference and a multi-tensor (``torch._foreach_*``) kernel used by default.  Between HVP steps the
denominator ``sqrt(d) / sqrt(1 - b2) + eps`` cannot change, so it is kept in the state and a plain step
touches only ``m``, the gradient and the parameter.  An HVP step replaces it, so it is freed before the
product's double backward (one parameter-sized tensor less at the step's memory peak) and rebuilt from
``d`` if that step never reaches its update.

Both kernels accept parameters narrower than their state (bfloat16 or float16 parameters with float32
state, the default ``state_dtype``): the update is computed on a copy of the parameter in the state's
dtype, from the gradient cast up, and rounded into the parameter once.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import Tensor

from ._base import (HessianOptimizer, PairedSquares, as_dtype, by_dtypes, check_betas, check_range,
                    decay_where_curved_, is_narrow, mark_zero_curvature_, pick, round_into_, state_dtype_for)

__all__ = ["ESGD", "ESGDMax", "esgd_m"]


class ESGD(HessianOptimizer):
    r"""ESGD-M: a stochastic second-order optimizer preconditioned by an estimate of sqrt(diag(H^2)).

    ``sqrt(diag(H^2))``, the row norms of H, is ESGD's equilibration preconditioner: the mean of
    ``(H z)^2`` over Rademacher probes is ``diag(H^2)``.  docs/esgd-m.md calls it diag(|H|): it scales
    the same way and equals it for a diagonal H.

    .. math::
        \begin{aligned}
            &m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t, \qquad b_{1,t} = \beta_1^t, \qquad w_t = \rho^t \\
            &\textbf{on an HVP step } (z \sim \text{Rademacher}):\;
                d \leftarrow \beta_2 d + (1-\beta_2) (H_t z)^2, \quad b_2 \leftarrow \beta_2 b_2 \\
            &\text{denom} = \sqrt{d} / \sqrt{1 - b_2} + \epsilon, \qquad
                \eta_t = \text{lr} \cdot (1 - w_t) \\
            &\hat m_t = \nu m_t + (1-\nu) g_t, \qquad c_t = 1 - b_{1,t} \nu \\
            &\theta_t = \theta_{t-1} (1 - \lambda \eta_t) - \eta_t \, \hat m_t / (c_t \, \text{denom})
        \end{aligned}

    where :math:`\rho` is ``lr_warmup``, :math:`\nu` is ``v`` and :math:`\lambda` is ``weight_decay``.
    A step is an HVP step while fewer than ``d_warmup`` steps are done, and then every
    ``update_d_every`` steps; the training loop must build the gradient's graph on those steps::

        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward(create_graph=opt.should_create_graph())
        opt.step()

    Args:
        params: parameters or parameter groups (``lr``, ``betas``, ``v``, ``lr_warmup``, ``eps`` and
            ``weight_decay`` may differ per group).
        lr: learning rate (default 1; useful values are roughly 1e-3 to 1).
        betas: decay of the gradient EMA and of the EMA ``d`` of squared Hessian-vector products (whose
            mean is diag(H^2)).
        v: quasi-hyperbolic immediate discount; ``None`` means ``betas[0]`` (Nesterov momentum),
            ``1`` plain momentum; QHM's recommendation is ``betas=(0.999, 0.999), v=0.7``.
        lr_warmup: exponential warmup, the step size is ``lr * (1 - lr_warmup ** t)``; 0 disables it.
        eps: added to the denominator.  With ``eps=0`` a coordinate whose curvature estimate ``d`` is
            exactly zero does not move (no step, no weight decay) instead of dividing by zero; only then
            does each step pay for that check.
        weight_decay: decoupled weight decay, scaled by the current step size.
        update_d_every: steps between Hessian-vector products after the warmup.
        d_warmup: number of first steps that all compute a Hessian-vector product.
        generator: optional ``torch.Generator`` for the probes (same seed, same trajectory).
        foreach: use the multi-tensor kernel (default ``True``); ``False`` selects the reference loop.
        hvp_method: ``"autograd"`` (default: exact product by double backward) or
            ``"finite-difference"`` (``(g(theta + r z) - g(theta)) / r`` from one more gradient
            evaluation; needs ``opt.step(closure)`` and no ``create_graph``, so it works with
            ``torch.compile``).
        d_max: keep an exponentially weighted infinity norm ``d = max(beta2 * d, (H z)^2)`` instead of
            the EMA, with no bias correction for it (the ``esgd-m-max`` variant; see :class:`ESGDMax`).
        state_dtype: dtype of ``m``, ``d`` and the cached denominator for parameters narrower than it
            (default ``torch.float32``: a bfloat16 or float16 parameter is updated in float32 and
            rounded once, at 12 bytes of state per parameter instead of 6, plus float32 copies of the
            gradient and the parameter during the update); ``None`` keeps the parameter's dtype.
            Parameters at least as wide keep state of their own dtype (float32 and float64 ones, at
            the default).

    A parameter that first receives a gradient on a step without a product has no curvature estimate
    yet; its momentum is updated but the parameter, weight decay included, is left unchanged until its
    first HVP step.

    Mixed precision: with ``torch.amp.GradScaler`` the loop is
    ``scaler.scale(loss).backward(create_graph=opt.should_create_graph()); scaler.step(opt);
    scaler.update()`` (see :mod:`esgd._base`; a product from a separate loss takes the scaled one,
    ``opt.accumulate_hvp(scaler.scale(loss))``).  The gradient and the product of a loss scaled by
    :math:`S` are both :math:`S` times too large, and ESGD-M is invariant to the loss scale up to
    :math:`\epsilon` (the bias corrections do not depend on it):
    :math:`S m / (\sqrt{S^2 d} + \epsilon) = m / (\sqrt{d} + \epsilon / S)`.  So only
    :math:`\epsilon` would feel the scale, shrunk by :math:`S` (65536 by default); ``step()`` divides
    both by :math:`S`, which keeps :math:`\epsilon` what it says and, for the power-of-two scales
    GradScaler uses, is exact.
    """

    probe = "rademacher"
    squares_products = True     # D is an EMA (or maximum) of (H z)^2

    def __init__(self, params: Iterable, lr: float = 1, betas: tuple[float, float] = (0.9, 0.999),
                 v: float | None = None, lr_warmup: float = 0.99, eps: float = 1e-4,
                 weight_decay: float = 0., update_d_every: int = 10, d_warmup: int = 20, *,
                 generator: torch.Generator | None = None, foreach: bool | None = None,
                 hvp_method: str = "autograd", d_max: bool = False,
                 state_dtype: torch.dtype | None = torch.float32) -> None:
        _validate(lr, betas, v, lr_warmup, eps, weight_decay)
        defaults = dict(lr=lr, betas=tuple(betas), v=v, lr_warmup=lr_warmup, eps=eps,
                        weight_decay=weight_decay, foreach=foreach, d_max=bool(d_max))
        super().__init__(params, defaults, update_d_every=update_d_every, d_warmup=d_warmup,
                         generator=generator, hvp_method=hvp_method, state_dtype=state_dtype)
        for group in self.param_groups:
            _validate(group["lr"], group["betas"], group["v"], group["lr_warmup"], group["eps"],
                      group["weight_decay"])

    def _release_before_hvp(self) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p)
                if state:
                    state["denom"] = None

    def _restore_released(self) -> None:
        # With the eps it was built with, so the rebuilt cache is the released one to the bit.
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p)
                if state and state["denom"] is None:
                    state["denom"] = _denominator(state, state["denom_eps"], group["d_max"])

    def _update(self, hvp_step: bool, hvps: dict[Tensor, Tensor] | PairedSquares | None,
                grads: dict[Tensor, Tensor]) -> None:
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            v = beta1 if group["v"] is None else group["v"]
            params, group_grads, exp_avgs, exp_avg_d_sqs, denoms = [], [], [], [], []
            group_hvps, step_sizes, corrs, sqrt_bc2s = [], [], [], []
            # Paired estimates, and exact products once a paired one is in d, are folded outside the
            # kernel: d may then be negative, and the denominator is built from max(d, floor).
            folded = hvp_step and (isinstance(hvps, PairedSquares)
                                   or any("exp_avg_d_floor" in self.state.get(p, ()) for p in group["params"]))
            for p in group["params"]:
                if p not in grads:
                    continue
                state = self.state[p]
                if len(state) == 0:
                    dtype = state_dtype_for(p.dtype, group["state_dtype"])
                    state["exp_avg"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
                    state["exp_avg_d_sq"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
                    state["denom"] = None        # built below, or by this step's product
                    state["beta1_accum"] = 1.0
                    state["beta2_accum"] = 1.0
                    state["lr_accum"] = 1.0
                    state["denom_eps"] = group["eps"]
                state["beta1_accum"] *= beta1
                state["lr_accum"] *= group["lr_warmup"]
                if hvp_step:
                    state["beta2_accum"] *= beta2
                    if not folded:
                        group_hvps.append(hvps[p])
                elif state["denom"] is None or state["denom_eps"] != group["eps"]:
                    # Released for a product that did not complete, or eps changed since the last
                    # product: rebuild the cached denominator.
                    state["denom"] = _denominator(state, group["eps"], group["d_max"])
                state["denom_eps"] = group["eps"]
                params.append(p)
                group_grads.append(grads[p])
                exp_avgs.append(state["exp_avg"])
                exp_avg_d_sqs.append(state["exp_avg_d_sq"])
                denoms.append(state["denom"])
                # No product yet, so no estimate: a step size of 0 stops weight decay as well.
                no_estimate = state["beta2_accum"] == 1.0
                step_sizes.append(0.0 if no_estimate else group["lr"] * (1 - state["lr_accum"]))
                corrs.append(1 - state["beta1_accum"] * v)
                sqrt_bc2s.append(1.0 if group["d_max"] else math.sqrt(1 - state["beta2_accum"]))
            if not params:
                continue
            if folded:
                denoms = _fold_paired([self.state[p] for p in params], hvps, params, beta2=beta2,
                                      sqrt_bias_corrections2=sqrt_bc2s, eps=group["eps"], d_max=group["d_max"],
                                      foreach=group["foreach"])
            kernel_hvps = group_hvps if hvp_step and not folded else None
            new_denoms = esgd_m(params, group_grads, exp_avgs, exp_avg_d_sqs, denoms, kernel_hvps,
                                step_sizes=step_sizes, corrs=corrs, sqrt_bias_corrections2=sqrt_bc2s,
                                beta1=beta1, beta2=beta2, v=v, eps=group["eps"],
                                weight_decay=group["weight_decay"], foreach=group["foreach"], d_max=group["d_max"])
            for p, d in zip(params, new_denoms):
                self.state[p]["denom"] = d


def _fold_paired(states: list[dict], hvps: dict[Tensor, Tensor] | PairedSquares, params: list[Tensor], *,
                 beta2: float, sqrt_bias_corrections2: list[float], eps: float, d_max: bool,
                 foreach: bool | None) -> list[Tensor]:
    """Fold one product step into ``d`` where the estimates are paired (see
    :meth:`esgd.HessianOptimizer.accumulate_hvp_pair`) and return the new denominators.

    ``d`` averages the signed estimates and ``exp_avg_d_floor`` their noise terms; the denominator is
    built from the larger.  An exact product, once ``d`` holds paired estimates, adds its square to
    ``d`` and nothing to the floor.  With ``d_max`` each estimate is floored as it comes instead.
    State in bfloat16 or float16 takes the single-tensor operations, as in the kernels.
    """
    ds = [state["exp_avg_d_sq"] for state in states]
    if isinstance(hvps, PairedSquares):
        squares = [as_dtype(hvps.squares[p], d.dtype) for p, d in zip(params, ds)]
        noise = [as_dtype(hvps.floors[p], d.dtype) for p, d in zip(params, ds)]
    else:
        squares = [as_dtype(hvps[p], d.dtype) for p, d in zip(params, ds)]
        squares = [h * h for h in squares]
        noise = None
    floors = None if d_max else [
        state.setdefault("exp_avg_d_floor", torch.zeros_like(d, memory_format=torch.preserve_format))
        for state, d in zip(states, ds)]
    if foreach is False or any(is_narrow(d.dtype) for d in ds):
        for i, d in enumerate(ds):
            d.mul_(beta2)
            if d_max:
                torch.maximum(d, squares[i] if noise is None else torch.maximum(squares[i], noise[i]), out=d)
            else:
                d.add_(squares[i], alpha=1 - beta2)
                floors[i].mul_(beta2)
                if noise is not None:
                    floors[i].add_(noise[i], alpha=1 - beta2)
        # the state's bias correction was advanced for this step, as sqrt_bias_corrections2 was
        return [_denominator(state, eps, d_max) for state in states]
    torch._foreach_mul_(ds, beta2)
    if d_max:
        torch._foreach_maximum_(ds, squares if noise is None else torch._foreach_maximum(squares, noise))
        dens = torch._foreach_sqrt(ds)
    else:
        torch._foreach_add_(ds, squares, alpha=1 - beta2)
        torch._foreach_mul_(floors, beta2)
        if noise is not None:
            torch._foreach_add_(floors, noise, alpha=1 - beta2)
        dens = torch._foreach_sqrt(torch._foreach_maximum(ds, floors))
    torch._foreach_div_(dens, sqrt_bias_corrections2)
    torch._foreach_add_(dens, eps)
    if eps == 0:
        mark_zero_curvature_(dens)
    return dens


def _denominator(state: dict, eps: float, d_max: bool) -> Tensor:
    """The cached denominator rebuilt from ``d`` (and, after paired estimates, its floor), with the
    single-tensor kernel's operations (so to the bit what either kernel computed); ``inf`` before the
    first product."""
    d = state["exp_avg_d_sq"]
    if state["beta2_accum"] == 1.0:
        return torch.full_like(d, math.inf, memory_format=torch.preserve_format)
    if "exp_avg_d_floor" in state:
        d = torch.maximum(d, state["exp_avg_d_floor"])
    bc2 = 1.0 if d_max else math.sqrt(1 - state["beta2_accum"])
    denom = d.sqrt().div_(bc2).add_(eps)
    if eps == 0:
        mark_zero_curvature_([denom])
    return denom


def _validate(lr, betas, v, lr_warmup, eps, weight_decay) -> None:
    check_range("lr", lr, 0.0, math.inf)
    check_betas(betas)
    check_range("v", v, 0.0, 1.0, high_open=False, allow_none=True)
    check_range("lr_warmup", lr_warmup, 0.0, 1.0)
    check_range("eps", eps, 0.0, math.inf)
    check_range("weight_decay", weight_decay, 0.0, math.inf)


def esgd_m(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_d_sqs: list[Tensor],
           denoms: list[Tensor], hvps: list[Tensor] | None, *, step_sizes: list[float], corrs: list[float],
           sqrt_bias_corrections2: list[float], beta1: float, beta2: float, v: float, eps: float,
           weight_decay: float, foreach: bool | None = None, d_max: bool = False) -> list[Tensor]:
    """Functional ESGD-M update of one parameter group; see :class:`ESGD` for the maths.

    The per-parameter scalars (``step_sizes``, ``corrs``, ``sqrt_bias_corrections2``) are already
    advanced to this step.  ``hvps`` is ``None`` on a step without a product, in which case ``denoms``
    are used as they are.  With ``d_max`` the squared-product statistic is ``max(beta2 * d, h^2)``
    (pass ``sqrt_bias_corrections2`` of 1).  Returns the denominators to keep for the next step.

    A parameter without a curvature estimate yet must get a step size of 0 and a denominator of ``inf``
    (as :class:`ESGD` passes them), so that it does not move.  With ``eps=0``, denominators computed here
    that are exactly zero become ``inf`` and such coordinates are not decayed either, so they do not
    move; ``denoms`` passed in must follow the same convention.

    The arithmetic runs in the dtype of each parameter's state (``exp_avgs``): a narrower parameter is
    updated on a copy in that dtype and rounded back once, and gradients and products are cast up to it.
    State in bfloat16 or float16 always takes the single-tensor loop (see :func:`esgd._base.is_narrow`).
    """
    if foreach is None:
        foreach = True
    fn = _multi_tensor_esgd_m if foreach and not torch.jit.is_scripting() else _single_tensor_esgd_m
    return fn(params, grads, exp_avgs, exp_avg_d_sqs, denoms, hvps, step_sizes=step_sizes, corrs=corrs,
              sqrt_bias_corrections2=sqrt_bias_corrections2, beta1=beta1, beta2=beta2, v=v, eps=eps,
              weight_decay=weight_decay, d_max=d_max)


def _single_tensor_esgd_m(params, grads, exp_avgs, exp_avg_d_sqs, denoms, hvps, *, step_sizes, corrs,
                          sqrt_bias_corrections2, beta1, beta2, v, eps, weight_decay, d_max):
    new_denoms = []
    for i, param in enumerate(params):
        m = exp_avgs[i]
        g = as_dtype(grads[i], m.dtype)
        p = as_dtype(param, m.dtype)
        m.lerp_(g, 1 - beta1)
        denom = denoms[i]
        if hvps is not None:
            h, d = as_dtype(hvps[i], m.dtype), exp_avg_d_sqs[i]
            if d_max:
                torch.maximum(d.mul_(beta2), h * h, out=d)
            else:
                d.mul_(beta2).addcmul_(h, h, value=1 - beta2)
            denom = d.sqrt().div_(sqrt_bias_corrections2[i]).add_(eps)
            if eps == 0:
                mark_zero_curvature_([denom])
        new_denoms.append(denom)
        if weight_decay != 0:
            if eps == 0:
                decay_where_curved_([p], [1 - weight_decay * step_sizes[i]], [denom])
            else:
                p.mul_(1 - weight_decay * step_sizes[i])
        numerator = m if v == 1 else torch.lerp(g, m, v)
        p.addcdiv_(numerator, denom, value=-step_sizes[i] / corrs[i])
        if p is not param:
            param.copy_(p)
    return new_denoms


def _multi_tensor_esgd_m(params, grads, exp_avgs, exp_avg_d_sqs, denoms, hvps, *, step_sizes, corrs,
                         sqrt_bias_corrections2, beta1, beta2, v, eps, weight_decay, d_max):
    new_denoms: list[Tensor | None] = [None] * len(params)
    for idx in by_dtypes(params, exp_avgs).values():
        ms = [exp_avgs[i] for i in idx]
        dtype = ms[0].dtype
        if is_narrow(dtype):
            out = _single_tensor_esgd_m(
                pick(params, idx), pick(grads, idx), ms, pick(exp_avg_d_sqs, idx), pick(denoms, idx),
                pick(hvps, idx), step_sizes=pick(step_sizes, idx), corrs=pick(corrs, idx),
                sqrt_bias_corrections2=pick(sqrt_bias_corrections2, idx), beta1=beta1, beta2=beta2, v=v,
                eps=eps, weight_decay=weight_decay, d_max=d_max)
            for j, i in enumerate(idx):
                new_denoms[i] = out[j]
            continue
        ps = [as_dtype(params[i], dtype) for i in idx]
        gs = [as_dtype(grads[i], dtype) for i in idx]
        torch._foreach_lerp_(ms, gs, 1 - beta1)
        if hvps is not None:
            hs = [as_dtype(hvps[i], dtype) for i in idx]
            ds = [exp_avg_d_sqs[i] for i in idx]
            torch._foreach_mul_(ds, beta2)
            if d_max:
                torch._foreach_maximum_(ds, torch._foreach_mul(hs, hs))
            else:
                torch._foreach_addcmul_(ds, hs, hs, value=1 - beta2)
            dens = torch._foreach_sqrt(ds)
            torch._foreach_div_(dens, [sqrt_bias_corrections2[i] for i in idx])
            torch._foreach_add_(dens, eps)
            if eps == 0:
                mark_zero_curvature_(dens)
        else:
            dens = [denoms[i] for i in idx]
        if weight_decay != 0:
            factors = [1 - weight_decay * step_sizes[i] for i in idx]
            if eps == 0:
                decay_where_curved_(ps, factors, dens)
            else:
                torch._foreach_mul_(ps, factors)
        numerators = ms if v == 1 else torch._foreach_lerp(gs, ms, v)
        torch._foreach_addcdiv_(ps, numerators, dens, [-step_sizes[i] / corrs[i] for i in idx])
        round_into_([params[i] for i in idx], ps)
        for j, i in enumerate(idx):
            new_denoms[i] = dens[j]
    return new_denoms


class ESGDMax(ESGD):
    r"""ESGD-M with an exponentially weighted infinity norm of the squared products.

    Identical to :class:`ESGD` except on HVP steps, where :math:`d \leftarrow \max(\beta_2 d, (H z)^2)`
    replaces the EMA and the denominator is :math:`\sqrt{d} + \epsilon` with no bias correction (the
    running maximum is not biased towards zero the way a zero-initialised EMA is).
    """

    def __init__(self, params: Iterable, lr: float = 1, betas: tuple[float, float] = (0.9, 0.999),
                 v: float | None = None, lr_warmup: float = 0.99, eps: float = 1e-4,
                 weight_decay: float = 0., update_d_every: int = 10, d_warmup: int = 20, *,
                 generator: torch.Generator | None = None, foreach: bool | None = None,
                 hvp_method: str = "autograd", state_dtype: torch.dtype | None = torch.float32) -> None:
        super().__init__(params, lr, betas, v, lr_warmup, eps, weight_decay, update_d_every, d_warmup,
                         generator=generator, foreach=foreach, hvp_method=hvp_method, d_max=True,
                         state_dtype=state_dtype)
