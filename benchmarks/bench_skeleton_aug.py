"""Throughput of the Skeleton-Contrast augmentations: batched torch (skeleton_contrast.py) vs per-sample numpy.

Both produce the two views of Eq. (3.4) for every sequence: temporal crop-resize (Eq. 3.3, l_min 0.1, 64 frames)
followed by shear (Eq. 3.1) or joint jittering (Eq. 3.2, |j| = 15) with p = 0.5. The numpy side is the authors'
data-loader style (one sequence at a time, as in `feeder/augmentations.py`), re-written with numpy only.

    python benchmarks/bench_skeleton_aug.py                 # NTU shape (3, 300, 25, 2), batch 256, CPU (+ CUDA)
    python benchmarks/bench_skeleton_aug.py --threads 2 --batch-size 64
"""
import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import skeleton_contrast as sc  # noqa: E402


def numpy_crop_resize(x, rng, min_ratio=0.1, out_frames=64):
    """x (C, T, V, M) -> (C, out_frames, V, M), Eq. (3.3), linear interpolation with align_corners=False."""
    t = x.shape[1]
    length = min(max(int(t * rng.uniform(min_ratio, 1.0)), 1), t)
    start = rng.integers(0, t - length + 1)
    position = np.clip((np.arange(out_frames) + 0.5) * length / out_frames - 0.5, 0, None)
    left = np.minimum(np.floor(position).astype(np.int64), length - 1)
    right = np.minimum(left + 1, length - 1)
    weight = (position - left)[None, :, None, None].astype(x.dtype)
    return x[:, start + left] * (1 - weight) + x[:, start + right] * weight


def numpy_shear(x, rng):
    s = rng.uniform(-1, 1, size=(3, 3)).astype(x.dtype)
    np.fill_diagonal(s, 1.0)
    return np.einsum("ctvm,cd->dtvm", x, s)


def numpy_jitter(x, rng, num_joints=15):
    joints = rng.choice(x.shape[2], num_joints, replace=False)
    r = rng.uniform(0, 1, size=(3, 3)).astype(x.dtype)
    out = x.copy()
    out[:, :, joints] = np.einsum("ctvm,cd->dtvm", x[:, :, joints], r)
    return out


def numpy_views(batch, rng):
    views = []
    for x in batch:  # one sequence at a time, two views each
        for _ in range(2):
            y = numpy_crop_resize(x, rng)
            views.append(numpy_shear(y, rng) if rng.random() < 0.5 else numpy_jitter(y, rng))
    return views


def torch_views(batch):
    return sc.spatio_temporal_augment(batch), sc.spatio_temporal_augment(batch)


def seconds(fn, repeats, sync=lambda: None):
    fn()
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return (time.perf_counter() - start) / repeats


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--frames", type=int, default=300, help="input length T (NTU arrays are padded to 300)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads on CPU")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    batch = torch.randn(args.batch_size, 3, args.frames, 25, 2)
    numpy_batch = batch.numpy()
    rng = np.random.default_rng(0)
    n = args.batch_size
    results = {"numpy per-sample (1 thread)": seconds(lambda: numpy_views(numpy_batch, rng), args.repeats),
               f"torch batched CPU ({args.threads} thread)": seconds(lambda: torch_views(batch), args.repeats)}
    if torch.cuda.is_available():
        gpu_batch = batch.cuda()
        results[f"torch batched {torch.cuda.get_device_name()}"] = seconds(
            lambda: torch_views(gpu_batch), args.repeats * 4, torch.cuda.synchronize)
    print(f"input (N, C, T, V, M) = {tuple(batch.shape)}, two views of 64 frames per sequence, torch {torch.__version__}")
    for name, secs in results.items():
        print(f"{name:45s} {n / secs:12.0f} sequences/s   ({secs * 1e3:8.2f} ms per batch)")


if __name__ == "__main__":
    main()
