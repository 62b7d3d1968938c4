"""The linear probe of the VE: a multinomial logistic regression on frozen encoder features.

`fit_linear_classifier`: the full-batch reference, every feature [N, d] in one tensor.
`StreamedLinearProbe`: the same optimisation with the features read chunk by chunk (peak memory
independent of N): every objective evaluation sums the cross-entropy and its gradient over the
chunks, so the optimiser sees the same full-batch objective (to float32 summation order), and it
runs in rounds of PROBE_ROUND iterations whose state can be saved and restored exactly (resume).
"""
from __future__ import annotations

from typing import Callable, Iterable

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


PROBE_ROUND = 10  # iterations per round: the probe's state can be saved between rounds


def standardisation(mean: torch.Tensor, std: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mu, sigma) float32 as the probe uses them: a coordinate with sigma <= 1e-6 * max sigma keeps sigma 1."""
    mean, std = mean.to(torch.float32), std.to(torch.float32)
    std = torch.where(std > 1e-6 * std.max().clamp_min(1e-12), std, torch.ones_like(std))
    return mean, std


class StreamedLinearProbe:
    """`fit_linear_classifier`'s problem and optimiser over features read in chunks.

    chunks(): a fresh iterable of (z [b, d] float32, y [b] long) on `device`, covering all `count`
    training images in a fixed order (every call the same chunks: the objective is deterministic).
    mean / std [d]: the features' per-coordinate mean and population std (feature_store.FeatureMoments).
    The objective, mean CE(u V^T + c, y) + weight_decay / 2 * ||V||^2 with u = (z - mu) / sigma, is
    evaluated as sum over chunks of CE_sum(chunk) / count (float64 total), its gradient accumulated
    chunk by chunk. L-BFGS runs in rounds of PROBE_ROUND iterations (one `step` call each) that follow
    one call of `iterations` iterations exactly: each round's evaluation budget is what the single
    call would have left (`iterations` * 5 // 4 evaluations in all, torch's default), and a round that
    stops early for any other reason (a converged objective) ends the fit. The first evaluation of each
    later round repeats the point the previous round ended at (one extra pass per round, not counted) and
    makes there the stopping checks the single call makes after that iteration (`_resumed_objective`).
    Adam: `iterations` steps, rounds of PROBE_ROUND.
    """

    def __init__(self, chunks: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]], count: int,
                 mean: torch.Tensor, std: torch.Tensor, num_classes: int, iterations: int = 100, lr: float = 1.0,
                 weight_decay: float = 1e-3, optimizer: str = "lbfgs", device=None):
        if optimizer not in CLASSIFIER_OPTIMIZERS:
            raise IGDSInputError(f"classifier optimizer must be one of {CLASSIFIER_OPTIMIZERS}, got {optimizer!r}")
        device = torch.device(device) if device is not None else mean.device
        self.chunks, self.count, self.iterations = chunks, int(count), int(iterations)
        self.weight_decay, self.optimizer_name = float(weight_decay), optimizer
        self.mean, self.std = (t.to(device) for t in standardisation(mean, std))
        dim = self.mean.shape[0]
        self.weight = torch.zeros(num_classes, dim, device=device, requires_grad=True)
        self.bias = torch.zeros(num_classes, device=device, requires_grad=True)
        if optimizer == "lbfgs":
            self.solver = torch.optim.LBFGS([self.weight, self.bias], lr=lr, max_iter=iterations, history_size=20,
                                            line_search_fn="strong_wolfe", tolerance_grad=1e-9, tolerance_change=1e-12)
        else:
            self.solver = torch.optim.Adam([self.weight, self.bias], lr=lr)
        self.budget = iterations * 5 // 4  # LBFGS's default max_eval for max_iter = iterations
        self.done = 0  # iterations finished
        self.evaluations = 0  # evaluations counted against the budget
        self.finished = False
        self.rounds = 0

    def objective(self) -> torch.Tensor:
        """The objective at the current (V, c); gradients accumulated into V.grad, c.grad (zeroed first)."""
        self.solver.zero_grad()
        total = torch.zeros((), dtype=torch.float64, device=self.weight.device)
        for features, labels in self.chunks():
            standardised = (features - self.mean) / self.std
            loss = F.cross_entropy(F.linear(standardised, self.weight, self.bias), labels, reduction="sum") / self.count
            loss.backward()
            total += loss.detach()
        penalty = 0.5 * self.weight_decay * self.weight.square().sum()
        penalty.backward()
        return (total + penalty.detach()).to(torch.float32)

    def run_round(self) -> bool:
        """One round of at most PROBE_ROUND iterations; returns True while iterations are left."""
        if self.finished:
            return False
        count = min(PROBE_ROUND, self.iterations - self.done)
        if self.optimizer_name == "adam":
            for _ in range(count):
                self.objective()
                self.solver.step()
            self.done += count
        else:
            state = self.solver.state[self.weight]
            evals_before, iterations_before = state.get("func_evals", 0), state.get("n_iter", 0)
            repeated = 1 if self.rounds else 0  # a later round's first evaluation repeats the last point
            group = self.solver.param_groups[0]
            group["max_iter"] = count
            group["max_eval"] = self.budget - self.evaluations + repeated
            self.solver.step(self._resumed_objective(state) if self.rounds else self.objective)
            state = self.solver.state[self.weight]
            ran = state.get("n_iter", 0) - iterations_before
            self.evaluations += state.get("func_evals", 0) - evals_before - repeated
            self.done += ran
            if ran < count and self.evaluations < self.budget:
                self.finished = True  # converged (gradient, direction or change below tolerance)
            if self.evaluations >= self.budget:
                self.finished = True
        self.rounds += 1
        if self.done >= self.iterations:
            self.finished = True
        return not self.finished

    def _resumed_objective(self, state: dict) -> Callable[[], torch.Tensor]:
        """A later round's closure. Its first call re-evaluates the point the previous round ended at, where
        torch's single call, after that iteration, would also have stopped on a step (|t d|) or a loss change
        below tolerance_change: checks that a round's own iteration cap pre-empts. Where one holds, that call
        reports a zero gradient, so `step` returns before iterating (and the fit ends there, as one call's)."""
        tolerance = self.solver.param_groups[0]["tolerance_change"]
        first = True

        def closure() -> torch.Tensor:
            nonlocal first
            loss = self.objective()
            if first:
                first = False
                small_step = float(state["d"].mul(state["t"]).abs().max()) <= tolerance
                if small_step or abs(float(loss) - state["prev_loss"]) < tolerance:
                    self.weight.grad.zero_()
                    self.bias.grad.zero_()
            return loss

        return closure

    def fit(self, after_round: Callable[["StreamedLinearProbe"], None] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the remaining rounds (after_round(self) after each, e.g. to save the state); returns (W, b)."""
        while not self.finished:
            self.run_round()
            if after_round is not None:
                after_round(self)
        return self.folded()

    @torch.no_grad()
    def folded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W [C, d], b [C]) with logits = z W^T + b: W = V / sigma, b = c - W mu."""
        weight = self.weight / self.std
        return weight.detach().clone(), (self.bias - weight @ self.mean).detach()

    # ---- state (tensors + a JSON-able header), exact across a save and a load ------------------------
    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """The tensors are the live ones (no copy: the caller serialises them before the next round; L-BFGS's
        history is 2 x history_size x [C, d], 330 MiB at C = 1000, d = 2048, and each copy was a peak of
        that size). A finished probe's state is (V, c) and the counts: nothing is left to run."""
        tensors = {"probe.weight": self.weight.detach().cpu(), "probe.bias": self.bias.detach().cpu()}
        header = {"done": self.done, "evaluations": self.evaluations, "finished": self.finished, "rounds": self.rounds,
                  "optimizer": self.optimizer_name, "entries": {}}
        if self.finished:
            return tensors, header
        for index, entries in self.solver.state_dict()["state"].items():
            for name, value in entries.items():
                if name == "al":  # L-BFGS's scratch buffer, overwritten before it is read
                    continue
                key = f"solver.{index}.{name}"
                if isinstance(value, torch.Tensor):
                    tensors[key] = value.detach().cpu()
                    header["entries"][key] = "tensor"
                elif isinstance(value, list):
                    kinds = []
                    for position, item in enumerate(value):
                        if isinstance(item, torch.Tensor):
                            tensors[f"{key}.{position}"] = item.detach().cpu()
                            kinds.append("tensor")
                        else:
                            kinds.append(item)
                    header["entries"][key] = {"list": kinds}
                else:
                    header["entries"][key] = {"value": value}
        return tensors, header

    def load_state(self, tensors: dict[str, torch.Tensor], header: dict) -> None:
        if header.get("optimizer") != self.optimizer_name:
            raise IGDSInputError("the saved classifier state is of another optimizer")
        with torch.no_grad():
            self.weight.copy_(tensors["probe.weight"])
            self.bias.copy_(tensors["probe.bias"])
        state: dict = {}
        for key, kind in header["entries"].items():
            _, index, name = key.split(".", 2)
            if kind == "tensor":
                value = tensors[key]
            elif "list" in kind:
                value = [tensors[f"{key}.{p}"] if item == "tensor" else item for p, item in enumerate(kind["list"])]
            else:
                value = kind["value"]
            state.setdefault(int(index), {})[name] = value
        groups = self.solver.state_dict()["param_groups"]
        self.solver.load_state_dict({"state": state, "param_groups": groups})
        self.done, self.evaluations = int(header["done"]), int(header["evaluations"])
        self.finished, self.rounds = bool(header["finished"]), int(header["rounds"])

