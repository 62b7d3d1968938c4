"""MinimaxDiffusion's own code (vimar-gu/MinimaxDiffusion: models.py with DiffFit, diffusion/) against
`igds-fast distill` on a checkpoint in its training layout: bit for bit at scale 0, within a level
through each conditioner route (tests/peer_runs.py says how both are run).

Skipped, saying why, without its code (bash tests/fetch_peers.sh) or timm (its models.py imports it).
"""
from __future__ import annotations

import pytest
import torch

from igds_fast import DiffusionSchedule, GuidanceConfig, IGDSGuidance, Sampler, ScheduleConfig, load_vae, load_ve
from igds_fast.frontends import IGDSConditioner
from igds_fast.models.cfg import ClassifierFreeGuidance
from igds_fast.models.priors import describe_prior_file, load_prior_unet
from peer_runs import (CFG_SCALE, cli_pixels, decoded_levels, feed_noise, levels_apart, peer_dit, peer_labels,
                       run_cli, same_noise, write_models)
from peers import load_peer

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 10
SCALE, BETA = 300.0, 0.3  # a random DiT and VAE: the scale that moves the decoded images by ~10 levels


@pytest.fixture(scope="module")
def minimax():
    return load_peer("minimax", "models", "diffusion", "diffusion.gaussian_diffusion")


@pytest.fixture(scope="module")
def files(minimax, tmp_path_factory):
    model = peer_dit(minimax["models"], minimax=True)
    assert any("gamma" in name for name, _ in model.named_parameters())  # DiffFit blocks
    return {**write_models(tmp_path_factory.mktemp("minimax"), model.state_dict(), minimax=True), "model": model}


def their_latents(minimax, files, monkeypatch, manifest, conditioner=None, steps: int = STEPS) -> torch.Tensor:
    """MinimaxDiffusion's sample.py loop on the manifest's images and noise: the first half's latents."""
    model = files["model"]
    diffusion = minimax["diffusion"].create_diffusion(str(steps))
    if conditioner is not None and conditioner[0] == "patch":
        conditioner[1].patch(diffusion, model.forward_with_cfg)
    elif conditioner is not None:
        conditioner[1].bind(model.forward_with_cfg, diffusion)
    z, noises = same_noise(manifest, steps)
    left = feed_noise(monkeypatch, minimax["diffusion.gaussian_diffusion"], noises)
    _, y = peer_labels(manifest)
    z = torch.cat([z, z], 0)
    with torch.no_grad():
        samples = diffusion.p_sample_loop(model.forward_with_cfg, z.shape, z, clip_denoised=False,
                                          model_kwargs=dict(y=y, cfg_scale=CFG_SCALE), progress=False, device="cpu",
                                          cond_fn=None if conditioner is None else conditioner[1].cond_fn)
    assert left == []
    return samples.chunk(2, dim=0)[0]


def test_scale_0_latents_and_images_are_its_own_bit_for_bit(minimax, files, tmp_path, monkeypatch):
    from diffusers import AutoencoderKL

    out = tmp_path / "ours"
    manifest = run_cli(files, out, "--steps", str(STEPS), "--scale", "0")
    theirs = their_latents(minimax, files, monkeypatch, manifest)
    # Our loop on the checkpoint as distill loads it (its EMA weights, DiffFit scales), latents undecoded.
    spec = describe_prior_file(files["prior"], None, ve_class_names=load_ve(files["ve"]).class_names)
    sampler = Sampler(ClassifierFreeGuidance(load_prior_unet(spec, "cpu"), CFG_SCALE, 3),
                      DiffusionSchedule(ScheduleConfig(sampling_steps=str(STEPS))), load_ve(files["ve"]),
                      GuidanceConfig(scale=0.0, clip_x0=False), decoder=load_vae(files["vae"]))
    labels = torch.tensor([entry["label"] for entry in manifest["images"]])
    ours = sampler.sample(labels, [entry["seeds"][0] for entry in manifest["images"]], decode=False)
    assert torch.equal(ours, theirs), f"max |difference| {float((ours - theirs).abs().max()):.3g}"
    assert levels_apart(cli_pixels(out, manifest), decoded_levels(AutoencoderKL.from_pretrained(files["vae"]),
                                                                  theirs)) == 0


@pytest.mark.parametrize("mode", ["x0", "xt"])
@pytest.mark.parametrize("route", ["patch", "bind"])
def test_each_route_equals_our_cli(minimax, files, tmp_path, monkeypatch, route, mode):
    from diffusers import AutoencoderKL

    out = tmp_path / "ours"
    manifest = run_cli(files, out, "--steps", str(STEPS), "--scale", str(SCALE), "--beta", str(BETA), "--mode", mode)
    guidance = IGDSGuidance(load_ve(files["ve"]), beta=BETA, decoder=load_vae(files["vae"]))
    conditioner = IGDSConditioner(guidance, scale=SCALE, mode=mode, clip_denoised=False)
    latents = their_latents(minimax, files, monkeypatch, manifest, (route, conditioner))
    theirs = decoded_levels(AutoencoderKL.from_pretrained(files["vae"]), latents)
    ours = cli_pixels(out, manifest)
    assert levels_apart(ours, theirs) <= 1, f"{route} {mode}: {levels_apart(ours, theirs)} levels"
    plain = run_cli(files, tmp_path / "plain", "--steps", str(STEPS), "--scale", "0")
    assert levels_apart(cli_pixels(tmp_path / "plain", plain), ours) > 5  # the guidance moved the images
