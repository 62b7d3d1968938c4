"""ResNet-18 / ResNet-50 encoders whose state dicts match torchvision's key for key.

The variational estimator's encoder f is a (MoCo) ResNet trunk. torchvision cannot be imported
beside this torch build, so the architecture is written out here; parameter names, shapes and
layout follow torchvision's `resnet18` / `resnet50` exactly (ResNet v1.5: in a Bottleneck the
stride sits on the 3x3 conv), so torchvision and MoCo checkpoints load without renaming.

Differences from torchvision, all opt-in or harmless for checkpoint compatibility:

* `softplus_beta` (default 3.0): every ReLU becomes `nn.Softplus(beta)`. Softplus has no
  parameters, so the state dict is unchanged; its input gradients are smooth, which is what the
  guidance gradient dJ/dx needs (Ma et al., ICLR 2024, use beta = 3 for ResNets). None = ReLU.
* `norm="instance"`: per-channel instance normalisation with an affine transform, written as
  `GroupNorm(C, C)` (one channel per group), the usual "ResNet-18 with instance norm" of dataset
  distillation evaluations. Its state dict has bn*.weight / bn*.bias but no running statistics.
* `num_classes=None`: a trunk without classifier (`fc` is `Identity`), what the VE stores.
* `in_channels`: 1 for grayscale data; only conv1's weight shape changes.
"""
from __future__ import annotations

import os
from typing import Callable, Mapping

import torch
import torch.nn as nn

from ..artifacts import check_finite_weights, check_torch_archive
from ..errors import IGDSInputError

ARCHS = ("resnet18", "resnet50")
FEATURE_DIMS = {"resnet18": 512, "resnet50": 2048}  # the pooled trunk features (512 x block expansion)
NORMS = ("batch", "instance")


def _make_activation(softplus_beta: float | None) -> nn.Module:
    # Not inplace: Softplus has no inplace variant, and an inplace ReLU would break double backward
    # and the x_t-mode guidance chain; the extra memory is one activation per block.
    if softplus_beta is None:
        return nn.ReLU()
    return nn.Softplus(beta=float(softplus_beta))


def _make_norm(norm: str) -> Callable[[int], nn.Module]:
    if norm == "batch":
        return nn.BatchNorm2d
    if norm == "instance":
        # GroupNorm with one channel per group == InstanceNorm2d(affine=True), but it keeps the
        # weight/bias names of BatchNorm and never tracks running statistics (same in train/eval).
        return lambda channels: nn.GroupNorm(channels, channels)
    raise IGDSInputError(f"unknown norm {norm!r}; available: {NORMS}")


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def _conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class GlobalAveragePool(nn.Module):
    """[B, C, H, W] -> [B, C, 1, 1] mean over H, W: nn.AdaptiveAvgPool2d((1, 1)) computed as a mean.

    Same values (bit for bit on CPU), but its backward is a plain broadcast: CUDA's adaptive-pool
    backward is flagged non-deterministic, and the guidance gradient runs through this backward at
    every sampling step.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3), keepdim=True)


class BasicBlock(nn.Module):
    """Two 3x3 convs + identity/projection shortcut (ResNet-18/34). [B, in, H, W] -> [B, planes, H/s, W/s]."""

    expansion = 1

    def __init__(self, inplanes, planes, stride, downsample, make_norm, softplus_beta):
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = make_norm(planes)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = make_norm(planes)
        self.act = _make_activation(softplus_beta)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.act(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act(out + identity)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (strided, v1.5) -> 1x1 x4 convs + shortcut (ResNet-50). [B, in, H, W] -> [B, 4*planes, H/s, W/s]."""

    expansion = 4

    def __init__(self, inplanes, planes, stride, downsample, make_norm, softplus_beta):
        super().__init__()
        self.conv1 = _conv1x1(inplanes, planes)
        self.bn1 = make_norm(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = make_norm(planes)
        self.conv3 = _conv1x1(planes, planes * self.expansion)
        self.bn3 = make_norm(planes * self.expansion)
        self.act = _make_activation(softplus_beta)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.act(self.bn1(self.conv1(x)))
        out = self.act(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.act(out + identity)


_LAYOUTS = {
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
}


class ResNet(nn.Module):
    """torchvision-compatible ResNet.

    forward_features(x [B, in_channels, H, W]) -> z [B, feature_dim] (global-average-pooled trunk;
    feature_dim = 512 for ResNet-18, 2048 for ResNet-50). forward(x) = fc(z) -> [B, num_classes]
    (or z itself when num_classes is None). Any H, W >= 1 works: the stem downsamples by 4 and each
    of layer2..4 by 2, ceil-rounded, and the pooling is adaptive.
    """

    def __init__(
        self,
        arch: str,
        num_classes: int | None = 1000,
        softplus_beta: float | None = 3.0,
        norm: str = "batch",
        in_channels: int = 3,
    ):
        super().__init__()
        if arch not in _LAYOUTS:
            raise IGDSInputError(f"unknown ResNet arch {arch!r}; available: {ARCHS}")
        if softplus_beta is not None and not (isinstance(softplus_beta, (int, float)) and softplus_beta > 0
                                              and softplus_beta != float("inf")):
            raise IGDSInputError(f"softplus_beta must be a positive finite number or None, got {softplus_beta!r}")
        if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 1):
            raise IGDSInputError(f"num_classes must be a positive int or None, got {num_classes!r}")
        if not isinstance(in_channels, int) or in_channels < 1:
            raise IGDSInputError(f"in_channels must be a positive int, got {in_channels!r}")
        make_norm = _make_norm(norm)
        block, layers = _LAYOUTS[arch]

        self.arch = arch
        self.softplus_beta = None if softplus_beta is None else float(softplus_beta)
        self.norm = norm
        self.in_channels = in_channels
        self.num_classes = num_classes

        self._inplanes = 64
        self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = make_norm(64)
        self.act = _make_activation(softplus_beta)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0], 1, make_norm)
        self.layer2 = self._make_layer(block, 128, layers[1], 2, make_norm)
        self.layer3 = self._make_layer(block, 256, layers[2], 2, make_norm)
        self.layer4 = self._make_layer(block, 512, layers[3], 2, make_norm)
        self.avgpool = GlobalAveragePool()
        self.feature_dim = 512 * block.expansion
        self.fc = nn.Identity() if num_classes is None else nn.Linear(self.feature_dim, num_classes)

        # torchvision's initialisation (zero_init_residual=False), so a fresh model behaves alike.
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(module.weight, 1)
                nn.init.constant_(module.bias, 0)

    def _make_layer(self, block, planes, blocks, stride, make_norm) -> nn.Sequential:
        downsample = None
        if stride != 1 or self._inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                _conv1x1(self._inplanes, planes * block.expansion, stride),
                make_norm(planes * block.expansion),
            )
        layers = [block(self._inplanes, planes, stride, downsample, make_norm, self.softplus_beta)]
        self._inplanes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(block(self._inplanes, planes, 1, None, make_norm, self.softplus_beta))
        return nn.Sequential(*layers)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, in_channels, H, W] (already normalised) -> pooled trunk features z [B, feature_dim]."""
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise IGDSInputError(
                f"{self.arch} expects [B, {self.in_channels}, H, W] input, got {tuple(x.shape)}"
            )
        x = self.maxpool(self.act(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, in_channels, H, W] -> logits [B, num_classes] (features [B, d] without a classifier)."""
        return self.fc(self.forward_features(x))

    def trunk_state_dict(self) -> dict[str, torch.Tensor]:
        """The state dict without the classifier (`fc.*`): what an encoder checkpoint must provide."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("fc.")}


def build_resnet(
    arch: str,
    num_classes: int | None = 1000,
    softplus_beta: float | None = 3.0,
    norm: str = "batch",
    in_channels: int = 3,
) -> ResNet:
    """A ResNet by name ("resnet18" or "resnet50"); see `ResNet`."""
    return ResNet(arch, num_classes=num_classes, softplus_beta=softplus_beta, norm=norm, in_channels=in_channels)


def resnet18(num_classes: int | None = 1000, softplus_beta: float | None = 3.0, norm: str = "batch",
             in_channels: int = 3) -> ResNet:
    """ResNet-18 (BasicBlock x [2, 2, 2, 2]); 11,689,512 parameters with 1000 classes."""
    return ResNet("resnet18", num_classes, softplus_beta, norm, in_channels)


def resnet50(num_classes: int | None = 1000, softplus_beta: float | None = 3.0, norm: str = "batch",
             in_channels: int = 3) -> ResNet:
    """ResNet-50 v1.5 (Bottleneck x [3, 4, 6, 3]); 25,557,032 parameters with 1000 classes."""
    return ResNet("resnet50", num_classes, softplus_beta, norm, in_channels)


# ---- checkpoints ------------------------------------------------------------------------------

# Tried in order; the first prefix that any key carries selects the encoder's keys. MoCo's
# DistributedDataParallel checkpoints also hold the key encoder (`module.encoder_k.*`) and the
# queue, which this selection leaves out.
_CHECKPOINT_PREFIXES = ("module.encoder_q.", "encoder_q.", "module.")


def _describe_keys(keys, limit: int = 4) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def _encoder_state_from_checkpoint(checkpoint, path: str) -> dict[str, torch.Tensor]:
    """The trunk's tensors from a MoCo / torchvision checkpoint object, prefixes stripped, fc dropped."""
    state = checkpoint
    if isinstance(state, Mapping) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not state:
        raise IGDSInputError(f"{path}: expected a state dict (or a dict with key 'state_dict'), got {type(state).__name__}")
    for prefix in _CHECKPOINT_PREFIXES:
        if any(isinstance(k, str) and k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items() if isinstance(k, str) and k.startswith(prefix)}
            break
    # MoCo v1 has a linear head fc, MoCo v2 an MLP fc.0 / fc.2: neither belongs to the trunk.
    state = {k: v for k, v in state.items() if not (k == "fc" or str(k).startswith("fc."))}
    not_tensors = [str(k) for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise IGDSInputError(f"{path}: checkpoint entries are not tensors: {_describe_keys(not_tensors)}")
    return state


def check_trunk_state(model: ResNet, state: Mapping[str, torch.Tensor], source: str) -> None:
    """One-line IGDSInputError unless `state` has exactly `model`'s trunk keys with its shapes."""
    expected = model.trunk_state_dict()
    missing = set(expected) - set(state)
    unexpected = set(state) - set(expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys: {_describe_keys(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_describe_keys(unexpected)}")
        raise IGDSInputError(f"{source} does not fit a {model.arch} trunk; " + "; ".join(parts))
    mismatched = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items() if state[k].shape != v.shape
    ]
    if mismatched:
        raise IGDSInputError(
            f"{source} does not fit a {model.arch} trunk; shape mismatch (file vs model): {_describe_keys(mismatched, 3)}"
        )


def load_trunk_state(model: ResNet, state: Mapping[str, torch.Tensor], source: str) -> ResNet:
    """Validate then load a trunk state dict into `model` (built on any device, meta included).

    `fc` is left as it is (a meta-device model should be trunk-only, num_classes=None).
    """
    check_trunk_state(model, state, source)
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            continue
        if not value.is_floating_point():
            raise IGDSInputError(f"{source}: {key} must be a floating-point tensor, got {value.dtype}")
    check_finite_weights(state, source)
    # assign=True: take the checkpoint's tensors as they are, so a model built on the meta device
    # (no memory, no initialisation cost) becomes a real one. A model with a classifier keeps its fc.
    model.load_state_dict(dict(state), strict=model.num_classes is None, assign=True)
    return model


def load_moco_encoder(
    path: str | os.PathLike,
    arch: str = "resnet50",
    softplus_beta: float | None = 3.0,
    norm: str = "batch",
) -> ResNet:
    """The query encoder of a MoCo v1/v2 checkpoint as a trunk-only ResNet (num_classes=None), eval mode.

    Accepts MoCo's `{"state_dict": {"module.encoder_q.<key>": ...}}`, the same with `encoder_q.` or
    `module.` prefixes, or a plain torchvision-style state dict. `fc.*` (MoCo's projection head) is
    dropped; every trunk key must be present with torchvision's shape (strict), else a one-line
    IGDSInputError names the missing / unexpected / mismatched keys. Loaded with weights_only=True:
    no pickled code runs.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise IGDSInputError(f"MoCo checkpoint not found: {path}")
    with torch.device("meta"):
        model = build_resnet(arch, num_classes=None, softplus_beta=softplus_beta, norm=norm)
    check_torch_archive(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types (pickle, zip, weights_only refusals)
        # torch's own messages run to many lines (weights_only advice): keep the first sentence.
        reason = " ".join(str(exc).split())[:200]
        raise IGDSInputError(f"cannot read checkpoint {path} (weights_only=True): {type(exc).__name__}: {reason}") from exc
    state = _encoder_state_from_checkpoint(checkpoint, path)
    return load_trunk_state(model, state, path).eval()


__all__ = [
    "ARCHS",
    "NORMS",
    "BasicBlock",
    "Bottleneck",
    "ResNet",
    "build_resnet",
    "check_trunk_state",
    "load_moco_encoder",
    "load_trunk_state",
    "resnet18",
    "resnet50",
]
