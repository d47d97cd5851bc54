"""Independent references for the optimizers, written from the formulas of docs/esgd-m.md.

Plain Python loops over parameters, Python-float bookkeeping, and Hessian-vector products taken from the
explicit Hessian (``torch.autograd.functional.hessian`` of a flat parameter vector), so nothing here shares
code with the package under test.  The probes are the ones the optimizer drew (recorded), since the
comparison is of the update rule, not of the random numbers.
"""

from __future__ import annotations

import math

import torch

DTYPE = torch.float64
SHAPES = [(4, 3), (4,), (2, 4)]


def make_data(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 3, generator=gen, dtype=DTYPE)
    y = torch.randn(16, 2, generator=gen, dtype=DTYPE)
    init = [torch.randn(s, generator=gen, dtype=DTYPE) * 0.5 for s in SHAPES]
    return x, y, init


def batch_rows(t: int, part: slice = slice(None)) -> slice:
    """The rows of step t's minibatch (4 rows that change with t), or ``part`` of them."""
    start, stop, _ = part.indices(4)
    return slice((t % 4) * 4 + start, (t % 4) * 4 + stop)


def loss_fn(params, x, y, t: int, scale: float = 1.0, part: slice = slice(None)):
    """A small tanh network on a minibatch that changes with the step t (deterministically); ``part``
    takes the loss of some of the minibatch's rows only."""
    w1, b1, w2 = params
    rows = batch_rows(t, part)
    return scale * ((torch.tanh(x[rows] @ w1.T + b1) @ w2.T - y[rows]) ** 2).mean()


def flat_hessian(params, x, y, t, scale=1.0, part=slice(None)):
    sizes = [p.numel() for p in params]

    def f(flat):
        parts = torch.split(flat, sizes)
        return loss_fn([q.view(p.shape) for q, p in zip(parts, params)], x, y, t, scale, part)

    flat = torch.cat([p.detach().reshape(-1) for p in params])
    return torch.autograd.functional.hessian(f, flat)


def grads_of(params, x, y, t, scale=1.0):
    ps = [p.detach().clone().requires_grad_(True) for p in params]
    return [g.detach() for g in torch.autograd.grad(loss_fn(ps, x, y, t, scale), ps)]


def hvp(params, x, y, t, probes, scale=1.0, part=slice(None)):
    hess = flat_hessian(params, x, y, t, scale, part)
    h = hess @ torch.cat([z.reshape(-1) for z in probes])
    return [piece.view(p.shape) for piece, p in zip(torch.split(h, [p.numel() for p in params]), params)]


def paired_squares(halves, covers):
    """The paired estimate of (H z)^2 from the products of two sub-batches, element by element: the
    signed estimate a b + covers ((a - b) / 2)^2 and its floor, the noise term covers ((a - b) / 2)^2."""

    def squares(params, x, y, t, probes, scale):
        a = hvp(params, x, y, t, probes, scale, halves[0])
        b = hvp(params, x, y, t, probes, scale, halves[1])
        noise = [covers * ((ai - bi) / 2) ** 2 for ai, bi in zip(a, b)]
        return [ai * bi + ni for ai, bi, ni in zip(a, b, noise)], noise
    return squares


def exact_squares(params, x, y, t, probes, scale):
    return [h * h for h in hvp(params, x, y, t, probes, scale)]


def esgd_m_reference(init, x, y, *, steps, probes, groups, update_d_every=10, d_warmup=20,
                     lr_schedule=None, scale=1.0, d_max=False, squares=exact_squares):
    """ESGD-M, literally as docs/esgd-m.md writes it.

    ``groups`` is a list of (param indices, hyperparameter dict with lr, betas, v, lr_warmup, eps,
    weight_decay); ``probes`` is the list of per-step probe lists of the optimizer's HVP steps;
    ``lr_schedule(t, group_index)`` optionally overrides each group's lr at step t.  ``d_max`` is the
    esgd-m-max variant: d = max(beta2 * d, h^2) and no bias correction of d.  ``squares`` gives the
    estimate of h^2 on HVP steps (default: the product of the step's whole minibatch, squared), or a
    pair (signed estimate, floor): then d averages the estimates, a second average the floors, and the
    denominator takes the larger (with ``d_max``, each estimate is floored at its own floor).
    """
    params = [p.clone() for p in init]
    n = len(params)
    m = [torch.zeros_like(p) for p in params]
    d = [torch.zeros_like(p) for p in params]
    floor = [torch.zeros_like(p) for p in params]
    b1 = [1.0] * n
    b2 = [1.0] * n
    w = [1.0] * n
    steps_done, since_hvp = 0, 0
    probes = list(probes)
    trajectory = []
    for t in range(steps):
        hvp_step = steps_done < d_warmup or since_hvp >= update_d_every
        g = grads_of(params, x, y, t, scale)
        hh = squares(params, x, y, t, probes.pop(0), scale) if hvp_step else None
        hh, nn = hh if isinstance(hh, tuple) else (hh, None)
        new = [None] * n
        for gi, (idx, hp) in enumerate(groups):
            beta1, beta2 = hp["betas"]
            v = beta1 if hp.get("v") is None else hp["v"]
            lr = hp["lr"] if lr_schedule is None else lr_schedule(t, gi)
            for i in idx:
                m[i] = beta1 * m[i] + (1 - beta1) * g[i]
                b1[i] = b1[i] * beta1
                if hvp_step and d_max:
                    d[i] = torch.maximum(beta2 * d[i], hh[i] if nn is None else torch.maximum(hh[i], nn[i]))
                elif hvp_step:
                    d[i] = beta2 * d[i] + (1 - beta2) * hh[i]
                    floor[i] = beta2 * floor[i] + (0.0 if nn is None else (1 - beta2) * nn[i])
                    b2[i] = b2[i] * beta2
                bias = 1.0 if d_max else math.sqrt(1 - b2[i])
                denom = torch.sqrt(torch.maximum(d[i], floor[i])) / bias + hp["eps"]
                w[i] = w[i] * hp["lr_warmup"]
                step_size = lr * (1 - w[i])
                m_hat = v * m[i] + (1 - v) * g[i]
                corr = 1 - b1[i] * v
                p = params[i] * (1 - hp["weight_decay"] * step_size)
                new[i] = p - step_size * m_hat / (corr * denom)
        params = new
        steps_done += 1
        since_hvp = 1 if hvp_step else since_hvp + 1   # reset, then grows by 1 like steps_done
        trajectory.append([p.clone() for p in params])
    return trajectory


def esgd_plain_reference(init, x, y, *, steps, probes, lr, eps, weight_decay=0.0, update_d_every=20,
                         d_warmup=10, scale=1.0, squares=exact_squares):
    """Plain ESGD (Dauphin et al. 2015): p <- p - lr * g / (sqrt(D / i) + eps)."""
    params = [p.clone() for p in init]
    dsum = [torch.zeros_like(p) for p in params]
    floor = [torch.zeros_like(p) for p in params]
    count = 0
    steps_done, since_hvp = 0, 0
    probes = list(probes)
    trajectory = []
    for t in range(steps):
        hvp_step = steps_done < d_warmup or since_hvp >= update_d_every
        g = grads_of(params, x, y, t, scale)
        if hvp_step:
            hh = squares(params, x, y, t, probes.pop(0), scale)
            hh, nn = hh if isinstance(hh, tuple) else (hh, [0.0] * len(hh))
            dsum = [ds + sq for ds, sq in zip(dsum, hh)]
            floor = [fl + ni for fl, ni in zip(floor, nn)]
            count += 1
        params = [p * (1 - lr * weight_decay) - lr * gi / (torch.sqrt(torch.maximum(ds, fl) / count) + eps)
                  for p, gi, ds, fl in zip(params, g, dsum, floor)]
        steps_done += 1
        since_hvp = 1 if hvp_step else since_hvp + 1   # reset, then grows by 1 like steps_done
        trajectory.append([p.clone() for p in params])
    return trajectory
