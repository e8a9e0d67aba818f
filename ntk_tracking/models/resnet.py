"""ResNets for 32×32 images (the CIFAR variant): 3×3 stem, no max-pool, BasicBlock stages.

One generic module; ResNet18 and the test-only `_ResNetTiny` are partials of it (flax imagenet's
pattern). BatchNorm statistics live in the `batch_stats` collection: `train=True` uses batch
statistics and updates them, `train=False` (evaluation, the NTK) uses the stored ones.
"""

from __future__ import annotations

import functools
from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

BASE_CHANNELS = 64


def stage_channels(width: float, num_stages: int) -> list[int]:
    """Channels per stage: 64·k, 128·k, 256·k, 512·k (at least 1)."""
    return [max(1, round(BASE_CHANNELS * width * 2**i)) for i in range(num_stages)]


class BasicBlock(nn.Module):
    """Two 3×3 convolutions with BatchNorm and an identity (or 1×1 projection) shortcut."""

    channels: int
    strides: int = 1

    @nn.compact
    def __call__(self, x, train: bool = False):
        norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9, epsilon=1e-5)
        conv = functools.partial(nn.Conv, use_bias=False, kernel_init=nn.initializers.kaiming_normal())
        y = conv(self.channels, (3, 3), (self.strides, self.strides), padding=1)(x)
        y = nn.relu(norm()(y))
        y = conv(self.channels, (3, 3), padding=1)(y)
        y = norm()(y)
        if x.shape[-1] != self.channels or self.strides != 1:
            x = conv(self.channels, (1, 1), (self.strides, self.strides), name="projection")(x)
            x = norm(name="projection_norm")(x)
        return nn.relu(x + y)


class ResNet(nn.Module):
    """Stem conv 3×3 → stages of BasicBlocks (stride 2 from the second stage) → global mean → logits."""

    stage_sizes: Sequence[int]
    num_classes: int = 10
    width: float = 1.0

    @nn.compact
    def __call__(self, x, train: bool = False):
        channels = stage_channels(self.width, len(self.stage_sizes))
        x = nn.Conv(channels[0], (3, 3), padding=1, use_bias=False,
                    kernel_init=nn.initializers.kaiming_normal(), name="stem")(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name="stem_norm")(x)
        x = nn.relu(x)
        for i, blocks in enumerate(self.stage_sizes):
            for j in range(blocks):
                strides = 2 if i > 0 and j == 0 else 1
                x = BasicBlock(channels[i], strides, name=f"stage{i + 1}_block{j + 1}")(x, train)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, name="head")(x)


ResNet18 = functools.partial(ResNet, stage_sizes=(2, 2, 2, 2))
ResNet34 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3))
# Used for testing only: one block per stage in two stages.
_ResNetTiny = functools.partial(ResNet, stage_sizes=(1, 1))

RESNETS = {"resnet18": ResNet18, "resnet34": ResNet34, "resnet_tiny": _ResNetTiny}


def make(config, data_info: dict) -> ResNet:
    """The ResNet `config.model` names at channel multiplier `config.width`, with
    `data_info["num_outputs"]` classes."""
    return RESNETS[config.model](num_classes=data_info["num_outputs"], width=config.width)
