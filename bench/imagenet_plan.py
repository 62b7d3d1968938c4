"""Estimated GPU-hours and disk per stage of the README's ImageNet-1K recipe, IPC 1 / 10 / 50, on 8 H100s.

An estimate, not a measurement (no GPU has been lent to this project): the FLOPs are counted on the meta
device by the package's own counting (igds_fast/models/flops.py, what `igds-fast distill --plan` and
bench/model_stats.py use: matmuls and convolutions, multiply-add = 2), the time is those FLOPs at
igds_fast.throughput.EFFICIENCY (50%) of the H100 SXM's dense datasheet peak in the stage's compute
dtype. The assumptions, each printed with the table:

  distill     the README's command: ADM-256 (adm256-cond) x 250 steps, every step guided by the VE's
              ResNet-50 at 224 px (forward + input-gradient backward + head), 2x2 composites (4 samples
              per image); bf16 (--backend compiled); torchrun over 8 GPUs (1/8 of the work each).
              The --plan line of the same command prints the same FLOPs (tests/test_plan.py).
  distill S3  the same for G = 5 candidates per class, plus one ResNet-50 forward per candidate and
              per real training image (the centroids).
  train-ve    ResNet-50 at 224 on ImageNet-1K's 1,281,167 training images: 20 contrastive epochs of a
              query forward + backward (3 forwards) and a key forward each, then one feature pass;
              one GPU (train-ve does not run under torchrun), float32.
  calibrate   --ipc 1,10,50 --betas 0,0.01,0.1,1, 1 seed: 4 ConvNet-3 (width 128) per IPC, trained for
              the IGDS protocol's epochs on IPC x 1000 images of 224 px, plus the VE's scoring pass over
              the training set; one GPU, float32.
  eval        --network resnet_ap10 --seeds 3 on the distilled IPC x 1000 images at 256 px, the IGDS
              protocol's epochs, tested on the 50,000 validation images each; one GPU, float32.

A training image-pass costs TRAIN_FACTOR = 3 forwards (igds_fast/training_cost.py). Small networks and
float32 reach far less than 50% of a GPU's peak (the eval and calibrate rows are lower bounds);
cuDNN's TF32 convolutions reach more than the float32 peak (the train-ve row is an upper bound).

    python bench/imagenet_plan.py [--append-results]
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import torch  # noqa: E402

from igds_fast.distill.cost import PNG_OVERHEAD  # noqa: E402
from igds_fast.evaluate.protocol import igds_epochs  # noqa: E402
from igds_fast.models.adm import ADM_PRESETS, ADMUNet  # noqa: E402
from igds_fast.models.flops import forward_flops, input_backward_flops, resnet_forward_flops  # noqa: E402
from igds_fast.throughput import DEVICE_PEAKS, EFFICIENCY  # noqa: E402
from igds_fast.training_cost import TRAIN_FACTOR, network_forward_flops  # noqa: E402

CLASSES = 1000
TRAIN_IMAGES = 1_281_167
VAL_IMAGES = 50_000
IPCS = (1, 10, 50)
GPUS = 8
STEPS = 250
COMPOSITE = 4
GROUPS = 5
VE_EPOCHS = 20
BETAS = 4
EVAL_SEEDS = 3
FEATURE_DIM = 2048
H100 = dict(DEVICE_PEAKS)[("H100",)]


def counts() -> dict[str, int]:
    """FLOPs per image of each model the stages run (meta device)."""
    with torch.device("meta"):
        unet = ADMUNet.from_flags(**{**ADM_PRESETS["adm256-cond"], "dropout": 0.0}).eval().requires_grad_(False)
        x = torch.randn(1, 3, 256, 256)
        t, y = torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long)
    encoder_forward = resnet_forward_flops("resnet50", 3, 224, (3, 256, 256))

    from igds_fast.models.resnet import build_resnet
    from igds_fast.preprocess import EncoderPreprocess

    with torch.device("meta"):
        encoder = build_resnet("resnet50", num_classes=None).eval().requires_grad_(False)
        preprocess = EncoderPreprocess(224, (0.5,) * 3, (0.5,) * 3)
        image = torch.randn(1, 3, 256, 256)
    encoder_backward = input_backward_flops(lambda v: encoder.forward_features(preprocess(v)), image)[0]
    return {
        "unet": forward_flops(unet, x, t, y),
        "guidance": encoder_forward + encoder_backward + 4 * FEATURE_DIM * CLASSES,
        "resnet50_224": resnet_forward_flops("resnet50", 3, 224, (3, 224, 224)),
        "convnet3_224": network_forward_flops("convnet3", 3, CLASSES, 224, 128),
        "resnet_ap10_256": network_forward_flops("resnet_ap10", 3, CLASSES, 256, 128),
    }


def png_bound(side: int) -> int:
    return 3 * side * side + side + PNG_OVERHEAD


def stages(c: dict[str, int]) -> list[dict]:
    """One row per stage and IPC: FLOPs, GPUs used, peak assumed, disk."""
    per_sample = STEPS * (c["unet"] + c["guidance"])
    bf16, fp32 = H100["bf16"], H100["fp32"]
    rows = [{"stage": "train-ve", "ipc": "-", "gpus": 1, "peak": fp32,
             "flops": (VE_EPOCHS * (TRAIN_FACTOR + 1) + 1) * TRAIN_IMAGES * c["resnet50_224"],
             "disk": TRAIN_IMAGES * FEATURE_DIM * 4, "disk_note": "features file during the probe (removed after)"}]
    calibrate = c["convnet3_224"] * sum(BETAS * (igds_epochs(ipc) * TRAIN_FACTOR * ipc * CLASSES + VAL_IMAGES)
                                        for ipc in IPCS) + TRAIN_IMAGES * c["resnet50_224"]
    rows.append({"stage": "calibrate-beta", "ipc": "1,10,50", "gpus": 1, "peak": fp32, "flops": calibrate,
                 "disk": 0, "disk_note": "a JSON table"})
    for ipc in IPCS:
        samples = CLASSES * ipc * COMPOSITE
        rows.append({"stage": "distill", "ipc": ipc, "gpus": GPUS, "peak": bf16, "flops": samples * per_sample,
                     "disk": CLASSES * ipc * png_bound(256), "disk_note": f"{CLASSES * ipc:,} PNGs (bound)"})
        candidates = GROUPS * samples
        rows.append({"stage": "distill --select s3", "ipc": ipc, "gpus": GPUS, "peak": bf16,
                     "flops": candidates * per_sample + (GROUPS * CLASSES * ipc + TRAIN_IMAGES) * c["resnet50_224"],
                     "disk": (GROUPS + 1) * CLASSES * ipc * png_bound(256) + GROUPS * CLASSES * ipc * FEATURE_DIM * 4,
                     "disk_note": "candidates + their features + the output"})
        epochs = igds_epochs(ipc)
        rows.append({"stage": "eval (resnet_ap10, 3 seeds)", "ipc": ipc, "gpus": 1, "peak": fp32,
                     "flops": EVAL_SEEDS * (epochs * TRAIN_FACTOR * CLASSES * ipc + VAL_IMAGES) * c["resnet_ap10_256"],
                     "disk": 0, "disk_note": "a JSON file"})
    for row in rows:
        row["gpu_hours"] = row["flops"] / (row["peak"] * EFFICIENCY) / 3600
        row["wall_hours"] = row["gpu_hours"] / row["gpus"]
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| stage | IPC | FLOP | GPUs | assumed rate (per GPU) | GPU-hours | wall hours | disk |",
             "|---|---|---:|---:|---|---:|---:|---|"]
    for r in rows:
        dtype = "bf16" if r["peak"] == H100["bf16"] else "fp32"
        disk = f"{r['disk'] / 2**30:.2f} GiB ({r['disk_note']})" if r["disk"] else r["disk_note"]
        lines.append(f"| {r['stage']} | {r['ipc']} | {r['flops']:.3g} | {r['gpus']} | {EFFICIENCY:.0%} of "
                     f"{r['peak'] / 1e12:.1f} TFLOP/s ({dtype}) | {r['gpu_hours']:.3g} | {r['wall_hours']:.3g} | {disk} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--append-results", action="store_true")
    args = parser.parse_args(argv)
    c = counts()
    text = table(stages(c))
    text += ("\n\nPer image (meta-device counts, multiply-add = 2): ADM-256 forward "
             f"{c['unet'] / 1e12:.3f} TFLOP; guidance (ResNet-50 at 224 forward + input gradient + head) "
             f"{c['guidance'] / 1e9:.2f} GFLOP; ResNet-50 at 224 forward {c['resnet50_224'] / 1e9:.2f} GFLOP; "
             f"ConvNet-3 (width 128) at 224 {c['convnet3_224'] / 1e9:.2f} GFLOP; ResNet-AP10 at 256 "
             f"{c['resnet_ap10_256'] / 1e9:.2f} GFLOP.")
    print(text)
    if args.append_results:
        header = (f"\n## bench/imagenet_plan.py — ImageNet-1K per stage on 8 H100s: an ESTIMATE\n\n"
                  f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; torch {torch.__version__}; "
                  "counted on the meta device (no GPU here)\n- command: `python bench/imagenet_plan.py --append-results`\n"
                  "- assumptions: the script's docstring (H100 SXM dense peaks, 50% of them; distill bf16 over 8 "
                  "GPUs; train-ve, calibrate-beta and eval single-GPU float32)\n\n")
        with open(os.path.join(REPO, "bench", "RESULTS.md"), "a", encoding="utf-8") as handle:
            handle.write(header + text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
