"""`igds-fast train-prior`: train a small ADM DDPM prior on an image folder (or the digits); save it."""
from __future__ import annotations

import os
import sys
from dataclasses import asdict

import torch

from igds_fast.data import load_digits_split, load_image_folder
from igds_fast.errors import IGDSInputError
from igds_fast.models.priors import save_prior
from igds_fast.train_prior import PriorTrainConfig, train_prior


def add_parser(subparsers) -> None:
    """Declare `igds-fast train-prior` (sets handler=run)."""
    defaults = PriorTrainConfig()
    parser = subparsers.add_parser(
        "train-prior",
        help="train a small ADM DDPM prior on an image folder (or the built-in digits)",
        description=(
            "Train an ADM-architecture DDPM (eps-prediction MSE + the hybrid VB term for the learned "
            "variance, AdamW, EMA) and save it as one safetensors file usable as `distill --prior FILE`."
        ),
    )
    data = parser.add_mutually_exclusive_group(required=True)
    data.add_argument("--data", metavar="DIR", help="ImageFolder: DIR/<class>/<image>")
    data.add_argument("--digits", action="store_true", help="scikit-learn's digits (fixed 70/30 split, train part)")
    parser.add_argument("--out", required=True, help="output .safetensors file")
    parser.add_argument("--image-size", type=int, default=16, help="side the images are resized/cropped to (default: 16)")
    parser.add_argument("--channels", type=int, choices=(1, 3), default=3, help="1 = grayscale, 3 = RGB (default: 3; digits: 1)")
    for name, kind in (("num_channels", int), ("channel_mult", str), ("num_res_blocks", int),
                       ("attention_resolutions", str), ("num_head_channels", int), ("dropout", float),
                       ("noise_schedule", str), ("steps", int), ("batch_size", int), ("lr", float),
                       ("warmup_steps", int), ("weight_decay", float), ("grad_clip", float), ("ema_decay", float),
                       ("seed", int)):
        parser.add_argument("--" + name.replace("_", "-"), type=kind, default=getattr(defaults, name),
                            help=f"(default: {getattr(defaults, name)!r})")
    parser.add_argument("--fixed-sigma", action="store_true", help="no learned variance (MSE only; sample with beta~)")
    parser.add_argument("--unconditional", action="store_true", help="no class conditioning")
    parser.add_argument("--horizontal-flip", action="store_true", help="random horizontal flips while training")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.set_defaults(handler=run)


def run(args) -> int:
    """The `train-prior` subcommand: load data, train, save atomically; returns the exit code."""
    out_folder = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_folder):
        raise IGDSInputError(f"output folder {out_folder!r} does not exist")
    config = PriorTrainConfig(
        num_channels=args.num_channels, channel_mult=args.channel_mult, num_res_blocks=args.num_res_blocks,
        attention_resolutions=args.attention_resolutions, num_head_channels=args.num_head_channels,
        dropout=args.dropout, class_cond=not args.unconditional, learn_sigma=not args.fixed_sigma,
        noise_schedule=args.noise_schedule, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
        warmup_steps=args.warmup_steps, weight_decay=args.weight_decay, grad_clip=args.grad_clip,
        ema_decay=args.ema_decay, horizontal_flip=args.horizontal_flip, seed=args.seed,
    )
    if args.digits:
        images, labels, _, _ = load_digits_split(image_size=args.image_size)
        class_names = [str(digit) for digit in range(10)]
    else:
        images, labels, class_names, _ = load_image_folder(args.data, args.image_size, channels=args.channels)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")

    def progress(step, steps, loss):
        print(f"train-prior: step {step}/{steps} loss {loss:.4f}", file=sys.stderr, flush=True)

    unet, schedule_config, report = train_prior(images, labels, class_names, config, device=device, progress=progress)
    flags = config.unet_flags(images.shape[-1], images.shape[1], len(class_names))
    save_prior(args.out, unet, flags, schedule_config, class_names,
               {"config": asdict(config), "report": report.to_dict()})
    print(f"train-prior: {report.steps} steps in {report.wall_time_s:.1f}s (final loss {report.final_loss:.4f}); "
          f"wrote {args.out}")
    return 0
