"""vicc.py's input per sample with and without --decode-on-device, CPU seconds of the loader worker and of the
training process.

    python benchmarks/bench_decode_on_device.py                   # 320x240 and 171x128 frame folders, 1 thread
    python benchmarks/bench_decode_on_device.py --videos 8 --repeats 3

Makes CoCLR-layout frame folders in a temporary folder (--dir to keep them): --frames synthetic frames per video
(bench_input.synthetic_video, PIL JPEG quality 90, 4:2:0) and one fewer smooth flow frames (common.write_flow_frames:
quality 100, 4:4:4). A sample is vicc.py's cross-stage input: two 32-frame clips of RGB and flow = 128 JPEGs, crop
128, the training transform of vicc.py (make_train_transform), as the loader's worker runs it:
  worker_ms  CPU ms per sample of the worker: dataset item (read, decode or not, crop + flip) in this process, item by
             item, both paths interleaved (median over --repeats after a warm-up repeat);
  loader_*   the same through common.build_loader with one worker, batch 8, one epoch per path: the worker's CPU
             (Linux per-process clock, incl. collate and sending) and this process's CPU receiving the batch;
  decode_ms  --decode-on-device only: common.decode_jpeg_clips on the CPU in this process per sample, the work a GPU
             takes over (its GPU time is not measured here).
The "data share" on a GPU is the worker's time against the step time; this CPU benchmark measures only how much of
the worker's CPU time moves out of it.
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
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_input  # noqa: E402
import common  # noqa: E402
import vicc  # noqa: E402

SEED = 0


def make_frame_folders(root, height, width, count, frames):
    """count videos root/train/x/v_<k>/{image_,flow_}%05d.jpg (reused when present) -> root."""
    from PIL import Image
    for k in range(count):
        folder = os.path.join(root, "train", "x", f"v_{k:03d}")
        if os.path.isdir(folder):
            continue
        os.makedirs(folder)
        for t, img in enumerate(bench_input.synthetic_video(k, height, width, frames)):
            Image.fromarray(img).save(os.path.join(folder, f"image_{t + 1:05d}.jpg"), quality=90)
        rng = np.random.default_rng(k)
        flow = np.stack([bench_input.texture(rng, height, width, 16)[:2].transpose(1, 2, 0) / 255 * 8 - 4
                         for _ in range(frames - 1)])  # (T - 1, H, W, 2) smooth, +-4 px
        common.write_flow_frames(flow.astype(np.float32), folder)
    return root


def datasets(root, on_device):
    args = vicc.parse_args(["--data", "videofolder", "--data-root", root, "--out-dir", os.path.join(root, "run"),
                            "--workers", "1", "--batch-size", "8"] + ["--decode-on-device"] * on_device)
    modalities = ("video", "flow")
    ds = common.build_dataset("videofolder", root, "train", clip_len=args.clip_len, num_clips=2, sampling="random",
                              modalities=modalities, transform=vicc.make_train_transform(args, modalities),
                              encoded=on_device)
    return args, ds


def measure(root, repeats):
    """-> {path: {worker_ms, loader_worker_ms, loader_main_ms[, decode_ms]}} per sample, medians over repeats."""
    paths = {name: datasets(root, name == "device") for name in ("cpu", "device")}
    items = {name: common.SeededItems(ds, SEED, 0) for name, (_, ds) in paths.items()}
    run = common.Run(paths["cpu"][0], torch.device("cpu"), root)
    loaders = {name: common.build_loader(ds, args, run, train=True) for name, (args, ds) in paths.items()}
    n = len(paths["cpu"][1])
    times = {name: {k: [] for k in ("worker_ms", "loader_worker_ms", "loader_main_ms", "decode_ms")}
             for name in paths}
    for r in range(repeats + 1):
        cpu = dict.fromkeys(paths, 0.0)
        for i in range(n):
            for name in (("cpu", "device") if i % 2 else ("device", "cpu")):
                c0 = time.process_time()
                items[name][(r, i)]
                cpu[name] += time.process_time() - c0
        for name in (("cpu", "device") if r % 2 else ("device", "cpu")):
            loader, decode, samples = loaders[name], 0.0, 0
            loader.sampler.set_epoch(r)
            pids = bench_input.worker_pids(loader)
            w0, c0 = bench_input.cpu_seconds(pids), time.process_time()
            for batch in loader:
                samples += len(batch["index"])
                if name == "device":
                    d0 = time.process_time()
                    common.decode_jpeg_clips(batch["jpeg"], 128, torch.device("cpu"))
                    decode += time.process_time() - d0
            main = time.process_time() - c0 - decode
            if r > 0:
                times[name]["worker_ms"].append(cpu[name] * 1000 / n)
                times[name]["loader_worker_ms"].append((bench_input.cpu_seconds(pids) - w0) * 1000 / samples)
                times[name]["loader_main_ms"].append(main * 1000 / samples)
                times[name]["decode_ms"].append(decode * 1000 / samples)
    for loader in loaders.values():
        if getattr(loader, "_iterator", None) is not None:
            loader._iterator._shutdown_workers()
    out = {name: {k: round(statistics.median(v), 1) for k, v in t.items()} for name, t in times.items()}
    del out["cpu"]["decode_ms"]
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", type=int, default=16)
    parser.add_argument("--frames", type=int, default=100, help="RGB frames per video (>= 33 for 32-frame clips)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=None, help="keep the generated frame folders here (reused when present)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for height, width in ((240, 320), (128, 171)):
            root = make_frame_folders(os.path.join(args.dir or tmp, f"{width}x{height}"), height, width,
                                      args.videos, args.frames)
            result = {"format": f"{width}x{height}", **measure(root, args.repeats), "load": bench_input.load()}
            result["worker_ratio"] = round(result["device"]["loader_worker_ms"] / result["cpu"]["loader_worker_ms"], 2)
            print(json.dumps(result), flush=True)
            results.append(result)
    return results


if __name__ == "__main__":
    main()
