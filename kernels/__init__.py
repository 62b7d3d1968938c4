"""Triton kernels of igds_fast (import name `igds_fast.kernels`).

One file per kernel, each with its thin wrapper and the eager reference it must match named in
its docstring:

    guidance_head      kernels/guidance_head.py   igds_fast.guidance.objective.igds_objective_and_grad
    philox_normal      kernels/philox.py          interface of igds_fast.seeding.seeded_normal
    predict_x0         kernels/ddpm_update.py     DiffusionSchedule.predict_x0
    fused_ddpm_update  kernels/ddpm_update.py     igds_fast.sampling.step.StepOps.ddpm_update
    fused_ddim_update  kernels/ddim_update.py     igds_fast.sampling.step.StepOps.ddim_update
    encoder_preprocess kernels/preprocess.py      igds_fast.preprocess.EncoderPreprocess

On a machine without a GPU they run under TRITON_INTERPRET=1, which Triton reads when a kernel is
decorated: importing this package on such a machine sets it, unless triton was imported before (then
set it yourself before importing triton; the compiled backend checks and says so).
"""
import os
import sys

import torch

if not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from ._common import poisoned_scratch, seeds_to_tensor
from .ddpm_update import StepTables, fused_ddpm_update, predict_x0
from .ddim_update import DDIMStepTables, fused_ddim_update
from .guidance_head import guidance_head
from .philox import philox_normal
from .preprocess import EncoderPreprocessFunction, encoder_preprocess, preprocess_backward, preprocess_forward

__all__ = [
    "DDIMStepTables",
    "EncoderPreprocessFunction",
    "StepTables",
    "encoder_preprocess",
    "fused_ddim_update",
    "fused_ddpm_update",
    "guidance_head",
    "philox_normal",
    "poisoned_scratch",
    "predict_x0",
    "preprocess_backward",
    "preprocess_forward",
    "seeds_to_tensor",
]
