"""Shared machinery of the Hessian-vector-product optimizers in this package.

Dauphin, de Vries & Bengio (2015) and the Hutchinson-style methods that followed them estimate a diagonal
of the Hessian from products ``H z`` with random probes ``z``.  Everything those methods have in common
lives here: the schedule that decides which steps pay for a product (and so which backward passes must
build a graph), the probe draw with an optional ``torch.Generator``, the product itself through double
backward, the checks that turn misuse into one clear error, and the global counters that
``state_dict()`` must carry for a resumed run to continue bit for bit.

Mixed precision is handled here once for every optimizer:

* ``torch.amp.GradScaler``.  The optimizers set ``_step_supports_amp_scaling``, so the scaler does not
  unscale ``.grad`` itself; it hands ``step()`` its scale (``grad_scale``) and whether the scaled
  gradients overflowed (``found_inf``).  An overflowed step is skipped entirely: parameters, state,
  counters and probe stream stay as if it had never been taken.  Otherwise the gradient *and* the
  Hessian-vector product, both taken from the scaled loss, carry the scale and are divided by it.  The
  product is taken through the scaled graph with the probe divided by the scale, so that it comes out
  at the loss's own magnitude: an fp16 product is often larger than the gradient (any ``|H z| > 1``
  overflows at the default scale 65536 where the gradient does not), and the scaler adjusts its scale to
  the gradients only.  The product is linear in the probe, so this changes nothing but the range.  The
  fp16 loop::

      scaler = torch.amp.GradScaler("cuda")
      for x, y in loader:
          opt.zero_grad(set_to_none=True)
          with torch.autocast("cuda", dtype=torch.float16):
              loss = loss_fn(model(x), y)
          scaler.scale(loss).backward(create_graph=opt.should_create_graph())
          scaler.step(opt)
          scaler.update()

  A product taken from a separate loss, ``opt.accumulate_hvp(loss)``, must be given the scaled loss,
  ``opt.accumulate_hvp(scaler.scale(local_loss))``: it is unscaled with the same scale as the gradients.
  Products accumulated before ``scaler.step(opt)`` hands over the scale divide the probe by the scale of
  the previous step instead, and are corrected by the ratio of the two in ``step()`` (before the first
  step there is none: such a product may overflow in fp16, and is then dropped and taken again).  Multiplying and
  dividing by powers of two (every scale ``GradScaler`` uses) is exact, so at a fixed scale a run
  matches the unscaled one to the bit, short of overflow and underflow.  Reading ``found_inf`` costs a
  host synchronisation per step, as ``GradScaler.step`` does for any other optimizer.
  ``scaler.unscale_(opt)`` before ``scaler.step(opt)`` (to clip gradients) divides the gradients but not
  the product taken from their graph, and withholds the scale from ``step()``: it raises on steps that
  take a product (clip the scaled gradients with ``max_norm * scaler.get_scale()`` there instead).
  ``hvp_method="finite-difference"`` needs ``opt.step(closure)``, which ``GradScaler`` does not
  support (it checks the gradients for overflow before ``step()`` evaluates them again), so a scaler
  driving such an optimizer raises ``ValueError``.
* Non-finite products.  A product with an inf or NaN (an fp16 product overflows more easily than the
  gradient, and ``found_inf`` looks at gradients only) never reaches the state: the step's products are
  dropped, the update uses the previous curvature estimate, the schedule retries on the next step and
  ``nonfinite_products`` counts the drop.  The check costs one host synchronisation per product step.
* Low-precision parameters.  ``state_dtype`` (default ``torch.float32``) is the dtype of the optimizer
  state of parameters narrower than it, such as bfloat16 and float16 ones; the update is computed in
  that dtype, from the gradient cast up, and rounded into the parameter once.  Parameters at least as
  wide (float32, float64) keep state of their own dtype.  ``state_dtype=None`` keeps every state in its
  parameter's dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch
from torch.optim import Optimizer

__all__ = ["HessianOptimizer", "MissingGraphError", "DoubleBackwardUnsupportedError", "HVP_METHODS",
           "STATE_DTYPES", "as_dtype", "by_dtypes", "check_betas", "check_int", "check_range",
           "check_state_dtype", "decay_where_curved_", "is_narrow", "mark_zero_curvature_", "PairedSquares",
           "paired_estimate", "pick", "rademacher", "rng_state", "round_into_", "set_rng_state", "state_dtype_for"]

_GLOBAL_KEY = "hessian_schedule"

# Both causes leave the same gradients behind (no graph), so the message has to name both.
MISSING_GRAPH_MESSAGE = (
    "{name}: this step computes a Hessian-vector product, but the gradients carry no autograd graph: "
    "either backward() was called without create_graph=True (call "
    "loss.backward(create_graph=opt.should_create_graph()) before opt.step()), or the loss is linear in "
    "every parameter, so it has no curvature for a second-order method to use"
)


class MissingGraphError(RuntimeError):
    """Raised on an HVP step when no gradient carries an autograd graph.

    Either ``backward()`` was called without ``create_graph=True``, or the loss is linear in every
    parameter (its gradients are constants, graph or not); the two cannot be told apart from the gradients.
    """


class DoubleBackwardUnsupportedError(RuntimeError):
    """The model cannot be differentiated twice (e.g. ``torch.compile``): use finite differences."""


HVP_METHODS = ("autograd", "finite-difference")
STATE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

UNSCALED_PRODUCT_MESSAGE = (
    "{name}: GradScaler.unscale_(opt) was called before scaler.step(opt) on a step that takes a "
    "Hessian-vector product; it divides the gradients by the loss scale but cannot reach the product "
    "taken from their graph, and step() then no longer receives the scale. On steps where "
    "opt.is_hvp_step() is True leave the unscaling to scaler.step(opt) (to clip, clip the scaled "
    "gradients with max_norm * scaler.get_scale())"
)


def rng_state(device: torch.device) -> tuple:
    """The CPU random state and, on CUDA, the device's: what a replayed evaluation must start from."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def set_rng_state(state: tuple, device: torch.device) -> None:
    """Restore a state taken by :func:`rng_state`."""
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)


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


def check_betas(betas: Any) -> None:
    """Raise ``ValueError`` unless ``betas`` is a pair with both entries in [0, 1)."""
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"Invalid betas: {betas!r} (must be a pair (beta1, beta2))")
    check_range("beta1 (betas[0])", betas[0], 0.0, 1.0)
    check_range("beta2 (betas[1])", betas[1], 0.0, 1.0)


def check_int(name: str, value: Any, low: int = 1) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is an integer ``>= low``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"Invalid {name}: {value!r} (must be an integer >= {low})")


def check_state_dtype(value: Any) -> None:
    """Raise ``ValueError`` unless ``value`` is ``None`` or a floating-point dtype the kernels can run in."""
    if value is not None and not any(value is d for d in STATE_DTYPES):
        names = ", ".join(str(d) for d in STATE_DTYPES)
        raise ValueError(f"Invalid state_dtype: {value!r} (must be None or one of {names})")


def state_dtype_for(param_dtype: torch.dtype, state_dtype: torch.dtype | None) -> torch.dtype:
    """The dtype of a parameter's optimizer state: ``state_dtype`` where the parameter is narrower,
    its own dtype otherwise (a float64 parameter never gets float32 state)."""
    if state_dtype is None or torch.finfo(param_dtype).bits >= torch.finfo(state_dtype).bits:
        return param_dtype
    return state_dtype


def rademacher(shape: torch.Size, generator: torch.Generator | None, device: torch.device,
               dtype: torch.dtype) -> torch.Tensor:
    """+1/-1 with equal odds, eight signs from each random byte.

    A CPU generator produces one number per element whatever the range, so ``randint(0, 2)`` over a
    1.9 M-parameter MLP took 7-9 ms, most of a gradient evaluation (10 ms).  The bits of random bytes
    give the same signs for about 1.5 ms per million elements, gathered from a table of every byte's
    eight signs (shifting the bits out took about 2 ms).
    """
    n = math.prod(shape)
    words = torch.empty((n + 7) // 8, dtype=torch.uint8, device=device).random_(generator=generator)
    # Row w of the table holds the eight signs of byte w (bit k set: +1), so one gather writes the probe.
    w = torch.arange(256, device=device).unsqueeze(1)
    table = ((w >> torch.arange(8, device=device)) & 1).to(dtype).mul_(2).sub_(1)
    return table.index_select(0, words.int()).view(-1)[:n].view(shape)


def as_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` itself when it already has ``dtype``, else a copy in ``dtype``."""
    return t if t.dtype == dtype else t.to(dtype)


def by_dtypes(params: list[torch.Tensor], states: list[torch.Tensor]) -> dict[tuple, list[int]]:
    """Indices grouped by (parameter dtype, state dtype): one device is guaranteed by the optimizer,
    but a foreach call needs one dtype per list."""
    groups: dict[tuple, list[int]] = {}
    for i, (p, s) in enumerate(zip(params, states)):
        groups.setdefault((p.dtype, s.dtype), []).append(i)
    return groups


def is_narrow(dtype: torch.dtype) -> bool:
    """Whether a kernel working in ``dtype`` must take the single-tensor loop.  torch's foreach ops on
    CPU round a Python scalar to a bfloat16 or float16 list's dtype (a weight-decay factor 0.99 becomes
    0.98828125, beta2 = 0.999 becomes 1), where the single-tensor ops compute with it in float32."""
    return dtype in (torch.float16, torch.bfloat16)


def pick(values: list | None, idx: list[int]) -> list | None:
    """``values`` at ``idx`` (``None`` stays ``None``)."""
    return None if values is None else [values[i] for i in idx]


def round_into_(params: list[torch.Tensor], work: list[torch.Tensor]) -> None:
    """Round the updated copies back into narrower parameters (a no-op where they are the parameters)."""
    if work and work[0] is not params[0]:
        torch._foreach_copy_(params, work)


def mark_zero_curvature_(denoms: list[torch.Tensor]) -> None:
    r"""For ``eps = 0``: set denominators that are exactly zero to :math:`+\infty`, in place.

    A zero denominator means a zero curvature estimate, i.e. no information about that coordinate; with
    :math:`+\infty` its step ``g / denom`` is 0 instead of :math:`\pm\infty` (or NaN for ``0 / 0``).
    """
    for denom in denoms:
        denom.masked_fill_(denom == 0, math.inf)


def decay_where_curved_(params: list[torch.Tensor], factors: list[float], denoms: list[torch.Tensor]) -> None:
    """For ``eps = 0``: ``p *= factor`` except where the denominator is infinite (see
    :func:`mark_zero_curvature_`), so a coordinate without curvature does not move at all.  Elsewhere the
    product is the one ``p.mul_(factor)`` computes, to the bit."""
    for p, factor, denom in zip(params, factors, denoms):
        p.copy_(torch.where(denom.isinf(), p, p * factor))


@dataclass(frozen=True)
class PairedSquares:
    """One step's paired estimate of :math:`(H z)^2`, per parameter (see
    :meth:`HessianOptimizer.accumulate_hvp_pair`).

    ``squares`` holds :math:`ab + f((a - b)/2)^2`, which has the expectation of the whole batch's
    squared product and is negative where the halves disagree in sign by more than their noise;
    ``floors`` holds its noise term :math:`f((a - b)/2)^2`, never negative.  An optimizer averages both
    over steps and uses the larger average, so the sign noise of single steps cancels before anything
    is floored; a running maximum (``ESGDMax``) floors each step's estimate instead.
    """

    squares: dict
    floors: dict


class HessianOptimizer(Optimizer):
    """Base class: an optimizer that needs ``H z`` on some steps.

    Subclasses set ``probe`` (``"rademacher"`` or ``"gaussian"``) and implement ``_update(hvp_step,
    hvps, grads)``, where ``grads`` maps each parameter that has a gradient to the gradient the update
    uses and ``hvps`` maps it to its product (or is ``None`` on a step without one); both are unscaled
    and in the parameter's state dtype (:func:`state_dtype_for`).  On a step with a paired estimate
    (only where ``squares_products``), ``hvps`` is a :class:`PairedSquares` instead.  The schedule
    follows docs/esgd-m.md: a step is an HVP step while ``steps_done < d_warmup`` or once
    ``steps_since_hvp >= update_d_every``.

    ``torch.amp.GradScaler`` hands ``step()`` its scale and overflow flag instead of unscaling the
    gradients itself (``_step_supports_amp_scaling``); see the module docstring for the loop.
    ``nonfinite_products`` counts the product steps whose products were dropped for an inf or NaN.
    """

    probe: str = "rademacher"
    # True where the curvature is built from the element-wise square of the product alone, (H z)^2:
    # accumulate_hvp_pair then hands _update a PairedSquares in place of the products.
    squares_products: bool = False
    # GradScaler then leaves .grad scaled and sets grad_scale and found_inf for step(): the product is
    # taken from the scaled graph inside step(), so only step() can unscale the two consistently.
    _step_supports_amp_scaling = True

    def __init__(self, params: Iterable, defaults: dict, *, update_d_every: int, d_warmup: int,
                 generator: torch.Generator | None = None, hvp_method: str = "autograd",
                 state_dtype: torch.dtype | None = torch.float32) -> None:
        check_int("update_d_every", update_d_every)
        check_int("d_warmup", d_warmup)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError(f"Invalid generator: {generator!r} (must be a torch.Generator or None)")
        if hvp_method not in HVP_METHODS:
            raise ValueError(f"Invalid hvp_method: {hvp_method!r} (must be one of {', '.join(HVP_METHODS)})")
        check_state_dtype(state_dtype)
        super().__init__(params, {**defaults, "state_dtype": state_dtype})
        for group in self.param_groups:
            check_state_dtype(group["state_dtype"])
        devices = {p.device for group in self.param_groups for p in group["params"]}
        if len(devices) > 1:
            names = ", ".join(sorted(str(d) for d in devices))
            raise ValueError(f"{type(self).__name__}: all parameters must be on one device, got {names}")
        self.update_d_every = update_d_every
        self.d_warmup = d_warmup
        self.generator = generator
        self.hvp_method = hvp_method
        self.steps_done = 0
        self.steps_since_hvp = 0
        self.nonfinite_products = 0
        # Optional in-place reduction of the locally computed products, e.g. an all-reduce mean across
        # data-parallel ranks (see esgd.distributed); None on a single process.
        self.hvp_reduce: Callable[[list[torch.Tensor]], None] | None = None
        self._probes: dict[torch.Tensor, torch.Tensor] = {}
        self._hvp_sums: dict[torch.Tensor, torch.Tensor] = {}
        # This step's products of two disjoint sub-batches and the fraction of the batch they cover.
        self._hvp_pair: tuple[dict[torch.Tensor, torch.Tensor], dict[torch.Tensor, torch.Tensor], float] | None = None
        # The probe stream's state before this step's first draw, for a step that is then skipped.
        self._rng_before_probes: Any = None
        # GradScaler's scale at the last step it drove, and the factor on this step's probes (None: 1).
        self._grad_scale_seen: torch.Tensor | None = None
        self._probe_scale: torch.Tensor | None = None

    # -- schedule ---------------------------------------------------------------------------------
    def is_hvp_step(self) -> bool:
        """Whether the next ``step()`` computes a Hessian-vector product."""
        return self.steps_done < self.d_warmup or self.steps_since_hvp >= self.update_d_every

    def should_create_graph(self) -> bool:
        """Whether the next ``backward()`` must build the graph: ``loss.backward(create_graph=...)``.

        Always ``False`` with ``hvp_method="finite-difference"``, which needs first-order gradients only.
        """
        return self.hvp_method == "autograd" and self.is_hvp_step()

    # -- probes and products ------------------------------------------------------------------------
    def draw_probe(self, p: torch.Tensor) -> torch.Tensor:
        """One probe shaped like ``p``: Rademacher (+1/-1, equal odds) or standard Gaussian."""
        gen = self.generator
        device = gen.device if gen is not None else p.device
        if self.probe == "rademacher":
            z = rademacher(p.shape, gen, device, p.dtype)
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
        try:
            with torch.enable_grad():
                hvps = torch.autograd.grad([grads[i] for i in with_graph], params,
                                           grad_outputs=[probes[i] for i in with_graph], allow_unused=True)
        except RuntimeError as err:
            text = str(err)
            # An operation whose backward has no derivative is named in torch's message
            # ("derivative for aten::<op> is not implemented"); the fused attention kernels are the
            # common case, and have a remedy that keeps the exact product.
            missing = "derivative for" in text and "not implemented" in text
            if missing and "attention" in text:
                raise DoubleBackwardUnsupportedError(
                    f"{type(self).__name__}: the fused scaled_dot_product_attention kernel cannot be "
                    f"differentiated twice ({' '.join(text.split())}); run the forward under "
                    "esgd.hvp_attention(opt), which takes the math kernel on the steps that build the graph: "
                    "with esgd.hvp_attention(opt): loss = loss_fn(model(x), y)") from err
            if "double backward" in text or missing:
                raise DoubleBackwardUnsupportedError(
                    f"{type(self).__name__}: the model cannot be differentiated twice ({err}). "
                    "Construct the optimizer with hvp_method='finite-difference' and call "
                    "opt.step(closure); it needs first-order gradients only") from err
            raise
        return [torch.zeros_like(p) if h is None else h.detach() for p, h in zip(params, hvps)]

    def _probe_for(self, p: torch.Tensor) -> torch.Tensor:
        # One probe per parameter and step, shared by every micro-batch of an accumulated step.
        z = self._probes.get(p)
        if z is None:
            if not self._probes:
                self._rng_before_probes = (self.generator.get_state() if self.generator is not None
                                           else rng_state(self._device()))
            z = self._probes[p] = self.draw_probe(p)
        return z

    def _rewind_probes(self) -> None:
        """Put the probe stream back to where this step found it (the global RNG when there is no
        generator, so any draw the model made after the probes is taken back too)."""
        saved, self._rng_before_probes = self._rng_before_probes, None
        if saved is None:
            return
        if self.generator is not None:
            self.generator.set_state(saved)
        else:
            set_rng_state(saved, self._device())

    @torch.no_grad()
    def accumulate_hvp(self, loss: torch.Tensor | None = None) -> None:
        """Fold a Hessian-vector product into this step's sum (on HVP steps; elsewhere a no-op).

        Without ``loss``, the product is taken through the graph that the last
        ``backward(create_graph=True)`` left on ``.grad``; the gradients are then detached, so only one
        micro-batch's double-backward graph is alive at a time.  Gradient accumulation over K
        micro-batches (each loss divided by K)::

            for x, y in micro_batches:
                (loss_fn(model(x), y) / K).backward(create_graph=opt.should_create_graph())
                opt.accumulate_hvp()
            opt.step()

        With ``loss``, the product is that of ``loss`` alone, through ``torch.autograd.grad``, leaving
        ``.grad`` untouched: the loop may then use a plain ``backward()`` for the update and pass, say,
        the loss of a fraction of the batch (a cheaper estimate), or each rank's local loss under
        DistributedDataParallel.  Every call of one step uses the same probe.  ``step()`` calls
        ``accumulate_hvp()`` once more itself, so the last call of the first form may be left out.

        Under a ``GradScaler`` the products must come from the scaled loss, as the gradients do: the
        backward of ``scaler.scale(loss)`` in the first form, ``accumulate_hvp(scaler.scale(loss))`` in
        the second.  ``step()`` divides their sum by the same scale as the gradients.
        """
        if not (self.is_hvp_step() and self.hvp_method == "autograd"):
            return
        if self._hvp_pair is not None:
            if loss is None and not any(p.grad.requires_grad for p in self._params_with_grad()):
                return          # step()'s own call after a pair: the pair is this step's estimate
            if loss is None:
                # A graph on .grad besides the pair: the step cannot go on, so it is dropped with the
                # graph and the pair, and the next one starts clean.
                self._abandon_step()
            raise RuntimeError(f"{type(self).__name__}: this step already has a paired estimate "
                               "(accumulate_hvp_pair), so it takes no other product: its backward must be a "
                               "plain backward(), without create_graph=True")
        if loss is not None:
            params, hvps = self._products_of(loss)
            pending = []
        else:
            params = self._params_with_grad()
            pending = [p for p in params if p.grad.requires_grad]
            if not pending:
                if self._hvp_sums:
                    return
                raise MissingGraphError(MISSING_GRAPH_MESSAGE.format(name=type(self).__name__))
            hvps = self._products(params, [p.grad for p in params])
        self._fold(params, hvps)
        # The graph hanging off .grad references the parameters: drop it now, or it lives on
        # until the next zero_grad and keeps the whole double-backward graph in memory.
        for p in pending:
            p.grad = p.grad.detach()

    @torch.no_grad()
    def accumulate_hvp_pair(self, loss_a: torch.Tensor, loss_b: torch.Tensor, covers: float) -> None:
        r"""Take this step's curvature from two disjoint, equally sized sub-batches of the batch.

        A product of a sub-batch of ``n`` rows squares its sampling noise along with the curvature:
        :math:`\mathbb{E}[(H_S z)^2] = (\bar H z)^2 + \sigma^2 / n` per element, where :math:`\sigma^2`
        is the variance of one row's product, against :math:`\sigma^2 / B` for the product of the whole
        batch of ``B`` rows.  A small sub-batch therefore inflates the estimate and shrinks every step.
        With :math:`a = H_A z` and :math:`b = H_B z` from the two halves (same probe) and
        ``covers`` :math:`= f = 2n / B`, the fraction of the batch they cover together, the estimate

        .. math::
            e = a b + f \left(\frac{a - b}{2}\right)^2

        has, for independent rows, the expectation of the whole batch's squared product:
        :math:`\mathbb{E}[ab] = (\bar H z)^2` and :math:`((a - b)/2)^2` estimates the variance of their
        mean, :math:`\sigma^2 / (2n)`, so :math:`f ((a - b)/2)^2` estimates the whole batch's
        :math:`\sigma^2 / B`.  With ``covers=1``, :math:`e` is :math:`((a + b)/2)^2`, the whole batch's
        own squared product.

        Where they disagree in sign, :math:`e` can be negative.  Clamping each step's :math:`e` would
        add :math:`\mathbb{E}[\max(-ab, 0)]`, about a third of the variance of a half's product, to
        every element whose curvature is below the noise, far more than the whole batch's noise term.
        So the optimizer averages :math:`e` over steps as it would :math:`(H z)^2` and, separately, the
        noise term :math:`f((a - b)/2)^2`, and uses the larger of the two averages.  The average of :math:`e`
        keeps its expectation, and the floor keeps an element without curvature from a denominator of
        zero, where its step would be limited only by ``eps``.  (A running maximum, ``ESGDMax``, has
        nothing to average: it floors each step's :math:`e` at its noise term.)  Elsewhere the average
        of the noise term is one more parameter-sized tensor of state, kept once a step has been paired.

        Only for optimizers whose curvature is built from :math:`(H z)^2` alone (``squares_products``:
        ``ESGD``, ``ESGDMax``, ``PlainESGD``).  Call it once on an HVP step, with a plain ``backward()``
        of the whole batch for the gradient (elsewhere a no-op); under a ``GradScaler`` pass both losses
        scaled.  Products are not averaged across data-parallel ranks (``hvp_reduce``).
        """
        if not self._pair_wanted(covers, "accumulate_hvp_pair"):
            return
        params, a = self._products_of(loss_a)
        _, b = self._products_of(loss_b)
        self._hvp_pair = (dict(zip(params, a)), dict(zip(params, b)), float(covers))

    def _pair_wanted(self, covers: float, method: str) -> bool:
        """Check a paired estimate's arguments and state; whether this step takes it."""
        name = type(self).__name__
        if not self.squares_products:
            raise ValueError(f"{name}: the paired estimate replaces the squared product (H z)^2, and this "
                             "optimizer's curvature is not built from that square; use accumulate_hvp(loss)")
        check_range("covers", covers, 0.0, 1.0, high_open=False)
        if covers == 0:
            raise ValueError(f"Invalid covers: {covers!r} (must be in (0, 1])")
        if not (self.is_hvp_step() and self.hvp_method == "autograd"):
            return False
        if self.hvp_reduce is not None:
            raise ValueError(f"{name}: the paired estimate is not averaged across data-parallel ranks; "
                             "use accumulate_hvp(loss) there")
        if self._hvp_pair is not None or self._hvp_sums:
            raise RuntimeError(f"{name}: {method} takes one pair per step, and no other product")
        return True

    @torch.no_grad()
    def accumulate_product_pair(self, params: Sequence[torch.Tensor], a: Sequence[torch.Tensor],
                                b: Sequence[torch.Tensor], covers: float, *, copy: bool = True) -> None:
        """:meth:`accumulate_hvp_pair` for products the caller computed: ``a`` and ``b``, the products
        ``H_A z`` and ``H_B z`` of two disjoint, equally sized halves, with :meth:`hvp_probes`' probes,
        for every parameter of the optimizer that requires a gradient, in the order of ``params``.

        ``copy=False`` hands the tensors over (the optimizer overwrites ``a`` in place)."""
        if not self._pair_wanted(covers, "accumulate_product_pair"):
            return
        params, a, b = list(params), list(a), list(b)
        held = [p for g in self.param_groups for p in g["params"] if p.requires_grad]
        if len(a) != len(params) or len(b) != len(params) or set(params) != set(held):
            raise ValueError(f"{type(self).__name__}: accumulate_product_pair needs one product of each half "
                             f"for every parameter the optimizer holds ({len(held)}); got {len(params)} "
                             f"parameters, {len(a)} and {len(b)} products")
        self._check_products("accumulate_product_pair", params, a)
        self._check_products("accumulate_product_pair", params, b)
        keep = (lambda t: t.detach().clone()) if copy else (lambda t: t.detach())
        self._hvp_pair = ({p: keep(x) for p, x in zip(params, a)}, {p: keep(y) for p, y in zip(params, b)},
                          float(covers))

    def _products_of(self, loss: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The products of ``loss`` alone, for every parameter that requires a gradient."""
        params = [p for g in self.param_groups for p in g["params"] if p.requires_grad]
        with torch.enable_grad():
            grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
        return params, self._products(params, grads)

    def _products(self, params: list[torch.Tensor], grads: list[torch.Tensor]) -> list[torch.Tensor]:
        """``H z`` through ``grads``' graph with this step's probes (scaled as the step's first product)."""
        return self.hessian_vector_products(params, grads, self.hvp_probes(params))

    def hvp_probes(self, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """This step's probe ``z`` of each of ``params``, for products computed by the caller.

        A loop that computes ``H z`` itself, without ``backward(create_graph=True)`` (for example by
        forward-over-reverse differentiation, :class:`esgd.ForwardOverReverse`), takes the probes here
        and hands the products to :meth:`accumulate_products`.  The first call of a step draws them;
        every later call of the step returns the same ones.  Under a ``GradScaler`` they are scaled by
        ``1 / S`` like the probes of the step's other products.  Only on steps that take a product
        (``opt.should_create_graph()``).
        """
        if not (self.is_hvp_step() and self.hvp_method == "autograd"):
            raise RuntimeError(f"{type(self).__name__}: hvp_probes is for the steps that take an exact "
                               "product (opt.should_create_graph() is True)")
        if not self._probes:
            # the step's first product: every product of one step shares the scale, as it shares the probe
            self._probe_scale = self._scale_for_probes()
            self._release_before_hvp()
        probes = [self._probe_for(p) for p in params]
        if self._probe_scale is not None:
            probes = [z * self._probe_scale.to(z.device) for z in probes]
        return probes

    @torch.no_grad()
    def accumulate_products(self, params: Sequence[torch.Tensor], products: Sequence[torch.Tensor], *,
                            copy: bool = True) -> None:
        """Fold products ``H z`` that the caller computed with :meth:`hvp_probes`' probes into this step's
        sum (on HVP steps; elsewhere a no-op), as :meth:`accumulate_hvp` folds its own.

        ``copy=False`` hands the tensors over: the optimizer keeps them and adds to them in place, which
        saves a copy of every product; the caller must not use them afterwards."""
        if not (self.is_hvp_step() and self.hvp_method == "autograd"):
            return
        params, products = list(params), list(products)
        if self._hvp_pair is not None and len(params) == len(products):    # a miscount is reported first
            raise RuntimeError(f"{type(self).__name__}: this step already has a paired estimate "
                               "(accumulate_hvp_pair), so it takes no other product")
        self._check_products("accumulate_products", params, products)
        # copied unless handed over: the sum is added to in place, and the caller's tensors are the caller's
        self._fold(params, [h.detach().clone() if copy else h.detach() for h in products])

    def _check_products(self, method: str, params: list[torch.Tensor], products: list[torch.Tensor]) -> None:
        """Products handed in by a caller: one per parameter, of its shape, for a parameter probed this step."""
        name = type(self).__name__
        if len(params) != len(products):
            raise ValueError(f"{name}: {method} got {len(products)} products for {len(params)} parameters")
        for p, h in zip(params, products):
            if p not in self._probes:
                raise RuntimeError(f"{name}: a product was given for a parameter without a probe this step; "
                                   "take the probes from opt.hvp_probes(params) first")
            if h.shape != p.shape:
                raise ValueError(f"{name}: a product of shape {tuple(h.shape)} was given for a parameter of "
                                 f"shape {tuple(p.shape)}")

    def _fold(self, params: list[torch.Tensor], hvps: list[torch.Tensor]) -> None:
        """Add ``hvps``, tensors the optimizer may keep and add to in place, into this step's sums."""
        for p, h in zip(params, hvps):
            total = self._hvp_sums.get(p)
            self._hvp_sums[p] = h if total is None else total.add_(h)

    def _scale_for_probes(self) -> torch.Tensor | None:
        """``1 / S`` for the last scale ``S`` a GradScaler handed over, or ``None`` without one.

        Held at the smallest float16 subnormal, 2**-24, so that a scaled float16 probe is never zero.
        A Rademacher probe (+-1) times a power of two stays exact down to there; a Gaussian probe of a
        float16 parameter (``PlainESGD``'s default) is rounded: at the default scale 65536, ``z / S``
        is a float16 subnormal for ``|z| < 4``, with a spacing of 2**-24, a relative error of about
        0.2% where ``|z|`` is near 1 and more where it is smaller.  Probes of float32 and wider
        parameters are exact at any scale."""
        if self._grad_scale_seen is None:
            return None
        return self._grad_scale_seen.reciprocal().clamp(min=2.0 ** -24)

    @torch.no_grad()
    def _finite_difference_hvps(self, params: list[torch.Tensor], closure: Callable[[], torch.Tensor],
                                saved_rng: tuple) -> list[torch.Tensor]:
        """``H z ~ (g(theta + r z) - g(theta)) / r`` from one more first-order gradient evaluation.

        ``r = eps_dtype ** (1/3) * (1 + ||theta||) / ||z||``: a per-coordinate move of about
        ``eps ** (1/3)`` times the parameters' scale (5e-3 in float32).  The textbook ``sqrt(eps)``
        minimises the error of a smooth gradient, but on ReLU networks a unit that crosses its kink
        within the move adds a gradient jump divided by ``r``; with ``sqrt(eps)`` in float32 those
        jumps swamped the estimate and froze training (an MNIST run stuck at 20% accuracy), while
        the larger move keeps the relative error on smooth models near 1e-3 (tests bound it).
        The RNG is rewound for the second evaluation so dropout-like layers draw the same masks.
        """
        probes = [self._probe_for(p) for p in params]
        theta0 = [p.detach().clone() for p in params]
        theta_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(theta0)))
        z_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(probes)))
        r = (torch.finfo(params[0].dtype).eps ** (1 / 3) * (1 + theta_norm) / z_norm).item()
        # Copied, not kept by reference: under DistributedDataParallel with gradient_as_bucket_view
        # the closure's backward writes into the very memory .grad points at.
        grads0 = [p.grad.detach().clone() for p in params]
        after = rng_state(params[0].device)
        torch._foreach_add_(params, probes, alpha=r)
        set_rng_state(saved_rng, params[0].device)
        try:
            for p in params:        # the closure's backward then starts from zero, zeroing or not
                p.grad = None
            with torch.enable_grad():
                closure()
            grads1 = [torch.zeros_like(p) if p.grad is None else p.grad.detach() for p in params]
        finally:
            torch._foreach_copy_(params, theta0)
            set_rng_state(after, params[0].device)
            for p, g0 in zip(params, grads0):
                p.grad = g0
        # Out of place: the closure's caller may hold the gradients at theta + r z.
        hvps = torch._foreach_sub(grads1, grads0)
        torch._foreach_div_(hvps, r)
        return hvps

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

        Under ``GradScaler.step(opt)`` the scaler's ``found_inf`` and ``grad_scale`` are honoured:
        a step whose scaled gradients overflowed changes nothing (the closure's loss is still returned),
        and otherwise the gradients and products are divided by ``grad_scale``.  A gradient of the
        state dtype is unscaled in place, as ``GradScaler.unscale_`` would; a narrower one (a float16
        parameter's) is left as it is and unscaled in its float32 copy, where it cannot underflow.
        """
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        try:
            return self._step(closure, grad_scale, found_inf)
        except BaseException:
            # GradScaler deletes these only once step() has returned, and multiplies a leftover
            # grad_scale into the next one: dropped here, a failed step cannot scale the next.
            for name in ("grad_scale", "found_inf"):
                if hasattr(self, name):
                    delattr(self, name)
            raise

    def _step(self, closure: Callable[[], torch.Tensor] | None, grad_scale: torch.Tensor | None,
              found_inf: torch.Tensor | None):
        hvp_step = self.is_hvp_step()
        if (grad_scale is not None or found_inf is not None) and self.hvp_method == "finite-difference":
            self._abandon_step()
            raise ValueError(f"{type(self).__name__}: hvp_method='finite-difference' cannot be driven by a "
                             "GradScaler: its product needs opt.step(closure), which GradScaler does not "
                             "support; use hvp_method='autograd', or bfloat16 autocast without a scaler")
        if hvp_step and grad_scale is None and found_inf is not None:
            self._abandon_step()
            raise RuntimeError(UNSCALED_PRODUCT_MESSAGE.format(name=type(self).__name__))
        finite_difference = hvp_step and self.hvp_method == "finite-difference"
        if finite_difference and closure is None:
            raise RuntimeError(f"{type(self).__name__}: hvp_method='finite-difference' evaluates the "
                               "gradient a second time on HVP steps; call opt.step(closure)")
        saved_rng = rng_state(self._device()) if finite_difference else None
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if found_inf is not None and found_inf.item():
            self._abandon_step()
            return loss
        if grad_scale is not None:
            self._grad_scale_seen = grad_scale.detach().clone()
        elif found_inf is None:     # no scaler (after unscale_ the scale is withheld, not gone)
            self._grad_scale_seen = None
        params = self._params_with_grad()
        dtypes = self._state_dtypes(params)
        hvps = None
        dropped = False
        if hvp_step and params:
            if finite_difference:
                self._release_before_hvp()
                local = self._finite_difference_hvps(params, closure, saved_rng)
            else:
                self.accumulate_hvp()
                pair = self._hvp_pair
                local = [self._hvp_sums[p] for p in params] if pair is None else [pair[0][p] for p in params]
            if self.hvp_reduce is not None:
                self.hvp_reduce(local)
            # The products carry the scale of the loss times that of the probes.
            scale = self._probe_scale
            if scale is not None:
                scale = scale if grad_scale is None else grad_scale * scale.to(grad_scale.device)
            else:
                scale = grad_scale
            local = self._cast_and_unscale(local, dtypes, scale)
            floors = None
            if not finite_difference and self._hvp_pair is not None:
                other = self._cast_and_unscale([self._hvp_pair[1][p] for p in params], dtypes, scale)
                local, floors = paired_estimate(local, other, self._hvp_pair[2])
            # After the reduction, so that every rank takes the same decision.
            # (a non-finite floor makes its estimate non-finite too, so the estimates tell for both)
            if _all_finite(local):
                hvps = dict(zip(params, local))
                if floors is not None:
                    hvps = PairedSquares(hvps, dict(zip(params, floors)))
            else:
                dropped = True
                self.nonfinite_products += 1
        grads = dict(zip(params, self._cast_and_unscale([p.grad for p in params], dtypes, grad_scale)))
        self._probes.clear()
        self._hvp_sums.clear()
        self._hvp_pair = None
        self._rng_before_probes = None
        self._probe_scale = None
        self._update(hvp_step and not dropped, hvps, grads)
        # docs/esgd-m.md: the counter is reset on an HVP step and, like steps_done, grows by one
        # after every step, so with update_d_every=10 one step in ten computes a product.
        if hvp_step and not dropped:
            self.steps_since_hvp = 0
        self.steps_done += 1
        self.steps_since_hvp += 1
        if dropped:     # the estimate is owed a product: the next step takes one, warmup over or not
            self.steps_since_hvp = max(self.steps_since_hvp, self.update_d_every)
        return loss

    def _abandon_step(self) -> None:
        """Leave the optimizer as if this step had not begun: rewind the probe stream, drop the
        products and probes, restore what was released for them, and free the graph on ``.grad``."""
        self._rewind_probes()
        self._probes.clear()
        self._hvp_sums.clear()
        self._hvp_pair = None
        self._probe_scale = None
        self._restore_released()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None and p.grad.requires_grad:
                    p.grad = p.grad.detach()

    def _state_dtypes(self, params: list[torch.Tensor]) -> list[torch.dtype]:
        group_of = {p: g for g in self.param_groups for p in g["params"]}
        return [state_dtype_for(p.dtype, group_of[p]["state_dtype"]) for p in params]

    @staticmethod
    def _cast_and_unscale(tensors: list[torch.Tensor], dtypes: list[torch.dtype],
                          scale: torch.Tensor | None) -> list[torch.Tensor]:
        """``tensors`` in ``dtypes``, divided by ``scale`` when given: in place where no cast was needed,
        in the cast copy otherwise.  Cast first: a float16 tensor divided by 65536 would underflow."""
        out = [t if t.dtype == dt else t.to(dt) for t, dt in zip(tensors, dtypes)]
        if scale is not None and out:
            torch._foreach_div_(out, scale.to(out[0].device))
        return out

    def _update(self, hvp_step: bool, hvps: dict[torch.Tensor, torch.Tensor] | None,
                grads: dict[torch.Tensor, torch.Tensor]) -> None:
        raise NotImplementedError

    def _release_before_hvp(self) -> None:
        """Free state that this HVP step will replace, before its product (default: nothing)."""

    def _restore_released(self) -> None:
        """Rebuild what :meth:`_release_before_hvp` freed, for a step that is abandoned (default: nothing)."""

    def _device(self) -> torch.device:
        return next((p.device for g in self.param_groups for p in g["params"]), torch.device("cpu"))

    # -- checkpointing ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        extra: dict[str, Any] = {
            "steps_done": self.steps_done,
            "steps_since_hvp": self.steps_since_hvp,
            "update_d_every": self.update_d_every,
            "d_warmup": self.d_warmup,
            "nonfinite_products": self.nonfinite_products,
            "grad_scale": None if self._grad_scale_seen is None else self._grad_scale_seen.item(),
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
        self._check_state_shapes(state_dict)
        saved_groups = state_dict.get("param_groups", [])
        for saved in saved_groups:
            check_state_dtype(saved.get("state_dtype"))
        if len(saved_groups) == len(self.param_groups):
            # A checkpoint from before state_dtype existed keeps this optimizer's choice.
            state_dict["param_groups"] = [saved if "state_dtype" in saved else
                                          {**saved, "state_dtype": group["state_dtype"]}
                                          for saved, group in zip(saved_groups, self.param_groups)]
        super().load_state_dict(state_dict)
        self._restore_state_dtypes(state_dict)
        self.steps_done = int(extra["steps_done"])
        self.steps_since_hvp = int(extra["steps_since_hvp"])
        self.update_d_every = int(extra["update_d_every"])
        self.d_warmup = int(extra["d_warmup"])
        self.nonfinite_products = int(extra.get("nonfinite_products", 0))
        seen = extra.get("grad_scale")
        self._grad_scale_seen = None if seen is None else torch.tensor(float(seen), device=self._device())
        if "generator_state" in extra:
            if self.generator is None:
                raise ValueError(f"{type(self).__name__}.load_state_dict: the checkpoint holds a probe "
                                 "generator state; construct the optimizer with generator=torch.Generator()")
            self.generator.set_state(extra["generator_state"].cpu())

    def _restore_state_dtypes(self, state_dict: dict[str, Any]) -> None:
        # Optimizer.load_state_dict casts every floating-point state tensor to its parameter's dtype,
        # which would round float32 state of a bfloat16 parameter to bfloat16; cast from the saved
        # tensors again, to the state dtype.
        saved_state = state_dict.get("state", {})
        for group, saved in zip(self.param_groups, state_dict["param_groups"]):
            for p, key in zip(group["params"], saved["params"]):
                dtype = state_dtype_for(p.dtype, group["state_dtype"])
                if dtype == p.dtype:
                    continue
                for name, value in saved_state.get(key, {}).items():
                    if torch.is_tensor(value) and value.is_floating_point():
                        self.state[p][name] = value.to(device=p.device, dtype=dtype, copy=True)

    def _check_state_shapes(self, state_dict: dict[str, Any]) -> None:
        # Optimizer.load_state_dict pairs saved state with parameters by position and never looks at
        # shapes, so a checkpoint of another model would load and then fail inside the next step().
        # Every tensor in a parameter's state here is shaped like the parameter.
        saved_groups = state_dict.get("param_groups", [])
        if len(saved_groups) != len(self.param_groups) or any(
                len(g["params"]) != len(s["params"]) for g, s in zip(self.param_groups, saved_groups)):
            return                              # Optimizer.load_state_dict reports this mismatch
        saved_state = state_dict.get("state", {})
        for gi, (group, saved) in enumerate(zip(self.param_groups, saved_groups)):
            for j, (p, key) in enumerate(zip(group["params"], saved["params"])):
                for name, value in saved_state.get(key, {}).items():
                    if torch.is_tensor(value) and value.shape != p.shape:
                        raise ValueError(
                            f"{type(self).__name__}.load_state_dict: state entry {name!r} of "
                            f"param_groups[{gi}]['params'][{j}] has shape {tuple(value.shape)}, but that "
                            f"parameter has shape {tuple(p.shape)}; was the state saved for another model?")


def paired_estimate(a: list[torch.Tensor], b: list[torch.Tensor],
                    covers: float) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The two terms of :class:`PairedSquares` from the halves' products, element by element:
    ``a b + covers ((a - b) / 2)^2`` and ``covers ((a - b) / 2)^2`` (``a`` is overwritten)."""
    diff = torch._foreach_sub(a, b)
    floors = torch._foreach_mul(diff, diff)
    torch._foreach_mul_(floors, covers / 4)
    torch._foreach_mul_(a, b)
    torch._foreach_add_(a, floors)
    return list(a), list(floors)


def _all_finite(tensors: list[torch.Tensor]) -> bool:
    """Whether no tensor holds an inf or NaN, with one host synchronisation in the common case.

    A finite Euclidean norm proves every element finite (an inf or NaN makes it inf or NaN); it is the
    fast reduction (on the CPU the infinity norm takes about fifteen times as long).  A non-finite one may
    also be the squares of large finite values overflowing, so then the infinity norm, which keeps infs
    and NaNs and cannot overflow, decides."""
    tensors = [t for t in tensors if t.numel()]
    if not tensors:
        return True
    if bool(torch.stack(torch._foreach_norm(tensors)).isfinite().all()):
        return True
    return bool(torch.stack(torch._foreach_norm(tensors, math.inf)).isfinite().all())
