"""Backbones and checkpoint interchange (issue 4): shapes, parameter counts, GRU semantics, SkeleMotion, layouts."""
import functools
import math
import re

import numpy as np
import pytest
import torch

import common

torch.set_num_threads(1)


@functools.lru_cache(maxsize=None)
def built(arch, **options):
    torch.manual_seed(0)
    return common.build_backbone(arch, **options).eval()


def n_params(model):
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------- parameter counts
@pytest.mark.parametrize("arch, expected", [
    ("r2plus1d_18", 31_300_125),  # torchvision: 31,505,325 minus the 400-way fc
    ("r3d_18", 33_166_272),
    ("s3d", 7_910_048),
    ("agcn", 3_454_090),  # includes PA (3 x 25 x 25 per unit) and data_bn, excludes fc
    ("bigru", 44_998_656),
    ("skelemotion_cnn", 1_351_152),  # P-HLVC supp. Listing 1
    ("hcn", 1_043_840 - (4096 * 128 + 128)),  # skeleton-contrast HCN with fc(4096->128) minus that fc
])
def test_parameter_counts_match_documented(arch, expected):
    assert n_params(built(arch)) == expected


def test_tiny3d_is_small():
    assert 100_000 < n_params(built("tiny3d")) < 300_000


# ---------------------------------------------------------------------------------------------- video shapes
VIDEO_MAPS = {  # arch -> (feature_dim, map shape for 1x3x8x32x32)
    "r2plus1d_18": (512, (512, 1, 2, 2)), "r3d_18": (512, (512, 1, 2, 2)),
    "mc3_18": (512, (512, 8, 2, 2)),  # 2D convs after layer1: no temporal stride
    "s3d": (1024, (1024, 1, 1, 1)), "i3d": (1024, (1024, 1, 1, 1)), "r2d3d_18": (256, (256, 2, 1, 1)),
    "resnet3d_18": (512, (512, 1, 1, 1)), "resnext3d_101": (2048, (2048, 1, 1, 1)), "tiny3d": (128, (128, 2, 2, 2)),
}


@pytest.mark.parametrize("arch", sorted(VIDEO_MAPS))
def test_video_backbone_shapes(arch):
    dim, map_shape = VIDEO_MAPS[arch]
    model = built(arch)
    x = torch.randn(1, 3, 8, 32, 32)
    with torch.no_grad():
        feat, fmap = model(x), model(x, return_map=True)
    assert model.feature_dim == dim
    assert feat.shape == (1, dim)
    assert fmap.shape == (1,) + map_shape
    assert torch.allclose(feat, fmap.mean(dim=(2, 3, 4)), atol=1e-5)


def test_tiny3d_input_sizes_and_channels():
    model = built("tiny3d")
    with torch.no_grad():
        assert model(torch.randn(2, 3, 16, 64, 64), return_map=True).shape == (2, 128, 4, 4, 4)
        assert model(torch.randn(1, 3, 16, 112, 112), return_map=True).shape == (1, 128, 4, 7, 7)
    depth = common.build_backbone("tiny3d", in_channels=1, width=4)
    assert depth(torch.randn(1, 1, 8, 32, 32)).shape == (1, 32)


def test_resnet3d_18_one_channel_input():
    model = common.build_backbone("resnet3d_18", in_channels=1).eval()
    assert model.conv1.weight.shape == (64, 1, 7, 7, 7)
    with torch.no_grad():
        assert model(torch.randn(1, 1, 8, 32, 32)).shape == (1, 512)


def test_block3d_basic_and_resnext_bottleneck_match_hand_composition():
    """Block3D is Hara et al.'s basic block (resnet3d_18, r2d3d_18 with 1x3x3 kernels) and ResNeXt bottleneck
    (resnext3d_101): conv-BN-ReLU chains plus the shortcut, then ReLU (none after r2d3d_18's last block)."""
    relu = torch.nn.functional.relu
    torch.manual_seed(0)
    x = torch.randn(2, 8, 4, 6, 6)
    b = common.Block3D(8, 8, kernel=(1, 3, 3)).eval()
    for bn in (b.bn1, b.bn2):  # non-trivial running statistics
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2)
    with torch.no_grad():
        assert torch.allclose(b(x), relu(b.bn2(b.conv2(relu(b.bn1(b.conv1(x))))) + x), atol=1e-6)
        assert b.conv1.kernel_size == (1, 3, 3) and b.conv1.padding == (0, 1, 1)
        down = torch.nn.Sequential(torch.nn.Conv3d(8, 64, 1, (1, 2, 2), bias=False), torch.nn.BatchNorm3d(64)).eval()
        n = common.Block3D(8, 32, (1, 2, 2), down, cardinality=32).eval()
        residual = n.bn3(n.conv3(relu(n.bn2(n.conv2(relu(n.bn1(n.conv1(x))))))))  # (2, 64, 4, 3, 3)
        assert n.conv2.groups == 32 and n.conv2.out_channels == 32  # cardinality * planes / 32
        assert torch.allclose(n(x), relu(residual + down(x)), atol=1e-6)
        n.final_relu = False
        assert torch.allclose(n(x), residual + down(x), atol=1e-6)


def test_s3d_runs_at_32x128x128():
    model = built("s3d")
    with torch.no_grad():
        fmap = model(torch.randn(1, 3, 32, 128, 128), return_map=True)
    assert fmap.shape == (1, 1024, 4, 4, 4)


def test_bn_eps_option():
    model = common.build_backbone("r2plus1d_18", bn_eps=1e-3)
    eps = {m.eps for m in model.modules() if isinstance(m, torch.nn.BatchNorm3d)}
    assert eps == {1e-3}


def test_video_resnet_matches_torchvision_forward():
    import torchvision
    torch.manual_seed(1)
    tv = torchvision.models.video.r3d_18().eval()
    ours = common.build_backbone("r3d_18").eval()
    report = common.load_backbone_weights(ours, tv.state_dict())
    assert report["skipped"] == ["fc.bias", "fc.weight"] and report["unexpected"] == []
    x = torch.randn(1, 3, 8, 32, 32)
    with torch.no_grad():
        tv.fc = torch.nn.Identity()
        assert torch.allclose(ours(x), tv(x), atol=1e-5)


def test_pretrained_kinetics_offline_error_names_the_local_file(monkeypatch):
    from torchvision.models import _api

    def offline(*args, **kwargs):
        raise OSError("no network")
    monkeypatch.setattr(_api, "load_state_dict_from_url", offline)
    with pytest.raises(RuntimeError, match=r"r2plus1d_18-91a641e6\.pth.*pretrained="):
        common.build_backbone("r2plus1d_18", pretrained="kinetics400")
    with pytest.raises(ValueError, match="no torchvision Kinetics-400 weights"):
        common.build_backbone("tiny3d", pretrained="kinetics400")


# ---------------------------------------------------------------------------------------------- skeleton
def test_skeleton_backbone_shapes():
    x = torch.randn(2, 3, 16, 25, 2)
    cases = {
        "bigru": (dict(hidden=16, layers=2), 32),
        "hcn": (dict(hidden=8, window_size=16), 4 * 8 * 1 * 1),
        "agcn": (dict(hidden=8), 32),
        "stgcn": (dict(hidden=8), 32),
    }
    for arch, (opts, dim) in cases.items():
        model = common.build_backbone(arch, **opts).eval()
        with torch.no_grad():
            assert model(x).shape == (2, dim) and model.feature_dim == dim, arch
    hcn = built("hcn")
    with torch.no_grad():
        assert hcn(torch.randn(1, 3, 64, 25, 2)).shape == (1, 4096)
        assert hcn(torch.randn(1, 3, 64, 25, 2), return_map=True).shape == (1, 256, 4, 4)


def test_full_size_graph_nets_and_coco18_layout():
    with torch.no_grad():
        agcn = built("agcn")
        assert agcn(torch.randn(1, 3, 16, 25, 2)).shape == (1, 256)
        assert agcn(torch.randn(1, 3, 16, 25, 2), return_map=True).shape == (1, 2, 256, 4, 25)
        stgcn = common.build_backbone("stgcn", num_joints=18, layout="coco18", hidden=8).eval()
        assert stgcn(torch.randn(1, 3, 16, 18, 2)).shape == (1, 32)
        agcn18 = common.build_backbone("agcn", num_joints=18, layout="coco18", hidden=8).eval()
        assert agcn18(torch.randn(1, 3, 16, 18, 2)).shape == (1, 32)


@pytest.mark.parametrize("layout, v", [("ntu25", 25), ("coco18", 18)])
def test_graph_adjacencies(layout, v):
    a = common.agcn_adjacency(layout)
    assert a.shape == (3, v, v)
    assert np.array_equal(a[0], np.eye(v))
    for k in (1, 2):  # column-normalised: each column sums to 1 or (no edge) 0
        assert set(np.round(a[k].sum(0), 6)) <= {0.0, 1.0}
    assert a[1].sum() == pytest.approx(v - 1)  # every joint but the root has one inward edge (column sum 1)
    s = common.stgcn_adjacency(layout)
    assert s.shape == (3, v, v)
    assert np.allclose(s.sum(0).sum(0), 1.0)  # the 3 partitions split the normalised neighbourhood (self included)
    assert np.count_nonzero(s[0]) == v and np.count_nonzero(s[0] - np.diag(np.diag(s[0]))) == 0


def test_stgcn_partition_hand_checked_ntu():
    s = common.stgcn_adjacency("ntu25")
    # centre = joint 21 (index 20, spine shoulder); its neighbours 1, 2, 4, 8 (0-based) have 2 edges each...
    # column i = receiving joint i: A[j, i] for neighbour j. Joint 1 (spine mid, neighbours 0 and 20):
    # degree 3 with self -> 1/3 each; neighbour 20 (the centre, distance 0 < 1) is "nearer" -> partition 2;
    # neighbour 0 (base of spine, 2 hops from centre -> inf in st-gcn) is "farther" -> partition 1.
    assert s[0, 1, 1] == pytest.approx(1 / 3)
    assert s[2, 20, 1] == pytest.approx(1 / 3) and s[1, 20, 1] == 0
    assert s[1, 0, 1] == pytest.approx(1 / 3) and s[2, 0, 1] == 0
    # a hand joint far from the centre: 7 (hand) and 6 (wrist) are both inf away -> same partition 1
    assert s[1, 6, 7] > 0 and s[1, 7, 6] > 0 and s[2, 6, 7] == 0


def test_skeleton_to_sequence_order():
    x = torch.arange(2 * 3 * 4 * 5 * 2, dtype=torch.float32).view(2, 3, 4, 5, 2)  # N C T V M
    seq = common.skeleton_to_sequence(x)
    assert seq.shape == (2, 4, 30)
    n, c, t, v, m = 1, 2, 3, 4, 1
    assert seq[n, t, v * 3 * 2 + c * 2 + m] == x[n, c, t, v, m]  # joint-major, then xyz, then person


def _gru_cell(x, h, w_ih, w_hh, b_ih, b_hh):
    gi, gh = x @ w_ih.T + b_ih, h @ w_hh.T + b_hh
    r = torch.sigmoid(gi[:, :gi.shape[1] // 3] + gh[:, :gh.shape[1] // 3])
    z = torch.sigmoid(gi[:, gi.shape[1] // 3:2 * gi.shape[1] // 3] + gh[:, gh.shape[1] // 3:2 * gh.shape[1] // 3])
    n = torch.tanh(gi[:, 2 * gi.shape[1] // 3:] + r * gh[:, 2 * gh.shape[1] // 3:])
    return (1 - z) * n + z * h


def _hand_gru(gru, x, reverse_backward):
    """Stacked bidirectional GRU by hand; reverse_backward=False = both directions in forward time order."""
    layer_in = x
    for layer in range(gru.num_layers):
        outs = []
        for sfx, rev in (("", False), ("_reverse", reverse_backward)):
            w = [getattr(gru, f"{n}_l{layer}{sfx}") for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
            h = torch.zeros(x.shape[0], gru.hidden_size)
            steps = range(x.shape[1] - 1, -1, -1) if rev else range(x.shape[1])
            out = [None] * x.shape[1]
            for t in steps:
                h = _gru_cell(layer_in[:, t], h, *w)
                out[t] = h
            outs.append(torch.stack(out, 1))
        layer_in = torch.cat(outs, dim=2)
    return layer_in  # (N, T, 2H)


def test_bigru_stepwise_equals_hand_loop_and_differs_from_true_bigru():
    torch.manual_seed(0)
    true = common.build_backbone("bigru", input_dim=6, hidden=8, layers=2).eval()
    step = common.build_backbone("bigru", input_dim=6, hidden=8, layers=2, stepwise=True).eval()
    step.load_state_dict(true.state_dict())
    x = torch.randn(3, 7, 6)
    with torch.no_grad():
        f_true, f_step = true(x), step(x)
        causal = _hand_gru(true.gru, x, reverse_backward=False)
        bidir = _hand_gru(true.gru, x, reverse_backward=True)
    assert torch.allclose(f_step, causal[:, -1], atol=1e-5)
    assert torch.allclose(f_true, torch.cat([bidir[:, -1, :8], bidir[:, 0, 8:]], 1), atol=1e-5)
    assert (f_true - f_step).abs().max() > 1e-2
    one_true = common.build_backbone("bigru", input_dim=6, hidden=8, layers=1).eval()
    one_step = common.build_backbone("bigru", input_dim=6, hidden=8, layers=1, stepwise=True).eval()
    one_step.load_state_dict(one_true.state_dict())
    with torch.no_grad():
        a, b = one_true(x), one_step(x)
    assert torch.allclose(a[:, :8], b[:, :8], atol=1e-5)  # 1 layer: the forward direction is the same GRU
    assert (a[:, 8:] - b[:, 8:]).abs().max() > 1e-2  # ... the backward one is not
    assert true(torch.randn(2, 3, 7, 1, 2)).shape == (2, 16)  # (N, C, T, V, M) input, V*C*M = 6


def test_bigru_stepwise_all_steps_match_hand_loop():
    torch.manual_seed(0)
    step = common.build_backbone("bigru", input_dim=4, hidden=5, layers=3, stepwise=True).eval()
    x = torch.randn(2, 6, 4)
    with torch.no_grad():
        assert torch.allclose(step(x, return_map=True), _hand_gru(step.gru, x, reverse_backward=False), atol=1e-5)


# ---------------------------------------------------------------------------------------------- SkeleMotion
def test_skelemotion_cnn_listing1_shapes():
    model = built("skelemotion_cnn")
    shapes = []
    layers = [model.conv1, model.conv2, model.maxpool2, model.conv3, model.maxpool3, model.conv4, model.maxpool4]
    hooks = [m.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape[1:]))) for m in layers]
    with torch.no_grad():
        out = model(torch.randn(2, 6, 32, 49))
    for h in hooks:
        h.remove()
    # P-HLVC supp. Listing 1 (batch dimension dropped)
    assert shapes == [(16, 30, 47), (32, 28, 45), (32, 26, 43), (32, 24, 39), (32, 11, 19), (64, 9, 17),
                      (64, 4, 8)]
    assert model.linear1.in_features == 2048 and out.shape == (2, 512)
    assert common.build_backbone("skelemotion_cnn", frames=30).linear1.in_features == 1536


def test_skelemotion_orders():
    assert len(common.SKELEMOTION_ORDER["ntu25"]) == 49 and set(common.SKELEMOTION_ORDER["ntu25"]) == set(range(25))
    # P-HLVC supp. Sec. 7.5 order: 49 entries over the body joints 0-13 (eyes and ears 14-17 are not used)
    assert len(common.SKELEMOTION_ORDER["coco18"]) == 49 and set(common.SKELEMOTION_ORDER["coco18"]) == set(range(14))


def test_skelemotion_image_hand_computed():
    pose = torch.zeros(3, 4, 25)  # C, T, V
    pose[:, :, :] = 0.5  # body present in every frame, static
    pose[:, 1, 20] = torch.tensor([0.5 - 0.3, 0.5 - 0.4, 0.5])  # joint 20 moves at frame 1 -> 2 ... d_0 = p0 - p1
    img = common.skelemotion_image(pose, "ntu25")
    assert img.shape == (6, 4, 49)
    col = common.SKELEMOTION_ORDER["ntu25"].index(20)  # first position of joint 20 in the chain
    # d_0 = p_0 - p_1 = (0.3, 0.4, 0): magnitude 0.5
    assert img[3:, 0, col].tolist() == pytest.approx([0.5] * 3)
    expect = [(math.degrees(math.atan2(0.4, 0.3)) + 180) / 360, (math.degrees(math.atan2(0.4, 0.0)) + 180) / 360,
              (math.degrees(math.atan2(0.0, 0.3)) + 180) / 360]
    assert img[:3, 0, col].tolist() == pytest.approx(expect, abs=1e-6)
    # d_1 = p_1 - p_2 = (-0.3, -0.4, 0)
    assert img[3, 1, col].item() == pytest.approx(0.5)
    assert img[0, 1, col].item() == pytest.approx((math.degrees(math.atan2(-0.4, -0.3)) + 180) / 360)
    # static joints and the last frame (no t + tau): magnitude 0, orientation 1.1
    assert torch.all(img[3:, 3] == 0) and torch.all(img[:3, 3] == 1.1)
    assert img[0, 0, common.SKELEMOTION_ORDER["ntu25"].index(0)].item() == pytest.approx(1.1)
    # joint 20 appears 4 times in the chain: all copies equal
    cols = [i for i, j in enumerate(common.SKELEMOTION_ORDER["ntu25"]) if j == 20]
    assert len(cols) == 4 and torch.all(img[:, :, cols] == img[:, :, cols[:1]])


def test_skelemotion_image_absent_body_and_2d_coco():
    pose = torch.rand(2, 5, 18) + 0.1  # OpenPose x, y; z = 0
    pose[:, 2] = 0  # body missing in frame 2
    img = common.skelemotion_image(pose, "coco18")
    assert img.shape == (6, 5, 49)
    assert torch.all(img[3:, 1] == 0) and torch.all(img[3:, 2] == 0)  # d_1 and d_2 touch the missing frame
    assert torch.all(img[:3, 1] == 1.1) and torch.all(img[:3, 2] == 0)  # ImgType: absent frame left at zero
    assert torch.all(img[3:, 0] > 0)
    assert torch.all((img[:3] >= 0) & (img[:3] <= 1.1))


# ---------------------------------------------------------------------------------------------- checkpoints
def _tiny():
    torch.manual_seed(0)
    return common.build_backbone("tiny3d", width=4)


def _randomised(model):
    torch.manual_seed(123)
    return {k: torch.randn_like(v) if v.is_floating_point() else v + 7 for k, v in model.state_dict().items()}


def _assert_loaded(model, reference):
    for k, v in model.state_dict().items():
        assert torch.equal(v, reference[k]), k


@pytest.mark.parametrize("prefix", ["", "module.", "encoder_q.", "encoder.", "backbone.", "model.",
                                    "module.encoder_q.", "encoder_q.0."])
def test_prefixes_round_trip(prefix):
    src = _randomised(_tiny())
    model = _tiny()
    report = common.load_backbone_weights(model, {prefix + k: v for k, v in src.items()})
    _assert_loaded(model, src)
    assert report["prefix"] == prefix and report["missing"] == [] and len(report["loaded"]) == len(src)


def test_our_backbone_pth_and_checkpoint_pth(tmp_path):
    a = _tiny()
    a.load_state_dict(_randomised(a))
    path = tmp_path / "backbone.pth"
    common.save_backbone(a, str(path), meta={"epoch": 3})
    saved = torch.load(path, weights_only=True)
    assert saved["meta"]["arch"] == "tiny3d" and saved["meta"]["epoch"] == 3
    b = common.build_backbone("tiny3d", width=4, pretrained=str(path))
    _assert_loaded(b, a.state_dict())
    ckpt = tmp_path / "checkpoint.pth"
    torch.save({"model": {"backbone." + k: v for k, v in a.state_dict().items()} | {"head.weight": torch.ones(2)},
                "optimizer": {}, "epoch": 3}, ckpt)
    c = _tiny()
    report = common.load_backbone_weights(c, str(ckpt))
    _assert_loaded(c, a.state_dict())
    assert report["skipped"] == ["head.weight"]


def test_backbone_state_dict_unwraps_wrappers():
    model = _tiny()
    wrapper = torch.nn.Module()
    wrapper.module = model
    assert list(common.backbone_state_dict(wrapper)) == list(model.state_dict())


def test_moco_layout_takes_query_encoder_and_drops_head_and_queue():
    q, k = _randomised(_tiny()), {n: v * 0 for n, v in _tiny().state_dict().items()}
    state = {"module.encoder_q." + n: v for n, v in q.items()} | {"module.encoder_k." + n: v for n, v in k.items()}
    state |= {"module.encoder_q.fc.0.weight": torch.ones(4, 32), "module.encoder_q.fc.2.weight": torch.ones(2, 4),
              "module.encoder_k.fc.0.weight": torch.ones(4, 32), "module.queue": torch.ones(2, 8),
              "module.queue_ptr": torch.zeros(1)}
    model = _tiny()
    report = common.load_backbone_weights(model, {"state_dict": state, "arch": "tiny3d"})
    _assert_loaded(model, q)
    assert report["prefix"] == "module.encoder_q." and report["unexpected"] == []
    assert "module.encoder_q.fc.0.weight" in report["skipped"] and "module.queue" in report["skipped"]


def test_missing_backbone_keys_are_refused():
    src = _randomised(_tiny())
    del src["features.2.0.weight"]
    with pytest.raises(ValueError, match=r"missing.*features\.2\.0\.weight"):
        common.load_backbone_weights(_tiny(), {"encoder_q." + k: v for k, v in src.items()})
    with pytest.raises(ValueError, match="missing"):
        common.load_backbone_weights(_tiny(), {"fc.weight": torch.ones(3)})
    bad = _randomised(_tiny())
    bad["features.0.1.weight"] = torch.ones(5)
    with pytest.raises(ValueError, match="shape mismatch"):
        common.load_backbone_weights(_tiny(), bad)


def test_missing_num_batches_tracked_is_tolerated():
    src = {k: v for k, v in _randomised(_tiny()).items() if not k.endswith("num_batches_tracked")}
    model = _tiny()
    report = common.load_backbone_weights(model, src)
    assert report["missing"] and all(k.endswith("num_batches_tracked") for k in report["missing"])


def _to_ctp(key):
    """torchvision R(2+1)D/R3D name -> CtP/tubelet-contrast name (written independently of common.CTP_RENAMES)."""
    for a, b in [("stem.0.", "stem.conv_s."), ("stem.1.", "stem.bn_s."), ("stem.3.", "stem.conv_t."),
                 ("stem.4.", "stem.bn_t.")]:
        if key.startswith(a):
            return b + key[len(a):]
    m = re.match(r"(layer\d\.\d)\.(conv\d)\.(0\.0|0\.1|0\.3|1)\.(.*)", key)
    if m:
        part = {"0.0": m[2] + ".conv_s", "0.1": m[2] + ".bn_s", "0.3": m[2] + ".conv_t", "1": "bn" + m[2][-1]}[m[3]]
        return f"{m[1]}.{part}.{m[4]}"
    return key.replace("downsample.0.", "downsample.conv.").replace("downsample.1.", "downsample_bn.")


def _to_ctp_r3d(key):
    key = key.replace("stem.0.", "stem.conv.").replace("stem.1.", "stem.bn.")
    m = re.match(r"(layer\d\.\d)\.(conv\d)\.(0|1)\.(.*)", key)
    if m:
        return f"{m[1]}.{m[2] + '.conv' if m[3] == '0' else 'bn' + m[2][-1]}.{m[4]}"
    return key.replace("downsample.0.", "downsample.conv.").replace("downsample.1.", "downsample_bn.")


@pytest.mark.parametrize("arch, to_ctp", [("r2plus1d_18", _to_ctp), ("r3d_18", _to_ctp_r3d)])
def test_ctp_tubelet_contrast_layout(arch, to_ctp):
    ref = built(arch)
    src = {k: v + 1 if v.is_floating_point() else v for k, v in ref.state_dict().items()}
    state = {"backbone." + to_ctp(k): v for k, v in src.items()}
    assert "backbone.layer2.0.downsample_bn.weight" in state
    state |= {"cls_head.fc.weight": torch.ones(2), "backbone_k.stem.conv.weight": torch.ones(1)}
    model = common.build_backbone(arch)
    report = common.load_backbone_weights(model, {"state_dict": state, "meta": {}})
    _assert_loaded(model, src)
    assert report["unexpected"] == [] and report["missing"] == []


def _to_coclr(key):
    """torchvision S3D name (features.*) -> CoCLR/ViCC s3dg.py name (base.*)."""
    m = re.match(r"features\.(\d+)\.(.*)", key)
    i, rest = m[1], m[2]
    sep = {"0.0.": "conv_s.", "0.1.": "bn_s.", "1.0.": "conv_t.", "1.1.": "bn_t."}
    if i in ("0", "3"):
        return f"base.{i}.{sep[rest[:4]]}{rest[4:]}"
    if i == "2":
        return f"base.2.{'conv.' if rest.startswith('0.') else 'bn.'}{rest[2:]}"
    b = re.match(r"(branch\d)\.(.*)", rest)
    branch, rest = b[1], b[2]
    if branch == "branch0":
        return f"base.{i}.branch0.0.{'conv.' if rest.startswith('0.') else 'bn.'}{rest[2:]}"
    if branch == "branch3":
        return f"base.{i}.branch3.1.{'conv.' if rest.startswith('1.0.') else 'bn.'}{rest[4:]}"
    if rest.startswith("0."):
        return f"base.{i}.{branch}.0.{'conv.' if rest.startswith('0.0.') else 'bn.'}{rest[4:]}"
    return f"base.{i}.{branch}.1.{sep[rest[2:6]]}{rest[6:]}"


def test_vicc_coclr_s3d_layout():
    ref = built("s3d")
    src = {k: v + 1 if v.is_floating_point() else v for k, v in ref.state_dict().items()}
    state = {"module.encoder_q.0." + _to_coclr(k): v for k, v in src.items()}
    assert "module.encoder_q.0.base.5.branch1.1.conv_t.weight" in state
    state |= {"module.encoder_q.1.0.weight": torch.ones(2), "module.prototypes.weight": torch.ones(2),
              "module.queue": torch.ones(2)}
    model = common.build_backbone("s3d")
    report = common.load_backbone_weights(model, {"state_dict": state, "epoch": 299})
    _assert_loaded(model, src)
    assert report["prefix"] == "module.encoder_q.0." and report["unexpected"] == []
    assert "module.encoder_q.1.0.weight" in report["skipped"]  # the projection head encoder_q.1


def test_torchvision_s3d_state_dict_loads():
    import torchvision
    tv = torchvision.models.video.s3d()
    model = common.build_backbone("s3d")
    report = common.load_backbone_weights(model, tv.state_dict())
    assert report["missing"] == [] and sorted(report["skipped"]) == ["classifier.1.bias", "classifier.1.weight"]
    _assert_loaded(model, {k: v for k, v in tv.state_dict().items()})


def test_skeleton_contrast_inter_layout_bigru_and_agcn():
    torch.manual_seed(0)
    gru = common.build_backbone("bigru", input_dim=6, hidden=4, layers=2)
    agcn = common.build_backbone("agcn", hidden=4, num_persons=1, in_channels=2)
    g_src, a_src = _randomised(gru), _randomised(agcn)
    state = {"encoder_q.encoder." + k: v for k, v in g_src.items()}  # moco/GRU.py: BIGRU.encoder.gru
    state |= {"encoder_k.encoder." + k: v * 0 for k, v in g_src.items()}
    state |= {"encoder_r." + k: v for k, v in a_src.items()} | {"encoder_l." + k: v * 0 for k, v in a_src.items()}
    state |= {"encoder_q.fc.weight": torch.ones(3), "encoder_r.fc.weight": torch.ones(3), "queue": torch.ones(1)}
    r1 = common.load_backbone_weights(gru, {"module." + k: v for k, v in state.items()})
    r2 = common.load_backbone_weights(agcn, state)
    _assert_loaded(gru, g_src)
    _assert_loaded(agcn, a_src)
    assert r1["prefix"] == "module.encoder_q.encoder." and r2["prefix"] == "encoder_r."
    assert r2["unexpected"] == [] and "encoder_r.fc.weight" in r2["skipped"]
    with pytest.raises(ValueError, match="missing"):
        common.load_backbone_weights(agcn, state, prefix="encoder_q.")


def test_r2d3d_18_dpc_structure():
    model = built("r2d3d_18")
    assert model.conv1.weight.shape == (64, 3, 1, 7, 7)
    assert model.layer2[0].conv1.weight.shape[2:] == (1, 3, 3) and model.layer3[0].conv1.weight.shape[2:] == (3, 3, 3)
    assert not model.layer4[-1].final_relu and model.layer4[0].final_relu
    with torch.no_grad():
        assert model(torch.randn(1, 3, 8, 32, 32), return_map=True).min() < 0  # no ReLU after the last block


def test_hara_resnext101_kinetics_layout():
    ref = built("resnext3d_101")
    src = {k: v + 1 if v.is_floating_point() else v for k, v in ref.state_dict().items()}
    state = {"module." + k: v for k, v in src.items()} | {"module.fc.weight": torch.ones(400, 2048)}
    model = common.build_backbone("resnext3d_101")
    report = common.load_backbone_weights(model, {"state_dict": state, "arch": "resnext-101", "epoch": 200})
    _assert_loaded(model, src)
    assert report["skipped"] == ["module.fc.weight"] and "layer3.22.conv2.weight" in report["loaded"]
    assert model.layer1[0].conv2.groups == 32 and model.layer1[0].conv2.weight.shape == (128, 4, 3, 3, 3)


def test_phlvc_skelemotion_layout():
    ref = built("skelemotion_cnn")
    src = {k: v + 1 for k, v in ref.state_dict().items()}
    state = {"sk_backbone." + k: v for k, v in src.items()} | {"sk_fc_rep.1.weight": torch.ones(256, 512)}
    assert "sk_backbone.linear1.weight" in state and "sk_backbone.conv4.bias" in state  # P-HLVC model_3d.py names
    model = common.build_backbone("skelemotion_cnn")
    report = common.load_backbone_weights(model, state)
    _assert_loaded(model, src)
    assert report["skipped"] == ["sk_fc_rep.1.weight"]


def test_stgcn_layout_and_hcn_window_check():
    torch.manual_seed(0)
    ref = common.build_backbone("stgcn", hidden=4)
    src = _randomised(ref)
    assert "st_gcn_networks.1.gcn.conv.weight" in src and "edge_importance.9" in src and "A" in src
    state = {"module." + k: v for k, v in src.items()} | {"module.fcn.weight": torch.ones(60, 16, 1, 1)}
    model = common.build_backbone("stgcn", hidden=4)
    report = common.load_backbone_weights(model, {"state_dict": state})
    _assert_loaded(model, src)
    assert report["skipped"] == ["module.fcn.weight"]
    with pytest.raises(ValueError, match="window_size = 16"):
        common.build_backbone("hcn", hidden=8, window_size=16)(torch.randn(1, 3, 32, 25, 2))


def _to_tubelet_i3d(key):
    """Our I3D name -> tubelet-contrast pyvrl/hassony2 I3D name (conv3d_1a_7x7.conv3d, mixed_4b.branch_1.0.batch3d)."""
    names = {0: "conv3d_1a_7x7", 2: "conv3d_2b_1x1", 3: "conv3d_2c_3x3", 5: "mixed_3b", 6: "mixed_3c", 8: "mixed_4b",
             9: "mixed_4c", 10: "mixed_4d", 11: "mixed_4e", 12: "mixed_4f", 14: "mixed_5b", 15: "mixed_5c"}
    parts = key.split(".")
    out = [names[int(parts[1])]]
    rest = parts[2:]
    if rest[0].startswith("branch"):
        out.append("branch_" + rest[0][-1])
        rest = rest[1:]
        if out[-1] in ("branch_1", "branch_2", "branch_3"):
            out.append(rest[0])
            rest = rest[1:]
    out.append({"0": "conv3d", "1": "batch3d"}[rest[0]])
    return ".".join(out + rest[1:])


def test_tubelet_contrast_i3d_layout():
    ref = built("i3d")
    src = {k: v + 1 if v.is_floating_point() else v for k, v in ref.state_dict().items()}
    state = {"backbone." + _to_tubelet_i3d(k): v for k, v in src.items()}
    assert "backbone.mixed_4b.branch_1.1.conv3d.weight" in state and "backbone.conv3d_1a_7x7.batch3d.bias" in state
    state |= {"cls_head.fc.weight": torch.ones(2)}
    model = common.build_backbone("i3d")
    report = common.load_backbone_weights(model, {"state_dict": state})
    _assert_loaded(model, src)
    assert report["unexpected"] == [] and report["skipped"] == ["cls_head.fc.weight"]


def test_key_encoder_copies_are_never_chosen():
    q = _randomised(_tiny())
    for other in ("backbone_k.", "target.", "teacher.", "model_ema."):
        state = {other + k: v * 0 for k, v in q.items()} | {"online." + k: v for k, v in q.items()}
        model = _tiny()
        assert common.load_backbone_weights(model, state)["prefix"] == "online."
        _assert_loaded(model, q)
        with pytest.raises(ValueError, match="missing"):
            common.load_backbone_weights(_tiny(), {other + k: v for k, v in q.items()})


def test_agcn_unit_gcn_hand_computed():
    torch.manual_seed(0)
    a = common.agcn_adjacency("ntu25")
    unit = common.AGCNUnitGCN(3, 8, a).eval()
    with torch.no_grad():
        for conv in list(unit.conv_a) + list(unit.conv_b):  # zero embeddings -> attention softmax(0) = 1/V
            conv.weight.zero_()
            conv.bias.zero_()
        unit.bn.weight.fill_(1.0)
        unit.PA.normal_()
        x = torch.randn(2, 3, 4, 25)
        out = unit(x)
        y = 0
        for k in range(3):
            adj = torch.from_numpy(a[k]) + unit.PA[k] + 1.0 / 25  # A_k + B_k + C_k
            y = y + unit.conv_d[k](torch.einsum("nctv,vw->nctw", x, adj))
        bn_down = unit.down(x)
        expect = torch.relu(unit.bn(y) + bn_down)
    assert torch.allclose(out, expect, atol=1e-5)


# ---------------------------------------------------------------------------------------------- which encoder, safely
def test_coclr_stage2_takes_the_query_encoder_never_the_sampler():
    """CoCLR stage 2 (model/pretrain.py CoCLR): encoder_q = Sequential(S3D, head), encoder_k its momentum copy and
    sampler = the frozen encoder of the other view; all three hold every S3D key. The query encoder is loaded."""
    ref = built("s3d")
    q = {k: v + 1 if v.is_floating_point() else v for k, v in ref.state_dict().items()}
    state = {"encoder_q.0." + _to_coclr(k): v for k, v in q.items()}
    state |= {"encoder_k.0." + _to_coclr(k): v * 0 for k, v in q.items()}
    state |= {"sampler.0." + _to_coclr(k): v - 3 if v.is_floating_point() else v for k, v in q.items()}
    state |= {"encoder_q.2.weight": torch.ones(128, 1024, 1, 1, 1), "queue": torch.ones(128, 8),
              "queue_vname": torch.zeros(8), "queue_label": torch.zeros(8)}
    model = common.build_backbone("s3d")
    report = common.load_backbone_weights(model, {"state_dict": state, "epoch": 300})
    _assert_loaded(model, q)
    assert report["prefix"] == "encoder_q.0." and report["unexpected"] == []
    assert "sampler.0.base.0.conv_s.weight" in report["skipped"]


def test_two_complete_encoders_are_refused_unless_a_prefix_is_chosen():
    a, b = _randomised(_tiny()), {k: v * 2 for k, v in _randomised(_tiny()).items()}
    state = {"rgb_encoder." + k: v for k, v in a.items()} | {"flow_encoder." + k: v for k, v in b.items()}
    with pytest.raises(common.UserError, match=r"2 encoders.*'rgb_encoder\.', 'flow_encoder\.'.*--weights-prefix"):
        common.load_backbone_weights(_tiny(), state)
    model = _tiny()
    assert common.load_backbone_weights(model, state, prefix="flow_encoder.")["prefix"] == "flow_encoder."
    _assert_loaded(model, b)
    # one module registered under two names (backbone and encoder_q.0) is not ambiguous
    alias = {"backbone." + k: v for k, v in a.items()} | {"encoder.0." + k: v for k, v in a.items()}
    model = _tiny()
    common.load_backbone_weights(model, alias)
    _assert_loaded(model, a)


def test_checkpoint_files_load_safely(tmp_path):
    import argparse
    import pickle
    a = _randomised(_tiny())
    # the authors' checkpoints store argparse.Namespace and numpy numbers: allowed without --trust-checkpoint
    torch.save({"state_dict": a, "args": argparse.Namespace(lr=0.1), "best_acc": np.float64(0.5)}, tmp_path / "ok.pth")
    model = _tiny()
    common.load_backbone_weights(model, str(tmp_path / "ok.pth"))
    _assert_loaded(model, a)

    # any other pickled object (here a fractions.Fraction) could as well run code when unpickled: refused
    torch.save({"state_dict": a, "extra": __import__("fractions").Fraction(1, 3)}, tmp_path / "obj.pth")
    with pytest.raises(common.UserError, match=r"obj\.pth.*fractions\.Fraction.*--trust-checkpoint"):
        common.load_backbone_weights(_tiny(), str(tmp_path / "obj.pth"))
    model = _tiny()
    common.load_backbone_weights(model, str(tmp_path / "obj.pth"), trust=True)
    _assert_loaded(model, a)

    data = (tmp_path / "ok.pth").read_bytes()
    (tmp_path / "truncated.pth").write_bytes(data[:len(data) // 2])
    (tmp_path / "notes.txt").write_text("not a checkpoint\n")
    with open(tmp_path / "plain.pkl", "wb") as f:
        pickle.dump([1, 2], f)
    for name in ("truncated.pth", "notes.txt"):
        with pytest.raises(common.UserError, match=rf"--weights .*{re.escape(name)}: expected a PyTorch checkpoint"):
            common.read_checkpoint(str(tmp_path / name))
    with pytest.raises(common.UserError, match="expected a checkpoint file, found a folder"):
        common.read_checkpoint(str(tmp_path))
    torch.save(torch.ones(3), tmp_path / "tensor.pth")  # a PyTorch file, but not a state dict
    with pytest.raises(common.UserError, match=r"tensor\.pth: expected a state dict .* found Tensor"):
        common.read_checkpoint(str(tmp_path / "tensor.pth"))
    with pytest.raises(common.UserError, match="found nothing"):
        common.read_checkpoint(str(tmp_path / "missing.pth"))


# ---------------------------------------------------------------------------------------------- the nine SEVERE models
def _r2plus1d_source():
    return {k: v + 1 if v.is_floating_point() else v for k, v in built("r2plus1d_18").state_dict().items()}


def _base_network(key):
    """torchvision R(2+1)D-18 name -> RSPNet / Pretext-Contrast `base_network.N` (stem = 0, layerN = N)."""
    return re.sub(r"^layer(\d)\.", r"base_network.\1.", re.sub(r"^stem\.", "base_network.0.", key))


def _severe_checkpoints():
    """The nine self-supervised R(2+1)D-18 checkpoints of SEVERE (thesis Table 4.4) with their released key names
    (SEVERE-BENCHMARK backbones.py load_<method>_checkpoint strips exactly these prefixes)."""
    src = _r2plus1d_source()
    wrap = lambda prefix: {prefix + k: v for k, v in src.items()}  # noqa: E731
    zeros = lambda prefix: {prefix + k: v * 0 for k, v in src.items()}  # noqa: E731
    audio = {"conv1.weight": torch.ones(64, 1, 7, 7), "layer1.0.conv1.weight": torch.ones(64, 64, 3, 3)}
    return {
        "SeLaVi": {"model": wrap("module.video_network.base.") | {"module.audio_network.base." + k: v
                                                                 for k, v in audio.items()}
                   | {"module.mlp_v.0.weight": torch.ones(4)}, "epoch": 200},
        "MoCo": {"state_dict": wrap("module.encoder_q.") | zeros("module.encoder_k.")
                 | {"module.encoder_q.fc.0.weight": torch.ones(4), "module.queue": torch.ones(128, 8)}},
        "VideoMoCo": {"state_dict": wrap("module.encoder_q.") | zeros("module.encoder_k.")
                      | {"module.encoder_q.fc.weight": torch.ones(4), "module.queue": torch.ones(128, 8)}},
        "Pretext-Contrast": {"module." + _base_network(k): v for k, v in src.items()},
        "AVID-CMA": {"model": wrap("module.video_model.") | {"module.audio_model." + k: v for k, v in audio.items()}},
        "GDT": {"model": wrap("video_network.base.") | {"audio_network.base." + k: v for k, v in audio.items()}
                | {"mlp_a.0.weight": torch.ones(4), "mlp_v.0.weight": torch.ones(4)}},
        "RSPNet": {"model": {"encoder_q.encoder." + _base_network(k): v for k, v in src.items()}
                   | {"encoder_k.encoder." + _base_network(k): v * 0 for k, v in src.items()}
                   | {"encoder_q.encoder.fc.weight": torch.ones(4), "encoder_q.encoder_fuse.weight": torch.ones(4),
                      "queue": torch.ones(128, 8)}},
        "CtP": {"state_dict": {"backbone." + _to_ctp(k): v for k, v in src.items()}
                | {"cls_head.fc.weight": torch.ones(4)}},
    }


@pytest.mark.parametrize("method", ["SeLaVi", "MoCo", "VideoMoCo", "Pretext-Contrast", "AVID-CMA", "GDT", "RSPNet",
                                    "CtP"])
def test_severe_checkpoints_load_every_backbone_weight(tmp_path, method):
    path = tmp_path / f"{method}.pth"
    torch.save(_severe_checkpoints()[method], path)
    model = common.build_backbone("r2plus1d_18")
    report = common.load_backbone_weights(model, str(path))
    _assert_loaded(model, _r2plus1d_source())
    assert report["missing"] == [] and report["unexpected"] == [] and not report["tclr_layer4"]


def test_tclr_as_released_loads_into_its_dilated_layer4(tmp_path):
    """TCLR's released R(2+1)D-18 (`module.0.*`, head `module.1.*`) has a dilated 3x3x3 layer4.0.conv1.0 and a
    (1, 2, 2)-strided layer4.0.downsample.0, as SEVERE's load_backbone(init_method='tclr') builds it."""
    torch.manual_seed(1)
    ref = common.build_backbone("r2plus1d_18").eval()  # built as SEVERE does, independently of common._tclr_layer4
    ref.layer4[0].conv1[0] = torch.nn.Conv3d(256, 512, (3, 3, 3), stride=(1, 2, 2), padding=(2, 1, 1),
                                             dilation=(2, 1, 1), bias=False)
    ref.layer4[0].downsample[0] = torch.nn.Conv3d(256, 512, (1, 1, 1), stride=(1, 2, 2), bias=False)
    src = {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v for k, v in ref.state_dict().items()}
    ref.load_state_dict(src)
    assert "layer4.0.conv1.0.weight" in src and "layer4.0.conv1.0.0.weight" not in src
    torch.save({"state_dict": {"module.0." + k: v for k, v in src.items()} | {"module.1.weight": torch.ones(4)},
                "epoch": 100}, tmp_path / "rpd18kin400.pth")
    model = common.build_backbone("r2plus1d_18").eval()
    report = common.load_backbone_weights(model, str(tmp_path / "rpd18kin400.pth"))
    assert report["tclr_layer4"] and report["missing"] == [] and report["prefix"] == "module.0."
    _assert_loaded(model, src)
    x = torch.randn(1, 3, 8, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x), ref(x), atol=1e-5)  # same strides and dilation, not only the same names
        assert model(x, return_map=True).shape[2] == 2  # layer4 keeps the time axis: T/4, not T/8
    r3d = {k: v for k, v in built("r3d_18").state_dict().items()}  # its layer4.0.conv1.0 is 3x3x3 too: not TCLR
    assert not common._tclr_layer4(common.build_backbone("r2plus1d_18"), r3d)
