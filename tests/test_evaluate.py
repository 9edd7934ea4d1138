"""evaluate.py: metrics against hand-computed values, subsets, fusion, k-means; end-to-end tasks on toy data."""
import itertools
import math

import numpy as np
import pytest
import torch

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
def test_per_class_subset_quota_is_stratified_and_reproducible():
    labels = np.repeat(np.arange(101), [5 + (c % 13) for c in range(101)])
    quota = math.ceil(1000 / 101)  # SEVERE UCF (10^3): 10 per class
    subset = ev.per_class_subset(labels, per_class=quota, seed=3)
    counts = np.bincount(labels[subset], minlength=101)
    np.testing.assert_array_equal(counts, np.minimum(np.bincount(labels), quota))
    np.testing.assert_array_equal(subset, ev.per_class_subset(labels, per_class=quota, seed=3))
    assert not np.array_equal(subset, ev.per_class_subset(labels, per_class=quota, seed=4))
    assert np.all(np.diff(subset) > 0)


def test_per_class_subset_fraction_is_stratified():
    labels = np.repeat([0, 1, 2], [100, 50, 3])
    subset = ev.per_class_subset(labels, fraction=0.2, seed=0)
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
