"""The settings of a distillation run (`DistillConfig`) and the defaults of the method's free values."""
from __future__ import annotations

from dataclasses import dataclass, field

# Placeholder beta per IPC (IGDS_SPEC section 6): the paper's calibrated values did not survive
# text extraction; it only states that beta is small at IPC 1 and grows with IPC. These numbers
# follow that shape and nothing more -- calibrate them for a real data set with
# `igds-fast calibrate-beta` and pass `--beta-table beta.json`.
DEFAULT_BETA_TABLE: dict[int, float] = {1: 0.0, 10: 0.1, 20: 0.2, 50: 0.5, 100: 1.0}
# Guidance scale s in mu~ = mu + s sigma^2 g. The paper's value is lost too: 1.0 is classifier
# guidance's neutral setting (Dhariwal & Nichol use 1.0 for their conditional 256 model); a placeholder.
DEFAULT_SCALE = 1.0
DEFAULT_STEPS = 250  # the paper runs 250 respaced DDPM steps
DEFAULT_DIT_STEPS = 50  # DiT's and MinimaxDiffusion's sample.py: create_diffusion("50")
DEFAULT_CFG_SCALE = 4.0  # DiT's sample.py --cfg-scale and MinimaxDiffusion's sampling scale
DEFAULT_CFG_CHANNELS = 3  # DiT's forward_with_cfg guides the first three latent channels
DEFAULT_BATCH_SIZE = 32
SELECT_METHODS = ("s3",)  # --select: S³ subgroup selection (igds_fast.select, distill/select_stage.py)
CONFIG_FORMAT = "igds_distill_config"
MANIFEST_FORMAT = "igds_distill_manifest"
FORMAT_VERSION = 1


@dataclass
class DistillConfig:
    """Every setting of a distillation run (the CLI fills this; `distill()` runs it).

    Prior (exactly one): prior + preset (ADM checkpoint), diffusers (folder), or prior alone (a file
    written by igds_fast.train_prior, or a DiT / MinimaxDiffusion checkpoint, recognised by its keys;
    prior_kind "dit" or a dit-* preset says so explicitly). A DiT prior is latent: vae (a local
    diffusers AutoencoderKL folder) decodes it, cfg_scale / cfg_channels set its classifier-free
    guidance (None = DEFAULT_CFG_SCALE / DEFAULT_CFG_CHANNELS; refused for other priors). ve: VE bundle. classes: class spec (list name, file, indices or
    class ids; None = every VE class in VE order). ipc: output images per class. beta / beta_table
    (None / None = DEFAULT_BETA_TABLE). scale: guidance scale (0 = plain DDPM). steps: respaced
    sampling steps, an int or guided-diffusion's timestep_respacing string ("250", "ddim50",
    "10,20,30"); None = DEFAULT_DIT_STEPS for a DiT prior, else DEFAULT_STEPS. guide_from_step /
    guide_until_step: the guided window in sampling order, inclusive (IGD guides 30-45 of 50). composite: samples per output image (1 or 4; None = 4 for ADM presets, as the
    paper, else 1). batch_size: samples per sampler call (None = DEFAULT_BATCH_SIZE for the eager
    backend; the compiled backend chooses it from free device memory, the smallest choice of all
    ranks under torchrun, and pads a short last batch that follows full ones to it, so no new
    graph is compiled and captured).
    seed: global seed of every image seed.
    force: clear a folder of another configuration. device: torch device (None = cuda if available).
    tau / gamma / mode / head / noise / backend: GuidanceConfig and Sampler options (None tau = the
    VE's; None noise = "philox" for the compiled backend, which draws its noise in-kernel, else
    "torch"). compile_options: CompileConfig fields for the compiled backend (dict; e.g.
    {"dtype": "fp16"}). noise_schedule: the diffusion of a diffusers prior without a scheduler config
    (None = linear; refused when the folder has one).
    progress: report progress on stderr. trace: write OUT/trace.json and OUT/trace.png, the guidance
    terms of every step per class (distill/trace.py; no effect on the pixels). prior_class_names: the class list of a diffusers prior
    that is conditional on neither ImageNet-1K nor the VE's list (None = infer).
    profile_steps: "A:B" — open the CUDA profiler (cudaProfilerStart/Stop, what profiling/nsys.sh
    captures) around sampling-loop steps A .. B-1 of the first batch (0 = the first step from noise,
    B excluded; profiling/window.py); None = $IGDS_PROFILE_STEPS if set. No effect on the pixels; a
    no-op without CUDA.
    select: "s3" = sample `groups` x IPC candidates per class and keep the best subgroup of IPC per
    class (S³; run by `distill_with_selection`, not `distill`); None = plain sampling, and then every
    option below must stay None. groups / select_alpha / select_beta / select_eps /
    select_max_passes / real_per_class: `igds_fast.select.S3Config` fields (None = its defaults).
    select_encoder: a torchvision-layout ResNet-18/50 checkpoint whose features the selection
    compares (224 px, ImageNet normalisation); None = the VE's own encoder and preprocessing.
    real: ImageFolder of real training images (class folders named by the class keys) for the real
    centroids. candidates: folder of the G x IPC candidates and the stage files (None =
    OUT + ".s3-candidates", beside OUT, never inside it).
    """

    ve: str
    out: str
    ipc: int
    prior: str | None = None
    preset: str | None = None
    diffusers: str | None = None
    classes: str | None = None
    beta: float | None = None
    beta_table: str | None = None
    scale: float = DEFAULT_SCALE
    steps: int | str | None = None
    composite: int | None = None
    batch_size: int | None = None
    seed: int = 0
    force: bool = False
    device: str | None = None
    tau: float | None = None
    gamma: float = 0.0
    mode: str = "x0"
    head: str = "autograd"
    noise: str | None = None
    backend: str = "eager"
    compile_options: dict | None = None
    noise_schedule: str | None = None
    progress: bool = True
    prior_class_names: list[str] | None = field(default=None)
    batch_invariant: bool = False
    trace: bool = False
    prior_kind: str | None = None
    vae: str | None = None
    cfg_scale: float | None = None
    cfg_channels: int | None = None
    guide_from_step: int = 0
    guide_until_step: int | None = None
    profile_steps: str | None = None
    select: str | None = None
    groups: int | None = None
    select_alpha: float | None = None
    select_beta: float | None = None
    select_eps: float | None = None
    select_max_passes: int | None = None
    select_encoder: str | None = None
    real: str | None = None
    real_per_class: int | None = None
    candidates: str | None = None

    # The selection options, with the flag that sets each (for the refusals in plan.py).
    SELECTION_FLAGS = (("groups", "--groups"), ("select_alpha", "--select-alpha"), ("select_beta", "--select-beta"),
                       ("select_eps", "--select-eps"), ("select_max_passes", "--select-max-passes"),
                       ("select_encoder", "--select-encoder"), ("real", "--real"),
                       ("real_per_class", "--real-per-class"), ("candidates", "--candidates"))


__all__ = ["DEFAULT_BATCH_SIZE", "DEFAULT_BETA_TABLE", "DEFAULT_CFG_CHANNELS", "DEFAULT_CFG_SCALE",
           "DEFAULT_DIT_STEPS", "DEFAULT_SCALE", "DEFAULT_STEPS", "DistillConfig", "SELECT_METHODS"]
