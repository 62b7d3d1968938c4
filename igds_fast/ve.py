"""The variational estimator (VE): frozen encoder f + linear classifier (W, b) + class centroids log Q.

    x [B, C, H, W] in [-1, 1]  --preprocess-->  [B, C, R, R]  --f-->  z [B, d]
    logits = z W^T + b          [B, num_classes]   (prototype term: log softmax(logits)_y)
    P_x    = softmax(z / tau)   over the d feature coordinates
    log Q  [num_classes, d]     log of the class centroids Q_y = E[P_x | y] over real images

(IGDS spec, section 2.) The bundle is one safetensors file: the encoder trunk under `encoder.`,
`classifier.weight`, `classifier.bias`, `log_centroids`, and a JSON header under the metadata key
`igds_ve` (architecture, tau, preprocessing, class names). No pickle is written or read.
"""
from __future__ import annotations

import json
import math
import numbers
import os
from typing import Callable, Iterable, Sequence

import torch
import torch.nn as nn
from safetensors.torch import save as save_bytes

from .artifacts import check_finite_weights, parse_json_header, read_safetensors
from .errors import IGDSInputError
from .imageio import write_bytes_atomic
from .limits import check_class_name, header_int
from .models.resnet import ARCHS, NORMS, ResNet, build_resnet, load_trunk_state
from .preprocess import EncoderPreprocess

FORMAT_NAME = "igds_ve"
FORMAT_VERSION = 1
METADATA_KEY = "igds_ve"
_ENCODER_PREFIX = "encoder."
_HEAD_KEYS = ("classifier.weight", "classifier.bias", "log_centroids")


def _check_tau(tau) -> float:
    if isinstance(tau, bool) or not isinstance(tau, numbers.Real) or not math.isfinite(tau) or tau <= 0:
        raise IGDSInputError(f"tau must be a positive finite number, got {tau!r}")
    return float(tau)


class VariationalEstimator(nn.Module):
    """The frozen VE bundle used by guidance: features(x), logits(z), weight, bias, log_centroids, tau.

    encoder: a ResNet (its own fc, if any, is not used and not saved: the VE's classifier is
        `weight` [C, d] / `bias` [C]).
    log_centroids: [C, d], log Q_y (see `compute_log_centroids`), finite.
    tau: the feature-softmax temperature the centroids were computed with (> 0).
    preprocess: maps the prior's [-1, 1] images to the encoder's input; its channel count must be
        the encoder's in_channels.
    class_names: C names, in label order.

    All tensors are frozen (requires_grad False) and the module stays in eval mode (`train()` is a
    no-op): BatchNorm must use its running statistics, never batch statistics of generated images.
    """

    def __init__(
        self,
        encoder: ResNet,
        weight: torch.Tensor,
        bias: torch.Tensor,
        log_centroids: torch.Tensor,
        tau: float,
        preprocess: EncoderPreprocess,
        class_names: Sequence[str],
    ):
        super().__init__()
        if not isinstance(encoder, ResNet):
            raise IGDSInputError(f"encoder must be an igds_fast ResNet, got {type(encoder).__name__}")
        if not isinstance(preprocess, EncoderPreprocess):
            raise IGDSInputError(f"preprocess must be an EncoderPreprocess, got {type(preprocess).__name__}")
        if preprocess.channels != encoder.in_channels:
            raise IGDSInputError(
                f"preprocess normalises {preprocess.channels} channels but the encoder reads {encoder.in_channels}"
            )
        dim = encoder.feature_dim
        for name, tensor in (("weight", weight), ("bias", bias), ("log_centroids", log_centroids)):
            if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
                raise IGDSInputError(f"{name} must be a floating-point tensor, got {getattr(tensor, 'dtype', type(tensor))}")
        if weight.dim() != 2 or weight.shape[1] != dim or weight.shape[0] < 1:
            raise IGDSInputError(f"classifier weight must be [C, {dim}] (encoder feature dim), got {tuple(weight.shape)}")
        classes = weight.shape[0]
        if tuple(bias.shape) != (classes,):
            raise IGDSInputError(f"classifier bias must have shape ({classes},), got {tuple(bias.shape)}")
        if tuple(log_centroids.shape) != (classes, dim):
            raise IGDSInputError(f"log_centroids must be [{classes}, {dim}], got {tuple(log_centroids.shape)}")
        if not bool(torch.isfinite(log_centroids).all()):
            raise IGDSInputError("log_centroids contain non-finite values (a class centroid has zero mass?)")
        if isinstance(class_names, str) or not all(isinstance(n, str) for n in class_names):
            raise IGDSInputError("class_names must be a sequence of strings")
        class_names = list(class_names)
        if len(class_names) != classes:
            raise IGDSInputError(f"class_names has {len(class_names)} entries but the classifier has {classes} classes")

        self.encoder = encoder
        self.preprocess = preprocess
        self.tau = _check_tau(tau)
        self.class_names = class_names
        # Buffers, not parameters: they follow .to(device/dtype) but never ask for gradients.
        self.register_buffer("weight", weight.detach().clone())
        self.register_buffer("bias", bias.detach().clone())
        self.register_buffer("log_centroids", log_centroids.detach().clone())
        self.requires_grad_(False)
        super().train(False)

    # ---- metadata -----------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return int(self.weight.shape[0])

    @property
    def feature_dim(self) -> int:
        return int(self.encoder.feature_dim)

    @property
    def arch(self) -> str:
        return self.encoder.arch

    @property
    def softplus_beta(self) -> float | None:
        return self.encoder.softplus_beta

    @property
    def norm(self) -> str:
        return self.encoder.norm

    @property
    def resolution(self) -> int:
        return self.preprocess.resolution

    def train(self, mode: bool = True) -> "VariationalEstimator":
        """Always eval: the VE is frozen (fine-tune the encoder on its own, then build a new VE)."""
        return super().train(False)

    # ---- forward ------------------------------------------------------------------------------
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, C, H, W] in [-1, 1] (the prior's images) -> z [B, d]; differentiable w.r.t. x."""
        return self.encoder.forward_features(self.preprocess(x))

    def logits(self, z: torch.Tensor) -> torch.Tensor:
        """z [B, d] -> classifier logits z W^T + b [B, C]."""
        if z.dim() != 2 or z.shape[1] != self.feature_dim:
            raise IGDSInputError(f"features must be [B, {self.feature_dim}], got {tuple(z.shape)}")
        return torch.nn.functional.linear(z, self.weight.to(z.dtype), self.bias.to(z.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, C, H, W] in [-1, 1] -> logits [B, C]."""
        return self.logits(self.features(x))

    # ---- serialisation ------------------------------------------------------------------------
    def header(self) -> dict:
        """The JSON header stored in the bundle's safetensors metadata."""
        return {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "arch": self.arch,
            "softplus_beta": self.softplus_beta,
            "norm": self.norm,
            "in_channels": self.encoder.in_channels,
            "tau": self.tau,
            "resolution": self.preprocess.resolution,
            "mean": list(self.preprocess.mean),
            "std": list(self.preprocess.std),
            "class_names": list(self.class_names),
            "feature_dim": self.feature_dim,
            "num_classes": self.num_classes,
        }

    def bundle_tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor of the bundle by its file key, on CPU, contiguous, sharing no storage."""
        tensors = {_ENCODER_PREFIX + k: v for k, v in self.encoder.trunk_state_dict().items()}
        tensors["classifier.weight"] = self.weight
        tensors["classifier.bias"] = self.bias
        tensors["log_centroids"] = self.log_centroids
        # clone(): safetensors refuses tensors that share storage, and views must not drag their base.
        return {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}

    def save(self, path: str | os.PathLike) -> None:
        """Write the bundle as one safetensors file, atomically, with the mode the umask gives every other
        artifact (imageio.write_bytes_atomic: temp file in the same folder, fsync, os.replace)."""
        path = os.fspath(path)
        directory = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(directory):
            raise IGDSInputError(f"cannot save VE bundle: directory does not exist: {directory}")
        metadata = {METADATA_KEY: json.dumps(self.header(), sort_keys=True)}
        write_bytes_atomic(path, save_bytes(self.bundle_tensors(), metadata=metadata))

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> "VariationalEstimator":
        """Read a bundle written by `save`; every defect gives a one-line IGDSInputError."""
        path = os.fspath(path)
        metadata, tensors = read_safetensors(path, "VE bundle", with_tensors=True)
        header = _parse_header(metadata, path)
        try:
            ve = cls._from_parts(header, tensors)
        except IGDSInputError as exc:
            message = str(exc)
            raise IGDSInputError(message if message.startswith(path) else f"{path}: {message}") from exc
        return ve.to(device)

    @classmethod
    def _from_parts(cls, header: dict, tensors: dict[str, torch.Tensor]) -> "VariationalEstimator":
        """Build the VE from a validated header and the file's tensors (CPU), checking every shape."""
        with torch.device("meta"):
            # Built on the meta device: no memory or init cost, the file's tensors are assigned in.
            encoder = build_resnet(
                header["arch"],
                num_classes=None,
                softplus_beta=header["softplus_beta"],
                norm=header["norm"],
                in_channels=header["in_channels"],
            )
        if encoder.feature_dim != header["feature_dim"]:
            raise IGDSInputError(
                f"header feature_dim {header['feature_dim']} does not match {header['arch']} ({encoder.feature_dim})"
            )
        unexpected = sorted(k for k in tensors if not k.startswith(_ENCODER_PREFIX) and k not in _HEAD_KEYS)
        missing = [k for k in _HEAD_KEYS if k not in tensors]
        if missing or unexpected:
            raise IGDSInputError(f"not a VE bundle layout; missing {missing}, unexpected {unexpected[:4]}")
        # Any floating dtype is read as float32, what the VE computes in (as the prior loaders do): a
        # float16 or float64 bundle would otherwise meet float32 images at the first sampling step.
        tensors = {k: v.to(torch.float32) if v.is_floating_point() else v for k, v in tensors.items()}
        classes, dim = header["num_classes"], header["feature_dim"]
        expected_shapes = {"classifier.weight": (classes, dim), "classifier.bias": (classes,), "log_centroids": (classes, dim)}
        for key, shape in expected_shapes.items():
            if tuple(tensors[key].shape) != shape:
                raise IGDSInputError(f"{key} has shape {tuple(tensors[key].shape)}, header says {shape}")
        check_finite_weights({k: tensors[k] for k in _HEAD_KEYS}, "VE bundle")
        encoder_state = {k[len(_ENCODER_PREFIX):]: v for k, v in tensors.items() if k.startswith(_ENCODER_PREFIX)}
        encoder = load_trunk_state(encoder, encoder_state, "encoder.*")
        preprocess = EncoderPreprocess(header["resolution"], header["mean"], header["std"])
        return cls(
            encoder,
            tensors["classifier.weight"],
            tensors["classifier.bias"],
            tensors["log_centroids"],
            header["tau"],
            preprocess,
            header["class_names"],
        )


def _parse_header(metadata: dict, path: str) -> dict:
    """The validated `igds_ve` header: field types and values checked, one-line errors."""
    header = parse_json_header(metadata, path, METADATA_KEY, FORMAT_NAME, FORMAT_VERSION, "VE bundle")
    required = ("arch", "softplus_beta", "norm", "in_channels", "tau", "resolution", "mean", "std",
                "class_names", "feature_dim", "num_classes")
    missing = [k for k in required if k not in header]
    if missing:
        raise IGDSInputError(f"{path}: VE header lacks fields {missing}")
    if header["arch"] not in ARCHS:
        raise IGDSInputError(f"{path}: unknown arch {header['arch']!r}; available: {ARCHS}")
    if header["norm"] not in NORMS:
        raise IGDSInputError(f"{path}: unknown norm {header['norm']!r}; available: {NORMS}")
    for key in ("in_channels", "resolution", "feature_dim", "num_classes"):
        value = header[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise IGDSInputError(f"{path}: header {key} must be a positive int, got {value!r}")
    # Bounded before anything is built: the resolution sizes every guided step's encoder input.
    for key, cap in (("resolution", "image side"), ("in_channels", "image channels"), ("num_classes", "classes")):
        header_int(header[key], key, cap, f"VE bundle {path}")
    header["tau"] = _check_tau(header["tau"])
    if not isinstance(header["class_names"], list) or len(header["class_names"]) != header["num_classes"]:
        count = len(header["class_names"]) if isinstance(header["class_names"], list) else "no list of"
        raise IGDSInputError(f"{path}: header has {count} class_names for {header['num_classes']} classes")
    for name in header["class_names"]:
        check_class_name(name, f"{path}: class")
    return header


# ---- class centroids ------------------------------------------------------------------------------


class LogCentroidAccumulator:
    """Streaming log Q_y = log mean_{i: y_i = y} softmax(z_i / tau), without holding all features.

    Per class and coordinate it keeps a running max m of log P and s = sum exp(log P - m)
    (a streaming logsumexp, in float64), so log Q = m + log s - log count never underflows:
    exp(log P) may be 0 in any float format for small tau while log Q stays finite.
    """

    def __init__(self, num_classes: int, tau: float):
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise IGDSInputError(f"num_classes must be a positive int, got {num_classes!r}")
        self.num_classes = num_classes
        self.tau = _check_tau(tau)
        self.running_max: torch.Tensor | None = None  # [C, d] float64
        self.scaled_sum: torch.Tensor | None = None  # [C, d] float64
        self.counts = torch.zeros(num_classes, dtype=torch.long)
        self.dtype: torch.dtype | None = None

    def update(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Add a batch: features [N, d] (floating), labels [N] (integer in [0, C))."""
        if not isinstance(features, torch.Tensor) or features.dim() != 2 or not features.is_floating_point():
            raise IGDSInputError(f"features must be a floating-point [N, d] tensor, got {getattr(features, 'shape', features)!r}")
        if not isinstance(labels, torch.Tensor) or tuple(labels.shape) != (features.shape[0],):
            raise IGDSInputError(f"labels must have shape ({features.shape[0]},), got {tuple(getattr(labels, 'shape', ()))}")
        if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
            raise IGDSInputError(f"labels must be an integer tensor, got {labels.dtype}")
        if self.running_max is not None and features.shape[1] != self.running_max.shape[1]:
            raise IGDSInputError(f"features have dim {features.shape[1]}, earlier batches had {self.running_max.shape[1]}")
        if features.shape[0] == 0:
            return
        labels = labels.to(features.device, torch.long)
        if bool((labels < 0).any()) or bool((labels >= self.num_classes).any()):
            raise IGDSInputError(f"labels must lie in [0, {self.num_classes}), got range [{int(labels.min())}, {int(labels.max())}]")
        if not bool(torch.isfinite(features).all()):
            raise IGDSInputError("features contain non-finite values")
        device, dim = features.device, features.shape[1]
        if self.running_max is None:
            self.running_max = torch.full((self.num_classes, dim), -math.inf, dtype=torch.float64, device=device)
            self.scaled_sum = torch.zeros((self.num_classes, dim), dtype=torch.float64, device=device)
            self.counts = self.counts.to(device)
            self.dtype = features.dtype

        log_p = torch.log_softmax(features.to(torch.float64) / self.tau, dim=1)  # [N, d]
        index = labels[:, None].expand_as(log_p)
        new_max = self.running_max.scatter_reduce(0, index, log_p, reduce="amax", include_self=True)
        # Rescale the old sums to the new max; classes still empty have max -inf (-inf - -inf = nan).
        seen = torch.isfinite(new_max)
        rescale = torch.where(seen, torch.exp(self.running_max - torch.where(seen, new_max, 0.0)), 0.0)
        self.scaled_sum = self.scaled_sum * rescale
        self.scaled_sum.index_add_(0, labels, torch.exp(log_p - new_max[labels]))
        self.running_max = new_max
        self.counts += torch.bincount(labels, minlength=self.num_classes)

    def compute(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """log Q [C, d] in `dtype` (default: the features' dtype); every class must have samples."""
        empty = [c for c in range(self.num_classes) if int(self.counts[c]) == 0]
        if empty:
            shown = ", ".join(str(c) for c in empty[:8]) + (" ..." if len(empty) > 8 else "")
            raise IGDSInputError(f"class {shown} has no samples: cannot compute its centroid ({len(empty)} empty)")
        log_counts = torch.log(self.counts.to(torch.float64))[:, None]
        log_q = self.running_max + torch.log(self.scaled_sum) - log_counts
        return log_q.to(dtype or self.dtype)


def compute_log_centroids(
    encoder_features: torch.Tensor, labels: torch.Tensor, num_classes: int, tau: float
) -> torch.Tensor:
    """log Q [C, d]: Q_y = mean over the class-y rows of softmax(z / tau) over the d coordinates.

    encoder_features: z [N, d]; labels: [N] integer in [0, C). Computed in float64 as a
    logsumexp of log-softmax minus log count (no underflow for small tau), returned in z's dtype.
    A class without samples raises IGDSInputError naming it.
    """
    accumulator = LogCentroidAccumulator(num_classes, tau)
    accumulator.update(encoder_features, labels)
    if accumulator.running_max is None:
        raise IGDSInputError("no features given: cannot compute class centroids")
    return accumulator.compute()


@torch.no_grad()
def accumulate_log_centroids(
    feature_fn: Callable[[torch.Tensor], torch.Tensor],
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    num_classes: int,
    tau: float,
) -> torch.Tensor:
    """log Q [C, d] over an iterable of (images [B, ...], labels [B]) batches, streaming.

    feature_fn maps a batch of images to z [B, d], e.g. `ve.features` (images in [-1, 1]) or
    `lambda x: encoder.forward_features(preprocess(x))`. Gradients are off; only [C, d] running
    statistics are kept, never all features.
    """
    accumulator = LogCentroidAccumulator(num_classes, tau)
    for images, labels in batches:
        accumulator.update(feature_fn(images), torch.as_tensor(labels))
    if accumulator.running_max is None:
        raise IGDSInputError("no batches given: cannot compute class centroids")
    return accumulator.compute()


def load_ve(path: str | os.PathLike, device: str | torch.device = "cpu") -> VariationalEstimator:
    """The VE bundle at `path` (written by `igds-fast train-ve` / `VariationalEstimator.save`), in eval mode."""
    return VariationalEstimator.load(path, device).eval()


__all__ = [
    "FORMAT_VERSION",
    "LogCentroidAccumulator",
    "VariationalEstimator",
    "load_ve",
    "accumulate_log_centroids",
    "compute_log_centroids",
]
