"""A whole VE training run: input checks, the four stages in order, the bundle and the report.

`train_ve` (tensors in memory) and `train_ve_from_source` (a FolderImages or TensorImages): the
contrastive stage (`moco`), then the classifier stage (`classifier_stage`: BatchNorm statistics,
features, the linear probe, the centroids and the training split's estimates, in memory that does
not grow with the set), then the `VariationalEstimator` and the report of its information estimates.
"""
from __future__ import annotations

import os
import time
from typing import Callable, Sequence

import torch

from ..artifacts import file_fingerprint
from ..data import FolderImages, TensorImages, check_labelled_images
from ..devices import resolve_device
from ..errors import IGDSInputError
from ..models.resnet import ResNet, build_resnet, load_moco_encoder
from ..preprocess import IMAGENET_MEAN, IMAGENET_STD, EncoderPreprocess
from ..threads import cpu_threads, torch_threads
from ..ve import VariationalEstimator
from .classifier_stage import run_classifier_stage, split_statistics
from .config import VETrainConfig, parse_init
from .features import image_statistics
from .losses import label_entropy
from .moco import MoCoTrainer


def _build_encoder(config: VETrainConfig) -> ResNet:
    scheme, path = parse_init(config.init)
    if scheme == "moco":
        encoder = load_moco_encoder(path, arch=config.arch, softplus_beta=config.softplus_beta, norm=config.norm)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            encoder = build_resnet(config.arch, num_classes=None, softplus_beta=config.softplus_beta,
                                   norm=config.norm, in_channels=config.in_channels)
    return encoder


def _train_stages(train, val, class_names, config, encoder, preprocess, mean, std, device, log,
                  checkpoint=None, progress=False) -> tuple[VariationalEstimator, dict]:
    """Contrastive stage, BN statistics, features, classifier, centroids, report (see `train_ve`).

    train / val: FolderImages or TensorImages sources (val may be None)."""
    num_classes = len(class_names)
    history: list[dict] = []
    effective = {"batch_size": None, "queue_size": None}
    contrastive_seconds = 0.0
    train_labels = train.labels.to(torch.long)
    key = None
    if checkpoint is not None:
        run_config = config.to_dict()
        for volatile in ("device", "num_threads"):  # where it runs, not what it computes
            run_config.pop(volatile)
        key = {"config": run_config, "device_type": device.type, "data": train.fingerprint(),
               "classes": list(class_names), "mean": list(mean), "std": list(std)}
    if config.epochs > 0:
        stage = time.perf_counter()
        trainer = MoCoTrainer(encoder, preprocess, config, num_classes, len(train), device, log)
        effective = {"batch_size": trainer.batch_size, "queue_size": trainer.queue_size}
        history = trainer.train(train, log, checkpoint=checkpoint, key=key, progress=progress)
        encoder = trainer.encoder_q
        del trainer
        contrastive_seconds = time.perf_counter() - stage
    encoder = encoder.to(device).eval().requires_grad_(False)

    stage = time.perf_counter()
    stage_key = None
    if key is not None:
        scheme, path = parse_init(config.init)
        # The features come from the init file's weights when there is no contrastive stage.
        stage_key = {**key, "init_file": file_fingerprint(path) if scheme == "moco" else None}
    weight, bias, log_q, train_statistics = run_classifier_stage(
        encoder, preprocess, train, config, num_classes, device, log, checkpoint, stage_key, progress)
    classifier_seconds = time.perf_counter() - stage

    ve = VariationalEstimator(encoder.cpu(), weight.cpu(), bias.cpu(), log_q.cpu(), config.tau,
                              EncoderPreprocess(config.resolution, mean, std), class_names)
    entropy = label_entropy(train_labels, num_classes)
    report = {
        "config": config.to_dict(),
        "class_names": class_names,
        "mean": list(mean),
        "std": list(std),
        "device": str(device),
        "effective": effective,
        "history": history,
        "units": "nats",
        "label_entropy": entropy,
        "train": train_statistics.result(entropy),
        "seconds": {"contrastive": round(contrastive_seconds, 3), "classifier_and_centroids": round(classifier_seconds, 3)},
    }
    if val is not None:
        statistics = split_statistics(ve.encoder.to(device), preprocess, val, device, weight, bias, log_q, config.tau)
        ve.encoder.cpu()
        report["val"] = statistics.result(entropy)
    return ve, report


def train_ve(
    train_images: torch.Tensor,
    train_labels: torch.Tensor,
    class_names: Sequence[str],
    config: VETrainConfig | None = None,
    val_images: torch.Tensor | None = None,
    val_labels: torch.Tensor | None = None,
    log: Callable[[str], None] = print,
    checkpoint: str | os.PathLike | None = None,
    progress: bool = False,
) -> tuple[VariationalEstimator, dict]:
    """Train a VE (contrastive + CMI encoder, linear classifier, centroids) and report its estimates.

    train_images [N, C, H, W] float in [-1, 1], train_labels [N] int in [0, len(class_names));
    every class needs a training image. val_images / val_labels: optional held-out data of the same
    classes, only evaluated. Returns (VariationalEstimator on CPU, report) where report holds the
    config, the effective mean/std / batch / queue sizes, the per-epoch history, H(Y) (nats) and for
    "train" (and "val") accuracy (%), cross-entropy, prototype_information = H(Y) - CE and
    contextual_information = E KL(P_x || Q_y) (nats), and the wall time per stage.
    checkpoint: a file the contrastive stage saves itself to after every epoch and resumes from
    (see the module docstring); progress: a per-epoch progress bar on stderr.
    All input defects raise a one-line IGDSInputError before any training.
    For an ImageFolder streamed from disk use :func:`train_ve_from_source`.
    """
    if (val_images is None) != (val_labels is None):
        raise IGDSInputError("give both val_images and val_labels, or neither")
    train = TensorImages(train_images, train_labels)
    val = None if val_images is None else TensorImages(val_images, val_labels)
    return train_ve_from_source(train, class_names, config, val, log=log, checkpoint=checkpoint, progress=progress)


def _check_source(source, class_names, in_channels: int, what: str, require_every_class: bool) -> list[str]:
    """A FolderImages / TensorImages through the one labelled-data check; returns the class names as a list."""
    if not isinstance(source, (FolderImages, TensorImages)):
        raise IGDSInputError(f"{what} data must be a FolderImages or TensorImages, got {type(source).__name__}")
    images, labels = (source, None) if isinstance(source, FolderImages) else (source.images, source.labels)
    _, class_names = check_labelled_images(
        images, labels, class_names, what=what, channels=in_channels, channels_expected_by="the config (in_channels)",
        require_every_class=require_every_class, accept_folder=True,
    )
    return class_names


def train_ve_from_source(
    train,
    class_names: Sequence[str],
    config: VETrainConfig | None = None,
    val=None,
    log: Callable[[str], None] = print,
    checkpoint: str | os.PathLike | None = None,
    progress: bool = False,
) -> tuple[VariationalEstimator, dict]:
    """`train_ve` on data sources: `igds_fast.data.FolderImages` (an ImageFolder, held or streamed;
    its class order must be `class_names`) or `TensorImages`. Same results, report and checkpoints."""
    started = time.perf_counter()
    config = config if config is not None else VETrainConfig()
    if not isinstance(config, VETrainConfig):
        raise IGDSInputError(f"config must be a VETrainConfig, got {type(config).__name__}")
    # Training needs every class (each one's centroid Q_y and classifier row come from its images);
    # held-out data is only evaluated.
    class_names = _check_source(train, class_names, config.in_channels, "training", require_every_class=True)
    if val is not None:
        _check_source(val, class_names, config.in_channels, "validation", require_every_class=False)
    if len(train) < 2:
        raise IGDSInputError(f"need at least 2 training images, got {len(train)}")
    device = resolve_device(config.device)
    scheme, _ = parse_init(config.init)
    if config.mean is not None:
        mean, std = config.mean, config.std
    elif scheme == "moco":
        mean, std = IMAGENET_MEAN, IMAGENET_STD  # what MoCo's ImageNet training normalised with
    elif isinstance(train, FolderImages):
        mean, std = train.image_statistics()  # exact, from the integer pixel sums of its scan
    else:
        mean, std = image_statistics(train.images)
    preprocess = EncoderPreprocess(config.resolution, mean, std).to(device)
    encoder = _build_encoder(config)  # a bad MoCo checkpoint fails here, before training
    checkpoint = None if checkpoint is None else os.fspath(checkpoint)
    if checkpoint is not None and not os.path.isdir(os.path.dirname(os.path.abspath(checkpoint))):
        raise IGDSInputError(f"checkpoint folder {os.path.dirname(os.path.abspath(checkpoint))!r} does not exist")

    batch_size = min(config.batch_size, len(train))
    with torch_threads(cpu_threads(device, config.num_threads, batch_size * config.resolution ** 2 * 64)) as threads:
        ve, report = _train_stages(train, val, class_names, config, encoder, preprocess, mean, std, device, log,
                                   checkpoint=checkpoint, progress=progress)
    report["threads"] = threads if device.type == "cpu" else None
    report["seconds"]["total"] = round(time.perf_counter() - started, 3)
    entropy = report["label_entropy"]
    for split in ("train", "val"):
        if split in report:
            r = report[split]
            log(f"train-ve: {split}: accuracy {r['accuracy']:.2f}%  I(X;Y) ~ H(Y) - CE = {entropy:.4f} - "
                f"{r['cross_entropy']:.4f} = {r['prototype_information']:.4f} nats  "
                f"H(X|Y) ~ E KL(P||Q_y) = {r['contextual_information']:.4f} nats")
    log(f"train-ve: done in {report['seconds']['total']:.1f}s")
    return ve, report
