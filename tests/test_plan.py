"""The cost of a run before it starts (issue 28, item 4): `distill --plan`, the same lines at every run's
start, and the training volume `calibrate-beta` and `eval` print (igds_fast/distill/cost.py,
igds_fast/training_cost.py)."""
import json
import math
import os
import re

import pytest
import torch

from factories import write_tiny_prior_and_ve
from igds_fast import throughput
from igds_fast.classes import imagenet_wnids
from igds_fast.cli import main
from igds_fast.models.resnet import resnet50
from igds_fast.preprocess import IMAGENET_MEAN, IMAGENET_STD, EncoderPreprocess
from igds_fast.ve import VariationalEstimator
from test_profiling import bench_part


def _total_flops(text: str) -> float:
    return float(re.search(r"total [\d.]+ \w+ \(([\d.e+]+) FLOP", text).group(1))


def _readme_imagenet_distill() -> list[str]:
    """The distill command of the README's "ImageNet-1K end to end" section, its arguments."""
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md"), encoding="utf-8").read()
    section = readme.split("## ImageNet-1K end to end", 1)[1].split("\n## ", 1)[0]
    command = re.search(r"igds-fast distill (--prior [^\n]*(?:\\\n[^\n]*)*)", section).group(1)
    command = command.split("#")[0].replace("\\\n", " ")
    return [word for word in command.split() if word != "--plan"]


@pytest.fixture(scope="module")
def imagenet_inputs(tmp_path_factory):
    """A random 1000-class ResNet-50 VE at 224 px (the recipe's) and a 'prior checkpoint' of 16 junk bytes:
    --plan reads the prior's preset, never its weights."""
    folder = tmp_path_factory.mktemp("in1k")
    names = imagenet_wnids()
    torch.manual_seed(0)
    encoder = resnet50(num_classes=None)
    dim = encoder.feature_dim
    ve = VariationalEstimator(encoder, torch.randn(len(names), dim) / math.sqrt(dim), torch.zeros(len(names)),
                              torch.log_softmax(torch.randn(len(names), dim), 1), 1.0,
                              EncoderPreprocess(224, IMAGENET_MEAN, IMAGENET_STD), names).eval()
    ve.save(folder / "ve_in1k.safetensors")
    (folder / "models").mkdir()
    (folder / "models" / "256x256_diffusion.pt").write_bytes(b"not a checkpoint")
    (folder / "beta_in1k.json").write_text(json.dumps({"beta_per_ipc": {"1": 0.0, "10": 0.1, "50": 1.0}}))
    return folder


def test_plan_of_the_readme_imagenet_command(imagenet_inputs, capsys, monkeypatch):
    """40,000 samples for IPC 10 with 2x2 composites, the total FLOPs within 1% of bench/model_stats'
    count, the disk bound, a time labelled as an estimate; nothing written, the prior never read."""
    monkeypatch.chdir(imagenet_inputs)
    argv = _readme_imagenet_distill()
    assert "--ipc" in argv and argv[argv.index("--ipc") + 1] == "10" and argv[argv.index("--composite") + 1] == "4"
    before = sorted(os.listdir(imagenet_inputs))
    # One timed CPU matmul for both plans below (the whole run and per rank): two timings differed by 1.7x
    # beside a parallel test worker, and the per-rank time is the whole run's / 8 at one rate.
    timed, real_peak = {}, throughput.device_peak

    def timed_once(device, dtype="fp32"):
        if (str(device), dtype) not in timed:
            timed[str(device), dtype] = real_peak(device, dtype)
        return timed[str(device), dtype]

    monkeypatch.setattr(throughput, "device_peak", timed_once)
    assert main(["distill", *argv, "--plan"]) == 0
    printed = capsys.readouterr().out
    assert sorted(os.listdir(imagenet_inputs)) == before  # no output folder, no lock, no temp file
    assert "1,000 classes x 10 images = 10,000 images (4 samples per image: 2x2 composites) = 40,000 samples x " \
           "250 steps (250 guided)" in printed

    # bench/model_stats.py's count of one adm256-cond forward; bench/models.py's of the VE's ResNet-50 forward
    # and input-gradient backward at 224 px: 250 guided steps of both per sample, 40,000 samples.
    unet = bench_part("model_stats").preset_stats("adm256-cond")["flops"]
    encoder = bench_part("models").flops_per_image_step("adm256")["encoder"]
    expected = 40_000 * 250 * (unet + encoder)
    assert _total_flops(printed) == pytest.approx(expected, rel=0.01)
    assert 22.4e18 < _total_flops(printed) < 22.8e18  # the issue's ~22.6 EFLOP
    # Each part too (the guidance is 0.7% of the total: a plan without it would pass the total's 1%).
    assert f"adm256-cond: {unet / 1e12:.2f} TFLOP per forward" in printed
    guidance = float(re.search(r"VE resnet50 at 224 px: ([\d.]+) GFLOP per guided step", printed).group(1)) * 1e9
    assert guidance == pytest.approx(encoder + 4 * 2048 * 1000, rel=1e-3)

    png = 3 * 256 * 256 + 256 + 1024  # the bound of one 256 px PNG
    disk = re.search(r"disk at most ([\d.]+) GiB", printed)
    assert disk and float(disk.group(1)) == pytest.approx(10_000 * png / 2**30 + 0.04, abs=0.06)
    time_line = next(line for line in printed.splitlines() if " time on " in line)
    assert "time on cpu: ~" in time_line and "estimate: the counted FLOPs at 50% of" in time_line

    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("RANK", "0")
    assert main(["distill", *argv, "--plan"]) == 0
    per_rank = capsys.readouterr().out
    assert "per rank (8 ranks: ~5,000 samples" in per_rank
    seconds = [re.search(r"time on cpu: ~([\d,.]+) days", text).group(1).replace(",", "") for text in (printed, per_rank)]
    assert float(seconds[1]) == pytest.approx(float(seconds[0]) / 8, rel=0.01) and len(timed) == 1
    monkeypatch.setenv("RANK", "3")
    assert main(["distill", *argv, "--plan"]) == 0
    assert capsys.readouterr().out == ""  # one rank prints


def test_every_run_logs_the_plan_and_a_finished_run_times_the_next(tmp_path, capsys):
    prior, ve = write_tiny_prior_and_ve(tmp_path)
    common = ["distill", "--prior", prior, "--ve", ve, "--ipc", "2", "--steps", "3", "--seed", "0", "--device", "cpu",
              "--quiet"]
    first = tmp_path / "first"
    assert main([*common, "--out", str(first), "--plan"]) == 0
    planned = capsys.readouterr().out.splitlines()
    assert not first.exists()
    assert planned[0] == "distill: plan: 2 classes x 2 images = 4 images = 4 samples x 3 steps (3 guided)"
    assert main([*common, "--out", str(first)]) == 0
    logged = [line for line in capsys.readouterr().err.splitlines() if line.startswith("distill: plan:")]
    assert logged[:3] == planned[:3]  # counts, FLOPs per sample, total: the same lines at the run's start
    assert any(" time on cpu: " in line for line in logged)

    # A finished folder of the same models and loop on this device gives the measured rate.
    assert main([*common, "--out", str(tmp_path / "second"), "--timing-from", str(first), "--plan"]) == 0
    time_line = capsys.readouterr().out.splitlines()[-1]
    assert "(measured: " in time_line and "ms per sample-step per rank on cpu" in time_line and "~" not in time_line
    manifest = json.loads((first / "manifest.json").read_text())
    seconds = manifest["run"]["sampling_time_s"]
    shown = float(re.search(r"time on cpu: ([\d.]+) s", time_line).group(1))
    assert shown == pytest.approx(seconds * 4 / manifest["run"]["samples_generated"], abs=0.06)
    # A different loop (other step count) is not the same rate: back to the estimate.
    four_steps = [word if word != "3" else "4" for word in common]
    assert main([*four_steps, "--out", str(tmp_path / "third"), "--timing-from", str(first), "--plan"]) == 0
    assert "estimate: the counted FLOPs" in capsys.readouterr().out
    # A one-step loop has no step-1 variance to clip step 0's to: refused in one line, nothing made.
    one_step = [word if word != "3" else "1" for word in common]
    assert main([*one_step, "--out", str(tmp_path / "fifth")]) == 2
    assert "a sampling loop needs at least 2 steps, got 1" in capsys.readouterr().err
    assert not (tmp_path / "fifth").exists()
    # --timing-from must name a finished distill folder, in one line before any work.
    assert main([*common, "--out", str(tmp_path / "fourth"), "--timing-from", str(tmp_path), "--plan"]) == 2
    assert "holds no manifest.json" in capsys.readouterr().err


def test_training_volume_of_eval_and_calibrate():
    from igds_fast.evaluate.protocol import igds_epochs
    from igds_fast.training_cost import TRAIN_FACTOR, calibrate_volume_lines, network_forward_flops, volume_lines

    forward = network_forward_flops("convnet3", 3, 1000, 32, 8)
    assert forward > 0
    lines = volume_lines("eval: plan:", [(3, 2000, 10_000)], forward, 3, 50_000, "cpu", "convnet3")
    assert lines[0] == "eval: plan: 3 network(s): 3 x 2,000 epochs x 10,000 images = 60,000,000 image-passes of training"
    from igds_fast.throughput import format_flops

    assert f"{format_flops(60_000_000 * TRAIN_FACTOR * forward)} training" in lines[1]

    class Calibration:
        betas, seeds, epochs, ipcs, network, width = [0.0, 1.0], 2, None, [1, 10], "convnet3", 8

    lines = calibrate_volume_lines(Calibration, 1000, 3, 32, 5000, 1000, 7, "cpu")
    assert lines[0] == (f"calibrate-beta: plan: 8 network(s): 4 x {igds_epochs(1):,} epochs x 1,000 images + 4 x "
                        f"{igds_epochs(10):,} epochs x 10,000 images = "
                        f"{4 * igds_epochs(1) * 1000 + 4 * igds_epochs(10) * 10_000:,} image-passes of training")
    assert "+ 35.00 kFLOP scoring (5,000 VE forwards)" in lines[1]


def test_plan_of_an_s3_run_counts_its_candidates_and_writes_nothing(tmp_path, capsys):
    from igds_fast.imageio import save_png_atomic
    from igds_fast.models.flops import resnet_forward_flops

    prior, ve = write_tiny_prior_and_ve(tmp_path)
    generator = torch.Generator().manual_seed(3)
    for name in ("cat", "dog"):
        os.makedirs(tmp_path / "real" / name)
        for index in range(3):
            save_png_atomic(tmp_path / "real" / name / f"{index}.png", torch.rand(3, 16, 16, generator=generator) * 2 - 1)
    before = sorted(os.listdir(tmp_path))
    argv = ["distill", "--prior", prior, "--ve", ve, "--ipc", "2", "--steps", "3", "--device", "cpu", "--quiet",
            "--select", "s3", "--groups", "3", "--real", str(tmp_path / "real"), "--out", str(tmp_path / "out")]
    assert main([*argv, "--plan"]) == 0
    printed = capsys.readouterr().out
    assert sorted(os.listdir(tmp_path)) == before
    assert "S3 candidates (G x IPC per class): 2 classes x 6 images = 12 images = 12 samples x 3 steps" in printed
    per_sample = float(re.search(r"\((\S+) FLOP, multiply-add", printed).group(1))
    # total = 12 samples x per-sample work + one VE-trunk forward per candidate and per real image (6).
    per_image = resnet_forward_flops("resnet18", 3, 16, (3, 16, 16))
    sample = float(re.search(r"per sample ([\d.]+) (\w)FLOP", printed).group(1))
    assert per_sample == pytest.approx(12 * sample * {"M": 1e6, "G": 1e9}[re.search(r"per sample [\d.]+ (\w)FLOP",
                                                                               printed).group(1)]
                                       + (12 + 6) * per_image, rel=0.01)
    assert "candidate features" in printed and "output PNGs" in printed


def test_plan_of_a_latent_prior_counts_the_cfg_dit_the_decoder_and_the_guidance(tmp_path, capsys):
    """A DiT under classifier-free guidance + a VAE decoder: the plan's total equals bench/model_stats'
    latent_step_stats parts (CFG DiT each step; decoder forward + input gradient, encoder forward + input
    gradient and the head each guided step; one final decode) on the same shapes."""
    import argparse

    pytest.importorskip("diffusers")
    from factories import tiny_dit, tiny_vae, tiny_ve
    from igds_fast.classes import class_list

    woof = class_list("imagewoof")
    torch.manual_seed(0)
    dit = tiny_dit(**{name: DIT_FLAGS[name] for name in ("input_size", "depth", "hidden_size", "num_heads",
                                                         "num_classes")})
    torch.save({"model": dit.state_dict(), "ema": dit.state_dict(), "opt": {},
                "args": argparse.Namespace(model="DiT-S/2", image_size=64)}, tmp_path / "dit.pt")
    vae = tiny_vae()
    vae.save_pretrained(tmp_path / "vae")
    ve = tiny_ve(num_classes=len(woof), channels=3, resolution=16)
    ve.class_names = list(woof)
    ve.save(tmp_path / "ve.safetensors")
    argv = ["distill", "--prior", str(tmp_path / "dit.pt"), "--prior-kind", "dit", "--vae", str(tmp_path / "vae"),
            "--ve", str(tmp_path / "ve.safetensors"), "--classes", ",".join(woof[:2]), "--ipc", "3", "--steps", "4",
            "--cfg-scale", "3", "--out", str(tmp_path / "out"), "--device", "cpu", "--quiet", "--plan"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "2 classes x 3 images = 6 images = 6 samples x 4 steps (4 guided)" in printed
    stats = bench_part("model_stats").latent_step_stats(
        DIT_FLAGS, dict(vae.config), ve_arch="resnet18",
        cfg_scale=3.0, ve_resolution=16)
    parts = {name: part["flops"] for name, part in stats["parts"].items()}
    per_sample = (4 * parts["cfg_dit"] + 4 * (parts["decoder_forward"] + parts["decoder_backward"]
                                              + parts["encoder_forward"] + parts["encoder_backward"]
                                              + 4 * ve.feature_dim * len(woof))
                  + parts["decoder_forward"])
    assert _total_flops(printed) == pytest.approx(6 * per_sample, rel=1e-3)
    assert "decoder (forward + input gradient per guided step, one final decode)" in printed


DIT_FLAGS = {"input_size": 8, "patch_size": 2, "in_channels": 4, "hidden_size": 384, "depth": 2, "num_heads": 6,
             "num_classes": 1000, "learn_sigma": True}  # tiny_dit's architecture
