"""The ImageNet-1K rehearsal: the README's ImageNet-1K recipe, every command, on a synthetic tree of the
real class ids, scaled down only in image size, widths, steps and epochs (issue 28, items 2 and 3).

    python bench/rehearsal.py                                  # 1000 classes at the CI scale
    python bench/rehearsal.py --classes 100,1000 --append-results   # peak RSS per command, 100 vs 1000 classes

The tree (`make_tree`): ROOT/train/<wnid>/<k>.png (--train-per-class each) and ROOT/val/<wnid>/<k>.png
(--val-per-class), RGB, --side px; the classes are ImageNet-1K's 1000 sorted WordNet ids (`--classes
imagenet1k`) or, for 100, ImageNet-100's (`--classes imagenet100`, MinimaxDiffusion's order), so every
class list and label map the commands build is the real one. A class's images share a random 4 x 4
pattern (upsampled) and differ by noise: a linear probe on a random encoder separates them.
The models (`make_models`): a MoCo v2-layout checkpoint of a random ResNet-50 (the recipe's `--init
moco:`), and an ADM prior file (igds-fast train-prior's layout: ADMUNet flags in its header) at SIDE
px, PRIOR_WIDTH channels, class-conditional on the 1000 sorted wnids, as guided-diffusion's ImageNet
ADM is. The VE stays the recipe's ResNet-50 (no width option); at 8 px its guidance (forward and
input gradient, ~150 MFLOP a sample) costs 4x the prior's forward, so CI runs S³ with --groups 2 and
two steps (`CI_SETTINGS`; one step is refused: a sampling loop needs two).

Stages (`STAGES`; each runs as `igds-fast ...` in its own process: wall time and peak RSS, ru_maxrss,
of the process and of its largest DataLoader worker):

    train-ve        --arch resnet50 --resolution SIDE --init moco:CKPT --lambda 0.01 --epochs 1
    calibrate-beta  --ipc 1 --betas 0,1 --epochs 1 --width WIDTH
    distill         --classes LIST --ipc 1 --composite 4 --beta-table --steps STEPS   (preview.png, manifest)
    distill-s3      the same with --select s3 --real ROOT/train (G = 5 candidates per class)
    export-npz      the distill folder -> one .npz
    eval-rded       RDED's soft-label protocol on the distill folder: a random-weight ConvNet-3 teacher
                    over the 1000 outputs (--teacher-arch convnet3; the class-order check runs and is
                    recorded, then overridden with --ignore-class-check: a random teacher is at chance),
                    --epochs 1 --width WIDTH --image-size SIDE
    eval-igds, eval-minimax   the hard-label protocols on the distill folder, --epochs 1 --width WIDTH

CI_EVAL_STAGE (eval-rded) is the last CI stage, as in the issue: the recipe ends with the number the
field reports.
`check_outputs` checks what a user relies on: one folder per class, exactly IPC PNGs in each, the
manifest's labels in the sorted-wnid order (its classes and images), a preview that stays readable
(at most 20 rows whatever the class count), the S³ folder likewise, the npz's labels.
tests/test_rehearsal_imagenet1k.py runs CI_STAGES at 1000 classes in CI (~3.5 min on 2 shared cores).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from bench.cli_child import child  # noqa: E402

SIDE = 8
WIDTH = 8  # the evaluation networks' (ConvNet) channels
PRIOR_WIDTH = 32  # the ADM prior's base channels (GroupNorm(32) needs a multiple of 32)
STEPS = 2
GROUPS = 5  # S³'s G, its default
TRAIN_PER_CLASS = 2
VAL_PER_CLASS = 1
IPC = 1
STAGES = ("train-ve", "calibrate-beta", "distill", "distill-s3", "export-npz", "eval-rded", "eval-igds", "eval-minimax")
CI_EVAL_STAGE = "eval-rded"  # the rehearsal's last stage: the soft-label number the ImageNet-1K tables report
CI_STAGES = ("train-ve", "calibrate-beta", "distill", "distill-s3", CI_EVAL_STAGE)
CLASSIFIER_EPOCHS = 30  # train-ve's L-BFGS iterations (at C = 1000, d = 2048 each costs ~25 GFLOP: ~1 s here)
CI_SETTINGS = {"steps": 2, "groups": 2, "classifier_epochs": 10}
PREVIEW_MAX_ROWS = 20


def class_list_for(count: int) -> tuple[str, list[str]]:
    """(--classes value, wnids) for 1000 (imagenet1k) or 100 (imagenet100) classes."""
    from igds_fast.classes import class_list

    name = {1000: "imagenet1k", 100: "imagenet100"}.get(count)
    if name is None:
        raise SystemExit(f"--classes takes 100 or 1000, got {count}")
    return name, class_list(name)


def make_tree(root: str, wnids: list[str], train_per_class: int, val_per_class: int, side: int, seed: int = 0) -> None:
    """ROOT/train/<wnid>/<k>.png and ROOT/val/<wnid>/<k>.png (written once: ROOT/.complete)."""
    import numpy as np
    from PIL import Image

    done = os.path.join(root, ".complete")
    if os.path.exists(done):
        return
    rng = np.random.default_rng(seed)
    for wnid in wnids:
        pattern = rng.integers(0, 256, size=(4, 4, 3)).astype(np.uint8)
        base = np.asarray(Image.fromarray(pattern).resize((side, side), Image.NEAREST), dtype=np.int16)
        for split, count in (("train", train_per_class), ("val", val_per_class)):
            folder = os.path.join(root, split, wnid)
            os.makedirs(folder, exist_ok=True)
            for index in range(count):
                noise = rng.integers(-12, 13, size=base.shape)
                Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)).save(os.path.join(folder, f"{index}.png"))
    open(done, "w").close()


def make_models(root: str, side: int, width: int) -> dict:
    """A random ResNet-50 MoCo v2 checkpoint, a 1000-class ADM prior file and a 1000-output ConvNet-3
    teacher (random weights, a bare state dict), written once."""
    import torch

    from igds_fast.classes import imagenet_wnids
    from igds_fast.models.adm import ADMUNet
    from igds_fast.models.priors import save_prior
    from igds_fast.models.resnet import resnet50
    from igds_fast.train_prior import PriorTrainConfig

    paths = {"moco": os.path.join(root, "moco_v2_resnet50.pth.tar"), "prior": os.path.join(root, "prior_in1k.safetensors"),
             "teacher": os.path.join(root, "teacher_convnet3_in1k.pt")}
    if all(os.path.exists(p) for p in paths.values()):
        return paths
    torch.manual_seed(0)
    encoder = resnet50(num_classes=None)
    state = {f"module.encoder_q.{k}": v for k, v in encoder.state_dict().items()}
    torch.save({"state_dict": state, "arch": "resnet50"}, paths["moco"])
    arch = PriorTrainConfig(num_channels=width, channel_mult="1,2", num_res_blocks=1, noise_schedule="linear")
    names = imagenet_wnids()
    flags = arch.unet_flags(side, 3, len(names))
    unet = ADMUNet.from_flags(**flags).eval()
    with torch.no_grad():
        for parameter in unet.parameters():
            parameter.normal_(0.0, 0.05)
    save_prior(paths["prior"], unet, flags, arch.schedule_config(), names)
    from igds_fast.evaluate.teachers import teacher_builder

    torch.save(teacher_builder("convnet3", side)(len(names)).state_dict(), paths["teacher"])
    return paths


def stage_argv(stage: str, root: str, models: dict, class_spec: str, side: int = SIDE, width: int = WIDTH,
               steps: int = STEPS, groups: int = GROUPS, classifier_epochs: int = CLASSIFIER_EPOCHS) -> list[str]:
    """The igds-fast command line of one stage (the README's ImageNet-1K recipe, scaled down)."""
    train, val, work = (os.path.join(root, name) for name in ("train", "val", "work"))
    ve, beta = os.path.join(work, "ve_in1k.safetensors"), os.path.join(work, "beta_in1k.json")
    distilled = os.path.join(work, "in1k_ipc1")
    common = ["--device", "cpu", "--quiet"]
    distill = ["distill", "--prior", models["prior"], "--ve", ve, "--classes", class_spec, "--ipc", str(IPC),
               "--composite", "4", "--beta-table", beta, "--steps", str(steps), "--batch-size", "256", *common]
    evaluation = ["eval", "--train", distilled, "--val", val, "--network", "convnet3", "--width", str(width),
                  "--epochs", "1", "--seeds", "1", *common]
    return {
        "train-ve": ["train-ve", "--data", train, "--val", val, "--arch", "resnet50", "--resolution", str(side),
                     "--init", f"moco:{models['moco']}", "--lambda", "0.01", "--epochs", "1", "--batch-size", "256",
                     "--classifier-epochs", str(classifier_epochs), "--out", ve, *common],
        "calibrate-beta": ["calibrate-beta", "--data", train, "--val", val, "--ve", ve, "--ipc", str(IPC), "--betas",
                           "0,1", "--epochs", "1", "--width", str(width), "--out", beta, *common],
        "distill": [*distill, "--out", distilled],
        "distill-s3": [*distill, "--select", "s3", "--groups", str(groups), "--real", train, "--out", os.path.join(work, "in1k_ipc1_s3")],
        "export-npz": ["export-npz", distilled, "--out", os.path.join(work, "in1k_ipc1.npz")],
        "eval-rded": [*evaluation, "--protocol", "rded", "--teacher", models["teacher"], "--teacher-arch", "convnet3",
                      "--image-size", str(side), "--ignore-class-check", "--out", os.path.join(work, "eval_rded.json")],
        "eval-igds": [*evaluation, "--protocol", "igds", "--out", os.path.join(work, "eval_igds.json")],
        "eval-minimax": [*evaluation, "--protocol", "minimax", "--out", os.path.join(work, "eval_minimax.json")],
    }[stage]


def run_stage(argv: list[str], env: dict | None = None, timeout: float | None = None) -> dict:
    """One stage in a fresh process: {"code", "seconds", "peak_mib", "worker_peak_mib"} or {"code", "error"}."""
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    completed = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", *argv], env=env,
                               capture_output=True, text=True, timeout=timeout)
    for line in completed.stdout.splitlines():
        if line.startswith("BENCH "):
            result = json.loads(line[6:])
            result["stderr"] = completed.stderr[-4000:]
            return result
    tail = (completed.stderr or completed.stdout).strip().splitlines()[-5:]
    return {"code": completed.returncode, "error": " | ".join(tail)}


def check_distilled(folder: str, wnids_in_order: list[str], ipc: int) -> list[str]:
    """Problems with a distill output folder (empty list: none)."""
    from PIL import Image

    problems = []
    listed = sorted(name for name in os.listdir(folder) if os.path.isdir(os.path.join(folder, name)))
    if listed != sorted(wnids_in_order):
        problems.append(f"{folder}: {len(listed)} class folders, expected {len(wnids_in_order)}")
    for wnid in wnids_in_order:
        files = sorted(os.listdir(os.path.join(folder, wnid))) if os.path.isdir(os.path.join(folder, wnid)) else []
        if files != [f"{k:05d}.png" for k in range(ipc)]:
            problems.append(f"{folder}/{wnid}: {files[:3]}, expected exactly {ipc} PNG(s)")
            break
    with open(os.path.join(folder, "manifest.json"), encoding="utf-8") as handle:
        manifest = json.load(handle)
    classes = [entry["name"] for entry in manifest["classes"]]
    if classes != wnids_in_order:
        problems.append(f"{folder}: the manifest's classes are not the list's order")
    from igds_fast.classes import imagenet_wnids

    sorted_index = {wnid: index for index, wnid in enumerate(imagenet_wnids())}
    label_of = {wnid: index for index, wnid in enumerate(sorted(wnids_in_order))}  # the VE's: sorted wnids
    for entry in manifest["classes"]:
        if entry["prior_label"] != sorted_index[entry["name"]] or entry["label"] != label_of[entry["name"]]:
            problems.append(f"{folder}: class {entry['name']} has label {entry['label']}, prior label "
                            f"{entry['prior_label']}")
            break
    if len(manifest["images"]) != len(wnids_in_order) * ipc:
        problems.append(f"{folder}: the manifest lists {len(manifest['images'])} images")
    for image in manifest["images"]:
        if image["label"] != label_of[image["class"]] or not image["path"].startswith(image["class"] + "/"):
            problems.append(f"{folder}: image {image['path']} has label {image['label']}")
            break
    with Image.open(os.path.join(folder, "preview.png")) as preview:
        preview.load()
        width, height = preview.size
    first = os.path.join(folder, wnids_in_order[0], "00000.png")
    with Image.open(first) as image:
        side = image.size[1]
    rows = (height - 2) // (side + 2)
    if rows > PREVIEW_MAX_ROWS or rows < 1 or width > 10 * (side + 2) + 2:
        problems.append(f"{folder}: preview {width}x{height} is not at most {PREVIEW_MAX_ROWS} rows of 10")
    return problems


def check_outputs(root: str, wnids_in_order: list[str], stages) -> list[str]:
    """What a user relies on after the stages that ran (module docstring)."""
    import numpy as np

    work = os.path.join(root, "work")
    problems = []
    if "train-ve" in stages:
        report = json.load(open(os.path.join(work, "ve_in1k.safetensors.report.json"), encoding="utf-8"))
        if report["class_names"] != sorted(wnids_in_order):
            problems.append("the VE's classes are not the tree's sorted wnids")
        leftovers = [name for name in os.listdir(work) if ".checkpoint" in name]
        if leftovers:
            problems.append(f"train-ve left {leftovers}")
    if "calibrate-beta" in stages:
        table = json.load(open(os.path.join(work, "beta_in1k.json"), encoding="utf-8"))
        if str(IPC) not in {str(k) for k in table["beta_per_ipc"]}:
            problems.append(f"the beta table has no IPC {IPC}: {table['beta_per_ipc']}")
    for stage, folder in (("distill", "in1k_ipc1"), ("distill-s3", "in1k_ipc1_s3")):
        if stage in stages:
            problems += check_distilled(os.path.join(work, folder), wnids_in_order, IPC)
    if "export-npz" in stages:
        from igds_fast.classes import imagenet_wnids

        sorted_index = {wnid: index for index, wnid in enumerate(imagenet_wnids())}
        with np.load(os.path.join(work, "in1k_ipc1.npz")) as data:
            expected = sorted(sorted_index[wnid] for wnid in wnids_in_order for _ in range(IPC))
            if sorted(data["arr_1"].tolist()) != expected or data["arr_0"].shape[0] != len(expected):
                problems.append("the npz's arr_1 are not the sorted-wnid labels, IPC per class")
    return problems


def rehearse(root: str, classes: int, stages=STAGES, log=print, timeout: float | None = None, steps: int = STEPS,
             groups: int = GROUPS, classifier_epochs: int = CLASSIFIER_EPOCHS) -> dict:
    """Build the tree and models under root, run the stages in order; returns {stage: result} and the checks."""
    class_spec, wnids = class_list_for(classes)
    make_tree(root, wnids, TRAIN_PER_CLASS, VAL_PER_CLASS, SIDE)
    os.makedirs(os.path.join(root, "work"), exist_ok=True)
    models = make_models(root, SIDE, PRIOR_WIDTH)
    results = {}
    for stage in stages:
        result = run_stage(stage_argv(stage, root, models, class_spec, steps=steps, groups=groups,
                                         classifier_epochs=classifier_epochs), timeout=timeout)
        results[stage] = result
        log(f"rehearsal: {classes} classes: {stage}: " + (f"{result['seconds']:.1f} s, peak RSS {result['peak_mib']:.0f} "
            f"MiB, largest worker {result['worker_peak_mib']:.0f} MiB" if "error" not in result and result["code"] == 0
            else f"FAILED ({result.get('error') or result.get('stderr', '')[-500:]})"))
        if result.get("code") != 0:
            break
    return {"results": results, "problems": check_outputs(root, wnids, [s for s in results if results[s].get("code") == 0]),
            "classes": classes}


def table(runs: list[dict]) -> str:
    lines = ["| classes | stage | wall (s) | peak RSS (MiB) | largest DataLoader worker (MiB) |", "|---:|---|---:|---:|---:|"]
    for run in runs:
        for stage, result in run["results"].items():
            if "error" in result or result["code"] != 0:
                lines.append(f"| {run['classes']} | {stage} | failed | | |")
            else:
                lines.append(f"| {run['classes']} | {stage} | {result['seconds']:.1f} | {result['peak_mib']:.0f} | "
                             f"{result['worker_peak_mib']:.0f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", default="1000", help="100 and/or 1000 (comma-separated)")
    parser.add_argument("--stages", default=",".join(STAGES))
    parser.add_argument("--root", default="/tmp/igds_rehearsal")
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--groups", type=int, default=GROUPS, help="S3's G")
    parser.add_argument("--append-results", action="store_true", help="append the table to bench/RESULTS.md")
    parser.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child(args.child)
        return 0
    runs = []
    for classes in (int(c) for c in args.classes.split(",")):
        root = os.path.join(args.root, f"c{classes}")
        work = os.path.join(root, "work")
        if os.path.isdir(work):
            import shutil

            shutil.rmtree(work)
        runs.append(rehearse(root, classes, args.stages.split(","), steps=args.steps, groups=args.groups))
    text = table(runs)
    for run in runs:
        for problem in run["problems"]:
            text += f"\n\nPROBLEM ({run['classes']} classes): {problem}"
    print(text)
    if args.append_results:
        import torch

        header = (f"\n## bench/rehearsal.py — the ImageNet-1K recipe at {args.classes} classes — CPU\n\n"
                  f"- machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; torch "
                  f"{torch.__version__}, python {platform.python_version()}\n"
                  f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC\n"
                  f"- command: `python bench/rehearsal.py --classes {args.classes} --steps {args.steps} --groups "
                  f"{args.groups} --append-results`\n"
                  f"- scale: {SIDE} px, {TRAIN_PER_CLASS} train + {VAL_PER_CLASS} val images per class, prior width "
                  f"{PRIOR_WIDTH}, ConvNet width {WIDTH}, {args.steps} step(s), S3 G = {args.groups}, 1 epoch\n\n")
        with open(os.path.join(REPO, "bench", "RESULTS.md"), "a", encoding="utf-8") as handle:
            handle.write(header + text + "\n")
    return 1 if any(run["problems"] for run in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
