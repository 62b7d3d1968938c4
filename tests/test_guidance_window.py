"""The guided window in both conventions: our steps (0 = the first step from noise) and the loop's own t
(IGD's --low/--high gate, counting down from N-1); peer flags named; a latent x0 without its decoder."""
from __future__ import annotations

import json

import pytest
import torch

from factories import tiny_ve
from igds_fast import cli
from igds_fast.errors import IGDSInputError
from igds_fast.guidance import GuidanceConfig, IGDSGuidance
from test_distill import listing, models  # noqa: F401 (the module-scoped fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_t_range_is_the_step_window_counted_from_the_other_end():
    for steps, (low, high) in ((50, (30, 45)), (50, (0, 49)), (50, (10, 80)), (8, (2, 5)), (8, (7, 7))):
        by_t = GuidanceConfig(guide_t_range=(low, high))
        first, last = steps - 1 - min(high, steps - 1), steps - 1 - low
        by_step = GuidanceConfig(guide_from_step=first, guide_until_step=last)
        assert [by_t.guides(i, steps) for i in range(steps)] == [by_step.guides(i, steps) for i in range(steps)]
        assert [by_t.guides(i, steps) for i in range(steps)] == [low <= i <= high for i in range(steps)]
        assert by_t.step_window(steps) == (first, None if last == steps - 1 else last)
        assert by_step.step_window(steps) == by_t.step_window(steps)  # one record, either spelling
        assert GuidanceConfig(guide_from_step=first, guide_until_step=steps + 400).step_window(steps) == (first, None)
    # IGD's 30:45 of its 50-step loop is our steps 4..19.
    assert GuidanceConfig(guide_t_range=(30, 45)).step_window(50) == (4, 19)
    assert not GuidanceConfig(scale=0.0, guide_t_range=(0, 49)).guides(10, 50)


def test_bad_windows_are_one_line():
    for kwargs, message in (({"guide_t_range": (5, 2)}, "0 <= low <= high"),
                            ({"guide_t_range": (-1, 2)}, "0 <= low <= high"),
                            ({"guide_t_range": (1, 2), "guide_from_step": 1}, "not both")):
        with pytest.raises(IGDSInputError, match=message):
            GuidanceConfig(**kwargs)
    with pytest.raises(IGDSInputError, match="starts past t = 7"):
        GuidanceConfig(guide_t_range=(8, 9)).check_window(8)


def _run(models, out, *extra):
    argv = ["distill", "--prior", models["prior"], "--ve", models["ve"], "--ipc", "1", "--classes", "cat,dog",
            "--composite", "1", "--steps", "8", "--seed", "2", "--scale", "3", "--beta", "0.5", "--device", "cpu",
            "--quiet", "--out", str(out), *extra]
    assert cli.main(argv) == 0
    return listing(out)


def test_distill_t_range_gives_the_bytes_of_the_same_step_window(models, tmp_path):
    by_steps = _run(models, tmp_path / "steps", "--guide-from-step", "2", "--guide-until-step", "5")
    by_t = _run(models, tmp_path / "t", "--guide-t-range", "2:5")
    whole = _run(models, tmp_path / "whole")
    pngs = [name for name in by_t if name.endswith(".png") and name != "preview.png"]
    assert pngs and all(by_t[name] == by_steps[name] for name in pngs)
    assert any(by_t[name] != whole[name] for name in pngs)  # the window changed something
    config = json.loads((tmp_path / "t" / ".igds_config.json").read_text())
    assert config["guide_window"] == [2, 5]  # one record for either spelling: each resumes the other
    _run(models, tmp_path / "t", "--guide-from-step", "2", "--guide-until-step", "5")
    with pytest.raises(IGDSInputError, match="starts past t = 7"):
        args = cli.parse(["distill", "--prior", models["prior"], "--ve", models["ve"], "--ipc", "1", "--steps", "8",
                          "--out", str(tmp_path / "never"), "--guide-t-range", "8:9", "--device", "cpu"])
        args.handler(args)
    assert not (tmp_path / "never").exists()


def test_the_flags_of_the_samplers_users_come_from_name_ours(capsys):
    for flag, ours in (("--num-sampling-steps", "--steps"), ("--ckpt", "--prior"), ("--save-dir", "--out"),
                       ("--image-size", "--arch"), ("--low", "--guide-t-range"), ("--model_path", "--prior")):
        for models_given in (["--prior", "p.pt", "--ve", "v.safetensors", "--ipc", "1", "--out", "o"], []):
            assert cli.main(["distill", *models_given, flag, "7"]) == 2
            (line,) = capsys.readouterr().err.strip().splitlines()
            assert line.startswith(f"igds-fast: error: {flag} is ") and f"igds-fast distill takes {ours}" in line


def test_a_latent_x0_without_its_decoder_says_what_to_pass():
    ve = tiny_ve(num_classes=3, channels=3, resolution=16)
    with pytest.raises(IGDSInputError, match=r"reads 3-channel images but the x0 prediction has 4 channels.*"
                                             r"decoder=igds_fast.load_vae\(DIR\)"):
        IGDSGuidance(ve, beta=0.1)(torch.randn(2, 4, 8, 8), torch.tensor([0, 1]))
