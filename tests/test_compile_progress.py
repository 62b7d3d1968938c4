"""What the compiled backend says about a compile: the line before it, the heartbeat, the timed phases.

A first compile of a large UNet takes minutes (igds_fast/sampling/compiled/announce.py); these tests
check the words and when they come, on CPU with the tiny ADM and aot_eager (seconds per compile).
"""
from __future__ import annotations

import io
import time

from factories import tiny_adm, tiny_ve
from igds_fast.diffusion import DiffusionSchedule, ScheduleConfig
from igds_fast.guidance import GuidanceConfig
from igds_fast.progress import log_line
from igds_fast.sampling import Sampler
from igds_fast.sampling.compiled.announce import (
    CompileProgress,
    compile_line,
    estimate_compile_seconds,
    inductor_cache_dir,
)

AOT_FP32 = dict(backend="aot_eager", dtype="fp32", channels_last=False, self_check=False)


def compiled_sampler(**options) -> Sampler:
    unet, ve = tiny_adm(image_size=16), tiny_ve(num_classes=4, resolution=16)
    schedule = DiffusionSchedule(ScheduleConfig(sampling_steps="3"))
    return Sampler(unet, schedule, ve, GuidanceConfig(scale=1.0), backend="compiled",
                   backend_options={**AOT_FP32, **options}, prior_class_map=[5, 7, 11, 13])


def test_the_line_before_a_compile_names_what_batch_mode_time_and_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "cache"))
    assert inductor_cache_dir() == str(tmp_path / "cache")
    default = estimate_compile_seconds(780, "inductor", "cuda", "default")
    tuned = estimate_compile_seconds(780, "inductor", "cuda", "max-autotune-no-cudagraphs")
    assert 30 < default < 300 and tuned > 4 * default  # minutes vs far longer
    line = compile_line(["the UNet (ADMUNet, 553.8M parameters, bf16)", "the encoder forward + input-gradient "
                         "backward (ResNet, 23.5M parameters, bf16)"], 32, " (chosen from free device memory)",
                        "inductor", "default", default, "cuda")
    assert line.startswith("compiled backend: compiling the UNet (ADMUNet, 553.8M parameters, bf16) and the encoder")
    assert "for batch 32 (chosen from free device memory) with torch.compile inductor, mode 'default': roughly 1m" in line
    assert f"inductor's cache ({tmp_path / 'cache'})" in line and "--compile-mode max-autotune-no-cudagraphs" in line
    assert "\n" not in line
    slow = compile_line(["the UNet"], 8, "", "inductor", "max-autotune-no-cudagraphs", tuned, "cuda")
    assert "mode 'max-autotune-no-cudagraphs': roughly" in slow and "--compile-mode" not in slow
    assert "cache" not in compile_line(["the UNet"], 8, "", "aot_eager", "default", 3.0, "cpu")  # no code generated


def test_the_heartbeat_runs_until_the_first_phase_ends():
    lines = []
    with CompileProgress(lines.append, estimate_s=90, heartbeat_s=0.02) as progress:
        time.sleep(0.3)
        progress.done("warm-up step 1 of 2 (the compile)")
        beats = len(lines) - 1
        time.sleep(0.2)
        progress.done("warm-up step 2 of 2")
    assert beats >= 2 and all(line.startswith("compiled backend: still compiling, ") for line in lines[:beats])
    assert lines[0].endswith("so far (roughly 1m30s expected)")
    assert lines[beats].startswith("compiled backend: warm-up step 1 of 2 (the compile): 0.")
    assert lines[beats + 1].startswith("compiled backend: warm-up step 2 of 2: 0.") and len(lines) == beats + 2


def test_a_log_line_clears_a_progress_bar_on_a_terminal_only():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    terminal, pipe = Terminal(), io.StringIO()
    log_line("compiled backend: compiling", terminal)
    log_line("compiled backend: compiling", pipe)
    assert terminal.getvalue() == "\r\x1b[Kcompiled backend: compiling\n"
    assert pipe.getvalue() == "compiled backend: compiling\n"


def test_a_step_that_compiles_says_so_once_per_batch_shape(capsys):
    sampler = compiled_sampler()
    step = sampler.stepper
    sampler.sample([0, 1], [1, 2])  # the default log: stderr
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("compiled backend: compiling the UNet (ADMUNet, ") and "for batch 2 with torch.compile " \
        "aot_eager: roughly" in err[0], err
    assert "the encoder forward + input-gradient backward (ResNet, " in err[0]
    assert err[-1].startswith("compiled backend: first step (the compile): "), err
    lines = []
    step.log = lines.append
    sampler.sample([2, 3], [3, 4])
    assert lines == []  # compiled for this batch shape already
    sampler.sample([0, 1, 2], [5, 6, 7])
    assert len(lines) >= 2 and "for batch 3 with" in lines[0] and lines[-1].startswith("compiled backend: first step")
    assert capsys.readouterr().err == ""


def test_compile_progress_off_is_silent():
    step = compiled_sampler(compile_progress=False).stepper
    notice = ("compiled backend: compiling the UNet", 1.0, [("unet", 2, 1)])
    with step._compiling(notice) as progress:
        assert progress is None
    assert ("unet", 2, 1) in step._compiled  # still recorded: no line for it later either
    assert compiled_sampler().stepper.compile_config.compile_progress is True
