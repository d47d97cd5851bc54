r"""Exact Hessian-vector products by forward-over-reverse differentiation, which ``torch.compile`` takes.

The usual route builds the gradient's graph (``loss.backward(create_graph=True)``) and differentiates it
once more inside ``opt.step()``: a double backward.  ``torch.compile`` cannot compile a double backward,
and run eagerly, the second backward of a network with BatchNorm and ReLU is a long run of small
element-wise kernels, each a pass over memory, that together cost as much as its convolutions
(docs/performance.md has the profiles).  Forward-over-reverse computes the same product another way:
the gradient as a function of the parameters, :math:`g(\theta)` (``torch.func.grad``), pushed forward
along the probe (``torch.func.jvp``), gives in one pass

.. math::
    \left(g(\theta),\ \frac{\partial g}{\partial \theta} z\right) = (g,\ H z),

and since that pass is one pure function of parameters, buffers and batch, ``torch.compile`` compiles the
whole of it and fuses the element-wise work.  :class:`ForwardOverReverse` takes the place of
``loss.backward(...)`` in a training loop::

    fr = esgd.ForwardOverReverse(model, lambda x, y: loss_fn(model(x), y))
    for x, y in loader:
        opt.zero_grad(set_to_none=True)
        loss = fr.backward(opt, x, y)
        opt.step()

On the optimizer's HVP steps it evaluates the loss, adds the gradient of every trainable parameter of the
model to its ``.grad`` (parameters that a second optimizer holds included), moves the model's buffers
(BatchNorm's running statistics) as the forward would have, and hands the product of ``opt``'s
parameters to ``opt.accumulate_products``; on the other steps it is a forward and a plain
``backward()``.  The product is the double backward's to rounding (the tests compare them in float64).
:meth:`ForwardOverReverse.accumulate_pair` takes the two products of the paired estimate the same way,
after a plain ``backward()`` of the whole batch.

What the model needs: its forward is a function of its parameters, buffers and inputs, changing nothing
but its own buffers in place; a loss term built from parameter tensors captured elsewhere (a list made
before training) is seen as a constant.  Differences from ``backward()`` on HVP steps: a parameter the
loss does not use gets a zero gradient rather than none; the gradient is written directly, so
DistributedDataParallel does not average it; with ``generator=None`` the probes are drawn from the
global random stream before the forward, so random layers (dropout) draw other masks than on the
double-backward route.  Not with a ``GradScaler``, whose loss scale it does not apply.  Under bfloat16
``torch.autocast`` it works for models without BatchNorm (an MLP, a transformer with LayerNorm); with
torch 2.14, a convolution after a BatchNorm inside ``torch.func``'s transforms under autocast fails
(the convolution's input is left in float32), which is reported as one ``RuntimeError``.

The first HVP step compiles (seconds for a small network, minutes for a ResNet on a CPU), and so does a
batch of a new shape or another model; the instances for one model class share one compiled function,
and past ``torch._dynamo.config.recompile_limit`` variants of it (8 by default) torch runs it eagerly,
slower than the double backward.  Each shape gets a graph of its own (``dynamic=False``, unless the
options say otherwise): a product's batch seldom changes shape, and a graph with symbolic shapes, which
torch would otherwise build at the second shape, is where torch 2.11 on CUDA failed to compile the
pass.  ``compile=False`` runs the same function eagerly, to check against.
"""

from __future__ import annotations

import types
from typing import Any, Callable

import torch
from torch import nn
from torch.func import functional_call, grad, jvp

from .attention import hvp_attention

__all__ = ["ForwardOverReverse"]


class _LossModule(nn.Module):
    """The loss as a module whose one child is the model: ``functional_call`` then swaps the model's
    parameters in place, under a loss function that calls the model it closes over."""

    def __init__(self, model: nn.Module, loss_fn: Callable[..., torch.Tensor]) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.loss_fn(*args, **kwargs)


def _gradient_and_product(module: nn.Module, params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor],
                          probes: dict[str, torch.Tensor], args: tuple, kwargs: dict) -> tuple:
    """``(loss, g, H z, buffers after the forward)`` in one forward-over-reverse pass."""

    def loss_and_buffers(p: dict[str, torch.Tensor]) -> tuple:
        # Copies made inside the transform: the forward may update them in place (running statistics),
        # which torch.func forbids on tensors captured from outside.
        moved = {k: v.clone() for k, v in buffers.items()}
        loss = functional_call(module, (p, moved), args, kwargs)
        return loss, (loss.detach(), moved)

    def gradient(p: dict[str, torch.Tensor]) -> tuple:
        return grad(loss_and_buffers, has_aux=True)(p)

    g, hz, (loss, moved) = jvp(gradient, (params,), (probes,), has_aux=True)
    return loss, g, hz, moved


_PASSES: dict[type, Callable[..., tuple]] = {}


def _pass_for(model_class: type) -> Callable[..., tuple]:
    """The pass, as a function of its own for each model class.  torch keeps compiled graphs per code
    object, at most ``recompile_limit`` of them, and every model class and batch shape takes one: a
    process that compiles several models (``esgd-bench perf --task all``) would otherwise run the later
    ones eagerly, and slowly, without a word."""
    if model_class not in _PASSES:
        code = _gradient_and_product.__code__.replace(co_name=f"_gradient_and_product_{model_class.__name__}")
        _PASSES[model_class] = types.FunctionType(code, _gradient_and_product.__globals__, code.co_name)
    return _PASSES[model_class]


class ForwardOverReverse:
    """The loss, its gradient and, on HVP steps, the exact product ``H z``, in place of ``backward()``.

    Args:
        model: the module whose parameters the optimizer updates (those it holds must be the model's).
        loss_fn: called as ``loss_fn(*args, **kwargs)`` with the arguments of :meth:`backward`; returns
            the scalar loss, calling ``model`` on the way.
        compile: compile the forward-over-reverse pass with ``torch.compile`` (``True``, the point of
            this route), with these keyword options (a dict; ``dynamic`` defaults to ``False``), or run it
            eagerly (``False``).
    """

    def __init__(self, model: nn.Module, loss_fn: Callable[..., torch.Tensor], *,
                 compile: bool | dict[str, Any] = True) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"ForwardOverReverse: model must be a torch.nn.Module, got {type(model).__name__}")
        if not callable(loss_fn):
            raise TypeError("ForwardOverReverse: loss_fn must be callable")
        self.model = model
        self.loss_fn = loss_fn
        self._module = _LossModule(model, loss_fn)
        self._named = [("model." + name, p) for name, p in model.named_parameters()]
        if compile is False:
            self._pass = _gradient_and_product
        else:
            self._pass = torch.compile(_pass_for(type(model)),
                                       **{"dynamic": False, **(compile if isinstance(compile, dict) else {})})
        # Under CUDA graphs the pass writes its outputs into the same memory on every replay, so the
        # gradients and products kept from one call must be copies; otherwise they are the pass's own.
        options = compile if isinstance(compile, dict) else {}
        self._outputs_reused = (options.get("mode") in ("reduce-overhead", "max-autotune")
                                or bool(options.get("options", {}).get("triton.cudagraphs")))

    def backward(self, opt: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Evaluate ``loss_fn(*args, **kwargs)``, add its gradient to ``.grad`` and, if ``opt``'s next
        step takes a product, fold ``H z`` into ``opt``; returns the loss, detached."""
        if not getattr(opt, "should_create_graph", lambda: False)():
            if getattr(opt, "hvp_method", "autograd") != "autograd" and opt.is_hvp_step():
                raise ValueError("ForwardOverReverse computes exact products; construct the optimizer with "
                                 "hvp_method='autograd'")
            loss = self.loss_fn(*args, **kwargs)
            loss.backward()
            return loss.detach()
        held, names, trainable, tangents = self._probes(opt)
        buffers = {"model." + name: b for name, b in self.model.named_buffers()}
        loss, g, hz, moved = self._run(opt, trainable, buffers, tangents, args, kwargs)
        with torch.no_grad():
            for name, b in buffers.items():
                b.copy_(moved[name])
            for n, p in trainable:
                if p.grad is None:
                    p.grad = g[n].detach().clone() if self._outputs_reused else g[n].detach()
                else:
                    p.grad.add_(g[n])
        opt.accumulate_products(held, [hz[names[p]] for p in held], copy=self._outputs_reused)
        return loss

    def accumulate_pair(self, opt: torch.optim.Optimizer, first: tuple, second: tuple, covers: float) -> None:
        """On ``opt``'s HVP steps, the paired estimate from two disjoint, equally sized halves of the batch:
        ``loss_fn(*first)`` and ``loss_fn(*second)``'s exact products with the step's probe, handed to
        ``opt.accumulate_product_pair`` (see ``accumulate_hvp_pair``); elsewhere a no-op.

        For a loop that takes the step's gradient from a plain ``backward()`` of the whole batch: nothing
        is added to ``.grad``, and the model's buffers are left as they are (the halves' forwards do not
        move BatchNorm's running statistics).  Each half's shape compiles once."""
        if not getattr(opt, "should_create_graph", lambda: False)():
            return
        held, names, trainable, tangents = self._probes(opt)
        buffers = {"model." + name: b for name, b in self.model.named_buffers()}
        products = []
        for args in (first, second):
            hz = self._run(opt, trainable, buffers, tangents, tuple(args), {})[2]
            # Under CUDA graphs the second pass overwrites the first's outputs: keep copies as they come.
            products.append([hz[names[p]].clone() if self._outputs_reused else hz[names[p]] for p in held])
        opt.accumulate_product_pair(held, products[0], products[1], covers, copy=False)

    def _probes(self, opt: torch.optim.Optimizer) -> tuple:
        """``opt``'s parameters, their names, the model's trainable parameters and the tangents: the
        step's probe for ``opt``'s parameters, zero for the others."""
        held = [p for group in opt.param_groups for p in group["params"] if p.requires_grad]
        names = {p: name for name, p in self._named}
        missing = [p for p in held if p not in names]
        if missing:
            raise ValueError(f"ForwardOverReverse: the optimizer holds {len(missing)} parameter(s) that are "
                             "not the model's")
        # Every trainable parameter of the model is differentiated, so a second optimizer's parameters get
        # their gradients too; only opt's have a probe (the others' are zero, which leaves opt's products
        # unchanged: H z takes no contribution from a zero direction).
        trainable = [(n, p) for n, p in self._named if p.requires_grad]
        probes = dict(zip([names[p] for p in held], opt.hvp_probes(held)))
        tangents = {n: probes[n] if n in probes else torch.zeros_like(p) for n, p in trainable}
        return held, names, trainable, tangents

    def _run(self, opt: torch.optim.Optimizer, trainable: list, buffers: dict, tangents: dict, args: tuple,
             kwargs: dict) -> tuple:
        """One forward-over-reverse pass; an autocast failure abandons ``opt``'s step with one error."""
        # Differentiating twice needs the math attention kernel, as the double backward does.
        try:
            with hvp_attention(True):
                return self._pass(self._module, {n: p.detach() for n, p in trainable}, buffers, tangents,
                                  args, kwargs)
        except RuntimeError as err:
            if not any(torch.is_autocast_enabled(d) for d in ("cpu", "cuda")):
                raise
            opt._abandon_step()
            raise RuntimeError("ForwardOverReverse: torch.func could not differentiate this model under "
                               f"autocast ({' '.join(str(err).split())[:160]}); take this model's products "
                               "in float32, or by loss.backward(create_graph=...)") from err
