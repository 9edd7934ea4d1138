"""Input pipeline speed per CPU core: raw decode vs the dataset (decode + a script's transform) vs the loader.

    python benchmarks/bench_input.py                    # 3 formats x 9 paths, 1 thread, 1 loader worker
    python benchmarks/bench_input.py --videos 16 --repeats 7
    python benchmarks/bench_input.py --prepared         # UCF101-like videos before / after `prepare-videos`

Makes its own H.264 videos with PyAV in a temporary folder (--dir to keep them): 320x240 with libx264's default
keyframe interval (250, as downloaded), and 170x128 / 340x256 with a keyframe every 16 frames (as
`python common.py prepare-videos` writes them). For each, 16-frame clips (stride 1-4, random start) are read:
  raw      the dataset's reader (common._read_frames: decord by default) at the clip's indices: the ceiling,
  raw2     the same for two clips per video in one read (the ceiling of twoclip),
  train    the tubelet_contrast.py training set: random resized crop to 112 (area 0.2-1) + flip, uint8,
  twoclip  two clips per video (ViCC-style / the temporal baseline), crop + flip per clip,
  eval     resize short side to 128 + centre crop 112 (evaluate.py's clips; common.resized_center_crop),
  loader-* each of the three through common.build_loader (the training scripts' loader) with one worker, batch 8,
  loader-raw  the loader's worker decoding the same clips but handing over only their indices: what decoding in a
           worker beside this process costs (loader-X / loader-raw is what the transform, collate and transfer cost).
Every path reads the same clips: items are seeded from (epoch, index) as common.SeededItems does, and raw / raw2
draw their indices from the same seeds. The in-process paths run interleaved item by item (order rotated per
item), then each loader one epoch while this process waits; median over --repeats after a warm-up repeat.

"per core" = clips per CPU second: the CPU time of this process and of the loader's worker (all threads, Linux's
per-process CPU clocks), so other jobs on a shared machine slow the wall clock but hardly this figure; wall-clock
clips/s and the load average are printed next to it. Ratios: train, eval, loader-raw, loader-train, loader-eval
over raw; twoclip and loader-twoclip over raw2; loader_ratio_to_loader_raw: loader-train and loader-eval over
loader-raw (both decode in a worker process, clip after clip); on a shared machine they move by up to +-0.1 from
run to run. transform_ms: the CPU time of the train / eval transform alone per clip (next to raw_ms, 1000 / raw
per core: the ratio the transform alone allows is raw_ms / (raw_ms + transform_ms)). One JSON line per format,
then a table.

--prepared: --videos UCF101-like videos (320x240, 25 fps, 7.2 s, libx264 default keyframes) are re-encoded by
common.prepare_videos (--short-side 128 --gop 16, one worker); raw, train and loader-train are measured on both
trees interleaved, with the disk use of each tree and the encoding time. The content is synthetic (textured, moving,
~320 kbit/s at 320x240): the disk saving depends on content, the decode speed-up mostly on the resolution and
keyframe interval.
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import types

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402

FORMATS = (("320x240-gop250", 240, 320, 250), ("170x128-gop16", 128, 170, 16), ("340x256-gop16", 256, 340, 16))
STRIDES, SEED = (1, 2, 3, 4), 0


def texture(rng, height, width, cell):
    """Smooth colour noise with detail every `cell` pixels -> float (3, height, width) in 0..255."""
    small = torch.from_numpy(rng.uniform(0, 255, (1, 3, height // cell + 3, width // cell + 3))).float()
    return torch.nn.functional.interpolate(small, scale_factor=cell, mode="bicubic")[0, :, :height, :width] \
        .clamp(0, 255).numpy()


def synthetic_video(seed, height, width, frames):
    """uint8 (T, H, W, 3): a textured background under a slowly wandering camera, two textured squares bouncing
    across it, sensor noise. At 320x240 / 25 fps libx264 CRF 23 spends ~320 kbit/s on it (UCF101's XviD files:
    ~500), so the decoder works on real-looking bitstreams."""
    rng, margin, side = np.random.default_rng(seed), 48, min(56, height // 2, width // 2)
    background = texture(rng, height + 2 * margin, width + 2 * margin, 6)  # (3, H + 2m, W + 2m)
    pan = np.clip(np.cumsum(rng.normal(0, 0.7, (frames, 2)), 0), -margin, margin).round().astype(int) + margin
    room = np.array([height - side, width - side])
    objects = [(texture(rng, side, side, 4), rng.uniform(0, room), rng.normal(0, 2.5, 2)) for _ in range(2)]
    video = np.empty((frames, height, width, 3), np.uint8)
    for t in range(frames):
        frame = background[:, pan[t, 0]:pan[t, 0] + height, pan[t, 1]:pan[t, 1] + width].copy()  # (3, H, W)
        for tex, start, velocity in objects:
            y, x = np.abs((start + velocity * t + room) % (2 * room) - room).astype(int)  # bounces off the borders
            frame[:, y:y + side, x:x + side] = tex
        video[t] = np.clip(frame + rng.normal(0, 3, frame.shape), 0, 255).astype(np.uint8).transpose(1, 2, 0)
    return video


def make_videos(folder, name, height, width, gop, count, frames=96, fps=25):
    """count synthetic H.264 videos (libx264 CRF 23, a keyframe every gop frames) -> paths; existing ones are
    reused."""
    paths = []
    for k in range(count):
        path = os.path.join(folder, name, f"video_{k:03d}.mp4")
        if not os.path.exists(path):
            common.write_video(path, synthetic_video(k, height, width, frames), fps=fps, crf=23, gop=gop)
        paths.append(path)
    return paths


def drop_video(item):
    """loader-raw's transform: the decoded clip is dropped, the item's small tensors travel on."""
    del item["video"]
    return item


def transforms():
    def train(item):
        item["video"] = common.horizontal_flip(common.random_resized_crop_clip(item["video"], 112, (0.2, 1.0)))
        return item

    def evaluation(item):
        item["video"] = common.resized_center_crop(item["video"], 128, 112)
        return item
    return train, evaluation


def cpu_seconds(pids):
    """CPU time of processes `pids`: all threads, also those that ended (decord decodes in threads it starts per
    file), to the nanosecond. Linux's CPU-time clock of process pid, whose id clock_getcpuclockid(3) makes as
    (~pid << 3) | CPUCLOCK_SCHED; /proc/<pid>/stat counts 10 ms ticks, +-5 % of a 16-clip epoch."""
    return sum(time.clock_gettime((~pid << 3) | 2) for pid in pids)


def item_seed(epoch, i):
    """The torch seed common.SeededItems sets for item (epoch, i) (seed SEED, rank 0)."""
    return int(np.random.SeedSequence([SEED, 0, epoch, i]).generate_state(3)[0])


def clip_indices(epoch, i, num_frames, num_clips):
    """The frame indices (num_clips, 16) that item (epoch, i) of the benchmark's VideoDatasets reads."""
    torch.default_generator.manual_seed(item_seed(epoch, i))
    rng = common._seed_rng()  # as VideoDataset._indices draws them
    return common.sample_clip_indices(num_frames, 16, STRIDES, num_clips, "random", rng)


def build_paths(paths, wanted, decoder):
    """{name: (fn, clips per item or per epoch, loader or None)} for the path names in `wanted`: fn(epoch, i)
    reads item i (raw, raw2 and the datasets); loader-* have a loader instead (fn None)."""
    train_tf, eval_tf = transforms()
    samples = [(p, 0) for p in paths]
    kw = dict(clip_len=16, frame_strides=STRIDES, decoder=decoder)
    sets = {"train": common.VideoDataset(samples, ["x"], transform=train_tf, **kw),
            "twoclip": common.VideoDataset(samples, ["x"], transform=train_tf, num_clips=2, **kw),
            "eval": common.VideoDataset(samples, ["x"], transform=eval_tf, **kw),
            "raw": common.VideoDataset(samples, ["x"], transform=drop_video, **kw)}
    args = types.SimpleNamespace(batch_size=8, workers=1, seed=SEED)
    run = types.SimpleNamespace(world_size=1, rank=0, device=torch.device("cpu"))
    out = {}
    for name in wanted:
        clips = 2 if name.endswith(("twoclip", "raw2")) else 1
        if name in ("raw", "raw2"):  # decode only, the dataset's reader at item (epoch, i)'s indices
            out[name] = (lambda epoch, i, k=clips: common._read_frames(
                paths[i], lambda n: clip_indices(epoch, i, n, k).reshape(-1), decoder), clips, None)
        elif name in sets:
            out[name] = (lambda epoch, i, s=common.SeededItems(sets[name], SEED, 0): s[(epoch, i)], clips, None)
        else:  # loader-<set>: the training loader (persistent worker, shuffled, full batches)
            loader = common.build_loader(sets[name.split("-")[1]], args, run, train=True)
            out[name] = (None, len(loader) * args.batch_size * clips, loader)
    return out


def close(groups):
    """Stop the loaders' persistent workers (left to interpreter exit, they can hang it)."""
    for fns in groups.values():
        for _, _, loader in fns.values():
            if getattr(loader, "_iterator", None) is not None:
                loader._iterator._shutdown_workers()


def worker_pids(loader):
    iterator = getattr(loader, "_iterator", None)  # persistent workers live in the loader's iterator
    return [w.pid for w in getattr(iterator, "_workers", [])]


def measure(groups, repeats, items):
    """groups {label: {path: (fn, clips, loader)}} -> {label: {path: (median per-core rate, median wall rate)}}.
    Per repeat (repeat 0 warms up and starts the workers): item by item, every in-process path reads item i in
    an order rotated per item (all paths see the same machine load); then each loader runs one epoch while this
    process waits, so no path decodes beside another of this benchmark's (run beside the busy benchmark process, a
    worker took 3-12 % more CPU per clip: loader-raw 0.88-0.97 of raw in five format x run pairs)."""
    keys = [(label, name) for label, fns in groups.items() for name in fns]
    inproc = [k for k in keys if groups[k[0]][k[1]][2] is None]
    loaders = [k for k in keys if groups[k[0]][k[1]][2] is not None]
    rates = {k: ([], []) for k in keys}
    for r in range(repeats + 1):
        cpu, wall = dict.fromkeys(keys, 0.0), dict.fromkeys(keys, 0.0)
        for i in range(items):
            for key in inproc[i % len(inproc):] + inproc[:i % len(inproc)]:
                c0, w0 = time.process_time(), time.perf_counter()
                groups[key[0]][key[1]][0](r, i)
                cpu[key] += time.process_time() - c0
                wall[key] += time.perf_counter() - w0
        for key in loaders[r % max(len(loaders), 1):] + loaders[:r % max(len(loaders), 1)]:
            loader = groups[key[0]][key[1]][2]
            loader.sampler.set_epoch(r)
            pids = worker_pids(loader)  # persistent workers (none before the first epoch)
            c0, w0 = time.process_time() + cpu_seconds(pids), time.perf_counter()
            for _ in loader:
                pass
            wall[key] = time.perf_counter() - w0
            cpu[key] = time.process_time() + cpu_seconds(pids) - c0
        if r > 0:
            for key in keys:
                clips = groups[key[0]][key[1]][1] * (items if key in inproc else 1)
                rates[key][0].append(clips / cpu[key])
                rates[key][1].append(clips / wall[key])
    return {label: {name: tuple(round(statistics.median(v), 1) for v in rates[(label, name)]) for name in fns}
            for label, fns in groups.items()}


def transform_ms(paths, decoder, repeats=5):
    """CPU ms per clip of the train and eval transforms alone, on one decoded clip per video (the part of the
    dataset's cost that is not decoding; far less noisy on a shared machine than the ratios)."""
    clips = [torch.from_numpy(common.read_video_frames(p, np.arange(16), decoder)).permute(3, 0, 1, 2)
             for p in paths]  # (C, T, H, W) views of the decoder's (T, H, W, C), as VideoDataset passes them
    out = {}
    for name, fn in zip(("train", "eval"), transforms()):
        c0 = time.process_time()
        for _ in range(repeats):
            for clip in clips:
                fn({"video": clip})
        out[name] = round((time.process_time() - c0) * 1000 / (repeats * len(clips)), 2)
    return out


def ratios(per, base):
    return {name: round(per[name] / per[base.get(name, "raw")], 2) for name in per if not name.startswith("raw")}


def load():
    return "load " + "/".join(f"{v:.1f}" for v in os.getloadavg())


def folder_bytes(paths):
    return sum(os.path.getsize(p) for p in paths)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dir", default=None, help="keep the generated videos here (reused when present)")
    parser.add_argument("--decoder", default="auto")
    parser.add_argument("--prepared", action="store_true", help="UCF101-like videos before/after prepare-videos")
    opts = parser.parse_args(argv)
    torch.set_num_threads(1)
    folder = opts.dir or tempfile.mkdtemp(prefix="bench_input_")
    base = {"twoclip": "raw2", "loader-twoclip": "raw2"}
    machine = f"1 thread, {os.cpu_count()} cores, decoder {common.resolve_decoder(opts.decoder)}"
    rows = []
    if opts.prepared:
        src = make_videos(os.path.join(folder, "ucf-like"), "videos", 240, 320, 250, opts.videos, frames=180)
        dst_root = os.path.join(folder, "ucf-like-prepared")
        c0, w0 = time.process_time(), time.perf_counter()
        common.prepare_videos(os.path.join(folder, "ucf-like"), dst_root, short_side=128, gop=16,
                              out=lambda *a: None)
        encode = {"cpu_s_per_video": round((time.process_time() - c0) / opts.videos, 3),
                  "wall_s_per_video": round((time.perf_counter() - w0) / opts.videos, 3)}
        dst = [os.path.join(dst_root, os.path.relpath(p, os.path.join(folder, "ucf-like"))) for p in src]
        start = load()
        trees = {"before 320x240 gop250": src, "after 170x128 gop16": dst}
        groups = {k: build_paths(v, ("raw", "train", "loader-train"), opts.decoder) for k, v in trees.items()}
        result = measure(groups, opts.repeats, opts.videos)
        close(groups)
        for label, paths in trees.items():
            per, wall = ({k: v[i] for k, v in result[label].items()} for i in (0, 1))
            rows.append((label, per, wall, ratios(per, base)))
            print(json.dumps({"tree": label, "per_core": per, "wall": wall, "ratio_per_core": rows[-1][3],
                              "disk_MB": round(folder_bytes(paths) / 2 ** 20, 2), "cpu": f"{machine}, {start} -> "
                              f"{load()}", **({"prepare": encode} if label.startswith("after") else {})}), flush=True)
        print(f"prepared / original: raw decode {rows[1][1]['raw'] / rows[0][1]['raw']:.2f}x clips/s per core, "
              f"disk {folder_bytes(dst) / folder_bytes(src):.2f}x")
    else:
        for name, height, width, gop in FORMATS:
            paths = make_videos(folder, name, height, width, gop, opts.videos)
            start = load()
            fns = build_paths(paths, ("raw", "raw2", "train", "twoclip", "eval", "loader-raw", "loader-train",
                                      "loader-twoclip", "loader-eval"), opts.decoder)
            result = measure({name: fns}, opts.repeats, opts.videos)[name]
            close({name: fns})
            per, wall = ({k: v[i] for k, v in result.items()} for i in (0, 1))
            rows.append((name, per, wall, ratios(per, base)))
            print(json.dumps({"format": name, "per_core": per, "wall": wall, "ratio_per_core": rows[-1][3],
                              "ratio_wall": ratios(wall, base), "loader_ratio_to_loader_raw": {
                                  n: round(per[n] / per["loader-raw"], 2) for n in ("loader-train", "loader-eval")},
                              "raw_ms": round(1000 / per["raw"], 1),
                              "transform_ms": transform_ms(paths, opts.decoder),
                              "cpu": f"{machine}, {start} -> {load()}"}), flush=True)
    names = list(rows[0][1])
    print("\nclips/s per core (ratio to raw decode; twoclip to raw2)")
    print("| " + " | ".join(["format"] + names) + " |")
    for label, per, _, ratio in rows:
        print("| " + " | ".join([label] + [f"{per[n]}" + (f" ({ratio[n]:.2f})" if n in ratio else "")
                                           for n in names]) + " |")


if __name__ == "__main__":
    main()
