"""Tubelet generation speed: batched torch ops (tubelet_contrast.paste_tubelets) vs a straightforward per-sample,
per-tubelet, per-frame implementation of the same procedure (how the authors' code works, one patch at a time).

    python benchmarks/bench_tubelets.py                       # CPU, 1 thread, batch 32 of 16x112x112
    python benchmarks/bench_tubelets.py --device cuda --threads 16

Both paths use the same sampled tubelets (paths, transforms, masks), so their outputs are compared as a check.
Prints one JSON line with pairs/s and clips/s (a pair = 2 clips) of both and the speed-up.
"""
import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import tubelet_contrast as tc  # noqa: E402


def paste_loop(clip_1, clip_2, tub):
    """Reference: for every sample, tubelet and frame, transform the patch into a window around its centre
    (one small grid_sample) and alpha-composite it into both clips with slicing."""
    b, c, t, h, w = clip_1.shape
    out_1, out_2 = clip_1.float().clone(), clip_2.float().clone()
    for i in range(b):
        for j in range(tub["size"].shape[1]):
            size, centre_src = tub["size"][i, j], tub["source_centre"][i, j]
            source = clip_1[i, :, tub["source_frame"][i, j]].float()[None]  # (1, C, H, W)
            for f in range(t):
                matrix, centre = tub["matrix"][i, j, f], tub["centres"][i, j, f]
                extent = (matrix.abs() @ (size / 2)).ceil().long() + 1  # half extent of the transformed box
                x0, y0 = (centre.floor().long() - extent).tolist()
                x1, y1 = (centre.floor().long() + extent + 1).tolist()
                x0c, y0c, x1c, y1c = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
                if x0c >= x1c or y0c >= y1c:
                    continue
                ys, xs = torch.meshgrid(torch.arange(y0c, y1c, dtype=torch.float),
                                        torch.arange(x0c, x1c, dtype=torch.float), indexing="ij")
                p = torch.stack([xs, ys], dim=-1) + 0.5 - centre  # (h', w', 2)
                u = p @ torch.linalg.inv(matrix).t()  # patch-local offsets
                grid = (centre_src + u) * torch.tensor([2 / w, 2 / h]) - 1
                patch = F.grid_sample(source, grid[None], mode="bilinear", align_corners=False)[0]  # (C, h', w')
                r = (u / (size / 2)).abs()
                shape = int(tub["shape"][i, j])
                d = r.amax(-1) if shape == 0 else r.norm(dim=-1) if shape == 1 else r.sum(-1)
                soft = float(tub["soft"][i, j])
                alpha = ((1 - d) / (1 - soft)).clamp(0, 1) if soft < 1 else (d < 1).float()
                alpha = alpha * tub["opacity"][i, j, f]
                for out in (out_1, out_2):
                    region = out[i, :, f, y0c:y1c, x0c:x1c]
                    out[i, :, f, y0c:y1c, x0c:x1c] = torch.lerp(region, patch, alpha)
    return out_1, out_2


def timed(fn, repeats, sync):
    fn()  # warm-up
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return (time.perf_counter() - start) / repeats


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--crop-size", type=int, default=112)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--transform", default="rotation")
    parser.add_argument("--motion", default="nonlinear")
    opts = parser.parse_args()
    torch.set_num_threads(opts.threads)
    args = tc.add_method_args(argparse.ArgumentParser()).parse_args(
        ["--transform", opts.transform, "--motion", opts.motion, "--crop-size", str(opts.crop_size)])
    args.data = "k400"
    args = tc.finalize_method_args(args)
    device = torch.device(opts.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    g = torch.Generator(device=device).manual_seed(0)
    s = opts.crop_size
    video = torch.randint(0, 256, (opts.batch_size, 3, 16, s, s), dtype=torch.uint8, device=device)
    clip_2 = video.roll(-1, 0)
    tub = tc.sample_tubelets(opts.batch_size, 16, s, s, args, device, g)
    t_sample = timed(lambda: tc.sample_tubelets(opts.batch_size, 16, s, s, args, device, g), opts.repeats, sync)
    t_batched = timed(lambda: tc.paste_tubelets(video, clip_2, tub), opts.repeats, sync)
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({opts.threads} thread(s))",
              "batch": opts.batch_size, "clip": f"16x{s}x{s}", "motion": opts.motion, "transform": opts.transform,
              "sample_ms": round(1000 * t_sample, 2), "batched_ms": round(1000 * t_batched, 1),
              "batched_pairs_per_s": round(opts.batch_size / (t_sample + t_batched), 1)}
    if device.type == "cpu" or opts.batch_size <= 32:
        tub_cpu = {k: v.cpu() for k, v in tub.items()}
        t_loop = timed(lambda: paste_loop(video.cpu(), clip_2.cpu(), tub_cpu), 1, sync)
        ref_1, ref_2 = paste_loop(video.cpu(), clip_2.cpu(), tub_cpu)
        out_1, out_2 = tc.paste_tubelets(video, clip_2, tub)
        diff = max((out_1.cpu() - ref_1).abs().max().item(), (out_2.cpu() - ref_2).abs().max().item())
        result.update({"loop_ms": round(1000 * t_loop, 1),
                       "loop_pairs_per_s": round(opts.batch_size / (t_sample + t_loop), 1),
                       "speedup": round((t_sample + t_loop) / (t_sample + t_batched), 1),
                       "max_abs_diff_0_255": round(diff, 4)})
    for k in [k for k in result if k.endswith("pairs_per_s")]:
        result[k.replace("pairs", "clips")] = round(2 * result[k], 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
