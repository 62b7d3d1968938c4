"""The peers: what a user would run instead of our sampler, on the same weights, jobs and guidance.

    gd-fp32 / gd-fp16     ADM presets: guided-diffusion's own SpacedDiffusion loop (guided-diffusion-sdk,
                          as a library) with its UNetModel holding our weights, fp32 or its fp16 mode
    minimax-b1 / minimax  DiT presets: DiT's diffusion looping DiT's forward_with_cfg (DoubledBatchCFG),
                          at batch 1 as MinimaxDiffusion's sample.py, or at our batch size

each with the IGDS gradient of igds_fast.frontends.IGDSConditioner (bench/sampler.py's docstring has
the details), and `same_math_check`: our eager fp32 step against gd-fp32's, interleaved step by step.
"""
from __future__ import annotations

import contextlib
import time

import torch
import torch.nn as nn

from bench.models import LATENT_STEPS_PER_IMAGE, PRESETS, STEPS_PER_IMAGE, HalfPrecisionVE
from bench.timing import DEVICE, batch_jobs, our_loop, synchronize, timed_loop
from igds_fast.models.adm import ADM_DIFFUSION_FLAGS, ADMUNet
from igds_fast.models.cfg import ClassifierFreeGuidance
from igds_fast.sampling import Sampler
from igds_fast.seeding import INITIAL_NOISE_STREAM

# The peers: name -> the presets they apply to ("adm": pixel ADM, "latent": DiT).
PEER_VARIANTS = {"gd-fp32": "adm", "gd-fp16": "adm", "minimax-b1": "latent", "minimax": "latent"}


class DoubledBatchCFG(nn.Module):
    """DiT's `forward_with_cfg` (its models.py) around our DiT: the loop's doubled batch in and out.

    x [2B, C, H, W] = [z; z] (only x[:B] is read), t [2B], y [2B] = [labels; null], cfg_scale s ->
    [2B, 2C, H, W]: the DiT runs [x[:B]; x[:B]] with y; the first `guided_channels` eps channels are
    uncond + s (cond - uncond) for both halves, the rest are the DiT's own rows (DiT's `eps, rest =
    out[:, :3], out[:, 3:]`). MinimaxDiffusion's sample.py drives it through guided-diffusion's
    p_sample_loop at B = 1. Written here from that description (DiT's models.py needs timm).
    """

    def __init__(self, dit: nn.Module, guided_channels: int = 3):
        super().__init__()
        self.dit, self.guided_channels, self.null_class = dit, guided_channels, dit.null_class

    def forward(self, x, t, y, cfg_scale):
        half = x[: len(x) // 2]
        out = self.dit(torch.cat([half, half]), t, y)
        g, rows = self.guided_channels, len(half)
        conditional, unconditional = out[:rows, :g], out[rows:, :g]
        eps = unconditional + cfg_scale * (conditional - unconditional)
        return torch.cat([torch.cat([eps, eps]), out[:, g:]], dim=1)


@contextlib.contextmanager
def tf32_allowed():
    """MinimaxDiffusion's sample.py sets allow_tf32 for matmuls and cuDNN: its rows run so, then restored."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


class Peer:
    """A peer sampler: guided-diffusion's own SpacedDiffusion loop with the IGDS gradient of
    `igds_fast.frontends.IGDSConditioner` (patched condition_mean, mode x0: the gradient at the loop's
    own pred_xstart, no extra UNet call), on the same weights and (class, seed) jobs as our rows.

    model: what the loop calls (guided-diffusion's UNetModel, or DoubledBatchCFG); cfg_scale: None for
    a pixel ADM, else the doubled CFG batch of DiT / MinimaxDiffusion; fixed_batch: 1 for minimax-b1.
    """

    def __init__(self, name, model, diffusion, conditioner, prior_labels, shape, clip_denoised, cfg_scale=None,
                 fixed_batch=None, numerics=contextlib.nullcontext):
        self.name, self.model, self.diffusion, self.conditioner = name, model, diffusion, conditioner
        self.prior_labels, self.shape, self.clip_denoised = prior_labels, shape, clip_denoised
        self.cfg_scale, self.fixed_batch, self.numerics = cfg_scale, fixed_batch, numerics

    @contextlib.contextmanager
    def loop(self, batch: int, guided: bool = True):
        """advance() running the next iteration of the diffusion's own p_sample_loop_progressive
        (p_sample_loop is that generator run to its end): one p_sample, the IGDS shift inside."""
        labels, seeds = batch_jobs(batch)
        x = PEER_NOISE(seeds, INITIAL_NOISE_STREAM, self.shape, DEVICE)
        y = self.prior_labels(labels)
        kwargs = {} if y is None else {"y": y}
        if self.cfg_scale is not None:  # sample.py: z = cat([z, z]), y = cat([y, null])
            x = torch.cat([x, x])
            kwargs = {"y": torch.cat([y, torch.full_like(y, self.model.null_class)]), "cfg_scale": self.cfg_scale}
        # cond_fn only switches the shift on: the patched condition_mean computes IGDS from p_mean_var.
        steps = self.diffusion.p_sample_loop_progressive(
            self.model, tuple(x.shape), noise=x, clip_denoised=self.clip_denoised,
            cond_fn=self.conditioner.cond_fn if guided else None, model_kwargs=kwargs, device=DEVICE)
        try:
            with self.numerics():
                yield lambda: next(steps)
        finally:
            steps.close()

    def time(self, batch: int, warmup: int, steps: int, repeats: int, label: str, guided: bool = True) -> dict:
        """timed_loop over the peer's own loop (`loop`)."""
        with self.loop(batch, guided) as advance:
            return timed_loop(advance, self.diffusion.num_timesteps, warmup, steps, repeats, label, False)


def same_math_check(eager: Sampler, peer: Peer, batch: int, rounds: int) -> dict:
    """Our eager fp32 step against guided-diffusion's fp32 step (gd-fp32) on the same work, interleaved:
    one warm-up step each, then `rounds` rounds of one step of each (order alternating), every step
    timed alone between synchronisations; each side's fastest step counts, so load from other processes
    (which only ever adds time) cancels out of the ratio. ratio = ours / theirs (> 1 = ours slower)."""
    ours_s, theirs_s = [], []
    with our_loop(eager, batch) as ours, peer.loop(batch) as theirs:
        ours()
        theirs()
        synchronize()
        for k in range(rounds):
            for advance, times in ((ours, ours_s), (theirs, theirs_s))[:: 1 if k % 2 == 0 else -1]:
                start = time.perf_counter()
                advance()
                synchronize()
                times.append(time.perf_counter() - start)
    return {"batch": batch, "rounds": rounds, "ours_ms": min(ours_s) * 1e3, "gd_fp32_ms": min(theirs_s) * 1e3,
            "ratio": min(ours_s) / min(theirs_s)}


def _peer_noise():
    from igds_fast.sampling.backends import resolve_noise_source

    return resolve_noise_source("torch")[0]


PEER_NOISE = _peer_noise()  # x_T of the peers' jobs: our eager rows' torch noise, the same seeds


def guided_diffusion_modules():
    """guided-diffusion's own script_util (guided-diffusion-sdk, the original openai code)."""
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # its torch.cuda.amp decorators
            from guided_diffusion import script_util
    except ImportError as error:
        raise RuntimeError("guided-diffusion-sdk is not importable (pip install --no-deps "
                           "guided-diffusion-sdk==1.0.0, or carry bench/wheels/)") from error
    return script_util


def build_gd_peer(preset: str, unet: ADMUNet, reference: Sampler, class_map, use_fp16: bool) -> Peer:
    """gd-fp32 / gd-fp16: guided-diffusion's UNetModel (our weights, key for key) with use_fp16 and, for
    fp16, its convert_to_fp16() torso and a float16 encoder (its classifier_use_fp16), in its own
    SpacedDiffusion respaced to 250 steps; the IGDS gradient through IGDSConditioner."""
    from igds_fast.frontends import IGDSConditioner, label_map_from_class_map
    from igds_fast.guidance import IGDSGuidance

    script_util = guided_diffusion_modules()
    flags = {k: v for k, v in PRESETS[preset][0].items() if k != "use_fp16"}
    if not isinstance(flags.get("channel_mult", ""), str):
        flags["channel_mult"] = ",".join(str(m) for m in flags["channel_mult"])
    with torch.device(DEVICE):
        model = script_util.create_model(**{**flags, "dropout": 0.0}, use_checkpoint=False, use_fp16=use_fp16)
    model.load_state_dict(unet.state_dict(), strict=True)
    if use_fp16:
        model.convert_to_fp16()
    model = model.eval().requires_grad_(False)
    schedule = ADM_DIFFUSION_FLAGS[PRESETS[preset][1]]
    diffusion = script_util.create_gaussian_diffusion(
        steps=schedule["diffusion_steps"], learn_sigma=unet.learn_sigma, noise_schedule=schedule["noise_schedule"],
        timestep_respacing=str(STEPS_PER_IMAGE))
    guidance = reference.guidance_fn
    if use_fp16:
        guidance = IGDSGuidance.from_config(HalfPrecisionVE(reference.ve, torch.float16), reference.guidance)
    label_map = None if class_map is None else label_map_from_class_map(class_map, unet.num_classes)
    conditioner = IGDSConditioner(guidance, reference.guidance.scale, label_map, mode="x0", clip_denoised=True)
    conditioner.patch(diffusion, model)
    name = "gd-fp16" if use_fp16 else "gd-fp32"
    return Peer(name, model, diffusion, conditioner, reference.prior_labels,
                (reference.channels, reference.image_size, reference.image_size), clip_denoised=True)


def build_minimax_peer(prior: ClassifierFreeGuidance, reference: Sampler, class_map, batch_one: bool) -> Peer:
    """minimax-b1 / minimax: DiT's diffusion (guided-diffusion's code: create_diffusion("50") =
    linear, 1000 steps, learned sigma, respaced) looping DoubledBatchCFG of the same DiT, fp32 with TF32
    allowed as MinimaxDiffusion's sample.py; at B = 1 as it samples, or at our batch size."""
    from igds_fast.frontends import IGDSConditioner, label_map_from_class_map

    script_util = guided_diffusion_modules()
    model = DoubledBatchCFG(prior.prior, prior.guided_channels).eval()
    diffusion = script_util.create_gaussian_diffusion(steps=1000, learn_sigma=True, noise_schedule="linear",
                                                      timestep_respacing=str(LATENT_STEPS_PER_IMAGE))
    label_map = None if class_map is None else label_map_from_class_map(class_map, prior.num_classes)
    conditioner = IGDSConditioner(reference.guidance_fn, reference.guidance.scale, label_map, mode="x0",
                                  clip_denoised=False)
    conditioner.patch(diffusion, model)
    return Peer("minimax-b1" if batch_one else "minimax", model, diffusion, conditioner, reference.prior_labels,
                (reference.channels, reference.image_size, reference.image_size), clip_denoised=False,
                cfg_scale=prior.scale, fixed_batch=1 if batch_one else None, numerics=tf32_allowed)


__all__ = ["PEER_NOISE", "PEER_VARIANTS", "DoubledBatchCFG", "Peer", "build_gd_peer", "build_minimax_peer",
           "guided_diffusion_modules", "same_math_check", "tf32_allowed"]
