"""`igds-fast distill --sampler ddim`: every backend, the folder's record, resume after SIGKILL, refusals.

(1 vs 2 torchrun ranks: tests/test_distill_torchrun.py.)
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from test_distill import _distill_args, _parse, file_states, listing, make_config, models, png_pixels  # noqa: F401
from igds_fast.cli.distill import run as run_distill
from igds_fast.distill import distill
from igds_fast.distill.folder import CONFIG_NAME
from igds_fast.errors import IGDSInputError

pytestmark = pytest.mark.usefixtures("one_thread")

DDIM = ["--sampler", "ddim", "--eta", "0.5"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def pixels(folder):
    return {name: png_pixels(os.path.join(folder, name)).astype(np.int16)
            for name in listing(folder) if name.endswith(".png") and name != "preview.png"}


def test_ddim_runs_on_every_backend(models, tmp_path):
    # The same DDIM run (eta 0.5: Philox noise keyed by (seed, i)) on the eager reference, the fused kernels
    # and the compiled step (fp32 copies; CUDA graphs are GPU-only): the images agree within a uint8 level.
    common = ["--prior", models["prior"], "--ve", models["ve"], "--ipc", "2", "--composite", "1", "--steps", "5",
              "--seed", "2", "--scale", "2", "--beta", "0.5", "--device", "cpu", "--quiet", "--noise", "philox", *DDIM]
    backends = {"eager": [], "fused": ["--backend", "fused"],
                "compiled": ["--backend", "compiled", "--compile-options",
                             json.dumps({"dtype": "fp32", "compile": False, "channels_last": False})]}
    found = {}
    for name, flags in backends.items():
        out = tmp_path / name
        args = [*common, *flags, "--out", str(out)]
        if name != "eager":
            args.remove("--noise"), args.remove("philox")  # the kernels' default
        assert run_distill(_parse(args)) == 0
        found[name] = pixels(out)
        settings = json.loads((out / CONFIG_NAME).read_text())
        assert settings["sampler"] == "ddim" and settings["eta"] == 0.5 and settings["noise"] == "philox"
    for name in ("fused", "compiled"):
        assert found[name].keys() == found["eager"].keys() and len(found[name]) == 8
        worst = max(int(np.abs(found[name][key] - found["eager"][key]).max()) for key in found[name])
        assert worst <= 1, (name, worst)


def test_the_folder_records_ddim_only_and_refuses_another_sampler(models, tmp_path):
    ddpm = tmp_path / "ddpm"
    distill(make_config(models, ddpm, composite=1, ipc=1))
    saved = json.loads((ddpm / CONFIG_NAME).read_text())
    assert "sampler" not in saved and "eta" not in saved  # DDPM folders keep the record they always had
    for overrides, setting in [({"sampler": "ddim"}, "sampler")]:
        with pytest.raises(IGDSInputError, match=rf"another configuration: {setting} \(folder: .*--force") as info:
            distill(make_config(models, ddpm, composite=1, ipc=1, **overrides))
        assert "\n" not in str(info.value)
    ddim = tmp_path / "ddim"
    manifest = distill(make_config(models, ddim, composite=1, ipc=1, sampler="ddim"))
    assert manifest["settings"]["sampler"] == {"steps": 6, "sampler": "ddim", "eta": None}
    saved = json.loads((ddim / CONFIG_NAME).read_text())
    assert saved["sampler"] == "ddim" and saved["eta"] == 0.0  # the resolved default
    with pytest.raises(IGDSInputError, match=r"another configuration: eta \(folder: 0.0, now: 0.5\)"):
        distill(make_config(models, ddim, composite=1, ipc=1, sampler="ddim", eta=0.5))
    distill(make_config(models, ddim, composite=1, ipc=1, sampler="ddim", eta=0.0))  # eta 0 given = the default


def test_ddim_flags_are_refused_in_one_line(models, tmp_path):
    out = str(tmp_path / "never")
    base = ["--prior", models["prior"], "--ve", models["ve"], "--out", out, "--ipc", "1", "--steps", "4"]
    for argv, message in [(base + ["--eta", "0.5"], "--eta applies to --sampler ddim only"),
                          (base + ["--sampler", "ddpm", "--eta", "0"], "--eta applies to --sampler ddim only"),
                          (base + ["--sampler", "ddim", "--eta", "1.5"], r"eta must be a number in \[0, 1\]"),
                          (base + ["--sampler", "plms"], "invalid choice: 'plms'"),
                          (base + ["--use_ddim", "True"], "--use_ddim is guided-diffusion's flag; igds-fast distill "
                                                          "takes --sampler ddim")]:
        with pytest.raises(IGDSInputError, match=message) as info:
            args = _parse(argv)
            args.handler(args)
        assert "\n" not in str(info.value), argv
    assert not os.path.exists(out)


def test_a_ddim_folder_resumes_byte_identically_after_sigkill(models, tmp_path):
    reference = tmp_path / "reference"
    assert run_distill(_parse(_distill_args(models, reference) + DDIM)) == 0
    total = 4 * 4
    interrupted = tmp_path / "interrupted"
    command = [sys.executable, "-m", "igds_fast", "distill", *_distill_args(models, interrupted), *DDIM]
    process = subprocess.Popen(command, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while len(file_states(interrupted)) < 2 and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.01)
    time.sleep(random.uniform(0.0, 0.3))  # a random moment: mid-batch, mid-write or between batches
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert 2 <= len(file_states(interrupted)) < total
    subprocess.run(command, env=ENV, check=True, capture_output=True, timeout=300)
    assert [n for _, _, names in os.walk(interrupted) for n in names if n.endswith(".tmp")] == []
    assert listing(interrupted) == listing(reference)
    ddpm = tmp_path / "ddpm"
    assert run_distill(_parse(_distill_args(models, ddpm))) == 0
    assert listing(ddpm) != listing(reference)  # DDIM really sampled other images


def test_a_guided_first_ddim_step_on_a_cosine_prior_is_noted(tmp_path):
    # DDIM's score shift multiplies the guidance by (1 - abar) sqrt(abar_prev) / sqrt(abar) - ...: ~3.5e3 at the
    # first of 10 cosine steps (abar 2.4e-9), where DDPM's mean shift is <= 1x; distill says so, once, in one line.
    from factories import tiny_ve
    from igds_fast.diffusion import DiffusionSchedule, ScheduleConfig
    from igds_fast.distill import distill_config
    from igds_fast.distill.plan import plan_distill
    from igds_fast.distill.run import _ddim_first_step_note
    from igds_fast.presets.digits import CLASS_NAMES, SHIPPED_PRIOR

    cosine = DiffusionSchedule(ScheduleConfig("cosine", 1000, "10"))
    factor = cosine.ddim_guidance_factor(cosine.ddim(0.0))
    assert 3000 < float(factor[-1]) < 4000 and float(factor[:-1].abs().max()) < 1.5 and float(factor[0]) < 1e-4
    linear = DiffusionSchedule(ScheduleConfig("linear", 1000, "250"))
    assert float(linear.ddim_guidance_factor(linear.ddim(0.0)).max()) < 0.1
    ve = tiny_ve(num_classes=10, channels=1, resolution=16)
    ve.class_names = list(CLASS_NAMES)
    ve.save(tmp_path / "ve.safetensors")

    def note(**settings):
        config = distill_config(str(tmp_path / "ve.safetensors"), str(tmp_path / "out"), 1, prior=SHIPPED_PRIOR,
                                steps=10, device="cpu", **settings)
        return _ddim_first_step_note(plan_distill(config))

    text = note(sampler="ddim")
    assert text is not None and "\n" not in text and "--guide-from-step 1" in text and "349" in text
    assert note(sampler="ddim", guide_from_step=1) is None
    assert note() is None and note(sampler="ddim", scale=0.0) is None
