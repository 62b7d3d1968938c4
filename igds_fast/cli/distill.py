"""`igds-fast distill`: one distillation run; its flags are generated from `DistillConfig`.

Every flag is declared once, next to its setting (igds_fast/distill/config.py and the dataclasses it
nests: GuidanceConfig, CompileConfig, S3Config); this module only parses, builds the tree and runs
it. Without --prior/--diffusers/--ve, `igds-fast distill` runs the digits demo instead (`igds-fast
demo digits`; the routing is in igds_fast/cli/__init__.py).
"""
from __future__ import annotations

import argparse
import os

from igds_fast.devices import resolve_device
from igds_fast.distill import DistillConfig, distill, distill_with_selection
from igds_fast.distill.dry_run import plan_lines
from igds_fast.errors import IGDSDiskFullError
from igds_fast.settings import add_arguments, from_args
from igds_fast.threads import pinned_threads, torch_threads

COMMAND = "distill"
SETTINGS = DistillConfig
# The flags of the samplers users come from (guided-diffusion's classifier_sample.py, DiT's and
# MinimaxDiffusion's sample.py, IGD's igd_sample.py) that distill spells otherwise: refused naming ours.
PEER_FLAGS = {
    "--num-sampling-steps": ("DiT's and MinimaxDiffusion's", "--steps"),
    "--timestep_respacing": ("guided-diffusion's", "--timestep-respacing (or --steps)"),
    "--ckpt": ("DiT's and MinimaxDiffusion's", "--prior"),
    "--model_path": ("guided-diffusion's", "--prior"),
    "--model": ("DiT's", "--arch (or nothing: a DiT's size is read off its checkpoint)"),
    "--image-size": ("DiT's and MinimaxDiffusion's", "--arch (the checkpoint's architecture fixes the image size)"),
    "--image_size": ("guided-diffusion's", "--arch (the checkpoint's architecture fixes the image size)"),
    "--save-dir": ("MinimaxDiffusion's", "--out"),
    "--classifier_path": ("guided-diffusion's", "--ve (the variational estimator)"),
    "--classifier_scale": ("guided-diffusion's", "--scale"),
    "--num-samples": ("MinimaxDiffusion's", "--ipc (images per class)"),
    "--low": ("IGD's", "--guide-t-range LOW:HIGH"),
    "--high": ("IGD's", "--guide-t-range LOW:HIGH"),
    "--use_ddim": ("guided-diffusion's", "--sampler ddim (and --eta)"),
}


def add_parser(subparsers) -> None:
    """Declare `igds-fast distill` (sets handler=run)."""
    parser = subparsers.add_parser(
        COMMAND,
        allow_abbrev=False,
        help="sample a distilled image folder with IGDS (no models given: the built-in digits demo)",
        description=(
            "Sample IPC images per class with information-guided diffusion sampling and write "
            "OUT/<class>/<index>.png, OUT/manifest.json and OUT/preview.png. Reruns resume. "
            "Without --prior/--diffusers/--ve it runs the built-in scikit-learn digits demo "
            "(igds-fast demo digits --help)."
        ),
    )
    add_arguments(parser, DistillConfig)
    parser.set_defaults(handler=run, interrupted="the output folder keeps every finished image and is resumable: "
                        "rerun the same command")


def _resumable(exc: IGDSDiskFullError) -> IGDSDiskFullError:
    """The one line of a full disk during distill: which folder, and that a rerun resumes."""
    return IGDSDiskFullError(
        exc.folder,
        f"no space left on the device holding {exc.folder}: nothing partial was kept; free space (or choose "
        "another --out) and rerun the same command: it resumes, keeping every finished image",
    )


def run(args: argparse.Namespace) -> int:
    """The `distill` subcommand: build the settings tree from the flags given and run it."""
    config = from_args(DistillConfig, args)
    threads = pinned_threads(config.run.cpu_threads, resolve_device(config.run.device))
    if config.run.plan:  # the cost, nothing else (distill/dry_run.py); under torchrun rank 0 prints it
        with torch_threads(threads):
            lines = plan_lines(config)
        if os.environ.get("RANK", "0") == "0":
            print("\n".join(lines))
        return 0
    try:
        with torch_threads(threads):
            # --select s3: the candidates through distill(), then the selection stages (distill/select_stage.py).
            manifest = distill_with_selection(config) if config.selection is not None else distill(config)
    except IGDSDiskFullError as exc:
        raise _resumable(exc) from exc
    if "images" not in manifest:
        return 0  # a non-zero torchrun rank: rank 0 merges the manifest and reports the run
    record = manifest["run"]
    rate = f", {record['images_per_s']:.3f} images/s" if record["images_per_s"] else ""
    print(f"distill: {len(manifest['images'])} images in {os.path.abspath(config.run.out)} "
          f"({record['images_written']} written this run in {record['wall_time_s']:.1f}s{rate})")
    return 0
