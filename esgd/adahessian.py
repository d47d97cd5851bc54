"""AdaHessian: Adam with the squared gradient replaced by a squared Hessian-diagonal estimate.

Follows Yao, Gholami, Shen, Mustafa, Keutzer & Mahoney, "ADAHESSIAN: An Adaptive Second Order Optimizer
for Machine Learning", AAAI 2021 (Algorithm 1): a Hutchinson estimate ``D = z * (H z)`` of diag(H) with
Rademacher probes, averaged over the spatial positions of each convolution kernel, an Adam-style first
moment of the gradient and second moment of ``D^2`` with bias corrections, the Hessian power ``k`` and
AdamW's decoupled weight decay.  ``D`` is unbiased for diag(H), but ``E[D^2] = diag(H^2)`` (before the
spatial average), not ``diag(H)^2``: the off-diagonal entries of H enter through the probe's cross terms.

The paper estimates the Hessian on every step (``update_d_every=1``, the default here); larger values
reuse the last second moment in between.  :class:`HutchinsonOptimizer`, shared with Sophia-H, adds to
the package's base class what both peers need: the probe ``z`` itself (their estimate is ``z * (H z)``,
not ``(H z)^2``) and a schedule with a product every ``update_d_every`` steps, as both papers count.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import Tensor

from ._base import (HessianOptimizer, as_dtype, by_dtypes, check_betas, check_range, decay_where_curved_,
                    is_narrow, mark_zero_curvature_, pick, round_into_, state_dtype_for)

__all__ = ["AdaHessian", "HutchinsonOptimizer", "adahessian", "spatial_average"]


class HutchinsonOptimizer(HessianOptimizer):
    """A :class:`HessianOptimizer` whose curvature estimate is ``z * (H z)`` (Hutchinson's diag(H)).

    Schedule: a product on each of the first ``d_warmup`` steps, then on every ``update_d_every``-th
    step (steps 1, 1 + k, 1 + 2k, ... for ``d_warmup=1``), i.e. ``update_d_every - 1`` plain steps
    between two products.  The probes drawn for a step are kept until ``_update`` has used them.
    """

    probe = "rademacher"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._step_probes: dict[Tensor, Tensor] = {}

    def _probe_for(self, p: Tensor) -> Tensor:
        z = super()._probe_for(p)
        self._step_probes[p] = z
        return z

    def _diagonal_estimates(self, params: list[Tensor], hvps: dict[Tensor, Tensor]) -> list[Tensor]:
        """``z * (H z)`` for each parameter, with the probes this step drew (``step`` forgets them), in
        the dtype of the product (the state's; the probe is cast, which a Rademacher sign survives)."""
        hs = [hvps[p] for p in params]
        probes = [as_dtype(self._step_probes[p], h.dtype) for p, h in zip(params, hs)]
        return torch._foreach_mul(hs, probes) if params else []

    def step(self, closure=None):
        try:
            return super().step(closure)
        finally:
            self._step_probes.clear()


def spatial_average(d: Tensor) -> Tensor:
    """The paper's spatial averaging: a convolution kernel's estimate averaged over its spatial positions.

    Weights with 3 or more dimensions are taken as ``(out, in, *kernel)`` convolution kernels and get the
    mean of ``|D|`` over the kernel dimensions, broadcast back to the kernel's shape (averaging
    magnitudes keeps the probe's random signs from cancelling the block's curvature).  Biases and
    linear weights (1-D, 2-D) are returned unchanged.
    """
    if d.dim() <= 2:
        return d
    return d.abs().mean(dim=tuple(range(2, d.dim())), keepdim=True).expand_as(d)


class AdaHessian(HutchinsonOptimizer):
    r"""AdaHessian (Yao et al., AAAI 2021): Adam preconditioned by a Hutchinson estimate of diag(H).

    .. math::
        \begin{aligned}
            &\textbf{on an HVP step } (z \sim \text{Rademacher}):\;
                D_t = \operatorname{avg}_{\text{spatial}}\bigl(z \odot H_t z\bigr), \quad
                v \leftarrow \beta_2 v + (1-\beta_2) D_t^2, \quad b_2 \leftarrow \beta_2 b_2 \\
            &m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t, \qquad
                \hat m_t = \frac{m_t}{1 - \beta_1^t}, \qquad \hat v = \frac{v}{1 - b_2} \\
            &\theta_t = \theta_{t-1} (1 - \eta \lambda) - \eta \, \frac{\hat m_t}{\hat v^{k/2} + \epsilon}
        \end{aligned}

    where :math:`\eta` is ``lr``, :math:`\lambda` is ``weight_decay``, :math:`k` is ``hessian_power``
    and :math:`b_2 = \beta_2^{n}` after :math:`n` products.  The spatial average of a convolution
    kernel (3 or more dimensions, ``(out, in, *kernel)``) is the mean of :math:`|D|` over the kernel's
    positions; biases and linear weights keep :math:`D` as it is (see :func:`spatial_average`).

    The loop builds the gradient's graph on HVP steps (every step by default)::

        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward(create_graph=opt.should_create_graph())
        opt.step()

    Args:
        params: parameters or parameter groups (``lr``, ``betas``, ``eps``, ``weight_decay`` and
            ``hessian_power`` may differ per group).
        lr: learning rate (default 0.15, the paper's).
        betas: decay of the gradient EMA and of the EMA of ``D^2``.
        eps: added to the denominator (default 1e-4).  With ``eps=0`` a coordinate whose denominator
            is exactly zero (a zero second moment and ``hessian_power > 0``) does not move (no step, no
            weight decay) instead of dividing by zero; only then does each step pay for that check.
        weight_decay: decoupled weight decay as in AdamW, ``theta *= 1 - lr * weight_decay``.
        hessian_power: the power ``k`` in ``v_hat^(k/2)``, in [0, 1] (1 is the paper's default).
        update_d_every: a product every this many steps (default 1: every step, as in the paper);
            in between, the last second moment is used.
        d_warmup: number of first steps that all compute a product.
        generator: optional ``torch.Generator`` for the probes.
        foreach: use the multi-tensor kernel (default ``True``); ``False`` selects the reference loop.
        hvp_method: ``"autograd"`` (default) or ``"finite-difference"`` (needs ``opt.step(closure)``).
        state_dtype: dtype of both moments for parameters narrower than it (default ``torch.float32``:
            a bfloat16 or float16 parameter is updated in float32 and rounded once, at 8 bytes of
            state per parameter instead of 4, plus float32 copies of the gradient and the parameter
            during the update); ``None`` keeps the parameter's dtype.

    A parameter that first receives a gradient on a step without a product has no curvature estimate
    yet; its momentum is updated but the parameter, weight decay included, is left unchanged until its
    first HVP step.

    Mixed precision: with ``torch.amp.GradScaler`` the loop is
    ``scaler.scale(loss).backward(create_graph=opt.should_create_graph()); scaler.step(opt);
    scaler.update()`` (see :mod:`esgd._base`).  The gradient and the product of a loss scaled by
    :math:`S` are :math:`S` times too large, and so is :math:`D = z \odot H z`.  Left in,
    :math:`\hat m` would grow by :math:`S` and :math:`\hat v^{k/2}` by :math:`S^k`: the step would grow
    by :math:`S^{1-k}` (256-fold at :math:`k = 1/2` and the default scale 65536), and even at
    :math:`k = 1` the scale would divide :math:`\epsilon` by :math:`S`.  ``step()`` divides the
    gradient and the product by :math:`S` before either is used (exactly, for GradScaler's powers of two).
    """

    def __init__(self, params: Iterable, lr: float = 0.15, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-4, weight_decay: float = 0., hessian_power: float = 1.,
                 update_d_every: int = 1, d_warmup: int = 1, *, generator: torch.Generator | None = None,
                 foreach: bool | None = None, hvp_method: str = "autograd",
                 state_dtype: torch.dtype | None = torch.float32) -> None:
        _validate(lr, betas, eps, weight_decay, hessian_power)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        hessian_power=hessian_power, foreach=foreach)
        super().__init__(params, defaults, update_d_every=update_d_every, d_warmup=d_warmup,
                         generator=generator, hvp_method=hvp_method, state_dtype=state_dtype)
        for group in self.param_groups:
            _validate(group["lr"], group["betas"], group["eps"], group["weight_decay"],
                      group["hessian_power"])

    def _update(self, hvp_step: bool, hvps: dict[Tensor, Tensor] | None, grads: dict[Tensor, Tensor]) -> None:
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            params = [p for p in group["params"] if p in grads]
            if not params:
                continue
            diags = None
            if hvp_step:
                diags = [spatial_average(d) for d in self._diagonal_estimates(params, hvps)]
            exp_avgs, exp_avg_d_sqs, bc1s, bc2s = [], [], [], []
            for p in params:
                state = self.state[p]
                if len(state) == 0:
                    dtype = state_dtype_for(p.dtype, group["state_dtype"])
                    state["exp_avg"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
                    state["exp_avg_d_sq"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
                    state["beta1_accum"] = 1.0
                    state["beta2_accum"] = 1.0
                state["beta1_accum"] *= beta1
                if hvp_step:
                    state["beta2_accum"] *= beta2
                exp_avgs.append(state["exp_avg"])
                exp_avg_d_sqs.append(state["exp_avg_d_sq"])
                bc1s.append(1 - state["beta1_accum"])
                bc2s.append(1 - state["beta2_accum"])
            adahessian(params, [grads[p] for p in params], exp_avgs, exp_avg_d_sqs, diags,
                       bias_corrections1=bc1s, bias_corrections2=bc2s, beta1=beta1, beta2=beta2,
                       lr=group["lr"], eps=group["eps"], weight_decay=group["weight_decay"],
                       hessian_power=group["hessian_power"], foreach=group["foreach"])


def _validate(lr, betas, eps, weight_decay, hessian_power) -> None:
    check_range("lr", lr, 0.0, math.inf)
    check_betas(betas)
    check_range("eps", eps, 0.0, math.inf)
    check_range("weight_decay", weight_decay, 0.0, math.inf)
    check_range("hessian_power", hessian_power, 0.0, 1.0, high_open=False)


def adahessian(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
               exp_avg_d_sqs: list[Tensor], hessian_diags: list[Tensor] | None, *,
               bias_corrections1: list[float], bias_corrections2: list[float], beta1: float, beta2: float,
               lr: float, eps: float, weight_decay: float, hessian_power: float,
               foreach: bool | None = None) -> None:
    """Functional AdaHessian update of one parameter group; see :class:`AdaHessian` for the maths.

    ``hessian_diags`` holds this step's (spatially averaged) estimates ``D``, or is ``None`` on a step
    without a product.  ``bias_corrections1/2`` are ``1 - beta1^t`` and ``1 - beta2^n``, already
    advanced to this step; a parameter whose ``bias_corrections2`` is still 0 (no product yet) only
    updates its first moment.  With ``eps=0`` a coordinate whose denominator is exactly zero does not
    move either.  The arithmetic runs in the dtype of each parameter's moments: a narrower parameter is
    updated on a copy in that dtype and rounded back once.  Moments in bfloat16 or float16 always take
    the single-tensor loop (see :func:`esgd._base.is_narrow`).
    """
    if foreach is None:
        foreach = True
    fn = _multi_tensor_adahessian if foreach and not torch.jit.is_scripting() else _single_tensor_adahessian
    fn(params, grads, exp_avgs, exp_avg_d_sqs, hessian_diags, bias_corrections1=bias_corrections1,
       bias_corrections2=bias_corrections2, beta1=beta1, beta2=beta2, lr=lr, eps=eps,
       weight_decay=weight_decay, hessian_power=hessian_power)


def _single_tensor_adahessian(params, grads, exp_avgs, exp_avg_d_sqs, hessian_diags, *, bias_corrections1,
                              bias_corrections2, beta1, beta2, lr, eps, weight_decay, hessian_power):
    for i, param in enumerate(params):
        m, v = exp_avgs[i], exp_avg_d_sqs[i]
        m.lerp_(as_dtype(grads[i], m.dtype), 1 - beta1)
        if hessian_diags is not None:
            d = as_dtype(hessian_diags[i], m.dtype)
            v.mul_(beta2).addcmul_(d, d, value=1 - beta2)
        if bias_corrections2[i] == 0:
            continue
        p = as_dtype(param, m.dtype)
        v_hat = v / bias_corrections2[i]
        denom = (v_hat.sqrt_() if hessian_power == 1 else v_hat.pow_(hessian_power / 2)).add_(eps)
        if eps == 0:
            mark_zero_curvature_([denom])
        if weight_decay != 0:
            if eps == 0:
                decay_where_curved_([p], [1 - lr * weight_decay], [denom])
            else:
                p.mul_(1 - lr * weight_decay)
        p.addcdiv_(m, denom, value=-lr / bias_corrections1[i])
        if p is not param:
            param.copy_(p)


def _multi_tensor_adahessian(params, grads, exp_avgs, exp_avg_d_sqs, hessian_diags, *, bias_corrections1,
                             bias_corrections2, beta1, beta2, lr, eps, weight_decay, hessian_power):
    for idx in by_dtypes(params, exp_avgs).values():
        ms = [exp_avgs[i] for i in idx]
        dtype = ms[0].dtype
        if is_narrow(dtype):
            _single_tensor_adahessian(pick(params, idx), pick(grads, idx), ms, pick(exp_avg_d_sqs, idx),
                                      pick(hessian_diags, idx), bias_corrections1=pick(bias_corrections1, idx),
                                      bias_corrections2=pick(bias_corrections2, idx), beta1=beta1, beta2=beta2,
                                      lr=lr, eps=eps, weight_decay=weight_decay, hessian_power=hessian_power)
            continue
        torch._foreach_lerp_(ms, [as_dtype(grads[i], dtype) for i in idx], 1 - beta1)
        if hessian_diags is not None:
            vs = [exp_avg_d_sqs[i] for i in idx]
            ds = [as_dtype(hessian_diags[i], dtype) for i in idx]
            torch._foreach_mul_(vs, beta2)
            torch._foreach_addcmul_(vs, ds, ds, value=1 - beta2)
        live = [i for i in idx if bias_corrections2[i] != 0]
        if not live:
            continue
        denoms = torch._foreach_div([exp_avg_d_sqs[i] for i in live], [bias_corrections2[i] for i in live])
        if hessian_power == 1:
            torch._foreach_sqrt_(denoms)
        else:
            torch._foreach_pow_(denoms, hessian_power / 2)
        torch._foreach_add_(denoms, eps)
        if eps == 0:
            mark_zero_curvature_(denoms)
        ps = [as_dtype(params[i], dtype) for i in live]
        if weight_decay != 0:
            if eps == 0:
                decay_where_curved_(ps, [1 - lr * weight_decay] * len(ps), denoms)
            else:
                torch._foreach_mul_(ps, 1 - lr * weight_decay)
        torch._foreach_addcdiv_(ps, [exp_avgs[i] for i in live], denoms,
                                [-lr / bias_corrections1[i] for i in live])
        round_into_([params[i] for i in live], ps)
