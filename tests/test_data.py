"""ImageFolder loading (layout, preprocessing, errors, corrupt files) and the digits split."""
import numpy as np
import pytest
import torch
from PIL import Image

from igds_fast.data import load_digits_split, load_image_folder, resize_and_center_crop, stratified_split
from igds_fast.errors import IGDSInputError


def _write_image(path, rng, size=(12, 10), mode="RGB"):
    channels = 3 if mode == "RGB" else 1
    pixels = rng.integers(0, 256, size=(size[1], size[0], channels), dtype=np.uint8)
    Image.fromarray(pixels if channels == 3 else pixels[:, :, 0], mode=mode).save(path)
    return pixels


@pytest.fixture
def folder(tmp_path, rng_seed):
    """root/{cat,dog,eel}: 2 png + 1 JPG (upper case), 1 bmp, 1 webp, plus a non-image file."""
    rng = np.random.default_rng(rng_seed)
    root = tmp_path / "set"
    for name in ("dog", "cat", "eel"):
        (root / name).mkdir(parents=True)
    _write_image(root / "cat" / "a.png", rng)
    _write_image(root / "cat" / "b.png", rng, size=(9, 14))
    _write_image(root / "cat" / "c.JPG", rng)
    _write_image(root / "dog" / "x.bmp", rng, size=(8, 8))
    _write_image(root / "eel" / "y.webp", rng, size=(20, 8))
    (root / "eel" / "notes.txt").write_text("not an image")
    return root


def test_load_folder_layout_labels_and_range(folder):
    images, labels, names, report = load_image_folder(folder, image_size=8)
    assert names == ["cat", "dog", "eel"]
    assert images.shape == (5, 3, 8, 8) and images.dtype == torch.float32
    assert labels.tolist() == [0, 0, 0, 1, 2]
    assert images.min() >= -1 and images.max() <= 1
    assert report.images_per_class == {"cat": 3, "dog": 1, "eel": 1}
    assert report.num_loaded == 5 and report.num_skipped_corrupt == 0
    # The 8x8 bmp needs no resampling: its pixels come back exactly.
    bmp = np.asarray(Image.open(folder / "dog" / "x.bmp"))
    as_uint8, _, _, _ = load_image_folder(folder, image_size=8, as_uint8=True)
    assert as_uint8.dtype == torch.uint8
    np.testing.assert_array_equal(as_uint8[3].permute(1, 2, 0).numpy(), bmp)
    torch.testing.assert_close(images[3], as_uint8[3].float() / 127.5 - 1)


def test_load_folder_grayscale_and_class_order(folder):
    images, labels, names, _ = load_image_folder(folder, 6, channels=1, class_names=["eel", "cat", "dog"])
    assert images.shape == (5, 1, 6, 6)
    assert names == ["eel", "cat", "dog"]
    assert labels.tolist() == [0, 1, 1, 1, 2]


def test_ignore_unlisted_folders(folder):
    images, labels, names, report = load_image_folder(folder, 8, class_names=["eel", "cat"], ignore_unlisted=True)
    assert names == ["eel", "cat"] and labels.tolist() == [0, 1, 1, 1]
    assert report.images_per_class == {"eel": 1, "cat": 3}


def test_class_order_mismatch_errors(folder):
    with pytest.raises(IGDSInputError, match="'eel'"):
        load_image_folder(folder, 8, class_names=["cat", "dog"])
    with pytest.raises(IGDSInputError, match="'fox'"):
        load_image_folder(folder, 8, class_names=["cat", "dog", "eel", "fox"])


def test_resize_shorter_side_then_center_crop():
    # A 20x10 image whose left/right quarters are black and middle half white: centre crop of
    # the 10x5 -> 5x5 resize must be (almost) all white, proving crop (not squash) and centring.
    pixels = np.zeros((10, 20), dtype=np.uint8)
    pixels[:, 5:15] = 255
    out = np.asarray(resize_and_center_crop(Image.fromarray(pixels), 5))
    assert out.shape == (5, 5)
    assert out[:, 1:4].min() == 255
    tall = resize_and_center_crop(Image.fromarray(np.zeros((30, 12), dtype=np.uint8)), 6)
    assert tall.size == (6, 6)


def test_corrupt_image_skip_and_fail(folder):
    bad = folder / "cat" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    truncated = folder / "dog" / "z.png"
    good = Image.fromarray(np.full((16, 16, 3), 200, dtype=np.uint8))
    good.save(truncated)
    data = truncated.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    images, labels, _, report = load_image_folder(folder, 8, on_corrupt="skip")
    assert images.shape[0] == 5
    assert report.num_skipped_corrupt == 2
    assert sorted(report.skipped_paths) == sorted([str(bad), str(truncated)])
    with pytest.raises(IGDSInputError, match="broken.png"):
        load_image_folder(folder, 8, on_corrupt="fail")


def test_class_with_only_corrupt_images_is_an_error(folder):
    (folder / "dog" / "x.bmp").write_bytes(b"BM not really")
    with pytest.raises(IGDSInputError, match="'dog'"):
        load_image_folder(folder, 8)


def test_structural_errors(tmp_path, folder):
    with pytest.raises(IGDSInputError, match="does not exist"):
        load_image_folder(tmp_path / "nope", 8)
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.fromarray(np.zeros((4, 4), dtype=np.uint8)).save(flat / "a.png")
    with pytest.raises(IGDSInputError, match="no class sub-folders"):
        load_image_folder(flat, 8)
    (folder / "fox").mkdir()
    (folder / "fox" / "readme.md").write_text("x")
    with pytest.raises(IGDSInputError, match="fox"):
        load_image_folder(folder, 8)


def test_bad_arguments(folder):
    with pytest.raises(IGDSInputError, match="image_size"):
        load_image_folder(folder, 0)
    with pytest.raises(IGDSInputError, match="channels"):
        load_image_folder(folder, 8, channels=4)
    with pytest.raises(IGDSInputError, match="on_corrupt"):
        load_image_folder(folder, 8, on_corrupt="ignore")


def test_digits_split_is_fixed_stratified_and_scaled():
    train_x, train_y, test_x, test_y = load_digits_split(image_size=16, test_fraction=0.3, seed=0)
    assert train_x.shape[1:] == (1, 16, 16) and test_x.shape[1:] == (1, 16, 16)
    assert train_x.shape[0] + test_x.shape[0] == 1797
    assert train_x.min() >= -1 and train_x.max() <= 1 and train_x.std() > 0.3
    assert train_x.min() == -1 and train_x.max() > 0.9  # the 0..16 range maps onto [-1, 1]
    train_counts = torch.bincount(train_y, minlength=10)
    test_counts = torch.bincount(test_y, minlength=10)
    fractions = test_counts.float() / (train_counts + test_counts).float()
    assert torch.all((fractions - 0.3).abs() < 0.01)
    again = load_digits_split(image_size=16, test_fraction=0.3, seed=0)
    for first, second in zip((train_x, train_y, test_x, test_y), again):
        assert torch.equal(first, second)
    other = load_digits_split(image_size=16, test_fraction=0.3, seed=1)
    assert not torch.equal(test_y, other[3]) or not torch.equal(test_x, other[2])


def test_digits_native_size_matches_sklearn():
    from sklearn.datasets import load_digits

    train_x, train_y, test_x, test_y = load_digits_split(image_size=8, seed=0)
    digits = load_digits()
    train_index, test_index = stratified_split(digits.target, 0.3, 0)
    expected = torch.from_numpy(digits.images[test_index] / 8.0 - 1.0).float().unsqueeze(1)
    torch.testing.assert_close(test_x, expected)
    assert test_y.tolist() == digits.target[test_index].tolist()
    assert set(train_index.tolist()).isdisjoint(test_index.tolist())


def test_digits_bad_arguments():
    with pytest.raises(IGDSInputError, match="test_fraction"):
        load_digits_split(test_fraction=1.0)
