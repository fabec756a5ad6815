"""ResNet-12 backbone of DPGN (docs/model.md), FP or PQ-quantized.

Module and parameter names follow the official DPGN ``backbone.py`` so its
``enc_module_state_dict`` loads as is. The stem conv stays FP32 (as in the paper).
"""
from __future__ import annotations

from typing import Callable, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .layers import F64Conv2d, QConv2d, QLinear

BitsFor = Callable[[str], int]


class ResNet12Block(nn.Module):
    """1x1 -> 3x3 -> 1x1 convs with BN + LeakyReLU, 1x1 shortcut, add, LeakyReLU, MaxPool(3, 2, 1)."""

    def __init__(self, inplanes: int, planes: int, name: str, bits_for: BitsFor,
                 per_channel: bool, slope: float):
        super().__init__()
        q = lambda n, *a, **k: QConv2d(*a, bits=bits_for(f"{name}.{n}"), per_channel=per_channel, **k)  # noqa: E731
        self.conv1 = q("conv1", inplanes, planes, 1)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = q("conv2", planes, planes, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = q("conv3", planes, planes, 1)
        self.bn3 = nn.BatchNorm2d(planes)
        self.conv = q("conv", inplanes, planes, 1)  # shortcut
        self.bn = nn.BatchNorm2d(planes)
        self.slope = slope

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = self.bn(self.conv(x))
        out = F.leaky_relu(self.bn1(self.conv1(x)), self.slope)
        out = F.leaky_relu(self.bn2(self.conv2(out)), self.slope)
        out = self.bn3(self.conv3(out))
        out = F.leaky_relu(out + residual, self.slope)
        return F.max_pool2d(out, 3, stride=2, padding=1)


class ResNet12(nn.Module):
    """Backbone returning ``(last, second)`` embeddings, each [B, emb_dim].

    ``last``: global average pool of block 4 -> Linear -> BN1d (point-graph nodes).
    ``second``: MaxPool(2) of block 3 -> flatten -> Linear -> BN1d (initial edges).
    """

    def __init__(self, widths: Tuple[int, int, int, int], emb_dim: int, image_size: int,
                 bits_for: BitsFor, per_channel: bool = False, slope: float = 0.2,
                 prefix: str = "backbone"):
        super().__init__()
        w = list(widths)
        self.conv1 = F64Conv2d(3, w[0], 3, padding=1, bias=False)  # FP32 (paper)
        self.bn1 = nn.BatchNorm2d(w[0])
        blocks = [(w[0], w[0]), (w[0], w[1]), (w[1], w[2]), (w[2], w[3])]
        for i, (cin, cout) in enumerate(blocks, 1):
            name = f"{prefix}.layer{i}.0"
            self.add_module(f"layer{i}", nn.Sequential(
                ResNet12Block(cin, cout, name, bits_for, per_channel, slope)))
        side = image_size
        for _ in range(3):
            side = (side - 1) // 2 + 1  # MaxPool(3, 2, 1)
        second_side = side // 2
        self.second_in = w[2] * second_side * second_side
        self.layer_second = nn.Sequential(
            QLinear(self.second_in, emb_dim, bits=bits_for(f"{prefix}.layer_second.0"),
                    per_channel=per_channel),
            nn.BatchNorm1d(emb_dim))
        self.layer_last = nn.Sequential(
            QLinear(w[3], emb_dim, bits=bits_for(f"{prefix}.layer_last.0"), per_channel=per_channel),
            nn.BatchNorm1d(emb_dim))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="leaky_relu")

    def forward(self, x: torch.Tensor):
        # The official stem uses nn.LeakyReLU() (slope 0.01), the blocks 0.2.
        x = F.leaky_relu(self.bn1(self.conv1(x)), 0.01)
        x = self.layer1(x)
        x = self.layer2(x)
        inter = self.layer3(x)
        x = self.layer4(inter)
        # global average pool (the official AvgPool2d(7) is meant as such), float64 sums as
        # the integer model's TorchEpisodeOps.mean_hw
        x = x.double().mean((2, 3)).float()
        last = self.layer_last(x)
        second = self.layer_second(torch.flatten(F.max_pool2d(inter, 2), 1))
        return last, second
