"""ADMUNet against the original guided-diffusion UNetModel: keys, forward, input gradients, loading."""
import copy
import warnings

import pytest
import torch

from factories import randomize_
from igds_fast.errors import IGDSInputError
from igds_fast.models.adm import ADM_DIFFUSION_FLAGS, ADM_PRESETS, ADMUNet, build_adm, load_adm

warnings.filterwarnings("ignore", category=FutureWarning)
script_util = pytest.importorskip("guided_diffusion.script_util")

# The structural flag combinations of the four public presets (attention order, heads by count or
# by width, class-conditioning, 2 or 3 res blocks; all use resblock_updown, scale-shift norm and
# learned sigma), at small sizes: 32x32 with attention at 16 and 8 pixels.
FAMILIES = {
    "adm256-cond": dict(num_head_channels=16),
    "adm256-uncond": dict(num_head_channels=16),
    "adm128-cond": dict(num_heads=4),
    "adm64-cond": dict(num_head_channels=16),
}
SMALL = dict(image_size=32, num_channels=32, channel_mult="1,2,2", attention_resolutions="16,8", dropout=0.0)


def small_overrides(preset):
    """The flags that shrink a preset: only those differing from the preset."""
    wanted = {**SMALL, **FAMILIES[preset]}
    return {k: v for k, v in wanted.items() if ADM_PRESETS[preset].get(k) != v}


def reference_and_checkpoint(preset, tmp_path):
    """A randomised guided-diffusion model (fp32, no checkpointing) and its state_dict saved as .pt."""
    flags = {**ADM_PRESETS[preset], **small_overrides(preset)}
    flags.pop("use_fp16")  # only recorded by create_model; the script would convert the torso to fp16
    reference = randomize_(script_util.create_model(**flags, use_checkpoint=False)).eval()
    path = tmp_path / f"{preset}.pt"
    torch.save(reference.state_dict(), path)
    return reference, path


def call(model, x, t, y):
    return model(x, t, y=y) if y is not None else model(x, t)


def assert_outputs_equal(got, expected):
    assert expected.abs().max() > 1e-2  # randomised weights: a non-trivial output
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()


@pytest.mark.parametrize("preset", sorted(FAMILIES))
def test_forward_matches_guided_diffusion(preset, tmp_path):
    reference, path = reference_and_checkpoint(preset, tmp_path)
    ours = load_adm(path, preset, **small_overrides(preset))
    assert list(ours.state_dict()) == list(reference.state_dict())
    assert ours.learn_sigma and ours.out_channels == 6 and ours.image_size == 32 and ours.in_channels == 3
    assert ours.num_classes == (1000 if ADM_PRESETS[preset]["class_cond"] else None)
    assert not ours.training
    x = torch.randn(3, 3, 32, 32)
    y = torch.randint(0, 1000, (3,)) if ours.num_classes else None
    for t in (torch.randint(0, 1000, (3,)), torch.rand(3) * 1000):  # long and fractional timesteps
        with torch.no_grad():
            assert_outputs_equal(ours(x, t, y), call(reference, x, t, y))


def test_attention_orders_and_sdpa_scale_match_reference():
    """Both qkv layouts through SDPA equal the original's einsum attention with q, k scaled by c^-1/4."""
    from guided_diffusion.unet import AttentionBlock as ReferenceAttention

    from igds_fast.models.adm import AttentionBlock

    x = torch.randn(2, 64, 4, 4)
    for new_order in (False, True):
        for heads in (dict(num_heads=4), dict(num_head_channels=16), dict(num_heads=1)):
            reference = randomize_(ReferenceAttention(64, use_new_attention_order=new_order, **heads), 0.2)
            ours = AttentionBlock(64, use_new_attention_order=new_order, **heads)
            ours.load_state_dict(reference.state_dict())
            with torch.no_grad():
                expected = reference(x)
                assert (ours(x) - expected).abs().max() <= 1e-5 * expected.abs().max()


@pytest.mark.parametrize("preset", ["adm256-cond", "adm64-cond"])
def test_input_gradient_with_frozen_weights_matches_reference(preset, tmp_path):
    reference, path = reference_and_checkpoint(preset, tmp_path)
    ours = load_adm(path, preset, **small_overrides(preset))
    for model in (ours, reference):
        model.requires_grad_(False)
    x = torch.randn(2, 3, 32, 32)
    t = torch.tensor([5.0, 900.0])
    y = torch.tensor([1, 7])
    grads = []
    for model in (reference, ours):
        leaf = x.clone().requires_grad_(True)
        (call(model, leaf, t, y) ** 2).sum().backward()
        grads.append(leaf.grad)
    assert torch.isfinite(grads[1]).all() and grads[1].abs().max() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-5 * grads[0].abs().max().item())


def test_full_presets_are_key_for_key_the_originals():
    """Every state_dict key and shape of the four full-size presets, built on the meta device."""
    for name, flags in ADM_PRESETS.items():
        with torch.device("meta"):
            reference, ours = script_util.create_model(**flags), build_adm(name)
        expected = [(k, tuple(v.shape)) for k, v in reference.state_dict().items()]
        assert [(k, tuple(v.shape)) for k, v in ours.state_dict().items()] == expected, name
    assert set(ADM_DIFFUSION_FLAGS) == set(ADM_PRESETS)
    assert ADM_DIFFUSION_FLAGS["adm64-cond"]["noise_schedule"] == "cosine"
    assert ADM_DIFFUSION_FLAGS["adm256-cond"] == dict(noise_schedule="linear", diffusion_steps=1000)


def test_preset_parameter_counts_on_meta_device():
    with torch.device("meta"):
        counts = {name: sum(p.numel() for p in build_adm(name).parameters()) for name in ADM_PRESETS}
    assert abs(counts["adm256-cond"] - 553.8e6) <= 0.05e6
    assert counts["adm256-cond"] - counts["adm256-uncond"] == 1000 * 1024  # the label embedding


def test_safetensors_checkpoint_in_half_precision_loads_as_float32(tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    reference, _ = reference_and_checkpoint("adm128-cond", tmp_path)
    state = {k: v.half() for k, v in reference.state_dict().items()}
    safetensors_torch.save_file(state, str(tmp_path / "model.safetensors"))
    ours = load_adm(tmp_path / "model.safetensors", "adm128-cond", **small_overrides("adm128-cond"))
    for key, value in ours.state_dict().items():
        assert value.dtype == torch.float32 and torch.equal(value, state[key].float()), key


def test_checkpoint_that_does_not_fit_is_named(tmp_path):
    reference, path = reference_and_checkpoint("adm256-cond", tmp_path)
    overrides = small_overrides("adm256-cond")
    state = reference.state_dict()

    broken = dict(state)
    broken.pop("label_emb.weight")
    torch.save(broken, tmp_path / "missing.pt")
    with pytest.raises(IGDSInputError, match=r"1 missing keys \(e.g. label_emb.weight\)") as info:
        load_adm(tmp_path / "missing.pt", "adm256-cond", **overrides)
    assert "\n" not in str(info.value)

    torch.save(dict(state, **{"bogus.weight": torch.ones(1)}), tmp_path / "extra.pt")
    with pytest.raises(IGDSInputError, match=r"1 unexpected keys \(e.g. bogus.weight\)"):
        load_adm(tmp_path / "extra.pt", "adm256-cond", **overrides)

    # The conditional checkpoint into the unconditional preset: label_emb is unexpected.
    with pytest.raises(IGDSInputError, match="unexpected keys .*label_emb.weight"):
        load_adm(path, "adm256-uncond", **small_overrides("adm256-uncond"))

    with pytest.raises(IGDSInputError, match=r"shape mismatches \(time_embed.0.weight expected \(256, 64\) got \(128, 32\)"):
        load_adm(path, "adm256-cond", **{**overrides, "num_channels": 64})

    with pytest.raises(IGDSInputError, match=r"unknown ADM preset 'adm512'; available: \['adm128-cond'"):
        load_adm(path, "adm512")
    with pytest.raises(IGDSInputError, match="checkpoint not found"):
        load_adm(tmp_path / "nope.pt", "adm256-cond")
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(IGDSInputError, match="cannot read checkpoint"):
        load_adm(tmp_path / "garbage.pt", "adm256-cond")
    with pytest.raises(IGDSInputError, match="unknown ADM flags"):
        load_adm(path, "adm256-cond", num_chanels=32)


class Payload:
    """Any non-tensor object: weights_only loading must refuse to unpickle it."""


def test_pickled_objects_are_refused(tmp_path):
    torch.save({"model": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(IGDSInputError, match="cannot read checkpoint"):
        load_adm(tmp_path / "evil.pt", "adm64-cond")


def test_bad_flags_and_inputs():
    with pytest.raises(IGDSInputError, match="unknown ADM flags \\['num_chanels'\\]"):
        ADMUNet.from_flags(image_size=32, num_chanels=32, num_res_blocks=1)
    with pytest.raises(IGDSInputError, match="no default channel_mult for image_size 48"):
        ADMUNet.from_flags(image_size=48, num_channels=32, num_res_blocks=1)
    with pytest.raises(IGDSInputError, match="not divisible by num_head_channels 24"):
        ADMUNet.from_flags(**{**SMALL, "num_res_blocks": 1, "num_head_channels": 24})
    model = build_adm("adm256-cond", **small_overrides("adm256-cond"), num_res_blocks=1).eval()
    t, y = torch.tensor([1]), torch.tensor([0])
    with pytest.raises(IGDSInputError, match=r"expects \[B, 3, 32, 32\] images, got \(1, 3, 16, 16\)"):
        model(torch.randn(1, 3, 16, 16), t, y)
    with pytest.raises(IGDSInputError, match="class labels y are required"):
        model(torch.randn(1, 3, 32, 32), t)
    with pytest.raises(IGDSInputError, match=r"labels y of shape \(1,\), got \(1, 1\)"):
        model(torch.randn(1, 3, 32, 32), t, y[:, None])
    with pytest.raises(IGDSInputError, match=r"timesteps of shape \(1,\), got \(\)"):
        model(torch.randn(1, 3, 32, 32), torch.tensor(1), y)


def test_extra_flags_for_other_channel_counts():
    model = ADMUNet.from_flags(image_size=16, num_channels=32, num_res_blocks=1, channel_mult="1,2",
                               attention_resolutions="8", in_channels=1, class_cond=True, num_classes=10,
                               learn_sigma=False)
    out = model(torch.randn(2, 1, 16, 16), torch.tensor([3, 4]), torch.tensor([0, 9]))
    assert out.shape == (2, 1, 16, 16) and model.num_classes == 10 and not model.learn_sigma


def test_half_precision_parameters_compute_in_their_dtype():
    """model.to(bfloat16) runs end to end (time embedding cast, GroupNorm in float32) close to float32.

    float16 takes the same code path; its CPU convolutions are ~20x slower, so it is not run here.
    """
    dtype = torch.bfloat16
    model = randomize_(build_adm("adm64-cond", **small_overrides("adm64-cond"))).eval()
    half = copy.deepcopy(model).to(dtype)
    x, t, y = torch.randn(2, 3, 32, 32), torch.tensor([3.0, 700.0]), torch.tensor([1, 2])
    inner_dtypes = []
    half.middle_block.register_forward_hook(lambda module, inputs, output: inner_dtypes.append(output.dtype))
    with torch.no_grad():
        expected, got = model(x, t, y), half(x, t, y)
    assert got.dtype == torch.float32 and inner_dtypes == [dtype]
    assert (got - expected).abs().max() <= 2e-2 * expected.abs().max()  # bfloat16 has 8 mantissa bits


def test_adm256_forward_flops_per_image():
    """2.24 TFLOP per image per forward, attention counted (bench/model_stats.py, bench/RESULTS.md)."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "bench" / "model_stats.py"
    spec = importlib.util.spec_from_file_location("model_stats", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    stats = module.preset_stats("adm256-cond")
    assert round(stats["flops"] / 1e12, 2) == 2.24
    assert stats["by_op"]["bmm"] == stats["formula"]["attention"] > 0  # SDPA counted, = 4 T^2 C per block
    assert stats["flops"] == sum(stats["formula"].values())
