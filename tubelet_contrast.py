"""Tubelet-Contrastive Self-Supervision for Video-Efficient Generalization.

Thoker, Doughty, Snoek, ICCV 2023 (arXiv:2303.11003); thesis Ch. 5 (Sec. 5.3) and App. C; authors' code
fmthoker/tubelet-contrast. Two clips from two *different* videos share only synthetic tubelets (moving, transforming
image patches cut from clip 1); MoCo learns that they are the same instance, so the representation has to encode
motion, not appearance.

    python tubelet_contrast.py                          # toy data, tiny3d on CPU, minutes, kNN vs random init
    python tubelet_contrast.py --data k400 --gpus 4     # the paper's configuration (R(2+1)D-18, 16x112², queue 65536)
    python tubelet_contrast.py --visualize 8            # PNG + GIF of 8 training pairs

Order of Sec. 5.3: flags -> tubelets (5.3.2) -> motion (5.3.3) -> transformations (5.3.4) -> temporal baseline
(5.3.1) -> augmentation -> MoCo and InfoNCE (Eq. 5.1) -> train step -> main.

Implementation details
- Pairs (Eq. 5.3-5.4): a batch of B clips of B videos is decoded once; pair i uses clip i as clip 1 (patch source,
  query background) and clip i+1 (mod B) as the key's background. M = 2 tubelets per pair, pasted in order with
  identical paths, masks, transforms and opacity on both clips (tubelet pixels are bit-identical; tested).
- Patches: sides U(16, 64) at 112² (scaled with the crop), cut from a random frame of clip 1; rectangle, ellipse or
  rhombus; a soft edge with p 0.5. Linear motion (Eq. 5.5): K = 3 keyframes, each next centre uniform in the disk
  of radius Δ ~ U(40, 80) px around the previous one. Non-linear motion (Eq. 5.6): 48 uniform points per axis,
  Gaussian filter σ 8, stretched to a random extent. Transformations (Eq. 5.7): scale U(0.5, 1.5), rotation
  U(-90°, 90°), shear U(-1, 1) at keyframes, identity at frame 0, linear interpolation.
- paste_tubelets maps the pixels of a window around each centre back into the patch (u = A_t^-1 (p - c_t)),
  samples them with grid_sample and alpha-composites them into both clips: on a GPU one fixed-shape window per
  tubelet index, no host syncs (in the train step, `--tubelet-device gpu`, or in the loader workers); on a CPU per
  tubelet and frame the rows of its transformed shape's box (as wide as the tubelet's widest box), blended frame
  by frame into both clips through numpy slices, uint8 with alpha in steps of 1/256 (within 1 level of the float
  blend per tubelet).
- MoCo: query = backbone + MLP to 128-d, key encoder = EMA (m 0.999) updated before the keys are computed; keys of
  all processes are gathered before enqueueing; the loss (Eq. 5.1, fp32) uses the queue as it was before the
  current keys were added. `--baseline temporal`: two clips of the same video, no tubelets.
- Multi-GPU: SyncBatchNorm by default (the authors' config; `--no-sync-bn`), so queries and their keys never share
  per-GPU batch statistics (the leak MoCo's shuffle-BN prevents); a multi-process CPU run (gloo, tests) keeps
  per-process BN and says so. Keys are all-gathered and SyncBN keeps the BN statistics equal, so DDP runs with
  broadcast_buffers=False. `--compile` compiles the two backbones, not DDP(MoCo) (its forward updates the queue).

Differences from the paper
- Non-linear paths are min-max normalised and stretched to a random extent (authors' code): Eq. (5.6) alone gives
  paths of ~13 px on 112² frames, nearly static tubelets. Shear ±1.0 (App. C.5/C.6; Sec. 5.3.4 says ±1.5).
- Clip 2 of a pair is another clip of the batch, not a separately decoded video (halves decoding).
- Colour jitter: the thesis says only "color jitter"; we take the authors' values (`--color-jitter authors`:
  brightness ±32/255, contrast x e^U(±0.2), hue ±24°, saturation x e^U(±0.1), each p 0.2) as one affine colour map
  per clip on the device (hue/saturation in YIQ), drawn per clip. SimCLR-strength jitter (`strong`) stalls learning
  on toy data. Unstated choices (shape probabilities, soft edges, strides 1-4) follow the authors' code.
Differences from the authors' code (`--authors-code-*` flags reproduce them): their rotation is a random walk of
±6° per frame (`-rotation`); patch sides from 6 scales x 7 ratios with opacity U(0.8, 1) (`-patches`); one jitter
per pair (`-shared-jitter`); a 200-epoch cosine stopped at 100 (`-schedule`); only non-linear motion exists there.
"""
import argparse
import copy
import functools
import math
import os
import sys

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import default_collate

import common

SHAPES = ("rectangle", "ellipse", "rhombus")
TRANSFORMS = ("scale", "rotation", "shear")


# ==================================================================================================== FLAGS
def add_method_args(parser):
    """Adds the "method" group; defaults reproduce thesis Sec. 5.4.1 (Mini-Kinetics / Kinetics-400 pretraining)."""
    g = parser.add_argument_group("method")
    add = g.add_argument
    add("--arch", default=None, help="backbone: r2plus1d_18 (paper), r3d_18, i3d (App. C.2, 224²), tiny3d (CPU). "
        "Default: tiny3d on toy data, r2plus1d_18 otherwise")
    add("--clip-len", type=int, default=None, help="T, frames per clip (paper 16; toy 8)")
    add("--crop-size", type=int, default=None, help="H = W of a clip; default 112 (224 for i3d, App. C.2)")
    add("--frame-strides", default="1,2,3,4", help="temporal strides sampled per clip (not in the thesis; authors' "
        "code)")
    add("--baseline", choices=["none", "temporal"], default="none", help="temporal: the temporal-contrast baseline "
        "of Sec. 5.3.1 (MoCo on two temporal crops of one video, no tubelets), Tables 5.2 and 5.6")
    # Sec. 5.3.2: tubelets
    add("--num-tubelets", type=int, default=2, help="M tubelets per pair, Eq. (5.4); paper 2 (Table 5.5)")
    add("--patch-min", type=float, default=None, help="smallest patch side H', W' in pixels; paper 16 at 112² (32 "
        "at 224²); default scales 16 with --crop-size/112")
    add("--patch-max", type=float, default=None, help="largest patch side; paper 64 at 112² (128 at 224²)")
    add("--shapes", default="rectangle,ellipse,rhombus", help="patch shapes drawn uniformly (Sec. 5.4.1 "
        "'predefined shapes')")
    add("--soft-edge-prob", type=float, default=0.5, help="probability of a soft-edged mask (alpha falls linearly "
        "to 0 at the border); not in the thesis, 0.5 is the authors' code")
    # Sec. 5.3.3: motion
    add("--motion", choices=["linear", "nonlinear", "none"], default="nonlinear", help="nonlinear Eq. (5.6) (paper "
        "default, Table 5.3), linear Eq. (5.5), none = static tubelets (Table 5.2)")
    add("--keyframes", type=int, default=3, help="K keyframes of linear motion and transformations, first and last "
        "frame included (paper 3)")
    add("--delta-min", type=float, default=40, help="linear motion: Δ, the largest distance between neighbouring "
        "keyframe centres, ~ U(delta-min, delta-max) px at 112² (paper 40-80)")
    add("--delta-max", type=float, default=80, help="see --delta-min")
    add("--nonlinear-points", type=int, default=48, help="N random points before smoothing, Eq. (5.6); paper 48")
    add("--nonlinear-sigma", type=float, default=8, help="σ of the 1-D Gaussian smoothing, Eq. (5.6); paper 8")
    add("--nonlinear-span-min", type=float, default=20, help="non-linear paths are min-max normalised and stretched "
        "to a random extent in [min, max] px at 112² (authors' code 20-89; see the module docstring)")
    add("--nonlinear-span-max", type=float, default=89, help="see --nonlinear-span-min")
    # Sec. 5.3.4 and App. C.5: transformations
    add("--transform", default="rotation", help="none, or a comma list of scale,rotation,shear (App. C.5); rotation "
        "is the paper's best (Table 5.4)")
    add("--scale-min", type=float, default=0.5, help="scale (w, h) factor range, Sec. 5.3.4: 0.5")
    add("--scale-max", type=float, default=1.5, help="Sec. 5.3.4: 1.5")
    add("--rotation-min", type=float, default=-90, help="rotation angle range in degrees: -90")
    add("--rotation-max", type=float, default=90, help="+90 (App. C.6: ±45 and ±180 are as good)")
    add("--shear-min", type=float, default=-1.0, help="shear range; App. C.5 ±1.0 (default), Sec. 5.3.4 ±1.5 "
        "(App. C.6: similar results)")
    add("--shear-max", type=float, default=1.0, help="see --shear-min")
    # standard augmentations, Sec. 5.4.1 ("random crops, horizontal flip, and color jitter", no values given)
    add("--color-jitter", choices=["authors", "strong", "none"], default="authors", help="authors: the released "
        "code's values, batched on the device (authors_color_jitter); strong: SimCLR's (0.4, 0.4, 0.4, 0.1, p 0.8); "
        "none. Drawn per clip (see --authors-code-shared-jitter)")
    # MoCo, Sec. 5.4.1
    add("--queue-size", type=int, default=None, help="|N| negatives in the queue, Eq. (5.1): paper 16384 "
        "(Mini-Kinetics), 65536 (Kinetics-400); 256 on toy data (192 videos)")
    add("--moco-momentum", type=float, default=None, help="m of the key encoder EMA (paper 0.999; toy 0.99)")
    add("--temperature", type=float, default=0.2, help="τ in Eq. (5.1) (paper 0.2)")
    add("--proj-dim", type=int, default=128, help="output of the 2-layer MLP projection head (paper 128)")
    # speed, teaching
    add("--tubelet-device", choices=["gpu", "cpu"], default="gpu", help="gpu: tubelets batched in the training step "
        "on the run's device (workers only decode); cpu: in the loader workers (when the GPU is the bottleneck)")
    add("--visualize", type=int, default=0, metavar="N", help="write a PNG grid and a GIF of N positive pairs into "
        "the run folder, then exit")
    # the authors' code (fmthoker/tubelet-contrast), where it differs from the thesis
    add("--authors-code", action="store_true", help="all --authors-code-* behaviours below")
    add("--authors-code-rotation", action="store_true", help="rotation as a random walk of ±6° per frame between "
        "keyframes instead of U(rotation-min, rotation-max) at keyframes")
    add("--authors-code-patches", action="store_true", help="patch sides from 6 scales x 7 aspect ratios with ±18%% "
        "jitter, shapes with p 0.5/0.35/0.15, per-frame opacity in [0.8, 1]")
    add("--authors-code-shared-jitter", action="store_true", help="one colour jitter for both clips of a pair")
    add("--authors-code-schedule", action="store_true", help="cosine schedule laid out for 2x --epochs, stopped "
        "after --epochs (released models: 200-epoch cosine stopped at 100)")
    return parser


def finalize_method_args(args):
    """Derived values in one place (paper defaults that depend on --data / --arch / --crop-size)."""
    common.check_dataset_name(getattr(args, "dataset_name", "toy-motion"))  # before any model is built
    if args.authors_code:
        args.authors_code_rotation = args.authors_code_patches = True
        args.authors_code_shared_jitter = args.authors_code_schedule = True
    toy = str(getattr(args, "data", "toy")).startswith("toy")
    args.arch = args.arch or ("tiny3d" if toy else "r2plus1d_18")
    args.crop_size = args.crop_size or (224 if args.arch == "i3d" else 112)
    args.resolution_scale = args.crop_size / 112  # App. C.2: patch sizes double at 224²
    args.patch_min = args.patch_min if args.patch_min is not None else 16 * args.resolution_scale
    args.patch_max = args.patch_max if args.patch_max is not None else 64 * args.resolution_scale
    if args.queue_size is None:
        data = str(getattr(args, "data", "toy"))
        args.queue_size = 256 if toy else 16384 if data == "minik" else 65536 if data.startswith("k") else 16384
    args.frame_strides = tuple(int(s) for s in str(args.frame_strides).strip("()").split(",") if s.strip())
    args.transforms = () if args.transform == "none" else tuple(t.strip() for t in args.transform.split(","))
    args.shape_ids = tuple(SHAPES.index(s.strip()) if s.strip() in SHAPES else -1 for s in args.shapes.split(","))
    if args.authors_code_schedule:  # released models: a cosine laid out for 2x --epochs, stopped after --epochs
        args.schedule_epochs = 2 * args.epochs
    checks = [
        (all(t in TRANSFORMS for t in args.transforms), f"--transform in none or {TRANSFORMS}", args.transform),
        (-1 not in args.shape_ids, f"--shapes from {SHAPES}", args.shapes),
        (2 <= args.keyframes <= args.clip_len, f"2 <= --keyframes <= --clip-len={args.clip_len}", args.keyframes),
        (0 < args.patch_min <= args.patch_max <= args.crop_size, f"0 < --patch-min <= --patch-max <= "
         f"--crop-size={args.crop_size}", (args.patch_min, args.patch_max)),
        (0 <= args.delta_min <= args.delta_max, "0 <= --delta-min <= --delta-max", (args.delta_min, args.delta_max)),
        (0 < args.nonlinear_span_min <= args.nonlinear_span_max <= 112, "0 < --nonlinear-span-min <= "
         "--nonlinear-span-max <= 112", (args.nonlinear_span_min, args.nonlinear_span_max)),
        (int(4 * args.nonlinear_sigma + 0.5) < args.nonlinear_points, "4·--nonlinear-sigma < --nonlinear-points",
         (args.nonlinear_sigma, args.nonlinear_points)),
        (args.num_tubelets >= 1, "--num-tubelets >= 1", args.num_tubelets),
    ]
    for ok, expected, actual in checks:
        if not ok:
            raise common.UserError(f"tubelet_contrast.py: expected {expected}, found {actual!r}")
    return args


# ================================================================================== TUBELETS (Sec. 5.3.2, Eq. 5.2-5.4)
# Patches cut from clip 1, moved and transformed over time, pasted identically onto both clips.


def sample_tubelets(batch_size, clip_len, height, width, args, device=None, generator=None):
    """All random choices of Sec. 5.3.2-5.3.4 for B x M tubelets, batched. Every tensor is (B, M, ...)."""
    rand = lambda *shape: torch.rand(*shape, device=device, generator=generator)
    b, m, t = batch_size, args.num_tubelets, clip_len
    n = b * m
    frame = torch.tensor([width, height], dtype=torch.float, device=device)
    if args.authors_code_patches:  # authors' code: 6 scales x 7 ratios, each side x exp(U(-0.18, 0.18))
        scales = torch.tensor([16, 24, 28, 32, 48, 64.0], device=device) * args.resolution_scale
        ratios = torch.tensor([0.5, 0.67, 0.75, 1.0, 1.33, 1.5, 2.0], device=device)
        s = scales[(rand(n) * 6).long().clamp(max=5)]
        r = ratios[(rand(n) * 7).long().clamp(max=6)]
        size = torch.stack([s * r.sqrt(), s / r.sqrt()], dim=1) * torch.exp(0.36 * rand(n, 2) - 0.18)
        shape = torch.multinomial(torch.tensor([0.5, 0.35, 0.15], device=device), n, True, generator=generator)
    else:  # Sec. 5.4.1: H' and W' ~ U(patch_min, patch_max), shape uniform over the set
        size = args.patch_min + rand(n, 2) * (args.patch_max - args.patch_min)  # (n, 2) = (w, h)
        ids = torch.tensor(args.shape_ids, device=device)
        shape = ids[(rand(n) * len(ids)).long().clamp(max=len(ids) - 1)]
    size = torch.minimum(size.clamp(min=1.0), frame)  # (n, 2)
    soft = torch.where(rand(n) < args.soft_edge_prob, 0.6 + 0.3 * rand(n), torch.ones(n, device=device))  # (n,)
    source_frame = (rand(n) * t).long().clamp(max=t - 1)  # the patch is cut from this frame of clip 1
    source_centre = size / 2 + rand(n, 2) * (frame - size)  # (n, 2), patch fully inside clip 1
    out = dict(size=size, shape=shape, soft=soft, source_frame=source_frame, source_centre=source_centre)
    if args.motion == "linear":
        out["centres"], out["motion_keyframes"], out["delta"] = linear_paths(n, t, height, width, args, device,
                                                                            generator)
    elif args.motion == "nonlinear":
        out["centres"] = nonlinear_paths(n, t, height, width, args, device, generator)
    else:  # static tubelet, Eq. (5.2) with x^1 = ... = x^T
        out["centres"] = (rand(n, 1, 2) * frame).expand(n, t, 2).contiguous()
    out["matrix"], params = transform_matrices(n, t, args, device, generator)
    out.update(params)
    if args.authors_code_patches:  # authors' code: per-frame opacity, keyframed U(0.8, 1.0)
        keyframes = sample_keyframes(n, t, args.keyframes, device, generator)
        out["opacity"] = interpolate_keyframes(keyframes, 0.8 + 0.2 * rand(n, args.keyframes, 1), t)[..., 0]
    else:
        out["opacity"] = torch.ones(n, t, device=device)
    return {k: v.view(b, m, *v.shape[1:]) for k, v in out.items()}


def tubelet_pairs(video, args, generator=None):
    """Tubelet-contrastive positive pairs (Sec. 5.3.2) from a batch of B clips of B different videos.

    video (B, C, T, H, W). Clip 2 of pair i is the clip of video i + 1 (mod B), so every decoded clip serves as
    clip 1 of one pair and as background of another (deviation: the authors decode a second random video)."""
    if video.shape[0] < 2:
        raise ValueError(f"tubelet_contrast.py: tubelet pairs need clips of >= 2 videos per batch, got {video.shape}")
    b, _, t, h, w = video.shape
    tubelets = sample_tubelets(b, t, h, w, args, video.device, generator)
    clip_1, clip_2 = paste_tubelets(video, None, tubelets, max_window_side(args, h, w))  # clip 2: video rolled by -1
    return clip_1, clip_2, tubelets


def paste_tubelets(clip_1, clip_2, tubelets, side=None):
    """Eq. (5.4): v̂_i = v_i ⊙ {Tubelet_p1 .. Tubelet_pM}, the same patches, paths, masks and transforms on both.

    clip_1, clip_2 (B, C, T, H, W) uint8 or float; the patches are cut from clip_1; clip_2 None: clip_1 rolled
    by -1 along the batch (tubelet_pairs), copied straight into the output. Returns two clips of the input's
    dtype and value range (uint8: the blend is rounded, as the authors' uint8 images are). side: the window side S
    of the GPU pass, max_window_side(args, H, W) (tubelet_pairs passes it; None: the exact largest).

    The plain version (tests/test_tubelet_contrast.py checks both paths against it): for every sample b, tubelet m
    and frame t, take the pixels p around the centre c_t, map each back into the patch, u = A_t^-1 (p - c_t), read
    clip 1 at source_centre + u (bilinear), and blend it into both clips with the shape's alpha(u):
    v(p) <- v(p) (1 - alpha) + patch(p) alpha."""
    # a GPU wants a few fixed-shape launches and no host syncs; one CPU core wants the fewest pixels touched
    if clip_1.device.type == "cpu":
        return paste_exact_windows(clip_1, clip_2, tubelets)
    return paste_fixed_windows(clip_1, clip_2, tubelets, side)


def window_coefficients(tubelets, origin, source_origin, source_size):
    """(3, 4, ..., T) offset, per-column and per-row coefficients of four planes, each affine in the window pixel
    (j, i): x, y of the grid_sample position of the patch pixel and x, y of u / (size / 2) (1 on the patch border).

    tubelets: (..., ...) tensors; origin (..., T, 2) float, x, y of each window's top-left pixel; source_origin,
    source_size (..., 2) or (2,): x, y and width, height of the part of the frame grid_sample reads. Pixel x covers
    [x, x + 1), its centre is x + 0.5: at window pixel (j, i), p = origin + (j, i) + 0.5 and
    u = A_t^-1 (p - c_t) = u_0 + j A^-1[:, 0] + i A^-1[:, 1] with u_0 = A^-1 (origin + 0.5 - c_t)."""
    # A^-1 in closed form, [[d, -b], [-c, a]] / (ad - bc): torch.linalg.inv would check for errors on the host
    a00, a01, a10, a11 = tubelets["matrix"].flatten(-2).unbind(-1)  # each (..., T)
    inverse = torch.stack([a11, -a01, -a10, a00], -1).unflatten(-1, (2, 2)) / (a00 * a11 - a01 * a10)[..., None, None]
    u0 = (inverse @ (origin + 0.5 - tubelets["centres"])[..., None])[..., 0]  # (..., T, 2)
    u = torch.stack([u0, inverse[..., 0], inverse[..., 1]], -2)  # (..., T, 3, 2) u = u0 + j col_0 + i col_1
    to_source = 2 / source_size.expand_as(tubelets["size"])  # (..., 2) pixels -> grid_sample's [-1, 1]
    scale = torch.cat([to_source, 2 / tubelets["size"]], -1)  # (..., 4)
    coef = torch.cat([u, u], -1) * scale[..., None, None, :]  # (..., T, 3, 4)
    # align_corners=False convention
    coef[..., 0, :2] += ((tubelets["source_centre"] - source_origin) * to_source - 1)[..., None, :]
    return coef.movedim((-2, -1), (0, 1)).contiguous()  # (3, 4, ..., T)


def render_tubelets(source, planes, opacity, shape, soft):
    """Patch pixels and alpha of n tubelets at the window pixels of `planes` (Eq. 5.3, Eq. 5.7).

    source (n, C, H', W'): the part of clip 1's frame each patch is read from; planes (4, n, *window): at each
    window pixel, x, y of its grid_sample position in source and x, y of u / (size / 2) (window_coefficients;
    window (T, S, S) on the GPU, (rows, width) on the CPU); opacity broadcastable to (n, *window), or None (opaque).
    Returns patch (n, C, *window), alpha (n, *window).
    Each window pixel p is mapped back into the patch, u = A_t^-1 (p - c_t), and read from clip 1 at
    source_centre + u with one grid_sample for all tubelets and frames; alpha is the tubelet's shape at u.
    shape, soft: Python numbers shared by the n tubelets (the CPU path: one distance, no torch.where), or (n,)
    tensors: each tubelet's own, picked by torch.where (no host sync)."""
    n, c, window = source.shape[0], source.shape[1], planes.shape[2:]
    grid = planes[:2].view(2, n, -1, window[-1]).permute(1, 2, 3, 0)  # (n, rows, width, 2), a view
    patch = F.grid_sample(source, grid, align_corners=False)  # (n, C, rows, width)
    rx, ry = planes[2:].abs_()  # (n, *window) each
    # distance from the centre of the shape: rectangle L_inf, ellipse L2, rhombus L1
    if not torch.is_tensor(shape):
        dist = (torch.maximum, torch.hypot, torch.add)[shape](rx, ry)  # (n, *window)
    else:
        shape = shape.view(n, *(1,) * len(window))
        dist = torch.where(shape == 0, torch.maximum(rx, ry), torch.where(shape == 1, torch.hypot(rx, ry), rx + ry))
    # soft 1: hard edge; s < 1: alpha falls linearly from d = s to d = 1
    if not torch.is_tensor(soft):
        alpha = dist.sub_(1).div_(soft - 1).clamp_(0, 1) if soft < 1 else dist.lt_(1)  # lt_: 1.0 where d < 1
    else:
        soft = soft.view(n, *(1,) * len(window))
        alpha = torch.where(soft < 1, ((1 - dist) / (1 - soft).clamp_min(1e-6)).clamp(0, 1), (dist < 1).float())
    alpha = alpha if opacity is None else alpha * opacity
    return patch.view(n, c, *window), alpha


def window_sides(tubelets):
    """(B, M) side of the square window that holds a tubelet's transformed patch in every frame (+ rounding slack)."""
    extent = (tubelets["matrix"].abs() @ (tubelets["size"] / 2)[:, :, None, :, None])[..., 0]  # (B, M, T, 2) half
    return (2 * extent.amax(dim=(2, 3))).ceil().long() + 3


def paste_exact_windows(clip_1, clip_2, tubelets):
    """CPU path of paste_tubelets: the plain loop over samples and tubelets. Each tubelet is rendered once for all
    frames and both clips, frame t in the rows of its box (the bounding box of the transformed shape, clipped to
    the frame), all as wide as the widest box of the tubelet: alpha is exact at every pixel, so any window that
    holds the box gives the same result. Only each frame's box is blended, in both clips at once, through numpy
    slices of one (2, B, C, T, H, W) buffer (a small numpy op costs ~1.5 us, torch ~6). Returns two
    (B, C, T, H, W) views of it."""
    b, c, t, h, w = clip_1.shape
    # both clips in one buffer, filled sample by sample (clip_2 None: clip_1 rolled by -1 along the batch); numpy
    # puts large blocks on transparent huge pages where the kernel allows it (a few page faults, not thousands)
    pair = torch.from_numpy(np.empty((2, b, c, t, h, w), dtype=clip_1.numpy().dtype))
    frame = torch.tensor([w, h])
    # the part of clip 1 each patch is read from: its box and the pixels bilinear reads reach beyond it (where
    # grid_sample reads zeros past this part, alpha is 0)
    half_size = tubelets["size"] / 2  # (B, M, 2)
    source_lo = (tubelets["source_centre"] - half_size - 0.5).floor().long().clamp(min=0)  # (B, M, 2)
    source_hi = torch.minimum((tubelets["source_centre"] + half_size - 0.5).floor().long() + 2, frame)  # (B, M, 2)
    # per frame, the half extent along x and y of the transformed shape A {u: d(u / (size / 2)) < 1}: the dual norm
    # of (|a_k0| size_0, |a_k1| size_1) / 2, rectangle (L_inf ball) L1, ellipse L2, rhombus (L1 ball) L_inf
    axes = tubelets["matrix"].abs() * (tubelets["size"] / 2)[:, :, None, None, :]  # (B, M, T, 2, 2)
    shape = tubelets["shape"][:, :, None, None]  # (B, M, 1, 1)
    extent = torch.where(shape == 0, axes.sum(-1), torch.where(shape == 1, axes.norm(dim=-1), axes.amax(-1)))
    # the box of pixels p whose centre p + 0.5 can lie inside c ± extent (those left out are >= 1 px outside)
    lo = (tubelets["centres"] - extent - 0.5).floor().long().clamp(min=0)  # (B, M, T, 2) box, x, y in the frame
    hi = torch.minimum((tubelets["centres"] + extent + 0.5).floor().long() + 1, frame)  # (B, M, T, 2) box end
    box = (hi - lo).clamp(min=0)  # (B, M, T, 2) width, height of each frame's box
    rows = torch.where(box.amin(-1) > 0, box[..., 1], 0)  # (B, M, T) window rows of frame t (0: outside the frame)
    width = box[..., 0].amax(2).clamp(min=1)  # (B, M) window width: the widest box of the tubelet
    # window row 0 of frame t is its box's top row, column 0 is left of its box, the window inside the frame
    origin = torch.stack([torch.minimum(lo[..., 0], w - width[..., None]), lo[..., 1]], -1)  # (B, M, T, 2)
    coef = window_coefficients(tubelets, origin.float(), source_lo, (source_hi - source_lo).float())  # (3,4,B,M,T)
    # all windows' rows one after another (tubelet by tubelet, frame by frame): at row r, each plane is affine in
    # the column j, base + j slope; numpy repeats ~30x faster than torch's index_select here
    count = rows.flatten().numpy()  # (B*M*T,) rows per frame
    first = np.cumsum(count) - count  # (B*M*T,) its first row
    row = torch.from_numpy((np.arange(count.sum()) - np.repeat(first, count)).astype(np.float32))  # (R,) row i
    per_row = torch.from_numpy(np.repeat(coef.flatten(2).numpy(), count, axis=2))  # (3, 4, R)
    base, slope = torch.addcmul(per_row[0], per_row[2], row), per_row[1]  # (4, R) each
    opacity = torch.from_numpy(np.repeat(tubelets["opacity"].flatten().numpy(), count))  # (R,)
    cols = torch.arange(w, dtype=torch.float)  # (W,) window column j
    first = torch.from_numpy(first).view(b, -1, t)  # (B, M, T) first row of frame t
    # (B, M, T, 6): each frame's box and its corner in the tubelet's window (column, row)
    boxes = torch.cat([lo, hi, lo[..., :1] - origin[..., :1], (first - first[..., :1])[..., None]], -1)
    opaque = (tubelets["opacity"] == 1).all(-1)  # (B, M)
    # uint8: alpha in steps of 1/256, a = round(256 α); v (1 - α) + patch α rounded = (v (256 - a) + round(patch a)
    # + 128) >> 8 in uint16 (at most 255 * 256 + 128): exact where α is 0 or 1, within 1 level at soft edges
    integer, half = pair.dtype == torch.uint8, torch.tensor(128.5)
    # host values sample by sample: a whole batch of nested lists (~1,200 alive at once) sets off the garbage
    # collector about twice per batch, now and then a full pass over every Python object (~3 % of the CPU time)
    host = zip(width, boxes, tubelets["shape"], tubelets["soft"], opaque, tubelets["source_frame"],
               torch.cat([source_lo, source_hi], -1), first[..., 0], rows.sum(-1))  # B rows each
    both = pair.numpy()  # (2, B, C, T, H, W), the same memory
    # the outputs are made above; inside, no autograd bookkeeping on ~30 small ops per tubelet (~4 % of the time)
    with torch.inference_mode():
        for i, host_i in enumerate(host):
            background = clip_1[(i + 1) % b] if clip_2 is None else clip_2[i]  # (C, T, H, W)
            both[0, i], both[1, i] = clip_1[i].numpy(), background.numpy()  # numpy copies: ~20 % faster than torch's
            for j, host_ij in enumerate(zip(*(v.tolist() for v in host_i))):
                sx, boxes_ij, shape, soft, opaque_ij, src_f, (src_x0, src_y0, src_x1, src_y1), r0, n = host_ij
                if n == 0:  # outside the frame in every frame
                    continue
                # (4, 1, n, Sx): the planes of the tubelet's n window rows (addcmul broadcasts slowly on a CPU)
                planes = (slope[:, r0:r0 + n, None] * cols[:sx]).add_(base[:, r0:r0 + n, None]).unsqueeze(1)
                # (1, C, h', w'): the source frame's part of unpasted clip 1 (clip 1 is never written)
                source = clip_1[i, None, :, src_f, src_y0:src_y1, src_x0:src_x1].float()
                # patch (1, C, n, Sx), alpha (1, n, Sx); tubelet j is pasted over tubelets 0 .. j - 1
                opacity_ij = None if opaque_ij else opacity[None, r0:r0 + n, None]  # (1, n, 1)
                patch, alpha = render_tubelets(source, planes, opacity_ij, shape, soft)
                if integer:
                    a = alpha[0].mul_(256).round_()  # (n, Sx)
                    keep = np.subtract(256, a.numpy(), dtype=np.uint16, casting="unsafe")  # (n, Sx)
                    add = torch.addcmul(half, patch[0], a).to(torch.uint16).numpy()  # (C, n, Sx)
                else:
                    keep, add = (1 - alpha[0]).numpy(), (patch[0] * alpha[0]).numpy()  # (n, Sx), (C, n, Sx)
                for k, (x1, y1, x2, y2, wx, wy) in enumerate(boxes_ij):  # frame k's box, its corner in the window
                    if x1 < x2 and y1 < y2:
                        keep_f = keep[wy:wy + y2 - y1, wx:wx + x2 - x1]  # (h', w')
                        add_f = add[:, wy:wy + y2 - y1, wx:wx + x2 - x1]  # (C, h', w')
                        region = both[:, i, :, k, y1:y2, x1:x2]  # (2, C, h', w') view: both clips
                        blend = region * keep_f + add_f  # v (1 - α) + patch α, scaled by 256 when integer
                        region[...] = blend >> 8 if integer else blend
    return pair[0], pair[1]


def paste_fixed_windows(clip_1, clip_2, tubelets, side=None):
    """GPU path of paste_tubelets: the loops over b and t become tensor dimensions, one pass per tubelet index m
    of fixed shape: every tubelet gets a window of the same side S, window pixels outside the frame are sent to a
    scratch clip, and nothing waits for the device (no .item(), no data-dependent shapes), so the launches do not
    depend on the batch. side None: the exact largest (one host sync)."""
    b, c, t, h, w = clip_1.shape
    m = tubelets["size"].shape[1]
    side = int(window_sides(tubelets).max()) if side is None else side
    # both output clips in one buffer (2, B + 1, C, T, H, W): the extra clip B is scratch space where the pixels
    # of a window that fall outside the frame are sent, so every pass has the same shape (B windows of S x S)
    buffer = torch.empty((2, b + 1, c, t, h, w), dtype=clip_1.dtype, device=clip_1.device)
    buffer[0, :b] = clip_1  # only the windows are touched below, in the input's dtype
    buffer[1, :b] = clip_1.roll(-1, 0) if clip_2 is None else clip_2
    flat = buffer.view(2, -1)
    samples = torch.arange(b, device=clip_1.device)
    grid = torch.arange(side, device=clip_1.device)
    grid_float = grid.float()  # (S,) window column j, row i
    scratch = b * c * t * h * w  # first element of the scratch clip
    plane = (torch.arange(c, device=clip_1.device) * (t * h * w)).view(1, c, 1, 1, 1)  # (1, C, 1, 1, 1)
    frame = (torch.arange(t, device=clip_1.device) * (h * w)).view(1, t, 1, 1)  # (1, T, 1, 1) frame offsets
    for j in range(m):  # tubelet j of every sample is pasted over tubelets 0 .. j - 1
        tube = {k: v[:, j] for k, v in tubelets.items()}  # (B, ...)
        source = clip_1[samples, :, tube["source_frame"]].float()  # (B, C, H, W): the frame of the unpasted clip 1
        origin = tube["centres"].floor().long() - side // 2  # (B, T, 2) window's top-left pixel
        coef = window_coefficients(tube, origin.float(), 0, torch.tensor([w, h], device=clip_1.device))  # (3,4,B,T)
        c0, c1, c2 = coef[..., None, None]  # each (4, B, T, 1, 1): offset, per column j, per row i
        planes = torch.addcmul(c0, c2, grid_float[:, None]) + c1 * grid_float  # (4, B, T, S, S)
        opacity = tube["opacity"][:, :, None, None]  # (B, T, 1, 1)
        patch, alpha = render_tubelets(source, planes, opacity, tube["shape"], tube["soft"])  # (B,C,T,S,S), (B,T,S,S)
        y = origin[..., 1, None, None] + grid[:, None]  # (B, T, S, 1) frame row of each window row
        x = origin[..., 0, None, None] + grid[None, :]  # (B, T, 1, S) frame column of each window column
        inside = (y >= 0) & (y < h) & (x >= 0) & (x < w)  # (B, T, S, S)
        pixel = samples.view(-1, 1, 1, 1) * (c * t * h * w) + frame + y * w + x  # (B, T, S, S) channel 0
        pixel = torch.where(inside, pixel, scratch)  # off-frame pixels go to the scratch clip
        index = (pixel.unsqueeze(1) + plane).view(-1)  # (B * C * T * S * S,) every channel
        region = flat.index_select(1, index).view(2, *patch.shape).float()  # (2, B, C, T, S, S) both clips
        blended = torch.lerp(region, patch, alpha.unsqueeze(1))  # v (1 - α) + patch α, exactly patch where α = 1
        if flat.dtype == torch.uint8:
            blended = blended.round_()  # within [0, 255]: a blend of two values in [0, 255]
        flat.index_copy_(1, index, blended.to(flat.dtype).view(2, -1))
    return buffer[0, :b], buffer[1, :b]


def max_window_side(args, height, width):
    """The largest window_sides() any tubelet sample_tubelets can draw, from the flags alone (no look at the data):
    |A h| <= ||A||_2 |h|_2 with ||R|| = 1, ||shear(s)|| = (|s| + sqrt(s² + 4)) / 2, ||diag(scale)|| = max scale,
    |h|_2 = half the patch diagonal. Capped at 2 max(H, W) + 3: such a window covers the frame from any centre."""
    longest = args.patch_max if not args.authors_code_patches else \
        64 * args.resolution_scale * math.sqrt(2) * math.exp(0.18)  # largest side of the authors' 6 x 7 table
    diagonal = math.hypot(min(longest, width), min(longest, height))
    shear = max(abs(args.shear_min), abs(args.shear_max)) if "shear" in args.transforms else 0.0
    norm = ((shear + math.sqrt(shear ** 2 + 4)) / 2) ** 2  # shear along x, then along y
    norm *= max(abs(args.scale_min), abs(args.scale_max)) if "scale" in args.transforms else 1.0
    return min(math.ceil(norm * diagonal) + 3, 2 * max(height, width) + 3)


def tubelet_collate(items, args):
    """--tubelet-device cpu: collate, then make the pairs in the loader worker ("clip_q", "clip_k")."""
    batch = default_collate(items)
    batch["clip_q"], batch["clip_k"], _ = tubelet_pairs(batch.pop("video"), args)
    return batch


# ============================================================================ TUBELET MOTION (Sec. 5.3.3, Eq. 5.5-5.6)
def sample_keyframes(n, clip_len, num_keyframes, device=None, generator=None):
    """(n, K) sorted frame indices: 0, T - 1 and K - 2 distinct random inner frames (Sec. 5.3.3 / 5.3.4)."""
    first = torch.zeros(n, 1, dtype=torch.long, device=device)
    last = torch.full((n, 1), clip_len - 1, dtype=torch.long, device=device)
    inner = torch.rand(n, clip_len - 2, device=device, generator=generator).argsort(dim=1)[:, :num_keyframes - 2] + 1
    return torch.cat([first, inner, last], dim=1).sort(dim=1).values  # (n, K)


def interpolate_keyframes(keyframes, values, clip_len):
    """Linear interpolation ('Interp' of Eq. 5.5 and 5.7): keyframes (n, K) sorted, values (n, K, D) -> (n, T, D)."""
    n, k = keyframes.shape
    t = torch.arange(clip_len, device=keyframes.device).expand(n, clip_len).contiguous()  # (n, T)
    segment = (torch.searchsorted(keyframes, t, right=True) - 1).clamp(0, k - 2)  # (n, T) keyframe to the left
    t0, t1 = keyframes.gather(1, segment), keyframes.gather(1, segment + 1)  # (n, T)
    w = ((t - t0).float() / (t1 - t0).float()).unsqueeze(-1)  # (n, T, 1)
    index = segment.unsqueeze(-1).expand(-1, -1, values.shape[-1])  # (n, T, D)
    v0, v1 = values.gather(1, index), values.gather(1, index + 1)
    return v0 + w * (v1 - v0)  # (n, T, D)


def linear_paths(n, clip_len, height, width, args, device=None, generator=None):
    """Eq. (5.5): centres at K keyframes, neighbours at most Δ ~ U(delta_min, delta_max) apart, linear in between.

    Returns centres (n, T, 2) as (x, y) pixels, keyframes (n, K), Δ (n,)."""
    rand = lambda *shape: torch.rand(*shape, device=device, generator=generator)
    size = torch.tensor([width, height], dtype=torch.float, device=device)
    delta = (args.delta_min + rand(n) * (args.delta_max - args.delta_min)) * args.resolution_scale  # (n,)
    points = [rand(n, 2) * size]  # (n, 2), first keyframe ~ (U(0, W), U(0, H))
    for _ in range(args.keyframes - 1):
        radius = delta * rand(n).sqrt()  # uniform in the disk of radius Δ around the previous keyframe
        angle = 2 * math.pi * rand(n)
        step = torch.stack([angle.cos(), angle.sin()], dim=1) * radius[:, None]  # (n, 2)
        # clamping into the frame only moves the point towards the previous (inside) one, so |step| <= Δ still holds
        points.append(torch.minimum(torch.maximum(points[-1] + step, torch.zeros_like(size)), size))
    keyframes = sample_keyframes(n, clip_len, args.keyframes, device, generator)  # (n, K)
    return interpolate_keyframes(keyframes, torch.stack(points, dim=1), clip_len), keyframes, delta


def nonlinear_paths(n, clip_len, height, width, args, device=None, generator=None):
    """Eq. (5.6): N uniform points, 1-D Gaussian smoothing (σ) of x and y, resampled from N to T. -> (n, T, 2)."""
    rand = lambda *shape: torch.rand(*shape, device=device, generator=generator)
    size = torch.tensor([width, height], dtype=torch.float, device=device).view(1, 2, 1)
    points = rand(n, 2, args.nonlinear_points) * size  # (n, 2, N)
    sigma, radius = args.nonlinear_sigma, int(4 * args.nonlinear_sigma + 0.5)  # scipy's truncate = 4
    x = torch.arange(-radius, radius + 1, dtype=torch.float, device=device)
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    g = (g / g.sum()).view(1, 1, -1).expand(2, 1, -1)  # (2, 1, 2r + 1), discrete form of g(z) in Eq. (5.6)
    smooth = F.conv1d(F.pad(points, (radius, radius), mode="reflect"), g, groups=2)  # (n, 2, N)
    # Deviation (authors' code): min-max normalise and stretch to a random extent S at a random offset. Smoothing
    # uniform noise alone leaves paths within a few pixels of the frame centre (README), i.e. nearly static.
    lo, hi = smooth.amin(dim=2, keepdim=True), smooth.amax(dim=2, keepdim=True)
    unit = (smooth - lo) / (hi - lo).clamp_min(1e-6)  # (n, 2, N) in [0, 1]
    span_min, span_max = (s * args.resolution_scale for s in (args.nonlinear_span_min, args.nonlinear_span_max))
    span = (span_min + rand(n, 1, 1) * (span_max - span_min)).clamp(max=min(height, width))  # (n, 1, 1)
    offset = rand(n, 2, 1) * (size - span)  # (n, 2, 1), path stays inside [0, W] x [0, H]
    path = F.interpolate(unit * span + offset, size=clip_len, mode="linear", align_corners=True)  # (n, 2, T)
    return path.transpose(1, 2)  # (n, T, 2)


# ======================================================================== TUBELET TRANSFORMATION (Sec. 5.3.4, Eq. 5.7)
def transform_matrices(n, clip_len, args, device=None, generator=None):
    """Eq. (5.7): scale / rotation / shear parameters θ at K keyframes, identity at the first frame, linear in
    between. Returns A (n, T, 2, 2) mapping patch offsets to frame offsets, and the parameters for inspection."""
    rand = lambda *shape: torch.rand(*shape, device=device, generator=generator)
    k = args.keyframes
    keyframes = sample_keyframes(n, clip_len, k, device, generator)  # (n, K)
    uniform = lambda lo, hi, d: lo + rand(n, k, d) * (hi - lo)  # θ^k ~ U(Min, Max)
    scale = uniform(args.scale_min, args.scale_max, 2) if "scale" in args.transforms else torch.ones(n, k, 2,
                                                                                                      device=device)
    shear = uniform(args.shear_min, args.shear_max, 2) if "shear" in args.transforms else torch.zeros(n, k, 2,
                                                                                                       device=device)
    if "rotation" not in args.transforms:
        angle = torch.zeros(n, k, 1, device=device)
    elif args.authors_code_rotation:  # authors' code: random walk, ±6° per frame of keyframe gap
        gap = (keyframes[:, 1:] - keyframes[:, :-1]).float().unsqueeze(-1)  # (n, K - 1, 1)
        walk = (2 * rand(n, k - 1, 1) - 1) * 6 * gap
        angle = torch.cat([torch.zeros(n, 1, 1, device=device), walk.cumsum(dim=1)], dim=1)
    else:
        angle = uniform(args.rotation_min, args.rotation_max, 1)  # (n, K, 1) degrees
    scale[:, 0], shear[:, 0], angle[:, 0] = 1.0, 0.0, 0.0  # first keyframe (frame 0): the untransformed patch p
    scale, shear, angle = (interpolate_keyframes(keyframes, v, clip_len) for v in (scale, shear, angle))
    a = torch.deg2rad(angle[..., 0])  # (n, T); positive = clockwise on screen (image y points down)
    one, zero = torch.ones_like(a), torch.zeros_like(a)
    rotation = torch.stack([a.cos(), -a.sin(), a.sin(), a.cos()], dim=-1).view(n, clip_len, 2, 2)
    # shear along x then y: det = 1 for every (r, s), unlike [[1, r], [s, 1]] which is singular at r = s = 1
    shear_x = torch.stack([one, shear[..., 0], zero, one], dim=-1).view(n, clip_len, 2, 2)
    shear_y = torch.stack([one, zero, shear[..., 1], one], dim=-1).view(n, clip_len, 2, 2)
    matrix = rotation @ shear_y @ shear_x @ torch.diag_embed(scale)  # (n, T, 2, 2)
    return matrix, dict(transform_keyframes=keyframes, scale=scale, shear=shear, angle=angle[..., 0])


# ============================================================================= TEMPORAL CONTRAST BASELINE (Sec. 5.3.1)
def temporal_pairs(video):
    """Temporal-contrast baseline (Sec. 5.3.1): two temporal crops of the same video, (B, 2, C, T, H, W)."""
    if video.dim() != 6 or video.shape[1] != 2:
        raise ValueError(f"tubelet_contrast.py: --baseline temporal expects (B, 2, C, T, H, W) from a dataset with "
                         f"num_clips=2, got {tuple(video.shape)}")
    return video[:, 0], video[:, 1]


# ==================================================================================================== AUGMENTATION
# RGB <-> YIQ (NTSC): Y is luma, (I, Q) the chroma plane; a hue shift is a rotation of (I, Q), saturation its scale
RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])


YIQ_TO_RGB = torch.linalg.inv(RGB_TO_YIQ)


def authors_color_jitter(x, p=0.2, brightness=32 / 255, contrast=0.2, hue_degrees=24.0, saturation=0.1,
                         generator=None):
    """--color-jitter authors: the released code's RandomBrightness / RandomContrast / RandomHueSaturation, each
    applied with probability p per clip, batched as one affine colour map per clip: x' = M c (x + b).

    x (N, 3, T, H, W) float in [0, 1]. b ~ U(±brightness), c = e^U(±contrast); hue: rotation of the YIQ chroma plane
    by U(±hue_degrees) (the code adds U(±12) to OpenCV's 0..179 hue, i.e. ±24°), saturation: its scale e^U(±s).
    Deviations: YIQ rotation instead of an HSV round trip (equal for grey, close for colours), one clamp at the end
    instead of one per operation."""
    n = x.shape[0]
    rand = lambda *shape: torch.rand(*shape, device=x.device, generator=generator)
    apply = lambda: (rand(n) < p).float()  # (N,) 1 where the operation is applied
    b = apply() * (2 * rand(n) - 1) * brightness  # (N,)
    c = torch.exp(apply() * (2 * rand(n) - 1) * contrast)  # (N,)
    on = apply()
    angle = torch.deg2rad(on * (2 * rand(n) - 1) * hue_degrees)  # (N,)
    scale = torch.exp(on * (2 * rand(n) - 1) * saturation)  # (N,)
    chroma = torch.zeros(n, 3, 3, device=x.device)
    chroma[:, 0, 0] = 1.0  # luma unchanged
    chroma[:, 1, 1], chroma[:, 1, 2] = scale * angle.cos(), -scale * angle.sin()
    chroma[:, 2, 1], chroma[:, 2, 2] = scale * angle.sin(), scale * angle.cos()
    matrix = YIQ_TO_RGB.to(x.device) @ chroma @ RGB_TO_YIQ.to(x.device) * c.view(n, 1, 1)  # (N, 3, 3) RGB -> RGB
    out = torch.einsum("nij,njthw->nithw", matrix, x + b.view(n, 1, 1, 1, 1))  # (N, 3, T, H, W)
    return out.clamp_(0, 1)


def make_prepare(args):
    """Colour jitter per clip (shared by the pair with --authors-code-shared-jitter) and normalisation; on the
    batch's device, after the tubelets are pasted. Inputs are float or uint8 in [0, 255], (B, C, T, H, W)."""
    def jitter(clips):  # (N, C, T, H, W) in [0, 1]
        if args.color_jitter == "authors":
            return authors_color_jitter(clips)
        return common.color_jitter(clips) if args.color_jitter == "strong" else clips

    def prepare(clip_q, clip_k):
        pair = torch.stack([clip_q, clip_k], dim=1).float() / 255  # (B, 2, C, T, H, W) in [0, 1]
        if args.authors_code_shared_jitter:  # one draw per pair: jitter B clips, apply the same map to both
            b = pair.shape[0]
            pair = jitter(pair.transpose(1, 2).flatten(2, 3)).view(b, -1, 2, *pair.shape[3:]).transpose(1, 2)
        else:
            pair = jitter(pair.flatten(0, 1)).view(pair.shape)
        pair = common.normalize(pair)  # channels at dim -4
        return pair[:, 0].contiguous(), pair[:, 1].contiguous()

    return prepare


# ==================================================================================================== MOCO (Sec. 5.4.1)
class MoCo(nn.Module):
    """Momentum contrast (He et al., CVPR 2020) as used in Sec. 5.4.1.

    Query encoder = backbone + 2-layer MLP head (feature_dim -> feature_dim -> proj_dim); key encoder = its
    momentum copy; queue (K, D) of past keys and its pointer are buffers, so checkpoints carry them."""

    def __init__(self, backbone, proj_dim=128, queue_size=16384, momentum=0.999, all_gather=common.all_gather_nograd):
        super().__init__()
        dim = backbone.feature_dim
        self.backbone = backbone
        self.head = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(inplace=True), nn.Linear(dim, proj_dim))
        self.backbone_k = copy.deepcopy(self.backbone)
        self.head_k = copy.deepcopy(self.head)
        for p in self.key_parameters():
            p.requires_grad_(False)
        self.momentum = momentum
        self.all_gather = all_gather  # keys of all processes enter the queue, like MoCo's concat_all_gather
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, proj_dim), dim=1))  # (K, D)
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    def query_parameters(self):
        return list(self.backbone.parameters()) + list(self.head.parameters())

    def key_parameters(self):
        return list(self.backbone_k.parameters()) + list(self.head_k.parameters())

    @torch.no_grad()
    def momentum_update(self):
        # θ_k <- m θ_k + (1 - m) θ_q
        torch._foreach_lerp_(self.key_parameters(), self.query_parameters(), 1.0 - self.momentum)

    @torch.no_grad()
    def enqueue(self, keys):
        keys = self.all_gather(keys.detach().float())[-self.queue.shape[0]:]  # (n, D), n <= K
        n, size = keys.shape[0], self.queue.shape[0]
        index = (self.queue_ptr + torch.arange(n, device=keys.device)) % size  # wraps: K need not divide n
        self.queue[index] = keys
        self.queue_ptr.copy_((self.queue_ptr + n) % size)

    def forward(self, clip_q, clip_k):
        """Returns Z_q (B, D), Z_k (B, D) and the negatives (K, D) as they were before this batch was enqueued."""
        z_q = F.normalize(self.head(self.backbone(clip_q)), dim=1)  # (B, D)
        with torch.no_grad():
            self.momentum_update()  # before the keys are computed, as in MoCo
            z_k = F.normalize(self.head_k(self.backbone_k(clip_k)), dim=1)  # (B, D)
        negatives = self.queue.clone()  # (K, D)
        self.enqueue(z_k)
        return z_q, z_k, negatives


# ==================================================================================================== LOSS (Eq. 5.1)
def info_nce(z_v, z_v_prime, negatives, tau):
    """InfoNCE of Eq. (5.1), in the paper's notation: h(a, b) = exp(a·b / τ), N = the negative embeddings.

    z_v (B, D), z_v_prime (B, D), negatives (K, D), all L2-normalised. Returns (mean loss, accuracy of picking the
    positive among the K + 1 candidates); the loss is ln(K + 1) when all logits are equal."""
    positive = (z_v * z_v_prime).sum(dim=1, keepdim=True)  # (B, 1)  Z_v·Z_v'
    negative = z_v @ negatives.t()  # (B, K)  Z_v·Z_n
    logits = torch.cat([positive, negative], dim=1) / tau  # (B, 1 + K)
    target = torch.zeros(z_v.shape[0], dtype=torch.long, device=z_v.device)  # the positive is column 0
    loss = F.cross_entropy(logits, target)  # -log h(v,v') / (h(v,v') + Σ_n h(v,n))
    accuracy = (logits.argmax(dim=1) == 0).float().mean()
    return loss, accuracy


# ==================================================================================================== TRAIN STEP
@torch.no_grad()
def batch_accuracy(z_q, z_k, args):
    """In-batch instance discrimination: is k_i the closest of the batch's keys to q_i (chance 1/(B-1) with
    tubelets, 1/B for the baseline)? Unlike inst_acc it cannot be won from a stale queue or from batch-norm
    statistics shared by the batch. With tubelets, k_(i-1) is pasted on q_i's own background (tubelet_pairs), so
    it is left out: it would reward appearance, not the tubelets."""
    similarity = z_q.float() @ z_k.float().t()  # (B, B)
    b = similarity.shape[0]
    if args.baseline == "none":
        same_background = torch.arange(b, device=z_q.device).roll(1)  # key i - 1 has q_i's background
        similarity[torch.arange(b), same_background] = float("-inf")
    return (similarity.argmax(dim=1) == torch.arange(b, device=z_q.device)).float().mean()


def make_train_step(model, optimizer, run, args, prepare):
    """One MoCo step on tubelet pairs (or temporal pairs with --baseline temporal).

    run: .autocast() and .step(loss, optimizer) (common.Run). prepare(clip_q, clip_k) -> float normalised clips:
    colour jitter (shared with --authors-code-shared-jitter) and normalisation, from common's TRANSFORMS."""

    def train_step(batch):
        if "clip_q" in batch:  # made in the loader workers (--tubelet-device cpu)
            clip_q, clip_k = batch["clip_q"], batch["clip_k"]
        elif args.baseline == "temporal":
            clip_q, clip_k = temporal_pairs(batch["video"])
        else:
            clip_q, clip_k, _ = tubelet_pairs(batch["video"], args)
        clip_q, clip_k = prepare(clip_q, clip_k)
        with run.autocast():
            z_q, z_k, negatives = model(clip_q, clip_k)
        loss, accuracy = info_nce(z_q.float(), z_k.float(), negatives, args.temperature)  # Eq. (5.1) in fp32
        run.step(loss, optimizer)
        return {"loss": loss.detach(), "inst_acc": accuracy, "batch_acc": batch_accuracy(z_q, z_k, args)}

    return train_step


# ==================================================================================================== MAIN
def build_model(args):
    """Backbone (query encoder) + MoCo around it. The pretraining BN eps is the backbone's default (see README)."""
    backbone = common.build_backbone(args.arch)
    model = MoCo(backbone, proj_dim=args.proj_dim, queue_size=args.queue_size, momentum=args.moco_momentum,
                 all_gather=common.all_gather_nograd)
    return backbone, model


def build_sets(args, run):
    """Training set (random crop + flip in the workers, uint8) and the kNN monitor's train / val sets (centre)."""
    crop = args.crop_size

    def train_transform(item):
        video = common.random_resized_crop_clip(item["video"], crop, scale=(args.crop_scale_min, 1.0))
        item["video"] = common.horizontal_flip(video)  # (C, T, H, W) or (2, C, T, H, W) uint8
        return item

    def eval_transform(item):
        item["video"] = common.resized_center_crop(item["video"], crop, crop)
        return item

    common_kw = dict(clip_len=args.clip_len, decoder=args.decoder, strict=args.strict_data,
                     bad_files_path=os.path.join(run.out_dir, "bad_files.txt"))
    train = common.build_dataset(args.dataset_name, args.data_root, "train", frame_strides=args.frame_strides,
                                 num_clips=2 if args.baseline == "temporal" else 1, sampling="random",
                                 transform=train_transform, fraction=args.data_fraction, seed=args.seed, **common_kw)
    knn_sets = None
    if args.knn_every or args.dataset_name.startswith("toy"):  # toy: the final kNN against random init
        knn_sets = tuple(common.build_dataset(args.dataset_name, args.data_root, split, frame_strides=(1,),
                                              sampling="uniform", transform=eval_transform, **common_kw)
                         for split in ("train", "val"))
    return train, knn_sets


def save_visualization(clip_q, clip_k, out_dir, num_pairs):
    """--visualize N: PNG grid (rows: clip 1 and clip 2 of each pair, columns: frames) and an animated GIF.

    clip_q, clip_k (B, C, T, H, W) in [0, 255], before colour jitter and normalisation. Returns the written paths."""
    from PIL import Image
    from torchvision.utils import make_grid

    n, t = min(num_pairs, clip_q.shape[0]), clip_q.shape[2]
    rows = torch.stack([clip_q[:n], clip_k[:n]], dim=1).flatten(0, 1) / 255  # (2N, C, T, H, W): pair i = 2i, 2i + 1
    to_image = lambda x, nrow: Image.fromarray((make_grid(x.cpu(), nrow=nrow, padding=2, pad_value=1.0).clamp(0, 1)
                                                * 255).byte().permute(1, 2, 0).numpy())  # noqa: E731
    png, gif = os.path.join(out_dir, "tubelet_pairs.png"), os.path.join(out_dir, "tubelet_pairs.gif")
    to_image(rows.transpose(1, 2).flatten(0, 1), t).save(png)  # (2N * T, C, H, W): one row of frames per clip
    movie = [to_image(rows[:, :, f], 2) for f in range(t)]  # one image per frame: the two clips of a pair side by side
    movie[0].save(gif, save_all=True, append_images=movie[1:], duration=150, loop=0)
    return png, gif


@torch.no_grad()
def heldout_pair_accuracy(model, loader, args, run, seed=1234):
    """Instance discrimination on held-out pairs made from the kNN val clips with a fixed seed (the same pairs for
    every model): query encoder on clip 1, key encoder on clip 2, eval mode, batch_accuracy (chance 1/(B-1)) averaged
    over batches. Returns (accuracy %, chance %)."""
    generator, was_training = torch.Generator(device=run.device).manual_seed(seed), model.training
    model.eval()
    hits, chance = [], []
    for video in (batch["video"].to(run.device) for batch in loader):
        if video.shape[0] >= 3:
            clip_q, clip_k, _ = tubelet_pairs(video.float(), args, generator)
            z_q = F.normalize(model.head(model.backbone(common.normalize(clip_q / 255))), dim=1)  # (B, D)
            z_k = F.normalize(model.head_k(model.backbone_k(common.normalize(clip_k / 255))), dim=1)  # (B, D)
            hits.append(batch_accuracy(z_q, z_k, argparse.Namespace(baseline="none")).item())
            chance.append(1 / (video.shape[0] - 1))
    model.train(was_training)
    return 100 * sum(hits) / len(hits), 100 * sum(chance) / len(chance)


def main_worker(args):
    run = common.setup(args, "tubelet_contrast")
    common.keep_freed_memory()  # the CPU paste's per-batch buffers reuse their pages (before the workers fork)
    backbone, model = build_model(args)
    # SyncBN on multi-GPU runs (the authors' config): the queue is filled with all-gathered keys and SyncBN keeps
    # the BN statistics equal, so DDP need not broadcast buffers; --compile compiles the two backbones only (the
    # MoCo forward updates the key encoder and the queue in place).
    ddp_model = run.prepare(model, method_syncs_buffers=True, compile_modules=lambda m: [m.backbone, m.backbone_k])
    # the random-init baseline: the weights every process trains from (DDP has broadcast rank 0's), before training
    random_model = build_model(args)[1]
    random_model.load_state_dict(model.state_dict())
    optimizer = torch.optim.SGD(model.query_parameters(), lr=args.lr, momentum=0.9, weight_decay=args.wd)
    train_step = make_train_step(ddp_model, optimizer, run, args, make_prepare(args))
    train_set, knn_sets = build_sets(args, run)
    if args.visualize:  # N pairs of real training clips, before colour jitter; then exit
        video = torch.stack([train_set[i]["video"] for i in range(max(args.visualize, 2))])  # (N, C, T, H, W)
        pairs = temporal_pairs(video) if args.baseline == "temporal" else tubelet_pairs(video.float(), args)[:2]
        for path in save_visualization(*pairs, run.out_dir, args.visualize):
            run.print("wrote", path)
        return None
    workers_pair = args.tubelet_device == "cpu" and run.device.type != "cpu" and args.baseline == "none"
    loader = common.build_loader(train_set, args, run, train=True,
                                 collate_fn=functools.partial(tubelet_collate, args=args) if workers_pair else None)
    knn = None
    if knn_sets is not None:
        knn_loaders = [common.build_loader(s, args, run, train=False) for s in knn_sets]
        input_fn = lambda batch: common.normalize(batch["video"])  # noqa: E731
        knn = (backbone, input_fn, *knn_loaders)
    meta = {"arch": args.arch, "modality": "rgb", "method": "tubelet_contrast"}
    result = common.fit(run, args, model, optimizer, loader, train_step, backbone=backbone, backbone_meta=meta,
                        knn=knn if args.knn_every else None)
    if run.world_size > 1:  # keys are gathered before enqueueing: every process must hold the same queue
        queues = common.all_gather_nograd(model.queue[None])  # (world, K, D)
        run.print(f"queue: {run.world_size} processes, pointer {model.queue_ptr.item()}, largest difference "
                  f"between processes {(queues - queues[:1]).abs().max().item():.3g}")
    if knn is not None:  # the toy run's report: pretrained against the same network at random init
        random_model = random_model.to(run.device)
        trained, random_init = (common.knn_monitor(m.backbone, input_fn, *knn_loaders, run=run)
                                for m in (model, random_model))
        trained["pair_acc"], chance = heldout_pair_accuracy(model, knn_loaders[1], args, run)
        random_init["pair_acc"], _ = heldout_pair_accuracy(random_model, knn_loaders[1], args, run)
        run.print(f"held-out tubelet pairs ({args.dataset_name} val, instance discrimination within a batch): "
                  f"pretrained {trained['pair_acc']:.1f} %, random init {random_init['pair_acc']:.1f} %, "
                  f"chance {chance:.1f} %")
        run.print(f"kNN top-1 on {args.dataset_name} val (k=200, gallery = train): pretrained "
                  f"{trained['knn_top1']:.1f} %, random init (same arch, seed {args.seed}) "
                  f"{random_init['knn_top1']:.1f} %; 1-NN: {trained['nn1_top1']:.1f} % vs "
                  f"{random_init['nn1_top1']:.1f} %")
        if run.is_main:
            common.write_json_atomic(os.path.join(run.out_dir, "knn.json"), {
                "pretrained": trained, "random_init": random_init, "pair_chance": chance, "step": result["step"]})
    return result


# Toy defaults: tiny3d at 48x48x8 learns the pairs in ~2,000 steps of batch 16 at the paper's lr 0.01; momentum
# 0.99 because 2,000 steps are short for m = 0.999.
TOY_DEFAULTS = dict(crop_size=48, clip_len=8, moco_momentum=0.99, epochs=160, batch_size=16, workers=1,
                    knn_every=40, sync_bn=True)
# Sec. 5.4.1; batch 128 on Kinetics-400, 32 otherwise (set in parse_args); no kNN monitor (a kNN pass over
# Kinetics every epoch costs more than the epoch).
PAPER_DEFAULTS = dict(clip_len=16, moco_momentum=0.999, lr=0.01, epochs=100, wd=1e-4, schedule="cosine",
                      knn_every=0, sync_bn=True)


def parse_args(argv=None):
    """The command line with every default filled (toy or paper, by --data); finalize_method_args runs in launch."""
    parser = argparse.ArgumentParser(description=__doc__, parents=[common.get_common_parser()],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_method_args(parser)
    parser.add_argument("--crop-scale-min", type=float, default=0.2, help="smallest area fraction of the random "
                        "resized crop (standard augmentation; the thesis gives no value)")
    # data-dependent flags stay None until fill_defaults: given values (abbreviated or --flag=value) are kept
    parser.set_defaults(lr=0.01, wd=1e-4, schedule="cosine", epochs=None, batch_size=None, knn_every=None)
    parser.epilog = (f"--data toy (the default) is toy-motion (short side 64, 16-40 frames, 192 train / 64 val "
                     f"videos) with toy defaults for a few CPU minutes: {TOY_DEFAULTS}, unless given on the command "
                     f"line. Real data keeps the paper's: r2plus1d_18, 16x112², batch 128 (k400) / 32, queue 65536 "
                     f"(k400) / 16384, lr 0.01, 100 epochs, cosine, SyncBN on multi-GPU runs.")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    toy = args.data == "toy" or args.data.startswith("toy")
    paper = dict(PAPER_DEFAULTS, batch_size=128 if args.data == "k400" else 32)
    common.fill_defaults(args, TOY_DEFAULTS if toy else paper)
    args.dataset_name = "toy-motion" if args.data == "toy" else args.data
    args.data_root = args.data_root or os.path.join("data", args.dataset_name)
    return args


def main(argv=None):
    return common.launch(main_worker, parse_args(argv), finalize=finalize_method_args)


if __name__ == "__main__":
    main()
