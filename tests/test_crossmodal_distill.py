"""crossmodal_distill.py: losses by hand, Eq. (2.3)'s clips and mean, aligned pairs, the frozen teacher, the feature
cache, backbone.pth in evaluate.py, and one slow learning test (distilled depth student vs random init)."""
import argparse
import json
import math
import os

import numpy as np
import pytest
import torch

import common
import crossmodal_distill as cd
import evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _args(**kw):
    parser = cd.add_method_args(argparse.ArgumentParser(parents=[common.get_common_parser()]))
    parser.set_defaults(lr=None, wd=None, epochs=None, batch_size=None, workers=None, knn_every=None)
    argv = sum(([f"--{k.replace('_', '-')}"] + ([] if v is True else [str(v)]) for k, v in kw.items()), [])
    return cd.finalize_args(parser.parse_args(argv))


def _run(tmp_path):
    args = argparse.Namespace(amp="off", clip_grad=None, sync_bn=False, channels_last=False, compile=False)
    return common.Run(args, torch.device("cpu"), str(tmp_path))


# ---------------------------------------------------------------------------------------------- losses by hand
def test_cosine_distance_parallel_orthogonal_opposite():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0]])
    assert cd.cosine_distance(a, 5 * a).item() == pytest.approx(0.0, abs=1e-6)  # parallel: 1 - 1
    assert cd.cosine_distance(a[:1], torch.tensor([[0.0, 7.0]])).item() == pytest.approx(1.0)  # orthogonal: 1 - 0
    assert cd.cosine_distance(a, -0.5 * a).item() == pytest.approx(2.0)  # opposite: 1 - (-1)
    # batch mean: (0 + 1) / 2
    assert cd.cosine_distance(torch.tensor([[1.0, 0.0], [1.0, 0.0]]),
                              torch.tensor([[2.0, 0.0], [0.0, 1.0]])).item() == pytest.approx(0.5)


def test_mse_by_hand_and_granularities():
    s, c, v = torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 0.0]]), torch.tensor([[1.0, 0.0]])
    assert cd.mse_loss(s, c).item() == pytest.approx((1 + 4) / 2)
    assert cd.distill_loss(s, c, v, "clip", "mse").item() == pytest.approx(2.5)  # Eq. (2.1) vs F^clip
    assert cd.distill_loss(s, c, v, "video-to-clip", "mse").item() == pytest.approx(2.0)  # Eq. (2.2) vs F^video
    assert cd.distill_loss(s, c, v, "video", "mse").item() == pytest.approx(2.0)  # Eq. (2.5)
    assert cd.distill_loss(s, c, v, "combined", "mse").item() == pytest.approx(4.5)  # Eq. (2.4) = sum
    s, c, v = torch.randn(4, 8), torch.randn(4, 8), torch.randn(4, 8)
    combined = cd.distill_loss(s, c, v, "combined")
    assert combined.item() == pytest.approx((cd.distill_loss(s, c, v, "clip") +
                                             cd.distill_loss(s, c, v, "video-to-clip")).item(), rel=1e-6)


def test_alignment_metrics_by_hand():
    t = torch.eye(3)
    m = cd.alignment_metrics(t, t)
    assert m["cos_pos"] == pytest.approx(1.0) and m["cos_neg"] == pytest.approx(0.0) and m["ret_acc"] == 1.0
    m = cd.alignment_metrics(t[[1, 2, 0]], t)  # every student matches another video's target
    assert m["cos_pos"] == pytest.approx(0.0) and m["cos_neg"] == pytest.approx(0.5) and m["ret_acc"] == 0.0


# ---------------------------------------------------------------------------------------------- Eq. (2.3)
def test_clip_bounds_and_video_mean():
    bounds = cd.clip_bounds(50, 16)  # N = 50 // 16 = 3 clips, frames 0-47 (the tail 48, 49 is left out)
    assert bounds.shape == (3, 16) and bounds[0, 0] == 0 and bounds[2, -1] == 47
    assert np.array_equal(bounds.reshape(-1), np.arange(48))
    assert cd.clip_bounds(10, 16).shape == (1, 16)  # shorter than one clip: one clip
    f = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [5.0, 9.0]], [[2.0, 2.0], [100.0, 100.0], [100.0, 100.0]]])
    video = cd.video_feature(f, torch.tensor([3, 1]))  # (B=2, N_max=3, D=2); video 2 has one valid clip
    assert torch.allclose(video, torch.tensor([[3.0, 5.0], [2.0, 2.0]]))


class FramePaired:
    """A paired set whose frames carry their own index: depth (idx + 1) * 5 cm, RGB value idx."""

    def __init__(self, lengths):
        self.lengths = lengths

    def __len__(self):
        return len(self.lengths)

    def length(self, i):
        return self.lengths[i]

    def read(self, i, idx, modalities):
        idx = np.minimum(np.asarray(idx).reshape(-1), self.lengths[i] - 1)
        value = torch.from_numpy(idx).view(1, -1, 1, 1).float()
        out = {"depth": (value + 1) * 0.05 * torch.ones(1, len(idx), 20, 24),
               "video": (value * torch.ones(3, len(idx), 20, 24)).to(torch.uint8)}
        return {m: out[m] for m in modalities}


def test_student_clip_is_teacher_clip_i(tmp_path):
    args = _args(clip_len=16, crop_size=16, teacher_modality="rgb")
    lengths = [50, 33, 16]
    n_max = 3
    cache = np.zeros((3, n_max, 4), dtype=np.float16)
    for i, n in enumerate(lengths):
        for k in range(len(cd.clip_bounds(n, 16))):
            cache[i, k] = 10 * i + k  # F_k^clip of video i
    path = str(tmp_path / "cache.npy")
    np.save(path, cache)
    cached, on_the_fly = cd.DistillPairs(FramePaired(lengths), args, path), \
        cd.DistillPairs(FramePaired(lengths), args, None, n_max)
    seen = set()
    for trial in range(40):
        i = trial % 3
        torch.manual_seed(trial)
        item = cached[i]
        k, n = int(item["clip"]), int(item["num_clips"])
        seen.add((i, k))
        assert n == len(cd.clip_bounds(lengths[i], 16)) and 0 <= k < n
        depth = (item["student"][0, :, 8, 8] + 1) / 2 * common.DEPTH_MAX  # metres, decoded from the input
        frames = torch.round(depth / 0.05).long() - 1
        assert torch.equal(frames, torch.from_numpy(np.minimum(cd.clip_bounds(lengths[i], 16)[k], lengths[i] - 1)))
        assert torch.allclose(item["t_clip"], torch.full((4,), 10.0 * i + k))
        assert torch.allclose(item["t_video"], torch.full((4,), 10.0 * i + (n - 1) / 2))  # mean of clips 0..N-1
        torch.manual_seed(trial)
        item2 = on_the_fly[i]
        assert int(item2["clip"]) == k and item2["teacher_input"].shape == (n_max, 3, 16, 16, 16)
        rgb = item2["teacher_input"][k, 0, :, 8, 8] * common.KINETICS_STD[0] + common.KINETICS_MEAN[0]
        assert torch.equal(torch.round(rgb * 255).long(), frames)  # the teacher's clip k = the student's frames
    assert (0, 0) in seen and (0, 2) in seen
    clip_only = cd.DistillPairs(FramePaired(lengths), _args(clip_len=16, crop_size=16, teacher_modality="rgb",
                                                            granularity="clip"), None, n_max)
    for seed in range(6):  # Eq. (2.1) on the fly: only the student's clip goes through the teacher
        torch.manual_seed(seed)
        k = int(cached[0]["clip"])
        torch.manual_seed(seed)
        item = clip_only[0]
        assert item["teacher_input"].shape[0] == 1 and int(item["clip"]) == 0
        rgb = item["teacher_input"][0, 0, :, 8, 8] * common.KINETICS_STD[0] + common.KINETICS_MEAN[0]
        assert torch.round(rgb * 255).long().tolist() == cd.clip_bounds(50, 16)[k].tolist()


# ---------------------------------------------------------------------------------------------- frozen teacher
def test_teacher_gets_no_gradient_and_keeps_bn_statistics(tmp_path):
    args = _args(teacher_cache="none", teacher_modality="rgb")
    teacher = cd.build_teacher(args)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = cd.Student(cd.build_student(args), cd.stage_dims(teacher, args, False), False, args)
    assert isinstance(student.proj[0], torch.nn.Identity)  # tiny3d -> tiny3d: 128 = 128, nothing to match
    student.train()
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1)
    step = cd.make_distill_step(student, teacher, optimizer, _run(tmp_path), args)
    batch = {"student": torch.randn(4, 3, 8, 48, 48), "teacher_input": torch.randn(4, 2, 3, 8, 48, 48) * 3 + 1,
             "clip": torch.tensor([0, 1, 0, 1]), "num_clips": torch.tensor([2, 2, 1, 2])}
    s_before = [p.clone() for p in student.parameters()]
    metrics = step(batch)
    assert math.isfinite(metrics["loss"]) and not teacher.training
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    for k, v in teacher.state_dict().items():  # weights and BN running mean / var / counters untouched
        assert torch.equal(v, before[k]), k
    assert any(not torch.equal(a, b) for a, b in zip(s_before, student.parameters()))


def test_projection_and_match_blocks():
    args = _args(student_arch="resnet3d_18", match_blocks=True, clip_len=4, crop_size=32)
    teacher = cd.build_teacher(args)  # tiny3d stages: 16, 32, 64, 128
    dims = cd.stage_dims(teacher, args, True)
    assert dims == [16, 32, 64, 128]
    student = cd.Student(cd.build_student(args), dims, True, args)
    assert [p.in_features for p in student.proj] == [64, 128, 256, 512]  # ResNet-18 stages -> teacher sizes
    out = student(torch.randn(2, 3, 4, 32, 32))
    assert [o.shape[1] for o in out] == dims
    assert torch.allclose(cd.block_features(student.backbone.eval(), torch.ones(1, 3, 4, 32, 32), True)[-1],
                          student.backbone(torch.ones(1, 3, 4, 32, 32)))  # last stage = the feature


def test_user_errors():
    with pytest.raises(common.UserError, match="crossmodal_distill.py"):
        _args(student="skeleton", granularity="clip")
    with pytest.raises(common.UserError, match="--teacher-weights"):
        _args(data="paired")
    with pytest.raises(common.UserError, match="--match-blocks"):
        _args(student="skeleton", match_blocks=True)


# ---------------------------------------------------------------------------------------------- cache
@pytest.fixture(scope="module")
def small_paired(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("paired") / "toy-paired")
    common.make_toy_paired(root, size=32, subjects=2, train_subjects=1, per_subject=1)  # 12 + 12 videos
    return root


def test_cached_features_equal_on_the_fly(small_paired, tmp_path):
    args = _args(data="paired", data_root=small_paired, teacher_weights=__file__, crop_size=32, clip_len=8,
                 teacher_arch="tiny3d", teacher_modality="rgb")
    args.teacher_weights, args.teacher_cache = None, str(tmp_path / "cache")
    torch.manual_seed(0)
    teacher = cd.build_teacher(args)
    paired = common.build_dataset("paired", small_paired, "train", modalities=("depth", "video"))
    path = cd.build_teacher_cache(teacher, paired, args, _run(tmp_path), False)
    assert os.path.basename(path) == f"teacher-{cd.teacher_key(teacher, paired, args, False)}.npy"
    cache = np.load(path, mmap_mode="r")
    n_max = max(paired.length(i) // 8 for i in range(len(paired)))  # 16-24 frames: 2-3 clips of 8
    assert cache.dtype == np.float16 and cache.shape[:2] == (12, n_max) and n_max >= 2
    ds = cd.DistillPairs(paired, args, None, n_max)
    run = _run(tmp_path)
    run.amp_dtype = torch.bfloat16  # the step's autocast as on a GPU
    for i in range(0, 12, 5):
        item = ds[i]
        n = int(item["num_clips"])
        with torch.no_grad(), run.autocast():
            f = teacher(item["teacher_input"][:n]).float()  # (N, D) on the fly, bf16
        cached = torch.from_numpy(cache[i, :n].astype(np.float32))  # (N, D)
        assert (cached - f).abs().max() <= 2e-2 * f.abs().max()  # bf16: 8 bits of mantissa
        assert (cached[:, None] - f[None]).abs().amax(-1).argmin(0).tolist() == list(range(n))  # clip k = clip k
    teacher.layer = torch.nn.Identity()  # no parameter change ...
    with torch.no_grad():
        next(teacher.parameters()).add_(1)  # ... but other weights: a new key
    assert cd.teacher_key(teacher, paired, args, False) not in path


# ---------------------------------------------------------------------------------------------- evaluate.py
def test_backbone_loads_in_evaluate(small_paired, tmp_path):
    out = str(tmp_path / "run")
    cd.main(["--data", "paired", "--data-root", small_paired, "--out-dir", out, "--max-steps", "2",
             "--batch-size", "4", "--teacher-cache", str(tmp_path / "cache"), "--teacher-arch", "tiny3d",
             "--student-arch", "tiny3d", "--clip-len", "8", "--crop-size", "32", "--workers", "0",
             "--teacher-weights", _teacher_file(tmp_path)])
    saved = torch.load(os.path.join(out, "backbone.pth"), weights_only=True)
    assert saved["meta"]["modality"] == "depth" and not any(k.startswith("proj") for k in saved["state_dict"])
    result = evaluate.main(["--task", "knn", "--data", "paired", "--data-root", small_paired, "--weights",
                            os.path.join(out, "backbone.pth"), "--out-dir", str(tmp_path / "eval"),
                            "--frames", "8", "--workers", "0"])
    assert "nn1_acc" in result["metrics"]
    assert "depth" in result["protocol"]


def _teacher_file(tmp_path):
    path = str(tmp_path / "teacher.pth")
    common.save_backbone(common.build_backbone("tiny3d"), path, {"modality": "rgb"})
    return path


# ---------------------------------------------------------------------------------------------- learning
@pytest.mark.slow
@pytest.mark.script_run("crossmodal_distill.py", "--data-root", os.path.join(ROOT, "data", "toy-paired"),
                        "--teacher-cache", "{out}/teacher-cache")
def test_distilled_depth_student_beats_random_init(script_run):
    """The toy run: a flow teacher on 6 actions, distilled into depth on the other 6 without labels; kNN (k=200) and
    1-NN on the student's actions (common.knn_monitor): distilled > random init. Measured (seeds 0, 1): kNN +22.2 /
    +30.6 points, 1-NN +22.2 / +16.6."""
    with open(script_run[0] / "knn.json") as f:  # the run, by conftest.ScriptRuns while other tests ran
        knn = json.load(f)
    assert knn["student"]["knn_top1"] > knn["random_init"]["knn_top1"] + 10, json.dumps(knn)
    assert knn["student"]["nn1_top1"] > knn["random_init"]["nn1_top1"] + 5, json.dumps(knn)


def test_skeleton_student_video_granularity_runs(small_paired, tmp_path):
    """Eq. (2.5): the whole skeleton sequence (ST-GCN, 256-d) against the video feature, through a projection."""
    out = str(tmp_path / "skel")
    result = cd.main(["--data", "paired", "--data-root", small_paired, "--out-dir", out, "--max-steps", "2",
                      "--batch-size", "4", "--student", "skeleton", "--skeleton-frames", "24", "--teacher-cache",
                      "none", "--teacher-arch", "tiny3d", "--clip-len", "8", "--crop-size", "32", "--workers", "0",
                      "--teacher-weights", _teacher_file(tmp_path)])
    assert result["step"] == 2
    saved = torch.load(os.path.join(out, "backbone.pth"), weights_only=True)
    assert saved["meta"]["arch"] == "stgcn" and saved["meta"]["modality"] == "skeleton"
    with open(os.path.join(out, "metrics.jsonl")) as f:
        record = json.loads(f.readlines()[-1])
    assert {"cos_pos", "cos_neg", "ret_acc"} <= set(record)


# ---------------------------------------------------------------------------------------------- official layouts
def _write_skeleton(path, num_frames, bodies=1):
    """A raw NTU .skeleton text file: body joints at x = frame index / 100 (so the frame can be read back)."""
    lines = [str(num_frames)]
    for t in range(num_frames):
        lines.append(str(bodies))
        for b in range(bodies):
            lines += [f"7200000000000{b} 0 1 1 1 1 0 0.1 0.1 2", "25"]
            lines += [f"{t / 100 + 0.01 * j} {0.1 * b} 3.0 0 0 0 0 0 0 0 0 2" for j in range(25)]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def ntu_layout(tmp_path_factory):
    """NTU RGB+D's official folders: RGB (12 frames, grey level 20 k at frame k), masked depth PNGs (9 frames,
    (k + 1) * 100 mm) and skeletons (9 frames), cameras 1-3, two actions, plus A061 (NTU-120 only, left out)."""
    from PIL import Image
    root = tmp_path_factory.mktemp("ntu")
    for name in ("S001C001P001R001A001", "S001C002P001R001A001", "S001C003P002R001A002", "S001C002P003R001A002",
                 "S018C002P001R001A061"):
        common.write_video(str(root / "nturgb+d_rgb" / f"{name}_rgb.avi"),
                           np.stack([np.full((24, 32, 3), 20 * k, np.uint8) for k in range(12)]), fps=30)
        (root / "nturgb+d_depth_masked" / name).mkdir(parents=True)
        for k in range(9):
            Image.fromarray(np.full((20, 26), (k + 1) * 100, np.uint16)).save(
                root / "nturgb+d_depth_masked" / name / f"MDepth-{k + 1:08d}.png")
        (root / "nturgb+d_skeletons").mkdir(exist_ok=True)
        _write_skeleton(str(root / "nturgb+d_skeletons" / f"{name}.skeleton"), 9, bodies=2 if "A002" in name else 1)
    (root / "nturgb+d_depth_masked" / "README.txt").write_text("not a sample")
    return str(root)


def test_check_data_and_class_subsets_on_the_ntu_paired_layout(ntu_layout):
    lines = []
    report = common.check_data("ntu60-paired-xview", ntu_layout, "pyav", ("train",), out=lines.append)
    assert report == {"train": {"size": 3, "bad": []}}
    assert "[train] labels 0..1, per class: min 0, max 2, 58 classes without samples" in lines
    subset = common.build_dataset("ntu60-paired-xview", ntu_layout, "train", per_class=1)
    assert sorted(subset.labels.tolist()) == [0, 1] and len(subset) == 2


def test_ntu_paired_official_layout(ntu_layout):
    train = common.build_dataset("ntu60-paired-xview", ntu_layout, "train", clip_len=4, sampling="uniform")
    val = common.build_dataset("ntu60-paired-xview", ntu_layout, "val", clip_len=4)
    assert train.names == ["S001C002P001R001A001", "S001C002P003R001A002", "S001C003P002R001A002"]  # cameras 2, 3
    assert val.names == ["S001C001P001R001A001"] and list(train.labels) == [0, 1, 1] and train.num_classes == 60
    xsub = common.build_dataset("ntu60-paired-xsub", ntu_layout, "train")  # subjects 1, 2 train; 3 val
    assert [n[8:12] for n in xsub.names] == ["P001", "P001", "P002"]
    assert train.length(0) == 9  # the depth frames are the time axis
    item = train.read(0, np.arange(9))
    depth_frames = torch.round(item["depth"][0, :, 5, 5] * 10).long() - 1  # (k + 1) * 100 mm -> k
    rgb_frames = torch.round(item["video"][0, :, 5, 5].float() / 20).long()
    assert depth_frames.tolist() == list(range(9))
    assert rgb_frames.tolist() == [t * 12 // 9 for t in range(9)]  # 12 RGB frames aligned by time
    assert item["skeleton"].shape == (3, 9, 25, 2)
    assert torch.allclose(item["skeleton"][0, :, 0, 0], torch.arange(9) / 100)
    sample = train[1]  # through the dataset: one clip of 4 frames of every modality, label and frame indices
    assert sample["video"].shape == (3, 4, 24, 32) and sample["depth"].shape == (1, 4, 20, 26)
    assert sample["label"] == 1 and sample["frame_indices"].tolist() == [0, 1, 2, 3]
    source = common.build_dataset("ntu120-minus-60", ntu_layout, "train")  # A061-A120, relabelled from 0
    assert source.names == ["S018C002P001R001A061"] and source.labels.tolist() == [0]
    rgb_only = common.build_dataset("ntu120-minus-60", ntu_layout, "train", modalities=("video",))
    assert rgb_only.time_axis == "video" and rgb_only.length(0) == 12  # the teacher's RGB: its own frames
    report = common.check_data("ntu60-paired-xview", ntu_layout, out=lambda line: None)
    assert {split: (r["size"], r["bad"]) for split, r in report.items()} == {"train": (3, []), "val": (1, [])}


def test_distillation_runs_on_the_ntu_layout(ntu_layout, tmp_path):
    teacher = str(tmp_path / "teacher")  # Sec. 2.4.3: the teacher learns A061-A120 from their RGB
    cd.main(["--stage", "teacher", "--data", "ntu120-minus-60", "--data-root", ntu_layout, "--out-dir", teacher,
             "--teacher-modality", "rgb", "--teacher-arch", "tiny3d", "--max-steps", "1", "--batch-size", "1",
             "--clip-len", "4", "--crop-size", "32", "--workers", "0"])
    assert torch.load(os.path.join(teacher, "backbone.pth"), weights_only=True)["meta"]["modality"] == "rgb"
    out = str(tmp_path / "ntu")
    result = cd.main(["--data", "ntu60-paired-xview", "--data-root", ntu_layout, "--out-dir", out, "--max-steps",
                      "1", "--batch-size", "2", "--teacher-arch", "tiny3d", "--student-arch", "tiny3d",
                      "--clip-len", "4", "--crop-size", "16", "--workers", "0", "--teacher-cache",
                      str(tmp_path / "cache"), "--teacher-weights", _teacher_file(tmp_path)])
    assert result["step"] == 1 and os.path.exists(os.path.join(out, "backbone.pth"))
    scores = evaluate.main(["--task", "knn", "--data", "ntu60-paired-xview", "--data-root", ntu_layout, "--weights",
                            os.path.join(out, "backbone.pth"), "--out-dir", str(tmp_path / "eval"), "--frames", "4",
                            "--workers", "0"])
    assert scores["sizes"] == {"train": 3, "val": 0, "test": 1} and "depth clips" in scores["protocol"]


@pytest.fixture(scope="module")
def pku_layout(tmp_path_factory):
    """PKU-MMD's official folders for three sequences (two train, one val, cross-subject): 20 skeleton rows (the
    label frames; joint 0 of body 0 at x = t / 100), 30 RGB frames (grey level 8 k), depth with 16 frames: PNG
    folders ((k + 1) * 100 mm) and, for 0002-M, an 8-bit depth video (grey level 15 (k + 1))."""
    from PIL import Image
    root = tmp_path_factory.mktemp("pku")
    labels = {"0002-L": "3,2,9,1\n7,12,18,1\n", "0002-M": "3,0,5,1\n", "0003-L": "51,4,15,1\n"}
    for folder in ("PKU_Skeleton_Renew", "Train_Label_PKU_final", "Split", "DEPTH_VIDEO"):
        (root / folder).mkdir()
    (root / "Split" / "cross-subject.txt").write_text("Training videos: \n0002-L, 0002-M\nValidataion videos: \n"
                                                      "0003-L\n")
    for seq, rows in labels.items():
        (root / "Train_Label_PKU_final" / f"{seq}.txt").write_text(rows)
        skeleton = np.zeros((20, 2, 25, 3), np.float32)
        skeleton[:, 0, :, 0], skeleton[:, 0, :, 2] = (np.arange(20) / 100)[:, None], 3.0
        np.savetxt(root / "PKU_Skeleton_Renew" / f"{seq}.txt", skeleton.reshape(20, 150), fmt="%.4f")
        common.write_video(str(root / "RGB_VIDEO" / f"{seq}.avi"),
                           np.stack([np.full((48, 64, 3), 8 * k, np.uint8) for k in range(30)]), fps=30)
        if seq == "0002-M":
            common.write_video(str(root / "DEPTH_VIDEO" / f"{seq}_depth.avi"),
                               np.stack([np.full((20, 26, 3), 15 * (k + 1), np.uint8) for k in range(16)]), fps=30)
            continue
        (root / "DEPTH_VIDEO" / seq).mkdir()
        for k in range(16):
            Image.fromarray(np.full((20, 26), (k + 1) * 100, np.uint16)).save(
                root / "DEPTH_VIDEO" / seq / f"{k:05d}.png")
    return str(root)


def test_pku_paired_official_layout(pku_layout):
    """Instances from the label files, split by cross-subject.txt; RGB (30 frames) and depth (16) aligned by time on
    the skeleton's 20 label frames; depth from PNG folders and from an 8-bit video."""
    train = common.build_dataset("pku1-paired", pku_layout, "train", clip_len=4, sampling="uniform")
    val = common.build_dataset("pku1-paired", pku_layout, "val")
    assert train.names == ["0002-L_2_9", "0002-L_12_18", "0002-M_0_5"] and train.labels.tolist() == [2, 6, 2]
    assert val.names == ["0003-L_4_15"] and val.labels.tolist() == [50] and train.num_classes == 51
    assert train.segments("0002-L").tolist() == [[2, 2, 9], [6, 12, 18]] and train.sequences == ["0002-L", "0002-M"]
    assert train.length(0) == 8 and train.length(1) == 7  # frames 2..9 and 12..18, inclusive
    item = train.read(0, np.arange(8))  # label frames t = 2..9
    assert torch.allclose(item["skeleton"][0, :, 0, 0], torch.arange(2, 10) / 100)
    assert item["skeleton"].shape == (3, 8, 25, 2) and item["skeleton"][:, :, :, 1].abs().sum() == 0
    depth = torch.round(item["depth"][0, :, 5, 5] * 10).long() - 1  # (k + 1) * 100 mm -> k
    assert depth.tolist() == [t * 16 // 20 for t in range(2, 10)]
    rgb = torch.round(item["video"][0, :, 5, 5].float() / 8).long()
    assert rgb.tolist() == [t * 30 // 20 for t in range(2, 10)] and item["video"].shape == (3, 8, 48, 64)
    video_depth = train.read(2, np.arange(6), ("depth",))["depth"][0, :, 5, 5]  # 0002-M: 8-bit depth video
    expected = torch.tensor([15 * (t * 16 // 20 + 1) * common.DEPTH_MAX / 255 for t in range(6)])
    assert torch.allclose(video_depth, expected, atol=0.05)
    sample = train[1]  # through the dataset: a 4-frame clip of the 7-frame instance 12..18
    assert sample["depth"].shape == (1, 4, 20, 26) and sample["label"] == 6
    assert torch.allclose(sample["skeleton"][0, :, 0, 0], (12 + sample["frame_indices"]).float() / 100)
    assert len(common.build_dataset("pku1-paired", pku_layout, "train", per_class=1)) == 2  # one per action
    with pytest.raises(common.VideoReadError, match=r"RGB_VIDEO/0009-R\.avi: missing"):
        train.num_frames("0009-R", "video")  # a missing file is named as the official .avi
    report = common.check_data("pku1-paired", pku_layout, out=lambda line: None)  # python common.py check-data
    assert {split: (r["size"], r["bad"]) for split, r in report.items()} == {"train": (3, []), "val": (1, [])}


def test_distillation_runs_on_the_pku_layout(pku_layout, tmp_path):
    """An RGB teacher (1920x1080 in the real files) teaches a depth student on PKU-MMD instances; the teacher cache
    is keyed by the instances, not only by the files (two instances share one sequence's files)."""
    out = str(tmp_path / "pku")
    result = cd.main(["--data", "pku1-paired", "--data-root", pku_layout, "--out-dir", out, "--max-steps", "1",
                      "--batch-size", "2", "--teacher-arch", "tiny3d", "--student-arch", "tiny3d", "--clip-len", "4",
                      "--crop-size", "16", "--workers", "0", "--teacher-cache", str(tmp_path / "cache"),
                      "--teacher-weights", _teacher_file(tmp_path)])
    assert result["step"] == 1 and os.path.exists(os.path.join(out, "backbone.pth"))
    args = _args(data="pku1-paired", data_root=pku_layout, teacher_arch="tiny3d", teacher_weights=_teacher_file(
        tmp_path), clip_len=4, crop_size=16)
    teacher, train = cd.build_teacher(args), common.build_dataset("pku1-paired", pku_layout, "train")
    key = cd.teacher_key(teacher, train, args, False)
    train.names = train.names[:1] + train.names[:1] + train.names[2:]  # same files, other instances
    assert cd.teacher_key(teacher, train, args, False) != key


class _MeanDepthLogits(torch.nn.Module):
    """Two logits per clip, (10 * mean input, 0): clips of different depth get different scores."""

    def forward(self, x):  # (B, C, L, H, W)
        m = 10 * x.float().mean((1, 2, 3, 4))
        return torch.stack([m, torch.zeros_like(m)], 1)


def test_ch2_protocol_scores_a_video_by_the_mean_over_all_its_clips(pku_layout, tmp_path):
    """Thesis Sec. 2.4.3: at test the video score is the mean over ALL clips. The val instance has 12 label frames:
    with 4-frame clips, N = 3 clips (frames 0-3, 4-7, 8-11), each softmaxed, then averaged."""
    args = evaluate.resolve_args(evaluate.get_parser().parse_args(
        ["--task", "fewshot", "--protocol", "ch2", "--data", "pku1-paired", "--data-root", pku_layout, "--frames", "4",
         "--arch", "resnet3d_18", "--workers", "0", "--out-dir", str(tmp_path)]))
    test = evaluate.build_split(args, "test", train=False)
    item = test[0]
    assert item["depth"].shape == (3, 3, 4, 112, 112) and item["label"] == 50  # (N, C, L, S, S)
    inner = test.dataset
    for k in range(3):  # clip k = the test transform of frames [4k, 4k + 4)
        clip = inner.transform(inner.read(0, np.arange(4 * k, 4 * k + 4), ("depth",)))["depth"]
        assert torch.equal(item["depth"][k], clip)
    model = _MeanDepthLogits()
    expected = model(item["depth"]).softmax(1).mean(0)  # mean of the 3 clip softmaxes
    assert not torch.allclose(expected, model(item["depth"]).mean(0).softmax(0))  # differs from softmax of the mean
    prediction = evaluate.predict(model, test, args, _run(tmp_path))
    assert torch.allclose(prediction["scores"][0], expected, atol=1e-6) and prediction["labels"].tolist() == [50]
    assert len(test.dataset) == 1 and evaluate.build_split(args, "train", train=True)[0]["depth"].dim() == 4
    text = evaluate.describe_protocol(args, "random", {"train": 3, "val": 0, "test": 1}, 51)
    assert "test: ALL frames // 4 consecutive clips" in text and "last block (layer4)" in text


def test_two_stream_fusion_averages_the_stream_scores_with_equal_weights(tmp_path):
    """Table 2.1's two-stream: the RGB- and flow-taught students' video scores averaged. By hand: stream A is right
    on video 0 only, B on videos 1 and 2; the means (0.65, 0.35), (0.35, 0.65), (0.55, 0.45) are all right."""
    labels = torch.tensor([0, 1, 0])
    streams = {"rgb": [[0.9, 0.1], [0.6, 0.4], [0.4, 0.6]], "flow": [[0.4, 0.6], [0.1, 0.9], [0.7, 0.3]]}
    paths = []
    for name, scores in streams.items():
        scores = torch.tensor(scores)
        logits = 4 * scores.log() if name == "rgb" else scores.log()  # sharper RGB logits: their plain sum errs
        paths.append(str(tmp_path / f"{name}.pth"))
        torch.save({"train": {"logits": torch.randn(8, 2), "labels": torch.arange(8) % 2},
                    "test": {"logits": logits, "labels": labels, "scores": scores}}, paths[-1])
    result = evaluate.main(["--task", "fusion", "--logits", *paths, "--out-dir", str(tmp_path / "fusion"),
                            "--epochs", "1", "--workers", "0"])
    m = result["metrics"]
    assert (m["top1_input0"], m["top1_input1"]) == (pytest.approx(100 / 3), pytest.approx(200 / 3))
    assert m["top1_mean_scores"] == pytest.approx(100.0) and m["top1_sum"] == pytest.approx(200 / 3)


def test_detection_ap_by_hand_one_to_one_matching():
    """Ground truth [0, 10) and [20, 30) in video a. d1 [1, 10) tIoU 0.9; d2 [0, 6) tIoU 0.6 with the ground truth
    d1 already took (a duplicate: false positive); d3 [22, 34) tIoU 8 / 14 = 0.571.
    tIoU 0.5: TP FP TP -> precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1 -> AP = 1/2 * 1 + 1/2 * 2/3 = 5/6.
    tIoU 0.7: TP FP FP -> AP = 1/2 * 1."""
    gt = [("a", 0, 10), ("a", 20, 30)]
    det = [("a", 22, 34, 0.7), ("a", 1, 10, 0.9), ("a", 0, 6, 0.8)]
    assert evaluate.temporal_iou((22, 34), np.array([[20.0, 30.0]]))[0] == pytest.approx(8 / 14)
    assert evaluate.detection_average_precision(det, gt, 0.5) == pytest.approx(5 / 6)
    assert evaluate.detection_average_precision(det, gt, 0.7) == pytest.approx(0.5)
    assert evaluate.detection_average_precision(det, gt, 0.1) == pytest.approx(5 / 6)
    # class 1: a detection in a video without its ground truth (FP, score 0.6) before a perfect one (TP, 0.5):
    # precision 1/2 at recall 1 -> AP 1/2. Class 2 has detections but no ground truth: not averaged.
    detections = [(v, 0, a, b, s) for v, a, b, s in det] + [("a", 1, 0, 10, 0.6), ("b", 1, 0, 10, 0.5),
                                                              ("b", 2, 0, 5, 0.9)]
    truth = [(v, 0, a, b) for v, a, b in gt] + [("b", 1, 0, 10)]
    assert evaluate.detection_map(detections, truth, (0.5,))[0.5] == pytest.approx((5 / 6 + 1 / 2) / 2)


def test_pku_mmd_map_action_by_hand():
    """PKU-MMD's own evaluate.py (inclusive frames, overlap = intersection / hull, no one-to-one matching, AP walked
    from the least confident detection, divided by 52 label slots).
    Class 0: ground truth 0-9 and 20-29; detections 0-9 (0.9, positive), 30-39 (0.8, negative), 20-29 (0.7,
    positive). From the least confident: 20-29 leaves 1 positive of 2 remaining -> precision 1/2, recall 1/2 ->
    1/2 * (1 - 1/2); 0-9 is the last one (their loop breaks); + 1/2 * 1/2 -> AP 1/2 (ActivityNet-style: 5/6).
    Class 1: ground truth 0-9; a duplicate 0-9 also counts as positive -> AP 1."""
    truth = [("a", 0, 0, 9), ("a", 0, 20, 29), ("b", 1, 0, 9)]
    detections = [("a", 0, 0, 9, 0.9), ("a", 0, 30, 39, 0.8), ("a", 0, 20, 29, 0.7), ("b", 1, 0, 9, 0.9),
                  ("b", 1, 0, 9, 0.8), ("b", 1, 20, 29, 0.7)]
    assert evaluate.pku_mmd_map_action(detections[:3], truth[:2], slots=1) == pytest.approx(0.5)
    assert evaluate.pku_mmd_map_action(detections[3:], truth[2:], slots=1) == pytest.approx(1.0)
    assert evaluate.pku_mmd_map_action(detections, truth) == pytest.approx(1.5 / 52)
    exclusive = [(v, c, s, e + 1, *rest) for v, c, s, e, *rest in detections[:3]]
    assert evaluate.detection_average_precision([(d[0], *d[2:]) for d in exclusive], [("a", 0, 10), ("a", 20, 30)],
                                                0.5) == pytest.approx(5 / 6)


def test_rc3d_anchors_labels_and_offsets_by_hand():
    """Anchors: 2 cells of 4 frames, scales (1, 2) -> centres 2, 6, lengths 4, 8. Ground truth [4, 8): tIoU 0, 0.2,
    1, 0.5 -> negative, negative, positive, ignored (0.3 <= 0.5 < 0.7). Ground truth [9, 10): tIoU <= 1/8 with all,
    but anchor [2, 10) is its best -> positive (Sec. 3.4). Offsets (Eq. 2): anchor [0, 4) (c 2, l 4) -> [1, 9)
    (c 5, l 8) = (3 / 4, log 2)."""
    anchors = evaluate.rc3d_anchors(2, 4, (1, 2))
    assert anchors.tolist() == [[0, 4], [-2, 6], [4, 8], [2, 10]]
    assert evaluate.segment_iou(anchors, torch.tensor([[4.0, 8.0]])).flatten().tolist() == pytest.approx(
        [0, 0.2, 1, 0.5])
    labels, match = evaluate.label_anchors(anchors, torch.tensor([[4.0, 8.0]]))
    assert labels.tolist() == [0, 0, 1, -1] and match.tolist() == [0, 0, 0, 0]
    labels, _ = evaluate.label_anchors(anchors, torch.tensor([[9.0, 10.0]]))
    assert labels.tolist() == [0, 0, 0, 1]
    offsets = evaluate.encode_segments(anchors[:1], torch.tensor([[1.0, 9.0]]))
    assert offsets.tolist()[0] == pytest.approx([0.75, math.log(2)])
    assert evaluate.decode_segments(anchors[:1], offsets).tolist()[0] == pytest.approx([1, 9])
    kept = evaluate.sample(torch.tensor([1, 1, 1, 0, 0, 0, 0, -1]), 4, 0.5)  # <= 2 positives, negatives fill up
    assert len(kept) == 4 and sum(k < 3 for k in kept.tolist()) == 2 and 7 not in kept.tolist()


def test_rc3d_roi_pooling_and_heads_shapes():
    """3D RoI pooling: the max over the RoI's cells (frames / stride, floor-ceil) and over each of 4 x 4 spatial bins
    (here 2 x 2 pixels of the 8 x 8 map); RC3D's loss is a finite scalar with a gradient to the trunk; at test each
    buffer gets proposals (R, 2), class probabilities (R, C + 1) and refined segments (R, C + 1, 2)."""
    fmap = torch.randn(2, 3, 4, 8, 8)
    rois, buffer_of = torch.tensor([[0.0, 8.0], [6.0, 12.0]]), torch.tensor([1, 0])
    pooled = evaluate.roi_pool_3d(fmap, rois, buffer_of, stride=4)
    assert pooled.shape == (2, 3 * 16)
    for r, (b, a, e) in enumerate([(1, 0, 2), (0, 1, 3)]):  # frames [0, 8) -> cells 0-1; [6, 12) -> cells 1-2
        expected = fmap[b, :, a:e].amax(1).view(3, 4, 2, 4, 2).amax((2, 4)).flatten()
        assert torch.equal(pooled[r], expected)
    torch.manual_seed(0)
    model = evaluate.RC3D(common.build_backbone("tiny3d", width=4), num_classes=3)
    x = torch.randn(2, 3, 16, 32, 32)  # tiny3d: 4 cells of 4 frames -> 40 anchors
    segments = torch.full((2, 4, 3), -1.0)
    segments[0, 0], segments[1, :2] = torch.tensor([2.0, 1, 9]), torch.tensor([[0.0, 0, 6], [1, 8, 16]])
    loss = model(x, segments)
    loss.backward()
    assert loss.dim() == 0 and torch.isfinite(loss) and model.trunk.features[0][0].weight.grad.abs().sum() > 0
    out = model.eval()(x)
    assert len(out) == 2 and all(p.shape[1] == 2 and s.shape == (len(p), 4) and r.shape == (len(p), 4, 2)
                                 for p, s, r in out)
    assert all(torch.allclose(s.sum(1), torch.ones(len(s))) and p.min() >= 0 and p.max() <= 16 for p, s, _ in out)


def test_detection_buffers_and_task_on_the_pku_layout(pku_layout, tmp_path):
    """Buffers of 8 frames at stride 4 over 0002-L (20 frames; segments 2-9 label 2, 12-18 label 6, inclusive):
    starts 0, 4, 8, 12; a segment is kept where at least half of it is inside the buffer (end exclusive):
    buffer 0: [2, 8); 4: [0, 6); 8: [4, 8) (12-15 of 12-18: 4 of 7); 12: [0, 7). Then --task detection end to end."""
    paired = common.build_dataset("pku1-paired", pku_layout, "train", transform=lambda item: item)
    buffers = evaluate.DetectionBuffers(paired, ["0002-L"], 8, 4, "depth", train=True)
    assert [(b[1], b[2].tolist()) for b in buffers.buffers] == [(0, [[2, 2, 8]]), (4, [[2, 0, 6]]),
                                                               (8, [[6, 4, 8]]), (12, [[6, 0, 7]])]
    item = buffers[3]  # frames 12-19 of the 16-frame PNG folder (time axis: 20 skeleton frames)
    depth = torch.round(item["depth"][0, :, 5, 5] * 10).long() - 1
    assert depth.tolist() == [t * 16 // 20 for t in range(12, 20)] and item["segments"][0].tolist() == [6, 0, 7]
    assert item["segments"].shape == (evaluate.RC3D_MAX_SEGMENTS, 3) and (item["segments"][1:, 0] == -1).all()
    assert len(evaluate.DetectionBuffers(paired, ["0002-L"], 8, 8, "depth", train=False)) == 3  # 0, 8, 16 tile 20
    result = evaluate.main(["--task", "detection", "--data", "pku1-paired", "--data-root", pku_layout, "--arch",
                            "tiny3d", "--frames", "8", "--epochs", "1", "--batch-size", "2", "--workers", "0",
                            "--label-fraction", "0.5", "--out-dir", str(tmp_path / "det")])
    assert "R-C3D" in result["protocol"] and result["sizes"] == {"train": 1, "val": 0, "test": 1}
    assert set(result["metrics"]) == {f"mAP@{t / 10:.1f}" for t in range(1, 8)} | {"pku_mAP_action@0.5"}
    assert all(0 <= v <= 100 for v in result["metrics"].values()) and result["num_detections"] > 0
    with pytest.raises(common.UserError, match="--task detection expected --data in"):
        evaluate.main(["--task", "detection", "--data", "toy-paired-target", "--workers", "0", "--out-dir",
                       str(tmp_path / "x")])


def _write_detection_layout(root, seed):
    """A PKU-MMD layout whose two actions are separable by depth alone (class 0 at 1.5 m, class 1 at 3 m, between
    actions 0.5 m, noise 0.2 m): 6 train and 3 val sequences of 64 frames, each with one segment of either action
    (16-24 frames) at a random place."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    for folder in ("PKU_Skeleton_Renew", "Train_Label_PKU_final", "Split", "DEPTH_VIDEO"):
        os.makedirs(os.path.join(root, folder))
    seqs = [f"{k:04d}-M" for k in range(9)]
    with open(os.path.join(root, "Split", "cross-subject.txt"), "w") as f:
        f.write(f"Training videos:\n{', '.join(seqs[:6])}\nValidation videos:\n{', '.join(seqs[6:])}\n")
    for seq in seqs:
        level = np.full(64, 500.0)
        a = int(rng.integers(2, 12))
        b = a + int(rng.integers(16, 24))
        c = b + int(rng.integers(4, 8))
        d = min(c + int(rng.integers(16, 24)), 62)
        first = int(rng.integers(2))
        level[a:b + 1], level[c:d + 1] = (1500, 3000)[first], (1500, 3000)[1 - first]
        with open(os.path.join(root, "Train_Label_PKU_final", f"{seq}.txt"), "w") as f:
            f.write(f"{first + 1},{a},{b},1\n{2 - first},{c},{d},1\n")
        np.savetxt(os.path.join(root, "PKU_Skeleton_Renew", f"{seq}.txt"), np.zeros((64, 150)), fmt="%.1f")
        os.makedirs(os.path.join(root, "DEPTH_VIDEO", seq))
        for t in range(64):
            noise = rng.normal(0, 200, (20, 26))
            Image.fromarray((level[t] + noise).clip(0, 4500).astype(np.uint16)).save(
                os.path.join(root, "DEPTH_VIDEO", seq, f"{t:05d}.png"))


@pytest.mark.slow
def test_rc3d_finds_actions_that_depth_separates(tmp_path):
    """R-C3D end to end on data it can learn (64-frame buffers = whole sequences, tiny3d width 8): fine-tuned, it
    localises and classifies the segments far better than the untrained network. Measured (layout and run seeds 0
    and 1, 2 shared CPU cores at load ~9): mAP@0.5 100.0 / 100.0 trained vs 0.0 / 0.0 untrained, 29-43 s per run
    (9-14 s at load ~5)."""
    _write_detection_layout(str(tmp_path / "pku"), seed=0)
    metrics = {}
    for name, lr, epochs in (("untrained", 1e-12, 1), ("trained", 0.02, 20)):  # 1e-12: BN statistics only
        metrics[name] = evaluate.main(["--task", "detection", "--data", "pku1-paired", "--data-root",
                                       str(tmp_path / "pku"), "--arch", "tiny3d", "--arch-options", '{"width": 8}',
                                       "--frames", "64", "--batch-size", "2", "--lr", str(lr), "--epochs",
                                       str(epochs), "--milestones", "18", "--workers", "0", "--out-dir",
                                       str(tmp_path / name)])["metrics"]
    assert metrics["trained"]["mAP@0.5"] >= 80 and metrics["trained"]["mAP@0.5"] >= metrics["untrained"]["mAP@0.5"] + 40



def test_two_gloo_processes_and_visualize(small_paired, tmp_path):
    """--gpus 2 on CPU: the cache is written once by rank 0 (the others wait), every rank trains its shard;
    --visualize writes the pairs and the cosine matrices before and after."""
    out = str(tmp_path / "ddp")
    cd.main(["--data", "paired", "--data-root", small_paired, "--out-dir", out, "--max-steps", "2", "--batch-size",
             "4", "--gpus", "2", "--device", "cpu", "--teacher-arch", "tiny3d", "--student-arch", "tiny3d",
             "--clip-len", "8", "--crop-size", "32", "--workers", "0", "--teacher-cache", str(tmp_path / "cache"),
             "--teacher-weights", _teacher_file(tmp_path), "--visualize", "2"])
    assert len(os.listdir(tmp_path / "cache")) == 1  # one cache file, no leftover temporary
    for name in ("backbone.pth", "pairs.png", "cosine_before.png", "cosine_after.png"):
        assert os.path.exists(os.path.join(out, name)), name
    with open(os.path.join(out, "metrics.jsonl")) as f:
        assert json.loads(f.readlines()[-1])["step"] == 2


def test_ch2_protocol_for_skeleton_students(tmp_path):
    """Thesis Sec. 2.4.3, skeleton student: SGD lr 0.1, momentum 0.9, wd 1e-5, batch 100, 70 epochs, all layers
    trained; whole sequences (the first 300 frames, zero-padded, as the student saw them in distillation) without
    augmentation, in training and at test; seeds reported as mean +- std (Sec. 2.5.1: five seeds)."""
    argv = ["--task", "fewshot", "--protocol", "ch2", "--data", "toy-skeleton", "--arch", "stgcn", "--per-class", "2",
            "--workers", "0", "--out-dir", str(tmp_path)]
    args = evaluate.resolve_args(evaluate.get_parser().parse_args(argv))
    assert (args.optimizer, args.lr, args.momentum, args.wd, args.batch_size, args.epochs, args.milestones,
            args.frames) == ("sgd", 0.1, 0.9, 1e-5, 100, 70, [], 300)
    raw = common.build_dataset("toy-skeleton", None, "train", transform=lambda item: item)[3]
    expected = common.center_on_spine(raw["skeleton"].float())  # (3, 300, 25, 2): toy sequences are padded to 300
    assert expected.shape == (3, 300, 25, 2) and raw["length"] < 300
    for train in (True, False):  # the same input twice: no random crop, no resampling
        split = evaluate.build_split(args, "train", train=train)
        assert torch.equal(split[3]["skeleton"], expected) and torch.equal(split[3]["skeleton"], expected)
    short = evaluate.skeleton_transform({"skeleton": raw["skeleton"][:, :40], "length": raw["length"]}, True, 64,
                                        False, whole=True)["skeleton"]  # 40 frames -> zero-padded to 64
    assert torch.equal(short[:, :40], raw["skeleton"][:, :40].float()) and short[:, 40:].abs().sum() == 0
    text = evaluate.describe_protocol(args, "random", {"train": 24, "val": 0, "test": 6}, 12)
    assert "whole network and a new linear head trained" in text and "zero-padded, no augmentation" in text
    result = evaluate.main(argv[:-2] + ["--epochs", "1", "--batch-size", "8", "--arch-options", '{"hidden": 8}',
                                        "--seeds", "0", "1", "--out-dir", str(tmp_path / "run")])
    assert "whole network" in result["protocol"] and result["sizes"]["train"] == 24
    per_seed = [m["top1"] for m in result["per_seed"]]  # a new 2-per-class subset and init per seed; mean +- std
    assert len(per_seed) == 2 and result["metrics"]["top1"] == pytest.approx(np.mean(per_seed))
    assert result["metrics"]["top1_std"] == pytest.approx(np.std(per_seed))
