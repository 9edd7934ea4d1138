"""Would letting the decoder resize make the dataset's transform free? CPU ms per clip of today's path (decode the
whole frame, then crop + resize the box in torch) against decoding at the scale that makes the box the output size.

    python benchmarks/bench_decoder_resize.py                  # 3 formats, 16 videos, 5 repeats, 1 thread
    python benchmarks/bench_decoder_resize.py --dir /tmp/vids  # reuse bench_input.py's videos

The videos and clips are bench_input.py's (16-frame clips, stride 1-4, item (0, i)'s indices); the crop box of
clip i is common.random_resized_crop_box's draw (area 0.2-1, 112 px) from a generator seeded with i, the same box
on both sides. Per clip, in an order rotated per video, CPU time of this process (all threads):
  raw            decord at the native size (common._read_frames' reader): the ceiling,
  train-torch    raw, the box cut and resized by common._resize_clip (as random_resized_crop_clip does it) +
                 horizontal_flip: what tubelet_contrast.py's training set does,
  train-decoder  decord at the box's scale (VideoReader(width=, height=)), the 112 x 112 slice copied + flip,
  eval-torch     raw + common.resized_center_crop(128, 112) (evaluate.py's and the kNN monitor's test clips),
  eval-decoder   decord at the short-side-128 size, the centre 112 x 112 slice copied,
  probe          av.open + the stream's frame size: what the decoder paths must add, as decord sizes its output
                 when the reader opens and reports no frame size before,
  pyav-torch / pyav-decoder, pyav-eval-torch / pyav-eval-decoder  the same train and eval clips with PyAV (which
                 knows the frame size before converting, no probe needed): rgb24 frames at the native size + the
                 torch crop, or converted at the box's scale (swscale bilinear); one VideoReformatter per clip.
The box's scale grows the decoded frame where the box is smaller than 112 px (upscaled): the frame then has more
pixels than the video. Printed: median ms per clip, each path's ratio to raw (clips per CPU second), the pixel
difference (mean / max / mean of the luma, 0..255) between the decoder's and torch's crops of one box, the
share of boxes that are upscaled, and the load average.
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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_input  # noqa: E402
import common  # noqa: E402  (bench_input put the repository root on the path)

CROP, SHORT_SIDE = 112, 128


def scaled_box(height, width, box, size=CROP):
    """The frame size (H', W') at which box (top, left, h, w) becomes size x size, and the box's top-left there."""
    top, left, h, w = box
    frame = (max(size, round(height * size / h)), max(size, round(width * size / w)))
    return frame, (min(round(top * size / h), frame[0] - size), min(round(left * size / w), frame[1] - size))


def decord_frames(path, indices, size=None):
    """uint8 (T, H, W, 3) from decord, at the native size or size = (H', W')."""
    import decord
    kwargs = {} if size is None else {"height": size[0], "width": size[1]}
    return decord.VideoReader(path, num_threads=1, **kwargs).get_batch(indices).asnumpy()


def pyav_frames(path, indices, size=None):
    """uint8 (T, H, W, 3) from PyAV (decoded from frame 0, one thread), rgb24 at the native size or size, through
    one VideoReformatter (one swscale context for the clip, as common._read_pyav)."""
    import av
    from av.video.reformatter import VideoReformatter
    reformatter, wanted, out = VideoReformatter(), set(indices), {}
    kwargs = {} if size is None else {"height": size[0], "width": size[1]}
    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.codec_context.thread_count = 1
        for k, frame in enumerate(container.decode(stream)):
            if k in wanted:
                out[k] = reformatter.reformat(frame, format="rgb24", **kwargs).to_ndarray()
            if k >= max(indices):
                break
    return np.stack([out[k] for k in indices])


def clip(frames):
    return torch.from_numpy(frames).permute(3, 0, 1, 2)  # (C, T, H, W) view, as VideoDataset passes it


def probe(path):
    import av
    with av.open(path) as container:
        stream = container.streams.video[0]
        return stream.height, stream.width


def paths_for(height, width):
    """{name: fn(path, indices, box) -> the clip or None} of the module docstring."""
    def train_decoder(read):
        def fn(path, indices, box):
            (fh, fw), (top, left) = scaled_box(height, width, box)
            x = clip(read(path, indices, (fh, fw)))[..., top:top + CROP, left:left + CROP]
            return common.horizontal_flip(common._contiguous(x), p=1.0)
        return fn

    def train_torch(read):
        def fn(path, indices, box):
            top, left, h, w = box
            x = common._resize_clip(clip(read(path, indices))[..., top:top + h, left:left + w], (CROP, CROP))
            return common.horizontal_flip(x, p=1.0)
        return fn

    new = common._short_side_size(height, width, SHORT_SIDE)
    top, left = (new[0] - CROP) // 2, (new[1] - CROP) // 2
    return {"raw": lambda p, i, b: decord_frames(p, i),
            "train-torch": train_torch(decord_frames),
            "train-decoder": train_decoder(decord_frames),
            "eval-torch": lambda p, i, b: common.resized_center_crop(clip(decord_frames(p, i)), SHORT_SIDE, CROP),
            "eval-decoder": lambda p, i, b: common._contiguous(
                clip(decord_frames(p, i, new))[..., top:top + CROP, left:left + CROP]),
            "probe": lambda p, i, b: probe(p),
            "pyav-torch": train_torch(pyav_frames),
            "pyav-decoder": train_decoder(pyav_frames),
            "pyav-eval-torch": lambda p, i, b: common.resized_center_crop(clip(pyav_frames(p, i)), SHORT_SIDE, CROP),
            "pyav-eval-decoder": lambda p, i, b: common._contiguous(
                clip(pyav_frames(p, i, new))[..., top:top + CROP, left:left + CROP])}


def pixel_difference(fns, items):
    """{pair: (mean, max, luma mean)} |decoder - torch| over all clips (0..255), same boxes and flips; luma: of
    0.299 R + 0.587 G + 0.114 B, which leaves out how each interpolates the 4:2:0 chroma."""
    luma = torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1, 1)
    out = {}
    for a, b in (("train-decoder", "train-torch"), ("eval-decoder", "eval-torch"), ("pyav-decoder", "pyav-torch"),
                 ("pyav-eval-decoder", "pyav-eval-torch")):
        d = [fns[a](*item).float() - fns[b](*item).float() for item in items]  # K x (3, T, 112, 112)
        out[f"{a} vs {b}"] = (round(float(torch.stack(d).abs().mean()), 2), int(torch.stack(d).abs().max()),
                              round(float(torch.stack([(x * luma).sum(0) for x in d]).abs().mean()), 2))
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dir", default=None, help="keep the generated videos here (reused when present)")
    opts = parser.parse_args(argv)
    torch.set_num_threads(1)
    folder = opts.dir or tempfile.mkdtemp(prefix="bench_decoder_resize_")
    for name, height, width, gop in bench_input.FORMATS:
        paths = bench_input.make_videos(folder, name, height, width, gop, opts.videos)
        items = []
        for i, path in enumerate(paths):
            n = common.count_frames(path, "decord")
            box = common.random_resized_crop_box(height, width, (0.2, 1.0), generator=torch.Generator().manual_seed(i))
            items.append((path, bench_input.clip_indices(0, i, n, 1)[0].tolist(), box))
        fns, start = paths_for(height, width), bench_input.load()
        names, ms = list(fns), {k: [] for k in fns}
        for r in range(opts.repeats + 1):  # repeat 0 warms up
            cpu = dict.fromkeys(names, 0.0)
            for k, item in enumerate(items):
                for key in names[k % len(names):] + names[:k % len(names)]:
                    c0 = time.process_time()
                    fns[key](*item)
                    cpu[key] += time.process_time() - c0
            if r > 0:
                for key in names:
                    ms[key].append(cpu[key] * 1000 / len(items))
        med = {k: round(statistics.median(v), 2) for k, v in ms.items()}
        upscaled = sum(min(b[2], b[3]) < CROP for _, _, b in items) / len(items)
        ratio = {k: round(med["raw"] / med[k], 2) for k in names if k not in ("raw", "probe")}
        print(json.dumps({"format": name, "ms_per_clip": med, "ratio_to_raw": ratio,
                          "pixel_difference_mean_max_luma": pixel_difference(fns, items),
                          "boxes_upscaled": round(upscaled, 2),
                          "cpu": f"1 thread, {os.cpu_count()} cores, {start} -> {bench_input.load()}"}), flush=True)


if __name__ == "__main__":
    main()
