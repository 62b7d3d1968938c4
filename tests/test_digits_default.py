"""The embedded default (`igds-fast distill` with no models): the digits pipeline end to end, tiny settings."""
import hashlib
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from igds_fast import cli
from igds_fast.errors import IGDSInputError
from igds_fast.presets import digits
from igds_fast.presets.digits import CLASS_NAMES, DigitsSettings, format_table, random_subset
from igds_fast.train_prior import PriorTrainConfig

pytest.importorskip("sklearn")


def run_distill(args):
    return args.handler(args)


def _parse(argv):
    """`igds-fast distill ARGV` as the command line parses it (no models: `igds-fast demo digits`)."""
    return cli.parse(["distill", *argv])


pytestmark = pytest.mark.usefixtures("one_thread")


def test_no_models_runs_the_whole_pipeline_then_reuses_its_cache(tmp_path, capsys):
    work = tmp_path / "work"
    out = tmp_path / "out"  # --out: the sets and the results; --work-dir: the trained pieces
    argv = ["--fast", "--work-dir", str(work), "--out", str(out), "--quiet"]
    assert run_distill(_parse(argv)) == 0
    printed = capsys.readouterr().out
    lines = printed.splitlines()
    assert lines[0].startswith("digits (10 classes, 16x16")
    rows = {line.split("  ")[0]: line for line in lines[3:7]}
    titles = {"random real subset", "DDPM, unguided (scale 0)"}
    assert set(rows) == titles | {r for r in rows if r.startswith("IGDS (")} | {r for r in rows if r.startswith("IGDS + S\u00b3")}
    assert len(rows) == 4
    for title, line in rows.items():
        if title.startswith("IGDS + S\u00b3"):  # --fast: S³ at IPC 1 only (G x IPC candidates cost G x the sampling)
            assert line.count("\u00b1") == 1 and line.rstrip().endswith("-")
        else:
            assert line.count("\u00b1") == 2  # IPC 1 and IPC 10 columns
    # The trained pieces and the demo's record of them (what --force may remove: presets/digits_files.py).
    assert sorted(os.listdir(work)) == [".igds_demo.json", "prior.safetensors", "ve.safetensors", "ve_train.json"]
    assert (out / "results.txt").read_text().splitlines() == lines[:-1]  # the table, without "results written"
    with open(out / "results.json") as handle:
        results = json.load(handle)
    for method, ipcs in (("random", ("1", "10")), ("ddpm", ("1", "10")), ("igds", ("1", "10")), ("igds_s3", ("1",))):
        assert sorted(results["accuracies"][method]) == sorted(ipcs)
        for ipc in ipcs:
            accuracies = results["accuracies"][method][ipc]
            assert len(accuracies) == 3 and all(0.0 <= a <= 100.0 for a in accuracies)
    assert results["prior"]["cached"] is False and results["ve"]["cached"] is False
    # The generated sets are real distill outputs: IPC files per class, manifest, preview.
    folder = out / "distilled" / "igds_ipc10_seed2"
    assert sorted(os.listdir(folder / "7")) == [f"{i:05d}.png" for i in range(10)]
    with open(folder / "manifest.json") as handle:
        manifest = json.load(handle)
    assert manifest["settings"]["job"]["seed"] == 2
    assert manifest["settings"]["guidance"]["scale"] == results["settings"]["scale"]
    assert os.path.isfile(folder / "preview.png")
    # The S³ set: IPC images per class picked from G x IPC candidates kept beside it, not inside.
    selected = out / "distilled" / "igds_s3_ipc1_seed0"
    assert sorted(n for n in os.listdir(selected) if not n.startswith(".")) == CLASS_NAMES + ["manifest.json",
                                                                                            "preview.png"]
    assert sorted(os.listdir(f"{selected}.s3-candidates/3")) == [f"{i:05d}.png" for i in range(5)]
    with open(selected / "manifest.json") as handle:
        selection = json.load(handle)["selection"]
    assert selection["groups"] == 5 and selection["real"]["kind"] == "in-memory"
    assert sorted(selection["chosen"]) == CLASS_NAMES and all(0 <= g < 5 for g in selection["chosen"].values())
    assert results["generation"]["igds_s3_ipc1_seed0"]["selection"]["passes"] >= 1
    prior_state = os.stat(work / "prior.safetensors")
    ve_state = os.stat(work / "ve.safetensors")

    assert run_distill(_parse(argv)) == 0
    again = capsys.readouterr().out
    with open(out / "results.json") as handle:
        cached = json.load(handle)
    assert cached["prior"]["cached"] is True and cached["ve"]["cached"] is True
    assert os.stat(work / "prior.safetensors").st_mtime_ns == prior_state.st_mtime_ns
    assert os.stat(work / "ve.safetensors").st_mtime_ns == ve_state.st_mtime_ns
    # Same pieces, same seeds, same sets: the same numbers.
    assert cached["accuracies"] == results["accuracies"]
    assert again.splitlines()[3:7] == lines[3:7]


def test_the_demo_samples_with_the_shipped_prior_made_by_train_prior(tmp_path, monkeypatch):
    """The shipped prior is the one the default settings train, and `igds-fast train-prior --digits`
    makes the same file as the demo's own training (checked at a few steps: same tensors)."""
    record = digits.shipped_prior_record()
    with open(digits.SHIPPED_PRIOR, "rb") as handle:
        assert hashlib.sha256(handle.read()).hexdigest() == record["sha256"]
    assert record["command"].startswith("igds-fast train-prior --digits --steps 1200 --batch-size 32")
    assert digits.prior_matches(digits.SHIPPED_PRIOR, DigitsSettings())
    assert not digits.prior_matches(digits.SHIPPED_PRIOR, DigitsSettings.fast())

    def no_training(*args, **kwargs):
        raise AssertionError("the demo trained a prior although the shipped one matches")

    monkeypatch.setattr(digits, "train_prior", no_training)
    path, info = digits.ensure_prior(str(tmp_path / "work"), DigitsSettings(), None, None, log=lambda message: None)
    assert path == digits.SHIPPED_PRIOR and info["shipped"] is True and not (tmp_path / "work").exists()
    monkeypatch.undo()

    # A few steps of both routes: the CLI's file is the demo's, tensor for tensor, and is recognised as it.
    settings = DigitsSettings(prior=PriorTrainConfig(steps=3, batch_size=8, warmup_steps=1))
    train_x, train_y, _, _ = digits.load_digits_split(**digits.SPLIT)
    (tmp_path / "work").mkdir()
    demo_path, info = digits.ensure_prior(str(tmp_path / "work"), settings, train_x, train_y,
                                          log=lambda message: None, retrain=True)
    assert info["cached"] is False and demo_path != digits.SHIPPED_PRIOR
    cli_path = tmp_path / "cli_prior.safetensors"
    assert cli.main(["train-prior", "--digits", "--steps", "3", "--batch-size", "8", "--warmup-steps", "1",
                     "--device", "cpu", "--out", str(cli_path)]) == 0
    demo_tensors, cli_tensors = load_file(demo_path), load_file(str(cli_path))
    assert sorted(demo_tensors) == sorted(cli_tensors)
    assert all(torch.equal(demo_tensors[key], cli_tensors[key]) for key in demo_tensors)
    assert digits.prior_matches(str(cli_path), settings)


def test_random_subsets_are_stratified_and_seeded():
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(60, 1, 4, 4, generator=generator)
    labels = torch.arange(60) % 10
    x, y = random_subset(images, labels, 3, seed=5)
    assert torch.bincount(y, minlength=10).tolist() == [3] * 10
    x_again, _ = random_subset(images, labels, 3, seed=5)
    x_other, _ = random_subset(images, labels, 3, seed=6)
    assert torch.equal(x, x_again) and not torch.equal(x, x_other)


def test_table_reports_mean_and_std_per_method_and_ipc():
    results = {
        "settings": {"ipcs": [1], "seeds": 2, "scale": 1.5, "beta_by_ipc": {"1": 0.2}, "eval_network": "convnet3",
                     "eval_width": 64, "eval_epochs": 200, "sampling_steps": 25},
        "split": {"image_size": 16, "train_images": 1258, "test_images": 539},
        "accuracies": {"random": {"1": [70.0, 80.0]}, "ddpm": {"1": [50.0, 54.0]}, "igds": {"1": [60.0, 60.0]}},
        "timings_s": {"prior": 1.0, "ve": 2.0, "distill": 3.0, "evaluate": 4.0, "total": 10.0},
        "prior": {"cached": True}, "ve": {"cached": False},
    }
    table = format_table(results)
    assert "75.00 \u00b1 5.00" in table and "52.00 \u00b1 2.00" in table and "60.00 \u00b1 0.00" in table
    assert "IGDS (scale 1.5; beta 0.2@1)" in table and "prior 1s (cached)" in table


def test_bad_demo_arguments_are_one_line():
    with pytest.raises(IGDSInputError, match="trains its own prior and VE"):
        run_distill(_parse(["--preset", "digits", "--ve", "x.safetensors"]))
    with pytest.raises(IGDSInputError, match="IPCs must be positive"):
        DigitsSettings(ipcs=(0,))
    with pytest.raises(IGDSInputError, match="seeds must be a positive integer"):
        DigitsSettings(seeds=0)
    assert CLASS_NAMES == [str(d) for d in range(10)]
