"""The torch reference ops against explicit NumPy statements of FILM's operator conventions."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

import film_fast.ops as ops
from film_fast.ops import dispatch


def np_warp(image: np.ndarray, flow: np.ndarray) -> np.ndarray:
    """out[b,:,y,x] = bilinear(image[b], x+dx, y+dy), sample positions clamped into the image."""
    b, c, h, w = image.shape
    out = np.empty_like(image, dtype=np.float64)
    for n in range(b):
        sx = np.clip(np.arange(w)[None, :] + flow[n, 0].astype(np.float64), 0, w - 1)
        sy = np.clip(np.arange(h)[:, None] + flow[n, 1].astype(np.float64), 0, h - 1)
        x0 = np.floor(sx).astype(int)
        y0 = np.floor(sy).astype(int)
        x1 = np.minimum(x0 + 1, w - 1)
        y1 = np.minimum(y0 + 1, h - 1)
        ax, ay = sx - x0, sy - y0
        img = image[n].astype(np.float64)
        out[n] = ((1 - ay) * ((1 - ax) * img[:, y0, x0] + ax * img[:, y0, x1])
                  + ay * ((1 - ax) * img[:, y1, x0] + ax * img[:, y1, x1]))
    return out


def np_resize_bilinear(x: np.ndarray, size) -> np.ndarray:
    """TF2 half-pixel-centre bilinear resize (= torch align_corners=False)."""
    _, _, h, w = x.shape
    oh, ow = size

    def axis(n_in, n_out):
        src = np.maximum((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0)
        i0 = np.minimum(np.floor(src).astype(int), n_in - 1)
        return i0, np.minimum(i0 + 1, n_in - 1), src - i0

    y0, y1, ay = axis(h, oh)
    x0, x1, ax = axis(w, ow)
    ay, ax = ay[:, None], ax[None, :]
    top = (1 - ax) * x[:, :, y0][:, :, :, x0] + ax * x[:, :, y0][:, :, :, x1]
    bot = (1 - ax) * x[:, :, y1][:, :, :, x0] + ax * x[:, :, y1][:, :, :, x1]
    return (1 - ay) * top + ay * bot


WARP_CASES = {
    "B1-C3-H8-W8-zero": (1, 3, 8, 8, "zero"),
    "B2-C5-H7-W13-integer": (2, 5, 7, 13, "integer"),
    "B3-C4-H16-W24-moderate": (3, 4, 16, 24, "moderate"),
    "B2-C67-H9-W11-far-outside": (2, 67, 9, 11, "far"),
    "B1-C1-H1-W5-single-row": (1, 1, 1, 5, "moderate"),
}


def make_flow(b, h, w, kind, seed=0):
    g = torch.Generator().manual_seed(seed)
    if kind == "zero":
        return torch.zeros(b, 2, h, w)
    if kind == "integer":
        return torch.randint(-4, 5, (b, 2, h, w), generator=g).float()
    scale = 3.0 if kind == "moderate" else 4.0 * max(h, w)  # "far": up to 4 image sizes away
    return torch.randn(b, 2, h, w, generator=g) * scale


@pytest.mark.parametrize("case", list(WARP_CASES))
def test_warp_matches_explicit_bilinear(case):
    b, c, h, w, kind = WARP_CASES[case]
    image = torch.rand(b, c, h, w, generator=torch.Generator().manual_seed(1))
    flow = make_flow(b, h, w, kind)
    out = ops.warp(image, flow, backend="torch")
    ref = np_warp(image.numpy(), flow.numpy())
    # grid_sample's normalised coordinates round to ~W/2 * 6e-8 px; values are in [0, 1].
    np.testing.assert_allclose(out.numpy(), ref, rtol=0, atol=4e-6)
    if kind == "zero":  # identity: exact copies of the input pixels
        np.testing.assert_array_equal(out.numpy(), ref.astype(np.float32))


def test_warp_layouts_and_low_precision_sampling():
    image = torch.rand(2, 6, 12, 20)
    flow = make_flow(2, 12, 20, "moderate")
    ref = ops.warp(image, flow, backend="torch")
    cl = ops.warp(image.contiguous(memory_format=torch.channels_last), flow, backend="torch")
    nc = ops.warp(image.transpose(2, 3).contiguous().transpose(2, 3), flow[..., :].clone(), backend="torch")
    torch.testing.assert_close(cl, ref, rtol=0, atol=0)
    torch.testing.assert_close(nc, ref, rtol=0, atol=0)
    for dtype in (torch.float16, torch.bfloat16):
        low = ops.warp(image.to(dtype), flow.to(dtype), backend="torch")
        assert low.dtype == dtype
        truth = ops.warp(image.to(dtype).float(), flow.to(dtype).float(), backend="torch")
        # Sampling in fp32: the only error left is the final rounding to dtype (half an ulp).
        assert (low.float() - truth).abs().max() <= torch.finfo(dtype).eps


def test_warp_coordinates_stay_fp32_at_1920_px():
    """An fp16 grid at x ~ 1900 is quantised to 1 px steps; the reference must not be."""
    w = 1920
    image = torch.arange(w, dtype=torch.float32).view(1, 1, 1, w).expand(1, 1, 2, w).contiguous()
    flow = torch.zeros(1, 2, 2, w)
    flow[:, 0] = 0.3
    out = ops.warp(image.half().float(), flow.half(), backend="torch")
    expected = torch.clamp(torch.arange(w) + flow.half().float()[0, 0, 0], max=w - 1)
    assert (out[0, 0, 0] - expected).abs().max() < 1e-3


def test_warp_gradients_gradcheck():
    g = torch.Generator().manual_seed(3)
    image = torch.rand(2, 3, 5, 7, generator=g, dtype=torch.float64, requires_grad=True)
    # keep samples away from integer positions and borders (bilinear kinks)
    flow = (torch.rand(2, 2, 5, 7, generator=g, dtype=torch.float64) * 0.6 + 0.2).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda i, f: ops.warp(i, f, backend="torch"), (image, flow))


def test_warp_flow_gradient_is_zero_where_clamped():
    image = torch.rand(1, 2, 6, 6, dtype=torch.float64)
    flow = torch.full((1, 2, 6, 6), 50.0, dtype=torch.float64, requires_grad=True)
    ops.warp(image, flow, backend="torch").sum().backward()
    assert torch.all(flow.grad == 0)


def test_warp_shape_errors():
    with pytest.raises(ValueError, match=r"flow must be \[B, 2, H, W\]"):
        ops.warp(torch.rand(1, 3, 8, 8), torch.rand(1, 2, 8, 9))
    with pytest.raises(ValueError, match="4 dims"):
        ops.warp(torch.rand(3, 8, 8), torch.rand(2, 8, 8))


@pytest.mark.parametrize("shape,size", [((2, 2, 4, 6), (8, 12)), ((1, 2, 3, 5), (7, 9)),
                                        ((1, 2, 1, 1), (2, 2))])
def test_upsample_flow_is_half_pixel_bilinear_of_twice_the_flow(shape, size):
    flow = torch.randn(*shape) * 5
    residual = torch.randn(shape[0], 2, *size)
    out = ops.upsample_flow(flow, size, residual, backend="torch")
    ref = np_resize_bilinear(2 * flow.numpy().astype(np.float64), size) + residual.numpy()
    # Non-2x ratios: torch rounds the source coordinate in fp32 (~1e-7 relative of |2 flow| ~ 30).
    np.testing.assert_allclose(out.numpy(), ref, rtol=0, atol=2e-5)
    np.testing.assert_allclose(ops.upsample_flow(flow, size, backend="torch").numpy(),
                               ref - residual.numpy(), rtol=0, atol=2e-5)


def np_conv_same(x, w, b):
    """TF 'same' stride-1 conv: pad (k-1)//2 before and k//2 after on each axis."""
    kh, kw = w.shape[2:]
    xp = np.pad(x, ((0, 0), (0, 0), ((kh - 1) // 2, kh // 2), ((kw - 1) // 2, kw // 2)))
    h, wd = x.shape[2:]
    out = np.zeros((x.shape[0], w.shape[0], h, wd))
    for dy in range(kh):
        for dx in range(kw):
            out += np.einsum("oi,bihw->bohw", w[:, :, dy, dx], xp[:, :, dy:dy + h, dx:dx + wd])
    return out + b[None, :, None, None]


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("activation", [None, "leaky_relu"])
def test_conv2d_same_padding_and_activation(k, activation):
    x = torch.randn(2, 5, 7, 9)
    w = torch.randn(4, 5, k, k)
    b = torch.randn(4)
    out = ops.conv2d(x, w, b, activation, backend="torch")
    ref = np_conv_same(x.numpy().astype(np.float64), w.numpy().astype(np.float64), b.numpy())
    if activation:
        ref = np.where(ref > 0, ref, 0.2 * ref)
    np.testing.assert_allclose(out.numpy(), ref, rtol=0, atol=1e-4)


def test_conv2d_rejects_unknown_activation():
    with pytest.raises(ValueError, match="activation"):
        ops.conv2d(torch.rand(1, 2, 4, 4), torch.rand(3, 2, 3, 3), None, "relu6", backend="torch")


def test_avg_pool_drops_odd_row_and_column():
    x = torch.arange(2 * 5 * 7, dtype=torch.float32).view(1, 2, 5, 7)
    out = ops.avg_pool2x2(x, backend="torch")
    ref = x.numpy()[:, :, :4, :6].reshape(1, 2, 2, 2, 3, 2).mean(axis=(3, 5))
    np.testing.assert_allclose(out.numpy(), ref, rtol=0, atol=1e-6)


def test_upsample_conv2x2_uses_half_pixel_nearest():
    x = torch.randn(1, 3, 3, 5)
    w = torch.randn(2, 3, 2, 2)
    b = torch.randn(2)
    size = (7, 11)  # non-2x ratio: 'nearest' and 'nearest-exact' differ here
    src_y = np.floor((np.arange(7) + 0.5) * 3 / 7).astype(int)
    src_x = np.floor((np.arange(11) + 0.5) * 5 / 11).astype(int)
    up = x.numpy()[:, :, src_y][:, :, :, src_x]
    ref = np_conv_same(up.astype(np.float64), w.numpy().astype(np.float64), b.numpy())
    out = ops.upsample_conv2x2(x, size, w, b, backend="torch")
    np.testing.assert_allclose(out.numpy(), ref, rtol=0, atol=1e-5)


# ---- dispatch ------------------------------------------------------------------------------
@pytest.fixture
def fake_op(monkeypatch):
    """An op only the torch backend implements; the triton package counts as importable."""
    monkeypatch.setattr(dispatch, "_loaded", dispatch._loaded | {"triton"})
    monkeypatch.setattr(dispatch, "_load_errors", {k: v for k, v in dispatch._load_errors.items()
                                                   if k != "triton"})
    dispatch.register("fake_op", "torch")(lambda x: x + 1)
    yield "fake_op"
    dispatch._IMPLS.pop(("fake_op", "torch"), None)
    dispatch._IMPLS.pop(("fake_op", "triton"), None)


def test_explicit_backend_without_implementation_raises_clearly(fake_op):
    with pytest.raises(dispatch.BackendUnavailable, match=r"'triton' has no implementation of 'fake_op'"):
        dispatch.resolve(fake_op, "triton", torch.device("cpu"))


def test_auto_falls_back_to_torch_with_logged_reason(fake_op, caplog):
    dispatch._logged.clear()
    with caplog.at_level(logging.INFO, logger="film_fast"):
        name, impl = dispatch.resolve(fake_op, "auto", torch.device("cuda"))
    assert name == "torch" and impl(1) == 2
    assert "no implementation of 'fake_op'" in caplog.text


def test_auto_prefers_a_kernel_backend_that_can_run(fake_op, monkeypatch):
    dispatch.register(fake_op, "triton")(lambda x: x + 2)
    monkeypatch.setitem(dispatch._VERIFIERS, "triton", lambda device: (True, ""))
    cuda = torch.device("cuda")  # resolve() only reads the device type; no GPU needed
    assert dispatch.resolve(fake_op, None, cuda)[0] == "triton"
    # On CPU, auto never picks the interpreter-only kernels.
    assert dispatch.resolve(fake_op, None, torch.device("cpu"))[0] == "torch"
    monkeypatch.setitem(dispatch._VERIFIERS, "triton", lambda device: (False, "no GPU"))
    assert dispatch.resolve(fake_op, None, cuda)[0] == "torch"
    with pytest.raises(dispatch.BackendUnavailable, match="no GPU"):
        dispatch.resolve(fake_op, "triton", cuda)


def test_env_var_and_unknown_names(monkeypatch, fake_op):
    monkeypatch.setenv("FILM_FAST_BACKEND", "cupy")
    with pytest.raises(dispatch.BackendUnavailable):
        dispatch.resolve(fake_op, None, torch.device("cpu"))
    monkeypatch.setenv("FILM_FAST_BACKEND", "torch")
    assert dispatch.resolve(fake_op, None, torch.device("cpu"))[0] == "torch"
    with pytest.raises(ValueError, match="unknown backend"):
        dispatch.normalize_backend("jax")


# ---- the torch backend's fast paths equal the reference ------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("activation", [None, "leaky_relu"])
def test_torch_fast_conv_matches_reference(dtype, k, activation):
    from film_fast.ops import torch_fast
    x = torch.randn(2, 37, 11, 13).contiguous(memory_format=torch.channels_last)
    w = torch.randn(19, 37, k, k) * 0.1
    b = torch.randn(19)
    truth = reference_conv = None
    with torch.no_grad():
        truth = ops.reference.conv2d(x, w, b, activation)  # fp32 truth
        fast = torch_fast.conv2d(x.to(dtype), w.to(dtype), b.to(dtype), activation).float()
        reference_conv = ops.reference.conv2d(x.to(dtype), w.to(dtype), b.to(dtype), activation).float()
    if dtype == torch.float32:
        torch.testing.assert_close(fast, truth, rtol=1e-5, atol=1e-5)
    else:  # at most 2x plain PyTorch's bf16 error against the fp32 truth
        assert (fast - truth).abs().max() <= 2 * (reference_conv - truth).abs().max() + 1e-3


def test_torch_fast_conv_keeps_autograd():
    from film_fast.ops import torch_fast
    x = torch.randn(1, 4, 6, 6, requires_grad=True)
    w = torch.randn(3, 4, 3, 3, requires_grad=True)
    torch_fast.conv2d(x, w, None, "leaky_relu").sum().backward()
    assert x.grad is not None and w.grad is not None


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_warp_into_a_nan_poisoned_buffer_slice(backend, dtype):
    """ops.warp(out=...) without autograd: the backend writes the channel slice itself."""
    if ops.available_backends("cpu")[backend]:
        pytest.skip(ops.available_backends("cpu")[backend])
    image = torch.rand(2, 5, 9, 13).to(dtype).contiguous(memory_format=torch.channels_last)
    flow = torch.randn(2, 2, 9, 13) * 6
    buf = torch.full((2, 12, 9, 13), float("nan"), dtype=dtype).contiguous(
        memory_format=torch.channels_last)
    with torch.no_grad():
        got = ops.warp(image, flow, out=buf[:, 4:9], backend=backend)
        expected = ops.warp(image, flow, backend=backend)
    assert got.data_ptr() == buf[:, 4:9].data_ptr()
    torch.testing.assert_close(buf[:, 4:9], expected, rtol=0, atol=0)
    assert torch.isnan(buf[:, :4]).all() and torch.isnan(buf[:, 9:]).all()


def _nan_buffer(b, c, h, w, dtype=torch.float32):
    return torch.full((b, c, h, w), float("nan"), dtype=dtype).contiguous(
        memory_format=torch.channels_last)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_out_variants_write_only_their_buffer_slice(backend, dtype):
    """conv2d_levels / avg_pool2x2 / upsample_conv2x2 with out= (no autograd): exactly the
    functional results, in the given channel slices and nowhere else."""
    if ops.available_backends("cpu")[backend]:
        pytest.skip(ops.available_backends("cpu")[backend])
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(2, 5, 9, 13, generator=g).to(dtype).contiguous(memory_format=torch.channels_last),
          _nan_buffer(2, 8, 4, 6, dtype)[:, 2:7]]
    xs[1].copy_(torch.randn(2, 5, 4, 6, generator=g))
    w = (torch.randn(3, 5, 3, 3, generator=g) * 0.2).to(dtype)
    b = torch.randn(3, generator=g).to(dtype)
    w2 = (torch.randn(4, 5, 2, 2, generator=g) * 0.2).to(dtype)
    bufs = [_nan_buffer(2, 9, 9, 13, dtype), _nan_buffer(2, 9, 4, 6, dtype)]
    with torch.no_grad():
        want = ops.conv2d_levels(xs, w, b, "leaky_relu", backend=backend)
        got = ops.conv2d_levels(xs, w, b, "leaky_relu", out=[buf[:, 4:7] for buf in bufs],
                                backend=backend)
        for buf, y, r in zip(bufs, want, got):
            assert torch.equal(buf[:, 4:7], y) and torch.equal(r, y)
            assert torch.isnan(buf[:, :4]).all() and torch.isnan(buf[:, 7:]).all()
        pool_buf = _nan_buffer(2, 7, 4, 6, dtype)
        r = ops.avg_pool2x2(xs[0], out=pool_buf[:, 1:6], backend=backend)
        want = ops.avg_pool2x2(xs[0], backend=backend)
        assert torch.equal(pool_buf[:, 1:6], want) and torch.equal(r, want)
        assert torch.isnan(pool_buf[:, :1]).all() and torch.isnan(pool_buf[:, 6:]).all()
        up_buf = _nan_buffer(2, 10, 9, 13, dtype)
        r = ops.upsample_conv2x2(xs[1], (9, 13), w2, b[:1].expand(4).contiguous(),
                                 out=up_buf[:, 3:7], backend=backend)
        want = ops.upsample_conv2x2(xs[1], (9, 13), w2, b[:1].expand(4).contiguous(),
                                    backend=backend)
        assert torch.equal(up_buf[:, 3:7], want) and torch.equal(r, want)
        assert torch.isnan(up_buf[:, :3]).all() and torch.isnan(up_buf[:, 7:]).all()
    if backend == "triton":  # kernel backends store in place: the out views come back
        assert got[0].data_ptr() == bufs[0][:, 4:7].data_ptr()


def test_out_variants_check_their_destination():
    x = torch.rand(1, 4, 8, 8)
    with pytest.raises(ValueError, match="out must be"):
        ops.avg_pool2x2(x, out=torch.empty(1, 4, 8, 8), backend="torch")
    with pytest.raises(TypeError, match="out must be a floating tensor"):
        ops.avg_pool2x2(x, out=torch.empty(1, 4, 4, 4, dtype=torch.int32), backend="torch")
    with pytest.raises(ValueError, match="one tensor per level"):
        ops.conv2d_levels([x], torch.rand(2, 4, 3, 3), out=[], backend="torch")
    with pytest.raises(ValueError, match=r"out\[0\] must be"):
        ops.conv2d_levels([x], torch.rand(2, 4, 3, 3), out=[torch.empty(1, 3, 8, 8)],
                          backend="torch")
    with pytest.raises(ValueError, match="out must be"):
        ops.upsample_conv2x2(x, (16, 16), torch.rand(2, 4, 2, 2), out=torch.empty(1, 2, 8, 8),
                             backend="torch")


def test_out_variants_keep_autograd_through_the_buffer():
    """torch backend with gradients: out= slices (computed, then copied) carry the gradient to
    the inputs, and the buffer's other channels keep theirs."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 8, 10, generator=g, requires_grad=True)
    w = torch.randn(3, 5, 3, 3, generator=g, requires_grad=True)
    other = torch.randn(2, 2, 8, 10, generator=g, requires_grad=True)
    buf = torch.zeros(2, 5, 8, 10).contiguous(memory_format=torch.channels_last)
    buf[:, :2].copy_(other)
    ops.conv2d_levels([x], w, None, "leaky_relu", out=[buf[:, 2:5]], backend="torch")
    gout = torch.randn(2, 5, 8, 10, generator=g)
    got = torch.autograd.grad(buf, (x, w, other), gout)
    y = ops.conv2d(x, w, None, "leaky_relu", backend="torch")
    want = torch.autograd.grad(y, (x, w), gout[:, 2:5])
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)
    assert torch.equal(got[2], gout[:, :2])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_out_of_another_dtype_gets_the_converted_result(backend):
    """e.g. bf16 autocast conv results stored into a model's fp32 buffers."""
    if ops.available_backends("cpu")[backend]:
        pytest.skip(ops.available_backends("cpu")[backend])
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 4, 6, 8, generator=g).to(torch.bfloat16)
    w = (torch.randn(3, 4, 3, 3, generator=g) * 0.3).to(torch.bfloat16)
    w2 = (torch.randn(3, 4, 2, 2, generator=g) * 0.3).to(torch.bfloat16)
    buf = _nan_buffer(2, 8, 6, 8)  # fp32
    small = _nan_buffer(2, 8, 3, 4)
    big = _nan_buffer(2, 8, 12, 16)
    with torch.no_grad():
        ops.conv2d_levels([x], w, None, "leaky_relu", out=[buf[:, 1:4]], backend=backend)
        ops.avg_pool2x2(x, out=small[:, 2:6], backend=backend)
        ops.upsample_conv2x2(x, (12, 16), w2, None, out=big[:, 0:3], backend=backend)
        assert torch.equal(buf[:, 1:4], ops.conv2d_levels([x], w, None, "leaky_relu",
                                                         backend=backend)[0].float())
        assert torch.equal(small[:, 2:6], ops.avg_pool2x2(x, backend=backend).float())
        assert torch.equal(big[:, :3], ops.upsample_conv2x2(x, (12, 16), w2, None,
                                                            backend=backend).float())
    assert torch.isnan(buf[:, 4:]).all() and torch.isnan(small[:, 6:]).all()
