"""Evaluation harness: train small networks on a distilled set, test on real data (IGDS_SPEC section 7).

* :mod:`.networks` -- ConvNet-3..6, ResNetAP-10, ResNet-18 (instance norm): ``build_eval_network``.
* :mod:`.augment` -- batched, seeded random-resized-crop, flip, CutMix, colour jitter, PCA lighting.
* :mod:`.protocol` -- ``EvalProtocol`` presets: "igds" (the paper's Appendix F) and "minimax"
  (MinimaxDiffusion's ``train.py``).
* :mod:`.train` -- ``evaluate_distilled``: train by a protocol, last-epoch mean +- std over seeds.
* :mod:`.settings` -- ``EvalSettings`` (the training recipe) and ``EvalRun``: ``igds-fast eval``'s settings tree.
"""
from igds_fast.evaluate.augment import AugmentConfig, crop_and_flip, cutmix, random_horizontal_flip
from igds_fast.evaluate.networks import NETWORK_NAMES, ConvNet, build_eval_network
from igds_fast.evaluate.protocol import PROTOCOLS, EvalProtocol, protocol_for
from igds_fast.evaluate.settings import EvalRun, EvalSettings
from igds_fast.evaluate.train import epochs_for_ipc, evaluate_distilled, measure_accuracy

__all__ = [
    "AugmentConfig",
    "ConvNet",
    "EvalProtocol",
    "EvalRun",
    "EvalSettings",
    "NETWORK_NAMES",
    "PROTOCOLS",
    "build_eval_network",
    "crop_and_flip",
    "cutmix",
    "epochs_for_ipc",
    "evaluate_distilled",
    "measure_accuracy",
    "protocol_for",
    "random_horizontal_flip",
]
