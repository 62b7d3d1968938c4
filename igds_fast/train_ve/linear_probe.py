"""The linear probe of the VE: a multinomial logistic regression on frozen encoder features."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import IGDSInputError
from .config import CLASSIFIER_OPTIMIZERS


def fit_linear_classifier(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    iterations: int = 100,
    lr: float = 1.0,
    weight_decay: float = 1e-3,
    optimizer: str = "lbfgs",
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression on frozen features: (W [C, d], b [C]) with logits = z W^T + b.

    Trained full batch on standardised features u = (z - mu) / sigma (per coordinate; a constant
    coordinate keeps sigma 1) for a well-conditioned problem, minimising
    mean CE(u V^T + c, y) + weight_decay / 2 * ||V||^2, then folded back exactly:
    W = V / sigma, b = c - W mu. L-BFGS (strong Wolfe line search, step `lr`) or Adam (`lr`),
    `iterations` steps; V starts at zero (the optimum is unique, so the start only affects speed).
    """
    features = features.to(torch.float32)
    labels = labels.to(device=features.device, dtype=torch.long)
    mean = features.mean(dim=0)
    std = features.std(dim=0, unbiased=False)
    std = torch.where(std > 1e-6 * std.max().clamp_min(1e-12), std, torch.ones_like(std))
    standardised = (features - mean) / std
    weight = torch.zeros(num_classes, features.shape[1], device=features.device, requires_grad=True)
    bias = torch.zeros(num_classes, device=features.device, requires_grad=True)

    def objective():
        loss = F.cross_entropy(F.linear(standardised, weight, bias), labels)
        return loss + 0.5 * weight_decay * weight.square().sum()

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if optimizer == "lbfgs":
            solver = torch.optim.LBFGS(
                [weight, bias], lr=lr, max_iter=iterations, history_size=20, line_search_fn="strong_wolfe",
                tolerance_grad=1e-9, tolerance_change=1e-12,
            )

            def closure():
                solver.zero_grad()
                loss = objective()
                loss.backward()
                return loss

            solver.step(closure)
        elif optimizer == "adam":
            solver = torch.optim.Adam([weight, bias], lr=lr)
            for _ in range(iterations):
                solver.zero_grad()
                objective().backward()
                solver.step()
        else:
            raise IGDSInputError(f"classifier optimizer must be one of {CLASSIFIER_OPTIMIZERS}, got {optimizer!r}")
    with torch.no_grad():
        folded_weight = weight / std
        folded_bias = bias - folded_weight @ mean
    return folded_weight.detach(), folded_bias.detach()
