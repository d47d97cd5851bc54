"""Hessian-vector products through ``torch.nn.functional.scaled_dot_product_attention``.

torch's fused attention kernels (flash, memory-efficient, cuDNN) compute their backward in one opaque
kernel that has no derivative of its own, so a product taken through their graph fails with
``derivative for aten::_scaled_dot_product_..._backward is not implemented``.  The math kernel is
written in ordinary differentiable operations and can be differentiated twice.  :func:`hvp_attention`
selects it for the forward of the steps that build the graph and leaves every other step on the fused
kernel::

    for x, y in loader:
        opt.zero_grad(set_to_none=True)
        with esgd.hvp_attention(opt):
            loss = loss_fn(model(x), y)
        loss.backward(create_graph=opt.should_create_graph())
        opt.step()

The kernel is chosen when the forward runs, so only the forward needs the context; the backward and the
product in ``opt.step()`` follow the graph it recorded.  The math kernel materialises the attention
matrix, so a product step costs more memory as well as time than a plain one.
"""

from __future__ import annotations

import contextlib
from typing import Any

from torch.nn.attention import SDPBackend, sdpa_kernel

__all__ = ["hvp_attention", "builds_graph"]


def builds_graph(opt: Any) -> bool:
    """Whether the coming backward builds the gradient's graph: ``opt`` itself when it is a bool, else
    ``opt.should_create_graph()``; an object without that method (a first-order optimizer) never does."""
    if isinstance(opt, bool):
        return opt
    should = getattr(opt, "should_create_graph", None)
    return bool(should()) if callable(should) else False


def hvp_attention(opt: Any) -> contextlib.AbstractContextManager:
    """A context for the forward: attention through the math kernel on steps that build the graph.

    ``opt`` is an optimizer, whose ``should_create_graph()`` decides (one without the method leaves the
    kernels alone), or a bool, for a loop that decides itself (an optimizer that always needs the graph).
    On other steps this is a no-op, so they keep torch's fastest kernel.
    """
    return sdpa_kernel(SDPBackend.MATH) if builds_graph(opt) else contextlib.nullcontext()
