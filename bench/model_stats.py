"""Parameter counts and forward FLOPs of the ADM and DiT presets (meta device: no memory, no weights).

The counting itself is the package's (igds_fast/models/flops.py, which `igds-fast distill --plan` uses).
FLOPs per image (batch 1, one UNet forward) are measured with torch.utils.flop_counter.FlopCounterMode,
which counts matrix products and convolutions only (a multiply-add counts 2; norms, activations and
softmax are not counted). FlopCounterMode has formulas for the fused CUDA SDPA kernels; on the meta
device SDPA runs its math decomposition, whose two batched matmuls (Q K^T and A V) it counts as
aten.bmm. Every category is checked against a count by formula from forward hooks:

    convolution  2 * out_elements * in_channels/groups * kernel_area   (incl. the 1x1 qkv/proj_out)
    linear       2 * in_features * out_features                         (time/label embedding MLPs)
    attention    2 * T^2 * C  for Q K^T  +  2 * T^2 * C  for A V         (T = H*W tokens, C channels)

The latent prior (DiT presets, section 2 of the report): the DiT forward counted the same way (its
patch embedding is the one convolution; qkv, proj, fc1, fc2, adaLN and the embedding MLPs are
linears; attention per block is the formula above with T = (S/p)^2 tokens and C = hidden size), the
classifier-free-guidance forward ([x; x] with [y; null]: twice the DiT's), and the other parts of one
guided latent step per image: SD's VAE decoder forward (stabilityai/sd-vae-ft-mse's AutoencoderKL
config, built on meta: no download), the VE encoder (ResNet-50 at 224 after EncoderPreprocess, as
bench/sampler.py counts it for ADM) forward, and the input-gradient backward of encoder and decoder,
each counted with FlopCounterMode over torch.autograd.grad w.r.t. the input (frozen weights: no
weight gradients). The backward's formula: every convolution's and linear's input gradient is one
product of the forward's size, attention's is two per forward product (dA = dO V^T, dV = A^T dO,
dQ = dS K, dK = dS^T Q): conv + linear + 2 * attention. Parameters of a DiT: the trainable ones; the
fixed sin-cos pos_embed (a frozen parameter in its state dict) is listed apart.
DiT's paper reports "Gflops" that are multiply-adds (GMAC): 118.6 for XL/2 at 256 px, 524.6 at 512;
the report prints GMAC and GFLOP (= 2 GMAC) and checks the counted GMAC against the paper (1%).

    python bench/model_stats.py [--append-results]
"""
from __future__ import annotations

import argparse
import datetime
import sys

import torch
import torch.nn as nn

from igds_fast.models.adm import ADM_PRESETS, build_adm
from igds_fast.models.cfg import ClassifierFreeGuidance
from igds_fast.models.dit import DIT_PRESETS, DiT
from igds_fast.models.flops import backward_formula, counted_flops, formula_flops, input_backward_flops
from igds_fast.models.resnet import build_resnet
from igds_fast.models.vae import SD_VAE_SCALING_FACTOR, LatentDecoder
from igds_fast.preprocess import IMAGENET_MEAN, IMAGENET_STD, EncoderPreprocess

COMMAND = "python bench/model_stats.py"
# DiT's paper (Peebles & Xie 2023, Table 4): "Gflops" per forward, which are multiply-adds.
DIT_PAPER_GMAC = {"dit-xl2-256": 118.6, "dit-xl2-512": 524.6}
DIT_PAPER_TOLERANCE = 0.01
CFG_SCALE = 4.0  # DiT's sample.py default; any scale != 1 runs [x; x] (scale 1 is one forward)
VE_ARCH = "resnet50"
VE_RESOLUTION = 224  # bench/models.py's ve_resolution(image side) = min(224, side)


def sd_vae_config(sample_size: int = 256) -> dict:
    """stabilityai/sd-vae-ft-mse's AutoencoderKL config (the VAE DiT and MinimaxDiffusion decode with)."""
    return dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                layers_per_block=2, norm_num_groups=32, sample_size=sample_size, scaling_factor=SD_VAE_SCALING_FACTOR)


def preset_stats(name: str) -> dict:
    """Parameters and forward FLOPs per image of one preset, counted and by formula."""
    with torch.device("meta"):
        model = build_adm(name).eval()
        size = model.image_size
        x = torch.randn(1, model.in_channels, size, size)
        t = torch.zeros(1, dtype=torch.long)
        y = torch.zeros(1, dtype=torch.long) if model.num_classes else None

    def run():
        with torch.no_grad():
            model(x, t, y)

    flops, by_op = counted_flops(run)
    return {
        "preset": name,
        "params": sum(p.numel() for p in model.parameters()),
        "flops": flops,
        "by_op": by_op,
        "formula": formula_flops(model, run),
    }


def table(rows) -> str:
    lines = [
        "| preset | parameters | forward TFLOP / image (counted) | by formula | conv | attention: counted bmm"
        " / formula | linear | 250 steps TFLOP / image |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        op, formula = r["by_op"], r["formula"]
        attention = sum(n for key, n in op.items() if "bmm" in key or "attention" in key)
        lines.append(
            f"| {r['preset']} | {r['params'] / 1e6:.1f}M | {r['flops'] / 1e12:.3f} | "
            f"{sum(formula.values()) / 1e12:.3f} | {op.get('convolution', 0) / 1e12:.3f} | "
            f"{attention / 1e9:.2f} / {formula['attention'] / 1e9:.2f} G | {op.get('addmm', 0) / 1e6:.1f} M | "
            f"{250 * r['flops'] / 1e12:.0f} |"
        )
    return "\n".join(lines)


NOTE = (
    "FLOPs: torch.utils.flop_counter.FlopCounterMode on meta tensors, batch 1, one forward, multiply-add = 2 "
    "FLOPs; only matmuls and convolutions are counted. SDPA is counted: on the meta device it runs its math "
    "decomposition, whose Q K^T and A V batched matmuls appear as aten.bmm and equal the formula 4 T^2 C per "
    "attention block. 'by formula' = forward-hook count (conv + linear + attention); it must equal the counted total."
)


# ---- the latent prior: DiT, classifier-free guidance, VAE decoder, VE encoder ------------------------
def _counted(run) -> tuple[int, dict[str, int]]:
    return counted_flops(run)


def build_meta_dit(flags: dict) -> DiT:
    with torch.device("meta"):
        model = DiT(**flags).eval().requires_grad_(False)
    # Every tensor on meta, pos_embed included (it is computed in numpy: a DiT that wraps it with
    # torch.from_numpy leaves it on the CPU whatever the default device).
    return model.to("meta")


def build_meta_decoder(vae_config: dict) -> LatentDecoder:
    from diffusers import AutoencoderKL  # the DiT rows need diffusers (the ADM rows do not)

    with torch.device("meta"):
        return LatentDecoder(AutoencoderKL(**vae_config))


def module_stats(model: nn.Module, run) -> dict:
    """One forward's FLOPs, counted and by formula (batch as `run` gives it)."""
    flops, by_op = _counted(run)
    return {"flops": flops, "by_op": by_op, "formula": formula_flops(model, run)}


def input_backward_stats(model: nn.Module, forward, example: torch.Tensor) -> dict:
    """FLOPs of d(output)/d(input) . v (frozen weights), counted (igds_fast.models.flops.input_backward_flops)
    and by formula."""
    flops, by_op = input_backward_flops(forward, example)

    def run():
        with torch.no_grad():
            forward(example)

    return {"flops": flops, "by_op": by_op, "formula": backward_formula(formula_flops(model, run))}


def latent_step_stats(dit_flags: dict, vae_config: dict, ve_arch: str = VE_ARCH, cfg_scale: float = CFG_SCALE,
                      ve_resolution: int | None = None) -> dict:
    """FLOPs per image of every part of one guided latent reverse step (x0 mode), batch 1, meta device.

    parts: dit (one forward), cfg_dit (the classifier-free-guidance forward: [x; x] when scale != 1),
    decoder_forward, encoder_forward, encoder_backward, decoder_backward (input gradients only), each
    {"flops", "by_op", "formula"}; guided / unguided: the step totals (unguided = the CFG forward only);
    decoder_share: (decoder forward + backward) / guided; params / frozen_params: the DiT's trainable
    parameters and its fixed pos_embed; image_size: the decoded side; ve_resolution: the encoder's input.
    """
    dit = build_meta_dit(dit_flags)
    decoder = build_meta_decoder(vae_config)
    size = dit.image_size
    image_size = size * decoder.scale_factor
    ve_resolution = min(VE_RESOLUTION, image_size) if ve_resolution is None else ve_resolution
    with torch.device("meta"):
        z = torch.randn(1, dit.in_channels, size, size)
        t = torch.zeros(1, dtype=torch.long)
        y = torch.zeros(1, dtype=torch.long)
        image = torch.randn(1, decoder.out_channels, image_size, image_size)
        encoder = build_resnet(ve_arch, num_classes=None).eval().requires_grad_(False)
        preprocess = EncoderPreprocess(ve_resolution, IMAGENET_MEAN, IMAGENET_STD)
    cfg = ClassifierFreeGuidance(dit, cfg_scale)

    def forward_of(model, *args):
        def run():
            with torch.no_grad():
                model(*args)
        return run

    def features(pixels):
        return encoder.forward_features(preprocess(pixels))

    parts = {
        "dit": module_stats(dit, forward_of(dit, z, t, y)),
        "cfg_dit": module_stats(cfg, forward_of(cfg, z, t, y)),
        "decoder_forward": module_stats(decoder, forward_of(decoder, z)),
        "encoder_forward": module_stats(encoder, forward_of(features, image)),
        "encoder_backward": input_backward_stats(encoder, features, image),
        "decoder_backward": input_backward_stats(decoder, decoder, z),
    }
    guided = sum(parts[k]["flops"] for k in ("cfg_dit", "decoder_forward", "encoder_forward", "encoder_backward",
                                             "decoder_backward"))
    decoder_flops = parts["decoder_forward"]["flops"] + parts["decoder_backward"]["flops"]
    return {
        "parts": parts, "guided": guided, "unguided": parts["cfg_dit"]["flops"], "decoder_share": decoder_flops / guided,
        "params": sum(p.numel() for name, p in dit.named_parameters() if name != "pos_embed"),
        "frozen_params": dit.pos_embed.numel(),
        "decoder_params": sum(p.numel() for p in decoder.vae.decoder.parameters())
        + sum(p.numel() for p in decoder.vae.post_quant_conv.parameters()),
        "image_size": image_size, "ve_resolution": ve_resolution, "cfg_scale": cfg_scale,
    }


def dit_preset_stats(name: str) -> dict:
    flags = DIT_PRESETS[name]
    side = flags["input_size"] * 8
    return {"preset": name, **latent_step_stats(flags, sd_vae_config(side))}


def _mismatch(part: dict) -> bool:
    return part["flops"] != sum(part["formula"].values())


DIT_STEPS = 50


def dit_tables(rows) -> str:
    def gmac(flops):
        return flops / 2e9

    lines = [
        "| preset | parameters (trainable; + frozen pos_embed) | forward GMAC / image (counted) | GFLOP | by formula "
        "GFLOP | conv GFLOP | attention: counted bmm / formula | linear GFLOP | DiT paper GMAC | counted / paper "
        "| CFG forward GFLOP |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        dit = r["parts"]["dit"]
        op, formula = dit["by_op"], dit["formula"]
        attention = sum(n for key, n in op.items() if "bmm" in key or "attention" in key)
        paper = DIT_PAPER_GMAC.get(r["preset"])
        ratio = "-" if paper is None else f"{gmac(dit['flops']) / paper:.4f}"
        lines.append(
            f"| {r['preset']} | {r['params'] / 1e6:.1f}M (+ {r['frozen_params'] / 1e6:.3f}M) | {gmac(dit['flops']):.2f} | "
            f"{dit['flops'] / 1e9:.1f} | {sum(formula.values()) / 1e9:.1f} | {op.get('convolution', 0) / 1e9:.3f} | "
            f"{attention / 1e9:.2f} / {formula['attention'] / 1e9:.2f} G | {op.get('addmm', 0) / 1e9:.1f} | "
            f"{'-' if paper is None else paper} | {ratio} | "
            f"{r['parts']['cfg_dit']['flops'] / 1e9:.1f} |"
        )
    names = (("cfg_dit", "DiT forward with CFG ([x; x], scale {cfg})"), ("decoder_forward", "VAE decoder forward"),
             ("encoder_forward", "VE encoder forward ({arch} at {res} px)"),
             ("encoder_backward", "VE encoder input-gradient backward"),
             ("decoder_backward", "VAE decoder input-gradient backward"))
    for r in rows:
        guided = r["guided"]
        lines += ["", f"One guided latent step, {r['preset']} (latent {r['image_size'] // 8}^2 -> image "
                  f"{r['image_size']}^2), per image:", "",
                  "| part | GMAC (counted) | GFLOP | by formula GFLOP | share of the guided step |",
                  "|---|---:|---:|---:|---:|"]
        for key, label in names:
            part = r["parts"][key]
            label = label.format(cfg=r["cfg_scale"], arch=VE_ARCH, res=r["ve_resolution"])
            lines.append(f"| {label} | {gmac(part['flops']):.2f} | {part['flops'] / 1e9:.1f} | "
                         f"{sum(part['formula'].values()) / 1e9:.1f} | {100 * part['flops'] / guided:.1f}% |")
        decoder = r["parts"]["decoder_forward"]["flops"] + r["parts"]["decoder_backward"]["flops"]
        lines += [
            f"| **guided step** | {gmac(guided):.2f} | {guided / 1e9:.1f} | | 100% |",
            f"| decoder forward + backward | {gmac(decoder):.2f} | {decoder / 1e9:.1f} | | "
            f"{100 * r['decoder_share']:.1f}% |",
            f"| unguided step (CFG forward only) | {gmac(r['unguided']):.2f} | {r['unguided'] / 1e9:.1f} | | "
            f"{100 * r['unguided'] / guided:.1f}% |",
            "",
            f"- {DIT_STEPS} steps per image: {DIT_STEPS * guided / 1e12:.1f} TFLOP guided, "
            f"{DIT_STEPS * r['unguided'] / 1e12:.1f} TFLOP unguided (+ one final decode, "
            f"{r['parts']['decoder_forward']['flops'] / 1e12:.2f} TFLOP); VAE decoder "
            f"{r['decoder_params'] / 1e6:.1f}M parameters (post_quant_conv + decoder)",
        ]
    return "\n".join(lines)


DIT_NOTE = (
    "DiT: parameters exclude the fixed sin-cos pos_embed (a frozen parameter, listed in brackets). GMAC = "
    "multiply-adds (what DiT's paper calls Gflops), GFLOP = 2 x GMAC (FlopCounterMode's unit). The DiT's "
    "linears (qkv, proj, fc1, fc2, adaLN, embedding MLPs, final layer) are aten.addmm; its patch embedding is "
    "the one convolution; attention's Q K^T and A V are aten.bmm (SDPA's math decomposition on meta). Backward "
    "rows: torch.autograd.grad w.r.t. the input with frozen weights (input gradients only, no weight "
    "gradients), counted by FlopCounterMode; 'by formula' = conv + linear + 2 x attention of the forward hooks. "
    "The VE encoder's resize/normalise (EncoderPreprocess) and every norm/activation are not counted."
)


def dit_checks(rows) -> list[str]:
    """Disagreements: counted vs formula for every part, counted DiT GMAC vs the paper (1%), CFG = 2 DiT."""
    problems = []
    for r in rows:
        for key, part in r["parts"].items():
            if _mismatch(part):
                problems.append(f"{r['preset']} {key}: counted {part['flops']} != formula {sum(part['formula'].values())}")
        paper = DIT_PAPER_GMAC.get(r["preset"])
        measured = r["parts"]["dit"]["flops"] / 2e9
        if paper is not None and abs(measured / paper - 1) > DIT_PAPER_TOLERANCE:
            problems.append(f"{r['preset']}: {measured:.2f} GMAC counted, DiT's paper {paper} (> 1% apart)")
        if r["cfg_scale"] != 1.0 and r["parts"]["cfg_dit"]["flops"] != 2 * r["parts"]["dit"]["flops"]:
            problems.append(f"{r['preset']}: the CFG forward is not twice the DiT forward")
    return problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--append-results", action="store_true", help="append the table to bench/RESULTS.md")
    args = parser.parse_args(argv)
    rows = [preset_stats(name) for name in ADM_PRESETS]
    mismatched = [r["preset"] for r in rows if r["flops"] != sum(r["formula"].values())]
    text = table(rows) + "\n\n" + NOTE + "\n"
    if mismatched:
        text += f"\nWARNING: counted FLOPs differ from the formula for {mismatched}\n"
    dit_rows = [dit_preset_stats(name) for name in DIT_PRESETS]
    problems = dit_checks(dit_rows)
    text += "\n" + dit_tables(dit_rows) + "\n\n" + DIT_NOTE + "\n"
    for r in dit_rows:
        paper = DIT_PAPER_GMAC.get(r["preset"])
        if paper is not None:
            text += (f"\n- {r['preset']}: {r['parts']['dit']['flops'] / 2e9:.2f} GMAC counted vs {paper} in DiT's paper "
                     f"({100 * (r['parts']['dit']['flops'] / 2e9 / paper - 1):+.2f}%, tolerance "
                     f"{100 * DIT_PAPER_TOLERANCE:.0f}%)")
    text += "\n"
    for problem in problems:
        text += f"\nWARNING: {problem}"
    if problems:
        text += "\n"
    print(text)
    if args.append_results:
        header = (
            f"\n## bench/model_stats.py — ADM and DiT preset parameters and forward FLOPs\n\n"
            f"- device: CPU, meta device (counting only, no weights allocated)\n"
            f"- torch {torch.__version__}, python {sys.version.split()[0]}\n"
            f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC\n"
            f"- command: `{COMMAND} --append-results`\n\n"
        )
        with open("bench/RESULTS.md", "a") as f:
            f.write(header + text)
    return 1 if mismatched or problems else 0


if __name__ == "__main__":
    sys.exit(main())
