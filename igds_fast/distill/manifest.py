"""OUT/manifest.json: the settings that apply, versions, per-image seeds and labels, wall time, images/s."""
from __future__ import annotations

import dataclasses
import importlib.metadata
import os
import platform
import time

import numpy as np
import torch

from .. import __version__
from .config import MANIFEST_FORMAT, FORMAT_VERSION
from .folder import PREVIEW_NAME
from .plan import Plan


def _package_version(name: str) -> str | None:
    """An installed distribution's version from its metadata (no import); None when it is not installed."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _versions(device: torch.device) -> dict:
    """What produced the pixels: packages (null when not installed), CUDA, cuDNN and the GPU (null off CUDA)."""
    cuda = device.type == "cuda"
    cudnn = torch.backends.cudnn.version() if cuda and torch.backends.cudnn.is_available() else None
    return {
        "igds_fast": __version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "triton": _package_version("triton"),
        "diffusers": _package_version("diffusers"),
        "cuda": torch.version.cuda if cuda else None,
        "cudnn": cudnn,
        "gpu": torch.cuda.get_device_name(device) if cuda else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


# Settings that shape only some runs: recorded only where they apply (the others keep their defaults).
_DIFFUSERS_ONLY = ("noise_schedule",)
_LATENT_ONLY = ("vae", "cfg_scale", "cfg_channels")
_COMPILED_ONLY = ("compile_options",)
_EAGER_ONLY = ("batch_invariant", "head")  # the compiled backend always runs the Triton head
_NOT_SETTINGS = ("progress", "force", "prior_class_names", "profile_steps")


def applicable_settings(plan: Plan) -> dict:
    """The run's settings, each only where it applies, with the defaults the plan resolved filled in.

    A --prior run records no --diffusers-only noise_schedule, a pixel prior no VAE / CFG, an eager
    run no compile options; steps, noise and composite are the values the run used.
    """
    config = plan.config
    settings = {key: value for key, value in dataclasses.asdict(config).items() if key not in _NOT_SETTINGS}
    # The prior options not given (None) say nothing about this run.
    dropped = {key for key in ("prior", "diffusers", "preset", "prior_kind") if settings.get(key) is None}
    if plan.prior.kind != "diffusers":
        dropped.update(_DIFFUSERS_ONLY)
    else:
        settings["noise_schedule"] = plan.pixel_settings["diffusion"]["noise_schedule"]
    latent = plan.pixel_settings.get("latent")
    if latent is None:
        dropped.update(_LATENT_ONLY)
    else:
        settings.update(vae=os.path.abspath(config.vae), cfg_scale=latent["cfg_scale"], cfg_channels=latent["cfg_channels"])
    if config.backend == "compiled":
        dropped.update(_EAGER_ONLY)
    else:
        dropped.update(_COMPILED_ONLY)
    if config.beta is not None or config.beta_table is None:
        dropped.add("beta_table")
    selection_fields = ["select"] + [name for name, _ in type(config).SELECTION_FLAGS]
    if config.select is None:
        dropped.update(selection_fields)
    else:  # the values the run used (S3Config's defaults filled in), paths absolute
        chosen = plan.pixel_settings["select"]
        settings.update(groups=chosen["groups"], select_alpha=chosen["alpha"], select_beta=chosen["beta"],
                        select_eps=chosen["eps"], select_max_passes=chosen["max_passes"],
                        real_per_class=chosen["real_per_class"])
        for key in ("select_encoder", "real", "candidates"):
            if settings.get(key) is None:
                dropped.add(key)
            else:
                settings[key] = os.path.abspath(settings[key])
    for key in dropped:
        settings.pop(key, None)
    settings.update(steps=plan.steps, noise=plan.pixel_settings["noise"], composite=plan.composite,
                    beta=plan.beta, beta_source=plan.beta_source)
    for key in ("ve", "prior", "diffusers", "beta_table", "out"):
        if settings.get(key):
            settings[key] = os.path.abspath(settings[key])
    return settings


def build_manifest(plan: Plan, written: int, sampled: int, sampling_seconds: float, wall: float, has_preview: bool) -> dict:
    """The manifest: deterministic fields (settings, classes, images) plus this run's timings."""
    config = plan.config
    settings = applicable_settings(plan)
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
        "versions": _versions(plan.device),
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


__all__ = ["applicable_settings", "build_manifest"]
