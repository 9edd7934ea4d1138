"""phlvc.py: batched SkeleMotion, the losses by hand, Sinkhorn, cluster growing, multi-body pairing, the
distributed Sinkhorn and the whole script (2 gloo processes, resume across a growth step, learning)."""
import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import common
import phlvc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------------------- SkeleMotion
def kinetics_like_pose(n=3, frames=21, tracks=3, seed=0):
    """(N, 3, T + 1, 18, M) as read_kinetics_skeleton_json gives it: (x - 0.5, y - 0.5, score), coordinates zero
    where the score is 0; a track that leaves mid-clip, a joint missed in one frame, an absent track."""
    g = torch.Generator().manual_seed(seed)
    pose = torch.zeros(n, 3, frames, 18, tracks)
    pose[:, :2] = torch.rand(n, 2, frames, 18, tracks, generator=g) - 0.5
    pose[:, 2] = torch.rand(n, frames, 18, tracks, generator=g) * 0.9 + 0.1
    pose[0, :, 12:, :, 1] = 0  # track 1 of sample 0 disappears after frame 11
    pose[1, :, 5, 3, 0] = 0  # a missed joint (score 0 -> at the origin)
    pose[2, :, :, :, 2] = 0  # an absent track
    return pose


def test_skelemotion_batch_equals_per_track_skelemotion_image():
    pose = kinetics_like_pose()
    images = phlvc.skelemotion_batch(pose)  # (N, M, 6, T, 49)
    assert images.shape == (3, 3, 6, 20, 49)
    for n in range(3):
        for m in range(3):
            expected = common.skelemotion_image(pose[n, :2, :, :, m], "coco18")[:, :20]
            torch.testing.assert_close(images[n, m], expected, rtol=0, atol=1e-6)
    assert images[2, 2].abs().sum() == 0 and images[0, 1, :, 12:].abs().sum() == 0
    assert (images[0, 1, :3, 11] == 1.1).all()  # last present frame: no displacement -> 1.1


def test_skelemotion_batch_hand_computed_2d():
    pose = torch.zeros(1, 3, 2, 18, 1)
    pose[0, 0, 0], pose[0, 1, 0] = 0.1, 0.2  # every joint at (0.1, 0.2), then moved by (0.03, 0.04)
    pose[0, 0, 1], pose[0, 1, 1] = 0.13, 0.24
    pose[0, 2] = 1.0
    img = phlvc.skelemotion_batch(pose)[0, 0]  # (6, 1, 49); d = p_0 - p_1 = (-0.03, -0.04, 0)
    expected = [(math.degrees(math.atan2(-0.04, -0.03)) + 180) / 360, (-90 + 180) / 360, (180 + 180) / 360,
                0.05, 0.05, 0.05]
    for c, value in enumerate(expected):
        torch.testing.assert_close(img[c], torch.full((1, 49), value), rtol=0, atol=1e-5)


def test_select_tracks_ranks_by_summed_score_and_caps():
    pose = kinetics_like_pose()
    pose[0, 2, :, :, 2] *= 3  # track 2 of sample 0 has the highest summed score
    order, present = phlvc.select_tracks(pose, max_tracks=2)
    assert order[0, 0] == 2 and present.sum(1).tolist() == [2, 2, 2]
    order, present = phlvc.select_tracks(pose, max_tracks=5)
    assert present.sum(1).tolist() == [3, 3, 2] and order[2, 2] == 2  # the absent track last, not present
    assert phlvc.select_tracks(pose, 1)[1].sum(1).tolist() == [1, 1, 1]


# ------------------------------------------------------------------------------------------- losses by hand
P, Q = [0.5, 0.3, 0.2], [1.0, 0.0, 0.0]


def logits(p):
    return torch.tensor(p).log()  # softmax(log p) = p


def test_axent_swav_symmetric_by_hand_k3():
    q = torch.tensor(Q)
    axent = -(math.log(0.5) + math.log(1 - 0.3) + math.log(1 - 0.2))  # 1.27297
    torch.testing.assert_close(phlvc.cross_entropy_terms(logits(P), q, "axent"), torch.tensor(axent))
    torch.testing.assert_close(phlvc.cross_entropy_terms(logits(P), q, "swav"), torch.tensor(-math.log(0.5)))
    q2 = [0.6, 0.3, 0.1]
    sym = -sum(qk * math.log(pk) + pk * math.log(qk) for pk, qk in zip(P, q2))
    torch.testing.assert_close(phlvc.cross_entropy_terms(logits(P), torch.tensor(q2), "axent-symmetric"),
                               torch.tensor(sym))


def test_axent_is_minimal_where_p_equals_q_and_penalises_p1_q0():
    q = torch.tensor([0.6, 0.3, 0.1])
    at_q = phlvc.cross_entropy_terms(logits(q.tolist()), q, "axent")
    for p in ([0.5, 0.4, 0.1], [0.7, 0.2, 0.1], [0.6, 0.2, 0.2]):
        assert phlvc.cross_entropy_terms(logits(p), q, "axent") > at_q
    # (p, q) = (1, 0) on class 1: AXent pays -log(1 - p_1), the SwAV term q log p pays nothing for it
    near_one = torch.tensor([-20.0, 20.0, -20.0])
    q0 = torch.tensor([1.0, 0.0, 0.0])
    axent, swav = (phlvc.cross_entropy_terms(near_one, q0, k) for k in ("axent", "swav"))
    assert torch.isfinite(axent) and axent > swav + 30  # log(1 - p_1) ~ -40 + log 2, computed without cancellation
    torch.testing.assert_close(phlvc.log1m_softmax(near_one)[1], torch.tensor(-40.0 + math.log(2)),
                               rtol=0, atol=1e-4)


def test_eq4_and_eq5_pair_loss_by_hand():
    p_v, p_s = [0.5, 0.3, 0.2], [0.2, 0.2, 0.6]
    q_v, q_s = [0.7, 0.2, 0.1], [0.1, 0.1, 0.8]
    lv, ls = logits(p_v).view(1, 1, 3), logits(p_s).view(1, 1, 3)
    tv, ts = torch.tensor(q_v).view(1, 1, 3), torch.tensor(q_s).view(1, 1, 3)
    eq4 = -sum((qs * math.log(pv) + qv * math.log(ps)) / 2 for pv, ps, qv, qs in zip(p_v, p_s, q_v, q_s))
    torch.testing.assert_close(phlvc.pair_loss(lv, ls, tv, ts, "swav"), torch.tensor([[[eq4]]]))

    def bce(p, q):
        return -sum(qk * math.log(pk) + (1 - qk) * math.log(1 - pk) for pk, qk in zip(p, q))
    eq5 = (bce(p_s, q_v) + bce(p_v, q_s)) / 2
    torch.testing.assert_close(phlvc.pair_loss(lv, ls, tv, ts, "axent"), torch.tensor([[[eq5]]]))


# ------------------------------------------------------------------------------------------- Sinkhorn
def unit_scores(n, k, seed):
    g = torch.Generator().manual_seed(seed)
    z = torch.nn.functional.normalize(torch.randn(n, 16, generator=g), dim=1)
    c = torch.nn.functional.normalize(torch.randn(k, 16, generator=g), dim=1)
    return z @ c.t()


def test_sinkhorn_marginals():
    q = phlvc.sinkhorn(unit_scores(64, 8, 0), eps=0.05, iters=100)  # (N, K)
    torch.testing.assert_close(q.sum(1), torch.ones(64), rtol=0, atol=1e-5)  # each row a distribution
    torch.testing.assert_close(q.sum(0), torch.full((8,), 64 / 8), rtol=0, atol=64 * 1e-3)  # prototypes equal


def test_sinkhorn_finite_at_paper_eps_and_masked_rows_equal_subset():
    scores = unit_scores(40, 30, 1)
    scores[:, 0] = -1.0  # a prototype opposite every sample: its whole row underflows at eps 0.012
    q = phlvc.sinkhorn(scores, eps=0.012, iters=3)
    assert torch.isfinite(q).all()
    torch.testing.assert_close(q.sum(1), torch.ones(40), rtol=0, atol=1e-5)
    mask = torch.arange(40) % 3 != 0
    masked = phlvc.sinkhorn(scores, 0.012, 3, mask)
    assert masked[~mask].abs().sum() == 0
    torch.testing.assert_close(masked[mask], phlvc.sinkhorn(scores[mask], 0.012, 3), rtol=1e-5, atol=1e-7)


def _sinkhorn_worker(rank, port, scores, mask, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    half = scores.shape[0] // 2
    rows = slice(rank * half, (rank + 1) * half)
    results[rank] = phlvc.sinkhorn(scores[rows], 0.012, 3, mask[rows])
    dist.destroy_process_group()


def test_sinkhorn_two_processes_equal_one_on_the_joined_batch():
    scores, mask = unit_scores(24, 10, 2), torch.arange(24) % 5 != 1
    results = mp.Manager().dict()
    mp.spawn(_sinkhorn_worker, args=(common._find_free_port(), scores, mask, results), nprocs=2)
    joined = torch.cat([results[0], results[1]])
    torch.testing.assert_close(joined, phlvc.sinkhorn(scores, 0.012, 3, mask), rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------------------- growing, queue
def test_growth_keeps_old_rows_and_splits_most_assigned():
    c = torch.nn.functional.normalize(torch.randn(10, 8), dim=1)
    old = c.clone()
    counts = torch.tensor([1.0, 9, 3, 7, 0, 0, 0, 0, 0, 0])
    rows = phlvc.grow_prototypes(c, 4, counts, 2, 0.01, "split", torch.Generator().manual_seed(0))
    assert rows.tolist() == [4, 5]
    assert torch.equal(c[:4], old[:4]) and torch.equal(c[6:], old[6:])  # bit-identical
    torch.testing.assert_close(c[4:6].norm(dim=1), torch.ones(2))
    assert (c[4] @ old[1]) > 0.99 and (c[5] @ old[3]) > 0.99  # splits of the two most-assigned (1 and 3)
    rows = phlvc.grow_prototypes(c, 6, counts, 10, 0.01, "random", torch.Generator().manual_seed(0))
    assert rows.tolist() == [6, 7, 8, 9] and torch.equal(c[:6], torch.cat([old[:4], c[4:6]]))


def test_enqueue_newest_first_and_capped():
    queue, length = torch.zeros(5, 2), torch.tensor(0)
    phlvc.enqueue(queue, length, torch.tensor([[1.0, 1], [2, 2]]))
    phlvc.enqueue(queue, length, torch.tensor([[3.0, 3], [4, 4], [5, 5], [6, 6]]))
    assert queue[:, 0].tolist() == [3, 4, 5, 6, 1] and int(length) == 5


# ------------------------------------------------------------------------------------------- multi-body pairs
def test_multi_body_loss_with_0_1_3_tracks_equals_a_per_sample_loop():
    g = torch.Generator().manual_seed(3)
    b, k_v, m, k = 3, 2, 3, 5
    lv, ls = torch.randn(b, k_v, k, generator=g), torch.randn(b, m, k, generator=g)
    qv, qs = torch.rand(b, k_v, k, generator=g).softmax(-1), torch.rand(b, m, k, generator=g).softmax(-1)
    present = torch.tensor([[False, False, False], [True, False, False], [True, True, True]])
    for loss in phlvc.LOSSES:
        pairs = phlvc.pair_loss(lv, ls, qv, qs, loss)
        per_sample, all_pairs = [], []
        for i in range(b):
            values = [0.5 * (phlvc.cross_entropy_terms(ls[i, j], qv[i, v], loss)
                             + phlvc.cross_entropy_terms(lv[i, v], qs[i, j], loss))
                      for v in range(k_v) for j in range(m) if present[i, j]]
            all_pairs += values
            if values:
                per_sample.append(sum(values) / len(values))
        torch.testing.assert_close(phlvc.multi_body_loss(pairs, present, "sample"),
                                   sum(per_sample) / len(per_sample))
        torch.testing.assert_close(phlvc.multi_body_loss(pairs, present, "batch"), sum(all_pairs) / len(all_pairs))
    assert phlvc.multi_body_loss(pairs, torch.zeros(b, m, dtype=torch.bool)) == 0


# ------------------------------------------------------------------------------------------- encoders, train step
def script_args(monkeypatch, *argv):
    """phlvc.main's arguments after its defaults and finalize_method_args, without running anything."""
    monkeypatch.setattr(common, "launch", lambda worker, args, finalize: finalize(args))
    return phlvc.main(list(map(str, argv)))


def test_paper_encoders_have_listing_1_parameter_counts(monkeypatch):
    """Sec. 7.3, Listing 1 (the authors' model_3d.py): S3D + Conv3d 1024 -> 512 8,434,848; FC2 263,680; each Rep
    131,328; SkeleMotion CNN 1,351,152; prototypes 10,000 x 256 allocated, 3,000 active."""
    model = phlvc.PHLVC(script_args(monkeypatch, "--data", "k400-pose"))
    n = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    assert n(model.video.trunk) + n(model.video.fc) == 8_434_848 and n(model.video.vid_fc2) == 263_680
    assert n(model.vid_fc_rep) == n(model.sk_fc_rep) == 131_328 and n(model.pose) == 1_351_152
    assert model.prototypes.shape == (10000, 256) and int(model.active) == 3000


def test_pose_data_defaults(monkeypatch):
    """k400-pose keeps videos with the T + 1 posed frames of one clip; the cache lives under the data root."""
    args = script_args(monkeypatch, "--data", "k400-pose", "--arch", "r2d3d_18", "--data-root", "/d/k400")
    assert (args.min_pose_frames, args.pose_cache) == (31, "/d/k400/pose_cache")


TINY = ("--hidden", 16, "--rep-dim", 8, "--prototypes", 6, "--clip-len", 19, "--crop-size", 32, "--video-input",
        "rgb", "--single-track-iters", 1, "--max-tracks", 2)


def tiny_model_and_step(monkeypatch, *argv, steps_per_epoch=100, wd=0.0):
    """A tiny3d PHLVC, Adam, its train step (no DDP, fp32) and a batch of 4 RGB clips with 3 pose tracks each."""
    import contextlib
    import types
    args = script_args(monkeypatch, *TINY, *argv)
    torch.manual_seed(0)
    model = phlvc.PHLVC(args)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=wd)
    run = types.SimpleNamespace(autocast=contextlib.nullcontext, backward=lambda loss: loss.backward(),
                                optimizer_step=lambda opt: opt.step())
    batch = {"video": torch.randint(0, 256, (4, 1, 3, 19, 32, 32), dtype=torch.uint8),
             "pose2d": kinetics_like_pose(n=4, frames=20, tracks=3)}
    return args, model, optimizer, lambda m, o: phlvc.make_train_step(m, m, o, run, args, steps_per_epoch), batch


def test_train_step_freezes_prototypes_uses_one_track_first_and_grows(monkeypatch):
    """Sec. 7.6: the prototypes do not move (no gradient, no weight decay) for --freeze-prototypes-iters, then do;
    one track per sample for --single-track-iters, then up to --max-tracks; the assignment counts add up every
    video view and every used track. Sec. 7.8: a growth step splits the most-assigned prototypes into the next
    rows with fresh Adam moments, old rows and their moments untouched, counts restarted."""
    args, model, optimizer, make_step, batch = tiny_model_and_step(
        monkeypatch, "--prototypes-final", 8, "--freeze-prototypes-iters", 2, wd=1e-4)
    step = make_step(model, optimizer)
    unit = torch.nn.functional.normalize(model.prototypes.detach().clone(), dim=1)
    tracks = []
    for _ in range(2):
        tracks.append(float(step(batch)["tracks"]))
        assert torch.equal(model.prototypes.detach(), unit)
    tracks.append(float(step(batch)["tracks"]))
    assert not torch.allclose(model.prototypes.detach(), unit)
    assert tracks == [1.0, 2.0, 2.0] and int(model.iteration) == 3
    assert model.counts.sum() == (4 + 4) + 2 * (4 + 8)  # video rows + tracks used, over 3 steps
    state = {k: v.clone() for k, v in optimizer.state[model.prototypes].items()}
    old, parents = model.prototypes.detach().clone(), model.counts[:6].topk(2).indices
    assert state["exp_avg"][6:].abs().sum() > 0  # weight decay moved the inactive rows' moments
    phlvc.maybe_grow(model, optimizer, args.grow_start_epoch, args)
    assert int(model.active) == 8 and model.counts.sum() == 0 and torch.equal(model.prototypes[:6], old[:6])
    assert (model.prototypes[6:] * torch.nn.functional.normalize(old[parents], dim=1)).sum(1).min() > 0.99
    for key in ("exp_avg", "exp_avg_sq"):
        moments = optimizer.state[model.prototypes][key]
        assert torch.equal(moments[:6], state[key][:6]) and moments[6:].abs().sum() == 0


def test_train_step_queue_fills_the_epoch_before_and_joins_sinkhorn(monkeypatch):
    """Sec. 7.6: the queue fills during the epoch before --queue-start-epoch with every video row and only the used
    pose tracks (unit rows, newest first, capped); from that epoch its rows change the Sinkhorn targets."""
    import copy
    _, model, optimizer, make_step, batch = tiny_model_and_step(
        monkeypatch, "--prototypes-final", 6, "--queue-start-epoch", 1, "--queue-size", 10, steps_per_epoch=2)
    make_step(model, optimizer)(batch)  # epoch 0, one track
    assert model.queue_len.tolist() == [4, 4]
    make_step(model, optimizer)(batch)  # two tracks each
    assert model.queue_len.tolist() == [8, 10]  # 4 + 8 pose rows, capped at 10
    torch.testing.assert_close(model.queue[1].norm(dim=1), torch.ones(10))  # no absent (zero) track queued
    without = copy.deepcopy((model, optimizer))
    without[0].queue_len.zero_()
    losses = [float(make_step(m, o)(batch)["loss"]) for m, o in ((model, optimizer), without)]  # epoch 1: queue used
    assert losses[0] != pytest.approx(losses[1], rel=1e-6)


# ------------------------------------------------------------------------------------------- the script
def run_script(out_dir, *extra, timeout=600):
    cmd = [sys.executable, os.path.join(ROOT, "phlvc.py"), "--gpus", "0", "--out-dir", str(out_dir),
           "--data-root", os.path.join(ROOT, "data", "toy-paired"), *map(str, extra)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


SHORT = ("--grow-start-epoch", 1, "--grow-per-epoch", 8, "--queue-start-epoch", 1, "--freeze-prototypes-iters", 2,
         "--single-track-iters", 2, "--log-every", 1, "--workers", 0, "--data-fraction", 0.5)  # 48 videos: 3 steps


def losses(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [(r["step"], r["loss"], r["prototypes"]) for r in map(json.loads, f) if "loss" in r]


def test_resume_across_a_growth_step_repeats_the_losses(tmp_path):
    run_script(tmp_path / "a", *SHORT, "--max-steps", 5, "--epochs", 2)  # 3 steps per epoch: growth at step 3
    run_script(tmp_path / "b", *SHORT, "--max-steps", 2, "--epochs", 2)
    run_script(tmp_path / "b", *SHORT, "--max-steps", 5, "--epochs", 2)
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert [s for s, _, _ in a] == [s for s, _, _ in b] == [1, 2, 3, 4, 5]
    assert a[-1][2] == 32 and a[2][2] == 24  # grew 24 -> 32 at the first step of epoch 1
    for (_, la, _), (_, lb, _) in zip(a, b):
        assert la == pytest.approx(lb, rel=1e-5)


def test_two_gloo_processes_keep_prototypes_and_queues_identical(tmp_path):
    out = run_script(tmp_path, *SHORT, "--max-steps", 4, "--epochs", 2, "--device", "cpu", "--gpus", 2)
    line = [x for x in out.splitlines() if x.startswith("prototypes and queues")][0]
    assert float(line.split()[-1]) == 0.0, line


@pytest.mark.slow
@pytest.mark.script_run("phlvc.py", "--gpus", 0, "--data-root", os.path.join(ROOT, "data", "toy-paired"), "--seed", 0)
def test_toy_pretraining_beats_random_init_on_held_out_videos(tmp_path, script_run, seed=0):
    """LEARNING TEST (one seed; margins over seeds 0 and 1 measured once): the default toy run (40 epochs, 240
    steps; video encoder on toy-paired depth, the toy default), then evaluate.py --task knn on
    toy-paired (gallery: the 96 pretraining videos, queries: the 72 val videos of 3 unseen subjects; 12 actions,
    chance 8.3 %) with backbone.pth at tap fc1 (retrieval, Sec. 7.3) against the same network at random init.
    Measured 1-NN (seeds 0 / 1): 77.8 / 65.3 % vs 30.6 / 33.3 % at random init (+47.2 / +31.9 points); 20 epochs
    are not enough for seed 1 (22.2 vs 33.3 %: its loss stays on a plateau until ~step 140)."""
    import evaluate as ev
    pretrain = script_run[0]  # run_script's command, run by conftest.ScriptRuns while other tests ran
    nn1 = {}
    for name, weights in (("pretrained", str(pretrain / "backbone.pth")), ("random", "none")):
        nn1[name] = ev.main(["--task", "knn", "--data", "toy-paired", "--data-root", os.path.join(ROOT, "data",
                             "toy-paired"), "--arch", "phlvc_video", "--arch-options", json.dumps(
                             {"trunk": "tiny3d", "hidden": 128, "tap": "fc1"}), "--frames", "20", "--weights",
                             weights, "--seed", str(seed), "--workers", "0", "--out-dir", str(tmp_path / name)]
                            )["metrics"]["nn1_acc"]
    assert nn1["pretrained"] >= nn1["random"] + 20 and nn1["pretrained"] >= 40, nn1


def test_other_flags_run(tmp_path):
    """K_v = 2 views, Eq. (4), batch pair mean, random new rows, the queue from the start, RGB input with Table 6's
    jitter: finite losses, growth."""
    run_script(tmp_path, *SHORT, "--max-steps", 4, "--epochs", 2, "--video-views", 2, "--loss", "swav",
               "--pair-mean", "batch", "--grow-init", "random", "--grow-start-epoch", 0, "--queue-start-epoch", 0,
               "--color-jitter", "table6", "--crop-area-min", 0.05, "--video-input", "rgb")
    rows = losses(tmp_path)
    assert [p for _, _, p in rows] == [32, 32, 32, 40] and all(math.isfinite(l) for _, l, _ in rows)


# ------------------------------------------------------------------------------------------- k400-pose layout
def write_k400_pose(root, frames=26):
    """Kinetics-400 (annotations/{train,val}.csv, {split}/<label>/<id>_<start>_<end>.mp4) + Kinetics-Skeleton
    (kinetics-skeleton/kinetics_{split}/<id>.json): ids with '_' and '-', a video without poses, frames with 0 and
    3 people (noisy extras), odd resolution. Pose x of person 0 at frame t is 0.01 t + 0.1 (to check alignment)."""
    import numpy as np
    ids = {"train": [("abc_def-123", "jumping"), ("zz-yy_xx_01", "waving"), ("nopose_here", "waving")],
           "val": [("val_video_1", "jumping")]}
    for split, rows in ids.items():
        os.makedirs(root / "annotations", exist_ok=True)
        with open(root / "annotations" / f"{split}.csv", "w") as f:
            f.write("label,youtube_id,time_start,time_end,split\n")
            for vid, label in rows:
                f.write(f"{label},{vid},3,13,{split}\n")
        for k, (vid, label) in enumerate(rows):
            rgb = np.random.default_rng(k).integers(0, 255, (frames, 36, 52, 3), dtype=np.uint8)
            common.write_video(str(root / split / label / f"{vid}_000003_000013.mp4"), rgb)
            if vid == "nopose_here":
                continue
            data = []
            for t in range(frames):
                people = [] if t == 4 else [{"pose": [0.01 * t + 0.1 + 0.2 * m, 0.5] * 18,
                                             "score": [0.9 - 0.3 * m] * 18} for m in range(3 if t % 5 == 0 else 1)]
                data.append({"frame_index": t, "skeleton": people})
            folder = root / "kinetics-skeleton" / f"kinetics_{split}"
            os.makedirs(folder, exist_ok=True)
            with open(folder / f"{vid}.json", "w") as f:
                json.dump({"data": data, "label": label, "label_index": 0}, f)


def test_k400_pose_pairs_video_and_pose_frames(tmp_path):
    write_k400_pose(tmp_path)
    ds = common.build_dataset("k400-pose", str(tmp_path), "train", clip_len=21)
    assert len(ds) == 2  # the video without a JSON is left out
    for i in range(2):
        item = ds[i]
        idx = item["frame_indices"]
        assert item["video"].shape == (3, 21, 36, 52) and item["pose2d"].shape == (3, 21, 18, 5)
        x = item["pose2d"][0, :, 0, 0]  # person 0, joint 0: x - 0.5, zero where nobody is posed
        expected = torch.where(idx == 4, torch.zeros(()), 0.01 * idx.float() + 0.1 - 0.5)
        torch.testing.assert_close(x, expected, rtol=0, atol=1e-5)
    order, present = phlvc.select_tracks(item["pose2d"][None], 5)
    assert present.sum() == 3  # the two extra people of every fifth frame count as (weak) tracks


def write_stgcn_json(path, posed, frames=300, bodies=2, seed=0):
    """A JSON as ST-GCN's Kinetics-Skeleton release has it: frame_index from 1, per person "pose" = 18 (x, y) and
    "score" = 18 values, 3 decimals; frames t not in `posed` have an empty "skeleton" list."""
    import numpy as np
    rng = np.random.default_rng(seed)
    data = [{"frame_index": t + 1, "skeleton": [{"pose": np.round(rng.random(36), 3).tolist(), "score": np.round(
        rng.uniform(0.05, 1, 18), 3).tolist()} for _ in range(bodies)] if t in posed else []} for t in range(frames)]
    path.write_text(json.dumps({"data": data, "label": "abseiling", "label_index": 0}))


def add_k400_pose_videos(root, frames=26):
    """To write_k400_pose's train split: 21 posed frames (scattered), 20 (and 6 with a person scored 0 everywhere),
    no person in any frame, "data": [] (ST-GCN's has_skeleton false), a truncated JSON."""
    folder = root / "kinetics-skeleton" / "kinetics_train"
    write_stgcn_json(folder / "just_enough.json", range(0, 2 * 21, 2), frames=2 * 21)
    write_stgcn_json(folder / "few_posed.json", range(20), frames=frames)
    few = json.loads((folder / "few_posed.json").read_text())
    for frame in few["data"][20:]:
        frame["skeleton"] = [{"pose": [0.5] * 36, "score": [0.0] * 18}]
    (folder / "few_posed.json").write_text(json.dumps(few))
    write_stgcn_json(folder / "empty_skeletons.json", (), frames=frames)
    (folder / "no_data.json").write_text(json.dumps({"data": [], "label": "waving", "label_index": 1}))
    (folder / "broken.json").write_text('{"data": [{"frame_index": 1, "skeleton": [{"pose": [0.1, ')
    import numpy as np
    with open(root / "annotations" / "train.csv", "a") as f:
        for vid in ("just_enough", "few_posed", "empty_skeletons", "no_data", "broken"):
            f.write(f"waving,{vid},3,13,train\n")
            common.write_video(str(root / "train" / "waving" / f"{vid}_000003_000013.mp4"),
                               np.zeros((frames, 36, 52, 3), dtype=np.uint8))


def test_k400_pose_drops_videos_without_enough_posed_frames(tmp_path):
    """Supp. Sec. 7.2 (our reading): a video is kept with >= min_pose_frames frames holding a person with a positive
    score (default: the clip's frames); missing, unreadable (-> bad_files.txt), empty JSON are dropped."""
    write_k400_pose(tmp_path)
    add_k400_pose_videos(tmp_path)
    bad = tmp_path / "bad_files.txt"
    with pytest.warns(UserWarning, match="broken.json"):
        ds = common.build_dataset("k400-pose", str(tmp_path), "train", clip_len=21, bad_files_path=str(bad))
    names = sorted(os.path.basename(p).rsplit("_", 2)[0] for p, _, _ in ds.samples)
    assert names == ["abc_def-123", "just_enough", "zz-yy_xx_01"]
    assert "broken.json" in bad.read_text()
    ds = common.build_dataset("k400-pose", str(tmp_path), "train", clip_len=21, min_pose_frames=22, pose_cache="")
    assert len(ds) == 2  # 25, 25 posed frames kept; 21 not
    ds = common.build_dataset("k400-pose", str(tmp_path), "train", clip_len=21, min_pose_frames=0)
    assert len(ds) == 7  # only the video without a JSON left out


def test_k400_pose_pretraining_step(tmp_path):
    write_k400_pose(tmp_path)
    add_k400_pose_videos(tmp_path)
    out = run_script(tmp_path / "run", "--data", "k400-pose", "--data-root", tmp_path, "--arch", "tiny3d",
                     "--clip-len", 20, "--crop-size", 32, "--hidden", 32, "--rep-dim", 16, "--prototypes", 4,
                     "--prototypes-final", 4, "--batch-size", 2, "--max-steps", 2, "--workers", 0, "--log-every", 1,
                     "--min-pose-frames", 20, "--pose-cache", tmp_path / "cache")
    assert ("k400-pose train: 4 of 8 videos kept (supp.: 144,085) (1 without a pose JSON, 2 with fewer than 20 "
            "posed frames, 1 unreadable)") in out
    assert len(os.listdir(tmp_path / "cache")) == 6  # every readable JSON parsed once into the cache
    assert all(math.isfinite(l) for _, l, _ in losses(tmp_path / "run"))


def test_pose_json_cache_hit_invalidation_and_dataset_items(tmp_path, monkeypatch):
    """read_pose_json_cached: the parse of read_kinetics_skeleton_json (all frames; empty person slots dropped); a hit
    parses nothing; an edited JSON, another `people`, a damaged entry are parsed again; an unwritable folder warns."""
    import numpy as np
    path, cache = tmp_path / "vid.json", str(tmp_path / "cache")
    write_stgcn_json(path, range(0, 300, 3))
    full, _ = common.read_kinetics_skeleton_json(str(path), 301, 5, 5)  # frame_index 1..300
    first = common.read_pose_json_cached(str(path), cache)
    assert first.shape == (3, 301, 18, 2) and np.array_equal(first, full[..., :2]) and not full[..., 2:].any()
    parse = common.read_kinetics_skeleton_json
    monkeypatch.setattr(common, "read_kinetics_skeleton_json", lambda *a: pytest.fail("parsed on a cache hit"))
    assert np.array_equal(common.read_pose_json_cached(str(path), cache), first)
    monkeypatch.setattr(common, "read_kinetics_skeleton_json", parse)
    assert common.read_pose_json_cached(str(path), cache, people=1).shape == (3, 301, 18, 1)
    write_stgcn_json(path, range(0, 300, 3), seed=1)  # same size, new poses
    os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns + 10 ** 9))
    edited = common.read_pose_json_cached(str(path), cache)
    assert np.array_equal(edited, common.read_kinetics_skeleton_json(str(path), 301, 5, 2)[0])
    assert not np.array_equal(edited, first) and len(os.listdir(cache)) == 3
    newest = max(os.listdir(cache), key=lambda n: os.stat(os.path.join(cache, n)).st_mtime_ns)
    with open(os.path.join(cache, newest), "r+b") as f:
        f.truncate(1000)  # a damaged entry: parsed again and replaced
    assert np.array_equal(common.read_pose_json_cached(str(path), cache), edited)
    assert os.path.getsize(os.path.join(cache, newest)) > 1000
    (tmp_path / "not_a_folder").write_text("")
    with pytest.warns(UserWarning, match="pose JSON cache not written"):
        assert np.array_equal(common.read_pose_json_cached(str(path), str(tmp_path / "not_a_folder")), edited)
    # through the dataset a run reads: cached and uncached items are equal
    root = tmp_path / "k400"
    write_k400_pose(root)
    build = lambda **kw: common.build_dataset("k400-pose", str(root), "train", clip_len=21, sampling="uniform",  # noqa
                                              **kw)[1]["pose2d"]
    items = [build(pose_cache=""), build(), build()]  # parsed; parsed into root/pose_cache (default); read from it
    assert len(os.listdir(root / "pose_cache")) == 2 and items[0].shape == (3, 21, 18, 5)
    assert torch.equal(items[0], items[1]) and torch.equal(items[0], items[2]) and items[0][2].sum() > 0


def _rewrite_cache_entry(path, cache, times):
    """(In a forked writer) delete and re-write the entry `times` times, np.save writing in 4 pieces 2 ms apart."""
    import contextlib
    import io
    import time
    import numpy as np
    save = np.save

    def slow_save(f, array):
        buf = io.BytesIO()
        save(buf, array)
        data = buf.getvalue()
        for i in range(0, len(data), len(data) // 4 + 1):
            f.write(data[i:i + len(data) // 4 + 1])
            f.flush()
            time.sleep(0.002)
    np.save = slow_save
    for _ in range(times):
        for name in os.listdir(cache):
            with contextlib.suppress(FileNotFoundError):  # the other writer may have removed it already
                if name.endswith(".npy"):
                    os.remove(os.path.join(cache, name))
        common.read_pose_json_cached(path, cache)


def test_pose_json_cache_writes_whole_files_only(tmp_path):
    """Two processes keep deleting and slowly re-writing the entry while this one watches it: every .npy file seen
    has its full size (written under a temporary name, then renamed), every read equals the parse; no temporary
    file left."""
    import numpy as np
    path, cache = tmp_path / "vid.json", str(tmp_path / "cache")
    write_stgcn_json(path, range(300))
    expected = common.read_pose_json_cached(str(path), cache)
    size = os.path.getsize(os.path.join(cache, os.listdir(cache)[0]))
    ctx = mp.get_context("fork")
    writers = [ctx.Process(target=_rewrite_cache_entry, args=(str(path), cache, 20)) for _ in range(2)]
    for w in writers:
        w.start()
    seen = set()
    while any(w.is_alive() for w in writers):
        for name in os.listdir(cache):
            try:
                if name.endswith(".npy"):
                    seen.add(os.path.getsize(os.path.join(cache, name)))
            except FileNotFoundError:
                pass
        assert np.array_equal(common.read_pose_json_cached(str(path), cache), expected)
    assert all(w.join() is None and w.exitcode == 0 for w in writers)
    assert seen <= {size} and [n for n in os.listdir(cache) if not n.endswith(".npy")] == []


def test_phlvc_video_loads_the_authors_layout():
    """SkeleContrastS3D state dict (DataParallel 'module.'): vid_backbone.base.* (kylemin/CoCLR S3D names),
    vid_backbone.fc.0, vid_fc2.*; the Rep head, the pose branch and the prototypes are not the backbone."""
    from test_backbones import _to_coclr
    model = common.build_backbone("phlvc_video")
    src = {k: v + 1 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    state = {}
    for k, v in src.items():
        name = ("vid_backbone." + _to_coclr(k[len("trunk."):]) if k.startswith("trunk.") else
                "vid_backbone." + k if k.startswith("fc.") else k)
        state["module." + name] = v
    assert "module.vid_backbone.base.5.branch1.1.conv_t.weight" in state and "module.vid_fc2.2.weight" in state
    state |= {"module.vid_fc_rep.1.weight": torch.ones(2), "module.prototypes": torch.ones(2),
              "module.sk_fc_rep.1.weight": torch.ones(2)}
    fresh = common.build_backbone("phlvc_video")
    report = common.load_backbone_weights(fresh, {"state_dict": state})
    assert report["missing"] == [] and report["prefix"] == "module."
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, src[k]), k


def test_visualize_writes_frames_and_skelemotion_channels(tmp_path):
    from PIL import Image
    out = run_script(tmp_path, "--visualize", 2)
    assert out.count("wrote") == 2
    with Image.open(tmp_path / "visualize_0.png") as img:  # 64² frame x4 = 256, then >= 6 tiles of 20 x 4 px
        assert img.height == 256 and img.width >= 256 + 6 * (80 + 4)


def test_show_prototypes_writes_the_fullest_prototypes(tmp_path):
    from PIL import Image
    out = run_script(tmp_path, *SHORT, "--max-steps", 2, "--epochs", 2, "--show-prototypes", 3)
    held = re.search(r"prototypes.png: prototypes \[[\d, ]+\] hold \[([\d, ]+)\] of (\d+) clips", out)
    assert held and 0 < sum(map(int, held.group(1).split(","))) <= int(held.group(2)), out
    with Image.open(tmp_path / "prototypes.png") as img:  # 3 rows x 8 columns of 48² frames, 2 px padding
        assert img.size == (8 * 50 + 2, 3 * 50 + 2)


def test_user_errors_are_one_line_before_anything_is_written(tmp_path, capsys):
    """phlvc.main() in this process: the same launch / exit-2 path as the command line, without an interpreter."""
    for argv, expected in ((["--data", "k400-pose", "--video-input", "depth"], "error: phlvc.py --video-input: "
                            "expected rgb"), (["--data", "sims"], "error: phlvc.py --data: expected toy")):
        with pytest.raises(SystemExit) as stop:
            phlvc.main([*argv, "--out-dir", str(tmp_path / "r")])
        err = capsys.readouterr().err
        assert stop.value.code == 2 and err.startswith(expected), err
        assert len(err.strip().splitlines()) == 1 and not (tmp_path / "r").exists()


# ------------------------------------------------------------------------------------------- cross-domain layouts
SIMS_CSV = ("VideoName;Subject;Scene;CameraSetup;CameraAngle;Duration;Uploaded;Split\n"
            "Co_S1K1_fC6.avi;S1;Kitchen1;fixed;C6;00:00:59;yes;train\n"
            "Dr_S2D1_m3.avi;S2;Dining1;moving;3;00:00:14;yes;train\n"
            "GS_S5L1_fC9.avi;S5;Living1;fixed;C9;00:00:18;yes;train\n"
            "TV_S6L2_m4.avi;S6;Living2;moving;4;00:02:00;yes;train\n"
            "Co_S7K1_fC5.avi;S7;Kitchen1;fixed;C5;00:01:00;yes;val\n"
            "Dr_S7K2_fC17.avi;S7;Kitchen2;fixed;C17;00:00:34;yes;val\n"
            "Co_S8K1_fC5.avi;S8;Kitchen1;fixed;C5;00:01:04;yes;test\n"
            "UT_S4D1_m4.avi;S4;Dining1;moving;4;00:00:40;yes;test\n")
TOYOTA_NAMES = ("Cook.Cut_p02_r00_v02_c03", "Cook.Cleandishes_p03_r01_v05_c01", "Sitdown_p11_r03_v07_c07",
                "Getup_p04_r00_v01_c02", "Uselaptop_p09_r02_v11_c05", "Enter_p02_r00_v00_c04", "Eat.Snack_p16_r0_v3_c2",
                "Drink.Fromcup_p13_r01_v10_c06")


def write_crossdomain(root, frames=20, size=(36, 52)):
    """Sims4Action (official ';' split CSV, videos/<name>.avi) and Toyota Smarthome (mp4/<Action>_p_r_v_c.mp4, an
    unmapped action, odd sizes) with the class as a per-class brightness, so a classifier can learn it."""
    import numpy as np
    sims, toyota = root / "sims4action", root / "toyota-smarthome"
    os.makedirs(sims / "videos")
    (sims / "SimsSplitsCompleteVideos.csv").write_text(SIMS_CSV)
    classes = list(common.SIMS4ACTION_CLASSES)
    for line in SIMS_CSV.splitlines()[1:]:
        name = line.split(";")[0]
        value = 20 + 22 * classes.index(name.split("_")[0])
        rgb = np.full((frames, *size, 3), value, dtype=np.uint8)
        common.write_video(str(sims / "videos" / name), rgb)
    for name in TOYOTA_NAMES:
        sims_class = common.TOYOTA_TO_SIMS_PHLVC_CODE.get(name.split("_")[0], "Walk")
        value = 20 + 22 * list(common.SIMS4ACTION_CLASSES.values()).index(sims_class)
        common.write_video(str(toyota / "mp4" / f"{name}.mp4"), np.full((frames, size[1], size[0], 3), value,
                                                                         dtype=np.uint8))
    return sims, toyota


def test_sims4action_and_toyota_smarthome_parsers(tmp_path):
    sims, toyota = write_crossdomain(tmp_path)
    names = list(common.SIMS4ACTION_CLASSES.values())
    for split, expected in (("train", ["Cook", "Drink", "Getup", "WatchTV"]), ("val", ["Cook", "Drink"]),
                            ("test", ["Cook", "Usetablet"])):
        ds = common.build_dataset("sims4action", str(sims), split, clip_len=8)
        assert [names[y] for _, y in ds.samples] == expected and ds.num_classes == 10
    item = common.build_dataset("sims4action", str(sims), "test", clip_len=8)[1]
    assert item["video"].shape == (3, 8, 36, 52) and names[int(item["label"])] == "Usetablet"
    official = common.build_dataset("toyota-smarthome", str(toyota), "test", clip_len=8)
    code = common.build_dataset("toyota-smarthome", str(toyota), "test", clip_len=8, class_map="phlvc-code")
    label_of = lambda ds: {os.path.basename(p).split("_")[0]: names[y] for p, y in ds.samples}  # noqa: E731
    assert label_of(official) == {"Cook.Cut": "Cook", "Sitdown": "Getup", "Getup": "Getup", "Uselaptop": "Usecomputer",
                                  "Drink.Fromcup": "Drink"}  # Enter unmapped, Cleandishes / Snack only in the code's
    assert label_of(code) == dict(label_of(official), **{"Cook.Cleandishes": "Cook", "Eat.Snack": "Eat"})
    with pytest.raises(ValueError, match="only the cross-domain test set"):
        common.build_dataset("toyota-smarthome", str(toyota), "train")
    runs = (("cs", "train"), ("cs", "test"), ("cv1", "train"), ("cv2", "train"), ("cv2", "val"), ("cv2", "test"))
    own = {f"{p}-{s}": [os.path.basename(f).split("_")[0] for f, _ in common.build_dataset(
        f"toyota-smarthome-{p}", str(toyota), s).samples] for p, s in runs}
    assert own == {"cs-train": ["Cook.Cleandishes", "Drink.Fromcup", "Getup", "Uselaptop"],  # subjects 3, 13, 4, 9
                   "cs-test": ["Cook.Cut", "Eat.Snack", "Enter", "Sitdown"],
                   "cv1-train": [],  # camera 1 holds Cook.Cleandishes only, not one of the 19 cross-view actions
                   "cv2-train": ["Drink.Fromcup", "Enter", "Sitdown"], "cv2-val": ["Uselaptop"],  # cameras 6, 4, 7; 5
                   "cv2-test": ["Eat.Snack", "Getup"]}  # camera 2
    cs = common.build_dataset("toyota-smarthome-cs", str(toyota), "train")
    assert cs.num_classes == 31 and [cs.class_names[y] for _, y in cs.samples][0] == "Cook.Cleandishes"
    (sims / "SimsSplitsCompleteVideos.csv").write_text(SIMS_CSV.replace("Dr_S2D1", "Xx_S2D1"))
    with pytest.raises(common.UserError, match=r"SimsSplitsCompleteVideos.csv:3: expected"):
        common.build_dataset("sims4action", str(sims), "train")


def test_evaluate_crossdomain_trains_on_sims_selects_on_its_val_and_tests_on_mapped_toyota(tmp_path):
    """evaluate.py --task crossdomain: Sims4Action train (4 videos) -> select on its val (2) -> Toyota Smarthome test
    (the 7 videos the P-HLVC code's map keeps, labelled with their Sims4Action class); top-1 and mean class accuracy
    agree with the saved test logits."""
    import evaluate as ev
    sims, toyota = write_crossdomain(tmp_path)
    result = ev.main(["--task", "crossdomain", "--data", "sims4action", "--data-root", str(sims), "--target",
                      "toyota-smarthome", "--target-root", str(toyota), "--class-map", "phlvc-code", "--arch", "tiny3d",
                      "--weights", "none", "--frames", "8", "--epochs", "1", "--batch-size", "2", "--lr", "1e-3",
                      "--test-clips", "1", "--save-logits", "--workers", "0", "--out-dir", str(tmp_path / "run")])
    assert result["sizes"] == {"train": 4, "val": 2, "test": 7} and result["num_classes"] == 10
    saved = torch.load(tmp_path / "run" / "logits.pth", weights_only=False)
    names = list(common.SIMS4ACTION_CLASSES.values())
    expected = sorted((n, common.TOYOTA_TO_SIMS_PHLVC_CODE[n.split("_")[0]]) for n in TOYOTA_NAMES if "Enter" not in n)
    assert [names[y] for y in saved["test"]["labels"].tolist()] == [c for _, c in expected]
    hits = saved["test"]["logits"].argmax(1) == saved["test"]["labels"]
    assert result["metrics"]["top1"] == pytest.approx(100 * hits.float().mean().item())
    per_class = [hits[saved["test"]["labels"] == c].float().mean().item() for c in saved["test"]["labels"].unique()]
    assert result["metrics"]["mean_class_acc"] == pytest.approx(100 * sum(per_class) / len(per_class))
    with pytest.raises(common.UserError, match=r"expected --target \(and --calibrate\) with --task crossdomain only"):
        ev.main(["--task", "finetune", "--data", "sims4action", "--data-root", str(sims), "--target",
                 "toyota-smarthome", "--out-dir", str(tmp_path / "bad")])


# ------------------------------------------------------------------------------------------- evaluate --protocol phlvc
def test_evaluate_protocol_phlvc_settings_head_and_test_crops(tmp_path):
    """--protocol phlvc (P-HLVC supp. Sec. 7.6, Table 6; optimiser = the authors' transfer.py CLI defaults): the
    values per dataset and trunk, the dropout-ReLU-linear head, and the test crops by hand."""
    import evaluate as ev

    def resolve(*argv):
        return ev.resolve_args(ev.get_parser().parse_args(["--protocol", "phlvc", "--task", "finetune", "--out-dir",
                                                           str(tmp_path), *argv]))

    a = resolve("--data", "ucf101", "--arch", "phlvc_video", "--arch-options", '{"trunk": "s3d"}')
    p = a.protocol
    assert (a.optimizer, a.lr, a.wd, a.batch_size, a.epochs, a.milestones, a.frames, a.test_clips) == \
        ("adam", 1e-4, 1e-3, 32, 250, [30, 50, 100, 150], 32, 10)
    assert (p["crop"], p["crop_scale"], p["ratio"], p["flip"], p["jitter"], p["dropout"]) == \
        (128, (0.1, 1.0), (1.0, 1.0), True, (0.5, 0.0, 0.5, 0.5), 0.5)  # Table 6 UCF101: B 50 %, S 50 %, H 180°
    a = resolve("--data", "hmdb51", "--arch", "phlvc_video", "--arch-options", '{"trunk": "r2d3d_18"}')
    assert (a.frames, a.protocol["crop_scale"], a.protocol["jitter"]) == (40, (0.05, 1.0), (0.8, 0.0, 1.0, 0.5))
    a = resolve("--data", "toy-motion")  # toy sets keep their input size and augmentation
    assert (a.frames, a.protocol["crop"], a.protocol["flip"], a.lr) == (8, 56, False, 1e-4)
    assert resolve("--data", "toyota-smarthome-cs").protocol["metric"] == "mean_class_acc"
    with pytest.raises(common.UserError, match="--protocol phlvc: expected --task finetune or crossdomain"):
        resolve("--task", "knn")
    torch.manual_seed(0)
    head = ev.Classifier(common.build_backbone("tiny3d"), 5, frozen=False, dropout=0.5, relu=True).eval()
    x = torch.randn(2, 3, 8, 32, 32)
    torch.testing.assert_close(head(x), head.fc(torch.relu(head.backbone(x))))
    # centre branch: 130 of a 224 short side, centred, no resize at crop 130 -> the slice itself
    frame = torch.arange(300, dtype=torch.uint8).expand(3, 2, 224, 300).clone()  # (C, T, H, W): value = column
    torch.testing.assert_close(ev.phlvc_test_crop(frame, 130, 1.0, 130 / 224, 0.6), frame[..., 47:177, 85:215])
    # 100 x 100 frames with a central 50 x 50 block of ones: a centre crop (58 px) keeps 2500 / 58² = 74 % ones, a
    # random square of area >= 60 % (side >= 78, so it holds the block) 2500 / side² = 25-42 %; p_centre 0.4
    clips = torch.zeros(400, 1, 1, 100, 100)
    clips[..., 25:75, 25:75] = 1
    ones = ev.phlvc_test_crop(clips, 40, 0.4, 130 / 224, 0.6).mean(dim=(1, 2, 3, 4))  # (400,)
    centre = (ones - 2500 / 58 ** 2).abs() < 0.03
    assert ((ones[~centre] > 0.25 - 0.03) & (ones[~centre] < 2500 / 6000 + 0.03)).all()
    assert 160 - 3 * 9.8 < centre.sum() < 160 + 3 * 9.8  # binomial(400, 0.4): 160 +- 3 sd


def test_evaluate_protocol_phlvc_tiny_run_with_calibration(tmp_path):
    """A tiny --protocol phlvc run (the cross-domain fixture, a non-toy set: 128² square crops, Table 6 jitter, random
    test clips and crops) with --calibrate 1: it trains, calibrates in run/calibrate, reports the metrics before and
    after, and its protocol text says so."""
    import evaluate as ev
    sims, toyota = write_crossdomain(tmp_path)
    argv = ["--task", "crossdomain", "--protocol", "phlvc", "--data", "sims4action", "--data-root", str(sims),
            "--target", "toyota-smarthome", "--target-root", str(toyota), "--arch", "tiny3d", "--weights", "none",
            "--frames", "4", "--epochs", "1", "--batch-size", "2", "--test-clips", "2", "--workers", "0", "--out-dir",
            str(tmp_path / "run"), "--calibrate", "1"]
    result = ev.main(argv)
    assert {"top1", "uncalibrated_top1", "uncalibrated_mean_class_acc"} <= set(result["metrics"])
    assert (tmp_path / "run" / "calibrate" / "checkpoint.pth").exists()
    assert "calibration: 1 epochs on Sinkhorn-balanced (eps 0.05) pseudo-labels" in result["protocol"]
    assert result["sizes"] == {"train": 4, "val": 2, "test": 5} and 0 <= result["metrics"]["top1"] <= 100
    assert ("2 clips at random positions, per clip a centre square of 130/224 of the short side (p 0.4) or a random "
            "square of >= 60% of the area -> 128²" in result["protocol"])
    assert "(scale 0.1-1.0, square) + flip + colour jitter (0.5, 0.0, 0.5, 0.5)" in result["protocol"]
    assert "dropout-ReLU-linear head (dropout 0.5)" in result["protocol"] and "adam lr 0.0001" in result["protocol"]
    args = ev.resolve_args(ev.get_parser().parse_args(argv))
    test_set = ev.build_split(args, "test", train=False)
    assert test_set.sampling == "random" and test_set[0]["video"].shape == (2, 3, 4, 128, 128)


# ------------------------------------------------------------------------------------------- AlphaPose -> COCO-18
def alphapose_person(image_id, idx, dx=0.0):
    """One AlphaPose result as its writer (pPose_nms.write_json) saves it: COCO-17 joint j at (10 j + 5 + dx,
    2 j + 1) px with score 0.5 + 0.01 j; "idx" an int with --pose_track, a list without tracking."""
    keypoints = [v for j in range(17) for v in (10 * j + 5 + dx, 2 * j + 1, 0.5 + 0.01 * j)]
    return {"image_id": image_id, "category_id": 1, "keypoints": keypoints, "score": 2.7,
            "box": [1.0, 2.0, 160.0, 33.0], "idx": idx}


def test_convert_alphapose_to_coco18_stgcn_json(tmp_path):
    """COCO-17 + idx -> COCO-18 ST-GCN JSON: neck = the shoulders' midpoint (x (55 + 65) / 2 = 60 px -> 60 / 200
    = 0.3, y 12 px -> 0.12, score (0.55 + 0.56) / 2), OpenPose order, x / width, y / height; read back by the
    Kinetics-Skeleton reader (x - 0.5, y - 0.5, score). Folder mode takes the frame size from the video."""
    results = [alphapose_person("0.jpg", 4), alphapose_person("0.jpg", [7, 9], dx=20), alphapose_person("2.jpg", 4)]
    src = tmp_path / "alphapose-results.json"
    src.write_text(json.dumps(results))
    out = subprocess.run([sys.executable, "common.py", "convert-alphapose", "--src", str(src), "--dst",
                          str(tmp_path / "pose2d" / "Co_S1K1_fC6.json"), "--width", "200", "--height", "100"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    video = json.loads((tmp_path / "pose2d" / "Co_S1K1_fC6.json").read_text())
    assert [f["frame_index"] for f in video["data"]] == [0, 2] and [len(f["skeleton"]) for f in video["data"]] == [2, 1]
    first, second = video["data"][0]["skeleton"]
    assert first["id"] == 4 and "id" not in second  # a list (no tracking) is not a track id
    assert first["pose"][2:4] == pytest.approx([0.3, 0.12]) and first["score"][1] == pytest.approx(0.555)  # neck
    assert first["pose"][4:6] == pytest.approx([65 / 200, 13 / 100])  # COCO-18 2 = right shoulder = COCO-17 6
    assert first["pose"][28:30] == pytest.approx([25 / 200, 5 / 100]) and first["score"][14] == pytest.approx(0.52)
    assert first["pose"][30:32] == pytest.approx([15 / 200, 3 / 100])  # 14, 15 = right, left eye = COCO-17 2, 1
    assert second["pose"][2] == pytest.approx(0.4)  # shifted by 20 px = 0.1 of the width
    pose, _ = common.read_kinetics_skeleton_json(str(tmp_path / "pose2d" / "Co_S1K1_fC6.json"), max_frames=3)
    assert pose.shape == (3, 3, 18, 2) and pose[:, 0, 1, 0] == pytest.approx([0.3 - 0.5, 0.12 - 0.5, 0.555])
    assert not pose[:, 1].any()  # frame 1: nobody
    # track ids: track 1 (summed score 18 x 1.3) outscores track 2 (18 x 1.1) but not in frame 1: it keeps slot 0
    tracked = [alphapose_person(f"{t}.jpg", i, dx=40 * i) for t, i in ((0, 1), (0, 2), (1, 1), (1, 2))]
    for person, score in zip(tracked, (0.9, 0.5, 0.4, 0.6)):  # every joint of a person scored alike
        person["keypoints"][2::3] = [score] * 17
    src.write_text(json.dumps(tracked))
    common.convert_alphapose(str(src), str(tmp_path / "tracked.json"), width=200, height=100)
    pose, _ = common.read_kinetics_skeleton_json(str(tmp_path / "tracked.json"), max_frames=2)
    assert pose[0, :, 0, 0] == pytest.approx([45 / 200 - 0.5] * 2) and pose[2, :, 0, 0] == pytest.approx([0.9, 0.4])
    # folder mode: <name>/alphapose-results.json (AlphaPose's --outdir per video), size from videos/<name>.mp4
    name = "Cook.Cut_p02_r00_v02_c03"
    os.makedirs(tmp_path / "ap" / name)
    (tmp_path / "ap" / name / "alphapose-results.json").write_text(json.dumps(results[:1]))
    import numpy as np
    common.write_video(str(tmp_path / "mp4" / f"{name}.mp4"), np.zeros((2, 48, 80, 3), dtype=np.uint8))
    assert common.convert_alphapose(str(tmp_path / "ap"), str(tmp_path / "out"), videos=str(tmp_path / "mp4")) == 1
    person = json.loads((tmp_path / "out" / f"{name}.json").read_text())["data"][0]["skeleton"][0]
    assert person["pose"][2:4] == pytest.approx([60 / 80, 12 / 48])
    # user errors: one line naming the file, nothing written
    (tmp_path / "ap" / "broken.json").write_text(json.dumps([dict(results[0], keypoints=[1.0] * 50)]))
    with pytest.raises(common.UserError, match=r"broken.json: expected AlphaPose results .* found ValueError"):
        common.convert_alphapose(str(tmp_path / "ap"), str(tmp_path / "out2"), width=80, height=48)
    with pytest.raises(common.UserError, match=r"expected --width and --height, or --videos holding its video"):
        common.convert_alphapose(str(src), str(tmp_path / "out2" / "x.json"))
    assert not (tmp_path / "out2").exists()


def test_calibrate_balances_the_pseudo_labels_with_sinkhorn(tmp_path, monkeypatch):
    """--calibrate's pseudo-labels: every target video prefers class 0 (argmax: all 0), Sinkhorn's equal class
    marginals move the least confident ones to class 1, in order of confidence; N epochs, metrics before."""
    import types
    import evaluate as ev
    p0 = torch.tensor([0.9, 0.8, 0.7, 0.6])  # (4,) softmax of class 0
    scores = {"scores": torch.stack([p0, 1 - p0], 1), "labels": torch.tensor([0, 0, 1, 1]), "index": torch.arange(4)}
    seen = {}
    monkeypatch.setattr(ev, "predict", lambda *a, **k: scores)
    monkeypatch.setattr(ev, "build_split", lambda *a, **k: types.SimpleNamespace(samples=[(i, 1) for i in range(4)]))
    monkeypatch.setattr(common, "Run", lambda *a: None)
    monkeypatch.setattr(ev, "train_and_select", lambda run, args, model, target, *rest: seen.update(
        labels=[y for _, y in target.samples], epochs=args.epochs, out=args.out_dir))
    args = types.SimpleNamespace(calibrate=3, out_dir=str(tmp_path), milestones=[60], eval_every=10, epochs=100)
    before = ev.calibrate(types.SimpleNamespace(device="cpu"), args, None, None, 2)
    assert before["uncalibrated_top1"] == 50.0 and (seen["epochs"], seen["out"]) == (3, str(tmp_path / "calibrate"))
    assert seen["labels"][0] == 0 and seen["labels"][-1] == 1 and seen["labels"] == sorted(seen["labels"])


def test_sims4action_pretraining_on_converted_alphapose_poses(tmp_path):
    """Sec. 7.2: AlphaPose results for the Sims4Action videos -> convert-alphapose (size from the videos) ->
    pose2d/<name>.json, read with the videos (frame t with pose frame t) by phlvc.py --data sims4action."""
    import numpy as np
    sims, _ = write_crossdomain(tmp_path)
    os.makedirs(tmp_path / "ap")
    for k, name in enumerate(["Co_S1K1_fC6", "Dr_S2D1_m3", "GS_S5L1_fC9"]):  # TV_S6L2_m4 has no poses
        people = [alphapose_person(f"{t}.jpg", 1, dx=t + k) for t in range(20)]
        (tmp_path / "ap" / f"{name}.json").write_text(json.dumps(people))
    assert common.convert_alphapose(str(tmp_path / "ap"), str(sims / "pose2d"), videos=str(sims / "videos")) == 3
    ds = common.build_dataset("sims4action", str(sims), "train", clip_len=8, modalities=("video", "pose2d"))
    item = ds[0]
    t = item["frame_indices"].numpy()  # (8,) the clip's video frames; joint 0 moves 1 px per frame over 52 px
    assert len(ds) == 3 and item["video"].shape == (3, 8, 36, 52)
    np.testing.assert_allclose(item["pose2d"][0, :, 0, 0].numpy(), (5 + t) / 52 - 0.5, atol=1e-3)
    out = run_script(tmp_path / "run", "--data", "sims4action", "--data-root", sims, "--arch", "tiny3d",
                     "--clip-len", 19, "--crop-size", 32, "--hidden", 32, "--rep-dim", 16, "--prototypes", 4,
                     "--prototypes-final", 4, "--batch-size", 2, "--max-steps", 2, "--workers", 0, "--log-every", 1)
    assert ("sims4action train: 3 of 4 videos kept (1 without a pose JSON, 0 with fewer than 20 posed frames, 0 "
            "unreadable)") in out  # --min-pose-frames T + 1 = 20: the 20 posed frames suffice
    assert all(math.isfinite(l) for _, l, _ in losses(tmp_path / "run"))


def write_crossdomain_poses(sims, toyota, frames=20):
    """AlphaPose results (two tracks, track 2 scored higher) for every fixture video -> pose2d/<name>.json."""
    for root, videos in ((sims, sims / "videos"), (toyota, toyota / "mp4")):
        os.makedirs(root / "ap")
        for video in os.listdir(videos):
            people = [dict(alphapose_person(f"{t}.jpg", i, dx=t * i)) for t in range(frames) for i in (1, 2)]
            for p in people:
                p["keypoints"][2::3] = [0.3 * p["idx"]] * 17
            (root / "ap" / (os.path.splitext(video)[0] + ".json")).write_text(json.dumps(people))
        common.convert_alphapose(str(root / "ap"), str(root / "pose2d"), videos=str(videos))


def test_evaluate_pose_stream_alone_and_concatenated_with_the_video(tmp_path, capsys):
    """Sec. 7.3: a SkeleMotion CNN on the converted poses alone (--arch skelemotion_cnn), or beside the video encoder
    (--concat skelemotion_cnn); the pose image is the best-scored track's, for every test clip."""
    import evaluate as ev
    sims, toyota = write_crossdomain(tmp_path)
    write_crossdomain_poses(sims, toyota)
    common_argv = ["--task", "crossdomain", "--data", "sims4action", "--data-root", str(sims), "--target",
                   "toyota-smarthome", "--target-root", str(toyota), "--weights", "none", "--epochs", "1",
                   "--batch-size", "2", "--test-clips", "2", "--workers", "0"]
    both = ev.main([*common_argv, "--arch", "tiny3d", "--concat", "skelemotion_cnn", "--concat-options",
                    '{"frames": 19}', "--out-dir", str(tmp_path / "both")])
    assert "SkeleMotion image (6, 19, 49), unaugmented, features concatenated" in both["protocol"]
    pose = ev.main([*common_argv, "--arch", "skelemotion_cnn", "--arch-options", '{"frames": 19}', "--out-dir",
                    str(tmp_path / "pose")])
    assert "the classifier's only input" in pose["protocol"] and pose["sizes"] == both["sizes"]
    args = ev.resolve_args(ev.get_parser().parse_args([*common_argv, "--arch", "skelemotion_cnn", "--arch-options",
                                                       '{"frames": 19}', "--out-dir", str(tmp_path / "x")]))
    item = ev.build_split(args, "test", train=False)[0]  # 2 clips of 20 poses: track 2 (score 0.6) is the best
    raw = common.build_dataset("toyota-smarthome", str(toyota), "test", clip_len=20, num_clips=2, sampling="uniform",
                               modalities=("video", "pose2d"))[0]["pose2d"]  # (2, 3, 20, 18, M)
    assert item["video"].shape == (2, 3, 19, 112, 112) and item["pose"].shape == (2, 6, 19, 49)
    for k in range(2):
        expected = common.skelemotion_image(raw[k, :2, :, :, 0], "coco18")[:, :19]
        assert raw[k, 2, :, :, 0].mean() == pytest.approx(0.6) and torch.equal(item["pose"][k], expected)
    one = torch.rand(3, 5, 18, 2)  # (3, T + 1, V, M) one clip; slot 1 scores higher than slot 0
    one[2, :, :, 0], one[2, :, :, 1] = 0.2, 0.7
    out = ev.pose_transform({"video": torch.zeros(3, 5, 8, 8), "pose2d": one}, lambda i: i, frames=4, scale=2.0)
    assert out["video"].shape == (3, 4, 8, 8) and "pose2d" not in out
    assert torch.equal(out["pose"], common.skelemotion_image(one[:2, :, :, 1] * 2.0, "coco18")[:, :4])
    with pytest.raises(common.UserError, match="the P-HLVC pose stream .* expected --task finetune"):
        ev.resolve_args(ev.get_parser().parse_args(["--task", "knn", "--data", "sims4action", "--data-root",
                                                    str(sims), "--arch", "skelemotion_cnn", "--out-dir", "y"]))
