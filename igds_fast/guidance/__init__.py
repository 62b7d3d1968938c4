"""IGDS guidance: the settings (`GuidanceConfig`), the objective and its closed-form gradient, and the
image-space guidance object (`IGDSGuidance`) every sampler step and front end calls."""
from .config import GRADIENT_MODES, HEADS, GuidanceConfig
from .image import IGDSGuidance, autograd_head, resolve_head
from .objective import igds_objective, igds_objective_and_grad

__all__ = [
    "GRADIENT_MODES",
    "HEADS",
    "GuidanceConfig",
    "IGDSGuidance",
    "autograd_head",
    "igds_objective",
    "igds_objective_and_grad",
    "resolve_head",
]
