"""ViCC: Self-supervised Video Representation Learning with Cross-Stream Prototypical Contrasting.

Toering, Gatopoulos, Stol, Hu, WACV 2022, and its supplement (Sec. 1 pseudocode, Sec. 2 implementation details).
An RGB and an optical-flow encoder are trained by SwAV's swapped prediction: embeddings are scored against K
learnable prototypes, Sinkhorn-Knopp turns the scores into balanced codes, and each view's code is predicted from
the other views. Single-stream stages first (RGB-1, Flow-1), then cross-stream stages alternate: the trained
stream's prototypes also score the frozen other stream's embeddings, so each stream learns to predict the other's
grouping (RGB-2, Flow-2).

    python vicc.py                                    # toy-motion-flow, tiny3d on CPU: all 6 stages, kNN vs random
    python vicc.py --data ucf101 --gpus 4             # the paper: S3D 32x128², rgb-1 flow-1 c{1,2}-rgb c{1,2}-flow
    python vicc.py --data ucf101 --stage cross --train rgb --init runs/x/rgb-1 --frozen runs/x/flow-1 --out-dir D

Every stage is a resumable sub-folder of --out-dir (checkpoint.pth, backbone.pth for evaluate.py with meta
modality rgb|flow); a finished stage is skipped when the schedule is rerun. Data: --data toy = toy-motion-flow
(common.make_toy_motion_flow: toy-motion's motions as frame folders with their true flow); real sets give each
video's flow as <video without extension>/flow_%05d.jpg (CoCLR/ViCC TV-L1 layout, +-20 px, one frame fewer than
RGB), e.g. UCF-101/<Class>/v_X.avi + UCF-101/<Class>/v_X/flow_00001.jpg; clips come from frames both have.

Implementation details (supp. Sec. 2 unless noted; "code" = the authors' released code):
- z = L2-normalised head(f(x)), head = Linear(d, d) -> ReLU -> Linear(d, 128) on the pooled map (the code's
  1x1x1 convolutions after pooling are the same map); prototypes C: K x 128, rows re-normalised after each step.
- Sinkhorn-Knopp: SwAV's distributed_sinkhorn, eps 0.05, 3 iterations, fp32, all views in one batched op; across
  processes only the total and the K row sums are all-reduced, scores are never gathered.
- Loss: every code q_v is predicted from every other view u: mean_{v, u != v} -(1/B) sum_b q_v . log p_u with
  p = softmax(z C^T / 0.1): 2 views (single stream), 4 views and -1/4 * 1/3 * sum (cross stream, Sec. 1).
- Queue (Sec. 2.2): 1920 past embeddings per view, identical on every process, only used to compute codes (scored
  with the current prototypes, each process its 1/world slice so each entry counts once); filled from epoch 150
  (RGB-1), 200 (Flow-1), 25 (each cross stage), used once full (SwAV); rounded down to a multiple of the batch.
- Prototypes frozen for the first 100 epochs of a single-stream stage, trained from the start in cross stages.
- SGD momentum 0.9 + LARS (`LARC`: apex LARC, trust 0.001, no clipping), lr 0.6 per-step cosine to 6e-4,
  wd 1e-6, no warm-up (code); batch 192 single, 96 cross (code: 24 x 4).
- Batch shuffle (Sec. 2.1) on the second clip across processes, with gradient (pseudocode: both views train the
  encoder); a no-op on one process. The frozen stream runs once, in eval mode, under no_grad, for both clips.
- Views: two clips of a video (CoCLR sampling: random starts); for cross stages RGB and flow of a clip share
  frames, crop and flip. Flow enters as the CoCLR image (u, v, 128)/255 normalised like RGB.
- Augmentation (the supplement is silent; CoCLR's, as the code): crop area [0.2, 1], flip, colour jitter
  (0.4, 0.4, 0.4, 0.1) p 0.8, grey p 0.2, blur p 0.5; the code's mixing: with p 0.5 one clip duplicated (one copy
  strongly augmented, the other crop + flip only), else two clips each strong with p 0.3.
Differences from the code (flags reproduce it): view 2 under no_grad when shuffled (--authors-code-view2-nograd);
colour ops also on flow and flips that keep u's sign (--authors-code-flow-aug); single-stream cosine laid out for
500 epochs and stopped at 300 (--authors-code-schedule); Kinetics mean/std instead of ImageNet's; the crop's
w/h swap is not reproduced; crops do not rescale flow vectors (as the code); the queue is one buffer shared by all
processes (the code: one per rank, saved per rank). Toy defaults (--help) differ from the paper's: lr 4.8, crop
area [0.5, 1], K 30, queue 96 from epoch 5 / 7 / 2, Sinkhorn epsilon 0.02, 10 + 4 x 5 epochs.
Toy result (the learning test, 10 + 10 + 5 epochs; evaluate.py --task knn --center-features, ViCC's retrieval:
1-NN of the 256 held-out clips in the 192 train clips, consecutive frames as pretrained, chance 12.5 %; seeds 0-6):
RGB-1 and c1-rgb beat random init on every seed, RGB-1 by 2.0 to 25.0 (48.8 / 32.8 / 19.1 / 23.8 / 37.5 / 17.2 /
37.1 vs 23.8 / 18.0 / 16.0 / 21.9 / 14.8 / 15.2 / 20.7), c1-rgb by 11.3 to 33.6 (c1-rgb - RGB-1 -0.4 to +20.7);
Flow-1 -6.2 to +2.3. Without centring RGB-1 loses on seeds 3 and 5 (by 11.3 and 9.0) and Flow-1 wins on all (+1.2
to +12.9); at toy-motion's stride 2 RGB-1 loses on seeds 2 and 3 (the test's docstring has every figure).
What the toy needed: RGB that carries the motion. Rendered as toy-motion (a full-contrast random background per
video, an object of any colour, radius 4-8 px), tiny3d does not learn the classes from RGB even with labels (16.4 %
after 300 Adam steps: it memorises each video's background); toy-motion-flow renders a low-contrast background and
a large light object (common.TOY_MOTION_FLOW_RENDER): with labels 75.4 / 84.8 % (seed 0 / 1). A background shared
by all videos, with or without identical objects, leaves RGB-1 below random init uncentred (seeds 2, 3).
`python vicc.py` (seed 0, one thread + one loader worker): 101 s wall, 124 CPU s; its kNN report (1-NN, uncentred):
RGB-1 34.8, RGB-2 (c2-rgb) 61.3, Flow-2 61.3 vs random init 23.0 (RGB), 68.4 (flow). Checked against the
pseudocode: the trained stream's prototypes score all 4 views, --init loads encoder, head and prototypes, --frozen
the encoder and head (tested: its codes reach the trained encoder).
Evaluation (supp. Sec. 3): evaluate.py --task knn [--modality flow] --center-features (R@k), --protocol coclr
(linear / finetune); R+F: --task knn --save-logits for both streams, then --task fusion --logits rgb flow (sum of
cosine similarities; classification logits: mean of softmax probabilities).
Flow: `python common.py extract-flow --data ucf101 --workers N` (TV-L1, optional OpenCV contrib). Clusters (supp.
Table 1): backbone.pth holds head and prototypes; evaluate.py --task clusters --cluster-source prototypes applies the
head. --visualize N: supp. Fig. 1. --decode-on-device (frame folders): workers only read JPEGs and draw crops and
flips; each step decodes them in one decode_jpeg call on the device (CPU: same clips; GPU unmeasured). No --benchmark.
The authors' .pth.tar loading is tested on a synthetic file only.
"""
import argparse
import copy
import os
import sys

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF

import common

# ==================================================================================================== FLAGS


def add_method_args(parser):
    """The "method" group; None = filled from PAPER_DEFAULTS / TOY_DEFAULTS after parsing."""
    g = parser.add_argument_group("method")
    g.add_argument("--arch", default=None, help="backbone: s3d (paper), r2plus1d_10 (supp. Table 3, 16 frames), "
                   "tiny3d (toy)")
    g.add_argument("--clip-len", type=int, default=None, help="frames per clip (paper 32; 16 with r2plus1d_10)")
    g.add_argument("--crop-size", type=int, default=None, help="H = W (paper 128)")
    g.add_argument("--stage", choices=["all", "rgb-1", "flow-1", "cross"], default="all",
                   help="all: rgb-1, flow-1, then --cycles x (c<i>-rgb, c<i>-flow), one sub-folder each")
    g.add_argument("--train", choices=["rgb", "flow"], default=None, help="--stage cross: the stream to train")
    g.add_argument("--init", default=None, help="run folder or checkpoint to start the trained stream from "
                   "(encoder, head, prototypes); required for --stage cross")
    g.add_argument("--frozen", default=None, help="--stage cross: run folder or checkpoint of the frozen stream")
    g.add_argument("--cycles", type=int, default=2, help="cross-stream alternation cycles (paper 2)")
    g.add_argument("--cross-epochs", type=int, default=None, help="epochs per cross stage (paper 100); --epochs "
                   "is the single-stream stages' (paper 300)")
    g.add_argument("--cross-batch-size", type=int, default=None, help="global batch of cross stages (code 96)")
    g.add_argument("--prototypes", type=int, default=None, help="K prototypes (paper 300; 101 for supp. Table 1)")
    g.add_argument("--proj-dim", type=int, default=128, help="embedding dimension D (paper 128)")
    g.add_argument("--temperature", type=float, default=0.1, help="tau of p = softmax(scores / tau) (0.1)")
    g.add_argument("--epsilon", type=float, default=None, help="Sinkhorn regularisation eps (paper 0.05)")
    g.add_argument("--sinkhorn-iterations", type=int, default=3, help="Sinkhorn-Knopp iterations (3)")
    g.add_argument("--freeze-prototypes-epochs", type=int, default=None, help="single-stream epochs with frozen "
                   "prototypes (paper 100); cross stages train them from the start")
    g.add_argument("--queue-size", type=int, default=None, help="queue entries per view (paper 1920; 0 = none, "
                   "3840 in supp. Table 2)")
    g.add_argument("--queue-start-rgb", type=int, default=None, help="epoch the RGB-1 queue starts (150)")
    g.add_argument("--queue-start-flow", type=int, default=None, help="epoch the Flow-1 queue starts (200)")
    g.add_argument("--queue-start-cross", type=int, default=None, help="epoch the queue starts in a cross stage (25)")
    g.add_argument("--crop-scale-min", type=float, default=None, help="smallest crop area fraction (CoCLR 0.2)")
    g.add_argument("--lars-trust", type=float, default=0.001, help="LARS trust coefficient (apex LARC, 0.001)")
    g.add_argument("--decode-on-device", action="store_true", help="frame folders: decode, crop, flip on the device")
    g.add_argument("--visualize", type=int, default=0, help="N: after each stage, prototypes.png with the top val "
                   "clips of N random prototypes (supp. Fig. 1; a finished stage is only visualised)")
    g.add_argument("--authors-code", action="store_true", help="all --authors-code-* behaviours below")
    g.add_argument("--authors-code-schedule", action="store_true", help="single-stream cosine laid out for 5/3 x "
                   "--epochs (code: 500-epoch cosine, stage stopped at 300)")
    g.add_argument("--authors-code-view2-nograd", action="store_true", help="second clip encoded under no_grad "
                   "(the code's batch shuffle); the encoder then learns from view 1 only")
    g.add_argument("--authors-code-flow-aug", action="store_true", help="colour jitter / grey / blur also on flow "
                   "images, horizontal flips keep the sign of u")
    return parser


PAPER_DEFAULTS = dict(arch="s3d", clip_len=32, crop_size=128, epochs=300, cross_epochs=100, batch_size=192,
                      cross_batch_size=96, prototypes=300, queue_size=1920, queue_start_rgb=150, queue_start_flow=200,
                      queue_start_cross=25, freeze_prototypes_epochs=100, crop_scale_min=0.2, epsilon=0.05, lr=0.6,
                      final_lr=6e-4, wd=1e-6, knn_every=0, workers=8)
# Toy: 192 videos, batch 32 = 6 steps per epoch; K, the queue and its starts scaled to the set; lr 4.8 (SwAV's
# ImageNet base lr): at 0.6 the toy steps of LARS barely move the loss from ln K; epsilon 0.02: the embeddings start
# nearly equal, at 0.05 the codes are soft and RGB-1 stays near random init (docstring: the toy result).
TOY_DEFAULTS = dict(arch="tiny3d", clip_len=8, crop_size=48, epochs=10, cross_epochs=5, batch_size=32,
                    cross_batch_size=32, prototypes=30, queue_size=96, queue_start_rgb=5, queue_start_flow=7,
                    queue_start_cross=2, freeze_prototypes_epochs=5, crop_scale_min=0.5, epsilon=0.02, lr=4.8,
                    final_lr=6e-4, wd=1e-6, knn_every=1, workers=1)

# ==================================================================================================== MODEL


class Stream(nn.Module):
    """One stream: encoder f, projection head (pool -> d -> d -> ReLU -> D) and prototypes C (K x D)."""

    def __init__(self, arch, proj_dim=128, num_prototypes=300):
        super().__init__()
        self.backbone = common.build_backbone(arch)
        d = self.backbone.feature_dim
        self.head = nn.Sequential(nn.Linear(d, d), nn.ReLU(inplace=True), nn.Linear(d, proj_dim))
        self.prototypes = nn.Linear(proj_dim, num_prototypes, bias=False)  # weight (K, D): scores = z C^T
        normalize_prototypes(self)

    def embed(self, x):
        return F.normalize(self.head(self.backbone(x)), dim=1)  # (B, D)


@torch.no_grad()
def normalize_prototypes(stream):
    """Unit rows of C (pseudocode: C = normalize(C) after every update)."""
    w = stream.prototypes.weight
    w.copy_(F.normalize(w, dim=1))


def batch_shuffle_embed(embed, x, grad=True):
    """embed(x) with MoCo's batch shuffle (Sec. 2.1): every process encodes a random 1/world of the global batch,
    so batch-norm statistics cannot leak which clips belong together; the embeddings are all-gathered with
    gradient (common.all_gather_with_grad) and unshuffled. One process: plain embed(x)."""
    world = common.get_world_size()
    with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
        if world == 1:
            return embed(x)
        b, rank = x.shape[0], common.get_rank()
        x_all = common.all_gather_nograd(x)  # (W·B, C, T, H, W)
        perm = torch.randperm(world * b, device=x.device)
        dist.broadcast(perm, 0)
        z = embed(x_all[perm.view(world, b)[rank]])  # (B, D) of other processes' clips
        z_all = (common.all_gather_with_grad if grad else common.all_gather_nograd)(z)  # (W·B, D) shuffled
        return z_all[torch.argsort(perm)].view(world, b, -1)[rank]  # (B, D) this process's clips


class ViCC(nn.Module):
    """The trained stream, optionally the frozen other stream (cross stages), and the queue.

    Buffers: queue (V, L, D), identical on every process, newest first; queue_count (entries filled);
    steps (optimizer steps of this stage: epoch-based switches survive a resume with the checkpoint)."""

    def __init__(self, stream, frozen=None, queue_size=0, proj_dim=128, view2_grad=True):
        super().__init__()
        self.stream, self.frozen, self.view2_grad = stream, frozen, view2_grad
        if frozen is not None:
            frozen.requires_grad_(False)
        self.num_views = 4 if frozen is not None else 2
        self.register_buffer("queue", torch.zeros(self.num_views, queue_size, proj_dim))
        self.register_buffer("queue_count", torch.zeros((), dtype=torch.long))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def train(self, mode=True):
        super().train(mode)
        if self.frozen is not None:
            self.frozen.eval()  # frozen: its batch-norm statistics never move
        return self

    def forward(self, x1, x2, o1=None, o2=None):
        """x1, x2: the trained stream's clips i, j (B, C, T, H, W); o1, o2: the frozen stream's clips with the same
        frames and crop. Returns z (V, B, D) ordered [x1, x2, o1, o2] and scores z C^T (V, B, K)."""
        z = [self.stream.embed(x1), batch_shuffle_embed(self.stream.embed, x2, self.view2_grad)]
        if self.frozen is not None:
            with torch.no_grad():  # one forward for both clips
                z += list(self.frozen.embed(torch.cat([o1, o2])).chunk(2))  # 2 x (B, D)
        z = torch.stack(z)  # (V, B, D)
        return z, self.stream.prototypes(z)  # scores (V, B, K): the trained stream's prototypes score all views


# ==================================================================================================== SINKHORN


@torch.no_grad()
def sinkhorn(scores, epsilon=0.05, iterations=3):
    """SwAV's distributed_sinkhorn, batched over views: scores (V, B', K) -> codes (V, B', K), each row a
    distribution. Over all processes' rows (B = world x B' columns) the iterations alternate between giving every
    prototype mass 1/K and every sample mass 1/B (equipartition, SwAV Eq. 3). Only the total and the K row sums
    are all-reduced; each process keeps its own columns."""
    q = torch.exp(scores.float() / epsilon).transpose(1, 2)  # (V, K, B')
    k, b = q.shape[1], q.shape[2] * common.get_world_size()
    q = q / common.all_reduce(q.sum(dim=(1, 2), keepdim=True))  # (V, K, B'), total mass 1
    for _ in range(iterations):
        q = q / common.all_reduce(q.sum(dim=2, keepdim=True)) / k  # rows: each prototype 1/K
        q = q / q.sum(dim=1, keepdim=True) / b  # columns: each sample 1/B
    return (q * b).transpose(1, 2)  # (V, B', K), rows sum to 1


@torch.no_grad()
def assign_codes(scores, queue, prototypes, use_queue, epsilon, iterations):
    """Codes of the batch (V, B, K), with this process's slice of the queue (V, L/W, D) prepended to the Sinkhorn
    input when use_queue (scored with the current prototypes (K, D)); queue rows are left out of the result."""
    b = scores.shape[1]
    if use_queue:
        world, rank = common.get_world_size(), common.get_rank()
        n = queue.shape[1] // world
        queue_scores = queue[:, rank * n:(rank + 1) * n].float() @ prototypes.float().t()  # (V, L/W, K)
        scores = torch.cat([queue_scores, scores.float()], dim=1)  # (V, L/W + B, K)
    return sinkhorn(scores, epsilon, iterations)[:, -b:]  # (V, B, K)


@torch.no_grad()
def push_queue(model, z):
    """All processes' embeddings z (V, B, D) enter the front of the queue (FIFO, SwAV's order)."""
    z_all = common.all_gather_nograd(z.detach().float().transpose(0, 1).contiguous()).transpose(0, 1)  # (V, W·B, D)
    n = z_all.shape[1]
    model.queue.copy_(torch.cat([z_all, model.queue[:, :-n]], dim=1))
    model.queue_count.copy_(torch.clamp(model.queue_count + n, max=model.queue.shape[1]))


# ==================================================================================================== LOSS


def swapped_prediction_loss(scores, codes, temperature=0.1):
    """scores, codes (V, B, K). Each view's code is predicted from each other view (supp. Sec. 1; SwAV Eq. 1):
    mean over ordered pairs v != u of -(1/B) sum_b sum_k q_v[b, k] log softmax(scores_u[b] / tau)[k].
    V = 4 gives the pseudocode's -1/4 * 1/3 * sum; uniform scores give ln K (5.70 for K = 300: the initial loss)."""
    v, b, _ = scores.shape
    log_p = F.log_softmax(scores.float() / temperature, dim=2)  # (V, B, K)
    cross = -torch.einsum("vbk,ubk->vu", codes.float(), log_p) / b  # (V, V): [v, u] = q_v predicted from u
    return cross[~torch.eye(v, dtype=torch.bool, device=scores.device)].mean()


# ==================================================================================================== DATA


def make_train_transform(args, modalities):
    """Worker side, per video: two clips (B's dim 0) -> crop + flip shared by RGB and flow of a clip, the code's
    one-/two-clip mixing; returns uint8 "video" / "flow" (2, 3, T, H, W) and "strong" (2,) for the device ops."""
    def transform(item):
        one_clip = torch.rand(()) < 0.5
        strong = torch.tensor([True, False]) if one_clip else torch.rand(2) < 0.3
        seed = int(torch.randint(0, 2 ** 62, ()))
        for m in modalities:  # the same generator seed: the same crop boxes and flips for RGB and flow
            g = torch.Generator().manual_seed(seed)
            if args.decode_on_device:  # frame positions (2, T): the same draws, applied by common.decode_jpeg_clips
                item["jpeg"][m] = item["jpeg"][m][[0, 0]] if one_clip else item["jpeg"][m]
                common.draw_crop_and_flip(item["jpeg"], m, (args.crop_scale_min, 1.0), generator=g)
                continue
            x = item[m]  # (2, C, T, H, W)
            if one_clip:  # clip 2 := clip 1 (CoCLR's OneClipTransform)
                x = torch.stack([x[0], x[0]])
            x = common.random_resized_crop_clip(x, args.crop_size, scale=(args.crop_scale_min, 1.0), generator=g)
            is_flow = m == "flow" and not args.authors_code_flow_aug
            x = common.horizontal_flip(x, generator=g, flow=is_flow)  # flow: u changes sign
            item[m] = common.flow_image(x) if m == "flow" else x
        item["strong"] = strong
        return item
    return transform


def make_eval_transform(args):
    def transform(item):
        for m in [k for k in ("video", "flow") if k in item]:
            x = common.resized_center_crop(item[m], args.crop_size, args.crop_size)
            item[m] = common.flow_image(x) if m == "flow" else x
        for m in [k for k in ("video", "flow") if k in item.get("jpeg", ())]:  # --decode-on-device
            common.draw_center_crop(item["jpeg"], m, args.crop_size, args.crop_size)
        return item
    return transform


def random_grayscale(x, p=0.2):
    """(N, 3, T, H, W) RGB -> each clip replaced by its luma (ITU-R 601, 3 channels kept) with probability p."""
    gray = (torch.rand(x.shape[0]) < p).to(x.device).view(-1, 1, 1, 1, 1)  # (N, 1, 1, 1, 1)
    return torch.where(gray, TF.rgb_to_grayscale(x.transpose(1, 2), 3).transpose(1, 2), x)  # (N, 3, T, H, W)


def gaussian_blur(x, sigma=(0.1, 2.0), p=0.5):
    """(N, 3, T, H, W) -> each clip blurred with probability p, sigma ~ U(sigma), kernel ~ 10 % of the side (SimCLR)."""
    k = max(3, int(0.1 * min(x.shape[-2:])) // 2 * 2 + 1)
    out = x.clone()
    for n in range(x.shape[0]):
        s = sigma[0] + (sigma[1] - sigma[0]) * torch.rand(()).item()
        if torch.rand(()).item() < p:
            out[n] = TF.gaussian_blur(x[n].transpose(0, 1), [k, k], [s, s]).transpose(0, 1)  # (3, T, H, W)
    return out


def strong_augment(x, strong):
    """Colour jitter (0.4, 0.4, 0.4, 0.1) p 0.8, grey p 0.2, blur p 0.5 on the clips where strong; x float [0, 1]."""
    if strong.any():
        y = common.color_jitter(x[strong], 0.4, 0.4, 0.4, 0.1, p=0.8)
        x = x.clone()
        x[strong] = gaussian_blur(random_grayscale(y, p=0.2), p=0.5)
    return x


def prepare_views(batch, modality, args):
    """Device side: {modality: uint8 (B, 2, 3, T, H, W), "strong": (B, 2)} -> two normalised clips (B, 3, T, H, W)."""
    x = batch[modality].flatten(0, 1).float() / 255  # (2B, 3, T, H, W)
    if modality == "video" or args.authors_code_flow_aug:
        x = strong_augment(x, batch["strong"].flatten().to(x.device))
    x = common.normalize(x).view(*batch[modality].shape)
    return x[:, 0], x[:, 1]


# ==================================================================================================== TRAIN STEP


class LARC(torch.optim.SGD):
    """SGD with layer-wise adaptive rate scaling (You et al. 2017) as apex's LARC wrapper with clip=False (SwAV,
    ViCC): g <- trust * ||p|| / (||g|| + wd * ||p|| + eps) * (g + wd * p), then SGD (momentum, lr) without weight
    decay; a parameter with ||p|| = 0 or ||g|| = 0 gets neither scaling nor weight decay (as apex)."""

    def __init__(self, params, lr, momentum=0.9, weight_decay=0.0, trust_coefficient=0.001, eps=1e-8):
        super().__init__(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
        self.trust_coefficient, self.eps = trust_coefficient, eps

    @torch.no_grad()
    def step(self, closure=None):
        decays = [group["weight_decay"] for group in self.param_groups]
        for group, wd in zip(self.param_groups, decays):
            group["weight_decay"] = 0.0
            for p in (p for p in group["params"] if p.grad is not None):
                param_norm, grad_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(p.grad)
                if param_norm != 0 and grad_norm != 0:
                    p.grad.add_(p, alpha=wd).mul_(self.trust_coefficient * param_norm /
                                                  (grad_norm + param_norm * wd + self.eps))
        try:
            return super().step(closure)
        finally:
            for group, wd in zip(self.param_groups, decays):
                group["weight_decay"] = wd


def make_train_step(ddp_model, model, optimizer, run, args, steps_per_epoch, modality, other, queue_start,
                    freeze_epochs):
    """One step: views -> scores -> codes (Sinkhorn, queue) -> swapped prediction -> LARS step -> unit C."""

    def train_step(batch):
        epoch = int(model.steps) // steps_per_epoch
        if args.decode_on_device:  # uint8 clips as the workers' transform gives them
            batch.update(common.decode_jpeg_clips(batch.pop("jpeg"), args.crop_size, run.device,
                                                  not args.authors_code_flow_aug))
        x1, x2 = prepare_views(batch, modality, args)
        o1, o2 = prepare_views(batch, other, args) if other else (None, None)
        with run.autocast():
            z, scores = ddp_model(x1, x2, o1, o2)  # (V, B, D), (V, B, K)
        queue_on = model.queue.shape[1] > 0 and epoch >= queue_start
        use_queue = queue_on and int(model.queue_count) >= model.queue.shape[1]  # once full, as SwAV
        codes = assign_codes(scores.detach(), model.queue, model.stream.prototypes.weight, use_queue,
                             args.epsilon, args.sinkhorn_iterations)  # (V, B, K), no gradient
        if queue_on:
            push_queue(model, z)
        loss = swapped_prediction_loss(scores, codes, args.temperature)
        optimizer.zero_grad(set_to_none=True)
        run.backward(loss)
        if epoch < freeze_epochs:  # prototypes frozen (Sec. 2.1)
            model.stream.prototypes.weight.grad = None
        run.optimizer_step(optimizer)
        normalize_prototypes(model.stream)
        model.steps += 1
        hard = codes.argmax(dim=2)  # (V, B)
        usage = torch.bincount(hard.flatten(), minlength=codes.shape[2]).float()
        usage = usage / usage.sum()
        metrics = {"loss": loss.detach(), "agree_views": (hard[0] == hard[1]).float().mean(),
                   "perplexity": torch.exp(-(usage * usage.clamp_min(1e-12).log()).sum()),
                   "queue_used": float(use_queue)}
        if other:
            metrics["agree_streams"] = (hard[:2] == hard[2:]).float().mean()
        return metrics

    return train_step


# ==================================================================================================== STAGES


def stage_plan(args):
    """[(name, trained stream, init, frozen)]: init / frozen are earlier stage names (all) or the given paths."""
    if args.stage in ("rgb-1", "flow-1"):
        return [(args.stage, args.stage[:-2], args.init, None)]
    if args.stage == "cross":
        return [(f"cross-{args.train}", args.train, args.init, args.frozen)]
    plan, last = [("rgb-1", "rgb", None, None), ("flow-1", "flow", None, None)], {"rgb": "rgb-1", "flow": "flow-1"}
    for cycle in range(1, args.cycles + 1):
        for train, other in (("rgb", "flow"), ("flow", "rgb")):
            plan.append((f"c{cycle}-{train}", train, last[train], last[other]))
            last[train] = f"c{cycle}-{train}"
    return plan


def load_stream(stream, path, prototypes=True):
    """Our run folder (its checkpoint.pth), our checkpoint file or the authors' .pth.tar (state_dict with
    encoder_q = (backbone, pool, 1x1x1 conv, ReLU, 1x1x1 conv) and prototypes) -> encoder, head (and prototypes)."""
    file = os.path.join(path, "checkpoint.pth") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise common.UserError(f"vicc.py: --init/--frozen: expected a run folder with checkpoint.pth or a "
                               f"checkpoint file, found {path!r}")
    ckpt = torch.load(file, map_location="cpu", weights_only=False)
    state = {k.removeprefix("module."): v for k, v in ckpt.get("model", ckpt.get("state_dict", ckpt)).items()}
    if "encoder_q.2.weight" in state:  # the authors' layout; CoCLR's S3D names are renamed by common
        common.load_backbone_weights(stream.backbone, {k: v for k, v in state.items()
                                                       if k.startswith("encoder_q.0.")}, prefix="encoder_q.0.")
        state = {f"stream.{ours}": state[theirs].flatten(1) if state[theirs].dim() > 1 else state[theirs]
                 for ours, theirs in (("head.0.weight", "encoder_q.2.weight"), ("head.0.bias", "encoder_q.2.bias"),
                                      ("head.2.weight", "encoder_q.4.weight"), ("head.2.bias", "encoder_q.4.bias"),
                                      ("prototypes.weight", "prototypes.weight")) if theirs in state}
        state.update({f"stream.backbone.{k}": v for k, v in stream.backbone.state_dict().items()})
    state = {k[len("stream."):]: v for k, v in state.items() if k.startswith("stream.")
             and (prototypes or not k.startswith("stream.prototypes."))}
    try:
        missing, _ = stream.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shapes differ
        raise common.UserError(f"vicc.py: {file}: expected a checkpoint of this --arch/--prototypes ({e})") from None
    missing = [k for k in missing if prototypes or not k.startswith("prototypes.")]
    if missing:
        raise common.UserError(f"vicc.py: {file}: expected a ViCC checkpoint of this --arch/--prototypes, "
                               f"missing {missing[:3]}")


def run_stage(args, run, name, train, init, frozen, stage_dir):
    """Train one stage in stage_dir (resumable); returns the trained Stream."""
    single = frozen is None
    os.makedirs(stage_dir, exist_ok=True)
    a = copy.copy(args)
    a.out_dir = stage_dir
    if not single:
        a.epochs, a.batch_size = args.cross_epochs, args.cross_batch_size
    a.schedule_epochs = args.epochs * 5 / 3 if single and args.authors_code_schedule else None
    modality, other = ("video" if train == "rgb" else "flow"), (None if single else
                                                                 ("flow" if train == "rgb" else "video"))
    # the queue is rounded down to a multiple of the global batch (SwAV)
    queue_size = args.queue_size // a.batch_size * a.batch_size
    if args.queue_size and (queue_size == 0 or queue_size % run.world_size):
        raise common.UserError(f"vicc.py: --queue-size: expected 0 or >= the batch {a.batch_size}, divisible by "
                               f"{run.world_size} processes, found {args.queue_size}")
    if a.batch_size % run.world_size:
        raise common.UserError(f"vicc.py: --cross-batch-size: expected a multiple of the {run.world_size} "
                               f"processes, found {a.batch_size}")
    common.seed_everything(args.seed + run.rank)
    stream = Stream(args.arch, args.proj_dim, args.prototypes)
    if init:
        load_stream(stream, init)
    other_stream = None
    if frozen:
        other_stream = Stream(args.arch, args.proj_dim, args.prototypes)
        load_stream(other_stream, frozen, prototypes=False)
    model = ViCC(stream, other_stream, queue_size, args.proj_dim, not args.authors_code_view2_nograd).to(run.device)
    ddp_model = run.prepare(model)
    optimizer = LARC([p for p in model.parameters() if p.requires_grad], lr=a.lr, momentum=0.9,
                     weight_decay=a.wd, trust_coefficient=args.lars_trust)
    modalities = tuple(m for m in ("video", "flow") if m in (modality, other))
    train_set = common.build_dataset(args.dataset_name, args.data_root, "train", clip_len=args.clip_len,
                                     num_clips=2, sampling="random", modalities=modalities,
                                     transform=make_train_transform(args, modalities), decoder=args.decoder,
                                     strict=args.strict_data, fraction=args.data_fraction, seed=args.seed,
                                     bad_files_path=os.path.join(stage_dir, "bad_files.txt"),
                                     encoded=args.decode_on_device)
    loader = common.build_loader(train_set, a, run, train=True)
    stage_run = common.Run(a, run.device, stage_dir)
    queue_start = {"video": args.queue_start_rgb, "flow": args.queue_start_flow}[modality] if single else \
        args.queue_start_cross
    step = make_train_step(ddp_model, model, optimizer, stage_run, args, len(loader), modality, other,
                           queue_start, args.freeze_prototypes_epochs if single else 0)
    run.print(f"==== stage {name}: train {train}" + (f", frozen {frozen}" if frozen else "") +
              (f", init {init}" if init else "") + f" -> {stage_dir}")
    meta = {"arch": args.arch, "modality": "flow" if train == "flow" else "rgb", "method": "vicc", "stage": name,
            "input": "coclr-flow-image" if train == "flow" else "rgb", "feature_dim": stream.backbone.feature_dim}
    # backbone.pth holds the whole stream: backbone.*, head.* and prototypes.weight (evaluate.py --task clusters)
    result = common.fit(stage_run, a, model, optimizer, loader, step, backbone=stream, backbone_meta=meta)
    return stream, result


def knn_of(stream, modality, args, run):
    """kNN / 1-NN top-1 of a stream's backbone on the val set (gallery = train), centre crops."""
    sets = [common.build_dataset(args.dataset_name, args.data_root, split, clip_len=args.clip_len,
                                 sampling="uniform", modalities=(modality,), transform=make_eval_transform(args),
                                 decoder=args.decoder, encoded=args.decode_on_device) for split in ("train", "val")]
    loaders = [common.build_loader(s, args, run, train=False) for s in sets]

    def decode(b):  # --decode-on-device
        return common.decode_jpeg_clips(b["jpeg"], args.crop_size, run.device) if "jpeg" in b else b
    return common.knn_monitor(stream.backbone.to(run.device), lambda b: common.normalize(decode(b)[modality]),
                              *loaders, run=run)


@torch.no_grad()
def visualize(stream, modality, args, run, path, clips=4):
    """Supp. Fig. 1: --visualize N random prototypes, one row each: its `clips` top-scoring val clips (middle frame and
    the flow colour wheel of the same instant), captioned with prototype, score z.c and label -> one PNG at path."""
    from PIL import Image, ImageDraw
    from torchvision.utils import flow_to_image, make_grid
    ds = common.build_dataset(args.dataset_name, args.data_root, "val", clip_len=args.clip_len, sampling="uniform",
                              modalities=("video", "flow"), transform=make_eval_transform(args), decoder=args.decoder)
    stream.to(run.device).eval()
    z, index = [], []
    for b in common.build_loader(ds, args, run, train=False):
        z.append(stream.embed(common.normalize(b[modality].to(run.device))).float())  # (B, D)
        index.append(b["index"].to(run.device))
    index, z = common.gather_in_sample_order(torch.cat(index), torch.cat(z))  # (N,), (N, D)
    scores = (z @ stream.prototypes.weight.float().t()).cpu()  # (N, K)
    chosen = torch.randperm(scores.shape[1], generator=torch.Generator().manual_seed(args.seed))[:args.visualize]
    tiles, captions = [], []
    for k in chosen.tolist():
        for score, i in zip(*scores[:, k].topk(min(clips, len(index)))):
            item = ds[int(index[i])]
            t = item["video"].shape[1] // 2
            flow = torch.from_numpy(common.uint8_to_flow(item["flow"][:, t].permute(1, 2, 0).numpy()))  # (H, W, 2) px
            flow = flow.permute(2, 0, 1)  # (2, H, W)
            tiles += [item["video"][:, t], flow_to_image(flow)]  # 2 x uint8 (3, H, W)
            captions.append(f"C{k} {score:.2f} {ds.class_names[item['label']]}")
    if run.is_main:
        grid = make_grid(tiles, nrow=2 * clips, padding=2)  # uint8 (3, rows (H + 2), 2 clips (W + 2))
        image, (h, w) = Image.fromarray(grid.permute(1, 2, 0).cpu().numpy()), tiles[0].shape[1:]
        draw = ImageDraw.Draw(image)
        for j, text in enumerate(captions):
            draw.text(((j % clips) * 2 * (w + 2) + 4, (j // clips) * (h + 2) + 4), text, fill=(255, 255, 255),
                      stroke_width=1, stroke_fill=(0, 0, 0))
        image.save(path)
        run.print(f"visualize: {len(chosen)} prototypes x {clips} top clips -> {path}")


# ==================================================================================================== MAIN


def main_worker(args):
    run = common.setup(args, "vicc")
    streams = {}
    for name, train, init, frozen in stage_plan(args):
        stage_dir = args.out_dir if args.stage != "all" else os.path.join(args.out_dir, name)
        if args.stage == "all":
            init, frozen = (os.path.join(args.out_dir, n) if n else None for n in (init, frozen))
        stream, result = run_stage(args, run, name, train, init, frozen, stage_dir)
        streams[name] = (stream, "video" if train == "rgb" else "flow")
        if args.visualize:
            visualize(stream, streams[name][1], args, run, os.path.join(stage_dir, "prototypes.png"))
    if args.knn_every:  # the kNN report after the last stage (toy default; 0 = none)
        common.seed_everything(args.seed + run.rank)
        random_streams = {m: Stream(args.arch, args.proj_dim, args.prototypes) for m in ("video", "flow")}
        report = {}
        for name, (stream, modality) in streams.items():
            report[name] = knn_of(stream, modality, args, run)
        for modality, stream in random_streams.items():
            report[f"random-{modality}"] = knn_of(stream, modality, args, run)
        for name, r in report.items():
            run.print(f"kNN on {args.dataset_name} val ({name}): kNN top-1 {r['knn_top1']:.1f} %, "
                      f"1-NN {r['nn1_top1']:.1f} %")
        if run.is_main:
            common.write_json_atomic(os.path.join(args.out_dir, "knn.json"), report)
        return report
    return streams


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, parents=[common.get_common_parser()],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_method_args(parser)
    parser.set_defaults(epochs=None, batch_size=None, lr=None, final_lr=None, wd=None, knn_every=None, workers=None)
    parser.epilog = f"toy defaults (--data toy = toy-motion-flow): {TOY_DEFAULTS}; paper: {PAPER_DEFAULTS}"
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    toy = args.data.startswith("toy")
    if args.arch == "r2plus1d_10" and args.clip_len is None:
        args.clip_len = 16  # supp. Table 3: R(2+1)D at 16x128²
    common.fill_defaults(args, TOY_DEFAULTS if toy else PAPER_DEFAULTS)
    args.dataset_name = "toy-motion-flow" if args.data == "toy" else args.data
    args.data_root = args.data_root or os.path.join("data", args.dataset_name)
    if args.authors_code:
        args.authors_code_schedule = args.authors_code_view2_nograd = args.authors_code_flow_aug = True
    if args.stage == "cross" and not (args.train and args.init and args.frozen):
        raise common.UserError("vicc.py: --stage cross: expected --train rgb|flow, --init RUN and --frozen RUN")
    if args.stage != "all" and args.out_dir is None:
        args.out_dir = os.path.join("runs", f"vicc-{args.data}-{args.stage}" + (f"-{args.train}" if args.train
                                                                                   else ""))
    return args


def main(argv=None):
    return common.launch(main_worker, parse_args(argv))


if __name__ == "__main__":
    main()
