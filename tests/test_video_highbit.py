"""film-fast video on sources above 8 bits per component: 16-bit work folder, float frames
through the model, an encoder pixel format of the source's depth (8-bit fallback with a
warning), resume at the same depth only. Clips are built here with PyAV (FFV1 lossless,
libx264 10-bit when this FFmpeg has it) from smooth gradients that 8 bits would quantise."""
from __future__ import annotations

import json
import os
from fractions import Fraction

import numpy as np
import pytest
import torch

import film_fast
import film_fast.cli as cli
import film_fast.video as video
from videokit import clip, gradient_frames, read_deep_video, read_video, write_deep_video, \
    write_video

av = pytest.importorskip("av")

LEVEL10 = 65535 / 1023  # one 10-bit level in 16-bit units


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def run_cli(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _encoder_formats(name: str):
    try:
        return [f.name for f in (av.codec.Codec(name, "w").video_formats or [])]
    except Exception:
        return []


def _png_bit_depth(path: str) -> int:
    with open(path, "rb") as f:
        header = f.read(26)
    assert header[:8] == b"\x89PNG\r\n\x1a\n" and header[12:16] == b"IHDR"
    assert header[25] == 2  # colour type: RGB
    return header[24]


@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    """ffv1.mkv: 5 frames 96x64 at 25 fps, FFV1 (lossless) yuv420p10le, BT.709 limited."""
    if "yuv420p10le" not in _encoder_formats("ffv1"):
        pytest.skip("this FFmpeg's FFV1 encoder has no yuv420p10le")
    folder = tmp_path_factory.mktemp("deep")
    write_deep_video(str(folder / "ffv1.mkv"), gradient_frames(), "ffv1", "yuv420p10le")
    return folder


@pytest.fixture(scope="module")
def deep_reference(deep, small_safetensors):
    """The uninterrupted --factor 2 run on ffv1.mkv (decoded)."""
    out = deep / "ref.mkv"
    code = cli.main(["video", str(deep / "ffv1.mkv"), "-o", str(out), "--factor", "2",
                     "--model", small_safetensors, "--quiet"])
    assert code == 0
    return read_deep_video(str(out))


def test_10bit_ffv1_keeps_10_bits(deep, deep_reference, small_model):
    frames, planes, pts, tb, info = deep_reference
    src, src_planes, src_pts, src_tb, src_info = read_deep_video(str(deep / "ffv1.mkv"))
    assert src_info["pix_fmt"] == "yuv420p10le" and len(src) == 5
    # Same codec, pixel format (10 bits) and colour tags; counts and timestamps as for 8 bits.
    for key in ("codec", "pix_fmt", "width", "height", "color_range", "colorspace",
                "color_primaries", "color_trc"):
        assert info[key] == src_info[key], key
    assert info["bits"] == 10
    assert len(frames) == (len(src) - 1) * 2 + 1 == 9
    assert [p * tb for p in pts] == [Fraction(k, 50) for k in range(9)]
    assert info["average_rate"] == 50
    # The source holds detail finer than 8 bits: decoding it to 8-bit RGB loses ~1 10-bit level
    # on average (what the output had before this path existed).
    with av.open(str(deep / "ffv1.mkv")) as c:
        first = next(c.decode(video=0)).to_ndarray(format="rgb24", src_colorspace=1,
                                                   src_color_range=1)
    eight = np.abs(first.astype(np.float64) * 257 - src[0]).mean() / LEVEL10
    assert eight > 0.7
    # Input frames pass through 16-bit PNGs and lossless FFV1: at most one 10-bit level off in
    # any plane (measured: identical), far below one 8-bit level in RGB.
    for k in range(len(src)):
        for a, b in zip(planes[2 * k], src_planes[k]):
            assert np.abs(a.astype(np.int32) - b).max() <= 1
        err = np.abs(frames[2 * k].astype(np.int32) - src[k]) / LEVEL10
        assert err.max() < 4 and err.mean() < 0.25
    # In-between frames: the library on the same float frames, through the same 4:2:0 YUV.
    tensors = [video._from_rgb48(f) for f in src]
    expected = list(film_fast.interpolate(small_model, tensors, scene_threshold=0.125))
    for k in range(1, 9, 2):
        yuv = av.VideoFrame.from_ndarray(video._to_rgb48(expected[k]), format="rgb48le").reformat(
            format="yuv420p10le", dst_colorspace=1, dst_color_range=1)
        want = [np.frombuffer(p, np.uint16).reshape(p.height, -1)[:, :p.width] for p in yuv.planes]
        for a, b in zip(planes[k], want):
            assert np.abs(a.astype(np.int32) - b).max() <= 1, k


def test_10bit_resume_equals_uninterrupted_run(deep, deep_reference, small_safetensors, capsys):
    out = deep / "resumed.mkv"
    work = str(out) + ".film-fast-work"
    args = ["video", deep / "ffv1.mkv", "-o", out, "--factor", "2", "--model", small_safetensors]
    code, _, err = run_cli(capsys, *args, "--stop-after", "3")
    assert code == 130 and "--resume" in err and not out.exists()
    names = sorted(os.listdir(os.path.join(work, "frames")))
    assert names == [f"{k:09d}.png" for k in range(3)]
    assert all(_png_bit_depth(os.path.join(work, "frames", n)) == 16 for n in names)
    manifest_path = os.path.join(work, "manifest.json")
    with open(manifest_path, encoding="utf-8") as f:
        manifest = json.load(f)
    assert manifest["bit_depth"] == 16
    # A work folder written at another depth (or by a version that wrote only 8-bit frames,
    # whose manifest has no bit_depth) is refused.
    for changed in (dict(manifest, bit_depth=8),
                    {k: v for k, v in manifest.items() if k != "bit_depth"}):
        with open(manifest_path, "w", encoding="utf-8") as f:
            json.dump(changed, f)
        code, _, err = run_cli(capsys, *args, "--resume")
        assert code == 2, err
        line, = err.splitlines()
        assert "written at 8 bits per component, this run writes 16" in line
    with open(manifest_path, "w", encoding="utf-8") as f:
        json.dump(manifest, f)
    code, stdout, err = run_cli(capsys, *args, "--resume")
    assert code == 0, err
    assert "interpolation: 6 frame(s)" in stdout and not os.path.exists(work)
    frames, planes, pts, tb, info = read_deep_video(str(out))
    ref_frames, ref_planes, ref_pts, _, _ = deep_reference
    assert pts == ref_pts and len(planes) == len(ref_planes) == 9
    for a, b in zip(planes, ref_planes):
        for pa, pb in zip(a, b):
            np.testing.assert_array_equal(pa, pb)


def test_rgb48_source_passes_through_exactly(tmp_path, small_safetensors, capsys):
    if "rgb48le" not in _encoder_formats("ffv1") and "gbrp16le" not in _encoder_formats("ffv1"):
        pytest.skip("this FFmpeg's FFV1 encoder has no 16-bit RGB")
    src_path = tmp_path / "rgb.mkv"
    fmt = "gbrp16le" if "gbrp16le" in _encoder_formats("ffv1") else "rgb48le"
    source = gradient_frames(n=3)
    write_deep_video(str(src_path), source, "ffv1", fmt)
    out = tmp_path / "out.mkv"
    code, stdout, err = run_cli(capsys, "video", src_path, "-o", out, "--factor", "2", "--model",
                                small_safetensors)
    assert code == 0, err
    assert err == ""  # no warning: FFV1 takes the 16-bit format
    frames, _, _, _, info = read_deep_video(str(out))
    assert info["bits"] == 16 and info["codec"] == "ffv1" and len(frames) == 5
    for k in range(3):
        np.testing.assert_array_equal(frames[2 * k], source[k])


def test_10bit_x264(tmp_path, small_safetensors, capsys):
    if "yuv420p10le" not in _encoder_formats("libx264"):
        pytest.skip("this FFmpeg's libx264 has no 10-bit output")
    src_path = tmp_path / "x264.mp4"
    write_deep_video(str(src_path), gradient_frames(), "libx264", "yuv420p10le",
                     options={"qp": "0"})
    out = tmp_path / "out.mp4"
    code, stdout, err = run_cli(capsys, "video", src_path, "-o", out, "--factor", "2", "--crf",
                                "0", "--model", small_safetensors)
    assert code == 0, err
    assert ", h264 yuv420p10le," in stdout
    src, src_planes, _, _, _ = read_deep_video(str(src_path))
    frames, planes, pts, tb, info = read_deep_video(str(out))
    assert info["codec"] == "h264" and info["pix_fmt"] == "yuv420p10le" and info["bits"] == 10
    assert [p * tb for p in pts] == [Fraction(k, 50) for k in range(9)]
    # x264 at 10 bits is not lossless at --crf 0: measured at most 2 levels per plane, mean
    # 0.8 10-bit levels in RGB (8-bit frames gave 7.4).
    for k in range(len(src)):
        for a, b in zip(planes[2 * k], src_planes[k]):
            assert np.abs(a.astype(np.int32) - b).max() <= 4
        assert (np.abs(frames[2 * k].astype(np.int32) - src[k]) / LEVEL10).mean() < 1.5


def test_encoder_without_high_bit_depth_falls_back_with_a_warning(deep, small_safetensors, capsys):
    out = deep / "mpeg4.mkv"
    code, stdout, err = run_cli(capsys, "video", deep / "ffv1.mkv", "-o", out, "--factor", "2",
                                "--codec", "mpeg4", "--model", small_safetensors, "--quiet")
    assert code == 0, err
    line, = err.splitlines()
    assert line.startswith("film-fast video: warning: mpeg4 ") and "8-bit yuv420p" in line
    assert "10-bit" in line and "yuv420p10le" in line
    frames, _, _, info, _ = read_video(str(out))
    assert info["pix_fmt"] == "yuv420p" and len(frames) == 9


def test_8bit_source_writes_8bit_work_and_resumes_old_manifests(tmp_path, small_safetensors,
                                                                capsys):
    src = tmp_path / "cafe.mp4"
    write_video(str(src), clip("cafe", size=(96, 64))[:4], audio=None)
    ref = tmp_path / "ref.mp4"
    code, _, err = run_cli(capsys, "video", src, "-o", ref, "--factor", "2", "--crf", "0",
                           "--model", small_safetensors, "--quiet")
    assert code == 0, err
    out = tmp_path / "out.mp4"
    work = str(out) + ".film-fast-work"
    args = ["video", src, "-o", out, "--factor", "2", "--crf", "0", "--model", small_safetensors]
    code, _, err = run_cli(capsys, *args, "--stop-after", "2")
    assert code == 130
    assert _png_bit_depth(os.path.join(work, "frames", f"{0:09d}.png")) == 8
    manifest_path = os.path.join(work, "manifest.json")
    with open(manifest_path, encoding="utf-8") as f:
        manifest = json.load(f)
    assert manifest["bit_depth"] == 8
    # A work folder from before bit_depth was recorded is an 8-bit one: it resumes.
    del manifest["bit_depth"]
    with open(manifest_path, "w", encoding="utf-8") as f:
        json.dump(manifest, f)
    code, _, err = run_cli(capsys, *args, "--resume", "--quiet")
    assert code == 0, err
    a, b = read_video(str(out)), read_video(str(ref))
    assert a[3]["pix_fmt"] == "yuv420p" and a[1] == b[1]
    for x, y in zip(a[0], b[0]):
        np.testing.assert_array_equal(x, y)


def test_decode_frames_by_depth(deep):
    info = video.probe(str(deep / "ffv1.mkv"))
    assert info.bits == 10 and info.work_depth == 16
    seen = []
    frames = list(video.decode_frames(info, lambda i, p: seen.append((i, p)), bit_depth=16))
    assert [(i, p * info.time_base) for i, p in seen] == [(k, Fraction(k, 25)) for k in range(5)]
    x = frames[0]
    assert isinstance(x, torch.Tensor) and x.dtype == torch.float32 and x.shape == (3, 64, 96)
    assert x.is_contiguous() and 0 <= float(x.min()) and float(x.max()) <= 1
    eight = list(video.decode_frames(info, lambda i, p: None, bit_depth=8))
    assert eight[0].dtype == np.uint8 and eight[0].shape == (64, 96, 3)


def test_rgb48_float_round_trip_is_exact():
    values = np.arange(65536, dtype=np.uint16)
    pixels = np.stack([values, values[::-1], values], -1).reshape(256, 256, 3)
    x = video._from_rgb48(pixels)
    np.testing.assert_array_equal(video._to_rgb48(x), pixels)
    assert video._to_rgb48(torch.tensor([[[-0.5]], [[1.5]], [[float("nan")]]])).tolist() == \
        [[[0, 65535, 0]]]


@pytest.mark.parametrize("codec, source, bits, expected", [
    ("ffv1", "yuv420p10le", 10, "yuv420p10le"),  # taken as it is
    ("ffv1", "p010le", 10, "yuv420p10le"),  # same depth and subsampling
    ("libx264", "yuv420p12le", 12, "yuv420p10le"),  # the deepest it has
    ("libx264", "rgb48le", 16, "yuv444p10le"),  # no RGB: full chroma
    ("libx264", "gray12le", 12, "gray10le"),  # grey for grey
    ("mpeg4", "yuv420p10le", 10, "yuv420p"),  # nothing above 8 bits
    ("libx264", "bgr24", 8, "yuv420p"),  # 8-bit inputs: as before
])
def test_encoder_pixel_format_choice(codec, source, bits, expected):
    if codec == "libx264" and "yuv420p10le" not in _encoder_formats("libx264"):
        pytest.skip("this FFmpeg's libx264 has no 10-bit output")
    if not _encoder_formats(codec):
        pytest.skip(f"no {codec} encoder")
    assert video._choose_pix_fmt(av, codec, source, bits) == expected
