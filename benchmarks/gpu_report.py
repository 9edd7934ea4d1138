"""One command for the throughput figures of the scripts: writes gpu_report.json and gpu_report.md.

    python benchmarks/gpu_report.py                     # on a GPU: the paper sizes, a few minutes
    python benchmarks/gpu_report.py --tiny              # CPU (the default without a GPU): tiny sizes, a smoke test

Rows (paper sizes on a GPU; --tiny: tiny3d / 8 frames / 32², fp32, a few steps):
  moco_step            model-only tubelet MoCo step (synthetic uint8 clips already on the device: tubelets, jitter,
                       query forward/backward, key forward), samples/s, MFU (R(2+1)D-18, 16x112², bf16), with
                       and without channels_last_3d and torch.compile (compile skipped with --tiny)
  end_to_end           `tubelet_contrast.py` on prepared toy videos (--workers = cores): samples/s and the share of
                       the step spent waiting for data (its own metrics.jsonl)
  tubelets             tubelet_pairs clips/s on the device and on one CPU core
  skeleton_aug         Skeleton-Contrast's two views (Eq. 3.4) sequences/s, NTU shape (3, 300, 25, 2)
  s3d_step             S3D 32x128² forward + backward samples/s (ViCC / P-HLVC backbone)
  vicc_end_to_end      `vicc.py --stage rgb-1` (S3D 32x128², bf16) on 320x240 CoCLR frame folders (synthetic,
                       bench_decode_on_device.make_frame_folders; --tiny: tiny3d 8x32² on 64x48), samples/s and the
                       data share, and the same with --decode-on-device (one batched decode_jpeg per step)
FLOPs come from torch.utils.flop_counter on the real shapes; MFU = achieved / peak dense bf16 FLOPs of the device
(table below; unknown devices get no MFU). Peak memory is torch.cuda.max_memory_allocated per row.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import bench_decode_on_device  # noqa: E402
import common  # noqa: E402
import skeleton_contrast as sc  # noqa: E402
import tubelet_contrast as tc  # noqa: E402

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "RTX 4090": 165.0}


def peak_tflops(device):
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, steps, warmup):
    """Median-free simple rate: warm-up calls, then `steps` calls timed together -> seconds per call."""
    for _ in range(warmup):
        fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    return (time.perf_counter() - start) / steps


def peak_memory(device):
    if device.type != "cuda":
        return None
    value = torch.cuda.max_memory_allocated(device) / 2 ** 30
    torch.cuda.reset_peak_memory_stats(device)
    return round(value, 2)


class StepRun:
    """The two things a train step needs from common.Run: autocast and an optimizer step."""

    def __init__(self, device, dtype):
        self.device, self.dtype = device, dtype

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None)

    def step(self, loss, optimizer):
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def tubelet_args(opts):
    argv = ["--arch", opts.arch, "--clip-len", str(opts.clip_len), "--crop-size", str(opts.crop)]
    args = tc.add_method_args(argparse.ArgumentParser()).parse_args(argv)
    args.data = "k400"
    tc.common.fill_defaults(args, tc.PAPER_DEFAULTS)  # the paper's m, etc. for every flag left None
    args = tc.finalize_method_args(args)
    args.queue_size = opts.queue
    return args


def moco_step(opts, device, channels_last, compile_model):
    args = tubelet_args(opts)
    backbone, model = tc.build_model(args)
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last_3d)
    if compile_model:
        model.backbone, model.backbone_k = torch.compile(model.backbone), torch.compile(model.backbone_k)
    optimizer = torch.optim.SGD(model.query_parameters(), lr=0.01, momentum=0.9)
    step = tc.make_train_step(model, optimizer, StepRun(device, opts.amp), args, tc.make_prepare(args))
    video = torch.randint(0, 256, (opts.batch, 3, opts.clip_len, opts.crop, opts.crop), dtype=torch.uint8,
                          device=device)
    seconds = timed(lambda: step({"video": video}), device, opts.steps, opts.warmup)
    clip = torch.zeros(1, 3, opts.clip_len, opts.crop, opts.crop, device=device)
    with FlopCounterMode(display=False) as counter:
        common.build_backbone(opts.arch).to(device)(clip)
    forward = counter.get_total_flops()  # per clip
    per_sample = 4 * forward  # query forward + backward (2x) + key forward
    achieved = per_sample * opts.batch / seconds
    peak = peak_tflops(device)
    return {"samples_per_s": round(opts.batch / seconds, 1), "step_ms": round(1000 * seconds, 1),
            "gflops_forward_per_clip": round(forward / 1e9, 2),
            "gflops_per_moco_sample": round(per_sample / 1e9, 1),
            "mfu": round(achieved / (peak * 1e12), 3) if peak else None, "peak_memory_gib": peak_memory(device)}


def end_to_end(opts, device, out_dir):
    """tubelet_contrast.py itself on toy-motion (prepared-like H.264, GOP 1-250), metrics from metrics.jsonl."""
    run_dir = os.path.join(out_dir, "end_to_end")
    argv = [sys.executable, os.path.join(ROOT, "tubelet_contrast.py"), "--data", "toy-motion", "--arch", opts.arch,
            "--clip-len", str(opts.clip_len), "--crop-size", str(opts.crop), "--batch-size", str(opts.batch),
            "--max-steps", str(opts.e2e_steps), "--log-every", "1", "--knn-every", "0", "--workers",
            str(opts.workers), "--out-dir", run_dir, "--device", device.type, "--queue-size", str(opts.queue)]
    return run_script(argv, run_dir, opts)


def vicc_end_to_end(opts, device, out_dir, decode_on_device):
    """vicc.py's first stage (RGB-1: 64 JPEGs per sample) on frame folders, metrics from metrics.jsonl."""
    frames = bench_decode_on_device.make_frame_folders(os.path.join(out_dir, "frames"), *opts.vicc_frames)
    run_dir = os.path.join(out_dir, f"vicc_{decode_on_device}")
    arch, clip_len, crop = ("tiny3d", 8, 32) if opts.tiny else ("s3d", 32, 128)
    argv = [sys.executable, os.path.join(ROOT, "vicc.py"), "--data", "videofolder", "--data-root", frames,
            "--stage", "rgb-1", "--arch", arch, "--clip-len", str(clip_len), "--crop-size", str(crop),
            "--batch-size", str(opts.batch), "--max-steps", str(opts.e2e_steps), "--log-every", "1",
            "--knn-every", "0", "--workers", str(opts.workers), "--out-dir", run_dir, "--device", device.type]
    return run_script(argv + ["--decode-on-device"] * decode_on_device, run_dir, opts)


def run_script(argv, run_dir, opts):
    """A training script's run -> its mean samples/s and data share over the second half of its steps."""
    if opts.amp is not None:
        argv += ["--amp", "bf16"]
    out = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=opts.e2e_timeout)
    if out.returncode != 0:
        return {"error": (out.stdout + out.stderr)[-500:]}
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl")) if '"loss"' in line]
    rows = rows[len(rows) // 2:] or rows  # the second half: workers warm
    mean = lambda key: sum(r.get(key, 0.0) for r in rows) / len(rows)  # noqa: E731
    return {"samples_per_s": round(mean("samples_per_s"), 1), "data_share": round(mean("data_share"), 3),
            "workers": opts.workers, "steps": opts.e2e_steps}


def tubelets(opts, device):
    args = tubelet_args(opts)
    result = {}
    for where in ([device, torch.device("cpu")] if device.type != "cpu" else [device]):
        video = torch.randint(0, 256, (opts.batch, 3, opts.clip_len, opts.crop, opts.crop), dtype=torch.uint8,
                              device=where)
        threads = torch.get_num_threads()
        if where.type == "cpu":
            torch.set_num_threads(1)
        seconds = timed(lambda: tc.tubelet_pairs(video, args), where, opts.steps, 1)
        torch.set_num_threads(threads)
        result[f"{where.type}_clips_per_s"] = round(2 * opts.batch / seconds, 1)
    return result


def skeleton_aug(opts, device):
    x = torch.randn(opts.skeleton_batch, 3, 300, 25, 2, device=device)
    lengths = torch.randint(40, 300, (opts.skeleton_batch,), device=device)
    seconds = timed(lambda: (sc.spatio_temporal_augment(x, lengths), sc.spatio_temporal_augment(x, lengths)),
                    device, opts.steps, 1)
    return {"sequences_per_s": round(opts.skeleton_batch / seconds, 1)}


def s3d_step(opts, device):
    model = common.build_backbone("s3d" if not opts.tiny else "tiny3d").to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    frames, size = (32, 128) if not opts.tiny else (8, 32)
    x = torch.randn(opts.s3d_batch, 3, frames, size, size, device=device)

    def step():
        with StepRun(device, opts.amp).autocast():
            loss = model(x).float().pow(2).mean()
        StepRun(device, opts.amp).step(loss, optimizer)
    seconds = timed(step, device, opts.steps, opts.warmup)
    return {"model": "s3d" if not opts.tiny else "tiny3d", "clip": f"{frames}x{size}x{size}",
            "samples_per_s": round(opts.s3d_batch / seconds, 1), "peak_memory_gib": peak_memory(device)}


def markdown(report):
    lines = [f"Device: {report['device']} ({report['sizes']})", "", "| row | figures |", "|---|---|"]
    for key, value in report["rows"].items():
        lines.append(f"| {key} | " + ", ".join(f"{k} {v}" for k, v in value.items()) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny sizes (default when no GPU is visible)")
    parser.add_argument("--out-dir", default=".", help="where gpu_report.json / .md are written")
    parser.add_argument("--skip", default="", help="comma list of rows to leave out")
    opts = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    opts.tiny = opts.tiny or device.type == "cpu"
    if opts.tiny:
        opts.arch, opts.clip_len, opts.crop, opts.batch, opts.queue, opts.amp = "tiny3d", 8, 32, 4, 64, None
        opts.steps, opts.warmup, opts.e2e_steps, opts.skeleton_batch, opts.s3d_batch = 2, 1, 3, 8, 2
        opts.workers, opts.e2e_timeout, opts.vicc_frames = 1, 300, (48, 64, 8, 12)  # H, W, videos, frames
    else:
        opts.arch, opts.clip_len, opts.crop, opts.batch, opts.queue, opts.amp = "r2plus1d_18", 16, 112, 32, 16384, \
            torch.bfloat16
        opts.steps, opts.warmup, opts.e2e_steps, opts.skeleton_batch, opts.s3d_batch = 10, 3, 60, 256, 16
        opts.workers, opts.e2e_timeout, opts.vicc_frames = os.cpu_count() or 1, 600, (240, 320, 64, 40)
        torch.backends.cudnn.benchmark = True
    skip = set(opts.skip.split(",")) - {""}
    os.makedirs(opts.out_dir, exist_ok=True)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        variants = [(False, False), (True, False)] + ([(False, True), (True, True)] if not opts.tiny else [])
        for channels_last, compile_model in variants if "moco_step" not in skip else []:
            name = "moco_step" + ("_channels_last" if channels_last else "") + ("_compile" if compile_model else "")
            rows[name] = moco_step(opts, device, channels_last, compile_model)
            print(name, rows[name], flush=True)
        for name, fn in (("end_to_end", lambda: end_to_end(opts, device, tmp)),
                         ("tubelets", lambda: tubelets(opts, device)),
                         ("skeleton_aug", lambda: skeleton_aug(opts, device)),
                         ("s3d_step", lambda: s3d_step(opts, device)),
                         ("vicc_end_to_end", lambda: vicc_end_to_end(opts, device, tmp, False)),
                         ("vicc_end_to_end_decode_on_device", lambda: vicc_end_to_end(opts, device, tmp, True))):
            if name not in skip:
                rows[name] = fn()
                print(name, rows[name], flush=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)"
    report = {"device": name, "sizes": "tiny (smoke test, not a benchmark)" if opts.tiny else
              f"{opts.arch} {opts.clip_len}x{opts.crop}², batch {opts.batch}, bf16", "torch": torch.__version__,
              "rows": rows}
    with open(os.path.join(opts.out_dir, "gpu_report.json"), "w") as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(opts.out_dir, "gpu_report.md"), "w") as f:
        f.write(markdown(report))
    return report


if __name__ == "__main__":
    main()
