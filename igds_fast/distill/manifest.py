"""OUT/manifest.json: every setting, versions, per-image seeds and labels, wall time, images/s."""
from __future__ import annotations

import dataclasses
import os
import platform
import time

import numpy as np
import torch

from .. import __version__
from .config import MANIFEST_FORMAT, FORMAT_VERSION
from .folder import PREVIEW_NAME
from .plan import Plan


def _versions() -> dict:
    return {
        "igds_fast": __version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def build_manifest(plan: Plan, written: int, sampled: int, sampling_seconds: float, wall: float, has_preview: bool) -> dict:
    """The manifest: deterministic fields (settings, classes, images) plus this run's timings."""
    config = plan.config
    settings = {
        key: value for key, value in dataclasses.asdict(config).items()
        if key not in ("progress", "force", "prior_class_names")
    }
    settings.update(composite=plan.composite, beta=plan.beta, beta_source=plan.beta_source)
    for key in ("ve", "prior", "diffusers", "beta_table", "out"):
        if settings.get(key):
            settings[key] = os.path.abspath(settings[key])
    images = []
    for job in plan.jobs:
        images.append({
            "path": job.relative_path,
            "class": job.class_key,
            "label": job.label,
            "prior_label": plan.prior_labels[plan.class_keys.index(job.class_key)],
            "index": job.image_index,
            "seeds": [sample.seed for sample in job.samples],
            "generated_indices": [sample.generated_index for sample in job.samples],
        })
    return {
        "format": MANIFEST_FORMAT,
        "format_version": FORMAT_VERSION,
        "settings": settings,
        "pixel_settings": plan.pixel_settings,
        "prior": {
            "kind": plan.prior.kind, "path": plan.prior.path, "preset": plan.prior.preset,
            "conditional": plan.prior.class_names is not None,
            "num_classes": None if plan.prior.class_names is None else len(plan.prior.class_names),
        },
        "ve": {
            "path": os.path.abspath(config.ve), "arch": plan.ve.arch, "resolution": plan.ve.resolution,
            "tau": plan.ve.tau, "num_classes": plan.ve.num_classes,
        },
        "classes": [
            {"name": key, "folder": key, "label": label, "prior_label": prior_label}
            for key, label, prior_label in zip(plan.class_keys, plan.ve_labels, plan.prior_labels)
        ],
        "label_convention": "label = position of the class in the VE's class list; prior_label = its index "
                            "in the prior's class list (null: unconditional prior)",
        "images": images,
        "preview": PREVIEW_NAME if has_preview else None,
        "versions": _versions(),
        "run": {
            "device": str(plan.device),
            "threads": torch.get_num_threads(),
            "wall_time_s": round(wall, 3),
            "sampling_time_s": round(sampling_seconds, 3),
            "images_written": written,
            "samples_generated": sampled,
            "images_per_s": round(written / sampling_seconds, 4) if sampling_seconds > 0 else None,
            "samples_per_s": round(sampled / sampling_seconds, 4) if sampling_seconds > 0 else None,
            "finished_unix_time": round(time.time(), 3),
        },
    }


__all__ = ["build_manifest"]
