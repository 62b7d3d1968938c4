"""The IGDS objective and its closed-form gradient: hand computations, autograd, gradcheck."""
import math

import numpy as np
import pytest
import torch

from igds_fast.errors import IGDSInputError
from igds_fast.guidance.objective import igds_objective, igds_objective_and_grad


def random_head_inputs(batch, dim, classes, dtype=torch.float64, groups=None):
    z = torch.randn(batch, dim, dtype=dtype) * 2
    labels = torch.randint(0, classes, (batch,))
    weight = torch.randn(classes, dim, dtype=dtype) / math.sqrt(dim)
    bias = torch.randn(classes, dtype=dtype)
    centroids = torch.softmax(torch.randn(classes, dim, dtype=dtype) * 2, dim=1)
    group_ids = None if groups is None else torch.randint(0, groups, (batch,))
    return z, labels, weight, bias, centroids.log(), group_ids


def hand_objective(z, labels, weight, bias, log_q, beta, tau, gamma, group_ids):
    """Per-sample J written out with numpy loops in float64, straight from IGDS_SPEC."""
    z, weight, bias, log_q = (t.double().numpy() for t in (z, weight, bias, log_q))
    labels = labels.numpy()
    groups = labels if group_ids is None else group_ids.numpy()
    out = []
    for i in range(z.shape[0]):
        logits = weight @ z[i] + bias
        proto = logits[labels[i]] - np.log(np.exp(logits - logits.max()).sum()) - logits.max()
        u = z[i] / tau
        p = np.exp(u - u.max()) / np.exp(u - u.max()).sum()
        kl = float(np.sum(p * (np.log(p) - log_q[labels[i]])))
        zhat = z / np.linalg.norm(z, axis=1, keepdims=True)
        members = [j for j in range(z.shape[0]) if groups[j] == groups[i]]
        sims = np.array([zhat[i] @ zhat[j] / tau for j in members])
        own = zhat[i] @ zhat[i] / tau
        infonce = -(own - np.log(np.exp(sims).sum()))
        out.append(proto + beta * kl - gamma * infonce)
    return torch.tensor(out, dtype=torch.float64)


SHAPES = [(1, 7, 1), (5, 16, 3), (9, 33, 10), (16, 64, 7)]


@pytest.mark.parametrize("batch, dim, classes", SHAPES)
@pytest.mark.parametrize("beta, tau, gamma, groups", [(0.0, 1.0, 0.0, None), (0.7, 0.5, 0.0, None), (1.3, 2.0, 0.4, None), (0.3, 0.8, 1.1, 3)])
def test_objective_matches_hand_computation(batch, dim, classes, beta, tau, gamma, groups):
    inputs = random_head_inputs(batch, dim, classes, groups=groups)
    got = igds_objective(*inputs[:5], beta=beta, tau=tau, gamma=gamma, group_ids=inputs[5])
    expected = hand_objective(*inputs[:5], beta, tau, gamma, inputs[5])
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("batch, dim, classes", SHAPES)
@pytest.mark.parametrize("beta, tau, gamma, groups", [(0.0, 1.0, 0.0, None), (0.9, 0.7, 0.0, None), (0.5, 1.5, 0.8, None), (0.2, 0.6, 1.5, 2)])
def test_closed_form_gradient_matches_autograd(batch, dim, classes, beta, tau, gamma, groups):
    z, labels, weight, bias, log_q, group_ids = random_head_inputs(batch, dim, classes, groups=groups)
    leaf = z.clone().requires_grad_(True)
    objective = igds_objective(leaf, labels, weight, bias, log_q, beta, tau, gamma, group_ids)
    (autograd_grad,) = torch.autograd.grad(objective.sum(), leaf)
    closed_objective, closed_grad = igds_objective_and_grad(z, labels, weight, bias, log_q, beta, tau, gamma, group_ids)
    torch.testing.assert_close(closed_objective, objective.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(closed_grad, autograd_grad, rtol=1e-10, atol=1e-10)
    if classes > 1 or beta or gamma:  # one class alone gives log softmax = 0 and a zero gradient
        assert closed_grad.abs().max() > 0


def test_objective_gradcheck_float64():
    z, labels, weight, bias, log_q, _ = random_head_inputs(6, 12, 4)
    group_ids = torch.tensor([0, 0, 1, 1, 1, 2])
    fn = lambda z_, w_, b_, q_: igds_objective(z_, labels, w_, b_, q_, beta=0.8, tau=0.7, gamma=0.6, group_ids=group_ids)
    params = [t.clone().requires_grad_(True) for t in (z, weight, bias, log_q)]
    assert torch.autograd.gradcheck(fn, params)


def test_single_member_group_has_no_diversity_term():
    z, labels, weight, bias, log_q, _ = random_head_inputs(4, 8, 3)
    group_ids = torch.arange(4)
    with_gamma = igds_objective(z, labels, weight, bias, log_q, 0.5, 1.0, gamma=3.0, group_ids=group_ids)
    without = igds_objective(z, labels, weight, bias, log_q, 0.5, 1.0, gamma=0.0)
    torch.testing.assert_close(with_gamma, without, rtol=0, atol=1e-12)


def test_prototype_gradient_is_onehot_minus_softmax_times_w():
    z, labels, weight, bias, log_q, _ = random_head_inputs(3, 5, 4)
    _, grad = igds_objective_and_grad(z, labels, weight, bias, log_q, 0.0, 1.0)
    p = torch.softmax(z @ weight.t() + bias, dim=1)
    expected = (torch.nn.functional.one_hot(labels, 4).double() - p) @ weight
    torch.testing.assert_close(grad, expected)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda a: a.update(features=a["features"][0]), "features must be"),
        (lambda a: a.update(labels=a["labels"][:2]), "labels must have shape"),
        (lambda a: a.update(labels=a["labels"].float()), "integer"),
        (lambda a: a.update(weight=a["weight"][:, :3]), "classifier weight"),
        (lambda a: a.update(bias=a["bias"][:1]), "bias"),
        (lambda a: a.update(log_centroids=a["log_centroids"][:, :2]), "log_centroids"),
        (lambda a: a.update(tau=0.0), "tau must be positive"),
        (lambda a: a.update(group_ids=torch.zeros(2, dtype=torch.long)), "group_ids"),
    ],
)
def test_bad_head_inputs(mutate, message):
    z, labels, weight, bias, log_q, _ = random_head_inputs(4, 8, 3)
    args = dict(features=z, labels=labels, weight=weight, bias=bias, log_centroids=log_q, beta=0.5, tau=1.0)
    mutate(args)
    with pytest.raises(IGDSInputError, match=message) as info:
        igds_objective(**args)
    assert "\n" not in str(info.value)
