"""Every downstream protocol of the thesis and the ViCC / JMRN supplements, for any backbone and checkpoint.

F. M. Thoker, *Video-Efficient Foundation Models* (thesis, UvA 2023): Ch. 2 Sec. 2.5 (label-efficient finetuning),
Ch. 3 Sec. 3.4.3 + App. A.1 (skeleton linear / retrieval / semi-supervised / transfer), Ch. 4 + App. B.2 (SEVERE),
Ch. 5 Sec. 5.4 + App. C.4; ViCC supplement Sec. 3 (cluster metrics); JMRN supplement Sec. 3 Eq. (1) (fusion).
README: "evaluate.py". Protocol facts from the authors' code, and their mistakes: reference notes Sec. 6.

Every task, toy command first (CPU, seconds to a minute), then the real-data command:

    finetune       python evaluate.py --task finetune --weights runs/tubelet_contrast-toy/backbone.pth
                   python evaluate.py --task finetune --data gym99 --arch r2plus1d_18 --weights backbone.pth --gpus 4
    linear         python evaluate.py --task linear --weights runs/tubelet_contrast-toy/backbone.pth
                   python evaluate.py --task linear --data ntu60-xview --arch bigru --weights backbone.pth
    knn            python evaluate.py --task knn --weights runs/tubelet_contrast-toy/backbone.pth
                   python evaluate.py --task knn --data ucf101 --arch s3d --weights vicc.pth --center-features
    fewshot        python evaluate.py --task fewshot --per-class 4 --seeds 0 1
                   python evaluate.py --task fewshot --data ucf101 --num-examples 1000 --weights backbone.pth
    transfer       python evaluate.py --task transfer --data toy-skeleton --arch bigru --weights runs/x/backbone.pth
                   python evaluate.py --task transfer --data pku2 --arch bigru --weights ntu60_backbone.pth
    multilabel     python evaluate.py --task multilabel --data charades --data-root <toy charades layout>
                   python evaluate.py --task multilabel --data charades --weights backbone.pth --gpus 4
    arrow-of-time  python evaluate.py --task arrow-of-time
                   python evaluate.py --task arrow-of-time --data ucf101 --weights backbone.pth
    clusters       python evaluate.py --task clusters --weights runs/tubelet_contrast-toy/backbone.pth
                   python evaluate.py --task clusters --data ucf101 --arch s3d --weights vicc.pth
    fusion         python evaluate.py --task fusion --logits runs/a/logits.pth runs/b/logits.pth
                   python evaluate.py --task fusion --logits rgb/logits.pth flow/logits.pth pose/logits.pth
    severe         python evaluate.py --task severe --max-steps 2
                   python evaluate.py --task severe --arch r2plus1d_18 --weights backbone.pth --gpus 8

Honest by construction: checkpoints are selected on a validation split carved from the training set
(--val-fraction); the authors' test-split selection is only available behind --select-on-test. Linear probes get a
fresh classifier and a frozen backbone in eval mode. Every run prints its exact protocol and writes result.json and
result.txt into --out-dir.
"""
import argparse
import copy
import functools
import json
import math
import os
import sys

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import common

TASKS = ("finetune", "linear", "knn", "fewshot", "transfer", "multilabel", "arrow-of-time", "clusters", "fusion",
         "severe")
SKELETON_ARCHS = ("bigru", "hcn", "agcn", "stgcn")
RETRIEVAL_KS = (1, 5, 10, 20, 50)  # CoCLR / ViCC video retrieval R@k (reference notes Sec. 6.4)


# ==================================================================================================== FLAGS
# Per-dataset protocols as plain dicts: (optimizer, batch, lr, epochs, milestones) per task, frames and clips.
# Video finetuning: thesis Table B.2 / C.4 (Adam, multistep gamma 0.1; the SEVERE code runs 1/10 of these epochs
# with every video repeated 10 times per epoch, the same number of clips). Video linear: Table B.2 (Adam, as the
# SEVERE code). Frames: 32 at train and test, 10 uniformly spaced test clips averaged (App. B.2.1), 112 crops.
# Skeletons: App. A.1 (linear SGD 0.1, 80 epochs, [50, 70]; semi-supervised and transfer Adam 1e-4, 50 epochs,
# [30, 40]; 64-frame crops, random in training and centred at test), batch 64 as the authors' scripts.
def _opt(optimizer, batch, lr, epochs, milestones, wd=0.0, momentum=0.9):
    return dict(optimizer=optimizer, batch=batch, lr=lr, epochs=epochs, milestones=list(milestones), wd=wd,
                momentum=momentum)


VIDEO = dict(modality="video", frames=32, stride=1, crop=112, short_side=128, test_clips=10, metric="top1",
             dropout=0.0)
SKELETON = dict(modality="skeleton", frames=64, stride=1, test_clips=1, metric="top1", dropout=0.0,
                linear=_opt("sgd", 64, 0.1, 80, [50, 70]), fewshot=_opt("adam", 64, 1e-4, 50, [30, 40]),
                finetune=_opt("adam", 64, 1e-4, 50, [30, 40]), transfer=_opt("adam", 64, 1e-4, 50, [30, 40]))
GYM_FINETUNE = _opt("adam", 32, 1e-4, 160, [60, 100, 140])
PROTOCOLS = {
    "ucf101": dict(VIDEO, finetune=_opt("adam", 32, 1e-4, 160, [60, 100, 140]),
                   linear=_opt("adam", 64, 1e-2, 100, [40, 80]),
                   fewshot=_opt("adam", 32, 1e-4, 160, [80, 120, 140]),  # UCF (10^3), Table C.4
                   arrow=_opt("adam", 12, 1e-5, 10, [])),  # App. B.2.4: 8 frames, no augmentation, no schedule
    "hmdb51": dict(VIDEO, finetune=_opt("adam", 32, 1e-4, 160, [60, 100, 140]),
                   linear=_opt("adam", 64, 1e-2, 100, [40, 80])),  # linear: not in Table B.2, UCF's used
    "gym99": dict(VIDEO, finetune=GYM_FINETUNE, linear=_opt("adam", 64, 1e-2, 120, [40, 80, 100]),
                  fewshot=_opt("adam", 32, 1e-4, 160, [80, 120, 140])),  # Gym (10^3), Table C.4
    "gym288": dict(VIDEO, finetune=GYM_FINETUNE, metric="mean_class_acc"),  # App. B.2.3: mean class accuracy
    "gym-vault": dict(VIDEO, finetune=GYM_FINETUNE, metric="mean_class_acc"),
    "gym-floor": dict(VIDEO, finetune=GYM_FINETUNE, metric="mean_class_acc"),
    "fx-s1": dict(VIDEO, finetune=_opt("adam", 32, 1e-4, 160, [70, 120, 140]), metric="mean_class_acc"),
    "ub-s1": dict(VIDEO, finetune=_opt("adam", 32, 1e-4, 160, [70, 120, 140]), metric="mean_class_acc"),
    "ssv2": dict(VIDEO, finetune=_opt("adam", 32, 1e-4, 45, [25, 35, 40]),
                 linear=_opt("adam", 64, 1e-2, 40, [20, 30])),
    "diving48": dict(VIDEO, finetune=GYM_FINETUNE),  # SEVERE code: Diving48 as Gym99
    "k400": dict(VIDEO, linear=_opt("adam", 64, 1e-2, 40, [10, 20, 30])),
    # App. B.2.4 / C.4: 32 frames at stride 8, SGD 0.0375 (momentum 0.9, wd 1e-4), 57 epochs, [41, 49], sigmoid + BCE,
    # dropout 0.5 before the head (SlowFast ResNetBasicHead), test clips max-pooled; mAP over classes.
    "charades": dict(VIDEO, stride=8, metric="mAP", dropout=0.5,
                     multilabel=_opt("sgd", 16, 0.0375, 57, [41, 49], wd=1e-4)),
    "ntu60-xsub": SKELETON, "ntu60-xview": SKELETON, "ntu120-xsub": SKELETON, "ntu120-xset": SKELETON,
    "pku1": SKELETON, "pku2": SKELETON,
    # Toy sets (not in any paper): 16-frame 64x64 videos and 64-frame skeletons; a minute on a CPU.
    "toy-motion": dict(VIDEO, frames=8, stride=2, crop=56, short_side=64, test_clips=2,
                       finetune=_opt("adam", 16, 1e-3, 6, [4]), linear=_opt("adam", 16, 1e-2, 6, [4]),
                       fewshot=_opt("adam", 16, 1e-3, 6, [4]), arrow=_opt("adam", 16, 1e-3, 4, []),
                       multilabel=_opt("adam", 16, 1e-3, 6, [4])),
    "toy-skeleton": dict(SKELETON, linear=_opt("sgd", 32, 0.1, 10, [6, 8]), fewshot=_opt("adam", 32, 1e-3, 6, [4]),
                         finetune=_opt("adam", 32, 1e-3, 6, [4]), transfer=_opt("adam", 32, 1e-3, 6, [4])),
}
PROTOCOL_TASK = {"finetune": "finetune", "linear": "linear", "fewshot": "fewshot", "transfer": "transfer",
                 "multilabel": "multilabel", "arrow-of-time": "arrow"}

# The SEVERE benchmark, thesis Table 4.4 / 5.8: (column, --data, task, total examples for the 10^3 settings).
SEVERE_COLUMNS = [("SSv2", "ssv2", "finetune", None), ("Gym99", "gym99", "finetune", None),
                  ("UCF (10^3)", "ucf101", "fewshot", 1000), ("Gym (10^3)", "gym99", "fewshot", 1000),
                  ("FX-S1", "fx-s1", "finetune", None), ("UB-S1", "ub-s1", "finetune", None),
                  ("UCF-RC", "ucfrep", "repcount", None), ("Charades", "charades", "multilabel", None)]
SEVERE_DATA = {  # what each column needs under --data-root / data/<name> (README "Datasets" has the details)
    "ssv2": "something-something-v2: videos/<id>.webm + labels/{train,validation,labels}.json",
    "gym99": "FineGym v1.0: videos cut per element + annotations/gym99_{train,val}_element_v2.txt",
    "ucf101": "UCF101: UCF-101/<class>/<video>.avi + ucfTrainTestlist/{train,test}list01.txt, classInd.txt",
    "fx-s1": "FineGym-99 as gym99 (classes 6-16, relabelled 0-10)",
    "ub-s1": "FineGym-99 as gym99 (classes 74-88, relabelled 0-14)",
    "ucfrep": "UCFRep: frames/<video>/image_%05d.jpg + annotations/{train,val}/<video>.json|.mat",
    "charades": "Charades v1: Charades_v1_480/<id>.mp4 + Charades_v1_{train,test}.csv + Charades_v1_classes.txt",
}
# Thesis Table 5.8 (Table 4.4 for the R(2+1)D-18 rows): one row per pretraining, the 8 SEVERE columns.
SEVERE_REFERENCE = {
    "SVT (ViT-B)": [59.2, 62.3, 83.9, 18.5, 35.4, 55.1, 0.421, 35.5],
    "VideoMAE (ViT-B)": [69.7, 85.1, 77.2, 27.5, 37.0, 78.5, 0.172, 12.6],
    "Supervised": [60.8, 92.1, 86.6, 51.3, 79.0, 87.1, 0.132, 23.5],
    "None": [57.1, 89.8, 38.3, 22.7, 46.6, 82.3, 0.217, 7.9],
    "SeLaVi": [56.2, 88.9, 69.0, 30.2, 51.3, 80.9, 0.162, 8.4],
    "MoCo": [57.1, 90.7, 60.4, 30.9, 65.0, 84.5, 0.208, 8.3],
    "VideoMoCo": [59.0, 90.3, 65.4, 20.6, 57.3, 83.9, 0.185, 10.5],
    "Pretext-Contrast": [56.9, 90.5, 64.6, 27.5, 66.1, 86.1, 0.164, 8.9],
    "AVID-CMA": [52.0, 90.4, 68.2, 33.4, 68.0, 87.3, 0.148, 8.2],
    "GDT": [58.0, 90.5, 78.4, 45.6, 66.0, 83.4, 0.123, 8.5],
    "RSPNet": [59.0, 91.1, 74.7, 32.2, 65.4, 83.6, 0.145, 9.0],
    "TCLR": [59.8, 91.6, 72.6, 26.3, 60.7, 84.7, 0.142, 12.2],
    "CtP": [59.6, 92.0, 61.0, 32.9, 79.1, 88.8, 0.178, 9.6],
    "Tubelet-Contrast (Mini-K)": [59.4, 92.2, 65.5, 48.0, 78.3, 90.9, 0.150, 9.0],
    "Tubelet-Contrast (K400)": [60.2, 92.8, 65.7, 47.0, 80.1, 91.0, 0.150, 10.3],
}


def get_parser():
    parser = argparse.ArgumentParser(description=__doc__, parents=[common.get_common_parser()],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    g = parser.add_argument_group("evaluation")
    g.add_argument("--task", default="linear", choices=TASKS)
    g.add_argument("--arch", default=None, help="backbone (common.build_backbone); default: the checkpoint's "
                   "meta['arch'], else tiny3d on toy-motion, bigru on skeletons, r2plus1d_18 on real video")
    g.add_argument("--arch-options", default=None, help="JSON kwargs of build_backbone, e.g. '{\"hidden\": 64}'; "
                   "default: the checkpoint's meta['options']")
    g.add_argument("--weights", default="none", help="backbone weights: none (random init), kinetics400 "
                   "(torchvision), or any file load_backbone_weights reads (our backbone.pth / checkpoint.pth, "
                   "the authors' formats)")
    g.add_argument("--weights-prefix", default=None, help="force the key prefix in --weights (e.g. encoder_q.)")
    g.add_argument("--concat", default=None, metavar="ARCH", help="a second skeleton encoder whose features are "
                   "concatenated with the first (App. A.4: X^SEQ + X^STG), e.g. agcn")
    g.add_argument("--concat-weights", default="none", help="weights of the --concat encoder (as --weights)")
    g.add_argument("--concat-prefix", default=None, help="key prefix of the --concat encoder in its file, e.g. "
                   "encoder_r. for the graph encoder of a skeleton-contrast checkpoint")
    g.add_argument("--select-on-test", action="store_true", help="select the checkpoint on the TEST split, as the "
                   "SEVERE and skeleton-contrast code do (reproduces their tables; optimistic). Default: a "
                   "validation split carved from the training set")
    g.add_argument("--val-fraction", type=float, default=0.1, help="stratified share of the training set held out "
                   "for checkpoint selection; 0 = no selection (last epoch)")
    g.add_argument("--eval-every", type=int, default=None, help="epochs between validation scores "
                   "(default: about 10 evaluations per run)")
    g.add_argument("--test-clips", type=int, default=None, help="clips per video at test (protocol: 10 for video)")
    g.add_argument("--frames", type=int, default=None, help="frames per clip (protocol: 32 video, 64 skeleton)")
    g.add_argument("--save-logits", action="store_true", help="also write logits.pth (train and test logits, "
                   "eval transform) for --task fusion")
    g = parser.add_argument_group("label efficiency (fewshot)")
    g.add_argument("--per-class", type=int, default=None, help="N labelled examples per class (thesis Ch. 2: 20, 50, "
                   "100)")
    g.add_argument("--label-fraction", type=float, default=None, help="stratified fraction of labels (Ch. 3: 0.01, "
                   "0.05, 0.1, 0.2)")
    g.add_argument("--num-examples", type=int, default=None, help="SEVERE's '10^3 examples': ceil(N / C) per class")
    g.add_argument("--seeds", type=int, nargs="+", default=None, help="repeat over these seeds and report "
                   "mean +- std (Ch. 2/3: 5 seeds); default: --seed")
    g.add_argument("--subset-seed", type=int, default=None, help="seed of the labelled subset; default: each run's "
                   "seed (a new subset per seed, Ch. 2/3). SEVERE uses one fixed subset for every model")
    g = parser.add_argument_group("retrieval and clusters")
    g.add_argument("--center-features", action="store_true", help="subtract each set's own feature mean before "
                   "L2 normalisation (CoCLR / ViCC retrieval code)")
    g.add_argument("--num-clusters", type=int, default=None, help="K for k-means (default: number of classes, as "
                   "ViCC supp. Sec. 3.1.2)")
    g.add_argument("--cluster-source", default="auto", choices=["auto", "kmeans", "prototypes"],
                   help="auto = the checkpoint's prototypes when they live in the backbone feature space, else "
                   "k-means on features")
    g = parser.add_argument_group("fusion (JMRN supp. Sec. 3)")
    g.add_argument("--logits", nargs="+", default=None, help="logits.pth files, one per modality (--save-logits)")
    g.add_argument("--fusion-weights", default="auto", choices=["auto", "modality", "class"],
                   help="one alpha per modality (single-label) or M x C (multi-label); auto picks by label type")
    g.add_argument("--fusion-l2", action="store_true", help="L2-normalise logits first (JMRN: JHMDB, HMDB)")
    g = parser.add_argument_group("severe")
    g.add_argument("--severe-columns", nargs="+", default=None, help="run only these columns (e.g. SSv2 FX-S1)")
    # Protocol values come from PROTOCOLS unless given on the command line.
    parser.set_defaults(epochs=None, lr=None, batch_size=None, wd=None, milestones=None, schedule="multistep",
                        lr_gamma=0.1, workers=4, knn_every=0, log_every=20)
    return parser


# ==================================================================================================== METRICS
# Pure functions of tensors / arrays. Accuracies are fractions in [0, 1]; main() reports percentages.
def topk_accuracy(scores, labels, ks=(1, 5)):
    """scores (N, C), labels (N,) -> {k: fraction of samples whose label is among the k highest scores}."""
    top = scores.topk(min(max(ks), scores.shape[1]), dim=1).indices  # (N, k_max)
    hit = top == labels[:, None]  # (N, k_max)
    return {k: hit[:, :k].any(dim=1).float().mean().item() for k in ks}


def mean_class_accuracy(predictions, labels, num_classes):
    """Accuracy per class, averaged over the classes present in `labels` (FineGym, App. B.2.3 / C.4)."""
    predictions, labels = torch.as_tensor(predictions), torch.as_tensor(labels)
    per_class = [(predictions[labels == c] == c).float().mean().item() for c in range(num_classes)
                 if (labels == c).any()]
    return float(np.mean(per_class))


def average_precision(scores, targets):
    """AP of one class (sklearn's average_precision_score): sum_n (R_n - R_{n-1}) P_n over the distinct score
    thresholds, ties counted together. scores, targets: (N,) arrays, targets in {0, 1} with at least one 1."""
    scores, targets = np.asarray(scores, dtype=np.float64), np.asarray(targets, dtype=np.float64)
    order = np.argsort(-scores, kind="mergesort")
    scores, targets = scores[order], targets[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1]  # last index of every distinct score
    true_pos = np.cumsum(targets)[last_of_tie]
    precision = true_pos / (last_of_tie + 1)
    recall = true_pos / true_pos[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def mean_average_precision(scores, targets):
    """Charades mAP (SlowFast get_map, reference notes Sec. 6.6): AP per class, classes WITHOUT a positive label
    dropped, mean over the rest. scores, targets: (N, C). Returns (mAP, {class index: AP})."""
    scores, targets = np.asarray(scores), np.asarray(targets)
    per_class = {c: average_precision(scores[:, c], targets[:, c]) for c in range(targets.shape[1])
                 if targets[:, c].sum() > 0}
    return float(np.mean(list(per_class.values()))), per_class


def retrieval_recall(query_features, query_labels, gallery_features, gallery_labels, ks=RETRIEVAL_KS):
    """R@k of CoCLR / ViCC (reference notes Sec. 6.4): fraction of queries with a same-label gallery item among the
    k most cosine-similar. Features must be L2-normalised. R@1 is the 1-NN accuracy of Sec. 3.4.3.2."""
    similarity = query_features @ gallery_features.T  # (N_query, N_gallery)
    top = similarity.topk(min(max(ks), gallery_features.shape[0]), dim=1).indices  # (N_query, k_max)
    hit = gallery_labels[top] == query_labels[:, None]  # (N_query, k_max)
    return {k: hit[:, :k].any(dim=1).float().mean().item() for k in ks}


def repetition_count_errors(predicted, true):
    """UCFRep metrics (Zhang et al. 2020, reference notes Sec. 6.5): counts rounded; MAE = mean |c_hat - c| / c
    (normalised by the true count, thesis Table 4.4 'UCF-RC'), OBO = fraction with |c_hat - c| <= 1."""
    predicted = np.round(np.asarray(predicted, dtype=np.float64))
    true = np.asarray(true, dtype=np.float64)
    error = np.abs(predicted - true)
    return {"mae": float(np.mean(error / true)), "obo": float(np.mean(error <= 1))}


def contingency_matrix(clusters, labels):
    """n_ij = number of samples in cluster i with label j -> (K, C) int64 over the values present."""
    _, cluster_index = np.unique(np.asarray(clusters), return_inverse=True)
    _, label_index = np.unique(np.asarray(labels), return_inverse=True)
    table = np.zeros((cluster_index.max() + 1, label_index.max() + 1), dtype=np.int64)
    np.add.at(table, (cluster_index, label_index), 1)
    return table


def _entropy(counts):
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def normalized_mutual_info(clusters, labels):
    """NMI = I(U; V) / ((H(U) + H(V)) / 2) (sklearn's default arithmetic normalisation), in nats."""
    n = contingency_matrix(clusters, labels).astype(np.float64)  # (K, C)
    total = n.sum()
    a, b = n.sum(axis=1), n.sum(axis=0)  # cluster sizes (K,), class sizes (C,)
    i, j = np.nonzero(n)
    mutual_info = float(np.sum(n[i, j] / total * np.log(total * n[i, j] / (a[i] * b[j]))))
    h_u, h_v = _entropy(a), _entropy(b)
    if h_u == 0 and h_v == 0:  # one cluster and one class: identical partitions
        return 1.0
    return mutual_info / ((h_u + h_v) / 2)


def adjusted_rand_index(clusters, labels):
    """ARI (Hubert & Arabie 1985) from the contingency table: (sum_ij C(n_ij, 2) - E) / (max - E)."""
    n = contingency_matrix(clusters, labels).astype(np.float64)
    pairs = lambda x: x * (x - 1) / 2  # noqa: E731  C(x, 2)
    index = pairs(n).sum()
    a, b = pairs(n.sum(axis=1)).sum(), pairs(n.sum(axis=0)).sum()
    expected = a * b / pairs(n.sum())
    maximum = (a + b) / 2
    if maximum == expected:  # both partitions trivial (all in one, or all singletons)
        return 1.0
    return float((index - expected) / (maximum - expected))


def linear_sum_assignment(cost):
    """Minimum-cost assignment (Hungarian method, Kuhn 1955) by shortest augmenting paths with potentials
    (Jonker-Volgenant style, O(n^2 m)). cost (n, m) -> (rows, cols), min(n, m) pairs, as scipy's function."""
    cost = np.asarray(cost, dtype=np.float64)
    transposed = cost.shape[0] > cost.shape[1]
    if transposed:
        cost = cost.T
    n, m = cost.shape  # n <= m: every row is assigned
    u, v = np.zeros(n + 1), np.zeros(m + 1)  # dual potentials of rows and columns (1-based, 0 = virtual)
    row_of = np.zeros(m + 1, dtype=np.int64)  # row_of[j]: row assigned to column j (0 = free)
    for i in range(1, n + 1):
        row_of[0], j0 = i, 0
        min_slack = np.full(m + 1, np.inf)
        previous = np.zeros(m + 1, dtype=np.int64)  # previous column on the alternating path
        used = np.zeros(m + 1, dtype=bool)
        while True:  # Dijkstra on reduced costs until a free column is reached
            used[j0] = True
            i0 = row_of[j0]
            slack = cost[i0 - 1] - u[i0] - v[1:]  # (m,) reduced costs from row i0
            free = ~used[1:]
            better = free & (slack < min_slack[1:])
            min_slack[1:][better] = slack[better]
            previous[1:][better] = j0
            candidates = np.where(free, min_slack[1:], np.inf)
            j1 = int(np.argmin(candidates)) + 1
            delta = candidates[j1 - 1]
            u[row_of[used]] += delta
            v[used] -= delta
            min_slack[1:][free] -= delta
            j0 = j1
            if row_of[j0] == 0:
                break
        while j0:  # augment along the path
            j1 = previous[j0]
            row_of[j0] = row_of[j1]
            j0 = j1
    cols = np.flatnonzero(row_of[1:]) + 1
    rows, cols = row_of[cols] - 1, cols - 1
    if transposed:
        rows, cols = cols, rows
    order = np.argsort(rows)
    return rows[order], cols[order]


def hungarian_accuracy(clusters, labels):
    """Accuracy after the one-to-one cluster -> class matching that maximises agreement (ViCC supp. Sec. 3.1.2);
    clusters left unmatched (K > C) count as errors."""
    n = contingency_matrix(clusters, labels)
    rows, cols = linear_sum_assignment(-n)
    return float(n[rows, cols].sum() / n.sum())


def cluster_purity_entropy(clusters, labels):
    """Mean over clusters of the entropy (nats) of the label distribution in the cluster (0 is optimal) and of the
    largest label share in the cluster (mean maximal purity), as defined by SeLa (Asano et al. 2020)."""
    n = contingency_matrix(clusters, labels)
    entropy = np.mean([_entropy(row) for row in n])
    purity = np.mean(n.max(axis=1) / n.sum(axis=1))
    return float(entropy), float(purity)


def cluster_metrics(clusters, labels):
    """ViCC supp. Table 1: Acc (Hungarian), NMI, ARI, mean entropy per cluster, mean max purity."""
    entropy, purity = cluster_purity_entropy(clusters, labels)
    return {"acc": hungarian_accuracy(clusters, labels), "nmi": normalized_mutual_info(clusters, labels),
            "ari": adjusted_rand_index(clusters, labels), "entropy": entropy, "max_purity": purity}


def severe_mean_and_rank(rows):
    """Thesis Table 5.8 'Mean' and 'Rank': rows {name: 8 SEVERE values}, UCF-RC (index 6) an error. Mean over the
    columns with UCF-RC as (1 - error) * 100 (this reproduces the printed means). Rank: per column, 1 + the number
    of rows strictly better, averaged over columns (the printed ranks are not reproducible from the printed values
    with any tie rule; see README)."""
    names = list(rows)
    values = np.array([rows[name] for name in names], dtype=np.float64)  # (R, columns)
    higher_better = values.copy()
    higher_better[:, 6] = (1 - values[:, 6]) * 100
    mean = higher_better.mean(axis=1)
    better = (higher_better[None, :, :] > higher_better[:, None, :]).sum(axis=1)  # (R, columns)
    rank = (1 + better).mean(axis=1)
    return {name: (float(m), float(r)) for name, m, r in zip(names, mean, rank)}


# ---------------------------------------------------------------------------------------------- labelled subsets
def per_class_subset(labels, per_class=None, fraction=None, seed=0):
    """Sorted indices of a class-stratified subset, reproducible by seed: `per_class` samples per class (all when a
    class has fewer; SEVERE's '10^3 examples' = ceil(1000 / C) per class, reference notes Sec. 6.1), or
    round(fraction * n_c) per class, at least 1. Multi-label (N, C) labels are stratified by their first class."""
    labels = np.asarray(labels)
    if labels.ndim > 1:
        labels = labels.argmax(axis=1)
    rng = np.random.RandomState(seed)
    keep = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        k = min(per_class, len(members)) if per_class is not None else max(1, int(round(fraction * len(members))))
        keep.append(rng.permutation(members)[:k])
    return np.sort(np.concatenate(keep))


def train_val_split(labels, val_fraction, seed=0):
    """(train indices, val indices): a stratified validation split carved from the training set for checkpoint
    selection; a class keeps at least one training sample."""
    labels = np.asarray(labels)
    if labels.ndim > 1:
        labels = labels.argmax(axis=1)
    rng = np.random.RandomState(seed)
    val = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        k = min(max(1, int(round(val_fraction * len(members)))), len(members) - 1)
        val.append(rng.permutation(members)[:k])
    val = np.sort(np.concatenate(val))
    return np.setdiff1d(np.arange(len(labels)), val), val


# ---------------------------------------------------------------------------------------------- late fusion
class LateFusion(nn.Module):
    """JMRN supp. Eq. (1): l_combined = sum_m alpha_m * l_m over M modalities; alpha (M, 1) for single-label tasks,
    (M, C) for multi-label ones (one weight per modality and class)."""

    def __init__(self, num_modalities, num_classes, per_class):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(num_modalities, num_classes if per_class else 1))

    def forward(self, logits):  # logits (M, N, C)
        return (self.alpha[:, None, :] * logits).sum(dim=0)  # (N, C)


def fit_late_fusion(logits, labels, multilabel, per_class, epochs=100, lr=1e-3, batch_size=256, seed=0):
    """Learn alpha on saved logits (M, N, C) with Adam (JMRN: 100 epochs; lr 1e-3 JHMDB, 1e-4 HMDB, 5e-4 Charades)
    to minimise cross-entropy (or BCE for multi-label) of l_combined. Returns the fitted LateFusion."""
    generator = torch.Generator().manual_seed(seed)
    fusion = LateFusion(logits.shape[0], logits.shape[2], per_class)
    optimizer = torch.optim.Adam(fusion.parameters(), lr=lr)
    for _ in range(epochs):
        for batch in torch.randperm(logits.shape[1], generator=generator).split(batch_size):
            combined = fusion(logits[:, batch])  # (B, C)
            if multilabel:
                loss = F.binary_cross_entropy_with_logits(combined, labels[batch].float())
            else:
                loss = F.cross_entropy(combined, labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return fusion


# ---------------------------------------------------------------------------------------------- k-means
def kmeans(features, k, iterations=100, seed=0):
    """Lloyd's k-means with k-means++ seeding on (N, D) features (torch, any device). Returns (assignments (N,),
    centroids (k, D)). Used on L2-normalised features when the checkpoint has no prototypes."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    n = features.shape[0]
    centroids = features[torch.randint(n, (1,), generator=generator).to(features.device)]  # (1, D)
    for _ in range(1, k):  # k-means++: next centre with probability proportional to squared distance
        distance = torch.cdist(features, centroids).min(dim=1).values.pow(2)  # (N,)
        if distance.sum() == 0:
            pick = torch.randint(n, (1,), generator=generator)
        else:
            pick = torch.multinomial((distance / distance.sum()).cpu(), 1, generator=generator)
        centroids = torch.cat([centroids, features[pick.to(features.device)]])
    assignments = torch.cdist(features, centroids).argmin(dim=1)  # (N,)
    for _ in range(iterations):
        one_hot = F.one_hot(assignments, k).to(features.dtype)  # (N, k)
        counts = one_hot.sum(dim=0)  # (k,)
        updated = (one_hot.T @ features) / counts.clamp(min=1)[:, None]  # (k, D)
        centroids = torch.where(counts[:, None] > 0, updated, centroids)  # an empty cluster keeps its centre
        new = torch.cdist(features, centroids).argmin(dim=1)
        if torch.equal(new, assignments):
            break
        assignments = new
    return assignments, centroids
