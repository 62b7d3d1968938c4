"""The one tolerance table of the kernel tests: per dtype, per kind of computation.

Kinds (rtol, atol), for `torch.testing.assert_close(actual, expected, **tolerance(dtype, kind))`:

    elementwise  a handful of fp32 operations per element (x0 prediction, DDPM update, preprocess):
                 a few ulp of the result, plus exp/log rounding on the learned variance.
    reduction    dot products / softmax sums over d (<= 2048) or C (<= 1000) terms (guidance head);
                 the reference is evaluated in float64, the kernel accumulates in fp32.
    trajectory   a whole short sampling run: per-step rounding differences pass through the UNet,
                 the encoder and the guidance again at every step.
    noise        Philox normals against the numpy re-implementation: the bits are identical, the
                 difference is only log/sqrt/cos/sin rounding between numpy and Triton.

bfloat16 entries are for inputs stored in bf16 (z of the guidance head); outputs stay fp32 but the
inputs' 8-bit mantissa limits agreement with the fp32 reference computed from the same bf16 values
to accumulation-order effects — still looser than fp32 because GPU runs may pick tf32-like paths.
They are exercised on the GPU only (the interpreter cannot run bf16 dots).
"""
from __future__ import annotations

import torch

TOLERANCES: dict[torch.dtype, dict[str, tuple[float, float]]] = {
    torch.float32: {
        "elementwise": (1e-5, 1e-6),
        "reduction": (1e-4, 1e-5),
        "trajectory": (1e-4, 1e-4),
        "noise": (1e-5, 1e-5),
    },
    torch.bfloat16: {
        "elementwise": (1.6e-2, 1e-2),
        "reduction": (2e-2, 2e-3),
        "trajectory": (5e-2, 5e-2),
        "noise": (1.6e-2, 1e-2),
    },
}


def tolerance(dtype: torch.dtype, kind: str = "elementwise") -> dict[str, float]:
    """{'rtol': ..., 'atol': ...} for assert_close; KeyError for an unlisted dtype or kind."""
    rtol, atol = TOLERANCES[dtype][kind]
    return {"rtol": rtol, "atol": atol}
