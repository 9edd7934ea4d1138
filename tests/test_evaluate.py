"""evaluate.py: metrics against hand-computed values, subsets, fusion, k-means; end-to-end tasks on toy data."""
import itertools
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import common
import evaluate as ev


# ---------------------------------------------------------------------------------------------- classification
def test_topk_accuracy_hand_computed():
    scores = torch.tensor([[0.1, 0.7, 0.2], [0.5, 0.3, 0.2], [0.2, 0.3, 0.5], [0.6, 0.3, 0.1]])
    labels = torch.tensor([1, 1, 0, 2])
    # top-1 hits: sample 0 only; top-2 adds sample 1 (label 1 second); samples 2 and 3 have their label last
    acc = ev.topk_accuracy(scores, labels, ks=(1, 2, 3))
    assert acc[1] == pytest.approx(0.25)
    assert acc[2] == pytest.approx(0.5)
    assert acc[3] == pytest.approx(1.0)


def test_mean_class_accuracy_differs_from_top1_on_imbalanced_classes():
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 2])
    predictions = torch.tensor([0, 0, 0, 0, 0, 1, 1])
    # per class: 4/4, 1/2, 0/1 -> mean 0.5, while overall accuracy is 5/7
    assert ev.mean_class_accuracy(predictions, labels, num_classes=4) == pytest.approx(0.5)  # class 3 absent
    assert (predictions == labels).float().mean().item() == pytest.approx(5 / 7)


# ---------------------------------------------------------------------------------------------- mAP
def test_map_drops_classes_without_positives():
    scores = np.array([[0.9, 0.5, 0.1], [0.8, 0.4, 0.9], [0.3, 0.6, 0.3], [0.1, 0.2, 0.2]])
    targets = np.array([[1, 0, 0], [0, 1, 0], [1, 0, 0], [0, 0, 0]])  # class 2 has no positive
    m, per_class = ev.mean_average_precision(scores, targets)
    # class 0: ranking pos, neg, pos -> AP = (1 + 2/3) / 2; class 1: neg, neg, pos -> AP = 1/3
    assert set(per_class) == {0, 1}
    assert per_class[0] == pytest.approx((1 + 2 / 3) / 2)
    assert per_class[1] == pytest.approx(1 / 3)
    assert m == pytest.approx(((1 + 2 / 3) / 2 + 1 / 3) / 2)


def test_average_precision_counts_ties_together():
    # a positive tied with a negative: one threshold, precision 1/2 at recall 1 (sklearn gives 0.5)
    assert ev.average_precision([0.5, 0.5], [1, 0]) == pytest.approx(0.5)
    # perfect ranking
    assert ev.average_precision([0.9, 0.8, 0.1], [1, 1, 0]) == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------- retrieval
def test_retrieval_recall_hand_computed():
    angle = lambda a: [math.cos(a), math.sin(a)]  # noqa: E731
    gallery = torch.tensor([angle(0.0), angle(0.5), angle(1.0), angle(2.0)])
    gallery_labels = torch.tensor([0, 1, 2, 3])
    queries = torch.tensor([angle(0.1), angle(0.9), angle(1.9)])
    query_labels = torch.tensor([1, 2, 0])
    # query 0 neighbours by angle: 0 (0.1), 1 (0.4), 2 (0.9), 3 (1.9): label 1 is 2nd -> R@1 miss, R@2 hit
    # query 1: 2 (0.1), 1 (0.4), 0 (0.9), 3 (1.1): label 2 first -> hit from R@1
    # query 2: 3 (0.1), 2 (0.9), 1 (1.4), 0 (1.9): label 0 is 4th -> hit only at R@4
    r = ev.retrieval_recall(queries, query_labels, gallery, gallery_labels, ks=(1, 2, 3, 4))
    assert r[1] == pytest.approx(1 / 3)
    assert r[2] == pytest.approx(2 / 3)
    assert r[3] == pytest.approx(2 / 3)
    assert r[4] == pytest.approx(1.0)


def test_retrieval_recall_k_larger_than_gallery():
    gallery = torch.eye(3)
    r = ev.retrieval_recall(torch.eye(3), torch.tensor([0, 1, 2]), gallery, torch.tensor([0, 1, 2]), ks=(1, 50))
    assert r == {1: 1.0, 50: 1.0}


# ---------------------------------------------------------------------------------------------- repetition counting
def test_repetition_count_errors_hand_computed():
    # rounded predictions 4, 10, 2, 7 for true counts 5, 10, 4, 7
    out = ev.repetition_count_errors([4.4, 9.6, 2.2, 7.0], [5, 10, 4, 7])
    assert out["mae"] == pytest.approx((1 / 5 + 0 + 2 / 4 + 0) / 4)
    assert out["obo"] == pytest.approx(3 / 4)


def test_toy_ucfrep_is_written_in_the_real_layout_and_parses_to_its_counts(tmp_path):
    root = tmp_path / "rep"
    common.make_toy_ucfrep(str(root), num_train=3, num_val=2)
    for split, number in (("train", 3), ("val", 2)):
        files = sorted(os.listdir(root / "annotations" / split))
        assert files == [f"toy_{split}_{k:04d}.json" for k in range(number)]
        samples, classes = common.parse_ucfrep(str(root), split)
        assert classes == ["count"] and len(samples) == number
        for (path, count), name in zip(samples, files):
            with open(root / "annotations" / split / name) as f:
                bounds = json.load(f)["temporal_bound"]
            assert count == len(bounds) - 1 and 2 <= count <= 8
            assert path == str(root / "frames" / name[:-5]) and os.path.isfile(os.path.join(path, "image_00001.jpg"))
            assert bounds[0] >= 1 and common.count_frames(path) >= bounds[-1]  # 1-based frame numbers
            period = np.diff(bounds)
            assert period.min() >= 6 and period.max() - period.min() <= 1  # one random period, rounded
    assert [len(b) - 1 for _, b in common.read_ucfrep_annotations(str(root), "val")] == [
        c for _, c in common.parse_ucfrep(str(root), "val")[0]]


def test_ucfrep_annotations_reject_unordered_bounds(tmp_path):
    folder = tmp_path / "annotations" / "train"
    folder.mkdir(parents=True)
    (folder / "v.json").write_text(json.dumps({"temporal_bound": [5, 20, 12]}))
    with pytest.raises(common.VideoReadError, match=r"v.json: temporal_bound must be .* \[5, 20, 12\]"):
        common.read_ucfrep_annotations(str(tmp_path), "train")


def test_cycle_length_targets_hand_computed():
    previous, following = ev.cycle_length_targets([0, 10, 20, 30])
    assert len(previous) == 31
    # frame 15 is half-way through cycle 1: the same phase is at 5 in cycle 0 and at 25 in cycle 2
    assert previous[15] == 10 and following[15] == 10
    assert previous[5] == -1 and following[5] == 10  # no cycle before the first
    assert following[25] == -1 and previous[25] == 10  # none after the last
    # cycles of 10 and 12 frames (differ by 2: similar): frame 5 (phase 0.5) -> 10 + 0.5 * 12 = 16 -> 11 frames
    previous, following = ev.cycle_length_targets([0, 10, 22])
    assert following[5] == 11 and previous[16] == 11  # 16: phase 0.5 of cycle 1 -> 5 in cycle 0
    # 10 and 15 frames differ by more than 2 frames and 30%: the neighbour is not a repetition, no target
    previous, following = ev.cycle_length_targets([0, 10, 25])
    assert following[5] == -1 and previous[17] == -1


def test_anchor_targets_and_counting_loss_hand_computed():
    anchors = torch.tensor(ev.RC_ANCHORS, dtype=torch.float64)
    scores, offsets, mask = ev.anchor_targets(torch.tensor([10.0, 20.0, -1.0], dtype=torch.float64),
                                              torch.tensor([10.0, 10.0, 10.0], dtype=torch.float64), anchors)
    # true 10, current 10: anchor lengths 5 ... 20 all within IoU 0.5 of 10; offset log(10 / (a * 10)) = -log a
    assert scores[0].tolist() == [1] * 7
    assert torch.allclose(offsets[0], -anchors.log())
    # true 20, current 10: IoU 0.25, 0.335, 0.4, 0.5, 0.625, 0.75, 1 -> positive from a = 1.0 on; a = 2.0 exact
    assert scores[1].tolist() == [0, 0, 0, 1, 1, 1, 1] and offsets[1, 6] == pytest.approx(0.0)
    assert mask[1].tolist() == [False, False, False, True, True, True, True]
    assert scores[2].tolist() == [-1] * 7 and not mask[2].any()  # unknown true length: ignored
    target_scores = torch.stack([scores, scores], 1)  # (3, 2, 7): the same targets for both streams
    target_offsets, offset_mask = torch.stack([offsets, offsets], 1).float(), torch.stack([mask, mask], 1)
    perfect = 20.0 * (F.one_hot(target_scores.clamp(min=0), 2).permute(0, 1, 3, 2).float() - 0.5)  # (3, 2, 2, 7)
    assert ev.counting_loss(perfect, target_offsets, target_scores, target_offsets, offset_mask) < 1e-6
    # offsets wrong by 0.1 (SmoothL1 0.005) on the 11 positives of the 3 x 7 entries, per stream: 50 * 11 * 0.005 / 21
    loss = ev.counting_loss(perfect, target_offsets + 0.1, target_scores, target_offsets, offset_mask)
    assert loss.item() == pytest.approx(2 * 50 * 11 * 0.005 / 21, rel=1e-3)
    all_ignored = torch.full_like(target_scores, -1)
    no_positive = torch.zeros_like(offset_mask)
    assert torch.isfinite(ev.counting_loss(perfect, target_offsets, all_ignored, target_offsets, no_positive))


def test_context_frame_indices_two_streams_hand_computed():
    # m = 19, l = r = 5, 4 frames per stream: previous stream over [19 - 5 + 1 - 5, 19] = [10, 19], step 10 / 3;
    # next stream over [20, 19 + 5 + 5] = [20, 29]; round(first - 0.5 + j * step), clamped to the range
    indices = ev.context_frame_indices(torch.tensor([19.0]), torch.tensor([5.0]), torch.tensor([5.0]), 8)
    assert indices.tolist() == [[10, 13, 16, 19, 20, 23, 26, 29]]
    videos = torch.arange(3 * 30, dtype=torch.float32).view(1, 1, 30, 1, 3).expand(1, 2, 30, 1, 3)  # (1, C, 30, 1, 3)
    x = ev.gather_frames(videos, torch.tensor([25]), torch.tensor([0]), indices)  # frames >= 25 are padding
    assert x.shape == (1, 2, 8, 1, 3)
    assert x[0, 0, :, 0, 0].tolist() == [30.0, 39.0, 48.0, 57.0, 60.0, 69.0, 0.0, 0.0]


class PerfectCycleHead(torch.nn.Module):
    """A stand-in for a trained RepetitionCounter on a video whose pixel values are the frame numbers (index + 1;
    padding reads 0): it recovers each stream's current length from the spacing of the frames it was given (a
    stream spreads frames/2 frames over 2 cycles) and answers as a perfect head for the true period P: the anchor
    closest to P scores highest, offsets log(P / (a * l))."""

    def __init__(self, period, frames):
        super().__init__()
        self.period, self.half = period, frames // 2
        self.unused = torch.nn.Parameter(torch.zeros(()))  # count_repetitions reads the device from a parameter

    def forward(self, x):  # (N, 1, frames, 1, 1)
        values = x[:, 0, :, 0, 0].double()  # (N, frames)
        anchors = torch.tensor(ev.RC_ANCHORS, dtype=torch.float64)
        scores, offsets = [], []
        for stream in range(2):
            current = []
            for row in values[:, stream * self.half:(stream + 1) * self.half]:
                seen = torch.nonzero(row > 0)[:, 0]
                step = (row[seen[-1]] - row[seen[0]]) / max(int(seen[-1] - seen[0]), 1)
                current.append(float(step) * (self.half - 1) / 2)
            log_ratio = torch.log(self.period / (torch.tensor(current, dtype=torch.float64)[:, None] * anchors))
            scores.append(torch.stack([torch.zeros_like(log_ratio), -10 * log_ratio.abs()], 1))  # (N, 2, K)
            offsets.append(log_ratio)  # (N, K)
        return torch.stack(scores, 1).float(), torch.stack(offsets, 1).float()  # (N, 2, 2, K), (N, 2, K)


@pytest.mark.parametrize("period,count", [(7, 8), (10, 6), (25, 3), (40, 2)])
def test_count_repetitions_recovers_the_count_with_a_perfect_head(period, count):
    # the annotated segment t_0..t_n spans count * period + 1 frames; scale search, refinement, the 32 positions
    # and the count formula must give back `count` when every prediction is right
    length = count * period + 1
    video = (torch.arange(length, dtype=torch.float32) + 1).view(1, length, 1, 1)  # (C=1, T, 1, 1)
    predicted = ev.count_repetitions(PerfectCycleHead(period, 32), video, length, 32)
    assert round(predicted) == count and predicted == pytest.approx(length / period, rel=0.03)


# ---------------------------------------------------------------------------------------------- clusters
CLUSTERS = np.array([0, 0, 1, 1, 2, 2])  # contingency (cluster x class): [[2, 0], [1, 1], [0, 2]]
LABELS = np.array([0, 0, 0, 1, 1, 1])


def test_contingency_matrix():
    np.testing.assert_array_equal(ev.contingency_matrix(CLUSTERS, LABELS), [[2, 0], [1, 1], [0, 2]])


def test_nmi_ari_hungarian_on_known_contingency_table():
    # MI = 2 * (2/6) ln(6*2 / (2*3)) = (2/3) ln 2; H(clusters) = ln 3, H(classes) = ln 2
    assert ev.normalized_mutual_info(CLUSTERS, LABELS) == pytest.approx((2 / 3 * math.log(2)) /
                                                                       ((math.log(3) + math.log(2)) / 2))
    # sum C(n_ij, 2) = 2; sum C(a_i, 2) = 3; sum C(b_j, 2) = 6; C(6, 2) = 15 -> E = 1.2, max = 4.5
    assert ev.adjusted_rand_index(CLUSTERS, LABELS) == pytest.approx((2 - 1.2) / (4.5 - 1.2))
    # best matching: cluster 0 -> class 0 (2), cluster 2 -> class 1 (2); cluster 1 unmatched
    assert ev.hungarian_accuracy(CLUSTERS, LABELS) == pytest.approx(4 / 6)
    entropy, purity = ev.cluster_purity_entropy(CLUSTERS, LABELS)
    assert entropy == pytest.approx(math.log(2) / 3)
    assert purity == pytest.approx((1 + 0.5 + 1) / 3)


def test_cluster_metrics_are_invariant_to_relabelling_and_perfect_on_identity():
    labels = np.array([0, 0, 1, 1, 2, 2, 2])
    perfect = ev.cluster_metrics(np.array([5, 5, 3, 3, 9, 9, 9]), labels)
    assert perfect["acc"] == pytest.approx(1) and perfect["nmi"] == pytest.approx(1)
    assert perfect["ari"] == pytest.approx(1) and perfect["entropy"] == pytest.approx(0)
    assert perfect["max_purity"] == pytest.approx(1)
    # a random partition: ARI near 0 (it is chance-corrected), NMI well below 1
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, 2000)
    noise = ev.cluster_metrics(rng.integers(0, 5, 2000), labels)
    assert abs(noise["ari"]) < 0.01 and noise["nmi"] < 0.01


def test_linear_sum_assignment_matches_brute_force():
    rng = np.random.default_rng(0)
    for shape in [(1, 1), (3, 3), (4, 4), (3, 5), (5, 3), (6, 6)]:
        cost = rng.integers(0, 20, shape).astype(float)
        rows, cols = ev.linear_sum_assignment(cost)
        assert len(rows) == min(shape) and len(set(rows)) == len(rows) and len(set(cols)) == len(cols)
        n, m = shape
        if n <= m:
            best = min(sum(cost[i, p[i]] for i in range(n)) for p in itertools.permutations(range(m), n))
        else:
            best = min(sum(cost[p[j], j] for j in range(m)) for p in itertools.permutations(range(n), m))
        assert cost[rows, cols].sum() == pytest.approx(best)


def test_kmeans_recovers_separated_blobs():
    generator = torch.Generator().manual_seed(0)
    centres = torch.tensor([[5.0, 0.0], [0.0, 5.0], [-5.0, -5.0]])
    truth = torch.arange(3).repeat_interleave(30)
    points = centres[truth] + 0.3 * torch.randn(90, 2, generator=generator)
    assignments, centroids = ev.kmeans(points, 3, seed=1)
    assert centroids.shape == (3, 2)
    assert ev.adjusted_rand_index(assignments.numpy(), truth.numpy()) == pytest.approx(1.0)
    again, _ = ev.kmeans(points, 3, seed=1)
    assert torch.equal(assignments, again)


# ---------------------------------------------------------------------------------------------- SEVERE summary
def test_severe_mean_reproduces_table_5_8():
    printed_mean = {"Supervised": 70.9, "None": 52.9, "SeLaVi": 58.6, "MoCo": 59.5, "VideoMoCo": 58.6,
                    "Pretext-Contrast": 60.5, "AVID-CMA": 61.6, "GDT": 64.8, "RSPNet": 62.6, "TCLR": 61.7,
                    "CtP": 63.2, "Tubelet-Contrast (Mini-K)": 66.0, "Tubelet-Contrast (K400)": 66.5,
                    "SVT (ViT-B)": 51.0}  # VideoMAE's printed 58.1 is inconsistent with its row (58.8)
    summary = ev.severe_mean_and_rank(ev.SEVERE_REFERENCE)
    for name, mean in printed_mean.items():
        assert summary[name][0] == pytest.approx(mean, abs=0.051), name
    assert summary["VideoMAE (ViT-B)"][0] == pytest.approx(58.8, abs=0.05)
    # rank: the best row of a column gets 1; UCF-RC is lower-is-better
    toy = ev.severe_mean_and_rank({"a": [1, 1, 1, 1, 1, 1, 0.1, 1], "b": [2, 2, 2, 2, 2, 2, 0.2, 2]})
    assert toy["a"][1] == pytest.approx((7 * 2 + 1) / 8) and toy["b"][1] == pytest.approx((7 * 1 + 2) / 8)


# ---------------------------------------------------------------------------------------------- subsets
def test_severe_quota_subset_is_stratified_and_reproducible():
    labels = np.repeat(np.arange(101), [5 + (c % 13) for c in range(101)])
    quota = math.ceil(1000 / 101)  # SEVERE UCF (10^3): 10 per class
    subset = common.stratified_subset(labels, per_class=quota, seed=3)
    counts = np.bincount(labels[subset], minlength=101)
    np.testing.assert_array_equal(counts, np.minimum(np.bincount(labels), quota))
    np.testing.assert_array_equal(subset, common.stratified_subset(labels, per_class=quota, seed=3))
    assert not np.array_equal(subset, common.stratified_subset(labels, per_class=quota, seed=4))
    assert np.all(np.diff(subset) > 0)


def test_label_fraction_subset_is_stratified():
    labels = np.repeat([0, 1, 2], [100, 50, 3])
    subset = common.stratified_subset(labels, fraction=0.2, seed=0)
    np.testing.assert_array_equal(np.bincount(labels[subset]), [20, 10, 1])  # round(0.6) = 1, at least 1


def test_train_val_split_is_disjoint_stratified_and_keeps_a_training_sample():
    labels = np.repeat([0, 1, 2], [50, 20, 1])
    train, val = ev.train_val_split(labels, 0.1, seed=0)
    assert len(np.intersect1d(train, val)) == 0 and len(train) + len(val) == len(labels)
    np.testing.assert_array_equal(np.bincount(labels[val], minlength=3), [5, 2, 0])
    again = ev.train_val_split(labels, 0.1, seed=0)
    np.testing.assert_array_equal(val, again[1])


# ---------------------------------------------------------------------------------------------- fusion
def test_late_fusion_learns_the_generating_weights():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3000, 5, generator=generator)  # (M, N, C)
    true_combined = 3.0 * logits[0] + 1.0 * logits[1]
    labels = torch.distributions.Categorical(logits=true_combined).sample()  # labels drawn from softmax(3 l1 + l2)
    fusion = ev.fit_late_fusion(logits, labels, multilabel=False, per_class=False, epochs=60, lr=0.05)
    alpha = fusion.alpha.detach().squeeze(1)
    assert alpha[0] == pytest.approx(3.0, abs=0.4) and alpha[1] == pytest.approx(1.0, abs=0.25)


def test_late_fusion_per_class_weights_for_multilabel():
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3000, 3, generator=generator)
    # class 0 is decided by modality 0 only, class 2 by modality 1 only
    weights = torch.tensor([[4.0, 2.0, 0.0], [0.0, 2.0, 4.0]])
    targets = torch.bernoulli(torch.sigmoid((weights[:, None, :] * logits).sum(0)), generator=generator)
    fusion = ev.fit_late_fusion(logits, targets, multilabel=True, per_class=True, epochs=60, lr=0.05)
    alpha = fusion.alpha.detach()
    assert alpha.shape == (2, 3)
    assert alpha[0, 0] > 3 and abs(alpha[1, 0]) < 0.7 and alpha[1, 2] > 3 and abs(alpha[0, 2]) < 0.7


# ---------------------------------------------------------------------------------------------- the linear probe
def test_linear_probe_keeps_backbone_weights_and_bn_statistics_fixed():
    backbone = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8))
    backbone.feature_dim = 8
    model = ev.Classifier(backbone, 3, frozen=True)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.train()
    assert not backbone.training and model.fc.training
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(model(torch.randn(16, 4) * 3 + 1), torch.randint(0, 3, (16,)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for k, v in backbone.state_dict().items():
        assert torch.equal(v, before[k]), k  # weights and BN running statistics untouched
    finetuned = ev.Classifier(backbone, 3, frozen=False)
    finetuned.train()
    assert backbone.training and all(p.requires_grad for p in backbone.parameters())


def test_skeleton_transform_crops_within_the_valid_length():
    """App. A.1 through the dataset's "length": test = 0.95 of the valid frames, centred; train = a random crop of
    at least `frames` frames; never the zero padding (300 stored frames, 80 valid)."""
    x = torch.zeros(3, 300, 25, 2)
    x[:, :80] = torch.arange(80, dtype=torch.float32).view(1, 80, 1, 1) + 1  # 80 valid frames, then zero padding
    centre = ev.skeleton_transform({"skeleton": x.clone(), "length": torch.tensor(80)}, False, 64, False)["skeleton"]
    assert centre.shape == (3, 64, 25, 2)
    # 0.95 * 80 = 76 frames starting at (80 - 76) // 2 = 2: values 3 .. 78 resampled to 64 steps
    assert centre[0, 0, 0, 0] == pytest.approx(3, abs=0.7) and centre[0, -1, 0, 0] == pytest.approx(78, abs=0.7)
    torch.manual_seed(0)
    for _ in range(20):
        crop = ev.skeleton_transform({"skeleton": x.clone(), "length": torch.tensor(80)}, True, 64, False)["skeleton"]
        assert crop.shape == (3, 64, 25, 2) and crop.min() >= 1  # never reaches into the zero padding
        assert torch.all(crop[0, 1:, 0, 0] >= crop[0, :-1, 0, 0])  # time order kept
        assert crop[0, -1, 0, 0] - crop[0, 0, 0, 0] >= 64 - 2  # at least `frames` source frames


def test_skelemotion_transform_is_the_image_of_the_centred_cropped_body_0():
    torch.manual_seed(0)
    x = torch.zeros(3, 60, 25, 2)
    x[:, :50] = torch.randn(3, 50, 25, 2)  # two bodies, 50 valid frames, then zero padding
    item = ev.skeleton_transform({"skeleton": x.clone(), "length": torch.tensor(50)}, train=False, frames=32,
                                 center=True, skelemotion=True)
    image = item["skeleton"]
    assert image.shape == (6, 32, 49)
    crop = common.temporal_crop_resize(common.center_on_spine(x)[None], torch.tensor([50]), 0.95, 33, max_ratio=0.95,
                                       centre=True)[0]  # frames + 1 poses
    assert torch.equal(image, common.skelemotion_image(crop[..., 0], "ntu25", tau=1)[:, :32])
    # every column, the last one included, is real motion of body 0: |p_t - p_{t+1}| of joint 20 (column 1)
    assert common.SKELEMOTION_ORDER["ntu25"][1] == 20
    motion = (crop[:, :32, 20, 0] - crop[:, 1:33, 20, 0]).norm(dim=0).clamp(0, 1)  # (32,)
    assert torch.allclose(image[3, :, 1], motion) and torch.equal(image[3], image[5])
    other = x.clone()
    other[:, :50, :, 1] = torch.randn(3, 50, 25)  # body 1 does not enter the image
    again = ev.skeleton_transform({"skeleton": other, "length": torch.tensor(50)}, train=False, frames=32,
                                  center=True, skelemotion=True)
    assert torch.equal(again["skeleton"], image)
    torch.manual_seed(1)
    train = ev.skeleton_transform({"skeleton": x.clone(), "length": torch.tensor(50)}, train=True, frames=32,
                                  center=True, skelemotion=True)
    assert train["skeleton"].shape == (6, 32, 49) and not torch.equal(train["skeleton"], image)


def test_skelemotion_transform_rejects_a_non_ntu_layout():
    with pytest.raises(RuntimeError, match=r"needs NTU-25 skeletons .* \(3, 300, 18, 2\)"):
        ev.skeleton_transform({"skeleton": torch.ones(3, 300, 18, 2), "length": torch.tensor(300)}, train=False,
                              frames=32, center=True, skelemotion=True)


# ---------------------------------------------------------------------------------------------- end to end (toy)
SMALL_BIGRU = '{"hidden": 32, "layers": 1}'
TINY3D_W4 = '{"width": 4}'  # counting a toy-ucfrep video runs ~150 clips through the backbone: keep it cheap


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 shared cores: intra-op threads only add contention here
    yield
    torch.set_num_threads(threads)


def run_evaluate(tmp_path, *argv):
    result = ev.main(["--workers", "0", "--out-dir", str(tmp_path), *argv])
    with open(tmp_path / "result.json") as f:
        saved = json.load(f)
    assert saved["metrics"] == pytest.approx(result["metrics"])
    assert (tmp_path / "result.txt").read_text().startswith("evaluate.py --task")
    return result


def test_finetune_toy_motion_selects_on_validation_and_saves_logits(tmp_path, one_thread, capsys):
    result = run_evaluate(tmp_path, "--task", "finetune", "--max-steps", "3", "--save-logits")
    out = capsys.readouterr().out
    assert "10% stratified validation split" in out and "2 uniformly spaced clips" in out
    assert result["sizes"] == {"train": 176, "val": 16, "test": 64}  # toy-motion: 8 classes x (24 train, 8 test)
    assert set(result["metrics"]) == {"top1", "top5", "mean_class_acc"}
    assert 0 <= result["metrics"]["top1"] <= 100
    assert result["selection"]["best_step"] == 3 and (tmp_path / "best.pth").exists()
    logits = torch.load(tmp_path / "logits.pth", weights_only=False)
    assert logits["train"]["logits"].shape == (176, 8) and logits["test"]["logits"].shape == (64, 8)


def test_select_on_test_uses_the_test_split(tmp_path, one_thread, capsys):
    result = run_evaluate(tmp_path, "--task", "linear", "--data", "toy-skeleton", "--arch", "bigru",
                          "--arch-options", SMALL_BIGRU, "--max-steps", "2", "--select-on-test")
    assert "selected on the TEST split" in capsys.readouterr().out
    assert result["sizes"]["val"] == 0 and result["sizes"]["train"] == 252  # toy-skeleton: 7 subjects x 12 x 3


def test_linear_skeleton_resumes_from_its_run_folder(tmp_path, one_thread):
    argv = ["--task", "linear", "--data", "toy-skeleton", "--arch", "bigru", "--arch-options", SMALL_BIGRU,
            "--epochs", "2"]
    first = run_evaluate(tmp_path, *argv)
    second = run_evaluate(tmp_path, *argv)
    assert second["metrics"] == pytest.approx(first["metrics"])
    assert second["selection"] == first["selection"]


def test_knn_and_clusters_toy_skeleton_with_concatenated_encoders(tmp_path, one_thread):
    knn = run_evaluate(tmp_path / "knn", "--task", "knn", "--data", "toy-skeleton", "--arch", "bigru",
                       "--arch-options", SMALL_BIGRU, "--concat", "agcn", "--concat-options", '{"hidden": 8}')
    assert set(knn["metrics"]) == {"nn1_acc", "knn200_acc", "R@1", "R@5", "R@10", "R@20", "R@50"}
    assert 0 < knn["metrics"]["knn200_acc"] <= 100 and "weighted 200-NN (T 0.1)" in knn["protocol"]
    assert knn["metrics"]["nn1_acc"] == knn["metrics"]["R@1"]
    values = [knn["metrics"][f"R@{k}"] for k in (1, 5, 10, 20, 50)]
    assert values == sorted(values)
    clusters = run_evaluate(tmp_path / "clusters", "--task", "clusters", "--data", "toy-skeleton", "--arch", "bigru",
                            "--arch-options", SMALL_BIGRU)
    assert clusters["assignments"] == "k-means (K=12)"
    assert 0 <= clusters["metrics"]["nmi"] <= 100 and clusters["metrics"]["entropy"] >= 0


def test_fewshot_repeats_over_seeds_with_stratified_budget(tmp_path, one_thread):
    result = run_evaluate(tmp_path, "--task", "fewshot", "--data", "toy-skeleton", "--arch", "bigru",
                          "--arch-options", SMALL_BIGRU, "--per-class", "3", "--seeds", "0", "1", "--max-steps", "1")
    assert result["sizes"] == {"train": 36, "val": 0, "test": 108}  # 3 x 12 classes, no selection split
    assert len(result["per_seed"]) == 2 and "top1_std" in result["metrics"]
    per_seed = [seed["top1"] for seed in result["per_seed"]]  # mean and population std over the seeds
    assert result["metrics"]["top1"] == pytest.approx(sum(per_seed) / 2)
    assert result["metrics"]["top1_std"] == pytest.approx(abs(per_seed[0] - per_seed[1]) / 2)
    assert (tmp_path / "seed_1" / "checkpoint.pth").exists()
    assert not (tmp_path / "seed_1" / "best.pth").exists()  # no selection: the last state is tested


def test_transfer_loads_our_backbone_file_and_rejects_a_wrong_arch(tmp_path, one_thread):
    backbone = common.build_backbone("bigru", hidden=32, layers=1)
    common.save_backbone(backbone, str(tmp_path / "backbone.pth"), {"arch": "bigru", "options": {"hidden": 32,
                                                                                                 "layers": 1}})
    result = run_evaluate(tmp_path / "run", "--task", "transfer", "--data", "toy-skeleton", "--weights",
                          str(tmp_path / "backbone.pth"), "--max-steps", "1")
    assert result["weights_source"].startswith(str(tmp_path / "backbone.pth"))
    with pytest.raises(ValueError, match="does not fit --arch agcn"):
        ev.main(["--task", "linear", "--data", "toy-skeleton", "--arch", "agcn", "--weights",
                 str(tmp_path / "backbone.pth"), "--out-dir", str(tmp_path / "bad"), "--workers", "0"])

def test_skelemotion_cnn_knn_linear_fewshot_and_transfer_on_toy_skeleton(tmp_path, one_thread, capsys):
    small = '{"hidden": 64}'
    knn = run_evaluate(tmp_path / "knn", "--task", "knn", "--data", "toy-skeleton", "--arch", "skelemotion_cnn",
                       "--arch-options", small)
    assert "SkeleMotion image (6, 32, 49)" in knn["protocol"] and "crops resampled to 33 frames" in knn["protocol"]
    assert knn["sizes"] == {"train": 252, "val": 0, "test": 108} and 0 < knn["metrics"]["nn1_acc"] <= 100
    linear = run_evaluate(tmp_path / "linear", "--task", "linear", "--data", "toy-skeleton", "--arch",
                          "skelemotion_cnn", "--arch-options", small, "--max-steps", "2")  # one selection at step 2
    assert set(linear["metrics"]) == {"top1", "top5", "mean_class_acc"} and linear["selection"]["best"] is not None
    fewshot = run_evaluate(tmp_path / "fewshot", "--task", "fewshot", "--data", "toy-skeleton", "--arch",
                           "skelemotion_cnn", "--arch-options", small, "--per-class", "3", "--max-steps", "1")
    assert fewshot["sizes"]["train"] == 36
    # transfer from our backbone.pth: arch and options (a 24-frame CNN) come from its meta, the crop follows them
    backbone = common.build_backbone("skelemotion_cnn", frames=24, hidden=64)
    common.save_backbone(backbone, str(tmp_path / "backbone.pth"),
                         {"arch": "skelemotion_cnn", "options": {"frames": 24, "hidden": 64}})
    transfer = run_evaluate(tmp_path / "transfer", "--task", "transfer", "--data", "toy-skeleton", "--weights",
                            str(tmp_path / "backbone.pth"), "--max-steps", "1")
    assert "SkeleMotion image (6, 24, 49)" in transfer["protocol"]
    loaded = str(tmp_path / "backbone.pth") + " (12 tensors loaded"  # 4 convs + 2 linears, weights and biases
    assert transfer["weights_source"].startswith(loaded)


def test_skelemotion_cnn_rejects_a_mismatching_frame_count_and_concat(tmp_path):
    argv = ["--task", "knn", "--data", "toy-skeleton", "--arch", "skelemotion_cnn", "--out-dir", str(tmp_path)]
    with pytest.raises(ValueError, match="expects SkeleMotion images of 32 frames .* --frames is 64"):
        ev.main(argv + ["--frames", "64"])
    with pytest.raises(ValueError, match="skelemotion_cnn takes SkeleMotion images"):
        ev.main(argv + ["--concat", "agcn"])



def test_arrow_of_time_scores_both_directions(tmp_path, one_thread):
    result = run_evaluate(tmp_path, "--task", "arrow-of-time", "--max-steps", "1", "--val-fraction", "0")
    assert result["num_classes"] == 2 and set(result["metrics"]) == {"top1", "mean_class_acc"}
    # every test video is scored forward and backward: balanced classes, so a constant guess scores 50 %
    assert 0 <= result["metrics"]["top1"] <= 100



def _frame_folder_set(root, frames=64):
    """videofolder layout of CoCLR-style frame folders (image_%05d.jpg), 2 classes x 2 videos of `frames` frames."""
    from PIL import Image
    for split in ("train", "val"):
        for c in ("a", "b"):
            for v in range(2):
                folder = root / split / c / f"{c}{v}"
                folder.mkdir(parents=True)
                for t in range(frames):
                    Image.fromarray(np.full((20, 24, 3), 4 * t, np.uint8)).save(folder / f"image_{t + 1:05d}.jpg")


def test_arrow_of_time_spreads_8_frames_over_the_whole_video(tmp_path):
    """App. B.2.4: 8 frames sampled linearly over the video (random offset in training), not 8 consecutive."""
    assert common.sample_spread_clip(100, 8).tolist() == [7, 19, 31, 43, 55, 67, 79, 91]  # stride 12, centred
    starts = {int(common.sample_spread_clip(100, 8, np.random.default_rng(s))[0]) for s in range(200)}
    assert starts == set(range(16))  # every offset that keeps the 85-frame span inside the video
    assert common.sample_spread_clip(5, 8).tolist() == list(range(8))  # short video: stride 1 (indices clamped later)
    _frame_folder_set(tmp_path / "set")
    args = ev.resolve_args(ev.get_parser().parse_args(["--task", "arrow-of-time", "--data", "videofolder",
                                                       "--data-root", str(tmp_path / "set"), "--arch", "tiny3d",
                                                       "--out-dir", str(tmp_path / "run")]))
    train = ev.build_split(args, "train", train=True, augment=False)[0]["frame_indices"]
    test = ev.build_split(args, "test", train=False)[0]["frame_indices"]
    assert torch.equal(torch.diff(train), torch.full((7,), 8)) and 0 <= int(train[0]) <= 7
    assert test.tolist() == [3, 11, 19, 27, 35, 43, 51, 59]
    assert "8 frames spread linearly over the whole video" in ev.describe_protocol(args, "random", {
        "train": 4, "val": 0, "test": 4}, 2)


def test_ties_are_broken_alike_by_top1_and_mean_class_accuracy():
    scores = torch.zeros(6, 10)  # a collapsed model: every class scores the same
    labels = torch.zeros(6, dtype=torch.long)
    metrics = ev.classification_metrics({"scores": scores, "labels": labels}, 10, multilabel=False)
    assert metrics["top1"] == metrics["mean_class_acc"] == 100.0  # both take the lowest index, as argmax does
    assert metrics["top5"] == 100.0


def test_nan_scores_and_features_are_errors_not_numbers():
    scores = torch.rand(4, 3)
    scores[2, 1] = float("nan")
    with pytest.raises(RuntimeError, match="1 of 4 score vectors contain NaN"):
        ev.classification_metrics({"scores": scores, "labels": torch.zeros(4, dtype=torch.long)}, 3, False)
    with pytest.raises(RuntimeError, match="NaN"):
        ev.check_finite(torch.tensor([[0.0, float("inf")]]), "query features")


def test_a_task_without_a_protocol_entry_is_refused_not_given_the_finetune_schedule(tmp_path):
    argv = ["--task", "linear", "--data", "gym288", "--out-dir", str(tmp_path / "run")]
    with pytest.raises(common.UserError, match=r"--task linear has no paper protocol for --data gym288 \(only ucf101"):
        ev.resolve_args(ev.get_parser().parse_args(argv))
    args = ev.resolve_args(ev.get_parser().parse_args([*argv, "--lr", "0.01", "--epochs", "30", "--batch-size", "64"]))
    assert (args.lr, args.epochs, args.batch_size, args.milestones, args.optimizer) == (0.01, 30, 64, [], "adam")
    hmdb = ev.resolve_args(ev.get_parser().parse_args(["--task", "linear", "--data", "hmdb51"]))
    assert (hmdb.lr, hmdb.epochs) == (1e-2, 100)  # an entry exists: the paper's values
    knn = ev.resolve_args(ev.get_parser().parse_args(["--task", "knn", "--data", "k400"]))
    assert (knn.frames, knn.test_clips) == (32, 10)  # feature tasks train nothing: no schedule needed
    with pytest.raises(common.UserError, match="--task finetune has no paper protocol for --data charades"):
        ev.resolve_args(ev.get_parser().parse_args(["--task", "finetune", "--data", "charades"]))


def test_ch2_fewshot_trains_only_the_head_and_the_last_block(tmp_path, one_thread):
    """Thesis Sec. 2.4.3: "we only train the fully connected layer and the last ResNet block for 100 epochs",
    SGD lr 0.1, momentum 0.9, wd 1e-3, batch 128."""
    args = ev.resolve_args(ev.get_parser().parse_args(["--task", "fewshot", "--protocol", "ch2", "--data",
                                                       "toy-motion", "--per-class", "20"]))
    assert (args.optimizer, args.lr, args.momentum, args.wd, args.batch_size, args.epochs, args.milestones) == (
        "sgd", 0.1, 0.9, 1e-3, 128, 100, [])
    torch.manual_seed(0)
    model = ev.Classifier(common.build_backbone("resnet3d_18", in_channels=1), 5, frozen=False,
                          trainable=ev.last_block("resnet3d_18")[1])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    model.train()
    loss = F.cross_entropy(model(torch.randn(2, 1, 8, 32, 32)), torch.tensor([0, 3]))
    loss.backward()
    optimizer.step()
    changed = {k.split(".")[1] if k.startswith("backbone.") else k.split(".")[0]
               for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {"layer4", "fc"}  # weights and BN statistics of the frozen blocks untouched
    for argv, message in ((["--task", "linear"], "use it with --task fewshot"),
                          (["--task", "severe"], "not --task severe"),
                          (["--task", "fewshot", "--arch", "s3d"], "s3d has none")):  # skeletons: all layers
        with pytest.raises(common.UserError, match=message):
            ev.main(["--protocol", "ch2", "--workers", "0", "--out-dir", str(tmp_path / "x"), *argv])
    assert not (tmp_path / "x").exists()
    result = run_evaluate(tmp_path / "toy", "--task", "fewshot", "--protocol", "ch2", "--per-class", "2",
                          "--batch-size", "8", "--max-steps", "1")
    assert "only the new linear head and the backbone's last block" in result["protocol"]
    assert "sgd lr 0.1" in result["protocol"] and "wd 0.001" in result["protocol"]

def write_toy_charades(root):
    """A Charades-layout copy of toy-motion: 8 motion classes plus 'straight' and 'periodic' group labels."""
    common.build_dataset("toy-motion", None, "train")
    names = common.TOY_MOTION_CLASSES
    groups = {"right": 8, "left": 8, "down": 8, "up": 8, "zigzag": 8, "circle_cw": 9, "circle_ccw": 9,
              "shake_vertical": 9}
    os.makedirs(root / "Charades_v1_480")
    (root / "Charades_v1_classes.txt").write_text("".join(f"c{i:03d} {n}\n" for i, n in
                                                          enumerate(names + ["straight", "periodic"])))
    for split, csv in (("train", "train"), ("val", "test")):
        lines = ["id,actions"]
        for label, name in enumerate(names):
            for k in range(6 if split == "train" else 3):
                vid = f"{split}{label}{k}"
                shutil.copy(os.path.join("data", "toy-motion", split, name, f"{name}_{k:04d}.mp4"),
                            root / "Charades_v1_480" / f"{vid}.mp4")
                lines.append(f"{vid},c{label:03d} 0.0 1.0;c{groups[name]:03d} 0.0 1.0")
        (root / f"Charades_v1_{csv}.csv").write_text("\n".join(lines) + "\n")


def test_multilabel_on_a_charades_layout(tmp_path, one_thread):
    write_toy_charades(tmp_path / "charades")
    result = run_evaluate(tmp_path / "run", "--task", "multilabel", "--data", "charades", "--data-root",
                          str(tmp_path / "charades"), "--arch", "tiny3d", "--frames", "8", "--test-clips", "2",
                          "--batch-size", "8", "--epochs", "1", "--max-steps", "2")
    assert set(result["metrics"]) == {"mAP"} and 0 < result["metrics"]["mAP"] <= 100
    assert result["sizes"]["test"] == 24


def test_fusion_task_learns_to_trust_the_informative_modality(tmp_path, one_thread):
    generator = torch.Generator().manual_seed(0)
    labels = {"train": torch.randint(0, 4, (400,), generator=generator),
              "test": torch.randint(0, 4, (200,), generator=generator)}
    for name, signal in (("good", 3.0), ("noise", 0.0)):
        os.makedirs(tmp_path / name)
        saved = {}
        for split, y in labels.items():
            logits = torch.randn(len(y), 4, generator=generator) + signal * torch.nn.functional.one_hot(y, 4)
            saved[split] = {"logits": logits, "labels": y}
        torch.save(saved, tmp_path / name / "logits.pth")
    result = run_evaluate(tmp_path / "fusion", "--task", "fusion", "--logits", str(tmp_path / "good" / "logits.pth"),
                          str(tmp_path / "noise" / "logits.pth"), "--lr", "0.05", "--epochs", "50")
    alpha = result["alpha"]
    assert alpha[0] > 2 * abs(alpha[1])
    assert result["metrics"]["top1_learned"] >= result["metrics"]["top1_sum"]


def test_severe_suite_on_toy_data_prints_our_row_beside_the_references(tmp_path, one_thread):
    # a width-4 tiny3d, 1 test clip, no validation split: cheaper; every column still trains, tests, is tabulated
    result = run_evaluate(tmp_path, "--task", "severe", "--severe-columns", "UCF (10^3)", "FX-S1", "UCF-RC",
                          "Charades", "--max-steps", "1", "--test-clips", "1", "--val-fraction", "0",
                          "--arch-options", TINY3D_W4)
    assert result["columns"] == ["UCF (10^3)", "FX-S1", "UCF-RC"]
    assert list(result["notes"]) == ["Charades"]
    table = result["table"]
    assert "this checkpoint" in table and "Tubelet-Contrast (K400)" in table
    assert (tmp_path / "FX-S1" / "result.json").exists() and (tmp_path / "UCF-10-3" / "seed_0").is_dir()
    with open(tmp_path / "UCF-RC" / "result.json") as f:
        column = json.load(f)
    assert column["data"] == "toy-ucfrep" and column["metrics"]["mae"] == pytest.approx(result["metrics"]["UCF-RC"])


def test_repcount_toy_end_to_end(tmp_path, one_thread, capsys):
    result = run_evaluate(tmp_path, "--task", "repcount", "--max-steps", "2", "--arch-options", TINY3D_W4)
    out = capsys.readouterr().out
    assert "--task repcount on toy-ucfrep" in out and "checkpoint with the lowest MAE" in out
    assert result["sizes"] == {"train": 41, "val": 7, "test": 16}  # toy-ucfrep: 48 train, 16 test videos
    assert result["primary"] == "mae" and set(result["metrics"]) >= {"mae", "obo", "mae_mean_count"}
    predicted, true = np.array(result["counts"]["predicted"]), np.array(result["counts"]["true"])
    assert len(predicted) == 16 and np.all(predicted > 0) and set(true) <= set(range(2, 9))
    assert result["metrics"] == pytest.approx({**result["metrics"], **ev.repetition_count_errors(predicted, true)})
    assert list(result["selection"]["scores"]) == ["2"]
    assert "inference: scale search" in (tmp_path / "result.txt").read_text()


@pytest.mark.slow
def test_two_cpu_processes_gather_every_test_sample_once(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, os.path.join(root, "evaluate.py"), "--task", "linear", "--data",
                          "toy-skeleton", "--arch", "bigru", "--arch-options", SMALL_BIGRU, "--max-steps", "2",
                          "--device", "cpu", "--gpus", "2", "--workers", "0", "--out-dir", str(tmp_path)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    with open(tmp_path / "result.json") as f:
        result = json.load(f)
    assert result["sizes"] == {"train": 228, "val": 24, "test": 108}
    # 108 test skeletons over 2 processes: accuracy is a multiple of 1/108 (no padded duplicate counted)
    correct = result["metrics"]["top1"] * 108 / 100
    assert abs(correct - round(correct)) < 1e-4


def test_clusters_use_checkpoint_prototypes_in_feature_space_else_kmeans(tmp_path, one_thread):
    backbone = common.build_backbone("bigru", hidden=32, layers=1)  # 64-d features
    state = dict(backbone.state_dict())
    torch.save({"state_dict": {**state, "prototypes.weight": torch.randn(5, 64)}}, tmp_path / "in_space.pth")
    torch.save({"state_dict": {**state, "prototypes.weight": torch.randn(5, 128)}}, tmp_path / "projected.pth")
    argv = ["--task", "clusters", "--data", "toy-skeleton", "--arch", "bigru", "--arch-options", SMALL_BIGRU]
    result = run_evaluate(tmp_path / "a", *argv, "--weights", str(tmp_path / "in_space.pth"))
    assert result["assignments"] == "prototypes"
    result = run_evaluate(tmp_path / "b", *argv, "--weights", str(tmp_path / "projected.pth"))
    assert result["assignments"] == "k-means (K=12)"
    with pytest.raises(ValueError, match="projection head"):
        ev.main(["--workers", "0", "--out-dir", str(tmp_path / "c"), *argv, "--weights",
                 str(tmp_path / "projected.pth"), "--cluster-source", "prototypes"])


def _two_bigru_files(folder):
    """Two backbone.pth files of one (pretraining) run folder, as a run with --keep-every leaves them."""
    folder.mkdir()
    for i, name in enumerate(("backbone.pth", "backbone_epoch10.pth")):
        torch.manual_seed(i)
        common.save_backbone(common.build_backbone("bigru", hidden=32, layers=1), str(folder / name),
                             {"arch": "bigru", "modality": "skeleton", "options": {"hidden": 32, "layers": 1}})
    return str(folder / "backbone.pth"), str(folder / "backbone_epoch10.pth")


def test_two_weight_files_of_one_folder_get_their_own_runs(tmp_path, one_thread, monkeypatch):
    """The default out-dir comes from the weights FILE: a second file of the same folder must not resume (and
    report) the first file's finished run."""
    first, second = _two_bigru_files(tmp_path / "pretrain")
    toy = os.path.abspath(os.path.join("data", "toy-skeleton"))  # the shared toy set: writing it again takes ~14 s
    monkeypatch.chdir(tmp_path)
    argv = ["--task", "linear", "--data", "toy-skeleton", "--data-root", toy, "--workers", "0", "--max-steps", "1",
            "--val-fraction", "0"]
    a = ev.main([*argv, "--weights", first])
    b = ev.main([*argv, "--weights", second])
    runs = sorted(os.listdir(tmp_path / "runs"))
    assert len(runs) == 2 and all(r.startswith("evaluate-linear-toy-skeleton-pretrain-backbone") for r in runs)
    for run in runs:
        with open(tmp_path / "runs" / run / "result.json") as f:
            saved = json.load(f)
        with open(tmp_path / "runs" / run / "identity.json") as f:
            assert json.load(f)["weights"]["path"] == os.path.abspath(saved["weights"])
    assert a["weights_source"].startswith(first) and b["weights_source"].startswith(second)
    assert a["metrics"] != b["metrics"]  # different weights, different numbers (each run trained its own head)


def test_a_run_folder_of_another_evaluation_is_refused(tmp_path, one_thread):
    first, second = _two_bigru_files(tmp_path / "pretrain")
    argv = ["--task", "knn", "--data", "toy-skeleton", "--workers", "0", "--out-dir", str(tmp_path / "run")]
    ev.main([*argv, "--weights", first])
    before = (tmp_path / "run" / "result.json").read_text()
    with pytest.raises(common.UserError, match=r"holds another evaluation.*backbone_epoch10\.pth.*--resume none"):
        ev.main([*argv, "--weights", second])
    with pytest.raises(common.UserError, match="holds another evaluation.*'task'"):
        ev.main([*argv[:1], "linear", *argv[2:], "--weights", first])
    assert (tmp_path / "run" / "result.json").read_text() == before  # refused before anything was written
    torch.save(torch.load(second, weights_only=True), first)  # same path, other content: another evaluation
    with pytest.raises(common.UserError, match="sha256"):
        ev.main([*argv, "--weights", first])
    ev.main([*argv, "--weights", first, "--resume", "none"])  # explicitly afresh: allowed, identity rewritten
    ev.main([*argv, "--weights", first])
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "checkpoint.pth").write_bytes(b"")  # a run folder from before identity.json existed
    with pytest.raises(common.UserError, match="without identity.json"):
        ev.main([*argv[:-1], str(tmp_path / "old"), "--weights", first])


def test_encoder_data_and_weights_modalities_must_agree(tmp_path):
    torch.manual_seed(0)
    video = tmp_path / "video.pth"
    common.save_backbone(common.build_backbone("tiny3d"), str(video), {"arch": "tiny3d", "modality": "rgb"})
    out = tmp_path / "run"
    cases = [(["--data", "toy-skeleton", "--arch", "tiny3d"], "--arch tiny3d is a video encoder but --data "
              "toy-skeleton is skeleton data"),
             (["--data", "toy-skeleton", "--weights", str(video)], "--arch tiny3d is a video encoder"),
             (["--data", "toy-motion", "--arch", "bigru"], "--arch bigru is a skeleton encoder but --data toy-motion"),
             (["--data", "toy-skeleton", "--arch", "bigru", "--weights", str(video)],
              "pretrained on rgb .* toy-skeleton is skeleton data")]
    for argv, message in cases:
        with pytest.raises(common.UserError, match=message):
            ev.main(["--task", "linear", "--workers", "0", "--out-dir", str(out), *argv])
    assert not out.exists()


def test_severe_loads_tclr_as_released_and_says_so(tmp_path):
    """--task severe builds every column's encoder with load_encoder: a released TCLR file (dilated layer4.0.conv1.0
    under module.0.) loads into r2plus1d_18 and the weights line of the protocol says which variant was built."""
    tclr = common.build_backbone("r2plus1d_18")
    torch.nn.init.normal_(tclr.stem[0].weight)
    assert common._tclr_layer4(tclr, {"layer4.0.conv1.0.weight": torch.zeros(512, 256, 3, 3, 3),
                                      "layer3.0.conv1.0.3.weight": torch.zeros(1)})
    torch.save({"state_dict": {"module.0." + k: v for k, v in tclr.state_dict().items()}}, tmp_path / "tclr.pth")
    backbone, source = ev.load_encoder("r2plus1d_18", {}, str(tmp_path / "tclr.pth"))
    assert "TCLR's dilated layer4.0.conv1.0 built as released" in source and "prefix 'module.0.'" in source
    assert torch.equal(backbone.stem[0].weight, tclr.stem[0].weight)
    assert backbone.layer4[0].conv1[0].dilation == (2, 1, 1)

def test_unreadable_weights_are_one_line_errors_naming_the_file(tmp_path):
    (tmp_path / "truncated.pth").write_bytes(b"PK\x03\x04 half a zip")
    argv = ["--task", "knn", "--data", "toy-skeleton", "--arch", "bigru", "--workers", "0"]
    with pytest.raises(common.UserError, match=r"--weights .*truncated\.pth: expected a PyTorch checkpoint"):
        ev.main([*argv, "--out-dir", str(tmp_path / "a"), "--weights", str(tmp_path / "truncated.pth")])
    with pytest.raises(common.UserError, match="expected a checkpoint file, found a folder"):
        ev.main([*argv, "--out-dir", str(tmp_path / "b"), "--weights", str(tmp_path)])
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # refused before anything was written


@pytest.mark.slow
@pytest.mark.script_run("skeleton_contrast.py", "--seed", 0)  # shared with test_skeleton_contrast.py
def test_linear_probe_and_knn_on_a_skeleton_contrast_backbone_beat_random_init(tmp_path, script_run):
    """LEARNING TEST: skeleton_contrast.py's toy default (intra-skeleton MoCo, small BiGRU, 420 steps) then
    evaluate.py's linear probe and 1-NN on its backbone.pth against the same encoder at random initialisation.
    Measured (seed 0, 108 val sequences): linear 74.1 vs 48.1, 1-NN 82.4 vs 76.9."""
    weights = str(script_run[0] / "backbone.pth")
    options = json.dumps(torch.load(weights, weights_only=False)["meta"]["options"])
    scores = {}
    for name, w in (("pretrained", weights), ("random", "none")):
        for task, metric in (("linear", "top1"), ("knn", "nn1_acc")):
            result = ev.main(["--task", task, "--data", "toy-skeleton", "--arch", "bigru", "--arch-options", options,
                              "--weights", w, "--workers", "0", "--out-dir", str(tmp_path / f"{task}-{name}")])
            scores[task, name] = result["metrics"][metric]
    print(scores)
    assert scores["linear", "pretrained"] >= scores["linear", "random"] + 5
    assert scores["knn", "pretrained"] > scores["knn", "random"]
