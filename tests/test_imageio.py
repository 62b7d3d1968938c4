"""uint8 conversion, atomic deterministic writes, composites and preview grids."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import igds_fast.imageio as imageio
from igds_fast.errors import IGDSInputError
from igds_fast.imageio import (
    make_composite,
    make_preview_grid,
    save_png_atomic,
    to_uint8,
    write_json_atomic,
)


def test_to_uint8_formula_and_layout(rng_seed):
    images = torch.rand(2, 3, 5, 7) * 2.4 - 1.2  # includes out-of-range values that must saturate
    out = to_uint8(images)
    assert out.dtype == np.uint8 and out.shape == (2, 5, 7, 3)
    expected = ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(out, expected)
    anchors = to_uint8(torch.tensor([-1.0, 0.0, 1.0, 2.0]).view(1, 1, 4))
    assert anchors[:, :, 0].tolist() == [[0, 128, 255, 255]]
    assert to_uint8(images[0]).shape == (5, 7, 3)


def test_to_uint8_rejects_nan():
    bad = torch.zeros(3, 2, 2)
    bad[0, 0, 0] = float("nan")
    with pytest.raises(IGDSInputError, match="NaN"):
        to_uint8(bad)


def test_png_rewrite_is_byte_identical_and_roundtrips(tmp_path, rng_seed):
    image = torch.rand(3, 9, 11) * 2 - 1
    first, second = tmp_path / "a.png", tmp_path / "b.png"
    save_png_atomic(first, image)
    save_png_atomic(second, image.clone())
    assert first.read_bytes() == second.read_bytes()
    save_png_atomic(first, image)  # overwrite in place
    assert first.read_bytes() == second.read_bytes()
    np.testing.assert_array_equal(np.asarray(Image.open(first)), to_uint8(image))
    assert sorted(os.listdir(tmp_path)) == ["a.png", "b.png"]  # no temp files left


def test_png_grayscale(tmp_path, rng_seed):
    array = np.random.default_rng(rng_seed).integers(0, 256, size=(6, 4, 1), dtype=np.uint8)
    save_png_atomic(tmp_path / "g.png", array)
    loaded = Image.open(tmp_path / "g.png")
    assert loaded.mode == "L"
    np.testing.assert_array_equal(np.asarray(loaded), array[:, :, 0])


def test_failure_mid_write_leaves_no_final_file(tmp_path, monkeypatch, rng_seed):
    image = torch.rand(3, 4, 4) * 2 - 1

    def failing_fsync(fd):
        raise OSError("simulated disk failure")

    monkeypatch.setattr(imageio.os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="simulated"):
        save_png_atomic(tmp_path / "x.png", image)
    assert os.listdir(tmp_path) == []
    with pytest.raises(OSError, match="simulated"):
        write_json_atomic(tmp_path / "r.json", {"a": 1})
    assert os.listdir(tmp_path) == []


def test_failure_keeps_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "r.json"
    write_json_atomic(path, {"version": 1})
    original = path.read_bytes()

    def failing_replace(src, dst):
        raise OSError("simulated crash before rename")

    monkeypatch.setattr(imageio.os, "replace", failing_replace)
    with pytest.raises(OSError):
        write_json_atomic(path, {"version": 2})
    assert path.read_bytes() == original
    assert os.listdir(tmp_path) == ["r.json"]


def test_write_json_atomic_content(tmp_path):
    obj = {"network": "convnet3", "accuracies": [51.5, 49.25], "name": "Schäferhund"}
    write_json_atomic(tmp_path / "r.json", obj)
    text = (tmp_path / "r.json").read_text(encoding="utf-8")
    assert json.loads(text) == obj and text.endswith("\n")
    with pytest.raises(TypeError):
        write_json_atomic(tmp_path / "bad.json", {"x": object()})
    assert not (tmp_path / "bad.json").exists()
    with pytest.raises(IGDSInputError, match="does not exist"):
        write_json_atomic(tmp_path / "missing" / "r.json", obj)


def test_composite_layout_with_distinct_constant_images():
    values = torch.tensor([-0.75, -0.25, 0.25, 0.75])
    images = values.view(4, 1, 1, 1).expand(4, 3, 8, 6).clone()
    composite = make_composite(images)
    assert composite.shape == (3, 8, 6)
    # Row-major: 0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right; each half the side.
    assert torch.all(composite[:, :4, :3] == values[0])
    assert torch.all(composite[:, :4, 3:] == values[1])
    assert torch.all(composite[:, 4:, :3] == values[2])
    assert torch.all(composite[:, 4:, 3:] == values[3])


def test_composite_even_side_is_2x2_average(rng_seed):
    images = torch.rand(4, 3, 6, 6) * 2 - 1
    composite = make_composite(images)
    expected_top_left = images[0].view(3, 3, 2, 3, 2).mean(dim=(2, 4))
    torch.testing.assert_close(composite[:, :3, :3], expected_top_left)
    expected_bottom_right = images[3].view(3, 3, 2, 3, 2).mean(dim=(2, 4))
    torch.testing.assert_close(composite[:, 3:, 3:], expected_bottom_right)


def test_composite_odd_side_keeps_size_and_layout():
    values = torch.tensor([10.0, 60.0, 130.0, 250.0])
    images = values.view(4, 1, 1, 1).expand(4, 1, 7, 5).to(torch.uint8).clone()
    composite = make_composite(images)
    assert composite.shape == (1, 7, 5) and composite.dtype == torch.uint8
    assert torch.all(composite[:, :4, :3] == 10) and torch.all(composite[:, :4, 3:] == 60)
    assert torch.all(composite[:, 4:, :3] == 130) and torch.all(composite[:, 4:, 3:] == 250)


def test_composite_rejects_wrong_count():
    with pytest.raises(IGDSInputError, match="4 images"):
        make_composite(torch.rand(3, 3, 8, 8))


def test_preview_grid_rows_and_padding(rng_seed):
    row_a = [torch.rand(3, 4, 5) for _ in range(3)]
    row_b = torch.rand(2, 3, 4, 5)
    grid = make_preview_grid([row_a, row_b], padding=1, pad_value=-1.0)
    assert grid.shape == (3, 1 + 2 * 5, 1 + 3 * 6)
    torch.testing.assert_close(grid[:, 1:5, 1:6], row_a[0])
    torch.testing.assert_close(grid[:, 1:5, 13:18], row_a[2])
    torch.testing.assert_close(grid[:, 6:10, 7:12], row_b[1])
    assert torch.all(grid[:, 6:10, 13:18] == -1.0)  # short row filled
    assert torch.all(grid[:, 0, :] == -1.0)  # gutter


def test_preview_grid_max_rows(rng_seed):
    rows = [[torch.rand(1, 2, 2)] for _ in range(30)]
    assert make_preview_grid(rows, max_rows=20, padding=0).shape == (1, 40, 2)
    with pytest.raises(IGDSInputError, match="shape"):
        make_preview_grid([[torch.rand(1, 2, 2)], [torch.rand(1, 3, 3)]])


def test_uint8_tensor_inputs_are_chw(tmp_path, rng_seed):
    generator = torch.Generator().manual_seed(rng_seed)
    chw = torch.randint(0, 256, (3, 5, 4), dtype=torch.uint8, generator=generator)
    assert np.array_equal(to_uint8(chw), chw.permute(1, 2, 0).numpy())
    save_png_atomic(tmp_path / "u.png", chw)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "u.png")), chw.permute(1, 2, 0).numpy())
