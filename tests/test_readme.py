"""The README's Python API example, run as written, on a small prior and VE in the working directory."""
from __future__ import annotations

import os
import re

import torch

from factories import randomize_, tiny_ve
from igds_fast.models.adm import ADMUNet
from igds_fast.models.priors import save_prior
from igds_fast.train_prior import PriorTrainConfig

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def python_api_example() -> str:
    text = open(README, encoding="utf-8").read()
    section = text[text.index("## Python API"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_python_api_example_runs_as_written(tmp_path, monkeypatch):
    code = python_api_example()
    imported = re.search(r"from igds_fast import (.*)", code).group(1).split(", ")
    assert not re.search(r"from igds_fast\.", code), "the example must use the top-level API only"
    prior_classes = ["emu", "yak", "dog", "cat"]
    with torch.random.fork_rng():
        torch.manual_seed(0)
        config = PriorTrainConfig(num_channels=32, channel_mult="1,2", num_res_blocks=1, noise_schedule="linear")
        flags = config.unet_flags(16, 3, len(prior_classes))
        save_prior(tmp_path / "prior.safetensors", randomize_(ADMUNet.from_flags(**flags), 0.05), flags,
                   config.schedule_config(), prior_classes)
        ve = tiny_ve(num_classes=2, channels=3, resolution=16)
    ve.class_names = ["cat", "emu"]  # a subset of the prior's classes, in another order
    ve.save(tmp_path / "ve.safetensors")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102
    images, grad = namespace["images"], namespace["grad"]
    assert images.shape == (3, 3, 16, 16) and torch.isfinite(images).all() and images.abs().max() <= 1
    assert grad.shape == images.shape and torch.isfinite(grad).all() and grad.abs().max() > 0
    assert namespace["class_map"] == [3, 0]
    assert set(imported) <= set(__import__("igds_fast").__all__)


def front_end_snippets() -> list[str]:
    text = open(README, encoding="utf-8").read()
    section = text[text.index("## For front-end authors"):text.index("## Backends")]
    return re.findall(r"```python\n(.*?)```", section, re.S)


def test_the_three_front_end_routes_run_as_written(tmp_path, monkeypatch):
    script_util = __import__("pytest").importorskip("guided_diffusion.script_util")
    snippets = front_end_snippets()
    assert len(snippets) == 3
    namespace: dict = {}
    options_code = snippets[0].split("model, diffusion =")[0]
    exec(compile(options_code, "README.md", "exec"), namespace)  # noqa: S102 (the snippet's own options)
    with torch.random.fork_rng():
        torch.manual_seed(1)
        model, _ = script_util.create_model_and_diffusion(**namespace["options"])
        randomize_(model, 0.05)
        torch.save(model.state_dict(), tmp_path / "model.pt")
        ve = tiny_ve(num_classes=2, channels=3, resolution=16)
    ve.class_names = ["n02099601", "n02110185"]
    ve.save(tmp_path / "ve.safetensors")
    monkeypatch.chdir(tmp_path)
    namespace = {}
    for snippet in snippets:
        exec(compile(snippet, "README.md", "exec"), namespace)  # noqa: S102
    assert namespace["images"].shape == (2, 3, 16, 16) and torch.isfinite(namespace["images"]).all()
    assert namespace["samples"].shape == (2, 3, 16, 16) and torch.isfinite(namespace["samples"]).all()
    grad = namespace["grad"]
    assert grad.shape == (2, 3, 16, 16) and grad.abs().max() > 0
    assert "condition_mean" in vars(namespace["diffusion"])  # route 2 patched that object only
