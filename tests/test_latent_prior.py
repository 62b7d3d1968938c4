"""The latent prior (issue 14): classifier-free guidance, the VAE decoder, the IGDS gradient through it.

    prior   ClassifierFreeGuidance(DiT, s, g)   (igds_fast.models.cfg) against DiT's own forward_with_cfg,
                                                rewritten here from facebookresearch/DiT's models.py
    decoder LatentDecoder / load_vae            (igds_fast.models.vae) against diffusers' vae.decode(z / 0.18215)
    guidance IGDSGuidance(decoder=)             dJ/dz_latent against float64 autograd of J(f(decode(z)))
    sampler Sampler(decoder=)                   eager step (x0 and xt mode) against the whole chain in
                                                float64; end to end (decode, batch invariance); compiled
                                                (fp32, aot_eager) against eager; the self-check's
                                                "decoder" part and a planted decoder fault
    shapes  DiT-XL/2 at 256 px and SD's VAE     on the meta device (no weights, no arithmetic)

Models: tests/factories.py's tiny DiT (8x8x4 latents, patch 2, 6 classes + null), tiny AutoencoderKL
(8x8x4 -> 16x16x3, SD's layout) and ResNet-18 VE (4 classes at 16 px), random weights from a fresh seed.
The VE's 4 classes map to 4 of the DiT's 6 (prior_class_map), so VE labels, DiT labels and the null
class are three different things.

Tolerances: tests/tolerances.py. "elementwise" where the same operations run on the same values in
another batch arrangement; "reduction" for float32 against float64 through the decoder and encoder
(convolutions and their backward sum hundreds of terms in another order: ~2e-6 relative measured);
"trajectory" for compiled against eager sampling runs (tests/test_compiled.py's fp32 bound).
Latent priors are sampled without x0 clipping (DiT's sample.py: clip_denoised=False).
"""
from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from factories import away_from_max_pool_ties, max_pool_gap, tiny_adm, tiny_dit, tiny_vae, tiny_ve
from tolerances import MAX_POOL_TIE_MARGIN, tolerance

from igds_fast.diffusion import DiffusionSchedule, ScheduleConfig
from igds_fast.errors import IGDSInputError, IGDSNumericsError
from igds_fast.guidance import GuidanceConfig, IGDSGuidance
from igds_fast.guidance.objective import igds_objective
from igds_fast.models.cfg import ClassifierFreeGuidance
from igds_fast.models.dit import DIT_PRESETS, DiT
from igds_fast.models.vae import SD_VAE_SCALING_FACTOR, LatentDecoder, load_vae
from igds_fast.sampling import Sampler
from igds_fast.sampling.compiled import CompiledStep
from igds_fast.sampling.compiled.self_check import SELF_CHECK_TOLERANCES

pytestmark = pytest.mark.usefixtures("one_thread")

DIT_CLASSES = 6
VE_CLASSES = 4
LATENT = (4, 8, 8)
IMAGE = (3, 16, 16)
STEPS = "4"
CFG_SCALE = 4.0
AOT_FP32 = dict(dtype="fp32", backend="aot_eager")
FP32_COPIES = dict(dtype="fp32", compile=False, channels_last=False)


def random_seeds(count):
    return [int.from_bytes(os.urandom(8), "little") >> 1 for _ in range(count)]


def latent_models():
    """(tiny DiT with 6 classes + null, its LatentDecoder, a 4-class VE, VE class -> DiT class map)."""
    dit = tiny_dit(input_size=8, num_classes=DIT_CLASSES)
    decoder = LatentDecoder(tiny_vae(latent_channels=4, scale_factor=2))
    ve = tiny_ve(num_classes=VE_CLASSES, resolution=16)
    class_map = torch.randperm(DIT_CLASSES)[:VE_CLASSES].tolist()
    return dit, decoder, ve, class_map


def latent_sampler(prior, decoder, ve, class_map, steps=STEPS, **options):
    guidance = {"scale": 2.0, "beta": 0.5, "clip_x0": False}
    for name in list(options):
        if name in GuidanceConfig.__dataclass_fields__:
            guidance[name] = options.pop(name)
    schedule = DiffusionSchedule(ScheduleConfig(sampling_steps=steps))
    return Sampler(prior, schedule, ve, GuidanceConfig(**guidance), decoder=decoder, prior_class_map=class_map,
                   **options)


def one_line_error(error_type, pattern, call):
    with pytest.raises(error_type, match=pattern) as caught:
        call()
    assert "\n" not in str(caught.value), str(caught.value)
    return str(caught.value)


# ---- an independent classifier-free guidance: DiT's models.py ------------------------------------
def dit_forward_with_cfg(model, x, t, y, cfg_scale, guided_channels=3):
    """DiT's `forward_with_cfg`, line for line (guided_channels=C: the line its comment offers instead)."""
    half = x[: len(x) // 2]
    combined = torch.cat([half, half], dim=0)
    model_out = model.forward(combined, t, y)
    eps, rest = model_out[:, :guided_channels], model_out[:, guided_channels:]
    cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
    half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
    eps = torch.cat([half_eps, half_eps], dim=0)
    return torch.cat([eps, rest], dim=1)


def dit_cfg_batch(x, t, y, null):
    """DiT's sample.py batch: [z; z] (the second half is never read: NaN here), t twice, [y; null]."""
    return torch.cat([x, torch.full_like(x, float("nan"))]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, null)])


def random_dit_inputs(batch=3):
    x = torch.randn(batch, *LATENT)
    t = torch.randint(0, 1000, (batch,))
    y = torch.randint(0, DIT_CLASSES, (batch,))
    return x, t, y


# ---- 1. classifier-free guidance -------------------------------------------------------------------
@pytest.mark.parametrize("scale", [0.0, 1.5, CFG_SCALE])
@pytest.mark.parametrize("guided_channels", [3, 4])
def test_cfg_equals_dits_forward_with_cfg(rng_seed, guided_channels, scale):
    dit = tiny_dit(num_classes=DIT_CLASSES)
    x, t, y = random_dit_inputs()
    cfg = ClassifierFreeGuidance(dit, scale, guided_channels=guided_channels)
    with torch.no_grad():
        ours = cfg(x, t, y)
        expected = dit_forward_with_cfg(dit, *dit_cfg_batch(x, t, y, dit.null_class), scale, guided_channels)
        conditional = dit(x, t, y)
        unconditional = dit(x, t, torch.full_like(y, dit.null_class))
    assert ours.shape == (3, 8, 8, 8) and torch.isfinite(ours).all()
    torch.testing.assert_close(ours, expected[:3], **tolerance(torch.float32, "elementwise"))
    g = guided_channels
    # Channels after g (the 4th eps channel for g = 3, and all of v) are the conditional model's.
    torch.testing.assert_close(ours[:, g:], conditional[:, g:], **tolerance(torch.float32, "elementwise"))
    # The guided channels are neither half alone: the test sees a dropped or swapped half.
    torch.testing.assert_close(ours[:, :g], unconditional[:, :g] + scale * (conditional[:, :g] - unconditional[:, :g]),
                               **tolerance(torch.float32, "reduction"))
    assert (ours[:, :g] - conditional[:, :g]).abs().max() > 1e-4
    if scale != 0.0:
        assert (ours[:, :g] - unconditional[:, :g]).abs().max() > 1e-4


def test_cfg_scale_one_is_one_conditional_forward(rng_seed):
    dit = tiny_dit(num_classes=DIT_CLASSES)
    x, t, y = random_dit_inputs()
    batches = []
    dit.register_forward_hook(lambda module, inputs, output: batches.append(inputs[0].shape[0]))
    with torch.no_grad():
        ours = ClassifierFreeGuidance(dit, 1.0)(x, t, y)
        assert batches == [3]  # one forward of the batch itself, no unconditional half
        plain = dit(x, t, y)
        formula = dit_forward_with_cfg(dit, *dit_cfg_batch(x, t, y, dit.null_class), 1.0)[:3]
    assert torch.equal(ours, plain)
    torch.testing.assert_close(ours, formula, **tolerance(torch.float32, "elementwise"))


def test_cfg_reads_the_null_row_and_only_it(rng_seed):
    dit = tiny_dit(num_classes=DIT_CLASSES)
    x, t, _ = random_dit_inputs()
    y = torch.tensor([0, 1, 2])
    guided, plain = ClassifierFreeGuidance(dit, CFG_SCALE), ClassifierFreeGuidance(dit, 1.0)
    assert guided.null_class == DIT_CLASSES
    with torch.no_grad():
        before_guided, before_plain = guided(x, t, y), plain(x, t, y)
        table = dit.y_embedder.embedding_table.weight
        table[DIT_CLASSES - 1].add_(torch.randn_like(table[DIT_CLASSES - 1]))  # a class no label uses
        assert torch.equal(guided(x, t, y), before_guided)
        table[DIT_CLASSES].add_(torch.randn_like(table[DIT_CLASSES]))  # the null row
        after_guided, after_plain = guided(x, t, y), plain(x, t, y)
    assert (after_guided[:, :3] - before_guided[:, :3]).abs().max() > 1e-3
    assert torch.equal(after_guided[:, 3:], before_guided[:, 3:])  # the conditional half's channels
    assert torch.equal(after_plain, before_plain)  # scale 1 never reads the null row


def test_cfg_with_a_given_null_class_and_the_priors_attributes(rng_seed):
    dit = tiny_dit(num_classes=DIT_CLASSES)
    x, t, y = random_dit_inputs()
    cfg = ClassifierFreeGuidance(dit, CFG_SCALE, guided_channels=4, null_class=2)
    with torch.no_grad():
        torch.testing.assert_close(cfg(x, t, y), dit_forward_with_cfg(dit, *dit_cfg_batch(x, t, y, 2), CFG_SCALE, 4)[:3],
                                   **tolerance(torch.float32, "elementwise"))
    assert (cfg.image_size, cfg.in_channels, cfg.learn_sigma, cfg.num_classes, cfg.null_class) == (8, 4, True, 6, 2)
    assert "scale=4.0" in repr(cfg) and "guided_channels=4" in repr(cfg)


@pytest.mark.parametrize("kwargs, pattern", [
    (dict(scale=-0.5), "scale must be a finite number >= 0"),
    (dict(scale=float("nan")), "scale must be a finite number >= 0"),
    (dict(scale=float("inf")), "scale must be a finite number >= 0"),
    (dict(scale=True), "scale must be a finite number >= 0"),
    (dict(scale="4"), "scale must be a finite number >= 0"),
    (dict(scale=4.0, guided_channels=0), r"guided_channels must be an integer in \[1, 4\]"),
    (dict(scale=4.0, guided_channels=5), r"guided_channels must be an integer in \[1, 4\]"),
    (dict(scale=4.0, guided_channels=3.0), r"guided_channels must be an integer in \[1, 4\]"),
    (dict(scale=4.0, guided_channels=True), r"guided_channels must be an integer in \[1, 4\]"),
])
def test_cfg_refuses_bad_settings_in_one_line(kwargs, pattern):
    dit = tiny_dit(depth=1, num_classes=DIT_CLASSES)
    one_line_error(IGDSInputError, pattern, lambda: ClassifierFreeGuidance(dit, **kwargs))


def test_cfg_refuses_a_prior_without_a_null_class():
    dit = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=1, num_heads=2, num_classes=4,
              class_dropout_prob=0.0)
    assert dit.y_embedder.embedding_table.num_embeddings == 4 and dit.null_class is None
    message = one_line_error(IGDSInputError, "has no null class", lambda: ClassifierFreeGuidance(dit, CFG_SCALE))
    assert "DiT" in message and "label dropout" in message


# ---- 2. the VAE decoder ---------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["vae folder", "pipeline root"])
def test_load_vae_decodes_like_diffusers(tmp_path, rng_seed, layout):
    vae = tiny_vae()
    vae.save_pretrained(tmp_path / "pipeline" / "vae")
    (tmp_path / "pipeline" / "model_index.json").write_text("{}")
    decoder = load_vae(tmp_path / "pipeline" / ("vae" if layout == "vae folder" else ""))
    assert isinstance(decoder, LatentDecoder) and not decoder.vae.training
    assert (decoder.in_channels, decoder.out_channels, decoder.scale_factor) == (4, 3, 2)
    assert decoder.scaling_factor == SD_VAE_SCALING_FACTOR == 0.18215
    assert not any(p.requires_grad for p in decoder.parameters())
    loaded, original = decoder.vae.state_dict(), vae.state_dict()
    assert loaded.keys() == original.keys() and all(torch.equal(loaded[k], original[k]) for k in loaded)
    z = torch.randn(2, *LATENT)
    with torch.no_grad():
        image = decoder(z)
        expected = vae.decode(z / 0.18215).sample
    assert image.shape == (2, *IMAGE) and image.dtype == torch.float32
    torch.testing.assert_close(image, expected, **tolerance(torch.float32, "elementwise"))
    assert image.abs().max() > 1.0  # not clamped: the guidance sees the decoder's own output


def test_the_scaling_factor_comes_from_the_config_unless_given(tmp_path, rng_seed):
    vae = tiny_vae(scaling_factor=0.5)
    vae.save_pretrained(tmp_path)
    z = torch.randn(1, *LATENT)
    with torch.no_grad():
        assert load_vae(tmp_path).scaling_factor == 0.5
        torch.testing.assert_close(load_vae(tmp_path)(z), vae.decode(z / 0.5).sample,
                                   **tolerance(torch.float32, "elementwise"))
        given = load_vae(tmp_path, scaling_factor=0.25)
        assert given.scaling_factor == 0.25
        torch.testing.assert_close(given(z), vae.decode(z / 0.25).sample, **tolerance(torch.float32, "elementwise"))
        assert (given(z) - load_vae(tmp_path)(z)).abs().max() > 1e-3


def test_load_vae_refuses_what_is_not_a_vae_folder_in_one_line(tmp_path):
    missing = tmp_path / "nowhere"
    assert "does not exist" in one_line_error(IGDSInputError, str(missing), lambda: load_vae(missing))
    empty = tmp_path / "empty"
    empty.mkdir()
    one_line_error(IGDSInputError, "is not a diffusers AutoencoderKL folder: no config.json", lambda: load_vae(empty))
    (empty / "vae").mkdir()  # a pipeline root whose vae/ has no config either
    one_line_error(IGDSInputError, "no config.json", lambda: load_vae(empty))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))  # no weights
    one_line_error(IGDSInputError, f"cannot load the VAE from {broken}", lambda: load_vae(broken))


@pytest.mark.parametrize("factor", [0, -0.18215, float("nan"), float("inf"), True, "0.18215"])
def test_latent_decoder_refuses_a_bad_scaling_factor(factor):
    vae = tiny_vae()
    one_line_error(IGDSInputError, "scaling factor must be a positive number",
                   lambda: LatentDecoder(vae, scaling_factor=factor))


def test_latent_decoder_refuses_what_is_not_a_vae():
    one_line_error(IGDSInputError, "must be a diffusers AutoencoderKL", lambda: LatentDecoder(torch.nn.Linear(2, 2)))


# ---- 3. gradients through the decoder, against float64 autograd ----------------------------------------
def float64_copies(*modules):
    return [copy.deepcopy(module).double() for module in modules]


def float64_objective(vae64, ve64, latents, labels, beta, tau, gamma=0.0, scaling_factor=0.18215):
    """J of the decoded latents, entirely float64: diffusers' decode, the VE's features, igds_objective."""
    features = ve64.features(vae64.decode(latents / scaling_factor).sample)
    return igds_objective(features, labels, ve64.weight, ve64.bias, ve64.log_centroids, beta, tau, gamma)


def test_max_pool_gap_is_the_smallest_top_two_gap_of_any_window():
    pool = torch.nn.Sequential(torch.nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
    x = torch.arange(64, dtype=torch.float64).reshape(1, 1, 8, 8) * 0.1  # neighbours 0.1 apart at least
    assert max_pool_gap(pool, lambda: pool(x)) == pytest.approx(0.1)
    x[0, 0, 4, 5] = x[0, 0, 5, 5] - 3e-7  # both in the window at rows 3-5, columns 3-5
    assert max_pool_gap(pool, lambda: pool(x)) == pytest.approx(3e-7, rel=1e-6)


@pytest.mark.parametrize("head, gamma", [("autograd", 0.0), ("analytic", 0.3)])
def test_x0_gradient_through_the_decoder_equals_float64_autograd(rng_seed, head, gamma):
    decoder, ve = LatentDecoder(tiny_vae()), tiny_ve(num_classes=VE_CLASSES, resolution=16)
    beta, tau = 0.7, 0.8
    guidance = IGDSGuidance(ve, beta, tau, gamma, head=head, decoder=decoder)
    vae64, ve64 = float64_copies(decoder.vae, ve)
    z = away_from_max_pool_ties(lambda: torch.randn(3, *LATENT), ve64,
                                lambda z: ve64.features(vae64.decode(z.double() / SD_VAE_SCALING_FACTOR).sample),
                                MAX_POOL_TIE_MARGIN)
    labels = torch.tensor([0, 3, 0])
    objective, grad, features = guidance(z, labels, return_features=True)

    leaf = z.double().requires_grad_(True)
    expected_objective = float64_objective(vae64, ve64, leaf, labels, beta, tau, gamma)
    (expected,) = torch.autograd.grad(expected_objective.sum(), leaf)
    assert grad.shape == z.shape and grad.dtype == torch.float32
    assert expected.abs().max() > 1e-2  # a gradient the comparison can see
    torch.testing.assert_close(grad.double(), expected, **tolerance(torch.float32, "reduction"))
    torch.testing.assert_close(objective.double(), expected_objective.detach(), **tolerance(torch.float32, "reduction"))
    with torch.no_grad():  # decode / encode: the decoded image is what the encoder sees
        torch.testing.assert_close(guidance.decode(z), decoder(z), rtol=0, atol=0)
        torch.testing.assert_close(guidance.encode(z), ve.features(decoder(z)), rtol=0, atol=0)
        torch.testing.assert_close(features, ve.features(decoder(z)), rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["x0", "xt"])
def test_guided_step_through_cfg_and_decoder_equals_float64_chain(rng_seed, mode):
    """x_{i-1} = mu + s sigma^2 dJ/d(x0 or x_t) + sigma n, J(f(decode(x0))), x0 from CFG(DiT)'s eps, unclipped."""
    dit, decoder, ve, class_map = latent_models()
    steps, i, beta, tau = "10", 6, 0.5, 0.9
    scale = 200.0 if mode == "x0" else 50.0  # dJ/dx0 is ~sqrt(abar_i) of dJ/dx_t: alike shares of the step
    prior = ClassifierFreeGuidance(dit, CFG_SCALE)
    sampler = latent_sampler(prior, decoder, ve, class_map, steps=steps, scale=scale, beta=beta, tau=tau, mode=mode)
    unguided = latent_sampler(prior, decoder, ve, class_map, steps=steps, scale=0.0)
    labels = torch.tensor([1, 3])
    tables = DiffusionSchedule(ScheduleConfig(sampling_steps=steps), dtype=torch.float64)
    dit64, vae64, ve64 = float64_copies(dit, decoder.vae, ve)
    y = torch.tensor(class_map)[labels]
    t = tables.timestep_map[i].expand(2)
    abar = tables.alphas_cumprod[i]

    def float64_x0(x):
        out = dit_forward_with_cfg(dit64, *dit_cfg_batch(x, t, y, DIT_CLASSES), CFG_SCALE)[:2]
        return (1 / abar).sqrt() * x - (1 / abar - 1).sqrt() * out[:, :4], out[:, 4:]

    def float64_features(x):
        return ve64.features(vae64.decode(float64_x0(x.double())[0] / SD_VAE_SCALING_FACTOR).sample)

    x = away_from_max_pool_ties(lambda: torch.randn(2, *LATENT), ve64, float64_features, MAX_POOL_TIE_MARGIN)
    noise = torch.randn_like(x)
    ours = sampler.step(x, i, labels, noise)
    plain = unguided.step(x, i, labels, noise)

    x_leaf = x.double().requires_grad_(True)
    x0, v = float64_x0(x_leaf)
    wrt = x_leaf if mode == "xt" else x0.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(float64_objective(vae64, ve64, x0 if mode == "xt" else wrt, labels, beta, tau).sum(),
                                  wrt)
    with torch.no_grad():
        mean = tables.posterior_mean_coef1[i] * x0 + tables.posterior_mean_coef2[i] * x_leaf
        frac = (v + 1) / 2
        log_variance = frac * tables.log_betas[i] + (1 - frac) * tables.posterior_log_variance_clipped[i]
        guidance_term = scale * log_variance.exp() * grad
        expected = mean + guidance_term + (0.5 * log_variance).exp() * noise.double()
    assert x0.abs().max() > 1.0  # unclipped latents: a clip would change the result
    assert guidance_term.norm() > 0.02 * expected.norm()  # guidance moves the step visibly (measured 0.1-0.9)
    torch.testing.assert_close(ours.double(), expected, **tolerance(torch.float32, "reduction"))
    torch.testing.assert_close((ours - plain).double(), guidance_term, **tolerance(torch.float32, "reduction"))


def test_the_two_gradient_modes_differ(rng_seed):
    dit, decoder, ve, class_map = latent_models()
    prior = ClassifierFreeGuidance(dit, CFG_SCALE)
    x, labels, noise = torch.randn(2, *LATENT), torch.tensor([0, 2]), torch.randn(2, *LATENT)
    steps = [latent_sampler(prior, decoder, ve, class_map, steps="10", scale=50.0, mode=mode).step(x, 6, labels, noise)
             for mode in ("x0", "xt")]
    assert (steps[0] - steps[1]).abs().max() > 1e-4


# ---- 4. the sampler end to end (eager) -----------------------------------------------------------------
def test_sampler_decodes_its_latents(rng_seed):
    dit, decoder, ve, class_map = latent_models()
    sampler = latent_sampler(ClassifierFreeGuidance(dit, CFG_SCALE), decoder, ve, class_map)
    labels, seeds = [0, 3, 1], random_seeds(3)
    images = sampler.sample(labels, seeds)
    assert images.shape == (3, *IMAGE) and images.dtype == torch.float32 and torch.isfinite(images).all()
    assert images.min() >= -1.0 and images.max() <= 1.0 and images.std() > 0.05
    latents = sampler.sample(labels, seeds, decode=False)
    assert latents.shape == (3, *LATENT) and torch.isfinite(latents).all()
    assert latents.abs().max() > 1.0  # the final latents, not clamped
    assert torch.equal(sampler.decode(latents), images)
    traced, terms = sampler.sample(labels, seeds, trace=True)  # the guidance terms of the decoded x0 predictions
    assert torch.equal(traced, images) and terms["log_p_y"].shape == (int(STEPS), 3)
    assert all(torch.isfinite(values).all() for values in terms.values())
    with torch.no_grad():
        raw = decoder(latents)
    assert raw.abs().max() > 1.0 and torch.equal(images, raw.clamp(-1.0, 1.0))
    # guidance on: another sample than plain CFG sampling from the same noise
    unguided = latent_sampler(ClassifierFreeGuidance(dit, CFG_SCALE), decoder, ve, class_map, scale=0.0)
    assert (unguided.sample(labels, seeds, decode=False) - latents).abs().max() > 1e-3


def test_images_depend_only_on_seed_and_label_when_batch_invariant(rng_seed):
    dit, decoder, ve, class_map = latent_models()
    sampler = latent_sampler(ClassifierFreeGuidance(dit, CFG_SCALE), decoder, ve, class_map, batch_invariant=True,
                             noise="philox")
    labels, seeds = [2, 0, 3], random_seeds(3)
    together = sampler.sample(labels, seeds)
    alone = sampler.sample(labels[1:2], seeds[1:2])
    reordered = sampler.sample([labels[2], labels[0]], [seeds[2], seeds[0]])
    assert torch.equal(alone[0], together[1])
    assert torch.equal(reordered[0], together[2]) and torch.equal(reordered[1], together[0])
    assert (together[0] - together[2]).abs().max() > 1e-3  # the images themselves differ
    latents = sampler.sample(labels, seeds, decode=False)
    decoded = sampler.decode(torch.cat([latents[2:], latents[:2]]))  # the decode alone is batch invariant too
    assert torch.equal(decoded[0], together[2]) and torch.equal(decoded[1:], together[:2])


def test_sampler_refusals_of_a_latent_prior_in_one_line(rng_seed):
    dit, decoder, ve, class_map = latent_models()
    prior = ClassifierFreeGuidance(dit, CFG_SCALE)
    schedule = DiffusionSchedule(ScheduleConfig(sampling_steps=STEPS))
    config = GuidanceConfig(clip_x0=False)
    message = one_line_error(IGDSInputError, "reads 3-channel images but the prior makes 4",
                             lambda: Sampler(prior, schedule, ve, config, prior_class_map=class_map))
    assert "pass decoder=" in message
    wrong = LatentDecoder(tiny_vae(latent_channels=3))
    one_line_error(IGDSInputError, "the decoder reads 3-channel latents but the prior makes 4",
                   lambda: Sampler(prior, schedule, ve, config, prior_class_map=class_map, decoder=wrong))
    gray_ve = tiny_ve(num_classes=VE_CLASSES, channels=1, resolution=16)
    one_line_error(IGDSInputError, "reads 1-channel images but the prior makes 3",
                   lambda: Sampler(prior, schedule, gray_ve, config, prior_class_map=class_map, decoder=decoder))
    one_line_error(IGDSInputError, "lacks in_channels, out_channels",
                   lambda: Sampler(prior, schedule, ve, config, prior_class_map=class_map, decoder=lambda z: z))
    one_line_error(IGDSInputError, r"clip_x0=True would clip latents to \[-1, 1\]",
                   lambda: Sampler(prior, schedule, ve, GuidanceConfig(), prior_class_map=class_map, decoder=decoder))
    sampler = Sampler(prior, schedule, ve, config, prior_class_map=class_map, decoder=decoder)
    one_line_error(IGDSInputError, "decode must be True or False", lambda: sampler.sample([0], [1], decode="no"))


def test_decode_options_are_refused_without_a_decoder():
    ve = tiny_ve(num_classes=VE_CLASSES, resolution=16)
    sampler = Sampler(tiny_adm(class_cond=False), DiffusionSchedule(ScheduleConfig(sampling_steps=STEPS)), ve)
    one_line_error(IGDSInputError, "decode=False applies to a latent prior",
                   lambda: sampler.sample([0, 1], [1, 2], decode=False))
    one_line_error(IGDSInputError, "this sampler has no decoder", lambda: sampler.decode(torch.randn(1, *IMAGE)))


# ---- 5. compiled (fp32, aot_eager) against eager ---------------------------------------------------------
@pytest.fixture(scope="module")
def compiled_pair():
    """(eager, compiled fp32 aot_eager) samplers of one latent prior; compiled once (~15 s) for the module."""
    seed = int.from_bytes(os.urandom(4), "little")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        dit, decoder, ve, class_map = latent_models()
    prior = ClassifierFreeGuidance(dit, CFG_SCALE)
    eager = latent_sampler(prior, decoder, ve, class_map, noise="philox")
    compiled = latent_sampler(prior, decoder, ve, class_map, noise="philox", backend="compiled",
                              backend_options=dict(AOT_FP32))
    assert isinstance(compiled.stepper, CompiledStep)
    return eager, compiled, seed


def test_compiled_images_match_eager(compiled_pair):
    eager, compiled, seed = compiled_pair
    labels, seeds = [3, 0, 2], random_seeds(3)
    images = compiled.sample(labels, seeds)
    expected = eager.sample(labels, seeds)
    assert images.shape == (3, *IMAGE) and torch.isfinite(images).all(), f"model seed {seed}"
    torch.testing.assert_close(images, expected, **tolerance(torch.float32, "trajectory"), msg=f"model seed {seed}")
    # The self-check of the run's first step compared the decoder copy with the float32 decoder.
    report = compiled.self_check_report
    parts = {part["part"]: part for part in report["parts"]}
    assert list(parts) == ["unet", "decoder", "features", "head", "gradient", "step"]
    assert parts["decoder"]["compared"] == 3 and not parts["decoder"]["failed"]
    assert parts["decoder"]["error"] < 1e-4 and parts["decoder"]["tolerance"] == SELF_CHECK_TOLERANCES["fp32"]["decoder"]
    step = compiled.stepper
    assert step.decoder_lp is not eager.decoder and step.decoder_lp.vae is not eager.decoder.vae  # a copy, compiled
    assert step.ops.guidance.decoder is not step.decoder_lp  # torch.compile'd callable (compile_encoder)


def test_compiled_latents_match_eager_and_stay_valid(compiled_pair):
    eager, compiled, seed = compiled_pair
    labels, seeds = [1, 1, 0], random_seeds(3)
    latents = compiled.sample(labels, seeds, decode=False)
    kept = latents.clone()
    torch.testing.assert_close(latents, eager.sample(labels, seeds, decode=False), **tolerance(torch.float32, "trajectory"),
                               msg=f"model seed {seed}")
    # a short batch padded to the compiled shape: its images are the unpadded eager ones
    padded = compiled.sample(labels[:2], seeds[:2], pad_to=3)
    torch.testing.assert_close(padded, eager.sample(labels[:2], seeds[:2]), **tolerance(torch.float32, "trajectory"),
                               msg=f"model seed {seed}")
    assert torch.equal(latents, kept)  # the returned latents are not the backend's static buffer
    assert torch.equal(compiled.decode(latents), eager.decode(latents))  # final decode: the float32 decoder


def test_a_bf16_decoder_copy_is_used_and_passes_its_check(rng_seed):
    dit, decoder, ve, class_map = latent_models()
    prior = ClassifierFreeGuidance(dit, CFG_SCALE)
    options = dict(FP32_COPIES, decoder_dtype="bf16")
    compiled = latent_sampler(prior, decoder, ve, class_map, noise="philox", backend="compiled", backend_options=options)
    assert compiled.stepper.decoder_lp.vae.decoder.conv_in.weight.dtype == torch.bfloat16
    assert decoder.vae.decoder.conv_in.weight.dtype == torch.float32  # the user's decoder is not cast
    labels, seeds = [2, 1], random_seeds(2)
    latents = compiled.sample(labels, seeds, decode=False)
    parts = {part["part"]: part for part in compiled.self_check_report["parts"]}
    assert 1e-4 < parts["decoder"]["error"] <= SELF_CHECK_TOLERANCES["bf16"]["decoder"]  # really bf16, and within
    assert parts["unet"]["error"] < 1e-4  # the UNet copy stays fp32
    eager = latent_sampler(prior, decoder, ve, class_map, noise="philox").sample(labels, seeds, decode=False)
    # Only the guidance sees the bf16 decode (s sigma^2 times a bf16-perturbed gradient per step).
    assert relative_error(latents, eager) < 1e-3


def relative_error(actual, expected) -> float:
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


def scale_output(module, factor):
    module.register_forward_hook(lambda m, inputs, output: output * factor)


@pytest.mark.parametrize("fault, pattern", [
    ("10%", (r"in the decoder copy \(fp32\): decoded image off by 0\.1\d* relative L2 .*"
             r"decoder module 'vae\.decoder\.conv_out' \(Conv2d\): relative error 0\.1")),
    ("nan", (r"in the decoder copy \(fp32\): decoded image non-finite in 2 of 2 .*"
             r"decoder module 'vae\.decoder\.mid_block' \(UNetMidBlock2D\): non-finite output")),
], ids=["10%", "nan"])
@pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning")  # the interpreter's head on NaN
def test_a_planted_decoder_fault_stops_the_run_at_the_first_step(rng_seed, fault, pattern):
    dit, decoder, ve, class_map = latent_models()
    sampler = latent_sampler(ClassifierFreeGuidance(dit, CFG_SCALE), decoder, ve, class_map, noise="philox",
                             backend="compiled", backend_options=dict(FP32_COPIES))
    step = sampler.stepper
    if fault == "10%":
        scale_output(step.decoder_lp.vae.decoder.conv_out, 1.1)
    else:
        scale_output(step.decoder_lp.vae.decoder.mid_block, float("nan"))
    message = one_line_error(IGDSNumericsError, pattern, lambda: sampler.sample([0, 2], random_seeds(2)))
    assert f"respaced index {int(STEPS) - 1}" in message
    with torch.no_grad():  # the user's float32 decoder is untouched
        z = torch.randn(1, *LATENT)
        torch.testing.assert_close(decoder(z), decoder.vae.decode(z / decoder.scaling_factor).sample, rtol=0, atol=0)


# ---- 6. the real models' shapes, on the meta device -------------------------------------------------------
def test_dit_xl2_256_with_cfg_maps_latents_to_eps_and_v_on_meta():
    with torch.device("meta"):
        dit = DiT(**DIT_PRESETS["dit-xl2-256"])
    assert dit.pos_embed.device.type == "meta"  # every tensor, the fixed sin-cos table included
    cfg = ClassifierFreeGuidance(dit, CFG_SCALE)
    assert (cfg.image_size, cfg.in_channels, cfg.num_classes, cfg.null_class) == (32, 4, 1000, 1000)
    x = torch.empty(2, 4, 32, 32, device="meta")
    t = torch.empty(2, dtype=torch.long, device="meta")
    out = cfg(x, t, torch.empty(2, dtype=torch.long, device="meta"))
    assert out.shape == (2, 8, 32, 32) and out.device.type == "meta"


def test_sd_vae_decoder_maps_32x32_latents_to_256px_images_on_meta():
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=2, norm_num_groups=32, sample_size=256,
        )
    decoder = LatentDecoder(vae)
    assert (decoder.in_channels, decoder.out_channels, decoder.scale_factor) == (4, 3, 8)
    assert decoder.scaling_factor == SD_VAE_SCALING_FACTOR
    image = decoder(torch.empty(1, 4, 32, 32, device="meta"))
    assert image.shape == (1, 3, 256, 256) and image.dtype == torch.float32 and image.device.type == "meta"
