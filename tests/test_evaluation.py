"""film_fast.evaluation and ``film-fast eval``: metrics vs NumPy, layouts, baseline, CLI, errors."""
from __future__ import annotations

import csv
import glob
import json
import math
import os
import re

import numpy as np
import pytest
import torch
from numpy.lib.stride_tricks import sliding_window_view
from PIL import Image

import film_fast.api as api
import film_fast.cli as cli
from film_fast import evaluation
from film_fast.errors import InputError
from film_fast.evaluation import (EvalResult, Triplet, detect_layout, discover_triplets, evaluate,
                                  psnr, ssim, xiph_preprocess)
from film_fast.imageio import read_image


# ---- independent NumPy references (float64, written from the TF definitions) --------------------
def np_psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """tf.image.psnr(max_val=1) of ``[B, C, H, W]`` arrays, per image."""
    mse = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean(axis=(1, 2, 3))
    with np.errstate(divide="ignore"):
        return -10.0 * np.log10(mse)


def np_ssim(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """tf.image.ssim(max_val=1): TF's 11x11 softmax-built Gaussian kernel, 'VALID' windows."""
    size, sigma = 11, 1.5
    coords = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    g = -0.5 * coords ** 2 / sigma ** 2
    g = g[None, :] + g[:, None]
    kernel = np.exp(g - g.max())
    kernel /= kernel.sum()  # softmax over all 121 entries, as _fspecial_gauss does

    def local_mean(x):  # [B, C, H, W] -> [B, C, H - 10, W - 10]
        windows = sliding_window_view(x, (size, size), axis=(2, 3))
        return np.einsum("bchwij,ij->bchw", windows, kernel)

    x, y = a.astype(np.float64), b.astype(np.float64)
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    mx, my = local_mean(x), local_mean(y)
    vx = local_mean(x * x) - mx ** 2
    vy = local_mean(y * y) - my ** 2
    cov = local_mean(x * y) - mx * my
    luminance = (2 * mx * my + c1) / (mx ** 2 + my ** 2 + c1)
    cs = (2 * cov + c2) / (vx + vy + c2)
    return (luminance * cs).mean(axis=(2, 3)).mean(axis=1)


def pair_cases():
    rng = np.random.default_rng(0)
    h, w = 24, 31
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    gradient = np.stack([xx / w, yy / h, (xx + yy) / (h + w)])[None]
    checker = ((np.floor(xx / 3) + np.floor(yy / 3)) % 2).astype(np.float32)
    checker = checker[None, None].repeat(3, 1)
    noise = rng.random((2, 3, h, w), dtype=np.float32)
    noisier = np.clip(noise + rng.normal(0, 0.1, noise.shape), 0, 1).astype(np.float32)
    return {
        "random": (noise, noisier),
        "unrelated_random": (noise, rng.random((2, 3, h, w), dtype=np.float32)),
        "gradient_shifted": (gradient, np.roll(gradient, 2, axis=3)),
        "checker_vs_grey": (checker, np.full_like(checker, 0.5)),
        "checker_dimmed": (checker, checker * 0.7 + 0.1),
        "constants": (np.full((1, 3, h, w), 0.2, np.float32),
                      np.full((1, 3, h, w), 0.3, np.float32)),
    }


@pytest.mark.parametrize("case", list(pair_cases()))
def test_psnr_and_ssim_match_numpy(case):
    a, b = pair_cases()[case]
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    # float64 statistics on both sides: agreement to rounding, even for flat images where
    # float32 E[x^2] - E[x]^2 would be off by ~3e-5.
    np.testing.assert_allclose(psnr(ta, tb).numpy(), np_psnr(a, b), rtol=1e-12)
    np.testing.assert_allclose(ssim(ta, tb).numpy(), np_ssim(a, b), rtol=0, atol=1e-10)
    # Symmetric, one value per image.
    assert ssim(ta, tb).shape == (a.shape[0],)
    np.testing.assert_allclose(ssim(tb, ta).numpy(), ssim(ta, tb).numpy(), atol=1e-6)


def test_identical_images_give_ssim_one_and_psnr_inf():
    x = torch.rand(2, 3, 16, 20)
    assert torch.isinf(psnr(x, x)).all() and (psnr(x, x) > 0).all()
    np.testing.assert_allclose(ssim(x, x).numpy(), 1.0, atol=1e-12)
    # One identical pair makes the data-set mean inf, as np.mean does in the official eval.
    rows = [evaluation.EvalRow("a", math.inf, 1.0, 30.0, 0.9, 0.0),
            evaluation.EvalRow("b", 40.0, 0.99, 30.0, 0.9, 0.0)]
    result = EvalResult(rows)
    assert result.psnr == math.inf and result.avg_psnr == 30.0 and result.gain_db == math.inf


def test_known_psnr_value_and_ssim_size_limits():
    gt = torch.full((1, 3, 11, 11), 100 / 255)
    pred = torch.full((1, 3, 11, 11), 102 / 255)
    assert psnr(pred, gt).item() == pytest.approx(20 * math.log10(255 / 2), rel=1e-5)
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(torch.zeros(1, 3, 10, 40), torch.zeros(1, 3, 10, 40))
    with pytest.raises(ValueError, match="differ in shape"):
        psnr(torch.zeros(1, 3, 12, 12), torch.zeros(1, 3, 12, 13))


# ---- tiny data sets ---------------------------------------------------------------------------
def save(path, value, size=(12, 12)):
    """A PNG of ``size`` (w, h): a solid grey level ``value`` or an ``[H, W, 3]`` uint8 array."""
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    if isinstance(value, np.ndarray):
        Image.fromarray(value).save(str(path))
    else:
        Image.new("RGB", size, (value, value, value)).save(str(path))
    return str(path)


def names(triplets):
    return [t.name for t in triplets]


def files(triplet):
    return [os.path.basename(p) for p in triplet.paths]


def test_vimeo_triplet_zip_follows_the_test_list(tmp_path):
    root = tmp_path / "vimeo_triplet"
    for seq in ("00001/0001", "00001/0002", "00002/0010"):
        for k in (1, 2, 3):
            save(root / "sequences" / seq / f"im{k}.png", 10 * k)
    (root / "tri_testlist.txt").write_text("00002/0010\n00001/0001\n\n")
    assert detect_layout(str(root)) == "vimeo"
    triplets = discover_triplets(str(root))
    assert names(triplets) == ["00002/0010", "00001/0001"]
    assert triplets[0].paths == tuple(str(root / "sequences" / "00002/0010" / f"im{k}.png")
                                      for k in (1, 2, 3))
    (root / "tri_testlist.txt").write_text("00001/0001\n00003/0001\n")
    with pytest.raises(InputError, match=r"00003/0001/im1\.png: no such file"):
        discover_triplets(str(root))


def test_vimeo_test_zip_input_and_target(tmp_path):
    root = tmp_path / "vimeo_interp_test"
    for seq in ("00001/0389", "00001/0402"):
        save(root / "input" / seq / "im1.png", 1)
        save(root / "input" / seq / "im3.png", 3)
        for k in (1, 2, 3):
            save(root / "target" / seq / f"im{k}.png", 100 + k)
    assert detect_layout(str(root)) == "vimeo"
    triplets = discover_triplets(str(root), "vimeo")
    assert names(triplets) == ["00001/0389", "00001/0402"]
    t = triplets[0]
    assert t.frame0 == str(root / "input/00001/0389/im1.png")
    assert t.frame1_gt == str(root / "target/00001/0389/im2.png")
    assert t.frame2 == str(root / "input/00001/0389/im3.png")
    # A bare tree of im1/im2/im3 folders (e.g. the sequences folder itself) works too.
    bare = discover_triplets(str(root / "target"), "vimeo")
    assert names(bare) == ["00001/0389", "00001/0402"] and files(bare[1]) == ["im1.png", "im2.png",
                                                                              "im3.png"]


def test_middlebury_other(tmp_path):
    root = tmp_path / "middlebury"
    for name in ("Dimetrodon", "Beanbags"):
        for f in ("frame07.png", "frame10.png", "frame11.png", "frame14.png"):
            save(root / "other-data" / name / f, 20)
        save(root / "other-gt-interp" / name / "frame10i11.png", 30)
    assert detect_layout(str(root)) == "middlebury"
    triplets = discover_triplets(str(root))
    assert names(triplets) == ["Beanbags", "Dimetrodon"]
    assert triplets[0].paths == (str(root / "other-data/Beanbags/frame10.png"),
                                 str(root / "other-gt-interp/Beanbags/frame10i11.png"),
                                 str(root / "other-data/Beanbags/frame11.png"))
    os.remove(root / "other-gt-interp/Dimetrodon/frame10i11.png")
    with pytest.raises(InputError, match=r"Dimetrodon[/\\]frame10i11\.png: no such file"):
        discover_triplets(str(root))


def test_ucf101_dvf_layout(tmp_path):
    results = tmp_path / "UCF101_results"
    inner = results / "ucf101_interp_ours"
    for n in ("10", "2", "1"):
        for f in ("frame_00.png", "frame_01_gt.png", "frame_01_ours.png", "frame_02.png"):
            save(inner / n / f, 50)
    for root in (results, inner):
        assert detect_layout(str(root)) == "ucf101"
        triplets = discover_triplets(str(root))
        assert names(triplets) == ["1", "2", "10"]
        assert files(triplets[0]) == ["frame_00.png", "frame_01_gt.png", "frame_02.png"]


def test_xiph_clips_flat_and_per_folder(tmp_path, monkeypatch):
    flat = tmp_path / "xiph"
    for clip, count in (("Boxing", 7), ("Aspen", 5)):
        for i in range(1, count + 1):
            save(flat / f"{clip}-{i:03d}.png", i, size=(16, 12))
    assert detect_layout(str(flat)) == "xiph"
    triplets = discover_triplets(str(flat), "xiph")
    # Ground truth at 0-based odd indices of each clip: range(1, n - 1, 2).
    assert names(triplets) == ["Aspen-002", "Aspen-004", "Boxing-002", "Boxing-004", "Boxing-006"]
    assert files(triplets[0]) == ["Aspen-001.png", "Aspen-002.png", "Aspen-003.png"]
    assert {t.preprocess for t in triplets} == {"xiph-2k"}
    assert {t.preprocess for t in discover_triplets(str(flat), "xiph-4k")} == {"xiph-4k"}
    # Only the first XIPH_FRAMES_PER_CLIP frames of a clip count (100 in the official script).
    monkeypatch.setattr(evaluation, "XIPH_FRAMES_PER_CLIP", 5)
    assert names(discover_triplets(str(flat), "xiph")) == ["Aspen-002", "Aspen-004", "Boxing-002",
                                                           "Boxing-004"]
    monkeypatch.undo()
    per_clip = tmp_path / "clips"
    for i in range(1, 5):
        save(per_clip / "Sunflower" / f"{i}.png", i, size=(16, 12))
    triplets = discover_triplets(str(per_clip), "xiph-4k")
    assert names(triplets) == ["Sunflower/2"]
    assert files(triplets[0]) == ["1.png", "2.png", "3.png"]


def test_folder_layout_namings_and_natural_order(tmp_path):
    root = tmp_path / "mine"
    namings = {"davis": ("frame10.png", "frame10i11.png", "frame11.png"),
               "ucf": ("frame_00.png", "frame_01_gt.png", "frame_02.png"),
               "vimeo": ("im1.png", "im2.png", "im3.png"),
               "plain": ("frame0.png", "frame1.png", "frame2.png")}
    for name, triple in namings.items():
        for f in triple:
            save(root / name / f, 60)
    # Extra images do not hide a known naming (UCF101's frame_01_ours.png, Middlebury's frame07).
    save(root / "ucf" / "frame_01_ours.png", 60)
    save(root / "davis" / "frame07.png", 60)
    # Anything else: exactly three images, natural order (a2 before a10).
    for f in ("a10.jpg", "a1.png", "a2.png"):
        save(root / "nested" / "deeper" / f, 60)
    assert detect_layout(str(root)) == "folder"
    triplets = {t.name: t for t in discover_triplets(str(root))}
    assert sorted(triplets) == ["davis", "nested/deeper", "plain", "ucf", "vimeo"]
    for name, triple in namings.items():
        assert files(triplets[name]) == list(triple)
    assert files(triplets["nested/deeper"]) == ["a1.png", "a2.png", "a10.jpg"]
    # A folder that is itself one triplet.
    single = discover_triplets(str(root / "vimeo"))
    assert len(single) == 1 and single[0].name == "vimeo"


def test_folder_layout_errors_name_the_folder(tmp_path):
    with pytest.raises(InputError, match="no such folder"):
        discover_triplets(str(tmp_path / "missing"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match=re.escape(f"{empty}: no folder triplets found")):
        discover_triplets(str(empty))
    two = tmp_path / "two"
    save(two / "x" / "a.png", 1)
    save(two / "x" / "b.png", 2)
    message = f"{two / 'x'}: holds 2 image(s) (a.png, b.png)"
    with pytest.raises(InputError, match=re.escape(message)):
        discover_triplets(str(two), "folder")
    four = tmp_path / "four"
    for f in "abcd":
        save(four / "x" / f"{f}.png", 1)
    message = f"{four / 'x'}: holds 4 image(s)"
    with pytest.raises(InputError, match=re.escape(message) + ".*namings"):
        discover_triplets(str(four))
    with pytest.raises(ValueError, match="unknown layout"):
        discover_triplets(str(four), "kitti")
    not_dir = save(tmp_path / "file.png", 1)
    with pytest.raises(InputError, match="is not a folder"):
        discover_triplets(not_dir)


# ---- Xiph preprocessing -----------------------------------------------------------------------
def test_xiph_4k_is_the_centre_half():
    image = torch.rand(3, 16, 24)
    out = xiph_preprocess(image, "xiph-4k")
    # center_crop_factor 2: H // 4 = 4 rows and W // 4 = 6 columns off each side.
    assert torch.equal(out, image[:, 4:12, 6:18])


def test_xiph_2k_gamma_area_downsample_to_8_bits():
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (3, 10, 14), dtype=np.uint8)
    image = torch.from_numpy(pixels.astype(np.float32) / np.float32(255))
    out = xiph_preprocess(image, "xiph-2k").numpy()
    assert out.shape == (3, 5, 7)
    # Independent: 2x2 means in linear light (gamma 2.2), back to gamma, rounded to 8 bits.
    linear = (pixels.astype(np.float64) / 255) ** 2.2
    mean = linear.reshape(3, 5, 2, 7, 2).mean(axis=(2, 4))
    expected = np.floor(np.clip(mean ** (1 / 2.2) * 255 + 0.5, 0, 255))
    got = np.round(out * 255)
    assert np.abs(got - expected).max() <= 1  # float32 vs float64 at a .5 boundary
    assert (got == expected).mean() > 0.97
    assert np.array_equal(out, got / 255)  # exactly 8-bit levels
    # Odd sizes: W // 2 and H // 2, area weights over fractional pixels.
    assert xiph_preprocess(torch.rand(3, 11, 15), "xiph-2k").shape == (3, 5, 7)


# ---- evaluation -------------------------------------------------------------------------------
class Mean(torch.nn.Module):
    """The frame-averaging 'model': its scores must equal the baseline's exactly."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.calls = []
        self.source, self.backend = "mean", "torch"

    def forward(self, a, b, dt):
        self.calls.append((tuple(a.shape), dt.tolist()))
        return (a + b) / 2


def test_baseline_of_a_constructed_triplet(tmp_path):
    # Constant frames 100 and 110 average to 105; the ground truth is 103: an error of 2 levels
    # everywhere (PSNR 20 log10(255 / 2)); SSIM of constants is the luminance term alone.
    folder = tmp_path / "t"
    t = Triplet("t", save(folder / "a.png", 100, (20, 14)), save(folder / "b.png", 103, (20, 14)),
                save(folder / "c.png", 110, (20, 14)))
    # And a triplet whose middle frame is exactly the 8-bit average: only float32 rounding of
    # k / 255 separates them (PSNR > 120 dB), SSIM 1.
    rng = np.random.default_rng(2)
    first = rng.integers(0, 128, (14, 20, 3), dtype=np.uint8) * 2
    last = rng.integers(0, 128, (14, 20, 3), dtype=np.uint8) * 2
    middle = ((first.astype(int) + last) // 2).astype(np.uint8)
    exact = Triplet("exact", save(folder / "e0.png", first), save(folder / "e1.png", middle),
                    save(folder / "e2.png", last))
    model = Mean()
    result = evaluate(model, [t, exact])
    row = result.rows[0]
    assert row.avg_psnr == pytest.approx(20 * math.log10(255 / 2), rel=1e-5)
    mx, my = 105 / 255, 103 / 255
    luminance = (2 * mx * my + 0.01 ** 2) / (mx ** 2 + my ** 2 + 0.01 ** 2)
    assert row.avg_ssim == pytest.approx(luminance, abs=1e-6)
    assert (row.psnr, row.ssim) == (row.avg_psnr, row.avg_ssim)
    assert result.rows[1].avg_psnr > 120 and result.rows[1].avg_ssim == pytest.approx(1, abs=1e-9)
    assert result.avg_psnr == pytest.approx((row.avg_psnr + result.rows[1].avg_psnr) / 2)
    assert result.n == 2
    # Batch 1, t = 0.5, every triplet.
    assert model.calls == [((1, 3, 14, 20), [[0.5]])] * 2


def test_evaluate_small_model_matches_direct_computation(tmp_path, small_model):
    rng = np.random.default_rng(3)
    triplets = []
    for i, (w, h) in enumerate(((40, 32), (45, 27))):  # the second is not a pyramid multiple
        base = rng.integers(0, 200, (h + 4, w + 4, 3), dtype=np.uint8)
        paths = [save(tmp_path / f"s{i}" / f"f{k}.png",
                      np.ascontiguousarray(base[k:k + h, k:k + w])) for k in range(3)]
        triplets.append(Triplet(f"s{i}", *paths))
    seen = []
    result = evaluate(small_model, triplets, progress=lambda d, n, r: seen.append((d, n, r.name)))
    assert seen == [(1, 2, "s0"), (2, 2, "s1")]
    for triplet, row in zip(triplets, result.rows):
        x0, gt, x2 = (read_image(p)[None] for p in triplet.paths)
        with torch.inference_mode():
            pred = small_model(x0, x2, torch.full((1, 1), 0.5)).clamp(0, 1)
        assert pred.shape == gt.shape
        assert row.psnr == pytest.approx(float(np_psnr(pred.numpy(), gt.numpy())[0]), rel=1e-5)
        assert row.ssim == pytest.approx(float(np_ssim(pred.numpy(), gt.numpy())[0]), abs=2e-5)
        avg = ((x0 + x2) / 2).numpy()
        assert row.avg_psnr == pytest.approx(float(np_psnr(avg, gt.numpy())[0]), rel=1e-5)
        assert row.avg_ssim == pytest.approx(float(np_ssim(avg, gt.numpy())[0]), abs=2e-5)
        assert row.seconds > 0
    assert result.psnr == pytest.approx(np.mean([r.psnr for r in result.rows]))
    assert result.to_dict()["items"][1]["name"] == "s1"


def test_evaluate_rejects_mismatched_and_unreadable_frames(tmp_path):
    a = save(tmp_path / "a.png", 1, (20, 14))
    b = save(tmp_path / "b.png", 2, (20, 15))
    with pytest.raises(InputError, match=re.escape(f"{b}: is 20x15, but {a} is 20x14")):
        evaluate(Mean(), [Triplet("x", a, b, a)])
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(InputError, match=re.escape(f"{bad}: not an image")):
        evaluate(Mean(), [Triplet("x", a, str(bad), a)])
    tiny = save(tmp_path / "tiny.png", 1, (10, 30))
    with pytest.raises(InputError, match=r"SSIM needs at least 11x11"):
        evaluation.check_triplet(Triplet("x", tiny, tiny, tiny))


# ---- the CLI ----------------------------------------------------------------------------------
def run_cli(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def triplet_root(tmp_path):
    rng = np.random.default_rng(4)
    root = tmp_path / "triplets"
    for name in ("clip1", "clip2"):
        base = rng.integers(0, 256, (36, 44, 3), dtype=np.uint8)
        for k, f in enumerate(("frame10.png", "frame10i11.png", "frame11.png")):
            save(root / name / f, np.ascontiguousarray(base[2 * k:2 * k + 30, 2 * k:2 * k + 38]))
    return root


def test_cli_eval_end_to_end(tmp_path, capsys, triplet_root, small_safetensors, small_model):
    out_json, out_csv = tmp_path / "out" / "r.json", tmp_path / "r.csv"
    code, out, err = run_cli(capsys, "eval", triplet_root, "--model", small_safetensors,
                             "--device", "cpu", "--json", out_json, "--csv", out_csv, "--per-item")
    assert code == 0, err
    expected = evaluate(small_model, discover_triplets(str(triplet_root)))
    report = json.loads(out_json.read_text())
    assert report["dtype"] == "float32" and report["device"] == "cpu"
    assert small_safetensors in report["model"]
    (ds,) = report["datasets"]
    assert ds["name"] == "triplets (folder)" and ds["layout"] == "folder" and ds["n"] == 2
    for key in ("psnr", "ssim", "avg_psnr", "avg_ssim"):
        assert ds[key] == pytest.approx(getattr(expected, key), rel=1e-6)
    assert ds["gain_db"] == pytest.approx(expected.psnr - expected.avg_psnr, rel=1e-6)
    assert [item["name"] for item in ds["items"]] == ["clip1", "clip2"]
    assert ds["items"][0]["ssim"] == pytest.approx(expected.rows[0].ssim, rel=1e-6)
    # The printed table: one line per data set with the gain.
    line = [l for l in out.splitlines() if l.startswith("triplets (folder)")][-1]
    assert f"{expected.psnr:.2f}" in line and f"{expected.avg_psnr:.2f}" in line
    assert f"{expected.psnr - expected.avg_psnr:+.2f}" in line
    assert "clip1" in out  # --per-item
    with open(out_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["item"] for r in rows] == ["clip1", "clip2", "mean"]
    assert float(rows[-1]["psnr"]) == pytest.approx(expected.psnr, rel=1e-6)
    assert not glob.glob(str(tmp_path / "**" / "*tmp-*"), recursive=True)


def test_cli_eval_uses_the_builtin_model_by_default(tmp_path, capsys, triplet_root, monkeypatch):
    asked = []

    def fake_load(path, **kwargs):
        asked.append(path)
        return Mean()

    monkeypatch.setattr(cli, "load", fake_load)
    code, out, err = run_cli(capsys, "eval", triplet_root, "--quiet")
    assert code == 0, err
    assert asked == [None]
    line = [l for l in out.splitlines() if l.startswith("triplets")][0]
    assert line.split()[-1] == "+0.00"  # the averaging 'model' equals the baseline
    code, out, err = run_cli(capsys, "eval", triplet_root, "--quiet", "--max-examples", "1")
    assert code == 0, err
    assert [l.split()[2] for l in out.splitlines() if l.startswith("triplets")] == ["1"]
    # Without trained weights the built-in model is a clear error, exit 2.
    monkeypatch.undo()
    monkeypatch.setattr(api, "BUILTIN_MODEL", str(tmp_path / "none.safetensors"))
    code, _, err = run_cli(capsys, "eval", triplet_root)
    assert code == 2 and "no built-in trained model" in err


def test_cli_eval_xiph_reports_2k_and_4k(tmp_path, capsys, monkeypatch):
    root = tmp_path / "xiph"
    rng = np.random.default_rng(5)
    for i in range(1, 6):
        save(root / f"Clip-{i:03d}.png", rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
    monkeypatch.setattr(cli, "load", lambda *a, **k: Mean())
    out_json = tmp_path / "x.json"
    code, out, err = run_cli(capsys, "eval", root, "--json", out_json)
    assert code == 0, err
    datasets = json.loads(out_json.read_text())["datasets"]
    assert [(d["name"], d["layout"], d["n"]) for d in datasets] == [
        ("xiph (Xiph-2K)", "xiph-2k", 2), ("xiph (Xiph-4K)", "xiph-4k", 2)]
    assert "xiph (Xiph-2K)" in out and "xiph (Xiph-4K)" in out


def test_cli_eval_identical_frames_write_strict_json(tmp_path, capsys, monkeypatch):
    root = tmp_path / "static"
    for f in ("im1.png", "im2.png", "im3.png"):
        save(root / "a" / f, 77, (16, 16))
    monkeypatch.setattr(cli, "load", lambda *a, **k: Mean())
    out_json = tmp_path / "s.json"
    code, out, err = run_cli(capsys, "eval", root, "--json", out_json)
    assert code == 0, err
    text = out_json.read_text()
    assert "Infinity" not in text and "NaN" not in text
    ds = json.loads(text)["datasets"][0]
    assert ds["psnr"] is None and ds["avg_psnr"] is None and ds["ssim"] == pytest.approx(1)
    assert "inf" in out


@pytest.mark.parametrize("problem", ["missing", "empty", "unreadable", "sizes", "not_triplet"])
def test_cli_eval_bad_input(tmp_path, capsys, triplet_root, monkeypatch, problem):
    monkeypatch.setattr(cli, "load", lambda *a, **k: pytest.fail("model loaded before checks"))
    root = triplet_root
    if problem == "missing":
        root, named = tmp_path / "nowhere", f"{tmp_path / 'nowhere'}: no such folder"
    elif problem == "empty":
        root = tmp_path / "empty"
        root.mkdir()
        named = f"{root}: no folder triplets found"
    elif problem == "unreadable":
        bad = triplet_root / "clip2" / "frame10i11.png"
        bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
        named = f"{bad}: "
    elif problem == "sizes":
        bad = triplet_root / "clip1" / "frame11.png"
        save(bad, 9, (20, 20))
        named = f"{bad}: is 20x20, but {triplet_root / 'clip1' / 'frame10.png'} is 38x30"
    else:
        os.remove(triplet_root / "clip2" / "frame11.png")
        named = f"{triplet_root / 'clip2'}: holds 2 image(s)"
    out_json = tmp_path / "r.json"
    code, out, err = run_cli(capsys, "eval", root, "--json", out_json, "--csv", tmp_path / "r.csv")
    assert code == 2
    assert err.startswith("film-fast: error: ") and named in err, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert not out_json.exists() and not (tmp_path / "r.csv").exists()
    assert not glob.glob(str(tmp_path / "*tmp-*"))


def test_cli_eval_refuses_unwritable_report_paths(tmp_path, capsys, triplet_root, monkeypatch):
    monkeypatch.setattr(cli, "load", lambda *a, **k: pytest.fail("model loaded before checks"))
    code, _, err = run_cli(capsys, "eval", triplet_root, "--json", tmp_path)
    assert code == 2 and f"--json {tmp_path}: is a directory" in err
    same = tmp_path / "r.out"
    code, _, err = run_cli(capsys, "eval", triplet_root, "--json", same, "--csv", same)
    assert code == 2 and "same file" in err
