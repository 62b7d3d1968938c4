"""The speed-quality frontier of IGDS: distilled-set accuracy against sampling steps, DDPM vs DDIM.

On the digits demo (igds_fast/presets/digits.py: the shipped prior, the demo's VE trained once into
--work-dir, IGDS at scale 1 with the demo's beta per IPC, ConvNet-3 width 64 for 200 epochs), for
every (IPC, sampler, steps) point and seed s = 0 .. --seeds-1 (s is the distill seed and the
evaluation network's, as the demo's rows): `distill` writes the set (eager backend, batch 100, one
thread), the manifest gives its sampling seconds, and ConvNet-3 is trained on it and tested on the
539-image test split. Each point reports accuracy mean +- std over the seeds and the sampling seconds
per distilled image (summed over the seeds' runs, this machine, the same run).

The rows (ROWS): DDPM and DDIM as the demo guides (every step), DDIM with its first step unguided
(--guide-from-step 1: see ROWS for why), and dpmpp2m: a DPM-Solver++(2M) trial (Lu et al. 2022, multistep, data prediction) through the same score
shift as DDIM -- eps - sqrt(1 - abar) s g, x0 re-derived -- built from the eager step's operations
(`dpmpp2m_sample`, eager float32 only; its first step is DDIM's at eta 0, tests/test_bench_frontier.py).
It is a trial: it joins the library (every backend) only if it clearly beats DDIM here.

The cost axis of the ImageNet presets comes from FLOP counts (bench/model_stats.py, meta device): one
guided step of adm256 (UNet forward + the VE's ResNet-50 forward and input-gradient backward) and of
DiT-XL/2 (CFG forward + VAE decoder forward/backward + encoder), times the steps; DDPM and DDIM steps
cost the same (the update is elementwise). Where a GPU is lent, bench/sampler.py measures seconds.

    python bench/frontier.py --work-dir igds_work/frontier --out bench/frontier \
        [--ipcs 1,10] [--steps 10,25,50,100,250] [--samplers ddpm,ddim,ddim-from1,dpmpp2m-from1] [--seeds 3]
        [--append-results]

Writes OUT/frontier.json (every number, updated after each point: a rerun resumes), OUT/frontier.md
(the table) and OUT/frontier.png (accuracy and seconds per image against steps, log x).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import shutil
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from igds_fast.data import load_digits_split  # noqa: E402
from igds_fast.distill import DistillConfig, JobSettings, ModelSettings, RunSettings, SamplerSettings, distill  # noqa: E402
from igds_fast import load_ve  # noqa: E402
from igds_fast.guidance import GuidanceConfig  # noqa: E402
from igds_fast.imageio import to_uint8, write_bytes_atomic, write_json_atomic  # noqa: E402
from igds_fast.jobs import build_jobs  # noqa: E402
from igds_fast.models.priors import load_prior  # noqa: E402
from igds_fast.plots import save_line_panels  # noqa: E402
from igds_fast.presets import digits  # noqa: E402
from igds_fast.sampling import Sampler, StepOps  # noqa: E402
from igds_fast.diffusion import DiffusionSchedule  # noqa: E402
from igds_fast.seeding import INITIAL_NOISE_STREAM  # noqa: E402
from igds_fast.threads import torch_threads  # noqa: E402

COMMAND = "python bench/frontier.py"
# The grid's rows: name -> (sampler, first guided sampling step, most steps it runs, title).
# "ddim" guides every step as the demo does; on the digits prior's cosine schedule its first step
# (abar 2.4e-9 at t = 999) multiplies the guidance by ~(1 - abar) sqrt(abar_prev) / sqrt(abar) ~ 1e2..3e3
# (DiffusionSchedule.ddim_guidance_factor) and saturates the images, so that row runs the small step
# counts only, to show it; "-from1" rows leave that one step unguided (--guide-from-step 1).
ROWS = {
    "ddpm": ("ddpm", 0, None, "DDPM"),
    "ddim": ("ddim", 0, 50, "DDIM (eta 0), guided from step 0"),
    "ddim-from1": ("ddim", 1, None, "DDIM (eta 0), --guide-from-step 1"),
    "dpmpp2m-from1": ("dpmpp2m", 1, 100, "DPM-Solver++(2M) trial, from step 1"),
}
SAMPLER_TITLES = {name: row[3] for name, row in ROWS.items()}
BATCH = 100  # the demo's samples per sampler call
ADM_SAMPLES_PER_IMAGE = 4  # the ImageNet recipe: 2x2 composites of four 256x256 samples


# ---- the DPM-Solver++(2M) trial ------------------------------------------------------------------------
def dpmpp2m_sample(sampler: Sampler, labels, seeds, stop_after: int | None = None, trace: list | None = None
                   ) -> torch.Tensor:
    """Images [B, C, H, W] by DPM-Solver++(2M) with IGDS's score shift, on the eager step's operations.

    With alpha_i = sqrt(abar_i), sigma_i = sqrt(1 - abar_i), lambda_i = log(alpha_i / sigma_i): D_i is
    the guided x0 of step i (DDIM's: eps - sqrt(1 - abar_i) s g, x0 re-derived, not clipped again);
    h = lambda_{i-1} - lambda_i; x_{i-1} = (sigma_{i-1} / sigma_i) x_i - alpha_{i-1} (e^-h - 1) D with D = D_i
    at the first step (first order: DDIM at eta 0) and (1 + 1/(2r)) D_i - 1/(2r) D_{i+1}, r = h_{i+1} / h,
    after it; the last step (sigma_{-1} = 0) returns D_0. `sampler` is a DDIM Sampler (its tables), x0 mode.
    stop_after: return x after that many steps instead (the tests compare single steps); trace: a list
    that receives (x_i, D_i) of every step (the tests drive diffusers' solver with the same D_i).
    """
    c = sampler.context
    ops, schedule = StepOps(c), c.schedule
    labels = torch.as_tensor(labels, dtype=torch.long, device=sampler.device)
    shape = (sampler.channels, sampler.image_size, sampler.image_size)
    x = sampler.noise_source(seeds, INITIAL_NOISE_STREAM, shape, sampler.device)
    _, state = sampler.stepper.begin_batch(x, labels, seeds)
    abar = schedule.alphas_cumprod.double().tolist()
    previous = None  # (D, h) of the step before
    for k, i in enumerate(reversed(range(c.num_steps))):
        if k == stop_after:
            return x
        inputs = state.inputs(i, sampler.stepper.step_indices[i])
        with torch.no_grad():
            x0 = ops.predict_x0(x, ops.unet(x, inputs), inputs)
        if c.guided(i):
            grad, _ = ops.guide(x0, inputs)
            with torch.no_grad():
                eps = schedule.predict_eps(x, x0, i) - c.ddim.sqrt_one_minus_alphas_cumprod[i] * (c.guidance_config.scale
                                                                                                  * grad)
                x0 = schedule.predict_x0(x, eps, i, clip=False)
        if trace is not None:
            trace.append((x.clone(), x0.clone()))
        if i == 0:
            return x0.clamp(-1.0, 1.0)
        alpha_s, sigma_s = math.sqrt(abar[i]), math.sqrt(1.0 - abar[i])
        alpha_t, sigma_t = math.sqrt(abar[i - 1]), math.sqrt(1.0 - abar[i - 1])
        h = math.log(alpha_t / sigma_t) - math.log(alpha_s / sigma_s)
        data = x0
        if previous is not None:
            r = previous[1] / h
            data = (1.0 + 0.5 / r) * x0 - (0.5 / r) * previous[0]
        with torch.no_grad():
            x = (sigma_t / sigma_s) * x - alpha_t * math.expm1(-h) * data
        previous = (x0, h)
    raise AssertionError("unreachable: the loop returns at i = 0")


def dpmpp2m_set(prior_path, ve_path, ipc, seed, steps, settings, guide_from_step=0, device="cpu"):
    """(images uint8-rounded [N, 1, 16, 16] in class order, labels, sampling seconds) of one trial set."""
    unet, schedule_config, _ = load_prior(prior_path, device=device)
    schedule = DiffusionSchedule(dataclasses.replace(schedule_config, sampling_steps=str(steps)), device=device)
    guidance = GuidanceConfig(scale=settings.scale, beta=settings.beta_for(ipc), guide_from_step=guide_from_step)
    sampler = Sampler(unet, schedule, load_ve(ve_path, device=device), guidance, sampler="ddim", eta=0.0)
    jobs = build_jobs(digits.CLASS_NAMES, list(range(len(digits.CLASS_NAMES))), ipc, seed, 1)
    jobs.sort(key=lambda job: (job.label, job.image_index))  # the order an image-folder reader gives
    images, seconds = [], 0.0
    for start in range(0, len(jobs), BATCH):
        part = jobs[start:start + BATCH]
        started = time.perf_counter()
        batch = dpmpp2m_sample(sampler, [job.label for job in part], [job.samples[0].seed for job in part])
        seconds += time.perf_counter() - started
        images.append(torch.from_numpy(to_uint8(batch)).permute(0, 3, 1, 2).float() / 127.5 - 1.0)  # as a PNG
    labels = torch.tensor([job.label for job in jobs])
    return torch.cat(images), labels, seconds


# ---- one point of the grid -------------------------------------------------------------------------
def library_set(out, prior_path, ve_path, ipc, seed, steps, sampler, settings, guide_from_step=0):
    """(folder, sampling seconds) of one set sampled by `distill` (DDPM or DDIM), always sampled afresh
    (a folder left by an interrupted run would resume and time only its missing images)."""
    if os.path.isdir(out):
        shutil.rmtree(out)
    config = DistillConfig(
        models=ModelSettings(ve=ve_path, prior=prior_path),
        job=JobSettings(ipc=ipc, composite=1, seed=seed),
        sampler=SamplerSettings(steps=steps, sampler=sampler),
        guidance=GuidanceConfig(scale=settings.scale, beta=settings.beta_for(ipc), guide_from_step=guide_from_step),
        run=RunSettings(out=out, batch_size=BATCH, device="cpu", force=True, progress=False),
    )
    manifest = distill(config, log=lambda message: None)
    return out, float(manifest["run"]["sampling_time_s"])


def run_point(work, prior_path, ve_path, split, ipc, row, steps, seeds, settings, log):
    train_x, train_y, test_x, test_y = split
    sampler, guide_from_step = ROWS[row][:2]
    accuracies, seconds = [], 0.0
    for seed in range(seeds):
        if sampler == "dpmpp2m":
            images, labels, sampling = dpmpp2m_set(prior_path, ve_path, ipc, seed, steps, settings, guide_from_step)
        else:
            folder = os.path.join(work, "sets", f"{row}_steps{steps}_ipc{ipc}_seed{seed}")
            folder, sampling = library_set(folder, prior_path, ve_path, ipc, seed, steps, sampler, settings,
                                           guide_from_step)
            images, labels = digits.load_distilled(folder)
        seconds += sampling
        accuracies.append(digits.evaluate_set(images, labels, test_x, test_y, seed, settings))
        log(f"frontier: {row} {steps} steps IPC {ipc} seed {seed}: {accuracies[-1]:.2f}% ({sampling:.1f} s sampling)")
    images_made = seeds * ipc * len(digits.CLASS_NAMES)
    return {"ipc": ipc, "sampler": row, "steps": steps, "accuracies": accuracies,
            "mean": float(np.mean(accuracies)), "std": float(np.std(accuracies)),
            "sampling_s": round(seconds, 2), "s_per_image": seconds / images_made}


# ---- the FLOP cost axis --------------------------------------------------------------------------------
def flop_costs() -> dict:
    """{preset: guided TFLOP per sample per step} of adm256 and DiT-XL/2 (bench/model_stats.py's counts)."""
    from bench.models import flops_per_image_step, latent_flops_per_image_step

    costs = {"adm256": flops_per_image_step("adm256")["total"] / 1e12}
    try:
        costs["dit-xl2-256"] = latent_flops_per_image_step("dit-xl2-256")["total"] / 1e12
    except ImportError:  # the VAE's count needs diffusers
        pass
    return costs


# ---- report ----------------------------------------------------------------------------------------------
def point_key(ipc, sampler, steps) -> str:
    return f"{sampler}_steps{steps}_ipc{ipc}"


def table(results: dict) -> str:
    points = results["points"]
    ipcs, steps, samplers = results["ipcs"], results["steps"], results["samplers"]
    lines = ["| sampler | steps | " + " | ".join(f"IPC {ipc} acc. % | IPC {ipc} s / image" for ipc in ipcs) + " |",
             "|---|---:|" + "---:|---:|" * len(ipcs)]
    for sampler in samplers:
        for n in steps:
            cells = []
            for ipc in ipcs:
                point = points.get(point_key(ipc, sampler, n))
                cells += ["-", "-"] if point is None else [f"{point['mean']:.2f} ± {point['std']:.2f}",
                                                           f"{point['s_per_image']:.3f}"]
            if any(cell != "-" for cell in cells):
                lines.append(f"| {SAMPLER_TITLES[sampler]} | {n} | " + " | ".join(cells) + " |")
    costs = results.get("flop_costs") or {}
    if costs:
        lines += ["", "Cost axis of the ImageNet presets (FLOP counts, guided steps; DDPM = DDIM per step):", "",
                  "| preset | TFLOP per sample per step | " + " | ".join(f"{n} steps: TFLOP / image" for n in steps) + " |",
                  "|---|---:|" + "---:|" * len(steps)]
        for preset, per_step in costs.items():
            samples = ADM_SAMPLES_PER_IMAGE if preset.startswith("adm") else 1
            note = f" (x{samples} samples: 2x2 composite)" if samples > 1 else ""
            lines.append(f"| {preset}{note} | {per_step:.2f} | "
                         + " | ".join(f"{per_step * n * samples:.0f}" for n in steps) + " |")
    return "\n".join(lines)


def plot(results: dict, path: str) -> None:
    points, steps = results["points"], results["steps"]
    panels = []
    for ipc in results["ipcs"]:
        panels.append((f"IPC {ipc}: ConvNet-3 accuracy %", {
            SAMPLER_TITLES[s]: [points.get(point_key(ipc, s, n), {}).get("mean", math.nan) for n in steps]
            for s in results["samplers"]}))
    ipc = max(results["ipcs"])
    panels.append((f"IPC {ipc}: sampling s / image", {
        SAMPLER_TITLES[s]: [points.get(point_key(ipc, s, n), {}).get("s_per_image", math.nan) for n in steps]
        for s in results["samplers"]}))
    save_line_panels(path, steps, panels, x_label="steps", x_log=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", default=os.path.join("igds_work", "frontier"))
    parser.add_argument("--out", default=os.path.join("bench", "frontier"))
    parser.add_argument("--ipcs", default="1,10")
    parser.add_argument("--steps", default="10,25,50,100,250")
    parser.add_argument("--samplers", default=",".join(ROWS), help=f"rows of the grid, among {', '.join(ROWS)}")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--append-results", action="store_true")
    args = parser.parse_args(argv)
    ipcs = [int(v) for v in args.ipcs.split(",")]
    steps = [int(v) for v in args.steps.split(",")]
    samplers = args.samplers.split(",")
    os.makedirs(args.out, exist_ok=True)
    os.makedirs(args.work_dir, exist_ok=True)
    log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    results_path = os.path.join(args.out, "frontier.json")
    results = {"points": {}}
    if os.path.isfile(results_path):
        with open(results_path) as handle:
            results = json.load(handle)
    results.update(ipcs=ipcs, steps=steps, samplers=samplers, seeds=args.seeds,
                   machine=f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
                   command=f"{COMMAND} " + " ".join(argv if argv is not None else sys.argv[1:]))
    started = time.perf_counter()
    settings = digits.DigitsSettings()
    with torch_threads(settings.threads):
        split = load_digits_split(**digits.SPLIT)
        prior_path, _ = digits.ensure_prior(args.work_dir, settings, split[0], split[1], log)
        stage = time.perf_counter()
        ve_path, ve_info = digits.ensure_ve(args.work_dir, settings, *split, log)
        results["ve_s"] = results.get("ve_s") if ve_info.get("cached") else round(time.perf_counter() - stage, 1)
        for n in steps:  # cheapest first: an interrupted run has the small step counts
            for ipc in ipcs:
                for sampler in samplers:
                    key = point_key(ipc, sampler, n)
                    most = ROWS[sampler][2]
                    if most is not None and n > most:
                        continue
                    done = results["points"].get(key)
                    if done is not None and len(done["accuracies"]) == args.seeds:
                        continue  # made by an earlier invocation with the same seed count
                    results["points"][key] = run_point(args.work_dir, prior_path, ve_path, split, ipc, sampler, n,
                                                       args.seeds, settings, log)
                    write_json_atomic(results_path, results)
    results["flop_costs"] = flop_costs()
    results["wall_s_this_invocation"] = round(time.perf_counter() - started, 1)
    write_json_atomic(results_path, results)
    text = table(results)
    write_bytes_atomic(os.path.join(args.out, "frontier.md"), (text + "\n").encode())
    plot(results, os.path.join(args.out, "frontier.png"))
    print(text)
    if args.append_results:
        header = (f"\n## bench/frontier.py — the speed-quality frontier (digits, CPU)\n\n"
                  f"- machine: {results['machine']}; torch {torch.__version__}\n"
                  f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC\n"
                  f"- command: `{results['command']}`; wall {results['wall_s_this_invocation']:.0f} s\n\n")
        with open(os.path.join("bench", "RESULTS.md"), "a") as handle:
            handle.write(header + text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
