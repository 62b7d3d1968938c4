"""The contrastive stage: MoCo v2 with the CMI term, and its epoch checkpoints.

Query encoder f_q + projection head g_q, momentum key encoder + head, a queue of K negative keys
that remember their image, shuffle-BN emulated in `bn_splits` groups, and the class centroids Q
(EMA per batch or re-estimated every epoch); see the package docstring for the equations. After
every epoch the whole state (encoders, heads, queue, centroids, optimiser, generator) can be
written atomically to one safetensors file, and a rerun resumes after the last finished epoch.
"""
from __future__ import annotations

import copy
import json
import math
import os
import time
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..artifacts import parse_json_header, read_safetensors
from ..errors import IGDSInputError
from ..guidance.objective import centroid_kl
from ..imageio import write_bytes_atomic
from ..models.resnet import ResNet
from ..preprocess import EncoderPreprocess
from ..progress import Progress
from ..ve import LogCentroidAccumulator
from .config import VETrainConfig
from .features import FEATURE_BATCH, even_chunks, frozen_bn_statistics
from .losses import feature_log_softmax, info_nce_loss, update_log_centroids
from .views import random_view

CHECKPOINT_FORMAT = "igds_ve_checkpoint"
CHECKPOINT_VERSION = 1
_CHECKPOINT_KEY = "igds_ve_checkpoint"


class ProjectionHead(nn.Sequential):
    """MoCo v2's MLP head: Linear(d, hidden) -> ReLU -> Linear(hidden, moco_dim). [B, d] -> [B, moco_dim]."""

    def __init__(self, feature_dim: int, hidden: int, out_dim: int):
        super().__init__(nn.Linear(feature_dim, hidden), nn.ReLU(), nn.Linear(hidden, out_dim))


class MoCoTrainer:
    """The contrastive stage (state: encoders, heads, queue, centroids, optimiser)."""

    def __init__(self, encoder: ResNet, preprocess: EncoderPreprocess, config: VETrainConfig, num_classes: int,
                 num_images: int, device: torch.device, log: Callable[[str], None]):
        self.config = config
        self.device = device
        self.preprocess = preprocess
        self.encoder_q = encoder.to(device).train()
        dim = encoder.feature_dim
        hidden = config.mlp_hidden or dim
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed + 1)
            self.head_q = ProjectionHead(dim, hidden, config.moco_dim).to(device)
        self.encoder_k = copy.deepcopy(self.encoder_q).requires_grad_(False)
        self.head_k = copy.deepcopy(self.head_q).requires_grad_(False)
        self.query_params = list(self.encoder_q.parameters()) + list(self.head_q.parameters())
        self.key_params = list(self.encoder_k.parameters()) + list(self.head_k.parameters())

        self.batch_size = min(config.batch_size, num_images)
        # More queue entries than images would only repeat images among the negatives.
        self.queue_size = min(config.queue_size, num_images)
        if self.queue_size < config.queue_size:
            log(f"train-ve: queue clipped from {config.queue_size} to {self.queue_size} (the training-set size)")
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(config.seed)
        # Random unit vectors until real keys arrive (as MoCo), id -1 = no image.
        self.queue = F.normalize(torch.randn(self.queue_size, config.moco_dim, generator=self.generator, device=device), dim=1)
        self.queue_ids = torch.full((self.queue_size,), -1, dtype=torch.long, device=device)
        self.queue_pointer = 0

        self.log_q = torch.zeros(num_classes, dim, device=device)
        self.seen = torch.zeros(num_classes, dtype=torch.bool, device=device)

        if config.optimizer == "sgd":
            self.optimizer = torch.optim.SGD(self.query_params, lr=config.lr, momentum=0.9, weight_decay=config.weight_decay)
        else:
            self.optimizer = torch.optim.Adam(self.query_params, lr=config.lr, weight_decay=config.weight_decay)

    def _groups(self, batch: int) -> int:
        # BatchNorm needs >= 2 samples per group (layer4 maps can be 1x1); instance norm needs no split.
        if self.encoder_q.norm != "batch":
            return 1
        return max(1, min(self.config.bn_splits, batch // 2))

    def _encode_query(self, views: torch.Tensor, groups: int) -> torch.Tensor:
        chunks = views.tensor_split(groups)
        return torch.cat([self.encoder_q.forward_features(self.preprocess(chunk)) for chunk in chunks])

    @torch.no_grad()
    def _encode_keys(self, views: torch.Tensor, groups: int) -> torch.Tensor:
        shuffle = torch.randperm(views.shape[0], generator=self.generator, device=self.device)
        shuffled = views[shuffle]
        keys = torch.cat([self.head_k(self.encoder_k.forward_features(self.preprocess(chunk)))
                          for chunk in shuffled.tensor_split(groups)])
        return F.normalize(keys[torch.argsort(shuffle)], dim=1)

    @torch.no_grad()
    def _momentum_update(self) -> None:
        torch._foreach_lerp_(self.key_params, self.query_params, 1.0 - self.config.moco_momentum)

    @torch.no_grad()
    def _enqueue(self, keys: torch.Tensor, ids: torch.Tensor) -> None:
        count = min(keys.shape[0], self.queue_size)
        keys, ids = keys[-count:], ids[-count:]
        positions = (self.queue_pointer + torch.arange(count, device=self.device)) % self.queue_size
        self.queue[positions] = keys
        self.queue_ids[positions] = ids
        self.queue_pointer = (self.queue_pointer + count) % self.queue_size

    @torch.no_grad()
    def estimate_centroids_over(self, source) -> None:
        """Q over the whole (un-augmented) set with the current query encoder ("epoch" mode), streamed."""
        accumulator = LogCentroidAccumulator(self.log_q.shape[0], self.config.tau)
        with frozen_bn_statistics(self.encoder_q):
            for images, labels, _ in source.batches(even_chunks(len(source), FEATURE_BATCH), self.device):
                features = self.encoder_q.forward_features(self.preprocess(images))
                accumulator.update(features.float(), labels.to(torch.long))
        self.log_q.copy_(accumulator.compute(torch.float32))
        self.seen.fill_(True)

    # ---- checkpoints (one safetensors file, written atomically after every epoch) ----------------

    _MODULES = ("encoder_q", "head_q", "encoder_k", "head_k")

    def save_checkpoint(self, path: str, key: dict, epoch: int, step: int, history: list[dict]) -> None:
        from safetensors.torch import save as safetensors_bytes

        tensors = {}
        for name in self._MODULES:
            for k, v in getattr(self, name).state_dict().items():
                tensors[f"{name}.{k}"] = v
        tensors.update(queue=self.queue, queue_ids=self.queue_ids, log_q=self.log_q, seen=self.seen,
                       generator_state=self.generator.get_state())
        optimizer_state = self.optimizer.state_dict()
        scalars = {}
        for index, state in optimizer_state["state"].items():
            for k, v in state.items():
                if isinstance(v, torch.Tensor):
                    tensors[f"optimizer.{index}.{k}"] = v
                else:
                    scalars[f"{index}.{k}"] = v
        header = {
            "format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_VERSION, "key": key, "epoch": epoch,
            "step": step, "queue_pointer": self.queue_pointer, "history": history,
            "param_groups": optimizer_state["param_groups"], "optimizer_scalars": scalars,
        }
        tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
        write_bytes_atomic(path, safetensors_bytes(tensors, metadata={_CHECKPOINT_KEY: json.dumps(header)}))

    def load_checkpoint(self, path: str, key: dict) -> tuple[int, int, list[dict]]:
        """Restore the state saved after an epoch; returns (epochs done, steps done, history)."""
        metadata, tensors = read_safetensors(path, "VE training checkpoint", with_tensors=True)
        header = parse_json_header(metadata, path, _CHECKPOINT_KEY, CHECKPOINT_FORMAT, CHECKPOINT_VERSION,
                                   "VE training checkpoint")
        if header.get("key") != json.loads(json.dumps(key)):
            saved = header.get("key") or {}
            differs = sorted(k for k in set(saved) | set(key) if saved.get(k) != json.loads(json.dumps(key.get(k))))
            raise IGDSInputError(
                f"checkpoint {path} belongs to another run ({', '.join(differs)} differ); delete it to start afresh"
            )
        try:
            for name in self._MODULES:
                module = getattr(self, name)
                prefix = f"{name}."
                module.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
            with torch.no_grad():
                for name in ("queue", "queue_ids", "log_q", "seen"):
                    getattr(self, name).copy_(tensors[name])
            self.generator.set_state(tensors["generator_state"])
            state: dict = {}
            for k, v in tensors.items():
                if k.startswith("optimizer."):
                    _, index, field = k.split(".", 2)
                    state.setdefault(int(index), {})[field] = v
            for k, v in header["optimizer_scalars"].items():
                index, field = k.split(".", 1)
                state.setdefault(int(index), {})[field] = v
            self.optimizer.load_state_dict({"state": state, "param_groups": header["param_groups"]})
            self.queue_pointer = int(header["queue_pointer"])
            return int(header["epoch"]), int(header["step"]), list(header["history"])
        except (KeyError, RuntimeError, ValueError) as exc:
            reason = " ".join(str(exc).split())[:200]
            raise IGDSInputError(f"checkpoint {path} does not fit this run: {reason}") from exc

    def train(self, source, log: Callable[[str], None], checkpoint: str | None = None,
              key: dict | None = None, progress: bool = False) -> list[dict]:
        """The contrastive epochs over `source` (FolderImages or TensorImages): one shuffled pass each."""
        config = self.config
        self.labels = source.labels.to(self.device, torch.long)
        count = len(source)
        steps_per_epoch = count // self.batch_size  # batches of batch_size .. 2*batch_size-1, none tiny
        total_steps = config.epochs * steps_per_epoch
        history: list[dict] = []
        step = start_epoch = 0
        if checkpoint is not None and os.path.exists(checkpoint):
            start_epoch, step, history = self.load_checkpoint(checkpoint, key)
            log(f"train-ve: resumed from {checkpoint} after epoch {start_epoch}/{config.epochs}")
        for epoch in range(start_epoch, config.epochs):
            started = time.perf_counter()
            if config.centroid_update == "epoch":
                self.estimate_centroids_over(source)
            order = torch.randperm(count, generator=self.generator, device=self.device)
            sums = {"infonce": 0.0, "kl": 0.0, "loss": 0.0}
            bar = Progress(total=count, unit="img", label=f"train-ve epoch {epoch + 1}/{config.epochs}", enabled=progress)
            for images, labels, batch_ids in source.batches(order.tensor_split(steps_per_epoch), self.device):
                lr = config.lr * 0.5 * (1.0 + math.cos(math.pi * step / total_steps))
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                terms = self._step(images, labels.to(torch.long), batch_ids.to(self.device))
                for name in sums:
                    sums[name] += terms[name]
                step += 1
                bar.update(images.shape[0])
            bar.close()
            record = {k: v / steps_per_epoch for k, v in sums.items()}
            record.update(epoch=epoch + 1, seconds=round(time.perf_counter() - started, 3))
            history.append(record)
            if checkpoint is not None:
                self.save_checkpoint(checkpoint, key, epoch + 1, step, history)
            log(f"train-ve: epoch {epoch + 1}/{config.epochs} InfoNCE {record['infonce']:.4f} "
                f"KL(P||Q_y) {record['kl']:.4f} loss {record['loss']:.4f} ({record['seconds']:.1f}s)")
        return history

    def _step(self, images: torch.Tensor, labels: torch.Tensor, ids: torch.Tensor) -> dict:
        config = self.config
        view_q = random_view(images, self.generator, config)
        view_k = random_view(images, self.generator, config)
        groups = self._groups(images.shape[0])
        features = self._encode_query(view_q, groups)
        queries = F.normalize(self.head_q(features), dim=1)
        self._momentum_update()
        keys = self._encode_keys(view_k, groups)
        infonce = info_nce_loss(queries, keys, self.queue, config.moco_temperature, ids, self.queue_ids)
        log_p = feature_log_softmax(features, config.tau)
        if config.centroid_update == "ema":
            # Update first, then use: every class in the batch has a centroid, and with momentum 0
            # Q_y is exactly this batch's class mean.
            update_log_centroids(self.log_q, self.seen, log_p, labels, config.centroid_momentum)
        kl = centroid_kl(log_p, self.log_q.detach(), labels).mean()
        loss = infonce - config.lambda_cmi * kl if config.lambda_cmi > 0 else infonce
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self._enqueue(keys, ids)
        return {"infonce": float(infonce.detach()), "kl": float(kl.detach()), "loss": float(loss.detach())}
