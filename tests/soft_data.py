"""Small image folders and teachers for the soft-label evaluation tests (rded / sre2l).

Classes are noisy colours with a class-specific pattern (horizontal stripes, vertical stripes, a
checkerboard, diagonal stripes): instance-normalised networks (ours) separate them by the pattern,
BatchNorm ones by either, in a few steps. So a trained tiny teacher is far above chance and a copy
with its class rows rolled far below; a random-weight teacher sits near chance (the class-order
check then needs --ignore-class-check). Teachers are ours (convnet3: runs in CI) or torchvision's
(skipped without the torchvision extra).
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from conftest import REQUIRE_TORCHVISION, TORCHVISION_SKIP
from PIL import Image

COLOURS = ((210, 40, 40), (40, 200, 50), (40, 60, 210), (220, 210, 40))
PERIOD = 8


def _pattern(index: int, side: int) -> np.ndarray:
    y, x = np.mgrid[0:side, 0:side]
    wave = 2 * np.pi / PERIOD
    return (np.sin(wave * y), np.sin(wave * x), np.sign(np.sin(wave * x) * np.sin(wave * y)),
            np.sin(wave * (x + y) / 1.4))[index % 4]


def write_colour_folder(root, per_class: int, side: int, classes=("a", "b", "c"), seed: int = 0, names=None) -> str:
    """root/<class>/<i>.png: noisy patterned colours, `side` px (RGB)."""
    rng = np.random.default_rng(seed)
    for index, name in enumerate(classes):
        folder = os.path.join(root, name if names is None else names[index])
        os.makedirs(folder, exist_ok=True)
        for i in range(per_class):
            pixels = (np.array(COLOURS[index % len(COLOURS)])[None, None, :] + 70 * _pattern(index, side)[:, :, None]
                      + rng.normal(0, 30, (side, side, 3)))
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(os.path.join(folder, f"{i:03d}.png"))
    return str(root)


def torchvision_or_skip():
    """torchvision, or a skip saying how to install it (a failure where IGDS_REQUIRE_TORCHVISION=1: CI's second
    environment must run these tests, not skip them)."""
    if REQUIRE_TORCHVISION:
        import torchvision

        return torchvision
    return pytest.importorskip("torchvision", reason=f"{TORCHVISION_SKIP} (pip install 'igds_fast[torchvision]')",
                               exc_type=ImportError)


def _build(arch: str, num_classes: int, image_size: int):
    from igds_fast.evaluate.teachers import teacher_builder
    from igds_fast.evaluate.torchvision_nets import is_torchvision_name

    if is_torchvision_name(arch):
        torchvision_or_skip()
    return teacher_builder(arch, image_size)(num_classes)


def random_teacher(path, arch: str = "convnet3", num_classes: int = 3, seed: int = 0, image_size: int = 32) -> str:
    """A random-weight teacher (ours or torchvision:NAME) saved as a bare state dict."""
    torch.manual_seed(seed)
    torch.save(_build(arch, num_classes, image_size).state_dict(), path)
    return str(path)


def trained_teacher(path, folder, arch: str = "convnet3", steps: int = 10, seed: int = 0, image_size: int = 32) -> str:
    """A teacher trained on `folder`'s images (ImageNet-normalised, `image_size` px) until it separates them."""
    from igds_fast.data import load_image_folder
    from igds_fast.evaluate.protocol import IMAGENET_MEAN, IMAGENET_STD, NormalizedInput

    images, labels, names, _ = load_image_folder(folder, image_size)
    torch.manual_seed(seed)
    network = _build(arch, len(names), image_size)
    model = NormalizedInput(network, IMAGENET_MEAN, IMAGENET_STD)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3 if not arch.startswith("torchvision:") else 1e-2)
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(images), labels).backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        accuracy = float((model(images).argmax(1) == labels).float().mean())
    assert accuracy == 1.0, f"the test teacher did not learn its classes ({accuracy:.2f})"
    torch.save({"model": network.state_dict()}, path)  # RDED's layout for subset teachers
    return str(path)


def permuted_teacher(source, path, arch: str = "convnet3", shift: int = 1, image_size: int = 32) -> str:
    """`source`'s teacher with its class rows rolled by `shift` (a class-order mismatch)."""
    from igds_fast.evaluate.teachers import class_count_keys, read_teacher_file, teacher_builder

    state = read_teacher_file(str(source))
    for key in class_count_keys(teacher_builder(arch, image_size), arch):
        state[key] = torch.roll(state[key], shifts=shift, dims=0)
    torch.save(state, path)
    return str(path)
