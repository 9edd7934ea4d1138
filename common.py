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
import math
import os
import shutil
import sys
import warnings

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF


# ==================================================================================================== DISTRIBUTED


# ==================================================================================================== FLAGS


# ==================================================================================================== VIDEO DECODING
# One reader per call, one decoder thread, indices clamped to the real frame count (decord can spin forever past
# the end, dmlc/decord#373). Frame folders follow the CoCLR/ViCC layout: image_%05d.jpg and flow_%05d.jpg, 1-based.

KINETICS_MEAN = (0.43216, 0.394666, 0.37645)  # torchvision video models (Kinetics-400)
KINETICS_STD = (0.22803, 0.22145, 0.216989)
FLOW_BOUND = 20.0  # CoCLR/ViCC/I3D: flow clipped to +-20 px and mapped linearly to 0..255


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
        size = (size, max(1, round(w * size / h))) if h <= w else (max(1, round(h * size / w)), size)
    if tuple(size) == (h, w):
        return frames
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()  # (T, C, H, W)
    x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False, antialias=True)
    return x.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def _frame_files(folder, prefix):
    try:
        names = os.listdir(folder)
    except OSError as e:
        raise VideoReadError(f"{folder}: cannot list frame folder ({e.strerror})") from None
    return sorted(n for n in names if n.startswith(prefix + "_") and n.endswith(".jpg"))


def _read_jpegs(folder, prefix, index_fn, size, mode="RGB"):
    from PIL import Image
    n = len(_frame_files(folder, prefix))
    if n == 0:
        raise VideoReadError(f"{folder}: expected {prefix}_00001.jpg ... frames, found none")
    indices = _clamp(index_fn(n), n)
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


def _read_decord(path, index_fn, size):
    import decord
    kwargs = {"width": size[1], "height": size[0]} if size is not None and not isinstance(size, int) else {}
    vr = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1, **kwargs)
    n = len(vr)
    if n <= 0:
        raise VideoReadError(f"{path}: decord reports 0 frames")
    indices = _clamp(index_fn(n), n)
    try:
        frames = vr.get_batch(indices.tolist()).asnumpy()
    except Exception:  # the container over-reported its length: retry with the tail pulled in (sec. A1.6)
        frames = vr.get_batch(_clamp(indices, max(1, n - 8)).tolist()).asnumpy()
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
        if first > 48 and stream.average_rate and stream.time_base:
            frames, decoded_last = _pyav_decode(container, stream, wanted, last, first)
            if frames is not None and any(i not in frames for i in wanted if i <= decoded_last):
                frames = None
        if frames is None:
            frames, decoded_last = _pyav_decode(container, stream, wanted, last, None)
        if not frames:
            raise VideoReadError(f"{path}: no frame could be decoded (expected {n})")
        if last - decoded_last > max(8, n // 10):  # a few missing frames: over-reported length; many: truncated
            raise VideoReadError(f"{path}: truncated: decoding stopped at frame {decoded_last}, expected {n} frames")
        kwargs = {"width": size[1], "height": size[0]} if size is not None and not isinstance(size, int) else {}
        arrays = {i: f.to_ndarray(format="rgb24", **kwargs) for i, f in frames.items()}
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
            size = (size, max(1, round(w * size / h))) if h <= w else (max(1, round(h * size / w)), size)
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


# ==================================================================================================== CLIP SAMPLING
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


def sample_clip_indices(num_frames, clip_len, strides=(1,), num_clips=1, sampling="random", rng=None,
                        jitter=False, step=None):
    """Dispatcher used by the datasets -> (K, clip_len). sampling: random | uniform | sliding | consecutive."""
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
    raise ValueError(f"sampling: expected random, uniform, sliding or consecutive, got {sampling!r}")


# ==================================================================================================== TRANSFORMS
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
    """(C, T, h, w) -> (C, T, size[0], size[1]), bilinear with antialiasing, dtype kept."""
    x = clip.transpose(0, 1).float()  # (T, C, h, w)
    x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False, antialias=True)
    if clip.dtype == torch.uint8:
        x = x.round_().clamp_(0, 255).to(torch.uint8)
    return x.transpose(0, 1).to(clip.dtype)


def _pair(size):
    return (size, size) if isinstance(size, int) else tuple(size)


def random_resized_crop_clip(x, size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), generator=None):
    """torchvision RandomResizedCrop parameters (10 tries, then a centre crop), one box per clip."""
    clips, lead = _clips(x)
    height, width = clips.shape[-2:]
    out = []
    for clip in clips:
        for _ in range(10):
            area = height * width * _uniform(scale[0], scale[1], generator)
            aspect = math.exp(_uniform(math.log(ratio[0]), math.log(ratio[1]), generator))
            w, h = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
            if 0 < w <= width and 0 < h <= height:
                i = int(torch.randint(0, height - h + 1, (), generator=generator))
                j = int(torch.randint(0, width - w + 1, (), generator=generator))
                break
        else:
            aspect_in = width / height
            if aspect_in < min(ratio):
                w, h = width, int(round(width / min(ratio)))
            elif aspect_in > max(ratio):
                h, w = height, int(round(height * max(ratio)))
            else:
                w, h = width, height
            i, j = (height - h) // 2, (width - w) // 2
        out.append(_resize_clip(clip[..., i:i + h, j:j + w], _pair(size)))
    return torch.stack(out).reshape(*lead, *out[0].shape)


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
    h, w = _pair(size)
    height, width = x.shape[-2:]
    if h > height or w > width:
        raise ValueError(f"center_crop: crop {h}x{w} larger than the clip {height}x{width}")
    i, j = (height - h) // 2, (width - w) // 2
    return x[..., i:i + h, j:j + w]


def resize_short_side(x, size):
    """Resize so that min(H, W) == size, keeping the aspect ratio."""
    height, width = x.shape[-2:]
    if height <= width:
        new = (size, max(1, int(round(width * size / height))))
    else:
        new = (max(1, int(round(height * size / width))), size)
    clips, lead = _clips(x)
    out = torch.stack([_resize_clip(c, new) for c in clips])
    return out.reshape(*lead, *out.shape[1:])


def horizontal_flip(x, p=0.5, generator=None, flow=False):
    """Flip each clip with probability p. flow=True: channel 0 is the horizontal displacement and changes sign."""
    clips, lead = _clips(x)
    flip = (torch.rand(clips.shape[0], generator=generator) < p).to(x.device)
    out = clips.clone()
    if flip.any():
        out[flip] = out[flip].flip(-1)
        if flow:
            out[flip, 0] = -out[flip, 0]
    return out.reshape(x.shape)


def color_jitter(x, brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1, p=0.8, shared=False, generator=None):
    """Colour jitter (torchvision factors, random order) on RGB clips, applied with probability p per clip.
    shared=True draws one set of parameters for every clip in x (e.g. torch.stack of two views)."""
    clips, lead = _clips(x)
    if clips.shape[1] != 3:
        raise ValueError(f"color_jitter: expected 3 channels, got shape {tuple(x.shape)}")
    out, params = [], None
    for clip in clips:
        if params is None or not shared:
            params = (torch.rand((), generator=generator).item() < p,
                      _uniform(max(0, 1 - brightness), 1 + brightness, generator),
                      _uniform(max(0, 1 - contrast), 1 + contrast, generator),
                      _uniform(max(0, 1 - saturation), 1 + saturation, generator),
                      _uniform(-hue, hue, generator), torch.randperm(4, generator=generator).tolist())
        apply, b, c, s, h, order = params
        img = clip.transpose(0, 1)  # (T, C, H, W): torchvision's image layout
        if apply:
            for k in order:
                if k == 0:
                    img = TF.adjust_brightness(img, b)
                elif k == 1:
                    img = TF.adjust_contrast(img, c)
                elif k == 2:
                    img = TF.adjust_saturation(img, s)
                else:
                    img = TF.adjust_hue(img, h)
        out.append(img.transpose(0, 1))
    return torch.stack(out).reshape(x.shape)


def random_grayscale(x, p=0.2, generator=None):
    """Replace RGB by its luma (ITU-R 601, 3 channels kept) with probability p per clip."""
    clips, lead = _clips(x)
    out = clips.clone()
    gray = torch.rand(clips.shape[0], generator=generator) < p
    for n in torch.nonzero(gray).flatten().tolist():
        out[n] = TF.rgb_to_grayscale(clips[n].transpose(0, 1), num_output_channels=3).transpose(0, 1)
    return out.reshape(x.shape)


def gaussian_blur(x, sigma=(0.1, 2.0), p=0.5, kernel_size=None, generator=None):
    """Gaussian blur with sigma ~ U(sigma) per clip with probability p (SimCLR: kernel ~ 10 % of the side)."""
    clips, lead = _clips(x)
    if kernel_size is None:
        kernel_size = max(3, int(0.1 * min(clips.shape[-2:])) // 2 * 2 + 1)
    out = clips.clone()
    for n in range(clips.shape[0]):
        s = _uniform(sigma[0], sigma[1], generator)
        if torch.rand((), generator=generator).item() < p:
            out[n] = TF.gaussian_blur(clips[n].transpose(0, 1), [kernel_size, kernel_size], [s, s]).transpose(0, 1)
    return out.reshape(x.shape)


def normalize(x, mean=KINETICS_MEAN, std=KINETICS_STD):
    """uint8 (0..255) or float (0..1) clips -> float32 (x - mean) / std per channel (dim -4)."""
    x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
    mean = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(-1, 1, 1, 1)
    std = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(-1, 1, 1, 1)
    return (x - mean) / std


# ==================================================================================================== DATASETS
# build_dataset(name, root, split, ...) -> Dataset of dicts. Parsers turn the official annotation files into a
# list of (path, label); three small Dataset classes read videos, skeleton arrays or Kinetics-Skeleton JSON.
# Bad data: a sample that cannot be read is replaced by the next one (index + 1, + 2, ...), named in a warning
# once per file and process, and appended as "path<TAB>reason" to bad_files_path; strict=True raises instead.

VIDEO_EXTENSIONS = (".mp4", ".avi", ".webm", ".mkv", ".mov", ".m4v")
PUBLISHED_SIZES = {  # split sizes stated by the papers (thesis Table 5.1; NTU README); check-data compares
    "ucf101": {"train": 9537, "val": 3783}, "hmdb51": {"train": 3570, "val": 1530},
    "ssv2": {"train": 168913, "val": 24777}, "gym99": {"train": 20484, "val": 8521},
    "fx-s1": {"train": 1882, "val": 777}, "ub-s1": {"train": 3511, "val": 1471},
    "charades": {"train": 7985, "val": 1863}, "ucfrep": {"train": 421, "val": 105},
    "k400": {"train": 246535, "val": 19907},  # full YouTube list; local copies miss ~6-10 % (sec. A2)
    "ntu60-xsub": {"train": 40320, "val": 16560}, "ntu60-xview": {"train": 37920, "val": 18960},
}
# FineGym-99 label ranges per event (gym99_categories: VT 0-5, FX 6-40, BB 41-73, UB 74-98); FX-S1 = 6-16
# (leaps-jumps-hops), UB-S1 = 74-88 (circles) as in SEVERE, relabelled from 0.
GYM_SUBSETS = {"gym-vault": range(0, 6), "gym-floor": range(6, 41), "fx-s1": range(6, 17), "ub-s1": range(74, 89)}
NTU_XSUB_TRAIN = (1, 2, 4, 5, 8, 9, 13, 14, 15, 16, 17, 18, 19, 25, 27, 28, 31, 34, 35, 38)
NTU120_XSUB_TRAIN = NTU_XSUB_TRAIN + (45, 46, 47, 49, 50, 52, 53, 54, 55, 56, 57, 58, 59, 70, 74, 78, 80, 81, 82,
                                      83, 84, 85, 86, 89, 91, 92, 93, 94, 95, 97, 98, 100, 103)


def _need(path, what):
    if not os.path.exists(path):
        raise VideoReadError(f"{path}: missing; expected {what}")
    return path


def _read_lines(path, what):
    with open(_need(path, what)) as f:
        return [line.strip() for line in f if line.strip()]


def normalize_label(name):
    """torchvision's Kinetics folder names: spaces -> '_', quotes and parentheses removed."""
    return name.replace(" ", "_").replace("'", "").replace("(", "").replace(")", "").strip()


def _split_name(split, val="val"):
    if split in ("val", "test", "validation"):
        return val
    if split != "train":
        raise ValueError(f"split: expected train or val, got {split!r}")
    return "train"


def parse_kinetics(root, split):
    """root/annotations/{train,val}.csv (label,youtube_id,time_start,time_end,split) +
    root/{train,val}/<label>/<youtube_id>_<start:06d>_<end:06d>.mp4; classes = sorted train labels."""
    import csv
    split = _split_name(split)

    def rows(s):
        path = _need(os.path.join(root, "annotations", f"{s}.csv"), "the Kinetics annotation CSV")
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            missing = {"label", "youtube_id", "time_start", "time_end"} - set(reader.fieldnames or [])
            if missing:
                raise VideoReadError(f"{path}: missing column(s) {sorted(missing)}; header is {reader.fieldnames}")
            return list(reader)
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
    import json
    labels_path = _need(os.path.join(root, "labels", "something-something-v2-labels.json"), "template -> index JSON")
    with open(labels_path) as f:
        index = {k: int(v) for k, v in json.load(f).items()}
    classes = [None] * len(index)
    for k, v in index.items():
        classes[v] = k
    name = "train" if _split_name(split) == "train" else "validation"
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
    import json
    with open(_need(os.path.join(root, "Diving48_vocab.json"), "the 48 label tuples")) as f:
        classes = ["-".join(v) if isinstance(v, list) else str(v) for v in json.load(f)]
    name = "train" if _split_name(split) == "train" else "test"
    with open(_need(os.path.join(root, f"Diving48_V2_{name}.json"), "Diving48 list JSON")) as f:
        items = json.load(f)
    return [(os.path.join(root, "rgb", f"{it['vid_name']}.mp4"), int(it["label"])) for it in items], classes


def parse_charades(root, split):
    """root/Charades_v1_{train,test}.csv (id,...,actions='c092 11.90 21.20;...') + Charades_v1_classes.txt +
    root/Charades_v1_480/<id>.mp4; label = multi-hot float32 (157,); action times kept in `segments`."""
    import csv
    classes = [line.split(" ", 1)[1] for line in
               _read_lines(os.path.join(root, "Charades_v1_classes.txt"), "'c000 <name>' lines")]
    name = "train" if _split_name(split) == "train" else "test"
    path = _need(os.path.join(root, f"Charades_v1_{name}.csv"), "Charades annotation CSV")
    samples = []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if not {"id", "actions"} <= set(reader.fieldnames or []):
            raise VideoReadError(f"{path}: expected columns id and actions; header is {reader.fieldnames}")
        for r in reader:
            y = np.zeros(len(classes), dtype=np.float32)
            for act in filter(None, r["actions"].split(";")):
                y[int(act.split()[0][1:])] = 1.0
            samples.append((os.path.join(root, "Charades_v1_480", f"{r['id']}.mp4"), y))
    return samples, classes


def parse_ucfrep(root, split):
    """root/annotations/{train,val}/<video>.mat (temporal_bound; needs scipy) or <video>.json
    ({"temporal_bound": [...]}) + frames root/frames/<video>/image_%05d.jpg; label = len(temporal_bound) - 1."""
    import json
    folder = _need(os.path.join(root, "annotations", _split_name(split)), "UCFRep annotation folder")
    samples = []
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
            bounds = scipy.io.loadmat(os.path.join(folder, f))["temporal_bound"].reshape(-1)
        else:
            continue
        samples.append((os.path.join(root, "frames", name), float(len(bounds) - 1)))
    return samples, ["count"]


def parse_videofolder(root, split):
    """root/{train,val}/<class>/<video file or frame folder>; classes = sorted folder names."""
    folder = _need(os.path.join(root, _split_name(split)), "a folder of class folders")
    classes = sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)))
    samples = []
    for label, c in enumerate(classes):
        for f in sorted(os.listdir(os.path.join(folder, c))):
            path = os.path.join(folder, c, f)
            if os.path.isdir(path) or os.path.splitext(f)[1].lower() in VIDEO_EXTENSIONS:
                samples.append((path, label))
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


def _seed_rng():
    """numpy Generator from torch's RNG: distinct and reproducible per DataLoader worker (torch seeds them)."""
    return np.random.default_rng(int(torch.randint(0, 2 ** 62, ())))


def _report_bad(dataset, path, reason):
    if dataset.strict:
        raise VideoReadError(f"{path}: {reason} (--strict-data)")
    if path not in dataset.bad_files:
        dataset.bad_files[path] = reason
        warnings.warn(f"skipping unreadable sample {path}: {reason}", stacklevel=3)
        if dataset.bad_files_path:
            with open(dataset.bad_files_path, "a") as f:
                f.write(f"{path}\t{reason}\n")


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


class VideoDataset(torch.utils.data.Dataset):
    """(path, label) samples -> {"video": uint8 (C, T, H, W) or (K, C, T, H, W), "label", "index"}.

    sampling: random (num_clips independent clips, stride drawn from frame_strides, optional temporal jitter),
    uniform (num_clips evenly spaced), sliding / consecutive (all windows; K varies per video).
    modalities: ("video",), ("flow",) or ("video", "flow") for frame folders with flow_%05d.jpg next to the
    images: "flow" float32 (2, T, H, W) in pixels at the same indices as "video"."""

    def __init__(self, samples, class_names, clip_len=16, frame_strides=(1,), num_clips=1, sampling="random",
                 transform=None, modalities=None, decoder="auto", strict=False, bad_files_path=None, size=None,
                 jitter=False, step=None):
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
        if "video" in self.modalities:
            frames = _read_frames(path, lambda n: self._indices(n, store), self.decoder, self.size)
            k = store["indices"].shape[0]
            video = torch.from_numpy(frames).view(k, self.clip_len, *frames.shape[1:]).permute(0, 4, 1, 2, 3)
            item["video"] = video[0] if self.sampling in ("random", "uniform") and self.num_clips == 1 else video
        if "flow" in self.modalities:
            flow_dir = path if os.path.isdir(path) else os.path.splitext(path)[0]
            if "indices" not in store:
                self._indices(len(_frame_files(flow_dir, "flow")), store)
            flow = read_flow_frames(flow_dir, store["indices"].reshape(-1), self.size)
            k = store["indices"].shape[0]
            flow = torch.from_numpy(flow).view(k, self.clip_len, *flow.shape[1:]).permute(0, 4, 1, 2, 3)
            item["flow"] = flow[0] if self.sampling in ("random", "uniform") and self.num_clips == 1 else flow
        if self.transform is not None:
            item = self.transform(item)
        item["label"] = torch.as_tensor(label, dtype=torch.float32 if np.ndim(label) or isinstance(label, float)
                                        else torch.int64)
        item["index"] = torch.tensor(i, dtype=torch.int64)
        single = self.sampling in ("random", "uniform") and self.num_clips == 1
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
        if self.lengths is not None:
            length = int(self.lengths[j])
        else:
            nonzero = np.flatnonzero(np.abs(x).sum(axis=(0, 2, 3)) > 0)
            length = int(nonzero[-1]) + 1 if len(nonzero) else 0
        item = {"skeleton": torch.from_numpy(x)}
        if self.transform is not None:
            item = self.transform(item)
        item.update(label=torch.tensor(self.labels[j]), index=torch.tensor(i, dtype=torch.int64),
                    length=torch.tensor(length, dtype=torch.int64))
        return item

    def __getitem__(self, index):
        return _load_or_replace(self, index, self._load)


def read_kinetics_skeleton_json(path, max_frames=300, people_in=5, people_out=2):
    """ST-GCN Kinetics-Skeleton JSON -> (float32 (3, T, 18, people_out) = (x - 0.5, y - 0.5, score), label_index).
    As st-gcn's Feeder_kinetics: up to people_in people per frame, coordinates zeroed where score == 0, people
    sorted per frame by total score, the first people_out kept."""
    import json
    try:
        with open(path) as f:
            video = json.load(f)
        data = np.zeros((3, max_frames, 18, people_in), dtype=np.float32)
        for frame in video["data"]:
            t = int(frame["frame_index"])
            if t >= max_frames:
                continue
            for m, person in enumerate(frame["skeleton"][:people_in]):
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
    for t in range(max_frames):
        data[:, t] = data[:, t][:, :, order[t]]
    return data[:, :, :, :people_out], label


class KineticsSkeletonDataset(torch.utils.data.Dataset):
    """root/kinetics_{train,val}/<id>.json + root/kinetics_{train,val}_label.json ({id: {has_skeleton, label,
    label_index}}) -> {"skeleton": (3, 300, 18, 2), "label", "index"}; clips without skeleton are left out."""

    def __init__(self, root, split, transform=None, strict=False, bad_files_path=None, max_frames=300):
        import json
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
        item = {"skeleton": torch.from_numpy(x)}
        if self.transform is not None:
            item = self.transform(item)
        item.update(label=torch.tensor(label), index=torch.tensor(i, dtype=torch.int64))
        return item

    def __getitem__(self, index):
        return _load_or_replace(self, index, self._load)


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


class PairedDataset(torch.utils.data.Dataset):
    """Temporally aligned modalities of one sample (layout of make_toy_paired): one clip of indices is drawn
    from the valid length and every modality is read at exactly those frames. Items: "video" uint8 (C, T, H, W),
    "depth" float32 (1, T, H, W) metres, "skeleton" float32 (3, T, 25, M), "pose2d" float32 (3, T, 18, M)
    (x - 0.5, y - 0.5, score), "flow" float32 (2, T, H, W) pixels, "label", "index", "frame_indices"."""

    MODALITIES = ("video", "depth", "skeleton", "pose2d", "flow")

    def __init__(self, root, split, clip_len=16, frame_strides=(1,), sampling="random", transform=None,
                 modalities=None, decoder="auto", strict=False, bad_files_path=None, jitter=False):
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
        self.strict, self.bad_files_path, self.bad_files = strict, bad_files_path, {}

    def __len__(self):
        return len(self.skeletons)

    def sample_path(self, i):
        return os.path.join(self.root, "rgb", f"{self.skeletons.sample_names[self.skeletons.indices[i]]}.mp4")

    def _load(self, i):
        j = int(self.skeletons.indices[i])  # position in the stored arrays (subsets keep a list of positions)
        name, length = self.skeletons.sample_names[j], int(self.skeletons.lengths[j])
        idx = sample_clip_indices(length, self.clip_len, self.frame_strides, 1, self.sampling, _seed_rng(),
                                  self.jitter)[0]
        idx = np.minimum(idx, length - 1)
        item = {}
        if "video" in self.modalities:
            frames = read_video_frames(os.path.join(self.root, "rgb", f"{name}.mp4"), idx, self.decoder)
            item["video"] = torch.from_numpy(frames).permute(3, 0, 1, 2)
        if "depth" in self.modalities:
            item["depth"] = torch.from_numpy(read_depth_frames(os.path.join(self.root, "depth", name), idx))[None]
        if "skeleton" in self.modalities:
            item["skeleton"] = torch.from_numpy(np.array(self.skeletons.data[j][:, idx], dtype=np.float32))
        if "pose2d" in self.modalities:
            pose, _ = read_kinetics_skeleton_json(
                os.path.join(self.root, "pose2d", f"kinetics_{self.split}", f"{name}.json"), max(length, 1))
            item["pose2d"] = torch.from_numpy(np.ascontiguousarray(pose[:, idx]))
        if "flow" in self.modalities:
            flow = read_flow_frames(os.path.join(self.root, "flow", name), idx)
            item["flow"] = torch.from_numpy(flow).permute(3, 0, 1, 2)
        if self.transform is not None:
            item = self.transform(item)
        item.update(label=torch.tensor(self.labels[j]), index=torch.tensor(i, dtype=torch.int64),
                    frame_indices=torch.from_numpy(idx))
        return item

    def __getitem__(self, index):
        return _load_or_replace(self, index, self._load)


def read_ntu_skeleton(path, max_bodies=2):
    """Raw NTU RGB+D .skeleton text -> float32 (3, T, 25, max_bodies) x, y, z in metres. Bodies are tracked by
    bodyID and the max_bodies most active (largest summed std of the non-zero joint coordinates, as 2s-AGCN's
    get_nonzero_std) are kept, most active first; absent bodies are zero."""
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
                joints = np.array([line()[:3] for _ in range(num_joints)], dtype=np.float32)  # (25, 3)
                bodies.setdefault(body_id, np.zeros((num_frames, 25, 3), dtype=np.float32))[t] = joints[:25]
    except (ValueError, IndexError) as e:
        raise VideoReadError(f"{path}: not an NTU .skeleton file ({type(e).__name__}: {e})") from None
    out = np.zeros((3, num_frames, 25, max_bodies), dtype=np.float32)

    def activity(b):
        valid = b[np.abs(b).sum(axis=(1, 2)) != 0]  # (T', 25, 3)
        return valid.reshape(len(valid), -1).std(axis=0).sum() if len(valid) > 1 else 0.0
    ranked = sorted(bodies.values(), key=activity, reverse=True)
    for m, b in enumerate(ranked[:max_bodies]):
        out[:, :, :, m] = b.transpose(2, 0, 1)
    return out


def _rotation_to(a, b):
    """Rotation matrix turning vector a onto vector b (Rodrigues)."""
    a, b = a / (np.linalg.norm(a) + 1e-8), b / (np.linalg.norm(b) + 1e-8)
    v, c = np.cross(a, b), float(np.dot(a, b))
    if np.linalg.norm(v) < 1e-8:
        return np.eye(3) if c > 0 else -np.eye(3)
    k = np.array([[0, -v[2], v[1]], [v[2], 0, -v[0]], [-v[1], v[0], 0]])
    return np.eye(3) + k + k @ k * (1 - c) / (np.linalg.norm(v) ** 2)


def ntu_pre_normalize(x):
    """2s-AGCN pre_normalization on (3, T, 25, M): subtract the spine-middle joint (1) of the first body per
    frame, rotate so hip(0)->spine(1) of the first frame is parallel to z, then right(8)->left(4) shoulder to x.
    (2s-AGCN also pads null frames by repetition; here padding stays zero, the valid length is stored.)"""
    x = x.copy()
    mask = np.abs(x).sum(0, keepdims=True) != 0  # (1, T, 25, M) valid joints
    x = np.where(mask, x - x[:, :, 1:2, 0:1], 0.0)
    first = x[:, 0, :, 0]  # (3, 25)
    for a, b, axis in ((0, 1, np.array([0.0, 0.0, 1.0])), (8, 4, np.array([1.0, 0.0, 0.0]))):
        rot = _rotation_to(first[:, b] - first[:, a], axis)
        x = np.einsum("ij,jtvm->itvm", rot, x).astype(np.float32)
        first = x[:, 0, :, 0]
    return np.where(mask, x, 0.0).astype(np.float32)


def _write_ntu_layout(out_dir, split, arrays, names, labels, lengths):
    import pickle
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
    import re
    skip = set(_read_lines(missing_file, "sample names")) if missing_file else set()
    files = sorted(f for f in os.listdir(_need(raw_dir, "a folder of .skeleton files")) if f.endswith(".skeleton"))
    pattern = re.compile(r"S(\d{3})C(\d{3})P(\d{3})R(\d{3})A(\d{3})")
    out = {"train": ([], [], [], []), "val": ([], [], [], [])}
    for f in files:
        name = f[:-len(".skeleton")]
        match = pattern.match(name)
        if not match or name in skip:
            continue
        setup, camera, subject, _, action = (int(g) for g in match.groups())
        if benchmark.startswith("ntu60") and (setup > 17 or action > 60):
            continue
        train = {"ntu60-xsub": subject in NTU_XSUB_TRAIN, "ntu60-xview": camera in (2, 3),
                 "ntu120-xsub": subject in NTU120_XSUB_TRAIN, "ntu120-xset": setup % 2 == 0}[benchmark]
        x = read_ntu_skeleton(os.path.join(raw_dir, f))
        if pre_normalize:
            x = ntu_pre_normalize(x)
        x, length = _fit_frames(x, max_frames)
        lists = out["train" if train else "val"]
        for lst, value in zip(lists, (x, name, action - 1, length)):
            lst.append(value)
    for split, (arrays, names, labels, lengths) in out.items():
        if arrays:
            _write_ntu_layout(out_dir, split, arrays, names, labels, lengths)
    return {split: len(v[0]) for split, v in out.items()}


def _first_existing(root, names, what):
    for n in names:
        if os.path.exists(os.path.join(root, n)):
            return os.path.join(root, n)
    raise VideoReadError(f"{os.path.join(root, names[0])}: missing; expected {what}")


def convert_pku_mmd(root, out_dir, benchmark="xsub", max_frames=300):
    """PKU-MMD (I or II): root/PKU_Skeleton_Renew/<seq>.txt (one row of 150 floats per frame: 2 bodies x 25 joints
    x xyz), root/Train_Label_PKU_final/<seq>.txt ('label,start,end,confidence', 1-based labels),
    root/Split/cross-subject.txt or cross-view.txt ('Training videos:' line, list, 'Validation videos:' line,
    list) -> the NTU layout in out_dir, one sample per labelled instance."""
    skel_dir = _first_existing(root, ["PKU_Skeleton_Renew", "skeleton"], "per-sequence skeleton .txt files")
    label_dir = _first_existing(root, ["Train_Label_PKU_final", "label"], "per-sequence label .txt files")
    split_dir = _first_existing(root, ["Split", "split"], "cross-subject.txt / cross-view.txt")
    split_path = os.path.join(split_dir, "cross-subject.txt" if benchmark == "xsub" else "cross-view.txt")
    lines = _read_lines(split_path, "'Training videos:' / 'Validation videos:' blocks")
    lists, current = {"train": [], "val": []}, None
    for line in lines:
        low = line.lower()
        if low.startswith("training"):
            current = "train"
        elif low.startswith("validat") or low.startswith("testing"):
            current = "val"
        elif current:
            lists[current] += [s.strip() for s in line.split(",") if s.strip()]
    counts = {}
    for split, seqs in lists.items():
        arrays, names, labels, lengths = [], [], [], []
        for seq in seqs:
            path = os.path.join(skel_dir, f"{seq}.txt")
            raw = np.loadtxt(path, dtype=np.float32, ndmin=2)
            if raw.shape[1] != 150:
                raise VideoReadError(f"{path}: expected 150 floats per row, got {raw.shape[1]}")
            seq_x = raw.reshape(-1, 2, 25, 3).transpose(3, 0, 2, 1)  # (3, T, 25, 2)
            for row in _read_lines(os.path.join(label_dir, f"{seq}.txt"), "'label,start,end,confidence' rows"):
                label, start, end = (int(float(v)) for v in row.split(",")[:3])
                x, length = _fit_frames(seq_x[:, start:end + 1], max_frames)
                arrays.append(x), names.append(f"{seq}_{start}_{end}"), labels.append(label - 1)
                lengths.append(length)
        if arrays:
            _write_ntu_layout(out_dir, split, arrays, names, labels, lengths)
        counts[split] = len(arrays)
    return counts


def _skeleton_set(root, split, convert, **kwargs):
    split = _split_name(split)
    data = os.path.join(root, f"{split}_data_joint.npy")
    if not os.path.exists(data) and convert is not None:
        convert()
    return SkeletonDataset(data, os.path.join(root, f"{split}_label.pkl"),
                           os.path.join(root, f"{split}_num_frame.npy"), **kwargs)


def build_dataset(name, root=None, split="train", *, clip_len=16, frame_strides=(1,), num_clips=1,
                  sampling="random", transform=None, modalities=None, fraction=1.0, per_class=None, seed=0,
                  decoder="auto", strict=False, bad_files_path=None, **dataset_options):
    """The one entry point (see the README "Datasets" section for every layout).
    transform(item: dict) -> dict gets the modality tensors of one sample ("video" uint8 (C, T, H, W), "flow",
    "skeleton", ...) before "label", "index" and "frame_indices" are added. dataset_options: fold (UCF101, HMDB51),
    ext (SSv2), list_file (videolist), size, jitter, step (VideoDataset), check_exists (drop listed but missing
    videos, default True), pre_normalize (NTU raw), toy_seed (toy sets)."""
    root = root or os.path.join("data", name)
    skel_kwargs = dict(transform=transform, strict=strict, bad_files_path=bad_files_path)
    if name == "toy-skeleton":
        make_toy_skeleton(root, seed=dataset_options.get("toy_seed", 0))
        ds = _skeleton_set(root, split, None, class_names=TOY_SKELETON_ACTIONS, **skel_kwargs)
    elif name.startswith("ntu"):
        if name not in ("ntu60-xsub", "ntu60-xview", "ntu120-xsub", "ntu120-xset"):
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
    elif name in ("toy-paired", "paired"):
        if name == "toy-paired":
            make_toy_paired(root, seed=dataset_options.get("toy_seed", 0))
        ds = PairedDataset(root, split, clip_len=clip_len, frame_strides=frame_strides, sampling=sampling,
                           modalities=modalities, decoder=decoder, jitter=dataset_options.get("jitter", False),
                           **skel_kwargs)
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
                    with open(bad_files_path, "a") as f:
                        f.writelines(f"{p}\tfile not found\n" for p in missing)
                missing = set(missing)
                samples = [s for s in samples if s[0] not in missing]
        if fraction < 1.0 or per_class is not None:
            labels = [y if np.ndim(y) else (y if isinstance(y, int) else 0) for _, y in samples]
            samples = [samples[i] for i in stratified_subset(labels, fraction, per_class, seed)]
        return VideoDataset(samples, classes, clip_len=clip_len, frame_strides=frame_strides, num_clips=num_clips,
                            sampling=sampling, transform=transform, modalities=modalities, decoder=decoder,
                            strict=strict, bad_files_path=bad_files_path, size=dataset_options.get("size"),
                            jitter=dataset_options.get("jitter", False), step=dataset_options.get("step"))
    if fraction < 1.0 or per_class is not None:
        inner = ds.skeletons if isinstance(ds, PairedDataset) else ds
        labels = inner.labels[inner.indices] if isinstance(inner, SkeletonDataset) else [y for _, y in ds.samples]
        keep = stratified_subset(labels, fraction, per_class, seed)
        if isinstance(inner, SkeletonDataset):
            inner.indices = inner.indices[keep]
        else:
            ds.samples = [ds.samples[i] for i in keep]
    return ds


def _parse_video_set(name, root, split, options):
    if name == "toy-motion":
        make_toy_motion(root, seed=options.get("toy_seed", 0))
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
    if name == "ucfrep":
        return parse_ucfrep(root, split)
    if name == "videofolder":
        return parse_videofolder(root, split)
    if name == "videolist":
        return parse_videolist(root, split, options.get("list_file"))
    raise ValueError(f"--data: unknown dataset {name!r}")


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
        if isinstance(ds, (VideoDataset, KineticsSkeletonDataset)):
            labels = [y for _, y in ds.samples if np.ndim(y) == 0 and not isinstance(y, float)]
        else:
            inner = ds.skeletons if isinstance(ds, PairedDataset) else ds
            labels = inner.labels[inner.indices].tolist()
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


# ==================================================================================================== TOY DATASETS
# Written once under root as real files in the real formats and read by the same classes as real data. Built in
# a temporary folder and renamed into place, so concurrent processes (DDP ranks) never see half a dataset.
# Every random draw comes from np.random.default_rng([seed, ...]): same seed, same files.

TOY_MOTION_CLASSES = ["right", "left", "down", "up", "circle_cw", "circle_ccw", "zigzag", "shake_vertical"]
TOY_SKELETON_ACTIONS = ["wave_right", "wave_left", "raise_both_hands", "kick_right", "squat", "jump", "bow",
                        "clap", "punch_right", "touch_head", "handshake", "high_five"]


def _build_once(root, make):
    """make(tmp_dir) fills a fresh folder that is then renamed to root; a no-op when root/.complete exists."""
    if os.path.exists(os.path.join(root, ".complete")):
        return root
    parent = os.path.dirname(os.path.abspath(root))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(os.path.abspath(root))}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    make(tmp)
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


def _toy_background(rng, size):
    """Smooth random colour field (8x8 noise, bilinear) plus fine grain -> float (size, size, 3)."""
    coarse = torch.from_numpy(rng.uniform(0, 255, (1, 3, 8, 8)).astype(np.float32))
    smooth = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)[0].permute(1, 2, 0)
    return smooth.numpy() + rng.normal(0, 10, (size, size, 3)).astype(np.float32)


def render_toy_motion(rng, label, size=64, num_frames=16):
    """uint8 (T, size, size, 3): one object moving with pattern TOY_MOTION_CLASSES[label] on a static textured
    background. Positions wrap around the frame (a torus) and start uniformly at random, so in every single frame
    the object position, like its shape, size and colour, has the same distribution for every class."""
    bg = _toy_background(rng, size)
    colour = rng.uniform(0, 255, 3).astype(np.float32)
    radius, shape = rng.uniform(4, 8), int(rng.integers(3))  # disc, square, diamond
    t = np.arange(num_frames, dtype=np.float64)
    p0 = rng.uniform(0, size, 2)  # (x, y)
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
    grid = np.arange(size, dtype=np.float64)
    frames = np.empty((num_frames, size, size, 3), dtype=np.uint8)
    for k in range(num_frames):
        dx = (grid[None, :] - x[k] + size / 2) % size - size / 2  # wrapped offsets (1, W)
        dy = (grid[:, None] - y[k] + size / 2) % size - size / 2  # (H, 1)
        if shape == 0:
            mask = dx ** 2 + dy ** 2 <= radius ** 2
        elif shape == 1:
            mask = (np.abs(dx) <= radius * 0.85) & (np.abs(dy) <= radius * 0.85)
        else:
            mask = np.abs(dx) + np.abs(dy) <= radius * 1.2
        img = bg.copy()
        img[mask] = colour
        frames[k] = np.clip(img, 0, 255).astype(np.uint8)
    return frames


def make_toy_motion(root, seed=0, size=64, num_frames=16, train_per_class=24, val_per_class=8):
    """root/{train,val}/<class>/<class>_<k:04d>.mp4 (H.264, 8 fps): the videofolder layout; 8 classes."""
    def make(tmp):
        for split, count in (("train", train_per_class), ("val", val_per_class)):
            for label, name in enumerate(TOY_MOTION_CLASSES):
                for k in range(count):
                    rng = np.random.default_rng([seed, split == "val", label, k])
                    frames = render_toy_motion(rng, label, size, num_frames)
                    write_video(os.path.join(tmp, split, name, f"{name}_{k:04d}.mp4"), frames, fps=8)
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
    s, e, w, h, tip, thumb = (4, 5, 6, 7, 21, 22) if side > 0 else (8, 9, 10, 11, 23, 24)
    P[:, e] = P[:, s] + 0.27 * upper
    P[:, w] = P[:, e] + 0.24 * fore
    P[:, h], P[:, tip] = P[:, w] + 0.07 * fore, P[:, w] + 0.14 * fore
    P[:, thumb] = P[:, w] + 0.06 * fore + np.array([side * 0.03, 0, -0.02])


def _set_leg(P, side, thigh, shin):
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


def make_toy_skeleton(root, seed=0, num_frames=64, subjects=10, train_subjects=7, per_subject=3):
    """NTU layout: {train,val}_data_joint.npy float32 (N, 3, 64, 25, 2), {train,val}_label.pkl (names, labels),
    {train,val}_num_frame.npy. Names S001C<view>P<subject>R<rep>A<action>; subjects 1..train_subjects train,
    the rest val (cross-subject); valid lengths 40..64 frames (see toy_skeleton_sample)."""
    def make(tmp):
        out = {"train": ([], [], [], []), "val": ([], [], [], [])}
        for subject in range(1, subjects + 1):
            for action in range(len(TOY_SKELETON_ACTIONS)):
                for rep in range(per_subject):
                    x, name, length = toy_skeleton_sample(seed, subject, action, rep, num_frames)
                    lists = out["train" if subject <= train_subjects else "val"]
                    for lst, value in zip(lists, (x, name, action, length)):
                        lst.append(value)
        for split, (arrays, names, labels, lengths) in out.items():
            _write_ntu_layout(tmp, split, arrays, names, labels, lengths)
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


def make_toy_paired(root, seed=0, size=64, num_frames=24, subjects=5, train_subjects=4):
    """The toy-skeleton actions rendered to temporally aligned modalities (one sample per subject and action):
        rgb/<name>.mp4                      the bodies drawn over a random texture (H.264, size x size)
        depth/<name>/MDepth-%08d.png        16-bit depth in mm, 0 off the body (NTU masked depth)
        skeleton/{train,val}_data_joint.npy, _label.pkl, _num_frame.npy   the 3D skeletons (NTU layout)
        pose2d/kinetics_{train,val}/<name>.json, kinetics_{train,val}_label.json   COCO-18 2D pose, normalised
                                            to [0, 1] (Kinetics-Skeleton JSON), score 0 outside the frame
        flow/<name>/flow_%05d.jpg           the true image motion of the body (CoCLR layout, L - 1 frames)
    Frame t of every modality is the same instant."""
    import json
    from PIL import Image

    def make(tmp):
        focal = size * 1.25
        out = {"train": ([], [], [], []), "val": ([], [], [], [])}
        labels_json = {"train": {}, "val": {}}
        for subject in range(1, subjects + 1):
            for action in range(len(TOY_SKELETON_ACTIONS)):
                x, name, length = toy_skeleton_sample(seed, subject, action, 0, num_frames, min_frames=16)
                split = "train" if subject <= train_subjects else "val"
                rng = np.random.default_rng([seed, 2000, subject, action])
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
                for lst, value in zip(out[split], (x, name, action, length)):
                    lst.append(value)
        for split, (arrays, names, labels, lengths) in out.items():
            _write_ntu_layout(os.path.join(tmp, "skeleton"), split, arrays, names, labels, lengths)
            with open(os.path.join(tmp, "pose2d", f"kinetics_{split}_label.json"), "w") as f:
                json.dump(labels_json[split], f)
    return _build_once(root, make)


# ==================================================================================================== BACKBONES


# ==================================================================================================== CHECKPOINTS


# ==================================================================================================== TRAINING LOOP


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "check-data":
        cli = argparse.ArgumentParser(prog="common.py check-data",
                                      description="Open every sample of a dataset and list the unreadable ones.")
        cli.add_argument("command")
        cli.add_argument("--data", required=True, help="dataset name, as --data of the scripts")
        cli.add_argument("--data-root", default=None, help="default data/<name>")
        cli.add_argument("--decoder", default="auto", choices=["auto", "decord", "pyav", "torchcodec"])
        cli.add_argument("--split", default=None, choices=["train", "val"], help="default: both")
        cli_args = cli.parse_args()
        result = check_data(cli_args.data, cli_args.data_root, cli_args.decoder,
                            (cli_args.split,) if cli_args.split else ("train", "val"))
        sys.exit(1 if any(r["bad"] for r in result.values()) else 0)
    print("usage: python common.py check-data --data NAME [--data-root DIR] [--decoder auto|decord|pyav|torchcodec]")
