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
import json
import math
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
import torchvision


# ==================================================================================================== DISTRIBUTED
def is_distributed():
    return dist.is_available() and dist.is_initialized()


def get_world_size():
    return dist.get_world_size() if is_distributed() else 1


def get_rank():
    return dist.get_rank() if is_distributed() else 0


def is_main_process():
    return get_rank() == 0


@torch.no_grad()
def all_gather_nograd(x):
    """Concatenate `x` from every process along dim 0 (no gradient). The identity at world size 1."""
    if get_world_size() == 1:
        return x
    gathered = [torch.empty_like(x) for _ in range(get_world_size())]
    dist.all_gather(gathered, x.contiguous())
    return torch.cat(gathered, dim=0)


@torch.no_grad()
def all_reduce(x, op="sum"):
    """Sum or mean of `x` over processes, returned as a new tensor. The identity at world size 1."""
    if op not in ("sum", "mean"):
        raise ValueError(f"all_reduce: op must be 'sum' or 'mean', got {op!r}")
    if get_world_size() == 1:
        return x
    x = x.clone()
    dist.all_reduce(x)
    return x / get_world_size() if op == "mean" else x


def all_gather_objects(obj):
    """A list with `obj` from every process (pickled; for small things such as RNG states)."""
    if get_world_size() == 1:
        return [obj]
    gathered = [None] * get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def _find_free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launched_by_torchrun():
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"))


def resolve_device_and_processes(args):
    """Returns ("cuda" | "cpu", number of local processes) from --device and --gpus, with clear errors."""
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    device = args.device
    if device == "auto":
        device = "cuda" if visible > 0 and args.gpus != 0 else "cpu"
        if device == "cpu" and args.gpus:
            raise RuntimeError(f"--gpus {args.gpus} asks for more GPUs than are visible: 0. "
                               f"For {args.gpus} CPU processes (gloo) pass --device cpu --gpus {args.gpus}")
    if device == "cuda" and visible == 0:
        raise RuntimeError("--device cuda was requested but no CUDA GPU is visible (torch.cuda.device_count() == 0); "
                           "use --device cpu or --gpus 0")
    if device == "cuda":
        gpus = visible if args.gpus is None else args.gpus
        if gpus > visible:
            raise RuntimeError(f"--gpus {gpus} asks for more GPUs than are visible: {visible} "
                               f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})")
        return device, max(gpus, 1)
    # On CPU, --gpus N > 1 means N gloo processes: the distributed path, testable without GPUs.
    return device, max(args.gpus or 1, 1)


def launch(main_worker, args):
    """Run `main_worker(args)` in 1..N processes: under torchrun, as N spawned local workers, or in-process.

    torchrun (any number of nodes): every process already runs this script; `setup` reads its environment.
    `--gpus N > 1` without torchrun: spawn N local workers on a free port (Barlow Twins' pattern).
    Otherwise: run in this process, without a process group."""
    if _launched_by_torchrun():
        return main_worker(args)
    device, nprocs = resolve_device_and_processes(args)
    if nprocs == 1:
        return main_worker(args)
    port = _find_free_port()
    print(f"launch: spawning {nprocs} {device.upper()} worker processes on 127.0.0.1:{port}", flush=True)
    mp.spawn(_spawned_worker, args=(main_worker, args, nprocs, port), nprocs=nprocs, join=True)


def _spawned_worker(local_rank, main_worker, args, world_size, port):
    os.environ.update(RANK=str(local_rank), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(world_size),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    main_worker(args)



# ==================================================================================================== FLAGS
def get_common_parser():
    """The flags every script shares. A script extends it:

        parser = argparse.ArgumentParser(description=__doc__, parents=[common.get_common_parser()])
        group = parser.add_argument_group("method")  # the method's own flags
        parser.set_defaults(lr=0.01, epochs=100)     # the method's paper defaults
    """
    parser = argparse.ArgumentParser(add_help=False, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = parser.add_argument_group("data")
    g.add_argument("--data", default="toy", help="dataset name (see README 'Datasets'); 'toy' = this script's "
                   "embedded toy set, written to --data-root on first use")
    g.add_argument("--data-root", default=None, help="dataset folder (default: data/<dataset name>)")
    g.add_argument("--decoder", default="auto", choices=["auto", "decord", "pyav", "torchcodec"],
                   help="video decoder; auto = decord where installed, else PyAV")
    g.add_argument("--data-fraction", type=float, default=1.0,
                   help="stratified fraction of the training set, drawn with --seed (thesis Fig. 5.6 uses 0.05-0.5)")
    g.add_argument("--strict-data", action="store_true",
                   help="fail on an unreadable file instead of skipping it (skips are listed in bad_files.txt)")
    g.add_argument("--workers", type=int, default=4, help="data-loading worker processes PER process; "
                   "video decoding is usually the bottleneck: use 6-10 per GPU where cores allow")

    g = parser.add_argument_group("hardware")
    g.add_argument("--gpus", type=int, default=None, help="number of local GPUs (processes); 0 = CPU; "
                   "default: all visible GPUs, else CPU. With --device cpu, N>1 runs N gloo processes")
    g.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    g.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "off"],
                   help="mixed precision; auto = bf16 on CUDA that supports it, fp16 + GradScaler on older CUDA, "
                   "off on CPU")
    g.add_argument("--channels-last", action="store_true", help="channels_last_3d memory format (faster convs)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model (slow first steps)")
    g.add_argument("--sync-bn", action="store_true",
                   help="SyncBatchNorm across processes (tubelet-contrast pretrains with it: 8 clips/GPU)")
    g.add_argument("--deterministic", action="store_true",
                   help="deterministic algorithms and cuDNN (slower); seeds are always set")

    g = parser.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=100, help="epochs (the scripts set their paper's value)")
    g.add_argument("--max-steps", type=int, default=None,
                   help="stop after this many optimizer steps (smoke runs); the LR schedule still spans --epochs")
    g.add_argument("--batch-size", type=int, default=32,
                   help="GLOBAL batch size over all processes; each process gets batch-size / world-size")
    g.add_argument("--lr", type=float, default=0.01, help="base learning rate for --batch-size (not rescaled)")
    g.add_argument("--wd", type=float, default=1e-4, help="weight decay")
    g.add_argument("--schedule", default="cosine", choices=["cosine", "multistep", "constant"],
                   help="per-step learning-rate schedule")
    g.add_argument("--warmup-epochs", type=float, default=0.0, help="linear warm-up from 0 (cosine schedule)")
    g.add_argument("--final-lr", type=float, default=0.0, help="learning rate at the end of the cosine schedule")
    g.add_argument("--milestones", type=float, nargs="*", default=[],
                   help="epochs at which the multistep schedule multiplies the LR by --lr-gamma")
    g.add_argument("--lr-gamma", type=float, default=0.1)
    g.add_argument("--clip-grad", type=float, default=None, help="clip the global gradient norm to this value")
    g.add_argument("--seed", type=int, default=0, help="seed; process r uses seed + r (weights are synchronised)")

    g = parser.add_argument_group("run folder")
    g.add_argument("--out-dir", default=None, help="run folder (default: runs/<script>-<data>); "
                   "rerunning with the same folder resumes")
    g.add_argument("--resume", default="auto",
                   help="auto = resume from <out-dir>/checkpoint.pth if it exists; none = start afresh; or a path")
    g.add_argument("--log-every", type=int, default=20, help="optimizer steps between metrics.jsonl lines")
    g.add_argument("--ckpt-every", type=int, default=500,
                   help="optimizer steps between checkpoints (also at every epoch end and at the end)")
    g.add_argument("--keep-every", type=int, default=0,
                   help="keep a copy checkpoint_<epoch>.pth every N epochs (0 = never)")
    g.add_argument("--knn-every", type=int, default=1,
                   help="epochs between online kNN monitors (when the script has labelled data; 0 = off)")
    return parser



# ==================================================================================================== VIDEO DECODING


# ==================================================================================================== CLIP SAMPLING


# ==================================================================================================== TRANSFORMS


# ==================================================================================================== DATASETS


# ==================================================================================================== TOY DATASETS


# ==================================================================================================== BACKBONES
# Video input (N, C, T, H, W) float, normalised; skeleton input (N, C, T, V, M) float. Every backbone has
# `feature_dim`; forward(x) -> (N, feature_dim); forward(x, return_map=True) -> the unpooled feature map.
# Submodule names mirror the source implementation (torchvision, 2s-AGCN, ST-GCN, skeleton-contrast, Hara's
# 3D-ResNets, P-HLVC) so their state dicts load without renaming.

TORCHVISION_VIDEO_WEIGHTS = {  # arch -> (torchvision weights enum name, file name in the torch hub cache)
    "r2plus1d_18": ("R2Plus1D_18_Weights", "r2plus1d_18-91a641e6.pth"),
    "r3d_18": ("R3D_18_Weights", "r3d_18-b3b3357e.pth"),
    "mc3_18": ("MC3_18_Weights", "mc3_18-a90a0ba3.pth"),
    "s3d": ("S3D_Weights", "s3d-d76dad2f.pth"),
}


def set_bn_eps(model, eps):
    """Set eps of every BatchNorm layer (tubelet-contrast pretrains with 1e-3, torchvision uses 1e-5)."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eps = eps
    return model


def count_parameters(model):
    return sum(p.numel() for p in model.parameters())


def _pool_video_map(x):
    return x.mean(dim=(2, 3, 4))  # (N, C, T, H, W) -> (N, C)


def _torchvision_kinetics_state_dict(arch):
    """Download (or read from the torch hub cache) torchvision's Kinetics-400 weights for `arch`."""
    enum_name, file_name = TORCHVISION_VIDEO_WEIGHTS[arch]
    weights = getattr(torchvision.models.video, enum_name).KINETICS400_V1
    try:
        return weights.get_state_dict(progress=False)
    except Exception as e:  # no internet: urllib.error.URLError, socket errors, ...
        cache = os.path.join(torch.hub.get_dir(), "checkpoints", file_name)
        raise RuntimeError(
            f"common.py: cannot download torchvision Kinetics-400 weights for {arch} from {weights.url} ({e}). "
            f"Offline: copy that file to {cache}, or pass the local file, e.g. "
            f"build_backbone('{arch}', pretrained='/path/to/{file_name}')") from e


class VideoResNet(nn.Module):
    """torchvision's R(2+1)D-18 / R3D-18 / MC3-18 without the fc; keys stem.*, layer1..4.* as in torchvision.

    Tubelet-contrast (CtP code) builds the same topology; its BN eps is 1e-3 (pass bn_eps=1e-3).
    16x112x112 input -> map (512, 2, 7, 7).
    """

    def __init__(self, arch="r2plus1d_18", bn_eps=1e-5):
        super().__init__()
        net = getattr(torchvision.models.video, arch)(weights=None)
        self.stem, self.layer1, self.layer2, self.layer3, self.layer4 = (
            net.stem, net.layer1, net.layer2, net.layer3, net.layer4)
        self.feature_dim = 512
        set_bn_eps(self, bn_eps)

    def forward(self, x, return_map=False):
        x = self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))  # (N, 512, T/8, H/16, W/16)
        return x if return_map else _pool_video_map(x)


class S3D(nn.Module):
    """S3D (Xie et al. 2018) as used by CoCLR / ViCC / P-HLVC, with torchvision's module layout (`features.*`).

    torchvision's S3D pools with a fixed AvgPool3d(2, 7, 7) and fails below 224 px; we average the map
    adaptively, so 32x128x128 works (map 1024 x 4 x 4 x 4). BN eps: CoCLR/ViCC use PyTorch's default (1e-5),
    torchvision and P-HLVC (kylemin S3D) 1e-3 with momentum 1e-3 (`bn_eps`, `bn_momentum`).
    CoCLR checkpoints name the same layers `base.N.conv_s/bn_s/conv_t/bn_t/conv/bn` (renamed on loading).
    """

    def __init__(self, bn_eps=1e-5, bn_momentum=0.1):
        super().__init__()
        net = torchvision.models.video.S3D(norm_layer=lambda c: nn.BatchNorm3d(c, eps=bn_eps, momentum=bn_momentum))
        self.features = net.features
        self.feature_dim = 1024
        for m in self.modules():  # CoCLR backbone/s3dg.py: conv weights N(0, 0.01)
            if isinstance(m, nn.Conv3d):
                nn.init.normal_(m.weight, 0.0, 0.01)

    def forward(self, x, return_map=False):
        x = self.features(x)  # (N, 1024, T/8, H/32, W/32)
        return x if return_map else _pool_video_map(x)


def _conv3d_bn_relu(cin, cout, kernel, stride=1, padding=0, bn_eps=1e-3):
    return nn.Sequential(nn.Conv3d(cin, cout, kernel, stride, padding, bias=False),
                         nn.BatchNorm3d(cout, eps=bn_eps), nn.ReLU(inplace=True))


class InceptionBlock3D(nn.Module):
    """I3D Inception block (full 3x3x3 convs); branch names as torchvision's SepInceptionBlock3D."""

    def __init__(self, cin, b0, b1a, b1b, b2a, b2b, b3, bn_eps=1e-3):
        super().__init__()
        self.branch0 = _conv3d_bn_relu(cin, b0, 1, bn_eps=bn_eps)
        self.branch1 = nn.Sequential(_conv3d_bn_relu(cin, b1a, 1, bn_eps=bn_eps),
                                     _conv3d_bn_relu(b1a, b1b, 3, padding=1, bn_eps=bn_eps))
        self.branch2 = nn.Sequential(_conv3d_bn_relu(cin, b2a, 1, bn_eps=bn_eps),
                                     _conv3d_bn_relu(b2a, b2b, 3, padding=1, bn_eps=bn_eps))
        self.branch3 = nn.Sequential(nn.MaxPool3d(3, stride=1, padding=1), _conv3d_bn_relu(cin, b3, 1, bn_eps=bn_eps))

    def forward(self, x):
        return torch.cat([self.branch0(x), self.branch1(x), self.branch2(x), self.branch3(x)], dim=1)


class I3D(nn.Module):
    """Inception-I3D (Carreira & Zisserman 2017; tubelet-contrast App. C.2, thesis) without logits.

    Same widths and pooling as S3D but full k x k x k convolutions. Tubelet-contrast's I3D
    (pyvrl/models/backbones/i3d.py, the hassony2 port: conv3d_1a_7x7, mixed_3b.branch_1.0.conv3d, ...) is
    renamed on loading (I3D_RENAMES); BN eps 1e-5 as there. Deviation: symmetric padding instead of TF "SAME"
    padding, which pads one more on the bottom/right at the strided 7x7x7 conv and max-pools (same output sizes,
    features shifted by one position). 16x224x224 -> map 1024 x 2 x 7 x 7.
    """

    def __init__(self, in_channels=3, bn_eps=1e-5):
        super().__init__()
        e = dict(bn_eps=bn_eps)
        self.features = nn.Sequential(
            _conv3d_bn_relu(in_channels, 64, 7, stride=2, padding=3, **e),
            nn.MaxPool3d((1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1)),
            _conv3d_bn_relu(64, 64, 1, **e),
            _conv3d_bn_relu(64, 192, 3, padding=1, **e),
            nn.MaxPool3d((1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1)),
            InceptionBlock3D(192, 64, 96, 128, 16, 32, 32, **e),
            InceptionBlock3D(256, 128, 128, 192, 32, 96, 64, **e),
            nn.MaxPool3d(3, stride=2, padding=1),
            InceptionBlock3D(480, 192, 96, 208, 16, 48, 64, **e),
            InceptionBlock3D(512, 160, 112, 224, 24, 64, 64, **e),
            InceptionBlock3D(512, 128, 128, 256, 24, 64, 64, **e),
            InceptionBlock3D(512, 112, 144, 288, 32, 64, 64, **e),
            InceptionBlock3D(528, 256, 160, 320, 32, 128, 128, **e),
            nn.MaxPool3d(2, stride=2),
            InceptionBlock3D(832, 256, 160, 320, 32, 128, 128, **e),
            InceptionBlock3D(832, 384, 192, 384, 48, 128, 128, **e),
        )
        self.feature_dim = 1024

    def forward(self, x, return_map=False):
        x = self.features(x)  # (N, 1024, T/8, H/32, W/32)
        return x if return_map else _pool_video_map(x)


class BasicBlock3D(nn.Module):
    """ResNet basic block with a given conv kernel ((1,3,3) = 2D block of R2D3D, 3 = 3D block); names conv1/bn1."""
    expansion = 1

    def __init__(self, cin, planes, stride=1, downsample=None, kernel=3, cardinality=1, bn_eps=1e-5):
        super().__init__()
        pad = tuple(k // 2 for k in kernel) if isinstance(kernel, tuple) else kernel // 2
        self.conv1 = nn.Conv3d(cin, planes, kernel, stride, pad, bias=False)
        self.bn1 = nn.BatchNorm3d(planes, eps=bn_eps)
        self.conv2 = nn.Conv3d(planes, planes, kernel, 1, pad, bias=False)
        self.bn2 = nn.BatchNorm3d(planes, eps=bn_eps)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.final_relu = True

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out)) + identity
        return self.relu(out) if self.final_relu else out


class ResNeXtBottleneck3D(nn.Module):
    """Hara et al.'s ResNeXt bottleneck (expansion 2, grouped 3x3x3 conv, mid = cardinality * planes / 32)."""
    expansion = 2

    def __init__(self, cin, planes, stride=1, downsample=None, kernel=3, cardinality=32, bn_eps=1e-5):
        super().__init__()
        mid = cardinality * (planes // 32)
        self.conv1 = nn.Conv3d(cin, mid, 1, bias=False)
        self.bn1 = nn.BatchNorm3d(mid, eps=bn_eps)
        self.conv2 = nn.Conv3d(mid, mid, 3, stride, 1, groups=cardinality, bias=False)
        self.bn2 = nn.BatchNorm3d(mid, eps=bn_eps)
        self.conv3 = nn.Conv3d(mid, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm3d(planes * self.expansion, eps=bn_eps)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.final_relu = True

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out)) + identity
        return self.relu(out) if self.final_relu else out


class ResNet3D(nn.Module):
    """ResNet with stem conv1/bn1/maxpool and layer1..4 (Hara et al. 3D-ResNets key names, shortcut type B).

    Used for `resnet3d_18` (thesis Sec. 2.4.3 depth student, `in_channels` configurable), `resnext3d_101`
    (Sec. 2.4.3 Kinetics teacher, Hara's resnext-101-kinetics.pth layout) and `r2d3d_18` (DPC's ResNet-2D3D-18,
    TengdaHan/DPC backbone/resnet_2d3d.py: 1x7x7 stem, 2D blocks (1x3x3) in layer1-2 with spatial-only stride,
    3D blocks in layer3-4, layer4 narrowed to 256 channels and no ReLU after its last block).
    """

    def __init__(self, block, layers, in_channels=3, widths=(64, 128, 256, 512), cardinality=1,
                 stem_kernel=(7, 7, 7), block_kernels=(3, 3, 3, 3), temporal_strides=(1, 2, 2, 2), final_relu=True,
                 bn_eps=1e-5):
        super().__init__()
        self.conv1 = nn.Conv3d(in_channels, 64, stem_kernel, (1, 2, 2), tuple(k // 2 for k in stem_kernel),
                               bias=False)
        self.bn1 = nn.BatchNorm3d(64, eps=bn_eps)
        self.relu = nn.ReLU(inplace=True)
        pool_t = 3 if stem_kernel[0] > 1 else 1
        self.maxpool = nn.MaxPool3d((pool_t, 3, 3), (2 if pool_t > 1 else 1, 2, 2), (pool_t // 2, 1, 1))
        cin = 64
        for i, (planes, n) in enumerate(zip(widths, layers)):
            stride = (temporal_strides[i], 1 if i == 0 else 2, 1 if i == 0 else 2)
            downsample = None
            if stride != (1, 1, 1) or cin != planes * block.expansion:
                downsample = nn.Sequential(nn.Conv3d(cin, planes * block.expansion, 1, stride, bias=False),
                                           nn.BatchNorm3d(planes * block.expansion, eps=bn_eps))
            blocks = [block(cin, planes, stride, downsample, block_kernels[i], cardinality, bn_eps)]
            cin = planes * block.expansion
            blocks += [block(cin, planes, 1, None, block_kernels[i], cardinality, bn_eps) for _ in range(n - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        blocks[-1].final_relu = final_relu
        self.feature_dim = cin
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x, return_map=False):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))  # (N, feature_dim, T', H/32, W/32)
        return x if return_map else _pool_video_map(x)


class Tiny3D(nn.Module):
    """A small 3D CNN for CPU smoke runs and tests (~0.3 M parameters at width 16; not from any paper).

    16x64x64 -> map (8*width, 4, 4, 4); 16x112x112 -> (8*width, 4, 7, 7).
    """

    def __init__(self, in_channels=3, width=16, bn_eps=1e-5):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            _conv3d_bn_relu(in_channels, w, 3, stride=(1, 2, 2), padding=1, bn_eps=bn_eps),
            _conv3d_bn_relu(w, 2 * w, 3, stride=2, padding=1, bn_eps=bn_eps),
            _conv3d_bn_relu(2 * w, 4 * w, 3, stride=2, padding=1, bn_eps=bn_eps),
            _conv3d_bn_relu(4 * w, 8 * w, 3, stride=(1, 2, 2), padding=1, bn_eps=bn_eps),
        )
        self.feature_dim = 8 * w

    def forward(self, x, return_map=False):
        x = self.features(x)  # (N, 8w, T/4, H/16, W/16)
        return x if return_map else _pool_video_map(x)


# ---------------------------------------------------------------------------------------------- skeleton graphs
# NTU RGB+D 25 joints (1-based pairs child -> parent toward the spine), 2s-AGCN graph/ntu_rgb_d.py, ST-GCN.
NTU25_INWARD = [(1, 2), (2, 21), (3, 21), (4, 3), (5, 21), (6, 5), (7, 6), (8, 7), (9, 21), (10, 9), (11, 10),
                (12, 11), (13, 1), (14, 13), (15, 14), (16, 15), (17, 1), (18, 17), (19, 18), (20, 19),
                (22, 23), (23, 8), (24, 25), (25, 12)]
NTU25_INWARD = [(i - 1, j - 1) for i, j in NTU25_INWARD]
# OpenPose COCO-18 (0-based), 2s-AGCN graph/kinetics.py, ST-GCN 'openpose' layout.
COCO18_INWARD = [(4, 3), (3, 2), (7, 6), (6, 5), (13, 12), (12, 11), (10, 9), (9, 8), (11, 5), (8, 2), (5, 1),
                 (2, 1), (0, 1), (15, 0), (14, 0), (17, 15), (16, 14)]
SKELETON_GRAPHS = {"ntu25": (25, NTU25_INWARD, 20), "coco18": (18, COCO18_INWARD, 1)}  # (V, edges, centre)


def _normalize_digraph(a):
    deg = a.sum(0)
    return a @ np.diag(np.where(deg > 0, 1.0 / np.maximum(deg, 1e-12), 0.0))  # column-normalised


def agcn_adjacency(layout="ntu25"):
    """2s-AGCN spatial graph (3, V, V): [identity, in-normalised inward, in-normalised outward]."""
    v, inward, _ = SKELETON_GRAPHS[layout]
    def edge2mat(edges):
        a = np.zeros((v, v))
        for i, j in edges:
            a[j, i] = 1
        return a
    outward = [(j, i) for i, j in inward]
    return np.stack([edge2mat([(i, i) for i in range(v)]), _normalize_digraph(edge2mat(inward)),
                     _normalize_digraph(edge2mat(outward))]).astype(np.float32)


def stgcn_adjacency(layout="ntu25"):
    """ST-GCN 'spatial' partition (max_hop 1) (3, V, V): self, same/farther from centre, nearer (Yan et al. 2018)."""
    v, inward, center = SKELETON_GRAPHS[layout]
    a = np.eye(v)
    for i, j in inward:
        a[i, j] = a[j, i] = 1
    hop = np.full((v, v), np.inf)
    hop[a > 0] = 1
    hop[np.eye(v) > 0] = 0
    # Distance to the centre as in st-gcn's get_adjacency: hop_dis[:, center] with max_hop = 1, i.e. infinite
    # for joints more than one hop away, so most limb edges compare inf == inf and fall in the root/close
    # partition. This is the original's behaviour (kept so that its checkpoints mean the same thing).
    dist = hop[:, center]
    norm = _normalize_digraph((hop <= 1).astype(np.float64))
    # net/utils/graph.py get_adjacency('spatial'): A = [hop-0 root, hop-1 root + close, hop-1 further]
    root, close, further = np.zeros((v, v)), np.zeros((v, v)), np.zeros((v, v))
    for i in range(v):
        for j in range(v):
            if hop[j, i] == 0:
                root[j, i] = norm[j, i]
            elif hop[j, i] == 1:
                if dist[j] >= dist[i]:
                    close[j, i] = norm[j, i]
                else:
                    further[j, i] = norm[j, i]
    return np.stack([root, close, further]).astype(np.float32)


# ------------------------------------------------------------------------------------ skeleton representations
def skeleton_to_sequence(x):
    """(N, C, T, V, M) -> (N, T, V*C*M): per frame joint-major, then xyz, then person (skeleton-contrast)."""
    n, c, t, v, m = x.shape
    return x.permute(0, 2, 3, 1, 4).reshape(n, t, v * c * m)


# SkeleMotion joint chaining (depth-first traversal, 49 entries). NTU-25: carloscaetano/skeleton-images
# ImgType.depth_first_traversal_skl_NTU (0-based). COCO-18: P-HLVC supp. Sec. 7.5 (OpenPose joint ids).
SKELEMOTION_ORDER = {
    "ntu25": [1, 20, 2, 3, 2, 20, 4, 5, 6, 7, 21, 22, 21, 7, 6, 5, 4, 20, 8, 9, 10, 11, 23, 24, 23, 11, 10, 9, 8,
              20, 1, 0, 12, 13, 14, 15, 14, 13, 12, 0, 16, 17, 18, 19, 18, 17, 16, 0, 1],
    "coco18": [8, 1, 11, 1, 0, 1, 1, 5, 5, 6, 6, 7, 7, 5, 7, 1, 6, 1, 1, 2, 2, 3, 3, 4, 4, 2, 4, 1, 3, 1, 1, 11,
               11, 12, 12, 13, 1, 8, 8, 9, 9, 10, 4, 0, 7, 4, 10, 13, 7],
}


def skelemotion_image(pose, layout="ntu25", tau=1, mag_threshold=0.004):
    """SkeleMotion image (Caetano et al. AVSS 2019) of one body, as P-HLVC feeds it: (6, T, 49) float32.

    pose: (C, T, V) with C = 3 (x, y, z) or 2 (x, y; z = 0 as in the OpenPose fork). A frame whose joints are
    all zero counts as absent; its column stays all zero. d_t = p_t - p_{t+tau} (zero when frame t+tau is absent
    or out of range).
    Channels 0-2: orientation atan2(dy,dx), atan2(dy,dz), atan2(dz,dx) in degrees mapped by the original
    `ImgType.normalize(v, -180, 180, 1, -1)`, which computes (v + 180) / 360, i.e. [0, 1] (not [-1, 1]);
    1.1 where the magnitude < mag_threshold * tau. Channels 3-5: magnitude ||d||_2 clipped to [0, 1], repeated
    3 times (a single temporal scale, as in the simplexsigil fork P-HLVC uses). No resizing to width 100.
    """
    pose = torch.as_tensor(pose, dtype=torch.float32)
    if pose.shape[0] == 2:
        pose = torch.cat([pose, torch.zeros_like(pose[:1])])
    order = SKELEMOTION_ORDER[layout]
    c, t, v = pose.shape
    present = pose.abs().sum(dim=(0, 2)) > 0  # (T,)
    d = torch.zeros(3, t, v)
    if t > tau:
        d[:, :-tau] = pose[:, :-tau] - pose[:, tau:]
        d[:, :-tau] *= (present[:-tau] & present[tau:]).float()[None, :, None]
    d = d[:, :, order]  # (3, T, 49)
    mag = d.norm(dim=0).clamp(0, 1)  # (T, 49)
    dx, dy, dz = d
    ori = torch.stack([torch.atan2(dy, dx), torch.atan2(dy, dz), torch.atan2(dz, dx)])
    ori = (torch.rad2deg(ori) + 180.0) / 360.0
    ori = torch.where(mag[None] < mag_threshold * tau, torch.full_like(ori, 1.1), ori)
    ori = ori * present.float()[None, :, None]  # frames without the body stay all-zero in the original
    return torch.cat([ori, mag[None].expand(3, -1, -1)])  # (6, T, 49): orientation first (P-HLVC loader)


# ---------------------------------------------------------------------------------------- skeleton backbones
class BiGRU(nn.Module):
    """Sequence encoder of thesis Sec. 3.4.2 (skeleton-contrast moco/GRU.py): 3-layer bidirectional GRU, 1024 units.

    Input (N, C, T, V, M) (flattened by `skeleton_to_sequence`) or (N, T, D). Output 2 * hidden (2048-d).
    stepwise=False (default, the paper's BiGRU): one call over the whole sequence; feature = [forward state
    after the last frame, backward state after the first frame] (the final hidden states h_n of the top layer;
    the per-step output at the last frame would give the backward direction only one frame of context).
    stepwise=True (the authors' code): the GRU is called once per time step with the carried hidden state and
    the top-layer output of the last call is returned. A length-1 call runs the "reverse" direction over that
    single step too, so both directions process frames in forward time order (two causal GRUs per layer with
    different weights); the backward direction never sees the sequence reversed, so the two modes give
    different features for the same weights. Checkpoints of the authors' code should be run with stepwise=True.
    """

    def __init__(self, input_dim=150, hidden=1024, layers=3, stepwise=False):
        super().__init__()
        self.gru = nn.GRU(input_dim, hidden, num_layers=layers, bidirectional=True, batch_first=True)
        self.hidden, self.layers, self.stepwise = hidden, layers, stepwise
        self.feature_dim = 2 * hidden
        for p in self.gru.parameters():  # xavier-uniform on 2-D weights (skeleton-contrast, reference notes 2.4)
            if p.dim() == 2:
                nn.init.xavier_uniform_(p)

    def forward(self, x, return_map=False):
        if x.dim() == 5:
            x = skeleton_to_sequence(x)  # (N, T, V*C*M)
        if self.stepwise:
            h, outs = None, []
            for t in range(x.shape[1]):
                out, h = self.gru(x[:, t:t + 1], h)  # out (N, 1, 2H)
                outs.append(out)
            seq = torch.cat(outs, dim=1)  # (N, T, 2H)
            feat = seq[:, -1]
        else:
            seq, h = self.gru(x)  # seq (N, T, 2H), h (2*layers, N, H)
            feat = torch.cat([h[-2], h[-1]], dim=1)  # (N, 2H)
        return seq if return_map else feat


class HCN(nn.Module):
    """Hierarchical Co-occurrence Network (Li et al. 2018) as in skeleton-contrast moco/HCN.py, without fc.

    Position and motion streams: 1x1 conv, (3x1) conv, joints moved to channels, then co-occurrence convs;
    element-wise max over persons; map (N, 4*hidden, T/16, window/16), flattened feature 4096 for T = 64.
    Dropout2d(0.5) inside the trunk as in the original (active in train mode).
    """

    def __init__(self, in_channels=3, num_joints=25, num_persons=2, hidden=64, window_size=64):
        super().__init__()
        self.num_persons, self.window_size = num_persons, window_size
        h = hidden
        for s in ("", "m"):
            setattr(self, "conv1" + s, nn.Sequential(nn.Conv2d(in_channels, h, 1), nn.ReLU()))
            setattr(self, "conv2" + s, nn.Conv2d(h, window_size, (3, 1), padding=(1, 0)))
            setattr(self, "conv3" + s, nn.Sequential(nn.Conv2d(num_joints, h // 2, 3, padding=1), nn.MaxPool2d(2)))
            setattr(self, "conv4" + s, nn.Sequential(nn.Conv2d(h // 2, h, 3, padding=1), nn.Dropout2d(0.5),
                                                     nn.MaxPool2d(2)))
        self.conv5 = nn.Sequential(nn.Conv2d(2 * h, 2 * h, 3, padding=1), nn.ReLU(), nn.Dropout2d(0.5), nn.MaxPool2d(2))
        self.conv6 = nn.Sequential(nn.Conv2d(2 * h, 4 * h, 3, padding=1), nn.ReLU(), nn.Dropout2d(0.5), nn.MaxPool2d(2))
        self.feature_dim = 4 * h * (window_size // 16) * (window_size // 16)
        for m in self.modules():  # HCN.py weights_init: Glorot-uniform, zero bias
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def _stream(self, x, s):
        out = getattr(self, "conv2" + s)(getattr(self, "conv1" + s)(x))  # (N, window, T, V)
        out = out.permute(0, 3, 2, 1).contiguous()  # (N, V, T, window): joints become channels
        return getattr(self, "conv4" + s)(getattr(self, "conv3" + s)(out))

    def forward(self, x, return_map=False):
        n, c, t, v, m = x.shape
        if t != self.window_size:  # the flattened feature size depends on T
            raise ValueError(f"common.py: HCN built for T = window_size = {self.window_size}, "
                             f"got input {tuple(x.shape)}")
        motion = x[:, :, 1:] - x[:, :, :-1]  # (N, C, T-1, V, M)
        motion = motion.permute(0, 1, 4, 2, 3).reshape(n, c * m, t - 1, v)
        motion = F.interpolate(motion, size=(t, v), mode="bilinear", align_corners=False)
        motion = motion.view(n, c, m, t, v).permute(0, 1, 3, 4, 2)  # (N, C, T, V, M)
        out = None
        for i in range(self.num_persons):
            o = torch.cat([self._stream(x[..., i], ""), self._stream(motion[..., i], "m")], dim=1)
            o = self.conv6(self.conv5(o))  # (N, 4h, T/16, window/16)
            out = o if out is None else torch.max(out, o)
        return out if return_map else out.flatten(1)


class AGCNUnitGCN(nn.Module):
    """2s-AGCN unit_gcn: A_k + learnable PA_k + data-dependent attention C_k, k = 1..3 (Shi et al. 2019)."""

    def __init__(self, cin, cout, adjacency, coff_embedding=4):
        super().__init__()
        k = adjacency.shape[0]
        self.inter_c = cout // coff_embedding
        self.register_buffer("A", torch.from_numpy(adjacency), persistent=False)  # fixed graph, not in checkpoints
        self.PA = nn.Parameter(torch.full_like(torch.from_numpy(adjacency), 1e-6))
        self.conv_a = nn.ModuleList([nn.Conv2d(cin, self.inter_c, 1) for _ in range(k)])
        self.conv_b = nn.ModuleList([nn.Conv2d(cin, self.inter_c, 1) for _ in range(k)])
        self.conv_d = nn.ModuleList([nn.Conv2d(cin, cout, 1) for _ in range(k)])
        self.down = nn.Sequential(nn.Conv2d(cin, cout, 1), nn.BatchNorm2d(cout)) if cin != cout else None
        self.bn = nn.BatchNorm2d(cout)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                nn.init.zeros_(m.bias)
        for conv in self.conv_d:  # conv_branch_init
            nn.init.normal_(conv.weight, 0, math.sqrt(2.0 / (cout * cin * k)))
        nn.init.constant_(self.bn.weight, 1e-6)

    def forward(self, x):
        n, c, t, v = x.shape
        a = self.A + self.PA
        y = 0
        for i in range(len(self.conv_d)):
            a1 = self.conv_a[i](x).permute(0, 3, 1, 2).reshape(n, v, self.inter_c * t)
            a2 = self.conv_b[i](x).view(n, self.inter_c * t, v)
            att = torch.softmax(torch.matmul(a1, a2) / a1.size(-1), dim=-2) + a[i]  # (N, V, V)
            y = y + self.conv_d[i](torch.matmul(x.reshape(n, c * t, v), att).view(n, c, t, v))
        y = self.bn(y) + (x if self.down is None else self.down(x))
        return F.relu(y)


class AGCNUnitTCN(nn.Module):
    def __init__(self, cin, cout, kernel=9, stride=1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, (kernel, 1), (stride, 1), ((kernel - 1) // 2, 0))
        self.bn = nn.BatchNorm2d(cout)
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out")
        nn.init.zeros_(self.conv.bias)

    def forward(self, x):
        return self.bn(self.conv(x))


class AGCNBlock(nn.Module):
    """2s-AGCN TCN_GCN_unit: gcn1 -> tcn1 plus residual (none / identity / strided 1x1 unit_tcn)."""

    def __init__(self, cin, cout, adjacency, stride=1, residual=True):
        super().__init__()
        self.gcn1 = AGCNUnitGCN(cin, cout, adjacency)
        self.tcn1 = AGCNUnitTCN(cout, cout, stride=stride)
        self.residual_mode = "none" if not residual else ("identity" if cin == cout and stride == 1 else "conv")
        if self.residual_mode == "conv":
            self.residual = AGCNUnitTCN(cin, cout, kernel=1, stride=stride)

    def forward(self, x):
        res = 0 if self.residual_mode == "none" else (x if self.residual_mode == "identity" else self.residual(x))
        return F.relu(self.tcn1(self.gcn1(x)) + res)


def _graph_widths(hidden):
    h = hidden
    return [(None, h, 1, False), (h, h, 1, True), (h, h, 1, True), (h, h, 1, True), (h, 2 * h, 2, True),
            (2 * h, 2 * h, 1, True), (2 * h, 2 * h, 1, True), (2 * h, 4 * h, 2, True), (4 * h, 4 * h, 1, True),
            (4 * h, 4 * h, 1, True)]


class AGCN(nn.Module):
    """2s-AGCN joint stream (skeleton-contrast moco/AGCN.py) without fc: data_bn, l1..l10, mean over T, V, M.

    Keys (data_bn, l1.gcn1.PA, ...) match the authors' checkpoints. Output 4*hidden (256-d).
    """

    def __init__(self, in_channels=3, num_joints=25, num_persons=2, layout="ntu25", hidden=64):
        super().__init__()
        adjacency = agcn_adjacency(layout)
        self.data_bn = nn.BatchNorm1d(num_persons * in_channels * num_joints)
        for i, (cin, cout, stride, residual) in enumerate(_graph_widths(hidden)):
            setattr(self, f"l{i + 1}", AGCNBlock(cin or in_channels, cout, adjacency, stride, residual))
        self.feature_dim = 4 * hidden

    def forward(self, x, return_map=False):
        n, c, t, v, m = x.shape
        x = self.data_bn(x.permute(0, 4, 3, 1, 2).reshape(n, m * v * c, t))
        x = x.view(n, m, v, c, t).permute(0, 1, 3, 4, 2).reshape(n * m, c, t, v)
        for i in range(10):
            x = getattr(self, f"l{i + 1}")(x)  # (N*M, C', T', V)
        x = x.view(n, m, x.shape[1], x.shape[2], v)
        return x if return_map else x.mean(dim=(3, 4)).mean(dim=1)  # map (N, M, C', T', V)


class STGCNBlock(nn.Module):
    """ST-GCN st_gcn block (yysijie/st-gcn net/st_gcn.py): graph conv (K partitions) -> BN-ReLU-tconv-BN."""

    def __init__(self, cin, cout, k, stride=1, residual=True, dropout=0.0):
        super().__init__()
        self.k = k
        self.gcn = nn.Module()
        self.gcn.conv = nn.Conv2d(cin, cout * k, 1)
        self.tcn = nn.Sequential(nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                                 nn.Conv2d(cout, cout, (9, 1), (stride, 1), (4, 0)), nn.BatchNorm2d(cout),
                                 nn.Dropout(dropout))
        self.residual_mode = "none" if not residual else ("identity" if cin == cout and stride == 1 else "conv")
        if self.residual_mode == "conv":
            self.residual = nn.Sequential(nn.Conv2d(cin, cout, 1, (stride, 1)), nn.BatchNorm2d(cout))

    def forward(self, x, a):
        res = 0 if self.residual_mode == "none" else (x if self.residual_mode == "identity" else self.residual(x))
        y = self.gcn.conv(x)
        n, kc, t, v = y.shape
        y = torch.einsum("nkctv,kvw->nctw", y.view(n, self.k, kc // self.k, t, v), a)
        return F.relu(self.tcn(y) + res)


class STGCN(nn.Module):
    """ST-GCN (Yan et al. 2018) without the fcn: spatial partition graph, edge-importance weighting, 256-d.

    The cross-modal skeleton student of thesis Sec. 2.4.3. Keys (data_bn, st_gcn_networks.i, edge_importance.i)
    match yysijie/st-gcn checkpoints.
    """

    def __init__(self, in_channels=3, num_joints=25, layout="ntu25", hidden=64, dropout=0.0):
        super().__init__()
        self.register_buffer("A", torch.from_numpy(stgcn_adjacency(layout)))
        k = self.A.shape[0]
        self.data_bn = nn.BatchNorm1d(in_channels * num_joints)
        self.st_gcn_networks = nn.ModuleList([
            STGCNBlock(cin or in_channels, cout, k, stride, residual, 0.0 if cin is None else dropout)
            for cin, cout, stride, residual in _graph_widths(hidden)])
        self.edge_importance = nn.ParameterList([nn.Parameter(torch.ones_like(self.A))
                                                 for _ in self.st_gcn_networks])
        self.feature_dim = 4 * hidden

    def forward(self, x, return_map=False):
        n, c, t, v, m = x.shape
        x = self.data_bn(x.permute(0, 4, 3, 1, 2).reshape(n * m, v * c, t))
        x = x.view(n, m, v, c, t).permute(0, 1, 3, 4, 2).reshape(n * m, c, t, v)
        for block, importance in zip(self.st_gcn_networks, self.edge_importance):
            x = block(x, self.A * importance)  # (N*M, C', T', V)
        x = x.view(n, m, x.shape[1], x.shape[2], v)
        return x if return_map else x.mean(dim=(3, 4)).mean(dim=1)  # map (N, M, C', T', V)


class SkeleMotionCNN(nn.Module):
    """P-HLVC SkeleMotion backbone (P-HLVC supp. Listing 1; cvpranon42/phlvc model_3d.py SkeleMotionBackbone).

    Input (N, 6, T, 49) SkeleMotion images (`skelemotion_image`); no BatchNorm (commented out in the original).
    Layer names as the original (conv1..4, linear1..2). For T = 32 the map after conv4 is (64, 4, 8) -> 2048 ->
    linear1 512 -> ReLU -> linear2 512 (feature_dim 512); T = 30 -> 1536. Orthogonal init, zero bias.
    """

    def __init__(self, in_channels=6, frames=32, joints=49, hidden=512):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 3)
        self.conv2 = nn.Conv2d(16, 32, 3)
        self.maxpool2 = nn.MaxPool2d(3, stride=1)
        self.conv3 = nn.Conv2d(32, 32, (3, 5))
        self.maxpool3 = nn.MaxPool2d(3, stride=2)
        self.conv4 = nn.Conv2d(32, 64, 3)
        self.maxpool4 = nn.MaxPool2d(3, stride=2)
        with torch.no_grad():
            flat = self._conv(torch.zeros(1, in_channels, frames, joints)).numel()
        self.linear1 = nn.Linear(flat, hidden)
        self.linear2 = nn.Linear(hidden, hidden)
        self.feature_dim = hidden
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.orthogonal_(m.weight)
                nn.init.zeros_(m.bias)

    def _conv(self, x):
        x = F.relu(self.conv1(x))  # (N, 16, T-2, 47)
        x = F.relu(self.maxpool2(self.conv2(x)))  # (N, 32, T-6, 43)
        x = F.relu(self.maxpool3(self.conv3(x)))  # (N, 32, 11, 19) for T = 32
        return F.relu(self.maxpool4(self.conv4(x)))  # (N, 64, 4, 8) for T = 32

    def forward(self, x, return_map=False):
        x = self._conv(x)
        return x if return_map else self.linear2(F.relu(self.linear1(x.flatten(1))))


VIDEO_ARCHS = ("r2plus1d_18", "r3d_18", "mc3_18", "s3d", "r2d3d_18", "i3d", "resnet3d_18", "resnext3d_101",
               "tiny3d")
SKELETON_ARCHS = ("bigru", "hcn", "agcn", "stgcn", "skelemotion_cnn")


def build_backbone(arch, pretrained=None, bn_eps=None, in_channels=None, **options):
    """Build a backbone by name (see VIDEO_ARCHS, SKELETON_ARCHS); returns an nn.Module with `.feature_dim`.

    pretrained: None, "kinetics400" (torchvision weights for r2plus1d_18 / r3d_18 / mc3_18 / s3d; downloaded
    into the torch hub cache) or a path loaded with `load_backbone_weights`.
    bn_eps: eps of every BatchNorm (default: the source's).
    in_channels: input channels (default 3; 6 for skelemotion_cnn).
    Other options per arch:
        tiny3d: width (16). s3d: bn_momentum.
        bigru: input_dim (150 = V*C*M), hidden (1024), layers (3), stepwise (False).
        hcn: num_joints (25), num_persons (2), hidden (64), window_size (64 = T).
        agcn: num_joints, num_persons, layout ("ntu25" | "coco18"), hidden (64). stgcn: same + dropout.
        skelemotion_cnn: frames (32), joints (49), hidden (512).
    """
    c = 3 if in_channels is None else in_channels
    eps = {} if bn_eps is None else {"bn_eps": bn_eps}
    if arch in ("r2plus1d_18", "r3d_18", "mc3_18"):
        if c != 3:
            raise ValueError(f"common.py: {arch} expects in_channels=3 (torchvision stem), got {c}")
        model = VideoResNet(arch, **eps, **options)
    elif arch == "s3d":
        if pretrained == "kinetics400":  # torchvision's S3D was trained with eps 1e-3, momentum 1e-3
            options = {"bn_momentum": 1e-3, **options}
            eps = eps or {"bn_eps": 1e-3}
        model = S3D(**eps, **options)
    elif arch == "i3d":
        model = I3D(c, **eps, **options)
    elif arch == "tiny3d":
        model = Tiny3D(c, **eps, **options)
    elif arch == "resnet3d_18":
        model = ResNet3D(BasicBlock3D, (2, 2, 2, 2), c, **eps, **options)
    elif arch == "resnext3d_101":
        model = ResNet3D(ResNeXtBottleneck3D, (3, 4, 23, 3), c, widths=(128, 256, 512, 1024), cardinality=32,
                         **eps, **options)
    elif arch == "r2d3d_18":
        model = ResNet3D(BasicBlock3D, (2, 2, 2, 2), c, stem_kernel=(1, 7, 7),
                         widths=(64, 128, 256, 256), block_kernels=((1, 3, 3), (1, 3, 3), 3, 3),
                         temporal_strides=(1, 1, 2, 2), final_relu=False, **eps, **options)
    elif arch == "bigru":
        model = BiGRU(**options)
    elif arch == "hcn":
        model = HCN(c, **options)
    elif arch == "agcn":
        model = AGCN(c, **options)
    elif arch == "stgcn":
        model = STGCN(c, **options)
    elif arch == "skelemotion_cnn":
        model = SkeleMotionCNN(6 if in_channels is None else in_channels, **options)
    else:
        raise ValueError(f"common.py: unknown backbone '{arch}'; expected one of {VIDEO_ARCHS + SKELETON_ARCHS}")
    if bn_eps is not None:  # skeleton nets take it here too (their constructors keep PyTorch's default)
        set_bn_eps(model, bn_eps)
    model.arch = arch
    if pretrained == "kinetics400":
        if arch not in TORCHVISION_VIDEO_WEIGHTS:
            raise ValueError(f"common.py: no torchvision Kinetics-400 weights for '{arch}'; "
                             f"available for {sorted(TORCHVISION_VIDEO_WEIGHTS)}; pass a file path instead")
        load_backbone_weights(model, _torchvision_kinetics_state_dict(arch))
    elif pretrained:
        load_backbone_weights(model, pretrained)
    return model


# ==================================================================================================== CHECKPOINTS
# One loader for our backbone.pth ({"state_dict", "meta"}), our checkpoint.pth ({"model": ...}), torchvision
# state dicts and the authors' layouts. Keys are matched by suffix after an automatically found prefix
# ("module.", "encoder_q.", "encoder_q.0.", "backbone.", "encoder.", "model.", "module.encoder_q.", ...), with
# the CtP R(2+1)D/R3D, CoCLR S3D and tubelet-contrast I3D names renamed to ours. Every backbone key must be
# found: anything missing (other than BN's num_batches_tracked counters) raises. Heads, queues and key encoders
# are skipped by name.

# Key-path components of encoders that are never the one to load: MoCo key encoders (encoder_k,
# skeleton-contrast's encoder_l for the second representation), EMA / momentum / target copies and teachers.
CHECKPOINT_EXCLUDED_PREFIXES = ("encoder_k", "encoder_l", "key_encoder", "backbone_k", "model_k", "model_ema", "ema",
                                "ema_model", "momentum", "momentum_encoder", "target", "target_encoder", "teacher")
# Checkpoint entries that are heads or training state, reported as `skipped`, never as `unexpected`.
CHECKPOINT_HEAD_NAMES = ("fc", "fc7", "fc8", "fcn", "head", "heads", "classifier", "proj", "projector",
                         "projection", "mlp", "prototypes", "queue", "queue_ptr", "queue_second", "logits",
                         "vid_fc2", "vid_fc_rep", "sk_fc_rep", "final", "final_fc", "cls_head")

# CtP / tubelet-contrast R(2+1)D and R3D names -> torchvision (reference notes Sec. 1.9,
# SEVERE-BENCHMARK backbones.py load_tubelet_contrast_checkpoint).
CTP_RENAMES = [
    (r"(^|\.)stem\.conv_s\.", r"\1stem.0."), (r"(^|\.)stem\.bn_s\.", r"\1stem.1."),
    (r"(^|\.)stem\.conv_t\.", r"\1stem.3."), (r"(^|\.)stem\.bn_t\.", r"\1stem.4."),
    (r"(^|\.)stem\.conv\.", r"\1stem.0."), (r"(^|\.)stem\.bn\.", r"\1stem.1."),
    (r"(layer\d\.\d+)\.conv(\d)\.conv_s\.", r"\1.conv\2.0.0."),
    (r"(layer\d\.\d+)\.conv(\d)\.bn_s\.", r"\1.conv\2.0.1."),
    (r"(layer\d\.\d+)\.conv(\d)\.conv_t\.", r"\1.conv\2.0.3."), (r"(layer\d\.\d+)\.conv(\d)\.conv\.", r"\1.conv\2.0."),
    (r"(layer\d\.\d+)\.bn(\d)\.", r"\1.conv\2.1."),
    (r"(layer\d\.\d+)\.downsample\.conv\.", r"\1.downsample.0."),
    (r"(layer\d\.\d+)\.downsample\.weight$", r"\1.downsample.0.weight"),
    (r"(layer\d\.\d+)\.downsample_bn\.", r"\1.downsample.1."),
]
# CoCLR / ViCC backbone/s3dg.py names -> torchvision S3D (`base.N` = `features.N`, same order of layers).
COCLR_S3D_RENAMES = [
    (r"(^|\.)base\.(\d+)\.", r"\1features.\2."),
    (r"\.conv_s\.", ".0.0."), (r"\.bn_s\.", ".0.1."), (r"\.conv_t\.", ".1.0."), (r"\.bn_t\.", ".1.1."),
    (r"(features\.\d+)\.conv\.", r"\1.0."), (r"(features\.\d+)\.bn\.", r"\1.1."),
    (r"(branch0)\.0\.conv\.", r"\1.0."), (r"(branch0)\.0\.bn\.", r"\1.1."),
    (r"(branch\d\.\d)\.conv\.", r"\1.0."), (r"(branch\d\.\d)\.bn\.", r"\1.1."),
]

# Tubelet-contrast / hassony2 I3D names -> ours (`features.N` in the order of I3D.features).
I3D_RENAMES = [
    (r"(^|\.)conv3d_1a_7x7\.", r"\1features.0."), (r"(^|\.)conv3d_2b_1x1\.", r"\1features.2."),
    (r"(^|\.)conv3d_2c_3x3\.", r"\1features.3."), (r"(^|\.)mixed_3b\.", r"\1features.5."),
    (r"(^|\.)mixed_3c\.", r"\1features.6."), (r"(^|\.)mixed_4b\.", r"\1features.8."),
    (r"(^|\.)mixed_4c\.", r"\1features.9."), (r"(^|\.)mixed_4d\.", r"\1features.10."),
    (r"(^|\.)mixed_4e\.", r"\1features.11."), (r"(^|\.)mixed_4f\.", r"\1features.12."),
    (r"(^|\.)mixed_5b\.", r"\1features.14."), (r"(^|\.)mixed_5c\.", r"\1features.15."),
    (r"\.branch_(\d)\.", r".branch\1."), (r"\.conv3d\.", ".0."), (r"\.batch3d\.", ".1."),
]


def _rename_keys(keys, renames):
    out = {}
    for k in keys:
        new = k
        for pattern, repl in renames:
            new = re.sub(pattern, repl, new)
        out[k] = new
    return out


def read_checkpoint(path_or_state_dict):
    """Return a flat {name: tensor} dict from a file or dict: unwraps "state_dict", "model", "backbone", "net"."""
    obj = path_or_state_dict
    if isinstance(obj, (str, os.PathLike)):
        if not os.path.isfile(obj):
            raise FileNotFoundError(f"common.py: checkpoint file not found: {obj}")
        try:
            obj = torch.load(obj, map_location="cpu", weights_only=True)
        except Exception:  # authors' checkpoints may pickle argparse/mmcv objects; only load files you trust
            obj = torch.load(obj, map_location="cpu", weights_only=False)
    for _ in range(3):
        if isinstance(obj, dict) and not all(torch.is_tensor(v) for v in obj.values()):
            inner = next((obj[k] for k in ("state_dict", "model", "backbone", "net", "model_state", "encoder")
                          if isinstance(obj.get(k), dict)), None)
            if inner is None:
                break
            obj = inner
    if not isinstance(obj, dict) or not obj:
        raise ValueError(f"common.py: {_describe(path_or_state_dict)}: expected a state dict (or a dict with "
                         f"'state_dict'/'model'), got {type(obj).__name__}")
    return {k: v for k, v in obj.items() if torch.is_tensor(v)}


def _describe(src):
    return str(src) if isinstance(src, (str, os.PathLike)) else "state dict"


def _match_prefix(ckpt_keys, model_keys):
    """Most frequent prefix P with P + model_key in the checkpoint; returns (prefix, {model_key: ckpt_key})."""
    counts = {}
    for ck in ckpt_keys:
        parts = ck.split(".")
        for i in range(len(parts)):
            if ".".join(parts[i:]) in model_keys:
                prefix = ".".join(parts[:i]) + ("." if i else "")
                if not any(part in CHECKPOINT_EXCLUDED_PREFIXES for part in prefix.split(".")):
                    counts[prefix] = counts.get(prefix, 0) + 1
                break
    if not counts:
        return "", {}
    prefix = max(counts, key=lambda p: (counts[p], -len(p), p))
    n = len(prefix)
    return prefix, {ck[n:]: ck for ck in ckpt_keys if ck.startswith(prefix) and ck[n:] in model_keys}


def load_backbone_weights(model, path_or_state_dict, prefix=None):
    """Load backbone weights from any supported layout; return dict(loaded, missing, unexpected, skipped, prefix).

    prefix: force the key prefix (e.g. "encoder_r.") instead of detecting it. Raises ValueError when a backbone
    key is missing or a shape differs (naming the file, the expected and the actual keys/shapes).
    """
    src = _describe(path_or_state_dict)
    state = read_checkpoint(path_or_state_dict)
    target = model.state_dict()
    model_keys = set(target)
    best = None
    for renames in (None, CTP_RENAMES, COCLR_S3D_RENAMES, I3D_RENAMES):
        names = {k: k for k in state} if renames is None else _rename_keys(state, renames)
        renamed = {new: old for old, new in names.items()}
        if prefix is None:
            p, match = _match_prefix(list(renamed), model_keys)
        else:
            p = prefix
            match = {k[len(p):]: k for k in renamed if k.startswith(p) and k[len(p):] in model_keys}
        if best is None or len(match) > len(best[1]):
            best = (p, match, renamed)
    p, match, renamed = best
    missing = sorted(model_keys - set(match))
    fatal = [k for k in missing if not k.endswith("num_batches_tracked")]
    if fatal:
        raise ValueError(
            f"common.py: {src}: {len(fatal)} of {len(model_keys)} backbone keys of {type(model).__name__} are "
            f"missing (prefix '{p}'); expected e.g. {fatal[:5]}, the checkpoint has e.g. {sorted(state)[:5]}")
    bad = [(k, tuple(target[k].shape), tuple(state[renamed[match[k]]].shape)) for k in match
           if target[k].shape != state[renamed[match[k]]].shape]
    if bad:
        raise ValueError(f"common.py: {src}: shape mismatch (key, expected, actual): {bad[:5]}")
    new_state = {k: state[renamed[match[k]]] for k in match}
    for k in missing:  # num_batches_tracked absent in old checkpoints: keep the model's counter
        new_state[k] = target[k]
    model.load_state_dict(new_state, strict=True)
    used = {renamed[c] for c in match.values()}
    original_to_renamed = {old: new for new, old in renamed.items()}
    skipped, unexpected = [], []
    for k in sorted(state):
        if k in used:
            continue
        name = original_to_renamed[k]
        outside = not name.startswith(p)  # another module of the checkpoint (key encoder, head, queue, ...)
        is_head = outside or name[len(p):].split(".")[0] in CHECKPOINT_HEAD_NAMES
        (skipped if is_head else unexpected).append(k)
    return {"loaded": sorted(match), "missing": missing, "unexpected": unexpected, "skipped": skipped, "prefix": p}


def backbone_state_dict(model):
    """CPU state dict with torchvision-compatible keys (no module./_orig_mod. wrappers) — what backbone.pth holds."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or getattr(model, "_orig_mod")
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def save_backbone(model, path, meta=None):
    """Write backbone.pth = {"state_dict": backbone_state_dict(model), "meta": {...}} atomically."""
    meta = dict(meta or {})
    meta.setdefault("arch", getattr(model, "arch", type(model).__name__))
    meta.setdefault("feature_dim", getattr(model, "feature_dim", None))
    save_atomic({"state_dict": backbone_state_dict(model), "meta": meta}, path)


# ==================================================================================================== TRAINING LOOP
# ---------------------------------------------------------------------------------------------- the run object
class Run:
    """What a process knows about its run: device, rank, run folder, mixed precision. Made by `setup`."""

    def __init__(self, args, device, out_dir):
        self.args = args
        self.device = device
        self.rank, self.world_size = get_rank(), get_world_size()
        self.is_main = self.rank == 0
        self.out_dir = out_dir
        self.amp_dtype = resolve_amp_dtype(args.amp, device)
        fp16 = self.amp_dtype == torch.float16
        self.scaler = torch.amp.GradScaler(device.type, enabled=fp16)  # fp16 needs loss scaling; bf16 does not

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                              enabled=self.amp_dtype is not None)

    def backward(self, loss):
        self.scaler.scale(loss).backward()

    def optimizer_step(self, optimizer):
        if self.args.clip_grad:
            self.scaler.unscale_(optimizer)
            params = [p for group in optimizer.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.args.clip_grad)
        self.scaler.step(optimizer)
        self.scaler.update()

    def step(self, loss, optimizer):
        """zero_grad, backward and optimizer step: what most train_steps need."""
        optimizer.zero_grad(set_to_none=True)
        self.backward(loss)
        self.optimizer_step(optimizer)

    def prepare(self, model, find_unused_parameters=False):
        """Move to the device; SyncBN / channels-last / DDP / compile as the flags say. Returns the model to call;
        keep the unwrapped one for `fit` (it is what the checkpoint stores)."""
        model = model.to(self.device)
        if self.args.sync_bn and self.world_size > 1:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        if self.args.channels_last:
            model = model.to(memory_format=torch.channels_last_3d)
        if self.world_size > 1:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            model = nn.parallel.DistributedDataParallel(model, device_ids=device_ids,
                                                        find_unused_parameters=find_unused_parameters)
        if self.args.compile:
            model = torch.compile(model)
        return model

    def print(self, *values, **kwargs):
        if self.is_main:
            print(*values, **kwargs, flush=True)


def resolve_amp_dtype(amp, device):
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return None
    if amp == "bf16" or (amp == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    if device.type != "cuda":
        raise ValueError("--amp fp16 needs CUDA (GradScaler); use --amp bf16 or off on CPU")
    return torch.float16


def setup(args, script_name):
    """Per-process setup: process group (torchrun or spawned env), device, seeds, run folder, args.json."""
    device_type, _ = resolve_device_and_processes(args)
    if _launched_by_torchrun() and not is_distributed():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo", init_method="env://")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    seed_everything(args.seed + get_rank(), args.deterministic)
    if args.out_dir is None:
        args.out_dir = os.path.join("runs", f"{script_name}-{args.data}")
    os.makedirs(args.out_dir, exist_ok=True)  # every rank: data workers may append to bad_files.txt
    run = Run(args, device, args.out_dir)
    world = get_world_size()
    if args.batch_size % world:
        raise ValueError(f"--batch-size {args.batch_size} is global and must divide by the {world} processes")
    if run.is_main:
        print("command:", " ".join([os.path.basename(sys.executable)] + sys.argv), flush=True)
        print("git commit:", git_commit(), flush=True)
        print("arguments:", json.dumps(vars(args), sort_keys=True), flush=True)
        print(f"processes: {world} on {device.type}; batch size {args.batch_size} global = "
              f"{args.batch_size // world} per process; lr {args.lr}; amp {run.amp_dtype}", flush=True)
        write_json_atomic(os.path.join(args.out_dir, "args.json"),
                          dict(vars(args), command=sys.argv, git_commit=git_commit(), world_size=world))
    return run


def seed_everything(seed, deterministic=False):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    else:
        torch.backends.cudnn.benchmark = True


def git_commit():
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    if sha.returncode != 0:
        return "unknown"
    return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


# ---------------------------------------------------------------------------------------------- data loading
class ResumableDistributedSampler(torch.utils.data.DistributedSampler):
    """DistributedSampler (the identity split at world size 1) that can start an epoch at a given batch,
    so an automatic resume continues with exactly the samples an uninterrupted run would see."""

    def __init__(self, dataset, batch_size, **kwargs):
        super().__init__(dataset, **kwargs)
        self.batch_size, self.start_batch = batch_size, 0

    def set_epoch(self, epoch, start_batch=0):
        super().set_epoch(epoch)
        self.start_batch = start_batch

    def __iter__(self):
        return iter(list(super().__iter__())[self.start_batch * self.batch_size:])

    def __len__(self):
        return max(self.num_samples - self.start_batch * self.batch_size, 0)


def _seed_worker(worker_id):
    worker_seed = torch.initial_seed() % 2**32  # distinct per worker, set by the DataLoader from its generator
    np.random.seed(worker_seed)
    random.seed(worker_seed)


def build_loader(dataset, args, run, train=True, batch_size=None, collate_fn=None):
    """A DataLoader for one process: its shard of the data (DistributedSampler), per-process batch size
    (global / world size), seeded workers, pinned memory on CUDA. Training drops the last partial batch."""
    global_batch = batch_size or args.batch_size
    per_process = max(global_batch // run.world_size, 1)
    sampler = ResumableDistributedSampler(dataset, per_process, num_replicas=run.world_size, rank=run.rank,
                                          shuffle=train, seed=args.seed, drop_last=train)
    return torch.utils.data.DataLoader(
        dataset, batch_size=per_process, sampler=sampler, num_workers=args.workers, collate_fn=collate_fn,
        pin_memory=run.device.type == "cuda", drop_last=train, worker_init_fn=_seed_worker,
        generator=torch.Generator(), persistent_workers=False)


def to_device(batch, device):
    if torch.is_tensor(batch):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


# ---------------------------------------------------------------------------------------------- LR schedule
def lr_at_step(step, total_steps, base_lr, schedule="cosine", warmup_steps=0, final_lr=0.0,
               milestones=(), gamma=0.1):
    """Learning rate for optimizer step `step` (0-based) of `total_steps`.
    cosine: linear warm-up from 0 to base_lr over warmup_steps, then half a cosine from base_lr to final_lr.
    multistep: base_lr * gamma^(number of milestones <= step). constant: base_lr."""
    if schedule == "constant":
        return base_lr
    if schedule == "multistep":
        return base_lr * gamma ** sum(step >= m for m in milestones)
    if schedule != "cosine":
        raise ValueError(f"unknown schedule {schedule!r}; expected cosine, multistep or constant")
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
    return final_lr + 0.5 * (base_lr - final_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))


# ---------------------------------------------------------------------------------------------- checkpoints
def save_atomic(obj, path):
    """torch.save to a temporary file in the same folder, fsync, then rename over `path`: a crash at any point
    leaves either the old file or the new one, never a truncated one."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pth", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_json_atomic(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)
    os.replace(tmp, path)


def rng_state():
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def unwrap(model):
    model = getattr(model, "_orig_mod", model)  # torch.compile
    return getattr(model, "module", model)  # DDP


def find_resume_checkpoint(args):
    if args.resume == "none":
        return None
    if args.resume == "auto":
        path = os.path.join(args.out_dir, "checkpoint.pth")
        return path if os.path.exists(path) else None
    if not os.path.exists(args.resume):
        raise FileNotFoundError(f"--resume {args.resume}: no such checkpoint file")
    return args.resume


class NonFiniteLossError(RuntimeError):
    pass


class _StopFlag:
    """SIGTERM/SIGINT ask the loop to finish the current step, save and exit; a second SIGINT aborts."""

    def __init__(self):
        self.requested = False
        self.previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


# ---------------------------------------------------------------------------------------------- the loop
def fit(run, args, model, optimizer, loader, train_step, backbone=None, backbone_meta=None, knn=None):
    """Train `model` with the method's `train_step(batch) -> dict` (forward, backward and optimizer step are the
    method's; `run.step(loss, optimizer)` does the usual three). The loop owns epochs, --max-steps, resume,
    the per-step LR schedule, device transfer, logs, the progress bar, checkpoints and the NaN guard.

    model: the unwrapped module whose state_dict holds the whole method (encoders, queues, prototypes).
    backbone: the module exported as backbone.pth, with `backbone_meta` (arch, modality, method).
    knn: optional (encoder, input_fn, train_loader, val_loader) for the online kNN monitor (see `knn_monitor`).
    Returns {"step", "epoch", "interrupted", "knn": last monitor result}."""
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise ValueError(f"the training loader is empty: {len(loader.dataset)} samples cannot fill one batch of "
                         f"{loader.batch_size} per process (global --batch-size {args.batch_size})")
    total_steps = args.epochs * steps_per_epoch  # the schedule spans --epochs even when --max-steps stops earlier
    last_step = min(total_steps, args.max_steps) if args.max_steps else total_steps
    warmup_steps = round(args.warmup_epochs * steps_per_epoch)
    milestones = [round(m * steps_per_epoch) for m in args.milestones]
    ckpt_path = os.path.join(run.out_dir, "checkpoint.pth")
    step, knn_result = 0, None

    resume_path = find_resume_checkpoint(args)
    if resume_path:
        ckpt = torch.load(resume_path, map_location="cpu", weights_only=False)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        run.scaler.load_state_dict(ckpt["scaler"])
        step = ckpt["step"]
        if len(ckpt["rng"]) == run.world_size:
            set_rng_state(ckpt["rng"][run.rank])
        else:
            run.print(f"resume: checkpoint was written by {len(ckpt['rng'])} processes, this run has "
                      f"{run.world_size}; RNG states are re-seeded instead of restored")
        changed = {k: (v, vars(args).get(k)) for k, v in ckpt["args"].items()
                   if k not in ("resume", "max_steps", "out_dir") and vars(args).get(k) != v}
        run.print(f"resumed from {resume_path} at step {step} (epoch {step // steps_per_epoch})"
                  + (f"; arguments that differ from the checkpoint (saved, now): {changed}" if changed else ""))
    elif os.path.exists(ckpt_path) and args.resume == "none":
        run.print(f"--resume none: starting afresh; {ckpt_path} will be overwritten")

    def save(epoch):
        rng = all_gather_objects(rng_state())  # every process's RNG, so a resume continues each stream exactly
        if not run.is_main:
            return
        save_atomic({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "scaler": run.scaler.state_dict(), "step": step, "epoch": epoch, "args": vars(args),
                     "rng": rng, "schedule": {"total_steps": total_steps, "steps_per_epoch": steps_per_epoch}},
                    ckpt_path)
        if backbone is not None:
            save_backbone(backbone, os.path.join(run.out_dir, "backbone.pth"),
                          dict(backbone_meta or {}, step=step, epoch=epoch, args=vars(args)))

    if step >= last_step:
        run.print(f"the run in {run.out_dir} is already complete at step {step}: nothing to train "
                  f"(raise --epochs or --max-steps to continue, or --resume none to start afresh)")
    writer = _tensorboard_writer(run)
    metrics_file = open(os.path.join(run.out_dir, "metrics.jsonl"), "a") if run.is_main else None
    window = defaultdict(float)
    window_steps, window_samples, window_data, window_step_time = 0, 0, 0.0, 0.0
    interrupted = False
    with _StopFlag() as stop:
        while step < last_step and not interrupted:
            epoch, start_batch = divmod(step, steps_per_epoch)
            loader.sampler.set_epoch(epoch, start_batch)
            # Worker RNG depends on (seed, rank, epoch, start batch) only: resumes are reproducible.
            loader.generator.manual_seed(((args.seed * 1000 + run.rank) * 100003 + epoch) * 100003 + start_batch)
            model.train()
            bar = _progress_bar(run, total=steps_per_epoch, initial=start_batch, desc=f"epoch {epoch}")
            tick = time.perf_counter()
            for batch in loader:
                data_time = time.perf_counter() - tick
                batch = to_device(batch, run.device)
                lr = lr_at_step(step, total_steps, args.lr, args.schedule, warmup_steps, args.final_lr,
                                milestones, args.lr_gamma)
                for group in optimizer.param_groups:
                    group["lr"] = lr * group.get("lr_scale", 1.0)
                metrics = {k: float(v) for k, v in train_step(batch).items()}
                if not math.isfinite(metrics["loss"]):
                    last_good = ckpt_path if os.path.exists(ckpt_path) else "none (no checkpoint was written yet)"
                    raise NonFiniteLossError(
                        f"loss is {metrics['loss']} at step {step} (epoch {epoch}); stopping without saving. "
                        f"Last good checkpoint: {last_good}. Try a lower --lr, --amp off or --clip-grad.")
                step += 1
                if run.device.type == "cuda" and step % args.log_every == 0:
                    torch.cuda.synchronize()  # honest step times on the logged steps
                step_time = time.perf_counter() - tick
                for k, v in metrics.items():
                    window[k] += v
                window_steps += 1
                window_samples += args.batch_size
                window_data += data_time
                window_step_time += step_time
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{metrics['loss']:.4f}", sps=f"{args.batch_size / step_time:.1f}",
                                    data=f"{data_time / step_time:.0%}", refresh=False)
                if step % args.log_every == 0 or step == last_step:
                    keys = sorted(window)
                    averaged = all_reduce(torch.tensor([window[k] / window_steps for k in keys], dtype=torch.float64,
                                                       device=run.device), "mean").tolist()
                    record = {"step": step, "epoch": epoch, "lr": lr, **dict(zip(keys, averaged)),
                              "samples_per_s": window_samples / window_step_time,
                              "data_time": window_data / window_steps, "step_time": window_step_time / window_steps,
                              "data_share": window_data / window_step_time}
                    if run.is_main:
                        metrics_file.write(json.dumps(record) + "\n")
                        metrics_file.flush()
                        if writer is not None:
                            for k, v in record.items():
                                writer.add_scalar(f"train/{k}", v, step)
                        if bar is None:
                            print(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                           for k, v in record.items()), flush=True)
                    window.clear()
                    window_steps, window_samples, window_data, window_step_time = 0, 0, 0.0, 0.0
                interrupted = _any_process(stop.requested, run)
                end_of_epoch = step % steps_per_epoch == 0
                if interrupted or step == last_step or end_of_epoch or step % args.ckpt_every == 0:
                    save(step // steps_per_epoch)
                if interrupted or step == last_step:
                    break
                tick = time.perf_counter()
            if bar is not None:
                bar.close()
            if interrupted:
                run.print(f"interrupted: saved step {step} to {ckpt_path}; rerun the same command "
                          f"(same --out-dir) to resume")
                break
            completed_epoch = step // steps_per_epoch
            if step % steps_per_epoch == 0:
                _report_bad_files(run, completed_epoch)
                if args.keep_every and completed_epoch % args.keep_every == 0 and run.is_main:
                    shutil.copyfile(ckpt_path, os.path.join(run.out_dir, f"checkpoint_{completed_epoch:04d}.pth"))
                if knn is not None and args.knn_every and completed_epoch % args.knn_every == 0:
                    knn_result = knn_monitor(*knn, run=run)
                    run.print(f"epoch {completed_epoch} kNN monitor: " + json.dumps(knn_result))
                    if run.is_main:
                        metrics_file.write(json.dumps({"step": step, "epoch": completed_epoch, **knn_result}) + "\n")
                        metrics_file.flush()
    if metrics_file is not None:
        metrics_file.close()
    if writer is not None:
        writer.close()
    return {"step": step, "epoch": step // steps_per_epoch, "interrupted": interrupted, "knn": knn_result}


def _any_process(flag, run):
    if run.world_size == 1:
        return flag
    return bool(all_reduce(torch.tensor([float(flag)], device=run.device)).item() > 0)


def _progress_bar(run, total, initial, desc):
    """tqdm on rank 0 when stderr is a terminal; otherwise None and the loop prints its log lines."""
    if not run.is_main or not sys.stderr.isatty():
        return None
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True)


def _tensorboard_writer(run):
    if not run.is_main:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional: metrics.jsonl is always written
        return None
    return SummaryWriter(os.path.join(run.out_dir, "tb"))


def _report_bad_files(run, epoch):
    path = os.path.join(run.out_dir, "bad_files.txt")
    if run.is_main and os.path.exists(path):
        with open(path) as f:
            count = sum(1 for _ in f)
        if count:
            print(f"warning: after epoch {epoch}, {count} unreadable samples were skipped and replaced; see {path}",
                  flush=True)


# ---------------------------------------------------------------------------------------------- kNN monitor
@torch.no_grad()
def extract_features(encoder, input_fn, loader, run):
    """L2-normalised features `encoder(input_fn(batch))` and labels of a loader, in eval mode, gathered over
    processes (the distributed sampler's padding duplicates removed by sample index)."""
    was_training = encoder.training
    encoder.eval()
    feats, labels, indices = [], [], []
    for batch in loader:
        batch = to_device(batch, run.device)
        with run.autocast():
            f = encoder(input_fn(batch))  # (B, D)
        feats.append(F.normalize(f.float(), dim=1))
        labels.append(batch["label"])
        indices.append(batch["index"])
    encoder.train(was_training)
    feats, labels, indices = (all_gather_nograd(torch.cat(x)) for x in (feats, labels, indices))
    order = torch.argsort(indices)
    keep = torch.ones_like(order, dtype=torch.bool)
    keep[1:] = indices[order][1:] != indices[order][:-1]
    return feats[order][keep], labels[order][keep]


@torch.no_grad()
def knn_classify(train_features, train_labels, test_features, num_classes, k=200, temperature=0.1):
    """Weighted kNN (InstDisc, Wu et al. 2018): each of the k nearest neighbours (cosine similarity s) votes for
    its class with weight exp(s / T). Returns the kNN predictions (N_test,) and the 1-NN predictions (N_test,)."""
    k = min(k, train_features.shape[0])
    similarity = test_features @ train_features.T  # (N_test, N_train)
    top_similarity, top_index = similarity.topk(k, dim=1)  # (N_test, k)
    top_labels = train_labels[top_index]  # (N_test, k)
    votes = torch.zeros(test_features.shape[0], num_classes, device=test_features.device)  # (N_test, C)
    votes.scatter_add_(1, top_labels, (top_similarity / temperature).exp())
    return votes.argmax(dim=1), top_labels[:, 0]


def knn_monitor(encoder, input_fn, train_loader, val_loader, run, k=200, temperature=0.1):
    """The cheap health signal of a pretraining run: weighted kNN (k=200, T=0.1) and 1-NN top-1 accuracy (%) of
    L2-normalised features of `encoder(input_fn(batch))`, with the train loader as the gallery."""
    train_features, train_labels = extract_features(encoder, input_fn, train_loader, run)
    val_features, val_labels = extract_features(encoder, input_fn, val_loader, run)
    num_classes = int(max(train_labels.max(), val_labels.max())) + 1
    knn_pred, nn1_pred = knn_classify(train_features, train_labels, val_features, num_classes, k, temperature)
    return {"knn_top1": (knn_pred == val_labels).float().mean().item() * 100,
            "nn1_top1": (nn1_pred == val_labels).float().mean().item() * 100}



if __name__ == "__main__":
    pass
