"""Shared plumbing for the video-efficient representation-learning scripts.

Every method script (`tubelet_contrast.py`, `skeleton_contrast.py`, ...) imports this one file for the things
that are *not* the method: distributed helpers, flags, video decoding and datasets, backbones and checkpoint
interchange, and the generic CUDA-aware training loop. Method logic (losses, queues, augmentations specific to
a method) never lives here. Copying a script to start a new idea means copying `common.py` with it.

Sections (search for the banners):
    DISTRIBUTED      world size / rank helpers that are the identity at world size 1, launch of 1..N processes
    FLAGS            the parent argparse parser every script extends
    VIDEO DECODING   one function to read frames from a file or a frame folder (decord / PyAV / torchcodec)
    CLIP SAMPLING    random, uniform, sliding-window and consecutive clip indices
    TRANSFORMS       batched torch transforms on uint8 clips (CPU workers or GPU)
    DATASETS         every dataset format of the papers, bad-data handling, `check-data`
    TOY DATASETS     real files in real formats, written once under --data-root
    BACKBONES        video and skeleton networks (`build_backbone`)
    CHECKPOINTS      loading weights from our and the authors' formats (`load_backbone_weights`)
    TRAINING LOOP    seeding, AMP, LR schedules, atomic checkpoints, auto-resume, logs, kNN monitor, `fit`
"""
import argparse
import os
import sys

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


# ==================================================================================================== DISTRIBUTED


# ==================================================================================================== FLAGS


# ==================================================================================================== VIDEO DECODING


# ==================================================================================================== CLIP SAMPLING


# ==================================================================================================== TRANSFORMS


# ==================================================================================================== DATASETS


# ==================================================================================================== TOY DATASETS


# ==================================================================================================== BACKBONES


# ==================================================================================================== CHECKPOINTS


# ==================================================================================================== TRAINING LOOP


if __name__ == "__main__":
    pass
