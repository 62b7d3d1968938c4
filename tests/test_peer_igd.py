"""IGD's own guided loop (Lokshaw-Chau/MinimaxDiffusion master: the diffusion/ its igd_sample.py builds, with
the `t[0] >= low and t[0] <= high` gate in its p_sample) against igds_fast's window and conditioner.

1. IGD's gate, read off IGD's own p_sample (gen_type "igd"): the steps its gradient matching runs at
   are exactly the steps `--guide-t-range LOW:HIGH` / `IGDSConditioner(window=(LOW, HIGH))` guide.
2. IGD's loop with the conditioner (the README's IGD route: patch + cond_fn, gen_type "none" so IGD's own
   guidance is off) over 50 steps with window (30, 45) = `igds-fast distill --guide-t-range 30:45`,
   0 levels apart; mode xt takes the loop's own autograd graph (no second forward).

Injected into IGD's code, and nothing else: `wandb` (its experiment logger, called only in branches of
its own guidance) as a stub module, and the noise (its `th.randn_like` returns our per-step noise).
Skipped, saying why, without its code (bash tests/fetch_peers.sh) or timm (its models.py imports it).
"""
from __future__ import annotations

import types

import pytest
import torch

from igds_fast import GuidanceConfig, IGDSGuidance, load_vae, load_ve
from igds_fast.frontends import IGDSConditioner
from peer_runs import (CFG_SCALE, LATENT, cli_pixels, decoded_levels, feed_noise, levels_apart, peer_dit, peer_labels,
                       run_cli, same_noise, write_models)
from peers import load_peer

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS, LOW, HIGH = 50, 30, 45  # IGD's scripts: a 50-step DiT loop, --low 30 --high 45 in its own t
SCALE, BETA = 300.0, 0.3


@pytest.fixture(scope="module")
def igd():
    stub = types.ModuleType("wandb")
    stub.log = lambda *args, **kwargs: None  # IGD logs its own guidance's magnitudes: not reached here
    return load_peer("igd", "models", "diffusion", "diffusion.gaussian_diffusion", stubs={"wandb": stub})


@pytest.fixture(scope="module")
def files(igd, tmp_path_factory):
    model = peer_dit(igd["models"], minimax=True)  # IGD samples MinimaxDiffusion's DiT (DiffFit blocks)
    return {**write_models(tmp_path_factory.mktemp("igd"), model.state_dict(), minimax=True), "model": model}


class _Guided(Exception):
    """Raised by the probe at the first thing IGD's gradient matching touches."""


def test_igds_gate_steps_are_the_t_range_steps(igd, files):
    model = files["model"]
    diffusion = igd["diffusion"].create_diffusion(str(STEPS))
    probe = types.SimpleNamespace(decode=lambda *args, **kwargs: (_ for _ in ()).throw(_Guided()))
    y = torch.tensor([1, 2, 4, 4])  # [y; null]
    x = torch.randn(4, *LATENT)
    gated = []
    for i in range(STEPS):
        model_kwargs = dict(y=y, cfg_scale=CFG_SCALE, gen_type="igd", low=LOW, high=HIGH, pseudo_memory_c=[],
                            neg_e=0.0, gm_resource=[probe])
        try:
            diffusion.p_sample(model.forward_with_cfg, x, torch.full((4,), i), clip_denoised=False,
                               model_kwargs=model_kwargs)
        except _Guided:
            gated.append(i)
    assert gated and gated == [i for i in range(STEPS) if GuidanceConfig(guide_t_range=(LOW, HIGH)).guides(i, STEPS)]
    conditioner = IGDSConditioner(IGDSGuidance(load_ve(files["ve"]), decoder=load_vae(files["vae"])),
                                  window=(LOW, HIGH))
    assert gated == [i for i in range(STEPS) if conditioner.guides(torch.full((4,), i), indices_given=True)]
    # In our step numbering (0 = the first step from noise) that is 4..19 of 50.
    assert sorted(STEPS - 1 - i for i in gated) == list(range(4, 20))


@pytest.mark.parametrize("mode", ["x0", "xt"])
def test_igds_loop_with_the_window_equals_our_cli(igd, files, tmp_path, monkeypatch, mode):
    from diffusers import AutoencoderKL

    out = tmp_path / "ours"
    manifest = run_cli(files, out, "--steps", str(STEPS), "--scale", str(SCALE), "--beta", str(BETA), "--mode", mode,
                       "--guide-t-range", f"{LOW}:{HIGH}")
    model = files["model"]
    diffusion = igd["diffusion"].create_diffusion(str(STEPS))
    guidance = IGDSGuidance(load_ve(files["ve"]), beta=BETA, decoder=load_vae(files["vae"]))
    conditioner = IGDSConditioner(guidance, scale=SCALE, mode=mode, clip_denoised=False, window=(LOW, HIGH))
    conditioner.patch(diffusion, model.forward_with_cfg)
    forwards = []
    forward = model.forward  # forward_with_cfg calls self.forward: count the DiT's forwards there

    def counted(*args, **kwargs):
        forwards.append(1)
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", counted)
    z, noises = same_noise(manifest, STEPS)
    left = feed_noise(monkeypatch, igd["diffusion.gaussian_diffusion"], noises)
    _, y = peer_labels(manifest)
    z = torch.cat([z, z], 0)
    samples = diffusion.p_sample_loop(model.forward_with_cfg, z.shape, z, clip_denoised=False,
                                      cond_fn=conditioner.cond_fn, device="cpu",
                                      model_kwargs=dict(y=y, cfg_scale=CFG_SCALE, gen_type="none", low=LOW, high=HIGH))
    assert left == [] and len(forwards) == STEPS  # one DiT forward a step, in mode xt too (the loop's own graph)
    theirs = decoded_levels(AutoencoderKL.from_pretrained(files["vae"]), samples.detach().chunk(2, dim=0)[0])
    ours = cli_pixels(out, manifest)
    assert levels_apart(ours, theirs) == 0
    whole = run_cli(files, tmp_path / "whole", "--steps", str(STEPS), "--scale", str(SCALE), "--beta", str(BETA),
                    "--mode", mode)
    assert levels_apart(cli_pixels(tmp_path / "whole", whole), ours) > 5  # the window changed the images
