"""ONNX export of the prior UNet (igds_fast.export) and the TensorRT engine path (igds_fast.sampling.compiled.tensorrt).

On CPU: the exported graph, run by onnxruntime on fresh random inputs, computes the float32 UNet
within igds_fast.export.CHECK_TOLERANCES (relative L2: fp32 1e-4, fp16 1e-2 — the product's own
check uses the same table). TensorRT needs CUDA and the tensorrt package, which neither CI nor the
GPU machines this project can use have: its tests skip there with that reason.
"""
from __future__ import annotations

import os

import re

import pytest
import torch

from factories import tiny_adm, tiny_ve
from igds_fast import export as export_module
from igds_fast.cli import main as cli_main
from igds_fast.sampling.compiled import CompileConfig
from igds_fast.guidance import GuidanceConfig
from igds_fast.diffusion import DiffusionSchedule, ScheduleConfig
from igds_fast.errors import IGDSInputError
from igds_fast.export import CHECK_TOLERANCES, ExportCheckError, export_unet_onnx, unet_export_inputs
from igds_fast.sampling import Sampler

onnx = pytest.importorskip("onnx")
onnxruntime = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

pytestmark = pytest.mark.usefixtures("one_thread")
GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"


def relative_error(actual, expected) -> float:
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


def run_onnx(path, inputs):
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    (out,) = session.run(["model_output"], {n: t.numpy() for n, t in zip(names, inputs)})
    return torch.from_numpy(out), names


def folder_listing(folder):
    return sorted(os.listdir(folder))


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_export_computes_the_float32_unet(tmp_path, dtype, rng_seed):
    unet = tiny_adm(image_size=16)  # class-conditional, learned sigma: 6 output channels
    path = tmp_path / f"unet_{dtype}.onnx"
    report = export_unet_onnx(unet, str(path), batch_size=3, dtype=dtype)
    assert report["check"] == "onnxruntime" and report["rel_error"] <= CHECK_TOLERANCES[dtype]
    assert report["inputs"] == ["x", "timesteps", "y"] and report["output_shape"] == [3, 6, 16, 16]
    assert folder_listing(tmp_path) == [path.name] and report["files"] == {path.name: path.stat().st_size}
    # Fresh inputs, not the export's own: the graph is the UNet, not a recording of one call.
    inputs = unet_export_inputs(unet, 3, generator=torch.Generator().manual_seed(rng_seed))
    actual, names = run_onnx(path, inputs)
    with torch.no_grad():
        expected = unet(*inputs)
    assert names == ["x", "timesteps", "y"]
    assert relative_error(actual, expected) <= CHECK_TOLERANCES[dtype]
    if dtype == "fp16":
        assert relative_error(actual, expected) > 1e-6  # the graph really computes in fp16
        model = onnx.load(str(path))
        weights = [init for init in model.graph.initializer if init.dims and len(init.dims) == 4]
        assert weights and all(init.data_type == onnx.TensorProto.FLOAT16 for init in weights)


def test_unconditional_export_with_external_weights(tmp_path, monkeypatch):
    monkeypatch.setattr(export_module, "EXTERNAL_DATA_BYTES", 0)  # force the >2 GiB layout on a tiny model
    unet = tiny_adm(image_size=16, class_cond=False, learn_sigma=False)
    path = tmp_path / "uncond.onnx"
    report = export_unet_onnx(unet, str(path), batch_size=2, dtype="fp32")
    assert report["external_data"] and report["inputs"] == ["x", "timesteps"] and report["check"] == "onnxruntime"
    assert folder_listing(tmp_path) == ["uncond.onnx", "uncond.onnx.data"]
    inputs = unet_export_inputs(unet, 2)
    actual, _ = run_onnx(path, inputs)
    with torch.no_grad():
        assert relative_error(actual, unet(*inputs)) <= CHECK_TOLERANCES["fp32"]


def test_bf16_export_is_checked_for_structure(tmp_path):
    report = export_unet_onnx(tiny_adm(image_size=16), str(tmp_path / "bf16.onnx"), batch_size=2, dtype="bf16")
    assert report["check"].startswith("structure") and "rel_error" not in report


def test_a_failed_check_leaves_nothing_behind(tmp_path, monkeypatch):
    monkeypatch.setitem(CHECK_TOLERANCES, "fp32", 0.0)  # no graph can pass: the check must refuse it
    with pytest.raises(ExportCheckError, match="differs from the float32 UNet"):
        export_unet_onnx(tiny_adm(image_size=16), str(tmp_path / "refused.onnx"), batch_size=2, dtype="fp32")
    assert folder_listing(tmp_path) == []  # neither the graph nor its staging folder


def test_bad_export_arguments_are_one_line_errors(tmp_path):
    unet = tiny_adm(image_size=16)
    cases = [
        (dict(path=str(tmp_path / "a.onnx"), batch_size=0), "batch size must be a positive integer"),
        (dict(path=str(tmp_path / "a.onnx"), batch_size=2, dtype="int8"), "export dtype must be one of"),
        (dict(path=str(tmp_path / "a.pt"), batch_size=2), "must end in .onnx"),
        (dict(path=str(tmp_path / "missing" / "a.onnx"), batch_size=2), "does not exist"),
    ]
    (tmp_path / "dir.onnx").mkdir()
    cases.append((dict(path=str(tmp_path / "dir.onnx"), batch_size=2), "is a folder"))
    for kwargs, message in cases:
        with pytest.raises(IGDSInputError, match=message) as info:
            export_unet_onnx(unet, **kwargs)
        assert "\n" not in str(info.value)


def test_cli_exports_a_prior_file_and_refuses_an_engine_without_cuda(tmp_path, capsys):
    from igds_fast.models.priors import save_prior
    from igds_fast.train_prior import PriorTrainConfig

    arch = PriorTrainConfig(num_channels=32, channel_mult="1,2", num_res_blocks=1, noise_schedule="linear")
    flags = arch.unet_flags(16, 3, 2)
    from igds_fast.models.adm import ADMUNet
    from factories import randomize_

    unet = randomize_(ADMUNet.from_flags(**flags), 0.05).eval()
    prior = tmp_path / "prior.safetensors"
    save_prior(prior, unet, flags, arch.schedule_config(), ["a", "b"])
    out = tmp_path / "unet.onnx"
    assert cli_main(["export-unet", "--prior", str(prior), "--batch-size", "2", "--dtype", "fp32",
                     "--out", str(out)]) == 0
    assert "check: onnxruntime" in capsys.readouterr().out and out.is_file()
    if not torch.cuda.is_available():
        code = cli_main(["export-unet", "--prior", str(prior), "--batch-size", "2", "--out", str(tmp_path / "b.onnx"),
                         "--engine", str(tmp_path / "b.plan")])
        assert code == 2 and "TensorRT engine for a CUDA GPU" in capsys.readouterr().err
        assert not (tmp_path / "b.onnx").exists()  # refused before any export work
    assert cli_main(["export-unet", "--prior", str(tmp_path / "nope.safetensors"), "--batch-size", "2",
                     "--out", str(tmp_path / "c.onnx")]) == 2
    assert "prior checkpoint not found" in capsys.readouterr().err
    assert cli_main(["export-unet", "--prior", str(prior), "--preset", "adm1024", "--batch-size", "2",
                     "--out", str(tmp_path / "d.onnx")]) == 2
    assert "unknown ADM preset 'adm1024'" in capsys.readouterr().err
    # The files it writes: never over the checkpoint or each other, a folder that exists, refused before
    # the export; --workspace-gib only with --engine.
    before = prior.read_bytes()
    for extra, message in (
        (["--out", str(prior)], "same path"),
        (["--out", str(tmp_path / "e.onnx"), "--engine", str(prior)], "--engine .* and --prior .* are the same path"),
        (["--out", str(tmp_path / "f.onnx"), "--engine", str(tmp_path / "f.onnx")], "are the same path"),
        (["--out", str(tmp_path / "g.onnx"), "--engine", str(tmp_path / "nowhere" / "g.plan")], "does not exist"),
        (["--out", str(tmp_path / "h.onnx"), "--workspace-gib", "4"], "--workspace-gib applies to building"),
    ):
        assert cli_main(["export-unet", "--prior", str(prior), "--batch-size", "2", *extra]) == 2, extra
        err = capsys.readouterr().err
        assert re.search(message, err) and err.count("\n") == 1, (extra, err)
    assert prior.read_bytes() == before and not list(tmp_path.glob("[efgh].onnx"))


# ---- the TensorRT engine in the compiled step ----------------------------------------------------------
def sampler_with_engine(engine, mode="x0", device="cpu", batch_size=None):
    unet, ve = tiny_adm(image_size=16).to(device), tiny_ve(num_classes=4).to(device)
    schedule = DiffusionSchedule(ScheduleConfig(sampling_steps="4"), device=device)
    options = dict(unet_engine=str(engine), batch_size=batch_size)
    return Sampler(unet, schedule, ve, GuidanceConfig(scale=1.0, beta=0.5, mode=mode), backend="compiled",
                   backend_options=options, prior_class_map=[0, 1, 2, 3])


def test_engine_options_are_checked_before_any_work(tmp_path):
    with pytest.raises(IGDSInputError, match="unet_engine must be the path of a TensorRT engine file"):
        CompileConfig(unet_engine=str(tmp_path / "missing.plan"))
    engine = tmp_path / "unet.plan"
    engine.write_bytes(b"not an engine")
    with pytest.raises(IGDSInputError, match="guidance mode x0 only"):
        sampler_with_engine(engine, mode="xt")
    if not torch.cuda.is_available():
        with pytest.raises(IGDSInputError, match="runs on a CUDA device only"):
            sampler_with_engine(engine)


@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason="needs a CUDA GPU with compiled Triton (IGDS_TEST_GPU=1)")
def test_gpu_tensorrt_engine_in_the_graph_captured_step(tmp_path):
    pytest.importorskip("tensorrt", reason="tensorrt is not installed")
    from igds_fast.sampling.compiled.tensorrt import TensorRTUNet, build_engine

    unet = tiny_adm(image_size=16)
    onnx_path = tmp_path / "unet.onnx"
    export_unet_onnx(unet, str(onnx_path), batch_size=4, dtype="fp16")
    build_engine(str(onnx_path), str(tmp_path / "unet.plan"))
    engine = TensorRTUNet(str(tmp_path / "unet.plan"), "cuda")
    inputs = [t.cuda() for t in unet_export_inputs(unet, 4)]
    with torch.no_grad():
        expected = unet.cuda()(*inputs)
    assert relative_error(engine(*inputs), expected) <= CHECK_TOLERANCES["fp16"]
    sampler = sampler_with_engine(tmp_path / "unet.plan", device="cuda")
    assert sampler.stepper.use_graphs and sampler.stepper.batch_size == 4
    reference = Sampler(sampler.unet, sampler.schedule, sampler.ve, sampler.guidance, noise="philox",
                        prior_class_map=[0, 1, 2, 3])
    seeds = [11, 12, 13, 14]
    images = sampler.sample([0, 1, 2, 3], seeds)
    assert relative_error(images, reference.sample([0, 1, 2, 3], seeds)) <= 2e-2
