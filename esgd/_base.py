"""Shared machinery of the Hessian-vector-product optimizers in this package.

Dauphin, de Vries & Bengio (2015) and the Hutchinson-style methods that followed them estimate a diagonal
of the Hessian from products ``H z`` with random probes ``z``.  Everything those methods have in common
lives here: the schedule that decides which steps pay for a product (and so which backward passes must
build a graph), the probe draw with an optional ``torch.Generator``, the product itself through double
backward, the checks that turn misuse into one clear error, and the global counters that
``state_dict()`` must carry for a resumed run to continue bit for bit.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch.optim import Optimizer

__all__ = ["HessianOptimizer", "MissingGraphError", "check_int", "check_range"]

_GLOBAL_KEY = "hessian_schedule"

MISSING_GRAPH_MESSAGE = (
    "{name}: this step computes a Hessian-vector product, but the gradients carry no autograd graph. "
    "Call loss.backward(create_graph=opt.should_create_graph()) before opt.step()"
)


class MissingGraphError(RuntimeError):
    """Raised on an HVP step when ``backward()`` was called without ``create_graph=True``."""


def check_range(name: str, value: Any, low: float, high: float, *, high_open: bool = True,
                allow_none: bool = False) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``low <= value < high`` (or ``<= high``)."""
    if value is None and allow_none:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value == value
    if ok:
        ok = low <= value and (value < high if high_open else value <= high)
    if not ok:
        bound = f"[{low}, {high})" if high_open else f"[{low}, {high}]"
        raise ValueError(f"Invalid {name}: {value!r} (must be in {bound})")


def check_int(name: str, value: Any, low: int = 1) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is an integer ``>= low``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"Invalid {name}: {value!r} (must be an integer >= {low})")


class HessianOptimizer(Optimizer):
    """Base class: an optimizer that needs ``H z`` on some steps.

    Subclasses set ``probe`` (``"rademacher"`` or ``"gaussian"``) and implement ``_update(hvp_step,
    hvps)``, where ``hvps`` maps each parameter that has a gradient to its product (or is ``None`` on a
    step without one).  The schedule follows shared/ESGD-M.md: a step is an HVP step while
    ``steps_done < d_warmup`` or once ``steps_since_hvp >= update_d_every``.
    """

    probe: str = "rademacher"

    def __init__(self, params: Iterable, defaults: dict, *, update_d_every: int, d_warmup: int,
                 generator: torch.Generator | None = None) -> None:
        check_int("update_d_every", update_d_every)
        check_int("d_warmup", d_warmup)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError(f"Invalid generator: {generator!r} (must be a torch.Generator or None)")
        super().__init__(params, defaults)
        devices = {p.device for group in self.param_groups for p in group["params"]}
        if len(devices) > 1:
            names = ", ".join(sorted(str(d) for d in devices))
            raise ValueError(f"{type(self).__name__}: all parameters must be on one device, got {names}")
        self.update_d_every = update_d_every
        self.d_warmup = d_warmup
        self.generator = generator
        self.steps_done = 0
        self.steps_since_hvp = 0

    # -- schedule ---------------------------------------------------------------------------------
    def is_hvp_step(self) -> bool:
        """Whether the next ``step()`` computes a Hessian-vector product."""
        return self.steps_done < self.d_warmup or self.steps_since_hvp >= self.update_d_every

    def should_create_graph(self) -> bool:
        """Whether the next ``backward()`` must build the graph: ``loss.backward(create_graph=...)``."""
        return self.is_hvp_step()

    # -- probes and products ------------------------------------------------------------------------
    def draw_probe(self, p: torch.Tensor) -> torch.Tensor:
        """One probe shaped like ``p``: Rademacher (+1/-1, equal odds) or standard Gaussian."""
        gen = self.generator
        device = gen.device if gen is not None else p.device
        if self.probe == "rademacher":
            z = torch.randint(0, 2, p.shape, generator=gen, device=device, dtype=p.dtype).mul_(2).sub_(1)
        else:
            z = torch.randn(p.shape, generator=gen, device=device, dtype=p.dtype)
        return z.to(p.device, non_blocking=True)

    def hessian_vector_products(self, params: list[torch.Tensor], grads: list[torch.Tensor],
                                probes: list[torch.Tensor]) -> list[torch.Tensor]:
        """``H z`` for every parameter, by differentiating the gradients once more.

        Gradients of terms linear in their parameter carry no graph; their rows of ``H z`` can still be
        non-zero through cross terms, so all parameters are inputs and unused ones give zeros.
        """
        with_graph = [i for i, g in enumerate(grads) if g.requires_grad]
        if not with_graph:
            raise MissingGraphError(MISSING_GRAPH_MESSAGE.format(name=type(self).__name__))
        with torch.enable_grad():
            hvps = torch.autograd.grad([grads[i] for i in with_graph], params,
                                       grad_outputs=[probes[i] for i in with_graph], allow_unused=True)
        return [torch.zeros_like(p) if h is None else h.detach() for p, h in zip(params, hvps)]

    # -- the step ---------------------------------------------------------------------------------
    def _params_with_grad(self) -> list[torch.Tensor]:
        params = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                params.append(p)
        return params

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None):
        """Perform one optimization step.

        Args:
            closure: optional callable that zeroes the gradients, evaluates the loss, calls
                ``loss.backward(create_graph=opt.should_create_graph())`` and returns the loss.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        hvp_step = self.is_hvp_step()
        params = self._params_with_grad()
        hvps = None
        if hvp_step and params:
            grads = [p.grad for p in params]
            probes = [self.draw_probe(p) for p in params]
            hvps = dict(zip(params, self.hessian_vector_products(params, grads, probes)))
        if hvp_step:
            # The graph hanging off .grad references the parameters: drop it now, or it lives on
            # until the next zero_grad and keeps the whole double-backward graph in memory.
            for p in params:
                if p.grad.requires_grad:
                    p.grad = p.grad.detach()
        self._update(hvp_step, hvps)
        self.steps_done += 1
        self.steps_since_hvp = 0 if hvp_step else self.steps_since_hvp + 1
        return loss

    def _update(self, hvp_step: bool, hvps: dict[torch.Tensor, torch.Tensor] | None) -> None:
        raise NotImplementedError

    # -- checkpointing ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        extra: dict[str, Any] = {
            "steps_done": self.steps_done,
            "steps_since_hvp": self.steps_since_hvp,
            "update_d_every": self.update_d_every,
            "d_warmup": self.d_warmup,
        }
        if self.generator is not None:
            extra["generator_state"] = self.generator.get_state()
        sd[_GLOBAL_KEY] = extra
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop(_GLOBAL_KEY, None)
        if extra is None:
            raise ValueError(f"{type(self).__name__}.load_state_dict: the state dict has no "
                             f"'{_GLOBAL_KEY}' entry; was it saved by this optimizer?")
        super().load_state_dict(state_dict)
        self.steps_done = int(extra["steps_done"])
        self.steps_since_hvp = int(extra["steps_since_hvp"])
        self.update_d_every = int(extra["update_d_every"])
        self.d_warmup = int(extra["d_warmup"])
        if "generator_state" in extra:
            if self.generator is None:
                raise ValueError(f"{type(self).__name__}.load_state_dict: the checkpoint holds a probe "
                                 "generator state; construct the optimizer with generator=torch.Generator()")
            self.generator.set_state(extra["generator_state"].cpu())
