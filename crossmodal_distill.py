"""Feature-supervised cross-modal distillation: an RGB or optical-flow teacher teaches a depth or 3D-skeleton student.

Thoker & Snoek, "Feature-Supervised Action Modality Transfer", ICPR 2020; thesis (Thoker, "Video-Efficient
Foundation Models") Ch. 2, Sec. 2.3-2.4. README: "Cross-modal distillation". No public code exists.
A frozen teacher, trained with labels on RGB (or flow) of classes the student never sees, gives a feature for every
unlabelled (RGB, depth) pair; the student learns to output that feature from depth (or skeletons) alone. It is then
fine-tuned with few labels (evaluate.py).

    python crossmodal_distill.py              # toy: trains a tiny flow teacher on toy-paired-source (6 actions),
                                              # distils it into a tiny depth student on toy-paired-target (the
                                              # other 6), prints kNN of student vs random init vs teacher
    python evaluate.py --task linear --data toy-paired-target \
        --weights runs/crossmodal_distill-toy-paired-target/backbone.pth      # vs --weights none
    # paper (NTU RGB+D official folders under NTU/, common.NTUPairedDataset; PKU-MMD under PKU/, PKUPairedDataset):
    python crossmodal_distill.py --stage teacher --data ntu120-minus-60 --data-root NTU --gpus 4
    python crossmodal_distill.py --data ntu60-paired-xview --data-root NTU --gpus 4 \
        --teacher-weights runs/crossmodal_distill-teacher-ntu120-minus-60/backbone.pth    # --student skeleton
    python evaluate.py --task fewshot --protocol ch2 --per-class 20 --seeds 0 1 2 3 4 --data ntu60-paired-xview \
        --data-root NTU --weights S/backbone.pth --save-logits      # Fig. 2.3 / Tables 2.1-2.4 (--weights none)
    python evaluate.py --task fusion --logits RGB_EVAL/seed_0/logits.pth FLOW_EVAL/seed_0/logits.pth
        # two-stream (Table 2.1): top1_mean_scores = equal-weight mean of the RGB- and flow-taught students' scores
    python evaluate.py --task detection --data pku1-paired --data-root PKU --weights S/backbone.pth \
        --label-fraction 0.25 --gpus 4      # Table 2.6 (1/4, 1/2, all): R-C3D on the student's trunk
    # flow/<name>/flow_%05d.jpg (CoCLR layout): OpenCV DualTVL1OpticalFlow between consecutive grey RGB frames,
    # clipped to +-20 px, (u + 20) * 255 / 40 in channels 0 and 1 of a JPEG (quality 100), channel 2 = 128
    # (common.write_flow_frames writes exactly this from float flow).

The file follows Sec. 2.3: flags -> teacher (Sec. 2.3.1, frozen) -> student + projection -> clips of a video
(Eq. 2.3) -> losses (Eq. 2.1-2.5) -> teacher feature cache -> data -> train steps -> main.

Implementation details (the thesis is silent on these; our choices):
  1. Teacher feature = pooled output before the fc; the teacher is in eval mode, frozen, outside the optimiser and
     outside the checkpointed model, so BatchNorm statistics never move. Its input is deterministic (short side
     resized to --crop-size, centre crop, no flip), so the features of every clip are computed once into a
     memory-mapped fp16 cache keyed by the teacher's weights and the input description (--teacher-cache).
  2. N = max(1, frames // clip_len) consecutive clips, clip i = frames [i L, (i + 1) L) (Eq. 2.3 "total number of
     frames / input size"; a tail shorter than L is left out, a video shorter than L is one clip with its last frame
     repeated). The student's depth clip is the same frames as teacher clip i, i drawn uniformly, so clip-to-clip
     pairs are exactly aligned (Eq. 2.1 does not say whether clips may start anywhere).
  3. Student augmentation (Sec. 2.4.3): multi-scale corner crop (Hara et al.) resized to --crop-size, flip p 0.5;
     depth in metres mapped to [-1, 1] (0 m = background) and replicated to 3 channels. The teacher sees the
     unflipped clip (the thesis describes augmentation for the student only). Skeletons: raw camera coordinates,
     zero-padded to --skeleton-frames (evaluate them with evaluate.py --data ntu60-xview --no-center).
  4. A linear projection (student dim -> teacher dim) when the sizes differ; it is not part of backbone.pth.
     --match-blocks adds one projection per ResNet stage (pooled outputs, Sec. 2.5.1.4).
  5. --loss mse: mean squared error over feature elements of the raw (unnormalised) features (FitNets-style).
  6. Schedules: cosine decay for distillation and for the teacher (the thesis / Hara et al. give only the initial
     lr; Hara divides it by 10 on plateaus).
  7. Logged: cos_pos (cosine to the own teacher target), cos_neg (to the other targets of the batch) and ret_acc
     (share of students whose nearest target in the batch is their own): teacher features of different videos are
     alike (cos_neg is high), so a falling loss alone does not show that the student tells videos apart.
  8. NTU RGB+D: RGB, depth, skeletons and flow differ in frame count; they are aligned by time on the depth frames.
     NTU-120-minus-60 (A061-A120) is split by NTU-120's cross-subject subjects (the thesis does not say). PKU-MMD:
     one sample per labelled action, aligned by time on the skeleton (label) frames; 8-bit depth videos read as
     255 = 4.5 m (the files state no scale; 16-bit millimetre PNG folders are exact).
  9. Toy (not in the paper): tiny3d, 8 x 48², batch 8; teacher on flow, 40 epochs (in one run an RGB teacher's
     features keyed on the random backgrounds: kNN 11 % on the unseen actions vs 47 % for flow), student 100 epochs.

Skeleton students are evaluated on the skeleton sets (evaluate.py --data ntu60-xview --arch stgcn --protocol ch2
--no-center), not on paired sets. Samples/s with and without the teacher cache were not measured on a GPU (toy, 1
CPU thread, 1 loader worker, shared 2-core machine at load ~8: 83-117 samples/s cached vs 31-42 with none).
"""
import argparse
import copy
import hashlib
import json
import os
import sys

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import common

GRANULARITIES = ("clip", "video-to-clip", "combined", "video")


# ==================================================================================================== FLAGS
def add_method_args(parser):
    """The "method" group; None = derived from --student / toy vs paper data in finalize_args."""
    g = parser.add_argument_group("method")
    g.add_argument("--stage", choices=["distill", "teacher"], default="distill", help="teacher: train the teacher "
                   "with labels on --data (Sec. 2.4.3: 3D-ResNet-18 from scratch on NTU-120-minus-60, 16-frame "
                   "clips, Hara et al. settings); distill: the cross-modal transfer (Sec. 2.3)")
    g.add_argument("--student", choices=["depth", "skeleton"], default="depth", help="target modality: depth maps "
                   "(3D-ResNet-18 on clips) or 3D skeletons (ST-GCN on whole sequences)")
    g.add_argument("--student-arch", default=None, help="default resnet3d_18 (depth), stgcn (skeleton); tiny3d on toy")
    g.add_argument("--teacher-arch", default=None, help="resnet3d_18 (NTU-120-minus-60 teacher, paper's best) or "
                   "resnext3d_101 (Kinetics, Crasto et al.); default resnet3d_18, tiny3d on toy")
    g.add_argument("--teacher-modality", choices=["rgb", "flow"], default=None, help="teacher input: RGB or "
                   "2-channel TV-L1 flow (Table 2.1: flow transfers best); default: the "
                   "teacher's backbone.pth meta, else flow")
    g.add_argument("--teacher-weights", default=None, help="anything common.load_backbone_weights reads (our "
                   "backbone.pth, Hara-layout files); toy: trained first by --stage teacher when not given")
    g.add_argument("--teacher-data", default=None, help="toy only: the teacher's labelled set for the automatic "
                   "teacher stage (default toy-paired-source, actions disjoint from toy-paired-target)")
    g.add_argument("--granularity", choices=GRANULARITIES, default=None, help="clip (Eq. 2.1), video-to-clip "
                   "(Eq. 2.2-2.3), combined (Eq. 2.4, the depth default: best in Table 2.3), video (Eq. 2.5, "
                   "skeletons: the only one for whole-sequence students)")
    g.add_argument("--loss", choices=["cosine", "mse"], default="cosine", help="cosine distance 1 - cos (paper) or "
                   "MSE on raw features (Table 2.2)")
    g.add_argument("--match-blocks", action="store_true", help="also match the pooled output of every ResNet stage "
                   "through its own projection (Sec. 2.5.1.4: no gain)")
    g.add_argument("--clip-len", type=int, default=None, help="L, frames per clip of teacher and depth student "
                   "(paper 16, toy 8)")
    g.add_argument("--crop-size", type=int, default=None, help="input H = W (paper 112, toy 48)")
    g.add_argument("--depth-channels", type=int, choices=[1, 3], default=3, help="depth replicated to 3 channels "
                   "(Sec. 2.4.3: 3 x 16 x 112 x 112) or 1")
    g.add_argument("--skeleton-frames", type=int, default=None, help="whole skeleton sequences zero-padded to this "
                   "length (ST-GCN: 300; toy 24)")
    g.add_argument("--visualize", type=int, default=0, metavar="N", help="pairs.png: every modality of N val "
                   "pairs over time; cosine_before/after.png: student vs teacher features of 16 val videos")
    g.add_argument("--teacher-cache", default="auto", help="auto: runs/teacher-cache/<key>.npy (memory-mapped fp16, "
                   "key = hash of teacher weights + input); a folder; none: run the teacher in every step "
                   "(no_grad, autocast) on the same deterministic input")
    return parser


TOY_DEFAULTS = dict(student_arch="tiny3d", teacher_arch="tiny3d", teacher_modality="flow", clip_len=8,
                    crop_size=48, skeleton_frames=24, teacher_data="toy-paired-source", batch_size=8, workers=1,
                    epochs=None, knn_every=0, wd=1e-3)
PAPER_DEFAULTS = dict(teacher_arch="resnet3d_18", teacher_modality="flow", clip_len=16, crop_size=112,
                      skeleton_frames=300, workers=8, knn_every=0)
# Sec. 2.4.3: depth SGD lr 0.1, momentum 0.9, wd 1e-3, batch 128, 400 epochs; skeleton wd 1e-5, batch 100, 120
# epochs; teacher (Hara et al.) lr 0.1, wd 1e-3, batch 128. Toy epochs: measured in the README.
STAGE_DEFAULTS = {"depth": dict(lr=0.1, wd=1e-3, batch_size=128, epochs=400, student_arch="resnet3d_18"),
                  "skeleton": dict(lr=0.1, wd=1e-5, batch_size=100, epochs=120, student_arch="stgcn"),
                  "teacher": dict(lr=0.1, wd=1e-3, batch_size=128, epochs=100)}
TOY_EPOCHS = {"depth": 100, "skeleton": 100, "teacher": 40}


def finalize_args(args):
    """Derived values in one place; user errors before anything is written."""
    if args.data == "toy":
        args.data = "toy-paired-source" if args.stage == "teacher" else "toy-paired-target"
    args.toy = args.data.startswith("toy")
    kind = "teacher" if args.stage == "teacher" else args.student
    if args.teacher_modality is None and args.teacher_weights and os.path.isfile(args.teacher_weights):
        try:
            saved = torch.load(args.teacher_weights, map_location="cpu", weights_only=False)  # backbone.pth: meta
        except Exception:  # other formats: load_backbone_weights reports its own errors later
            saved = None
        meta = saved.get("meta") or {} if isinstance(saved, dict) else {}
        args.teacher_modality = meta.get("modality") if meta.get("modality") in ("rgb", "flow") else None
    common.fill_defaults(args, TOY_DEFAULTS if args.toy else PAPER_DEFAULTS)
    common.fill_defaults(args, dict(STAGE_DEFAULTS[kind], **({"epochs": TOY_EPOCHS[kind]} if args.toy else {})))
    if args.student == "skeleton" and args.student_arch == "tiny3d":
        args.student_arch = "stgcn"
    args.granularity = args.granularity or ("video" if args.student == "skeleton" else "combined")
    args.dataset_name = args.data
    args.data_root = args.data_root or os.path.join("data", "toy-paired" if args.toy else args.data)
    checks = [
        ((args.student == "skeleton") == (args.granularity == "video"), "--granularity video for --student "
         "skeleton (whole sequences, Eq. 2.5) and clip/video-to-clip/combined for depth", args.granularity),
        (args.stage == "teacher" or args.student_arch in (common.SKELETON_ARCHS if args.student == "skeleton" else
                                                          common.VIDEO_ARCHS),
         f"a {args.student} --student-arch", args.student_arch),
        (args.teacher_arch in common.VIDEO_ARCHS, f"--teacher-arch in {common.VIDEO_ARCHS}", args.teacher_arch),
        (not (args.match_blocks and args.student == "skeleton"), "--match-blocks with a depth student (ResNet "
         "stages, Sec. 2.5.1.4)", args.student),
        (args.stage == "teacher" or args.teacher_weights or args.toy, "--teacher-weights (a trained teacher; "
         "train one with --stage teacher)", args.teacher_weights),
        (args.teacher_weights is None or os.path.isfile(args.teacher_weights), "an existing --teacher-weights "
         "file", args.teacher_weights),
    ]
    for ok, expected, found in checks:
        if not ok:
            raise common.UserError(f"crossmodal_distill.py: expected {expected}, found {found}")
    return args


# ==================================================================================================== TEACHER (2.3.1)
def block_features(backbone, x, blocks=False):
    """Pooled output before the fc (Sec. 2.3.1) -> [(B, D)]; blocks=True: the pooled output of every stage
    (ResNet layer1..4, tiny3d's 4 convolutions), the last being the feature (Sec. 2.5.1.4)."""
    if not blocks:
        return [backbone(x)]  # (B, D)
    if isinstance(backbone, common.ResNet3D):
        x = backbone.maxpool(backbone.relu(backbone.bn1(backbone.conv1(x))))
        stages = [backbone.layer1, backbone.layer2, backbone.layer3, backbone.layer4]
    elif isinstance(backbone, common.Tiny3D):
        stages = list(backbone.features)
    else:
        raise common.UserError(f"crossmodal_distill.py: --match-blocks expected a resnet3d_18/resnext3d_101/tiny3d "
                               f"network, found {type(backbone).__name__}")
    out = []
    for stage in stages:
        x = stage(x)  # (B, C_s, T_s, H_s, W_s)
        out.append(common._pool_video_map(x))  # (B, C_s)
    return out


def stage_dims(backbone, args, blocks):
    """Feature sizes of block_features(backbone, ., blocks), from one tiny forward pass."""
    channels = 2 if getattr(backbone, "modality", "rgb") == "flow" else getattr(backbone, "in_channels", 3)
    x = torch.zeros(2, channels, args.clip_len, args.crop_size, args.crop_size,
                    device=next(backbone.parameters()).device)
    was_training = backbone.training
    backbone.eval()
    with torch.no_grad():
        dims = [f.shape[1] for f in block_features(backbone, x, blocks)]
    backbone.train(was_training)
    return dims


def build_teacher(args, weights=None):
    """The frozen teacher (Sec. 2.3.1): eval mode, no gradients, BatchNorm statistics as trained."""
    channels = 2 if args.teacher_modality == "flow" else 3
    teacher = common.build_backbone(args.teacher_arch, in_channels=channels)
    teacher.modality, teacher.in_channels = args.teacher_modality, channels
    if weights:
        common.load_backbone_weights(teacher, weights)
    teacher.eval().requires_grad_(False)
    return teacher


def teacher_input(clips, args):
    """Deterministic teacher input: uint8 RGB (..., 3, T, H, W) or flow in pixels (..., 2, T, H, W) -> short side
    resized to --crop-size, centre crop, normalised (Kinetics mean/std; flow / FLOW_BOUND in [-1, 1])."""
    size = min(clips.shape[-2:])
    x = common.resized_center_crop(clips.float(), args.crop_size, args.crop_size)
    if args.teacher_modality == "flow":
        return common.flow_to_input(x * args.crop_size / size)  # displacements scale with the image
    return common.normalize(x / 255)


# ==================================================================================================== STUDENT
class Student(nn.Module):
    """Student backbone + linear projections to the teacher's feature size (Sec. 2.3.1: "matched, if different";
    dropped in backbone.pth). One projection per matched stage with --match-blocks."""

    def __init__(self, backbone, teacher_dims, blocks=False, args=None):
        super().__init__()
        self.backbone, self.blocks = backbone, blocks
        dims = stage_dims(backbone, args, blocks) if blocks else [backbone.feature_dim]
        if len(dims) != len(teacher_dims):
            raise common.UserError(f"crossmodal_distill.py: --match-blocks expected as many student stages as "
                                   f"teacher stages, found {len(dims)} and {len(teacher_dims)}")
        self.proj = nn.ModuleList([nn.Identity() if d == t else nn.Linear(d, t) for d, t in zip(dims, teacher_dims)])

    def forward(self, x):
        return [p(f) for p, f in zip(self.proj, block_features(self.backbone, x, self.blocks))]  # [(B, D_t)]


def build_student(args):
    if args.student == "skeleton":
        options = {"hidden": 16} if args.toy else {}  # evaluate.py's toy ST-GCN size
        backbone = common.build_backbone(args.student_arch, **options)
    else:
        options = {"in_channels": args.depth_channels}
        backbone = common.build_backbone(args.student_arch, **options)
        backbone.in_channels = args.depth_channels
    backbone.options = options
    return backbone


# ==================================================================================================== CLIPS (Eq. 2.3)
def clip_bounds(num_frames, clip_len):
    """N = max(1, frames // L) consecutive clips (Eq. 2.3: total frames / input size) -> (N, L) frame indices;
    clip i covers frames [i L, (i + 1) L), the tail left out (a video shorter than L: indices past its end are
    clamped by the readers)."""
    n = max(1, num_frames // clip_len)
    return np.arange(n * clip_len, dtype=np.int64).reshape(n, clip_len)  # (N, L)


def video_feature(clip_features, num_clips):
    """Eq. (2.3): F_video = 1/N sum_i F_i^clip over each video's N valid clips.
    clip_features (B, N_max, D) zero-padded past num_clips (B,) -> (B, D)."""
    valid = torch.arange(clip_features.shape[1], device=clip_features.device)[None] < num_clips[:, None]  # (B, N)
    return (clip_features * valid[..., None]).sum(1) / num_clips[:, None].to(clip_features.dtype)  # (B, D)


# ==================================================================================================== LOSSES (2.3.2)
def cosine_distance(f_student, f_teacher):
    """1 - cos(F_Target, F_RGB), averaged over the batch (Eq. 2.1, 2.2, 2.5). (B, D), (B, D) -> scalar."""
    return (1 - F.cosine_similarity(f_student, f_teacher, dim=1)).mean()


def mse_loss(f_student, f_teacher):
    """Table 2.2's MSE: mean over batch and feature elements of the squared difference of raw features."""
    return F.mse_loss(f_student, f_teacher)


def distill_loss(f_student, f_clip, f_video, granularity, loss="cosine"):
    """Eq. (2.1) clip: L(F_T^clip, F_RGB^clip); Eq. (2.2) video-to-clip / (2.5) video: L(F_T, F_RGB^video);
    Eq. (2.4) combined: the sum of both. All (B, D) -> scalar."""
    distance = cosine_distance if loss == "cosine" else mse_loss
    if granularity == "clip":
        return distance(f_student, f_clip)
    if granularity in ("video-to-clip", "video"):
        return distance(f_student, f_video)
    return distance(f_student, f_clip) + distance(f_student, f_video)  # Eq. (2.4)


@torch.no_grad()
def alignment_metrics(f_student, f_teacher):
    """cos_pos: mean cosine to the own target; cos_neg: to the other targets of the batch; ret_acc: share of
    students whose most similar target in the batch is their own (chance 1/B). (B, D), (B, D) -> floats."""
    s = F.normalize(f_student.float(), dim=1) @ F.normalize(f_teacher.float(), dim=1).T  # (B, B)
    b = s.shape[0]
    off = ~torch.eye(b, dtype=torch.bool, device=s.device)
    return {"cos_pos": s.diagonal().mean().item(), "cos_neg": s[off].mean().item() if b > 1 else 0.0,
            "ret_acc": (s.argmax(1) == torch.arange(b, device=s.device)).float().mean().item()}


# ==================================================================================================== TEACHER CACHE
def teacher_key(teacher, dataset, args, blocks):
    """Hash of the teacher's weights and of everything that defines its input."""
    h = hashlib.sha1()
    for name, value in sorted(teacher.state_dict().items()):
        h.update(name.encode())
        h.update(value.detach().cpu().float().numpy().tobytes())
    names = [dataset.sample_path(i) for i in range(len(dataset))] + list(getattr(dataset, "names", []))  # PKU: clips
    h.update(json.dumps([os.path.abspath(dataset.root), dataset.split, names, args.teacher_arch,
                         args.teacher_modality, args.clip_len, args.crop_size, blocks]).encode())
    return h.hexdigest()[:20]


@torch.no_grad()
def teacher_clip_features(teacher, dataset, i, args, blocks, device):
    """Features of the N clips of video i (Eq. 2.3) -> (N, D_total): the stage features concatenated."""
    bounds = clip_bounds(dataset.length(i), args.clip_len)  # (N, L)
    modality = "video" if args.teacher_modality == "rgb" else "flow"
    frames = dataset.read(i, bounds, (modality,))[modality]  # (C, N*L, H, W)
    clips = frames.unflatten(1, bounds.shape).transpose(0, 1)  # (N, C, L, H, W)
    return torch.cat(block_features(teacher, teacher_input(clips, args).to(device), blocks), dim=1).float()


def build_teacher_cache(teacher, dataset, args, run, blocks):
    """The memory-mapped fp16 cache (num_videos, N_max, D_total) of every clip's teacher feature, written once by
    the main process (atomically; other processes wait) -> path. A changed teacher or input gives a new key."""
    folder = os.path.join("runs", "teacher-cache") if args.teacher_cache == "auto" else args.teacher_cache
    path = os.path.join(folder, f"teacher-{teacher_key(teacher, dataset, args, blocks)}.npy")
    if run.is_main and not os.path.exists(path):
        os.makedirs(folder, exist_ok=True)
        n_max = max(len(clip_bounds(dataset.length(i), args.clip_len)) for i in range(len(dataset)))
        dim = sum(stage_dims(teacher, args, blocks))
        tmp = f"{path}.tmp-{os.getpid()}"
        cache = np.lib.format.open_memmap(tmp, "w+", np.float16, (len(dataset), n_max, dim))
        for i in range(len(dataset)):
            with run.autocast():
                f = teacher_clip_features(teacher, dataset, i, args, blocks, run.device)  # (N, D)
            cache[i, :len(f)] = f.cpu().numpy()
        cache.flush()
        del cache
        os.replace(tmp, path)
        run.print(f"teacher cache: {len(dataset)} videos x {n_max} clips x {dim} written to {path}")
    if run.world_size > 1:
        torch.distributed.barrier()
    return path


# ==================================================================================================== DATA
class DistillPairs(torch.utils.data.Dataset):
    """Unlabelled pairs for the transfer (Sec. 2.3.2). Item: "student" (depth clip i of N, augmented, or the whole
    skeleton sequence), "clip" i, "num_clips" N, and either the cached teacher targets "t_clip" F_i^clip and
    "t_video" F^video (Eq. 2.3), or "teacher_input" (N_max, C, L, H, W) for --teacher-cache none (clip
    granularity: clip i alone, "clip" then indexes teacher_input)."""

    def __init__(self, paired, args, cache_path=None, n_max=None):
        self.paired, self.args, self.cache_path, self._cache = paired, args, cache_path, None
        self.n_max = n_max

    def __len__(self):
        return len(self.paired)

    def __getstate__(self):
        return {**self.__dict__, "_cache": None}

    @property
    def cache(self):
        if self._cache is None:
            self._cache = np.load(self.cache_path, mmap_mode="r")  # opened in each worker
        return self._cache

    def __getitem__(self, i):
        args, length = self.args, self.paired.length(i)
        bounds = clip_bounds(length, args.clip_len)  # (N, L)
        k = int(torch.randint(len(bounds), ()))
        item = {"clip": torch.tensor(k), "num_clips": torch.tensor(len(bounds)), "index": torch.tensor(i)}
        if args.student == "skeleton":  # whole sequence, zero-padded, no augmentation (Sec. 2.4.3)
            x = self.paired.read(i, np.arange(length), ("skeleton",))["skeleton"][:, :args.skeleton_frames]
            item["student"] = F.pad(x, (0, 0, 0, 0, 0, args.skeleton_frames - x.shape[1]))  # (3, T, V, M)
        else:
            depth = self.paired.read(i, bounds[k], ("depth",))["depth"]  # (1, L, H, W) metres, frames of clip k
            depth = common.horizontal_flip(common.multiscale_corner_crop(depth, args.crop_size), p=0.5)
            item["student"] = common.depth_to_input(depth, args.depth_channels)  # (C, L, S, S)
        if self.cache_path is not None:
            f = torch.from_numpy(np.array(self.cache[i, :len(bounds)], dtype=np.float32))  # (N, D)
            item["t_clip"], item["t_video"] = f[k], f.mean(0)  # F_k^clip, Eq. (2.3)
        else:
            modality = "video" if args.teacher_modality == "rgb" else "flow"
            if args.granularity == "clip":  # Eq. (2.1) needs clip k only: read and send just that one
                bounds, item["clip"] = bounds[k:k + 1], torch.tensor(0)
            frames = self.paired.read(i, bounds, (modality,))[modality]  # (C, N*L, H, W)
            clips = teacher_input(frames.unflatten(1, bounds.shape).transpose(0, 1), args)  # (N, C, L, S, S)
            n_max = 1 if args.granularity == "clip" else self.n_max
            item["teacher_input"] = torch.cat([clips, clips[:1].expand(n_max - len(bounds), *clips.shape[1:])])
        return item


def depth_eval_transform(item, args):
    """kNN / evaluation input of the depth student: short side to --crop-size, centre crop, no flip."""
    depth = common.resized_center_crop(item["depth"], args.crop_size, args.crop_size)
    item["depth"] = common.depth_to_input(depth, args.depth_channels)
    return item


# ==================================================================================================== TRAIN STEPS
def make_distill_step(student, teacher, optimizer, run, args):
    def train_step(batch):
        if "t_clip" in batch:
            t_clip, t_video = batch["t_clip"], batch["t_video"]  # (B, D_total) each, from the cache
        else:  # on the fly: every clip of every video through the frozen teacher
            x = batch["teacher_input"]  # (B, N_max, C, L, S, S)
            with torch.no_grad(), run.autocast():
                f = torch.cat(block_features(teacher, x.flatten(0, 1), args.match_blocks), 1)  # (B*N_max, D)
            f = f.float().unflatten(0, x.shape[:2])  # (B, N_max, D)
            t_clip = f[torch.arange(len(f), device=f.device), batch["clip"]]  # (B, D) = F_i^clip
            t_video = video_feature(f, batch["num_clips"])  # (B, D), Eq. (2.3)
        with run.autocast():
            outputs = student(batch["student"])  # [(B, D_s)] per matched stage, projected to the teacher's sizes
        loss, start = 0.0, 0
        for out in outputs:  # Sec. 2.5.1.4: one loss per matched stage, summed
            d = out.shape[1]
            loss = loss + distill_loss(out.float(), t_clip[:, start:start + d], t_video[:, start:start + d],
                                       args.granularity, args.loss)
            start += d
        run.step(loss, optimizer)
        target = t_clip if args.granularity == "clip" else t_video
        return {"loss": loss.detach(), **alignment_metrics(outputs[-1].detach(), target[:, -outputs[-1].shape[1]:])}
    return train_step


def make_teacher_step(classifier, optimizer, run):
    def train_step(batch):
        with run.autocast():
            logits = classifier(batch["input"])  # (B, C)
        loss = F.cross_entropy(logits.float(), batch["label"])
        run.step(loss, optimizer)
        return {"loss": loss.detach(), "acc": (logits.argmax(1) == batch["label"]).float().mean()}
    return train_step


# ==================================================================================================== MAIN
def teacher_stage(args, run):
    """Train the teacher with labels (Sec. 2.4.3): random clip, multi-scale corner crop, flip, SGD, cross-entropy.
    Writes <out-dir>/backbone.pth (meta modality rgb/flow) for --teacher-weights."""
    modality = "video" if args.teacher_modality == "rgb" else "flow"

    def transform(item):
        x = common.horizontal_flip(common.multiscale_corner_crop(item[modality].float(), args.crop_size), p=0.5,
                                   flow=modality == "flow")
        return {"input": common.normalize(x / 255) if modality == "video" else common.flow_to_input(x)}

    train = common.build_dataset(args.dataset_name, args.data_root, "train", clip_len=args.clip_len,
                                 transform=transform, modalities=(modality,), decoder=args.decoder,
                                 strict=args.strict_data, fraction=args.data_fraction, seed=args.seed)
    teacher = build_teacher(args)
    teacher.train().requires_grad_(True)
    classifier = nn.Sequential(teacher, nn.Linear(teacher.feature_dim, train.num_classes))
    optimizer = torch.optim.SGD(classifier.parameters(), lr=args.lr, momentum=0.9, weight_decay=args.wd)
    loader = common.build_loader(train, args, run, train=True)
    meta = {"arch": args.teacher_arch, "modality": args.teacher_modality, "method": "crossmodal_distill-teacher",
            "in_channels": teacher.in_channels}
    return common.fit(run, args, classifier, optimizer, loader, make_teacher_step(run.prepare(classifier),
                      optimizer, run), backbone=teacher, backbone_meta=meta)


def knn_report(args, run, student_backbone, random_backbone, teacher):
    """Toy data: kNN (k=200) of the student, its random init (same arch and seed) and the teacher on the target
    classes' val set (gallery = train), the student on depth, the teacher on the paired RGB/flow."""
    def sets(modality, transform, clip_len=args.clip_len):
        return [common.build_loader(common.build_dataset(args.dataset_name, args.data_root, split,
                                                         clip_len=clip_len, sampling="uniform",
                                                         modalities=(modality,), transform=transform),
                                    args, run, train=False) for split in ("train", "val")]
    if args.student == "skeleton":
        inputs, key = sets("skeleton", None, args.skeleton_frames), "skeleton"
    else:
        inputs, key = sets("depth", lambda item: depth_eval_transform(item, args)), "depth"
    modality = "video" if args.teacher_modality == "rgb" else "flow"
    teacher_sets = sets(modality, lambda item: {modality: teacher_input(item[modality], args)})
    result = {name: common.knn_monitor(net.to(run.device), lambda b, k=k: b[k], *loaders, run=run)
              for name, net, k, loaders in (("student", student_backbone, key, inputs),
                                            ("random_init", random_backbone, key, inputs),
                                            ("teacher", teacher, modality, teacher_sets))}
    run.print(f"kNN top-1 on {args.dataset_name} val (classes the teacher never saw; k=200, gallery = train): "
              f"distilled {args.student} student {result['student']['knn_top1']:.1f} %, random init "
              f"{result['random_init']['knn_top1']:.1f} %, teacher on {args.teacher_modality} "
              f"{result['teacher']['knn_top1']:.1f} %; 1-NN: "
              + ", ".join(f"{name} {r['nn1_top1']:.1f} %" for name, r in result.items()))
    if run.is_main:
        common.write_json_atomic(os.path.join(run.out_dir, "knn.json"), result)
    return result


def _frames_image(item, size=64):
    """Each available modality of one clip as (T, 3, size, size) in [0, 1]: RGB; depth colour-mapped (jet, black =
    no depth); flow as (u, v) -> (red, green); the first body's skeleton projected (pinhole, camera coordinates)."""
    rows = []
    if "video" in item:
        rows.append(item["video"].float().transpose(0, 1) / 255)
    if "depth" in item:
        x = (item["depth"] / common.DEPTH_MAX).clamp(0, 1).transpose(0, 1)  # (T, 1, H, W)
        jet = torch.cat([(1.5 - (4 * x - c).abs()).clamp(0, 1) for c in (3, 2, 1)], 1)
        rows.append(jet * (x > 0))
    if "flow" in item:
        f = item["flow"].transpose(0, 1)  # (T, 2, H, W) pixels
        f = 0.5 + f / (2 * f.abs().max().clamp(min=1e-6))
        rows.append(torch.cat([f, torch.full_like(f[:, :1], 0.5)], 1))
    if "skeleton" in item:
        x = item["skeleton"][..., 0]  # (3, T, V) metres, body 0
        z = x[2].clamp(min=0.1)
        uv = torch.stack([0.5 + 1.25 * x[0] / z, 0.5 - 1.25 * x[1] / z], -1)  # (T, V, 2) in [0, 1], toy camera
        img = torch.zeros(x.shape[1], 3, size, size)
        pix = (uv * (size - 1)).round().long().clamp(0, size - 1)
        for t in range(x.shape[1]):
            img[t, :, pix[t, :, 1], pix[t, :, 0]] = 1.0
        rows.append(img)
    return [F.interpolate(r.float(), size=(size, size), mode="bilinear", align_corners=False) for r in rows]


@torch.no_grad()
def visualize(args, run, student, teacher, tag):
    """--visualize N: N val pairs, every modality over time (pairs.png, before training), and the cosine matrix of
    the student's clip-0 features against the teacher's video features (Eq. 2.3) of the first 16 val videos
    (cosine_<tag>.png: a bright diagonal = each student feature is closest to its own video's teacher feature)."""
    from PIL import Image
    from torchvision.utils import make_grid

    val = common.build_dataset(args.dataset_name, args.data_root, "val", decoder=args.decoder)
    n = min(len(val), 16)
    to_image = lambda x: Image.fromarray((x.clamp(0, 1) * 255).byte().permute(1, 2, 0).cpu().numpy())  # noqa: E731
    if tag == "before":
        rows = []
        for i in range(min(args.visualize, len(val))):
            rows += _frames_image(val.read(i, clip_bounds(val.length(i), args.clip_len)[0]))
        to_image(make_grid(torch.cat(rows), nrow=args.clip_len, padding=2, pad_value=1.0)).save(
            os.path.join(run.out_dir, "pairs.png"))
    was_training = student.training
    student.eval()
    f_s, f_t = [], []
    for i in range(n):
        bounds = clip_bounds(val.length(i), args.clip_len)
        if args.student == "skeleton":
            x = val.read(i, np.arange(val.length(i)), ("skeleton",))["skeleton"][:, :args.skeleton_frames]
            x = F.pad(x, (0, 0, 0, 0, 0, args.skeleton_frames - x.shape[1]))
        else:
            x = depth_eval_transform(val.read(i, bounds[0], ("depth",)), args)["depth"]
        f_s.append(student(x[None].to(run.device))[-1][0])  # (D,)
        f_t.append(teacher_clip_features(teacher, val, i, args, False, run.device).mean(0))  # (D,) Eq. (2.3)
    student.train(was_training)
    cosine = F.normalize(torch.stack(f_s), dim=1) @ F.normalize(torch.stack(f_t), dim=1).T  # (n, n)
    scaled = (cosine - cosine.min()) / (cosine.max() - cosine.min()).clamp(min=1e-6)
    big = F.interpolate(scaled[None, None], scale_factor=16, mode="nearest")[0].expand(3, -1, -1)
    path = os.path.join(run.out_dir, f"cosine_{tag}.png")
    to_image(big).save(path)
    run.print(f"visualize: wrote {path} (min-max scaled; cos on the diagonal {cosine.diagonal().mean():.4f}, off "
              f"{(cosine.sum() - cosine.diagonal().sum()) / max(n * n - n, 1):.4f})")


def main_worker(args):
    run = common.setup(args, "crossmodal_distill" if args.stage == "distill" else "crossmodal_distill-teacher")
    if args.stage == "teacher":
        return teacher_stage(args, run)
    teacher = build_teacher(args, args.teacher_weights).to(run.device)
    teacher_dims = stage_dims(teacher, args, args.match_blocks)
    backbone = build_student(args)
    random_backbone = copy.deepcopy(backbone)  # the same architecture at the same seed, before any training
    student = Student(backbone, teacher_dims, args.match_blocks, args)
    modality = "video" if args.teacher_modality == "rgb" else "flow"
    paired = common.build_dataset(args.dataset_name, args.data_root, "train", modalities=(args.student, modality),
                                  decoder=args.decoder, strict=args.strict_data, fraction=args.data_fraction,
                                  seed=args.seed)
    cache = None if args.teacher_cache == "none" else build_teacher_cache(teacher, paired, args, run,
                                                                          args.match_blocks)
    n_max = max(len(clip_bounds(paired.length(i), args.clip_len)) for i in range(len(paired)))
    loader = common.build_loader(DistillPairs(paired, args, cache, n_max), args, run, train=True)
    optimizer = torch.optim.SGD(student.parameters(), lr=args.lr, momentum=0.9, weight_decay=args.wd)
    train_step = make_distill_step(run.prepare(student), teacher, optimizer, run, args)
    meta = {"arch": args.student_arch, "modality": args.student, "method": "crossmodal_distill",
            "options": backbone.options, "in_channels": getattr(backbone, "in_channels", 3),
            "teacher": {"arch": args.teacher_arch, "modality": args.teacher_modality, "weights": args.teacher_weights}}
    if args.visualize and run.is_main:
        visualize(args, run, student, teacher, "before")
    result = common.fit(run, args, student, optimizer, loader, train_step, backbone=backbone, backbone_meta=meta)
    if args.visualize and run.is_main:
        visualize(args, run, student, teacher, "after")
    if args.toy:
        result["knn"] = knn_report(args, run, backbone, random_backbone, teacher)
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, parents=[common.get_common_parser()],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_method_args(parser)
    parser.set_defaults(lr=None, wd=None, epochs=None, batch_size=None, workers=None, knn_every=None)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.stage == "distill" and args.teacher_weights is None and args.data.startswith("toy"):  # teacher first
        teacher_args = copy.copy(args)  # its own defaults (Sec. 2.4.3), not the student's
        teacher_args.stage, teacher_args.data = "teacher", args.teacher_data or TOY_DEFAULTS["teacher_data"]
        teacher_args.lr = teacher_args.wd = teacher_args.epochs = teacher_args.batch_size = None
        data = "toy-paired-target" if args.data == "toy" else args.data
        teacher_args.out_dir = os.path.join(args.out_dir or os.path.join("runs", f"crossmodal_distill-{data}"),
                                            "teacher")
        common.launch(main_worker, teacher_args, finalize=finalize_args)
        args.teacher_weights = os.path.join(teacher_args.out_dir, "backbone.pth")
    return common.launch(main_worker, args, finalize=finalize_args)  # UserErrors: one line, before any output


if __name__ == "__main__":
    main()
