"""Evaluation networks of the dataset-distillation protocol (IGDS_SPEC section 7).

Written from the architecture facts of the public reference code (DC/DM/MTT's ``ConvNet``,
IDC / MinimaxDiffusion's ``train_models/convnet.py``, ``resnet_ap.py`` and ``resnet.py``):

* **ConvNet-d** (d = 3..6): d blocks of [conv3x3 (``width`` = 128 channels, bias, padding 1) ->
  instance norm (GroupNorm with one group per channel, affine) -> ReLU -> 2x2 average pool], then
  one linear classifier on the flattened ``width x (S / 2^d)^2`` map. ConvNet-3 is the classic
  32x32 network, ConvNet-4 is used at 64^2 and ConvNet-6 at 256^2. (The reference code pads the
  first conv by 3 for 1-channel inputs, a trick that turns MNIST's 28^2 into 32^2; here inputs are
  already ``image_size``, so every conv pads by 1.)
* **ResNetAP-10**: ResNet-10 (one BasicBlock per stage, 64-128-256-512 channels) whose stride-2
  convolutions are replaced by stride-1 convolutions followed by 2x2 average pooling (in the
  block after its first conv's ReLU, and in the shortcut as conv1x1 -> avgpool -> norm), with
  instance norm everywhere and bias-free convolutions.
* **ResNet-18 (IN)**: the standard ResNet-18 (strided convolutions) with instance norm.

Both ResNets pick their stem from the input size as the reference code does: S <= 64 "small"
(conv3x3, no downsampling), 64 < S <= 128 "mid" (conv3x3 then 2x downsampling), larger "large"
(ResNetAP: conv7x7 stride 1 + 4x4 average pool; ResNet-18: conv7x7 stride 2 + 3x3/2 max pool).
Convolutions are initialised N(0, 2 / (k^2 * out_channels)) and norms to identity, as there; the
ConvNet keeps PyTorch's default initialisation, as there.

Instance norm of a 1x1 map is a constant (its variance is zero), so the ResNets refuse input sizes
whose last stage would be 1x1, and a ConvNet whose map would shrink below 1 pixel is refused.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from igds_fast.errors import IGDSInputError
from igds_fast.evaluate.torchvision_nets import build_torchvision_network, is_torchvision_name

NETWORK_NAMES = ("convnet3", "convnet4", "convnet5", "convnet6", "resnet_ap10", "resnet18_in")


def instance_norm(channels: int) -> nn.GroupNorm:
    """Instance norm with a per-channel affine: GroupNorm with one group per channel."""
    return nn.GroupNorm(channels, channels, affine=True)


def _check_common(in_channels: int, num_classes: int, image_size: int) -> None:
    for name, value in (("in_channels", in_channels), ("num_classes", num_classes), ("image_size", image_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise IGDSInputError(f"{name} must be a positive integer, got {value!r}")
    if num_classes < 2:
        raise IGDSInputError(f"num_classes must be at least 2, got {num_classes}")


class ConvNet(nn.Module):
    """ConvNet-d: d x [conv3x3 -> instance norm -> ReLU -> avgpool 2x2] -> linear classifier."""

    def __init__(self, in_channels: int, num_classes: int, image_size: int, depth: int = 3, width: int = 128):
        super().__init__()
        _check_common(in_channels, num_classes, image_size)
        if not 1 <= depth <= 8:
            raise IGDSInputError(f"ConvNet depth must be in 1..8, got {depth}")
        feature_side = image_size >> depth
        if feature_side < 1:
            raise IGDSInputError(
                f"ConvNet-{depth} needs image_size >= {2 ** depth} (each block halves the map), "
                f"got {image_size}"
            )
        blocks = []
        channels = in_channels
        for _ in range(depth):
            blocks += [
                nn.Conv2d(channels, width, kernel_size=3, padding=1),
                instance_norm(width),
                nn.ReLU(inplace=True),
                nn.AvgPool2d(kernel_size=2, stride=2),
            ]
            channels = width
        self.features = nn.Sequential(*blocks)
        self.feature_dim = width * feature_side * feature_side
        self.classifier = nn.Linear(self.feature_dim, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Flattened features before the classifier, [N, feature_dim]."""
        return self.features(x).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))


def _stem_kind(image_size: int) -> str:
    if image_size <= 64:
        return "small"
    if image_size <= 128:
        return "mid"
    return "large"


class _BasicBlockAP(nn.Module):
    """BasicBlock with average-pool downsampling: conv-norm-relu-[avgpool]-conv-norm + shortcut, relu."""

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, padding=1, bias=False)
        self.norm1 = instance_norm(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.norm2 = instance_norm(planes)
        self.stride = stride
        self.shortcut = None
        if stride != 1 or in_planes != planes:
            layers = [nn.Conv2d(in_planes, planes, 1, bias=False)]
            if stride != 1:
                layers.append(nn.AvgPool2d(kernel_size=stride, stride=stride))
            layers.append(instance_norm(planes))
            self.shortcut = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.norm1(self.conv1(x)))
        if self.stride != 1:
            out = F.avg_pool2d(out, kernel_size=self.stride, stride=self.stride)
        out = self.norm2(self.conv2(out))
        residual = x if self.shortcut is None else self.shortcut(x)
        return F.relu(out + residual)


class _BasicBlock(nn.Module):
    """Standard ResNet BasicBlock (strided first conv, conv1x1-stride shortcut) with instance norm."""

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.norm1 = instance_norm(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.norm2 = instance_norm(planes)
        self.shortcut = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), instance_norm(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        residual = x if self.shortcut is None else self.shortcut(x)
        return F.relu(out + residual)


class _ResNet(nn.Module):
    """Shared ResNet body: stem, four stages (64-128-256-512), global average pool, linear."""

    def __init__(self, block, blocks_per_stage, stem: nn.Module, in_planes: int, num_classes: int):
        super().__init__()
        self.stem = stem
        stages = []
        for stage, (planes, count) in enumerate(zip((64, 128, 256, 512), blocks_per_stage)):
            layers = []
            for index in range(count):
                stride = 2 if stage > 0 and index == 0 else 1
                layers.append(block(in_planes, planes, stride))
                in_planes = planes
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.feature_dim = in_planes
        self.classifier = nn.Linear(in_planes, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels
                nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(module, nn.GroupNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Globally pooled features before the classifier, [N, 512]."""
        return F.adaptive_avg_pool2d(self.stages(self.stem(x)), 1).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))


def _stem(kind: str, in_channels: int, average_pool: bool) -> nn.Sequential:
    planes = 64
    if kind == "large" and average_pool:
        return nn.Sequential(
            nn.Conv2d(in_channels, planes, 7, padding=3, bias=False), instance_norm(planes),
            nn.ReLU(inplace=True), nn.AvgPool2d(kernel_size=4, stride=4),
        )
    if kind == "large":
        return nn.Sequential(
            nn.Conv2d(in_channels, planes, 7, stride=2, padding=3, bias=False), instance_norm(planes),
            nn.ReLU(inplace=True), nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
        )
    layers = [nn.Conv2d(in_channels, planes, 3, padding=1, bias=False), instance_norm(planes), nn.ReLU(inplace=True)]
    if kind == "mid":
        layers.append(nn.AvgPool2d(2, 2) if average_pool else nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
    return nn.Sequential(*layers)


def resnet_ap10(in_channels: int, num_classes: int, image_size: int) -> _ResNet:
    """ResNetAP-10: ResNet-10 with average-pool downsampling and instance norm."""
    _check_common(in_channels, num_classes, image_size)
    kind = _stem_kind(image_size)
    stem_factor = {"small": 1, "mid": 2, "large": 4}[kind]
    last_side = image_size // stem_factor // 8
    if last_side < 2:
        raise IGDSInputError(
            f"resnet_ap10 needs image_size >= 16 (its last stage would be {last_side}x{last_side}, "
            f"where instance norm is constant), got {image_size}"
        )
    return _ResNet(_BasicBlockAP, (1, 1, 1, 1), _stem(kind, in_channels, True), 64, num_classes)


def resnet18_in(in_channels: int, num_classes: int, image_size: int) -> _ResNet:
    """ResNet-18 with instance norm instead of batch norm."""
    _check_common(in_channels, num_classes, image_size)
    kind = _stem_kind(image_size)
    if kind == "small" and math.ceil(image_size / 8) < 2:
        raise IGDSInputError(
            f"resnet18_in needs image_size >= 9 (its last stage would be 1x1, where instance norm "
            f"is constant), got {image_size}"
        )
    return _ResNet(_BasicBlock, (2, 2, 2, 2), _stem(kind, in_channels, False), 64, num_classes)


def build_eval_network(
    name: str, in_channels: int, num_classes: int, image_size: int, width: int = 128
) -> nn.Module:
    """Build an evaluation network by name: "convnet3".."convnet6", "resnet_ap10", "resnet18_in".

    ``width`` (ConvNets only) is the channel count of every block, 128 in the protocol; smaller
    widths are a speed option for tiny sets (e.g. 16x16 digits on a CPU). Unknown names and sizes
    the network cannot take raise IGDSInputError. ``torchvision:<model>`` builds torchvision's
    classifier (RGB only; its own stem handles any size it accepts; needs the torchvision extra).
    """
    if is_torchvision_name(name):
        if width != 128:
            raise IGDSInputError(f"width applies to ConvNets only, not {name!r}")
        if in_channels != 3:
            raise IGDSInputError(f"{name} takes RGB images; these have {in_channels} channel(s)")
        _check_common(in_channels, num_classes, image_size)
        return build_torchvision_network(name, num_classes)
    key = str(name).strip().lower().replace("-", "").replace("_", "")
    if key.startswith("convnet") and key[7:].isdigit():
        depth = int(key[7:])
        if not 3 <= depth <= 6:
            raise IGDSInputError(f"ConvNet depth must be 3..6, got {name!r}")
        return ConvNet(in_channels, num_classes, image_size, depth=depth, width=width)
    if width != 128:
        raise IGDSInputError(f"width applies to ConvNets only, not {name!r}")
    if key in ("resnetap10", "resnet10ap"):
        return resnet_ap10(in_channels, num_classes, image_size)
    if key in ("resnet18in", "resnet18"):
        return resnet18_in(in_channels, num_classes, image_size)
    raise IGDSInputError(f"unknown network {name!r}; choose from {', '.join(NETWORK_NAMES)} or torchvision:<name>")
