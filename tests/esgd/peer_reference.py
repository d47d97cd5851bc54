"""Independent float64 references for the second-order peers, AdaHessian and Sophia-H, from their papers.

Like tests/esgd/reference.py: plain loops over parameters, Python-float bookkeeping and Hessian-vector
products from the explicit Hessian of a flat parameter vector, so nothing is shared with the package.
The probes are the ones the optimizer drew (recorded).  Both papers count the estimate's schedule the
same way: a product on each of the first ``d_warmup`` steps and then every ``every`` steps, so the
product steps are those at least ``every`` steps after the previous one.
"""

from __future__ import annotations

import torch

DTYPE = torch.float64
CONV_SHAPES = [(2, 1, 3, 3), (2,), (2, 8)]


def conv_data(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(8, 1, 4, 4, generator=gen, dtype=DTYPE)
    y = torch.randn(8, 2, generator=gen, dtype=DTYPE)
    init = [torch.randn(s, generator=gen, dtype=DTYPE) * 0.4 for s in CONV_SHAPES]
    return x, y, init


def conv_loss(params, x, y, t: int):
    """A 3x3 convolution, tanh and a linear read-out, on a minibatch that changes with the step t."""
    w, b, v = params
    rows = slice((t % 2) * 4, (t % 2) * 4 + 4)
    hidden = torch.tanh(torch.nn.functional.conv2d(x[rows], w, b)).flatten(1)
    return ((hidden @ v.T - y[rows]) ** 2).mean()


def grad_and_hvp(loss, params, probes):
    """The gradient at ``params`` and, when ``probes`` is given, ``H z`` from the explicit Hessian."""
    ps = [p.detach().clone().requires_grad_(True) for p in params]
    grads = [g.detach() for g in torch.autograd.grad(loss(ps), ps)]
    if probes is None:
        return grads, None
    sizes = [p.numel() for p in params]

    def flat_loss(flat):
        return loss([q.view(p.shape) for q, p in zip(torch.split(flat, sizes), params)])

    flat = torch.cat([p.detach().reshape(-1) for p in params])
    hess = torch.autograd.functional.hessian(flat_loss, flat, vectorize=True)
    hz = hess @ torch.cat([z.reshape(-1) for z in probes])
    return grads, [part.view(p.shape) for part, p in zip(torch.split(hz, sizes), params)]


def _schedule(steps, every, d_warmup):
    last = None
    for t in range(steps):
        hvp_step = t < d_warmup or t - last >= every
        if hvp_step:
            last = t
        yield t, hvp_step


def adahessian_reference(init, loss, *, steps, probes, groups, every=1, d_warmup=1, spatial=True):
    """AdaHessian (Yao et al. 2021, Algorithm 1) with decoupled weight decay.

    ``loss(params, t)`` is step t's loss; ``groups`` is a list of (param indices, dict with lr, betas,
    eps, weight_decay, hessian_power); ``spatial=False`` skips the convolution averaging (a control).
    """
    params = [p.clone() for p in init]
    n = len(params)
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    t1 = [0] * n       # steps taken by each parameter
    t2 = [0] * n       # products seen by each parameter
    probes = list(probes)
    trajectory = []
    for t, hvp_step in _schedule(steps, every, d_warmup):
        z = probes.pop(0) if hvp_step else None
        g, hz = grad_and_hvp(lambda ps: loss(ps, t), params, z)
        new = list(params)
        for idx, hp in groups:
            beta1, beta2 = hp["betas"]
            for i in idx:
                t1[i] += 1
                m[i] = beta1 * m[i] + (1 - beta1) * g[i]
                if hvp_step:
                    d = z[i] * hz[i]
                    if spatial and d.dim() == 4:
                        block = d.abs().sum(dim=(2, 3), keepdim=True) / (d.shape[2] * d.shape[3])
                        d = block * torch.ones_like(d)
                    t2[i] += 1
                    v[i] = beta2 * v[i] + (1 - beta2) * d * d
                m_hat = m[i] / (1 - beta1 ** t1[i])
                v_hat = v[i] / (1 - beta2 ** t2[i])
                denom = v_hat ** (hp["hessian_power"] / 2) + hp["eps"]
                new[i] = params[i] - hp["lr"] * (m_hat / denom + hp["weight_decay"] * params[i])
        params = new
        trajectory.append([p.clone() for p in params])
    return trajectory


def sophia_reference(init, loss, *, steps, probes, groups, every=10, d_warmup=1, stats=None):
    """Sophia-H (Liu et al. 2023, Algorithm 3, Hutchinson estimator).

    ``groups`` holds (param indices, dict with lr, betas, rho, eps, weight_decay).  ``stats``, a dict,
    collects how many coordinate updates were clipped and how many were not.
    """
    params = [p.clone() for p in init]
    m = [torch.zeros_like(p) for p in params]
    h = [torch.zeros_like(p) for p in params]
    probes = list(probes)
    trajectory = []
    for t, hvp_step in _schedule(steps, every, d_warmup):
        z = probes.pop(0) if hvp_step else None
        g, hz = grad_and_hvp(lambda ps: loss(ps, t), params, z)
        new = list(params)
        for idx, hp in groups:
            beta1, beta2 = hp["betas"]
            lr = hp["lr"]
            for i in idx:
                m[i] = beta1 * m[i] + (1 - beta1) * g[i]
                if hvp_step:
                    h[i] = beta2 * h[i] + (1 - beta2) * z[i] * hz[i]
                ratio = m[i] / torch.maximum(hp["rho"] * h[i], torch.full_like(h[i], hp["eps"]))
                clipped = torch.clamp(ratio, -1.0, 1.0)
                if stats is not None:
                    stats["clipped"] = stats.get("clipped", 0) + int((ratio.abs() > 1).sum())
                    stats["unclipped"] = stats.get("unclipped", 0) + int((ratio.abs() < 1).sum())
                p = params[i] - lr * hp["weight_decay"] * params[i]
                new[i] = p - lr * clipped
        params = new
        trajectory.append([p.clone() for p in params])
    return trajectory
