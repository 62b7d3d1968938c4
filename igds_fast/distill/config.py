"""The settings of a distillation run: one tree (`DistillConfig`), each setting declared once, with its flag.

    DistillConfig
      models     ModelSettings         the prior (ADM / DiT / diffusers / our own) and the VE
      job        JobSettings           what to sample: IPC, classes, composites, seed
      run        RunSettings           where and how: OUT, batch size, device, threads, progress
      sampler    SamplerSettings       the respaced steps
      guidance   GuidanceConfig        IGDS's guidance (guidance/config.py); beta_table beside it
      backend    BackendSettings       eager | fused | compiled, the noise source, CompileConfig
      selection  SelectionSettings     S³ (None: plain sampling), with its S3Config (select.py)

`igds-fast distill`'s parser is generated from this tree (igds_fast.settings), and the manifest
records it. Defaults that depend on the prior (steps, composite, CFG, noise) are None here and
resolved once, by the planner (plan.py), which says so in each field's help.
"""
from __future__ import annotations

import os

from dataclasses import dataclass

from ..data.folders import ON_CORRUPT
from ..diffusion import SAMPLERS, resolve_eta
from ..errors import IGDSInputError
from ..guidance import GuidanceConfig
from ..jobs import COMPOSITE_SIZES, check_positive_int
from ..models.adm import ADM_PRESETS
from ..models.dit import DIT_PRESETS
from ..models.priors import PRIOR_KINDS
from ..sampling.backends import BACKENDS, NOISE_SOURCES, default_noise
from ..sampling.compiled.config import CompileConfig
from ..select import S3Config
from ..settings import Flag, option, replace, section

DEFAULT_SCALE = GuidanceConfig().scale
DEFAULT_STEPS = 250  # the paper runs 250 respaced DDPM steps
DEFAULT_DIT_STEPS = 50  # DiT's and MinimaxDiffusion's sample.py: create_diffusion("50")
DEFAULT_CFG_SCALE = 4.0  # DiT's sample.py --cfg-scale and MinimaxDiffusion's sampling scale
DEFAULT_CFG_CHANNELS = 3  # DiT's forward_with_cfg guides the first three latent channels
DEFAULT_BATCH_SIZE = 32
SELECT_METHODS = ("s3",)  # --select: S³ subgroup selection (igds_fast.select, distill/select_stage.py)
CONFIG_FORMAT = "igds_distill_config"
MANIFEST_FORMAT = "igds_distill_manifest"
FORMAT_VERSION = 1
PRIOR_ARCHS = tuple(sorted(ADM_PRESETS)) + tuple(sorted(DIT_PRESETS))


def _optional_path(value, what: str) -> None:
    if value is not None and (not isinstance(value, str) or not value):
        raise IGDSInputError(f"{what} must be a path, got {value!r}")


@dataclass(frozen=True)
class ModelSettings:
    """The prior and the variational estimator.

    Prior (exactly one): `prior` + `arch` (an ADM checkpoint), `diffusers` (a folder), or `prior`
    alone (a file written by `igds-fast train-prior`, or a DiT / MinimaxDiffusion checkpoint
    recognised by its keys; prior_kind "dit" or a dit-* arch says so explicitly). A DiT prior is
    latent: `vae` decodes it, `cfg_scale` / `cfg_channels` set its classifier-free guidance (refused
    for any other prior).
    """

    ve: str = option(flag="--ve", metavar="BUNDLE", help="the variational estimator bundle (.safetensors, "
                     "from train-ve)")
    prior: str | None = option(None, "--prior", help="ADM checkpoint (.pt/.safetensors, with --arch), DiT / "
                               "MinimaxDiffusion checkpoint (recognised by its keys), a prior file from train-prior, "
                               "or a diffusers folder (flat as google/ddpm-cifar10-32, or a pipeline root)")
    arch: str | None = option(None, "--arch", choices=PRIOR_ARCHS, old=("--preset",),
                              help="the architecture of an ADM or DiT --prior checkpoint")
    prior_kind: str | None = option(None, "--prior-kind", choices=PRIOR_KINDS, default_text="from --arch, the "
                                    "file's header or its keys", help="what --prior is")
    diffusers: str | None = option(None, "--diffusers", metavar="DIR", help="a local diffusers UNet2DModel folder")
    noise_schedule: str | None = option(None, "--noise-schedule", choices=("linear", "cosine"), default_text="linear",
                                        help="the diffusion of a diffusers folder without a scheduler config")
    vae: str | None = option(None, "--vae", metavar="DIR", help="a DiT prior's VAE: a local diffusers AutoencoderKL "
                             "folder (e.g. sd-vae-ft-mse)")
    cfg_scale: float | None = option(None, "--cfg-scale", parse=float, default_text=f"{DEFAULT_CFG_SCALE:g}",
                                     help="a DiT prior's classifier-free guidance scale (1 = none)")
    cfg_channels: int | None = option(None, "--cfg-channels", parse=int, default_text=f"{DEFAULT_CFG_CHANNELS}, as "
                                      "DiT", help="the latent channels CFG guides (4 = all, as diffusers)")
    prior_class_names: tuple[str, ...] | None = option(None, help="the class list of a diffusers prior conditional "
                                                       "on neither ImageNet-1K nor the VE's list (None: inferred)")

    def __post_init__(self):
        for name in ("ve", "prior", "diffusers", "vae"):
            _optional_path(getattr(self, name), f"--{name}")
        if self.cfg_scale is not None and (isinstance(self.cfg_scale, bool) or not isinstance(self.cfg_scale, (int, float))
                                           or not 0 <= self.cfg_scale < float("inf")):
            raise IGDSInputError(f"the CFG scale must be a finite number >= 0, got {self.cfg_scale!r}")
        if self.cfg_channels is not None:
            check_positive_int(self.cfg_channels, "--cfg-channels")
        if self.prior_class_names is not None:
            object.__setattr__(self, "prior_class_names", tuple(self.prior_class_names))


@dataclass(frozen=True)
class JobSettings:
    """What to sample: IPC images per class of `classes`, each of `composite` samples, seeded by `seed`."""

    ipc: int = option(flag="--ipc", parse=int, help="images per class")
    classes: str | None = option(None, "--classes", default_text="every VE class", help="imagewoof | imagenette | "
                                 "imagenet100 | imagenet1k | tinyimagenet | cifar10 | FILE | indices like 0-9,17 "
                                 "(positions in the prior's class list; the VE's for an unconditional prior)")
    composite: int | None = option(None, "--composite", parse=int, choices=COMPOSITE_SIZES, default_text="4 for the "
                                   "ADM presets, as the paper, else 1", help="samples per image: 4 = a 2x2 composite")
    seed: int = option(0, "--seed", parse=int, help="global seed; image seeds derive from (seed, class, index)")

    def __post_init__(self):
        check_positive_int(self.ipc, "IPC")
        if self.composite is not None and self.composite not in COMPOSITE_SIZES:
            raise IGDSInputError(f"composite must be one of {COMPOSITE_SIZES}, got {self.composite!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise IGDSInputError(f"seed must be a non-negative integer, got {self.seed!r}")
        if self.classes is not None and (not isinstance(self.classes, str) or not self.classes.strip()):
            raise IGDSInputError(f"the class spec must be a non-empty string, got {self.classes!r}")


@dataclass(frozen=True)
class SamplerSettings:
    """The reverse process: how many respaced steps, and which update takes them.

    sampler: "ddpm" (ancestral steps through the posterior, the paper's) or "ddim" (guided-diffusion's
    ddim_sample; the guidance shifts the predicted noise); eta: DDIM's noise, None = 0 for DDIM
    (refused with DDPM).
    """

    steps: int | str | None = option(
        None, "--steps", parse=int, default_text=f"{DEFAULT_STEPS}; {DEFAULT_DIT_STEPS} for a DiT prior",
        help="respaced sampling steps",
        alternates=(Flag("--timestep-respacing", metavar="SPEC", help="guided-diffusion's timestep_respacing instead "
                         "of --steps: 250, ddim50, 10,20,30 (sections of the training steps, each sampled evenly)"),))
    sampler: str = option("ddpm", "--sampler", choices=SAMPLERS, help="the reverse update: ddpm (ancestral, the "
                          "paper's) or ddim (guided-diffusion's --use_ddim: deterministic at eta 0, fewer steps)")
    eta: float | None = option(None, "--eta", parse=float, default_text="0 with --sampler ddim", help="DDIM's noise, "
                               "in [0, 1] (1: DDPM's posterior variance)")

    def __post_init__(self):
        if self.sampler == "ddpm" and self.eta is not None:
            raise IGDSInputError("--eta applies to --sampler ddim only")
        resolve_eta(self.sampler, self.eta, "--sampler")
        if isinstance(self.steps, str):  # a timestep respacing ("250", "ddim50", "10,20,30"): ScheduleConfig checks it
            if not self.steps.strip():
                raise IGDSInputError("the timestep respacing is empty")
        elif self.steps is not None:
            check_positive_int(self.steps, "steps")


@dataclass(frozen=True)
class BackendSettings:
    """Which step runs the reverse process, and where its noise comes from.

    name: "eager" (the float32 reference), "fused" (the eager UNet with the Triton guidance head and
        DDPM update) or "compiled" (low-precision torch.compile'd UNet, Triton kernels, CUDA graphs;
        configured by `compile`).
    noise: "torch" or "philox"; None = philox for the fused and compiled backends (they draw their
        noise in-kernel), else torch.
    batch_invariant: (eager) step each image alone, so its bytes do not depend on its batch either.
    """

    name: str = option("eager", "--backend", choices=BACKENDS, help="eager: the float32 reference; fused: the "
                       "eager UNet with the Triton guidance and update kernels; compiled: the low-precision "
                       "torch.compile'd UNet, the Triton kernels, the step replayed as one CUDA graph")
    noise: str | None = option(None, "--noise", choices=NOISE_SOURCES, default_text="philox for --backend fused or "
                               "compiled, else torch", help="the noise source")
    batch_invariant: bool = option(False, "--batch-invariant", action="store_true",
                                   help="eager: step each image alone so its bytes do not depend on the batch size "
                                   "either (slower; without it, bytes are identical across world sizes and resumes "
                                   "at one batch size)")
    compile: CompileConfig = section(
        CompileConfig, "compiled backend", when=("name", "compiled", "--backend compiled"), exclude=("batch_size",),
        json_flag="--compile-options", json_help='more CompileConfig fields as JSON, e.g. \'{"cuda_graphs": false, '
                                                 '"mode": "default"}\' (the flags above override its keys)')

    def __post_init__(self):
        if self.name not in BACKENDS:
            raise IGDSInputError(f"unknown backend {self.name!r}; available: {', '.join(BACKENDS)}")
        if self.noise is not None and self.noise not in NOISE_SOURCES:
            raise IGDSInputError(f"unknown noise source {self.noise!r}; expected one of {NOISE_SOURCES}")
        if self.batch_invariant and self.name != "eager":
            raise IGDSInputError("--batch-invariant applies to the eager backend only")
        default_noise(self.name, self.noise)  # the fused and compiled steps draw Philox noise in-kernel


@dataclass(frozen=True)
class SelectionSettings:
    """S³ subgroup selection: sample `s3.groups` x IPC candidates per class, keep the best subgroup of IPC.

    encoder: a torchvision-layout ResNet-18/50 checkpoint whose features the selection compares (224
    px, ImageNet normalisation); None = the VE's own encoder and preprocessing. real: ImageFolder of
    real training images (class folders named by the class keys) for the real centroids. candidates:
    folder of the G x IPC candidates and the stage files (None = OUT + ".s3-candidates", beside OUT).
    """

    method: str = option("s3", "--select", choices=SELECT_METHODS, help="s3: sample --groups subgroups of IPC "
                         "images per class and keep one per class, close to the class's real centroid and far "
                         "from the other classes (needs --real)")
    s3: S3Config = section(S3Config)
    encoder: str | None = option(None, "--select-encoder", metavar="CKPT", default_text="the VE's own encoder",
                                 help="torchvision-layout ResNet-18/50 checkpoint for the features (224 px, ImageNet "
                                 "normalisation)")
    real: str | None = option(None, "--real", metavar="DIR", help="ImageFolder of real training images (class "
                              "folders named as the classes)")
    candidates: str | None = option(None, "--candidates", metavar="DIR", default_text="OUT.s3-candidates beside OUT",
                                    help="folder of the G x IPC candidates and the selection's files (never inside "
                                    "OUT)")
    on_corrupt: str = option("skip", "--on-corrupt", choices=ON_CORRUPT, help="unreadable --real images, found "
                             "before sampling: skip and count them, or stop")

    def __post_init__(self):
        if self.method not in SELECT_METHODS:
            raise IGDSInputError(f"--select must be one of {', '.join(SELECT_METHODS)}, got {self.method!r}")
        for name, flag in (("encoder", "--select-encoder"), ("real", "--real"), ("candidates", "--candidates")):
            _optional_path(getattr(self, name), flag)
        if self.on_corrupt not in ON_CORRUPT:
            raise IGDSInputError(f"--on-corrupt must be one of {', '.join(ON_CORRUPT)}, got {self.on_corrupt!r}")


@dataclass(frozen=True)
class RunSettings:
    """Where the images go and how the run behaves (none of these changes a pixel)."""

    out: str = option(flag="--out", metavar="OUT", help="the output folder")
    batch_size: int | None = option(None, "--batch-size", parse=int, default_text=f"{DEFAULT_BATCH_SIZE}; compiled "
                                    "backend: chosen from free device memory", help="samples per batch")
    device: str | None = option(None, "--device", default_text="cuda if available, else cpu", help="torch device")
    cpu_threads: int | None = option(None, "--cpu-threads", parse=int, metavar="N", default_text="1, whatever the "
                                     "world size, so the bytes do not depend on it", help="CPU runs: torch intra-op "
                                     "threads of each process (another N gives the bytes of N)")
    force: bool = option(False, "--force", action="store_true", help="clear an output folder of another "
                         "configuration of what distill wrote there (by its settings file), and nothing else")
    progress: bool = option(True, "--quiet", action="store_false", help="no progress output")
    profile_steps: str | None = option(None, "--profile-steps", metavar="A:B", default_text="$IGDS_PROFILE_STEPS",
                                       help="open the CUDA profiler (what profiling/nsys.sh captures) around sampling "
                                       "steps A..B-1 of the first batch (0 = the first step from noise; a no-op "
                                       "without CUDA)")
    trace: bool = option(False, "--trace", action="store_true", help="also write OUT/trace.json and OUT/trace.png: "
                         "the guidance terms of every step per class")
    plan: bool = option(False, "--plan", action="store_true", help="print what the run will cost (samples, steps, "
                        "FLOPs per sample and in all, disk, an estimated time on this device) and stop: nothing is "
                        "sampled, written or loaded but the VE")
    timing_from: str | None = option(None, "--timing-from", metavar="DIR", help="a distill output folder of an earlier "
                                     "run on this device with the same models and loop: the time estimate uses its "
                                     "measured rate")
    allow_large: bool = option(False, "--allow-large", action="store_true", help="lift the sane caps on the run's "
                               "work (images per class, samples, prior size) and its memory check, for a run that "
                               "really is that large (also IGDS_ALLOW_LARGE=1)")

    def __post_init__(self):
        if not isinstance(self.out, str) or not self.out:
            raise IGDSInputError("give an output folder (--out)")
        if self.batch_size is not None:
            check_positive_int(self.batch_size, "batch size")
        if self.cpu_threads is not None and (isinstance(self.cpu_threads, bool) or not isinstance(self.cpu_threads, int)
                                             or self.cpu_threads < 1):
            raise IGDSInputError(f"--cpu-threads must be a positive integer, got {self.cpu_threads!r}")
        _optional_path(self.timing_from, "--timing-from")
        if self.timing_from is not None and not os.path.isfile(os.path.join(self.timing_from, "manifest.json")):
            raise IGDSInputError(f"--timing-from {self.timing_from} holds no manifest.json (a finished distill folder)")


@dataclass(frozen=True, kw_only=True)
class DistillConfig:
    """Every setting of a distillation run (`distill()` / `distill_with_selection()` run it).

    guidance.beta None (the default here) = from `beta_table` at the job's IPC, else the built-in
    placeholder table (guidance/beta_table.py); giving both is refused. selection None = plain
    sampling; with a SelectionSettings the candidates run through `distill()` and the S³ stages
    around it (`distill_with_selection`). Fields in the order `igds-fast distill --help` lists them.
    """

    models: ModelSettings = section(ModelSettings, "models", required=True)
    job: JobSettings = section(JobSettings, "what to sample", required=True)
    sampler: SamplerSettings = section(SamplerSettings, "sampling")
    guidance: GuidanceConfig = section(GuidanceConfig, "guidance", default_factory=lambda: GuidanceConfig(beta=None))
    beta_table: str | None = option(None, "--beta-table", metavar="JSON", group="guidance",
                                    help="IGDS's beta per IPC, from calibrate-beta")
    backend: BackendSettings = section(BackendSettings, "backend")
    selection: SelectionSettings | None = section(SelectionSettings, "subgroup selection (S³: sample G x IPC per "
                                                  "class, keep the best IPC)", switch="method")
    run: RunSettings = section(RunSettings, "run", required=True)

    def __post_init__(self):
        if self.guidance.beta is not None and self.beta_table is not None:
            raise IGDSInputError("give --beta or --beta-table, not both")
        _optional_path(self.beta_table, "--beta-table")
        if self.backend.name != "eager" and self.guidance.head != "autograd":
            raise IGDSInputError(f"--head {self.guidance.head} applies to the eager backend; the {self.backend.name} "
                                 "backend always runs the Triton guidance head")


def distill_config(ve: str, out: str, ipc: int, **changes) -> DistillConfig:
    """A DistillConfig from its three required settings and any others, each named by its field
    where that name is unique in the tree (scale=2.0, batch_size=8, groups=5) or by its path
    ("guidance.mode", also guidance__mode; a section path takes a whole section, e.g.
    backend__compile=CompileConfig(dtype="fp32")); igds_fast.settings.replace does the naming."""
    base = DistillConfig(models=ModelSettings(ve=ve), job=JobSettings(ipc=ipc), run=RunSettings(out=out))
    return replace(base, **changes) if changes else base


__all__ = ["BackendSettings", "DEFAULT_BATCH_SIZE", "DEFAULT_CFG_CHANNELS", "DEFAULT_CFG_SCALE", "DEFAULT_DIT_STEPS",
           "DEFAULT_SCALE", "DEFAULT_STEPS", "DistillConfig", "JobSettings", "ModelSettings", "PRIOR_ARCHS",
           "RunSettings", "SELECT_METHODS", "SamplerSettings", "SelectionSettings", "distill_config"]
