"""The one tolerance table of the kernel tests: per dtype, per kind of computation.

Kinds (rtol, atol), for `torch.testing.assert_close(actual, expected, **tolerance(dtype, kind))`:

    elementwise  a handful of fp32 operations per element (x0 prediction, DDPM update): a few ulp
                 of the result, plus exp/log rounding on the learned variance.
    reduction    sums in another order than the reference: dot products / softmax sums over d
                 (<= 2048) or C (<= 1000) terms (guidance head, reference in float64), and the
                 preprocess's 4-tap bilinear sums and their transposes (then divided by std).
    trajectory   a whole short sampling run: per-step rounding differences pass through the UNet,
                 the encoder and the guidance again at every step.
    noise        Philox normals against an independent implementation (numpy, or torch ops fed
                 with philox_normal): the bits are identical, only log/sqrt/cos/sin/exp rounding
                 differs (the GPU's exp/log are approximate to a few ulp; |n| reaches ~6).

bfloat16 entries apply when an INPUT is stored in bf16 (the head's z, the preprocess image): the
reference is computed in fp32 from the same bf16 values, so what remains is accumulation order and,
for bf16 outputs, one bf16 rounding (2^-8 relative). They are checked on the GPU only: the Triton
interpreter cannot run bf16 paths.
"""
from __future__ import annotations

import torch

TOLERANCES: dict[torch.dtype, dict[str, tuple[float, float]]] = {
    torch.float32: {
        "elementwise": (1e-5, 1e-6),
        "reduction": (1e-4, 1e-5),
        "trajectory": (1e-4, 1e-4),
        "noise": (1e-5, 5e-5),
    },
    torch.bfloat16: {
        "elementwise": (1.6e-2, 1e-2),
        "reduction": (2e-2, 2e-3),
        "trajectory": (5e-2, 5e-2),
        "noise": (1.6e-2, 1e-2),
    },
}


# A float32 gradient through a max-pool equals the float64 one only where both pick the same element
# of every window: inputs a few float32 roundings apart can flip the pick (a kink, not an error). The
# float32 - float64 difference at the tiny ResNet-18 encoder's max-pool input, behind the tiny VAE
# decoder, measured 1.1e-6..2.3e-6 over 5 seeds; a window's two largest inputs 6e-8 apart flipped
# with the thread count and failed a gradient check at 2.8e-3. Draws whose smallest gap is below
# this margin (10x the measured difference) are redrawn: factories.away_from_max_pool_ties.
MAX_POOL_TIE_MARGIN = 2e-5


def tolerance(dtype: torch.dtype, kind: str = "elementwise") -> dict[str, float]:
    """{'rtol': ..., 'atol': ...} for assert_close; KeyError for an unlisted dtype or kind."""
    rtol, atol = TOLERANCES[dtype][kind]
    return {"rtol": rtol, "atol": atol}


# The streamed linear probe of train-ve (igds_fast/train_ve/linear_probe.py StreamedLinearProbe) against
# the full-batch reference `fit_linear_classifier`, both float32, on the same features. The objective
# is the same; its float32 evaluation differs in summation order (chunks, float64 standardisation
# moments), and L-BFGS's line search turns differences of ~1e-7 in the objective into other steps, so
# the two stop at different points of the same flat optimum (measured: objective within 3e-7
# relative, weights within 1.2e-3 of max |W|, logits mostly within 1e-3 of max |logit|, every prediction
# the same, on synthetic and digits features).
PROBE_TOLERANCES = {
    "objective_rtol": 1e-5,  # the streamed solution's objective at most this much above the reference's
    "objective_atol": 1e-6,  # ... plus this: a near-separable set's objective is ~3e-4, where float32 rounding
    #                          of the two CE sums alone is ~6e-8 (2e-4 relative; seen once in ~10 seeds)
    "probabilities_atol": 1e-3,  # max |softmax(logits) - softmax(reference logits)|. Not the logits themselves:
    #                              near-separable sets 25 iterations from their optimum lie in a valley flat along
    #                              the logits' scale, where float32 rounding moves the path; their logits differed by
    #                              up to 2.05e-2 of max |logit| (limits of 5e-3 and then 2e-2 each failed seeds)
    #                              while the probabilities agreed within 2e-5 (13 seeds, the worst included)
    "agreement": 0.995,  # fraction of images whose predicted class is the reference's
    "centroids_atol": 1e-6,  # log Q, streamed over batches vs over all features at once (float64, cast)
}
