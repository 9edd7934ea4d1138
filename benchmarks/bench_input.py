"""Input pipeline speed per CPU core: raw decode vs the dataset (decode + the script's transform) vs the loader.

    python benchmarks/bench_input.py                    # 3 formats x 3 paths, 1 thread, 1 loader worker
    python benchmarks/bench_input.py --videos 16 --repeats 5

Makes its own H.264 videos with PyAV in a temporary folder (--dir to keep them): 320x240 with libx264's default
keyframe interval (250, as downloaded), and 170x128 / 340x256 with a keyframe every 16 frames (as
`python common.py prepare-videos` writes them). For each, 16-frame clips (stride 1-4, random start) are read:
  raw      common.read_video_frames at the sampled indices (decoder only, the ceiling),
  train    the tubelet_contrast.py training set: random resized crop to 112 + flip (uint8, in the worker),
  twoclip  two clips per video (ViCC-style / the temporal baseline), same crop + flip per clip,
  eval     resize short side to 128 + centre crop 112 (evaluate.py's test clips),
  loader   the train set through a DataLoader with one worker (one core), batch 8.
Paths run interleaved, median of --repeats; clips/s and the ratio to raw decode. Prints one JSON line per format.
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402

FORMATS = (("320x240-gop250", 240, 320, 250), ("170x128-gop16", 128, 170, 16), ("340x256-gop16", 256, 340, 16))


def make_videos(folder, name, height, width, gop, count, frames=96):
    """count videos of moving noise blobs (compressible like real video, not like white noise) -> paths."""
    paths = []
    for k in range(count):
        path = os.path.join(folder, name, f"video_{k:03d}.mp4")
        if not os.path.exists(path):
            rng = np.random.default_rng(k)
            base = torch.nn.functional.interpolate(torch.from_numpy(rng.uniform(0, 255, (1, 3, 12, 16)))
                                                   .float(), size=(height, width), mode="bicubic")[0]
            shifts = np.cumsum(rng.integers(-3, 4, (frames, 2)), axis=0)
            video = np.stack([np.roll(base.numpy(), tuple(s), axis=(1, 2)) for s in shifts])  # (T, 3, H, W)
            video = np.clip(video + rng.normal(0, 4, video.shape), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
            common.write_video(path, video, fps=25, crf=23, gop=gop)
        paths.append(path)
    return paths


def transforms():
    def train(item):
        item["video"] = common.horizontal_flip(common.random_resized_crop_clip(item["video"], 112, (0.2, 1.0)))
        return item

    def evaluation(item):
        item["video"] = common.center_crop(common.resize_short_side(item["video"], 128), 112)
        return item
    return train, evaluation


def rate(fn, clips):
    start = time.perf_counter()
    fn()
    return clips / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=None, help="keep the generated videos here")
    parser.add_argument("--decoder", default="auto")
    opts = parser.parse_args()
    torch.set_num_threads(1)
    folder = opts.dir or tempfile.mkdtemp(prefix="bench_input_")
    train_tf, eval_tf = transforms()
    for name, height, width, gop in FORMATS:
        paths = make_videos(folder, name, height, width, gop, opts.videos)
        samples = [(p, 0) for p in paths]
        kw = dict(clip_len=16, frame_strides=(1, 2, 3, 4), decoder=opts.decoder)
        sets = {"train": common.VideoDataset(samples, ["x"], transform=train_tf, **kw),
                "twoclip": common.VideoDataset(samples, ["x"], transform=train_tf, num_clips=2, **kw),
                "eval": common.VideoDataset(samples, ["x"], transform=eval_tf, **kw)}
        rng = np.random.default_rng(0)

        def raw():
            for p in paths:
                n = common.count_frames(p) if p not in counts else counts[p]
                counts[p] = n
                common.read_video_frames(p, common.sample_clip_indices(n, 16, (1, 2, 3, 4), rng=rng)[0],
                                         opts.decoder)
        counts = {}
        raw()  # warm-up, frame counts cached: the dataset also opens each file once
        loader = torch.utils.data.DataLoader(sets["train"], batch_size=8, num_workers=1, persistent_workers=True)
        paths_fns = {"raw": (raw, len(paths)),
                     "train": (lambda: [sets["train"][i] for i in range(len(paths))], len(paths)),
                     "twoclip": (lambda: [sets["twoclip"][i] for i in range(len(paths))], 2 * len(paths)),
                     "eval": (lambda: [sets["eval"][i] for i in range(len(paths))], len(paths)),
                     "loader": (lambda: [b for b in loader], len(paths))}
        paths_fns["loader"][0]()  # start the worker
        rates = {k: [] for k in paths_fns}
        for _ in range(opts.repeats):
            for key, (fn, clips) in paths_fns.items():
                rates[key].append(rate(fn, clips))
        median = {k: round(statistics.median(v), 1) for k, v in rates.items()}
        load = os.getloadavg()[0]
        print(json.dumps({"format": name, "clips_per_s": median, "cpu": f"1 thread, {os.cpu_count()} cores, "
                          f"load {load:.1f}", **{f"{k}_vs_raw": round(median[k] / median["raw"], 2)
                                                 for k in ("train", "eval", "loader")},
                          "twoclip_vs_raw": round(median["twoclip"] / median["raw"], 2)}), flush=True)


if __name__ == "__main__":
    main()
