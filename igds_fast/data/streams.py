"""Labelled image sets behind one batch interface: `FolderImages` (an ImageFolder or a path list, streamed by
DataLoader workers or held in memory below IGDS_IN_MEMORY_MB) and `TensorImages` (tensors already in memory).
"""
from __future__ import annotations

import hashlib
import math
import os
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch

from ..errors import IGDSInputError
from .folders import LoadReport, check_load_arguments, try_load_image, load_image_folder, scan_image_folder, uint8_to_unit_range

IN_MEMORY_ENV = "IGDS_IN_MEMORY_MB"
DEFAULT_IN_MEMORY_MB = 256.0
DATA_WORKERS_ENV = "IGDS_DATA_WORKERS"

def in_memory_limit_bytes() -> int:
    """Decoded uint8 bytes (N x C x S x S) up to which a folder is held in memory (``IGDS_IN_MEMORY_MB``)."""
    text = os.environ.get(IN_MEMORY_ENV, "").strip()
    if not text:
        return int(DEFAULT_IN_MEMORY_MB * 2**20)
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not math.isfinite(value) or value < 0:
        raise IGDSInputError(f"{IN_MEMORY_ENV} must be a non-negative number of MiB (0 = always stream), got {text!r}")
    return int(value * 2**20)


def default_num_workers() -> int:
    """DataLoader worker processes: ``IGDS_DATA_WORKERS`` if set (0 = decode in this process), else min(8, CPUs)."""
    text = os.environ.get(DATA_WORKERS_ENV, "").strip()
    if not text:
        return min(8, os.cpu_count() or 1)
    if not text.isdigit():
        raise IGDSInputError(f"{DATA_WORKERS_ENV} must be a non-negative integer, got {text!r}")
    return int(text)


class _DecodeDataset(torch.utils.data.Dataset):
    """Item i: (i, uint8 [C, S, S] array or None, failure reason or None, per-channel sum, sum of squares).

    Runs in the DataLoader workers: decode, convert, resize + crop, and (with ``with_stats``) the
    exact integer pixel sums the training statistics need, so the main process only collates.
    """

    def __init__(self, paths: Sequence[str], image_size: int, channels: int, with_stats: bool = False,
                 resize: int | None = None):
        self.resize = resize
        self.paths = list(paths)
        self.image_size = image_size
        self.channels = channels
        self.with_stats = with_stats

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        result = try_load_image((self.paths[index], self.image_size, self.channels, self.resize))
        if isinstance(result, BaseException):
            return index, None, " ".join(str(result).split()) or type(result).__name__, None, None
        sums = squares = None
        if self.with_stats:
            sums = result.sum(axis=(1, 2), dtype=np.int64)
            wide = result.astype(np.uint16)  # 255^2 fits 16 bits; summed in 64
            wide *= wide
            squares = wide.sum(axis=(1, 2), dtype=np.int64)
        return index, result, None, sums, squares


class _Collate:
    """Stack the readable items of a batch; failures and the summed statistics travel alongside."""

    def __init__(self, channels: int, image_size: int):
        self.shape = (channels, image_size, image_size)

    def __call__(self, items):
        indices = [item[0] for item in items if item[1] is not None]
        arrays = [item[1] for item in items if item[1] is not None]
        images = torch.from_numpy(np.stack(arrays)) if arrays else torch.empty((0, *self.shape), dtype=torch.uint8)
        failures = [(item[0], item[2]) for item in items if item[1] is None]
        sums = [item[3] for item in items if item[3] is not None]
        squares = [item[4] for item in items if item[4] is not None]
        total = torch.from_numpy(np.sum(sums, axis=0)) if sums else torch.zeros(self.shape[0], dtype=torch.int64)
        total_sq = torch.from_numpy(np.sum(squares, axis=0)) if squares else torch.zeros(self.shape[0], dtype=torch.int64)
        return torch.tensor(indices, dtype=torch.int64), images, failures, total, total_sq


def _index_list(index) -> list[int]:
    if isinstance(index, slice):
        return list(range(*index.indices(index.stop)))
    if isinstance(index, torch.Tensor):
        return index.tolist()
    return [int(i) for i in index]


_SCAN_BATCH = 64  # images per DataLoader batch of the verification pass


class FolderImages:
    """An ImageFolder as labelled uint8 images, streamed from disk or (small sets) held in memory.

    Construction scans the tree (structure errors first, as :func:`load_image_folder`) and then
    makes one decoding pass that finds unreadable files (``on_corrupt``: "skip" drops and counts
    them, "fail" raises naming the first) and sums the pixels for :meth:`image_statistics`; nothing
    of size N x image is kept unless the set is held in memory: ``in_memory`` None decides by
    ``IGDS_IN_MEMORY_MB`` (N x C x S x S uint8 bytes <= the cap), True / False force it.

    Afterwards: ``len(self)`` readable images, ordered by class then file name; ``labels`` int64
    [N] (CPU); ``class_names``; ``report`` (:class:`LoadReport`); :meth:`batches` yields
    (float32 [B, C, S, S] in [-1, 1] on the device, labels [B] on the device, indices [B] CPU) for
    any index lists, decoded by ``num_workers`` DataLoader processes (pinned memory on CUDA) and
    converted to float on the device. Held and streamed sets give the same batches bit for bit.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        image_size: int,
        channels: int = 3,
        on_corrupt: str = "skip",
        class_names: Sequence[str] | None = None,
        ignore_unlisted: bool = False,
        num_workers: int | None = None,
        in_memory: bool | None = None,
        progress: bool = False,
        resize: int | None = None,
    ):
        check_load_arguments(image_size, channels, on_corrupt)
        self.resize = resize
        self.num_workers = self._resolve_num_workers(num_workers)
        self.root = os.fspath(root)
        self.image_size = image_size
        self.channels = channels
        names, paths_per_class = scan_image_folder(root, class_names, ignore_unlisted)
        self.class_names = list(names)
        all_paths = [path for paths in paths_per_class for path in paths]
        all_labels = [label for label, paths in enumerate(paths_per_class) for _ in paths]
        decoded_bytes = len(all_paths) * channels * image_size * image_size
        self.in_memory = decoded_bytes <= in_memory_limit_bytes() if in_memory is None else bool(in_memory)
        self._images: torch.Tensor | None = None
        if self.in_memory:
            images, labels, _, report = load_image_folder(
                root, image_size, channels=channels, on_corrupt=on_corrupt, class_names=names, as_uint8=True,
                num_workers=max(1, self.num_workers), ignore_unlisted=ignore_unlisted, resize=resize,
            )
            skipped = set(report.skipped_paths)
            self.paths = [path for path in all_paths if path not in skipped]
            self._images, self.labels, self.report = images, labels, report
            self._sums = images.sum(dim=(0, 2, 3), dtype=torch.int64)
            self._squares = torch.zeros(channels, dtype=torch.int64)
            for start in range(0, images.shape[0], _SCAN_BATCH):
                chunk = images[start:start + _SCAN_BATCH].to(torch.int64)
                self._squares += (chunk * chunk).sum(dim=(0, 2, 3))
        else:
            self._scan(all_paths, all_labels, on_corrupt, progress)

    # False only for a path list built with from_paths(verify=False): no decoding pass ran.
    verified = True
    # Resize the shorter side to this before the centre crop to image_size (None: to image_size itself).
    resize: int | None = None

    @staticmethod
    def _resolve_num_workers(num_workers) -> int:
        if num_workers is not None and (not isinstance(num_workers, int) or isinstance(num_workers, bool) or num_workers < 0):
            raise IGDSInputError(f"num_workers must be a non-negative integer, got {num_workers!r}")
        return default_num_workers() if num_workers is None else num_workers

    @classmethod
    def from_paths(
        cls,
        paths: Sequence[str | os.PathLike],
        labels: Sequence[int] | torch.Tensor,
        class_names: Sequence[str],
        image_size: int,
        channels: int = 3,
        on_corrupt: str = "skip",
        root: str | os.PathLike | None = None,
        num_workers: int | None = None,
        in_memory: bool | None = None,
        verify: bool = True,
        progress: bool = False,
        resize: int | None = None,
    ) -> "FolderImages":
        """The images of an explicit path list (e.g. a chosen subset of a folder), in the list's order.

        ``labels[i]``: position of image i's class in ``class_names`` (every class needs an image).
        Only these files are decoded, with the folder constructor's decode, ``on_corrupt``, held or
        streamed choice and batches: the same files give the same batches bit for bit. ``root``
        (default: the folder holding every path) names the set in messages and anchors
        :meth:`fingerprint`'s relative paths. ``verify=False`` (with on_corrupt="fail") skips a
        streamed set's decoding pass, for a caller that reads each image once anyway: a file is
        first decoded when a batch needs it, an unreadable one raising then, and
        :meth:`image_statistics` is unavailable. A held set is decoded at construction either way.
        """
        check_load_arguments(image_size, channels, on_corrupt)
        if not verify and on_corrupt != "fail":
            raise IGDSInputError("verify=False needs on_corrupt='fail' (only a decoding pass can skip a file)")
        paths = [os.fspath(path) for path in paths]
        if not paths:
            raise IGDSInputError("the path list is empty")
        names = [str(name) for name in class_names]
        if len(set(names)) != len(names):
            raise IGDSInputError("the given class order lists a class twice")
        try:
            labels = torch.as_tensor(labels)
        except (TypeError, ValueError, RuntimeError):
            raise IGDSInputError("labels must be integers [N], one per path") from None
        if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool or labels.ndim != 1:
            raise IGDSInputError("labels must be integers [N], one per path")
        if labels.numel() != len(paths):
            raise IGDSInputError(f"{len(paths)} paths but {labels.numel()} labels")
        if int(labels.min()) < 0 or int(labels.max()) >= len(names):
            raise IGDSInputError(f"labels must lie in [0, {len(names)}) (positions in class_names)")
        self = cls.__new__(cls)
        self.resize = resize
        self.num_workers = cls._resolve_num_workers(num_workers)
        self.root = os.fspath(root) if root is not None else os.path.commonpath(
            [os.path.dirname(os.path.abspath(path)) for path in paths])
        self.image_size, self.channels, self.class_names = image_size, channels, names
        decoded_bytes = len(paths) * channels * image_size * image_size
        self.in_memory = decoded_bytes <= in_memory_limit_bytes() if in_memory is None else bool(in_memory)
        self._images = None
        if self.in_memory or verify:
            self._scan(paths, labels.tolist(), on_corrupt, progress, hold=self.in_memory)
        else:
            self.verified = False
            self._sums = self._squares = None
            self._keep(paths, labels.tolist(), skipped=[])
        return self

    def _scan(self, all_paths, all_labels, on_corrupt, progress, hold: bool = False) -> None:
        """The decoding pass: unreadable files found, pixel sums taken; with `hold` the images kept too."""
        from ..progress import Progress

        dataset = _DecodeDataset(all_paths, self.image_size, self.channels, with_stats=True, resize=self.resize)
        order = [list(range(start, min(start + _SCAN_BATCH, len(all_paths))))
                 for start in range(0, len(all_paths), _SCAN_BATCH)]
        readable = np.ones(len(all_paths), dtype=bool)
        skipped = []
        held = torch.empty((len(all_paths), self.channels, self.image_size, self.image_size), dtype=torch.uint8) if hold else None
        self._sums = torch.zeros(self.channels, dtype=torch.int64)
        self._squares = torch.zeros(self.channels, dtype=torch.int64)
        bar = Progress(total=len(all_paths), unit="img", label=f"scan {self.root}", enabled=progress)
        for indices, images, failures, sums, squares in self._loader(dataset, order, pin_memory=False):
            for index, reason in failures:
                if on_corrupt == "fail":
                    raise IGDSInputError(f"corrupt image {all_paths[index]!r}: {reason}")
                readable[index] = False
                skipped.append(all_paths[index])
            if held is not None:
                held[indices] = images
            self._sums += sums
            self._squares += squares
            bar.update(images.shape[0] + len(failures))
        bar.close()
        if held is not None:
            self._images = held if readable.all() else held[torch.from_numpy(readable)]
        self._keep([path for path, ok in zip(all_paths, readable) if ok],
                   [label for label, ok in zip(all_labels, readable) if ok], skipped)

    def _keep(self, paths: list[str], labels: list[int], skipped: list[str]) -> None:
        """The readable images' paths, labels and report; a class left without an image is an error."""
        counts = {name: 0 for name in self.class_names}
        for label in labels:
            counts[self.class_names[label]] += 1
        for name, count in counts.items():
            if count == 0:
                raise IGDSInputError(f"class {name!r} in {self.root!r} has no readable images")
        self.paths = paths
        self.labels = torch.tensor(labels, dtype=torch.int64)
        self.report = LoadReport(root=self.root, class_names=list(self.class_names), images_per_class=counts,
                                 num_loaded=len(labels), num_skipped_corrupt=len(skipped), skipped_paths=skipped)

    def _loader(self, dataset, index_lists, pin_memory: bool):
        # One batch (a gathered subset) decodes here: starting worker processes would cost more.
        workers = self.num_workers if len(index_lists) > 1 else 0
        return torch.utils.data.DataLoader(
            dataset, batch_sampler=index_lists, num_workers=workers, collate_fn=_Collate(self.channels, self.image_size),
            pin_memory=pin_memory, prefetch_factor=2 if workers > 0 else None,
        )

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """[N, C, S, S] of the readable images (as a tensor of the whole set would have)."""
        return (len(self.paths), self.channels, self.image_size, self.image_size)

    def uint8_batches(self, index_lists: Iterable, pin_memory: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(images uint8 [B, C, S, S] CPU, labels int64 [B], indices int64 [B]) per index list (ints, tensor or slice)."""
        lists = [_index_list(index) for index in index_lists]
        if self._images is not None:
            for index in lists:
                index_t = torch.tensor(index, dtype=torch.int64)
                images = self._images[index_t]
                yield (images.pin_memory() if pin_memory else images), self.labels[index_t], index_t
            return
        dataset = _DecodeDataset(self.paths, self.image_size, self.channels, resize=self.resize)
        for indices, images, failures, _, _ in self._loader(dataset, lists, pin_memory):
            if failures:
                index, reason = failures[0]
                if not self.verified:
                    raise IGDSInputError(f"unreadable image {self.paths[index]!r}: {reason}")
                raise IGDSInputError(f"image {self.paths[index]!r} became unreadable after the scan: {reason}")
            yield images, self.labels[indices], indices

    def batches(self, index_lists: Iterable, device) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(float32 images [B, C, S, S] in [-1, 1] on `device`, labels [B] on `device`, indices [B] CPU)."""
        device = torch.device(device)
        pin = device.type == "cuda"
        for images, labels, indices in self.uint8_batches(index_lists, pin_memory=pin):
            yield uint8_to_unit_range(images.to(device, non_blocking=pin)), labels.to(device), indices

    def gather(self, indices) -> torch.Tensor:
        """float32 [k, C, S, S] in [-1, 1] (CPU) of the images at `indices` (a distilled-sized subset)."""
        index = _index_list(indices)
        if not index:
            return torch.empty((0, self.channels, self.image_size, self.image_size))
        (images, _, _), = list(self.uint8_batches([index]))
        return uint8_to_unit_range(images)

    def as_uint8_tensor(self) -> torch.Tensor:
        """The whole set as held: uint8 [N, C, S, S] in [0, 255]; only for a set held in memory."""
        if self._images is None:
            raise IGDSInputError(f"{self.root!r} is streamed, not held in memory (raise {IN_MEMORY_ENV} to hold it)")
        return self._images

    def as_float_tensor(self) -> torch.Tensor:
        """The whole set as float32 [N, C, S, S] in [-1, 1]; only for a set held in memory."""
        if self._images is None:
            raise IGDSInputError(f"{self.root!r} is streamed, not held in memory (raise {IN_MEMORY_ENV} to hold it)")
        return uint8_to_unit_range(self._images)

    def image_statistics(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel mean and population std in [0, 1] units (pixel / 255), exact from integer sums."""
        from fractions import Fraction

        if self._sums is None:
            raise IGDSInputError("no pixel statistics: this set was built with verify=False (no decoding pass)")
        count = len(self.paths) * self.image_size * self.image_size
        means, stds = [], []
        for total, squares in zip(self._sums.tolist(), self._squares.tolist()):
            means.append(float(Fraction(total, 255 * count)))
            stds.append(math.sqrt(Fraction(count * squares - total * total, (255 * count) ** 2)))
        if min(stds) <= 1e-6:
            raise IGDSInputError("the training images have a constant channel (std 0): give mean/std explicitly")
        return tuple(means), tuple(stds)

    def fingerprint(self) -> str:
        """sha256 of the image list (paths relative to the root, labels) and the decoding settings."""
        size = self.image_size if self.resize is None else f"{self.resize}/{self.image_size}"
        digest = hashlib.sha256(f"{size}:{self.channels}:{self.class_names!r}".encode())
        for path, label in zip(self.paths, self.labels.tolist()):
            # The name's bytes on disk (os.fsencode): a file name in another encoding than UTF-8 is hashed
            # as it is (UTF-8 names give the bytes they always gave).
            digest.update(b"\n" + os.fsencode(os.path.relpath(path, self.root)) + f"\t{label}".encode())
        return digest.hexdigest()


class TensorImages:
    """Images already in memory, float [N, C, H, W] in [-1, 1] + labels [N], with FolderImages's interface.

    ``batches`` yields ``images[index].to(device)`` (the dtype as given); for index tensors the
    whole set is moved to the device once (what the in-memory training loops always did).
    """

    in_memory = True

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images = images
        self.labels = labels
        self._device_copy: tuple[torch.device, torch.Tensor, torch.Tensor] | None = None

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.images.shape)

    @property
    def channels(self) -> int:
        return int(self.images.shape[1])

    def _on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self._device_copy is None or self._device_copy[0] != device:
            self._device_copy = (device, self.images.to(device), self.labels.to(device))
        return self._device_copy[1], self._device_copy[2]

    def batches(self, index_lists: Iterable, device) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        device = torch.device(device)
        for index in index_lists:
            if isinstance(index, slice):
                yield (self.images[index].to(device), self.labels[index].to(device),
                       torch.arange(*index.indices(len(self))))
                continue
            images, labels = self._on(device)
            index = torch.as_tensor(index, device=device)
            yield images[index], labels[index], index

    def gather(self, indices) -> torch.Tensor:
        return self.images[torch.as_tensor(indices, dtype=torch.long)]

    def fingerprint(self) -> str:
        digest = hashlib.sha256(str((tuple(self.images.shape), str(self.images.dtype))).encode())
        digest.update(self.images.detach().cpu().contiguous().numpy().tobytes())
        digest.update(self.labels.detach().cpu().to(torch.int64).contiguous().numpy().tobytes())
        return digest.hexdigest()
