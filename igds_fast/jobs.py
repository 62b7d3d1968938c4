"""The work list of a distillation run: which samples to generate, with which seeds, in which batches.

Vocabulary:
  * an *output image* is one file `OUT/<class folder>/<index:05d>.png`; there are exactly IPC per class;
  * a *sample* is one image drawn from the sampler. With composites (IGDS_SPEC section 5) an output
    image is a 2x2 grid of `composite = 4` samples of its class, each at half the side; otherwise it
    is one sample (`composite = 1`).

Sample `slot` of output image `index` has the generated index `index * composite + slot` and the seed
`image_seed(global_seed, class_key, generated_index)`, so a sample's pixels depend only on
(global seed, class key, generated index, settings) -- never on the batch it ran in, the batch size,
the set of other classes selected, or the point a run was resumed from.

Batches hold whole output images (the file is written when its batch finishes), interleaving
classes: jobs are ordered image index first, class second, so a batch spans many classes and an
interrupted run has made even progress over the classes. A run resumes by skipping the output images
whose file exists (files are only ever created by an atomic rename, so an existing file is complete).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

from .errors import IGDSInputError
from .limits import class_name_problem
from .seeding import image_seed

COMPOSITE_SIZES = (1, 4)
IMAGE_SUFFIX = ".png"


@dataclass(frozen=True)
class Sample:
    """One draw from the sampler: VE label, prior-independent seed, and where it goes."""

    label: int  # position of the class in the VE's class list (the guidance label)
    class_key: str  # wnid or class name: keys the seed, so a class keeps its samples across selections
    image_index: int  # output image this sample belongs to
    slot: int  # 0 .. composite-1, row-major position in the composite
    generated_index: int  # image_index * composite + slot
    seed: int


@dataclass(frozen=True)
class ImageJob:
    """One output image: its file (relative to OUT) and the samples it is made of (in slot order)."""

    label: int
    class_key: str
    folder: str
    image_index: int
    samples: tuple[Sample, ...]

    @property
    def relative_path(self) -> str:
        return os.path.join(self.folder, image_file_name(self.image_index))


def image_file_name(index: int) -> str:
    """`00007.png`: five digits, zero-padded, so names sort in index order up to 99,999 per class."""
    return f"{index:05d}{IMAGE_SUFFIX}"


def check_positive_int(value, what: str) -> int:
    """`value` as an int, or a one-line IGDSInputError when it is not a positive integer."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise IGDSInputError(f"{what} must be a positive integer, got {value!r}")
    return value


def check_folder_name(name: str) -> str:
    """A class key usable as one folder name: limits.class_name_problem's rule (at most 128 bytes of UTF-8,
    no separators, not '.' / '..', not hidden, not empty, no control or invisible formatting characters)."""
    problem = class_name_problem(name)
    if problem is not None:
        shown = ascii(name) if isinstance(name, str) else repr(name)
        shown = shown if len(shown) <= 80 else shown[:60] + "..." + shown[-10:]
        raise IGDSInputError(f"class {shown} cannot be used as an output folder name: {problem}")
    return name


def build_jobs(
    class_keys: Sequence[str],
    labels: Sequence[int],
    ipc: int,
    global_seed: int,
    composite: int = 1,
) -> list[ImageJob]:
    """Every output image of a run, ordered image index first, then class (as given).

    class_keys: the class of each selected class (wnid or name; also its output folder name);
    labels: its VE label. ipc: output images per class; composite: samples per output image (1 or 4).
    """
    check_positive_int(ipc, "IPC")
    if composite not in COMPOSITE_SIZES:
        raise IGDSInputError(f"composite must be one of {COMPOSITE_SIZES}, got {composite!r}")
    class_keys = [check_folder_name(key) for key in class_keys]
    labels = [int(label) for label in labels]
    if not class_keys:
        raise IGDSInputError("no classes selected")
    if len(labels) != len(class_keys):
        raise IGDSInputError(f"{len(class_keys)} classes but {len(labels)} labels")
    if len(set(class_keys)) != len(class_keys):
        raise IGDSInputError("a class is selected twice")
    jobs = []
    for index in range(ipc):
        for key, label in zip(class_keys, labels):
            samples = tuple(
                Sample(
                    label=label,
                    class_key=key,
                    image_index=index,
                    slot=slot,
                    generated_index=index * composite + slot,
                    seed=image_seed(global_seed, key, index * composite + slot),
                )
                for slot in range(composite)
            )
            jobs.append(ImageJob(label=label, class_key=key, folder=key, image_index=index, samples=samples))
    return jobs


def is_done(job: ImageJob, out_dir: str | os.PathLike) -> bool:
    """Whether the job's file exists (complete by construction: files appear only by atomic rename)."""
    return os.path.isfile(os.path.join(os.fspath(out_dir), job.relative_path))


def pending_jobs(jobs: Iterable[ImageJob], out_dir: str | os.PathLike) -> list[ImageJob]:
    """The jobs whose output file does not exist yet, in their original order."""
    return [job for job in jobs if not is_done(job, out_dir)]


def batch_jobs(jobs: Sequence[ImageJob], batch_size: int) -> Iterator[list[ImageJob]]:
    """Consecutive groups of whole output images with at most `batch_size` samples each.

    `batch_size` counts samples (what one sampler call holds); it must fit one output image, i.e.
    be at least the composite size.
    """
    check_positive_int(batch_size, "batch size")
    if not jobs:
        return
    per_image = len(jobs[0].samples)
    if batch_size < per_image:
        raise IGDSInputError(
            f"batch size {batch_size} cannot hold one composite image ({per_image} samples); use >= {per_image}"
        )
    images_per_batch = batch_size // per_image
    for start in range(0, len(jobs), images_per_batch):
        yield list(jobs[start : start + images_per_batch])


def batch_samples(batch: Sequence[ImageJob]) -> list[Sample]:
    """The samples of a batch of output images, flattened in job-then-slot order."""
    return [sample for job in batch for sample in job.samples]
