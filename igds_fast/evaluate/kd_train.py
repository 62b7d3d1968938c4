"""Training and testing under the soft-label protocols (``rded`` online KD, ``sre2l`` replay) and their hard-label twin.

One optimizer step per batch of the epoch's draws (:mod:`.kd_augment`; for ``sre2l`` the recorded
ones, :mod:`.relabel`): the batch's images are augmented, CutMixed, split into the protocol's
accumulation chunks, and for each chunk

    loss = sum_i KL(q_i || p_i) / (chunk size x accumulation steps),
    q_i = softmax(t_i / T),  p_i = softmax(s_i / T),

with t the teacher's logits of the run's classes (``rded``: the frozen teacher on the mixed batch;
``sre2l``: the recorded ones) and s the student's: PyTorch's ``KLDivLoss(reduction="batchmean")``
of ``log_softmax(s / T)`` against ``q``, without a T^2 factor, as both peers compute it. The
hard-label twin (``--also-hard-labels``) trains the same set and recipe on the folder labels with
CutMix's label mixing: ``kept * CE(s, y) + (1 - kept) * CE(s, y_partner)``, kept = the area outside
the box. The learning rate is set per epoch (the peers' LambdaLR steps once per epoch).

Under torchrun every rank draws the same epoch (the draws are keyed by seed and epoch), takes a
contiguous share of each chunk, augments its share and the CutMix partners of its share itself
(partners may sit on another rank), and the gradients are summed over ranks before the step; the
loss above is already divided by the global chunk size. BatchNorm statistics are synchronised over
the ranks (``SyncBatchNorm`` on CUDA; on CPU / gloo, :class:`AllReduceBatchNorm`), so a 2-rank run
computes the 1-rank run's arithmetic up to the order of floating-point sums.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from igds_fast.distributed import DistContext
from igds_fast.errors import IGDSInputError
from igds_fast.evaluate.class_check import select_classes
from igds_fast.evaluate.kd_augment import augment_positions, draw_epoch, kept_fraction, mix_batch
from igds_fast.evaluate.relabel import RelabelReader, RelabelSpec, soft_label_rows, write_epoch
from igds_fast.evaluate.soft_protocols import KDProtocol
from igds_fast.evaluate.torchvision_nets import has_batch_norm

TEST_BATCH = 500
LABEL_MODES = ("online", "replay", "hard")


def kd_loss_sum(student_logits: torch.Tensor, target_probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """sum_i KL(q_i || softmax(s_i / T)) over the batch (divide by the batch for ``batchmean``)."""
    log_p = F.log_softmax(student_logits / temperature, dim=1)
    return F.kl_div(log_p, target_probs, reduction="sum")


class AllReduceBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose batch statistics are over every rank's share (gloo / CPU, where torch's SyncBatchNorm
    refuses to run): mean = all_reduce(sum x) / n, var = all_reduce(sum (x - mean)^2) / n through the
    differentiable all_reduce (its backward sums the gradients), running statistics as BatchNorm
    (unbiased variance, momentum or cumulative average)."""

    def _check_input_dim(self, x):
        if x.dim() < 2:
            raise ValueError(f"expected at least 2-D input, got {x.dim()}-D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training and self.track_running_stats:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        from torch.distributed.nn.functional import all_reduce

        dims = [0] + list(range(2, x.dim()))
        shape = [1, -1] + [1] * (x.dim() - 2)
        count = torch.full((1,), float(x.numel() // x.shape[1]), dtype=x.dtype, device=x.device)
        totals = all_reduce(torch.cat([x.sum(dims), count]))
        n = totals[-1].detach()
        mean = totals[:-1] / n
        centred = x - mean.view(shape)
        var = all_reduce((centred * centred).sum(dims)) / n
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.mul_(1 - factor).add_(mean.detach(), alpha=factor)
                self.running_var.mul_(1 - factor).add_(var.detach() * n / max(float(n) - 1.0, 1.0), alpha=factor)
        out = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out


def synchronise_batch_norm(model: nn.Module, ctx: DistContext) -> nn.Module:
    """BatchNorm layers whose statistics span the ranks (no change outside torchrun)."""
    if not ctx.enabled:
        return model
    if ctx.backend == "nccl":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)

    def convert(module: nn.Module) -> nn.Module:
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            out = AllReduceBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                     module.track_running_stats)
            out.load_state_dict(module.state_dict())
            out.train(module.training)
            return out
        for name, child in module.named_children():
            module.add_module(name, convert(child))
        return module

    return convert(model)


def rded_parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """RDED utils.py:67-84 / SRe2L validate/utils.py:59-73: weight decay on >1-D ``weight`` tensors only."""
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        (decay if "weight" in name and parameter.dim() > 1 else no_decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _sum_gradients(model: nn.Module, ctx: DistContext) -> None:
    if not ctx.enabled:
        return
    parameters = [p for p in model.parameters() if p.requires_grad]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    offset = 0
    for parameter, grad in zip(parameters, grads):
        size = grad.numel()
        parameter.grad = flat[offset:offset + size].view_as(parameter)
        offset += size


def _rank_share(positions: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """This rank's contiguous share of a chunk's positions (the same split whatever is stored)."""
    m = positions.numel()
    return positions[ctx.rank * m // ctx.world_size:(ctx.rank + 1) * m // ctx.world_size]


def _chunks(start: int, stop: int, protocol: KDProtocol) -> list[torch.Tensor]:
    """A batch's accumulation chunks (SRe2L train_FKD.py:231-243: size B / a; the last batch in ceil(n / small) chunks)."""
    small = protocol.batch_size // protocol.accumulation_steps
    return [torch.arange(s, min(s + small, stop)) for s in range(start, stop, small)]


@dataclass
class BatchPlan:
    needed: torch.Tensor  # sorted epoch positions whose augmented images this rank computes
    locals_: list[torch.Tensor]  # per chunk: this rank's positions
    chunk_sizes: list[int]  # per chunk: the global chunk size
    box: torch.Tensor
    start: int


def plan_epoch(draws, protocol: KDProtocol, ctx: DistContext) -> list[BatchPlan]:
    plans = []
    for batch in range(draws.num_batches):
        start = batch * draws.batch_size
        stop = min(start + draws.batch_size, draws.count)
        chunks = _chunks(start, stop, protocol)
        locals_ = [_rank_share(chunk, ctx) for chunk in chunks]
        local = torch.cat(locals_)
        partners = start + draws.mix_partner[local]
        needed = torch.unique(torch.cat([local, partners]))
        plans.append(BatchPlan(needed, locals_, [c.numel() for c in chunks], draws.mix_boxes[batch], start))
    return plans


def _rows(needed: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    return torch.searchsorted(needed, positions)


def _batch_images(source, draws, plans, device):
    """(plan, augmented images of plan.needed) per batch, decoding ahead with the source's workers."""
    lists = [draws.order[plan.needed].tolist() for plan in plans]
    for plan, (images, _, _) in zip(plans, source.batches(lists, device)):
        yield plan, augment_positions(images, draws, plan.needed)


@torch.inference_mode()
def distributed_accuracy(model: nn.Module, val, device, ctx: DistContext) -> float:
    """Top-1 (percent) of ``model`` on the FolderImages ``val``; under torchrun each rank tests a contiguous share."""
    model.eval()
    count = len(val)
    mine = range(ctx.rank * count // ctx.world_size, (ctx.rank + 1) * count // ctx.world_size)
    chunks = [list(mine[i:i + TEST_BATCH]) for i in range(0, len(mine), TEST_BATCH)]
    correct = torch.zeros((), dtype=torch.int64, device=device)
    for images, labels, _ in val.batches(chunks, device):
        correct += (model(images).argmax(dim=1) == labels).sum()
    if ctx.enabled:
        total = correct.to(torch.float64).cpu().reshape(1)
        dist.all_reduce(total)
        return 100.0 * float(total[0]) / count
    return 100.0 * float(correct) / count


def train_student(*, protocol: KDProtocol, build_student: Callable[[], nn.Module], source, labels: torch.Tensor,
                  mode: str, seed: int, device: torch.device, ctx: DistContext, teacher: nn.Module | None = None,
                  class_map: list[int] | None = None, reader: RelabelReader | None = None,
                  on_epoch: Callable[[int], None] | None = None,
                  on_test: Callable[[int, nn.Module], None] | None = None) -> nn.Module:
    """Train one student (initialised from ``seed``) on ``source`` (FolderImages at the source side) by ``protocol``.

    mode: "online" (``teacher`` labels every mixed chunk), "replay" (``reader``'s recorded draws and
    soft labels) or "hard" (``labels`` with CutMix label mixing). on_test(epoch, model) after each
    of the peer's test points (the model is put back in train mode)."""
    if mode not in LABEL_MODES:
        raise IGDSInputError(f"unknown label mode {mode!r}")
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(seed)
        model = build_student()
    model = synchronise_batch_norm(model, ctx).to(device).train()
    optimizer = torch.optim.AdamW(rded_parameter_groups(model, protocol.weight_decay), lr=protocol.lr,
                                  betas=protocol.betas)
    extra_forward = protocol.student_no_grad_forward and mode == "online" and has_batch_norm(model)
    labels_d = labels.to(device)
    count = len(source)
    if count < ctx.world_size * protocol.accumulation_steps:
        raise IGDSInputError(f"{count} images cannot be shared by {ctx.world_size} ranks")
    for epoch in range(protocol.epochs):
        if mode == "replay":
            draws = reader.draws(epoch)
        else:
            draws = draw_epoch(seed, epoch, count, protocol.batch_size, source.image_size, protocol.image_size,
                               protocol.crop_scale, protocol.crop_ratio, protocol.patch_factor,
                               protocol.horizontal_flip, protocol.cutmix_beta)
        factor = protocol.lr_factor(epoch)
        for group in optimizer.param_groups:
            group["lr"] = protocol.lr * factor
        plans = plan_epoch(draws, protocol, ctx)
        if any(len(local) == 0 for plan in plans for local in plan.locals_):
            raise IGDSInputError(f"a chunk of the last batch has fewer images than the {ctx.world_size} ranks: use fewer "
                                 "ranks or another --batch-size")
        for plan, augmented in _batch_images(source, draws, plans, device):
            optimizer.zero_grad(set_to_none=True)
            for local, size in zip(plan.locals_, plan.chunk_sizes):
                mine = augmented[_rows(plan.needed, local)]
                partners = augmented[_rows(plan.needed, plan.start + draws.mix_partner[local])]
                mixed = mix_batch(mine, partners, plan.box) if protocol.cutmix_beta is not None else mine
                divisor = float(size * protocol.accumulation_steps)
                if mode == "hard":
                    image_labels = labels_d[draws.order[local].to(device)]
                    partner_labels = labels_d[draws.order[plan.start + draws.mix_partner[local]].to(device)]
                    kept = kept_fraction(plan.box, protocol.image_size)
                    logits = model(mixed)
                    loss = (kept * F.cross_entropy(logits, image_labels, reduction="sum")
                            + (1.0 - kept) * F.cross_entropy(logits, partner_labels, reduction="sum")) / divisor
                else:
                    if mode == "online":
                        with torch.no_grad():
                            targets = F.softmax(select_classes(teacher(mixed), class_map).float() / protocol.temperature,
                                                dim=1)
                    else:
                        first, last = int(local[0]), int(local[-1]) + 1
                        targets = reader.soft_targets(epoch, first, last, protocol.temperature).to(device)
                    if extra_forward:  # RDED main.py:211-213: the student on the mixed batch, no grad, train mode
                        with torch.no_grad():
                            model(mixed)
                    loss = kd_loss_sum(model(mixed), targets, protocol.temperature) / divisor
                loss.backward()
            _sum_gradients(model, ctx)
            optimizer.step()
        if on_epoch is not None:
            on_epoch(epoch + 1)
        if on_test is not None and protocol.tests_after(epoch) and epoch + 1 < protocol.epochs:
            on_test(epoch, model)
            model.train()
    return model


def relabel_epochs(folder: str, spec: RelabelSpec, epochs: list[int], source, teacher: nn.Module,
                   class_map: list[int] | None, protocol: KDProtocol, device,
                   on_epoch: Callable[[int], None] | None = None) -> None:
    """Make the epoch files ``epochs`` (this rank's share): draws, the teacher on every mixed batch, written atomically."""
    for epoch in epochs:
        draws = draw_epoch(spec.seed, epoch, spec.count, spec.batch_size, spec.source_side, spec.output_side,
                           tuple(spec.crop_scale), tuple(spec.crop_ratio), spec.patch_factor, spec.flip,
                           spec.cutmix_beta)
        single = DistContext()
        plans = plan_epoch(draws, protocol, single)

        def rows():
            for plan, augmented in _batch_images(source, draws, plans, device):
                positions = torch.arange(plan.start, plan.start + sum(plan.chunk_sizes))
                mine = augmented[_rows(plan.needed, positions)]
                partners = augmented[_rows(plan.needed, plan.start + draws.mix_partner[positions])]
                mixed = mix_batch(mine, partners, plan.box) if spec.cutmix_beta is not None else mine
                with torch.inference_mode():
                    logits = select_classes(teacher(mixed), class_map).float()
                yield soft_label_rows(logits, spec)

        write_epoch(folder, spec, epoch, draws, rows())
        if on_epoch is not None:
            on_epoch(epoch)


def summarise(accuracies: list[float], best: list[float | None]) -> dict:
    out = {"accuracies": accuracies, "mean": float(np.mean(accuracies)), "std": float(np.std(accuracies))}
    if best and all(value is not None for value in best):
        out.update({"best_accuracies": best, "best_mean": float(np.mean(best)), "best_std": float(np.std(best))})
    return out


__all__ = ["AllReduceBatchNorm", "LABEL_MODES", "distributed_accuracy", "kd_loss_sum", "plan_epoch",
           "rded_parameter_groups", "relabel_epochs", "summarise", "synchronise_batch_norm", "train_student"]
