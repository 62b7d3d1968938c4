"""SRe2L's FKD relabel stage: every epoch's crops, flips, mixes and teacher soft labels, recorded once.

Layout of ``--relabel-dir DIR`` (created by the run; nothing else is written there):

* ``relabel.json`` -- the :class:`RelabelSpec` the files were made with (teacher file fingerprint and
  architecture, the images' fingerprint, class map, epochs, batch, seed, sizes, crop scale, mixing,
  compression). A rerun with other settings is refused in one line; with the same, it resumes.
* ``epoch_00000.safetensors`` ... -- one file per epoch, each written to a hidden temporary file,
  fsynced and renamed into place when complete (a killed run leaves no partial epoch under the final
  name; the rerun removes its temporaries and makes the missing epochs). Tensors: ``order`` [N]
  int64, ``crops`` [N, 4] int32, ``flips`` [N] uint8, ``patch_perms`` [N, 2, f] (RDED-style patch
  shuffling only), ``mix_partner`` [N] int64, ``mix_boxes`` [B, 4] int32, ``mix_lambda`` [B] float32
  (see :class:`igds_fast.evaluate.kd_augment.EpochDraws`), and the soft labels:

  - full (default, as SRe2L's ``--use-fp16``): ``logits`` [N, C] float16, the teacher's logits of
    the run's classes at each position -- N x C x 2 bytes per epoch, streamed to the file batch by
    batch (memory does not grow with N).
  - ``--soft-label-topk K``: ``topk_logits`` [N, K] float16, ``topk_index`` [N, K] int32 and
    ``log_norm`` [N] float32 = logsumexp(logits / T) of the fp16 logits; the soft label is SRe2L's
    ``keep_top_k`` (validate/utils.py:5-24) of softmax(logits / T): the K largest probabilities
    exactly, the rest of the mass spread evenly over the other C - K classes. It fixes T at relabel
    time (a training T that differs is refused). N x (6 K + 4) bytes per epoch.

The bytes depend only on the spec and the epoch: the draws are keyed by (seed, epoch), the teacher
runs in eval mode on the same batches, the header is written with sorted keys. Under torchrun
epoch e is made by rank e mod W, so the files are the same for any world size.
"""
from __future__ import annotations

import glob
import json
import math
import os
import shutil
import struct
from dataclasses import asdict, dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from igds_fast.errors import IGDSInputError
from igds_fast.evaluate.kd_augment import EpochDraws
from igds_fast.imageio import atomic_file, write_json_atomic
from igds_fast.limits import format_bytes, read_json

FORMAT = "igds-fast-sre2l-relabel"
VERSION = 1
SPEC_FILE = "relabel.json"
EPOCH_DIGITS = 7
_DTYPES = {torch.int64: ("I64", 8), torch.int32: ("I32", 4), torch.uint8: ("U8", 1), torch.float16: ("F16", 2),
           torch.float32: ("F32", 4)}


@dataclass(frozen=True)
class RelabelSpec:
    """What a relabel folder was made with; two runs with equal specs write the same bytes."""

    teacher: dict  # {"arch", "file": file_fingerprint}
    images: str  # FolderImages.fingerprint() of the relabelled set
    count: int
    num_classes: int
    class_map: list[int] | None
    epochs: int
    batch_size: int
    seed: int
    source_side: int
    output_side: int
    crop_scale: list[float]
    crop_ratio: list[float]
    patch_factor: int
    flip: bool
    cutmix_beta: float | None
    topk: int  # 0 = every class's logit
    temperature: float | None  # the T of the top-k soft labels (None with full logits)

    def to_dict(self) -> dict:
        return {"format": FORMAT, "version": VERSION, **asdict(self)}


def epoch_file(folder: str, epoch: int) -> str:
    return os.path.join(folder, f"epoch_{epoch:05d}.safetensors")


def _layout(spec: RelabelSpec) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """The tensors of an epoch file in data order: the small draws first, the soft labels last."""
    n, batches = spec.count, math.ceil(spec.count / spec.batch_size)
    layout = [("crops", torch.int32, (n, 4)), ("flips", torch.uint8, (n,)), ("mix_boxes", torch.int32, (batches, 4)),
              ("mix_lambda", torch.float32, (batches,)), ("mix_partner", torch.int64, (n,)), ("order", torch.int64, (n,))]
    if spec.patch_factor > 1:
        layout.append(("patch_perms", torch.int64, (n, 2, spec.patch_factor)))
    if spec.topk:
        layout += [("log_norm", torch.float32, (n,)), ("topk_index", torch.int32, (n, spec.topk)),
                   ("topk_logits", torch.float16, (n, spec.topk))]
    else:
        layout.append(("logits", torch.float16, (n, spec.num_classes)))
    return layout


def _header(spec: RelabelSpec, epoch: int) -> bytes:
    entries, offset = {}, 0
    for name, dtype, shape in _layout(spec):
        code, size = _DTYPES[dtype]
        nbytes = size * math.prod(shape)
        entries[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    # The epoch at a fixed width: every epoch's header, hence file, has the same size (epoch_bytes).
    entries["__metadata__"] = {"format": FORMAT, "version": str(VERSION), "epoch": f"{epoch:0{EPOCH_DIGITS}d}",
                               "spec": json.dumps(spec.to_dict(), sort_keys=True)}
    text = json.dumps(entries, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # safetensors pads its header with spaces to 8 bytes
    return struct.pack("<Q", len(text)) + text


def epoch_bytes(spec: RelabelSpec) -> int:
    """The exact size of one epoch file (the same for every epoch)."""
    return len(_header(spec, spec.epochs - 1)) + sum(_DTYPES[d][1] * math.prod(s) for _, d, s in _layout(spec))


def describe_storage(spec: RelabelSpec) -> str:
    """`N images x E epochs x C classes x 2 bytes = X` (or the top-k form)."""
    total = epoch_bytes(spec) * spec.epochs
    if spec.topk:
        what = f"{spec.count} images x {spec.epochs} epochs x (top-{spec.topk} fp16 logits + int32 indices)"
    else:
        what = f"{spec.count} images x {spec.epochs} epochs x {spec.num_classes} classes x 2 bytes (fp16 logits)"
    return f"{what} = {format_bytes(total)}"


def _existing_ancestor(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def pending_epochs(folder: str, spec: RelabelSpec) -> list[int]:
    """Epochs without a complete file (a file of the wrong size is not complete)."""
    size = epoch_bytes(spec)
    return [e for e in range(spec.epochs)
            if not (os.path.isfile(epoch_file(folder, e)) and os.path.getsize(epoch_file(folder, e)) == size)]


def prepare_folder(folder: str, spec: RelabelSpec, log: Callable[[str], None] | None = None,
                   write: bool = True) -> list[int]:
    """Check the folder against the spec, print the storage, refuse when the disk cannot hold the rest;
    returns the pending epochs. ``write`` (rank 0 only, before any relabelling): create the folder,
    remove a killed run's temporaries, record the spec."""
    spec_path = os.path.join(folder, SPEC_FILE)
    if os.path.isdir(folder) and os.path.isfile(spec_path):
        recorded = read_json(spec_path, "relabel record")
        if recorded != json.loads(json.dumps(spec.to_dict())):
            differing = sorted(k for k in set(recorded) | set(spec.to_dict())
                               if recorded.get(k) != json.loads(json.dumps(spec.to_dict())).get(k))
            raise IGDSInputError(f"--relabel-dir {folder!r} holds soft labels made with other settings "
                                 f"({', '.join(differing[:4])}); give another --relabel-dir")
    elif os.path.isdir(folder) and any(not name.startswith(".") for name in os.listdir(folder)):
        raise IGDSInputError(f"--relabel-dir {folder!r} is not empty and holds no {SPEC_FILE}: give a new or empty folder")
    pending = pending_epochs(folder, spec) if os.path.isdir(folder) else list(range(spec.epochs))
    need = epoch_bytes(spec) * len(pending)
    free = shutil.disk_usage(_existing_ancestor(folder)).free
    if log is not None:
        log(f"SRe2L relabel: {describe_storage(spec)} in {folder} ({len(pending)} of {spec.epochs} epochs to make: "
            f"{format_bytes(need)}; {format_bytes(free)} free)")
    if need > free:
        raise IGDSInputError(f"--relabel-dir {folder!r}: the soft labels need {format_bytes(need)} more "
                             f"({describe_storage(spec)}) and the disk has {format_bytes(free)} free; free space, "
                             "use another disk, fewer epochs, or --soft-label-topk")
    if not write:
        return pending
    os.makedirs(folder, exist_ok=True)
    for stale in glob.glob(os.path.join(folder, ".epoch_*.safetensors.*.tmp")):  # ours, from a killed run
        os.unlink(stale)
    write_json_atomic(spec_path, spec.to_dict())
    return pending


def draws_tensors(draws: EpochDraws) -> dict[str, torch.Tensor]:
    tensors = {"order": draws.order, "crops": draws.crops, "flips": draws.flips.to(torch.uint8),
               "mix_partner": draws.mix_partner, "mix_boxes": draws.mix_boxes, "mix_lambda": draws.mix_lambda}
    if draws.patch_perms is not None:
        tensors["patch_perms"] = draws.patch_perms
    return tensors


def soft_label_rows(logits: torch.Tensor, spec: RelabelSpec) -> dict[str, torch.Tensor]:
    """The stored form of a batch of teacher logits [b, C] (float32): fp16 logits, or the top-k form."""
    half = logits.to(torch.float16).cpu()
    if not spec.topk:
        return {"logits": half}
    scaled = half.float() / spec.temperature
    values, index = half.float().topk(spec.topk, dim=1)
    return {"topk_logits": values.to(torch.float16), "topk_index": index.to(torch.int32),
            "log_norm": torch.logsumexp(scaled, dim=1)}


def write_epoch(folder: str, spec: RelabelSpec, epoch: int, draws: EpochDraws,
                batches: Iterator[dict[str, torch.Tensor]]) -> None:
    """Write epoch ``epoch`` atomically: the draws, then the soft labels streamed from ``batches``
    (one dict of :func:`soft_label_rows` per batch, in position order)."""
    small = draws_tensors(draws)
    layout = _layout(spec)
    streamed = [name for name, _, _ in layout if name not in small]
    with atomic_file(epoch_file(folder, epoch)) as handle:  # a killed run leaves no partial epoch file
        handle.write(_header(spec, epoch))
        for name, dtype, shape in layout:
            if name in small:
                tensor = small[name].to(dtype).contiguous()
                if tuple(tensor.shape) != shape:
                    raise AssertionError(f"{name}: {tuple(tensor.shape)} != {shape}")
                handle.write(tensor.numpy().tobytes())
        if len(streamed) == 1:  # full logits: straight to the file, batch by batch
            rows = 0
            for batch in batches:
                handle.write(batch[streamed[0]].contiguous().numpy().tobytes())
                handle.flush()  # on disk batch by batch (the temporary file; never the final name)
                rows += batch[streamed[0]].shape[0]
            if rows != spec.count:
                raise AssertionError(f"{rows} soft-label rows for {spec.count} images")
        else:  # top-k: a few bytes per image, gathered then written per tensor
            parts = {name: [] for name in streamed}
            for batch in batches:
                for name in streamed:
                    parts[name].append(batch[name])
            for name in streamed:
                handle.write(torch.cat(parts[name]).contiguous().numpy().tobytes())
        if handle.tell() != epoch_bytes(spec):
            raise AssertionError(f"epoch file of {handle.tell()} bytes, expected {epoch_bytes(spec)}")


class RelabelReader:
    """The recorded epochs of a relabel folder: draws and soft labels, read lazily (memory-mapped)."""

    def __init__(self, folder: str, spec: RelabelSpec):
        self.folder, self.spec = folder, spec
        missing = pending_epochs(folder, spec)
        if missing:
            raise IGDSInputError(f"--relabel-dir {folder!r} lacks epoch(s) {missing[:5]}: rerun to make them")
        self._handle = None
        self._epoch = None

    def _open(self, epoch: int):
        from safetensors import safe_open

        if self._epoch != epoch:
            self._handle = safe_open(epoch_file(self.folder, epoch), framework="pt")
            self._epoch = epoch
        return self._handle

    def draws(self, epoch: int) -> EpochDraws:
        handle = self._open(epoch)
        names = set(handle.keys())
        return EpochDraws(source_side=self.spec.source_side, output_side=self.spec.output_side,
                          batch_size=self.spec.batch_size, order=handle.get_tensor("order"),
                          crops=handle.get_tensor("crops"), flips=handle.get_tensor("flips").bool(),
                          patch_perms=handle.get_tensor("patch_perms") if "patch_perms" in names else None,
                          mix_partner=handle.get_tensor("mix_partner"), mix_boxes=handle.get_tensor("mix_boxes"),
                          mix_lambda=handle.get_tensor("mix_lambda"))

    def soft_targets(self, epoch: int, start: int, stop: int, temperature: float) -> torch.Tensor:
        """softmax(logits / T) of positions [start, stop) as float32 [n, C] (top-k: SRe2L's keep_top_k)."""
        handle = self._open(epoch)
        if not self.spec.topk:
            logits = handle.get_slice("logits")[start:stop].float()
            return F.softmax(logits / temperature, dim=1)
        if temperature != self.spec.temperature:
            raise IGDSInputError(f"these top-{self.spec.topk} soft labels were made at T = {self.spec.temperature:g}; "
                                 f"training asks for T = {temperature:g}")
        values = handle.get_slice("topk_logits")[start:stop].float()
        index = handle.get_slice("topk_index")[start:stop].long()
        log_norm = handle.get_slice("log_norm")[start:stop]
        return keep_top_k_probabilities(values, index, log_norm, temperature, self.spec.num_classes)


def keep_top_k_probabilities(values: torch.Tensor, index: torch.Tensor, log_norm: torch.Tensor, temperature: float,
                             num_classes: int) -> torch.Tensor:
    """SRe2L's keep_top_k of softmax(z / T) from the k largest logits and logsumexp(z / T): [n, C]."""
    top = torch.exp(values / temperature - log_norm[:, None])
    k = values.shape[1]
    rest = (1.0 - top.sum(dim=1, keepdim=True)).clamp_min(0.0) / max(1, num_classes - k)
    out = rest.expand(values.shape[0], num_classes).clone()
    out.scatter_(1, index, top)
    return out


__all__ = ["FORMAT", "RelabelReader", "RelabelSpec", "describe_storage", "epoch_bytes", "epoch_file",
           "keep_top_k_probabilities", "pending_epochs", "prepare_folder", "soft_label_rows", "write_epoch"]
