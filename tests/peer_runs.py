"""What the per-peer tests share: a latent prior written by the peer's own model class, our CLI's run of it,
and the peer's own loop fed the same noise (its `th.randn_like` returns our per-step noise, in order).

The flow of DiT's and MinimaxDiffusion's sample.py, and of IGD's igd_sample.py, as their users run it:

    z = cat([z, z]); y = cat([y, null]); model_kwargs = dict(y=y, cfg_scale=s, ...)
    samples = diffusion.p_sample_loop(model.forward_with_cfg, z.shape, z, clip_denoised=False,
                                      model_kwargs=model_kwargs, device=device)      (no grad)
    samples, _ = samples.chunk(2, dim=0); images = vae.decode(samples / 0.18215).sample

with igds_fast's conditioner handed to it as the README says. Our CLI's images are compared with the
peer's in uint8 levels after the same [-1, 1] -> uint8 mapping (`imageio.to_uint8`).
"""
from __future__ import annotations

import json
import os

import numpy as np
import torch
from PIL import Image

from factories import randomize_, tiny_vae, tiny_ve
from igds_fast import cli
from igds_fast.imageio import to_uint8
from igds_fast.seeding import INITIAL_NOISE_STREAM, seeded_normal

LATENT = (4, 8, 8)  # 4 latent channels, 8x8: a 16x16 image through the 2x VAE
NUM_CLASSES = 4  # the DiT's classes: the VE's, in the VE's order (the null class is 4)
CFG_SCALE = 4.0
SD_SCALING = 0.18215  # DiT's / MinimaxDiffusion's sample.py divide by this literal before decoding


def peer_dit(models, minimax: bool = False, seed: int = 5):
    """The peer's own DiT class (DiT-S width: 384, 6 heads), 2 blocks, random weights (DiffFit scales too)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = models.DiT(input_size=LATENT[1], patch_size=2, in_channels=LATENT[0], hidden_size=384, depth=2,
                           num_heads=6, num_classes=NUM_CLASSES, learn_sigma=True)
        pos_embed = model.pos_embed.detach().clone()
        randomize_(model, 0.05)
        with torch.no_grad():
            model.pos_embed.copy_(pos_embed)
            if minimax:  # DiffFit's scales, away from their initial ones
                for name, param in model.named_parameters():
                    if "gamma" in name:
                        param.uniform_(0.5, 1.5)
    return model.eval()


def write_models(folder, dit_state, minimax: bool = False) -> dict:
    """The checkpoint (DiT's plain state dict, or MinimaxDiffusion's training layout), the VAE folder and
    the VE bundle on disk, as the CLI takes them."""
    os.makedirs(folder, exist_ok=True)
    checkpoint = os.path.join(folder, "minimax.pt" if minimax else "dit.pt")
    if minimax:
        import argparse

        torch.save({"model": dit_state, "ema": dit_state, "opt": {}, "args": argparse.Namespace(model="DiT-S/2")},
                   checkpoint)
    else:
        torch.save(dit_state, checkpoint)
    with torch.random.fork_rng():
        torch.manual_seed(11)
        vae = tiny_vae(latent_channels=LATENT[0], scale_factor=2, scaling_factor=SD_SCALING)
        ve = tiny_ve(num_classes=NUM_CLASSES, channels=3, resolution=16)
    vae.save_pretrained(os.path.join(folder, "vae"))
    ve.class_names = ["a", "b", "c", "d"]
    ve.save(os.path.join(folder, "ve.safetensors"))
    return {"prior": checkpoint, "vae": os.path.join(folder, "vae"), "ve": os.path.join(folder, "ve.safetensors")}


def run_cli(files, out, *extra) -> dict:
    """`igds-fast distill` on the files, one image per class, one sample each; returns the manifest."""
    argv = ["distill", "--prior", files["prior"], "--vae", files["vae"], "--ve", files["ve"], "--ipc", "1",
            "--composite", "1", "--cfg-scale", str(CFG_SCALE), "--seed", "7", "--device", "cpu", "--quiet",
            "--out", str(out), *extra]
    assert cli.main(argv) == 0
    with open(os.path.join(out, "manifest.json"), encoding="utf-8") as handle:
        return json.load(handle)


def cli_pixels(out, manifest) -> np.ndarray:
    """The CLI's images [B, H, W, 3] in the manifest's order."""
    images = []
    for entry in manifest["images"]:
        with Image.open(os.path.join(out, entry["path"])) as image:
            images.append(np.asarray(image.convert("RGB")))
    return np.stack(images)


def same_noise(manifest, steps: int):
    """(z [B, 4, 8, 8], [per-step noise of the doubled batch, in the loop's order]): x_T and the step noise
    the CLI drew for each image's seed; the copies' noise never reaches a sample (forward_with_cfg reads
    x[:B]), they get zeros."""
    seeds = [entry["seeds"][0] for entry in manifest["images"]]
    z = seeded_normal(seeds, INITIAL_NOISE_STREAM, LATENT, "cpu")
    noises = []
    for i in reversed(range(steps)):
        noise = seeded_normal(seeds, i, LATENT, "cpu")
        noises.append(torch.cat([noise, torch.zeros_like(noise)]))
    return z, noises


def feed_noise(monkeypatch, gaussian_diffusion_module, noises) -> list:
    """The peer's `th.randn_like` returns `noises` in order (the one thing injected into its loop)."""
    queue = list(noises)
    monkeypatch.setattr(gaussian_diffusion_module.th, "randn_like", lambda x: queue.pop(0).clone())
    return queue


def peer_labels(manifest) -> tuple[torch.Tensor, torch.Tensor]:
    """(y = the prior's classes [B], the doubled [y; null] [2B]) of the manifest's images."""
    y = torch.tensor([entry["prior_label"] for entry in manifest["images"]])
    return y, torch.cat([y, torch.full_like(y, NUM_CLASSES)])


def decoded_levels(vae, latents: torch.Tensor) -> np.ndarray:
    """The sample.py decode of the first half's latents, as uint8 [B, H, W, 3] (to_uint8's mapping)."""
    with torch.no_grad():
        images = vae.decode(latents / SD_SCALING).sample
    return to_uint8(images.clamp(-1, 1))


def levels_apart(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(int) - b.astype(int)).max())
