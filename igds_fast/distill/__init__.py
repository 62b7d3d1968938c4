"""`igds-fast distill`: sample IPC images per class with IGDS and write them as an image folder.

    OUT/<class>/<index:05d>.png    exactly IPC files per class (<class> = wnid or class name)
    OUT/manifest.json              the settings tree that applied, versions, per-image seeds and labels, timings
    OUT/preview.png                one row per class (at most 20 classes, 10 images each)
    OUT/.igds_config.json          the settings that determine the pixels, written first

config.py (the settings tree DistillConfig), plan.py (checks and the job list, before any model
loads), folder.py (settings file, resume, preview), run.py (the batches, the sampler, torchrun),
manifest.py, select_stage.py (`--select s3`: G x IPC candidates through run.py, then S³ subgroup
selection).
"""
from .config import (DEFAULT_BATCH_SIZE, DEFAULT_CFG_CHANNELS, DEFAULT_CFG_SCALE, DEFAULT_DIT_STEPS, DEFAULT_SCALE,
                     DEFAULT_STEPS, BackendSettings, DistillConfig, JobSettings, ModelSettings, RunSettings,
                     SamplerSettings, SelectionSettings, distill_config)
from .folder import BATCH_NAME, CONFIG_NAME, MANIFEST_NAME, PREVIEW_NAME
from .plan import Plan, plan_distill
from .run import distill
from .select_stage import distill_with_selection

__all__ = [
    "BATCH_NAME",
    "BackendSettings",
    "CONFIG_NAME",
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_CFG_CHANNELS",
    "DEFAULT_CFG_SCALE",
    "DEFAULT_DIT_STEPS",
    "DEFAULT_SCALE",
    "DEFAULT_STEPS",
    "DistillConfig",
    "JobSettings",
    "MANIFEST_NAME",
    "ModelSettings",
    "PREVIEW_NAME",
    "Plan",
    "RunSettings",
    "SamplerSettings",
    "SelectionSettings",
    "distill",
    "distill_config",
    "distill_with_selection",
    "plan_distill",
]
