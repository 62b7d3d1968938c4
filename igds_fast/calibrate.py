"""Choose beta per IPC by training on real subsets of controlled contextual information.

IGDS_SPEC section 6 / the paper's Appendix A. beta weighs the contextual term H(X|Y) against the
prototype term during sampling, and the right weight grows with IPC. It is calibrated on real data:

1. Score every real training image with the VE: drop the images its classifier misclassifies
   (their contextual information is not captured by the encoder), and give image i of class y the
   score  s_i = KL(P_i || Q_y),  P_i = softmax(f(x_i) / tau), Q_y the VE's class centroid.
2. For every IPC and beta, draw IPC images per class *without replacement* with probabilities
   p_i = exp(beta * s_i) / sum_{j in class y} exp(beta * s_j)                  (spec's [choice])
   i.e. successive sampling: each draw picks among the images not yet drawn with probability
   proportional to exp(beta * s). Implemented with the Gumbel-top-k trick: the IPC largest of
   beta * s_i + G_i (G_i iid standard Gumbel) within a class are exactly such a draw. beta = 0
   is a uniform random subset; beta -> +inf takes the IPC highest-score images (beta < 0 favours
   images close to their centroid).
3. Train a small network on each subset (`igds_fast.evaluate.evaluate_distilled`), test it on
   held-out real data; table accuracy(IPC, beta); per IPC the beta with the best mean accuracy
   (ties -> the smaller beta).

Scores are used as they are by default (`score_normalization="none"`, the spec's formula). That
keeps beta in the units the sampler uses it in: guidance maximises J = log p(y|x) + beta * KL, and
on correctly (confidently) classified real images log p(y|x) ~ 0, so p_i ∝ exp(beta * s_i) is the
Gibbs distribution exp(J) restricted to the real data, with the same beta. The KL spread depends on
the encoder and tau by orders of magnitude (~1e-4 nats for a random ResNet trunk, ~0.1-1 for a
trained one), so the beta grid must be chosen for the VE at hand. `"standardize"` z-scores the
scores within each class first (mean 0, std 1 over the kept images): the grid then transfers
between encoders, but the chosen beta no longer has the sampler's units (use it to explore, not
to feed `distill`). The choice is recorded in the table's settings.

Randomness: repeat r (of `seeds`) of IPC k draws one Gumbel vector from a generator seeded by
(seed, k, r) and uses it for *every* beta (common random numbers: the subsets of neighbouring
betas differ only where beta changes the ranking, so the accuracy differences measure beta, not
sampling luck); the network of repeat r is initialised and trained with seed `seed + r`.

Data: tensors, or ImageFolders as `igds_fast.data.FolderImages` (held when small, else streamed).
The scoring is one batched pass; only the drawn subsets (IPC x classes images) are decoded into
memory; a streamed validation set is read batch by batch for every accuracy.

Settings: `CalibrationSettings` holds the knobs (validated; `keywords()` is calibrate_beta's keyword
arguments) and `CalibrateRun` the command's folders and files: the settings tree of
`igds-fast calibrate-beta`, whose flags are declared on their fields.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Sequence

import torch

from .data import ON_CORRUPT, FolderImages, check_folder_settings, check_labelled_images
from .devices import resolve_device
from .errors import IGDSInputError
from .evaluate.augment import AugmentConfig
from .guidance.objective import contextual_kl
from .seeding import stream_seed
from .settings import option, require_paths, section
from .threads import cpu_threads, torch_threads
from .ve import VariationalEstimator

SCORE_NORMALIZATIONS = ("none", "standardize")
_SCORE_BATCH = 256  # images per VE forward when scoring


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---- grids ----------------------------------------------------------------------------------------


def _grid(values: Iterable | str, convert, valid, plural: str, kind: str, empty: str, invalid: str) -> list:
    """Distinct values, ascending, from a sequence or a comma-separated string; one-line errors."""
    if isinstance(values, str):
        parts = [p.strip() for p in values.split(",") if p.strip()]
        try:
            values = [convert(p) for p in parts]
        except ValueError as exc:
            raise IGDSInputError(f"{plural} must be comma-separated {kind}, got {','.join(parts)!r}") from exc
    values = list(values)
    if not values:
        raise IGDSInputError(empty)
    for value in values:
        if isinstance(value, bool) or not valid(value):
            raise IGDSInputError(f"{invalid}, got {value!r}")
    return sorted({convert(v) for v in values})


def parse_ipcs(ipcs: Iterable | str) -> list[int]:
    """Distinct positive IPCs, ascending, from ints or a comma-separated string ('1,10,50')."""
    return _grid(ipcs, int, lambda v: isinstance(v, numbers.Integral) and v >= 1, "IPCs", "integers",
                 "no IPC given", "IPC must be a positive integer")


def parse_betas(betas: Iterable | str) -> list[float]:
    """Distinct finite betas >= 0, ascending, from numbers or a comma-separated string ('0,0.01,0.1')."""
    return _grid(betas, float, lambda v: isinstance(v, numbers.Real) and math.isfinite(v) and v >= 0, "betas",
                 "numbers", "the beta grid is empty", "beta must be a finite number >= 0 (a weight of the "
                 "contextual term)")


# ---- settings -------------------------------------------------------------------------------------


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


@dataclass(frozen=True, kw_only=True)
class CalibrationSettings:
    """The grid, the evaluation recipe and the scores of a calibration; validated on construction.

    ipcs / betas: a sequence or a comma-separated string (stored as ascending distinct tuples).
    horizontal_flip and cutmix_prob make the evaluation's AugmentConfig (the protocol's otherwise).
    """

    ipcs: tuple[int, ...] = option(flag="--ipc", metavar="IPC", help="comma-separated IPCs, e.g. 1,10,50")
    betas: tuple[float, ...] = option(flag="--betas", help="comma-separated beta grid, e.g. 0,0.01,0.1,1")
    network: str = option("convnet3", "--network", help="evaluation network")
    epochs: int | None = option(None, "--epochs", parse=int, default_text="the evaluation protocol's, by IPC",
                                help="training epochs of each network")
    seeds: int = option(1, "--seeds", parse=int, help="subsets (and networks) per grid cell")
    seed: int = option(0, "--seed", parse=int, help="seed of the subsets; repeat r's network is seeded seed + r")
    width: int = option(128, "--width", parse=int, help="ConvNet channels")
    lr: float = option(0.01, "--lr", parse=float, help="Adam learning rate")
    horizontal_flip: bool = option(True, "--no-flip", action="store_false",
                                   help="no horizontal flips when training (e.g. digits)")
    cutmix_prob: float = option(1.0, "--cutmix-prob", parse=float, help="probability a batch is CutMixed")
    score_normalization: str = option("none", "--score-normalization", choices=SCORE_NORMALIZATIONS,
                                      help="the KL scores as they are, or z-scored within each class")
    device: str | None = option(None, "--device", default_text="cuda if available, else cpu", help="torch device")

    def __post_init__(self):
        object.__setattr__(self, "ipcs", tuple(parse_ipcs(self.ipcs)))
        object.__setattr__(self, "betas", tuple(parse_betas(self.betas)))
        if not _is_int(self.seeds) or self.seeds < 1:
            raise IGDSInputError(f"--seeds must be >= 1, got {self.seeds!r}")
        if self.epochs is not None and (not _is_int(self.epochs) or self.epochs < 1):
            raise IGDSInputError(f"--epochs must be >= 1, got {self.epochs!r}")
        if not _is_int(self.seed) or self.seed < 0:
            raise IGDSInputError(f"--seed must be a non-negative integer, got {self.seed!r}")
        if not _is_int(self.width) or self.width < 1:
            raise IGDSInputError(f"--width must be a positive integer, got {self.width!r}")
        if not (isinstance(self.lr, numbers.Real) and math.isfinite(self.lr) and self.lr > 0):
            raise IGDSInputError(f"--lr must be > 0, got {self.lr!r}")
        if not (isinstance(self.cutmix_prob, numbers.Real) and 0.0 <= self.cutmix_prob <= 1.0):
            raise IGDSInputError(f"--cutmix-prob must be in [0, 1], got {self.cutmix_prob!r}")
        if self.score_normalization not in SCORE_NORMALIZATIONS:
            raise IGDSInputError(f"--score-normalization must be one of {', '.join(SCORE_NORMALIZATIONS)}, "
                                 f"got {self.score_normalization!r}")

    def keywords(self) -> dict:
        """`calibrate_beta`'s keyword arguments: every setting under its own name, the flip and CutMix
        ones as the evaluation's AugmentConfig."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        augment = AugmentConfig(horizontal_flip=values.pop("horizontal_flip"), cutmix_prob=values.pop("cutmix_prob"))
        return {**values, "augment": augment}


@dataclass(frozen=True, kw_only=True)
class CalibrateRun:
    """`igds-fast calibrate-beta`: the real folders, the VE, the beta table; `calibration`: the CalibrationSettings."""

    data: str = option(flag="--data", metavar="DIR", help="real training set: DIR/<class>/<images>")
    val: str = option(flag="--val", metavar="DIR", help="real held-out set of the same classes")
    ve: str = option(flag="--ve", metavar="VE_SAFETENSORS", help="the VE bundle (igds-fast train-ve)")
    out: str = option(flag="--out", metavar="BETA_JSON", help="where to write the beta table")
    image_size: int | None = option(None, "--image-size", parse=int, default_text="the VE's resolution",
                                    help="side images are loaded at")
    on_corrupt: str = option("skip", "--on-corrupt", choices=ON_CORRUPT,
                             help="unreadable images: skip and count them, or stop")
    progress: bool = option(True, "--quiet", action="store_false", help="no progress lines on stderr")
    calibration: CalibrationSettings = section(CalibrationSettings, "calibration", required=True)

    def __post_init__(self):
        require_paths(("--data", self.data), ("--val", self.val), ("--ve", self.ve), ("--out", self.out))
        check_folder_settings(self.image_size, self.on_corrupt)


# ---- scoring and sampling -------------------------------------------------------------------------


@torch.inference_mode()
def score_samples(
    ve: VariationalEstimator, images, labels: torch.Tensor | None, device: str | torch.device | None = None
) -> dict[str, torch.Tensor]:
    """VE predictions and contextual scores of real images (CPU tensors).

    images [N, C, H, W] in [-1, 1] (or a FolderImages, streamed; its labels are used), labels [N] -> {"predictions": [N] long, "correct": [N] bool,
    "scores": [N] float64 with scores_i = KL(P_i || Q_{y_i}) = sum_j P_ij (log P_ij - log Q_{y_i j})}.
    """
    home = ve.log_centroids.device
    device = torch.device(device) if device is not None else home
    # Same policy as training: tiny forwards (digits-sized) run faster on one CPU thread.
    threads = cpu_threads(device, None, _SCORE_BATCH * ve.resolution ** 2 * 64)
    ve.to(device)  # Module.to moves in place: moved back below, the caller's VE stays where it was
    try:
        with torch_threads(threads):
            log_q = ve.log_centroids.to(torch.float64)
            predictions, scores = [], []
            count = len(images) if isinstance(images, FolderImages) else images.shape[0]
            chunks = [slice(start, min(start + _SCORE_BATCH, count)) for start in range(0, count, _SCORE_BATCH)]
            if isinstance(images, FolderImages):
                labels = images.labels
                batches = ((batch, batch_labels.to(torch.long)) for batch, batch_labels, _ in images.batches(chunks, device))
            else:
                batches = ((images[c].to(device, torch.float32), labels[c].to(device, torch.long)) for c in chunks)
            for batch, batch_labels in batches:
                features = ve.features(batch)
                predictions.append(ve.logits(features).argmax(dim=1).cpu())
                scores.append(contextual_kl(features.to(torch.float64), batch_labels, log_q, ve.tau).cpu())
    finally:
        ve.to(home)
    predictions_t = torch.cat(predictions)
    return {
        "predictions": predictions_t,
        "correct": predictions_t == labels.to(torch.long).cpu(),
        "scores": torch.cat(scores),
    }


def normalize_scores(scores: torch.Tensor, labels: torch.Tensor, mode: str) -> torch.Tensor:
    """Scores as given ("none") or z-scored within each class ("standardize"; a class whose scores
    are all equal gets zeros). scores [N] float, labels [N] -> [N] float64."""
    if mode not in SCORE_NORMALIZATIONS:
        raise IGDSInputError(f"score_normalization must be one of {SCORE_NORMALIZATIONS}, got {mode!r}")
    scores = scores.to(torch.float64)
    if mode == "none":
        return scores
    normalized = torch.zeros_like(scores)
    for label in labels.unique():
        members = labels == label
        values = scores[members]
        spread = values.std(unbiased=False)
        normalized[members] = (values - values.mean()) / spread if float(spread) > 0 else 0.0
    return normalized


def selection_probabilities(scores: torch.Tensor, beta: float) -> torch.Tensor:
    """The first-draw probabilities within one class: p_i = exp(beta s_i) / sum_j exp(beta s_j). [n] -> [n]."""
    return torch.softmax(beta * scores.to(torch.float64), dim=0)


def gumbel_noise(count: int, generator: torch.Generator) -> torch.Tensor:
    """[count] iid standard Gumbel draws, -log(-log U), float64, from `generator` (CPU)."""
    uniform = torch.rand(count, generator=generator, dtype=torch.float64)
    # U in [0, 1): U = 0 would give -inf; the smallest positive double keeps every key finite.
    uniform = uniform.clamp_min(torch.finfo(torch.float64).tiny)
    return -torch.log(-torch.log(uniform))


def draw_subset(
    scores: torch.Tensor, labels: torch.Tensor, ipc: int, beta: float, gumbel: torch.Tensor, num_classes: int
) -> torch.Tensor:
    """Indices (into scores/labels) of IPC images per class, drawn without replacement with p ∝ exp(beta s).

    scores [n] float (candidates only), labels [n], gumbel [n] standard Gumbel noise. Within each
    class the IPC largest keys beta * s_i + G_i are taken (Gumbel-top-k = successive sampling with
    probabilities proportional to exp(beta s) among the images not yet drawn). Returned grouped by
    class (class 0 first), each class in decreasing key order. Every class needs >= IPC candidates.
    """
    keys = beta * scores.to(torch.float64) + gumbel
    chosen = []
    for label in range(num_classes):
        members = torch.nonzero(labels == label).flatten()
        if members.numel() < ipc:
            raise IGDSInputError(f"class {label} has {members.numel()} candidate images, IPC {ipc} needs {ipc}")
        top = torch.topk(keys[members], ipc).indices
        chosen.append(members[top])
    return torch.cat(chosen)


# ---- calibration ----------------------------------------------------------------------------------


def best_beta(rows: Sequence[Mapping], ipc: int) -> float:
    """The beta with the highest mean accuracy among `rows` of this IPC; ties -> the smaller beta."""
    candidates = sorted((float(r["beta"]), float(r["mean"])) for r in rows if int(r["ipc"]) == ipc)
    if not candidates:
        raise IGDSInputError(f"the table has no row for IPC {ipc}")
    best, best_accuracy = candidates[0]
    for beta, accuracy in candidates[1:]:
        if accuracy > best_accuracy:  # strictly better: an equal accuracy keeps the smaller beta
            best, best_accuracy = beta, accuracy
    return best


def calibrate_beta(
    train_images: torch.Tensor,
    train_labels: torch.Tensor,
    val_images: torch.Tensor,
    val_labels: torch.Tensor,
    ve: VariationalEstimator,
    ipcs: Iterable[int] | str,
    betas: Iterable[float] | str,
    network: str | Callable[[], torch.nn.Module] = "convnet3",
    epochs: int | None = None,
    seeds: int = 1,
    seed: int = 0,
    log: Callable[[str], None] = print,
    score_normalization: str = "none",
    device: str | torch.device | None = None,
    augment=None,
    width: int = 128,
    lr: float = 0.01,
) -> dict:
    """Calibrate beta per IPC on real data (see the module docstring for the method).

    train_images [N, C, H, W] / val_images [M, C, H', W'] float in [-1, 1] (train and val at the same
    side: the network trains on one and tests on the other), labels int in [0, ve.num_classes).
    Either may be a FolderImages in the VE's class order (labels: None or its own; streamed when
    large: only the drawn subsets are decoded into memory).
    ipcs / betas: the grid (lists or comma-separated strings). network, epochs (None = the protocol's
    epochs for the IPC), augment (None = the protocol's), width, lr: passed to `evaluate_distilled`.
    A `CalibrationSettings` gives all of these but the data, the VE and `log`: `**settings.keywords()`.
    seeds: subsets (and networks) per grid cell. Every defect, including an IPC larger than some
    class's number of correctly classified images, raises a one-line IGDSInputError before training.

    Returns {"table": [{"ipc", "beta", "mean", "std", "accuracies", "mean_score", "seconds"}, ...],
    "chosen": {ipc: beta}, "settings": {...}, "subsets": {ipc: {beta: [[train indices] per seed]}}}
    with accuracies in percent and mean_score the mean (unnormalised) KL score of the drawn images.
    """
    from .evaluate.train import evaluate_distilled

    started = time.perf_counter()
    if not isinstance(ve, VariationalEstimator):
        raise IGDSInputError(f"ve must be a VariationalEstimator, got {type(ve).__name__}")
    ipc_list = parse_ipcs(ipcs)
    beta_list = parse_betas(betas)
    if not isinstance(seeds, int) or isinstance(seeds, bool) or seeds < 1:
        raise IGDSInputError(f"seeds must be a positive integer, got {seeds!r}")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise IGDSInputError(f"seed must be a non-negative integer, got {seed!r}")
    if epochs is not None and (not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 1):
        raise IGDSInputError(f"epochs must be a positive integer or None, got {epochs!r}")
    if score_normalization not in SCORE_NORMALIZATIONS:
        raise IGDSInputError(f"score_normalization must be one of {SCORE_NORMALIZATIONS}, got {score_normalization!r}")
    num_classes = ve.num_classes
    channels = ve.encoder.in_channels
    # Not every class needs images here: a class with too few correctly classified training images
    # is refused per IPC below, with its counts.
    train_labels, class_names = check_labelled_images(
        train_images, train_labels, ve.class_names, what="training", channels=channels, channels_expected_by="the VE",
        accept_folder=True,
    )
    val_labels, _ = check_labelled_images(
        val_images, val_labels, class_names, what="validation", channels=channels, channels_expected_by="the VE",
        accept_folder=True,
    )
    if tuple(train_images.shape[1:]) != tuple(val_images.shape[1:]):
        raise IGDSInputError(
            f"training images {tuple(train_images.shape[1:])} and validation images {tuple(val_images.shape[1:])} differ in shape"
        )
    train_labels = train_labels.cpu()
    # One device for the scoring and the evaluations: None means CUDA when available, for both (the
    # scoring would otherwise fall back to the VE's own device, CPU after loading).
    device = resolve_device(device)

    scored = score_samples(ve, train_images, train_labels, device)
    kept = torch.nonzero(scored["correct"]).flatten()
    kept_labels = train_labels[kept]
    kept_counts = torch.bincount(kept_labels, minlength=num_classes)
    all_counts = torch.bincount(train_labels, minlength=num_classes)
    largest = ipc_list[-1]
    short = [c for c in range(num_classes) if int(kept_counts[c]) < largest]
    if short:
        c = min(short, key=lambda k: int(kept_counts[k]))
        raise IGDSInputError(
            f"IPC {largest} needs {largest} correctly classified training images per class, but class "
            f"{class_names[c]!r} has only {int(kept_counts[c])} (of {int(all_counts[c])}; the VE misclassifies "
            f"{int(all_counts[c] - kept_counts[c])}); {len(short)} class(es) fall short"
        )
    raw_scores = scored["scores"][kept]
    scores = normalize_scores(raw_scores, kept_labels, score_normalization)
    dropped = int(train_labels.numel() - kept.numel())
    log(f"calibrate-beta: kept {kept.numel()} of {train_labels.numel()} training images "
        f"(dropped {dropped} the VE misclassifies); grid IPC {ipc_list} x beta {beta_list}, {seeds} seed(s)")

    rows, chosen, subsets = [], {}, {}
    for ipc in ipc_list:
        subsets[ipc] = {beta: [] for beta in beta_list}
        # One Gumbel vector per repeat, shared by every beta (common random numbers).
        noises = []
        for repeat in range(seeds):
            generator = torch.Generator().manual_seed(stream_seed(seed, ipc * 1_000_003 + repeat))
            noises.append(gumbel_noise(kept.numel(), generator))
        for beta in beta_list:
            cell_started = time.perf_counter()
            accuracies, mean_scores = [], []
            for repeat, noise in enumerate(noises):
                picked = draw_subset(scores, kept_labels, ipc, beta, noise, num_classes)
                indices = kept[picked]
                subsets[ipc][beta].append(indices.tolist())
                mean_scores.append(float(raw_scores[picked].mean()))
                subset = train_images.gather(indices) if isinstance(train_images, FolderImages) else train_images[indices]
                result = evaluate_distilled(
                    subset, train_labels[indices], val_images, val_labels.to(torch.long),
                    network=network, epochs=epochs, ipc=ipc, lr=lr, seeds=1, device=device, augment=augment,
                    num_classes=num_classes, width=width, base_seed=seed + repeat,
                )
                accuracies.append(float(result["accuracies"][0]))
                epochs_used = result["epochs"]
            accuracy_tensor = torch.tensor(accuracies, dtype=torch.float64)
            row = {
                "ipc": ipc,
                "beta": beta,
                "mean": float(accuracy_tensor.mean()),
                "std": float(accuracy_tensor.std(unbiased=False)),
                "accuracies": accuracies,
                "mean_score": sum(mean_scores) / len(mean_scores),
                "epochs": int(epochs_used),
                "seconds": round(time.perf_counter() - cell_started, 3),
            }
            rows.append(row)
            log(f"calibrate-beta: IPC {ipc} beta {beta:g}: accuracy {row['mean']:.2f} +- {row['std']:.2f}% "
                f"(mean KL score of the subset {row['mean_score']:.4f})")
        chosen[ipc] = best_beta(rows, ipc)
        log(f"calibrate-beta: IPC {ipc}: chose beta {chosen[ipc]:g}")

    settings = {
        "network": network if isinstance(network, str) else getattr(network, "__name__", type(network).__name__),
        "epochs": epochs,
        "seeds": seeds,
        "seed": seed,
        "lr": lr,
        "width": width,
        "score_normalization": score_normalization,
        "sampling": "without replacement, p_i ∝ exp(beta * score_i) within the class (Gumbel-top-k)",
        "score": "KL(P_x || Q_y), P_x = softmax(f(x)/tau), misclassified images dropped",
        "ipcs": ipc_list,
        "betas": beta_list,
        "tau": ve.tau,
        "class_names": class_names,
        "train_images": int(train_labels.numel()),
        "kept_images": int(kept.numel()),
        "kept_per_class": {class_names[c]: int(kept_counts[c]) for c in range(num_classes)},
        "val_images": int(val_labels.numel()),
        "image_size": int(train_images.shape[-1]),
        "seconds": round(time.perf_counter() - started, 3),
    }
    return {"table": rows, "chosen": chosen, "settings": settings, "subsets": subsets}


__all__ = [
    "SCORE_NORMALIZATIONS",
    "CalibrateRun",
    "CalibrationSettings",
    "best_beta",
    "calibrate_beta",
    "draw_subset",
    "gumbel_noise",
    "normalize_scores",
    "parse_betas",
    "parse_ipcs",
    "score_samples",
    "selection_probabilities",
]
