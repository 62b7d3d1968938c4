"""Running a distillation: the batches, the sampler, the atomic writes, torchrun sharding, the manifest.

Resume: every file appears only by an atomic rename, and rank 0 checks every existing image before
counting it (folder.prepare_output: a file that is not a whole PNG is made again). Work is cut
into fixed batches of the full job list (interleaving classes); a rerun skips the batches whose
images all exist and re-samples a partly written batch with exactly its original members, writing
only its missing files. Because a batch is always computed with the same members, a resumed run's
files equal an uninterrupted run's byte for byte (eager backend; same batch size, device and thread
count — on CUDA through `sampling.fp32_reference_math` and atomic-free backward passes; with
another batch size images agree to float rounding, or byte for byte with `batch_invariant`). With
gamma != 0 the batch size decides which images are coupled, so it is saved (`.igds_batch.json`) and
a resume reuses it; another --batch-size is refused. A rerun whose pixel settings differ from
`.igds_config.json` is refused, naming the setting; `force` clears the folder's images first.

Progress: one line for the whole job, on rank 0 under torchrun (distributed.ProgressRounds sums the
ranks' finished images at their batch boundaries without stalling any rank), moving within a batch
as the device finishes its steps (Sampler.sample's on_steps_done: CUDA events, no host sync).
Profiling: `profile_steps` / IGDS_PROFILE_STEPS=A:B opens the CUDA profiler around steps A .. B-1 of
the first batch (profiling/window.py), validated here before any model loads.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import time
from typing import Callable

import torch

from ..diffusion import DiffusionSchedule, ScheduleConfig
from ..distributed import (
    ProgressRounds,
    agree_max,
    agree_min,
    barrier,
    gather_to_main,
    init_distributed,
    main_first,
    rank_device,
    shard,
    shutdown,
)
from ..imageio import make_composite, save_png_atomic, write_json_atomic
from ..jobs import batch_jobs, batch_samples, is_done
from ..locks import hold_folder
from ..models.cfg import ClassifierFreeGuidance
from ..models.priors import load_prior_unet
from ..models.vae import load_vae
from ..profiling.window import PROFILE_STEPS_ENV, resolve_step_window
from ..progress import Progress
from ..sampling import Sampler
from .config import DEFAULT_BATCH_SIZE, DistillConfig
from .cost import cost_lines, distill_cost
from .folder import (
    BATCH_NAME,
    MANIFEST_NAME,
    coupled_batch_size,
    prepare_output,
    write_preview,
)
from .manifest import build_manifest
from .plan import Plan, plan_distill
from .trace import TraceAccumulator


DDIM_FIRST_STEP_NOTE_ABOVE = 10.0  # DDPM's mean shift is at most 1 x scale x dJ/dx


def _ddim_first_step_note(plan: Plan) -> str | None:
    """A note for a DDIM run that guides its first step where the score shift scales the guidance by more
    than DDIM_FIRST_STEP_NOTE_ABOVE (diffusion.DiffusionSchedule.ddim_guidance_factor), else None."""
    settings = plan.pixel_settings
    if settings.get("sampler") != "ddim" or not plan.guidance.scale:
        return None
    schedule = DiffusionSchedule(ScheduleConfig(**settings["diffusion"]))
    first = schedule.num_steps - 1
    if not plan.guidance.guides(first, schedule.num_steps):
        return None
    factor = float(schedule.ddim_guidance_factor(schedule.ddim(settings["eta"]))[first])
    if factor <= DDIM_FIRST_STEP_NOTE_ABOVE:
        return None
    return (f"distill: note: DDIM's score shift moves x by {factor:.0f} x scale x dJ/dx at the first step (abar "
            f"{float(schedule.alphas_cumprod[first]):.1e}): --guide-from-step 1 leaves that step unguided (on the "
            "digits prior a guided first step saturates the images; bench/RESULTS.md, the frontier)")


def _ddim_note(plan: Plan) -> str:
    """" (DDIM, eta E)" for a DDIM run's progress line, "" for DDPM (whose line is unchanged)."""
    settings = plan.pixel_settings
    return f" (DDIM, eta {settings['eta']:g})" if settings.get("sampler") == "ddim" else ""


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def distill(config: DistillConfig, log: Callable[[str], None] = _stderr, plan: Plan | None = None,
            announce_cost: bool = True) -> dict:
    """Run (or resume) a distillation; returns the manifest dict (also written to OUT/manifest.json).

    OUT is locked for the run (igds_fast/locks.py: one writer per folder; rank 0 holds it for every
    rank under torchrun), from before its contents are checked until the manifest is written.
    announce_cost: log the run's cost (distill/cost.py, what --plan prints) before sampling (rank 0).
    """
    with contextlib.ExitStack() as held:
        return _distill(config, log, plan, held, announce_cost)


def _distill(config: DistillConfig, log: Callable[[str], None], plan: Plan | None, held: contextlib.ExitStack,
             announce_cost: bool = True) -> dict:
    started = time.perf_counter()
    # Under torchrun: rank 0 validates the inputs and prepares the folder first; the other ranks wait,
    # so a bad input fails once with one message. A single process runs the same code unchanged.
    ctx = init_distributed(config.run.device)

    def checked_plan() -> tuple[Plan, object]:
        checked = plan if plan is not None else plan_distill(config)
        return checked, _profile_window(config, checked)

    plan, profile_window = main_first(ctx, checked_plan)
    device = torch.device(rank_device(ctx, str(plan.device))) if ctx.enabled else plan.device
    out = config.run.out

    def prepare() -> tuple[int, int | None]:
        if ctx.is_main:
            held.enter_context(hold_folder(out, "--out", log))
            done = prepare_output(out, plan.pixel_settings, config.run.force, log)
        else:
            done = sum(1 for job in plan.jobs if is_done(job, out))
        return done, coupled_batch_size(out, plan.guidance.gamma, config.run.batch_size, plan.composite)

    already, saved_batch_size = main_first(ctx, prepare)
    total_images = len(plan.jobs)

    def build_sampler():
        unet = load_prior_unet(plan.prior, device)
        decoder = None
        latent = plan.pixel_settings.get("latent")
        if latent is not None:  # a DiT: classifier-free guidance with its null class, decoded by the VAE
            unet = ClassifierFreeGuidance(unet, latent["cfg_scale"], latent["cfg_channels"])
            decoder = load_vae(config.models.vae, device)
        schedule = DiffusionSchedule(ScheduleConfig(**plan.pixel_settings["diffusion"]), device=device)
        backend = config.backend
        compile_options = None
        if backend.name == "compiled":  # --quiet silences the compile's lines too
            quiet = not config.run.progress
            compile_options = dataclasses.replace(backend.compile,
                                                  compile_progress=backend.compile.compile_progress and not quiet)
        return Sampler(unet, schedule, plan.ve.to(device), plan.guidance, backend=backend.name,
                       prior_class_map=plan.prior_class_map, noise=plan.noise,
                       batch_invariant=backend.batch_invariant, backend_options=compile_options, decoder=decoder,
                       profile_steps=profile_window, sampler=plan.pixel_settings.get("sampler", "ddpm"),
                       eta=plan.pixel_settings.get("eta"))

    sampler = None
    batch_size = config.run.batch_size or saved_batch_size
    pad = config.backend.name == "compiled"  # static shapes: a short last batch reuses the full batches' graphs
    if batch_size is None:
        if pad and already < total_images:
            # Every rank sees the same folder, so all of them take this branch and meet in agree_min.
            sampler = build_sampler()
            batch_size = agree_min(ctx, sampler.preferred_batch_size or DEFAULT_BATCH_SIZE)
        else:
            batch_size = DEFAULT_BATCH_SIZE
    batch_size = max(plan.composite, batch_size - batch_size % plan.composite)  # whole composites only
    if plan.guidance.gamma and saved_batch_size is None and ctx.is_main:
        write_json_atomic(os.path.join(out, BATCH_NAME), {"batch_size": batch_size})
    batches = list(batch_jobs(plan.jobs, batch_size))
    # Fixed batches, dealt round-robin: a batch has the same members whatever the world size, and the
    # ranks share the work still to do after a resume equally.
    todo = shard([batch for batch in batches if not all(is_done(job, out) for job in batch)], ctx)
    # The same number of progress rounds on every rank (the largest share), agreed before the loop.
    rounds = ProgressRounds(ctx, agree_max(ctx, len(todo)))
    written = 0
    sampled = 0
    sampling_seconds = 0.0
    schedule_map = DiffusionSchedule(ScheduleConfig(**plan.pixel_settings["diffusion"])).timestep_map.tolist()
    traces = TraceAccumulator(len(schedule_map), plan.class_keys)
    if todo:
        sampler = sampler or build_sampler()  # before the progress clock starts: loading is not sampling
    # One progress line for the job: rank 0's, counting every rank's images (ProgressRounds).
    progress = None
    if ctx.is_main and already < total_images:
        ranks = f" on {ctx.world_size} ranks" if ctx.enabled else ""
        log(
            f"distill: {len(plan.class_keys)} classes x IPC {config.job.ipc} = {total_images} images "
            f"({plan.composite} sample(s) each), {total_images - already} to make{ranks}, beta {plan.beta:g} "
            f"({plan.beta_source}), scale {plan.guidance.scale:g}, {plan.steps} steps{_ddim_note(plan)}, "
            f"batch {batch_size}, backend {config.backend.name}, device {plan.device}"
        )
        note = _ddim_first_step_note(plan)
        if note is not None:
            log(note)
        if announce_cost:
            for line in cost_lines(distill_cost(plan, ctx.world_size, already, config.run.timing_from)):
                log(line)
        if config.run.progress:
            progress = Progress(total_images, unit="img", label="distill", initial=already)
            progress.start()
    others_shown = 0

    def show_others(others: int) -> None:
        """Add the other ranks' newly known images to rank 0's line."""
        nonlocal others_shown
        if progress is not None and others > others_shown:
            progress.update(others - others_shown)
            others_shown = others

    if todo:
        class_position = {label: position for position, label in enumerate(plan.ve_labels)}
        sampling_start = time.perf_counter()
        for batch_number, batch in enumerate(todo):
            samples = batch_samples(batch)
            group_ids = None
            if plan.guidance.gamma:
                # The diversity term couples the samples of one class in the batch (IGDS_SPEC section 4).
                group_ids = [sample.label for sample in samples]
            # Pad a short batch only after a full one: then its graphs exist and padding replaces a new
            # compile and capture; a run whose only batch is short just runs at its own size.
            pad_to = batch_size if pad and batch_number > 0 else None
            to_write = sum(1 for job in batch if not is_done(job, out))

            def steps_done(finished: int, num_steps: int, to_write: int = to_write) -> None:
                if progress is not None:
                    show_others(rounds.others())
                    progress.set_partial(to_write * finished / num_steps)

            images = sampler.sample([s.label for s in samples], [s.seed for s in samples], group_ids=group_ids,
                                    pad_to=pad_to, trace=config.run.trace,
                                    on_steps_done=steps_done if progress is not None else None)
            if config.run.trace:
                images, trace = images
                traces.add(trace, [class_position[s.label] for s in samples])
            images = images.detach().to("cpu", torch.float32)
            sampled += len(samples)
            if progress is not None:
                progress.set_partial(0)
            for position, job in enumerate(batch):
                if is_done(job, out):
                    continue  # written before an interruption: never rewritten
                members = images[position * plan.composite : (position + 1) * plan.composite]
                image = make_composite(members) if plan.composite == 4 else members[0]
                save_png_atomic(os.path.join(out, job.relative_path), image)
                written += 1
                if progress is not None:
                    progress.update(1)
            rounds.post(written)
            show_others(rounds.others())
        sampling_seconds = time.perf_counter() - sampling_start
    elif ctx.enabled and already < total_images:
        log(f"distill: rank {ctx.rank} has no share of the {total_images - already} images left")
    elif not ctx.enabled or ctx.is_main:
        log(f"distill: {out} already holds all {total_images} images of this configuration; nothing to sample")
    rounds.finish(written, show_others)  # every rank: its remaining rounds (rank 0 shows the slower ranks)
    if progress is not None:
        progress.close()

    rank_stats = {
        "rank": ctx.rank,
        "device": str(device),
        "batch_size": batch_size,
        "images_written": written,
        "samples_generated": sampled,
        "sampling_time_s": round(sampling_seconds, 3),
        "images_per_s": round(written / sampling_seconds, 4) if sampling_seconds > 0 else None,
    }
    report = None if sampler is None else sampler.self_check_report  # no sampler: nothing was left to sample
    if report is not None:  # the compiled backend's first-step errors against the eager float32 step
        rank_stats["self_check"] = {part["part"]: float(f"{part['error']:.3g}") for part in report["parts"]}
    if config.run.trace:
        rank_stats["trace"] = traces.to_state()
    gathered = gather_to_main(ctx, rank_stats)
    if not ctx.is_main:
        barrier(ctx)  # leave the process group together with rank 0: a lone teardown can abort gloo
        shutdown(ctx)
        return {"run": {"world_size": ctx.world_size, "ranks": [rank_stats]}}  # no "images": rank 0 merges
    if config.run.trace:
        merged = TraceAccumulator(len(schedule_map), plan.class_keys)
        for stats in gathered:
            merged.merge(stats.pop("trace"))
        merged.write(out, schedule_map)
    written = sum(stats["images_written"] for stats in gathered)
    sampled = sum(stats["samples_generated"] for stats in gathered)
    sampling_seconds = max(stats["sampling_time_s"] for stats in gathered)  # the ranks ran in parallel
    preview = write_preview(out, plan.class_keys, config.job.ipc)
    wall = time.perf_counter() - started
    manifest = build_manifest(plan, written, sampled, sampling_seconds, wall, preview is not None)
    manifest["run"].update(world_size=ctx.world_size, ranks=gathered, batch_size=batch_size)
    write_json_atomic(os.path.join(out, MANIFEST_NAME), manifest)
    barrier(ctx)
    shutdown(ctx)
    return manifest


def _profile_window(config: DistillConfig, plan: Plan):
    """The validated CUDA-profiler window (--profile-steps or $IGDS_PROFILE_STEPS), or None."""
    num_steps = DiffusionSchedule(ScheduleConfig(**plan.pixel_settings["diffusion"])).num_steps
    profile_steps = config.run.profile_steps
    source = "--profile-steps" if profile_steps is not None else PROFILE_STEPS_ENV
    return resolve_step_window(profile_steps, num_steps, source)


__all__ = ["distill"]
