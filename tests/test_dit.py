"""DiT (igds_fast.models.dit) against the original's layout and math, diffusers' DiTTransformer2DModel,
and the checkpoint loaders.

The references here are written from the formulas (numpy / plain torch ops), not from the model's code.
Every weight is random: the original zero-initialises adaLN and the final layer, so a model with its
own init would pass a forward test whatever the blocks computed.
"""
import argparse
import math

import numpy as np
import pytest
import torch

from factories import randomize_, tiny_dit
from igds_fast.errors import IGDSInputError
from igds_fast.models.dit import (DIFFFIT_KEYS, DIT_PRESETS, DIT_SIZES, DiT, describe_dit_checkpoint, dit_flags,
                                  dit_from_diffusers_state, is_dit_checkpoint, load_diffusers_dit, load_dit,
                                  sincos_pos_embed, timestep_frequencies)
from tolerances import tolerance

pytestmark = pytest.mark.usefixtures("one_thread")

# tiny_dit's size, as load_dit overrides of the dit-xl2-256 preset (patch 2, 4 channels, learned sigma).
TINY = dict(input_size=8, hidden_size=32, depth=2, num_heads=2, num_classes=4)


def one_line_error(excinfo, *fragments):
    """The refusal is one line and names the problem (each fragment, case-insensitive)."""
    message = str(excinfo.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment.lower() in message.lower(), (fragment, message)


# ---- presets on the meta device -------------------------------------------------------------------
def meta_dit(preset, **overrides):
    with torch.device("meta"):
        return DiT(**{**DIT_PRESETS[preset], **overrides})


def original_keys(depth):
    """The state-dict keys of the original DiT (timm PatchEmbed / Attention / Mlp inside)."""
    keys = ["pos_embed", "x_embedder.proj.weight", "x_embedder.proj.bias", "y_embedder.embedding_table.weight",
            "t_embedder.mlp.0.weight", "t_embedder.mlp.0.bias", "t_embedder.mlp.2.weight", "t_embedder.mlp.2.bias",
            "final_layer.linear.weight", "final_layer.linear.bias",
            "final_layer.adaLN_modulation.1.weight", "final_layer.adaLN_modulation.1.bias"]
    for n in range(depth):
        for layer in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "adaLN_modulation.1"):
            keys += [f"blocks.{n}.{layer}.weight", f"blocks.{n}.{layer}.bias"]
    return keys


def xl2_parameter_count(tokens, hidden=1152, depth=28, channels=4, patch=2, classes=1000, frequencies=256):
    """(trainable, with the frozen pos_embed) of DiT-XL/2, counted layer by layer."""
    d, out = hidden, patch * patch * 2 * channels
    block = (d * 6 * d + 6 * d) + (d * 3 * d + 3 * d) + (d * d + d) + (d * 4 * d + 4 * d) + (4 * d * d + d)
    trainable = ((channels * patch * patch * d + d) + (frequencies * d + d + d * d + d) + (classes + 1) * d
                 + depth * block + (d * 2 * d + 2 * d) + (d * out + out))
    return trainable, trainable + tokens * d


def test_xl2_256_keys_shapes_and_parameter_count():
    dit = meta_dit("dit-xl2-256")
    state = dit.state_dict()
    assert len(state) == 292
    assert sorted(state) == sorted(original_keys(28))
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    assert shapes["x_embedder.proj.weight"] == (1152, 4, 2, 2)
    assert shapes["y_embedder.embedding_table.weight"] == (1001, 1152)  # 1000 classes + the null class
    assert shapes["final_layer.linear.weight"] == (32, 1152)  # p * p * 2C = 2 * 2 * 8
    assert shapes["pos_embed"] == (1, 256, 1152)
    assert shapes["blocks.27.attn.qkv.weight"] == (3456, 1152)
    assert shapes["blocks.27.adaLN_modulation.1.weight"] == (6912, 1152)
    assert not dit.pos_embed.requires_grad

    trainable = sum(p.numel() for p in dit.parameters() if p.requires_grad)
    total = sum(p.numel() for p in dit.parameters())
    assert (trainable, total) == xl2_parameter_count(tokens=256)
    assert round(trainable / 1e6, 1) == 674.8  # the paper's / the original repo's count, without pos_embed
    assert round(total / 1e6, 2) == 675.13
    assert (dit.image_size, dit.in_channels, dit.learn_sigma, dit.num_classes, dit.null_class) == (32, 4, True, 1000,
                                                                                                    1000)


def test_xl2_256_difffit_adds_four_scales_to_the_first_14_blocks():
    plain = set(meta_dit("dit-xl2-256").state_dict())
    difffit = meta_dit("dit-xl2-256", difffit_blocks=14)
    state = difffit.state_dict()
    assert len(state) == 348
    extra = set(state) - plain
    assert extra == {f"blocks.{n}.{key}" for n in range(14) for key in DIFFFIT_KEYS}
    assert len(extra) == 56
    assert plain <= set(state)
    for n in (0, 13):
        assert tuple(state[f"blocks.{n}.gamma1"].shape) == tuple(state[f"blocks.{n}.gamma2"].shape) == (1152,)
        assert tuple(state[f"blocks.{n}.attn.gamma1"].shape) == (3 * 1152,)
        assert tuple(state[f"blocks.{n}.attn.gamma2"].shape) == (1152,)
    trainable = sum(p.numel() for p in difffit.parameters() if p.requires_grad)
    assert trainable == xl2_parameter_count(tokens=256)[0] + 14 * 6 * 1152


def test_xl2_512_pos_embed():
    state = meta_dit("dit-xl2-512").state_dict()
    assert len(state) == 292
    assert tuple(state["pos_embed"].shape) == (1, 1024, 1152)
    assert tuple(state["x_embedder.proj.weight"].shape) == (1152, 4, 2, 2)
    total = sum(v.numel() for v in state.values())
    assert total == xl2_parameter_count(tokens=1024)[1]


# ---- the fixed embeddings against numpy -----------------------------------------------------------
def reference_pos_embed(dim, grid):
    """[grid * grid, dim] float64: token n = (row i, column j), n = i * grid + j; per axis dim / 2 channels,
    [sin(pos w_k), cos(pos w_k)] with w_k = 10000^(-k / (dim / 4)), k < dim / 4; the column (w) first."""
    quarter = dim // 4
    omega = 10000.0 ** (-np.arange(quarter, dtype=np.float64) / quarter)
    out = np.empty((grid * grid, dim))
    for i in range(grid):
        for j in range(grid):
            out[i * grid + j] = np.concatenate([np.sin(j * omega), np.cos(j * omega),
                                                np.sin(i * omega), np.cos(i * omega)])
    return out


@pytest.mark.parametrize("dim, grid", [(16, 3), (32, 4), (1152, 16)])
def test_pos_embed_formula(dim, grid):
    ours = sincos_pos_embed(dim, grid)
    assert ours.shape == (grid * grid, dim)
    np.testing.assert_allclose(ours, reference_pos_embed(dim, grid), rtol=0, atol=1e-12)


def test_model_pos_embed_is_the_fixed_table():
    dit = DiT(input_size=8, patch_size=2, hidden_size=32, depth=1, num_heads=2, num_classes=4)
    expected = torch.from_numpy(reference_pos_embed(32, 4)).float()[None]
    torch.testing.assert_close(dit.pos_embed.detach(), expected, **tolerance(torch.float32))


def test_timestep_frequency_formula(rng_seed):
    t = torch.cat([torch.arange(1000, dtype=torch.float32), torch.rand(64) * 999, torch.rand(64)])
    for dim in (256, 16):
        half = dim // 2
        freqs = np.exp(-np.log(1e4) * np.arange(half) / half)
        args = t.double().numpy()[:, None] * freqs[None]
        expected = np.concatenate([np.cos(args), np.sin(args)], axis=1)
        ours = timestep_frequencies(t, dim)
        assert ours.dtype == torch.float32 and ours.shape == (len(t), dim)
        # float32 arguments (as the original computes them): a few ulp of t * f, |t * f| up to 999.
        bound = 4 * 2.0 ** -23 * (np.abs(np.concatenate([args, args], axis=1)) + 1)
        error = np.abs(ours.double().numpy() - expected)
        assert (error <= bound).all(), float((error / bound).max())


# ---- forward against plain torch ops ---------------------------------------------------------------
def reference_forward(state, cfg, x, t, y):
    """The original DiT's forward from its state dict, with plain ops; DiffFit scales where present."""
    n, channels, side, _ = x.shape
    p, d, heads = cfg["patch_size"], cfg["hidden_size"], cfg["num_heads"]
    g, out_channels = side // p, (2 * channels if cfg["learn_sigma"] else channels)

    def linear(h, name):
        return h @ state[name + ".weight"].T + state[name + ".bias"]

    def layer_norm(h):  # no affine, eps 1e-6
        mean = h.mean(-1, keepdim=True)
        return (h - mean) / torch.sqrt(((h - mean) ** 2).mean(-1, keepdim=True) + 1e-6)

    def silu(h):
        return h * torch.sigmoid(h)

    def gelu_tanh(h):
        return 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h ** 3)))

    def modulate(h, shift, scale):
        return h * (1 + scale[:, None]) + shift[:, None]

    # patches (row-major over the g x g grid) flattened channel-major, as Conv2d's weight [D, C, p, p]
    patches = x.reshape(n, channels, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(n, g * g, channels * p * p)
    h = patches @ state["x_embedder.proj.weight"].reshape(d, -1).T + state["x_embedder.proj.bias"]
    h = h + torch.from_numpy(reference_pos_embed(d, g)).float().to(h.dtype)[None]  # stored as float32

    half = 128  # 256 frequencies, computed in float32 as the original does
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    t_freq = torch.cat([torch.cos(args), torch.sin(args)], dim=1).to(x.dtype)
    t_emb = linear(silu(linear(t_freq, "t_embedder.mlp.0")), "t_embedder.mlp.2")
    c = t_emb + state["y_embedder.embedding_table.weight"][y]

    for b in range(cfg["depth"]):
        pre = f"blocks.{b}."
        one = torch.ones((), dtype=x.dtype)
        shift1, scale1, gate1, shift2, scale2, gate2 = linear(silu(c), pre + "adaLN_modulation.1").chunk(6, dim=1)
        a = modulate(layer_norm(h), shift1, scale1)
        qkv = linear(a, pre + "attn.qkv") * state.get(pre + "attn.gamma1", one)
        q, k, v = qkv.reshape(n, g * g, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // heads), dim=-1)
        a = (weights @ v).transpose(1, 2).reshape(n, g * g, d)
        a = linear(a, pre + "attn.proj") * state.get(pre + "attn.gamma2", one)
        h = h + state.get(pre + "gamma1", one) * (gate1[:, None] * a)
        m = modulate(layer_norm(h), shift2, scale2)
        m = linear(gelu_tanh(linear(m, pre + "mlp.fc1")), pre + "mlp.fc2")
        h = h + state.get(pre + "gamma2", one) * (gate2[:, None] * m)

    shift, scale = linear(silu(c), "final_layer.adaLN_modulation.1").chunk(2, dim=1)
    tokens = linear(modulate(layer_norm(h), shift, scale), "final_layer.linear")  # [n, T, p * p * C_out]
    image = tokens.reshape(n, g, g, p, p, out_channels).permute(0, 5, 1, 3, 2, 4)
    return image.reshape(n, out_channels, g * p, g * p)


def random_dit(scale=0.2, **flags):
    """A DiT with every parameter random (adaLN, final layer, DiffFit scales), the sin-cos table kept."""
    dit = DiT(**flags)
    pos_embed = dit.pos_embed.detach().clone()
    randomize_(dit, scale)
    with torch.no_grad():
        dit.pos_embed.copy_(pos_embed)
        for name, param in dit.named_parameters():
            if "gamma" in name:
                param.copy_(1 + 0.5 * torch.randn_like(param))
    return dit.eval()


FORWARD_CASES = {
    "1-block": dict(depth=1, patch_size=2),
    "2-block-difffit": dict(depth=2, patch_size=2, difffit_blocks=1),
    "patch4-no-sigma-no-null": dict(depth=1, patch_size=4, learn_sigma=False, class_dropout_prob=0.0),
}


@pytest.mark.parametrize("case", list(FORWARD_CASES))
def test_forward_matches_plain_ops(case, rng_seed):
    cfg = {**dict(input_size=8, in_channels=4, hidden_size=32, num_heads=2, mlp_ratio=4.0, num_classes=10,
                  learn_sigma=True, class_dropout_prob=0.1), **FORWARD_CASES[case]}
    dit = random_dit(**cfg).double()
    state = {k: v.detach() for k, v in dit.state_dict().items()}
    x = torch.randn(3, 4, 8, 8, dtype=torch.float64)
    t = torch.tensor([0, 517, 999])
    y = torch.tensor([1, 9, 10 if cfg["class_dropout_prob"] > 0 else 3])  # the null class where there is one
    with torch.no_grad():
        ours = dit(x, t, y)
    expected = reference_forward(state, cfg, x, t, y)
    out_channels = 8 if cfg["learn_sigma"] else 4
    assert ours.shape == expected.shape == (3, out_channels, 8, 8)
    torch.testing.assert_close(ours, expected)  # float64 defaults: rtol 1e-7, atol 1e-7

    # the check can fail: the blocks (and the DiffFit scales) change the output far beyond the tolerance
    no_blocks = reference_forward(state, {**cfg, "depth": 0}, x, t, y)
    assert (no_blocks - expected).abs().max() > 1e-2
    if cfg.get("difffit_blocks"):
        unscaled = {k: v for k, v in state.items() if "gamma" not in k}
        assert (reference_forward(unscaled, cfg, x, t, y) - expected).abs().max() > 1e-2


# ---- diffusers' DiTTransformer2DModel ----------------------------------------------------------------
def random_diffusers_dit(layers=2):
    """A small diffusers DiT set to the original's math, every weight random, the shared embedder copied
    into each block as diffusers' conversion script does."""
    diffusers = pytest.importorskip("diffusers")
    model = diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=layers,
        sample_size=8, patch_size=2, num_embeds_ada_norm=10, norm_eps=1e-6)
    randomize_(model, 0.2)
    shared = model.transformer_blocks[0].norm1.emb.state_dict()
    for block in model.transformer_blocks:
        block.norm1.emb.load_state_dict(shared)
        # norm_eps reaches only the MLP LayerNorm (norm3); the adaLN norm and norm_out are fixed at 1e-6
        assert block.norm3.eps == block.norm1.norm.eps == model.norm_out.eps == 1e-6
    return model.eval()


def set_time_shift(model, shift):
    """diffusers' DiT time projection divides by half - 1 (downscale_freq_shift=1); the original by half."""
    for block in model.transformer_blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = shift


def test_diffusers_parity(tmp_path, rng_seed):
    model = random_diffusers_dit()
    model.save_pretrained(tmp_path / "dit")
    dit = load_diffusers_dit(tmp_path / "dit")
    assert len(dit.blocks) == 2 and dit.learn_sigma and dit.num_classes == 10 and dit.null_class == 10
    x = torch.randn(4, 4, 8, 8)
    t = torch.tensor([0, 3, 500, 999])
    y = torch.tensor([0, 4, 9, 10])
    set_time_shift(model, 0)
    with torch.no_grad():
        ours = dit(x, t, y)
        theirs = model(x, timestep=t, class_labels=y).sample
    scale = theirs.abs().max()
    assert scale > 0.1
    torch.testing.assert_close(ours / scale, theirs / scale, **tolerance(torch.float32, "reduction"))
    # the check can fail: diffusers' own frequencies (shift 1) are another function of t
    set_time_shift(model, 1)
    with torch.no_grad():
        shifted = model(x, timestep=t, class_labels=y).sample
    assert ((shifted - ours).abs().max() / scale) > 1e-3


def test_diffusers_folder_with_transformer_subfolder(tmp_path):
    model = random_diffusers_dit(layers=1)
    model.save_pretrained(tmp_path / "pipeline" / "transformer")
    dit = load_diffusers_dit(tmp_path / "pipeline")
    assert torch.equal(dit.x_embedder.proj.weight, model.pos_embed.proj.weight.detach())


@pytest.mark.parametrize("name", ["timestep_embedder.linear_1.weight", "timestep_embedder.linear_2.bias",
                                  "class_embedder.embedding_table.weight"])
def test_diffusers_embedder_copies_must_agree(tmp_path, name):
    model = random_diffusers_dit()
    with torch.no_grad():
        model.transformer_blocks[1].norm1.emb.get_parameter(name).add_(1e-3)
    model.save_pretrained(tmp_path / "dit")
    with pytest.raises(IGDSInputError) as excinfo:
        load_diffusers_dit(tmp_path / "dit")
    one_line_error(excinfo, "block 1", name, "differs")


def test_diffusers_refusals(tmp_path):
    model = random_diffusers_dit(layers=1)
    config = dict(model.config)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    with pytest.raises(IGDSInputError) as excinfo:
        dit_from_diffusers_state(config, {k: v for k, v in state.items() if k != "proj_out_2.bias"})
    one_line_error(excinfo, "proj_out_2.bias")
    with pytest.raises(IGDSInputError) as excinfo:
        dit_from_diffusers_state(config, {**state, "transformer_blocks.0.norm3.weight": torch.ones(16)})
    one_line_error(excinfo, "no DiT counterpart", "transformer_blocks.0.norm3.weight")
    with pytest.raises(IGDSInputError) as excinfo:
        dit_from_diffusers_state({**config, "activation_fn": "gelu"}, state)
    one_line_error(excinfo, "activation_fn", "gelu-approximate")
    with pytest.raises(IGDSInputError) as excinfo:
        load_diffusers_dit(tmp_path)
    one_line_error(excinfo, "not a diffusers DiT folder")


# ---- checkpoint loaders -----------------------------------------------------------------------------
def same_weights(loaded, reference):
    state, expected = loaded.state_dict(), reference.state_dict()
    assert sorted(state) == sorted(expected)
    assert all(torch.equal(state[k], expected[k]) for k in expected)


def test_load_plain_state_dict(tmp_path, rng_seed):
    reference = tiny_dit(scale=0.2)
    path = tmp_path / "dit.pt"
    torch.save(reference.state_dict(), path)
    dit = load_dit(path, preset="dit-xl2-256", **TINY)
    assert not dit.training and len(dit.blocks) == 2
    same_weights(dit, reference)
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([10, 900]), torch.tensor([0, 4])
    with torch.no_grad():
        assert torch.equal(dit(x, t, y), reference(x, t, y))


def test_load_training_checkpoint_uses_ema(tmp_path, rng_seed):
    model, ema = tiny_dit(scale=0.2), tiny_dit(scale=0.2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0)
    model(torch.randn(1, 4, 8, 8), torch.tensor([5]), torch.tensor([1])).square().mean().backward()
    opt.step()
    args = argparse.Namespace(model="DiT-XL/2", image_size=64, num_classes=4, global_batch_size=256, epochs=1400)
    path = tmp_path / "0050000.pt"
    torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(), "args": args}, path)
    dit = load_dit(path, preset="dit-xl2-256", **TINY)
    same_weights(dit, ema)
    assert not torch.equal(dit.blocks[0].attn.qkv.weight, model.blocks[0].attn.qkv.weight)


class NotAWeight:  # a pickled object that weights_only loading must refuse
    pass


def test_load_refuses_pickled_objects(tmp_path):
    path = tmp_path / "ckpt.pt"
    torch.save({"model": tiny_dit().state_dict(), "ema": tiny_dit().state_dict(), "args": NotAWeight()}, path)
    with pytest.raises(IGDSInputError) as excinfo:
        load_dit(path, **TINY)
    one_line_error(excinfo, "cannot read the DiT checkpoint", str(path))


def test_load_minimax_difffit_checkpoint_with_module_prefix(tmp_path, rng_seed):
    reference = random_dit(input_size=8, patch_size=2, hidden_size=32, depth=2, num_heads=2, num_classes=4,
                           difffit_blocks=1)
    path = tmp_path / "minimax.pt"
    ema = {f"module.{k}": v for k, v in reference.state_dict().items()}
    args = argparse.Namespace(model="DiT-XL/2", ckpt="pretrained_models/DiT-XL-2-256x256.pt")
    torch.save({"model": ema, "ema": ema, "opt": {}, "args": args}, path)
    dit = load_dit(path, preset="dit-xl2-256", **TINY)
    assert dit.flags["difffit_blocks"] == 1
    assert hasattr(dit.blocks[0], "gamma1") and not hasattr(dit.blocks[1], "gamma1")
    same_weights(dit, reference)
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([10, 900]), torch.tensor([0, 4])
    with torch.no_grad():
        assert torch.equal(dit(x, t, y), reference(x, t, y))


def saved(tmp_path, state, name="bad.pt"):
    path = tmp_path / name
    torch.save(state, path)
    return path


def test_load_refusals(tmp_path):
    state = tiny_dit().state_dict()
    difffit = tiny_dit(difffit_blocks=1).state_dict()
    cases = [
        ({**state, "blocks.0.attn.extra": torch.ones(3)}, ("1 unexpected keys", "blocks.0.attn.extra")),
        ({k: v for k, v in state.items() if k != "final_layer.linear.bias"},
         ("1 missing keys", "final_layer.linear.bias")),
        ({**state, "y_embedder.embedding_table.weight": torch.zeros(7, 32)},
         ("another shape", "y_embedder.embedding_table.weight", "(7, 32)", "(5, 32)")),
        ({k: v for k, v in difffit.items() if k != "blocks.0.attn.gamma2"}, ("block 0", "attn.gamma2")),
        ({k.replace("blocks.0.", "blocks.1.") if "gamma" in k else k: v for k, v in difffit.items()},
         ("DiffFit", "leading blocks")),
        ({"model": [1, 2, 3]}, ("not a DiT state dict",)),
    ]
    for bad, fragments in cases:
        with pytest.raises(IGDSInputError) as excinfo:
            load_dit(saved(tmp_path, bad), **TINY)
        one_line_error(excinfo, *fragments)

    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"definitely not a torch file\n" * 4)
    with pytest.raises(IGDSInputError) as excinfo:
        load_dit(garbage, **TINY)
    one_line_error(excinfo, "cannot read the DiT checkpoint", "garbage.pt")

    for path, fragments in [(tmp_path / "missing.pt", ("not found", "missing.pt")), (tmp_path, ("not found",))]:
        with pytest.raises(IGDSInputError) as excinfo:
            load_dit(path, **TINY)
        one_line_error(excinfo, *fragments)

    good = saved(tmp_path, state, "good.pt")
    with pytest.raises(IGDSInputError) as excinfo:
        load_dit(good, preset="dit-xl2-1024", **TINY)
    one_line_error(excinfo, "unknown DiT preset", "dit-xl2-256")
    with pytest.raises(IGDSInputError) as excinfo:
        load_dit(good, hiden_size=32)
    one_line_error(excinfo, "unknown DiT arguments", "hiden_size")
    with pytest.raises(IGDSInputError) as excinfo:  # the preset's own size: every shape differs
        load_dit(good)
    one_line_error(excinfo, "missing keys", "blocks.10")


# ---- sizes read off the shapes (preset=None), describing without loading ------------------------------
@pytest.mark.parametrize("size, input_size, difffit", [("DiT-XL/2", 32, 14), ("DiT-XL/2", 64, 0), ("DiT-XL/4", 32, 0),
                                                       ("DiT-L/2", 32, 0), ("DiT-B/2", 32, 3), ("DiT-S/2", 16, 0)])
def test_flags_read_off_the_shapes(size, input_size, difffit):
    with torch.device("meta"):
        dit = DiT(**DIT_SIZES[size], input_size=input_size, difffit_blocks=difffit)
    assert dit_flags(dit.state_dict()) == dit.flags
    if size == "DiT-XL/2":
        preset = {32: "dit-xl2-256", 64: "dit-xl2-512"}[input_size]
        assert dit_flags(dit.state_dict(), preset) == dit.flags


def test_flags_read_off_the_shapes_of_a_tiny_dit(tmp_path, rng_seed):
    flags = dict(input_size=8, patch_size=4, in_channels=3, hidden_size=24, depth=3, num_heads=3, mlp_ratio=2.0,
                 class_dropout_prob=0.1, num_classes=7, learn_sigma=False, difffit_blocks=2)
    reference = random_dit(**flags)
    path = saved(tmp_path, {"model": reference.state_dict(), "ema": reference.state_dict()}, "tiny.pt")
    with pytest.raises(IGDSInputError) as excinfo:  # the heads are not in the weights
        describe_dit_checkpoint(path)
    one_line_error(excinfo, "num_heads", "hidden size 24")
    assert describe_dit_checkpoint(path, num_heads=3) == flags
    dit = load_dit(path, preset=None, **describe_dit_checkpoint(path, num_heads=3))
    same_weights(dit, reference)
    assert load_dit(path, preset=None, num_heads=3).flags == flags
    # a model trained without the null row: the classes are given
    no_null = random_dit(**{**flags, "class_dropout_prob": 0.0})
    path = saved(tmp_path, no_null.state_dict(), "no_null.pt")
    assert describe_dit_checkpoint(path, num_heads=3)["num_classes"] == 6  # read as 6 classes + the null row
    assert describe_dit_checkpoint(path, num_heads=3, num_classes=7, class_dropout_prob=0.0) == no_null.flags


def test_describe_and_recognise_checkpoints(tmp_path):
    state = tiny_dit().state_dict()
    difffit = tiny_dit(difffit_blocks=1).state_dict()
    tiny_flags = tiny_dit().flags
    files = {
        "plain.pt": state,
        "train.pt": {"model": state, "ema": state, "opt": {}, "args": argparse.Namespace(model="DiT-XL/2")},
        "minimax.pt": {"ema": {f"module.{k}": v for k, v in difffit.items()}},
    }
    for name, content in files.items():
        path = saved(tmp_path, content, name)
        assert is_dit_checkpoint(path)
        expected = {**tiny_flags, "difffit_blocks": 1 if name == "minimax.pt" else 0}
        assert describe_dit_checkpoint(path, num_heads=2) == expected
        assert describe_dit_checkpoint(path, "dit-xl2-256", **TINY) == expected
    legacy = tmp_path / "legacy.pt"  # the pre-zip format cannot be memory-mapped: read as it is
    torch.save(state, legacy, _use_new_zipfile_serialization=False)
    assert is_dit_checkpoint(legacy) and describe_dit_checkpoint(legacy, num_heads=2) == tiny_flags

    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    adm = saved(tmp_path, {"input_blocks.0.0.weight": torch.zeros(8, 3, 3, 3), "out.2.bias": torch.zeros(6)}, "adm.pt")
    for path in (garbage, adm, tmp_path / "missing.pt", tmp_path):
        assert not is_dit_checkpoint(path)
    with pytest.raises(IGDSInputError) as excinfo:
        describe_dit_checkpoint(adm)
    one_line_error(excinfo, "not a DiT state dict", "x_embedder.proj.weight")
    with pytest.raises(IGDSInputError) as excinfo:
        describe_dit_checkpoint(saved(tmp_path, state, "tiny.pt"), "dit-xl2-256")  # the preset's size: refused
    one_line_error(excinfo, "missing keys")
