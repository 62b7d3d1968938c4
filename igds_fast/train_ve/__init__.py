"""Train the variational estimator (VE): MoCo v2 instance discrimination + CMI term, then a linear probe.

IGDS_SPEC section 2 ("Training the VE", paper section 4.1.3, eq. 24, Algorithm 1):

    L_VE(theta) = L_InfoNCE(theta) - lambda * E_{x,y}[ KL(P_x || Q_y) ]        (minimised)

    P_x = softmax(f_theta(x) / tau)   over the d trunk-feature coordinates        [B, d]
    Q_y = E[P_X | Y = y]              class centroids, re-estimated while theta trains, detached

lambda = 0 is plain MoCo v2. Stages:

1. Contrastive training of the query encoder f_theta (a torchvision-compatible ResNet trunk, ReLU
   replaced by Softplus(beta_sp)) with an MLP projection head, a momentum key encoder + head, and
   a queue of K negative keys (He et al. 2020; Chen et al. 2020, MoCo v2):

       q = normalize(g_q(f_q(view1)))   k = normalize(g_k(f_k(view2)))      [B, moco_dim]
       L_InfoNCE = -mean log( exp(q.k / tau_c) / (exp(q.k / tau_c) + sum_j exp(q.queue_j / tau_c)) )

   Two random views per image: random-resized crop (+ optional flip) and a small brightness /
   contrast (/ saturation for RGB) jitter, all batched tensor ops drawn from one seeded generator.
   Queue entries remember which image they came from; entries of the query's own image are masked
   out of its negatives (on small data sets the queue would otherwise hold the query's own image
   from an earlier epoch as a "negative"). "Shuffle BN" is emulated on one device: queries run
   through BatchNorm in `bn_splits` groups in batch order, keys in `bn_splits` groups of a shuffled
   order, so a query and its positive key never share batch statistics (MoCo's guard against the
   batch-statistics shortcut).
   The CMI term uses the query's trunk features z = f_q(view1) (what guidance differentiates),
   with Q as an EMA of per-batch class means of P (`centroid_update="ema"`, default) or re-estimated
   over the whole (un-augmented) training set at the start of every epoch (`"epoch"`).
2. Freeze f_theta; recompute its BatchNorm running statistics on the un-augmented training images
   (the VE sees clean images; the statistics gathered during training describe augmented views).
3. Linear classifier (W, b) on the frozen features: full-batch multinomial logistic regression
   (L-BFGS by default) on standardised features, folded back so logits = z W^T + b exactly; the
   features are computed once, in one pass that also accumulates the standardisation and the
   centroids, stored (a float32 file beside the checkpoint), and every objective evaluation sums
   over them chunk by chunk (`classifier_stage`, `feature_store`, `linear_probe`).
4. log Q over the training images with the frozen encoder (streamed `LogCentroidAccumulator`), then the
   `VariationalEstimator` bundle.

Report (nats): prototype information I(X;Y) ~ H(Y) - CE and contextual information
H(X|Y) ~ E KL(P_x || Q_y), on the training data and on held-out data if given.

Data: tensors in memory (`train_ve`) or an ImageFolder streamed batch by batch
(`train_ve_from_source` with `igds_fast.data.FolderImages`): an epoch is one pass of a DataLoader
over the permutation drawn from the seeded generator, exactly the batches of the in-memory loop,
so both give the same bundle bit for bit. Every pass over the whole set (BN statistics, features,
centroids) is batch by batch; nothing of size N x image is held for a streamed set.
Memory: nothing grows with N but the labels [N] and the image folder's path list. The classifier
stage keeps one chunk of features, [C, d] accumulators and the probe's state; the features of the
whole set ([N, d] float32) go to CKPT.features on disk (13k ImageNette images x 2048 = 107 MB;
1.28 M ImageNet images x 2048 = 10.5 GB), or to memory when the Python API is given no checkpoint.

Resume: with a checkpoint path, the contrastive stage writes its whole state (encoders, heads,
queue, centroids, optimiser, generator) atomically after every epoch, and the classifier stage its
progress (feature rows written, accumulators, the probe's rounds) to CKPT.classifier at most every
two minutes; a rerun with the same config and data continues after the last save and ends with the
same bundle as an uninterrupted run.

Layout (one job per module): `config` (VETrainConfig, the choices, parse_init), `views` (the random
views), `losses` (InfoNCE, the CMI term, the centroid EMA, the information estimates), `moco` (the
contrastive stage and its checkpoints), `features` (BatchNorm statistics, features, image
statistics), `feature_store` (the stored features, their moments), `linear_probe` (the classifier:
the full-batch reference and the streamed probe), `classifier_stage` (features, probe, centroids,
training report, its resume state), `pipeline` (`train_ve`, `train_ve_from_source`: the
checks, the stages in order, the bundle and the report).
"""
from __future__ import annotations

from ..models.resnet import ARCHS, NORMS
from .config import (CENTROID_UPDATES, CLASSIFIER_OPTIMIZERS, INIT_SCHEMES, OPTIMIZERS, VETrainConfig, VETrainRun,
                     parse_init)
from .classifier_stage import run_classifier_stage, split_statistics, stage_files
from .feature_store import FeatureMoments, FeatureRows
from .features import extract_features, image_statistics, recompute_batchnorm_statistics
from .linear_probe import StreamedLinearProbe, fit_linear_classifier
from .losses import (
    cmi_term,
    feature_log_softmax,
    info_nce_loss,
    label_entropy,
    prototype_information,
    SplitStatistics,
    update_log_centroids,
)
from .moco import CHECKPOINT_FORMAT, CHECKPOINT_VERSION, ProjectionHead
from .pipeline import train_ve, train_ve_from_source
from .views import random_view

__all__ = [
    "ARCHS",
    "CENTROID_UPDATES",
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_VERSION",
    "CLASSIFIER_OPTIMIZERS",
    "FeatureMoments",
    "FeatureRows",
    "INIT_SCHEMES",
    "NORMS",
    "OPTIMIZERS",
    "ProjectionHead",
    "SplitStatistics",
    "StreamedLinearProbe",
    "VETrainConfig",
    "VETrainRun",
    "cmi_term",
    "extract_features",
    "feature_log_softmax",
    "fit_linear_classifier",
    "image_statistics",
    "info_nce_loss",
    "label_entropy",
    "parse_init",
    "prototype_information",
    "random_view",
    "recompute_batchnorm_statistics",
    "run_classifier_stage",
    "split_statistics",
    "stage_files",
    "train_ve",
    "train_ve_from_source",
    "update_log_centroids",
]
