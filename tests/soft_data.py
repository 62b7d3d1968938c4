"""Small image folders and torchvision teachers for the soft-label evaluation tests (rded / sre2l).

Classes are noisy solid colours (a network separates them in a few dozen steps), so a trained tiny
teacher is far above chance and a permuted copy of it far below; a random-weight teacher sits at
chance (the class-order check then needs --ignore-class-check).
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

COLOURS = ((210, 40, 40), (40, 200, 50), (40, 60, 210), (220, 210, 40))


def write_colour_folder(root, per_class: int, side: int, classes=("a", "b", "c"), seed: int = 0, names=None) -> str:
    """root/<class>/<i>.png: noisy solid colours, `side` px (RGB)."""
    rng = np.random.default_rng(seed)
    for index, name in enumerate(classes):
        folder = os.path.join(root, name if names is None else names[index])
        os.makedirs(folder, exist_ok=True)
        for i in range(per_class):
            pixels = np.array(COLOURS[index % len(COLOURS)])[None, None, :] + rng.normal(0, 45, (side, side, 3))
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(os.path.join(folder, f"{i:03d}.png"))
    return str(root)


def torchvision_or_skip():
    return pytest.importorskip("torchvision", reason="the torchvision extra is not installed (pip install "
                               "'igds_fast[torchvision]')", exc_type=ImportError)


def random_teacher(path, arch: str = "shufflenet_v2_x0_5", num_classes: int = 3, seed: int = 0) -> str:
    """A random-weight torchvision teacher saved as a bare state dict."""
    torchvision = torchvision_or_skip()
    torch.manual_seed(seed)
    model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
    torch.save(model.state_dict(), path)
    return str(path)


def trained_teacher(path, folder, arch: str = "shufflenet_v2_x0_5", steps: int = 60, seed: int = 0) -> str:
    """A torchvision teacher trained on `folder`'s images (ImageNet-normalised, 32 px) until it separates them."""
    torchvision = torchvision_or_skip()
    from igds_fast.data import load_image_folder
    from igds_fast.evaluate.protocol import IMAGENET_MEAN, IMAGENET_STD, NormalizedInput

    images, labels, names, _ = load_image_folder(folder, 32)
    torch.manual_seed(seed)
    network = torchvision.models.get_model(arch, weights=None, num_classes=len(names))
    model = NormalizedInput(network, IMAGENET_MEAN, IMAGENET_STD)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(images), labels).backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        accuracy = float((model(images).argmax(1) == labels).float().mean())
    assert accuracy == 1.0, f"the test teacher did not learn its colours ({accuracy:.2f})"
    torch.save({"model": network.state_dict()}, path)  # RDED's layout for subset teachers
    return str(path)


def permuted_teacher(source, path, shift: int = 1) -> str:
    """`source`'s teacher with its class rows rolled by `shift` (a class-order mismatch)."""
    from igds_fast.evaluate.torchvision_nets import read_teacher_file

    state = read_teacher_file(str(source))
    rows = [k for k, v in state.items() if k.startswith("fc.")]
    for key in rows:
        state[key] = torch.roll(state[key], shifts=shift, dims=0)
    torch.save(state, path)
    return str(path)
