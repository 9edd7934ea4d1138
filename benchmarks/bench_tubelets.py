"""Tubelet generation speed: tubelet_contrast.py (sample_tubelets + paste_tubelets on the CPU) against the
authors' procedure as their code runs it (fmthoker/tubelet-contrast, `Tubelets` + `tubelet_rotation`): per sample,
numpy + OpenCV: per tubelet and frame the patch and its alpha mask resized to the frame's box (cv2.resize, once for
both clips), then per clip, frame and tubelet rotated onto a grown canvas (imutils' rotate_bound: cv2.warpAffine),
clipped by index at the frame border (the top-left part of the rotated patch is kept) and blended in float.

    python benchmarks/bench_tubelets.py                       # CPU, 1 thread, batch 32 of 16x112x112 (uint8)
    python benchmarks/bench_tubelets.py --threads 2 --repeats 7

OpenCV is needed for the baseline only and is not in requirements.txt: pip install opencv-python-headless.
Both sides are timed in one process, interleaved (ours, theirs, ours, ...), median of --repeats (wall clock, and
process CPU time as a second figure that other jobs on the machine disturb less), both with
common.keep_freed_memory() as tubelet_contrast.py runs (glibc keeps freed heap pages for the next batch), parameters
sampled inside the timed region on both sides (the authors' with numpy/scipy-like smoothing, per sample). A check
before timing: the baseline, given our sampled tubelets (rotation only), pastes the same kind of pairs: patch pixels
identical in both clips and at the same places as ours (mask overlap). Prints one JSON line.
"""
import argparse
import json
import math
import os
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import tubelet_contrast as tc  # noqa: E402


# ---------------------------------------------------------------------------------------------------- the authors'


def rotate_bound(cv2, image, angle):
    """imutils.rotate_bound: rotate clockwise by `angle` degrees onto a canvas that holds the whole result."""
    h, w = image.shape[:2]
    matrix = cv2.getRotationMatrix2D((w / 2, h / 2), -angle, 1.0)
    cos, sin = abs(matrix[0, 0]), abs(matrix[0, 1])
    new_w, new_h = int(h * sin + w * cos), int(h * cos + w * sin)
    matrix[0, 2] += new_w / 2 - w / 2
    matrix[1, 2] += new_h / 2 - h / 2
    return cv2.warpAffine(image, matrix, (new_w, new_h))


def authors_alpha(w, h, shape, soft_threshold):
    """pick_alphas: normalised distance d (L_inf, L2, L1 for rectangle, ellipse, rhombus), inside where d < 0.5;
    soft edge: alpha = clip((0.5 - d) / (0.5 - t), 0, 1)."""
    ys, xs = np.meshgrid(np.linspace(-0.5, 0.5, h), np.linspace(-0.5, 0.5, w), indexing="ij")
    d = np.maximum(abs(xs), abs(ys)) if shape == 0 else np.hypot(xs, ys) if shape == 1 else abs(xs) + abs(ys)
    alpha = (d < 0.5).astype(np.float32)
    if soft_threshold is not None:
        alpha *= np.clip((0.5 - d) / (0.5 - soft_threshold), 0, 1)
    return alpha.astype(np.float32)


def authors_sample(rng, t, height, width, num_tubelets=2):
    """Per sample, numpy: anchor box, Gaussian-smoothed 48-point path stretched to S ~ U{20..89}, source frame,
    shape and soft edge, per-frame opacity and a ±6° per frame random walk of the angle between key frames."""
    tubelets = []
    for _ in range(num_tubelets):
        s, r = rng.choice([16, 24, 28, 32, 48, 64]), rng.choice([0.5, 0.67, 0.75, 1.0, 1.33, 1.5, 2.0])
        w = int(np.clip(s * math.sqrt(r) * math.exp(rng.uniform(-0.18, 0.18)), 1, width - 1))
        h = int(np.clip(s / math.sqrt(r) * math.exp(rng.uniform(-0.18, 0.18)), 1, height - 1))
        points = rng.uniform(0, 1, (2, 48))
        kernel = np.exp(-np.arange(-32, 33) ** 2 / (2 * 8.0 ** 2))
        smooth = np.stack([np.convolve(np.pad(p, 32, mode="reflect"), kernel / kernel.sum(), "valid") for p in points])
        unit = (smooth - smooth.min(1, keepdims=True)) / np.ptp(smooth, axis=1, keepdims=True)
        span = rng.integers(20, 90)
        path = unit * span + [[rng.integers(0, width - span)], [rng.integers(0, height - span)]]
        path = np.clip(path[:, np.round(np.linspace(0, 47, t)).astype(int)], 0, width - 1).astype(int)  # (2, T)
        keys = np.array([0, int(rng.integers(1, t - 1)), t - 1])
        walk = np.concatenate([[0], np.cumsum(rng.uniform(-6, 6, 2) * np.diff(keys))])
        angles = np.interp(np.arange(t), keys, walk).astype(int)
        opacity = np.interp(np.arange(t), keys, rng.uniform(0.8, 1.0, 3))
        f = int(rng.integers(t))
        x0, y0 = int(np.clip(path[0, f] - w // 2, 0, width - w)), int(np.clip(path[1, f] - h // 2, 0, height - h))
        tubelets.append(dict(source=(f, x0, y0, w, h), centres=path.T, angles=angles, opacity=opacity,
                             shape=int(rng.choice(3, p=[0.5, 0.35, 0.15])),
                             soft=rng.uniform(0.3, 0.45) if rng.uniform() < 0.5 else None))
    return sorted(tubelets, key=lambda d: -d["source"][3] * d["source"][4])  # larger tubelet first


def authors_paste(cv2, clip_a, clip_b, tubelets):
    """clip_a, clip_b: lists of T uint8 (H, W, 3) frames, pasted in place. As theirs: every patch is cut from clip A
    before any paste and resized with its alpha to each frame's box once (pick_patches / pick_alphas; clip B reuses
    them), then per clip, frame and tubelet rotated (rotate_bound), clipped at the border by index and blended in
    float (tubelet_rotation)."""
    height, width = clip_a[0].shape[:2]
    resized = []  # per tubelet, per frame: (patch, alpha at the frame's opacity)
    for tub in tubelets:
        f, x0, y0, w, h = tub["source"]
        patch_0, alpha_0 = clip_a[f][y0:y0 + h, x0:x0 + w], authors_alpha(w, h, tub["shape"], tub["soft"])
        resized.append([(cv2.resize(patch_0, (w, h)), cv2.resize(alpha_0, (w, h)) * tub["opacity"][t])
                        for t in range(len(clip_a))])
    for clip in (clip_a, clip_b):  # the authors' loop runs the per-frame work once per clip
        for t, frame in enumerate(clip):
            for tub, frames in zip(tubelets, resized):
                patch, alpha = frames[t]
                if tub["angles"][t] != 0:
                    angle = tub["angles"][t]
                    patch, alpha = rotate_bound(cv2, patch, angle), rotate_bound(cv2, alpha, angle)
                ph, pw = patch.shape[:2]
                cx, cy = tub["centres"][t]
                left, top = cx - pw // 2, cy - ph // 2
                x1, y1, x2, y2 = max(left, 0), max(top, 0), min(left + pw, width), min(top + ph, height)
                if x1 >= x2 or y1 >= y2:
                    continue
                patch, alpha = patch[:y2 - y1, :x2 - x1], alpha[:y2 - y1, :x2 - x1, None]  # top-left part kept
                region = frame[y1:y2, x1:x2].astype(np.float32)
                frame[y1:y2, x1:x2] = (region * (1 - alpha) + patch * alpha).astype(np.uint8)


def authors_batch(cv2, video_a, video_b, rng):
    """(B, T, H, W, 3) uint8 numpy -> pasted copies (the authors copy every frame before pasting), sampled and
    pasted one sample at a time."""
    out_a, out_b = video_a.copy(), video_b.copy()
    for i in range(len(video_a)):
        clip_a, clip_b = list(out_a[i]), list(out_b[i])  # views: frames pasted in place
        authors_paste(cv2, clip_a, clip_b, authors_sample(rng, video_a.shape[1], *video_a.shape[2:4]))
    return out_a, out_b


def from_ours(tub, i):
    """Our sampled tubelets of sample i (rotation only, matrix = R(angle)) in the baseline's form, for the check."""
    out = []
    for j in range(tub["size"].shape[1]):
        w, h = (int(round(v)) for v in tub["size"][i, j].tolist())
        sx, sy = tub["source_centre"][i, j].tolist()
        angles = torch.rad2deg(torch.atan2(tub["matrix"][i, j, :, 1, 0], tub["matrix"][i, j, :, 0, 0]))
        out.append(dict(source=(int(tub["source_frame"][i, j]), int(round(sx - w / 2)), int(round(sy - h / 2)), w, h),
                        centres=tub["centres"][i, j].floor().long().numpy(), angles=angles.round().long().numpy(),
                        opacity=tub["opacity"][i, j].numpy(), shape=int(tub["shape"][i, j]), soft=None))
    return out


# ---------------------------------------------------------------------------------------------------- timing


def check_same_kind_of_pairs(cv2, args, size):
    """White patches on a black clip 2: where the baseline and paste_tubelets put them (IoU of the masks)."""
    b, t = 8, 16
    tub = tc.sample_tubelets(b, t, size, size, args, generator=torch.Generator().manual_seed(1))
    tub["soft"].fill_(1.0)
    tub["opacity"].fill_(1.0)
    white, black = torch.full((b, 3, t, size, size), 255, dtype=torch.uint8), torch.zeros(b, 3, t, size, size,
                                                                                         dtype=torch.uint8)
    _, ours = tc.paste_tubelets(white, black, tub, tc.max_window_side(args, size, size))
    ours = ours[:, 0] > 127  # (B, T, H, W)
    theirs = []
    for i in range(b):
        a, k = (list(v.permute(0, 2, 3, 4, 1)[i].numpy().copy()) for v in (white, black))
        authors_paste(cv2, a, k, from_ours(tub, i))
        theirs.append(np.stack(k)[..., 0] > 127)
    theirs = torch.from_numpy(np.stack(theirs))
    return (ours & theirs).sum().item() / max((ours | theirs).sum().item(), 1)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--crop-size", type=int, default=112)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    opts = parser.parse_args()
    torch.set_num_threads(opts.threads)
    tc.common.keep_freed_memory()  # as tubelet_contrast.py's main_worker does, for both sides of the comparison
    try:
        import cv2
    except ImportError:
        sys.exit("bench_tubelets.py: the authors' baseline needs OpenCV (benchmark only, not in requirements.txt): "
                 "pip install opencv-python-headless")
    cv2.setNumThreads(opts.threads)
    argv = ["--crop-size", str(opts.crop_size), "--clip-len", "16"]
    args = tc.add_method_args(argparse.ArgumentParser()).parse_args(argv)
    args.data = "k400"
    args = tc.finalize_method_args(args)
    b, s = opts.batch_size, opts.crop_size
    iou = check_same_kind_of_pairs(cv2, args, s)
    g = torch.Generator().manual_seed(0)
    video = torch.randint(0, 256, (b, 3, 16, s, s), dtype=torch.uint8, generator=g)
    video_np = video.permute(0, 2, 3, 4, 1).numpy().copy()  # the authors' frames: (T, H, W, 3) per clip
    video_np_b = np.roll(video_np, -1, 0)  # their clip B comes from another decoded video: made before timing
    rng = np.random.default_rng(0)
    ours = lambda: tc.tubelet_pairs(video, args, g)  # noqa: E731  sampling + pasting, uint8 in and out
    theirs = lambda: authors_batch(cv2, video_np, video_np_b, rng)  # noqa: E731
    ours(), theirs()  # warm-up
    times = {"ours": [], "authors": []}
    cpu = {"ours": [], "authors": []}  # process CPU time: less sensitive to other jobs on a shared machine
    for _ in range(opts.repeats):
        for name, fn in (("ours", ours), ("authors", theirs)):
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            times[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    median = {k: statistics.median(v) for k, v in times.items()}
    median_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    result = {"device": f"cpu ({opts.threads} thread(s), {os.cpu_count()} cores, load {load:.1f})",
              "batch": b, "clip": f"16x{s}x{s}", "repeats": opts.repeats,
              "ours_clips_per_s": round(2 * b / median["ours"], 1),
              "authors_clips_per_s": round(2 * b / median["authors"], 1),
              "speedup": round(median["authors"] / median["ours"], 2),
              "speedup_cpu_time": round(median_cpu["authors"] / median_cpu["ours"], 2),
              "mask_iou_vs_authors": round(iou, 3)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
