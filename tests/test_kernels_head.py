"""The fused Triton guidance head against the eager closed forms (`igds_objective_and_grad`).

Runs under TRITON_INTERPRET=1 on CPU (tests/conftest.py): small shapes, fp32. Every launch writes
into NaN-poisoned outputs and NaN-poisoned scratch, so an element the kernels skip cannot pass.
"""
import math
import os

import pytest
import torch

from igds_fast.errors import IGDSInputError
from igds_fast.guidance import IGDSGuidance
from igds_fast.kernels import guidance_head, poisoned_scratch
from igds_fast.guidance.objective import igds_objective_and_grad

from tolerances import tolerance

gpu_only = pytest.mark.skipif(
    not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
    reason="needs a CUDA GPU with compiled Triton (IGDS_TEST_GPU=1)",
)


def head_inputs(batch, dim, classes, device="cpu", dtype=torch.float32):
    z = torch.randn(batch, dim, device=device) * 2 + 0.3  # never zero; off-centre like pooled features
    labels = torch.randint(0, classes, (batch,), device=device)
    weight = torch.randn(classes, dim, device=device) / math.sqrt(dim)
    bias = torch.randn(classes, device=device)
    log_q = torch.log_softmax(torch.randn(classes, dim, device=device) * 2, dim=1)
    return z.to(dtype), labels, weight, bias, log_q


def make_groups(kind, labels):
    batch = labels.shape[0]
    if kind is None:
        return None
    if kind == "random":
        return torch.randint(0, 3, (batch,), device=labels.device)
    if kind == "singletons":  # every group of size 1: the diversity term vanishes
        return torch.arange(batch, device=labels.device) * 7 - 3
    if kind == "one_alone":  # one group of size 1 next to a larger group
        groups = torch.zeros(batch, dtype=torch.long, device=labels.device)
        groups[batch // 2] = 5
        return groups
    raise ValueError(kind)


def reference(z, labels, weight, bias, log_q, beta, tau, gamma, groups):
    objective, grad = igds_objective_and_grad(
        z.double(), labels, weight.double(), bias.double(), log_q.double(), beta, tau, gamma, groups
    )
    return objective.float(), grad.float()


def poisoned_call(z, labels, weight, bias, log_q, beta, tau, gamma, groups, **kwargs):
    objective = torch.full((z.shape[0],), float("nan"), device=z.device)
    grad = torch.full(z.shape, float("nan"), device=z.device)
    with poisoned_scratch():
        got = guidance_head(z, labels, weight, bias, log_q, beta, tau, gamma, groups, out=(objective, grad), **kwargs)
    assert got[0] is objective and got[1] is grad
    return objective, grad


# (B, d, C): B = 1, C = 1, non-powers of two, masked tails in every axis, two row tiles (B > 32).
SHAPES = [(1, 7, 1), (5, 33, 3), (12, 160, 20), (9, 70, 10), (37, 20, 3)]
CONFIGS = [
    (0.0, 1.0, 0.0, None),          # prototype term only
    (0.7, 0.5, 0.0, None),          # + contextual
    (1.3, 2.0, 0.4, None),          # + diversity grouped by label
    (0.3, 0.8, 1.1, "random"),      # explicit groups
    (-0.6, 1.7, 0.9, "one_alone"),  # a group of size 1, negative beta
    (0.0, 0.9, 1.5, "singletons"),
]


@pytest.mark.parametrize("batch, dim, classes", SHAPES)
@pytest.mark.parametrize("beta, tau, gamma, groups", CONFIGS)
def test_head_matches_eager_closed_forms(rng_seed, batch, dim, classes, beta, tau, gamma, groups):
    z, labels, weight, bias, log_q = head_inputs(batch, dim, classes)
    group_ids = make_groups(groups, labels)
    objective, grad = poisoned_call(z, labels, weight, bias, log_q, beta, tau, gamma, group_ids)
    expected_objective, expected_grad = reference(z, labels, weight, bias, log_q, beta, tau, gamma, group_ids)
    assert torch.isfinite(objective).all() and torch.isfinite(grad).all(), "an output element was not written"
    torch.testing.assert_close(objective, expected_objective, **tolerance(torch.float32, "reduction"))
    torch.testing.assert_close(grad, expected_grad, **tolerance(torch.float32, "reduction"))


def test_each_term_contributes(rng_seed):
    # Guards against a term silently compiled out: switching beta / gamma on must move J and dJ/dz
    # by what the reference says each term is worth.
    z, labels, weight, bias, log_q = head_inputs(6, 40, 4)
    base = poisoned_call(z, labels, weight, bias, log_q, 0.0, 0.7, 0.0, None)
    for beta, gamma in [(0.8, 0.0), (0.0, 1.2)]:
        got = poisoned_call(z, labels, weight, bias, log_q, beta, 0.7, gamma, None)
        ref = reference(z, labels, weight, bias, log_q, beta, 0.7, gamma, None)
        ref_base = reference(z, labels, weight, bias, log_q, 0.0, 0.7, 0.0, None)
        assert (ref[1] - ref_base[1]).abs().max() > 1e-3
        torch.testing.assert_close(got[1] - base[1], ref[1] - ref_base[1], **tolerance(torch.float32, "reduction"))
        torch.testing.assert_close(got[0] - base[0], ref[0] - ref_base[0], **tolerance(torch.float32, "reduction"))


def test_int32_labels_and_noncontiguous_features(rng_seed):
    z, labels, weight, bias, log_q = head_inputs(7, 24, 5)
    z_t = z.t().contiguous().t()  # same values, column-major storage
    assert not z_t.is_contiguous()
    got = poisoned_call(z_t, labels.int(), weight, bias, log_q, 0.5, 1.3, 0.7, None)
    ref = reference(z, labels, weight, bias, log_q, 0.5, 1.3, 0.7, None)
    torch.testing.assert_close(got[0], ref[0], **tolerance(torch.float32, "reduction"))
    torch.testing.assert_close(got[1], ref[1], **tolerance(torch.float32, "reduction"))


def test_out_of_range_label_gives_nan_row_only(rng_seed):
    z, labels, weight, bias, log_q = head_inputs(5, 20, 3)
    bad = labels.clone()
    bad[2] = 3  # == C: out of range
    objective, grad = poisoned_call(z, bad, weight, bias, log_q, 0.4, 1.0, 0.0, None)
    assert torch.isnan(objective[2]) and torch.isnan(grad[2]).all()
    keep = torch.tensor([0, 1, 3, 4])
    ref = reference(z[keep], labels[keep], weight, bias, log_q, 0.4, 1.0, 0.0, None)
    torch.testing.assert_close(objective[keep], ref[0], **tolerance(torch.float32, "reduction"))
    torch.testing.assert_close(grad[keep], ref[1], **tolerance(torch.float32, "reduction"))


def test_fresh_buffers_without_out(rng_seed):
    z, labels, weight, bias, log_q = head_inputs(3, 18, 2)
    objective, grad = guidance_head(z, labels, weight, bias, log_q, 0.2, 1.0)
    assert objective.dtype == torch.float32 and grad.dtype == torch.float32 and grad.shape == z.shape
    ref = reference(z, labels, weight, bias, log_q, 0.2, 1.0, 0.0, None)
    torch.testing.assert_close(grad, ref[1], **tolerance(torch.float32, "reduction"))


def test_rejects_bad_arguments():
    z, labels, weight, bias, log_q = head_inputs(3, 8, 2)
    with pytest.raises(IGDSInputError, match="tau"):
        guidance_head(z, labels, weight, bias, log_q, 0.1, torch.tensor(1.0))  # would need .item()
    with pytest.raises(IGDSInputError, match="tau must be positive"):
        guidance_head(z, labels, weight, bias, log_q, 0.1, 0.0)
    with pytest.raises(IGDSInputError, match="log_centroids"):
        guidance_head(z, labels, weight, bias, log_q[:, :4], 0.1, 1.0)
    with pytest.raises(IGDSInputError, match="out"):
        guidance_head(z, labels, weight, bias, log_q, 0.1, 1.0, out=(torch.empty(3), torch.empty(3, 9)))
    with pytest.raises(IGDSInputError, match="precision"):
        guidance_head(z, labels, weight, bias, log_q, 0.1, 1.0, precision="bf16")


def test_image_guidance_with_triton_head_matches_analytic_head(rng_seed):
    # The head inside the real call path: encoder autograd around it, gradient w.r.t. the image.
    channels, size, dim, classes = 3, 6, 20, 4
    projection = torch.randn(channels * size * size, dim) / size

    class VE:
        weight = torch.randn(classes, dim) / math.sqrt(dim)
        bias = torch.randn(classes)
        log_centroids = torch.log_softmax(torch.randn(classes, dim), dim=1)

        @staticmethod
        def features(x):
            return torch.nn.functional.softplus(x.flatten(1) @ projection, beta=3.0)

    image = torch.rand(5, channels, size, size) * 2 - 1
    labels = torch.randint(0, classes, (5,))
    got = IGDSGuidance(VE, beta=0.6, tau=0.9, gamma=0.5, head=guidance_head)(image, labels)
    ref = IGDSGuidance(VE, beta=0.6, tau=0.9, gamma=0.5, head=igds_objective_and_grad)(image, labels)
    torch.testing.assert_close(got[0], ref[0], **tolerance(torch.float32, "reduction"))
    torch.testing.assert_close(got[1], ref[1], **tolerance(torch.float32, "reduction"))


# ---- GPU only: bf16 inputs, real sizes, CUDA-graph capture -------------------------------------
@gpu_only
@pytest.mark.parametrize("batch, classes", [(64, 1000), (256, 10)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_head_real_sizes_gpu(rng_seed, batch, classes, dtype):
    z, labels, weight, bias, log_q = head_inputs(batch, 2048, classes, device="cuda", dtype=dtype)
    z = z / 8  # pooled-feature scale: keeps softmax(z / tau) away from one-hot
    objective, grad = poisoned_call(z, labels, weight, bias, log_q, 0.5, 1.0, 0.3, None)
    ref = reference(z.float(), labels, weight, bias, log_q, 0.5, 1.0, 0.3, None)
    torch.testing.assert_close(objective, ref[0], **tolerance(dtype, "reduction"))
    torch.testing.assert_close(grad, ref[1], **tolerance(dtype, "reduction"))


@gpu_only
def test_head_captures_in_cuda_graph(rng_seed):
    z, labels, weight, bias, log_q = head_inputs(32, 256, 10, device="cuda")
    out = (torch.empty(32, device="cuda"), torch.empty(32, 256, device="cuda"))
    guidance_head(z, labels, weight, bias, log_q, 0.5, 1.0, 0.2, None, out=out)  # compile outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # raises on any host synchronisation inside
        guidance_head(z, labels, weight, bias, log_q, 0.5, 1.0, 0.2, None, out=out)
    z.copy_(torch.randn_like(z))
    out[1].fill_(float("nan"))
    graph.replay()
    ref = reference(z, labels, weight, bias, log_q, 0.5, 1.0, 0.2, None)
    torch.testing.assert_close(out[1], ref[1], **tolerance(torch.float32, "reduction"))
