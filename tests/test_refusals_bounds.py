"""Issue 26, "unbounded work": what a run's settings or a file's header imply is refused before it starts.

Each repro of the issue, made small: refused in one line (exit 2) within a second, before the job list,
a model or a tensor is built (timed, and tracemalloc's peak of Python allocations stays small); the
override (`--allow-large` / IGDS_ALLOW_LARGE=1) lets a run that really is that large through.
"""
from __future__ import annotations

import json
import os
import time
import tracemalloc
import zipfile

import pytest
import torch

from factories import write_tiny_prior_and_ve
from igds_fast import cli
from igds_fast.errors import IGDSInputError
from igds_fast.limits import ALLOW_LARGE_ENV, json_depth, loads_json, read_json

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def models(tmp_path, monkeypatch):
    monkeypatch.delenv(ALLOW_LARGE_ENV, raising=False)
    prior, ve = write_tiny_prior_and_ve(tmp_path)
    return {"prior": prior, "ve": ve, "dir": tmp_path}


def refused_quickly(capsys, argv, within=1.0, peak_mb=64) -> str:
    """Run `igds-fast ARGV`; it must exit 2 in one stderr line, within `within` s, allocating little."""
    tracemalloc.start()
    started = time.perf_counter()
    code = cli.main(argv)
    seconds = time.perf_counter() - started
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("igds-fast: error: "), err
    assert "Traceback" not in err
    assert seconds < within, f"refused after {seconds:.2f}s"
    assert peak < peak_mb * 2**20, f"{peak / 2**20:.0f} MiB allocated before the refusal"
    return lines[0]


def distill_argv(models, *extra, out=None):
    return ["distill", "--prior", models["prior"], "--ve", models["ve"], "--steps", "2", "--quiet", "--device", "cpu",
            "--out", str(out or models["dir"] / "out"), *extra]


def _warm(models, capsys):
    """One whole small run first: a process's first run imports and initialises what every run uses (torch's
    meta-device kernels take seconds), and the timed call is to measure the check, not that."""
    assert cli.main(distill_argv(models, "--ipc", "1", out=models["dir"] / "warm")) == 0
    capsys.readouterr()


def test_an_ipc_of_a_billion_is_refused_before_the_job_list(models, capsys):
    _warm(models, capsys)
    line = refused_quickly(capsys, distill_argv(models, "--ipc", "1000000000"))
    assert "--ipc 1,000,000,000 = 1,000,000,000 images per class, above the cap of 99,999" in line
    assert "--allow-large" in line and ALLOW_LARGE_ENV in line
    assert not (models["dir"] / "out").exists()


def test_a_million_s3_groups_are_refused_before_the_candidates(models, capsys):
    _warm(models, capsys)
    real = models["dir"] / "real"
    for name in ("cat", "dog"):
        (real / name).mkdir(parents=True)
    line = refused_quickly(capsys, distill_argv(models, "--ipc", "2", "--select", "s3", "--groups", "1000000",
                                                "--real", str(real)))
    assert "--ipc 2 x --groups 1,000,000 = 2,000,000 images per class" in line
    assert not os.path.exists(f"{models['dir'] / 'out'}.s3-candidates")


def test_too_many_samples_in_all_are_refused_and_allow_large_lets_a_large_run_plan(models, capsys, tmp_path):
    from igds_fast.distill import distill_config
    from igds_fast.distill.plan import plan_distill

    names = [f"c{k:03d}" for k in range(101)]
    (tmp_path / "many").mkdir()
    many = write_tiny_prior_and_ve(tmp_path / "many", names)
    _warm(models, capsys)
    line = refused_quickly(capsys, ["distill", "--prior", many[0], "--ve", many[1], "--ipc", "99999", "--steps", "2",
                                    "--out", str(tmp_path / "o"), "--device", "cpu"])
    assert "101 classes x 99,999 images x 1 sample(s) each = 10,099,899 samples, above the cap of 10,000,000" in line
    # The override: a run over the per-class cap plans (its job list is built) with --allow-large.
    config = distill_config(models["ve"], str(tmp_path / "o2"), 100_000, prior=models["prior"], steps=2, device="cpu")
    with pytest.raises(IGDSInputError, match="100,000 images per class, above the cap"):
        plan_distill(config)
    plan = plan_distill(distill_config(models["ve"], str(tmp_path / "o2"), 100_000, prior=models["prior"], steps=2,
                                       device="cpu", allow_large=True))
    assert len(plan.jobs) == 200_000


def _rewrite_header(path, key, change) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    header = json.loads(metadata[key])
    change(header)
    save_file(tensors, str(path), metadata={key: json.dumps(header)})


@pytest.mark.parametrize("field, value, expected", [
    ("image_size", 100000, "image_size 100000 is outside [1, 8192] (the image side of a real model)"),
    ("diffusion_steps", 10**9, "diffusion_steps 1000000000 is outside [2, 100000] (the diffusion steps of a real model)"),
    ("in_channels", 5000, "in_channels 5000 is outside [1, 64]"),
])
def test_an_absurd_prior_header_is_refused_before_a_model_is_built(models, capsys, field, value, expected):
    def change(header):
        (header["diffusion"] if field == "diffusion_steps" else header["flags"])[field] = value

    _warm(models, capsys)
    _rewrite_header(models["prior"], "igds_prior", change)
    line = refused_quickly(capsys, distill_argv(models, "--ipc", "1"))
    assert models["prior"] in line and expected in line


def test_a_prior_of_8192_channels_is_refused_by_its_declared_parameter_count(models, capsys):
    _warm(models, capsys)
    _rewrite_header(models["prior"], "igds_prior", lambda header: header["flags"].update(num_channels=8192))
    line = refused_quickly(capsys, distill_argv(models, "--ipc", "1"), within=2.0)
    assert "the prior declares" in line and "parameters, above the cap of 20,000,000,000" in line


def test_a_ve_resolution_of_100000_is_refused_at_load(models, capsys):
    _warm(models, capsys)
    _rewrite_header(models["ve"], "igds_ve", lambda header: header.update(resolution=100000))
    line = refused_quickly(capsys, distill_argv(models, "--ipc", "1"))
    assert "resolution 100000 is outside [1, 8192]" in line and models["ve"] in line


def test_what_does_not_fit_the_device_is_refused_with_its_numbers(models, capsys, monkeypatch):
    from igds_fast.distill import work

    _warm(models, capsys)
    monkeypatch.setattr(work, "device_memory_bytes", lambda device: 2**20)  # a 1 MiB device
    line = refused_quickly(capsys, distill_argv(models, "--ipc", "4", "--batch-size", "8"))
    assert "this run needs at least" in line and "a batch of 8 x max(3x16x16 sample, 3x16x16 VE input)" in line
    assert "but it has 1.0 MiB; lower --batch-size, or pass --allow-large" in line
    assert cli.main(distill_argv(models, "--ipc", "1", "--allow-large")) == 0
    assert len(list((models["dir"] / "out").rglob("0000*.png"))) == 2


def test_a_small_pt_that_inflates_to_a_large_tensor_is_refused_before_torch_reads_it(models, capsys, monkeypatch):
    """The 973 KB .pt declaring a 1 GB tensor, made small: 64 MiB of zeros, deflated to 65 KB."""
    plain, bomb = models["dir"] / "plain.pt", models["dir"] / "64x64_diffusion.pt"
    torch.save({"w": torch.zeros(16 * 2**20)}, plain)
    with zipfile.ZipFile(plain) as source, zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as target:
        for info in source.infolist():
            target.writestr(info.filename, source.read(info.filename))
    assert os.path.getsize(bomb) < 2**20
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load was called"))
    _warm(models, capsys)
    line = refused_quickly(capsys, ["distill", "--prior", str(bomb), "--arch", "adm64-cond", "--ve", models["ve"],
                                    "--ipc", "1", "--out", str(models["dir"] / "out"), "--device", "cpu"])
    assert "inflates to 64.0 MiB" in line and "torch.save never compresses" in line
    assert not (models["dir"] / "out").exists()


def test_a_beta_table_nested_100000_deep_is_one_line(models, capsys):
    _warm(models, capsys)
    deep = models["dir"] / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    line = refused_quickly(capsys, distill_argv(models, "--ipc", "1", "--beta-table", str(deep)))
    assert f"beta table {deep}: JSON nested more than 64 levels deep" in line
    # Deeper than the limit but within Python's recursion: refused by the depth check itself.
    deep.write_text('{"beta_per_ipc": {"1": 0.1}, "table": ' + "[" * 70 + "]" * 70 + "}")
    assert "nested more than 64 levels deep" in refused_quickly(capsys, distill_argv(models, "--ipc", "1", "--beta-table",
                                                                                     str(deep)))


def test_compile_options_are_parsed_with_the_same_limits(models, capsys):
    line = refused_quickly(capsys, distill_argv(models, "--ipc", "1", "--backend", "compiled", "--compile-options",
                                                '{"mode": ' + "[" * 5000 + "]" * 5000 + "}"), within=5.0)
    assert "--compile-options" in line and "nested more than 64 levels deep" in line


def test_the_json_reader_limits_size_and_depth_and_names_the_file(tmp_path):
    path = tmp_path / "m.json"
    path.write_text(json.dumps({"a": [1, 2, {"b": "[[[[[[[[[[ not nesting }"}]}))
    assert json_depth(path.read_text()) == 3  # brackets inside strings do not count
    assert read_json(path, "manifest")["a"][2]["b"].startswith("[[[")
    with pytest.raises(IGDSInputError, match=r"manifest .*m\.json: 48 bytes, more than the 10 bytes"):
        read_json(path, "manifest", max_bytes=10)
    with pytest.raises(IGDSInputError, match="nested more than 2 levels deep"):
        read_json(path, "manifest", max_depth=2)
    path.write_bytes(b'{"a": "\xff"}')
    with pytest.raises(IGDSInputError, match=r"is not UTF-8 text \(byte 7\)"):
        read_json(path, "manifest")
    with pytest.raises(IGDSInputError, match=r"not valid JSON \(Expecting value at line 1, column 1\)"):
        loads_json("", "x")
    with pytest.raises(IGDSInputError, match="manifest not found"):
        read_json(tmp_path / "none.json", "manifest")
    with pytest.raises(IGDSInputError, match="is a folder, not a JSON file"):
        read_json(tmp_path, "manifest")


def test_image_sizes_of_the_folder_commands_are_bounded(tmp_path, capsys):
    (tmp_path / "d").mkdir()
    line = refused_quickly(capsys, ["train-ve", "--data", str(tmp_path / "d"), "--out", str(tmp_path / "ve.safetensors"),
                                    "--image-size", "100000"], within=2.0)
    assert "--image-size 100000 is above 8192 pixels" in line


def test_the_folder_commands_refuse_what_cannot_fit_before_training(tmp_path, capsys, monkeypatch):
    """eval holds the distilled set, train-prior its folder: each counted from the scan, before any
    decoding or training; IGDS_ALLOW_LARGE=1 lets them through. (train-ve holds no [N, d] features any
    more: they go to disk, whose check tests/test_classifier_stage.py tests.)"""
    import numpy as np
    from PIL import Image

    import igds_fast.limits

    for name in ("cat", "dog"):
        (tmp_path / "d" / name).mkdir(parents=True)
        for index in range(3):
            Image.fromarray(np.full((8, 8, 3), index * 40, np.uint8)).save(tmp_path / "d" / name / f"{index}.png")
    data = str(tmp_path / "d")
    monkeypatch.setattr(igds_fast.limits, "device_memory_bytes", lambda device: 1024)  # a 1 KiB device
    for what, argv in {
        "holding the 6 distilled images of 3x8x8": ["eval", "--train", data, "--val", data, "--device", "cpu",
                                                    "--network", "convnet3"],
        "holding 6 images of 3x16x16": ["train-prior", "--data", data, "--out", str(tmp_path / "p.safetensors")],
    }.items():
        line = refused_quickly(capsys, argv)
        assert f"{what} needs" in line and "but cpu has 1.0 KiB" in line and ALLOW_LARGE_ENV in line, line
    monkeypatch.setattr("igds_fast.cli.eval.evaluate_distilled", lambda *a, **k: pytest.fail("trained") or {})
    monkeypatch.setenv(ALLOW_LARGE_ENV, "1")
    with pytest.raises(BaseException, match="trained"):
        cli.main(["eval", "--train", data, "--val", data, "--device", "cpu", "--quiet", "--network", "convnet3"])
    assert "eval: plan: 3 network(s)" in capsys.readouterr().err  # let through: its volume, then the training
    line = refused_quickly(capsys, ["train-prior", "--data", data, "--out", str(tmp_path / "p.safetensors"),
                                    "--image-size", "100000"])
    assert "--image-size 100000 is above 8192 pixels" in line
