"""data.check_labelled_images: the one labelled-data check of train-ve, train-prior and calibrate-beta."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from igds_fast.data import FolderImages, check_labelled_images
from igds_fast.errors import IGDSInputError

NAMES = ["cat", "dog", "eel"]
VE_CHECK = dict(what="training", channels=1, channels_expected_by="the VE")


def _data(count=9, channels=1):
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(count, channels, 4, 4, generator=generator) * 2 - 1
    return images, torch.arange(count) % 3


def test_good_data_returns_int64_labels_and_a_name_list():
    images, labels = _data()
    checked, names = check_labelled_images(images, labels.to(torch.int32), tuple(NAMES), **VE_CHECK)
    assert checked.dtype == torch.int64 and torch.equal(checked, labels) and names == NAMES


def _defect(case):
    images, labels = _data()
    names = list(NAMES)
    if case == "not_a_tensor":
        images = images.numpy()
    elif case == "integer_images":
        images = (images * 100).to(torch.int64)
    elif case == "three_dims":
        images = images[:, 0]
    elif case == "empty":
        images, labels = images[:0], labels[:0]
    elif case == "channels":
        images = images.repeat(1, 3, 1, 1)
    elif case == "labels_length":
        labels = labels[:-1]
    elif case == "labels_list":
        labels = labels.tolist()
    elif case == "bool_labels":
        labels = labels > 0
    elif case == "float_labels":
        labels = labels.float()
    elif case == "label_too_large":
        labels = labels.clone()
        labels[2] = 3
    elif case == "nan":
        images = images.clone()
        images[1, 0, 2, 2] = float("nan")
    elif case == "out_of_range":
        images = images * 3
    elif case == "one_class":
        names, labels = names[:1], torch.zeros_like(labels)
    elif case == "repeated_name":
        names = ["cat", "dog", "cat"]
    elif case == "names_not_strings":
        names = [0, 1, 2]
    return images, labels, names


@pytest.mark.parametrize("case, message", [
    ("not_a_tensor", r"training images must be a float \[N, C, H, W\] tensor in \[-1, 1\], got ndarray"),
    ("integer_images", r"must be a float .*, got torch.int64 \(9, 1, 4, 4\)"),
    ("three_dims", r"must be a float .*, got torch.float32 \(9, 4, 4\)"),
    ("empty", "no training images given"),
    ("channels", r"training images have 3 channel\(s\); the VE expects 1"),
    ("labels_length", r"training labels must be a \[9\] tensor"),
    ("labels_list", r"training labels must be a \[9\] tensor"),
    ("bool_labels", "labels must be integers"),
    ("float_labels", "labels must be integers"),
    ("label_too_large", r"labels span \[0, 3\] but there are 3 class names \(labels must lie in \[0, 2\]\)"),
    ("nan", "non-finite"),
    ("out_of_range", r"must lie in \[-1, 1\]"),
    ("one_class", "at least 2 classes"),
    ("repeated_name", "distinct"),
    ("names_not_strings", "sequence of strings"),
])
def test_each_defect_is_one_line(case, message):
    images, labels, names = _defect(case)
    with pytest.raises(IGDSInputError, match=message) as info:
        check_labelled_images(images, labels, names, **VE_CHECK)
    assert "\n" not in str(info.value)


def test_rescale_rounding_is_forgiven_but_not_more():
    images, labels = _data()
    images[0, 0, 0, 0], images[0, 0, 0, 1] = 1.00005, -1.00005
    check_labelled_images(images, labels, NAMES, **VE_CHECK)
    images[0, 0, 0, 0] = 1.001
    with pytest.raises(IGDSInputError, match=r"\[-1, 1\]"):
        check_labelled_images(images, labels, NAMES, **VE_CHECK)


def test_a_set_of_allowed_channel_counts():
    for channels in (1, 3):
        images, labels = _data(channels=channels)
        check_labelled_images(images, labels, NAMES, what="training", channels=(1, 3), channels_expected_by="the prior")
    images, labels = _data(channels=2)
    with pytest.raises(IGDSInputError, match=r"2 channel\(s\); the prior expects 1 or 3"):
        check_labelled_images(images, labels, NAMES, what="training", channels=(1, 3), channels_expected_by="the prior")


def test_every_class_only_when_required():
    images, labels = _data()
    labels = labels.clone()
    labels[labels == 1] = 0  # no 'dog'
    check_labelled_images(images, labels, NAMES, **VE_CHECK)
    with pytest.raises(IGDSInputError, match=r"training data has no images of class\(es\) \['dog'\]"):
        check_labelled_images(images, labels, NAMES, require_every_class=True, **VE_CHECK)


@pytest.fixture
def folder(tmp_path):
    rng = np.random.default_rng(0)
    for index, name in enumerate(NAMES):
        (tmp_path / name).mkdir()
        for image in range(2):
            pixels = rng.integers(0, 256, size=(6, 6), dtype=np.uint8)
            Image.fromarray(pixels, mode="L").save(tmp_path / name / f"{image}.png")
    return FolderImages(tmp_path, 4, channels=1, in_memory=True, num_workers=0)


def test_a_folder_brings_its_own_labels_and_must_follow_the_class_order(folder):
    with pytest.raises(IGDSInputError, match=r"tensor in \[-1, 1\], got FolderImages"):  # only where the caller streams
        check_labelled_images(folder, None, NAMES, **VE_CHECK)
    with pytest.raises(IGDSInputError, match=r"tensor in \[-1, 1\] or a FolderImages, got list"):
        check_labelled_images([folder], None, NAMES, accept_folder=True, **VE_CHECK)
    labels, names = check_labelled_images(folder, None, NAMES, accept_folder=True, require_every_class=True, **VE_CHECK)
    assert torch.equal(labels, folder.labels) and names == NAMES
    with pytest.raises(IGDSInputError, match=r"has classes \['cat', 'dog', 'eel'\], expected \['dog', 'cat', 'eel'\]"):
        check_labelled_images(folder, None, ["dog", "cat", "eel"], accept_folder=True, **VE_CHECK)
    with pytest.raises(IGDSInputError, match=r"1 channel\(s\); the VE expects 3"):
        check_labelled_images(folder, None, NAMES, what="training", channels=3, channels_expected_by="the VE",
                              accept_folder=True)
