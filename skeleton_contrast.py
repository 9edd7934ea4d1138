"""Skeleton-Contrast: inter-skeleton contrastive 3D action representation learning.

Thoker, Doughty, Snoek, "Skeleton-Contrastive 3D Action Representation Learning", ACM MM 2021
(https://arxiv.org/abs/2108.03656); thesis Ch. 3 and App. A.

Two augmented views of a skeleton sequence (Sec. 3.3.1, Eq. 3.1-3.4) are encoded by one MoCo query/key encoder
pair per skeleton representation (sequence: BiGRU, image: HCN, graph: AGCN). Intra-skeleton contrast (Sec. 3.3.2,
Eq. 3.5) contrasts a representation with itself; inter-skeleton contrast (Sec. 3.3.3, Eq. 3.6-3.8) contrasts each
representation's query with the *other* representation's key and queue. The file follows Sec. 3.3: flags ->
augmentations -> encoders and MoCo -> losses -> train_step -> --visualize -> main.

    python skeleton_contrast.py                                              # toy-skeleton, CPU, a few minutes
    python skeleton_contrast.py --data ntu60-xview --gpus 4 --batch-size 64  # paper run (seq+graph, 450 epochs)

Implementation details
- Data: NTU arrays (N, 3, 300, 25, 2), zero-padded after each sequence's valid length (the datasets' "length");
  every crop (pretraining views, kNN monitor, evaluate.py) stays within it. Body 0's spine joint is subtracted
  per frame at load time (--no-center to skip). Raw NTU files go through common.convert_ntu_skeletons (2s-AGCN's
  body ranking); the toy set is written as raw NTU files and converted by the same code.
- Augmentations run batched on the training device: one 3x3 matrix product per sequence for shear / jitter, one
  index_select + lerp for the temporal crop-resize (equal to the authors' F.interpolate, tested).
- Multi-GPU: keys are all-gathered before they enter the queues (identical queues on every process, checked at
  the end), and the key encoders run under MoCo's shuffle-BN (batch_shuffle): without it a query and its positive
  key share BatchNorm statistics on each GPU (AGCN has BatchNorm; BiGRU and HCN have none).
- An interrupted run (SIGTERM/SIGINT) saves, prints the resume command and exits with status 3, writing no result.
- The query encoder of the first --representations is saved as backbone.pth for evaluate.py.

Differences from the paper / the authors' code
- Multi-GPU: shuffle-BN by default; the authors ran one process with nn.DataParallel (per-GPU BatchNorm, no
  shuffle): --no-shuffle-bn.
- BiGRU: a true bidirectional GRU by default; the authors' loop feeds one step per call, so its "backward"
  direction runs forward in time (--gru-stepwise).
- Joint jittering: paper R entries in U[0, 1]; the authors' code zeroes the joints with p = 0.5, else U[-1, 1]
  (--authors-jitter). Shear: the authors apply S p instead of p S (same distribution).
- Temporal crop: the paper has no minimum length; the authors' code never crops below 64 frames
  (--temporal-crop-min-frames 64).
- Three representations (Table 3.6 last row): the six ordered inter pairs summed; the authors' code has no such
  option. Key-encoder dropout (HCN) stays on as in the authors' code (--no-key-dropout switches it off).
- Toy defaults (TOY_DEFAULTS, not in the paper): intra-skeleton MoCo on a small BiGRU, 32 frames, momentum 0.99,
  crops of >= 16 frames, so that a CPU run of a few minutes beats random init.
"""
import argparse
import copy
import json
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

import common


# ================================================================================================================ FLAGS
# Skeleton representation -> backbone architecture of common.build_backbone (Sec. 3.4.2). Every backbone takes
# the raw (N, C, T, V, M) sequence and builds its own input representation, so no converter lives here.
REPRESENTATIONS = {"seq": "bigru", "image": "hcn", "graph": "agcn"}  # X^SEQ, X^IMG, X^STG
# Size of the negative set N (Sec. 3.4.2): 16384 on NTU, 8192 on PKU-MMD I, 2048 on PKU-MMD II.
PAPER_QUEUE_SIZE = {"ntu": 16384, "pku1": 8192, "pku2": 2048}
TOY_QUEUE_SIZE = 128  # not in the paper: the toy set has 252 training sequences
# Toy defaults (not in the paper): a CPU run of minutes that beats random init. Intra on the sequence encoder: inter
# seq+graph does not fit (small AGCN: 2-4 s per step) and inter seq+image stays near its uninformative loss in it.
TOY_DEFAULTS = {"representations": ["seq"], "contrast": "intra", "frames": 32, "batch_size": 32, "epochs": 60,
                "knn_every": 20, "workers": 0, "queue_size": TOY_QUEUE_SIZE, "moco_momentum": 0.99,
                "temporal_crop_min_frames": 16}  # 420 steps are short for m = 0.999; crops >= half a view
# Sec. 3.4.2: inter seq+graph, 64 frames, batch 64, 450 epochs on NTU (600 on PKU-MMD, set in parse_args).
PAPER_DEFAULTS = {"representations": ["seq", "graph"], "contrast": "inter", "frames": 64, "batch_size": 64,
                  "epochs": 450, "knn_every": 10, "workers": 8, "moco_momentum": 0.999, "temporal_crop_min_frames": 1}


def parse_representations(text):
    """'seq,graph' -> ['seq', 'graph'] (order kept: the first one is what evaluate.py uses by default)."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in REPRESENTATIONS]
    if not names or unknown or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(
            f"skeleton_contrast.py: --representations expected distinct names from {sorted(REPRESENTATIONS)}, "
            f"got {text!r}")
    return names


def add_method_args(parser):
    """Adds the "method" flag group; defaults reproduce Sec. 3.4.2 (inter-skeleton, seq+graph)."""
    group = parser.add_argument_group("method (Skeleton-Contrast, thesis Sec. 3.3-3.4.2)")
    group.add_argument("--representations", type=parse_representations, default=["seq", "graph"],
                       help="comma-separated: seq (BiGRU, X^SEQ), image (HCN, X^IMG), graph (AGCN, X^STG). Paper "
                            "best seq,graph (Table 3.6: 85.2 NTU-60 x-view); any pair or all three work. Toy: seq")
    group.add_argument("--contrast", choices=["inter", "intra"], default="inter",
                       help="inter: each query against the OTHER representation's key and queue (Eq. 3.6-3.8); "
                            "intra: MoCo per representation (Eq. 3.5, Table 3.6 baseline: 82.5 for seq). Toy: intra")
    group.add_argument("--spatial-aug", choices=["random", "shear", "jitter", "none"], default="random",
                       help="D_Spatial_i after the temporal crop-resize (Eq. 3.4): shear (Eq. 3.1), jitter (Eq. 3.2), "
                            "random = one of the two with p=0.5 per view (paper's best, Table 3.5); none: ablations")
    group.add_argument("--temporal-crop-min", type=float, default=0.1,
                       help="l_min of temporal crop-resize, L_ratio ~ U[l_min, 1] (Eq. 3.3). Paper 0.1 (Table A.3: "
                            "0.1 > 0.3 > 0.5); 1.0 switches the temporal augmentation off (Table 3.5 ablations)")
    group.add_argument("--temporal-crop-min-frames", type=int, default=1,
                       help="shortest crop in frames. Paper: no bound (1); the authors' code: 64; toy: 16")
    group.add_argument("--frames", type=int, default=64,
                       help="length T every view is resampled to (Sec. 3.4.2: 64; toy data: 32); longer = slower "
                            "BiGRU; HCN is built for exactly this T (its window_size)")
    group.add_argument("--joint-jitter-count", type=int, default=15,
                       help="|j|, number of joints moved by joint jittering (Eq. 3.2). Paper 15 of 25 "
                            "(Table A.2: 15 best, 2 too weak, 20 too strong)")
    group.add_argument("--authors-jitter", action="store_true",
                       help="joint jittering as in the authors' code: the |j| joints are zeroed with p=0.5, else "
                            "multiplied by a matrix with entries in U[-1,1] (paper: entries in U[0,1], no zeroing)")
    group.add_argument("--queue-size", type=int, default=None,
                       help="negatives |N| per queue: 16384 NTU, 8192 PKU-MMD I, 2048 PKU-MMD II (Sec. 3.4.2), 128 "
                            "toy; below the number of training sequences, or a sample's own old key is a negative")
    group.add_argument("--moco-momentum", type=float, default=0.999,
                       help="m of the key encoders' moving average (authors' code 0.999; toy 0.99)")
    group.add_argument("--no-key-dropout", action="store_true",
                       help="dropout off in the key encoders (only HCN has it; the authors keep it on, which makes "
                            "HCN keys noisy targets)")
    group.add_argument("--no-shuffle-bn", action="store_true",
                       help="multi-GPU: no shuffle-BN for the key encoders, as the authors' code (a query and its "
                            "positive key then share BatchNorm statistics on each GPU)")
    group.add_argument("--temperature", type=float, default=0.07, help="tau of Eq. 3.5-3.8 (Sec. 3.4.2: 0.07)")
    group.add_argument("--proj-dim", type=int, default=128,
                       help="output size of the projection MLP (Sec. 3.4.2: 128); the head is dropped downstream")
    group.add_argument("--visualize", type=int, default=0, metavar="N",
                       help="write stick-figure PNGs of N training sequences and their augmented views to "
                            "<out-dir>/visualize and exit (no training)")
    group.add_argument("--encoder-size", choices=["auto", "paper", "small"], default="auto",
                       help="paper: BiGRU 3x1024, HCN and AGCN width 64 (Sec. 3.4.2, ~50 M parameters for seq+graph); "
                            "small: narrow encoders for CPU runs; auto = small on toy-* data, paper otherwise")
    group.add_argument("--gru-stepwise", action="store_true",
                       help="BiGRU as the authors' code: one time step per call, so the 'backward' direction also "
                            "runs forward in time. Default: a true bidirectional GRU (faster, cuDNN)")
    return group


# --encoder-size small (not in the paper): enough capacity for the toy data, a few minutes on 2 CPU cores.
SMALL_ENCODERS = {"seq": {"hidden": 64, "layers": 2}, "image": {"hidden": 16}, "graph": {"hidden": 16}}


def encoder_options(representation, args, shape=(3, 25, 2)):
    """Keyword options of common.build_backbone(REPRESENTATIONS[representation], ...) for these flags and
    skeletons of shape (C, V, M)."""
    c, v, m = shape
    options = {"in_channels": c}
    if representation == "seq":  # input per frame: joints x xyz x persons (authors' 150)
        options.update(stepwise=args.gru_stepwise, input_dim=c * v * m)
    elif representation == "image":  # HCN's pseudo-image height is the view length T
        options.update(window_size=args.frames, num_joints=v, num_persons=m)
    else:
        options.update(num_joints=v, num_persons=m, layout="ntu25" if v == 25 else "coco18")
    if args.encoder_size == "small" or (args.encoder_size == "auto" and args.data.startswith("toy")):
        options.update(SMALL_ENCODERS[representation])
    return options


def default_queue_size(data_name):
    """|N| of Sec. 3.4.2 for a --data name (other real sets: the NTU value)."""
    return TOY_QUEUE_SIZE if data_name.startswith("toy") else PAPER_QUEUE_SIZE.get(data_name[:4],
                                                                                    PAPER_QUEUE_SIZE["ntu"])


# =========================================================================================== AUGMENTATIONS (Sec. 3.3.1)
# Batched on (N, C, T, V, M) = (sequences, xyz, frames, joints, persons), on whatever device x lives on. Every
# augmentation is drawn independently per sequence. The paper writes a sequence as X in R^{T x J x 3} with joints
# as row vectors, so "X . S" maps every joint p (a row) to p S.
def shear_matrix(n, c, device, dtype=torch.float32):
    """S of Eq. (3.1): ones on the diagonal, off-diagonals r ~ U[-1, 1]; (N, C, C), one per sequence."""
    s = torch.empty(n, c, c, device=device, dtype=dtype).uniform_(-1.0, 1.0)  # (N, 3, 3)
    s.diagonal(dim1=1, dim2=2).fill_(1.0)
    return s


def jitter_matrix_and_joints(n, c, v, num_joints, authors, device, dtype=torch.float32):
    """R and the joint subset j of Eq. (3.2): R entries ~ U[0, 1], |j| joints drawn without replacement.
    authors=True follows the authors' `joint_courruption`: with p = 0.5 R = 0 (the |j| joints are set to zero),
    otherwise R has entries in U[-1, 1]. Returns R (N, C, C) and the joint mask (N, V)."""
    chosen = torch.rand(n, v, device=device).argsort(dim=1)[:, :num_joints]  # (N, |j|)
    mask = torch.zeros(n, v, dtype=torch.bool, device=device).scatter_(1, chosen, True)  # (N, V)
    r = torch.empty(n, c, c, device=device, dtype=dtype).uniform_(-1.0 if authors else 0.0, 1.0)  # (N, 3, 3)
    if authors:
        r = r * (torch.rand(n, 1, 1, device=device) >= 0.5).to(dtype)  # p = 0.5: R = 0
    return r, mask


def transform_joints(x, matrix, mask=None):
    """Every joint p (a row of X) of sequence n -> p . matrix[n]; joints outside mask (N, V) are kept."""
    n, c, t, v, m = x.shape
    moved = torch.bmm(matrix.transpose(1, 2), x.reshape(n, c, t * v * m))  # (N, 3, T V M)
    if mask is None:
        return moved.view(n, c, t, v, m)
    # Select per joint with an exact 0/1 lerp (a broadcast torch.where is ~4x slower on CPU).
    keep = mask[:, None, :, None].expand(n, 1, v, m).reshape(n, 1, v * m).to(x.dtype)  # (N, 1, V M)
    out = torch.lerp(x.reshape(n, c * t, v * m), moved.view(n, c * t, v * m), keep)  # (N, 3 T, V M)
    return out.view(n, c, t, v, m)


def shear(x):
    """Pose augmentation, Eq. (3.1): X . S, one S per sequence shared by every joint, frame and person. (Authors'
    code: S p instead of p S; same distribution since the off-diagonals are i.i.d.)"""
    return transform_joints(x, shear_matrix(x.shape[0], x.shape[1], x.device, x.dtype))  # (N, 3, T, V, M)


def joint_jitter(x, num_joints=15, authors=False):
    """Joint jittering, Eq. (3.2): X[:, j] . R for |j| = num_joints random joints; one j and one R per sequence,
    shared by every frame and person; the other joints are unchanged. authors: see jitter_matrix_and_joints."""
    n, c, _, v, _ = x.shape
    r, mask = jitter_matrix_and_joints(n, c, v, num_joints, authors, x.device, x.dtype)
    return transform_joints(x, r, mask)  # (N, 3, T, V, M)


def spatio_temporal_augment(x, length=None, spatial="random", min_ratio=0.1, out_frames=64, min_length=1,
                            jitter_joints=15, authors_jitter=False):
    """Eq. (3.4): D_Spatial_i(D_Temporal(X)); i fixed (shear / jitter) or drawn per sequence with p = 0.5.
    D_Temporal is temporal crop-resize, Eq. (3.3) (common.temporal_crop_resize, shared with evaluate.py), within
    the valid length (N,) of every sequence."""
    x = common.temporal_crop_resize(x, length, min_ratio, out_frames, min_length)  # (N, C, T_out, V, M)
    if spatial == "shear":
        return shear(x)
    if spatial == "jitter":
        return joint_jitter(x, jitter_joints, authors_jitter)
    if spatial == "none":
        return x
    # Random i: both are one 3x3 map per sequence (shear on all joints, jitter on j), so one batched product.
    n, c, _, v, _ = x.shape
    use_shear = torch.rand(n, device=x.device) < 0.5  # (N,)
    r, mask = jitter_matrix_and_joints(n, c, v, jitter_joints, authors_jitter, x.device, x.dtype)
    matrix = torch.where(use_shear[:, None, None], shear_matrix(n, c, x.device, x.dtype), r)  # (N, 3, 3)
    return transform_joints(x, matrix, mask | use_shear[:, None])  # (N, 3, T_out, V, M)


def augment_from_args(x, length, args):
    """One view of Eq. (3.4) with the flags of add_method_args."""
    return spatio_temporal_augment(x, length, args.spatial_aug, args.temporal_crop_min, args.frames,
                                   args.temporal_crop_min_frames, args.joint_jitter_count, args.authors_jitter)


# ========================================================================== ENCODERS AND MOCO (Sec. 3.3.2-3.3.3, 3.4.2)
def projection_head(in_dim, out_dim):
    """Projection MLP appended to every encoder (Sec. 3.4.2), as the authors' `--mlp`: Linear(d, d), ReLU,
    Linear(d, 128). Its output is L2-normalised by the caller."""
    return nn.Sequential(nn.Linear(in_dim, in_dim), nn.ReLU(inplace=True), nn.Linear(in_dim, out_dim))


class FeatureQueue(nn.Module):
    """Dynamic set of negatives N of one representation (Eq. 3.5, MoCo). Buffers, so checkpoints carry them."""

    def __init__(self, size, dim):
        super().__init__()
        self.register_buffer("features", F.normalize(torch.randn(size, dim), dim=1))  # (K, D)
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def enqueue(self, keys):
        """keys: (B, D), already gathered over processes. Oldest entries are replaced; B need not divide K."""
        size = self.features.shape[0]
        keys = keys[-size:]
        index = (self.ptr + torch.arange(keys.shape[0], device=keys.device)) % size  # (B,)
        self.features[index] = keys.to(self.features.dtype)
        self.ptr.copy_((self.ptr + keys.shape[0]) % size)


@torch.no_grad()
def batch_shuffle(x):
    """MoCo's shuffle-BN, step 1: gather x (N, ...) from all W processes, permute the W N samples with one
    permutation (rank 0's), return this process's slice (N, ...) and the permutation (W N,); (x, None) at W = 1."""
    world, rank = common.get_world_size(), common.get_rank()
    if world == 1:
        return x, None
    x_all = common.all_gather_nograd(x)  # (W N, ...)
    perm = torch.randperm(x_all.shape[0], device=x.device)  # (W N,) shuffled position p holds sample perm[p]
    torch.distributed.broadcast(perm, src=0)
    return x_all[perm.view(world, -1)[rank]], perm


@torch.no_grad()
def batch_unshuffle(z, perm):
    """Step 2: z (N, D) computed on the shuffled slice -> the features of this process's own samples, in order."""
    if perm is None:
        return z
    world, rank = common.get_world_size(), common.get_rank()
    z_all = common.all_gather_nograd(z)  # (W N, D) in shuffled order
    return z_all[perm.argsort().view(world, -1)[rank]]  # sample i sits at shuffled position argsort(perm)[i]


class SkeletonContrast(nn.Module):
    """One query encoder f_q^r, one momentum key encoder f_k^r (+ projection heads) and one queue N^r per
    representation r (Sec. 3.3.3). build_encoder(r) -> nn.Module with .feature_dim, (N, C, T, V, M) -> (N, d).
    gather_fn concatenates keys over processes before they are enqueued (common.all_gather_nograd)."""

    def __init__(self, build_encoder, representations, contrast="inter", queue_size=16384, proj_dim=128,
                 momentum=0.999, temperature=0.07, gather_fn=None, key_dropout=True, shuffle_bn=True):
        super().__init__()
        if contrast == "inter" and len(representations) < 2:
            raise ValueError(f"skeleton_contrast.py: inter-skeleton contrast needs >= 2 representations, got "
                             f"{representations}; use --contrast intra for one")
        self.representations, self.contrast, self.momentum = list(representations), contrast, momentum
        self.temperature, self.key_dropout, self.shuffle_bn = temperature, key_dropout, shuffle_bn
        self.gather_fn = gather_fn or (lambda keys: keys)
        self.encoder_q = nn.ModuleDict({r: build_encoder(r) for r in self.representations})
        self.projector_q = nn.ModuleDict({r: projection_head(self.encoder_q[r].feature_dim, proj_dim)
                                          for r in self.representations})
        # Key encoders start as copies of the query encoders and are never trained by gradients (MoCo).
        self.encoder_k = copy.deepcopy(self.encoder_q)
        self.projector_k = copy.deepcopy(self.projector_q)
        for p in list(self.encoder_k.parameters()) + list(self.projector_k.parameters()):
            p.requires_grad_(False)
        self.queues = nn.ModuleDict({r: FeatureQueue(queue_size, proj_dim) for r in self.representations})

    def train(self, mode=True):
        """key_dropout=False keeps the key encoders' dropout (HCN's three Dropout2d(0.5)) off in training, so keys
        are deterministic targets; the authors' key encoders run in train mode with dropout on."""
        super().train(mode)
        if not self.key_dropout:
            for module in self.encoder_k.modules():
                if isinstance(module, (nn.Dropout, nn.Dropout2d, nn.Dropout3d)):
                    module.eval()
        return self

    @torch.no_grad()
    def momentum_update(self):
        """theta_k <- m * theta_k + (1 - m) * theta_q for every key encoder and head (MoCo)."""
        query = [p.detach() for p in list(self.encoder_q.parameters()) + list(self.projector_q.parameters())]
        key = list(self.encoder_k.parameters()) + list(self.projector_k.parameters())
        torch._foreach_lerp_(key, query, 1.0 - self.momentum)  # one fused kernel per dtype/device, not per tensor

    def embed(self, x, encoders, projectors):
        """x: (N, C, T, V, M) -> {r: Z^r (N, D) L2-normalised, float32}."""
        return {r: F.normalize(projectors[r](encoders[r](x)).float(), dim=1) for r in self.representations}

    def forward(self, x_q, x_k):
        """x_q, x_k: two augmented views (N, C, T, V, M) of the same sequences -> (loss, stats)."""
        z_q = self.embed(x_q, self.encoder_q, self.projector_q)  # {r: Z_q^r (N, D)}
        with torch.no_grad():
            self.momentum_update()
            # Shuffle-BN (MoCo): the key encoders see a batch mixed across processes, so a query and its positive
            # key do not share BatchNorm statistics (AGCN has BN; BiGRU and HCN have none). No-op on one process.
            x_k, perm = batch_shuffle(x_k) if self.shuffle_bn else (x_k, None)
            z_k = self.embed(x_k, self.encoder_k, self.projector_k)  # {r: Z_k^r (N, D)}, no gradient
            z_k = {r: batch_unshuffle(z, perm) for r, z in z_k.items()}  # back to this process's samples
        # Clone: the queues are overwritten below, before backward needs them.
        negatives = {r: self.queues[r].features.clone().detach() for r in self.representations}  # {r: (K, D)}
        loss_fn = inter_skeleton_loss if self.contrast == "inter" else intra_skeleton_loss
        loss, logits = loss_fn(z_q, z_k, negatives, self.temperature)
        for r in self.representations:
            self.queues[r].enqueue(self.gather_fn(z_k[r]))  # keys of all processes, MoCo
        # Instance-discrimination accuracy of every term: the positive ranked first.
        return loss, {f"acc_{name}": (l.argmax(dim=1) == 0).float().mean().detach() for name, l in logits.items()}


# ================================================================================================= LOSSES (Eq. 3.5-3.8)
# Notation of Sec. 3.3: Z_q query embedding, Z_k positive key, N queue of negatives, tau temperature; all
# embeddings L2-normalised, so Z_q . Z_k is the cosine similarity.
def info_nce_logits(z_q, z_k, negatives, temperature):
    """Logits of Eq. (3.5); the positive is column 0."""
    l_pos = (z_q * z_k).sum(dim=1, keepdim=True)  # (N, 1)   Z_q . Z_k
    l_neg = z_q @ negatives.t()  # (N, K)   Z_q . Z_n, Z_n in N
    return torch.cat([l_pos, l_neg], dim=1) / temperature  # (N, 1 + K)


def info_nce(logits):
    """-log softmax of the positive (column 0), averaged over the batch: Eq. (3.5)."""
    target = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)  # (N,)
    return F.cross_entropy(logits, target)


def intra_skeleton_loss(z_q, z_k, negatives, temperature):
    """Eq. (3.5) for every representation r with its own key Z_k^r and queue N^r (Sec. 3.3.2).
    z_q, z_k: {r: (N, D)}; negatives: {r: (K, D)}. Returns (loss, {name: logits (N, 1 + K)}).
    With several representations this is independent MoCo runs summed (Table A.4 "Intra" rows)."""
    logits = {r: info_nce_logits(z_q[r], z_k[r], negatives[r], temperature) for r in z_q}
    return sum(info_nce(l) for l in logits.values()), logits


def inter_skeleton_loss(z_q, z_k, negatives, temperature):
    """Eq. (3.6)-(3.8): the query of representation a is contrasted with the key Z_k^b and the queue N^b of
    every OTHER representation b (Sec. 3.3.3). For two representations this is exactly L(X^SEQ, X^STG) =
    L(X^SEQ) + L(X^STG). For three (Table 3.6 last row; the authors' code has no such option) we sum Eq. (3.7)
    over all six ordered pairs (a, b), a != b.
    z_q, z_k: {r: (N, D)}; negatives: {r: (K, D)}. Returns (loss, {"a<-b": logits (N, 1 + K)})."""
    logits = {f"{a}<-{b}": info_nce_logits(z_q[a], z_k[b], negatives[b], temperature)  # Eq. (3.7) / (3.8)
              for a in z_q for b in z_q if a != b}
    return sum(info_nce(l) for l in logits.values()), logits  # Eq. (3.6)


# =========================================================================================================== TRAIN STEP
def make_train_step(model, optimizer, run, args):
    """train_step(batch) for common.fit: augments on run.device, one SGD step, key/queue updates in forward.
    batch["skeleton"]: (N, C, T, V, M) float, zero-padded after batch["length"] (N,) valid frames (the key
    common.SkeletonDataset writes); crops never reach into the padding."""

    def train_step(batch):
        x, length = batch["skeleton"], batch["length"]  # (N, C, T, V, M), (N,)
        with torch.no_grad():  # two independent views X_q, X_k of every sequence (Sec. 3.3.2)
            x_q = augment_from_args(x, length, args)  # (N, C, T_out, V, M)
            x_k = augment_from_args(x, length, args)
        with run.autocast():
            loss, stats = model(x_q, x_k)
        run.step(loss, optimizer)
        return {"loss": loss.detach(), **stats}

    return train_step


# ============================================================================================================ VISUALIZE
def draw_skeleton_rows(rows, path, columns=8, cell=96):
    """rows: list of (title, sequence (C, T, V, M)) -> a PNG with `columns` evenly spaced frames of each row as
    stick figures (x-y plane, NTU-25 bones, else dots); one scale per row, so shear shows. Pillow only."""
    from PIL import Image, ImageDraw
    image = Image.new("RGB", (120 + columns * cell, len(rows) * cell), "white")  # 120 px for the titles
    draw = ImageDraw.Draw(image)
    for row, (title, seq) in enumerate(rows):
        draw.text((4, row * cell + cell // 2 - 6), title, fill="black")
        xy = seq[:2].detach().float().cpu()  # (2, T, V, M)
        present = (xy.abs().sum(dim=(0, 1, 2)) > 0).nonzero().flatten().tolist()  # persons that are not padding
        if not present:
            continue
        low = xy[..., present].amin(dim=(1, 2, 3))  # (2,)
        span = (xy[..., present].amax(dim=(1, 2, 3)) - low).max().clamp(min=1e-6)
        for col, t in enumerate(torch.linspace(0, xy.shape[1] - 1, columns).round().long().tolist()):
            ox, oy = 120 + col * cell, row * cell
            draw.rectangle([ox, oy, ox + cell - 1, oy + cell - 1], outline=(220, 220, 220))
            for person in present:
                u = (ox + 4 + (xy[0, t, :, person] - low[0]) / span * (cell - 8)).tolist()
                w = (oy + cell - 4 - (xy[1, t, :, person] - low[1]) / span * (cell - 8)).tolist()  # y up
                for a, b in common.NTU25_INWARD if xy.shape[2] == 25 else ():
                    draw.line([(u[a], w[a]), (u[b], w[b])], fill=((200, 30, 30), (30, 30, 200))[person % 2], width=2)
                for px, py in zip(u, w):
                    draw.ellipse([px - 1.5, py - 1.5, px + 1.5, py + 1.5], fill="black")
    image.save(path)
    return path


def save_augmentation_figures(skeletons, out_dir, args, length=None):
    """--visualize: one PNG per sequence of skeletons (N, C, T, V, M) (valid lengths (N,) or None) with the
    original and each augmentation over time. Returns the list of written paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for i in range(skeletons.shape[0]):
        x = skeletons[i:i + 1]  # (1, C, T, V, M)
        n = None if length is None else length[i:i + 1]
        full = common.temporal_crop_resize(x, n, min_ratio=1.0, out_frames=args.frames)  # whole sequence, resampled
        rows = [("original", full[0]),
                ("temporal crop (3.3)", common.temporal_crop_resize(x, n, args.temporal_crop_min, args.frames,
                                                                    args.temporal_crop_min_frames)[0]),
                ("shear (3.1)", shear(full)[0]),
                ("jitter (3.2)", joint_jitter(full, args.joint_jitter_count, args.authors_jitter)[0]),
                ("view q (3.4)", augment_from_args(x, n, args)[0]),
                ("view k (3.4)", augment_from_args(x, n, args)[0])]
        paths.append(draw_skeleton_rows(rows, os.path.join(out_dir, f"augmentations_{i:03d}.png")))
    return paths


# ================================================================================================================= MAIN
def center_item(item):
    """Dataset transform: common.center_on_spine on item["skeleton"] (C, T, V, M) (2s-AGCN's translation step)."""
    return dict(item, skeleton=common.center_on_spine(item["skeleton"]))


def queues_synchronised(model):
    """True when every process holds the same queues and pointers (they enqueue the same gathered keys)."""
    local = torch.cat([torch.cat([q.features.flatten(), q.ptr.view(1).to(q.features.dtype)])
                       for q in model.queues.values()])[None]  # (1, sum K D + 1)
    everyone = common.all_gather_nograd(local)  # (world size, ...)
    return bool((everyone == everyone[:1]).all())


def main_worker(args):
    run = common.setup(args, "skeleton_contrast")
    if run.device.type == "cpu" and args.data.startswith("toy"):  # ops too small to split: 1 thread is 10x faster
        torch.set_num_threads(1)
    root = args.data_root or os.path.join("data", args.data)
    data_options = dict(transform=None if args.no_center else center_item, seed=args.seed,
                        strict=args.strict_data, bad_files_path=os.path.join(run.out_dir, "bad_files.txt"))
    train_set = common.build_dataset(args.data, root, "train", fraction=args.data_fraction, **data_options)
    c, _, v, m = train_set[0]["skeleton"].shape  # (C, T, V, M)

    if args.visualize:
        batch = torch.utils.data.default_collate([train_set[i] for i in range(min(args.visualize, len(train_set)))])
        for path in save_augmentation_figures(batch["skeleton"], os.path.join(run.out_dir, "visualize"), args,
                                              batch["length"]) if run.is_main else []:
            print("wrote", path)
        return

    model = SkeletonContrast(
        lambda r: common.build_backbone(REPRESENTATIONS[r], **encoder_options(r, args, (c, v, m))),
        args.representations, args.contrast, args.queue_size, args.proj_dim, args.moco_momentum, args.temperature,
        gather_fn=common.all_gather_nograd, key_dropout=not args.no_key_dropout, shuffle_bn=not args.no_shuffle_bn)
    evaluated = args.representations[0]  # the encoder evaluate.py uses: the sequence one by default
    ddp_model = run.prepare(model)  # DDP broadcasts rank 0's initial weights (and queues) to every process
    random_init = copy.deepcopy(model.encoder_q[evaluated])  # the weights the pretraining starts from
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=args.lr, momentum=0.9, weight_decay=args.wd)  # Sec. 3.4.2
    run.print(f"Skeleton-Contrast: {args.contrast} {'+'.join(args.representations)}, queue {args.queue_size}, "
              f"{sum(p.numel() for p in params):,} trainable parameters, {len(train_set)} training sequences")

    # kNN monitor / final report: the whole valid sequence resampled to --frames (no augmentation).
    def knn_input(batch):
        return common.temporal_crop_resize(batch["skeleton"], batch["length"], min_ratio=1.0, out_frames=args.frames)

    val_set = common.build_dataset(args.data, root, "val", **data_options)
    gallery_set = common.build_dataset(args.data, root, "train", **data_options)
    knn_loaders = (common.build_loader(gallery_set, args, run, train=False),
                   common.build_loader(val_set, args, run, train=False))
    loader = common.build_loader(train_set, args, run, train=True)
    train_step = make_train_step(ddp_model, optimizer, run, args)
    meta = {"arch": REPRESENTATIONS[evaluated], "modality": "skeleton", "method": "skeleton_contrast",
            "options": encoder_options(evaluated, args, (c, v, m))}
    result = common.fit(run, args, model, optimizer, loader, train_step, backbone=model.encoder_q[evaluated],
                        backbone_meta=meta, knn=(model.encoder_q[evaluated], knn_input, *knn_loaders))

    if run.world_size > 1:  # keys are all-gathered before enqueueing: every process must hold the same queues
        if not queues_synchronised(model):
            raise RuntimeError(f"skeleton_contrast.py: expected identical queues on the {run.world_size} "
                               f"processes, got different ones")
        run.print(f"queues identical on all {run.world_size} processes: True")

    # The figure the toy run exists for: 1-NN (cosine) accuracy of the pretrained encoder against its random init.
    pretrained = common.knn_monitor(model.encoder_q[evaluated], knn_input, *knn_loaders, run=run)
    baseline = common.knn_monitor(random_init.to(run.device), knn_input, *knn_loaders, run=run)
    report = {"encoder": evaluated, "step": result["step"], "nn1_top1_pretrained": pretrained["nn1_top1"],
              "nn1_top1_random_init": baseline["nn1_top1"], "knn_top1_pretrained": pretrained["knn_top1"],
              "knn_top1_random_init": baseline["knn_top1"]}
    if run.is_main:
        common.write_json_atomic(os.path.join(run.out_dir, "knn_vs_random_init.json"), report)
    run.print(f"1-NN (cosine) accuracy of the {evaluated} query encoder on {args.data} val (train set as gallery): "
              f"pretrained {pretrained['nn1_top1']:.1f}%, random init {baseline['nn1_top1']:.1f}%")
    run.print("result:", json.dumps(report))
    return report


def parse_args(argv=None):
    """Command line -> args with every None flag filled from TOY_DEFAULTS or the paper's (common.fill_defaults)."""
    parser = argparse.ArgumentParser(description=__doc__, parents=[common.get_common_parser()],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_method_args(parser)
    parser.add_argument("--no-center", action="store_true",
                        help="do not subtract body 0's spine joint per frame (2s-AGCN pre_normalization's "
                             "translation step, which the authors' NTU arrays already had)")
    # Sec. 3.4.2 (SGD lr 0.01, wd 1e-4, batch 64, lr x0.1 late). None = toy or paper value, filled below.
    parser.set_defaults(data="toy-skeleton", lr=0.01, wd=1e-4, schedule="multistep", milestones=None, workers=None,
                        representations=None, contrast=None, frames=None, batch_size=None, epochs=None,
                        knn_every=None, moco_momentum=None, temporal_crop_min_frames=None)
    args = parser.parse_args(argv)
    args.data = "toy-skeleton" if args.data == "toy" else args.data
    toy = args.data.startswith("toy")
    paper = dict(PAPER_DEFAULTS, epochs=600 if args.data.startswith("pku") else 450,
                 queue_size=default_queue_size(args.data))
    common.fill_defaults(args, TOY_DEFAULTS if toy else paper)
    if args.milestones is None:  # authors' script: x0.1 at epoch 351 of 451; same fraction elsewhere, none on toy
        args.milestones = [] if toy else [round(args.epochs * 351 / 451)]
    if args.contrast == "inter" and len(args.representations) < 2:
        parser.error(f"--contrast inter needs >= 2 --representations, got {args.representations}")
    return args


def main(argv=None):
    common.launch(main_worker, parse_args(argv))


if __name__ == "__main__":
    main()
