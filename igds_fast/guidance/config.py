"""Validated configuration of the guided sampler."""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

from ..errors import IGDSInputError
from ..settings import option

GRADIENT_MODES = ("x0", "xt")
HEADS = ("autograd", "analytic", "triton")


def parse_t_range(text: str) -> tuple[int, int]:
    """"30:45" -> (30, 45): a guided window in the loop's own t convention (--guide-t-range)."""
    low, sep, high = str(text).partition(":")
    try:
        if not sep:
            raise ValueError
        return int(low), int(high)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LOW:HIGH (two integers), got {text!r}") from None


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
    guide_from_step / guide_until_step: the guided window in sampling order (step k = 0 starts from
        pure noise, step N-1 produces the image), both inclusive; None = through the last step.
    guide_t_range: (low, high), the guided window in the loop's own t convention instead — the
        respaced index t that guided-diffusion-family loops (and IGD's gate `low <= t[0] <= high`)
        pass to p_sample, counting down from N-1 (pure noise) to 0; both inclusive. Step k has
        t = N-1-k, so IGD's 30:45 of a 50-step loop is steps 4..19. None = the step window above;
        giving both is refused.
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
    guide_t_range: tuple[int, int] | None = option(
        None, "--guide-t-range", parse=parse_t_range, metavar="LOW:HIGH", help="the guided window in the loop's own "
        "t convention instead (IGD's --low/--high: t counts down from N-1, pure noise, to 0; both inclusive; "
        "IGD's 30:45 of 50 steps = --guide-from-step 4 --guide-until-step 19)")
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
        if self.tau is not None and not (isinstance(self.tau, (int, float)) and 0 < self.tau < math.inf):
            raise IGDSInputError(f"tau must be positive and finite, got {self.tau!r}")
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
        if self.guide_t_range is not None:
            window = tuple(self.guide_t_range)
            if (len(window) != 2 or any(isinstance(v, bool) or not isinstance(v, int) for v in window)
                    or not 0 <= window[0] <= window[1]):
                raise IGDSInputError(f"guide_t_range must be two integers 0 <= low <= high, got {self.guide_t_range!r}")
            if self.guide_from_step != 0 or self.guide_until_step is not None:
                raise IGDSInputError("give --guide-t-range or --guide-from-step / --guide-until-step, not both")
            object.__setattr__(self, "guide_t_range", window)

    def guides(self, i: int, num_steps: int) -> bool:
        """Whether the step at respaced index i (N-1 = the first step from noise .. 0) of an
        N-step loop is guided."""
        if self.scale == 0:
            return False
        if self.guide_t_range is not None:
            low, high = self.guide_t_range
            return low <= i <= high
        step = num_steps - 1 - i
        until = self.guide_until_step
        return self.guide_from_step <= step and (until is None or step <= until)

    def step_window(self, num_steps: int) -> tuple[int, int | None]:
        """(first, last or None = through the end) guided step k of an N-step loop, whichever convention
        the window was given in (so equal windows are recorded equally)."""
        if self.guide_t_range is None:
            until = self.guide_until_step
            return self.guide_from_step, None if until is not None and until >= num_steps - 1 else until
        low, high = self.guide_t_range
        first, last = max(0, num_steps - 1 - high), num_steps - 1 - low
        return first, None if last >= num_steps - 1 else last

    def check_window(self, num_steps: int) -> None:
        """Refuse, in one line, a window that misses the N-step loop it is given to."""
        if self.guide_t_range is not None:
            low, high = self.guide_t_range
            if low > num_steps - 1:
                raise IGDSInputError(f"--guide-t-range {low}:{high} starts past t = {num_steps - 1}, the first of "
                                     f"{num_steps} sampling steps (t counts down from {num_steps - 1} to 0)")
        elif self.guide_from_step >= num_steps:
            raise IGDSInputError(f"--guide-from-step {self.guide_from_step} is past the last of {num_steps} "
                                 "sampling steps")
