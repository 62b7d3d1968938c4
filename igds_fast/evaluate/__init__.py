"""Evaluation harness: train small networks on a distilled set, test on real data (IGDS_SPEC section 7).

* :mod:`.networks` -- ConvNet-3..6, ResNetAP-10, ResNet-18 (instance norm): ``build_eval_network``.
* :mod:`.augment` -- batched, seeded random-resized-crop, flip and CutMix.
* :mod:`.train` -- ``evaluate_distilled``: Adam lr 0.01, epochs by IPC, mean +- std over seeds.
"""
from igds_fast.evaluate.augment import AugmentConfig, crop_and_flip, cutmix, random_horizontal_flip
from igds_fast.evaluate.networks import NETWORK_NAMES, ConvNet, build_eval_network
from igds_fast.evaluate.train import epochs_for_ipc, evaluate_distilled, measure_accuracy

__all__ = [
    "AugmentConfig",
    "ConvNet",
    "NETWORK_NAMES",
    "build_eval_network",
    "crop_and_flip",
    "cutmix",
    "epochs_for_ipc",
    "evaluate_distilled",
    "measure_accuracy",
    "random_horizontal_flip",
]
