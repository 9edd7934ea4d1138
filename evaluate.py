r"""Every downstream protocol of the thesis and the ViCC / JMRN supplements, for any backbone and checkpoint.

F. M. Thoker, *Video-Efficient Foundation Models* (thesis, UvA 2023): Ch. 2 Sec. 2.5 (label-efficient finetuning),
Ch. 3 Sec. 3.4.3 + App. A.1 (skeleton linear / retrieval / semi-supervised / transfer), Ch. 4 + App. B.2 (SEVERE),
Ch. 5 Sec. 5.4 + App. C.4; ViCC supplement Sec. 3 (cluster metrics); JMRN supplement Sec. 3 Eq. (1) (fusion);
Zhang et al., "Context-aware and Scale-insensitive Temporal Repetition Counting", CVPR 2020 (repcount).
README: "evaluate.py". Protocol facts come from the authors' code (SEVERE-BENCHMARK, skeleton-contrast, CoCLR, ViCC);
where we differ from it, the comments say so.

Every task, toy command first (CPU, seconds to a minute; without --weights: random initialisation, the baseline),
then the real-data command (W = a backbone.pth, checkpoint.pth or an authors' checkpoint):

    finetune       python evaluate.py --task finetune
                   python evaluate.py --task finetune --data gym99 --arch r2plus1d_18 --weights W --gpus 4
    linear         python evaluate.py --task linear --data toy-skeleton
                   python evaluate.py --task linear --data ntu60-xview --arch bigru --weights W
    knn            python evaluate.py --task knn --data toy-skeleton
                   python evaluate.py --task knn --data ucf101 --arch s3d --weights W --center-features
    fewshot        python evaluate.py --task fewshot --per-class 4 --seeds 0 1
                   python evaluate.py --task fewshot --data ucf101 --num-examples 1000 --weights W
                   python evaluate.py --task fewshot --protocol ch2 --per-class 20 --seeds 0 1 2 3 4 --data ucf101 \
                       --arch r2plus1d_18 --weights W   (thesis Ch. 2 protocol: only fc + last block trained)
    transfer       python evaluate.py --task transfer --data toy-skeleton --weights runs/<skeleton run>/backbone.pth
                   python evaluate.py --task transfer --data pku2 --arch bigru --weights W_pretrained_on_ntu60
    multilabel     (no toy multi-label set; tests/test_evaluate.py builds a Charades layout from toy-motion)
                   python evaluate.py --task multilabel --data charades --weights W --gpus 4
    arrow-of-time  python evaluate.py --task arrow-of-time
                   python evaluate.py --task arrow-of-time --data ucf101 --weights W
    clusters       python evaluate.py --task clusters
                   python evaluate.py --task clusters --data ucf101 --arch s3d --weights W
    fusion         python evaluate.py --task finetune --save-logits; python evaluate.py --task linear --save-logits;
                   python evaluate.py --task fusion --logits runs/evaluate-{finetune,linear}-toy-motion-*/logits.pth
                   python evaluate.py --task fusion --logits rgb/logits.pth flow/logits.pth pose/logits.pth
                   (top1_mean_scores: the equal-weight mean of the streams' class probabilities, thesis Table 2.1
                   two-stream and ViCC's R+F; --task knn --save-logits files: R+F retrieval, the sum of cosines)
    repcount       python evaluate.py --task repcount
                   python evaluate.py --task repcount --data ucfrep --arch r2plus1d_18 --weights W --gpus 4
    detection      (no toy set; tests build a PKU-MMD layout) R-C3D on the student's trunk (thesis Table 2.6):
                   python evaluate.py --task detection --data pku1-paired --weights W --label-fraction 0.25 --gpus 4
    severe         python evaluate.py --task severe --max-steps 2
                   python evaluate.py --task severe --arch r2plus1d_18 --weights W --data-root /datasets --gpus 8

Honest by construction: checkpoints are selected on a validation split carved from the training set
(--val-fraction); the authors' test-split selection is only available behind --select-on-test. Linear probes get a
fresh classifier and a frozen backbone in eval mode. Every run prints its exact protocol and writes result.json and
result.txt into --out-dir (default: one folder per task, data and weights FILE). The folder's identity.json (task,
data, weights path + SHA-256, protocol) must match for a rerun to resume or reuse it. Checkpoints are read with
torch.load(weights_only=True); --trust-checkpoint allows other pickled objects (which can run code).
"""
import argparse
import copy
import functools
import hashlib
import inspect
import json
import math
import os
import re
import sys

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import common

TASKS = ("finetune", "linear", "knn", "fewshot", "transfer", "multilabel", "arrow-of-time", "clusters", "fusion",
         "repcount", "severe", "detection", "crossdomain")
SKELETON_ARCHS = common.SKELETON_ARCHS  # bigru, hcn, agcn, stgcn on (C, T, V, M); skelemotion_cnn on images
RETRIEVAL_KS = (1, 5, 10, 20, 50)  # CoCLR / ViCC video retrieval R@k (their retrieval code)
KNN_K, KNN_T = 200, 0.1  # weighted kNN (InstDisc; skeleton-contrast's and CoCLR's kNN monitor) beside the 1-NN
POSE_VIDEO_SETS = ("sims4action", "toyota-smarthome")  # videos + pose2d/<name>.json (common.py convert-alphapose)


# ==================================================================================================== FLAGS
# Per-dataset protocols as plain dicts: (optimizer, batch, lr, epochs, milestones) per task, frames and clips.
# Video finetuning: thesis Table B.2 / C.4 (Adam, multistep gamma 0.1; the SEVERE code runs 1/10 of these epochs
# with every video repeated 10 times per epoch, the same number of clips). Video linear: Table B.2 (Adam, as the
# SEVERE code). Frames: 32 at train and test, 10 uniformly spaced test clips averaged (App. B.2.1), 112 crops.
# Skeletons: App. A.1 (linear SGD 0.1, 80 epochs, [50, 70]; semi-supervised and transfer Adam 1e-4, 50 epochs,
# [30, 40]; 64-frame crops, random in training and centred at test), batch 64 as the authors' scripts.
def _opt(optimizer, batch, lr, epochs, milestones, wd=0.0, momentum=0.9):
    """One task's optimisation settings as a dict (the PROTOCOLS entries)."""
    return dict(optimizer=optimizer, batch=batch, lr=lr, epochs=epochs, milestones=list(milestones), wd=wd,
                momentum=momentum)


VIDEO = dict(modality="video", frames=32, stride=1, crop=112, short_side=128, crop_scale=(0.08, 1.0), flip=True,
             jitter=(0.4, 0.4, 0.4, 0.2), test_clips=10, metric="top1", dropout=0.0)
SKELETON = dict(modality="skeleton", frames=64, stride=1, test_clips=1, metric="top1", dropout=0.0,
                linear=_opt("sgd", 64, 0.1, 80, [50, 70]), fewshot=_opt("adam", 64, 1e-4, 50, [30, 40]),
                finetune=_opt("adam", 64, 1e-4, 50, [30, 40]), transfer=_opt("adam", 64, 1e-4, 50, [30, 40]))
GYM_FINETUNE = _opt("adam", 32, 1e-4, 160, [60, 100, 140])
PROTOCOLS = {
    "ucf101": dict(VIDEO, finetune=_opt("adam", 32, 1e-4, 160, [60, 100, 140]),
                   linear=_opt("adam", 64, 1e-2, 100, [40, 80]),
                   fewshot=_opt("adam", 32, 1e-4, 160, [80, 120, 140]),  # UCF (10^3), Table C.4
                   arrow=_opt("adam", 12, 1e-5, 10, [])),  # App. B.2.4: 8 frames spread over the video, no
    # augmentation, no schedule (any video set: the protocol is defined on UCF101 only)
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
    # Repetition counting (Zhang et al. 2020 as SEVERE-BENCHMARK's Repetition-Counting): frames = basic_duration
    # (two 16-frame context streams), training sub-segments of <= sample_duration frames, Adam 5e-5 wd 1e-3, 100
    # epochs, batch 32, 112 crops (short side 112 + centre crop; theirs: longer side 112 + centre crop), flip.
    "ucfrep": dict(VIDEO, frames=32, short_side=112, jitter=False, test_clips=1, metric="mae",
                   sample_duration=300, repcount=_opt("adam", 32, 5e-5, 100, [], wd=1e-3)),
    "ntu60-xsub": SKELETON, "ntu60-xview": SKELETON, "ntu120-xsub": SKELETON, "ntu120-xset": SKELETON,
    "pku1": SKELETON, "pku2": SKELETON,
    # Toy sets (not in any paper): 16-frame 64x64 videos and 64-frame skeletons; a minute on a CPU. Toy-motion:
    # no flip (it swaps right/left and circle_cw/circle_ccw), crops of >= half the area (the object stays in), no
    # colour jitter (label-preserving but it stalls from-scratch training for longer than a toy run lasts).
    "toy-motion": dict(VIDEO, frames=8, stride=2, crop=56, short_side=64, crop_scale=(0.5, 1.0), flip=False,
                       jitter=False, test_clips=2,
                       finetune=_opt("adam", 16, 1e-3, 6, [4]), linear=_opt("adam", 16, 1e-2, 6, [4]),
                       fewshot=_opt("adam", 16, 1e-3, 6, [4]), arrow=_opt("adam", 16, 1e-3, 4, []),
                       multilabel=_opt("adam", 16, 1e-3, 6, [4])),
    # Toy-ucfrep: 32 frames as the paper (16 per stream: 8 would alias a 4-cycle window) at 32x32 to stay cheap.
    "toy-ucfrep": dict(VIDEO, frames=32, crop=32, short_side=32, jitter=False, test_clips=1, metric="mae",
                       sample_duration=64, repcount=_opt("adam", 8, 3e-3, 12, [])),
    # Paired sets (crossmodal_distill.py): the modality comes from the checkpoint's meta (depth by default, flow);
    # one clip per video at test (all frames // L: --protocol ch2). Toy: toy-paired-target's 6 actions, 16-24 frames.
    "paired": dict(VIDEO, modality="depth", frames=16, short_side=112, jitter=False, test_clips=1,
                   detection=_opt("sgd", 4, 1e-4, 8, [6], wd=5e-4)),  # Table 2.6; wd: R-C3D's solver
    "toy-paired": dict(VIDEO, modality="depth", frames=8, crop=48, short_side=48, crop_scale=(0.5, 1.0),
                       jitter=False, test_clips=1, finetune=_opt("adam", 16, 1e-3, 10, [7]),
                       linear=_opt("adam", 16, 1e-2, 10, [7]), fewshot=_opt("adam", 16, 1e-3, 10, [7])),
    "toy-skeleton": dict(SKELETON, frames=32,  # skeleton_contrast.py's toy view length (paper: 64)
                         linear=_opt("sgd", 32, 0.1, 10, [6, 8]), fewshot=_opt("adam", 32, 1e-3, 6, [4]),
                         finetune=_opt("adam", 32, 1e-3, 6, [4]), transfer=_opt("adam", 32, 1e-3, 6, [4])),
}
# Encoder sizes for toy skeletons when neither --arch-options nor the checkpoint says (not in the paper; as
# skeleton_contrast.py --encoder-size small): the paper's 3 x 1024 BiGRU takes minutes per toy epoch on a CPU.
TOY_ENCODER_OPTIONS = {"bigru": {"hidden": 64, "layers": 2}, "hcn": {"hidden": 16}, "agcn": {"hidden": 16},
                       "stgcn": {"hidden": 16}}

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
    """common's flags + the evaluation flags; protocol values stay None unless given (apply_protocol fills them)."""
    parser = argparse.ArgumentParser(description=__doc__, parents=[common.get_common_parser()],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    g = parser.add_argument_group("evaluation")
    g.add_argument("--task", default="linear", choices=TASKS)
    g.add_argument("--target", help="--task crossdomain (P-HLVC supp. Sec. 7.2): finetune on --data (select on its "
                   "val split), test on this set's mapped classes: toyota-smarthome")
    g.add_argument("--target-root", help="root of --target (default data/<target>)")
    g.add_argument("--class-map", default="sims4action", choices=["sims4action", "phlvc-code"], help="Toyota -> "
                   "Sims4Action classes: sims4action's correspondence CSV (16 -> 10) or the P-HLVC code's (+3)")
    g.add_argument("--calibrate", type=int, default=0, metavar="EPOCHS", help="--task crossdomain: then finetune "
                   "EPOCHS on Sinkhorn-balanced pseudo-labels of the target videos (our reading of P-HLVC's "
                   "undefined 'domain calibration', eps 0.05)")
    g.add_argument("--arch", help="backbone (common.build_backbone); default: the checkpoint's meta['arch'], else "
                   "tiny3d on toy-motion, bigru on skeletons, r2plus1d_18 on real video")
    g.add_argument("--arch-options", help="JSON kwargs of build_backbone, e.g. '{\"hidden\": 64}'; default: the "
                   "checkpoint's meta['options']")
    g.add_argument("--weights", default="none", help="none (random init), kinetics400 (torchvision), or any file "
                   "load_backbone_weights reads (our backbone.pth / checkpoint.pth, the authors' formats)")
    g.add_argument("--weights-prefix", help="force the key prefix in --weights (e.g. encoder_q.)")
    g.add_argument("--concat", metavar="ARCH", help="a second skeleton encoder whose features are concatenated with "
                   "the first (App. A.4: X^SEQ + X^STG), e.g. agcn")
    g.add_argument("--concat-weights", default="none", help="weights of the --concat encoder (as --weights)")
    g.add_argument("--concat-options", help="JSON kwargs of the --concat encoder (default: its meta['options'])")
    g.add_argument("--concat-prefix", help="key prefix of the --concat encoder in its file, e.g. encoder_r. for the "
                   "graph encoder of a skeleton-contrast checkpoint")
    g.add_argument("--select-on-test", action="store_true", help="select the checkpoint on the TEST split, as the "
                   "SEVERE and skeleton-contrast code (their tables; optimistic); default: a split of the training set")
    g.add_argument("--val-fraction", type=float, help="stratified share of the training set held out for selection "
                   "(default 0.1; fewshot 0: it would break the label budget); 0 = the last epoch is tested")
    g.add_argument("--eval-every", type=int, help="epochs between validation scores (default: ~10 per run)")
    g.add_argument("--test-clips", type=int, help="clips per video at test (protocol: 10 for video)")
    g.add_argument("--frames", type=int, help="frames per clip (protocol: 32 video, 64 skeleton; --task detection: "
                   "the R-C3D buffer, 768)")
    g.add_argument("--no-center", action="store_true", help="skeletons: do not subtract body 0's spine joint per "
                   "frame (skeleton_contrast.py centres before pretraining; use the same setting here)")
    g.add_argument("--save-logits", action="store_true", help="also write logits.pth (train and test logits, "
                   "eval transform; --task knn: gallery and query features) for --task fusion")
    g = parser.add_argument_group("label efficiency (fewshot)")
    g.add_argument("--protocol", dest="protocol_name", default="dataset", choices=["dataset", "ch2", "coclr", "phlvc"],
                   help="dataset = the --data entry of PROTOCOLS (whole network; UCF/Gym 10^3: thesis Table C.4); "
                   "ch2 = thesis Sec. 2.4.3: depth: only fc + the last block trained, SGD 0.1, wd 1e-3, batch 128, "
                   "100 epochs; skeletons: all layers, wd 1e-5, batch 100, 70 epochs, whole sequences; coclr = "
                   "CoCLR / ViCC linear (L2 + BN + linear) and finetune (dropout 0.9) at 32x128²; phlvc = P-HLVC "
                   "supp. Sec. 7.6 finetune (Table 6 augmentation, 10 random test crops, dropout-ReLU-linear head)")
    g.add_argument("--per-class", type=int, help="N labelled examples per class (thesis Ch. 2: 20, 50, 100 with "
                   "--protocol ch2)")
    g.add_argument("--label-fraction", type=float, help="stratified fraction of labels (Ch. 3: 0.01, 0.05, 0.1, "
                   "0.2); --task detection: random share of the training videos (Table 2.6: 0.25, 0.5)")
    g.add_argument("--num-examples", type=int, help="SEVERE's '10^3 examples': ceil(N / C) per class")
    g.add_argument("--seeds", type=int, nargs="+", help="repeat over these seeds and report mean +- std (Ch. 2/3: "
                   "5 seeds); default: --seed")
    g.add_argument("--subset-seed", type=int, help="seed of the labelled subset; default: each run's seed (a new "
                   "subset per seed, Ch. 2/3). SEVERE uses one fixed subset for every model")
    g = parser.add_argument_group("retrieval and clusters")
    g.add_argument("--center-features", action="store_true", help="subtract each set's own feature mean before "
                   "L2 normalisation (CoCLR / ViCC retrieval code)")
    g.add_argument("--modality", choices=["video", "flow"], help="input of a video encoder; flow = the CoCLR / "
                   "ViCC flow image of <video>/flow_%%05d.jpg (default: the checkpoint meta's, else video)")
    g.add_argument("--num-clusters", type=int, help="K for k-means (default: number of classes, as ViCC supp. "
                   "Sec. 3.1.2)")
    g.add_argument("--cluster-source", default="auto", choices=["auto", "kmeans", "prototypes"],
                   help="auto = the checkpoint's prototypes when they live in the backbone feature space or after "
                   "the projection head saved with them (vicc.py), else k-means on features")
    g = parser.add_argument_group("fusion (JMRN supp. Sec. 3)")
    g.add_argument("--logits", nargs="+", help="logits.pth files, one per modality (--save-logits)")
    g.add_argument("--fusion-weights", default="auto", choices=["auto", "modality", "class"],
                   help="one alpha per modality (single-label) or M x C (multi-label); auto picks by label type")
    g.add_argument("--fusion-l2", action="store_true", help="L2-normalise logits first (JMRN: JHMDB, HMDB)")
    g = parser.add_argument_group("repetition counting (Zhang et al. CVPR 2020, SEVERE 'UCF-RC')")
    g.add_argument("--rc-sample-duration", type=int, help="longest training sub-segment in frames (paper: "
                   "sample_duration 300; toy 64); test videos are counted whole")
    g.add_argument("--rc-states", type=int, default=4, help="cycle-length states drawn per training video and step "
                   "(ours; Zhang et al. roll out up to 11 model-driven states per loaded batch instead)")
    g = parser.add_argument_group("severe")
    g.add_argument("--severe-columns", nargs="+", help="run only these columns (e.g. SSv2 FX-S1)")
    parser.set_defaults(epochs=None, lr=None, batch_size=None, wd=None, milestones=None, schedule="multistep",
                        lr_gamma=0.1, workers=4, knn_every=0, log_every=20)
    return parser


# ==================================================================================================== METRICS
# Pure functions of tensors / arrays. Accuracies are fractions in [0, 1]; main() reports percentages.
def topk_accuracy(scores, labels, ks=(1, 5)):
    """scores (N, C), labels (N,) -> {k: fraction of samples whose label is among the k highest scores}.
    Ties go to the lowest class index, as argmax (and so mean_class_accuracy of the argmax) breaks them."""
    top = scores.argsort(dim=1, descending=True, stable=True)[:, :min(max(ks), scores.shape[1])]  # (N, k_max)
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
    """Charades mAP (SlowFast's get_map, as SEVERE-BENCHMARK): AP per class, classes WITHOUT a positive label
    dropped, mean over the rest. scores, targets: (N, C). Returns (mAP, {class index: AP})."""
    scores, targets = np.asarray(scores), np.asarray(targets)
    per_class = {c: average_precision(scores[:, c], targets[:, c]) for c in range(targets.shape[1])
                 if targets[:, c].sum() > 0}
    return float(np.mean(list(per_class.values()))), per_class


def retrieval_recall(query_features, query_labels, gallery_features, gallery_labels, ks=RETRIEVAL_KS):
    """R@k of CoCLR / ViCC (their retrieval code): fraction of queries with a same-label gallery item among the
    k most cosine-similar. Features must be L2-normalised. R@1 is the 1-NN accuracy of Sec. 3.4.3.2."""
    similarity = query_features @ gallery_features.T  # (N_query, N_gallery)
    top = similarity.topk(min(max(ks), gallery_features.shape[0]), dim=1).indices  # (N_query, k_max)
    hit = gallery_labels[top] == query_labels[:, None]  # (N_query, k_max)
    return {k: hit[:, :k].any(dim=1).float().mean().item() for k in ks}


def repetition_count_errors(predicted, true):
    """UCFRep metrics (Zhang et al. 2020, their val_2stream.py): counts rounded; MAE = mean |c_hat - c| / c
    (normalised by the true count, thesis Table 4.4 'UCF-RC'), OBO = fraction with |c_hat - c| <= 1."""
    predicted = np.round(np.asarray(predicted, dtype=np.float64))
    true = np.asarray(true, dtype=np.float64)
    error = np.abs(predicted - true)
    return {"mae": float(np.mean(error / true)), "obo": float(np.mean(error <= 1))}


def temporal_iou(segment, segments):
    """tIoU of one [start, end) with (K, 2) segments -> (K,) (ActivityNet's segment_iou: continuous times)."""
    return segment_iou(torch.tensor([segment], dtype=torch.float64), torch.from_numpy(segments))[0].numpy()  # (K,)


def detection_average_precision(detections, ground_truth, tiou):
    """AP of one class as ActivityNet's compute_average_precision_detection (R-C3D's evaluation): detections
    [(video, start, end, score)] by falling score, each matched one-to-one to the unmatched ground truth
    [(video, start, end)] of its video with the highest tIoU >= tiou (else a false positive); AP = area under the
    monotone precision envelope (interpolated_prec_rec). Segments are [start, end) in frames."""
    by_video = {}
    for k, (video, start, end) in enumerate(ground_truth):
        by_video.setdefault(video, []).append((k, start, end))
    used, hits = np.zeros(len(ground_truth), dtype=bool), []
    for video, start, end, _ in sorted(detections, key=lambda d: -d[3]):
        gt = by_video.get(video, [])
        ious = temporal_iou((start, end), np.array([g[1:] for g in gt], dtype=np.float64).reshape(-1, 2))
        match = next((gt[j][0] for j in np.argsort(-ious, kind="stable") if ious[j] >= tiou and not used[gt[j][0]]),
                     None)  # the best-overlapping ground truth still free
        hits.append(match is not None)
        if match is not None:
            used[match] = True
    tp = np.cumsum(hits, dtype=np.float64)
    recall, precision = tp / max(len(ground_truth), 1), tp / np.arange(1, len(hits) + 1)
    mrec, mprec = np.r_[0.0, recall, 1.0], np.r_[0.0, precision, 0.0]
    mprec = np.maximum.accumulate(mprec[::-1])[::-1]
    step = np.flatnonzero(mrec[1:] != mrec[:-1]) + 1
    return float(np.sum((mrec[step] - mrec[step - 1]) * mprec[step]))


def detection_map(detections, ground_truth, tious=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)):
    """mAP over the classes present in the ground truth, per tIoU. detections [(video, class, start, end, score)],
    ground_truth [(video, class, start, end)] -> {tiou: mAP}."""
    classes = sorted({g[1] for g in ground_truth})
    return {t: float(np.mean([detection_average_precision([(d[0], *d[2:]) for d in detections if d[1] == c],
                                                          [(g[0], *g[2:]) for g in ground_truth if g[1] == c], t)
                              for c in classes])) for t in tious}


def pku_mmd_map_action(detections, ground_truth, theta=0.5, slots=52):
    """mAP_action of PKU-MMD's own evaluate.py (their ap() and calc_ovlp(), as printed by their script): segments
    (video, class, start, end) with INCLUSIVE end frames; a detection is positive when its overlap (intersection /
    hull) with a same-class ground truth of its video is >= theta, with NO one-to-one matching (duplicates count);
    AP walks from the least confident detection; the sum is divided by their 52 label slots (number_label: labels
    1-51 and an unused 0), i.e. 51/52 of the mean over actions."""
    total = 0.0
    for c in sorted({g[1] for g in ground_truth}):
        truth = [g for g in ground_truth if g[1] == c]

        def overlap(d):  # their calc_ovlp: best intersection / hull with a same-class ground truth of the video
            return max([(min(e, d[3]) - max(s, d[2])) / (max(e, d[3]) - min(s, d[2])) for v, _, s, e in truth
                        if v == d[0]] or [0.0])
        found = sorted(((d[4], overlap(d) >= theta) for d in detections if d[1] == c), key=lambda x: x[0])
        pos, number, old_precision, score = sum(p for _, p in found), len(found), 0.0, 0.0
        old_recall = min(pos / len(truth), 1)
        for _, positive in found:  # confidence ascending, as theirs
            number -= 1
            if not positive:
                continue
            pos -= 1
            if number == 0:
                break
            old_precision = max(old_precision, pos / number)
            score += old_precision * (old_recall - min(pos / len(truth), 1))
            old_recall = min(pos / len(truth), 1)
        total += score + old_precision * old_recall
    return total / slots


def contingency_matrix(clusters, labels):
    """n_ij = number of samples in cluster i with label j -> (K, C) int64 over the values present."""
    _, cluster_index = np.unique(np.asarray(clusters), return_inverse=True)
    _, label_index = np.unique(np.asarray(labels), return_inverse=True)
    table = np.zeros((cluster_index.max() + 1, label_index.max() + 1), dtype=np.int64)
    np.add.at(table, (cluster_index, label_index), 1)
    return table


def _entropy(counts):
    """Entropy (nats) of the distribution given by counts (K,)."""
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


def severe_mean_and_rank(rows, error_columns=(6,)):
    """Thesis Table 5.8 'Mean' and 'Rank': rows {name: SEVERE values}, error_columns lower-is-better (UCF-RC, index 6
    of the 8 columns). Mean over the columns with an error e as (1 - e) * 100 (this reproduces the printed means).
    Rank: per column, 1 + the number of rows strictly better, averaged over columns (the printed ranks are not
    reproducible from the printed values with any tie rule; see README)."""
    names = list(rows)
    values = np.array([rows[name] for name in names], dtype=np.float64)  # (R, columns)
    higher_better = values.copy()
    for c in error_columns:
        higher_better[:, c] = (1 - values[:, c]) * 100
    mean = higher_better.mean(axis=1)
    better = (higher_better[None, :, :] > higher_better[:, None, :]).sum(axis=1)  # (R, columns)
    rank = (1 + better).mean(axis=1)
    return {name: (float(m), float(r)) for name, m, r in zip(names, mean, rank)}


# ---------------------------------------------------------------------------------------------- labelled subsets
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
            loss = (F.binary_cross_entropy_with_logits(combined, labels[batch].float()) if multilabel else
                    F.cross_entropy(combined, labels[batch]))
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


# ==================================================================================================== MODELS
class Classifier(nn.Module):
    """backbone -> dropout -> new Linear(feature_dim, C), fc initialised N(0, 0.01) as SEVERE and CoCLR do.
    frozen=True is the linear probe: backbone weights fixed AND the backbone kept in eval mode, so BatchNorm uses
    its pretrained statistics (the SEVERE linear code trains in train mode and keeps torchvision's 400-way fc).
    trainable="layer4" (--protocol ch2) trains only that block of the backbone; the rest is frozen and in eval mode."""

    def __init__(self, backbone, num_outputs, frozen, dropout=0.0, trainable=None, l2_bn=False, relu=False):
        super().__init__()
        self.backbone, self.frozen, self.trainable, self.relu = backbone, frozen, trainable, relu
        # --protocol coclr probe (CoCLR / ViCC LinearClassifier): L2-normalised features -> BatchNorm1d -> fc
        self.bn = nn.BatchNorm1d(backbone.feature_dim) if l2_bn else None
        self.backbone.requires_grad_(not frozen and trainable is None)
        if trainable is not None:
            backbone.get_submodule(trainable).requires_grad_(True)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(backbone.feature_dim, num_outputs)
        nn.init.normal_(self.fc.weight, 0.0, 0.01)
        nn.init.zeros_(self.fc.bias)

    def train(self, mode=True):
        super().train(mode)
        if self.frozen or self.trainable is not None:
            self.backbone.eval()
        if self.trainable is not None:
            self.backbone.get_submodule(self.trainable).train(mode)
        return self

    def forward(self, *x):
        """x: the input_keys(args) tensors; a single encoder reads the last (P-HLVC pose alone: the pose)."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            features = self.backbone(*x) if isinstance(self.backbone, ConcatEncoder) else self.backbone(x[-1])  # (N, D)
        if self.bn is not None:
            features = self.bn(F.normalize(features, dim=1))  # (N, D)
        features = F.relu(features) if self.relu else features  # --protocol phlvc: dropout-ReLU-linear (P-HLVC
        # supp. Sec. 7.3); ReLU before dropout is the same function (dropout's mask and scale commute with ReLU)
        return self.fc(self.dropout(features))  # (N, C)


class ConcatEncoder(nn.Module):
    """Two skeleton encoders on the same input, features concatenated (thesis App. A.4, e.g. X^SEQ + X^STG); with
    two inputs (video, pose) the first reads the video, the second the pose (P-HLVC supp. Sec. 7.3)."""

    def __init__(self, first, second):
        super().__init__()
        self.first, self.second = first, second
        self.feature_dim = first.feature_dim + second.feature_dim

    def forward(self, *x):
        return torch.cat([self.first(x[0]), self.second(x[-1])], dim=1)  # (N, D1 + D2)


def last_block(arch):
    """(name, module path) of the backbone's last block, the one --protocol ch2 trains (thesis Sec. 2.4.3: "the
    last ResNet block"): layer4 of the ResNets; the last convolution block of the toy tiny3d."""
    if arch == "tiny3d":
        return "the last conv block", "features.3"
    if arch in ("r2plus1d_18", "r3d_18", "mc3_18", "resnet3d_18", "resnext3d_101", "r2d3d_18"):
        return "layer4", "layer4"
    raise common.UserError(f"evaluate.py: --protocol ch2 trains the last ResNet block (thesis Sec. 2.4.3); --arch "
                           f"{arch} has none (use a ResNet: r2plus1d_18, r3d_18, resnet3d_18, ...)")


def checkpoint_meta(path, trust=False):
    """meta of our backbone.pth ({"state_dict", "meta"}); {"args": ...} of our checkpoint.pth; {} otherwise."""
    if path in ("none", "kinetics400"):
        return {}
    obj = common.load_checkpoint_file(path, trust=trust)  # a folder, unreadable or untrusted file: UserError now
    if not isinstance(obj, dict):
        return {}
    return obj.get("meta") or ({"args": obj["args"]} if isinstance(obj.get("args"), dict) else {})


def load_encoder(arch, options, weights, prefix=None, trust=False):
    """common.build_backbone(arch, **options) with `weights` loaded; errors name the file, arch and mismatch."""
    if weights == "kinetics400":
        return common.build_backbone(arch, pretrained="kinetics400", **options), "torchvision Kinetics-400"
    backbone = common.build_backbone(arch, **options)
    if weights == "none":
        return backbone, "random initialisation"
    try:
        report = common.load_backbone_weights(backbone, weights, prefix=prefix, trust=trust)
    except ValueError as e:
        raise ValueError(f"evaluate.py: --weights {weights} does not fit --arch {arch} {options or ''} (were other "
                         f"--arch-options used in pretraining?): {e}") from None
    return backbone, (f"{weights} ({len(report['loaded'])} tensors loaded, prefix '{report.get('prefix', '')}', "
                      f"{len(report.get('skipped', []))} head/other tensors skipped"
                      + ("; TCLR's dilated layer4.0.conv1.0 built as released" if report["tclr_layer4"] else "") + ")")


def encoder_options(arch, options_json, meta, data):
    """build_backbone kwargs: the JSON flag, else the checkpoint meta's options (they fit its own arch only), else
    TOY_ENCODER_OPTIONS on toy skeletons without a checkpoint."""
    return (json.loads(options_json) if options_json else meta.get("options", {}) if meta.get("arch") == arch else
            TOY_ENCODER_OPTIONS.get(arch, {}) if data == "toy-skeleton" and not meta else {})


def build_encoder(args):
    """The --arch encoder with --weights (and the --concat one beside it) -> (module, description of its weights)."""
    backbone, source = load_encoder(args.arch, args.options, args.weights, args.weights_prefix, args.trust_checkpoint)
    if args.concat:
        options = encoder_options(args.concat, args.concat_options, checkpoint_meta(args.concat_weights,
                                                                                    args.trust_checkpoint), args.data)
        second, source2 = load_encoder(args.concat, options, args.concat_weights, args.concat_prefix,
                                       args.trust_checkpoint)
        return ConcatEncoder(backbone, second), f"{source} + {args.concat}: {source2}"
    return backbone, source


# ==================================================================================================== DATA
def clip_transform(item, key, to_input, train, crop, short_side, crop_scale=(0.08, 1.0), flip=True,
                   jitter=(0.4, 0.4, 0.4, 0.2), channels=3, ratio=(3 / 4, 4 / 3), test_crop=None):
    """item[key]: RGB uint8, flow (pixels) or depth (metres), (C, T, H, W) or (K, C, T, H, W) -> the network input,
    crop x crop (App. B.2.1 / SEVERE-BENCHMARK). Train: RandomResizedCrop (scale 0.08-1; the thesis calls it a
    "multi-scale crop"), flip (negating flow's u), colour jitter (0.4, 0.4, 0.4, 0.2) on every RGB clip as the SEVERE
    code; jitter: (brightness, contrast, saturation, hue) or False. Test: short side to short_side, centre crop, or
    test_crop = (p, side, area): phlvc_test_crop (--protocol phlvc). to_input: "rgb" normalised; "flow_image" the
    CoCLR / ViCC flow image (u, v, 128) normalised like RGB (vicc.py's input); "depth" / "flow"
    common.depth_to_input / flow_to_input (crossmodal_distill.py's student on paired sets)."""
    x = item[key]
    if train:
        x = common.random_resized_crop_clip(x, crop, scale=crop_scale, ratio=ratio)
        if flip:
            x = common.horizontal_flip(x, p=0.5, flow=key == "flow")
        if jitter and key == "video":
            x = common.color_jitter(x, *jitter, p=1.0)
    elif test_crop:
        x = phlvc_test_crop(x, crop, *test_crop)
    else:
        x = common.resized_center_crop(x, short_side, crop)
    item[key] = (common.normalize(x) if to_input == "rgb" else common.normalize(common.flow_image(x))
                 if to_input == "flow_image" else common.depth_to_input(x, channels) if to_input == "depth" else
                 common.flow_to_input(x))
    return item


def phlvc_test_crop(x, crop, p_centre, side, min_area):
    """P-HLVC supp. Sec. 7.6 test crops, per clip: with probability p_centre the centre square of `side` x the short
    side (theirs: 130 of frames scaled to 224), else a random square of >= min_area of the frame's area; -> crop²
    (theirs: 128). Difference: one antialiased bilinear resize (the authors' code: nearest to 224, then bilinear).
    (..., C, T, H, W) -> (..., C, T, crop, crop)"""
    clips = x.reshape(-1, *x.shape[-4:])  # (N, C, T, H, W)
    box = round(side * min(x.shape[-2:]))
    out = [common.resized_center_crop(common.center_crop(c, box), crop, crop) if centre else
           common.random_resized_crop_clip(c, crop, scale=(min_area, 1.0), ratio=(1.0, 1.0))
           for c, centre in zip(clips, (torch.rand(len(clips)) < p_centre).tolist())]  # N x (C, T, crop, crop)
    return torch.stack(out).reshape(*x.shape[:-2], crop, crop)


def input_keys(args):
    """The batch keys the model reads: the protocol's modality, or ("video", "pose") for P-HLVC's pose stream on
    videos with converted AlphaPose poses (--arch skelemotion_cnn: the pose alone; --concat skelemotion_cnn)."""
    pose = "skelemotion_cnn" in (args.arch, args.concat) and args.protocol["modality"] == "video"
    return ("video", "pose") if pose else (args.protocol["modality"],)


def pose_transform(item, video_transform, frames, scale):
    """P-HLVC's pose stream (supp. Sec. 7.3, 7.5): clips read with frames + 1 poses; the video keeps the first
    `frames` (then video_transform); the track with the highest summed score becomes item["pose"], a SkeleMotion
    image (6, frames, 49) of (x, y) x scale (pretraining's --pose-scale), COCO-18 chaining, unaugmented (as in
    pretraining). Reading: one track, as skeleton_transform keeps body 0. (K, ...) clips alike."""
    pose = item.pop("pose2d")  # (3, frames + 1, 18, M) or (K, 3, frames + 1, 18, M)
    clips = pose.reshape(-1, *pose.shape[-4:])  # (K, 3, frames + 1, 18, M)
    best = clips[:, 2].sum(dim=(1, 2)).argmax(dim=1).tolist()  # K track indices
    images = [common.skelemotion_image(c[:2, :, :, m] * scale, "coco18")[:, :frames] for c, m in zip(clips, best)]
    item["pose"] = torch.stack(images).reshape(*pose.shape[:-4], 6, frames, 49)  # (K, 6, frames, 49) or one
    item["video"] = item["video"][..., :frames, :, :]  # (..., C, frames, H, W)
    return video_transform(item)


def skeleton_transform(item, train, frames, center, skelemotion=False, whole=False):
    """Centre, then crop (App. A.1) to (C, frames, V, M); whole=True (--protocol ch2, thesis Sec. 2.4.3 "whole
    3D-skeleton sequences", no augmentation): the first `frames` frames, zero-padded. skelemotion=True (--arch
    skelemotion_cnn): body 0 of the crop as a SkeleMotion image (6, frames, 49) (`common.skelemotion_image`, tau =
    1, NTU-25 chaining), the input of P-HLVC's SkeleMotion CNN. P-HLVC forwards every present body separately; we
    keep body 0, as the crop and the centring are anchored on it (the second person of two-person actions is
    dropped)."""
    x = item["skeleton"].float()  # (C, T, V, M), zero-padded after item["length"] frames
    x = common.center_on_spine(x) if center else x
    if whole:
        item["skeleton"] = F.pad(x, (0, 0, 0, 0, 0, max(frames - x.shape[1], 0)))[:, :frames]  # (C, frames, V, M)
        return item

    def crop(out_frames):  # App. A.1 (authors' `crop_subsequence`): train L_ratio ~ U[0.5, 1], L >= out_frames
        # where the sequence is that long, random start; test L_ratio 0.95, centred. -> (C, out_frames, V, M)
        options = dict(min_ratio=0.5, min_length=out_frames) if train else dict(min_ratio=0.95, max_ratio=0.95,
                                                                                   centre=True)
        return common.temporal_crop_resize(x[None], item["length"].view(1), out_frames=out_frames, **options)[0]

    if not skelemotion:
        item["skeleton"] = crop(frames)
        return item
    c, _, v, _ = x.shape
    if (c, v) != (3, 25):  # RuntimeError: the dataset's ValueError handler would take it for an unreadable file
        raise RuntimeError(f"evaluate.py: --arch skelemotion_cnn needs NTU-25 skeletons (C=3 xyz, V=25 joints, "
                           f"SKELEMOTION_ORDER['ntu25']); this dataset gives (C, T, V, M) = {tuple(x.shape)}")
    # d_t = p_t - p_{t+1} needs the next pose, so T poses give T - 1 motion columns (skelemotion_image leaves the
    # last column as "no motion"): crop frames + 1 poses and keep the first `frames` columns, so the image is
    # exactly as long as the CNN's `frames` option (resolve_args sets --frames to it).
    poses = crop(frames + 1)  # (C, frames + 1, V, M)
    item["skeleton"] = common.skelemotion_image(poses[..., 0], "ntu25", tau=1)[:, :frames]  # (6, frames, 49)
    return item


def build_split(args, split, train, augment=True):
    """The dataset of `split` ("train" or "test" = the dataset's official evaluation split) with the protocol's
    sampling: train = one random clip (augmented unless augment=False), test = test_clips uniform clips."""
    p, checks = args.protocol, dict(strict=args.strict_data, bad_files_path=args.bad_files)
    if p["modality"] == "skeleton":
        transform = functools.partial(skeleton_transform, train=train and augment, frames=args.frames,
                                      center=not args.no_center, skelemotion=args.arch == "skelemotion_cnn",
                                      whole=args.protocol_name == "ch2")
        return common.build_dataset(args.data, args.data_root, split, transform=transform, **checks)
    # paired sets (Ch. 2): a depth or flow student's 1- or 2-channel inputs; their datasets ignore num_clips
    paired = protocol_for(args.data)["modality"] == "depth" and p["modality"] in ("depth", "flow")
    transform = functools.partial(clip_transform, key=p["modality"], to_input=p["modality"] if paired else
                                  "flow_image" if p["modality"] == "flow" else "rgb", train=train and augment,
                                  crop=p["crop"], short_side=p["short_side"], crop_scale=p["crop_scale"],
                                  flip=p["flip"], jitter=p["jitter"], channels=args.options.get("in_channels", 3),
                                  **{k: p[k] for k in ("ratio", "test_crop") if k in p})  # --protocol phlvc
    sampling = (("spread" if train else "spread-centre") if args.task == "arrow-of-time" and not paired else
                "random" if train or p.get("test_crop") else "uniform")  # App. B.2.4; P-HLVC: random test clips
    target = args.task == "crossdomain" and split == "test"  # the other domain's videos, mapped classes
    pose = input_keys(args) == ("video", "pose")
    if pose:
        scale = checkpoint_meta(args.weights if args.arch == "skelemotion_cnn" else args.concat_weights,
                                args.trust_checkpoint).get("pose_scale", 1.0)
        transform = functools.partial(pose_transform, video_transform=transform, frames=args.frames, scale=scale)
    ds = common.build_dataset(args.target if target else args.data, args.target_root if target else args.data_root,
                              split, clip_len=args.frames + pose, frame_strides=(p["stride"],),
                              num_clips=1 if train else args.test_clips, sampling=sampling, transform=transform,
                              decoder=args.decoder, modalities=("video", "pose2d") if pose else (p["modality"],),
                              class_map=args.class_map, **checks)
    return AllClips(ds, args.frames, p["modality"]) if paired and args.protocol_name == "ch2" and not train else ds


class AllClips(torch.utils.data.Dataset):
    """--protocol ch2 on paired sets (thesis Sec. 2.4.3: a video's score is the mean over ALL its clips): item i =
    the N = max(1, frames // L) consecutive L-frame clips of video i (Eq. 2.3's clips) as (N, C, L, H, W), through
    the dataset's own (test) transform. N varies: predict() reads these one video per batch."""

    def __init__(self, dataset, clip_len, key):
        self.dataset, self.clip_len, self.key = dataset, clip_len, key

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        ds, n = self.dataset, max(1, self.dataset.length(i) // self.clip_len)
        x = ds.transform(ds.read(i, np.arange(n * self.clip_len), (self.key,)))[self.key]  # (C, N*L, H, W)
        return {self.key: x.unflatten(1, (n, self.clip_len)).transpose(0, 1),  # (N, C, L, H, W)
                "label": torch.tensor(ds.labels[ds.indices[i]]), "index": torch.tensor(i)}


# ==================================================================================================== PROTOCOLS
# ---------------------------------------------------------------------------------------------- inference
@torch.no_grad()
def predict(model, dataset, args, run, multilabel=False, arrow=False):
    """Video-level outputs of `model` over `dataset`, gathered over processes in sample order.
    Clip outputs are combined as the protocols do: softmax averaged over clips (App. B.2.1), sigmoid max-pooled for
    multi-label (SlowFast, App. B.2.4). arrow=True scores every video forward (label 0) and reversed (label 1).
    Returns dict(scores (N, C), outputs (N, C): raw outputs averaged over clips, labels, index)."""
    keys = input_keys(args)
    all_clips = any(isinstance(d, AllClips) for d in (dataset, getattr(dataset, "dataset", None)))  # or a Subset
    loader = common.build_loader(dataset, args, run, train=False, batch_size=run.world_size if all_clips else
                                 args.eval_batch_size)  # AllClips: N varies per video, one video per process
    was_training = model.training
    model.eval()
    scores, outputs, labels, indices = [], [], [], []
    for batch in loader:
        batch = common.to_device(batch, run.device)
        x, y, index = [batch[k] for k in keys], batch["label"], batch["index"]
        if x[0].dim() == 5 or keys == ("skeleton",):  # one clip: (B, C, T, H, W), (B, C, T, V, M) or (B, 6, T, 49)
            x = [t[:, None] for t in x]
        if arrow:  # App. B.2.4: both versions of every video; time is dim -3 of (C, T, H, W) and (C, T, V, M)
            x = [torch.cat([x[0], x[0].flip(-3)])]
            y = torch.cat([torch.zeros_like(index), torch.ones_like(index)])
            index = torch.cat([2 * index, 2 * index + 1])
        b, k = x[0].shape[:2]
        with run.autocast():
            out = model(*(t.flatten(0, 1) for t in x)).float().view(b, k, -1)  # (B, K clips, C)
        scores.append(torch.sigmoid(out).amax(dim=1) if multilabel else out.softmax(dim=-1).mean(dim=1))
        outputs.append(out.mean(dim=1))
        labels.append(y)
        indices.append(index)
    model.train(was_training)
    gathered = common.gather_in_sample_order(*(torch.cat(t) for t in (indices, scores, outputs, labels)))
    return {name: t.cpu() for name, t in zip(("index", "scores", "outputs", "labels"), gathered)}


def check_finite(values, what):
    """values (N, D) with a NaN / inf row have no accuracy: raise instead of reporting a number computed from them."""
    bad = int((~torch.isfinite(values)).any(dim=-1).sum()) if values.numel() else 0
    if bad:
        raise RuntimeError(f"evaluate.py: {bad} of {len(values)} {what} contain NaN or inf (the model diverged or "
                           f"the input is broken): no metric is reported")


def classification_metrics(prediction, num_classes, multilabel):
    """Top-1/top-5 and mean class accuracy (single-label) or mAP (multi-label), in %."""
    scores, labels = prediction["scores"], prediction["labels"]
    check_finite(scores, "score vectors")
    if multilabel:
        return {"mAP": 100 * mean_average_precision(scores.numpy(), labels.numpy())[0]}
    ks = (1, 5) if num_classes > 5 else (1,)
    metrics = {f"top{k}": 100 * v for k, v in topk_accuracy(scores, labels, ks).items()}
    metrics["mean_class_acc"] = 100 * mean_class_accuracy(scores.argmax(dim=1), labels, num_classes)
    return metrics


# ---------------------------------------------------------------------------------------------- training
def classification_loss(net, batch, args, run, multilabel=False, arrow=False):
    """Cross-entropy (BCE for multi-label) of net(batch[modality]) (B, C) against batch["label"]; arrow=True plays
    each clip forward (label 0) or backward (label 1) with probability 1/2 (App. B.2.4)."""
    x, y = [batch[k] for k in input_keys(args)], batch["label"]
    if arrow:  # time is dim -3 of (B, C, T, H, W) and (B, C, T, V, M)
        reverse = torch.rand(x[0].shape[0], device=y.device) < 0.5
        x = [torch.where(reverse.view(-1, *[1] * (x[0].dim() - 1)), x[0].flip(-3), x[0])]
        y = reverse.long()
    with run.autocast():
        logits = net(*x).float()  # (B, C)
    return F.binary_cross_entropy_with_logits(logits, y.float()) if multilabel else F.cross_entropy(logits, y)


def train_and_select(run, args, model, train_set, select_set, num_classes, multilabel=False, arrow=False,
                     loss_fn=None, score_fn=None, lower_is_better=False):
    """Train with common.fit in chunks of --eval-every epochs; after each chunk score `select_set` and keep the best
    state (the validation split by default, the test split only with --select-on-test, none = last epoch).
    Classification by default; a task with its own loss_fn(net, batch) -> loss and score_fn(model, select_set) ->
    float (repcount) passes them, with lower_is_better for error metrics.
    The run folder holds checkpoint.pth, best.pth and selection.json, so rerunning the command resumes."""
    metric = args.protocol["metric"]
    loss_fn = loss_fn or functools.partial(classification_loss, args=args, run=run, multilabel=multilabel, arrow=arrow)
    score_fn = score_fn or (lambda m, s: classification_metrics(predict(m, s, args, run, multilabel, arrow),
                                                                num_classes, multilabel)[metric])
    loader = common.build_loader(train_set, args, run, train=True)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = (torch.optim.Adam(params, lr=args.lr, weight_decay=args.wd) if args.optimizer == "adam" else
                 torch.optim.SGD(params, lr=args.lr, momentum=args.momentum, weight_decay=args.wd))
    net = run.prepare(model)

    def train_step(batch):
        loss = loss_fn(net, batch)
        run.step(loss, optimizer)
        return {"loss": loss.detach()}

    selection_path, best_path = (os.path.join(run.out_dir, name) for name in ("selection.json", "best.pth"))
    selection, best_state = {"scores": {}, "best_step": None, "best": None, "metric": metric}, None
    if args.resume == "none":
        for path in (selection_path, best_path):
            if run.is_main and os.path.exists(path):
                os.remove(path)
    elif os.path.exists(selection_path):  # a resumed run continues its selection
        with open(selection_path) as f:
            selection = json.load(f)
        if selection["best"] is not None:
            best_state = torch.load(best_path, map_location="cpu", weights_only=True)
    steps_per_epoch = len(loader)
    chunk_args = copy.copy(args)
    ends = sorted(set(list(range(args.eval_every, args.epochs, args.eval_every)) + [args.epochs]))
    for end in ends:
        chunk_args.max_steps = end * steps_per_epoch if args.max_steps is None else min(end * steps_per_epoch,
                                                                                         args.max_steps)
        result = common.fit(run, chunk_args, model, optimizer, loader, train_step)
        chunk_args.resume = "auto"  # later chunks continue this run
        step = str(result["step"])
        if select_set is not None and step not in selection["scores"]:
            score = score_fn(model, select_set)
            selection["scores"][step] = score
            run.print(f"step {step} (epoch {result['step'] / steps_per_epoch:.1f}): selection {metric} {score:.2f}")
            if selection["best"] is None or (score < selection["best"] if lower_is_better else
                                             score > selection["best"]):
                selection["best"], selection["best_step"] = score, int(step)
                best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
                if run.is_main:
                    common.save_atomic(best_state, best_path)
            if run.is_main:
                common.write_json_atomic(selection_path, selection)
        if result["step"] >= chunk_args.max_steps and chunk_args.max_steps < end * steps_per_epoch:
            break  # --max-steps reached
    if best_state is not None:
        model.load_state_dict(best_state)
    return selection


def sub_run(args, run, folder, **changes):
    """A copy of args with `changes` and --out-dir <out-dir>/<folder> (created), and its common.Run."""
    sub = copy.copy(args)
    vars(sub).update(changes, out_dir=os.path.join(args.out_dir, folder))
    os.makedirs(sub.out_dir, exist_ok=True)
    return sub, common.Run(sub, run.device, sub.out_dir)


def classification_task(run, args, arrow=False):
    """finetune / linear / fewshot (one seed) / transfer / multilabel / arrow-of-time: train a head (and the
    backbone unless linear), select, test. Returns the result dict."""
    multilabel = args.task == "multilabel"
    backbone, source = build_encoder(args)
    train_full = build_split(args, "train", train=True, augment=not arrow)
    train_eval = build_split(args, "train", train=False)
    test_set = build_split(args, "test", train=False)
    num_classes = 2 if arrow else train_full.num_classes
    labels = common.sample_labels(train_full)
    train_idx, val_idx = np.arange(len(labels)), None
    if not args.select_on_test and args.val_fraction > 0 and args.task != "crossdomain":
        train_idx, val_idx = train_val_split(labels, args.val_fraction, seed=args.seed)
    if args.per_class or args.label_fraction or args.num_examples:  # the labelled budget, drawn from the rest
        per_class = args.per_class or (math.ceil(args.num_examples / num_classes) if args.num_examples else None)
        chosen = common.stratified_subset(labels[train_idx], fraction=args.label_fraction or 1.0, per_class=per_class,
                                          seed=args.subset_seed)  # ceil(1000 / C) per class, SEVERE get_subset_data
        train_idx = train_idx[chosen]
    train_set = torch.utils.data.Subset(train_full, train_idx)
    select_set = (test_set if args.select_on_test else  # crossdomain: the source's own val split (Sims4Action: S7)
                  build_split(args, "val", train=False) if args.task == "crossdomain" else
                  torch.utils.data.Subset(train_eval, val_idx) if val_idx is not None else None)
    sizes = {"train": len(train_set), "val": 0 if args.select_on_test else len(select_set or ()),  # held out
             "test": len(test_set)}
    protocol = describe_protocol(args, source, sizes, num_classes)
    run.print(protocol)
    pretrained_on = checkpoint_meta(args.weights, args.trust_checkpoint).get("args", {}).get("data")
    if args.task == "transfer":  # Sec. 3.4.3.4: pretrain on a source set, finetune on a different target set
        run.print(f"  transfer: pretrained on {pretrained_on or 'unknown (no meta in --weights)'} -> {args.data}"
                  + (" (WARNING: source and target are the same dataset)" if pretrained_on == args.data else ""))
    model = Classifier(backbone, num_classes, frozen=args.task == "linear", dropout=args.protocol["dropout"],
                       trainable=last_block(args.arch)[1] if args.protocol_name == "ch2" and args.arch not in
                       SKELETON_ARCHS else None,
                       l2_bn=args.protocol_name == "coclr" and args.task == "linear",
                       relu=args.protocol_name == "phlvc")
    selection = train_and_select(run, args, model, train_set, select_set, num_classes, multilabel, arrow)
    before = calibrate(run, args, model, test_set, num_classes) if args.calibrate else None
    test = predict(model, test_set, args, run, multilabel, arrow)
    metrics = dict(classification_metrics(test, num_classes, multilabel), **before or {})
    if args.save_logits:  # every process predicts (the outputs are gathered), the main one writes
        train_pred = predict(model, torch.utils.data.Subset(train_eval, train_idx), args, run, multilabel, arrow)
        if run.is_main:
            torch.save({"train": {"logits": train_pred["outputs"], "labels": train_pred["labels"]},
                        "test": {"logits": test["outputs"], "labels": test["labels"], "scores": test["scores"]},
                        "class_names": getattr(train_full, "class_names", None), "arch": args.arch,
                        "weights": args.weights, "data": args.data}, os.path.join(run.out_dir, "logits.pth"))
    return {"metrics": metrics, "primary": args.protocol["metric"], "selection": selection, "sizes": sizes,
            "weights_source": source, "pretrained_on": pretrained_on, "num_classes": num_classes,
            "protocol": protocol}


def calibrate(run, args, model, test_set, num_classes):
    """--calibrate N (--task crossdomain). P-HLVC supp. Sec. 7.6 names a "domain calibration" on Toyota Smarthome
    with Sinkhorn eps 0.05 and no more (the authors' transfer.py has a "teacher" mode, sinkhorn_epsilon 0.05, whose
    loop is not public). Our reading: the source-trained model scores the target videos (the test videos, labels
    unused: transductive), Sinkhorn-Knopp (phlvc.sinkhorn: eps 0.05, 3 iterations, uniform class marginals) on the
    clip-averaged softmax (bounded like SwAV's cosine scores) balances them, and the model is finetuned N epochs on
    the argmax pseudo-labels with the training augmentation (last epoch kept) in <out-dir>/calibrate.
    Returns the test metrics before calibration, prefixed "uncalibrated_"."""
    from phlvc import sinkhorn  # the method's Sinkhorn-Knopp (method logic stays in the method script)
    scores = predict(model, test_set, args, run)  # (N, C) in sample order
    pseudo = sinkhorn(scores["scores"], eps=0.05, iters=3).argmax(dim=1)  # (N,)
    calib, calib_run = sub_run(args, run, "calibrate", epochs=args.calibrate, milestones=[], eval_every=args.calibrate)
    target = build_split(args, "test", train=True)  # (path, label, ...) samples, relabelled
    target.samples = [(s[0], int(y), *s[2:]) for s, y in zip(target.samples, pseudo)]
    train_and_select(calib_run, calib, model, target, None, num_classes)
    return {f"uncalibrated_{k}": v for k, v in classification_metrics(scores, num_classes, False).items()}


def fewshot_task(run, args):
    """Label-efficient finetuning repeated over seeds (thesis Ch. 2: N per class, 5 seeds, mean +- std; Ch. 3:
    label fractions; SEVERE: ceil(1000 / C) per class). Each seed runs in <out-dir>/seed_<s>."""
    runs = []
    for seed in args.seeds:
        seed_args, seed_run = sub_run(args, run, f"seed_{seed}", seed=seed,
                                      subset_seed=seed if args.subset_seed is None else args.subset_seed)
        common.seed_everything(seed + run.rank, args.deterministic)
        runs.append(classification_task(seed_run, seed_args))
    metrics = {}
    for name in runs[0]["metrics"]:
        values = np.array([r["metrics"][name] for r in runs])  # (seeds,)
        metrics[name], metrics[f"{name}_std"] = float(values.mean()), float(values.std())
    return {"metrics": metrics, "primary": args.protocol["metric"], "seeds": args.seeds,
            "per_seed": [r["metrics"] for r in runs],
            **{k: runs[0][k] for k in ("sizes", "protocol", "weights_source", "num_classes")}}


# ---------------------------------------------------------------------------------------------- features
def encoder_features(encoder, dataset, args, run, what="features"):
    """Backbone features averaged over the test clips, in eval mode without augmentation -> (N, D), labels (N,);
    a NaN / inf feature raises (check_finite)."""
    out = predict(encoder, dataset, args, run)
    check_finite(out["outputs"], what)
    return out["outputs"], out["labels"]


def knn_task(run, args):
    """Retrieval: train split = gallery, test split = queries, cosine similarity (thesis Sec. 3.4.3.2: 1-NN
    accuracy; CoCLR / ViCC: R@k, k in 1, 5, 10, 20, 50) and the weighted kNN (k 200, T 0.1: each neighbour votes
    exp(s / T) for its class). --center-features subtracts each set's own mean first."""
    encoder, source = build_encoder(args)
    gallery_set, query_set = build_split(args, "train", train=False), build_split(args, "test", train=False)
    sizes = {"train": len(gallery_set), "val": 0, "test": len(query_set)}
    protocol = describe_protocol(args, source, sizes, gallery_set.num_classes)
    run.print(protocol)
    encoder = encoder.to(run.device)
    gallery, gallery_labels = encoder_features(encoder, gallery_set, args, run, "gallery features")
    queries, query_labels = encoder_features(encoder, query_set, args, run, "query features")
    if args.center_features:
        gallery, queries = gallery - gallery.mean(dim=0), queries - queries.mean(dim=0)
    gallery, queries = F.normalize(gallery, dim=1), F.normalize(queries, dim=1)
    recall = retrieval_recall(queries, query_labels, gallery, gallery_labels, RETRIEVAL_KS)
    knn, _ = common.knn_classify(gallery, gallery_labels, queries, gallery_set.num_classes, KNN_K, KNN_T)
    if args.save_logits and run.is_main:  # for --task fusion: R+F retrieval of two streams (ViCC supp. Sec. 3)
        torch.save({"train": {"features": gallery, "labels": gallery_labels}, "test": {"features": queries,
                    "labels": query_labels}, "arch": args.arch, "weights": args.weights, "data": args.data},
                   os.path.join(run.out_dir, "logits.pth"))
    metrics = {"nn1_acc": 100 * recall[1], f"knn{KNN_K}_acc": 100 * (knn == query_labels).float().mean().item(),
               **{f"R@{k}": 100 * v for k, v in recall.items()}}
    return {"metrics": metrics, "primary": "nn1_acc", "sizes": sizes, "weights_source": source,
            "num_classes": gallery_set.num_classes, "protocol": protocol}


def checkpoint_prototypes(path, trust=False):
    """(K, D) prototypes stored in a checkpoint (a key ending in 'prototypes.weight' or 'prototypes'), or None."""
    if path in ("none", "kinetics400"):
        return None
    obj = common.load_checkpoint_file(path, trust=trust)
    for _ in range(3):
        if isinstance(obj, dict) and not any(k.endswith("prototypes.weight") or k.endswith("prototypes")
                                             for k in obj):
            obj = next((obj[k] for k in ("state_dict", "model") if isinstance(obj.get(k), dict)), obj)
    if not isinstance(obj, dict):
        return None
    return next((v for k, v in obj.items() if torch.is_tensor(v) and v.dim() == 2 and
                 (k.endswith("prototypes.weight") or k.endswith("prototypes"))), None)


def checkpoint_head(path, trust=False):
    """The projection head saved beside the backbone as head.<i>.weight/bias Linear layers with ReLU between
    (vicc.py's backbone.pth) -> nn.Sequential (d -> D), or None."""
    state = common.read_checkpoint(path, trust) if path not in ("none", "kinetics400") else {}
    layers = []
    for i in sorted({int(k.split(".")[1]) for k in state if k.startswith("head.") and k.endswith(".weight")}):
        linear = nn.Linear(*state[f"head.{i}.weight"].shape[::-1], bias=f"head.{i}.bias" in state)
        linear.load_state_dict({k: state[f"head.{i}.{k}"] for k in linear.state_dict()})
        layers += [linear, nn.ReLU()]
    return nn.Sequential(*layers[:-1]) if layers else None


def clusters_task(run, args):
    """ViCC supp. Sec. 3.1.2 / Table 1: hard cluster assignments of the test split (the checkpoint's prototypes:
    in the backbone feature space, or after the projection head saved with them, then z = normalize(head(f)) goes
    to its most similar prototype; else k-means with K = number of classes on L2-normalised features) scored with
    Hungarian accuracy, NMI, ARI, mean entropy per cluster and mean max purity."""
    encoder, source = build_encoder(args)
    test_set = build_split(args, "test", train=False)
    sizes = {"train": 0, "val": 0, "test": len(test_set)}
    protocol = describe_protocol(args, source, sizes, test_set.num_classes)
    run.print(protocol)
    features, labels = encoder_features(encoder.to(run.device), test_set, args, run)
    prototypes = checkpoint_prototypes(args.weights, args.trust_checkpoint) if args.cluster_source != "kmeans" else None
    head = checkpoint_head(args.weights, args.trust_checkpoint) if prototypes is not None else None
    if head is not None:  # saved with the prototypes: they live after it (whatever the dimensions)
        with torch.no_grad():
            features = head(features.float().cpu())  # (N, D): the space the prototypes live in
    features = F.normalize(features, dim=1)
    if prototypes is not None and prototypes.shape[1] != features.shape[1]:
        if args.cluster_source == "prototypes":
            raise ValueError(f"evaluate.py: --weights {args.weights}: prototypes are {tuple(prototypes.shape)} "
                             f"(they live after the projection head), backbone features are {features.shape[1]}-d")
        run.print(f"prototypes {tuple(prototypes.shape)} are not in the {features.shape[1]}-d backbone feature "
                  f"space (projection head not part of the backbone): using k-means")
        prototypes = None
    if prototypes is None and args.cluster_source == "prototypes":
        raise ValueError(f"evaluate.py: --cluster-source prototypes: no prototypes in {args.weights}")
    if prototypes is not None:  # hard (rounded) assignment to the most similar prototype
        assignments, source_name = (features @ F.normalize(prototypes.float(), dim=1).T).argmax(dim=1), "prototypes"
    else:
        k = args.num_clusters or test_set.num_classes
        assignments, _ = kmeans(features, k, seed=args.seed)
        source_name = f"k-means (K={k})"
    metrics = {name: value if name == "entropy" else 100 * value  # entropy in nats, the rest in %
               for name, value in cluster_metrics(assignments.numpy(), labels.numpy()).items()}
    return {"metrics": metrics, "primary": "nmi", "sizes": sizes, "weights_source": source,
            "assignments": source_name, "num_classes": test_set.num_classes, "protocol": protocol}


# ---------------------------------------------------------------------------------------------- fusion
def fusion_task(run, args):
    """JMRN supp. Sec. 3, Eq. (1): alpha per modality (or per modality and class for multi-label) learned on the
    TRAIN logits saved by --save-logits, evaluated on the test logits beside each modality, the plain sum and the
    mean of softmax probabilities; --task knn files: R@k of each stream and of the sum of cosine similarities."""
    if not args.logits or len(args.logits) < 2:
        raise ValueError("evaluate.py --task fusion: pass two or more --logits files (written by --save-logits)")
    saved = [common.load_checkpoint_file(path, args.trust_checkpoint, flag="--logits") for path in args.logits]
    for path, s in zip(args.logits, saved):
        for split in ("train", "test"):
            if not torch.equal(s[split]["labels"], saved[0][split]["labels"]):
                raise ValueError(f"evaluate.py: {path}: its {split} labels differ from {args.logits[0]}'s; the "
                                 f"logits must come from the same samples in the same order")
    if len({"features" in s["test"] for s in saved}) > 1:
        raise common.UserError("evaluate.py: --logits: expected files of one kind, found knn features and logits")
    if "features" in saved[0]["test"]:  # ViCC supp. Sec. 3 R+F retrieval: the sum of the streams' cosine similarities
        query_labels, gallery_labels = saved[0]["test"]["labels"], saved[0]["train"]["labels"]
        queries, gallery = ([s[split]["features"].float() for s in saved] for split in ("test", "train"))  # M x (N, D)
        metrics = {f"R@{k}_input{m}": 100 * v for m in range(len(saved))
                   for k, v in retrieval_recall(queries[m], query_labels, gallery[m], gallery_labels).items()}
        # each stream's features are L2-normalised: dot products of their concatenations are the sums of cosines
        recall = retrieval_recall(torch.cat(queries, 1), query_labels, torch.cat(gallery, 1), gallery_labels)
        metrics.update({f"R@{k}_sum": 100 * v for k, v in recall.items()})
        return {"metrics": metrics, "primary": "R@1_sum", "alpha": "none (sum of cosine similarities)",
                "sizes": {"train": len(gallery_labels), "val": 0, "test": len(query_labels)}, "inputs": args.logits}
    train = torch.stack([s["train"]["logits"] for s in saved]).float()  # (M, N_train, C)
    test = torch.stack([s["test"]["logits"] for s in saved]).float()  # (M, N_test, C)
    if args.fusion_l2:
        train, test = F.normalize(train, dim=-1), F.normalize(test, dim=-1)
    train_labels, test_labels = saved[0]["train"]["labels"], saved[0]["test"]["labels"]
    multilabel = train_labels.dim() > 1
    per_class = args.fusion_weights == "class" or (args.fusion_weights == "auto" and multilabel)
    fusion = fit_late_fusion(train, train_labels, multilabel, per_class, epochs=args.epochs, lr=args.lr,
                             batch_size=args.batch_size, seed=args.seed)

    def score(logits):
        if multilabel:
            return 100 * mean_average_precision(torch.sigmoid(logits).numpy(), test_labels.numpy())[0]
        return 100 * topk_accuracy(logits, test_labels, ks=(1,))[1]

    name = "mAP" if multilabel else "top1"
    metrics = {f"{name}_input{m}": score(t) for m, t in enumerate(test)}  # input m = the m-th --logits file
    metrics[f"{name}_sum"] = score(test.sum(dim=0))
    if not multilabel:  # two-stream (thesis Table 2.1), ViCC R+F: the equal-weight mean of class probabilities,
        # the saved video scores (softmax averaged over clips) where every file has them, else softmax(logits)
        probs = [s["test"]["scores"].float() if "scores" in s["test"] else t.softmax(1) for s, t in zip(saved, test)]
        metrics[f"{name}_mean_scores"] = score(torch.stack(probs).mean(0))
    with torch.no_grad():
        metrics[f"{name}_learned"] = score(fusion(test))
    run.print(f"fusion: {len(saved)} modalities, {'M x C' if per_class else 'M'} weights, Adam lr {args.lr}, "
              f"{args.epochs} epochs on {train.shape[1]} train logits; test {test.shape[1]} samples")
    return {"metrics": metrics, "primary": f"{name}_learned", "alpha": fusion.alpha.detach().squeeze(-1).tolist(),
            "sizes": {"train": train.shape[1], "val": 0, "test": test.shape[1]}, "inputs": args.logits}


# ---------------------------------------------------------------------------------------------- temporal detection
# R-C3D (Xu et al., "R-C3D: Region Convolutional 3D Network for Temporal Activity Detection", ICCV 2017), thesis
# Table 2.6, with the student's 3D conv trunk as the shared feature map (C, L/s, H', W') in place of C3D's conv5b
# (s = the trunk's temporal stride: 16 for resnet3d_18, 8 for C3D). From the paper (Sec. 3-4) and the authors' code
# (VisionLearningGroup/R-C3D): 768-frame buffers; K anchor segments at each temporal position, THUMOS'14 scales in
# feature cells; proposal subnet = 3x3x3 conv + ReLU, max-pool over H', W', 1x1 convs to objectness (2-way softmax)
# and offsets (one conv here: the same weights side by side); anchors positive at tIoU > 0.7 or the best one of a
# ground truth, negative < 0.3, balanced 1:1 (64 per buffer: their RPN_BATCHSIZE); offsets (dc, dl) = ((c* - c) / l,
# log(l* / l)); proposals: NMS 0.7, 2000 kept in training / 300 at test (their config); 3D RoI pooling to 1x4x4;
# classification subnet fc6, fc7 (ReLU) -> C + 1 scores and class-specific offsets on 128 RoIs per buffer, positive
# at tIoU >= 0.5, 1:3 (ground truth added to the proposals and offsets divided by (0.1, 0.2), as their code); loss =
# softmax CE + smooth L1 for each subnet, lambda = 1 (sigma 3 for proposal offsets, as their code); test: NMS per
# class at the evaluation tIoU - 0.1 (0.4 for the primary mAP@0.5), frames past the end repeat the last one.
# Ours (the thesis and R-C3D are silent for PKU-MMD): fc width 8 x trunk channels (their 4096 on C3D's 512);
# training buffers at stride L/2 (theirs slide end to end, "two-way"), keeping segments with >= half their length
# inside; test buffers tile the video; at most 100 detections per buffer; every process tests the whole split;
# cross-boundary anchors are kept (Faster R-CNN ignores them). Metric: ActivityNet-style mAP (above).
RC3D_SCALES = (2, 4, 5, 6, 8, 9, 10, 12, 14, 16)  # anchor lengths in feature cells (R-C3D Sec. 4.1, THUMOS'14)
RC3D_BUFFER, RC3D_MAX_SEGMENTS, RC3D_PER_BUFFER, RC3D_TEST_NMS = 768, 64, 100, 0.4


def rc3d_anchors(cells, stride, scales=RC3D_SCALES):
    """(cells * K, 2) anchor segments [start, end) in frames: K lengths scale * stride centred on each cell, t-major."""
    centres = (torch.arange(cells, dtype=torch.float32) + 0.5) * stride  # (T',)
    lengths = torch.tensor(scales, dtype=torch.float32) * stride  # (K,)
    return torch.stack([centres[:, None] - lengths / 2, centres[:, None] + lengths / 2], -1).flatten(0, 1)  # (T'K, 2)


def segment_iou(a, b):
    """Pairwise tIoU of segments a (N, 2) and b (M, 2) -> (N, M)."""
    inter = (torch.minimum(a[:, None, 1], b[None, :, 1]) - torch.maximum(a[:, None, 0], b[None, :, 0])).clamp(min=0)
    return inter / ((a[:, 1] - a[:, 0])[:, None] + (b[:, 1] - b[:, 0])[None] - inter).clamp(min=1e-6)  # (N, M)


def encode_segments(anchors, targets):
    """R-C3D Sec. 3.4: (N, 2) segments relative to (N, 2) anchors -> (N, 2) offsets (dc, dl)."""
    la, lt = anchors[:, 1] - anchors[:, 0], targets[:, 1] - targets[:, 0]  # (N,)
    return torch.stack([(targets.mean(1) - anchors.mean(1)) / la, torch.log(lt / la)], 1)  # (N, 2)


def decode_segments(anchors, offsets):
    """Inverse of encode_segments: (N, 2) anchors, (N, 2) offsets -> (N, 2) segments."""
    la = anchors[:, 1] - anchors[:, 0]  # (N,)
    centre, length = anchors.mean(1) + offsets[:, 0] * la, la * offsets[:, 1].clamp(max=math.log(1000)).exp()
    return torch.stack([centre - length / 2, centre + length / 2], 1)  # (N, 2)


def label_anchors(anchors, gt, positive=0.7, negative=0.3):
    """R-C3D Sec. 3.2: anchors (A, 2) vs ground truth (G, 2) -> labels (A,) 1 / 0 / -1 (ignored), matched gt (A,)."""
    iou = segment_iou(anchors, gt)  # (A, G)
    best, match = iou.max(1)  # (A,)
    labels = torch.full_like(match, -1)
    labels[best < negative] = 0
    best_of_gt = iou.max(0).values  # (G,) an anchor with a ground truth's highest tIoU is positive too
    labels[((iou == best_of_gt) & (best_of_gt > 0)).any(1) | (best >= positive)] = 1
    return labels, match


def sample(labels, total, positive_fraction):
    """Indices of at most total * positive_fraction random positives (labels > 0) and negatives (== 0) to fill up."""
    pos, neg = (torch.nonzero(m).flatten() for m in (labels > 0, labels == 0))
    pos = pos[torch.randperm(len(pos), device=pos.device)[:int(total * positive_fraction)]]
    neg = neg[torch.randperm(len(neg), device=neg.device)[:total - len(pos)]]
    return torch.cat([pos, neg])


def roi_pool_3d(fmap, rois, buffer_of, stride, size=(4, 4)):
    """3D RoI pooling to 1 x size: fmap (B, C, T', H', W'), rois (R, 2) frames of buffer buffer_of (R,) ->
    (R, C * size[0] * size[1]) maxima over the RoI's cells x each spatial bin (max is separable)."""
    pooled = F.adaptive_max_pool3d(fmap, (fmap.shape[2], *size)).flatten(3)  # (B, C, T', h w)
    t0 = (rois[:, 0] / stride).floor().long().clamp(0, fmap.shape[2] - 1)  # (R,)
    t1 = torch.maximum((rois[:, 1] / stride).ceil().long(), t0 + 1).clamp(max=fmap.shape[2])  # (R,)
    return torch.stack([pooled[b, :, a:e].amax(1).flatten() for b, a, e in
                        zip(buffer_of.tolist(), t0.tolist(), t1.tolist())])  # (R, C h w)


class RC3D(nn.Module):
    """R-C3D on a video trunk (common.build_backbone, return_map=True). forward(x (B, C, L, H, W), segments
    (B, G, 3) rows (label, start, end) in buffer frames, label -1 = padding, >= 1 row per buffer) -> loss (Eq. 1
    of both subnets); without segments -> per buffer (proposals (R, 2), class probabilities (R, C + 1), refined
    segments (R, C + 1, 2)); class 0 = background."""

    def __init__(self, trunk, num_classes, scales=RC3D_SCALES):
        super().__init__()
        c, k, width = trunk.feature_dim, len(scales), 8 * trunk.feature_dim
        self.trunk, self.num_classes, self.scales = trunk, num_classes, scales
        self.proposal_conv = nn.Conv3d(c, c, 3, padding=1)
        self.proposal_out = nn.Conv1d(c, 4 * k, 1)  # per anchor: 2 objectness logits, 2 offsets
        self.fc = nn.Sequential(nn.Linear(16 * c, width), nn.ReLU(inplace=True), nn.Linear(width, width),
                                nn.ReLU(inplace=True))
        self.cls, self.twin = nn.Linear(width, num_classes + 1), nn.Linear(width, 2 * (num_classes + 1))
        for layer, std in ((self.proposal_out, 0.01), (self.cls, 0.01), (self.twin, 0.001)):  # their fillers
            nn.init.normal_(layer.weight, 0.0, std)
            nn.init.zeros_(layer.bias)

    def forward(self, x, segments=None):
        fmap = self.trunk(x, return_map=True)  # (B, C, T', H', W')
        (b, _, cells), length = fmap.shape[:3], x.shape[2]
        stride = length / cells
        anchors = rc3d_anchors(cells, stride, self.scales).to(x.device)  # (A, 2), A = T' K
        out = self.proposal_out(F.relu(self.proposal_conv(fmap)).amax((3, 4)))  # (B, 4K, T')
        out = out.transpose(1, 2).reshape(b, -1, 2, 2).float()  # (B, A, [logits, offsets], 2)
        proposals = []
        for i in range(b):  # NMS 0.7 on the decoded, clipped anchors
            p = decode_segments(anchors, out[i, :, 1].detach()).clamp(0, length)  # (A, 2)
            score = out[i, :, 0].detach().softmax(-1)[:, 1]  # (A,)
            keep = torch.nonzero(p[:, 1] - p[:, 0] >= 1).flatten()
            keep = keep[nms_segments(p[keep], score[keep], 0.7)][:2000 if segments is not None else 300]
            proposals.append(p[keep])
        if segments is None:
            return self.classify(fmap, proposals, stride)
        loss, rois, buffer_of, labels, targets = 0.0, [], [], [], []
        for i in range(b):
            gt = segments[i][segments[i, :, 0] >= 0].float()  # (G, 3)
            anchor_labels, match = label_anchors(anchors, gt[:, 1:])
            chosen = sample(anchor_labels, 64, 0.5)  # balanced 1:1, 64 anchors
            loss = loss + F.cross_entropy(out[i, chosen, 0], anchor_labels[chosen])
            pos = chosen[anchor_labels[chosen] > 0]
            if len(pos):  # smooth L1 (sigma 3 -> beta 1/9) on positives, normalised by the sampled anchors
                loss = loss + F.smooth_l1_loss(out[i, pos, 1], encode_segments(anchors[pos], gt[match[pos], 1:]),
                                               beta=1 / 9, reduction="sum") / len(chosen)
            r = torch.cat([proposals[i], gt[:, 1:]])  # (R, 2) proposals + ground truth
            best, m = segment_iou(r, gt[:, 1:]).max(1)  # (R,) best tIoU and its ground truth
            cls = torch.where(best >= 0.5, gt[m, 0].long() + 1, 0)  # (R,) 0 = background
            keep = sample(cls, 128, 0.25)
            rois.append(r[keep])
            buffer_of.append(torch.full((len(keep),), i, device=x.device))
            labels.append(cls[keep])
            targets.append(encode_segments(r[keep], gt[m[keep], 1:]) / r.new_tensor([0.1, 0.2]))  # (128, 2)
        scores, twins = self.heads(fmap, torch.cat(rois), torch.cat(buffer_of), stride)  # (R, C+1), (R, C+1, 2)
        labels, targets = torch.cat(labels), torch.cat(targets)  # (R,), (R, 2)
        fg = torch.nonzero(labels > 0).flatten()
        loss = loss / b + F.cross_entropy(scores, labels)
        return loss + F.smooth_l1_loss(twins[fg, labels[fg]], targets[fg], reduction="sum") / len(labels)

    def heads(self, fmap, rois, buffer_of, stride):
        """Classification subnet on RoIs (R, 2) -> class logits (R, C + 1), offsets (R, C + 1, 2)."""
        h = self.fc(roi_pool_3d(fmap, rois, buffer_of, stride))  # (R, width)
        return self.cls(h).float(), self.twin(h).float().view(len(rois), -1, 2)  # fp32: offsets scale frames

    def classify(self, fmap, proposals, stride):
        """Test: per buffer (proposals (R, 2), softmax (R, C + 1), refined segments (R, C + 1, 2))."""
        buffer_of = torch.cat([torch.full((len(p),), i, device=fmap.device) for i, p in enumerate(proposals)])
        scores, twins = self.heads(fmap, torch.cat(proposals), buffer_of, stride)
        twins = twins * twins.new_tensor([0.1, 0.2])  # (R, C + 1, 2) un-normalised offsets
        out = []
        for i, p in enumerate(proposals):
            m = buffer_of == i
            refined = decode_segments(p.repeat_interleave(self.num_classes + 1, 0), twins[m].flatten(0, 1))
            out.append((p, scores[m].softmax(-1), refined.view(len(p), -1, 2)))
        return out


def nms_segments(segments, scores, threshold, classes=None):
    """Indices kept by (per-class) NMS at tIoU `threshold`, by decreasing score; segments (N, 2) as unit-height
    boxes, whose IoU is the tIoU."""
    boxes = torch.stack([segments[:, 0], torch.zeros_like(scores), segments[:, 1], torch.ones_like(scores)], 1)
    return torchvision.ops.batched_nms(boxes.float(), scores.float(), torch.zeros_like(scores, dtype=torch.long)
                                       if classes is None else classes, threshold)


class DetectionBuffers(torch.utils.data.Dataset):
    """L-frame buffers at stride `step` over untrimmed sequences of a PKU-MMD paired split, through its transform
    (frames past the end repeat the last one). item: key (C, L, H, W), segments (RC3D_MAX_SEGMENTS, 3) rows (label,
    start, end) in buffer frames, end exclusive, cut to the buffer and kept when >= half inside, label -1 = padding.
    train=True keeps only buffers that hold a segment."""

    def __init__(self, paired, sequences, length, step, key, train):
        self.paired, self.length, self.key, self.buffers = paired, length, key, []
        for seq in sequences:
            n, rows = paired.sequence_length(seq), paired.segments(seq)  # rows (K, 3) inclusive ends
            for start in range(0, max(n - length, 0) + step, step):
                a, b = rows[:, 1] - start, rows[:, 2] + 1 - start  # (K,) buffer frames
                a_in, b_in = a.clip(0, min(length, n - start)), b.clip(0, min(length, n - start))
                inside = 2 * (b_in - a_in) >= b - a
                if inside.any() or not train:
                    self.buffers.append((seq, start, np.stack([rows[inside, 0], a_in[inside], b_in[inside]], 1)))

    def __len__(self):
        return len(self.buffers)

    def __getitem__(self, i):
        seq, start, rows = self.buffers[i]
        item = self.paired.read_sequence(seq, np.arange(start, start + self.length), (self.key,))
        segments = torch.full((RC3D_MAX_SEGMENTS, 3), -1.0)
        segments[:len(rows)] = torch.from_numpy(rows[:RC3D_MAX_SEGMENTS]).float()
        return {self.key: self.paired.transform(item)[self.key], "segments": segments, "index": torch.tensor(i)}


@torch.no_grad()
def detect(model, buffers, args, run):
    """Detections [(seq, class, start, end, score)] (end exclusive, clipped to the video) of `model` over the
    buffers: per buffer, per-class NMS (RC3D_TEST_NMS) on the refined segments, the RC3D_PER_BUFFER best."""
    model.eval()
    loader = torch.utils.data.DataLoader(buffers, batch_size=args.eval_batch_size, num_workers=args.workers or 0)
    detections, i = [], 0
    for batch in loader:
        with run.autocast():
            outputs = model(batch[buffers.key].to(run.device))
        for proposals, probs, refined in outputs:
            seq, start, _ = buffers.buffers[i]
            i += 1
            n = buffers.paired.sequence_length(seq)
            classes = torch.arange(1, probs.shape[1], device=probs.device).repeat(len(proposals))  # (R C,)
            scores, segments = probs[:, 1:].flatten().float(), refined[:, 1:].flatten(0, 1).float()  # (R C), (R C, 2)
            segments = (segments + start).clamp(0, n)
            keep = nms_segments(segments, scores, RC3D_TEST_NMS, classes)[:RC3D_PER_BUFFER]
            detections += [(seq, int(classes[k]) - 1, float(segments[k, 0]), float(segments[k, 1]),
                            float(scores[k])) for k in keep.tolist()]
    return detections


def detection_task(run, args):
    """--task detection on pku1-paired: R-C3D fine-tuned on --label-fraction of the training videos (thesis: 1/4,
    1/2, all = 235, 470, 942), detections in the validation videos, mAP at tIoU 0.1-0.7 (primary 0.5)."""
    backbone, source = build_encoder(args)
    key, train_paired, test_paired = args.protocol["modality"], build_split(args, "train", True), build_split(
        args, "test", False)
    sequences = train_paired.sequences
    if args.label_fraction:  # a random share of the training videos (seed --subset-seed, else --seed)
        rng = np.random.default_rng(args.seed if args.subset_seed is None else args.subset_seed)
        sequences = [sequences[i] for i in sorted(rng.permutation(len(sequences))[:round(args.label_fraction *
                                                                                          len(sequences))])]
    train_set = DetectionBuffers(train_paired, sequences, args.frames, max(args.frames // 2, 1), key, True)
    test_set = DetectionBuffers(test_paired, test_paired.sequences, args.frames, args.frames, key, False)
    num_classes = train_paired.num_classes
    protocol = (f"protocol: --task detection on {args.data}: R-C3D, {args.arch} {key} trunk, weights: {source}\n  "
                f"buffers of {args.frames} frames: train {len(train_set)} (stride {max(args.frames // 2, 1)}) from "
                f"{len(sequences)} videos, test {len(test_set)} from {len(test_paired.sequences)} videos\n  anchors "
                f"{list(RC3D_SCALES)} cells, proposals NMS 0.7, RoI pool 1x4x4, {num_classes + 1}-way classifier, "
                f"per-class NMS {RC3D_TEST_NMS}\n  optimisation: {args.optimizer} lr {args.lr} wd {args.wd}, batch "
                f"{args.batch_size}, {args.epochs} epochs, lr x{args.lr_gamma} at {args.milestones}; the last epoch "
                f"is tested\n  metric: mAP at tIoU 0.1-0.7, ActivityNet-style one-to-one matching, classes with "
                f"ground truth averaged; pku_mAP_action@0.5: PKU-MMD's own evaluation (no one-to-one matching, / 52 "
                f"label slots)")
    run.print(protocol)
    model = RC3D(backbone, num_classes)
    args.eval_every = args.epochs  # nothing to select on: one training chunk

    def loss_fn(net, batch):
        with run.autocast():
            return net(batch[key], batch["segments"]).float()

    selection = train_and_select(run, args, model, train_set, None, None, loss_fn=loss_fn)
    detections = detect(model, test_set, args, run)
    truth = [(s, int(c), int(a), int(b) + 1) for s in test_paired.sequences for c, a, b in test_paired.segments(s)]
    metrics = {f"mAP@{t:.1f}": 100 * v for t, v in detection_map(detections, truth).items()}
    metrics["pku_mAP_action@0.5"] = 100 * pku_mmd_map_action([(*d[:3], d[3] - 1, d[4]) for d in detections],
                                                             [(*g[:3], g[3] - 1) for g in truth])  # inclusive ends
    return {"metrics": metrics, "primary": "mAP@0.5", "selection": selection, "protocol": protocol,
            "sizes": {"train": len(sequences), "val": 0, "test": len(test_paired.sequences)},
            "weights_source": source, "num_detections": len(detections)}


# ---------------------------------------------------------------------------------------------- repetition counting
# Zhang et al., "Context-aware and Scale-insensitive Temporal Repetition Counting", CVPR 2020, as the SEVERE code
# runs it (SEVERE-BENCHMARK Repetition-Counting/; README "Repetition counting"). Notation: a state is a frame m with the
# current estimates l (length of the cycle ending at m, frames [m - l + 1, m]) and r (the cycle starting at m + 1,
# frames [m + 1, m + r]); anchors a_k scale them; the head predicts, per stream and anchor, a score p_k (is
# a_k * l within IoU 0.5 of the true length?) and an offset d_k = log(true / (a_k * l)).
RC_ANCHORS = (0.5, 0.67, 0.8, 1.0, 1.25, 1.5, 2.0)
RC_CONTEXT = (1.0, 2.0)  # l_context, r_context: each stream sees 2 cycles (its cycle plus one of context)
RC_IOU = 0.5  # iou_ubound = iou_lbound: positive anchor at IoU >= 0.5, negative below
RC_BOX_WEIGHT = 50.0  # loss = CE(p) + 50 * SmoothL1(d) per stream (their train_2stream.py)
RC_MIN_LENGTH = 4  # a cycle estimate below 4 frames is rejected (their fail_flag)
RC_MIN_CYCLES = 2  # UCFRep: a cycle is at most half the video
RC_SCALES = (0.03, 0.35, 30)  # inference scale search: 30 cycle lengths from 3% to 35% of the video, geometric
RC_POSITIONS, RC_ITERATIONS, RC_MERGE_W = 32, 4, 0.5  # inference: 2^5 positions, refinement steps, update weight


def cycle_length_targets(bounds):
    """Per-frame true cycle lengths from the cycle boundaries t_0 < ... < t_n (0-based, t_0 = 0), as Zhang et al.'s
    label_interpolation_v1.m: for frame p in cycle k = [t_k, t_k+1] of length P, the frame at the same phase in the
    previous cycle (of length P') is t_k-1 + (p - t_k) / P * P' and in the next (P'') t_k+1 + (p - t_k) / P * P''.
    Returns (previous, following) float (t_n + 1,): the distances to those frames = the true lengths of the cycle
    ending at p ([p - d + 1, p]) and starting after p ([p + 1, p + d]); -1 where unknown (first / last cycle, or
    neighbouring cycles that differ by more than 2 frames and 30%). DIFFERENT from theirs: update_labels compares
    distance + 1 with the window, which makes every length one frame too long and the count T / (P + 1) too low
    for a period P (-3% at UCFRep's ~30-frame cycles, -14% at 6 frames)."""
    t = np.asarray(bounds, dtype=np.float64)
    previous, following = np.full(int(t[-1]) + 1, -1.0), np.full(int(t[-1]) + 1, -1.0)
    similar = lambda a, b: max(a, b) - min(a, b) <= 2 or max(a, b) / min(a, b) <= 1.3  # noqa: E731
    for k in range(len(t) - 1):
        p = np.arange(int(t[k]), int(t[k + 1]) + 1)  # frames of cycle k, both ends (a later cycle overwrites t_k+1)
        period = t[k + 1] - t[k]
        phase = (p - t[k]) / period  # (P,) in [0, 1]
        following[p] = -1.0
        if k + 2 < len(t) and similar(period, t[k + 2] - t[k + 1]):
            following[p] = np.round(t[k + 1] + phase * (t[k + 2] - t[k + 1]) - p)
        previous[p] = -1.0
        if k > 0 and similar(period, t[k] - t[k - 1]):
            previous[p] = np.round(p - t[k - 1] - phase * (t[k] - t[k - 1]))
    return previous, following


def random_segment(bounds, sample_duration, rng):
    """Training sub-segment of their ucf_aug.py: cycles i..j-1 of the n, j - i >= 2, start and end drawn inside the
    neighbouring cycles, at most sample_duration frames. bounds: 0-based frame indices (n + 1,).
    -> (begin, end, j - i: the count their code stores for the segment, approximate at the cut ends)."""
    n = len(bounds) - 1
    if n < 2:
        return int(bounds[0]), int(bounds[-1]), n
    i = int(rng.integers(0, n - 1))  # first boundary index, 0..n-2
    j = int(rng.integers(i + 2, n + 2))  # last boundary index + 1, i+2..n+1
    begin = int(bounds[0]) if i == 0 else int(rng.integers(bounds[i - 1], bounds[i] + 1))
    end = int(bounds[-1]) if j == n + 1 else int(rng.integers(bounds[j - 1], bounds[j] + 1))
    return begin, min(end, begin + sample_duration - 1), j - i


class RepetitionVideos(torch.utils.data.Dataset):
    """UCFRep videos [(frame folder, bounds)] -> {"video": float (C, S, crop, crop) normalised, zero-padded to S
    frames, "previous", "following": (S,) true cycle lengths per frame (-1 unknown or padding), "length": frames
    used, "label": count}. Train: a random sub-segment (random_segment) of <= sample_duration frames, flipped
    with p 1/2. Test: the annotated segment [t_0, t_n], unpadded (use batch size 1)."""

    def __init__(self, videos, train, sample_duration, crop, short_side, flip):
        self.videos, self.train, self.sample_duration = videos, train, sample_duration
        self.crop, self.short_side, self.flip = crop, short_side, flip

    def __len__(self):
        return len(self.videos)

    def __getitem__(self, i):
        path, bounds = self.videos[i]
        frames_on_disk = common.count_frames(path)
        if bounds[-1] > frames_on_disk:
            raise common.VideoReadError(f"{path}: temporal_bound ends at frame {bounds[-1]} but the folder has "
                                        f"{frames_on_disk} image_%05d.jpg frames")
        t = np.asarray(bounds, dtype=np.int64) - 1  # 1-based frame numbers -> 0-based indices
        previous, following = cycle_length_targets(t - t[0])  # (t_n - t_0 + 1,) each
        begin, end, count = random_segment(t, self.sample_duration, np.random.default_rng(
            int(torch.randint(2 ** 62, ())))) if self.train else (int(t[0]), int(t[-1]), len(t) - 1)
        frames = common.read_video_frames(path, np.arange(begin, end + 1))  # (T, H, W, C) uint8
        x = torch.from_numpy(frames).permute(3, 0, 1, 2)  # (C, T, H, W)
        x = common.resized_center_crop(x, self.short_side, self.crop)
        if self.train and self.flip:
            x = common.horizontal_flip(x, p=0.5)
        length = end - begin + 1
        pad = (self.sample_duration if self.train else length) - length
        video = F.pad(common.normalize(x), (0, 0, 0, 0, 0, pad))  # (C, S, crop, crop); 0 = the mean colour
        labels = F.pad(torch.from_numpy(np.stack([previous, following])[:, begin - t[0]:end - t[0] + 1]).float(),
                       (0, pad), value=-1.0)  # (2, S)
        return {"video": video, "previous": labels[0], "following": labels[1], "length": torch.tensor(length),
                "label": torch.tensor(float(count)), "index": torch.tensor(i)}


class RepetitionCounter(nn.Module):
    """Zhang et al. Sec. 3.2 as SEVERE's Head: backbone feature of the two-stream context input -> per stream
    (previous cycle, next cycle) fc_cls: D -> 2 x K (negative / positive per anchor) and fc_box: D -> K offsets."""

    def __init__(self, backbone, num_anchors=len(RC_ANCHORS)):
        super().__init__()
        self.backbone, self.num_anchors = backbone, num_anchors
        self.fc_cls = nn.ModuleList(nn.Linear(backbone.feature_dim, 2 * num_anchors) for _ in range(2))
        self.fc_box = nn.ModuleList(nn.Linear(backbone.feature_dim, num_anchors) for _ in range(2))

    def forward(self, x):  # x (N, C, T, H, W): frames of the previous-cycle stream, then of the next-cycle stream
        features = self.backbone(x)  # (N, D)
        scores = torch.stack([fc(features).view(-1, 2, self.num_anchors) for fc in self.fc_cls], 1)  # (N, 2, 2, K)
        offsets = torch.stack([fc(features) for fc in self.fc_box], 1)  # (N, 2, K)
        return scores, offsets


def context_frame_indices(m, l, r, frames, context=RC_CONTEXT):
    """Their update_inputs_2stream: frames/2 indices evenly over [m - l + 1 - l * l_context, m] (the previous cycle
    and its left context), frames/2 over [m + 1, m + r + r * (r_context - 1)]. m, l, r: (N,) -> (N, frames)."""
    half = frames // 2
    j = torch.arange(half, dtype=torch.float64, device=m.device)  # (half,)

    def spread(first, last):  # (N,), (N,) -> (N, half)
        step = (last - first + 1) / (half - 1)
        return torch.maximum(first[:, None], torch.minimum(last[:, None],
                             torch.round(first[:, None] - 0.5 + j * step[:, None])))

    m, l, r = m.double(), l.double(), r.double()
    left = spread(torch.floor(m - l + 1 - l * context[0]), m)
    right = spread(m + 1, torch.floor(m + r + r * (context[1] - 1)))
    return torch.cat([left, right], 1).long()  # (N, frames)


def gather_frames(videos, lengths, video_of, indices):
    """videos (B, C, S, H, W), lengths (B,), video_of (N,) which video each state reads, indices (N, T) ->
    (N, C, T, H, W); frames outside [0, length) are zero (their padding with the mean colour)."""
    valid = (indices >= 0) & (indices < lengths[video_of, None])  # (N, T)
    x = videos[video_of[:, None], :, indices.clamp(0, videos.shape[2] - 1)]  # (N, T, C, H, W)
    return (x * valid[:, :, None, None, None]).permute(0, 2, 1, 3, 4)


def anchor_targets(true_length, current_length, anchors):
    """Their update_labels: anchor k covers a_k * current; target score 1 where min/max(a_k * current, true) >=
    RC_IOU else 0, offset log(true / (a_k * current)) on positives; every anchor ignored (-1) where the true
    length is unknown (-1). (N,), (N,), (K,) -> scores (N, K) long, offsets (N, K), offset mask (N, K)."""
    anchor_length = anchors[None, :] * current_length[:, None]  # (N, K)
    true = true_length[:, None].clamp(min=1e-6)  # (N, 1)
    iou = torch.minimum(anchor_length, true) / torch.maximum(anchor_length, true)  # (N, K)
    scores = (iou >= RC_IOU).long()
    scores[true_length < 0] = -1
    offsets = torch.log(true / anchor_length)  # (N, K)
    return scores, offsets, scores == 1


def counting_loss(scores, offsets, target_scores, target_offsets, offset_mask):
    """Sum over the two streams of CE(p) (ignored anchors left out) + 50 * SmoothL1(d) averaged over ALL N x K
    entries with non-positive ones contributing 0 (their loss sets those targets to the prediction).
    scores (N, 2, 2, K), offsets / targets / mask (N, 2, K)."""
    loss = scores.new_zeros(())
    for s in range(2):
        ce = F.cross_entropy(scores[:, s], target_scores[:, s], ignore_index=-1, reduction="sum")  # over (N, K)
        loss = loss + ce / (target_scores[:, s] >= 0).sum().clamp(min=1)
        l1 = F.smooth_l1_loss(offsets[:, s], target_offsets[:, s], reduction="none") * offset_mask[:, s]  # (N, K)
        loss = loss + RC_BOX_WEIGHT * l1.mean()
    return loss


def scale_grid(length):
    """RC_SCALES: candidate cycle lengths, a geometric grid over [3%, 35%] of a video of `length` frames -> (S,)."""
    low, high, number = RC_SCALES
    return length * low * (high / low) ** (torch.arange(number, dtype=torch.float64) / (number - 1))


def sample_training_states(batch, per_video, generator=None):
    """States for a training step (ours; see README): per video `per_video` frames m uniform in the segment, and
    l = r drawn like their state_init: half from the true length at m times 2^U(-1, 1), half from the inference
    scale grid; clamped to [RC_MIN_LENGTH, length / RC_MIN_CYCLES]. -> video_of, m, l, r: (N,) each."""
    lengths = batch["length"].cpu().double()  # (B,)
    video_of = torch.arange(len(lengths)).repeat_interleave(per_video)  # (N,)
    n = len(video_of)
    m = torch.floor(torch.rand(n, generator=generator, dtype=torch.float64) * (lengths[video_of] - 1))
    true = batch["previous"].cpu().double()[video_of, m.long()]  # (N,)
    fallback = lengths[video_of] / batch["label"].cpu().double()[video_of]  # mean cycle length where unknown
    near_truth = torch.where(true > 0, true, fallback) * 2 ** (2 * torch.rand(n, generator=generator,
                                                                              dtype=torch.float64) - 1)
    grid = torch.stack([scale_grid(t)[torch.randint(RC_SCALES[2], (), generator=generator)]
                        for t in lengths[video_of].tolist()])
    l = torch.where(torch.rand(n, generator=generator) < 0.5, near_truth, grid)
    l = torch.minimum(l.clamp(min=RC_MIN_LENGTH), lengths[video_of] / RC_MIN_CYCLES).round()
    return video_of, m, l, l.clone()


def repcount_loss(net, batch, args, run):
    """A training step's loss: batch (RepetitionVideos) -> states, two-stream inputs (N, C, frames, H, W) -> scalar."""
    video_of, m, l, r = sample_training_states(batch, args.rc_states)
    device = batch["video"].device
    video_of, m, l, r = video_of.to(device), m.to(device), l.to(device), r.to(device)
    x = gather_frames(batch["video"], batch["length"], video_of, context_frame_indices(m, l, r, args.frames))
    true_previous = batch["previous"][video_of, m.long()]  # (N,) true length of the cycle ending at m
    true_following = batch["following"][video_of, m.long()]  # (N,) of the cycle starting at m + 1
    anchors = torch.tensor(RC_ANCHORS, device=device, dtype=torch.float64)
    targets = [anchor_targets(true, current, anchors) for true, current in ((true_previous.double(), l),
                                                                            (true_following.double(), r))]
    target_scores, target_offsets, mask = (torch.stack([t[i] for t in targets], 1) for i in range(3))  # (N, 2, K)
    with run.autocast():
        scores, offsets = net(x)  # (N, 2, 2, K), (N, 2, K)
    return counting_loss(scores.float(), offsets.float(), target_scores, target_offsets.float(), mask)


@torch.no_grad()
def count_repetitions(model, video, length, frames, batch_size=64):
    """Count in one video (their val_2stream.py, simplified where noted). video (C, T, H, W) normalised.
    1. Scale search at the centre frame: for each cycle length c of the scale grid (as l = r), anchor a = 1.0's
       prediction c * exp(d) (d clamped to +-0.5) with its score; keep the best-scored valid one (4 <= . < T / 2).
    2. Refine that length 4 times at the centre: c <- round(c / 2 + c * exp(d) / 2).
    3. 32 evenly spaced frames m start with l = r = c and are refined RC_ITERATIONS times each: per stream the
       best-scored anchor k gives a_k * exp(d_k) and the estimate moves halfway (merge_w 0.5) to it.
       DIFFERENT from theirs: they refine the positions in a 5-level coarse-to-fine tree where each refined
       position passes its (l, r) on to its half of the video; ours refines every position independently.
    4. count = T * mean over the positions whose whole context lies inside the video of (1 / l + 1 / r) / 2
       (T / c when none does); rounded by repetition_count_errors."""
    device = next(model.parameters()).device
    videos, lengths = video[None].to(device), torch.tensor([length], device=device)
    anchors = torch.tensor(RC_ANCHORS, dtype=torch.float64)

    def predict_states(m, l, r):  # (N,) each -> scores (N, 2, K) positive probabilities, offsets (N, 2, K)
        scores, offsets = [], []
        for chunk in torch.arange(len(m)).split(batch_size):
            indices = context_frame_indices(m[chunk], l[chunk], r[chunk], frames).to(device)
            x = gather_frames(videos, lengths, torch.zeros(len(chunk), dtype=torch.long, device=device), indices)
            s, d = model(x)
            scores.append(s.float().softmax(dim=2)[:, :, 1].cpu().double())
            offsets.append(d.float().clamp(-0.5, 0.5).cpu().double())
        return torch.cat(scores), torch.cat(offsets)

    longest = length / RC_MIN_CYCLES
    centre_anchor = RC_ANCHORS.index(1.0)
    grid = scale_grid(length)  # (S,)
    centre = torch.full_like(grid, length / 2)
    scores, offsets = predict_states(centre, grid, grid)
    estimate = grid * anchors[centre_anchor] * offsets[:, 0, centre_anchor].exp()  # (S,)
    valid = (estimate >= RC_MIN_LENGTH) & (estimate < longest)
    c = float(estimate[torch.where(valid, scores[:, 0, centre_anchor], -1.0).argmax()]) if valid.any() else \
        float(grid[len(grid) // 2])
    for _ in range(4):
        _, offsets = predict_states(torch.tensor([length / 2]), torch.tensor([c]), torch.tensor([c]))
        proposal = c * float(offsets[0, 0, centre_anchor].exp())
        if RC_MIN_LENGTH <= proposal < longest:
            c = round((1 - RC_MERGE_W) * c + RC_MERGE_W * proposal)
    m = torch.floor(length / (RC_POSITIONS + 1) * (torch.arange(RC_POSITIONS, dtype=torch.float64) + 0.5))
    cycles = torch.full((RC_POSITIONS, 2), float(c), dtype=torch.float64)  # (P, 2): l, r per position
    for _ in range(RC_ITERATIONS):
        scores, offsets = predict_states(m, cycles[:, 0], cycles[:, 1])  # (P, 2, K)
        best = scores.argmax(dim=2, keepdim=True)  # (P, 2, 1) best-scored anchor per stream
        ratio = anchors[best[..., 0]] * offsets.gather(2, best)[..., 0].exp()  # (P, 2)
        proposal = (cycles * ratio).clamp(RC_MIN_LENGTH, longest)
        cycles = ((1 - RC_MERGE_W) * cycles + RC_MERGE_W * proposal).round()
    l, r = cycles[:, 0], cycles[:, 1]
    inside = (m - l + 1 - l * RC_CONTEXT[0] >= 0) & (m + r + r * (RC_CONTEXT[1] - 1) < length)  # (P,)
    if not inside.any():
        return length / c
    return float(length * (0.5 / l[inside] + 0.5 / r[inside]).mean())


def count_videos(model, dataset, args, run):
    """Predicted and true counts of every video of `dataset` (RepetitionVideos, test mode), gathered over processes
    in dataset order. -> (predicted (N,), true (N,)) float64 numpy arrays."""
    loader = common.build_loader(dataset, args, run, train=False, batch_size=run.world_size)
    was_training = model.training
    model.eval()
    rows = []
    for batch in loader:
        count = count_repetitions(model, batch["video"][0], int(batch["length"][0]), args.frames)
        rows.append(torch.tensor([[float(batch["index"][0]), count, float(batch["label"][0])]], dtype=torch.float64))
    model.train(was_training)
    rows = torch.cat(rows).to(run.device)  # (N_local, 3): index, predicted, true
    rows = common.gather_in_sample_order(rows[:, 0], rows)[1].cpu()
    return rows[:, 1].numpy(), rows[:, 2].numpy()


def repcount_task(run, args):
    """--task repcount: train the counter on UCFRep's train split (checkpoint chosen by MAE on a validation split
    carved from it), count every video of the val split (UCFRep's test set), report MAE and off-by-one accuracy."""
    p = args.protocol
    common.build_dataset(args.data, args.data_root, "train")  # writes the toy set; checks the layout
    root = args.data_root or os.path.join("data", args.data)
    train_videos = common.read_ucfrep_annotations(root, "train")
    test_videos = common.read_ucfrep_annotations(root, "val")
    counts = np.array([len(bounds) - 1 for _, bounds in train_videos])
    train_idx, val_idx = np.arange(len(train_videos)), None
    if not args.select_on_test and args.val_fraction > 0:
        train_idx, val_idx = train_val_split(counts, args.val_fraction, seed=args.seed)
    sample_duration = args.rc_sample_duration or p["sample_duration"]
    make = lambda videos, train: RepetitionVideos(videos, train, sample_duration, p["crop"],  # noqa: E731
                                                  p["short_side"], p["flip"])
    train_set = make([train_videos[i] for i in train_idx], True)
    test_set = make(test_videos, False)
    select_set = (test_set if args.select_on_test else
                  make([train_videos[i] for i in val_idx], False) if val_idx is not None else None)
    backbone, source = build_encoder(args)
    model = RepetitionCounter(backbone)
    sizes = {"train": len(train_set), "val": 0 if val_idx is None else len(val_idx), "test": len(test_set)}
    protocol = "\n".join([
        f"protocol: --task repcount on {args.data} (Zhang et al. CVPR 2020 as SEVERE), backbone {args.arch} "
        f"{args.options or ''}", f"  weights: {source}",
        f"  input: {args.frames} frames = 2 streams x {args.frames // 2} frames spread over (previous cycle + "
        f"{RC_CONTEXT[0]:g} x its length of left context) and (next cycle + {RC_CONTEXT[1] - 1:g} x its length of "
        f"right context); short side {p['short_side']} + centre crop {p['crop']}, flip in training",
        f"  samples: train {sizes['train']} / validation {sizes['val']} / test {sizes['test']} videos (test = "
        f"UCFRep's val split); training: one random sub-segment of >= 2 cycles and <= {sample_duration} frames per "
        f"video and epoch, {args.rc_states} sampled (m, l, r) states per video and step",
        f"  model: backbone + per stream fc_cls D -> 2 x {len(RC_ANCHORS)} and fc_box D -> {len(RC_ANCHORS)}, anchors "
        f"{list(RC_ANCHORS)}; loss CE + {RC_BOX_WEIGHT:g} x SmoothL1, positive at IoU >= {RC_IOU}",
        f"  inference: scale search over {RC_SCALES[2]} lengths ({RC_SCALES[0]:.0%}-{RC_SCALES[1]:.0%} of the "
        f"video) at its centre, 4 refinements, then {RC_POSITIONS} positions x {RC_ITERATIONS} refinements; count "
        f"= T x mean(1 / cycle length), rounded",
        f"  optimisation: {args.optimizer} lr {args.lr} wd {args.wd}, global batch {args.batch_size} videos, "
        f"{args.epochs} epochs" + (f", --max-steps {args.max_steps}" if args.max_steps else ""),
        f"  selection: {selection_text(args, chosen='with the lowest MAE')}",
        "  metrics: MAE = mean |c_hat - c| / c (thesis 'UCF-RC', lower is better), OBO = share with |c_hat - c| <= 1"])
    run.print(protocol)
    loss_fn = functools.partial(repcount_loss, args=args, run=run)
    score_fn = lambda m, videos: repetition_count_errors(*count_videos(m, videos, args, run))["mae"]  # noqa: E731
    selection_log = train_and_select(run, args, model, train_set, select_set, None, loss_fn=loss_fn,
                                     score_fn=score_fn, lower_is_better=True)
    predicted, true = count_videos(model, test_set, args, run)
    metrics = repetition_count_errors(predicted, true)
    baseline = repetition_count_errors(np.full_like(true, counts[train_idx].mean()), true)
    metrics.update(mae_mean_count=baseline["mae"], obo_mean_count=baseline["obo"])  # trivial reference
    return {"metrics": metrics, "primary": "mae", "selection": selection_log, "sizes": sizes,
            "weights_source": source, "protocol": protocol,
            "counts": {"predicted": predicted.tolist(), "true": true.tolist()}}


# ---------------------------------------------------------------------------------------------- SEVERE
def severe_task(run, args):
    """The SEVERE suite (thesis Table 4.4 / 5.8) for one checkpoint: every column in <out-dir>/<column>/ (a finished
    column is read back, so rerunning resumes), then our row beside the reference rows with mean and rank over the
    columns we have. --data-root DIR means DIR/<dataset> per column. With --data toy every recognition column runs
    on toy-motion and UCF-RC on toy-ucfrep (a smoke test of the mechanics, not a benchmark)."""
    toy = args.data == "toy-motion"
    ours, notes = {}, {}
    for name, data, task, examples in SEVERE_COLUMNS:
        if args.severe_columns and name not in args.severe_columns:
            continue
        if toy and task == "multilabel":
            notes[name] = "not run: no toy multi-label set"
            continue
        column = copy.copy(args)
        column.task, column.data = task, ("toy-ucfrep" if task == "repcount" else "toy-motion") if toy else data
        column.data_root = os.path.join(args.data_root, data) if args.data_root and not toy else args.data_root
        column.num_examples, column.per_class, column.label_fraction = examples, None, None
        column.subset_seed = 99999 if args.subset_seed is None else args.subset_seed  # one subset for every model
        column.seeds = [args.seed]
        column.out_dir = os.path.join(args.out_dir, re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-"))  # UCF-10-3
        apply_protocol(column)
        result_path = os.path.join(column.out_dir, "result.json")
        if os.path.exists(result_path) and args.resume != "none":  # the suite's identity.json was checked in main
            with open(result_path) as f:
                result = json.load(f)
        else:
            try:
                common.build_dataset(column.data, column.data_root, "train")
            except (OSError, common.VideoReadError) as e:
                notes[name] = f"not run: data missing ({e}); needs {SEVERE_DATA[data]}"
                run.print(f"SEVERE {name}: {notes[name]}")
                continue
            os.makedirs(column.out_dir, exist_ok=True)
            column_run = common.Run(column, run.device, column.out_dir)
            run.print(f"\n==== SEVERE column {name}: --task {task} --data {column.data}")
            task_fn = {"fewshot": fewshot_task, "repcount": repcount_task}.get(task, classification_task)
            result = task_fn(column_run, column)
            if run.is_main:
                write_result(column, result)
        ours[name] = result["metrics"][result["primary"]]
    columns = [i for i, (name, *_) in enumerate(SEVERE_COLUMNS) if name in ours]  # the columns we have, in order
    names = [SEVERE_COLUMNS[i][0] for i in columns]
    rows = {**{ref: [values[i] for i in columns] for ref, values in SEVERE_REFERENCE.items()},
            "this checkpoint": [ours[name] for name in names]}
    summary = severe_mean_and_rank(rows, [k for k, name in enumerate(names) if name == "UCF-RC"]) if names else {}
    table = ["pretraining".ljust(28) + "".join(n.rjust(12) for n in names) + "mean".rjust(8) + "rank".rjust(7)]
    for row_name, values in rows.items():
        mean, rank = summary.get(row_name, (float("nan"), float("nan")))
        table.append(row_name.ljust(28) + "".join(f"{v:12.3f}" if n == "UCF-RC" else f"{v:12.1f}"
                                                  for n, v in zip(names, values)) + f"{mean:8.1f}{rank:7.1f}")
    metrics = dict(ours)
    if names:
        metrics["mean"], metrics["rank"] = summary["this checkpoint"]
    return {"metrics": metrics, "primary": "mean" if names else None, "notes": notes, "table": "\n".join(table),
            "columns": names}


# ==================================================================================================== MAIN
def protocol_for(data):
    """The PROTOCOLS entry of --data (paired, skeleton and other video sets map to their family's)."""
    if data in PROTOCOLS:
        return PROTOCOLS[data]
    if data in common.TOY_PAIRED_HALVES:
        return PROTOCOLS["toy-paired"]
    if data in common.NTU_PAIRED_SETS or data in common.PKU_PAIRED_SETS:
        return PROTOCOLS["paired"]
    if data == "toy-motion-flow":  # toy-motion's videos as frame folders with their flow, at vicc.py's frame rate
        return dict(PROTOCOLS["toy-motion"], stride=1)  # consecutive frames, as ViCC pretrains and retrieves
    if data.startswith(("ntu", "pku", "kinetics-skeleton")):
        return SKELETON
    if data.startswith("toyota-smarthome-"):  # its own protocols report mean class accuracy (Das et al., 2019)
        return dict(PROTOCOLS["ucf101"], metric="mean_class_acc")
    return PROTOCOLS["ucf101"]  # videofolder / videolist / other video sets: UCF101's settings


def apply_protocol(args):
    """Fill the per-task optimisation and input settings from PROTOCOLS, keeping values given on the command line
    (args.overrides)."""
    args.protocol = protocol_for(args.data)
    if args.task == "detection" and args.data not in common.PKU_PAIRED_SETS:
        raise common.UserError(f"evaluate.py: --task detection expected --data in {list(common.PKU_PAIRED_SETS)} "
                               f"(untrimmed videos with labelled segments), found {args.data}")
    task_key = {"arrow-of-time": "arrow", "crossdomain": "finetune"}.get(args.task, args.task)  # the PROTOCOLS key
    p = args.protocol
    ch2_skeleton = args.protocol_name == "ch2" and p["modality"] == "skeleton"
    if ch2_skeleton:  # Sec. 2.4.3 skeleton student: all layers, SGD 0.1 (momentum 0.9), wd 1e-5, batch 100, 70 epochs
        spec = _opt("sgd", 100, 0.1, 70, [], wd=1e-5)
    elif args.protocol_name == "ch2":  # Sec. 2.4.3 depth: fc + last block, SGD 0.1 (momentum 0.9), wd 1e-3, 100 epochs
        spec = _opt("sgd", 128, 0.1, 100, [], wd=1e-3)
    elif args.protocol_name == "coclr":  # CoCLR / ViCC main_classifier.py: SGD 0.1, wd 1e-3, batch 32
        spec = (_opt("sgd", 32, 0.1, 100, [60, 80], wd=1e-3) if args.task == "linear" else
                _opt("sgd", 32, 0.1, 500, [200, 300, 400, 450], wd=1e-3))
        # 32x128² crops of area >= 0.2 (their test crop: 224 of the 256 short side, then 128); toy sets keep their
        # input size. Differences: colour jitter as SEVERE's (p 1), one lr (their backbone lr / 10 by default)
        p = args.protocol = dict(p, dropout=0.9 if args.task == "finetune" else 0.0, **({} if args.data.startswith(
            "toy") else dict(frames=32, crop=128, short_side=146, crop_scale=(0.2, 1.0))))
    elif args.protocol_name == "phlvc":  # P-HLVC supp. Sec. 7.6: optimiser not given; the authors' transfer.py CLI
        # defaults (unverified as the paper's): Adam lr 1e-3 x --fine_tuning 0.1 for backbone AND head, wd 1e-3, 250
        # epochs, x0.1 at [30, 50, 100, 150], dropout 0.5. Batch not given (their default 1): 32 as --protocol coclr
        spec = _opt("adam", 32, 1e-4, 250, [30, 50, 100, 150], wd=1e-3)
        b, s, area = (0.8, 1.0, 0.05) if args.data == "hmdb51" else (0.5, 0.5, 0.1)  # Table 6 (UCF101's elsewhere)
        trunk = args.options.get("trunk", args.arch)  # Table 7: R2D3D transfers 40-frame clips, S3D 32
        p = args.protocol = dict(p, dropout=0.5, test_crop=(0.4, 130 / 224, 0.6), **({} if args.data.startswith(
            "toy") else dict(frames=40 if trunk == "r2d3d_18" else 32, crop=128, short_side=224, crop_scale=(area, 1.0),
                             ratio=(1.0, 1.0), flip=True, jitter=(b, 0.0, s, 0.5))))  # square crops, hue +-180°
    elif task_key == "arrow":
        spec = p.get("arrow") or PROTOCOLS["ucf101"]["arrow"]
    elif task_key in p:
        spec = p[task_key]
    elif args.task in ("knn", "clusters"):  # no training: only frames, test clips and the batch size are used
        spec = p.get("finetune") or PROTOCOLS["ucf101"]["finetune"]
    elif all(name in args.overrides for name in ("lr", "epochs", "batch_size")):  # the user's own schedule
        spec = dict(p.get("finetune") or PROTOCOLS["ucf101"]["finetune"], milestones=[], wd=0.0)
    else:
        raise common.UserError(f"evaluate.py: --task {args.task} has no paper protocol for --data {args.data} (only "
                               f"{', '.join(d for d, q in PROTOCOLS.items() if task_key in q)}); give the schedule "
                               f"yourself: --lr, --epochs and --batch-size (Adam, optionally --milestones, --wd)")
    values = dict(lr=spec["lr"], epochs=spec["epochs"], batch_size=spec["batch"], wd=spec["wd"],
                  milestones=spec["milestones"], frames=p["frames"], test_clips=p["test_clips"])
    if args.task == "arrow-of-time":
        values.update(frames=8, test_clips=1)  # App. B.2.4: 8 frames, one clip at test
    if ch2_skeleton:  # whole sequences, zero-padded to 300 frames as the student saw them (ST-GCN's input)
        values.update(frames=300)
    if args.task == "detection":
        values.update(frames=RC3D_BUFFER)  # R-C3D's input buffer (Sec. 4.1)
    for name, value in values.items():
        setattr(args, name, args.overrides.get(name, value))
    args.optimizer, args.momentum = spec["optimizer"], spec["momentum"]
    args.eval_every = args.overrides.get("eval_every") or max(1, args.epochs // 10)
    args.eval_batch_size = max(1, 2 * args.batch_size // args.test_clips)
    if args.protocol_name == "ch2" and not ch2_skeleton:
        last_block(args.arch)  # an encoder without a last ResNet block: refused before anything is written
    if args.task == "repcount" and protocol_for(args.data).get("metric") != "mae":
        raise ValueError(f"evaluate.py: --task repcount needs a UCFRep-layout dataset (ucfrep, toy-ucfrep); "
                         f"--data is {args.data}")
    if args.val_fraction is None:  # few-shot: extra labelled data for selection would break the label budget
        args.val_fraction = 0.0 if args.task in ("fewshot", "detection") else 0.1
    args.bad_files = os.path.join(args.out_dir, "bad_files.txt")


def resolve_args(args):
    """Arch from the checkpoint's meta, toy data by modality, the run folder, then the protocol."""
    if (args.task == "crossdomain") != (args.target is not None) or (args.calibrate and args.target is None):
        raise common.UserError(f"evaluate.py: expected --target (and --calibrate) with --task crossdomain only, "
                               f"found --task {args.task}, --target {args.target}, --calibrate {args.calibrate}")
    if args.data_fraction != 1.0:
        raise ValueError("evaluate.py: --data-fraction is for pretraining scripts; use --label-fraction (stratified "
                         "labelled subset, --task fewshot) or --per-class here")
    if args.protocol_name == "ch2" and args.task != "fewshot":
        raise common.UserError(f"evaluate.py: --protocol ch2 is the thesis Ch. 2 few-shot finetuning; use it with "
                               f"--task fewshot, not --task {args.task}")
    tasks = {"coclr": ("linear", "finetune"), "phlvc": ("finetune", "crossdomain")}.get(args.protocol_name)
    if tasks and args.task not in tasks:
        raise common.UserError(f"evaluate.py: --protocol {args.protocol_name}: expected --task {' or '.join(tasks)}, "
                               f"found {args.task}")
    args.overrides = {name: getattr(args, name) for name in ("lr", "epochs", "batch_size", "wd", "milestones",
                                                             "frames", "test_clips", "eval_every")
                      if getattr(args, name) is not None}
    if args.task == "fusion":
        vars(args).update(lr=args.lr or 1e-3, epochs=args.epochs or 100, batch_size=args.batch_size or 256, wd=0.0,
                          milestones=[], out_dir=args.out_dir or os.path.join("runs", "evaluate-fusion"),
                          data="saved logits")
        return args
    meta = checkpoint_meta(args.weights, args.trust_checkpoint)
    args.arch = args.arch or meta.get("arch")
    if args.data == "toy":
        args.data = ("toy-skeleton" if args.arch in SKELETON_ARCHS else "toy-ucfrep" if args.task == "repcount" else
                     "toy-paired-target" if meta.get("modality") in ("depth", "flow") else "toy-motion")
    if args.arch is None:
        skeleton = protocol_for(args.data)["modality"] == "skeleton"
        args.arch = "tiny3d" if args.data in ("toy-motion", "toy-ucfrep") else "bigru" if skeleton else "r2plus1d_18"
    args.options = encoder_options(args.arch, args.arch_options, meta, args.data)
    check_modality(args, meta)
    video_pose = args.concat == "skelemotion_cnn" and args.data.startswith(POSE_VIDEO_SETS)  # P-HLVC Sec. 7.3
    if args.concat and args.arch not in SKELETON_ARCHS and not video_pose:
        raise ValueError("evaluate.py: --concat combines two skeleton encoders (App. A.4), or a video encoder and "
                         f"skelemotion_cnn on {' / '.join(POSE_VIDEO_SETS)} poses; --arch is {args.arch}")
    if args.concat and "skelemotion_cnn" in (args.arch, args.concat) and not video_pose:
        raise ValueError("evaluate.py: --concat feeds both encoders the same (C, T, V, M) skeletons; skelemotion_cnn "
                         "takes SkeleMotion images (concatenated only beside a video encoder on video + pose data)")
    args.seeds = args.seeds or [args.seed]
    if args.out_dir is None:  # one folder per weights FILE: two files of one run folder must not share results
        args.out_dir = os.path.join("runs", f"evaluate-{args.task}-{args.data}-{weights_tag(args.weights)}")
    if args.task != "severe":
        apply_protocol(args)
        if protocol_for(args.data).get("modality") == "depth" and meta.get("modality") in ("depth", "flow", "rgb"):
            modality = {"rgb": "video"}.get(meta["modality"], meta["modality"])  # paired sets: the net's input
            args.protocol = dict(args.protocol, modality=modality)
        elif (args.modality or meta.get("modality")) == "flow":  # vicc.py flow streams
            args.protocol = dict(args.protocol, modality="flow")
    else:  # each column applies its own protocol; the batch size here only satisfies common.setup's check
        args.protocol, args.bad_files = protocol_for(args.data), os.path.join(args.out_dir, "bad_files.txt")
        args.batch_size = args.batch_size or 32
    if input_keys(args) == ("video", "pose") and args.task not in ("finetune", "linear", "fewshot", "crossdomain"):
        raise common.UserError(f"evaluate.py: the P-HLVC pose stream (skelemotion_cnn on {args.data}) feeds a "
                               f"classifier: expected --task finetune, linear, fewshot or crossdomain, found "
                               f"{args.task}")
    if "skelemotion_cnn" in (args.arch, args.concat):  # its linear1 is sized for `frames` image columns: the crop
        options = args.options if args.arch == "skelemotion_cnn" else encoder_options(  # follows the CNN
            args.concat, args.concat_options, checkpoint_meta(args.concat_weights, args.trust_checkpoint), args.data)
        expected = options.get("frames", inspect.signature(common.SkeleMotionCNN).parameters["frames"].default)
        if args.overrides.get("frames", expected) != expected:
            raise ValueError(f"evaluate.py: --arch skelemotion_cnn expects SkeleMotion images of {expected} frames "
                             f"(its 'frames' option, from --arch-options or the checkpoint's meta; P-HLVC: 32) but "
                             f"--frames is {args.frames}; drop --frames, or build the CNN for {args.frames} frames "
                             f"with --arch-options '{{\"frames\": {args.frames}}}' (then weights must match)")
        args.frames = expected
    return args


def check_modality(args, meta):
    """Video encoders on video data, skeleton encoders on skeleton data: by --arch and by the modality the
    weights were pretrained on (meta['modality'] of our backbone.pth: rgb / flow / depth / skeleton)."""
    pose = args.arch == "skelemotion_cnn" and args.data.startswith(POSE_VIDEO_SETS)  # P-HLVC's pose stream alone
    data = "skeleton" if pose or protocol_for(args.data)["modality"] == "skeleton" else "video"  # depth, flow: 3-D
    arch = "skeleton" if args.arch in SKELETON_ARCHS else "video"
    if arch != data:
        raise common.UserError(f"evaluate.py: --arch {args.arch} is a {arch} encoder but --data {args.data} is "
                               f"{data} data; use a {data} encoder (or {arch} data)")
    pretrained = meta.get("modality")
    if pretrained and {"rgb": "video", "flow": "video", "depth": "video"}.get(pretrained, pretrained) != data:
        raise common.UserError(f"evaluate.py: --weights {args.weights} holds a backbone pretrained on {pretrained} "
                               f"(its meta['modality']) but --data {args.data} is {data} data")


def weights_tag(weights):
    """Folder-name tag of --weights: parent folder + file name + a hash of the absolute path (runs/a/backbone.pth
    and runs/a/checkpoint.pth, or two runs' backbone.pth, get different folders)."""
    if weights in ("none", "kinetics400"):
        return "random" if weights == "none" else weights
    path = os.path.abspath(weights)
    name = f"{os.path.basename(os.path.dirname(path))}-{os.path.splitext(os.path.basename(path))[0]}"
    return f"{re.sub(r'[^A-Za-z0-9_.-]+', '-', name)}-{hashlib.sha1(path.encode()).hexdigest()[:6]}"


# What makes two evaluations the same (a rerun may resume or reuse the other's results); --max-steps, hardware and
# logging flags may change between a run and its resume. Few-shot seeds run in their own seed_<s> folders.
IDENTITY_FLAGS = ("arch", "options", "weights_prefix", "concat", "concat_options", "concat_prefix", "frames",
                  "test_clips", "lr", "epochs", "batch_size", "wd", "milestones", "optimizer", "momentum", "lr_gamma",
                  "schedule", "warmup_epochs", "eval_every", "select_on_test", "val_fraction", "per_class",
                  "label_fraction", "num_examples", "subset_seed", "no_center", "center_features", "num_clusters",
                  "cluster_source", "rc_sample_duration", "rc_states", "protocol_name", "seed", "calibrate")


def run_identity(args):
    """The identity of an evaluation: task, data, weights (absolute path + SHA-256 of the content) and protocol."""
    weights = {}
    for flag in ("weights", "concat_weights"):
        path = getattr(args, flag, "none")
        if path not in ("none", "kinetics400", None) and os.path.isfile(path):
            with open(path, "rb") as f:
                weights[flag] = {"path": os.path.abspath(path), "sha256": hashlib.file_digest(f, "sha256").hexdigest()}
        elif path not in ("none", None):
            weights[flag] = {"path": path}
    protocol = {k: getattr(args, k, None) for k in IDENTITY_FLAGS if not (k == "seed" and args.task == "fewshot")}
    identity = {"task": args.task, "data": args.data, "data_root": args.data_root and os.path.abspath(args.data_root),
                **weights, "protocol": protocol}
    if getattr(args, "target", None):  # --task crossdomain: the target set is part of what is measured
        identity.update(target=args.target, target_root=args.target_root, class_map=args.class_map)
    return json.loads(json.dumps(identity))  # tuples -> lists, as read back


def check_run_identity(args, identity):
    """Refuse to resume or reuse a run folder that holds another evaluation (issue: a second weights file of one
    folder got the first file's results). Reads only; main_worker writes identity.json once the run starts."""
    path = os.path.join(args.out_dir, "identity.json")
    if args.resume == "none" or not os.path.isdir(args.out_dir):
        return
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        flat = lambda d: {**{k: v for k, v in d.items() if k != "protocol"}, **d.get("protocol", {})}  # noqa: E731
        old, new = flat(saved), flat(identity)
        differ = {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)}
        if differ:
            raise common.UserError(f"evaluate.py: --out-dir {args.out_dir} holds another evaluation (saved vs now: "
                                   f"{differ}); choose another --out-dir, or --resume none to start afresh there")
        return
    earlier = [name for name in ("checkpoint.pth", "best.pth", "selection.json", "result.json", "logits.pth")
               if os.path.exists(os.path.join(args.out_dir, name))]
    earlier += [entry for entry in os.listdir(args.out_dir) if os.path.isdir(os.path.join(args.out_dir, entry))]
    if earlier:
        raise common.UserError(f"evaluate.py: --out-dir {args.out_dir} holds an earlier run ({', '.join(earlier[:4])})"
                               f" without identity.json, so it cannot be checked to be this evaluation; choose "
                               f"another --out-dir, or --resume none to start afresh there")


def describe_protocol(args, source, sizes, num_classes):
    """The exact protocol of a run, printed at start and stored in result.json."""
    p = args.protocol
    features_only = args.task in ("knn", "clusters")
    if p["modality"] == "skeleton":
        skelemotion = args.arch == "skelemotion_cnn"
        inputs = (("" if args.no_center else "centred on body 0's spine joint; ") + (
                  f"whole sequences, the first {args.frames} frames, zero-padded, no augmentation" if
                  args.protocol_name == "ch2" else
                  f"crops resampled to {args.frames + 1 if skelemotion else args.frames} frames: " +
                  ("" if features_only else "random, ratio U(0.5, 1) (train); ") + "centred, ratio 0.95 (test)" +
                  (f"; body 0 as a SkeleMotion image (6, {args.frames}, 49), tau 1" if skelemotion else "")))
    elif features_only:
        inputs = (f"{p['modality']} clips of {args.frames} frames at stride {p['stride']}: {args.test_clips} "
                  f"uniformly spaced clips per video, short side {p['short_side']} + centre crop {p['crop']}")
    elif args.task == "arrow-of-time":
        inputs = (f"{args.frames} frames spread linearly over the whole video (stride = length // {args.frames}), "
                  f"random offset (train) / centred (test), {p['crop']}x{p['crop']} centre crops, no augmentation; "
                  f"every test video scored forward and reversed")
    else:
        train_aug = (f"RandomResizedCrop (scale {p['crop_scale'][0]}-{p['crop_scale'][1]}"
                     + (", square)" if p.get("ratio") == (1.0, 1.0) else ")") + (" + flip" if p["flip"] else "")
                     + (f" + colour jitter {p['jitter']}" if p["jitter"] else ""))
        inputs = (f"{p['modality']} clips of {args.frames} frames at stride {p['stride']}, {p['crop']}x{p['crop']} "
                  f"crops; train: 1 random clip, {train_aug}; test: " + (
                      f"{args.test_clips} clips at random positions, per clip a centre square of 130/224 of the short "
                      f"side (p 0.4) or a random square of >= 60% of the area -> {p['crop']}²" if p.get("test_crop")
                      else (
                          f"{args.test_clips} uniformly spaced clips" if args.protocol_name != "ch2" else
                          f"ALL frames // {args.frames} consecutive clips" if protocol_for(args.data)["modality"] ==
                          "depth" else f"{args.test_clips} uniformly spaced clips (the thesis: all clips)") +
                      f", short side {p['short_side']} + centre crop") + ", "
                  + ("sigmoid max-pooled" if args.task == "multilabel" else "softmax averaged"))
    lines = [f"protocol: --task {args.task} on {args.data} ({num_classes} classes), backbone {args.arch} "
             f"{args.options or ''}" + (f" + {args.concat}" if args.concat else ""), f"  weights: {source}",
             f"  input: {inputs}"]
    if input_keys(args) == ("video", "pose"):
        alone = ", the classifier's only input" if args.arch == "skelemotion_cnn" else ", features concatenated"
        lines.append(f"  pose: per clip the best-scored track of {args.frames + 1} converted AlphaPose poses as a "
                     f"SkeleMotion image (6, {args.frames}, 49), unaugmented{alone}")
    if features_only:
        lines += [f"  samples: gallery (train) {sizes['train']} / queries (test) {sizes['test']}"
                  if args.task == "knn" else f"  samples: test {sizes['test']}",
                  "  features: backbone output averaged over the clips, eval mode, no augmentation"
                  + (", each set mean-centred" if args.center_features else "") + ", L2-normalised"
                  + (f"; 1-NN, R@k and weighted {KNN_K}-NN (T {KNN_T})" if args.task == "knn" else "")]
        return "\n".join(lines)
    lines.append(f"  samples: train {sizes['train']} / validation {sizes['val']} / test {sizes['test']} (test = " + (
        f"{args.target}'s videos of the mapped classes, --class-map {args.class_map})" if args.target else
        "the dataset's official evaluation split)"))
    if args.per_class or args.label_fraction or args.num_examples:
        budget = (f"{args.per_class} per class" if args.per_class else f"{args.label_fraction:.0%} of each class"
                  if args.label_fraction else f"ceil({args.num_examples} / {num_classes}) per class")
        lines.append(f"  labels: {budget}, subset seed {args.subset_seed}")
    head = ("frozen backbone in eval mode + new linear classifier" + (" on L2-normalised features + BN (--protocol "
            "coclr)" if args.protocol_name == "coclr" else "") if args.task == "linear" else
            "whole network and a new linear head trained (--protocol ch2, skeleton student, thesis Sec. 2.4.3)"
            if args.protocol_name == "ch2" and p["modality"] == "skeleton" else
            f"only the new linear head and the backbone's last block ({last_block(args.arch)[0]}) trained, the rest "
            f"frozen in eval mode (--protocol ch2, thesis Sec. 2.4.3)" if args.protocol_name == "ch2" else
            f"whole network trained, new " + ("dropout-ReLU-linear" if args.protocol_name == "phlvc" else "linear")
            + f" head (dropout {args.protocol['dropout']})")
    lines += [f"  model: {head}",
              f"  optimisation: {args.optimizer} lr {args.lr} (momentum {args.momentum} for sgd) wd {args.wd}, "
              f"global batch {args.batch_size}, {args.epochs} epochs, lr x{args.lr_gamma} at epochs "
              f"{args.milestones}" + (f", --max-steps {args.max_steps}" if args.max_steps else ""),
              f"  selection: {selection_text(args)}"]
    if args.calibrate:
        lines.append(f"  calibration: {args.calibrate} epochs on Sinkhorn-balanced (eps 0.05) pseudo-labels of the "
                     f"{args.target} test videos (our reading; transductive), last epoch tested")
    return "\n".join(lines)


def selection_text(args, chosen="selected"):
    """Which checkpoint is tested (the protocol's 'selection' line)."""
    if args.select_on_test:
        return "checkpoint selected on the TEST split (--select-on-test, as the authors' code; optimistic)"
    if args.task == "crossdomain":
        return f"checkpoint {chosen} on {args.data}'s official val split, every {args.eval_every} epochs"
    if args.val_fraction > 0:
        return (f"checkpoint {chosen} on a {args.val_fraction:.0%} stratified validation split of the training set "
                f"(seed {args.seed}), every {args.eval_every} epochs")
    return "no checkpoint selection: the last epoch is tested"


def write_result(args, result):
    """result.json (everything) and result.txt (a readable table) in the run folder."""
    summary = {"task": args.task, "data": args.data, "arch": getattr(args, "arch", None),
               "weights": getattr(args, "weights", None), "command": " ".join(sys.argv),
               "git_commit": common.git_commit(), **result}
    common.write_json_atomic(os.path.join(args.out_dir, "result.json"), summary)
    lines = [f"evaluate.py --task {args.task} --data {args.data}"]
    if "protocol" in result:
        lines.append(result["protocol"])
    elif args.task == "fusion":
        lines.append(f"inputs: {' '.join(result['inputs'])}; alpha {result['alpha']}")
    else:
        lines.append(f"backbone {args.arch}, weights {args.weights}")
    if "table" in result:
        lines.append(result["table"])
    lines += [f"{name:<24}{value:10.3f}" for name, value in result["metrics"].items()]
    lines += [f"note: {name}: {note}" for name, note in result.get("notes", {}).items()]
    text = "\n".join(lines)
    with open(os.path.join(args.out_dir, "result.txt"), "w") as f:
        f.write(text + "\n")
    return text


def main_worker(args):
    """One process: set up the run, dispatch --task, write result.json / result.txt. Returns the result dict."""
    run = common.setup(args, "evaluate")
    if run.is_main and args.task != "fusion":
        common.write_json_atomic(os.path.join(args.out_dir, "identity.json"), args.identity)
    task = {"fusion": fusion_task, "knn": knn_task, "clusters": clusters_task, "fewshot": fewshot_task,
            "repcount": repcount_task, "detection": detection_task, "severe": severe_task}.get(args.task)
    result = task(run, args) if task else classification_task(run, args, arrow=args.task == "arrow-of-time")
    if run.is_main:
        print(write_result(args, result), flush=True)
    return result


def main(argv=None):
    """Parse and resolve the flags, check the run folder's identity, launch (one process per GPU)."""
    args = resolve_args(get_parser().parse_args(argv))
    if args.task != "fusion":  # fusion resumes nothing: it recomputes from its --logits files every time
        args.identity = run_identity(args)
        check_run_identity(args, args.identity)
    return common.launch(main_worker, args)


if __name__ == "__main__":
    main()
