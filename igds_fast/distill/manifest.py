"""OUT/manifest.json: the settings that apply, versions, per-image seeds and labels, wall time, images/s."""
from __future__ import annotations

import importlib.metadata
import os
import platform
import time

import numpy as np
import torch

from .. import __version__
from .config import MANIFEST_FORMAT, FORMAT_VERSION
from .folder import PREVIEW_NAME
from ..settings import to_dict
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


def _absolute(section: dict, *names: str) -> None:
    for name in names:
        if section.get(name):
            section[name] = os.path.abspath(section[name])


def _drop_unset(section: dict, *names: str) -> None:
    for name in names:
        if section.get(name) is None:
            section.pop(name, None)


def applicable_settings(plan: Plan) -> dict:
    """The run's settings tree (`DistillConfig`, igds_fast.settings.to_dict), each setting only where
    it applies, with the values the plan resolved and every path absolute.

    A --prior run records no diffusers-only noise_schedule, a pixel prior no VAE / CFG, a backend
    other than compiled no compile section, a plain run no selection; steps, composite, noise, CFG
    and beta (with where it came from) are the values the run used. Settings that change no pixel
    and say nothing about the result (--force, --quiet, --profile-steps) are left out.
    """
    config = plan.config
    tree = to_dict(config)
    models = tree["models"]
    _drop_unset(models, "prior", "diffusers", "arch", "prior_kind", "prior_class_names")
    if plan.prior.kind == "diffusers":
        models["noise_schedule"] = plan.pixel_settings["diffusion"]["noise_schedule"]
    else:
        models.pop("noise_schedule")
    latent = plan.pixel_settings.get("latent")
    if latent is None:
        for name in ("vae", "cfg_scale", "cfg_channels"):
            models.pop(name)
    else:
        models.update(cfg_scale=latent["cfg_scale"], cfg_channels=latent["cfg_channels"])
    _absolute(models, "ve", "prior", "diffusers", "vae")
    tree["job"]["composite"] = plan.composite
    tree["sampler"]["steps"] = plan.steps
    guidance = to_dict(plan.guidance)
    guidance["beta_source"] = plan.beta_source
    backend = tree["backend"]
    backend["noise"] = plan.noise
    if backend["name"] != "eager":
        guidance.pop("head")  # the fused and compiled backends always run the Triton head
        backend.pop("batch_invariant")
    if backend["name"] != "compiled":
        backend.pop("compile")
    tree["guidance"] = guidance
    if config.beta_table is None or config.guidance.beta is not None:
        tree.pop("beta_table")
    else:
        tree["beta_table"] = os.path.abspath(config.beta_table)
    if tree["selection"] is None:
        tree.pop("selection")
    else:
        _drop_unset(tree["selection"], "encoder", "real", "candidates")
        _absolute(tree["selection"], "encoder", "real", "candidates")
    run = tree["run"]
    for name in ("force", "progress", "profile_steps"):
        run.pop(name)
    _absolute(run, "out")
    return tree


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
            "variance": plan.prior.variance,  # what the sampler uses (pixel_settings' fixed_variance only without it)
            "conditional": plan.prior.class_names is not None,
            "num_classes": None if plan.prior.class_names is None else len(plan.prior.class_names),
        },
        "ve": {
            "path": os.path.abspath(config.models.ve), "arch": plan.ve.arch, "resolution": plan.ve.resolution,
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
