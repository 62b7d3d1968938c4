"""`distill --select s3`: sample G x IPC candidates per class, keep the best subgroup of IPC per class (S³).

    CAND/<class>/<k:05d>.png                  G x IPC candidates per class: an ordinary distill folder
    CAND/.s3/state.json                       what the stage files below were computed from
    CAND/.s3/features/<b:06d>.safetensors     L2-normalised features of candidate batch b
    CAND/.s3/real_centroids.safetensors       r_i [C, d] (real_partial.safetensors while streaming)
    CAND/.s3/selection.json                   the chosen subgroup per class, both objective terms
    OUT/<class>/<j:05d>.png                   the chosen subgroup's IPC images (copied bytes)
    OUT/manifest.json, OUT/preview.png, OUT/.igds_config.json   as for a plain run

CAND is --candidates, else OUT + ".s3-candidates" beside OUT (never inside it: an ImageFolder
reader of OUT would take it for a class).

Candidates: `distill()` itself, with IPC' = G x IPC and the beta of the *target* IPC (a beta table is
read at IPC, not at G x IPC), so sampling, composites, resume and torchrun sharding are the plain
run's. Candidate k of class c has the seeds of output image k of a plain run with the same global
seed (`jobs.build_jobs`: image_seed(seed, class, k * composite + slot)); subgroup g of class c is
candidates [g * IPC, (g + 1) * IPC), so subgroup 0 holds the seeds of the plain run's images.

Then, on rank 0 only (the other ranks return after their share of the candidates; distill() has
already closed the process group, so no collective is left to hang):

1. features: the candidate PNGs (what the output will hold, not the float samples) decoded in fixed
   batches of FEATURE_BATCH images of the class-major list, phi(x) = normalize(encoder(x)); each batch
   saved as one safetensors file, atomically: a rerun skips the batches already saved, and the fixed
   batches make a resumed run's features the uninterrupted run's bit for bit.
   Encoder: `models.feature_encoder` (the VE's own, or a torchvision-layout ResNet-18/50 checkpoint:
   `--select-encoder`). Images are read through `data.FolderImages` (a path list in the batches'
   order), decoded in DataLoader workers, uint8 until the device.
2. real centroids: up to N real images per class (`select_real_indices`, seed REAL_SEED), from
   `--real DIR` (listed without decoding; only the chosen files decoded, as a `data.FolderImages`
   path list, resized and centre-cropped to the candidates' side) or an in-memory set (the digits
   demo's training split); streamed through `ClassCentroidAccumulator` ([C, d] sums only), with a
   checkpoint every REAL_CHECKPOINT_BATCHES batches.
3. selection: `subgroup_centroids` per class from the saved features ([C, G, d] in memory, never all
   features), then `s3_search_centroids`; saved as JSON, atomically.
4. output: the chosen subgroup's PNGs copied into OUT/<class>/<j>.png (atomic; a rerun skips files
   already holding the right bytes), the preview, then the manifest (G, alpha, beta, eps,
   max_passes, encoder, real images, chosen subgroup per class, own and pair terms, objective,
   start, passes).

Every stage file carries the key of what it was computed from (the candidates' pixel settings, the
encoder, the real images, the S3 settings); a stage whose key differs is recomputed. Because OUT's
settings file includes all of them, OUT is refused (or, with --force, cleared) when any differs.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch

from ..artifacts import read_safetensors
from ..data import FolderImages, scan_image_folder
from ..distributed import QuietRankError, launched_by_torchrun
from ..errors import IGDSInputError
from ..imageio import write_bytes_atomic, write_json_atomic
from ..jobs import ImageJob, image_file_name
from ..limits import check_work_cap
from ..locks import hold_folder
from ..models.feature_encoder import FeatureEncoder, load_feature_encoder
from ..select import ClassCentroidAccumulator, S3Config, s3_search_centroids, select_real_indices, subgroup_centroids
from .config import DistillConfig
from .cost import cost_lines, selection_cost
from .folder import MANIFEST_NAME, output_check, prepare_output, write_preview
from .owned import FEATURES_DIR, STAGE_DIR, STAGE_FILES, temp_of
from .manifest import build_manifest
from ..settings import replace as replace_settings
from .plan import Plan, candidates_folder, check_selection_paths, plan_distill, run_beta
from .run import distill

STATE_NAME, REAL_NAME, REAL_PARTIAL_NAME, SELECTION_NAME = STAGE_FILES  # in CAND/.s3 (names: owned.py)
FEATURE_BATCH = 128  # candidate images per feature batch (fixed: the batches are the resume unit)
REAL_BATCH = 128
REAL_CHECKPOINT_BATCHES = 20
REAL_SEED = 0  # select_real_indices' seed: which real images make the centroids
REAL_CHECK_SIZE = 8  # side of the check decode before sampling (the decode is the check; the size is not)
STAGE_FORMAT = "igds_s3_stage"
STAGE_METADATA_KEY = "igds_s3_stage"


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _key_hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode("utf-8")).hexdigest()


# ---- the real images ----------------------------------------------------------------------------
# Both kinds: `description` (what OUT's settings and the manifest record), `chosen` [M] (the chosen
# images' indices in the source, in centroid order) and `open(image_size, channels)` (the source:
# `.batches(index_lists, device)` -> float images in [-1, 1], labels = positions in the class list).


class RealFolder:
    """The real images of `--real DIR` the centroids use: listed without decoding, then subsampled.

    labels [M]: position of each chosen image's class in the run's class list; `paths` [M].
    """

    def __init__(self, root: str, class_keys: list[str], per_class: int):
        _, paths_per_class = scan_image_folder(root, class_keys, ignore_unlisted=True)
        all_paths = [path for paths in paths_per_class for path in paths]
        labels = torch.tensor([label for label, paths in enumerate(paths_per_class) for _ in paths], dtype=torch.int64)
        chosen = select_real_indices(labels, len(class_keys), per_class, REAL_SEED).tolist()
        self.root = os.path.abspath(root)
        self.class_keys = list(class_keys)
        self.paths = [all_paths[i] for i in chosen]
        self.labels = labels[chosen]
        self.chosen = torch.arange(len(self.paths))  # the source opened below holds the chosen files only
        digest = hashlib.sha256()
        for path, label in zip(self.paths, self.labels.tolist()):
            digest.update(os.fsencode(os.path.relpath(path, root)) + f"\t{label}\n".encode())  # names in any encoding
        self.description = {"kind": "folder", "images": len(self.paths), "chosen_sha256": digest.hexdigest()}
        self.skipped: list[str] = []

    def check(self, on_corrupt: str, progress: bool = False) -> None:
        """Decode every chosen image once, before sampling: an unreadable one (corrupt, truncated, over
        PIL's decompression-bomb limit, an unsupported format) stops the run naming it (on_corrupt
        "fail") or is left out of its class's centroid and counted ("skip"; a class left without a
        readable image is refused). The description keeps naming the chosen list: what is skipped
        depends only on those files, and every rank computes the same settings without decoding.
        """
        checked = FolderImages.from_paths(self.paths, self.labels, self.class_keys, REAL_CHECK_SIZE, channels=3,
                                          on_corrupt=on_corrupt, root=self.root, in_memory=False, verify=True,
                                          progress=progress)
        skipped = set(checked.report.skipped_paths)
        if skipped:
            keep = [i for i, path in enumerate(self.paths) if path not in skipped]
            self.skipped = [path for path in self.paths if path in skipped]
            self.paths = [self.paths[i] for i in keep]
            self.labels = self.labels[keep]
            self.chosen = torch.arange(len(self.paths))

    def open(self, image_size: int, channels: int) -> FolderImages:
        # verify=False: every chosen image is decoded once, by the batch that needs it (or held when small).
        return FolderImages.from_paths(self.paths, self.labels, self.class_keys, image_size, channels=channels,
                                       on_corrupt="fail", root=self.root, verify=False)


class RealInMemory:
    """Real images already in memory (a `data.TensorImages`: float [N, c, H, W] in [-1, 1], labels [N] =
    position of the class in the run's class list), subsampled with `select_real_indices`."""

    def __init__(self, source, num_classes: int, per_class: int):
        labels = torch.as_tensor(source.labels).to("cpu", torch.int64)
        if labels.ndim != 1 or labels.numel() != len(source):
            raise IGDSInputError("the real images' labels must be [N], one per image")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
            raise IGDSInputError(f"the real images' labels must lie in [0, {num_classes}) (positions in the class list)")
        missing = (torch.bincount(labels, minlength=num_classes) == 0).nonzero().flatten().tolist()
        if missing:
            raise IGDSInputError(f"the real images hold no image of class position {missing[0]} ({len(missing)} such)")
        self.source = source
        self.chosen = select_real_indices(labels, num_classes, per_class, REAL_SEED)
        self.description = {"kind": "in-memory", "images": int(self.chosen.numel()), "sha256": source.fingerprint()}
        self.skipped: list[str] = []

    def check(self, on_corrupt: str, progress: bool = False) -> None:
        """Nothing to check: the images are decoded already."""

    def open(self, image_size: int, channels: int):
        return self.source  # decoded already: used as given (nothing to resize)


# ---- the plan -------------------------------------------------------------------------------------


@dataclass
class SelectionPlan:
    """A validated --select s3 run (nothing sampled yet)."""

    config: DistillConfig
    s3: S3Config
    candidates: str
    candidate_config: DistillConfig
    candidate_plan: Plan
    beta_source: str
    encoder: FeatureEncoder
    real: object  # RealFolder | RealInMemory
    out_settings: dict  # OUT/.igds_config.json


def plan_selection(config: DistillConfig, real_images=None) -> SelectionPlan:
    """Every check of a --select s3 run, before any sampling (one-line IGDSInputError)."""
    s3 = check_selection_paths(config)
    if s3 is None:
        raise IGDSInputError("plan_selection needs a --select run")
    selection = config.selection
    if selection.real is None and real_images is None:
        raise IGDSInputError("--select s3 needs --real DIR (real training images of the classes): the real "
                             "centroids are mean encoder features of real images, which the VE bundle does not hold")
    if selection.real is not None and real_images is not None:
        raise IGDSInputError("give --real DIR or in-memory real images, not both")
    if os.path.exists(config.run.out) and not os.path.isdir(config.run.out):
        raise IGDSInputError(f"output path {config.run.out!r} exists and is not a folder")
    # G x IPC candidates per class, bounded before anything is planned or sampled (distill/work.py).
    check_work_cap("images per class", s3.groups * config.job.ipc, f"--ipc {config.job.ipc:,} x --groups {s3.groups:,}",
                   config.run.allow_large)
    beta, beta_source = run_beta(config)  # at the target IPC, not at G x IPC
    candidates = candidates_folder(config)
    # The candidates: a plain run of G x IPC images per class with the target IPC's beta.
    candidate_config = dataclasses.replace(
        replace_settings(config, out=candidates, ipc=s3.groups * config.job.ipc, beta=beta, beta_table=None),
        selection=None)
    candidate_plan = plan_distill(candidate_config)
    encoder = load_feature_encoder(selection.encoder, candidate_plan.ve)
    if real_images is not None:
        real = RealInMemory(real_images, len(candidate_plan.class_keys), s3.real_per_class)
    else:
        real = RealFolder(selection.real, candidate_plan.class_keys, s3.real_per_class)
    out_settings = {
        **candidate_plan.pixel_settings,
        "ipc": config.job.ipc,
        "select": {"method": selection.method, **s3.to_dict(), "real_seed": REAL_SEED, "encoder": encoder.description,
                   "real": real.description, "feature_batch": FEATURE_BATCH},
    }
    return SelectionPlan(config, s3, candidates, candidate_config, candidate_plan, beta_source, encoder, real,
                         out_settings)


# ---- the run --------------------------------------------------------------------------------------


def distill_with_selection(config: DistillConfig, log: Callable[[str], None] = _stderr, real_images=None) -> dict:
    """Run (or resume) a distillation; with config.selection the S³ stages around `distill()`.

    real_images: an in-memory real set (`data.TensorImages`, labels = positions in the run's class
    list) instead of config.selection.real. Returns the manifest (written to OUT/manifest.json); a non-zero
    torchrun rank returns its candidates share's run record (no "images").
    """
    if config.selection is None:
        if real_images is not None:
            raise IGDSInputError("real images apply to --select s3 only")
        return distill(config, log=log)
    started = time.perf_counter()
    quiet_rank = launched_by_torchrun() and os.environ.get("RANK", "0") != "0"
    with contextlib.ExitStack() as held:
        try:
            plan = plan_selection(config, real_images)
            if not quiet_rank:  # one writer per folder: both locked before their contents are checked
                held.enter_context(hold_folder(config.run.out, "--out", log))
                held.enter_context(hold_folder(plan.candidates, "--candidates", log))
            # What --force would remove is decided only now, after every input is checked, and for both
            # folders before either is touched (read-only: every rank checks).
            output_check(config.run.out, plan.out_settings, config.run.force)
            output_check(plan.candidates, plan.candidate_plan.pixel_settings, config.run.force)
        except IGDSInputError as exc:
            if quiet_rank:  # every rank checks the same inputs; rank 0 reports them once
                raise QuietRankError(str(exc)) from exc
            raise
        if not quiet_rank:
            # Every input is checked before sampling, and before anything is removed: the real images too
            # (rank 0 only, which alone uses them).
            plan.real.check(config.selection.on_corrupt, progress=config.run.progress)
            if plan.real.skipped:
                log(f"distill: S3: skipped {len(plan.real.skipped)} unreadable --real image(s), e.g. "
                    f"{plan.real.skipped[0]}")
            # OUT's settings file first (the candidates come after), so a crash leaves a folder that knows them.
            prepare_output(config.run.out, plan.out_settings, config.run.force, log)
            for line in cost_lines(selection_cost(plan.candidate_plan, config.job.ipc, plan.encoder.description,
                                                  len(plan.real.chosen), timing_from=config.run.timing_from)):
                log(line)
        candidates_manifest = distill(plan.candidate_config, log=log, plan=plan.candidate_plan, announce_cost=False)
        if "images" not in candidates_manifest:
            return candidates_manifest  # a non-zero rank: its share of the candidates is done
        return _select_and_write(plan, candidates_manifest, started, log)


def _stage_paths(candidates: str) -> dict:
    stage = os.path.join(candidates, STAGE_DIR)
    return {"stage": stage, "state": os.path.join(stage, STATE_NAME), "features": os.path.join(stage, FEATURES_DIR),
            "real": os.path.join(stage, REAL_NAME), "real_partial": os.path.join(stage, REAL_PARTIAL_NAME),
            "selection": os.path.join(stage, SELECTION_NAME)}


def _prepare_stage(plan: SelectionPlan, image_size: int, channels: int, log) -> tuple[dict, dict]:
    """CAND/.s3 for these candidates and this encoder: stale stage files cleared, temp files removed."""
    paths = _stage_paths(plan.candidates)
    key = {"format": STAGE_FORMAT, "candidates": plan.candidate_plan.pixel_settings, "encoder": plan.encoder.description,
           "feature_batch": FEATURE_BATCH, "image_size": image_size, "channels": channels}
    os.makedirs(paths["features"], exist_ok=True)
    saved = None
    if os.path.isfile(paths["state"]):
        try:
            with open(paths["state"], encoding="utf-8") as handle:
                saved = json.load(handle)
        except (OSError, json.JSONDecodeError):
            saved = None
    if saved != key:
        if saved is not None:
            log(f"distill: S3: {paths['stage']} was computed from other candidates or another encoder; recomputing")
        for folder, names in ((paths["features"], _is_feature_file), (paths["stage"], STAGE_FILES.__contains__)):
            for name in os.listdir(folder):  # the stage files only (owned.py), never anything else
                if names(name) and os.path.isfile(os.path.join(folder, name)):
                    os.unlink(os.path.join(folder, name))
        write_json_atomic(paths["state"], key)
    for folder, names in ((paths["features"], _is_feature_file), (paths["stage"], STAGE_FILES.__contains__)):
        for name in os.listdir(folder):  # temp files of a stage writer killed mid-write
            if temp_of(name) is not None and names(temp_of(name)):
                os.unlink(os.path.join(folder, name))
    return paths, key


def _is_feature_file(name: str) -> bool:
    return len(name) == 6 + len(".safetensors") and name[:6].isdigit() and name.endswith(".safetensors")


def _save_tensors_atomic(path: str, tensors: dict, key: str, **extra) -> None:
    """A stage file: safetensors with one metadata entry (its key and `extra` as sorted JSON).

    One entry, because safetensors writes its metadata map in hash order: with several entries the
    bytes of the same file would differ from process to process.
    """
    from safetensors.torch import save

    stamp = json.dumps({"key": key, **extra}, sort_keys=True)
    data = save({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, metadata={STAGE_METADATA_KEY: stamp})
    write_bytes_atomic(path, data)


def _read_tensors(path: str, key: str, with_stamp: bool = False, tensors: bool = True):
    """The tensors (and stamp) of a stage file whose key matches, else None (unreadable: recomputed).

    tensors=False reads the header only (returns {} on a match).
    """
    try:
        metadata, tensors = read_safetensors(path, "S3 stage file", with_tensors=tensors)
        stamp = json.loads(metadata.get(STAGE_METADATA_KEY, "{}"))
    except (IGDSInputError, json.JSONDecodeError):
        return None
    if not isinstance(stamp, dict) or stamp.get("key") != key:
        return None
    tensors = {} if tensors is None else tensors
    return (tensors, stamp) if with_stamp else tensors


def _candidate_image_shape(plan: SelectionPlan) -> tuple[int, int]:
    """(side, channels) of the candidate PNGs (all alike: one prior, one composite setting)."""
    from PIL import Image

    first = os.path.join(plan.candidates, plan.candidate_plan.class_keys[0], image_file_name(0))
    with Image.open(first) as image:
        return image.size[0], 1 if image.mode in ("L", "I", "1") else 3


def _features_stage(plan: SelectionPlan, paths: dict, key_hash: str, image_size: int, channels: int, device, log):
    """Save the features of every fixed candidate batch not saved yet; returns the batch files in order."""
    class_keys = plan.candidate_plan.class_keys
    per_class = plan.candidate_config.job.ipc
    images = [os.path.join(plan.candidates, key, image_file_name(k)) for key in class_keys for k in range(per_class)]
    lists = [list(range(start, min(start + FEATURE_BATCH, len(images)))) for start in range(0, len(images), FEATURE_BATCH)]
    files = [os.path.join(paths["features"], f"{number:06d}.safetensors") for number in range(len(lists))]
    todo = [number for number, path in enumerate(files) if _read_tensors(path, key_hash, tensors=False) is None]
    if todo:
        log(f"distill: S3: features of {len(images)} candidates ({len(todo)} of {len(lists)} batches to do)")
        labels = [label for label in range(len(class_keys)) for _ in range(per_class)]
        # Streamed, unverified: only the batches still to do are decoded (a resumed run skips the saved ones).
        candidates = FolderImages.from_paths(images, labels, class_keys, image_size, channels=channels,
                                             on_corrupt="fail", root=plan.candidates, in_memory=False, verify=False)
        batches = candidates.batches([lists[number] for number in todo], device)
        for number, (batch, _, _) in zip(todo, batches):
            features = plan.encoder(batch)
            _save_tensors_atomic(files[number], {"features": features}, key_hash, batch=number)
    return files


def _subgroup_centroids(plan: SelectionPlan, files: list[str], key_hash: str) -> torch.Tensor:
    """[C, G, d] subgroup centroids from the saved batches, one class at a time."""
    groups, ipc = plan.s3.groups, plan.config.job.ipc
    per_class = groups * ipc
    rows, centroids = [], []
    held = 0
    for path in files:
        tensors = _read_tensors(path, key_hash)
        if tensors is None:
            raise IGDSInputError(f"{path} changed while the selection ran; rerun")
        rows.append(tensors["features"])
        held += tensors["features"].shape[0]
        while held >= per_class:
            block = torch.cat(rows)
            centroids.append(subgroup_centroids(block[:per_class].reshape(1, groups, ipc, -1))[0])
            rest = block[per_class:]
            rows, held = [rest], rest.shape[0]
    return torch.stack(centroids)


def _real_stage(plan: SelectionPlan, paths: dict, stage_key: dict, image_size: int, channels: int, device, log):
    """[C, d] real centroids, streamed (resumable from REAL_PARTIAL_NAME), saved once."""
    key_hash = _key_hash({**stage_key, "real": plan.real.description, "real_per_class": plan.s3.real_per_class,
                          "real_seed": REAL_SEED, **({"real_skipped": plan.real.skipped} if plan.real.skipped else {})})
    saved = _read_tensors(paths["real"], key_hash)
    if saved is not None:
        return saved["centroids"], key_hash
    num_classes = len(plan.candidate_plan.class_keys)
    accumulator = None
    start = 0
    partial = _read_tensors(paths["real_partial"], key_hash, with_stamp=True)
    if partial is not None:
        tensors, metadata = partial
        accumulator = ClassCentroidAccumulator(num_classes, tensors["sums"].shape[1], device=device)
        accumulator.sums.copy_(tensors["sums"])
        accumulator.counts.copy_(tensors["counts"])
        start = int(metadata["next_batch"])
    log(f"distill: S3: real centroids from {plan.real.description['images']} real images"
        + (f" (resuming at batch {start})" if start else ""))
    chosen = plan.real.chosen
    lists = [chosen[first : first + REAL_BATCH] for first in range(0, chosen.numel(), REAL_BATCH)]
    source = plan.real.open(image_size, channels)
    for number, (images, labels, _) in enumerate(source.batches(lists[start:], device), start):
        features = plan.encoder(images)
        if accumulator is None:
            accumulator = ClassCentroidAccumulator(num_classes, features.shape[1], device=device)
        accumulator.add(features, labels.to(device, torch.int64))
        if (number + 1) % REAL_CHECKPOINT_BATCHES == 0:
            _save_tensors_atomic(paths["real_partial"], {"sums": accumulator.sums, "counts": accumulator.counts},
                                 key_hash, next_batch=number + 1)
    centroids = accumulator.centroids(torch.float32)
    _save_tensors_atomic(paths["real"], {"centroids": centroids}, key_hash)
    if os.path.isfile(paths["real_partial"]):
        os.unlink(paths["real_partial"])
    return centroids, key_hash


def _selection_stage(plan: SelectionPlan, paths: dict, files, features_key: str, real_centroids, real_key: str,
                     device, log) -> dict:
    """The S³ search (or its saved result): chosen / start subgroup per class, objective terms, passes."""
    key = {"features": features_key, "real": real_key, "search": plan.s3.search_kwargs(), "groups": plan.s3.groups,
           "ipc": plan.config.job.ipc}
    try:
        with open(paths["selection"], encoding="utf-8") as handle:
            saved = json.load(handle)
        if saved.get("key") == key:
            return saved
    except (OSError, json.JSONDecodeError):
        pass
    centroids = _subgroup_centroids(plan, files, features_key).to(device)
    result = s3_search_centroids(centroids, real_centroids.to(device), **plan.s3.search_kwargs())
    selection = {
        "key": key,
        "chosen": result.chosen.tolist(),
        "start": result.start.tolist(),
        "objective": dataclasses.asdict(result.objective),
        "start_objective": dataclasses.asdict(result.start_objective),
        "passes": result.passes,
        "converged": result.converged,
    }
    write_json_atomic(paths["selection"], selection)
    changed = sum(a != b for a, b in zip(selection["chosen"], selection["start"]))
    log(f"distill: S3: objective {result.start_objective.total:.4f} at the closest-to-real start -> "
        f"{result.objective.total:.4f} after {result.passes} pass(es); {changed} class(es) moved")
    return selection


def _copy_chosen(plan: SelectionPlan, chosen: list[int]) -> int:
    """OUT/<class>/<j>.png = the chosen subgroup's j-th candidate, atomically; returns files written."""
    written = 0
    ipc = plan.config.job.ipc
    for key, group in zip(plan.candidate_plan.class_keys, chosen):
        for index in range(ipc):
            with open(os.path.join(plan.candidates, key, image_file_name(group * ipc + index)), "rb") as handle:
                data = handle.read()
            target = os.path.join(plan.config.run.out, key, image_file_name(index))
            if os.path.isfile(target):
                with open(target, "rb") as handle:
                    if handle.read() == data:
                        continue
            write_bytes_atomic(target, data)
            written += 1
    return written


def _select_and_write(plan: SelectionPlan, candidates_manifest: dict, started: float, log) -> dict:
    """Rank 0, after the candidates: features, real centroids, selection, the output folder, the manifest."""
    device = plan.candidate_plan.device
    plan.encoder.to(device)
    image_size, channels = _candidate_image_shape(plan)
    times = {}
    stage = time.perf_counter()
    paths, stage_key = _prepare_stage(plan, image_size, channels, log)
    features_key = _key_hash(stage_key)
    files = _features_stage(plan, paths, features_key, image_size, channels, device, log)
    times["features_s"] = round(time.perf_counter() - stage, 3)
    stage = time.perf_counter()
    real_centroids, real_key = _real_stage(plan, paths, stage_key, image_size, channels, device, log)
    times["real_centroids_s"] = round(time.perf_counter() - stage, 3)
    stage = time.perf_counter()
    selection = _selection_stage(plan, paths, files, features_key, real_centroids, real_key, device, log)
    times["selection_s"] = round(time.perf_counter() - stage, 3)
    stage = time.perf_counter()
    written = _copy_chosen(plan, selection["chosen"])
    times["copy_s"] = round(time.perf_counter() - stage, 3)
    preview = write_preview(plan.config.run.out, plan.candidate_plan.class_keys, plan.config.job.ipc)
    manifest = _build_manifest(plan, selection, candidates_manifest, written, preview is not None)
    manifest["run"].update(stage_times_s=times, wall_time_s=round(time.perf_counter() - started, 3))
    write_json_atomic(os.path.join(plan.config.run.out, MANIFEST_NAME), manifest)
    return manifest


def _build_manifest(plan: SelectionPlan, selection: dict, candidates_manifest: dict, written: int,
                    has_preview: bool) -> dict:
    """OUT's manifest: a plain run's fields for the chosen images, plus the selection's record."""
    ipc = plan.config.job.ipc
    position = {key: i for i, key in enumerate(plan.candidate_plan.class_keys)}
    candidate_jobs = {(job.class_key, job.image_index): job for job in plan.candidate_plan.jobs}
    jobs = []
    for job in plan.candidate_plan.jobs:  # index first, class second, as a plain run's list
        if job.image_index >= ipc:
            continue
        group = selection["chosen"][position[job.class_key]]
        source = candidate_jobs[(job.class_key, group * ipc + job.image_index)]
        jobs.append(ImageJob(label=job.label, class_key=job.class_key, folder=job.folder, image_index=job.image_index,
                             samples=source.samples))
    out_plan = dataclasses.replace(plan.candidate_plan, config=plan.config, jobs=jobs, pixel_settings=plan.out_settings,
                                   beta_source=plan.beta_source)
    candidate_run = candidates_manifest["run"]
    manifest = build_manifest(out_plan, written, candidate_run["samples_generated"], candidate_run["sampling_time_s"],
                              0.0, has_preview)
    for entry in manifest["images"]:
        group = selection["chosen"][position[entry["class"]]]
        entry["subgroup"] = group
        entry["candidate"] = os.path.join(entry["class"], image_file_name(group * ipc + entry["index"]))
    encoder = dict(plan.encoder.description)
    selection_settings = plan.config.selection
    encoder["path"] = os.path.abspath(selection_settings.encoder or plan.config.models.ve)
    real = dict(plan.real.description)
    if selection_settings.real is not None:
        real["path"] = os.path.abspath(selection_settings.real)
        real["skipped_unreadable"] = len(plan.real.skipped)
    manifest["selection"] = {
        "method": selection_settings.method,
        **plan.s3.to_dict(),
        "real_seed": REAL_SEED,
        "encoder": encoder,
        "real": real,
        "candidates": os.path.abspath(plan.candidates),
        "candidate_seeds": "candidate k of class c = output image k of a plain run of G x IPC images with the same "
                           "seed; subgroup g = candidates [g*IPC, (g+1)*IPC)",
        "chosen": {key: group for key, group in zip(plan.candidate_plan.class_keys, selection["chosen"])},
        "start": {key: group for key, group in zip(plan.candidate_plan.class_keys, selection["start"])},
        "objective": selection["objective"],
        "start_objective": selection["start_objective"],
        "passes": selection["passes"],
        "converged": selection["converged"],
    }
    # Sampling throughput belongs to the candidates (their record); these files were copied, not sampled.
    manifest["run"].update(images_written=written, images_per_s=None, samples_per_s=None, candidates=candidate_run)
    return manifest


__all__ = ["FEATURE_BATCH", "SelectionPlan", "distill_with_selection", "plan_selection"]
