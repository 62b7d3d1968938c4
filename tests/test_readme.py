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
    snippets = front_end_snippets()[:3]
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
    assert namespace["ddim_samples"].shape == (2, 3, 16, 16) and torch.isfinite(namespace["ddim_samples"]).all()
    assert {"condition_mean", "condition_score"} <= set(vars(namespace["diffusion"]))  # route 2 patched that object only


def minimax_dit_command() -> list[str]:
    """The `igds-fast distill` arguments of the README's Minimax-DiT recipe, as written."""
    import shlex

    text = open(README, encoding="utf-8").read()
    section = text[text.index("## The Minimax-DiT recipe"):]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    lines = [line.split("#", 1)[0].rstrip() for line in block.replace("\\\n", " ").splitlines()]
    commands = [shlex.split(line) for line in lines if line.strip()]
    assert len(commands) == 1 and commands[0][:2] == ["igds-fast", "distill"], commands
    return commands[0][2:]


def test_the_dit_and_igd_routes_run_as_written_in_their_own_code(tmp_path, monkeypatch):
    """The DiT / MinimaxDiffusion and IGD snippets, after the three routes, with each peer's own `diffusion`
    and `models` importable under those names (tests/peers.py; skipped without them)."""
    import sys
    import types

    from factories import tiny_vae
    from peers import load_peer

    snippets = front_end_snippets()
    assert len(snippets) == 5
    dit = load_peer("dit", "models", "diffusion")
    wandb = types.ModuleType("wandb")  # IGD's experiment logger (not reached by these branches)
    wandb.log = lambda *args, **kwargs: None
    igd = load_peer("igd", "models", "diffusion", stubs={"wandb": wandb})
    with torch.random.fork_rng():
        torch.manual_seed(2)
        torch.save(randomize_(dit["models"].DiT_models["DiT-S/2"](input_size=8, num_classes=4), 0.05).state_dict(),
                   tmp_path / "dit.pt")
        torch.save(randomize_(igd["models"].DiT_models["DiT-S/2"](input_size=8, num_classes=4), 0.05).state_dict(),
                   tmp_path / "minimax_dit.pt")
        tiny_vae(latent_channels=4, scale_factor=8).save_pretrained(tmp_path / "vae")  # 8x8 latents -> 64 px
        ve = tiny_ve(num_classes=4, channels=3, resolution=16)
    ve.class_names = ["a", "b", "c", "d"]
    ve.save(tmp_path / "ve_dit.safetensors")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile("import torch\nfrom igds_fast import IGDSGuidance, load_ve\n"
                 "from igds_fast.frontends import IGDSConditioner", "README.md", "exec"), namespace)  # noqa: S102
    for snippet, code in ((snippets[3], dit), (snippets[4], igd)):
        monkeypatch.setitem(sys.modules, "diffusion", code["diffusion"])
        monkeypatch.setitem(sys.modules, "models", code["models"])
        exec(compile(snippet, "README.md", "exec"), namespace)  # noqa: S102
        latents = namespace["latents"]
        assert latents.shape[1:] == (4, 8, 8) and torch.isfinite(latents).all()
    assert namespace["conditioner"].window == (30, 45)


def test_the_minimax_dit_recipe_runs_as_written(tmp_path, monkeypatch):
    """The recipe's command on random-weight files of the real layouts at its paths (a MinimaxDiffusion
    training checkpoint, an AutoencoderKL folder, a VE bundle, a beta table); small shapes, CPU, IPC 1."""
    import argparse

    from factories import tiny_dit, tiny_vae
    from igds_fast import cli
    from igds_fast.classes import class_list
    from igds_fast.guidance.beta_table import write_beta_table

    argv = minimax_dit_command()
    values = {flag: argv[argv.index(flag) + 1] for flag in ("--prior", "--vae", "--ve", "--beta-table", "--out")}
    with torch.random.fork_rng():
        torch.manual_seed(0)
        dit = tiny_dit(input_size=8, depth=1, hidden_size=384, num_heads=6, num_classes=1000, difffit_blocks=1)
        vae = tiny_vae()
        ve = tiny_ve(num_classes=10, channels=3, resolution=16)
    monkeypatch.chdir(tmp_path)
    os.makedirs(os.path.dirname(values["--prior"]), exist_ok=True)
    torch.save({"model": dit.state_dict(), "ema": dit.state_dict(), "opt": {},
                "args": argparse.Namespace(model="DiT-XL/2")}, values["--prior"])
    vae.save_pretrained(values["--vae"])
    ve.class_names = class_list("imagewoof")
    ve.save(values["--ve"])
    write_beta_table(values["--beta-table"], {"chosen": {1: 0.0, 10: 0.1}})
    # As written, but IPC 1 instead of 10 (100 images at 50 steps cost minutes on 2 CPU cores) and on the
    # CPU, quietly (the recipe's default device is the GPU when there is one).
    argv[argv.index("--ipc") + 1] = "1"
    args = cli.parse(["distill", *argv, "--quiet", "--device", "cpu"])
    assert args.handler(args) == 0
    out = values["--out"]
    manifest = __import__("json").load(open(os.path.join(out, "manifest.json")))
    assert manifest["pixel_settings"]["prior_kind"] == "dit"
    assert manifest["pixel_settings"]["diffusion"]["sampling_steps"] == "50"
    assert manifest["pixel_settings"]["latent"]["cfg_scale"] == 4.0
    assert len(manifest["images"]) == 10 and manifest["settings"]["job"]["composite"] == 1
