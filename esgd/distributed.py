"""Data-parallel training of the Hessian-vector-product optimizers under ``torch.distributed``.

DistributedDataParallel averages gradients with its reducer, which hooks the first-order backward; it
cannot carry a second backward: in torch 2.x ``loss.backward(create_graph=True)`` through a DDP module
fails ("a leaf Variable that requires grad is being used in an in-place operation"), because the reducer
writes the averaged gradient into ``.grad`` in place.  The scheme used here keeps DDP for what it does
well and adds one collective of its own:

1. Every rank constructs the optimizer with a ``torch.Generator`` seeded identically, so all ranks draw
   the same probe ``z`` on every step (:func:`setup` checks that the generator states agree).
2. The update gradient comes from a plain ``loss.backward()`` through the DDP module (DDP all-reduces it).
3. On an HVP step each rank takes the product of its *local* loss through the unwrapped module
   (``ddp.module``), with ``opt.accumulate_hvp(local_loss)``: the double backward never touches DDP.
4. ``opt.hvp_reduce`` (installed by :func:`setup`) averages the local products across ranks, in one
   flattened buffer and one ``all_reduce`` call, just before the update.  With equal shards the mean of
   the local products ``H_i z`` is ``H z`` of the global batch, so the run matches one process.

Communication: DDP's usual gradient all-reduce every step, plus one all-reduce of parameter size per HVP
step (the products).  Compute: the local product re-runs the forward and backward on the local shard
(the DDP forward cannot be reused for it), so an HVP step costs one extra forward and first-order
backward compared with a single process.

With ``hvp_method="finite-difference"`` (torch.compile) nothing extra is needed: both gradient
evaluations of ``opt.step(closure)`` go through DDP, so the products are already averaged and
:func:`setup` leaves ``hvp_reduce`` unset.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

__all__ = ["setup", "all_reduce_mean_", "generators_agree"]


def _world(group: Any = None) -> int:
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def all_reduce_mean_(tensors: list[torch.Tensor], group: Any = None) -> None:
    """Average ``tensors`` in place across the ranks of ``group``: one flat buffer and one call per dtype
    (one call in practice), as DDP's buckets do, instead of one collective per parameter."""
    world = _world(group)
    if world == 1 or not tensors:
        return
    by_kind: dict[tuple, list[torch.Tensor]] = {}
    for t in tensors:
        by_kind.setdefault((t.dtype, t.device), []).append(t)
    for same in by_kind.values():
        flat = torch.cat([t.reshape(-1) for t in same])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        flat.div_(world)
        offset = 0
        for t in same:
            n = t.numel()
            t.copy_(flat[offset:offset + n].view_as(t))
            offset += n


def generators_agree(generator: torch.Generator, group: Any = None) -> bool:
    """Whether ``generator`` is in the same state on every rank (one small all-reduce)."""
    state = generator.get_state().to(torch.float64)
    # Two different states almost surely differ in this weighted checksum.
    code = torch.stack([state.sum(), (state * torch.arange(1, len(state) + 1, dtype=torch.float64)).sum()])
    if dist.get_backend(group) == "nccl":
        code = code.cuda()
    low, high = code.clone(), code.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN, group=group)
    dist.all_reduce(high, op=dist.ReduceOp.MAX, group=group)
    return bool(torch.equal(low, high))


def setup(opt: torch.optim.Optimizer, group: Any = None) -> torch.optim.Optimizer:
    """Prepare a Hessian-vector-product optimizer for data-parallel training; returns ``opt``.

    Installs ``opt.hvp_reduce`` (an all-reduce mean of the local products over ``group``) when the
    products are local, i.e. with the exact ``hvp_method="autograd"``.  Raises ``ValueError`` when the
    optimizer has no probe generator or the generators differ between ranks: the ranks' products can
    only be averaged when they use the same probe.  The training loop (``model`` is the DDP module)::

        opt = ESGD(model.parameters(), generator=torch.Generator().manual_seed(seed))
        esgd.distributed.setup(opt)
        for x, y in loader:                        # each rank its own shard
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            loss.backward()                        # DDP averages the gradients
            if opt.is_hvp_step():                  # local product, outside DDP's reducer
                opt.accumulate_hvp(loss_fn(model.module(x), y))
            opt.step()                             # hvp_reduce averages the products first

    On a single process (no process group, or a world of one) it does nothing.
    """
    if _world(group) == 1:
        return opt
    name = type(opt).__name__
    if not hasattr(opt, "hvp_reduce"):
        raise ValueError(f"{name} computes no Hessian-vector products; esgd.distributed.setup is not needed")
    gen = getattr(opt, "generator", None)
    if gen is None:
        raise ValueError(f"{name}: data-parallel products need the same probe on every rank; construct the "
                         "optimizer with generator=torch.Generator().manual_seed(SEED), same SEED on all ranks")
    if not generators_agree(gen, group):
        raise ValueError(f"{name}: the probe generators differ between ranks; seed them with the same value")
    if getattr(opt, "hvp_method", "autograd") == "autograd":
        opt.hvp_reduce = lambda products: all_reduce_mean_(products, group)
    return opt
