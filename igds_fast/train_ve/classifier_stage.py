"""train-ve's classifier stage, in memory independent of the number of training images N.

After the contrastive stage, with the encoder frozen:

1. (epochs > 0) BatchNorm statistics recomputed over the clean training images (features.py).
2. The feature pass: the encoder's features z [B, d] of every training image in the fixed batches of
   `features.even_chunks(N, FEATURE_BATCH)`, each batch appended to a `FeatureRows` (a float32 file
   beside the checkpoint, or memory without one) and added to `FeatureMoments` (the probe's
   standardisation, float64) and `LogCentroidAccumulator` (log Q, float64 streaming logsumexp).
3. The linear probe: `StreamedLinearProbe` over the stored rows (full-batch objective summed chunk
   by chunk; L-BFGS or Adam in rounds).
4. The training split's report: one pass over the stored rows with (W, b, log Q) (`SplitStatistics`).

What stays in memory: a batch of images, one chunk of rows (feature_store.CHUNK_BYTES), [C, d]
float64 accumulators, the probe's parameters and optimiser state ([C, d] each; L-BFGS keeps 2 x 20
of them) and the labels [N] (int64). Nothing of size N x d.

Resume (a checkpoint path CKPT given, as the CLI always does): CKPT.classifier (safetensors, written
atomically) records the stage's key (the run's settings, data, classes, device type and the MoCo
init file), the BatchNorm buffers, how many feature rows CKPT.features holds (flushed to disk before
the count is saved) with the accumulators at that row, then the probe's rounds, then the training
report. It is saved at most every SAVE_EVERY_SECONDS during the feature pass and the probe (the
state at any batch or round boundary is exact, so when it was saved does not change the result),
and at the end of each step. A rerun of the same command continues from the last save and ends with
the same bundle bit for bit (the same device and thread count). CKPT.features is removed as soon as
the report no longer needs it; CKPT.classifier when the bundle is written (`stage_files`).
"""
from __future__ import annotations

import json
import os
import time
from typing import Callable

import torch

from ..artifacts import parse_json_header, read_safetensors
from ..errors import IGDSInputError
from ..imageio import write_bytes_atomic
from ..progress import Progress
from ..ve import LogCentroidAccumulator
from .features import FEATURE_BATCH, even_chunks, recompute_batchnorm_statistics
from .feature_store import FeatureMoments, FeatureRows
from .linear_probe import StreamedLinearProbe
from .losses import SplitStatistics

STAGE_FORMAT = "igds_ve_classifier_stage"
STAGE_VERSION = 1
_STAGE_KEY = "igds_ve_classifier_stage"
SAVE_EVERY_SECONDS = 120.0  # the longest a stopped run loses of the feature pass or the probe


def stage_files(checkpoint: str) -> tuple[str, str]:
    """(features file, stage state file) of the classifier stage of a run checkpointed at `checkpoint`."""
    return checkpoint + ".features", checkpoint + ".classifier"


class _StageState:
    """CKPT.classifier: the header (key, phase, counts, probe and report records) and its tensors."""

    def __init__(self, path: str | None, key: dict | None, features_path: str | None = None):
        self.features_path = features_path
        self.path, self.key = path, (None if key is None else json.loads(json.dumps(key)))
        self.header: dict = {"rows": 0, "phase": "features"}
        self.tensors: dict[str, torch.Tensor] = {}
        self.last_save = time.perf_counter()

    def load(self) -> bool:
        """Read a saved state of this run (True), none (False); a state of another run is refused."""
        if self.path is None or not os.path.exists(self.path):
            return False
        metadata, tensors = read_safetensors(self.path, "VE classifier-stage state", with_tensors=True)
        header = parse_json_header(metadata, self.path, _STAGE_KEY, STAGE_FORMAT, STAGE_VERSION,
                                   "VE classifier-stage state")
        if header.get("key") != self.key:
            saved = header.get("key") or {}
            differs = sorted(k for k in set(saved) | set(self.key) if saved.get(k) != self.key.get(k))
            raise IGDSInputError(f"{self.path} belongs to another run ({', '.join(differs)} differ); delete it and "
                                 f"{self.features_path} to start afresh")
        self.header, self.tensors = header, tensors
        return True

    def due(self) -> bool:
        return self.path is not None and time.perf_counter() - self.last_save >= SAVE_EVERY_SECONDS

    def save(self, **changes) -> None:
        if self.path is None:
            return
        from safetensors.torch import save as safetensors_bytes

        self.header.update(changes)
        header = {"format": STAGE_FORMAT, "format_version": STAGE_VERSION, "key": self.key, **self.header}
        tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in self.tensors.items()}
        write_bytes_atomic(self.path, safetensors_bytes(tensors, metadata={_STAGE_KEY: json.dumps(header)}))
        self.last_save = time.perf_counter()


def _accumulator_tensors(centroids: LogCentroidAccumulator, moments: FeatureMoments) -> dict[str, torch.Tensor]:
    tensors = {f"moments.{k}": v for k, v in moments.state().items()}
    if centroids.running_max is not None:
        tensors.update({"centroids.running_max": centroids.running_max, "centroids.scaled_sum": centroids.scaled_sum,
                        "centroids.counts": centroids.counts})
    return tensors


def _restore_accumulators(tensors: dict, num_classes: int, tau: float, dim: int, device):
    moments = FeatureMoments.from_state({k[len("moments."):]: v for k, v in tensors.items() if k.startswith("moments.")}) \
        if "moments.mean" in tensors else FeatureMoments(dim)
    centroids = LogCentroidAccumulator(num_classes, tau)
    if "centroids.running_max" in tensors:
        centroids.running_max = tensors["centroids.running_max"].to(device)
        centroids.scaled_sum = tensors["centroids.scaled_sum"].to(device)
        centroids.counts = tensors["centroids.counts"].to(device)
        centroids.dtype = torch.float32
    return moments, centroids


def _bn_tensors(encoder) -> dict[str, torch.Tensor]:
    return {f"bn.{name}": buffer for name, buffer in encoder.named_buffers()}


def _restore_bn(encoder, tensors: dict) -> None:
    with torch.no_grad():
        for name, buffer in encoder.named_buffers():
            buffer.copy_(tensors[f"bn.{name}"])


@torch.no_grad()
def _feature_pass(encoder, preprocess, train, device, rows: FeatureRows, moments, centroids, state: _StageState,
                  progress: bool) -> None:
    """Append the features of every batch not yet stored; save the state now and then (rows flushed first)."""
    chunks = even_chunks(len(train), FEATURE_BATCH)
    bounds = [c.stop for c in chunks]
    if rows.rows and rows.rows not in bounds:
        raise IGDSInputError(f"{state.path}: {rows.rows} feature rows is not a batch boundary; delete it to start afresh")
    first = bounds.index(rows.rows) + 1 if rows.rows else 0
    bar = Progress(total=len(train), unit="img", label="train-ve features", initial=rows.rows, enabled=progress)
    encoder.eval()
    for batch, labels, _ in train.batches(chunks[first:], device):
        features = encoder.forward_features(preprocess(batch)).float()
        rows.append(features)
        moments.update(features)
        centroids.update(features, labels.to(torch.long))
        bar.update(batch.shape[0])
        if state.due() and not rows.complete:
            rows.flush()
            state.tensors.update(_accumulator_tensors(centroids, moments))
            state.save(rows=rows.rows)
    bar.close()


def run_classifier_stage(encoder, preprocess, train, config, num_classes: int, device, log: Callable[[str], None],
                         checkpoint: str | None = None, key: dict | None = None, progress: bool = False):
    """BN statistics, features, probe, centroids and the training report (module docstring).

    encoder: frozen, on `device`; train: FolderImages / TensorImages; checkpoint: CKPT (None: no
    files, features in memory). Returns (weight [C, d], bias [C], log_q [C, d] float32, train
    statistics: SplitStatistics of the training split) on `device`.
    """
    features_path, state_path = stage_files(checkpoint) if checkpoint is not None else (None, None)
    state = _StageState(state_path, key, features_path)
    resumed = state.load()
    dim = encoder.feature_dim
    labels = train.labels.to(device, torch.long)
    if resumed and "bn.done" in state.tensors:
        _restore_bn(encoder, state.tensors)
    elif config.recompute_bn_stats and config.epochs > 0:
        recompute_batchnorm_statistics(encoder, preprocess, train, device)
    if not resumed or "bn.done" not in state.tensors:
        state.tensors.update(_bn_tensors(encoder), **{"bn.done": torch.ones(())})
    encoder.eval()
    moments, centroids = _restore_accumulators(state.tensors, num_classes, config.tau, dim, device)
    phase = state.header["phase"]
    if resumed:
        log(f"train-ve: classifier stage resumed from {state_path} ({phase}: {state.header['rows']} of {len(train)} "
            "feature rows)")
    rows = None
    if phase != "done":
        rows = FeatureRows(len(train), dim, features_path, rows_done=state.header["rows"])
    try:
        if phase == "features":
            _feature_pass(encoder, preprocess, train, device, rows, moments, centroids, state, progress)
            rows.flush()
            state.tensors.update(_accumulator_tensors(centroids, moments))
            phase = "probe"
            state.save(rows=rows.rows, phase=phase)
        log_q = centroids.compute(torch.float32)

        def chunks():
            return ((block, labels[span]) for span, block in rows.chunks(device))

        if phase == "probe":
            probe = StreamedLinearProbe(chunks, len(train), moments.mean.to(device), moments.std().to(device),
                                        num_classes, config.classifier_epochs, config.classifier_lr,
                                        config.classifier_weight_decay, config.classifier_optimizer, device)
            if "probe.weight" in state.tensors:
                probe.load_state({k: v for k, v in state.tensors.items() if k.startswith(("probe.", "solver."))},
                                 state.header["probe"])

            def after_round(probe):
                if probe.finished or state.due():
                    tensors, header = probe.state()
                    state.tensors = {k: v for k, v in state.tensors.items() if not k.startswith(("probe.", "solver."))}
                    state.tensors.update(tensors)
                    state.save(probe=header)
                if progress:
                    log(f"train-ve: classifier ({config.classifier_optimizer}): {probe.done}/{probe.iterations} "
                        "iterations" + (", converged" if probe.finished and probe.done < probe.iterations else ""))

            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(config.seed)
                probe.fit(after_round)
            weight, bias = probe.folded()
            del probe
            statistics = SplitStatistics(weight, bias, log_q, config.tau)
            for block, block_labels in chunks():
                statistics.update(block, block_labels)
            state.tensors = {k: v for k, v in state.tensors.items() if not k.startswith(("probe.", "solver."))}
            state.tensors.update({"result.weight": weight, "result.bias": bias})
            state.save(phase="done", statistics=statistics.state())
            phase = "done"
        else:
            weight, bias = state.tensors["result.weight"].to(device), state.tensors["result.bias"].to(device)
            statistics = SplitStatistics.from_state(weight, bias, log_q, config.tau, state.header["statistics"])
    finally:
        if rows is not None:
            rows.close()
    if features_path is not None and phase == "done" and os.path.exists(features_path):
        os.unlink(features_path)  # the report is made: the probe's features are no longer needed
    return weight, bias, log_q, statistics


@torch.no_grad()
def split_statistics(encoder, preprocess, source, device, weight, bias, log_q, tau: float) -> SplitStatistics:
    """The report's estimates over a held-out split, its features computed batch by batch (none kept)."""
    statistics = SplitStatistics(weight, bias, log_q, tau)
    encoder.eval()
    for batch, labels, _ in source.batches(even_chunks(len(source), FEATURE_BATCH), device):
        statistics.update(encoder.forward_features(preprocess(batch)).float(), labels.to(device, torch.long))
    return statistics


__all__ = ["SAVE_EVERY_SECONDS", "run_classifier_stage", "split_statistics", "stage_files"]
