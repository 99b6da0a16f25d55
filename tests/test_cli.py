"""The film-fast command line: interpolate / convert / info / bench, and its error handling."""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import film_fast
import film_fast.cli as cli
import film_fast.ops as ops
from conftest import PHOTOS, small_options
from film_fast.flops import conv_flops
from film_fast.imageio import read_image, to_uint8
from film_fast.interpolation import interpolate_pair

ONE = os.path.join(PHOTOS, "one.png")
TWO = os.path.join(PHOTOS, "two.png")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def frames_in(folder) -> list:
    return sorted(os.path.basename(p) for p in glob.glob(os.path.join(str(folder), "*")))


def leftovers(folder) -> list:
    """Temporary folders/files a failed run might have left (DIR.tmp-<pid>, .x.png.tmp-<pid>)."""
    return [p for p in glob.glob(os.path.join(str(folder), "**", "*tmp-*"), recursive=True)]


def png_pixels(path) -> np.ndarray:
    with Image.open(path) as img:
        assert img.mode == "RGB"
        return np.asarray(img)


def run_cli(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def small_pair(tmp_path_factory):
    """The official pair scaled to 96x72 (fast), and a 32x24 image of another size."""
    folder = tmp_path_factory.mktemp("pair")
    paths = []
    for name in ("one.png", "two.png"):
        img = Image.fromarray(to_uint8(read_image(os.path.join(PHOTOS, name))))
        img.resize((96, 72), Image.BILINEAR).save(folder / name)
        paths.append(str(folder / name))
    Image.new("RGB", (32, 24), (10, 20, 30)).save(folder / "other_size.png")
    return paths[0], paths[1], str(folder / "other_size.png")


# ---- interpolate: the official sample pair -------------------------------------------------------
@pytest.fixture(scope="module")
def official_k2(tmp_path_factory, small_safetensors):
    out = tmp_path_factory.mktemp("k2") / "frames"
    code = cli.main(["interpolate", ONE, TWO, "-o", str(out), "--times-to-interpolate", "2",
                     "--model", small_safetensors, "--quiet"])
    assert code == 0
    return out


def test_official_pair_times_to_interpolate_2(official_k2, small_model):
    assert frames_in(official_k2) == [f"frame_{i:03d}.png" for i in range(5)]
    assert not leftovers(official_k2.parent)
    first, mid, last = (png_pixels(official_k2 / f"frame_{i:03d}.png") for i in (0, 2, 4))
    assert first.shape == (768, 1024, 3)
    # Inputs come back pixel-exact through the 8-bit round trip.
    np.testing.assert_array_equal(first, to_uint8(read_image(ONE)))
    np.testing.assert_array_equal(last, to_uint8(read_image(TWO)))
    # The middle frame is one model call at t = 0.5 on the inputs.
    x0, x1 = read_image(ONE)[None], read_image(TWO)[None]
    with torch.inference_mode():
        direct = small_model(x0, x1, torch.full((1, 1), 0.5))
    np.testing.assert_array_equal(mid, to_uint8(direct))


def test_num_frames_matches_the_library(tmp_path, capsys, small_pair, small_safetensors, small_model):
    a, b, _ = small_pair
    out = tmp_path / "out"
    code, stdout, _ = run_cli(capsys, "interpolate", a, b, "-o", out, "--num-frames", "3",
                              "--model", small_safetensors)
    assert code == 0
    assert frames_in(out) == [f"frame_{i:03d}.png" for i in range(5)]
    assert "wrote 5 frames" in stdout and "3 in-between" in stdout
    expected = interpolate_pair(small_model, read_image(a), read_image(b), num_frames=3)
    for i, frame in enumerate(expected):
        np.testing.assert_array_equal(png_pixels(out / f"frame_{i:03d}.png"), to_uint8(frame))


def test_subprocess_interpolate_and_error(tmp_path, small_pair, small_safetensors):
    a, b, _ = small_pair
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    ok = subprocess.run([sys.executable, "-m", "film_fast", "interpolate", a, b, "-o", str(out),
                         "--num-frames", "1", "--model", small_safetensors],
                        capture_output=True, text=True, env=env, cwd=str(tmp_path))
    assert ok.returncode == 0, ok.stderr
    assert frames_in(out) == ["frame_000.png", "frame_001.png", "frame_002.png"]
    assert "wrote 3 frames" in ok.stdout

    missing = str(tmp_path / "missing.png")
    bad = subprocess.run([sys.executable, "-m", "film_fast", "interpolate", missing, b, "-o",
                          str(tmp_path / "out2"), "--model", small_safetensors],
                         capture_output=True, text=True, env=env, cwd=str(tmp_path))
    assert bad.returncode == 2
    assert bad.stderr.splitlines() == [f"film-fast: error: {missing}: no such file"]
    assert "Traceback" not in bad.stderr and not os.path.exists(tmp_path / "out2")


def test_frame_numbers_grow_past_three_digits(tmp_path, capsys, small_safetensors, monkeypatch):
    class Mean(torch.nn.Module):  # 1000 real model calls would dominate the test time
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))
            self.source, self.backend = "test", "torch"

        def forward(self, a, b, dt):
            return (a + b) / 2

    monkeypatch.setattr(cli, "load", lambda *args, **kwargs: Mean())
    small = tmp_path / "a.png"
    Image.new("RGB", (4, 3), (1, 2, 3)).save(small)
    code, _, err = run_cli(capsys, "interpolate", small, small, "-o", tmp_path / "out",
                           "--num-frames", "1000", "--model", small_safetensors, "--quiet")
    assert code == 0, err
    names = frames_in(tmp_path / "out")
    assert len(names) == 1002 and names[0] == "frame_0000.png" and names[-1] == "frame_1001.png"


# ---- interpolate: refusing bad inputs without leaving anything behind -------------------------
def _bad_cases(tmp_path, small_pair, small_safetensors):
    a, b, other = small_pair
    text = tmp_path / "notes.txt"
    text.write_text("hello\n")
    whole = open(ONE, "rb").read()
    half = tmp_path / "half.png"
    half.write_bytes(whole[: len(whole) // 2])
    rand = tmp_path / "random.bin"
    rand.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    model = ["--model", small_safetensors]
    return {
        "missing file": ([tmp_path / "nope.png", b, *model], "nope.png: no such file"),
        "truncated png": ([half, b, *model], "half.png: unreadable or corrupt image"),
        "not an image": ([a, text, *model], "notes.txt: not an image file"),
        "sizes differ": ([a, other, *model], "96x72"),
        "output under a file": ([a, b, *model, "-o", text / "out"], "notes.txt is not a directory"),
        "png as model": ([a, b, "--model", a], "unrecognised checkpoint format"),
        "random bytes as model": ([a, b, "--model", rand], "random.bin: unrecognised checkpoint"),
        "missing model": ([a, b, "--model", tmp_path / "none.pt"], "none.pt: no such file"),
        "cuda missing": ([a, b, *model, "--device", "cuda:7"], "--device"),
    }


@pytest.mark.parametrize("case", ["missing file", "truncated png", "not an image", "sizes differ",
                                  "output under a file", "png as model", "random bytes as model",
                                  "missing model", "cuda missing"])
def test_bad_inputs_fail_cleanly(tmp_path, capsys, small_pair, small_safetensors, case):
    args, expected = _bad_cases(tmp_path, small_pair, small_safetensors)[case]
    out = tmp_path / "out"
    if "-o" not in args:
        args = [*args, "-o", out]
    before = sorted(os.listdir(tmp_path))
    code, stdout, err = run_cli(capsys, "interpolate", *args)
    assert code == 2
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("film-fast: error: ") and expected in lines[0]
    assert sorted(os.listdir(tmp_path)) == before  # no output dir, no temp dir
    assert stdout == ""


def test_sizes_message_names_both_files(tmp_path, capsys, small_pair, small_safetensors):
    a, _, other = small_pair
    code, _, err = run_cli(capsys, "interpolate", a, other, "-o", tmp_path / "o",
                           "--model", small_safetensors)
    assert code == 2 and a in err and other in err and "96x72" in err and "32x24" in err


def test_no_builtin_model_is_a_clear_error(tmp_path, capsys, small_pair, monkeypatch):
    monkeypatch.setattr(film_fast.api, "BUILTIN_MODEL", str(tmp_path / "absent.safetensors"))
    a, b, _ = small_pair
    code, _, err = run_cli(capsys, "interpolate", a, b, "-o", tmp_path / "out")
    assert code != 0 and "no built-in trained model" in err and len(err.splitlines()) == 1
    assert os.listdir(tmp_path) == []


def test_existing_frames_need_overwrite(tmp_path, capsys, small_pair, small_safetensors):
    a, b, _ = small_pair
    out = tmp_path / "out"
    out.mkdir()
    for name in ("frame_000.png", "frame_001.png", "frame_002.png", "frame_003.png", "keep.txt"):
        (out / name).write_bytes(b"old")
    code, _, err = run_cli(capsys, "interpolate", a, b, "-o", out, "--model", small_safetensors)
    assert code == 2 and "--overwrite" in err and (out / "frame_000.png").read_bytes() == b"old"
    code, _, err = run_cli(capsys, "interpolate", a, b, "-o", out, "--model", small_safetensors,
                           "--overwrite", "--quiet")
    assert code == 0, err
    # Old frames beyond the new count are removed; other files are left alone.
    assert frames_in(out) == ["frame_000.png", "frame_001.png", "frame_002.png", "keep.txt"]
    assert png_pixels(out / "frame_001.png").shape == (72, 96, 3)
    assert not leftovers(tmp_path)


def test_existing_empty_dir_and_missing_parents_are_fine(tmp_path, capsys, small_pair,
                                                         small_safetensors):
    a, b, _ = small_pair
    (tmp_path / "empty").mkdir()
    for out in (tmp_path / "empty", tmp_path / "x" / "y" / "out"):
        code, _, err = run_cli(capsys, "interpolate", a, b, "-o", out, "--model", small_safetensors,
                               "--times-to-interpolate", "0", "--quiet")
        assert code == 0, err
        assert frames_in(out) == ["frame_000.png", "frame_001.png"]
    assert not leftovers(tmp_path)


@pytest.mark.parametrize("failure, code", [(OSError(28, "No space left on device"), 1),
                                           (KeyboardInterrupt(), 130)])
def test_failure_while_rendering_removes_everything(tmp_path, capsys, small_pair, small_safetensors,
                                                    monkeypatch, failure, code):
    a, b, _ = small_pair
    real = cli.write_image
    count = [0]

    def flaky(path, image):
        count[0] += 1
        if count[0] == 3:
            raise failure
        real(path, image)

    monkeypatch.setattr(cli, "write_image", flaky)
    got, _, err = run_cli(capsys, "interpolate", a, b, "-o", tmp_path / "new" / "out",
                          "--model", small_safetensors, "--times-to-interpolate", "2")
    assert got == code and len(err.splitlines()) == 1
    assert os.listdir(tmp_path) == []  # neither the output, the temp dir, nor the new parent


def test_argument_errors_use_argparse_exit_code(capsys, small_pair):
    a, b, _ = small_pair
    for argv in (["interpolate", a, b, "-o", "x", "--times-to-interpolate", "1", "--num-frames", "2"],
                 ["interpolate", a, b, "-o", "x", "--times-to-interpolate", "11"],
                 ["interpolate", a, b],
                 ["bench", "--sizes", "64by64"],
                 ["frobnicate"], []):
        code, _, err = run_cli(capsys, *argv)
        assert code == 2 and err.splitlines()[-1].startswith("film-fast"), argv
        assert "error:" in err.splitlines()[-1], argv
    assert not os.path.exists("x")


# ---- convert / info ---------------------------------------------------------------------------------
def test_convert_and_info_round_trip(tmp_path, capsys, small_model, small_safetensors):
    # A state dict .pt (another format) -> .safetensors: identical weights.
    pt = tmp_path / "weights.pt"
    torch.save(small_model.state_dict(), pt)
    dst = tmp_path / "converted.safetensors"
    code, out, err = run_cli(capsys, "convert", pt, dst)
    assert code == 2 and "pyramid_levels" in err  # a bare state dict does not record it
    code, out, err = run_cli(capsys, "convert", pt, dst, "--pyramid-levels", "5")
    assert code == 0, err
    assert "wrote" in out and str(dst) in out
    converted = film_fast.load(str(dst), device="cpu")
    assert converted.options == small_model.options
    for name, tensor in small_model.state_dict().items():
        assert torch.equal(converted.state_dict()[name], tensor), name

    count = small_model.num_parameters()
    code, out, _ = run_cli(capsys, "info", dst)
    assert code == 0
    assert "format:     safetensors (film_fast)" in out
    assert f"parameters: {count} ({count / 1e6:.2f} M)" in out
    assert "dtype:      float32" in out and "pyramid_levels: 5" in out and "filters: 8" in out
    code, out, _ = run_cli(capsys, "info", pt, "--pyramid-levels", "5")
    assert code == 0 and "state dict" in out and str(count) in out


def test_convert_refuses_other_names_and_bad_sources(tmp_path, capsys, small_safetensors):
    code, _, err = run_cli(capsys, "convert", small_safetensors, tmp_path / "out.pt")
    assert code == 2 and "must end in .safetensors" in err and len(err.splitlines()) == 1
    png = tmp_path / "a.png"
    Image.new("RGB", (4, 4)).save(png)
    code, _, err = run_cli(capsys, "convert", png, tmp_path / "out.safetensors")
    assert code == 2 and "unrecognised checkpoint format" in err
    code, _, err = run_cli(capsys, "info", tmp_path / "missing.pt")
    assert code == 2 and "missing.pt: no such file" in err
    assert sorted(os.listdir(tmp_path)) == ["a.png"]


# ---- bench and FLOP counts --------------------------------------------------------------------------
def test_bench_small_prints_a_table_and_writes_json(tmp_path, capsys):
    report = tmp_path / "out.json"
    code, out, err = run_cli(capsys, "bench", "--config", "small", "--sizes", "64x64", "--iters", "1",
                             "--warmup", "0", "--json", report, "--device", "cpu")
    assert code == 0, err
    lines = out.splitlines()
    assert "matmul ceiling" in lines[0]
    assert lines[1].split() == ["size", "s/frame", "frames/s", "GFLOP/frame", "GFLOP/s", "of",
                                "ceiling", "peak", "mem"]
    assert lines[2].split()[0] == "64x64"
    data = json.loads(report.read_text())
    assert data["versions"]["torch"] == torch.__version__ and data["dtype"] == "float32"
    assert data["matmul_ceiling_tflops"] > 0 and data["commit"]
    assert data["backend"] == "auto" and data["device"] and data["config"] == "small"
    from film_fast.ops import winograd
    transforms = "C" if winograd.native_library() is not None else "PyTorch ops"
    assert data["cpu_winograd_transforms"].startswith(transforms)
    assert f"Winograd transforms: {transforms}" in lines[0]
    (row,) = data["results"]
    assert row["size"] == "64x64" and row["fps"] > 0 and row["median_s"] > 0
    assert row["conv_gflop"] == pytest.approx(conv_flops(small_options(), 64, 64) / 1e9)
    assert row["fraction_of_ceiling"] == pytest.approx(
        row["conv_gflops_per_s"] / (data["matmul_ceiling_tflops"] * 1e3))
    assert row["peak_rss_bytes"] > 0


def test_conv_flops_published():
    published = film_fast.Options()
    flops = conv_flops(published, 256, 256)
    assert flops == 278_281_629_696  # counted by hand and by test_conv_flops_counts_every_conv
    assert abs(flops - 279e9) / 279e9 < 0.01
    assert conv_flops(published, 512, 512) == 4 * flops
    # Sizes are padded to multiples of 64 like the model does.
    assert conv_flops(published, 250, 200) == flops


def test_conv_flops_counts_every_conv(monkeypatch):
    counted = [0]
    conv2d, upsample_conv2x2, conv2d_levels = ops.conv2d, ops.upsample_conv2x2, ops.conv2d_levels

    def count(y, weight):
        counted[0] += 2 * weight.numel() * y.shape[0] * y.shape[2] * y.shape[3]
        return y

    monkeypatch.setattr(ops, "conv2d", lambda x, w, b=None, a=None, *, backend=None:
                        count(conv2d(x, w, b, a, backend=backend), w))
    monkeypatch.setattr(ops, "upsample_conv2x2", lambda x, s, w, b=None, *, out=None, backend=None:
                        count(upsample_conv2x2(x, s, w, b, out=out, backend=backend), w))
    monkeypatch.setattr(ops, "conv2d_levels", lambda xs, w, b=None, a=None, *, out=None,
                        backend=None: [count(y, w) for y in conv2d_levels(xs, w, b, a, out=out,
                                                                          backend=backend)])
    options = small_options()
    model = film_fast.FILM(options, backend="torch").eval()
    with torch.inference_mode():
        model(torch.rand(1, 3, 70, 100), torch.rand(1, 3, 70, 100), 0.5)
    assert counted[0] == conv_flops(options, 70, 100)


def test_read_only_parent_stages_inside_existing_output(tmp_path, capsys, small_pair,
                                                         small_safetensors, monkeypatch):
    # e.g. `-o .` in a folder whose parent is not writable: the temp folder goes inside DIR.
    a, b, _ = small_pair
    out = tmp_path / "out"
    out.mkdir()
    real = cli._writable_dir
    monkeypatch.setattr(cli, "_writable_dir", lambda p: False if p == str(tmp_path) else real(p))
    code, stdout, err = run_cli(capsys, "interpolate", a, b, "-o", out, "--model",
                                small_safetensors, "--times-to-interpolate", "0")
    assert code == 0, err
    assert "wrote 2 frames" in stdout and "0 in-between" in stdout
    assert sorted(os.listdir(out)) == ["frame_000.png", "frame_001.png"]  # no hidden temp folder
    assert os.listdir(tmp_path) == ["out"]


def test_unavailable_backend_fails_before_any_work(tmp_path, capsys, small_pair, small_safetensors):
    missing = [name for name, why in ops.available_backends("cpu").items() if why]
    if not missing:
        pytest.skip("every backend runs on the CPU here")
    a, b, _ = small_pair
    code, _, err = run_cli(capsys, "interpolate", a, b, "-o", tmp_path / "out", "--model",
                           small_safetensors, "--device", "cpu", "--backend", missing[0])
    assert code == 1 and len(err.splitlines()) == 1 and f"--backend {missing[0]}" in err
    assert os.listdir(tmp_path) == []


def test_bench_kernels_table_and_json(tmp_path, capsys, monkeypatch):
    from film_fast import kernel_bench
    monkeypatch.setitem(kernel_bench.RESOLUTIONS, "720p", (96, 64))  # tiny, same code path
    report = tmp_path / "kernels.json"
    code, out, err = run_cli(capsys, "bench", "--kernels", "--config", "small", "--device", "cpu",
                             "--iters", "1", "--warmup", "0", "--backward", "--json", report)
    assert code == 0, err
    assert "GB/s" in out and "TFLOP/s" in out and "skipped cupy" in out
    data = json.loads(report.read_text())
    ran = [r for r in data["rows"] if "skipped" not in r]
    assert {r["op"] for r in ran} == {"warp", "upsample_flow", "upsample_flow_warp", "avg_pool2x2",
                                      "conv2d", "upsample_conv2x2"}
    assert all(r["backend"] == "torch" and r["pass"] == "fwd+bwd" and r["median_s"] > 0
               and r["fraction_of_ceiling"] > 0 for r in ran)
    # forward only: also the inference rows that store into level-buffer slices (both layouts)
    code, out, err = run_cli(capsys, "bench", "--kernels", "--config", "small", "--device", "cpu",
                             "--iters", "1", "--warmup", "0", "--backend", "torch", "--json", report)
    assert code == 0, err
    rows = [r for r in json.loads(report.read_text())["rows"] if r["op"] == "conv2d_levels"]
    assert sorted(r["case"].split("-into-")[1].split("-2x")[0] for r in rows) == [
        "features-first", "image-first"]
    assert all(r["tflops"] > 0 for r in rows)
