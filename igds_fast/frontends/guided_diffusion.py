"""IGDS guidance for the guided-diffusion family of samplers: `IGDSConditioner`.

guided-diffusion (openai), DiT's `diffusion/`, MinimaxDiffusion, IGD and their forks sample with a
`GaussianDiffusion` / `SpacedDiffusion` whose `p_sample` computes `p_mean_var` (mean, variance,
log_variance, pred_xstart) and, given a `cond_fn`, shifts the mean by `condition_mean`:

    mean~ = mean + variance * cond_fn(x_t, t, **model_kwargs)

IGDS's shift is `mean + scale * variance * dJ/dx0` at the x0 prediction (mode "x0"), or dJ/dx_t
through the UNet (mode "xt"); J = log p(y|x0) + beta KL - gamma InfoNCE from an `IGDSGuidance`.

Their DDIM (`ddim_sample`, `ddim_sample_loop`: guided-diffusion's `--use_ddim`) guides through
`condition_score` instead, Song et al.'s score shift of the predicted noise:

    eps~ = eps(x_t) - sqrt(1 - abar_t) * cond_fn(x_t, t, **model_kwargs);  pred_xstart, mean from eps~

The conditioner gives both the same gradient, scale * dJ/dx (dJ/dx0 at pred_xstart, or dJ/dx_t): the
score grad log p(x_t) = -eps / sqrt(1 - abar_t) moves by scale * dJ/dx in either, which
condition_mean turns into the mean shift variance * scale * dJ/dx and condition_score into the eps
shift above. So one conditioner serves `p_sample_loop` and `ddim_sample_loop`, and our
`Sampler(..., sampler="ddim")` step equals guided-diffusion's ddim_sample with it.
Three ways to hand it to such a sampler, none of which imports its code:

    conditioner = IGDSConditioner(guidance, scale=1.0, label_map=...)
    conditioner.patch(diffusion, model)         # diffusion.condition_mean computes IGDS at pred_xstart
    diffusion.p_sample_loop(model, shape, noise=noise, cond_fn=conditioner.cond_fn, model_kwargs={"y": y})

    conditioner.bind(model, diffusion)          # an unpatched diffusion: cond_fn runs the UNet itself
    diffusion.p_sample_loop(..., cond_fn=conditioner.cond_fn, ...)         (one more UNet forward a step)

    # forks whose p_sample_loop takes cond_fn_with_grad=True: p_mean_var computed with grad
    diffusion.p_sample_loop(..., cond_fn=conditioner.cond_fn_with_grad, cond_fn_with_grad=True, ...)

IGD's loop (`Lokshaw-Chau/MinimaxDiffusion` master, the diffusion its igd_sample.py builds) takes the
patch route: its p_sample calls condition_mean whenever cond_fn is given, and reads gen_type / low /
high from model_kwargs (gen_type other than "igd" / "rgd": no gradient matching of its own). Its
`--low/--high` window is `window=(low, high)`, in the same t it gates on; it runs its UNet with
autograd on, so mode xt differentiates the loop's own x0 prediction (no second forward):

    conditioner = IGDSConditioner(guidance, scale, label_map, clip_denoised=False, window=(30, 45))
    conditioner.patch(diffusion, model.forward_with_cfg)
    diffusion.p_sample_loop(model.forward_with_cfg, z.shape, z, clip_denoised=False, cond_fn=conditioner.cond_fn,
                            model_kwargs=dict(y=y, cfg_scale=4.0, gen_type="none"), device=device)

Unguided steps (scale 0, or outside the window) return before any gradient work: a patched
condition_mean gives the loop's own mean, the cond_fn routes zeros, without a UNet call.

Labels: the model's `y` are the prior's classes (ImageNet indices for an ImageNet ADM or DiT); the
VE's classes come from `label_map` (prior class -> VE class; -1 or absent = not a VE class, an error
if sampled). An unconditional prior has no `y`: give the VE labels with `set_labels`.

Classifier-free guidance batches (DiT's and MinimaxDiffusion's `sample.py`): their loop runs the
doubled batch through `model.forward_with_cfg`,

    z = cat([z, z]); y = cat([y, null * ones(B)])                       x: 2B rows [sample; copy]
    conditioner = IGDSConditioner(guidance, scale, label_map, mode, clip_denoised=False)
    conditioner.patch(diffusion, model.forward_with_cfg)                 (or bind: the cond_fn route)
    samples = diffusion.p_sample_loop(model.forward_with_cfg, z.shape, z, clip_denoised=False,
                                      model_kwargs=dict(y=y, cfg_scale=s), cond_fn=conditioner.cond_fn,
                                      device=device)
    samples, _ = samples.chunk(2, dim=0)

A batch is a CFG batch when `cfg_scale` is in model_kwargs. It must have an even number 2B of rows,
and the second half of `y` must be the null class wherever the null class is known (the `null_class`
argument, else the bound model's: `null_class`, the owner's of a bound method such as
`dit.forward_with_cfg`, or DiT's `y_embedder` whose table has a row past num_classes; unknown = not
checked). The halves of x are not compared: DiT's forward_with_cfg reads only x[:B] (and returns the
same eps for both halves), so the second half is inert. The VE labels are those of y[:B] (through
label_map; `set_labels` and `group_ids` then describe the B samples), and the IGDS objective is that
of the first half's x0 prediction pred_xstart[:B] (decoded by the guidance's decoder). The gradient
is [2B] as condition_mean adds it to the 2B mean: mode x0 gives dJ/dx0 for the first half and zeros
for the second; mode xt gives dJ/dx of the first-half objective w.r.t. the whole 2B x by autograd
through forward_with_cfg, which is zero on the second half too for DiT's (it never reads x[B:]). The
second half's mean is thus not shifted, and as forward_with_cfg re-duplicates x[:B] at every step
only the first half -- the loop's output samples.chunk(2)[0] -- carries the guidance. DiT samples
latents with clip_denoised=False: pass clip_denoised=False here too (a CFG batch with
clip_denoised=True is refused: the xt mode and the cond_fn route predict x0 themselves with it).
"""
from __future__ import annotations

import types
from typing import Mapping, Sequence

import torch

from ..errors import IGDSInputError
from ..guidance import GRADIENT_MODES, IGDSGuidance


class IGDSConditioner:
    """The IGDS gradient in the form the guided-diffusion family takes (module docstring).

    guidance: the IGDSGuidance (VE, beta, tau, gamma, head); scale: the guidance scale s (>= 0);
    label_map: prior class -> VE class, a sequence (index = prior class), a mapping or a tensor,
    -1 for classes outside the VE; None = the same indices. mode: "x0" or "xt"; clip_denoised: the
    x0 clipping the diffusion's own sampling uses (guided-diffusion's `clip_denoised`), for the
    routes where this object predicts x0 itself. group_ids: diversity groups (gamma != 0) of the
    batch; None = the VE labels. null_class: the prior's null class for classifier-free guidance
    batches (`cfg_scale` in model_kwargs: module docstring); None = the bound model's if it has one.
    window: (low, high) = guide only the steps whose t, the respaced index the loop passes to
    p_sample (N-1, pure noise, down to 0), is in [low, high] (IGD's --low/--high gate; our
    `GuidanceConfig.guide_t_range`); None = every step.

    Refused in one line: a CFG batch with clip_denoised=True (latents are never in [-1, 1]); an x0
    this object predicts itself that is not the loop's own pred_xstart (another model or clipping).
    """

    def __init__(self, guidance: IGDSGuidance, scale: float = 1.0, label_map=None, mode: str = "x0",
                 clip_denoised: bool = True, group_ids=None, null_class: int | None = None,
                 window: tuple[int, int] | None = None):
        if not isinstance(guidance, IGDSGuidance):
            raise IGDSInputError(f"guidance must be an IGDSGuidance, got {type(guidance).__name__}")
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale >= 0:
            raise IGDSInputError(f"scale must be a number >= 0, got {scale!r}")
        if mode not in GRADIENT_MODES:
            raise IGDSInputError(f"mode must be one of {GRADIENT_MODES}, got {mode!r}")
        self.guidance, self.scale, self.mode = guidance, float(scale), mode
        self.clip_denoised = bool(clip_denoised)
        self.label_map = _label_table(label_map)
        self.group_ids = group_ids
        if null_class is not None and (isinstance(null_class, bool) or not isinstance(null_class, int)
                                       or null_class < 0):
            raise IGDSInputError(f"null_class must be an integer >= 0 or None, got {null_class!r}")
        self.null_class = null_class
        if window is not None:
            window = tuple(window)
            if (len(window) != 2 or any(isinstance(v, bool) or not isinstance(v, int) for v in window)
                    or not 0 <= window[0] <= window[1]):
                raise IGDSInputError(f"window must be (low, high) with 0 <= low <= high, got {window!r}")
        self.window = window
        self.labels: torch.Tensor | None = None
        self.model = self.diffusion = None

    # ---- set-up ------------------------------------------------------------------------------------
    def bind(self, model, diffusion) -> "IGDSConditioner":
        """The UNet and diffusion the cond_fn route predicts x0 with (and the xt mode differentiates)."""
        self.model, self.diffusion = model, diffusion
        return self

    def set_labels(self, labels) -> "IGDSConditioner":
        """VE labels [B] of the batch, for an unconditional prior (no `y` in model_kwargs); None = from y."""
        self.labels = None if labels is None else torch.as_tensor(labels, dtype=torch.long)
        return self

    def patch(self, diffusion, model=None):
        """Make `diffusion.condition_mean` and `condition_score` (and their `_with_grad` forms where they
        exist) apply IGDS: p_sample's mean shift and ddim_sample's score shift (module docstring).

        The diffusion object's own p_sample / ddim_sample then passes the p_mean_var it computed: in
        mode x0 the gradient is taken at its pred_xstart (no extra UNet call); mode xt differentiates
        through the UNet (`model`, required) from x_t. An unguided step (scale 0, outside the window)
        returns the loop's own mean / p_mean_var before any gradient work. condition_score is the
        class's own, handed our gradient as its cond_fn (its eps and x0 algebra, its timestep map).
        Returns the diffusion (patched in place, this instance only); `unpatch` restores it.
        """
        if self.mode == "xt" and model is None and self.model is None:
            raise IGDSInputError("patch(diffusion, model): mode xt differentiates through the UNet: pass the model")
        self.bind(model if model is not None else self.model, diffusion)
        conditioner = self

        def condition_mean(diffusion_self, cond_fn, p_mean_var, x, t, model_kwargs=None):
            model_kwargs = model_kwargs or {}
            conditioner._cfg_half(x, model_kwargs)  # a CFG batch is checked at every step, guided or not
            if not conditioner.guides(t, indices_given=True):
                return p_mean_var["mean"]  # what the loop computes without a cond_fn, bit for bit
            grad = conditioner._gradient_at(p_mean_var, x, t, model_kwargs, indices_given=True)
            return p_mean_var["mean"].float() + p_mean_var["variance"] * grad.float()

        def condition_mean_with_grad(diffusion_self, cond_fn, p_mean_var, x, t, model_kwargs=None):
            return condition_mean(diffusion_self, cond_fn, p_mean_var, x, t, model_kwargs)

        def score_shift(own_name: str, with_grad: bool):
            own = getattr(type(diffusion), own_name)

            def condition_score(diffusion_self, cond_fn, p_mean_var, x, t, model_kwargs=None):
                model_kwargs = model_kwargs or {}
                conditioner._cfg_half(x, model_kwargs)
                if not conditioner.guides(t, indices_given=True):
                    return p_mean_var  # ddim_sample's own unconditioned path, bit for bit
                grad = conditioner._gradient_at(p_mean_var, x, t, model_kwargs, indices_given=True)
                fixed = (lambda x_, t_, p_, **kw: grad) if with_grad else (lambda x_, t_, **kw: grad)
                return own(diffusion_self, fixed, p_mean_var, x, t, model_kwargs=model_kwargs)

            return condition_score

        diffusion.condition_mean = types.MethodType(condition_mean, diffusion)
        if hasattr(type(diffusion), "condition_mean_with_grad"):
            diffusion.condition_mean_with_grad = types.MethodType(condition_mean_with_grad, diffusion)
        for name in ("condition_score", "condition_score_with_grad"):
            if hasattr(type(diffusion), name):
                setattr(diffusion, name, types.MethodType(score_shift(name, name.endswith("_with_grad")), diffusion))
        return diffusion

    @staticmethod
    def unpatch(diffusion):
        """Undo `patch` (the class's own condition_mean and condition_score again)."""
        for name in PATCHED:
            vars(diffusion).pop(name, None)
        return diffusion

    # ---- the cond_fn routes --------------------------------------------------------------------------
    def cond_fn(self, x, t, **model_kwargs) -> torch.Tensor:
        """scale * dJ/dx for an unpatched diffusion's condition_mean (t: the timesteps it passes).

        Predicts x0 itself with the bound model and diffusion (`bind`): a forward pass without
        gradient in mode x0, through autograd from x_t in mode xt.
        """
        if self.model is None or self.diffusion is None:
            raise IGDSInputError("cond_fn predicts x0 with the UNet: call bind(model, diffusion) first (or patch)")
        self._cfg_half(x, model_kwargs)
        if not self.guides(t, indices_given=False):
            return torch.zeros_like(x)  # before any UNet call: an unguided step costs what the loop costs
        return self._gradient_at(None, x, t, model_kwargs, indices_given=False)

    def cond_fn_with_grad(self, x, t, p_mean_var, **model_kwargs) -> torch.Tensor:
        """scale * dJ/dx for forks that compute p_mean_var with autograd on (cond_fn_with_grad=True).

        Mode x0 takes the gradient at the detached pred_xstart; mode xt differentiates
        pred_xstart w.r.t. x (the fork enabled autograd for it).
        """
        half = self._cfg_half(x, model_kwargs)
        if not self.guides(t, indices_given=False):
            return torch.zeros_like(x)
        return self._gradient_from(p_mean_var["pred_xstart"], x, model_kwargs, half)

    def guides(self, t, indices_given: bool) -> bool:
        """Whether the loop's step at t is guided: scale > 0 and, with a window, low <= t <= high for
        the respaced index t the loop passes to p_sample (`indices_given`: t is that index, as a
        patched condition_mean receives it; else the original timesteps a SpacedDiffusion hands its
        wrapped cond_fn, mapped back through the bound diffusion). One host read of t per step, as
        the loop's own `t[0]` checks."""
        if self.scale == 0:
            return False
        if self.window is None:
            return True
        index = t if indices_given or self.diffusion is None else self._indices(torch.as_tensor(t))
        step = int(torch.as_tensor(index).reshape(-1)[0])
        low, high = self.window
        return low <= step <= high

    # ---- the gradient ----------------------------------------------------------------------------------
    def _gradient_at(self, p_mean_var, x, t, model_kwargs, indices_given: bool) -> torch.Tensor:
        half = self._cfg_half(x, model_kwargs)
        if self.mode == "x0" and p_mean_var is not None:
            return self._gradient_from(p_mean_var["pred_xstart"].detach(), None, model_kwargs, half)
        if p_mean_var is not None and p_mean_var["pred_xstart"].requires_grad and x.requires_grad:
            # Mode xt in a loop that ran its UNet with autograd on (IGD's): differentiate the loop's own
            # x0 prediction -- no second UNet forward.
            return self._gradient_from(p_mean_var["pred_xstart"], x, model_kwargs, half)
        indices = t if indices_given else self._indices(t)
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(self.mode == "xt")
            # model_kwargs as the loop passes them (y, and cfg_scale for a CFG batch's forward_with_cfg)
            out = self.diffusion.p_mean_variance(self.model, x_in, indices, clip_denoised=self.clip_denoised,
                                                 model_kwargs=model_kwargs)
            if p_mean_var is not None:
                _check_same_x0(out["pred_xstart"].detach(), p_mean_var["pred_xstart"].detach(), self.clip_denoised)
            x0 = out["pred_xstart"] if self.mode == "xt" else out["pred_xstart"].detach()
            return self._gradient_from(x0, x_in if self.mode == "xt" else None, model_kwargs, half)

    def _gradient_from(self, x0, x, model_kwargs, half: int | None = None) -> torch.Tensor:
        """scale * dJ/dx; half = B for a CFG batch of 2B rows: J of x0[:B] alone (module docstring)."""
        if half is not None:
            x0 = x0[:half]
            if model_kwargs.get("y") is not None:
                model_kwargs = {**model_kwargs, "y": torch.as_tensor(model_kwargs["y"])[:half]}
        labels = self._ve_labels(model_kwargs, x0)
        group_ids = None if self.group_ids is None else torch.as_tensor(self.group_ids, device=x0.device)
        wrt = x if self.mode == "xt" else None
        if wrt is not None and not x0.requires_grad:
            raise IGDSInputError("mode xt needs pred_xstart computed from x with autograd on")
        _, grad = self.guidance(x0.float() if wrt is None else x0, labels, group_ids, wrt=wrt)
        if half is not None and wrt is None:  # mode x0: the second half (the copy) gets no shift
            grad = torch.cat([grad, torch.zeros_like(grad)])
        return self.scale * grad

    def _cfg_half(self, x, model_kwargs) -> int | None:
        """B for a classifier-free guidance batch of 2B rows (`cfg_scale` in model_kwargs), else None."""
        if "cfg_scale" not in model_kwargs:
            return None
        rows = int(x.shape[0])
        if rows % 2:
            raise IGDSInputError(f"a classifier-free guidance batch (cfg_scale given) has 2B rows [samples; "
                                 f"copies], got an odd batch of {rows}")
        half = rows // 2
        if self.clip_denoised:
            raise IGDSInputError("a classifier-free guidance (DiT) batch samples latents, which are never in [-1, 1]: "
                                 "clip_denoised=True would clip them; pass IGDSConditioner(..., clip_denoised=False), "
                                 "as the loop's own p_sample_loop(..., clip_denoised=False)")
        y = model_kwargs.get("y")
        if y is None:
            return half
        y = torch.as_tensor(y)
        if y.shape[:1] != (rows,):
            raise IGDSInputError(f"a classifier-free guidance batch of {rows} rows needs {rows} labels "
                                 f"[y; null], got y of shape {tuple(y.shape)}")
        null = self.null_class if self.null_class is not None else _null_class_of(self.model)
        if null is not None:
            second = y[half:].long()
            if bool((second != null).any()):
                bad = sorted(set(second[second != null].tolist()))
                raise IGDSInputError(f"a classifier-free guidance batch's labels must be [y; null]: the second "
                                     f"half has classes {bad[:10]}, not the null class {null}")
        return half

    def _ve_labels(self, model_kwargs, x0) -> torch.Tensor:
        if self.labels is not None:
            labels = self.labels.to(x0.device)
        elif model_kwargs.get("y") is not None:
            y = torch.as_tensor(model_kwargs["y"]).to(x0.device).long()
            if self.label_map is None:
                labels = y
            else:
                table = self.label_map.to(x0.device)
                if bool(((y < 0) | (y >= table.numel())).any()):
                    raise IGDSInputError(f"prior labels outside the label map of {table.numel()} classes")
                labels = table[y]
            if bool((labels < 0).any()):
                bad = sorted(set(y[labels < 0].tolist()))
                raise IGDSInputError(f"prior classes {bad[:10]} are not VE classes (label_map -1)")
        else:
            raise IGDSInputError("no labels: an unconditional prior's batch needs set_labels(VE labels)")
        if labels.shape != (x0.shape[0],):
            raise IGDSInputError(f"got {labels.numel()} labels for a batch of {x0.shape[0]}")
        return labels

    def _indices(self, t: torch.Tensor) -> torch.Tensor:
        """The diffusion's step indices of the timesteps a (spaced) diffusion passes its cond_fn."""
        diffusion = self.diffusion
        timesteps = t
        if getattr(diffusion, "rescale_timesteps", False):
            original = getattr(diffusion, "original_num_steps", diffusion.num_timesteps)
            timesteps = torch.round(t.float() * original / 1000.0)
        timesteps = timesteps.long()
        table = getattr(diffusion, "timestep_map", None)
        if table is None:
            return timesteps
        table = torch.as_tensor(table, dtype=torch.long, device=t.device)
        return torch.searchsorted(table, timesteps)


PATCHED = ("condition_mean", "condition_mean_with_grad", "condition_score", "condition_score_with_grad")
X0_TOLERANCE = 1e-4  # relative: the conditioner's own x0 against the loop's (the same computation)


def _check_same_x0(ours: torch.Tensor, loops: torch.Tensor, clip_denoised: bool) -> None:
    """Refuse, in one line, an x0 prediction that is not the loop's own (another model, another
    clip_denoised, another model_kwargs): the gradient would be taken somewhere the loop is not."""
    scale = float(loops.abs().max()) + 1.0
    error = float((ours.float() - loops.float()).abs().max())
    if not error <= X0_TOLERANCE * scale:
        raise IGDSInputError(
            f"the x0 this conditioner predicts (its model, clip_denoised={clip_denoised}) differs from the loop's own "
            f"pred_xstart by {error:.3g}: pass the model and clip_denoised the loop samples with")


def _null_class_of(model) -> int | None:
    """The null class of a CFG model (or of a bound method's owner, e.g. dit.forward_with_cfg), None if unknown.

    `null_class` (models.dit.DiT, models.cfg.ClassifierFreeGuidance), else DiT's layout (facebookresearch
    DiT, MinimaxDiffusion): a `y_embedder` whose embedding table has a row past num_classes.
    """
    for owner in (model, getattr(model, "__self__", None)):
        if owner is None:
            continue
        null = getattr(owner, "null_class", None)
        if null is not None:
            return int(null)
        embedder = getattr(owner, "y_embedder", None)
        classes = getattr(embedder, "num_classes", None)
        table = getattr(embedder, "embedding_table", None)
        rows = getattr(table, "num_embeddings", None)
        if isinstance(classes, int) and isinstance(rows, int) and rows > classes:
            return classes
    return None


def _label_table(label_map) -> torch.Tensor | None:
    """prior class -> VE class as a long tensor (-1 = not a VE class), from a sequence, mapping or tensor."""
    if label_map is None:
        return None
    if torch.is_tensor(label_map):
        return label_map.long().cpu()
    if isinstance(label_map, Mapping):
        if not label_map:
            raise IGDSInputError("label_map is empty")
        table = torch.full((max(int(k) for k in label_map) + 1,), -1, dtype=torch.long)
        for prior, ve in label_map.items():
            table[int(prior)] = int(ve)
        return table
    if isinstance(label_map, Sequence):
        return torch.tensor([int(v) for v in label_map], dtype=torch.long)
    raise IGDSInputError(f"label_map must be a sequence, mapping or tensor, got {type(label_map).__name__}")


def label_map_from_class_map(prior_class_map: Sequence[int], num_prior_classes: int) -> torch.Tensor:
    """The inverse of a Sampler's prior_class_map (VE class -> prior class): prior class -> VE class."""
    table = torch.full((int(num_prior_classes),), -1, dtype=torch.long)
    for ve_class, prior_class in enumerate(prior_class_map):
        table[int(prior_class)] = ve_class
    return table


__all__ = ["IGDSConditioner", "label_map_from_class_map"]
