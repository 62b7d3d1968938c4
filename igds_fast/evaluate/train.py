"""Train a network on a distilled set and test it on real validation data (IGDS_SPEC section 7).

The recipe is an :class:`igds_fast.evaluate.protocol.EvalProtocol`: ``protocol="igds"`` (the
default, described below) or ``"minimax"`` (MinimaxDiffusion's ``train.py``: SGD momentum 0.9 with
weight decay, the step schedule, batch 64, its epochs table, colour jitter + PCA lighting, ImageNet
mean / std normalisation, and the best test accuracy over checkpoints reported besides the last;
see that module). Explicit keyword arguments (``lr``, ``schedule``, ``weight_decay``,
``batch_size``, ``epochs``, ``augment``) override the protocol's value; the result records the
protocol, which arguments overrode it, and the effective settings.

The ``igds`` protocol (the paper's Appendix F, following IDC / MinimaxDiffusion):

* Adam, lr 0.01, no weight decay. The paper says "Adam with a fixed learning rate of 0.01", so
  the default schedule is **constant**. MinimaxDiffusion's own ``train.py`` (SGD) decays the rate
  by 0.2 at 2/3 and 5/6 of training; that is ``schedule="step"`` (exactly its
  ``MultiStepLR(milestones=[2 * epochs // 3, 5 * epochs // 6], gamma=0.2)`` stepped once per
  epoch: epoch i (0-based) trains at ``lr * 0.2 ** ((i >= 2E // 3) + (i >= 5E // 6))``), and
  ``"cosine"`` (to 0, per step) is offered too.
* Epochs by IPC: 1 -> 2000, 10 -> 2000, 20 -> 1500, 50 -> 1500, 100 -> 1000 (in between: up to
  10 -> 2000, up to 50 -> 1500, more -> 1000), unless given. An epoch is one pass over the
  distilled set.
* Augmentation: random-resized-crop (scale 0.5-1), horizontal flip, CutMix (beta 1, every batch);
  see :mod:`igds_fast.evaluate.augment`.
* Inputs are the images as stored, in [-1, 1]; no dataset mean/std normalisation (instance norm
  after the first convolution removes most of what it would change, and the distilled and real
  sets share the same mapping either way).
* Reported: test accuracy (percent) of the network after the *last* epoch, per seed, and their
  mean and population std (``numpy.std``, as MinimaxDiffusion reports). The last epoch, not the
  best one over epochs: picking the best epoch on the test set would select on test data. A
  protocol with ``best_checkpoints`` (``minimax``) also measures every ``max(1, epochs //
  best_checkpoints)`` epochs and reports the best of those and the last as ``best_accuracies`` /
  ``best_mean`` / ``best_std``, labelled as such (MinimaxDiffusion's tables report that figure).

Speed: the whole distilled set and the test set live on the device; batches are index slices, so
there is no DataLoader and no per-sample Python. Sets up to ``FULL_BATCH_LIMIT`` images train full
batch (one step per epoch); larger ones use MinimaxDiffusion's batch size 64. The loop never
synchronises with the host during training (except the periodic test measurements of
``best_checkpoints``). A test set too large to hold (an
``igds_fast.data.FolderImages`` that streams) is read batch by batch by DataLoader workers for every
accuracy measurement instead; a held FolderImages goes to the device as one tensor.

Determinism: seed s fixes the network initialisation (CPU generator, so the same on every device),
the batch order and every augmentation draw (a generator on the device). On CPU a seed reproduces
bit for bit; on CUDA up to cuDNN's algorithm choice.
"""
from __future__ import annotations

import math
import time
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from igds_fast.data import FolderImages, uint8_to_unit_range
from igds_fast.devices import resolve_device
from igds_fast.errors import IGDSInputError
from igds_fast.evaluate.augment import AugmentConfig, augment_batch
from igds_fast.evaluate.networks import build_eval_network
from igds_fast.evaluate.protocol import OPTIMIZERS, SCHEDULES, EvalProtocol, NormalizedInput, protocol_for
from igds_fast.threads import cpu_threads, torch_threads

# IPC thresholds -> epochs (paper Table 8): <= 10 -> 2000, <= 50 -> 1500, else 1000.
EPOCHS_BY_IPC = ((10, 2000), (50, 1500), (math.inf, 1000))
FULL_BATCH_LIMIT = 256
MINIBATCH_SIZE = 64
TEST_BATCH_SIZE = 500


def epochs_for_ipc(ipc: int) -> int:
    """Training epochs of the protocol for an IPC (1->2000, 10->2000, 20->1500, 50->1500, 100->1000)."""
    if ipc < 1:
        raise IGDSInputError(f"IPC must be >= 1, got {ipc}")
    for bound, epochs in EPOCHS_BY_IPC:
        if ipc <= bound:
            return epochs
    raise AssertionError("unreachable: the last bound is infinite")


def _lr_factor(schedule: str, step: int, total_steps: int, epoch: int, epochs: int) -> float:
    """The learning-rate multiplier of optimizer step ``step`` (0-based) taken in epoch ``epoch``.

    step: MinimaxDiffusion's MultiStepLR (milestones 2E//3 and 5E//6, gamma 0.2, stepped per
    epoch); cosine: per step from 1 to 0."""
    if schedule == "constant":
        return 1.0
    if schedule == "step":
        return 0.2 ** ((epoch >= 2 * epochs // 3) + (epoch >= 5 * epochs // 6))
    return 0.5 * (1.0 + math.cos(math.pi * step / total_steps))


def _check_inputs(train_x, train_y, test_x, test_y, num_classes):
    for name, images in (("train_x", train_x), ("test_x", test_x)):
        if name == "test_x" and isinstance(images, FolderImages):
            if len(images) == 0:
                raise IGDSInputError("test_x is empty")
            continue
        if not isinstance(images, torch.Tensor) or images.dim() != 4:
            raise IGDSInputError(f"{name} must be a [N,C,H,W] tensor")
        if images.shape[0] == 0:
            raise IGDSInputError(f"{name} is empty")
    for name, labels, images in (("train_y", train_y, train_x), ("test_y", test_y, test_x)):
        if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.shape[0] != images.shape[0]:
            raise IGDSInputError(f"{name} must be a [N] tensor matching its images")
        if labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise IGDSInputError(f"{name} must hold integer class labels")
    if tuple(train_x.shape[1:]) != tuple(test_x.shape[1:]):
        raise IGDSInputError(
            f"train images {tuple(train_x.shape[1:])} and test images {tuple(test_x.shape[1:])} differ in shape"
        )
    if train_x.shape[-1] != train_x.shape[-2]:
        raise IGDSInputError(f"images must be square, got {tuple(train_x.shape[-2:])}")
    if num_classes is None:
        num_classes = int(max(train_y.max(), test_y.max())) + 1
    for name, labels in (("train_y", train_y), ("test_y", test_y)):
        if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
            raise IGDSInputError(f"{name} has labels outside 0..{num_classes - 1}")
    missing = sorted(set(range(num_classes)) - set(train_y.unique().tolist()))
    if missing:
        raise IGDSInputError(f"the distilled set has no images of class(es) {missing[:10]}")
    return num_classes


def infer_ipc(train_y: torch.Tensor, num_classes: int) -> int:
    """Images per class of a distilled set: the largest class count (they are equal in practice)."""
    return int(torch.bincount(train_y.long(), minlength=num_classes).max())


def _adam(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.Adam:
    """Adam, fused (one kernel for all parameters: ~2x faster steps for small nets on CPU) when the
    build supports it on this device, else the default implementation."""
    try:
        return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)


def _optimizer(model: nn.Module, name: str, lr: float, weight_decay: float, momentum: float) -> torch.optim.Optimizer:
    if name == "adam":
        if momentum != 0.0:
            raise IGDSInputError("momentum applies to the sgd optimizer only (Adam has its own betas)")
        return _adam(model, lr, weight_decay)
    if name == "sgd":  # MinimaxDiffusion: optim.SGD(params, lr, momentum=0.9, weight_decay=...)
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    raise IGDSInputError(f"unknown optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}")


def _unit_range(images: torch.Tensor) -> torch.Tensor:
    """A batch of a held set in [-1, 1]: a uint8 set (4x smaller to hold) is converted per batch, with
    the same elementwise x / 127.5 - 1 as converting it whole (the same values, bit for bit)."""
    return uint8_to_unit_range(images) if images.dtype == torch.uint8 else images


def train_one_seed(
    network_factory: Callable[[], nn.Module],
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    epochs: int,
    seed: int,
    lr: float,
    batch_size: int,
    schedule: str,
    augment: AugmentConfig,
    weight_decay: float,
    device: torch.device,
    on_epoch: Callable[[int], None] | None = None,
    optimizer: str = "adam",
    momentum: float = 0.0,
    checkpoint_every: int = 0,
    on_checkpoint: Callable[[int, nn.Module], None] | None = None,
) -> nn.Module:
    """Train one freshly initialised network (initialised from ``seed``) and return it.

    on_epoch(epochs done) is called after every epoch (host-side only: it adds no device sync).
    optimizer: "adam" (fused when available) or "sgd" (with ``momentum``). on_checkpoint(epochs
    done, model) is called after every ``checkpoint_every``-th epoch except the last (the caller
    measures the final model itself); the model is put back in train mode afterwards. Checkpoints
    draw no random numbers, so they do not change the training trajectory."""
    # Initialise under a CPU RNG seeded with `seed`, without disturbing the caller's RNG state.
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(seed)
        model = network_factory()
    model = model.to(device).train()
    trainer = _optimizer(model, optimizer, lr, weight_decay, momentum)
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    count = train_x.shape[0]
    steps_per_epoch = math.ceil(count / batch_size)
    total_steps = epochs * steps_per_epoch
    step = 0
    for epoch in range(epochs):
        if steps_per_epoch == 1:
            batches = [None]  # full batch: order is irrelevant (CutMix draws its own partners)
        else:
            order = torch.randperm(count, generator=generator, device=device)
            batches = order.split(batch_size)
        for batch_index in batches:
            images = _unit_range(train_x if batch_index is None else train_x[batch_index])
            labels = train_y if batch_index is None else train_y[batch_index]
            images, labels_a, labels_b, kept = augment_batch(images, labels, generator, augment)
            logits = model(images)
            if augment.cutmix_prob > 0.0:
                loss = kept * F.cross_entropy(logits, labels_a) + (1.0 - kept) * F.cross_entropy(logits, labels_b)
            else:
                loss = F.cross_entropy(logits, labels_a)
            if schedule != "constant":
                for group in trainer.param_groups:
                    group["lr"] = lr * _lr_factor(schedule, step, total_steps, epoch, epochs)
            trainer.zero_grad(set_to_none=True)
            loss.backward()
            trainer.step()
            step += 1
        if on_epoch is not None:
            on_epoch(epoch + 1)
        if on_checkpoint is not None and checkpoint_every > 0 and (epoch + 1) % checkpoint_every == 0 and epoch + 1 < epochs:
            on_checkpoint(epoch + 1, model)
            model.train()
    return model


@torch.inference_mode()
def measure_accuracy(model: nn.Module, test_x, test_y: torch.Tensor | None, batch_size: int = TEST_BATCH_SIZE,
                     device: torch.device | str | None = None) -> float:
    """Top-1 accuracy in percent of ``model`` (put in eval mode) on a labelled set.

    test_x: a tensor [N, C, S, S] (with test_y [N]) or a FolderImages (its own labels; test_y
    ignored), streamed in batches of ``batch_size`` to ``device`` (default: the model's)."""
    model.eval()
    if isinstance(test_x, FolderImages):
        if device is None:
            device = next(model.parameters()).device
        correct = torch.zeros((), dtype=torch.int64, device=device)
        chunks = [slice(start, min(start + batch_size, len(test_x))) for start in range(0, len(test_x), batch_size)]
        for images, labels, _ in test_x.batches(chunks, device):
            correct += (model(images).argmax(dim=1) == labels).sum()
        return 100.0 * float(correct) / len(test_x)
    correct = torch.zeros((), dtype=torch.int64, device=test_y.device)
    for start in range(0, test_x.shape[0], batch_size):
        logits = model(_unit_range(test_x[start : start + batch_size]))
        correct += (logits.argmax(dim=1) == test_y[start : start + batch_size]).sum()
    return 100.0 * float(correct) / test_x.shape[0]


def resolve_protocol(protocol: EvalProtocol | str | None, num_classes: int, channels: int) -> EvalProtocol:
    """``None`` -> the ``igds`` preset; a name -> :func:`protocol_for`; an EvalProtocol as given
    (its normalisation must have one mean / std per image channel)."""
    if protocol is None:
        protocol = "igds"
    if isinstance(protocol, str):
        return protocol_for(protocol, num_classes, channels)
    if not isinstance(protocol, EvalProtocol):
        raise IGDSInputError(f"protocol must be a name or an EvalProtocol, got {type(protocol).__name__}")
    if protocol.normalize_mean is not None and len(protocol.normalize_mean) != channels:
        raise IGDSInputError(
            f"protocol {protocol.name!r} normalises {len(protocol.normalize_mean)} channel(s); the images have {channels}"
        )
    return protocol


def evaluate_distilled(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    network: str | Callable[[], nn.Module] = "convnet6",
    epochs: int | None = None,
    ipc: int | None = None,
    lr: float | None = None,
    batch_size: int | None = None,
    seeds: int = 3,
    device: str | torch.device | None = None,
    schedule: str | None = None,
    augment: AugmentConfig | None = None,
    weight_decay: float | None = None,
    num_classes: int | None = None,
    width: int = 128,
    base_seed: int = 0,
    progress: Callable[[str], None] | None = None,
    num_threads: int | None = None,
    on_epoch: Callable[[int, int, int], None] | None = None,
    protocol: EvalProtocol | str | None = None,
) -> dict:
    """Train ``seeds`` networks on the distilled set and report their real-test accuracy.

    ``train_x/test_x``: float [N, C, S, S] in [-1, 1], or uint8 [0, 255] (held 4x smaller and converted
    per batch, x / 127.5 - 1: the same values), or test_x a FolderImages; ``train_y/test_y``: int labels in
    0..num_classes-1 (inferred from the labels if not given; every class needs distilled images).
    ``network``: a name for :func:`build_eval_network` (``width`` is passed to ConvNets) or a
    zero-argument factory returning a fresh module (wrapped in :class:`NormalizedInput` when the
    protocol normalises, so training and every test batch see the normalised input).
    ``protocol``: "igds" (None, the default), "minimax" or an :class:`EvalProtocol`; it supplies
    the optimizer, lr, weight decay, schedule, batch size, augmentations, epochs, input
    normalisation and best-over-checkpoints reporting. Precedence: ``lr``, ``schedule``,
    ``weight_decay``, ``batch_size``, ``epochs`` and ``augment`` (a whole :class:`AugmentConfig`)
    override the protocol's value when not None; the result lists them under ``overrides``.
    ``epochs`` defaults to ``protocol.epochs(ipc, num_classes)``, ``ipc`` to the largest class
    count. ``batch_size`` defaults to the protocol's (igds: the full set up to
    ``FULL_BATCH_LIMIT`` images, else 64; minimax: 64, 128 above 100 classes), at most the set
    size. Seeds are ``base_seed, base_seed+1, ...``. For digits pass
    ``augment=AugmentConfig(horizontal_flip=False)``. ``num_threads`` (CPU only): torch
    intra-op threads while training; None picks 1 for small work (igds_fast.threads; measured 100x slower for a tiny ConvNet on 2 threads of 2 shared cores) and
    leaves the process setting otherwise. The previous setting is restored afterwards.
    ``test_x`` may be an ``igds_fast.data.FolderImages`` (``test_y``: its labels or None): held
    sets go to the device whole, streamed ones are read batch by batch for each accuracy
    measurement (with ``best_checkpoints`` that is ~100 passes per seed).
    ``on_epoch(seed, epochs done, epochs)`` is called after every training epoch (progress).

    Returns a JSON-serialisable dict: network, ipc, epochs, num_classes, seeds, accuracies
    (percent, per seed, after the last epoch), mean, std (of those; population std), train/test
    sizes, ``protocol`` (the preset as defined), ``overrides``, the effective settings (optimizer,
    lr, momentum, weight_decay, schedule, batch_size, augment, normalize) and the wall time; with
    ``best_checkpoints`` also best_accuracies / best_mean / best_std / best_every_epochs.
    ``accuracy_definitions`` says in words which figure is which.
    """
    if isinstance(test_x, FolderImages):
        test_y = test_x.labels
        if test_x.in_memory:  # small enough to hold: the fast path, same batches and results
            test_x = test_x.as_uint8_tensor()
    num_classes = _check_inputs(train_x, train_y, test_x, test_y, num_classes)
    channels, image_size = train_x.shape[1], train_x.shape[-1]
    protocol = resolve_protocol(protocol, num_classes, channels)
    if not isinstance(seeds, int) or seeds < 1:
        raise IGDSInputError(f"seeds must be a positive integer, got {seeds!r}")
    given = {"lr": lr, "schedule": schedule, "weight_decay": weight_decay, "batch_size": batch_size,
             "epochs": epochs, "augment": augment}
    overrides = {name: value for name, value in given.items() if value is not None}
    lr = protocol.lr if lr is None else lr
    schedule = protocol.schedule if schedule is None else schedule
    weight_decay = protocol.weight_decay if weight_decay is None else weight_decay
    augment = protocol.augment if augment is None else augment
    if not lr > 0:
        raise IGDSInputError(f"lr must be > 0, got {lr!r}")
    if schedule not in SCHEDULES:
        raise IGDSInputError(f"unknown schedule {schedule!r}; choose from {', '.join(SCHEDULES)}")
    if weight_decay < 0:
        raise IGDSInputError(f"weight_decay must be >= 0, got {weight_decay!r}")
    if not isinstance(augment, AugmentConfig):
        raise IGDSInputError(f"augment must be an AugmentConfig, got {type(augment).__name__}")
    if (augment.color_jitter > 0 or augment.lighting_std > 0) and channels != 3:
        raise IGDSInputError(f"colour jitter and PCA lighting need RGB images; these have {channels} channel(s)")
    if ipc is None:
        ipc = infer_ipc(train_y, num_classes)
    if epochs is None:
        epochs = protocol.epochs(ipc, num_classes)
    if not isinstance(epochs, int) or epochs < 1:
        raise IGDSInputError(f"epochs must be a positive integer, got {epochs!r}")
    count = train_x.shape[0]
    if batch_size is None:
        batch_size = protocol.batch_size
    if batch_size is None:
        batch_size = count if count <= FULL_BATCH_LIMIT else MINIBATCH_SIZE
    if not isinstance(batch_size, int) or batch_size < 1:
        raise IGDSInputError(f"batch_size must be a positive integer, got {batch_size!r}")
    batch_size = min(batch_size, count)
    device = resolve_device(device)

    if isinstance(network, str):
        network_name = network
        # Build once now so a bad name or size fails before any training.
        build_eval_network(network, channels, num_classes, image_size, width=width)

        def build_network():
            return build_eval_network(network_name, channels, num_classes, image_size, width=width)
    elif callable(network):
        build_network = network
        network_name = getattr(network, "__name__", type(network).__name__)
    else:
        raise IGDSInputError(f"network must be a name or a factory, got {type(network).__name__}")
    if protocol.normalize_mean is not None:
        def network_factory():
            return NormalizedInput(build_network(), protocol.normalize_mean, protocol.normalize_std)
    else:
        network_factory = build_network

    # A uint8 set stays uint8 on the device (converted per batch); a float one is held as float32.
    held = (lambda images: images.to(device=device) if images.dtype == torch.uint8
            else images.to(device=device, dtype=torch.float32))
    train_x_d = held(train_x)
    train_y_d = train_y.to(device=device, dtype=torch.int64)
    if isinstance(test_x, FolderImages):
        test_x_d, test_y_d = test_x, None  # streamed per measurement
    else:
        test_x_d = held(test_x)
        test_y_d = test_y.to(device=device, dtype=torch.int64)

    if num_threads is not None and (not isinstance(num_threads, int) or num_threads < 1):
        raise IGDSInputError(f"num_threads must be a positive integer, got {num_threads!r}")
    threads = cpu_threads(device, num_threads, batch_size * image_size * image_size * width)

    checkpoint_every = max(1, epochs // protocol.best_checkpoints) if protocol.best_checkpoints else 0
    started = time.perf_counter()
    seed_list = [base_seed + offset for offset in range(seeds)]
    accuracies, best_accuracies = [], []
    with torch_threads(threads):
        for seed in seed_list:
            epoch_hook = None if on_epoch is None else (lambda done, seed=seed: on_epoch(seed, done, epochs))
            checkpoint_accuracies: list[float] = []

            def on_checkpoint(done, model, record=checkpoint_accuracies):
                record.append(measure_accuracy(model, test_x_d, test_y_d, device=device))

            model = train_one_seed(
                network_factory, train_x_d, train_y_d, epochs, seed, lr, batch_size, schedule,
                augment, weight_decay, device, on_epoch=epoch_hook, optimizer=protocol.optimizer,
                momentum=protocol.momentum, checkpoint_every=checkpoint_every,
                on_checkpoint=on_checkpoint if checkpoint_every else None,
            )
            accuracy = measure_accuracy(model, test_x_d, test_y_d, device=device)
            accuracies.append(accuracy)
            message = f"{network_name} seed {seed}: {accuracy:.2f}%"
            if checkpoint_every:
                best_accuracies.append(max([*checkpoint_accuracies, accuracy]))
                message += f" (best over checkpoints {best_accuracies[-1]:.2f}%)"
            if progress is not None:
                progress(message)
    definitions = {"accuracies": "test accuracy after the last epoch, per seed; mean and std are over these"}
    result = {
        "network": network_name,
        "ipc": int(ipc),
        "epochs": int(epochs),
        "num_classes": int(num_classes),
        "seeds": seed_list,
        "accuracies": accuracies,
        "mean": float(np.mean(accuracies)),
        "std": float(np.std(accuracies)),
        "unit": "percent",
        "train_size": int(count),
        "test_size": len(test_x),
        "image_size": int(image_size),
        "channels": int(channels),
        "protocol": protocol.to_dict(),
        "overrides": {name: (value.to_dict() if isinstance(value, AugmentConfig) else value)
                      for name, value in overrides.items()},
        "optimizer": protocol.optimizer,
        "momentum": float(protocol.momentum),
        "lr": float(lr),
        "schedule": schedule,
        "weight_decay": float(weight_decay),
        "batch_size": int(batch_size),
        "augment": augment.to_dict(),
        "normalize": None if protocol.normalize_mean is None else {
            "mean": list(protocol.normalize_mean), "std": list(protocol.normalize_std)},
        "device": str(device),
        "threads": int(threads) if device.type == "cpu" else None,
    }
    if checkpoint_every:
        definitions["best_accuracies"] = (
            f"best test accuracy over checkpoints every {checkpoint_every} epoch(s) and the last, per seed "
            "(selected on test data, as MinimaxDiffusion's tables); best_mean and best_std are over these"
        )
        result.update({
            "best_accuracies": best_accuracies,
            "best_mean": float(np.mean(best_accuracies)),
            "best_std": float(np.std(best_accuracies)),
            "best_every_epochs": int(checkpoint_every),
        })
    result["accuracy_definitions"] = definitions
    result["seconds"] = round(time.perf_counter() - started, 3)
    return result
