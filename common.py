"""Shared plumbing for the video-efficient representation-learning scripts.

Every method script (`tubelet_contrast.py`, `skeleton_contrast.py`, ...) imports this one file for the things
that are *not* the method: distributed helpers, flags, video decoding and datasets, backbones and checkpoint
interchange, and the generic CUDA-aware training loop. Method logic (losses, queues, augmentations specific to
a method) never lives here. Copying a script to start a new idea means copying `common.py` with it.

Sections, in the order a script meets them (search for the banners):
    FLAGS            the parent argparse parser every script extends, `fill_defaults`, `UserError`
    RUN              `launch` (torchrun / spawned workers / in-process), `setup` -> Run, distributed helpers
    LOOP             `build_loader`, the LR schedule, `fit` (atomic checkpoints, auto-resume, signals), kNN monitor
    BACKBONES        `build_backbone`, then the video and skeleton networks
    CHECKPOINT I/O   `load_backbone_weights` / `save_backbone`: our and the authors' formats
    DATA             `build_dataset`, the dataset classes, clip sampling, transforms, decoding
    DATASET FORMATS  one parser per official layout
    TOY DATA         real files in real formats, written once under --data-root
    DATA PREPARATION `python common.py check-data | prepare-videos | extract-flow | convert-alphapose`,
                     raw skeleton conversion
"""

import argparse
import concurrent.futures
import ctypes
import functools
import hashlib
import inspect
import itertools
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
import warnings
from fractions import Fraction
import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
import torchvision


# ==================================================================================================== FLAGS
# The parent argparse parser every script extends, the toy-vs-paper defaults mechanism and the one
# exception type for user mistakes. A script: parser(parents=[get_common_parser()]) -> fill_defaults -> launch.


class UserError(Exception):
    """A mistake in the command line, the data or a checkpoint: reported as one line (no traceback unless --debug),
    once, before anything is written. Raise it with what was expected and what was found, naming the file."""


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
    g.add_argument("--workers", type=int, default=None, help="data-loading worker processes PER process; default: "
                   "the visible CPU cores / processes - 1, at most 10 (video decoding is usually the bottleneck)")

    g = parser.add_argument_group("hardware")
    g.add_argument("--gpus", type=int, default=None, help="number of local GPUs (processes); 0 = CPU; "
                   "default: all visible GPUs, else CPU. With --device cpu, N>1 runs N gloo processes")
    g.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    g.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "off"],
                   help="mixed precision; auto = bf16 on CUDA that supports it, fp16 + GradScaler on older CUDA, "
                   "off on CPU")
    g.add_argument("--channels-last", action="store_true", help="channels_last_3d memory format (faster convs)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model (slow first steps)")
    g.add_argument("--sync-bn", action=argparse.BooleanOptionalAction, default=None,
                   help="SyncBatchNorm across processes (default: the script's; tubelet-contrast pretrains with it)")
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
    g.add_argument("--schedule-epochs", type=float, default=None, help="length of the cosine schedule in epochs "
                   "(default --epochs); longer than --epochs stops training part-way down the cosine")
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
    g.add_argument("--trust-checkpoint", action="store_true",
                   help="also unpickle Python objects other than tensors, numbers and argparse.Namespace in --resume "
                   "and --weights files (torch.load(weights_only=False): a crafted file can execute code)")
    g.add_argument("--log-every", type=int, default=20, help="optimizer steps between metrics.jsonl lines")
    g.add_argument("--ckpt-every", type=int, default=500,
                   help="optimizer steps between checkpoints (also at every epoch end and at the end)")
    g.add_argument("--keep-every", type=int, default=0,
                   help="keep a copy checkpoint_<epoch>.pth every N epochs (0 = never)")
    g.add_argument("--knn-every", type=int, default=1,
                   help="epochs between online kNN monitors (when the script has labelled data; 0 = off)")
    g.add_argument("--debug", action="store_true", help="show the traceback of a user error (wrong flag, missing "
                   "data) instead of the one-line message")
    return parser


def fill_defaults(args, defaults):
    """Set every flag that is still None (not given on the command line) from `defaults`.

    The one mechanism for toy vs paper defaults in every script: declare data-dependent flags with default=None,
    parse, then `fill_defaults(args, TOY_DEFAULTS if toy else PAPER_DEFAULTS)`. Argparse abbreviations and
    `--flag=value` forms count as given, unlike a scan of argv."""
    for name, value in defaults.items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    return args


def validate_args(args, world_size):
    """UserError for a flag that cannot work, before anything is written. `world_size`: processes of the run."""
    batch_size, lr = getattr(args, "batch_size", None), getattr(args, "lr", None)
    if batch_size is not None and (batch_size < 1 or batch_size % world_size):
        raise UserError(f"--batch-size: expected a positive multiple of the {world_size} processes (it is global), "
                        f"found {batch_size}")
    if lr is not None and not lr > 0:
        raise UserError(f"--lr: expected a learning rate > 0, found {lr}")
    for flag in ("epochs", "max_steps", "log_every", "ckpt_every"):
        value = getattr(args, flag, None)
        if value is not None and value < 1:
            raise UserError(f"--{flag.replace('_', '-')}: expected at least 1, found {value}")
    if getattr(args, "workers", None) is not None and args.workers < 0:
        raise UserError(f"--workers: expected a number >= 0, found {args.workers}")
    resume = getattr(args, "resume", None)
    if resume not in (None, "auto", "none") and not os.path.isfile(resume):
        raise UserError(f"--resume: expected a checkpoint file, auto or none; found no file {resume}")
    if getattr(args, "out_dir", None):
        check_writable_folder(args.out_dir, "--out-dir")


def check_writable_folder(path, flag):
    """UserError unless `path` is a writable folder or can be created as one (nothing is created here)."""
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UserError(f"{flag} {path}: expected a folder, found a file at {existing}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: expected a writable folder, found {existing} not writable")


# ==================================================================================================== RUN
# Starting 1..N processes (launch: torchrun, spawned workers or in-process), the Run object that setup()
# returns (device, AMP, run folder, logging) and the distributed helpers, which are the identity at world size 1.


def launch(main_worker, args, finalize=None):
    """Run `main_worker(args)` under torchrun (any number of nodes; `setup` reads its environment), as --gpus N > 1
    spawned local workers on a free port, or in this process without a process group.
    finalize(args): the script's derived values and checks, run first. A UserError ends the run with one line
    `error: ...` on stderr from rank 0 (--debug: the traceback) and exit status 2; an interrupted run exits 3."""
    _PENDING_ARGS.clear()
    try:
        if finalize is not None:
            finalize(args)
        if _launched_by_torchrun():
            return _run_worker(main_worker, args)
        device, nprocs = resolve_device_and_processes(args)
        validate_args(args, nprocs)
        if nprocs == 1:
            return _run_worker(main_worker, args)
    except UserError as e:
        _exit_user_error(e, args, int(os.environ.get("RANK", 0)))
    port = _find_free_port()
    print(f"launch: spawning {nprocs} {device.upper()} worker processes on 127.0.0.1:{port}", flush=True)
    message_file = os.path.join(tempfile.mkdtemp(prefix="launch-"), "user_error.txt")  # the first worker's line
    context = mp.start_processes(_spawned_worker, args=(main_worker, args, nprocs, port, message_file),
                                 nprocs=nprocs, join=False, start_method="spawn")
    forward = lambda signum, frame: [os.kill(p.pid, signum) for p in context.processes if p.is_alive()]  # noqa
    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGUSR1)}  # `timeout`, scancel
    try:
        while not context.join(grace_period=30):  # the others usually stop by themselves (same error, same flag)
            pass
    except mp.ProcessExitedException as e:
        if e.exit_code == EXIT_USER_ERROR and os.path.exists(message_file):
            with open(message_file) as f:
                print(f"error: {f.read()}", file=sys.stderr, flush=True)
        if e.exit_code in (EXIT_USER_ERROR, EXIT_INTERRUPTED):  # the workers said why; no launcher traceback
            raise SystemExit(e.exit_code) from None
        raise
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        shutil.rmtree(os.path.dirname(message_file), ignore_errors=True)


def resolve_device_and_processes(args):
    """Returns ("cuda" | "cpu", number of local processes) from --device and --gpus; a UserError when they ask for
    more than the machine has."""
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    device = args.device
    if args.gpus is not None and args.gpus < 0:
        raise UserError(f"--gpus: expected a number >= 0, found {args.gpus}")
    if device == "auto":
        device = "cuda" if visible > 0 and args.gpus != 0 else "cpu"
        if device == "cpu" and args.gpus:
            raise UserError(f"--gpus {args.gpus}: expected at most the visible GPUs, found 0 visible; "
                            f"for {args.gpus} CPU processes (gloo) pass --device cpu --gpus {args.gpus}")
    if device == "cuda" and visible == 0:
        raise UserError("--device cuda: expected a visible CUDA GPU, found none (torch.cuda.device_count() == 0); "
                        "use --device cpu or --gpus 0")
    if device == "cuda":
        gpus = visible if args.gpus is None else args.gpus
        if gpus > visible:
            raise UserError(f"--gpus {gpus}: expected at most the visible GPUs, found {visible} visible "
                            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})")
        return device, max(gpus, 1)
    # On CPU, --gpus N > 1 means N gloo processes: the distributed path, testable without GPUs.
    return device, max(args.gpus or 1, 1)


def _launched_by_torchrun():
    """True when torchrun (or a scheduler that sets the same variables) started this process."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"))


def _find_free_port():
    """A TCP port on 127.0.0.1 that is free now (the spawned workers' MASTER_PORT)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawned_worker(local_rank, main_worker, args, world_size, port, message_file):
    """One `launch`ed local process: torchrun's environment variables, then main_worker(args)."""
    os.environ.update(RANK=str(local_rank), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(world_size),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        _run_worker(main_worker, args)
    except UserError as e:
        _exit_user_error(e, args, local_rank, message_file)


def setup(args, script_name):
    """Per-process setup: flags validated, process group (torchrun or spawned env), device, seeds, run folder.

    Writes nothing into the run folder (a mistyped flag must not touch a finished run): args.json is written by
    `run.write_args()`, which `fit` calls once the data is built. A new run folder is created empty (data workers
    append to bad_files.txt) and removed again if a UserError ends the run before anything was written."""
    device_type, nprocs = resolve_device_and_processes(args)
    world = int(os.environ["WORLD_SIZE"]) if _launched_by_torchrun() else nprocs
    if args.out_dir is None:
        args.out_dir = os.path.join("runs", f"{script_name}-{args.data}")
    validate_args(args, world)
    if args.workers is None:  # the visible cores shared by the processes of this machine, one left for the main
        local = int(os.environ.get("LOCAL_WORLD_SIZE", nprocs))
        args.workers = min(max(len(os.sched_getaffinity(0)) // max(local, 1) - 1, 0), 10)
    if _launched_by_torchrun() and not is_distributed():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo", init_method="env://")
    device = torch.device("cpu")
    if device_type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    seed_everything(args.seed + get_rank(), args.deterministic)
    if not os.path.isdir(args.out_dir):
        try:
            os.makedirs(args.out_dir, exist_ok=True)  # every rank: data workers may append to bad_files.txt
        except OSError as e:
            raise UserError(f"--out-dir {args.out_dir}: expected a folder that can be created, found {e.strerror}")
        _CREATED_FOLDERS[os.path.abspath(args.out_dir)] = os.path.abspath(args.out_dir)
    run = Run(args, device, args.out_dir)
    _PENDING_ARGS.append(run)
    if run.is_main:
        print("command:", " ".join([os.path.basename(sys.executable)] + sys.argv), flush=True)
        print("git commit:", git_commit(), flush=True)
        print("arguments:", json.dumps(vars(args), sort_keys=True), flush=True)
        print(f"processes: {world} on {device.type}; batch size {args.batch_size} global = "
              f"{args.batch_size // world} per process; lr {args.lr}; amp {run.amp_dtype}", flush=True)
    return run


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
        self.args_written = False

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

    def prepare(self, model, find_unused_parameters=False, method_syncs_buffers=False, compile_modules=None):
        """Move to the device; SyncBN (CUDA only) / channels-last / DDP / compile as the flags say. Returns the
        model to call; `fit` gets the unwrapped one (what the checkpoint stores).
        method_syncs_buffers=True: the method keeps its buffers equal on every process (a MoCo queue of gathered
        keys); with BN synchronised or absent, DDP then skips re-sending rank 0's buffers at every forward (33.5 MB
        for a 65536 x 128 queue). compile_modules(model): with --compile, the submodules to compile in place (the
        backbones, so methods that update state in forward keep pure graphs); default the whole model."""
        model = model.to(self.device)
        if self.args.sync_bn and self.world_size > 1 and self.device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        elif self.args.sync_bn and self.world_size > 1:
            self.print("--sync-bn: SyncBatchNorm needs CUDA; this CPU run keeps per-process BatchNorm")
        unsynced_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) and not isinstance(m, nn.SyncBatchNorm)
                          and m.track_running_stats for m in model.modules())
        if self.args.channels_last:
            model = model.to(memory_format=torch.channels_last_3d)
        if self.args.compile and compile_modules is not None:
            for module in compile_modules(model):
                module.compile()  # in place: state_dict keys and the module tree are unchanged
        if self.world_size > 1:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            model = nn.parallel.DistributedDataParallel(model, device_ids=device_ids,
                                                        find_unused_parameters=find_unused_parameters,
                                                        broadcast_buffers=not method_syncs_buffers or unsynced_bn,
                                                        gradient_as_bucket_view=True)
        if self.args.compile and compile_modules is None:
            model = torch.compile(model)
        return model

    def write_args(self):
        """args.json (rank 0, once): called by `fit` after the data is built, so a failing command never
        overwrites the record of the run whose folder it names."""
        if self.is_main and not self.args_written:
            write_json_atomic(os.path.join(self.out_dir, "args.json"), dict(
                vars(self.args), command=sys.argv, git_commit=git_commit(), world_size=self.world_size))
        self.args_written = True
        _CREATED_FOLDERS.pop(os.path.abspath(self.out_dir), None)
        if self in _PENDING_ARGS:
            _PENDING_ARGS.remove(self)

    def print(self, *values, **kwargs):
        if self.is_main:
            print(*values, **kwargs, flush=True)


def resolve_amp_dtype(amp, device):
    """--amp auto: bf16 where the GPU computes it natively (Ampere and later), else fp16 with a GradScaler, and no
    autocast on the CPU. Emulated bf16 (torch.cuda.is_bf16_supported() is True on older GPUs) is never chosen."""
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return None
    if amp == "bf16" or (amp == "auto" and torch.cuda.is_bf16_supported(including_emulation=False)):
        return torch.bfloat16
    if device.type != "cuda":
        raise ValueError("--amp fp16 needs CUDA (GradScaler); use --amp bf16 or off on CPU")
    return torch.float16


def seed_everything(seed, deterministic=False):
    """Seed Python, NumPy and torch; deterministic: deterministic algorithms and cuDNN, else cuDNN autotuning."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    else:
        torch.backends.cudnn.benchmark = True


def keep_freed_memory(mmap_threshold=64 << 20, trim_threshold=128 << 20):
    """glibc: blocks below 64 MB come from the heap, which keeps up to 128 MB freed, so per-batch buffers reuse
    their pages instead of faulting in fresh ones (CPU tubelet pasting, batch 32 at 112²: ~2,000 page faults and
    ~15 % of its CPU time less). Forked loader workers inherit it. False where glibc's mallopt is missing."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(-3, mmap_threshold) and mallopt(-1, trim_threshold))  # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD


def git_commit():
    """The project's git commit hash (+ "-dirty" with uncommitted changes), or "unknown"."""
    try:  # the full hash (no tag names), "-dirty" for changes to tracked files
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=40", "--exclude=*"], timeout=5,
                             cwd=os.path.dirname(os.path.abspath(__file__)), capture_output=True, text=True)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def is_distributed():
    """True inside an initialised process group."""
    return dist.is_available() and dist.is_initialized()


def get_world_size():
    """Number of processes (1 without a process group)."""
    return dist.get_world_size() if is_distributed() else 1


def get_rank():
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if is_distributed() else 0


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


def unwrap(model):
    """The module inside DDP (`.module`) and torch.compile (`._orig_mod`) wrappers, in any nesting."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or getattr(model, "_orig_mod")
    return model


def all_gather_with_grad(x):
    """all_gather_nograd with gradient (torch.distributed.nn's all_gather): this process's slice receives the sum
    over processes of the gradients its copies got. The identity at world size 1."""
    return x if get_world_size() == 1 else torch.cat(dist_nn.all_gather(x), dim=0)  # (W * N, ...)


EXIT_USER_ERROR = 2  # a UserError: one line "error: ...", nothing written
EXIT_INTERRUPTED = 3  # SIGTERM / SIGINT / SIGUSR1: the step was saved; rerun the same command to resume


class RunInterrupted(SystemExit):
    """Raised by `fit` after an interrupted run saved its step: the process exits with EXIT_INTERRUPTED, and the
    script writes no final result."""

    def __init__(self):
        super().__init__(EXIT_INTERRUPTED)


def _run_worker(main_worker, args):
    """main_worker(args), then args.json of a run that never reached `fit`; then, after every process is done, the
    process group torn down before the interpreter exits: a gloo group left to exit-time destructors can abort a
    process that finished early ("terminate called without an active exception"), which fails the whole spawn."""
    try:
        result = main_worker(args)
    except RunInterrupted:
        if is_distributed():
            dist.destroy_process_group()  # every process saw the same flag and left fit together
        raise
    while _PENDING_ARGS:
        _PENDING_ARGS.pop().write_args()
    if is_distributed():
        dist.barrier()
        dist.destroy_process_group()
    return result


def _exit_user_error(error, args, rank, message_file=None):
    """Report a UserError once: one line on stderr from rank 0, or (spawned workers) the first worker's line in
    `message_file` for the launcher to print; the traceback with --debug. Removes the run folder if this process
    created it and it is still empty, then exits with EXIT_USER_ERROR."""
    if getattr(args, "debug", False):
        raise error
    if message_file is not None:
        try:
            with open(message_file, "x") as f:
                f.write(str(error))
        except FileExistsError:
            pass
    elif rank == 0:
        print(f"error: {error}", file=sys.stderr, flush=True)
    created = _CREATED_FOLDERS.pop(os.path.abspath(args.out_dir), None) if getattr(args, "out_dir", None) else None
    try:
        if created and not os.listdir(created):
            os.rmdir(created)
    except OSError:
        pass
    raise SystemExit(EXIT_USER_ERROR)


_CREATED_FOLDERS = {}  # run folders this process created; an early UserError removes them again while empty
_PENDING_ARGS = []  # runs whose args.json is not written yet (written by `fit`, else when main_worker returns)


# ==================================================================================================== LOOP
# What a script calls after setup: build_loader, then fit(run, args, model, optimizer, loader, train_step)
# with the per-step LR schedule, atomic checkpoints, auto-resume, SIGTERM handling, logs and the online kNN monitor.


def build_loader(dataset, args, run, train=True, batch_size=None, collate_fn=None):
    """A DataLoader for one process: its shard of the data, batch size global / world size, pinned memory on CUDA,
    every item seeded from (seed, rank, epoch, index) (`SeededItems`). Training drops the last partial batch, keeps
    its workers and has 4 batches per worker in flight (video decoding times vary a lot from clip to clip).
    Workers send a batch's small tensors by value (`_collate_in_worker`); undecoded frames (a dataset with
    encoded=True) are collated by `collate_jpeg`."""
    global_batch = batch_size or args.batch_size
    per_process = max(global_batch // run.world_size, 1)
    sampler = ResumableDistributedSampler(dataset, per_process, num_replicas=run.world_size, rank=run.rank,
                                          shuffle=train, seed=args.seed, drop_last=train)
    workers = args.workers or 0
    collate_fn = collate_fn or (collate_jpeg if getattr(dataset, "encoded", False) else None)
    collate = functools.partial(_collate_in_worker, collate_fn or torch.utils.data.default_collate)
    return torch.utils.data.DataLoader(
        SeededItems(dataset, args.seed, run.rank), batch_size=per_process, sampler=sampler,
        num_workers=workers, collate_fn=collate, pin_memory=run.device.type == "cuda", drop_last=train,
        worker_init_fn=_seed_worker, generator=torch.Generator().manual_seed(args.seed * 1000 + run.rank),
        persistent_workers=train and workers > 0, prefetch_factor=(4 if train else 2) if workers > 0 else None)


class ResumableDistributedSampler(torch.utils.data.DistributedSampler):
    """DistributedSampler (the identity split at world size 1) that can start an epoch at a given batch,
    so an automatic resume continues with exactly the samples an uninterrupted run would see. Yields
    (epoch, index) pairs for `SeededItems`."""

    def __init__(self, dataset, batch_size, **kwargs):
        super().__init__(dataset, **kwargs)
        self.batch_size, self.start_batch = batch_size, 0

    def set_epoch(self, epoch, start_batch=0):
        super().set_epoch(epoch)
        self.start_batch = start_batch

    def __iter__(self):
        indices = list(super().__iter__())[self.start_batch * self.batch_size:]
        return iter([(self.epoch, i) for i in indices])

    def __len__(self):
        return max(self.num_samples - self.start_batch * self.batch_size, 0)


def _collate_in_worker(collate_fn, items):
    """collate_fn(items); in a loader worker its tensors under 64 KiB (labels, indices, frame indices) are wrapped to
    be pickled by value: a shared-memory tensor costs the worker and the main process ~1 ms per batch each (a file,
    a mapping, a file descriptor passed over a socket), whatever its size. The clips keep one handle per batch."""
    batch = collate_fn(items)
    if torch.utils.data.get_worker_info() is None:
        return batch
    return map_tensors(lambda t: _ByValue(t) if t.nbytes < 2 ** 16 and t.dtype != torch.bfloat16 else t, batch)


class _ByValue:
    """A CPU tensor that a worker's result queue pickles as a numpy array; it arrives as a plain tensor."""

    def __init__(self, tensor):
        self.tensor = tensor

    def __reduce__(self):
        return torch.from_numpy, (self.tensor.numpy(),)


def collate_jpeg(items):
    """default_collate of items with undecoded frames (VideoDataset encoded=True) -> batch["jpeg"] a JpegBatch: all
    files in one tensor (one shared-memory handle from a worker), positions shifted to index the batch's files."""
    files, clips = [], []
    for item in items:
        jpeg = dict(item.pop("jpeg"))
        for key in [k for k in ("video", "flow") if k in jpeg]:
            jpeg[key] = jpeg[key] + len(files)
        files += jpeg.pop("files")
        clips.append(jpeg)
    batch = torch.utils.data.default_collate(items)
    batch["jpeg"] = JpegBatch(torch.cat(files), [len(f) for f in files],
                              {k: v.numpy() for k, v in torch.utils.data.default_collate(clips).items()})
    return batch


class JpegBatch:
    """A batch's JPEG files for decode_jpeg_clips: data uint8 (total bytes,), sizes [bytes of each file], clips
    {"video" / "flow": positions (B, ..., T), "<key>_box": (B, ..., 4) (top, left, h, w), "<key>_flip": (B, ...)}
    as numpy arrays. Not a tensor: to_device leaves it in host memory, where decode_jpeg reads its input."""

    def __init__(self, data, sizes, clips):
        self.data, self.sizes, self.clips = data, sizes, clips


def _seed_worker(worker_id):
    """Seeds a worker's RNGs (SeededItems reseeds them per training item) and makes it ignore SIGTERM / SIGUSR1:
    a scheduler signals every process of the job, and the main process must be the one to decide (save, exit);
    a worker still exits with its parent (the DataLoader's watchdog)."""
    worker_seed = torch.initial_seed() % 2**32  # distinct per worker, set by the DataLoader from its generator
    np.random.seed(worker_seed)
    random.seed(worker_seed)
    for sig in _StopFlag.SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def to_device(batch, device):
    """Every tensor of a (nested dict / list / tuple) batch moved to `device`, non-blocking."""
    return map_tensors(lambda t: t.to(device, non_blocking=True), batch)


def map_tensors(fn, obj):
    """fn(tensor) applied to every tensor in nested dicts / lists / tuples (containers rebuilt, other leaves kept)."""
    if torch.is_tensor(obj):
        return fn(obj)
    if isinstance(obj, dict):
        return type(obj)((k, map_tensors(fn, v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(map_tensors(fn, v) for v in obj)
    return obj


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


def fit(run, args, model, optimizer, loader, train_step, backbone=None, backbone_meta=None, knn=None):
    """Train `model` with the method's `train_step(batch) -> dict of scalar metrics` (forward, backward and
    optimizer step are the method's: `run.step(loss, optimizer)`). The loop owns epochs, --max-steps, resume, the
    per-step LR, device transfer, logs, checkpoints and the NaN guard. The host waits for the device once per
    --log-every steps (and before a save): one all-reduced tensor carries the metric sums, the non-finite-loss
    flag and the stop flag of every process, so all stop together (NaN: without saving; SIGTERM / SIGUSR1 /
    SIGINT: after saving, raising RunInterrupted).
    model: the unwrapped module whose state_dict holds the whole method; backbone: the module exported as
    backbone.pth with `backbone_meta` (arch, modality, method) and the checkpoint's step; knn: optional (encoder,
    input_fn, train_loader, val_loader) for `knn_monitor`. Returns {"step", "epoch", "knn": last monitor result}."""
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise UserError(f"--batch-size {args.batch_size}: expected at most the {len(loader.dataset)} training "
                        f"samples ({loader.batch_size} per process), found too few samples to fill one batch")
    run.write_args()  # the data is built: the command is valid, its record may replace the folder's
    total_steps = args.epochs * steps_per_epoch
    # the schedule spans --schedule-epochs (default --epochs) even when --max-steps stops earlier
    schedule_steps = round((getattr(args, "schedule_epochs", None) or args.epochs) * steps_per_epoch)
    last_step = min(total_steps, args.max_steps) if args.max_steps else total_steps
    warmup_steps = round(args.warmup_epochs * steps_per_epoch)
    milestones = [round(m * steps_per_epoch) for m in args.milestones]
    ckpt_path = os.path.join(run.out_dir, "checkpoint.pth")
    backbone_path = os.path.join(run.out_dir, "backbone.pth")
    step, knn_result = 0, None
    if run.is_main:
        stale = remove_stale_temporaries(run.out_dir)
        if stale:
            print(f"removed {len(stale)} temporary file(s) of an interrupted save: {', '.join(stale)}", flush=True)

    def backbone_file(epoch):  # backbone.pth's content, with the step of the checkpoint written beside it
        return backbone_record(backbone, dict(backbone_meta or {}, step=step, epoch=epoch, args=vars(args)))

    # --resume: auto = the run folder's checkpoint if there is one, none = start afresh, else the file it names
    resume_path = {"auto": ckpt_path if os.path.exists(ckpt_path) else None, "none": None}.get(args.resume, args.resume)
    if resume_path:
        ckpt = load_checkpoint_file(resume_path, trust=getattr(args, "trust_checkpoint", False), flag="--resume")
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
        exported = torch.load(backbone_path, map_location="cpu", weights_only=False)["meta"].get("step") \
            if run.is_main and os.path.exists(backbone_path) else None
        if backbone is not None and run.is_main and exported != step:  # killed between the two saves
            save_atomic(backbone_file(ckpt["epoch"]), backbone_path)
            run.print(f"rewrote {backbone_path} (step {exported}) from the checkpoint's step {step}")
    elif os.path.exists(ckpt_path) and args.resume == "none":
        run.print(f"--resume none: starting afresh; {ckpt_path} will be overwritten")

    saver = BackgroundSaver()

    def save(epoch):
        rng = all_gather_objects(rng_state())  # every process's RNG, so a resume continues each stream exactly
        if not run.is_main:
            return
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": run.scaler.state_dict(),
                 "step": step, "epoch": epoch, "args": vars(args), "rng": rng,
                 "schedule": {"total_steps": schedule_steps, "steps_per_epoch": steps_per_epoch}}
        writes = [(cpu_copy(state), ckpt_path)]
        if backbone is not None:  # after the checkpoint: the pair is checked (and repaired) on resume
            writes.append((cpu_copy(backbone_file(epoch)), backbone_path))
        saver.submit(writes)

    if step >= last_step:
        run.print(f"the run in {run.out_dir} is already complete at step {step}: nothing to train "
                  f"(raise --epochs or --max-steps to continue, or --resume none to start afresh)")
    from tqdm import tqdm
    writer = _tensorboard_writer(run)
    metrics_file = open(os.path.join(run.out_dir, "metrics.jsonl"), "a") if run.is_main else None
    keys, window_sum = None, None  # metric names, (M,) sums on the device since the last sync
    first_bad = torch.full((2,), -1.0, device=run.device)  # (step, loss) of the first non-finite loss, on device
    window_steps, window_data, window_step_time = 0, 0.0, 0.0
    interrupted = False
    try:
        with _StopFlag() as stop:
            while step < last_step and not interrupted:
                epoch, start_batch = divmod(step, steps_per_epoch)
                loader.sampler.set_epoch(epoch, start_batch)
                model.train()
                bar = tqdm(total=steps_per_epoch, initial=start_batch, desc=f"epoch {epoch}", dynamic_ncols=True,
                           disable=not (run.is_main and sys.stderr.isatty()))  # off: the loop prints its log lines
                tick = time.perf_counter()
                for batch in loader:
                    data_time = time.perf_counter() - tick
                    batch = to_device(batch, run.device)
                    lr = lr_at_step(step, schedule_steps, args.lr, args.schedule, warmup_steps, args.final_lr,
                                    milestones, args.lr_gamma)
                    for group in optimizer.param_groups:
                        group["lr"] = lr * group.get("lr_scale", 1.0)
                    metrics = train_step(batch)
                    if keys is None:
                        keys = list(metrics)
                        window_sum = torch.zeros(len(keys), device=run.device)
                    values = torch.stack([v.detach().float().reshape(()).to(run.device) if torch.is_tensor(v) else
                                          torch.full((), float(v), device=run.device) for v in metrics.values()])
                    window_sum += values  # (M,) no host sync
                    new_bad = ~torch.isfinite(values[keys.index("loss")]) & (first_bad[0] < 0)
                    first_bad = torch.where(new_bad, torch.stack([torch.full_like(values[0], step),
                                                                  values[keys.index("loss")]]), first_bad)
                    step += 1
                    window_steps += 1
                    window_data += data_time
                    end_of_epoch = step % steps_per_epoch == 0
                    log_due = step % args.log_every == 0 or step == last_step
                    save_due = step == last_step or end_of_epoch or step % args.ckpt_every == 0
                    local_stop = stop.requested and run.world_size == 1  # a plain bool: no collective needed
                    if not (log_due or save_due or local_stop):
                        window_step_time += time.perf_counter() - tick
                        bar.update(1)
                        tick = time.perf_counter()
                        continue
                    # ---- the one host sync of this --log-every window (and before a save): metrics, NaN, stop
                    if run.device.type == "cuda":
                        torch.cuda.synchronize()  # honest step times on the logged steps
                    window_step_time += time.perf_counter() - tick
                    flags = torch.stack([(first_bad[0] >= 0).float(),
                                         torch.full((), float(stop.requested), device=run.device)])
                    packed = all_reduce(torch.cat([window_sum / window_steps, flags]), "sum").tolist()
                    averaged = [v / run.world_size for v in packed[:len(keys)]]
                    any_bad, interrupted = packed[len(keys)] > 0, packed[len(keys) + 1] > 0
                    if any_bad:
                        bad = [b for b in all_gather_objects(first_bad.tolist()) if b[0] >= 0]
                        bad_step, bad_loss = min(bad)
                        saver.wait()
                        last_good = ckpt_path if os.path.exists(ckpt_path) else "none (no checkpoint was written yet)"
                        raise NonFiniteLossError(
                            f"loss is {bad_loss} at step {int(bad_step)} (epoch {int(bad_step) // steps_per_epoch}); "
                            f"stopping without saving. Last good checkpoint: {last_good}. Try a lower --lr, "
                            f"--amp off or --clip-grad.")
                    if log_due:
                        record = {"step": step, "epoch": epoch, "lr": lr, **dict(zip(keys, averaged)),
                                  "samples_per_s": window_steps * args.batch_size / window_step_time,
                                  "data_time": window_data / window_steps,
                                  "step_time": window_step_time / window_steps,
                                  "data_share": window_data / window_step_time}
                        _write_record(run, record, metrics_file, writer, bar)
                        window_sum.zero_()
                        window_steps, window_data, window_step_time = 0, 0.0, 0.0
                    bar.update(1)
                    if interrupted or save_due:
                        save(step // steps_per_epoch)
                    if interrupted or step == last_step:
                        break
                    tick = time.perf_counter()
                bar.close()
                if interrupted:
                    saver.wait()
                    if is_distributed():
                        dist.barrier()  # no process leaves (and has its launcher stop the others) before the save
                    run.print(f"interrupted: saved step {step} to {ckpt_path}; rerun the same command "
                              f"(same --out-dir) to resume")
                    raise RunInterrupted()
                completed_epoch = step // steps_per_epoch
                if step % steps_per_epoch == 0:
                    _report_bad_files(run, completed_epoch)
                    if args.keep_every and completed_epoch % args.keep_every == 0 and run.is_main:
                        saver.wait()
                        shutil.copyfile(ckpt_path, os.path.join(run.out_dir, f"checkpoint_{completed_epoch:04d}.pth"))
                    if knn is not None and args.knn_every and completed_epoch % args.knn_every == 0:
                        knn_result = knn_monitor(*knn, run=run)
                        run.print(f"epoch {completed_epoch} kNN monitor: " + json.dumps(knn_result))
                        if run.is_main:
                            record = {"step": step, "epoch": completed_epoch, **knn_result}
                            metrics_file.write(json.dumps(record) + "\n")
                            metrics_file.flush()
        saver.wait()
    finally:
        saver.pool.shutdown()  # a save still in flight (an exception left fit) completes
        if metrics_file is not None:
            metrics_file.close()
        if writer is not None:
            writer.close()
    return {"step": step, "epoch": step // steps_per_epoch, "knn": knn_result}


def _tensorboard_writer(run):
    """A SummaryWriter on <out-dir>/tb on rank 0 where tensorboard is installed, else None."""
    if not run.is_main:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional: metrics.jsonl is always written
        return None
    return SummaryWriter(os.path.join(run.out_dir, "tb"))


def _report_bad_files(run, epoch):
    """Rank 0 prints how many samples bad_files.txt lists after an epoch (nothing when none)."""
    path = os.path.join(run.out_dir, "bad_files.txt")
    if run.is_main and os.path.exists(path):
        with open(path) as f:
            count = sum(1 for _ in f)
        if count:
            print(f"warning: after epoch {epoch}, {count} unreadable samples were skipped and replaced; see {path}",
                  flush=True)


class NonFiniteLossError(RuntimeError):
    """A non-finite loss: `fit` stops without saving and names the last good checkpoint."""


class _StopFlag:
    """SIGTERM / SIGUSR1 (SLURM's warning ahead of the time limit) / SIGINT ask the loop to finish the current
    step, save and exit; a second SIGINT aborts."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)

    def __init__(self):
        self.requested = False
        self.previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def save_atomic(obj, path):
    """torch.save to a temporary file in the same folder, fsync, then rename over `path`: a crash at any point
    leaves either the old file or the new one, never a truncated one (a SIGKILL can leave the temporary file,
    named .tmp-*, which the next `fit` in that folder removes)."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=".pth", dir=folder)
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
    """json.dump (indented, sorted) to path.tmp, then rename over `path`."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)
    os.replace(tmp, path)


def rng_state():
    """Python, NumPy, torch CPU and CUDA RNG states of this process (a checkpoint's "rng")."""
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state):
    """Restore what `rng_state` returned."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def knn_monitor(encoder, input_fn, train_loader, val_loader, run, k=200, temperature=0.1, chunk=1024):
    """The cheap health signal of a pretraining run: weighted kNN (k=200, T=0.1) and 1-NN top-1 accuracy (%) of
    L2-normalised features of `encoder(input_fn(batch))`, with the train loader as the gallery. The queries are
    split across processes and classified `chunk` at a time, so no process holds more than a
    (chunk, N_train) similarity matrix (Kinetics: 1024 x 240k instead of 20k x 240k)."""
    train_features, train_labels = extract_features(encoder, input_fn, train_loader, run)
    val_features, val_labels = extract_features(encoder, input_fn, val_loader, run)
    num_classes = int(max(train_labels.max(), val_labels.max())) + 1
    hits = torch.zeros(2, device=val_features.device)  # (kNN, 1-NN) correct queries of this process
    for part in torch.arange(run.rank, len(val_labels), run.world_size, device=val_labels.device).split(chunk):
        knn_pred, nn1_pred = knn_classify(train_features, train_labels, val_features[part], num_classes, k,
                                          temperature)
        hits += torch.stack([(knn_pred == val_labels[part]).sum(), (nn1_pred == val_labels[part]).sum()])
    knn_hits, nn1_hits = all_reduce(hits).tolist()
    return {"knn_top1": knn_hits / len(val_labels) * 100, "nn1_top1": nn1_hits / len(val_labels) * 100}


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
    return gather_in_sample_order(torch.cat(indices), torch.cat(feats), torch.cat(labels))[1:]


def gather_in_sample_order(index, *tensors):
    """Per-process outputs of an evaluation loader -> every sample once, in dataset order: index (N_local,) and
    tensors (N_local, ...) gathered over processes, sorted by index, the distributed sampler's padding (repeated
    samples) dropped. Returns (index (N,), *tensors (N, ...))."""
    index, *tensors = (all_gather_nograd(t) for t in (index, *tensors))
    order = torch.argsort(index)
    keep = torch.ones_like(order, dtype=torch.bool)
    keep[1:] = index[order][1:] != index[order][:-1]
    return tuple(t[order][keep] for t in (index, *tensors))


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


class SeededItems(torch.utils.data.Dataset):
    """Item (epoch, i) of `dataset` drawn with the global torch / numpy / random RNGs seeded from
    (seed, rank, epoch, i): the augmentations of a sample do not depend on the worker that loads it, on the number
    of workers or on where a resumed run restarts, so persistent workers keep resumes exact. In the main process
    (--workers 0) the global RNG states are restored afterwards (the training step draws from them)."""

    def __init__(self, dataset, seed, rank):
        self.dataset, self.seed, self.rank = dataset, seed, rank

    def __len__(self):
        return len(self.dataset)

    def __getattr__(self, name):  # the wrapped dataset's attributes (classes, samples, ...), not its protocol
        if name == "dataset" or name.startswith("__"):  # e.g. Subset.__getitems__ would bypass the seeding
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, key):
        epoch, i = key
        seeds = np.random.SeedSequence([self.seed, self.rank, epoch, i]).generate_state(3)
        in_worker = torch.utils.data.get_worker_info() is not None
        saved = None if in_worker else (torch.get_rng_state(), np.random.get_state(), random.getstate())
        torch.default_generator.manual_seed(int(seeds[0]))  # the CPU generator only: CUDA streams stay the step's
        np.random.seed(int(seeds[1]))
        random.seed(int(seeds[2]))
        try:
            return self.dataset[i]
        finally:
            if saved is not None:
                torch.set_rng_state(saved[0])
                np.random.set_state(saved[1])
                random.setstate(saved[2])


def _write_record(run, record, metrics_file, writer, bar):
    """One metrics.jsonl line (rank 0), the same scalars to TensorBoard, and the progress bar or a printed line."""
    if not run.is_main:
        return
    metrics_file.write(json.dumps(record) + "\n")
    metrics_file.flush()
    if writer is not None:
        for k, v in record.items():
            writer.add_scalar(f"train/{k}", v, record["step"])
    if bar.disable:
        print(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()), flush=True)
    else:
        bar.set_postfix(loss=f"{record['loss']:.4f}", sps=f"{record['samples_per_s']:.1f}",
                        data=f"{record['data_share']:.0%}", refresh=False)


TMP_PREFIX = ".tmp-"  # save_atomic's temporary files; `remove_stale_temporaries` deletes those a kill left behind


def remove_stale_temporaries(folder):
    """Delete the temporary files of interrupted atomic saves (save_atomic, write_json_atomic) in `folder`."""
    removed = []
    for name in os.listdir(folder):
        if name.startswith(TMP_PREFIX) or name.endswith(".json.tmp"):
            os.remove(os.path.join(folder, name))
            removed.append(name)
    return removed


def cpu_copy(obj):
    """`obj` (nested dicts / lists of tensors) with every tensor copied to the CPU: what a background save writes
    while training goes on changing the originals in place."""
    return map_tensors(lambda t: t.detach().to("cpu", copy=True), obj)


class BackgroundSaver:
    """At most one save in flight on a thread: the caller hands over CPU copies (`cpu_copy`, the only stall of the
    training step) and goes on; the next `submit`, `wait` or the end of `fit` joins it and re-raises its error."""

    def __init__(self):
        self.pool, self.pending = concurrent.futures.ThreadPoolExecutor(1, "checkpoint-save"), None

    def submit(self, writes):
        """writes: [(obj, path)] saved with save_atomic in this order."""
        self.wait()
        self.pending = self.pool.submit(lambda: [save_atomic(obj, path) for obj, path in writes])

    def wait(self):
        """Join the save in flight; its error is raised here, in the training thread."""
        pending, self.pending = self.pending, None
        if pending is not None:
            pending.result()


# ==================================================================================================== BACKBONES
# build_backbone(arch) -> nn.Module with `feature_dim`; forward(x) -> (N, feature_dim). Video input
# (N, C, T, H, W) float, normalised; skeleton input (N, C, T, V, M). Submodule names mirror the source implementation
# (torchvision, 2s-AGCN, ST-GCN, 3D-ResNets, P-HLVC) so their state dicts load without renaming.


VIDEO_ARCHS = ("r2plus1d_18", "r3d_18", "mc3_18", "s3d", "r2d3d_18", "i3d", "resnet3d_18", "resnext3d_101",
               "tiny3d", "r2plus1d_10", "phlvc_video")

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
        phlvc_video: trunk ("s3d" | "r2d3d_18" | "tiny3d"), hidden (512), tap ("fc2" | "fc1"), width (tiny3d).
    """
    c = 3 if in_channels is None else in_channels
    if arch in ("r2plus1d_18", "r3d_18", "mc3_18"):
        if c != 3:
            raise ValueError(f"common.py: {arch} expects in_channels=3 (torchvision stem), got {c}")
        model = VideoResNet(arch, **options)
    elif arch == "s3d":
        if pretrained == "kinetics400":  # torchvision's S3D was trained with eps 1e-3, momentum 1e-3
            options = {"bn_momentum": 1e-3, **options}
            bn_eps = 1e-3 if bn_eps is None else bn_eps
        model = S3D(**options)
    elif arch == "i3d":
        model = I3D(c, **options)
    elif arch == "tiny3d":
        model = Tiny3D(c, **options)
    elif arch == "r2plus1d_10":
        model = R2Plus1D10(c, **options)
    elif arch == "resnet3d_18":
        model = ResNet3D((2, 2, 2, 2), c, **options)
    elif arch == "resnext3d_101":
        model = ResNet3D((3, 4, 23, 3), c, widths=(128, 256, 512, 1024), cardinality=32, **options)
    elif arch == "r2d3d_18":
        model = ResNet3D((2, 2, 2, 2), c, stem_kernel=(1, 7, 7),
                         widths=(64, 128, 256, 256), block_kernels=((1, 3, 3), (1, 3, 3), 3, 3),
                         temporal_strides=(1, 1, 2, 2), final_relu=False, **options)
    elif arch == "phlvc_video":
        if c != 3:
            raise ValueError(f"common.py: phlvc_video expects in_channels=3, got {c}")
        model = PHLVCVideo(**options)
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
    if bn_eps is not None:  # every constructor keeps PyTorch's default (1e-5)
        set_bn_eps(model, bn_eps)
    model.arch = arch
    if pretrained == "kinetics400":
        if arch not in TORCHVISION_VIDEO_WEIGHTS:
            raise ValueError(f"common.py: no torchvision Kinetics-400 weights for '{arch}'; "
                             f"available for {list(TORCHVISION_VIDEO_WEIGHTS)}; pass a file path instead")
        load_backbone_weights(model, _torchvision_kinetics_state_dict(arch))
    elif pretrained:
        load_backbone_weights(model, pretrained)
    return model


TORCHVISION_VIDEO_WEIGHTS = ("mc3_18", "r2plus1d_18", "r3d_18", "s3d")  # torchvision's Kinetics-400 weights


def set_bn_eps(model, eps):
    """Set eps of every BatchNorm layer (tubelet-contrast pretrains with 1e-3, torchvision uses 1e-5)."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eps = eps
    return model


def _pool_video_map(x):
    """Global average pool of a video feature map: (N, C, T, H, W) -> (N, C)."""
    return x.mean(dim=(2, 3, 4))


def _torchvision_kinetics_state_dict(arch):
    """Download (or read from the torch hub cache) torchvision's Kinetics-400 weights for `arch`."""
    weights = torchvision.models.get_model_weights(arch).KINETICS400_V1
    try:
        return weights.get_state_dict(progress=False)
    except Exception as e:  # no internet: urllib.error.URLError, socket errors, ...
        file_name = os.path.basename(weights.url)
        cache = os.path.join(torch.hub.get_dir(), "checkpoints", file_name)
        raise RuntimeError(
            f"common.py: cannot download torchvision Kinetics-400 weights for {arch} from {weights.url} ({e}). "
            f"Offline: copy that file to {cache}, or pass the local file, e.g. "
            f"build_backbone('{arch}', pretrained='/path/to/{file_name}')") from e


class VideoResNet(nn.Module):
    """torchvision's R(2+1)D-18 / R3D-18 / MC3-18 without the fc; keys stem.*, layer1..4.* as in torchvision.

    Tubelet-contrast (CtP code) builds the same topology; its BN eps is 1e-3 (build_backbone(..., bn_eps=1e-3)).
    16x112x112 input -> map (512, 2, 7, 7).
    """

    def __init__(self, arch="r2plus1d_18"):
        super().__init__()
        net = getattr(torchvision.models.video, arch)(weights=None)
        self.stem, self.layer1, self.layer2, self.layer3, self.layer4 = (
            net.stem, net.layer1, net.layer2, net.layer3, net.layer4)
        self.feature_dim = 512

    def forward(self, x, return_map=False):
        x = self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))  # (N, 512, T/8, H/16, W/16)
        return x if return_map else _pool_video_map(x)


class S3D(nn.Module):
    """S3D (Xie et al. 2018) as used by CoCLR / ViCC / P-HLVC, with torchvision's module layout (`features.*`).

    torchvision's S3D pools with a fixed AvgPool3d(2, 7, 7) and fails below 224 px; we average the map
    adaptively, so 32x128x128 works (map 1024 x 4 x 4 x 4). BN eps: CoCLR/ViCC use PyTorch's default (1e-5),
    torchvision and P-HLVC (kylemin S3D) 1e-3 with momentum 1e-3 (build_backbone's `bn_eps`, `bn_momentum`).
    CoCLR checkpoints name the same layers `base.N.conv_s/bn_s/conv_t/bn_t/conv/bn` (renamed on loading).
    """

    def __init__(self, bn_momentum=0.1):
        super().__init__()
        net = torchvision.models.video.S3D(norm_layer=lambda c: nn.BatchNorm3d(c, momentum=bn_momentum))
        self.features = net.features
        self.feature_dim = 1024
        for m in self.modules():  # CoCLR backbone/s3dg.py: conv weights N(0, 0.01)
            if isinstance(m, nn.Conv3d):
                nn.init.normal_(m.weight, 0.0, 0.01)

    def forward(self, x, return_map=False):
        x = self.features(x)  # (N, 1024, T/8, H/32, W/32)
        return x if return_map else _pool_video_map(x)


_conv3d_bn_relu = torchvision.ops.Conv3dNormActivation  # (cin, cout, k, stride): Conv3d (pad k // 2, no bias), BN, ReLU


class InceptionBlock3D(nn.Module):
    """I3D Inception block (full 3x3x3 convs); branch names as torchvision's SepInceptionBlock3D."""

    def __init__(self, cin, b0, b1a, b1b, b2a, b2b, b3):
        super().__init__()
        self.branch0 = _conv3d_bn_relu(cin, b0, 1)
        self.branch1 = nn.Sequential(_conv3d_bn_relu(cin, b1a, 1), _conv3d_bn_relu(b1a, b1b, 3))
        self.branch2 = nn.Sequential(_conv3d_bn_relu(cin, b2a, 1), _conv3d_bn_relu(b2a, b2b, 3))
        self.branch3 = nn.Sequential(nn.MaxPool3d(3, stride=1, padding=1), _conv3d_bn_relu(cin, b3, 1))

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

    def __init__(self, in_channels=3):
        super().__init__()
        self.features = nn.Sequential(
            _conv3d_bn_relu(in_channels, 64, 7, stride=2),
            nn.MaxPool3d((1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1)),
            _conv3d_bn_relu(64, 64, 1),
            _conv3d_bn_relu(64, 192, 3),
            nn.MaxPool3d((1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1)),
            InceptionBlock3D(192, 64, 96, 128, 16, 32, 32),
            InceptionBlock3D(256, 128, 128, 192, 32, 96, 64),
            nn.MaxPool3d(3, stride=2, padding=1),
            InceptionBlock3D(480, 192, 96, 208, 16, 48, 64),
            InceptionBlock3D(512, 160, 112, 224, 24, 64, 64),
            InceptionBlock3D(512, 128, 128, 256, 24, 64, 64),
            InceptionBlock3D(512, 112, 144, 288, 32, 64, 64),
            InceptionBlock3D(528, 256, 160, 320, 32, 128, 128),
            nn.MaxPool3d(2, stride=2),
            InceptionBlock3D(832, 256, 160, 320, 32, 128, 128),
            InceptionBlock3D(832, 384, 192, 384, 48, 128, 128),
        )
        self.feature_dim = 1024

    def forward(self, x, return_map=False):
        x = self.features(x)  # (N, 1024, T/8, H/32, W/32)
        return x if return_map else _pool_video_map(x)


class Block3D(nn.Module):
    """A 3D-ResNet block with Hara et al.'s names (conv1/bn1, ..., downsample): basic (cardinality None: two convs
    of `kernel`; (1, 3, 3) = R2D3D's 2D block) or ResNeXt bottleneck (1x1x1 -> grouped 3x3x3 with
    cardinality * planes / 32 channels -> 1x1x1 to 2 * planes). (N, cin, T, H, W) -> (N, planes * expansion, ...)."""

    def __init__(self, cin, planes, stride=1, downsample=None, kernel=3, cardinality=None):
        super().__init__()
        if cardinality is None:  # (cin, cout, kernel, stride, groups) per conv
            convs = [(cin, planes, kernel, stride, 1), (planes, planes, kernel, 1, 1)]
        else:
            mid = cardinality * (planes // 32)
            convs = [(cin, mid, 1, 1, 1), (mid, mid, 3, stride, cardinality), (mid, 2 * planes, 1, 1, 1)]
        for i, (a, b, k, s, g) in enumerate(convs, 1):
            pad = tuple(n // 2 for n in k) if isinstance(k, tuple) else k // 2
            setattr(self, f"conv{i}", nn.Conv3d(a, b, k, s, pad, groups=g, bias=False))
            setattr(self, f"bn{i}", nn.BatchNorm3d(b))
        self.num_convs = len(convs)
        self.relu, self.downsample, self.final_relu = nn.ReLU(inplace=True), downsample, True

    def forward(self, x):
        out = x
        for i in range(1, self.num_convs + 1):
            out = getattr(self, f"bn{i}")(getattr(self, f"conv{i}")(out))  # (N, C_i, T', H', W')
            if i < self.num_convs:
                out = self.relu(out)
        out = out + (x if self.downsample is None else self.downsample(x))  # (N, planes * expansion, T', H', W')
        return self.relu(out) if self.final_relu else out


class ResNet3D(nn.Module):
    """ResNet with stem conv1/bn1/maxpool and layer1..4 (Hara et al. 3D-ResNets key names, shortcut type B).

    Used for `resnet3d_18` (thesis Sec. 2.4.3 depth student, `in_channels` configurable), `resnext3d_101`
    (Sec. 2.4.3 Kinetics teacher, Hara's resnext-101-kinetics.pth layout) and `r2d3d_18` (DPC's ResNet-2D3D-18,
    TengdaHan/DPC backbone/resnet_2d3d.py: 1x7x7 stem, 2D blocks (1x3x3) in layer1-2 with spatial-only stride,
    3D blocks in layer3-4, layer4 narrowed to 256 channels and no ReLU after its last block).
    """

    def __init__(self, layers, in_channels=3, widths=(64, 128, 256, 512), cardinality=None,
                 stem_kernel=(7, 7, 7), block_kernels=(3, 3, 3, 3), temporal_strides=(1, 2, 2, 2), final_relu=True):
        super().__init__()
        self.conv1 = nn.Conv3d(in_channels, 64, stem_kernel, (1, 2, 2), tuple(k // 2 for k in stem_kernel),
                               bias=False)
        self.bn1 = nn.BatchNorm3d(64)
        self.relu = nn.ReLU(inplace=True)
        pool_t = 3 if stem_kernel[0] > 1 else 1
        self.maxpool = nn.MaxPool3d((pool_t, 3, 3), (2 if pool_t > 1 else 1, 2, 2), (pool_t // 2, 1, 1))
        cin, expansion = 64, 1 if cardinality is None else 2
        for i, (planes, n) in enumerate(zip(widths, layers)):
            stride = (temporal_strides[i], 1 if i == 0 else 2, 1 if i == 0 else 2)
            downsample = None
            if stride != (1, 1, 1) or cin != planes * expansion:
                downsample = nn.Sequential(nn.Conv3d(cin, planes * expansion, 1, stride, bias=False),
                                           nn.BatchNorm3d(planes * expansion))
            blocks = [Block3D(cin, planes, stride, downsample, block_kernels[i], cardinality)]
            cin = planes * expansion
            blocks += [Block3D(cin, planes, 1, None, block_kernels[i], cardinality) for _ in range(n - 1)]
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


def _r21d_conv(cin, cout, kernel, stride=(1, 1, 1), padding=(0, 0, 0)):
    """(2+1)D factorised conv (Tran et al. 2018, Sec. 3.5): 1xkxk spatial conv to M channels, BN, ReLU, kx1x1
    temporal conv, with M = floor(k t k k cin cout / (k k cin + t cout)) so the parameters match the 3D conv."""
    kt, kh, kw = kernel
    m = (kt * kh * kw * cin * cout) // (kh * kw * cin + kt * cout)
    return nn.Sequential(nn.Conv3d(cin, m, (1, kh, kw), (1, stride[1], stride[2]), (0, padding[1], padding[2]),
                                   bias=False), nn.BatchNorm3d(m), nn.ReLU(inplace=True),
                         nn.Conv3d(m, cout, (kt, 1, 1), (stride[0], 1, 1), (padding[0], 0, 0), bias=False))


class R2Plus1DBlock(nn.Module):
    """Residual block of two (2+1)D convs; downsample: stride 2 in space and time, (2+1)D 1x1x1 shortcut + BN."""

    def __init__(self, cin, cout, downsample=False):
        super().__init__()
        s = (2, 2, 2) if downsample else (1, 1, 1)
        self.conv1, self.bn1 = _r21d_conv(cin, cout, (3, 3, 3), s, (1, 1, 1)), nn.BatchNorm3d(cout)
        self.conv2, self.bn2 = _r21d_conv(cout, cout, (3, 3, 3), padding=(1, 1, 1)), nn.BatchNorm3d(cout)
        self.shortcut = nn.Sequential(_r21d_conv(cin, cout, (1, 1, 1), s), nn.BatchNorm3d(cout)) if downsample \
            else nn.Identity()

    def forward(self, x):
        res = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(self.shortcut(x) + res)


class R2Plus1D10(nn.Module):
    """R(2+1)D with one block per stage, the "R(2+1)D" of VCOP / ViCC supp. Table 3 (14.4 M parameters in the
    papers; ViCC's backbone/r21d.py with layer_sizes (1, 1, 1, 1)). Stem (2+1)D 3x7x7 stride (1, 2, 2), no
    max-pool; 16x128² -> map (512, 2, 8, 8) -> pooled 512."""

    def __init__(self, in_channels=3):
        super().__init__()
        self.stem = nn.Sequential(_r21d_conv(in_channels, 64, (3, 7, 7), (1, 2, 2), (1, 3, 3)), nn.BatchNorm3d(64),
                                  nn.ReLU(inplace=True))
        self.layers = nn.Sequential(R2Plus1DBlock(64, 64), R2Plus1DBlock(64, 128, True),
                                    R2Plus1DBlock(128, 256, True), R2Plus1DBlock(256, 512, True))
        self.feature_dim = 512

    def forward(self, x, return_map=False):
        x = self.layers(self.stem(x))  # (N, 512, T/8, H/16, W/16)
        return x if return_map else _pool_video_map(x)


class Tiny3D(nn.Module):
    """A small 3D CNN for CPU smoke runs and tests (~0.3 M parameters at width 16; not from any paper).

    16x64x64 -> map (8*width, 4, 4, 4); 16x112x112 -> (8*width, 4, 7, 7).
    """

    def __init__(self, in_channels=3, width=16):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            _conv3d_bn_relu(in_channels, w, 3, stride=(1, 2, 2)), _conv3d_bn_relu(w, 2 * w, 3, stride=2),
            _conv3d_bn_relu(2 * w, 4 * w, 3, stride=2), _conv3d_bn_relu(4 * w, 8 * w, 3, stride=(1, 2, 2)),
        )
        self.feature_dim = 8 * w

    def forward(self, x, return_map=False):
        x = self.features(x)  # (N, 8w, T/4, H/16, W/16)
        return x if return_map else _pool_video_map(x)


class PHLVCVideo(nn.Module):
    """P-HLVC video encoder up to FC2 (P-HLVC supp. Sec. 7.3, Listing 1; cvpranon42/phlvc model_3d.py).

    trunk map (N, C, T', H', W') -> avg-pool (2, H', W') stride 1 -> `fc` = Conv3d 1x1x1 C -> hidden (the S3D
    classifier conv re-purposed; for r2d3d_18 the issue's "Linear 256 -> 512", which a 1x1x1 conv on the pooled
    map is) -> mean over time = FC1 (N, hidden) -> `vid_fc2` = BN1d - ReLU - Linear(hidden, hidden) = FC2.
    tap: "fc2" (classification, Sec. 7.3) or "fc1" (retrieval: "the features before FC2"); forward(x, tap=...)
    overrides it. S3D: kylemin BN (eps 1e-3, momentum 1e-3), 8,434,848 params to FC1 at hidden 512.
    """

    def __init__(self, trunk="s3d", hidden=512, tap="fc2", width=16):
        super().__init__()
        if tap not in ("fc1", "fc2"):
            raise ValueError(f"common.py: phlvc_video tap must be 'fc1' or 'fc2', got {tap!r}")
        options = {"s3d": dict(bn_eps=1e-3, bn_momentum=1e-3), "tiny3d": dict(width=width)}.get(trunk, {})
        self.trunk = build_backbone(trunk, **options)
        self.fc = nn.Sequential(nn.Conv3d(self.trunk.feature_dim, hidden, 1))
        self.vid_fc2 = nn.Sequential(nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, hidden))
        self.feature_dim, self.tap = hidden, tap
        for m in self.vid_fc2.modules():  # authors' _initialize_weights: orthogonal weights, zero biases
            if isinstance(m, nn.Linear):
                nn.init.orthogonal_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x, return_map=False, tap=None):
        x = self.trunk(x, return_map=True)  # (N, C, T', H', W')
        if return_map:
            return x
        x = F.avg_pool3d(x, (min(2, x.shape[2]), x.shape[3], x.shape[4]), stride=1)  # (N, C, T'-1, 1, 1)
        fc1 = self.fc(x).flatten(2).mean(dim=2)  # (N, hidden): FC1
        return fc1 if (tap or self.tap) == "fc1" else self.vid_fc2(fc1)  # (N, hidden)


# NTU RGB+D 25 joints, child -> parent toward the spine (2s-AGCN graph/ntu_rgb_d.py, ST-GCN: listed 1-based).
NTU25_INWARD = [(i - 1, j - 1) for i, j in [
    (1, 2), (2, 21), (3, 21), (4, 3), (5, 21), (6, 5), (7, 6), (8, 7), (9, 21), (10, 9), (11, 10), (12, 11), (13, 1),
    (14, 13), (15, 14), (16, 15), (17, 1), (18, 17), (19, 18), (20, 19), (22, 23), (23, 8), (24, 25), (25, 12)]]

# OpenPose COCO-18 (0-based), 2s-AGCN graph/kinetics.py, ST-GCN 'openpose' layout.
COCO18_INWARD = [(4, 3), (3, 2), (7, 6), (6, 5), (13, 12), (12, 11), (10, 9), (9, 8), (11, 5), (8, 2), (5, 1),
                 (2, 1), (0, 1), (15, 0), (14, 0), (17, 15), (16, 14)]

SKELETON_GRAPHS = {"ntu25": (25, NTU25_INWARD, 20), "coco18": (18, COCO18_INWARD, 1)}  # (V, edges, centre)


def _normalize_digraph(a):
    """Adjacency (V, V) -> A D^-1 (each column divided by its in-degree; empty columns stay 0), as 2s-AGCN."""
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
    # net/utils/graph.py get_adjacency('spatial'): A = [hop-0 root, hop-1 root + close, hop-1 further], at [j, i]
    closer = dist[:, None] >= dist[None, :]  # (V, V): dist[j] >= dist[i]
    return np.stack([np.where(hop == 0, norm, 0), np.where((hop == 1) & closer, norm, 0),
                     np.where((hop == 1) & ~closer, norm, 0)]).astype(np.float32)  # (3, V, V)


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
        self.stepwise = stepwise
        self.feature_dim = 2 * hidden
        for p in self.gru.parameters():  # xavier-uniform on 2-D weights (Skeleton-Contrast code, moco/GRU.py)
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
    """2s-AGCN unit_tcn: (kernel x 1) temporal conv with stride, then BN; (N, C, T, V) -> (N, C', T / stride, V)."""

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
    """The 10 blocks of AGCN / ST-GCN: [(in channels (None = input), out channels, temporal stride, residual)]."""
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


# ==================================================================================================== CHECKPOINT I/O
# load_backbone_weights reads our backbone.pth ({"state_dict", "meta"}), our checkpoint.pth, torchvision state dicts
# and the authors' layouts: keys matched by suffix after a detected prefix ("module.", "encoder_q.", "backbone.", ...),
# the CtP, CoCLR S3D, tubelet-contrast I3D, RSPNet and P-HLVC names renamed to ours; heads, queues and key encoders
# skipped by name. Anything the model needs and the file lacks raises. save_backbone writes backbone.pth.


def load_backbone_weights(model, path_or_state_dict, prefix=None, trust=False):
    """Load backbone weights from any supported layout; return dict(loaded, missing, unexpected, skipped, prefix,
    tclr_layer4).

    prefix: force the key prefix (e.g. "encoder_r.", evaluate.py --weights-prefix) instead of detecting it; two
    encoders that both hold every backbone key (neither a key/momentum encoder) are refused without it.
    trust: --trust-checkpoint (see `load_checkpoint_file`). Raises ValueError when a backbone key is missing or a
    shape differs (naming the file, the expected and the actual keys/shapes). A TCLR checkpoint (dilated
    layer4.0.conv1.0) turns an R(2+1)D-18 `model` into TCLR's variant first (`_tclr_layer4`)."""
    src = _describe(path_or_state_dict)
    state = read_checkpoint(path_or_state_dict, trust=trust)
    tclr = _tclr_layer4(model, state)
    target = model.state_dict()
    model_keys = set(target)
    best = None
    for renames in ((), CTP_RENAMES, COCLR_S3D_RENAMES, I3D_RENAMES, BASE_NETWORK_RENAMES, PHLVC_RENAMES):
        renamed = _rename_keys(state, renames)  # {our name: checkpoint key}
        if prefix is None:
            p, match, candidates = _match_prefix(list(renamed), model_keys)
        else:
            p, candidates = prefix, [prefix]
            match = {k[len(p):]: k for k in renamed if k.startswith(p) and k[len(p):] in model_keys}
        if best is None or len(match) > len(best[1]):
            best = (p, match, renamed, candidates)
    p, match, renamed, candidates = best
    n = len(p)
    same = all(torch.equal(state[renamed[c + k[n:]]], state[renamed[k]]) if c + k[n:] in renamed else False
               for c in candidates[1:] for k in match.values())
    if len(candidates) > 1 and not same:  # one module registered under two names is not ambiguous
        raise UserError(f"{src}: {len(candidates)} encoders in the checkpoint hold every backbone key of "
                        f"{type(model).__name__} (prefixes {', '.join(repr(c) for c in candidates)}); choose one "
                        f"with --weights-prefix, e.g. --weights-prefix {candidates[0]}")
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
    return {"loaded": sorted(match), "missing": missing, "unexpected": unexpected, "skipped": skipped, "prefix": p,
            "tclr_layer4": tclr}


def save_backbone(model, path, meta=None):
    """Write backbone.pth = backbone_record(model, meta) atomically."""
    save_atomic(backbone_record(model, meta), path)


def backbone_state_dict(model):
    """CPU state dict with torchvision-compatible keys (no module./_orig_mod. wrappers) — what backbone.pth holds."""
    return {k: v.detach().cpu().clone() for k, v in unwrap(model).state_dict().items()}


def read_checkpoint(path_or_state_dict, trust=False):
    """Return a flat {name: tensor} dict from a file or dict: unwraps "state_dict", "model", "backbone", "net".
    Files are read by `load_checkpoint_file` (weights_only unless trust=True, --trust-checkpoint)."""
    obj = path_or_state_dict
    if isinstance(obj, (str, os.PathLike)):
        obj = load_checkpoint_file(str(obj), trust=trust)
    for _ in range(3):
        if isinstance(obj, dict) and not all(torch.is_tensor(v) for v in obj.values()):
            inner = next((obj[k] for k in ("state_dict", "model", "backbone", "net", "model_state", "encoder")
                          if isinstance(obj.get(k), dict)), None)
            if inner is None:
                break
            obj = inner
    if not isinstance(obj, dict) or not obj:
        raise UserError(f"{_describe(path_or_state_dict)}: expected a state dict (or a dict with 'state_dict' / "
                        f"'model'), found {type(obj).__name__}{' (empty)' if isinstance(obj, dict) else ''}")
    return {k: v for k, v in obj.items() if torch.is_tensor(v)}


# Key-path components of encoders that are never the one to load: MoCo key encoders (encoder_k,
# skeleton-contrast's encoder_l for the second representation), EMA / momentum / target copies and teachers.
# CoCLR's stage 2 keeps the frozen other-view encoder as `sampler` (it mines positives; it is not the model trained).
CHECKPOINT_EXCLUDED_PREFIXES = ("encoder_k", "encoder_l", "key_encoder", "backbone_k", "model_k", "model_ema", "ema",
                                "ema_model", "momentum", "momentum_encoder", "target", "target_encoder", "teacher",
                                "sampler")

# Key-path components of the query (online) encoder: preferred when another encoder also holds every backbone key.
CHECKPOINT_QUERY_PREFIXES = ("encoder_q", "query_encoder", "backbone_q", "model_q", "online", "online_encoder")

# Checkpoint entries that are heads or training state, reported as `skipped`, never as `unexpected`.
CHECKPOINT_HEAD_NAMES = ("fc", "fc7", "fc8", "fcn", "head", "heads", "classifier", "proj", "projector",
                         "projection", "mlp", "prototypes", "queue", "queue_ptr", "queue_second", "logits",
                         "vid_fc2", "vid_fc_rep", "sk_fc_rep", "final", "final_fc", "cls_head")

# CtP / tubelet-contrast R(2+1)D and R3D names -> torchvision (SEVERE-BENCHMARK backbones.py
# load_tubelet_contrast_checkpoint).
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

# RSPNet (`encoder_q.encoder.base_network.N.`) and Pretext-Contrast (`module.base_network.N.`) hold torchvision's
# R(2+1)D-18 as a Sequential: N = 0 is the stem, N = 1..4 are layer1..4 (SEVERE-BENCHMARK backbones.py,
# load_rspnet_checkpoint / load_pretext_contrast_checkpoint).
BASE_NETWORK_RENAMES = [(r"(^|\.)base_network\.0\.", r"\1stem."), (r"(^|\.)base_network\.([1-4])\.", r"\1layer\2.")]

# P-HLVC (cvpranon42/phlvc SkeleContrastS3D) video names -> phlvc_video: vid_backbone.base.* (kylemin S3D = the CoCLR
# names) -> trunk.features.*, vid_backbone.fc.0 (the 1x1x1 conv) -> fc.0; vid_fc2.* keeps its name.
PHLVC_RENAMES = [(r"(^|\.)vid_backbone\.base\.", r"\1trunk.base."), (r"(^|\.)vid_backbone\.fc\.", r"\1fc.")] + \
    COCLR_S3D_RENAMES

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
    """{renamed key: key}, each key rewritten by every (pattern, replacement) of `renames` in order."""
    out = {}
    for k in keys:
        new = k
        for pattern, repl in renames:
            new = re.sub(pattern, repl, new)
        out[new] = k
    return out


def _safe_checkpoint_globals():
    """What `weights_only=True` may rebuild besides tensors and containers: numpy arrays, scalars and dtypes (our RNG
    states, the authors' best accuracies) and argparse.Namespace (the authors' saved args). None runs file code."""
    core = getattr(np, "_core", None) or np.core
    dtypes = {type(np.dtype(t)) for t in ("bool", "uint8", "int8", "int16", "int32", "int64", "uint32", "uint64",
                                          "float16", "float32", "float64")}
    return [core.multiarray.scalar, core.multiarray._reconstruct, np.ndarray, np.dtype, argparse.Namespace, *dtypes]


def load_checkpoint_file(path, trust=False, flag="--weights"):
    """torch.load(path) on the CPU with weights_only=True (tensors, containers, numpy values, argparse.Namespace).
    trust=True (--trust-checkpoint) also unpickles arbitrary Python objects, which can execute code in the file.
    A folder, a missing, truncated or non-PyTorch file, or (untrusted) other pickled objects: UserError naming it."""
    if not os.path.isfile(path):
        raise UserError(f"{flag} {path}: expected a checkpoint file, found "
                        f"{'a folder' if os.path.isdir(path) else 'nothing at that path'}")
    for weights_only in (True, False):  # False only with --trust-checkpoint: the user vouches for the file
        try:
            with torch.serialization.safe_globals(_safe_checkpoint_globals()):
                return torch.load(path, map_location="cpu", weights_only=weights_only)
        except Exception as e:
            unsafe = re.search(r"Unsupported global: GLOBAL (\S+)", str(e)) if weights_only else None
            if unsafe is None:
                reason = str(e).strip().splitlines()[-1:] or [type(e).__name__]
                raise UserError(f"{flag} {path}: expected a PyTorch checkpoint (torch.save), found an unreadable file "
                                f"(truncated, corrupted or another format: {type(e).__name__}: {reason[0][:200]})"
                                ) from e
            if not trust:
                raise UserError(f"{flag} {path}: the checkpoint pickles Python objects ({unsafe[1]}) whose loading "
                                f"can execute code from the file; if you trust its source, rerun with "
                                f"--trust-checkpoint") from e


def _describe(src):
    """A checkpoint source for messages: the path, or "state dict"."""
    return str(src) if isinstance(src, (str, os.PathLike)) else "state dict"


def _match_prefix(ckpt_keys, model_keys):
    """The prefix P with P + model_key in the checkpoint for the most model keys; returns (prefix, {model_key:
    ckpt_key}, candidates). Key / momentum / sampler / teacher encoders never count; when several prefixes hold
    every backbone key, the query encoder's wins and `candidates` lists those still tied (more than one: ambiguous)."""
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
        return "", {}, []
    needed = len([k for k in model_keys if not k.endswith("num_batches_tracked")])
    complete = [p for p, n in counts.items() if n >= needed]
    query = [p for p in complete if any(part in CHECKPOINT_QUERY_PREFIXES for part in p.split("."))]
    candidates = sorted(query or complete, key=lambda p: (-counts[p], len(p), p))
    prefix = candidates[0] if candidates else max(counts, key=lambda p: (counts[p], -len(p), p))
    n = len(prefix)
    return prefix, {ck[n:]: ck for ck in ckpt_keys if ck.startswith(prefix) and ck[n:] in model_keys}, candidates


def _tclr_layer4(model, state):
    """TCLR as released (and SEVERE's `load_backbone(init_method='tclr')`) replaces the R(2+1)D layer4[0].conv1[0]
    by a dilated full 3-D conv (256 -> 512, 3x3x3, stride (1, 2, 2), padding (2, 1, 1), dilation (2, 1, 1)) and
    the stride of layer4[0].downsample[0] by (1, 2, 2). If `state` holds that conv and `model` is an R(2+1)D-18,
    rebuild the model's layer4[0] the same way (in place) and return True."""
    layer4 = getattr(model, "layer4", None)
    if not isinstance(model, VideoResNet) or not isinstance(layer4[0].conv1[0], nn.Sequential):
        return False
    if not any(k.endswith("layer4.0.conv1.0.weight") and v.dim() == 5 and tuple(v.shape[2:]) == (3, 3, 3)
               and k[:-len("layer4.0.conv1.0.weight")] + "layer3.0.conv1.0.3.weight" in state  # (2+1)D elsewhere
               for k, v in state.items()):
        return False
    conv = layer4[0].conv1[0][0]
    layer4[0].conv1[0] = nn.Conv3d(conv.in_channels, layer4[0].conv1[1].num_features, (3, 3, 3), stride=(1, 2, 2),
                                   padding=(2, 1, 1), dilation=(2, 1, 1), bias=False)
    layer4[0].downsample[0].stride = (1, 2, 2)
    return True


def backbone_record(model, meta=None):
    """What backbone.pth holds: {"state_dict": backbone_state_dict(model), "meta": {arch, feature_dim, ...}}."""
    meta = dict(meta or {})
    meta.setdefault("arch", getattr(model, "arch", type(model).__name__))
    meta.setdefault("feature_dim", getattr(model, "feature_dim", None))
    return {"state_dict": backbone_state_dict(model), "meta": meta}


# ==================================================================================================== DATA
# build_dataset(name, root, split, ...) -> a Dataset of dicts; the dataset classes; clip sampling (int64
# frame indices, clamped by the readers); transforms on uint8 clips (..., C, T, H, W); video and frame-folder decoding.
# A sample that cannot be read is replaced by the next one and listed in bad_files.txt (--strict-data: raise).
# Decoding opens one reader with one decoder thread per call and clamps indices to the real frame count (decord can
# spin forever past the end, dmlc/decord#373); frame folders follow the CoCLR/ViCC layout (image_/flow_%05d.jpg).


KINETICS_MEAN = (0.43216, 0.394666, 0.37645)  # torchvision video models (Kinetics-400)
KINETICS_STD = (0.22803, 0.22145, 0.216989)
FLOW_BOUND = 20.0  # CoCLR/ViCC/I3D: flow clipped to +-20 px and mapped linearly to 0..255

# FineGym-99 label ranges per event (gym99_categories: VT 0-5, FX 6-40, BB 41-73, UB 74-98); FX-S1 = 6-16
# (leaps-jumps-hops), UB-S1 = 74-88 (circles) as in SEVERE, relabelled from 0.
GYM_SUBSETS = {"gym-vault": range(0, 6), "gym-floor": range(6, 41), "fx-s1": range(6, 17), "ub-s1": range(74, 89)}

# toy-paired split by action, the toy counterpart of thesis Sec. 2.4.2: the teacher learns the "source" half
# (as NTU-120-minus-60), the student is distilled and evaluated on the disjoint "target" half (as NTU RGB+D 60).
TOY_PAIRED_HALVES = {"toy-paired-source": range(0, 6), "toy-paired-target": range(6, 12)}

NTU_BENCHMARKS = {  # NTU RGB+D 60 / 120 protocols: name -> (setup, camera, subject) -> in the training split?
    "ntu60-xsub": lambda setup, camera, subject: subject in NTU_XSUB_TRAIN,
    "ntu60-xview": lambda setup, camera, subject: camera in (2, 3),  # 37,920 / 18,960
    "ntu120-xsub": lambda setup, camera, subject: subject in NTU120_XSUB_TRAIN,
    "ntu120-xset": lambda setup, camera, subject: setup % 2 == 0,
}
NTU_PAIRED_SETS = {  # name -> (actions kept (1-based), split rule)
    "ntu60-paired-xview": (range(1, 61), NTU_BENCHMARKS["ntu60-xview"]),
    "ntu60-paired-xsub": (range(1, 61), NTU_BENCHMARKS["ntu60-xsub"]),
    # thesis Sec. 2.4.2 NTU-120-minus-60: the actions NTU RGB+D 60 lacks (A061-A120), the teacher's source set;
    # its train/val split is not stated: we use NTU-120's cross-subject split
    "ntu120-minus-60": (range(61, 121), NTU_BENCHMARKS["ntu120-xsub"]),
}
# PKU-MMD (Part I) with RGB, depth, skeletons and flow: name -> split file (thesis Sec. 2.4.2: cross-subject, 942 /
# 132 videos; Table 2.6 detects actions in these)
PKU_PAIRED_SETS = {"pku1-paired": "cross-subject.txt", "pku1-paired-xview": "cross-view.txt"}

DATASET_NAMES = ("toy-motion", "toy-ucfrep", "toy-skeleton", "toy-paired", "k400", "k600", "k700", "minik",
                 "kinetics", "ucf101", "hmdb51", "ssv2", "gym99", "gym288", *GYM_SUBSETS, "diving48", "charades",
                 "ucfrep", "videofolder", "videolist", "ntu60-xsub", "ntu60-xview", "ntu120-xsub", "ntu120-xset",
                 "pku1", "pku2", "pku1-xview", "pku2-xview", "kinetics-skeleton", "paired", "toy-motion-flow",
                 "k400-pose", "toy-paired-source", "toy-paired-target", "ntu60-paired-xview", "ntu60-paired-xsub",
                 "ntu120-minus-60", *PKU_PAIRED_SETS, "sims4action", "toyota-smarthome", "toyota-smarthome-cs",
                 "toyota-smarthome-cv1", "toyota-smarthome-cv2")


def build_dataset(name, root=None, split="train", **kwargs):
    """`_build_dataset` with the user's mistakes as one-line UserErrors: an unknown name (the valid ones listed),
    a missing data root, annotation or list file (the path named)."""
    check_dataset_name(name)
    root = root or os.path.join("data", name)
    if not os.path.exists(root) and not name.startswith("toy"):
        raise UserError(f"--data {name}: expected the dataset under --data-root {root}, found no such folder "
                        f"(see README 'Datasets' for its layout)")
    try:
        return _build_dataset(name, root, split, **kwargs)
    except (FileNotFoundError, VideoReadError) as e:
        found = f"{e.filename}: missing" if isinstance(e, FileNotFoundError) and e.filename else str(e)
        raise UserError(f"--data {name} (--data-root {root}): {found}") from e


def check_dataset_name(name):
    """UserError unless `name` is a dataset build_dataset knows (scripts call it before building a model)."""
    if name not in DATASET_NAMES:
        raise UserError(f"--data: expected one of {', '.join(DATASET_NAMES)}; found {name!r}")


def _build_dataset(name, root=None, split="train", *, clip_len=16, frame_strides=(1,), num_clips=1,
                   sampling="random", transform=None, modalities=None, fraction=1.0, per_class=None, seed=0,
                   decoder="auto", strict=False, bad_files_path=None, **dataset_options):
    """The one entry point (see the README "Datasets" section for every layout).
    transform(item: dict) -> dict gets the modality tensors of one sample ("video" uint8 (C, T, H, W), "flow",
    "skeleton", ...) before "label", "index" and "frame_indices" are added. dataset_options: fold (UCF101, HMDB51),
    ext (SSv2), list_file (videolist), size, jitter, step, encoded (VideoDataset), check_exists (drop listed but missing
    videos, default True), pre_normalize (NTU raw), toy_seed (toy sets), pose_root (k400-pose; default
    root/kinetics-skeleton), pose_cache (VideoPoseDataset's .npy cache; default root/pose_cache, "" = none),
    min_pose_frames (k400-pose: default clip_len; others 0), class_map (toyota-smarthome: "sims4action" or
    "phlvc-code")."""
    root = root or os.path.join("data", "toy-paired" if name in TOY_PAIRED_HALVES else name)
    skel_kwargs = dict(transform=transform, strict=strict, bad_files_path=bad_files_path)
    paired_kwargs = dict(clip_len=clip_len, frame_strides=frame_strides, sampling=sampling, modalities=modalities,
                         decoder=decoder, jitter=dataset_options.get("jitter", False), **skel_kwargs)
    if name == "toy-skeleton":
        make_toy_skeleton(root, seed=dataset_options.get("toy_seed", 0))
        ds = _skeleton_set(root, split, None, class_names=TOY_SKELETON_ACTIONS, **skel_kwargs)
    elif name in NTU_PAIRED_SETS:
        ds = NTUPairedDataset(root, split, name, **paired_kwargs)
    elif name in PKU_PAIRED_SETS:
        ds = PKUPairedDataset(root, split, name, **paired_kwargs)
    elif name.startswith("ntu"):
        if name not in NTU_BENCHMARKS:
            raise ValueError(f"unknown NTU benchmark {name!r}")
        raw = os.path.join(root, "nturgb+d_skeletons")
        convert = (lambda: convert_ntu_skeletons(raw, root, name, pre_normalize=dataset_options.get(
            "pre_normalize", False))) if os.path.isdir(raw) else None
        ds = _skeleton_set(root, split, convert, **skel_kwargs)
    elif name.startswith("pku"):
        bench = "xview" if name.endswith("xview") else "xsub"
        out = os.path.join(root, f"processed-{bench}")
        ds = _skeleton_set(out, split, lambda: convert_pku_mmd(root, out, bench), **skel_kwargs)
    elif name == "kinetics-skeleton":
        ds = KineticsSkeletonDataset(root, split, **skel_kwargs)
    elif name == "k400-pose":
        samples, classes = parse_kinetics(root, split)
        folder = os.path.join(dataset_options.get("pose_root") or os.path.join(root, "kinetics-skeleton"),
                              f"kinetics_{_split_name(split)}")  # <youtube_id>.json for <youtube_id>_<start>_<end>.mp4
        ds = VideoPoseDataset(samples, classes, lambda p: os.path.join(folder, os.path.basename(p).rsplit("_", 2)[0]
                                                                       + ".json"), f"k400-pose {split}",
                              clip_len=clip_len, decoder=decoder, num_clips=num_clips, sampling=sampling,
                              cache_dir=dataset_options.get("pose_cache", os.path.join(root, "pose_cache")) or None,
                              min_pose_frames=dataset_options.get("min_pose_frames", clip_len),
                              reference=" (supp.: 144,085)" if split == "train" else "", **skel_kwargs)
    elif name.startswith(("sims4action", "toyota-smarthome")) and "pose2d" in (modalities or ()):  # AlphaPose
        samples, classes = _parse_video_set(name, root, split, dataset_options)
        ds = VideoPoseDataset(samples, classes, lambda p: os.path.join(root, "pose2d", os.path.splitext(
            os.path.basename(p))[0] + ".json"), f"{name} {split}", clip_len=clip_len, decoder=decoder,
                              num_clips=num_clips, sampling=sampling,
                              cache_dir=dataset_options.get("pose_cache", os.path.join(root, "pose_cache")) or None,
                              min_pose_frames=dataset_options.get("min_pose_frames", 0), **skel_kwargs)
    elif name in ("toy-paired", "paired") + tuple(TOY_PAIRED_HALVES):
        if name.startswith("toy-paired"):
            make_toy_paired(root, seed=dataset_options.get("toy_seed", 0))
        ds = PairedDataset(root, split, classes=TOY_PAIRED_HALVES.get(name), **paired_kwargs)
    else:
        samples, classes = _parse_video_set(name, root, split, dataset_options)
        if dataset_options.get("check_exists", True):
            missing = [p for p, _ in samples if not os.path.exists(p)]
            if missing:
                warnings.warn(f"{name}: {len(missing)} of {len(samples)} listed {split} videos are missing "
                              f"(first: {missing[0]}); they are left out")
                if strict:
                    raise VideoReadError(f"{missing[0]}: file not found (and {len(missing) - 1} more; --strict-data)")
                if bad_files_path:
                    append_bad_files(bad_files_path, [(p, "file not found") for p in missing])
                missing = set(missing)
                samples = [s for s in samples if s[0] not in missing]
        if fraction < 1.0 or per_class is not None:
            labels = [y if np.ndim(y) else (y if isinstance(y, int) else 0) for _, y in samples]
            samples = [samples[i] for i in stratified_subset(labels, fraction, per_class, seed)]
        return VideoDataset(samples, classes, clip_len=clip_len, frame_strides=frame_strides, num_clips=num_clips,
                            sampling=sampling, transform=transform, modalities=modalities, decoder=decoder,
                            strict=strict, bad_files_path=bad_files_path, size=dataset_options.get("size"),
                            jitter=dataset_options.get("jitter", False), step=dataset_options.get("step"),
                            encoded=dataset_options.get("encoded", False))
    if fraction < 1.0 or per_class is not None:
        keep = stratified_subset(sample_labels(ds), fraction, per_class, seed)
        if isinstance(ds, NTUPairedDataset):
            ds.names, ds.labels, ds._indices = [ds.names[i] for i in keep], ds.labels[keep], np.arange(len(keep))
        elif isinstance(ds, (SkeletonDataset, PairedDataset)):
            inner = ds.skeletons if isinstance(ds, PairedDataset) else ds
            inner.indices = inner.indices[keep]
        else:
            ds.samples = [ds.samples[i] for i in keep]
    return ds


def _parse_video_set(name, root, split, options):
    """The parser of video dataset `name` -> ([(path, label)], class names); toy sets are written first."""
    if name == "toy-motion":
        make_toy_motion(root, seed=options.get("toy_seed", 0))
        return parse_videofolder(root, split)
    if name == "toy-motion-flow":
        make_toy_motion_flow(root, seed=options.get("toy_seed", 0))
        return parse_videofolder(root, split)
    if name in ("k400", "k600", "k700", "minik", "kinetics"):
        return parse_kinetics(root, split)
    if name == "ucf101":
        return parse_ucf101(root, split, options.get("fold", 1))
    if name == "hmdb51":
        return parse_hmdb51(root, split, options.get("fold", 1))
    if name == "ssv2":
        return parse_ssv2(root, split, options.get("ext", "webm"))
    if name in ("gym99", "gym288") or name in GYM_SUBSETS:
        return parse_finegym(root, split, name)
    if name == "diving48":
        return parse_diving48(root, split)
    if name == "charades":
        return parse_charades(root, split)
    if name == "toy-ucfrep":
        make_toy_ucfrep(root, seed=options.get("toy_seed", 0))
        return parse_ucfrep(root, split)
    if name == "ucfrep":
        return parse_ucfrep(root, split)
    if name == "videofolder":
        return parse_videofolder(root, split)
    if name == "videolist":
        return parse_videolist(root, split, options.get("list_file"))
    if name == "sims4action":
        return parse_sims4action(root, split)
    if name.startswith("toyota-smarthome"):  # -cs, -cv1, -cv2: Toyota's own protocols
        return parse_toyota_smarthome(root, split, options.get("class_map", "sims4action"),
                                      name[len("toyota-smarthome-"):] or None)
    raise ValueError(f"--data: unknown dataset {name!r}")


def _skeleton_set(root, split, convert, **kwargs):
    """SkeletonDataset of root/{split}_data_joint.npy, _label.pkl, _num_frame.npy; convert() first if missing."""
    split = _split_name(split)
    data = os.path.join(root, f"{split}_data_joint.npy")
    if not os.path.exists(data) and convert is not None:
        convert()
    return SkeletonDataset(data, os.path.join(root, f"{split}_label.pkl"),
                           os.path.join(root, f"{split}_num_frame.npy"), **kwargs)


def sample_labels(ds):
    """The labels of a dataset's samples in order, nothing decoded: (N,) class indices, or (N, C) multi-hot
    (Charades). Skeleton / paired sets keep .labels and .indices; video sets (path, label, ...) samples."""
    if hasattr(ds, "indices"):
        return np.asarray(ds.labels)[np.asarray(ds.indices)]
    return np.stack([np.asarray(x[1]) for x in ds.samples]) if ds.samples else np.zeros(0, dtype=np.int64)


def stratified_subset(labels, fraction=1.0, per_class=None, seed=0):
    """Indices of a class-stratified subset: per class round(fraction * n_c) (at least 1) samples, or a quota
    of per_class samples (SEVERE's "1000 examples": per_class = ceil(1000 / C)). Sorted, deterministic by seed."""
    labels = np.asarray(labels)
    if labels.ndim > 1:  # multi-label: stratify by the first positive class
        labels = labels.argmax(1)
    rng = np.random.default_rng(seed)
    keep = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        k = len(idx) if per_class is None else min(len(idx), int(per_class))
        if fraction < 1.0:
            k = min(k, max(1, int(round(fraction * len(idx)))))
        keep.append(rng.permutation(idx)[:k])
    return np.sort(np.concatenate(keep)) if keep else np.zeros(0, dtype=np.int64)


class VideoDataset(torch.utils.data.Dataset):
    """(path, label) samples -> {"video": uint8 (C, T, H, W) or (K, C, T, H, W), "label", "index"}.

    sampling: random (num_clips independent clips, stride drawn from frame_strides, optional temporal jitter),
    uniform (num_clips evenly spaced), sliding / consecutive (all windows; K varies per video).
    modalities: ("video",), ("flow",) or ("video", "flow") for frame folders with flow_%05d.jpg next to the
    images: "flow" float32 (2, T, H, W) in pixels at the same indices as "video".
    encoded: JPEG frames are read, not decoded (decode_jpeg_clips decodes a batch on the device): no "video" /
    "flow" keys but "jpeg" = {"files": [uint8 (bytes,)] each distinct frame's file, "video" / "flow": int64 (T,) or
    (K, T) the frames' positions in files, "video_size" / "flow_size": int64 (2,) H, W from the first frame's
    header}; RGB must then come from frame folders. A corrupt frame is not noticed here: decoding it fails the batch."""

    def __init__(self, samples, class_names, clip_len=16, frame_strides=(1,), num_clips=1, sampling="random",
                 transform=None, modalities=None, decoder="auto", strict=False, bad_files_path=None, size=None,
                 jitter=False, step=None, encoded=False):
        if encoded and size is not None:
            raise ValueError("VideoDataset: encoded=True keeps the frames' size (the device crops and resizes)")
        video_file = next((p for p, _ in samples if not os.path.isdir(p)), None) if encoded else None
        if video_file is not None and "video" in (modalities or ("video",)):
            raise UserError(f"{video_file}: expected a frame folder (image_%05d.jpg) to decode on the device, found "
                            f"a video file (videos are decoded in the loader workers: leave out --decode-on-device)")
        self.encoded = encoded
        self.samples, self.class_names = list(samples), list(class_names)
        self.num_classes = len(self.class_names)
        self.clip_len, self.frame_strides, self.num_clips = clip_len, frame_strides, num_clips
        self.sampling, self.transform, self.decoder, self.size = sampling, transform, decoder, size
        self.modalities = tuple(modalities or ("video",))
        self.jitter, self.step = jitter, step
        self.strict, self.bad_files_path, self.bad_files = strict, bad_files_path, {}

    def __len__(self):
        return len(self.samples)

    def sample_path(self, i):
        return self.samples[i][0]

    def _indices(self, n, store):
        store["indices"] = sample_clip_indices(n, self.clip_len, self.frame_strides, self.num_clips, self.sampling,
                                               _seed_rng(), self.jitter, self.step)
        return store["indices"].reshape(-1)

    def _load(self, i):
        path, label = self.samples[i]
        item, store = {}, {}
        flow_dir = _flow_folder(path)
        single = self.sampling in SINGLE_CLIP_SAMPLINGS and self.num_clips == 1
        jpeg = {"files": []}
        if self.encoded:
            item["jpeg"] = jpeg
        if "video" in self.modalities:
            # with flow (one frame fewer, CoCLR layout) the clip is drawn from the frames both modalities have
            n_flow = len(_frame_files(flow_dir, "flow")) if "flow" in self.modalities else None
            index_fn = lambda n: self._indices(min(n, n_flow or n), store)  # noqa: E731
            if self.encoded:
                _read_jpeg_files(path, "image", index_fn, jpeg, "video", self.clip_len, single)
            else:
                frames = _read_frames(path, index_fn, self.decoder, self.size)
                k = store["indices"].shape[0]
                video = torch.from_numpy(frames).view(k, self.clip_len, *frames.shape[1:]).permute(0, 4, 1, 2, 3)
                item["video"] = video[0] if single else video
        if "flow" in self.modalities:
            if "indices" not in store:
                self._indices(len(_frame_files(flow_dir, "flow")), store)
            if self.encoded:
                _read_jpeg_files(flow_dir, "flow", lambda n: store["indices"].reshape(-1), jpeg, "flow",
                                 self.clip_len, single)
            else:
                flow = read_flow_frames(flow_dir, store["indices"].reshape(-1), self.size)
                k = store["indices"].shape[0]
                flow = torch.from_numpy(flow).view(k, self.clip_len, *flow.shape[1:]).permute(0, 4, 1, 2, 3)
                item["flow"] = flow[0] if single else flow
        if self.transform is not None:
            item = self.transform(item)
        item["label"] = torch.as_tensor(label, dtype=torch.float32 if np.ndim(label) or isinstance(label, float)
                                        else torch.int64)
        item["index"] = torch.tensor(i, dtype=torch.int64)
        item["frame_indices"] = torch.from_numpy(store["indices"][0] if single else store["indices"])
        return item

    def __getitem__(self, index):
        return _load_or_replace(self, index, self._load)


class SkeletonDataset(torch.utils.data.Dataset):
    """NTU layout: data (N, 3, T, V, M) float32 (memory-mapped), labels, optional valid lengths ->
    {"skeleton": float32 (C, T, V, M), "label", "index", "length"}; the whole sequence, zero-padded as stored."""

    def __init__(self, data_path, label_path, num_frame_path=None, class_names=None, indices=None,
                 transform=None, strict=False, bad_files_path=None):
        import pickle
        self.data_path, self._data = _need(data_path, "float32 array (N, 3, T, V, M)"), None
        with open(_need(label_path, "pickle of (sample_names, labels)"), "rb") as f:
            self.sample_names, labels = pickle.load(f)
        self.labels = np.asarray(labels, dtype=np.int64)
        if self.data.ndim != 5 or len(self.data) != len(self.labels):
            raise VideoReadError(f"{data_path}: expected (N, 3, T, V, M) with N = {len(self.labels)} labels from "
                                 f"{label_path}, got shape {self.data.shape}")
        if num_frame_path and os.path.exists(num_frame_path):
            self.lengths = np.load(num_frame_path).astype(np.int64)
        else:  # valid length = last frame with any non-zero coordinate
            self.lengths = None
        self.indices = np.arange(len(self.labels)) if indices is None else np.asarray(indices)
        self.num_classes = int(self.labels.max()) + 1 if class_names is None else len(class_names)
        self.class_names = list(class_names) if class_names is not None else [str(i) for i in range(self.num_classes)]
        self.transform, self.strict, self.bad_files_path, self.bad_files = transform, strict, bad_files_path, {}

    @property
    def data(self):
        """The memory map, opened lazily so that DataLoader workers re-open it instead of receiving a copy."""
        if self._data is None:
            try:
                self._data = np.load(_need(self.data_path, "float32 array (N, 3, T, V, M)"), mmap_mode="r")
            except ValueError as e:
                raise VideoReadError(f"{self.data_path}: not a numpy array ({e})") from None
        return self._data

    def __getstate__(self):
        return {**self.__dict__, "_data": None}

    def __len__(self):
        return len(self.indices)

    def sample_path(self, i):
        return str(self.sample_names[self.indices[i]])

    def _load(self, i):
        j = self.indices[i]
        x = np.array(self.data[j], dtype=np.float32)  # (C, T, V, M), copied out of the memory map
        if not np.isfinite(x).all():
            raise ValueError("non-finite coordinates")
        length = int(self.lengths[j]) if self.lengths is not None else _last_nonzero_frame(x)
        # "length" (valid frames; the rest is zero padding) is the one key every consumer reads; the transform
        # sees it too (evaluate.py crops within it).
        item = {"skeleton": torch.from_numpy(x), "length": torch.tensor(length, dtype=torch.int64)}
        if self.transform is not None:
            item = self.transform(item)
        item.update(label=torch.tensor(self.labels[j]), index=torch.tensor(i, dtype=torch.int64))
        return item

    def __getitem__(self, index):
        return _load_or_replace(self, index, self._load)


class KineticsSkeletonDataset(torch.utils.data.Dataset):
    """root/kinetics_{train,val}/<id>.json + root/kinetics_{train,val}_label.json ({id: {has_skeleton, label,
    label_index}}) -> {"skeleton": (3, 300, 18, 2), "length", "label", "index"}; clips without skeleton are left
    out."""

    def __init__(self, root, split, transform=None, strict=False, bad_files_path=None, max_frames=300):
        split = _split_name(split)
        with open(_need(os.path.join(root, f"kinetics_{split}_label.json"), "{id: {label_index, ...}}")) as f:
            info = json.load(f)
        ids = sorted(k for k, v in info.items() if v.get("has_skeleton", True))
        self.samples = [(os.path.join(root, f"kinetics_{split}", f"{k}.json"), int(info[k]["label_index"]))
                        for k in ids]
        names = {int(v["label_index"]): v.get("label", str(v["label_index"])) for v in info.values()}
        self.num_classes = max(names) + 1 if names else 0
        self.class_names = [names.get(i, str(i)) for i in range(self.num_classes)]
        self.transform, self.max_frames = transform, max_frames
        self.strict, self.bad_files_path, self.bad_files = strict, bad_files_path, {}

    def __len__(self):
        return len(self.samples)

    def sample_path(self, i):
        return self.samples[i][0]

    def _load(self, i):
        path, label = self.samples[i]
        x, _ = read_kinetics_skeleton_json(path, self.max_frames)
        item = {"skeleton": torch.from_numpy(x), "length": torch.tensor(_last_nonzero_frame(x), dtype=torch.int64)}
        if self.transform is not None:
            item = self.transform(item)
        item.update(label=torch.tensor(label), index=torch.tensor(i, dtype=torch.int64))
        return item

    def __getitem__(self, index):
        return _load_or_replace(self, index, self._load)


class PairedDataset(torch.utils.data.Dataset):
    """Temporally aligned modalities of one sample (layout of make_toy_paired): one clip of indices is drawn
    from the valid length and every modality is read at exactly those frames. Items: "video" uint8 (C, T, H, W),
    "depth" float32 (1, T, H, W) metres, "skeleton" float32 (3, T, 25, M), "pose2d" float32 (3, T, 18, M)
    (x - 0.5, y - 0.5, score), "flow" float32 (2, T, H, W) pixels, "label", "index", "frame_indices"."""

    MODALITIES = ("video", "depth", "skeleton", "pose2d", "flow")

    def __init__(self, root, split, clip_len=16, frame_strides=(1,), sampling="random", transform=None,
                 modalities=None, decoder="auto", strict=False, bad_files_path=None, jitter=False, classes=None):
        split = _split_name(split)
        self.root, self.split = root, split
        self.skeletons = SkeletonDataset(os.path.join(root, "skeleton", f"{split}_data_joint.npy"),
                                         os.path.join(root, "skeleton", f"{split}_label.pkl"),
                                         os.path.join(root, "skeleton", f"{split}_num_frame.npy"))
        self.modalities = tuple(modalities or self.MODALITIES)
        unknown = set(self.modalities) - set(self.MODALITIES)
        if unknown:
            raise ValueError(f"modalities: unknown {sorted(unknown)}, expected a subset of {self.MODALITIES}")
        self.clip_len, self.frame_strides, self.sampling, self.jitter = clip_len, frame_strides, sampling, jitter
        self.transform, self.decoder = transform, decoder
        self.labels = self.skeletons.labels
        self.num_classes = max(len(TOY_SKELETON_ACTIONS), int(self.labels.max()) + 1)
        self.class_names = (TOY_SKELETON_ACTIONS + [str(i) for i in range(len(TOY_SKELETON_ACTIONS),
                                                                          self.num_classes)])[:self.num_classes]
        if classes is not None:  # keep these original classes only, relabelled 0..len(classes)-1 in that order
            classes = [int(c) for c in classes]
            remap = np.full(self.num_classes, -1, dtype=np.int64)
            remap[classes] = np.arange(len(classes))
            self.labels = remap[self.labels]
            self.skeletons.indices = self.skeletons.indices[self.labels[self.skeletons.indices] >= 0]
            self.class_names = [self.class_names[c] for c in classes]
            self.num_classes = len(classes)
        self.strict, self.bad_files_path, self.bad_files = strict, bad_files_path, {}

    @property
    def indices(self):
        """Positions of this set's samples in the stored arrays (labels[indices] are their labels)."""
        return self.skeletons.indices

    def length(self, i):
        """Valid frames of sample i (the modalities share one time axis)."""
        return int(self.skeletons.lengths[self.skeletons.indices[i]])

    def __len__(self):
        return len(self.skeletons)

    def sample_path(self, i):
        return os.path.join(self.root, "rgb", f"{self.skeletons.sample_names[self.skeletons.indices[i]]}.mp4")

    def _load(self, i):
        length = self.length(i)
        idx = np.minimum(sample_clip_indices(length, self.clip_len, self.frame_strides, 1, self.sampling,
                                             _seed_rng(), self.jitter)[0], length - 1)
        item = self.read(i, idx)
        if self.transform is not None:
            item = self.transform(item)
        item.update(label=torch.tensor(self.labels[self.indices[i]]), index=torch.tensor(i, dtype=torch.int64),
                    frame_indices=torch.from_numpy(idx))
        return item

    def read(self, i, idx, modalities=None):
        """The modalities (default: the dataset's) of sample i at frame indices idx (any shape, clamped), no
        transform: {"video": uint8 (C, T, H, W), "depth": (1, T, H, W) metres, ...} (T = idx.size)."""
        modalities = self.modalities if modalities is None else modalities
        j = int(self.skeletons.indices[i])
        name, length = self.skeletons.sample_names[j], int(self.skeletons.lengths[j])
        idx = np.minimum(np.asarray(idx).reshape(-1), length - 1)
        item = {}
        if "video" in modalities:
            frames = read_video_frames(os.path.join(self.root, "rgb", f"{name}.mp4"), idx, self.decoder)
            item["video"] = torch.from_numpy(frames).permute(3, 0, 1, 2)
        if "depth" in modalities:
            item["depth"] = torch.from_numpy(read_depth_frames(os.path.join(self.root, "depth", name), idx))[None]
        if "skeleton" in modalities:
            item["skeleton"] = torch.from_numpy(np.array(self.skeletons.data[j][:, idx], dtype=np.float32))
        if "pose2d" in modalities:
            pose, _ = read_kinetics_skeleton_json(
                os.path.join(self.root, "pose2d", f"kinetics_{self.split}", f"{name}.json"), max(length, 1))
            item["pose2d"] = torch.from_numpy(np.ascontiguousarray(pose[:, idx]))
        if "flow" in modalities:
            flow = read_flow_frames(os.path.join(self.root, "flow", name), idx)
            item["flow"] = torch.from_numpy(flow).permute(3, 0, 1, 2)
        return item

    def __getitem__(self, index):
        return _load_or_replace(self, index, self._load)


def _seed_rng():
    """numpy Generator from torch's RNG: distinct and reproducible per DataLoader worker (torch seeds them)."""
    return np.random.default_rng(int(torch.randint(0, 2 ** 62, ())))


def _report_bad(dataset, path, reason):
    """An unreadable sample: raise with --strict-data, else warn once and append it to bad_files.txt."""
    if dataset.strict:
        raise VideoReadError(f"{path}: {reason} (--strict-data)")
    if path not in dataset.bad_files:
        dataset.bad_files[path] = reason
        warnings.warn(f"skipping unreadable sample {path}: {reason}", stacklevel=3)
        if dataset.bad_files_path:
            append_bad_files(dataset.bad_files_path, [(path, reason)])


def append_bad_files(bad_files_path, entries):
    """Append (path, reason) lines to bad_files.txt, skipping paths already listed (workers restart every epoch)."""
    listed = set()
    if os.path.exists(bad_files_path):
        with open(bad_files_path) as f:
            listed = {line.split("\t", 1)[0] for line in f}
    with open(bad_files_path, "a") as f:
        f.writelines(f"{p}\t{r}\n" for p, r in entries if p not in listed)


def _load_or_replace(dataset, index, load):
    """load(i) for index, index + 1, ... until one reads (deterministic replacement); at most 20 tries."""
    n = len(dataset)
    for attempt in range(min(n, 20)):
        i = (index + attempt) % n
        try:
            return load(i)
        except (VideoReadError, OSError, ValueError, EOFError) as e:
            path = dataset.sample_path(i)
            _report_bad(dataset, path, str(e).replace(f"{path}: ", "").replace("\n", " ").replace("\t", " "))
    raise VideoReadError(f"{dataset.sample_path(index)}: this and the next {min(n, 20) - 1} samples are unreadable")


def _last_nonzero_frame(x):
    """x (C, T, V, M) -> valid length: 1 + the last frame with any non-zero coordinate (0 if none)."""
    nonzero = np.flatnonzero(np.abs(x).sum(axis=(0, 2, 3)) > 0)
    return int(nonzero[-1]) + 1 if len(nonzero) else 0


DEPTH_MAX = 4.5  # metres: the far end of the Kinect v2 depth range (NTU RGB+D, PKU-MMD)


def depth_to_input(depth, channels=3):
    """Depth in metres (..., 1, T, H, W) -> network input in [-1, 1] (0 m = no depth -> -1, DEPTH_MAX -> 1),
    replicated to `channels` (thesis Sec. 2.4.3: the depth student reads 3 x 16 x 112 x 112)."""
    x = (depth.float() / DEPTH_MAX).clamp(0, 1) * 2 - 1
    return x if channels == 1 else x.expand(*x.shape[:-4], channels, *x.shape[-3:])


def flow_to_input(flow):
    """Optical flow in pixels (..., 2, T, H, W) -> network input in [-1, 1] (clipped at +-FLOW_BOUND, as the
    CoCLR / I3D flow JPEGs store it)."""
    return (flow.float() / FLOW_BOUND).clamp(-1, 1)


class NTUPairedDataset(PairedDataset):
    """NTU RGB+D in its official layout, as PairedDataset (same items, `length`, `read`):
        nturgb+d_rgb/<name>_rgb.avi                       1920x1080 RGB
        nturgb+d_depth_masked/<name>/MDepth-%08d.png      512x424 masked depth, mm
        nturgb+d_skeletons/<name>.skeleton                3D skeletons
        flow/<name>/flow_%05d.jpg                         optional TV-L1 flow of the RGB (CoCLR layout)
    Samples: the names of the kept actions with a depth folder (when depth is read; else an RGB video, else a flow
    folder), labels relabelled from 0. The modalities differ in frame count: that first modality is the time axis,
    frame t of a modality with n frames is floor(t * n / length) (aligned by time)."""

    def __init__(self, root, split, name="ntu60-paired-xview", clip_len=16, frame_strides=(1,), sampling="random",
                 transform=None, modalities=None, decoder="auto", strict=False, bad_files_path=None, jitter=False):
        actions, is_train = NTU_PAIRED_SETS[name]
        split = _split_name(split)
        self.root, self.split, self.decoder = root, split, decoder
        self.modalities = tuple(modalities or ("video", "depth", "skeleton"))
        folders = {"depth": "nturgb+d_depth_masked", "video": "nturgb+d_rgb", "flow": "flow"}
        candidates = [m for m in ("depth", "video", "flow") if m in self.modalities or m == "video"]
        self.time_axis = next((m for m in candidates if os.path.isdir(os.path.join(root, folders[m]))), "video")
        folder = _need(os.path.join(root, folders[self.time_axis]), "nturgb+d_rgb/ or nturgb+d_depth_masked/")
        pattern = re.compile(r"S(\d{3})C(\d{3})P(\d{3})R(\d{3})A(\d{3})")
        names, labels = [], []
        for entry in sorted(os.listdir(folder)):
            match = pattern.match(entry)
            if not match:
                continue
            setup, camera, subject, _, action = (int(g) for g in match.groups())
            if action in actions and is_train(setup, camera, subject) == (split == "train"):
                names.append(match.group(0))
                labels.append(action - actions[0])
        if not names:
            raise VideoReadError(f"{folder}: no {split} samples of {name} (expected S001C001P001R001A001 names)")
        self.names, self.labels = names, np.asarray(labels, dtype=np.int64)
        self._indices = np.arange(len(names))
        self.num_classes, self.class_names = len(actions), [f"A{a:03d}" for a in actions]
        self.clip_len, self.frame_strides, self.sampling, self.jitter = clip_len, frame_strides, sampling, jitter
        self.transform, self.strict, self.bad_files_path, self.bad_files = transform, strict, bad_files_path, {}
        self._lengths = {}

    @property
    def indices(self):
        return self._indices

    def __len__(self):
        return len(self.names)

    def _path(self, i, modality):
        name = self.names[i]
        return {"video": os.path.join(self.root, "nturgb+d_rgb", f"{name}_rgb.avi"),
                "depth": os.path.join(self.root, "nturgb+d_depth_masked", name),
                "skeleton": os.path.join(self.root, "nturgb+d_skeletons", f"{name}.skeleton"),
                "flow": os.path.join(self.root, "flow", name)}[modality]

    def sample_path(self, i):
        return self._path(i, self.time_axis)

    def length(self, i):
        if i not in self._lengths:
            path = self._path(i, self.time_axis)
            self._lengths[i] = (len([n for n in os.listdir(path) if n.endswith(".png")]) if self.time_axis == "depth"
                                else len(_frame_files(path, "flow")) if self.time_axis == "flow"
                                else count_frames(path, self.decoder))
        return self._lengths[i]

    def read(self, i, idx, modalities=None):
        length, idx = self.length(i), np.asarray(idx).reshape(-1)

        def by_time(n):  # frame t of the time axis -> frame of a modality with n frames
            return np.minimum(np.minimum(idx, length - 1) * n // length, n - 1)
        item = {}
        for modality in self.modalities if modalities is None else modalities:
            path = self._path(i, modality)
            if modality == "video":
                x = torch.from_numpy(_read_frames(path, by_time, self.decoder)).permute(3, 0, 1, 2)  # (3, T, H, W)
            elif modality == "depth":
                n = len([f for f in os.listdir(path) if f.endswith(".png")]) if os.path.isdir(path) else 0
                x = torch.from_numpy(read_depth_frames(path, by_time(max(n, 1))))[None]  # (1, T, H, W) metres
            elif modality == "skeleton":
                skeleton = read_ntu_skeleton(path)  # (3, n, 25, 2)
                x = torch.from_numpy(np.ascontiguousarray(skeleton[:, by_time(skeleton.shape[1])]))
            elif modality == "flow":
                x = torch.from_numpy(uint8_to_flow(_read_jpegs(path, "flow", by_time, None))).permute(3, 0, 1, 2)
            else:
                raise ValueError(f"modalities: NTU paired sets have video, depth, skeleton, flow; got {modality!r}")
            item[modality] = x
        return item


class PKUPairedDataset(NTUPairedDataset):
    """PKU-MMD Part I in its official layout, one sample per labelled action instance (items as PairedDataset):
        RGB_VIDEO/<seq>.avi (or <seq>_color.avi)      1920x1080 RGB
        DEPTH_VIDEO/<seq>/*.png (16-bit mm) or <seq>.avi (or <seq>_depth.avi: 8-bit grey read as 255 = DEPTH_MAX)
        PKU_Skeleton_Renew/<seq>.txt                  150 floats per frame (2 bodies x 25 joints x xyz)
        Train_Label_PKU_final/<seq>.txt               'label,start,end,confidence' (1-based labels, frames)
        Split/cross-subject.txt | cross-view.txt      'Training videos:' list, 'Validation videos:' list
        flow/<seq>/flow_%05d.jpg                      optional TV-L1 flow of the RGB (CoCLR layout)
    The label frames count the skeleton stream (the Kinect's), which is the time axis (depth frames when a sequence
    has no skeleton file, else RGB); frame t of a modality with n frames is floor(t * n / frames of the time axis),
    so RGB and depth of different frame counts are aligned by time. Instance i is the time-axis frames [start, end];
    `sequences` and `segments(seq)` give the untrimmed videos and their (label, start, end) rows (detection)."""

    FOLDERS = {"video": ("RGB_VIDEO", "_color"), "depth": ("DEPTH_VIDEO", "_depth"), "flow": ("flow", "")}

    def __init__(self, root, split, name="pku1-paired", clip_len=16, frame_strides=(1,), sampling="random",
                 transform=None, modalities=None, decoder="auto", strict=False, bad_files_path=None, jitter=False):
        split = _split_name(split)
        self.root, self.split, self.decoder = root, split, decoder
        self.modalities = tuple(modalities or ("video", "depth", "skeleton"))
        self.skeleton_dir, self.label_dir, split_file, lists = pku_layout(root, PKU_PAIRED_SETS[name])
        self.sequences = lists[split]
        if not self.sequences:
            raise VideoReadError(f"{split_file}: no {split} videos listed")
        self._segments, names, labels, self.instances = {}, [], [], {}
        for seq in self.sequences:
            for label, start, end in self.segments(seq):
                names.append(f"{seq}_{start}_{end}")
                labels.append(label)
                self.instances[names[-1]] = (seq, start, end)
        self.names, self.labels, self._indices = names, np.asarray(labels, dtype=np.int64), np.arange(len(names))
        self.num_classes, self.class_names = 51, [f"A{a:02d}" for a in range(1, 52)]
        self.clip_len, self.frame_strides, self.sampling, self.jitter = clip_len, frame_strides, sampling, jitter
        self.transform, self.strict, self.bad_files_path, self.bad_files = transform, strict, bad_files_path, {}
        self._frames = {}

    def segments(self, seq):
        """(K, 3) int64 rows (label from 0, start, end) of the labelled actions of sequence `seq`, frames inclusive."""
        if seq not in self._segments:
            self._segments[seq] = read_pku_labels(os.path.join(self.label_dir, f"{seq}.txt"))
        return self._segments[seq]

    def _path(self, seq, modality):
        if modality == "skeleton":
            return os.path.join(self.skeleton_dir, f"{seq}.txt")
        folder, suffix = self.FOLDERS[modality]
        candidates = [os.path.join(self.root, folder, seq)] + [os.path.join(self.root, folder, seq + s + ext)
                                                               for s in ("", suffix) for ext in (".avi",) +
                                                               VIDEO_EXTENSIONS]
        return next((p for p in candidates if os.path.exists(p)), candidates[1])  # missing: named as <seq>.avi

    def num_frames(self, seq, modality):
        """Frames of one modality of a sequence (skeleton: rows; depth: PNGs or video frames; flow: JPEGs)."""
        if (seq, modality) not in self._frames:
            path = self._path(seq, modality)
            if modality == "skeleton":
                with open(_need(path, "150 floats per frame")) as f:
                    n = sum(1 for line in f if line.strip())
            elif modality == "flow":
                n = len(_frame_files(path, "flow"))
            elif os.path.isdir(path):
                n = len([f for f in os.listdir(path) if f.endswith(".png" if modality == "depth" else ".jpg")])
            else:
                n = count_frames(_need(path, f"the {modality} of {seq}"), self.decoder)
            self._frames[(seq, modality)] = n
        return self._frames[(seq, modality)]

    def sequence_length(self, seq):
        """Frames of the time axis (the label frames): the skeleton's, else the depth's, else the RGB's."""
        axis = next((m for m in ("skeleton", "depth", "video") if os.path.exists(self._path(seq, m))), "skeleton")
        return self.num_frames(seq, axis)

    def sample_path(self, i):
        return self._path(self.instances[self.names[i]][0], "depth")

    def length(self, i):
        seq, start, end = self.instances[self.names[i]]
        return max(1, min(end, self.sequence_length(seq) - 1) - start + 1)

    def read(self, i, idx, modalities=None):
        seq, start, _ = self.instances[self.names[i]]
        return self.read_sequence(seq, start + np.minimum(np.asarray(idx).reshape(-1), self.length(i) - 1),
                                  self.modalities if modalities is None else modalities)

    def read_sequence(self, seq, t, modalities):
        """Modalities of sequence `seq` at time-axis frames t (clamped), each aligned by time, no transform."""
        length, item = self.sequence_length(seq), {}
        t = np.clip(np.asarray(t, dtype=np.int64).reshape(-1), 0, length - 1)
        for modality in modalities:
            path, n = self._path(seq, modality), self.num_frames(seq, modality)
            at = np.minimum(t * n // length, n - 1)  # (T,) frames of this modality at the same times
            if modality == "skeleton":
                x = torch.from_numpy(np.ascontiguousarray(read_pku_skeleton(path)[:, at]))  # (3, T, 25, 2)
            elif modality == "depth" and os.path.isdir(path):
                x = torch.from_numpy(read_depth_frames(path, at))[None]  # (1, T, H, W) metres
            elif modality == "depth":  # 8-bit depth video: grey level g -> g / 255 * DEPTH_MAX metres (assumed)
                frames = read_video_frames(path, at, self.decoder)[..., 0]  # (T, H, W) uint8
                x = torch.from_numpy(frames.astype(np.float32) * (DEPTH_MAX / 255))[None]
            elif modality == "video":
                x = torch.from_numpy(read_video_frames(path, at, self.decoder)).permute(3, 0, 1, 2)  # (3, T, H, W)
            elif modality == "flow":
                x = torch.from_numpy(read_flow_frames(path, at)).permute(3, 0, 1, 2)  # (2, T, H, W) pixels
            else:
                raise ValueError(f"modalities: PKU-MMD paired sets have video, depth, skeleton, flow; got {modality!r}")
            item[modality] = x
        return item


class VideoPoseDataset(torch.utils.data.Dataset):
    """Videos paired with COCO-18 pose JSON (P-HLVC supp. Sec. 7.2): "k400-pose" = Kinetics-400 + Kinetics-Skeleton
    (pose_root/kinetics_{train,val}/<youtube_id>.json, OpenPose, 30 fps; reading: the ST-GCN preprocessing resampled
    the videos to 30 fps); "sims4action" / "toyota-smarthome" with "pose2d" = root/pose2d/<video name>.json
    (`python common.py convert-alphapose`). Video frame t is read with pose frame t; pose_path(video) names the
    JSON. Left out: videos without one, and with min_pose_frames > 0 those with fewer posed frames (a person with a
    positive score) or an unreadable JSON (P-HLVC supp. Sec. 7.2 keeps 144,085 Kinetics videos; printed with `what`).
    The JSON files are read through `read_pose_json_cached` (cache_dir None: parsed every time).
    Items: "video" uint8 (C, T, H, W), "pose2d" float32 (3, T, 18, people) as read_kinetics_skeleton_json,
    "label", "index", "frame_indices"; with num_clips > 1 or a multi-clip sampling (K, ...) per clip."""

    def __init__(self, samples, class_names, pose_path, what, clip_len=16, transform=None, decoder="auto",
                 people=5, strict=False, bad_files_path=None, num_clips=1, sampling="random", cache_dir=None,
                 min_pose_frames=0, reference=""):
        folder = _need(os.path.dirname(pose_path(samples[0][0])) if samples else ".", "the pose JSON folder")
        have = set(os.listdir(folder))
        self.samples = [(p, y, pose_path(p)) for p, y in samples if os.path.basename(pose_path(p)) in have]
        self.class_names, self.num_classes = list(class_names), len(class_names)
        self.clip_len, self.transform, self.decoder, self.people = clip_len, transform, decoder, people
        self.strict, self.bad_files_path, self.bad_files = strict, bad_files_path, {}
        self.num_clips, self.sampling, self.cache_dir = num_clips, sampling, cache_dir
        found, short = len(self.samples), ""
        if min_pose_frames > 0:
            print(f"{what}: counting the posed frames of {found} pose JSON files (cache {cache_dir}: ~15 ms a file "
                  f"parsed, 0.2 ms cached)", flush=True)
            posed = {}
            for j in np.random.default_rng().permutation(found):  # concurrent processes share the uncached JSON
                try:
                    pose = read_pose_json_cached(self.samples[j][2], cache_dir, people)  # (3, T, 18, M)
                    posed[j] = int((pose[2].sum(axis=(1, 2)) > 0).sum())
                except (VideoReadError, OSError) as e:
                    _report_bad(self, self.samples[j][2], str(e).replace(f"{self.samples[j][2]}: ", ""))
            self.samples = [s for j, s in enumerate(self.samples) if posed.get(j, -1) >= min_pose_frames]
            short = (f", {sum(0 <= n < min_pose_frames for n in posed.values())} with fewer than {min_pose_frames} "
                     f"posed frames, {found - len(posed)} unreadable")
        print(f"{what}: {len(self.samples)} of {len(samples)} videos kept{reference} ({len(samples) - found} without "
              f"a pose JSON{short})", flush=True)

    def __len__(self):
        return len(self.samples)

    def sample_path(self, i):
        return self.samples[i][0]

    def _load(self, i):
        path, label, pose_path = self.samples[i]
        store = {}

        def index_fn(n):
            store["idx"] = sample_clip_indices(n, self.clip_len, (1,), self.num_clips, self.sampling, _seed_rng())
            return store["idx"].reshape(-1)
        frames = _read_frames(path, index_fn, self.decoder)  # (K * L, H, W, C)
        k = 0 if self.sampling in SINGLE_CLIP_SAMPLINGS and self.num_clips == 1 else slice(None)  # one clip: no K
        idx = store["idx"]  # (K, L)
        pose = read_pose_json_cached(pose_path, self.cache_dir, self.people)  # (3, T_json, 18, M <= people)
        clip = np.zeros((3, *idx.shape, 18, self.people), dtype=np.float32)  # (3, K, L, V, people): zero after T_json
        inside = idx < pose.shape[1]  # (K, L)
        clip[:, inside, :, :pose.shape[3]] = pose[:, idx[inside]]
        item = {"video": torch.from_numpy(frames).view(*idx.shape, *frames.shape[1:]).permute(0, 4, 1, 2, 3)[k],
                "pose2d": torch.from_numpy(np.ascontiguousarray(clip.swapaxes(0, 1)))[k]}  # (K, 3, L, V, people)
        if self.transform is not None:
            item = self.transform(item)
        item.update(label=torch.tensor(label), index=torch.tensor(i, dtype=torch.int64),
                    frame_indices=torch.from_numpy(idx)[k])
        return item

    def __getitem__(self, index):
        return _load_or_replace(self, index, self._load)


# All samplers return int64 frame indices; the readers clamp them to the real length, so a clip longer than the
# video repeats its last frame. Paired modalities read the same index array (identical temporal positions).


def sample_random_clip(num_frames, clip_len, strides=(1,), rng=None, jitter=False):
    """One random clip (clip_len,): a stride drawn from `strides`, a uniform start; jitter=True moves every frame
    by a random offset inside its stride slot (temporal jitter; indices stay increasing)."""
    rng = np.random.default_rng() if rng is None else rng
    strides = [strides] if np.isscalar(strides) else list(strides)
    stride = int(strides[rng.integers(len(strides))])
    span = clip_len * stride if jitter else (clip_len - 1) * stride + 1  # with jitter each frame owns a slot
    start = int(rng.integers(0, max(num_frames - span, 0) + 1))
    indices = start + stride * np.arange(clip_len, dtype=np.int64)
    if jitter and stride > 1:
        indices = indices + rng.integers(0, stride, size=clip_len)
    return indices


def sample_uniform_clips(num_frames, clip_len, stride=1, num_clips=1):
    """num_clips evenly spaced clips covering the video (test-time multi-clip) -> (num_clips, clip_len)."""
    span = (clip_len - 1) * stride + 1
    starts = np.linspace(0, max(num_frames - span, 0), num_clips).round().astype(np.int64)
    return starts[:, None] + stride * np.arange(clip_len, dtype=np.int64)[None, :]


def sample_sliding_windows(num_frames, clip_len, stride=1, step=None):
    """Dense sliding windows every `step` frames (default: one clip span, no overlap) -> (K, clip_len); the last
    window is aligned with the end of the video so every frame is covered."""
    span = (clip_len - 1) * stride + 1
    step = span if step is None else step
    starts = list(range(0, max(num_frames - span, 0) + 1, step))
    if num_frames > span and starts[-1] != num_frames - span:
        starts.append(num_frames - span)
    return np.asarray(starts, dtype=np.int64)[:, None] + stride * np.arange(clip_len, dtype=np.int64)[None, :]


def sample_consecutive_clips(num_frames, clip_len, stride=1):
    """The whole video as consecutive non-overlapping clips (video-level features) -> (ceil(N/(T*s)), clip_len);
    the last clip is padded by repeating the last frame."""
    k = max(1, -(-num_frames // (clip_len * stride)))
    indices = np.arange(k * clip_len, dtype=np.int64).reshape(k, clip_len) * stride
    return np.minimum(indices, num_frames - 1)


def sample_spread_clip(num_frames, clip_len, rng=None):
    """clip_len frames spread linearly over the whole video at stride max(num_frames // clip_len, 1), from a random
    offset (rng given) or centred (rng None) -> (clip_len,). Arrow of time, thesis App. B.2.4: "8 frames linearly
    with a random offset" in training, "8 frames linearly" at test."""
    stride = max(num_frames // clip_len, 1)
    room = max(num_frames - ((clip_len - 1) * stride + 1), 0)
    start = int(rng.integers(0, room + 1)) if rng is not None else room // 2
    return start + stride * np.arange(clip_len, dtype=np.int64)


# Samplings that give one clip per video when num_clips == 1 (the datasets then drop the clip axis).
SINGLE_CLIP_SAMPLINGS = ("random", "uniform", "spread", "spread-centre")


def sample_clip_indices(num_frames, clip_len, strides=(1,), num_clips=1, sampling="random", rng=None,
                        jitter=False, step=None):
    """Dispatcher used by the datasets -> (K, clip_len). sampling: random | uniform | sliding | consecutive |
    spread (whole video, random offset) | spread-centre (whole video, centred)."""
    strides = [strides] if np.isscalar(strides) else list(strides)
    if sampling == "random":
        rng = np.random.default_rng() if rng is None else rng
        return np.stack([sample_random_clip(num_frames, clip_len, strides, rng, jitter) for _ in range(num_clips)])
    if sampling == "uniform":
        return sample_uniform_clips(num_frames, clip_len, strides[0], num_clips)
    if sampling == "sliding":
        return sample_sliding_windows(num_frames, clip_len, strides[0], step)
    if sampling == "consecutive":
        return sample_consecutive_clips(num_frames, clip_len, strides[0])
    if sampling in ("spread", "spread-centre"):
        rng = (np.random.default_rng() if rng is None else rng) if sampling == "spread" else None
        return np.stack([sample_spread_clip(num_frames, clip_len, rng) for _ in range(num_clips)])
    raise ValueError(f"sampling: expected random, uniform, sliding, consecutive, spread or spread-centre, got "
                     f"{sampling!r}")


# Layout (..., C, T, H, W), uint8 or float in [0, 1]; every leading index is one clip and gets its own random
# parameters, shared by all its frames (clip-consistent). Pass generators seeded alike to apply identical
# parameters to paired modalities of equal H, W (e.g. RGB and depth), or stack clips and use shared=True.


def _uniform(lo, hi, generator=None):
    return lo + (hi - lo) * torch.rand((), generator=generator).item()


def _clips(x):
    """(..., C, T, H, W) -> (N, C, T, H, W) view and the leading shape."""
    if x.dim() < 4:
        raise ValueError(f"expected a clip tensor (..., C, T, H, W), got shape {tuple(x.shape)}")
    return x.reshape(-1, *x.shape[-4:]), x.shape[:-4]


def _resize_clip(clip, size):
    """(C, T, h, w) -> (C, T, size[0], size[1]), bilinear with antialiasing, dtype kept. uint8 on the CPU stays
    uint8 (torch's vectorised uint8 path, channels-last: 2-3x faster than through float, within 1 level of it)."""
    if clip.dtype == torch.uint8 and clip.device.type == "cpu":
        x = clip.transpose(0, 1).contiguous(memory_format=torch.channels_last)  # (T, C, h, w)
        x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False, antialias=True)
        return _contiguous(x.transpose(0, 1))
    x = clip.transpose(0, 1).float()  # (T, C, h, w)
    x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False, antialias=True)
    if clip.dtype == torch.uint8:
        x = x.round_().clamp_(0, 255).to(torch.uint8)
    return x.transpose(0, 1).to(clip.dtype)


def _contiguous(clip):
    """A contiguous copy of a uint8 CPU clip view (e.g. (C, T, H, W) over the decoder's (T, H, W, C) frames) through
    numpy's strided copy: 3x faster than torch's (0.2 vs 0.7 ms at 16x112x112), where the loader's collate would pay
    torch's."""
    return torch.from_numpy(np.ascontiguousarray(clip.numpy()))


def _pair(size):
    return (size, size) if isinstance(size, int) else tuple(size)


def random_resized_crop_clip(x, size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), generator=None):
    """torchvision RandomResizedCrop parameters (10 tries, then a centre crop), one box per clip."""
    clips, lead = _clips(x)
    boxes = random_resized_crop_boxes(clips.shape[0], *clips.shape[-2:], scale, ratio, generator)  # (N, 4)
    out = [_resize_clip(clip[..., i:i + h, j:j + w], _pair(size)) for clip, (i, j, h, w) in zip(clips, boxes.tolist())]
    return torch.stack(out).reshape(*lead, *out[0].shape)


def random_resized_crop_boxes(n, height, width, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), generator=None):
    """The boxes of random_resized_crop_clip for n clips of height x width, drawn in its order -> int64 (n, 4) rows
    (top, left, h, w); decode_jpeg_clips applies them to undecoded frames."""
    boxes = [random_resized_crop_box(height, width, scale, ratio, generator) for _ in range(n)]
    return torch.tensor(boxes, dtype=torch.int64).view(n, 4)


def random_resized_crop_box(height, width, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), generator=None):
    """One RandomResizedCrop box (top, left, h, w) in a height x width frame: torchvision's draws and fallback."""
    for _ in range(10):
        area = height * width * _uniform(scale[0], scale[1], generator)
        aspect = math.exp(_uniform(math.log(ratio[0]), math.log(ratio[1]), generator))
        w, h = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            i = int(torch.randint(0, height - h + 1, (), generator=generator))
            j = int(torch.randint(0, width - w + 1, (), generator=generator))
            return i, j, h, w
    aspect_in = width / height
    if aspect_in < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif aspect_in > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def multiscale_corner_crop(x, size, scales=(1.0, 0.875, 0.75, 0.66), generator=None):
    """TSN multi-scale crop: crop width and height each min(H, W) * a scale from `scales` (|i - j| <= 1 in the
    scale list), placed at one of 4 corners or the centre, resized to size."""
    clips, lead = _clips(x)
    height, width = clips.shape[-2:]
    base = min(height, width)
    out = []
    for clip in clips:
        while True:
            si, sj = (int(torch.randint(0, len(scales), (), generator=generator)) for _ in range(2))
            if abs(si - sj) <= 1:
                break
        h, w = int(base * scales[si]), int(base * scales[sj])
        corner = int(torch.randint(0, 5, (), generator=generator))
        i, j = [(0, 0), (0, width - w), (height - h, 0), (height - h, width - w),
                ((height - h) // 2, (width - w) // 2)][corner]
        out.append(_resize_clip(clip[..., i:i + h, j:j + w], _pair(size)))
    return torch.stack(out).reshape(*lead, *out[0].shape)


def center_crop(x, size):
    """(..., H, W) -> the central (..., h, w) crop, size = h = w or (h, w); larger than the clip: ValueError."""
    h, w = _pair(size)
    height, width = x.shape[-2:]
    if h > height or w > width:
        raise ValueError(f"center_crop: crop {h}x{w} larger than the clip {height}x{width}")
    i, j = (height - h) // 2, (width - w) // 2
    return x[..., i:i + h, j:j + w]


def _short_side_size(height, width, size):
    """(H, W) after resizing min(H, W) to size, keeping the aspect ratio."""
    if height <= width:
        return size, max(1, int(round(width * size / height)))
    return max(1, int(round(height * size / width))), size


def resize_short_side(x, size):
    """Resize so that min(H, W) == size, keeping the aspect ratio."""
    new = _short_side_size(*x.shape[-2:], size)
    clips, lead = _clips(x)
    out = torch.stack([_resize_clip(c, new) for c in clips])
    return out.reshape(*lead, *out.shape[1:])


def resized_center_crop(x, short_side, crop):
    """center_crop(resize_short_side(x, short_side), crop), crop first: the source box that becomes the centre
    crop is cut on whole pixels and only it is resized (3-4x less work at 320x240 -> 128 -> 112). Versus resizing
    the whole frame, each box edge is at most half a source pixel off and the outermost output pixels are filtered
    without the source pixels beyond the box; with no scaling (short side already short_side) it is the same slice
    (copied contiguous for uint8 CPU clips, `_contiguous`)."""
    h, w = _pair(crop)
    top, left, box_h, box_w = resized_center_crop_box(*x.shape[-2:], short_side, crop)
    box = x[..., top:top + box_h, left:left + box_w]  # (..., C, T, h', w') view
    if box.shape[-2:] == (h, w):
        return _contiguous(box) if box.dtype == torch.uint8 and box.device.type == "cpu" else box
    clips, lead = _clips(box)
    out = torch.stack([_resize_clip(c, (h, w)) for c in clips])  # (N, C, T, h, w)
    return out.reshape(*lead, *out.shape[1:])


def draw_crop_and_flip(jpeg, key, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), p=0.5, generator=None):
    """Undecoded clips (VideoDataset encoded=True) jpeg[key] (..., T): random_resized_crop_clip's boxes, then
    horizontal_flip's flips, drawn as those draw them -> jpeg[key + "_box"] (..., 4), jpeg[key + "_flip"] (...)."""
    lead = jpeg[key].shape[:-1]
    n = int(np.prod(lead))
    height, width = jpeg.pop(key + "_size").tolist()
    jpeg[key + "_box"] = random_resized_crop_boxes(n, height, width, scale, ratio, generator).view(*lead, 4)
    jpeg[key + "_flip"] = (torch.rand(n, generator=generator) < p).view(lead)


def draw_center_crop(jpeg, key, short_side, crop):
    """Undecoded clips jpeg[key] (..., T): resized_center_crop's box, no flip -> jpeg[key + "_box"], "_flip"."""
    lead = jpeg[key].shape[:-1]
    box = resized_center_crop_box(*jpeg.pop(key + "_size").tolist(), short_side, crop)
    jpeg[key + "_box"] = torch.tensor(box).expand(*lead, 4).clone()
    jpeg[key + "_flip"] = torch.zeros(lead, dtype=torch.bool)


def resized_center_crop_box(height, width, short_side, crop):
    """The source box (top, left, h', w') of a height x width frame that resized_center_crop resizes to crop."""
    h, w = _pair(crop)
    new_h, new_w = _short_side_size(height, width, short_side)
    if h > new_h or w > new_w:
        raise ValueError(f"resized_center_crop: crop {h}x{w} larger than the resized clip {new_h}x{new_w}")
    i, j = (new_h - h) // 2, (new_w - w) // 2  # center_crop's box in the resized frame
    top, bottom = round(i * height / new_h), round((i + h) * height / new_h)  # its edges in source pixels
    left, right = round(j * width / new_w), round((j + w) * width / new_w)
    return top, left, bottom - top, right - left


def horizontal_flip(x, p=0.5, generator=None, flow=False):
    """Flip each clip with probability p. flow=True: channel 0 is the horizontal displacement and changes sign."""
    clips, lead = _clips(x)
    flip = torch.rand(clips.shape[0], generator=generator) < p  # (N,) drawn on the CPU: no host sync
    if clips.device.type == "cpu":  # clip by clip: one copy each (a masked or torch.where pass costs 15-40x more)
        out = torch.stack([c.flip(-1) if f else c for c, f in zip(clips, flip.tolist())])  # (N, C, T, H, W)
    else:
        out = torch.where(flip.to(x.device).view(-1, 1, 1, 1, 1), clips.flip(-1), clips)  # (N, C, T, H, W)
    if flow:  # horizontal displacement u changes sign where flipped
        out[:, 0] *= (1 - 2 * flip.to(out)).view(-1, 1, 1, 1)  # (N, 1, 1, 1)
    return out.reshape(x.shape)


def color_jitter(x, brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1, p=0.8, shared=False, generator=None):
    """Colour jitter (torchvision's factors and random order) on RGB clips, applied with probability p per clip,
    batched: no loop over clips. shared=True draws one set of parameters for every clip in x (e.g. a stacked pair).

    The four operations run in four stages; at stage s every clip applies its own s-th operation and the other
    three with identity factors (b = c = s = 1, h = 0), so each clip gets its own order in one batched pass."""
    clips, lead = _clips(x)
    if clips.shape[1] != 3:
        raise ValueError(f"color_jitter: expected 3 channels, got shape {tuple(x.shape)}")
    n, draws = clips.shape[0], 1 if shared else clips.shape[0]
    rand = lambda: torch.rand(draws, generator=generator).expand(n)  # noqa: E731  (N,) on the CPU
    apply = rand() < p
    factors = [max(0, 1 - brightness) + rand() * (1 + brightness - max(0, 1 - brightness)),
               max(0, 1 - contrast) + rand() * (1 + contrast - max(0, 1 - contrast)),
               max(0, 1 - saturation) + rand() * (1 + saturation - max(0, 1 - saturation)),
               hue * (2 * rand() - 1)]
    order = torch.stack([torch.randperm(4, generator=generator) for _ in range(draws)]).expand(n, 4)  # (N, 4)
    return apply_color_jitter(clips, apply, factors, order).reshape(x.shape)


def apply_color_jitter(clips, apply, factors, order):
    """clips (N, 3, T, H, W) uint8 or float in [0, 1]; apply (N,) bool; factors: [brightness, contrast,
    saturation, hue], each (N,); order (N, 4): the operations' order per clip (0 brightness .. 3 hue)."""
    x = clips.float() / 255 if clips.dtype == torch.uint8 else clips.float()
    device, view = x.device, (-1, 1, 1, 1, 1)
    identity = (1.0, 1.0, 1.0, 0.0)
    gray = lambda v: (0.2989 * v[:, 0] + 0.587 * v[:, 1] + 0.114 * v[:, 2]).unsqueeze(1)  # noqa: E731 (N,1,T,H,W)
    for stage in range(4):
        for k in range(4):
            chosen = (order[:, stage] == k) & apply  # (N,)
            f = torch.where(chosen, factors[k], torch.full_like(factors[k], identity[k])).to(device).view(view)
            if k == 0:  # brightness: blend with black
                x = (x * f).clamp_(0, 1)
            elif k == 1:  # contrast: blend with the mean grey level of each frame
                x = (f * x + (1 - f) * gray(x).mean(dim=(-2, -1), keepdim=True)).clamp_(0, 1)
            elif k == 2:  # saturation: blend with the grey image
                x = (f * x + (1 - f) * gray(x)).clamp_(0, 1)
            else:  # hue: rotate the HSV hue
                x = _shift_hue(x, f)
    return (x * 255).round_().to(torch.uint8) if clips.dtype == torch.uint8 else x.to(clips.dtype)


def _shift_hue(x, shift):
    """(N, 3, T, H, W) RGB in [0, 1], hue shift (N, 1, 1, 1, 1) in turns -> RGB (torchvision's HSV round trip)."""
    r, g, b = x.unbind(1)
    maxc, minc = x.amax(dim=1), x.amin(dim=1)
    value, chroma = maxc, maxc - minc
    sat = chroma / torch.where(maxc == 0, torch.ones_like(maxc), maxc)
    c = torch.where(chroma == 0, torch.ones_like(chroma), chroma)
    rc, gc, bc = (maxc - r) / c, (maxc - g) / c, (maxc - b) / c
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.fmod((h / 6.0 + 1.0) + shift[:, 0], 1.0)  # (N, T, H, W) in turns
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    i = i.to(torch.int64) % 6
    p, q, t = ((value * (1 - sat * a)).clamp(0, 1) for a in (1.0, f, 1 - f))
    table = torch.stack([torch.stack(v, 0) for v in ((value, t, p), (q, value, p), (p, value, t), (p, q, value),
                                                     (t, p, value), (value, p, q))], 0)  # (6, 3, N, T, H, W)
    return table.gather(0, i.unsqueeze(0).unsqueeze(0).expand(1, 3, *i.shape))[0].transpose(0, 1)  # (N, 3, T,H,W)


def normalize(x, mean=KINETICS_MEAN, std=KINETICS_STD):
    """uint8 (0..255) or float (0..1) clips -> float32 (x - mean) / std per channel (dim -4)."""
    x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
    mean = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(-1, 1, 1, 1)
    std = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(-1, 1, 1, 1)
    return (x - mean) / std


# Skeleton sequences are (C, T, V, M) = (xyz, frames, joints, persons), batched (N, C, T, V, M), zero-padded after
# their valid length (the datasets' "length"). skeleton_contrast.py and evaluate.py both use these.


def center_on_spine(x):
    """x (..., C, T, V, M) minus body 0's spine joint (index 1) in every frame, for every present joint: the
    translation step of 2s-AGCN's pre_normalization, which the authors' NTU arrays went through. Idempotent, so
    harmless on arrays that are already pre-normalised; absent persons and padding frames stay zero."""
    if x.shape[-2] < 2:  # no spine joint
        return x
    present = (x.abs().sum(dim=-4, keepdim=True) > 0).to(x.dtype)  # (..., 1, T, V, M)
    return (x - x[..., 1:2, 0:1]) * present


def temporal_crop_resize(x, length=None, min_ratio=0.1, out_frames=64, min_length=1, max_ratio=1.0, centre=False):
    """Temporal crop-resize (Skeleton-Contrast, thesis Eq. 3.3): Interpolate(X[L_start : L_start + L]).

    x (N, C, T, V, M); length (N,) valid frames (padding after them is never used; None = all T).
    L_ratio ~ U[min_ratio, max_ratio], L = floor(n L_ratio) clamped to [min_length, n]; L_start ~ U{0..n - L}, or
    (n - L) // 2 with centre=True (the downstream test crop: ratio 0.95, centred). The crop is resampled to
    out_frames by linear interpolation over time, exactly F.interpolate(mode="bilinear", align_corners=False) on a
    (1, C V M, L, 1) tensor as the authors' code, for every sequence of the batch at once on x's device.
    """
    n, c, t, v, m = x.shape
    device = x.device
    valid = torch.full((n,), t, device=device) if length is None else length.to(device).long().clamp(1, t)  # (N,)
    ratio = torch.empty(n, device=device, dtype=torch.float64).uniform_(min_ratio, max_ratio)  # (N,) L_ratio
    crop = (valid.double() * ratio).floor().long().clamp(min=min_length).minimum(valid).clamp(min=1)  # (N,) L
    if centre:
        start = (valid - crop) // 2  # (N,)
    else:
        start = (torch.rand(n, device=device) * (valid - crop + 1)).floor().long()  # (N,) L_start
    # Source coordinate of each output frame (align_corners=False): (i + 0.5) L / T_out - 0.5, clamped at 0.
    scale = crop.float() / out_frames  # (N,)
    position = ((torch.arange(out_frames, device=device).float() + 0.5)[None] * scale[:, None] - 0.5).clamp(min=0)
    left = position.floor().long().minimum(crop[:, None] - 1)  # (N, T_out)
    right = (left + 1).minimum(crop[:, None] - 1)  # (N, T_out)
    weight = (position - left.float()).clamp(max=1.0).to(x.dtype)[:, None, :, None, None]  # (N, 1, T_out, 1, 1)

    def frames(index):  # index (N, T_out) within the crop -> (N, C, T_out, V, M)
        # Rows of a (N C T, V M) view: index_select copies contiguous rows (~6x faster than gather on CPU).
        rows = torch.arange(n * c, device=device).view(n, c, 1) * t + (start[:, None] + index)[:, None, :]
        return x.reshape(n * c * t, v * m).index_select(0, rows.reshape(-1)).view(n, c, out_frames, v, m)

    return torch.lerp(frames(left), frames(right), weight)  # (N, C, T_out, V, M)


class VideoReadError(RuntimeError):
    """A video, frame folder or annotation file could not be read; the message names the file and the reason."""


def _have(module):
    try:
        __import__(module)
        return True
    except Exception:  # a broken install (e.g. torchcodec without FFmpeg) counts as absent
        return False


def resolve_decoder(decoder="auto"):
    """auto -> decord where installed (the declared default), else torchcodec, else PyAV (always installable)."""
    if decoder != "auto":
        if decoder not in ("decord", "pyav", "torchcodec"):
            raise ValueError(f"--decoder: expected auto, decord, pyav or torchcodec, got {decoder!r}")
        return decoder
    for name, module in (("decord", "decord"), ("torchcodec", "torchcodec.decoders"), ("pyav", "av")):
        if _have(module):
            return name
    raise VideoReadError("no video decoder: install one of decord, torchcodec, av (pip install av)")


def _clamp(indices, num_frames):
    return np.clip(np.asarray(indices, dtype=np.int64).reshape(-1), 0, max(num_frames - 1, 0))


def _resize_frames(frames, size):
    """frames uint8 (T, H, W, C); size (H, W) or int (short side). Bilinear with antialiasing."""
    if size is None:
        return frames
    h, w = frames.shape[1:3]
    if isinstance(size, int):
        size = _short_side_size(h, w, size)
    if tuple(size) == (h, w):
        return frames
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)  # (T, C, H, W) uint8, channels-last
    x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False, antialias=True)  # uint8 path
    return x.permute(0, 2, 3, 1).contiguous().numpy()


def _frame_files(folder, prefix):
    try:
        names = os.listdir(folder)
    except OSError as e:
        raise VideoReadError(f"{folder}: cannot list frame folder ({e.strerror})") from None
    return sorted(n for n in names if n.startswith(prefix + "_") and n.endswith(".jpg"))


def _frame_folder_indices(folder, prefix, index_fn):
    """index_fn(number of prefix_%05d.jpg frames in folder) clamped to them -> int64 (T,)."""
    n = len(_frame_files(folder, prefix))
    if n == 0:
        raise VideoReadError(f"{folder}: expected {prefix}_00001.jpg ... frames, found none")
    return _clamp(index_fn(n), n)


def _read_jpegs(folder, prefix, index_fn, size, mode="RGB"):
    from PIL import Image
    indices = _frame_folder_indices(folder, prefix, index_fn)
    cache, out = {}, []
    for i in indices.tolist():
        if i not in cache:
            path = os.path.join(folder, f"{prefix}_{i + 1:05d}.jpg")
            try:
                with Image.open(path) as img:
                    img = img.convert(mode)
                    if size is not None and not isinstance(size, int):
                        img = img.resize((size[1], size[0]), Image.BILINEAR)
                    cache[i] = np.asarray(img)
            except (OSError, ValueError) as e:
                raise VideoReadError(f"{path}: cannot decode JPEG ({e})") from None
        out.append(cache[i])
    frames = np.stack(out)
    return _resize_frames(frames, size) if isinstance(size, int) else frames


def _read_jpeg_files(folder, prefix, index_fn, jpeg, key, clip_len, single):
    """VideoDataset(encoded=True): the files of frames index_fn(n) appended to jpeg["files"] (each distinct frame
    once, uint8 (bytes,)); jpeg[key] = their positions int64 (K, T), or (T,) if single; jpeg[key + "_size"] = (H, W)."""
    from PIL import Image
    indices = _frame_folder_indices(folder, prefix, index_fn)
    files, position = jpeg["files"], {}
    for i in indices.tolist():
        if i not in position:
            path = os.path.join(folder, f"{prefix}_{i + 1:05d}.jpg")
            data = torch.empty(os.path.getsize(path), dtype=torch.uint8)
            with open(path, "rb") as f:
                f.readinto(data.numpy())
            position[i] = len(files)
            files.append(data)
    positions = torch.tensor([position[i] for i in indices.tolist()], dtype=torch.int64).view(-1, clip_len)
    jpeg[key] = positions[0] if single else positions
    path = os.path.join(folder, f"{prefix}_{int(indices[0]) + 1:05d}.jpg")
    try:
        with Image.open(path) as img:  # the header only
            jpeg[key + "_size"] = torch.tensor([img.height, img.width])
    except (OSError, ValueError) as e:
        raise VideoReadError(f"{path}: cannot read the JPEG header ({e})") from None


def decode_jpeg_clips(jpeg, size, device, flow_flip_negates_u=True):
    """A batch's undecoded clips (JpegBatch from collate_jpeg) -> {"video" / "flow": uint8 (..., 3, T, size, size)
    on device}: every file decoded by one batched torchvision.io.decode_jpeg call (nvjpeg on CUDA), then per clip
    its box cropped and resized (_resize_clip) and flipped where jpeg's "<key>_flip"; flow frames go through
    pixels as on the CPU path (read_flow_frames, horizontal_flip: u changes sign, flow_image)."""
    with warnings.catch_warnings():  # torchvision 0.29 deprecates its image decoders in favour of TorchCodec's
        warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision")
        images = torchvision.io.decode_jpeg(list(jpeg.data.split(jpeg.sizes)), mode=torchvision.io.ImageReadMode.RGB,
                                            device=device)  # N x uint8 (3, H, W)
    out = {}
    for key in [k for k in ("video", "flow") if k in jpeg.clips]:
        positions, boxes, flips = (jpeg.clips[key + s] for s in ("", "_box", "_flip"))  # (..., T), (..., 4), (...)
        clips = []
        for frames, (i, j, h, w), flip in zip(positions.reshape(-1, positions.shape[-1]).tolist(),
                                              boxes.reshape(-1, 4).tolist(), flips.reshape(-1).tolist()):
            x = torch.stack([images[p][:, i:i + h, j:j + w] for p in frames], dim=1)  # (3, T, h, w)
            if key == "flow":  # uint8_to_flow: pixels in [-20, 20]
                x = x[:2].float() * (2 * FLOW_BOUND / 255.0) - FLOW_BOUND  # (2, T, h, w)
            x = x if (h, w) == (size, size) else _resize_clip(x, (size, size))  # equal size: the identity
            if flip:
                x = x.flip(-1)
                if key == "flow" and flow_flip_negates_u:
                    x[0] *= -1
            clips.append(flow_image(x) if key == "flow" else x)  # (3, T, size, size)
        out[key] = torch.stack(clips).view(*positions.shape[:-1], *clips[0].shape)
    return out


def _read_decord(path, index_fn, size):
    import decord
    kwargs = {"width": size[1], "height": size[0]} if size is not None and not isinstance(size, int) else {}
    vr = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1, **kwargs)
    n = len(vr)
    if n <= 0:
        raise VideoReadError(f"{path}: decord reports 0 frames")
    indices = _clamp(index_fn(n), n)
    # decord decodes in the order asked and seeks back to a keyframe for every index below the previous one (two
    # clips, repeated last frames): ask for each frame once, in order, then put them in place (two 16-frame clips:
    # 18-30 % less CPU; the same frames)
    wanted, order = np.unique(indices, return_inverse=True)
    try:
        frames = vr.get_batch(wanted.tolist()).asnumpy()  # (len(wanted), H, W, 3)
    except Exception:  # the container over-reported its length: retry with the tail pulled in (sec. A1.6)
        indices = _clamp(indices, max(1, n - 8))
        wanted, order = np.unique(indices, return_inverse=True)
        frames = vr.get_batch(wanted.tolist()).asnumpy()
    if not np.array_equal(wanted, indices):  # not increasing: frames in the order asked, (T, H, W, 3)
        frames = frames[order.reshape(-1)]
    return _resize_frames(frames, size) if isinstance(size, int) else frames


def _pyav_decode(container, stream, wanted, last, seek_to):
    """Decode frames with indices in `wanted` up to `last` -> ({index: av frame}, index of the last decoded frame).
    seek_to=None counts frames from the start (exact on every container); otherwise seek to the keyframe before
    frame seek_to and derive indices from pts (constant frame rate assumed)."""
    frames, i = {}, -1
    if seek_to is None:
        container.seek(0)
        for i, frame in enumerate(container.decode(stream)):
            if i in wanted:
                frames[i] = frame
            if i >= last:
                break
        return frames, i
    start, rate, tb = stream.start_time or 0, stream.average_rate, stream.time_base
    container.seek(start + int(seek_to / rate / tb), stream=stream, backward=True, any_frame=False)
    for frame in container.decode(stream):
        if frame.pts is None:
            return None, -1
        i = int(round(float((frame.pts - start) * tb * rate)))
        if i in wanted:
            frames[i] = frame
        if i >= last:
            break
    return frames, i


def _read_pyav(path, index_fn, size):
    import av
    from av.video.reformatter import VideoReformatter
    with av.open(path) as container:
        if not container.streams.video:
            raise VideoReadError(f"{path}: no video stream")
        stream = container.streams.video[0]
        stream.codec_context.thread_count = 1
        n = stream.frames
        if n <= 0 and stream.duration and stream.average_rate:  # webm/mkv carry no frame count
            n = int(round(float(stream.duration * stream.time_base * stream.average_rate)))
        if n <= 0:
            raise VideoReadError(f"{path}: PyAV cannot determine the frame count")
        indices = _clamp(index_fn(n), n)
        wanted, first, last = set(indices.tolist()), int(indices.min()), int(indices.max())
        frames = None
        # Clips far into the video: seek to the keyframe before the first frame (decoding the prefix costs
        # ~0.5 ms/frame at 340x256, sec. A1.5); the result is used only if it holds every wanted frame that
        # exists, else (variable frame rate, odd pts) the video is decoded from the start, counting frames.
        if first > 48 and stream.average_rate and stream.time_base and not path.lower().endswith(".avi"):
            frames, decoded_last = _pyav_decode(container, stream, wanted, last, first)
            if frames is not None and any(i not in frames for i in wanted if i <= decoded_last):
                frames = None
        if frames is None:
            frames, decoded_last = _pyav_decode(container, stream, wanted, last, None)
        if not frames:
            raise VideoReadError(f"{path}: no frame could be decoded (expected {n})")
        if last - decoded_last > max(8, n // 10):  # a few missing frames: over-reported length; many: truncated
            raise VideoReadError(f"{path}: truncated: decoding stopped at frame {decoded_last}, expected {n} frames")
        # one swscale context for all frames: frame.to_ndarray(format=) builds a new one per frame, which costs more
        # than the conversion (16 frames at 320x240: 6.0 ms against 0.9)
        reformatter = VideoReformatter()
        kwargs = {"width": size[1], "height": size[0]} if size is not None and not isinstance(size, int) else {}
        arrays = {i: reformatter.reformat(f, format="rgb24", **kwargs).to_ndarray() for i, f in frames.items()}
    # indices past the real end (over-reported length) repeat the last wanted frame that was decoded
    fallback = arrays[max(arrays)]
    out = np.stack([arrays.get(i, fallback) for i in indices.tolist()])
    return _resize_frames(out, size) if isinstance(size, int) else out


def _read_torchcodec(path, index_fn, size):
    from torchcodec.decoders import VideoDecoder
    dec = VideoDecoder(path, dimension_order="NHWC", num_ffmpeg_threads=1, seek_mode="exact")
    n = dec.metadata.num_frames
    if not n:
        raise VideoReadError(f"{path}: torchcodec reports 0 frames")
    indices = _clamp(index_fn(n), n)
    frames = dec.get_frames_at(indices=indices.tolist()).data.numpy()
    return _resize_frames(frames, size)


def _read_frames(path, index_fn, decoder="auto", size=None):
    """index_fn(num_frames) -> indices: lets one reader both count and read (one open per sample)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return _read_jpegs(path, "image", index_fn, size)
    if not os.path.exists(path):
        raise VideoReadError(f"{path}: file not found")
    if os.path.getsize(path) == 0:
        raise VideoReadError(f"{path}: empty file (0 bytes)")
    backend = resolve_decoder(decoder)
    if decoder == "auto" and path.lower().endswith(".avi") and _have("av"):
        # AVI (UCF101, HMDB51, NTU, PKU-MMD): decord's seeks return wrong frames now and then (decord issues #195,
        # #252; measured on H.264 AVIs: 35 of 40 strided clips wrong), PyAV's pts-derived seek too: count from frame 0
        backend = "pyav"
    read = {"decord": _read_decord, "pyav": _read_pyav, "torchcodec": _read_torchcodec}[backend]
    try:
        return read(path, index_fn, size)
    except Exception as e:  # decoder-specific exception types, all reported the same way
        reason = str(e) if isinstance(e, VideoReadError) else f"{path}: {backend} failed: {type(e).__name__}: {e}"
    if decoder == "auto" and backend != "pyav" and _have("av"):
        # decord fails on some valid files (e.g. 48-pixel-wide frames: a buffer size check); PyAV gets a second try
        try:
            return _read_pyav(path, index_fn, size)
        except Exception as e:
            reason += f"; pyav: {type(e).__name__}: {str(e).replace(path + ': ', '')}"
    raise VideoReadError(reason)


def read_video_frames(path, indices, decoder="auto", size=None):
    """Frames `indices` of a video file or image_%05d.jpg folder -> uint8 (T, H, W, C), indices clamped.

    size: None, (H, W) (resized inside the decoder where it can) or int (short side)."""
    return _read_frames(path, lambda n: indices, decoder, size)


def count_frames(path, decoder="auto"):
    """Number of frames of a video file (as the container/decoder reports it) or of a frame folder."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return len(_frame_files(path, "image")) or len(_frame_files(path, "flow"))
    result = []
    _read_frames(path, lambda n: result.append(n) or [0], decoder)
    return result[0]


def flow_to_uint8(flow):
    """float flow (..., 2) in pixels -> uint8 (..., 3): u, v in channels 0, 1, channel 2 = 128 (CoCLR/ViCC)."""
    q = np.round((np.clip(flow, -FLOW_BOUND, FLOW_BOUND) + FLOW_BOUND) * 255.0 / (2 * FLOW_BOUND))
    out = np.full(flow.shape[:-1] + (3,), 128, dtype=np.uint8)
    out[..., :2] = q.astype(np.uint8)
    return out


def uint8_to_flow(img):
    """uint8 (..., >=2) flow image -> float32 (..., 2) pixels in [-20, 20]."""
    return img[..., :2].astype(np.float32) * (2 * FLOW_BOUND / 255.0) - FLOW_BOUND


def flow_image(flow):
    """float flow clips (..., 2, T, H, W) in pixels -> the CoCLR / ViCC flow image uint8 (..., 3, T, H, W) on flow's
    device: u, v mapped from +-20 px to 0..255 as flow_to_uint8 (the same float32 operations), third channel 128;
    networks take it normalised like RGB."""
    q = ((flow.clamp(-FLOW_BOUND, FLOW_BOUND) + FLOW_BOUND) * 255.0 / (2 * FLOW_BOUND)).round()
    return torch.cat([q, torch.full_like(q.narrow(-4, 0, 1), 128)], dim=-4).to(torch.uint8)  # (..., 3, T, H, W)


def write_flow_frames(flow, folder, start=1):
    """flow float (T, H, W, 2) -> folder/flow_%05d.jpg (JPEG quality 100, 4:4:4 so u and v do not bleed)."""
    from PIL import Image
    os.makedirs(folder, exist_ok=True)
    for t, img in enumerate(flow_to_uint8(np.asarray(flow, dtype=np.float32))):
        Image.fromarray(img).save(os.path.join(folder, f"flow_{t + start:05d}.jpg"), quality=100, subsampling=0)


def read_flow_frames(folder, indices, size=None):
    """flow_%05d.jpg frames -> float32 (T, H, W, 2) in pixels. With size=(H, W) the vectors are rescaled too."""
    frames = _read_jpegs(folder, "flow", lambda n: indices, None)
    flow = uint8_to_flow(frames)
    if size is not None:
        h, w = flow.shape[1:3]
        if isinstance(size, int):
            size = _short_side_size(h, w, size)
        x = F.interpolate(torch.from_numpy(flow).permute(0, 3, 1, 2), size=tuple(size), mode="bilinear",
                          align_corners=False, antialias=True)  # (T, 2, H', W')
        x = x * torch.tensor([size[1] / w, size[0] / h]).view(1, 2, 1, 1)  # displacements scale with the image
        flow = x.permute(0, 2, 3, 1).contiguous().numpy()
    return flow


def write_video(path, frames, fps=8, crf=18, gop=16, faststart=False):
    """uint8 (T, H, W, 3), H and W even -> H.264 mp4 with PyAV's bundled libx264 (single thread: deterministic).
    faststart=True puts the index (moov) before the data, as web downloads have it."""
    import av
    frames = np.asarray(frames, dtype=np.uint8)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with av.open(path, "w", options={"movflags": "faststart"} if faststart else {}) as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.options = {"crf": str(crf), "g": str(gop), "threads": "1", "preset": "fast"}
        for img in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


# ==================================================================================================== DATASET FORMATS
# One parser per official layout: (root, split) -> list of (path, label) or the arrays of a
# skeleton set. Errors name the missing file. Published split sizes are checked by `python common.py check-data`.


VIDEO_EXTENSIONS = (".mp4", ".avi", ".webm", ".mkv", ".mov", ".m4v")

PUBLISHED_SIZES = {  # split sizes stated by the papers (thesis Table 5.1; NTU README); check-data compares
    "ucf101": {"train": 9537, "val": 3783}, "hmdb51": {"train": 3570, "val": 1530},
    "ssv2": {"train": 168913, "val": 24777}, "gym99": {"train": 20484, "val": 8521},
    "fx-s1": {"train": 1882, "val": 777}, "ub-s1": {"train": 3511, "val": 1471},
    "charades": {"train": 7985, "val": 1863}, "ucfrep": {"train": 421, "val": 105},
    "k400": {"train": 246535, "val": 19907},  # full YouTube list; local copies miss ~6-10 % (sec. A2)
    "ntu60-xsub": {"train": 40320, "val": 16560}, "ntu60-xview": {"train": 37920, "val": 18960},
}

NTU_XSUB_TRAIN = (1, 2, 4, 5, 8, 9, 13, 14, 15, 16, 17, 18, 19, 25, 27, 28, 31, 34, 35, 38)

NTU120_XSUB_TRAIN = NTU_XSUB_TRAIN + (45, 46, 47, 49, 50, 52, 53, 54, 55, 56, 57, 58, 59, 70, 74, 78, 80, 81, 82,
                                      83, 84, 85, 86, 89, 91, 92, 93, 94, 95, 97, 98, 100, 103)


def _need(path, what):
    """`path` if it exists, else a VideoReadError naming it and `what` was expected there."""
    if not os.path.exists(path):
        raise VideoReadError(f"{path}: missing; expected {what}")
    return path


def _first_existing(root, names, what):
    """root/<the first of names that exists>, else a VideoReadError naming root/names[0] and `what`."""
    for n in names:
        if os.path.exists(os.path.join(root, n)):
            return os.path.join(root, n)
    raise VideoReadError(f"{os.path.join(root, names[0])}: missing; expected {what}")


def _read_lines(path, what):
    """The non-empty lines of a text file, stripped (a missing file: VideoReadError naming `what`)."""
    with open(_need(path, what)) as f:
        return [line.strip() for line in f if line.strip()]


def _read_csv(path, columns, what, delimiter=","):
    """The rows of a CSV file with a header line as dicts; VideoReadError naming the file if a column is missing."""
    import csv
    with open(_need(path, what), newline="") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        missing = set(columns) - set(reader.fieldnames or [])
        if missing:
            raise VideoReadError(f"{path}: missing column(s) {sorted(missing)}; header is {reader.fieldnames}")
        return list(reader)


def normalize_label(name):
    """torchvision's Kinetics folder names: spaces -> '_', quotes and parentheses removed."""
    return name.replace(" ", "_").replace("'", "").replace("(", "").replace(")", "").strip()


def _split_name(split, val="val"):
    """train -> "train"; val / test / validation -> `val` (the name a layout gives its evaluation split)."""
    if split in ("val", "test", "validation"):
        return val
    if split != "train":
        raise ValueError(f"split: expected train or val, got {split!r}")
    return "train"


def parse_kinetics(root, split):
    """root/annotations/{train,val}.csv (label,youtube_id,time_start,time_end,split) +
    root/{train,val}/<label>/<youtube_id>_<start:06d>_<end:06d>.mp4; classes = sorted train labels."""
    split = _split_name(split)

    def rows(s):  # annotations/<s>.csv as dicts
        path = os.path.join(root, "annotations", f"{s}.csv")
        return _read_csv(path, ("label", "youtube_id", "time_start", "time_end"), "the Kinetics annotation CSV")
    classes = sorted({normalize_label(r["label"]) for r in rows("train")})
    index = {c: i for i, c in enumerate(classes)}
    samples = []
    for r in rows(split):
        label = normalize_label(r["label"])
        name = f"{r['youtube_id']}_{int(float(r['time_start'])):06d}_{int(float(r['time_end'])):06d}.mp4"
        samples.append((os.path.join(root, split, label, name), index[label]))
    return samples, classes


def parse_ucf101(root, split, fold=1):
    """root/ucfTrainTestlist/{classInd.txt, trainlist0F.txt, testlist0F.txt} + root/UCF-101/<Class>/<v_...>.avi."""
    lists = os.path.join(root, "ucfTrainTestlist")
    classes = [line.split()[1] for line in _read_lines(os.path.join(lists, "classInd.txt"), "'1 ApplyEyeMakeup' lines")]
    index = {c: i for i, c in enumerate(classes)}
    name = f"{'trainlist' if _split_name(split) == 'train' else 'testlist'}{fold:02d}.txt"
    samples = []
    for line in _read_lines(os.path.join(lists, name), "UCF101 split list"):
        rel = line.split()[0]
        samples.append((os.path.join(root, "UCF-101", rel), index[rel.split("/")[0]]))
    return samples, classes


def parse_hmdb51(root, split, fold=1):
    """root/testTrainMulti_7030_splits/<class>_test_split{F}.txt ('<video>.avi <tag>', 1 train, 2 test) +
    root/hmdb51_org/<class>/<video>.avi."""
    lists = os.path.join(root, "testTrainMulti_7030_splits")
    suffix = f"_test_split{fold}.txt"
    files = sorted(f for f in os.listdir(_need(lists, "HMDB51 split folder")) if f.endswith(suffix))
    if not files:
        raise VideoReadError(f"{lists}: expected <class>{suffix} files, found none")
    classes = [f[:-len(suffix)] for f in files]
    tag = "1" if _split_name(split) == "train" else "2"
    samples = []
    for label, (c, f) in enumerate(zip(classes, files)):
        for line in _read_lines(os.path.join(lists, f), "HMDB51 split file"):
            video, t = line.split()[:2]
            if t == tag:
                samples.append((os.path.join(root, "hmdb51_org", c, video), label))
    return samples, classes


def parse_ssv2(root, split, ext="webm"):
    """root/labels/something-something-v2-{train,validation,labels}.json + root/videos/<id>.<ext>."""
    labels_path = _need(os.path.join(root, "labels", "something-something-v2-labels.json"), "template -> index JSON")
    with open(labels_path) as f:
        index = {k: int(v) for k, v in json.load(f).items()}
    classes = sorted(index, key=index.get)  # template names in label order
    name = _split_name(split, "validation")
    with open(_need(os.path.join(root, "labels", f"something-something-v2-{name}.json"), "SSv2 list JSON")) as f:
        items = json.load(f)
    samples = [(os.path.join(root, "videos", f"{it['id']}.{ext}"),
                index[it["template"].replace("[", "").replace("]", "")]) for it in items]
    return samples, classes


def parse_finegym(root, split, name="gym99"):
    """root/annotations/{gym99,gym288}_{train,val}.txt ('<clip>[.mp4] <label>') + root/subactions/<clip>.mp4.
    Subsets (gym-vault, gym-floor, fx-s1, ub-s1) keep their gym99 label range, relabelled from 0."""
    base = "gym288" if name == "gym288" else "gym99"
    path = os.path.join(root, "annotations", f"{base}_{_split_name(split)}.txt")
    samples, labels = [], set()
    for line in _read_lines(path, f"'<clip> <label>' lines of {base}"):
        clip, label = line.split()[:2]
        clip = clip if os.path.splitext(clip)[1] in VIDEO_EXTENSIONS else clip + ".mp4"
        samples.append((os.path.join(root, "subactions", clip), int(label)))
        labels.add(int(label))
    if name in GYM_SUBSETS:
        keep = list(GYM_SUBSETS[name])
        samples = [(p, keep.index(y)) for p, y in samples if y in keep]
        return samples, [f"{base}_{y}" for y in keep]
    num = 288 if base == "gym288" else 99
    return samples, [f"{base}_{y}" for y in range(num)]


def parse_diving48(root, split):
    """root/Diving48_V2_{train,test}.json ([{vid_name, label, ...}]) + Diving48_vocab.json + root/rgb/<vid>.mp4."""
    with open(_need(os.path.join(root, "Diving48_vocab.json"), "the 48 label tuples")) as f:
        classes = ["-".join(v) if isinstance(v, list) else str(v) for v in json.load(f)]
    name = _split_name(split, "test")
    with open(_need(os.path.join(root, f"Diving48_V2_{name}.json"), "Diving48 list JSON")) as f:
        items = json.load(f)
    return [(os.path.join(root, "rgb", f"{it['vid_name']}.mp4"), int(it["label"])) for it in items], classes


def parse_charades(root, split):
    """root/Charades_v1_{train,test}.csv (id,...,actions='c092 11.90 21.20;...') + Charades_v1_classes.txt +
    root/Charades_v1_480/<id>.mp4; label = multi-hot float32 (157,); action times kept in `segments`."""
    classes = [line.split(" ", 1)[1] for line in
               _read_lines(os.path.join(root, "Charades_v1_classes.txt"), "'c000 <name>' lines")]
    samples = []
    for r in _read_csv(os.path.join(root, f"Charades_v1_{_split_name(split, 'test')}.csv"), ("id", "actions"),
                       "Charades annotation CSV"):
        y = np.zeros(len(classes), dtype=np.float32)
        for act in filter(None, r["actions"].split(";")):
            y[int(act.split()[0][1:])] = 1.0
        samples.append((os.path.join(root, "Charades_v1_480", f"{r['id']}.mp4"), y))
    return samples, classes


def read_ucfrep_annotations(root, split):
    """root/annotations/{train,val}/<video>.mat (temporal_bound; needs scipy) or <video>.json
    ({"temporal_bound": [...]}) -> [(frame folder root/frames/<video>, bounds int64 (n + 1,))] sorted by name.
    Bounds are the 1-based frame numbers of image_%05d.jpg where the n repetitions start and end (UCFRep)."""
    folder = _need(os.path.join(root, "annotations", _split_name(split)), "UCFRep annotation folder")
    videos = []
    for f in sorted(os.listdir(folder)):
        name, ext = os.path.splitext(f)
        if ext == ".json":
            with open(os.path.join(folder, f)) as fh:
                bounds = json.load(fh)["temporal_bound"]
        elif ext == ".mat":
            try:
                import scipy.io
            except ImportError:
                raise VideoReadError(f"{folder}/{f}: reading .mat needs scipy (pip install scipy) "
                                     f"or convert to .json with a temporal_bound list") from None
            mat = scipy.io.loadmat(os.path.join(folder, f))
            bounds = (mat["label"][0, 0]["temporal_bound"] if "label" in mat else mat["temporal_bound"]).reshape(-1)
        else:
            continue
        bounds = np.asarray(bounds, dtype=np.int64).reshape(-1)
        if len(bounds) < 2 or np.any(np.diff(bounds) <= 0):
            raise VideoReadError(f"{folder}/{f}: temporal_bound must be >= 2 increasing frame numbers, got "
                                 f"{bounds.tolist()}")
        videos.append((os.path.join(root, "frames", name), bounds))
    return videos


def parse_ucfrep(root, split):
    """UCFRep (read_ucfrep_annotations): frames root/frames/<video>/image_%05d.jpg; label = the repetition count
    len(temporal_bound) - 1."""
    return [(path, float(len(bounds) - 1)) for path, bounds in read_ucfrep_annotations(root, split)], ["count"]


def parse_videofolder(root, split):
    """root/{train,val}/<class>/<video file or frame folder>; classes = sorted folder names."""
    folder = _need(os.path.join(root, _split_name(split)), "a folder of class folders")
    classes = sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)))
    samples = []
    for label, c in enumerate(classes):
        names = sorted(os.listdir(os.path.join(folder, c)))
        videos = {os.path.splitext(f)[0] for f in names if os.path.splitext(f)[1].lower() in VIDEO_EXTENSIONS}
        for f in names:
            path = os.path.join(folder, c, f)
            if (os.path.isdir(path) and f not in videos) or os.path.splitext(f)[1].lower() in VIDEO_EXTENSIONS:
                samples.append((path, label))  # a folder named as a video beside it holds that video's flow
    return samples, classes


def parse_videolist(root, split, list_file=None):
    """A text file (default root/{train,val}.txt) of 'path label' or 'path,label' lines (separator
    auto-detected; mmaction's 'path num_frames label' also works: the label is the last field). Relative paths
    are relative to root; an optional root/classes.txt names the classes."""
    path = list_file or os.path.join(root, f"{_split_name(split)}.txt")
    samples = []
    for n, line in enumerate(_read_lines(path, "'path label' lines")):
        fields = [x.strip() for x in line.split(",")] if "," in line else line.split()
        if len(fields) < 2:
            raise VideoReadError(f"{path}:{n + 1}: expected 'path label' or 'path,label', got {line!r}")
        try:
            label = int(fields[-1])
        except ValueError:
            raise VideoReadError(f"{path}:{n + 1}: label {fields[-1]!r} is not an integer") from None
        samples.append((fields[0] if os.path.isabs(fields[0]) else os.path.join(root, fields[0]), label))
    names_path = os.path.join(root, "classes.txt")
    if os.path.exists(names_path):
        classes = _read_lines(names_path, "one class name per line")
    else:
        classes = [str(i) for i in range(max(y for _, y in samples) + 1)] if samples else []
    return samples, classes


# Sims4Action (P-HLVC supp. Sec. 7.2; aroitberg/sims4action): its 10 classes in the order of the Gaming->Real
# benchmark's numeric ids, keyed by the video-name prefix ("Co_S1K1_fC6.avi": Cook, subject S1, Kitchen1, camera C6).
SIMS4ACTION_CLASSES = {"Co": "Cook", "Dr": "Drink", "Ea": "Eat", "GS": "Getup", "RB": "Readbook", "UC": "Usecomputer",
                       "UT": "Usetablet", "UP": "Usephone", "Wa": "Walk", "TV": "WatchTV"}


# Toyota Smarthome action -> Sims4Action class: sims4action's GamingToRealBenchmark/sims_toyota_label_correspondences
# .csv (16 Toyota actions -> 10); "phlvc-code" (the P-HLVC code's reading) adds Cook.Cleandishes / Cleanup, Eat.Snack.
TOYOTA_TO_SIMS = {"Cook.Cut": "Cook", "Cook.Stir": "Cook", "Cook.Usestove": "Cook", "Drink.Frombottle": "Drink",
                  "Drink.Fromcan": "Drink", "Drink.Fromcup": "Drink", "Drink.Fromglass": "Drink",
                  "Eat.Attable": "Eat", "Getup": "Getup", "Sitdown": "Getup", "Readbook": "Readbook",
                  "Uselaptop": "Usecomputer", "Usetablet": "Usetablet", "Usetelephone": "Usephone", "Walk": "Walk",
                  "WatchTV": "WatchTV"}
TOYOTA_TO_SIMS_PHLVC_CODE = dict(TOYOTA_TO_SIMS, **{"Cook.Cleandishes": "Cook", "Cook.Cleanup": "Cook",
                                                    "Eat.Snack": "Eat"})


def parse_sims4action(root, split):
    """root/SimsSplitsCompleteVideos.csv (';'-separated: VideoName;Subject;...;Split, split train = S1-3, S5-6,
    val = S7, test = S4, S8) + root/videos/<VideoName>.avi; the label from the name's prefix."""
    if split not in ("train", "val", "test"):
        raise ValueError(f"sims4action: split expected train, val or test, got {split!r}")
    path = os.path.join(root, "SimsSplitsCompleteVideos.csv")
    rows = _read_csv(path, ("VideoName", "Split"), "the official Sims4Action split file", delimiter=";")
    classes = list(SIMS4ACTION_CLASSES.values())
    samples = []
    for n, row in enumerate(rows):
        prefix = (row.get("VideoName") or "").split("_")[0]
        if prefix not in SIMS4ACTION_CLASSES or row.get("Split") not in ("train", "val", "test"):
            raise VideoReadError(f"{path}:{n + 2}: expected <{'|'.join(SIMS4ACTION_CLASSES)}>_... and a split "
                                 f"train/val/test, found {row.get('VideoName')!r} / {row.get('Split')!r}")
        if row["Split"] == split:
            samples.append((os.path.join(root, "videos", row["VideoName"]),
                            classes.index(SIMS4ACTION_CLASSES[prefix])))
    return samples, classes


# Toyota Smarthome's own protocols ("Toyota Smarthome: Real-World Activities of Daily Living", ICCV 2019) as the
# P-HLVC code's ADL dataset and 2s-AGCN-For-Daily-Living's smarthome_gendata.py list them: 31 actions (0-based ids,
# alphabetical); cross-subject trains on 11 subjects, tests on the other 7; cross-view uses 19 actions, cameras
# train 1 (CV1) or 1, 3, 4, 6, 7 (CV2), val 5, test 2.
TOYOTA_CLASSES = ("Cook.Cleandishes", "Cook.Cleanup", "Cook.Cut", "Cook.Stir", "Cook.Usestove", "Cutbread",
                  "Drink.Frombottle", "Drink.Fromcan", "Drink.Fromcup", "Drink.Fromglass", "Eat.Attable", "Eat.Snack",
                  "Enter", "Getup", "Laydown", "Leave", "Makecoffee.Pourgrains", "Makecoffee.Pourwater",
                  "Maketea.Boilwater", "Maketea.Insertteabag", "Pour.Frombottle", "Pour.Fromcan", "Pour.Fromkettle",
                  "Readbook", "Sitdown", "Takepills", "Uselaptop", "Usetablet", "Usetelephone", "Walk", "WatchTV")
TOYOTA_CV_CLASSES = ("Cutbread", "Drink.Frombottle", "Drink.Fromcan", "Drink.Fromcup", "Drink.Fromglass",
                     "Eat.Attable", "Eat.Snack", "Enter", "Getup", "Leave", "Pour.Frombottle", "Pour.Fromcan",
                     "Readbook", "Sitdown", "Takepills", "Uselaptop", "Usetablet", "Usetelephone", "Walk")
TOYOTA_CS_TRAIN_SUBJECTS = (3, 4, 6, 7, 9, 12, 13, 15, 17, 19, 25)
TOYOTA_CV_CAMERAS = {"cv1": {"train": (1,), "val": (5,), "test": (2,)},
                     "cv2": {"train": (1, 3, 4, 6, 7), "val": (5,), "test": (2,)}}


def parse_toyota_smarthome(root, split, class_map="sims4action", protocol=None):
    """root/mp4/<Action>_pNN_rNN_vNN_cNN.mp4. protocol None: the cross-domain target of Sims4Action (P-HLVC supp.
    Sec. 7.2): every video whose action `class_map` maps ("sims4action": TOYOTA_TO_SIMS, "phlvc-code"), labelled
    with the Sims4Action class, for every split name but "train". protocol "cs" / "cv1" / "cv2": Toyota's own
    protocols (TOYOTA_CLASSES / TOYOTA_CV_CLASSES; cs: train subjects vs the rest, val = test; cv: by camera)."""
    if protocol:
        classes = TOYOTA_CLASSES if protocol == "cs" else TOYOTA_CV_CLASSES
        split = "test" if protocol == "cs" and split != "train" else split
        folder = _need(os.path.join(root, "mp4"), "a folder of <Action>_pNN_rNN_vNN_cNN.mp4 files")
        parsed = [(f, re.fullmatch(r"(.+)_p(\d+)_r\d+_v\d+_c(\d+)\.mp4", f)) for f in sorted(os.listdir(folder))]
        return [(os.path.join(folder, f), classes.index(m[1])) for f, m in parsed if m and m[1] in classes and (
            (int(m[2]) in TOYOTA_CS_TRAIN_SUBJECTS) == (split == "train") if protocol == "cs" else
            int(m[3]) in TOYOTA_CV_CAMERAS[protocol][split])], list(classes)
    if _split_name(split) == "train":
        raise ValueError("toyota-smarthome: only the cross-domain test set (every mapped video) is built; "
                         "expected split val or test, got train")
    mapping = {"sims4action": TOYOTA_TO_SIMS, "phlvc-code": TOYOTA_TO_SIMS_PHLVC_CODE}[class_map]
    folder = _need(os.path.join(root, "mp4"), "a folder of <Action>_pNN_rNN_vNN_cNN.mp4 files")
    classes = list(SIMS4ACTION_CLASSES.values())
    samples = [(os.path.join(folder, f), classes.index(mapping[f.split("_")[0]])) for f in sorted(os.listdir(folder))
               if f.endswith(".mp4") and f.split("_")[0] in mapping]
    return samples, classes


def read_kinetics_skeleton_json(path, max_frames=300, people_in=5, people_out=2):
    """ST-GCN Kinetics-Skeleton JSON -> (float32 (3, T, 18, people_out) = (x - 0.5, y - 0.5, score), label_index).
    As st-gcn's Feeder_kinetics: up to people_in people per frame, coordinates zeroed where score == 0, people
    sorted per frame by total score, the first people_out kept. If every person has an "id" (convert-alphapose of
    AlphaPose --pose_track results), slot m holds one track throughout: tracks ranked by their summed score.
    max_frames None: T = the JSON's last frame_index + 1."""
    try:
        with open(path) as f:
            video = json.load(f)
        if max_frames is None:
            max_frames = max((int(frame["frame_index"]) + 1 for frame in video["data"]), default=0)
        data = np.zeros((3, max_frames, 18, people_in), dtype=np.float32)
        people = [p for frame in video["data"] for p in frame["skeleton"]]
        total = {}
        for p in people if people and all("id" in p for p in people) else ():
            total[p["id"]] = total.get(p["id"], 0.0) + sum(p["score"])
        slot = {i: m for m, i in enumerate(sorted(total, key=lambda i: -total[i]))}  # track id -> slot, {} = none
        for frame in video["data"]:
            t = int(frame["frame_index"])
            if t >= max_frames:
                continue
            for m, person in enumerate(frame["skeleton"] if slot else frame["skeleton"][:people_in]):
                m = slot[person["id"]] if slot else m
                if m >= people_in:
                    continue
                data[0, t, :, m] = person["pose"][0::2]
                data[1, t, :, m] = person["pose"][1::2]
                data[2, t, :, m] = person["score"]
        label = int(video.get("label_index", -1))
    except (KeyError, TypeError, IndexError, json.JSONDecodeError) as e:
        raise VideoReadError(f"{path}: not a Kinetics-Skeleton JSON ({type(e).__name__}: {e})") from None
    data[0:2] -= 0.5
    data[0][data[2] == 0] = 0
    data[1][data[2] == 0] = 0
    order = (-data[2].sum(axis=1)).argsort(axis=1)  # (T, M): people by descending total score per frame
    for t in range(max_frames if not slot else 0):
        data[:, t] = data[:, t][:, :, order[t]]
    return data[:, :, :, :people_out], label


def read_pose_json_cached(path, cache_dir, people=5):
    """`read_kinetics_skeleton_json(path, None, people, people)` through an .npy cache in cache_dir (None: parse
    every time) -> float32 (3, T_json, 18, M <= people); person slots empty in every frame are not stored. The file
    name hashes the JSON's real path, mtime, size, `people` and the reader's source code, so an edited JSON or
    reader is parsed again (old entries stay on disk, unread); written to a temporary file and renamed, so
    concurrent readers and writers see a whole file or none. A cache folder that cannot be written warns once."""
    if not cache_dir:
        return _trim_people(read_kinetics_skeleton_json(path, None, people, people)[0])
    st = os.stat(path)
    key = f"{os.path.realpath(path)}|{st.st_mtime_ns}|{st.st_size}|{people}|{_pose_reader_hash()}"
    cached = os.path.join(cache_dir, f"{os.path.splitext(os.path.basename(path))[0]}-"
                                     f"{hashlib.sha1(key.encode()).hexdigest()[:16]}.npy")
    try:
        return np.load(cached)
    except (OSError, ValueError, EOFError):  # not cached yet (a damaged file is parsed again and replaced)
        pass
    pose = _trim_people(read_kinetics_skeleton_json(path, None, people, people)[0])
    tmp = None
    try:
        os.makedirs(cache_dir, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache_dir, suffix=".npy.tmp")
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "wb") as f:
            np.save(f, pose)
        os.replace(tmp, cached)
    except OSError as e:
        if tmp and os.path.exists(tmp):
            os.remove(tmp)
        if cache_dir not in _POSE_CACHE_FAILED:
            _POSE_CACHE_FAILED.add(cache_dir)
            warnings.warn(f"{cache_dir}: pose JSON cache not written ({e}); parsing the JSON files every time")
    return pose


_POSE_CACHE_FAILED = set()


def _trim_people(pose):
    """(3, T, 18, M) -> (3, T, 18, M') without the trailing person slots that are empty in every frame."""
    used = np.flatnonzero(np.abs(pose).sum(axis=(0, 1, 2)) > 0)
    return np.ascontiguousarray(pose[..., :used[-1] + 1 if len(used) else 0])


@functools.lru_cache(maxsize=1)
def _pose_reader_hash():
    """A hash of the JSON reader's source: a changed reader never reads an old cache entry."""
    return hashlib.sha1((inspect.getsource(read_kinetics_skeleton_json) + inspect.getsource(_trim_people))
                        .encode()).hexdigest()[:16]


# AlphaPose (COCO-17) -> OpenPose COCO-18 order; None = the neck, which COCO-17 lacks (AlphaPose's own "--format
# open" writer: the shoulders' midpoint, their mean score).
COCO17_TO_COCO18 = [0, None, 6, 8, 10, 5, 7, 9, 12, 14, 16, 11, 13, 15, 2, 1, 4, 3]


def alphapose_to_stgcn(path, width, height):
    """AlphaPose results (alphapose-results.json: a list of {"image_id": "<frame>.jpg", "category_id": 1,
    "keypoints": 17 x (x, y, score) in pixels, "score", "idx": track id (--pose_track; a list without tracking)})
    -> the ST-GCN Kinetics-Skeleton dict read_kinetics_skeleton_json reads: per frame the people as COCO-18
    (x / width, y / height, score), plus "id" = idx where it is a track id (a number, not a list). P-HLVC supp.
    Sec. 7.2 (Sims4Action, Toyota Smarthome poses)."""
    try:
        with open(path) as f:
            results = json.load(f)
        frames = {}
        for r in results:
            k = np.asarray(r["keypoints"], dtype=np.float64).reshape(17, 3)  # (17, 3) x, y, score
            k18 = np.stack([(k[5] + k[6]) / 2 if j is None else k[j] for j in COCO17_TO_COCO18])  # (18, 3)
            t = int(os.path.splitext(os.path.basename(str(r["image_id"])))[0])
            idx = r.get("idx", [])
            frames.setdefault(t, []).append({
                "pose": np.round(k18[:, :2] / (width, height), 4).reshape(-1).tolist(),  # x0, y0, x1, y1, ...
                "score": np.round(k18[:, 2], 4).tolist(), **({} if isinstance(idx, list) else {"id": int(idx)})})
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError, IndexError) as e:
        raise UserError(f"{path}: expected AlphaPose results (a list of {{image_id: '<frame>.jpg', keypoints: 51 "
                        f"numbers, idx}}), found {type(e).__name__}: {e}") from None
    return {"data": [{"frame_index": t, "skeleton": people} for t, people in sorted(frames.items())],
            "label": "unknown", "label_index": -1}


def convert_alphapose(src, dst, width=None, height=None, videos=None):
    """`python common.py convert-alphapose`: src = one alphapose-results.json -> dst file, or a folder of
    <name>.json / <name>/alphapose-results.json -> dst/<name>.json. Frame size: width, height, else the first frame
    of `videos` (the video file; with a folder: videos/<name>.*). Every input is checked before anything is
    written. Returns the number of files written."""
    if os.path.isdir(src):
        names = sorted(n[:-len(".json")] if n.endswith(".json") else n for n in os.listdir(src)
                       if n.endswith(".json") or os.path.isfile(os.path.join(src, n, "alphapose-results.json")))
        jobs = [(os.path.join(src, n + ".json") if os.path.isfile(os.path.join(src, n + ".json")) else
                 os.path.join(src, n, "alphapose-results.json"), os.path.join(dst, n + ".json"), n) for n in names]
    else:
        jobs = [(src, dst, None)] if os.path.isfile(src) else []
    if not jobs:
        raise UserError(f"convert-alphapose --src {src}: expected an AlphaPose results JSON or a folder of them, "
                        f"found nothing")
    sizes, listing = [], sorted(os.listdir(videos)) if videos and os.path.isdir(videos) else []
    for path, _, name in jobs:
        video = videos if name is None else next(
            (os.path.join(videos, v) for v in listing if os.path.splitext(v)[0] == name), None)
        if width is None and (video is None or not os.path.exists(video)):
            raise UserError(f"convert-alphapose {path}: expected --width and --height, or --videos holding its "
                            f"video, found {video or 'neither'}")
        sizes.append((width, height) if width else read_video_frames(video, [0]).shape[2:0:-1])  # (W, H)
        alphapose_to_stgcn(path, *sizes[-1])  # a broken file: UserError now, before anything is written
    for (path, out, _), size in zip(jobs, sizes):
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out + ".tmp", "w") as f:
            json.dump(alphapose_to_stgcn(path, *size), f, separators=(",", ":"))
        os.replace(out + ".tmp", out)
    return len(jobs)


def read_depth_frames(folder, indices):
    """16-bit depth PNGs (NTU masked depth: MDepth-%08d.png, any sorted *.png works) -> float32 (T, H, W) metres
    (stored millimetres / 1000; 0 = no depth), indices clamped."""
    from PIL import Image
    try:
        names = sorted(n for n in os.listdir(folder) if n.endswith(".png"))
    except OSError as e:
        raise VideoReadError(f"{folder}: cannot list depth folder ({e.strerror})") from None
    if not names:
        raise VideoReadError(f"{folder}: expected MDepth-00000001.png ... depth frames, found none")
    out = []
    for i in _clamp(indices, len(names)).tolist():
        path = os.path.join(folder, names[i])
        try:
            with Image.open(path) as img:
                out.append(np.asarray(img).astype(np.float32) / 1000.0)
        except (OSError, ValueError) as e:
            raise VideoReadError(f"{path}: cannot decode PNG ({e})") from None
    return np.stack(out)


def read_ntu_skeleton(path, max_bodies=2):
    """Raw NTU RGB+D .skeleton text -> float32 (3, T, 25, max_bodies) x, y, z in metres. Bodies are tracked by
    bodyID; the max_bodies with the largest motion energy of 2s-AGCN's `get_nonzero_std` (see ntu_body_energy)
    are kept, most energetic first; absent bodies are zero. (2s-AGCN indexes bodies by their position in each
    frame's list, at most 4, so a body that another one precedes in some frames is split over two slots; here a
    body is one bodyID, which is what the energy is meant to rank.)"""
    try:
        with open(path) as f:
            tokens = f.read().split("\n")
        pos = 0

        def line():
            nonlocal pos
            pos += 1
            return tokens[pos - 1].split()
        num_frames = int(line()[0])
        bodies = {}
        for t in range(num_frames):
            for _ in range(int(line()[0])):
                body_id = line()[0]
                num_joints = int(line()[0])
                block = " ".join(tokens[pos:pos + num_joints]).split()  # num_joints rows of 12 fields
                pos += num_joints
                joints = np.array(block, dtype=np.float32).reshape(num_joints, -1)[:, :3]  # (25, 3) x, y, z
                bodies.setdefault(body_id, np.zeros((num_frames, 25, 3), dtype=np.float32))[t] = joints[:25]
    except (ValueError, IndexError) as e:
        raise VideoReadError(f"{path}: not an NTU .skeleton file ({type(e).__name__}: {e})") from None
    out = np.zeros((3, num_frames, 25, max_bodies), dtype=np.float32)
    ranked = sorted(bodies.values(), key=ntu_body_energy, reverse=True)  # stable: ties keep file order
    for m, b in enumerate(ranked[:max_bodies]):
        out[:, :, :, m] = b.transpose(2, 0, 1)
    return out


def ntu_body_energy(body):
    """2s-AGCN `get_nonzero_std`: body (T, 25, 3) -> std of x + std of y + std of z, each over all joints of the
    valid frames (coordinate sum != 0), in float64. Spatial spread counts, so a still person (about 0.5 m of
    spread) outranks a briefly tracked, jittering noise body (a few centimetres)."""
    body = np.asarray(body, dtype=np.float64)
    valid = body[body.sum(axis=(1, 2)) != 0]  # (T', 25, 3)
    return float(sum(valid[:, :, axis].std() for axis in range(3))) if len(valid) else 0.0


def pku_layout(root, split_file):
    """PKU-MMD (I or II) -> (skeleton folder, label folder, path of Split/<split_file>, {"train": [seq, ...], "val":
    [...]}) from its 'Training videos:' / 'Validation videos:' blocks of comma-separated sequence names."""
    skeleton_dir = _first_existing(root, ["PKU_Skeleton_Renew", "skeleton"], "per-sequence skeleton .txt files")
    label_dir = _first_existing(root, ["Train_Label_PKU_final", "label"], "per-sequence label .txt files")
    path = os.path.join(_first_existing(root, ["Split", "split"], "cross-subject.txt / cross-view.txt"), split_file)
    lists, current = {"train": [], "val": []}, None
    for line in _read_lines(path, "'Training videos:' / 'Validation videos:' blocks"):
        low = line.lower()
        if low.startswith("training"):
            current = "train"
        elif low.startswith("validat") or low.startswith("testing"):
            current = "val"
        elif current:
            lists[current] += [s.strip() for s in line.split(",") if s.strip()]
    return skeleton_dir, label_dir, path, lists


def read_pku_labels(path):
    """PKU-MMD label file ('label,start,end,confidence' rows, 1-based labels) -> (K, 3) int64 rows (label from 0,
    start, end), frames inclusive."""
    rows = [[int(float(v)) for v in row.split(",")[:3]] for row in
            _read_lines(path, "'label,start,end,confidence' rows")]
    return np.asarray(rows, dtype=np.int64).reshape(-1, 3) - [1, 0, 0]


def read_pku_skeleton(path):
    """PKU-MMD skeleton file (one row of 150 floats per frame: 2 bodies x 25 joints x xyz) -> float32 (3, T, 25, 2)."""
    raw = np.loadtxt(_need(path, "150 floats per frame"), dtype=np.float32, ndmin=2)  # (T, 150)
    if raw.shape[1] != 150:
        raise VideoReadError(f"{path}: expected 150 floats per row, got {raw.shape[1]}")
    return raw.reshape(-1, 2, 25, 3).transpose(3, 0, 2, 1)


# ==================================================================================================== TOY DATA
# Real files in the real formats, written once under --data-root (in a temporary folder renamed into
# place, so concurrent ranks agree) and read by the same code as the real datasets. Every random draw comes from
# np.random.default_rng([seed, ...]): same seed, same files.


TOY_MOTION_CLASSES = ["right", "left", "down", "up", "circle_cw", "circle_ccw", "zigzag", "shake_vertical"]

TOY_SKELETON_ACTIONS = ["wave_right", "wave_left", "raise_both_hands", "kick_right", "squat", "jump", "bow",
                        "clap", "punch_right", "touch_head", "handshake", "high_five"]


def _build_once(root, make, version=None):
    """make(tmp_dir) fills a fresh folder that is then renamed to root; a no-op when root/.complete exists. With a
    version (written to root/.format), a complete set of another or no version is deleted and made again."""
    if os.path.exists(os.path.join(root, ".complete")):
        if version is None or _read_text(os.path.join(root, ".format")) == version:
            return root
        shutil.rmtree(root)  # an older format of this toy set (the .complete marker says the folder is one)
    parent = os.path.dirname(os.path.abspath(root))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(os.path.abspath(root))}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    make(tmp)
    if version is not None:
        with open(os.path.join(tmp, ".format"), "w") as f:
            f.write(version)
    open(os.path.join(tmp, ".complete"), "w").close()
    if os.path.exists(os.path.join(root, ".complete")):  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
        return root
    if os.path.isdir(root) and not os.listdir(root):
        os.rmdir(root)
    try:
        os.rename(tmp, root)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not os.path.exists(os.path.join(root, ".complete")):
            raise VideoReadError(f"{root}: exists but is not a complete toy dataset; delete it to regenerate")
    return root


def _toy_background(rng, size, width=None, levels=(0, 255)):
    """Smooth colour field (8x8 noise uniform in levels, bilinear) plus grain -> float (size, width or size, 3)."""
    width = size if width is None else width
    coarse = torch.from_numpy(rng.uniform(*levels, (1, 3, 8, 8)).astype(np.float32))
    smooth = F.interpolate(coarse, size=(size, width), mode="bilinear", align_corners=False)[0].permute(1, 2, 0)
    return smooth.numpy() + rng.normal(0, 10, (size, width, 3)).astype(np.float32)


# toy-motion files vary like a prepared real collection (`prepare-videos`: one short side): aspect ratio (landscape
# and portrait, sides that are no multiple of the 16-pixel macroblock; even, as 4:2:0 H.264 needs; width 72 hits
# decord's width bug, so PyAV takes over), length, frame rate and keyframe interval (GOP), so every clip still goes
# through the real decode, clamp and resize paths.
TOY_MOTION_SIZES = ((64, 64), (64, 86), (64, 114), (64, 72), (64, 96), (86, 64), (114, 64), (64, 70))  # (H, W)
TOY_MOTION_FRAMES = (16, 40)  # frame count drawn uniformly from this range
TOY_MOTION_FPS = (8, 12, 15, 24, 25, Fraction(30000, 1001))
TOY_MOTION_GOPS = (1, 4, 8, 16, 32, 250)  # 1: every frame a keyframe; 250: one keyframe (libx264's default)
TOY_MOTION_VERSION = "3"  # written to root/.format; a set of another format is rebuilt
TOY_MOTION_FLOW_VERSION = "2"  # the same for toy-motion-flow
# toy-motion-flow: a low-contrast background and a large, light object, as a filmed actor stands out from the scene
# and looks alike across videos; with toy-motion's full-contrast background and any-colour object, background and
# colour identify each video and self-supervised RGB features learn them instead of the motion.
TOY_MOTION_FLOW_RENDER = dict(background_levels=(90, 166), object_levels=(180, 240), radius_range=(8, 14))


def toy_motion_format(rng):
    """One toy-motion file's container format -> dict(size=(H, W), num_frames, fps, gop); the first draws of rng."""
    size = TOY_MOTION_SIZES[int(rng.integers(len(TOY_MOTION_SIZES)))]
    num_frames = int(rng.integers(TOY_MOTION_FRAMES[0], TOY_MOTION_FRAMES[1] + 1))
    fps = TOY_MOTION_FPS[int(rng.integers(len(TOY_MOTION_FPS)))]
    return dict(size=size, num_frames=num_frames, fps=fps, gop=TOY_MOTION_GOPS[int(rng.integers(len(TOY_MOTION_GOPS)))])


def render_toy_motion(rng, label, size=64, num_frames=16, background_levels=(0, 255), object_levels=(0, 255),
                      radius_range=(4, 8)):
    """uint8 (T, H, W, 3): one object moving with pattern TOY_MOTION_CLASSES[label] on a static textured
    background; size = H = W or (H, W). Positions wrap around the frame (a torus) and start uniformly at random,
    so in every single frame the object position, like its shape, size and colour, has the same distribution for
    every class. Speeds are in pixels per frame (the frame rate of the file does not change them). The background's
    coarse colours are uniform in background_levels, the object's RGB in object_levels, its radius in radius_range."""
    height, width = (size, size) if np.isscalar(size) else size
    bg = _toy_background(rng, height, width, background_levels)
    colour = rng.uniform(*object_levels, 3).astype(np.float32)
    radius, shape = rng.uniform(*radius_range), int(rng.integers(3))  # disc, square, diamond
    t = np.arange(num_frames, dtype=np.float64)
    p0 = rng.uniform(0, 1, 2) * (width, height)  # (x, y)
    speed = rng.uniform(2.0, 3.5)
    name = TOY_MOTION_CLASSES[label]
    if name in ("right", "left", "down", "up"):
        d = {"right": (1, 0), "left": (-1, 0), "down": (0, 1), "up": (0, -1)}[name]
        x, y = p0[0] + d[0] * speed * t, p0[1] + d[1] * speed * t
    elif name in ("circle_cw", "circle_ccw"):  # image y points down: increasing angle turns clockwise on screen
        r, omega, phase = rng.uniform(8, 14), rng.uniform(0.35, 0.55), rng.uniform(0, 2 * np.pi)
        angle = phase + (omega if name == "circle_cw" else -omega) * t
        x, y = p0[0] + r * np.cos(angle), p0[1] + r * np.sin(angle)
    elif name == "zigzag":  # rightwards with a triangular vertical swing
        amp, period, phase = rng.uniform(6, 10), rng.uniform(5, 7), rng.uniform(0, 1)
        tri = 2 * np.abs(2 * ((t / period + phase) % 1) - 1) - 1
        x, y = p0[0] + speed * t, p0[1] + amp * tri
    else:  # shake_vertical: fast up-down oscillation in place
        amp, period, phase = rng.uniform(6, 10), rng.uniform(4, 6), rng.uniform(0, 2 * np.pi)
        x, y = p0[0] + 0 * t, p0[1] + amp * np.sin(2 * np.pi * t / period + phase)
    dx = (np.arange(width)[None, None, :] - x[:, None, None] + width / 2) % width - width / 2  # wrapped (T, 1, W)
    dy = (np.arange(height)[None, :, None] - y[:, None, None] + height / 2) % height - height / 2  # (T, H, 1)
    if shape == 0:
        mask = dx ** 2 + dy ** 2 <= radius ** 2  # (T, H, W)
    elif shape == 1:
        mask = (np.abs(dx) <= radius * 0.85) & (np.abs(dy) <= radius * 0.85)
    else:
        mask = np.abs(dx) + np.abs(dy) <= radius * 1.2
    return _paint(bg, colour, mask)


def _paint(bg, colour, mask):
    """One colour where mask (T, H, W) is set, the background float (H, W, 3) elsewhere -> uint8 (T, H, W, 3)."""
    return np.clip(np.where(mask[..., None], colour, bg), 0, 255).astype(np.uint8)


def make_toy_motion(root, seed=0, train_per_class=24, val_per_class=8):
    """root/{train,val}/<class>/<class>_<k:04d>.mp4 (H.264): the videofolder layout; 8 classes. Each file's size,
    length, frame rate and GOP come from toy_motion_format (same seed, same files)."""
    def make(tmp):
        for split, count in (("train", train_per_class), ("val", val_per_class)):
            for label, name in enumerate(TOY_MOTION_CLASSES):
                for k in range(count):
                    rng = np.random.default_rng([seed, split == "val", label, k])
                    fmt = toy_motion_format(rng)
                    frames = render_toy_motion(rng, label, fmt["size"], fmt["num_frames"])
                    write_video(os.path.join(tmp, split, name, f"{name}_{k:04d}.mp4"), frames, fps=fmt["fps"],
                                gop=fmt["gop"])
    return _build_once(root, make, TOY_MOTION_VERSION)


def toy_motion_flow(frames):
    """True forward flow of a rendered toy-motion video, uint8 (T, H, W, 3) -> float32 (T - 1, H, W, 2) pixels:
    the object (the uniformly coloured pixels: its colour is the most frequent RGB triple of frame 0; the
    background is noisy) moves rigidly, so its pixels in frame t carry the displacement of its centre from t to
    t + 1 (circular means: positions wrap around the frame); the static background has zero flow."""
    t, h, w, _ = frames.shape
    colours, counts = np.unique(frames[0].reshape(-1, 3), axis=0, return_counts=True)
    mask = (frames == colours[counts.argmax()]).all(-1)  # (T, H, W) object pixels

    def centre(m, axis, n):  # circular mean position of the mask along one image axis
        angle = 2 * np.pi * np.nonzero(m)[axis] / n
        return np.angle(np.exp(1j * angle).mean()) * n / (2 * np.pi)

    flow = np.zeros((t - 1, h, w, 2), dtype=np.float32)
    for k in range(t - 1):
        if mask[k].any() and mask[k + 1].any():
            dx = (centre(mask[k + 1], 1, w) - centre(mask[k], 1, w) + w / 2) % w - w / 2
            dy = (centre(mask[k + 1], 0, h) - centre(mask[k], 0, h) + h / 2) % h - h / 2
            flow[k][mask[k]] = (dx, dy)
    return flow


def make_toy_motion_flow(root, seed=0, size=64, num_frames=16, train_per_class=24, val_per_class=32):
    """The toy-motion motions (same seeds) as CoCLR-layout frame folders with their true flow:
    root/{train,val}/<class>/<class>_<k:04d>/{image_%05d.jpg (T frames), flow_%05d.jpg (T - 1 frames, +-20 px)}.
    Rendered with TOY_MOTION_FLOW_RENDER so that RGB carries the motion (vicc.py's docstring has the measurements)."""
    from PIL import Image

    def make(tmp):
        for split, count in (("train", train_per_class), ("val", val_per_class)):
            for label, name in enumerate(TOY_MOTION_CLASSES):
                for k in range(count):
                    rng = np.random.default_rng([seed, split == "val", label, k])  # as make_toy_motion
                    frames = render_toy_motion(rng, label, size, num_frames, **TOY_MOTION_FLOW_RENDER)
                    folder = os.path.join(tmp, split, name, f"{name}_{k:04d}")
                    os.makedirs(folder)
                    for i, img in enumerate(frames):
                        Image.fromarray(img).save(os.path.join(folder, f"image_{i + 1:05d}.jpg"), quality=95)
                    write_flow_frames(toy_motion_flow(frames), folder)
    return _build_once(root, make, TOY_MOTION_FLOW_VERSION)


def _read_text(path):
    """Contents of a small text file, stripped; None when it does not exist."""
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def render_toy_repetitions(rng, count, size=64):
    """One object swinging back and forth `count` times with a random period (6-14 frames) on a static textured
    background, after a short random lead-in and before a short tail -> (uint8 (T, size, size, 3), bounds):
    bounds (count + 1,) are the 1-based frame numbers where each cycle starts and the last one ends (UCFRep)."""
    bg = _toy_background(rng, size)
    colour = rng.uniform(0, 255, 3).astype(np.float32)
    radius = rng.uniform(4, 7)
    period = rng.uniform(6, 14)
    lead, tail = int(rng.integers(0, 5)), int(rng.integers(0, 5))
    num_frames = lead + int(np.ceil(count * period)) + 1 + tail
    bounds = lead + 1 + np.round(np.arange(count + 1) * period).astype(np.int64)  # frame numbers, 1-based
    centre, amp = rng.uniform(size * 0.35, size * 0.65, 2), rng.uniform(8, 14)
    direction = rng.uniform(0, 2 * np.pi)
    t = np.arange(num_frames, dtype=np.float64) - lead  # phase 0 at the first bound
    swing = amp * np.sin(2 * np.pi * t / period)  # (T,) one full back-and-forth per cycle
    x, y = centre[0] + swing * np.cos(direction), centre[1] + swing * np.sin(direction)
    grid = np.arange(size, dtype=np.float64)
    mask = (grid[None, None, :] - x[:, None, None]) ** 2 + (grid[None, :, None] - y[:, None, None]) ** 2 <= radius ** 2
    return _paint(bg, colour, mask), bounds  # mask (T, H, W)


def make_toy_ucfrep(root, seed=0, size=64, num_train=48, num_val=16, counts=(2, 8)):
    """The UCFRep layout: root/annotations/{train,val}/<video>.json ({"temporal_bound": [...]}) and
    root/frames/<video>/image_%05d.jpg; every video repeats one swing counts[0]..counts[1] times."""
    from PIL import Image

    def make(tmp):
        for split, number in (("train", num_train), ("val", num_val)):
            os.makedirs(os.path.join(tmp, "annotations", split))
            for k in range(number):
                rng = np.random.default_rng([seed, 3000, split == "val", k])
                frames, bounds = render_toy_repetitions(rng, int(rng.integers(counts[0], counts[1] + 1)), size)
                name = f"toy_{split}_{k:04d}"
                os.makedirs(os.path.join(tmp, "frames", name))
                for t, frame in enumerate(frames):
                    Image.fromarray(frame).save(os.path.join(tmp, "frames", name, f"image_{t + 1:05d}.jpg"),
                                                quality=95)
                with open(os.path.join(tmp, "annotations", split, f"{name}.json"), "w") as f:
                    json.dump({"temporal_bound": bounds.tolist()}, f)
    return _build_once(root, make)


# NTU joints (0-based): 0 spine base, 1 spine mid, 2 neck, 3 head, 4-7 left shoulder/elbow/wrist/hand,
# 8-11 right shoulder/elbow/wrist/hand, 12-15 left hip/knee/ankle/foot, 16-19 right hip/knee/ankle/foot,
# 20 spine shoulder, 21/22 left hand tip/thumb, 23/24 right hand tip/thumb. Body frame: x left, y up, z back.
_TOY_REST = np.array([
    [0, 1.0, 0], [0, 1.25, 0], [0, 1.5, 0], [0, 1.65, 0],
    [0.18, 1.45, 0], [0.2, 1.18, 0], [0.22, 0.95, 0], [0.22, 0.88, 0],
    [-0.18, 1.45, 0], [-0.2, 1.18, 0], [-0.22, 0.95, 0], [-0.22, 0.88, 0],
    [0.1, 0.95, 0], [0.1, 0.52, 0], [0.1, 0.08, 0], [0.1, 0.0, -0.1],
    [-0.1, 0.95, 0], [-0.1, 0.52, 0], [-0.1, 0.08, 0], [-0.1, 0.0, -0.1],
    [0, 1.45, 0], [0.22, 0.81, 0], [0.25, 0.87, 0], [-0.22, 0.81, 0], [-0.25, 0.87, 0]], dtype=np.float64)


def _limb_dir(elev, azim, side):
    """Unit vectors (T, 3): elev from straight down (0) to straight up (pi); azim 0 = sideways out, pi/2 =
    forward (-z). side +1 left, -1 right."""
    elev, azim = np.broadcast_arrays(np.asarray(elev, dtype=np.float64), np.asarray(azim, dtype=np.float64))
    return np.stack([side * np.sin(elev) * np.cos(azim), -np.cos(elev), -np.sin(elev) * np.sin(azim)], -1)


def _set_arm(P, side, upper, fore):
    """Place one arm of poses P (T, 25, 3) from the shoulder: upper arm and forearm along unit vectors (T, 3)."""
    s, e, w, h, tip, thumb = (4, 5, 6, 7, 21, 22) if side > 0 else (8, 9, 10, 11, 23, 24)
    P[:, e] = P[:, s] + 0.27 * upper
    P[:, w] = P[:, e] + 0.24 * fore
    P[:, h], P[:, tip] = P[:, w] + 0.07 * fore, P[:, w] + 0.14 * fore
    P[:, thumb] = P[:, w] + 0.06 * fore + np.array([side * 0.03, 0, -0.02])


def _set_leg(P, side, thigh, shin):
    """Place one leg of poses P (T, 25, 3) from the hip: thigh and shin along unit vectors (T, 3)."""
    hip, knee, ankle, foot = (12, 13, 14, 15) if side > 0 else (16, 17, 18, 19)
    P[:, knee] = P[:, hip] + 0.43 * thigh
    P[:, ankle] = P[:, knee] + 0.44 * shin
    P[:, foot] = P[:, ankle] + np.array([0, -0.08, -0.1])


def toy_skeleton_pose(action, s, rng):
    """Joint positions (M=2, T, 25, 3) in the body frame for phase s (T,) in [0, 1]."""
    T = len(s)
    P = np.repeat(_TOY_REST[None], T, 0)  # (T, 25, 3)
    Q = np.zeros_like(P)
    reps = rng.uniform(2, 3)
    osc = np.sin(2 * np.pi * reps * s)
    bump = np.sin(np.pi * s)  # 0 -> 1 -> 0
    down = lambda: _limb_dir(np.full(T, 0.05), 0, 1)  # noqa: E731
    name = TOY_SKELETON_ACTIONS[action]
    if name in ("wave_right", "wave_left"):
        side = -1 if name == "wave_right" else 1
        _set_arm(P, side, _limb_dir(0.55 * np.pi * bump + 0.05, 0.2, side),
                 _limb_dir(0.05 + bump * (0.8 * np.pi + 0.25 * osc), 0.1, side))
    elif name == "raise_both_hands":
        for side in (1, -1):
            _set_arm(P, side, _limb_dir(0.05 + 0.9 * np.pi * bump, 0.3, side),
                     _limb_dir(0.05 + 0.92 * np.pi * bump, 0.3, side))
    elif name == "kick_right":
        lift = np.clip(np.sin(2 * np.pi * reps / 2 * s), 0, None)
        _set_leg(P, -1, _limb_dir(0.5 * np.pi * lift, np.pi / 2, -1),
                 _limb_dir(0.45 * np.pi * lift, np.pi / 2, -1))
    elif name in ("squat", "jump"):
        if name == "squat":
            drop = 0.35 * np.clip(np.abs(osc) * 1.2, 0, 1) * bump
            knee = np.arccos(np.clip((0.87 - drop) / 0.87, -1, 1))
            P[:, [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 16, 20, 21, 22, 23, 24], 1] -= drop[:, None]
            for side in (1, -1):
                _set_leg(P, side, _limb_dir(knee, np.pi / 2, side), _limb_dir(knee, -np.pi / 2, side))
                arm = _limb_dir(0.5 * np.pi * bump, np.pi / 2, side)  # arms forward for balance
                _set_arm(P, side, arm, arm)
        else:
            P[:, :, 1] += 0.3 * np.clip(osc, 0, None)[:, None]
            for side in (1, -1):
                _set_arm(P, side, _limb_dir(0.1 + 0.4 * np.clip(osc, 0, None), 0, side), down())
    elif name == "bow":
        angle = 0.9 * bump
        upper = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 20, 21, 22, 23, 24]
        rel = P[:, upper] - P[:, :1]
        c, sn = np.cos(angle)[:, None], np.sin(angle)[:, None]
        y, z = rel[..., 1].copy(), rel[..., 2].copy()
        rel[..., 1], rel[..., 2] = c * y + sn * z, -sn * y + c * z  # forward (-z) rotation about x
        P[:, upper] = P[:, :1] + rel
    elif name == "clap":
        gap = 0.5 * (1 + np.cos(2 * np.pi * reps * s))  # 1 = open, 0 = hands together
        for side in (1, -1):
            _set_arm(P, side, _limb_dir(0.4 * np.pi, np.pi / 2 - 0.3 * gap, side),
                     _limb_dir(0.5 * np.pi, np.pi - 0.4 - 0.6 * gap, side))
    elif name == "punch_right":
        ext = np.clip(np.sin(2 * np.pi * reps * s), 0, None)
        _set_arm(P, -1, _limb_dir(0.3 * np.pi + 0.2 * np.pi * ext, np.pi / 2, -1),
                 _limb_dir(0.5 * np.pi, np.pi / 2 + (1 - ext) * 0.9, -1))
        _set_arm(P, 1, _limb_dir(0.3 * np.pi, np.pi / 2, 1), _limb_dir(0.75 * np.pi, np.pi / 2, 1))
    elif name == "touch_head":
        for side in (1, -1):
            _set_arm(P, side, _limb_dir(0.05 + 0.7 * np.pi * bump, 0.2, side),
                     _limb_dir(0.05 + 0.95 * np.pi * bump, np.pi - 0.2, side))
    else:  # two-person actions: the partner faces the subject 0.9 m away (rotated by pi about y)
        Q = np.repeat(_TOY_REST[None], T, 0)
        for B, sign in ((P, 1), (Q, -1)):
            if name == "handshake":
                _set_arm(B, -1, _limb_dir(0.3 * np.pi * bump, np.pi / 2 - 0.3, -1),
                         _limb_dir(0.45 * np.pi * bump + 0.08 * osc * bump, np.pi / 2 + 0.6, -1))
            else:  # high_five
                _set_arm(B, -1, _limb_dir(0.05 + 0.8 * np.pi * bump, np.pi / 2 - 0.5, -1),
                         _limb_dir(0.05 + 0.95 * np.pi * bump, np.pi / 2 - 0.3, -1))
        Q = Q * np.array([-1, 1, -1]) + np.array([0, 0, -0.9])
    return np.stack([P, Q])


def toy_skeleton_sample(seed, subject, action, rep, num_frames=64, min_frames=40):
    """One toy-skeleton sample -> (float32 (3, num_frames, 25, 2) zero-padded, NTU-style name, valid length).
    Random: view rotation about y (+-60 deg), scale (subject x sample), speed, start offset, valid length,
    lateral position and camera distance (2.5-3.5 m), joint noise (1 cm)."""
    subject_scale = np.random.default_rng([seed, 1000, subject]).uniform(0.85, 1.15)
    rng = np.random.default_rng([seed, subject, action, rep])
    length = int(rng.integers(min_frames, num_frames + 1))
    offset = int(rng.integers(0, 9))
    speed = rng.uniform(0.8, 1.25)
    s = np.clip((np.arange(length) - offset) * speed / (length - offset), 0, 1)
    pose = toy_skeleton_pose(action, s, rng)  # (2, L, 25, 3)
    present = np.abs(pose).sum(axis=(1, 2, 3)) > 0
    view = rng.uniform(-np.pi / 3, np.pi / 3)
    c, sn = np.cos(view), np.sin(view)
    rot = np.array([[c, 0, sn], [0, 1, 0], [-sn, 0, c]])
    pose = pose * subject_scale * rng.uniform(0.95, 1.05) @ rot.T
    pose = pose + np.array([rng.uniform(-0.3, 0.3), -0.9, rng.uniform(2.5, 3.5)])
    pose = pose + rng.normal(0, 0.01, pose.shape)
    pose[~present] = 0
    x = np.zeros((3, num_frames, 25, 2), dtype=np.float32)
    x[:, :length] = pose.transpose(3, 1, 2, 0)
    camera = 1 + min(2, int((view + np.pi / 3) / (2 * np.pi / 9)))  # 3 view bins
    return x, f"S001C{camera:03d}P{subject:03d}R{rep + 1:03d}A{action + 1:03d}", length


def _toy_extra_bodies(rng, actor, length, two_person):
    """The NTU quirks a toy sequence may carry besides its actors, as {bodyID: (length, 25, 3)} (zero = not
    tracked): a still bystander beside single-person actions (15 %, tracked for part of the sequence) and a short
    ghost body (20 %: 3-8 frames of joints jittering +-5 cm around one point, as Kinect's false detections)."""
    extra = {}
    if not two_person and rng.random() < 0.15:
        side = rng.choice([-1.0, 1.0])
        where = np.array([side * rng.uniform(1.0, 1.5), -0.9, rng.uniform(3.2, 4.0)])
        sway = 0.02 * np.sin(np.linspace(0, rng.uniform(2, 6), length))[:, None, None] * np.array([1.0, 0, 0])
        body = _TOY_REST[None] + where + sway + rng.normal(0, 0.01, (length, 25, 3))
        start = int(rng.integers(0, length // 2 + 1))
        body[:start] = 0
        extra[f"7205759403793{int(rng.integers(1000, 9999))}"] = body
    if rng.random() < 0.2:
        span = int(rng.integers(3, 9))
        start = int(rng.integers(0, length - span + 1))
        centre = actor[start, 0] + rng.uniform(-0.6, 0.6, 3)
        body = np.zeros((length, 25, 3))
        body[start:start + span] = centre + rng.normal(0, 0.05, (span, 25, 3))
        extra[f"7205759403794{int(rng.integers(1000, 9999))}"] = body
    return extra


def _write_ntu_skeleton_file(path, bodies, length):
    """bodies {bodyID: (length, 25, 3) camera coordinates, zero where untracked} -> an NTU RGB+D .skeleton text file
    (per frame: the tracked bodies with the 10 body fields and 25 joint rows of 12 fields; x y z are what readers
    use, depth/colour pixels are a pinhole projection, orientations 0, tracking state 2)."""
    lines = [str(length)]
    for t in range(length):
        present = [(body_id, b[t]) for body_id, b in bodies.items() if np.any(b[t])]
        lines.append(str(len(present)))
        for body_id, joints in present:
            lines += [f"{body_id} 0 1 1 1 1 0 0.0 0.0 2", "25"]
            z = np.maximum(joints[:, 2], 0.1)
            u, v = 256 + 365 * joints[:, 0] / z, 212 - 365 * joints[:, 1] / z  # depth camera 512x424
            rows = np.column_stack([joints, u, v, 3.75 * u, 2.55 * v]).tolist()  # Python floats format ~5x faster
            lines += ["%.7f %.7f %.7f %.4f %.4f %.3f %.3f 0 0 0 0 2" % tuple(row) for row in rows]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def make_toy_skeleton(root, seed=0, max_length=96, subjects=10, train_subjects=7, per_subject=3):
    """Toy NTU RGB+D, made like the real set: raw nturgb+d_skeletons/S001C<view>P<subject>R<rep>A<action>.skeleton
    text files, converted by the real `convert_ntu_skeletons` (ntu60-xsub) to {train,val}_data_joint.npy float32
    (N, 3, 300, 25, 2) zero-padded, {train,val}_label.pkl, {train,val}_num_frame.npy. Valid lengths 40..max_length
    (toy_skeleton_sample); two-person actions have two bodies; some sequences carry a bystander or a short ghost
    body (_toy_extra_bodies) that the converter ranks by motion energy like real ones. Subjects 1..train_subjects
    get NTU-60 cross-subject training IDs, the rest evaluation IDs (the split is the converter's)."""
    if os.path.exists(os.path.join(root, ".complete")) and not os.path.isdir(os.path.join(root, "nturgb+d_skeletons")):
        raise UserError(f"{root}: a toy-skeleton made by an older version (64 stored frames, no raw files); "
                        f"delete the folder to regenerate it")
    val_ids = [p for p in range(1, 41) if p not in NTU_XSUB_TRAIN]
    if train_subjects > len(NTU_XSUB_TRAIN) or subjects - train_subjects > len(val_ids):
        raise ValueError(f"make_toy_skeleton: at most {len(NTU_XSUB_TRAIN)} training subjects, got {train_subjects}")
    person_ids = list(NTU_XSUB_TRAIN[:train_subjects]) + val_ids[:subjects - train_subjects]

    def make(tmp):
        raw = os.path.join(tmp, "nturgb+d_skeletons")
        os.makedirs(raw)
        for subject in range(1, subjects + 1):
            for action in range(len(TOY_SKELETON_ACTIONS)):
                for rep in range(per_subject):
                    x, name, length = toy_skeleton_sample(seed, subject, action, rep, max_length)
                    actors = x[:, :length].transpose(3, 1, 2, 0).astype(np.float64)  # (2, L, 25, 3)
                    rng = np.random.default_rng([seed, 7, subject, action, rep])
                    bodies = {f"72057594037{9270 + m}{subject:02d}{action:02d}": actors[m] for m in range(2)
                              if np.any(actors[m])}
                    bodies.update(_toy_extra_bodies(rng, actors[0], length, len(bodies) > 1))
                    name = f"{name[:8]}P{person_ids[subject - 1]:03d}{name[12:]}"
                    _write_ntu_skeleton_file(os.path.join(raw, f"{name}.skeleton"), bodies, length)
        convert_ntu_skeletons(raw, tmp, "ntu60-xsub")
    return _build_once(root, make)


_NTU_BONES = np.array([(0, 1), (1, 20), (20, 2), (2, 3), (20, 4), (4, 5), (5, 6), (6, 7), (20, 8), (8, 9),
                       (9, 10), (10, 11), (0, 12), (12, 13), (13, 14), (14, 15), (0, 16), (16, 17), (17, 18),
                       (18, 19), (7, 21), (11, 23)])

NTU_TO_COCO18 = [3, 2, 8, 9, 10, 4, 5, 6, 16, 17, 18, 12, 13, 14, 3, 3, 3, 3]  # eyes/ears from the head joint
_COCO18_HEAD_OFFSETS = {14: (-0.03, 0.03), 15: (0.03, 0.03), 16: (-0.07, 0.0), 17: (0.07, 0.0)}  # metres


def _render_toy_body(x, size, focal, bg, colours, thickness=2.2):
    """Render the 3D skeletons x (3, L, 25, M) (camera coordinates, metres) as thick bones.
    Returns rgb uint8 (L, S, S, 3), depth uint16 (L, S, S) in mm (0 = background, NTU masked depth) and flow
    float32 (L-1, S, S, 2): the image motion of the bone point under each body pixel from frame t to t+1."""
    length, num_bodies = x.shape[1], x.shape[3]
    pts = x.transpose(1, 3, 2, 0)  # (L, M, 25, 3)
    z = np.where(pts[..., 2] > 0.1, pts[..., 2], 1.0)
    uv = np.stack([size / 2 + focal * pts[..., 0] / z, size / 2 - focal * pts[..., 1] / z], -1)  # (L, M, 25, 2)
    grid = np.stack(np.meshgrid(np.arange(size) + 0.5, np.arange(size) + 0.5, indexing="xy"), -1).reshape(-1, 2)
    rgb = np.repeat(bg[None], length, 0)
    depth = np.zeros((length, size * size), dtype=np.uint16)
    flow = np.zeros((max(length - 1, 0), size * size, 2), dtype=np.float32)
    a_idx, b_idx = _NTU_BONES[:, 0], _NTU_BONES[:, 1]
    for t in range(length):
        best = np.full(size * size, np.inf)
        for m in range(num_bodies):
            if not np.any(pts[t, m]):
                continue
            a, b = uv[t, m, a_idx], uv[t, m, b_idx]  # (B, 2)
            lo, hi = uv[t, m].min(0) - thickness - 1, uv[t, m].max(0) + thickness + 1
            sel = np.flatnonzero(((grid >= lo) & (grid <= hi)).all(1))  # pixels in the body's bounding box
            g = grid[sel]
            ab = b - a
            u = np.clip(((g[:, None] - a[None]) * ab[None]).sum(-1) / ((ab ** 2).sum(-1) + 1e-6), 0, 1)  # (P, B)
            dist2 = ((g[:, None] - (a[None] + u[..., None] * ab[None])) ** 2).sum(-1)  # (P, B) squared
            bone = dist2.argmin(1)
            d, ub = np.sqrt(dist2[np.arange(len(g)), bone]), u[np.arange(len(g)), bone]
            zb = (1 - ub) * pts[t, m, a_idx[bone], 2] + ub * pts[t, m, b_idx[bone], 2]
            inside = (d <= thickness) & (zb * 1000 < best[sel])
            hit, bone, d, ub, zb = sel[inside], bone[inside], d[inside], ub[inside], zb[inside]
            best[hit] = zb * 1000
            rgb[t].reshape(-1, 3)[hit] = colours[m] * (0.75 + 0.25 * (1 - d / thickness))[:, None]
            depth[t, hit] = np.round(zb * 1000).astype(np.uint16)
            if t + 1 < length and np.any(pts[t + 1, m]):
                nxt = (1 - ub[:, None]) * uv[t + 1, m, a_idx[bone]] + ub[:, None] * uv[t + 1, m, b_idx[bone]]
                now = (1 - ub[:, None]) * uv[t, m, a_idx[bone]] + ub[:, None] * uv[t, m, b_idx[bone]]
                flow[t, hit] = nxt - now
    return (np.clip(rgb, 0, 255).astype(np.uint8), depth.reshape(length, size, size),
            flow.reshape(-1, size, size, 2), uv)


def make_toy_paired(root, seed=0, size=64, num_frames=24, subjects=7, train_subjects=4, per_subject=2):
    """The toy-skeleton actions rendered to temporally aligned modalities (`per_subject` samples per subject and
    action; subjects 1..train_subjects train, the rest val: 96 train / 72 val videos of 16-24 frames):
        rgb/<name>.mp4                      the bodies drawn over a random texture (H.264, size x size)
        depth/<name>/MDepth-%08d.png        16-bit depth in mm, 0 off the body (NTU masked depth)
        skeleton/{train,val}_data_joint.npy, _label.pkl, _num_frame.npy   the 3D skeletons (NTU layout)
        pose2d/kinetics_{train,val}/<name>.json, kinetics_{train,val}_label.json   COCO-18 2D pose, normalised
                                            to [0, 1] (Kinetics-Skeleton JSON), score 0 outside the frame
        flow/<name>/flow_%05d.jpg           the true image motion of the body (CoCLR layout, L - 1 frames)
    Frame t of every modality is the same instant."""
    from PIL import Image

    def make(tmp):
        focal = size * 1.25
        out, labels_json = {"train": [], "val": []}, {"train": {}, "val": {}}
        for subject in range(1, subjects + 1):
            for action, rep in itertools.product(range(len(TOY_SKELETON_ACTIONS)), range(per_subject)):
                x, name, length = toy_skeleton_sample(seed, subject, action, rep, num_frames, min_frames=16)
                split = "train" if subject <= train_subjects else "val"
                rng = np.random.default_rng([seed, 2000, subject, action, rep])
                bg = _toy_background(rng, size)
                colours = rng.uniform(60, 255, (2, 3)).astype(np.float32)
                rgb, depth, flow, uv = _render_toy_body(x[:, :length], size, focal, bg, colours)
                write_video(os.path.join(tmp, "rgb", f"{name}.mp4"), rgb, fps=8)
                os.makedirs(os.path.join(tmp, "depth", name))
                for t in range(length):
                    Image.fromarray(depth[t]).save(os.path.join(tmp, "depth", name, f"MDepth-{t + 1:08d}.png"))
                write_flow_frames(flow, os.path.join(tmp, "flow", name))
                frames = []
                for t in range(length):
                    people = []
                    for m in range(2):
                        if not np.any(x[:, t, :, m]):
                            continue
                        xy = uv[t, m, NTU_TO_COCO18] / size  # (18, 2)
                        for k, (dx, dy) in _COCO18_HEAD_OFFSETS.items():
                            xy[k] += np.array([dx, -dy]) * focal / max(x[2, t, 3, m], 0.1) / size
                        inside = ((xy >= 0) & (xy <= 1)).all(1)
                        people.append({"pose": np.round(xy, 4).reshape(-1).tolist(),
                                       "score": inside.astype(float).tolist()})
                    frames.append({"frame_index": t, "skeleton": people})
                folder = os.path.join(tmp, "pose2d", f"kinetics_{split}")
                os.makedirs(folder, exist_ok=True)
                with open(os.path.join(folder, f"{name}.json"), "w") as f:
                    json.dump({"data": frames, "label": TOY_SKELETON_ACTIONS[action], "label_index": action}, f)
                labels_json[split][name] = {"has_skeleton": True, "label": TOY_SKELETON_ACTIONS[action],
                                            "label_index": action}
                out[split].append((x, name, action, length))
        for split, samples in out.items():
            _write_ntu_layout(os.path.join(tmp, "skeleton"), split, samples)
            with open(os.path.join(tmp, "pose2d", f"kinetics_{split}_label.json"), "w") as f:
                json.dump(labels_json[split], f)
    return _build_once(root, make)


# ==================================================================================================== DATA PREPARATION
# Command-line tools (`main`; `python common.py <command> --help`): check-data, prepare-videos (re-encode a
# dataset tree for fast random access), extract-flow, convert-alphapose; the conversions of raw skeleton releases.
# prepare-videos keeps names, layout and every non-video file, re-encoded small with short keyframe intervals (a
# seek lands on a keyframe close to the clip), so a script's --data-root simply points to --dst.


def main(argv=None):
    """`python common.py check-data | prepare-videos | extract-flow | convert-alphapose`: exit status 1 when a file
    could not be read, a one-line error (status 1) for a user mistake."""
    cli = argparse.ArgumentParser(prog="common.py", description="Dataset tools; `python common.py COMMAND --help`.")
    commands = cli.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check-data", description="Open every sample of a dataset and list the unreadable "
                                "ones.")
    flow = commands.add_parser("extract-flow", description=extract_flow.__doc__)
    for c in (check, flow):
        c.add_argument("--data", required=True, help="dataset name, as --data of the scripts (e.g. ucf101)")
        c.add_argument("--data-root", default=None, help="default data/<name>")
        c.add_argument("--decoder", default="auto", choices=["auto", "decord", "pyav", "torchcodec"])
    check.add_argument("--split", default=None, choices=["train", "val"], help="default: both")
    flow.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    prepare = commands.add_parser("prepare-videos", description=prepare_videos.__doc__)
    prepare.add_argument("--src", required=True, help="dataset tree to read (any layout; names are kept)")
    prepare.add_argument("--dst", required=True, help="output tree; point --data-root here")
    prepare.add_argument("--short-side", type=int, default=128, help="128 for 112² crops, 256 for I3D's 224²")
    prepare.add_argument("--gop", type=int, default=16, help="keyframe every N frames (short: fast random clips)")
    prepare.add_argument("--fps", type=float, default=None, help="constant output frame rate (default: keep)")
    prepare.add_argument("--crf", type=int, default=23, help="x264 quality (lower = better, larger)")
    prepare.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    pose = commands.add_parser("convert-alphapose", description=convert_alphapose.__doc__)
    pose.add_argument("--src", required=True, help="alphapose-results.json, or a folder of <name>.json / "
                      "<name>/alphapose-results.json")
    pose.add_argument("--dst", required=True, help="pose2d/<name>.json, or the pose2d folder (folder --src)")
    pose.add_argument("--width", type=int, default=None, help="frame width in pixels (with --height)")
    pose.add_argument("--height", type=int, default=None)
    pose.add_argument("--videos", default=None, help="else: the video (folder --src: its folder) for the size")
    a = cli.parse_args(argv)
    try:
        if a.command == "check-data":
            result = check_data(a.data, a.data_root, a.decoder, (a.split,) if a.split else ("train", "val"))
            return 1 if any(r["bad"] for r in result.values()) else 0
        if a.command == "prepare-videos":
            return 1 if prepare_videos(a.src, a.dst, a.short_side, a.gop, a.fps, a.workers, a.crf)["bad"] else 0
        if a.command == "extract-flow":
            return 1 if extract_flow(a.data, a.data_root, a.workers, a.decoder)["bad"] else 0
        if (a.width is None) != (a.height is None):
            raise UserError(f"convert-alphapose: expected --width and --height together, found --width {a.width} "
                            f"--height {a.height}")
        count = convert_alphapose(a.src, a.dst, a.width, a.height, a.videos)
        print(f"wrote {count} COCO-18 pose JSON file(s) to {a.dst}")
        return 0
    except (UserError, VideoReadError) as e:
        sys.exit(f"error: {e}")


def check_data(name, root=None, decoder="auto", splits=("train", "val"), out=print, **options):
    """Open every sample of every split; print sizes, classes, frame counts and the bad files. Returns
    {split: {"size": int, "bad": [(path, reason)]}}."""
    report = {}
    options.setdefault("check_exists", False)  # list missing files as bad instead of dropping them
    for split in splits:
        try:
            ds = build_dataset(name, root, split, decoder=decoder, **options)
        except (VideoReadError, OSError) as e:
            out(f"[{split}] cannot build: {e}")
            report[split] = {"size": 0, "bad": [("<annotations>", str(e))]}
            continue
        bad, frames = [], []
        for i in range(len(ds)):
            if isinstance(ds, VideoDataset):
                path = ds.samples[i][0]
                try:
                    n = count_frames(path, decoder)
                    read_video_frames(path, [0, n - 1], decoder)  # the last frame catches truncated files
                    frames.append(n)
                except VideoReadError as e:
                    bad.append((path, str(e)))
            else:
                try:
                    ds._load(i)
                except (VideoReadError, OSError, ValueError) as e:
                    bad.append((ds.sample_path(i), str(e)))
        published = PUBLISHED_SIZES.get(name, {}).get(_split_name(split))
        out(f"[{split}] {len(ds)} samples" + (f" (published: {published})" if published else "")
            + f", {ds.num_classes} classes, {len(bad)} unreadable")
        labels = [int(y) for y in sample_labels(ds) if np.ndim(y) == 0 and not isinstance(y, float)]  # not multi-label
        if labels:
            counts = np.bincount(labels, minlength=ds.num_classes)
            out(f"[{split}] labels {min(labels)}..{max(labels)}, per class: min {counts.min()}, max {counts.max()}, "
                f"{int((counts == 0).sum())} classes without samples")
        if frames:
            out(f"[{split}] frames per video: min {min(frames)}, median {int(np.median(frames))}, max {max(frames)}")
        for path, reason in bad:
            out(f"  BAD {path}\t{reason}")
        report[split] = {"size": len(ds), "bad": bad}
    return report


MUXERS = {".mp4": "mp4", ".m4v": "mp4", ".mov": "mov", ".avi": "avi", ".mkv": "matroska",
          ".webm": "matroska"}  # H.264 in .webm: a Matroska file under its old name (FFmpeg reads it by content)


def prepare_videos(src, dst, short_side=128, gop=16, fps=None, workers=1, crf=23, out=print):
    """Re-encode every video under src to dst (H.264, short side <= short_side, keyframe every gop frames, audio
    dropped, optional constant fps); other files are copied. Resumable: finished outputs are skipped, each output
    is written to a temporary name and renamed. Unreadable inputs go to dst/bad_files.txt. -> {done, skipped, bad}."""
    if not os.path.isdir(src):
        raise UserError(f"prepare-videos --src: expected a folder, found {src!r}")
    if short_side < 2 or gop < 1 or (fps is not None and fps <= 0):
        raise UserError(f"prepare-videos: expected --short-side >= 2, --gop >= 1, --fps > 0, found "
                        f"{short_side}, {gop}, {fps}")
    jobs, skipped = [], 0
    for folder, _, names in os.walk(src):
        for name in sorted(names):
            source = os.path.join(folder, name)
            target = os.path.join(dst, os.path.relpath(source, src))
            os.makedirs(os.path.dirname(target), exist_ok=True)
            if os.path.exists(target):
                skipped += 1
            elif os.path.splitext(name)[1].lower() in MUXERS:
                jobs.append((source, target, short_side, gop, fps, crf))
            else:  # lists, annotations, frame folders' images: unchanged
                shutil.copy2(source, target + ".part")
                os.replace(target + ".part", target)
    out(f"prepare-videos: {len(jobs)} videos to encode, {skipped} files already done, {workers} worker(s)")
    bad = _run_jobs(_prepare_one, jobs, workers, "prepare-videos", os.path.join(dst, "bad_files.txt"), out)
    return {"done": len(jobs) - len(bad), "skipped": skipped, "bad": bad}


def _run_jobs(fn, jobs, workers, command, bad_files_path, out):
    """fn(job) -> None or (path, reason) for every job, on `workers` spawned processes (1: this one), with a progress
    bar; the unreadable ones are appended to bad_files_path and returned as [(path, reason)]."""
    from tqdm import tqdm
    pool = mp.get_context("spawn").Pool(workers) if workers > 1 else None
    try:
        results = pool.imap_unordered(fn, jobs) if pool else map(fn, jobs)
        bad = [r for r in tqdm(results, total=len(jobs), desc=command, unit="video") if r is not None]
    finally:
        if pool:
            pool.terminate()
    if bad:
        append_bad_files(bad_files_path, bad)
        out(f"{command}: {len(bad)} unreadable input(s) skipped, listed in {bad_files_path}")
    return bad


def _prepare_one(job):
    """Encode one video (see prepare_videos) -> None, or (source, reason) when it cannot be read."""
    import av
    source, target, short_side, gop, fps, crf = job
    folder, name = os.path.split(target)
    for stale in [n for n in os.listdir(folder) if n.startswith(f".{name}.part-")]:  # left by a killed run
        os.remove(os.path.join(folder, stale))
    temporary = os.path.join(folder, f".{name}.part-{os.getpid()}")
    try:
        with av.open(source) as reader:
            if not reader.streams.video:
                raise VideoReadError(f"{source}: no video stream")
            stream = reader.streams.video[0]
            stream.thread_count = 1
            h, w = stream.codec_context.height, stream.codec_context.width
            scale = min(1.0, short_side / max(1, min(h, w)))  # never upscales
            height, width = (max(2, int(round(v * scale / 2)) * 2) for v in (h, w))  # 4:2:0 needs even sides
            rate = Fraction(fps).limit_denominator(1001) if fps else (stream.average_rate or Fraction(25))
            written = 0
            with av.open(temporary, "w", format=MUXERS[os.path.splitext(target)[1].lower()]) as writer:
                encoder = writer.add_stream("libx264", rate=rate)
                encoder.width, encoder.height, encoder.pix_fmt = width, height, "yuv420p"
                encoder.options = {"crf": str(crf), "g": str(gop), "sc_threshold": "0", "threads": "1",
                                   "preset": "fast"}  # sc_threshold 0: keyframes exactly every gop frames
                in_rate, start = float(stream.average_rate or rate), None
                for i, frame in enumerate(reader.decode(stream)):
                    repeat = 1
                    if fps:  # constant output rate: each input frame is shown until the next one's time
                        t = frame.time if frame.time is not None else i / in_rate  # AVI may carry no timestamps
                        start = t if start is None else start
                        repeat = math.floor((t - start) * fps + 1e-6) + 1 - written  # slots k / fps <= t
                    image = frame.reformat(width=width, height=height, format="yuv420p", interpolation="AREA")
                    image.pict_type = 0  # NONE: the input's I-frames must not force keyframes off the --gop grid
                    for _ in range(max(repeat, 0)):
                        image.pts, image.time_base = written, 1 / Fraction(rate)
                        for packet in encoder.encode(image):
                            writer.mux(packet)
                        written += 1
                for packet in encoder.encode():
                    writer.mux(packet)
            if written == 0:
                raise VideoReadError(f"{source}: no frame could be decoded")
        os.replace(temporary, target)
        return None
    except Exception as e:  # any decoder error: the file is listed in bad_files.txt and skipped
        if os.path.exists(temporary):
            os.remove(temporary)
        return source, f"{type(e).__name__}: {str(e).replace(source + ': ', '')}".replace("\n", " ").replace("\t", " ")


# ---------------------------------------------------------------------------------------------------- extract-flow
# TV-L1 flow for vicc.py as CoCLR/ViCC's extract_ff.py: OpenCV's DualTVL1OpticalFlow (default settings) between
# consecutive grey frames, written beside each video as <video without extension>/flow_%05d.jpg (write_flow_frames:
# +-20 px -> 0..255, one frame fewer than the video). Slow: about 1.6 s per 320x240 pair per core, ~1,100
# core-hours for UCF101 (13,320 videos). OpenCV is optional: `pip install opencv-contrib-python-headless`.
FLOW_DONE = ".flow-done"  # written into a video's flow folder after its last flow frame: resume skips it


def tvl1_flow(prev, nxt):
    """uint8 RGB frames (H, W, 3) x 2 -> TV-L1 flow float32 (H, W, 2) in pixels (OpenCV's default settings)."""
    import cv2
    grey = [cv2.cvtColor(np.ascontiguousarray(f), cv2.COLOR_RGB2GRAY) for f in (prev, nxt)]
    return cv2.optflow.DualTVL1OpticalFlow_create().calc(grey[0], grey[1], None)


def extract_flow(name, root=None, workers=1, decoder="auto", flow_fn=tvl1_flow, out=print):
    """Flow of every video of both splits of a dataset -> <video without extension>/flow_%05d.jpg. Resumable (a
    folder with FLOW_DONE is skipped), parallel over videos; unreadable videos go to <root>/bad_files.txt.
    -> {"done", "skipped", "bad"}."""
    if flow_fn is tvl1_flow:
        try:
            import cv2
            cv2.optflow.DualTVL1OpticalFlow_create
        except (ImportError, AttributeError):
            raise UserError("extract-flow: expected OpenCV with its contrib modules (cv2.optflow), found none: "
                            "pip install opencv-contrib-python-headless") from None
    root = root or os.path.join("data", name)
    paths = sorted({ds.sample_path(i) for split in ("train", "val") for ds in [build_dataset(name, root, split)]
                    for i in range(len(ds))})
    jobs = [(p, decoder, flow_fn) for p in paths if not os.path.exists(os.path.join(_flow_folder(p), FLOW_DONE))]
    out(f"extract-flow: {len(jobs)} videos to do, {len(paths) - len(jobs)} already done, {workers} worker(s)")
    bad = _run_jobs(_extract_flow_one, jobs, workers, "extract-flow", os.path.join(root, "bad_files.txt"), out)
    return {"done": len(jobs) - len(bad), "skipped": len(paths) - len(jobs), "bad": bad}


def _flow_folder(path):
    """Where VideoDataset reads a sample's flow: the frame folder itself, or the video path without extension."""
    return path if os.path.isdir(path) else os.path.splitext(path)[0]


def _extract_flow_one(job):
    """One video (see extract_flow) -> None, or (path, reason) when it cannot be read."""
    path, decoder, flow_fn = job
    try:
        frames = _read_frames(path, np.arange, decoder)  # (T, H, W, 3), every frame
        flow = np.stack([flow_fn(a, b) for a, b in zip(frames[:-1], frames[1:])])  # (T - 1, H, W, 2)
    except (VideoReadError, ValueError) as e:
        return path, str(e)
    write_flow_frames(flow, _flow_folder(path))
    open(os.path.join(_flow_folder(path), FLOW_DONE), "w").close()
    return None


def _rotation_about(axis, theta):
    """2s-AGCN `rotation_matrix`: counter-clockwise rotation by theta about axis; identity when either is ~0."""
    axis = np.asarray(axis, dtype=np.float64)
    if np.abs(axis).sum() < 1e-6 or abs(theta) < 1e-6:
        return np.eye(3)
    k = axis / np.linalg.norm(axis)
    cross = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + np.sin(theta) * cross + (1 - np.cos(theta)) * cross @ cross  # Rodrigues


def _align_to(vector, target):
    """2s-AGCN: the rotation about vector x target by the angle between them (turns vector onto target)."""
    unit = vector / (np.linalg.norm(vector) + 1e-12)
    angle = np.arccos(np.clip(np.dot(unit, target), -1.0, 1.0))
    return _rotation_about(np.cross(vector, target), angle)


def ntu_pre_normalize(x):
    """2s-AGCN `pre_normalization` on one sequence (3, T, 25, M), in its order: (1) a body whose first frame is
    empty gets its non-empty frames moved to the start; (2) subtract body 0's spine-middle joint (1) per frame
    from every present joint; (3) rotate so that hip(0)->spine(1) of body 0 in frame 0 is parallel to +z, then
    (4) left(4)->right(8) shoulder parallel to +x. Difference: 2s-AGCN then fills the empty tail by repeating the
    sequence; here it stays zero and the converter stores the valid length. 2s-AGCN has no other noise filter."""
    s = np.asarray(x, dtype=np.float64).transpose(3, 1, 2, 0).copy()  # (M, T, 25, 3) as 2s-AGCN
    if s.sum() == 0:
        return np.asarray(x, dtype=np.float32).copy()
    for person in s:  # (1): move the valid frames to the start, or the rotation would read an empty frame 0
        if person.sum() != 0 and person[0].sum() == 0:
            valid = person[person.sum(axis=(1, 2)) != 0]
            person[:] = 0
            person[:len(valid)] = valid
    center = s[0, :, 1:2, :].copy()  # (T, 1, 3) body 0's spine joint per frame
    for m in range(len(s)):  # (2)
        if s[m].sum() != 0:
            s[m] = (s[m] - center) * (s[m].sum(-1, keepdims=True) != 0)
    for bottom, top, target in ((0, 1, (0.0, 0.0, 1.0)), (4, 8, (1.0, 0.0, 0.0))):  # (3), (4)
        rotation = _align_to(s[0, 0, top] - s[0, 0, bottom], np.array(target))
        s = s @ rotation.T  # every joint p -> R p; zero joints stay zero
    return s.transpose(3, 1, 2, 0).astype(np.float32)


def _write_ntu_layout(out_dir, split, samples):
    """samples [(x (3, T, V, M), name, label, valid length)] -> out_dir/{split}_data_joint.npy, _label.pkl,
    _num_frame.npy (the NTU layout SkeletonDataset reads)."""
    import pickle
    arrays, names, labels, lengths = zip(*samples)
    os.makedirs(out_dir, exist_ok=True)
    np.save(os.path.join(out_dir, f"{split}_data_joint.npy"), np.stack(arrays).astype(np.float32))
    with open(os.path.join(out_dir, f"{split}_label.pkl"), "wb") as f:
        pickle.dump((list(names), [int(y) for y in labels]), f)
    np.save(os.path.join(out_dir, f"{split}_num_frame.npy"), np.asarray(lengths, dtype=np.int64))


def _fit_frames(x, max_frames):
    """(3, T, V, M) -> (3, max_frames, V, M): truncated or zero-padded; returns (array, valid length)."""
    out = np.zeros(x.shape[:1] + (max_frames,) + x.shape[2:], dtype=np.float32)
    length = min(x.shape[1], max_frames)
    out[:, :length] = x[:, :length]
    return out, length


def convert_ntu_skeletons(raw_dir, out_dir, benchmark="ntu60-xsub", max_frames=300, missing_file=None,
                          pre_normalize=False):
    """Raw S001C001P001R001A001.skeleton files -> out_dir/{train,val}_data_joint.npy (N, 3, max_frames, 25, 2),
    {train,val}_label.pkl (names, 0-based labels), {train,val}_num_frame.npy. benchmark: ntu60-xsub, ntu60-xview
    (train cameras 2, 3), ntu120-xsub, ntu120-xset (even setups train). missing_file: the official list of
    samples with missing skeletons, left out."""
    skip = set(_read_lines(missing_file, "sample names")) if missing_file else set()
    files = sorted(f for f in os.listdir(_need(raw_dir, "a folder of .skeleton files")) if f.endswith(".skeleton"))
    pattern = re.compile(r"S(\d{3})C(\d{3})P(\d{3})R(\d{3})A(\d{3})")
    out = {"train": [], "val": []}
    for f in files:
        name = f[:-len(".skeleton")]
        match = pattern.match(name)
        if not match or name in skip:
            continue
        setup, camera, subject, _, action = (int(g) for g in match.groups())
        if benchmark.startswith("ntu60") and (setup > 17 or action > 60):
            continue
        train = NTU_BENCHMARKS[benchmark](setup, camera, subject)
        x = read_ntu_skeleton(os.path.join(raw_dir, f))
        if pre_normalize:
            x = ntu_pre_normalize(x)
        x, _ = _fit_frames(x, max_frames)
        length = _last_nonzero_frame(x)  # frames after the last tracked body are padding, as the stored zeros
        out["train" if train else "val"].append((x, name, action - 1, length))
    for split, samples in out.items():
        if samples:
            _write_ntu_layout(out_dir, split, samples)
    return {split: len(samples) for split, samples in out.items()}


def convert_pku_mmd(root, out_dir, benchmark="xsub", max_frames=300):
    """PKU-MMD (I or II): root/PKU_Skeleton_Renew/<seq>.txt (one row of 150 floats per frame: 2 bodies x 25 joints
    x xyz), root/Train_Label_PKU_final/<seq>.txt ('label,start,end,confidence', 1-based labels),
    root/Split/cross-subject.txt or cross-view.txt ('Training videos:' line, list, 'Validation videos:' line,
    list) -> the NTU layout in out_dir, one sample per labelled instance."""
    skel_dir, label_dir, _, lists = pku_layout(root, "cross-subject.txt" if benchmark == "xsub" else "cross-view.txt")
    counts = {}
    for split, seqs in lists.items():
        samples = []
        for seq in seqs:
            seq_x = read_pku_skeleton(os.path.join(skel_dir, f"{seq}.txt"))  # (3, T, 25, 2)
            for label, start, end in read_pku_labels(os.path.join(label_dir, f"{seq}.txt")).tolist():
                x, length = _fit_frames(seq_x[:, start:end + 1], max_frames)
                samples.append((x, f"{seq}_{start}_{end}", label, length))
        if samples:
            _write_ntu_layout(out_dir, split, samples)
        counts[split] = len(samples)
    return counts


if __name__ == "__main__":
    sys.exit(main())
