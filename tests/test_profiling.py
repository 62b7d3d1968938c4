"""The profiling and benchmark tooling runs on CPU, so it cannot rot between GPU sessions.

bench/sampler.py and profiling/torch_trace.py run in-process on the tiny preset (compile skipped or
through aot_eager: a cold inductor compile costs minutes on 2 cores); the shell scripts are
syntax-checked (bench/gpu_check.sh itself: tests/test_gpu_check.py).
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from igds_fast.profiling import nvtx_range
from igds_fast.profiling.pytest_gpu_select import is_gpu_test

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_script(relative_path: str, name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, relative_path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    """bench/sampler.py, the command line, loaded as `python bench/sampler.py` runs it."""
    return load_script("bench/sampler.py", "igds_bench_sampler_under_test")


def bench_part(name: str):
    """bench/<name>.py, imported as the bench scripts import it (bench/ is a package of the checkout's root)."""
    if REPO not in sys.path:
        sys.path.insert(0, REPO)
    return importlib.import_module(f"bench.{name}")


def test_bench_kernels_keeps_the_table_when_a_case_fails(monkeypatch):
    kernels_bench = load_script("bench/kernels.py", "igds_bench_kernels_under_test")
    table, failures = kernels_bench.run(only="predict_x0|preprocess forward")
    assert failures == 0
    rows = [line for line in table.splitlines() if line.startswith("| predict_x0") or line.startswith("| preprocess")]
    assert len(rows) == 2 and all("FAILED" not in row and row.count("|") == 11 for row in rows)
    original = kernels_bench.all_cases

    def with_a_broken_check():
        cases = original()
        broken = next(c for c in cases if c.name == "predict_x0")

        def check():
            raise AssertionError("planted mismatch")

        broken.check = check
        return cases

    monkeypatch.setattr(kernels_bench, "all_cases", with_a_broken_check)
    table, failures = kernels_bench.run(only="predict_x0|preprocess forward")
    assert failures == 1
    assert "| predict_x0 |" in table and "FAILED: AssertionError: planted mismatch" in table
    assert "x |" in next(line for line in table.splitlines() if line.startswith("| preprocess forward"))
    with pytest.raises(SystemExit, match="no case matches"):
        kernels_bench.run(only="no-such-kernel")


FAKE_NCU = """#!/usr/bin/env bash
# Stand-in for Nsight Compute: logs its arguments, writes the report file, runs the profiled command.
echo "$*" >> "$NCU_LOG"
if [[ "$1" == "--import" ]]; then echo '"ID","Kernel Name"'; exit 0; fi
while [[ "$1" != "--export" ]]; do shift; done
touch "$2.ncu-rep"; shift 2
exec "$@"
"""


def test_ncu_script_profiles_every_kernel_in_its_own_pass(tmp_path):
    fake = tmp_path / "bin" / "ncu"
    fake.parent.mkdir()
    fake.write_text(FAKE_NCU)
    fake.chmod(0o755)
    log = tmp_path / "ncu.log"
    env = {**os.environ, "PATH": f"{fake.parent}:{os.environ['PATH']}", "NCU_LOG": str(log),
           "PYTHON": sys.executable, "TRITON_INTERPRET": "1", "PYTHONPATH": REPO}
    result = subprocess.run(["bash", "profiling/ncu.sh", str(tmp_path / "rep")], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    passes = [line for line in log.read_text().splitlines() if not line.startswith("--import")]
    kernels = [line.split("--kernel-name regex:^")[1].split("$")[0] for line in passes]
    assert sorted(kernels) == sorted([
        "_predict_x0_kernel", "_ddpm_update_kernel", "_philox_normal_kernel", "_head_phase1_kernel",
        "_head_rows_kernel", "_head_grad_kernel", "_preprocess_fwd_kernel", "_preprocess_bwd_kernel"])
    assert all("--clock-control none" in line and "--launch-count 2" in line for line in passes)
    # every pass's bench selection matched at least one case (bench/kernels.py exits non-zero otherwise)
    assert len(list(tmp_path.glob("rep_*.ncu-rep"))) == 8 and len(list(tmp_path.glob("rep_*.csv"))) == 8


FAKE_NSYS = """#!/usr/bin/env bash
# Stand-in for Nsight Systems: logs its arguments; `profile` writes the report and runs the command.
echo "$*" >> "$NSYS_LOG"
[[ "$1" == "profile" ]] || exit 0
shift
while [[ "$1" == --* ]]; do
  [[ "$1" == --output=* ]] && touch "${1#--output=}.nsys-rep"
  shift
done
exec "$@"
"""


def test_nsys_script_profiles_the_command_after_the_separator(tmp_path):
    # `bash profiling/nsys.sh NAME -- igds-fast distill ...` with IGDS_PROFILE_STEPS: the command runs
    # under nsys's cudaProfilerApi capture range with the variable set; without a window it warns.
    fake = tmp_path / "bin" / "nsys"
    fake.parent.mkdir()
    fake.write_text(FAKE_NSYS)
    fake.chmod(0o755)
    log = tmp_path / "nsys.log"
    command = [sys.executable, "-c", "import os; print('window', os.environ.get('IGDS_PROFILE_STEPS'))"]
    env = {**os.environ, "PATH": f"{fake.parent}:{os.environ['PATH']}", "NSYS_LOG": str(log)}
    env.pop("IGDS_PROFILE_STEPS", None)
    result = subprocess.run(["bash", "profiling/nsys.sh", str(tmp_path / "run"), "--", *command], cwd=REPO,
                            env={**env, "IGDS_PROFILE_STEPS": "20:30"}, capture_output=True, text=True, timeout=60,
                            check=False)
    assert result.returncode == 0, result.stderr
    assert "window 20:30" in result.stdout and "nothing will be captured" not in result.stderr
    profile = log.read_text().splitlines()[0]
    assert "--capture-range=cudaProfilerApi" in profile and profile.endswith(" ".join(command))
    result = subprocess.run(["bash", "profiling/nsys.sh", str(tmp_path / "bare"), "--", *command], cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0 and "nothing will be captured" in result.stderr
    result = subprocess.run(["bash", "profiling/nsys.sh", str(tmp_path / "flag"), "--", *command, "--profile-steps",
                             "1:2"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert "nothing will be captured" not in result.stderr


def test_nvtx_range_shows_in_torch_profiler_and_is_silent_otherwise():
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        with nvtx_range("igds/test-range"):
            torch.ones(4).add_(1)
    names = {event.name for event in profiler.events()}
    assert "igds/test-range" in names
    with nvtx_range("igds/outside"):  # no profiler, no CUDA: a plain no-op block
        value = torch.ones(2).sum().item()
    assert value == 2.0


def test_bench_sampler_tiny_run_reports_every_column(bench, tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "RESULTS", str(tmp_path / "RESULTS.md"))
    out = tmp_path / "rows.json"
    options = json.dumps({"backend": "aot_eager", "dtype": "fp32", "channels_last": False})
    argv = [
        "--presets", "tiny", "--batch-sizes", "2", "--warmup", "1", "--steps", "1", "--compile-options", options,
        "--check-fidelity", "--fidelity-steps", "2", "--json", str(out), "--append-results",
    ]
    assert bench.main(argv) == 0
    found = json.loads(out.read_text())
    variants = {row["variant"]: row for row in found["rows"]}
    # no graphs without CUDA; the peers (guided-diffusion's own loop) where guided-diffusion-sdk imports
    peers = {"gd-fp32", "gd-fp16"} if importlib.util.find_spec("guided_diffusion") else set()
    assert set(variants) == {"eager-fp32", "eager-bf16", "compiled"} | peers
    for row in variants.values():
        assert row["ms_per_step"] > 0 and row["tflops"] > 0
        assert row["s_per_image"] == pytest.approx(row["ms_per_step"] / 1e3 * 250 / 2)
    assert variants["eager-fp32"]["vs_eager_fp32"] == pytest.approx(1.0)
    assert variants["compiled"]["overhead_kind"] == "compile" and variants["compiled"]["overhead_s"] >= 0
    check = found["fidelity"][0]
    assert check["x_rel"] < 1e-4 and check["unet_rel"] < 1e-4  # fp32 compiled vs eager
    report = (tmp_path / "RESULTS.md").read_text()
    assert "python bench/sampler.py --presets tiny" in report and "torch " in report
    assert "open (not measured here)" in report  # the GPU targets stay open on CPU


def test_bench_sampler_saves_every_row_as_it_comes_and_a_failing_variant_is_its_error_row(bench, tmp_path,
                                                                                          monkeypatch):
    # bench/gpu_check.sh kills a part at its time limit: every finished row must already be on disk.
    writes = []
    original = bench.write_atomic

    def recording_write(path, text):
        original(path, text)
        if path.endswith(".json"):
            writes.append([row["variant"] for row in json.loads(text)["rows"]])

    monkeypatch.setattr(bench, "write_atomic", recording_write)
    out, report = tmp_path / "rows.json", tmp_path / "report.md"
    argv = ["--presets", "tiny", "--batch-sizes", "2", "--warmup", "1", "--steps", "1", "--same-math-rounds", "0",
            "--variants", "eager-fp32,compiled,eager-half", "--compile-options", '{"dtype": "int8"}',
            "--json", str(out), "--report", str(report)]
    assert bench.main(argv) == 0
    assert writes[:3] == [["eager-fp32"], ["eager-fp32", "compiled"], ["eager-fp32", "compiled", "eager-bf16"]]
    rows = json.loads(out.read_text())["rows"]
    assert rows[1]["error"].startswith("IGDSInputError: compile dtype must be one of") and "ms_per_step" not in rows[1]
    assert "ms_per_step" in rows[0] and "ms_per_step" in rows[2]
    assert "| tiny | compiled | 2 | IGDSInputError: compile dtype" in report.read_text()
    assert not list(tmp_path.glob("*.tmp*"))  # written through a temporary file, renamed over the target
    assert bench.overhead_kind("graphs", True) == "compile+capture" and bench.overhead_kind("graphs", False) == "capture"
    assert bench.overhead_kind("compiled", True) == "compile" and bench.overhead_kind("compiled", False) is None


def test_bench_flop_counts_match_the_issue():
    flops = bench_part("models").flops_per_image_step("adm256")
    assert flops["unet"] / 1e12 == pytest.approx(2.24, rel=0.01)  # the issue's 2.24 TFLOP per image-step
    assert 14e9 < flops["encoder"] < 18e9  # ResNet-50 forward + input backward at 224^2: ~16 GFLOP


def test_bench_latent_flop_counts_match_dit_and_the_issue():
    # DiT-XL/2 at 256 px: 118.6 GMAC per forward (DiT's paper, Table 4, its "Gflops" are multiply-adds),
    # twice that under classifier-free guidance; SD's VAE decoder ~311 GMAC per 256 px image forward and
    # about as much for its input-gradient backward; every part counted = its forward-hook formula.
    pytest.importorskip("diffusers")
    models, model_stats = bench_part("models"), bench_part("model_stats")
    stats = model_stats.latent_step_stats(models.DIT_PRESETS["dit-xl2-256"], model_stats.sd_vae_config(256))
    parts = stats["parts"]
    assert parts["dit"]["flops"] / 2e9 == pytest.approx(118.6, rel=0.01)
    assert parts["cfg_dit"]["flops"] == 2 * parts["dit"]["flops"]
    assert parts["decoder_forward"]["flops"] / 2e9 == pytest.approx(311, rel=0.01)
    assert parts["decoder_backward"]["flops"] == pytest.approx(parts["decoder_forward"]["flops"], rel=0.01)
    assert parts["encoder_backward"]["flops"] == parts["encoder_forward"]["flops"]  # ResNet-50 at 224: conv only
    for name, part in parts.items():
        assert part["flops"] == sum(part["formula"].values()), name
    assert round(stats["params"] / 1e6, 1) == 674.8 and stats["frozen_params"] == 256 * 1152  # pos_embed apart
    assert 0.70 < stats["decoder_share"] < 0.73
    flops = models.latent_flops_per_image_step("dit-xl2-256")
    assert flops["total"] == stats["guided"] == flops["unet"] + flops["decoder"] + flops["encoder"]
    assert flops["unguided"] == flops["unet"] == parts["cfg_dit"]["flops"]


def test_bench_sampler_dit_tiny_run_reports_guided_and_unguided_rows(bench, tmp_path, monkeypatch):
    pytest.importorskip("diffusers")
    monkeypatch.setattr(bench, "RESULTS", str(tmp_path / "RESULTS.md"))
    out = tmp_path / "rows.json"
    options = json.dumps({"backend": "aot_eager", "dtype": "fp32", "channels_last": False})
    argv = [
        "--presets", "dit-tiny", "--batch-sizes", "2", "--warmup", "1", "--steps", "1", "--compile-options", options,
        "--check-fidelity", "--fidelity-steps", "2", "--json", str(out), "--append-results",
    ]
    assert bench.main(argv) == 0
    found = json.loads(out.read_text())
    rows = {(row["variant"], row["guidance"]): row for row in found["rows"]}
    peers = ("minimax-b1", "minimax") if importlib.util.find_spec("guided_diffusion") else ()
    assert set(rows) == {(v, g) for v in ("eager-fp32", "eager-bf16", "compiled", *peers) for g in ("igds", "none")}
    for (variant, guidance), row in rows.items():
        assert "error" not in row, row
        assert row["ms_per_step"] > 0 and row["tflops"] > 0 and row["steps_per_image"] == 50
        assert row["batch"] == (1 if variant == "minimax-b1" else 2)
        assert row["s_per_image"] == pytest.approx(row["ms_per_step"] / 1e3 * 50 / row["batch"])
        if variant not in peers:  # the decoder is timed alone for our rows
            assert (row.get("decoder_ms", 0) > 0 and 0 < row["decoder_share"]) == (guidance == "igds")
    assert rows[("eager-fp32", "none")]["vs_eager_fp32"] == pytest.approx(1.0)
    guided, unguided = rows[("eager-fp32", "igds")], rows[("eager-fp32", "none")]
    assert guided["unguided_gflop"] == guided["unet_gflop"] < guided["unet_gflop"] + guided["decoder_gflop"]
    # TFLOP/s of each row from its own count: the unguided step is the CFG forward alone (batch 2)
    assert unguided["tflops"] == pytest.approx(unguided["unguided_gflop"] * 2 / unguided["ms_per_step"])
    total = guided["unet_gflop"] + guided["decoder_gflop"] + guided["encoder_gflop"]
    assert guided["tflops"] == pytest.approx(total * 2 / guided["ms_per_step"])
    check = found["fidelity"][0]
    assert check["x_rel"] < 1e-4 and check["unet_rel"] < 1e-4  # fp32 compiled vs eager
    report = (tmp_path / "RESULTS.md").read_text()
    assert "| dit-tiny | compiled | none | 2 |" in report and "s/image @50" in report
    assert "decoder share" in report and "| preset | variant | batch | ms/step" not in report  # no ADM table


def test_torch_trace_writes_a_chrome_trace_with_the_step_phases(tmp_path):
    script = load_script("profiling/torch_trace.py", "igds_torch_trace_under_test")
    out = tmp_path / "trace"
    argv = ["--preset", "tiny", "--backend", "compiled", "--compile-options",
            json.dumps({"compile": False, "dtype": "fp32", "channels_last": False}),
            "--warmup", "1", "--steps", "1", "--out", str(out)]
    assert script.main(argv) == 0
    trace = json.loads((out / "trace.json").read_text())
    names = {event.get("name") for event in trace["traceEvents"]}
    for phase in ("igds/unet", "igds/guidance", "igds/encoder/forward", "igds/head", "igds/encoder/backward",
                  "igds/update", "igds/compiled/step"):
        assert phase in names, phase
    assert any(str(name).startswith("igds/step/") for name in names)
    assert "Self CPU" in (out / "summary.txt").read_text()


@pytest.mark.parametrize("script", ["profiling/nsys.sh", "profiling/ncu.sh", "bench/gpu_check.sh"])
def test_shell_scripts_parse(script):
    subprocess.run(["bash", "-n", os.path.join(REPO, script)], check=True)


def test_gpu_selection_plugin_keeps_marked_and_cuda_skipif_tests():
    class Item:
        def __init__(self, marker=None, reasons=()):
            self.marker, self.reasons = marker, reasons

        def get_closest_marker(self, name):
            return self.marker if name == "gpu" else None

        def iter_markers(self, name):
            return [pytest.mark.skipif(True, reason=r).mark for r in self.reasons] if name == "skipif" else []

    assert is_gpu_test(Item(marker=pytest.mark.gpu.mark))
    assert is_gpu_test(Item(reasons=("needs a CUDA GPU with compiled Triton",)))
    assert not is_gpu_test(Item(reasons=("xformers is not installed",)))
    assert not is_gpu_test(Item())


def test_bench_self_check_measures_within_the_tolerance_table(capsys):
    # bench/self_check.py is what SELF_CHECK_TOLERANCES rests on: its rows at the tiny ADM and the
    # digits architecture (random weights, bf16 and fp32 copies) lie inside the table, and it gives
    # the table back untouched after lifting it.
    from igds_fast.sampling.compiled.self_check import PARTS, SELF_CHECK_TOLERANCES

    script = load_script("bench/self_check.py", "igds_bench_self_check_under_test")
    before = {dtype: dict(parts) for dtype, parts in SELF_CHECK_TOLERANCES.items()}
    args = script.parse_args(["--models", "tiny,digits", "--dtypes", "bf16,fp32", "--steps", "4"])
    rows = [script.measure(model, dtype, args) for model in ("tiny", "digits") for dtype in ("bf16", "fp32")]
    assert SELF_CHECK_TOLERANCES == before
    pixel_prior_parts = [part for part in PARTS if part != "decoder"]  # no decoder: a pixel prior
    for row in rows:
        assert [part for part in PARTS if part in row] == pixel_prior_parts, row
        for part in pixel_prior_parts:
            assert 0 <= row[part] <= SELF_CHECK_TOLERANCES[row["dtype"]][part], row
    assert rows[0]["unet"] > 1e-4 and rows[1]["unet"] < 1e-5  # bf16 really rounds; fp32 copies are exact


def test_compare_folders_reports_psnr_and_agreement(tmp_path, capsys):
    from PIL import Image

    from factories import tiny_ve

    compare = load_script("bench/compare_folders.py", "igds_bench_compare_folders_under_test")
    ve = tiny_ve(num_classes=2, channels=3, resolution=16)
    ve.class_names = ["a", "b"]
    ve.save(tmp_path / "ve.safetensors")
    for folder, shift in (("ref", 0), ("cand", 3)):
        images = []
        for name in ("a", "b"):
            (tmp_path / folder / name).mkdir(parents=True)
            pixels = torch.randint(10, 240, (16, 16, 3), generator=torch.Generator().manual_seed(ord(name)))
            Image.fromarray((pixels + shift).to(torch.uint8).numpy()).save(tmp_path / folder / name / "00000.png")
            images.append({"path": f"{name}/00000.png"})
        (tmp_path / folder / "manifest.json").write_text(json.dumps({"images": images}))
    assert compare.main(["--reference", str(tmp_path / "ref"), "--candidate", str(tmp_path / "cand"),
                         "--ve", str(tmp_path / "ve.safetensors")]) == 0
    out = capsys.readouterr().out
    # Every pixel off by 3 levels: an RMS difference of 6/255 in [-1, 1], PSNR 10 log10(4 / (6/255)^2).
    expected = 10 * math.log10(4 / (6 / 255) ** 2)
    assert "images 2; identical 0" in out and f"median {expected:.1f}" in out and "agreement" in out
