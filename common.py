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


# ==================================================================================================== CHECKPOINTS


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


def save_backbone(path, backbone, meta):
    """backbone.pth: the backbone's state dict (torchvision-compatible keys) and what evaluate.py needs to
    rebuild it (arch, input modality, method, args)."""
    save_atomic({"state_dict": unwrap(backbone).state_dict(), "meta": meta}, path)


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
            save_backbone(os.path.join(run.out_dir, "backbone.pth"), backbone,
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
