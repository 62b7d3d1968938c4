"""DiT (Peebles & Xie 2023), key for key the original `models.py`, plus MinimaxDiffusion's DiffFit scales.

    dit = DiT(input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28, num_heads=16,
              mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=1000, learn_sigma=True)   # DiT-XL/2, 256 px
    out = dit(z [B, 4, 32, 32], timesteps [B] (training steps 0..999), y [B] in [0, 1000])   -> [B, 8, 32, 32]

Shapes and layout (the original's, so its checkpoints load as they are):

    x_embedder.proj          Conv2d(C, D, p, stride p): patches -> tokens [B, T = (S/p)^2, D]
    pos_embed                [1, T, D] fixed 2-D sin-cos (a frozen parameter, in the state dict)
    t_embedder.mlp.{0,2}     256 frequencies exp(-ln(1e4) k / 128) as [cos, sin] -> Linear, SiLU, Linear
    y_embedder.embedding_table   [num_classes + 1, D]: row num_classes = the null class (CFG)
    blocks.N                 adaLN-Zero: LayerNorm (no affine, eps 1e-6), attention (qkv, proj; SDPA),
                             tanh-GELU MLP (fc1, fc2), adaLN_modulation.1 = Linear(D, 6D)
    final_layer              LayerNorm, adaLN_modulation.1 = Linear(D, 2D), linear -> p*p*2C, unpatchify

DiffFit (MinimaxDiffusion): `difffit_blocks` leading blocks carry learned scales `gamma1`, `gamma2`
(on the two residual branches) and `attn.gamma1` / `attn.gamma2` (on qkv and proj): 4 keys a
block, 56 for its 14. The loaders accept exactly these as extra keys and nothing else. No timm:
attention is `F.scaled_dot_product_attention` (the original's timm Attention computes the same).

Loaders: load_dit (a preset's size, or preset=None: read off the tensor shapes, num_heads from
DIT_SIZES' hidden sizes or given), describe_dit_checkpoint / is_dit_checkpoint (keys and shapes only,
the file memory-mapped), load_diffusers_dit (a DiTTransformer2DModel folder).

Attributes of a prior (models.protocols.PriorUNet): image_size (= input_size, the latent side),
in_channels, learn_sigma, num_classes; null_class (= num_classes, for classifier-free guidance).
"""
from __future__ import annotations

import argparse
import inspect
import math
import os
import zipfile
from typing import Mapping

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..artifacts import check_finite_weights, check_torch_archive
from ..errors import IGDSInputError
from ..limits import header_int, read_json

# The original's model sizes (DiT_models) and this project's presets (latent side = image side / 8).
DIT_SIZES = {
    "DiT-XL/2": dict(depth=28, hidden_size=1152, patch_size=2, num_heads=16),
    "DiT-XL/4": dict(depth=28, hidden_size=1152, patch_size=4, num_heads=16),
    "DiT-L/2": dict(depth=24, hidden_size=1024, patch_size=2, num_heads=16),
    "DiT-B/2": dict(depth=12, hidden_size=768, patch_size=2, num_heads=12),
    "DiT-S/2": dict(depth=12, hidden_size=384, patch_size=2, num_heads=6),
}
DIT_PRESETS = {
    "dit-xl2-256": dict(DIT_SIZES["DiT-XL/2"], input_size=32),
    "dit-xl2-512": dict(DIT_SIZES["DiT-XL/2"], input_size=64),
}
DIFFFIT_KEYS = ("gamma1", "gamma2", "attn.gamma1", "attn.gamma2")
MINIMAX_DIFFFIT_BLOCKS = 14


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def sincos_pos_embed(dim: int, grid: int) -> np.ndarray:
    """The original's fixed 2-D sin-cos position embedding [grid * grid, dim] (MAE's, w first)."""
    def one_d(half_dim, positions):
        omega = 1.0 / 10000 ** (np.arange(half_dim // 2, dtype=np.float64) / (half_dim / 2.0))
        out = np.einsum("m,d->md", positions.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    coords = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32))  # w goes first
    coords = np.stack(coords, axis=0).reshape(2, 1, grid, grid)
    return np.concatenate([one_d(dim // 2, coords[0]), one_d(dim // 2, coords[1])], axis=1)


def timestep_frequencies(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """[cos, sin] of t * exp(-ln(max_period) k / (dim/2)), k < dim/2: [B, dim] float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class PatchEmbedder(nn.Module):
    def __init__(self, input_size, patch_size, in_channels, hidden_size):
        super().__init__()
        self.patch_size = (patch_size, patch_size)
        self.num_patches = (input_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size, bias=True)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # [B, T, D]


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden_size, frequency_embedding_size=256):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size))
        self.frequency_embedding_size = frequency_embedding_size

    def forward(self, t):
        return self.mlp(timestep_frequencies(t, self.frequency_embedding_size).to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    def __init__(self, num_classes, hidden_size, dropout_prob):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)
        self.num_classes = num_classes

    def forward(self, labels):
        return self.embedding_table(labels)


class Attention(nn.Module):
    """Multi-head self-attention (timm's layout: qkv, proj) through SDPA, with optional DiffFit scales."""

    def __init__(self, dim, num_heads, difffit=False):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)
        if difffit:
            self.gamma1 = nn.Parameter(torch.ones(dim * 3))
            self.gamma2 = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        batch, tokens, dim = x.shape
        qkv = self.qkv(x)
        if hasattr(self, "gamma1"):
            qkv = self.gamma1 * qkv
        q, k, v = qkv.reshape(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)  # scale 1 / sqrt(head_dim), as timm
        out = self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))
        return self.gamma2 * out if hasattr(self, "gamma2") else out


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0, difffit=False):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads, difffit)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))
        if difffit:
            self.gamma1 = nn.Parameter(torch.ones(hidden_size))
            self.gamma2 = nn.Parameter(torch.ones(hidden_size))

    def forward(self, x, c):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        # MinimaxDiffusion's order, `x + gamma1 * gate * attn(...)` evaluated left to right: the DiffFit
        # scale multiplies the gate first (the other grouping differs in the last bits).
        gate_msa, gate_mlp = gate_msa.unsqueeze(1), gate_mlp.unsqueeze(1)
        if hasattr(self, "gamma1"):
            gate_msa, gate_mlp = self.gamma1 * gate_msa, self.gamma2 * gate_mlp
        x = x + gate_msa * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        return x + gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    """The original DiT (module docstring); forward(x, t, y) -> [B, 2C or C, S, S] (eps, then v)."""

    def __init__(self, input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28, num_heads=16,
                 mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=1000, learn_sigma=True, difffit_blocks=0):
        super().__init__()
        if input_size % patch_size or hidden_size % num_heads:
            raise IGDSInputError(f"DiT needs input_size % patch_size == 0 and hidden_size % num_heads == 0, got "
                                 f"{input_size}, {patch_size}, {hidden_size}, {num_heads}")
        if not 0 <= difffit_blocks <= depth:
            raise IGDSInputError(f"difffit_blocks must be in [0, {depth}], got {difffit_blocks}")
        self.flags = dict(input_size=input_size, patch_size=patch_size, in_channels=in_channels,
                          hidden_size=hidden_size, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
                          class_dropout_prob=class_dropout_prob, num_classes=num_classes, learn_sigma=learn_sigma,
                          difffit_blocks=difffit_blocks)
        self.learn_sigma, self.in_channels = bool(learn_sigma), int(in_channels)
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.image_size, self.patch_size, self.num_classes = int(input_size), int(patch_size), int(num_classes)
        self.null_class = self.num_classes if class_dropout_prob > 0 else None
        self.x_embedder = PatchEmbedder(input_size, patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        grid = input_size // patch_size
        self.pos_embed = nn.Parameter(torch.tensor(sincos_pos_embed(hidden_size, grid), dtype=torch.float32).unsqueeze(0),
                                      requires_grad=False)
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio, difffit=k < difffit_blocks)
                                     for k in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)

    def unpatchify(self, x):
        c, p = self.out_channels, self.patch_size
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, h * p, w * p)

    def forward(self, x, t, y):
        x = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y)
        for block in self.blocks:
            x = block(x, c)
        return self.unpatchify(self.final_layer(x, c))


# ---- checkpoints -----------------------------------------------------------------------------------
def _torch_load(path: str, mmap: bool = False):
    """torch.load with weights_only=True; argparse.Namespace allowed (MinimaxDiffusion keeps its args).

    mmap: map the tensors instead of reading them (zip-format files; the describers read shapes only)."""
    check_torch_archive(path, "DiT checkpoint")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and zipfile.is_zipfile(path))
    except Exception as exc:  # noqa: BLE001 — an unreadable file is one input error
        raise IGDSInputError(f"cannot read the DiT checkpoint {path}: {type(exc).__name__}: "
                             f"{' '.join(str(exc).split())[:200]}") from None


def dit_state_dict(checkpoint) -> dict[str, torch.Tensor]:
    """The weights of a DiT checkpoint: a plain state dict, or a training dict's "ema" (else "model")."""
    if isinstance(checkpoint, Mapping) and ("ema" in checkpoint or "model" in checkpoint):
        checkpoint = checkpoint.get("ema", checkpoint.get("model"))
    if not isinstance(checkpoint, Mapping) or not all(torch.is_tensor(v) for v in checkpoint.values()):
        raise IGDSInputError("not a DiT state dict (nor a {'model', 'ema', ...} training checkpoint)")
    return {k.removeprefix("module."): v for k, v in checkpoint.items()}


def difffit_blocks_of(state: Mapping[str, torch.Tensor]) -> int:
    """How many leading blocks carry the four DiffFit scales (checked: all four, leading blocks only)."""
    blocks = sorted({int(k.split(".")[1]) for k in state if k.startswith("blocks.") and k.endswith("gamma1")
                     and k.count(".") in (2, 3)})
    if blocks != list(range(len(blocks))):
        raise IGDSInputError(f"DiffFit scales on blocks {blocks}: expected the leading blocks 0..N-1")
    for block in blocks:
        missing = [key for key in DIFFFIT_KEYS if f"blocks.{block}.{key}" not in state]
        if missing:
            raise IGDSInputError(f"block {block} has DiffFit scales but lacks {missing}")
    return len(blocks)


def check_dit_state(model: DiT, state: Mapping[str, torch.Tensor], source: str) -> None:
    """One-line errors for missing, unexpected or mis-shaped keys."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        raise IGDSInputError(f"{source}: {len(missing)} missing keys (e.g. {missing[:3]}) and {len(extra)} "
                             f"unexpected keys (e.g. {extra[:3]}) for DiT {model.flags}")
    wrong = [k for k, v in state.items() if tuple(v.shape) != tuple(expected[k].shape)]
    if wrong:
        k = wrong[0]
        raise IGDSInputError(f"{source}: {len(wrong)} keys of another shape, e.g. {k} {tuple(state[k].shape)} "
                             f"(DiT {tuple(expected[k].shape)})")


def dit_flags_from_state(state: Mapping[str, torch.Tensor]) -> dict:
    """DiT's constructor arguments read off a state dict's shapes (num_heads only where DIT_SIZES knows it).

    x_embedder.proj.weight [D, C, p, p]; pos_embed [1, (S/p)^2, D]; depth = the blocks.N present;
    blocks.0.mlp.fc1.weight [mlp_ratio D, D]; final_layer.linear.weight [p p C, D] or [p p 2C, D]
    (learn_sigma); y_embedder.embedding_table.weight [classes + 1, D], read as the original's
    class_dropout_prob 0.1 with its null row (a model trained without one needs num_classes and
    class_dropout_prob=0 given). The heads are not in the weights: DIT_SIZES' count for D, else absent.
    """
    needed = ("x_embedder.proj.weight", "pos_embed", "blocks.0.mlp.fc1.weight", "final_layer.linear.weight",
              "y_embedder.embedding_table.weight")
    missing = [key for key in needed if key not in state]
    if missing:
        raise IGDSInputError(f"not a DiT state dict: no {missing}")
    hidden, channels, patch, _ = (int(n) for n in state["x_embedder.proj.weight"].shape)
    tokens, out = int(state["pos_embed"].shape[-2]), int(state["final_layer.linear.weight"].shape[0])
    grid = math.isqrt(tokens)
    if grid * grid != tokens or out not in (patch * patch * channels, 2 * patch * patch * channels):
        raise IGDSInputError(f"not a DiT state dict: pos_embed of {tokens} tokens (not a square grid) or "
                             f"final_layer.linear of {out} outputs (patch {patch}, {channels} channels)")
    flags = dict(input_size=grid * patch, patch_size=patch, in_channels=channels, hidden_size=hidden,
                 depth=len({k.split(".")[1] for k in state if k.startswith("blocks.")}),
                 mlp_ratio=state["blocks.0.mlp.fc1.weight"].shape[0] / hidden, class_dropout_prob=0.1,
                 num_classes=int(state["y_embedder.embedding_table.weight"].shape[0]) - 1,
                 learn_sigma=out == 2 * patch * patch * channels)
    header_int(flags["input_size"], "input size (pos_embed x patch)", "image side", "DiT checkpoint")
    header_int(flags["num_classes"], "num_classes (y_embedder rows - 1)", "classes", "DiT checkpoint")
    header_int(channels, "in_channels", "image channels", "DiT checkpoint")
    heads = {size["hidden_size"]: size["num_heads"] for size in DIT_SIZES.values()}
    if hidden in heads:
        flags["num_heads"] = heads[hidden]
    return flags


def _check_dit_args(preset: str | None, overrides: Mapping) -> None:
    if preset is not None and preset not in DIT_PRESETS:
        raise IGDSInputError(f"unknown DiT preset {preset!r}; available: {', '.join(sorted(DIT_PRESETS))} "
                             "(or None: read the size off the checkpoint)")
    unknown = sorted(set(overrides) - set(inspect.signature(DiT).parameters))
    if unknown:
        raise IGDSInputError(f"unknown DiT arguments {unknown}; DiT takes "
                             f"{', '.join(inspect.signature(DiT).parameters)}")


def dit_flags(state: Mapping[str, torch.Tensor], preset: str | None = None, source: str = "DiT checkpoint",
              **overrides) -> dict:
    """All of DiT's constructor arguments for `state`, checked against its keys and shapes (meta device).

    A preset's size (preset None: read off the shapes, dit_flags_from_state), then the overrides;
    difffit_blocks always from the keys (difffit_blocks_of)."""
    _check_dit_args(preset, overrides)
    base = dict(DIT_PRESETS[preset]) if preset is not None else dit_flags_from_state(state)
    flags = {**base, **overrides, "difffit_blocks": difffit_blocks_of(state)}
    if "num_heads" not in flags:
        raise IGDSInputError(f"{source}: a DiT of hidden size {flags.get('hidden_size')} (no DiT_models size): "
                             "its num_heads is not in the weights, pass num_heads")
    with torch.device("meta"):
        model = DiT(**flags)
    check_dit_state(model, state, source)
    return dict(model.flags)


def load_dit(path: str | os.PathLike, preset: str | None = "dit-xl2-256", device="cpu", **overrides) -> DiT:
    """A DiT from the original's checkpoint layouts: a plain state dict (DiT-XL-2-256x256.pt), a training
    checkpoint {"model", "ema", "opt", "args"} (its EMA), or MinimaxDiffusion's (with DiffFit scales).

    preset: a DIT_PRESETS name, or None to read the size off the tensor shapes (dit_flags); overrides:
    DiT constructor arguments over it (e.g. num_classes, input_size)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise IGDSInputError(f"DiT checkpoint not found: {path}")
    _check_dit_args(preset, overrides)
    state = dit_state_dict(_torch_load(path))
    model = DiT(**dit_flags(state, preset, path, **overrides))
    check_finite_weights(state, f"DiT checkpoint {path}")
    model.load_state_dict(state)
    return model.to(device).eval()


def describe_dit_checkpoint(path: str | os.PathLike, preset: str | None = None, **overrides) -> dict:
    """The DiT constructor arguments of a checkpoint (as load_dit would build it), from its keys and shapes
    only: the file is memory-mapped, no weight is read. load_dit(path, preset=None, **flags) loads it."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise IGDSInputError(f"DiT checkpoint not found: {path}")
    _check_dit_args(preset, overrides)
    return dit_flags(dit_state_dict(_torch_load(path, mmap=True)), preset, path, **overrides)


def is_dit_checkpoint(path: str | os.PathLike) -> bool:
    """Whether a file is a torch checkpoint holding DiT weights (any of load_dit's layouts; memory-mapped)."""
    try:
        state = dit_state_dict(_torch_load(os.fspath(path), mmap=True))
    except IGDSInputError:
        return False
    return "x_embedder.proj.weight" in state and "y_embedder.embedding_table.weight" in state


# ---- diffusers' DiTTransformer2DModel layout ---------------------------------------------------------
def dit_from_diffusers_state(config: Mapping, state: Mapping[str, torch.Tensor]) -> DiT:
    """A DiT from a diffusers DiTTransformer2DModel config and state dict (the inverse of its conversion).

    Every diffusers key must map to a DiT key and every block's copy of the shared timestep / class
    embedder (all its weights and biases) must equal block 0's. The DiT computes the original's
    math, not diffusers' (whose time projection divides by half - 1, downscale_freq_shift=1, and whose
    MLP LayerNorm eps is norm_eps, 1e-5 by default, where the original has 1e-6 throughout)."""
    for name, want in (("norm_type", "ada_norm_zero"), ("activation_fn", "gelu-approximate")):
        if config.get(name, want) != want:
            raise IGDSInputError(f"diffusers DiT: {name} {config[name]!r}, the original DiT has {want!r}")
    used: set[str] = set()

    def take(key):
        if key not in state:
            raise IGDSInputError(f"diffusers DiT: no {key} (not a DiTTransformer2DModel of this config)")
        used.add(key)
        return state[key]

    heads, head_dim = int(config["num_attention_heads"]), int(config["attention_head_dim"])
    hidden, depth = heads * head_dim, int(config["num_layers"])
    in_channels = int(config.get("in_channels", 4))
    out_channels = int(config.get("out_channels") or in_channels)
    classes = int(config["num_embeds_ada_norm"])
    emb = "transformer_blocks.0.norm1.emb."
    table = take(emb + "class_embedder.embedding_table.weight")
    flags = dict(input_size=int(config["sample_size"]), patch_size=int(config["patch_size"]), in_channels=in_channels,
                 hidden_size=hidden, depth=depth, num_heads=heads, num_classes=classes,
                 learn_sigma=out_channels == 2 * in_channels, class_dropout_prob=0.1 if table.shape[0] > classes else 0.0)
    shared = sorted(key[len(emb):] for key in state if key.startswith(emb))
    for k in range(1, depth):  # diffusers keeps one copy of the shared embedders per block
        for name in shared:
            if not torch.equal(take(f"transformer_blocks.{k}.norm1.emb.{name}"), state[emb + name]):
                raise IGDSInputError(f"diffusers DiT: block {k}'s {name} differs from block 0's "
                                     "(not a converted DiT)")
    ours = {
        "x_embedder.proj.weight": take("pos_embed.proj.weight"), "x_embedder.proj.bias": take("pos_embed.proj.bias"),
        "t_embedder.mlp.0.weight": take(emb + "timestep_embedder.linear_1.weight"),
        "t_embedder.mlp.0.bias": take(emb + "timestep_embedder.linear_1.bias"),
        "t_embedder.mlp.2.weight": take(emb + "timestep_embedder.linear_2.weight"),
        "t_embedder.mlp.2.bias": take(emb + "timestep_embedder.linear_2.bias"),
        "y_embedder.embedding_table.weight": table,
        "final_layer.adaLN_modulation.1.weight": take("proj_out_1.weight"),
        "final_layer.adaLN_modulation.1.bias": take("proj_out_1.bias"),
        "final_layer.linear.weight": take("proj_out_2.weight"), "final_layer.linear.bias": take("proj_out_2.bias"),
    }
    for k in range(depth):
        block = f"transformer_blocks.{k}."
        ours[f"blocks.{k}.adaLN_modulation.1.weight"] = take(block + "norm1.linear.weight")
        ours[f"blocks.{k}.adaLN_modulation.1.bias"] = take(block + "norm1.linear.bias")
        for kind in ("weight", "bias"):
            ours[f"blocks.{k}.attn.qkv.{kind}"] = torch.cat([take(block + f"attn1.to_{n}.{kind}") for n in "qkv"])
            ours[f"blocks.{k}.attn.proj.{kind}"] = take(block + f"attn1.to_out.0.{kind}")
            ours[f"blocks.{k}.mlp.fc1.{kind}"] = take(block + f"ff.net.0.proj.{kind}")
            ours[f"blocks.{k}.mlp.fc2.{kind}"] = take(block + f"ff.net.2.{kind}")
    unused = sorted(set(state) - used)
    if unused:
        raise IGDSInputError(f"diffusers DiT: {len(unused)} keys with no DiT counterpart (e.g. {unused[:3]})")
    model = DiT(**flags)
    ours["pos_embed"] = model.pos_embed.detach().clone()  # fixed, recomputed (diffusers does the same)
    check_dit_state(model, ours, "diffusers DiT")
    check_finite_weights(ours, "diffusers DiT")
    model.load_state_dict(ours)
    return model.eval()


def load_diffusers_dit(directory: str | os.PathLike, device="cpu") -> DiT:
    """A DiT from a local diffusers DiTTransformer2DModel folder (config.json + safetensors weights)."""
    from safetensors.torch import load_file

    directory = os.fspath(directory)
    if os.path.isfile(os.path.join(directory, "transformer", "config.json")):
        directory = os.path.join(directory, "transformer")
    config_path = os.path.join(directory, "config.json")
    weights = os.path.join(directory, "diffusion_pytorch_model.safetensors")
    if not os.path.isfile(config_path) or not os.path.isfile(weights):
        raise IGDSInputError(f"not a diffusers DiT folder (config.json + diffusion_pytorch_model.safetensors): {directory}")
    config = read_json(config_path, "diffusers DiT config")
    if not isinstance(config, dict):
        raise IGDSInputError(f"{config_path} is not a diffusers config (a JSON object)")
    if config.get("_class_name") not in (None, "DiTTransformer2DModel", "Transformer2DModel"):
        raise IGDSInputError(f"{config_path}: a {config.get('_class_name')}, not a DiTTransformer2DModel")
    return dit_from_diffusers_state(config, load_file(weights)).to(device)


__all__ = ["DIFFFIT_KEYS", "DIT_PRESETS", "DIT_SIZES", "DiT", "check_dit_state", "describe_dit_checkpoint",
           "difffit_blocks_of", "dit_flags", "dit_flags_from_state", "dit_from_diffusers_state", "dit_state_dict",
           "is_dit_checkpoint", "load_diffusers_dit", "load_dit", "sincos_pos_embed"]
