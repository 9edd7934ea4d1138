"""P-HLVC: pose-based contrastive clustering of video and body pose.

Schneider et al., CVPR Workshops 2022; supplementary material ("P-HLVC supp.") Sec. 7.3-7.9. README: "P-HLVC".
A video encoder and a body-pose encoder (SkeleMotion images of the pose tracks) share K prototypes; each modality's
Sinkhorn-Knopp assignment q is the target for the *other* modality's prediction p (swapped prediction), with the
agreement-accentuating cross-entropy (AXent) of Eq. (5); the prototypes grow from 3,000 to 10,000 during training.

    python phlvc.py                                   # toy-paired (depth + COCO-18 2-D poses), tiny3d, ~1.6 CPU min
    python phlvc.py --data k400-pose --gpus 4                  # paper: S3D 32x128², batch 80, K 3,000 -> 10,000
    python phlvc.py --data k400-pose --arch r2d3d_18 --gpus 4  # R2D3D 30x128², batch 56, K_v 2, K_s <= 2
    python phlvc.py --data sims4action --gpus 4                # Sec. 7.2: Sims4Action + its AlphaPose poses

k400-pose = data/k400-pose in the Kinetics-400 layout of `common.parse_kinetics` (annotations/{train,val}.csv,
{split}/<label>/<youtube_id>_<start>_<end>.mp4) + kinetics-skeleton/kinetics_{train,val}/<youtube_id>.json
(ST-GCN's Kinetics-Skeleton, OpenPose COCO-18, 30 fps; dataset option pose_root). Dropped: videos without a JSON
or with fewer than --min-pose-frames posed frames (a person scored > 0; supp. Sec. 7.2: "not a sufficient length",
144,085 remain, ours printed; reading: T + 1, one clip's poses, as the authors' anonymous code drops pose sequences
shorter than a clip; sims4action alike). Every JSON is parsed once into --pose-cache (.npy; measured 0.2 vs 12-19
CPU ms a read, 300 frames x 2 people). --data paired reads toy-paired's layout (rgb/*.mp4, pose2d/, skeleton/).

The file reads like the supplement: flags -> encoders (Sec. 7.3) -> SkeleMotion on the device (Sec. 7.5) ->
prototypes, Sinkhorn, cluster growing, queue (Sec. 7.6, 7.8) -> losses Eq. (4), (5) (Sec. 7.9) -> multi-body pairs
(Sec. 7.4) -> train step -> main.

Implementation details and readings (the authors' code has the architecture only; every number below is a flag):
- Encoders: `common.build_backbone("phlvc_video")` (trunk, Conv3d 1x1x1 -> FC1, FC2 = BN-ReLU-Linear) + Rep =
  ReLU-Linear 512->256; pose: `skelemotion_cnn` (linear1/2 = FC1/FC2) + ReLU-Linear 512->256; L2-normalised.
  backbone.pth holds the video encoder to FC2 (evaluate.py taps fc2 to classify, fc1 to retrieve); the pose CNN
  is saved beside it as pose_backbone.pth.
- SkeleMotion (Sec. 7.5): `skelemotion_batch` = `common.skelemotion_image` (tau 1, COCO-18 chaining order, x, y
  with z = 0) for every track of the batch in one op; T image columns from T + 1 poses (the clip is read with T + 1
  frames, the video keeps the first T). Joints with score 0 are at the origin, as in the authors' JSON reader.
- p = softmax(z C^T / tau), tau 0.1 (not stated; SwAV's). Prototypes L2-normalised before every step, lr x0.1,
  no gradient for the first 10,000 iterations (grad set to None, so Adam's weight decay does not move them).
- Sinkhorn (SwAV's distributed_sinkhorn): per modality, over all processes' rows, eps 0.012, 3 iterations (not
  stated), fp32. Reading: the *per-row* max is subtracted before exp (a per-sample factor, removed exactly by the
  column normalisation; a global max underflows whole rows at eps 0.012). Absent pose tracks are masked rows.
- AXent (Eq. 5): the supplement never writes l_AXent out. Our reading: the element-wise binary cross-entropy
  -sum_k [q_k log p_k + (1 - q_k) log(1 - p_k)]: minimal only where p = q, penalises (p, q) = (1, 0), balanced
  (Sec. 7.9, Fig. 7). --loss swav = Eq. (4) (with the minus sign the printed equation lacks); --loss
  axent-symmetric = -sum_k [q_k log p_k + p_k log q_k], the other reading that fits Fig. 7.
- Multi-body (Sec. 7.4): every (video view, pose track) pair gets l_A; tracks ranked by summed score (slots: track
  ids where the JSON has them, else the per-frame score rank as the ST-GCN reader), at most --max-tracks (1 for the
  first 6,000 iterations), absent tracks not encoded; mean over a sample's pairs, then over samples (--pair-mean
  batch: over all pairs).
- Cluster growing (Sec. 7.6, 7.8, Fig. 10), our reading: --prototypes-final rows are allocated, `active` of them
  used; from --grow-start-epoch, --grow-per-epoch rows per epoch, each the split normalize(parent + 0.01 xi) of one
  of the most-assigned prototypes since the last growth (parent unchanged); their Adam moments are reset (Adam's
  step count is per tensor and is not). Fixed shapes: nothing is re-wrapped.
- Queue (Sec. 7.6): from --queue-start-epoch, the last --queue-size embeddings per modality (all processes) are
  extra Sinkhorn rows only. Adam, wd 1e-4, lr warm-up over 10 epochs (linear from ~0, not from 1e-6), then constant.
- Augmentation (not given for pretraining): square random crop of area >= 0.05 per video view, colour jitter as
  Table 6 (hue +-180°, saturation 100 %, brightness 80 %), no flip; poses unaugmented.
- Toy defaults (differences from the paper's, for a few CPU minutes on toy-paired's 96 training videos): tiny3d
  trunk, 20 x 48², widths 128 / 64, K 24 -> 48, short freezes, lr 1e-3, crop area >= 0.8, no colour jitter,
  --pose-scale 30 (the toy's normalised 8-fps displacements sit mostly under SkeleMotion's 0.004 threshold; x30 ~
  pixels at 64² / 2), and --video-input depth: the video encoder reads toy-paired's masked depth (the bodies only,
  common.depth_to_input, 3 channels) instead of its RGB. Measured reason: on the toy RGB (a thin body over a static
  random texture unique to each video) the video encoder memorises the pose clusters of the training videos by
  their backgrounds: leave-one-out 1-NN among them 34 % (chance 8 %, its clusters 64 % pure), held-out videos at
  chance in every gallery/query combination, also with 288 training videos or Table 6's jitter (which stops the
  learning), while the pose stream is informative (random-init pose CNN 72 % held-out 1-NN). With depth the same
  run reaches 78 % vs 31 % (random init) held-out 1-NN in evaluate.py. --video-input rgb runs the toy on RGB.
  The kNN report taps fc1 (retrieval) and fc2.
Cross-domain (Sec. 7.2): `common.py` parses sims4action (official split CSV) and toyota-smarthome (the videos of the
classes mapped to Sims4Action, --class-map sims4action | phlvc-code; toyota-smarthome-cs / -cv1 / -cv2: its own
protocols and classes, for finetuning); `evaluate.py --task crossdomain --data sims4action --target
toyota-smarthome` finetunes on Sims4Action (selects on its val split S7) and reports top-1 and mean class accuracy
on Toyota; features (Sec. 7.3): video (backbone.pth), pose (--arch skelemotion_cnn --weights pose_backbone.pth: per
clip a SkeleMotion image of the best-scored converted AlphaPose track) or both concatenated (--concat
skelemotion_cnn --concat-weights pose_backbone.pth); --calibrate N: our reading of the undefined "domain
calibration" (eps 0.05): N epochs on Sinkhorn-balanced pseudo-labels of the Toyota videos (transductive).
`evaluate.py --task finetune --protocol phlvc` = Sec. 7.6's finetuning (Table 6 augmentation, 10 random test clips
and crops, dropout-ReLU-linear head; optimiser: the authors' transfer.py CLI defaults, unverified). `python
common.py convert-alphapose` turns AlphaPose results (COCO-17, --pose_track ids) into COCO-18 ST-GCN JSON (neck =
shoulder midpoint, / frame size, "id" kept: the JSON reader then keeps each track in one slot); pretraining on
Sims4Action (`--data sims4action`, Sec. 7.2) reads videos/<name>.avi with those pose2d/<name>.json (pose frame t =
video frame t). A clip without poses gives no pair. toy-paired keeps 2 people per frame, the other sets 5.
"""
import argparse
import copy
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

import common

LOSSES = ("axent", "swav", "axent-symmetric")


# ==================================================================================================== FLAGS
def add_method_args(parser):
    """The "method" group; defaults reproduce Sec. 7.6 (S3D). Data-dependent flags default to None."""
    g = parser.add_argument_group("method")
    g.add_argument("--arch", default=None, choices=["s3d", "r2d3d_18", "tiny3d"],
                   help="video trunk: s3d (paper's best), r2d3d_18 (Table 7), tiny3d (CPU toy)")
    g.add_argument("--clip-len", type=int, default=None, help="T video frames = SkeleMotion columns; 32 (S3D), "
                   "30 (R2D3D); the pose CNN needs T >= 19")
    g.add_argument("--crop-size", type=int, default=None, help="frame side after cropping: 128 (Sec. 7.6)")
    g.add_argument("--hidden", type=int, default=None, help="FC1/FC2 width: 512 (Sec. 7.3)")
    g.add_argument("--rep-dim", type=int, default=None, help="representation z dimension: 256 (Sec. 7.3)")
    g.add_argument("--prototypes", type=int, default=None, help="K at the start: 3,000 (Sec. 7.6)")
    g.add_argument("--prototypes-final", type=int, default=None, help="K after growing: 10,000 (Table 8: 3000, "
                   "5000 or 10000; equal to --prototypes = no growing)")
    g.add_argument("--grow-start-epoch", type=int, default=None, help="first epoch that adds prototypes: 14 (Sec 7.8)")
    g.add_argument("--grow-per-epoch", type=int, default=None, help="prototypes added per epoch (reading: 1,000)")
    g.add_argument("--grow-noise", type=float, default=0.01, help="split: normalize(parent + noise * xi) (reading)")
    g.add_argument("--grow-init", default="split", choices=["split", "random"],
                   help="new rows: split of a most-assigned prototype (reading) or a random unit vector")
    g.add_argument("--temperature", type=float, default=0.1, help="tau of p = softmax(z C^T / tau) (SwAV's 0.1)")
    g.add_argument("--sinkhorn-eps", type=float, default=0.012, help="Sinkhorn-Knopp epsilon: 0.012 (Sec. 7.6)")
    g.add_argument("--sinkhorn-iters", type=int, default=3, help="Sinkhorn iterations (not stated; SwAV's 3)")
    g.add_argument("--freeze-prototypes-iters", type=int, default=None, help="iterations without prototype "
                   "updates: 10,000 (Sec. 7.6)")
    g.add_argument("--prototype-lr-scale", type=float, default=0.1, help="prototype lr / main lr: 0.1 (Sec. 7.6)")
    g.add_argument("--loss", default="axent", choices=LOSSES, help="axent: Eq. (5) with our reading of l_AXent; "
                   "swav: Eq. (4); axent-symmetric: the other reading of Fig. 7")
    g.add_argument("--video-views", type=int, default=None, help="K_v augmented views of the same frames: 1 (S3D), "
                   "2 (R2D3D)")
    g.add_argument("--max-tracks", type=int, default=None, help="K_s pose tracks per sample: <= 5 (S3D), <= 2 (R2D3D)")
    g.add_argument("--single-track-iters", type=int, default=None, help="one track per sample for the first N "
                   "iterations: 6,000 (Sec. 7.6)")
    g.add_argument("--pair-mean", default="sample", choices=["sample", "batch"], help="sample: mean over a "
                   "sample's (view, track) pairs, then over samples; batch: mean over all pairs")
    g.add_argument("--queue-size", type=int, default=None, help="queued embeddings per modality: 1,000 (Sec. 7.6)")
    g.add_argument("--queue-start-epoch", type=int, default=None, help="epoch the queue starts: 200 of 230")
    g.add_argument("--pose-scale", type=float, default=None, help="pose x, y (in frame units, as the JSON stores "
                   "them) are multiplied by this before SkeleMotion: 1 (paper); the toy's 8-fps bodies need 30 for "
                   "displacements above SkeleMotion's 0.004 threshold")
    g.add_argument("--color-jitter", default=None, choices=["table6", "none"], help="table6: hue +-180°, "
                   "saturation 100 %%, brightness 80 %% per view (paper, our reading for pretraining); toy: none (its "
                   "48 videos cannot be learnt from in minutes under it)")
    g.add_argument("--video-input", default=None, choices=["rgb", "depth"], help="what the video encoder reads: rgb "
                   "(paper); depth (toy-paired's masked depth, 3 channels: toy default, see the header)")
    g.add_argument("--crop-area-min", type=float, default=None, help="smallest crop area: 0.05 (Table 6 MCA, our "
                   "reading for pretraining); toy 0.8 (its bodies are small)")
    g.add_argument("--min-pose-frames", type=int, default=None, help="drop training videos with fewer posed frames "
                   "(supp. Sec. 7.2, k400-pose; reading: default T + 1, one clip's poses; also sims4action); 0: none")
    g.add_argument("--pose-cache", default=None, help="folder of the parsed pose JSON as .npy (default "
                   "<data-root>/pose_cache; '' parses the JSON every time)")
    g.add_argument("--visualize", type=int, default=0, metavar="N", help="write visualize_<i>.png for N training "
                   "samples (a frame with every track drawn, then each track's 6 SkeleMotion channels) and exit")
    g.add_argument("--show-prototypes", type=int, default=0, metavar="K", help="after training, write prototypes.png: "
                   "middle frames of up to 8 training clips of each of the K fullest prototypes (video arg-max)")
    return parser


PAPER_DEFAULTS = dict(arch="s3d", crop_size=128, hidden=512, rep_dim=256, prototypes=3000, prototypes_final=10000,
                      grow_start_epoch=14, grow_per_epoch=1000, freeze_prototypes_iters=10000,
                      single_track_iters=6000, queue_size=1000, queue_start_epoch=200, epochs=230, lr=1e-4,
                      warmup_epochs=10, knn_every=0, pose_scale=1.0,
                      crop_area_min=0.05, color_jitter="table6", video_input="rgb")
# Toy: tiny3d at 48² x 20 frames, 240 steps (1.7 CPU minutes measured), K 24 -> 48, short freezes; see the header.
TOY_DEFAULTS = dict(arch="tiny3d", clip_len=20, crop_size=48, hidden=128, rep_dim=64, prototypes=24,
                    prototypes_final=48, grow_start_epoch=14, grow_per_epoch=8, freeze_prototypes_iters=30,
                    single_track_iters=30, queue_size=64, queue_start_epoch=30, epochs=40, lr=1e-3,
                    warmup_epochs=2, batch_size=16, workers=1, knn_every=0, video_views=1, max_tracks=2,
                    pose_scale=30.0, crop_area_min=0.8, color_jitter="none", video_input="depth")


def finalize_method_args(args):
    """Derived values in one block; user errors name the flag before anything is written."""
    if args.dataset_name not in ("toy-paired", "paired", "k400-pose", "sims4action"):
        raise common.UserError(f"phlvc.py --data: expected toy, toy-paired, paired, k400-pose or sims4action; found "
                               f"{args.data!r}")
    if args.video_input == "depth" and args.dataset_name in ("k400-pose", "sims4action"):
        raise common.UserError(f"phlvc.py --video-input: expected rgb with --data {args.data} (no depth), found depth")
    r2d3d = args.arch == "r2d3d_18"
    common.fill_defaults(args, dict(clip_len=30 if r2d3d else 32, video_views=2 if r2d3d else 1,
                                    max_tracks=2 if r2d3d else 5, batch_size=56 if r2d3d else 80))
    common.fill_defaults(args, dict(min_pose_frames=args.clip_len + 1, pose_cache=os.path.join(args.data_root,
                                                                                               "pose_cache")))
    args.final_lr = args.lr if args.final_lr is None else args.final_lr  # constant after the warm-up
    checks = [(args.clip_len >= 19, "--clip-len >= 19 (the SkeleMotion CNN's smallest input)", args.clip_len),
              (0 < args.prototypes <= args.prototypes_final, "0 < --prototypes <= --prototypes-final",
               (args.prototypes, args.prototypes_final)),
              (args.video_views >= 1 and args.max_tracks >= 1, "--video-views, --max-tracks >= 1",
               (args.video_views, args.max_tracks)),
              (args.sinkhorn_eps > 0 and args.temperature > 0, "--sinkhorn-eps, --temperature > 0",
               (args.sinkhorn_eps, args.temperature))]
    for ok, expected, actual in checks:
        if not ok:
            raise common.UserError(f"phlvc.py: expected {expected}, found {actual!r}")
    return args


# ==================================================================================================== ENCODERS
class PHLVC(nn.Module):
    """Both encoders (Sec. 7.3, Listing 1, Fig. 11), the shared prototypes C and the training state as buffers:
    `active` prototypes, assignment counts since the last growth, the iteration and the two queues."""

    def __init__(self, args):
        super().__init__()
        self.video = common.build_backbone("phlvc_video", trunk=args.arch, hidden=args.hidden)
        self.vid_fc_rep = nn.Sequential(nn.ReLU(), nn.Linear(args.hidden, args.rep_dim))
        self.pose = common.build_backbone("skelemotion_cnn", frames=args.clip_len, hidden=args.hidden)
        self.sk_fc_rep = nn.Sequential(nn.ReLU(), nn.Linear(args.hidden, args.rep_dim))
        for head in (self.vid_fc_rep, self.sk_fc_rep):  # authors: orthogonal weights, zero biases
            nn.init.orthogonal_(head[1].weight)
            nn.init.zeros_(head[1].bias)
        self.prototypes = nn.Parameter(torch.empty(args.prototypes_final, args.rep_dim))  # C (K_max, D)
        nn.init.orthogonal_(self.prototypes)
        self.register_buffer("active", torch.tensor(args.prototypes))
        self.register_buffer("counts", torch.zeros(args.prototypes_final))  # argmax q since the last growth
        self.register_buffer("iteration", torch.tensor(0))
        self.register_buffer("queue", torch.zeros(2, args.queue_size, args.rep_dim))  # (video, pose), newest first
        self.register_buffer("queue_len", torch.zeros(2, dtype=torch.long))  # filled rows per modality

    def forward(self, video, images):
        """video (N_v, 3, T, H, W), images (N_s, 6, T, 49) of present tracks -> z_v (N_v, D), z_s (N_s, D) and
        their prototype scores z C^T (N, K_active); inside forward so that DDP sees every parameter."""
        z_v = F.normalize(self.vid_fc_rep(self.video(video, tap="fc2")).float(), dim=1)  # (N_v, D)
        z_s = F.normalize(self.sk_fc_rep(self.pose(images)).float(), dim=1)  # (N_s, D)
        c = self.prototypes[:int(self.active)].float()  # (K, D)
        with torch.autocast(z_v.device.type, enabled=False):  # scores in fp32: eps 0.012 resolves ~1e-3 differences
            return z_v, z_s, z_v @ c.t(), z_s @ c.t()  # (N_v, K), (N_s, K)


# ==================================================================================================== SKELEMOTION
def skelemotion_batch(pose, tau=1, mag_threshold=0.004):
    """Sec. 7.5: SkeleMotion images of every track in one op, = `common.skelemotion_image(pose[n, :2, :, :, m],
    "coco18")[:, :T]` per track. pose (N, 3, T + tau, 18, M) = (x, y, score) -> images (N, M, 6, T, 49)."""
    p = pose[:, :2].permute(0, 4, 1, 2, 3).float()  # (N, M, 2, T+tau, V)
    p = torch.cat([p, torch.zeros_like(p[:, :, :1])], dim=2)  # (N, M, 3, T+tau, V): z = 0 (OpenPose fork)
    present = p.abs().sum(dim=(2, 4)) > 0  # (N, M, T+tau): frames where the track exists
    both = (present[..., :-tau] & present[..., tau:]).float()  # (N, M, T)
    d = (p[..., :-tau, :] - p[..., tau:, :]) * both[:, :, None, :, None]  # (N, M, 3, T, V): d_t = p_t - p_{t+tau}
    d = d[..., common.SKELEMOTION_ORDER["coco18"]]  # (N, M, 3, T, 49) chaining order
    mag = d.norm(dim=2).clamp(0, 1)  # (N, M, T, 49)
    dx, dy, dz = d.unbind(dim=2)
    ori = torch.stack([torch.atan2(dy, dx), torch.atan2(dy, dz), torch.atan2(dz, dx)], dim=2)  # (N, M, 3, T, 49)
    ori = (torch.rad2deg(ori) + 180.0) / 360.0  # the original's normalize(v, -180, 180, 1, -1)
    ori = torch.where(mag[:, :, None] < mag_threshold * tau, torch.full_like(ori, 1.1), ori)
    ori = ori * present[..., :-tau, None][:, :, None].float()  # frames without the track stay zero
    return torch.cat([ori, mag[:, :, None].expand_as(ori)], dim=2)  # (N, M, 6, T, 49): orientation first


def select_tracks(pose, max_tracks):
    """Sec. 7.4: tracks ranked by summed score over the clip; the first max_tracks with any score are used.
    pose (N, 3, T, V, M) -> (order (N, M) track indices, best first; present (N, M) bool in that order)."""
    score = pose[:, 2].float().sum(dim=(1, 2))  # (N, M)
    score, order = score.sort(dim=1, descending=True, stable=True)
    rank = torch.arange(score.shape[1], device=pose.device)[None]  # (1, M)
    return order, (score > 0) & (rank < max_tracks)


# ==================================================================================================== CLUSTERING
@torch.no_grad()
def sinkhorn(scores, eps, iters, mask=None):
    """Sinkhorn-Knopp (SwAV's distributed_sinkhorn) over the rows of every process: scores (N, K) -> q (N, K),
    rows summing to 1, prototypes equally used. mask (N,) bool: rows that take part (absent tracks do not).
    Notation of the SwAV paper: Q (K, B), B = rows of all processes, K prototypes."""
    scores = scores.float()
    mask = torch.ones(scores.shape[0], dtype=torch.bool, device=scores.device) if mask is None else mask
    logits = (scores - scores.max(dim=1, keepdim=True).values) / eps  # (N, K); per-row max (reading, see header)
    Q = logits.exp().t() * mask[None].float()  # (K, N); exp(1/0.012) ~ 1.7e36 without the max subtracted
    B = common.all_reduce(mask.sum().float())  # rows over all processes
    K = Q.shape[0]
    Q /= common.all_reduce(Q.sum()).clamp_min(torch.finfo(Q.dtype).tiny)
    for _ in range(iters):
        Q /= common.all_reduce(Q.sum(dim=1, keepdim=True)).clamp_min(torch.finfo(Q.dtype).tiny)  # (K, 1) rows
        Q /= K
        Q /= Q.sum(dim=0, keepdim=True).clamp_min(torch.finfo(Q.dtype).tiny)  # (1, N) columns (masked stay 0)
        Q /= B
    return (Q * B).t()  # (N, K)


@torch.no_grad()
def grow_prototypes(prototypes, active, counts, num_new, noise, mode, generator):
    """Sec. 7.6 / 7.8, Fig. 10 (our reading): rows active .. active+num_new-1 of `prototypes` (K_max, D) become
    normalize(parent + noise * xi) for the most-assigned parents (counts (K_max,)), or random unit vectors.
    Rows < active are not touched. Returns the indices of the new rows."""
    num_new = min(num_new, prototypes.shape[0] - active)
    parents = counts[:active].topk(min(num_new, active)).indices.repeat(num_new // active + 1)[:num_new]  # (n,)
    xi = torch.randn(num_new, prototypes.shape[1], generator=generator).to(prototypes)  # (n, D)
    new = xi if mode == "random" else prototypes[parents] + noise * xi
    rows = torch.arange(active, active + num_new, device=prototypes.device)
    prototypes[rows] = F.normalize(new, dim=1)
    return rows


@torch.no_grad()
def enqueue(queue, queue_len, z):
    """Newest first (SwAV): queue (Q, D) shifted by len(z), z (n, D) all-gathered rows in front."""
    n = min(z.shape[0], queue.shape[0])
    if n == 0:
        return
    queue[n:] = queue[:-n].clone()
    queue[:n] = z[:n]
    queue_len.fill_(min(int(queue_len) + n, queue.shape[0]))


# ==================================================================================================== LOSSES
def log1m_softmax(logits):
    """log(1 - softmax(logits)) without cancellation: for the arg-max class, log of the sum of the others."""
    log_p = logits.log_softmax(dim=-1)  # (..., K)
    out = torch.log1p(-log_p.exp().clamp(max=0.5))  # exact for every class with p <= 1/2 (all but the arg-max)
    top = log_p.argmax(dim=-1, keepdim=True)  # (..., 1)
    others = log_p.scatter(-1, top, float("-inf")).logsumexp(dim=-1, keepdim=True)  # (..., 1)
    return out.scatter(-1, top, others)


def cross_entropy_terms(logits, q, loss):
    """Element-wise loss of prediction p = softmax(logits) against target q, summed over k: (..., K) -> (...).
    axent: -sum q log p + (1 - q) log(1 - p) (our reading of l_AXent, Sec. 7.9); swav: -sum q log p;
    axent-symmetric: -sum q log p + p log q."""
    log_p = logits.log_softmax(dim=-1)  # (..., K)
    if loss == "swav":
        return -(q * log_p).sum(dim=-1)
    if loss == "axent":
        return -(q * log_p + (1 - q) * log1m_softmax(logits)).sum(dim=-1)
    return -(q * log_p + log_p.exp() * q.clamp_min(1e-12).log()).sum(dim=-1)


def pair_loss(logits_v, logits_s, q_v, q_s, loss="axent"):
    """Eq. (5) l_A = [l(p_s, q_v) + l(p_v, q_s)] / 2 (with loss "swav" this is Eq. (4), sign included), for every
    (video view i, pose track j) pair of a sample. logits_v (B, K_v, K), logits_s (B, M, K) = scores / tau,
    q_v, q_s alike -> (B, K_v, M)."""
    l_sv = cross_entropy_terms(logits_s[:, None], q_v[:, :, None], loss)  # (B, K_v, M): pose predicts video's q
    l_vs = cross_entropy_terms(logits_v[:, :, None], q_s[:, None], loss)  # (B, K_v, M): video predicts pose's q
    return 0.5 * (l_sv + l_vs)


def multi_body_loss(pair_losses, present, pair_mean="sample"):
    """Sec. 7.4: pair_losses (B, K_v, M), present (B, M) bool -> scalar. sample: mean over each sample's pairs,
    then over samples with at least one track; batch: mean over all pairs. No pair at all -> 0 (with a graph)."""
    valid = present[:, None, :].expand_as(pair_losses).float()  # (B, K_v, M)
    total = (pair_losses * valid).nan_to_num()  # absent tracks: zero weight (their logits are zeros, finite)
    if pair_mean == "batch":
        return total.sum() / valid.sum().clamp_min(1)
    per_sample = total.sum(dim=(1, 2)) / valid.sum(dim=(1, 2)).clamp_min(1)  # (B,)
    has_pair = present.any(dim=1).float()  # (B,)
    return (per_sample * has_pair).sum() / has_pair.sum().clamp_min(1)


# ==================================================================================================== TRAIN STEP
def prepare_video(video, args):
    """(B, K_v, 3, T, S, S) uint8 crops -> colour jitter per view (Table 6 values), normalised, float."""
    if video.is_floating_point():  # --video-input depth: already in [-1, 1], no colour
        return video.flatten(0, 1)  # (B K_v, 3, T, S, S)
    x = video.float().flatten(0, 1) / 255  # (B K_v, 3, T, S, S)
    if args.color_jitter == "table6":
        x = common.color_jitter(x, brightness=0.8, contrast=0.0, saturation=1.0, hue=0.5, p=1.0)
    return common.normalize(x)


def maybe_grow(model, optimizer, epoch, args):
    """Sec. 7.8: from --grow-start-epoch, the first step of each epoch grows `active` by --grow-per-epoch up to
    --prototypes-final; the counts restart. Seeded by (seed, active): every process and a resume grow alike."""
    if epoch < args.grow_start_epoch:
        return
    target = min(args.prototypes_final,
                 args.prototypes + args.grow_per_epoch * (epoch - args.grow_start_epoch + 1))
    active = int(model.active)
    if active >= target:
        return
    generator = torch.Generator().manual_seed(args.seed * 100003 + active)
    rows = grow_prototypes(model.prototypes.data, active, model.counts, target - active, args.grow_noise,
                           args.grow_init, generator)
    for key in ("exp_avg", "exp_avg_sq"):  # the new rows start with fresh Adam moments
        if key in optimizer.state.get(model.prototypes, {}):
            optimizer.state[model.prototypes][key][rows] = 0
    model.active.fill_(target)
    model.counts.zero_()


def make_train_step(ddp_model, model, optimizer, run, args, steps_per_epoch):
    """One P-HLVC iteration; growth and queue decisions read the model's own buffers (so a resume repeats them)."""

    def train_step(batch):
        it = int(model.iteration)
        epoch = it // steps_per_epoch
        maybe_grow(model, optimizer, epoch, args)
        with torch.no_grad():
            model.prototypes.copy_(F.normalize(model.prototypes, dim=1))  # Sec. 7.6 / SwAV: unit prototypes
        video = prepare_video(batch["video"], args)  # (B K_v, 3, T, S, S)
        b, k_v = batch["video"].shape[:2]
        order, present = select_tracks(batch["pose2d"], 1 if it < args.single_track_iters else args.max_tracks)
        scale = torch.tensor([args.pose_scale, args.pose_scale, 1.0], device=video.device)  # x, y, score
        pose = batch["pose2d"] * scale[:, None, None, None]  # (B, 3, T+1, 18, M)
        images = skelemotion_batch(pose)  # (B, M, 6, T, 49)
        images = images.gather(1, order[:, :, None, None, None].expand_as(images))  # tracks best first
        m = images.shape[1]
        with run.autocast():
            z_v, z_s, s_v, s_s = ddp_model(video, images.flatten(0, 1)[present.flatten()])
        k = s_v.shape[1]
        scores_s = s_v.new_zeros(b * m, k).masked_scatter(present.flatten()[:, None], s_s)  # (B M, K)
        z_s_all = z_v.new_zeros(b * m, z_v.shape[1]).masked_scatter(present.flatten()[:, None], z_s.detach())
        use_queue = epoch >= args.queue_start_epoch
        c = model.prototypes[:k].detach()
        q = []
        for j, (scores, mask) in enumerate(((s_v, None), (scores_s, present.flatten()))):
            rows = scores.detach()
            if use_queue:  # Sec. 7.6: queued embeddings are extra Sinkhorn rows only
                extra = model.queue[j, :int(model.queue_len[j])] @ c.t()  # (L, K)
                rows = torch.cat([rows, extra])
                mask = None if mask is None else torch.cat([mask, torch.ones(len(extra), dtype=torch.bool,
                                                                             device=mask.device)])
            q.append(sinkhorn(rows, args.sinkhorn_eps, args.sinkhorn_iters, mask)[:scores.shape[0]])
        q_v, q_s = q[0].view(b, k_v, k), q[1].view(b, m, k)
        losses = pair_loss(s_v.view(b, k_v, k) / args.temperature, scores_s.view(b, m, k) / args.temperature,
                           q_v, q_s, args.loss)  # (B, K_v, M)
        loss = multi_body_loss(losses, present, args.pair_mean)
        optimizer.zero_grad(set_to_none=True)
        run.backward(loss)
        if it < args.freeze_prototypes_iters:
            model.prototypes.grad = None  # Sec. 7.6: prototypes frozen (no Adam step, no weight decay)
        run.optimizer_step(optimizer)
        with torch.no_grad():
            winners = torch.cat([q_v.flatten(0, 1).argmax(1), q_s.flatten(0, 1)[present.flatten()].argmax(1)])
            model.counts += common.all_reduce(torch.bincount(winners, minlength=model.counts.numel()).float())
            if epoch + 1 >= args.queue_start_epoch:  # filled during the epoch before it is used
                enqueue(model.queue[0], model.queue_len[0], common.all_gather_nograd(z_v.detach()))
                gathered_s = common.all_gather_nograd(z_s_all)  # (world B M, D), absent rows zero
                enqueue(model.queue[1], model.queue_len[1], gathered_s[common.all_gather_nograd(present.flatten())])
            model.iteration += 1
        return {"loss": loss.detach(), "prototypes": torch.tensor(float(k)),
                "tracks": present.float().sum(1).mean()}

    return train_step


# ==================================================================================================== MAIN
def build_sets(args, run):
    """Training clips of T + 1 frames (video keeps T, poses give T SkeleMotion columns), K_v square crops each;
    kNN sets: centre crops of the first T frames."""
    t, crop, views, depth = args.clip_len, args.crop_size, args.video_views, args.video_input == "depth"

    def as_video(item):  # depth (1, T+1, H, W) metres -> "video" (3, T+1, H, W) in [-1, 1]
        if depth:
            item["video"] = common.depth_to_input(item.pop("depth"))
        return item

    def train_transform(item):
        video = as_video(item)["video"][:, :t]  # (3, T, H, W) uint8, or float for depth
        item["video"] = torch.stack([common.random_resized_crop_clip(video, crop, scale=(args.crop_area_min, 1.0),
                                                                     ratio=(1.0, 1.0)) for _ in range(views)])
        return item

    def eval_transform(item):
        item = as_video(item)
        item["video"] = common.resized_center_crop(item["video"][:, :t], crop, crop)
        return item

    kw = dict(clip_len=t + 1, decoder=args.decoder, strict=args.strict_data, pose_cache=args.pose_cache,
              min_pose_frames=args.min_pose_frames, bad_files_path=os.path.join(run.out_dir, "bad_files.txt"))
    stream = "depth" if depth else "video"
    train = common.build_dataset(args.dataset_name, args.data_root, "train", modalities=(stream, "pose2d"),
                                 transform=train_transform, fraction=args.data_fraction, seed=args.seed, **kw)
    if not (args.knn_every or args.dataset_name.startswith("toy") or args.show_prototypes):
        return train, None
    knn_name = "k400" if args.dataset_name == "k400-pose" else args.dataset_name  # video only
    knn_sets = [common.build_dataset(knn_name, args.data_root, split, modalities=(stream,), sampling="uniform",
                                     transform=eval_transform, **kw) for split in ("train", "val")]
    if args.dataset_name == "toy-paired":  # 12 val videos cannot show a margin: query the 48 videos of a toy set
        knn_sets[1] = common.build_dataset(  # drawn with another seed (new bodies, cameras, textures; same actions)
            "toy-paired", args.data_root.rstrip("/") + "-seed1", "train", modalities=(stream,), sampling="uniform",
            transform=eval_transform, toy_seed=1, **kw)
    return train, knn_sets


def save_visualization(dataset, args, out_dir, num_samples):
    """--visualize N: per sample one PNG: the clip's middle frame with the tracks' joints (red, green, blue, ... in
    rank order), then the 6 SkeleMotion channels (orientation x3, magnitude x3; joints down, time across, each
    scaled to its maximum; orientation 1.1 = 'no motion' is the brightest) of every used track. Returns the paths."""
    from PIL import Image, ImageDraw
    colours = [(255, 40, 40), (40, 220, 40), (60, 120, 255), (255, 210, 0), (220, 0, 255)]
    scale_xy = torch.tensor([args.pose_scale, args.pose_scale, 1.0])[:, None, None, None]
    paths = []
    for i in range(min(num_samples, len(dataset))):
        item = dataset[i]
        video, pose = item["video"], item["pose2d"]  # (3, T+1, H, W) uint8, (3, T+1, 18, M)
        t = video.shape[1] // 2
        height, width = video.shape[2:]
        zoom = max(1, 256 // max(height, width))
        frame = Image.fromarray(video[:, t].permute(1, 2, 0).numpy()).resize((width * zoom, height * zoom))
        draw = ImageDraw.Draw(frame)
        order, present = select_tracks(pose[None], args.max_tracks)  # (1, M) each
        images = skelemotion_batch(pose[None] * scale_xy)[0]  # (M, 6, T, 49)
        tiles = []
        for rank, m in enumerate(order[0].tolist()):
            if not present[0, rank]:
                continue
            for j in torch.nonzero(pose[2, t, :, m] > 0).flatten().tolist():  # (x - 0.5, y - 0.5) in frame units
                x, y = (pose[0, t, j, m] + 0.5) * width * zoom, (pose[1, t, j, m] + 0.5) * height * zoom
                draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colours[rank % len(colours)])
            for channel in images[m]:  # (T, 49)
                tile = (channel.t() / channel.max().clamp_min(1e-6) * 255).byte().numpy()  # (49, T)
                tiles.append(Image.fromarray(tile).resize((tile.shape[1] * 4, 49 * 2), Image.NEAREST))
        canvas = Image.new("RGB", (frame.width + sum(x.width + 4 for x in tiles), max([frame.height] +
                                                                                   [x.height for x in tiles])))
        canvas.paste(frame, (0, 0))
        left = frame.width + 4
        for tile in tiles:
            canvas.paste(tile.convert("RGB"), (left, 0))
            left += tile.width + 4
        paths.append(os.path.join(out_dir, f"visualize_{i}.png"))
        canvas.save(paths[-1])
    return paths


@torch.no_grad()
def show_prototypes(model, loader, input_fn, run, num_prototypes):
    """--show-prototypes K: the K prototypes that most clips of `loader` (this process's shard) pick with their
    video embedding (arg-max of z_v C^T), up to 8 middle frames each, one row per prototype -> prototypes.png."""
    from PIL import Image
    from torchvision.utils import make_grid
    was_training = model.training
    model.eval()
    assignments, frames = [], []
    for batch in loader:
        batch = common.to_device(batch, run.device)
        z_v = F.normalize(model.vid_fc_rep(model.video(input_fn(batch), tap="fc2")).float(), dim=1)  # (B, D)
        assignments.append((z_v @ model.prototypes[:int(model.active)].float().t()).argmax(dim=1).cpu())  # (B,)
        middle = batch["video"][:, :, batch["video"].shape[2] // 2].cpu()  # (B, 3, H, W) uint8, or depth in [-1, 1]
        frames.append(((middle + 1) * 127.5).byte() if middle.is_floating_point() else middle)
    model.train(was_training)
    assignments, frames = torch.cat(assignments), torch.cat(frames)
    counts = torch.bincount(assignments, minlength=int(model.active))  # (K,)
    rows = []
    for c in counts.argsort(descending=True)[:num_prototypes].tolist():
        members = frames[assignments == c][:8]
        rows += [members, torch.zeros(8 - len(members), *frames.shape[1:], dtype=frames.dtype)]
    grid = make_grid(torch.cat(rows).float() / 255, nrow=8, padding=2, pad_value=1.0)  # (3, H', W')
    path = os.path.join(run.out_dir, "prototypes.png")
    Image.fromarray((grid * 255).byte().permute(1, 2, 0).numpy()).save(path)
    run.print(f"wrote {path}: prototypes {counts.argsort(descending=True)[:num_prototypes].tolist()} hold "
              f"{counts.sort(descending=True).values[:num_prototypes].tolist()} of {len(assignments)} clips")
    return path


@torch.no_grad()
def leave_one_out_nn1(encoder, input_fn, loader, run):
    """1-NN top-1 (%) of every sample against all the others of the same loader (cosine)."""
    features, labels = common.extract_features(encoder, input_fn, loader, run)  # (N, D) normalised, (N,)
    similarity = features @ features.t()  # (N, N)
    similarity.fill_diagonal_(float("-inf"))
    return (labels[similarity.argmax(dim=1)] == labels).float().mean().item() * 100


def main_worker(args):
    run = common.setup(args, "phlvc")
    model = PHLVC(args)
    random_video = copy.deepcopy(model.video)  # the same architecture at the same seed, before any training
    model = model.to(run.device)
    ddp_model = run.prepare(model)
    prototypes = [model.prototypes]
    others = [p for n, p in model.named_parameters() if n != "prototypes"]
    optimizer = torch.optim.Adam([{"params": others}, {"params": prototypes, "lr_scale": args.prototype_lr_scale}],
                                 lr=args.lr, weight_decay=args.wd)
    if args.visualize:  # raw frames and poses of the training split, no augmentation
        raw = common.build_dataset(args.dataset_name, args.data_root, "train", clip_len=args.clip_len + 1,
                                   modalities=("video", "pose2d"), decoder=args.decoder)
        for path in save_visualization(raw, args, run.out_dir, args.visualize) if run.is_main else ():
            run.print("wrote", path)
        return {"visualized": args.visualize}
    train_set, knn_sets = build_sets(args, run)
    loader = common.build_loader(train_set, args, run, train=True)
    train_step = make_train_step(ddp_model, model, optimizer, run, args, len(loader))
    knn_loaders = [common.build_loader(s, args, run, train=False) for s in knn_sets or ()]
    depth = args.video_input == "depth"  # depth clips arrive in [-1, 1] (common.depth_to_input)
    input_fn = lambda batch: batch["video"] if depth else common.normalize(batch["video"])  # noqa: E731
    meta = {"arch": "phlvc_video", "modality": "depth" if depth else "rgb", "method": "phlvc",
            "options": {"trunk": args.arch, "hidden": args.hidden, "tap": "fc2"}}
    result = common.fit(run, args, model, optimizer, loader, train_step, backbone=model.video, backbone_meta=meta,
                        knn=(model.video, input_fn, *knn_loaders) if args.knn_every else None)
    if run.is_main:
        common.save_backbone(model.pose, os.path.join(run.out_dir, "pose_backbone.pth"),
                             {"arch": "skelemotion_cnn", "modality": "skeleton", "method": "phlvc", "pose_scale":
                              args.pose_scale, "options": {"frames": args.clip_len, "hidden": args.hidden}})
    if run.world_size > 1:  # prototypes and queues must be identical on every process
        state = torch.cat([model.prototypes.detach().flatten(), model.queue.flatten()])[None]
        diff = (common.all_gather_nograd(state) - state).abs().max().item()
        run.print(f"prototypes and queues: largest difference between {run.world_size} processes {diff:.3g}")
    if args.show_prototypes and run.is_main:
        show_prototypes(model, knn_loaders[0], input_fn, run, args.show_prototypes)
    if args.dataset_name.startswith("toy") and result["step"] == args.epochs * len(loader):  # full toy runs only
        report = {}
        for name, video in (("pretrained", model.video), ("random_init", random_video.to(run.device))):
            for tap in ("fc1", "fc2"):
                video.tap = tap
                report[f"{name}_{tap}"] = dict(common.knn_monitor(video, input_fn, *knn_loaders, run=run),
                                               loo_nn1=leave_one_out_nn1(video, input_fn, knn_loaders[0], run))
            video.tap = "fc2"
        for tap in ("fc1", "fc2"):
            trained, random_init = report[f"pretrained_{tap}"], report[f"random_init_{tap}"]
            run.print(f"tap {tap}: leave-one-out 1-NN among the {len(knn_sets[0])} pretraining videos (labels unused "
                      f"in pretraining): pretrained {trained['loo_nn1']:.1f} %, random init (same arch, seed "
                      f"{args.seed}) {random_init['loo_nn1']:.1f} %; kNN on held-out videos ({len(knn_sets[1])}, "
                      f"gallery = train): {trained['knn_top1']:.1f} % vs {random_init['knn_top1']:.1f} %")
        if run.is_main:
            common.write_json_atomic(os.path.join(run.out_dir, "knn.json"), dict(report, step=result["step"]))
        result["knn_report"] = report
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, parents=[common.get_common_parser()],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_method_args(parser)
    parser.set_defaults(epochs=None, lr=None, batch_size=None, workers=None, knn_every=None, warmup_epochs=None,
                        final_lr=None, wd=1e-4, schedule="cosine")
    parser.epilog = (f"--data toy = toy-paired with toy defaults {TOY_DEFAULTS}; other data: the paper's "
                     f"{PAPER_DEFAULTS} (batch 80 S3D / 56 R2D3D, Adam).")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    toy = args.data.startswith("toy")
    common.fill_defaults(args, TOY_DEFAULTS if toy else PAPER_DEFAULTS)
    common.fill_defaults(args, dict(workers=4))
    args.dataset_name = "toy-paired" if args.data == "toy" else args.data
    args.data_root = args.data_root or os.path.join("data", args.dataset_name)
    return common.launch(main_worker, args, finalize=finalize_method_args)


if __name__ == "__main__":
    main()
