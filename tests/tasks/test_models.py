"""Models and registry details: ResNet-20's size, double backward through BatchNorm, names and options."""

from __future__ import annotations

import pytest
import torch

import tasks
from tasks import TaskConfig, TaskSpec, base, cifar, mnist


def test_resnet20_is_the_papers_size() -> None:
    n = sum(p.numel() for p in cifar.make_model("resnet20").parameters())
    assert 0.26e6 < n < 0.28e6          # He et al. 2016, table 6: 0.27 M
    assert sum(isinstance(m, torch.nn.Conv2d) for m in cifar.make_model("resnet20").modules()) == 19


@pytest.mark.parametrize("arch", ["resnet20", "resnet18"])
def test_batchnorm_double_backward(arch: str) -> None:
    """backward(create_graph=True) through train-mode BatchNorm, then H z by differentiating again."""
    problem = tasks.build_task("cifar", TaskConfig(synthetic=True, batch_size=2, options={"arch": arch}))
    model = problem.model
    assert model.training and any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    params = list(model.parameters())
    problem.loss(next(problem.batches)).backward(create_graph=True)
    grads = [p.grad for p in params]
    assert all(g.requires_grad for g in grads[:1])
    gen = torch.Generator().manual_seed(0)
    probes = [torch.randint(0, 2, p.shape, generator=gen).float() * 2 - 1 for p in params]
    hvps = torch.autograd.grad(grads, params, probes, allow_unused=True)
    for p in params:
        p.grad = None                     # break the parameter <-> grad reference cycle
    finite = [h for h in hvps if h is not None]
    assert len(finite) > len(params) // 2
    assert all(torch.isfinite(h).all() for h in finite) and any(h.abs().sum() > 0 for h in finite)


@pytest.mark.parametrize("task", ["mnist-cnn", "cifar"])
def test_channels_last_changes_the_layout_not_the_function(task: str) -> None:
    """channels_last=true stores the convolutions NHWC; in float64 the loss, the gradient and an exact
    Hessian-vector product are the channels-first model's to rounding."""
    out = []
    for last in (False, True):
        problem = tasks.build_task(task, TaskConfig(synthetic=True, batch_size=4, options={"channels_last": last}))
        problem.model.double()           # keeps each tensor's layout
        convs = [m.weight for m in problem.model.modules() if isinstance(m, torch.nn.Conv2d)]
        assert all(w.is_contiguous(memory_format=torch.channels_last) == last
                   for w in convs if min(w.shape[1], w.shape[-1]) > 1)
        params = list(problem.model.parameters())
        x, y = next(problem.batches)
        loss = problem.loss((x.double(), y))
        grads = torch.autograd.grad(loss, params, create_graph=True)
        probes = [torch.ones_like(p) for p in params]
        hvps = torch.autograd.grad(grads, params, probes)
        out.append([loss.detach(), *[g.detach() for g in grads], *hvps])
    assert out[0][0].dtype == torch.float64
    for a, b in zip(*out):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_mlp_shape_and_options() -> None:
    model = mnist.mlp(1024, 2)
    assert [m.weight.shape for m in model if isinstance(m, torch.nn.Linear)] == \
        [(1024, 784), (1024, 1024), (10, 1024)]
    problem = tasks.build_task("mnist", TaskConfig(options={"width": "32", "depth": "1"}))  # CLI strings
    assert [m.out_features for m in problem.model if isinstance(m, torch.nn.Linear)] == [32, 10]


def test_unknown_names_and_options() -> None:
    with pytest.raises(tasks.UnknownTaskError, match="Did you mean 'mnist'"):
        tasks.get_task("mnsit")
    with pytest.raises(tasks.UnknownTaskError, match="rosenbrock"):
        tasks.get_task("rosenbrok-loss-x10")
    with pytest.raises(base.TaskOptionError, match="no option 'widht'.*width"):
        tasks.build_task("mnist", TaskConfig(options={"widht": 64}))
    with pytest.raises(base.TaskOptionError, match="width='wide'"):
        tasks.build_task("mnist", TaskConfig(options={"width": "wide"}))
    with pytest.raises(ValueError, match="unknown arch"):
        tasks.build_task("cifar", TaskConfig(synthetic=True, options={"arch": "vgg"}))
    assert base.resolve_options("t", {"on": True, "x": 1.0}, {"on": "no", "x": "1e-3"}) == {"on": False, "x": 1e-3}


@pytest.mark.parametrize("spec", tasks.list_tasks(), ids=lambda s: s.name)
def test_spec_has_what_the_tasks_table_needs(spec: TaskSpec) -> None:
    assert spec.name == spec.name.lower() and spec.description and "\n" not in spec.description
    assert spec.default_steps > 0 and spec.default_batch_size > 0 and spec.data_source
    assert (spec.base is None) == (tasks.scaled.parse_name(spec.name) is None)
    assert tasks.get_task(spec.name).name == spec.name
    hash(spec)
