"""`igds-fast distill ... --plan`: the run's cost (distill/cost.py) from its plan, and nothing else.

Every input is checked as for the run (plan_distill / plan_selection: files, class lists, the prior's
header, the VE, S³'s real folder listing); then the cost is counted on the meta device and printed.
Nothing is sampled or written, no folder is created or locked, no prior weight is read.
"""
from __future__ import annotations

from .config import DistillConfig
from .cost import cost_lines, distill_cost, selection_cost
from .plan import plan_distill
from .select_stage import plan_selection


def plan_lines(config: DistillConfig, world: int | None = None) -> list[str]:
    """The lines `--plan` prints: the cost of the run `config` describes (world: ranks; None = WORLD_SIZE)."""
    timing_from = config.run.timing_from
    if config.selection is None:
        return cost_lines(distill_cost(plan_distill(config), world, timing_from=timing_from))
    plan = plan_selection(config)
    cost = selection_cost(plan.candidate_plan, config.job.ipc, plan.encoder.description, len(plan.real.chosen),
                          world, timing_from=timing_from)
    return cost_lines(cost)


__all__ = ["plan_lines"]
