"""DiT's own code (facebookresearch/DiT: models.py, diffusion/) driving IGDS through each documented route,
against `igds-fast distill` on the same checkpoint and noise (tests/peer_runs.py says how they are run).

Skipped, saying why, without DiT's code (bash tests/fetch_peers.sh) or timm (its models.py imports it).
"""
from __future__ import annotations

import pytest
import torch

from igds_fast import IGDSGuidance, load_vae, load_ve
from igds_fast.errors import IGDSInputError
from igds_fast.frontends import IGDSConditioner
from peer_runs import (CFG_SCALE, cli_pixels, decoded_levels, feed_noise, levels_apart, peer_dit, peer_labels,
                       run_cli, same_noise, write_models)
from peers import load_peer

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 10
SCALE, BETA = 300.0, 0.3  # a random DiT and VAE: the scale that moves the decoded images by ~12 levels


@pytest.fixture(scope="module")
def dit():
    code = load_peer("dit", "models", "diffusion", "diffusion.gaussian_diffusion")
    return code


@pytest.fixture(scope="module")
def files(dit, tmp_path_factory):
    model = peer_dit(dit["models"])
    return {**write_models(tmp_path_factory.mktemp("dit"), model.state_dict()), "model": model}


def peer_run(dit, files, monkeypatch, manifest, route: str, mode: str, scale: float = SCALE, clip: bool = False):
    """DiT's sample.py with the conditioner: `route` patch (condition_mean at the loop's own pred_xstart)
    or bind (an unpatched diffusion; cond_fn predicts x0 itself)."""
    from diffusers import AutoencoderKL

    model = files["model"]
    diffusion = dit["diffusion"].create_diffusion(str(STEPS))
    guidance = IGDSGuidance(load_ve(files["ve"]), beta=BETA, decoder=load_vae(files["vae"]))
    conditioner = IGDSConditioner(guidance, scale=scale, mode=mode, clip_denoised=clip)  # prior class = VE class
    if route == "patch":
        conditioner.patch(diffusion, model.forward_with_cfg)
    else:
        conditioner.bind(model.forward_with_cfg, diffusion)
    z, noises = same_noise(manifest, STEPS)
    left = feed_noise(monkeypatch, dit["diffusion.gaussian_diffusion"], noises)
    _, y = peer_labels(manifest)
    z = torch.cat([z, z], 0)
    with torch.no_grad():  # sample.py: torch.set_grad_enabled(False)
        samples = diffusion.p_sample_loop(model.forward_with_cfg, z.shape, z, clip_denoised=False,
                                          model_kwargs=dict(y=y, cfg_scale=CFG_SCALE), cond_fn=conditioner.cond_fn,
                                          device="cpu")
    assert left == []
    samples, _ = samples.chunk(2, dim=0)
    return decoded_levels(AutoencoderKL.from_pretrained(files["vae"]), samples)


@pytest.mark.parametrize("mode", ["x0", "xt"])
@pytest.mark.parametrize("route", ["patch", "bind"])
def test_each_route_equals_our_cli(dit, files, tmp_path, monkeypatch, route, mode):
    out = tmp_path / "ours"
    manifest = run_cli(files, out, "--steps", str(STEPS), "--scale", str(SCALE), "--beta", str(BETA), "--mode", mode)
    ours = cli_pixels(out, manifest)
    theirs = peer_run(dit, files, monkeypatch, manifest, route, mode)
    assert levels_apart(ours, theirs) <= 1, f"{route} {mode}: {levels_apart(ours, theirs)} levels"
    plain = run_cli(files, tmp_path / "plain", "--steps", str(STEPS), "--scale", "0")
    assert levels_apart(cli_pixels(tmp_path / "plain", plain), ours) > 10  # the guidance moved the images


def test_scale_0_is_the_original_sampler_bit_for_bit(dit, files, tmp_path, monkeypatch):
    """At scale 0 the conditioner returns before any gradient work: DiT's loop unchanged, = our CLI."""
    out = tmp_path / "ours"
    manifest = run_cli(files, out, "--steps", str(STEPS), "--scale", "0")
    ours = cli_pixels(out, manifest)
    for route in ("patch", "bind"):
        assert levels_apart(peer_run(dit, files, monkeypatch, manifest, route, "x0", scale=0.0), ours) == 0


def test_a_cfg_batch_with_clip_denoised_is_refused_in_one_line(dit, files, tmp_path, monkeypatch):
    manifest = run_cli(files, tmp_path / "ours", "--steps", "2", "--scale", "1")
    for route in ("patch", "bind"):
        with pytest.raises(IGDSInputError, match="clip_denoised=True would clip them") as info:
            peer_run(dit, files, monkeypatch, manifest, route, "x0", clip=True)
        assert "\n" not in str(info.value)
