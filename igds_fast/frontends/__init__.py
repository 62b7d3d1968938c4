"""Adapters for other IGDS front ends: the guided-diffusion family's `cond_fn` / `condition_mean`."""
from .guided_diffusion import IGDSConditioner, label_map_from_class_map

__all__ = ["IGDSConditioner", "label_map_from_class_map"]
