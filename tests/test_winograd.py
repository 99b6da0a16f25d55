"""Winograd F(2x2, 3x3) / F(4x4, 3x3) convolutions (film_fast.ops.winograd) against float64
direct convolution, with both transform implementations (the C kernels of film_fast.kernels.cpu
and the PyTorch ops), the shape rule, and the whole model with and without the CPU fast paths."""
from __future__ import annotations

import pytest
import torch

import film_fast
import film_fast.ops as ops
from film_fast.kernels import cpu as native_cpu
from film_fast.ops import eager, reference, winograd

# The C transforms build wherever a C compiler is on PATH (CI has gcc); without one only the
# PyTorch-op transforms are tested, and test_native_library_builds_where_a_compiler_exists says
# why.
HAVE_CC = native_cpu.shutil.which(native_cpu.os.environ.get("CC") or "cc") is not None
NATIVE = [False, pytest.param(True, marks=pytest.mark.skipif(
    winograd.native_library() is None, reason=f"no native transforms: "
                                              f"{native_cpu.unavailable_reason()}"))]

CL = torch.channels_last
# max error over the output's largest magnitude, against float64 (see the module docstring):
# oneDNN's direct fp32 conv reaches 1e-6..4e-6 on these shapes
BOUND = {2: 2e-6, 4: 2e-5}


def _case(b, cin, cout, h, w, seed=0, layout="cl"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, cin, h, w, generator=g)
    if layout == "cl":
        x = x.contiguous(memory_format=CL)
    elif layout == "slice":  # a channel slice of a wider channels_last buffer
        buf = torch.randn(b, cin + 7, h, w, generator=g).contiguous(memory_format=CL)
        buf[:, 4:4 + cin].copy_(x)
        x = buf[:, 4:4 + cin]
    weight = torch.randn(cout, cin, 3, 3, generator=g) * (1.0 / (9 * cin)) ** 0.5
    bias = torch.randn(cout, generator=g)
    return x, weight, bias


def _rel_err(got, x, weight, bias, activation):
    truth = reference.conv2d(x.double(), weight.double(), bias.double(), activation)
    return ((got.double() - truth).abs().max() / truth.abs().max()).item()


@pytest.mark.parametrize("m", [2, 4])
@pytest.mark.parametrize("shape", [
    (1, 256, 256, 8, 8),     # whole tiles
    (2, 300, 260, 7, 9),     # odd sizes, batch 2: partial tiles at the bottom/right
    (1, 64, 32, 2, 3),       # smaller than one 4x4 tile
    (3, 17, 5, 13, 6),       # any channel counts work (the rule decides when it pays)
    (1, 130, 140, 1, 5),     # a single row
])
@pytest.mark.parametrize("activation", [None, "leaky_relu"])
@pytest.mark.parametrize("native", NATIVE)
def test_winograd_matches_float64_direct_conv(m, shape, activation, native):
    x, weight, bias = _case(*shape)
    got = winograd.conv3x3(x, weight, bias, activation, m=m, native=native)
    assert got.shape == (shape[0], shape[2], shape[3], shape[4])
    assert got.is_contiguous(memory_format=CL) and got.dtype == torch.float32
    assert _rel_err(got, x, weight, bias, activation) <= BOUND[m]


@pytest.mark.parametrize("layout", ["nchw", "slice"])
@pytest.mark.parametrize("native", NATIVE)
def test_winograd_reads_any_input_strides_and_no_bias(layout, native):
    x, weight, _ = _case(2, 40, 24, 9, 11, seed=3, layout=layout)
    got = winograd.conv3x3(x, weight, None, "leaky_relu", m=4, native=native)
    truth = reference.conv2d(x.double(), weight.double(), None, "leaky_relu")
    assert ((got.double() - truth).abs().max() / truth.abs().max()).item() <= BOUND[4]


def test_winograd_rejects_unknown_activation():
    x, weight, bias = _case(1, 8, 8, 4, 4)
    with pytest.raises(ValueError, match="unknown activation"):
        winograd.conv3x3(x, weight, bias, "relu")


def test_transformed_weight_follows_in_place_updates_and_tile_size():
    weight = torch.randn(4, 3, 3, 3)
    u4 = winograd.transformed_weight(weight, 4)
    assert u4.shape == (36, 3, 4)
    assert winograd.transformed_weight(weight, 4) is u4  # cached
    u2 = winograd.transformed_weight(weight, 2)
    assert u2.shape == (16, 3, 4)
    # U[(1, 1)] of F(2x2) is the sum of the kernel's taps scaled by 1/4
    torch.testing.assert_close(u2[5], weight.sum(dim=(2, 3)).T / 4)
    with torch.no_grad():
        weight.mul_(-1)
    torch.testing.assert_close(winograd.transformed_weight(weight, 2), -u2)


def test_tile_size_rule_with_native_transforms():
    def t(*shape):
        return winograd.tile_size(*shape, native=True)
    assert t(202, 64, 512, 512) == 4 and t(384, 64, 256, 256) == 4 and t(64, 64, 512, 512) == 4
    assert t(2442, 512, 64, 64) == 4 and t(1920, 256, 16, 16) == 4 and t(480, 64, 12, 16) == 4
    assert t(1920, 256, 8, 8) == 2 and t(256, 256, 4, 4) == 2
    assert t(128, 32, 512, 512) is None and t(32, 32, 512, 512) is None  # into thin outputs
    assert t(58, 64, 256, 256) is None and t(512, 512, 1, 8) is None
    assert winograd.tile_size(202, 64, 512, 512) == (4 if winograd.native_library() else None)


def test_tile_size_rule():
    def t(*shape):
        return winograd.tile_size(*shape, native=False)
    assert t(2442, 512, 64, 64) == 4 and t(1920, 256, 32, 32) == 4
    assert t(1920, 256, 16, 16) == 2 and t(512, 512, 4, 4) == 2  # F(2x2) below 32x32
    assert t(896, 128, 128, 128) == 4 and t(128, 128, 256, 256) == 4
    assert t(128, 128, 32, 32) is None  # narrow and small: direct
    assert t(202, 64, 512, 512) is None and t(384, 64, 256, 256) is None  # into 64 channels
    assert t(64, 64, 512, 512) is None
    assert t(512, 512, 1, 8) is None


def test_torch_backend_conv_uses_winograd_for_wide_layers_only_without_autograd():
    x, weight, bias = _case(1, 256, 256, 32, 32, seed=5)
    calls = []
    original = winograd.conv3x3

    def spy(*args, **kwargs):
        calls.append(args[1].shape)
        return original(*args, **kwargs)

    winograd.conv3x3 = spy
    try:
        with torch.no_grad():
            y = ops.conv2d(x, weight, bias, "leaky_relu", backend="torch")
            narrow = _case(1, 64, 32, 32, 32)  # into 32 channels: direct under both rules
            ops.conv2d(*narrow, "leaky_relu", backend="torch")
            with eager.reference_only():
                ops.conv2d(x, weight, bias, "leaky_relu", backend="torch")
        x.requires_grad_(True)
        ops.conv2d(x, weight, bias, "leaky_relu", backend="torch").sum().backward()
    finally:
        winograd.conv3x3 = original
    assert calls == [weight.shape]  # only the wide, no-grad, fast-paths-on call
    assert _rel_err(y, x.detach(), weight, bias, "leaky_relu") <= BOUND[4]
    assert x.grad is not None


def test_published_model_with_cpu_fast_paths_matches_the_reference_graph():
    """Random published weights at 128x128: every fast path runs (Winograd F(4x4) and F(2x2)
    layers, the gather warps, the phase up-convs) against the same graph on the reference
    ops. A wrong tap or tile would show up as an error of order 1e-2."""
    torch.manual_seed(0)
    model = film_fast.FILM().eval()
    g = torch.Generator().manual_seed(1)
    x0, x1 = torch.rand(1, 3, 128, 128, generator=g), torch.rand(1, 3, 128, 128, generator=g)
    with torch.inference_mode():
        fast = model(x0, x1, 0.5)
        with eager.reference_only():
            ref = model(x0, x1, 0.5)
    assert (fast - ref).abs().max().item() < 1e-4


@pytest.mark.parametrize("m", [2, 4])
@pytest.mark.parametrize("native", NATIVE)
def test_winograd_bands_of_tile_rows_match_one_pass(m, native, monkeypatch):
    """Large convs run in bands of tile rows (bounded temporaries): a tiny budget forces one
    tile row per band, including the partial last one, with the same result."""
    # the default budgets: a 4K level-1 fusion conv (522->128 at 1920x1080) one tile row per
    # band (~75 MB of temporaries each instead of ~16 GB at once); the 512x512 level-1 one in
    # bands of 6 tile rows (~60 MB: near the cache); the published 2442->512 fusion conv at 64x64 (its
    # transformed weight is 180 MB) in one band; never more than MAX_BAND_BYTES
    assert winograd._band_rows(4, 1, 270, 480, 522, 128) == 1
    assert winograd._band_rows(4, 1, 64, 64, 522, 128) == 6
    assert winograd._band_rows(4, 1, 16, 16, 2442, 512) == 16
    assert winograd.band_budget(4, 2442, 2442) == winograd.MAX_BAND_BYTES
    # native: V and M of a band within 8 MiB (L3-resident), unless U is larger
    assert winograd._native_band_rows(4, 2, 64, 64, 384, 64) == 1
    assert winograd._native_band_rows(4, 1, 64, 64, 522, 128) == 3
    assert winograd._native_band_rows(4, 1, 16, 16, 2442, 512) == 16
    x, weight, bias = _case(2, 24, 20, 23, 10, seed=9)
    whole = winograd.conv3x3(x, weight, bias, "leaky_relu", m=m, native=native)
    monkeypatch.setattr(winograd, "BAND_BYTES", 1)
    monkeypatch.setattr(winograd, "NATIVE_BAND_BYTES", 1)
    monkeypatch.setattr(winograd, "MAX_BAND_BYTES", 1)
    assert winograd._band_rows(m, 2, 6, 3, 24, 20) == 1
    assert winograd._native_band_rows(m, 2, 6, 3, 24, 20) == 1
    banded = winograd.conv3x3(x, weight, bias, "leaky_relu", m=m, native=native)
    torch.testing.assert_close(banded, whole, rtol=0, atol=0)


def test_transformed_weights_are_dropped_with_their_weight():
    import gc
    weight = torch.randn(8, 8, 3, 3)
    winograd.transformed_weight(weight, 4)
    winograd.transformed_weight(weight, 2)
    key = id(weight)
    assert (key, 4) in winograd._WEIGHTS and (key, 2) in winograd._WEIGHTS
    del weight
    gc.collect()
    assert (key, 4) not in winograd._WEIGHTS and (key, 2) not in winograd._WEIGHTS


@pytest.mark.parametrize("m", [2, 4])
@pytest.mark.parametrize("shape", [
    (2, 130, 70, 37, 45),    # channel counts across the C kernels' 64-channel blocks, odd sizes
    (1, 64, 64, 5, 5),       # one partial tile each way
    (1, 3, 1, 9, 4),         # fewer channels than a SIMD vector
])
def test_native_transforms_match_the_pytorch_op_transforms(m, shape):
    if winograd.native_library() is None:
        pytest.skip(f"no native transforms: {native_cpu.unavailable_reason()}")
    x, weight, bias = _case(*shape, seed=11)
    x = x * 3.0  # plenty of negative outputs for the fused LeakyReLU
    ops_y = winograd.conv3x3(x, weight, bias, "leaky_relu", m=m, native=False)
    nat_y = winograd.conv3x3(x, weight, bias, "leaky_relu", m=m, native=True)
    assert nat_y.shape == ops_y.shape and nat_y.is_contiguous(memory_format=CL)
    # the same arithmetic up to the order of the adds: rounding-level differences only
    assert ((nat_y - ops_y).abs().max() / ops_y.abs().max()).item() <= BOUND[m]
    assert _rel_err(nat_y, x, weight, bias, "leaky_relu") <= BOUND[m]


def test_native_transforms_use_the_torch_thread_count_with_equal_results():
    if winograd.native_library() is None:
        pytest.skip(f"no native transforms: {native_cpu.unavailable_reason()}")
    x, weight, bias = _case(2, 96, 80, 21, 27, seed=12)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = winograd.conv3x3(x, weight, bias, "leaky_relu", m=4, native=True)
        torch.set_num_threads(2)
        two = winograd.conv3x3(x, weight, bias, "leaky_relu", m=4, native=True)
    finally:
        torch.set_num_threads(old)
    torch.testing.assert_close(one, two, rtol=0, atol=0)  # tiles are independent


def test_native_library_builds_where_a_compiler_exists():
    """CI has gcc: there the C transforms must build (a test that skipped silently would let
    a broken source ship)."""
    if not HAVE_CC:
        pytest.skip("no C compiler on PATH")
    if not native_cpu.enabled():
        pytest.skip("FILM_FAST_NATIVE=0")
    assert winograd.native_library() is not None, native_cpu.unavailable_reason()


def test_native_build_is_cached_and_fails_with_the_compilers_message(tmp_path, monkeypatch):
    if not HAVE_CC:
        pytest.skip("no C compiler on PATH")
    first = native_cpu.build(out_dir=str(tmp_path))
    mtime = native_cpu.os.stat(first).st_mtime_ns
    assert native_cpu.build(out_dir=str(tmp_path)) == first  # cached: not rebuilt
    assert native_cpu.os.stat(first).st_mtime_ns == mtime
    lib = native_cpu.load(first)
    assert lib.film_wino_input.argtypes[-1] is native_cpu.ctypes.c_int
    with pytest.raises(RuntimeError, match="no C compiler"):
        native_cpu.build(compiler="film-fast-no-such-cc", out_dir=str(tmp_path))
    monkeypatch.setattr(native_cpu, "source", lambda: "this is not C;\n")
    with pytest.raises(RuntimeError, match="could not compile winograd_transforms.c"):
        native_cpu.build(out_dir=str(tmp_path / "broken"))


def test_film_fast_native_0_runs_the_pytorch_op_transforms(monkeypatch):
    x, weight, bias = _case(1, 128, 128, 8, 8, seed=13)
    monkeypatch.setenv("FILM_FAST_NATIVE", "0")
    assert winograd.native_library() is None
    assert native_cpu.unavailable_reason() == "FILM_FAST_NATIVE=0"
    assert winograd.tile_size(202, 64, 512, 512) is None  # the PyTorch-op rule
    with pytest.raises(RuntimeError, match="unavailable: FILM_FAST_NATIVE=0"):
        winograd.conv3x3(x, weight, bias, "leaky_relu", m=4, native=True)
    got = winograd.conv3x3(x, weight, bias, "leaky_relu", m=4)
    assert _rel_err(got, x, weight, bias, "leaky_relu") <= BOUND[4]
