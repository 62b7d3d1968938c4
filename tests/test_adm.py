"""ADMUNet against the original guided-diffusion UNetModel: keys, forward, input gradients, loading."""
import warnings

import pytest
import torch

from factories import randomize_
from igds_fast.errors import IGDSInputError
from igds_fast.models.adm import ADM_PRESETS, ADMUNet, build_adm, load_adm

warnings.filterwarnings("ignore", category=FutureWarning)
script_util = pytest.importorskip("guided_diffusion.script_util")

# The structural flag combinations of the four public presets, at small channel counts.
FAMILIES = {
    "adm256-cond": dict(num_head_channels=16, class_cond=True),
    "adm256-uncond": dict(num_head_channels=16, class_cond=False),
    "adm128-cond": dict(num_heads=4, class_cond=True),
    "adm64-cond": dict(num_head_channels=16, class_cond=True, num_res_blocks=3, use_new_attention_order=True),
}
SMALL = dict(image_size=32, num_channels=32, channel_mult="1,2,2", attention_resolutions="16,8", dropout=0.0)


def small_flags(preset):
    flags = {**ADM_PRESETS[preset], **SMALL, **FAMILIES[preset]}
    flags.pop("use_fp16")  # the original would convert its torso to fp16; the reference runs fp32
    return flags


def reference_and_checkpoint(preset, tmp_path):
    reference = randomize_(script_util.create_model(**small_flags(preset))).eval()
    path = tmp_path / f"{preset}.pt"
    torch.save(reference.state_dict(), path)
    return reference, path


def call(model, x, t, y):
    return model(x, t, y=y) if y is not None else model(x, t)


@pytest.mark.parametrize("preset", sorted(FAMILIES))
def test_forward_matches_guided_diffusion(preset, tmp_path):
    reference, path = reference_and_checkpoint(preset, tmp_path)
    ours = load_adm(path, preset, **{k: v for k, v in small_flags(preset).items() if k not in ADM_PRESETS[preset] or ADM_PRESETS[preset][k] != v})
    assert list(ours.state_dict()) == list(reference.state_dict())
    assert ours.learn_sigma and ours.out_channels == 6
    x = torch.randn(3, 3, 32, 32)
    t = torch.randint(0, 1000, (3,))
    y = torch.randint(0, 1000, (3,)) if ours.num_classes else None
    with torch.no_grad():
        expected = call(reference, x, t, y)
        got = ours(x, t, y)
    assert expected.abs().max() > 1e-3
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()


@pytest.mark.parametrize("preset", ["adm256-cond", "adm64-cond"])
def test_input_gradient_with_frozen_weights_matches_reference(preset, tmp_path):
    reference, path = reference_and_checkpoint(preset, tmp_path)
    overrides = {k: v for k, v in small_flags(preset).items() if ADM_PRESETS[preset].get(k) != v}
    ours = load_adm(path, preset, **overrides)
    for model in (ours, reference):
        model.requires_grad_(False)
    x = torch.randn(2, 3, 32, 32)
    t = torch.tensor([5, 900])
    y = torch.tensor([1, 7])
    grads = []
    for model in (reference, ours):
        leaf = x.clone().requires_grad_(True)
        (call(model, leaf, t, y) ** 2).sum().backward()
        grads.append(leaf.grad)
    assert torch.isfinite(grads[1]).all() and grads[1].abs().max() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-5 * grads[0].abs().max().item())


def test_preset_parameter_counts_on_meta_device():
    with torch.device("meta"):
        counts = {name: sum(p.numel() for p in build_adm(name).parameters()) for name in ADM_PRESETS}
    assert round(counts["adm256-cond"] / 1e6, 1) == 553.8
    assert counts["adm256-cond"] - counts["adm256-uncond"] == 1000 * 1024  # the label embedding


def test_checkpoint_that_does_not_fit_is_named(tmp_path):
    reference, path = reference_and_checkpoint("adm256-cond", tmp_path)
    overrides = {k: v for k, v in small_flags("adm256-cond").items() if ADM_PRESETS["adm256-cond"].get(k) != v}
    state = reference.state_dict()

    broken = dict(state)
    broken.pop("label_emb.weight")
    torch.save(broken, tmp_path / "missing.pt")
    with pytest.raises(IGDSInputError, match=r"1 missing keys \(e.g. label_emb.weight\)") as info:
        load_adm(tmp_path / "missing.pt", "adm256-cond", **overrides)
    assert "\n" not in str(info.value)

    extra = dict(state, **{"bogus.weight": torch.ones(1)})
    torch.save(extra, tmp_path / "extra.pt")
    with pytest.raises(IGDSInputError, match="unexpected keys .*bogus.weight"):
        load_adm(tmp_path / "extra.pt", "adm256-cond", **overrides)

    with pytest.raises(IGDSInputError, match=r"shape mismatches \(time_embed.0.weight expected \(256, 64\) got \(128, 32\)"):
        load_adm(path, "adm256-cond", **{**overrides, "num_channels": 64})

    with pytest.raises(IGDSInputError, match="unknown ADM preset 'adm512'"):
        load_adm(path, "adm512")
    with pytest.raises(IGDSInputError, match="checkpoint not found"):
        load_adm(tmp_path / "nope.pt", "adm256-cond")
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(IGDSInputError, match="cannot read checkpoint"):
        load_adm(tmp_path / "garbage.pt", "adm256-cond")


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
    model = ADMUNet.from_flags(**{**small_flags("adm256-cond"), "num_res_blocks": 1}).eval()
    with pytest.raises(IGDSInputError, match=r"expects \[B, 3, 32, 32\] images, got \(1, 3, 16, 16\)"):
        model(torch.randn(1, 3, 16, 16), torch.tensor([1]), torch.tensor([0]))
    with pytest.raises(IGDSInputError, match="class labels are required"):
        model(torch.randn(1, 3, 32, 32), torch.tensor([1]))


def test_extra_flags_for_other_channel_counts():
    model = ADMUNet.from_flags(image_size=16, num_channels=32, num_res_blocks=1, channel_mult="1,2",
                               attention_resolutions="8", in_channels=1, class_cond=True, num_classes=10,
                               learn_sigma=False)
    out = model(torch.randn(2, 1, 16, 16), torch.tensor([3, 4]), torch.tensor([0, 9]))
    assert out.shape == (2, 1, 16, 16) and model.num_classes == 10 and not model.learn_sigma


def test_adm256_forward_flops_per_image():
    """2.24 TFLOP per image per forward (bench/model_stats.py records the table in bench/RESULTS.md)."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "bench" / "model_stats.py"
    spec = importlib.util.spec_from_file_location("model_stats", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    stats = module.preset_stats("adm256-cond")
    assert round(stats["flops"] / 1e12, 2) == 2.24
    assert stats["by_op"]["bmm"] > 0  # attention is counted
