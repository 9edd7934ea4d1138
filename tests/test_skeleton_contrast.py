"""Unit tests of the Skeleton-Contrast method core (augmentations, queues, losses, momentum) with tiny encoders."""
import argparse
import contextlib
import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import skeleton_contrast as sc

torch.set_num_threads(1)


class TinyEncoder(nn.Module):
    """Stand-in for bigru/hcn/agcn: (N, C, T, V, M) -> (N, feature_dim)."""

    def __init__(self, kind, channels=3, joints=25, persons=2, feature_dim=16):
        super().__init__()
        self.kind = kind
        self.feature_dim = feature_dim
        if kind == "seq":
            self.net = nn.GRU(channels * joints * persons, feature_dim, batch_first=True)
        else:
            self.net = nn.Linear(channels * joints * persons, feature_dim)

    def forward(self, x):
        n, c, t, v, m = x.shape
        frames = x.permute(0, 2, 3, 1, 4).reshape(n, t, v * c * m)  # (N, T, V*C*M) as the authors' 64x150
        if self.kind == "seq":
            return self.net(frames)[0][:, -1]
        return self.net(frames.mean(dim=1))


def tiny_model(representations=("seq", "graph"), contrast="inter", queue_size=32, **kwargs):
    return sc.SkeletonContrast(lambda r: TinyEncoder(r), list(representations), contrast, queue_size=queue_size,
                               proj_dim=8, **kwargs)


def method_args(**overrides):
    parser = argparse.ArgumentParser()
    sc.add_method_args(parser)
    args = parser.parse_args([])
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


# ---------------------------------------------------------------------------------------------- augmentations


def test_shear_is_one_linear_map_per_sequence():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 20, 25, 2)
    y = sc.shear(x)
    for i in range(4):
        points_in = x[i].permute(1, 2, 3, 0).reshape(-1, 3)  # every joint of every frame and person, (P, 3)
        points_out = y[i].permute(1, 2, 3, 0).reshape(-1, 3)
        s = torch.linalg.lstsq(points_in, points_out).solution  # (3, 3): points_out = points_in S
        torch.testing.assert_close(points_in @ s, points_out, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(s.diagonal(), torch.ones(3), atol=1e-4, rtol=1e-4)  # Eq. (3.1) diagonal 1
        assert s.abs().max() <= 1 + 1e-4
    assert not torch.allclose(y[0] / x[0].norm(), y[1] / x[1].norm())  # a different matrix per sequence


@pytest.mark.parametrize("authors", [False, True])
def test_joint_jitter_changes_exactly_j_joints(authors):
    torch.manual_seed(1)
    x = torch.randn(16, 3, 10, 25, 2)
    y = sc.joint_jitter(x, num_joints=15, authors=authors)
    changed = (y != x).any(dim=4).any(dim=2).any(dim=1)  # (N, V)
    assert changed.sum(dim=1).tolist() == [15] * 16
    for i in range(16):  # the moved joints share one 3x3 matrix over all frames and persons (Eq. 3.2)
        joints = changed[i].nonzero().flatten()
        points_in = x[i][:, :, joints].permute(1, 2, 3, 0).reshape(-1, 3)
        points_out = y[i][:, :, joints].permute(1, 2, 3, 0).reshape(-1, 3)
        r = torch.linalg.lstsq(points_in, points_out).solution
        torch.testing.assert_close(points_in @ r, points_out, atol=1e-4, rtol=1e-4)
        if not authors:
            assert r.min() >= -1e-4 and r.max() <= 1 + 1e-4  # paper: entries in U[0, 1]


def test_temporal_crop_resize_keeps_order_and_length():
    torch.manual_seed(2)
    t = 50
    ramp = torch.arange(t).float()[None, None, :, None, None].expand(8, 3, t, 25, 2).contiguous()  # value = frame
    valid = torch.tensor([50, 40, 30, 20, 10, 5, 2, 1])
    y = common.temporal_crop_resize(ramp, valid, min_ratio=0.1, out_frames=64)
    assert y.shape == (8, 3, 64, 25, 2)
    frames = y[:, 0, :, 0, 0]  # (N, 64) source frame index of every output frame
    assert (frames[:, 1:] >= frames[:, :-1]).all()  # order kept
    assert (frames >= 0).all() and (frames <= (valid - 1)[:, None].float()).all()  # padding never used
    # min_length: a crop spans at least that many source frames when the sequence is long enough
    y = common.temporal_crop_resize(ramp, None, min_ratio=0.1, out_frames=64, min_length=40)
    span = y[:, 0, -1, 0, 0] - y[:, 0, 0, 0, 0]
    assert (span >= 40 - 2).all()


def test_temporal_resize_matches_authors_interpolate():
    torch.manual_seed(3)
    x = torch.randn(2, 3, 37, 25, 2)
    y = common.temporal_crop_resize(x, min_ratio=1.0, out_frames=64)  # L_ratio = 1: the whole sequence
    ref = F.interpolate(x.permute(0, 1, 3, 4, 2).reshape(2, -1, 37, 1), size=(64, 1), mode="bilinear",
                        align_corners=False)  # authors: (1, C*V*M, L, 1) bilinear
    ref = ref.reshape(2, 3, 25, 2, 64).permute(0, 1, 4, 2, 3)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)


def test_spatio_temporal_augment_shapes_and_zero_person_stays_zero():
    torch.manual_seed(4)
    x = torch.randn(6, 3, 30, 25, 2)
    x[:, :, :, :, 1] = 0  # single-actor action: second person all zeros (Sec. 3.4.2)
    for spatial in ["random", "shear", "jitter", "none"]:
        y = sc.augment_from_args(x, None, method_args(spatial_aug=spatial, frames=16))
        assert y.shape == (6, 3, 16, 25, 2)
        assert (y[..., 1] == 0).all()


# ---------------------------------------------------------------------------------------------- losses


def test_info_nce_is_log_k_plus_one_for_equal_logits():
    k = 31
    z = F.normalize(torch.ones(4, 8), dim=1)  # constant features: all 1 + K logits equal
    logits = sc.info_nce_logits(z, z, z[:1].expand(k, 8), temperature=0.07)
    torch.testing.assert_close(sc.info_nce(logits), torch.tensor(math.log(k + 1)))
    loss, _ = sc.inter_skeleton_loss({"seq": z, "graph": z}, {"seq": z, "graph": z},
                                     {"seq": z[:1].expand(k, 8), "graph": z[:1].expand(k, 8)}, 0.07)
    torch.testing.assert_close(loss, torch.tensor(2 * math.log(k + 1)))  # Eq. (3.6): two terms


def test_inter_loss_uses_other_representation_key_and_queue():
    torch.manual_seed(5)
    unit = lambda *shape: F.normalize(torch.randn(*shape), dim=-1)
    z_q = {"seq": unit(4, 8), "graph": unit(4, 8)}
    z_k = {"seq": unit(4, 8), "graph": unit(4, 8)}
    negatives = {"seq": unit(10, 8), "graph": unit(10, 8)}
    tau = 0.07
    loss, logits = sc.inter_skeleton_loss(z_q, z_k, negatives, tau)

    def by_hand(q, k, queue):  # Eq. (3.7) written out
        pos = torch.exp((q * k).sum(1) / tau)
        neg = torch.exp(q @ queue.t() / tau).sum(1)
        return -torch.log(pos / (pos + neg)).mean()

    expected = by_hand(z_q["seq"], z_k["graph"], negatives["graph"]) + by_hand(z_q["graph"], z_k["seq"],
                                                                                negatives["seq"])
    torch.testing.assert_close(loss, expected)
    assert set(logits) == {"seq<-graph", "graph<-seq"}
    # The seq term does not depend on the seq key or queue at all.
    changed_k = dict(z_k, seq=unit(4, 8))
    changed_n = dict(negatives, seq=unit(10, 8))
    _, logits2 = sc.inter_skeleton_loss(z_q, changed_k, changed_n, tau)
    torch.testing.assert_close(logits2["seq<-graph"], logits["seq<-graph"])
    assert not torch.allclose(logits2["graph<-seq"], logits["graph<-seq"])
    # Intra uses its own key and queue.
    intra, _ = sc.intra_skeleton_loss({"seq": z_q["seq"]}, {"seq": z_k["seq"]}, {"seq": negatives["seq"]}, tau)
    torch.testing.assert_close(intra, by_hand(z_q["seq"], z_k["seq"], negatives["seq"]))


def test_three_representations_sum_six_ordered_pairs():
    z = {r: F.normalize(torch.randn(3, 8), dim=1) for r in ["seq", "image", "graph"]}
    n = {r: F.normalize(torch.randn(5, 8), dim=1) for r in z}
    loss, logits = sc.inter_skeleton_loss(z, z, n, 0.1)
    assert len(logits) == 6
    torch.testing.assert_close(loss, sum(sc.info_nce(l) for l in logits.values()))


# ---------------------------------------------------------------------------------------------- model


def test_forward_advances_both_queues_with_gathered_keys():
    torch.manual_seed(6)
    model = tiny_model(queue_size=32, gather_fn=lambda keys: torch.cat([keys, keys]))  # as 2 processes
    x_q, x_k = torch.randn(2, 5, 3, 12, 25, 2)
    loss, stats = model(x_q, x_k)
    assert set(stats) == {"acc_seq<-graph", "acc_graph<-seq"}
    keys = model.embed(x_k, model.encoder_k, model.projector_k)  # key encoders after this step's EMA update
    for r in ["seq", "graph"]:
        assert model.queues[r].ptr.item() == 10
        torch.testing.assert_close(model.queues[r].features[:10], torch.cat([keys[r], keys[r]]))
    loss.backward()  # the queue was cloned into the loss, so overwriting it does not break backward
    assert all(p.grad is None for p in model.encoder_k.parameters())
    assert all(p.grad is not None for p in model.encoder_q.parameters())


def test_shuffle_bn_round_trip_and_mixes_processes(monkeypatch):
    """Shuffle-BN over 2 simulated processes: every key encoder batch is a mix of both processes' samples, and
    unshuffling returns each process exactly the keys of its own samples, in order."""
    import common

    torch.manual_seed(10)
    world, n = 2, 8
    x = torch.randn(world * n, 3, 4, 25, 2)  # the global batch: process r holds x[r n:(r + 1) n]
    perm = torch.randperm(world * n)
    monkeypatch.setattr(common, "get_world_size", lambda: world)
    monkeypatch.setattr(torch, "randperm", lambda *a, **k: perm.clone())
    monkeypatch.setattr(torch.distributed, "broadcast", lambda tensor, src: None)
    shuffled, keys = [], []
    for rank in range(world):
        monkeypatch.setattr(common, "get_rank", lambda rank=rank: rank)
        monkeypatch.setattr(common, "all_gather_nograd", lambda t: x)
        mine, p = sc.batch_shuffle(x[rank * n:(rank + 1) * n])
        shuffled.append(mine)
        assert torch.equal(p, perm)
    for rank in range(world):
        own = set(range(rank * n, (rank + 1) * n))
        seen = {int(i) for i in perm.view(world, n)[rank]}  # the samples in this process's key batch
        assert seen != own and len(seen & own) > 0 and torch.equal(shuffled[rank], x[perm.view(world, n)[rank]])
    encode = lambda b: b.flatten(1)[:, :5] * 2 + 1  # noqa: E731  any per-sample function
    z_shuffled = torch.cat([encode(b) for b in shuffled])  # what all_gather returns after the key encoders
    for rank in range(world):
        monkeypatch.setattr(common, "get_rank", lambda rank=rank: rank)
        monkeypatch.setattr(common, "all_gather_nograd", lambda t: z_shuffled)
        z = sc.batch_unshuffle(encode(shuffled[rank]), perm)
        torch.testing.assert_close(z, encode(x[rank * n:(rank + 1) * n]))


def test_queue_wraps_around():
    queue = sc.FeatureQueue(5, 2)
    queue.enqueue(torch.ones(3, 2))
    queue.enqueue(2 * torch.ones(3, 2))
    assert queue.ptr.item() == 1
    assert queue.features[:, 0].tolist() == [2, 1, 1, 2, 2]
    assert "features" in queue.state_dict() and "ptr" in queue.state_dict()


def test_momentum_update():
    model = tiny_model(momentum=0.9)
    for p in list(model.encoder_q.parameters()) + list(model.projector_q.parameters()):
        nn.init.constant_(p, 1.0)
    for p in list(model.encoder_k.parameters()) + list(model.projector_k.parameters()):
        nn.init.constant_(p, 3.0)
    model.momentum_update()
    for p in list(model.encoder_k.parameters()) + list(model.projector_k.parameters()):
        torch.testing.assert_close(p, torch.full_like(p, 0.9 * 3.0 + 0.1 * 1.0))


def test_key_encoder_starts_as_query_copy_and_inter_needs_two():
    model = tiny_model()
    for p_q, p_k in zip(model.encoder_q.parameters(), model.encoder_k.parameters()):
        assert torch.equal(p_q, p_k) and not p_k.requires_grad
    with pytest.raises(ValueError, match="2 representations"):
        tiny_model(representations=("seq",), contrast="inter")
    with pytest.raises(argparse.ArgumentTypeError, match="--representations"):
        sc.parse_representations("seq,depth")


def test_train_step_updates_query_and_key_encoders():
    torch.manual_seed(7)

    class FakeRun:
        def autocast(self):
            return contextlib.nullcontext()

        def step(self, loss, optimizer):
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    model = tiny_model(representations=("seq",), contrast="intra", momentum=0.5)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    step = sc.make_train_step(model, optimizer, FakeRun(), method_args(frames=16))
    q_before = [p.clone() for p in model.encoder_q.parameters()]
    out = step({"skeleton": torch.randn(4, 3, 30, 25, 2), "length": torch.tensor([30, 20, 10, 5])})
    assert torch.isfinite(out["loss"]) and "acc_seq" in out
    out = step({"skeleton": torch.randn(4, 3, 30, 25, 2), "length": torch.tensor([30, 30, 30, 30])})
    assert any(not torch.equal(a, b) for a, b in zip(q_before, model.encoder_q.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(q_before, model.encoder_k.parameters()))
    assert model.queues["seq"].ptr.item() == 8


def write_ntu_arrays(folder, lengths, frames=300, seed=0):
    """NTU-shaped arrays as the converter writes them: (N, 3, 300, 25, 2) float32, zero padding after each valid
    length, a second body in every other sequence, the valid lengths in {split}_num_frame.npy."""
    import numpy as np

    import common

    rng = np.random.default_rng(seed)
    arrays = []
    for i, length in enumerate(lengths):
        x = np.zeros((3, frames, 25, 2), dtype=np.float32)
        x[:, :length, :, 0] = rng.uniform(0.5, 1.5, (3, length, 25))  # no coordinate is 0 in a valid frame
        if i % 2:
            x[:, :length, :, 1] = rng.uniform(0.5, 1.5, (3, length, 25)) + 1.0
        arrays.append(x)
    common._write_ntu_layout(str(folder), "train", [(x, f"S001C001P001R001A{i + 1:03d}", 0, length)
                                                    for i, (x, length) in enumerate(zip(arrays, lengths))])
    return common.SkeletonDataset(str(folder / "train_data_joint.npy"), str(folder / "train_label.pkl"),
                                  str(folder / "train_num_frame.npy"), transform=sc.center_item)


@pytest.mark.parametrize("spatial", ["none", "shear"])
def test_train_step_views_never_contain_padding(tmp_path, spatial):
    """Real-shaped input (300 stored frames, valid lengths 12..80, zero padding) through SkeletonDataset, the
    default collate and the real train step: no frame of either view is padding (all-zero). On the old code, which
    read a key the dataset never writes and cropped over all 300 frames, most views were padding."""
    torch.manual_seed(9)
    dataset = write_ntu_arrays(tmp_path, [12, 80, 37, 20, 64, 15, 50, 9])
    batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=8)))
    assert batch["length"].tolist() == [12, 80, 37, 20, 64, 15, 50, 9]
    seen = []

    class Recorder(nn.Module):  # the model's place in the train step: keeps the views it is given
        def forward(self, x_q, x_k):
            seen.append((x_q, x_k))
            return (x_q.sum() * 0 + self.w).sum(), {}

        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(1))

    class FakeRun:
        def autocast(self):
            return contextlib.nullcontext()

        def step(self, loss, optimizer):
            loss.backward()

    model = Recorder()
    step = sc.make_train_step(model, torch.optim.SGD(model.parameters(), lr=0.1), FakeRun(),
                              method_args(frames=64, spatial_aug=spatial))
    for _ in range(5):
        step(batch)
    for x_q, x_k in seen:
        for view in (x_q, x_k):
            assert view.shape == (8, 3, 64, 25, 2)
            body0 = view[..., 0].abs().sum(dim=(1, 3))  # (N, T_out) body 0 (centred, but never all zero)
            assert (body0 > 0).all()


def test_encoder_options_and_queue_defaults():
    toy = method_args(data="toy-skeleton", gru_stepwise=True)
    assert sc.encoder_options("seq", toy) == {"in_channels": 3, "input_dim": 150, "stepwise": True,
                                              **sc.SMALL_ENCODERS["seq"]}
    ntu = method_args(data="ntu60-xview")
    assert sc.encoder_options("seq", ntu) == {"in_channels": 3, "input_dim": 150, "stepwise": False}
    assert sc.encoder_options("image", ntu) == {"in_channels": 3, "window_size": 64, "num_joints": 25,
                                                "num_persons": 2}
    assert sc.encoder_options("graph", ntu, (3, 18, 2))["layout"] == "coco18"
    assert [sc.default_queue_size(d) for d in ["ntu120-xsub", "pku1", "pku2-xview", "toy-skeleton"]] == [
        16384, 8192, 2048, sc.TOY_QUEUE_SIZE]


def test_toy_and_paper_defaults_keep_what_the_user_gave():
    """common.fill_defaults: flags given in any argparse form (abbreviation, --flag=value) win over the toy and
    paper defaults; the rest come from the right table."""
    toy = sc.parse_args(["--batch", "8", "--epochs=3"])
    assert (toy.batch_size, toy.epochs, toy.frames, toy.contrast, toy.queue_size) == (8, 3, 32, "intra", 128)
    ntu = sc.parse_args(["--data", "ntu60-xview", "--repr", "seq,image"])
    assert (ntu.batch_size, ntu.epochs, ntu.milestones, ntu.representations, ntu.queue_size, ntu.workers) == (
        64, 450, [350], ["seq", "image"], 16384, 8)
    pku = sc.parse_args(["--data", "pku2-xsub", "--queue", "100"])
    assert (pku.epochs, pku.queue_size) == (600, 100)


def test_visualize_writes_png(tmp_path):
    pytest.importorskip("PIL")
    x = torch.randn(1, 3, 40, 25, 2)
    x[..., 1] = 0  # the second body is padding: only red (first body) bones are drawn
    paths = sc.save_augmentation_figures(x, str(tmp_path), method_args(frames=16))
    from PIL import Image
    with Image.open(paths[0]) as img:
        rgb = img.convert("RGB")
    rgb = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8).view(rgb.height, rgb.width, 3)
    assert rgb.shape == (6 * 96, 120 + 8 * 96, 3)  # 6 rows, a title column and 8 frames
    red = (rgb == torch.tensor([200, 30, 30], dtype=torch.uint8)).all(-1)
    blue = (rgb == torch.tensor([30, 30, 200], dtype=torch.uint8)).all(-1)
    assert all(red[r * 96:(r + 1) * 96].any() for r in range(6)) and not blue.any()


# ---------------------------------------------------------------------------------------------- with common.py


@pytest.mark.parametrize("stepwise", [False, True])
def test_bigru_stepwise_and_true_both_train(stepwise):
    """Both BiGRU options (true bidirectional / the authors' one-step-per-call loop) learn through Eq. (3.5):
    a few SGD steps on a fixed pair of views lower the loss, and every GRU weight (both directions) gets a
    gradient."""
    import common

    torch.manual_seed(8)
    model = sc.SkeletonContrast(lambda r: common.build_backbone("bigru", hidden=16, layers=2, stepwise=stepwise),
                                ["seq"], "intra", queue_size=64, proj_dim=8)
    x_q, x_k = torch.randn(2, 8, 3, 12, 25, 2)
    negatives = {"seq": F.normalize(torch.randn(64, 8), dim=1)}
    params = list(model.encoder_q.parameters()) + list(model.projector_q.parameters())
    optimizer = torch.optim.SGD(params, lr=0.5, momentum=0.9)

    def loss_now():
        z_q = model.embed(x_q, model.encoder_q, model.projector_q)
        with torch.no_grad():
            z_k = model.embed(x_k, model.encoder_k, model.projector_k)
        return sc.intra_skeleton_loss(z_q, z_k, negatives, 0.2)[0]

    first = loss_now()
    first.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.encoder_q.parameters())
    for _ in range(10):
        optimizer.zero_grad()
        loss_now().backward()
        optimizer.step()
    assert loss_now().item() < 0.9 * first.item()


def run_script(tmp_path, *flags, timeout=600):
    import json
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out_dir = tmp_path / "run"
    cmd = [sys.executable, os.path.join(root, "skeleton_contrast.py"), "--data-root", str(tmp_path / "toy"),
           "--out-dir", str(out_dir), *flags]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=root)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out_dir / "knn_vs_random_init.json") as f:
        return proc.stdout, json.load(f)


def test_two_process_cpu_run_keeps_queues_identical(tmp_path):
    """--device cpu --gpus 2: two gloo processes, DDP, the keys computed under shuffle-BN (batch_shuffle /
    batch_unshuffle over gloo) and all-gathered into both ranks' queues."""
    stdout, report = run_script(tmp_path, "--device", "cpu", "--gpus", "2", "--max-steps", "3", "--batch-size", "8",
                                "--representations", "seq,image", "--frames", "16", "--knn-every", "0")
    assert "queues identical on all 2 processes: True" in stdout
    assert report["step"] == 3 and 0 <= report["nn1_top1_pretrained"] <= 100
    assert (tmp_path / "run" / "backbone.pth").exists()


def test_sigterm_exits_nonzero_without_a_result(tmp_path):
    """An interrupted run saves, prints how to resume, exits non-zero and writes no final result (a report of the
    partial model would read like a finished run's)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out_dir = tmp_path / "run"
    cmd = [sys.executable, os.path.join(root, "skeleton_contrast.py"), "--data-root", str(tmp_path / "toy"),
           "--out-dir", str(out_dir), "--log-every", "1", "--epochs", "200"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=root,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    deadline = time.time() + 300
    metrics = out_dir / "metrics.jsonl"
    while time.time() < deadline and proc.poll() is None and (
            not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == common.EXIT_INTERRUPTED, out[-3000:]
    assert "interrupted: saved step" in out and "rerun the same command" in out
    assert (out_dir / "checkpoint.pth").exists() and not (out_dir / "knn_vs_random_init.json").exists()
    assert "result:" not in out


@pytest.mark.slow
@pytest.mark.script_run("skeleton_contrast.py", "--seed", 0)  # shared with test_evaluate.py
def test_learning_toy_pretraining_beats_random_init(script_run):
    """LEARNING TEST: the default command (intra-skeleton MoCo on the small BiGRU, 60 epochs = 420 steps on the
    NTU-like toy set: 300 stored frames, valid lengths 40-96, extra and ghost bodies) gives a sequence encoder
    whose 1-NN and kNN (k = 200) val accuracies beat the same encoder at random init. Measured (1 thread, 39 s of
    CPU): seed 0 1-NN 82.4 vs 75.0, kNN 66.7 vs 48.1; seed 1 1-NN 80.6 vs 74.1, kNN 71.3 vs 46.3. Asserted: 1-NN
    +2.5, kNN +10 points (108 val sequences, one is 0.93 points)."""
    with open(script_run[0] / "knn_vs_random_init.json") as f:
        report = json.load(f)
    print(report)
    assert report["nn1_top1_pretrained"] - report["nn1_top1_random_init"] >= 2.5, report
    assert report["knn_top1_pretrained"] - report["knn_top1_random_init"] >= 10.0, report
