"""Training losses: official maths re-computed independently, weight loading, schedules."""
from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from film_fast.evaluation import psnr as eval_psnr
from film_fast.training.losses import (OFFICIAL_SCHEDULES, PerceptualLoss, PiecewiseConstant, StyleLoss,
                                       TrainingLoss, VGG19Features, VGGWeightsError, l1_loss, l2_loss, load_vgg19,
                                       official_schedule, save_vgg19)

# The official default layer weights, written out here rather than imported.
W = [1.0 / 2.6, 1.0 / 4.8, 1.0 / 3.7, 1.0 / 5.6, 10.0 / 1.5]
MEAN = [123.68, 116.779, 103.939]
# The official net to conv5_2: ("c", name, cin, cout) convs (+ReLU) and ("p",) average pools.
NET = [("c", "conv1_1", 3, 64), ("c", "conv1_2", 64, 64), ("p",),
       ("c", "conv2_1", 64, 128), ("c", "conv2_2", 128, 128), ("p",),
       ("c", "conv3_1", 128, 256), ("c", "conv3_2", 256, 256), ("c", "conv3_3", 256, 256),
       ("c", "conv3_4", 256, 256), ("p",),
       ("c", "conv4_1", 256, 512), ("c", "conv4_2", 512, 512), ("c", "conv4_3", 512, 512),
       ("c", "conv4_4", 512, 512), ("p",),
       ("c", "conv5_1", 512, 512), ("c", "conv5_2", 512, 512)]
USED = ["conv1_2", "conv2_2", "conv3_2", "conv4_2", "conv5_2"]


def random_params(seed=0):
    """``{name: (weight [cout, cin, 3, 3], bias [cout])}``, He-scaled so deep layers stay alive."""
    g = torch.Generator().manual_seed(seed)
    params = {}
    for layer in NET:
        if layer[0] == "c":
            _, name, cin, cout = layer
            w = torch.randn(cout, cin, 3, 3, generator=g) * math.sqrt(2.0 / (9 * cin))
            params[name] = (w, torch.randn(cout, generator=g) * 0.1)
    return params


def torchvision_state_dict(params):
    """torchvision vgg19 naming: features.<index>.weight with ReLUs/pools between convs."""
    sd, idx = {}, 0
    for layer in NET:
        if layer[0] == "c":
            sd[f"features.{idx}.weight"], sd[f"features.{idx}.bias"] = params[layer[1]]
            idx += 2  # conv + relu
        else:
            idx += 1
    # Deeper layers and the classifier exist in a real file; the loader must ignore them.
    sd["features.32.weight"] = torch.zeros(512, 512, 3, 3)
    sd["classifier.0.weight"] = torch.zeros(4, 8)
    return sd


def vgg_from_params(params, normalization="official"):
    vgg = VGG19Features(normalization=normalization)
    vgg.load_state_dict({k: v for k, v in torchvision_state_dict(params).items()
                         if k.startswith("features.") and int(k.split(".")[1]) < 31}, strict=False)
    return vgg


def write_matconvnet(path, params):
    """A MatConvNet simplenn file: `layers` cell of structs, conv weights {[kh,kw,cin,cout], [cout,1]}."""
    import scipy.io
    entries = []
    for layer in NET:
        if layer[0] == "c":
            name = layer[1]
            w, b = params[name]
            cell = np.empty((1, 2), dtype=object)
            cell[0, 0] = w.numpy().transpose(2, 3, 1, 0).astype(np.float32)
            cell[0, 1] = b.numpy().reshape(-1, 1).astype(np.float32)
            entries.append({"name": name, "type": "conv", "weights": cell,
                            "size": np.array(cell[0, 0].shape, dtype=np.float64),
                            "pad": np.ones((1, 4)), "stride": np.ones((1, 2))})
            entries.append({"name": "relu" + name[4:], "type": "relu"})
        else:
            entries.append({"name": f"pool{len([e for e in entries if e['type'] == 'pool']) + 1}",
                            "type": "pool", "method": "max"})
    layers = np.empty((1, len(entries)), dtype=object)
    for i, e in enumerate(entries):
        layers[0, i] = e
    scipy.io.savemat(path, {"layers": layers,
                            "normalization": {"averageImage": np.array(MEAN).reshape(1, 1, 3)}})
    # The fixture must have the layout the official code indexes positionally.
    raw = scipy.io.loadmat(path)["layers"][0]
    np.testing.assert_array_equal(raw[2][0][0][2][0][0], params["conv1_2"][0].numpy().transpose(2, 3, 1, 0))


# ---- independent reference of the official maths ------------------------------------------
def tf_same_avg_pool(x):
    """2x2/stride-2 SAME average pooling as TF does it: pad bottom/right, average only real pixels."""
    h, w = x.shape[-2:]
    ph, pw = h % 2, w % 2
    xp = F.pad(x, (0, pw, 0, ph))
    ones = F.pad(torch.ones(1, 1, h, w), (0, pw, 0, ph))
    b, c, H, W_ = xp.shape
    s = xp.reshape(b, c, H // 2, 2, W_ // 2, 2).sum(dim=(3, 5))
    n = ones.reshape(1, 1, H // 2, 2, W_ // 2, 2).sum(dim=(3, 5))
    return s / n


def reference_features(params, image01):
    """NCHW official `_build_vgg19(image * 255)`: dict of post-ReLU conv outputs."""
    x = image01 * 255.0 - torch.tensor(MEAN).view(1, 3, 1, 1)
    out = {}
    for layer in NET:
        if layer[0] == "c":
            w, b = params[layer[1]]
            x = F.relu(F.conv2d(x, w, b, padding=1))
            out[layer[1]] = x
        else:
            x = tf_same_avg_pool(x)
    return out


def reference_vgg_loss(params, pred, target):
    fr, fp = reference_features(params, target), reference_features(params, pred)
    total = sum(torch.mean(torch.abs(fr[n] - fp[n])) * w for n, w in zip(USED, W))
    return total / 255.0


def reference_style_loss(params, pred, target):
    fr, fp = reference_features(params, target), reference_features(params, pred)

    def gram(f):
        f = f / 255.0
        b, c, h, w = f.shape
        return torch.einsum("bchw,bdhw->bcd", f, f) / (h * w)

    return sum(torch.mean((gram(fr[n]) - gram(fp[n])) ** 2) * w for n, w in zip(USED, W))


@pytest.fixture(scope="module")
def params():
    return random_params(0)


@pytest.fixture(scope="module")
def vgg(params):
    return vgg_from_params(params)


def images(shape=(2, 3, 32, 32), seed=1):
    g = torch.Generator().manual_seed(seed)
    target = torch.rand(shape, generator=g)
    pred = (target + 0.1 * torch.randn(shape, generator=g)).clamp(0, 1)
    return pred, target


# ---- L1 and schedules ---------------------------------------------------------------------
def test_l1_matches_hand_computation():
    pred = torch.zeros(1, 3, 2, 2)
    target = torch.tensor([0.5, -1.0, 2.0, 0.0] * 3).view(1, 3, 2, 2)
    # |0.5| + |-1| + |2| + 0 = 3.5 per channel; 12 elements in all -> 10.5 / 12.
    assert l1_loss(pred, target).item() == pytest.approx(10.5 / 12)
    total, terms = TrainingLoss({"l1": 1.0})(pred, target, step=0)
    assert total.item() == pytest.approx(10.5 / 12)
    assert set(terms) == {"l1"}


def test_l2_matches_hand_computation_and_psnr():
    pred = torch.zeros(1, 3, 2, 2)
    target = torch.tensor([0.5, -1.0, 2.0, 0.0] * 3).view(1, 3, 2, 2)
    # 0.25 + 1 + 4 + 0 = 5.25 per channel; 12 elements in all -> 15.75 / 12.
    assert l2_loss(pred, target).item() == pytest.approx(15.75 / 12)
    total, terms = TrainingLoss({"l1": 0.5, "l2": 2.0})(pred, target, step=0)
    assert set(terms) == {"l1", "l2"}
    assert total.item() == pytest.approx(0.5 * 10.5 / 12 + 2.0 * 15.75 / 12)
    # PSNR (peak 1) is -10 log10 of this mean.
    a, b = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0)), torch.zeros(1, 3, 8, 8)
    assert -10 * math.log10(l2_loss(a, b).item()) == pytest.approx(eval_psnr(a, b).item(), rel=1e-6)


def test_piecewise_constant_boundary_semantics():
    s = PiecewiseConstant([10, 20], [1.0, 0.5, 0.1])
    assert [s(t) for t in (0, 9, 10, 11, 19, 20, 21, 10 ** 9)] == [1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.1, 0.1]
    style = PiecewiseConstant(**OFFICIAL_SCHEDULES["Style"]["style"])
    assert style(1_499_999) == 0.0 and style(1_500_000) == 0.0 and style(1_500_001) == 40.0
    vgg = PiecewiseConstant(**OFFICIAL_SCHEDULES["Style"]["vgg"])
    assert vgg(1_500_000) == 1.0 and vgg(1_500_001) == 0.25
    with pytest.raises(ValueError):
        PiecewiseConstant([10], [1.0])
    with pytest.raises(ValueError):
        PiecewiseConstant([10, 10], [1.0, 2.0, 3.0])


def test_official_schedules_match_gin_configs():
    assert OFFICIAL_SCHEDULES["L1"] == {"l1": {"boundaries": [0], "values": [1.0, 1.0]}}
    assert OFFICIAL_SCHEDULES["VGG"] == {"l1": {"boundaries": [0], "values": [1.0, 1.0]},
                                         "vgg": {"boundaries": [1500000], "values": [1.0, 0.25]}}
    assert OFFICIAL_SCHEDULES["Style"] == {"l1": {"boundaries": [0], "values": [1.0, 1.0]},
                                           "vgg": {"boundaries": [1500000], "values": [1.0, 0.25]},
                                           "style": {"boundaries": [1500000], "values": [0.0, 40.0]}}
    short = official_schedule("Style", boundary=1000)
    assert short["vgg"]["boundaries"] == [1000] and short["style"]["boundaries"] == [1000]
    assert short["l1"]["boundaries"] == [0]
    assert OFFICIAL_SCHEDULES["Style"]["vgg"]["boundaries"] == [1500000]  # the table is not mutated


# ---- weight loading -----------------------------------------------------------------------
def test_state_dict_and_safetensors_load_identical_features(tmp_path, params, vgg):
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    want = vgg(x)
    pth = tmp_path / "vgg19.pth"
    torch.save(torchvision_state_dict(params), pth)
    from_pth = load_vgg19(str(pth), normalization="official")
    got = from_pth(x)
    for n in USED:
        assert torch.equal(got[n], want[n]), n
    st = tmp_path / "vgg19.safetensors"
    save_vgg19(from_pth, str(st))
    from_st = load_vgg19(str(st))  # normalization comes back from the metadata
    assert from_st.normalization == "official"
    for n in USED:
        assert torch.equal(from_st(x)[n], want[n]), n


def test_matconvnet_mat_loads_identical_features(tmp_path, params, vgg):
    pytest.importorskip("scipy.io")
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    want = vgg(x)
    mat = tmp_path / "imagenet-vgg-verydeep-19.mat"
    write_matconvnet(str(mat), params)
    from_mat = load_vgg19(str(mat))
    assert from_mat.normalization == "official"
    got = from_mat(x)
    for n in USED:
        assert torch.equal(got[n], want[n]), n


def test_auto_normalization_for_torchvision_files(tmp_path, params):
    pth = tmp_path / "vgg19.pth"
    torch.save(torchvision_state_dict(params), pth)
    vgg = load_vgg19(str(pth))
    assert vgg.normalization == "torchvision"
    x = torch.rand(1, 3, 8, 8)
    # torchvision preprocessing: (x - mean) / std.
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    w, b = params["conv1_1"]
    expect = F.relu(F.conv2d((x - mean) / std, w, b, padding=1))
    torch.testing.assert_close(vgg(x, ["conv1_1"])["conv1_1"], expect, rtol=1e-5, atol=1e-5)


def test_missing_file_is_a_clear_error(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_vgg19(str(missing))
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        TrainingLoss(OFFICIAL_SCHEDULES["VGG"], vgg_path=str(missing))


def test_wrong_shape_and_missing_tensor_name_the_tensor(tmp_path, params):
    sd = torchvision_state_dict(params)
    sd["features.7.weight"] = torch.zeros(128, 64, 3, 3)  # conv2_2 needs 128 input channels
    bad = tmp_path / "bad.pth"
    torch.save(sd, bad)
    with pytest.raises(ValueError, match=r"bad\.pth.*'features\.7\.weight'.*\(128, 64, 3, 3\)"):
        load_vgg19(str(bad))
    sd = torchvision_state_dict(params)
    del sd["features.16.bias"]
    torch.save(sd, bad)
    with pytest.raises(VGGWeightsError, match=r"'features\.16\.bias'"):
        load_vgg19(str(bad))
    torch.save({"encoder.weight": torch.zeros(3)}, bad)
    with pytest.raises(ValueError, match=r"'features\.0\.weight'"):
        load_vgg19(str(bad))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"this is not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt"):
        load_vgg19(str(junk))


def test_mat_without_scipy_says_pip_install_scipy(tmp_path, monkeypatch):
    mat = tmp_path / "vgg.mat"
    mat.write_bytes(b"MATLAB 5.0 MAT-file, Platform: GLNXA64" + b"\0" * 100)
    monkeypatch.setitem(sys.modules, "scipy", None)
    monkeypatch.setitem(sys.modules, "scipy.io", None)
    with pytest.raises(ImportError, match="pip install scipy"):
        load_vgg19(str(mat))


def test_mat_with_wrong_shape_names_the_tensor(tmp_path, params):
    pytest.importorskip("scipy.io")
    bad = dict(params)
    bad["conv2_2"] = (torch.zeros(128, 128, 5, 5), params["conv2_2"][1])
    mat = tmp_path / "bad.mat"
    write_matconvnet(str(mat), bad)
    with pytest.raises(ValueError, match=r"bad\.mat.*layers\{8\}\.weights\{1\}"):
        load_vgg19(str(mat))


# ---- perceptual / style maths -------------------------------------------------------------
def test_perceptual_loss_matches_reference_recomputation(params, vgg):
    pred, target = images((2, 3, 33, 31))  # odd sizes exercise TF's SAME pooling
    got = PerceptualLoss(vgg)(pred, target)
    want = reference_vgg_loss(params, pred, target)
    assert want.item() > 0
    torch.testing.assert_close(got, want, rtol=1e-4, atol=0)


def test_style_loss_matches_reference_recomputation(params, vgg):
    pred, target = images((2, 3, 32, 32))
    got = StyleLoss(vgg)(pred, target)
    want = reference_style_loss(params, pred, target)
    assert want.item() > 0
    torch.testing.assert_close(got, want, rtol=1e-4, atol=0)


def test_total_is_the_scheduled_weighted_sum_and_vgg_runs_once_per_image(params, vgg):
    loss = TrainingLoss(official_schedule("Style", boundary=10), vgg=vgg)
    calls = []
    handle = vgg.register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        pred, target = images()
        total, terms = loss(pred, target, step=11)
    finally:
        handle.remove()
    assert set(terms) == {"l1", "vgg", "style"}
    assert len(calls) == 2  # pred + target, shared by the perceptual and style terms
    torch.testing.assert_close(terms["vgg"], reference_vgg_loss(params, pred, target), rtol=1e-4, atol=0)
    torch.testing.assert_close(terms["style"], reference_style_loss(params, pred, target), rtol=1e-4, atol=0)
    expect = terms["l1"] * 1.0 + terms["vgg"] * 0.25 + terms["style"] * 40.0
    torch.testing.assert_close(total.detach(), expect, rtol=1e-6, atol=0)


def test_zero_weight_terms_are_skipped(vgg):
    calls = []
    handle = vgg.register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        pred, target = images()
        loss = TrainingLoss({"l1": 1.0, "vgg": {"boundaries": [5], "values": [0.0, 1.0]}}, vgg=vgg)
        total, terms = loss(pred, target, step=5)
        assert set(terms) == {"l1"} and calls == []
        assert total.item() == pytest.approx(l1_loss(pred, target).item())
        _, terms = loss(pred, target, step=6)
        assert set(terms) == {"l1", "vgg"} and len(calls) == 2
        # Style weight is 0 up to the boundary: only l1 + vgg are computed.
        _, terms = TrainingLoss(official_schedule("Style", boundary=5), vgg=vgg)(pred, target, step=5)
        assert set(terms) == {"l1", "vgg"}
    finally:
        handle.remove()


def test_vgg_path_required_only_for_nonzero_vgg_terms():
    with pytest.raises(ValueError, match="vgg_path"):
        TrainingLoss(OFFICIAL_SCHEDULES["Style"])
    loss = TrainingLoss({"l1": 1.0, "style": 0.0})  # never non-zero: no weights needed
    assert loss.vgg is None
    with pytest.raises(ValueError, match="unknown loss term"):
        TrainingLoss({"l1": 1.0, "ssim": 1.0})


def test_gradients_flow_to_pred_only(vgg):
    pred, target = images()
    pred.requires_grad_(True)
    total, _ = TrainingLoss(official_schedule("Style", boundary=0), vgg=vgg)(pred, target, step=1)
    total.backward()
    assert pred.grad is not None and torch.isfinite(pred.grad).all() and pred.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in vgg.parameters())


def test_bf16_autocast_and_bf16_inputs(vgg):
    pred, target = images()
    loss = TrainingLoss(official_schedule("Style", boundary=0), vgg=vgg)
    ref_total, ref_terms = loss(pred, target, step=1)
    p = pred.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total, terms = loss(p, target, step=1)
    assert total.dtype == torch.float32 and torch.isfinite(total)
    for k in ref_terms:
        torch.testing.assert_close(terms[k], ref_terms[k], rtol=0.1, atol=0)
    total.backward()
    assert torch.isfinite(p.grad).all()
    # bf16 tensors without autocast run in the weights' dtype.
    total16, _ = loss(pred.bfloat16(), target.bfloat16(), step=1)
    torch.testing.assert_close(total16, ref_total, rtol=0.05, atol=0)
