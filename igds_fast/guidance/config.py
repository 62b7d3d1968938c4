"""Validated configuration of the guided sampler."""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import IGDSInputError
from ..settings import option

GRADIENT_MODES = ("x0", "xt")
HEADS = ("autograd", "analytic", "triton")


@dataclass(frozen=True)
class GuidanceConfig:
    """How every reverse step is steered (IGDS_SPEC section 3).

    scale: guidance scale s in mu~ = mu + s * sigma^2 * g (0 disables guidance: plain DDPM).
    beta: IGDS's contextual weight, on the term KL(P || Q_y); grows with IPC (section 6). None = not
        chosen yet: a distillation run takes it from its beta table at its IPC
        (guidance.beta_table.resolve_beta); a sampler refuses an unchosen beta.
    tau: temperature of P = softmax(z / tau) and of the diversity similarities; None = the VE's tau.
    gamma: weight of the InfoNCE diversity term (0 reproduces the paper).
    mode: "x0" — gradient w.r.t. the detached x0 prediction (default, Ma et al. 2024);
          "xt" — gradient w.r.t. x_t through the UNet (autograd through the whole chain).
    guide_from_step / guide_until_step: the guided window in sampling order (step 0 starts from pure
        noise, step N-1 produces the image), both inclusive; None = through the last step.
    head: how dJ/dz is computed — "autograd" (torch autograd through `igds_objective`, the
        reference), "analytic" (closed forms, `igds_objective_and_grad`) or "triton" (fused kernel).
    clip_x0: clip the x0 prediction to [-1, 1] (guided-diffusion's clip_denoised).
    check_finite: raise on a non-finite guidance gradient, naming the step and the labels
        (one host synchronisation per step: the eager reference affords it).
    """

    scale: float = option(1.0, "--scale", parse=float, help="guidance scale s (0 = plain, unguided sampling)")
    beta: float | None = option(0.0, "--beta", parse=float, default_text="--beta-table at --ipc, else the "
                                "built-in placeholder table", help="IGDS's contextual weight: of KL(P || Q_y)")
    tau: float | None = option(None, "--tau", parse=float, default_text="the VE's",
                               help="temperature of the feature softmax P = softmax(f(x) / tau)")
    gamma: float = option(0.0, "--gamma", parse=float, help="weight of the diversity (InfoNCE) term")
    mode: str = option("x0", "--mode", choices=GRADIENT_MODES, help="guidance gradient w.r.t. the x0 prediction "
                       "(detached) or w.r.t. x_t through the prior")
    guide_from_step: int = option(0, "--guide-from-step", parse=int, metavar="K",
                                  help="first guided sampling step (0 = the first step from noise)")
    guide_until_step: int | None = option(None, "--guide-until-step", parse=int, metavar="K", default_text="the last",
                                          help="last guided sampling step, inclusive (0 = the first step from noise)")
    head: str = option("autograd", "--head", choices=HEADS, help="how the eager backend computes dJ/dz: autograd "
                       "(the reference), analytic closed forms, or the Triton kernel")
    clip_x0: bool = option(True, help="clip the x0 prediction to [-1, 1] (a pixel prior's; set from the prior)")
    check_finite: bool = option(True, help="raise on a non-finite guidance gradient")

    def __post_init__(self):
        for name in ("scale", "beta", "gamma"):
            value = getattr(self, name)
            if name == "beta" and value is None:
                continue  # not chosen yet (a distillation run's beta table decides)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise IGDSInputError(f"guidance {name} must be a finite number, got {value!r}")
        if self.scale < 0:
            raise IGDSInputError(f"guidance scale must be >= 0, got {self.scale}")
        if self.beta is not None and self.beta < 0:
            # beta weighs KL(P || Q_y) in the objective the guidance ascends: a negative weight would push
            # the images toward the class centroid instead of keeping their contextual information.
            raise IGDSInputError(f"guidance beta must be >= 0 (the weight of the contextual term), got {self.beta:g}")
        if self.tau is not None and not (isinstance(self.tau, (int, float)) and self.tau > 0):
            raise IGDSInputError(f"tau must be positive, got {self.tau!r}")
        if self.mode not in GRADIENT_MODES:
            raise IGDSInputError(f"guidance mode must be one of {GRADIENT_MODES}, got {self.mode!r}")
        if self.head not in HEADS:
            raise IGDSInputError(f"guidance head must be one of {HEADS}, got {self.head!r}")
        if not isinstance(self.guide_from_step, int) or self.guide_from_step < 0:
            raise IGDSInputError(f"guide_from_step must be an integer >= 0, got {self.guide_from_step!r}")
        if self.guide_until_step is not None and (
            not isinstance(self.guide_until_step, int) or self.guide_until_step < self.guide_from_step
        ):
            raise IGDSInputError(
                f"guide_until_step must be an integer >= guide_from_step ({self.guide_from_step}), "
                f"got {self.guide_until_step!r}"
            )

    def guides_step(self, step: int) -> bool:
        """Whether sampling step `step` (0 = first step from noise) is guided."""
        if self.scale == 0:
            return False
        until = self.guide_until_step
        return self.guide_from_step <= step and (until is None or step <= until)
