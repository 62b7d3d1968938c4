"""The feature map phi of the S³ selection: images -> L2-normalised features, from the VE or a ResNet checkpoint.

Either the VE's own encoder with its own preprocessing (`VariationalEstimator.features`, as the
guidance applies it), or the trunk of a torchvision-layout ResNet-18/50 checkpoint (ReLU, a 224 px
bilinear resize, ImageNet mean / std; grayscale images repeated to 3 channels).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..artifacts import file_fingerprint
from ..errors import IGDSInputError
from ..preprocess import IMAGENET_MEAN, IMAGENET_STD, EncoderPreprocess
from .resnet import load_moco_encoder

CHECKPOINT_ENCODER_RESOLUTION = 224


class FeatureEncoder:
    """phi: images [B, c, H, W] in [-1, 1] -> L2-normalised float32 features [B, d] (no gradients)."""

    def __init__(self, description: dict, encoder, preprocess, in_channels: int):
        self.description = description
        self.encoder = encoder
        self.preprocess = preprocess
        self.in_channels = in_channels
        self.device = torch.device("cpu")

    def to(self, device) -> "FeatureEncoder":
        self.device = torch.device(device)
        self.encoder = self.encoder.to(self.device)
        if self.preprocess is not None:
            self.preprocess = self.preprocess.to(self.device)
        return self

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device, torch.float32)
        if images.shape[1] != self.in_channels:
            if images.shape[1] == 1:  # a grayscale prior read by an RGB encoder
                images = images.expand(-1, self.in_channels, -1, -1)
            else:
                raise IGDSInputError(f"the selection encoder reads {self.in_channels} channels, the images have "
                                     f"{images.shape[1]}")
        if self.preprocess is None:  # the VE: its own preprocessing, as guidance applies it
            features = self.encoder.features(images)
        else:
            features = self.encoder.forward_features(self.preprocess(images))
        return F.normalize(features.to(torch.float32), dim=1)


def load_feature_encoder(checkpoint: str | None, ve) -> FeatureEncoder:
    """The VE's encoder (checkpoint None) or a torchvision-layout ResNet-18/50 checkpoint's trunk."""
    if checkpoint is None:
        return FeatureEncoder({"kind": "ve"}, ve, None, ve.encoder.in_channels)
    errors = []
    for arch in ("resnet18", "resnet50"):
        try:
            encoder = load_moco_encoder(checkpoint, arch=arch, softplus_beta=None)  # torchvision: ReLU
        except IGDSInputError as exc:
            errors.append(str(exc))
            continue
        preprocess = EncoderPreprocess(CHECKPOINT_ENCODER_RESOLUTION, IMAGENET_MEAN, IMAGENET_STD)
        description = {"kind": "checkpoint", "arch": arch, "resolution": CHECKPOINT_ENCODER_RESOLUTION,
                       "fingerprint": file_fingerprint(checkpoint)}
        return FeatureEncoder(description, encoder, preprocess, 3)
    if errors and "cannot read checkpoint" in errors[0]:
        raise IGDSInputError(errors[0])
    raise IGDSInputError(f"--select-encoder {checkpoint} is not a torchvision-layout ResNet-18 or ResNet-50 "
                         "checkpoint (its keys fit neither trunk)")


__all__ = ["CHECKPOINT_ENCODER_RESOLUTION", "FeatureEncoder", "load_feature_encoder"]
