"""CIFAR-10 ResNet: the CIFAR ResNet-20 of He, Zhang, Ren & Sun (CVPR 2016, section 4.2) by default.

ResNet-(6n+2): a 3x3 convolution with 16 filters, three stages of n basic blocks with 16, 32 and 64
filters (stride 2 at the start of stages 2 and 3), identity shortcuts that subsample and zero-pad the
channels where the shape changes (the paper's option A, so ResNet-20 has 0.27 M parameters), global
average pooling and a 10-way linear layer.  ``arch=resnet18`` takes torchvision's ResNet-18 with the
usual CIFAR stem (3x3 stride-1 first convolution, no max pooling).  BatchNorm is in training mode during
training; double backward through it is supported by torch.  Augmentation: random crop (pad 4) and flip.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import data
from .base import Problem, TaskConfig, TaskSpec, resolve_options

OPTIONS = {"arch": "resnet20", "augment": True, "eval_size": 0, "channels_last": False}
BATCH_SIZE = 128
DEPTHS = {"resnet20": 3, "resnet32": 5, "resnet44": 7, "resnet56": 9}


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.stride, self.extra = stride, c_out - c_in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        short = x[:, :, ::self.stride, ::self.stride] if self.stride > 1 else x
        if self.extra:
            short = F.pad(short, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))
        return F.relu(out + short)


class CifarResNet(nn.Module):
    def __init__(self, blocks_per_stage: int = 3, classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        layers, c_in = [], 16
        for stage, c_out in enumerate((16, 32, 64)):
            for i in range(blocks_per_stage):
                layers.append(BasicBlock(c_in, c_out, 2 if stage and not i else 1))
                c_in = c_out
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(64, classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.layers(self.stem(x)).mean((2, 3)))


def make_model(arch: str) -> nn.Module:
    if arch in DEPTHS:
        return CifarResNet(DEPTHS[arch])
    if arch == "resnet18":
        from torchvision.models import resnet18
        model = resnet18(num_classes=10)
        model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)   # 32x32 inputs: keep the resolution
        model.maxpool = nn.Identity()
        return model
    raise ValueError(f"cifar: unknown arch {arch!r} (choose from {', '.join([*DEPTHS, 'resnet18'])})")


def build(config: TaskConfig) -> Problem:
    opt = resolve_options("cifar", OPTIONS, config.options, at_least={"eval_size": 0})
    ds = (data.synthetic_images((3, 32, 32), 10, 2048, 256, config.seed, data.CIFAR_STATS, "CIFAR")
          if config.synthetic else data.load_cifar10(config)).to(config.device)
    model = data.seeded_init(config.seed, lambda: make_model(opt["arch"]), config.device)
    if opt["channels_last"]:      # NHWC weights and activations (see tasks.mnist_cnn)
        model.to(memory_format=torch.channels_last)
    batches = data.batch_stream(ds, config.batch_size or BATCH_SIZE, config.seed, augment=opt["augment"])
    return Problem(model=model, batches=batches, loss=lambda batch: F.cross_entropy(model(batch[0]), batch[1]),
                   evaluate=lambda: data.evaluate_classifier(model, ds, opt["eval_size"] or None, chunk=500),
                   test=lambda: data.evaluate_classifier(model, ds, opt["eval_size"] or None, chunk=500,
                                                         split="test"),
                   data_source=ds.source, synthetic=ds.synthetic, info={"options": opt})


TASK = TaskSpec(name="cifar", description="CIFAR-10 ResNet-20 (0.27M params), crop+flip; options arch=resnet18, augment, "
                "channels_last",
                build=build, default_steps=2000, default_batch_size=BATCH_SIZE,
                data_source="CIFAR-10 via torchvision from the data dir (--download), or --synthetic",
                eval_metric="val_acc", test_metric="test_acc", higher_is_better=True, target=0.6, default_eval_every=200,
                options=OPTIONS)
