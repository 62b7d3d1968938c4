"""The fused encoder preprocessing (forward and gather backward) against the torch sequence."""
import os
import random

import pytest
import torch
import torch.nn.functional as F

from igds_fast.kernels import EncoderPreprocessFunction, encoder_preprocess, preprocess_backward, preprocess_forward
from igds_fast.preprocess import IMAGENET_MEAN, IMAGENET_STD, EncoderPreprocess

from tolerances import tolerance

gpu_only = pytest.mark.skipif(
    not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
    reason="needs a CUDA GPU with compiled Triton (IGDS_TEST_GPU=1)",
)


def torch_preprocess(x, mean, std, size):
    """The formula of igds_fast.preprocess.EncoderPreprocess, for non-square sizes too."""
    channels = x.shape[1]
    resized = F.interpolate((x + 1.0) / 2.0, size=size, mode="bilinear", align_corners=False, antialias=False)
    return (resized - mean.view(1, channels, 1, 1)) / std.view(1, channels, 1, 1)


# (B, C, H, W, OH, OW): downscale (the 256 -> 224 case in small), upscale, identity, mixed, 1-pixel.
SHAPES = [
    (2, 3, 16, 16, 14, 14),
    (1, 3, 8, 12, 28, 21),
    (2, 1, 7, 9, 7, 9),
    (1, 2, 13, 5, 4, 11),
    (1, 1, 1, 3, 5, 2),
]


@pytest.mark.parametrize("batch, channels, height, width, out_h, out_w", SHAPES)
def test_forward_and_backward_match_torch(rng_seed, batch, channels, height, width, out_h, out_w):
    x = torch.rand(batch, channels, height, width) * 2 - 1
    mean, std = torch.rand(channels) * 0.5 + 0.2, torch.rand(channels) * 0.3 + 0.15
    leaf = x.clone().requires_grad_(True)
    expected = torch_preprocess(leaf, mean, std, (out_h, out_w))
    grad_y = torch.randn_like(expected)
    (expected_grad,) = torch.autograd.grad(expected, leaf, grad_y)

    y = torch.full_like(expected, float("nan"))
    preprocess_forward(x, mean, std, (out_h, out_w), out=y)
    grad_x = torch.full_like(x, float("nan"))
    preprocess_backward(grad_y, std, (height, width), out=grad_x)
    assert not torch.isnan(y).any() and not torch.isnan(grad_x).any()
    # "reduction": a 4-tap weighted sum summed in another order than PyTorch's, then divided by
    # std ~ 0.15 (x6.7), where the mean subtraction can cancel the value to ~0: a few 1e-6 absolute.
    torch.testing.assert_close(y, expected.detach(), **tolerance(torch.float32, "reduction"))
    torch.testing.assert_close(grad_x, expected_grad, **tolerance(torch.float32, "reduction"))


def test_backward_window_covers_random_ratios(rng_seed):
    # The gather window must reach every output tap for any ratio up to 3x either way.
    rng = random.Random(rng_seed)
    for _ in range(8):
        height, width = rng.randint(1, 12), rng.randint(1, 12)
        out_h, out_w = rng.randint(max(1, height // 3), 3 * height), rng.randint(max(1, width // 3), 3 * width)
        leaf = torch.zeros(1, 1, height, width, requires_grad=True)
        resized = F.interpolate(leaf, size=(out_h, out_w), mode="bilinear", align_corners=False)
        grad_y = torch.randn_like(resized)
        (expected,) = torch.autograd.grad(resized, leaf, grad_y)
        got = preprocess_backward(grad_y, torch.tensor([0.5]), (height, width))  # 0.5 / std = 1
        torch.testing.assert_close(got, expected, **tolerance(torch.float32, "reduction"))


def test_autograd_function_matches_encoder_preprocess_module(rng_seed):
    module = EncoderPreprocess(12, IMAGENET_MEAN, IMAGENET_STD)
    x = (torch.rand(3, 3, 16, 16) * 2 - 1).requires_grad_(True)
    expected = module(x)
    got = encoder_preprocess(x, module.mean_buffer, module.std_buffer, module.resolution)
    torch.testing.assert_close(got, expected, **tolerance(torch.float32, "reduction"))
    weights = torch.randn_like(expected)
    (expected_grad,) = torch.autograd.grad((expected * weights).sum(), x)
    (got_grad,) = torch.autograd.grad((got * weights).sum(), x)
    torch.testing.assert_close(got_grad, expected_grad, **tolerance(torch.float32, "reduction"))
    assert got.grad_fn.__class__.__name__ == EncoderPreprocessFunction.__name__ + "Backward"


@gpu_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_real_size_gpu(rng_seed, dtype):
    module = EncoderPreprocess(224, IMAGENET_MEAN, IMAGENET_STD).cuda()
    x = (torch.rand(4, 3, 256, 256, device="cuda") * 2 - 1).to(dtype).requires_grad_(True)
    expected = module(x.float())
    got = encoder_preprocess(x, module.mean_buffer, module.std_buffer, 224)
    torch.testing.assert_close(got.float(), expected, **tolerance(dtype, "elementwise"))
    weights = torch.randn_like(expected)
    (expected_grad,) = torch.autograd.grad((expected * weights).sum(), x)
    (got_grad,) = torch.autograd.grad((got.float() * weights).sum(), x)
    torch.testing.assert_close(got_grad.float(), expected_grad.float(), **tolerance(dtype, "reduction"))
