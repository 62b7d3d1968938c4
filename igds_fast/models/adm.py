"""The ADM UNet (Dhariwal & Nichol 2021): guided-diffusion's `UNetModel`, loadable key for key.

The module tree mirrors guided-diffusion's so that `state_dict()` keys and shapes are identical and
the public OpenAI checkpoints (256x256_diffusion.pt, 256x256_diffusion_uncond.pt, 128x128_diffusion.pt,
64x64_diffusion.pt) load with `load_state_dict(strict=True)`:

    time_embed.{0,2}                   Linear(C, 4C), SiLU, Linear(4C, 4C)       C = num_channels
    label_emb                          Embedding(num_classes, 4C)                (class-conditional)
    input_blocks.K.L                   conv stem, ResBlocks (+ AttentionBlocks), down-sampling
    middle_block.{0,1,2}               ResBlock, AttentionBlock, ResBlock
    output_blocks.K.L                  ResBlocks on [h, skip] (+ AttentionBlocks), up-sampling
    out.{0,2}                          GroupNorm, SiLU, conv to out_channels (2x for learned sigma)

forward(x [B, in, H, W], timesteps [B] (original training t), y [B] or None) -> [B, out, H, W].

Differences from the original that do not change float32 results: attention runs through
`F.scaled_dot_product_attention` (see `AttentionBlock._attention`); no gradient checkpointing is ever
forced (the original's checkpoint makes input-gradients fail when the weights are frozen).

Precision: everything is computed in the dtype of the parameters, GroupNorm always in float32.
`use_fp16` is recorded, not applied: the loaders give the float32 reference, and a backend that
wants half precision calls `model.to(torch.float16 or torch.bfloat16)`. Unlike the original's
`convert_to_fp16` (convolutions only) that also converts the small time-embedding MLP and the output
conv — a negligible share of the FLOPs — so no separate conversion method is provided.
"""
from __future__ import annotations

import math
import os
from typing import Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..artifacts import check_finite_weights, check_torch_archive
from ..errors import IGDSInputError

NUM_IMAGENET_CLASSES = 1000

# guided-diffusion README MODEL_FLAGS of the four public ImageNet checkpoints.
ADM_PRESETS: dict[str, dict] = {
    "adm256-cond": dict(
        image_size=256, num_channels=256, num_res_blocks=2, attention_resolutions="32,16,8",
        class_cond=True, learn_sigma=True, num_head_channels=64, resblock_updown=True,
        use_fp16=True, use_scale_shift_norm=True,
    ),
    "adm256-uncond": dict(
        image_size=256, num_channels=256, num_res_blocks=2, attention_resolutions="32,16,8",
        class_cond=False, learn_sigma=True, num_head_channels=64, resblock_updown=True,
        use_fp16=True, use_scale_shift_norm=True,
    ),
    "adm128-cond": dict(
        image_size=128, num_channels=256, num_res_blocks=2, attention_resolutions="32,16,8",
        class_cond=True, learn_sigma=True, num_heads=4, resblock_updown=True,
        use_fp16=True, use_scale_shift_norm=True,
    ),
    "adm64-cond": dict(
        image_size=64, num_channels=192, num_res_blocks=3, attention_resolutions="32,16,8",
        class_cond=True, learn_sigma=True, num_head_channels=64, resblock_updown=True,
        use_new_attention_order=True, use_fp16=True, use_scale_shift_norm=True, dropout=0.1,
    ),
}

# The diffusion each checkpoint was trained with (igds_fast.diffusion.ScheduleConfig fields).
ADM_DIFFUSION_FLAGS: dict[str, dict] = {
    "adm256-cond": dict(noise_schedule="linear", diffusion_steps=1000),
    "adm256-uncond": dict(noise_schedule="linear", diffusion_steps=1000),
    "adm128-cond": dict(noise_schedule="linear", diffusion_steps=1000),
    "adm64-cond": dict(noise_schedule="cosine", diffusion_steps=1000),
}

_DEFAULT_CHANNEL_MULT = {
    512: (0.5, 1, 1, 2, 2, 4, 4),
    256: (1, 1, 2, 2, 4, 4),
    128: (1, 1, 2, 3, 4),
    64: (1, 2, 3, 4),
}

# create_model's keyword flags and defaults, plus in_channels / num_classes (fixed to 3 / 1000 there).
_FLAG_DEFAULTS = dict(
    image_size=None,
    num_channels=None,
    num_res_blocks=None,
    channel_mult="",
    learn_sigma=False,
    class_cond=False,
    use_checkpoint=False,
    attention_resolutions="16",
    num_heads=1,
    num_head_channels=-1,
    num_heads_upsample=-1,
    use_scale_shift_norm=False,
    dropout=0.0,
    resblock_updown=False,
    use_fp16=False,
    use_new_attention_order=False,
    in_channels=3,
    num_classes=NUM_IMAGENET_CLASSES,
)


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [B, dim] of (possibly fractional) timesteps [B]: [cos(t f), sin(t f)]."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    )
    args = timesteps[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


class GroupNorm32(nn.GroupNorm):
    """GroupNorm(32) computed in float32 whatever the dtype of x and of its own weights.

    The original keeps these weights in float32 even in its fp16 mode; after `model.to(half)` they
    are half, so they are promoted here to keep the float32 statistics and affine of the original.
    """

    def forward(self, x):
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).type(x.dtype)


def normalization(channels: int) -> nn.Module:
    """The original's normalisation layer: 32 groups, float32 statistics."""
    return GroupNorm32(32, channels)


class TimestepBlock(nn.Module):
    """A module whose forward takes the timestep embedding as a second argument."""


class TimestepEmbedSequential(nn.Sequential, TimestepBlock):
    """nn.Sequential that hands the timestep embedding emb [B, 4C] to the TimestepBlocks in it."""

    def forward(self, x, emb):
        for layer in self:
            x = layer(x, emb) if isinstance(layer, TimestepBlock) else layer(x)
        return x


class Upsample(nn.Module):
    """[B, C, H, W] -> [B, C', 2H, 2W]: nearest-neighbour x2, then an optional 3x3 conv (key `conv`)."""

    def __init__(self, channels, use_conv, out_channels=None):
        super().__init__()
        self.channels, self.out_channels = channels, out_channels or channels
        self.use_conv = use_conv
        if use_conv:
            self.conv = nn.Conv2d(self.channels, self.out_channels, 3, padding=1)

    def forward(self, x):
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    """[B, C, H, W] -> [B, C', H/2, W/2]: a stride-2 3x3 conv (key `op`), or a 2x2 average pool."""

    def __init__(self, channels, use_conv, out_channels=None):
        super().__init__()
        self.channels, self.out_channels = channels, out_channels or channels
        if use_conv:
            self.op = nn.Conv2d(self.channels, self.out_channels, 3, stride=2, padding=1)
        else:
            if self.channels != self.out_channels:
                raise ValueError("average-pool downsampling cannot change the channel count")
            self.op = nn.AvgPool2d(kernel_size=2, stride=2)

    def forward(self, x):
        return self.op(x)


class ResBlock(TimestepBlock):
    """x [B, C, H, W], emb [B, E] -> [B, C', H', W'] (H' = 2H with up, H/2 with down, else H).

    GroupNorm-SiLU-conv, timestep modulation (h + emb, or with use_scale_shift_norm
    norm(h) * (1 + scale) + shift), SiLU-dropout-conv, plus the (1x1-conv when C' != C) skip.

    With up/down the resampling happens between the first norm-activation and the first conv, on
    both the residual branch and the skip path.
    """

    def __init__(self, channels, emb_channels, dropout, out_channels=None, use_scale_shift_norm=False,
                 up=False, down=False):
        super().__init__()
        self.out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(
            normalization(channels), nn.SiLU(), nn.Conv2d(channels, self.out_channels, 3, padding=1)
        )
        self.updown = up or down
        if up:
            self.h_upd, self.x_upd = Upsample(channels, False), Upsample(channels, False)
        elif down:
            self.h_upd, self.x_upd = Downsample(channels, False), Downsample(channels, False)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        self.emb_layers = nn.Sequential(
            nn.SiLU(),
            nn.Linear(emb_channels, 2 * self.out_channels if use_scale_shift_norm else self.out_channels),
        )
        self.out_layers = nn.Sequential(
            normalization(self.out_channels),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            nn.Conv2d(self.out_channels, self.out_channels, 3, padding=1),
        )
        if self.out_channels == channels:
            self.skip_connection = nn.Identity()
        else:
            self.skip_connection = nn.Conv2d(channels, self.out_channels, 1)

    def forward(self, x, emb):
        if self.updown:
            h = self.in_layers[:-1](x)
            h = self.in_layers[-1](self.h_upd(h))
            x = self.x_upd(x)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).type(h.dtype)[:, :, None, None]
        if self.use_scale_shift_norm:
            scale, shift = torch.chunk(emb_out, 2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """Self-attention over the spatial positions: GroupNorm, 1x1 conv to qkv, attention, 1x1 conv out.

    `legacy_order` selects how the qkv channels are split (QKVAttentionLegacy: per head [q, k, v];
    QKVAttention, the "new order": [all q, all k, all v], then heads).
    """

    def __init__(self, channels, num_heads=1, num_head_channels=-1, use_new_attention_order=False):
        super().__init__()
        if num_head_channels == -1:
            self.num_heads = num_heads
        else:
            if channels % num_head_channels:
                raise IGDSInputError(
                    f"attention channels {channels} not divisible by num_head_channels {num_head_channels}"
                )
            self.num_heads = channels // num_head_channels
        if channels % self.num_heads:
            raise IGDSInputError(f"attention channels {channels} not divisible by {self.num_heads} heads")
        self.legacy_order = not use_new_attention_order
        self.norm = normalization(channels)
        self.qkv = nn.Conv1d(channels, channels * 3, 1)
        self.proj_out = nn.Conv1d(channels, channels, 1)

    def forward(self, x):
        """x [B, C, H, W] -> x + attention(x), same shape."""
        batch, channels, *spatial = x.shape
        x = x.reshape(batch, channels, -1)
        qkv = self.qkv(self.norm(x))
        h = self.proj_out(self._attention(qkv))
        return (x + h).reshape(batch, channels, *spatial)

    def split_heads(self, qkv: torch.Tensor):
        """qkv [B, 3*H*c, T] -> contiguous q, k, v [B, H, T, c] (H heads of c channels).

        The block's channel order: legacy (QKVAttentionLegacy) has per head [q_h, k_h, v_h]; the new
        order (QKVAttention) has [q (all heads), k, v]. Contiguous 4-D [B, H, T, c] with a stride-1
        last dimension is what the fused SDPA kernels (flash / memory-efficient / cuDNN) take; 3-D
        strided views would send SDPA to its math path, which materialises the T x T scores
        (T = 1024 at ADM-256's 32x32 level).
        """
        batch, width, length = qkv.shape
        head_channels = width // (3 * self.num_heads)
        if self.legacy_order:
            q, k, v = qkv.reshape(batch, self.num_heads, 3 * head_channels, length).split(head_channels, dim=2)
        else:
            q, k, v = (t.reshape(batch, self.num_heads, head_channels, length) for t in qkv.chunk(3, dim=1))
        return tuple(t.transpose(-1, -2).contiguous() for t in (q, k, v))

    @staticmethod
    def merge_heads(out: torch.Tensor) -> torch.Tensor:
        """Attention output [B, H, T, c] -> [B, H*c, T]."""
        batch, heads, length, head_channels = out.shape
        return out.transpose(-1, -2).reshape(batch, heads * head_channels, length)

    def _attention(self, qkv: torch.Tensor) -> torch.Tensor:
        """qkv [B, 3*H*c, T] -> attention output [B, H*c, T].

        Scale: the original multiplies q and k each by s = 1/sqrt(sqrt(c)) = c^(-1/4), so its logits
        are (q s)^T (k s) = q^T k * s^2 = q^T k / sqrt(c) — exactly SDPA's default scale 1/sqrt(c).
        Splitting the scale over q and k only guards fp16 against overflow in q^T k; SDPA does the
        same (its math path scales q and k by sqrt(scale) each; the fused kernels accumulate in
        float32). So SDPA with its default scale is the same attention in both channel orders; only
        the split of qkv into heads differs (`split_heads`).
        """
        return self.merge_heads(F.scaled_dot_product_attention(*self.split_heads(qkv)))


class ADMUNet(nn.Module):
    """guided-diffusion's UNetModel (2-D), built from the same arguments."""

    def __init__(
        self,
        image_size: int,
        in_channels: int,
        model_channels: int,
        out_channels: int,
        num_res_blocks: int,
        attention_resolutions: Sequence[int],
        dropout: float = 0.0,
        channel_mult: Sequence[float] = (1, 2, 4, 8),
        conv_resample: bool = True,
        num_classes: int | None = None,
        use_fp16: bool = False,
        num_heads: int = 1,
        num_head_channels: int = -1,
        num_heads_upsample: int = -1,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        use_new_attention_order: bool = False,
        learn_sigma: bool | None = None,
    ):
        super().__init__()
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads
        self.image_size = int(image_size)
        self.in_channels = int(in_channels)
        self.model_channels = int(model_channels)
        self.out_channels = int(out_channels)
        self.learn_sigma = bool(out_channels == 2 * in_channels) if learn_sigma is None else bool(learn_sigma)
        self.num_classes = num_classes
        self.use_fp16 = bool(use_fp16)
        self.channel_mult = tuple(channel_mult)
        attention_resolutions = set(int(r) for r in attention_resolutions)
        time_embed_dim = model_channels * 4
        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, time_embed_dim), nn.SiLU(), nn.Linear(time_embed_dim, time_embed_dim)
        )
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, time_embed_dim)

        def res_block(channels, out, **kw):
            return ResBlock(channels, time_embed_dim, dropout, out, use_scale_shift_norm, **kw)

        def attention(channels, heads):
            return AttentionBlock(channels, heads, num_head_channels, use_new_attention_order)

        ch = input_ch = int(channel_mult[0] * model_channels)
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(in_channels, ch, 3, padding=1))])
        skip_channels, ds = [ch], 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [res_block(ch, int(mult * model_channels))]
                ch = int(mult * model_channels)
                if ds in attention_resolutions:
                    layers.append(attention(ch, num_heads))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(ch)
            if level != len(channel_mult) - 1:
                down = res_block(ch, ch, down=True) if resblock_updown else Downsample(ch, conv_resample, ch)
                self.input_blocks.append(TimestepEmbedSequential(down))
                skip_channels.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(res_block(ch, ch), attention(ch, num_heads), res_block(ch, ch))

        self.output_blocks = nn.ModuleList([])
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                layers = [res_block(ch + skip_channels.pop(), int(model_channels * mult))]
                ch = int(model_channels * mult)
                if ds in attention_resolutions:
                    layers.append(attention(ch, num_heads_upsample))
                if level and i == num_res_blocks:
                    layers.append(res_block(ch, ch, up=True) if resblock_updown else Upsample(ch, conv_resample, ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(normalization(ch), nn.SiLU(), nn.Conv2d(input_ch, out_channels, 3, padding=1))

    # ---- construction from guided-diffusion flags -----------------------------------------------
    @classmethod
    def from_flags(cls, **flags) -> "ADMUNet":
        """Build from guided-diffusion `create_model` keyword flags (same defaults and meaning).

        Two extra flags the original hard-codes: in_channels (3) and num_classes (1000, used when
        class_cond). `use_checkpoint` is accepted and ignored (no checkpointing is ever forced).
        """
        unknown = sorted(set(flags) - set(_FLAG_DEFAULTS))
        if unknown:
            raise IGDSInputError(f"unknown ADM flags {unknown}; known: {sorted(_FLAG_DEFAULTS)}")
        f = {**_FLAG_DEFAULTS, **flags}
        for required in ("image_size", "num_channels", "num_res_blocks"):
            if f[required] is None:
                raise IGDSInputError(f"ADM flag {required} is required")
        image_size = int(f["image_size"])
        channel_mult = f["channel_mult"]
        if channel_mult in ("", None):
            if image_size not in _DEFAULT_CHANNEL_MULT:
                raise IGDSInputError(
                    f"no default channel_mult for image_size {image_size}; pass channel_mult (e.g. '1,2,4')"
                )
            channel_mult = _DEFAULT_CHANNEL_MULT[image_size]
        elif isinstance(channel_mult, str):
            channel_mult = tuple(float(m) if "." in m else int(m) for m in channel_mult.split(","))
        attention = f["attention_resolutions"]
        resolutions = attention.split(",") if isinstance(attention, str) else list(attention)
        attention_ds = [image_size // int(r) for r in resolutions if str(r).strip()]
        in_channels = int(f["in_channels"])
        return cls(
            image_size=image_size,
            in_channels=in_channels,
            model_channels=int(f["num_channels"]),
            out_channels=2 * in_channels if f["learn_sigma"] else in_channels,
            num_res_blocks=int(f["num_res_blocks"]),
            attention_resolutions=attention_ds,
            dropout=float(f["dropout"]),
            channel_mult=channel_mult,
            num_classes=int(f["num_classes"]) if f["class_cond"] else None,
            use_fp16=bool(f["use_fp16"]),
            num_heads=int(f["num_heads"]),
            num_head_channels=int(f["num_head_channels"]),
            num_heads_upsample=int(f["num_heads_upsample"]),
            use_scale_shift_norm=bool(f["use_scale_shift_norm"]),
            resblock_updown=bool(f["resblock_updown"]),
            use_new_attention_order=bool(f["use_new_attention_order"]),
            learn_sigma=bool(f["learn_sigma"]),
        )

    # ---- forward --------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Predict the noise (and the variance interpolation v when learn_sigma) for a noisy batch.

        :param x: [B, in_channels, image_size, image_size] noisy images x_t.
        :param timesteps: [B] ORIGINAL training timesteps in [0, 1000) (long or float).
        :param y: [B] class labels (long), required iff the model is class-conditional.
        :return: [B, out_channels, image_size, image_size] in the dtype of x; computed in the dtype
            of the parameters (GroupNorm in float32).
        """
        self._check_inputs(x, timesteps, y)
        dtype = self.time_embed[0].weight.dtype
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).type(dtype))
        if self.num_classes is not None:
            emb = emb + self.label_emb(y)
        h = x.type(dtype)
        skips = []
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h).type(x.dtype)

    def _check_inputs(self, x, timesteps, y) -> None:
        """Shape checks only: nothing here reads tensor values (no host-device synchronisation)."""
        expected = (self.in_channels, self.image_size, self.image_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise IGDSInputError(
                f"ADM UNet expects [B, {self.in_channels}, {self.image_size}, {self.image_size}] images, "
                f"got {tuple(x.shape)}"
            )
        batch = x.shape[0]
        if tuple(timesteps.shape) != (batch,):
            raise IGDSInputError(f"ADM UNet expects timesteps of shape ({batch},), got {tuple(timesteps.shape)}")
        if (y is None) != (self.num_classes is None):
            raise IGDSInputError(
                "class labels y are required by a class-conditional UNet"
                if y is None
                else "labels y given to an unconditional UNet"
            )
        if y is not None and tuple(y.shape) != (batch,):
            raise IGDSInputError(f"ADM UNet expects labels y of shape ({batch},), got {tuple(y.shape)}")


# ---- loading ------------------------------------------------------------------------------------
def preset_flags(preset: str, **overrides) -> dict:
    """The `create_model` flags of a preset with overrides applied (unknown preset: input error)."""
    if preset not in ADM_PRESETS:
        raise IGDSInputError(f"unknown ADM preset {preset!r}; available: {sorted(ADM_PRESETS)}")
    return {**ADM_PRESETS[preset], **overrides}


def build_adm(preset: str, **overrides) -> ADMUNet:
    """An ADMUNet with a preset's flags (randomly initialised), any flag overridable."""
    return ADMUNet.from_flags(**preset_flags(preset, **overrides))


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors from a guided-diffusion .pt (weights_only: no code runs) or a .safetensors file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise IGDSInputError(f"checkpoint not found: {path}")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            check_torch_archive(path)
            state = torch.load(path, map_location="cpu", weights_only=True)
    except IGDSInputError:
        raise
    except Exception as error:  # noqa: BLE001 — any unreadable file is one input error
        raise IGDSInputError(f"cannot read checkpoint {path}: {type(error).__name__}: {error}") from None
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise IGDSInputError(f"{path} does not hold a state dict of tensors")
    return dict(state)


def check_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """One-line error naming missing / unexpected keys (first 3 + counts) or shape mismatches."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3])})")
        raise IGDSInputError(f"{source} does not fit the model: {'; '.join(parts)}")
    mismatched = [k for k in expected if tuple(state[k].shape) != tuple(expected[k].shape)]
    if mismatched:
        shown = ", ".join(
            f"{k} expected {tuple(expected[k].shape)} got {tuple(state[k].shape)}" for k in mismatched[:3]
        )
        raise IGDSInputError(f"{source} does not fit the model: {len(mismatched)} shape mismatches ({shown})")


def adm_from_state_dict(
    state: Mapping[str, torch.Tensor], device="cpu", source: str = "state dict", **flags
) -> ADMUNet:
    """An ADMUNet built from `create_model` flags holding `state` (copied, as float32), in eval mode.

    The module is built on the meta device and given uninitialised storage, so no time goes into a
    random initialisation that the checkpoint overwrites (seconds for the 554M-parameter model).
    """
    with torch.device("meta"):
        model = ADMUNet.from_flags(**flags)
    check_state_dict(model, state, source)
    check_finite_weights(state, source)
    model = model.to_empty(device=device)
    model.load_state_dict(state, strict=True)  # copy_ converts any stored dtype to float32
    return model.eval()


def load_adm(path: str | os.PathLike, preset: str, device="cpu", **flag_overrides) -> ADMUNet:
    """Build the preset's ADMUNet and load a checkpoint into it (float32, eval mode) in one call.

    :param path: a guided-diffusion checkpoint (.pt, read with weights_only) or a .safetensors file.
    :param preset: a key of ADM_PRESETS; `flag_overrides` change any of its `create_model` flags.
    :raises IGDSInputError: (one line) unknown preset or flag, unreadable file, or a file that does
        not fit the preset (missing / unexpected keys, shape mismatches, named).
    """
    flags = preset_flags(preset, **flag_overrides)
    with torch.device("meta"):
        ADMUNet.from_flags(**flags)  # bad flags fail before the (large) file is read
    state = read_state_dict(path)
    return adm_from_state_dict(state, device, f"checkpoint {os.fspath(path)} (preset {preset})", **flags)
