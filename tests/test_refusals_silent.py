"""Issue 26, "silently wrong": inputs are decoded faithfully or refused in one line, never quietly changed.

* 16-bit PNGs (and every other pixel format PIL can give) are scaled to 8 bits, not clipped;
* ±Inf (and NaN) in any weight is refused when the file loads;
* `distill --select s3` checks its `--real` images with the other inputs, before any sampling.
"""
from __future__ import annotations

import os
import shutil
import zlib
import struct

import numpy as np
import pytest
from PIL import Image

from igds_fast.data import FolderImages, load_image
from igds_fast.data.folders import UnsupportedImageMode, to_8bit


def write_png16(path, values: np.ndarray) -> None:
    """A 16-bit PNG (grey [H, W] or RGB [H, W, 3]) written byte by byte (PIL cannot write 16-bit RGB)."""
    height, width = values.shape[:2]
    color_type = 0 if values.ndim == 2 else 2
    raw = b"".join(b"\x00" + values[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    with open(path, "wb") as handle:
        handle.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


GRADIENT = np.arange(65536, dtype=np.uint32).reshape(256, 256)  # every 16-bit level once


def test_a_16_bit_grey_gradient_round_trips_within_one_level(tmp_path):
    path = tmp_path / "g16.png"
    write_png16(path, GRADIENT)
    assert Image.open(path).mode == "I;16"
    for channels in (1, 3):
        decoded = load_image(str(path), 256, channels).astype(np.int64)
        assert decoded.shape == (channels, 256, 256)
        assert np.abs(decoded - GRADIENT / 257.0).max() <= 0.5 + 1e-9  # round(v / 257): within 1 level
        assert (decoded == 255).mean() < 0.01  # PIL's own convert() saturates 99.6% of it
    # A 16-bit image saved from 8 bits (v = 257 x) reads back exactly.
    eight = (GRADIENT % 256).astype(np.uint32)
    write_png16(tmp_path / "x257.png", eight * 257)
    assert np.array_equal(load_image(str(tmp_path / "x257.png"), 256, 1)[0], eight.astype(np.uint8))


def test_a_16_bit_rgb_png_keeps_its_levels(tmp_path):
    path = tmp_path / "rgb16.png"
    write_png16(path, np.stack([GRADIENT, 65535 - GRADIENT, GRADIENT], axis=-1))
    decoded = load_image(str(path), 256, 3).astype(np.int64)
    assert np.abs(decoded[0] - GRADIENT / 257.0).max() <= 1.0
    assert np.abs(decoded[1] - (65535 - GRADIENT) / 257.0).max() <= 1.0


def _tiff_named_png(tmp_path, name, array) -> str:
    """PIL opens a file by its content: a TIFF named .png gives the modes PNG cannot hold (I, F)."""
    tiff = tmp_path / f"{name}.tiff"
    Image.fromarray(array).save(tiff)
    target = tmp_path / f"{name}.png"
    shutil.move(tiff, target)
    return str(target)


def test_32_bit_integer_and_float_images_are_scaled_or_refused(tmp_path):
    integer = _tiff_named_png(tmp_path, "i32", GRADIENT.astype(np.int32))
    assert Image.open(integer).mode == "I"
    assert np.abs(load_image(integer, 256, 1)[0] - GRADIENT / 257.0).max() <= 0.5 + 1e-9
    unit = _tiff_named_png(tmp_path, "f01", (GRADIENT / 65535.0).astype(np.float32))
    assert Image.open(unit).mode == "F"
    assert np.abs(load_image(unit, 256, 1)[0] - GRADIENT / 257.0).max() <= 0.5 + 1e-6
    wide = _tiff_named_png(tmp_path, "fwide", GRADIENT.astype(np.float32))
    with pytest.raises(UnsupportedImageMode, match=r"mode F\) with values in \[0, 65535\]"):
        load_image(wide, 256, 1)


def _modes(tmp_path) -> dict[str, str]:
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)  # square: no resize, no crop
    images = {
        "L": Image.fromarray(rgb[..., 0]),
        "RGB": Image.fromarray(rgb),
        "RGBA": Image.fromarray(np.concatenate([rgb, rgb[..., :1]], axis=-1)),
        "LA": Image.fromarray(rgb[..., 0]).convert("LA"),
        "1": Image.fromarray(rgb[..., 0] > 127),
        "P": Image.fromarray(rgb).convert("P"),
    }
    paths = {}
    for mode, image in images.items():
        paths[mode] = str(tmp_path / f"{mode}.png")
        image.save(paths[mode])
    transparent = Image.fromarray(rgb).convert("P")
    transparent.info["transparency"] = 3
    paths["P+transparency"] = str(tmp_path / "pt.png")
    transparent.save(paths["P+transparency"], transparency=3)
    paths["CMYK"] = str(tmp_path / "cmyk.jpg")
    Image.fromarray(rgb).convert("CMYK").save(paths["CMYK"])
    paths["JPEG-RGB"] = str(tmp_path / "rgb.jpg")
    Image.fromarray(rgb).save(paths["JPEG-RGB"], quality=90)
    paths["JPEG-L"] = str(tmp_path / "l.jpg")
    Image.fromarray(rgb[..., 0]).save(paths["JPEG-L"], quality=90)
    return paths


def test_eight_bit_modes_decode_as_they_always_did(tmp_path):
    """The 8-bit modes (PNG L / RGB / RGBA / LA / 1 / P, P with transparency, CMYK and RGB / L JPEGs)
    go through PIL's convert() exactly as before: alpha dropped, each pixel keeps its stored colour."""
    paths = _modes(tmp_path)
    for name, path in paths.items():
        with Image.open(path) as image:
            assert to_8bit(image) is image, name  # not touched
            for channels, target in ((1, "L"), (3, "RGB")):
                expected = np.asarray(image.convert(target), dtype=np.uint8)
                expected = expected[:, :, None] if expected.ndim == 2 else expected
                decoded = load_image(path, 12, channels)
                assert np.array_equal(decoded.transpose(1, 2, 0), expected), (name, channels)


def test_a_mode_without_an_8_bit_reading_is_refused_by_name(tmp_path):
    path = tmp_path / "lab.tiff"
    Image.new("LAB", (4, 4)).save(path)
    with Image.open(path) as image, pytest.raises(UnsupportedImageMode, match="pixel format LAB is not supported"):
        to_8bit(image)


def test_a_16_bit_folder_streams_and_holds_the_same_scaled_pixels(tmp_path, monkeypatch):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        write_png16(tmp_path / name / "0.png", GRADIENT[:64, :64] * (1 if name == "a" else 3))
    held = FolderImages(tmp_path, 64, channels=1, in_memory=True, num_workers=0)
    streamed = FolderImages(tmp_path, 64, channels=1, in_memory=False, num_workers=0)
    (x_held, _, _), = held.uint8_batches([[0, 1]])
    (x_streamed, _, _), = streamed.uint8_batches([[0, 1]])
    assert np.array_equal(x_held.numpy(), x_streamed.numpy())
    assert np.abs(x_held[1, 0].numpy() - GRADIENT[:64, :64] * 3 / 257.0).max() <= 0.5 + 1e-9


# ---- weights: Inf as well as NaN refused at load ---------------------------------------------------


def _rewrite_safetensors(path, change) -> None:
    """Rewrite a safetensors file with `change(tensors)` applied, keeping its metadata (header)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    change(tensors)
    save_file(tensors, str(path), metadata=metadata)


@pytest.fixture
def models(tmp_path):
    from factories import write_tiny_prior_and_ve

    prior, ve = write_tiny_prior_and_ve(tmp_path)
    return {"prior": prior, "ve": ve, "dir": tmp_path}


def _distill(models, out, *extra):
    from igds_fast import cli

    return cli.main(["distill", "--prior", models["prior"], "--ve", models["ve"], "--ipc", "1", "--steps", "2",
                     "--out", str(out), "--quiet", "--device", "cpu", *extra])


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("igds-fast: error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_a_prior_with_a_non_finite_weight_is_refused_before_sampling(models, capsys, value):
    def poison(tensors):
        key = sorted(k for k in tensors if k.endswith("weight"))[3]
        tensors[key].view(-1)[5] = value

    _rewrite_safetensors(models["prior"], poison)
    out = models["dir"] / "out"
    assert _distill(models, out) == 2
    line = _one_error_line(capsys)
    expected = "0 infinite and 1 NaN" if value != value else "1 infinite and 0 NaN"
    assert models["prior"] in line and f"is non-finite ({expected} value(s)" in line
    assert not any(out.rglob("*.png"))  # nothing sampled


@pytest.mark.parametrize("key", ["classifier.weight", "log_centroids", "encoder.conv1.weight"])
def test_a_ve_with_an_infinite_weight_is_refused_at_load(models, capsys, key):
    def poison(tensors):
        tensors[key].view(-1)[0] = float("inf")

    _rewrite_safetensors(models["ve"], poison)
    assert _distill(models, models["dir"] / "out") == 2
    line = _one_error_line(capsys)
    assert models["ve"] in line and "non-finite (1 infinite" in line and key.split(".", 1)[-1] in line


def test_the_adm_and_dit_loaders_refuse_infinite_weights(tmp_path):
    import torch

    from factories import tiny_adm, tiny_dit
    from igds_fast.errors import IGDSInputError
    from igds_fast.models.adm import adm_from_state_dict
    from igds_fast.models.dit import load_dit

    unet = tiny_adm()
    state = {k: v.clone() for k, v in unet.state_dict().items()}
    state["out.2.bias"][0] = float("-inf")
    flags = dict(image_size=16, num_channels=32, num_res_blocks=1, channel_mult=(1, 2), learn_sigma=True,
                 class_cond=True, attention_resolutions="8", num_head_channels=16, use_scale_shift_norm=True,
                 resblock_updown=True, dropout=0.0)
    with pytest.raises(IGDSInputError, match=r"out\.2\.bias is non-finite \(1 infinite"):
        adm_from_state_dict(state, source="checkpoint x.pt", **flags)
    dit = tiny_dit()
    state = {k: v.clone() for k, v in dit.state_dict().items()}
    state["final_layer.linear.weight"][0, 0] = float("inf")
    torch.save(state, tmp_path / "dit.pt")
    with pytest.raises(IGDSInputError, match=r"final_layer\.linear\.weight is non-finite \(1 infinite"):
        load_dit(tmp_path / "dit.pt", preset=None, num_heads=2)


@pytest.mark.parametrize("dtype", ["float16", "float64", "bfloat16"])
def test_a_ve_bundle_of_another_float_dtype_is_read_as_float32_and_samples(models, capsys, dtype):
    import torch

    def cast(tensors):
        for key, value in tensors.items():
            if value.is_floating_point():
                tensors[key] = value.to(getattr(torch, dtype))

    _rewrite_safetensors(models["ve"], cast)
    assert _distill(models, models["dir"] / "out") == 0, capsys.readouterr().err
    assert len(list((models["dir"] / "out").rglob("0000*.png"))) == 2


# ---- S³: --real is checked with the other inputs, before sampling ------------------------------------


def _real_folder(root, per_class=3) -> str:
    rng = np.random.default_rng(1)
    for name in ("cat", "dog"):
        os.makedirs(root / name)
        for index in range(per_class):
            Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(root / name / f"{index}.png")
    return str(root)


def _s3(models, real, out, *extra):
    return _distill(models, out, "--select", "s3", "--groups", "2", "--real", real, "--real-per-class", "3", *extra)


def test_a_corrupt_real_image_stops_s3_before_any_candidate_is_sampled(models, capsys, monkeypatch):
    monkeypatch.setenv("IGDS_DATA_WORKERS", "0")
    real = _real_folder(models["dir"] / "real")
    bad = os.path.join(real, "dog", "1.png")
    with open(bad, "r+b") as handle:
        handle.truncate(60)  # a truncated PNG
    out = models["dir"] / "out"
    assert _s3(models, real, out, "--on-corrupt", "fail") == 2
    line = _one_error_line(capsys)
    assert bad in line and "corrupt image" in line
    assert not os.path.exists(f"{out}.s3-candidates")  # nothing sampled, no candidate folder made
    assert not out.exists()


def test_s3_skips_and_counts_an_unreadable_real_image(models, capsys, monkeypatch):
    monkeypatch.setenv("IGDS_DATA_WORKERS", "0")
    real = _real_folder(models["dir"] / "real")
    (models["dir"] / "real" / "cat" / "2.png").write_bytes(b"not an image")
    out = models["dir"] / "out"
    assert _s3(models, real, out) == 0  # --on-corrupt skip is the default, as for the other commands
    assert "skipped 1 unreadable --real image(s)" in capsys.readouterr().err
    import json

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["selection"]["real"]["skipped_unreadable"] == 1
    assert len(list(out.rglob("0000*.png"))) == 2


def test_a_decompression_bomb_under_real_is_one_line(models, capsys, monkeypatch):
    """The 30000 x 30000 PNG of the issue, made small: PIL's pixel limit lowered to 1000 pixels."""
    monkeypatch.setenv("IGDS_DATA_WORKERS", "0")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    real = _real_folder(models["dir"] / "real")
    bomb = os.path.join(real, "cat", "0.png")
    Image.new("L", (100, 100)).save(bomb)  # 10,000 pixels: over twice the limit
    out = models["dir"] / "out"
    assert _s3(models, real, out, "--on-corrupt", "fail") == 2
    line = _one_error_line(capsys)
    assert bomb in line and "decompression bomb" in line
    assert not os.path.exists(f"{out}.s3-candidates")
