"""Forward-over-reverse products (``esgd.ForwardOverReverse``, ``hvp_probes``/``accumulate_products``):
every optimizer of the package trains on them as on the double backward, in float64 to rounding,
eagerly and compiled; buffers move as the forward moves them; misuse is refused in one line."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import esgd
from esgd import ForwardOverReverse, HessianOptimizer

OPTIMIZERS = [c for c in vars(esgd).values()
              if isinstance(c, type) and issubclass(c, HessianOptimizer) and c is not HessianOptimizer]
STEPS = 6
SCHEDULE = {"update_d_every": 2, "d_warmup": 2}    # product steps 1, 2, 4, 6: both kinds of step
# Sophia divides by max(rho * h, eps): at its default eps = 1e-12 an element whose curvature estimate is
# near zero magnifies the two routes' rounding (1e-16) to 1e-6 in the parameters; a floor of 1e-6 keeps
# the comparison one of the products, not of that division.
SETTINGS = {esgd.Sophia: {"eps": 1e-6}}

pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


def convnet() -> nn.Module:
    """BatchNorm in training mode, ReLU, pooling: the layers whose double backward the route replaces."""
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Conv2d(4, 4, 3, stride=2), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3))


def batches(model_fn, n: int = STEPS) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    shape = (8, 1, 6, 6) if model_fn is convnet else (8, 5)
    return [(torch.randn(shape, generator=g, dtype=torch.float64), torch.randint(0, 3, (8,), generator=g))
            for _ in range(n)]


def train(cls, model_fn, route: str, *, frozen: bool = False, pair: bool = False):
    """``STEPS`` steps of ``cls`` on a float64 ``model_fn()``; products by ``route``: "double" (backward
    with create_graph), "eager" or "compiled" (forward-over-reverse).  With ``pair``, a plain backward
    and the paired estimate of two halves of the first four rows.  Returns losses, parameters, buffers
    and the product steps."""
    torch.manual_seed(0)
    model = model_fn().double()
    if frozen:                    # a parameter the optimizer does not hold stays a constant
        model[0].weight.requires_grad_(False)
    kwargs = {k: v for k, v in SCHEDULE.items() if k in cls.__init__.__code__.co_varnames}
    opt = cls([p for p in model.parameters() if p.requires_grad], lr=0.05,
              generator=torch.Generator().manual_seed(3), **kwargs, **SETTINGS.get(cls, {}))
    loss_of = lambda x, y: nn.functional.cross_entropy(model(x), y)      # noqa: E731
    fr = None if route == "double" else ForwardOverReverse(model, loss_of, compile=route == "compiled")
    losses, products = [], []
    for x, y in batches(model_fn):
        products.append(opt.is_hvp_step())
        opt.zero_grad(set_to_none=True)
        if pair:
            loss = loss_of(x, y)
            loss.backward()
            halves, saved = ((x[:2], y[:2]), (x[2:4], y[2:4])), [b.clone() for b in model.buffers()]
            if fr is None and opt.should_create_graph():
                opt.accumulate_hvp_pair(loss_of(*halves[0]), loss_of(*halves[1]), covers=0.5)
                with torch.no_grad():      # the halves' forwards must not move the running statistics
                    for b, s in zip(model.buffers(), saved):
                        b.copy_(s)
            elif fr is not None:
                fr.accumulate_pair(opt, halves[0], halves[1], covers=0.5)
                assert all(torch.equal(b, s) for b, s in zip(model.buffers(), saved))
        elif fr is None:
            loss = loss_of(x, y)
            loss.backward(create_graph=opt.should_create_graph())
        else:
            loss = fr.backward(opt, x, y)
            assert not loss.requires_grad and all(not p.grad.requires_grad for p in opt.param_groups[0]["params"])
        opt.step()
        losses.append(loss.item())
    flat = lambda ts: torch.cat([t.detach().double().flatten() for t in ts])    # noqa: E731
    return losses, flat(model.parameters()), flat(model.buffers()), products


def assert_same(a, b, tol: float = 1e-10) -> None:
    assert a[3] == b[3] and any(a[3]) and not all(a[3])
    assert a[0] == pytest.approx(b[0], rel=tol, abs=tol)
    assert torch.allclose(a[1], b[1], rtol=tol, atol=tol), (a[1] - b[1]).abs().max()
    assert torch.allclose(a[2], b[2], rtol=tol, atol=tol), (a[2] - b[2]).abs().max()


@pytest.mark.parametrize("model_fn", [convnet, mlp])
@pytest.mark.parametrize("cls", OPTIMIZERS, ids=lambda c: c.__name__)
def test_eager_forward_over_reverse_trains_as_the_double_backward(cls, model_fn):
    double = train(cls, model_fn, "double")
    assert double[1].isfinite().all() and double[0][-1] != double[0][0]
    assert_same(train(cls, model_fn, "eager"), double)


def test_a_frozen_parameter_stays_a_constant():
    assert_same(train(esgd.ESGD, convnet, "eager", frozen=True), train(esgd.ESGD, convnet, "double", frozen=True))


def test_compiled_forward_over_reverse_trains_as_the_double_backward():
    """torch.compile reorders and fuses the arithmetic, so float64 agrees to rounding, not to the bit."""
    assert_same(train(esgd.ESGD, mlp, "compiled"), train(esgd.ESGD, mlp, "double"), tol=1e-9)


@pytest.mark.parametrize("model_fn", [convnet, mlp])
@pytest.mark.parametrize("cls", [c for c in OPTIMIZERS if c.squares_products], ids=lambda c: c.__name__)
def test_the_paired_estimate_from_forward_over_reverse_trains_as_from_the_double_backward(cls, model_fn):
    double = train(cls, model_fn, "double", pair=True)
    assert double[1].isfinite().all() and double[0][-1] != double[0][0]
    assert double[1].ne(train(cls, model_fn, "double")[1]).any()        # pairing changed the steps
    assert_same(train(cls, model_fn, "eager", pair=True), double)


def test_the_compiled_paired_estimate_trains_as_the_double_backwards():
    assert_same(train(esgd.ESGD, mlp, "compiled", pair=True), train(esgd.ESGD, mlp, "double", pair=True), tol=1e-9)


def test_the_buffers_move_once_per_step_as_the_forward_moves_them():
    torch.manual_seed(0)
    model = convnet().double()
    twin = convnet().double()
    twin.load_state_dict(model.state_dict())
    opt = esgd.ESGD(model.parameters(), lr=0.01)
    x, y = batches(convnet, 1)[0]
    ForwardOverReverse(model, lambda x, y: nn.functional.cross_entropy(model(x), y), compile=False).backward(opt, x, y)
    twin(x)
    for (name, a), b in zip(model.named_buffers(), twin.buffers()):
        assert torch.equal(a, b) if not a.is_floating_point() else torch.allclose(a, b, rtol=1e-12), name
    assert int(model[1].num_batches_tracked) == 1


def test_the_probes_are_the_steps_own_and_products_add_up():
    p = nn.Parameter(torch.ones(3, dtype=torch.float64))
    opt = esgd.ESGD([p], lr=0.1, generator=torch.Generator().manual_seed(0))
    z = opt.hvp_probes([p])[0]
    assert torch.equal(opt.hvp_probes([p])[0], z) and set(z.tolist()) <= {-1.0, 1.0}
    first = torch.full((3,), 2.0, dtype=torch.float64)
    opt.accumulate_products([p], [first])
    opt.accumulate_products([p], [torch.full((3,), 1.0, dtype=torch.float64)])
    assert torch.equal(opt._hvp_sums[p], torch.full((3,), 3.0, dtype=torch.float64))
    assert torch.equal(first, torch.full((3,), 2.0, dtype=torch.float64))     # the caller's, untouched


def test_products_handed_over_are_kept_without_a_copy():
    p = nn.Parameter(torch.ones(3, dtype=torch.float64))
    opt = esgd.ESGD([p], lr=0.1, generator=torch.Generator().manual_seed(0))
    opt.hvp_probes([p])
    given = torch.full((3,), 2.0, dtype=torch.float64)
    opt.accumulate_products([p], [given], copy=False)
    assert opt._hvp_sums[p].data_ptr() == given.data_ptr()
    opt.accumulate_products([p], [torch.full((3,), 1.0, dtype=torch.float64)], copy=False)
    assert torch.equal(given, torch.full((3,), 3.0, dtype=torch.float64))


def test_a_second_optimizers_parameters_get_their_gradients_and_the_product_is_unchanged():
    """Two optimizers over one model: ESGD holds the convolutions, Adam the rest; on a product step both
    get the double backward's gradients, and ESGD's product is that of its own block of H."""
    x, y = batches(convnet, 1)[0]
    got = []
    for route in ("double", "eager"):
        torch.manual_seed(0)
        model = convnet().double()
        convs = [m.weight for m in model if isinstance(m, nn.Conv2d)]
        opt = esgd.ESGD(convs, lr=0.1, generator=torch.Generator().manual_seed(1))
        loss_of = lambda x, y: nn.functional.cross_entropy(model(x), y)      # noqa: E731
        if route == "double":
            loss_of(x, y).backward(create_graph=True)
            opt.accumulate_hvp()
        else:
            ForwardOverReverse(model, loss_of, compile=False).backward(opt, x, y)
        got.append(([p.grad.detach().clone() for p in model.parameters()], [opt._hvp_sums[p] for p in convs]))
    for a, b in zip(got[0][0] + got[0][1], got[1][0] + got[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_misuse_is_refused_in_one_line():
    p = nn.Parameter(torch.ones(3))
    opt = esgd.ESGD([p], lr=0.1, d_warmup=1, update_d_every=2)
    with pytest.raises(RuntimeError, match="steps that take an exact product"):
        esgd.ESGD([p], lr=0.1, hvp_method="finite-difference").hvp_probes([p])
    with pytest.raises(RuntimeError, match="hvp_probes"):
        opt.accumulate_products([p], [torch.ones(3)])
    opt.hvp_probes([p])
    with pytest.raises(ValueError, match="shape"):
        opt.accumulate_products([p], [torch.ones(4)])
    with pytest.raises(ValueError, match="2 products for 1"):
        opt.accumulate_products([p], [torch.ones(3), torch.ones(3)])
    model = nn.Linear(2, 1)
    fr = ForwardOverReverse(model, lambda x: model(x).sum(), compile=False)
    with pytest.raises(ValueError, match="not the model's"):
        fr.backward(esgd.ESGD([nn.Parameter(torch.ones(1))], lr=0.1), torch.ones(1, 2))
    with pytest.raises(ValueError, match="hvp_method='autograd'"):
        fr.backward(esgd.ESGD(model.parameters(), lr=0.1, hvp_method="finite-difference"), torch.ones(1, 2))
    with pytest.raises(TypeError, match="nn.Module"):
        ForwardOverReverse(lambda x: x, lambda x: x)
    pair = esgd.ESGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="covers"):
        fr.accumulate_pair(pair, (torch.ones(1, 2),), (torch.ones(1, 2),), covers=0)
    with pytest.raises(ValueError, match="squared product"):
        fr.accumulate_pair(esgd.AdaHessian(model.parameters()), (torch.ones(1, 2),), (torch.ones(1, 2),), 0.5)
    held = list(model.parameters())
    probes = pair.hvp_probes(held)
    with pytest.raises(ValueError, match="for every"):
        pair.accumulate_product_pair(held[:1], probes[:1], probes[:1], 0.5)
    with pytest.raises(ValueError, match="a product of shape"):
        pair.accumulate_product_pair(held, [torch.ones(5)] * 2, probes, 0.5)
    pair.accumulate_product_pair(held, probes, probes, 0.5)
    with pytest.raises(RuntimeError, match="one pair per step"):
        pair.accumulate_product_pair(held, probes, probes, 0.5)
    with pytest.raises(RuntimeError, match="already has a paired estimate"):
        pair.accumulate_products(held, probes)


def test_steps_without_a_product_are_a_plain_backward():
    model = mlp().double()
    opt = esgd.ESGD(model.parameters(), lr=0.1, d_warmup=1, update_d_every=5)
    fr = ForwardOverReverse(model, lambda x, y: nn.functional.cross_entropy(model(x), y), compile=False)
    x, y = batches(mlp, 1)[0]
    fr.backward(opt, x, y)
    opt.step()
    assert not opt.is_hvp_step()
    opt.zero_grad(set_to_none=True)
    loss = fr.backward(opt, x, y)
    grads = [p.grad.clone() for p in model.parameters()]
    assert not opt._hvp_sums and not opt._probes
    model.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x), y).backward()
    assert all(torch.equal(a, p.grad) for a, p in zip(grads, model.parameters())) and loss.item() > 0


def test_under_bfloat16_autocast_the_product_is_the_double_backwards_to_bfloat16_rounding():
    """bfloat16 keeps 8 significant bits (a relative rounding of 2**-9 per operation); the two routes
    round different intermediate results, so their products agree to a few of those roundings, in norm."""
    products = []
    for route in ("double", "eager"):
        torch.manual_seed(0)
        model = mlp()
        opt = esgd.ESGD(model.parameters(), lr=0.01, generator=torch.Generator().manual_seed(3))
        x, y = (t.float() if t.is_floating_point() else t for t in batches(mlp, 1)[0])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if route == "double":
                nn.functional.cross_entropy(model(x), y).backward(create_graph=True)
                opt.accumulate_hvp()
            else:
                ForwardOverReverse(model, lambda x, y: nn.functional.cross_entropy(model(x), y),
                                   compile=False).backward(opt, x, y)
        products.append(torch.cat([opt._hvp_sums[p].flatten() for p in model.parameters()]))
    a, b = products
    assert a.dtype == torch.float32 and a.norm() > 0
    assert (a - b).norm() / a.norm() < 16 * 2.0 ** -9, (a - b).norm() / a.norm()


def test_the_documented_loop_runs():
    """docs/optimizer.md's forward-over-reverse loop, run as written on a small model (eagerly: the
    compiled pass is the subject of the test above)."""
    import functools
    import pathlib
    import re
    import types
    text = (pathlib.Path(__file__).parents[2] / "docs" / "optimizer.md").read_text()
    section = text[text.index("**Forward-over-reverse, compiled**"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    torch.manual_seed(0)
    model = mlp()
    loader = [(torch.randn(16, 5), torch.randint(0, 3, (16,))) for _ in range(4)]
    opt = esgd.ESGD(model.parameters(), lr=0.03, update_d_every=2, d_warmup=1)
    eager = types.SimpleNamespace(ForwardOverReverse=functools.partial(ForwardOverReverse, compile=False))
    scope = {"model": model, "loader": loader, "opt": opt, "loss_fn": nn.functional.cross_entropy, "esgd": eager}
    exec(compile("\n".join(line[2:] if line.startswith("  ") else line for line in code.splitlines()),
                 "optimizer.md", "exec"), scope)
    assert opt.steps_done == 4 and all(opt.state[p]["exp_avg_d_sq"].gt(0).any() for p in model.parameters())


def test_under_autocast_a_model_torch_func_cannot_take_gets_one_clear_error():
    """A convolution after a BatchNorm under bfloat16 autocast, inside torch.func's transforms: torch
    leaves the convolution's input in float32.  The error names the route and the ways out, and the
    optimizer is left as if the step had not begun."""
    torch.manual_seed(0)
    model = convnet()
    opt = esgd.ESGD(model.parameters(), lr=0.01)
    x, y = (t.float() if t.is_floating_point() else t for t in batches(convnet, 1)[0])
    fr = ForwardOverReverse(model, lambda x, y: nn.functional.cross_entropy(model(x), y), compile=False)
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fr.backward(opt, x, y)
    except RuntimeError as err:
        assert "under autocast" in str(err) and "float32" in str(err)
        assert not opt._probes and not opt._hvp_sums
    else:       # a torch that handles it: then the product must be there
        assert opt._hvp_sums


@pytest.mark.parametrize("compile,reused", [(True, False), (False, False), ({"mode": "reduce-overhead"}, True),
                                            ({"mode": "max-autotune"}, True),
                                            ({"mode": "max-autotune-no-cudagraphs"}, False),
                                            ({"options": {"triton.cudagraphs": True}}, True)])
def test_gradients_and_products_are_copied_only_where_cuda_graphs_reuse_the_outputs(compile, reused):
    model = nn.Linear(2, 1)
    fr = esgd.ForwardOverReverse(model, lambda x: model(x).sum(), compile=compile)
    assert fr._outputs_reused is reused


@pytest.mark.parametrize("options,symbolic", [(True, False), ({"dynamic": None}, True)])
def test_each_batch_shape_gets_a_static_graph_unless_the_options_say_otherwise(options, symbolic):
    """By default a second batch shape compiles a graph of its own rather than one with symbolic sizes."""
    torch._dynamo.reset()               # the compiled function is shared: start from no cached graphs
    graphs = []

    def backend(gm, example_inputs):    # records what was compiled, runs it as traced
        graphs.append(gm)
        return gm.forward
    model = nn.Linear(3, 2).double()
    opt = esgd.ESGD(model.parameters(), lr=0.1, d_warmup=5, generator=torch.Generator().manual_seed(0))
    fr = ForwardOverReverse(model, lambda x: (model(x) ** 3).sum(),
                            compile={**(options if isinstance(options, dict) else {}), "backend": backend})
    for rows in (4, 6, 8):
        opt.zero_grad(set_to_none=True)
        fr.backward(opt, torch.randn(rows, 3, dtype=torch.float64))
        opt.step()
    values = [n.meta.get("example_value") for g in graphs for n in g.graph.nodes if n.op == "placeholder"]
    sizes = [d for v in values if isinstance(v, torch.Tensor) for d in v.shape] + values
    assert len(graphs) >= 2
    assert any(isinstance(d, torch.SymInt) for d in sizes) is symbolic
    torch._dynamo.reset()


def test_each_model_class_has_its_own_compiled_pass_within_the_recompile_limit():
    """With a limit of two graphs per function, two classes at two batch shapes each all compile: the
    limit counts per class, so a process that compiles several models does not fall back to eager."""
    torch._dynamo.reset()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    class Other(nn.Linear):
        pass

    with torch._dynamo.config.patch(recompile_limit=2):
        for model in (nn.Linear(3, 2).double(), Other(3, 2).double()):
            opt = esgd.ESGD(model.parameters(), lr=0.1, d_warmup=5, generator=torch.Generator().manual_seed(0))
            fr = ForwardOverReverse(model, lambda x, m=model: (m(x) ** 3).sum(), compile={"backend": backend})
            for rows in (4, 6):
                opt.zero_grad(set_to_none=True)
                fr.backward(opt, torch.randn(rows, 3, dtype=torch.float64))
                opt.step()
    assert len(graphs) == 4
    assert esgd.forward._pass_for(nn.Linear) is esgd.forward._pass_for(nn.Linear)      # one per class
    assert esgd.forward._pass_for(nn.Linear).__code__ is not esgd.forward._pass_for(Other).__code__
    torch._dynamo.reset()


def test_a_pair_under_reused_outputs_keeps_each_halfs_products():
    """Where CUDA graphs write every pass's outputs into the same memory, the first half's products
    must be copied before the second pass: simulated with a pass that returns the same tensors."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2).double()
    fr = ForwardOverReverse(model, lambda x: (model(x) ** 3).sum(), compile=False)
    slots: dict = {}

    def same_memory(*args):
        out = esgd.forward._gradient_and_product(*args)
        for key, tensor in out[2].items():
            slots.setdefault(key, torch.empty_like(tensor)).copy_(tensor)
        return out[0], out[1], slots, out[3]

    fr._pass, fr._outputs_reused = same_memory, True
    opt = esgd.ESGD(model.parameters(), lr=0.1)
    x = torch.randn(4, 3, dtype=torch.float64)
    fr.accumulate_pair(opt, (x[:2],), (x[2:],), covers=1.0)
    a, b, _ = opt._hvp_pair
    params = list(model.parameters())
    probes = opt.hvp_probes(params)           # the step's probes, drawn by the pair
    for rows, got in ((slice(0, 2), a), (slice(2, 4), b)):
        grads = torch.autograd.grad((model(x[rows]) ** 3).sum(), params, create_graph=True)
        want = torch.autograd.grad(grads, params, probes)
        for p, w in zip(params, want):
            torch.testing.assert_close(got[p], w)
