"""EncoderPreprocess: [-1, 1] -> [0, 1] -> bilinear resize -> per-channel normalisation."""
import math

import numpy as np
import pytest
import torch

from igds_fast.errors import IGDSInputError
import igds_fast.preprocess as preprocess_module
from igds_fast.preprocess import IMAGENET_MEAN, IMAGENET_STD, EncoderPreprocess, bilinear_matrix, bilinear_resize_matmul


@pytest.fixture(params=["interpolate", "matmul"])
def resize_route(request, monkeypatch):
    """Both resize routes: F.interpolate (CPU) and the matrix form CUDA takes (forced here on CPU)."""
    monkeypatch.setattr(preprocess_module, "_resize_by_matmul", lambda x: request.param == "matmul")
    return request.param


def _bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out, in] weights of 1-D bilinear resampling, align_corners=False, written from the definition:
    output pixel o samples the input at src = (o + 0.5) * in/out - 0.5 (clamped at 0), splitting its
    weight between floor(src) and the next pixel (clamped at the border)."""
    matrix = np.zeros((out_size, in_size))
    scale = in_size / out_size
    for o in range(out_size):
        src = max((o + 0.5) * scale - 0.5, 0.0)
        i0 = min(int(math.floor(src)), in_size - 1)
        i1 = min(i0 + 1, in_size - 1)
        lam = src - i0
        matrix[o, i0] += 1.0 - lam
        matrix[o, i1] += lam
    return matrix


def _hand_preprocess(x: torch.Tensor, resolution: int, mean, std) -> np.ndarray:
    images = (x.double().numpy() + 1.0) / 2.0  # [B, C, H, W]
    rows = _bilinear_matrix(images.shape[2], resolution)
    cols = _bilinear_matrix(images.shape[3], resolution)
    resized = np.einsum("oh,bchw,pw->bcop", rows, images, cols)
    return (resized - np.asarray(mean)[None, :, None, None]) / np.asarray(std)[None, :, None, None]


@pytest.mark.parametrize("in_hw,resolution", [((40, 40), 32), ((24, 24), 32), ((37, 29), 16), ((32, 32), 32)])
def test_matches_hand_computation(rng_seed, in_hw, resolution, resize_route, monkeypatch):
    pre = EncoderPreprocess(resolution, IMAGENET_MEAN, IMAGENET_STD)
    x = torch.rand(3, 3, *in_hw) * 2 - 1
    calls = []
    monkeypatch.setattr(preprocess_module, "bilinear_resize_matmul",
                        lambda *args: calls.append(1) or bilinear_resize_matmul(*args))
    out = pre(x)
    assert len(calls) == (resize_route == "matmul" and in_hw != (resolution, resolution))
    assert out.shape == (3, 3, resolution, resolution) and out.dtype == torch.float32
    expected = _hand_preprocess(x, resolution, IMAGENET_MEAN, IMAGENET_STD)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5, atol=1e-5)


def test_same_size_is_exact_affine_map(rng_seed):
    mean, std = (0.3,), (0.7,)
    pre = EncoderPreprocess(16, mean, std)
    x = torch.rand(2, 1, 16, 16, dtype=torch.float64) * 2 - 1
    out = pre(x)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, ((x + 1) / 2 - 0.3) / 0.7, rtol=1e-15, atol=1e-15)


@pytest.mark.parametrize("in_size,resolution", [(12, 8), (6, 9), (8, 8)])
def test_gradcheck_float64(rng_seed, in_size, resolution, resize_route):
    pre = EncoderPreprocess(resolution, (0.2, 0.5), (0.3, 1.7))
    x = (torch.rand(2, 2, in_size, in_size + 1, dtype=torch.float64) * 2 - 1).requires_grad_(True)
    assert torch.autograd.gradcheck(pre, (x,), eps=1e-6, atol=1e-8)


def test_buffers_and_serialisable_fields():
    pre = EncoderPreprocess(224, IMAGENET_MEAN, IMAGENET_STD)
    assert pre.resolution == 224 and pre.mean == IMAGENET_MEAN and pre.std == IMAGENET_STD
    assert isinstance(pre.mean, tuple) and isinstance(pre.std, tuple)
    assert pre.mean_buffer.shape == (1, 3, 1, 1) and pre.std_buffer.shape == (1, 3, 1, 1)
    torch.testing.assert_close(pre.std_buffer.flatten(), torch.tensor(IMAGENET_STD, dtype=torch.float64))
    # The statistics travel in the VE header, not in state dicts.
    assert pre.state_dict() == {}
    assert pre.to(torch.float32).mean_buffer.dtype == torch.float32


def test_gradient_flows_to_input(rng_seed):
    pre = EncoderPreprocess(32, IMAGENET_MEAN, IMAGENET_STD)
    x = (torch.rand(2, 3, 48, 48) * 2 - 1).requires_grad_(True)
    weights = torch.randn(2, 3, 32, 32)
    (pre(x) * weights).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "args,match",
    [
        ((0, IMAGENET_MEAN, IMAGENET_STD), "resolution"),
        ((32.0, IMAGENET_MEAN, IMAGENET_STD), "resolution"),
        ((32, (0.5, 0.5), IMAGENET_STD), "2 channels but std has 3"),
        ((32, IMAGENET_MEAN, (0.2, 0.0, 0.2)), "std must be positive"),
        ((32, (), ()), "empty"),
        ((32, (0.5, float("nan"), 0.5), IMAGENET_STD), "finite"),
    ],
)
def test_bad_construction(args, match):
    with pytest.raises(IGDSInputError, match=match):
        EncoderPreprocess(*args)


def test_bad_inputs():
    pre = EncoderPreprocess(32, IMAGENET_MEAN, IMAGENET_STD)
    with pytest.raises(IGDSInputError, match="3-channel images.*got 1 channels"):
        pre(torch.rand(2, 1, 32, 32))
    with pytest.raises(IGDSInputError, match=r"\[B, C, H, W\]"):
        pre(torch.rand(3, 32, 32))
    with pytest.raises(IGDSInputError, match="floating-point"):
        pre(torch.randint(0, 255, (1, 3, 32, 32), dtype=torch.uint8))


@pytest.mark.parametrize("in_size,out_size", [(256, 224), (64, 224), (37, 16), (5, 3), (1, 4)])
def test_bilinear_matrix_is_the_definition(in_size, out_size):
    matrix = bilinear_matrix(in_size, out_size, "cpu", torch.float64)
    np.testing.assert_allclose(matrix.numpy(), _bilinear_matrix(in_size, out_size), rtol=0, atol=1e-15)


@pytest.mark.parametrize("in_hw,size", [((256, 256), 224), ((64, 64), 224), ((37, 29), 16)])
def test_matrix_resize_matches_interpolate_forward_and_backward_in_float32(rng_seed, in_hw, size):
    x = (torch.rand(2, 3, *in_hw) * 2 - 1).requires_grad_(True)
    expected = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    actual = bilinear_resize_matmul(x, size)
    grad_out = torch.randn_like(expected)
    (expected_grad,) = torch.autograd.grad(expected, x, grad_out)
    (actual_grad,) = torch.autograd.grad(actual, x, grad_out)
    # fp32 weights at source positions up to ~in_size: a few ulp of the position, times pixel steps
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(actual_grad, expected_grad, rtol=1e-5, atol=2e-5)


def test_matrix_resize_compiles_in_one_graph_with_its_backward():
    # The compiled backend traces the encoder input transform with fullgraph=True on CUDA.
    x = (torch.rand(2, 3, 20, 20) * 2 - 1).requires_grad_(True)
    compiled = torch.compile(lambda t: bilinear_resize_matmul(t, 14).square().sum(), backend="aot_eager",
                             fullgraph=True)
    (grad,) = torch.autograd.grad(compiled(x), x)
    (expected,) = torch.autograd.grad(bilinear_resize_matmul(x, 14).square().sum(), x)
    torch.testing.assert_close(grad, expected, rtol=1e-6, atol=1e-6)
